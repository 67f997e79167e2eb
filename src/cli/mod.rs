//! The `harness` command line: one file per verb.

mod call;
mod demo;
mod fetch;
mod gpu_check;
mod serve;

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
    /// Run the node: download, load and serve the model, restart it when it fails,
    /// drain on SIGTERM or SIGINT. Exits 3 after too many restarts.
    Serve,
    /// Send a request to a remote node and print the answer: `--tensor` (Run) or
    /// `--embed` (Embed).
    #[command(group(clap::ArgGroup::new("input").required(true).args(["tensors", "texts"])))]
    Call {
        /// A node's cluster address, HOST:PORT (repeat for several).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// An f32 input tensor as SHAPE:VALUES, e.g. `1,4:0.1,0.2,0.3,0.4` (repeat
        /// for a model with several inputs).
        #[arg(long = "tensor")]
        tensors: Vec<String>,
        /// A text to embed (repeat for several).
        #[arg(long = "embed")]
        texts: Vec<String>,
        /// How long to keep trying, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        deadline_ms: u64,
    },
    /// Print a remote node's serving status.
    Status {
        /// A node's cluster address, HOST:PORT.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
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
        /// Only write the demo model to DIR/model.pt (a model folder for
        /// `HARNESS_MODEL_DIR`; its inputs are `f32[4]`) and exit.
        #[arg(long, value_name = "DIR")]
        write_model: Option<std::path::PathBuf>,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    crate::logging::init(cli.config.log_format);
    match cli.command {
        Command::GpuCheck { json } => gpu_check::run(json),
        Command::Serve => serve::run(cli.config),
        Command::Fetch => fetch::run(&cli.config),
        Command::Call {
            nodes,
            tensors,
            texts,
            deadline_ms,
        } => call::call(&cli.config, &nodes, &tensors, &texts, deadline_ms),
        Command::Status { nodes, deadline_ms } => call::status(&cli.config, &nodes, deadline_ms),
        Command::Demo {
            write_model: Some(dir),
            ..
        } => demo::write_model(&dir),
        Command::Demo { batch, .. } => demo::run(&cli.config, batch),
    }
}
