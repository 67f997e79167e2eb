//! [`GenerationStream`]: a generation's text as the node makes it.
//!
//! [`HarnessClient::generate_stream`](crate::HarnessClient::generate_stream)
//! opens the stream on one serving; a background task then long-polls that
//! serving (`PullStream`) and hands each chunk to the stream through a channel
//! of one. The task reserves the channel's slot before it pulls, so at most one
//! chunk waits ahead of the consumer: while a slow consumer reads, the node
//! gathers what it makes into the next chunk instead of this client buffering it.
//!
//! The task ends when the node answers the end, when a pull fails (the
//! serving's error, the node gone, no answer), when the deadline passes, or
//! when the stream is dropped (it is aborted then, and the node told by a
//! `CancelStream` cast unless the node had already ended the stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::{FusedStream, Stream};
use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::ClientError;
use crate::protocol::{
    CancelRequest, Generation, GenerationDelta, GenerationEnd, Payload, PullRequest, ServingError,
    ServingMessage, StreamChunk, StreamOpened, PROTOCOL_VERSION,
};

/// How long one pull waits on the node for a token (the node takes at most 10 s).
const PULL_WAIT: Duration = Duration::from_secs(3);
/// How much longer than its wait a pull's answer may take (transit, a busy
/// serving) before the node is taken for hung.
const PULL_GRACE: Duration = Duration::from_secs(5);

/// A generation's text as it is made: a [`Stream`] of [`GenerationDelta`]s,
/// from [`HarnessClient::generate_stream`](crate::HarnessClient::generate_stream).
///
/// Each delta holds what the node made since the previous one (never empty);
/// concatenated, their texts and ids are the whole generation's. After the last
/// delta the stream ends, and [`GenerationStream::end`] tells why the generation
/// ended and its counts. An error (the serving's, the node lost, the deadline)
/// is the stream's last item. Nothing is retried once the stream is open: its
/// text has been delivered.
///
/// Dropping the stream before its end cancels the generation on the node (a
/// `CancelStream`), which frees its slot at its next step. The deadline given
/// to `generate_stream` covers the whole stream, from its opening to its end.
pub struct GenerationStream {
    chunks: mpsc::Receiver<Result<StreamChunk, ClientError>>,
    prompt_tokens: u32,
    end: Option<GenerationEnd>,
    /// The end or an error was yielded: nothing more comes.
    done: bool,
    /// The node ended the stream itself (it answered the end): there is
    /// nothing to cancel.
    ended_on_node: Arc<AtomicBool>,
    cancel: Option<Box<dyn FnOnce() + Send + Sync>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for GenerationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationStream")
            .field("prompt_tokens", &self.prompt_tokens)
            .field("end", &self.end)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl GenerationStream {
    /// A stream the node opened, pulled from `serving`, which counts it among
    /// its calls in flight (`member`) until its pulls end.
    pub(crate) fn open(
        serving: ActorRef<ServingMessage>,
        member: Arc<crate::pool::Member>,
        pool: Arc<crate::pool::Pool>,
        opened: StreamOpened,
        deadline: Duration,
        deadline_at: Instant,
    ) -> Self {
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        let source = NodePull {
            serving,
            member,
            pool,
            stream: opened.stream,
        };
        let timing = Timing {
            wait: PULL_WAIT,
            grace: PULL_GRACE,
            deadline,
            deadline_at,
        };
        Self::start(source, opened.prompt_tokens, timing)
    }

    /// Starts the pull task on `source`.
    fn start<P: Pull>(source: P, prompt_tokens: u32, timing: Timing) -> Self {
        // One slot: the task reserves it before each pull, so at most one chunk
        // waits here while the node gathers the rest.
        let (sender, chunks) = mpsc::channel(1);
        let ended_on_node = Arc::new(AtomicBool::new(false));
        let cancel = Some(source.canceller());
        let task = tokio::spawn(pump(source, sender, timing, ended_on_node.clone()));
        GenerationStream {
            chunks,
            prompt_tokens,
            end: None,
            done: false,
            ended_on_node,
            cancel,
            task,
        }
    }

    /// Tokens in the prompt (after the chat template, for a chat), as the node
    /// told when it opened the stream.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// How the generation ended (why, its counts, the time to its first token),
    /// once the stream has reached its end: set when its last delta is yielded
    /// (or, when the last chunk brings no text, when the stream ends). `None`
    /// before, and after an error.
    pub fn end(&self) -> Option<&GenerationEnd> {
        self.end.as_ref()
    }

    /// Reads the rest of the stream into one [`Generation`]: the text and ids of
    /// the deltas not yet read, and the end's reason and counts. The first error
    /// is returned instead.
    pub async fn collect(mut self) -> Result<Generation, ClientError> {
        let mut text = String::new();
        let mut token_ids = Vec::new();
        while let Some(delta) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_next(cx)).await {
            let delta = delta?;
            text.push_str(&delta.text);
            token_ids.extend(delta.token_ids);
        }
        let end = self.end.clone().ok_or_else(|| ClientError::StreamLost {
            reason: "the stream ended without its end record".to_string(),
        })?;
        Ok(Generation {
            text,
            token_ids,
            finish_reason: end.finish_reason,
            prompt_tokens: end.prompt_tokens,
            generated_tokens: end.generated_tokens,
            time_to_first_token_ms: end.time_to_first_token_ms,
        })
    }
}

#[cfg(test)]
impl GenerationStream {
    /// A stream of `items` as if pulled, for tests elsewhere in the crate.
    pub(crate) fn scripted(items: Vec<Result<StreamChunk, ClientError>>) -> Self {
        let (sender, chunks) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            for item in items {
                if sender.send(item).await.is_err() {
                    return;
                }
            }
        });
        GenerationStream {
            chunks,
            prompt_tokens: 0,
            end: None,
            done: false,
            ended_on_node: Arc::new(AtomicBool::new(true)),
            cancel: None,
            task,
        }
    }
}

impl Stream for GenerationStream {
    type Item = Result<GenerationDelta, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(chunk) = std::task::ready!(this.chunks.poll_recv(cx)) else {
                // The task never ends without sending its last item, unless it
                // panicked or its runtime went away.
                this.done = true;
                return Poll::Ready(Some(Err(ClientError::StreamLost {
                    reason: "the stream's pull task stopped".to_string(),
                })));
            };
            match chunk {
                Ok(chunk) => {
                    if let Some(end) = chunk.end {
                        this.end = Some(end);
                        this.done = true;
                    }
                    if !is_empty(&chunk.delta) {
                        return Poll::Ready(Some(Ok(chunk.delta)));
                    }
                }
                Err(err) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

impl FusedStream for GenerationStream {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.task.abort();
        if !self.ended_on_node.load(Ordering::Acquire) {
            if let Some(cancel) = self.cancel.take() {
                cancel();
            }
        }
    }
}

fn is_empty(delta: &GenerationDelta) -> bool {
    delta.text.is_empty() && delta.token_ids.is_empty()
}

/// What one pull got.
#[derive(Debug)]
pub(crate) enum Pulled {
    /// The node's chunk (possibly empty: its wait passed).
    Chunk(StreamChunk),
    /// The node's error: the stream is over.
    Failed(ServingError),
    /// The node went away, or its answer made no sense.
    Lost(String),
    /// No answer within the pull's timeout.
    NoAnswer,
}

/// Where a stream's chunks come from: the serving that opened it, or a fake in
/// tests.
pub(crate) trait Pull: Send + 'static {
    /// The next chunk, the node waiting up to `wait` for one; `timeout` bounds
    /// the whole pull.
    fn pull(&mut self, wait: Duration, timeout: Duration) -> impl Future<Output = Pulled> + Send;
    /// What cancels the stream on the node, called at most once, when the
    /// stream is dropped before the node ended it.
    fn canceller(&self) -> Box<dyn FnOnce() + Send + Sync>;
}

/// A stream's waits.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The longest a pull waits on the node ([`PULL_WAIT`]).
    wait: Duration,
    /// How much longer its answer may take ([`PULL_GRACE`]).
    grace: Duration,
    /// The deadline given, for its error.
    deadline: Duration,
    /// When it passes.
    deadline_at: Instant,
}

/// Pulls `source` into `sender` until the end, an error, the deadline, or the
/// stream's drop (the receiver closed).
async fn pump<P: Pull>(
    mut source: P,
    sender: mpsc::Sender<Result<StreamChunk, ClientError>>,
    timing: Timing,
    ended_on_node: Arc<AtomicBool>,
) {
    let Timing {
        wait: most,
        grace,
        deadline,
        deadline_at,
    } = timing;
    loop {
        // Wait until the consumer has taken the previous chunk: meanwhile the
        // node gathers what it makes into the next one.
        let Ok(permit) = sender.reserve().await else {
            return; // the stream was dropped
        };
        let chunk = loop {
            let left = deadline_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(ClientError::Deadline {
                    deadline,
                    last: Some("the generation had not ended".to_string()),
                });
            }
            let wait = left.min(most);
            let pulled = tokio::select! {
                pulled = source.pull(wait, left.min(wait + grace)) => pulled,
                () = sender.closed() => return,
            };
            match pulled {
                Pulled::Chunk(chunk) if chunk.end.is_some() => {
                    ended_on_node.store(true, Ordering::Release);
                    break Ok(chunk);
                }
                // The node's wait passed with nothing new: pull again.
                Pulled::Chunk(chunk) if is_empty(&chunk.delta) => continue,
                Pulled::Chunk(chunk) => break Ok(chunk),
                // The node has most likely dropped the stream with its error;
                // should it not have, the cancel on drop frees it.
                Pulled::Failed(err) => break Err(ClientError::Serving(err)),
                Pulled::Lost(reason) => break Err(ClientError::StreamLost { reason }),
                Pulled::NoAnswer if Instant::now() >= deadline_at => {
                    break Err(ClientError::Deadline {
                        deadline,
                        last: Some("the generation had not ended".to_string()),
                    })
                }
                Pulled::NoAnswer => {
                    break Err(ClientError::StreamLost {
                        reason: format!(
                            "the serving did not answer a pull within {:?}: its node may hang",
                            wait + grace
                        ),
                    })
                }
            }
        };
        let last = !matches!(&chunk, Ok(chunk) if chunk.end.is_none());
        permit.send(chunk);
        if last {
            return;
        }
    }
}

/// The serving that opened a stream.
struct NodePull {
    serving: ActorRef<ServingMessage>,
    /// The serving's calls in flight, this stream among them while it is pulled.
    member: Arc<crate::pool::Member>,
    pool: Arc<crate::pool::Pool>,
    stream: u64,
}

impl Drop for NodePull {
    /// The pull task ended (the stream's end, an error, the deadline, or the
    /// stream dropped): the serving no longer has this stream in flight.
    fn drop(&mut self) {
        self.member.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pull for NodePull {
    async fn pull(&mut self, wait: Duration, timeout: Duration) -> Pulled {
        use ractor::rpc::CallResult;
        let request = PullRequest {
            version: PROTOCOL_VERSION,
            stream: self.stream,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        let call = self.serving.call(
            |port| ServingMessage::PullStream(Payload::new(request), port),
            Some(timeout),
        );
        let gone = "the serving's node went away (its session closed)";
        let answer = tokio::select! {
            answer = call => answer,
            () = self.pool.gone(&self.serving) => return Pulled::Lost(gone.to_string()),
        };
        match answer {
            Ok(CallResult::Success(Payload(Ok(Ok(chunk))))) => Pulled::Chunk(chunk),
            Ok(CallResult::Success(Payload(Ok(Err(err))))) => Pulled::Failed(err),
            Ok(CallResult::Success(Payload(Err(text)))) => {
                Pulled::Lost(format!("the serving's answer did not decode: {text}"))
            }
            Ok(CallResult::SenderError) => Pulled::Lost(gone.to_string()),
            Ok(CallResult::Timeout) => Pulled::NoAnswer,
            // The serving's stand-in stopped: its node's session closed, or
            // (on this node) the serving itself.
            Err(err) => Pulled::Lost(format!("the serving went away: {err}")),
        }
    }

    fn canceller(&self) -> Box<dyn FnOnce() + Send + Sync> {
        let serving = self.serving.clone();
        let request = CancelRequest {
            version: PROTOCOL_VERSION,
            stream: self.stream,
        };
        Box::new(move || {
            // A cast: nothing answers it, and a node already gone needs nothing.
            let _ = serving.cast(ServingMessage::CancelStream(Payload::new(request)));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FinishReason;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A node's stream, scripted: each pull takes the next answer (after its
    /// delay); an empty script answers empty chunks after the pull's wait.
    #[derive(Clone, Default)]
    struct Fake {
        script: Arc<Mutex<VecDeque<(Duration, Pulled)>>>,
        pulls: Arc<Mutex<Vec<Duration>>>,
        cancelled: Arc<AtomicBool>,
    }

    impl Fake {
        fn new(script: Vec<Pulled>) -> Self {
            Self::timed(script.into_iter().map(|p| (Duration::ZERO, p)).collect())
        }

        fn timed(script: Vec<(Duration, Pulled)>) -> Self {
            Fake {
                script: Arc::new(Mutex::new(script.into())),
                ..Fake::default()
            }
        }

        fn pulls(&self) -> usize {
            self.pulls.lock().unwrap().len()
        }

        fn cancelled(&self) -> bool {
            self.cancelled.load(Ordering::SeqCst)
        }
    }

    impl Pull for Fake {
        async fn pull(&mut self, wait: Duration, timeout: Duration) -> Pulled {
            self.pulls.lock().unwrap().push(wait);
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some((delay, _)) if delay > timeout => {
                    tokio::time::sleep(timeout).await;
                    Pulled::NoAnswer
                }
                Some((delay, pulled)) => {
                    tokio::time::sleep(delay).await;
                    pulled
                }
                None => {
                    tokio::time::sleep(wait).await;
                    Pulled::Chunk(chunk("", &[], None))
                }
            }
        }

        fn canceller(&self) -> Box<dyn FnOnce() + Send + Sync> {
            let cancelled = self.cancelled.clone();
            Box::new(move || cancelled.store(true, Ordering::SeqCst))
        }
    }

    fn chunk(text: &str, ids: &[u32], end: Option<FinishReason>) -> StreamChunk {
        StreamChunk {
            delta: GenerationDelta {
                text: text.to_string(),
                token_ids: ids.to_vec(),
            },
            end: end.map(|finish_reason| GenerationEnd {
                finish_reason,
                prompt_tokens: 4,
                generated_tokens: 3,
                time_to_first_token_ms: 12.0,
            }),
        }
    }

    fn start(fake: &Fake, deadline: Duration) -> GenerationStream {
        let timing = Timing {
            wait: Duration::from_millis(100),
            grace: Duration::from_millis(100),
            deadline,
            deadline_at: Instant::now() + deadline,
        };
        GenerationStream::start(fake.clone(), 4, timing)
    }

    async fn next(stream: &mut GenerationStream) -> Option<Result<GenerationDelta, ClientError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
    }

    /// Lets the pull task run until it waits.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[test]
    fn a_stream_can_move_between_tasks() {
        fn check<T: Send + Sync + Unpin + 'static>() {}
        check::<GenerationStream>();
    }

    #[tokio::test]
    async fn deltas_come_in_order_empty_ones_skipped_then_the_end() {
        let fake = Fake::new(vec![
            Pulled::Chunk(chunk("", &[], None)),
            Pulled::Chunk(chunk("Hel", &[1], None)),
            Pulled::Chunk(chunk("", &[], None)),
            // A token whose character is not whole yet: ids, no text.
            Pulled::Chunk(chunk("", &[2], None)),
            Pulled::Chunk(chunk("lo", &[3], Some(FinishReason::Length))),
        ]);
        let mut stream = start(&fake, Duration::from_secs(5));
        assert_eq!(stream.prompt_tokens(), 4);
        assert_eq!(next(&mut stream).await.unwrap().unwrap().text, "Hel");
        assert_eq!(next(&mut stream).await.unwrap().unwrap().token_ids, [2]);
        assert!(stream.end().is_none());
        let last = next(&mut stream).await.unwrap().unwrap();
        assert_eq!((last.text.as_str(), &last.token_ids[..]), ("lo", &[3][..]));
        // The end is known with the last delta.
        assert_eq!(stream.end().unwrap().finish_reason, FinishReason::Length);
        assert!(next(&mut stream).await.is_none());
        assert!(next(&mut stream).await.is_none());
        assert!(stream.is_terminated());
        assert_eq!(fake.pulls(), 5);
        drop(stream);
        assert!(
            !fake.cancelled(),
            "a stream the node ended is not cancelled"
        );
    }

    #[tokio::test]
    async fn an_end_with_no_text_ends_the_stream_and_collect_joins_it_all() {
        let fake = Fake::new(vec![
            Pulled::Chunk(chunk("a", &[1], None)),
            Pulled::Chunk(chunk("b", &[2], None)),
            Pulled::Chunk(chunk("", &[], Some(FinishReason::Eos))),
        ]);
        let generation = start(&fake, Duration::from_secs(5))
            .collect()
            .await
            .unwrap();
        assert_eq!(
            generation,
            Generation {
                text: "ab".to_string(),
                token_ids: vec![1, 2],
                finish_reason: FinishReason::Eos,
                prompt_tokens: 4,
                generated_tokens: 3,
                time_to_first_token_ms: 12.0,
            }
        );
        assert!(!fake.cancelled());
    }

    #[tokio::test]
    async fn at_most_one_chunk_waits_ahead_of_a_slow_consumer() {
        let fake = Fake::new(
            (0..10)
                .map(|i| Pulled::Chunk(chunk("x", &[i], None)))
                .collect(),
        );
        let mut stream = start(&fake, Duration::from_secs(5));
        settle().await;
        // One chunk in the channel; the task waits for its slot before pulling more.
        assert_eq!(fake.pulls(), 1);
        assert_eq!(next(&mut stream).await.unwrap().unwrap().token_ids, [0]);
        settle().await;
        assert_eq!(fake.pulls(), 2);
        drop(stream);
        assert!(fake.cancelled(), "dropped before its end: cancelled");
    }

    #[tokio::test]
    async fn the_nodes_error_ends_the_stream() {
        let fake = Fake::new(vec![
            Pulled::Chunk(chunk("a", &[1], None)),
            Pulled::Failed(ServingError::Model {
                message: "boom".to_string(),
            }),
        ]);
        let mut stream = start(&fake, Duration::from_secs(5));
        assert!(next(&mut stream).await.unwrap().is_ok());
        match next(&mut stream).await {
            Some(Err(ClientError::Serving(ServingError::Model { message }))) => {
                assert_eq!(message, "boom")
            }
            other => panic!("{other:?}"),
        }
        assert!(next(&mut stream).await.is_none());
        assert!(stream.end().is_none());
        drop(stream);
        assert!(
            fake.cancelled(),
            "a cancel costs nothing and frees a slot left behind"
        );
    }

    #[tokio::test]
    async fn a_lost_node_is_a_clear_error_and_collect_returns_it() {
        let fake = Fake::new(vec![
            Pulled::Chunk(chunk("a", &[1], None)),
            Pulled::Lost("the serving's node went away".to_string()),
        ]);
        let err = start(&fake, Duration::from_secs(5))
            .collect()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::StreamLost { reason } if reason.contains("went away")),
            "{err}"
        );
        assert!(err.is_temporary());
        assert!(err.to_string().contains("went away"), "{err}");
    }

    #[tokio::test]
    async fn the_deadline_bounds_the_waits_and_ends_the_stream() {
        // Nothing ever comes: the node answers empty chunks after each wait.
        let fake = Fake::default();
        let deadline = Duration::from_millis(300);
        let started = Instant::now();
        let mut stream = start(&fake, deadline);
        match next(&mut stream).await {
            Some(Err(ClientError::Deadline { deadline: d, .. })) => assert_eq!(d, deadline),
            other => panic!("{other:?}"),
        }
        let took = started.elapsed();
        assert!(
            took >= deadline && took < deadline + Duration::from_millis(200),
            "{took:?}"
        );
        assert!(next(&mut stream).await.is_none());
        // Each wait was within the deadline and the pull wait.
        let waits = fake.pulls.lock().unwrap().clone();
        assert!(waits.len() >= 3, "{waits:?}");
        for wait in waits {
            assert!(wait <= Duration::from_millis(100), "{wait:?}");
        }
        drop(stream);
        assert!(fake.cancelled(), "the node may still run it: cancelled");
    }

    #[tokio::test]
    async fn a_pull_with_no_answer_ends_the_stream() {
        // The node takes longer than the pull's wait and grace.
        let fake = Fake::timed(vec![(
            Duration::from_secs(3600),
            Pulled::Chunk(chunk("late", &[1], None)),
        )]);
        let mut stream = start(&fake, Duration::from_secs(60));
        match next(&mut stream).await {
            Some(Err(ClientError::StreamLost { reason })) => {
                assert!(reason.contains("did not answer"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn dropping_mid_pull_stops_the_task_and_cancels() {
        let fake = Fake::timed(vec![(
            Duration::from_secs(2),
            Pulled::Chunk(chunk("a", &[1], None)),
        )]);
        let stream = start(&fake, Duration::from_secs(5));
        settle().await;
        assert_eq!(fake.pulls(), 1);
        let task = stream.task.abort_handle();
        drop(stream);
        assert!(fake.cancelled());
        settle().await;
        assert!(task.is_finished());
    }
}
