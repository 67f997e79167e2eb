//! Peers of the cluster port before they authenticate. ractor_cluster reads
//! every frame up to `HARNESS_MAX_MESSAGE_BYTES` and waits on a silent peer
//! forever, so each accepted connection reaches it through [`GuardedStream`]:
//! until the cookie handshake succeeds, a frame may be at most
//! [`PRE_AUTH_FRAME_LIMIT`] (the handshake's frames are tiny), the handshake must
//! finish within [`HANDSHAKE_DEADLINE`], and at most [`MAX_PENDING`] peers may be
//! at it at once. After it, the stream is passed through untouched.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};
use tokio::io::{AsyncRead, ReadBuf};

/// The largest frame a peer may send before it has authenticated.
pub const PRE_AUTH_FRAME_LIMIT: u64 = 64 << 10;
/// How long a peer has to authenticate after connecting (TLS included).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Peers authenticating at once; more are closed at once.
pub const MAX_PENDING: usize = 128;

/// The peers being admitted, by the label their session carries (`ip:port`).
#[derive(Default)]
pub struct Admission {
    pending: AtomicUsize,
    flags: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl Admission {
    /// A guarded stream for a new peer, or `None` when too many are authenticating.
    pub fn admit(
        self: &Arc<Self>,
        label: String,
        read: BoxRead,
        write: BoxWrite,
    ) -> Option<GuardedStream> {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let authenticated = Arc::new(AtomicBool::new(false));
        self.flags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(label.clone(), authenticated.clone());
        let ticket = Ticket {
            admission: self.clone(),
            label: label.clone(),
            done: false,
        };
        Some(GuardedStream {
            label,
            read: GuardedRead {
                // Buffered under the guard: ractor_cluster reads a frame's length,
                // then its body, which would be two or three syscalls a frame (one
                // for many frames under load, buffered). Above the buffer, the
                // guard still judges each frame only as ractor_cluster takes it,
                // so a frame read ahead is not judged before the peer has
                // authenticated.
                inner: Box::new(tokio::io::BufReader::new(read)),
                authenticated,
                ticket: Some(ticket),
                header: [0; 8],
                have: 0,
                left: 0,
                deadline: Box::pin(tokio::time::sleep(HANDSHAKE_DEADLINE)),
            },
            write,
        })
    }

    /// The session of `label` authenticated: its stream stops checking.
    pub fn authenticated(&self, label: &str) {
        if let Some(flag) = self
            .flags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(label)
        {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Peers authenticating now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// A peer's place among those authenticating; given back when it authenticates
/// or its stream goes.
struct Ticket {
    admission: Arc<Admission>,
    label: String,
    done: bool,
}

impl Ticket {
    fn give_back(&mut self) {
        if !self.done {
            self.done = true;
            self.admission.pending.fetch_sub(1, Ordering::SeqCst);
            self.admission
                .flags
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.label);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// An accepted connection as ractor_cluster takes it (an external stream).
pub struct GuardedStream {
    label: String,
    read: GuardedRead,
    write: BoxWrite,
}

impl ClusterBidiStream for GuardedStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (Box::new(self.read), self.write)
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

/// The read half: reads frame headers (a big-endian u64 length, then the frame)
/// until the peer has authenticated.
struct GuardedRead {
    inner: BoxRead,
    authenticated: Arc<AtomicBool>,
    /// `None` once authenticated: from then on, reads pass through.
    ticket: Option<Ticket>,
    header: [u8; 8],
    /// Bytes of the current frame's header read so far.
    have: usize,
    /// Bytes of the current frame's body still to come.
    left: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl GuardedRead {
    /// Follows the frames in bytes just read; an error for a frame over the limit.
    fn track(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (self.left.min(bytes.len() as u64)) as usize;
                self.left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (8 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 8 {
                self.have = 0;
                let len = u64::from_be_bytes(self.header);
                if len > PRE_AUTH_FRAME_LIMIT {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {len} bytes before authenticating (at most {PRE_AUTH_FRAME_LIMIT})"),
                    ));
                }
                self.left = len;
            }
        }
        Ok(())
    }
}

impl AsyncRead for GuardedRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ticket.is_some() && this.authenticated.load(Ordering::SeqCst) {
            if let Some(mut ticket) = this.ticket.take() {
                ticket.give_back();
            }
        }
        if this.ticket.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let tracked = this.track(&buf.filled()[before..]);
                if tracked.is_err() {
                    // An error hands back nothing read.
                    buf.set_filled(before);
                }
                Poll::Ready(tracked)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no authentication within {HANDSHAKE_DEADLINE:?}"),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn guarded(admission: &Arc<Admission>, bytes: Vec<u8>) -> BoxRead {
        let read: BoxRead = Box::new(std::io::Cursor::new(bytes));
        let write: BoxWrite = Box::new(tokio::io::sink());
        let stream = admission.admit("peer".to_string(), read, write).unwrap();
        Box::new(stream).split().0
    }

    fn frame(len: u64) -> Vec<u8> {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(7u8, len as usize));
        bytes
    }

    #[tokio::test]
    async fn small_frames_pass_and_a_large_one_before_authenticating_does_not() {
        let admission = Arc::new(Admission::default());
        let mut ok = guarded(&admission, [frame(10), frame(300)].concat());
        let mut all = Vec::new();
        ok.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 8 + 10 + 8 + 300);
        drop(ok);
        assert_eq!(admission.pending(), 0);

        // A 64 MiB frame announced: refused at its header.
        let mut header = (1u64 << 26).to_be_bytes().to_vec();
        header.extend([0u8; 100]);
        let mut bad = guarded(&admission, header);
        let err = bad.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn after_authenticating_large_frames_pass() {
        let admission = Arc::new(Admission::default());
        let mut read = guarded(&admission, [frame(10), frame(200_000)].concat());
        let mut first = [0u8; 18];
        read.read_exact(&mut first).await.unwrap();
        admission.authenticated("peer");
        let mut rest = Vec::new();
        read.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 8 + 200_000);
        assert_eq!(admission.pending(), 0);
    }

    #[tokio::test]
    async fn too_many_at_once_are_refused() {
        let admission = Arc::new(Admission::default());
        let held: Vec<_> = (0..MAX_PENDING)
            .map(|i| {
                admission
                    .admit(
                        format!("p{i}"),
                        Box::new(tokio::io::empty()),
                        Box::new(tokio::io::sink()),
                    )
                    .expect("room")
            })
            .collect();
        assert!(admission
            .admit(
                "one more".to_string(),
                Box::new(tokio::io::empty()),
                Box::new(tokio::io::sink())
            )
            .is_none());
        drop(held);
        assert_eq!(admission.pending(), 0);
    }
}
