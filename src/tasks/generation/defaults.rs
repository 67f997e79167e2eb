//! A model's `generation_config.json`: the defaults of a request that does not say
//! (sampling, lengths, end-of-sequence ids).

use crate::engine::generation::config::token_ids;

/// Settings of `generation_config.json` this node does not apply, with the values
/// that mean "off".
#[allow(clippy::type_complexity)]
const UNSUPPORTED: &[(&str, fn(&serde_json::Value) -> bool)] = &[
    ("repetition_penalty", |v| v.as_f64() == Some(1.0)),
    ("min_new_tokens", |v| v.as_u64() == Some(0)),
    ("min_length", |v| v.as_u64() == Some(0)),
    ("no_repeat_ngram_size", |v| v.as_u64() == Some(0)),
    ("min_p", |_| false),
    ("typical_p", |v| v.as_f64() == Some(1.0)),
    ("suppress_tokens", |v| {
        v.as_array().is_some_and(|a| a.is_empty())
    }),
    ("num_beams", |v| v.as_u64() == Some(1)),
];

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
    /// Settings it makes that this node does not apply (`repetition_penalty`
    /// other than 1, ...), for a warning at load.
    pub unsupported: Vec<String>,
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
            unsupported: UNSUPPORTED
                .iter()
                .filter(|(name, neutral)| {
                    value
                        .get(*name)
                        .is_some_and(|v| !v.is_null() && !neutral(v))
                })
                .map(|(name, _)| format!("{name} = {}", value[*name]))
                .collect(),
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
        assert!(d.unsupported.is_empty());
        let d = Defaults::parse(r#"{"repetition_penalty": 1.05, "num_beams": 1}"#).unwrap();
        assert_eq!(d.unsupported, vec!["repetition_penalty = 1.05".to_string()]);
    }
}
