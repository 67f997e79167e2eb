//! The endpoints a platform and a person on call read, open to all:
//! `GET /health/live`, `GET /health/ready`, `GET /status` and `GET /metrics`.

use bytes::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use super::{json, text, Body, HttpState};
use crate::fetch::ProgressSnapshot;
use crate::serving::{DeviceInfo, ModelInfo, Phase, ServingShared};

/// The paths answered here.
pub const PATHS: [&str; 4] = ["/health/live", "/health/ready", "/status", "/metrics"];

/// Answers `path` (one of [`PATHS`]).
pub fn answer(state: &HttpState, method: &Method, path: &str) -> Response<Body> {
    if method != Method::GET {
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
            let mut response =
                Response::new(super::full(Bytes::from(state.shared.render_metrics())));
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
