//! Harness: serve a model from a GPU machine to the Rust programs of a
//! `ractor_cluster` mesh. `docs/ARCHITECTURE.md` tells the whole design; this is
//! the map of the code.
//!
//! # Layout
//!
//! A request's way, by module:
//!
//! - [`cluster`]: the `ractor_cluster` listener (cookie, TLS, frame limits) that
//!   remote nodes connect to.
//! - [`serving`]: the `DelayedServing` actor. `serving/mod.rs` takes each message,
//!   `serving/request.rs` checks it (version, readiness, deadline) and answers it
//!   exactly once, `serving/streams.rs` keeps the open streams of `OpenStream`
//!   for their pulls, `serving/caller.rs` tells when a caller's session closed,
//!   `serving/boot.rs` brings the serving through its phases (device, download,
//!   load, warm-up, ready), `serving/shared.rs` holds what outlives a restart
//!   (phase, counters, progress).
//! - [`tasks`]: what a request means: one type per task implementing
//!   [`tasks::Task`] (`tasks/tensor.rs` for `Run`, `tasks/embedding.rs` for
//!   `Embed`, with `tasks/tokenizer.rs` and `tasks/pooling.rs`;
//!   `tasks/generation/` for `Generate` and streams: chat templates, stop
//!   strings, the text of a stream's tokens).
//! - [`engine`]: the model on its device and the one thread that runs it.
//!   `engine/mod.rs` is the handle (`Engine::run`), `engine/batcher.rs` the dynamic
//!   batching, `engine/collate.rs` how requests join into one forward and split
//!   back, `engine/model.rs` one forward on the device, `engine/torchscript.rs` the
//!   TorchScript calls (a leaf), `engine/thread.rs` the engine thread.
//!
//! Around it: [`node`] starts everything and drains on shutdown; [`listener`]
//! holds what the accept loops share; [`supervisor`]
//! restarts the serving with backoff; [`fetch`] downloads and verifies the model
//! into the Hub cache; [`http`] answers health, status and metrics ([`metrics`]);
//! [`device`] turns `HARNESS_DEVICE` into a device; [`config`] holds every
//! setting; [`cli`] the `harness` verbs; [`logging`] the log output.
//!
//! # Rooms
//!
//! Each outside library stays in one place: `tch` in [`engine`] and [`tasks`]
//! (tensors built from requests, pooling), `hf-hub` and `reqwest` in [`fetch`],
//! `ractor_cluster` in [`cluster`] (and `harness-client`), `hyper` in [`http`],
//! `tokenizers` in `tasks/tokenizer.rs`, `minijinja` in
//! `tasks/generation/chat.rs`, `prometheus-client` in [`metrics`].

pub mod cli;
pub mod cluster;
pub mod config;
pub mod device;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod serving;
pub mod supervisor;
pub mod tasks;
