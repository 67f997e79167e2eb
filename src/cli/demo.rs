//! `harness demo`: the engine end to end on a real traced model, with no download.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;
use crate::device::choose_serving_device;
use crate::engine::{demo, gpu::GpuFacts, Engine};

/// Outputs this far from the direct computation mean the engine or device is wrong.
const TOLERANCE: f64 = 1e-4;

pub fn run(config: &Config, batch: i64) -> anyhow::Result<ExitCode> {
    let facts = GpuFacts::probe();
    let Ok(device) = choose_serving_device(config.device, &facts, &config.serving_name) else {
        // The warning is logged; like the serving, the demo does not start without a GPU.
        return Ok(ExitCode::from(1));
    };

    let dir = tempfile::tempdir().context("creating a folder for the demo model")?;
    let path = dir.path().join("demo.pt");
    demo::save(&path).context("tracing the demo model")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let engine = Engine::load(&path, device, crate::engine::BatchConfig::default()).await?;
        engine.warm_up(vec![demo::sample_input(batch)], 3).await?;
        let input = demo::sample_input(batch);
        let started = std::time::Instant::now();
        let output = engine.forward(vec![input.shallow_clone()]).await?;
        let elapsed = started.elapsed();
        let expected = demo::reference(&input);
        let diff = demo::max_abs_diff(&output[0], &expected);
        println!("device:   {device}");
        println!("input:    {:?} {:?}", input.size(), demo::values(&input));
        println!(
            "output:   {:?} {:?}",
            output[0].size(),
            demo::values(&output[0])
        );
        println!(
            "expected: {:?} {:?}",
            expected.size(),
            demo::values(&expected)
        );
        println!("max |output - expected| = {diff:.2e} (forward took {elapsed:?})");
        anyhow::ensure!(
            diff < TOLERANCE,
            "the engine's answer differs from the direct computation by {diff}"
        );
        println!("ok");
        Ok(ExitCode::SUCCESS)
    })
}

/// Writes the demo model to `dir/model.pt`.
pub fn write_model(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("model.pt");
    demo::save(&path).context("tracing the demo model")?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
