//! The node's HTTP port (`HARNESS_HTTP_ADDR`): the only room that touches
//! `hyper`.
//!
//! - Health, status and metrics ([`health`]), open to all.
//! - With `HARNESS_API_KEY`, inference in the shapes the ecosystem's clients
//!   speak ([`inference`]): text-embeddings-inference's `POST /embed`, OpenAI's
//!   `/v1/embeddings`, `/v1/chat/completions`, `/v1/completions` and
//!   `/v1/models`, onto the same serving actor the mesh calls.
//!
//! The listener starts before anything slow, so a platform's checks are answered
//! during a long first download. A client cannot hold it: connections are
//! bounded, headers must arrive within a few seconds, a connection takes new
//! requests for at most a minute (one in flight then ends, within its deadline),
//! and when every place is taken a new connection closes the oldest one that has
//! not sent its headers (so health checks are answered under a slowloris).

mod api_error;
mod auth;
mod bounded;
mod completions;
mod embeddings;
mod health;
mod inference;
mod local_serving;
mod request_body;
mod sse;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;

pub use health::{status, Status, Versions};
pub use inference::Inference;

use crate::listener::AcceptFailures;
use crate::serving::ServingShared;

/// Connections open at once; past it, the oldest that has not sent its headers is
/// closed for a new one. An idle connection costs a task and a few KB, so this is
/// high enough that hundreds of sockets that never finish their headers (each
/// closed after HEADER_TIMEOUT) leave room for the platform's checks.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection takes new requests. A request in flight then is
/// still answered (a stream too), within its deadline and [`CLOSING_GRACE`].
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// What a connection's last request may take past its deadline to be sent.
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// A response body: whole, or a stream of server-sent events.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub shared: Arc<ServingShared>,
    /// Whether the supervisor still runs.
    pub live: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The inference routes' settings; `None` (no `HARNESS_API_KEY`): off.
    pub inference: Option<Arc<Inference>>,
}

/// The running listener; dropping it stops accepting.
pub struct HttpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` (`[::]:8080` falls back to `0.0.0.0:8080` where IPv6 is off) and
/// serves the endpoints.
pub async fn start(addr: &str, state: HttpState) -> std::io::Result<HttpServer> {
    if let Some(files) = crate::listener::raise_open_files_limit() {
        if files < MAX_CONNECTIONS as u64 + 256 {
            tracing::warn!(
                files,
                "this process may open only {files} files (ulimit -n): fewer than the HTTP port's {MAX_CONNECTIONS} connections, so a flood of connections can keep health checks out"
            );
        }
    }
    let listener = bind(addr).await?;
    let addr = listener.local_addr()?;
    match &state.inference {
        Some(_) => tracing::info!(
            %addr,
            "HTTP listening: /health/live /health/ready /status /metrics, and inference (HARNESS_API_KEY is set): POST /embed /v1/embeddings /v1/chat/completions /v1/completions, GET /v1/models"
        ),
        None => tracing::info!(
            %addr,
            "HTTP listening: /health/live /health/ready /status /metrics (inference routes off: HARNESS_API_KEY is unset)"
        ),
    }
    let task = tokio::spawn(accept_loop(listener, state));
    Ok(HttpServer { addr, task })
}

/// Binds `addr`; an IPv6 wildcard falls back to the IPv4 one.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let parsed: SocketAddr = match addr.parse() {
        Ok(parsed) => parsed,
        // A host name (`localhost:8080`): its first address.
        Err(e) => tokio::net::lookup_host(addr)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{addr:?} is not HOST:PORT: {e}"),
                )
            })?,
    };
    match TcpListener::bind(parsed).await {
        Ok(listener) => Ok(listener),
        Err(err) if parsed.is_ipv6() && parsed.ip().is_unspecified() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], parsed.port()));
            tracing::warn!(%err, "cannot bind {parsed} (IPv6 off?); binding {v4}");
            TcpListener::bind(v4).await
        }
        Err(err) => Err(err),
    }
}

async fn accept_loop(listener: TcpListener, state: HttpState) {
    let connections = Arc::new(Connections::default());
    let mut failures = AcceptFailures::new("HTTP");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file handles, say: back off instead of spinning, and say
                // so at a bounded rate.
                failures.note(&err).await;
                continue;
            }
        };
        let Some(slot) = connections.admit() else {
            continue; // full of requests being answered: the new one is dropped
        };
        let (id, state) = (slot.id, state.clone());
        let requests = slot.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            // The longest a request may take, so a closing connection lets its
            // last one finish.
            let last_request = state
                .inference
                .as_ref()
                .map_or(Duration::ZERO, |i| i.deadline)
                + CLOSING_GRACE;
            let service = hyper::service::service_fn(move |req| {
                let busy = requests.busy();
                let state = state.clone();
                async move {
                    let response = route(&state, req).await;
                    // Waiting for its next request again once this answer is
                    // sent (a stream's last event included).
                    Ok::<_, Infallible>(response.map(|body| busy.until_sent(body)))
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            if tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut())
                .await
                .is_err()
            {
                // No new request; the one in flight (if any) is answered.
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(last_request, connection).await;
            }
        });
        connections.started(id, task.abort_handle());
    }
}

/// The open connections, and which of them are waiting for a request's headers
/// (new, or idle between requests). When all `MAX_CONNECTIONS` are taken, a
/// new connection closes the one that has waited longest: sockets that never
/// finish their headers (slowloris), before or after a first request, cannot
/// keep a health check, which sends its headers at once, from being answered.
/// A connection with a request in flight (a stream too) is never closed so.
#[derive(Default)]
struct Connections {
    inner: std::sync::Mutex<ConnectionsInner>,
}

#[derive(Default)]
struct ConnectionsInner {
    open: usize,
    next_id: u64,
    /// Connections waiting for a request's headers, longest waiting first.
    waiting: std::collections::VecDeque<u64>,
    /// Each open connection's task, so it can be closed.
    tasks: std::collections::HashMap<u64, tokio::task::AbortHandle>,
}

impl Connections {
    /// A slot for a new connection, closing the one waiting longest for its
    /// headers if every slot is taken; `None` if every slot serves a request.
    fn admit(self: &Arc<Self>) -> Option<Arc<Slot>> {
        let mut inner = self.lock();
        if inner.open >= MAX_CONNECTIONS {
            let oldest = inner.waiting.pop_front()?;
            if let Some(task) = inner.tasks.remove(&oldest) {
                task.abort(); // its Slot frees the place when the task ends
            }
        }
        inner.open += 1;
        inner.next_id += 1;
        let id = inner.next_id;
        inner.waiting.push_back(id);
        Some(Arc::new(Slot {
            id,
            connections: self.clone(),
        }))
    }

    /// The task serving connection `id`, so it can be closed.
    fn started(&self, id: u64, task: tokio::task::AbortHandle) {
        let mut inner = self.lock();
        // A task that already ended has dropped its Slot (and left `waiting`).
        if inner.waiting.contains(&id) {
            inner.tasks.insert(id, task);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's place; freed when its task ends (or is closed).
struct Slot {
    id: u64,
    connections: Arc<Connections>,
}

impl Slot {
    /// A request's headers arrived: the connection is not a candidate to close
    /// until the returned guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.connections.lock().waiting.retain(|i| *i != self.id);
        Busy(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.connections.lock();
        inner.open -= 1;
        inner.waiting.retain(|i| *i != self.id);
        inner.tasks.remove(&self.id);
    }
}

/// A request in flight on a connection; when dropped (its answer sent, or
/// abandoned), the connection waits for its next request's headers again.
struct Busy(Arc<Slot>);

impl Busy {
    /// `body`, holding this guard until hyper has sent it all (or dropped it).
    fn until_sent(self, body: Body) -> Body {
        BodyExt::boxed(Sending { body, _busy: self })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        let mut inner = slot.connections.lock();
        if !inner.waiting.contains(&slot.id) {
            inner.waiting.push_back(slot.id);
        }
    }
}

/// A response body being sent, with its connection's [`Busy`] guard.
struct Sending {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Sending {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Sends `req` to its endpoint.
async fn route(state: &HttpState, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if health::PATHS.contains(&path) {
        return health::answer(state, req.method(), path);
    }
    if inference::serves(path) {
        return inference::answer(state, req).await;
    }
    let hint = if state.inference.is_some() {
        "not found: try /health/live, /health/ready, /status, /metrics, POST /embed, POST /v1/embeddings, POST /v1/chat/completions, POST /v1/completions, GET /v1/models\n"
    } else {
        "not found: try /health/live, /health/ready, /status, /metrics\n"
    };
    text(StatusCode::NOT_FOUND, hint)
}

/// A whole body.
fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// `body` as pretty JSON (the small, human-read answers: health and status).
fn json(code: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(code, bytes)
}

/// A JSON answer of `bytes`, never cached.
fn json_bytes(code: StatusCode, bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(bytes));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
