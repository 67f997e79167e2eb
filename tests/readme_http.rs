//! The README's HTTP examples, run as written. Every fenced block that follows a
//! `<!-- http-example: NAME -->` line ("Calling it over HTTP") is run against a
//! real `harness serve` process, with `HARNESS_URL` and `HARNESS_API_KEY` set to
//! that node's: shell blocks with `bash -euo pipefail`, Python blocks with the
//! libtorch environment's Python (which has `openai`). Each answer must have the
//! shape the README documents.
//!
//! Two nodes, shared by all the examples: all-MiniLM-L6-v2 from a folder of that
//! name (as `make run` serves it), and the tiny random Mistral published on a test
//! hub as `mistralai/Mistral-7B-Instruct-v0.2`, so the examples' model names are
//! the ones the nodes serve.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod support;

use support::llm::{as_published, Arch, TinyLlm};
use support::model_repo::ModelRepo;
use support::node::{ServeProcess, ServeSettings};

const COOKIE: &str = "a-readme-http-cookie";
/// As `openssl rand -hex 32` makes them.
const API_KEY: &str = "5f0c8e0d3b1a47e6a9d2c4b8e7f6a5d4c3b2a1908f7e6d5c4b3a291807f6e5d4";
/// `make run`'s folder name, so the embedding node's model id.
const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";
const DIMENSION: usize = 384;
/// The README's generation model, the repo id the tiny Mistral is published as.
const CHAT_MODEL: &str = "mistralai/Mistral-7B-Instruct-v0.2";
/// The longest an example may run.
const EXAMPLE_TIMEOUT_S: &str = "120";

/// The node an example is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Embedding,
    Generation,
    /// Either: run against both.
    Any,
}

/// The marked examples the README must have, and the node each needs.
const EXAMPLES: [(&str, Task); 9] = [
    ("embed", Task::Embedding),
    ("v1-embeddings", Task::Embedding),
    ("chat", Task::Generation),
    ("chat-stream", Task::Generation),
    ("completions", Task::Generation),
    ("models", Task::Any),
    ("no-key", Task::Any),
    ("python-embeddings", Task::Embedding),
    ("python-chat", Task::Generation),
];

/// A marked block of the README, and the block after it (its documented
/// answer, when there is one).
#[derive(Debug)]
struct Example {
    name: String,
    lang: String,
    code: String,
    answer: Option<String>,
}

/// The README's marked examples, in order.
fn examples() -> Vec<Example> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("reading README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let fenced_at = |mut i: usize| -> Option<(String, String, usize)> {
        while lines.get(i)?.trim().is_empty() {
            i += 1;
        }
        let lang = lines[i].strip_prefix("```")?.trim().to_string();
        let end = (i + 1..lines.len()).find(|&j| lines[j].trim_end() == "```")?;
        Some((lang, lines[i + 1..end].join("\n") + "\n", end + 1))
    };
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- http-example:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let name = name.trim().to_string();
        let (lang, code, after) = fenced_at(i + 1)
            .unwrap_or_else(|| panic!("the http-example {name} is not followed by a fenced block"));
        // Its documented answer: the fenced block right after it, if any.
        let answer = fenced_at(after).map(|(_, answer, _)| answer);
        found.push(Example {
            name,
            lang,
            code,
            answer,
        });
    }
    found
}

/// What an example printed.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit ok: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Runs `example` as a reader would, with `HARNESS_URL` set to `node`'s HTTP
/// address and `HARNESS_API_KEY` to the key (and no proxy in the way).
fn run(example: &Example, node: &ServeProcess) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("timeout");
    cmd.arg(EXAMPLE_TIMEOUT_S);
    match example.lang.as_str() {
        "sh" | "bash" | "shell" => {
            cmd.args(["bash", "-euo", "pipefail", "-c", &example.code]);
        }
        "python" => {
            let script = dir.path().join("example.py");
            std::fs::write(&script, &example.code).unwrap();
            cmd.arg(support::python::torch_python()).arg(script);
        }
        other => panic!(
            "the http-example {} is {other:?}, not sh or python",
            example.name
        ),
    }
    for proxy in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(proxy);
    }
    let out = cmd
        .current_dir(dir.path())
        .env("HARNESS_URL", format!("http://{}", node.http_addr()))
        .env("HARNESS_API_KEY", API_KEY)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("running an example");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The JSON body a curl example sends (`-d '...'`), if any.
fn request_body(code: &str) -> Option<Value> {
    let start = code.find("-d '")? + 4;
    let end = start + code[start..].find('\'')?;
    Some(serde_json::from_str(&code[start..end]).expect("the example's body is JSON"))
}

/// Every model name an example writes: `"model": "..."` (JSON) and `model="..."`
/// (Python).
fn model_names(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for opening in ["\"model\": \"", "model=\""] {
        let mut rest = code;
        while let Some(at) = rest.find(opening) {
            rest = &rest[at + opening.len()..];
            let end = rest.find('"').unwrap();
            names.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    names
}

fn json(example: &str, run: &Run) -> Value {
    assert!(run.ok, "{example}: {run}");
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{example} did not answer JSON ({e}): {run}"))
}

fn texts(input: &Value) -> usize {
    match input {
        Value::String(_) => 1,
        Value::Array(texts) => texts.len(),
        other => panic!("an input of {other}"),
    }
}

fn vector(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a vector: {value}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `POST /embed`: one unit vector of the model's dimension per input.
fn check_embed(example: &Example, run: &Run) -> Vec<Vec<f64>> {
    let request = request_body(&example.code).unwrap();
    let answer = json(&example.name, run);
    let vectors: Vec<Vec<f64>> = answer
        .as_array()
        .unwrap_or_else(|| panic!("not a list of vectors: {run}"))
        .iter()
        .map(vector)
        .collect();
    assert_eq!(vectors.len(), texts(&request["inputs"]), "{run}");
    for v in &vectors {
        assert_eq!(v.len(), DIMENSION);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    }
    vectors
}

/// `POST /v1/embeddings`: OpenAI's list, in order, naming the model.
fn check_v1_embeddings(example: &Example, run: &Run) -> Vec<Vec<f64>> {
    let request = request_body(&example.code).unwrap();
    let answer = json(&example.name, run);
    assert_eq!(answer["object"], "list", "{run}");
    assert_eq!(answer["model"], EMBEDDING_MODEL, "{run}");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), texts(&request["input"]));
    let mut vectors = Vec::new();
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let v = vector(&item["embedding"]);
        assert_eq!(v.len(), DIMENSION);
        vectors.push(v);
    }
    let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(answer["usage"]["total_tokens"], prompt);
    vectors
}

/// The usage of a completion: positive, within `max_tokens`, adding up.
fn check_usage(usage: &Value, request: &Value) {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 0, "{usage}");
    if let Some(max) = request["max_tokens"].as_u64() {
        assert!(completion <= max, "{usage}");
    }
    assert_eq!(usage["total_tokens"], prompt + completion, "{usage}");
}

fn check_finish_reason(value: &Value) {
    assert!(
        value == "stop" || value == "length",
        "finish_reason {value}"
    );
}

/// `POST /v1/chat/completions`, whole: the assistant's message; its text.
fn check_chat(example: &Example, run: &Run) -> String {
    let request = request_body(&example.code).unwrap();
    let answer = json(&example.name, run);
    assert_eq!(answer["object"], "chat.completion", "{run}");
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(answer["created"].is_u64());
    assert_eq!(answer["model"], CHAT_MODEL);
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{run}");
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert!(choices[0]["logprobs"].is_null());
    check_finish_reason(&choices[0]["finish_reason"]);
    check_usage(&answer["usage"], &request);
    choices[0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {run}"))
        .to_string()
}

/// `POST /v1/chat/completions` with `stream: true`: server-sent events, the role
/// first, the text, one finish, `[DONE]` last; the text.
fn check_chat_stream(example: &Example, run: &Run) -> String {
    let request = request_body(&example.code).unwrap();
    assert_eq!(request["stream"], true);
    assert!(run.ok, "{}: {run}", example.name);
    let mut events = Vec::new();
    for line in run.stdout.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let data = line
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("a line that is no event: {line:?}\n{run}"));
        events.push(data);
    }
    assert_eq!(events.last(), Some(&"[DONE]"), "{run}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}\n{run}")))
        .collect();
    assert!(chunks.len() >= 2, "{run}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], CHAT_MODEL);
    }
    let usage = request["stream_options"]["include_usage"] == true;
    let with_choices = if usage {
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], serde_json::json!([]), "{run}");
        check_usage(&last["usage"], &request);
        rest
    } else {
        &chunks[..]
    };
    assert_eq!(
        with_choices[0]["choices"][0]["delta"],
        serde_json::json!({"role": "assistant", "content": ""}),
        "{run}"
    );
    let (end, middle) = with_choices.split_last().unwrap();
    assert_eq!(end["choices"][0]["delta"], serde_json::json!({}), "{run}");
    check_finish_reason(&end["choices"][0]["finish_reason"]);
    let mut text = String::new();
    for chunk in middle {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        assert!(choice["finish_reason"].is_null(), "{run}");
        text += choice["delta"]["content"].as_str().unwrap();
    }
    text
}

/// `POST /v1/completions`: the continued text.
fn check_completions(example: &Example, run: &Run) {
    let request = request_body(&example.code).unwrap();
    let answer = json(&example.name, run);
    assert_eq!(answer["object"], "text_completion", "{run}");
    assert!(answer["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(answer["model"], CHAT_MODEL);
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert!(choices[0]["text"].is_string(), "{run}");
    assert!(choices[0]["logprobs"].is_null());
    check_finish_reason(&choices[0]["finish_reason"]);
    check_usage(&answer["usage"], &request);
}

/// `GET /v1/models`: the one model the node serves; on the embedding node, the
/// answer the README shows (but its time).
fn check_models(example: &Example, run: &Run, model: &str) {
    let answer = json(&example.name, run);
    if model == EMBEDDING_MODEL {
        let documented = example.answer.as_deref().unwrap_or_else(|| {
            panic!(
                "the README shows no answer after the {} example",
                example.name
            )
        });
        let mut documented: Value =
            serde_json::from_str(documented).expect("the documented answer is JSON");
        documented["data"][0]["created"] = answer["data"][0]["created"].clone();
        assert_eq!(documented, answer, "the README shows another answer");
    }
    assert_eq!(answer["object"], "list", "{run}");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{run}");
    assert_eq!(data[0]["id"], model);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "harness");
    assert!(data[0]["created"].is_u64(), "{run}");
    assert!(data[0]["revision"].is_string(), "{run}");
}

/// A call without the key (`curl -i`): 401 with `WWW-Authenticate: Bearer` and
/// OpenAI's error, the body the README shows.
fn check_no_key(example: &Example, run: &Run) {
    assert!(run.ok, "{run}");
    let (head, body) = run
        .stdout
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no headers: {run}"));
    let mut head = head.lines();
    let status = head.next().unwrap();
    assert!(status.starts_with("HTTP/1.1 401"), "{run}");
    assert!(
        head.any(|h| h.eq_ignore_ascii_case("www-authenticate: bearer")),
        "{run}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {run}"));
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let documented = example.answer.as_deref().unwrap_or_else(|| {
        panic!(
            "the README shows no answer after the {} example",
            example.name
        )
    });
    let documented: Value = serde_json::from_str(documented.lines().last().unwrap())
        .expect("the documented answer's last line is its JSON body");
    assert_eq!(documented, body, "the README shows another body");
}

/// Whether `a` and `b` are the same vectors, to float rounding.
fn same_vectors(a: &[Vec<f64>], b: &[Vec<f64>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5))
}

/// The embedding node: all-MiniLM-L6-v2 exported by our tool into a folder of
/// that name (once per machine and version of the tool: the export takes longer
/// than the rest of the test).
fn embedding_node() -> ServeProcess {
    let tool = include_str!("../tools/export_torchscript.py");
    let marker = format!("{EMBEDDING_MODEL}/harness.json");
    let exported = support::python::made_once("readme-http-minilm", tool, &marker, |out| {
        let export = support::minilm::export(&out.join(EMBEDDING_MODEL));
        assert!(
            export.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&export.stderr)
        );
    });
    ServeSettings::model_dir(COOKIE, &exported.join(EMBEDDING_MODEL))
        .env("HARNESS_TASK", "embedding")
        .env("HARNESS_API_KEY", API_KEY)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_http_examples_run_as_written() {
    let examples = examples();
    let names: BTreeSet<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    let expected: BTreeSet<&str> = EXAMPLES.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, expected, "the README's http-example blocks");
    assert_eq!(names.len(), examples.len(), "an example marked twice");

    // Both nodes start at once: the export and the embedding node on a thread,
    // the generation node from the test hub.
    let embedding = tokio::task::spawn_blocking(embedding_node);
    let files = TinyLlm::get(Arch::Mistral).files();
    let published = ModelRepo::publish(CHAT_MODEL, &as_published(&files)).await;
    let settings = published
        .serve_settings(COOKIE)
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_API_KEY", API_KEY);
    let generation = tokio::task::spawn_blocking(move || settings.start())
        .await
        .unwrap();
    let embedding = embedding.await.unwrap();
    tokio::task::spawn_blocking(move || run_all(&examples, &embedding, &generation))
        .await
        .unwrap();
}

/// Runs each example on its node(s) and checks its answer, then checks the
/// examples against each other.
fn run_all(examples: &[Example], embedding: &ServeProcess, generation: &ServeProcess) {
    let mut embedded = Vec::new();
    let (mut chat, mut chat_stream, mut python_chat) = (None, None, None);
    for example in examples {
        let task = EXAMPLES.iter().find(|(n, _)| *n == example.name).unwrap().1;
        let nodes = match task {
            Task::Embedding => vec![(embedding, EMBEDDING_MODEL)],
            Task::Generation => vec![(generation, CHAT_MODEL)],
            Task::Any => vec![(embedding, EMBEDDING_MODEL), (generation, CHAT_MODEL)],
        };
        for (node, model) in nodes {
            for name in model_names(&example.code) {
                assert_eq!(name, model, "the {} example's model", example.name);
            }
            let run = run(example, node);
            eprintln!("== {} on {model}\n{run}", example.name);
            match example.name.as_str() {
                "embed" => {
                    let request = request_body(&example.code).unwrap();
                    embedded.push((request["inputs"].clone(), check_embed(example, &run)));
                }
                "v1-embeddings" => {
                    let request = request_body(&example.code).unwrap();
                    embedded.push((request["input"].clone(), check_v1_embeddings(example, &run)));
                }
                "chat" => {
                    chat = Some((
                        request_body(&example.code).unwrap(),
                        check_chat(example, &run),
                    ))
                }
                "chat-stream" => {
                    chat_stream = Some((
                        request_body(&example.code).unwrap(),
                        check_chat_stream(example, &run),
                    ))
                }
                "completions" => check_completions(example, &run),
                "models" => check_models(example, &run, model),
                "no-key" => check_no_key(example, &run),
                "python-embeddings" => {
                    assert!(run.ok, "{run}");
                    let printed = run.stdout.trim();
                    assert!(
                        example.code.contains(&format!("# {printed}")),
                        "the example prints {printed:?}, not what its comment says"
                    );
                }
                "python-chat" => {
                    assert!(run.ok, "{run}");
                    python_chat = Some((example.code.clone(), run.stdout));
                }
                other => unreachable!("{other}"),
            }
        }
    }

    // The two embedding routes give the same vectors for the same texts, to
    // float rounding (both are the mesh's; /embed scales them to unit length).
    for (i, (texts, vectors)) in embedded.iter().enumerate() {
        for (other_texts, other) in &embedded[i + 1..] {
            if texts == other_texts {
                assert!(
                    same_vectors(vectors, other),
                    "/embed and /v1/embeddings differ"
                );
            }
        }
    }
    // The model's generation_config is greedy: the same chat gives the same text
    // whole, streamed, and through Python.
    let (chat_request, chat) = chat.unwrap();
    let (mut stream_request, streamed) = chat_stream.unwrap();
    stream_request.as_object_mut().unwrap().remove("stream");
    if stream_request == chat_request {
        assert_eq!(streamed, chat, "streamed and whole answers differ");
    }
    let (code, printed) = python_chat.unwrap();
    let whole = printed
        .strip_suffix('\n')
        .and_then(|p| {
            let half = p.len() / 2;
            (p.len() % 2 == 1 && p.as_bytes()[half] == b'\n' && p[..half] == p[half + 1..])
                .then(|| p[..half].to_string())
        })
        .unwrap_or_else(|| panic!("the Python chat should print its answer twice: {printed:?}"));
    let question = chat_request["messages"][0]["content"].as_str().unwrap();
    if code.contains(question)
        && code.contains(&format!("max_tokens={}", chat_request["max_tokens"]))
    {
        assert_eq!(
            whole, chat,
            "the Python example got another answer than curl"
        );
    }
}
