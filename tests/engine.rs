//! The engine on real TorchScript files: loads, forwards, typed errors, concurrency.

mod support;

use std::path::Path;

use harness::device::DeviceChoice;
use harness::engine::{BatchConfig, Engine, ForwardError, Kind, LoadError, Tensor};
use support::models::{assert_close, input, Affine};

/// The affine model and an engine serving it, unbatched.
async fn load_affine(dir: &Path) -> (Affine, Engine) {
    support::models::load_affine(dir, BatchConfig::default()).await
}

#[test]
fn the_cuda_runtime_is_linked() {
    // build.rs's --no-as-needed keeps libtorch_cuda; without it this reads false.
    assert!(
        tch::utils::has_cudart(),
        "libtorch's CUDA runtime is not linked into the test binary"
    );
}

#[tokio::test]
async fn a_traced_model_gives_the_closures_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path()).await;
    assert_eq!(engine.device(), DeviceChoice::Cpu);
    engine
        .warm_up(vec![input(5, 0.0)], 3)
        .await
        .expect("warm-up");

    // A batch size other than the traced one: the trace is shape-generic in dim 0.
    let x = input(5, -0.5);
    let got = engine
        .forward(vec![x.shallow_clone()])
        .await
        .expect("forward");
    let want = model.apply(&x);
    assert_eq!(got.len(), 1);
    assert_close(&got[0], &want[0]);
    assert!(!got[0].requires_grad(), "forward runs under no_grad");
}

/// Two models scripted by torch in Python: one returns a tuple (flattened in
/// order), the other a dict (not a tensor output: a typed error, and the engine
/// keeps serving).
#[tokio::test]
async fn tuple_outputs_are_flattened_and_other_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (tuple_path, dict_path) = (dir.path().join("tuple.pt"), dir.path().join("dict.pt"));
    support::python::run_python(
        r#"
import sys, torch
from typing import Dict, Tuple
class Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x + y, (x * y).sum(1)
class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"double": x * 2}
torch.jit.save(torch.jit.script(Pair()), sys.argv[1])
torch.jit.save(torch.jit.script(Named()), sys.argv[2])
"#,
        &[&tuple_path, &dict_path],
    );

    let pair = Engine::load(&tuple_path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .unwrap();
    let (x, y) = (input(3, 0.0), input(3, 2.0));
    let got = pair
        .forward(vec![x.shallow_clone(), y.shallow_clone()])
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_close(&got[0], &(&x + &y));
    assert_close(&got[1], &(&x * &y).sum_dim_intlist(1, false, Kind::Float));

    let named = Engine::load(&dict_path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .unwrap();
    let err = named.forward(vec![input(1, 0.0)]).await.unwrap_err();
    assert_eq!(
        err,
        ForwardError::UnsupportedOutput {
            found: "a dict".to_string()
        }
    );
    assert_eq!(
        named.forward(vec![input(1, 0.0)]).await.unwrap_err(),
        err,
        "still answering"
    );
}

#[tokio::test]
async fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.pt");
    let err = Engine::load(&path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LoadError::Missing { path: p } if p == &path),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.pt"), "{err}");
}

async fn load_bytes(bytes: &[u8]) -> LoadError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    std::fs::write(&path, bytes).unwrap();
    Engine::load(&path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .unwrap_err()
}

fn not_torchscript_reason(err: LoadError) -> String {
    match err {
        LoadError::NotTorchScript { reason, .. } => reason,
        other => panic!("expected NotTorchScript, got {other:?}"),
    }
}

#[tokio::test]
async fn an_empty_file_is_not_torchscript() {
    let reason = not_torchscript_reason(load_bytes(b"").await);
    assert!(reason.contains("empty"), "{reason}");
}

#[tokio::test]
async fn random_bytes_are_not_torchscript() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let reason = not_torchscript_reason(load_bytes(&bytes).await);
    assert!(reason.contains("zip archive"), "{reason}");
}

#[tokio::test]
async fn a_zip_that_is_not_a_model_carries_torchs_message() {
    let mut bytes = b"PK\x03\x04".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 1000));
    let reason = not_torchscript_reason(load_bytes(&bytes).await);
    assert!(!reason.is_empty());
    assert!(
        !reason.contains("frame #"),
        "the C++ backtrace is trimmed: {reason}"
    );
}

#[tokio::test]
async fn a_truncated_model_is_not_torchscript() {
    let dir = tempfile::tempdir().unwrap();
    let path = Affine::new().save(dir.path());
    let whole = std::fs::read(&path).unwrap();
    let reason = not_torchscript_reason(load_bytes(&whole[..whole.len() / 2]).await);
    assert!(
        reason.to_lowercase().contains("zip") || reason.contains("archive"),
        "{reason}"
    );
}

#[tokio::test]
async fn bad_inputs_get_typed_errors_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path()).await;

    let err = engine
        .forward(vec![input(2, 0.0), input(2, 0.0)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ForwardError::Arity { .. }),
        "two inputs for one: {err:?}"
    );
    assert!(
        err.to_string().contains("argument"),
        "torch's message is carried: {err}"
    );

    let err = engine.forward(vec![]).await.unwrap_err();
    assert!(
        matches!(err, ForwardError::Arity { .. }),
        "no inputs: {err:?}"
    );

    let err = engine
        .forward(vec![input(2, 0.0).to_kind(Kind::Double)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ForwardError::DType { .. }),
        "double for float: {err:?}"
    );

    let err = engine
        .forward(vec![Tensor::ones([2, 5], (Kind::Float, tch::Device::Cpu))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, ForwardError::Shape { .. }),
        "5 features for 4: {err:?}"
    );
    assert!(
        err.to_string().contains("2x5"),
        "torch's message names the shapes: {err}"
    );

    // Still serving, and still right.
    let x = input(3, 1.0);
    let got = engine
        .forward(vec![x.shallow_clone()])
        .await
        .expect("a good call after bad ones");
    assert_close(&got[0], &model.apply(&x)[0]);
}

#[tokio::test]
async fn loading_onto_an_absent_gpu_is_a_device_error() {
    if tch::Cuda::is_available() {
        return; // tests/gpu.rs covers the GPU machine
    }
    let dir = tempfile::tempdir().unwrap();
    let path = Affine::new().save(dir.path());
    let err = Engine::load(&path, DeviceChoice::Cuda(0), BatchConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Device {
                device: DeviceChoice::Cuda(0),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path()).await;

    let callers: Vec<_> = (0..64)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let batch = 1 + (i % 5);
                let out = engine
                    .forward(vec![input(batch, i as f64)])
                    .await
                    .expect("forward");
                (i, batch, out)
            })
        })
        .collect();
    for caller in callers {
        let (i, batch, out) = caller.await.unwrap();
        let want = model.apply(&input(batch, i as f64));
        assert_close(&out[0], &want[0]);
    }
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_stop_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path()).await;
    // Start a call and drop it before its answer arrives.
    let abandoned = engine.forward(vec![input(64, 0.0)]);
    drop(tokio::time::timeout(std::time::Duration::from_nanos(1), abandoned).await);
    let x = input(2, 3.0);
    let got = engine.forward(vec![x.shallow_clone()]).await.unwrap();
    assert_close(&got[0], &model.apply(&x)[0]);
}
