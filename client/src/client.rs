//! `HarnessClient`: join the mesh, find the servings, call them with a deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, BytesConvertable, RpcReplyPort};
use ractor_cluster::{NodeServer, NodeServerMessage};

use crate::protocol::{
    EmbedRequest, Embedding, Payload, RunRequest, ServingError, ServingMessage, ServingStatus,
    StatusRequest, WireTensor, PROTOCOL_VERSION,
};

/// How a client joins the mesh.
#[derive(Clone)]
pub struct ClientConfig {
    /// Harness nodes, `HOST:PORT` (their `HARNESS_CLUSTER_ADDR`).
    pub nodes: Vec<String>,
    /// The mesh's shared secret (`HARNESS_COOKIE` on the nodes).
    pub cookie: String,
    /// The serving to call (`HARNESS_SERVING_NAME` on the nodes).
    pub serving: String,
    /// This client's node name.
    pub name: String,
    /// The deadline of a call that does not give one.
    pub default_deadline: Duration,
    /// The largest message the nodes accept (`HARNESS_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: usize,
    /// TLS to the nodes (when they run with `HARNESS_TLS_CERT`); `None`: plain TCP.
    pub tls: Option<ClientTls>,
}

/// TLS settings of a client, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the nodes' certificates (`HARNESS_TLS_CA`).
    pub ca: std::path::PathBuf,
    /// This client's certificate and key, for nodes that require one.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name the nodes' certificates carry; `None`: their IP address.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("nodes", &self.nodes)
            .field("cookie", &"[redacted]")
            .field("serving", &self.serving)
            .field("name", &self.name)
            .finish()
    }
}

impl ClientConfig {
    pub fn new(nodes: Vec<String>, cookie: impl Into<String>) -> Self {
        ClientConfig {
            nodes,
            cookie: cookie.into(),
            serving: "default".to_string(),
            name: format!("harness-client-{}", std::process::id()),
            default_deadline: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            tls: None,
        }
    }
}

/// Why a call did not return a result. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {node}: {message}; check the address and that the node runs")]
    Unreachable { node: String, message: String },
    #[error("{node} closed the session during authentication: check that the cookie matches the node's HARNESS_COOKIE")]
    Refused { node: String },
    #[error("no serving {serving} is ready on the connected nodes within the deadline")]
    NoServing { serving: String },
    #[error("the request is {bytes} bytes, over the {limit}-byte message limit (HARNESS_MAX_MESSAGE_BYTES): send fewer items per call")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the deadline of {deadline:?} passed{}", .last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Deadline {
        deadline: Duration,
        last: Option<String>,
    },
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error("the client node could not start: {0}")]
    Internal(String),
}

/// A client of one or more harness nodes.
pub struct HarnessClient {
    config: ClientConfig,
    server: ActorRef<NodeServerMessage>,
    /// Kept for the reconnects it runs.
    _sessions: Arc<crate::sessions::Sessions>,
    pool: Arc<crate::pool::Pool>,
}

impl HarnessClient {
    /// Starts this client's own node, connects to every node in `config.nodes` and
    /// waits until each session is authenticated and ready.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        // A client node listens on loopback only, on a port of the OS's choosing.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| ClientError::Internal(e.to_string()))?
            .port();
        let node = NodeServer::new(
            port,
            config.cookie.clone(),
            config.name.clone(),
            "localhost".to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into())
        .with_max_inbound_frame_size(config.max_message_bytes as u64);
        let (server, _) = Actor::spawn(None, node, ())
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?;
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let identity = tls
                    .identity
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path()));
                let rustls_config = crate::tls::client_config(&tls.ca, identity).map_err(|e| {
                    server.stop(None);
                    ClientError::Internal(e.to_string())
                })?;
                Some((
                    tokio_rustls::TlsConnector::from(Arc::new(rustls_config)),
                    tls.server_name.clone(),
                ))
            }
        };
        let sessions = crate::sessions::Sessions::start(server.clone(), tls)?;
        // A name may stand for several nodes (Fly's `<app>.internal`): use them all.
        for node in &config.nodes {
            let addrs: Vec<std::net::SocketAddr> =
                match tokio::net::lookup_host(node.as_str()).await {
                    Ok(addrs) => addrs.collect(),
                    Err(e) => {
                        server.stop(None);
                        return Err(ClientError::Unreachable {
                            node: node.clone(),
                            message: e.to_string(),
                        });
                    }
                };
            for addr in addrs {
                if let Err(err) = sessions.connect(addr).await {
                    server.stop(None);
                    return Err(match err {
                        ClientError::Refused { .. } => ClientError::Refused { node: node.clone() },
                        other => other,
                    });
                }
            }
        }
        let pool = crate::pool::Pool::start(&config.serving);
        Ok(HarnessClient {
            config,
            server,
            _sessions: sessions,
            pool,
        })
    }

    /// Runs the model on `inputs`, retrying `NotReady`, `Overloaded`, `Internal`
    /// and lost servings until `deadline` (the default when `None`).
    pub async fn run(
        &self,
        inputs: Vec<WireTensor>,
        deadline: Option<Duration>,
    ) -> Result<Vec<WireTensor>, ClientError> {
        let deadline = deadline.unwrap_or(self.config.default_deadline);
        // Checked once, at the largest budget an attempt can carry.
        let largest = RunRequest {
            version: PROTOCOL_VERSION,
            inputs,
            timeout_ms: deadline.as_millis() as u64,
        };
        let bytes = Payload::new(largest.clone()).into_bytes().len();
        if bytes > self.config.max_message_bytes {
            return Err(ClientError::TooLarge {
                bytes,
                limit: self.config.max_message_bytes,
            });
        }
        self.call(deadline, |timeout_ms, port| {
            let request = RunRequest {
                timeout_ms,
                ..largest.clone()
            };
            ServingMessage::Run(Payload::new(request), port)
        })
        .await
    }

    /// Embeds `texts` (a node serving the embedding task): one [`Embedding`] per
    /// text, in order, each saying whether the text was truncated. Retries as
    /// [`HarnessClient::run`] does.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Embedding>, ClientError> {
        let deadline = deadline.unwrap_or(self.config.default_deadline);
        self.call(deadline, |timeout_ms, port| {
            let request = EmbedRequest {
                version: PROTOCOL_VERSION,
                texts: texts.clone(),
                timeout_ms,
            };
            ServingMessage::Embed(Payload::new(request), port)
        })
        .await
    }

    /// Sends `message(timeout_ms, port)` to the least busy serving until one
    /// answers with a result or an error retrying cannot fix, or `deadline` passes.
    async fn call<T: Send + 'static>(
        &self,
        deadline: Duration,
        message: impl Fn(u64, RpcReplyPort<Payload<Result<T, ServingError>>>) -> ServingMessage,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        let mut last = None;
        let mut pause = Duration::from_millis(10);
        while started.elapsed() < deadline {
            let servings = self.pool.servings();
            if servings.is_empty() {
                last.get_or_insert_with(|| {
                    format!("no serving {} is ready yet", self.config.serving)
                });
            }
            // The least busy first; after a failure, the next one at once.
            for (serving, member) in servings {
                let Some(left) = deadline
                    .checked_sub(started.elapsed())
                    .filter(|d| !d.is_zero())
                else {
                    break;
                };
                member.in_flight.fetch_add(1, Ordering::Relaxed);
                let call = serving.call(|port| message(left.as_millis() as u64, port), Some(left));
                // A node that goes away mid-call (its session closes and its
                // members leave the group) answers nothing: move on at once.
                let answer = tokio::select! {
                    answer = call => Some(answer),
                    () = self.pool.gone(&serving) => None,
                };
                member.in_flight.fetch_sub(1, Ordering::Relaxed);
                let Some(answer) = answer else {
                    last = Some("the serving's node went away mid-call".to_string());
                    continue;
                };
                match outcome(answer) {
                    Step::Done(value) => return Ok(value),
                    Step::Fail(err) => return Err(err),
                    Step::Retry(reason) => last = Some(reason),
                }
            }
            let left = deadline.saturating_sub(started.elapsed());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        Err(ClientError::Deadline { deadline, last })
    }

    /// The status of a ready serving (the least busy).
    pub async fn status(&self, deadline: Option<Duration>) -> Result<ServingStatus, ClientError> {
        let deadline = deadline.unwrap_or(self.config.default_deadline);
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < deadline {
            for (serving, _) in self.pool.servings() {
                let left = deadline.saturating_sub(started.elapsed());
                let request = StatusRequest {
                    version: PROTOCOL_VERSION,
                };
                match serving
                    .call(
                        |port| ServingMessage::Status(Payload::new(request), port),
                        Some(left),
                    )
                    .await
                {
                    Ok(ractor::rpc::CallResult::Success(Payload(Ok(status)))) => return Ok(status),
                    Ok(ractor::rpc::CallResult::Success(Payload(Err(text)))) => last = Some(text),
                    Ok(ractor::rpc::CallResult::SenderError) => {
                        last = Some("the serving's node went away (its session closed)".to_string())
                    }
                    Ok(ractor::rpc::CallResult::Timeout) => {
                        last = Some("no answer within the deadline".to_string())
                    }
                    Err(err) => last = Some(format!("the serving was lost: {err}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(match last {
            None => ClientError::NoServing {
                serving: self.config.serving.clone(),
            },
            last => ClientError::Deadline { deadline, last },
        })
    }
}

/// What a call's answer means for the retry loop.
enum Step<T> {
    Done(T),
    Fail(ClientError),
    Retry(String),
}

/// Sorts an answer: a result, an error retrying cannot fix, or a reason to retry
/// (not ready, overloaded, restarting, lost).
fn outcome<T, E: std::fmt::Display>(
    answer: Result<ractor::rpc::CallResult<Payload<Result<T, ServingError>>>, E>,
) -> Step<T> {
    use ractor::rpc::CallResult;
    match answer {
        Ok(CallResult::Success(Payload(Ok(Ok(value))))) => Step::Done(value),
        Ok(CallResult::Success(Payload(Ok(Err(err))))) => match err {
            ServingError::NotReady { .. }
            | ServingError::Overloaded { .. }
            | ServingError::Internal { .. } => Step::Retry(err.to_string()),
            other => Step::Fail(ClientError::Serving(other)),
        },
        Ok(CallResult::Success(Payload(Err(text)))) => Step::Retry(text),
        Ok(CallResult::SenderError) => {
            Step::Retry("the serving's node went away (its session closed)".to_string())
        }
        Ok(CallResult::Timeout) => Step::Retry("no answer within the deadline".to_string()),
        Err(err) => Step::Retry(format!("the serving was lost: {err}")),
    }
}

impl Drop for HarnessClient {
    fn drop(&mut self) {
        self.server.stop(None);
    }
}
