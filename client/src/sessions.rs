//! The client's sessions with harness nodes: connect, wait until authenticated
//! and ready, and reconnect with backoff when one is lost (ractor_cluster itself
//! never reconnects).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ractor::ActorRef;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServerMessage};
use tokio::sync::{mpsc, Notify};

use crate::client::ClientError;

/// How long a new session has to authenticate.
const HANDSHAKE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Ready,
    Closed,
}

/// Every node address and the state of its session.
pub(crate) struct Sessions {
    server: ActorRef<NodeServerMessage>,
    /// TLS to the nodes, with the name their certificates carry (none: their IP).
    tls: Option<(tokio_rustls::TlsConnector, Option<String>)>,
    states: Mutex<HashMap<String, State>>,
    changed: Notify,
}

enum Event {
    Ready(String),
    Closed(String),
}

struct Events(mpsc::UnboundedSender<Event>);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Event::Ready(ses.peer_addr));
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Event::Closed(ses.peer_addr));
    }
}

impl Sessions {
    /// Watches `server`'s sessions; lost ones are reconnected for as long as the
    /// returned value lives.
    pub fn start(
        server: ActorRef<NodeServerMessage>,
        tls: Option<(tokio_rustls::TlsConnector, Option<String>)>,
    ) -> Result<Arc<Sessions>, ClientError> {
        let sessions = Arc::new(Sessions {
            server: server.clone(),
            tls,
            states: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        });
        let (tx, mut events) = mpsc::unbounded_channel();
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "harness-client".to_string(),
                subscription: Box::new(Events(tx)),
            })
            .map_err(|e| ClientError::Internal(e.to_string()))?;
        let weak = Arc::downgrade(&sessions);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(sessions) = weak.upgrade() else {
                    return;
                };
                match event {
                    Event::Ready(addr) => {
                        sessions.set(&addr, State::Ready);
                    }
                    Event::Closed(addr) => {
                        let was = sessions.set(&addr, State::Closed);
                        if was == Some(State::Ready) {
                            tracing::warn!(node = %addr, "lost the session with {addr}; reconnecting");
                            tokio::spawn(reconnect(Arc::downgrade(&sessions), addr));
                        }
                    }
                }
            }
        });
        Ok(sessions)
    }

    fn set(&self, addr: &str, state: State) -> Option<State> {
        let was = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr.to_string(), state);
        self.changed.notify_waiters();
        was
    }

    fn get(&self, addr: &str) -> Option<State> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(addr)
            .copied()
    }

    /// Connects to `addr` and waits until the session is authenticated and ready.
    pub async fn connect(&self, addr: SocketAddr) -> Result<(), ClientError> {
        let key = addr.to_string();
        self.set(&key, State::Connecting);
        let connected = match &self.tls {
            None => ractor_cluster::client_connect(&self.server, addr).await,
            Some((connector, name)) => {
                let name =
                    match name {
                        Some(name) => rustls::pki_types::ServerName::try_from(name.clone())
                            .map_err(|e| ClientError::Unreachable {
                                node: key.clone(),
                                message: format!("TLS server name {name:?}: {e}"),
                            })?,
                        None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                    };
                ractor_cluster::client_connect_enc(&self.server, addr, connector.clone(), name)
                    .await
            }
        };
        connected.map_err(|e| ClientError::Unreachable {
            node: key.clone(),
            message: e.to_string(),
        })?;
        let wait = async {
            loop {
                let changed = self.changed.notified();
                match self.get(&key) {
                    Some(State::Ready) => return Ok(()),
                    Some(State::Closed) => return Err(ClientError::Refused { node: key.clone() }),
                    _ => changed.await,
                }
            }
        };
        tokio::time::timeout(HANDSHAKE, wait)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unreachable {
                    node: key.clone(),
                    message: format!("the session was not ready within {HANDSHAKE:?}"),
                })
            })
    }
}

/// Connects `addr` again, with backoff, until it is ready or the client is gone.
async fn reconnect(sessions: Weak<Sessions>, addr: String) {
    let Ok(target) = addr.parse::<SocketAddr>() else {
        return;
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::time::sleep(backoff).await;
        let Some(live) = sessions.upgrade() else {
            return;
        };
        match live.connect(target).await {
            Ok(()) => {
                tracing::info!(node = %addr, "reconnected to {addr}");
                return;
            }
            Err(err) => {
                tracing::debug!(node = %addr, %err, "reconnect failed; retrying in {backoff:?}")
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
