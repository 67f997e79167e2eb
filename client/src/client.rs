//! `HarnessClient`: join the mesh, find the servings, call them with a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, RpcReplyPort};

use ractor_cluster::{NodeServer, NodeServerMessage};

use crate::protocol::{
    caller_group, CallerMessage, EmbedRequest, Embedding, GenerateOptions, GenerateRequest,
    Generation, OpenReply, Payload, Prompt, RunRequest, ServingError, ServingMessage,
    ServingStatus, StatusRequest, StreamOpened, WireTensor, PROTOCOL_VERSION,
};
use crate::stream::GenerationStream;

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
    /// Start the app's stopped machines when a call finds no ready serving
    /// (`HARNESS_FLY_APP`, `FLY_API_TOKEN`); `None`: never.
    pub wake: Option<crate::wake::WakeConfig>,
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
            .field("default_deadline", &self.default_deadline)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tls", &self.tls)
            .field("wake", &self.wake)
            .finish()
    }
}

impl ClientConfig {
    /// The settings for `nodes` (`HOST:PORT`, or a name standing for several)
    /// with `cookie`; the serving `default`, a 30 s default deadline, the 64 MiB
    /// message limit, and plain TCP.
    pub fn new(nodes: Vec<String>, cookie: impl Into<String>) -> Self {
        ClientConfig {
            nodes,
            cookie: cookie.into(),
            serving: "default".to_string(),
            name: format!("harness-client-{}", std::process::id()),
            default_deadline: Duration::from_secs(30),
            max_message_bytes: 64 << 20,
            tls: None,
            wake: None,
        }
    }
}

/// Why a call did not return a result. Each says what to do.
///
/// Its `Debug` form is its `Display` sentence, so that `main` returning
/// `Result<(), Box<dyn Error>>` prints something a person can act on.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No session could be opened with a node (connection refused, no route,
    /// name not resolved, no handshake in time). Worth retrying: the node may
    /// be starting. Calls say it in [`ClientError::Deadline`]'s `last`.
    #[error("cannot connect to {node}: {message}; check the address and that the node runs")]
    Unreachable {
        /// The node, as configured or resolved.
        node: String,
        /// Why.
        message: String,
    },
    /// The node answered ractor_cluster's handshake, then closed the session:
    /// the cookie differs from the node's `HARNESS_COOKIE`.
    #[error("{node} closed the session during authentication after a proper handshake reply: check that the cookie matches the node's HARNESS_COOKIE")]
    Refused {
        /// The node.
        node: String,
    },
    /// The address answered, but not with ractor_cluster's protocol: it is not a
    /// Harness cluster port (the HTTP port, another service).
    #[error("{node} is not a Harness cluster port: {message}; use the node's HARNESS_CLUSTER_ADDR (port 9000 by default), not its HTTP port, and for a node with TLS set HARNESS_TLS_CA")]
    NotHarness {
        /// The address.
        node: String,
        /// What the peer did instead.
        message: String,
    },
    /// TLS with the node failed (certificate, CA, or a node that wants a client
    /// certificate, or a node without TLS).
    #[error("TLS with {node} failed: {message}")]
    Tls {
        /// The node.
        node: String,
        /// Why.
        message: String,
    },
    /// Connected nodes have no ready serving of this name within the deadline:
    /// check `HARNESS_SERVING_NAME`, or wait for the serving to become ready.
    #[error("no serving {serving} is ready on the connected nodes within the deadline (check HARNESS_SERVING_NAME, or that the serving has finished loading)")]
    NoServing {
        /// The serving's name.
        serving: String,
    },
    /// The request is larger than the nodes accept; it was not sent.
    #[error("the request is {bytes} bytes, over the {limit}-byte message limit (HARNESS_MAX_MESSAGE_BYTES): send fewer items per call")]
    TooLarge {
        /// The request's size, with an allowance for ractor_cluster's envelope.
        bytes: usize,
        /// [`ClientConfig::max_message_bytes`], or the node's own limit where that
        /// is lower (it tells it in `Status`).
        limit: usize,
    },
    /// The deadline passed before any serving answered with a result.
    #[error("the deadline of {deadline:?} passed{}", .last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Deadline {
        /// The call's deadline.
        deadline: Duration,
        /// The last reason the call was retried, and which nodes are not
        /// connected and why.
        last: Option<String>,
    },
    /// The serving answered with an error retrying cannot fix (`BadInput`,
    /// `Model`, `DeadlineExceeded`), or, for a stream, any error of its pulls.
    #[error(transparent)]
    Serving(#[from] ServingError),
    /// A [`GenerationStream`] was cut off: its serving's node went away (its
    /// session closed) or stopped answering. The text it delivered is all
    /// there is; generate again to retry.
    #[error("the stream was cut off: {reason}; the text it delivered is all there is, generate again to retry")]
    StreamLost {
        /// What happened.
        reason: String,
    },
    /// Waking the stopped nodes failed: the Fly Machines API refused (a token it
    /// does not accept, an app it does not know: calls end at once) or no
    /// machine could start (the API's reason, in a deadline's `last`, retried).
    /// Never carries the token.
    #[error("{message}")]
    Wake {
        /// What was asked and what the API answered.
        message: String,
        /// The API's HTTP status, when it answered.
        status: Option<u16>,
    },
    /// The client's own node could not start, or is gone.
    #[error("the client node could not start: {0}")]
    Internal(String),
}

impl std::fmt::Debug for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ClientError {
    /// Whether trying again later may succeed (unreachable, deadline, no serving),
    /// as opposed to an error that needs a change first (bad input, cookie, size).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::Deadline { .. }
                | ClientError::NoServing { .. }
                | ClientError::StreamLost { .. }
                // The API's refusals of a token or an app stay; a machine that
                // cannot start yet (412 mid-deploy, 422 no capacity) may later.
                | ClientError::Wake {
                    status: None | Some(408 | 409 | 412 | 422 | 429 | 500..),
                    ..
                }
                | ClientError::Serving(
                    ServingError::NotReady { .. }
                        | ServingError::Overloaded { .. }
                        | ServingError::Internal { .. }
                        | ServingError::DeadlineExceeded { .. }
                )
        )
    }
}

/// ractor_cluster's envelope around a payload (target, variant, reply tag,
/// span metadata), counted against the message limit with the payload.
const ENVELOPE_BYTES: usize = 1024;

/// A request kind of the protocol: how it carries a timeout, which message
/// it is, and what its answer means. Every call goes through [`HarnessClient::call`].
trait Request: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + 'static {
    /// What the reply port carries.
    type Answer: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    /// What the caller gets.
    type Output;
    /// Gives the request the caller's remaining budget.
    fn set_timeout(&mut self, timeout_ms: u64);
    /// The message to send.
    fn message(payload: Payload<Self>, port: RpcReplyPort<Payload<Self::Answer>>)
        -> ServingMessage;
    /// The answer as a result or the serving's error.
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError>;
}

impl Request for RunRequest {
    type Answer = Result<Vec<WireTensor>, ServingError>;
    type Output = Vec<WireTensor>;
    fn set_timeout(&mut self, timeout_ms: u64) {
        self.timeout_ms = timeout_ms;
    }
    fn message(
        payload: Payload<Self>,
        port: RpcReplyPort<Payload<Self::Answer>>,
    ) -> ServingMessage {
        ServingMessage::Run(payload, port)
    }
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError> {
        answer
    }
}

impl Request for EmbedRequest {
    type Answer = Result<Vec<Embedding>, ServingError>;
    type Output = Vec<Embedding>;
    fn set_timeout(&mut self, timeout_ms: u64) {
        self.timeout_ms = timeout_ms;
    }
    fn message(
        payload: Payload<Self>,
        port: RpcReplyPort<Payload<Self::Answer>>,
    ) -> ServingMessage {
        ServingMessage::Embed(payload, port)
    }
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError> {
        answer
    }
}

impl Request for GenerateRequest {
    type Answer = Result<Generation, ServingError>;
    type Output = Generation;
    fn set_timeout(&mut self, timeout_ms: u64) {
        self.timeout_ms = timeout_ms;
    }
    fn message(
        payload: Payload<Self>,
        port: RpcReplyPort<Payload<Self::Answer>>,
    ) -> ServingMessage {
        ServingMessage::Generate(payload, port)
    }
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError> {
        answer
    }
}

/// `OpenStream`: a [`GenerateRequest`] whose answer is a stream's id.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct OpenStream(GenerateRequest);

impl Request for OpenStream {
    type Answer = OpenReply;
    type Output = StreamOpened;
    fn set_timeout(&mut self, timeout_ms: u64) {
        self.0.set_timeout(timeout_ms);
    }
    fn message(
        payload: Payload<Self>,
        port: RpcReplyPort<Payload<Self::Answer>>,
    ) -> ServingMessage {
        ServingMessage::OpenStream(Payload(payload.0.map(|open| open.0)), port)
    }
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError> {
        answer
    }
}

impl Request for StatusRequest {
    type Answer = ServingStatus;
    type Output = ServingStatus;
    fn set_timeout(&mut self, _: u64) {}
    fn message(
        payload: Payload<Self>,
        port: RpcReplyPort<Payload<Self::Answer>>,
    ) -> ServingMessage {
        ServingMessage::Status(payload, port)
    }
    fn output(answer: Self::Answer) -> Result<Self::Output, ServingError> {
        Ok(answer)
    }
}

/// A client of one or more harness nodes.
///
/// Keep one per process: ractor's process groups and remote actor ids are
/// process-wide.
pub struct HarnessClient {
    config: ClientConfig,
    server: ActorRef<NodeServerMessage>,
    /// Whether this client started `server` (and stops it when dropped).
    owns_server: bool,
    sessions: Arc<crate::sessions::Sessions>,
    pool: Arc<crate::pool::Pool>,
    /// This client's member of its caller group.
    caller: CallerMember,
    /// Wakes stopped machines, when configured.
    waker: Option<Arc<crate::wake::Waker>>,
}

/// A client's member of its [`caller_group`], stopped when this is dropped (and
/// so when a client being started fails or is cancelled).
struct CallerMember {
    actor: ActorRef<CallerMessage>,
    /// [`caller_group`] of this client's id.
    group: String,
}

impl CallerMember {
    /// Spawns the member and joins it to a new caller group.
    async fn start() -> Result<Self, ClientError> {
        let group = caller_group(&unique_caller_id());
        let (actor, _) = Actor::spawn(None, Caller, group.clone())
            .await
            .map_err(|e| ClientError::Internal(format!("cannot start the caller actor: {e}")))?;
        Ok(CallerMember { actor, group })
    }
}

impl Drop for CallerMember {
    fn drop(&mut self) {
        // Stopping it leaves the group, here and, through each session, on the nodes.
        self.actor.stop(None);
    }
}

/// The actor a client keeps in its [`caller_group`] while it lives: nodes
/// cancel the generations of a caller whose group is empty on them.
struct Caller;

impl Actor for Caller {
    type Msg = CallerMessage;
    type State = ();
    type Arguments = String;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        group: String,
    ) -> Result<(), ractor::ActorProcessingErr> {
        ractor::pg::join(group, vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        _: Self::Msg,
        _: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
}

/// An id no other client has: this process, the time, a count within the
/// process, and std's per-process random hash keys.
fn unique_caller_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!(
        "{}-{nanos:x}-{}-{random:016x}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    )
}

impl HarnessClient {
    /// Starts this client's own node (listening on loopback only), connects to
    /// the nodes of `config.nodes` and returns once each has answered or failed
    /// its first attempt (at most about ten seconds).
    ///
    /// Nodes that are down are connected in the background, with backoff (100 ms
    /// doubling to 5 s), as are nodes lost later; calls wait for a ready serving
    /// within their deadlines. **If no node answers at all, `connect` still
    /// succeeds**: calls then wait, and their [`ClientError::Deadline`] says which
    /// nodes are unreachable and why. It fails at once with
    /// [`ClientError::Refused`] when every node that answered refused the cookie,
    /// and with [`ClientError::NotHarness`] or [`ClientError::Tls`] when every one
    /// that answered is no Harness cluster port or failed TLS.
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
        let client = Self::start(server.clone(), config, true).await;
        if client.is_err() {
            server.stop(None);
        }
        client
    }

    /// A client on the application's own `NodeServer`, for applications that
    /// run their own ractor node: the client opens its sessions through
    /// `server` and reads the process groups the application sees.
    ///
    /// `server`'s cookie is used (`config.cookie` is not), and its inbound
    /// frame limit applies to answers. Dropping the client stops its background
    /// work only: it never stops `server` and never closes a session, so the
    /// application's view of the mesh is not disturbed. Connects as
    /// [`HarnessClient::connect`] does; a node `server` already has an
    /// authenticated session with is used as it is.
    pub async fn attach(
        server: ActorRef<NodeServerMessage>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::start(server, config, false).await
    }

    async fn start(
        server: ActorRef<NodeServerMessage>,
        config: ClientConfig,
        owns_server: bool,
    ) -> Result<Self, ClientError> {
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let identity = tls
                    .identity
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path()));
                let rustls_config = crate::tls::client_config(&tls.ca, identity)
                    .map_err(|e| ClientError::Internal(e.to_string()))?;
                Some((
                    tokio_rustls::TlsConnector::from(Arc::new(rustls_config)),
                    tls.server_name.clone(),
                ))
            }
        };
        // In the caller group before any session opens, so that every node
        // sees the member before this client's first request.
        let caller = CallerMember::start().await?;
        let sessions = crate::sessions::Sessions::start(server.clone(), tls)?;
        // A name may stand for several nodes (Fly's `<app>.internal`): use them all.
        let firsts: Vec<_> = config
            .nodes
            .iter()
            .map(|node| sessions.keep(node.clone()))
            .collect();
        let mut outcomes = Vec::new();
        for first in firsts {
            // Each first attempt is bounded by the handshake timeout.
            if let Ok(Ok(node)) = tokio::time::timeout(crate::sessions::HANDSHAKE * 2, first).await
            {
                outcomes.extend(node);
            }
        }
        if !outcomes.iter().any(Result::is_ok) {
            let refusal = outcomes
                .iter()
                .filter_map(|o| o.as_ref().err())
                .filter(|e| !e.is_temporary())
                .min_by_key(|e| !matches!(e, ClientError::Refused { .. }));
            if let Some(err) = refusal {
                let err = err.clone();
                sessions.stop();
                return Err(err);
            }
            tracing::info!(
                "no Harness node answered yet{}; calls wait for one within their deadlines",
                sessions.describe_unready()
            );
        } else {
            // Nodes that answered and refused, beside ones that work: retried,
            // but a person should know.
            for err in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                if !err.is_temporary() {
                    tracing::warn!("{err}; retrying it in the background");
                }
            }
        }
        let pool = crate::pool::Pool::start(&config.serving);
        let waker = match &config.wake {
            Some(wake) => {
                let sessions = sessions.clone();
                Some(crate::wake::Waker::new(wake.clone(), move || {
                    sessions.retry_now()
                })?)
            }
            None => None,
        };
        Ok(HarnessClient {
            config,
            server,
            owns_server,
            sessions,
            pool,
            caller,
            waker,
        })
    }

    /// What waking the stopped machines does, as it happens (machines started,
    /// the serving's phases, ready), for an application to show; `None` when
    /// the client has no [`ClientConfig::wake`].
    pub fn wake_events(&self) -> Option<tokio::sync::broadcast::Receiver<crate::wake::WakeEvent>> {
        self.waker.as_ref().map(|w| w.subscribe())
    }

    /// Starts the app's stopped machines and waits until a serving is ready,
    /// within `deadline`; its status. Needs [`ClientConfig::wake`].
    pub async fn wake(&self, deadline: Duration) -> Result<ServingStatus, ClientError> {
        let Some(waker) = &self.waker else {
            return Err(ClientError::Wake {
                message: "waking needs HARNESS_FLY_APP and FLY_API_TOKEN".to_string(),
                status: None,
            });
        };
        let started = Instant::now();
        let mut last = None;
        while let Some(left) = deadline
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
        {
            if let Some(refused) = waker.failure() {
                return Err(refused);
            }
            if self.pool.servings().is_empty() {
                waker.ensure();
                last = waker.describe();
            } else {
                match self.status(Some(left.min(Duration::from_secs(5)))).await {
                    Ok(status) if status.phase == "ready" => {
                        waker.answered();
                        return Ok(status);
                    }
                    Ok(status) => {
                        waker.observe(&status.phase);
                        last = waker.describe().or(Some(format!("phase {}", status.phase)));
                    }
                    Err(err) => last = Some(err.to_string()),
                }
            }
            tokio::time::sleep(Duration::from_millis(200).min(left)).await;
        }
        Err(ClientError::Deadline { deadline, last })
    }

    /// A booting serving's `reason` (`NotReady` in `phase`), with how far the
    /// wake got when one is under way.
    fn woken(&self, reason: String, phase: &str) -> String {
        match &self.waker {
            Some(waker) => {
                waker.observe(phase);
                match waker.describe() {
                    Some(wake) => format!("{reason}; {wake}"),
                    None => reason,
                }
            }
            None => reason,
        }
    }

    /// This client's presence group, `harness.caller.<id>` ([`caller_group`]),
    /// which its generation requests name: the client keeps one member in it
    /// while it lives, and a node cancels the generations of a caller whose
    /// group has emptied (its session closed).
    pub fn caller_group(&self) -> &str {
        &self.caller.group
    }

    /// Runs the model on `inputs`, retrying `NotReady`, `Overloaded`, `Internal`
    /// and lost servings until `deadline` (the default when `None`).
    pub async fn run(
        &self,
        inputs: Vec<WireTensor>,
        deadline: Option<Duration>,
    ) -> Result<Vec<WireTensor>, ClientError> {
        let request = RunRequest {
            version: PROTOCOL_VERSION,
            inputs,
            timeout_ms: 0,
        };
        self.call(request, deadline).await
    }

    /// Embeds `texts` (a node serving the embedding task): one [`Embedding`] per
    /// text, in order, each saying whether the text was truncated. Retries as
    /// [`HarnessClient::run`] does.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        deadline: Option<Duration>,
    ) -> Result<Vec<Embedding>, ClientError> {
        let request = EmbedRequest {
            version: PROTOCOL_VERSION,
            texts,
            timeout_ms: 0,
        };
        self.call(request, deadline).await
    }

    /// Continues `prompt` (a node serving the generation task,
    /// `HARNESS_TASK=generation`): a text, or chat messages
    /// ([`ChatMessage`](crate::ChatMessage)s, which the node renders with the
    /// model's chat template). Answers the generated text, its token ids, why it
    /// ended, the token counts and the time to the first token. The whole
    /// generation is answered at once, so `deadline` must cover all of it, not
    /// only its first token; [`HarnessClient::generate_stream`] gives the text
    /// as it is made. `options` left at their defaults take the model's
    /// `generation_config.json`. Retries as [`HarnessClient::run`] does (a retried
    /// generation starts over; with sampling and no `seed` it may differ). The
    /// node stops the generation if this client goes away first.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use harness_client::{ClientConfig, GenerateOptions, HarnessClient};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
    /// let client = HarnessClient::connect(config).await?;
    /// let options = GenerateOptions {
    ///     max_new_tokens: Some(32),
    ///     do_sample: Some(false), // greedy
    ///     stop: vec!["\n\n".into()],
    ///     ..GenerateOptions::default()
    /// };
    /// let generation = client
    ///     .generate("The capital of France is", options, Some(Duration::from_secs(60)))
    ///     .await?;
    /// println!("{} ({})", generation.text, generation.finish_reason.as_str());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn generate(
        &self,
        prompt: impl Into<Prompt>,
        options: GenerateOptions,
        deadline: Option<Duration>,
    ) -> Result<Generation, ClientError> {
        let request = self.generate_request(prompt.into(), options);
        self.call(request, deadline).await
    }

    /// Continues `prompt` as [`HarnessClient::generate`] does, but gives its
    /// text as the node makes it: a [`GenerationStream`] of deltas, then its end
    /// ([`GenerationStream::end`]). The stream is opened on the least busy ready
    /// serving, retrying as [`HarnessClient::run`] does; once open, it reads
    /// from that serving only and is never retried (its text was delivered): an
    /// error ends it. `deadline` (the default when `None`) covers the whole
    /// stream, from its opening to its last delta. Dropping the stream before
    /// its end cancels the generation on the node.
    ///
    /// A slow reader costs nothing here: what the node makes while the reader
    /// is busy comes in its next delta, at most one delta waiting in the client.
    /// Reading it takes a `Stream` combinator crate such as `futures-util`:
    ///
    /// ```no_run
    /// use std::io::Write;
    /// use std::time::Duration;
    /// use futures_util::StreamExt;
    /// use harness_client::{ChatMessage, ClientConfig, GenerateOptions, HarnessClient};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = ClientConfig::new(vec!["127.0.0.1:9000".into()], std::env::var("HARNESS_COOKIE")?);
    /// let client = HarnessClient::connect(config).await?;
    /// let chat = vec![
    ///     ChatMessage::system("You answer in one sentence."),
    ///     ChatMessage::user("Why is the sky blue?"),
    /// ];
    /// let options = GenerateOptions {
    ///     max_new_tokens: Some(128),
    ///     ..GenerateOptions::default()
    /// };
    /// let mut stream = client
    ///     .generate_stream(chat, options, Some(Duration::from_secs(120)))
    ///     .await?;
    /// while let Some(delta) = stream.next().await {
    ///     print!("{}", delta?.text);
    ///     std::io::stdout().flush()?;
    /// }
    /// if let Some(end) = stream.end() {
    ///     println!("\n({}, {} tokens)", end.finish_reason, end.generated_tokens);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn generate_stream(
        &self,
        prompt: impl Into<Prompt>,
        options: GenerateOptions,
        deadline: Option<Duration>,
    ) -> Result<GenerationStream, ClientError> {
        let deadline = deadline.unwrap_or(self.config.default_deadline);
        let deadline_at = tokio::time::Instant::now() + deadline;
        let request = OpenStream(self.generate_request(prompt.into(), options));
        let (opened, serving, member) = self.call_on(request, Some(deadline)).await?;
        Ok(GenerationStream::open(
            serving,
            member,
            self.pool.clone(),
            opened,
            deadline,
            deadline_at,
        ))
    }

    /// A generation request naming this client's caller group.
    fn generate_request(&self, prompt: Prompt, options: GenerateOptions) -> GenerateRequest {
        GenerateRequest {
            version: PROTOCOL_VERSION,
            prompt,
            options,
            timeout_ms: 0,
            caller: Some(self.caller.group.clone()),
        }
    }

    /// The status of a ready serving (the least busy). Retries as
    /// [`HarnessClient::run`] does.
    pub async fn status(&self, deadline: Option<Duration>) -> Result<ServingStatus, ClientError> {
        let request = StatusRequest {
            version: PROTOCOL_VERSION,
        };
        self.call(request, deadline).await
    }

    /// Checks `request`'s size, then sends it to the least busy serving until one
    /// answers with a result or an error retrying cannot fix, or `deadline` passes.
    async fn call<R: Request>(
        &self,
        request: R,
        deadline: Option<Duration>,
    ) -> Result<R::Output, ClientError> {
        self.call_on(request, deadline)
            .await
            .map(|(output, _, _)| output)
    }

    /// [`HarnessClient::call`], also telling which serving answered (and its
    /// count of calls in flight).
    async fn call_on<R: Request>(
        &self,
        request: R,
        deadline: Option<Duration>,
    ) -> Result<
        (
            R::Output,
            ActorRef<ServingMessage>,
            Arc<crate::pool::Member>,
        ),
        ClientError,
    > {
        let deadline = deadline.unwrap_or(self.config.default_deadline);
        // Checked once, at the largest budget an attempt can carry, by counting
        // (a payload's bytes are its tag and the request's postcard encoding).
        let mut request = request;
        request.set_timeout(deadline.as_millis() as u64);
        let bytes = postcard::experimental::serialized_size(&request)
            .map_or(usize::MAX, |size| 1 + size + ENVELOPE_BYTES);
        if bytes > self.config.max_message_bytes {
            return Err(ClientError::TooLarge {
                bytes,
                limit: self.config.max_message_bytes,
            });
        }
        let started = Instant::now();
        let mut last = None;
        let mut seen_serving = false;
        // The limit of a node the request is over, if any.
        let mut too_large: Option<usize> = None;
        let mut pause = Duration::from_millis(10);
        while started.elapsed() < deadline {
            let servings = self.pool.servings();
            if servings.is_empty() {
                let woken = match &self.waker {
                    Some(waker) => {
                        if let Some(refused) = waker.failure() {
                            return Err(refused);
                        }
                        waker.ensure();
                        waker
                            .describe()
                            .map(|w| format!("; {w}"))
                            .unwrap_or_default()
                    }
                    None => String::new(),
                };
                last = Some(format!(
                    "no serving {} is ready yet{}{woken}",
                    self.config.serving,
                    self.sessions.describe_unready()
                ));
            } else if let Some(waker) = &self.waker {
                waker.saw_serving();
            }
            // The least busy first; after a failure, the next one at once.
            let mut attempted = false;
            for (serving, member) in servings {
                seen_serving = true;
                let Some(left) = deadline
                    .checked_sub(started.elapsed())
                    .filter(|d| !d.is_zero())
                else {
                    break;
                };
                // Counted before anything is awaited, so concurrent calls spread.
                member.in_flight.fetch_add(1, Ordering::Relaxed);
                // A node with a lower limit than ours would drop the session
                // over it: the request can never reach it.
                if let Some(limit) = member.message_limit(&serving).await {
                    if bytes > limit as usize {
                        member.in_flight.fetch_sub(1, Ordering::Relaxed);
                        too_large.get_or_insert(limit as usize);
                        continue;
                    }
                }
                attempted = true;
                let mut attempt = request.clone();
                attempt.set_timeout(left.as_millis() as u64);
                let call = serving.call(|port| R::message(Payload::new(attempt), port), Some(left));
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
                match outcome::<R>(answer) {
                    Step::Done(value) => {
                        if let Some(waker) = &self.waker {
                            waker.answered();
                        }
                        return Ok((value, serving, member));
                    }
                    Step::Fail(err) => return Err(err),
                    Step::Retry(reason) => last = Some(reason),
                    Step::NotReady(phase) => {
                        last = Some(
                            self.woken(
                                ServingError::NotReady {
                                    phase: phase.clone(),
                                }
                                .to_string(),
                                &phase,
                            ),
                        );
                    }
                }
            }
            // Every serving there is took less than this request.
            if let (false, Some(limit)) = (attempted, too_large) {
                return Err(ClientError::TooLarge { bytes, limit });
            }
            let left = deadline.saturating_sub(started.elapsed());
            tokio::time::sleep(pause.min(left)).await;
            let booting = self.waker.as_ref().is_some_and(|w| w.is_booting());
            let most = Duration::from_millis(if booting { 50 } else { 500 });
            pause = (pause * 2).min(most);
        }
        if !seen_serving && self.sessions.any_ready() && self.sessions.describe_unready().is_empty()
        {
            return Err(ClientError::NoServing {
                serving: self.config.serving.clone(),
            });
        }
        Err(ClientError::Deadline { deadline, last })
    }
}

/// What a call's answer means for the retry loop.
enum Step<T> {
    Done(T),
    Fail(ClientError),
    Retry(String),
    /// The serving is booting, in this phase.
    NotReady(String),
}

/// Sorts an answer: a result, an error retrying cannot fix, or a reason to retry
/// (not ready, overloaded, restarting, lost).
fn outcome<R: Request>(
    answer: Result<ractor::rpc::CallResult<Payload<R::Answer>>, impl std::fmt::Display>,
) -> Step<R::Output> {
    use ractor::rpc::CallResult;
    match answer {
        Ok(CallResult::Success(Payload(Ok(answer)))) => match R::output(answer) {
            Ok(value) => Step::Done(value),
            Err(ServingError::NotReady { phase }) => Step::NotReady(phase),
            Err(err @ (ServingError::Overloaded { .. } | ServingError::Internal { .. })) => {
                Step::Retry(err.to_string())
            }
            Err(other) => Step::Fail(ClientError::Serving(other)),
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
        if let Some(waker) = &self.waker {
            waker.stop();
        }
        self.sessions.stop();
        if self.owns_server {
            self.server.stop(None);
        }
    }
}

#[cfg(test)]
mod tests {
    //! A client against a fake serving in this process (a local member of the
    //! serving's group): the requests it sends and what it makes of the answers.
    //! The real node's side is the server crate's tests.

    use super::*;
    use crate::protocol::{
        serving_group, ChatMessage, FinishReason, GenerationDelta, GenerationEnd, PullReply,
        PullRequest, StreamChunk,
    };
    use futures_util::StreamExt;
    use std::sync::Mutex;

    /// What the fake serving was sent.
    #[derive(Default)]
    struct Log {
        requests: Vec<GenerateRequest>,
        pulls: Vec<PullRequest>,
        cancelled: Vec<u64>,
        /// Whether `OpenStream` was refused once already (the first is, as a
        /// serving still warming does).
        refused: bool,
    }

    /// A serving whose stream 7 makes `words` one per pull, then ends (or never
    /// ends when `words` is empty: a word per pull forever).
    struct Fake;

    struct FakeState {
        log: Arc<Mutex<Log>>,
        words: Vec<&'static str>,
    }

    impl Actor for Fake {
        type Msg = ServingMessage;
        type State = FakeState;
        type Arguments = (String, Arc<Mutex<Log>>, Vec<&'static str>);

        async fn pre_start(
            &self,
            myself: ActorRef<Self::Msg>,
            (group, log, words): Self::Arguments,
        ) -> Result<FakeState, ractor::ActorProcessingErr> {
            ractor::pg::join(group, vec![myself.get_cell()]);
            Ok(FakeState { log, words })
        }

        async fn handle(
            &self,
            _: ActorRef<Self::Msg>,
            message: Self::Msg,
            state: &mut FakeState,
        ) -> Result<(), ractor::ActorProcessingErr> {
            let mut log = state.log.lock().unwrap();
            match message {
                ServingMessage::OpenStream(Payload(Ok(request)), port) => {
                    log.requests.push(request);
                    let reply = if std::mem::replace(&mut log.refused, true) {
                        Ok(StreamOpened {
                            stream: 7,
                            prompt_tokens: 3,
                        })
                    } else {
                        Err(ServingError::NotReady {
                            phase: "warming".to_string(),
                        })
                    };
                    let _ = port.send(Payload::new(reply));
                }
                ServingMessage::PullStream(Payload(Ok(request)), port) => {
                    log.pulls.push(request.clone());
                    let n = log.pulls.len();
                    let reply: PullReply = if request.stream != 7 {
                        Err(ServingError::BadInput {
                            reason: "no such stream".to_string(),
                        })
                    } else if state.words.is_empty() {
                        Ok(chunk("word ", n as u32, false))
                    } else {
                        let word = state.words.get(n - 1).copied().unwrap_or("");
                        Ok(chunk(word, n as u32, n >= state.words.len()))
                    };
                    let _ = port.send(Payload::new(reply));
                }
                ServingMessage::CancelStream(Payload(Ok(cancel))) => {
                    log.cancelled.push(cancel.stream)
                }
                ServingMessage::Generate(Payload(Ok(request)), port) => {
                    let text = format!("{:?}", request.prompt);
                    log.requests.push(request);
                    let _ = port.send(Payload::new(Ok(Generation {
                        text,
                        token_ids: vec![1],
                        finish_reason: FinishReason::Eos,
                        prompt_tokens: 3,
                        generated_tokens: 1,
                        time_to_first_token_ms: 1.0,
                    })));
                }
                ServingMessage::Status(_, port) => {
                    let _ = port.send(Payload::new(ServingStatus {
                        phase: "ready".to_string(),
                        message: None,
                        serving: "fake".to_string(),
                        device: None,
                        queue_depth: 0,
                        restarts: 0,
                        model: None,
                        server_version: "0".to_string(),
                        protocol_version: PROTOCOL_VERSION,
                        in_flight: 0,
                        uptime_s: 0,
                        max_message_bytes: 0,
                    }));
                }
                _ => {}
            }
            Ok(())
        }
    }

    fn chunk(text: &str, id: u32, end: bool) -> StreamChunk {
        StreamChunk {
            delta: GenerationDelta {
                text: text.to_string(),
                token_ids: vec![id],
            },
            end: end.then_some(GenerationEnd {
                finish_reason: FinishReason::Length,
                prompt_tokens: 3,
                generated_tokens: id,
                time_to_first_token_ms: 2.0,
            }),
        }
    }

    /// A client of a fake serving named `name` (this process's only member of
    /// its group), with no node to connect to.
    async fn client_of_fake(
        name: &str,
        words: Vec<&'static str>,
    ) -> (HarnessClient, ActorRef<ServingMessage>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let (fake, _) = Actor::spawn(None, Fake, (serving_group(name), log.clone(), words))
            .await
            .unwrap();
        let mut config = ClientConfig::new(vec![], "a-test-cookie");
        config.serving = name.to_string();
        let client = HarnessClient::connect(config).await.unwrap();
        (client, fake, log)
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what} did not happen");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_opens_with_retries_names_the_caller_and_ends_without_a_cancel() {
        let (client, fake, log) =
            client_of_fake("stream_ends", vec!["Hello", "", " world", "!"]).await;
        let group = client.caller_group().to_string();
        assert!(group.starts_with("harness.caller."), "{group}");
        let members = ractor::pg::get_members(&group);
        assert_eq!(members.len(), 1);
        assert!(
            members[0].supports_remoting(),
            "ractor_cluster syncs only members that support remoting"
        );

        let chat = vec![ChatMessage::user("Hi")];
        let mut stream = client
            .generate_stream(chat.clone(), GenerateOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(stream.prompt_tokens(), 3);
        let mut text = String::new();
        let mut ids = Vec::new();
        while let Some(delta) = stream.next().await {
            let delta = delta.unwrap();
            text.push_str(&delta.text);
            ids.extend(delta.token_ids);
        }
        assert_eq!(text, "Hello world!");
        assert_eq!(ids, [1, 2, 3, 4], "a delta with ids and no text is yielded");
        assert_eq!(stream.end().unwrap().generated_tokens, 4);
        drop(stream);
        {
            let log = log.lock().unwrap();
            // Refused once (not ready), then opened: both named this client.
            assert_eq!(log.requests.len(), 2);
            for request in &log.requests {
                assert_eq!(request.caller.as_deref(), Some(group.as_str()));
                assert_eq!(request.prompt, Prompt::Chat(chat.clone()));
                assert!(request.timeout_ms > 0 && request.timeout_ms <= 30_000);
            }
            assert!(log
                .pulls
                .iter()
                .all(|p| p.stream == 7 && p.wait_ms <= 3_000));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(log.lock().unwrap().cancelled.is_empty(), "ended: no cancel");

        // The whole answer names the caller too.
        let generation = client
            .generate("Once", GenerateOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(generation.text, format!("{:?}", Prompt::from("Once")));
        let last = log.lock().unwrap().requests.pop().unwrap();
        assert_eq!(last.caller.as_deref(), Some(group.as_str()));

        // The caller's member leaves its group with the client.
        drop(client);
        until("the caller group emptied", || {
            ractor::pg::get_members(&group).is_empty()
        })
        .await;
        fake.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_a_stream_before_its_end_cancels_it_and_collect_reads_the_rest() {
        let (client, fake, log) = client_of_fake("stream_dropped", vec![]).await;
        let mut stream = client
            .generate_stream("Once", GenerateOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().text, "word ");
        drop(stream);
        until("the cancel", || log.lock().unwrap().cancelled == [7]).await;

        let (client2, fake2, _) = client_of_fake("stream_collected", vec!["a", "b", "c"]).await;
        let mut stream = client2
            .generate_stream("Once", GenerateOptions::default(), None)
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().text, "a");
        let rest = stream.collect().await.unwrap();
        assert_eq!(
            (rest.text.as_str(), &rest.token_ids[..]),
            ("bc", &[2, 3][..])
        );
        assert_eq!(rest.finish_reason, FinishReason::Length);
        drop((client, client2));
        fake.stop(None);
        fake2.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_serving_lost_mid_stream_ends_it_with_a_clear_error() {
        let (client, fake, _) = client_of_fake("stream_lost", vec![]).await;
        let mut stream = client
            .generate_stream("Once", GenerateOptions::default(), None)
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        // Read no further for now: the pull task holds one chunk ahead and waits.
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.stop(None);
        let mut error = None;
        while let Some(item) = stream.next().await {
            if let Err(err) = item {
                error = Some(err);
            }
        }
        let error = error.expect("an error after the serving stopped");
        assert!(matches!(&error, ClientError::StreamLost { .. }), "{error}");
        assert!(error.to_string().contains("went away"), "{error}");
        drop(client);
    }

    #[test]
    fn caller_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..100).map(|_| unique_caller_id()).collect();
        assert_eq!(ids.len(), 100);
    }
}
