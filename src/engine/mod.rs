//! The engine: the one room that touches libtorch (`tch`).
//!
//! A model is loaded onto its device on a dedicated OS thread, which then runs every
//! `forward` under `no_grad` (grad mode is per thread, so the guard is set once, on
//! that thread). Callers talk to it through a bounded queue and get one reply per
//! call; libtorch never runs on a tokio worker. A torch error becomes a typed
//! [`ForwardError`] for that batch's callers and the engine keeps serving; a CUDA
//! failure or a panic inside libtorch's wrappers (caught on the engine thread, so
//! no panic reaches a caller) stops it, reported by [`Engine::failure`].
//!
//! The files read in one direction: `mod.rs` (the handle) → `thread.rs` (the one
//! engine thread) → `batcher.rs` → `model.rs` → `collate.rs`, `host.rs` (requests'
//! bytes), `torchscript.rs` (a leaf: the TorchScript calls) → `error.rs`, `device.rs`. The generation task has
//! an engine of its own, `generation/` (a language model with continuous batching).

mod batcher;
mod collate;
pub mod demo;
mod device;
mod error;
pub mod generation;
pub mod gpu;
mod host;
mod model;
mod thread;
mod torchscript;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, watch};

pub use batcher::{Answer, BatchConfig, BatchObserver, EngineStats};
pub use collate::{Collate, Finish};
pub use device::DeviceChoice;
pub(crate) use error::panic_message;
pub use error::{ForwardError, LoadError, RunError};
pub use host::HostTensor;
pub use tch::{Kind, Tensor};

/// A handle to a loaded model. Clones share the one engine thread; the thread ends
/// when the last handle is dropped and the queue has drained.
#[derive(Clone)]
pub struct Engine {
    jobs: std::sync::mpsc::Sender<batcher::Job>,
    device: DeviceChoice,
    model_path: Arc<PathBuf>,
    config: BatchConfig,
    collate: Arc<Collate>,
    stats: Arc<EngineStats>,
    fatal: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device)
            .field("model_path", &self.model_path)
            .field("config", &self.config)
            .finish()
    }
}

impl Engine {
    /// Loads the TorchScript file at `path` onto `device` and starts its engine
    /// thread, which batches [`Engine::run`] calls as `config` says, stacking
    /// tensors ([`Collate::Stack`]).
    pub async fn load(
        path: impl AsRef<Path>,
        device: DeviceChoice,
        config: BatchConfig,
    ) -> Result<Self, LoadError> {
        Self::load_with(path, device, config, Collate::Stack, None).await
    }

    /// [`Engine::load`], with the way requests are joined ([`Collate::Tokens`] pads
    /// token sequences per batch) and a task's step on the device after every
    /// forward, direct ones included (the embedding task's pooling).
    pub async fn load_with(
        path: impl AsRef<Path>,
        device: DeviceChoice,
        config: BatchConfig,
        collate: Collate,
        finish: Option<Arc<dyn Finish>>,
    ) -> Result<Self, LoadError> {
        let model_path = path.as_ref().to_path_buf();
        let (fatal_tx, fatal) = watch::channel(None);
        let stats = Arc::new(EngineStats::default());
        let shared = thread::Shared {
            config,
            collate: collate.clone(),
            finish,
            stats: stats.clone(),
            fatal: fatal_tx,
        };
        let jobs = thread::start(model_path.clone(), device, shared).await?;
        Ok(Engine {
            jobs,
            device,
            model_path: Arc::new(model_path),
            config,
            collate: Arc::new(collate),
            stats,
            fatal,
        })
    }

    /// Runs the model's `forward` on exactly `inputs` (moved to the model's device
    /// first), alone, and returns its output tensors on the CPU. A model that
    /// returns one tensor gives a vector of one; a tuple or list of tensors gives
    /// them in order. For serving, [`Engine::run`] batches.
    pub async fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ForwardError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(batcher::Job::Direct { inputs, reply })
            .map_err(|_| ForwardError::Stopped)?;
        answer.await.map_err(|_| ForwardError::Stopped)?
    }

    /// Runs `inputs` (tensors sharing their leading dimension: the items) batched
    /// with other callers' items of the same dtype and trailing shape, and returns
    /// this caller's rows of the outputs. [`Engine::submit`] with tensors: they
    /// are read into host memory first.
    pub async fn run(
        &self,
        inputs: Vec<Tensor>,
        deadline: Instant,
    ) -> Result<Vec<Tensor>, RunError> {
        let inputs = inputs
            .iter()
            .map(HostTensor::from_tensor)
            .collect::<Result<Vec<_>, _>>()
            .map_err(RunError::Forward)?;
        let (reply, answer) = oneshot::channel();
        self.submit(inputs, deadline, move |answer| {
            let _ = reply.send(answer);
        });
        let outputs = answer
            .await
            .map_err(|_| RunError::Forward(ForwardError::Stopped))??;
        outputs
            .iter()
            .map(HostTensor::to_tensor)
            .collect::<Result<_, _>>()
            .map_err(RunError::Forward)
    }

    /// Queues `inputs` (host tensors sharing their leading dimension: the items)
    /// to run batched with other callers' items of the same batch key, and calls
    /// `reply` exactly once with this caller's rows of the outputs: on the engine
    /// thread once run, at once when refused (`Overloaded` when the queue holds
    /// `max_queue` items, a malformed request), or `DeadlineExceeded`, unrun, if
    /// `deadline` passes while it waits. `reply` must be quick: the engine thread
    /// runs it between forwards.
    pub fn submit(
        &self,
        inputs: Vec<HostTensor>,
        deadline: Instant,
        reply: impl FnOnce(Answer) + Send + 'static,
    ) {
        let reply = batcher::Reply::new(reply);
        let key = match self.collate.key(&inputs) {
            Ok(key) => key,
            Err(err) => return reply.send(Err(RunError::Forward(err))),
        };
        let items = inputs[0].items();
        let capacity = self.config.max_queue as u64;
        if items as u64 > capacity {
            return reply.send(Err(RunError::TooManyItems {
                items: items as u64,
                capacity,
            }));
        }
        let queued = self
            .stats
            .queued_items
            .fetch_add(items as u64, Ordering::SeqCst);
        if queued + items as u64 > capacity {
            self.stats
                .queued_items
                .fetch_sub(items as u64, Ordering::SeqCst);
            return reply.send(Err(RunError::Overloaded { queued, capacity }));
        }
        let request = batcher::Request {
            key,
            inputs,
            items,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        if let Err(refused) = self.jobs.send(batcher::Job::Batched(request)) {
            self.stats
                .queued_items
                .fetch_sub(items as u64, Ordering::SeqCst);
            if let batcher::Job::Batched(request) = refused.0 {
                request
                    .reply
                    .send(Err(RunError::Forward(ForwardError::Stopped)));
            }
        }
    }

    /// Runs `rounds` forwards on `sample` and drops the outputs. TorchScript's
    /// profiling executor optimises a graph per input shape over its first calls, so
    /// warm up with the shapes that will be served.
    pub async fn warm_up(&self, sample: Vec<Tensor>, rounds: usize) -> Result<(), ForwardError> {
        for _ in 0..rounds {
            let inputs = sample.iter().map(Tensor::shallow_clone).collect();
            self.forward(inputs).await?;
        }
        Ok(())
    }

    /// The device the model lives on.
    pub fn device(&self) -> DeviceChoice {
        self.device
    }

    /// The file the model was loaded from.
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// The batching settings.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Tells `observer` of every batch from now on (once per engine).
    pub fn observe(&self, observer: Arc<dyn BatchObserver>) {
        let _ = self.stats.observer.set(observer);
    }

    /// The engine's counters: queued items, forwards run. They hold nothing of
    /// the model, so a reader may keep them past the engine's life.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Resolves when the engine fails for good (a CUDA error, a panic), with why.
    /// The engine answers no more work after that: the serving must restart.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }
}
