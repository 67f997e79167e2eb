//! `harness-client`: call a Harness node from a shell, with no libtorch.
//! The same `call` and `status` as the server's `harness call` and `harness status`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harness_client::cli::{CallArgs, StatusArgs, EXIT_CODES_HELP};

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
    Call(CallArgs),
    /// Print a serving's status as one JSON object.
    Status(StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Call(args) => harness_client::cli::call(args, "harness-client"),
        Command::Status(args) => harness_client::cli::status(args, "harness-client"),
    }
}
