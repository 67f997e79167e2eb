//! Waking a stopped node: a node stops itself when idle (`HARNESS_IDLE_SHUTDOWN_S`)
//! and Fly's proxy never starts it again for cluster traffic, so a client with a
//! Fly app and a token (`HARNESS_FLY_APP`, `FLY_API_TOKEN`) starts the app's
//! stopped machines through the Fly Machines API when a call finds no ready
//! serving, and the call waits for one within its own deadline.
//!
//! The API: `GET /v1/apps/{app}/machines`, `POST .../machines/{id}/start`,
//! `GET .../machines/{id}/wait?state=started`. One wake runs at a time however
//! many calls wait; it starts only machines the API lists as `stopped` or
//! `suspended`, so each machine is started once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::ClientError;

/// The public Machines API (`FLY_API_HOSTNAME`'s default). Inside Fly's private
/// network `http://_api.internal:4280` reaches it without leaving the network.
pub const DEFAULT_API: &str = "https://api.machines.dev";

/// How often, at most, calls that still find no serving ask the API again
/// while a woken node boots.
const RELIST_EVERY: Duration = Duration::from_secs(5);

/// The least time between two listings, even when a serving was found between
/// them (a serving that comes and goes must not hammer the API).
const RELIST_AT_LEAST: Duration = Duration::from_secs(1);

/// The longest one wake waits for its machines to start.
const WAKE_AT_MOST: Duration = Duration::from_secs(300);

/// The largest answer read from the API (its lists are a few KiB a machine).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// The longest one `wait` request asks the API to hold (its own limit is 60 s).
const WAIT_S: u64 = 60;

/// A Fly API token (`FLY_API_TOKEN`), which never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct FlyToken(String);

impl FlyToken {
    /// The token as `fly tokens create` printed it.
    pub fn new(token: impl Into<String>) -> Self {
        FlyToken(token.into())
    }

    /// The `Authorization` header's value: tokens from `fly tokens create` start
    /// with `FlyV1 ` and go as they are; others are bearer tokens.
    fn authorization(&self) -> String {
        let token = self.0.trim();
        if token.starts_with("FlyV1 ") {
            token.to_string()
        } else {
            format!("Bearer {token}")
        }
    }
}

impl std::fmt::Debug for FlyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlyToken([redacted])")
    }
}

/// Where and how to wake the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeConfig {
    /// The Fly app the nodes run in (`HARNESS_FLY_APP`).
    pub app: String,
    /// A token allowed to start its machines (`FLY_API_TOKEN`).
    pub token: FlyToken,
    /// The Machines API's base URL (`FLY_API_HOSTNAME`), [`DEFAULT_API`] by default.
    pub api: String,
}

impl WakeConfig {
    /// `app` woken with `token` through the public Machines API.
    pub fn new(app: impl Into<String>, token: FlyToken) -> Self {
        WakeConfig {
            app: app.into(),
            token,
            api: DEFAULT_API.to_string(),
        }
    }

    /// From `HARNESS_FLY_APP`, `FLY_API_TOKEN` and `FLY_API_HOSTNAME`; `None`
    /// unless both the app and the token are set.
    pub fn from_env() -> Option<Self> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut config = WakeConfig::new(
            var("HARNESS_FLY_APP")?,
            FlyToken::new(var("FLY_API_TOKEN")?),
        );
        if let Some(api) = var("FLY_API_HOSTNAME") {
            config.api = api;
        }
        Some(config)
    }
}

/// What a wake has done so far, for an application to show (see
/// [`crate::HarnessClient::wake_events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeEvent {
    /// A machine the API listed as stopped or suspended is being started.
    Starting {
        /// The machine's id.
        machine: String,
        /// Its state before (`stopped`, `suspended`).
        from: String,
    },
    /// The API says the machine runs: its node is booting.
    Started {
        /// The machine's id.
        machine: String,
    },
    /// The node's serving is in this phase (`starting`, `downloading`,
    /// `loading`, `warming`).
    Phase {
        /// The phase, as the serving tells it.
        phase: String,
    },
    /// A serving is ready: calls go through.
    Ready,
}

impl std::fmt::Display for WakeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WakeEvent::Starting { machine, from } => {
                write!(f, "starting machine {machine} (it was {from})")
            }
            WakeEvent::Started { machine } => {
                write!(f, "machine {machine} started; its node is booting")
            }
            WakeEvent::Phase { phase } => write!(f, "the serving is {phase}"),
            WakeEvent::Ready => f.write_str("the serving is ready"),
        }
    }
}

/// Wakes the app's machines for a client: at most one wake at a time.
pub(crate) struct Waker {
    config: WakeConfig,
    /// Called when a machine has started: the client connects to it at once.
    on_started: Box<dyn Fn() + Send + Sync>,
    http: reqwest::Client,
    events: broadcast::Sender<WakeEvent>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: bool,
    /// The running wake, aborted when the client goes.
    task: Option<tokio::task::AbortHandle>,
    /// A serving was found since the last wake began.
    seen_serving: bool,
    /// The last wake's error that a retry may fix (the API unreachable, a
    /// machine that cannot start yet), for a call's deadline error.
    last_error: Option<String>,
    /// When the last wake ended: calls that still find no serving ask again
    /// after [`RELIST_EVERY`].
    ended: Option<Instant>,
    /// The last event, for a call's deadline error.
    last: Option<WakeEvent>,
    /// A wake began and no serving was found since: calls look for one often,
    /// so the first answer comes soon after the node is ready.
    booting: bool,
    /// A refusal no retry can fix (a token the API refuses, an app it does not
    /// know): calls end with it at once.
    failure: Option<ClientError>,
}

impl Waker {
    pub fn new(
        config: WakeConfig,
        on_started: impl Fn() + Send + Sync + 'static,
    ) -> Result<Arc<Self>, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("harness-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let (events, _) = broadcast::channel(64);
        Ok(Arc::new(Waker {
            config,
            on_started: Box::new(on_started),
            http,
            events,
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WakeEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: WakeEvent) {
        let mut state = self.state();
        if state.last.as_ref() == Some(&event) {
            return;
        }
        tracing::info!(app = %self.config.app, "wake: {event}");
        state.last = Some(event.clone());
        drop(state);
        let _ = self.events.send(event);
    }

    /// The refusal that ends every call at once, if there is one.
    pub fn failure(&self) -> Option<ClientError> {
        self.state().failure.clone()
    }

    /// How far the wake got, for a call's deadline error.
    pub fn describe(&self) -> Option<String> {
        let state = self.state();
        let last = state.last.as_ref().map(|event| format!("wake: {event}"));
        match (&state.last_error, last) {
            (Some(err), Some(last)) => Some(format!("{last}; then {err}, retrying")),
            (Some(err), None) => Some(format!("wake: {err}, retrying")),
            (None, last) => last,
        }
    }

    /// A call found a serving in the pool (ready or not): the next time none is
    /// found (the node stopped again), a wake may start after
    /// [`RELIST_AT_LEAST`] rather than [`RELIST_EVERY`], which spaces the API's
    /// listings while a woken node boots.
    pub fn saw_serving(&self) {
        self.state().seen_serving = true;
    }

    /// A call was answered: a wake under way has reached its end.
    pub fn answered(&self) {
        let woke = {
            let mut state = self.state();
            let woke = state.booting;
            state.booting = false;
            woke
        };
        if woke {
            self.emit(WakeEvent::Ready);
        }
    }

    /// Whether a wake began and no call was answered since: calls then look
    /// for a serving every 50 ms rather than backing off to 500 ms.
    pub fn is_booting(&self) -> bool {
        self.state().booting
    }

    /// Stops the wake under way (the client is going).
    pub fn stop(&self) {
        if let Some(task) = self.state().task.take() {
            task.abort();
        }
    }

    /// A call saw the serving in `phase` (`NotReady`), or `ready`.
    pub fn observe(&self, phase: &str) {
        if !self.state().booting {
            return; // no wake under way: nothing to tell
        }
        match phase {
            "ready" => self.emit(WakeEvent::Ready),
            phase => self.emit(WakeEvent::Phase {
                phase: phase.to_string(),
            }),
        }
    }

    /// Starts a wake in the background unless one runs, or the last one ended
    /// less than [`RELIST_EVERY`] ago ([`RELIST_AT_LEAST`] when a serving was
    /// found since).
    pub fn ensure(self: &Arc<Self>) {
        {
            let mut state = self.state();
            let interval = match state.seen_serving {
                true => RELIST_AT_LEAST,
                false => RELIST_EVERY,
            };
            let recent = state.ended.is_some_and(|t| t.elapsed() < interval);
            if state.running || recent || state.failure.is_some() {
                return;
            }
            state.running = true;
            state.booting = true;
            state.seen_serving = false;
            state.last = None;
        }
        let waker = self.clone();
        let task = tokio::spawn(async move {
            let result = match tokio::time::timeout(WAKE_AT_MOST, waker.wake()).await {
                Ok(result) => result,
                Err(_) => Err(ClientError::Wake {
                    message: format!("the machines did not start within {WAKE_AT_MOST:?}"),
                    status: None,
                }),
            };
            let mut state = waker.state();
            state.running = false;
            state.task = None;
            state.ended = Some(Instant::now());
            state.last_error = None;
            if let Err(err) = result {
                tracing::warn!(app = %waker.config.app, "{err}");
                match err.is_temporary() {
                    true => state.last_error = Some(err.to_string()),
                    false => state.failure = Some(err),
                }
            }
        });
        let mut state = self.state();
        if state.running {
            state.task = Some(task.abort_handle());
        }
    }

    /// Lists the app's machines, starts the stopped ones and waits until the
    /// API says they run.
    async fn wake(&self) -> Result<(), ClientError> {
        let machines: Vec<Machine> = self.api(reqwest::Method::GET, "machines").await?;
        let mut starting = Vec::new();
        let mut refused = None;
        for machine in machines
            .iter()
            .filter(|m| matches!(m.state.as_str(), "stopped" | "suspended"))
        {
            self.emit(WakeEvent::Starting {
                machine: machine.id.clone(),
                from: machine.state.clone(),
            });
            let path = format!("machines/{}/start", encode(&machine.id));
            match self
                .api::<serde_json::Value>(reqwest::Method::POST, &path)
                .await
            {
                Ok(_) => starting.push(machine),
                // One machine that cannot start does not keep the others down,
                // and may start later (mid-deploy, no capacity, gone): retried.
                Err(ClientError::Wake { message, status })
                    if !matches!(status, Some(401 | 403)) =>
                {
                    refused = refused.or(Some(ClientError::Wake {
                        message: format!("machine {} did not start: {message}", machine.id),
                        status: None,
                    }))
                }
                Err(err) => return Err(err),
            }
        }
        if let (Some(err), true) = (refused, starting.is_empty()) {
            return Err(err);
        }
        for machine in starting {
            self.wait_started(&machine.id).await?;
            self.emit(WakeEvent::Started {
                machine: machine.id.clone(),
            });
            (self.on_started)();
        }
        Ok(())
    }

    /// Waits until the API says the machine runs; asked again on the API's own
    /// timeout (408) while the machine is still starting.
    async fn wait_started(&self, id: &str) -> Result<(), ClientError> {
        let id = encode(id);
        loop {
            let path = format!("machines/{id}/wait?state=started&timeout={WAIT_S}");
            match self
                .api::<serde_json::Value>(reqwest::Method::GET, &path)
                .await
            {
                Ok(_) => return Ok(()),
                Err(ClientError::Wake {
                    status: Some(408), ..
                }) => {
                    let machine: Machine = self
                        .api(reqwest::Method::GET, &format!("machines/{id}"))
                        .await?;
                    if machine.state != "starting" && machine.state != "started" {
                        return Err(ClientError::Wake {
                            message: format!(
                                "machine {} is {} instead of starting",
                                machine.id, machine.state
                            ),
                            status: None,
                        });
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// One request to `{api}/v1/apps/{app}/{path}`, its JSON answer, or the
    /// API's error: 401/403 (the token) and 4xx are refusals, the rest
    /// (unreachable, 5xx) temporary.
    async fn api<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!(
            "{}/v1/apps/{}/{path}",
            self.config.api.trim_end_matches('/'),
            encode(&self.config.app)
        );
        let mut authorization =
            reqwest::header::HeaderValue::from_str(&self.config.token.authorization()).map_err(
                |_| ClientError::Wake {
                    message: "FLY_API_TOKEN holds characters a header cannot carry: copy it again from `fly tokens create`".to_string(),
                    status: Some(401),
                },
            )?;
        authorization.set_sensitive(true);
        let what = format!(
            "{method} /v1/apps/{}/{}",
            self.config.app,
            path.split('?').next().unwrap_or(path)
        );
        let response = self
            .http
            .request(method, &url)
            .header(
                reqwest::header::AUTHORIZATION,
                self.config.token.authorization(),
            )
            // The wait request holds up to WAIT_S; anything else is quick.
            .timeout(Duration::from_secs(WAIT_S + 15))
            .send()
            .await
            .map_err(|e| ClientError::Wake {
                message: format!(
                    "{what}: the Fly Machines API at {} cannot be reached: {e}",
                    self.config.api
                ),
                status: None,
            })?;
        let status = response.status();
        let body = limited(response).await.unwrap_or_default();
        if !status.is_success() {
            // The API's error body is `{"error": "..."}`.
            let reason = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
            let advice = match status.as_u16() {
                401 | 403 => ": check FLY_API_TOKEN (a token from `fly tokens create deploy -a APP`) and HARNESS_FLY_APP",
                404 => ": check HARNESS_FLY_APP",
                _ => "",
            };
            return Err(ClientError::Wake {
                message: format!(
                    "{what}: the Fly Machines API answered {status}: {reason}{advice}"
                ),
                status: Some(status.as_u16()),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Wake {
            message: format!("{what}: the Fly Machines API's answer is not what it documents: {e}"),
            status: None,
        })
    }
}

/// A response's body, cut at [`MAX_ANSWER_BYTES`] (a longer one is no answer
/// of the API's).
async fn limited(response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A path segment for the API's URL: bytes outside `[A-Za-z0-9-_.~]`
/// percent-encoded, so an app name or id can never change the request.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A machine as `GET /v1/apps/{app}/machines` lists it (the fields used here).
#[derive(serde::Deserialize)]
struct Machine {
    id: String,
    state: String,
}

#[derive(serde::Deserialize)]
struct ApiError {
    error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_print_and_go_as_fly_expects() {
        let token = FlyToken::new("FlyV1 fm2_secret");
        assert!(!format!("{token:?}").contains("secret"));
        assert_eq!(token.authorization(), "FlyV1 fm2_secret");
        assert_eq!(FlyToken::new("abc").authorization(), "Bearer abc");
        let config = WakeConfig::new("app", token);
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn names_cannot_change_the_request() {
        assert_eq!(encode("harness-gpu"), "harness-gpu");
        assert_eq!(encode("x/y?z#"), "x%2Fy%3Fz%23");
    }
}
