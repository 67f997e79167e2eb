//! The chaos and load suite: what production does to a node, on this machine's
//! loopback, with every call counted. Each scenario is bounded in count and time
//! and prints one row of `RELIABILITY.md`'s table.
//!
//! `make test` runs the short form; `make chaos` the long one (`HARNESS_CHAOS=long`,
//! with the rows also written to `HARNESS_CHAOS_REPORT`).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness_client::{
    serving_group, ClientError, DType, HarnessClient, Payload, RunRequest, ServingError,
    ServingMessage, WireTensor, PROTOCOL_VERSION,
};
use proptest::prelude::*;
use ractor::ActorRef;
use sha2::{Digest, Sha256};
use support::client::{connect, demo_item as item};
use support::hub::{content, hex, On, TestHub};
use support::measure::{all_at_once, percentile};
use support::node::ServeProcess;
use support::relay::{Link, Relay};
use support::serving::crash_regardless;

const COOKIE: &str = "a-chaos-test-cookie";
/// A call's answer may arrive this long after its deadline and still count as
/// answered (scheduling on a busy 2-core machine); later, it is lost.
const GRACE: Duration = Duration::from_secs(1);

use support::client::ONE_CLIENT_AT_A_TIME;

fn long() -> bool {
    std::env::var("HARNESS_CHAOS").as_deref() == Ok("long")
}

/// The short form's value, or the long form's under `make chaos`.
fn pick<T>(short: T, long_form: T) -> T {
    if long() {
        long_form
    } else {
        short
    }
}

/// One row of the reliability table.
struct Row<'a> {
    scenario: &'a str,
    load: String,
    faults: String,
    sent: u64,
    answered: u64,
    lost: u64,
    restarts: u64,
    notes: String,
}

impl Row<'_> {
    /// Prints the row (and appends it to `HARNESS_CHAOS_REPORT`), then asserts
    /// that nothing was lost.
    fn report(self) {
        let result = if self.lost == 0 && self.answered == self.sent {
            "pass"
        } else {
            "FAIL"
        };
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.load,
            self.faults,
            self.sent,
            self.answered,
            self.lost,
            self.restarts,
            result,
            self.notes
        );
        println!("chaos: {line}");
        if let Ok(path) = std::env::var("HARNESS_CHAOS_REPORT") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(file, "{line}").unwrap();
        }
        assert_eq!(self.lost, 0, "{}: calls lost", self.scenario);
        assert_eq!(
            self.answered, self.sent,
            "{}: calls unanswered",
            self.scenario
        );
    }
}

/// Counts of a load's calls.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
    /// Calls answered later than their deadline plus [`GRACE`] (counted lost too).
    late: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    /// Error texts seen, a few of each kind.
    kinds: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::SeqCst) + self.errors.load(Ordering::SeqCst)
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut all = self.latencies.lock().unwrap().clone();
        all.sort();
        percentile(&all, p)
    }

    fn kinds(&self) -> String {
        let kinds = self.kinds.lock().unwrap();
        kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn kind(err: &ClientError) -> String {
    match err {
        ClientError::Serving(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("serving")
            .to_string(),
        other => format!("{other:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("client")
            .to_string(),
    }
}

/// `callers` tasks calling `Run` one after another, each with `deadline`, until
/// `stop` is set. Every call is waited for at most its deadline plus [`GRACE`].
fn start_load(
    client: Arc<HarnessClient>,
    callers: usize,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let tasks = (0..callers)
        .map(|_| {
            let (client, tally, stop) = (client.clone(), tally.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    tally.sent.fetch_add(1, Ordering::SeqCst);
                    let started = Instant::now();
                    let call = client.run(item(), Some(deadline));
                    match tokio::time::timeout(deadline + GRACE, call).await {
                        Ok(Ok(out)) => {
                            assert_eq!(out[0].shape, vec![1, 3]);
                            tally.ok.fetch_add(1, Ordering::SeqCst);
                            tally.latencies.lock().unwrap().push(started.elapsed());
                        }
                        Ok(Err(err)) => {
                            tally.errors.fetch_add(1, Ordering::SeqCst);
                            *tally.kinds.lock().unwrap().entry(kind(&err)).or_default() += 1;
                            // A failing node answers at once: do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => {
                            tally.lost.fetch_add(1, Ordering::SeqCst);
                            tally.late.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

async fn stop_load(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a caller panicked");
    }
}

/// Waits until a call succeeds; how long it took.
async fn until_served(client: &HarnessClient, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if client
            .run(item(), Some(Duration::from_secs(1)))
            .await
            .is_ok()
        {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not served again within {within:?}");
}

/// The remote serving of `serving`, once the client's node sees it.
async fn remote(serving: &str) -> ActorRef<ServingMessage> {
    for _ in 0..500 {
        if let Some(member) = ractor::pg::get_members(&serving_group(serving)).pop() {
            return ActorRef::from(member);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no member of {serving}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_every_call_is_answered_and_memory_stays_flat() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_soak";
    let node = ServeProcess::start(COOKIE, serving, &[]);
    let client = Arc::new(node.connect(Duration::from_secs(5)).await);
    let duration = pick(Duration::from_secs(30), Duration::from_secs(300));
    let callers = 64;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(
        client.clone(),
        callers,
        Duration::from_secs(5),
        stop.clone(),
    );
    // Memory after warm-up (a tenth of the run), then at the end.
    tokio::time::sleep(duration / 10).await;
    let warm = node.rss_kib();
    tokio::time::sleep(duration - duration / 10).await;
    let end = node.rss_kib();
    stop_load(&stop, tasks).await;
    let growth = (end as f64 - warm as f64) / warm as f64;
    let row = Row {
        scenario: "1 soak",
        load: format!("{callers} remote callers, {}s", duration.as_secs()),
        faults: "none".into(),
        sent: tally.sent.load(Ordering::SeqCst),
        answered: tally.answered(),
        lost: tally.lost.load(Ordering::SeqCst),
        restarts: 0,
        notes: format!(
            "{} ok; p50 {:.1?}, p99 {:.1?}; RSS {} → {} MiB ({:+.1}%)",
            tally.ok.load(Ordering::SeqCst),
            tally.percentile(0.5),
            tally.percentile(0.99),
            warm / 1024,
            end / 1024,
            growth * 100.0
        ),
    };
    assert_eq!(tally.errors.load(Ordering::SeqCst), 0, "{}", tally.kinds());
    assert!(growth < 0.10, "resident memory grew {:.1}%", growth * 100.0);
    row.report();
}

/// A `harness fetch` of `files` of the test hub into `cache`, output captured.
fn fetch_command(hub: &TestHub, cache: &Path, files: &[&str]) -> Command {
    let mut cmd = hub.fetch_command(cache, "chaos/model", files);
    cmd.env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A xorshift step: the scenarios' random points, from fixed seeds so that a
/// failure can be replayed.
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The blobs of the cache that are whole (named by their sha256).
fn complete_blobs(cache: &Path) -> Vec<String> {
    let blobs = cache.join("huggingface/hub/models--chaos--model/blobs");
    let mut names: Vec<String> = std::fs::read_dir(blobs)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.ends_with(".incomplete"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Bytes under the cache's blobs, partial ones included.
fn cache_bytes(cache: &Path) -> u64 {
    let blobs = cache.join("huggingface/hub/models--chaos--model/blobs");
    std::fs::read_dir(blobs)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Every file a snapshot names is whole: its bytes hash to its blob's name.
fn snapshots_verify(cache: &Path) -> usize {
    let snapshots = cache.join("huggingface/hub/models--chaos--model/snapshots");
    let mut checked = 0;
    for commit in std::fs::read_dir(snapshots).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(commit.path()).unwrap().flatten() {
            let target = std::fs::canonicalize(file.path()).expect("a snapshot link resolves");
            let bytes = std::fs::read(&target).unwrap();
            let name = target.file_name().unwrap().to_string_lossy().to_string();
            // LFS blobs are named by their sha256; small files by their git blob id.
            let hash = if name.len() == 40 {
                support::hub::git_blob_id(&bytes)
            } else {
                hex(&Sha256::digest(&bytes))
            };
            assert_eq!(
                hash,
                name,
                "{}: {name} is not its content",
                file.path().display()
            );
            checked += 1;
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_downloading_the_cache_stays_whole_and_nothing_complete_is_fetched_again() {
    let hub = TestHub::start().await;
    // A small file first, so that early runs complete it and later runs must
    // leave it alone.
    let files: Vec<(String, Vec<u8>)> = [300_000, 1_200_000, 1_500_000]
        .iter()
        .zip(40..)
        .map(|(&len, seed)| (format!("part-{seed}.bin"), content(len, seed)))
        .collect();
    let entries: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice(), true))
        .collect();
    hub.commit("chaos/model", "main", &entries);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    hub.set_rate(Some(500_000));
    let cache = tempfile::tempdir().unwrap();
    let kills = pick(4, 10);
    // Kill points 0.1 to 0.7 s into each run's transfer (the largest takes 3 s at
    // this rate, so most runs die mid-file), from a fixed seed so a failure can be
    // replayed.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut refetched = Vec::new();
    let mut sent = 0;
    for _ in 0..kills {
        let after = Duration::from_millis(100 + next_random(&mut seed) % 600);
        let before = complete_blobs(cache.path());
        hub.clear_served();
        let mut child = fetch_command(&hub, cache.path(), &names).spawn().unwrap();
        sent += 1;
        // Kill once bytes flow (the process first loads libtorch), at a random point.
        let bytes_before = cache_bytes(cache.path());
        let waiting = Instant::now();
        while cache_bytes(cache.path()) == bytes_before
            && child.try_wait().unwrap().is_none()
            && waiting.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(after).await;
        let _ = child.kill(); // SIGKILL (or it had finished)
        child.wait().unwrap();
        // Nothing already whole was asked for again, and the snapshot never
        // names a partial file.
        for served in hub.served() {
            if let Some(sha) = served.path.strip_prefix("/cdn/") {
                if before.iter().any(|b| b == sha) && served.method == "GET" {
                    refetched.push(sha.to_string());
                }
            }
        }
        snapshots_verify(cache.path());
    }
    // A clean fetch completes and every file verifies.
    hub.set_rate(None);
    let before = complete_blobs(cache.path());
    hub.clear_served();
    let out = fetch_command(&hub, cache.path(), &names).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for served in hub.served() {
        if let Some(sha) = served.path.strip_prefix("/cdn/") {
            if before.iter().any(|b| b == sha) && served.method == "GET" {
                refetched.push(sha.to_string());
            }
        }
    }
    let paths: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(paths.len(), files.len());
    for ((_, bytes), path) in files.iter().zip(&paths) {
        assert_eq!(&std::fs::read(path).unwrap(), bytes);
    }
    assert_eq!(snapshots_verify(cache.path()), files.len());
    assert!(
        refetched.is_empty(),
        "complete files fetched again: {refetched:?}"
    );
    Row {
        scenario: "2 killed while downloading",
        load: format!("`harness fetch` of 0.3 + 1.2 + 1.5 MB at 0.5 MB/s per file, {kills} runs"),
        faults: format!("SIGKILL at a random point of each of {kills} runs"),
        sent: sent + 1,
        answered: sent + 1,
        lost: 0,
        restarts: sent,
        notes: format!(
            "then a clean fetch: {} files verified, {} whole before it; none fetched twice",
            files.len(),
            before.len()
        ),
    }
    .report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_fails_calls_before_their_deadlines_and_is_found_again() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_killed";
    let mut node = ServeProcess::start(COOKIE, serving, &[]);
    let client = Arc::new(node.connect(Duration::from_secs(2)).await);
    let rounds = pick(2, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(client.clone(), 16, Duration::from_secs(2), stop.clone());
    let (mut up, mut found) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(2)).await;
        node.kill();
        // Down for a while: calls fail, none hangs.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let restarted = Instant::now();
        tokio::task::block_in_place(|| node.restart());
        up.push(restarted.elapsed());
        found.push(until_served(&client, Duration::from_secs(30)).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load(&stop, tasks).await;
    Row {
        scenario: "3 killed while serving",
        load: "16 remote callers, 2 s deadlines".into(),
        faults: format!("{rounds} × SIGKILL of the node, started again 3 s later"),
        sent: tally.sent.load(Ordering::SeqCst),
        answered: tally.answered(),
        lost: tally.lost.load(Ordering::SeqCst),
        restarts: rounds,
        notes: format!(
            "{} ok, errors: {}; each time ready {:.1?} after its start, then found by the client within {:.1?} (max)",
            tally.ok.load(Ordering::SeqCst),
            tally.kinds(),
            up.iter().max().unwrap(),
            found.iter().max().unwrap()
        ),
    }
    .report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_crashes_under_load_each_recover_and_the_restarts_add_up() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_crashes";
    // A short restart window: each crash comes after the last one's window, so
    // each restart waits the first backoff step only.
    let node = ServeProcess::start(
        COOKIE,
        serving,
        &[
            ("HARNESS_FAULT_INJECTION", "1"),
            ("HARNESS_MAX_RESTARTS", "1000"),
            ("HARNESS_RESTART_WINDOW_S", "1"),
        ],
    );
    let client = Arc::new(node.connect(Duration::from_secs(10)).await);
    let crashes = pick(5, 20);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(client.clone(), 16, Duration::from_secs(10), stop.clone());
    let mut recoveries = Vec::new();
    for n in 1..=crashes {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let serving_ref = remote(serving).await;
        let crashed = Instant::now();
        // The serving panics right after answering: the answer may not get out.
        crash_regardless(&serving_ref, Duration::from_secs(2)).await;
        // Ready again, with the restart counted.
        loop {
            let status = client.status(Some(Duration::from_secs(2))).await;
            if let Ok(status) = status {
                if status.restarts == n && status.phase == "ready" {
                    break;
                }
                assert!(
                    status.restarts <= n,
                    "{} restarts after {n} crashes",
                    status.restarts
                );
            }
            assert!(
                crashed.elapsed() < Duration::from_secs(30),
                "not ready 30 s after crash {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recoveries.push(crashed.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load(&stop, tasks).await;
    let status = client.status(None).await.unwrap();
    assert_eq!(status.restarts, crashes);
    recoveries.sort();
    Row {
        scenario: "4 crashes under load",
        load: "16 remote callers, 10 s deadlines".into(),
        faults: format!("{crashes} injected serving panics"),
        sent: tally.sent.load(Ordering::SeqCst),
        answered: tally.answered(),
        lost: tally.lost.load(Ordering::SeqCst),
        restarts: status.restarts,
        notes: format!(
            "{} ok, errors: {}; ready again in median {:.0?}, max {:.0?}",
            tally.ok.load(Ordering::SeqCst),
            if tally.kinds().is_empty() {
                "none".to_string()
            } else {
                tally.kinds()
            },
            recoveries[recoveries.len() / 2],
            recoveries.last().unwrap()
        ),
    }
    .report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_fault_matrix_in_one_fetch() {
    use harness::fetch::{self, FetchOptions, FetchProgress, FetchSpec};
    use support::hub::Fault as HubFault;
    let hub = TestHub::start().await;
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), content(600_000, 70 + i)))
        .collect();
    let entries: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice(), true))
        .chain(std::iter::once((
            "config.json",
            b"{\"small\": true}".as_slice(),
            false,
        )))
        .collect();
    hub.commit("chaos/model", "main", &entries);
    // Every fault of the fetch issue, queued: each spoils the next matching request.
    let faults = [
        (
            On::Resolve,
            HubFault::Status {
                code: 503,
                retry_after: None,
            },
        ),
        (
            On::Resolve,
            HubFault::Status {
                code: 429,
                retry_after: Some(1),
            },
        ),
        (
            On::Download,
            HubFault::Status {
                code: 500,
                retry_after: None,
            },
        ),
        (On::Download, HubFault::Truncate { after: 200_000 }),
        (On::Download, HubFault::IgnoreRange),
        (On::Download, HubFault::Stall { after: 100_000 }),
        (On::Download, HubFault::WrongBytes),
        (
            On::Download,
            HubFault::Status {
                code: 502,
                retry_after: None,
            },
        ),
    ];
    for (on, fault) in &faults {
        hub.fault(*on, fault.clone());
    }
    let cache = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    names.push("config.json".to_string());
    let spec = FetchSpec {
        repo: "chaos/model".to_string(),
        revision: "main".to_string(),
        files: names.clone().into(),
        cache_dir: cache.path().to_path_buf(),
        endpoint: hub.url(),
        token: None,
        offline: false,
        options: FetchOptions {
            connect_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_millis(500),
            max_attempts: 6,
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(200),
            progress_every: Duration::from_millis(100),
            connections: 8,
        },
    };
    let started = Instant::now();
    let snapshot = fetch::fetch(&spec, &FetchProgress::default())
        .await
        .expect("the fetch rides out every fault");
    for ((_, bytes), path) in files.iter().zip(&snapshot.files) {
        assert_eq!(&std::fs::read(path).unwrap(), bytes);
    }
    assert_eq!(snapshots_verify(cache.path()), names.len());
    let requests = hub.served().len() as u64;
    Row {
        scenario: "5 hub faults",
        load: "one fetch of 4 × 600 kB + a small file".into(),
        faults: "503, 429 + Retry-After, 500, 502, truncated, Range ignored, stalled, wrong bytes"
            .into(),
        sent: 1,
        answered: 1,
        lost: 0,
        restarts: 0,
        notes: format!(
            "{requests} requests to ride out {} faults in {:.1?}; every file verified",
            faults.len(),
            started.elapsed()
        ),
    }
    .report();
}

/// Random tensors: every dtype, shapes with negative, zero and large
/// dimensions, bytes that may not match the shape.
fn any_tensor() -> impl Strategy<Value = WireTensor> {
    let dtypes = prop::sample::select(vec![
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ]);
    let dim = prop_oneof![8 => -2i64..9, 1 => Just(i64::MAX), 1 => Just(1i64 << 40)];
    (
        dtypes,
        prop::collection::vec(dim, 0..4),
        prop::collection::vec(any::<u8>(), 0..160),
    )
        .prop_map(|(dtype, shape, data)| WireTensor { dtype, shape, data })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_answers_and_bad_frames_break_nothing() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_bad_input";
    let node = ServeProcess::start(COOKIE, serving, &[]);
    let client = Arc::new(node.connect(Duration::from_secs(5)).await);
    let handle = tokio::runtime::Handle::current();
    let cases = pick(128, 2000);
    let sent = Arc::new(AtomicU64::new(0));
    let typed = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));

    // Random tensors through the client: a result or a typed error, in time.
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // Mostly random, some well-formed (f32 [n, 4]): both kinds in one stream.
    let valid =
        (1i64..5).prop_map(|n| vec![WireTensor::from_f32(&[n, 4], &vec![0.25; (n * 4) as usize])]);
    let requests = prop_oneof![3 => prop::collection::vec(any_tensor(), 0..3), 1 => valid];
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&requests, |inputs| {
            sent.fetch_add(1, Ordering::SeqCst);
            let call = client.run(inputs, Some(Duration::from_secs(5)));
            let answer = handle.block_on(async {
                tokio::time::timeout(Duration::from_secs(5) + GRACE, call).await
            });
            match answer {
                Ok(Ok(_)) => {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(ClientError::Serving(ServingError::BadInput { .. })))
                | Ok(Err(ClientError::TooLarge { .. })) => {
                    typed.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(other)) => prop_assert!(false, "an untyped or wrong answer: {other:?}"),
                Err(_) => prop_assert!(false, "no answer in time"),
            }
            Ok(())
        })
    });
    outcome.expect("every random request gets a result or a typed error");

    // Random bytes and truncated frames straight to the cluster port.
    let frames = pick(100, 2000);
    let mut seed = 0x1234_5678_9abc_def1_u64;
    for n in 0..frames {
        let mut stream = tokio::net::TcpStream::connect(&node.cluster).await.unwrap();
        let mut bytes = Vec::new();
        for _ in 0..(1 + n % 64) {
            bytes.extend_from_slice(&next_random(&mut seed).to_le_bytes());
        }
        match n % 4 {
            // A length prefix promising more than arrives (a truncated frame).
            0 => bytes.splice(0..8, (1_000u64).to_be_bytes()).for_each(drop),
            // A length far over the frame limit.
            1 => bytes.splice(0..8, u64::MAX.to_be_bytes()).for_each(drop),
            _ => {}
        }
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
    }
    // The node still serves, and stays ready.
    client
        .run(item(), None)
        .await
        .expect("served after all that");
    let status = client.status(None).await.unwrap();
    assert_eq!(status.phase, "ready");
    assert_eq!(status.restarts, 0);
    let total = sent.load(Ordering::SeqCst);
    Row {
        scenario: "6 bad input",
        load: format!("{total} random requests (proptest) + {frames} raw frames"),
        faults: "random dtypes, shapes and bytes; random, truncated and oversized frames".into(),
        sent: total,
        answered: ok.load(Ordering::SeqCst) + typed.load(Ordering::SeqCst),
        lost: 0,
        restarts: status.restarts,
        notes: format!(
            "{} ok, {} typed errors; node ready throughout (fuzz target: `make fuzz`)",
            ok.load(Ordering::SeqCst),
            typed.load(Ordering::SeqCst)
        ),
    }
    .report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_fails_calls_cleanly_and_the_client_recovers_when_it_heals() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_partition";
    let node = ServeProcess::start(COOKIE, serving, &[]);
    let relay = Relay::start(&node.cluster).await;
    let client = Arc::new(connect(COOKIE, serving, &[&relay.addr], Duration::from_secs(2)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = start_load(client.clone(), 8, Duration::from_millis(1500), stop.clone());
    let rounds = pick(1, 5);
    // Per kind of partition: the longest until calls failed, and until served
    // again after healing.
    let mut worst: std::collections::BTreeMap<String, (Duration, Duration)> = Default::default();
    for _ in 0..rounds {
        for link in [Link::Stall, Link::Cut] {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (ok_before, errors_before) = (
                tally.ok.load(Ordering::SeqCst),
                tally.errors.load(Ordering::SeqCst),
            );
            let began = Instant::now();
            relay.set(link);
            let mut noticed = None;
            while began.elapsed() < Duration::from_secs(4) {
                if noticed.is_none() && tally.errors.load(Ordering::SeqCst) > errors_before {
                    noticed = Some(began.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let noticed = noticed.expect("no call failed during the partition");
            // Nothing gets through a partition (calls fail at their deadlines,
            // counted by the load), apart from calls already past the relay.
            let through = tally.ok.load(Ordering::SeqCst) - ok_before;
            assert!(through <= 8, "{through} calls served through a {link:?}");
            relay.set(Link::Flow);
            let back = until_served(&client, Duration::from_secs(30)).await;
            let entry = worst.entry(format!("{link:?}").to_lowercase()).or_default();
            *entry = (entry.0.max(noticed), entry.1.max(back));
        }
    }
    let notes: Vec<String> = worst
        .iter()
        .map(|(link, (noticed, back))| {
            format!(
                "{link}: calls failed from {noticed:.1?} in, served again {back:.1?} after healing"
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load(&stop, tasks).await;
    Row {
        scenario: "7 partitions",
        load: "8 remote callers through a TCP relay, 1.5 s deadlines".into(),
        faults: format!("{rounds} × (4 s stall, then 4 s cut)"),
        sent: tally.sent.load(Ordering::SeqCst),
        answered: tally.answered(),
        lost: tally.lost.load(Ordering::SeqCst),
        restarts: 0,
        notes: format!(
            "{} ok, errors: {}; {} (max over rounds)",
            tally.ok.load(Ordering::SeqCst),
            tally.kinds(),
            notes.join("; ")
        ),
    }
    .report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_and_the_accepted_keep_their_latency() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "chaos_overload";
    // Each batch waits 100 ms for company; 8 items fill the queue.
    let node = ServeProcess::start(
        COOKIE,
        serving,
        &[
            ("HARNESS_MAX_QUEUE", "8"),
            ("HARNESS_MAX_BATCH_SIZE", "64"),
            ("HARNESS_MAX_BATCH_DELAY_MS", "100"),
        ],
    );
    let _client = node.connect(Duration::from_secs(5)).await;
    let serving_ref = remote(serving).await;
    // Raw calls (a client would retry Overloaded until its deadline).
    let call = |serving_ref: ActorRef<ServingMessage>| async move {
        let request = RunRequest {
            version: PROTOCOL_VERSION,
            inputs: item(),
            timeout_ms: 10_000,
        };
        let started = Instant::now();
        let reply = serving_ref
            .call(
                |port| ServingMessage::Run(Payload::new(request), port),
                Some(Duration::from_secs(10) + GRACE),
            )
            .await;
        let answer = match reply {
            Ok(ractor::rpc::CallResult::Success(payload)) => payload.0.ok(),
            _ => None,
        };
        (answer, started.elapsed())
    };
    let burst = |n: usize| all_at_once(n, |_| call(serving_ref.clone()));
    let rounds = pick(3, 20);
    let callers = 40;
    let (mut baseline, mut accepted, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sent, mut answered, mut lost) = (0u64, 0u64, 0u64);
    for _ in 0..rounds {
        // Within the bound: 4 at once.
        for (answer, took) in burst(4).await {
            sent += 1;
            match answer {
                Some(Ok(_)) => {
                    answered += 1;
                    baseline.push(took);
                }
                Some(Err(e)) => panic!("within the bound: {e:?}"),
                None => lost += 1,
            }
        }
        // Five times the bound at once.
        for (answer, took) in burst(callers).await {
            sent += 1;
            match answer {
                Some(Ok(_)) => {
                    answered += 1;
                    accepted.push(took);
                }
                Some(Err(ServingError::Overloaded { .. })) => {
                    answered += 1;
                    refused.push(took);
                }
                Some(Err(e)) => panic!("under overload: {e:?}"),
                None => lost += 1,
            }
        }
    }
    for v in [&mut baseline, &mut accepted, &mut refused] {
        v.sort();
    }
    let p50 = |v: &Vec<Duration>| percentile(v, 0.5);
    let p99 = |v: &Vec<Duration>| percentile(v, 0.99);
    assert!(!refused.is_empty(), "nothing was refused");
    assert!(
        accepted.len() as u64 >= 8 * rounds as u64,
        "too few accepted: {}",
        accepted.len()
    );
    // Refused at once: well before the 100 ms a batch waits.
    assert!(
        p99(&refused) < Duration::from_millis(50),
        "refusals took up to {:?}",
        p99(&refused)
    );
    // The accepted wait as they would without the overload (give or take a batch).
    assert!(
        p50(&accepted) < p50(&baseline) + Duration::from_millis(100),
        "accepted p50 {:?} vs {:?} without overload",
        p50(&accepted),
        p50(&baseline)
    );
    Row {
        scenario: "8 overload",
        load: format!("{rounds} bursts of {callers} raw calls; queue bound 8"),
        faults: "5× the queue bound at once".into(),
        sent,
        answered,
        lost,
        restarts: 0,
        notes: format!(
            "{} accepted (p50 {:.0?}, vs {:.0?} within the bound), {} Overloaded (p99 {:.1?})",
            accepted.len(),
            p50(&accepted),
            p50(&baseline),
            refused.len(),
            p99(&refused)
        ),
    }
    .report();
}
