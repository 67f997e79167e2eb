//! A model's `generation_config.json`: the defaults of a request that does not say
//! (sampling, lengths, end-of-sequence ids).

use crate::engine::generation::config::token_ids;

/// What `generation_config.json` sets; unset fields take `transformers`' defaults
/// where the request is built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Defaults {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub max_new_tokens: Option<u32>,
    /// Prompt and output together, as older configs bound generation.
    pub max_length: Option<u32>,
    /// One id or several (Llama 3 ends on two).
    pub eos_token_ids: Vec<u32>,
}

impl Defaults {
    /// Reads `generation_config.json`'s text.
    pub fn parse(text: &str) -> Result<Defaults, String> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("generation_config.json is not JSON: {e}"))?;
        let number = |name: &str| value.get(name).and_then(|v| v.as_f64());
        let count = |name: &str| value.get(name).and_then(|v| v.as_u64()).map(|n| n as u32);
        Ok(Defaults {
            do_sample: value
                .get("do_sample")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            temperature: number("temperature").map(|t| t as f32),
            top_p: number("top_p").map(|p| p as f32),
            top_k: count("top_k"),
            max_new_tokens: count("max_new_tokens"),
            max_length: count("max_length"),
            eos_token_ids: token_ids(value.get("eos_token_id")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_style_defaults_are_read() {
        let d = Defaults::parse(
            r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128009]}"#,
        )
        .unwrap();
        assert!(d.do_sample);
        assert_eq!(d.eos_token_ids, vec![128001, 128009]);
        assert_eq!(d.top_k, None);
    }
}
