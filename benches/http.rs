//! `make bench`, HTTP inference: one `harness serve` process
//! (`HARNESS_TASK=embedding`, `HARNESS_API_KEY` set) called by 64 concurrent
//! callers, each sending one sentence per request, three ways in alternating
//! rounds:
//!
//! - through the mesh: one `HarnessClient` (one cluster session) shared by the
//!   64 callers, `embed`;
//! - `POST /v1/embeddings` with `encoding_format: "float"`: 64 callers, each with
//!   its own `reqwest` client, so its own keep-alive HTTP/1.1 connection;
//! - the same with `encoding_format: "base64"` (what the openai Python client
//!   sends by default).
//!
//! Every caller decodes its answer into `Vec<f32>`, as an application would. The
//! node's CPU time per request comes from `/proc/<pid>/stat` (and its threads'
//! `schedstat`, by thread name), the callers' from `/proc/self`; the mean batch
//! from the node's `/metrics`. Then one caller at a time, the three ways
//! alternating in blocks: the latency of a lone request.
//!
//! Two models: (a) all-MiniLM-L6-v2 (exported by our tool) on the sentences of
//! `benches/embedding.rs` (1024 of 4 to 40 words); (b) a model that costs next
//! to nothing (a table lookup giving 384-dimensional vectors, as MiniLM's), so
//! that what is left is the transports' own cost.
//!
//! `HARNESS_BENCH_SENTENCES` changes the number of sentences,
//! `HARNESS_BENCH_ROUNDS` the rounds (default 5), `HARNESS_BENCH_CALLS` the lone
//! requests of each way (default 300; four times as many for (b)),
//! `HARNESS_BENCH_ONLY=a` or `=b` runs one part.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use harness_client::HarnessClient;

#[path = "../tests/support/mod.rs"]
mod support;

use support::measure::{all_at_once, env_or, percentile, print_table_head, sentences};
use support::node::{ServeProcess, ServeSettings};

const CALLERS: usize = 64;
const COOKIE: &str = "bench-cookie";
const API_KEY: &str = "bench-api-key";
const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
const DIMENSIONS: usize = 384;

/// The three ways of asking for an embedding.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    Mesh,
    Float,
    Base64,
}

const WAYS: [Way; 3] = [Way::Mesh, Way::Float, Way::Base64];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Mesh => "mesh (`HarnessClient::embed`, one session)",
            Way::Float => "HTTP `/v1/embeddings`, float",
            Way::Base64 => "HTTP `/v1/embeddings`, base64",
        }
    }
}

/// `/v1/embeddings`' answer, as far as a caller reads it.
#[derive(serde::Deserialize)]
struct Embeddings<E> {
    data: Vec<Datum<E>>,
}

#[derive(serde::Deserialize)]
struct Datum<E> {
    embedding: E,
    index: usize,
}

/// One caller of the HTTP way: its own client, so its own connection (kept
/// alive between its requests).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

struct Target {
    mesh: Arc<HarnessClient>,
    /// One client per caller.
    http: Vec<reqwest::Client>,
    url: String,
    /// For `/metrics`, a connection of its own.
    metrics: reqwest::Client,
}

/// Answer bytes of the last HTTP request made (all answers of a way are about
/// the same size).
static ANSWER_BYTES: [std::sync::atomic::AtomicUsize; 3] = [
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
];

/// HTTP requests sent again after their connection closed under them.
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Embeds `text` the `way` way (over `http`, a caller's own client); its vector.
async fn embed_one(
    way: Way,
    mesh: &HarnessClient,
    http: &reqwest::Client,
    url: &str,
    text: String,
) -> Vec<f32> {
    let format = match way {
        Way::Mesh => {
            let mut answer = mesh.embed(vec![text], None).await.expect("embedded");
            return answer.pop().expect("one vector").vector;
        }
        Way::Float => "float",
        Way::Base64 => "base64",
    };
    let body = bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "input": text,
            "model": MODEL,
            "encoding_format": format,
        }))
        .unwrap(),
    );
    // A connection the node closed (idle, or at the end of its lifetime) as
    // the request went out is retried at once, as HTTP clients do; counted.
    let mut tries = 0;
    let response = loop {
        let sent = http
            .post(url)
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) => break response,
            Err(err) if tries < 3 && !err.is_timeout() => {
                tries += 1;
                RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(err) => panic!("sending: {err}"),
        }
    };
    let status = response.status();
    let bytes = response.bytes().await.expect("an answer");
    assert!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    ANSWER_BYTES[way as usize].store(bytes.len(), std::sync::atomic::Ordering::Relaxed);
    let vector = if way == Way::Float {
        let mut answer: Embeddings<Vec<f32>> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(answer.data.len(), 1);
        assert_eq!(answer.data[0].index, 0);
        answer.data.pop().unwrap().embedding
    } else {
        let mut answer: Embeddings<String> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(answer.data.len(), 1);
        assert_eq!(answer.data[0].index, 0);
        base64::engine::general_purpose::STANDARD
            .decode(answer.data.pop().unwrap().embedding)
            .expect("base64")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    assert_eq!(vector.len(), DIMENSIONS);
    vector
}

/// What the threads of one name spent: CPU seconds, and context switches
/// (voluntary: it waited; involuntary: it was preempted).
#[derive(Default, Clone, Copy)]
struct Threads {
    cpu: f64,
    voluntary: f64,
    involuntary: f64,
}

impl std::ops::Sub for Threads {
    type Output = Threads;
    fn sub(self, o: Threads) -> Threads {
        Threads {
            cpu: self.cpu - o.cpu,
            voluntary: self.voluntary - o.voluntary,
            involuntary: self.involuntary - o.involuntary,
        }
    }
}

/// CPU time of process `pid` so far, in seconds (exited threads included, 10 ms
/// ticks), and what its threads alive now spent, by name (nanosecond
/// `schedstat`, and the switches in `status`).
fn cpu_of(pid: &str) -> (f64, BTreeMap<String, Threads>) {
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        // utime and stime: the 12th and 13th fields after the name, in USER_HZ.
        let mut fields = tail.split_whitespace().skip(11);
        let user: u64 = fields.next()?.parse().ok()?;
        let system: u64 = fields.next()?.parse().ok()?;
        Some((comm, (user + system) as f64 / 100.0))
    };
    let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0.0, |(_, t)| t);
    let mut by_name: BTreeMap<String, Threads> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |file: &str| std::fs::read_to_string(entry.path().join(file)).ok();
        let Some((comm, _)) = read("stat").and_then(|s| ticks(&s)) else {
            continue;
        };
        let on_cpu: u64 = read("schedstat")
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let status = read("status").unwrap_or_default();
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let group = by_name.entry(comm).or_default();
        group.cpu += on_cpu as f64 / 1e9;
        group.voluntary += field("voluntary_ctxt_switches:");
        group.involuntary += field("nonvoluntary_ctxt_switches:");
    }
    (total, by_name)
}

/// The node's forwards and the items they ran so far (`harness_batch_size`'s
/// count and sum, from `/metrics`).
async fn batches(http: &reqwest::Client, node: &ServeProcess) -> (f64, f64) {
    let text = http
        .get(format!("http://{}/metrics", node.http_addr()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    let sum_of = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum_of("harness_batch_size_count"),
        sum_of("harness_batch_size_sum"),
    )
}

/// What one round of one way measured.
#[derive(Default)]
struct Round {
    wall: Duration,
    latencies: Vec<Duration>,
    node_cpu: f64,
    node_threads: BTreeMap<String, Threads>,
    caller_cpu: f64,
    forwards: f64,
    items: f64,
}

/// Every text sent by CALLERS callers, one text per request, the `way` way.
async fn round(
    way: Way,
    target: &Arc<Target>,
    node: &ServeProcess,
    texts: &Arc<Vec<String>>,
) -> Round {
    let pid = node.child.id().to_string();
    let (b0, (n0, t0), (c0, _)) = (
        batches(&target.metrics, node).await,
        cpu_of(&pid),
        cpu_of("self"),
    );
    let started = Instant::now();
    let latencies = all_at_once(CALLERS, |c| {
        let (target, texts) = (target.clone(), texts.clone());
        async move {
            let mut latencies = Vec::new();
            for text in texts.iter().skip(c).step_by(CALLERS) {
                let t = Instant::now();
                embed_one(
                    way,
                    &target.mesh,
                    &target.http[c],
                    &target.url,
                    text.clone(),
                )
                .await;
                latencies.push(t.elapsed());
            }
            latencies
        }
    })
    .await;
    let wall = started.elapsed();
    let ((n1, t1), (c1, _), b1) = (
        cpu_of(&pid),
        cpu_of("self"),
        batches(&target.metrics, node).await,
    );
    let node_threads = t1
        .into_iter()
        .map(|(name, s)| {
            let before = t0.get(&name).copied().unwrap_or_default();
            (name, s - before)
        })
        .collect();
    Round {
        wall,
        latencies: latencies.into_iter().flatten().collect(),
        node_cpu: n1 - n0,
        node_threads,
        caller_cpu: c1 - c0,
        forwards: b1.0 - b0.0,
        items: b1.1 - b0.1,
    }
}

/// A model that costs next to nothing, for the transports' own cost: token
/// ids looked up in a table of 384-dimensional rows (the width of MiniLM's
/// vectors, so the answers are as long), mean-pooled and normalized by the
/// node as MiniLM's are; a word-level tokenizer of the sentences' words.
fn free_model(dir: &std::path::Path, vocabulary: &[&str]) {
    use tch::{Kind, Tensor};
    let _no_grad = tch::no_grad_guard();
    let rows = vocabulary.len() as i64 + 2;
    let table = (Tensor::arange(rows * DIMENSIONS as i64, (Kind::Float, tch::Device::Cpu))
        .reshape([rows, DIMENSIONS as i64])
        / 97.0)
        .sin();
    let ids = Tensor::from_slice(&[2i64, 3, 4, 0]).reshape([2, 2]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0]).reshape([2, 2]);
    let module = tch::CModule::create_by_tracing("Free", "forward", &[ids, mask], &mut |xs| {
        let hidden = Tensor::embedding(&table, &xs[0], -1, false, false);
        vec![hidden + xs[1].unsqueeze(-1).to_kind(Kind::Float) * 0.5]
    })
    .expect("tracing the free model");
    module
        .save(dir.join("model.pt"))
        .expect("saving the free model");
    let mut vocab = serde_json::Map::new();
    vocab.insert("[PAD]".into(), 0.into());
    vocab.insert("[UNK]".into(), 1.into());
    for (i, word) in vocabulary.iter().enumerate() {
        vocab.insert(word.to_lowercase(), (i + 2).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let manifest = serde_json::json!({
        "format": 1, "task": "embedding", "inputs": ["input_ids", "attention_mask"],
        "max_seq_length": 64, "pooling": "mean", "normalize": true,
        "dimension": DIMENSIONS, "pad_token_id": 0,
    });
    std::fs::write(dir.join("harness.json"), manifest.to_string()).unwrap();
}

/// `harness serve` of the embedding model in `dir`, as the serving `serving`,
/// with the inference routes on.
fn serve(dir: &std::path::Path, serving: &str, batch_delay_ms: u64) -> ServeProcess {
    ServeSettings::model_dir(COOKIE, dir)
        .serving(serving)
        .env("HARNESS_TASK", "embedding")
        .env("HARNESS_MAX_BATCH_SIZE", 32)
        .env("HARNESS_MAX_BATCH_DELAY_MS", batch_delay_ms)
        .env("HARNESS_API_KEY", API_KEY)
        .env("RUST_LOG", "info")
        .start()
}

/// The rounds, then the lone requests, against `node`; prints the tables.
async fn measure(
    title: &str,
    node: &ServeProcess,
    texts: Arc<Vec<String>>,
    rounds: usize,
    calls: usize,
) {
    let target = Arc::new(Target {
        mesh: Arc::new(node.connect(Duration::from_secs(60)).await),
        http: (0..CALLERS).map(|_| http_client()).collect(),
        url: format!("http://{}/v1/embeddings", node.http_addr()),
        metrics: http_client(),
    });

    // The three ways give the same vectors (the mesh's own, per the
    // contract); checked on a few texts, one at a time, before timing.
    let mut worst = 0f32;
    for text in texts.iter().take(16) {
        let mut got = Vec::new();
        for way in WAYS {
            got.push(
                embed_one(
                    way,
                    &target.mesh,
                    &target.http[0],
                    &target.url,
                    text.clone(),
                )
                .await,
            );
        }
        for other in &got[1..] {
            let diff = got[0]
                .iter()
                .zip(other)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff);
        }
    }
    assert!(
        worst < 1e-4,
        "HTTP vectors differ from the mesh's by {worst}"
    );
    eprintln!("vectors: HTTP (float, base64) against the mesh, largest difference {worst:e}");

    // Warm every way (connections opened, the model's shapes seen), counting
    // the lines the node logs for each.
    let warm = Arc::new(texts[..CALLERS * 2].to_vec());
    let mut logged = Vec::new();
    for way in WAYS {
        let before = node.log().lines().count();
        round(way, &target, node, &warm).await;
        tokio::time::sleep(Duration::from_millis(200)).await; // the log reader catches up
        logged.push(node.log().lines().count() - before);
    }

    let retries_before = RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let mut measured: BTreeMap<usize, Vec<Round>> = BTreeMap::new();
    for r in 0..rounds {
        let mut line = format!("round {}:", r + 1);
        for i in 0..WAYS.len() {
            let way = WAYS[(i + r) % WAYS.len()];
            let got = round(way, &target, node, &texts).await;
            line += &format!(
                " {way:?} {:.2?} ({:.0}/s),",
                got.wall,
                texts.len() as f64 / got.wall.as_secs_f64()
            );
            measured.entry(way as usize).or_default().push(got);
        }
        eprintln!("{}", line.trim_end_matches(','));
    }
    let retried = RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before;

    // One caller at a time, the ways alternating in blocks of 20.
    let mut lone: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
    let block = 20;
    for b in 0..calls.div_ceil(block) {
        for way in WAYS {
            for i in 0..block {
                let text = texts[(b * block + i) % texts.len()].clone();
                let t = Instant::now();
                embed_one(way, &target.mesh, &target.http[0], &target.url, text).await;
                lone.entry(way as usize).or_default().push(t.elapsed());
            }
        }
    }

    let requests = texts.len() as f64;
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        percentile(&xs, 0.5)
    };
    let summary = |way: Way| {
        let rs = &measured[&(way as usize)];
        let wall = median(rs.iter().map(|r| r.wall.as_secs_f64()).collect());
        let mut lat: Vec<Duration> = rs
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        lat.sort();
        let node_cpu = median(rs.iter().map(|r| r.node_cpu / requests).collect());
        let caller_cpu = median(rs.iter().map(|r| r.caller_cpu / requests).collect());
        let batch = rs.iter().map(|r| r.items).sum::<f64>()
            / rs.iter().map(|r| r.forwards).sum::<f64>().max(1.0);
        (wall, lat, node_cpu, caller_cpu, batch)
    };
    let mesh_wall = summary(Way::Mesh).0;

    println!();
    print_table_head(
        &format!(
            "{title}; {CALLERS} callers, one sentence per request, {} requests a round; \
             median of {rounds} rounds, the ways alternating",
            texts.len()
        ),
        &[
            "way",
            "requests/s",
            "÷ mesh",
            "latency p50",
            "latency p99",
            "node CPU per request",
            "callers' CPU per request",
            "answer bytes",
            "mean batch",
        ],
    );
    for way in WAYS {
        let (wall, lat, node_cpu, caller_cpu, batch) = summary(way);
        let bytes = match way {
            Way::Mesh => "-".to_string(),
            _ => ANSWER_BYTES[way as usize]
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
        };
        println!(
            "| {} | {:.0} ({wall:.2}s) | {:.2} | {:.2?} | {:.2?} | {:.3} ms | {:.3} ms | {bytes} | {batch:.1} |",
            way.name(),
            requests / wall,
            mesh_wall / wall,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            node_cpu * 1e3,
            caller_cpu * 1e3,
        );
    }
    println!();
    for way in WAYS {
        let rates: Vec<String> = measured[&(way as usize)]
            .iter()
            .map(|r| format!("{:.0}", requests / r.wall.as_secs_f64()))
            .collect();
        println!("- {}: rounds {} requests/s", way.name(), rates.join(", "));
    }
    println!(
        "- HTTP requests sent again because the node had closed their connection: {retried} of {}",
        rounds * 2 * texts.len()
    );
    println!(
        "- lines the node logged in the warm-up rounds ({} requests each way): mesh {}, HTTP float {}, HTTP base64 {}",
        warm.len(),
        logged[0],
        logged[1],
        logged[2]
    );

    // The node's CPU per request by thread name (median of the rounds).
    let mut names: Vec<String> = measured
        .values()
        .flatten()
        .flat_map(|r| r.node_threads.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    println!();
    print_table_head(
        "The node's threads per request, by name: CPU time, and context switches (of which preempted); \
         schedstat and status of the threads alive at the end of each round, median of the rounds",
        &["threads", "mesh", "HTTP float", "HTTP base64"],
    );
    for name in names {
        let per = |way: Way, of: fn(&Threads) -> f64| {
            median(
                measured[&(way as usize)]
                    .iter()
                    .map(|r| r.node_threads.get(&name).map_or(0.0, of) / requests)
                    .collect(),
            )
        };
        if WAYS.iter().all(|&w| per(w, |t| t.cpu) < 1e-6) {
            continue;
        }
        let cells: Vec<String> = WAYS
            .iter()
            .map(|&w| {
                format!(
                    "{:.3} ms, {:.2} switches ({:.2})",
                    per(w, |t| t.cpu) * 1e3,
                    per(w, |t| t.voluntary + t.involuntary),
                    per(w, |t| t.involuntary)
                )
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }

    println!();
    print_table_head(
        &format!(
            "One caller at a time: {} requests each way, alternating in blocks of {block}",
            lone[&0].len()
        ),
        &["way", "p50", "p99", "p50 − mesh's"],
    );
    let sorted = |way: Way| {
        let mut l = lone[&(way as usize)].clone();
        l.sort();
        l
    };
    let mesh_p50 = percentile(&sorted(Way::Mesh), 0.5);
    for way in WAYS {
        let l = sorted(way);
        let p50 = percentile(&l, 0.5);
        let diff = p50.as_secs_f64() - mesh_p50.as_secs_f64();
        println!(
            "| {} | {p50:.2?} | {:.2?} | {}{:.2?} |",
            way.name(),
            percentile(&l, 0.99),
            if diff < 0.0 { "−" } else { "+" },
            Duration::from_secs_f64(diff.abs()),
        );
    }
}

fn main() {
    let count = env_or("HARNESS_BENCH_SENTENCES", 1024) as usize;
    let rounds = env_or("HARNESS_BENCH_ROUNDS", 5).max(1) as usize;
    let calls = env_or("HARNESS_BENCH_CALLS", 300).max(3) as usize;
    let texts = Arc::new(sentences(count));
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("HARNESS_BENCH_ONLY").unwrap_or_else(|_| "a,b".to_string());
    let part = |p: &str| only.split(',').any(|o| o.trim() == p);
    println!("\nCommand: HARNESS_BENCH_ROUNDS={rounds} cargo bench --bench http");

    // all-MiniLM-L6-v2, as `benches/embedding.rs` serves it (batch delay 5 ms).
    if part("a") {
        let minilm = dir.path().join("all-MiniLM-L6-v2");
        let exported = support::minilm::export(&minilm);
        assert!(
            exported.status.success(),
            "{}",
            String::from_utf8_lossy(&exported.stderr)
        );
        let node = serve(&minilm, "minilm", 5);
        runtime.block_on(measure(
        &format!("(a) {count} sentences of 4-40 words, all-MiniLM-L6-v2 on the CPU (batch delay 5 ms), one `harness serve`"),
        &node,
        texts.clone(),
        rounds,
        calls,
    ));
        drop(node); // killed
    }

    // The transports alone: a model that costs next to nothing, no batch
    // delay (so a lone request runs at once), four times the requests.
    if part("b") {
        let free = dir.path().join("free");
        std::fs::create_dir_all(&free).unwrap();
        let mut words: Vec<&str> = texts
            .iter()
            .flat_map(|t| t.trim_end_matches('.').split(' '))
            .collect();
        words.sort_unstable();
        words.dedup();
        free_model(&free, &words);
        let node = serve(&free, "free", 0);
        let many: Vec<String> = texts.iter().cycle().take(count * 4).cloned().collect();
        runtime.block_on(measure(
        "(b) The same sentences ×4 to a model that costs next to nothing (a table lookup, 384 dimensions, batch delay 0)",
        &node,
        Arc::new(many),
        rounds,
        calls * 4,
    ));
        drop(node);
    }
}
