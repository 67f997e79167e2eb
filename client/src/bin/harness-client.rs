//! `harness-client`: call a Harness node from a shell, with no libtorch.
//! The same `call`, `status` and `wake` as the server's `harness call`, `harness
//! status` and `harness wake`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harness_client::cli::{CallArgs, StatusArgs, WakeArgs, EXIT_CODES_HELP};

/// Call a Harness model node from the command line (no libtorch needed).
#[derive(Debug, Parser)]
#[command(name = "harness-client", version, about, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a request to a serving and print the answer: `--tensor` (Run),
    /// `--embed` (Embed), or `--generate` / `--chat` (a generation, printed as
    /// it is made).
    Call(Box<CallArgs>),
    /// Print a serving's status as one JSON object.
    Status(StatusArgs),
    /// Start the Fly app's stopped machines (HARNESS_FLY_APP, FLY_API_TOKEN) and
    /// wait until a serving is ready, printing the phases; then its status.
    Wake(WakeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Call(args) => harness_client::cli::call(args, "harness-client"),
        Command::Status(args) => harness_client::cli::status(args, "harness-client"),
        Command::Wake(args) => harness_client::cli::wake(args, "harness-client"),
    }
}
