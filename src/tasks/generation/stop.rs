//! Stop strings: a generation ends when its text contains one, and its answer's
//! text ends where the first one begins.

use std::sync::Arc;

use crate::engine::generation::StopCheck;
use crate::tasks::tokenizer::TextTokenizer;

/// A request's stop strings, checked on the engine thread after each token.
pub struct StopStrings {
    tokenizer: Arc<TextTokenizer>,
    stops: Vec<String>,
    /// The longest stop string, in bytes: only the text's tail can hold a new one.
    longest: usize,
    /// Bytes of text already looked at (no stop string ends within them).
    seen: usize,
}

impl StopStrings {
    pub fn new(tokenizer: Arc<TextTokenizer>, stops: Vec<String>) -> StopStrings {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopStrings {
            tokenizer,
            stops,
            longest,
            seen: 0,
        }
    }
}

impl StopCheck for StopStrings {
    fn stops(&mut self, generated: &[u32]) -> bool {
        let Ok(text) = self.tokenizer.decode(generated) else {
            return false;
        };
        // A stop string that ends in the new text starts at most `longest` bytes
        // before it.
        let mut from = self.seen.saturating_sub(self.longest).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.seen = text.len();
        let tail = &text[from..];
        self.stops.iter().any(|s| tail.contains(s.as_str()))
    }
}

/// `text` up to where the first of `stops` begins (all of it when none occurs).
pub fn cut_at_first(text: &str, stops: &[String]) -> String {
    let end = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_ends_before_the_first_stop_string() {
        let stops = vec!["world".to_string(), "lo w".to_string()];
        assert_eq!(cut_at_first("hello world", &stops), "hel");
        assert_eq!(cut_at_first("no stop here", &stops), "no stop here");
    }
}
