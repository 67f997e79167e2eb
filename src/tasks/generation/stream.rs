//! A generation's text as it is made: the node's side of a stream. The engine
//! thread only appends token ids ([`Unpulled`]); each pull takes what arrived
//! since the last one and turns it into text here, so a caller slower than the
//! model gets fewer, larger deltas and the node keeps nothing but the ids it
//! has not pulled yet.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness_client::{FinishReason, GenerationDelta, GenerationEnd, ServingError, StreamChunk};

use super::detokenize::{releasable, Detokenizer};
use super::stop::answer_text;
use super::watcher::Unpulled;
use crate::tasks::tokenizer::TextTokenizer;

/// How a stream's generation ended, as the engine answered it.
pub type Ending = Result<Ended, ServingError>;

/// A generation that ran to its end (or was cancelled).
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub reason: FinishReason,
    /// When its first token was chosen.
    pub first_token: Option<Instant>,
}

/// Where a stream's generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Running,
    /// It ended; `cancelled`: because its caller cancelled or left, so no one
    /// will pull what is left.
    Ended {
        cancelled: bool,
    },
}

/// One open stream.
pub struct TextStream {
    unpulled: Arc<Unpulled>,
    ending: Mutex<Option<Ending>>,
    progress: tokio::sync::watch::Sender<Progress>,
    /// A pull is waiting (one at a time: a second would split the tokens).
    pulling: AtomicBool,
    cancelled: Arc<AtomicBool>,
    reader: Mutex<Reader>,
    tokenizer: Arc<TextTokenizer>,
    stops: Vec<String>,
    prompt_tokens: u32,
    received: Instant,
}

/// What the pulls have taken and given so far.
#[derive(Default)]
struct Reader {
    /// Every token pulled (the detokenizer's context, and the whole at the end).
    ids: Vec<u32>,
    detokenizer: Detokenizer,
    /// Final text not given yet because a stop string could begin in it.
    held: String,
    /// The text given, by length and hash: checked against the whole at the end.
    given: usize,
    given_hash: DefaultHasher,
    ended: bool,
}

impl TextStream {
    /// A stream whose engine thread appends to `unpulled`; `cancelled` ends
    /// its sequence at the engine's next step.
    pub fn new(
        unpulled: Arc<Unpulled>,
        cancelled: Arc<AtomicBool>,
        tokenizer: Arc<TextTokenizer>,
        stops: Vec<String>,
        prompt_tokens: u32,
        received: Instant,
    ) -> TextStream {
        TextStream {
            unpulled,
            ending: Mutex::new(None),
            progress: tokio::sync::watch::channel(Progress::Running).0,
            pulling: AtomicBool::new(false),
            cancelled,
            reader: Mutex::new(Reader::default()),
            tokenizer,
            stops,
            prompt_tokens,
            received,
        }
    }

    /// Tokens in the prompt.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// Token ids made and not pulled yet (what a slow caller costs the node:
    /// 4 bytes each).
    pub fn unpulled(&self) -> usize {
        self.unpulled.len()
    }

    /// The engine answered: the next pull gives the rest and the end.
    pub fn end(&self, ending: Ending) {
        let cancelled = matches!(
            ending,
            Ok(Ended {
                reason: FinishReason::Cancelled,
                ..
            })
        );
        if let Ok(mut slot) = self.ending.lock() {
            *slot = Some(ending);
        }
        self.unpulled.wake();
        self.progress.send_replace(Progress::Ended { cancelled });
    }

    /// Resolves when the generation has ended, with how.
    pub async fn ended(&self) -> Progress {
        let mut progress = self.progress.subscribe();
        let ended = progress.wait_for(|p| *p != Progress::Running).await;
        ended.map_or(Progress::Ended { cancelled: true }, |p| *p)
    }

    /// Ends the generation at the engine's next step (the caller dropped it).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// What was made since the last pull: at once if anything was, else when
    /// the next token comes or the generation ends, or an empty delta after
    /// `wait`. The last chunk carries the end; an error ends the stream too.
    pub async fn pull(&self, wait: Duration) -> Result<StreamChunk, ServingError> {
        if self.pulling.swap(true, Ordering::AcqRel) {
            return Err(ServingError::BadInput {
                reason: "another pull of this stream is waiting: pull one at a time".to_string(),
            });
        }
        let _one = OnePull(&self.pulling);
        let until = tokio::time::Instant::now() + wait;
        loop {
            if let Some(chunk) = self.read() {
                return chunk;
            }
            if tokio::time::timeout_at(until, self.unpulled.arrival())
                .await
                .is_err()
            {
                return self.read().unwrap_or_else(|| Ok(empty()));
            }
        }
    }

    /// The chunk of what arrived, or `None` when nothing did.
    fn read(&self) -> Option<Result<StreamChunk, ServingError>> {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if reader.ended {
            return Some(Ok(empty()));
        }
        // The end is looked at before the tokens are taken: the engine appends
        // every token before it answers, so none can be missed.
        let ending = self.ending.lock().ok().and_then(|mut e| e.take());
        let new = self.unpulled.take();
        if new.is_empty() && ending.is_none() {
            return None;
        }
        let reader = &mut *reader;
        reader.ids.extend_from_slice(&new);
        let mut text = match reader.detokenizer.next(&self.tokenizer, &reader.ids) {
            Ok(piece) => {
                reader.held.push_str(&piece);
                let safe = releasable(&reader.held, &self.stops);
                reader.held.drain(..safe).collect::<String>()
            }
            Err(err) => return Some(Err(crate::tasks::internal(err))),
        };
        let end = match ending {
            None => None,
            Some(Err(err)) => {
                reader.ended = true;
                return Some(Err(err));
            }
            Some(Ok(ended)) => {
                reader.ended = true;
                let rest = match self.rest(reader, &text) {
                    Ok(rest) => rest,
                    Err(err) => return Some(Err(err)),
                };
                text.push_str(&rest.0);
                Some(GenerationEnd {
                    finish_reason: rest.1.unwrap_or(ended.reason),
                    prompt_tokens: self.prompt_tokens,
                    generated_tokens: reader.ids.len() as u32,
                    time_to_first_token_ms: ended.first_token.map_or(0.0, |t| {
                        t.saturating_duration_since(self.received).as_secs_f64() * 1000.0
                    }),
                })
            }
        };
        reader.given += text.len();
        reader.given_hash.write(text.as_bytes());
        Some(Ok(StreamChunk {
            delta: GenerationDelta {
                text,
                token_ids: new,
            },
            end,
        }))
    }

    /// The text after all given (`giving` about to be): the whole generation
    /// decoded and cut at its first stop string, as a `Generate` answer's text,
    /// less what was given; and `Stop` when a stop string cut it.
    fn rest(
        &self,
        reader: &Reader,
        giving: &str,
    ) -> Result<(String, Option<FinishReason>), ServingError> {
        let (whole, stopped) = answer_text(&self.tokenizer, &reader.ids, &self.stops)
            .map_err(crate::tasks::internal)?;
        let stopped = stopped.then_some(FinishReason::Stop);
        let given = reader.given + giving.len();
        let mut hash = reader.given_hash.clone();
        hash.write(giving.as_bytes());
        let mut whole_hash = DefaultHasher::new();
        whole_hash.write(whole.as_bytes().get(..given).unwrap_or_default());
        if whole.len() < given || whole_hash.finish() != hash.finish() {
            // Not seen with any tokenizer we test; said, so that it is found.
            tracing::warn!(
                "a stream's deltas differ from its whole text (the tokenizer's decoder is not incremental): the streamed text may differ from Generate's"
            );
            return Ok((String::new(), stopped));
        }
        Ok((whole.get(given..).unwrap_or_default().to_string(), stopped))
    }
}

impl Drop for TextStream {
    /// A stream no one can pull any more ends its generation.
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Marks the stream's pull done, however the pull ends.
struct OnePull<'a>(&'a AtomicBool);

impl Drop for OnePull<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn empty() -> StreamChunk {
    StreamChunk {
        delta: GenerationDelta::default(),
        end: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_tokenizer::{byte_fallback_tokenizer, id};
    use super::*;

    fn stream(tokenizer: Arc<TextTokenizer>, stops: &[&str]) -> (Arc<Unpulled>, TextStream) {
        let unpulled = Arc::new(Unpulled::default());
        let stream = TextStream::new(
            unpulled.clone(),
            Arc::new(AtomicBool::new(false)),
            tokenizer,
            stops.iter().map(|s| s.to_string()).collect(),
            3,
            Instant::now(),
        );
        (unpulled, stream)
    }

    fn push(unpulled: &Unpulled, ids: &[u32]) {
        for &id in ids {
            unpulled.push(id);
        }
    }

    #[tokio::test]
    async fn pulls_coalesce_what_arrived_and_end_with_the_whole_text() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let (unpulled, stream) = stream(tokenizer, &[]);
        // Nothing yet: an empty delta after the wait.
        let chunk = stream.pull(Duration::from_millis(20)).await.unwrap();
        assert_eq!(chunk.delta, GenerationDelta::default());
        push(&unpulled, &[id::HELLO, id::W]);
        push(&unpulled, &id::O_UMLAUT[..1]);
        let chunk = stream.pull(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            chunk.delta.token_ids,
            vec![id::HELLO, id::W, id::O_UMLAUT[0]]
        );
        // The half-made "ö" waits, and with it the text before it in this pull.
        assert_eq!(chunk.delta.text, "");
        push(&unpulled, &id::O_UMLAUT[1..]);
        push(&unpulled, &[id::RLD]);
        stream.end(Ok(Ended {
            reason: FinishReason::Length,
            first_token: None,
        }));
        let chunk = stream.pull(Duration::from_secs(5)).await.unwrap();
        assert_eq!(chunk.delta.text, "hello wörld");
        let end = chunk.end.expect("the end");
        assert_eq!(end.finish_reason, FinishReason::Length);
        assert_eq!((end.prompt_tokens, end.generated_tokens), (3, 5));
    }

    #[tokio::test]
    async fn a_pull_waiting_wakes_when_a_token_comes() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let (unpulled, stream) = stream(tokenizer, &[]);
        let stream = Arc::new(stream);
        let pulling = tokio::spawn({
            let stream = stream.clone();
            async move { stream.pull(Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        push(&unpulled, &[id::DONE]);
        let chunk = tokio::time::timeout(Duration::from_secs(5), pulling)
            .await
            .expect("woken")
            .unwrap()
            .unwrap();
        assert_eq!(chunk.delta.text, "Done");
    }

    #[tokio::test]
    async fn text_a_stop_string_could_take_is_held_then_cut() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let (unpulled, stream) = stream(tokenizer, &[" wör"]);
        push(&unpulled, &[id::HELLO, id::W]);
        let chunk = stream.pull(Duration::from_secs(5)).await.unwrap();
        // " w" could begin " wör": held.
        assert_eq!(chunk.delta.text, "hello");
        push(&unpulled, &id::O_UMLAUT);
        push(&unpulled, &[id::RLD]);
        stream.end(Ok(Ended {
            reason: FinishReason::Stop,
            first_token: None,
        }));
        let chunk = stream.pull(Duration::from_secs(5)).await.unwrap();
        assert_eq!(chunk.delta.text, "");
        assert_eq!(chunk.end.unwrap().finish_reason, FinishReason::Stop);
    }

    #[tokio::test]
    async fn a_second_pull_while_one_waits_is_refused() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let (unpulled, stream) = stream(tokenizer, &[]);
        let stream = Arc::new(stream);
        let waiting = tokio::spawn({
            let stream = stream.clone();
            async move { stream.pull(Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = stream.pull(Duration::from_secs(1)).await;
        assert!(
            matches!(second, Err(ServingError::BadInput { .. })),
            "{second:?}"
        );
        push(&unpulled, &[id::DONE]);
        assert_eq!(waiting.await.unwrap().unwrap().delta.text, "Done");
        // The first is done: pulls go on.
        assert!(stream.pull(Duration::from_millis(10)).await.is_ok());
    }

    #[tokio::test]
    async fn an_error_ends_the_stream() {
        let (_dir, tokenizer) = byte_fallback_tokenizer();
        let (unpulled, stream) = stream(tokenizer, &[]);
        push(&unpulled, &[id::DONE]);
        stream.end(Err(ServingError::DeadlineExceeded { waited_ms: 5 }));
        let err = stream.pull(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err, ServingError::DeadlineExceeded { waited_ms: 5 });
    }
}
