//! `make bench`: `harness fetch` of a 1 GiB LFS file from the local test hub,
//! against `curl` downloading the same file from the same server, side by side.
//! Reports the throughput ratio (curl time / harness time; aim: at least 0.8) and
//! the peak RSS of `harness fetch` (aim: under 100 MB: it streams).
//!
//! `HARNESS_BENCH_BYTES` and `HARNESS_BENCH_ROUNDS` change the size and the rounds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::hub::{content, TestHub};
use support::measure::{env_or, percentile, print_table_head};

const REPO: &str = "bench/one-gib";

/// Runs `cmd` to completion and returns its wall time and peak RSS in bytes.
///
/// The peak is the kernel's high-water mark (`VmHWM`), sampled every 5 ms until
/// the process exits: `wait4`'s `ru_maxrss` cannot be used, because a child
/// spawned with vfork is charged the parent's resident set at exec (and this
/// parent holds the whole file in memory, to serve it).
fn measure(mut cmd: Command) -> (Duration, u64) {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawning");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Some(hwm) = std::fs::read_to_string(&status_path)
            .ok()
            .as_deref()
            .and_then(vm_hwm)
        {
            peak = peak.max(hwm);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    assert!(status.success(), "{cmd:?} failed: {status}");
    (elapsed, peak)
}

/// `VmHWM:     1234 kB` → bytes.
fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    percentile(&xs, 0.5)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let bytes = env_or("HARNESS_BENCH_BYTES", 1 << 30) as usize;
    let rounds = env_or("HARNESS_BENCH_ROUNDS", 3).max(1) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let test_hub = runtime.block_on(TestHub::start());
    eprintln!("preparing {:.0} MiB of content...", mib(bytes as u64));
    let model = content(bytes, 42);
    let commit = test_hub.commit(REPO, "main", &[("model.bin", &model, true)]);
    drop(model);
    let url = format!("{}/{REPO}/resolve/main/model.bin", test_hub.url());

    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let harness = |revision: &str| {
        let mut cmd = test_hub.fetch_command(&cache, REPO, &["model.bin"]);
        cmd.env("HARNESS_MODEL_REVISION", revision)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        cmd
    };
    let mut runs = Runs::default();
    for round in 1..=rounds {
        // harness fetch: download, sha256-verify, sync, link into the cache.
        let (t, rss) = measure(harness("main"));
        // The same process with nothing to download (a cached pinned commit): its
        // start-up (mostly loading libtorch) and what it holds before any transfer.
        let (idle, idle_rss) = measure(harness(&commit));
        std::fs::remove_dir_all(&cache).unwrap();

        // curl: the same bytes from the same server to the same disk, following
        // the CDN redirect, no verification; then again made durable with
        // `sync FILE`, as harness makes every blob durable before naming it.
        let out = work.path().join("curl.bin");
        let mut curl = Command::new("curl");
        curl.args(["-sSfL", "-o"]).arg(&out).arg(&url);
        let (c, _) = measure(curl);
        check_size(&out, bytes as u64);
        std::fs::remove_file(&out).unwrap();
        let mut curl_sync = Command::new("sh");
        curl_sync
            .arg("-c")
            .arg(r#"curl -sSfL -o "$1" "$2" && sync "$1""#)
            .arg("sh")
            .arg(&out)
            .arg(&url);
        let (cs, _) = measure(curl_sync);
        check_size(&out, bytes as u64);
        std::fs::remove_file(&out).unwrap();

        eprintln!("round {round}: harness {t:.2?} (idle run {idle:.2?}, peak RSS {:.1} MiB), curl {c:.2?}, curl + sync {cs:.2?}", mib(rss));
        runs.harness.push(t);
        runs.idle.push(idle);
        runs.curl.push(c);
        runs.curl_sync.push(cs);
        runs.peak_rss = runs.peak_rss.max(rss);
        runs.idle_rss = runs.idle_rss.max(idle_rss);
    }
    runs.report(bytes as u64, rounds);
}

#[derive(Default)]
struct Runs {
    harness: Vec<Duration>,
    idle: Vec<Duration>,
    curl: Vec<Duration>,
    curl_sync: Vec<Duration>,
    peak_rss: u64,
    idle_rss: u64,
}

impl Runs {
    /// Markdown rows for BENCHMARKS.md.
    fn report(self, bytes: u64, rounds: usize) {
        let (h, idle) = (median(self.harness), median(self.idle));
        let (c, cs) = (median(self.curl), median(self.curl_sync));
        // The transfer alone: the whole run less the same process fetching nothing.
        let transfer = h.saturating_sub(idle);
        let rate = |d: Duration| format!("{d:.2?} ({:.0} MiB/s)", mib(bytes) / d.as_secs_f64());
        let ratio = |base: Duration, ours: Duration| {
            format!("{:.2}", base.as_secs_f64() / ours.as_secs_f64())
        };
        print_table_head(
            &format!("{:.0} MiB from the local test hub, median of {rounds} rounds; ratio = baseline time / harness time (1.0 = as fast)", mib(bytes)),
            &["harness fetch", "baseline", "ratio"],
        );
        println!(
            "| whole process: {} | curl + sync: {} | {} |",
            rate(h),
            rate(cs),
            ratio(cs, h)
        );
        println!(
            "| whole process: {} | curl: {} | {} |",
            rate(h),
            rate(c),
            ratio(c, h)
        );
        println!(
            "| transfer (less {idle:.2?} of start-up): {} | curl + sync: {} | {} |",
            rate(transfer),
            rate(cs),
            ratio(cs, transfer)
        );
        println!(
            "| transfer (less {idle:.2?} of start-up): {} | curl: {} | {} |",
            rate(transfer),
            rate(c),
            ratio(c, transfer)
        );
        println!();
        println!(
            "Peak RSS of harness fetch: {:.1} MiB, {:.1} MiB above the {:.1} MiB of the same process fetching nothing.",
            mib(self.peak_rss),
            mib(self.peak_rss.saturating_sub(self.idle_rss)),
            mib(self.idle_rss)
        );
    }
}

fn check_size(path: &Path, bytes: u64) {
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        bytes,
        "curl got the whole file"
    );
}
