//! Log output: lines a person on call can read (`text`), or one JSON object per
//! line for log shippers (`json`). `RUST_LOG` filters; the default is `info` for
//! the node's verbs and warnings only for the client verbs (`call`, `status`).
//! Colour only when stderr is a terminal. One implementation, the client crate's,
//! for both.

pub use harness_client::cli::LogFormat;

/// Installs the global subscriber of the node's verbs (`serve`, `fetch`, `demo`,
/// `gpu-check`), writing to stderr so stdout stays for command output
/// (`gpu-check --json`, `fetch`'s paths). A second init (tests) keeps the first.
pub fn init(format: LogFormat) {
    harness_client::cli::init_logging(format, "info");
}
