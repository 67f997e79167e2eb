//! `Embed` (the embedding task): texts tokenized, each text one item in the
//! engine's token batches, each answered with its pooled vector.

use futures_util::future::join_all;
use harness_client::{EmbedReply, EmbedRequest, Embedding, ServingError};

use super::boot::Ready;
use super::request::{internal, serving_error, Timing};

#[tracing::instrument(name = "serving.embed", skip_all, fields(texts = request.texts.len()))]
pub async fn embed(ready: Ready, request: EmbedRequest, timing: Timing) -> EmbedReply {
    let Some(embedder) = ready.embedder.clone() else {
        return Err(ServingError::BadInput {
            reason: "this node serves the tensor task: send Run, or start it with HARNESS_TASK=embedding".to_string(),
        });
    };
    let texts = request.texts;
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    // Each text is one queued item: more than the queue holds could never be taken.
    let capacity = ready.engine.config().max_queue;
    if texts.len() > capacity {
        return Err(ServingError::BadInput {
            reason: format!(
                "{} texts in one call, but the node queues at most {capacity} (HARNESS_MAX_QUEUE): send fewer per call",
                texts.len()
            ),
        });
    }
    // Tokenizing and building tensors is CPU work: off the async workers.
    let tokenizing = embedder.clone();
    let (inputs, facts): (Vec<_>, Vec<_>) = tokio::task::spawn_blocking(move || {
        tokenizing.tokenize(&texts).map(|all| {
            all.into_iter()
                .map(|tokens| {
                    let inputs = tokenizing.to_tensors(&tokens);
                    (inputs, (tokens.ids.len() as u32, tokens.truncated))
                })
                .unzip()
        })
    })
    .await
    .map_err(internal)?
    .map_err(|reason| ServingError::BadInput { reason })?;

    let engine = &ready.engine;
    let answers = join_all(
        inputs
            .into_iter()
            .map(|inputs| engine.run(inputs, timing.deadline)),
    )
    .await;
    let outputs = answers
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| serving_error(e, timing.received))?;
    let vectors = tokio::task::spawn_blocking(move || {
        outputs
            .into_iter()
            .map(crate::tasks::embedding::vector)
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(internal)?
    .map_err(|message| ServingError::Model { message })?;
    Ok(vectors
        .into_iter()
        .zip(facts)
        .map(|(vector, (tokens, truncated))| Embedding {
            vector,
            tokens,
            truncated,
        })
        .collect())
}
