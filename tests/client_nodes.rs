//! harness-client against real `harness serve` processes over TCP: the message
//! limit on every kind of call, nodes that are down at start and come later, a
//! wrong cookie told from an address that is no Harness node, and a client
//! attached to an application's own ractor node.

use std::time::{Duration, Instant};

use harness_client::{
    serving_group, ClientConfig, ClientError, HarnessClient, Payload, ServingMessage,
    StatusRequest, WireTensor, PROTOCOL_VERSION,
};
use ractor::Actor;

mod support;

use support::node::{free_port, ServeProcess};

const COOKIE: &str = "a-client-nodes-test-cookie";

use support::client::ONE_CLIENT_AT_A_TIME;

fn config(serving: &str, nodes: &[&str], cookie: &str) -> ClientConfig {
    let mut config = ClientConfig::new(nodes.iter().map(|n| n.to_string()).collect(), cookie);
    config.serving = serving.to_string();
    config.default_deadline = Duration::from_secs(10);
    config
}

fn item() -> Vec<WireTensor> {
    vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])]
}

/// Starts a node off the test's async threads (it blocks until ready).
async fn start(serving: &str, extra: &[(&str, &str)]) -> ServeProcess {
    let serving = serving.to_string();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ServeProcess::start(COOKIE, &serving, &extra)
    })
    .await
    .unwrap()
}

async fn members_become(serving: &str, count: usize, within: Duration) {
    let started = Instant::now();
    while ractor::pg::get_members(&serving_group(serving)).len() != count {
        assert!(
            started.elapsed() < within,
            "{} member(s) of {serving}, not {count}, after {within:?}",
            ractor::pg::get_members(&serving_group(serving)).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_call_is_held_to_the_message_limit_before_sending() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "limit_every_kind";
    let node = start(serving, &[("HARNESS_MAX_MESSAGE_BYTES", "100000")]).await;
    let mut config = config(serving, &[&node.cluster], COOKIE);
    config.max_message_bytes = 100_000;
    let client = HarnessClient::connect(config).await.expect("connects");

    // A 200 kB text: refused at once, not sent (the node would drop the session).
    let started = Instant::now();
    let err = client
        .embed(vec!["x".repeat(200_000)], Some(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::TooLarge { bytes, limit: 100_000 } if bytes > 200_000),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("HARNESS_MAX_MESSAGE_BYTES"),
        "{err}"
    );
    // So is a Run of the same size, and the session lives on for calls that fit.
    let big = vec![0.5f32; 4 * 10_000];
    let err = client
        .run(vec![WireTensor::from_f32(&[10_000, 4], &big)], None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err}");
    client
        .run(item(), None)
        .await
        .expect("the session lives on");
    let status = client.status(None).await.expect("a status");
    assert_eq!(status.phase, "ready");
    assert_eq!(status.protocol_version, PROTOCOL_VERSION);
    assert_eq!(status.server_version, env!("CARGO_PKG_VERSION"));
    let model = status.model.expect("the model");
    assert_eq!(model.revision, "local");
    assert_eq!(status.in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_does_not_stop_the_client_and_joins_when_it_starts() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "down_then_up";
    let up = start(serving, &[]).await;
    let down = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let client = HarnessClient::connect(config(serving, &[&down, &up.cluster], COOKIE))
        .await
        .expect("connects to what answers");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..3 {
        client
            .run(item(), None)
            .await
            .expect("served by the node that is up");
    }
    members_become(serving, 1, Duration::from_secs(5)).await;

    // The node on the down address starts: the client connects it by itself.
    let _later = start(serving, &[("HARNESS_CLUSTER_ADDR", &down)]).await;
    members_become(serving, 2, Duration::from_secs(20)).await;
    for _ in 0..5 {
        client.run(item(), None).await.expect("served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_node_that_starts_later_is_answered_within_its_deadline() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "starts_later";
    let addr = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let client = HarnessClient::connect(config(serving, &[&addr], COOKIE))
        .await
        .expect("no node answering is not an error");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Meanwhile a call ends at its deadline, saying which node is unreachable and why.
    let err = client
        .run(item(), Some(Duration::from_millis(800)))
        .await
        .unwrap_err();
    match &err {
        ClientError::Deadline {
            last: Some(last), ..
        } => {
            assert!(
                last.contains(&addr) && last.contains("unreachable"),
                "{last}"
            )
        }
        other => panic!("expected Deadline, got {other}"),
    }

    // The node starts a few seconds later; a call already waiting is answered.
    let node_addr = addr.clone();
    let node = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        start(serving, &[("HARNESS_CLUSTER_ADDR", &node_addr)]).await
    });
    let answer = client.run(item(), Some(Duration::from_secs(60))).await;
    let _node = node.await.unwrap();
    assert_eq!(
        answer.expect("answered once the node started")[0].shape,
        vec![1, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cookie_is_refused_and_a_port_that_is_no_harness_node_is_told_apart() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "refusals";
    let node = start(serving, &[]).await;

    // A real node, the wrong cookie: refused at once, in a sentence.
    let started = Instant::now();
    let err = HarnessClient::connect(config(serving, &[&node.cluster], "not-the-cookie"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        format!("{err:?}"),
        err.to_string(),
        "Debug reads as Display"
    );
    assert!(err.to_string().contains("HARNESS_COOKIE"), "{err}");
    // With a node down beside it, still refused (every node that answered refused).
    let down = format!("127.0.0.1:{}", free_port());
    let err = HarnessClient::connect(config(serving, &[&down, &node.cluster], "not-the-cookie"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");

    // The node's HTTP port answers HTTP, not ractor_cluster: no cookie talk.
    let http = format!("127.0.0.1:{}", node.http);
    let err = HarnessClient::connect(config(serving, &[&http], COOKIE))
        .await
        .err()
        .expect("not a Harness node");
    assert!(matches!(err, ClientError::NotHarness { .. }), "{err}");
    let text = err.to_string();
    assert!(!text.contains("cookie"), "{text}");
    assert!(
        text.contains("not a Harness cluster port") && text.contains("HTTP"),
        "{text}"
    );

    // A TCP server that closes at once.
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closer_addr = closer.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in closer.incoming() {
            drop(stream);
        }
    });
    let err = HarnessClient::connect(config(serving, &[&closer_addr], COOKIE))
        .await
        .err()
        .expect("not a Harness node");
    assert!(matches!(err, ClientError::NotHarness { .. }), "{err}");
    assert!(
        err.to_string().contains("before any handshake frame"),
        "{err}"
    );

    // And the right cookie still works.
    let client = HarnessClient::connect(config(serving, &[&node.cluster], COOKIE))
        .await
        .unwrap();
    client.run(item(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_attached_to_the_applications_node_leaves_it_undisturbed() {
    let _turn = ONE_CLIENT_AT_A_TIME.lock().await;
    let serving = "attached";
    let node = start(serving, &[]).await;

    // The application's own node, with its own session to the Harness node.
    let app = ractor_cluster::NodeServer::new(
        0,
        COOKIE.to_string(),
        "the-application".to_string(),
        "localhost".to_string(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
    let (app, _) = Actor::spawn(None, app, ()).await.unwrap();
    ractor_cluster::client_connect(&app, node.cluster.as_str())
        .await
        .unwrap();
    members_become(serving, 1, Duration::from_secs(10)).await;

    let client = HarnessClient::attach(app.clone(), config(serving, &[&node.cluster], COOKIE))
        .await
        .expect("attaches");
    for _ in 0..3 {
        client
            .run(item(), None)
            .await
            .expect("served through the application's node");
    }
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.get_status(), ractor::ActorStatus::Running);
    members_become(serving, 1, Duration::from_secs(1)).await;
    let sessions =
        ractor::call_t!(app, ractor_cluster::NodeServerMessage::GetSessions, 1_000).unwrap();
    assert_eq!(
        sessions.len(),
        1,
        "the application's one session, as it was"
    );

    // Plain ractor through the application's node still answers.
    let member = ractor::pg::get_members(&serving_group(serving))
        .pop()
        .unwrap();
    let serving_ref = ractor::ActorRef::<ServingMessage>::from(member);
    let request = StatusRequest {
        version: PROTOCOL_VERSION,
    };
    let Payload(status) = ractor::call_t!(
        serving_ref,
        ServingMessage::Status,
        5_000,
        Payload::new(request)
    )
    .unwrap();
    assert_eq!(status.unwrap().phase, "ready");
    app.stop(None);
}
