//! Real TorchScript models, traced here, with the inputs they take, the answers
//! they must give, and engines loaded with them.

use std::path::{Path, PathBuf};

use harness::device::DeviceChoice;
use harness::engine::{BatchConfig, Engine, Kind, Tensor};

/// The weights of the affine model, made outside any traced closure so the trace records
/// them as constants.
pub struct Affine {
    pub w: Tensor,
    pub b: Tensor,
}

impl Affine {
    pub fn new() -> Self {
        let w = Tensor::from_slice(&[
            0.5f32, -1.0, 0.25, 2.0, -0.75, 1.5, 0.125, 0.0, -2.0, 1.0, 3.0, -0.5,
        ])
        .reshape([4, 3]);
        let b = Tensor::from_slice(&[0.1f32, 0.2, -0.3]);
        Affine { w, b }
    }

    /// `tanh(x·W + b)`. (A traced closure must return one tensor: tch cannot save
    /// a traced method with several outputs.)
    pub fn apply(&self, x: &Tensor) -> Vec<Tensor> {
        vec![(x.matmul(&self.w) + &self.b).tanh()]
    }

    /// Traces [`Affine::apply`] on a `[2, 4]` input and saves it under `dir`.
    pub fn save(&self, dir: &Path) -> PathBuf {
        let _no_grad = tch::no_grad_guard();
        let path = dir.join("affine.pt");
        let module =
            tch::CModule::create_by_tracing("Affine", "forward", &[input(2, 0.0)], &mut |xs| {
                self.apply(&xs[0])
            })
            .expect("tracing the affine model");
        module.save(&path).expect("saving the affine model");
        path
    }
}

/// The affine model saved under `dir` and an engine on the CPU serving it with
/// `batching`: the model (for the answers it must give) and the engine.
pub async fn load_affine(dir: &Path, batching: BatchConfig) -> (Affine, Engine) {
    let model = Affine::new();
    let path = model.save(dir);
    let engine = Engine::load(&path, DeviceChoice::Cpu, batching)
        .await
        .expect("loading a good model");
    (model, engine)
}

/// A deterministic `[batch, 4]` float input, shifted by `offset` so that callers can
/// tell their answers apart.
pub fn input(batch: i64, offset: f64) -> Tensor {
    Tensor::arange(batch * 4, (Kind::Float, tch::Device::Cpu)).reshape([batch, 4]) / 7.0 + offset
}

/// Asserts two tensors have the same shape and close values.
pub fn assert_close(got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "shapes differ");
    assert!(
        got.allclose(want, 1e-5, 1e-6, false),
        "values differ:\n got {got}\nwant {want}"
    );
}

/// A small token model, traced: `(input_ids [B, L], attention_mask [B, L])` to token
/// vectors `[B, L, 8]` (an embedding table lookup, plus the mask so that both
/// inputs count), for the engine's token batching and pooling.
pub fn save_token_model(dir: &Path) -> PathBuf {
    let _no_grad = tch::no_grad_guard();
    // Built outside the traced closure, so the trace keeps them as constants.
    let table = Tensor::arange(50 * 8, (Kind::Float, tch::Device::Cpu)).reshape([50, 8]) / 97.0;
    let table = table.sin();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 0]).reshape([2, 2]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0]).reshape([2, 2]);
    let path = dir.join("tokens.pt");
    let module = tch::CModule::create_by_tracing("Tokens", "forward", &[ids, mask], &mut |xs| {
        let hidden = Tensor::embedding(&table, &xs[0], -1, false, false);
        vec![hidden + xs[1].unsqueeze(-1).to_kind(Kind::Float) * 0.5]
    })
    .expect("tracing the token model");
    module.save(&path).expect("saving the token model");
    path
}

/// One text's inputs for [`save_token_model`]: its `ids` as `[1, L]` and an
/// attention mask of ones.
pub fn token_inputs(ids: &[i64]) -> Vec<Tensor> {
    let n = ids.len() as i64;
    vec![
        Tensor::from_slice(ids).view([1, n]),
        Tensor::ones([1, n], (Kind::Int64, tch::Device::Cpu)),
    ]
}

/// Mean pooling by hand: the vector [`save_token_model`] gives `ids` alone.
pub fn token_model_mean(ids: &[i64]) -> Vec<f32> {
    let mut mean = [0f32; 8];
    for &id in ids {
        for (j, m) in mean.iter_mut().enumerate() {
            *m += ((id * 8 + j as i64) as f32 / 97.0).sin() + 0.5;
        }
    }
    mean.iter().map(|m| m / ids.len() as f32).collect()
}
