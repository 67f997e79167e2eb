//! The generation task on real checkpoints: tiny random Llama, Mistral (sharded)
//! and Qwen2 models written by `transformers`, published on the test Hub as their
//! repos are, fetched and served by a node, and answered token for token as
//! `transformers`' own `generate` answers.

use std::time::Duration;

use futures_util::future::join_all;
use harness_client::{FinishReason, GenerateOptions, Generation, ServingError};

mod support;

use support::llm::{greedy, serve, Arch, TinyLlm};
use support::node::ServeSettings;
use support::serving::{generate, http_get, metric};

const TIMEOUT_MS: u64 = 60_000;

/// Every reference prompt at once, through 4 slots: prompts queue for slots,
/// join the running batch as others finish, and each answer is transformers'.
async fn greedy_equals_transformers(arch: Arch) {
    let model = TinyLlm::get(arch);
    assert!(model.references.len() >= 8);
    let serving = format!("greedy_{}", arch.folder());
    let (_repo, node, actor) = serve(arch, &serving, &["--max-sequences=4"]).await;
    let answers: Vec<Result<Generation, ServingError>> = join_all(
        model
            .references
            .iter()
            .map(|r| generate(&actor, &r.prompt, greedy(r.max_new_tokens), TIMEOUT_MS)),
    )
    .await;
    for (reference, answer) in model.references.iter().zip(answers) {
        let answer = answer.unwrap_or_else(|e| panic!("{:?}: {e}", reference.prompt));
        assert_eq!(
            answer.token_ids, reference.greedy_ids,
            "{arch:?}, prompt {:?}",
            reference.prompt
        );
        assert_eq!(answer.text, reference.greedy_text, "{arch:?}");
        assert_eq!(answer.prompt_tokens as usize, reference.prompt_ids.len());
        assert_eq!(answer.generated_tokens as usize, reference.greedy_ids.len());
        let expected = if reference.stopped_on_eos {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(answer.finish_reason, expected, "{:?}", reference.prompt);
        assert!(answer.time_to_first_token_ms > 0.0);
    }
    node.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llama_greedy_equals_transformers_with_prompts_at_once() {
    greedy_equals_transformers(Arch::Llama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sharded_mistral_greedy_equals_transformers_with_prompts_at_once() {
    greedy_equals_transformers(Arch::Mistral).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qwen2_greedy_equals_transformers_with_prompts_at_once() {
    greedy_equals_transformers(Arch::Qwen2).await;
}

/// Seeded sampling repeats itself; stop strings end the text where they occur;
/// a prompt longer than the context is refused naming both numbers; the status
/// and metrics show the generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampling_stop_strings_limits_and_metrics() {
    let model = TinyLlm::get(Arch::Llama);
    let (_repo, node, actor) = serve(
        Arch::Llama,
        "sampling",
        &["--max-sequences=2", "--max-context=64"],
    )
    .await;
    let prompt = &model.references[0].prompt;
    let sampled = |seed| GenerateOptions {
        max_new_tokens: Some(24),
        temperature: Some(1.0),
        top_p: Some(0.95),
        top_k: Some(0),
        seed: Some(seed),
        ..GenerateOptions::default()
    };
    let first = generate(&actor, prompt, sampled(11), TIMEOUT_MS)
        .await
        .unwrap();
    let again = generate(&actor, prompt, sampled(11), TIMEOUT_MS)
        .await
        .unwrap();
    assert_eq!(first.token_ids, again.token_ids);
    let others: Vec<Vec<u32>> =
        join_all((12..16).map(|seed| generate(&actor, prompt, sampled(seed), TIMEOUT_MS)))
            .await
            .into_iter()
            .map(|g| g.unwrap().token_ids)
            .collect();
    assert!(
        others.iter().any(|o| *o != first.token_ids),
        "other seeds give other tokens"
    );

    // A stop string taken from the middle of the greedy text.
    let reference = model
        .references
        .iter()
        .find(|r| !r.stopped_on_eos && r.greedy_text.chars().count() > 12)
        .expect("a reference with a long text");
    let chars: Vec<char> = reference.greedy_text.chars().collect();
    let stop: String = chars[6..9].iter().collect();
    let before = &reference.greedy_text[..reference.greedy_text.find(&stop).unwrap()];
    let options = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(reference.max_new_tokens)
    };
    let stopped = generate(&actor, &reference.prompt, options, TIMEOUT_MS)
        .await
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop, "{stopped:?}");
    assert_eq!(stopped.text, before, "stop {stop:?}");
    assert!(stopped.token_ids.len() < reference.greedy_ids.len());
    assert_eq!(
        stopped.token_ids[..],
        reference.greedy_ids[..stopped.token_ids.len()]
    );

    // The context (64 tokens) bounds prompt and output together.
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    match generate(&actor, &long, greedy(4), TIMEOUT_MS).await {
        Err(ServingError::BadInput { reason }) => {
            assert!(
                reason.contains("64") && reason.contains("HARNESS_MAX_CONTEXT"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Asked for more than fits, a generation ends with the context full (or on EOS).
    let mut filled = 0;
    for reference in model.references.iter().filter(|r| r.prompt_ids.len() < 64) {
        let fills = generate(&actor, &reference.prompt, greedy(1000), TIMEOUT_MS)
            .await
            .unwrap();
        if fills.finish_reason == FinishReason::Length {
            assert_eq!(fills.prompt_tokens + fills.generated_tokens, 64);
            filled += 1;
        } else {
            assert_eq!(fills.finish_reason, FinishReason::Eos);
        }
    }
    assert!(filled > 0, "no generation filled the context");
    // Bad sampling settings are refused, and the serving goes on.
    let bad = GenerateOptions {
        top_p: Some(1.5),
        ..GenerateOptions::default()
    };
    assert!(matches!(
        generate(&actor, prompt, bad, TIMEOUT_MS).await,
        Err(ServingError::BadInput { .. })
    ));

    let http = node.http_addr();
    let status: serde_json::Value = serde_json::from_str(&http_get(http, "/status").await).unwrap();
    let generation = &status["generation"];
    assert_eq!(generation["architecture"], "Llama", "{status}");
    assert_eq!(generation["max_sequences"], 2);
    assert_eq!(generation["max_context"], 64);
    let metrics = http_get(http, "/metrics").await;
    let generated = metric(&metrics, "harness_generated_tokens_total");
    assert!(generated >= 24.0 * 6.0, "{metrics}");
    assert!(metric(&metrics, "harness_prompt_tokens_total") > 0.0);
    assert!(metrics.contains("harness_time_to_first_token_seconds_bucket"));
    assert!(metrics.contains("harness_time_per_output_token_seconds_bucket"));
    assert!(metrics.contains("harness_generation_slots_in_use"));
    node.shutdown(Duration::from_secs(5)).await;
}

/// `harness serve` of `arch` from its folder with `extra` settings, which must
/// stop at once with exit 2 (a failure no restart fixes); its log.
fn serve_until_exit_2(arch: Arch, extra: &[(&str, &str)]) -> String {
    let model = TinyLlm::get(arch);
    let out = ServeSettings::model_dir("a-generation-test-cookie", &model.dir)
        .env("HARNESS_TASK", "generation")
        .envs(extra)
        .command()
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("running harness serve");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// Another architecture is refused at load with its name and the supported
/// list, and the node stops at once with exit 2: no restart can help.
#[test]
fn an_unsupported_architecture_fails_the_load_naming_it() {
    let stderr = serve_until_exit_2(Arch::Unsupported, &[]);
    assert!(
        stderr.contains("GPT2LMHeadModel")
            && stderr.contains("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        "{stderr}"
    );
}

/// A `harness serve` process of the Llama checkpoint from a local folder, called
/// through `HarnessClient::generate` and `harness call --generate` / `--chat`
/// (`--system`): the same text as transformers', the finish line on stderr,
/// seeds that repeat, and the wrong request kind refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_call_generate_prints_the_text_and_why_it_ended() {
    const COOKIE: &str = "a-generation-cli-cookie";
    let model = TinyLlm::get(Arch::Llama);
    let node = ServeSettings::model_dir(COOKIE, &model.dir)
        .env("HARNESS_TASK", "generation")
        .serving("generation_cli")
        .start();
    assert!(
        node.startup_log.contains("KV cache"),
        "the memory plan is logged: {}",
        node.startup_log
    );
    let reference = model
        .references
        .iter()
        .find(|r| !r.stopped_on_eos)
        .expect("a reference that runs to its length");

    let client = node.connect(Duration::from_secs(60)).await;
    let answer = client
        .generate(
            reference.prompt.clone(),
            greedy(reference.max_new_tokens),
            None,
        )
        .await
        .unwrap();
    assert_eq!(answer.token_ids, reference.greedy_ids);

    let call = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_harness"));
        cmd.args([
            "call",
            "--node",
            &node.cluster,
            "--serving-name",
            "generation_cli",
        ])
        .args(args)
        .env("HARNESS_COOKIE", COOKIE)
        .env_remove("RUST_LOG");
        let out = cmd.output().expect("running harness call");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let max = reference.max_new_tokens.to_string();
    let (code, stdout, stderr) = call(&[
        "--generate",
        &reference.prompt,
        "--greedy",
        "--max-new-tokens",
        &max,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{}\n", reference.greedy_text));
    let finish = format!(
        "finish: length ({} prompt tokens, {} generated, first token after ",
        reference.prompt_ids.len(),
        reference.greedy_ids.len()
    );
    assert!(stderr.contains(&finish), "{stderr}");

    let sampled = [
        "--generate",
        "Once upon a time",
        "--seed",
        "42",
        "--temperature",
        "0.8",
    ];
    let (code, first, _) = call(&sampled);
    assert_eq!(code, Some(0));
    assert_eq!(call(&sampled).1, first, "the same seed gives the same text");

    // A chat: the user's message through Llama 2's template, streamed to stdout.
    let single = model
        .chats
        .iter()
        .find(|c| c.messages.len() == 1)
        .expect("a one-message chat reference");
    let max = single.max_new_tokens.to_string();
    let (code, stdout, stderr) = call(&[
        "--chat",
        &single.messages[0].content,
        "--greedy",
        "--max-new-tokens",
        &max,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{}\n", single.greedy_text));
    assert!(
        stderr.contains(&format!("({} prompt tokens,", single.ids.len())),
        "{stderr}"
    );
    // With a system message: what the client gets for the same two messages.
    let (code, stdout, stderr) = call(&[
        "--system",
        "Answer briefly.",
        "--chat",
        "Where is Köln?",
        "--greedy",
        "--max-new-tokens",
        "12",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let messages = vec![
        harness_client::ChatMessage::system("Answer briefly."),
        harness_client::ChatMessage::user("Where is Köln?"),
    ];
    let expected = client.generate(messages, greedy(12), None).await.unwrap();
    assert_eq!(stdout, format!("{}\n", expected.text));

    let (code, _, stderr) = call(&["--embed", "hello"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("send Generate"), "{stderr}");
}

/// Slots and context that cannot fit: the load fails before allocating, with
/// the sizes and what to lower, and the node stops with exit 2.
#[test]
fn a_cache_too_large_for_the_machine_fails_the_load_saying_what_to_lower() {
    let stderr = serve_until_exit_2(
        Arch::Llama,
        &[
            ("HARNESS_MAX_SEQUENCES", "4096"),
            ("HARNESS_MAX_CONTEXT", "100000000"),
        ],
    );
    for says in [
        "GiB of KV cache",
        "4096 sequences",
        "lower HARNESS_MAX_SEQUENCES or HARNESS_MAX_CONTEXT",
    ] {
        assert!(stderr.contains(says), "{says:?} missing from: {stderr}");
    }
}

/// With every slot taken, a queued request whose deadline passes is answered
/// then, not when a slot frees: behind five long generations in one slot, a
/// request with a short deadline is answered before the last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_request_is_answered_at_its_deadline_while_slots_are_busy() {
    let model = TinyLlm::get(Arch::Qwen2);
    let (_repo, node, actor) = serve(
        Arch::Qwen2,
        "deadline_in_queue",
        &["--max-sequences=1", "--max-context=256"],
    )
    .await;
    let prompt = model.references[0].prompt.clone();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut calls = Vec::new();
    for i in 0..5 {
        let (actor, prompt, order) = (actor.clone(), prompt.clone(), order.clone());
        calls.push(tokio::spawn(async move {
            // Sampled, so that no EOS comes early in all five.
            let options = GenerateOptions {
                max_new_tokens: Some(240),
                seed: Some(i),
                ..GenerateOptions::default()
            };
            let answer = generate(&actor, &prompt, options, TIMEOUT_MS).await;
            order.lock().unwrap().push(format!("long {i}"));
            answer
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let short = generate(&actor, &prompt, greedy(4), 100).await;
    order.lock().unwrap().push("short".to_string());
    assert!(
        matches!(short, Err(ServingError::DeadlineExceeded { .. })),
        "{short:?}"
    );
    for call in calls {
        call.await.unwrap().expect("the long generations finish");
    }
    let order = order.lock().unwrap().clone();
    assert_ne!(order.last().map(String::as_str), Some("short"), "{order:?}");
    let status = support::serving::status(&actor).await;
    assert_eq!(
        status.queue_depth, 0,
        "nothing is left counted in the queue"
    );
    node.shutdown(Duration::from_secs(5)).await;
}

/// Chat messages through a node that fetched the repo as published: rendered
/// with the repo's own template (Llama's in tokenizer_config.json, Qwen2's in
/// chat_template.jinja), tokenized as `apply_chat_template` does, continued as
/// transformers continues those ids. A template's refusal (Mistral's of a
/// system message) and a repo without a template are `BadInput` saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_messages_generate_as_transformers_with_the_repos_template() {
    use harness_client::Prompt;
    use support::serving::generate_request;
    async fn chat(
        actor: &ractor::ActorRef<harness_client::ServingMessage>,
        messages: Vec<harness_client::ChatMessage>,
        max_new_tokens: u32,
    ) -> Result<Generation, ServingError> {
        let request = generate_request(Prompt::Chat(messages), greedy(max_new_tokens), TIMEOUT_MS);
        support::serving::generate_with(actor, request).await
    }
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Mistral] {
        let model = TinyLlm::get(arch);
        assert!(!model.chats.is_empty(), "{arch:?} has no chat references");
        let (_repo, node, actor) = serve(arch, &format!("chat_{}", arch.folder()), &[]).await;
        for reference in &model.chats {
            let answer = chat(&actor, reference.messages.clone(), reference.max_new_tokens)
                .await
                .unwrap_or_else(|e| panic!("{arch:?} {:?}: {e}", reference.messages));
            assert_eq!(
                answer.prompt_tokens as usize,
                reference.ids.len(),
                "{arch:?}"
            );
            assert_eq!(answer.token_ids, reference.greedy_ids, "{arch:?}");
            assert_eq!(answer.text, reference.greedy_text, "{arch:?}");
        }
        if let Some(refusal) = &model.chat_refusal {
            match chat(&actor, refusal.messages.clone(), 4).await {
                Err(ServingError::BadInput { reason }) => {
                    assert!(reason.contains(&refusal.error), "{reason}")
                }
                other => panic!("{arch:?}: {other:?}"),
            }
        }
        node.shutdown(Duration::from_secs(5)).await;
    }
    // Qwen2's repo without its chat_template.jinja has no template at all.
    let files: Vec<_> = TinyLlm::get(Arch::Qwen2)
        .files()
        .into_iter()
        .filter(|(name, _, _)| name != "chat_template.jinja")
        .collect();
    let (_repo, node, actor) =
        support::llm::serve_files(Arch::Qwen2, files, "chat_none", &[]).await;
    let messages = vec![harness_client::ChatMessage::user("Hi")];
    match chat(&actor, messages, 4).await {
        Err(ServingError::BadInput { reason }) => {
            assert!(reason.contains("no chat template"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A prompt still works.
    assert!(generate(&actor, "Hello", greedy(2), TIMEOUT_MS)
        .await
        .is_ok());
    node.shutdown(Duration::from_secs(5)).await;
}
