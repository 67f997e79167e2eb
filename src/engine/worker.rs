//! The engine thread: loads the model, then hands the queue to the batcher.

use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{CModule, IValue, Tensor};
use tokio::sync::{oneshot, watch};

use super::batcher::{self, BatchConfig, EngineStats, Job};
use super::collate::Collate;
use super::error::{panic_message, torch_message, ForwardError, LoadError};
use super::tch_device;
use crate::device::DeviceChoice;

/// What the engine thread needs besides the model.
pub(super) struct Shared {
    pub config: BatchConfig,
    pub collate: Collate,
    pub stats: std::sync::Arc<EngineStats>,
    pub fatal: watch::Sender<Option<String>>,
}

/// The thread's body: load, report the load, then serve until every handle is gone.
pub(super) fn run(
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
        catch_unwind(AssertUnwindSafe(|| load(&path, device))).unwrap_or_else(|payload| {
            Err(LoadError::Panicked {
                path: path.clone(),
                message: panic_message(payload.as_ref()),
            })
        })
    });
    let module = match module {
        Ok(module) => {
            span.in_scope(|| {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                )
            });
            let _ = loaded.send(Ok(()));
            module
        }
        Err(err) => {
            let _ = loaded.send(Err(err));
            return;
        }
    };

    batcher::serve(
        &module,
        tch_device(device),
        &shared.collate,
        queue,
        shared.config,
        &shared.stats,
        &shared.fatal,
    );
    tracing::debug!(path = %path.display(), "engine stopped");
}

/// TorchScript files are zip archives: check what we can before torch does, so the
/// common mistakes get a plain reason rather than a C++ one.
fn load(path: &Path, device: DeviceChoice) -> Result<CModule, LoadError> {
    let unreadable = |source: std::io::Error| LoadError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let not_torchscript = |reason: String| LoadError::NotTorchScript {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    };
    let meta = file.metadata().map_err(unreadable)?;
    if meta.is_dir() {
        return Err(not_torchscript("it is a directory".to_string()));
    }
    if meta.len() == 0 {
        return Err(not_torchscript("the file is empty".to_string()));
    }
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(unreadable)?;
    if n < 4 || &magic != b"PK\x03\x04" {
        return Err(not_torchscript(format!(
            "it does not start like a zip archive (TorchScript files are zip archives written by torch.jit.save); its first bytes are {:02x?}",
            &magic[..n]
        )));
    }
    drop(file);

    if let DeviceChoice::Cuda(index) = device {
        let count = tch::Cuda::device_count().max(0) as usize;
        if !tch::Cuda::is_available() || index >= count {
            return Err(LoadError::Device {
                path: path.to_path_buf(),
                device,
                message: format!("CUDA device {index} is not usable here ({count} usable)"),
            });
        }
    }

    let mut module = CModule::load_on_device(path, tch_device(device)).map_err(|err| {
        let message = torch_message(&err);
        if message.to_ascii_lowercase().contains("cuda") {
            LoadError::Device {
                path: path.to_path_buf(),
                device,
                message,
            }
        } else {
            not_torchscript(message)
        }
    })?;
    module
        .f_set_eval()
        .map_err(|err| not_torchscript(torch_message(&err)))?;
    Ok(module)
}

/// One forward: inputs to the model's device, outputs finished there (pooled, for
/// token models) and brought back to the CPU.
pub(super) fn forward(
    module: &CModule,
    device: tch::Device,
    collate: &Collate,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, ForwardError> {
    let inputs = inputs
        .into_iter()
        .map(|t| t.f_to_device(device))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ForwardError::from_torch)?;
    let values: Vec<IValue> = inputs
        .iter()
        .map(|t| IValue::Tensor(t.shallow_clone()))
        .collect();
    let output = module
        .forward_is(&values)
        .map_err(ForwardError::from_torch)?;
    collate
        .finish(&inputs, output_tensors(output)?)?
        .into_iter()
        .map(|t| {
            t.f_to_device(tch::Device::Cpu)
                .map_err(ForwardError::from_torch)
        })
        .collect()
}

/// A tensor, or a tuple or list of tensors, flattened in order.
fn output_tensors(value: IValue) -> Result<Vec<Tensor>, ForwardError> {
    match value {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::TensorList(ts) => Ok(ts),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .map(|item| match item {
                IValue::Tensor(t) => Ok(t),
                other => Err(ForwardError::UnsupportedOutput {
                    found: format!("a sequence holding {}", ivalue_kind(&other)),
                }),
            })
            .collect(),
        other => Err(ForwardError::UnsupportedOutput {
            found: ivalue_kind(&other).to_string(),
        }),
    }
}

/// A name for what a model returned, for the error text.
fn ivalue_kind(value: &IValue) -> &'static str {
    match value {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Double(_) => "a float",
        IValue::Int(_) => "an int",
        IValue::Bool(_) => "a bool",
        IValue::Tuple(_) => "a tuple",
        IValue::IntList(_) | IValue::DoubleList(_) | IValue::BoolList(_) => "a list of numbers",
        IValue::String(_) => "a string",
        IValue::StringList(_) => "a list of strings",
        IValue::TensorList(_) => "a list of tensors",
        IValue::GenericList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::Object(_) => "an object",
        IValue::Device(_) => "a device",
        _ => "an unsupported value",
    }
}
