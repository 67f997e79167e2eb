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

/// Bytes of text per token that a long text is first cut at (most tokens are a
/// few bytes; a text that has fewer tokens in that much is looked at further).
const BYTES_PER_TOKEN: usize = 16;
/// The shortest cut: texts below it are tokenized whole.
const MIN_CUT: usize = 4096;

/// The text up to the last whitespace at or before byte `cut`: tokenizers split
/// words at whitespace, so the prefix's tokens are the text's first tokens.
fn word_prefix(text: &str, cut: usize) -> &str {
    let mut end = cut.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        Some(space) => &text[..space],
        None => "",
    }
}

fn tokens(e: &tokenizers::Encoding, truncated: bool) -> Tokens {
    Tokens {
        truncated,
        ids: e.get_ids().to_vec(),
        type_ids: e.get_type_ids().to_vec(),
        attention_mask: e.get_attention_mask().to_vec(),
    }
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

    /// The ids of byte-fallback tokens (`<0x0A>`, `<0xE2>`...), which
    /// SentencePiece-style tokenizers (Llama 2, Mistral) use for bytes outside
    /// their vocabulary: a character may take several of them.
    pub fn byte_token_ids(&self) -> std::collections::HashSet<u32> {
        self.inner
            .get_vocab(true)
            .into_iter()
            .filter(|(token, _)| {
                token.len() == 6
                    && token.starts_with("<0x")
                    && token.ends_with('>')
                    && token[3..5].chars().all(|c| c.is_ascii_hexdigit())
            })
            .map(|(_, id)| id)
            .collect()
    }

    /// The pad token id the tokenizer declares, if it declares one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Tokenizes one text, special tokens added. A long text is cut before
    /// tokenizing, at a word boundary far enough in to hold more tokens than the
    /// limit: its first tokens are the same, and megabytes of text cost no more
    /// than a page. Texts go one at a time on the caller's (blocking) thread:
    /// `encode_batch` hands them to rayon's pool, more threads on the cores
    /// libtorch's threads compute on, for no gain the embedding benchmark saw.
    pub fn encode_one(&self, text: &str) -> Result<Tokens, String> {
        self.encode_with(text, true)
    }

    /// Tokenizes one text as it is, adding no special tokens (`transformers`'
    /// `tokenizer(text, add_special_tokens=False)`): for a text that already
    /// holds them, such as a rendered chat template. Special tokens written in
    /// the text (`<s>`, `<|im_start|>`) are still recognized as such. Truncated
    /// to the limit as [`Self::encode_one`] is.
    pub fn encode_plain(&self, text: &str) -> Result<Tokens, String> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Tokens, String> {
        let mut cut = self.max_tokens.saturating_mul(BYTES_PER_TOKEN).max(MIN_CUT);
        while cut < text.len() {
            let prefix = word_prefix(text, cut);
            if !prefix.is_empty() && self.count_with(prefix, special)? > self.max_tokens {
                let e = self.tokenize(prefix, special)?;
                return Ok(tokens(&e, true));
            }
            // Few, long tokens (or no word boundary): look further in.
            cut = cut.saturating_mul(4);
        }
        let e = self.tokenize(text, special)?;
        // Only a text that fills the limit can have been cut.
        let truncated = e.len() >= self.max_tokens
            && (!e.get_overflowing().is_empty()
                || self.count_with(text, special)? > self.max_tokens);
        Ok(tokens(&e, truncated))
    }

    /// The text of `ids`, special tokens left out (as `transformers`'
    /// `decode(ids, skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| format!("cannot decode tokens: {e}"))
    }

    fn tokenize(&self, text: &str, special: bool) -> Result<tokenizers::Encoding, String> {
        self.inner
            .encode(text, special)
            .map_err(|e| format!("cannot tokenize: {e}"))
    }

    /// Tokens in `text` with nothing cut, special tokens included.
    pub fn count(&self, text: &str) -> Result<usize, String> {
        self.count_with(text, true)
    }

    /// Tokens in `text` with nothing cut, special tokens added when `special`.
    fn count_with(&self, text: &str, special: bool) -> Result<usize, String> {
        self.untruncated
            .encode(text, special)
            .map(|e| e.len())
            .map_err(|e| format!("cannot tokenize: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with a [CLS] .. [SEP] template, as BERT's.
    fn tokenizer(max_tokens: usize) -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [
              {"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
              {"id": 3, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
              {"id": 4, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
              "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [3], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [4], "tokens": ["[SEP]"]}}},
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "[CLS]": 3, "[SEP]": 4}, "unk_token": "[UNK]"}}"#;
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        (dir, TextTokenizer::from_file(&path, max_tokens).unwrap())
    }

    #[test]
    fn a_huge_text_is_cut_before_tokenizing_and_gives_the_same_tokens() {
        let (_dir, tok) = tokenizer(8);
        let huge = "hello world ".repeat(500_000); // 6 MB
        let cut = tok.encode_one(&huge).unwrap();
        let whole = tok.inner.encode(huge.as_str(), true).unwrap();
        assert_eq!(cut.ids, whole.get_ids());
        assert_eq!(cut.ids, vec![3, 1, 2, 1, 2, 1, 2, 4]);
        assert!(cut.truncated);
        // The cut is at a word boundary within the first few KB.
        let prefix = word_prefix(&huge, (8 * BYTES_PER_TOKEN).max(MIN_CUT));
        assert!(prefix.len() <= MIN_CUT && prefix.ends_with("world"));
    }

    #[test]
    fn a_plain_text_gets_no_special_tokens_but_keeps_those_it_holds() {
        let (_dir, tok) = tokenizer(4);
        let plain = tok.encode_plain("hello world").unwrap();
        assert_eq!((plain.ids, plain.truncated), (vec![1, 2], false));
        assert_eq!(plain.attention_mask, vec![1, 1]);
        // Special tokens written in the text are recognized, not added.
        let written = tok.encode_plain("[CLS] hello [SEP]").unwrap();
        assert_eq!(written.ids, vec![3, 1, 4]);
        // Truncated to the limit like encode_one, the cut long text too.
        let over = tok.encode_plain("hello world hello world hello").unwrap();
        assert_eq!((over.ids, over.truncated), (vec![1, 2, 1, 2], true));
        let fits = tok.encode_plain("hello world hello world").unwrap();
        assert_eq!((fits.ids.len(), fits.truncated), (4, false));
        let huge = tok.encode_plain(&"hello world ".repeat(100_000)).unwrap();
        assert_eq!((huge.ids, huge.truncated), (vec![1, 2, 1, 2], true));
    }

    #[test]
    fn texts_near_the_limit_are_told_truncated_exactly() {
        let (_dir, tok) = tokenizer(4);
        let fits = tok.encode_one("hello world").unwrap();
        assert_eq!((fits.ids.len(), fits.truncated), (4, false));
        let over = tok.encode_one("hello world hello").unwrap();
        assert_eq!((over.ids, over.truncated), (vec![3, 1, 2, 4], true));
        // A long text of one giant word has no boundary to cut at: whole, as before.
        let word = "x".repeat(10_000);
        assert_eq!(tok.encode_one(&word).unwrap().ids, vec![3, 0, 4]);
    }
}
