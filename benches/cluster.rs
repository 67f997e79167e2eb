//! `make bench`, the cluster: a tiny model's round trip through the cluster on
//! loopback (a `harness serve` process and a `HarnessClient`) against the same
//! call made in-process (a node in this process, called through its actor), side
//! by side; then 64 concurrent callers each way.
//!
//! `HARNESS_BENCH_CALLS` changes the number of sequential calls (default 2000).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::node::Node;
use harness_client::{
    ClientConfig, HarnessClient, Payload, RunRequest, ServingMessage, WireTensor, PROTOCOL_VERSION,
};
use ractor::ActorRef;

const COOKIE: &str = "bench-cookie";
const CALLERS: usize = 64;

fn item() -> Vec<WireTensor> {
    vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])]
}

async fn local_call(serving: &ActorRef<ServingMessage>) {
    let request = RunRequest {
        version: PROTOCOL_VERSION,
        inputs: item(),
        timeout_ms: 30_000,
    };
    let reply = serving
        .call(
            |port| ServingMessage::Run(Payload::new(request), port),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    reply.0.unwrap().unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let calls: usize = std::env::var("HARNESS_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["demo", "--write-model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // The same settings both ways: no gathering delay, so a lone call runs at once.
    let settings = [
        ("HARNESS_DEVICE", "cpu"),
        ("HARNESS_WARMUP_INPUTS", "f32[4]"),
        ("HARNESS_MAX_BATCH_DELAY_MS", "0"),
    ];
    let mut server = Command::new(env!("CARGO_BIN_EXE_harness"))
        .arg("serve")
        .envs(settings)
        .env("HARNESS_MODEL_DIR", dir.path())
        .env("HARNESS_COOKIE", COOKIE)
        .env("HARNESS_CLUSTER_ADDR", &addr)
        .env("HARNESS_HTTP_ADDR", "127.0.0.1:0")
        .env("HARNESS_SERVING_NAME", "remote")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut args = vec!["harness".to_string(), format!("--model-dir={}", dir.path().display())];
        args.extend(settings.iter().map(|(k, v)| format!("--{}={v}", k.trim_start_matches("HARNESS_").to_lowercase().replace('_', "-"))));
        args.extend(["--serving-name=local".to_string(), "--http-addr=127.0.0.1:0".to_string()]);
        let node = Node::start(harness::cli::server_config(args).unwrap()).await.unwrap();
        node.wait_ready(Duration::from_secs(60)).await.unwrap();
        let local = node.serving().await.unwrap();

        let mut config = ClientConfig::new(vec![addr.clone()], COOKIE);
        config.serving = "remote".to_string();
        let started = Instant::now();
        let client = loop {
            match HarnessClient::connect(config.clone()).await {
                Ok(client) => break Arc::new(client),
                Err(_) if started.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(err) => panic!("{err}"),
            }
        };
        client.run(item(), None).await.unwrap();

        // Round trips, one at a time, alternating in blocks.
        let (mut remote_rtt, mut local_rtt) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            for _ in 0..calls / 10 {
                let t = Instant::now();
                client.run(item(), None).await.unwrap();
                remote_rtt.push(t.elapsed());
            }
            for _ in 0..calls / 10 {
                let t = Instant::now();
                local_call(&local).await;
                local_rtt.push(t.elapsed());
            }
        }
        remote_rtt.sort();
        local_rtt.sort();

        // Throughput: 64 callers each way, alternating, median of 3.
        let per_caller = 50;
        let (mut remote_t, mut local_t) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let t = Instant::now();
            let tasks: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_caller {
                            client.run(item(), None).await.unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            remote_t.push(t.elapsed());
            let t = Instant::now();
            let tasks: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let local = local.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_caller {
                            local_call(&local).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            local_t.push(t.elapsed());
        }
        remote_t.sort();
        local_t.sort();
        let total = (CALLERS * per_caller) as f64;
        let (rt, lt) = (remote_t[1], local_t[1]);

        println!("The demo model (4 → 3), batch delay 0; {calls} sequential calls each way, alternating in blocks; then {CALLERS} callers × {per_caller} calls, median of 3");
        println!();
        println!("| measure | through the cluster (loopback) | in-process | difference |");
        println!("| --- | --- | --- | --- |");
        for (name, p) in [("round trip p50", 0.5), ("round trip p99", 0.99)] {
            let (r, l) = (percentile(&remote_rtt, p), percentile(&local_rtt, p));
            println!("| {name} | {r:.1?} | {l:.1?} | +{:.1?} |", r.saturating_sub(l));
        }
        println!(
            "| {CALLERS} concurrent callers | {:.0} calls/s ({rt:.2?}) | {:.0} calls/s ({lt:.2?}) | ratio {:.2} |",
            total / rt.as_secs_f64(),
            total / lt.as_secs_f64(),
            lt.as_secs_f64() / rt.as_secs_f64()
        );
        node.shutdown(Duration::from_secs(5)).await;
    });
    let _ = server.kill();
    let _ = server.wait();
}
