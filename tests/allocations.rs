//! What a request costs the node in allocations, counted, not timed: a `Run`
//! through the serving actor to the engine and back, one caller after another,
//! on the demo model. The count is the same on a busy machine as on an idle
//! one, so a change that puts a task, a copy or a tensor back on every request
//! shows here. (libtorch's own allocations are C++'s and not counted: what is
//! counted is the serving path around the forward.)

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::client::demo_item;
use support::node::demo_model_dir;
use support::serving::{node_config, run, start_ready};

/// Counts every allocation of this test process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a
// counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations one `Run` of one item may cost, the caller's own included
/// (building the request, ractor's message and reply port, the answer).
/// 2026-11-29: 29 measured, 36 before requests went to the engine as host bytes
/// and were answered from the engine thread.
const MOST_PER_REQUEST: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_through_the_actor_costs_a_few_allocations() {
    let dir = demo_model_dir();
    let config = node_config(&[
        format!("--model-dir={}", dir.path().display()),
        "--warmup-inputs=f32[4]".to_string(),
        "--max-batch-delay-ms=0".to_string(),
    ]);
    let (node, serving) = start_ready(config, Duration::from_secs(60)).await;
    for _ in 0..200 {
        run(&serving, demo_item(), 30_000)
            .await
            .expect("warm-up call");
    }
    const CALLS: u64 = 1000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..CALLS {
        run(&serving, demo_item(), 30_000).await.expect("answered");
    }
    let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - before) / CALLS;
    eprintln!("{per_request} allocations per Run through the actor");
    assert!(
        per_request <= MOST_PER_REQUEST,
        "{per_request} allocations per request (at most {MOST_PER_REQUEST})"
    );
    node.shutdown(Duration::from_secs(5)).await;
}
