//! The serving's whole life in-process: the supervisor, the DelayedServing actor,
//! the batcher, a real traced model fetched from the test hub.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::node::Node;
use harness::serving::Phase;
use harness_client::{serving_group, ServingError, ServingMessage, WireTensor, PROTOCOL_VERSION};
use harness_client::{Payload, RunReply, RunRequest};
use ractor::ActorRef;
use support::model_repo::ModelRepo;
use support::models::input;
use support::serving::{inject_crash, run, start_ready};

const REPO: &str = "acme/affine";

fn wire(x: &tch::Tensor) -> WireTensor {
    let values = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
    WireTensor::from_f32(&x.size(), &values)
}

fn assert_rows(got: &[WireTensor], want: &tch::Tensor) {
    let values = got[0].to_f32().expect("f32 output");
    let want_values = Vec::<f32>::try_from(want.flatten(0, -1)).unwrap();
    assert_eq!(got[0].shape, want.size());
    for (g, w) in values.iter().zip(&want_values) {
        assert!((g - w).abs() < 1e-5, "{values:?} vs {want_values:?}");
    }
}

/// `n` callers at once, each sending one item of its own; each answers with its
/// reply and its input.
fn spawn_callers(
    serving: &ActorRef<ServingMessage>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(RunReply, tch::Tensor)>> {
    (0..n)
        .map(|i| {
            let serving = serving.clone();
            tokio::spawn(async move {
                let x = input(1, i as f64);
                (run(&serving, vec![wire(&x)], 10_000).await, x)
            })
        })
        .collect()
}

/// A node in this process serving the affine model from `published`, ready; the
/// node and its serving.
async fn ready_node(
    published: &ModelRepo,
    name: &str,
    extra: &[&str],
) -> (Node, ActorRef<ServingMessage>) {
    start_ready(published.node_config(name, extra), Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_life_from_the_hub_to_an_answer() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) =
        ready_node(&published, "the_whole_life_from_the_hub_to_an_answer", &[]).await;
    assert_eq!(
        node.shared().history(),
        [
            Phase::Starting,
            Phase::Downloading,
            Phase::Loading,
            Phase::Warming,
            Phase::Ready
        ]
    );
    let members =
        ractor::pg::get_members(&serving_group("the_whole_life_from_the_hub_to_an_answer"));
    assert_eq!(
        members.iter().map(|m| m.get_id()).collect::<Vec<_>>(),
        vec![serving.get_id()],
        "in the group when ready"
    );

    let x = input(3, 0.25);
    let out = run(&serving, vec![wire(&x)], 5_000)
        .await
        .expect("a result");
    assert_rows(&out, &model.apply(&x)[0]);

    let status = support::serving::status(&serving).await;
    assert_eq!(
        (
            status.phase.as_str(),
            status.device.as_deref(),
            status.restarts
        ),
        ("ready", Some("cpu"), 0)
    );
    assert_eq!(node.shutdown(Duration::from_secs(5)).await, 0);
    assert!(
        ractor::pg::get_members(&serving_group("the_whole_life_from_the_hub_to_an_answer"))
            .is_empty(),
        "left the group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn before_ready_requests_are_answered_not_ready_at_once() {
    let (published, _model) = ModelRepo::affine(REPO).await;
    // A stalled download keeps the serving in `downloading`.
    published.hub.fault(
        support::hub::On::Download,
        support::hub::Fault::Stall { after: 100 },
    );
    let node = Node::start(
        published.node_config("before_ready_requests_are_answered_not_ready_at_once", &[]),
    )
    .await
    .unwrap();
    let mut serving = node.serving().await;
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while serving.is_none() || node.shared().phase().phase != Phase::Downloading {
        assert!(
            std::time::Instant::now() < until,
            "never downloading: {:?}",
            node.shared().phase()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        serving = node.serving().await;
    }
    let err = run(&serving.unwrap(), vec![wire(&input(1, 0.0))], 1_000)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ServingError::NotReady {
            phase: "downloading".to_string()
        }
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_rule_answers_bad_input_and_the_serving_stays_ready() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "every_bad_input_rule_answers_bad_input_and_the_serving_stays_ready",
        &[],
    )
    .await;
    let good = wire(&input(2, 0.0));
    let cases: Vec<(Vec<WireTensor>, &str)> = vec![
        (vec![], "no input tensors"),
        (vec![good.clone(), good.clone()], "takes 1 input"),
        (
            vec![WireTensor {
                shape: vec![2, -4],
                ..good.clone()
            }],
            "negative dimension",
        ),
        (
            vec![WireTensor {
                shape: vec![2, 5],
                ..good.clone()
            }],
            "needs 40 bytes",
        ),
        (
            vec![WireTensor {
                shape: vec![],
                data: vec![0; 4],
                ..good.clone()
            }],
            "scalar",
        ),
        (
            vec![WireTensor::from_f32(&[2, 5], &[0.0; 10])],
            "wrong input shape",
        ),
        (
            vec![WireTensor::from_i64(&[2, 4], &[0; 8])],
            "takes F32 items of shape [4]",
        ),
        // No item dimension: once the batcher read it as 4 items and the model's
        // output as theirs, answering Model (the chaos suite's proptest found it).
        (vec![WireTensor::from_f32(&[4], &[0.0; 4])], "so [N, 4]"),
    ];
    for (inputs, says) in cases {
        match run(&serving, inputs, 5_000).await {
            Err(ServingError::BadInput { reason }) => {
                assert!(reason.contains(says), "{says}: {reason}")
            }
            other => panic!("{says}: {other:?}"),
        }
    }
    // Another protocol version, a zero budget, and a frame that does not decode.
    let old = RunRequest {
        version: PROTOCOL_VERSION + 1,
        inputs: vec![good.clone()],
        timeout_ms: 100,
    };
    let reply = serving
        .call(|port| ServingMessage::Run(Payload::new(old), port), None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reply.0.unwrap(), Err(ServingError::BadInput { reason }) if reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)))
    );
    assert!(matches!(
        run(&serving, vec![good.clone()], 0).await,
        Err(ServingError::BadInput { .. })
    ));
    let garbage =
        Payload::<RunRequest>(Err("cannot decode the message: unexpected end".to_string()));
    let reply = serving
        .call(|port| ServingMessage::Run(garbage, port), None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reply.0.unwrap(), Err(ServingError::BadInput { reason }) if reason.contains("cannot decode"))
    );

    let x = input(2, 1.0);
    assert_rows(
        &run(&serving, vec![wire(&x)], 5_000).await.unwrap(),
        &model.apply(&x)[0],
    );
    assert_eq!(node.shared().phase().phase, Phase::Ready);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_share_forwards_through_the_actor() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "concurrent_callers_share_forwards_through_the_actor",
        &["--max-batch-size=16", "--max-batch-delay-ms=30"],
    )
    .await;
    let stats = node.shared().engine_stats().unwrap();
    let before = stats.forwards.load(Ordering::Relaxed);
    let callers = spawn_callers(&serving, 48);
    for caller in callers {
        let (out, x) = caller.await.unwrap();
        assert_rows(&out.unwrap(), &model.apply(&x)[0]);
    }
    let forwards = stats.forwards.load(Ordering::Relaxed) - before;
    assert!(
        (3..48).contains(&forwards),
        "48 callers took {forwards} forwards"
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_and_deadlines_are_answered_not_run() {
    let (published, _model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "overload_and_deadlines_are_answered_not_run",
        &[
            "--max-queue=4",
            "--max-batch-delay-ms=300",
            "--max-batch-size=64",
        ],
    )
    .await;
    let queued = {
        let serving = serving.clone();
        tokio::spawn(async move { run(&serving, vec![wire(&input(4, 0.0))], 5_000).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        run(&serving, vec![wire(&input(1, 0.0))], 5_000)
            .await
            .unwrap_err(),
        ServingError::Overloaded {
            queued: 4,
            capacity: 4
        }
    );
    queued
        .await
        .unwrap()
        .expect("the queued request is answered");

    match run(&serving, vec![wire(&input(1, 0.0))], 20).await {
        Err(ServingError::DeadlineExceeded { waited_ms }) => assert!(waited_ms >= 20),
        other => panic!("{other:?}"),
    }
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_restarts_the_serving_from_the_cache() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "a_crash_restarts_the_serving_from_the_cache",
        &["--fault-injection"],
    )
    .await;
    let downloads = published.hub.count("GET", "/cdn/");
    assert_eq!(downloads, 1);

    assert_eq!(inject_crash(&serving).await, Ok(()));
    serving
        .wait(Some(Duration::from_secs(5)))
        .await
        .expect("the crashed serving is gone");
    // The supervisor hears of it and schedules the restart.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while node.shared().restarts() == 0 {
        assert!(std::time::Instant::now() < until, "no restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    node.wait_ready(Duration::from_secs(30))
        .await
        .expect("ready again");
    let again = node.serving().await.unwrap();
    assert_ne!(again.get_id(), serving.get_id(), "a new serving");
    assert_eq!(node.shared().restarts(), 1);
    assert_eq!(
        published.hub.count("GET", "/cdn/"),
        downloads,
        "the restart loaded from the cache"
    );
    let x = input(2, 3.0);
    assert_rows(
        &run(&again, vec![wire(&x)], 5_000).await.unwrap(),
        &model.apply(&x)[0],
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_injection_is_refused_unless_enabled() {
    let (published, _model) = ModelRepo::affine(REPO).await;
    let (node, serving) =
        ready_node(&published, "fault_injection_is_refused_unless_enabled", &[]).await;
    let refused = inject_crash(&serving).await.unwrap_err();
    assert!(
        matches!(&refused, ServingError::BadInput { reason } if reason.contains("HARNESS_FAULT_INJECTION")),
        "{refused:?}"
    );
    assert_eq!(node.shared().phase().phase, Phase::Ready);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_every_queued_request() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "shutdown_drains_every_queued_request",
        &["--max-batch-delay-ms=300", "--max-batch-size=64"],
    )
    .await;
    let callers = spawn_callers(&serving, 10);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(node.shared().in_flight(), 10, "all queued");
    let drained = {
        let serving = serving.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            run(&serving, vec![wire(&input(1, 0.0))], 1_000).await
        })
    };
    assert_eq!(node.shutdown(Duration::from_secs(10)).await, 0);
    for caller in callers {
        let (out, x) = caller.await.unwrap();
        assert_rows(&out.expect("answered, not dropped"), &model.apply(&x)[0]);
    }
    assert_eq!(
        drained.await.unwrap().unwrap_err(),
        ServingError::NotReady {
            phase: "draining".to_string()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_gpu_the_cuda_policy_stays_alive_and_never_ready() {
    if tch::Cuda::is_available() {
        return;
    }
    let (published, _model) = ModelRepo::affine(REPO).await;
    let node = Node::start(published.node_config(
        "without_a_gpu_the_cuda_policy_stays_alive_and_never_ready",
        &["--device=cuda"],
    ))
    .await
    .unwrap();
    let settled = node.wait_ready(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(settled.phase, Phase::NoGpu);
    let serving = node.serving().await.expect("alive");
    assert_eq!(
        run(&serving, vec![wire(&input(1, 0.0))], 1_000)
            .await
            .unwrap_err(),
        ServingError::NotReady {
            phase: "no_gpu".to_string()
        }
    );
    assert!(
        ractor::pg::get_members(&serving_group(
            "without_a_gpu_the_cuda_policy_stays_alive_and_never_ready"
        ))
        .is_empty(),
        "never in the group"
    );
    assert_eq!(published.hub.served().len(), 0, "nothing downloaded");
    node.shutdown(Duration::from_secs(1)).await;
}

/// A cached model that the disk changed is not served: a flipped byte in the
/// pinned commit's cached blob is found at load (its sha256 is its name), the blob
/// is fetched again and the answers are right; offline, a truncated blob is
/// refused naming the file, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_cached_model_is_fetched_again_or_refused_offline() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let pinned = format!("--model-revision={}", published.commit);
    let (node, _) = ready_node(&published, "corrupted_cache", &[pinned.as_str()]).await;
    node.shutdown(Duration::from_secs(1)).await;
    assert_eq!(published.hub.count("GET", "/cdn/"), 1);
    let sha = support::hub::hex(&<sha2::Sha256 as sha2::Digest>::digest(
        published.bytes("model.pt"),
    ));
    let blob = published
        .cache
        .path()
        .join("huggingface/hub/models--acme--affine/blobs")
        .join(&sha);

    // One byte flipped in the middle of the weights, the size unchanged.
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob, &bytes).unwrap();
    let (node, serving) = ready_node(&published, "corrupted_cache", &[pinned.as_str()]).await;
    assert_eq!(
        published.hub.count("GET", "/cdn/"),
        2,
        "the corrupt blob was fetched again"
    );
    assert_eq!(std::fs::read(&blob).unwrap(), published.bytes("model.pt"));
    let x = input(3, 1.0);
    assert_rows(
        &run(&serving, vec![wire(&x)], 5_000).await.unwrap(),
        &model.apply(&x)[0],
    );
    node.shutdown(Duration::from_secs(1)).await;

    // Offline, a truncated blob cannot be fetched again: refused, naming it.
    let whole = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &whole[..whole.len() - 100]).unwrap();
    let node =
        Node::start(published.node_config("corrupted_cache", &[pinned.as_str(), "--offline"]))
            .await
            .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while node.shared().phase().phase != Phase::Failed {
        assert!(
            std::time::Instant::now() < until,
            "{:?}",
            node.shared().phase()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let message = node.shared().phase().message.unwrap_or_default();
    assert!(
        message.contains("model.pt") && message.contains("failed its check"),
        "{message}"
    );
    assert_eq!(node.shared().restarts(), 0, "no restart can fix it");
    node.shutdown(Duration::from_secs(1)).await;
}

/// Batching efficiency, without timing: with a batch delay far longer than the
/// test, 64 single-item callers through the actor fill exactly two forwards of
/// 32 (a batch runs only when full), and every caller gets its own rows. A
/// serving path that held requests back, or ran them one by one, fails this.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_item_callers_through_the_actor_fill_every_forward() {
    let (published, model) = ModelRepo::affine(REPO).await;
    let (node, serving) = ready_node(
        &published,
        "single_item_callers_through_the_actor_fill_every_forward",
        &["--max-batch-size=32", "--max-batch-delay-ms=600000"],
    )
    .await;
    let stats = node.shared().engine_stats().unwrap();
    let before = stats.forwards.load(Ordering::Relaxed);
    let callers = spawn_callers(&serving, 64);
    for caller in callers {
        let (out, x) = caller.await.unwrap();
        assert_rows(&out.unwrap(), &model.apply(&x)[0]);
    }
    let forwards = stats.forwards.load(Ordering::Relaxed) - before;
    assert_eq!(forwards, 2, "64 single items in batches of 32");
    node.shutdown(Duration::from_secs(1)).await;
}
