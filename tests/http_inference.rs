//! The HTTP inference routes (TEI's `/embed`, OpenAI's `/v1/...`) of real
//! `harness serve` processes, called with OpenAI's own `openai` Python package
//! (`support/openai_client.py`, which prints what it got as JSON) and with plain
//! HTTP, and held to what the mesh answers for the same request: the same
//! vectors, the same text, the same counts. Also the key, the errors' shapes,
//! and a client that goes away freeing its sequence slot.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use harness_client::{ChatMessage, FinishReason, GenerateOptions, Generation, HarnessClient};
use serde_json::{json, Value};

mod support;

use support::client::ONE_CLIENT_AT_A_TIME;
use support::llm::{endless_dir, Arch, TinyLlm};
use support::minilm;
use support::model_repo::ModelRepo;
use support::node::{ServeProcess, ServeSettings};
use support::python::{stdout_of, torch_python};
use support::serving::{http_get, metric};

const KEY: &str = "sk-harness-http-inference-test";
const COOKIE: &str = "an-http-inference-cookie";
const EMBEDDING_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Runs `support/openai_client.py` against `node`'s `/v1` with `key`: `ops` in
/// order (see the script); their results.
async fn openai(node: &ServeProcess, key: &str, ops: Value) -> Vec<Value> {
    static PYTHON: OnceLock<std::path::PathBuf> = OnceLock::new();
    let python = PYTHON.get_or_init(torch_python).clone();
    let count = ops.as_array().unwrap().len();
    let spec = json!({
        "base_url": format!("http://{}/v1", node.http_addr()),
        "api_key": key,
        "ops": ops,
    });
    let out = tokio::task::spawn_blocking(move || {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/openai_client.py");
        stdout_of(
            Command::new(python)
                .arg(script)
                .arg(spec.to_string())
                .env("PYTHONWARNINGS", "ignore")
                .env("NO_PROXY", "*"),
            "openai_client.py",
        )
    })
    .await
    .unwrap();
    let results: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: the script printed {out}"));
    assert_eq!(results.len(), count, "{out}");
    results
}

/// The body of the API error `result` (an op's result), asserting the client
/// raised `class` for the HTTP status `status`.
fn api_error<'a>(result: &'a Value, class: &str, status: u16) -> &'a Value {
    let error = &result["error"];
    assert_eq!(error["class"], class, "{result}");
    assert_eq!(error["status"], status, "{result}");
    &error["body"]
}

/// Plain HTTP to a node's HTTP listener, without a proxy.
struct Raw {
    client: reqwest::Client,
    base: String,
}

/// A raw answer: status, headers and body text.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap_or(""))
    }
}

impl Raw {
    fn new(node: &ServeProcess) -> Raw {
        Raw {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            base: format!("http://{}", node.http_addr()),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.send(reqwest::Method::GET, path, key, None).await
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &[u8]) -> Answer {
        self.send(reqwest::Method::POST, path, key, Some(body.to_vec()))
            .await
    }

    async fn post_json(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        self.post(path, key, &serde_json::to_vec(body).unwrap())
            .await
    }

    /// `POST /embed` of `body` with `key`, asserted 200: its vectors.
    async fn tei_vectors(&self, key: &str, body: &Value) -> Vec<Vec<f32>> {
        let answer = self.post_json("/embed", Some(key), body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect()
    }
}

/// Asserts `answer` is `/v1`'s error shape with `status`, `type` and (when
/// given) `code`; its message.
fn openai_error(answer: &Answer, status: u16, kind: &str, code: Option<&str>) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    let body = answer.json();
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{body}");
    }
    assert!(error.get("param").is_some(), "{body}");
    error["message"].as_str().expect("a message").to_string()
}

/// A JSON array of numbers as f32s (each written from an f32, so read back
/// exactly).
fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of numbers: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Base64 of little-endian f32s, decoded.
fn base64_floats(v: &Value) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("not base64: {v}")))
        .unwrap();
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Asserts `got` equals `want` bit for bit (`what` says which).
fn assert_same_vectors(got: &[Vec<f32>], want: &[harness_client::Embedding], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: how many vectors");
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        let same = got.len() == want.vector.len()
            && got
                .iter()
                .zip(&want.vector)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{what}: vector {i} differs from the mesh's (first values {:?} vs {:?})",
            &got[..got.len().min(4)],
            &want.vector[..want.vector.len().min(4)]
        );
    }
}

/// Within 1e-6 of each other, component by component.
fn assert_close_vectors(got: &[Vec<f32>], want: &[harness_client::Embedding], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: how many vectors");
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        assert_eq!(got.len(), want.vector.len(), "{what}: vector {i}'s length");
        let worst = got
            .iter()
            .zip(&want.vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{what}: vector {i} is {worst} off the mesh's"
        );
    }
}

/// The data of an OpenAI embeddings answer: asserts its shape (object, model,
/// indexes in order, usage of `tokens`); the embeddings as they came.
fn embeddings_data(answer: &Value, tokens: u32) -> Vec<&Value> {
    assert_eq!(answer["object"], "list", "{answer}");
    assert_eq!(answer["model"], EMBEDDING_REPO, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], tokens, "{answer}");
    assert_eq!(answer["usage"]["total_tokens"], tokens, "{answer}");
    let data = answer["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["object"], "embedding", "{item}");
            assert_eq!(item["index"], i, "{item}");
            &item["embedding"]
        })
        .collect()
}

/// all-MiniLM-L6-v2 exported with our tool and published on a test Hub as
/// [`EMBEDDING_REPO`].
async fn published_minilm() -> (tempfile::TempDir, ModelRepo) {
    let export = tempfile::tempdir().unwrap();
    let out = export.path().join("all-MiniLM-L6-v2");
    let exported = minilm::export(&out);
    assert!(
        exported.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let published = minilm::publish(&out, EMBEDDING_REPO).await;
    (export, published)
}

/// An embedding node with a key and the smallest message limit (64 KiB): the
/// `openai` client's embeddings (as it asks by default, base64, and as floats)
/// give the mesh's vectors for the same texts (bit for bit for a text alone),
/// and so does TEI's `/embed` (normalized); the model list names the repo; a
/// wrong or missing key is refused before the body is read; and the errors
/// have their shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_over_http_equal_the_meshs_vectors() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let (_export, published) = published_minilm().await;
    let node = published
        .serve_settings(COOKIE)
        .env("HARNESS_TASK", "embedding")
        .env("HARNESS_API_KEY", KEY)
        .env("HARNESS_MAX_MESSAGE_BYTES", 65536)
        .serving("http_embedding")
        .start();
    let client = node.connect(Duration::from_secs(60)).await;
    let long = "word ".repeat(400);
    let texts: Vec<String> = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "这是一个中文句子。",
        "I love pizza 🍕 and tacos 🌮!",
        "",
        long.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A text's vector depends, in its last bits, on the batch the engine pads
    // it in, and the engine batches a request's texts as they reach it (the
    // same request may be grouped differently when the machine is busy). So a
    // text alone in its request is held to the mesh's vector bit for bit, and a
    // request of several texts to within 1e-6.
    let mesh = client.embed(texts.clone(), None).await.expect("embeds");
    assert!(mesh.last().unwrap().truncated, "the long text is truncated");
    let tokens: u32 = mesh.iter().map(|e| e.tokens).sum();
    let short = &texts[..texts.len() - 1];
    let mesh_short = client.embed(short.to_vec(), None).await.unwrap();
    let alone = [0, 2, texts.len() - 1];
    let mut mesh_alone = Vec::new();
    for &i in &alone {
        let mut one = client.embed(vec![texts[i].clone()], None).await.unwrap();
        mesh_alone.push(one.remove(0));
    }

    let mut ops = vec![
        // What the client asks by default: base64, which it decodes itself.
        json!({"op": "embeddings", "model": "whatever-the-caller-says", "input": texts}),
        json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": texts, "encoding_format": "float"}),
        json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": texts, "encoding_format": "base64"}),
        json!({"op": "models"}),
        json!({"op": "models", "api_key": "sk-not-the-key"}),
        json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": texts, "api_key": "sk-not-the-key"}),
        json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": [], "encoding_format": "float"}),
        json!({"op": "chat", "model": EMBEDDING_REPO, "messages": [{"role": "user", "content": "hi"}]}),
    ];
    let first_alone = ops.len();
    for &i in &alone {
        let text = &texts[i];
        ops.push(json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": [text]}));
        ops.push(json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": text, "encoding_format": "float"}));
        ops.push(json!({"op": "embeddings", "model": EMBEDDING_REPO, "input": [text], "encoding_format": "base64"}));
    }
    let results = openai(&node, KEY, Value::Array(ops)).await;

    // One text per request: the mesh's very vector, however it is encoded.
    for (n, want) in mesh_alone.iter().enumerate() {
        let want = std::slice::from_ref(want);
        let at = first_alone + 3 * n;
        let what = |how: &str| format!("text {} alone, {how}", alone[n]);
        let decoded: Vec<Vec<f32>> = embeddings_data(&results[at], want[0].tokens)
            .into_iter()
            .map(floats)
            .collect();
        assert_same_vectors(
            &decoded,
            want,
            &what("the client's default (base64, decoded)"),
        );
        let as_floats: Vec<Vec<f32>> = embeddings_data(&results[at + 1], want[0].tokens)
            .into_iter()
            .map(floats)
            .collect();
        assert_same_vectors(
            &as_floats,
            want,
            &what("encoding_format float, not in a list"),
        );
        let as_base64: Vec<Vec<f32>> = embeddings_data(&results[at + 2], want[0].tokens)
            .into_iter()
            .map(base64_floats)
            .collect();
        assert_same_vectors(&as_base64, want, &what("encoding_format base64"));
    }
    // Several texts: the mesh's vectors, in order.
    let decoded: Vec<Vec<f32>> = embeddings_data(&results[0], tokens)
        .into_iter()
        .map(floats)
        .collect();
    assert_close_vectors(&decoded, &mesh, "the client's default (base64, decoded)");
    let as_floats: Vec<Vec<f32>> = embeddings_data(&results[1], tokens)
        .into_iter()
        .map(floats)
        .collect();
    assert_close_vectors(&as_floats, &mesh, "encoding_format float");
    let as_base64: Vec<Vec<f32>> = embeddings_data(&results[2], tokens)
        .into_iter()
        .map(base64_floats)
        .collect();
    assert_close_vectors(&as_base64, &mesh, "encoding_format base64");

    let models = &results[3];
    assert_eq!(models["ids"], json!([EMBEDDING_REPO]), "{models}");
    let model = &models["data"][0];
    assert_eq!(model["object"], "model", "{model}");
    assert_eq!(model["owned_by"], "harness", "{model}");
    assert_eq!(model["revision"], "main", "{model}");
    assert!(
        model["created"].as_u64().unwrap() > 1_600_000_000,
        "{model}"
    );

    for wrong in &results[4..6] {
        let body = api_error(wrong, "AuthenticationError", 401);
        assert_eq!(body["type"], "authentication_error", "{body}");
        assert_eq!(body["code"], "invalid_api_key", "{body}");
        assert!(
            wrong["error"]["headers"]["www-authenticate"]
                .as_str()
                .is_some_and(|h| h.starts_with("Bearer")),
            "{wrong}"
        );
    }
    let empty = api_error(&results[6], "UnprocessableEntityError", 422);
    assert_eq!(empty["type"], "invalid_request_error", "{empty}");
    api_error(&results[7], "NotFoundError", 404);

    // TEI's /embed: normalized vectors, one list per input in order, for a
    // list or a single text.
    let raw = Raw::new(&node);
    let vectors = raw
        .tei_vectors(KEY, &json!({"inputs": texts, "truncate": true}))
        .await;
    assert_close_vectors(&vectors, &mesh, "/embed");
    for v in &vectors {
        assert!((minilm::norm(v) - 1.0).abs() < 1e-5, "not unit length");
    }
    let vectors = raw.tei_vectors(KEY, &json!({ "inputs": short })).await;
    assert_close_vectors(&vectors, &mesh_short, "/embed, truncate unset");
    let vectors = raw.tei_vectors(KEY, &json!({"inputs": texts[0]})).await;
    // The model's vectors are unit length already: left as they are.
    assert_same_vectors(&vectors, &mesh_alone[..1], "/embed of one text");
    // Not normalized: the model's own output, in the same direction.
    let own = raw
        .tei_vectors(KEY, &json!({"inputs": short, "normalize": false}))
        .await;
    assert_eq!(own.len(), short.len());
    for (got, want) in own.iter().zip(&mesh_short) {
        assert!(minilm::cosine(got, &want.vector) > 0.99999);
    }

    // TEI's errors: a text past the model's limit without truncate, bad JSON.
    let too_long = raw
        .post_json("/embed", Some(KEY), &json!({"inputs": [texts[0], long]}))
        .await;
    assert_eq!(too_long.status, 422, "{}", too_long.body);
    let body = too_long.json();
    assert_eq!(body["error_type"], "validation", "{body}");
    assert!(body["error"].is_string(), "{body}");
    let bad = raw.post("/embed", Some(KEY), b"{\"inputs\": [").await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    let body = bad.json();
    assert_eq!(body["error_type"], "validation", "{body}");
    assert!(body["error"].is_string(), "{body}");
    let no_key = raw
        .post_json("/embed", None, &json!({"inputs": "hi"}))
        .await;
    assert_eq!(no_key.status, 401, "{}", no_key.body);

    // /v1's errors: no key, bad JSON, a body over the limit (after the key is
    // checked: a wrong key with a huge body is a 401), a wrong method.
    let no_key = raw.get("/v1/models", None).await;
    openai_error(
        &no_key,
        401,
        "authentication_error",
        Some("invalid_api_key"),
    );
    assert!(
        no_key.header("www-authenticate").starts_with("Bearer"),
        "{:?}",
        no_key.headers
    );
    let bad = raw
        .post("/v1/embeddings", Some(KEY), b"{\"input\": [")
        .await;
    openai_error(&bad, 422, "invalid_request_error", None);
    let wrong_type = raw
        .post_json("/v1/embeddings", Some(KEY), &json!({"input": 42}))
        .await;
    openai_error(&wrong_type, 422, "invalid_request_error", None);
    // Each refused unread on a connection of its own (see
    // `connection_kept_or_closed` for what the next request on it sees).
    let huge = serde_json::to_vec(&json!({"input": "a ".repeat(40_000)})).unwrap();
    assert!(huge.len() > 65536);
    let too_big = Raw::new(&node)
        .post("/v1/embeddings", Some(KEY), &huge)
        .await;
    openai_error(&too_big, 413, "invalid_request_error", None);
    let huge_tei = serde_json::to_vec(&json!({"inputs": "a ".repeat(40_000)})).unwrap();
    let too_big = Raw::new(&node).post("/embed", Some(KEY), &huge_tei).await;
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    assert!(too_big.json()["error"].is_string(), "{}", too_big.body);
    let unauthenticated = Raw::new(&node)
        .post("/v1/embeddings", Some("sk-not-the-key"), &huge)
        .await;
    openai_error(
        &unauthenticated,
        401,
        "authentication_error",
        Some("invalid_api_key"),
    );
    let method = raw.get("/v1/embeddings", Some(KEY)).await;
    assert_eq!(method.status, 405, "{}", method.body);

    // The node still serves, over both.
    let again = client.embed(vec![texts[0].clone()], None).await.unwrap();
    assert_same_vectors(
        &[again[0].vector.clone()],
        &mesh_alone[..1],
        "the mesh after the errors",
    );
    assert_eq!(raw.get("/health/ready", None).await.status, 200);

    // Last: the next request on a connection whose body was refused (a small
    // body, read whole, keeps it; a large one, refused unread, must too or say
    // `Connection: close`).
    let mut problems = Vec::new();
    let small = serde_json::to_vec(&json!({"input": "hi"})).unwrap();
    problems.extend(
        connection_kept_or_closed(&node, "/v1/embeddings", "sk-not-the-key", &small, 401).await,
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for (key, status) in [(KEY, 413), ("sk-not-the-key", 401)] {
        problems
            .extend(connection_kept_or_closed(&node, "/v1/embeddings", key, &huge, status).await);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Reads one HTTP/1.1 answer from `stream`: its head (lowercased) once its
/// Content-Length of body is in too; or what went wrong.
fn read_answer(stream: &mut std::net::TcpStream) -> Result<String, String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut more = |got: &mut Vec<u8>| match stream.read(&mut buf) {
        Ok(0) if got.is_empty() => Err("closed, no answer".to_string()),
        Ok(0) => Err(format!(
            "closed within the answer: {}",
            String::from_utf8_lossy(got)
        )),
        Ok(n) => {
            got.extend_from_slice(&buf[..n]);
            Ok(())
        }
        Err(e) => Err(format!("reading: {e}")),
    };
    let head_end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        more(&mut got)?;
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while got.len() < head_end + length {
        more(&mut got)?;
    }
    Ok(head)
}

/// Sends `body` to `path` with `key` on a connection of its own, which the
/// node answers `status` without reading the body, then a second request on the
/// same connection. HTTP/1.1 keeps a connection unless the answer says
/// `Connection: close`, and clients (reqwest, the `openai` package's pool)
/// reuse it; so the node must either say it closes or answer the second
/// request. What is wrong, if anything.
async fn connection_kept_or_closed(
    node: &ServeProcess,
    path: &str,
    key: &str,
    body: &[u8],
    status: u16,
) -> Option<String> {
    use std::io::Write;
    let addr = node.http_addr();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let next =
        format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    let (path, key) = (path.to_string(), key.to_string());
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&request).unwrap();
        let first = read_answer(&mut stream).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            first.starts_with(&format!("http/1.1 {status} ")),
            "{path}: {first}"
        );
        if first.contains("\r\nconnection: close\r\n") {
            return None;
        }
        let second = match stream.write_all(next.as_bytes()) {
            Err(e) => Err(format!("sending: {e}")),
            Ok(()) => read_answer(&mut stream),
        };
        match second {
            Ok(second) if second.starts_with("http/1.1 200 ") => None,
            other => Some(format!(
                "POST {path} (key {key:?}, a {}-byte body) answered {status} without \
                 `Connection: close`, so the connection is kept, but the next request on it \
                 got {other:?}; the first answer was:\n{first}",
                request.len()
            )),
        }
    })
    .await
    .unwrap()
}

/// How the mesh's finish reason reads in OpenAI's answers.
fn openai_finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => panic!("the mesh's generation was cancelled"),
    }
}

/// The mesh's streamed generation of `prompt` with `options`, read to its end.
async fn mesh_stream(
    client: &HarnessClient,
    prompt: impl Into<harness_client::Prompt>,
    options: GenerateOptions,
) -> Generation {
    client
        .generate_stream(prompt, options, None)
        .await
        .expect("opens a stream")
        .collect()
        .await
        .expect("streams to its end")
}

/// Asserts `usage` counts `mesh`'s tokens.
fn assert_usage(usage: &Value, mesh: &Generation) {
    assert_eq!(
        usage,
        &json!({
            "prompt_tokens": mesh.prompt_tokens,
            "completion_tokens": mesh.generated_tokens,
            "total_tokens": mesh.prompt_tokens + mesh.generated_tokens,
        }),
        "usage"
    );
}

/// The chunks of a streamed answer (`object` `chat.completion.chunk` or
/// `text_completion`) as the client gave them: asserts the stream ended by
/// itself, one id and model throughout, a finish reason on the last choice
/// chunk only (`finish`), and a usage chunk last when `usage` is given; the
/// text joined (`delta.content` for chat, `text` for completions).
fn streamed_text(result: &Value, object: &str, finish: &str, usage: Option<&Generation>) -> String {
    assert_eq!(result["ended"], true, "{result}");
    let chunks = result["chunks"].as_array().expect("chunks");
    assert!(chunks.len() >= 2, "{result}");
    let id = chunks[0]["id"].as_str().expect("an id");
    let prefix = if object == "text_completion" {
        "cmpl-"
    } else {
        "chatcmpl-"
    };
    assert!(id.starts_with(prefix), "{id}");
    let mut with_choices = chunks.as_slice();
    if let Some(mesh) = usage {
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]), "{last}");
        assert_usage(&last["usage"], mesh);
        with_choices = rest;
    }
    let mut text = String::new();
    for (i, chunk) in with_choices.iter().enumerate() {
        assert_eq!(chunk["id"], id, "{chunk}");
        assert_eq!(chunk["object"], object, "{chunk}");
        assert!(chunk["created"].is_u64(), "{chunk}");
        let choices = chunk["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 1, "{chunk}");
        let choice = &choices[0];
        assert_eq!(choice["index"], 0, "{chunk}");
        let last = i == with_choices.len() - 1;
        if last {
            assert_eq!(choice["finish_reason"], finish, "{chunk}");
        } else {
            assert!(choice["finish_reason"].is_null(), "{chunk}");
        }
        if object == "text_completion" {
            text += choice["text"].as_str().unwrap_or("");
        } else {
            if i == 0 {
                assert_eq!(
                    choice["delta"],
                    json!({"role": "assistant", "content": ""}),
                    "{chunk}"
                );
            }
            if last {
                assert_eq!(choice["delta"], json!({}), "{chunk}");
            }
            text += choice["delta"]["content"].as_str().unwrap_or("");
        }
    }
    text
}

/// The events of a server-sent event stream: the `data:` of each, comments
/// left out.
fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "an unfinished event: {body:?}");
    body.split("\n\n")
        .filter(|block| !block.is_empty())
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter(|l| !l.starts_with(':'))
                .map(|l| {
                    l.strip_prefix("data: ")
                        .or_else(|| l.strip_prefix("data:"))
                        .unwrap_or_else(|| panic!("not a data line: {l:?}"))
                })
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A generation node (the tiny Llama, from its folder, with its chat template)
/// with a key: the `openai` client's streamed chat gives the mesh's streamed
/// text for the same messages, options and seed, with the chunks, finish reason
/// and usage OpenAI's clients expect, and `[DONE]` on the wire; non-streamed
/// chats and completions (greedy, sampled, with a stop string) give the mesh's
/// text; the models list names the folder; and bad requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_and_completions_over_http_equal_the_meshs_text() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let model = TinyLlm::get(Arch::Llama);
    let node = ServeSettings::model_dir(COOKIE, &model.dir)
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_API_KEY", KEY)
        .serving("http_generation")
        .start();
    let model_id = model.dir.file_name().unwrap().to_str().unwrap().to_string();
    let client = node.connect(Duration::from_secs(120)).await;

    let messages = vec![
        ChatMessage::system("Answer briefly."),
        ChatMessage::user("Where is Köln?"),
    ];
    let messages_json = json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where is Köln?"},
    ]);
    let parts_json = json!([
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "Köln?"}]},
    ]);
    let sampled = GenerateOptions {
        max_new_tokens: Some(24),
        temperature: Some(0.8),
        top_p: Some(0.95),
        seed: Some(42),
        ..GenerateOptions::default()
    };
    let greedy = |max: u32| GenerateOptions {
        max_new_tokens: Some(max),
        temperature: Some(0.0),
        ..GenerateOptions::default()
    };
    let chat_sampled = mesh_stream(&client, messages.clone(), sampled.clone()).await;
    let chat_greedy = mesh_stream(&client, messages.clone(), greedy(16)).await;
    let text_prompt = "Once upon a time, there was a";
    let text_sampled = mesh_stream(&client, text_prompt, sampled.clone()).await;
    let hello_greedy = mesh_stream(&client, "Hello", greedy(24)).await;
    // A stop string from the greedy text itself: three ASCII letters past its
    // start.
    let chars: Vec<char> = hello_greedy.text.chars().collect();
    let stop: String = chars
        .windows(3)
        .skip(2)
        .find(|w| w.iter().all(|c| c.is_ascii_alphabetic()))
        .expect("three ASCII letters in the greedy text")
        .iter()
        .collect();
    let hello_stopped = mesh_stream(
        &client,
        "Hello",
        GenerateOptions {
            stop: vec![stop.clone()],
            ..greedy(24)
        },
    )
    .await;
    assert_eq!(hello_stopped.finish_reason, FinishReason::Stop);

    let sampled_chat_op = json!({
        "op": "chat", "model": "gpt-4o", "messages": messages_json,
        "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 42,
    });
    let mut streamed_chat_op = sampled_chat_op.clone();
    streamed_chat_op["stream"] = json!(true);
    streamed_chat_op["stream_options"] = json!({"include_usage": true});
    let mut streamed_chat_no_usage = sampled_chat_op.clone();
    streamed_chat_no_usage["stream"] = json!(true);
    let results = openai(
        &node,
        KEY,
        json!([
            streamed_chat_op,
            streamed_chat_no_usage,
            sampled_chat_op,
            {"op": "chat", "model": model_id, "messages": parts_json,
             "max_completion_tokens": 16, "temperature": 0},
            {"op": "completion", "model": model_id, "prompt": "Hello",
             "max_tokens": 24, "temperature": 0},
            {"op": "completion", "model": model_id, "prompt": "Hello",
             "max_tokens": 24, "temperature": 0, "stop": [stop]},
            {"op": "completion", "model": model_id, "prompt": text_prompt,
             "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 42,
             "stream": true, "stream_options": {"include_usage": true}},
            {"op": "models"},
            {"op": "chat", "model": model_id, "messages": messages_json, "max_tokens": 4,
             "api_key": "sk-not-the-key"},
            {"op": "chat", "model": model_id, "messages": messages_json, "max_tokens": 4, "n": 2},
            {"op": "embeddings", "model": model_id, "input": ["hi"]},
        ]),
    )
    .await;

    // The streamed chat: the mesh's streamed text, finish reason and counts.
    let finish = openai_finish(chat_sampled.finish_reason);
    let text = streamed_text(
        &results[0],
        "chat.completion.chunk",
        finish,
        Some(&chat_sampled),
    );
    assert_eq!(text, chat_sampled.text, "the streamed chat");
    assert!(!text.is_empty());
    for chunk in results[0]["chunks"].as_array().unwrap() {
        assert_eq!(chunk["model"], model_id, "{chunk}");
    }
    let text = streamed_text(&results[1], "chat.completion.chunk", finish, None);
    assert_eq!(text, chat_sampled.text, "the streamed chat without usage");
    assert!(
        results[1]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "usage without include_usage: {}",
        results[1]
    );

    // Not streamed: the same text, whole.
    let chat = &results[2];
    assert_eq!(chat["object"], "chat.completion", "{chat}");
    assert!(
        chat["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{chat}"
    );
    assert_eq!(chat["model"], model_id, "{chat}");
    let choice = &chat["choices"][0];
    assert_eq!(
        choice["message"]["content"], chat_sampled.text,
        "the whole chat"
    );
    assert_eq!(choice["message"]["role"], "assistant", "{chat}");
    assert_eq!(choice["finish_reason"], finish, "{chat}");
    assert_eq!(chat["choices"].as_array().unwrap().len(), 1, "{chat}");
    assert_usage(&chat["usage"], &chat_sampled);
    // Content as parts, max_completion_tokens, greedy.
    let parts = &results[3]["choices"][0];
    assert_eq!(
        parts["message"]["content"], chat_greedy.text,
        "content parts: {}",
        results[3]
    );
    assert_eq!(
        parts["finish_reason"],
        openai_finish(chat_greedy.finish_reason)
    );
    assert_usage(&results[3]["usage"], &chat_greedy);

    // Completions: greedy, then cut by the stop string, then streamed.
    let completion = &results[4];
    assert_eq!(completion["object"], "text_completion", "{completion}");
    assert!(completion["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(completion["model"], model_id, "{completion}");
    let choice = &completion["choices"][0];
    assert_eq!(choice["text"], hello_greedy.text, "the greedy completion");
    assert_eq!(
        choice["finish_reason"],
        openai_finish(hello_greedy.finish_reason)
    );
    assert_usage(&completion["usage"], &hello_greedy);
    let reference = model
        .references
        .iter()
        .find(|r| r.prompt == "Hello")
        .unwrap();
    assert_eq!(choice["text"], reference.greedy_text, "transformers' text");
    let stopped = &results[5]["choices"][0];
    assert_eq!(
        stopped["text"], hello_stopped.text,
        "stopped at {stop:?}: {}",
        results[5]
    );
    assert_eq!(stopped["finish_reason"], "stop");
    assert_usage(&results[5]["usage"], &hello_stopped);
    let text = streamed_text(
        &results[6],
        "text_completion",
        openai_finish(text_sampled.finish_reason),
        Some(&text_sampled),
    );
    assert_eq!(text, text_sampled.text, "the streamed completion");

    assert_eq!(results[7]["ids"], json!([model_id]), "{}", results[7]);
    api_error(&results[8], "AuthenticationError", 401);
    let n = api_error(&results[9], "UnprocessableEntityError", 422);
    assert_eq!(n["type"], "invalid_request_error", "{n}");
    api_error(&results[10], "NotFoundError", 404);

    // The wire itself: an event stream, the role first, the usage chunk, then
    // [DONE].
    let raw = Raw::new(&node);
    let mut body = json!({
        "model": model_id, "messages": messages_json, "max_tokens": 24,
        "temperature": 0.8, "top_p": 0.95, "seed": 42, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let wire = raw
        .post_json("/v1/chat/completions", Some(KEY), &body)
        .await;
    assert_eq!(wire.status, 200, "{}", wire.body);
    assert!(
        wire.header("content-type").starts_with("text/event-stream"),
        "{:?}",
        wire.headers
    );
    let events = sse_events(&wire.body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect();
    let text = streamed_text(
        &json!({"chunks": chunks, "ended": true}),
        "chat.completion.chunk",
        finish,
        Some(&chat_sampled),
    );
    assert_eq!(text, chat_sampled.text, "the raw stream");
    // The same without stream: one JSON answer.
    body["stream"] = json!(false);
    body.as_object_mut().unwrap().remove("stream_options");
    let whole = raw
        .post_json("/v1/chat/completions", Some(KEY), &body)
        .await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    assert!(whole.header("content-type").starts_with("application/json"));
    assert_eq!(
        whole.json()["choices"][0]["message"]["content"],
        chat_sampled.text
    );

    // Refused: no key, bad JSON, a wrong type, a wrong method, TEI's route on
    // a generation node; the node still serves.
    let no_key = raw.post_json("/v1/chat/completions", None, &body).await;
    openai_error(
        &no_key,
        401,
        "authentication_error",
        Some("invalid_api_key"),
    );
    assert!(no_key.header("www-authenticate").starts_with("Bearer"));
    let bad = raw
        .post("/v1/chat/completions", Some(KEY), b"{\"messages\": ")
        .await;
    openai_error(&bad, 422, "invalid_request_error", None);
    let wrong_type = raw
        .post_json(
            "/v1/completions",
            Some(KEY),
            &json!({"model": model_id, "prompt": "Hello", "max_tokens": "many"}),
        )
        .await;
    openai_error(&wrong_type, 422, "invalid_request_error", None);
    let method = raw.get("/v1/chat/completions", Some(KEY)).await;
    assert_eq!(method.status, 405, "{}", method.body);
    let tei = raw
        .post_json("/embed", Some(KEY), &json!({"inputs": "hi"}))
        .await;
    assert_eq!(tei.status, 404, "/embed on a generation node: {}", tei.body);
    let again = mesh_stream(&client, "Hello", greedy(24)).await;
    assert_eq!(again.text, hello_greedy.text);
}

/// A node without `HARNESS_API_KEY`: the inference routes answer 404, saying
/// to set it (whatever key a caller sends); health is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_inference_routes_are_off_and_say_how_to_turn_them_on() {
    let node = ServeProcess::start(COOKIE, "http_no_key", &[]);
    let raw = Raw::new(&node);
    for key in [None, Some(KEY)] {
        let models = raw.get("/v1/models", key).await;
        assert_eq!(models.status, 404, "{}", models.body);
        assert!(models.body.contains("HARNESS_API_KEY"), "{}", models.body);
        for path in [
            "/v1/embeddings",
            "/v1/chat/completions",
            "/v1/completions",
            "/embed",
        ] {
            let off = raw.post_json(path, key, &json!({"input": "hi"})).await;
            assert_eq!(off.status, 404, "{path}: {}", off.body);
            assert!(off.body.contains("HARNESS_API_KEY"), "{path}: {}", off.body);
        }
    }
    let ready = raw.get("/health/ready", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(raw.get("/health/live", None).await.status, 200);
}

/// Tokens of a generation that cannot end before the test acts on it (minutes
/// of steps for the tiny model), and the context that holds them.
const ENDLESS: u32 = 30_000;
const ENDLESS_CONTEXT: u32 = 32_768;

/// One sequence slot, a model that never stops by itself and a 10-minute
/// deadline: a client that closes its stream after a few chunks frees the slot
/// at once, so the request waiting behind it completes (long before the
/// stream's end or deadline); the node counts the stream cancelled, having made
/// far fewer than its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_its_stream_frees_its_slot_for_the_next() {
    let dir = endless_dir(Arch::Llama);
    let node = ServeSettings::model_dir(COOKIE, dir.path())
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_MAX_SEQUENCES", 1)
        .env("HARNESS_MAX_CONTEXT", ENDLESS_CONTEXT)
        .env("HARNESS_HTTP_DEADLINE_MS", 600_000)
        .env("HARNESS_API_KEY", KEY)
        .serving("http_disconnect")
        .start();
    let results = openai(
        &node,
        KEY,
        json!([{
            "op": "disconnect",
            "a": {"model": "m", "messages": [{"role": "user", "content": "Hello"}],
                  "max_tokens": ENDLESS, "temperature": 0, "stream": true},
            "b": {"model": "m", "prompt": "The cat", "max_tokens": 8, "temperature": 0,
                  "timeout": 120},
            "a_chunks": 3,
            "b_within": 300,
        }]),
    )
    .await;
    let result = &results[0];
    eprintln!(
        "B queued behind A: {}; B done {:.2} s after A closed",
        result["b_queued_behind_a"],
        result["b_seconds_after_close"].as_f64().unwrap_or(-1.0)
    );
    assert_eq!(result["a_texts"].as_array().unwrap().len(), 3, "{result}");
    assert_eq!(result["b_alive"], false, "B never finished: {result}");
    let b = &result["answer"];
    assert!(b.is_object(), "B failed: {result}\n{}", node.log());
    assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 8, "{b}");

    let metrics = http_get(node.http_addr().parse().unwrap(), "/metrics").await;
    let cancelled = metric(
        &metrics,
        "harness_generations_total{finish_reason=\"cancelled\"}",
    );
    let made = metric(&metrics, "harness_generated_tokens_total") - 8.0;
    eprintln!("the closed stream made {made} tokens");
    assert_eq!(cancelled, 1.0, "{metrics}");
    assert!(made < f64::from(ENDLESS), "{made} tokens made");
}
