//! The Hugging Face cache layout (Python's `huggingface_hub` reads and shares it):
//!
//! ```text
//! <cache>/huggingface/hub/models--org--name/
//!     blobs/<etag>                  verified content; `<etag>.incomplete` while downloading
//!     refs/<revision>               the commit a branch or tag pointed at
//!     snapshots/<commit>/<file>     relative symlink to ../../blobs/<etag>
//!     .no_exist/<commit>/<file>     empty: the repo has no such file at that commit
//!     .listing/<commit>             the repo's files at that commit (harness's own,
//!                                   for HARNESS_MODEL_FILES patterns)
//! <cache>/huggingface/hub/.locks/models--org--name/<etag>.lock
//! ```
//!
//! Every name appears atomically (write aside, then rename), so a process killed
//! at any moment leaves a cache the next run can use: at worst an `.incomplete`
//! blob, which is resumed.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};

use super::FetchError;

/// One repo's corner of the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    hub_dir: PathBuf,
    repo_id: String,
    repo: Repo,
    folder: String,
}

impl RepoCache {
    /// `cache_root` is `HARNESS_CACHE_DIR`; the Hub layout lives under
    /// `<cache_root>/huggingface/hub`.
    pub fn new(cache_root: &Path, repo_id: &str, revision: &str) -> Self {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        RepoCache {
            hub_dir: hub_dir(cache_root),
            repo_id: repo_id.to_string(),
            folder: repo.folder_name(),
            repo,
        }
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// `org/name`.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    fn root(&self) -> PathBuf {
        self.hub_dir.join(&self.folder)
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.root().join("blobs").join(etag)
    }

    pub fn incomplete_path(&self, etag: &str) -> PathBuf {
        self.root().join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn lock_path(&self, etag: &str) -> PathBuf {
        self.hub_dir
            .join(".locks")
            .join(&self.folder)
            .join(format!("{etag}.lock"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root().join("snapshots").join(commit)
    }

    /// The commit this revision resolves to in the cache: the revision itself when it
    /// is a commit, else what `refs/<revision>` says.
    pub fn cached_commit(&self) -> Option<String> {
        let revision = self.repo.revision();
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.root().join("refs").join(revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    /// The cached path of `file` at this revision, using hf-hub's own lookup for
    /// branches so that we read the cache exactly as the Hub's clients write it.
    pub fn cached_file(&self, file: &str) -> Option<PathBuf> {
        let commit = self.cached_commit()?;
        let path = if is_commit(self.repo.revision()) {
            self.snapshot_dir(&commit).join(file)
        } else {
            Cache::new(self.hub_dir.clone())
                .repo(self.repo.clone())
                .get(file)?
        };
        // A snapshot entry whose blob is gone (pruned by hand) is not cached.
        path.metadata().is_ok().then_some(path)
    }

    /// `.no_exist/<commit>/<file>`: the record that the repo has no `file` at
    /// `commit`, as Python's `huggingface_hub` writes and reads it.
    pub fn no_exist_path(&self, commit: &str, file: &str) -> PathBuf {
        self.root().join(".no_exist").join(commit).join(file)
    }

    /// `.listing/<commit>`: the repo's files at `commit`, one per line, kept so
    /// that `HARNESS_MODEL_FILES` patterns resolve without the Hub once fetched.
    fn listing_path(&self, commit: &str) -> PathBuf {
        self.root().join(".listing").join(commit)
    }

    /// The repo's files at `commit`, as the Hub listed them, when recorded.
    pub fn listing(&self, commit: &str) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.listing_path(commit)).ok()?;
        Some(text.lines().map(str::to_string).collect())
    }

    /// Records the repo's files at `commit` (a commit never changes), atomically.
    pub fn write_listing(&self, commit: &str, files: &[String]) -> Result<(), FetchError> {
        let mut text = files.join("\n");
        text.push('\n');
        write_atomically(&self.listing_path(commit), text.as_bytes())
    }

    /// Whether the cache records that the repo has no `file` at `commit`.
    pub fn is_absent(&self, commit: &str, file: &str) -> bool {
        self.no_exist_path(commit, file).is_file()
    }

    /// Records that the repo has no `file` at `commit` (a commit never changes, so
    /// the record holds for good), atomically.
    pub fn mark_absent(&self, commit: &str, file: &str) -> Result<(), FetchError> {
        let path = self.no_exist_path(commit, file);
        if path.is_file() {
            return Ok(());
        }
        write_atomically(&path, b"")
    }

    /// Points `refs/<revision>` at `commit`, atomically.
    pub fn write_ref(&self, commit: &str) -> Result<(), FetchError> {
        let revision = self.repo.revision();
        if revision == commit {
            return Ok(());
        }
        let path = self.root().join("refs").join(revision);
        write_atomically(&path, commit.as_bytes())
    }

    /// Makes `snapshots/<commit>/<file>` a relative symlink to `blobs/<etag>`,
    /// atomically, replacing whatever was there.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, FetchError> {
        let entry = self.snapshot_dir(commit).join(file);
        let parent = entry.parent().expect("a snapshot entry has a parent");
        create_dir_all(parent)?;
        let target = relative_path(parent, &self.blob_path(etag));
        if std::fs::read_link(&entry).is_ok_and(|existing| existing == target) {
            return Ok(entry);
        }
        let aside = aside_name(&entry);
        let io_err = |source| FetchError::Io {
            path: entry.clone(),
            source,
        };
        std::os::unix::fs::symlink(&target, &aside).map_err(io_err)?;
        std::fs::rename(&aside, &entry).map_err(|e| {
            let _ = std::fs::remove_file(&aside);
            io_err(e)
        })?;
        Ok(entry)
    }
}

/// Where the Hub layout lives under a cache root.
pub fn hub_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("huggingface").join("hub")
}

/// A 40-hex git commit id.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An exclusive lock on one blob, shared with other processes (`flock`), so two
/// processes never write the same blob. Released when dropped or when the process dies.
pub struct BlobLock {
    _file: std::fs::File,
}

impl BlobLock {
    /// Waits for the lock as long as it takes: the holder is downloading the same
    /// file, and the kernel frees the lock if it dies.
    pub async fn acquire(
        path: &Path,
        file: &str,
        progress: &super::FetchProgress,
    ) -> Result<Self, FetchError> {
        create_dir_all(path.parent().expect("a lock has a parent"))?;
        let handle = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| FetchError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let mut told = false;
        let locked = loop {
            match handle.try_lock() {
                Ok(()) => break Ok(BlobLock { _file: handle }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !told {
                        let why = format!(
                            "another process is downloading {file} into this cache; waiting for it"
                        );
                        tracing::info!(file, lock = %path.display(), "{why}");
                        progress.set_waiting(Some(why));
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    break Err(FetchError::Io {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        if told {
            progress.set_waiting(None);
        }
        locked
    }
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), FetchError> {
    std::fs::create_dir_all(dir).map_err(|source| FetchError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `bytes` beside `path` and renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    create_dir_all(path.parent().expect("a cache entry has a parent"))?;
    let aside = aside_name(path);
    let result = std::fs::write(&aside, bytes).and_then(|()| std::fs::rename(&aside, path));
    result.map_err(|source: io::Error| {
        let _ = std::fs::remove_file(&aside);
        FetchError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// A name beside `path` that no other process or thread will pick.
fn aside_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// `to` as seen from the folder `from` (both absolute or both relative).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_pythons() {
        let cache = RepoCache::new(
            Path::new("/data/cache"),
            "sentence-transformers/all-MiniLM-L6-v2",
            "main",
        );
        assert_eq!(
            cache.blob_path("abc"),
            Path::new("/data/cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/blobs/abc")
        );
        assert_eq!(
            cache.lock_path("abc"),
            Path::new("/data/cache/huggingface/hub/.locks/models--sentence-transformers--all-MiniLM-L6-v2/abc.lock")
        );
    }

    #[test]
    fn snapshot_links_are_relative_even_in_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "org/name", "main");
        let commit = "a".repeat(40);
        create_dir_all(cache.blob_path("e1").parent().unwrap()).unwrap();
        std::fs::write(cache.blob_path("e1"), b"hello").unwrap();
        let entry = cache.link(&commit, "onnx/model.bin", "e1").unwrap();
        assert_eq!(
            std::fs::read_link(&entry).unwrap(),
            Path::new("../../../blobs/e1")
        );
        assert_eq!(std::fs::read(&entry).unwrap(), b"hello");
        // Linking again (another process did the same) is harmless.
        cache.link(&commit, "onnx/model.bin", "e1").unwrap();
        cache.write_ref(&commit).unwrap();
        assert_eq!(cache.cached_commit(), Some(commit.clone()));
        assert_eq!(cache.cached_file("onnx/model.bin"), Some(entry));
        assert_eq!(cache.cached_file("missing.bin"), None);
    }

    #[test]
    fn absent_files_are_recorded_per_commit_as_python_does() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "org/name", "main");
        let (commit, other) = ("a".repeat(40), "b".repeat(40));
        assert!(!cache.is_absent(&commit, "chat_template.jinja"));
        cache.mark_absent(&commit, "chat_template.jinja").unwrap();
        cache.mark_absent(&commit, "chat_template.jinja").unwrap();
        cache.mark_absent(&commit, "sub/extra.json").unwrap();
        assert!(cache.is_absent(&commit, "chat_template.jinja"));
        assert!(cache.is_absent(&commit, "sub/extra.json"));
        assert!(!cache.is_absent(&other, "chat_template.jinja"));
        let marker = dir.path().join(format!(
            "huggingface/hub/models--org--name/.no_exist/{commit}/chat_template.jinja"
        ));
        assert_eq!(std::fs::read(marker).unwrap(), b"");
    }

    #[test]
    fn commits_are_forty_hex_digits() {
        assert!(is_commit(&"0123456789abcdef".repeat(3)[..40]));
        assert!(!is_commit("main"));
        assert!(!is_commit(&"g".repeat(40)));
    }
}
