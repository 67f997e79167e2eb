//! The embedding task: `Embed` takes texts and answers one vector per text.
//!
//! A model folder in Harness's layout (written by `tools/export_torchscript.py`)
//! holds `model.pt` (TorchScript: token inputs in, token vectors out),
//! `tokenizer.json` and `harness.json`, which names the inputs and says how to pool
//! (sentence-transformers' settings, read by the export). Texts are tokenized here
//! and truncated to the model's longest input, each text queued as one item; the
//! engine batches texts of like length, pads each batch to its own longest text
//! ([`Collate::Tokens`]), pools on the device ([`Pooler`]) and answers from its
//! thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use harness_client::{EmbedReply, EmbedRequest, Embedding, ServingError};
use serde::Deserialize;
use tch::{Kind, Tensor};
use tokio::sync::watch;

use super::pooling::{Pooler, Pooling};
use super::tokenizer::{TextTokenizer, Tokens};
use super::{serving_error, LoadContext, LoadFailure, Respond, Task, Timing};
use crate::engine::{Collate, Engine, EngineStats, HostTensor, RunError};

/// A request of at most this many texts holding at most this many bytes is
/// tokenized where it arrives (tens of microseconds); a larger one on the
/// blocking pool, so that no request holds the serving's message loop for long.
const TOKENIZE_IN_PLACE: (usize, usize) = (8, 4096);

/// The files an embedding model needs when `HARNESS_MODEL_FILES` is unset.
pub const DEFAULT_FILES: &[&str] = &["model.pt", "tokenizer.json", "harness.json"];

/// The manifest's name.
pub const MANIFEST: &str = "harness.json";

/// The manifest formats this build reads.
const FORMAT: u32 = 1;

/// `harness.json`: what the export learned about the model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub task: String,
    /// The TorchScript file, beside the manifest.
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// The model's inputs in order: `input_ids`, `attention_mask` and optionally
    /// `token_type_ids`.
    pub inputs: Vec<String>,
    /// Longest input in tokens, special tokens included; longer texts are truncated.
    pub max_seq_length: usize,
    /// `mean`, `cls` or `max`.
    pub pooling: String,
    pub normalize: bool,
    /// The vector's length.
    pub dimension: usize,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_model() -> String {
    "model.pt".to_string()
}

fn default_tokenizer() -> String {
    "tokenizer.json".to_string()
}

/// A text input the tokenizer gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenInput {
    Ids,
    AttentionMask,
    TypeIds,
}

/// Tokenizer and pooling settings: everything but the model itself.
pub struct Embedder {
    pub manifest: Manifest,
    pub model_path: PathBuf,
    tokenizer: TextTokenizer,
    inputs: Vec<TokenInput>,
    pooling: Pooling,
    pad_id: i64,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl Embedder {
    /// Reads `harness.json` and the tokenizer it names, from `files` (the fetched
    /// files by name). Every mistake names the file and the fix.
    pub fn load(files: &[(String, PathBuf)]) -> Result<Self, String> {
        let find = |name: &str| {
            files
                .iter()
                .find(|(n, _)| n == name || Path::new(n).file_name() == Some(name.as_ref()))
                .map(|(_, path)| path.clone())
        };
        let manifest_path = find(MANIFEST).ok_or_else(|| {
            format!("the embedding task needs {MANIFEST} among the model's files (HARNESS_MODEL_FILES); tools/export_torchscript.py writes it")
        })?;
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a Harness manifest: {e}", manifest_path.display()))?;
        let bad = |why: String| format!("{}: {why}", manifest_path.display());
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT}); export the model again with this Harness's tools/export_torchscript.py",
                manifest.format
            )));
        }
        if manifest.task != "embedding" {
            return Err(bad(format!(
                "the model's task is {:?}; serve it with HARNESS_TASK={}",
                manifest.task, manifest.task
            )));
        }
        let pooling = match manifest.pooling.as_str() {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "max" => Pooling::Max,
            other => {
                return Err(bad(format!(
                    "pooling {other:?}: Harness applies mean, cls or max"
                )))
            }
        };
        let inputs = manifest
            .inputs
            .iter()
            .map(|name| match name.as_str() {
                "input_ids" => Ok(TokenInput::Ids),
                "attention_mask" => Ok(TokenInput::AttentionMask),
                "token_type_ids" => Ok(TokenInput::TypeIds),
                other => Err(bad(format!(
                    "input {other:?}: Harness gives input_ids, attention_mask and token_type_ids"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !inputs.contains(&TokenInput::Ids) || !inputs.contains(&TokenInput::AttentionMask) {
            return Err(bad(
                "the inputs must include input_ids and attention_mask".to_string()
            ));
        }
        if manifest.max_seq_length == 0 {
            return Err(bad("max_seq_length is 0".to_string()));
        }
        let model_path = find(&manifest.model).ok_or_else(|| {
            bad(format!(
                "the model file {} is not among the model's files",
                manifest.model
            ))
        })?;
        let tokenizer_path = find(&manifest.tokenizer).ok_or_else(|| {
            bad(format!(
                "the tokenizer {} is not among the model's files",
                manifest.tokenizer
            ))
        })?;
        let tokenizer = TextTokenizer::from_file(&tokenizer_path, manifest.max_seq_length)?;
        let pad_id = manifest
            .pad_token_id
            .or(tokenizer.pad_id().map(i64::from))
            .unwrap_or(0);
        Ok(Embedder {
            manifest,
            model_path,
            tokenizer,
            inputs,
            pooling,
            pad_id,
        })
    }

    /// How the engine pads this model's token batches.
    pub fn collate(&self) -> Collate {
        Collate::Tokens {
            pad_values: self
                .inputs
                .iter()
                .map(|input| match input {
                    TokenInput::Ids => self.pad_id,
                    TokenInput::AttentionMask | TokenInput::TypeIds => 0,
                })
                .collect(),
        }
    }

    /// How the engine pools this model's token vectors, on the device.
    pub fn pooler(&self) -> Pooler {
        Pooler {
            mask_input: self
                .inputs
                .iter()
                .position(|i| *i == TokenInput::AttentionMask)
                .unwrap_or(1),
            pooling: self.pooling,
            normalize: self.manifest.normalize,
        }
    }

    /// Tokenizes `texts`, one entry per text, until `deadline`: `Ok(None)` once
    /// it has passed (the caller stopped waiting, so the rest is not worth the CPU).
    pub fn tokenize_until(
        &self,
        texts: &[String],
        deadline: std::time::Instant,
    ) -> Result<Option<Vec<Tokens>>, String> {
        let mut all = Vec::with_capacity(texts.len());
        for text in texts {
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            all.push(self.tokenizer.encode_one(text)?);
        }
        Ok(Some(all))
    }

    /// `items` made-up texts of `tokens` tokens, as model inputs, for warm-up.
    pub fn warmup_inputs(&self, items: i64, tokens: i64) -> Result<Vec<Tensor>, String> {
        let fake = Tokens {
            ids: vec![self.pad_id.max(0) as u32; tokens as usize],
            type_ids: vec![0; tokens as usize],
            attention_mask: vec![1; tokens as usize],
            truncated: false,
        };
        self.to_host(&fake)
            .iter()
            .map(|t| {
                t.to_tensor().and_then(|t| {
                    t.f_repeat([items, 1])
                        .map_err(crate::engine::ForwardError::from_torch)
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
    }

    /// One text's model inputs, `[1, tokens]` int64 each, in the model's order.
    pub fn to_host(&self, tokens: &Tokens) -> Vec<HostTensor> {
        self.inputs
            .iter()
            .map(|input| {
                let values = match input {
                    TokenInput::Ids => &tokens.ids,
                    TokenInput::AttentionMask => &tokens.attention_mask,
                    TokenInput::TypeIds => &tokens.type_ids,
                };
                HostTensor {
                    kind: Kind::Int64,
                    shape: vec![1, values.len() as i64],
                    data: values
                        .iter()
                        .flat_map(|&v| i64::from(v).to_ne_bytes())
                        .collect(),
                }
            })
            .collect()
    }
}

/// The embedding task: the tokenizer and pooling around an engine of token batches.
pub struct EmbeddingTask {
    embedder: Arc<Embedder>,
    engine: Engine,
}

impl EmbeddingTask {
    /// Reads `harness.json` and the tokenizer, then loads the model with token
    /// batching and pooling.
    pub async fn load(context: LoadContext) -> Result<Self, LoadFailure> {
        let files = context.files;
        let embedder = tokio::task::spawn_blocking(move || Embedder::load(&files))
            .await
            .map_err(|e| format!("reading the tokenizer: {e}"))?
            // The manifest and tokenizer are the files as they are.
            .map_err(LoadFailure::permanent)?;
        let m = &embedder.manifest;
        tracing::info!(
            inputs = ?m.inputs,
            pooling = %m.pooling,
            normalize = m.normalize,
            max_seq_length = m.max_seq_length,
            dimension = m.dimension,
            "embedding model described by harness.json"
        );
        let engine = Engine::load_with(
            &embedder.model_path,
            context.device,
            context.batch,
            embedder.collate(),
            Some(Arc::new(embedder.pooler())),
        )
        .await?;
        engine.observe(context.observer);
        Ok(EmbeddingTask {
            embedder: Arc::new(embedder),
            engine,
        })
    }

    /// Tokenizes the texts and queues each as one item; `respond` is called
    /// once every text's vector is back (or with the first failure).
    fn queue_texts(&self, texts: Vec<String>, timing: Timing, respond: Respond<EmbedReply>) {
        let tokens = match self.embedder.tokenize_until(&texts, timing.deadline) {
            Ok(Some(tokens)) => tokens,
            Ok(None) => {
                return respond(Err(ServingError::DeadlineExceeded {
                    waited_ms: timing.received.elapsed().as_millis() as u64,
                }))
            }
            Err(reason) => return respond(Err(ServingError::BadInput { reason })),
        };
        let facts: Vec<_> = tokens
            .iter()
            .map(|t| (t.ids.len() as u32, t.truncated))
            .collect();
        let gather = Arc::new(Gather {
            open: Mutex::new(Some(Open {
                left: tokens.len(),
                vectors: vec![Vec::new(); tokens.len()],
                respond,
            })),
            facts,
            received: timing.received,
        });
        for (i, text) in tokens.iter().enumerate() {
            // Answered already (a text refused): the rest would take queue room
            // and forwards for nothing.
            if gather.answered() {
                break;
            }
            let gather = gather.clone();
            self.engine.submit(
                self.embedder.to_host(text),
                timing.deadline,
                move |answer| gather.put(i, answer),
            );
        }
    }
}

/// One `Embed`'s texts, answered as the engine finishes each: the caller hears
/// once, when the last vector is in or at the first failure.
struct Gather {
    /// `None` once answered.
    open: Mutex<Option<Open>>,
    facts: Vec<(u32, bool)>,
    received: std::time::Instant,
}

/// An `Embed` still waiting for vectors.
struct Open {
    /// Texts still out.
    left: usize,
    vectors: Vec<Vec<f32>>,
    respond: Respond<EmbedReply>,
}

impl Gather {
    fn answered(&self) -> bool {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn put(&self, i: usize, answer: Result<Vec<HostTensor>, RunError>) {
        let vector = answer
            .map_err(|e| serving_error(e, self.received))
            .and_then(|outputs| vector(outputs).map_err(|message| ServingError::Model { message }));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = open.as_mut() else {
            return; // answered already, with an earlier failure
        };
        waiting.left -= 1;
        let failure = match vector {
            Ok(vector) => {
                waiting.vectors[i] = vector;
                None
            }
            Err(err) => Some(err),
        };
        if failure.is_none() && waiting.left > 0 {
            return;
        }
        let Some(Open {
            vectors, respond, ..
        }) = open.take()
        else {
            return;
        };
        drop(open);
        respond(match failure {
            Some(err) => Err(err),
            None => Ok(vectors
                .into_iter()
                .zip(&self.facts)
                .map(|(vector, &(tokens, truncated))| Embedding {
                    vector,
                    tokens,
                    truncated,
                })
                .collect()),
        });
    }
}

impl Task for EmbeddingTask {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn answers(&self) -> &'static str {
        "Embed"
    }

    fn warm_up(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let max_batch = self.engine.config().max_batch_size as i64;
            let longest = self.embedder.manifest.max_seq_length as i64;
            // Short texts one at a time and batched, and one of the longest.
            for (items, tokens) in [(1, 16), (max_batch, 16), (1, longest)] {
                let sample = self.embedder.warmup_inputs(items, tokens.min(longest))?;
                self.engine
                    .warm_up(sample, 2)
                    .await
                    .map_err(|e| format!("the warm-up forward failed: {e}"))?;
            }
            Ok(())
        })
    }

    fn stats(&self) -> Arc<EngineStats> {
        self.engine.stats().clone()
    }

    fn failure(&self) -> watch::Receiver<Option<String>> {
        self.engine.failure()
    }

    fn embed(self: Arc<Self>, request: EmbedRequest, timing: Timing, respond: Respond<EmbedReply>) {
        let span = tracing::info_span!("serving.embed", texts = request.texts.len());
        let _entered = span.enter();
        let texts = request.texts;
        if texts.is_empty() {
            return respond(Ok(Vec::new()));
        }
        // Each text is one queued item: more than the queue holds could never be taken.
        let capacity = self.engine.config().max_queue;
        if texts.len() > capacity {
            return respond(Err(ServingError::BadInput {
                reason: format!(
                    "{} texts in one call, but the node queues at most {capacity} (HARNESS_MAX_QUEUE): send fewer per call",
                    texts.len()
                ),
            }));
        }
        let (most_texts, most_bytes) = TOKENIZE_IN_PLACE;
        if texts.len() <= most_texts && texts.iter().map(String::len).sum::<usize>() <= most_bytes {
            // A tokenizer that panics costs this request (answered Internal as
            // its Respond is dropped), not the serving's message loop.
            let queued = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.queue_texts(texts, timing, respond)
            }));
            if queued.is_err() {
                tracing::error!("tokenizing a request panicked; it is answered Internal");
            }
            return;
        }
        let span = span.clone();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            self.queue_texts(texts, timing, respond)
        });
    }
}

/// One text's vector from the engine's answer (`[1, dimension]` f32: the
/// pooler's output).
fn vector(mut output: Vec<HostTensor>) -> Result<Vec<f32>, String> {
    let vector = output.pop().ok_or("the engine answered no vector")?;
    if vector.kind != Kind::Float {
        return Err(format!("the pooled vector is {:?}, not f32", vector.kind));
    }
    Ok(vector
        .data
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"format": 1, "task": "embedding", "inputs": ["input_ids", "attention_mask"],
        "max_seq_length": 128, "pooling": "mean", "normalize": true, "dimension": 8}"#;

    /// A folder with `harness.json` = `manifest` and a tiny real tokenizer.
    fn folder(manifest: &str) -> (tempfile::TempDir, Vec<(String, PathBuf)>) {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;
        let mut files = Vec::new();
        for (name, text) in [
            ("harness.json", manifest),
            ("tokenizer.json", tokenizer),
            ("model.pt", ""),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
            files.push((name.to_string(), dir.path().join(name)));
        }
        (dir, files)
    }

    fn error(manifest: &str) -> String {
        let (_dir, files) = folder(manifest);
        Embedder::load(&files).unwrap_err()
    }

    #[test]
    fn a_good_manifest_loads_and_tokenizes_with_truncation() {
        let (_dir, files) = folder(&GOOD.replace("128", "3"));
        let embedder = Embedder::load(&files).unwrap();
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let tokens = embedder
            .tokenize_until(
                &[
                    "hello world".to_string(),
                    "hello hello world world".to_string(),
                ],
                later,
            )
            .unwrap()
            .unwrap();
        assert_eq!(tokens[0].ids, vec![1, 2]);
        assert!(!tokens[0].truncated);
        assert_eq!(tokens[1].ids, vec![1, 1, 2]);
        assert!(tokens[1].truncated);
        let inputs = embedder.to_host(&tokens[0]);
        assert_eq!(inputs.len(), 2);
        assert_eq!(inputs[0].shape, vec![1, 2]);
        assert_eq!(
            inputs[0].to_tensor().unwrap(),
            Tensor::from_slice(&[1i64, 2]).view([1, 2])
        );
        let warm = embedder.warmup_inputs(3, 4).unwrap();
        assert_eq!((warm[0].size(), warm[0].kind()), (vec![3, 4], Kind::Int64));
    }

    #[test]
    fn tokenizing_stops_once_the_callers_deadline_has_passed() {
        let (_dir, files) = folder(GOOD);
        let embedder = Embedder::load(&files).unwrap();
        let texts = vec!["hello world".to_string(); 3];
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        assert_eq!(
            embedder
                .tokenize_until(&texts, later)
                .unwrap()
                .unwrap()
                .len(),
            3
        );
        let passed = std::time::Instant::now();
        assert_eq!(embedder.tokenize_until(&texts, passed).unwrap(), None);
    }

    #[test]
    fn each_manifest_mistake_names_its_fix() {
        assert!(error(&GOOD.replace("\"format\": 1", "\"format\": 9"))
            .contains("export the model again"));
        assert!(
            error(&GOOD.replace("\"task\": \"embedding\"", "\"task\": \"tensor\""))
                .contains("HARNESS_TASK=tensor")
        );
        assert!(error(&GOOD.replace("mean", "weightedmean")).contains("mean, cls or max"));
        assert!(
            error(&GOOD.replace("\"input_ids\", ", "")).contains("input_ids and attention_mask")
        );
        assert!(error("not json").contains("is not a Harness manifest"));
        let missing = Embedder::load(&[]).unwrap_err();
        assert!(missing.contains("export_torchscript.py"), "{missing}");
    }
}
