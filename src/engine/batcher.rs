//! Dynamic batching on the engine thread.
//!
//! Callers' requests wait in one queue, their tensors as host bytes
//! ([`HostTensor`]). The thread takes the oldest request and gathers others with
//! the same batch key (see [`Collate`]: for tensors the dtype and trailing shape
//! of every input; token sequences of any length) until it holds
//! `max_batch_size` items or the oldest has waited `max_batch_delay`. It chooses
//! the batch (token sequences by length, [`choose_by_length`]), copies the
//! requests' bytes into one input tensor per input, runs one forward, and
//! answers each caller from this thread with its rows of the outputs' bytes: no
//! tensor per request, no hop back through the async runtime. A request whose
//! deadline passed while it waited is answered `DeadlineExceeded` and never run.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tch::Tensor;
use tokio::sync::{oneshot, watch};

use super::collate::{choose_by_length, BatchKey, ForwardCost};
use super::error::{panic_message, ForwardError, RunError};
use super::host::{join_rows, HostTensor};
use super::model::Model;

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
    /// Tokens of token batches' texts, and the token slots their forwards ran
    /// (texts padded to their batch's longest): their ratio is the share of a
    /// forward's work that was padding.
    pub tokens: AtomicU64,
    pub token_slots: AtomicU64,
}

/// What a batched request's caller is answered with: its rows of every output.
pub type Answer = Result<Vec<HostTensor>, RunError>;

/// Where a batched request's answer goes: called exactly once, on the engine
/// thread (or on the caller's, when the request is refused at once). A request
/// dropped unanswered (the engine thread gone) is answered `Stopped`.
pub(super) struct Reply(Option<Box<dyn FnOnce(Answer) + Send>>);

impl Reply {
    pub fn new(to: impl FnOnce(Answer) + Send + 'static) -> Self {
        Reply(Some(Box::new(to)))
    }

    pub fn send(mut self, answer: Answer) {
        if let Some(to) = self.0.take() {
            deliver(to, answer);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(to) = self.0.take() {
            deliver(to, Err(RunError::Forward(ForwardError::Stopped)));
        }
    }
}

/// Runs a caller's reply on the engine thread; a reply that panics is logged
/// and costs only its own caller (whose request then answers `Internal` as it
/// is dropped), never the engine thread.
fn deliver(to: Box<dyn FnOnce(Answer) + Send>, answer: Answer) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| to(answer))) {
        tracing::error!(
            panic = %panic_message(payload.as_ref()),
            "a request's reply panicked on the engine thread"
        );
    }
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
    pub inputs: Vec<HostTensor>,
    pub items: i64,
    pub key: BatchKey,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: Reply,
}

impl Request {
    /// Answered `DeadlineExceeded`, unrun.
    fn expire(self, now: Instant) {
        let waited = now.saturating_duration_since(self.enqueued);
        self.reply.send(Err(RunError::DeadlineExceeded { waited }));
    }

    /// Tokens per item (token requests are `[items, tokens]`).
    fn tokens(&self) -> i64 {
        self.inputs
            .first()
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(0)
    }
}

/// Serves the queue until every handle is gone or the engine fails. A failure
/// that later calls cannot survive (a CUDA error, a panic) is published on `fatal`
/// and every request still waiting is answered with it.
pub(super) fn serve(
    model: &Model,
    queue: Receiver<Job>,
    config: BatchConfig,
    stats: &EngineStats,
    fatal: &watch::Sender<Option<String>>,
) {
    let mut batcher = Batcher {
        model,
        queue,
        max_batch: config.max_batch_size.max(1) as i64,
        max_delay: config.max_batch_delay,
        stats,
        fatal,
        waiting: VecDeque::new(),
        open: true,
        gathered_through: None,
        forward_cost: ForwardCost::default(),
    };
    // One check of the engine's health per step: each step runs at most one forward.
    while !batcher.failed() && (batcher.open || !batcher.waiting.is_empty()) {
        batcher.step();
    }
    batcher.answer_all_after_failure();
}

/// The batching loop's state on the engine thread.
struct Batcher<'a> {
    model: &'a Model,
    queue: Receiver<Job>,
    max_batch: i64,
    max_delay: Duration,
    stats: &'a EngineStats,
    fatal: &'a watch::Sender<Option<String>>,
    /// Requests taken off the queue, oldest first.
    waiting: VecDeque<Request>,
    /// False once every handle is gone: what is waiting is still served.
    open: bool,
    /// When batches are chosen by length: the arrival of the newest request of
    /// the last full gathering. Those requests had their company; what a
    /// shorter batch left of them runs next without waiting again.
    gathered_through: Option<Instant>,
    /// What token forwards cost here, learned as they run.
    forward_cost: ForwardCost,
}

impl Batcher<'_> {
    /// One step: wait for work, or run one batch (or one oversized request).
    fn step(&mut self) {
        if self.waiting.is_empty() {
            match self.queue.recv() {
                Ok(job) => self.accept(job),
                Err(_) => self.open = false,
            }
            return;
        }
        // A request larger than a batch runs alone, cut into batches and put back
        // together.
        if self.waiting[0].items > self.max_batch {
            if let Some(request) = self.waiting.pop_front() {
                self.dequeued(request.items);
                self.run_oversized(request);
            }
            return;
        }
        self.take_arrived();
        let key = self.waiting[0].key.clone();
        let oldest = self.waiting[0].enqueued;
        let fill_until = match self.gathered_through {
            Some(through) if oldest <= through => oldest,
            _ => oldest + self.max_delay,
        };
        self.gather(&key, fill_until);
        if self.model.collate.by_length() && self.gathered(&key) >= self.max_batch {
            self.gathered_through = self.waiting.iter().map(|r| r.enqueued).max();
        }
        // A direct forward taken in meanwhile may have failed the engine.
        if self.failed() {
            return;
        }
        let batch = self.take_batch(&key);
        if !batch.is_empty() {
            self.run_batch(batch);
        }
    }

    fn failed(&self) -> bool {
        self.fatal.borrow().is_some()
    }

    /// Items left the queue (run, expired or failed).
    fn dequeued(&self, items: i64) {
        self.stats
            .queued_items
            .fetch_sub(items as u64, Ordering::Relaxed);
    }

    /// A direct job runs at once; a batched one waits.
    fn accept(&mut self, job: Job) {
        match job {
            Job::Batched(request) => self.waiting.push_back(request),
            Job::Direct { inputs, reply } => {
                let _span = tracing::debug_span!("engine.forward", inputs = inputs.len()).entered();
                let result = self.guarded(|| self.model.forward(inputs));
                let _ = reply.send(result);
            }
        }
    }

    /// Takes everything that arrived meanwhile (during the last forward) first:
    /// when a forward outlasts the delay, the oldest's time is already up, and
    /// without this every batch would hold only what `waiting` kept.
    fn take_arrived(&mut self) {
        loop {
            match self.queue.try_recv() {
                Ok(job) => self.accept(job),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.open = false;
                    return;
                }
            }
        }
    }

    /// Items waiting with batch key `key`.
    fn gathered(&self, key: &BatchKey) -> i64 {
        self.waiting
            .iter()
            .filter(|r| &r.key == key && r.items <= self.max_batch)
            .map(|r| r.items)
            .sum()
    }

    /// More requests like the oldest, until the batch is full or the oldest has
    /// waited long enough.
    fn gather(&mut self, key: &BatchKey, fill_until: Instant) {
        while self.open && !self.failed() {
            let gathered = self.gathered(key);
            let now = Instant::now();
            if gathered >= self.max_batch || now >= fill_until {
                return;
            }
            match self.queue.recv_timeout(fill_until - now) {
                Ok(job) => self.accept(job),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => self.open = false,
            }
        }
    }

    /// The batch of `key` (in arrival order, or for token requests chosen by
    /// length around the oldest); whatever has expired meanwhile is answered
    /// `DeadlineExceeded`, unrun.
    fn take_batch(&mut self, key: &BatchKey) -> Vec<Request> {
        let now = Instant::now();
        let mut candidates = Vec::new();
        for request in std::mem::take(&mut self.waiting) {
            if request.deadline <= now {
                self.dequeued(request.items);
                request.expire(now);
            } else if &request.key == key && request.items <= self.max_batch {
                candidates.push(request);
            } else {
                self.waiting.push_back(request);
            }
        }
        let chosen: Vec<usize> = if self.model.collate.by_length() {
            let queued: Vec<(i64, i64)> =
                candidates.iter().map(|r| (r.tokens(), r.items)).collect();
            choose_by_length(&queued, self.max_batch, self.forward_cost.fixed_slots())
        } else {
            let mut items = 0;
            (0..candidates.len())
                .filter(|&i| {
                    let fits = items + candidates[i].items <= self.max_batch;
                    if fits {
                        items += candidates[i].items;
                    }
                    fits
                })
                .collect()
        };
        let mut batch = Vec::with_capacity(chosen.len());
        let mut left = Vec::new();
        let mut chosen = chosen.into_iter().peekable();
        for (i, request) in candidates.into_iter().enumerate() {
            if chosen.next_if_eq(&i).is_some() {
                batch.push(request);
            } else {
                left.push(request);
            }
        }
        // What was not chosen keeps its place, ahead of anything of another key
        // that arrived later.
        let others = std::mem::take(&mut self.waiting);
        self.waiting = merge_by_arrival(left, others);
        self.dequeued(batch.iter().map(|r| r.items).sum());
        batch
    }

    /// One forward for the whole batch, its outputs split back among the callers.
    fn run_batch(&mut self, batch: Vec<Request>) {
        let sizes: Vec<i64> = batch.iter().map(|r| r.items).collect();
        let total: i64 = sizes.iter().sum();
        if let Some(observer) = self.stats.observer.get() {
            let waits: Vec<Duration> = batch.iter().map(|r| r.enqueued.elapsed()).collect();
            observer.batch(total as usize, &waits);
        }
        let _span =
            tracing::debug_span!("engine.batch", requests = batch.len(), items = total).entered();
        // Token batches: what their forward ran, counted and learned from.
        let slots = self.model.collate.by_length().then(|| {
            let longest = batch.iter().map(Request::tokens).max().unwrap_or(0);
            let tokens: i64 = batch.iter().map(|r| r.tokens() * r.items).sum();
            let slots = longest.saturating_mul(total);
            self.stats
                .tokens
                .fetch_add(tokens as u64, Ordering::Relaxed);
            self.stats
                .token_slots
                .fetch_add(slots as u64, Ordering::Relaxed);
            slots
        });
        let inputs: Vec<&[HostTensor]> = batch.iter().map(|r| r.inputs.as_slice()).collect();
        let started = Instant::now();
        let result = self.guarded(|| self.model.forward_joined(&inputs, &sizes));
        if let (Some(slots), Ok(_)) = (slots, &result) {
            self.forward_cost
                .observe(slots, started.elapsed().as_secs_f64());
        }
        self.stats
            .batched_items
            .fetch_add(total as u64, Ordering::Relaxed);
        match result {
            Ok(parts) => {
                for (request, part) in batch.into_iter().zip(parts) {
                    request.reply.send(Ok(part));
                }
            }
            Err(err) => {
                for request in batch {
                    request.reply.send(Err(RunError::Forward(err.clone())));
                }
            }
        }
    }

    /// A request of more than `max_batch` items: its slices run one batch each, and
    /// the outputs are joined back, so the caller sees one answer.
    fn run_oversized(&self, request: Request) {
        let now = Instant::now();
        if request.deadline <= now {
            return request.expire(now);
        }
        let _span = tracing::debug_span!("engine.oversized", items = request.items).entered();
        if let Some(observer) = self.stats.observer.get() {
            observer.batch(request.items as usize, &[request.enqueued.elapsed()]);
        }
        let mut pieces = Vec::new();
        let mut offset = 0;
        let mut result = Ok(());
        while offset < request.items {
            let n = (request.items - offset).min(self.max_batch);
            let slice = self.guarded(|| {
                let inputs = request
                    .inputs
                    .iter()
                    .map(|t| t.rows(offset, n))
                    .collect::<Result<Vec<_>, _>>()?;
                self.model.forward_host(inputs, &[n])
            });
            self.stats
                .batched_items
                .fetch_add(n as u64, Ordering::Relaxed);
            match slice {
                Ok(mut outputs) => pieces.push(outputs.pop().unwrap_or_default()),
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
            offset += n;
        }
        let joined = result.and_then(|()| join_rows(pieces));
        request.reply.send(joined.map_err(RunError::Forward));
    }

    /// Runs one forward's worth of work with panics caught; counts the forward and
    /// publishes a failure the engine cannot survive (a CUDA error, a panic).
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, ForwardError>) -> Result<T, ForwardError> {
        let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
            Err(ForwardError::Panicked {
                message: panic_message(payload.as_ref()),
            })
        });
        self.stats.forwards.fetch_add(1, Ordering::Relaxed);
        if let Err(err @ (ForwardError::Device { .. } | ForwardError::Panicked { .. })) = &result {
            tracing::error!(error = %err, "the engine failed; it stops and the serving must restart");
            self.fatal.send_replace(Some(err.to_string()));
        }
        result
    }

    /// After a failure nobody waits in silence: everything queued is answered with it.
    fn answer_all_after_failure(&mut self) {
        let Some(reason) = self.fatal.borrow().clone() else {
            return;
        };
        let error = RunError::Forward(ForwardError::Device { message: reason });
        let queued: Vec<Job> = self.queue.try_iter().collect();
        for job in queued {
            match job {
                Job::Batched(request) => self.waiting.push_back(request),
                Job::Direct { reply, .. } => {
                    let _ = reply.send(Err(ForwardError::Stopped));
                }
            }
        }
        for request in std::mem::take(&mut self.waiting) {
            self.dequeued(request.items);
            request.reply.send(Err(error.clone()));
        }
    }
}

/// Two queues of requests, each oldest first, as one, oldest first.
fn merge_by_arrival(a: Vec<Request>, b: VecDeque<Request>) -> VecDeque<Request> {
    let mut merged = VecDeque::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.enqueued <= y.enqueued,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return merged,
        };
        merged.extend(if take_a { a.next() } else { b.next() });
    }
}
