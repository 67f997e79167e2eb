//! Dynamic batching on the engine thread.
//!
//! Callers' requests wait in one queue. The thread takes the oldest request and
//! gathers others with the same batch key (see [`Collate`]: for tensors the dtype
//! and trailing shape of every input, for tokens the length bucket) until it holds `max_batch_size` items or the
//! oldest has waited `max_batch_delay`; it joins them along dim 0, runs one
//! forward, splits the outputs and answers each caller. A request whose deadline
//! passed while it waited is answered `DeadlineExceeded` and never run.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tch::{CModule, Tensor};
use tokio::sync::{oneshot, watch};

use super::collate::{split, BatchKey, Collate};
use super::error::{panic_message, ForwardError, RunError};
use super::worker::forward;

/// How requests are gathered into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Items per forward (`HARNESS_MAX_BATCH_SIZE`).
    pub max_batch_size: usize,
    /// The longest the oldest request waits for others (`HARNESS_MAX_BATCH_DELAY_MS`).
    pub max_batch_delay: Duration,
    /// Items queued before new requests are refused (`HARNESS_MAX_QUEUE`).
    pub max_queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_size: 32,
            max_batch_delay: Duration::from_millis(5),
            max_queue: 1024,
        }
    }
}

/// Told of every batch the engine runs (metrics, without the engine knowing them).
pub trait BatchObserver: Send + Sync {
    /// A batch of `items` ran; `queue_waits` are how long each request in it waited.
    fn batch(&self, items: usize, queue_waits: &[Duration]);
}

/// Counters the engine thread keeps, read by handles (for metrics and tests).
#[derive(Default)]
pub struct EngineStats {
    /// Who hears of each batch, once set.
    pub observer: std::sync::OnceLock<std::sync::Arc<dyn BatchObserver>>,
    /// Items waiting in the queue.
    pub queued_items: AtomicU64,
    /// Forwards run (batches and direct calls).
    pub forwards: AtomicU64,
    /// Items run in batches.
    pub batched_items: AtomicU64,
}

/// Work for the engine thread.
pub(super) enum Job {
    /// One forward on exactly these inputs, alone (warm-up, direct calls).
    Direct {
        inputs: Vec<Tensor>,
        reply: oneshot::Sender<Result<Vec<Tensor>, ForwardError>>,
    },
    /// Items to batch with others.
    Batched(Request),
}

pub(super) struct Request {
    pub inputs: Vec<Tensor>,
    pub items: i64,
    pub key: BatchKey,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Vec<Tensor>, RunError>>,
}

/// Serves the queue until every handle is gone or the device fails. A failure
/// that later calls cannot survive (a CUDA error, a panic) is published on `fatal`
/// and every request still waiting is answered with it.
pub(super) fn serve(
    module: &CModule,
    device: tch::Device,
    collate: &Collate,
    queue: Receiver<Job>,
    config: BatchConfig,
    stats: &EngineStats,
    fatal: &watch::Sender<Option<String>>,
) {
    let max_batch = config.max_batch_size.max(1) as i64;
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        if waiting.is_empty() {
            match queue.recv() {
                Ok(job) => {
                    if let Some(request) = take(job, module, device, collate, stats, fatal) {
                        waiting.push_back(request);
                    }
                }
                Err(_) => break,
            }
            if fatal.borrow().is_some() {
                break;
            }
            continue;
        }

        // A request larger than a batch runs alone, cut into batches and put back
        // together.
        if waiting[0].items > max_batch {
            if let Some(request) = waiting.pop_front() {
                stats
                    .queued_items
                    .fetch_sub(request.items as u64, Ordering::Relaxed);
                run_oversized(module, device, collate, request, max_batch, stats, fatal);
            }
            if fatal.borrow().is_some() {
                break;
            }
            continue;
        }

        // Take everything that arrived meanwhile (during the last forward) first:
        // when a forward outlasts the delay, the oldest's time is already up, and
        // without this every batch would hold only what `waiting` kept.
        loop {
            match queue.try_recv() {
                Ok(job) => {
                    if let Some(request) = take(job, module, device, collate, stats, fatal) {
                        waiting.push_back(request);
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if fatal.borrow().is_some() {
            break;
        }

        // Gather: more requests like the oldest, until the batch is full or the
        // oldest has waited long enough.
        let key = waiting[0].key.clone();
        let fill_until = waiting[0].enqueued + config.max_batch_delay;
        while open {
            let gathered: i64 = waiting
                .iter()
                .filter(|r| r.key == key)
                .map(|r| r.items)
                .sum();
            let now = Instant::now();
            if gathered >= max_batch || now >= fill_until {
                break;
            }
            match queue.recv_timeout(fill_until - now) {
                Ok(job) => {
                    if let Some(request) = take(job, module, device, collate, stats, fatal) {
                        waiting.push_back(request);
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        if fatal.borrow().is_some() {
            break;
        }

        // Take the batch in arrival order; answer whatever has expired meanwhile.
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut items = 0;
        for request in std::mem::take(&mut waiting) {
            if request.deadline <= now {
                stats
                    .queued_items
                    .fetch_sub(request.items as u64, Ordering::Relaxed);
                let waited = now.duration_since(request.enqueued);
                let _ = request
                    .reply
                    .send(Err(RunError::DeadlineExceeded { waited }));
            } else if request.key == key && items + request.items <= max_batch {
                items += request.items;
                batch.push(request);
            } else {
                waiting.push_back(request);
            }
        }
        if !batch.is_empty() {
            stats
                .queued_items
                .fetch_sub(items as u64, Ordering::Relaxed);
            run_batch(module, device, collate, batch, stats, fatal);
        }
        if fatal.borrow().is_some() {
            break;
        }
    }

    // The device failed: nobody waits in silence.
    if let Some(reason) = fatal.borrow().clone() {
        let error = RunError::Forward(ForwardError::Device { message: reason });
        for request in waiting
            .drain(..)
            .chain(queue.try_iter().filter_map(|job| match job {
                Job::Batched(request) => Some(request),
                Job::Direct { reply, .. } => {
                    let _ = reply.send(Err(ForwardError::Stopped));
                    None
                }
            }))
        {
            stats
                .queued_items
                .fetch_sub(request.items as u64, Ordering::Relaxed);
            let _ = request.reply.send(Err(error.clone()));
        }
    }
}

/// A direct job runs at once; a batched one is returned to wait.
fn take(
    job: Job,
    module: &CModule,
    device: tch::Device,
    collate: &Collate,
    stats: &EngineStats,
    fatal: &watch::Sender<Option<String>>,
) -> Option<Request> {
    match job {
        Job::Batched(request) => Some(request),
        Job::Direct { inputs, reply } => {
            let _span = tracing::debug_span!("engine.forward", inputs = inputs.len()).entered();
            let result = guarded(|| forward(module, device, collate, inputs));
            stats.forwards.fetch_add(1, Ordering::Relaxed);
            note_fatal(&result, fatal);
            let _ = reply.send(result);
            None
        }
    }
}

/// One forward for the whole batch, its outputs split back among the callers.
fn run_batch(
    module: &CModule,
    device: tch::Device,
    collate: &Collate,
    batch: Vec<Request>,
    stats: &EngineStats,
    fatal: &watch::Sender<Option<String>>,
) {
    let sizes: Vec<i64> = batch.iter().map(|r| r.items).collect();
    let total: i64 = sizes.iter().sum();
    if let Some(observer) = stats.observer.get() {
        let waits: Vec<Duration> = batch.iter().map(|r| r.enqueued.elapsed()).collect();
        observer.batch(total as usize, &waits);
    }
    let _span =
        tracing::debug_span!("engine.batch", requests = batch.len(), items = total).entered();
    let (inputs, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|r| (r.inputs, r.reply)).unzip();

    let result = guarded(|| {
        let joined = collate.join(inputs)?;
        let outputs = forward(module, device, collate, joined)?;
        split(outputs, &sizes, total)
    });
    stats.forwards.fetch_add(1, Ordering::Relaxed);
    stats
        .batched_items
        .fetch_add(total as u64, Ordering::Relaxed);
    note_fatal(&result, fatal);
    match result {
        Ok(parts) => {
            for (reply, part) in replies.into_iter().zip(parts) {
                let _ = reply.send(Ok(part));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(RunError::Forward(err.clone())));
            }
        }
    }
}

/// A request of more than `max_batch` items: its slices run one batch each, and
/// the outputs are joined back, so the caller sees one answer.
fn run_oversized(
    module: &CModule,
    device: tch::Device,
    collate: &Collate,
    request: Request,
    max_batch: i64,
    stats: &EngineStats,
    fatal: &watch::Sender<Option<String>>,
) {
    if request.deadline <= Instant::now() {
        let waited = request.enqueued.elapsed();
        let _ = request
            .reply
            .send(Err(RunError::DeadlineExceeded { waited }));
        return;
    }
    let _span = tracing::debug_span!("engine.oversized", items = request.items).entered();
    if let Some(observer) = stats.observer.get() {
        observer.batch(request.items as usize, &[request.enqueued.elapsed()]);
    }
    let mut pieces: Vec<Vec<Tensor>> = Vec::new();
    let mut offset = 0;
    let mut result = Ok(());
    while offset < request.items {
        let n = (request.items - offset).min(max_batch);
        let slice = guarded(|| {
            let inputs = request
                .inputs
                .iter()
                .map(|t| t.f_narrow(0, offset, n).map_err(ForwardError::from_torch))
                .collect::<Result<Vec<_>, _>>()?;
            let outputs = forward(module, device, collate, inputs)?;
            split(outputs, &[n], n).map(|mut parts| parts.pop().unwrap_or_default())
        });
        stats.forwards.fetch_add(1, Ordering::Relaxed);
        stats.batched_items.fetch_add(n as u64, Ordering::Relaxed);
        note_fatal(&slice, fatal);
        match slice {
            Ok(outputs) => pieces.push(outputs),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
        offset += n;
    }
    // The outputs of the slices, stacked (they are answers now, not token inputs).
    let joined = result.and_then(|()| Collate::Stack.join(pieces));
    let _ = request.reply.send(joined.map_err(RunError::Forward));
}

fn guarded<T>(f: impl FnOnce() -> Result<T, ForwardError>) -> Result<T, ForwardError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(ForwardError::Panicked {
            message: panic_message(payload.as_ref()),
        })
    })
}

/// A CUDA failure or a panic leaves the engine unusable: say so once.
fn note_fatal<T>(result: &Result<T, ForwardError>, fatal: &watch::Sender<Option<String>>) {
    if let Err(err @ (ForwardError::Device { .. } | ForwardError::Panicked { .. })) = result {
        tracing::error!(error = %err, "the engine failed; it stops and the serving must restart");
        fatal.send_replace(Some(err.to_string()));
    }
}
