//! Download progress: published in-process (for `/status`) and logged as lines,
//! since a deploy is watched through its logs, not a terminal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Shared progress of one fetch. Cheap to read from any thread.
#[derive(Debug, Default)]
pub struct FetchProgress {
    /// Bytes received from the network over this process's life (for metrics).
    downloaded: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    /// The files being downloaded now, in the order they started.
    files: Mutex<Vec<FileProgress>>,
    waiting: Mutex<Option<String>>,
}

/// One file being downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProgress {
    pub file: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A reading of [`FetchProgress`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The first of the files being downloaded now, if any.
    pub file: Option<String>,
    /// Every file being downloaded now (several at once), with its bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileProgress>,
    /// What the fetch waits for, if anything (another process downloading the
    /// same file into the same cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl FetchProgress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        let files = self.files.lock().map(|f| f.clone()).unwrap_or_default();
        ProgressSnapshot {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            file: files.first().map(|f| f.file.clone()),
            files,
            waiting: self.waiting.lock().map(|w| w.clone()).unwrap_or_default(),
        }
    }

    /// Says what the fetch is waiting for (`None`: nothing).
    pub(crate) fn set_waiting(&self, why: Option<String>) {
        if let Ok(mut current) = self.waiting.lock() {
            *current = why;
        }
    }

    /// Bytes received from the network so far, across fetches.
    pub fn downloaded_bytes(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// A new fetch starts from nothing (a restart fetches again from the cache).
    pub(crate) fn reset(&self) {
        self.bytes_done.store(0, Ordering::Relaxed);
        self.bytes_total.store(0, Ordering::Relaxed);
        if let Ok(mut files) = self.files.lock() {
            files.clear();
        }
    }

    pub(crate) fn set_total(&self, bytes: u64) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_done(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sub_done(&self, bytes: u64) {
        self.bytes_done.fetch_sub(
            bytes.min(self.bytes_done.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }

    fn file_started(&self, file: &str, size: u64) {
        if let Ok(mut files) = self.files.lock() {
            files.push(FileProgress {
                file: file.to_string(),
                bytes_done: 0,
                bytes_total: size,
            });
        }
    }

    fn file_at(&self, file: &str, have: u64) {
        if let Ok(mut files) = self.files.lock() {
            if let Some(f) = files.iter_mut().find(|f| f.file == file) {
                f.bytes_done = have;
            }
        }
    }

    fn file_ended(&self, file: &str) {
        if let Ok(mut files) = self.files.lock() {
            files.retain(|f| f.file != file);
        }
    }
}

/// Logs one file's transfer: a line when it starts and ends, and every `every` a
/// line with bytes, percent, rate and ETA. Shared by the file's pieces.
pub(crate) struct FileMeter<'a> {
    progress: &'a FetchProgress,
    file: &'a str,
    size: u64,
    every: Duration,
    state: Mutex<Meter>,
}

struct Meter {
    /// Bytes of this file held so far (a resumed transfer starts above zero).
    have: u64,
    started: Instant,
    started_at: u64,
    last_log: Instant,
}

impl<'a> FileMeter<'a> {
    pub fn start(progress: &'a FetchProgress, file: &'a str, size: u64, every: Duration) -> Self {
        progress.file_started(file, size);
        tracing::info!(
            file,
            bytes = size,
            "downloading {file} ({})",
            human_bytes(size)
        );
        let now = Instant::now();
        FileMeter {
            progress,
            file,
            size,
            every,
            state: Mutex::new(Meter {
                have: 0,
                started: now,
                started_at: 0,
                last_log: now,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Meter> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The transfer (re)starts with `have` bytes already on disk.
    pub fn resume_at(&self, have: u64) {
        let mut state = self.state();
        if have < state.have {
            self.progress.sub_done(state.have - have);
        } else {
            self.progress.add_done(have - state.have);
        }
        if have > 0 && have != state.have {
            tracing::info!(
                file = self.file,
                offset = have,
                "resuming {} with {} already downloaded",
                self.file,
                human_bytes(have)
            );
        }
        state.have = have;
        state.started = Instant::now();
        state.started_at = have;
        self.progress.file_at(self.file, have);
    }

    pub fn advance(&self, bytes: u64) {
        let mut state = self.state();
        state.have += bytes;
        self.progress.add_done(bytes);
        self.progress.downloaded.fetch_add(bytes, Ordering::Relaxed);
        self.progress.file_at(self.file, state.have);
        if state.last_log.elapsed() >= self.every {
            state.last_log = Instant::now();
            let elapsed = state.started.elapsed().as_secs_f64().max(1e-3);
            let rate = (state.have - state.started_at) as f64 / elapsed;
            let left = self.size.saturating_sub(state.have);
            let eta = if rate > 0.0 {
                format!("{:.0}s", left as f64 / rate)
            } else {
                "unknown".to_string()
            };
            let percent = if self.size > 0 {
                state.have as f64 * 100.0 / self.size as f64
            } else {
                100.0
            };
            tracing::info!(
                file = self.file,
                bytes_done = state.have,
                bytes_total = self.size,
                "downloading {}: {percent:.1}% ({} of {}) at {}/s, ETA {eta}",
                self.file,
                human_bytes(state.have),
                human_bytes(self.size),
                human_bytes(rate as u64),
            );
        }
    }

    pub fn finish(&self) {
        let state = self.state();
        let elapsed = state.started.elapsed();
        let rate = (state.have - state.started_at) as f64 / elapsed.as_secs_f64().max(1e-3);
        tracing::info!(
            file = self.file,
            bytes = self.size,
            elapsed_ms = elapsed.as_millis() as u64,
            "downloaded and verified {} ({} at {}/s)",
            self.file,
            human_bytes(self.size),
            human_bytes(rate as u64)
        );
    }
}

impl Drop for FileMeter<'_> {
    fn drop(&mut self) {
        self.progress.file_ended(self.file);
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn a_resumed_file_counts_its_bytes_once() {
        let progress = FetchProgress::default();
        progress.set_total(100);
        let meter = FileMeter::start(&progress, "f", 100, Duration::from_secs(60));
        meter.resume_at(0);
        meter.advance(30);
        // The transfer broke and 30 bytes are on disk: resume there.
        meter.resume_at(30);
        meter.advance(70);
        assert_eq!(progress.snapshot().bytes_done, 100);
        // A restart from zero (the server ignored Range) takes the bytes back.
        meter.resume_at(0);
        assert_eq!(progress.snapshot().bytes_done, 0);
        meter.advance(100);
        assert_eq!(progress.snapshot().files[0].bytes_done, 100);
        meter.finish();
        drop(meter);
        assert_eq!(
            progress.snapshot(),
            ProgressSnapshot {
                bytes_done: 100,
                bytes_total: 100,
                file: None,
                files: vec![],
                waiting: None,
            }
        );
    }
}
