//! A SentencePiece-style tokenizer for the task's unit tests, as Llama 2's and
//! Mistral's: `▁` for a space, byte-fallback tokens for characters the
//! vocabulary lacks ("\n", "ö", "✅", "日", "本" exist only as bytes), and a
//! decoder that drops the first token's space.

use std::sync::Arc;

use crate::tasks::tokenizer::TextTokenizer;

/// Ids of [`byte_fallback_tokenizer`]'s vocabulary.
pub mod id {
    pub const NEWLINE: u32 = 1;
    /// "✅" is these three.
    pub const CHECK: [u32; 3] = [2, 3, 4];
    pub const DONE: u32 = 5;
    /// "▁hello"
    pub const HELLO: u32 = 6;
    /// "▁w"
    pub const W: u32 = 7;
    /// "rld"
    pub const RLD: u32 = 8;
    /// "▁"
    pub const SPACE: u32 = 9;
    /// "ö" is these two.
    pub const O_UMLAUT: [u32; 2] = [10, 11];
    /// "日" is these three.
    pub const NICHI: [u32; 3] = [12, 13, 14];
    /// "本" is these three (0xE6 0x9C 0xAC).
    pub const HON: [u32; 3] = [12, 3, 15];
    /// "</s>", a special token (no text when decoded).
    pub const SPECIAL: u32 = 16;
}

/// The tokenizer, in a folder that lives as long as the first value.
pub fn byte_fallback_tokenizer() -> (tempfile::TempDir, Arc<TextTokenizer>) {
    let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [
        {"id": 16, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
         "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true,
            "vocab": {"<unk>": 0, "<0x0A>": 1, "<0xE2>": 2, "<0x9C>": 3, "<0x85>": 4, "Done": 5,
                "\u2581hello": 6, "\u2581w": 7, "rld": 8, "\u2581": 9, "<0xC3>": 10, "<0xB6>": 11,
                "<0xE6>": 12, "<0x97>": 13, "<0xA5>": 14, "<0xAC>": 15, "</s>": 16},
            "merges": []}}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    (dir, Arc::new(TextTokenizer::from_file(&path, 64).unwrap()))
}
