//! The engine's typed errors, and how torch's error text maps onto them.

use std::path::PathBuf;

use super::device::DeviceChoice;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a TorchScript model: {reason}")]
    NotTorchScript { path: PathBuf, reason: String },
    #[error("cannot load {path} onto {device}: {message}")]
    Device {
        path: PathBuf,
        device: DeviceChoice,
        message: String,
    },
    #[error("the engine thread could not start: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the engine thread died while loading {path}: {message}")]
    Panicked { path: PathBuf, message: String },
}

/// Why one forward call failed. Each carries torch's own message where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("wrong number of inputs for the model: {message}")]
    Arity { message: String },
    #[error("wrong input dtype for the model: {message}")]
    DType { message: String },
    #[error("wrong input shape for the model: {message}")]
    Shape { message: String },
    #[error("the device ran out of memory: {message}")]
    OutOfMemory { message: String },
    /// The device itself failed (a CUDA error): later calls are unlikely to succeed.
    #[error("the device failed: {message}")]
    Device { message: String },
    #[error("the model failed: {message}")]
    Model { message: String },
    #[error("the model returned {found}; expected a tensor, or a tuple or list of tensors")]
    UnsupportedOutput { found: String },
    #[error("the engine panicked during forward: {message}")]
    Panicked { message: String },
    #[error("the engine has stopped")]
    Stopped,
}

/// Why a batched run did not produce outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("the queue is full ({queued} items queued of {capacity})")]
    Overloaded { queued: u64, capacity: u64 },
    /// More items than the queue can ever hold: no retry can fit them.
    #[error("{items} items in one request, but the node queues at most {capacity} (HARNESS_MAX_QUEUE): send fewer items per request")]
    TooManyItems { items: u64, capacity: u64 },
    #[error("the deadline passed after {waited:?} in the queue; not run")]
    DeadlineExceeded { waited: std::time::Duration },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

impl ForwardError {
    /// Sorts a torch error from `forward` by what the caller can do about it.
    pub(crate) fn from_torch(err: tch::TchError) -> Self {
        let message = torch_message(&err);
        let lower = message.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
        if has(&["argument(s)", "missing value for argument"]) {
            ForwardError::Arity { message }
        } else if has(&["out of memory"]) {
            ForwardError::OutOfMemory { message }
        } else if has(&[
            "cuda error",
            "cublas_status",
            "cudnn_status",
            "device-side assert",
            "illegal memory access",
        ]) {
            ForwardError::Device { message }
        } else if has(&["dtype", "scalar type"]) {
            ForwardError::DType { message }
        } else if has(&[
            "shape",
            "size of tensor",
            "size mismatch",
            "dimension",
            "cannot be multiplied",
            "sizes of tensors",
        ]) {
            ForwardError::Shape { message }
        } else {
            ForwardError::Model { message }
        }
    }
}

/// Torch's message as one line for a log or an error reply: without the C++
/// backtrace, and for a failure inside TorchScript, the error itself plus the
/// operation that raised it rather than the interpreter's traceback.
pub(crate) fn torch_message(err: &tch::TchError) -> String {
    let text = match err {
        tch::TchError::Torch(text) => text.clone(),
        other => other.to_string(),
    };
    let head = text.split("Exception raised from").next().unwrap_or(&text);
    let lines: Vec<&str> = head
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if head.contains("failed in the TorchScript interpreter") {
        let error = lines.iter().rev().find(|l| is_python_error_line(l));
        let operation = lines
            .iter()
            .position(|l| l.contains("<--- HERE"))
            .and_then(|i| i.checked_sub(1))
            .map(|i| lines[i]);
        if let Some(error) = error {
            return match operation {
                Some(op) => format!("{error} (at `{op}` in the model's TorchScript)"),
                None => error.to_string(),
            };
        }
    }
    lines
        .first()
        .map_or_else(|| "unknown torch error".to_string(), |l| l.to_string())
}

/// `RuntimeError: ...`, `ValueError: ...`: the line of a Python-style traceback that
/// says what went wrong.
fn is_python_error_line(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(kind, _)| {
        (kind.ends_with("Error") || kind.ends_with("Exception"))
            && kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
    })
}

/// The text of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn torch(text: &str) -> tch::TchError {
        tch::TchError::Torch(text.to_string())
    }

    // The texts below are libtorch 2.11's, as printed for a traced `x.matmul(w)`.
    const INTERPRETER: &str = "The following operation failed in the TorchScript interpreter.
Traceback of TorchScript, serialized code (most recent call last):
  File \"code/__torch__.py\", line 6, in forward
  def forward(self: __torch__.M,
    argument_1: Tensor) -> Tensor:
    _0 = torch.matmul(argument_1, CONSTANTS.c0)
         ~~~~~~~~~~~~ <--- HERE
    return _0

Traceback of TorchScript, original code (most recent call last):
RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)
";

    #[test]
    fn interpreter_failures_read_as_the_error_and_its_operation() {
        let err = ForwardError::from_torch(torch(INTERPRETER));
        assert_eq!(
            err,
            ForwardError::Shape {
                message: "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3) (at `_0 = torch.matmul(argument_1, CONSTANTS.c0)` in the model's TorchScript)".to_string()
            }
        );
    }

    #[test]
    fn the_cpp_backtrace_is_dropped() {
        let text = "Expected at most 2 argument(s) for operator 'forward', but received 3 argument(s). Declaration: forward(__torch__.M self, Tensor argument_1) -> Tensor
Exception raised from checkAndNormalizeInputs at /pytorch/aten/src/ATen/core/function_schema_inl.h:32 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f in libc10.so)";
        let err = ForwardError::from_torch(torch(text));
        assert!(
            matches!(&err, ForwardError::Arity { message } if message.ends_with("-> Tensor")),
            "{err:?}"
        );
    }

    #[test]
    fn device_failures_and_memory_are_told_apart() {
        let oom = "CUDA out of memory. Tried to allocate 20.00 GiB";
        assert!(matches!(
            ForwardError::from_torch(torch(oom)),
            ForwardError::OutOfMemory { .. }
        ));
        let broken = "CUDA error: an illegal memory access was encountered";
        assert!(matches!(
            ForwardError::from_torch(torch(broken)),
            ForwardError::Device { .. }
        ));
        let other =
            "The following operation failed in the TorchScript interpreter.\nValueError: bad value";
        assert_eq!(
            ForwardError::from_torch(torch(other)),
            ForwardError::Model {
                message: "ValueError: bad value".to_string()
            }
        );
    }
}
