//! `harness serve` as a process: it gives up with its exit code after too many
//! restarts, and drains and exits 0 on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::node::free_port;

fn serve(model_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
    cmd.arg("serve")
        .env("HARNESS_MODEL_DIR", model_dir)
        .env("HARNESS_DEVICE", "cpu")
        .env("HARNESS_WARMUP_INPUTS", "f32[4]")
        .env("HARNESS_HTTP_ADDR", "127.0.0.1:0")
        .env("HARNESS_COOKIE", "test-cookie")
        .env("HARNESS_CLUSTER_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "info")
        .env_remove("HARNESS_MODEL_REPO");
    cmd
}

#[test]
fn too_many_restarts_end_the_process_with_exit_code_3() {
    let dir = support::node::demo_model_dir();
    // Warm-up inputs the model cannot take: every warm-up forward fails, a failure
    // a restart might fix (as memory or a device could), so it is retried.
    let started = Instant::now();
    let out = serve(dir.path())
        .env("HARNESS_WARMUP_INPUTS", "f32[5]")
        .env("HARNESS_MAX_RESTARTS", "2")
        .env("HARNESS_RESTART_WINDOW_S", "60")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(harness::supervisor::EXIT_TOO_MANY_RESTARTS),
        "{stderr}"
    );
    assert_eq!(stderr.matches("restarting it in").count(), 2, "{stderr}");
    assert!(
        stderr.contains("restarting it in 100ms") && stderr.contains("restarting it in 200ms"),
        "backoff: {stderr}"
    );
    assert!(stderr.contains("giving up with exit code 3"), "{stderr}");
    assert!(
        stderr.contains("the warm-up forward failed"),
        "the reason is logged: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_failure_no_restart_fixes_ends_the_process_at_once_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    // A model file that never loads, however often it is tried.
    std::fs::write(dir.path().join("model.pt"), b"not a model").unwrap();
    let out = serve(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(harness::supervisor::EXIT_NO_RESTART_HELPS),
        "{stderr}"
    );
    assert!(!stderr.contains("restarting it in"), "{stderr}");
    assert!(
        stderr.contains("a restart will not help") && stderr.contains("is not a TorchScript model"),
        "{stderr}"
    );
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = support::node::demo_model_dir();
    let mut child = serve(dir.path()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("serving default is ready") {
            break;
        }
    }
    assert!(log.contains("is ready"), "{log}");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
}
