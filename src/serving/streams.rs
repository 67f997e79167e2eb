//! Streamed generations: `OpenStream` queues a generation and answers its id at
//! once; `PullStream` long-polls it for what was made since the last pull;
//! `CancelStream` ends it. The open streams of the serving's current life are
//! kept here, each counted in flight (idle shutdown waits for it) until its last
//! chunk is pulled, it is cancelled, or its deadline passes; a new life starts
//! with none.
//!
//! What a slow caller costs: the token ids it has not pulled (4 bytes each, at
//! most a sequence's context) and its stream's small state; the generation
//! itself runs at the model's pace and ends as it would unstreamed. A stream
//! whose caller stops pulling is dropped, and its generation cancelled, a
//! little after its deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness_client::{
    CancelRequest, GenerateRequest, OpenReply, Payload, PullReply, PullRequest, ServingError,
    StreamOpened,
};
use ractor::RpcReplyPort;
use tokio::sync::watch;

use super::request::{self, outcome};
use super::shared::{InFlight, ServingShared};
use crate::tasks::generation::TextStream;
use crate::tasks::Task;

/// The longest a pull waits for a token.
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(10);
/// How long after its deadline a stream no one pulled is dropped.
const UNPULLED_GRACE: Duration = Duration::from_secs(5);

/// The open streams.
#[derive(Default)]
pub struct Streams {
    open: Mutex<HashMap<u64, Open>>,
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

    /// Drops every stream (the serving's life ended): their generations end.
    pub fn clear(&self) {
        self.lock().clear();
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
        open.insert(
            id,
            Open {
                stream,
                received,
                _in_flight: in_flight,
            },
        );
        drop(open);
        let (streams, shared) = (Arc::downgrade(self), Arc::downgrade(shared));
        tokio::spawn(async move {
            tokio::time::sleep_until((deadline + UNPULLED_GRACE).into()).await;
            if let (Some(streams), Some(shared)) = (streams.upgrade(), shared.upgrade()) {
                if streams.close(id, "deadline_exceeded", &shared) {
                    tracing::debug!(
                        stream = id,
                        "a stream's caller stopped pulling; dropped after its deadline"
                    );
                }
            }
        });
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
    let open = streams.count();
    if open >= limit {
        let (queued, capacity) = (open as u64, limit as u64);
        return refuse(port, ServingError::Overloaded { queued, capacity });
    }
    let (shared, streams) = (shared.clone(), streams.clone());
    let in_flight = shared.request_started();
    tokio::spawn(async move {
        let caller = super::caller::named(request.caller.as_deref());
        let opened = tokio::select! {
            opened = task.open_stream(request, timing, caller) => opened,
            () = request::until_stopped(stopped) => Err(request::stopped_error()),
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
        let _ = port.send(Payload::new(answer));
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
