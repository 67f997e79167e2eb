//! Fetch: the model's files from the Hugging Face Hub into the volume cache. The
//! only room that touches `hf-hub`.
//!
//! Every file is checked (size against the announced size, and for LFS files the
//! sha256 against the etag) before it gets its name in the cache; a partial or wrong
//! file never appears in a snapshot. Transfers time out when they stall, are retried
//! with backoff and resume with `Range`. A cached pinned commit costs no request; a
//! branch falls back to its cached snapshot when the Hub cannot be reached.

mod blob_writer;
pub mod cache;
mod download;
mod error;
mod hub;
pub mod progress;
mod retry;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::FetchError;
pub use progress::{FetchProgress, ProgressSnapshot};
pub use verify::{evict, verify_files, Corrupt};

use cache::{is_commit, RepoCache};
use hub::{Attempt, FileMeta, Hub};
use retry::Retries;

/// A secret (`HF_TOKEN`) that never prints: `Debug` and `Display` show a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Timeouts, retries and progress cadence.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub connect_timeout: Duration,
    /// No byte for this long and the transfer is abandoned and retried.
    pub stall_timeout: Duration,
    /// Failed attempts in a row (without progress) before giving up.
    pub max_attempts: u32,
    /// The first retry's delay; it doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often a progress line is logged during a transfer.
    pub progress_every: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            max_attempts: 6,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            progress_every: Duration::from_secs(5),
        }
    }
}

impl FetchOptions {
    /// The wait before retry number `failures` (1-based): the server's
    /// `Retry-After` when it sent one (capped at 10 minutes), else exponential backoff.
    fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(Duration::from_secs(600));
        }
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

/// What to fetch and from where.
#[derive(Debug, Clone)]
pub struct FetchSpec {
    /// `org/name` on the Hub.
    pub repo: String,
    /// A branch, tag or 40-hex commit.
    pub revision: String,
    pub files: Vec<String>,
    /// `HARNESS_CACHE_DIR`: the Hub layout lives under `<cache_dir>/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`.
    pub endpoint: String,
    pub token: Option<Secret>,
    /// Use the cache only.
    pub offline: bool,
    pub options: FetchOptions,
}

/// The model's files on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub repo: String,
    pub revision: String,
    /// The commit the files come from (`None` for a local folder).
    pub commit: Option<String>,
    /// Local paths, in the order the files were asked for.
    pub files: Vec<PathBuf>,
}

/// Fetches `spec.files` into the cache (or finds them there) and returns their paths.
#[tracing::instrument(name = "fetch", skip_all, fields(repo = %spec.repo, revision = %spec.revision))]
pub async fn fetch(spec: &FetchSpec, progress: &FetchProgress) -> Result<Snapshot, FetchError> {
    let snapshot = fetch_or_find(spec, progress).await?;
    // Served from the cache with no transfer: the progress is still complete.
    if progress.snapshot().bytes_total == 0 {
        let bytes: u64 = snapshot
            .files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        progress.set_total(bytes);
        progress.add_done(bytes);
    }
    Ok(snapshot)
}

async fn fetch_or_find(spec: &FetchSpec, progress: &FetchProgress) -> Result<Snapshot, FetchError> {
    if spec.files.is_empty() {
        return Err(FetchError::Config(
            "no files to fetch: set HARNESS_MODEL_FILES".to_string(),
        ));
    }
    if let Some(bad) = spec.files.iter().find(|f| !is_safe_file_name(f)) {
        return Err(FetchError::Config(format!(
            "{bad:?} is not a file path inside a repo (no leading /, no .., not empty)"
        )));
    }
    progress.reset();
    let cache = RepoCache::new(&spec.cache_dir, &spec.repo, &spec.revision);

    // A pinned commit that is cached costs no request at all.
    if is_commit(&spec.revision) {
        if let Some(snapshot) = from_cache(spec, &cache) {
            tracing::info!(commit = %spec.revision, "pinned commit {} is cached; no download needed", short(&spec.revision));
            return Ok(snapshot);
        }
    }
    if spec.offline {
        return from_cache(spec, &cache).ok_or_else(|| offline_missing(spec, &cache));
    }

    let hub = Hub::new(
        &spec.endpoint,
        spec.token.clone(),
        &spec.repo,
        &spec.revision,
        &spec.options,
    )?;
    match online(spec, &cache, &hub, progress).await {
        Ok(snapshot) => Ok(snapshot),
        Err(err) if err.is_hub_unavailable() && !is_commit(&spec.revision) => {
            match from_cache(spec, &cache) {
                Some(snapshot) => {
                    tracing::warn!(
                        error = %err,
                        commit = snapshot.commit.as_deref().unwrap_or(""),
                        "the Hub is unavailable; using the cached snapshot of {} at {}, which may be older than the Hub's",
                        spec.repo,
                        spec.revision
                    );
                    Ok(snapshot)
                }
                None => Err(err),
            }
        }
        Err(err) => Err(err),
    }
}

/// The files of a local folder (`HARNESS_MODEL_DIR`), used as they are.
pub fn local_dir(dir: &Path, files: &[String]) -> Result<Snapshot, FetchError> {
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let missing: Vec<String> = files
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(f, _)| f.clone())
        .collect();
    if !missing.is_empty() {
        return Err(FetchError::LocalMissing {
            dir: dir.to_path_buf(),
            missing,
        });
    }
    Ok(Snapshot {
        repo: dir.display().to_string(),
        revision: "local".to_string(),
        commit: None,
        files: paths,
    })
}

async fn online(
    spec: &FetchSpec,
    cache: &RepoCache,
    hub: &Hub,
    progress: &FetchProgress,
) -> Result<Snapshot, FetchError> {
    // The first file resolves the revision to a commit; the rest are asked for at
    // that commit, so a branch that moves meanwhile cannot mix two snapshots.
    let first = &spec.files[0];
    let known = cached_etag(cache, first);
    let first_meta = with_retries(spec, first, hub.resolve_url(&spec.revision, first), || {
        hub.head(&spec.revision, first, known.as_deref())
    })
    .await?;
    let commit = first_meta.commit.clone();
    if !is_commit(&commit) {
        return Err(FetchError::Protocol {
            url: hub.resolve_url(&spec.revision, first),
            what: format!("a 40-hex X-Repo-Commit (got {commit:?})"),
        });
    }
    let mut metas = vec![first_meta];
    for file in &spec.files[1..] {
        metas.push(
            with_retries(spec, file, hub.resolve_url(&commit, file), || {
                hub.head(&commit, file, None)
            })
            .await?,
        );
    }

    let total: u64 = metas.iter().map(|m| m.size).sum();
    progress.set_total(total);
    tracing::info!(
        commit = %commit,
        files = metas.len(),
        bytes = total,
        "{} at {} is commit {}: {} in {} file(s)",
        spec.repo,
        spec.revision,
        short(&commit),
        progress::human_bytes(total),
        metas.len()
    );

    let mut files = Vec::with_capacity(metas.len());
    for meta in &metas {
        download::ensure_blob(hub, cache, meta, progress, &spec.options).await?;
        files.push(cache.link(&commit, &meta.file, &meta.etag)?);
    }
    cache.write_ref(&commit)?;
    Ok(Snapshot {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        commit: Some(commit),
        files,
    })
}

/// Runs `attempt` until it succeeds, fails for good, or runs out of attempts.
async fn with_retries<F, Fut>(
    spec: &FetchSpec,
    file: &str,
    url: String,
    mut attempt: F,
) -> Result<FileMeta, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<FileMeta, Attempt>>,
{
    let mut retries = Retries::new(&spec.options, url, format!("asking the Hub about {file}"));
    loop {
        match attempt().await {
            Ok(meta) => return Ok(meta),
            Err(failure) => retries.after(failure).await?,
        }
    }
}

/// The etag of the cached copy of `file` at this revision, so the Hub can answer 304.
fn cached_etag(cache: &RepoCache, file: &str) -> Option<String> {
    let path = cache.cached_file(file)?;
    let target = std::fs::read_link(path).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

/// Every file from the cache, or `None` if any is missing.
fn from_cache(spec: &FetchSpec, cache: &RepoCache) -> Option<Snapshot> {
    let files = spec
        .files
        .iter()
        .map(|f| cache.cached_file(f))
        .collect::<Option<Vec<_>>>()?;
    Some(Snapshot {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        commit: cache.cached_commit(),
        files,
    })
}

fn offline_missing(spec: &FetchSpec, cache: &RepoCache) -> FetchError {
    FetchError::OfflineMissing {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        cache: cache::hub_dir(&spec.cache_dir),
        missing: spec
            .files
            .iter()
            .filter(|f| cache.cached_file(f).is_none())
            .cloned()
            .collect(),
    }
}

/// A relative path inside a repo: no absolute path, no `..`, nothing empty.
fn is_safe_file_name(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let token = Secret::new("hf_supersecret");
        assert!(!format!("{token:?} {token}").contains("supersecret"));
        assert_eq!(token.expose(), "hf_supersecret");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_retry_after_wins() {
        let options = FetchOptions::default();
        assert_eq!(options.delay(1, None), Duration::from_millis(500));
        assert_eq!(options.delay(2, None), Duration::from_secs(1));
        assert_eq!(options.delay(20, None), Duration::from_secs(30));
        assert_eq!(
            options.delay(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn file_names_stay_inside_the_repo() {
        assert!(is_safe_file_name("model.pt"));
        assert!(is_safe_file_name("onnx/model.onnx"));
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a"] {
            assert!(!is_safe_file_name(bad), "{bad}");
        }
    }
}
