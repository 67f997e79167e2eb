//! The `harness` command line: one file per verb.

mod demo;
mod fetch;
mod gpu_check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Serve a TorchScript model from a GPU machine to a ractor cluster.
#[derive(Debug, Parser)]
#[command(name = "harness", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report whether this process can use a CUDA GPU: devices, CUDA runtime,
    /// libtorch. Exits 0 when a GPU is usable, 1 when not.
    GpuCheck {
        /// Print the facts as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Download and verify the model's files into the cache (or find them there),
    /// print their local paths, and exit.
    Fetch,
    /// Trace a small built-in model, serve one batch through the engine on the
    /// configured device, and check the answer against a direct computation.
    Demo {
        /// Items in the batch.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(1..=4096))]
        batch: i64,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::logging::init(cli.config.log_format);
    match cli.command {
        Command::GpuCheck { json } => gpu_check::run(json),
        Command::Fetch => fetch::run(&cli.config),
        Command::Demo { batch } => demo::run(&cli.config, batch),
    }
}
