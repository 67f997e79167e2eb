//! `harness serve` as a process, the one way the tests and benches start a node
//! of their own: [`ServeSettings`] says what it serves and how (the environment an
//! operator would set), [`ServeProcess`] is the running process, on loopback
//! ports, waited for until ready, killed when dropped.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A folder holding the demo model as `model.pt` (inputs `f32[4]`).
pub fn demo_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    harness::engine::demo::save(&dir.path().join("model.pt")).expect("saving the demo model");
    dir
}

/// How many lines of what a process logs after ready [`ServeProcess`] keeps (the
/// last ones).
const LOG_TAIL_LINES: usize = 10_000;

/// The settings of a `harness serve` process: its environment. Every node runs on
/// the CPU with a cookie and `RUST_LOG=info`; the constructors say where its model
/// comes from, and [`ServeSettings::env`] adds or replaces any other setting.
/// Settings inherited from the test's environment that would change the model
/// (`HARNESS_MODEL_DIR`, `HARNESS_MODEL_REPO`, `HF_TOKEN`, `HARNESS_OFFLINE`), or
/// turn on the HTTP inference routes (`HARNESS_API_KEY`), are removed.
#[derive(Clone)]
pub struct ServeSettings {
    envs: Vec<(String, String)>,
    /// The demo model's folder, kept while a process may use it.
    demo: Option<Arc<tempfile::TempDir>>,
}

impl ServeSettings {
    fn base(cookie: &str) -> Self {
        ServeSettings {
            envs: Vec::new(),
            demo: None,
        }
        .env("HARNESS_DEVICE", "cpu")
        .env("HARNESS_COOKIE", cookie)
        .env("RUST_LOG", "info")
    }

    /// The demo model (inputs `f32[4]`) in a folder of its own, warming up with
    /// `f32[4]`, as the serving `default`.
    pub fn demo(cookie: &str) -> Self {
        let dir = demo_model_dir();
        let mut settings = Self::model_dir(cookie, dir.path());
        settings.demo = Some(Arc::new(dir));
        settings
    }

    /// The model in `dir` (the caller keeps the folder), warming up with `f32[4]`,
    /// as the serving `default`.
    pub fn model_dir(cookie: &str, dir: &Path) -> Self {
        Self::base(cookie)
            .env("HARNESS_MODEL_DIR", dir.display())
            .env("HARNESS_WARMUP_INPUTS", "f32[4]")
    }

    /// The model `repo` fetched from `hub_url` (a test hub) into the cache `cache`,
    /// as the serving `default`.
    pub fn from_hub(cookie: &str, hub_url: &str, repo: &str, cache: &Path) -> Self {
        Self::base(cookie)
            .env("HF_ENDPOINT", hub_url)
            .env("HARNESS_MODEL_REPO", repo)
            .env("HARNESS_CACHE_DIR", cache.display())
    }

    /// Names the serving (`HARNESS_SERVING_NAME`). Each test names its own:
    /// process groups are process-wide, and the tests' clients share a process.
    pub fn serving(self, name: &str) -> Self {
        self.env("HARNESS_SERVING_NAME", name)
    }

    /// Sets `key` to `value`, in place of any value it had.
    pub fn env(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets each of `extra`, as [`ServeSettings::env`].
    pub fn envs(self, extra: &[(&str, &str)]) -> Self {
        extra.iter().fold(self, |s, (k, v)| s.env(k, v))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.envs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The `harness serve` command with these settings, the cluster on a free
    /// loopback port and HTTP on any, unless the settings name them; for a test
    /// that runs it its own way. Most start it with [`ServeSettings::start`].
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
        cmd.arg("serve");
        for inherited in [
            "HARNESS_MODEL_DIR",
            "HARNESS_MODEL_REPO",
            "HF_TOKEN",
            "HARNESS_OFFLINE",
            "HARNESS_API_KEY",
        ] {
            cmd.env_remove(inherited);
        }
        cmd.env("HARNESS_CLUSTER_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("HARNESS_HTTP_ADDR", "127.0.0.1:0")
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the node on loopback (the cluster and HTTP on free ports unless the
    /// settings name them) and waits until its serving is ready.
    pub fn start(self) -> ServeProcess {
        let cluster = self
            .get("HARNESS_CLUSTER_ADDR")
            .map_or_else(|| format!("127.0.0.1:{}", free_port()), str::to_string);
        let http = self
            .get("HARNESS_HTTP_ADDR")
            .map_or_else(free_port, |addr| {
                addr.rsplit(':').next().unwrap().parse().unwrap()
            });
        let settings = self
            .env("HARNESS_CLUSTER_ADDR", &cluster)
            .env("HARNESS_HTTP_ADDR", format!("127.0.0.1:{http}"));
        let (child, startup_log, log) = settings.spawn();
        ServeProcess {
            child,
            cluster,
            http,
            startup_log,
            log,
            settings,
        }
    }

    fn spawn(&self) -> (Child, String, LogTail) {
        let mut child = self
            .command()
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting harness serve");
        let (startup_log, log) = wait_until_ready(&mut child);
        (child, startup_log, log)
    }
}

/// What a process logs after ready: its last [`LOG_TAIL_LINES`] lines, kept by a
/// thread that drains its stderr (so the child never blocks on a full pipe) until
/// the pipe closes.
struct LogTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    reader: Option<JoinHandle<()>>,
}

/// Reads a `harness serve` child's stderr (piped) until its serving is ready and
/// asserts it became ready; the log up to there, and the rest as it comes.
fn wait_until_ready(child: &mut Child) -> (String, LogTail) {
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log += &line;
        log += "\n";
        if line.contains(" is ready") || line.contains(" is failed") {
            break;
        }
    }
    assert!(log.contains(" is ready"), "{log}");
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let kept = tail.clone();
    let reader = std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let mut tail = kept.lock().unwrap();
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
    let tail = LogTail {
        lines: tail,
        reader: Some(reader),
    };
    (log, tail)
}

/// A running `harness serve` process, ready, on loopback; a test can kill it
/// (SIGKILL) and start it again on the same ports, as a platform would. Dropping it
/// kills it.
pub struct ServeProcess {
    pub child: Child,
    /// `127.0.0.1:<port>` of the cluster listener.
    pub cluster: String,
    /// The HTTP port (health, status, metrics).
    pub http: u16,
    /// What the process logged up to ready.
    pub startup_log: String,
    log: LogTail,
    settings: ServeSettings,
}

impl ServeProcess {
    /// The demo model with `cookie`, as the serving `serving`, with `extra`
    /// settings: [`ServeSettings::demo`] started.
    pub fn start(cookie: &str, serving: &str, extra: &[(&str, &str)]) -> ServeProcess {
        ServeSettings::demo(cookie)
            .serving(serving)
            .envs(extra)
            .start()
    }

    /// A client of this node's serving, with its cookie, and `deadline` for calls
    /// that give none ([`super::client::connect`]).
    pub async fn connect(&self, deadline: Duration) -> harness_client::HarnessClient {
        let cookie = self.settings.get("HARNESS_COOKIE").unwrap_or_default();
        let serving = self
            .settings
            .get("HARNESS_SERVING_NAME")
            .unwrap_or("default");
        super::client::connect(cookie, serving, &[&self.cluster], deadline).await
    }

    /// `127.0.0.1:<port>` of the HTTP listener.
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http)
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the node drains and exits by itself.
    pub fn terminate(&self) {
        // SAFETY: signalling our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
    }

    /// Starts the node again on the same ports and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        let (child, startup_log, log) = self.settings.spawn();
        self.child = child;
        self.startup_log = startup_log;
        self.log = log;
    }

    /// Waits for the process to exit by itself, at most `within`; its status and
    /// how long that took.
    pub fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < within, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process has logged so far (since its last start): up to ready,
    /// then its last [`LOG_TAIL_LINES`] lines.
    pub fn log(&self) -> String {
        let mut log = self.startup_log.clone();
        for line in self.log.lines.lock().unwrap().iter() {
            log += line;
            log += "\n";
        }
        log
    }

    /// The whole log of a process that has exited, once all it wrote is read
    /// ([`ServeProcess::log`]).
    pub fn exited_log(&mut self) -> String {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the process is still running"
        );
        if let Some(reader) = self.log.reader.take() {
            reader.join().expect("the log reader");
        }
        self.log()
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// The most resident memory the process has had since it started (the
    /// kernel's `VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The resident memory of process `pid` now (the kernel's `VmRSS`), in KiB; 0
/// if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
