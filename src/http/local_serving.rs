//! How an HTTP request reaches the serving: as a message to the very
//! `DelayedServing` actor the mesh calls, found in its process group on this
//! node, so it shares the mesh's admission, queue, batching, deadlines and
//! metrics. The serving joins its group once ready and leaves it to drain;
//! until then an HTTP caller gets 503 with the phase.

use std::time::{Duration, Instant};

use harness_client::{
    serving_group, CancelRequest, EmbedRequest, Embedding, GenerateRequest, Payload, PullRequest,
    ServingError, ServingMessage, StreamChunk, PROTOCOL_VERSION,
};
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

use super::api_error::{ApiError, ErrorKind};
use crate::serving::{Phase, ServingShared};

/// How long past a request's own deadline the serving's answer is awaited
/// (the serving answers `DeadlineExceeded` itself; this only guards a lost one).
const ANSWER_GRACE: Duration = Duration::from_secs(5);
/// The longest one pull of a stream waits for a token (a keep-alive is sent
/// after an empty one, which also finds a caller that left).
pub const PULL_WAIT: Duration = Duration::from_secs(10);

/// The ready serving of this node.
#[derive(Clone)]
pub struct LocalServing {
    actor: ActorRef<ServingMessage>,
}

impl LocalServing {
    /// The serving if it is ready; a 503 naming the phase (and the download's
    /// progress) if not.
    pub fn find(shared: &ServingShared) -> Result<Self, ApiError> {
        let members = ractor::pg::get_local_members(&serving_group(&shared.name));
        if let Some(cell) = members.into_iter().next() {
            return Ok(LocalServing {
                actor: ActorRef::from(cell),
            });
        }
        let info = shared.phase();
        let mut message = format!(
            "the model is not ready (phase: {}); retry later",
            info.phase
        );
        if info.phase == Phase::Downloading {
            let progress = shared.progress.snapshot();
            message.push_str(&format!(
                " (downloaded {} of {} bytes)",
                progress.bytes_done, progress.bytes_total
            ));
        }
        if let Some(why) = info.message {
            message.push_str(&format!(": {why}"));
        }
        Err(ApiError::new(ErrorKind::NotReady, message))
    }

    /// Embeds `texts` within `deadline`.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        deadline: Instant,
    ) -> Result<Vec<Embedding>, ApiError> {
        let request = Payload::new(EmbedRequest {
            version: PROTOCOL_VERSION,
            texts,
            timeout_ms: budget_ms(deadline),
        });
        self.ask(|port| ServingMessage::Embed(request, port), deadline)
            .await
    }

    /// Opens a stream of `request` (its `timeout_ms` already set). The open
    /// runs on a task of its own: if the HTTP caller goes away meanwhile (hyper
    /// drops this future), that task still receives the stream's id, and its
    /// dropped [`OpenStream`] cancels the generation.
    pub async fn open_stream(
        &self,
        request: GenerateRequest,
        deadline: Instant,
    ) -> Result<OpenStream, ApiError> {
        let serving = self.clone();
        tokio::spawn(async move { serving.open_now(request, deadline).await })
            .await
            .unwrap_or_else(|err| {
                Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("opening the stream failed: {err}"),
                ))
            })
    }

    async fn open_now(
        &self,
        request: GenerateRequest,
        deadline: Instant,
    ) -> Result<OpenStream, ApiError> {
        let request = Payload::new(request);
        let opened = self
            .ask(|port| ServingMessage::OpenStream(request, port), deadline)
            .await?;
        Ok(OpenStream {
            serving: self.clone(),
            id: opened.stream,
            closed: false,
        })
    }

    /// Sends the message `make` builds and waits for its answer, at most until
    /// `deadline` and [`ANSWER_GRACE`].
    async fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(RpcReplyPort<Payload<Result<T, ServingError>>>) -> ServingMessage,
        deadline: Instant,
    ) -> Result<T, ApiError> {
        let within = deadline.saturating_duration_since(Instant::now()) + ANSWER_GRACE;
        match self.actor.call(make, Some(within)).await {
            Ok(CallResult::Success(Payload(Ok(answer)))) => answer.map_err(ApiError::from),
            Ok(CallResult::Success(Payload(Err(text)))) => Err(ApiError::new(
                ErrorKind::Internal,
                format!("the serving's answer did not decode: {text}"),
            )),
            Ok(CallResult::Timeout) => Err(ApiError::new(
                ErrorKind::Deadline,
                "the deadline passed with no answer from the serving (HARNESS_HTTP_DEADLINE_MS)",
            )),
            Ok(CallResult::SenderError) | Err(_) => Err(ApiError::new(
                ErrorKind::Internal,
                "the serving stopped with the request in flight; it restarts: retry",
            )),
        }
    }
}

/// Milliseconds left until `deadline` (at least 1: 0 would be no time at all).
pub fn budget_ms(deadline: Instant) -> u64 {
    (deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64)
        .max(1)
}

/// A generation being streamed. Dropped before its end (the HTTP caller went
/// away, or its answer was abandoned), it cancels the generation, which frees
/// its sequence slot at the engine's next step.
pub struct OpenStream {
    serving: LocalServing,
    id: u64,
    /// The serving closed it (its end was pulled).
    closed: bool,
}

impl OpenStream {
    /// What the generation made since the last pull, waiting at most
    /// [`PULL_WAIT`] for something.
    pub async fn pull(&mut self) -> Result<StreamChunk, ApiError> {
        let request = Payload::new(PullRequest {
            version: PROTOCOL_VERSION,
            stream: self.id,
            wait_ms: PULL_WAIT.as_millis() as u32,
        });
        let pulled = self
            .serving
            .ask(
                |port| ServingMessage::PullStream(request, port),
                Instant::now() + PULL_WAIT,
            )
            .await;
        // Only its end closes it for sure: after an error (the serving's, or
        // no answer in time) a cancel on drop is harmless if the serving had
        // closed it, and needed if it had not.
        if pulled.as_ref().is_ok_and(|chunk| chunk.end.is_some()) {
            self.closed = true;
        }
        pulled
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let cancel = Payload::new(CancelRequest {
            version: PROTOCOL_VERSION,
            stream: self.id,
        });
        let _ = self
            .serving
            .actor
            .cast(ServingMessage::CancelStream(cancel));
        tracing::debug!(
            stream = self.id,
            "the HTTP caller left; its generation was cancelled"
        );
    }
}
