//! Text as tokens arrive: whole characters only, and never text a stop string
//! could still take back, so that a stream's deltas, concatenated, are the text
//! the whole generation decodes to.

use super::super::tokenizer::TextTokenizer;

/// Turns a growing list of token ids into text, a piece at a time.
///
/// Each piece is the text of the new tokens decoded together with the tokens of
/// the piece before (as text-generation-inference does): decoders that drop the
/// space of a sequence's first token (SentencePiece's `▁`) or that join bytes
/// into characters (byte-level BPE, byte fallback) then give each token the same
/// text it has in the whole. A piece whose text ends in U+FFFD (a character
/// whose bytes have not all arrived) waits for the next token.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Where the context of the next piece starts (the last piece's tokens).
    prefix: usize,
    /// The tokens whose text was given.
    read: usize,
}

impl Detokenizer {
    /// The text `ids` (every token so far) adds to what was given: empty while
    /// a character is incomplete.
    pub fn next(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String, String> {
        if ids.len() <= self.read {
            return Ok(String::new());
        }
        let before = tokenizer.decode(&ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&ids[self.prefix..])?;
        if after.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // A decoder whose text of the longer run does not extend the shorter's
        // (none we know of): wait, and the end gives the rest from the whole.
        let Some(new) = after.strip_prefix(before.as_str()) else {
            return Ok(String::new());
        };
        // Tokens that give no text (a special token skipped) are not a piece of
        // their own: a piece decoded after them alone would lose its leading
        // space to the decoder's strip of a first token.
        if new.is_empty() {
            return Ok(String::new());
        }
        let new = new.to_string();
        self.prefix = self.read;
        self.read = ids.len();
        Ok(new)
    }
}

/// How much of `unsent` (text after all that was given) can be given now: up
/// to where any stop string occurs, or could begin (a suffix of `unsent` that
/// is the start of a stop string waits for the tokens that settle it).
///
/// Text given this way is always a prefix of the text cut at the first stop
/// string: an occurrence that starts in given text would have been held back,
/// whole or in part, when that text was given.
pub fn releasable(unsent: &str, stops: &[String]) -> usize {
    let mut safe = unsent.len();
    for stop in stops {
        if let Some(at) = unsent.find(stop.as_str()) {
            safe = safe.min(at);
            continue;
        }
        // The longest suffix of `unsent` that is a proper prefix of `stop`.
        let from = unsent.len().saturating_sub(stop.len().saturating_sub(1));
        if let Some(at) = (from..unsent.len())
            .filter(|&i| unsent.is_char_boundary(i))
            .find(|&i| stop.starts_with(&unsent[i..]))
        {
            safe = safe.min(at);
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::super::test_tokenizer::{byte_fallback_tokenizer, id};
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn text_is_held_where_a_stop_string_occurs_or_could_begin() {
        let s = stops(&["\n\nUser:", "END"]);
        assert_eq!(releasable("hello world", &s), 11);
        assert_eq!(releasable("hello\n", &s), 5);
        assert_eq!(releasable("hello\n\nUs", &s), 5);
        assert_eq!(releasable("hello\n\nUser: hi", &s), 5);
        assert_eq!(releasable("the EN", &s), 4);
        assert_eq!(releasable("the END of it", &s), 4);
        // A character boundary is respected: "é" is two bytes.
        assert_eq!(releasable("café", &stops(&["é!"])), 3);
        assert_eq!(releasable("", &s), 0);
        assert_eq!(releasable("abc", &[]), 3);
    }

    /// Feeds `ids` one token at a time and checks each piece and the whole.
    fn streamed(tokenizer: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        let mut detokenizer = Detokenizer::default();
        let mut pieces = Vec::new();
        for end in 1..=ids.len() {
            let piece = detokenizer.next(tokenizer, &ids[..end]).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            pieces.push(piece);
        }
        pieces
    }

    #[test]
    fn sentencepiece_pieces_keep_their_spaces_and_wait_for_whole_characters() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let ids: Vec<u32> = [id::HELLO, id::W]
            .into_iter()
            .chain(id::O_UMLAUT)
            .chain([id::RLD, id::SPACE])
            .chain(id::NICHI)
            .chain(id::HON)
            .chain([id::HELLO, id::NEWLINE])
            .chain(id::CHECK)
            .collect();
        let text = "hello wörld 日本 hello\n✅";
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        let pieces = streamed(&tokenizer, &ids);
        assert_eq!(pieces.concat(), text);
        // The first piece lost its space as the whole does; later ones keep theirs.
        assert_eq!(pieces[0], "hello");
        assert_eq!(pieces[1], " w");
        // Each byte of a character but its last gave nothing.
        assert_eq!(pieces[2], "");
        assert_eq!(pieces[3], "ö");
        assert_eq!(
            pieces.iter().filter(|p| p.is_empty()).count(),
            1 + 2 + 2 + 2
        );
    }

    #[test]
    fn a_special_token_alone_keeps_the_next_pieces_space() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        // "</s>" is skipped in the text; "▁w" after it keeps its space.
        let ids = [id::HELLO, id::SPECIAL, id::W, id::RLD];
        assert_eq!(tokenizer.decode(&ids).unwrap(), "hello wrld");
        assert_eq!(streamed(&tokenizer, &ids).concat(), "hello wrld");
    }

    #[test]
    fn several_tokens_at_once_give_the_same_text() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let ids: Vec<u32> = [id::DONE, id::SPACE]
            .into_iter()
            .chain(id::NICHI)
            .chain([id::HELLO])
            .chain(id::CHECK)
            .collect();
        let mut detokenizer = Detokenizer::default();
        // A pull that finds a character half made gives what is whole before it.
        let first = detokenizer.next(&tokenizer, &ids[..3]).unwrap();
        assert_eq!(first, "");
        let second = detokenizer.next(&tokenizer, &ids[..6]).unwrap();
        let third = detokenizer.next(&tokenizer, &ids).unwrap();
        assert_eq!(format!("{first}{second}{third}"), "Done 日 hello✅");
        assert_eq!(second, "Done 日 hello");
    }
}
