//! Streamed generation on real checkpoints (the tiny random models of
//! `support::llm`): the text as it is made, equal to the whole answer; what a
//! slow caller costs the node; deadlines, cancellation and callers that go away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use harness_client::{FinishReason, Generation, ServingError, StreamChunk};

mod support;

use support::client::ONE_CLIENT_AT_A_TIME;
use support::llm::{endless_dir, greedy, serve_endless, Arch, TinyLlm};
use support::node::{ServeProcess, ServeSettings};
use support::serving::{generate, generate_request, http_get, metric, open_stream, pull_stream};

const TIMEOUT_MS: u64 = 120_000;
/// A context far past the tiny models' 256 positions (rope goes on), so one
/// generation runs for thousands of steps.
const LONG_CONTEXT: &str = "--max-context=4096";

/// Pulls `stream` to its end, one pull every `every` (calling `before` before
/// each); the chunks.
async fn pull_all(
    actor: &ractor::ActorRef<harness_client::ServingMessage>,
    stream: u64,
    every: Duration,
    mut before: impl FnMut(),
) -> Result<Vec<StreamChunk>, ServingError> {
    let mut chunks = Vec::new();
    loop {
        tokio::time::sleep(every).await;
        before();
        let chunk = pull_stream(actor, stream, 5_000).await?;
        let last = chunk.end.is_some();
        chunks.push(chunk);
        if last {
            return Ok(chunks);
        }
    }
}

/// A caller that pulls once a second while the model makes hundreds of tokens
/// a second gets them in a few large deltas (not one round trip per token), the
/// node holds only the ids not pulled yet (within the stated bound: the
/// sequence's context, 4 bytes each), and the text is the whole answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_reader_gets_coalesced_deltas_and_costs_only_its_unpulled_ids() {
    let (_repo, node, actor) = serve_endless(Arch::Llama, "slow_reader", &[LONG_CONTEXT]).await;
    const TOKENS: u32 = 1500;
    let prompt = "Once upon a time, there was a";
    let whole = generate(&actor, prompt, greedy(TOKENS), TIMEOUT_MS)
        .await
        .unwrap();
    let took = Instant::now();
    let opened = open_stream(&actor, generate_request(prompt, greedy(TOKENS), TIMEOUT_MS))
        .await
        .unwrap();
    let shared = node.shared().clone();
    let mut most_unpulled = 0;
    let chunks = pull_all(&actor, opened.stream, Duration::from_secs(1), || {
        let status = shared.generation_status().unwrap();
        most_unpulled = most_unpulled.max(status.stream_tokens_unpulled);
    })
    .await
    .unwrap();
    let seconds = took.elapsed().as_secs_f64();
    eprintln!(
        "{TOKENS} tokens in {} pulls over {seconds:.1} s; at most {most_unpulled} ids waited on the node",
        chunks.len()
    );
    let text: String = chunks.iter().map(|c| c.delta.text.as_str()).collect();
    let ids: Vec<u32> = chunks
        .iter()
        .flat_map(|c| c.delta.token_ids.clone())
        .collect();
    assert_eq!(ids, whole.token_ids);
    assert_eq!(text, whole.text);
    // One pull a second: the count follows the time the model took, not the tokens.
    assert!(
        (chunks.len() as f64) <= seconds + 2.0 && chunks.len() < TOKENS as usize / 10,
        "{} pulls for {TOKENS} tokens in {seconds:.1} s",
        chunks.len()
    );
    // The ids made between two pulls waited on the node, and no more than the
    // generation's: the bound is the sequence's length.
    assert!(
        most_unpulled > 1 && most_unpulled <= u64::from(TOKENS),
        "{most_unpulled} ids unpulled"
    );
    let end = chunks.last().unwrap().end.clone().unwrap();
    assert_eq!(end.finish_reason, FinishReason::Length);
    assert_eq!(end.generated_tokens, TOKENS);
    assert_eq!(end.prompt_tokens, opened.prompt_tokens);
    // Pulled to its end, the stream is gone from the node.
    let status = shared.generation_status().unwrap();
    assert_eq!((status.streams_open, status.stream_tokens_unpulled), (0, 0));
    assert!(matches!(
        pull_stream(&actor, opened.stream, 10).await,
        Err(ServingError::BadInput { .. })
    ));
    node.shutdown(Duration::from_secs(5)).await;
}

/// The same slow reader through a real client (which keeps one chunk ahead of
/// its consumer) against a `harness serve` process, whose resident memory is
/// measured while the reader lags: the node keeps ids, not a growing copy of
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_reader_does_not_grow_the_node_process() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    const COOKIE: &str = "a-slow-reader-cookie";
    const TOKENS: u32 = 1500;
    let (_dir, node) = endless_node(COOKIE, "slow_process", 4096);
    let client = node.connect(Duration::from_secs(120)).await;
    let prompt = "Once upon a time, there was a";
    let whole = client.generate(prompt, greedy(TOKENS), None).await.unwrap();
    let addr = node.http_addr().parse().unwrap();
    let rss_before = node.rss_kib();
    let (mut rss_most, mut most_unpulled) = (rss_before, 0);
    let mut stream = client
        .generate_stream(prompt, greedy(TOKENS), None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    let mut deltas = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status: serde_json::Value =
            serde_json::from_str(&http_get(addr, "/status").await).unwrap();
        let unpulled = status["generation"]["stream_tokens_unpulled"]
            .as_u64()
            .unwrap();
        most_unpulled = most_unpulled.max(unpulled);
        rss_most = rss_most.max(node.rss_kib());
        match stream.next().await {
            Some(delta) => deltas.push(delta.unwrap()),
            None => break,
        }
    }
    let growth = rss_most.saturating_sub(rss_before);
    eprintln!(
        "{TOKENS} tokens in {} deltas; at most {most_unpulled} ids waited on the node; its resident memory grew by {growth} KiB at most",
        deltas.len()
    );
    let ids: Vec<u32> = deltas.iter().flat_map(|d| d.token_ids.clone()).collect();
    let text: String = deltas.iter().map(|d| d.text.as_str()).collect();
    assert_eq!((ids, text), (whole.token_ids, whole.text));
    assert!(
        deltas.len() < TOKENS as usize / 10,
        "{} deltas",
        deltas.len()
    );
    assert!(most_unpulled <= u64::from(TOKENS), "{most_unpulled}");
    // Coarse (the allocator and libtorch's scratch of the steps move it), but a
    // node that kept a copy per step, or text per token, would show.
    assert!(growth < 64 * 1024, "{growth} KiB");
}

/// A stream whose deadline passes mid-generation ends with `DeadlineExceeded`
/// at its next pull; its slot is freed and the generation counted cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_past_its_deadline_ends_and_frees_its_slot() {
    let (_repo, node, actor) = serve_endless(
        Arch::Qwen2,
        "stream_deadline",
        &[LONG_CONTEXT, "--max-sequences=1"],
    )
    .await;
    // 4000 tokens take seconds; the deadline is 400 ms.
    let opened = open_stream(&actor, generate_request("Hello", greedy(4000), 400))
        .await
        .unwrap();
    let answer = pull_all(&actor, opened.stream, Duration::from_millis(50), || {}).await;
    match answer {
        Err(ServingError::DeadlineExceeded { waited_ms }) => assert!(waited_ms >= 400),
        other => panic!("{other:?}"),
    }
    let metrics = node.shared().render_metrics();
    assert_eq!(
        metric(
            &metrics,
            "harness_generations_total{finish_reason=\"cancelled\"}"
        ),
        1.0
    );
    // The one slot is free: the next generation runs.
    let next = generate(&actor, "The cat", greedy(4), TIMEOUT_MS)
        .await
        .unwrap();
    assert!(next.generated_tokens > 0);
    node.shutdown(Duration::from_secs(5)).await;
}

/// Every reference prompt streamed at once through a real client and a
/// `harness serve` process with 4 slots: each stream's ids and text are
/// transformers' (and the whole answer's), its deltas are whole characters
/// although the byte-level tokenizer splits the prompts' non-ASCII characters
/// across tokens, and its end says why it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_greedy_equals_transformers_and_the_whole_answer() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    const COOKIE: &str = "a-streaming-cookie";
    let model = TinyLlm::get(Arch::Llama);
    let node = ServeSettings::model_dir(COOKIE, &model.dir)
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_MAX_SEQUENCES", 4)
        .serving("streaming")
        .start();
    let client = node.connect(Duration::from_secs(60)).await;
    let streams = model.references.iter().map(|r| {
        let client = &client;
        async move {
            let mut stream = client
                .generate_stream(r.prompt.as_str(), greedy(r.max_new_tokens), None)
                .await
                .unwrap();
            let mut deltas = Vec::new();
            while let Some(delta) = stream.next().await {
                deltas.push(delta.unwrap());
            }
            let end = stream.end().cloned().expect("an end after the last delta");
            let whole = client
                .generate(r.prompt.as_str(), greedy(r.max_new_tokens), None)
                .await
                .unwrap();
            (deltas, end, whole)
        }
    });
    let answers = join_all(streams).await;
    let tokenizer = tokenizers::Tokenizer::from_file(model.dir.join("tokenizer.json")).unwrap();
    let mut split_characters = 0;
    for (reference, (deltas, end, whole)) in model.references.iter().zip(answers) {
        let ids: Vec<u32> = deltas.iter().flat_map(|d| d.token_ids.clone()).collect();
        let text: String = deltas.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(ids, reference.greedy_ids, "{:?}", reference.prompt);
        assert_eq!(text, reference.greedy_text, "{:?}", reference.prompt);
        assert_eq!((&ids, &text), (&whole.token_ids, &whole.text));
        let expected = if reference.stopped_on_eos {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(end.finish_reason, expected);
        assert_eq!(end.finish_reason, whole.finish_reason);
        assert_eq!(end.prompt_tokens as usize, reference.prompt_ids.len());
        assert_eq!(end.generated_tokens as usize, ids.len());
        assert!(end.time_to_first_token_ms > 0.0);
        // A token that is part of a character decodes alone to U+FFFD; the
        // deltas hold no U+FFFD the whole text does not.
        split_characters += reference
            .greedy_ids
            .iter()
            .filter(|&&id| {
                tokenizer
                    .decode(&[id], true)
                    .unwrap()
                    .contains(char::REPLACEMENT_CHARACTER)
            })
            .count();
        let replaced = |s: &str| s.matches(char::REPLACEMENT_CHARACTER).count();
        assert_eq!(
            deltas.iter().map(|d| replaced(&d.text)).sum::<usize>(),
            replaced(&reference.greedy_text)
        );
    }
    assert!(
        split_characters > 0,
        "no generated token splits a character: the test proves nothing about UTF-8"
    );
}

/// With one slot, a stream dropped after 3 deltas frees the slot for the
/// request waiting behind it: that request is answered, the dropped one is
/// counted cancelled and made few of the tokens it asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_stream_frees_its_slot_for_the_request_behind_it() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    const COOKIE: &str = "a-stream-drop-cookie";
    let (_dir, node) = endless_node(COOKIE, "stream_drop", ENDLESS_CONTEXT);
    let client = node.connect(Duration::from_secs(120)).await;
    let mut first = client
        .generate_stream("Hello", greedy(ENDLESS), None)
        .await
        .unwrap();
    let mut delivered = first.next().await.unwrap().unwrap().token_ids.len();
    // The second request waits for the only slot.
    let second = tokio::spawn({
        let client = Arc::new(client);
        let waiting = client.clone();
        async move { waiting.generate("The cat", greedy(8), None).await }
    });
    wait_until_queued(&node, 1).await;
    for _ in 0..2 {
        delivered += first.next().await.unwrap().unwrap().token_ids.len();
    }
    drop(first);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.generated_tokens, 8);
    let (cancelled, made) = cancelled_and_made(&node, &second).await;
    eprintln!("the dropped stream made {made} tokens, {delivered} of them delivered");
    assert_eq!(cancelled, 1.0);
    assert!(
        made >= delivered as f64 && made < f64::from(ENDLESS),
        "{made} tokens made"
    );
}

/// A `harness call --generate` process killed mid-stream (its session closes)
/// frees its slot for the request behind it, as a dropped stream does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_killed_mid_stream_frees_its_slot() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    const COOKIE: &str = "a-stream-kill-cookie";
    let (_dir, node) = endless_node(COOKIE, "stream_kill", ENDLESS_CONTEXT);
    let mut caller = std::process::Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "call",
            "--node",
            &node.cluster,
            "--serving-name",
            "stream_kill",
        ])
        .args(["--generate", "Hello", "--greedy", "--max-new-tokens"])
        .arg(ENDLESS.to_string())
        .args(["--deadline-ms", "600000"])
        .env("HARNESS_COOKIE", COOKIE)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running harness call");
    // Its text is arriving: it is mid-stream.
    let mut stdout = caller.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("text from the stream");
    let client = Arc::new(node.connect(Duration::from_secs(120)).await);
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.generate("The cat", greedy(8), None).await }
    });
    wait_until_queued(&node, 1).await;
    caller.kill().unwrap();
    caller.wait().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.generated_tokens, 8);
    let (cancelled, made) = cancelled_and_made(&node, &second).await;
    eprintln!("the killed caller's generation made {made} tokens");
    assert_eq!(cancelled, 1.0);
    assert!(
        made < f64::from(ENDLESS),
        "{made} tokens made: the generation ran to its end"
    );
    // No one will pull its stream: closed at once (not after its 10-minute
    // deadline), so it no longer counts in flight and idle shutdown can come.
    let addr = node.http_addr().parse().unwrap();
    let mut open = u64::MAX;
    for _ in 0..100 {
        let status: serde_json::Value =
            serde_json::from_str(&http_get(addr, "/status").await).unwrap();
        open = status["generation"]["streams_open"].as_u64().unwrap();
        if open == 0 && status["in_flight"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open, 0, "the dead caller's stream is still open");
}

/// A `harness serve` process of the Llama checkpoint that never stops on an
/// EOS, with one slot and `context` tokens, and the folder it serves.
fn endless_node(cookie: &str, serving: &str, context: u32) -> (tempfile::TempDir, ServeProcess) {
    let dir = endless_dir(Arch::Llama);
    let node = ServeSettings::model_dir(cookie, dir.path())
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_MAX_SEQUENCES", 1)
        .env("HARNESS_MAX_CONTEXT", context)
        .serving(serving)
        .start();
    (dir, node)
}

/// Tokens of a generation that cannot end before a test acts on it (minutes
/// of steps for the tiny model), and the context that holds them.
const ENDLESS: u32 = 30_000;
const ENDLESS_CONTEXT: u32 = 32_768;

/// Waits until the node has `n` requests waiting for a slot.
async fn wait_until_queued(node: &ServeProcess, n: u64) {
    let addr = node.http_addr().parse().unwrap();
    let mut status = serde_json::Value::Null;
    for _ in 0..600 {
        status = serde_json::from_str(&http_get(addr, "/status").await).unwrap();
        if status["queue_depth"].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http_get(addr, "/metrics").await;
    panic!(
        "no request queued behind the stream: {status}\n{metrics}\n{}",
        node.log()
    );
}

/// Generations counted cancelled on the node, and the tokens made by others
/// than `second`.
async fn cancelled_and_made(node: &ServeProcess, second: &Generation) -> (f64, f64) {
    let metrics = http_get(node.http_addr().parse().unwrap(), "/metrics").await;
    let cancelled = metric(
        &metrics,
        "harness_generations_total{finish_reason=\"cancelled\"}",
    );
    let made =
        metric(&metrics, "harness_generated_tokens_total") - f64::from(second.generated_tokens);
    (cancelled, made)
}

/// The engine itself, on the Llama checkpoint with one slot: a sequence whose
/// caller cancels while another waits ends at the very next step, which admits
/// the waiting one; the cancelled one made no token after it was cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sequence_leaves_at_the_next_step() {
    use harness::engine::generation::{
        Finish, GenerationEngine, GenerationSettings, ModelConfig, SamplingParams, Sequence,
        Watcher,
    };
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// Logs each token under its sequence's name; cancels itself at its first
    /// token once `cancel_after` is set.
    struct Recorder {
        name: char,
        log: Arc<Mutex<Vec<char>>>,
        cancel_after: Option<Arc<AtomicBool>>,
        cancelled: AtomicBool,
    }
    impl Watcher for Recorder {
        fn token(&mut self, _generated: &[u32]) -> bool {
            self.log.lock().unwrap().push(self.name);
            if self
                .cancel_after
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                self.cancelled.store(true, Ordering::SeqCst);
            }
            false
        }
        fn cancelled(&self) -> bool {
            self.cancelled.load(Ordering::SeqCst)
        }
    }

    let model = TinyLlm::get(Arch::Llama);
    let config =
        ModelConfig::parse(&std::fs::read_to_string(model.dir.join("config.json")).unwrap())
            .unwrap();
    let weights: Vec<_> = std::fs::read_dir(&model.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let settings = GenerationSettings {
        slots: 1,
        context: 256,
        max_queue: 8,
        kind: harness::engine::Kind::Float,
    };
    let plan = GenerationEngine::plan(config, &weights, settings).unwrap();
    let engine = GenerationEngine::load(plan, harness::engine::DeviceChoice::Cpu, None)
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let second_queued = Arc::new(AtomicBool::new(false));
    let sequence = |name, cancel_after| Sequence {
        prompt: vec![0, 300, 301],
        sampling: SamplingParams::greedy(),
        max_new_tokens: 200,
        eos: Vec::new(),
        watcher: Some(Box::new(Recorder {
            name,
            log: log.clone(),
            cancel_after,
            cancelled: AtomicBool::new(false),
        })),
        received: Instant::now(),
        deadline: Instant::now() + Duration::from_secs(120),
    };
    let first = engine
        .submit(sequence('A', Some(second_queued.clone())))
        .unwrap();
    while log.lock().unwrap().len() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = engine.submit(sequence('B', None)).unwrap();
    second_queued.store(true, Ordering::SeqCst);
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_eq!(first.reason, Finish::Cancelled);
    assert_eq!(second.reason, Finish::Length);
    let log: String = log.lock().unwrap().iter().collect();
    let a = first.tokens.len();
    // A's tokens, the one that saw the cancel last, then B's alone.
    assert_eq!(
        log,
        format!("{}{}", "A".repeat(a), "B".repeat(200)),
        "{log}"
    );
}
