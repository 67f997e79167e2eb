use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = harness::cli::Cli::parse();
    match harness::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("harness: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
