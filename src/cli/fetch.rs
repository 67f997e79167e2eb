//! `harness fetch`: download and verify the model's files, print their paths.

use std::process::ExitCode;

use crate::config::{Config, ModelSource};
use crate::fetch::{self, FetchProgress};

pub fn run(config: &Config) -> anyhow::Result<ExitCode> {
    let source = config
        .model
        .source(config.serving.task)
        .map_err(anyhow::Error::msg)?;
    let snapshot = match source {
        ModelSource::Dir { dir, files } => fetch::local_dir(&dir, &files)?,
        ModelSource::Hub(spec) => {
            tracing::info!(
                repo = %spec.repo,
                revision = %spec.revision,
                files = %spec.files,
                cache = %spec.cache_dir.display(),
                offline = spec.offline,
                "fetching the model"
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(fetch::fetch(&spec, &FetchProgress::default()))?
        }
    };
    for path in &snapshot.files {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
