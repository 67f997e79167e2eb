//! A causal language model's `config.json`, as `transformers` writes it, read into
//! the one shape this project runs: the Llama family (Llama 2 and 3, Mistral,
//! Qwen2, TinyLlama, SmolLM2).

use serde::Deserialize;

/// The `architectures` values this engine runs.
pub const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Which member of the family: they differ only in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// How rotary position frequencies are scaled (`rope_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The model's shape and the facts the forward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    /// The output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection too (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention sees only this many past tokens, where the model uses a window.
    pub sliding_window: Option<i64>,
    /// The checkpoint's own dtype (`torch_dtype`, or `dtype` in transformers 5).
    pub dtype: Option<String>,
    /// End-of-sequence ids the config names (one or a list).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

/// Why a config cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not a model config: {0}")]
    Invalid(String),
    #[error("the model's architecture is {found}; this node runs {}", SUPPORTED.join(", "))]
    Unsupported { found: String },
    #[error("config.json: {0}")]
    Unsound(String),
}

/// The fields read from `config.json`; the rest are ignored.
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 may keep rope settings here instead.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads `config.json`'s text.
    pub fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // The architecture first: another model's config may lack Llama's fields,
        // and "unsupported" is the message that helps.
        let found = value
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let architecture = match found.as_deref() {
            Some("LlamaForCausalLM") => Architecture::Llama,
            Some("MistralForCausalLM") => Architecture::Mistral,
            Some("Qwen2ForCausalLM") => Architecture::Qwen2,
            other => {
                let found = other.map(str::to_string).unwrap_or_else(|| {
                    let model_type = value.get("model_type").and_then(|m| m.as_str());
                    format!(
                        "not named (no \"architectures\" in config.json; model_type {})",
                        model_type.unwrap_or("none")
                    )
                });
                return Err(ConfigError::Unsupported { found });
            }
        };
        let keys: Vec<String> = value
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let has_key = |name: &str| keys.iter().any(|k| k == name);
        let raw: Raw =
            serde_json::from_value(value).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let _ = (&raw.architectures, &raw.model_type);
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ConfigError::Unsound(format!(
                "hidden_act is {act}; the Llama family's MLP uses silu"
            )));
        }
        let positive = |name: &str, v: i64| {
            if v > 0 {
                Ok(v)
            } else {
                Err(ConfigError::Unsound(format!(
                    "{name} must be positive, not {v}"
                )))
            }
        };
        let num_heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let num_kv_heads = positive(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(num_heads),
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(ConfigError::Unsound(format!(
                "{num_heads} attention heads cannot share {num_kv_heads} key/value heads"
            )));
        }
        let hidden_size = positive("hidden_size", raw.hidden_size)?;
        let head_dim = positive(
            "head_dim",
            raw.head_dim.unwrap_or(hidden_size / num_heads.max(1)),
        )?;
        if head_dim % 2 != 0 {
            return Err(ConfigError::Unsound(format!(
                "head_dim {head_dim} is odd: rotary embeddings need pairs"
            )));
        }
        let rope = raw.rope_parameters.as_ref();
        // Nested per layer type (`{"full_attention": {...}, ...}`): not this family.
        if rope.is_some_and(|r| {
            r.as_object().is_some_and(|o| {
                !o.is_empty() && !o.contains_key("rope_theta") && !o.contains_key("rope_type")
            })
        }) {
            return Err(ConfigError::Unsound(
                "rope_parameters given per layer type is not supported".to_string(),
            ));
        }
        // transformers 5 reads rope_parameters first.
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let scaling = raw.rope_scaling.as_ref().filter(|v| !v.is_null()).or(rope);
        let rope_scaling = rope_scaling(scaling, raw.max_position_embeddings)?;
        let qwen = architecture == Architecture::Qwen2;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let sliding_window = match architecture {
            Architecture::Qwen2 if raw.use_sliding_window != Some(true) => None,
            // MistralConfig's default when the key is absent (null means none).
            Architecture::Mistral if !has_key("sliding_window") => Some(4096),
            _ => raw.sliding_window.filter(|w| *w > 0),
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: positive("vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: positive("intermediate_size", raw.intermediate_size)?,
            num_layers: positive("num_hidden_layers", raw.num_hidden_layers)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            dtype: raw.torch_dtype.or(raw.dtype),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
        })
    }

    /// Parameters, counted from the shapes (for logs and memory).
    pub fn parameters(&self) -> i64 {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attention = h * q + 2 * h * kv + q * h;
        let layer = attention + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}

/// One id or a list of ids, as configs write `eos_token_id`.
pub fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn rope_scaling(
    value: Option<&serde_json::Value>,
    max_position_embeddings: Option<i64>,
) -> Result<RopeScaling, ConfigError> {
    let Some(value) = value else {
        return Ok(RopeScaling::None);
    };
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let number = |name: &str| {
        value.get(name).and_then(|v| v.as_f64()).ok_or_else(|| {
            ConfigError::Unsound(format!("rope_scaling of type {kind} needs {name}"))
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            // transformers falls back on the model's own positions.
            original_max_position_embeddings: number("original_max_position_embeddings")
                .or_else(|e| max_position_embeddings.map(|m| m as f64).ok_or(e))?,
        }),
        other => Err(ConfigError::Unsound(format!(
            "rope_scaling of type {other} is not supported (default, linear and llama3 are)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MISTRAL_7B: &str = r#"{
      "architectures": ["MistralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
      "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
      "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000,
      "bos_token_id": 1, "eos_token_id": 2}"#;

    #[test]
    fn mistral_7b_reads_as_the_original_served_it() {
        let c = ModelConfig::parse(MISTRAL_7B).unwrap();
        assert_eq!(c.architecture, Architecture::Mistral);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (32, 8, 128));
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        // 7.24 billion parameters, as the model card says.
        assert_eq!(c.parameters() / 10_000_000, 724);
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let err = ModelConfig::parse(r#"{"architectures": ["GPT2LMHeadModel"]}"#).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("GPT2LMHeadModel") && text.contains("Qwen2ForCausalLM"),
            "{text}"
        );
    }

    #[test]
    fn llama3_rope_scaling_and_eos_lists_are_read() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 100, "eos_token_id": [5, 7],
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}"#;
        let c = ModelConfig::parse(text).unwrap();
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert!(!c.qkv_bias);
    }
}
