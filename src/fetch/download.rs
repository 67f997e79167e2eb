//! One blob's transfer: locked against other processes, resumed with `Range`,
//! retried with backoff, verified, and only then given its final name.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::cache::{BlobLock, RepoCache};
use super::hub::{Attempt, FileMeta, Hub};
use super::progress::{FetchProgress, FileMeter};
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
    let _lock = BlobLock::acquire(&cache.lock_path(&meta.etag), &meta.file).await?;
    if blob_is_whole(&blob, meta.size) {
        tracing::info!(file = %meta.file, "{} was downloaded by another process", meta.file);
        progress.add_done(meta.size);
        return Ok(());
    }
    let part = cache.incomplete_path(&meta.etag);
    super::cache::create_dir_all(part.parent().expect("a blob has a folder"))?;
    let mut meter = FileMeter::start(progress, &meta.file, meta.size, options.progress_every);
    let mut failures = 0u32;
    let mut bad_content = 0u32;
    loop {
        let before = file_len(&part);
        match transfer(hub, meta, &part, &mut meter).await {
            Ok(()) => {}
            Err(Attempt::Fatal(err)) => return Err(err),
            Err(Attempt::Retry {
                reason,
                after,
                status,
            }) => {
                // A transfer that moved forward resets the count: a slow, flaky link
                // still finishes, while a dead one gives up.
                if file_len(&part) > before {
                    failures = 0;
                }
                failures += 1;
                if failures >= options.max_attempts {
                    return Err(match status {
                        Some(status) => FetchError::Http {
                            url: meta.download_url.clone(),
                            status,
                            attempts: failures,
                        },
                        None => FetchError::Unreachable {
                            url: meta.download_url.clone(),
                            message: reason,
                            attempts: failures,
                        },
                    });
                }
                let delay = options.delay(failures, after);
                tracing::warn!(file = %meta.file, attempt = failures, "{}: {reason}; retrying in {delay:?}", meta.file);
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        match check_content(&part, meta).await? {
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
/// `Ok` means the file now holds exactly the announced size.
async fn transfer(
    hub: &Hub,
    meta: &FileMeta,
    part: &Path,
    meter: &mut FileMeter<'_>,
) -> Result<(), Attempt> {
    let mut have = file_len(part);
    if have > meta.size {
        truncate(part, 0, meta.size)?;
        have = 0;
    }
    meter.resume_at(have);
    if have == meta.size {
        return Ok(());
    }

    let mut url = meta.download_url.clone();
    let mut redirects = 0;
    let response = loop {
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
        break response;
    };

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
        }
        StatusCode::OK => {
            if have > 0 {
                // The server ignores Range: take the whole file again.
                truncate(part, 0, meta.size)?;
                have = 0;
                meter.resume_at(0);
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            truncate(part, 0, meta.size)?;
            return Err(retry_now(
                "the server refused the resume range; starting over",
            ));
        }
        _ => return Err(hub.status_failure(&url, Some(&meta.file), &response)),
    }

    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .await
        .map_err(|e| write_error(part, e, meta.size))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut body = response.bytes_stream();
    // Whatever happens, what arrived is flushed to disk so that the next attempt
    // (or the next process) resumes after it.
    let streamed: Result<(), Attempt> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| hub.transport(&url, e))?;
            if have + chunk.len() as u64 > meta.size {
                return Err(retry_now("the server sent more bytes than it announced"));
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| write_error(part, e, meta.size))?;
            have += chunk.len() as u64;
            meter.advance(chunk.len() as u64);
        }
        Ok(())
    }
    .await;
    out.flush()
        .await
        .map_err(|e| write_error(part, e, meta.size))?;
    out.get_ref()
        .sync_data()
        .await
        .map_err(|e| write_error(part, e, meta.size))?;
    if let Err(Attempt::Retry { reason, .. }) = &streamed {
        if reason.contains("more bytes") {
            truncate(part, 0, meta.size)?;
        }
    }
    streamed?;
    if have < meta.size {
        return Err(Attempt::Retry {
            reason: format!("the transfer ended early, at {have} of {} bytes", meta.size),
            after: None,
            status: None,
        });
    }
    Ok(())
}

/// `None` when the file is right; else what its digest (or size) was.
async fn check_content(part: &Path, meta: &FileMeta) -> Result<Option<String>, FetchError> {
    let len = file_len(part);
    if len != meta.size {
        return Ok(Some(format!("{len} bytes instead of {}", meta.size)));
    }
    let Some(expected) = meta.sha256().map(str::to_ascii_lowercase) else {
        return Ok(None); // not an LFS file: its size is what the Hub lets us check
    };
    let path = part.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .map_err(|e| FetchError::Io {
            path: part.to_path_buf(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| FetchError::Io {
            path: part.to_path_buf(),
            source,
        })?;
    Ok((digest != expected).then_some(digest))
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
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
        FetchError::DiskFull {
            path: path.to_path_buf(),
            needed_bytes: size,
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
