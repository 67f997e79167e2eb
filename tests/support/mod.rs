//! The test kit: what the integration tests and the benches share (a bench
//! includes it with `#[path = "../tests/support/mod.rs"] mod support;`). Its parts:
//!
//! - [`models`]: real TorchScript models traced here ([`models::Affine`], the token
//!   model), their inputs and expected answers, an engine loaded with one
//!   ([`models::load_affine`]).
//! - [`python`]: the libtorch environment's Python ([`python::torch_python`],
//!   [`python::run_python`]).
//! - [`hub`]: [`hub::TestHub`], a real HTTP server speaking the Hugging Face Hub's
//!   protocol, with faults to queue.
//! - [`model_repo`]: [`model_repo::ModelRepo`], a model published on a test hub,
//!   with the settings of a node (in this process or not) that fetches it.
//! - [`node`]: `harness serve` processes: [`node::ServeSettings`] (what it serves
//!   and how) and [`node::ServeProcess`] (running, ready, killable, restartable).
//! - [`serving`]: a node in this process ([`serving::node_config`],
//!   [`serving::start_ready`]) and calls to a serving through its actor
//!   ([`serving::run`], [`serving::embed`], [`serving::status`],
//!   [`serving::inject_crash`]).
//! - [`client`]: a connected `HarnessClient` ([`client::connect`]) and the demo
//!   model's one-item call.
//! - [`relay`]: a TCP relay to stall or cut, for network partitions.
//! - [`minilm`]: all-MiniLM-L6-v2, exported by our tool, and sentence-transformers'
//!   reference vectors.
//! - [`llm`]: tiny random Llama, Mistral and Qwen2 checkpoints (and a GPT-2 to
//!   refuse) as Hub repos ([`llm::TinyLlm`]), with transformers' greedy
//!   generations from them, made by `llm_fixtures.py` once per machine.
//! - [`measure`]: [`measure::percentile`], and the benches' sizes from the
//!   environment.
//! - [`fly_api`]: [`fly_api::FlyApi`], a real HTTP server speaking the Fly Machines API.
#![allow(dead_code)] // each test binary and bench uses its own subset

pub mod client;
pub mod fly_api;
pub mod hub;
pub mod llm;
pub mod measure;
pub mod minilm;
pub mod model_repo;
pub mod models;
pub mod node;
pub mod python;
pub mod relay;
pub mod serving;
