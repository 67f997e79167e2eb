//! `harness fetch` as separate processes: killed mid-download, racing each other,
//! on a full disk, and what it prints.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::hub::{content, hex, TestHub};
use support::model_repo::ModelRepo;

const REPO: &str = "acme/big-model";

fn fetch_command(hub: &TestHub, cache: &Path) -> Command {
    let mut cmd = hub.fetch_command(cache, REPO, &["model.pt", "config.json"]);
    cmd.env("RUST_LOG", "harness=debug");
    cmd
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("running harness fetch"))
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("huggingface/hub/models--acme--big-model")
}

/// A `len`-byte model (LFS) and a small config published as [`REPO`].
async fn publish_model(len: usize) -> ModelRepo {
    let model = content(len, 7);
    ModelRepo::publish(
        REPO,
        &[("model.pt", &model, true), ("config.json", b"{}", false)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_prints_the_local_paths_and_keeps_the_token_out_of_its_logs() {
    let published = publish_model(100_000).await;
    let (hub, model) = (&published.hub, published.bytes("model.pt"));
    hub.require_token(REPO, "hf_never_print_me");
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = fetch_command(hub, cache.path());
    cmd.env("HF_TOKEN", "hf_never_print_me")
        .env("RUST_LOG", "trace");
    let out = run(cmd).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 2, "{stdout}");
    assert!(
        paths[0].ends_with("/model.pt") && paths[1].ends_with("/config.json"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(paths[0]).unwrap(), model);
    assert!(
        stderr.contains("downloaded and verified model.pt"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hf_never_print_me") && !stdout.contains("hf_never_print_me"),
        "the token leaked:\n{stderr}"
    );

    // An error: non-zero, and the message says what to do.
    let mut cmd = fetch_command(hub, cache.path());
    cmd.env("HARNESS_MODEL_FILES", "weights.bin")
        .env("HF_TOKEN", "hf_never_print_me");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("file weights.bin not found in acme/big-model"),
        "{stderr}"
    );
    assert!(stderr.contains("HARNESS_MODEL_FILES"), "{stderr}");
}

/// A fetch's record of its pieces: the bytes done of each, by piece.
fn read_record(path: &Path) -> Option<(u64, Vec<u64>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines().skip(2);
    let piece = lines.next()?.strip_prefix("piece ")?.parse().ok()?;
    let done = lines
        .next()?
        .strip_prefix("done ")?
        .split(' ')
        .map(|d| d.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some((piece, done))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_fetch_killed_mid_download_fetches_no_finished_range_again() {
    // 40 MiB: ten 4 MiB pieces, eight at a time, each connection at 2 MiB/s, so
    // the first eight finish together and the last two are under way at the kill.
    const LEN: u64 = 40 << 20;
    let published = publish_model(LEN as usize).await;
    let (hub, model) = (&published.hub, published.bytes("model.pt"));
    hub.set_connection_rate(Some(2 << 20));
    let cache = &published.cache;
    let blob_name = sha256(model);
    let blobs = repo_dir(cache.path()).join("blobs");
    let record = blobs.join(format!("{blob_name}.pieces.incomplete"));

    let mut child = fetch_command(hub, cache.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (piece, done_at_kill) = loop {
        assert!(Instant::now() < deadline, "no piece ever finished");
        if let Some((piece, done)) = read_record(&record) {
            let finished = done.iter().filter(|&&d| d == piece).count();
            if finished >= 1 && done.iter().any(|&d| d > 0 && d < piece) {
                break (piece, done);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert_eq!(done_at_kill.len(), 10, "{done_at_kill:?}");
    assert!(
        !blobs.join(&blob_name).exists(),
        "no half file under its final name"
    );
    assert!(
        !repo_dir(cache.path()).join("snapshots").exists(),
        "nothing in a snapshot"
    );

    hub.set_connection_rate(None);
    hub.clear_served();
    let out = run(fetch_command(hub, cache.path())).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = text(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(sha256(&std::fs::read(path).unwrap()), blob_name);
    let gets = hub.download_gets(&blob_name);
    assert!(!gets.is_empty());
    for get in &gets {
        let asked = get.asked().expect("every GET of a resumed fetch is ranged");
        let (from, to) = (asked.start, asked.end);
        for (i, &done) in done_at_kill.iter().enumerate() {
            let start = i as u64 * piece;
            let piece_end = (start + piece).min(LEN);
            // Nothing the killed fetch had written is asked for again.
            let written = start..start + done;
            assert!(
                to <= written.start || from >= written.end,
                "{:?} fetched bytes {from}..{to} again; piece {i} had {done} of {}",
                get.range,
                piece_end - start
            );
        }
    }
    let finished: Vec<usize> = (0..done_at_kill.len())
        .filter(|&i| done_at_kill[i] == piece)
        .collect();
    assert!(
        gets.len() <= done_at_kill.len() - finished.len(),
        "one GET per unfinished piece: {gets:?}"
    );
    assert!(!blobs
        .join(format!("{blob_name}.ranged.incomplete"))
        .exists());
    assert!(!record.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_fetching_one_cache_both_succeed_and_download_once() {
    let published = publish_model(2_000_000).await;
    let (hub, model) = (&published.hub, published.bytes("model.pt"));
    hub.set_rate(Some(4_000_000));
    let cache = &published.cache;
    let (a, b) = tokio::join!(
        run(fetch_command(hub, cache.path())),
        run(fetch_command(hub, cache.path()))
    );
    for out in [&a, &b] {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(a.stdout, b.stdout, "the same paths");
    let path = text(&a.stdout).lines().next().unwrap().to_string();
    assert_eq!(std::fs::read(path).unwrap(), model);
    let full_gets = hub
        .served()
        .iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .count();
    assert_eq!(
        full_gets, 1,
        "one process downloaded, the other waited for it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_clear_error() {
    let published = publish_model(3_000_000).await;
    let hub = &published.hub;
    let dir = tempfile::tempdir().unwrap();
    // A 1 MiB filesystem of our own; mounting needs root, which CI has.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let out = run(fetch_command(hub, dir.path())).await;
    let _ = Command::new("umount").arg(dir.path()).status();
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("the disk is full"), "{stderr}");
    assert!(stderr.contains("HARNESS_CACHE_DIR"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_of_a_generation_repo_takes_the_tasks_set_and_then_works_offline() {
    const LLM: &str = "acme/tiny-llm";
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let index = format!(
        "{{\"weight_map\": {{\"a\": \"{}\", \"b\": \"{}\", \"c\": \"{}\"}}}}",
        shards[0], shards[1], shards[0]
    );
    let (one, two) = (content(20_000, 1), content(30_000, 2));
    // No generation_config.json: the node goes without it.
    let published = ModelRepo::publish(
        LLM,
        &[
            ("config.json", b"{}", false),
            ("tokenizer.json", b"{\"t\": 1}", false),
            ("tokenizer_config.json", b"{\"c\": 1}", false),
            ("chat_template.jinja", b"{{ messages }}", false),
            ("model.safetensors.index.json", index.as_bytes(), false),
            (shards[0], &one, true),
            (shards[1], &two, true),
        ],
    )
    .await;
    let hub = &published.hub;
    let cache = published.cache.path();
    // HARNESS_MODEL_FILES unset: the generation task's own set, as `serve` takes it.
    let mut cmd = hub.fetch_command(cache, LLM, &[]);
    cmd.env("HARNESS_TASK", "generation");
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let snapshot = cache
        .join("huggingface/hub/models--acme--tiny-llm/snapshots")
        .join(&published.commit);
    let stdout = text(&out.stdout);
    let names: Vec<String> = stdout
        .lines()
        .map(|line| {
            Path::new(line)
                .strip_prefix(&snapshot)
                .unwrap_or_else(|_| panic!("{line} is not in {}", snapshot.display()))
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "model.safetensors.index.json",
            shards[0],
            shards[1],
        ]
    );
    assert_eq!(std::fs::read(snapshot.join(shards[1])).unwrap(), two);

    // Offline, the Hub unreachable: the same files, generation_config.json known absent.
    let mut offline = hub.fetch_command(cache, LLM, &[]);
    offline
        .env("HARNESS_TASK", "generation")
        .env("HARNESS_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    let again = run(offline).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_failing_while_another_downloads_ends_the_fetch_at_once() {
    // Two LFS files at once; the small one is refused for good while the large
    // one is still coming (1 MiB/s a connection: it would take seconds). The
    // process must end with the error, its other file's threads stopped.
    let large = content(20 << 20, 3);
    let small = content(100_000, 4);
    let published = ModelRepo::publish(
        REPO,
        &[("large.bin", &large, true), ("small.bin", &small, true)],
    )
    .await;
    let hub = &published.hub;
    hub.set_connection_rate(Some(1 << 20));
    hub.fault(
        support::hub::On::DownloadOf("small.bin"),
        support::hub::Fault::Status {
            code: 404,
            retry_after: None,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let mut child = hub
        .fetch_command(cache.path(), REPO, &["large.bin", "small.bin"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("harness fetch hung after one file failed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("small.bin"), "{stderr}");
    // The large file was cut short, not finished first.
    let blobs = repo_dir(cache.path()).join("blobs");
    assert!(!blobs.join(sha256(&large)).exists());
}
