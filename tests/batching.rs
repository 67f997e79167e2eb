//! Dynamic batching on a real traced model: shared forwards, shapes kept apart,
//! overload, deadlines, oversized requests, model errors.

mod support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::device::DeviceChoice;
use harness::engine::{BatchConfig, Collate, Engine, ForwardError, Kind, RunError, Tensor};
use support::models::{
    assert_close, input, load_affine, save_token_model, token_inputs, token_model_mean,
};

fn config(max_batch_size: usize, delay_ms: u64, max_queue: usize) -> BatchConfig {
    BatchConfig {
        max_batch_size,
        max_batch_delay: Duration::from_millis(delay_ms),
        max_queue,
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// `2x + 1`, traced: elementwise, so it serves any trailing shape.
fn elementwise_model(dir: &std::path::Path) -> PathBuf {
    let _no_grad = tch::no_grad_guard();
    let path = dir.join("elementwise.pt");
    let module =
        tch::CModule::create_by_tracing("Elementwise", "forward", &[input(2, 0.0)], &mut |xs| {
            vec![&xs[0] * 2.0 + 1.0]
        })
        .unwrap();
    module.save(&path).unwrap();
    path
}

/// Each of `inputs` run by a caller of its own, all at once; each caller answers
/// with its input and its output.
fn run_each(
    engine: &Engine,
    inputs: impl Iterator<Item = Tensor>,
) -> Vec<tokio::task::JoinHandle<(Tensor, Vec<Tensor>)>> {
    inputs
        .map(|x| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let out = engine
                    .run(vec![x.shallow_clone()], far())
                    .await
                    .expect("run");
                (x, out)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_share_forwards_and_each_gets_its_own_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path(), config(16, 50, 1024)).await;
    let callers = run_each(&engine, (0..64).map(|i| input(1, i as f64)));
    for caller in callers {
        let (x, out) = caller.await.unwrap();
        assert_close(&out[0], &model.apply(&x)[0]);
    }
    let stats = engine.stats();
    let forwards = stats.forwards.load(Ordering::Relaxed);
    assert_eq!(stats.batched_items.load(Ordering::Relaxed), 64);
    assert!(
        (4..64).contains(&forwards),
        "64 single items in batches of at most 16 took {forwards} forwards"
    );
    assert_eq!(stats.queued_items.load(Ordering::Relaxed), 0);
}

/// Requests that queue up while a forward runs longer than the batch delay are
/// batched together afterwards, not run one by one (found by the embedding
/// benchmark: a 10 ms forward and a 5 ms delay gave 1.1 items per forward).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_queue_during_a_long_forward_are_batched_together() {
    let dir = tempfile::tempdir().unwrap();
    let (_, engine) = load_affine(dir.path(), config(32, 1, 1024)).await;
    // Hold the engine thread with one large forward, and queue 32 items meanwhile.
    let large = input(8_000_000, 0.0);
    let busy = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.forward(vec![large]).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let callers: Vec<_> = (0..32)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.run(vec![input(1, i as f64)], far()).await })
        })
        .collect();
    let started = Instant::now();
    busy.await.unwrap().expect("the large forward");
    eprintln!(
        "the large forward ended {:?} after the callers queued",
        started.elapsed()
    );
    for caller in callers {
        caller.await.unwrap().expect("run");
    }
    let forwards = engine.stats().forwards.load(Ordering::Relaxed);
    // One for the large forward, and the 32 queued items in one or two batches (a
    // caller may still be on its way when the large forward ends).
    assert!(
        forwards <= 3,
        "32 queued items took {} forwards",
        forwards - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shapes_are_never_mixed_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::load(
        elementwise_model(dir.path()),
        DeviceChoice::Cpu,
        config(32, 30, 1024),
    )
    .await
    .unwrap();
    // Three trailing shapes, and a dtype of their own for some.
    let callers = run_each(
        &engine,
        (0..24).map(|i| match i % 3 {
            0 => Tensor::full([1, 4], i as f64, (Kind::Float, tch::Device::Cpu)),
            1 => Tensor::full([2, 3], i as f64, (Kind::Float, tch::Device::Cpu)),
            _ => Tensor::full([1, 4], i as f64, (Kind::Double, tch::Device::Cpu)),
        }),
    );
    for caller in callers {
        let (x, out) = caller.await.unwrap();
        assert_eq!(out[0].kind(), x.kind());
        assert_close(&out[0], &(&x * 2.0 + 1.0));
    }
    let forwards = engine.stats().forwards.load(Ordering::Relaxed);
    assert!(
        (3..24).contains(&forwards),
        "three keys, batched: {forwards} forwards"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_the_queued_are_still_answered() {
    let dir = tempfile::tempdir().unwrap();
    // A long gathering delay keeps the first requests queued.
    let (_, engine) = load_affine(dir.path(), config(100, 300, 4)).await;
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.run(vec![input(2, i as f64)], far()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let err = engine.run(vec![input(1, 9.0)], far()).await.unwrap_err();
    assert_eq!(
        err,
        RunError::Overloaded {
            queued: 4,
            capacity: 4
        }
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "refused without waiting for room"
    );
    for q in queued {
        q.await.unwrap().expect("queued requests are answered");
    }
    // Room again.
    engine
        .run(vec![input(1, 9.0)], far())
        .await
        .expect("after the queue drained");
}

#[tokio::test]
async fn a_request_whose_deadline_passes_in_the_queue_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, engine) = load_affine(dir.path(), config(100, 200, 1024)).await;
    let err = engine
        .run(
            vec![input(3, 0.0)],
            Instant::now() + Duration::from_millis(20),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RunError::DeadlineExceeded { waited } if waited >= Duration::from_millis(20)),
        "{err:?}"
    );
    assert_eq!(
        engine.stats().forwards.load(Ordering::Relaxed),
        0,
        "nothing ran"
    );
    assert_eq!(engine.stats().queued_items.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_request_larger_than_a_batch_is_split_and_put_back_together() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path(), config(4, 1, 1024)).await;
    let x = input(10, -1.0);
    let out = engine.run(vec![x.shallow_clone()], far()).await.unwrap();
    assert_close(&out[0], &model.apply(&x)[0]);
    assert_eq!(
        engine.stats().forwards.load(Ordering::Relaxed),
        3,
        "4 + 4 + 2 items"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_error_answers_its_batch_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path(), config(8, 20, 1024)).await;
    // Five features where the model takes four: torch refuses the batch.
    let bad: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .run(
                        vec![Tensor::ones([1, 5], (Kind::Float, tch::Device::Cpu))],
                        far(),
                    )
                    .await
            })
        })
        .collect();
    for b in bad {
        let err = b.await.unwrap().unwrap_err();
        assert!(
            matches!(err, RunError::Forward(ForwardError::Shape { .. })),
            "{err:?}"
        );
    }
    let x = input(2, 0.5);
    let out = engine
        .run(vec![x.shallow_clone()], far())
        .await
        .expect("still serving");
    assert_close(&out[0], &model.apply(&x)[0]);
    assert!(
        engine.failure().borrow().is_none(),
        "a model error is not an engine failure"
    );
}

#[tokio::test]
async fn inputs_must_share_a_non_zero_leading_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let (_, engine) = load_affine(dir.path(), BatchConfig::default()).await;
    for inputs in [
        vec![],
        vec![Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu))],
        vec![input(2, 0.0), input(3, 0.0)],
    ] {
        let err = engine.run(inputs, far()).await.unwrap_err();
        assert!(
            matches!(err, RunError::Forward(ForwardError::Shape { .. })),
            "{err:?}"
        );
    }
}

/// Texts of different lengths, sent at once, share padded batches and still get
/// the vector each would get alone: padding is masked out of the pooling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_requests_of_different_lengths_are_padded_per_batch_and_pooled_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let collate = Collate::Tokens {
        pad_values: vec![0, 0],
    };
    let pooler = harness::tasks::Pooler {
        mask_input: 1,
        pooling: harness::tasks::Pooling::Mean,
        normalize: false,
    };
    let engine = Engine::load_with(
        save_token_model(dir.path()),
        DeviceChoice::Cpu,
        config(32, 20, 1024),
        collate,
        Some(std::sync::Arc::new(pooler)),
    )
    .await
    .unwrap();
    let texts: Vec<Vec<i64>> = (1..=12)
        .map(|n| (0..n).map(|i| (i * 7 + n) % 49 + 1).collect())
        .collect();
    let callers: Vec<_> = texts
        .iter()
        .map(|ids| {
            let engine = engine.clone();
            let ids = ids.clone();
            tokio::spawn(
                async move { engine.run(token_inputs(&ids), far()).await.expect("pooled") },
            )
        })
        .collect();
    for (ids, caller) in texts.iter().zip(callers) {
        let out = caller.await.unwrap();
        assert_eq!(out[0].size(), vec![1, 8]);
        let got = Vec::<f32>::try_from(out[0].view([-1])).unwrap();
        for (g, w) in got.iter().zip(token_model_mean(ids)) {
            assert!((g - w).abs() < 1e-5, "{ids:?}: {got:?}");
        }
    }
    // Fewer forwards than texts: texts of like length shared batches.
    let forwards = engine.stats().forwards.load(Ordering::Relaxed);
    assert!(forwards < texts.len() as u64, "{forwards} forwards");
}

/// Token batches are chosen by length from everything queued, not in arrival
/// order: texts of four lengths arriving interleaved run as four forwards with
/// no padding at all. (The delay is far longer than the test: a batch forms
/// once the queue holds a batch's worth, so nothing here depends on timing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_texts_are_batched_by_length_without_padding() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::load_with(
        save_token_model(dir.path()),
        DeviceChoice::Cpu,
        config(64, 600_000, 1024),
        Collate::Tokens {
            pad_values: vec![0, 0],
        },
        None,
    )
    .await
    .unwrap();
    // Each length more than twice the one below: padding a text to the next
    // length would cost more slots than its own tokens.
    let lengths = [4, 9, 20, 41];
    let callers: Vec<_> = (0..64)
        .map(|i| {
            let engine = engine.clone();
            let ids: Vec<i64> = (0..lengths[i % 4])
                .map(|t| (t + i as i64) % 49 + 1)
                .collect();
            tokio::spawn(async move { engine.run(token_inputs(&ids), far()).await.expect("run") })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let stats = engine.stats();
    let read = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    assert_eq!(read(&stats.forwards), 4);
    assert_eq!(read(&stats.tokens), 16 * (4 + 9 + 20 + 41));
    assert_eq!(read(&stats.token_slots), read(&stats.tokens), "no padding");
}

/// The same items per forward through the batcher whatever the callers' pace:
/// 64 single items with a batch of 32 and a delay longer than the test make
/// exactly two forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_items_fill_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (model, engine) = load_affine(dir.path(), config(32, 600_000, 1024)).await;
    for caller in run_each(&engine, (0..64).map(|i| input(1, i as f64))) {
        let (x, out) = caller.await.unwrap();
        assert_close(&out[0], &model.apply(&x)[0]);
    }
    let stats = engine.stats();
    assert_eq!(stats.forwards.load(Ordering::Relaxed), 2);
    assert_eq!(stats.batched_items.load(Ordering::Relaxed), 64);
}
