//! `make bench`, the cluster: a tiny model's round trip through the cluster on
//! loopback (a `harness serve` process and a `HarnessClient`) against the same
//! call made in-process (a node in this process, called through its actor), side
//! by side; then 64 concurrent callers each way.
//!
//! `HARNESS_BENCH_CALLS` changes the number of sequential calls (default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use support::client::{connect, demo_item as item};
use support::measure::{all_at_once, env_or, percentile, print_table_head};
use support::node::{demo_model_dir, ServeSettings};
use support::serving::{node_config, run, start_ready};

const COOKIE: &str = "bench-cookie";
const CALLERS: usize = 64;

fn main() {
    let calls = env_or("HARNESS_BENCH_CALLS", 2000) as usize;
    // The same settings both ways: the demo model on the CPU, warming up with
    // f32[4], no gathering delay, so a lone call runs at once.
    let server = ServeSettings::demo(COOKIE)
        .serving("remote")
        .env("HARNESS_MAX_BATCH_DELAY_MS", 0)
        .start();
    let dir = demo_model_dir();
    let config = node_config(&[
        format!("--model-dir={}", dir.path().display()),
        "--warmup-inputs=f32[4]".to_string(),
        "--max-batch-delay-ms=0".to_string(),
        "--serving-name=local".to_string(),
    ]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (node, local) = start_ready(config, Duration::from_secs(60)).await;
        let local_call = |local: ractor::ActorRef<harness_client::ServingMessage>| async move {
            run(&local, item(), 30_000).await.unwrap();
        };
        let client = Arc::new(
            connect(COOKIE, "remote", &[&server.cluster], Duration::from_secs(30)).await,
        );
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
                local_call(local.clone()).await;
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
            all_at_once(CALLERS, |_| {
                let client = client.clone();
                async move {
                    for _ in 0..per_caller {
                        client.run(item(), None).await.unwrap();
                    }
                }
            })
            .await;
            remote_t.push(t.elapsed());
            let t = Instant::now();
            all_at_once(CALLERS, |_| {
                let local = local.clone();
                async move {
                    for _ in 0..per_caller {
                        local_call(local.clone()).await;
                    }
                }
            })
            .await;
            local_t.push(t.elapsed());
        }
        remote_t.sort();
        local_t.sort();
        let total = (CALLERS * per_caller) as f64;
        let (rt, lt) = (remote_t[1], local_t[1]);

        print_table_head(
            &format!("The demo model (4 → 3), batch delay 0; {calls} sequential calls each way, alternating in blocks; then {CALLERS} callers × {per_caller} calls, median of 3"),
            &["measure", "through the cluster (loopback)", "in-process", "difference"],
        );
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
    drop(server); // killed
}
