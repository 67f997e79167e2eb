//! The room for the `tokenizers` crate: text to token ids, as Python's fast
//! tokenizers do it, from the model's own `tokenizer.json`.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// One text's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1 for each token (the batcher pads with 0s).
    pub attention_mask: Vec<u32>,
    /// The text had more tokens than the limit; these are its first ones.
    pub truncated: bool,
}

/// A tokenizer that truncates to the model's longest input and never pads (the
/// batcher pads each batch to its own longest text).
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same, without truncation: to tell a text of exactly `max_tokens` from a
    /// truncated one where the tokenizer does not report what it cut (a tokenizer
    /// with no post-processor drops its overflow record).
    untruncated: Tokenizer,
    max_tokens: usize,
    pad_id: Option<u32>,
}

impl TextTokenizer {
    /// Reads `tokenizer.json` and sets truncation to `max_tokens`, special tokens
    /// included.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self, String> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| format!("cannot read the tokenizer {}: {e}", path.display()))?;
        let pad_id = inner.get_padding().map(|p| p.pad_id);
        inner.with_padding(None);
        let mut untruncated = inner.clone();
        untruncated
            .with_truncation(None)
            .map_err(|e| format!("cannot turn truncation off: {e}"))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| format!("cannot truncate to {max_tokens} tokens: {e}"))?;
        Ok(TextTokenizer {
            inner,
            untruncated,
            max_tokens,
            pad_id,
        })
    }

    /// The pad token id the tokenizer declares, if it declares one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Tokenizes each text, special tokens added.
    pub fn encode(&self, texts: &[String]) -> Result<Vec<Tokens>, String> {
        // One text at a time on the caller's (blocking) thread: `encode_batch` hands
        // the texts to rayon's pool, more threads on the cores libtorch's threads
        // compute on, for no gain the embedding benchmark could see.
        texts
            .iter()
            .map(|text| {
                let e = self
                    .inner
                    .encode(text.as_str(), true)
                    .map_err(|e| format!("cannot tokenize: {e}"))?;
                // Only a text that fills the limit can have been cut.
                let truncated = e.len() >= self.max_tokens
                    && (!e.get_overflowing().is_empty() || self.count(text)? > self.max_tokens);
                Ok(Tokens {
                    truncated,
                    ids: e.get_ids().to_vec(),
                    type_ids: e.get_type_ids().to_vec(),
                    attention_mask: e.get_attention_mask().to_vec(),
                })
            })
            .collect()
    }

    /// Tokens in `text` with nothing cut.
    fn count(&self, text: &str) -> Result<usize, String> {
        self.untruncated
            .encode(text, true)
            .map(|e| e.len())
            .map_err(|e| format!("cannot tokenize: {e}"))
    }
}
