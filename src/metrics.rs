//! The node's Prometheus metrics (names in docs/ARCHITECTURE.md), through
//! `prometheus-client`: the only room that touches it.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::generation::{Finish, GenerationObserver};
use crate::engine::BatchObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

/// An HTTP inference answer: its route (one of a fixed few, so a caller cannot
/// make labels) and its status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabel {
    route: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabel {
    finish_reason: String,
}

/// Every way a generation ends (the `finish_reason` label of
/// `harness_generations_total`), all shown from the start at 0.
pub const FINISH_REASONS: [&str; 4] = ["eos", "stop", "length", "cancelled"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// Every phase, so `harness_phase` always lists them all (1 for the current one).
const PHASES: [&str; 8] = [
    "starting",
    "downloading",
    "loading",
    "warming",
    "ready",
    "no_gpu",
    "failed",
    "draining",
];

/// Every request outcome (the `outcome` label of `harness_requests_total`), all
/// shown from the start at 0, so that a rate never misses its first increment.
pub const OUTCOMES: [&str; 8] = [
    "ok",
    "not_ready",
    "overloaded",
    "bad_input",
    "model",
    "deadline_exceeded",
    "internal",
    "cancelled",
];

/// The metrics, recorded as things happen and rendered on `/metrics`.
pub struct Metrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    /// `requests`' counter of each of [`OUTCOMES`], in order: counting a request
    /// is then one atomic add, not a label built and looked up.
    by_outcome: Vec<Counter>,
    request_duration: Histogram,
    queue_duration: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge,
    ready: Gauge,
    phase: Family<PhaseLabel, Gauge>,
    restarts: Counter,
    download_bytes: Counter,
    model_load_seconds: Gauge<f64, AtomicU64>,
    generation: GenerationMetrics,
    http: Family<HttpLabel, Counter>,
    /// Totals already added to the counters that mirror shared state.
    mirrored: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// What the scrape reads from the serving's state.
pub struct Reading<'a> {
    pub phase: &'a str,
    pub queue_depth: u64,
    pub restarts: u64,
    pub downloaded_bytes: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        let by_outcome = OUTCOMES
            .iter()
            .map(|outcome| {
                requests
                    .get_or_create(&Outcome {
                        outcome: outcome.to_string(),
                    })
                    .clone()
            })
            .collect();
        // Seconds, from 0.5 ms to about 16 s.
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let queue_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let queue_depth = Gauge::default();
        let ready = Gauge::default();
        let phase = Family::<PhaseLabel, Gauge>::default();
        let restarts = Counter::default();
        let download_bytes = Counter::default();
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        // prometheus-client adds `_total` to counters.
        registry.register(
            "harness_requests",
            "Requests answered, by outcome",
            requests.clone(),
        );
        registry.register(
            "harness_request_duration_seconds",
            "Time from receiving a request to answering it",
            request_duration.clone(),
        );
        registry.register(
            "harness_queue_duration_seconds",
            "Time a request waited in the batch queue",
            queue_duration.clone(),
        );
        registry.register(
            "harness_batch_size",
            "Items per forward",
            batch_size.clone(),
        );
        registry.register(
            "harness_queue_depth",
            "Items waiting in the batch queue",
            queue_depth.clone(),
        );
        registry.register(
            "harness_ready",
            "1 when the serving is ready",
            ready.clone(),
        );
        registry.register(
            "harness_phase",
            "1 for the serving's current phase",
            phase.clone(),
        );
        registry.register(
            "harness_restarts",
            "Restarts of the serving",
            restarts.clone(),
        );
        registry.register(
            "harness_download_bytes",
            "Bytes downloaded from the Hub",
            download_bytes.clone(),
        );
        registry.register(
            "harness_model_load_seconds",
            "Seconds the last model load took",
            model_load_seconds.clone(),
        );
        let generation = GenerationMetrics::register(&mut registry);
        let http = Family::<HttpLabel, Counter>::default();
        registry.register(
            "harness_http_requests",
            "HTTP inference requests answered, by route and status code (401s, 413s and 422s never reach the serving, so harness_requests_total does not count them)",
            http.clone(),
        );
        Metrics {
            http,
            generation,
            registry,
            requests,
            by_outcome,
            request_duration,
            queue_duration,
            batch_size,
            queue_depth,
            ready,
            phase,
            restarts,
            download_bytes,
            model_load_seconds,
            mirrored: Mutex::new((0, 0)),
        }
    }
}

impl Metrics {
    /// A request answered with `outcome` after `duration`.
    pub fn request(&self, outcome: &str, duration: Duration) {
        match OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => {
                self.by_outcome[i].inc();
            }
            None => {
                self.requests
                    .get_or_create(&Outcome {
                        outcome: outcome.to_string(),
                    })
                    .inc();
            }
        }
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// An HTTP inference request on `route` answered `code`.
    pub fn http_request(&self, route: &'static str, code: u16) {
        self.http.get_or_create(&HttpLabel { route, code }).inc();
    }

    pub fn model_loaded(&self, took: Duration) {
        self.model_load_seconds.set(took.as_secs_f64());
    }

    /// The text exposition, with the gauges brought up to `reading`.
    pub fn render(&self, reading: Reading<'_>) -> String {
        self.queue_depth.set(reading.queue_depth as i64);
        self.ready.set(i64::from(reading.phase == "ready"));
        for phase in PHASES {
            let value = i64::from(phase == reading.phase);
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(value);
        }
        if let Ok(mut mirrored) = self.mirrored.lock() {
            self.restarts
                .inc_by(reading.restarts.saturating_sub(mirrored.0));
            self.download_bytes
                .inc_by(reading.downloaded_bytes.saturating_sub(mirrored.1));
            *mirrored = (
                reading.restarts.max(mirrored.0),
                reading.downloaded_bytes.max(mirrored.1),
            );
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# the metrics could not be encoded\n".to_string();
        }
        out
    }
}

/// The generation task's metrics.
struct GenerationMetrics {
    generated_tokens: Counter,
    prompt_tokens: Counter,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    slots_in_use: Gauge,
    generations: Family<FinishLabel, Counter>,
}

impl GenerationMetrics {
    fn register(registry: &mut Registry) -> GenerationMetrics {
        let m = GenerationMetrics {
            generated_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            // Seconds: 1 ms to about 30 s, and 0.1 ms to about 3 s.
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            time_per_output_token: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            slots_in_use: Gauge::default(),
            generations: Family::default(),
        };
        for reason in FINISH_REASONS {
            let _ = m.generations.get_or_create(&FinishLabel {
                finish_reason: reason.to_string(),
            });
        }
        registry.register(
            "harness_generations",
            "Generations ended, by why: eos, stop, length, or cancelled (the caller cancelled, went away or let its deadline pass; its slot was freed)",
            m.generations.clone(),
        );
        registry.register(
            "harness_generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "harness_prompt_tokens",
            "Prompt tokens run through the model",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "harness_time_to_first_token_seconds",
            "Time from receiving a generation request to its first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "harness_time_per_output_token_seconds",
            "Time of the decode step that gave each generated token after the first",
            m.time_per_output_token.clone(),
        );
        registry.register(
            "harness_generation_slots_in_use",
            "Sequence slots holding a generation (of HARNESS_MAX_SEQUENCES)",
            m.slots_in_use.clone(),
        );
        m
    }
}

impl GenerationObserver for Metrics {
    fn prefill(&self, prompt_tokens: usize, queued: Duration, time_to_first_token: Duration) {
        let g = &self.generation;
        g.prompt_tokens.inc_by(prompt_tokens as u64);
        g.generated_tokens.inc();
        g.time_to_first_token
            .observe(time_to_first_token.as_secs_f64());
        self.queue_duration.observe(queued.as_secs_f64());
    }

    fn step(&self, sequences: usize, took: Duration) {
        let g = &self.generation;
        g.generated_tokens.inc_by(sequences as u64);
        for _ in 0..sequences {
            g.time_per_output_token.observe(took.as_secs_f64());
        }
        self.batch_size.observe(sequences as f64);
    }

    fn finished(&self, _generated: usize, reason: Finish) {
        let reason = match reason {
            Finish::Eos => "eos",
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        };
        self.generation
            .generations
            .get_or_create(&FinishLabel {
                finish_reason: reason.to_string(),
            })
            .inc();
    }

    fn slots_in_use(&self, slots: usize) {
        self.generation.slots_in_use.set(slots as i64);
    }
}

impl BatchObserver for Metrics {
    fn batch(&self, items: usize, queue_waits: &[Duration]) {
        self.batch_size.observe(items as f64);
        for wait in queue_waits {
            self.queue_duration.observe(wait.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_shown_at_zero_before_the_first_request() {
        let text = Metrics::default().render(Reading {
            phase: "starting",
            queue_depth: 0,
            restarts: 0,
            downloaded_bytes: 0,
        });
        for outcome in OUTCOMES {
            let line = format!("harness_requests_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }
}
