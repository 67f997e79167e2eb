//! One `Run`: checked, converted, batched, answered. The actor hands each request
//! to a task of its own and goes on to the next message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::{Payload, RunReply, RunRequest, ServingError, PROTOCOL_VERSION};
use ractor::RpcReplyPort;
use tokio::sync::watch;

use super::boot::Ready;
use super::shared::{Phase, ServingShared};
use crate::engine::{ForwardError, RunError};
use crate::tasks::tensor;

/// Answers at once what can be answered at once, and runs the rest in a task.
pub fn spawn_run(
    payload: Payload<RunRequest>,
    port: RpcReplyPort<Payload<RunReply>>,
    ready: Option<&Ready>,
    shared: &Arc<ServingShared>,
    stopped: watch::Receiver<bool>,
) {
    let received = Instant::now();
    let metrics = shared.metrics.clone();
    let reply = move |port: RpcReplyPort<Payload<RunReply>>, answer: RunReply| {
        metrics.request(outcome(&answer), received.elapsed());
        let _ = port.send(Payload::new(answer));
    };
    let request = match payload.0 {
        Ok(request) => request,
        Err(reason) => return reply(port, Err(ServingError::BadInput { reason })),
    };
    if let Err(err) = check_version(request.version) {
        return reply(port, Err(err));
    }
    let phase = shared.phase().phase;
    let Some(ready) = ready.filter(|_| phase == Phase::Ready) else {
        let phase = phase.as_str().to_string();
        return reply(port, Err(ServingError::NotReady { phase }));
    };
    if request.timeout_ms == 0 {
        let reason = "timeout_ms is 0: give the request time to run".to_string();
        return reply(port, Err(ServingError::BadInput { reason }));
    }
    let deadline = received + Duration::from_millis(request.timeout_ms);
    let engine = ready.engine.clone();
    let arity = ready.arity;
    let in_flight = shared.request_started();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let answer = tokio::select! {
            answer = run(engine, request, arity, deadline, received) => answer,
            () = until_stopped(stopped) => Err(ServingError::Internal {
                message: "the serving stopped while the request was in flight".to_string(),
            }),
        };
        reply(port, answer);
    });
}

/// The `outcome` label of an answer.
fn outcome(answer: &RunReply) -> &'static str {
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

#[tracing::instrument(name = "serving.run", skip_all, fields(inputs = request.inputs.len()))]
async fn run(
    engine: crate::engine::Engine,
    request: RunRequest,
    arity: Option<usize>,
    deadline: Instant,
    received: Instant,
) -> RunReply {
    let inputs = request.inputs;
    // Building tensors copies the bytes: off the async workers.
    let tensors = tokio::task::spawn_blocking(move || tensor::to_tensors(&inputs, arity))
        .await
        .map_err(internal)?
        .map_err(|reason| ServingError::BadInput { reason })?;
    let outputs = engine
        .run(tensors, deadline)
        .await
        .map_err(|e| serving_error(e, received))?;
    tokio::task::spawn_blocking(move || tensor::to_wire(outputs))
        .await
        .map_err(internal)?
        .map_err(|message| ServingError::Model { message })
}

/// What the caller can do about an engine error.
fn serving_error(err: RunError, received: Instant) -> ServingError {
    match err {
        RunError::Overloaded { queued, capacity } => ServingError::Overloaded { queued, capacity },
        RunError::DeadlineExceeded { .. } => ServingError::DeadlineExceeded {
            waited_ms: received.elapsed().as_millis() as u64,
        },
        RunError::Forward(
            e @ (ForwardError::Arity { .. }
            | ForwardError::DType { .. }
            | ForwardError::Shape { .. }),
        ) => ServingError::BadInput {
            reason: e.to_string(),
        },
        RunError::Forward(
            e @ (ForwardError::OutOfMemory { .. }
            | ForwardError::Model { .. }
            | ForwardError::UnsupportedOutput { .. }),
        ) => ServingError::Model {
            message: e.to_string(),
        },
        RunError::Forward(
            e @ (ForwardError::Device { .. }
            | ForwardError::Panicked { .. }
            | ForwardError::Stopped),
        ) => ServingError::Internal {
            message: e.to_string(),
        },
    }
}

fn internal(err: impl std::fmt::Display) -> ServingError {
    ServingError::Internal {
        message: err.to_string(),
    }
}

/// Resolves when the actor that took the request has stopped (or died).
async fn until_stopped(mut stopped: watch::Receiver<bool>) {
    loop {
        if *stopped.borrow() {
            return;
        }
        if stopped.changed().await.is_err() {
            return;
        }
    }
}
