//! Checks that need a CUDA GPU. They are ignored on machines without one and run by
//! `scripts/gpu-check` on the lent GPU machine (`--ignored`).

mod support;

use harness::device::{choose_serving_device, DeviceChoice, DevicePolicy};
use harness::engine::{gpu::GpuFacts, BatchConfig, Collate, Engine};
use harness::tasks::{Pooler, Pooling};
use support::models::{input, save_token_model, token_inputs, Affine};

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

/// The embedding task's path on the device: token batches padded, run, pooled and
/// normalized on CUDA, against the CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check"]
async fn cuda_token_batches_pool_like_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = save_token_model(dir.path());
    let collate = Collate::Tokens {
        pad_values: vec![0, 0],
    };
    let pooler = std::sync::Arc::new(Pooler {
        mask_input: 1,
        pooling: Pooling::Mean,
        normalize: true,
    });
    let config = BatchConfig {
        max_batch_delay: std::time::Duration::from_millis(20),
        ..BatchConfig::default()
    };
    let cpu = Engine::load_with(
        &path,
        DeviceChoice::Cpu,
        config,
        collate.clone(),
        Some(pooler.clone()),
    )
    .await
    .expect("load on the CPU");
    let gpu = Engine::load_with(&path, DeviceChoice::Cuda(0), config, collate, Some(pooler))
        .await
        .expect("load on cuda:0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let texts: Vec<Vec<i64>> = (1..=24)
        .map(|n| (0..n).map(|i| (i * 5 + n) % 49 + 1).collect())
        .collect();
    let run = |engine: Engine, ids: Vec<i64>| async move {
        engine
            .run(token_inputs(&ids), deadline)
            .await
            .expect("pooled")
    };
    let on_gpu: Vec<_> = texts
        .iter()
        .map(|ids| tokio::spawn(run(gpu.clone(), ids.clone())))
        .collect();
    for (ids, answer) in texts.iter().zip(on_gpu) {
        let got = answer.await.unwrap();
        let want = run(cpu.clone(), ids.clone()).await;
        assert_eq!(
            got[0].device(),
            tch::Device::Cpu,
            "vectors come back on the CPU"
        );
        assert_near(&got[0], &want[0]);
    }
    println!(
        "cuda token batches: {} texts in {} forwards",
        texts.len(),
        gpu.stats()
            .forwards
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}
