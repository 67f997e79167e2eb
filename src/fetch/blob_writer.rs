//! Writes a blob's pieces on threads of their own: the async side takes bytes off
//! the network; a writer thread puts each piece's bytes at their place in the
//! partial file and keeps the record of how far each piece has come; a hasher
//! thread follows the file's whole prefix and hashes it in order. Neither the
//! network nor a tokio worker ever waits on the disk or the hash.
//!
//! The hasher reads the prefix back from the partial file as it becomes whole:
//! those are bytes just written, still in the page cache (pieces are fetched in
//! the file's order, so the prefix trails the newest bytes by about one piece per
//! connection), so the file is not read twice from disk unless memory is short.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

use super::pieces::{Partial, Pieces};

/// Bytes written between asking the kernel to start writeback.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// How often, at most, the record is rewritten while pieces progress (and on
/// every finished piece).
const SAVE_EVERY: Duration = Duration::from_millis(250);
/// The hasher's read size.
const HASH_BLOCK: usize = 1 << 20;

/// Bytes taken off the network and not yet written, across the whole fetch:
/// this bounds the fetch's memory whatever the number of files and connections.
pub(super) struct Buffered {
    kib: Arc<Semaphore>,
    capacity: u32,
}

impl Buffered {
    /// At most `bytes` queued for the disk at once.
    pub fn new(bytes: usize) -> Self {
        let capacity = bytes.div_ceil(1024).clamp(1, u32::MAX as usize);
        Buffered {
            kib: Arc::new(Semaphore::new(capacity)),
            capacity: capacity as u32,
        }
    }
}

/// The state the writer and the hasher share.
struct Shared {
    pieces: Mutex<Progress>,
    advanced: Condvar,
}

struct Progress {
    pieces: Pieces,
    /// The writer has stopped: the hasher hashes what is whole and ends.
    closed: bool,
}

pub(super) struct BlobWriter {
    chunks: mpsc::UnboundedSender<(usize, Bytes, u32)>,
    buffered: Arc<Semaphore>,
    capacity: u32,
    writer: tokio::task::JoinHandle<io::Result<()>>,
    hasher: Option<tokio::task::JoinHandle<io::Result<Sha256>>>,
    shared: Arc<Shared>,
}

impl BlobWriter {
    /// Writes into `partial.data` as `pieces` says; with `hash`, the sha256 of the
    /// whole file is computed as its prefix becomes whole (from the first byte,
    /// so bytes a previous run wrote are read once, from disk).
    pub fn start(
        partial: &Partial,
        pieces: Pieces,
        hash: bool,
        buffered: &Buffered,
    ) -> io::Result<Self> {
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .read(true)
                .truncate(false)
                .open(&partial.data)?,
        );
        let shared = Arc::new(Shared {
            pieces: Mutex::new(Progress {
                pieces,
                closed: false,
            }),
            advanced: Condvar::new(),
        });
        let (chunks, queue) = mpsc::unbounded_channel();
        let writer = {
            let (file, shared, partial) = (file.clone(), shared.clone(), partial.clone());
            let buffered = buffered.kib.clone();
            tokio::task::spawn_blocking(move || {
                write_pieces(&file, &shared, &partial, queue, &buffered)
            })
        };
        let hasher = hash.then(|| {
            let (file, shared) = (file.clone(), shared.clone());
            tokio::task::spawn_blocking(move || hash_prefix(&file, &shared))
        });
        Ok(BlobWriter {
            chunks,
            buffered: buffered.kib.clone(),
            capacity: buffered.capacity,
            writer,
            hasher,
            shared,
        })
    }

    /// Queues `chunk` as piece `piece`'s next bytes, waiting while the fetch has
    /// too much queued; `false` when the writer has stopped on an error, which
    /// [`BlobWriter::finish`] then returns.
    pub async fn write(&self, piece: usize, chunk: Bytes) -> bool {
        // A chunk larger than the whole room takes all of it rather than wait forever.
        let kib = (chunk.len().div_ceil(1024) as u32).clamp(1, self.capacity);
        let Ok(permit) = self.buffered.acquire_many(kib).await else {
            return false;
        };
        permit.forget(); // the writer gives them back once the bytes are written
        if self.chunks.send((piece, chunk, kib)).is_err() {
            self.buffered.add_permits(kib as usize);
            return false;
        }
        true
    }

    /// Writes what is queued and records it; when every piece is whole, syncs the
    /// file to disk and returns the whole file's hasher (with `hash`).
    pub async fn finish(self) -> io::Result<Finished> {
        drop(self.chunks);
        // The writer's end tells the hasher to finish what is whole.
        let written = self.writer.await.map_err(io::Error::other);
        let hashed = match self.hasher {
            Some(hasher) => Some(hasher.await.map_err(io::Error::other)?),
            None => None,
        };
        written??;
        let pieces = self.shared.pieces.lock().unwrap().pieces.clone();
        Ok(Finished {
            hasher: hashed.transpose()?,
            pieces,
        })
    }
}

/// What a finished writer leaves.
pub(super) struct Finished {
    /// The sha256 of the whole file, when asked for and every piece is whole.
    pub hasher: Option<Sha256>,
    pub pieces: Pieces,
}

/// Tells the hasher the writer has stopped, however it stops (finished, failed,
/// panicked, or dropped with its fetch cancelled), so the hasher never waits on.
struct Closes<'a>(&'a Shared);

impl Drop for Closes<'_> {
    fn drop(&mut self) {
        let mut progress = self
            .0
            .pieces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        progress.closed = true;
        drop(progress);
        self.0.advanced.notify_all();
    }
}

fn write_pieces(
    file: &std::fs::File,
    shared: &Shared,
    partial: &Partial,
    queue: mpsc::UnboundedReceiver<(usize, Bytes, u32)>,
    buffered: &Semaphore,
) -> io::Result<()> {
    let _closes = Closes(shared);
    let mut queue = Queue { queue, buffered };
    let mut unsynced = 0u64;
    let mut saved = Instant::now();
    let result = (|| -> io::Result<()> {
        while let Some((piece, chunk, kib)) = queue.queue.blocking_recv() {
            let at = shared.pieces.lock().unwrap().pieces.next_byte(piece);
            let wrote = file.write_all_at(&chunk, at);
            buffered.add_permits(kib as usize);
            wrote?;
            let finished = {
                let mut progress = shared.pieces.lock().unwrap();
                progress.pieces.record(piece, chunk.len() as u64);
                progress.pieces.is_finished(piece)
            };
            shared.advanced.notify_all();
            // Start the data on its way to disk as it comes: the final sync is
            // then short, and a large file never piles up as dirty pages.
            unsynced += chunk.len() as u64;
            if unsynced >= WRITEBACK_EVERY {
                start_writeback(file);
                unsynced = 0;
            }
            if finished || saved.elapsed() >= SAVE_EVERY {
                save(shared, partial)?;
                saved = Instant::now();
            }
        }
        Ok(())
    })();
    // Whatever happened, the record counts what reached the file, so the next
    // attempt resumes after it; chunks left in the queue give their room back
    // (when `queue` is dropped, even on a panic).
    drop(queue);
    save(shared, partial)?;
    result?;
    if shared.pieces.lock().unwrap().pieces.is_complete() {
        // Durable before the blob is renamed into place.
        file.sync_data()?;
    }
    Ok(())
}

/// The writer's queue: dropped, it gives the room of every chunk still in it
/// back to the fetch's byte budget, so other files never wait for it.
struct Queue<'a> {
    queue: mpsc::UnboundedReceiver<(usize, Bytes, u32)>,
    buffered: &'a Semaphore,
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        self.queue.close();
        while let Ok((_, _, kib)) = self.queue.try_recv() {
            self.buffered.add_permits(kib as usize);
        }
    }
}

fn save(shared: &Shared, partial: &Partial) -> io::Result<()> {
    let pieces = shared.pieces.lock().unwrap().pieces.clone();
    partial.save(&pieces)
}

/// Hashes the file's whole prefix as it grows, from its first byte, until the
/// writer stops; the hasher then holds the first `frontier` bytes.
fn hash_prefix(file: &std::fs::File, shared: &Shared) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    let mut buf = vec![0u8; HASH_BLOCK];
    loop {
        let upto = {
            let mut progress = shared.pieces.lock().unwrap();
            loop {
                let frontier = progress.pieces.frontier();
                if frontier > hashed {
                    break frontier;
                }
                if progress.closed {
                    return Ok(hasher);
                }
                progress = shared.advanced.wait(progress).unwrap();
            }
        };
        while hashed < upto {
            let n = ((upto - hashed) as usize).min(HASH_BLOCK);
            file.read_exact_at(&mut buf[..n], hashed)?;
            hasher.update(&buf[..n]);
            hashed += n as u64;
        }
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
