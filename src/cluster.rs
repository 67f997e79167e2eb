//! The cluster listener: a `ractor_cluster` NodeServer on `HARNESS_CLUSTER_ADDR`,
//! authenticated by `HARNESS_COOKIE` (a challenge-response: the cookie never
//! travels). The only server room that touches `ractor_cluster`. Remote nodes find
//! the serving through its process group and message it directly.

use std::net::SocketAddr;

use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

use crate::fetch::Secret;

/// A running cluster listener.
pub struct ClusterNode {
    pub server: ActorRef<NodeServerMessage>,
    pub addr: SocketAddr,
}

/// What the listener needs.
pub struct ClusterConfig<'a> {
    pub addr: &'a str,
    pub cookie: &'a Secret,
    pub node_name: &'a str,
    pub max_message_bytes: u64,
}

/// Starts the listener. `[::]` falls back to `0.0.0.0` where IPv6 is off.
pub async fn start(config: ClusterConfig<'_>) -> anyhow::Result<ClusterNode> {
    let parsed: SocketAddr = config.addr.parse().map_err(|e| {
        anyhow::anyhow!(
            "HARNESS_CLUSTER_ADDR {:?} is not HOST:PORT: {e}",
            config.addr
        )
    })?;
    let mut ip = parsed.ip();
    if ip.is_ipv6() && ip.is_unspecified() && std::net::TcpListener::bind(parsed).is_err() {
        tracing::warn!("cannot bind {parsed} (IPv6 off?); the cluster listens on 0.0.0.0");
        ip = std::net::Ipv4Addr::UNSPECIFIED.into();
    }
    let hostname = std::env::var("FLY_PRIVATE_IP")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    // ractor_cluster takes peers of the same name for one node, and every
    // machine of an app shares HARNESS_NODE_NAME: make the name unique per
    // listener, so a client connected to several nodes sees them all.
    let name = format!("{}@{hostname}:{}", config.node_name, parsed.port());
    let server = NodeServer::new(
        parsed.port(),
        config.cookie.expose().to_string(),
        name.clone(),
        hostname,
        None,
        // Clients connect to the nodes they use; nodes need not mesh with each other.
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(ip)
    .with_max_inbound_frame_size(config.max_message_bytes);
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| anyhow::anyhow!("starting the cluster listener: {e}"))?;
    let addr = SocketAddr::new(ip, parsed.port());
    tracing::info!(%addr, node = %name, "cluster listening (cookie set)");
    Ok(ClusterNode { server, addr })
}
