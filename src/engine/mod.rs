//! The engine: the one room that touches libtorch (`tch`).
//!
//! A model is loaded onto its device on a dedicated OS thread, which then runs every
//! `forward` under `no_grad` (grad mode is per thread, so the guard is set once, on
//! that thread). Callers talk to it through a bounded queue and get one reply per
//! call; libtorch never runs on a tokio worker. A torch error becomes a typed
//! [`ForwardError`] and a panic inside libtorch's wrappers is caught on the engine
//! thread, so no panic reaches a caller and the engine keeps serving.

pub mod demo;
mod error;
pub mod gpu;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::device::DeviceChoice;
pub use error::{ForwardError, LoadError};
pub use tch::{Kind, Tensor};

/// A handle to a loaded model. Clones share the one engine thread; the thread ends
/// when the last handle is dropped and the queue has drained.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<worker::Job>,
    device: DeviceChoice,
    model_path: Arc<PathBuf>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device)
            .field("model_path", &self.model_path)
            .finish()
    }
}

impl Engine {
    /// Loads the TorchScript file at `path` onto `device` and starts its engine thread.
    /// `queue_capacity` bounds the calls waiting for the thread; further callers wait
    /// for room (backpressure) rather than growing memory.
    pub async fn load(
        path: impl AsRef<Path>,
        device: DeviceChoice,
        queue_capacity: usize,
    ) -> Result<Self, LoadError> {
        let model_path = path.as_ref().to_path_buf();
        let (jobs, queue) = mpsc::channel(queue_capacity.max(1));
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let thread_path = model_path.clone();
        std::thread::Builder::new()
            .name("harness-engine".to_string())
            .spawn(move || worker::run(thread_path, device, queue, loaded_tx))
            .map_err(LoadError::Thread)?;
        match loaded_rx.await {
            Ok(Ok(())) => Ok(Engine {
                jobs,
                device,
                model_path: Arc::new(model_path),
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(LoadError::Panicked {
                path: model_path,
                message: "the engine thread ended before reporting the load".to_string(),
            }),
        }
    }

    /// Runs the model's `forward` on `inputs` (moved to the model's device first) and
    /// returns its output tensors, on the CPU. A model that returns one tensor gives a
    /// vector of one; a tuple or list of tensors gives them in order.
    pub async fn forward(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ForwardError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(worker::Job { inputs, reply })
            .await
            .map_err(|_| ForwardError::Stopped)?;
        answer.await.map_err(|_| ForwardError::Stopped)?
    }

    /// Runs `rounds` forwards on `sample` and drops the outputs. TorchScript's
    /// profiling executor optimises a graph per input shape over its first calls, so
    /// warm up with the shapes that will be served.
    pub async fn warm_up(&self, sample: &[Tensor], rounds: usize) -> Result<(), ForwardError> {
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
}

/// libtorch's device for one of ours.
pub(crate) fn tch_device(device: DeviceChoice) -> tch::Device {
    match device {
        DeviceChoice::Cpu => tch::Device::Cpu,
        DeviceChoice::Cuda(index) => tch::Device::Cuda(index),
    }
}
