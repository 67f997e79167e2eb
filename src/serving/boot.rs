//! The serving's slow start, run after the actor has started so that requests are
//! answered (`NotReady`) meanwhile: device check, download, load, warm-up, ready.

use std::sync::{Arc, OnceLock};

use harness_client::{serving_group, ServingMessage};
use ractor::ActorRef;

use super::shared::{DeviceInfo, FileInfo, ModelInfo, Phase, ServingShared};
use crate::config::Task;
use crate::config::{Config, ModelSource};
use crate::device::choose_serving_device;
use crate::engine::{gpu::GpuFacts, Engine};
use crate::fetch;
use crate::tasks::embedding::Embedder;
use crate::tasks::tensor::InputSpec;

/// What a ready serving runs requests with.
#[derive(Clone)]
pub struct Ready {
    pub engine: Engine,
    /// The model's per-item inputs (`HARNESS_WARMUP_INPUTS`), when declared:
    /// requests are checked against them.
    pub inputs: Option<Arc<Vec<InputSpec>>>,
    /// The tokenizer and pooling, for the embedding task.
    pub embedder: Option<Arc<Embedder>>,
}

/// Brings the serving to `ready` (or `no_gpu`), then watches the engine. A failure
/// on the way, or of the engine later, stops the actor with the reason, and the
/// supervisor restarts it.
pub async fn run(
    myself: ActorRef<ServingMessage>,
    config: Arc<Config>,
    shared: Arc<ServingShared>,
    ready: Arc<OnceLock<Ready>>,
) {
    let engine = match start(&myself, &config, &shared, &ready).await {
        Ok(Some(engine)) => engine,
        Ok(None) => return, // no GPU: alive, never ready
        Err(reason) => {
            shared.set_phase(Phase::Failed, Some(reason.clone()));
            myself.stop(Some(reason));
            return;
        }
    };
    let mut failure = engine.failure();
    let reason = loop {
        if let Some(reason) = failure.borrow().clone() {
            break reason;
        }
        if failure.changed().await.is_err() {
            break "the engine thread ended".to_string();
        }
    };
    shared.set_phase(Phase::Failed, Some(reason.clone()));
    myself.stop(Some(reason));
}

async fn start(
    myself: &ActorRef<ServingMessage>,
    config: &Config,
    shared: &ServingShared,
    ready: &OnceLock<Ready>,
) -> Result<Option<Engine>, String> {
    let facts = tokio::task::spawn_blocking(GpuFacts::probe)
        .await
        .map_err(|e| format!("probing the GPU: {e}"))?;
    let device = match choose_serving_device(config.device, &facts, &shared.name) {
        Ok(device) => {
            let (kind, name) = match device {
                crate::device::DeviceChoice::Cpu => ("cpu", "cpu".to_string()),
                crate::device::DeviceChoice::Cuda(i) => {
                    let gpu = facts.devices.get(i).map_or("unknown", |d| d.name.as_str());
                    ("cuda", format!("cuda:{i} {gpu}"))
                }
            };
            shared.set_device(DeviceInfo {
                kind: kind.to_string(),
                name,
            });
            device
        }
        Err(no_gpu) => {
            shared.set_phase(Phase::NoGpu, Some(no_gpu.to_string()));
            return Ok(None);
        }
    };
    let warmup = config
        .serving
        .warmup_inputs
        .as_deref()
        .map(InputSpec::parse_list)
        .transpose()
        .map_err(|e| format!("HARNESS_WARMUP_INPUTS: {e}"))?;

    shared.set_phase(Phase::Downloading, None);
    let source = config.model.source(config.serving.task)?;
    let (repo, revision, names) = match &source {
        ModelSource::Dir { dir, files } => (
            dir.display().to_string(),
            "local".to_string(),
            files.clone(),
        ),
        ModelSource::Hub(spec) => (spec.repo.clone(), spec.revision.clone(), spec.files.clone()),
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
    .map_err(|e| e.to_string())?;
    shared.set_model(ModelInfo {
        repo,
        revision,
        commit: snapshot.commit.clone(),
        files: names
            .iter()
            .zip(&snapshot.files)
            .map(|(name, path)| FileInfo {
                name: name.clone(),
                size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            })
            .collect(),
    });
    let (model, embedder) = match config.serving.task {
        // The first file is the TorchScript model; the others are for the task.
        Task::Tensor => (snapshot.files.first().ok_or("no model file")?.clone(), None),
        Task::Embedding => {
            let files: Vec<_> = names.iter().cloned().zip(snapshot.files.clone()).collect();
            let embedder = tokio::task::spawn_blocking(move || Embedder::load(&files))
                .await
                .map_err(|e| format!("reading the tokenizer: {e}"))??;
            let m = &embedder.manifest;
            tracing::info!(
                inputs = ?m.inputs,
                pooling = %m.pooling,
                normalize = m.normalize,
                max_seq_length = m.max_seq_length,
                dimension = m.dimension,
                "embedding model described by harness.json"
            );
            (embedder.model_path.clone(), Some(Arc::new(embedder)))
        }
    };

    shared.set_phase(Phase::Loading, None);
    let loading = std::time::Instant::now();
    let collate = embedder.as_ref().map(|e| e.collate()).unwrap_or_default();
    let engine = Engine::load_with(&model, device, config.serving.batch(), collate)
        .await
        .map_err(|e| e.to_string())?;
    shared.metrics.model_loaded(loading.elapsed());
    engine.observe(shared.metrics.clone());

    shared.set_phase(Phase::Warming, None);
    let inputs = match (&embedder, &warmup) {
        (Some(embedder), _) => {
            let max_batch = config.serving.max_batch_size as i64;
            let longest = embedder.manifest.max_seq_length as i64;
            // Short texts one at a time and batched, and one of the longest.
            for (items, tokens) in [(1, 16), (max_batch, 16), (1, longest)] {
                let sample = embedder.warmup_inputs(items, tokens.min(longest));
                engine
                    .warm_up(sample, 2)
                    .await
                    .map_err(|e| format!("the warm-up forward failed: {e}"))?;
            }
            None
        }
        (None, Some(specs)) => {
            // One item and a full batch: the shapes the batcher will send.
            for items in [1, config.serving.max_batch_size as i64] {
                let sample: Vec<_> = specs.iter().map(|s| s.zeros(items)).collect();
                engine.warm_up(sample, 3).await.map_err(|e| {
                    format!("the warm-up forward failed (check HARNESS_WARMUP_INPUTS): {e}")
                })?;
            }
            Some(Arc::new(specs.clone()))
        }
        (None, None) => {
            tracing::warn!("HARNESS_WARMUP_INPUTS is unset: no warm-up, so the first requests of each shape are slow");
            None
        }
    };

    let _ = ready.set(Ready {
        engine: engine.clone(),
        inputs,
        embedder,
    });
    shared.set_engine(Some(engine.clone()));
    ractor::pg::join(serving_group(&shared.name), vec![myself.get_cell()]);
    shared.set_phase(Phase::Ready, None);
    Ok(Some(engine))
}
