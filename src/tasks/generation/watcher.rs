//! What the task watches of a sequence on the engine thread: its tokens (into
//! its stream, if it has one; against its stop strings) and whether its caller
//! is still there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::stop::StopStrings;
use crate::engine::generation::Watcher;
use crate::tasks::Caller;

/// The tokens a stream's caller has not pulled yet, shared by the engine
/// thread (which appends) and the stream (which takes them at each pull).
#[derive(Default)]
pub struct Unpulled {
    ids: Mutex<Vec<u32>>,
    arrived: Notify,
}

impl Unpulled {
    pub(super) fn push(&self, id: u32) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.push(id);
        }
        self.arrived.notify_one();
    }

    /// Takes the tokens waiting, oldest first.
    pub fn take(&self) -> Vec<u32> {
        self.ids
            .lock()
            .map(|mut ids| std::mem::take(&mut *ids))
            .unwrap_or_default()
    }

    /// Tokens waiting now.
    pub fn len(&self) -> usize {
        self.ids.lock().map(|ids| ids.len()).unwrap_or(0)
    }

    /// Wakes a puller waiting in [`Unpulled::arrival`] (the end came).
    pub fn wake(&self) {
        self.arrived.notify_one();
    }

    /// Resolves when a token arrives, or [`Unpulled::wake`] is called, after
    /// this call (or once, for one that came since the last wait).
    pub async fn arrival(&self) {
        self.arrived.notified().await;
    }
}

/// One sequence's [`Watcher`].
pub struct SequenceWatch {
    /// Where its tokens go, for a stream.
    pub stream: Option<Arc<Unpulled>>,
    pub stop: Option<StopStrings>,
    /// Set when the caller cancels.
    pub cancelled: Arc<AtomicBool>,
    /// The caller, where it told who it is.
    pub caller: Option<Arc<dyn Caller>>,
}

impl Watcher for SequenceWatch {
    fn token(&mut self, generated: &[u32]) -> bool {
        if let (Some(stream), Some(&last)) = (&self.stream, generated.last()) {
            stream.push(last);
        }
        self.stop.as_mut().is_some_and(|stop| stop.stops(generated))
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.caller.as_ref().is_some_and(|c| c.gone())
    }
}
