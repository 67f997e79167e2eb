//! The test Hub itself, held to the Hub's protocol: Python's own client
//! (`huggingface_hub.snapshot_download`) downloads from it, ranges with an end are
//! served exactly, a connection's rate is its own, and the model API answers as
//! the Hub's does.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::hub::{content, git_blob_id, hex, Fault, On, TestHub};

const REPO: &str = "acme/three-files";
const MIB: u64 = 1024 * 1024;

fn sha256(bytes: &[u8]) -> String {
    hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Three files as a model repo has them: LFS weights, a config, a tokenizer.
fn three_files() -> Vec<(&'static str, Vec<u8>, bool)> {
    vec![
        ("model.safetensors", content(3_000_000, 11), true),
        (
            "config.json",
            br#"{"hidden_size": 8, "layers": 2}"#.to_vec(),
            false,
        ),
        (
            "tokenizer.json",
            br#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}"#.to_vec(),
            false,
        ),
    ]
}

fn publish(hub: &TestHub, repo: &str, branch: &str, files: &[(&str, Vec<u8>, bool)]) -> String {
    let entries: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(n, c, lfs)| (*n, c.as_slice(), *lfs))
        .collect();
    hub.commit(repo, branch, &entries)
}

/// `benches/snapshot_download.py REPO REVISION CACHE [WORKERS]` against `hub`:
/// the snapshot folder it prints.
async fn python_snapshot_download(
    hub: &TestHub,
    repo: &str,
    revision: &str,
    cache: &Path,
) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/snapshot_download.py");
    let mut cmd = Command::new(support::python::torch_python());
    cmd.arg(script)
        .args([repo, revision])
        .arg(cache)
        .arg("8")
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", cache.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    // A blocking wait here would hold up the hub's own tasks.
    let out = tokio::task::spawn_blocking(move || {
        support::python::stdout_of(&mut cmd, "benches/snapshot_download.py")
    })
    .await
    .unwrap();
    PathBuf::from(out.lines().last().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_snapshot_download_fetches_a_repo_from_the_test_hub() {
    let hub = TestHub::start().await;
    let files = three_files();
    let commit = publish(&hub, REPO, "main", &files);
    let cache = tempfile::tempdir().unwrap();

    let folder = python_snapshot_download(&hub, REPO, "main", cache.path()).await;
    for request in hub.served() {
        eprintln!(
            "{} {} {:?} -> {} (conn {})",
            request.method, request.path, request.range, request.status, request.conn
        );
    }
    assert_eq!(
        folder,
        std::fs::canonicalize(cache.path())
            .unwrap()
            .join("models--acme--three-files/snapshots")
            .join(&commit)
    );
    for (name, bytes, _) in &files {
        assert_eq!(&std::fs::read(folder.join(name)).unwrap(), bytes, "{name}");
    }
    // It asked the model API for the commit and the file list, then each file.
    assert_eq!(
        hub.count("GET", "/api/models/acme/three-files/revision/main"),
        1
    );
    assert_eq!(
        hub.count(
            "GET",
            &format!("/api/models/acme/three-files/tree/{commit}")
        ),
        1
    );
    let weights = sha256(&files[0].1);
    assert_eq!(hub.download_gets(&weights).len(), 1);
    assert_eq!(hub.download_gets("config.json").len(), 1);
    assert_eq!(hub.download_gets("tokenizer.json").len(), 1);
    assert!(
        hub.served().iter().all(|s| s.status < 400),
        "{:?}",
        hub.served()
    );

    // Again, at the commit: everything is cached, nothing is downloaded again.
    hub.clear_served();
    let again = python_snapshot_download(&hub, REPO, &commit, cache.path()).await;
    assert_eq!(again, folder);
    assert!(hub.download_gets("").is_empty(), "{:?}", hub.served());
}

#[tokio::test]
async fn a_range_with_an_end_is_served_exactly() {
    let hub = TestHub::start().await;
    let files = three_files();
    publish(&hub, REPO, "main", &files);
    let weights = &files[0].1;
    let total = weights.len() as u64;
    let url = format!("{}/{REPO}/resolve/main/model.safetensors", hub.url());
    let get = |range: String| {
        let request = client().get(&url).header("range", range);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap();
            (status, headers, body)
        }
    };

    let (status, headers, body) = get("bytes=1000-1999".into()).await;
    assert_eq!(status, 206);
    assert_eq!(
        headers["content-range"],
        format!("bytes 1000-1999/{total}").as_str()
    );
    assert_eq!(headers["content-length"], "1000");
    assert_eq!(&body[..], &weights[1000..2000]);

    // An end past the file is clamped; an open range goes to the end.
    let (status, headers, body) = get(format!("bytes={}-{}", total - 10, total + 50)).await;
    assert_eq!(status, 206);
    assert_eq!(
        headers["content-range"],
        format!("bytes {}-{}/{total}", total - 10, total - 1).as_str()
    );
    assert_eq!(&body[..], &weights[weights.len() - 10..]);
    let (status, _, body) = get("bytes=2999000-".into()).await;
    assert_eq!(status, 206);
    assert_eq!(&body[..], &weights[2_999_000..]);
    let (status, headers, _) = get(format!("bytes={total}-{}", total + 5)).await;
    assert_eq!(status, 416);
    assert_eq!(
        headers["content-range"],
        format!("bytes */{total}").as_str()
    );

    // A small file's range, on `resolve` itself.
    let small = &files[1].1;
    let response = client()
        .get(format!("{}/{REPO}/resolve/main/config.json", hub.url()))
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 206);
    assert_eq!(&response.bytes().await.unwrap()[..], &small[2..6]);

    // A later range's fault spares the range from 0 and spoils the first byte of
    // the later one; a fault within a range applies within it.
    hub.fault(On::LaterRangeOf("model.safetensors"), Fault::WrongBytes);
    let (_, _, body) = get("bytes=0-99".into()).await;
    assert_eq!(&body[..], &weights[..100]);
    let (_, _, body) = get("bytes=500-599".into()).await;
    assert_eq!(body[0], weights[500] ^ 0xff);
    assert_eq!(&body[1..], &weights[501..600]);
    hub.fault(On::Download, Fault::Truncate { after: 100 });
    let response = client()
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert!(response.bytes().await.is_err(), "cut after 100 bytes");

    let gets = hub.download_gets(&sha256(weights));
    let ranges: Vec<_> = gets.iter().map(|s| s.range.clone().unwrap()).collect();
    assert_eq!(ranges.len(), 7, "{ranges:?}");
    assert_eq!(ranges[0], "bytes=1000-1999");
    assert_eq!(hub.download_gets("config.json").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_rate_is_per_connection() {
    let hub = TestHub::start().await;
    let weights = content(4 * MIB as usize, 5);
    hub.commit(REPO, "main", &[("model.safetensors", &weights, true)]);
    hub.set_connection_rate(Some(4 * MIB));
    let url = format!("{}/{REPO}/resolve/main/model.safetensors", hub.url());

    // The whole file on one connection.
    let started = Instant::now();
    let body = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let single = started.elapsed();
    assert_eq!(&body[..], &weights[..]);

    // A quarter each on four connections.
    hub.clear_served();
    let started = Instant::now();
    let parts = futures_util::future::join_all((0..4u64).map(|i| {
        let request = client()
            .get(&url)
            .header("range", format!("bytes={}-{}", i * MIB, (i + 1) * MIB - 1));
        async move { request.send().await.unwrap().bytes().await.unwrap() }
    }))
    .await;
    let parallel = started.elapsed();
    assert_eq!(parts.concat(), weights);
    let mut conns: Vec<u64> = hub
        .download_gets(&sha256(&weights))
        .iter()
        .map(|s| s.conn)
        .collect();
    conns.sort();
    conns.dedup();
    assert_eq!(conns.len(), 4, "four connections");

    eprintln!("one connection: {single:?}; four: {parallel:?}");
    assert!(single > Duration::from_millis(500), "throttled: {single:?}");
    assert!(
        parallel.as_secs_f64() < 0.6 * single.as_secs_f64(),
        "four connections {parallel:?}, one {single:?}"
    );

    // Requests kept alive on one connection share its rate.
    hub.clear_served();
    let one = client();
    let started = Instant::now();
    for i in 0..2u64 {
        let range = format!("bytes={}-{}", i * 2 * MIB, (i + 1) * 2 * MIB - 1);
        one.get(&url)
            .header("range", range)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let kept_alive = started.elapsed();
    let gets = hub.download_gets(&sha256(&weights));
    assert_eq!(gets[0].conn, gets[1].conn, "kept alive");
    assert!(
        kept_alive.as_secs_f64() > 0.6 * single.as_secs_f64(),
        "two halves on one connection {kept_alive:?}, the whole {single:?}"
    );
}

#[tokio::test]
async fn the_model_api_answers_as_the_hub() {
    let hub = TestHub::start().await;
    let files = three_files();
    let commit = publish(&hub, REPO, "main", &files);
    let pr = publish(&hub, REPO, "refs/pr/1", &files[1..]);
    let get = |path: String, token: Option<&str>| {
        let mut request = client().get(format!("{}{path}", hub.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let code = response
                .headers()
                .get("x-error-code")
                .map(|v| v.to_str().unwrap().to_string());
            let text = response.text().await.unwrap();
            (status, code, text)
        }
    };
    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    let siblings = |info: &serde_json::Value| -> Vec<String> {
        info["siblings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["rfilename"].as_str().unwrap().to_string())
            .collect()
    };

    let (status, _, text) = get(format!("/api/models/{REPO}/revision/main"), None).await;
    assert_eq!(status, 200, "{text}");
    let info = json(&text);
    assert_eq!(info["id"], REPO);
    assert_eq!(info["modelId"], REPO);
    assert_eq!(info["sha"], commit.as_str());
    assert_eq!(info["private"], false);
    assert_eq!(
        siblings(&info),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    // No revision: `main`; a pull request's ref, encoded as the client sends it.
    let (_, _, text) = get(format!("/api/models/{REPO}"), None).await;
    assert_eq!(json(&text)["sha"], commit.as_str());
    let (_, _, text) = get(format!("/api/models/{REPO}/revision/refs%2Fpr%2F1"), None).await;
    assert_eq!(json(&text)["sha"], pr.as_str());
    assert_eq!(siblings(&json(&text)), ["config.json", "tokenizer.json"]);
    // A commit, with the files' metadata.
    let (_, _, text) = get(
        format!("/api/models/{REPO}/revision/{commit}?blobs=true"),
        None,
    )
    .await;
    let info = json(&text);
    let lfs = &info["siblings"][1];
    assert_eq!(lfs["size"], 3_000_000);
    assert_eq!(lfs["lfs"]["sha256"], sha256(&files[0].1).as_str());
    assert_eq!(
        info["siblings"][0]["blobId"],
        git_blob_id(&files[1].1).as_str()
    );

    // The tree, as `list_repo_tree` reads it.
    let (status, _, text) = get(
        format!("/api/models/{REPO}/tree/{commit}?recursive=true&expand=false"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let tree = json(&text);
    let tree = tree.as_array().unwrap();
    assert_eq!(tree.len(), 3);
    let weights = tree
        .iter()
        .find(|e| e["path"] == "model.safetensors")
        .unwrap();
    assert_eq!(weights["type"], "file");
    assert_eq!(weights["size"], 3_000_000);
    assert_eq!(weights["lfs"]["oid"], sha256(&files[0].1).as_str());
    assert_eq!(weights["lfs"]["size"], 3_000_000);
    assert_eq!(weights["lfs"]["pointerSize"], 132);
    let config = tree.iter().find(|e| e["path"] == "config.json").unwrap();
    assert_eq!(config["oid"], git_blob_id(&files[1].1).as_str());
    assert!(config.get("lfs").is_none());

    // Missing: the Hub's statuses and codes.
    let (status, code, _) = get("/api/models/acme/nothing/revision/main".into(), None).await;
    assert_eq!((status, code.as_deref()), (401, Some("RepoNotFound")));
    let (status, code, _) = get(format!("/api/models/{REPO}/revision/nope"), None).await;
    assert_eq!((status, code.as_deref()), (404, Some("RevisionNotFound")));

    // A private repo: 401 without its token, the info with it.
    hub.require_token(REPO, "hf_secret");
    let (status, code, _) = get(format!("/api/models/{REPO}/revision/main"), None).await;
    assert_eq!((status, code.as_deref()), (401, Some("GatedRepo")));
    let (status, code, _) = get(format!("/api/models/{REPO}/tree/main"), Some("hf_wrong")).await;
    assert_eq!((status, code.as_deref()), (401, Some("GatedRepo")));
    let (status, _, text) = get(
        format!("/api/models/{REPO}/revision/main"),
        Some("hf_secret"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&text)["private"], true);

    // A fault on `resolve` hits the API too.
    hub.fault(
        On::Resolve,
        Fault::Status {
            code: 503,
            retry_after: Some(1),
        },
    );
    let (status, _, _) = get(format!("/api/models/{REPO}"), Some("hf_secret")).await;
    assert_eq!(status, 503);
}
