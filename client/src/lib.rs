//! harness-client: call a Harness model node from any Rust program.
//!
//! This crate holds the wire protocol ([`protocol`]) and the client
//! ([`HarnessClient`]). It never depends on libtorch, so an application that
//! calls a Harness node builds on a laptop with nothing but Rust installed.
//!
//! ```toml
//! [dependencies]
//! harness-client = { git = "https://github.com/harness-rs/harness" }
//! # or, from a checkout: harness-client = { path = "../harness/client" }
//! tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
//! ```
//!
//! Embedding texts (a node with `HARNESS_TASK=embedding`, as `make run` serves):
//!
//! ```no_run
//! use std::time::Duration;
//! use harness_client::{ClientConfig, HarnessClient};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
//! config.serving = "default".into(); // the node's HARNESS_SERVING_NAME
//! let client = HarnessClient::connect(config).await?;
//! let embeddings = client
//!     .embed(vec!["Hello world".into()], Some(Duration::from_secs(5)))
//!     .await?;
//! println!("{} dimensions", embeddings[0].vector.len());
//! # Ok(())
//! # }
//! ```
//!
//! Running a tensor model (`HARNESS_TASK=tensor`, as `make run-tensor` serves):
//!
//! ```no_run
//! use std::time::Duration;
//! use harness_client::{ClientConfig, HarnessClient, WireTensor};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
//! let client = HarnessClient::connect(config).await?;
//! let x = WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4]);
//! let outputs = client.run(vec![x], Some(Duration::from_secs(5))).await?;
//! println!("{:?}", outputs[0].to_f32());
//! # Ok(())
//! # }
//! ```
//!
//! Generating text (a node with `HARNESS_TASK=generation`, a causal language
//! model): [`HarnessClient::generate`] answers the whole generation at once,
//! with why it ended ([`FinishReason`]), its token counts and the time to its
//! first token. Options left unset take the model's `generation_config.json`;
//! see `client/examples/generate.rs`.
//!
//! ```no_run
//! use std::time::Duration;
//! use harness_client::{ClientConfig, GenerateOptions, HarnessClient};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
//! let client = HarnessClient::connect(config).await?;
//! let options = GenerateOptions {
//!     max_new_tokens: Some(32),
//!     temperature: Some(0.7), // sampling
//!     seed: Some(42),         // the same text each time
//!     ..GenerateOptions::default()
//! };
//! let generation = client
//!     .generate("Once upon a time", options, Some(Duration::from_secs(60)))
//!     .await?;
//! println!("{}", generation.text);
//! println!("{} tokens, ended by {}", generation.generated_tokens, generation.finish_reason.as_str());
//! # Ok(())
//! # }
//! ```
//!
//! A prompt is a text or a chat: [`ChatMessage`]s, which the node renders with
//! the model's chat template (a model without one refuses a chat).
//! [`HarnessClient::generate_stream`] gives the text as the node makes it: a
//! [`GenerationStream`], a `futures` `Stream` of [`GenerationDelta`]s whose
//! [`end`](GenerationStream::end) tells why it ended once it has. The deadline
//! covers the whole stream; a slow reader gets fewer, larger deltas (the node
//! keeps what is not read yet); dropping the stream before its end cancels the
//! generation on the node. Read it with a `Stream` crate such as `futures-util`
//! (`StreamExt::next`), or whole with [`GenerationStream::collect`]; see
//! `client/examples/chat.rs`.
//!
//! ```no_run
//! use std::io::Write;
//! use futures_util::StreamExt;
//! use harness_client::{ChatMessage, ClientConfig, GenerateOptions, HarnessClient};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
//! let client = HarnessClient::connect(config).await?;
//! let chat = vec![
//!     ChatMessage::system("You are a terse assistant."),
//!     ChatMessage::user("Name three primary colours."),
//! ];
//! let mut stream = client.generate_stream(chat, GenerateOptions::default(), None).await?;
//! while let Some(delta) = stream.next().await {
//!     print!("{}", delta?.text);
//!     std::io::stdout().flush()?;
//! }
//! println!();
//! if let Some(end) = stream.end() {
//!     eprintln!("{} ({} tokens)", end.finish_reason, end.generated_tokens);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Each client keeps one member in a process group of its own
//! ([`caller_group`], [`HarnessClient::caller_group`]) and names it in its
//! generation requests: a node cancels the generations of a client whose
//! session has closed, so a client that dies frees its sequence slots at once.
//!
//! On Fly.io, a name such as `my-harness.internal:9000` stands for every machine
//! of the app, and the client connects to all of them:
//!
//! ```no_run
//! # use harness_client::{ClientConfig, HarnessClient};
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(vec!["my-harness.internal:9000".into()], std::env::var("HARNESS_COOKIE")?);
//! let client = HarnessClient::connect(config).await?; // every machine behind the name
//! let vectors = client.embed(vec!["Hello world".into()], None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! An application that runs its own ractor node attaches the client to it
//! ([`HarnessClient::attach`]), or calls the serving with plain ractor: see
//! `client/examples/plain_ractor.rs`. The process group is
//! [`serving_group`]`(name)`, its members take [`ServingMessage`], and each
//! request carries [`PROTOCOL_VERSION`]:
//!
//! ```no_run
//! use harness_client::{serving_group, Payload, RunRequest, ServingMessage, WireTensor, PROTOCOL_VERSION};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // With a session to the node open on the application's NodeServer:
//! let member = ractor::pg::get_members(&serving_group("default"))
//!     .pop()
//!     .ok_or("no serving is ready")?;
//! let serving = ractor::ActorRef::<ServingMessage>::from(member);
//! let request = RunRequest {
//!     version: PROTOCOL_VERSION,
//!     inputs: vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])],
//!     timeout_ms: 5_000,
//! };
//! let Payload(answer) = ractor::call_t!(serving, ServingMessage::Run, 5_000, Payload::new(request))?;
//! let outputs = answer??; // a payload that decoded, then the serving's answer
//! # Ok(())
//! # }
//! ```
//!
//! With the `cli` feature the crate also builds the `harness-client` binary
//! (`harness-client call`, `harness-client status`): `cargo install --path client
//! --features cli`. `call --generate PROMPT` prints the generated text as it is
//! made, and `call --chat MESSAGE` (with `--system TEXT`) the answer to a user
//! message; both take `--max-new-tokens`, `--temperature`, `--top-p`, `--top-k`,
//! `--seed`, `--stop` and `--greedy`.

#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli;
mod client;
mod pool;
pub mod protocol;
mod sessions;
mod stream;
pub mod tls;
pub mod wake;

pub use client::{ClientConfig, ClientError, ClientTls, HarnessClient};
pub use stream::GenerationStream;

pub use protocol::{
    caller_group, serving_group, CallerMessage, CancelRequest, ChatMessage, DType, EmbedReply,
    EmbedRequest, Embedding, Fault, FaultRequest, FinishReason, GenerateOptions, GenerateReply,
    GenerateRequest, Generation, GenerationDelta, GenerationEnd, OpenReply, Payload, Prompt,
    PullReply, PullRequest, RunReply, RunRequest, ServingError, ServingMessage, ServingStatus,
    StatusModel, StatusRequest, StreamChunk, StreamOpened, WireTensor, PROTOCOL_VERSION,
};
