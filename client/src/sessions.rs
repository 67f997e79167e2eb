//! The client's sessions with harness nodes. Each configured node (an address, or
//! a name standing for several) has a keeper task that connects it, waits until
//! the session is authenticated and ready, and connects it again with backoff
//! whenever it is not (down at start, lost later): ractor_cluster itself never
//! reconnects. Each address remembers why it is not connected, for the errors of
//! calls that found no serving.
//!
//! A session's stream is opened here (TCP, then TLS where configured) and handed
//! to the NodeServer as an external stream whose reads are watched, so that a
//! session closed before it was ready tells a wrong cookie (the peer answered
//! with ractor_cluster frames, then closed) from a peer that is no Harness node
//! at all (an HTTP port: bytes that are not a frame, or nothing).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ractor::ActorRef;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{
    BoxRead, BoxWrite, ClusterBidiStream, NodeEventSubscription, NodeServerMessage,
};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::client::ClientError;

/// How long a new session has to connect and authenticate.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a node whose addresses are all connected is resolved again (a name
/// may gain machines).
const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// The largest first frame a Harness node sends during the handshake is a few
/// hundred bytes; anything announcing more than this is not ractor_cluster.
const LARGEST_HANDSHAKE_FRAME: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Ready,
    Closed,
}

/// One address: its session's state, why it is not connected, and the reads of
/// the session being set up.
struct Address {
    state: State,
    last: Option<ClientError>,
    reads: Option<Arc<Reads>>,
    /// The peer had sent its name (its handshake challenge) when the session closed.
    named: bool,
}

/// Every node address and the state of its session.
pub(crate) struct Sessions {
    server: ActorRef<NodeServerMessage>,
    /// TLS to the nodes, with the name their certificates carry (none: their IP).
    tls: Option<(tokio_rustls::TlsConnector, Option<String>)>,
    /// This client's event subscription on the NodeServer.
    subscription: String,
    addresses: Mutex<HashMap<String, Address>>,
    /// Configured nodes whose name did not resolve, and why.
    unresolved: Mutex<HashMap<String, String>>,
    changed: Notify,
    /// Bumped by [`Sessions::retry_now`]: keepers waiting out a backoff try again.
    retry: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

enum Event {
    Ready(String),
    Closed(String, bool),
}

struct Events(mpsc::UnboundedSender<Event>);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Event::Ready(ses.peer_addr));
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let named = ses.peer_name.is_some();
        let _ = self.0.send(Event::Closed(ses.peer_addr, named));
    }
}

impl Sessions {
    /// Watches `server`'s sessions until [`Sessions::stop`].
    pub fn start(
        server: ActorRef<NodeServerMessage>,
        tls: Option<(tokio_rustls::TlsConnector, Option<String>)>,
    ) -> Result<Arc<Sessions>, ClientError> {
        static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);
        let subscription = format!(
            "harness-client-{}-{}",
            std::process::id(),
            SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed)
        );
        let sessions = Arc::new(Sessions {
            server: server.clone(),
            tls,
            subscription: subscription.clone(),
            addresses: Mutex::new(HashMap::new()),
            unresolved: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            retry: watch::channel(0).0,
            stop: watch::channel(false).0,
        });
        let (tx, mut events) = mpsc::unbounded_channel();
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: subscription,
                subscription: Box::new(Events(tx)),
            })
            .map_err(|e| ClientError::Internal(e.to_string()))?;
        // Ends when the subscription is dropped (unsubscribed, or the server stopped).
        let weak = Arc::downgrade(&sessions);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(sessions) = weak.upgrade() else {
                    return;
                };
                match event {
                    Event::Ready(addr) => {
                        sessions.update(&addr, |a| {
                            a.state = State::Ready;
                            a.last = None;
                        });
                    }
                    Event::Closed(addr, named) => {
                        let was = sessions.update(&addr, |a| {
                            a.state = State::Closed;
                            a.named = named;
                        });
                        if was == Some(State::Ready) {
                            tracing::warn!(node = %addr, "lost the session with {addr}; reconnecting");
                            sessions.update(&addr, |a| {
                                a.last = Some(ClientError::Unreachable {
                                    node: addr.clone(),
                                    message: "the session was lost; reconnecting".to_string(),
                                })
                            });
                        }
                    }
                }
            }
        });
        Ok(sessions)
    }

    /// Stops every keeper and this client's event subscription. Sessions stay
    /// as they are (the NodeServer's owner decides about those).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        let _ = self.server.cast(NodeServerMessage::UnsubscribeToEvents(
            self.subscription.clone(),
        ));
    }

    /// Applies `change` to the address's entry (made if new); its state before.
    /// Only addresses this client connects are tracked.
    fn update(&self, addr: &str, change: impl FnOnce(&mut Address)) -> Option<State> {
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let entry = addresses.get_mut(addr)?;
        let was = entry.state;
        change(entry);
        drop(addresses);
        self.changed.notify_waiters();
        Some(was)
    }

    fn state(&self, addr: &str) -> Option<State> {
        self.addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(addr)
            .map(|a| a.state)
    }

    /// Whether some session is ready.
    pub fn any_ready(&self) -> bool {
        self.addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|a| a.state == State::Ready)
    }

    /// The nodes not connected now and why, as `; ADDR: REASON` parts (empty when
    /// every known address is connected).
    pub fn describe_unready(&self) -> String {
        let mut parts: Vec<String> = self
            .unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(node, why)| format!("{node}: {why}"))
            .collect();
        let addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let mut unready: Vec<_> = addresses
            .iter()
            .filter(|(_, a)| a.state != State::Ready)
            .collect();
        unready.sort_by_key(|(addr, _)| addr.as_str());
        for (addr, a) in unready {
            let why = match (&a.last, a.state) {
                (Some(err), _) => reason(err),
                (None, State::Connecting) => "connecting".to_string(),
                (None, _) => "not connected".to_string(),
            };
            parts.push(format!("{addr}: {why}"));
        }
        parts.iter().map(|p| format!("; {p}")).collect()
    }

    /// Keeps the configured `node` connected until [`Sessions::stop`]; the
    /// receiver gets the outcome of the first attempt at each of its addresses.
    pub fn keep(self: &Arc<Self>, node: String) -> oneshot::Receiver<Vec<Result<(), ClientError>>> {
        let (first, outcome) = oneshot::channel();
        let sessions = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = sessions.keeper(node, first) => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        });
        outcome
    }

    async fn keeper(
        self: Arc<Self>,
        node: String,
        first: oneshot::Sender<Vec<Result<(), ClientError>>>,
    ) {
        let mut first = Some(first);
        let mut backoff = FIRST_BACKOFF;
        let mut retry = self.retry.subscribe();
        let mut logged: Option<String> = None;
        loop {
            let (addrs, outcomes) = self.round(&node).await;
            let all_ready = !addrs.is_empty() && outcomes.iter().all(Result::is_ok);
            // Tell what changed, once: a node being down is common (idle shutdown),
            // one that refuses needs a person. (The first round is connect's to tell.)
            let error = outcomes.iter().find_map(|o| o.as_ref().err());
            let failure = error.map(reason);
            if failure != logged {
                match (error, first.is_some()) {
                    (Some(err), false) if !err.is_temporary() => {
                        tracing::warn!(%node, "cannot connect to {node}: {err}; retrying")
                    }
                    (Some(err), false) => {
                        tracing::debug!(%node, "cannot connect to {node} yet: {err}; retrying")
                    }
                    (None, false) => tracing::info!(%node, "connected to {node}"),
                    _ => {}
                }
                logged = failure;
            }
            if let Some(first) = first.take() {
                let _ = first.send(outcomes);
            }
            if all_ready {
                backoff = FIRST_BACKOFF;
                // Until one of its sessions is lost, or it is time to resolve again.
                let _ = tokio::time::timeout(RESOLVE_EVERY, async {
                    loop {
                        let changed = self.changed.notified();
                        if addrs.iter().any(|a| self.state(a) != Some(State::Ready)) {
                            return;
                        }
                        changed.await;
                    }
                })
                .await;
                // A lost session is tried again at once, then with backoff.
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(MAX_BACKOFF),
                // A machine was just started: try now, then from the first backoff.
                _ = retry.changed() => backoff = FIRST_BACKOFF,
            }
        }
    }

    /// Nodes not connected are tried again at once, then with the backoff from
    /// its start (a woken machine's node is booting: it answers soon).
    pub fn retry_now(&self) {
        self.retry.send_modify(|n| *n += 1);
    }

    /// Resolves `node` and connects each of its addresses not connected yet, at
    /// once; the addresses and the outcomes.
    async fn round(self: &Arc<Self>, node: &str) -> (Vec<String>, Vec<Result<(), ClientError>>) {
        let resolved = tokio::time::timeout(HANDSHAKE, tokio::net::lookup_host(node)).await;
        let addrs: Vec<SocketAddr> = match resolved {
            Ok(Ok(addrs)) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.dedup();
                addrs
            }
            Ok(Err(e)) => return (Vec::new(), vec![Err(self.unresolved(node, e.to_string()))]),
            Err(_) => {
                let why = format!("the name did not resolve within {HANDSHAKE:?}");
                return (Vec::new(), vec![Err(self.unresolved(node, why))]);
            }
        };
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
        let mut attempts = tokio::task::JoinSet::new();
        for addr in &addrs {
            let sessions = self.clone();
            let addr = *addr;
            attempts.spawn(async move { sessions.connect(addr).await });
        }
        let mut outcomes = Vec::new();
        while let Some(outcome) = attempts.join_next().await {
            outcomes.push(outcome.unwrap_or_else(|e| Err(ClientError::Internal(e.to_string()))));
        }
        (addrs.iter().map(ToString::to_string).collect(), outcomes)
    }

    fn unresolved(&self, node: &str, why: String) -> ClientError {
        let why = format!("cannot resolve the name: {why}");
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), why.clone());
        ClientError::Unreachable {
            node: node.to_string(),
            message: why,
        }
    }

    /// Connects to `addr`, unless a session with it is ready already, and waits
    /// until the session is authenticated and ready.
    async fn connect(&self, addr: SocketAddr) -> Result<(), ClientError> {
        let key = addr.to_string();
        {
            let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
            let entry = addresses.entry(key.clone()).or_insert(Address {
                state: State::Closed,
                last: None,
                reads: None,
                named: false,
            });
            match entry.state {
                State::Ready => return Ok(()),
                // Another configured name for the same address is at it.
                State::Connecting => {
                    return Err(ClientError::Unreachable {
                        node: key,
                        message: "connecting".to_string(),
                    })
                }
                State::Closed => {
                    entry.state = State::Connecting;
                    entry.named = false;
                    entry.reads = None;
                }
            }
        }
        // A session the NodeServer has already (an application's own, when attached).
        if self.has_session(&key).await {
            self.update(&key, |a| {
                a.state = State::Ready;
                a.last = None;
            });
            return Ok(());
        }
        let outcome = tokio::time::timeout(HANDSHAKE, self.handshake(addr, &key))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unreachable {
                    node: key.clone(),
                    message: format!("no handshake within {HANDSHAKE:?}"),
                })
            });
        if let Err(err) = &outcome {
            self.update(&key, |a| {
                if a.state == State::Connecting {
                    a.state = State::Closed;
                }
                a.last = Some(err.clone());
            });
        }
        outcome
    }

    /// Whether the NodeServer holds an authenticated session with `key`.
    async fn has_session(&self, key: &str) -> bool {
        let sessions = self
            .server
            .call(NodeServerMessage::GetSessions, Some(Duration::from_secs(1)))
            .await;
        match sessions {
            Ok(ractor::rpc::CallResult::Success(sessions)) => {
                sessions.values().any(|s| s.peer_addr == key)
            }
            _ => false,
        }
    }

    async fn handshake(&self, addr: SocketAddr, key: &str) -> Result<(), ClientError> {
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            node: key.to_string(),
            message: e.to_string(),
        };
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(unreachable)?.to_string();
        let reads = Arc::new(Reads::default());
        let (read, write): (BoxRead, BoxWrite) = match &self.tls {
            None => {
                let (read, write) = tcp.into_split();
                (
                    Box::new(Watched::buffered(read, reads.clone())),
                    Box::new(write),
                )
            }
            Some((connector, name)) => {
                let tls_error = |message: String| ClientError::Tls {
                    node: key.to_string(),
                    message,
                };
                let name = match name {
                    Some(name) => rustls::pki_types::ServerName::try_from(name.clone())
                        .map_err(|e| tls_error(format!("server name {name:?}: {e}")))?,
                    None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_error(e.to_string()))?;
                let (read, write) = tokio::io::split(stream);
                (
                    Box::new(Watched::buffered(read, reads.clone())),
                    Box::new(write),
                )
            }
        };
        self.update(key, |a| a.reads = Some(reads.clone()));
        ractor_cluster::client_connect_external(
            &self.server,
            Box::new(Stream {
                read,
                write,
                peer: key.to_string(),
                local,
            }),
        )
        .await
        .map_err(|e| ClientError::Internal(format!("the client node is gone: {e}")))?;
        loop {
            let changed = self.changed.notified();
            let (state, named) = {
                let addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
                addresses
                    .get(key)
                    .map_or((State::Closed, false), |a| (a.state, a.named))
            };
            match state {
                State::Ready => return Ok(()),
                State::Closed => return Err(self.why_closed(key, &reads, named)),
                State::Connecting => changed.await,
            }
        }
    }

    /// Why a session closed before it was ready: a wrong cookie when the peer
    /// spoke ractor_cluster's handshake, else not a (reachable) Harness node.
    fn why_closed(&self, key: &str, reads: &Reads, named: bool) -> ClientError {
        let seen = reads.seen();
        if named || seen.framed {
            return ClientError::Refused {
                node: key.to_string(),
            };
        }
        let what = match (&seen.error, seen.bytes) {
            (Some(err), _) => format!("the stream failed before any handshake frame: {err}"),
            (None, 0) => "the peer closed the connection before any handshake frame".to_string(),
            (None, n) => format!(
                "the peer sent {n} bytes that are not a ractor_cluster frame{}",
                seen.text
                    .as_deref()
                    .map(|t| format!(" (they begin {t:?})"))
                    .unwrap_or_default()
            ),
        };
        if self.tls.is_some() {
            ClientError::Tls {
                node: key.to_string(),
                message: format!(
                    "{what}; check HARNESS_TLS_CA, and HARNESS_TLS_CERT/KEY where the node requires a client certificate"
                ),
            }
        } else {
            ClientError::NotHarness {
                node: key.to_string(),
                message: what,
            }
        }
    }
}

/// A short reason for `describe_unready`.
fn reason(err: &ClientError) -> String {
    match err {
        ClientError::Unreachable { message, .. } => format!("unreachable ({message})"),
        ClientError::Refused { .. } => "refused the cookie".to_string(),
        ClientError::NotHarness { message, .. } => format!("not a Harness node ({message})"),
        ClientError::Tls { message, .. } => format!("TLS failed ({message})"),
        other => other.to_string(),
    }
}

/// A session's stream, opened here and handed to the NodeServer.
struct Stream {
    read: BoxRead,
    write: BoxWrite,
    peer: String,
    local: String,
}

impl ClusterBidiStream for Stream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (self.read, self.write)
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }

    fn local_label(&self) -> Option<String> {
        Some(self.local.clone())
    }
}

/// What a session's stream has received, until its first whole frame.
#[derive(Default)]
struct Reads(Mutex<Seen>);

#[derive(Debug, Clone, Default)]
struct Seen {
    /// The first bytes (up to 8: a frame's length, big-endian).
    head: Vec<u8>,
    bytes: u64,
    /// A whole frame of a plausible length arrived.
    framed: bool,
    error: Option<String>,
    /// The first bytes as text, when they are text (an HTTP answer).
    text: Option<String>,
}

impl Reads {
    fn seen(&self) -> Seen {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn saw(&self, data: &[u8]) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.framed {
            return;
        }
        if seen.bytes == 0 {
            // The first line, when the peer speaks text (an HTTP answer).
            let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
            seen.text = std::str::from_utf8(&line[..line.len().min(80)])
                .ok()
                .filter(|t| !t.trim().is_empty() && t.chars().all(|c| !c.is_control() || c == '\r'))
                .map(|t| t.trim_end().to_string());
        }
        let need = 8 - seen.head.len().min(8);
        let take = need.min(data.len());
        seen.head.extend_from_slice(&data[..take]);
        seen.bytes += data.len() as u64;
        if seen.head.len() == 8 {
            let length = u64::from_be_bytes(seen.head[..8].try_into().expect("8 bytes"));
            seen.framed =
                length > 0 && length <= LARGEST_HANDSHAKE_FRAME && seen.bytes >= 8 + length;
        }
    }

    fn failed(&self, err: &std::io::Error) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.framed && seen.error.is_none() {
            seen.error = Some(err.to_string());
        }
    }
}

/// A read half that tells [`Reads`] what it reads.
struct Watched<R> {
    inner: R,
    reads: Arc<Reads>,
}

impl<R: AsyncRead + Unpin> Watched<R> {
    /// Buffered above the watch, so that the watch sees whole reads from the
    /// socket, not the 8 bytes of a frame's length that ractor_cluster asks first.
    fn buffered(inner: R, reads: Arc<Reads>) -> tokio::io::BufReader<Self> {
        tokio::io::BufReader::new(Watched { inner, reads })
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    self.reads.saw(new);
                }
            }
            Poll::Ready(Err(err)) => self.reads.failed(err),
            Poll::Pending => {}
        }
        polled
    }
}
