//! The fetch against a real HTTP server speaking the Hub's protocol.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::fetch::{self, FetchError, FetchOptions, FetchProgress, FetchSpec, Secret, Snapshot};
use support::hub::{content, hex, Fault, On, TestHub};
use support::model_repo::ModelRepo;

const REPO: &str = "acme/tiny-model";

fn options() -> FetchOptions {
    FetchOptions {
        connect_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_millis(500),
        max_attempts: 4,
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        progress_every: Duration::from_millis(50),
    }
}

fn spec(hub: &TestHub, cache: &Path, revision: &str, files: &[&str]) -> FetchSpec {
    spec_at(hub.url(), cache, revision, files)
}

fn spec_at(endpoint: String, cache: &Path, revision: &str, files: &[&str]) -> FetchSpec {
    FetchSpec {
        repo: REPO.to_string(),
        revision: revision.to_string(),
        files: files.iter().map(|f| f.to_string()).collect(),
        cache_dir: cache.to_path_buf(),
        endpoint,
        token: None,
        offline: false,
        options: options(),
    }
}

/// `model.pt` of `main` fetched from `hub` into `cache`, its progress unwatched.
async fn fetch_model(hub: &TestHub, cache: &Path) -> Result<Snapshot, FetchError> {
    fetch::fetch(
        &spec(hub, cache, "main", &["model.pt"]),
        &FetchProgress::default(),
    )
    .await
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// A repo with one LFS model (served from the "CDN") and one small config file.
async fn fixture(model_len: usize) -> ModelRepo {
    let model = content(model_len, 1);
    let config = br#"{"hidden_size": 4}"#;
    ModelRepo::publish(
        REPO,
        &[("model.pt", &model, true), ("config.json", config, false)],
    )
    .await
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("huggingface/hub/models--acme--tiny-model")
}

/// Nothing partial or stray anywhere in the repo's cache.
fn assert_no_partial_files(cache: &Path) {
    let blobs = repo_dir(cache).join("blobs");
    for entry in std::fs::read_dir(&blobs).into_iter().flatten() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".incomplete") && !name.ends_with(".tmp"),
            "stray {name} in blobs"
        );
    }
}

#[tokio::test]
async fn downloads_verify_and_land_in_pythons_layout() {
    let f = fixture(300_000).await;
    let progress = FetchProgress::default();
    let snap = fetch::fetch(
        &spec(&f.hub, f.cache.path(), "main", &["model.pt", "config.json"]),
        &progress,
    )
    .await
    .expect("fetch");

    assert_eq!(snap.commit.as_deref(), Some(f.commit.as_str()));
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    assert_eq!(
        std::fs::read(&snap.files[1]).unwrap(),
        f.bytes("config.json")
    );
    let root = repo_dir(f.cache.path());
    assert_eq!(
        snap.files[0],
        root.join("snapshots").join(&f.commit).join("model.pt")
    );
    assert_eq!(
        std::fs::read_link(&snap.files[0]).unwrap(),
        Path::new("../../blobs").join(sha256(f.bytes("model.pt")))
    );
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        f.commit
    );
    assert_no_partial_files(f.cache.path());
    let p = progress.snapshot();
    assert_eq!(
        (p.bytes_done, p.bytes_total),
        (
            (f.bytes("model.pt").len() + f.bytes("config.json").len()) as u64,
            (f.bytes("model.pt").len() + f.bytes("config.json").len()) as u64
        )
    );

    // Python's huggingface_hub reads the same cache, with no network.
    support::python::run_python(
        r#"
import sys
from huggingface_hub import try_to_load_from_cache
cache, repo, want_model, want_config = sys.argv[1:5]
model = try_to_load_from_cache(repo, "model.pt", cache_dir=cache, revision="main")
config = try_to_load_from_cache(repo, "config.json", cache_dir=cache, revision="main")
assert model == want_model, (model, want_model)
assert config == want_config, (config, want_config)
"#,
        &[
            &f.cache.path().join("huggingface/hub"),
            Path::new(REPO),
            &snap.files[0],
            &snap.files[1],
        ],
    );
}

#[tokio::test]
async fn a_cached_pinned_commit_costs_no_request() {
    let f = fixture(10_000).await;
    let pinned = spec(
        &f.hub,
        f.cache.path(),
        &f.commit,
        &["model.pt", "config.json"],
    );
    let first = fetch::fetch(&pinned, &FetchProgress::default())
        .await
        .unwrap();
    assert!(!f.hub.served().is_empty());
    f.hub.clear_served();
    let progress = FetchProgress::default();
    let again = fetch::fetch(&pinned, &progress).await.unwrap();
    let total = (f.bytes("model.pt").len() + f.bytes("config.json").len()) as u64;
    let p = progress.snapshot();
    assert_eq!(
        (p.bytes_done, p.bytes_total),
        (total, total),
        "complete, from the cache"
    );
    assert_eq!(again.files, first.files);
    assert!(f.hub.served().is_empty(), "requests: {:?}", f.hub.served());
}

#[tokio::test]
async fn a_cached_branch_asks_with_if_none_match_and_downloads_nothing() {
    let f = fixture(10_000).await;
    let s = spec(&f.hub, f.cache.path(), "main", &["model.pt"]);
    fetch::fetch(&s, &FetchProgress::default()).await.unwrap();
    f.hub.clear_served();
    let again = fetch::fetch(&s, &FetchProgress::default()).await.unwrap();
    let served = f.hub.served();
    assert_eq!(served.len(), 1, "one HEAD: {served:?}");
    assert_eq!((served[0].method.as_str(), served[0].status), ("HEAD", 304));
    assert_eq!(std::fs::read(&again.files[0]).unwrap(), f.bytes("model.pt"));
}

#[tokio::test]
async fn a_moved_branch_fetches_the_new_commit() {
    let f = fixture(10_000).await;
    let s = spec(&f.hub, f.cache.path(), "main", &["model.pt"]);
    fetch::fetch(&s, &FetchProgress::default()).await.unwrap();
    let newer = content(12_000, 2);
    let commit2 = f.hub.commit(REPO, "main", &[("model.pt", &newer, true)]);
    let snap = fetch::fetch(&s, &FetchProgress::default()).await.unwrap();
    assert_eq!(snap.commit, Some(commit2));
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), newer);
}

#[tokio::test]
async fn offline_uses_the_cache_and_names_what_is_missing() {
    let f = fixture(10_000).await;
    fetch_model(&f.hub, f.cache.path()).await.unwrap();
    let (endpoint, model) = (f.hub.url(), f.bytes("model.pt").to_vec());
    drop(f.hub);

    let mut offline = FetchSpec {
        endpoint,
        offline: true,
        ..spec_without_hub(f.cache.path(), "main", &["model.pt"])
    };
    let snap = fetch::fetch(&offline, &FetchProgress::default())
        .await
        .expect("cached");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), model);

    offline.files.push("tokenizer.json".to_string());
    let err = fetch::fetch(&offline, &FetchProgress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::OfflineMissing { missing, .. } if missing == &["tokenizer.json"]),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("tokenizer.json") && err.to_string().contains("HARNESS_OFFLINE"),
        "{err}"
    );
}

/// A spec whose Hub is gone: nothing listens at that address.
fn spec_without_hub(cache: &Path, revision: &str, files: &[&str]) -> FetchSpec {
    spec_at("http://127.0.0.1:9".to_string(), cache, revision, files)
}

#[tokio::test]
async fn a_branch_falls_back_to_its_cached_snapshot_when_the_hub_is_unreachable() {
    let f = fixture(10_000).await;
    let first = fetch_model(&f.hub, f.cache.path()).await.unwrap();
    drop(f.hub); // nothing listens there now
    let snap = fetch::fetch(
        &spec_without_hub(f.cache.path(), "main", &["model.pt"]),
        &FetchProgress::default(),
    )
    .await
    .expect("falls back to the cache");
    assert_eq!(snap.files, first.files);

    // With nothing cached there is nothing to fall back to: a clear error.
    let empty = tempfile::tempdir().unwrap();
    let err = fetch::fetch(
        &spec_without_hub(empty.path(), "main", &["model.pt"]),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, FetchError::Unreachable { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_ENDPOINT"), "{err}");
}

#[tokio::test]
async fn server_errors_and_429_are_retried_honouring_retry_after() {
    let f = fixture(10_000).await;
    f.hub.fault(
        On::Resolve,
        Fault::Status {
            code: 500,
            retry_after: None,
        },
    );
    f.hub.fault(
        On::Resolve,
        Fault::Status {
            code: 429,
            retry_after: Some(1),
        },
    );
    f.hub.fault(
        On::Download,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    let started = Instant::now();
    let snap = fetch_model(&f.hub, f.cache.path())
        .await
        .expect("retried to success");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    let statuses: Vec<u16> = f.hub.served().iter().map(|s| s.status).collect();
    assert!(statuses.starts_with(&[500, 429]), "{statuses:?}");
    assert!(statuses.contains(&503));

    // Errors without end: give up after max_attempts with the status.
    for _ in 0..4 {
        f.hub.fault(
            On::Resolve,
            Fault::Status {
                code: 502,
                retry_after: None,
            },
        );
    }
    let other = tempfile::tempdir().unwrap();
    let err = fetch_model(&f.hub, other.path()).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Http {
                status: 502,
                attempts: 4,
                ..
            }
        ),
        "{err:?}"
    );
}

/// The `Range` header of each GET of the model's bytes, in order.
fn download_ranges(hub: &TestHub) -> Vec<Option<String>> {
    hub.served()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .map(|s| s.range)
        .collect()
}

#[tokio::test]
async fn a_stalled_transfer_times_out_and_resumes_where_it_stopped() {
    let f = fixture(1_000_000).await;
    f.hub.fault(On::Download, Fault::Stall { after: 400_000 });
    let snap = fetch_model(&f.hub, f.cache.path()).await.expect("resumed");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    assert_eq!(
        download_ranges(&f.hub),
        vec![None, Some("bytes=400000-".to_string())]
    );
    assert_no_partial_files(f.cache.path());
}

#[tokio::test]
async fn a_truncated_body_is_resumed_and_a_server_ignoring_range_restarts_cleanly() {
    let f = fixture(1_000_000).await;
    f.hub
        .fault(On::Download, Fault::Truncate { after: 250_000 });
    f.hub
        .fault(On::Download, Fault::Truncate { after: 100_000 });
    f.hub.fault(On::Download, Fault::IgnoreRange);
    let snap = fetch_model(&f.hub, f.cache.path())
        .await
        .expect("completed");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    let ranges = download_ranges(&f.hub);
    assert_eq!(
        ranges[..3],
        [
            None,
            Some("bytes=250000-".to_string()),
            Some("bytes=350000-".to_string())
        ]
    );
    assert_no_partial_files(f.cache.path());
}

#[tokio::test]
async fn wrong_bytes_are_deleted_and_fetched_again_then_fail_clearly() {
    let f = fixture(200_000).await;
    f.hub.fault(On::Download, Fault::WrongBytes);
    let snap = fetch_model(&f.hub, f.cache.path())
        .await
        .expect("second try is right");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    assert_eq!(download_ranges(&f.hub).len(), 2);

    let other = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        f.hub.fault(On::Download, Fault::WrongBytes);
    }
    let err = fetch_model(&f.hub, other.path()).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Integrity { attempts: 3, expected, .. } if *expected == sha256(f.bytes("model.pt"))),
        "{err:?}"
    );
    // Nothing wrong was kept: no blob, no partial file, no snapshot entry.
    let root = repo_dir(other.path());
    assert!(!root
        .join("blobs")
        .join(sha256(f.bytes("model.pt")))
        .exists());
    assert!(!root.join("snapshots").exists());
    assert_no_partial_files(other.path());
}

#[tokio::test]
async fn private_repos_need_hf_token_which_never_leaks() {
    let f = fixture(50_000).await;
    f.hub.require_token(REPO, "hf_sekrit_value");
    let err = fetch_model(&f.hub, f.cache.path()).await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Unauthorized {
                status: 401,
                token_sent: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");

    let wrong = FetchSpec {
        token: Some(Secret::new("hf_wrong")),
        ..spec(&f.hub, f.cache.path(), "main", &["model.pt"])
    };
    let err = fetch::fetch(&wrong, &FetchProgress::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HF_TOKEN was refused") && !err.to_string().contains("hf_wrong"),
        "{err}"
    );

    let right = FetchSpec {
        token: Some(Secret::new("hf_sekrit_value")),
        ..spec(&f.hub, f.cache.path(), "main", &["model.pt"])
    };
    assert!(
        !format!("{right:?}").contains("sekrit"),
        "the spec's Debug hides the token"
    );
    let snap = fetch::fetch(&right, &FetchProgress::default())
        .await
        .expect("with the token");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    // The token goes to the Hub, never to the CDN.
    for s in f.hub.served() {
        let expected = if s.path.starts_with("/cdn/") {
            None
        } else if s.status == 401 {
            s.authorization.clone()
        } else {
            Some("Bearer hf_sekrit_value".to_string())
        };
        assert_eq!(s.authorization, expected, "{s:?}");
    }
}

#[tokio::test]
async fn not_found_names_the_repo_the_revision_or_the_file() {
    let f = fixture(1_000).await;
    let cases = [
        ("acme/nope", "main", "model.pt", "repo acme/nope not found"),
        (REPO, "v9", "model.pt", "revision v9 not found"),
        (REPO, "main", "weights.bin", "file weights.bin not found"),
    ];
    for (repo, revision, file, says) in cases {
        let s = FetchSpec {
            repo: repo.to_string(),
            ..spec(&f.hub, f.cache.path(), revision, &[file])
        };
        let err = fetch::fetch(&s, &FetchProgress::default())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
        // The Hub's 401 for a missing repo asked without a token is not "gated".
        assert!(!err.to_string().contains("gated"), "{err}");
    }
}

#[tokio::test]
async fn a_renamed_repo_is_followed() {
    let f = fixture(5_000).await;
    f.hub.rename("acme/old-name", REPO);
    let s = FetchSpec {
        repo: "acme/old-name".to_string(),
        ..spec(&f.hub, f.cache.path(), "main", &["model.pt"])
    };
    let snap = fetch::fetch(&s, &FetchProgress::default())
        .await
        .expect("followed the redirect");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    assert!(f.hub.served().iter().any(|s| s.status == 307));
}

#[tokio::test]
async fn progress_is_published_while_downloading() {
    let f = fixture(600_000).await;
    f.hub.set_rate(Some(1_000_000));
    let progress = std::sync::Arc::new(FetchProgress::default());
    let s = spec(&f.hub, f.cache.path(), "main", &["model.pt"]);
    let task = {
        let progress = progress.clone();
        tokio::spawn(async move { fetch::fetch(&s, &progress).await })
    };
    let mut seen_midway = false;
    while !task.is_finished() {
        let p = progress.snapshot();
        if p.bytes_done > 0 && p.bytes_done < p.bytes_total {
            assert_eq!(p.bytes_total, 600_000);
            assert_eq!(p.file.as_deref(), Some("model.pt"));
            seen_midway = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.await.unwrap().unwrap();
    assert!(seen_midway, "progress moved between 0 and the total");
    assert_eq!(progress.snapshot().bytes_done, 600_000);
}

#[tokio::test]
async fn unsafe_file_names_are_refused_before_any_request() {
    let f = fixture(1_000).await;
    let err = fetch::fetch(
        &spec(&f.hub, f.cache.path(), "main", &["../../etc/passwd"]),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Config(_)), "{err:?}");
    assert!(f.hub.served().is_empty());
}

#[test]
fn a_local_model_dir_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pt"), b"x").unwrap();
    let snap = fetch::local_dir(dir.path(), &["model.pt".to_string()]).unwrap();
    assert_eq!(snap.files, vec![dir.path().join("model.pt")]);
    let err = fetch::local_dir(
        dir.path(),
        &["model.pt".to_string(), "vocab.txt".to_string()],
    )
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::LocalMissing { missing, .. } if missing == &["vocab.txt"]),
        "{err:?}"
    );
}
