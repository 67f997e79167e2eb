//! harness-client: call a Harness model node from any Rust program.
//!
//! This crate holds the wire protocol and the client. It never depends on libtorch,
//! so an application that calls a Harness node builds on a laptop with nothing but
//! Rust installed. (The protocol and the client land with the serving; this crate
//! fixes their home and the rule that keeps libtorch out of it.)

/// The protocol version every request carries; a node answers a request of another
/// version with a clear error instead of misreading it.
pub const PROTOCOL_VERSION: u32 = 1;
