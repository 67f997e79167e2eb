//! Checks that need a CUDA GPU. They are ignored on machines without one and run by
//! `scripts/gpu-check` on the lent GPU machine (`--ignored`).

mod support;

use harness::device::{choose_serving_device, DeviceChoice, DevicePolicy};
use harness::engine::{gpu::GpuFacts, BatchConfig, Engine};
use support::{input, Affine};

/// CUDA kernels sum in another order than the CPU's: allow float32 rounding.
fn assert_near(got: &tch::Tensor, want: &tch::Tensor) {
    assert_eq!(got.size(), want.size());
    assert!(
        got.allclose(want, 1e-4, 1e-5, false),
        "got {got}\nwant {want}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
fn the_gpu_is_usable_and_named() {
    let facts = GpuFacts::probe();
    println!("{}", facts.report());
    assert!(facts.gpu_usable(), "no usable CUDA GPU: {facts:?}");
    assert!(facts.cudart_linked);
    assert!(
        facts.devices.iter().all(|d| d.name != "unknown"),
        "the driver names every device: {facts:?}"
    );
    assert_eq!(
        choose_serving_device(DevicePolicy::Cuda, &facts, "gpu-check"),
        Ok(DeviceChoice::Cuda(0))
    );
}

#[tokio::test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
async fn a_cuda_forward_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = Affine::new();
    let path = model.save(dir.path());
    let cpu = Engine::load(&path, DeviceChoice::Cpu, BatchConfig::default())
        .await
        .expect("load on the CPU");
    let gpu = Engine::load(&path, DeviceChoice::Cuda(0), BatchConfig::default())
        .await
        .expect("load on cuda:0");
    for batch in [1, 7, 64] {
        let x = input(batch, -1.0);
        gpu.warm_up(vec![x.shallow_clone()], 3).await.unwrap();
        let on_gpu = gpu.forward(vec![x.shallow_clone()]).await.unwrap();
        let on_cpu = cpu.forward(vec![x.shallow_clone()]).await.unwrap();
        assert_eq!(
            on_gpu[0].device(),
            tch::Device::Cpu,
            "outputs come back on the CPU"
        );
        assert_near(&on_gpu[0], &on_cpu[0]);
        assert_near(&on_gpu[0], &model.apply(&x)[0]);
    }
}
