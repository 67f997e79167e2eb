//! A real HTTP server that speaks the Fly Machines API, for tests: one app, its
//! machines, and what "starting a machine" does left to the test.
//!
//! Served, with the real API's paths, methods and JSON shapes (sources: Fly's
//! docs, `superfly/docs` `machines/api/machines-resource.html.markerb` and its
//! example partials `reference/machines/_machines_*_resp.erb`; fly-go's
//! `machine_types.go`, `flaps/flaps_machines*.go`, `flaps/flaps.go`,
//! `tokens/tokens.go`):
//!
//! - `GET /v1/apps/{app}/machines` (`include_deleted`, `region`): 200, an array
//!   of machine objects (`id`, `name`, `state`, `region`, `image_ref`,
//!   `instance_id`, `private_ip`, `created_at`, `updated_at`, `config`, `events`,
//!   `host_status`), destroyed machines left out unless `include_deleted=true`.
//! - `GET /v1/apps/{app}/machines/{id}`: 200, the machine object.
//! - `POST /v1/apps/{app}/machines/{id}/start`: from `stopped`, `suspended` or
//!   `created`, 200 `{"previous_state": "stopped", "migrated": false,
//!   "new_host": ""}` at once, the machine `starting`; the machine's `on_start`
//!   runs (on a blocking thread) and the machine is `started` once it returned
//!   (`failed` if it panicked). On a `started` (or `starting`) machine: 200 with
//!   that `previous_state` and nothing else happens, as the API answers. From any
//!   other state (`stopping`, `destroyed`, ...): 412 `{"error":
//!   "failed_precondition: unable to start machine from current state:
//!   'stopping'"}`.
//! - `GET /v1/apps/{app}/machines/{id}/wait?state=started&timeout=N`
//!   (`state` may repeat, default `started`; `timeout` in seconds, default 60,
//!   1 to 60 else 400 `invalid_argument: ...`; `instance_id`/`version` accepted
//!   and ignored): 200 `{"ok": true}` once the machine is in one of the states,
//!   else at the timeout 408 `{"error": "deadline_exceeded: machine failed to
//!   reach desired state, started, currently starting"}`.
//!
//! Every request must carry `Authorization: Bearer <token>` or `FlyV1 <token>`
//! (schemes stripped as fly-go's `StripAuthorizationScheme` does), else 401
//! `{"error": "Authenticate: token validation error"}`. An unknown app: 404
//! `{"error": "app not found"}`; an unknown machine: 404 `{"error": "machine not
//! found"}`; an unknown path: 404 `404 page not found` (text, as Go's mux); a
//! known path with another method: 405. Errors are JSON `{"error": "..."}`, as
//! fly-go's `handleAPIError` reads them.
//!
//! Machines stop by themselves, not through the API: the test says so with
//! [`FlyApi::set_state`], or [`FlyApi::on_exit`] watches for it. Faults:
//! [`FlyApi::fail_start`] (the next start answers an error),
//! [`FlyApi::never_start`] (the next start leaves the machine `starting`).
//! Every request is recorded ([`FlyApi::requests`]) without the token's value.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::hub::hex;

/// The region every machine is in.
pub const REGION: &str = "ams";

/// The states a machine can be in, as the API names them.
pub const STATES: &[&str] = &[
    "created",
    "starting",
    "started",
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "restarting",
    "updating",
    "replacing",
    "destroying",
    "destroyed",
    "failed",
    "launch_failed",
];

/// The states `/wait` accepts.
const WAIT_STATES: &[&str] = &["started", "stopped", "suspended", "destroyed"];

/// How often a `/wait` looks at the machine again.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// One request the server answered. The token is never kept, only whether an
/// `Authorization` header came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization_present: bool,
    pub status: u16,
}

type OnStart = Arc<dyn Fn() + Send + Sync>;

struct Machine {
    id: String,
    name: String,
    state: String,
    instance_id: String,
    private_ip: String,
    created_at: String,
    updated_at: String,
    /// Newest first, as the API lists them.
    events: Vec<Value>,
    on_start: OnStart,
    /// Authorized `POST .../start` requests for this machine, whatever the answer.
    starts: usize,
    /// Times `on_start` was called.
    boots: usize,
    /// The next start's answer, when spoiled.
    fail_next: Option<(u16, String)>,
    /// The next start leaves the machine `starting`.
    never_next: bool,
    /// Bumped on every state change, so a boot finishing late does not undo a
    /// state the test set meanwhile.
    generation: u64,
    /// When the last start request arrived, and when the machine last became
    /// `started` (for the benches' phases).
    last_start: Option<Instant>,
    last_started: Option<Instant>,
}

impl Machine {
    fn set(&mut self, state: &str, event: &str, source: &str) {
        if state == "started" {
            self.last_started = Some(Instant::now());
        }
        self.state = state.to_string();
        self.updated_at = rfc3339_now();
        self.generation += 1;
        self.events.insert(
            0,
            json!({
                "type": event,
                "status": state,
                "source": source,
                "timestamp": millis_now(),
            }),
        );
        self.events.truncate(10);
    }

    fn json(&self, app: &str) -> Value {
        let digest = hex(&Sha256::digest(format!("image of {app}")));
        let tag = format!("deployment-01{}", &digest[..24].to_uppercase());
        json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": REGION,
            "image_ref": {
                "registry": "registry.fly.io",
                "repository": app,
                "tag": tag,
                "digest": format!("sha256:{digest}"),
                "labels": {},
            },
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "config": {
                "image": format!("registry.fly.io/{app}:{tag}"),
                "env": {},
                "init": {},
                "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 1024 },
                "restart": { "policy": "on-failure", "max_retries": 10 },
            },
            "events": self.events,
            "host_status": "ok",
        })
    }
}

struct State {
    app: String,
    token: String,
    machines: Vec<Machine>,
    served: Vec<Served>,
    /// Set when the server is dropped: [`FlyApi::on_exit`] watchers end.
    closed: bool,
}

impl State {
    fn machine(&mut self, id: &str) -> Option<&mut Machine> {
        self.machines.iter_mut().find(|m| m.id == id)
    }

    fn expect(&mut self, id: &str) -> &mut Machine {
        self.machine(id)
            .unwrap_or_else(|| panic!("the test Fly API has no machine {id}"))
    }
}

/// The running server. Dropping it stops it.
pub struct FlyApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FlyApi {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap().closed = true;
    }
}

impl FlyApi {
    /// A server for the app `app`, answering requests that carry `token`.
    pub async fn start(app: &str, token: &str) -> FlyApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test Fly API");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            app: app.to_string(),
            token: token.to_string(),
            machines: Vec::new(),
            served: Vec::new(),
            closed: false,
        }));
        let task = tokio::spawn(serve(listener, state.clone()));
        FlyApi { addr, state, task }
    }

    /// The `FLY_API_HOSTNAME` to give a client: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The app's name.
    pub fn app(&self) -> String {
        self.state.lock().unwrap().app.clone()
    }

    /// A new machine in `state` (one of [`STATES`]); `on_start` is called each
    /// time a start takes it from `stopped`, `suspended` or `created` to
    /// `starting`, on a blocking thread, and the machine is `started` once it
    /// returned. Returns its id (14 hex digits).
    pub fn add_machine(&self, state: &str, on_start: impl Fn() + Send + Sync + 'static) -> String {
        assert!(STATES.contains(&state), "not a machine state: {state:?}");
        let mut st = self.state.lock().unwrap();
        let n = st.machines.len() + 1;
        let seed = hex(&Sha256::digest(format!("{}/machine/{n}", st.app)));
        let id = seed[..14].to_string();
        let now = rfc3339_now();
        let mut machine = Machine {
            name: format!("{}-node-{n}", st.app),
            state: state.to_string(),
            instance_id: format!("01{}", seed[14..38].to_uppercase()),
            private_ip: format!(
                "fdaa:0:1:a7b:{}:{}:{}:2",
                &seed[38..41],
                &seed[41..45],
                &seed[45..49]
            ),
            created_at: now.clone(),
            updated_at: now,
            events: Vec::new(),
            on_start: Arc::new(on_start),
            starts: 0,
            boots: 0,
            fail_next: None,
            never_next: false,
            generation: 0,
            last_start: None,
            last_started: None,
            id: id.clone(),
        };
        machine.events.insert(
            0,
            json!({
                "type": "launch",
                "status": "created",
                "source": "user",
                "timestamp": millis_now(),
            }),
        );
        st.machines.push(machine);
        id
    }

    /// Puts the machine in `state` (one of [`STATES`]), as the platform does when
    /// its process exits (`stopped`). A boot under way no longer ends in `started`.
    pub fn set_state(&self, id: &str, state: &str) {
        assert!(STATES.contains(&state), "not a machine state: {state:?}");
        let event = if state == "stopped" { "exit" } else { state };
        self.state
            .lock()
            .unwrap()
            .expect(id)
            .set(state, event, "flyd");
    }

    /// The machine's state now.
    pub fn state(&self, id: &str) -> String {
        self.state.lock().unwrap().expect(id).state.clone()
    }

    /// The machine object, as `GET /v1/apps/{app}/machines/{id}` answers it.
    pub fn machine_json(&self, id: &str) -> Value {
        let mut st = self.state.lock().unwrap();
        let app = st.app.clone();
        st.expect(id).json(&app)
    }

    /// The authorized `POST .../start` requests that reached this machine,
    /// whatever they were answered.
    pub fn starts(&self, id: &str) -> usize {
        self.state.lock().unwrap().expect(id).starts
    }

    /// How many times the machine's `on_start` was called.
    pub fn boots(&self, id: &str) -> usize {
        self.state.lock().unwrap().expect(id).boots
    }

    /// The next start of this machine answers `status` with `{"error": message}`,
    /// and nothing happens to the machine. The API's own words, for realism:
    /// 412 `failed_precondition: machine still active, refusing to start`, 422
    /// `insufficient resources ...`, 500, 503.
    pub fn fail_start(&self, id: &str, status: u16, message: &str) {
        self.state.lock().unwrap().expect(id).fail_next = Some((status, message.to_string()));
    }

    /// The next start of this machine is answered 200 and leaves it `starting`
    /// for good: `on_start` is not called, a `/wait` for `started` times out
    /// (408). [`FlyApi::set_state`] moves it on.
    pub fn never_start(&self, id: &str) {
        self.state.lock().unwrap().expect(id).never_next = true;
    }

    /// Watches the machine: whenever it is `started` and `exited()` says its
    /// process has exited (polled every 20 ms, without the server's lock), it
    /// becomes `stopped`, as a Fly machine does when its process exits. Runs
    /// until the server is dropped, across any number of starts.
    pub fn on_exit(&self, id: &str, exited: impl Fn() -> bool + Send + 'static) {
        self.state.lock().unwrap().expect(id);
        let state = self.state.clone();
        let id = id.to_string();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(20));
            let running = {
                let mut st = state.lock().unwrap();
                if st.closed {
                    return;
                }
                st.expect(&id).state == "started"
            };
            if running && exited() {
                let mut st = state.lock().unwrap();
                let machine = st.expect(&id);
                if machine.state == "started" {
                    machine.set("stopped", "exit", "flyd");
                }
            }
        });
    }

    /// Waits until the machine is in `state`, at most `within`; whether it got
    /// there.
    pub async fn wait_state(&self, id: &str, state: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.state(id) == state {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// When the machine's last start request arrived and when it last became
    /// `started` after it; `None` before a start got it running.
    pub fn last_start_times(&self, id: &str) -> Option<(Instant, Instant)> {
        let mut st = self.state.lock().unwrap();
        let machine = st.expect(id);
        let (asked, started) = (machine.last_start?, machine.last_started?);
        (started >= asked).then_some((asked, started))
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Served> {
        self.state.lock().unwrap().served.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().served.clear();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: &Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let response = route(state, &method, &path, &query, authorization.as_deref()).await;
    state.lock().unwrap().served.push(Served {
        method: method.to_string(),
        path,
        query,
        authorization_present: authorization.is_some(),
        status: response.status().as_u16(),
    });
    response
}

/// Which endpoint a path is.
enum Endpoint {
    List,
    Get(String),
    Start(String),
    Wait(String),
}

async fn route(
    state: &Arc<Mutex<State>>,
    method: &Method,
    path: &str,
    query: &str,
    authorization: Option<&str>,
) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let (app, endpoint, allowed) = match segments.as_slice() {
        ["", "v1", "apps", app, "machines"] => (*app, Endpoint::List, Method::GET),
        ["", "v1", "apps", app, "machines", id] => {
            (*app, Endpoint::Get(id.to_string()), Method::GET)
        }
        ["", "v1", "apps", app, "machines", id, "start"] => {
            (*app, Endpoint::Start(id.to_string()), Method::POST)
        }
        ["", "v1", "apps", app, "machines", id, "wait"] => {
            (*app, Endpoint::Wait(id.to_string()), Method::GET)
        }
        _ => return text(404, "404 page not found\n"),
    };
    if *method != allowed {
        let mut response = text(405, "Method Not Allowed\n");
        response
            .headers_mut()
            .insert("allow", allowed.as_str().parse().unwrap());
        return response;
    }
    {
        let st = state.lock().unwrap();
        if !authorized(authorization, &st.token) {
            return error(401, "Authenticate: token validation error");
        }
        if app != st.app {
            return error(404, "app not found");
        }
    }
    let params = parse_query(query);
    match endpoint {
        Endpoint::List => list(state, &params),
        Endpoint::Get(id) => {
            let mut st = state.lock().unwrap();
            let app = st.app.clone();
            match st.machine(&id) {
                Some(machine) => ok(machine.json(&app)),
                None => error(404, "machine not found"),
            }
        }
        Endpoint::Start(id) => start(state, &id),
        Endpoint::Wait(id) => wait(state, &id, &params).await,
    }
}

/// `Authorization` with the token, behind `Bearer` or `FlyV1` (either, both, in
/// any order, as fly-go's `StripAuthorizationScheme` allows); a bare token is
/// not accepted.
fn authorized(header: Option<&str>, token: &str) -> bool {
    let Some(header) = header else {
        return false;
    };
    let (given, had_scheme) = strip_schemes(header);
    let (expected, _) = strip_schemes(token);
    had_scheme && !given.is_empty() && given == expected
}

fn strip_schemes(mut value: &str) -> (&str, bool) {
    let mut stripped = false;
    loop {
        let trimmed = value.trim_start();
        let rest = ["Bearer ", "FlyV1 "].iter().find_map(|scheme| {
            trimmed
                .get(..scheme.len())
                .filter(|head| head.eq_ignore_ascii_case(scheme))
                .map(|_| &trimmed[scheme.len()..])
        });
        match rest {
            Some(rest) => {
                value = rest;
                stripped = true;
            }
            None => return (trimmed.trim_end(), stripped),
        }
    }
}

fn list(state: &Arc<Mutex<State>>, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let include_deleted = param(params, "include_deleted").is_some_and(|v| v == "true" || v == "1");
    let region = param(params, "region");
    let st = state.lock().unwrap();
    let machines: Vec<Value> = st
        .machines
        .iter()
        .filter(|m| include_deleted || m.state != "destroyed")
        .filter(|_| region.is_none_or(|r| r == REGION))
        .map(|m| m.json(&st.app))
        .collect();
    ok(Value::Array(machines))
}

fn start(state: &Arc<Mutex<State>>, id: &str) -> Response<Full<Bytes>> {
    let mut st = state.lock().unwrap();
    let Some(machine) = st.machine(id) else {
        return error(404, "machine not found");
    };
    machine.starts += 1;
    machine.last_start = Some(Instant::now());
    if let Some((status, message)) = machine.fail_next.take() {
        return error(status, &message);
    }
    let previous = machine.state.clone();
    match previous.as_str() {
        "stopped" | "suspended" | "created" => {
            machine.set("starting", "start", "user");
            if machine.never_next {
                machine.never_next = false;
            } else {
                machine.boots += 1;
                let on_start = machine.on_start.clone();
                let generation = machine.generation;
                tokio::spawn(boot(state.clone(), id.to_string(), generation, on_start));
            }
        }
        // Already running (or on its way): the API answers 200 and does nothing.
        "started" | "starting" => {}
        other => {
            return error(
                412,
                &format!(
                    "failed_precondition: unable to start machine from current state: '{other}'"
                ),
            );
        }
    }
    ok(json!({ "previous_state": previous, "migrated": false, "new_host": "" }))
}

/// Runs the machine's `on_start` off the runtime, then marks it `started`
/// (`failed` if it panicked), unless its state changed meanwhile.
async fn boot(state: Arc<Mutex<State>>, id: String, generation: u64, on_start: OnStart) {
    let result = tokio::task::spawn_blocking(move || on_start()).await;
    let mut st = state.lock().unwrap();
    let Some(machine) = st.machine(&id) else {
        return;
    };
    if machine.generation != generation || machine.state != "starting" {
        return;
    }
    match result {
        Ok(()) => machine.set("started", "start", "flyd"),
        Err(e) => {
            eprintln!("test Fly API: machine {id}'s on_start failed: {e}");
            machine.set("failed", "start", "flyd");
        }
    }
}

async fn wait(
    state: &Arc<Mutex<State>>,
    id: &str,
    params: &[(String, String)],
) -> Response<Full<Bytes>> {
    let mut wanted: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "state")
        .map(|(_, v)| v.as_str())
        .collect();
    if wanted.is_empty() {
        wanted.push("started");
    }
    if let Some(bad) = wanted.iter().find(|s| !WAIT_STATES.contains(s)) {
        return error(
            400,
            &format!("invalid_argument: invalid WaitMachineRequest.State: {bad:?} is not one of started, stopped, suspended, destroyed"),
        );
    }
    let timeout = match param(params, "timeout").map(str::parse::<u64>) {
        None => 60,
        Some(Ok(seconds)) if (1..=60).contains(&seconds) => seconds,
        Some(_) => {
            return error(
                400,
                "invalid_argument: invalid WaitMachineRequest.Timeout: value must be inside range [1s, 1m0s]",
            );
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let current = {
            let mut st = state.lock().unwrap();
            match st.machine(id) {
                Some(machine) => machine.state.clone(),
                None => return error(404, "machine not found"),
            }
        };
        if wanted.contains(&current.as_str()) {
            return ok(json!({ "ok": true }));
        }
        if tokio::time::Instant::now() >= deadline {
            return error(
                408,
                &format!(
                    "deadline_exceeded: machine failed to reach desired state, {}, currently {current}",
                    wanted.join(", ")
                ),
            );
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_at = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex_at(i + 1), hex_at(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi << 4 | lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ok(value: Value) -> Response<Full<Bytes>> {
    json_response(200, &value)
}

/// The API's error shape: `{"error": "..."}`.
fn error(status: u16, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn json_response(status: u16, value: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("an HTTP status"))
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

fn text(status: u16, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now as the API writes times: `2023-10-31T02:30:10Z`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// A `harness serve` of the demo model running as `api`'s machine, as Fly runs
/// one: its machine id in `FLY_MACHINE_ID`, `settings` besides (an idle
/// shutdown, say); the machine's start restarts it on the same ports (and
/// returns once it is ready), and its exit stops the machine.
pub struct NodeOnMachine {
    pub machine: String,
    /// `127.0.0.1:<port>` of its cluster listener.
    pub cluster: String,
    node: Arc<Mutex<Option<super::node::ServeProcess>>>,
}

impl NodeOnMachine {
    pub fn start(api: &FlyApi, cookie: &str, settings: &[(&str, &str)]) -> NodeOnMachine {
        let node: Arc<Mutex<Option<super::node::ServeProcess>>> = Arc::default();
        let machine = {
            let node = node.clone();
            api.add_machine("started", move || {
                node.lock().unwrap().as_mut().expect("the node").restart()
            })
        };
        let http = format!("127.0.0.1:{}", super::node::free_port());
        let mut all = vec![
            ("FLY_MACHINE_ID", machine.as_str()),
            ("HARNESS_HTTP_ADDR", &http),
        ];
        all.extend_from_slice(settings);
        let process = super::node::ServeProcess::start(cookie, "default", &all);
        let cluster = process.cluster.clone();
        *node.lock().unwrap() = Some(process);
        {
            let node = node.clone();
            api.on_exit(&machine, move || {
                let mut node = node.lock().unwrap();
                let node = node.as_mut().expect("the node");
                node.child.try_wait().unwrap().is_some()
            });
        }
        NodeOnMachine {
            machine,
            cluster,
            node,
        }
    }

    /// `127.0.0.1:<port>` of its HTTP listener.
    pub fn http_addr(&self) -> String {
        self.node.lock().unwrap().as_ref().unwrap().http_addr()
    }

    /// Waits until the node has exited by itself (within 30 s) and the API shows
    /// its machine stopped; its exit status.
    pub async fn wait_stopped(&self, api: &FlyApi) -> std::process::ExitStatus {
        let node = self.node.clone();
        let (status, _) = tokio::task::spawn_blocking(move || {
            let mut node = node.lock().unwrap();
            node.as_mut().unwrap().wait_exit(Duration::from_secs(30))
        })
        .await
        .unwrap();
        assert!(
            api.wait_state(&self.machine, "stopped", Duration::from_secs(5))
                .await,
            "the machine did not stop"
        );
        status
    }
}
