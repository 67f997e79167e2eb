//! The test Fly Machines API itself ([`support::fly_api::FlyApi`]), held to the
//! real API's paths, shapes and answers: list, get, start (the machine's closure
//! runs once), wait, auth, not found, and its faults.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::fly_api::FlyApi;

const APP: &str = "harness-nodes";
const TOKEN: &str = "fly-test-token-do-not-print";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `method` `path` with `authorization` (none: no header); status and JSON body.
async fn call(
    api: &FlyApi,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
) -> (u16, Value) {
    let mut req = client().request(method, format!("{}{path}", api.url()));
    if let Some(auth) = authorization {
        req = req.header("authorization", auth);
    }
    let resp = req.send().await.expect("the test Fly API answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

async fn get(api: &FlyApi, path: &str) -> (u16, Value) {
    call(
        api,
        reqwest::Method::GET,
        path,
        Some(&format!("Bearer {TOKEN}")),
    )
    .await
}

async fn post(api: &FlyApi, path: &str) -> (u16, Value) {
    call(
        api,
        reqwest::Method::POST,
        path,
        Some(&format!("Bearer {TOKEN}")),
    )
    .await
}

fn machines(id: &str) -> String {
    format!("/v1/apps/{APP}/machines/{id}")
}

/// A closure that counts its calls, and the counter.
fn counter() -> (Arc<AtomicUsize>, impl Fn() + Send + Sync + 'static) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    (calls, move || {
        c.fetch_add(1, Ordering::SeqCst);
    })
}

#[tokio::test]
async fn lists_and_gets_machines_in_the_apis_shape() {
    let api = FlyApi::start(APP, TOKEN).await;
    let stopped = api.add_machine("stopped", || {});
    let started = api.add_machine("started", || {});
    let gone = api.add_machine("destroyed", || {});

    let (status, body) = get(&api, &format!("/v1/apps/{APP}/machines")).await;
    assert_eq!(status, 200, "{body}");
    let list = body.as_array().expect("an array");
    assert_eq!(list.len(), 2, "destroyed machines are left out: {body}");
    for (m, (id, state)) in list
        .iter()
        .zip([(&stopped, "stopped"), (&started, "started")])
    {
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["state"], state);
        assert_eq!(id.len(), 14);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(m["region"], "ams");
        for key in [
            "name",
            "instance_id",
            "private_ip",
            "created_at",
            "updated_at",
        ] {
            assert!(m[key].as_str().is_some_and(|v| !v.is_empty()), "{key}: {m}");
        }
        assert!(m["config"]["image"].is_string(), "{m}");
        assert!(m["image_ref"]["repository"].is_string(), "{m}");
        assert!(m["created_at"].as_str().unwrap().ends_with('Z'));
    }
    let (_, all) = get(
        &api,
        &format!("/v1/apps/{APP}/machines?include_deleted=true"),
    )
    .await;
    assert_eq!(all.as_array().unwrap().len(), 3);

    let (status, one) = get(&api, &machines(&gone)).await;
    assert_eq!(status, 200);
    assert_eq!(one["state"], "destroyed");
    assert_eq!(one, api.machine_json(&gone));
}

#[tokio::test]
async fn start_runs_the_machines_closure_once_and_wait_sees_it_started() {
    let api = FlyApi::start(APP, TOKEN).await;
    let (calls, on_start) = counter();
    let id = api.add_machine("stopped", on_start);

    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({ "previous_state": "stopped", "migrated": false, "new_host": "" })
    );
    let (status, body) = get(
        &api,
        &format!("{}/wait?state=started&timeout=5", machines(&id)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({ "ok": true }));
    assert_eq!(api.state(&id), "started");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!((api.starts(&id), api.boots(&id)), (1, 1));

    // A started machine: 200, its previous state, and nothing runs again.
    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_state"], "started");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!((api.starts(&id), api.boots(&id)), (2, 1));

    // It exits by itself; a start wakes it again.
    api.set_state(&id, "stopped");
    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(
        (status, &body["previous_state"]),
        (200, &Value::from("stopped"))
    );
    let (status, _) = get(
        &api,
        &format!("{}/wait?state=started&timeout=5", machines(&id)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_machine_is_started_only_once_its_closure_returned() {
    let api = FlyApi::start(APP, TOKEN).await;
    let id = api.add_machine("suspended", || {
        std::thread::sleep(Duration::from_millis(300))
    });
    let (status, _) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 200);
    assert_eq!(api.state(&id), "starting");
    let (_, body) = get(&api, &machines(&id)).await;
    assert_eq!(body["state"], "starting");
    let began = Instant::now();
    let (status, _) = get(
        &api,
        &format!("{}/wait?state=started&timeout=5", machines(&id)),
    )
    .await;
    assert_eq!(status, 200);
    assert!(began.elapsed() > Duration::from_millis(150));
}

#[tokio::test]
async fn on_exit_stops_the_machine_when_its_process_is_gone() {
    let api = FlyApi::start(APP, TOKEN).await;
    let exited = Arc::new(AtomicBool::new(false));
    let (calls, on_start) = counter();
    let id = api.add_machine("stopped", on_start);
    let flag = exited.clone();
    api.on_exit(&id, move || flag.load(Ordering::SeqCst));

    post(&api, &format!("{}/start", machines(&id))).await;
    assert!(api.wait_state(&id, "started", Duration::from_secs(5)).await);
    exited.store(true, Ordering::SeqCst);
    let (status, body) = get(
        &api,
        &format!("{}/wait?state=stopped&timeout=5", machines(&id)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, machine) = get(&api, &machines(&id)).await;
    assert_eq!(machine["events"][0]["type"], "exit", "{machine}");

    exited.store(false, Ordering::SeqCst);
    post(&api, &format!("{}/start", machines(&id))).await;
    assert!(api.wait_state(&id, "started", Duration::from_secs(5)).await);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_without_the_token_are_refused() {
    let api = FlyApi::start(APP, TOKEN).await;
    let (calls, on_start) = counter();
    let id = api.add_machine("stopped", on_start);
    let list = format!("/v1/apps/{APP}/machines");
    let start = format!("{}/start", machines(&id));

    for auth in [
        None,
        Some("Bearer wrong-token".to_string()),
        Some(TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ] {
        for (method, path) in [
            (reqwest::Method::GET, &list),
            (reqwest::Method::POST, &start),
        ] {
            let (status, body) = call(&api, method, path, auth.as_deref()).await;
            assert_eq!(status, 401, "{auth:?} {path}: {body}");
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{body}"
            );
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(api.starts(&id), 0);
    assert_eq!(api.state(&id), "stopped");

    for auth in [format!("Bearer {TOKEN}"), format!("FlyV1 {TOKEN}")] {
        let (status, _) = call(&api, reqwest::Method::GET, &list, Some(&auth)).await;
        assert_eq!(status, 200, "{auth}");
    }

    let served = api.requests();
    assert_eq!(served.len(), 10);
    assert!(!served[0].authorization_present);
    assert!(served[2].authorization_present);
    assert_eq!(served[0].status, 401);
    assert_eq!(served[9].status, 200);
    assert!(!format!("{served:?}").contains(TOKEN), "the token was kept");
}

#[tokio::test]
async fn unknown_apps_machines_and_paths_are_404() {
    let api = FlyApi::start(APP, TOKEN).await;
    let id = api.add_machine("stopped", || {});

    let (status, body) = get(&api, "/v1/apps/another-app/machines").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string(), "{body}");
    for (status, body) in [
        get(&api, &machines("0123456789abcd")).await,
        post(&api, &format!("{}/start", machines("0123456789abcd"))).await,
        get(
            &api,
            &format!(
                "{}/wait?state=started&timeout=1",
                machines("0123456789abcd")
            ),
        )
        .await,
    ] {
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"], "machine not found");
    }
    let (status, _) = get(&api, "/v1/nothing").await;
    assert_eq!(status, 404);
    let (status, _) = get(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn fail_start_spoils_the_next_start_only() {
    let api = FlyApi::start(APP, TOKEN).await;
    let (calls, on_start) = counter();
    let id = api.add_machine("stopped", on_start);

    api.fail_start(&id, 500, "internal: flyd unreachable");
    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        serde_json::json!({ "error": "internal: flyd unreachable" })
    );
    assert_eq!(api.state(&id), "stopped");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    api.fail_start(&id, 422, "insufficient resources to start machine");
    let (status, _) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 422);

    let (status, _) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 200);
    let (status, _) = get(
        &api,
        &format!("{}/wait?state=started&timeout=5", machines(&id)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!((api.starts(&id), api.boots(&id)), (3, 1));
}

#[tokio::test]
async fn never_start_leaves_the_machine_starting_and_wait_times_out() {
    let api = FlyApi::start(APP, TOKEN).await;
    let (calls, on_start) = counter();
    let id = api.add_machine("stopped", on_start);
    api.never_start(&id);

    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 200, "{body}");
    let began = Instant::now();
    let (status, body) = get(
        &api,
        &format!("{}/wait?state=started&timeout=1", machines(&id)),
    )
    .await;
    let waited = began.elapsed();
    assert_eq!(status, 408, "{body}");
    assert_eq!(
        body["error"],
        "deadline_exceeded: machine failed to reach desired state, started, currently starting"
    );
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(api.state(&id), "starting");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The wait's own limits, as the API's.
    for timeout in ["0", "61", "x"] {
        let (status, body) = get(
            &api,
            &format!("{}/wait?state=started&timeout={timeout}", machines(&id)),
        )
        .await;
        assert_eq!(status, 400, "{timeout}: {body}");
        assert!(body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_argument"));
    }
    // A machine on its way down cannot be started.
    api.set_state(&id, "stopping");
    let (status, body) = post(&api, &format!("{}/start", machines(&id))).await;
    assert_eq!(status, 412);
    assert_eq!(
        body["error"],
        "failed_precondition: unable to start machine from current state: 'stopping'"
    );
}
