//! The inference routes, on when `HARNESS_API_KEY` is set. Each request is
//! checked in the order that costs least first: the route exists, the key is
//! right (before a byte of the body is read), the method and the node's task
//! fit, the serving is ready, then the body is read (bounded, timed) and the
//! route's handler calls the serving with the request's deadline
//! (`HARNESS_HTTP_DEADLINE_MS`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::Instrument;

use super::api_error::{ApiError, Dialect, ErrorKind};
use super::auth::ApiKey;
use super::local_serving::LocalServing;
use super::request_body::BodyBudget;
use super::{completions, embeddings, json_bytes, request_body, Body, HttpState};
use crate::config::{Config, Task};
use crate::fetch::Secret;

/// The inference routes' settings.
#[derive(Debug)]
pub struct Inference {
    key: ApiKey,
    key_chars: usize,
    /// `HARNESS_HTTP_DEADLINE_MS`.
    pub deadline: Duration,
    /// `HARNESS_MAX_MESSAGE_BYTES`: the largest body taken.
    max_body_bytes: u64,
    /// The bodies being read and parsed at once.
    bodies: BodyBudget,
    task: Task,
    pub model: ServedModel,
}

/// The model as `/v1/models` and every answer name it.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// `HARNESS_MODEL_REPO`, or the name of the `HARNESS_MODEL_DIR` folder.
    pub id: String,
    /// `HARNESS_MODEL_REVISION` (`local` for a folder).
    pub revision: String,
    /// When this node started, in Unix seconds (OpenAI's `created`).
    pub created: u64,
}

impl Inference {
    /// The routes' settings, or `None` when `HARNESS_API_KEY` is unset (off);
    /// an error for a key no caller could send (empty, or only spaces).
    pub fn from_config(config: &Config) -> Result<Option<Arc<Self>>, String> {
        let Some(key) = config.api_key.as_ref() else {
            return Ok(None);
        };
        // A key pasted with a newline or spaces around it still works.
        let key = Secret::new(key.expose().trim());
        if key.expose().is_empty() {
            return Err("HARNESS_API_KEY is set but empty: set a key (openssl rand -hex 32), or unset it to leave the HTTP inference routes off".to_string());
        }
        let model = &config.model;
        let (id, revision) = match (&model.model_dir, &model.model_repo) {
            (Some(dir), _) => (
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| dir.display().to_string()),
                "local".to_string(),
            ),
            (None, Some(repo)) => (repo.clone(), model.model_revision.clone()),
            (None, None) => ("model".to_string(), model.model_revision.clone()),
        };
        Ok(Some(Arc::new(Inference {
            key_chars: key.expose().chars().count(),
            key: ApiKey::new(&key),
            deadline: Duration::from_millis(config.http_deadline_ms),
            max_body_bytes: config.max_message_bytes,
            bodies: BodyBudget::new(config.max_message_bytes),
            task: config.serving.task,
            model: ServedModel {
                id,
                revision,
                created: unix_now(),
            },
        })))
    }

    /// The key's length in characters (to warn about a short one).
    pub fn key_chars(&self) -> usize {
        self.key_chars
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The inference routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `POST /embed` (text-embeddings-inference).
    TeiEmbed,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `GET /v1/models`.
    Models,
}

impl Route {
    fn of(path: &str) -> Option<Route> {
        Some(match path {
            "/embed" => Route::TeiEmbed,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/completions" => Route::Completions,
            "/v1/models" => Route::Models,
            _ if path.starts_with("/v1/models/") => Route::Models,
            _ => return None,
        })
    }

    /// Its path (also its `route` label in the metrics).
    fn path(self) -> &'static str {
        match self {
            Route::TeiEmbed => "/embed",
            Route::Embeddings => "/v1/embeddings",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Models => "/v1/models",
        }
    }

    fn method(self) -> (Method, &'static str) {
        match self {
            Route::Models => (Method::GET, "GET"),
            _ => (Method::POST, "POST"),
        }
    }

    /// The task the route needs, if one.
    fn task(self) -> Option<Task> {
        match self {
            Route::TeiEmbed | Route::Embeddings => Some(Task::Embedding),
            Route::ChatCompletions | Route::Completions => Some(Task::Generation),
            Route::Models => None,
        }
    }
}

/// Whether `path` is one of this room's (or would be, were it on).
pub fn serves(path: &str) -> bool {
    path == "/embed" || path == "/v1" || path.starts_with("/v1/")
}

/// Answers an inference request: its result, or its error in its route's shape.
pub async fn answer(state: &HttpState, req: Request<Incoming>) -> Response<Body> {
    let received = Instant::now();
    let path = req.uri().path().to_string();
    let dialect = if path == "/embed" {
        Dialect::Tei
    } else {
        Dialect::OpenAi
    };
    let Some(inference) = state.inference.clone() else {
        return ApiError::new(
            ErrorKind::NotFound,
            "HTTP inference is off on this node: set HARNESS_API_KEY on it to turn on POST /embed and the OpenAI routes (/v1/embeddings, /v1/chat/completions, /v1/completions, /v1/models); callers then send Authorization: Bearer <key>",
        )
        .response(dialect);
    };
    let span = tracing::debug_span!("http_inference", route = %path);
    let has_body = announces_body(req.headers());
    let route = Route::of(&path);
    async move {
        let mut body_read = false;
        let mut response = match handle(
            state,
            &inference,
            req,
            route,
            &path,
            received,
            &mut body_read,
        )
        .await
        {
            Ok(response) => response,
            Err(err) => {
                tracing::debug!(status = err.status().as_u16(), "{}", err.message);
                err.response(dialect)
            }
        };
        if has_body && !body_read {
            // Answered before its body was read (a refusal): hyper will not
            // read it and closes the connection, so the client must know not
            // to send its next request on it.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let code = response.status().as_u16();
        state
            .shared
            .metrics
            .http_request(route.map_or("other", Route::path), code);
        tracing::debug!(
            status = code,
            elapsed_ms = received.elapsed().as_millis() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}

/// Whether the request says a body follows.
fn announces_body(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0")
}

async fn handle(
    state: &HttpState,
    inference: &Inference,
    req: Request<Incoming>,
    route: Option<Route>,
    path: &str,
    received: Instant,
    body_read: &mut bool,
) -> Result<Response<Body>, ApiError> {
    if !inference.key.admits(req.headers()) {
        return Err(ApiError::new(
            ErrorKind::Unauthorized,
            "a missing or wrong API key: send Authorization: Bearer <the node's HARNESS_API_KEY>",
        ));
    }
    let route = route.ok_or_else(|| {
        ApiError::new(
            ErrorKind::NotFound,
            format!("no route {path}: try POST /embed, POST /v1/embeddings, POST /v1/chat/completions, POST /v1/completions, GET /v1/models"),
        )
    })?;
    let (method, allow) = route.method();
    if req.method() != method {
        return Err(ApiError::new(
            ErrorKind::MethodNotAllowed(allow),
            format!("{path} takes {allow} only"),
        ));
    }
    if let Some(task) = route.task() {
        if task != inference.task {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "this node serves the {} task; {path} needs a node with HARNESS_TASK={}",
                    inference.task.as_str(),
                    task.as_str()
                ),
            ));
        }
    }
    if route == Route::Models {
        return match path.strip_prefix("/v1/models/") {
            None => Ok(models(&inference.model)),
            Some(id) if id == inference.model.id => ok_json(&inference.model.entry()),
            Some(id) => Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "no model {id:?} here: this node serves {:?}",
                    inference.model.id
                ),
            )),
        };
    }
    let serving = LocalServing::find(&state.shared)?;
    let deadline = received + inference.deadline;
    let body =
        request_body::read(req, inference.max_body_bytes, &inference.bodies, deadline).await?;
    *body_read = true;
    let call = Call {
        serving,
        deadline,
        model: &inference.model,
    };
    match route {
        Route::TeiEmbed => embeddings::tei(&call, body).await,
        Route::Embeddings => embeddings::openai(&call, body).await,
        Route::ChatCompletions => completions::chat(&call, body).await,
        Route::Completions => completions::text(&call, body).await,
        Route::Models => unreachable!("answered above"),
    }
}

/// What a route's handler calls with.
pub struct Call<'a> {
    pub serving: LocalServing,
    /// `HARNESS_HTTP_DEADLINE_MS` after the request arrived.
    pub deadline: Instant,
    pub model: &'a ServedModel,
}

/// `body` as compact JSON with 200.
pub fn ok_json(body: &impl Serialize) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|err| {
        ApiError::new(
            ErrorKind::Internal,
            format!("the answer could not be encoded: {err}"),
        )
    })?;
    Ok(json_bytes(StatusCode::OK, bytes))
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: [ModelEntry<'a>; 1],
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// Beyond OpenAI's fields: the revision served.
    revision: &'a str,
}

impl ServedModel {
    /// Its entry in `/v1/models` (and `/v1/models/{id}`).
    fn entry(&self) -> ModelEntry<'_> {
        ModelEntry {
            id: &self.id,
            object: "model",
            created: self.created,
            owned_by: "harness",
            revision: &self.revision,
        }
    }
}

/// `GET /v1/models`: the one model this node serves.
fn models(model: &ServedModel) -> Response<Body> {
    let list = ModelList {
        object: "list",
        data: [model.entry()],
    };
    let bytes = serde_json::to_vec(&list).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(StatusCode::OK, bytes)
}
