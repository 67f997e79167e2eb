//! The files of a generation repo, as published on the Hub.

/// The files a generation model needs when `HARNESS_MODEL_FILES` is unset.
pub const DEFAULT_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];
