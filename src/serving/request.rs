//! One request's life: checked (decoding, protocol version, readiness, time
//! budget), handed on so the actor goes on to the next message, answered exactly
//! once, and counted. `Run` and `Embed` are handed to the task with where their
//! answer goes ([`hand_over`]), and the engine thread answers them; a generation
//! runs in a task of its own ([`spawn`]), answered also when the serving stops
//! meanwhile. What the request does is the task's ([`crate::tasks::Task`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::{
    EmbedRequest, GenerateRequest, Payload, RunRequest, ServingError, PROTOCOL_VERSION,
};
use ractor::RpcReplyPort;
use tokio::sync::watch;

use super::shared::{InFlight, Phase, ServingShared};
use crate::metrics::Metrics;
use crate::tasks::{Respond, Task, Timing};

/// What every request carries besides its work.
pub trait Call: Send + 'static {
    fn version(&self) -> u32;
    /// The caller's budget, in milliseconds from when the node received it.
    fn timeout_ms(&self) -> u64;
}

impl Call for RunRequest {
    fn version(&self) -> u32 {
        self.version
    }
    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}

impl Call for GenerateRequest {
    fn version(&self) -> u32 {
        self.version
    }
    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}

impl Call for EmbedRequest {
    fn version(&self) -> u32 {
        self.version
    }
    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}

/// Answers at once what can be answered at once, and hands the rest to `work`
/// with where its answer goes: whoever has the answer (the engine thread) sends
/// it, counts it and ends the request's time in flight. No task is spawned.
pub fn hand_over<C, T, W>(
    payload: Payload<C>,
    port: RpcReplyPort<Payload<Result<T, ServingError>>>,
    ready: Option<Arc<dyn Task>>,
    shared: &Arc<ServingShared>,
    work: W,
) where
    C: Call,
    T: Send + 'static,
    W: FnOnce(Arc<dyn Task>, C, Timing, Respond<Result<T, ServingError>>),
    Payload<Result<T, ServingError>>: ractor::Message,
{
    let received = Instant::now();
    let mut pending = Pending {
        port: Some(port),
        metrics: shared.metrics.clone(),
        received,
        _in_flight: None,
    };
    match admit(payload, ready, shared, received) {
        Ok((request, ready, timing)) => {
            pending._in_flight = Some(shared.request_started());
            work(
                ready,
                request,
                timing,
                Box::new(move |answer| pending.send(answer)),
            );
        }
        Err(err) => pending.send(Err(err)),
    }
}

/// A request handed over and not yet answered.
struct Pending<T: Send + 'static>
where
    Payload<Result<T, ServingError>>: ractor::Message,
{
    port: Option<RpcReplyPort<Payload<Result<T, ServingError>>>>,
    metrics: Arc<Metrics>,
    received: Instant,
    _in_flight: Option<InFlight>,
}

impl<T: Send + 'static> Pending<T>
where
    Payload<Result<T, ServingError>>: ractor::Message,
{
    fn send(mut self, answer: Result<T, ServingError>) {
        self.answer(answer);
    }

    /// Counts and sends the answer, the first time only.
    fn answer(&mut self, answer: Result<T, ServingError>) {
        if let Some(port) = self.port.take() {
            self.metrics
                .request(outcome(&answer), self.received.elapsed());
            let _ = port.send(Payload::new(answer));
        }
    }
}

impl<T: Send + 'static> Drop for Pending<T>
where
    Payload<Result<T, ServingError>>: ractor::Message,
{
    /// Nobody waits in silence: a request dropped unanswered (a bug, or a
    /// panic on the way) is answered `Internal`.
    fn drop(&mut self) {
        if self.port.is_some() {
            self.answer(Err(ServingError::Internal {
                message: "the request was dropped before it was answered".to_string(),
            }));
        }
    }
}

/// Answers at once what can be answered at once, and runs `work` in a task.
pub fn spawn<C, T, W, F>(
    payload: Payload<C>,
    port: RpcReplyPort<Payload<Result<T, ServingError>>>,
    ready: Option<Arc<dyn Task>>,
    shared: &Arc<ServingShared>,
    stopped: watch::Receiver<bool>,
    work: W,
) where
    C: Call,
    T: Send + 'static,
    W: FnOnce(Arc<dyn Task>, C, Timing) -> F + Send + 'static,
    F: Future<Output = Result<T, ServingError>> + Send + 'static,
    Payload<Result<T, ServingError>>: ractor::Message,
{
    let received = Instant::now();
    let metrics = shared.metrics.clone();
    let reply = move |port: RpcReplyPort<Payload<Result<T, ServingError>>>,
                      answer: Result<T, ServingError>| {
        metrics.request(outcome(&answer), received.elapsed());
        let _ = port.send(Payload::new(answer));
    };
    let (request, ready, timing) = match admit(payload, ready, shared, received) {
        Ok(admitted) => admitted,
        Err(err) => return reply(port, Err(err)),
    };
    let in_flight = shared.request_started();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let answer = tokio::select! {
            answer = work(ready, request, timing) => answer,
            () = until_stopped(stopped) => Err(stopped_error()),
        };
        reply(port, answer);
    });
}

/// The request, the task to take it and its timing; or why it is refused at
/// once (it does not decode, another protocol version, not ready, no time).
pub fn admit<C: Call>(
    payload: Payload<C>,
    ready: Option<Arc<dyn Task>>,
    shared: &ServingShared,
    received: Instant,
) -> Result<(C, Arc<dyn Task>, Timing), ServingError> {
    shared.touch();
    let request = payload
        .0
        .map_err(|reason| ServingError::BadInput { reason })?;
    check_version(request.version())?;
    let phase = shared.phase().phase;
    let Some(ready) = ready.filter(|_| phase == Phase::Ready) else {
        let phase = phase.as_str().to_string();
        return Err(ServingError::NotReady { phase });
    };
    if request.timeout_ms() == 0 {
        let reason = "timeout_ms is 0: give the request time to run".to_string();
        return Err(ServingError::BadInput { reason });
    }
    let timing = Timing {
        received,
        deadline: received + Duration::from_millis(request.timeout_ms()),
    };
    Ok((request, ready, timing))
}

/// The answer to a request in flight when the serving stopped.
pub fn stopped_error() -> ServingError {
    ServingError::Internal {
        message: "the serving stopped while the request was in flight".to_string(),
    }
}

/// The `outcome` label of an answer.
pub fn outcome<T>(answer: &Result<T, ServingError>) -> &'static str {
    match answer {
        Ok(_) => "ok",
        Err(ServingError::NotReady { .. }) => "not_ready",
        Err(ServingError::Overloaded { .. }) => "overloaded",
        Err(ServingError::BadInput { .. }) => "bad_input",
        Err(ServingError::Model { .. }) => "model",
        Err(ServingError::DeadlineExceeded { .. }) => "deadline_exceeded",
        Err(ServingError::Internal { .. }) => "internal",
    }
}

/// A request of another protocol version is refused, naming both.
pub fn check_version(version: u32) -> Result<(), ServingError> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(ServingError::BadInput {
        reason: format!(
            "protocol version {version}, but this node speaks {PROTOCOL_VERSION}: use a harness-client of the node's version"
        ),
    })
}

/// Resolves when the actor that took the request has stopped (or died).
pub async fn until_stopped(mut stopped: watch::Receiver<bool>) {
    loop {
        if *stopped.borrow() {
            return;
        }
        if stopped.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_label_is_one_the_metrics_show_from_the_start() {
        let errors = [
            ServingError::NotReady {
                phase: "loading".to_string(),
            },
            ServingError::Overloaded {
                queued: 1,
                capacity: 1,
            },
            ServingError::BadInput {
                reason: String::new(),
            },
            ServingError::Model {
                message: String::new(),
            },
            ServingError::DeadlineExceeded { waited_ms: 1 },
            ServingError::Internal {
                message: String::new(),
            },
        ];
        let mut labels: Vec<_> = errors.into_iter().map(|e| outcome::<()>(&Err(e))).collect();
        labels.push(outcome(&Ok(())));
        // A stream its caller cancelled.
        labels.push("cancelled");
        for label in &labels {
            assert!(crate::metrics::OUTCOMES.contains(label), "{label}");
        }
        assert_eq!(labels.len(), crate::metrics::OUTCOMES.len());
    }
}
