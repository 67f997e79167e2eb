//! Every setting, as a flag and an environment variable (the names are DESIGN.md's
//! public contract). Settings join this type as the features that use them land.

use crate::device::DevicePolicy;
use crate::logging::LogFormat;

/// The settings common to every `harness` command.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Where the model runs: `cuda` (the first GPU; none means the serving is not
    /// started), `cuda:N`, `cpu`, or `auto` (a GPU when there is one, else the CPU).
    #[arg(long, env = "HARNESS_DEVICE", default_value = "cuda", global = true)]
    pub device: DevicePolicy,

    /// The serving's name: its process group is `harness.serving.<name>`.
    #[arg(
        long,
        env = "HARNESS_SERVING_NAME",
        default_value = "default",
        global = true
    )]
    pub serving_name: String,

    /// Log lines as `text` or `json`.
    #[arg(
        long,
        env = "HARNESS_LOG_FORMAT",
        default_value = "text",
        value_enum,
        global = true
    )]
    pub log_format: LogFormat,
}
