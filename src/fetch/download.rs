//! One blob's transfer: locked against other processes, cut into byte ranges
//! fetched on several connections at once (one stream when the server ignores
//! `Range`), each range retried with backoff and resumed where it stopped, the
//! whole verified, and only then given its final name.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use reqwest::header;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::blob_writer::{BlobWriter, Buffered};
use super::cache::{BlobLock, RepoCache};
use super::hub::{Attempt, FileMeta, Hub};
use super::pieces::{Partial, Pieces};
use super::progress::{FetchProgress, FileMeter};
use super::retry::Retries;
use super::{FetchError, FetchOptions};

/// How many times wrong content is fetched again before giving up.
const CONTENT_ATTEMPTS: u32 = 3;

/// At most this many bytes off the network and not yet on disk, per fetch.
const BUFFERED_BYTES: usize = 16 << 20;

/// What one fetch's files share: the connections (`HARNESS_DOWNLOAD_CONNECTIONS`)
/// and the memory for bytes on their way to disk.
pub(super) struct Transfers {
    connections: Semaphore,
    count: usize,
    buffered: Buffered,
}

impl Transfers {
    pub fn new(connections: usize) -> Self {
        let count = connections.max(1);
        Transfers {
            connections: Semaphore::new(count),
            count,
            buffered: Buffered::new(BUFFERED_BYTES),
        }
    }

    /// How many connections may be open at once, and so how many files are
    /// fetched at once at most.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Makes `blobs/<etag>` hold the verified file. Safe to run from several processes
/// at once: one downloads, the others wait for the lock and find the blob there.
pub(super) async fn ensure_blob(
    hub: &Hub,
    cache: &RepoCache,
    meta: &FileMeta,
    progress: &FetchProgress,
    options: &FetchOptions,
    transfers: &Transfers,
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
    let partial = Partial::new(&blob);
    super::cache::create_dir_all(blob.parent().expect("a blob has a folder"))?;
    let meter = FileMeter::start(progress, &meta.file, meta.size, options.progress_every);
    let file = FileFetch {
        hub,
        meta,
        url: std::sync::Mutex::new(meta.download_url.clone()),
        refreshed: AtomicU32::new(0),
        partial: &partial,
        meter: &meter,
        options,
        transfers,
    };
    let mut bad_content = 0u32;
    loop {
        let digest = file.download().await?;
        match check_content(&partial.data, meta, digest.as_deref()) {
            None => {
                std::fs::rename(&partial.data, &blob).map_err(|source| FetchError::Io {
                    path: blob.clone(),
                    source,
                })?;
                partial.remove();
                meter.finish();
                return Ok(());
            }
            Some(got) => {
                bad_content += 1;
                partial.remove();
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

/// One file's download: its pieces, each on a connection of the fetch's.
struct FileFetch<'a> {
    hub: &'a Hub,
    meta: &'a FileMeta,
    /// Where the bytes are now: the CDN's signed URL, asked for again when the
    /// CDN refuses it (it expires, and ranges start long after the first).
    url: std::sync::Mutex<String>,
    /// How many times the URL was asked for again.
    refreshed: AtomicU32,
    partial: &'a Partial,
    meter: &'a FileMeter<'a>,
    options: &'a FetchOptions,
    transfers: &'a Transfers,
}

/// A response whose body is piece `piece`'s bytes from where it stands, with
/// the connection it holds and the URL that answered.
struct Answer<'a> {
    url: String,
    response: reqwest::Response,
    /// The byte the body starts at: where the range asked, or 0 for the whole
    /// file from a server that ignored `Range`.
    starts_at: u64,
    _connection: SemaphorePermit<'a>,
}

impl<'a> FileFetch<'a> {
    /// Fetches every unfinished piece into the partial file. `Ok` means the file
    /// is whole on disk; for an LFS file it carries the sha256 of the whole
    /// file, hashed as its prefix became whole (so a gigabyte is not read back
    /// from disk to be checked).
    async fn download(&self) -> Result<Option<String>, FetchError> {
        let size = self.meta.size;
        let pieces = self
            .partial
            .load(size, self.transfers.count)
            .map_err(|e| self.disk_error(e))?;
        self.meter.resume_at(pieces.bytes_done());
        // The first request goes alone: its answer says whether the server
        // serves ranges, before other connections are opened.
        let (pieces, first) = match pieces.unfinished().first() {
            Some(&i) => {
                let (pieces, i, answer) = self.probe(pieces, i).await?;
                (pieces, Some((i, answer)))
            }
            None => (pieces, None),
        };
        let writer = BlobWriter::start(
            self.partial,
            pieces.clone(),
            self.meta.sha256().is_some(),
            &self.transfers.buffered,
        )
        .map_err(|e| self.disk_error(e))?;
        let fetched = self.pieces(&writer, &pieces, first).await;
        // The disk's error, when there is one, is the real one.
        let finished = writer.finish().await.map_err(|e| self.disk_error(e))?;
        fetched?;
        if !finished.pieces.is_complete() {
            return Err(FetchError::Io {
                path: self.partial.data.clone(),
                source: std::io::Error::other("a piece ended without its bytes written"),
            });
        }
        Ok(finished.hasher.map(hex_digest))
    }

    /// A disk error, with the bytes the record keeps for the next attempt
    /// (progress shows what is on disk, not what arrived and was not written).
    fn disk_error(&self, err: std::io::Error) -> FetchError {
        let kept = self.partial.recorded_bytes(self.meta.size);
        self.meter.resume_at(kept);
        write_error(&self.partial.data, err, self.meta.size, kept)
    }

    /// Every unfinished piece, the first on its answer already there, as many at
    /// once as the fetch has connections (which other files share).
    async fn pieces(
        &self,
        writer: &BlobWriter,
        pieces: &Pieces,
        first: Option<(usize, Answer<'a>)>,
    ) -> Result<(), FetchError> {
        let Some((first, answer)) = first else {
            return Ok(());
        };
        let mut jobs = vec![self.piece(writer, pieces, first, Some(answer))];
        for i in pieces.unfinished().into_iter().filter(|&i| i != first) {
            jobs.push(self.piece(writer, pieces, i, None));
        }
        at_most(self.transfers.count, jobs).await
    }

    /// The first request of this download, for piece `i`, retried until it has a
    /// usable answer: a server that ignores `Range` answers the whole file, which
    /// is then fetched as one stream from its first byte.
    async fn probe(
        &self,
        mut pieces: Pieces,
        mut i: usize,
    ) -> Result<(Pieces, usize, Answer<'a>), FetchError> {
        let mut retries = Retries::new(
            self.options,
            self.meta.download_url.clone(),
            self.meta.file.clone(),
        );
        loop {
            let (from, end) = (pieces.next_byte(i), pieces.range(i).1);
            let ranged = is_ranged(&pieces, from);
            match self.request(from, end, ranged).await {
                Ok(answer) if ranged && answer.response.status() == StatusCode::OK => {
                    if pieces.count() > 1 || pieces.bytes_done() > 0 {
                        tracing::info!(file = %self.meta.file, "the server does not serve byte ranges; downloading {} as one stream", self.meta.file);
                    }
                    self.partial.remove();
                    pieces = Pieces::whole(self.meta.size);
                    i = 0;
                    self.meter.resume_at(0);
                    return Ok((pieces, i, answer));
                }
                Ok(answer) => match self.check(from, ranged, false, answer) {
                    Ok(answer) => return Ok((pieces, i, answer)),
                    Err(failure) => self.recover(&mut retries, failure).await?,
                },
                Err(failure) => self.recover(&mut retries, failure).await?,
            }
        }
    }

    /// Piece `i` from where it stands to its end, retried with backoff; each
    /// attempt holds one of the fetch's connections, and none while it waits.
    async fn piece(
        &self,
        writer: &BlobWriter,
        pieces: &Pieces,
        i: usize,
        mut answer: Option<Answer<'a>>,
    ) -> Result<(), FetchError> {
        let (start, end) = pieces.range(i);
        let mut at = pieces.next_byte(i);
        let mut retries = Retries::new(
            self.options,
            self.meta.download_url.clone(),
            format!(
                "{} (bytes {start}-{})",
                self.meta.file,
                end.saturating_sub(1)
            ),
        );
        while at < end {
            let attempt = match answer.take() {
                Some(answer) => Ok(answer),
                None => {
                    let ranged = is_ranged(pieces, at);
                    match self.request(at, end, ranged).await {
                        Ok(answer) => self.check(at, ranged, pieces.count() == 1, answer),
                        Err(failure) => Err(failure),
                    }
                }
            };
            let failure = match attempt {
                Ok(answer) => {
                    let before = at;
                    let written = self.body(writer, i, answer, &mut at, end).await;
                    if at > before {
                        retries.progressed();
                    }
                    match written {
                        Ok(()) => continue,
                        Err(failure) => failure,
                    }
                }
                Err(failure) => failure,
            };
            self.recover(&mut retries, failure).await?;
        }
        Ok(())
    }

    /// After a failed attempt: a CDN that refuses its signed URL (expired) gets
    /// the URL asked for again from the Hub, at most 3 times per file; every
    /// other failure waits and retries, or ends the file's fetch.
    async fn recover(&self, retries: &mut Retries<'_>, failure: Attempt) -> Result<(), FetchError> {
        if let Attempt::Fatal(FetchError::Unauthorized { url, .. }) = &failure {
            if !self.hub.is_own(url) && self.refresh(url).await {
                return Ok(());
            }
        }
        retries.after(failure).await
    }

    /// Asks the Hub where the file is now, unless another piece already did
    /// since `refused` failed; `false` when it cannot help.
    async fn refresh(&self, refused: &str) -> bool {
        if *self.url.lock().unwrap() != refused {
            return true;
        }
        if self.refreshed.fetch_add(1, Ordering::Relaxed) >= 3 {
            return false;
        }
        tracing::info!(file = %self.meta.file, "the CDN refused {}'s URL; asking the Hub for a new one", self.meta.file);
        match self
            .hub
            .head(&self.meta.commit, &self.meta.file, None)
            .await
        {
            Ok(fresh) if fresh.etag == self.meta.etag && fresh.size == self.meta.size => {
                *self.url.lock().unwrap() = fresh.download_url;
                true
            }
            _ => false,
        }
    }

    /// GET bytes `from..end` (`ranged`: with `Range`, else the whole file) on
    /// one of the fetch's connections, following up to 5 redirects (the Hub
    /// sends LFS files to its CDN).
    async fn request(&self, from: u64, end: u64, ranged: bool) -> Result<Answer<'a>, Attempt> {
        let connection = self
            .transfers
            .connections
            .acquire()
            .await
            .expect("the connections are never closed");
        let range = ranged.then(|| format!("bytes={from}-{}", end - 1));
        let mut url = self.url.lock().unwrap().clone();
        for _ in 0..=5 {
            let mut req = self.hub.request(Method::GET, &url);
            if let Some(range) = &range {
                req = req.header(header::RANGE, range);
            }
            let response = req.send().await.map_err(|e| self.hub.transport(&url, e))?;
            if response.status().is_redirection() {
                let next = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| reqwest::Url::parse(&url).ok()?.join(l).ok());
                if let Some(next) = next {
                    url = next.to_string();
                    continue;
                }
            }
            return Ok(Answer {
                url,
                response,
                starts_at: from,
                _connection: connection,
            });
        }
        Err(retry("the server redirected more than 5 times"))
    }

    /// The answer's status against what was asked: bytes from `from`, `ranged`.
    /// With `one_stream` (a file of one piece), the whole file answered to a
    /// range is taken, its first bytes skipped; otherwise it is a failed
    /// attempt, retried (a server that serves no range at all is found by the
    /// first request, which makes the file one stream).
    fn check(
        &self,
        from: u64,
        ranged: bool,
        one_stream: bool,
        mut answer: Answer<'a>,
    ) -> Result<Answer<'a>, Attempt> {
        let response = &answer.response;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(from) {
                    return Err(retry("the server answered another range than asked"));
                }
                Ok(answer)
            }
            StatusCode::OK if !ranged => Ok(answer),
            StatusCode::OK if one_stream => {
                tracing::info!(file = %self.meta.file, "the server ignored Range; skipping the first {} of {} it sends again", super::progress::human_bytes(from), self.meta.file);
                answer.starts_at = 0;
                Ok(answer)
            }
            StatusCode::OK => Err(retry(
                "the server answered the whole file to a range request",
            )),
            StatusCode::RANGE_NOT_SATISFIABLE => Err(retry("the server refused the range")),
            _ => Err(self
                .hub
                .status_failure(&answer.url, Some(&self.meta.file), response)),
        }
    }

    /// Streams the answer's body into piece `i` from `at` to `end`, moving `at`
    /// as bytes are queued for the disk. Bytes past `end` (a server that sends
    /// more than asked) are not taken.
    async fn body(
        &self,
        writer: &BlobWriter,
        i: usize,
        answer: Answer<'a>,
        at: &mut u64,
        end: u64,
    ) -> Result<(), Attempt> {
        let mut body = answer.response.bytes_stream();
        // Bytes before `at` that a whole-file answer sends again.
        let mut skip = *at - answer.starts_at.min(*at);
        while *at < end {
            let Some(chunk) = body.next().await else {
                return Err(Attempt::Retry {
                    reason: format!("the transfer ended early, at byte {at} of {end}"),
                    after: None,
                    status: None,
                });
            };
            let mut chunk = chunk.map_err(|e| self.hub.transport(&answer.url, e))?;
            if skip > 0 {
                let skipped = skip.min(chunk.len() as u64);
                let _ = chunk.split_to(skipped as usize);
                skip -= skipped;
                if chunk.is_empty() {
                    continue;
                }
            }
            let room = end - *at;
            if chunk.len() as u64 > room {
                chunk.truncate(room as usize);
            }
            let len = chunk.len() as u64;
            if !writer.write(i, chunk).await {
                // The disk side failed: the writer's finish says why.
                return Err(Attempt::Fatal(FetchError::Io {
                    path: self.partial.data.clone(),
                    source: std::io::Error::other("the writer stopped"),
                }));
            }
            *at += len;
            self.meter.advance(len);
        }
        Ok(())
    }
}

/// Runs `jobs`, at most `limit` at once, starting them in order; the first
/// error ends them all.
pub(super) async fn at_most<F>(limit: usize, jobs: Vec<F>) -> Result<(), FetchError>
where
    F: std::future::Future<Output = Result<(), FetchError>>,
{
    let mut waiting = jobs.into_iter();
    let mut running: FuturesUnordered<F> = waiting.by_ref().take(limit.max(1)).collect();
    while let Some(done) = running.next().await {
        done?;
        if let Some(job) = waiting.next() {
            running.push(job);
        }
    }
    Ok(())
}

/// Whether bytes from `from` are asked for with `Range`: always, except the
/// whole file from its first byte.
fn is_ranged(pieces: &Pieces, from: u64) -> bool {
    pieces.count() > 1 || from > 0
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

fn write_error(path: &Path, err: std::io::Error, size: u64, kept: u64) -> FetchError {
    if err.kind() == ErrorKind::StorageFull || err.kind() == ErrorKind::QuotaExceeded {
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

/// A failed attempt the server caused, retried with backoff.
fn retry(reason: &str) -> Attempt {
    Attempt::Retry {
        reason: reason.to_string(),
        after: None,
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
