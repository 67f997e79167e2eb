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
//! the new tokens in the comparison, 16 in the concurrency table and the
//! streaming section, and the table up to 8 requests only.
//!
//! Last, on the same node, streamed against whole answers: the comparison's 16
//! prompts sent at once, each asking the same new tokens, greedy; in one pass
//! each caller opens a stream (`OpenStream`) and pulls it (`PullStream`, one
//! pull outstanding, the next sent when it answers) to its end, in the other it
//! sends `Generate` and waits for the whole answer. The passes alternate (and
//! which goes first), `HARNESS_BENCH_ROUNDS` rounds of each, at least 2; every
//! streamed answer must equal the whole one, text and ids, or the bench fails.
//!
//! `HARNESS_BENCH_ONLY` runs some sections only, named and comma-separated:
//! `memory`, `comparison`, `concurrency`, `streaming` (unset: all). For example
//! `HARNESS_BENCH_ONLY=streaming cargo bench --bench generation`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::{FinishReason, Generation, ServingMessage};
use ractor::ActorRef;
use tokenizers::Tokenizer;

#[path = "../tests/support/mod.rs"]
mod support;

use support::llm::greedy;
use support::measure::{all_at_once, env_or, percentile, print_table_head};
use support::node::ServeSettings;
use support::python::{made_once, run_python, stdout_of, torch_python};
use support::serving::{
    generate, generate_request, node_config, open_stream, pull_stream, start_ready,
};

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
/// How long a streaming caller's pull waits for a token, as a client's would.
const PULL_WAIT_MS: u32 = 5_000;
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

/// One answer of the streaming section as its caller saw it; times from the
/// pass's start, when every caller sends at once.
struct Call {
    text: String,
    ids: Vec<u32>,
    finish: FinishReason,
    /// The node's: from receiving the request to the first token.
    node_ttft_ms: f64,
    /// The first token in the caller's hands: streamed, the first delta with
    /// ids; whole, the answer.
    first: Duration,
    /// The whole answer in the caller's hands: streamed, the chunk with the end.
    done: Duration,
    /// Pulls sent (0 for a whole answer), and how many answered nothing.
    pulls: u32,
    empty_pulls: u32,
}

/// One pass of the streaming section.
struct Pass {
    wall: Duration,
    calls: Vec<Call>,
    /// Decode steps run, and tokens they gave.
    steps: u64,
    step_tokens: u64,
    /// CPU seconds this process spent over the pass: all of it, and by thread
    /// name.
    cpu: f64,
    threads: BTreeMap<String, Threads>,
}

impl Pass {
    fn generated(&self) -> u64 {
        self.calls.iter().map(|c| c.ids.len() as u64).sum()
    }

    fn rate(&self) -> f64 {
        self.generated() as f64 / self.wall.as_secs_f64()
    }
}

/// The name the engine's thread and the torch threads it starts go by (the
/// kernel keeps 15 characters of `harness-generation`).
const ENGINE_THREAD: &str = "harness-generat";

/// What a group of this process's threads (those of one name) spent.
#[derive(Default, Clone, Copy)]
struct Threads {
    /// Seconds on a CPU.
    cpu: f64,
    /// Seconds runnable and waiting for a CPU (the run queue).
    waited: f64,
    /// Times a thread gave up its CPU (to sleep), and had it taken.
    voluntary: u64,
    involuntary: u64,
}

impl Threads {
    fn less(self, before: Threads) -> Threads {
        Threads {
            cpu: self.cpu - before.cpu,
            waited: self.waited - before.waited,
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    fn add(&mut self, other: Threads, times: f64) {
        self.cpu += other.cpu * times;
        self.waited += other.waited * times;
        self.voluntary += (other.voluntary as f64 * times).round() as u64;
        self.involuntary += (other.involuntary as f64 * times).round() as u64;
    }
}

/// This process's CPU time so far, seconds (exited threads included), and
/// what its threads alive now spent, by name (the kernel's 15-character
/// `comm`), from `/proc/self/task/*/{stat,schedstat,status}`.
fn cpu_now() -> (f64, BTreeMap<String, Threads>) {
    // `pid (comm) state ppid ...`: utime and stime are the 12th and 13th fields
    // after the name, in clock ticks of 1/100 s (Linux's `USER_HZ`).
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        let mut fields = tail.split_whitespace().skip(11);
        let user: u64 = fields.next()?.parse().ok()?;
        let system: u64 = fields.next()?.parse().ok()?;
        Some((comm, (user + system) as f64 / 100.0))
    };
    let total = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0.0, |(_, t)| t);
    let mut by_thread: BTreeMap<String, Threads> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |file: &str| std::fs::read_to_string(entry.path().join(file)).ok();
        let Some((comm, _)) = read("stat").and_then(|s| ticks(&s)) else {
            continue;
        };
        // schedstat: nanoseconds on a CPU, nanoseconds waiting for one, slices.
        let sched: Vec<u64> = read("schedstat")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let status = read("status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let group = by_thread.entry(comm).or_default();
        group.cpu += sched.first().copied().unwrap_or(0) as f64 / 1e9;
        group.waited += sched.get(1).copied().unwrap_or(0) as f64 / 1e9;
        group.voluntary += field("voluntary_ctxt_switches:");
        group.involuntary += field("nonvoluntary_ctxt_switches:");
    }
    (total, by_thread)
}

/// Runs `calls` (all at once) and measures the pass around them.
async fn pass<Fut>(
    stats: &harness::engine::EngineStats,
    callers: usize,
    call: impl Fn(usize, Instant) -> Fut,
) -> Pass
where
    Fut: std::future::Future<Output = Call> + Send + 'static,
{
    let counters = || {
        (
            stats.forwards.load(Ordering::Relaxed),
            stats.batched_items.load(Ordering::Relaxed),
        )
    };
    let (before, cpu_before) = (counters(), cpu_now());
    let started = Instant::now();
    let calls = all_at_once(callers, |i| call(i, started)).await;
    let wall = started.elapsed();
    let (after, cpu_after) = (counters(), cpu_now());
    let threads = cpu_after
        .1
        .into_iter()
        .map(|(name, t)| {
            let was = cpu_before.1.get(&name).copied().unwrap_or_default();
            (name, t.less(was))
        })
        .collect();
    Pass {
        wall,
        calls,
        steps: after.0 - before.0,
        step_tokens: after.1 - before.1,
        cpu: cpu_after.0 - cpu_before.0,
        threads,
    }
}

/// Each request streamed by a caller of its own, all at once: open, then pull
/// until the end, one pull outstanding.
async fn stream_all(
    serving: &ActorRef<ServingMessage>,
    stats: &harness::engine::EngineStats,
    requests: &[Request],
) -> Pass {
    let requests = Arc::new(requests.to_vec());
    pass(stats, requests.len(), |i, started| {
        let serving = serving.clone();
        let requests = requests.clone();
        async move {
            let r = &requests[i];
            let request = generate_request(r.text.as_str(), greedy(r.max_new_tokens), TIMEOUT_MS);
            let opened = open_stream(&serving, request).await.expect("opened");
            assert_eq!(
                opened.prompt_tokens as usize,
                r.ids.len(),
                "the node tokenized {:?} differently",
                r.text
            );
            let (mut text, mut ids, mut first) = (String::new(), Vec::new(), None);
            let (mut pulls, mut empty_pulls) = (0, 0);
            let end = loop {
                let chunk = pull_stream(&serving, opened.stream, PULL_WAIT_MS)
                    .await
                    .expect("pulled");
                pulls += 1;
                if !chunk.delta.token_ids.is_empty() {
                    first.get_or_insert_with(|| started.elapsed());
                } else if chunk.delta.text.is_empty() && chunk.end.is_none() {
                    empty_pulls += 1;
                }
                text.push_str(&chunk.delta.text);
                ids.extend_from_slice(&chunk.delta.token_ids);
                if let Some(end) = chunk.end {
                    break end;
                }
            };
            let done = started.elapsed();
            assert_eq!(end.generated_tokens as usize, ids.len(), "the end's count");
            Call {
                text,
                ids,
                finish: end.finish_reason,
                node_ttft_ms: end.time_to_first_token_ms,
                first: first.unwrap_or(done),
                done,
                pulls,
                empty_pulls,
            }
        }
    })
    .await
}

/// Each request sent as a `Generate` by a caller of its own, all at once.
async fn whole_all(
    serving: &ActorRef<ServingMessage>,
    stats: &harness::engine::EngineStats,
    requests: &[Request],
) -> Pass {
    let requests = Arc::new(requests.to_vec());
    pass(stats, requests.len(), |i, started| {
        let serving = serving.clone();
        let requests = requests.clone();
        async move {
            let r = &requests[i];
            let answer = generate(&serving, &r.text, greedy(r.max_new_tokens), TIMEOUT_MS)
                .await
                .expect("generated");
            let done = started.elapsed();
            assert_eq!(
                answer.prompt_tokens as usize,
                r.ids.len(),
                "the node tokenized {:?} differently",
                r.text
            );
            Call {
                text: answer.text,
                ids: answer.token_ids,
                finish: answer.finish_reason,
                node_ttft_ms: answer.time_to_first_token_ms,
                first: done,
                done,
                pulls: 0,
                empty_pulls: 0,
            }
        }
    })
    .await
}

/// Fails the bench unless `pass`'s answers are `reference`'s, text and ids.
fn assert_same_answers(what: &str, reference: &Pass, pass: &Pass) {
    for (i, (a, b)) in reference.calls.iter().zip(&pass.calls).enumerate() {
        let diverges = a.ids.iter().zip(&b.ids).position(|(x, y)| x != y);
        assert!(
            a.ids == b.ids && a.text == b.text && a.finish == b.finish,
            "{what}: request {i}'s answer differs from the first whole pass's: {} against {} \
             ids (first difference at {diverges:?}), finish {:?} against {:?}, text {:?} \
             against {:?}",
            b.ids.len(),
            a.ids.len(),
            b.finish,
            a.finish,
            b.text,
            a.text,
        );
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
    /// New tokens of each request of the concurrency table and of the streaming
    /// section.
    fixed_new: u32,
    concurrency: &'static [usize],
    /// Rounds of the streaming section (each a streamed and a whole pass).
    stream_rounds: usize,
    /// `HARNESS_BENCH_ONLY`: the sections to run, or `None` for all.
    only: Option<Vec<String>>,
}

/// The bench's sections, as `HARNESS_BENCH_ONLY` names them.
const SECTIONS: [&str; 4] = ["memory", "comparison", "concurrency", "streaming"];

impl Sizes {
    fn from_env() -> Sizes {
        let rounds = env_or("HARNESS_BENCH_ROUNDS", 1).max(1) as usize;
        let only = std::env::var("HARNESS_BENCH_ONLY")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                let names: Vec<String> = v.split(',').map(|n| n.trim().to_string()).collect();
                for name in &names {
                    assert!(
                        SECTIONS.contains(&name.as_str()),
                        "HARNESS_BENCH_ONLY names {name:?}: the sections are {SECTIONS:?}"
                    );
                }
                names
            });
        let (new_tokens, fixed_new, concurrency) = match env_or("HARNESS_BENCH_QUICK", 0) {
            0 => (NEW_TOKENS, 64, &CONCURRENCY[..]),
            _ => ((NEW_TOKENS.0 / 4, NEW_TOKENS.1 / 4), 16, &CONCURRENCY[..4]),
        };
        Sizes {
            rounds,
            new_tokens,
            fixed_new,
            concurrency,
            stream_rounds: rounds.max(2),
            only,
        }
    }

    /// Whether the section `name` runs.
    fn runs(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
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
    /// The streaming section's passes, by round: streamed, and whole answers.
    streamed: Vec<Pass>,
    whole: Vec<Pass>,
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
    let comparison_rounds = if sizes.runs("comparison") {
        sizes.rounds
    } else {
        0
    };
    for round in 0..comparison_rounds {
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
    let concurrency = if sizes.runs("concurrency") {
        sizes.concurrency
    } else {
        &[]
    };
    for &c in concurrency {
        let served = serve_all(&serving, &stats, &work.fixed[..c]).await;
        eprintln!(
            "{c} at once: {} tokens in {:.2?}",
            served.generated(),
            served.wall
        );
        rows.push((c, served));
    }
    let (mut streamed, mut whole) = (Vec::new(), Vec::new());
    if sizes.runs("streaming") {
        let requests = streaming_requests(work, sizes);
        stream_all(&serving, &stats, &warm).await;
        for round in 0..sizes.stream_rounds {
            // Which pass goes first alternates too.
            let (s, w) = if round % 2 == 0 {
                let s = stream_all(&serving, &stats, &requests).await;
                (s, whole_all(&serving, &stats, &requests).await)
            } else {
                let w = whole_all(&serving, &stats, &requests).await;
                (stream_all(&serving, &stats, &requests).await, w)
            };
            let reference = whole.first().unwrap_or(&w);
            assert_same_answers(&format!("round {}, streamed", round + 1), reference, &s);
            assert_same_answers(&format!("round {}, whole", round + 1), reference, &w);
            eprintln!(
                "streaming round {}: streamed {} tokens in {:.2?} ({:.1}/s), whole {} in {:.2?} \
                 ({:.1}/s): {:.3}",
                round + 1,
                s.generated(),
                s.wall,
                s.rate(),
                w.generated(),
                w.wall,
                w.rate(),
                s.rate() / w.rate()
            );
            streamed.push(s);
            whole.push(w);
        }
    }
    node.shutdown(Duration::from_secs(5)).await;
    Measured {
        ours,
        theirs,
        rows,
        streamed,
        whole,
    }
}

/// The streaming section's requests: the comparison's prompts, each asking
/// `fixed_new` new tokens.
fn streaming_requests(work: &Workload, sizes: &Sizes) -> Vec<Request> {
    work.mixed
        .iter()
        .map(|r| Request {
            max_new_tokens: sizes.fixed_new,
            ..r.clone()
        })
        .collect()
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

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_streaming(work: &Workload, sizes: &Sizes, streamed: &[Pass], whole: &[Pass]) {
    let lengths = work.prompt_lengths();
    let rates = |passes: &[Pass]| passes.iter().map(Pass::rate).collect::<Vec<_>>();
    let (s_rates, w_rates) = (rates(streamed), rates(whole));
    let ratios: Vec<f64> = s_rates.iter().zip(&w_rates).map(|(s, w)| s / w).collect();
    // Every round's tokens over every round's wall.
    let overall = |passes: &[Pass]| {
        passes.iter().map(Pass::generated).sum::<u64>() as f64
            / passes.iter().map(|p| p.wall.as_secs_f64()).sum::<f64>()
    };
    let list = |values: &[f64], digits: usize| {
        values
            .iter()
            .map(|v| format!("{v:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Percentiles over every round's calls.
    let pooled_to = |passes: &[Pass], of: fn(&Call) -> f64, digits: usize| {
        let mut v: Vec<f64> = passes.iter().flat_map(|p| p.calls.iter().map(of)).collect();
        v.sort_by(f64::total_cmp);
        format!(
            "p50 {:.digits$} ms, p99 {:.digits$} ms",
            percentile(&v, 0.5),
            percentile(&v, 0.99)
        )
    };
    let pooled = |passes: &[Pass], of: fn(&Call) -> f64| pooled_to(passes, of, 0);
    let first = |c: &Call| c.first.as_secs_f64() * 1000.0;
    let done = |c: &Call| c.done.as_secs_f64() * 1000.0;
    let node_ttft = |c: &Call| c.node_ttft_ms;
    let calls = streamed.iter().map(|p| p.calls.len()).sum::<usize>();
    let pulls: Vec<u32> = streamed
        .iter()
        .flat_map(|p| p.calls.iter().map(|c| c.pulls))
        .collect();
    let empty: u32 = streamed
        .iter()
        .flat_map(|p| p.calls.iter().map(|c| c.empty_pulls))
        .sum();
    // Decode steps: every prompt is prefilled before the first step, so the
    // last first token marks the end of the prefills (as in the comparison).
    let steps = |passes: &[Pass]| {
        let n = passes.len() as f64;
        let steps = passes.iter().map(|p| p.steps).sum::<u64>() as f64 / n;
        let tokens = passes.iter().map(|p| p.step_tokens).sum::<u64>() as f64 / n;
        let per_step: Vec<f64> = passes
            .iter()
            .map(|p| {
                let prefill = p.calls.iter().map(|c| c.node_ttft_ms).fold(0.0, f64::max);
                (p.wall.as_secs_f64() * 1000.0 - prefill) / p.steps.max(1) as f64
            })
            .collect();
        format!(
            "{steps:.0} of {:.1} sequences on average; {:.1} ms each after the prefills \
             (per round: {})",
            tokens / steps.max(1.0),
            median(&per_step),
            list(&per_step, 1)
        )
    };
    let cpu = |passes: &[Pass]| {
        let n = passes.len() as f64;
        let wall = passes.iter().map(|p| p.wall.as_secs_f64()).sum::<f64>() / n;
        // Cores the process had: 2 at most here, fewer where other work took them.
        let cores: Vec<f64> = passes
            .iter()
            .map(|p| p.cpu / p.wall.as_secs_f64())
            .collect();
        format!(
            "{:.2} in {wall:.1} s of wall; CPU ÷ wall per round {}",
            passes.iter().map(|p| p.cpu).sum::<f64>() / n,
            list(&cores, 2)
        )
    };
    let threads = |passes: &[Pass]| {
        let n = passes.len() as f64;
        let mut by: BTreeMap<&str, Threads> = BTreeMap::new();
        for p in passes {
            for (name, t) in &p.threads {
                by.entry(name.as_str()).or_default().add(*t, 1.0 / n);
            }
        }
        let mut by: Vec<(&str, Threads)> = by
            .into_iter()
            .filter(|(_, t)| t.cpu > 0.0 || t.voluntary + t.involuntary > 0)
            .collect();
        by.sort_by(|a, b| b.1.cpu.total_cmp(&a.1.cpu));
        by.iter()
            .map(|(name, t)| {
                format!(
                    "`{name}` {:.2} s on a CPU, {:.2} s waiting for one, {} + {} switches",
                    t.cpu, t.waited, t.voluntary, t.involuntary
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let engine_waits = |passes: &[Pass]| {
        let waits: Vec<f64> = passes
            .iter()
            .map(|p| p.threads.get(ENGINE_THREAD).map_or(0.0, |t| t.waited))
            .collect();
        list(&waits, 2)
    };
    print_table_head(
        &format!(
            "Streamed against whole answers: {} callers at once, the comparison's prompts \
             ({}-{} tokens, {} in all), {} new tokens each, greedy; streamed: `OpenStream`, then \
             `PullStream` (wait_ms {PULL_WAIT_MS}) until the end, one pull outstanding per caller; \
             whole: `Generate`; {} alternating rounds of each, every streamed answer equal to \
             the whole one (text and ids)",
            lengths.len(),
            lengths.iter().min().unwrap(),
            lengths.iter().max().unwrap(),
            lengths.iter().sum::<usize>(),
            sizes.fixed_new,
            streamed.len(),
        ),
        &["measure", "streamed", "whole answers", "streamed ÷ whole"],
    );
    println!(
        "| generated tokens/s (all callers' tokens ÷ the pass's wall): median of the rounds \
         | {:.1} ({} tokens a pass; rounds {}) | {:.1} (rounds {}) | {:.3}: the median of the \
         rounds' ratios (rounds {}) |",
        median(&s_rates),
        streamed[0].generated(),
        list(&s_rates, 1),
        median(&w_rates),
        list(&w_rates, 1),
        median(&ratios),
        list(&ratios, 3),
    );
    println!(
        "| generated tokens/s: all rounds' tokens ÷ all rounds' wall | {:.1} | {:.1} | {:.3} |",
        overall(streamed),
        overall(whole),
        overall(streamed) / overall(whole),
    );
    println!(
        "| time to first token, as the caller sees it (of {calls}) | {} (first delta with tokens) \
         | {} (nothing before the whole answer) | |",
        pooled(streamed, first),
        pooled(whole, done),
    );
    println!(
        "| time to first token, the node's (`time_to_first_token_ms`) | {} | {} | |",
        pooled(streamed, node_ttft),
        pooled(whole, node_ttft),
    );
    println!(
        "| the caller's time to first token less the node's | {} | | |",
        pooled_to(
            streamed,
            |c| c.first.as_secs_f64() * 1000.0 - c.node_ttft_ms,
            1
        ),
    );
    println!(
        "| time to the whole answer | {} | {} | |",
        pooled(streamed, done),
        pooled(whole, done),
    );
    println!(
        "| pulls per stream | {:.1} (min {}, max {}; {empty} empty in all) | one `Generate` | |",
        pulls.iter().sum::<u32>() as f64 / pulls.len().max(1) as f64,
        pulls.iter().min().unwrap_or(&0),
        pulls.iter().max().unwrap_or(&0),
    );
    println!(
        "| decode steps per pass | {} | {} | |",
        steps(streamed),
        steps(whole)
    );
    println!(
        "| CPU seconds per pass | {} | {} | |",
        cpu(streamed),
        cpu(whole)
    );
    println!(
        "| per pass by thread name: CPU, run-queue wait, voluntary + involuntary context \
         switches | {} | {} | |",
        threads(streamed),
        threads(whole)
    );
    println!(
        "| the engine's threads (`{ENGINE_THREAD}`) waiting for a CPU, s, per round | {} | {} | |",
        engine_waits(streamed),
        engine_waits(whole)
    );
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
    let rss = sizes.runs("memory").then(|| {
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
        (served_rss, demo_rss)
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut measured = runtime.block_on(measure(&model, &work, &sizes));

    if !measured.ours.is_empty() {
        println!();
        print_comparison(&work, &sizes, &mut measured);
    }
    if !measured.rows.is_empty() {
        println!();
        print_concurrency(&sizes, &measured.rows);
    }
    if !measured.streamed.is_empty() {
        println!();
        print_streaming(&work, &sizes, &measured.streamed, &measured.whole);
    }
    if let Some((served_rss, demo_rss)) = &rss {
        println!();
        print_memory(&model, weights_bytes, served_rss, demo_rss);
    }
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
