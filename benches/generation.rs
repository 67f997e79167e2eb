//! `make bench`, the generation task: a random Llama of about 125M parameters
//! (`generation_baseline.py write-model`, f32) served on the CPU by a node in this
//! process, side by side with transformers' own `generate` of the same prompt ids
//! (`generation_baseline.py run`: left-padded batches of 16, greedy) on the same
//! machine, rounds alternating. Then throughput against the number of concurrent
//! requests, and the peak resident memory of a `harness serve` process loading
//! the model against the size of its weights.
//!
//! The model is written once per machine (half a minute) and cached under the cargo
//! target folder, in a folder named after a hash of the script.
//!
//! `HARNESS_BENCH_ROUNDS` sets the alternating rounds of the comparison (default
//! 1: transformers' side warms up and times a whole pass in each, which is most of
//! the bench's time). `HARNESS_BENCH_QUICK=1` makes a smoke run of it: a quarter of
//! the new tokens in the comparison, 16 in the concurrency table, and the table up
//! to 8 requests only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::{Generation, ServingMessage};
use ractor::ActorRef;
use tokenizers::Tokenizer;

#[path = "../tests/support/mod.rs"]
mod support;

use support::llm::greedy;
use support::measure::{all_at_once, env_or, percentile, print_table_head};
use support::node::ServeSettings;
use support::python::{made_once, run_python, stdout_of, torch_python};
use support::serving::{generate, node_config, start_ready};

/// The Python side: writes the model, runs transformers' `generate`.
const SCRIPT: &str = include_str!("generation_baseline.py");
/// Requests in the comparison (transformers runs them as one batch of 16).
const REQUESTS: usize = 16;
/// Prompt tokens (`<s>` included) and new tokens of the comparison's requests:
/// spread evenly over these ranges.
const PROMPT_TOKENS: (usize, usize) = (8, 200);
const NEW_TOKENS: (u32, u32) = (32, 128);
/// The node's sequence slots and tokens per sequence.
const SLOTS: usize = 32;
const CONTEXT: usize = 512;
/// The concurrency table: requests at once, each with a prompt of
/// `FIXED_PROMPT` tokens.
const CONCURRENCY: [usize; 6] = [1, 2, 4, 8, 16, 32];
const FIXED_PROMPT: usize = 64;
const TIMEOUT_MS: u64 = 600_000;
const COOKIE: &str = "a-generation-bench-cookie";

/// Words the prompts are made of. The tokenizer was trained on made-up words, so
/// these take a few tokens each; ` a` takes one, which lets a prompt end on the
/// exact length asked.
const WORDS: [&str; 40] = [
    "the", "a", "model", "serves", "tokens", "quickly", "under", "load", "while", "every",
    "request", "is", "answered", "with", "care", "and", "nothing", "gets", "lost", "cluster",
    "machine", "learning", "text", "story", "about", "weather", "in", "Paris", "tomorrow",
    "morning", "library", "books", "written", "long", "ago", "by", "people", "who", "lived",
    "there",
];

/// One request: the text the node gets, and the ids it tokenizes to (what
/// transformers gets).
#[derive(Clone)]
struct Request {
    text: String,
    ids: Vec<u32>,
    max_new_tokens: u32,
}

/// A deterministic xorshift generator.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn count(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer.encode(text, true).unwrap().get_ids().len()
}

/// A text of random words that tokenizes (with `<s>`) to `tokens` ids, or as
/// close below as the words allow. Byte-level BPE splits at spaces, so a word
/// adds the same tokens wherever it goes: the count only grows.
fn text_of(tokenizer: &Tokenizer, tokens: usize, next: &mut impl FnMut() -> u64) -> String {
    let mut text = String::from("The");
    while count(tokenizer, &text) < tokens {
        let word = WORDS[(next() % WORDS.len() as u64) as usize];
        let longer = format!("{text} {word}");
        if count(tokenizer, &longer) <= tokens {
            text = longer;
            continue;
        }
        // The word overshoots: any word that fits, else this is as close as it gets.
        match WORDS
            .iter()
            .map(|w| format!("{text} {w}"))
            .find(|t| count(tokenizer, t) <= tokens)
        {
            Some(t) => text = t,
            None => break,
        }
    }
    text
}

fn request(tokenizer: &Tokenizer, text: String, max_new_tokens: u32) -> Request {
    let ids = tokenizer
        .encode(text.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    Request {
        text,
        ids,
        max_new_tokens,
    }
}

/// The comparison's requests: prompt lengths and new tokens each spread evenly
/// over their range, paired and ordered at random (fixed seed).
fn mixed_requests(tokenizer: &Tokenizer, new_tokens: (u32, u32)) -> Vec<Request> {
    let mut next = rng(0x2545_f491_4f6c_dd1d);
    let spread = |lo: usize, hi: usize, i: usize| lo + (hi - lo) * i / (REQUESTS - 1);
    let mut lengths: Vec<usize> = (0..REQUESTS)
        .map(|i| spread(PROMPT_TOKENS.0, PROMPT_TOKENS.1, i))
        .collect();
    let mut news: Vec<u32> = (0..REQUESTS)
        .map(|i| spread(new_tokens.0 as usize, new_tokens.1 as usize, i) as u32)
        .collect();
    shuffle(&mut lengths, &mut next);
    shuffle(&mut news, &mut next);
    lengths
        .into_iter()
        .zip(news)
        .map(|(len, new)| {
            let text = text_of(tokenizer, len, &mut next);
            request(tokenizer, text, new)
        })
        .collect()
}

fn shuffle<T>(items: &mut [T], next: &mut impl FnMut() -> u64) {
    for i in (1..items.len()).rev() {
        items.swap(i, (next() % (i as u64 + 1)) as usize);
    }
}

/// The model, written by the script the first time on this machine.
fn model_dir() -> PathBuf {
    made_once("generation-bench", SCRIPT, "model.safetensors", |out| {
        eprintln!("writing the random ~125M-parameter Llama (once)");
        run_python(SCRIPT, &[Path::new("write-model"), out]);
    })
}

/// What `generation_baseline.py run` printed.
#[derive(serde::Deserialize)]
struct Baseline {
    generated_tokens: u64,
    seconds: f64,
    attn_implementation: String,
    threads: u64,
}

/// transformers' `generate` of the requests in `file` (one batch of 16, greedy),
/// on the CPU, timed in Python after a warm-up pass.
fn transformers_round(model: &Path, file: &Path) -> Baseline {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/generation_baseline.py");
    let out = stdout_of(
        std::process::Command::new(torch_python())
            .arg(script)
            .arg("run")
            .arg(model)
            .arg(file)
            .args(["--device", "cpu", "--batch", &REQUESTS.to_string()])
            .env("PYTHONWARNINGS", "ignore"),
        "generation_baseline.py run",
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// One served pass: every request sent at once.
struct Served {
    wall: Duration,
    /// Each answer, and when it came (from the start).
    answers: Vec<(Generation, Duration)>,
    /// Decode steps run, and tokens they gave.
    steps: u64,
    step_tokens: u64,
}

impl Served {
    fn generated(&self) -> u64 {
        self.answers
            .iter()
            .map(|(g, _)| g.generated_tokens as u64)
            .sum()
    }

    fn rate(&self) -> f64 {
        self.generated() as f64 / self.wall.as_secs_f64()
    }

    /// Times to first token, sorted.
    fn ttfts(&self) -> Vec<f64> {
        let mut t: Vec<f64> = self
            .answers
            .iter()
            .map(|(g, _)| g.time_to_first_token_ms)
            .collect();
        t.sort_by(f64::total_cmp);
        t
    }
}

async fn serve_all(
    serving: &ActorRef<ServingMessage>,
    stats: &harness::engine::EngineStats,
    requests: &[Request],
) -> Served {
    let requests = Arc::new(requests.to_vec());
    let counters = || {
        (
            stats.forwards.load(Ordering::Relaxed),
            stats.batched_items.load(Ordering::Relaxed),
        )
    };
    let before = counters();
    let started = Instant::now();
    let answers = all_at_once(requests.len(), |i| {
        let serving = serving.clone();
        let requests = requests.clone();
        async move {
            let r = &requests[i];
            let answer = generate(&serving, &r.text, greedy(r.max_new_tokens), TIMEOUT_MS)
                .await
                .expect("generated");
            assert_eq!(
                answer.prompt_tokens as usize,
                r.ids.len(),
                "the node tokenized {:?} differently",
                r.text
            );
            (answer, started.elapsed())
        }
    })
    .await;
    let wall = started.elapsed();
    let after = counters();
    Served {
        wall,
        answers,
        steps: after.0 - before.0,
        step_tokens: after.1 - before.1,
    }
}

/// Memory of a `harness serve` process while it starts, KiB: the kernel's peak
/// (`VmHWM`) and resident set once ready, and the most anonymous and the most
/// file-backed pages seen in samples taken every 2 ms until then.
struct StartRss {
    peak: u64,
    ready: Status,
    most: Status,
    ready_in: Duration,
}

/// Resident pages in `/proc/<pid>/status`, KiB.
#[derive(Default, Clone, Copy)]
struct Status {
    anon: u64,
    file: u64,
}

impl Status {
    fn of(pid: u32) -> Status {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Status {
            anon: field("RssAnon:"),
            file: field("RssFile:"),
        }
    }
}

/// Starts `settings` and measures its memory until ready.
fn start_rss(settings: ServeSettings) -> StartRss {
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_child(done.clone());
    let started = Instant::now();
    let node = settings.start();
    let ready_in = started.elapsed();
    done.store(true, Ordering::Relaxed);
    StartRss {
        peak: node.peak_rss_kib(),
        ready: Status::of(node.child.id()),
        most: sampler.join().unwrap(),
        ready_in,
    }
}

/// Samples this process's `harness` child every 2 ms until `done`: the most
/// anonymous and the most file-backed pages seen (each at its own moment).
fn sample_child(done: Arc<AtomicBool>) -> std::thread::JoinHandle<Status> {
    let me = std::process::id();
    std::thread::spawn(move || {
        let (mut most, mut child) = (Status::default(), None);
        while !done.load(Ordering::Relaxed) {
            child = child.or_else(|| find_child(me));
            if let Some(pid) = child {
                let now = Status::of(pid);
                most.anon = most.anon.max(now.anon);
                most.file = most.file.max(now.file);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        most
    })
}

/// The pid of a child of `parent` named `harness`.
fn find_child(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`; the name may hold spaces and parentheses.
            let (head, tail) = stat.rsplit_once(')')?;
            let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
            (head.ends_with("(harness") && ppid == parent).then_some(pid)
        })
}

/// Bytes of the KV cache the node allocates: keys and values of every layer for
/// every slot and position, f32.
fn kv_cache_bytes(model: &Path) -> u64 {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    let n = |key: &str| config[key].as_u64().unwrap();
    let head_dim = n("hidden_size") / n("num_attention_heads");
    let per_token = 2 * n("num_hidden_layers") * n("num_key_value_heads") * head_dim * 4;
    per_token * (SLOTS * CONTEXT) as u64
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// What the bench sizes from the environment.
struct Sizes {
    rounds: usize,
    new_tokens: (u32, u32),
    fixed_new: u32,
    concurrency: &'static [usize],
}

impl Sizes {
    fn from_env() -> Sizes {
        let rounds = env_or("HARNESS_BENCH_ROUNDS", 1).max(1) as usize;
        match env_or("HARNESS_BENCH_QUICK", 0) {
            0 => Sizes {
                rounds,
                new_tokens: NEW_TOKENS,
                fixed_new: 64,
                concurrency: &CONCURRENCY,
            },
            _ => Sizes {
                rounds,
                new_tokens: (NEW_TOKENS.0 / 4, NEW_TOKENS.1 / 4),
                fixed_new: 16,
                concurrency: &CONCURRENCY[..4],
            },
        }
    }
}

/// The requests of the bench.
struct Workload {
    /// The comparison's.
    mixed: Vec<Request>,
    /// The concurrency table's, as many as its last row sends.
    fixed: Vec<Request>,
    /// The comparison's as transformers reads them.
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Workload {
    fn new(model: &Path, sizes: &Sizes) -> Workload {
        let tokenizer = Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
        let mixed = mixed_requests(&tokenizer, sizes.new_tokens);
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        let fixed = (0..*sizes.concurrency.last().unwrap())
            .map(|_| {
                let text = text_of(&tokenizer, FIXED_PROMPT, &mut next);
                request(&tokenizer, text, sizes.fixed_new)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("requests.json");
        let json: Vec<serde_json::Value> = mixed
            .iter()
            .map(|r| serde_json::json!({"prompt_ids": r.ids, "max_new_tokens": r.max_new_tokens}))
            .collect();
        std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
        Workload {
            mixed,
            fixed,
            file,
            _dir: dir,
        }
    }

    fn prompt_lengths(&self) -> Vec<usize> {
        self.mixed.iter().map(|r| r.ids.len()).collect()
    }
}

/// What the node in this process measured.
struct Measured {
    /// The comparison's rounds, and transformers' beside them.
    ours: Vec<Served>,
    theirs: Vec<Baseline>,
    /// The concurrency table's rows.
    rows: Vec<(usize, Served)>,
}

/// Serves the model in this process: the comparison's rounds, alternating with
/// transformers', then the concurrency table.
async fn measure(model: &Path, work: &Workload, sizes: &Sizes) -> Measured {
    let config = node_config(&[
        "--task=generation".to_string(),
        format!("--model-dir={}", model.display()),
        format!("--max-sequences={SLOTS}"),
        format!("--max-context={CONTEXT}"),
    ]);
    let (node, serving) = start_ready(config, Duration::from_secs(300)).await;
    let stats = node.shared().engine_stats().unwrap();
    // Warm: a few prompts of different lengths, a few tokens each.
    let warm: Vec<Request> = work.mixed[..4]
        .iter()
        .map(|r| Request {
            max_new_tokens: 4,
            ..r.clone()
        })
        .collect();
    serve_all(&serving, &stats, &warm).await;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..sizes.rounds {
        let baseline = tokio::task::block_in_place(|| transformers_round(model, &work.file));
        let served = serve_all(&serving, &stats, &work.mixed).await;
        eprintln!(
            "round {}: transformers {} tokens in {:.2}s ({:.1}/s), harness {} in {:.2?} ({:.1}/s)",
            round + 1,
            baseline.generated_tokens,
            baseline.seconds,
            baseline.rate(),
            served.generated(),
            served.wall,
            served.rate()
        );
        theirs.push(baseline);
        ours.push(served);
    }
    let mut rows = Vec::new();
    for &c in sizes.concurrency {
        let served = serve_all(&serving, &stats, &work.fixed[..c]).await;
        eprintln!(
            "{c} at once: {} tokens in {:.2?}",
            served.generated(),
            served.wall
        );
        rows.push((c, served));
    }
    node.shutdown(Duration::from_secs(5)).await;
    Measured { ours, theirs, rows }
}

impl Baseline {
    fn rate(&self) -> f64 {
        self.generated_tokens as f64 / self.seconds
    }
}

fn print_comparison(work: &Workload, sizes: &Sizes, measured: &mut Measured) {
    measured.ours.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    measured
        .theirs
        .sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let s = &measured.ours[measured.ours.len() / 2];
    let b = &measured.theirs[measured.theirs.len() / 2];
    let mut ttfts: Vec<f64> = measured.ours.iter().flat_map(Served::ttfts).collect();
    ttfts.sort_by(f64::total_cmp);
    // Every prompt is admitted (prefilled, one at a time) before the first decode
    // step: the last first token marks the end of the prefills.
    let prefill_ms = s.ttfts().last().copied().unwrap_or(0.0);
    let lengths = work.prompt_lengths();
    let longest = *lengths.iter().max().unwrap();
    let rounds = match sizes.rounds {
        1 => "one round".to_string(),
        n => format!("median of {n} alternating rounds"),
    };
    print_table_head(
        &format!(
            "{REQUESTS} requests at once, prompts of {}-{longest} tokens ({} in all), \
             max_new_tokens {}-{}, greedy; random Llama of 125M parameters, f32, on the CPU \
             ({} threads here, {} in Python); {rounds}",
            lengths.iter().min().unwrap(),
            lengths.iter().sum::<usize>(),
            sizes.new_tokens.0,
            sizes.new_tokens.1,
            tch::get_num_threads(),
            b.threads,
        ),
        &[
            "measure",
            &format!("harness ({SLOTS} slots, continuous batching)"),
            &format!(
                "transformers generate (one batch of {REQUESTS}, left-padded, {} attention)",
                b.attn_implementation
            ),
            "ratio",
        ],
    );
    println!(
        "| generated tokens/s | {:.1} ({} tokens in {:.2?}) | {:.1} ({} tokens in {:.2}s) \
         | {:.2} |",
        s.rate(),
        s.generated(),
        s.wall,
        b.rate(),
        b.generated_tokens,
        b.seconds,
        s.rate() / b.rate()
    );
    println!(
        "| time to first token | p50 {:.0} ms, p99 {:.0} ms (of {}) \
         | after the padded batch's prefill | |",
        percentile(&ttfts, 0.5),
        percentile(&ttfts, 0.99),
        ttfts.len()
    );
    println!(
        "| prefill | {} prompt tokens, one prompt at a time, in {:.2} s \
         | {} positions ({REQUESTS} × {longest}) in one batch | |",
        lengths.iter().sum::<usize>(),
        prefill_ms / 1000.0,
        REQUESTS * longest,
    );
    println!(
        "| decode | {} steps of {:.1} sequences on average, {:.1} ms each \
         | up to {} steps of {REQUESTS} | |",
        s.steps,
        s.step_tokens as f64 / s.steps.max(1) as f64,
        (s.wall.as_secs_f64() * 1000.0 - prefill_ms) / s.steps.max(1) as f64,
        work.mixed.iter().map(|r| r.max_new_tokens).max().unwrap() - 1,
    );
}

fn print_concurrency(sizes: &Sizes, rows: &[(usize, Served)]) {
    print_table_head(
        &format!(
            "Throughput against concurrency: each request a {FIXED_PROMPT}-token prompt and {} \
             new tokens, greedy, all sent at once",
            sizes.fixed_new
        ),
        &[
            "requests at once",
            "tokens/s",
            "× of 1 request",
            "wall",
            "time to first token p50",
            "per output token after the first, p50",
        ],
    );
    let single = rows[0].1.rate();
    for (c, served) in rows {
        let mut per_token: Vec<f64> = served
            .answers
            .iter()
            .map(|(g, at)| {
                let decoding = at.as_secs_f64() * 1000.0 - g.time_to_first_token_ms;
                decoding / (g.generated_tokens.max(2) - 1) as f64
            })
            .collect();
        per_token.sort_by(f64::total_cmp);
        println!(
            "| {c} | {:.1} | {:.2} | {:.2?} | {:.0} ms | {:.1} ms |",
            served.rate(),
            served.rate() / single,
            served.wall,
            percentile(&served.ttfts(), 0.5),
            percentile(&per_token, 0.5),
        );
    }
}

fn print_memory(model: &Path, weights_bytes: u64, served: &StartRss, demo: &StartRss) {
    let kib = |k: u64| mib(k * 1024);
    let of_file = |k: u64| format!("{:.2}", (k * 1024) as f64 / weights_bytes as f64);
    print_table_head(
        &format!(
            "Host memory of a `harness serve` process loading the model ({SLOTS} slots × \
             {CONTEXT} tokens of f32 KV cache; ready in {:.2?})",
            served.ready_in
        ),
        &["measure", "MiB", "÷ model file"],
    );
    let row = |what: &str, k: u64, ratio: bool| {
        let ratio = if ratio { of_file(k) } else { String::new() };
        println!("| {what} | {:.0} | {ratio} |", kib(k));
    };
    println!(
        "| model file (f32 safetensors) | {:.0} | 1.00 |",
        mib(weights_bytes)
    );
    row("peak RSS (VmHWM once ready)", served.peak, true);
    row(
        "peak less the demo model's process's peak",
        served.peak.saturating_sub(demo.peak),
        true,
    );
    row(
        "most file-backed pages while loading (libraries, the weights' mapping)",
        served.most.file,
        true,
    );
    row(
        "most anonymous pages while loading (weights, KV cache, heap)",
        served.most.anon,
        true,
    );
    row(
        "RSS once ready",
        served.ready.anon + served.ready.file,
        true,
    );
    println!(
        "| of which anonymous + file-backed | {:.0} + {:.0} | |",
        kib(served.ready.anon),
        kib(served.ready.file)
    );
    println!(
        "| KV cache (allocated after the weights) | {:.0} | |",
        mib(kv_cache_bytes(model))
    );
    println!(
        "| the demo model's process: peak (most anonymous, most file-backed) \
         | {:.0} ({:.0}, {:.0}) | |",
        kib(demo.peak),
        kib(demo.most.anon),
        kib(demo.most.file)
    );
}

fn main() {
    let sizes = Sizes::from_env();
    let model = model_dir();
    let weights_bytes: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| p.metadata().unwrap().len())
        .sum();
    let work = Workload::new(&model, &sizes);
    eprintln!(
        "{REQUESTS} requests: prompts of {:?} tokens, max_new_tokens {:?}",
        work.prompt_lengths(),
        work.mixed
            .iter()
            .map(|r| r.max_new_tokens)
            .collect::<Vec<_>>()
    );

    // Memory first, with nothing else of ours in memory: the model as the node
    // here serves it, then the demo model (what any `harness serve` process takes:
    // libtorch's libraries, the runtime), to tell the model's share apart.
    let served_rss = start_rss(
        ServeSettings::model_dir(COOKIE, &model)
            .env("HARNESS_TASK", "generation")
            .env("HARNESS_MAX_SEQUENCES", SLOTS)
            .env("HARNESS_MAX_CONTEXT", CONTEXT)
            .serving("generation_bench_rss"),
    );
    let demo_rss = start_rss(ServeSettings::demo(COOKIE).serving("generation_bench_rss_demo"));
    eprintln!(
        "harness serve: peak RSS {:.0} MiB (the demo model's {:.0} MiB), ready in {:.2?}",
        kib_to_mib(served_rss.peak),
        kib_to_mib(demo_rss.peak),
        served_rss.ready_in
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut measured = runtime.block_on(measure(&model, &work, &sizes));

    println!();
    print_comparison(&work, &sizes, &mut measured);
    println!();
    print_concurrency(&sizes, &measured.rows);
    println!();
    print_memory(&model, weights_bytes, &served_rss, &demo_rss);
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
