//! `harness fetch`: download and verify the model's files, print their paths;
//! on a terminal, with progress bars ([`progress_bar`]).

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, ModelSource};
use crate::fetch::{self, FetchProgress};
use crate::logging::LogFormat;

use super::progress_bar;

/// Never, for a fetch's periodic progress lines.
const A_YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

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
            let progress = FetchProgress::default();
            // On a terminal, bars; in a deploy's logs, the periodic lines.
            let bars = match config.log_format {
                LogFormat::Text => progress_bar::terminal(),
                LogFormat::Json => None,
            };
            match bars {
                Some(bars) => {
                    let mut spec = spec;
                    // The bars say it all the time: no periodic line besides.
                    spec.options.progress_every = A_YEAR;
                    progress_bar::draw_while(bars, &progress, || {
                        runtime.block_on(fetch::fetch(&spec, &progress))
                    })?
                }
                None => runtime.block_on(fetch::fetch(&spec, &progress))?,
            }
        }
    };
    for path in &snapshot.files {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
