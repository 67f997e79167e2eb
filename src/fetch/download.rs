//! One blob's transfer: locked against other processes, resumed with `Range`,
//! retried with backoff, verified, and only then given its final name.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

use super::blob_writer::BlobWriter;
use super::cache::{BlobLock, RepoCache};
use super::hub::{Attempt, FileMeta, Hub};
use super::progress::{FetchProgress, FileMeter};
use super::retry::Retries;
use super::{FetchError, FetchOptions};

/// How many times wrong content is fetched again before giving up.
const CONTENT_ATTEMPTS: u32 = 3;

/// Makes `blobs/<etag>` hold the verified file. Safe to run from several processes
/// at once: one downloads, the others wait for the lock and find the blob there.
pub(super) async fn ensure_blob(
    hub: &Hub,
    cache: &RepoCache,
    meta: &FileMeta,
    progress: &FetchProgress,
    options: &FetchOptions,
) -> Result<(), FetchError> {
    let blob = cache.blob_path(&meta.etag);
    if blob_is_whole(&blob, meta.size) {
        progress.add_done(meta.size);
        return Ok(());
    }
    let _lock = BlobLock::acquire(&cache.lock_path(&meta.etag), &meta.file, progress).await?;
    if blob_is_whole(&blob, meta.size) {
        tracing::info!(file = %meta.file, "{} was downloaded by another process", meta.file);
        progress.add_done(meta.size);
        return Ok(());
    }
    let part = cache.incomplete_path(&meta.etag);
    super::cache::create_dir_all(part.parent().expect("a blob has a folder"))?;
    let mut meter = FileMeter::start(progress, &meta.file, meta.size, options.progress_every);
    let mut retries = Retries::new(options, meta.download_url.clone(), meta.file.clone());
    let mut bad_content = 0u32;
    loop {
        let before = file_len(&part);
        let digest = match transfer(hub, meta, &part, &mut meter).await {
            Ok(digest) => digest,
            Err(failure) => {
                if file_len(&part) > before {
                    retries.progressed();
                }
                retries.after(failure).await?;
                continue;
            }
        };
        match check_content(&part, meta, digest.as_deref()) {
            None => {
                std::fs::rename(&part, &blob).map_err(|source| FetchError::Io {
                    path: blob.clone(),
                    source,
                })?;
                meter.finish();
                return Ok(());
            }
            Some(got) => {
                bad_content += 1;
                let _ = std::fs::remove_file(&part);
                meter.resume_at(0);
                let expected = meta.sha256().unwrap_or(&meta.etag).to_string();
                if bad_content >= CONTENT_ATTEMPTS {
                    return Err(FetchError::Integrity {
                        file: meta.file.clone(),
                        expected,
                        got,
                        attempts: bad_content,
                    });
                }
                tracing::warn!(file = %meta.file, %expected, %got, "{} failed its checksum; deleted it and downloading again", meta.file);
            }
        }
    }
}

/// One GET into the `.incomplete` file, resuming after what it already holds.
/// `Ok` means the file now holds exactly the announced size; for an LFS file it
/// carries the sha256 of the whole file, hashed as the bytes arrived (so a
/// gigabyte is not read back from disk to be checked).
async fn transfer(
    hub: &Hub,
    meta: &FileMeta,
    part: &Path,
    meter: &mut FileMeter<'_>,
) -> Result<Option<String>, Attempt> {
    let (mut have, mut hasher) = resume_point(meta, part, meter).await?;
    if have == meta.size {
        return Ok(hasher.map(hex_digest));
    }
    let (url, response) = get_following_redirects(hub, meta, have).await?;
    if starts_over(hub, meta, part, &url, &response, have)? {
        have = 0;
        meter.resume_at(0);
        hasher = hasher.map(|_| Sha256::new());
    }
    let body = Body {
        hub,
        meta,
        part,
        url: &url,
    };
    let hasher = body.write(response, have, hasher, meter).await?;
    Ok(hasher.map(hex_digest))
}

/// Where the `.incomplete` file resumes (a longer one than the file starts over),
/// with the sha256 of what it already holds for an LFS file.
async fn resume_point(
    meta: &FileMeta,
    part: &Path,
    meter: &mut FileMeter<'_>,
) -> Result<(u64, Option<Sha256>), Attempt> {
    let mut have = file_len(part);
    if have > meta.size {
        truncate(part, 0, meta.size)?;
        have = 0;
    }
    meter.resume_at(have);
    let hasher = match meta.sha256() {
        Some(_) => Some(
            hash_prefix(part, have)
                .await
                .map_err(|e| Attempt::Fatal(write_error(part, e, meta.size)))?,
        ),
        None => None,
    };
    Ok((have, hasher))
}

/// GET the file from byte `have` on, following up to 5 redirects (the Hub sends
/// LFS files to its CDN); the URL that answered, and its response.
async fn get_following_redirects(
    hub: &Hub,
    meta: &FileMeta,
    have: u64,
) -> Result<(String, reqwest::Response), Attempt> {
    let mut url = meta.download_url.clone();
    let mut redirects = 0;
    loop {
        let mut req = hub.request(Method::GET, &url);
        if have > 0 {
            req = req.header(header::RANGE, format!("bytes={have}-"));
        }
        let response = req.send().await.map_err(|e| hub.transport(&url, e))?;
        if response.status().is_redirection() && redirects < 5 {
            let next = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| reqwest::Url::parse(&url).ok()?.join(l).ok());
            if let Some(next) = next {
                url = next.to_string();
                redirects += 1;
                continue;
            }
        }
        return Ok((url, response));
    }
}

/// Reads the response's status against the resume point: `true` when the body is
/// the whole file again (a server that ignores `Range`), so the file starts over.
fn starts_over(
    hub: &Hub,
    meta: &FileMeta,
    part: &Path,
    url: &str,
    response: &reqwest::Response,
    have: u64,
) -> Result<bool, Attempt> {
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {
            let start = response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start != Some(have) {
                truncate(part, 0, meta.size)?;
                return Err(retry_now(
                    "the server answered another range than asked; starting over",
                ));
            }
            Ok(false)
        }
        StatusCode::OK if have > 0 => {
            truncate(part, 0, meta.size)?;
            Ok(true)
        }
        StatusCode::OK => Ok(false),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            truncate(part, 0, meta.size)?;
            Err(retry_now(
                "the server refused the resume range; starting over",
            ))
        }
        _ => Err(hub.status_failure(url, Some(&meta.file), response)),
    }
}

/// A response body on its way into the `.incomplete` file.
struct Body<'a> {
    hub: &'a Hub,
    meta: &'a FileMeta,
    part: &'a Path,
    url: &'a str,
}

impl Body<'_> {
    /// Streams the body after the file's first `have` bytes, hashing as it goes.
    /// Whatever happens, what arrived reaches the disk, so that the next attempt
    /// (or the next process) resumes after it.
    async fn write(
        &self,
        response: reqwest::Response,
        mut have: u64,
        hasher: Option<Sha256>,
        meter: &mut FileMeter<'_>,
    ) -> Result<Option<Sha256>, Attempt> {
        let (part, size) = (self.part, self.meta.size);
        let writer = BlobWriter::start(part, hasher)
            .map_err(|e| Attempt::Fatal(write_error(part, e, size)))?;
        let mut body = response.bytes_stream();
        let mut broken = None;
        let mut overflow = false;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(err) => {
                    broken = Some(self.hub.transport(self.url, err));
                    break;
                }
            };
            let len = chunk.len() as u64;
            if have + len > size {
                overflow = true;
                break;
            }
            if !writer.write(chunk).await {
                break; // the disk side failed: finish() says why
            }
            have += len;
            meter.advance(len);
        }
        let hasher = writer.finish().await.map_err(|e| {
            // Progress shows what is on disk, not what arrived and was not written.
            meter.resume_at(file_len(part));
            Attempt::Fatal(write_error(part, e, size))
        })?;
        if overflow {
            truncate(part, 0, size)?;
            return Err(retry_now(
                "the server sent more bytes than it announced; starting over",
            ));
        }
        if let Some(broken) = broken {
            return Err(broken);
        }
        if have < size {
            return Err(Attempt::Retry {
                reason: format!("the transfer ended early, at {have} of {size} bytes"),
                after: None,
                status: None,
            });
        }
        Ok(hasher)
    }
}

/// `None` when the file is right; else what its digest (or size) was.
fn check_content(part: &Path, meta: &FileMeta, digest: Option<&str>) -> Option<String> {
    let len = file_len(part);
    if len != meta.size {
        return Some(format!("{len} bytes instead of {}", meta.size));
    }
    if let Some(expected) = meta.sha256() {
        let digest = digest.unwrap_or_default();
        return (digest != expected.to_ascii_lowercase()).then(|| digest.to_string());
    }
    // A small (non-LFS) file's etag is its git blob id: small enough to read again.
    let etag = meta.etag.to_ascii_lowercase();
    if etag.len() != 40 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None; // no hash to check against: the size was checked
    }
    let got = super::verify::git_blob_sha1(part).unwrap_or_else(|e| format!("unreadable: {e}"));
    (got != etag).then_some(got)
}

/// The sha256 state after the first `len` bytes of `path`.
async fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    if len == 0 {
        return Ok(Sha256::new());
    }
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(&path)?.take(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(hasher);
            }
            hasher.update(&buf[..n]);
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

fn hex_digest(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn blob_is_whole(blob: &Path, size: u64) -> bool {
    std::fs::metadata(blob).is_ok_and(|m| m.is_file() && m.len() == size)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn truncate(path: &Path, len: u64, size: u64) -> Result<(), Attempt> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file
            .set_len(len)
            .map_err(|e| Attempt::Fatal(write_error(path, e, size))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Attempt::Fatal(write_error(path, e, size))),
    }
}

fn write_error(path: &Path, err: std::io::Error, size: u64) -> FetchError {
    if err.kind() == ErrorKind::StorageFull || err.kind() == ErrorKind::QuotaExceeded {
        let kept = file_len(path);
        FetchError::DiskFull {
            path: path.to_path_buf(),
            needed_bytes: size.saturating_sub(kept),
            size,
            kept_bytes: kept,
        }
    } else {
        FetchError::Io {
            path: path.to_path_buf(),
            source: err,
        }
    }
}

fn retry_now(reason: &str) -> Attempt {
    Attempt::Retry {
        reason: reason.to_string(),
        after: Some(Duration::ZERO),
        status: None,
    }
}

/// `bytes 100-199/200` → 100.
fn content_range_start(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_starts_are_read() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
    }
}
