//! The fetch against a real HTTP server speaking the Hub's protocol.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::fetch::{
    self, FetchError, FetchOptions, FetchProgress, FetchSpec, FileSet, Secret, Snapshot,
};
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
        connections: 8,
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
    assert_no_partial_files_in(&repo_dir(cache));
}

/// Nothing partial or stray in the blobs of the repo folder `repo_dir`.
fn assert_no_partial_files_in(repo_dir: &Path) {
    let blobs = repo_dir.join("blobs");
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

    offline.files.required.push("tokenizer.json".to_string());
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
        vec![None, Some("bytes=400000-999999".to_string())]
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
            Some("bytes=250000-999999".to_string()),
            Some("bytes=350000-999999".to_string())
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
    let snap = fetch::local_dir(dir.path(), &FileSet::exact(["model.pt"])).unwrap();
    assert_eq!(snap.files, vec![dir.path().join("model.pt")]);
    assert_eq!(snap.names, ["model.pt"]);
    let err = fetch::local_dir(dir.path(), &FileSet::exact(["model.pt", "vocab.txt"])).unwrap_err();
    assert!(
        matches!(&err, FetchError::LocalMissing { missing, .. } if missing == &["vocab.txt"]),
        "{err:?}"
    );
}

// Generation repos: a task's file set (required, optional, weights behind an index).

const LLM: &str = "acme/tiny-llm";
const SHARDS: [&str; 3] = [
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
];
const INDEX: &str = "model.safetensors.index.json";
const TOKENIZER_FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];
const OPTIONAL: [&str; 2] = ["generation_config.json", "chat_template.jinja"];

/// The generation task's own set, as `serve` and `harness fetch` use it.
fn generation_files() -> FileSet {
    harness::tasks::generation::DEFAULT_FILES.into()
}

/// A spec for [`LLM`] with the generation task's set.
fn llm_spec(endpoint: String, cache: &Path, revision: &str) -> FetchSpec {
    FetchSpec {
        repo: LLM.to_string(),
        files: generation_files(),
        ..spec_at(endpoint, cache, revision, &[])
    }
}

/// An index whose `weight_map` names `shards` in this order (shard 1 first, then
/// 2, then 3, though sorting by tensor name would put `lm_head` and its shard
/// first), shards named more than once.
fn index_naming(shards: &[&str]) -> Vec<u8> {
    let mut entries = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        entries.push(format!("\"model.layers.{i}.mlp.weight\": \"{shard}\""));
        entries.push(format!("\"model.layers.{i}.attn.weight\": \"{shard}\""));
    }
    if let Some(last) = shards.last() {
        entries.push(format!("\"lm_head.weight\": \"{last}\""));
        entries.push(format!("\"model.norm.weight\": \"{}\"", shards[0]));
    }
    format!(
        "{{\"metadata\": {{\"total_size\": 1234}}, \"weight_map\": {{{}}}}}",
        entries.join(", ")
    )
    .into_bytes()
}

/// Small fake bytes for the tokenizer files, the optional files and the shards:
/// these tests are about fetching, not loading.
fn llm_files(
    index: Option<Vec<u8>>,
    shards: &[&str],
    optional: bool,
) -> Vec<(String, Vec<u8>, bool)> {
    let mut files: Vec<(String, Vec<u8>, bool)> = TOKENIZER_FILES
        .iter()
        .map(|name| {
            (
                name.to_string(),
                format!("{{\"file\": \"{name}\"}}").into_bytes(),
                false,
            )
        })
        .collect();
    if optional {
        files.push((
            OPTIONAL[0].to_string(),
            b"{\"max_new_tokens\": 16}".to_vec(),
            false,
        ));
        files.push((OPTIONAL[1].to_string(), b"{{ messages }}".to_vec(), false));
    }
    match index {
        Some(index) => {
            files.push((INDEX.to_string(), index, false));
            for (i, shard) in shards.iter().enumerate() {
                files.push((
                    shard.to_string(),
                    content(30_000 + 1_000 * i, 100 + i as u64),
                    true,
                ));
            }
        }
        None => files.push(("model.safetensors".to_string(), content(50_000, 99), true)),
    }
    files
}

async fn publish_llm(files: &[(String, Vec<u8>, bool)]) -> ModelRepo {
    let entries: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(n, c, lfs)| (n.as_str(), c.as_slice(), *lfs))
        .collect();
    ModelRepo::publish(LLM, &entries).await
}

/// A generation repo with every optional file, an index and its 3 shards.
async fn sharded_llm() -> ModelRepo {
    publish_llm(&llm_files(Some(index_naming(&SHARDS)), &SHARDS, true)).await
}

/// What the sharded repo's fetch names, in order.
fn sharded_names() -> Vec<String> {
    TOKENIZER_FILES
        .iter()
        .chain(&OPTIONAL)
        .chain(&[INDEX])
        .chain(&SHARDS)
        .map(|n| n.to_string())
        .collect()
}

fn llm_dir(cache: &Path) -> PathBuf {
    cache.join("huggingface/hub/models--acme--tiny-llm")
}

/// Every file of `snap` holds what the repo published under its name.
fn assert_published(f: &ModelRepo, snap: &Snapshot) {
    assert_eq!(snap.names.len(), snap.files.len());
    for (name, path) in snap.named() {
        assert_eq!(std::fs::read(&path).unwrap(), f.bytes(&name), "{name}");
    }
}

/// The GETs of the bytes of the LFS file `name` of `f` (from the CDN).
fn cdn_gets(f: &ModelRepo, name: &str) -> usize {
    f.hub
        .count("GET", &format!("/cdn/{}", sha256(f.bytes(name))))
}

#[tokio::test]
async fn a_sharded_generation_repo_is_fetched_whole_then_needs_no_network() {
    let f = sharded_llm().await;
    let progress = FetchProgress::default();
    let snap = fetch::fetch(&llm_spec(f.hub.url(), f.cache.path(), "main"), &progress)
        .await
        .expect("fetch");
    assert_eq!(snap.names, sharded_names());
    assert_eq!(snap.commit.as_deref(), Some(f.commit.as_str()));
    assert_published(&f, &snap);
    for (name, path) in snap.named() {
        assert_eq!(
            path,
            llm_dir(f.cache.path())
                .join("snapshots")
                .join(&f.commit)
                .join(name)
        );
    }
    let total: u64 = sharded_names()
        .iter()
        .map(|n| f.bytes(n).len() as u64)
        .sum();
    let p = progress.snapshot();
    assert_eq!((p.bytes_done, p.bytes_total), (total, total));
    // With an index, the single file is never asked for; each shard is downloaded once.
    assert!(
        !f.hub
            .served()
            .iter()
            .any(|s| s.path.ends_with("/model.safetensors")),
        "{:?}",
        f.hub.served()
    );
    for shard in SHARDS {
        assert_eq!(cdn_gets(&f, shard), 1, "{shard}");
    }
    assert!(
        !llm_dir(f.cache.path()).join(".no_exist").exists(),
        "nothing is absent"
    );
    assert!(
        fetch::verify_files(&snap.files).is_empty(),
        "every file checks against its blob name"
    );

    // The branch again: the Hub is asked (the first file with If-None-Match,
    // which a 304 without a size answers), nothing is downloaded.
    f.hub.clear_served();
    let branch = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .expect("the branch again");
    assert_eq!(branch, snap);
    let served = f.hub.served();
    assert_eq!(
        (served[0].method.as_str(), served[0].status),
        ("HEAD", 304),
        "{served:?}"
    );
    assert!(served.iter().all(|s| s.method == "HEAD"), "{served:?}");

    // The same pinned commit again: from the cache, not one request.
    f.hub.clear_served();
    let pinned = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), &f.commit),
        &FetchProgress::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (pinned.names.clone(), pinned.files.clone()),
        (snap.names.clone(), snap.files.clone())
    );
    assert!(f.hub.served().is_empty(), "requests: {:?}", f.hub.served());

    // Offline, with the Hub gone: the branch from the cache.
    drop(f.hub);
    let offline = FetchSpec {
        offline: true,
        ..llm_spec("http://127.0.0.1:9".to_string(), f.cache.path(), "main")
    };
    let again = fetch::fetch(&offline, &FetchProgress::default())
        .await
        .expect("offline from the cache");
    assert_eq!(again, snap);
}

#[tokio::test]
async fn a_single_file_repo_without_optional_files_is_fetched_and_their_absence_cached() {
    let f = publish_llm(&llm_files(None, &[], false)).await;
    let snap = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .expect("fetch");
    let names: Vec<&str> = TOKENIZER_FILES
        .iter()
        .copied()
        .chain(["model.safetensors"])
        .collect();
    assert_eq!(snap.names, names);
    assert_published(&f, &snap);
    // The Hub answered 404 EntryNotFound for the files the repo lacks, asked once each.
    for absent in OPTIONAL.iter().chain(&[INDEX]) {
        let asked: Vec<_> = f
            .hub
            .served()
            .into_iter()
            .filter(|s| s.path.ends_with(&format!("/{absent}")))
            .collect();
        assert_eq!(asked.len(), 1, "{absent}: {asked:?}");
        assert_eq!((asked[0].method.as_str(), asked[0].status), ("HEAD", 404));
    }
    // The cache records their absence as huggingface_hub does: an empty
    // `.no_exist/<commit>/<file>`.
    let no_exist = llm_dir(f.cache.path()).join(".no_exist").join(&f.commit);
    for absent in OPTIONAL.iter().chain(&[INDEX]) {
        assert_eq!(
            std::fs::read(no_exist.join(absent)).unwrap(),
            b"",
            "{absent}"
        );
    }
    assert!(!no_exist.join("model.safetensors").exists());
    support::python::run_python(
        r#"
import sys
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST
cache, repo, want_weights = sys.argv[1:4]
for name in ("generation_config.json", "chat_template.jinja", "model.safetensors.index.json"):
    got = try_to_load_from_cache(repo, name, cache_dir=cache, revision="main")
    assert got is _CACHED_NO_EXIST, (name, got)
got = try_to_load_from_cache(repo, "model.safetensors", cache_dir=cache, revision="main")
assert got == want_weights, (got, want_weights)
"#,
        &[
            &f.cache.path().join("huggingface/hub"),
            Path::new(LLM),
            &snap.files[3],
        ],
    );

    // The pinned commit again: no request, the absence known from the cache.
    f.hub.clear_served();
    let pinned = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), &f.commit),
        &FetchProgress::default(),
    )
    .await
    .unwrap();
    assert_eq!(pinned.names, names);
    assert!(f.hub.served().is_empty(), "requests: {:?}", f.hub.served());

    // Offline, the Hub gone: the branch and the pinned commit alike.
    drop(f.hub);
    for revision in ["main", f.commit.as_str()] {
        let offline = FetchSpec {
            offline: true,
            ..llm_spec("http://127.0.0.1:9".to_string(), f.cache.path(), revision)
        };
        let again = fetch::fetch(&offline, &FetchProgress::default())
            .await
            .unwrap_or_else(|e| panic!("offline at {revision}: {e}"));
        assert_eq!(again.files, snap.files);
    }

    // Without the records, the cache cannot tell an absent file from one never
    // fetched: offline then names them.
    std::fs::remove_dir_all(llm_dir(f.cache.path()).join(".no_exist")).unwrap();
    let offline = FetchSpec {
        offline: true,
        ..llm_spec("http://127.0.0.1:9".to_string(), f.cache.path(), "main")
    };
    let err = fetch::fetch(&offline, &FetchProgress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::OfflineMissing { missing, .. } if missing == &[OPTIONAL[0], OPTIONAL[1], INDEX]),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_corrupt_shard_is_fetched_again_or_named() {
    let f = sharded_llm().await;
    // Wrong bytes once: the check catches them, the shard is fetched again.
    f.hub.fault(On::DownloadOf(SHARDS[1]), Fault::WrongBytes);
    let snap = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .expect("the second copy is right");
    assert_published(&f, &snap);
    assert_eq!(
        SHARDS.map(|s| cdn_gets(&f, s)),
        [1, 2, 1],
        "only the spoiled shard twice"
    );
    assert_no_partial_files_in(&llm_dir(f.cache.path()));

    // A shard changed on disk: the check at load finds it, and once it is removed
    // the pinned commit fetches that shard alone again.
    let blob = std::fs::canonicalize(&snap.files[snap.names.len() - 1]).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let corrupt = fetch::verify_files(&snap.files);
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
    assert!(corrupt[0].path.ends_with(SHARDS[2]), "{:?}", corrupt[0]);
    fetch::evict(&corrupt[0]).unwrap();
    f.hub.clear_served();
    let again = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), &f.commit),
        &FetchProgress::default(),
    )
    .await
    .expect("fetched again");
    assert_published(&f, &again);
    let gets: Vec<_> = f
        .hub
        .served()
        .into_iter()
        .filter(|s| s.method == "GET")
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(cdn_gets(&f, SHARDS[2]), 1);

    // Wrong bytes every time: the error names the shard, and nothing wrong is kept.
    let other = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        f.hub.fault(On::DownloadOf(SHARDS[0]), Fault::WrongBytes);
    }
    let err = fetch::fetch(
        &llm_spec(f.hub.url(), other.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::Integrity { file, attempts: 3, .. } if file == SHARDS[0]),
        "{err:?}"
    );
    assert!(err.to_string().contains(SHARDS[0]), "{err}");
    assert!(!llm_dir(other.path())
        .join("blobs")
        .join(sha256(f.bytes(SHARDS[0])))
        .exists());
    assert_no_partial_files_in(&llm_dir(other.path()));
}

#[tokio::test]
async fn an_index_naming_a_shard_the_repo_lacks_is_an_error_naming_it() {
    // The index names three shards; the upload stopped after two.
    let f = publish_llm(&llm_files(Some(index_naming(&SHARDS)), &SHARDS[..2], true)).await;
    let err = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::MissingShard { shard, index, .. } if shard == SHARDS[2] && index == INDEX),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(SHARDS[2]) && message.contains(INDEX) && message.contains(LLM),
        "{message}"
    );
    // Nothing was downloaded past the index, nor put in a snapshot.
    assert_eq!(cdn_gets(&f, SHARDS[0]), 0);
    assert!(!llm_dir(f.cache.path()).join("snapshots").exists());
}

#[tokio::test]
async fn an_index_that_is_not_json_is_a_clear_error() {
    let f = publish_llm(&llm_files(
        Some(b"{\"weight_map\": {\"a\": ".to_vec()),
        &SHARDS,
        false,
    ))
    .await;
    let err = fetch::fetch(
        &llm_spec(f.hub.url(), f.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::BadIndex { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(INDEX) && message.contains("not valid JSON"),
        "{message}"
    );
    assert!(!llm_dir(f.cache.path()).join("snapshots").exists());

    // A repo with neither weights file says so, naming both.
    let bare = publish_llm(&llm_files(None, &[], false)[..3]).await;
    let err = fetch::fetch(
        &llm_spec(bare.hub.url(), bare.cache.path(), "main"),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::NoWeights { .. }), "{err:?}");
    assert!(
        err.to_string().contains("model.safetensors") && err.to_string().contains(INDEX),
        "{err}"
    );
}

#[tokio::test]
async fn harness_model_files_stays_an_exact_list() {
    let parse = |args: &[&str]| {
        let config =
            harness::cli::server_config(["harness", "--task=generation"].iter().chain(args))
                .expect("arguments");
        config.model.files(config.serving.task)
    };
    assert_eq!(parse(&[]), generation_files());
    assert_eq!(
        parse(&["--model-files=config.json, model.safetensors.index.json"]),
        FileSet::exact(["config.json", "model.safetensors.index.json"])
    );

    // Exactly the files listed: the index's shards and the optional files are not asked for.
    let f = sharded_llm().await;
    let exact = FetchSpec {
        repo: LLM.to_string(),
        ..spec(&f.hub, f.cache.path(), "main", &["config.json", INDEX])
    };
    let snap = fetch::fetch(&exact, &FetchProgress::default())
        .await
        .unwrap();
    assert_eq!(snap.names, ["config.json", INDEX]);
    assert_published(&f, &snap);
    let asked: Vec<String> = f.hub.served().into_iter().map(|s| s.path).collect();
    assert!(
        asked
            .iter()
            .all(|p| p.ends_with("/config.json") || p.ends_with(INDEX)),
        "{asked:?}"
    );

    // A listed file is required, optional or not for the task.
    let single = publish_llm(&llm_files(None, &[], false)).await;
    let err = fetch::fetch(
        &FetchSpec {
            repo: LLM.to_string(),
            ..spec(
                &single.hub,
                single.cache.path(),
                "main",
                &["config.json", OPTIONAL[0]],
            )
        },
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(OPTIONAL[0]), "{err}");
}

#[test]
fn a_local_generation_folder_follows_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, _) in llm_files(Some(index_naming(&SHARDS)), &SHARDS, true) {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    // Also a single file, which the index wins over, as on the Hub.
    std::fs::write(dir.path().join("model.safetensors"), b"ignored").unwrap();
    let snap = fetch::local_dir(dir.path(), &generation_files()).unwrap();
    assert_eq!(snap.names, sharded_names());
    for (name, path) in snap.named() {
        assert_eq!(path, dir.path().join(name));
    }

    // A shard the index names is missing: named.
    std::fs::remove_file(dir.path().join(SHARDS[1])).unwrap();
    let err = fetch::local_dir(dir.path(), &generation_files()).unwrap_err();
    assert!(
        matches!(&err, FetchError::LocalMissing { missing, .. } if missing == &[SHARDS[1]]),
        "{err:?}"
    );

    // A broken index: named, with what is wrong.
    std::fs::write(dir.path().join(INDEX), b"{\"weight_map\": {").unwrap();
    let err = fetch::local_dir(dir.path(), &generation_files()).unwrap_err();
    assert!(matches!(err, FetchError::BadIndex { .. }), "{err:?}");
    assert!(
        err.to_string().contains(INDEX) && err.to_string().contains("not valid JSON"),
        "{err}"
    );

    // No index and no optional files: the single file, and nothing else named.
    for name in OPTIONAL.iter().chain(&[INDEX]).chain(&SHARDS) {
        let _ = std::fs::remove_file(dir.path().join(name));
    }
    let snap = fetch::local_dir(dir.path(), &generation_files()).unwrap();
    let names: Vec<&str> = TOKENIZER_FILES
        .iter()
        .copied()
        .chain(["model.safetensors"])
        .collect();
    assert_eq!(snap.names, names);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = fetch::local_dir(dir.path(), &generation_files()).unwrap_err();
    assert!(
        matches!(&err, FetchError::LocalMissing { missing, .. } if missing == &["tokenizer.json"]),
        "{err:?}"
    );
}

/// Three shards of `len` bytes each, published as `REPO`.
async fn three_shards(len: usize) -> ModelRepo {
    let shards: Vec<Vec<u8>> = (0..3).map(|i| content(len, 10 + i)).collect();
    let files: Vec<(&str, &[u8], bool)> = SHARDS
        .iter()
        .zip(&shards)
        .map(|(name, bytes)| (*name, bytes.as_slice(), true))
        .collect();
    ModelRepo::publish(REPO, &files).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_connections_fetch_a_sharded_repo_in_under_a_third_of_one_connections_time() {
    // A CDN that gives each connection 20 MiB/s; 36 MiB in three shards.
    let f = three_shards(12 << 20).await;
    f.hub.set_connection_rate(Some(20 << 20));
    let mut timed = Vec::new();
    for connections in [1, 8] {
        let cache = tempfile::tempdir().unwrap();
        let mut spec = spec(&f.hub, cache.path(), "main", &SHARDS);
        spec.options.connections = connections;
        f.hub.clear_served();
        let started = Instant::now();
        let snap = fetch::fetch(&spec, &FetchProgress::default())
            .await
            .expect("fetched");
        timed.push(started.elapsed());
        for (name, path) in snap.named() {
            assert_eq!(std::fs::read(path).unwrap(), f.bytes(&name), "{name}");
        }
        assert_no_partial_files(cache.path());
        // The budget holds: one body at a time for all three files, or up to
        // eight at once. (Counting connection ids instead is racy: the client's
        // pool may open a second one when the next request beats the previous
        // connection's return to the pool.)
        let gets = f.hub.download_gets("/cdn/");
        let peak = f.hub.peak_bodies();
        match connections {
            1 => assert_eq!(peak, 1, "{gets:?}"),
            _ => assert!((3..=8).contains(&peak), "peak {peak}: {gets:?}"),
        }
    }
    let (one, eight) = (timed[0], timed[1]);
    eprintln!("36 MiB at 20 MiB/s a connection: 1 connection {one:?}, 8 connections {eight:?}");
    assert!(
        eight * 3 < one,
        "8 connections took {eight:?}, 1 connection {one:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_on_one_range_of_a_parallel_fetch_still_ends_verified() {
    // 16 MiB: four 4 MiB pieces; each fault hits a range that starts after byte 0.
    let f = fixture(16 << 20).await;
    let sha = sha256(f.bytes("model.pt"));
    let status = |code, retry_after| Fault::Status { code, retry_after };
    let faults = [
        status(503, None),
        status(429, Some(1)),
        status(500, None),
        status(502, None),
        // A CDN refusing its signed URL (expired): the Hub is asked for a new one.
        status(403, None),
        Fault::Truncate { after: 100_000 },
        Fault::IgnoreRange,
        Fault::Stall { after: 50_000 },
        Fault::WrongBytes,
    ];
    for fault in faults {
        let cache = tempfile::tempdir().unwrap();
        f.hub.clear_served();
        f.hub.fault(On::LaterRangeOf("model.pt"), fault.clone());
        let snap = fetch_model(&f.hub, cache.path())
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(
            std::fs::read(&snap.files[0]).unwrap(),
            f.bytes("model.pt"),
            "{fault:?}"
        );
        assert_no_partial_files(cache.path());

        let gets = f.hub.download_gets(&sha);
        let ranges: Vec<(u64, u64, u16)> = gets
            .iter()
            .map(|g| {
                let asked = g
                    .asked()
                    .unwrap_or_else(|| panic!("{fault:?}: unranged {g:?}"));
                (asked.start, asked.end, g.status)
            })
            .collect();
        // The spoiled answer, on a range after the first byte.
        let spoiled = ranges
            .iter()
            .position(|&(from, _, code)| from > 0 && code != 206)
            .or_else(|| ranges.iter().position(|&(from, _, _)| from > 0));
        let (from, to, code) = ranges[spoiled.unwrap()];
        match fault {
            Fault::Status { code: want, .. } => {
                assert_eq!(code, want, "{fault:?}: {ranges:?}");
                let heads = f.hub.count("HEAD", "model.pt");
                assert_eq!(heads, if want == 403 { 2 } else { 1 }, "{fault:?}");
                // The same range again, answered.
                assert!(ranges.contains(&(from, to, 206)), "{fault:?}: {ranges:?}");
            }
            Fault::IgnoreRange => {
                assert_eq!(code, 200, "{ranges:?}");
                assert!(ranges.contains(&(from, to, 206)), "{ranges:?}");
            }
            Fault::Truncate { after } | Fault::Stall { after } => {
                // The piece resumed where its bytes stopped; nothing else was
                // asked for twice.
                let resumed = ranges
                    .iter()
                    .any(|&(f2, t2, c)| c == 206 && t2 == to && f2 >= from + after);
                assert!(resumed, "{fault:?}: {ranges:?}");
                assert_eq!(ranges.len(), 5, "{fault:?}: {ranges:?}");
            }
            Fault::WrongBytes => {
                // The whole file failed its sha256 and was fetched again.
                assert_eq!(ranges.len(), 8, "{ranges:?}");
            }
        }
    }
}

#[tokio::test]
async fn model_files_patterns_resolve_at_the_pinned_commit_then_from_the_cache() {
    let model: Vec<Vec<u8>> = (0..3).map(|i| content(100_000, 20 + i)).collect();
    let mut files: Vec<(&str, &[u8], bool)> = SHARDS
        .iter()
        .zip(&model)
        .map(|(name, bytes)| (*name, bytes.as_slice(), true))
        .collect();
    files.extend([
        ("tokenizer.json", b"{\"t\": 1}".as_slice(), false),
        ("tokenizer_config.json", b"{}".as_slice(), false),
        ("config.json", b"{\"c\": 2}".as_slice(), false),
        ("README.md", b"# not wanted".as_slice(), false),
        ("onnx/model.onnx", b"not wanted either".as_slice(), true),
    ]);
    let f = ModelRepo::publish(REPO, &files).await;
    let patterns = ["*.safetensors", "tokenizer*", "config.json"];
    let snap = fetch::fetch(
        &spec(&f.hub, f.cache.path(), "main", &patterns),
        &FetchProgress::default(),
    )
    .await
    .expect("fetched");
    let mut wanted: Vec<&str> = SHARDS.to_vec();
    wanted.extend(["tokenizer.json", "tokenizer_config.json", "config.json"]);
    assert_eq!(snap.names, wanted);
    for (name, path) in snap.named() {
        assert_eq!(std::fs::read(path).unwrap(), f.bytes(&name), "{name}");
    }
    // The list was asked for once, and every file at the commit it gave.
    assert_eq!(f.hub.count("GET", "/api/models/"), 1);
    let heads: Vec<_> = f
        .hub
        .served()
        .into_iter()
        .filter(|s| s.method == "HEAD")
        .collect();
    assert_eq!(heads.len(), 6, "{heads:?}");
    assert!(
        heads.iter().all(|h| h.path.contains(&f.commit)),
        "{heads:?}"
    );

    // At the pinned commit, and offline, the cache resolves the patterns alone.
    f.hub.clear_served();
    let pinned = fetch::fetch(
        &spec(&f.hub, f.cache.path(), &f.commit, &patterns),
        &FetchProgress::default(),
    )
    .await
    .expect("from the cache");
    assert_eq!(pinned.names, wanted);
    let mut offline = spec_without_hub(f.cache.path(), "main", &patterns);
    offline.offline = true;
    let cached = fetch::fetch(&offline, &FetchProgress::default())
        .await
        .expect("offline");
    assert_eq!(cached.names, wanted);
    assert!(f.hub.served().is_empty(), "{:?}", f.hub.served());

    // A pattern that matches nothing is an error naming it, online or not.
    let other = tempfile::tempdir().unwrap();
    let err = fetch::fetch(
        &spec(&f.hub, other.path(), "main", &["config.json", "*.gguf"]),
        &FetchProgress::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FetchError::NoMatch { pattern, listed: 8, .. } if pattern == "*.gguf"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"*.gguf\""), "{err}");
    assert!(err.to_string().contains("HARNESS_MODEL_FILES"), "{err}");

    // A local folder resolves patterns against its own files.
    let dir = snap.files[0].parent().unwrap();
    let local = fetch::local_dir(dir, &FileSet::exact(["*.safetensors"])).unwrap();
    assert_eq!(local.names, SHARDS.to_vec());
    let err = fetch::local_dir(dir, &FileSet::exact(["*.bin"])).unwrap_err();
    assert!(matches!(err, FetchError::NoMatch { .. }), "{err:?}");
}

#[tokio::test]
async fn a_server_that_never_serves_ranges_still_completes_a_broken_stream() {
    // One piece: after the stream breaks, every resume is answered with the whole
    // file, whose first bytes are skipped rather than written again.
    let f = fixture(1_000_000).await;
    f.hub
        .fault(On::Download, Fault::Truncate { after: 300_000 });
    for _ in 0..5 {
        f.hub
            .fault(On::LaterRangeOf("model.pt"), Fault::IgnoreRange);
    }
    let snap = fetch_model(&f.hub, f.cache.path())
        .await
        .expect("completed");
    assert_eq!(std::fs::read(&snap.files[0]).unwrap(), f.bytes("model.pt"));
    let gets = f.hub.download_gets(&sha256(f.bytes("model.pt")));
    let asked: Vec<(Option<String>, u16)> =
        gets.iter().map(|g| (g.range.clone(), g.status)).collect();
    assert_eq!(
        asked,
        [(None, 200), (Some("bytes=300000-999999".to_string()), 200)]
    );
    assert_no_partial_files(f.cache.path());
}
