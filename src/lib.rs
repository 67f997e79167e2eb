//! Harness: serve a TorchScript model from a GPU machine to the Rust programs of a
//! `ractor_cluster` mesh.
//!
//! Rooms (see DESIGN.md): [`engine`] is the only one that touches libtorch;
//! [`device`] holds the device policy; [`config`] every setting; [`logging`] the
//! log output.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod device;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod serving;
pub mod supervisor;
pub mod tasks;
