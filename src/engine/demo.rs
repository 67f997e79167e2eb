//! A small real model, `y = tanh(x·W + b)` with fixed weights, traced into
//! TorchScript. `harness demo` and the GPU check run it through the engine and
//! compare with the same sum computed directly.

use std::path::Path;

use tch::{CModule, Kind, Tensor};

/// Features per input item.
pub const INPUT_FEATURES: i64 = 4;
/// Features per output item.
pub const OUTPUT_FEATURES: i64 = 3;

fn weights() -> (Tensor, Tensor) {
    let w = Tensor::arange(
        INPUT_FEATURES * OUTPUT_FEATURES,
        (Kind::Float, tch::Device::Cpu),
    )
    .reshape([INPUT_FEATURES, OUTPUT_FEATURES])
        / 10.0
        - 0.5;
    let b = Tensor::from_slice(&[0.1f32, -0.2, 0.3]);
    (w, b)
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    (x.matmul(w) + b).tanh()
}

/// The model's function computed directly, on the CPU.
pub fn reference(x: &Tensor) -> Tensor {
    let (w, b) = weights();
    apply(&x.to_device(tch::Device::Cpu), &w, &b)
}

/// A deterministic `[batch, INPUT_FEATURES]` float input.
pub fn sample_input(batch: i64) -> Tensor {
    Tensor::arange(batch * INPUT_FEATURES, (Kind::Float, tch::Device::Cpu))
        .reshape([batch, INPUT_FEATURES])
        / (batch * INPUT_FEATURES) as f64
}

/// Traces the model and saves it as TorchScript at `path`.
pub fn save(path: &Path) -> Result<(), tch::TchError> {
    let _no_grad = tch::no_grad_guard();
    // The weights are made outside the closure and captured, so the trace records
    // them as constants: a tensor created inside the traced closure (arange here)
    // came out of the trace with different values.
    let (w, b) = weights();
    let module = CModule::create_by_tracing(
        "HarnessDemo",
        "forward",
        &[sample_input(2)],
        &mut |inputs| vec![apply(&inputs[0], &w, &b)],
    )?;
    module.save(path)
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_device(tch::Device::Cpu) - b.to_device(tch::Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

/// A tensor's values, flattened, for printing.
pub fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(
        t.to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )
    .unwrap_or_default()
}
