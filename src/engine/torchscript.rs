//! The room for TorchScript: loading a `.pt` file onto a device and calling its
//! `forward`, with the output flattened into tensors. A leaf: it knows nothing of
//! batching, threads or tasks.

use std::io::Read;
use std::path::Path;

use tch::{CModule, IValue, Tensor};

use super::device::DeviceChoice;
use super::error::{torch_message, ForwardError, LoadError};

/// A TorchScript module in eval mode on its device.
pub(super) struct TorchScript {
    module: CModule,
    device: tch::Device,
}

impl TorchScript {
    /// Loads `path` onto `device`, after the checks that give the common mistakes a
    /// plain reason.
    pub fn load(path: &Path, device: DeviceChoice) -> Result<Self, LoadError> {
        Ok(TorchScript {
            module: load_module(path, device)?,
            device: device.tch(),
        })
    }

    /// libtorch's device the module lives on.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// `forward` on inputs already on [`TorchScript::device`]; its tensors in order.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError> {
        let values: Vec<IValue> = inputs
            .iter()
            .map(|t| IValue::Tensor(t.shallow_clone()))
            .collect();
        let output = self
            .module
            .forward_is(&values)
            .map_err(ForwardError::from_torch)?;
        output_tensors(output)
    }
}

/// What to do with a file that is PyTorch's but not TorchScript.
const EXPORT_HINT: &str = "make TorchScript with torch.jit.trace or torch.jit.script and save it with torch.jit.save (or, for a Hub text model, tools/export_torchscript.py)";

/// Whether a zip archive that torch refused is a `torch.save` checkpoint: its
/// central directory (at the end of the file) names entries but none under
/// `code/`, where `torch.jit.save` puts the module's TorchScript. Only read after
/// torch refused the file.
fn is_checkpoint(path: &Path) -> bool {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let tail = len.min(4 << 20);
    let mut bytes = Vec::with_capacity(tail as usize);
    if file.seek(SeekFrom::End(-(tail as i64))).is_err()
        || file.take(tail).read_to_end(&mut bytes).is_err()
    {
        return false;
    }
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    has(b"data.pkl") && !has(b"/code/")
}

/// TorchScript files are zip archives: check what we can before torch does, so the
/// common mistakes get a plain reason rather than a C++ one.
fn load_module(path: &Path, device: DeviceChoice) -> Result<CModule, LoadError> {
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
    if n >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
        return Err(not_torchscript(format!(
            "it is a Python pickle (protocol {}), as torch.save writes with _use_new_zipfile_serialization=False or pickle.dump; {EXPORT_HINT}",
            magic[1]
        )));
    }
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

    let mut module = CModule::load_on_device(path, device.tch()).map_err(|err| {
        let message = torch_message(&err);
        if message.to_ascii_lowercase().contains("cuda") {
            LoadError::Device {
                path: path.to_path_buf(),
                device,
                message,
            }
        } else if is_checkpoint(path) {
            not_torchscript(format!(
                "it is a PyTorch checkpoint (torch.save of a state_dict or a whole module: a zip archive with no TorchScript code in it), not TorchScript; {EXPORT_HINT}"
            ))
        } else {
            not_torchscript(message)
        }
    })?;
    module
        .f_set_eval()
        .map_err(|err| not_torchscript(torch_message(&err)))?;
    Ok(module)
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
