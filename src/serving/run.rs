//! `Run` (the tensor task): wire tensors to torch tensors, batched through the
//! engine, and back.

use harness_client::{RunReply, RunRequest, ServingError};

use super::boot::Ready;
use super::request::{internal, serving_error, Timing};
use crate::tasks::tensor;

#[tracing::instrument(name = "serving.run", skip_all, fields(inputs = request.inputs.len()))]
pub async fn run(ready: Ready, request: RunRequest, timing: Timing) -> RunReply {
    if ready.embedder.is_some() {
        return Err(ServingError::BadInput {
            reason: "this node serves the embedding task: send Embed".to_string(),
        });
    }
    let inputs = request.inputs;
    let specs = ready.inputs.clone();
    // Building tensors copies the bytes: off the async workers.
    let tensors = tokio::task::spawn_blocking(move || {
        tensor::to_tensors(&inputs, specs.as_ref().map(|s| s.as_slice()))
    })
    .await
    .map_err(internal)?
    .map_err(|reason| ServingError::BadInput { reason })?;
    let outputs = ready
        .engine
        .run(tensors, timing.deadline)
        .await
        .map_err(|e| serving_error(e, timing.received))?;
    tokio::task::spawn_blocking(move || tensor::to_wire(outputs))
        .await
        .map_err(internal)?
        .map_err(|message| ServingError::Model { message })
}
