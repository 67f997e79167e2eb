//! What the accept loops of the HTTP and cluster ports share: a failed accept
//! (out of file handles, say) is followed by a pause instead of a spin, and logged
//! at most once a second with how many there were.

use std::time::{Duration, Instant};

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Failed accepts of one listener.
pub struct AcceptFailures {
    listener: &'static str,
    since_log: u64,
    last_log: Option<Instant>,
}

impl AcceptFailures {
    /// For the listener named `listener` in the log.
    pub fn new(listener: &'static str) -> Self {
        AcceptFailures {
            listener,
            since_log: 0,
            last_log: None,
        }
    }

    /// Notes a failed accept, logs it if a second has passed since the last
    /// line, and pauses.
    pub async fn note(&mut self, err: &std::io::Error) {
        if let Some(failures) = self.due() {
            tracing::warn!(%err, failures, "the {} listener cannot accept connections ({err}); retrying", self.listener);
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }

    /// Notes a connection closed at once because `limit` peers are being
    /// admitted already; logged at most once a second, with no pause.
    pub fn note_refused(&mut self, peer: std::net::SocketAddr, limit: usize) {
        if let Some(refused) = self.due() {
            tracing::warn!(%peer, refused, "{}: {limit} peers are authenticating already; closed {peer}'s connection", self.listener);
        }
    }

    /// Counts one more; the count since the last line when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.since_log += 1;
        if self
            .last_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last_log = Some(Instant::now());
        Some(std::mem::take(&mut self.since_log))
    }
}

/// Raises this process's limit of open files to the hard limit (often 1024
/// by default, below the HTTP port's 4096 connections, so accepts would fail
/// before a slowloris' sockets could be closed for new ones). Returns the
/// limit now in force, if it could be read.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // rlim_t is u64 on 64-bit Linux, but not on every target.
    #[allow(clippy::unnecessary_cast)]
    Some(limit.rlim_cur as u64)
}
