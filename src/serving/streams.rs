//! Streamed generations: `OpenStream` queues a generation and answers its id at
//! once; `PullStream` long-polls it for what was made since the last pull;
//! `CancelStream` ends it. The open streams of the serving's current life are
//! kept here, each counted in flight (idle shutdown waits for it) until its last
//! chunk is pulled, it is cancelled, or its deadline passes; a new life starts
//! with none.
//!
//! What a slow caller costs: the token ids it has not pulled (4 bytes each, at
//! most a sequence's context) and its stream's small state; the generation
//! itself runs at the model's pace and ends as it would unstreamed. A stream is
//! closed by its last pull; otherwise at once when its generation was cancelled
//! (its caller cancelled or left: no one will pull it), [`LINGER`] after its
//! generation ended if no one pulled that end, and a little after its deadline
//! in any case.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use harness_client::{
    CancelRequest, GenerateRequest, OpenReply, Payload, PullReply, PullRequest, ServingError,
    StreamOpened,
};
use ractor::RpcReplyPort;
use tokio::sync::watch;

use super::request::{self, outcome};
use super::shared::{InFlight, ServingShared};
use crate::tasks::generation::{Progress, TextStream};
use crate::tasks::Task;

/// The longest a pull waits for a token.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(10);
/// How long after its deadline a stream no one pulled is dropped.
const UNPULLED_GRACE: Duration = Duration::from_secs(5);
/// How long a stream whose generation ended waits for the pull of its end.
pub const LINGER: Duration = Duration::from_secs(30);

/// The open streams.
#[derive(Default)]
pub struct Streams {
    open: Mutex<HashMap<u64, Open>>,
    /// Streams being opened (their requests checked and tokenized), counted
    /// against the limit with the open ones.
    opening: AtomicUsize,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("open", &self.count())
            .finish()
    }
}

struct Open {
    stream: Arc<TextStream>,
    received: Instant,
    _in_flight: InFlight,
    /// The task that closes the stream when no one will pull it.
    keeper: tokio::task::AbortHandle,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// A place among the streams, held while one is being opened.
struct Opening(Arc<Streams>);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Streams {
    /// Streams open now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Token ids made and not pulled yet, over all streams.
    pub fn unpulled_tokens(&self) -> usize {
        self.lock().values().map(|o| o.stream.unpulled()).sum()
    }

    /// Drops every stream (the serving's life ended): their generations end,
    /// and their requests are counted `internal`.
    pub fn clear(&self, shared: &ServingShared) {
        for (_, open) in self.lock().drain() {
            shared.metrics.request("internal", open.received.elapsed());
        }
    }

    /// A place for a stream about to be opened, if fewer than `limit` are
    /// open or opening.
    fn reserve(self: &Arc<Self>, limit: usize) -> Result<Opening, ServingError> {
        let opening = self.opening.fetch_add(1, Ordering::AcqRel);
        let taken = self.count() + opening;
        let place = Opening(self.clone());
        if taken >= limit {
            return Err(ServingError::Overloaded {
                queued: taken as u64,
                capacity: limit as u64,
            });
        }
        Ok(place)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(
        self: &Arc<Self>,
        stream: Arc<TextStream>,
        received: Instant,
        deadline: Instant,
        in_flight: InFlight,
        shared: &Arc<ServingShared>,
    ) -> u64 {
        let mut open = self.lock();
        let id = loop {
            let id = crate::engine::generation::fresh_seed();
            if id != 0 && !open.contains_key(&id) {
                break id;
            }
        };
        let keeper = tokio::spawn(keep(
            Arc::downgrade(self),
            Arc::downgrade(&stream),
            Arc::downgrade(shared),
            id,
            deadline,
        ))
        .abort_handle();
        open.insert(
            id,
            Open {
                stream,
                received,
                _in_flight: in_flight,
                keeper,
            },
        );
        id
    }

    fn get(&self, id: u64) -> Option<Arc<TextStream>> {
        self.lock().get(&id).map(|o| o.stream.clone())
    }

    /// Removes stream `id` and counts its request with `outcome`; whether it
    /// was open.
    fn close(&self, id: u64, outcome: &str, shared: &ServingShared) -> bool {
        let Some(open) = self.lock().remove(&id) else {
            return false;
        };
        shared.metrics.request(outcome, open.received.elapsed());
        true
    }
}

/// Closes stream `id` when no one will pull it: at once when its generation
/// was cancelled, [`LINGER`] after it ended, [`UNPULLED_GRACE`] after its
/// deadline. Aborted when the stream closes first.
async fn keep(
    streams: Weak<Streams>,
    stream: Weak<TextStream>,
    shared: Weak<ServingShared>,
    id: u64,
    deadline: Instant,
) {
    let last_chance = tokio::time::sleep_until((deadline + UNPULLED_GRACE).into());
    tokio::pin!(last_chance);
    let ended = async {
        match stream.upgrade() {
            Some(stream) => stream.ended().await,
            None => Progress::Ended { cancelled: true },
        }
    };
    let outcome = tokio::select! {
        () = &mut last_chance => "deadline_exceeded",
        progress = ended => match progress {
            Progress::Ended { cancelled: true } => "cancelled",
            _ => tokio::select! {
                () = &mut last_chance => "deadline_exceeded",
                () = tokio::time::sleep(LINGER) => "cancelled",
            },
        },
    };
    if let (Some(streams), Some(shared)) = (streams.upgrade(), shared.upgrade()) {
        if streams.close(id, outcome, &shared) {
            tracing::debug!(stream = id, outcome, "a stream no one will pull was closed");
        }
    }
}

/// `OpenStream`: checked as every request is, then the generation is queued
/// and the stream's id answered. At most `limit` streams are open at once
/// (sequences running, waiting, or finished and not pulled to their end).
pub fn open(
    payload: Payload<GenerateRequest>,
    port: RpcReplyPort<Payload<OpenReply>>,
    ready: Option<Arc<dyn Task>>,
    shared: &Arc<ServingShared>,
    stopped: watch::Receiver<bool>,
    streams: &Arc<Streams>,
    limit: usize,
) {
    let received = Instant::now();
    let refuse = |port: RpcReplyPort<Payload<OpenReply>>, err: ServingError| {
        let answer = Err(err);
        shared.metrics.request(outcome(&answer), received.elapsed());
        let _ = port.send(Payload::new(answer));
    };
    let (request, task, timing) = match request::admit(payload, ready, shared, received) {
        Ok(admitted) => admitted,
        Err(err) => return refuse(port, err),
    };
    let place = match streams.reserve(limit) {
        Ok(place) => place,
        Err(err) => return refuse(port, err),
    };
    let (shared, streams) = (shared.clone(), streams.clone());
    let in_flight = shared.request_started();
    tokio::spawn(async move {
        let _place = place;
        let caller = super::caller::named(request.caller.as_deref());
        // A life that ended meanwhile takes no stream (its successor would not
        // know the id).
        let opened = tokio::select! {
            biased;
            () = request::until_stopped(stopped) => Err(request::stopped_error()),
            opened = task.open_stream(request, timing, caller) => opened,
        };
        let answer = opened.map(|stream| {
            let prompt_tokens = stream.prompt_tokens();
            let id = streams.insert(stream, received, timing.deadline, in_flight, &shared);
            StreamOpened {
                stream: id,
                prompt_tokens,
            }
        });
        if answer.is_err() {
            shared.metrics.request(outcome(&answer), received.elapsed());
        }
        let opened = answer.as_ref().ok().map(|o| o.stream);
        if port.send(Payload::new(answer)).is_err() {
            // The caller left (or gave up) before it learned the id: no one
            // will pull or cancel this stream, so it ends now, not after its
            // generation and LINGER.
            if let Some(id) = opened {
                if let Some(stream) = streams.get(id) {
                    stream.cancel();
                }
                streams.close(id, "cancelled", &shared);
                tracing::debug!(
                    stream = id,
                    "its caller left while it was opened; cancelled"
                );
            }
        }
    });
}

/// `PullStream`: waits (up to the request's `wait_ms`, at most
/// [`MAX_PULL_WAIT`]) for what the stream made; its last chunk closes it.
pub fn pull(
    payload: Payload<PullRequest>,
    port: RpcReplyPort<Payload<PullReply>>,
    shared: &Arc<ServingShared>,
    stopped: watch::Receiver<bool>,
    streams: &Arc<Streams>,
) {
    let request = match payload
        .0
        .map_err(|reason| ServingError::BadInput { reason })
        .and_then(|r| request::check_version(r.version).map(|()| r))
    {
        Ok(request) => request,
        Err(err) => {
            let _ = port.send(Payload::new(Err(err)));
            return;
        }
    };
    let Some(stream) = streams.get(request.stream) else {
        let reason = format!(
            "no stream {} on this serving: it ended, was cancelled, passed its deadline, or the serving restarted",
            request.stream
        );
        let _ = port.send(Payload::new(Err(ServingError::BadInput { reason })));
        return;
    };
    let wait = Duration::from_millis(request.wait_ms.into()).min(MAX_PULL_WAIT);
    let (shared, streams) = (shared.clone(), streams.clone());
    tokio::spawn(async move {
        let answer = tokio::select! {
            chunk = stream.pull(wait) => chunk,
            () = request::until_stopped(stopped) => Err(request::stopped_error()),
        };
        drop(stream);
        let last = match &answer {
            Ok(chunk) => chunk.end.is_some(),
            Err(_) => true,
        };
        if last {
            streams.close(request.stream, outcome(&answer), &shared);
        }
        let _ = port.send(Payload::new(answer));
    });
}

/// `CancelStream`: the stream is dropped, which ends its generation at the
/// engine's next step.
pub fn cancel(payload: Payload<CancelRequest>, shared: &ServingShared, streams: &Streams) {
    let Ok(request) = payload.0 else { return };
    if request::check_version(request.version).is_err() {
        return;
    }
    if let Some(stream) = streams.get(request.stream) {
        stream.cancel();
        streams.close(request.stream, "cancelled", shared);
    }
}
