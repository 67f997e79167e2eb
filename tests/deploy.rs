//! The deployment files held to the server: fly.toml against the settings'
//! defaults and a real node's endpoints, the Dockerfile's copies against the tree
//! and a run of `harness gpu-check` from exactly the run stage's files, and idle
//! shutdown on a real `harness serve` process. (No Docker engine runs here.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::CommandFactory;

mod support;

use support::client::demo_item;
use support::node::ServeProcess;

const COOKIE: &str = "a-deploy-test-cookie";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn fly() -> toml::Table {
    std::fs::read_to_string(repo("fly.toml"))
        .unwrap()
        .parse()
        .expect("fly.toml is TOML")
}

fn dockerfile() -> Vec<String> {
    // Continuation lines joined, comments dropped: one instruction per entry.
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    out
}

fn defaults() -> harness::config::Config {
    harness::cli::server_config(["harness"]).expect("the defaults parse")
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `GET path` on 127.0.0.1:`port`; the status code.
fn get(port: u16, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn fly_toml_agrees_with_the_servers_defaults_and_endpoints() {
    let fly = fly();
    let config = defaults();
    let env = fly["env"].as_table().expect("[env]");
    let setting = |name: &str| env[name].as_str().unwrap().to_string();

    // Every setting named is one the server reads; no secret is written here.
    let cli = harness::cli::Cli::command();
    let serve_cmd = cli.find_subcommand("serve").unwrap();
    let known: Vec<String> = cli
        .get_arguments()
        .chain(serve_cmd.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().to_string()))
        .collect();
    for name in env.keys() {
        assert!(
            known.contains(name),
            "fly.toml sets {name}, which the server does not read"
        );
    }
    for secret in ["HARNESS_COOKIE", "HF_TOKEN"] {
        assert!(
            !env.contains_key(secret),
            "{secret} belongs in fly secrets, not fly.toml"
        );
    }

    // Ports: HTTP as the server's default, the cluster as its default and private.
    assert_eq!(setting("HARNESS_HTTP_ADDR"), config.http_addr);
    assert_eq!(setting("HARNESS_CLUSTER_ADDR"), config.cluster_addr);
    let http_port = port(&config.http_addr);
    let services = fly["services"].as_array().unwrap();
    for service in services {
        assert!(service.get("ports").is_none(), "a public port: {service:?}");
        assert_ne!(
            service["internal_port"].as_integer(),
            Some(port(&config.cluster_addr) as i64)
        );
        assert_eq!(
            service["internal_port"].as_integer(),
            Some(http_port as i64)
        );
        assert_eq!(service["auto_stop_machines"].as_bool(), Some(false));
    }

    // The volume holds the cache, as the server's default does where /data exists.
    let mounts = fly["mounts"].as_table().unwrap();
    assert_eq!(mounts["source"].as_str(), Some("data"));
    let data = mounts["destination"].as_str().unwrap();
    assert_eq!(data, "/data");
    assert_eq!(setting("HARNESS_CACHE_DIR"), format!("{data}/cache"));

    // The GPU, the stop that matches the drain.
    assert_eq!(fly["vm"][0]["size"].as_str(), Some("a100-40gb"));
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));
    let kill = fly["kill_timeout"].as_integer().unwrap() as u64;
    assert!(
        kill >= harness::node::DRAIN_TIMEOUT.as_secs() + 10,
        "kill_timeout {kill} s is shorter than the drain"
    );
    assert_eq!(fly["restart"][0]["policy"].as_str(), Some("on-failure"));

    // The checks: on the HTTP port, the server's paths, readiness patient enough
    // for a first download.
    let checks = fly["checks"].as_table().unwrap();
    let minutes = |d: &str| -> f64 {
        let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap());
        let n: f64 = n.parse().unwrap();
        match unit {
            "s" => n / 60.0,
            "m" => n,
            "h" => n * 60.0,
            other => panic!("unit {other}"),
        }
    };
    let ready = &checks["ready"];
    assert_eq!(ready["path"].as_str(), Some("/health/ready"));
    assert!(minutes(ready["grace_period"].as_str().unwrap()) >= 10.0);
    assert_eq!(checks["live"]["path"].as_str(), Some("/health/live"));

    // And a real node answers every check path with 200 once ready.
    let node = ServeProcess::start(COOKIE, "deploy_checks", &[]);
    for (name, check) in checks {
        assert_eq!(check["port"].as_integer(), Some(http_port as i64), "{name}");
        let path = check["path"].as_str().unwrap();
        assert_eq!(get(node.http, path), 200, "check {name}: {path}");
    }
}

#[test]
fn the_dockerfile_copies_what_exists_and_the_run_stage_libraries_suffice() {
    let instructions = dockerfile();
    let ignored: Vec<String> = std::fs::read_to_string(repo(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.trim_end_matches('/')
                .trim_start_matches("**/")
                .to_string()
        })
        .collect();
    let mut runtime_source = None;
    for copy in instructions.iter().filter(|i| i.starts_with("COPY ")) {
        let words: Vec<&str> = copy.split_whitespace().skip(1).collect();
        if let Some(stage) = words[0].strip_prefix("--from=") {
            assert_eq!(stage, "build", "{copy}");
            runtime_source = Some(words[1].trim_end_matches('/').to_string());
            continue;
        }
        for source in &words[..words.len() - 1] {
            assert!(
                repo(source).exists(),
                "the Dockerfile copies {source}, which is not in the tree"
            );
            let first = source.split('/').next().unwrap();
            assert!(
                !ignored.iter().any(|i| i == first),
                "{source} is in .dockerignore"
            );
        }
    }
    // The run stage takes what scripts/runtime-files laid out in the build stage.
    let runtime = runtime_source.expect("a COPY --from=build");
    let lays_out = instructions.iter().any(|i| {
        i.starts_with("RUN ")
            && i.contains(&format!(
                "scripts/runtime-files target/release/harness {runtime}"
            ))
    });
    assert!(lays_out, "no RUN of scripts/runtime-files into {runtime}");
    let has = |prefix: &str, needle: &str| {
        instructions
            .iter()
            .any(|i| i.starts_with(prefix) && i.contains(needle))
    };
    assert!(has("STOPSIGNAL", "SIGTERM"));
    assert!(has("HEALTHCHECK", "/health/live"));
    assert!(has("ENV", "HARNESS_CACHE_DIR=/data/cache"));
    assert!(has("VOLUME", "/data"));
    assert!(has("CMD", "\"serve\""));
    assert!(has("ENTRYPOINT", "docker-entrypoint"));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(repo("scripts/docker-entrypoint"))
        .status()
        .unwrap();
    assert!(syntax.success());

    // Exactly those files (hard links: the same bytes, no 4 GB copy), and the
    // binary run from among them with no library path: every library it loads
    // comes from there or from the system.
    let dest = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let laid = Command::new(repo("scripts/runtime-files"))
        .arg(env!("CARGO_BIN_EXE_harness"))
        .arg(dest.path())
        .arg("--link")
        .output()
        .unwrap();
    assert!(
        laid.status.success(),
        "{}",
        String::from_utf8_lossy(&laid.stderr)
    );
    let binary = dest.path().join("usr/local/bin/harness");
    let out = Command::new(&binary)
        .arg("gpu-check")
        .env_remove("LD_LIBRARY_PATH")
        .env("LD_DEBUG", "files")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 1 = no GPU here, 0 = a GPU: either is an answer; anything else is a failure.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("CUDA runtime linked: yes"), "{stdout}");
    let root = dest.path().canonicalize().unwrap();
    assert!(
        stdout.contains(&format!(
            "libtorch loaded from {}",
            root.join("usr/local/lib/harness/torch/lib").display()
        )),
        "{stdout}"
    );
    let loaded: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.split("calling init: ").nth(1))
        .map(str::trim)
        .collect();
    assert!(loaded.len() > 10, "{stderr}");
    for path in &loaded {
        let system = ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"]
            .iter()
            .any(|p| path.starts_with(p));
        assert!(
            system || Path::new(path).starts_with(&root),
            "{path} was loaded from outside the run stage's files"
        );
    }
}

#[test]
fn idle_shutdown_exits_zero_after_the_set_time_without_traffic() {
    let mut node = ServeProcess::start(COOKIE, "deploy_idle", &[("HARNESS_IDLE_SHUTDOWN_S", "2")]);
    let (status, waited) = node.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    assert!(waited >= Duration::from_secs(2), "exited after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_waits_while_calls_arrive_and_status_pings_do_not_count() {
    let serving = "deploy_idle_busy";
    let mut node = ServeProcess::start(COOKIE, serving, &[("HARNESS_IDLE_SHUTDOWN_S", "2")]);
    let client = node.connect(Duration::from_secs(5)).await;
    // A call every 500 ms for 5 s: more than twice the idle limit in all.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        client
            .run(demo_item(), None)
            .await
            .expect("served while busy");
        assert!(
            node.child.try_wait().unwrap().is_none(),
            "stopped while calls arrived"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then only the client's status pings: the node stops on its own.
    let (status, quiet) = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(30)));
    assert_eq!(status.code(), Some(0));
    assert!(quiet >= Duration::from_millis(1500), "{quiet:?}");
}
