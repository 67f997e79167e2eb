//! Tasks: what a request means to the model, on each side of the engine. Each task
//! is one type implementing [`Task`]: it checks its requests, prepares them for
//! the engine (tensors from the wire, texts tokenized), finishes the engine's
//! answer (vectors pooled, tensors to the wire) and warms its model up. The
//! serving holds one `Arc<dyn Task>` and knows no task by name: adding a task is
//! adding a file here and an arm in [`load`].
//!
//! With the engine, the only room that touches `tch`.

pub mod embedding;
pub mod generation;
mod pooling;
pub mod tensor;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use harness_client::{
    EmbedReply, EmbedRequest, GenerateReply, GenerateRequest, RunReply, RunRequest, ServingError,
};
use tokio::sync::watch;

pub use pooling::{Pooler, Pooling};

use crate::config::Task as TaskKind;
use crate::engine::generation::GenerationObserver;
use crate::engine::{
    BatchConfig, BatchObserver, DeviceChoice, EngineStats, ForwardError, LoadError, RunError,
};

/// When a request arrived and when its caller stops waiting.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub received: Instant,
    pub deadline: Instant,
}

/// Where a request's answer goes: called exactly once, from whichever thread
/// has the answer (the engine thread, for `Run` and `Embed`), so it must be quick.
pub type Respond<R> = Box<dyn FnOnce(R) + Send>;

/// A request's caller, as the node sees it: gone once its session closed.
pub trait Caller: Send + Sync {
    /// Whether the caller has gone (asked at each engine step: cheap).
    fn gone(&self) -> bool;
}

/// What a task is loaded with.
pub struct LoadContext {
    /// The model's files by name (as `HARNESS_MODEL_FILES` lists them), fetched.
    pub files: Vec<(String, PathBuf)>,
    pub device: DeviceChoice,
    pub batch: BatchConfig,
    /// `HARNESS_WARMUP_INPUTS`, parsed: the tensor task's per-item inputs.
    pub warmup_inputs: Option<Vec<tensor::InputSpec>>,
    /// Told of every batch the task's engine runs (the serving's metrics).
    pub observer: Arc<dyn BatchObserver>,
    /// The generation task's settings.
    pub generation: crate::config::GenerationConfig,
    /// Told of the generation engine's work (the serving's metrics).
    pub generations: Arc<dyn GenerationObserver>,
}

/// A loaded task: its model on the device and everything around it. A request
/// kind the task does not answer gets `BadInput` naming the one it does.
pub trait Task: Send + Sync + 'static {
    /// The task's name, as `HARNESS_TASK` writes it.
    fn name(&self) -> &'static str;

    /// The request kind it answers (`Run`, `Embed`), for callers who send another.
    fn answers(&self) -> &'static str;

    /// Runs the model on the shapes it will serve, so the first requests are not
    /// slow (TorchScript optimises a graph per input shape over its first calls).
    fn warm_up(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>>;

    /// The engine's counters (queued items), which outlive the model.
    fn stats(&self) -> Arc<EngineStats>;

    /// Resolves when the model's engine fails for good, with why.
    fn failure(&self) -> watch::Receiver<Option<String>>;

    /// What `/status` shows of a generation serving (slots, memory).
    fn generation_status(&self) -> Option<generation::GenerationStatus> {
        None
    }

    /// `Run`: tensors in, tensors out, answered through `respond`.
    fn run(self: Arc<Self>, _request: RunRequest, _timing: Timing, respond: Respond<RunReply>) {
        respond(Err(self.refuse("Run")));
    }

    /// `Embed`: texts in, one vector per text out, answered through `respond`.
    fn embed(
        self: Arc<Self>,
        _request: EmbedRequest,
        _timing: Timing,
        respond: Respond<EmbedReply>,
    ) {
        respond(Err(self.refuse("Embed")));
    }

    /// `Generate`: a prompt in, its continuation out. `caller`, where the
    /// request named one, ends the generation early once it is gone.
    fn generate(
        self: Arc<Self>,
        _request: GenerateRequest,
        _timing: Timing,
        _caller: Option<Arc<dyn Caller>>,
    ) -> BoxFuture<'static, GenerateReply> {
        let refusal = self.refuse("Generate");
        Box::pin(async move { Err(refusal) })
    }

    /// `OpenStream`: the generation queued, its text to be pulled from the
    /// stream as it is made.
    fn open_stream(
        self: Arc<Self>,
        _request: GenerateRequest,
        _timing: Timing,
        _caller: Option<Arc<dyn Caller>>,
    ) -> BoxFuture<'static, Result<Arc<generation::TextStream>, ServingError>> {
        let refusal = self.refuse("Generate");
        Box::pin(async move { Err(refusal) })
    }

    /// The answer to a request kind this task does not take.
    fn refuse(&self, sent: &str) -> ServingError {
        let (name, answers) = (self.name(), self.answers());
        let task = ANSWERED_BY
            .iter()
            .find(|(kind, _)| *kind == sent)
            .map_or(String::new(), |(_, task)| {
                format!(", or start it with HARNESS_TASK={task}")
            });
        ServingError::BadInput {
            reason: format!("this node serves the {name} task: send {answers}{task}"),
        }
    }
}

/// Which task answers each request kind (`HARNESS_TASK`'s values).
const ANSWERED_BY: &[(&str, &str)] = &[
    ("Run", "tensor"),
    ("Embed", "embedding"),
    ("Generate", "generation"),
];

/// Why a task could not be loaded, and whether loading again could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFailure {
    pub message: String,
    /// The files or settings are wrong (not TorchScript, a bad manifest): the
    /// same files fail the same way however often the serving restarts.
    pub permanent: bool,
}

impl LoadFailure {
    /// A failure that only a change of files or settings fixes.
    pub fn permanent(message: impl Into<String>) -> Self {
        LoadFailure {
            message: message.into(),
            permanent: true,
        }
    }
}

impl From<String> for LoadFailure {
    /// A failure a restart may fix (a device error, memory, a thread).
    fn from(message: String) -> Self {
        LoadFailure {
            message,
            permanent: false,
        }
    }
}

impl From<LoadError> for LoadFailure {
    fn from(err: LoadError) -> Self {
        let permanent = matches!(
            err,
            LoadError::Missing { .. } | LoadError::NotTorchScript { .. }
        );
        LoadFailure {
            message: err.to_string(),
            permanent,
        }
    }
}

/// Loads the task `kind` from its files: its own checks, its engine, its model.
pub async fn load(kind: TaskKind, context: LoadContext) -> Result<Arc<dyn Task>, LoadFailure> {
    Ok(match kind {
        TaskKind::Tensor => Arc::new(tensor::TensorTask::load(context).await?),
        TaskKind::Embedding => Arc::new(embedding::EmbeddingTask::load(context).await?),
        TaskKind::Generation => Arc::new(generation::GenerationTask::load(context).await?),
    })
}

/// What the caller can do about an engine error.
pub(crate) fn serving_error(err: RunError, received: Instant) -> ServingError {
    match err {
        RunError::Overloaded { queued, capacity } => ServingError::Overloaded { queued, capacity },
        e @ RunError::TooManyItems { .. } => ServingError::BadInput {
            reason: e.to_string(),
        },
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

/// A failure of ours (a blocking task that died), for the caller.
pub(crate) fn internal(err: impl std::fmt::Display) -> ServingError {
    ServingError::Internal {
        message: err.to_string(),
    }
}

/// Runs CPU work (building tensors, tokenizing, reading vectors back) off the
/// async workers; a failure of the work itself becomes `on_error(reason)`.
pub(crate) async fn off_async<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
    on_error: impl FnOnce(String) -> ServingError,
) -> Result<T, ServingError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(internal)?
        .map_err(on_error)
}
