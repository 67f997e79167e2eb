//! A streamed completion as server-sent events, as OpenAI's clients read
//! them: `data: <chunk>` per delta, as the node makes it (each pull answers as
//! soon as there is text), then the chunk with `finish_reason`, the counts when
//! asked, and `data: [DONE]`. A pull that waits in vain sends a comment, which
//! keeps proxies from closing a quiet stream and finds a caller that left.
//! Dropping the body (the caller left) drops the stream, which cancels the
//! generation.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use harness_client::{FinishReason, GenerationEnd};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use serde_json::Value;

use super::api_error::{ApiError, ErrorKind};
use super::completions::{finish_reason, Completion, Kind};
use super::local_serving::OpenStream;
use super::Body;

/// What the next event is.
enum Next {
    /// The chat's opening chunk (a completion has none).
    Opening,
    /// Deltas, pulled from the node.
    Pulling,
    /// The chunk with `finish_reason`.
    Finish(GenerationEnd),
    /// The counts.
    Usage(GenerationEnd),
    /// `data: [DONE]`.
    Done,
    /// Nothing more.
    Over,
}

struct Events {
    stream: OpenStream,
    completion: Completion,
    include_usage: bool,
    next: Next,
}

/// The 200 answer whose body is `stream`'s events.
pub fn response(stream: OpenStream, completion: Completion, include_usage: bool) -> Response<Body> {
    let next = match completion.kind() {
        Kind::Chat => Next::Opening,
        Kind::Text => Next::Pulling,
    };
    let events = Events {
        stream,
        completion,
        include_usage,
        next,
    };
    let frames = futures_util::stream::unfold(events, next_event)
        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells a buffering proxy (nginx) to pass each event on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The next event's bytes, or `None` after the last.
async fn next_event(mut events: Events) -> Option<(Bytes, Events)> {
    loop {
        match std::mem::replace(&mut events.next, Next::Over) {
            Next::Opening => {
                events.next = Next::Pulling;
                let bytes = data(&events.completion.opening());
                return Some((bytes, events));
            }
            Next::Pulling => {
                let chunk = match events.stream.pull().await {
                    Ok(chunk) => chunk,
                    Err(err) => return Some((error(&err), events)),
                };
                let text = chunk.delta.text;
                if let Some(end) = chunk.end {
                    if end.finish_reason == FinishReason::Cancelled {
                        let err = finish_reason(end.finish_reason)
                            .err()
                            .unwrap_or_else(|| ApiError::new(ErrorKind::Deadline, "cancelled"));
                        return Some((error(&err), events));
                    }
                    events.next = Next::Finish(end);
                } else {
                    events.next = Next::Pulling;
                }
                if !text.is_empty() {
                    let bytes = data(&events.completion.delta(&text));
                    return Some((bytes, events));
                }
                if matches!(events.next, Next::Pulling) && chunk.delta.token_ids.is_empty() {
                    return Some((Bytes::from_static(b": keep-alive\n\n"), events));
                }
            }
            Next::Finish(end) => {
                let reason = finish_reason(end.finish_reason).unwrap_or("stop");
                let bytes = data(&events.completion.finish(reason));
                events.next = if events.include_usage {
                    Next::Usage(end)
                } else {
                    Next::Done
                };
                return Some((bytes, events));
            }
            Next::Usage(end) => {
                events.next = Next::Done;
                let bytes = data(&events.completion.usage(&end));
                return Some((bytes, events));
            }
            Next::Done => return Some((Bytes::from_static(b"data: [DONE]\n\n"), events)),
            Next::Over => return None,
        }
    }
}

/// `value` as one event.
fn data(value: &Value) -> Bytes {
    let mut bytes = b"data: ".to_vec();
    // A Value always serializes.
    let _ = serde_json::to_writer(&mut bytes, value);
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}

/// An error after the answer began: OpenAI's error object as the last event
/// (no `[DONE]` follows, so a client sees the stream did not end well).
fn error(err: &ApiError) -> Bytes {
    let mut bytes = b"data: ".to_vec();
    bytes.extend_from_slice(&err.openai_json());
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}
