//! `harness gpu-check`: the original harness's `has_gpu_access?`.

use std::process::ExitCode;

use crate::engine::gpu::GpuFacts;

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let facts = GpuFacts::probe();
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
    } else {
        print!("{}", facts.report());
    }
    Ok(if facts.gpu_usable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
