//! The cluster listener: a `ractor_cluster` NodeServer on `HARNESS_CLUSTER_ADDR`,
//! authenticated by `HARNESS_COOKIE` (a challenge-response: the cookie never
//! travels). The only server room that touches `ractor_cluster`. Remote nodes find
//! the serving through its process group and message it directly.
//!
//! Our accept loop serves the port (the NodeServer's own listener sits unused on
//! loopback): it backs off when accepts fail, runs TLS handshakes with a timeout,
//! and hands each peer to the NodeServer through [`admission`], which holds
//! peers that have not authenticated to small frames, a deadline and a number.

mod admission;

pub use admission::{HANDSHAKE_DEADLINE, MAX_PENDING, PRE_AUTH_FRAME_LIMIT};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

use crate::fetch::Secret;
use crate::listener::AcceptFailures;

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
    /// Certificate, key and (for client certificates) CA, as PEM files.
    pub tls: Option<(&'a Path, &'a Path, Option<&'a Path>)>,
}

/// How long a peer has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = HANDSHAKE_DEADLINE;

/// Starts the listener. `[::]` falls back to `0.0.0.0` where IPv6 is off.
pub async fn start(config: ClusterConfig<'_>) -> anyhow::Result<ClusterNode> {
    let parsed: SocketAddr = match config.addr.parse() {
        Ok(parsed) => parsed,
        // A host name (`localhost:9000`): its first address.
        Err(e) => tokio::net::lookup_host(config.addr)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "HARNESS_CLUSTER_ADDR {:?} is not HOST:PORT: {e}",
                    config.addr
                )
            })?,
    };
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
    // Our own accept loop serves the port (ractor_cluster's runs each TLS
    // handshake inline, with no timeout, and bounds nothing before authentication);
    // the NodeServer's own listener sits unused on a loopback port.
    let tls = match config.tls {
        Some((cert, key, ca)) => Some(harness_client::tls::server_config(cert, key, ca)?),
        None => None,
    };
    // Bound first, so that a port in use is said plainly (ractor_cluster reports it
    // as a panic of its listener actor).
    let addr = SocketAddr::new(ip, parsed.port());
    let listener = std::net::TcpListener::bind(addr).map_err(|err| {
        anyhow::anyhow!(
            "HARNESS_CLUSTER_ADDR {addr}: cannot listen there ({err}){}",
            if err.kind() == std::io::ErrorKind::AddrInUse {
                ": another process (another harness?) holds the port; stop it or choose another port"
            } else {
                ""
            }
        )
    })?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let node_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = NodeServer::new(
        node_port,
        config.cookie.expose().to_string(),
        name.clone(),
        hostname,
        None,
        // Clients connect to the nodes they use; nodes need not mesh with each other.
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into())
    .with_max_inbound_frame_size(config.max_message_bytes);
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| anyhow::anyhow!("starting the cluster listener: {e}"))?;
    let admission = Arc::new(admission::Admission::default());
    // Peers coming and going, at INFO: a client leaving is normal (ractor_cluster's
    // own warning for it is dropped by the log filter, see harness_client::cli).
    let _ = server.cast(NodeServerMessage::SubscribeToEvents {
        id: "harness-session-log".to_string(),
        subscription: Box::new(SessionLog {
            admission: admission.clone(),
        }),
    });
    let tls = tls.map(|tls| tokio_rustls::TlsAcceptor::from(Arc::new(tls)));
    tokio::spawn(accept(listener, tls, server.clone(), admission));
    let mode = if config.tls.is_some() {
        "TLS"
    } else {
        "plain TCP"
    };
    tracing::info!(%addr, node = %name, "cluster listening ({mode}, cookie set)");
    Ok(ClusterNode { server, addr })
}

/// Accepts peers and hands them to the NodeServer through the admission; with
/// TLS, each handshake first, in a task of its own with a timeout.
async fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: ActorRef<NodeServerMessage>,
    admission: Arc<admission::Admission>,
) {
    let mut failures = AcceptFailures::new("cluster");
    let mut refused = AcceptFailures::new("cluster (too many peers authenticating)");
    loop {
        let (stream, peer_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                failures.note(&err).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let label = peer_addr.to_string();
        let Some(tls) = tls.clone() else {
            let (read, write) = stream.into_split();
            match admission.admit(label, Box::new(read), Box::new(write)) {
                Some(guarded) => hand_over(&server, guarded),
                None => refused.note_refused(peer_addr, MAX_PENDING),
            }
            continue;
        };
        let (server, admission) = (server.clone(), admission.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let (read, write) = tokio::io::split(stream);
                    if let Some(guarded) = admission.admit(label, Box::new(read), Box::new(write)) {
                        hand_over(&server, guarded);
                    }
                }
                Ok(Err(err)) => tracing::info!(%peer_addr, %err, "a peer failed the TLS handshake"),
                Err(_) => {
                    tracing::info!(%peer_addr, "a peer did not finish the TLS handshake in {TLS_HANDSHAKE_TIMEOUT:?}")
                }
            }
        });
    }
}

fn hand_over(server: &ActorRef<NodeServerMessage>, guarded: admission::GuardedStream) {
    let _ = server.cast(NodeServerMessage::ConnectionOpenedExternal {
        stream: Box::new(guarded),
        is_server: true,
    });
}

/// Logs peers' sessions, ready (DEBUG) and ended (INFO), and tells the admission
/// which have authenticated.
struct SessionLog {
    admission: Arc<admission::Admission>,
}

fn peer_name(ses: &NodeServerSessionInformation) -> String {
    ses.peer_name
        .as_ref()
        .map_or_else(|| "(unnamed)".to_string(), |n| n.name.clone())
}

impl NodeEventSubscription for SessionLog {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.admission.authenticated(&ses.peer_addr);
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        tracing::debug!(peer = %ses.peer_addr, name = %peer_name(&ses), "a peer's session is ready");
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        tracing::info!(peer = %ses.peer_addr, name = %peer_name(&ses), "a peer's session ended");
    }
}
