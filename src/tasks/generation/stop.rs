//! Stop strings: a generation ends when its text contains one, and its answer's
//! text ends where the first one begins.

use std::collections::HashSet;
use std::sync::Arc;

use crate::tasks::tokenizer::TextTokenizer;

/// A request's stop strings, checked on the engine thread after each token.
pub struct StopStrings {
    tokenizer: Arc<TextTokenizer>,
    stops: Vec<String>,
    /// Tokens decoded per check: enough to hold the longest stop string (a token
    /// is at least one byte of text, and a few more cover a character split
    /// across tokens and a word's leading space).
    window: usize,
    /// Byte-fallback tokens: a run of them decodes only whole, so the window
    /// starts where the run it cuts into starts.
    byte_tokens: Arc<HashSet<u32>>,
}

/// Byte tokens the window reaches back over at most (a run longer than this is
/// not text a stop string ends in).
const MAX_BYTE_RUN: usize = 256;

impl StopStrings {
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        stops: Vec<String>,
        byte_tokens: Arc<HashSet<u32>>,
    ) -> StopStrings {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopStrings {
            tokenizer,
            stops,
            window: longest + 4,
            byte_tokens,
        }
    }

    /// Where the window of the last tokens starts: `window` tokens back, then
    /// back to the start of a run of byte tokens it would cut (a byte-fallback
    /// decoder turns a run that is not whole UTF-8 into U+FFFD, stop string and all).
    fn window_start(&self, generated: &[u32]) -> usize {
        let mut start = generated.len().saturating_sub(self.window);
        let floor = start.saturating_sub(MAX_BYTE_RUN);
        while start > floor && self.byte_tokens.contains(&generated[start - 1]) {
            start -= 1;
        }
        start
    }
}

impl StopStrings {
    /// Whether the text of the last few tokens holds a stop string: the newest
    /// token completes one only within them. Decoding that window (not the whole
    /// text) keeps each check's cost flat however long the generation, and
    /// decoding it whole each time sees a string that appears when a character's
    /// last byte arrives.
    pub fn stops(&mut self, generated: &[u32]) -> bool {
        let recent = &generated[self.window_start(generated)..];
        let Ok(text) = self.tokenizer.decode(recent) else {
            return false;
        };
        self.stops.iter().any(|s| text.contains(s.as_str()))
    }
}

/// A generation's text as it is answered, streamed or whole: its tokens decoded
/// together, cut where the first of `stops` begins; and whether one did. The
/// whole text is the judge: a stop string in it ends it there, whatever ended
/// the generation.
pub fn answer_text(
    tokenizer: &TextTokenizer,
    ids: &[u32],
    stops: &[String],
) -> Result<(String, bool), String> {
    let whole = tokenizer.decode(ids)?;
    Ok(match cut_at_first(&whole, stops) {
        Some(cut) => (cut, true),
        None => (whole, false),
    })
}

/// `text` up to where the first of `stops` begins, or `None` when none occurs.
pub fn cut_at_first(text: &str, stops: &[String]) -> Option<String> {
    let end = stops.iter().filter_map(|s| text.find(s.as_str())).min()?;
    Some(text[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::super::test_tokenizer::byte_fallback_tokenizer;
    use super::*;

    #[test]
    fn a_stop_string_after_multi_byte_characters_of_byte_tokens_is_seen_at_once() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let bytes = Arc::new(tokenizer.byte_token_ids());
        assert_eq!(bytes.len(), 10);
        // "Done✅✅\n✅✅": each ✅ is three byte tokens.
        let generated = [5, 2, 3, 4, 2, 3, 4, 1, 2, 3, 4, 2, 3, 4];
        assert_eq!(tokenizer.decode(&generated).unwrap(), "Done✅✅\n✅✅");
        let stops = vec!["\n".to_string()];
        let mut stop = StopStrings::new(tokenizer.clone(), stops.clone(), bytes);
        let first = (1..=generated.len()).find(|&n| stop.stops(&generated[..n]));
        assert_eq!(first, Some(8), "seen when the newline's token arrives");
        // A window that cuts into the run decodes it as U+FFFD, newline and all.
        let mut blind = StopStrings::new(tokenizer, stops, Arc::new(HashSet::new()));
        assert!(!blind.stops(&generated[..8]));
    }

    #[test]
    fn the_text_ends_before_the_first_stop_string() {
        let stops = vec!["world".to_string(), "lo w".to_string()];
        assert_eq!(cut_at_first("hello world", &stops).as_deref(), Some("hel"));
        assert_eq!(cut_at_first("no stop here", &stops), None);
    }
}
