//! A client application and a harness node as separate processes, over TCP.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use harness_client::{serving_group, ClientError, HarnessClient, ServingError, WireTensor};

mod support;

use support::client::{client_config, connect, demo_item as item};
use support::node::{free_port, ServeProcess};
use support::serving::{crash_regardless, member};

const COOKIE: &str = "a-test-cookie-not-a-real-one";

use support::client::ONE_CLIENT_AT_A_TIME;

/// A `harness serve` of the demo model as `serving`, with `extra` settings, ready;
/// the cookie never shows in its log.
fn start_server(serving: &str, extra: &[(&str, &str)]) -> ServeProcess {
    let server = ServeProcess::start(COOKIE, serving, extra);
    assert!(
        !server.startup_log.contains(COOKIE),
        "the cookie is logged:\n{}",
        server.startup_log
    );
    server
}

/// A client of `serving` on `nodes`, with calls' default deadline of 10 s.
async fn connect_client(serving: &str, nodes: &[&str]) -> HarnessClient {
    connect(COOKIE, serving, nodes, Duration::from_secs(10)).await
}

/// The demo model's answer, computed here without libtorch.
fn demo(x: &[f32; 4]) -> [f32; 3] {
    let w: Vec<f32> = (0..12).map(|i| i as f32 / 10.0 - 0.5).collect();
    let b = [0.1f32, -0.2, 0.3];
    let mut y = [0f32; 3];
    for (j, out) in y.iter_mut().enumerate() {
        let sum: f32 = (0..4).map(|i| x[i] * w[i * 3 + j]).sum();
        *out = (sum + b[j]).tanh();
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_process_calls_the_model_and_a_wrong_cookie_is_refused() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let server = start_server(
        "a_client_process_calls_the_model_and_a_wrong_cookie_is_refused",
        &[],
    );
    let client = server.connect(Duration::from_secs(10)).await;
    let x = [0.1f32, 0.2, 0.3, 0.4];
    let out = client
        .run(vec![WireTensor::from_f32(&[1, 4], &x)], None)
        .await
        .expect("a result");
    let got = out[0].to_f32().unwrap();
    for (g, w) in got.iter().zip(demo(&x)) {
        assert!((g - w).abs() < 1e-5, "{got:?}");
    }
    let status = client.status(None).await.unwrap();
    assert_eq!(status.phase, "ready");

    // A wrong cookie (another process) is refused clearly, and the node keeps
    // serving the others.
    let refused = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["status", "--node", &server.cluster])
        .env("HARNESS_COOKIE", "wrong")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("closed the session during authentication") && stderr.contains("cookie"),
        "{stderr}"
    );
    // So do garbage bytes on the cluster port.
    let mut junk = std::net::TcpStream::connect(&server.cluster).unwrap();
    let _ = junk.write_all(&[0xff; 4096]);
    client
        .run(vec![WireTensor::from_f32(&[1, 4], &x)], None)
        .await
        .expect("still serving");

    // A bad request is the server's typed error, not a retry until the deadline.
    let err = client
        .run(vec![WireTensor::from_f32(&[1, 5], &[0.0; 5])], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Serving(ServingError::BadInput { .. })),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_a_clear_error_and_the_session_lives_on() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let server = start_server(
        "an_oversized_request_is_a_clear_error_and_the_session_lives_on",
        &[("HARNESS_MAX_MESSAGE_BYTES", "100000")],
    );
    let mut config = client_config(
        COOKIE,
        "an_oversized_request_is_a_clear_error_and_the_session_lives_on",
        &[&server.cluster],
        Duration::from_secs(10),
    );
    config.max_message_bytes = 100_000;
    let client = HarnessClient::connect(config).await.unwrap();
    let big = vec![0.5f32; 4 * 10_000];
    let err = client
        .run(vec![WireTensor::from_f32(&[10_000, 4], &big)], None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
    assert!(
        err.to_string().contains("HARNESS_MAX_MESSAGE_BYTES"),
        "{err}"
    );
    client
        .run(vec![WireTensor::from_f32(&[1, 4], &[0.0; 4])], None)
        .await
        .expect("the session lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_gives_the_caller_an_error_before_its_deadline() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let mut server = start_server(
        "a_killed_server_gives_the_caller_an_error_before_its_deadline",
        &[],
    );
    let client = server.connect(Duration::from_secs(10)).await;
    client
        .run(vec![WireTensor::from_f32(&[1, 4], &[0.0; 4])], None)
        .await
        .unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let started = std::time::Instant::now();
    let err = client
        .run(
            vec![WireTensor::from_f32(&[1, 4], &[0.0; 4])],
            Some(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Deadline { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "never hangs past its deadline: {:?}",
        started.elapsed()
    );
}

#[test]
fn serve_refuses_to_start_without_a_cookie() {
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .arg("serve")
        .env("HARNESS_MODEL_DIR", "/nonexistent")
        .env_remove("HARNESS_COOKIE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set HARNESS_COOKIE"));
}

#[test]
fn harness_call_and_status_reach_a_node_from_the_command_line() {
    let server = start_server("cli", &[]);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_harness"))
            .args(args)
            .env("HARNESS_COOKIE", COOKIE)
            .env("HARNESS_SERVING_NAME", "cli")
            .output()
            .unwrap()
    };
    let out = run(&[
        "call",
        "--node",
        &server.cluster,
        "--tensor",
        "1,4:0.1,0.2,0.3,0.4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = demo(&[0.1, 0.2, 0.3, 0.4]);
    assert!(stdout.starts_with("[1, 3] ["), "{stdout}");
    assert!(
        stdout.contains(&format!("{:.4}", want[0])[..5]),
        "{stdout} vs {want:?}"
    );
    let out = run(&["status", "--node", &server.cluster]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phase"], "ready");
    assert_eq!(status["serving"], "cli");
    let out = run(&["call", "--node", &server.cluster, "--embed", "hello"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("serves the tensor task"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["call", "--node", &server.cluster, "--tensor", "1,4:0.1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds 4 values, 1 given"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_again_is_found_and_used() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let serving = "restarted_server";
    let server = start_server(serving, &[("HARNESS_CLUSTER_ADDR", &addr)]);
    let client = server.connect(Duration::from_secs(10)).await;
    client.run(item(), None).await.unwrap();
    drop(server); // killed
    let _again = start_server(serving, &[("HARNESS_CLUSTER_ADDR", &addr)]);
    let out = client
        .run(item(), Some(Duration::from_secs(20)))
        .await
        .expect("reconnected");
    assert_eq!(out[0].shape, vec![1, 3]);
}

/// `harness_requests_total{outcome="ok"}` of a node, over HTTP.
async fn served_ok(http: &str) -> f64 {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("harness_requests_total{outcome=\"ok\"} "))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_harness_nodes_share_the_calls() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "two_nodes";
    let a = start_server(serving, &[("HARNESS_MAX_BATCH_DELAY_MS", "20")]);
    let b = start_server(serving, &[("HARNESS_MAX_BATCH_DELAY_MS", "20")]);
    let client = std::sync::Arc::new(connect_client(serving, &[&a.cluster, &b.cluster]).await);
    // Two nodes with the same HARNESS_NODE_NAME (as every machine of a Fly app
    // has) are still two members.
    assert_eq!(ractor::pg::get_members(&serving_group(serving)).len(), 2);
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.run(item(), None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("served");
    }
    let (on_a, on_b) = (
        served_ok(&a.http_addr()).await,
        served_ok(&b.http_addr()).await,
    );
    assert_eq!(on_a + on_b, 40.0);
    assert!(
        on_a >= 5.0 && on_b >= 5.0,
        "both nodes served: {on_a} and {on_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_restart_is_ridden_out_by_the_clients_retries() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "ridden_out";
    let server = start_server(serving, &[("HARNESS_FAULT_INJECTION", "1")]);
    let client = server.connect(Duration::from_secs(10)).await;
    client.run(item(), None).await.unwrap();
    // Crash the remote serving through its process group, as any peer could.
    let remote = member(serving);
    // The serving panics right after answering; over the network the answer may
    // not get out first, so it is not awaited here.
    crash_regardless(&remote, Duration::from_secs(2)).await;
    for _ in 0..5 {
        client
            .run(item(), Some(Duration::from_secs(20)))
            .await
            .expect("retried through the restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_is_noticed_by_pings_and_avoided() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "hung_node";
    let a = start_server(serving, &[]);
    let b = start_server(serving, &[]);
    let client = connect_client(serving, &[&a.cluster, &b.cluster]).await;
    client.run(item(), None).await.unwrap();
    // SIGSTOP: the process hangs with its TCP session up, as a wedged node does.
    assert_eq!(unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) }, 0);
    tokio::time::sleep(Duration::from_secs(4)).await; // a few pings
    let started = std::time::Instant::now();
    for _ in 0..20 {
        client
            .run(item(), Some(Duration::from_secs(5)))
            .await
            .expect("served by the other node");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no call waited on the hung node: {:?}",
        started.elapsed()
    );
    unsafe { libc::kill(a.child.id() as i32, libc::SIGCONT) };
}

/// A CA and a node certificate for 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &std::path::Path) {
    let script = r#"
set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=harness-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj /CN=node 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 2 -extfile ext 2>/dev/null
"#;
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "openssl could not make the test certificates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_cluster_port_and_a_silent_peer_blocks_no_one() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "tls";
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();
    let server = start_server(
        serving,
        &[
            ("HARNESS_TLS_CERT", &path("node.pem")),
            ("HARNESS_TLS_KEY", &path("node.key")),
        ],
    );

    // A peer that connects and says nothing, held open meanwhile.
    let _silent = std::net::TcpStream::connect(&server.cluster).unwrap();

    let mut config = client_config(COOKIE, serving, &[&server.cluster], Duration::from_secs(10));
    config.tls = Some(harness_client::ClientTls {
        ca: certs.path().join("ca.pem"),
        identity: None,
        server_name: None,
    });
    let started = std::time::Instant::now();
    let client = HarnessClient::connect(config).await.expect("a TLS session");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the silent peer held the port: {:?}",
        started.elapsed()
    );
    let out = client.run(item(), None).await.expect("a call over TLS");
    assert_eq!(out[0].shape, vec![1, 3]);

    // A plain-TCP peer gets no session.
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["status", "--node", &server.cluster])
        .env("HARNESS_COOKIE", COOKIE)
        .env("HARNESS_SERVING_NAME", serving)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The CLI with the CA does.
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["status", "--node", &server.cluster])
        .env("HARNESS_COOKIE", COOKIE)
        .env("HARNESS_SERVING_NAME", serving)
        .env("HARNESS_TLS_CA", path("ca.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A node that also sets HARNESS_TLS_CA wants a client certificate signed by it.
    let strict = start_server(
        "tls_strict",
        &[
            ("HARNESS_TLS_CERT", &path("node.pem")),
            ("HARNESS_TLS_KEY", &path("node.key")),
            ("HARNESS_TLS_CA", &path("ca.pem")),
        ],
    );
    let status = |identity: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
        cmd.args(["status", "--node", &strict.cluster, "--deadline-ms", "3000"])
            .env("HARNESS_COOKIE", COOKIE)
            .env("HARNESS_SERVING_NAME", "tls_strict")
            .env("HARNESS_TLS_CA", path("ca.pem"));
        if identity {
            cmd.env("HARNESS_TLS_CERT", path("node.pem"))
                .env("HARNESS_TLS_KEY", path("node.key"));
        }
        cmd.output().unwrap()
    };
    assert_eq!(
        status(false).status.code(),
        Some(2),
        "no client certificate, no session"
    );
    let out = status(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_call_fails_the_call_before_its_deadline() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "killed_mid_call";
    // A long gathering delay keeps the call in flight on the server.
    let mut server = start_server(
        serving,
        &[
            ("HARNESS_MAX_BATCH_DELAY_MS", "5000"),
            ("HARNESS_MAX_BATCH_SIZE", "64"),
        ],
    );
    let client = std::sync::Arc::new(server.connect(Duration::from_secs(10)).await);
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            (
                client.run(item(), Some(Duration::from_secs(8))).await,
                started.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let (result, took) = call.await.unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ClientError::Deadline { last: Some(last), .. } if last.contains("went away") || last.contains("no serving")),
        "{err:?}"
    );
    assert!(
        took <= Duration::from_millis(8_500),
        "never past its deadline: {took:?}"
    );
}
