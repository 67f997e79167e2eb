//! `make bench`, the embedding task: all-MiniLM-L6-v2 (exported by our tool) served
//! to 64 concurrent in-process callers, each sending one sentence per `Embed`,
//! against sentence-transformers' `encode(batch_size=32)` of the same sentences on
//! the same machine, rounds alternating. Also single-request latency both ways,
//! and, to tell batching from the model's speed, the node's model run directly
//! on sentence-transformers' own batches (every text sorted by length, 32 each).
//!
//! `HARNESS_BENCH_SENTENCES` changes the number of sentences (default 1024).

use std::time::{Duration, Instant};

use harness_client::ServingMessage;
use ractor::ActorRef;

#[path = "../tests/support/mod.rs"]
mod support;

use support::measure::{all_at_once, env_or, percentile, print_table_head, sentences};
use support::serving::{node_config, start_ready};

const CALLERS: usize = 64;
const ROUNDS: usize = 3;
const SINGLE_CALLS: usize = 100;

/// sentence-transformers' `encode` of the sentences in `file`, timed in Python
/// after a warm-up: (seconds for all, median single-sentence latency).
fn python_round(file: &std::path::Path, model: &std::path::Path) -> (f64, Duration) {
    let text = support::python::stdout_of(
        std::process::Command::new(support::python::torch_python())
            .arg("-c")
        .arg(format!(
            r#"
import json, sys, time
from sentence_transformers import SentenceTransformer
texts = json.load(open({file:?}))
model = SentenceTransformer({model:?}, device="cpu")
model.encode(texts[:64], batch_size=32)
t = time.perf_counter(); model.encode(texts, batch_size=32); total = time.perf_counter() - t
single = []
for text in texts[:{SINGLE_CALLS}]:
    t = time.perf_counter(); model.encode([text], batch_size=32); single.append(time.perf_counter() - t)
single.sort()
print(total, single[len(single) // 2])
"#
            ))
            .env("PYTHONWARNINGS", "ignore"),
        "sentence-transformers",
    );
    let mut parts = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    (
        parts.next().unwrap(),
        Duration::from_secs_f64(parts.next().unwrap()),
    )
}

/// Every text, tokenized, sorted by length and cut into batches of 32 padded to
/// their longest: the forwards sentence-transformers' `encode` runs.
async fn sorted_batches(
    model_dir: &std::path::Path,
    texts: &[String],
) -> (harness::engine::Engine, Vec<Vec<tch::Tensor>>) {
    use harness::engine::{BatchConfig, Collate, DeviceChoice, Engine};
    let files: Vec<_> = harness::tasks::embedding::DEFAULT_FILES
        .iter()
        .map(|n| (n.to_string(), model_dir.join(n)))
        .collect();
    let embedder = harness::tasks::embedding::Embedder::load(&files).unwrap();
    let Collate::Tokens { pad_values } = embedder.collate() else {
        unreachable!("an embedding model's inputs are tokens")
    };
    let far = Instant::now() + Duration::from_secs(600);
    let tokens = embedder.tokenize_until(texts, far).unwrap().unwrap();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].ids.len()));
    let batches = order
        .chunks(32)
        .map(|chunk| {
            let longest = chunk.iter().map(|&i| tokens[i].ids.len()).max().unwrap() as i64;
            (0..pad_values.len())
                .map(|input| {
                    let mut values = Vec::new();
                    for &i in chunk {
                        let t = &embedder.to_host(&tokens[i])[input];
                        values.extend(
                            t.data
                                .chunks_exact(8)
                                .map(|b| i64::from_ne_bytes(b.try_into().unwrap())),
                        );
                        values.extend(std::iter::repeat_n(
                            pad_values[input],
                            longest as usize - tokens[i].ids.len(),
                        ));
                    }
                    tch::Tensor::from_slice(&values).view([chunk.len() as i64, longest])
                })
                .collect()
        })
        .collect();
    let engine = Engine::load_with(
        &embedder.model_path,
        DeviceChoice::Cpu,
        BatchConfig::default(),
        embedder.collate(),
        Some(std::sync::Arc::new(embedder.pooler())),
    )
    .await
    .unwrap();
    (engine, batches)
}

async fn embed(serving: &ActorRef<ServingMessage>, texts: Vec<String>) {
    support::serving::embed(serving, texts, 60_000)
        .await
        .expect("embedded");
}

/// Every sentence sent by CALLERS callers, one sentence per call.
async fn served_round(serving: &ActorRef<ServingMessage>, texts: &[String]) -> Duration {
    let started = Instant::now();
    all_at_once(CALLERS, |c| {
        let serving = serving.clone();
        let mine: Vec<String> = texts.iter().skip(c).step_by(CALLERS).cloned().collect();
        async move {
            for text in mine {
                embed(&serving, vec![text]).await;
            }
        }
    })
    .await;
    started.elapsed()
}

fn main() {
    let count = env_or("HARNESS_BENCH_SENTENCES", 1024) as usize;
    let texts = sentences(count);
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let exported = support::minilm::export(&model_dir);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let file = dir.path().join("texts.json");
    std::fs::write(&file, serde_json::to_vec(&texts).unwrap()).unwrap();
    let source = support::minilm::source_dir();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = node_config(&[
        "--task=embedding".to_string(),
        format!("--model-dir={}", model_dir.display()),
        "--max-batch-size=32".to_string(),
    ]);

    runtime.block_on(async move {
        let (node, serving) = start_ready(config, Duration::from_secs(120)).await;
        let stats = node.shared().engine_stats().unwrap();
        served_round(&serving, &texts[..CALLERS * 2]).await; // warm

        let (engine, batches) = sorted_batches(&model_dir, &texts).await;
        let direct_round = || async {
            let started = Instant::now();
            for batch in &batches {
                engine.forward(batch.iter().map(tch::Tensor::shallow_clone).collect()).await.unwrap();
            }
            started.elapsed().as_secs_f64()
        };
        direct_round().await; // warm
        let (mut python, mut served, mut python_single, mut direct) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let counters = || {
            let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            (read(&stats.forwards), read(&stats.batched_items), read(&stats.tokens), read(&stats.token_slots))
        };
        let before = counters();
        for round in 0..ROUNDS {
            let (p, single) = tokio::task::block_in_place(|| python_round(&file, &source));
            let s = served_round(&serving, &texts).await;
            let d = direct_round().await;
            eprintln!("round {}: sentence-transformers {p:.2}s, harness {s:.2?}, its model on sorted batches {d:.2}s", round + 1);
            direct.push(d);
            python.push(p);
            python_single.push(single);
            served.push(s.as_secs_f64());
        }
        let after = counters();
        let mut latencies = Vec::new();
        for text in texts.iter().take(SINGLE_CALLS) {
            let t = Instant::now();
            embed(&serving, vec![text.clone()]).await;
            latencies.push(t.elapsed());
        }
        latencies.sort();
        python.sort_by(f64::total_cmp);
        served.sort_by(f64::total_cmp);
        direct.sort_by(f64::total_cmp);
        python_single.sort();
        let (p, s) = (percentile(&python, 0.5), percentile(&served, 0.5));
        let rate = |t: f64| count as f64 / t;

        print_table_head(
            &format!("{count} sentences of 4-40 words, all-MiniLM-L6-v2 on the CPU; median of {ROUNDS} alternating rounds"),
            &["measure", &format!("harness ({CALLERS} callers, one sentence per Embed)"), "sentence-transformers encode(batch_size=32)", "ratio"],
        );
        println!("| throughput | {:.0} sentences/s ({s:.2}s) | {:.0} sentences/s ({p:.2}s) | {:.2} |", rate(s), rate(p), rate(s) / rate(p));
        println!(
            "| single request, one caller | p50 {:.2?}, p99 {:.2?} | p50 {:.2?} (encode of one sentence) | {:.2} |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&python_single, 0.5),
            percentile(&python_single, 0.5).as_secs_f64() / percentile(&latencies, 0.5).as_secs_f64(),
        );
        println!("| mean batch when served | {:.1} sentences per forward | 32 | |", (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64);
        let d = percentile(&direct, 0.5);
        println!(
            "| the node's model on sentence-transformers' batches (all sorted by length, 32 each; direct forwards, tokenizing excluded) | {:.0} sentences/s ({d:.2}s) | {:.0} sentences/s ({p:.2}s) | {:.2} |",
            rate(d),
            rate(p),
            rate(d) / rate(p)
        );
        let (tokens, slots) = (after.2 - before.2, after.3 - before.3);
        println!(
            "| padding, share of the token slots run | {:.1}% ({tokens} tokens in {slots} slots) | | |",
            100.0 * (slots - tokens) as f64 / slots.max(1) as f64
        );
        node.shutdown(Duration::from_secs(5)).await;
    });
}
