//! The client as a user meets it, against real nodes: the crate's examples
//! (`client`: embed, `tensor`, `plain_ractor`) and the `harness-client` binary,
//! built by cargo here, and `harness call`/`harness status`, which share its code:
//! their options, output, log lines and exit codes.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod support;

use support::node::{free_port, ServeProcess};

const COOKIE: &str = "a-client-cli-test-cookie";

/// cargo's output folder of this test binary (`<target>/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds the client crate's examples and its `harness-client` binary (feature
/// `cli`) once, with no libtorch in sight; their folder (`<target>/debug`).
fn client_binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let target = profile.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let out = Command::new(cargo)
            .args([
                "build",
                "-p",
                "harness-client",
                "--features",
                "cli",
                "--examples",
                "--bins",
            ])
            .arg("--target-dir")
            .arg(target)
            .env_remove("LIBTORCH")
            .env_remove("LIBTORCH_USE_PYTORCH")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running cargo build");
        assert!(
            out.status.success(),
            "building the client's examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile
    })
}

fn example(name: &str) -> PathBuf {
    client_binaries().join("examples").join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `program` with `args` and the client's environment for `node`.
fn run(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("HARNESS_COOKIE", COOKIE)
        .env_remove("RUST_LOG")
        .env_remove("HARNESS_NODES")
        .env_remove("HARNESS_SERVING_NAME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("running the program")
}

/// A `harness serve` whose whole log is kept (ServeProcess drops it after ready).
struct LoggedNode {
    child: Child,
    cluster: String,
    log: Arc<Mutex<String>>,
    _model: tempfile::TempDir,
}

impl LoggedNode {
    fn start(model: tempfile::TempDir, envs: &[(&str, &str)]) -> LoggedNode {
        let cluster = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
            .arg("serve")
            .env("HARNESS_MODEL_DIR", model.path())
            .env("HARNESS_DEVICE", "cpu")
            .env("HARNESS_COOKIE", COOKIE)
            .env("HARNESS_CLUSTER_ADDR", &cluster)
            .env("HARNESS_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(" is ready") || line.contains(" is failed") {
                    let _ = ready_tx.send(line.contains(" is ready"));
                }
                let mut log = kept.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or(false);
        assert!(
            ready,
            "the node did not become ready:\n{}",
            log.lock().unwrap()
        );
        LoggedNode {
            child,
            cluster,
            log,
            _model: model,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An embedding model folder: the small token model of the tests, a word-level
/// tokenizer, and its `harness.json` (8 dimensions, mean pooling).
fn token_embedding_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let traced = support::models::save_token_model(dir.path());
    std::fs::rename(traced, dir.path().join("model.pt")).unwrap();
    let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "bonjour": 3, "le": 4, "monde": 5}, "unk_token": "[UNK]"}}"#;
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer).unwrap();
    let manifest = r#"{"format": 1, "task": "embedding", "inputs": ["input_ids", "attention_mask"],
        "max_seq_length": 16, "pooling": "mean", "normalize": false, "dimension": 8, "pad_token_id": 0}"#;
    std::fs::write(dir.path().join("harness.json"), manifest).unwrap();
    dir
}

#[test]
fn the_examples_call_an_embedding_node_and_a_tensor_node() {
    let tensor = ServeProcess::start(COOKIE, "default", &[]);

    let out = run(
        &example("tensor"),
        &[],
        &[("HARNESS_NODES", tensor.cluster.as_str())],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("item 0: [") && stdout.contains("item 1: ["),
        "{stdout}"
    );

    let out = run(
        &example("plain_ractor"),
        &[],
        &[("HARNESS_NODES", tensor.cluster.as_str())],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("status: ready"), "{stdout}");
    assert!(stdout.contains("plain ractor: [1, 3]"), "{stdout}");
    assert!(stdout.contains("attached client: [1, 3]"), "{stdout}");
    assert!(
        stdout.contains("the application's node running: true"),
        "{stdout}"
    );

    // The embedding example against a tensor node: the node's answer, as a sentence.
    let out = run(
        &example("client"),
        &[],
        &[("HARNESS_NODES", tensor.cluster.as_str())],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Error: bad input:"), "{stderr}");
    assert!(!stderr.contains("BadInput {"), "a debug form: {stderr}");

    let embedding = LoggedNode::start(
        token_embedding_dir(),
        &[
            ("HARNESS_TASK", "embedding"),
            ("HARNESS_SERVING_NAME", "default"),
        ],
    );
    let out = run(
        &example("client"),
        &["Hello world", "bonjour le monde"],
        &[("HARNESS_NODES", embedding.cluster.as_str())],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\"Hello world\": 8 dimensions, 2 tokens")
            && stdout.contains("\"bonjour le monde\": 8 dimensions, 3 tokens"),
        "{stdout}"
    );
}

/// The long options a `--help` lists.
fn options(help: &str) -> Vec<String> {
    let mut options: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-h, ")
                .or(l.strip_prefix("-V, "))
                .unwrap_or(l);
            l.strip_prefix("--")
                .map(|o| o.split([' ', '=', '<']).next().unwrap().to_string())
        })
        .collect();
    options.sort();
    options
}

#[test]
fn harness_call_and_harness_client_take_the_same_client_options_and_exit_codes() {
    let harness = Path::new(env!("CARGO_BIN_EXE_harness"));
    let client = client_binaries().join("harness-client");
    for verb in ["call", "status", "wake"] {
        let server_help = text(&run(harness, &[verb, "--help"], &[]).stdout);
        let client_help = text(&run(&client, &[verb, "--help"], &[]).stdout);
        let listed = options(&server_help);
        assert_eq!(
            listed,
            options(&client_help),
            "{server_help}\n{client_help}"
        );
        for option in [
            "node",
            "cookie",
            "serving-name",
            "tls-ca",
            "tls-cert",
            "tls-key",
            "max-message-bytes",
            "deadline-ms",
            "log-format",
        ] {
            assert!(
                listed.contains(&option.to_string()),
                "--{option}: {listed:?}"
            );
        }
        for server_only in [
            "device",
            "model-repo",
            "http-addr",
            "max-batch-size",
            "cache-dir",
        ] {
            assert!(
                !listed.contains(&server_only.to_string()),
                "--{server_only}: {listed:?}"
            );
        }
        // call: the client's options, what to send, and generation's options.
        let generation = [
            "generate",
            "chat",
            "system",
            "max-new-tokens",
            "temperature",
            "top-p",
            "top-k",
            "seed",
            "stop",
            "greedy",
        ];
        if verb == "call" {
            for option in generation {
                assert!(
                    listed.contains(&option.to_string()),
                    "--{option}: {listed:?}"
                );
            }
        }
        // call and wake: where to wake stopped machines (call: when asked).
        let wake = ["fly-app", "fly-api-token", "fly-api-hostname"];
        if verb != "status" {
            for option in wake {
                assert!(
                    listed.contains(&option.to_string()),
                    "--{option}: {listed:?}"
                );
            }
        }
        let bound = match verb {
            "call" => 14 + generation.len() + wake.len() + 1,
            "wake" => 14 + wake.len(),
            _ => 14,
        };
        assert!(listed.len() <= bound, "{listed:?}");
        for env in [
            "HARNESS_COOKIE",
            "HARNESS_SERVING_NAME",
            "HARNESS_TLS_CA",
            "HARNESS_MAX_MESSAGE_BYTES",
        ] {
            assert!(server_help.contains(env), "{env}: {server_help}");
        }
        if verb != "status" {
            for env in ["HARNESS_FLY_APP", "FLY_API_TOKEN", "FLY_API_HOSTNAME"] {
                assert!(server_help.contains(env), "{env}: {server_help}");
            }
        }
        assert!(
            server_help.contains("Exit codes") && server_help.contains("75"),
            "{server_help}"
        );
    }
    let serve_help = text(&run(harness, &["serve", "--help"], &[]).stdout);
    assert!(
        options(&serve_help).contains(&"device".to_string()),
        "{serve_help}"
    );
    // A usage error is a permanent one.
    let out = run(&client, &["call", "--node", "127.0.0.1:1"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn client_verbs_print_answers_not_logs_and_exit_by_kind_of_error() {
    let node = LoggedNode::start(
        support::node::demo_model_dir(),
        &[
            ("HARNESS_WARMUP_INPUTS", "f32[4]"),
            ("HARNESS_SERVING_NAME", "default"),
        ],
    );
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_harness"));
    let client = client_binaries().join("harness-client");
    for program in [&harness, &client] {
        let out = run(
            program,
            &[
                "call",
                "--node",
                &node.cluster,
                "--tensor",
                "1,4:0.1,0.2,0.3,0.4",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).starts_with("[1, 3] ["),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(
            text(&out.stderr),
            "",
            "a client prints no log lines by default"
        );

        let out = run(program, &["status", "--node", &node.cluster], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["phase"], "ready");
        assert_eq!(status["protocol_version"], harness_client::PROTOCOL_VERSION);
        assert_eq!(status["server_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(status["model"]["revision"], "local");
        assert!(
            status["uptime_s"].is_u64() && status["in_flight"].is_u64(),
            "{status}"
        );
    }
    // RUST_LOG still says more.
    let out = run(
        &client,
        &["status", "--node", &node.cluster],
        &[("RUST_LOG", "info")],
    );
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("INFO"), "{}", text(&out.stderr));

    // Clients leaving are no warning on the node.
    std::thread::sleep(Duration::from_millis(500));
    let log = node.log();
    assert!(log.contains("a peer's session ended"), "{log}");
    // (Other warnings, such as a slow ping on a busy machine, are not about this.)
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN") && (l.to_lowercase().contains("session") || l.contains("stream"))
        })
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");

    for program in [&harness, &client] {
        // A wrong cookie: permanent.
        let out = run(
            program,
            &["status", "--node", &node.cluster],
            &[("HARNESS_COOKIE", "wrong")],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("after a proper handshake reply") && stderr.contains("HARNESS_COOKIE"),
            "{stderr}"
        );
        // Nothing listening: temporary, once the deadline passed, naming the address.
        let down = format!("127.0.0.1:{}", free_port());
        let out = run(
            program,
            &[
                "call",
                "--node",
                &down,
                "--deadline-ms",
                "1500",
                "--tensor",
                "1,4:0,0,0,0",
            ],
            &[],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{stderr}");
        assert!(
            stderr.contains(&down) && stderr.contains("unreachable"),
            "{stderr}"
        );
        // Bad input: permanent.
        let out = run(
            program,
            &["call", "--node", &node.cluster, "--embed", "hello"],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    }
    // A plain HTTP server (the node's own HTTP port is one) is not a cookie problem.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in http.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let out = run(&client, &["status", "--node", &http_addr], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a Harness cluster port"), "{stderr}");
    assert!(stderr.contains("HTTP/1.1 400"), "{stderr}");
    assert!(!stderr.contains("cookie"), "{stderr}");
}

#[test]
fn the_client_crate_with_its_cli_does_not_depend_on_libtorch() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "harness-client",
            "--features",
            "cli",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    let tree = text(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        text(&out.stderr)
    );
    assert!(tree.starts_with("harness-client"), "{tree}");
    assert!(
        tree.lines().any(|l| l.starts_with("clap ")),
        "the cli feature is on: {tree}"
    );
    for forbidden in ["tch ", "torch-sys "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "harness-client depends on {forbidden}:\n{tree}"
        );
    }
}
