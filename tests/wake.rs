//! Waking a stopped node from the client: a real `harness serve` that stops by
//! itself when idle, a Fly Machines API test server that starts it again when
//! asked, and clients whose calls find no serving.

mod support;

use std::time::{Duration, Instant};

use harness_client::wake::{FlyToken, WakeConfig, WakeEvent};
use harness_client::{ClientError, HarnessClient};
use support::client::{client_config, demo_item, ONE_CLIENT_AT_A_TIME};
use support::fly_api::{FlyApi, NodeOnMachine};
use support::node::free_port;

const COOKIE: &str = "wake-cookie";
const APP: &str = "harness-gpu";
const TOKEN: &str = "FlyV1 fm2_test_token_never_printed";

fn wake_config(api: &FlyApi, token: &str) -> WakeConfig {
    let mut config = WakeConfig::new(APP, FlyToken::new(token));
    config.api = api.url();
    config
}

async fn wake_client(nodes: &[&str], wake: WakeConfig) -> HarnessClient {
    let mut config = client_config(COOKIE, "default", nodes, Duration::from_secs(60));
    config.wake = Some(wake);
    HarnessClient::connect(config).await.expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_an_idle_stopped_node_starts_its_machine_once_and_is_answered() {
    let _one = ONE_CLIENT_AT_A_TIME.lock().await;
    let api = FlyApi::start(APP, TOKEN).await;
    // The node, as Fly runs it; it stops itself after 2 s ready without a call.
    let node = NodeOnMachine::start(&api, COOKIE, &[("HARNESS_IDLE_SHUTDOWN_S", "2")]);
    let (machine, cluster) = (node.machine.clone(), node.cluster.clone());
    let client = wake_client(&[&cluster], wake_config(&api, TOKEN)).await;
    let mut events = client.wake_events().expect("a client with a wake");
    let expected = client
        .run(demo_item(), None)
        .await
        .expect("a running node answers");

    // Idle: the node exits 0 by itself, and its machine is stopped.
    assert_eq!(node.wait_stopped(&api).await.code(), Some(0));

    // Sixteen calls find no serving: one wake, one start, sixteen answers.
    let started = Instant::now();
    let calls = (0..16).map(|_| client.run(demo_item(), Some(Duration::from_secs(60))));
    let answers = futures_util::future::join_all(calls).await;
    let cold = started.elapsed();
    for answer in answers {
        assert_eq!(answer.expect("answered after the wake"), expected);
    }
    assert_eq!(api.starts(&machine), 1, "{:?}", api.requests());
    assert_eq!(api.state(&machine), "started");
    eprintln!("16 calls to a stopped node answered in {cold:?}");

    // What the wake did, as an application sees it.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(
        seen.contains(&WakeEvent::Starting {
            machine: machine.clone(),
            from: "stopped".to_string()
        }),
        "{seen:?}"
    );
    assert!(
        seen.contains(&WakeEvent::Started {
            machine: machine.clone()
        }),
        "{seen:?}"
    );

    // The node says which machine it is.
    let status = reqwest::get(format!("http://{}/status", node.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["machine_id"], machine.as_str());
    drop(client);

    // The command line: `harness wake` after the next idle exit, then
    // `harness call --wake` after the one after.
    for verb in [
        vec!["wake"],
        vec!["call", "--wake", "--tensor", "1,4:0.1,0.2,0.3,0.4"],
    ] {
        assert_eq!(node.wait_stopped(&api).await.code(), Some(0));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_harness"))
            .args(&verb)
            .args(["--node", &cluster])
            .env("HARNESS_COOKIE", COOKIE)
            .env("HARNESS_FLY_APP", APP)
            .env("FLY_API_TOKEN", TOKEN)
            .env("FLY_API_HOSTNAME", api.url())
            .env("RUST_LOG", "harness_client=debug")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{verb:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "wake: starting machine {machine} (it was stopped)"
            )),
            "{verb:?}: {stderr}"
        );
        assert!(
            !stderr.contains("fm2_test_token"),
            "the token leaked: {stderr}"
        );
        match verb[0] {
            "wake" => assert!(stdout.contains("\"phase\":\"ready\""), "{stdout}"),
            _ => assert!(stdout.starts_with("[1, 3]"), "{stdout}"),
        }
    }
    assert_eq!(api.starts(&machine), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_the_call_at_once_and_never_prints() {
    let _one = ONE_CLIENT_AT_A_TIME.lock().await;
    let api = FlyApi::start(APP, TOKEN).await;
    let machine = api.add_machine("stopped", || {});
    // No node listens there: the call finds no serving and wakes.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let client = wake_client(
        &[&nowhere],
        wake_config(&api, "FlyV1 fm2_wrong_secret_value"),
    )
    .await;
    let started = Instant::now();
    let err = client
        .run(demo_item(), Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            ClientError::Wake {
                status: Some(401),
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("FLY_API_TOKEN"), "{text}");
    assert!(
        !text.contains("wrong_secret") && !text.contains("fm2_"),
        "{text}"
    );
    assert_eq!(api.starts(&machine), 0);
    assert!(!err.is_temporary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_starts_ends_in_deadline_saying_how_far_it_got() {
    let _one = ONE_CLIENT_AT_A_TIME.lock().await;
    let api = FlyApi::start(APP, TOKEN).await;
    let machine = api.add_machine("stopped", || {});
    api.never_start(&machine);
    let nowhere = format!("127.0.0.1:{}", free_port());
    let client = wake_client(&[&nowhere], wake_config(&api, TOKEN)).await;
    let (_, last) = deadline_of_a_call(&client).await;
    assert!(
        last.contains(&format!("wake: starting machine {machine}")),
        "{last}"
    );
    assert_eq!(api.starts(&machine), 1);

    // A start the API refuses is reported with its reason (and tried again
    // later: a machine mid-deploy or without capacity may start then).
    let other = FlyApi::start(APP, TOKEN).await;
    let broken = other.add_machine("stopped", || {});
    other.fail_start(&broken, 422, "machine has no image");
    drop(client);
    let client = wake_client(&[&nowhere], wake_config(&other, TOKEN)).await;
    let (err, last) = deadline_of_a_call(&client).await;
    assert!(
        last.contains(&format!("machine {broken} did not start"))
            && last.contains("machine has no image"),
        "{last}"
    );
    assert!(err.is_temporary());
}

/// A call with a 3 s deadline that finds no serving: its error, and the
/// error's `last` (how far the wake got).
async fn deadline_of_a_call(client: &HarnessClient) -> (ClientError, String) {
    let err = client
        .run(demo_item(), Some(Duration::from_secs(3)))
        .await
        .unwrap_err();
    let ClientError::Deadline {
        last: Some(last), ..
    } = &err
    else {
        panic!("{err:?}");
    };
    let last = last.clone();
    (err, last)
}
