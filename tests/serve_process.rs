//! `harness serve` as a process: it gives up with its exit code after too many
//! restarts, stops at once on a failure no restart fixes, and drains and exits 0
//! on SIGTERM.

mod support;

use std::time::{Duration, Instant};
use support::node::ServeSettings;

const COOKIE: &str = "test-cookie";

#[test]
fn too_many_restarts_end_the_process_with_exit_code_3() {
    let dir = support::node::demo_model_dir();
    // Warm-up inputs the model cannot take: every warm-up forward fails, a failure
    // a restart might fix (as memory or a device could), so it is retried.
    let started = Instant::now();
    let out = ServeSettings::model_dir(COOKIE, dir.path())
        .env("HARNESS_WARMUP_INPUTS", "f32[5]")
        .env("HARNESS_MAX_RESTARTS", "2")
        .env("HARNESS_RESTART_WINDOW_S", "60")
        .command()
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
    let out = ServeSettings::model_dir(COOKIE, dir.path())
        .command()
        .output()
        .unwrap();
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
    // Started and waited for until its serving is ready.
    let mut node = ServeSettings::demo(COOKIE).start();
    node.terminate();
    let status = node.child.wait().unwrap();
    let log = node.exited_log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
}
