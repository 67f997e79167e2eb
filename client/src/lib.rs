//! harness-client: call a Harness model node from any Rust program.
//!
//! This crate holds the wire protocol ([`protocol`]) and, with the cluster, the
//! client. It never depends on libtorch, so an application that calls a Harness
//! node builds on a laptop with nothing but Rust installed.

mod client;
#[cfg(feature = "cli")]
pub mod cli;
mod pool;
pub mod protocol;
mod sessions;
pub mod tls;

pub use client::{ClientConfig, ClientError, ClientTls, HarnessClient};

pub use protocol::{
    serving_group, DType, EmbedReply, EmbedRequest, Embedding, Fault, FaultRequest, Payload,
    RunReply, RunRequest, ServingError, ServingMessage, ServingStatus, StatusModel, StatusRequest,
    WireTensor, PROTOCOL_VERSION,
};
