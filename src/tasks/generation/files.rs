//! The files of a generation repo, as published on the Hub.

use crate::fetch::{FileSpec, Weights};

/// What a generation model is made of when `HARNESS_MODEL_FILES` is unset: its
/// config and tokenizer; its generation defaults and chat template when the repo
/// has them; and its safetensors weights, `model.safetensors` or, when the repo
/// has `model.safetensors.index.json`, the index and every shard it names.
pub const DEFAULT_FILES: FileSpec = FileSpec {
    required: &["config.json", "tokenizer.json", "tokenizer_config.json"],
    optional: &["generation_config.json", "chat_template.jinja"],
    weights: Some(Weights::SAFETENSORS),
};
