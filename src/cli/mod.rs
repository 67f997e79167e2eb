//! The `harness` command line: one file per verb. The node's verbs (`serve`,
//! `fetch`, `demo`, `gpu-check`) take the server's [`Config`]; the client verbs
//! (`call`, `status`) take only client settings and are the `harness-client`
//! binary's own code ([`harness_client::cli`]).

mod demo;
mod fetch;
mod gpu_check;
mod progress_bar;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harness_client::cli::{CallArgs, StatusArgs, WakeArgs};

use crate::config::Config;

/// Serve a TorchScript model from a GPU machine to a ractor cluster.
#[derive(Debug, Parser)]
#[command(name = "harness", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every exit code of `harness`, for `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   gpu-check: no usable GPU (demo: would not start without one)
  2   an error that needs a change first (the message says what; for serve,
      also a failure no restart fixes, such as a missing repo or file)
  3   serve gave up after too many restarts
  75  call/status: a temporary error, retry later (EX_TEMPFAIL)";

/// The `harness` verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report whether this process can use a CUDA GPU: devices, CUDA runtime,
    /// libtorch. Exits 0 when a GPU is usable, 1 when not.
    GpuCheck {
        /// Print the facts as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Run the node: download, load and serve the model, restart it when it fails,
    /// drain on SIGTERM or SIGINT. Exits 3 after too many restarts, 2 at once on a
    /// failure no restart fixes.
    Serve(Box<Config>),
    /// Send a request to a remote node and print the answer: `--tensor` (Run),
    /// `--embed` (Embed), or `--generate` / `--chat` (a generation, printed as
    /// it is made).
    Call(Box<CallArgs>),
    /// Print a remote node's serving status as one JSON object.
    Status(StatusArgs),
    /// Start the Fly app's stopped machines (HARNESS_FLY_APP, FLY_API_TOKEN) and
    /// wait until a serving is ready, printing the phases; then its status.
    Wake(WakeArgs),
    /// Download and verify the model's files into the cache (or find them there),
    /// print their local paths, and exit.
    Fetch(Box<Config>),
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
        #[command(flatten)]
        config: Box<Config>,
    },
}

/// The node's settings from a command line of flags alone (`harness
/// --device=cpu --model-dir=...`, no verb), with the environment, as `serve`
/// reads them: what tests and benchmarks start nodes with.
pub fn server_config<I, T>(args: I) -> Result<Config, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(Parser)]
    #[command(name = "harness")]
    struct ServerArgs {
        #[command(flatten)]
        config: Config,
    }
    ServerArgs::try_parse_from(args).map(|a| a.config)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::GpuCheck { json, config } => {
            crate::logging::init(config.log_format);
            gpu_check::run(json)
        }
        Command::Serve(config) => {
            crate::logging::init(config.log_format);
            serve::run(*config)
        }
        Command::Fetch(config) => {
            crate::logging::init(config.log_format);
            fetch::run(&config)
        }
        Command::Call(args) => Ok(harness_client::cli::call(&args, "harness")),
        Command::Status(args) => Ok(harness_client::cli::status(&args, "harness")),
        Command::Wake(args) => Ok(harness_client::cli::wake(&args, "harness")),
        Command::Demo {
            write_model,
            batch,
            config,
        } => {
            crate::logging::init(config.log_format);
            match write_model {
                Some(dir) => demo::write_model(&dir),
                None => demo::run(&config, batch),
            }
        }
    }
}
