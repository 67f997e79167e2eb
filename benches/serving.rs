//! `make bench`, the serving: 64 concurrent in-process callers sending single items
//! through the DelayedServing actor to a traced MLP, against a direct loop of
//! batched forwards at the same batch size on an engine of the same model, device
//! and settings (the node's own engine is the serving's alone), side by side. Also
//! p50/p99 latency per call, and the time from a crash to ready again.
//!
//! `HARNESS_BENCH_REQUESTS` changes the number of requests (default 6400).

use std::time::{Duration, Instant};

use harness_client::WireTensor;
use tch::{Kind, Tensor};

#[path = "../tests/support/mod.rs"]
mod support;

use support::measure::{all_at_once, env_or, percentile, print_table_head};
use support::serving::{crash_regardless, node_config, run, start_ready};

const FEATURES: i64 = 512;
const HIDDEN: i64 = 1024;
const BATCH: usize = 32;
const CALLERS: usize = 64;

/// A 512 → 1024 → 1024 → 512 MLP with fixed random weights, traced.
fn save_mlp(dir: &std::path::Path) -> std::path::PathBuf {
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(7);
    let opts = (Kind::Float, tch::Device::Cpu);
    let layers: Vec<(Tensor, Tensor)> = [(FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FEATURES)]
        .iter()
        .map(|&(i, o)| {
            (
                Tensor::randn([i, o], opts) / (i as f64).sqrt(),
                Tensor::zeros([o], opts),
            )
        })
        .collect();
    let module = tch::CModule::create_by_tracing(
        "Mlp",
        "forward",
        &[Tensor::zeros([2, FEATURES], opts)],
        &mut |xs| {
            let mut x = xs[0].shallow_clone();
            for (n, (w, b)) in layers.iter().enumerate() {
                x = x.matmul(w) + b;
                if n + 1 < layers.len() {
                    x = x.relu();
                }
            }
            vec![x]
        },
    )
    .unwrap();
    let path = dir.join("model.pt");
    module.save(&path).unwrap();
    path
}

fn main() {
    let requests = env_or("HARNESS_BENCH_REQUESTS", 6400) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = save_mlp(dir.path());
    let config = node_config(&[
        format!("--model-dir={}", dir.path().display()),
        format!("--warmup-inputs=f32[{FEATURES}]"),
        format!("--max-batch-size={BATCH}"),
        "--max-batch-delay-ms=5".to_string(),
        "--fault-injection".to_string(),
    ]);

    runtime.block_on(async move {
        let (node, serving) = start_ready(config, Duration::from_secs(60)).await;
        let stats = node.shared().engine_stats().unwrap();
        let engine = harness::engine::Engine::load(&model, harness::engine::DeviceChoice::Cpu, harness::engine::BatchConfig::default()).await.unwrap();
        let item = WireTensor::from_f32(&[1, FEATURES], &vec![0.5; FEATURES as usize]);

        // Direct: batches of BATCH items straight into the engine, one after another.
        let direct = |rounds: usize| {
            let engine = engine.clone();
            async move {
                let started = Instant::now();
                for _ in 0..rounds {
                    let batch = Tensor::full([BATCH as i64, FEATURES], 0.5, (Kind::Float, tch::Device::Cpu));
                    engine.forward(vec![batch]).await.unwrap();
                }
                started.elapsed()
            }
        };
        // Served: CALLERS tasks, each sending single items through the actor.
        let served = |total: usize| {
            let serving = serving.clone();
            let item = item.clone();
            async move {
                let started = Instant::now();
                let per_caller = all_at_once(CALLERS, |_| {
                    let serving = serving.clone();
                    let item = item.clone();
                    async move {
                        let mut latencies = Vec::with_capacity(total / CALLERS);
                        for _ in 0..total / CALLERS {
                            let t = Instant::now();
                            run(&serving, vec![item.clone()], 30_000).await.expect("served");
                            latencies.push(t.elapsed());
                        }
                        latencies
                    }
                })
                .await;
                (started.elapsed(), per_caller.concat())
            }
        };

        // Warm both paths, then alternate them.
        direct(10).await;
        served(CALLERS * 4).await;
        let (mut direct_times, mut served_times, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
        let counters = || {
            (stats.forwards.load(std::sync::atomic::Ordering::Relaxed), stats.batched_items.load(std::sync::atomic::Ordering::Relaxed))
        };
        let (mut forwards, mut items) = (0, 0);
        for round in 0..3 {
            let d = direct(requests / BATCH).await;
            let before = counters();
            let (s, l) = served(requests).await;
            let after = counters();
            forwards += after.0 - before.0;
            items += after.1 - before.1;
            eprintln!("round {}: direct {d:.2?}, served {s:.2?}", round + 1);
            direct_times.push(d);
            served_times.push(s);
            latencies.extend(l);
        }
        direct_times.sort();
        served_times.sort();
        latencies.sort();
        let (d, s) = (direct_times[1], served_times[1]);
        let rate = |t: Duration| requests as f64 / t.as_secs_f64();

        // Crash to ready again, three times.
        let mut recoveries = Vec::new();
        for _ in 0..3 {
            let serving = node.serving().await.unwrap();
            let restarts = node.shared().restarts();
            let t = Instant::now();
            crash_regardless(&serving, Duration::from_secs(30)).await;
            while node.shared().restarts() == restarts {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            node.wait_ready(Duration::from_secs(60)).await.unwrap();
            recoveries.push(t.elapsed());
        }
        recoveries.sort();

        print_table_head(
            &format!("{requests} single-item requests from {CALLERS} callers, 512-1024-1024-512 MLP on the CPU, max batch {BATCH}, delay 5 ms; median of 3 rounds"),
            &["measure", "served (batched by the actor)", &format!("direct loop of batch-{BATCH} forwards"), "ratio"],
        );
        println!("| throughput | {:.0} items/s ({s:.2?}) | {:.0} items/s ({d:.2?}) | {:.2} |", rate(s), rate(d), rate(s) / rate(d));
        println!(
            "| latency per call | p50 {:.2?}, p99 {:.2?} | | |",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99)
        );
        println!("| mean batch when served | {:.1} items per forward | | |", items as f64 / forwards.max(1) as f64);
        println!("| crash to ready again | median {:.2?} of 3 (min {:.2?}, max {:.2?}) | | |", recoveries[1], recoveries[0], recoveries[2]);
        node.shutdown(Duration::from_secs(5)).await;
    });
}
