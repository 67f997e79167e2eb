//! The node under an unlucky operator and a careless caller (issue: hardening):
//! settings no restart can fix stop the start with exit 2, PyTorch files that are
//! not TorchScript are named for what they are, a request that can never fit the
//! queue is refused at once, and the engine thread of a crashed serving is gone
//! before the next one serves.

mod support;

use support::client::ONE_CLIENT_AT_A_TIME;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::engine::{BatchConfig, DeviceChoice, Engine, LoadError};
use harness_client::{ClientError, Fault, ServingError, WireTensor};
use support::client::demo_item;
use support::node::{ServeProcess, ServeSettings};
use support::serving::{crash_regardless, inject, member};

const COOKIE: &str = "hardening-cookie-0123456789";

#[test]
fn a_warm_up_batch_too_large_to_allocate_stops_the_start_with_exit_2() {
    let model = support::node::demo_model_dir();
    let out = ServeSettings::model_dir(COOKIE, model.path())
        .env("HARNESS_WARMUP_INPUTS", "f32[1000,1000]")
        .env("HARNESS_MAX_BATCH_SIZE", "65536")
        .command()
        .stderr(Stdio::piped())
        .output()
        .expect("running harness serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("HARNESS_MAX_BATCH_SIZE=65536") && stderr.contains("GiB"),
        "{stderr}"
    );
}

/// `torch.save` of a state_dict and a pickled file are told apart from a broken
/// TorchScript file, with the way to make one.
#[tokio::test]
async fn pytorch_files_that_are_not_torchscript_are_named_for_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.pt");
    let pickle = dir.path().join("legacy.pt");
    support::python::run_python(
        "import sys, torch\n\
         m = torch.nn.Linear(4, 2)\n\
         torch.save(m.state_dict(), sys.argv[1])\n\
         torch.save(m.state_dict(), sys.argv[2], _use_new_zipfile_serialization=False)\n",
        &[&checkpoint, &pickle],
    );
    for (file, says) in [
        (&checkpoint, "is a PyTorch checkpoint"),
        (&pickle, "is a Python pickle"),
    ] {
        let err = Engine::load(file, DeviceChoice::Cpu, BatchConfig::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LoadError::NotTorchScript { .. }), "{text}");
        assert!(text.contains(says), "{text}");
        assert!(text.contains("torch.jit.trace"), "{text}");
    }
}

/// More items than `HARNESS_MAX_QUEUE` can never be queued: `BadInput` naming the
/// limit, at once, not `Overloaded` retried by the client to its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_more_items_than_the_queue_holds_is_bad_input_at_once() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "more_than_the_queue";
    let node = ServeProcess::start(COOKIE, serving, &[("HARNESS_MAX_QUEUE", "16")]);
    let client = node.connect(Duration::from_secs(30)).await;
    let fits = WireTensor::from_f32(&[16, 4], &[0.5; 64]);
    client.run(vec![fits], None).await.expect("16 items fit");
    let started = Instant::now();
    let err = client
        .run(
            vec![WireTensor::from_f32(&[17, 4], &[0.5; 68])],
            Some(Duration::from_secs(20)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Serving(ServingError::BadInput { reason }) if reason.contains("HARNESS_MAX_QUEUE")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at once, not retried to the deadline"
    );
}

/// The threads of a process named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

/// One owner of the model: after a crash, the old engine thread (and the model
/// it holds) is gone once the new serving is ready, not kept by a stale handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_servings_engine_is_gone_once_the_next_one_serves() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "one_engine_after_a_crash";
    let node = ServeProcess::start(COOKIE, serving, &[("HARNESS_FAULT_INJECTION", "1")]);
    let pid = node.child.id();
    let client = node.connect(Duration::from_secs(30)).await;
    let item = demo_item;
    client.run(item(), None).await.unwrap();
    assert_eq!(threads_named(pid, "harness-engine"), 1);

    crash_regardless(&member(serving), Duration::from_secs(2)).await;
    // Served again by the restarted serving.
    for _ in 0..3 {
        client
            .run(item(), Some(Duration::from_secs(30)))
            .await
            .expect("served after the restart");
    }
    let until = Instant::now() + Duration::from_secs(10);
    while threads_named(pid, "harness-engine") != 1 {
        assert!(
            Instant::now() < until,
            "{} engine threads after the restart",
            threads_named(pid, "harness-engine")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM while a request is in flight: the drain lasts until its answer has
/// left over the cluster session, and the caller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_request_still_delivers_the_answer() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "answer_through_the_drain";
    // A batch that waits 3 s for company: a request in flight for that long.
    let mut node = ServeProcess::start(COOKIE, serving, &[("HARNESS_MAX_BATCH_DELAY_MS", "3000")]);
    let client = std::sync::Arc::new(node.connect(Duration::from_secs(30)).await);
    let caller = client.clone();
    let call =
        tokio::spawn(async move { caller.run(demo_item(), Some(Duration::from_secs(15))).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.terminate();
    let answer = call.await.unwrap();
    let outputs = answer.expect("the in-flight request is answered through the drain");
    assert_eq!(outputs[0].shape[0], 1);
    let (status, _) = node.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

/// 800 sockets that never finish their headers, reconnecting as they are closed,
/// and `/health/live` still answers every probe within a second: a platform would
/// otherwise restart a healthy node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_under_a_slowloris() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = ServeProcess::start(COOKIE, "slowloris", &[]);
    let http = node.http_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..800)
        .map(|_| {
            let (http, stop) = (http.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut socket) = tokio::net::TcpStream::connect(&http).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = socket
                        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
                        .await;
                    // Hold it until the server closes it, then come back.
                    let mut sink = [0u8; 64];
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), socket.read(&mut sink)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut slow = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let mut socket = tokio::net::TcpStream::connect(&http).await?;
            socket
                .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut reply = Vec::new();
            socket.read_to_end(&mut reply).await?;
            std::io::Result::Ok(String::from_utf8_lossy(&reply).to_string())
        })
        .await;
        let took = started.elapsed();
        match answer {
            Ok(Ok(reply)) if reply.starts_with("HTTP/1.1 200") && took < Duration::from_secs(1) => {
            }
            other => slow.push(format!("{took:?}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    assert!(slow.is_empty(), "probes not answered within 1 s: {slow:?}");
}

/// The cluster port in use is named with its setting; a message limit too small
/// for the handshake is refused at start.
#[test]
fn cluster_settings_that_cannot_work_are_named_at_start() {
    let model = support::node::demo_model_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let serve = |extra: &[(&str, &str)]| {
        let out = ServeSettings::model_dir(COOKIE, model.path())
            .envs(extra)
            .command()
            .stderr(Stdio::piped())
            .output()
            .expect("running harness serve");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stderr) = serve(&[("HARNESS_CLUSTER_ADDR", &taken_addr)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("HARNESS_CLUSTER_ADDR {taken_addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (code, stderr) = serve(&[
        ("HARNESS_CLUSTER_ADDR", "127.0.0.1:0"),
        ("HARNESS_MAX_MESSAGE_BYTES", "0"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("65536"), "{stderr}");
}

/// An OS error is told once, not once per layer of the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_os_error_is_printed_once() {
    let hub = support::hub::TestHub::start().await;
    hub.commit("acme/model", "main", &[("model.pt", b"weights", true)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let mut fetch = hub.fetch_command(&file.join("cache"), "acme/model", &["model.pt"]);
    // The hub answers on this runtime while the process runs.
    let out = tokio::task::spawn_blocking(move || fetch.output())
        .await
        .unwrap()
        .expect("running harness fetch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.matches("(os error 20)").count(), 1, "{stderr}");
}

/// A node whose message limit is below a request's size: the client says
/// `TooLarge` at once (the node tells its limit), not "the node went away" at
/// the deadline after the node dropped the session over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_nodes_lower_limit_is_too_large_at_once() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "lower_node_limit";
    let node = ServeProcess::start(COOKIE, serving, &[("HARNESS_MAX_MESSAGE_BYTES", "100000")]);
    // The client's own limit is the default, 64 MiB.
    let client = node.connect(Duration::from_secs(30)).await;
    let big = WireTensor::from_f32(&[50_000, 4], &vec![0.5; 200_000]); // 800 kB
    let started = Instant::now();
    let err = client
        .run(vec![big], Some(Duration::from_secs(20)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::TooLarge { limit: 100_000, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "at once");
    // The session is whole: a small request still goes through.
    client
        .run(demo_item(), None)
        .await
        .expect("a small request");
}

/// Before a peer authenticates, the cluster port holds it to small frames and a
/// deadline: 16 peers announcing 64 MiB frames and streaming them cost the node
/// little memory, silent peers are closed at the handshake deadline, and a real
/// client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_are_held_to_small_frames_and_a_deadline() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serving = "before_authentication";
    let node = ServeProcess::start(COOKIE, serving, &[]);
    let before = node.rss_kib();
    let addr = node.cluster.clone();
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let _ = socket.write_all(&(64u64 << 20).to_be_bytes()).await;
                let chunk = vec![0x5a; 1 << 20];
                let mut sent = 0usize;
                while sent < 64 << 20 {
                    if socket.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            })
        })
        .collect();
    let silent: Vec<_> = futures_util::future::join_all(
        (0..8).map(|_| tokio::net::TcpStream::connect(addr.clone())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let client = node.connect(Duration::from_secs(30)).await;
    client
        .run(demo_item(), None)
        .await
        .expect("served while peers flood");
    for flooder in flooders {
        let sent = flooder.await.unwrap();
        assert!(sent < 64 << 20, "a flooder got its whole 64 MiB frame in");
    }
    let grown_mib = node.rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "the node grew by {grown_mib} MiB");
    // Silent peers: closed at the handshake deadline (10 s), not held forever.
    let started = Instant::now();
    for mut socket in silent {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a silent peer was not closed: {read:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// While another process downloads the same file into the same cache, `/status`
/// says the node is waiting for it (it said nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_when_another_process_downloads_the_same_file() {
    use support::model_repo::ModelRepo;
    let weights = support::hub::content(3_000_000, 7);
    let published = ModelRepo::publish("acme/shared", &[("model.pt", &weights, true)]).await;
    published.hub.set_rate(Some(300_000)); // about 10 s for the file
    let mut first = published
        .hub
        .fetch_command(published.cache.path(), &published.repo, &["model.pt"])
        .stderr(Stdio::null())
        .spawn()
        .expect("harness fetch");
    let blobs = published
        .cache
        .path()
        .join("huggingface/hub/models--acme--shared/blobs");
    let until = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_dir(&blobs)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        })
        .unwrap_or(false)
    {
        assert!(Instant::now() < until, "the first download never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = support::node::free_port();
    let mut node = published
        .serve_settings(COOKIE)
        .env("HARNESS_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .command()
        .stderr(Stdio::null())
        .spawn()
        .expect("harness serve");
    let mut seen = String::new();
    let until = Instant::now() + Duration::from_secs(20);
    while !seen.contains("another process is downloading model.pt") {
        assert!(Instant::now() < until, "/status never said so: {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = status_text(http).await.unwrap_or_default();
    }
    let _ = node.kill();
    let _ = first.kill();
    let _ = (node.wait(), first.wait());
}

/// The body of `GET /status` on `127.0.0.1:port`.
async fn status_text(port: u16) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    socket
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut reply = Vec::new();
    socket.read_to_end(&mut reply).await?;
    Ok(String::from_utf8_lossy(&reply).to_string())
}

/// A full disk during a download: the error says how much more space the file
/// needs and that the partial download is kept for resuming, and the partial is
/// there. Needs a small filesystem of its own: a tmpfs, mounted here (as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_says_how_much_is_needed_and_keeps_the_partial() {
    use support::model_repo::ModelRepo;
    /// Unmounts the tmpfs when the test ends, however it ends.
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status();
    assert!(
        mounted.is_ok_and(|s| s.success()),
        "this test mounts a 2 MiB tmpfs and needs root (CI runs as root)"
    );
    let _mounted = Mounted(dir.path().to_path_buf());
    let weights = support::hub::content(5_000_000, 3);
    let published = ModelRepo::publish("acme/big", &[("model.pt", &weights, true)]).await;
    let mut fetch = published
        .hub
        .fetch_command(dir.path(), &published.repo, &["model.pt"]);
    let out = tokio::task::spawn_blocking(move || fetch.output())
        .await
        .unwrap()
        .expect("harness fetch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the disk is full")
            && stderr.contains("more are needed for this file")
            && stderr.contains("kept"),
        "{stderr}"
    );
    let blobs = dir.path().join("huggingface/hub/models--acme--big/blobs");
    let partial: u64 = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(partial > 0, "the partial download is kept");
}

/// A panic during warm-up (outside any request) ends in `failed` with its
/// message and a supervised restart, not in `warming` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_during_warm_up_ends_in_failed_and_a_restart() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "warm_up_panic";
    let node = ServeProcess::start(COOKIE, serving, &[("HARNESS_FAULT_INJECTION", "1")]);
    let client = node.connect(Duration::from_secs(30)).await;
    let item = demo_item;
    client.run(item(), None).await.unwrap();
    let remote = member(serving);
    inject(&remote, Fault::PanicNextWarmUp)
        .await
        .expect("taken");
    crash_regardless(&remote, Duration::from_secs(2)).await;
    // Restarted: its warm-up panics (failed, restart), then it serves again.
    client
        .run(item(), Some(Duration::from_secs(30)))
        .await
        .expect("served after the failed warm-up");
    let log = node.log();
    assert!(
        log.contains("panicked while warming") && log.contains("injected warm-up panic"),
        "{log}"
    );
    assert!(log.contains("is failed"), "{log}");
    assert_eq!(log.matches("restarting it in").count(), 2, "{log}");
}

/// A short cookie is warned about (never printed), the cluster address may be a
/// host name, and at debug level the cookie handshake's state (its challenge and
/// expected digest, which ractor_cluster logs) is not in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_cookie_is_warned_about_and_the_handshake_is_never_logged() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let cookie = "zq9";
    let serving = "short_cookie";
    let port = support::node::free_port();
    let node = ServeProcess::start(
        cookie,
        serving,
        &[
            ("RUST_LOG", "debug"),
            ("HARNESS_CLUSTER_ADDR", &format!("localhost:{port}")),
        ],
    );
    let client = node.connect(Duration::from_secs(30)).await;
    client.run(demo_item(), None).await.expect("served");
    let log = node.log();
    assert!(log.contains("HARNESS_COOKIE is 3 characters"), "{log}");
    assert!(log.contains("ractor_cluster"), "debug logging is on: {log}");
    assert!(!log.contains("auth state"), "{log}");
    assert!(!log.contains(cookie), "the cookie itself: {log}");
}

/// Sends `head` (a request's head, `\r\n\r\n` included) and then `body` on a
/// new connection to `http`, and reads the answer's status line (the server
/// may answer before the body is sent, which is what the limits are for).
async fn status_line_of(http: &str, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(http).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    // A server that answered early may close before the body is taken.
    let _ = socket.write_all(body).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The inference routes on the HTTP port keep its limits: a body announced
/// over `HARNESS_MAX_MESSAGE_BYTES` is refused before it is read (401 first
/// without the key, so no stranger makes the node read anything), a chunked
/// one when it passes the limit, and a body trickled by 200 clients (each
/// with the key, so their headers are in) and 200 sockets that never finish
/// their headers neither keep health probes nor a real completion from being
/// answered; each trickler gets 408 once its body is 10 s late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_routes_hold_under_big_and_slow_bodies_and_many_connections() {
    use support::llm::{Arch, TinyLlm};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const KEY: &str = "hardening-api-key";
    let model = TinyLlm::get(Arch::Qwen2);
    let node = ServeSettings::model_dir(COOKIE, &model.dir)
        .serving("inference-limits")
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_API_KEY", KEY)
        .env("HARNESS_MAX_MESSAGE_BYTES", 65536)
        .start();
    let http = node.http_addr();
    let completion = |body: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    // Ready: a real completion is answered.
    let ok = completion(r#"{"prompt": "hello", "max_tokens": 2}"#);
    let mut ready = String::new();
    for _ in 0..600 {
        ready = status_line_of(&http, &ok, b"").await;
        if ready.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Announced too large: refused without the body (10 MiB is never sent).
    let big = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\nConnection: close\r\n";
    let no_key = status_line_of(&http, &format!("{big}\r\n"), b"").await;
    assert!(no_key.starts_with("HTTP/1.1 401"), "{no_key}");
    let with_key = status_line_of(
        &http,
        &format!("{big}Authorization: Bearer {KEY}\r\n\r\n"),
        b"",
    )
    .await;
    assert!(with_key.starts_with("HTTP/1.1 413"), "{with_key}");
    // Chunked, passing the limit as it arrives.
    let chunk = vec![b' '; 32 * 1024];
    let mut chunked = Vec::new();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    let over = status_line_of(&http, &head, &chunked).await;
    assert!(over.starts_with("HTTP/1.1 413"), "{over}");

    // 200 tricklers with the key and 200 sockets that never finish headers.
    let trickled = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut attackers = Vec::new();
    for _ in 0..200 {
        let (http, trickled) = (http.clone(), trickled.clone());
        attackers.push(tokio::spawn(async move {
            let Ok(mut socket) = tokio::net::TcpStream::connect(&http).await else {
                return;
            };
            let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n{{");
            let _ = socket.write_all(head.as_bytes()).await;
            let mut reply = [0u8; 64];
            loop {
                tokio::select! {
                    read = socket.read(&mut reply) => {
                        let n = read.unwrap_or(0);
                        trickled.lock().unwrap().push(String::from_utf8_lossy(&reply[..n]).to_string());
                        return;
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        let _ = socket.write_all(b" ").await;
                    }
                }
            }
        }));
    }
    for _ in 0..200 {
        let http = http.clone();
        attackers.push(tokio::spawn(async move {
            if let Ok(mut socket) = tokio::net::TcpStream::connect(&http).await {
                let _ = socket
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    .await;
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut sink)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut slow = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let live = status_line_of(
            &http,
            "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await;
        if !live.starts_with("HTTP/1.1 200") || started.elapsed() > Duration::from_secs(1) {
            slow.push(format!("{:?}: {live}", started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(slow.is_empty(), "probes not answered within 1 s: {slow:?}");
    let answered = status_line_of(&http, &ok, b"").await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    // Every trickler is told its body was too slow.
    for attacker in attackers.drain(..200) {
        tokio::time::timeout(Duration::from_secs(30), attacker)
            .await
            .expect("each trickler is answered within BODY_TIMEOUT")
            .unwrap();
    }
    let trickled = trickled.lock().unwrap().clone();
    assert_eq!(trickled.len(), 200);
    assert!(
        trickled.iter().all(|r| r.starts_with("HTTP/1.1 408")),
        "{:?}",
        trickled.iter().find(|r| !r.starts_with("HTTP/1.1 408"))
    );
    for attacker in attackers {
        attacker.abort();
    }
    // The key never reached the log.
    assert!(!node.log().contains(KEY), "the key was logged");
}

/// More connections than the HTTP port holds (4096), each answered once and
/// then trickling its next request's headers: a connection between requests
/// is as closable as a new one, so health probes are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_when_every_connection_idles_after_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = ServeProcess::start(COOKIE, "idle-after-request", &[]);
    let http = node.http_addr();
    // Opened from 64 tasks at once, so that the port is full within about a
    // second (well inside the 5 s header timeout).
    let openers: Vec<_> = (0..64)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                for _ in 0..(harness::http::MAX_CONNECTIONS + 200) / 64 {
                    let Ok(mut socket) = tokio::net::TcpStream::connect(&http).await else {
                        break;
                    };
                    let asked = socket
                        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await;
                    let mut reply = [0u8; 256];
                    let answered =
                        tokio::time::timeout(Duration::from_secs(5), socket.read(&mut reply)).await;
                    if asked.is_ok() && matches!(answered, Ok(Ok(n)) if n > 0) {
                        // The start of the next request, never finished.
                        let _ = socket.write_all(b"GET /health/live HTTP/1.1\r\n").await;
                        held.push(socket);
                    }
                }
                held
            })
        })
        .collect();
    let mut held = Vec::new();
    for opener in openers {
        held.extend(opener.await.unwrap());
    }
    assert!(
        held.len() > harness::http::MAX_CONNECTIONS / 2,
        "only {} connections were answered",
        held.len()
    );
    let mut refused = Vec::new();
    for _ in 0..5 {
        let live = status_line_of(
            &http,
            "GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        )
        .await;
        if !live.starts_with("HTTP/1.1 200") {
            refused.push(live);
        }
    }
    assert!(refused.is_empty(), "probes refused: {refused:?}");
    drop(held);
}
