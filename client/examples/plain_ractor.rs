//! An application that runs its own ractor node and calls a harness serving with
//! plain `ractor`, then through a `HarnessClient` attached to that same node.
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example plain_ractor
//! ```
//!
//! With plain ractor, an application needs only:
//! - a session with the node (`ractor_cluster::client_connect` on its `NodeServer`,
//!   with the node's cookie);
//! - the serving's process group, [`serving_group`]`(name)` (`harness.serving.<name>`):
//!   its members are the ready servings, as `ActorRef<ServingMessage>`;
//! - the payload types: each request ([`RunRequest`], [`EmbedRequest`],
//!   [`StatusRequest`]) carries [`PROTOCOL_VERSION`] and travels in a [`Payload`];
//!   each answer comes back in a `Payload` too, whose `Err` is a message that
//!   did not decode, and whose `Ok` is the serving's answer.
//!
//! What `HarnessClient` adds: retries until a deadline, the least busy serving
//! first, reconnects, pings, and the message-size check.

use std::time::Duration;

use harness_client::{
    serving_group, ClientConfig, HarnessClient, Payload, RunRequest, ServingMessage, StatusRequest,
    WireTensor, PROTOCOL_VERSION,
};
use ractor::{Actor, ActorRef};
use ractor_cluster::NodeServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("HARNESS_NODES").unwrap_or_else(|_| "127.0.0.1:9000".to_string());
    let node = nodes.split(',').next().unwrap_or_default().to_string();
    let cookie =
        std::env::var("HARNESS_COOKIE").map_err(|_| "set HARNESS_COOKIE to the node's cookie")?;
    let name = std::env::var("HARNESS_SERVING_NAME").unwrap_or_else(|_| "default".to_string());

    // The application's own node: it listens on loopback (port 0: any free one).
    let server = NodeServer::new(
        0,
        cookie.clone(),
        format!("my-app-{}", std::process::id()),
        "localhost".to_string(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
    let (server, _) = Actor::spawn(None, server, ()).await?;
    ractor_cluster::client_connect(&server, node.as_str()).await?;

    // Ready servings join their group; wait until one is there.
    let group = serving_group(&name);
    let started = std::time::Instant::now();
    let member = loop {
        if let Some(member) = ractor::pg::get_members(&group).pop() {
            break member;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("no member of {group} within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let serving = ActorRef::<ServingMessage>::from(member);

    // Status with `call_t!`: the variant, a timeout in ms, then the request.
    let status = StatusRequest {
        version: PROTOCOL_VERSION,
    };
    let Payload(status) =
        ractor::call_t!(serving, ServingMessage::Status, 5_000, Payload::new(status))?;
    let status = status?;
    println!(
        "status: {} on {:?}, protocol {}",
        status.phase, status.device, status.protocol_version
    );

    // Run with `ActorRef::call`: the node answers `Payload<Result<outputs, ServingError>>`.
    let request = RunRequest {
        version: PROTOCOL_VERSION,
        inputs: vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])],
        timeout_ms: 5_000,
    };
    let answer = serving
        .call(
            |port| ServingMessage::Run(Payload::new(request), port),
            Some(Duration::from_secs(5)),
        )
        .await?;
    let ractor::rpc::CallResult::Success(Payload(decoded)) = answer else {
        return Err("no answer within 5 s".into());
    };
    let outputs = decoded??;
    println!(
        "plain ractor: {:?} {:?}",
        outputs[0].shape,
        outputs[0].to_f32()
    );

    // The same through a HarnessClient attached to the application's node: it
    // uses the session above, and dropping it leaves the node and the group as
    // they were.
    let mut config = ClientConfig::new(vec![node.clone()], cookie);
    config.serving = name.clone();
    let client = HarnessClient::attach(server.clone(), config).await?;
    let outputs = client
        .run(
            vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])],
            Some(Duration::from_secs(10)),
        )
        .await?;
    println!(
        "attached client: {:?} {:?}",
        outputs[0].shape,
        outputs[0].to_f32()
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let members = ractor::pg::get_members(&group).len();
    let running = server.get_status() == ractor::ActorStatus::Running;
    println!("after the client: {members} member(s) of {group}, the application's node running: {running}");
    if members == 0 || !running {
        return Err("dropping the attached client disturbed the application's node".into());
    }
    server.stop(None);
    Ok(())
}
