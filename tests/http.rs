//! Real HTTP requests to a running node, through each phase.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use harness::node::Node;
use harness_client::{WireTensor, PROTOCOL_VERSION};
use support::model_repo::ModelRepo;
use support::serving::run;

const REPO: &str = "acme/affine";
const TOKEN: &str = "hf_do_not_show_me_anywhere";

/// The affine model on a test hub, in a private repo that takes [`TOKEN`].
async fn private_model() -> ModelRepo {
    let (published, _model) = ModelRepo::affine(REPO).await;
    published.hub.require_token(REPO, TOKEN);
    published
}

/// A node in this process that fetches `published` with [`TOKEN`], as `name`,
/// with `extra` arguments; started, not yet ready.
async fn start_node(published: &ModelRepo, name: &str, extra: &[&str]) -> Node {
    let token = format!("--hf-token={TOKEN}");
    let mut args = vec![token.as_str()];
    args.extend(extra);
    Node::start(published.node_config(name, &args))
        .await
        .unwrap()
}

struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(node: &Node) -> Self {
        Http {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: format!("http://{}", node.http_addr()),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(!body.contains(TOKEN), "{path} shows the token: {body}");
        (status, body)
    }

    async fn json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get(path).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_download_shows_its_progress_then_ready_flips_to_200() {
    let published = private_model().await;
    let (bytes, commit) = (published.bytes("model.pt"), &published.commit);
    published.hub.set_rate(Some(bytes.len() as u64 * 2)); // about half a second
    let node = start_node(&published, "http_progress", &[]).await;
    let http = Http::new(&node);

    let mut progress = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < until, "never ready");
        let (code, status) = http.json("/status").await;
        assert_eq!(code, 200);
        let (live, _) = http.get("/health/live").await;
        assert_eq!(live, 200, "live throughout");
        // Two requests, two moments: each answer is checked on its own.
        let (ready, body) = http.json("/health/ready").await;
        assert_eq!(ready == 200, body["phase"] == "ready", "{ready} {body}");
        if status["phase"] == "downloading" {
            progress.push(status["progress"]["bytes_done"].as_u64().unwrap());
            assert_eq!(status["model"]["repo"], REPO);
        }
        if ready == 200 {
            break;
        }
        if body["phase"] == "downloading" {
            assert_eq!(ready, 503);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.dedup();
    assert!(progress.len() >= 3, "progress grew in steps: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");

    let (_, status) = http.json("/status").await;
    assert_eq!(status["model"]["commit"], commit.as_str());
    assert_eq!(status["model"]["files"][0]["name"], "model.pt");
    assert_eq!(status["model"]["files"][0]["size"], bytes.len() as u64);
    assert_eq!(status["progress"]["bytes_done"], bytes.len() as u64);
    assert_eq!(status["progress"]["bytes_total"], bytes.len() as u64);
    assert_eq!(status["device"]["kind"], "cpu");
    assert_eq!(status["restarts"], 0);
    assert_eq!(status["versions"]["protocol"], PROTOCOL_VERSION);
    assert!(status["versions"]["libtorch"]
        .as_str()
        .unwrap()
        .starts_with("2.11.0"));
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_keeps_live_at_200_while_ready_drops_and_comes_back() {
    let published = private_model().await;
    let node = start_node(&published, "http_crash", &["--fault-injection"]).await;
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let http = Http::new(&node);
    assert_eq!(http.get("/health/ready").await.0, 200);

    let serving = node.serving().await.unwrap();
    assert_eq!(support::serving::inject_crash(&serving).await, Ok(()));
    let (mut saw_down, until) = (false, Instant::now() + Duration::from_secs(30));
    loop {
        assert!(Instant::now() < until, "never ready again");
        assert_eq!(
            http.get("/health/live").await.0,
            200,
            "live during the restart"
        );
        let (ready, body) = http.json("/health/ready").await;
        if ready == 503 {
            saw_down = true;
            assert_ne!(body["phase"], "ready");
        } else if saw_down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(http.json("/status").await.1["restarts"], 1);
    node.shutdown(Duration::from_secs(1)).await;
}

/// `name{labels} value` lines of the text exposition.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            (
                name.to_string(),
                value.parse::<f64>().unwrap_or_else(|e| panic!("{l}: {e}")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_move_with_the_traffic() {
    let published = private_model().await;
    let bytes = published.bytes("model.pt");
    let node = start_node(&published, "http_metrics", &[]).await;
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let http = Http::new(&node);
    let (code, text) = http.get("/metrics").await;
    assert_eq!(code, 200);
    let before = parse_metrics(&text);
    for name in [
        "harness_ready",
        "harness_phase{phase=\"ready\"}",
        "harness_queue_depth",
        "harness_restarts_total",
        "harness_download_bytes_total",
        "harness_model_load_seconds",
        "harness_batch_size_count",
        "harness_queue_duration_seconds_count",
        "harness_request_duration_seconds_count",
    ] {
        assert!(before.contains_key(name), "{name} in\n{text}");
    }
    assert_eq!(before["harness_ready"], 1.0);
    assert_eq!(before["harness_phase{phase=\"ready\"}"], 1.0);
    assert_eq!(before["harness_phase{phase=\"downloading\"}"], 0.0);
    assert_eq!(before["harness_download_bytes_total"], bytes.len() as f64);
    assert!(before["harness_model_load_seconds"] > 0.0);

    let serving = node.serving().await.unwrap();
    for _ in 0..5 {
        run(
            &serving,
            vec![WireTensor::from_f32(&[2, 4], &[0.5; 8])],
            5_000,
        )
        .await
        .expect("ok");
    }
    run(&serving, vec![], 5_000).await.expect_err("bad input");

    let after = parse_metrics(&http.get("/metrics").await.1);
    let delta = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    assert_eq!(delta("harness_requests_total{outcome=\"ok\"}"), 5.0);
    assert_eq!(delta("harness_requests_total{outcome=\"bad_input\"}"), 1.0);
    assert_eq!(delta("harness_request_duration_seconds_count"), 6.0);
    assert_eq!(delta("harness_batch_size_count"), 5.0);
    assert_eq!(delta("harness_batch_size_sum"), 10.0);
    assert_eq!(delta("harness_queue_duration_seconds_count"), 5.0);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_paths_wrong_methods_and_idle_clients() {
    let published = private_model().await;
    let node = start_node(&published, "http_edges", &[]).await;
    let http = Http::new(&node);
    assert_eq!(http.get("/nope").await.0, 404);
    let post = http
        .client
        .post(format!("{}/status", http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    assert_eq!(post.headers()["allow"], "GET");

    // A client that connects and says nothing is dropped after the header
    // timeout, and does not stop others meanwhile.
    let addr = node.http_addr();
    let idle = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf);
        let _ = stream.write_all(b"late");
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        http.get("/health/live").await.0,
        200,
        "served while a client idles"
    );
    let held = tokio::task::spawn_blocking(move || idle.join().unwrap())
        .await
        .unwrap();
    assert!(
        held < Duration::from_secs(15),
        "the idle client was dropped after {held:?}"
    );
    node.shutdown(Duration::from_secs(1)).await;
}

/// Sends a POST of `body` (JSON) to `path` with the key `key`; its response,
/// body unread (a stream's events come as they are made).
async fn send_post(http: &Http, path: &str, key: &str, body: &str) -> reqwest::Response {
    http.client
        .post(format!("{}{path}", http.base))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A POST of `body` (JSON) to `path` with the key `key`: the status, the
/// `Retry-After` header, and the body.
async fn post(http: &Http, path: &str, key: &str, body: &str) -> (u16, Option<String>, String) {
    let response = send_post(http, path, key, body).await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, response.text().await.unwrap())
}

/// OpenAI's error `code` in `body`.
fn error_code(body: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    json["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The inference routes' answers through the serving's states, each as
/// OpenAI's clients expect it: 503 with the phase and `Retry-After` while the
/// model downloads, 429 with `Retry-After: 1` when the open streams are all
/// taken, 504 when `HARNESS_HTTP_DEADLINE_MS` passes while generating, and a
/// stream whose deadline passes ends with OpenAI's error object as its last
/// event and no `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inference_errors_follow_the_serving_through_its_states() {
    use support::llm::{as_published, endless, Arch, TinyLlm};
    const KEY: &str = "an-http-errors-key";
    let files = endless(TinyLlm::get(Arch::Llama).files());
    let published = ModelRepo::publish("tiny/llama-endless", &as_published(&files)).await;
    let total: usize = files.iter().map(|(_, bytes, _)| bytes.len()).sum();
    published.hub.set_rate(Some(total as u64 / 3)); // about three seconds
    let node = Node::start(published.node_config(
        "http_inference_errors",
        &[
            "--task=generation",
            &format!("--api-key={KEY}"),
            "--http-deadline-ms=1500",
            "--max-sequences=1",
            "--max-queue=1",
            "--max-context=32768",
        ],
    ))
    .await
    .unwrap();
    let http = Http::new(&node);
    let chat =
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000}"#;

    // Downloading: 503, naming the phase, worth retrying.
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let (status, retry_after, body) = post(&http, "/v1/chat/completions", KEY, chat).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(error_code(&body), "not_ready");
        assert!(retry_after.is_some());
        if body.contains("phase: downloading") {
            seen.push(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!seen.is_empty(), "never saw 503 while downloading");
    published.hub.set_rate(None);
    node.wait_ready(Duration::from_secs(60)).await.unwrap();

    // Two streams take the one slot and the one queue place: a third is 429.
    let stream = r#"{"prompt": "Hello", "max_tokens": 30000, "stream": true}"#;
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = send_post(&http, "/v1/completions", KEY, stream).await;
        assert_eq!(response.status(), 200);
        open.push(response);
    }
    let (status, retry_after, body) = post(&http, "/v1/completions", KEY, stream).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("1")), "{body}");
    assert_eq!(error_code(&body), "overloaded");
    // Each open stream passes its 1.5 s deadline mid-generation: its last
    // event is the error, with no [DONE].
    for response in open {
        let text = response.text().await.unwrap();
        let last = text
            .split("\n\n")
            .filter(|e| e.starts_with("data: "))
            .last()
            .unwrap()
            .to_string();
        assert!(!text.contains("data: [DONE]"), "{text}");
        assert_eq!(
            error_code(&last["data: ".len()..]),
            "deadline_exceeded",
            "{last}"
        );
    }

    // Not streamed: 504 once the deadline passes while generating.
    let started = Instant::now();
    let response = send_post(&http, "/v1/chat/completions", KEY, chat).await;
    let (status, should_retry) = (
        response.status().as_u16(),
        response.headers().get("x-should-retry").cloned(),
    );
    let body = response.text().await.unwrap();
    assert_eq!(status, 504, "{body}");
    // OpenAI's clients would send it again, to take as long again.
    assert_eq!(should_retry.unwrap(), "false");
    assert_eq!(error_code(&body), "deadline_exceeded");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // And the node serves on: a short completion is answered.
    let (status, _, body) = post(
        &http,
        "/v1/completions",
        KEY,
        r#"{"prompt": "Hello", "max_tokens": 3}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Each answer is counted by route and code, the refusals the serving never
    // saw too.
    let (_, metrics) = http.get("/metrics").await;
    let metrics = parse_metrics(&metrics);
    for (series, count) in [
        (
            r#"harness_http_requests_total{route="/v1/completions",code="429"}"#,
            1.0,
        ),
        (
            r#"harness_http_requests_total{route="/v1/completions",code="200"}"#,
            3.0,
        ),
        (
            r#"harness_http_requests_total{route="/v1/chat/completions",code="504"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metrics.get(series), Some(&count), "{series}: {metrics:?}");
    }
    node.shutdown(Duration::from_secs(1)).await;
}

/// Callers that leave while their generation is being opened (their socket
/// reset right after the request) leave nothing behind: every stream is
/// closed and nothing is in flight long before the 30 s a stream no one
/// pulls would otherwise linger, and the node answers the next caller.
/// `GET /v1/models/{id}` answers the served model and 404 for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_that_leave_while_a_stream_opens_leave_nothing_behind() {
    use support::llm::{as_published, endless, Arch, TinyLlm};
    use tokio::io::AsyncWriteExt;
    const KEY: &str = "an-http-leavers-key";
    let files = endless(TinyLlm::get(Arch::Llama).files());
    let published = ModelRepo::publish("tiny/llama-leavers", &as_published(&files)).await;
    let node = Node::start(published.node_config(
        "http_leavers",
        &[
            "--task=generation",
            &format!("--api-key={KEY}"),
            "--max-sequences=2",
            "--max-context=32768",
        ],
    ))
    .await
    .unwrap();
    node.wait_ready(Duration::from_secs(60)).await.unwrap();
    let http = Http::new(&node);
    let body = r#"{"prompt": "Hello", "max_tokens": 30000, "stream": true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for i in 0..20u64 {
        let mut socket = tokio::net::TcpStream::connect(node.http_addr())
            .await
            .unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(i % 4)).await;
        // A reset, not a polite close.
        socket.set_zero_linger().unwrap();
        drop(socket);
    }
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let (_, status) = http.json("/status").await;
        let left = (
            status["generation"]["streams_open"].as_u64(),
            status["in_flight"].as_u64(),
        );
        if left == (Some(0), Some(0)) || Instant::now() > until {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["generation"]["streams_open"], 0, "{status}");
    assert_eq!(status["in_flight"], 0, "{status}");
    let (code, _, answer) = post(
        &http,
        "/v1/completions",
        KEY,
        r#"{"prompt": "Hello", "max_tokens": 3}"#,
    )
    .await;
    assert_eq!(code, 200, "{answer}");

    let model = |id: &str| {
        http.client
            .get(format!("{}/v1/models/{id}", http.base))
            .bearer_auth(KEY)
            .send()
    };
    let served = model("tiny/llama-leavers").await.unwrap();
    assert_eq!(served.status(), 200);
    let entry: serde_json::Value = serde_json::from_str(&served.text().await.unwrap()).unwrap();
    assert_eq!(entry["id"], "tiny/llama-leavers");
    assert_eq!(model("other/model").await.unwrap().status(), 404);
    node.shutdown(Duration::from_secs(1)).await;
}
