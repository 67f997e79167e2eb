//! `make bench`: `harness fetch` of a model's weights from the local test hub,
//! against the clients people use today, side by side in one run. Two repos of the
//! same size (`HARNESS_BENCH_BYTES`, default 2 GiB): one `model.safetensors` (the
//! shape of TinyLlama and other small models), and the same bytes' worth in 3
//! shards.
//!
//! - (a) Each TCP connection capped at 50 MiB/s, as a CDN does: against
//!   `huggingface_hub`'s `snapshot_download` (`benches/snapshot_download.py`, the
//!   project's venv, 8 workers: one connection per file). Aim: at least 4× faster
//!   on the one-file repo.
//! - (b) No cap: against `curl` fetching the same files one after another, then
//!   `sync` of them. Aim: a ratio of at least 0.9.
//!
//! Also the peak RSS of `harness fetch` above the same process fetching nothing
//! (a cached pinned-commit fetch), and of the Python process for information.
//!
//! Knobs: `HARNESS_BENCH_BYTES` (per repo), `HARNESS_BENCH_ROUNDS` (default 3),
//! `HARNESS_BENCH_CAPPED_ROUNDS` (part (a)'s rounds, default the same: Python
//! takes ~41 s a round on the one-file repo), `HARNESS_BENCH_CAP` (bytes per second
//! per connection in part (a), default 50 MiB/s). `HARNESS_DOWNLOAD_CONNECTIONS`
//! is passed on to `harness fetch` when set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::hub::{content, TestHub};
use support::measure::{env_or, percentile, print_table_head};
use support::python::torch_python;

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

fn median(xs: &[Duration]) -> Duration {
    let mut xs = xs.to_vec();
    xs.sort();
    percentile(&xs, 0.5)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One repo published on the test hub.
struct BenchRepo {
    /// How the tables name it.
    label: String,
    id: &'static str,
    commit: String,
    /// Its files (all of them: `snapshot_download` takes the whole repo), with
    /// their sizes.
    files: Vec<(String, u64)>,
}

impl BenchRepo {
    /// Publishes `id` holding `sizes.len()` LFS files named by `name(i)`.
    fn publish(
        hub: &TestHub,
        id: &'static str,
        label: &str,
        sizes: &[usize],
        name: impl Fn(usize) -> String,
    ) -> Self {
        let started = Instant::now();
        let files: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| (name(i), content(len, 42 + i as u64)))
            .collect();
        let made = started.elapsed();
        let entries: Vec<(&str, &[u8], bool)> = files
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_slice(), true))
            .collect();
        let commit = hub.commit(id, "main", &entries);
        eprintln!(
            "published {id}: {} file(s), {:.0} MiB (content {made:.2?}, publishing {:.2?})",
            files.len(),
            mib(sizes.iter().sum::<usize>() as u64),
            started.elapsed() - made
        );
        BenchRepo {
            label: label.to_string(),
            id,
            commit,
            files: files
                .iter()
                .map(|(n, c)| (n.clone(), c.len() as u64))
                .collect(),
        }
    }

    fn names(&self) -> Vec<&str> {
        self.files.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }

    /// Asserts that `paths` are exactly this repo's files, each of its size.
    fn check(&self, paths: &[PathBuf], who: &str) {
        let got: BTreeMap<String, u64> = paths
            .iter()
            .map(|p| {
                let len = std::fs::metadata(p)
                    .unwrap_or_else(|e| panic!("{who}: {}: {e}", p.display()))
                    .len();
                (p.file_name().unwrap().to_string_lossy().into_owned(), len)
            })
            .collect();
        let want: BTreeMap<String, u64> = self.files.iter().cloned().collect();
        assert_eq!(got, want, "{who} fetched {}'s files whole", self.id);
    }

    /// Asserts that `dir` holds this repo's files, each of its size.
    fn check_dir(&self, dir: &Path, who: &str) {
        let paths: Vec<PathBuf> = self.files.iter().map(|(n, _)| dir.join(n)).collect();
        self.check(&paths, who);
    }
}

/// The commands under test, all against one hub.
struct Tools<'a> {
    hub: &'a TestHub,
    python: PathBuf,
    script: PathBuf,
    work: PathBuf,
}

impl Tools<'_> {
    /// `harness fetch` of `repo`'s files at `revision` into `cache`, its stdout
    /// (the files' paths) into `out`.
    fn harness(&self, repo: &BenchRepo, revision: &str, cache: &Path, out: &Path) -> Command {
        let mut cmd = self.hub.fetch_command(cache, repo.id, &repo.names());
        cmd.env("HARNESS_MODEL_REVISION", revision)
            .env("RUST_LOG", "warn")
            .stdout(File::create(out).unwrap());
        cmd
    }

    /// `snapshot_download` of `repo` at `revision` into `cache` (8 workers), its
    /// stdout (the snapshot folder) into `out`.
    fn python(&self, repo: &BenchRepo, revision: &str, cache: &Path, out: &Path) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .args([repo.id, revision])
            .arg(cache)
            .arg("8")
            .env("HF_ENDPOINT", self.hub.url())
            .env("HF_HOME", cache.join("hf-home"))
            .env("PYTHONWARNINGS", "ignore")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .stdout(File::create(out).unwrap());
        cmd
    }

    /// `curl -sSfL -o FILE URL` for each file, one after another, into `dir`;
    /// then `sync` of them all when `sync`.
    fn curl(&self, repo: &BenchRepo, dir: &Path, sync: bool) -> Command {
        let script = if sync {
            r#"dir=$1 base=$2; shift 2; for f; do curl -sSfL -o "$dir/$f" "$base/$f" || exit 1; done; cd "$dir" && sync "$@""#
        } else {
            r#"dir=$1 base=$2; shift 2; for f; do curl -sSfL -o "$dir/$f" "$base/$f" || exit 1; done"#
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(dir)
            .arg(format!("{}/{}/resolve/main", self.hub.url(), repo.id))
            .args(repo.names())
            .stdout(Stdio::null());
        cmd
    }

    /// A fresh, empty folder under the work folder.
    fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// One `harness fetch` of `repo` into an empty cache, then the same process
    /// fetching nothing (the pinned commit, cached).
    fn harness_round(&self, repo: &BenchRepo, runs: &mut Runs) {
        let cache = self.fresh("harness-cache");
        let out = self.work.join("harness.out");
        let (t, rss) = measure(self.harness(repo, "main", &cache, &out));
        let paths: Vec<PathBuf> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(PathBuf::from)
            .collect();
        repo.check(&paths, "harness fetch");
        let (idle, idle_rss) = measure(self.harness(repo, &repo.commit, &cache, &out));
        std::fs::remove_dir_all(&cache).unwrap();
        eprintln!(
            "  harness fetch {:>14}: {t:.2?} (idle run {idle:.2?}), peak RSS {:.1} MiB (idle {:.1} MiB)",
            repo.label,
            mib(rss),
            mib(idle_rss)
        );
        runs.ours.push(t);
        runs.ours_idle.push(idle);
        runs.ours_rss = runs.ours_rss.max(rss);
        runs.ours_idle_rss = runs.ours_idle_rss.max(idle_rss);
    }

    /// One `snapshot_download` of `repo` into an empty cache, then again at the
    /// pinned commit, cached: Python's start-up, the imports and one API call.
    fn python_round(&self, repo: &BenchRepo, runs: &mut Runs) {
        let cache = self.fresh("python-cache");
        let out = self.work.join("python.out");
        let (t, rss) = measure(self.python(repo, "main", &cache, &out));
        let folder = std::fs::read_to_string(&out).unwrap();
        let folder = PathBuf::from(folder.lines().last().unwrap_or_default());
        repo.check_dir(&folder, "snapshot_download");
        let (idle, idle_rss) = measure(self.python(repo, &repo.commit, &cache, &out));
        std::fs::remove_dir_all(&cache).unwrap();
        eprintln!(
            "  snapshot_download {:>10}: {t:.2?} (idle run {idle:.2?}), peak RSS {:.1} MiB (idle {:.1} MiB)",
            repo.label,
            mib(rss),
            mib(idle_rss)
        );
        runs.base.push(t);
        runs.base_idle.push(idle);
        runs.base_rss = runs.base_rss.max(rss);
        runs.base_idle_rss = runs.base_idle_rss.max(idle_rss);
    }

    /// `curl` of `repo`'s files one after another then `sync`, and `curl` alone.
    fn curl_round(&self, repo: &BenchRepo, runs: &mut Runs) {
        let dir = self.fresh("curl");
        let (cs, _) = measure(self.curl(repo, &dir, true));
        repo.check_dir(&dir, "curl");
        let dir = self.fresh("curl");
        let (c, _) = measure(self.curl(repo, &dir, false));
        repo.check_dir(&dir, "curl");
        std::fs::remove_dir_all(&dir).unwrap();
        eprintln!("  curl {:>23}: {c:.2?}, curl + sync {cs:.2?}", repo.label);
        runs.base.push(cs);
        runs.base_unsynced.push(c);
    }
}

/// One part's samples for one repo: harness' and the baseline's.
#[derive(Default)]
struct Runs {
    ours: Vec<Duration>,
    ours_idle: Vec<Duration>,
    ours_rss: u64,
    ours_idle_rss: u64,
    base: Vec<Duration>,
    /// Python: the same script with nothing to download.
    base_idle: Vec<Duration>,
    /// curl without the `sync`.
    base_unsynced: Vec<Duration>,
    base_rss: u64,
    base_idle_rss: u64,
}

fn rate(bytes: u64, d: Duration) -> String {
    format!("{d:.2?} ({:.0} MiB/s)", mib(bytes) / d.as_secs_f64())
}

fn ratio(base: Duration, ours: Duration) -> String {
    format!("{:.2}", base.as_secs_f64() / ours.as_secs_f64())
}

fn main() {
    let bytes = env_or("HARNESS_BENCH_BYTES", 2 << 30) as usize;
    let rounds = env_or("HARNESS_BENCH_ROUNDS", 3).max(1) as usize;
    let capped_rounds = env_or("HARNESS_BENCH_CAPPED_ROUNDS", rounds as u64).max(1) as usize;
    let cap = env_or("HARNESS_BENCH_CAP", 50 << 20);
    let connections =
        std::env::var("HARNESS_DOWNLOAD_CONNECTIONS").unwrap_or_else(|_| "8 (default)".into());
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hub = runtime.block_on(TestHub::start());

    let third = bytes / 3;
    let repos = [
        BenchRepo::publish(&hub, "bench/one-file", "one file", &[bytes], |_| {
            "model.safetensors".to_string()
        }),
        BenchRepo::publish(
            &hub,
            "bench/three-shards",
            "3 shards",
            &[third, third, bytes - 2 * third],
            |i| format!("model-{:05}-of-00003.safetensors", i + 1),
        ),
    ];

    let work = tempfile::tempdir().unwrap();
    let tools = Tools {
        hub: &hub,
        python: torch_python(),
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/snapshot_download.py"),
        work: work.path().to_path_buf(),
    };

    // (a) 50 MiB/s per connection: harness fetch against snapshot_download.
    hub.set_connection_rate(Some(cap));
    let mut capped: Vec<Runs> = repos.iter().map(|_| Runs::default()).collect();
    for round in 1..=capped_rounds {
        eprintln!(
            "(a) {:.0} MiB/s per connection, round {round} of {capped_rounds}",
            mib(cap)
        );
        for (repo, runs) in repos.iter().zip(&mut capped) {
            tools.harness_round(repo, runs);
            tools.python_round(repo, runs);
        }
    }

    // (b) No cap: harness fetch against curl one file after another, then sync.
    hub.set_connection_rate(None);
    let mut uncapped: Vec<Runs> = repos.iter().map(|_| Runs::default()).collect();
    for round in 1..=rounds {
        eprintln!("(b) no cap, round {round} of {rounds}");
        for (repo, runs) in repos.iter().zip(&mut uncapped) {
            tools.harness_round(repo, runs);
            tools.curl_round(repo, runs);
        }
    }
    eprintln!("bench took {:.0?}", started.elapsed());

    // The report: Markdown for BENCHMARKS.md.
    println!(
        "Command: HARNESS_BENCH_BYTES={bytes} HARNESS_BENCH_ROUNDS={rounds} HARNESS_BENCH_CAPPED_ROUNDS={capped_rounds} HARNESS_BENCH_CAP={cap} cargo bench --bench fetch"
    );
    println!();
    println!(
        "- harness: `HF_ENDPOINT=<hub> HARNESS_MODEL_REPO=<repo> HARNESS_MODEL_FILES=<the files> HARNESS_CACHE_DIR=<empty> HARNESS_DOWNLOAD_CONNECTIONS={connections} harness fetch`; start-up: the same at the pinned commit, cached"
    );
    println!(
        "- Python: `HF_ENDPOINT=<hub> {} benches/snapshot_download.py <repo> main <empty cache> 8` (huggingface_hub's snapshot_download, 8 workers); start-up: the same at the pinned commit, cached (imports, one API call)",
        tools.python.display()
    );
    println!(
        "- curl: `curl -sSfL -o FILE <hub>/<repo>/resolve/main/FILE` per file, one after another, then `sync FILE...`"
    );
    println!(
        "- repos: {}",
        repos
            .iter()
            .map(|r| format!(
                "{} ({})",
                r.id,
                r.files
                    .iter()
                    .map(|(n, s)| format!("{n} {s} B"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!();

    print_table_head(
        &format!(
            "(a) {:.0} MiB per repo, each connection capped at {:.0} MiB/s, median of {capped_rounds} round(s); ratio = snapshot_download time / harness time (aim: at least 4 on one file)",
            mib(bytes as u64),
            mib(cap)
        ),
        &["repo", "harness fetch", "snapshot_download", "ratio"],
    );
    for (repo, runs) in repos.iter().zip(&capped) {
        let n = repo.bytes();
        let (h, hi) = (median(&runs.ours), median(&runs.ours_idle));
        let (p, pi) = (median(&runs.base), median(&runs.base_idle));
        let (ht, pt) = (h.saturating_sub(hi), p.saturating_sub(pi));
        println!(
            "| {} | whole process: {} | whole process: {} | {} |",
            repo.label,
            rate(n, h),
            rate(n, p),
            ratio(p, h)
        );
        println!(
            "| {} | less {hi:.2?} of start-up: {} | less {pi:.2?} of start-up: {} | {} |",
            repo.label,
            rate(n, ht),
            rate(n, pt),
            ratio(pt, ht)
        );
    }
    println!();

    print_table_head(
        &format!(
            "(b) {:.0} MiB per repo, no cap, median of {rounds} round(s); ratio = curl time / harness time (aim: at least 0.9)",
            mib(bytes as u64)
        ),
        &["repo", "harness fetch", "baseline", "ratio"],
    );
    for (repo, runs) in repos.iter().zip(&uncapped) {
        let n = repo.bytes();
        let (h, hi) = (median(&runs.ours), median(&runs.ours_idle));
        let ht = h.saturating_sub(hi);
        let (cs, c) = (median(&runs.base), median(&runs.base_unsynced));
        println!(
            "| {} | whole process: {} | curl + sync: {} | {} |",
            repo.label,
            rate(n, h),
            rate(n, cs),
            ratio(cs, h)
        );
        println!(
            "| {} | less {hi:.2?} of start-up: {} | curl + sync: {} | {} |",
            repo.label,
            rate(n, ht),
            rate(n, cs),
            ratio(cs, ht)
        );
        println!(
            "| {} | whole process: {} | curl, no sync: {} | {} |",
            repo.label,
            rate(n, h),
            rate(n, c),
            ratio(c, h)
        );
    }
    println!();

    print_table_head(
        "Peak RSS (VmHWM, sampled every 5 ms; the highest of the rounds). Idle: the same process at the pinned commit, cached",
        &[
            "part",
            "repo",
            "harness fetch",
            "above harness idle",
            "snapshot_download (idle)",
        ],
    );
    for (part, all) in [("(a) capped", &capped), ("(b) no cap", &uncapped)] {
        for (repo, runs) in repos.iter().zip(all.iter()) {
            let python = if runs.base_rss > 0 {
                format!(
                    "{:.1} MiB ({:.1} MiB)",
                    mib(runs.base_rss),
                    mib(runs.base_idle_rss)
                )
            } else {
                "-".to_string()
            };
            println!(
                "| {part} | {} | {:.1} MiB | **{:.1} MiB** (idle {:.1} MiB) | {python} |",
                repo.label,
                mib(runs.ours_rss),
                mib(runs.ours_rss.saturating_sub(runs.ours_idle_rss)),
                mib(runs.ours_idle_rss)
            );
        }
    }
}
