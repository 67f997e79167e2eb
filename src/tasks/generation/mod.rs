//! The generation task: a prompt in, the model's continuation out. It reads the
//! repo as published (`config.json`, `generation_config.json`, the tokenizer, the
//! safetensors shards), sizes the engine's slots and cache, checks each request,
//! tokenizes its prompt, stops it at its stop strings, and turns the engine's
//! tokens into text.

pub mod chat;
mod defaults;
mod detokenize;
mod files;
mod stop;
mod stream;
#[cfg(test)]
mod test_tokenizer;
mod watcher;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use harness_client::{
    FinishReason, GenerateReply, GenerateRequest, Generation, Prompt, ServingError,
};
use serde::Serialize;
use tokio::sync::watch;

pub use defaults::Defaults;
pub use files::DEFAULT_FILES;
pub use stream::{Progress, TextStream};

use super::tokenizer::TextTokenizer;
use super::{internal, off_async, Caller, LoadContext, LoadFailure, Task, Timing};
use crate::config::DTypeChoice;
use crate::engine::generation::config::Architecture;
use crate::engine::generation::{
    self as engine, fresh_seed, Finish, Finished, GenerateError, GenerationEngine,
    GenerationLoadError, GenerationSettings, ModelConfig, SamplingParams, Sequence,
};
use crate::engine::{DeviceChoice, EngineStats, ForwardError, Kind};
use stop::StopStrings;
use stream::{Ended, Ending};
use watcher::{SequenceWatch, Unpulled};

/// The longest context the node gives a sequence when `HARNESS_MAX_CONTEXT` is
/// unset, whatever the model allows (what the original compiled Mistral for).
pub const DEFAULT_MAX_CONTEXT: u32 = 4096;
/// Stop strings per request, and bytes per stop string, at most.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Prompts over the context are counted whole, for the error, up to this size.
const MAX_COUNTED_PROMPT_BYTES: usize = 1 << 20;
/// A chat's messages, and their bytes (roles and contents), at most: far past
/// any context, and a bound on what rendering one costs.
const MAX_CHAT_MESSAGES: usize = 4096;
const MAX_CHAT_BYTES: usize = 16 << 20;

/// The generation task's own settings (`HARNESS_DTYPE`, `HARNESS_MAX_SEQUENCES`,
/// `HARNESS_MAX_CONTEXT`).
pub type GenerationOptions = crate::config::GenerationConfig;

/// What `/status` shows of a generation serving.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStatus {
    pub architecture: String,
    pub parameters: u64,
    pub dtype: &'static str,
    pub max_sequences: u32,
    pub sequences_running: u64,
    pub max_context: u32,
    pub weights_gib: f64,
    pub kv_cache_gib: f64,
    /// Streams open (`OpenStream`), running, queued or not pulled to their end.
    pub streams_open: u64,
    /// Token ids made and not pulled yet, over all streams (4 bytes each).
    pub stream_tokens_unpulled: u64,
}

/// A causal language model served for `Generate`.
pub struct GenerationTask {
    engine: GenerationEngine,
    tokenizer: Arc<TextTokenizer>,
    defaults: Defaults,
    eos: Vec<u32>,
    architecture: Architecture,
    vocab_size: u32,
    /// The tokenizer's byte-fallback tokens (for stop strings).
    byte_tokens: Arc<std::collections::HashSet<u32>>,
    /// The repo's chat template, if it has one.
    chat: Option<Arc<chat::ChatTemplate>>,
}

impl GenerationTask {
    /// Reads the repo's files and loads the model onto the device.
    pub async fn load(context: LoadContext) -> Result<Self, LoadFailure> {
        let files = Files::find(&context.files)?;
        let options = context.generation.clone();
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| LoadFailure::permanent(format!("cannot read {}: {e}", path.display())))
        };
        let config = ModelConfig::parse(&read(&files.config)?)
            .map_err(|e| LoadFailure::permanent(e.to_string()))?;
        let defaults = match &files.generation_config {
            Some(path) => Defaults::parse(&read(path)?).map_err(LoadFailure::permanent)?,
            None => Defaults::default(),
        };
        let read_optional = |path: &Option<PathBuf>| path.as_deref().map(read).transpose();
        let chat = chat::ChatTemplate::from_files(
            read_optional(&files.tokenizer_config)?.as_deref(),
            read_optional(&files.chat_template)?.as_deref(),
        )
        .map_err(LoadFailure::permanent)?
        .map(Arc::new);
        match &chat {
            Some(template) => {
                tracing::info!(from = template.origin(), "chat messages are rendered with the model's chat template ({})", template.origin())
            }
            None => tracing::info!(
                "the model has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json): chat requests are refused"
            ),
        }
        if !defaults.unsupported.is_empty() {
            tracing::warn!(
                settings = %defaults.unsupported.join(", "),
                "generation_config.json sets {}, which this node does not apply: answers may differ from transformers' generate",
                defaults.unsupported.join(", ")
            );
        }
        let eos = if defaults.eos_token_ids.is_empty() {
            config.eos_token_ids.clone()
        } else {
            defaults.eos_token_ids.clone()
        };
        let kind = dtype(options.dtype, context.device, config.dtype.as_deref());
        let settings = GenerationSettings {
            slots: options.max_sequences,
            context: max_context(&config, options.max_context),
            max_queue: context.batch.max_queue as u32,
            kind,
        };
        let tokenizer_path = files.tokenizer.clone();
        let context_tokens = settings.context as usize;
        let tokenizer = off_async(
            move || TextTokenizer::from_file(&tokenizer_path, context_tokens),
            internal,
        )
        .await
        .map_err(|e| LoadFailure::permanent(e.to_string()))?;

        let (architecture, vocab_size) = (config.architecture, config.vocab_size);
        let plan =
            GenerationEngine::plan(config, &files.weights, settings).map_err(load_failure)?;
        let memory = plan.memory;
        tracing::info!(
            architecture = ?architecture,
            parameters = memory.parameters,
            dtype = engine::kind_name(kind),
            weights_gib = memory.weight_bytes as f64 / GIB,
            kv_cache_gib = memory.kv_cache_bytes as f64 / GIB,
            sequences = settings.slots,
            context = settings.context,
            "the model needs {} of weights and {} of KV cache ({} sequences × {} tokens) on {}",
            engine::gib(memory.weight_bytes),
            engine::gib(memory.kv_cache_bytes),
            settings.slots,
            settings.context,
            context.device,
        );
        if context.device == DeviceChoice::Cpu {
            if let Some(available) = available_host_memory() {
                let needed = memory.weight_bytes + memory.kv_cache_bytes;
                if needed > available {
                    let cause = format!("{} of memory available", engine::gib(available));
                    return Err(LoadFailure::permanent(engine::too_large_message(
                        &memory,
                        &settings,
                        "on the CPU",
                        &cause,
                    )));
                }
            }
        }
        let engine =
            GenerationEngine::load(plan, context.device, Some(context.generations.clone()))
                .await
                .map_err(load_failure)?;
        Ok(GenerationTask {
            engine,
            byte_tokens: Arc::new(tokenizer.byte_token_ids()),
            tokenizer: Arc::new(tokenizer),
            defaults,
            eos,
            chat,
            architecture,
            vocab_size: vocab_size.clamp(0, u32::MAX as i64) as u32,
        })
    }

    /// Checks `request` and turns it into the engine's sequence (tokenizing runs
    /// on a blocking thread), watched for `caller` and, for a stream, into
    /// `stream`.
    async fn sequence(
        &self,
        request: GenerateRequest,
        timing: Timing,
        caller: Option<Arc<dyn Caller>>,
        stream: Option<Arc<Unpulled>>,
    ) -> Result<Prepared, ServingError> {
        let o = &request.options;
        let bad = |reason: String| ServingError::BadInput { reason };
        if let Some(t) = o.temperature.filter(|t| !t.is_finite() || *t < 0.0) {
            return Err(bad(format!("temperature must be 0 or more, not {t}")));
        }
        if let Some(p) = o.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(bad(format!("top_p must be in (0, 1], not {p}")));
        }
        if o.max_new_tokens == Some(0) {
            return Err(bad("max_new_tokens must be at least 1".to_string()));
        }
        if o.stop.len() > MAX_STOPS {
            return Err(bad(format!(
                "{} stop strings; at most {MAX_STOPS}",
                o.stop.len()
            )));
        }
        if let Some(s) = o
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(bad(format!(
                "a stop string must have 1 to {MAX_STOP_BYTES} bytes (got {})",
                s.len()
            )));
        }
        let context = self.engine.settings().context;
        let tokenizer = self.tokenizer.clone();
        let chat = match &request.prompt {
            Prompt::Text(_) => None,
            Prompt::Chat(messages) => Some(self.chat_template(messages)?),
        };
        let (tokens, count) = off_async(
            move || {
                // A chat is rendered here, off the async workers: its template
                // is the repo's code, its messages the caller's.
                let (prompt, special_tokens) = match (request.prompt, chat) {
                    (Prompt::Chat(messages), Some(template)) => (
                        template.render(&messages, true).map_err(|reason| {
                            format!("the model's chat template refused the messages: {reason}")
                        })?,
                        false,
                    ),
                    (Prompt::Chat(_), None) => unreachable!("a chat has its template"),
                    (Prompt::Text(text), _) => (text, true),
                };
                let tokens = match special_tokens {
                    true => tokenizer.encode_one(&prompt)?,
                    false => tokenizer.encode_plain(&prompt)?,
                };
                // An over-long prompt's whole count, for the error, where counting
                // it is cheap enough.
                let count = match tokens.truncated {
                    true if prompt.len() <= MAX_COUNTED_PROMPT_BYTES => {
                        Some(tokenizer.count(&prompt)?)
                    }
                    true => None,
                    false => Some(tokens.ids.len()),
                };
                Ok((tokens, count))
            },
            bad,
        )
        .await?;
        if tokens.truncated || tokens.ids.len() >= context as usize {
            let count = count.map_or_else(
                || format!("more than {}", tokens.ids.len()),
                |n| n.to_string(),
            );
            return Err(bad(format!(
                "the prompt has {count} tokens, but a sequence holds {context} (HARNESS_MAX_CONTEXT), prompt and generated tokens together: shorten the prompt"
            )));
        }
        if tokens.ids.is_empty() {
            return Err(bad("the prompt has no tokens".to_string()));
        }
        // A tokenizer may know tokens past the model's embedding (added tokens):
        // one in a prompt would fail the step (on a GPU, the device).
        if let Some(id) = tokens.ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(bad(format!(
                "the prompt has token id {id}, past the model's vocabulary of {} (an added token the model was not trained with)",
                self.vocab_size
            )));
        }
        let sampling_asked =
            o.temperature.is_some() || o.top_p.is_some() || o.top_k.is_some() || o.seed.is_some();
        let d = &self.defaults;
        let sampling = SamplingParams {
            do_sample: o.do_sample.unwrap_or(sampling_asked || d.do_sample),
            temperature: o.temperature.or(d.temperature).unwrap_or(1.0),
            top_k: o.top_k.or(d.top_k).unwrap_or(50) as usize,
            top_p: o.top_p.or(d.top_p).unwrap_or(1.0),
            seed: o.seed.unwrap_or_else(fresh_seed),
        };
        let prompt_tokens = tokens.ids.len();
        let room = context as usize - prompt_tokens;
        let max_new_tokens = o
            .max_new_tokens
            .map(|n| n as usize)
            .or(d.max_new_tokens.map(|n| n as usize))
            .or(d
                .max_length
                .map(|l| (l as usize).saturating_sub(prompt_tokens).max(1)))
            .unwrap_or(room);
        let stop = (!o.stop.is_empty()).then(|| {
            StopStrings::new(
                self.tokenizer.clone(),
                o.stop.clone(),
                self.byte_tokens.clone(),
            )
        });
        let cancelled = Arc::new(AtomicBool::new(false));
        let watch = SequenceWatch {
            stream,
            stop,
            cancelled: cancelled.clone(),
            caller,
        };
        let sequence = Sequence {
            prompt: tokens.ids,
            sampling,
            max_new_tokens: max_new_tokens.min(u32::MAX as usize) as u32,
            eos: self.eos.clone(),
            watcher: Some(Box::new(watch)),
            received: timing.received,
            deadline: timing.deadline,
        };
        Ok(Prepared {
            sequence,
            stops: request.options.stop,
            cancelled,
        })
    }

    /// The template to render `messages` with (on a blocking thread), once
    /// they are within bounds; `BadInput` for a model without one.
    fn chat_template(
        &self,
        messages: &[harness_client::ChatMessage],
    ) -> Result<Arc<chat::ChatTemplate>, ServingError> {
        let bad = |reason: String| ServingError::BadInput { reason };
        let Some(template) = &self.chat else {
            return Err(bad(
                "this model has no chat template (its repo has no chat_template.jinja and no chat_template in tokenizer_config.json): send a prompt (Prompt::Text) written as the model expects".to_string(),
            ));
        };
        if messages.len() > MAX_CHAT_MESSAGES {
            return Err(bad(format!(
                "{} chat messages; at most {MAX_CHAT_MESSAGES}",
                messages.len()
            )));
        }
        let bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        if bytes > MAX_CHAT_BYTES {
            return Err(bad(format!(
                "the chat's messages have {bytes} bytes, more than any context holds (at most {MAX_CHAT_BYTES})"
            )));
        }
        Ok(template.clone())
    }
}

/// A request made ready for the engine.
struct Prepared {
    sequence: Sequence,
    stops: Vec<String>,
    /// Set to end the sequence at the engine's next step.
    cancelled: Arc<AtomicBool>,
}

impl Prepared {
    fn prompt_tokens(&self) -> u32 {
        self.sequence.prompt.len() as u32
    }
}

/// How an engine's answer ends a stream.
fn ending(answer: Result<Finished, GenerateError>, received: Instant) -> Ending {
    answer
        .map(|finished| Ended {
            reason: finish_reason(finished.reason),
            first_token: finished.first_token,
        })
        .map_err(|e| serving_error(e, received))
}

fn finish_reason(finish: Finish) -> FinishReason {
    match finish {
        Finish::Eos => FinishReason::Eos,
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
        Finish::Cancelled => FinishReason::Cancelled,
    }
}

/// The repo's files the task reads, by name.
struct Files {
    config: PathBuf,
    generation_config: Option<PathBuf>,
    tokenizer: PathBuf,
    tokenizer_config: Option<PathBuf>,
    chat_template: Option<PathBuf>,
    weights: Vec<PathBuf>,
}

impl Files {
    fn find(files: &[(String, PathBuf)]) -> Result<Files, LoadFailure> {
        let named = |name: &str| {
            files
                .iter()
                .find(|(n, _)| n == name || n.ends_with(&format!("/{name}")))
                .map(|(_, p)| p.clone())
        };
        let required =
            |name: &str| {
                named(name).ok_or_else(|| {
                    LoadFailure::permanent(format!(
                    "the generation task needs {name}, which is not among the model's files ({})",
                    files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ))
                })
            };
        let weights: Vec<PathBuf> = files
            .iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .map(|(_, p)| p.clone())
            .collect();
        if weights.is_empty() {
            return Err(LoadFailure::permanent(
                "the generation task needs the model's safetensors weights (model.safetensors, or the shards model.safetensors.index.json names), and none are among its files",
            ));
        }
        Ok(Files {
            config: required("config.json")?,
            generation_config: named("generation_config.json"),
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: named("tokenizer_config.json"),
            chat_template: named("chat_template.jinja"),
            weights,
        })
    }
}

/// The dtype of `HARNESS_DTYPE` on `device`: `auto` is the checkpoint's on a GPU
/// (bf16 where it names none) and f32 on the CPU, where half types are slow.
fn dtype(choice: DTypeChoice, device: DeviceChoice, checkpoint: Option<&str>) -> Kind {
    match choice {
        DTypeChoice::Bf16 => Kind::BFloat16,
        DTypeChoice::F16 => Kind::Half,
        DTypeChoice::F32 => Kind::Float,
        DTypeChoice::Auto if device == DeviceChoice::Cpu => Kind::Float,
        DTypeChoice::Auto => match checkpoint {
            Some("float16") => Kind::Half,
            Some("float32") => Kind::Float,
            _ => Kind::BFloat16,
        },
    }
}

/// `HARNESS_MAX_CONTEXT`, else the model's positions up to 4096; never more than
/// a sliding window (the cache keeps no more than the model attends to).
fn max_context(config: &ModelConfig, asked: Option<u32>) -> u32 {
    let model = config.max_position_embeddings.clamp(2, u32::MAX as i64) as u32;
    let mut context = asked.unwrap_or(model.min(DEFAULT_MAX_CONTEXT));
    if let Some(window) = config.sliding_window {
        if (window as u32) < context {
            tracing::warn!(
                window,
                "the model attends to the last {window} tokens only (sliding_window): sequences hold {window} tokens, not {context}"
            );
            context = window as u32;
        }
    }
    if context as i64 > config.max_position_embeddings {
        tracing::warn!(
            context,
            max_position_embeddings = config.max_position_embeddings,
            "HARNESS_MAX_CONTEXT is beyond the positions the model was trained for: expect poor text past them"
        );
    }
    context
}

fn load_failure(err: GenerationLoadError) -> LoadFailure {
    match err {
        GenerationLoadError::Checkpoint(m) | GenerationLoadError::TooLarge(m) => {
            LoadFailure::permanent(m)
        }
        GenerationLoadError::Device(m) => LoadFailure::from(m),
    }
}

/// Memory this process may still take, in bytes: `MemAvailable` of
/// `/proc/meminfo`, or less where a container's cgroup limit says so (a
/// container sees the host's meminfo).
fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let host = kib * 1024;
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    // memory.current counts the page cache (the weights just downloaded among
    // it), which the kernel reclaims before refusing memory: left out.
    let file_cache = std::fs::read_to_string("/sys/fs/cgroup/memory.stat")
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("file "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cgroup = read("memory.max").map(|max| {
        let used = read("memory.current")
            .unwrap_or(0)
            .saturating_sub(file_cache);
        max.saturating_sub(used)
    });
    Some(cgroup.map_or(host, |left| left.min(host)))
}

const GIB: f64 = (1u64 << 30) as f64;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What the caller can do about an engine error.
fn serving_error(err: GenerateError, received: Instant) -> ServingError {
    match err {
        GenerateError::Overloaded { queued, capacity } => {
            ServingError::Overloaded { queued, capacity }
        }
        GenerateError::DeadlineExceeded { .. } => ServingError::DeadlineExceeded {
            waited_ms: received.elapsed().as_millis() as u64,
        },
        GenerateError::Forward(
            e @ (ForwardError::Device { .. }
            | ForwardError::Panicked { .. }
            | ForwardError::Stopped),
        ) => internal(e),
        GenerateError::Forward(e) => ServingError::Model {
            message: e.to_string(),
        },
    }
}

impl Task for GenerationTask {
    fn name(&self) -> &'static str {
        "generation"
    }

    fn answers(&self) -> &'static str {
        "Generate"
    }

    /// One short generation, so the first request does not pay for libtorch's
    /// first kernels.
    fn warm_up(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            // Any token the model knows (an EOS id may lie past the vocabulary).
            let token = self.eos.first().copied().filter(|&id| id < self.vocab_size);
            let prompt: Vec<u32> = vec![token.unwrap_or(0)];
            let sequence = Sequence {
                prompt,
                sampling: SamplingParams::greedy(),
                max_new_tokens: 2,
                eos: Vec::new(),
                watcher: None,
                received: Instant::now(),
                deadline: Instant::now() + std::time::Duration::from_secs(600),
            };
            self.engine
                .generate(sequence)
                .await
                .map(|_| ())
                .map_err(|e| format!("warming up the model: {e}"))
        })
    }

    fn stats(&self) -> Arc<EngineStats> {
        self.engine.stats().engine.clone()
    }

    fn failure(&self) -> watch::Receiver<Option<String>> {
        self.engine.failure()
    }

    fn generation_status(&self) -> Option<GenerationStatus> {
        let (settings, memory) = (self.engine.settings(), self.engine.memory());
        Some(GenerationStatus {
            architecture: format!("{:?}", self.architecture),
            parameters: memory.parameters,
            dtype: engine::kind_name(settings.kind),
            max_sequences: settings.slots,
            sequences_running: self.engine.stats().slots_in_use.load(Ordering::Relaxed),
            max_context: settings.context,
            weights_gib: round2(memory.weight_bytes as f64 / GIB),
            kv_cache_gib: round2(memory.kv_cache_bytes as f64 / GIB),
            streams_open: 0,
            stream_tokens_unpulled: 0,
        })
    }

    fn generate(
        self: Arc<Self>,
        request: GenerateRequest,
        timing: Timing,
        caller: Option<Arc<dyn Caller>>,
    ) -> BoxFuture<'static, GenerateReply> {
        Box::pin(async move {
            let prepared = self.sequence(request, timing, caller, None).await?;
            let prompt_tokens = prepared.prompt_tokens();
            let finished = self
                .engine
                .generate(prepared.sequence)
                .await
                .map_err(|e| serving_error(e, timing.received))?;
            let (tokenizer, ids) = (self.tokenizer.clone(), finished.tokens.clone());
            let stops = prepared.stops;
            let (text, stopped) = off_async(
                move || stop::answer_text(&tokenizer, &ids, &stops),
                internal,
            )
            .await?;
            let reason = match stopped {
                true => FinishReason::Stop,
                false => finish_reason(finished.reason),
            };
            Ok(Generation {
                text,
                generated_tokens: finished.tokens.len() as u32,
                token_ids: finished.tokens,
                finish_reason: reason,
                prompt_tokens,
                time_to_first_token_ms: finished
                    .first_token
                    .map_or(0.0, |t| (t - timing.received).as_secs_f64() * 1000.0),
            })
        })
    }

    fn open_stream(
        self: Arc<Self>,
        request: GenerateRequest,
        timing: Timing,
        caller: Option<Arc<dyn Caller>>,
    ) -> BoxFuture<'static, Result<Arc<TextStream>, ServingError>> {
        Box::pin(async move {
            let unpulled = Arc::new(Unpulled::default());
            let prepared = self
                .sequence(request, timing, caller, Some(unpulled.clone()))
                .await?;
            let stream = Arc::new(TextStream::new(
                unpulled,
                prepared.cancelled.clone(),
                self.tokenizer.clone(),
                prepared.stops.clone(),
                prepared.prompt_tokens(),
                timing.received,
            ));
            let generation = self
                .engine
                .submit(prepared.sequence)
                .map_err(|e| serving_error(e, timing.received))?;
            // The stream's generation runs on: the stream learns its end.
            let weak = Arc::downgrade(&stream);
            tokio::spawn(async move {
                let answer = generation.await;
                if let Some(stream) = weak.upgrade() {
                    stream.end(ending(answer, timing.received));
                }
            });
            Ok(stream)
        })
    }
}
