//! Stop strings: a generation ends when its text contains one, and its answer's
//! text ends where the first one begins.

use std::sync::Arc;

use crate::engine::generation::StopCheck;
use crate::tasks::tokenizer::TextTokenizer;

/// A request's stop strings, checked on the engine thread after each token.
pub struct StopStrings {
    tokenizer: Arc<TextTokenizer>,
    stops: Vec<String>,
    /// Tokens decoded per check: enough to hold the longest stop string (a token
    /// is at least one byte of text, and a few more cover a character split
    /// across tokens and a word's leading space).
    window: usize,
}

impl StopStrings {
    pub fn new(tokenizer: Arc<TextTokenizer>, stops: Vec<String>) -> StopStrings {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopStrings {
            tokenizer,
            stops,
            window: longest + 4,
        }
    }
}

impl StopCheck for StopStrings {
    /// Whether the text of the last few tokens holds a stop string: the newest
    /// token completes one only within them. Decoding that window (not the whole
    /// text) keeps each check's cost flat however long the generation, and
    /// decoding it whole each time sees a string that appears when a character's
    /// last byte arrives.
    fn stops(&mut self, generated: &[u32]) -> bool {
        let recent = &generated[generated.len().saturating_sub(self.window)..];
        let Ok(text) = self.tokenizer.decode(recent) else {
            return false;
        };
        self.stops.iter().any(|s| text.contains(s.as_str()))
    }
}

/// `text` up to where the first of `stops` begins, or `None` when none occurs.
pub fn cut_at_first(text: &str, stops: &[String]) -> Option<String> {
    let end = stops.iter().filter_map(|s| text.find(s.as_str())).min()?;
    Some(text[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_ends_before_the_first_stop_string() {
        let stops = vec!["world".to_string(), "lo w".to_string()];
        assert_eq!(cut_at_first("hello world", &stops).as_deref(), Some("hel"));
        assert_eq!(cut_at_first("no stop here", &stops), None);
    }
}
