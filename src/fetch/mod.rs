//! Fetch: the model's files from the Hugging Face Hub into the volume cache. The
//! only room that touches `hf-hub`.
//!
//! What a model is made of is a [`FileSet`]: the files its task needs, the ones it
//! uses when the repo has them (the cache records the ones a commit lacks under
//! `.no_exist/<commit>/`, as Python's `huggingface_hub` does, so that a restart
//! knows it without asking), and its safetensors weights, found through their
//! index when the repo has one.
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
mod files;
mod hub;
mod pieces;
pub mod progress;
mod resolve;
mod retry;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::FetchError;
pub use files::{index_shards, FileSet, FileSpec, Weights};
pub use progress::{FetchProgress, FileProgress, ProgressSnapshot};
pub use verify::{evict, verify_files, Corrupt};

use cache::{is_commit, RepoCache};
use files::is_safe_file_name;
use hub::Hub;

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
    /// Connections open at once (`HARNESS_DOWNLOAD_CONNECTIONS`): byte ranges of
    /// a large file, and several files.
    pub connections: usize,
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
            connections: 8,
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
    /// The files: a task's set (required, optional, weights behind an index), or
    /// `HARNESS_MODEL_FILES` (exactly those, all required).
    pub files: FileSet,
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
    /// Each file's path in the repo, in order: the required files, the optional
    /// ones the repo has, then the weights (the index and its shards, or the one
    /// file). Absent optional files are not named.
    pub names: Vec<String>,
    /// The local path of each file of `names`, in the same order.
    pub files: Vec<PathBuf>,
}

impl Snapshot {
    /// Each file by its name in the repo, with its local path.
    pub fn named(&self) -> Vec<(String, PathBuf)> {
        self.names
            .iter()
            .cloned()
            .zip(self.files.iter().cloned())
            .collect()
    }
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
    // (A folder, `onnx/`, is a pattern: every file under it.)
    let folder_or_file = |f: &str| f.strip_suffix('/').unwrap_or(f).to_string();
    if let Some(bad) = spec
        .files
        .declared()
        .find(|f| !is_safe_file_name(&folder_or_file(f)))
    {
        return Err(FetchError::Config(format!(
            "{bad:?} is not a file path inside a repo (no leading /, no .., not empty)"
        )));
    }
    if let Some((pattern, why)) = spec.files.invalid_pattern() {
        return Err(FetchError::Config(format!(
            "{pattern:?} in HARNESS_MODEL_FILES is not a valid pattern ({why}): use * and ? wildcards, [abc] sets"
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

/// The files of a local folder (`HARNESS_MODEL_DIR`), used as they are: every
/// required file, the optional ones it holds, and the weights (the shards its
/// index names when it holds the index, else the single file).
pub fn local_dir(dir: &Path, files: &FileSet) -> Result<Snapshot, FetchError> {
    let found = resolve::on_shelf(files, &resolve::DirShelf { dir })?;
    if !found.missing.is_empty() {
        return Err(FetchError::LocalMissing {
            dir: dir.to_path_buf(),
            missing: found.missing,
        });
    }
    Ok(Snapshot {
        repo: dir.display().to_string(),
        revision: "local".to_string(),
        commit: None,
        names: found.names,
        files: found.files,
    })
}

async fn online(
    spec: &FetchSpec,
    cache: &RepoCache,
    hub: &Hub,
    progress: &FetchProgress,
) -> Result<Snapshot, FetchError> {
    let found = resolve::on_hub(spec, cache, hub, progress).await?;
    let commit = found.commit;
    for file in &found.absent {
        cache.mark_absent(&commit, file)?;
        tracing::info!(file = %file, "{} has no {file} at {}; going without it", spec.repo, short(&commit));
    }
    let total = resolve::total_size(&found.metas);
    progress.set_total(total);
    tracing::info!(
        commit = %commit,
        files = found.metas.len(),
        bytes = total,
        "{} at {} is commit {}: {} in {} file(s)",
        spec.repo,
        spec.revision,
        short(&commit),
        progress::human_bytes(total),
        found.metas.len()
    );

    // Several files at once, their ranges sharing the fetch's connections.
    let transfers = download::Transfers::new(spec.options.connections);
    let mut jobs = Vec::new();
    for (i, meta) in found.metas.iter().enumerate() {
        if found.downloaded != Some(i) {
            jobs.push(download::ensure_blob(
                hub,
                cache,
                meta,
                progress,
                &spec.options,
                &transfers,
            ));
        }
    }
    download::at_most(transfers.count(), jobs).await?;
    let (mut names, mut files) = (Vec::new(), Vec::new());
    for meta in &found.metas {
        files.push(cache.link(&commit, &meta.file, &meta.etag)?);
        names.push(meta.file.clone());
    }
    cache.write_ref(&commit)?;
    Ok(Snapshot {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        commit: Some(commit),
        names,
        files,
    })
}

/// Every file from the cache (an optional file only if the cache has it or
/// records that the commit lacks it), or `None` if any is missing.
fn from_cache(spec: &FetchSpec, cache: &RepoCache) -> Option<Snapshot> {
    let commit = cache.cached_commit()?;
    let found = in_cache(spec, cache, Some(commit.clone()));
    if !found.missing.is_empty() {
        return None;
    }
    Some(Snapshot {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        commit: Some(commit),
        names: found.names,
        files: found.files,
    })
}

/// The set as the cache holds it at `commit`: what it has, and what it lacks.
fn in_cache(spec: &FetchSpec, cache: &RepoCache, commit: Option<String>) -> resolve::Shelved {
    // The cache's shelf reports an unusable copy as missing rather than failing;
    // were it to fail, nothing would count as cached.
    resolve::on_shelf(&spec.files, &resolve::CacheShelf { cache, commit }).unwrap_or_else(|_| {
        resolve::Shelved {
            missing: spec.files.declared().map(str::to_string).collect(),
            ..Default::default()
        }
    })
}

fn offline_missing(spec: &FetchSpec, cache: &RepoCache) -> FetchError {
    let commit = cache.cached_commit();
    let missing = match commit {
        Some(_) => in_cache(spec, cache, commit).missing,
        None => spec.files.declared().map(str::to_string).collect(),
    };
    FetchError::OfflineMissing {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        cache: cache::hub_dir(&spec.cache_dir),
        missing,
    }
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
}
