//! The `harness` binary as an operator runs it.

use std::process::{Command, Output};

fn harness(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harness"));
    cmd.args(args)
        .env_remove("HARNESS_DEVICE")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running harness")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn gpu_check_json_tells_the_truth_and_exits_accordingly() {
    let out = harness(&["gpu-check", "--json"], &[]);
    let facts: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("gpu-check --json prints JSON");
    let usable = tch::Cuda::is_available();
    assert_eq!(facts["cuda_available"], usable);
    assert_eq!(
        facts["cudart_linked"], true,
        "the CUDA runtime is linked into the binary"
    );
    assert!(
        facts["libtorch_version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0"),
        "{facts}"
    );
    assert_eq!(
        facts["device_count"].as_u64().unwrap() as i64,
        if usable { tch::Cuda::device_count() } else { 0 }
    );
    assert_eq!(
        facts["devices"].as_array().unwrap().len() as u64,
        facts["device_count"].as_u64().unwrap()
    );
    assert_eq!(
        out.status.code(),
        Some(if usable { 0 } else { 1 }),
        "exit 0 with a GPU, 1 without"
    );
}

#[test]
fn gpu_check_on_this_machine_without_a_gpu_says_so() {
    if tch::Cuda::is_available() {
        return; // the GPU machine: scripts/gpu-check checks the other side
    }
    let out = harness(&["gpu-check"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(report.contains("CUDA usable:         no"), "{report}");
    assert!(report.contains("CUDA runtime linked: yes"), "{report}");
    assert!(report.contains("libtorch:            2.11.0"), "{report}");
}

#[test]
fn demo_serves_a_traced_model_on_the_cpu() {
    let out = harness(&["demo", "--batch", "3"], &[("HARNESS_DEVICE", "cpu")]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("device:   cpu"), "{stdout}");
    assert!(stdout.contains("output:   [3, 3]"), "{stdout}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[test]
fn without_a_gpu_the_cuda_policy_warns_and_does_not_start() {
    if tch::Cuda::is_available() {
        return;
    }
    let out = harness(&["demo"], &[("HARNESS_SERVING_NAME", "embedder")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(
        stderr.contains("no CUDA GPU access; serving embedder will NOT be started"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing was served");
}

#[test]
fn a_bad_device_setting_is_a_clear_error() {
    let out = harness(&["gpu-check"], &[("HARNESS_DEVICE", "tpu")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("invalid device \"tpu\""), "{stderr}");
    assert!(stderr.contains("cuda:N"), "says what is accepted: {stderr}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = harness(
        &["demo"],
        &[("HARNESS_DEVICE", "cpu"), ("HARNESS_LOG_FORMAT", "json")],
    );
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    let lines: Vec<_> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}
