//! The serving's slow start, run after the actor has started so that requests are
//! answered (`NotReady`) meanwhile: choose the device, fetch, load the task, warm
//! up, go ready; then watch the engine until it fails.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};

use futures_util::FutureExt;
use harness_client::{serving_group, ServingMessage};
use ractor::ActorRef;
use tokio::sync::watch;

use super::shared::{DeviceInfo, FileInfo, ModelInfo, Phase, Running, ServingShared};
use crate::config::{Config, ModelSource};
use crate::device::choose_serving_device;
use crate::engine::{gpu::GpuFacts, panic_message, DeviceChoice};
use crate::fetch;
use crate::fetch::FetchError;
use crate::tasks::{self, tensor::InputSpec, LoadContext, LoadFailure, Task};

/// The loaded task of one life of the serving, and with it the model: set once
/// when the serving is ready, released when that life ends ([`Loaded::release`] in
/// `post_stop`, or the actor's state dropped after a panic), so that the model's
/// memory is freed before the supervisor loads the next one. Requests in flight
/// hold it only until they are answered.
#[derive(Default)]
pub struct Loaded(RwLock<Option<Arc<dyn Task>>>);

impl Loaded {
    /// The task, once ready.
    pub fn get(&self) -> Option<Arc<dyn Task>> {
        self.0.read().ok().and_then(|t| t.clone())
    }

    fn set(&self, task: Arc<dyn Task>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(task);
        }
    }

    /// Lets go of the task: the engine ends once the last request using it is
    /// answered.
    pub fn release(&self) {
        if let Ok(mut slot) = self.0.write() {
            slot.take();
        }
    }
}

/// Brings the serving to `ready` (or `no_gpu`), then watches the engine. A failure
/// on the way, or of the engine later, stops the actor with the reason, and the
/// supervisor restarts it.
pub async fn run(
    myself: ActorRef<ServingMessage>,
    config: Arc<Config>,
    shared: Arc<ServingShared>,
    loaded: Arc<Loaded>,
) {
    // A panic in any phase ends in `failed` with its message, like any error,
    // so the supervisor restarts the serving instead of it staying in a phase.
    let started = AssertUnwindSafe(start(&myself, &config, &shared, &loaded))
        .catch_unwind()
        .await;
    let reason = match started {
        Ok(Ok(Some(failure))) => until_failed(failure).await,
        Ok(Ok(None)) => return, // no GPU: alive, never ready
        Ok(Err(failure)) => {
            if failure.permanent {
                // The supervisor reads it when this life ends: no restart.
                shared.fail_for_good(failure.message.clone());
            }
            failure.message
        }
        Err(panic) => format!(
            "the serving panicked while {}: {}",
            shared.phase().phase,
            panic_message(panic.as_ref())
        ),
    };
    shared.set_phase(Phase::Failed, Some(reason.clone()));
    myself.stop(Some(reason));
}

/// The phases in order; the engine's failure signal once ready, `None` without a GPU.
async fn start(
    myself: &ActorRef<ServingMessage>,
    config: &Config,
    shared: &ServingShared,
    loaded: &Loaded,
) -> Result<Option<watch::Receiver<Option<String>>>, LoadFailure> {
    let warmup_inputs = warmup_inputs(config).map_err(LoadFailure::permanent)?;
    let Some(device) = choose_device(config, shared).await? else {
        return Ok(None);
    };
    shared.set_phase(Phase::Downloading, None);
    let files = fetch_model(config, shared).await?;
    shared.set_phase(Phase::Loading, None);
    let task = load_checked(config, shared, files, device, warmup_inputs).await?;
    shared.set_phase(Phase::Warming, None);
    if shared.take_warm_up_panic() {
        panic!("injected warm-up panic (HARNESS_FAULT_INJECTION)");
    }
    task.clone().warm_up().await?;
    let failure = task.failure();
    go_ready(myself, shared, loaded, task, device);
    Ok(Some(failure))
}

/// `HARNESS_WARMUP_INPUTS`, checked before anything slow.
fn warmup_inputs(config: &Config) -> Result<Option<Vec<InputSpec>>, String> {
    tasks::tensor::warmup_specs(
        config.serving.warmup_inputs.as_deref(),
        config.serving.max_batch_size,
    )
}

/// The device the policy gives on this machine, shown in `/status`; `None` (and
/// the `no_gpu` phase) when the policy needs a GPU that is not there.
async fn choose_device(
    config: &Config,
    shared: &ServingShared,
) -> Result<Option<DeviceChoice>, String> {
    let facts = tokio::task::spawn_blocking(GpuFacts::probe)
        .await
        .map_err(|e| format!("probing the GPU: {e}"))?;
    let device = match choose_serving_device(config.device, &facts, &shared.name) {
        Ok(device) => device,
        Err(no_gpu) => {
            shared.set_phase(Phase::NoGpu, Some(no_gpu.to_string()));
            return Ok(None);
        }
    };
    let (kind, name) = match device {
        DeviceChoice::Cpu => ("cpu", "cpu".to_string()),
        DeviceChoice::Cuda(i) => {
            let gpu = facts.devices.get(i).map_or("unknown", |d| d.name.as_str());
            ("cuda", format!("cuda:{i} {gpu}"))
        }
    };
    shared.set_device(DeviceInfo {
        kind: kind.to_string(),
        name,
    });
    Ok(Some(device))
}

/// The model's files, from the Hub (through the cache) or a local folder, by
/// their names in the repo: every file fetched (an index's shards included), and
/// no absent optional file.
async fn fetch_model(
    config: &Config,
    shared: &ServingShared,
) -> Result<Vec<(String, std::path::PathBuf)>, LoadFailure> {
    let source = config
        .model
        .source(config.serving.task)
        .map_err(LoadFailure::permanent)?;
    let (repo, revision) = match &source {
        ModelSource::Dir { dir, .. } => (dir.display().to_string(), "local".to_string()),
        ModelSource::Hub(spec) => (spec.repo.clone(), spec.revision.clone()),
    };
    shared.set_model(ModelInfo {
        repo: repo.clone(),
        revision: revision.clone(),
        commit: None,
        files: Vec::new(),
    });
    let snapshot = match &source {
        ModelSource::Dir { dir, files } => fetch::local_dir(dir, files),
        ModelSource::Hub(spec) => fetch::fetch(spec, &shared.progress).await,
    }
    .map_err(fetch_failure)?;
    let files = snapshot.named();
    shared.set_model(ModelInfo {
        repo,
        revision,
        commit: snapshot.commit,
        files: files
            .iter()
            .map(|(name, path)| FileInfo {
                name: name.clone(),
                size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            })
            .collect(),
    });
    Ok(files)
}

/// A fetch error, and whether fetching again could help: a repo, revision or file
/// that does not exist, a refused token, files missing offline, or an index that
/// is broken or names a shard the repo lacks, or a file pattern that matches
/// nothing, stay so.
fn fetch_failure(err: FetchError) -> LoadFailure {
    let permanent = matches!(
        err,
        FetchError::NotFound { .. }
            | FetchError::Config(_)
            | FetchError::Unauthorized { .. }
            | FetchError::OfflineMissing { .. }
            | FetchError::LocalMissing { .. }
            | FetchError::NoWeights { .. }
            | FetchError::MissingShard { .. }
            | FetchError::BadIndex { .. }
            | FetchError::NoMatch { .. }
    );
    LoadFailure {
        message: err.to_string(),
        permanent,
    }
}

/// Loads the task while the fetched files are hashed against their names in the
/// cache (in parallel: the check costs a read of the model, not a second load). A
/// file that fails (a disk or volume error) is removed from the cache and fetched
/// again, and the task is loaded from the fresh files; offline, the fetch then
/// names the file as missing.
async fn load_checked(
    config: &Config,
    shared: &ServingShared,
    files: Vec<(String, std::path::PathBuf)>,
    device: DeviceChoice,
    warmup_inputs: Option<Vec<InputSpec>>,
) -> Result<Arc<dyn Task>, LoadFailure> {
    let paths: Vec<_> = files.iter().map(|(_, path)| path.clone()).collect();
    let check = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let corrupt = fetch::verify_files(&paths);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the cached files were checked against their hashes"
        );
        corrupt
    });
    let (task, corrupt) = tokio::join!(
        load_task(config, shared, files, device, warmup_inputs.clone()),
        check
    );
    let corrupt = corrupt.map_err(|e| format!("checking the cached files: {e}"))?;
    if corrupt.is_empty() {
        return task;
    }
    // Whatever the load made of the bad bytes goes; the error it gave too.
    drop(task);
    for bad in &corrupt {
        tracing::warn!(file = %bad.path.display(), "{bad}: the disk or volume under the cache changed it; removed it, fetching it again");
        fetch::evict(bad)
            .map_err(|e| format!("cannot remove the corrupt {}: {e}", bad.blob.display()))?;
    }
    shared.set_phase(Phase::Downloading, None);
    let files = fetch_model(config, shared).await.map_err(|failure| {
        let names: Vec<_> = corrupt
            .iter()
            .map(|c| c.path.display().to_string())
            .collect();
        LoadFailure {
            message: format!(
                "{} failed its check in the cache and was removed; fetching it again failed: {}",
                names.join(", "),
                failure.message
            ),
            ..failure
        }
    })?;
    shared.set_phase(Phase::Loading, None);
    load_task(config, shared, files, device, warmup_inputs).await
}

/// The configured task, loaded onto `device`; the load time goes to the metrics.
async fn load_task(
    config: &Config,
    shared: &ServingShared,
    files: Vec<(String, std::path::PathBuf)>,
    device: DeviceChoice,
    warmup_inputs: Option<Vec<InputSpec>>,
) -> Result<Arc<dyn Task>, LoadFailure> {
    let loading = std::time::Instant::now();
    let context = LoadContext {
        files,
        device,
        batch: config.serving.batch(),
        warmup_inputs,
        observer: shared.metrics.clone(),
        generation: config.serving.generation.clone(),
        generations: shared.metrics.clone(),
    };
    let task = tasks::load(config.serving.task, context).await?;
    shared.metrics.model_loaded(loading.elapsed());
    Ok(task)
}

/// Hands the task to the actor, joins the process group, and says so.
fn go_ready(
    myself: &ActorRef<ServingMessage>,
    shared: &ServingShared,
    loaded: &Loaded,
    task: Arc<dyn Task>,
    device: DeviceChoice,
) {
    shared.set_running(Some(Running {
        stats: task.stats(),
        device,
        task: Arc::downgrade(&task),
    }));
    loaded.set(task);
    ractor::pg::join(serving_group(&shared.name), vec![myself.get_cell()]);
    shared.set_phase(Phase::Ready, None);
}

/// Waits until the engine reports a failure it cannot survive, or ends.
async fn until_failed(mut failure: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(reason) = failure.borrow().clone() {
            return reason;
        }
        if failure.changed().await.is_err() {
            return "the engine thread ended".to_string();
        }
    }
}
