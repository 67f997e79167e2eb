//! The fetch's errors, each saying what to do about it.

use std::path::PathBuf;

/// Why the model's files could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{repo} is gated or private and {}: the Hub answered {status} for {url}", token_advice(*.token_sent))]
    Unauthorized {
        repo: String,
        url: String,
        status: u16,
        token_sent: bool,
    },
    #[error("{}", not_found_message(.repo, .revision, .file.as_deref(), .code.as_deref()))]
    NotFound {
        repo: String,
        revision: String,
        file: Option<String>,
        /// The Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).
        code: Option<String>,
    },
    #[error("{file} failed its check {attempts} times (expected {expected}, got {got}); the Hub or a proxy is serving wrong bytes")]
    Integrity {
        file: String,
        expected: String,
        got: String,
        attempts: u32,
    },
    #[error("the disk is full writing {}: {} more are needed for this file ({} in all); free that much on the volume (on Fly: fly volumes extend), or point HARNESS_CACHE_DIR at a larger disk. The {} downloaded so far are kept in that .incomplete file and the download resumes from there", .path.display(), crate::fetch::progress::human_bytes(*.needed_bytes), crate::fetch::progress::human_bytes(*.size), crate::fetch::progress::human_bytes(*.kept_bytes))]
    DiskFull {
        /// The `.incomplete` file.
        path: PathBuf,
        /// Bytes still to write for this file.
        needed_bytes: u64,
        /// The file's size.
        size: u64,
        /// Bytes of it on disk, kept for resuming.
        kept_bytes: u64,
    },
    #[error("the pattern {pattern:?} in HARNESS_MODEL_FILES matches none of the {listed} files of {repo} at {revision}: check HARNESS_MODEL_FILES")]
    NoMatch {
        pattern: String,
        repo: String,
        revision: String,
        listed: usize,
    },
    #[error("cannot write the cache at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the Hub answered {status} for {url} after {attempts} attempts")]
    Http {
        url: String,
        status: u16,
        attempts: u32,
    },
    #[error("cannot reach the Hub at {url} after {attempts} attempts: {message}; check HF_ENDPOINT and the network, or set HARNESS_OFFLINE=1 to use the cache")]
    Unreachable {
        url: String,
        message: String,
        attempts: u32,
    },
    #[error("the Hub's answer for {url} is missing {what}")]
    Protocol { url: String, what: String },
    #[error("HARNESS_OFFLINE is set and the cache at {cache} lacks {repo} at {revision}: missing {}; run `harness fetch` once with network access", .missing.join(", "))]
    OfflineMissing {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: Vec<String>,
    },
    #[error("HARNESS_MODEL_DIR {dir} lacks {}", .missing.join(", "))]
    LocalMissing { dir: PathBuf, missing: Vec<String> },
    #[error("{repo} at {revision} has no safetensors weights: neither {single} nor {index}; check HARNESS_MODEL_REPO and HARNESS_MODEL_REVISION (a repo with other weights needs its files listed in HARNESS_MODEL_FILES)")]
    NoWeights {
        repo: String,
        revision: String,
        single: String,
        index: String,
    },
    #[error("{index} of {repo} at {revision} names the shard {shard}, which the repo does not have: the upload is incomplete; pin a revision whose shards are all there (HARNESS_MODEL_REVISION)")]
    MissingShard {
        repo: String,
        revision: String,
        index: String,
        shard: String,
    },
    #[error("{index} cannot be read as a safetensors index: {reason}; fix the repo, pin a revision whose index is sound (HARNESS_MODEL_REVISION), or list the files in HARNESS_MODEL_FILES")]
    BadIndex {
        /// The index, in the repo or in `HARNESS_MODEL_DIR`.
        index: String,
        reason: String,
    },
    #[error("invalid fetch setting: {0}")]
    Config(String),
}

fn token_advice(token_sent: bool) -> &'static str {
    if token_sent {
        "HF_TOKEN was refused: check the token has read access and that its account accepted the model's terms"
    } else {
        "no token was sent: set HF_TOKEN to a token with read access (https://huggingface.co/settings/tokens)"
    }
}

fn not_found_message(repo: &str, revision: &str, file: Option<&str>, code: Option<&str>) -> String {
    let advice = "check HARNESS_MODEL_REPO, HARNESS_MODEL_REVISION and HARNESS_MODEL_FILES";
    match (code, file) {
        (Some("RepoNotFound"), _) | (_, None) => format!(
            "repo {repo} not found on the Hub (or it is private and HF_TOKEN is unset): {advice}"
        ),
        (Some("RevisionNotFound"), _) => {
            format!("revision {revision} not found in {repo}: {advice}")
        }
        (_, Some(file)) => {
            format!("file {file} not found in {repo} at revision {revision}: {advice}")
        }
    }
}

impl FetchError {
    /// Whether the Hub said that the file asked for is not in the repo: a 404 with
    /// `X-Error-Code: EntryNotFound`, or with no code (as a mirror may answer),
    /// rather than one saying the repo or the revision is not there.
    pub(crate) fn is_missing_file(&self) -> bool {
        matches!(
            self,
            FetchError::NotFound { file: Some(_), code, .. }
                if code.as_deref().is_none_or(|c| c == "EntryNotFound")
        )
    }

    /// Whether this is the Hub being unreachable (or failing), as opposed to an
    /// answer about the request: only then does a branch fall back to the cache.
    pub fn is_hub_unavailable(&self) -> bool {
        matches!(self, FetchError::Unreachable { .. })
            || matches!(self, FetchError::Http { status, .. } if *status >= 500 || *status == 429)
    }
}
