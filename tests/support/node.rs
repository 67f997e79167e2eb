//! Helpers for tests that run a node: its configuration, parsed from the same
//! command line an operator would write, and loopback ports.

use super::hub::TestHub;

/// The node's settings: the Hub at `hub`, repo `repo`, cache `cache`, on the CPU
/// unless `extra` names a device, warming up with `f32[4]`, HTTP on a free
/// loopback port. Each test names its serving: process groups are process-wide.
pub fn config(
    name: &str,
    repo: &str,
    hub: &TestHub,
    cache: &std::path::Path,
    extra: &[&str],
) -> harness::config::Config {
    let mut args = vec![
        "harness".to_string(),
        format!("--hf-endpoint={}", hub.url()),
        format!("--model-repo={repo}"),
        format!("--cache-dir={}", cache.display()),
        "--warmup-inputs=f32[4]".to_string(),
        format!("--serving-name={name}"),
        "--http-addr=127.0.0.1:0".to_string(),
    ];
    if !extra.iter().any(|a| a.starts_with("--device")) {
        args.push("--device=cpu".to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    harness::cli::server_config(args).expect("arguments")
}

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

/// Asks a serving (local or remote) to crash; the answer says whether it agreed.
pub async fn inject_crash(
    serving: &ractor::ActorRef<harness_client::ServingMessage>,
) -> Result<(), harness_client::ServingError> {
    use harness_client::{Fault, FaultRequest, Payload, ServingMessage, PROTOCOL_VERSION};
    let crash = FaultRequest {
        version: PROTOCOL_VERSION,
        fault: Fault::Crash,
    };
    let reply = serving
        .call(
            |port| ServingMessage::Inject(Payload::new(crash), port),
            Some(std::time::Duration::from_secs(10)),
        )
        .await
        .expect("the serving takes the request")
        .expect("an answer in time");
    reply.0.expect("the answer decodes")
}

/// Reads a `harness serve` child's stderr (piped) until its serving is ready,
/// asserts it became ready, and keeps draining the rest on a thread so the child
/// never blocks on a full pipe. Returns the log up to ready.
pub fn until_ready(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
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
    std::thread::spawn(move || lines.for_each(drop));
    log
}

/// A `harness serve` process of the demo model on loopback, which a test can kill
/// (SIGKILL) and start again on the same ports, as a platform would.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `127.0.0.1:<port>` of the cluster listener.
    pub cluster: String,
    pub http: u16,
    envs: Vec<(String, String)>,
    model: std::sync::Arc<tempfile::TempDir>,
}

impl ServeProcess {
    /// Starts a node with `cookie`, the serving `serving`, and `extra` settings,
    /// and waits until it is ready.
    pub fn start(cookie: &str, serving: &str, extra: &[(&str, &str)]) -> ServeProcess {
        let mut envs: Vec<(String, String)> = [
            ("HARNESS_DEVICE", "cpu"),
            ("HARNESS_WARMUP_INPUTS", "f32[4]"),
            ("HARNESS_COOKIE", cookie),
            ("HARNESS_SERVING_NAME", serving),
            ("RUST_LOG", "info"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let model = std::sync::Arc::new(demo_model_dir());
        let cluster = format!("127.0.0.1:{}", free_port());
        let http = free_port();
        let child = Self::spawn(&envs, &model, &cluster, http);
        ServeProcess {
            child,
            cluster,
            http,
            envs,
            model,
        }
    }

    fn spawn(
        envs: &[(String, String)],
        model: &tempfile::TempDir,
        cluster: &str,
        http: u16,
    ) -> std::process::Child {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_harness"))
            .arg("serve")
            .env("HARNESS_MODEL_DIR", model.path())
            .env("HARNESS_CLUSTER_ADDR", cluster)
            .env("HARNESS_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting harness serve");
        until_ready(&mut child);
        child
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again on the same ports and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.envs, &self.model, &self.cluster, self.http);
    }

    /// Waits for the process to exit by itself, at most `within`; its status and
    /// how long that took.
    pub fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> (std::process::ExitStatus, std::time::Duration) {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < within, "still running after {within:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
