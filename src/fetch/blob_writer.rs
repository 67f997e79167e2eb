//! Writes a blob on a thread of its own: the async side takes bytes off the
//! network while this thread writes them to disk and hashes them, so neither
//! waits for the other (and the tokio worker never blocks on a disk).

use std::io::{self, Write};
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Chunks in flight between the network and the disk: bounds memory (the chunks
/// are tens of KiB) while letting the two sides run side by side.
const IN_FLIGHT: usize = 64;

/// Bytes written between syncs to disk.
const SYNC_EVERY: usize = 64 << 20;

pub(super) struct BlobWriter {
    chunks: mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<io::Result<Option<Sha256>>>,
}

impl BlobWriter {
    /// Appends to `path`; `hasher` (if any) already holds the file's current bytes.
    pub fn start(path: &Path, hasher: Option<Sha256>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (chunks, mut queue) = mpsc::channel::<Bytes>(IN_FLIGHT);
        let done = tokio::task::spawn_blocking(move || {
            let mut hasher = hasher;
            let mut out = io::BufWriter::with_capacity(1 << 20, file);
            let mut unsynced = 0usize;
            while let Some(chunk) = queue.blocking_recv() {
                out.write_all(&chunk)?;
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(&chunk);
                }
                // Start the data on its way to disk as it comes rather than all at
                // the end: the final sync is then short, and a large file never
                // piles up as dirty pages.
                unsynced += chunk.len();
                if unsynced >= SYNC_EVERY {
                    out.flush()?;
                    start_writeback(out.get_ref());
                    unsynced = 0;
                }
            }
            // Durable before the blob is renamed into place.
            out.flush()?;
            out.get_ref().sync_data()?;
            Ok(hasher)
        });
        Ok(BlobWriter { chunks, done })
    }

    /// Queues `chunk`; `false` when the writer has stopped on an error, which
    /// [`BlobWriter::finish`] then returns.
    pub async fn write(&self, chunk: Bytes) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// Writes what is queued, syncs it to disk, and returns the hasher.
    pub async fn finish(self) -> io::Result<Option<Sha256>> {
        drop(self.chunks);
        self.done.await.map_err(io::Error::other)?
    }
}

/// Asks the kernel to start writing the file's dirty pages now, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the final sync then has little
/// left, and the network never waits for the disk.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
