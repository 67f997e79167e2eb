//! The engine thread, the one place libtorch runs: it loads the model, reports
//! the load, then hands the queue to the batcher until every handle is gone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use super::batcher::{self, BatchConfig, EngineStats, Job};
use super::collate::{Collate, Finish};
use super::device::DeviceChoice;
use super::error::{panic_message, LoadError};
use super::model::Model;
use super::torchscript::TorchScript;

/// What the engine thread needs besides the model file.
pub(super) struct Shared {
    pub config: BatchConfig,
    pub collate: Collate,
    pub finish: Option<Arc<dyn Finish>>,
    pub stats: Arc<EngineStats>,
    pub fatal: watch::Sender<Option<String>>,
}

/// Starts the engine thread for the model at `path` and waits for its load: the
/// queue's sending end once loaded.
pub(super) async fn start(
    path: PathBuf,
    device: DeviceChoice,
    shared: Shared,
) -> Result<Sender<Job>, LoadError> {
    // Unbounded: admission is counted in items against `max_queue` before a
    // request is sent, so a full queue answers at once instead of blocking.
    let (jobs, queue) = std::sync::mpsc::channel();
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("harness-engine".to_string())
        .spawn(move || run(thread_path, device, queue, shared, loaded_tx))
        .map_err(LoadError::Thread)?;
    match loaded_rx.await {
        Ok(Ok(())) => Ok(jobs),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(LoadError::Panicked {
            path,
            message: "the engine thread ended before reporting the load".to_string(),
        }),
    }
}

/// The thread's body: load, report the load, then serve until every handle is gone.
fn run(
    path: PathBuf,
    device: DeviceChoice,
    queue: std::sync::mpsc::Receiver<Job>,
    shared: Shared,
    loaded: oneshot::Sender<Result<(), LoadError>>,
) {
    // Grad mode is per thread: every forward on this thread, warm-up included, runs
    // without building autograd graphs.
    let _no_grad = tch::no_grad_guard();

    let span = tracing::info_span!("engine.load", path = %path.display(), %device);
    let started = Instant::now();
    let module = span.in_scope(|| {
        catch_unwind(AssertUnwindSafe(|| TorchScript::load(&path, device))).unwrap_or_else(
            |payload| {
                Err(LoadError::Panicked {
                    path: path.clone(),
                    message: panic_message(payload.as_ref()),
                })
            },
        )
    });
    let script = match module {
        Ok(script) => {
            span.in_scope(|| {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                )
            });
            let _ = loaded.send(Ok(()));
            script
        }
        Err(err) => {
            let _ = loaded.send(Err(err));
            return;
        }
    };

    let model = Model {
        script,
        collate: shared.collate,
        finish: shared.finish,
    };
    batcher::serve(&model, queue, shared.config, &shared.stats, &shared.fatal);
    tracing::debug!(path = %path.display(), "engine stopped");
}
