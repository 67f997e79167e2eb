//! A node in this process ([`node_config`], [`start_ready`]) and calls to a
//! serving through its actor, as a peer in the mesh sends them ([`run`],
//! [`embed`], [`status`], [`inject_crash`]); the calls work as well on a remote
//! serving found through its process group.

use std::time::Duration;

use harness::node::Node;
use harness_client::{
    EmbedReply, EmbedRequest, Fault, FaultRequest, GenerateOptions, GenerateReply, GenerateRequest,
    Payload, RunReply, RunRequest, ServingError, ServingMessage, ServingStatus, StatusRequest,
    WireTensor, PROTOCOL_VERSION,
};
use ractor::ActorRef;

/// A node's settings, parsed from the command line an operator would write:
/// `harness <args> serve`, on the CPU unless `args` name a device, and HTTP on a
/// free loopback port unless they name an address.
pub fn node_config(args: &[impl AsRef<str>]) -> harness::config::Config {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let names = |flag: &str| args.iter().any(|a| a.starts_with(flag));
    let mut line = vec!["harness".to_string()];
    if !names("--http-addr") {
        line.push("--http-addr=127.0.0.1:0".to_string());
    }
    if !names("--device") {
        line.push("--device=cpu".to_string());
    }
    line.extend(args.iter().cloned());
    harness::cli::server_config(line).expect("arguments")
}

/// Starts a node in this process with `config` and waits, at most `within`, until
/// its serving is ready; the node and its serving.
pub async fn start_ready(
    config: harness::config::Config,
    within: Duration,
) -> (Node, ActorRef<ServingMessage>) {
    let node = Node::start(config).await.expect("the node starts");
    node.wait_ready(within).await.expect("ready");
    let serving = node.serving().await.expect("a serving");
    (node, serving)
}

/// How long a call waits for the serving's answer before the test fails: 30 s,
/// or the request's own deadline and 5 s more where that is longer.
fn answer_within(timeout_ms: u64) -> Duration {
    Duration::from_secs(30).max(Duration::from_millis(timeout_ms) + Duration::from_secs(5))
}

/// Sends the request `message` makes with the reply port and waits at most
/// `within` for the answer. Panics when no answer comes.
async fn ask<R: Send + 'static>(
    serving: &ActorRef<ServingMessage>,
    message: impl FnOnce(ractor::RpcReplyPort<Payload<R>>) -> ServingMessage,
    within: Duration,
) -> R {
    let reply = serving
        .call(message, Some(within))
        .await
        .expect("the serving answers")
        .expect("within the call's timeout");
    reply.0.expect("the reply decodes")
}

/// One `Run` of `inputs`, with `timeout_ms` for the serving's deadline; the
/// serving's answer (a result or its typed error). Panics when no answer comes.
pub async fn run(
    serving: &ActorRef<ServingMessage>,
    inputs: Vec<WireTensor>,
    timeout_ms: u64,
) -> RunReply {
    let request = Payload::new(RunRequest {
        version: PROTOCOL_VERSION,
        inputs,
        timeout_ms,
    });
    let message = |port| ServingMessage::Run(request, port);
    ask(serving, message, answer_within(timeout_ms)).await
}

/// One `Embed` of `texts`, with `timeout_ms` for the serving's deadline; the
/// serving's answer. Panics when no answer comes.
pub async fn embed(
    serving: &ActorRef<ServingMessage>,
    texts: Vec<String>,
    timeout_ms: u64,
) -> EmbedReply {
    let request = Payload::new(EmbedRequest {
        version: PROTOCOL_VERSION,
        texts,
        timeout_ms,
    });
    let message = |port| ServingMessage::Embed(request, port);
    ask(serving, message, answer_within(timeout_ms)).await
}

/// Generates from `prompt` with `options`. Panics when no answer comes.
pub async fn generate(
    serving: &ActorRef<ServingMessage>,
    prompt: &str,
    options: GenerateOptions,
    timeout_ms: u64,
) -> GenerateReply {
    generate_with(serving, generate_request(prompt, options, timeout_ms)).await
}

/// Sends `request` as a `Generate`. Panics when no answer comes.
pub async fn generate_with(
    serving: &ActorRef<ServingMessage>,
    request: GenerateRequest,
) -> GenerateReply {
    let within = answer_within(request.timeout_ms);
    let request = Payload::new(request);
    let message = |port| ServingMessage::Generate(request, port);
    ask(serving, message, within).await
}

/// A `GenerateRequest` of `prompt` naming no caller.
pub fn generate_request(
    prompt: impl Into<harness_client::Prompt>,
    options: GenerateOptions,
    timeout_ms: u64,
) -> GenerateRequest {
    GenerateRequest {
        version: PROTOCOL_VERSION,
        prompt: prompt.into(),
        options,
        timeout_ms,
        caller: None,
    }
}

/// Opens a stream of `request`. Panics when no answer comes.
pub async fn open_stream(
    serving: &ActorRef<ServingMessage>,
    request: GenerateRequest,
) -> harness_client::OpenReply {
    let within = answer_within(request.timeout_ms);
    let request = Payload::new(request);
    let message = |port| ServingMessage::OpenStream(request, port);
    ask(serving, message, within).await
}

/// Opens a stream of `request` and pulls it to its end: its ids, its text (the
/// deltas joined) and its end.
pub async fn stream_whole(
    serving: &ActorRef<ServingMessage>,
    request: GenerateRequest,
) -> Result<(Vec<u32>, String, harness_client::GenerationEnd), ServingError> {
    let opened = open_stream(serving, request).await?;
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        let chunk = pull_stream(serving, opened.stream, 5_000).await?;
        ids.extend(chunk.delta.token_ids);
        text.push_str(&chunk.delta.text);
        if let Some(end) = chunk.end {
            return Ok((ids, text, end));
        }
    }
}

/// Pulls stream `stream`, waiting at most `wait_ms`. Panics when no answer comes.
pub async fn pull_stream(
    serving: &ActorRef<ServingMessage>,
    stream: u64,
    wait_ms: u32,
) -> harness_client::PullReply {
    let request = Payload::new(harness_client::PullRequest {
        version: PROTOCOL_VERSION,
        stream,
        wait_ms,
    });
    let message = |port| ServingMessage::PullStream(request, port);
    ask(serving, message, answer_within(wait_ms.into())).await
}

/// The serving's status. Panics when no answer comes.
pub async fn status(serving: &ActorRef<ServingMessage>) -> ServingStatus {
    let request = Payload::new(StatusRequest {
        version: PROTOCOL_VERSION,
    });
    let message = |port| ServingMessage::Status(request, port);
    ask(serving, message, answer_within(0)).await
}

fn fault_request(fault: Fault) -> Payload<FaultRequest> {
    Payload::new(FaultRequest {
        version: PROTOCOL_VERSION,
        fault,
    })
}

/// Asks the serving to suffer `fault`; the answer says whether it agreed (it is
/// refused unless the node runs with `HARNESS_FAULT_INJECTION`).
pub async fn inject(serving: &ActorRef<ServingMessage>, fault: Fault) -> Result<(), ServingError> {
    let message = |port| ServingMessage::Inject(fault_request(fault), port);
    ask(serving, message, Duration::from_secs(10)).await
}

/// Asks the serving to crash ([`inject`] of `Fault::Crash`).
pub async fn inject_crash(serving: &ActorRef<ServingMessage>) -> Result<(), ServingError> {
    inject(serving, Fault::Crash).await
}

/// The serving `name` as this process's view of the group shows it (its first
/// member): a node in this process, or a remote one a client is connected to.
pub fn member(name: &str) -> ActorRef<ServingMessage> {
    ActorRef::from(
        ractor::pg::get_members(&harness_client::serving_group(name))
            .pop()
            .expect("a member of the serving's group"),
    )
}

/// Asks the serving to crash and waits at most `within` for the answer, whatever
/// it is: the serving panics right after answering, and over the network the
/// answer may not get out first.
pub async fn crash_regardless(serving: &ActorRef<ServingMessage>, within: Duration) {
    let _ = serving
        .call(
            |port| ServingMessage::Inject(fault_request(Fault::Crash), port),
            Some(within),
        )
        .await;
}

/// The body of `GET http://addr/path`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the unlabelled (or fully labelled) sample `name` in `text`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
}
