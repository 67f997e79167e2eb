//! Health, status and metrics over HTTP: the only room that touches `hyper`.
//!
//! - `GET /health/live`: 200 while the process and its supervisor run.
//! - `GET /health/ready`: 200 when the serving is `ready`, else 503; a small JSON
//!   body names the phase either way.
//! - `GET /status`: the serving's state as JSON (schema in the README).
//! - `GET /metrics`: Prometheus text.
//!
//! The listener starts before anything slow, so a platform's checks are answered
//! during a long first download. A client cannot hold it: connections are
//! bounded, headers must arrive within a few seconds, a connection lives at most a
//! minute, and when every place is taken a new connection closes the oldest one
//! that has not sent its headers (so health checks are answered under a
//! slowloris).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::fetch::ProgressSnapshot;
use crate::listener::AcceptFailures;
use crate::serving::{DeviceInfo, ModelInfo, Phase, ServingShared};

/// Connections open at once; past it, the oldest that has not sent its headers is
/// closed for a new one. An idle connection costs a task and a few KB, so this is
/// high enough that hundreds of sockets that never finish their headers (each
/// closed after HEADER_TIMEOUT) leave room for the platform's checks.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection is kept.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub shared: Arc<ServingShared>,
    /// Whether the supervisor still runs.
    pub live: Arc<dyn Fn() -> bool + Send + Sync>,
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
    let listener = bind(addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP listening: /health/live /health/ready /status /metrics");
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
        let first_request = slot.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                first_request.headers_arrived();
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
        connections.started(id, task.abort_handle());
    }
}

/// The open connections, and which of them have not yet sent a request's
/// headers. When all `MAX_CONNECTIONS` are taken, a new connection closes the
/// oldest that is still waiting for its headers: sockets that never finish them
/// (slowloris) cannot keep a health check, which sends its headers at once, from
/// being answered.
#[derive(Default)]
struct Connections {
    inner: std::sync::Mutex<ConnectionsInner>,
}

#[derive(Default)]
struct ConnectionsInner {
    open: usize,
    next_id: u64,
    /// Connections without a request yet, oldest first.
    waiting: std::collections::VecDeque<(u64, Option<tokio::task::AbortHandle>)>,
}

impl Connections {
    /// A slot for a new connection, closing the oldest one still waiting for its
    /// headers if every slot is taken; `None` if every slot serves a request.
    fn admit(self: &Arc<Self>) -> Option<Arc<Slot>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.open >= MAX_CONNECTIONS {
            let (_, oldest) = inner.waiting.pop_front()?;
            if let Some(task) = oldest {
                task.abort(); // its Slot frees the place when the task ends
            }
        }
        inner.open += 1;
        inner.next_id += 1;
        let id = inner.next_id;
        inner.waiting.push_back((id, None));
        Some(Arc::new(Slot {
            id,
            connections: self.clone(),
        }))
    }

    /// The task serving connection `id`, so it can be closed.
    fn started(&self, id: u64, task: tokio::task::AbortHandle) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = inner.waiting.iter_mut().find(|(i, _)| *i == id) {
            entry.1 = Some(task);
        }
    }

    fn forget_waiting(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.waiting.retain(|(i, _)| *i != id);
    }
}

/// One connection's place; freed when its task ends (or is closed).
struct Slot {
    id: u64,
    connections: Arc<Connections>,
}

impl Slot {
    /// A request's headers arrived: the connection is no longer a candidate to close.
    fn headers_arrived(&self) {
        self.connections.forget_waiting(self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self
            .connections
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inner.open -= 1;
        inner.waiting.retain(|(i, _)| *i != self.id);
    }
}

fn route(state: &HttpState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/health/live" | "/health/ready" | "/status" | "/metrics"
    );
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /health/live, /health/ready, /status, /metrics\n",
        );
    }
    if req.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let _span = tracing::debug_span!("http", path).entered();
    match path {
        "/health/live" if (state.live)() => text(StatusCode::OK, "live\n"),
        "/health/live" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor has stopped\n",
        ),
        "/health/ready" => {
            let info = state.shared.phase();
            let code = if info.phase == Phase::Ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                code,
                &Readiness {
                    phase: info.phase.as_str(),
                    message: info.message,
                },
            )
        }
        "/status" => json(StatusCode::OK, &status(&state.shared)),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from(state.shared.render_metrics())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
    }
}

#[derive(Serialize)]
struct Readiness<'a> {
    phase: &'a str,
    message: Option<String>,
}

/// `/status`. The README documents this schema; keep them together.
#[derive(Serialize)]
pub struct Status {
    pub phase: &'static str,
    pub message: Option<String>,
    pub serving: String,
    pub model: Option<ModelInfo>,
    pub progress: ProgressSnapshot,
    pub device: Option<DeviceInfo>,
    pub restarts: u64,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub uptime_s: u64,
    /// The Fly machine this node runs on (`FLY_MACHINE_ID`, which Fly sets), so
    /// a caller waking machines can tell which one serves; absent elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    pub versions: Versions,
    /// The generation task's slots and memory (absent for other tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::tasks::generation::GenerationStatus>,
}

#[derive(Serialize)]
pub struct Versions {
    pub harness: &'static str,
    pub libtorch: &'static str,
    pub protocol: u32,
}

pub fn status(shared: &ServingShared) -> Status {
    let info = shared.phase();
    Status {
        phase: info.phase.as_str(),
        message: info.message,
        serving: shared.name.clone(),
        model: shared.model(),
        progress: shared.progress.snapshot(),
        device: shared.device(),
        restarts: shared.restarts(),
        queue_depth: shared.queue_depth(),
        in_flight: shared.in_flight(),
        uptime_s: shared.started.elapsed().as_secs(),
        machine_id: std::env::var("FLY_MACHINE_ID")
            .ok()
            .filter(|id| !id.is_empty()),
        versions: Versions {
            harness: env!("CARGO_PKG_VERSION"),
            libtorch: crate::engine::gpu::LIBTORCH_VERSION,
            protocol: harness_client::PROTOCOL_VERSION,
        },
        generation: shared.generation_status(),
    }
}

fn json(code: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
