//! A [`FileSet`] resolved to files: on the Hub (a `HEAD` per file, the index read
//! for its shards), or where no Hub is asked, in the cache (with its records of
//! the files a commit lacks) or in a local folder. The rules are the same
//! everywhere: every required file, each optional file that is there, and the
//! weights: the index and every shard it names when there is an index, else the
//! single file.

use std::path::{Path, PathBuf};

use super::cache::{is_commit, RepoCache};
use super::files::{index_shards, FileSet, Weights};
use super::hub::{Attempt, FileMeta, Hub};
use super::retry::Retries;
use super::{download, verify, FetchError, FetchOptions, FetchProgress, FetchSpec};

/// The set on the Hub at one commit: every file's metadata, in order, and the
/// files the commit lacks.
pub(super) struct OnHub {
    pub commit: String,
    pub metas: Vec<FileMeta>,
    /// Optional files (and the index) the repo does not have.
    pub absent: Vec<String>,
    /// The index, already downloaded to read its shards (its place in `metas`).
    pub downloaded: Option<usize>,
}

/// Asks the Hub about every file of `spec.files`. The first answer resolves the
/// revision to a commit and the rest are asked for at that commit, so a branch
/// that moves meanwhile cannot mix two snapshots. The index, when there is one, is
/// downloaded (and verified) here: its shards are only known from its content.
pub(super) async fn on_hub(
    spec: &FetchSpec,
    cache: &RepoCache,
    hub: &Hub,
    progress: &FetchProgress,
) -> Result<OnHub, FetchError> {
    let mut asker = Asker {
        spec,
        cache,
        hub,
        commit: None,
    };
    let files = match spec.files.patterns().next() {
        None => spec.files.clone(),
        Some(_) => asker.expand().await?,
    };
    let (mut metas, mut absent) = (Vec::new(), Vec::new());
    for file in &files.required {
        metas.push(asker.head(file).await?);
    }
    for file in &files.optional {
        match asker.head_if_there(file).await? {
            Some(meta) => metas.push(meta),
            None => absent.push(file.clone()),
        }
    }
    let mut downloaded = None;
    if let Some(weights) = files.weights {
        match asker.head_if_there(weights.index).await? {
            Some(index) => {
                progress.set_total(total_size(&metas) + index.size);
                let transfers = download::Transfers::new(spec.options.connections);
                download::ensure_blob(hub, cache, &index, progress, &spec.options, &transfers)
                    .await?;
                let bytes = std::fs::read(cache.blob_path(&index.etag)).map_err(|source| {
                    FetchError::Io {
                        path: cache.blob_path(&index.etag),
                        source,
                    }
                })?;
                let shards =
                    index_shards(weights.index, &bytes).map_err(|reason| FetchError::BadIndex {
                        index: format!("{} of {} at {}", weights.index, spec.repo, spec.revision),
                        reason,
                    })?;
                downloaded = Some(metas.len());
                metas.push(index);
                for shard in shards {
                    match asker.head_if_there(&shard).await? {
                        Some(meta) => metas.push(meta),
                        None => {
                            return Err(FetchError::MissingShard {
                                repo: spec.repo.clone(),
                                revision: spec.revision.clone(),
                                index: weights.index.to_string(),
                                shard,
                            })
                        }
                    }
                }
            }
            None => {
                absent.push(weights.index.to_string());
                match asker.head_if_there(weights.single).await? {
                    Some(meta) => metas.push(meta),
                    None => return Err(no_weights(spec, weights)),
                }
            }
        }
    }
    let commit = asker.commit.ok_or_else(|| {
        FetchError::Config(format!(
            "none of the files {} is in {} at {}",
            spec.files, spec.repo, spec.revision
        ))
    })?;
    Ok(OnHub {
        commit,
        metas,
        absent,
        downloaded,
    })
}

fn no_weights(spec: &FetchSpec, weights: Weights) -> FetchError {
    FetchError::NoWeights {
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        single: weights.single.to_string(),
        index: weights.index.to_string(),
    }
}

pub(super) fn total_size(metas: &[FileMeta]) -> u64 {
    metas.iter().map(|m| m.size).sum()
}

/// Asks the Hub about one file after another, at the commit the first answer gave.
struct Asker<'a> {
    spec: &'a FetchSpec,
    cache: &'a RepoCache,
    hub: &'a Hub,
    commit: Option<String>,
}

impl Asker<'_> {
    /// The set with its patterns resolved against the repo's files, listed at
    /// the revision's commit (which every later question then asks at), and
    /// the list recorded in the cache.
    async fn expand(&mut self) -> Result<FileSet, FetchError> {
        let (spec, hub) = (self.spec, self.hub);
        let url = format!("{}/api/models/{}", spec.endpoint, spec.repo);
        let mut retries = Retries::new(
            &spec.options,
            url.clone(),
            "listing the repo's files".into(),
        );
        let (commit, listing) = loop {
            match hub.list_files(&spec.revision).await {
                Ok(found) => break found,
                Err(failure) => retries.after(failure).await?,
            }
        };
        if !is_commit(&commit) {
            return Err(FetchError::Protocol {
                url,
                what: format!("a 40-hex sha (got {commit:?})"),
            });
        }
        self.cache.write_listing(&commit, &listing)?;
        let files = expand(spec, &spec.files, &listing)?;
        tracing::info!(files = %files, "HARNESS_MODEL_FILES resolved at {}: {files}", &commit[..10]);
        self.commit = Some(commit);
        Ok(files)
    }

    async fn head(&mut self, file: &str) -> Result<FileMeta, FetchError> {
        let hub = self.hub;
        let revision = self.commit.as_deref().unwrap_or(&self.spec.revision);
        // The first request names the cached copy, so that the Hub can answer 304.
        let known = match self.commit {
            None => cached_blob(self.cache, file),
            Some(_) => None,
        };
        let url = hub.resolve_url(revision, file);
        let meta = with_retries(&self.spec.options, file, url.clone(), || {
            hub.head(
                revision,
                file,
                known.as_ref().map(|(e, size)| (e.as_str(), *size)),
            )
        })
        .await?;
        if self.commit.is_none() {
            if !is_commit(&meta.commit) {
                return Err(FetchError::Protocol {
                    url,
                    what: format!("a 40-hex X-Repo-Commit (got {:?})", meta.commit),
                });
            }
            self.commit = Some(meta.commit.clone());
        }
        Ok(meta)
    }

    /// `None` when the repo does not have `file`.
    async fn head_if_there(&mut self, file: &str) -> Result<Option<FileMeta>, FetchError> {
        match self.head(file).await {
            Ok(meta) => Ok(Some(meta)),
            Err(err) if err.is_missing_file() => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// `set`'s patterns resolved against `listing`, or the error naming the
/// pattern that matches nothing.
fn expand(spec: &FetchSpec, set: &FileSet, listing: &[String]) -> Result<FileSet, FetchError> {
    set.expand(listing).map_err(|pattern| FetchError::NoMatch {
        pattern,
        repo: spec.repo.clone(),
        revision: spec.revision.clone(),
        listed: listing.len(),
    })
}

/// Runs `attempt` until it succeeds, fails for good, or runs out of attempts.
async fn with_retries<F, Fut>(
    options: &FetchOptions,
    file: &str,
    url: String,
    mut attempt: F,
) -> Result<FileMeta, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<FileMeta, Attempt>>,
{
    let mut retries = Retries::new(options, url, format!("asking the Hub about {file}"));
    loop {
        match attempt().await {
            Ok(meta) => return Ok(meta),
            Err(failure) => retries.after(failure).await?,
        }
    }
}

/// The etag and size of the cached copy of `file` at this revision, so the Hub
/// can answer 304.
fn cached_blob(cache: &RepoCache, file: &str) -> Option<(String, u64)> {
    let path = cache.cached_file(file)?;
    let size = path.metadata().ok()?.len();
    let target = std::fs::read_link(path).ok()?;
    let etag = target.file_name()?.to_str()?.to_string();
    Some((etag, size))
}

/// The set found where no Hub is asked: the files by name, in order, and what is
/// missing (or, in the cache, not known to be absent).
#[derive(Debug, Default)]
pub(super) struct Shelved {
    pub names: Vec<String>,
    pub files: Vec<PathBuf>,
    pub missing: Vec<String>,
}

/// Where a set's files are found without the Hub.
pub(super) trait Shelf {
    /// The local path of `file`, when it is there.
    fn find(&self, file: &str) -> Option<PathBuf>;
    /// Whether `file`, not found, is known not to be in the repo.
    fn known_absent(&self, file: &str) -> bool;
    /// The shards the index at `path` names; `None` when this copy cannot be used
    /// (then the index counts as missing).
    fn shards(&self, index: &str, path: &Path) -> Result<Option<Vec<String>>, FetchError>;
    /// The repo's files, for `HARNESS_MODEL_FILES` patterns, when known here.
    fn listing(&self) -> Option<Vec<String>>;
    /// The repo and revision this shelf holds, for errors.
    fn origin(&self) -> (String, String);
}

/// The files of `set` on `shelf`, by the same rules as on the Hub.
pub(super) fn on_shelf(set: &FileSet, shelf: &impl Shelf) -> Result<Shelved, FetchError> {
    let mut out = Shelved::default();
    let expanded;
    let set = match (set.patterns().next(), shelf.listing()) {
        (None, _) => set,
        (Some(_), Some(listing)) => {
            expanded = set.expand(&listing).map_err(|pattern| {
                let (repo, revision) = shelf.origin();
                FetchError::NoMatch {
                    pattern,
                    repo,
                    revision,
                    listed: listing.len(),
                }
            })?;
            &expanded
        }
        // Patterns need the repo's list, which is not here.
        (Some(_), None) => {
            out.missing.extend(set.patterns().map(str::to_string));
            return Ok(out);
        }
    };
    for file in &set.required {
        out.take(file, shelf.find(file));
    }
    for file in &set.optional {
        match shelf.find(file) {
            Some(path) => out.take(file, Some(path)),
            None if shelf.known_absent(file) => {}
            None => out.missing.push(file.clone()),
        }
    }
    if let Some(weights) = set.weights {
        match shelf.find(weights.index) {
            Some(path) => match shelf.shards(weights.index, &path)? {
                Some(shards) => {
                    out.take(weights.index, Some(path));
                    for shard in &shards {
                        out.take(shard, shelf.find(shard));
                    }
                }
                None => out.missing.push(weights.index.to_string()),
            },
            None if shelf.known_absent(weights.index) => {
                out.take(weights.single, shelf.find(weights.single));
            }
            None => out.missing.push(weights.index.to_string()),
        }
    }
    Ok(out)
}

impl Shelved {
    fn take(&mut self, file: &str, path: Option<PathBuf>) {
        match path {
            Some(path) => {
                self.names.push(file.to_string());
                self.files.push(path);
            }
            None => self.missing.push(file.to_string()),
        }
    }
}

/// The cache at the commit its revision resolves to, with its `.no_exist` records.
pub(super) struct CacheShelf<'a> {
    pub cache: &'a RepoCache,
    pub commit: Option<String>,
}

impl Shelf for CacheShelf<'_> {
    fn find(&self, file: &str) -> Option<PathBuf> {
        self.cache.cached_file(file)
    }

    fn known_absent(&self, file: &str) -> bool {
        self.commit
            .as_deref()
            .is_some_and(|commit| self.cache.is_absent(commit, file))
    }

    fn listing(&self) -> Option<Vec<String>> {
        self.cache.listing(self.commit.as_deref()?)
    }

    fn origin(&self) -> (String, String) {
        let revision = self.cache.repo().revision().to_string();
        (self.cache.repo_id().to_string(), revision)
    }

    /// A cached index was parsed when it was fetched: one that no longer parses
    /// has changed on disk. If its hash says so, it is removed, so that the next
    /// fetch downloads it again.
    fn shards(&self, index: &str, path: &Path) -> Result<Option<Vec<String>>, FetchError> {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| index_shards(index, &bytes));
        match parsed {
            Ok(shards) => Ok(Some(shards)),
            Err(reason) => {
                tracing::warn!(index, %reason, "the cached {index} cannot be read");
                for corrupt in verify::verify_files(&[path.to_path_buf()]) {
                    tracing::warn!("{corrupt}: removed it");
                    let _ = verify::evict(&corrupt);
                }
                Ok(None)
            }
        }
    }
}

/// A local model folder (`HARNESS_MODEL_DIR`): what it does not hold is absent.
pub(super) struct DirShelf<'a> {
    pub dir: &'a Path,
}

impl Shelf for DirShelf<'_> {
    fn find(&self, file: &str) -> Option<PathBuf> {
        let path = self.dir.join(file);
        path.is_file().then_some(path)
    }

    fn known_absent(&self, _file: &str) -> bool {
        true
    }

    /// Every file under the folder, by its path inside it (a file linked to,
    /// as a snapshot's are, counts). Linked folders are not followed, so a
    /// loop of links cannot make the walk endless; an unreadable folder is
    /// skipped.
    fn listing(&self) -> Option<Vec<String>> {
        let mut files = Vec::new();
        let mut folders = vec![self.dir.to_path_buf()];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                tracing::warn!(folder = %folder.display(), "cannot read {}; its files are not matched", folder.display());
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let is_folder = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_folder {
                    folders.push(path);
                } else if path.is_file() {
                    if let Ok(inside) = path.strip_prefix(self.dir) {
                        files.push(inside.to_string_lossy().into_owned());
                    }
                }
            }
        }
        Some(files)
    }

    fn origin(&self) -> (String, String) {
        (self.dir.display().to_string(), "local".to_string())
    }

    fn shards(&self, index: &str, path: &Path) -> Result<Option<Vec<String>>, FetchError> {
        let bytes = std::fs::read(path).map_err(|source| FetchError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        index_shards(index, &bytes)
            .map(Some)
            .map_err(|reason| FetchError::BadIndex {
                index: path.display().to_string(),
                reason,
            })
    }
}
