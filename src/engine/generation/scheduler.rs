//! Continuous batching on the generation engine's thread: a fixed set of sequence
//! slots; each step admits waiting requests into free slots (their prefill gives
//! their first token), then runs one decode step for every running sequence
//! together. A sequence that ends leaves at once and its slot takes the next
//! request at the next step.

use std::collections::{BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::{oneshot, watch};

use super::kv_cache::KvCache;
use super::llama::Llama;
use super::sampling::Sampler;
use super::{Finish, Finished, GenerateError, GenerationObserver, GenerationStats, Sequence};
use crate::engine::error::panic_message;
use crate::engine::ForwardError;

/// Prompt tokens run per turn of the loop while other sequences wait for their
/// next token (at least one prompt runs per turn).
const PREFILL_TOKENS_PER_STEP: usize = 2048;

/// A request on its way to the engine thread.
pub(super) struct Work {
    pub sequence: Sequence,
    pub reply: oneshot::Sender<Result<Finished, GenerateError>>,
}

impl Work {
    /// Its caller stopped waiting: the deadline passed, it cancelled, or it
    /// went away.
    fn abandoned(&self, now: Instant) -> bool {
        self.sequence.deadline <= now
            || self.reply.is_closed()
            || self
                .sequence
                .watcher
                .as_ref()
                .is_some_and(|watcher| watcher.cancelled())
    }

    /// Answers that the deadline passed, or that the caller cancelled (with
    /// the tokens it had).
    fn expire(self, tokens: Vec<u32>, first_token: Option<Instant>) {
        let answer = if self.sequence.deadline <= Instant::now() {
            let waited = self.sequence.received.elapsed();
            Err(GenerateError::DeadlineExceeded { waited })
        } else {
            Ok(Finished {
                tokens,
                reason: Finish::Cancelled,
                first_token,
            })
        };
        let _ = self.reply.send(answer);
    }
}

/// A sequence in a slot.
struct Running {
    slot: i64,
    work: Work,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Where the last generated token (not yet in the cache) goes.
    position: i64,
    first_token: Instant,
}

/// What the loop needs besides the model.
pub(super) struct Scheduler<'a> {
    pub model: &'a Llama,
    pub cache: KvCache,
    pub slots: i64,
    pub context: i64,
    pub stats: &'a GenerationStats,
    pub observer: Option<Arc<dyn GenerationObserver>>,
    pub fatal: &'a watch::Sender<Option<String>>,
}

impl Scheduler<'_> {
    /// Serves until every handle is gone (or the device fails).
    pub fn serve(mut self, queue: Receiver<Work>) {
        let mut free: BTreeSet<i64> = (0..self.slots).collect();
        let mut running: Vec<Running> = Vec::new();
        let mut waiting: VecDeque<Work> = VecDeque::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match queue.recv() {
                    Ok(work) => waiting.push_back(work),
                    Err(_) => return,
                }
            }
            loop {
                match queue.try_recv() {
                    Ok(work) => waiting.push_back(work),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if running.is_empty() && waiting.is_empty() => {
                        return
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            let now = Instant::now();
            self.end_expired(&mut running, &mut free, now);
            self.end_expired_waiting(&mut waiting, now);
            // Admit into the lowest free slots, so running slots stay together and
            // the decode step reads the cache in place. While sequences run, the
            // prompts run per turn are bounded, so a burst of long prompts delays
            // the running ones' next token by a bounded amount.
            let mut prompt_tokens = 0;
            while !free.is_empty() {
                if !running.is_empty() && prompt_tokens >= PREFILL_TOKENS_PER_STEP {
                    break;
                }
                let Some(work) = waiting.pop_front() else {
                    break;
                };
                self.stats
                    .engine
                    .queued_items
                    .fetch_sub(1, Ordering::Relaxed);
                prompt_tokens += work.sequence.prompt.len();
                let slot = free.pop_first().expect("a free slot");
                match self.prefill(slot, work) {
                    Ok(Some(sequence)) => running.push(sequence),
                    Ok(None) => {
                        free.insert(slot);
                    }
                    Err(fatal) => return self.fail_all(fatal, running, waiting, queue),
                }
            }
            running.sort_by_key(|r| r.slot);
            if let Err(err) = self.compact(&mut running, &mut free) {
                return self.fail_all(err, running, waiting, queue);
            }
            self.publish_slots(running.len());
            if running.is_empty() {
                continue;
            }
            if let Err(fatal) = self.decode(&mut running, &mut free) {
                return self.fail_all(fatal, running, waiting, queue);
            }
            // Also after the step that ended the last sequences, before the loop
            // may block waiting for work.
            self.publish_slots(running.len());
        }
    }

    /// Moves the sequences of the highest slots into the free slots below them,
    /// so running sequences hold slots `0..n` and every decode step reads their
    /// cache rows in place: one copy of a sequence's cache when another ends,
    /// instead of a gather of every row at every step.
    fn compact(&mut self, running: &mut [Running], free: &mut BTreeSet<i64>) -> Result<(), String> {
        loop {
            let (Some(&hole), Some(last)) = (free.first(), running.last_mut()) else {
                return Ok(());
            };
            if last.slot < hole {
                return Ok(());
            }
            let (from, length) = (last.slot, last.position);
            let cache = &mut self.cache;
            guarded(|| cache.move_slot(from, hole, length))
                .map_err(|e| format!("moving a sequence's cache: {e}"))?;
            free.remove(&hole);
            free.insert(from);
            last.slot = hole;
            running.sort_by_key(|r| r.slot);
        }
    }

    fn publish_slots(&self, in_use: usize) {
        self.stats
            .slots_in_use
            .store(in_use as u64, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.slots_in_use(in_use);
        }
    }

    /// Answers queued requests whose caller stopped waiting, so they neither
    /// wait for a slot nor count against the queue's bound.
    fn end_expired_waiting(&self, waiting: &mut VecDeque<Work>, now: Instant) {
        let (gone, kept): (VecDeque<Work>, _) = std::mem::take(waiting)
            .into_iter()
            .partition(|work| work.abandoned(now));
        *waiting = kept;
        self.stats
            .engine
            .queued_items
            .fetch_sub(gone.len() as u64, Ordering::Relaxed);
        for work in gone {
            if let Some(observer) = &self.observer {
                observer.finished(0, Finish::Cancelled);
            }
            work.expire(Vec::new(), None);
        }
    }

    /// Ends sequences whose caller stopped waiting, freeing their slots.
    fn end_expired(&self, running: &mut Vec<Running>, free: &mut BTreeSet<i64>, now: Instant) {
        let (gone, kept): (Vec<Running>, _) = std::mem::take(running)
            .into_iter()
            .partition(|r| r.work.abandoned(now));
        *running = kept;
        for r in gone {
            free.insert(r.slot);
            if let Some(observer) = &self.observer {
                observer.finished(r.generated.len(), Finish::Cancelled);
            }
            r.work.expire(r.generated, Some(r.first_token));
        }
    }

    /// The prompt into `slot` and the first token: the sequence, still running,
    /// or `None` when it was answered already (finished or failed).
    fn prefill(&mut self, slot: i64, work: Work) -> Result<Option<Running>, String> {
        let admitted = Instant::now();
        let prompt: Vec<i64> = work.sequence.prompt.iter().map(|&t| t as i64).collect();
        let model = self.model;
        let cache = &mut self.cache;
        let logits = guarded(|| model.prefill(cache, slot, &prompt).unsqueeze(0));
        let mut sampler = Sampler::new(work.sequence.sampling.clone());
        let token = match logits.and_then(|l| choose(&l, &mut [&mut sampler])) {
            Ok(tokens) => tokens[0],
            Err(err) => return self.failed(vec![work], err).map(|_| None),
        };
        let first_token = Instant::now();
        if let Some(observer) = &self.observer {
            observer.prefill(
                prompt.len(),
                admitted - work.sequence.received,
                first_token - work.sequence.received,
            );
        }
        let mut sequence = Running {
            slot,
            work,
            sampler,
            generated: Vec::new(),
            position: prompt.len() as i64,
            first_token,
        };
        match self.advance(&mut sequence, token) {
            Some(finish) => {
                self.answer(sequence, finish);
                Ok(None)
            }
            None => Ok(Some(sequence)),
        }
    }

    /// One token for every running sequence.
    fn decode(
        &mut self,
        running: &mut Vec<Running>,
        free: &mut BTreeSet<i64>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let slots: Vec<i64> = running.iter().map(|r| r.slot).collect();
        let positions: Vec<i64> = running.iter().map(|r| r.position).collect();
        let tokens: Vec<i64> = running
            .iter()
            .map(|r| *r.generated.last().expect("a running sequence has a token") as i64)
            .collect();
        let model = self.model;
        let cache = &mut self.cache;
        let logits = guarded(|| model.decode(cache, &slots, &positions, &tokens));
        let mut samplers: Vec<&mut Sampler> = running.iter_mut().map(|r| &mut r.sampler).collect();
        let chosen = match logits.and_then(|l| choose(&l, &mut samplers)) {
            Ok(chosen) => chosen,
            Err(err) => {
                let failed: Vec<Work> = running
                    .drain(..)
                    .map(|r| {
                        free.insert(r.slot);
                        r.work
                    })
                    .collect();
                return self.failed(failed, err);
            }
        };
        let engine = &self.stats.engine;
        engine.forwards.fetch_add(1, Ordering::Relaxed);
        engine
            .batched_items
            .fetch_add(running.len() as u64, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.step(running.len(), started.elapsed());
        }
        let mut kept = Vec::with_capacity(running.len());
        for (mut sequence, token) in running.drain(..).zip(chosen) {
            sequence.position += 1;
            match self.advance(&mut sequence, token) {
                Some(finish) => {
                    free.insert(sequence.slot);
                    self.answer(sequence, finish);
                }
                None => kept.push(sequence),
            }
        }
        *running = kept;
        Ok(())
    }

    /// Takes `token` into the sequence; why it ends, when it does.
    fn advance(&self, sequence: &mut Running, token: u32) -> Option<Finish> {
        sequence.generated.push(token);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let work = &mut sequence.work;
        // Told first, so a watcher that streams sees every token, EOS included.
        let stopped = work
            .sequence
            .watcher
            .as_mut()
            .is_some_and(|watcher| watcher.token(&sequence.generated));
        if work.sequence.eos.contains(&token) {
            Some(Finish::Eos)
        } else if stopped {
            Some(Finish::Stop)
        } else if sequence.generated.len() >= work.sequence.max_new_tokens as usize
            || sequence.position + 1 >= self.context
        {
            Some(Finish::Length)
        } else {
            None
        }
    }

    /// Answers a sequence that ended with `finish`.
    fn answer(&self, sequence: Running, finish: Finish) {
        if let Some(observer) = &self.observer {
            observer.finished(sequence.generated.len(), finish);
        }
        let work = sequence.work;
        let _ = work.reply.send(Ok(Finished {
            tokens: sequence.generated,
            reason: finish,
            first_token: Some(sequence.first_token),
        }));
    }

    /// Answers `works` with `err`; a device failure is fatal to the engine.
    fn failed(&self, works: Vec<Work>, err: ForwardError) -> Result<(), String> {
        let fatal = matches!(
            err,
            ForwardError::Device { .. } | ForwardError::Panicked { .. }
        );
        tracing::error!(error = %err, sequences = works.len(), "a generation step failed");
        for work in works {
            let _ = work.reply.send(Err(GenerateError::Forward(err.clone())));
        }
        if fatal {
            Err(err.to_string())
        } else {
            Ok(())
        }
    }

    /// The engine cannot go on: every caller is answered, and the serving told.
    fn fail_all(
        &self,
        why: String,
        running: Vec<Running>,
        waiting: VecDeque<Work>,
        queue: Receiver<Work>,
    ) {
        let _ = self.fatal.send(Some(why.clone()));
        self.publish_slots(0);
        let queued: Vec<Work> = waiting.into_iter().chain(queue.try_iter()).collect();
        self.stats
            .engine
            .queued_items
            .fetch_sub(queued.len() as u64, Ordering::Relaxed);
        let works = running.into_iter().map(|r| r.work).chain(queued);
        for work in works {
            let _ = work
                .reply
                .send(Err(GenerateError::Forward(ForwardError::Device {
                    message: why.clone(),
                })));
        }
    }
}

/// Runs `step`, turning a torch error (tch panics on one) into a typed error.
fn guarded<T>(step: impl FnOnce() -> T) -> Result<T, ForwardError> {
    catch_unwind(AssertUnwindSafe(step)).map_err(|payload| {
        let message = panic_message(payload.as_ref());
        if message.contains("Torch(") || message.contains("torch") {
            ForwardError::from_torch(tch::TchError::Torch(message))
        } else {
            ForwardError::Panicked { message }
        }
    })
}

/// The next token of each row of `logits` (`[rows, vocab]`): the argmax on the
/// device for greedy rows, a draw on the CPU for sampled ones.
fn choose(logits: &Tensor, samplers: &mut [&mut Sampler]) -> Result<Vec<u32>, ForwardError> {
    catch_unwind(AssertUnwindSafe(|| {
        let greedy: Vec<i64> =
            Vec::<i64>::try_from(&logits.argmax(-1, false).to_device(Device::Cpu))
                .expect("argmax is i64");
        samplers
            .iter_mut()
            .enumerate()
            .map(|(i, sampler)| {
                if sampler.is_greedy() {
                    greedy[i] as u32
                } else {
                    let row = logits
                        .get(i as i64)
                        .to_kind(Kind::Float)
                        .to_device(Device::Cpu);
                    let row = Vec::<f32>::try_from(&row).expect("a float row");
                    sampler.sample(&row)
                }
            })
            .collect()
    }))
    .map_err(|payload| ForwardError::Panicked {
        message: panic_message(payload.as_ref()),
    })
}
