//! The generation engine: a causal language model of the Llama family on its own
//! thread, with a KV cache of fixed sequence slots and continuous batching.
//!
//! `mod.rs` (the handle: load, generate) → `scheduler.rs` (the thread's loop:
//! slots, prefill, decode steps) → `llama.rs` (the forward) → `rope.rs`,
//! `kv_cache.rs`; `weights.rs` reads safetensors shards, `config.rs` the model's
//! `config.json`, `sampling.rs` chooses tokens.

pub mod config;
mod kv_cache;
mod llama;
mod rope;
mod sampling;
mod scheduler;
mod weights;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Kind;
use tokio::sync::{oneshot, watch};

pub use config::{ConfigError, ModelConfig, SUPPORTED};
pub use sampling::{fresh_seed, SamplingParams};

use super::device::DeviceChoice;
use super::error::panic_message;
use super::{EngineStats, ForwardError};
use kv_cache::KvCache;
use llama::Llama;
use scheduler::{Scheduler, Work};
use weights::Checkpoint;

/// How the engine is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationSettings {
    /// Sequences at once (`HARNESS_MAX_SEQUENCES`).
    pub slots: u32,
    /// Tokens per sequence, prompt and output (`HARNESS_MAX_CONTEXT`, resolved).
    pub context: u32,
    /// Requests waiting for a slot before `Overloaded` (`HARNESS_MAX_QUEUE`).
    pub max_queue: u32,
    /// The weights' and cache's dtype.
    pub kind: Kind,
}

/// What the model takes on its device, computed before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub parameters: u64,
}

/// The task's eyes on one sequence, on the engine thread: told of each token
/// (to stream it, and to end the generation at a stop string), and asked at
/// each step whether the caller is still there.
pub trait Watcher: Send {
    /// `generated` gained its last token: whether the text so far ends the
    /// generation (a stop string). Called for every token, the end-of-sequence
    /// token included.
    fn token(&mut self, generated: &[u32]) -> bool;
    /// Whether the caller has gone (cancelled, its session closed): the
    /// sequence then ends at the next step, queued or running, and its slot is
    /// freed. Asked once per step, so it must be cheap.
    fn cancelled(&self) -> bool {
        false
    }
}

/// One generation asked of the engine.
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: u32,
    /// Tokens that end it (`eos_token_id`, one or several).
    pub eos: Vec<u32>,
    pub watcher: Option<Box<dyn Watcher>>,
    /// When the request reached the node (queue waits and time to first token
    /// count from here).
    pub received: Instant,
    /// When the caller stops waiting: the sequence ends there, queued or running.
    pub deadline: Instant,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
    /// The caller cancelled or went away ([`Watcher::cancelled`], or the
    /// future of [`GenerationEngine::submit`] dropped).
    Cancelled,
}

/// A generation that ran to its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The generated tokens (the end-of-sequence token included).
    pub tokens: Vec<u32>,
    pub reason: Finish,
    /// When the first token was chosen (none for a generation cancelled before
    /// it had one).
    pub first_token: Option<Instant>,
}

/// Why a generation did not run to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    #[error("the queue is full ({queued} requests waiting of {capacity})")]
    Overloaded { queued: u64, capacity: u64 },
    #[error("the deadline passed after {waited:?}")]
    DeadlineExceeded { waited: Duration },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Why the engine could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GenerationLoadError {
    /// The files are wrong for this engine: a restart cannot help.
    #[error("{0}")]
    Checkpoint(String),
    /// The model and its cache do not fit: settings must change.
    #[error("{0}")]
    TooLarge(String),
    /// The device or the thread failed: a restart may help.
    #[error("{0}")]
    Device(String),
}

/// Told of the engine's work (the serving's metrics).
pub trait GenerationObserver: Send + Sync {
    /// A prompt of `prompt_tokens` was run: after `queued` waiting for a slot, its
    /// first token came `time_to_first_token` after arrival.
    fn prefill(&self, prompt_tokens: usize, queued: Duration, time_to_first_token: Duration);
    /// A decode step gave one token to each of `sequences` in `took`.
    fn step(&self, sequences: usize, took: Duration);
    /// A generation ended with `generated` tokens, for `reason` (a deadline
    /// that passed counts as [`Finish::Cancelled`]).
    fn finished(&self, generated: usize, reason: Finish);
    /// Slots holding a sequence now.
    fn slots_in_use(&self, slots: usize);
}

/// Counters the engine keeps (for status and tests).
#[derive(Default)]
pub struct GenerationStats {
    /// The serving's view: requests waiting for a slot (`queued_items`), decode
    /// steps run (`forwards`) and tokens they gave (`batched_items`).
    pub engine: Arc<EngineStats>,
    /// Slots holding a sequence.
    pub slots_in_use: AtomicU64,
    /// Tokens generated since load.
    pub generated_tokens: AtomicU64,
}

/// The handle to the engine thread; the thread ends when the last handle is gone.
pub struct GenerationEngine {
    work: Sender<Work>,
    stats: Arc<GenerationStats>,
    fatal: watch::Receiver<Option<String>>,
    settings: GenerationSettings,
    memory: MemoryPlan,
}

/// A load read from the checkpoint's headers, before anything is allocated:
/// what it will take, and what the engine thread loads.
pub struct LoadPlan {
    config: ModelConfig,
    checkpoint: Checkpoint,
    settings: GenerationSettings,
    /// What the weights and the KV cache take on the device.
    pub memory: MemoryPlan,
}

impl GenerationEngine {
    /// Reads the headers of `files` (safetensors) and computes what loading
    /// `config` from them with `settings` takes on the device.
    pub fn plan(
        config: ModelConfig,
        files: &[PathBuf],
        settings: GenerationSettings,
    ) -> Result<LoadPlan, GenerationLoadError> {
        let checkpoint =
            Checkpoint::open(files).map_err(|e| GenerationLoadError::Checkpoint(e.to_string()))?;
        let names = llama::tensor_names(&config, &checkpoint);
        let memory = MemoryPlan {
            weight_bytes: llama::weight_bytes(&checkpoint, &names, settings.kind),
            kv_cache_bytes: KvCache::bytes(
                &config,
                settings.slots as i64,
                settings.context as i64,
                settings.kind,
            ),
            parameters: config.parameters() as u64,
        };
        Ok(LoadPlan {
            config,
            checkpoint,
            settings,
            memory,
        })
    }

    /// Starts the engine thread, which loads the planned model onto `device` and
    /// allocates the cache, and waits for that.
    pub async fn load(
        plan: LoadPlan,
        device: DeviceChoice,
        observer: Option<Arc<dyn GenerationObserver>>,
    ) -> Result<GenerationEngine, GenerationLoadError> {
        let (settings, memory) = (plan.settings, plan.memory);
        let (work, queue) = std::sync::mpsc::channel();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (fatal_tx, fatal) = watch::channel(None);
        let stats = Arc::new(GenerationStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("harness-generation".to_string())
            .spawn(move || {
                // Grad mode is per thread: nothing here builds autograd graphs.
                let _no_grad = tch::no_grad_guard();
                let loaded = catch_unwind_load(|| load_on_thread(&plan, device));
                let (model, cache) = match loaded {
                    Ok(loaded) => {
                        let _ = loaded_tx.send(Ok(()));
                        loaded
                    }
                    Err(err) => {
                        let _ = loaded_tx.send(Err(err));
                        return;
                    }
                };
                Scheduler {
                    model: &model,
                    cache,
                    slots: settings.slots as i64,
                    context: settings.context as i64,
                    stats: &thread_stats,
                    observer,
                    fatal: &fatal_tx,
                }
                .serve(queue);
                tracing::debug!("generation engine stopped");
            })
            .map_err(|e| GenerationLoadError::Device(format!("starting the engine thread: {e}")))?;
        match loaded_rx.await {
            Ok(Ok(())) => Ok(GenerationEngine {
                work,
                stats,
                fatal,
                settings,
                memory,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(GenerationLoadError::Device(
                "the engine thread ended before reporting the load".to_string(),
            )),
        }
    }

    /// Generates `sequence` to its end; waits for a slot in the bounded queue.
    pub async fn generate(&self, sequence: Sequence) -> Result<Finished, GenerateError> {
        self.submit(sequence)?.await
    }

    /// Queues `sequence` (or refuses it at once: the queue is full, the engine
    /// stopped); the future resolves when it ends. Dropping the future cancels
    /// the sequence at the next step.
    pub fn submit(
        &self,
        sequence: Sequence,
    ) -> Result<impl std::future::Future<Output = Result<Finished, GenerateError>>, GenerateError>
    {
        let capacity = self.settings.max_queue as u64;
        let queue = &self.stats.engine.queued_items;
        let queued = queue.fetch_add(1, Ordering::Relaxed);
        if queued >= capacity {
            queue.fetch_sub(1, Ordering::Relaxed);
            return Err(GenerateError::Overloaded { queued, capacity });
        }
        let (reply, answer) = oneshot::channel();
        let work = Work { sequence, reply };
        if self.work.send(work).is_err() {
            queue.fetch_sub(1, Ordering::Relaxed);
            return Err(ForwardError::Stopped.into());
        }
        Ok(async move { answer.await.unwrap_or(Err(ForwardError::Stopped.into())) })
    }

    /// How the engine is sized.
    pub fn settings(&self) -> GenerationSettings {
        self.settings
    }

    /// What the model and its cache take on the device.
    pub fn memory(&self) -> MemoryPlan {
        self.memory
    }

    /// The engine's counters.
    pub fn stats(&self) -> &Arc<GenerationStats> {
        &self.stats
    }

    /// Resolves when the engine fails for good (a CUDA error), with why.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }
}

fn catch_unwind_load<T>(
    load: impl FnOnce() -> Result<T, GenerationLoadError>,
) -> Result<T, GenerationLoadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)).unwrap_or_else(|payload| {
        Err(GenerationLoadError::Device(format!(
            "loading the model panicked: {}",
            panic_message(payload.as_ref())
        )))
    })
}

fn load_on_thread(
    plan: &LoadPlan,
    device: DeviceChoice,
) -> Result<(Llama, KvCache), GenerationLoadError> {
    let (config, settings) = (&plan.config, &plan.settings);
    let device = device.tch();
    let too_large = |what: &str, message: String| {
        let lower = message.to_ascii_lowercase();
        if lower.contains("out of memory") || lower.contains("alloc") {
            GenerationLoadError::TooLarge(too_large_message(&plan.memory, settings, what, &message))
        } else {
            GenerationLoadError::Device(format!("{what}: {message}"))
        }
    };
    let model = Llama::load(
        config,
        &plan.checkpoint,
        settings.kind,
        device,
        settings.context as i64,
    )
    .map_err(|e| match e {
        weights::WeightsError::Device { message, .. } => too_large("loading the weights", message),
        other => GenerationLoadError::Checkpoint(other.to_string()),
    })?;
    let cache = KvCache::new(
        config,
        settings.slots as i64,
        settings.context as i64,
        settings.kind,
        device,
    )
    .map_err(|e| too_large("allocating the KV cache", e.to_string()))?;
    Ok((model, cache))
}

/// What to lower when the model and its cache do not fit.
pub fn too_large_message(
    plan: &MemoryPlan,
    settings: &GenerationSettings,
    what: &str,
    cause: &str,
) -> String {
    format!(
        "the model does not fit the device ({what}: {cause}): it needs {} of weights and {} of KV cache ({} sequences × {} tokens); lower HARNESS_MAX_SEQUENCES or HARNESS_MAX_CONTEXT, or choose a smaller HARNESS_DTYPE",
        gib(plan.weight_bytes),
        gib(plan.kv_cache_bytes),
        settings.slots,
        settings.context
    )
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The device's dtype name (`bf16`, `f16`, `f32`).
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Float => "f32",
        Kind::Double => "f64",
        _ => "other",
    }
}
