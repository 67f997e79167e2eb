//! Generation over HTTP (the generation task): OpenAI's
//! `POST /v1/chat/completions` and `POST /v1/completions`. A request becomes
//! the mesh's `GenerateRequest` (chat messages through the model's chat
//! template, as `Prompt::Chat`), opened as a stream on the serving whether the
//! caller streams or not: a caller that goes away drops the stream, which
//! cancels its generation and frees its slot.

use harness_client::{
    ChatMessage, FinishReason, GenerateOptions, GenerateRequest, GenerationEnd, Prompt,
    PROTOCOL_VERSION,
};
use hyper::Response;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api_error::{ApiError, ErrorKind};
use super::bounded::{bounded_seq, Bounded, OneOrMany, MAX_MESSAGES, MAX_STOPS};
use super::inference::{ok_json, unix_now, Call};
use super::local_serving::budget_ms;
use super::request_body::{parse, ReadBody};
use super::{sse, Body};

/// The body both routes take: `messages` for a chat, `prompt` for a
/// completion, and the sampling and streaming fields. Others OpenAI defines
/// (`user`, `frequency_penalty`, ...) are ignored; `n` must be 1. (One flat
/// type: serde's `flatten` would buffer every ignored field's value.)
#[derive(Debug, Default, Deserialize)]
struct GenerationBody {
    messages: Option<Bounded<InMessage, MAX_MESSAGES>>,
    /// A text, or a list of exactly one.
    prompt: Option<OneOrMany<1>>,
    max_tokens: Option<u32>,
    /// The chat route's newer name for `max_tokens`.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// OpenAI takes any integer; a negative one is kept as its bits.
    seed: Option<i64>,
    stop: Option<OneOrMany<MAX_STOPS>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl GenerationBody {
    /// The mesh's options for the sampling fields; unset ones take the
    /// model's `generation_config.json`, as on the mesh.
    fn options(&self) -> Result<(GenerateOptions, Streaming), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad_input(format!(
                "n = {n}: this node makes one choice per request; send n = 1 (or leave it out) and make {n} requests"
            )));
        }
        let streaming = Streaming {
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        };
        let options = GenerateOptions {
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|seed| seed as u64),
            stop: self.stop.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            ..GenerateOptions::default()
        };
        Ok((options, streaming))
    }
}

/// Whether to answer as events, and whether they end with the counts.
#[derive(Debug, Clone, Copy)]
pub struct Streaming {
    pub stream: bool,
    pub include_usage: bool,
}

/// A message as OpenAI's clients send it.
#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a text, or parts of which only text ones are taken.
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Content;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a string or a list of at most {MAX_MESSAGES} content parts"
                )
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content::Text(text.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content::Text(text))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Content, A::Error> {
                bounded_seq::<Part, A, MAX_MESSAGES>(seq, "content parts").map(Content::Parts)
            }
        }
        de.deserialize_any(Visit)
    }
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl InMessage {
    fn into_chat(self, index: usize) -> Result<ChatMessage, ApiError> {
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(part)) => text.push_str(&part),
                        (kind, _) => {
                            return Err(ApiError::bad_input(format!(
                                "messages[{index}] has a content part of type {kind:?}; this node takes text only"
                            )))
                        }
                    }
                }
                text
            }
        };
        // OpenAI's newer name for the system role, which chat templates know.
        let role = if self.role == "developer" {
            "system".to_string()
        } else {
            self.role
        };
        Ok(ChatMessage::new(role, content))
    }
}

/// Which route answers, which decides the objects' names and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`.
pub async fn chat(call: &Call<'_>, body: ReadBody) -> Result<Response<Body>, ApiError> {
    let mut request: GenerationBody = parse(body).await?;
    let (options, streaming) = request.options()?;
    let Some(Bounded(messages)) = request.messages.take() else {
        return Err(ApiError::bad_input("`messages` is missing"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_input("`messages` is an empty list"));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_chat(i))
        .collect::<Result<Vec<_>, _>>()?;
    complete(call, Kind::Chat, Prompt::Chat(messages), options, streaming).await
}

/// `POST /v1/completions`.
pub async fn text(call: &Call<'_>, body: ReadBody) -> Result<Response<Body>, ApiError> {
    let mut request: GenerationBody = parse(body).await?;
    let (options, streaming) = request.options()?;
    let prompt = match request.prompt.take() {
        Some(OneOrMany(mut texts)) if texts.len() == 1 => texts.remove(0),
        Some(_) => return Err(ApiError::bad_input("`prompt` is an empty list")),
        None => return Err(ApiError::bad_input("`prompt` is missing")),
    };
    complete(call, Kind::Text, Prompt::Text(prompt), options, streaming).await
}

/// Opens the generation on the serving, then answers as events or whole.
async fn complete(
    call: &Call<'_>,
    kind: Kind,
    prompt: Prompt,
    options: GenerateOptions,
    streaming: Streaming,
) -> Result<Response<Body>, ApiError> {
    let request = GenerateRequest {
        version: PROTOCOL_VERSION,
        prompt,
        options,
        timeout_ms: budget_ms(call.deadline),
        caller: None,
    };
    let mut stream = call.serving.open_stream(request, call.deadline).await?;
    let completion = Completion::new(kind, &call.model.id);
    if streaming.stream {
        return Ok(sse::response(stream, completion, streaming.include_usage));
    }
    let mut text = String::new();
    let end = loop {
        let chunk = stream.pull().await?;
        text.push_str(&chunk.delta.text);
        if let Some(end) = chunk.end {
            break end;
        }
    };
    let finish_reason = finish_reason(end.finish_reason)?;
    ok_json(&completion.whole(&text, finish_reason, &end))
}

/// OpenAI's `finish_reason`; a generation cancelled on the node (its deadline
/// passed: the HTTP caller cannot cancel otherwise) is a 504.
pub fn finish_reason(reason: FinishReason) -> Result<&'static str, ApiError> {
    match reason {
        FinishReason::Eos | FinishReason::Stop => Ok("stop"),
        FinishReason::Length => Ok("length"),
        FinishReason::Cancelled => Err(ApiError::new(
            ErrorKind::Deadline,
            "the deadline passed while generating (HARNESS_HTTP_DEADLINE_MS); the generation was stopped",
        )),
    }
}

/// One answer's identity, shared by its chunks.
pub struct Completion {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    fn of(end: &GenerationEnd) -> Usage {
        Usage {
            prompt_tokens: end.prompt_tokens,
            completion_tokens: end.generated_tokens,
            total_tokens: end.prompt_tokens + end.generated_tokens,
        }
    }
}

impl Completion {
    fn new(kind: Kind, model: &str) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Completion {
            kind,
            id: format!("{prefix}-{:016x}", crate::engine::generation::fresh_seed()),
            created: unix_now(),
            model: model.to_string(),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The whole answer (not streamed).
    fn whole(&self, text: &str, finish_reason: &str, end: &GenerationEnd) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": null,
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_reason,
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Usage::of(end),
        })
    }

    /// A streamed chunk whose one choice is `choice`.
    fn chunk(&self, choices: Value, usage: Option<Usage>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = json!(usage);
        }
        chunk
    }

    /// The chat's first chunk: the assistant's turn opens.
    pub fn opening(&self) -> Value {
        self.chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]),
            None,
        )
    }

    /// A chunk carrying `text`.
    pub fn delta(&self, text: &str) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "finish_reason": null, "logprobs": null})
            }
        };
        self.chunk(json!([choice]), None)
    }

    /// The last chunk of the choice: why it ended.
    pub fn finish(&self, finish_reason: &str) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {}, "finish_reason": finish_reason, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": "", "finish_reason": finish_reason, "logprobs": null})
            }
        };
        self.chunk(json!([choice]), None)
    }

    /// The counts, after the last choice chunk (`stream_options.include_usage`).
    pub fn usage(&self, end: &GenerationEnd) -> Value {
        self.chunk(json!([]), Some(Usage::of(end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openais_fields_become_the_meshs_options() {
        let request: GenerationBody = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": "hi"}],
                "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": -1, "stop": "x", "stream": true,
                "stream_options": {"include_usage": true}, "user": "ignored", "tools": [0, 1, 2]}"#,
        )
        .unwrap();
        let (options, streaming) = request.options().unwrap();
        let messages: Vec<ChatMessage> = request
            .messages
            .unwrap()
            .0
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_chat(i).unwrap())
            .collect();
        assert_eq!(
            messages,
            [ChatMessage::system("be brief"), ChatMessage::user("hi")]
        );
        assert_eq!(options.max_new_tokens, Some(5));
        assert_eq!(options.temperature, Some(0.5));
        assert_eq!(options.top_p, Some(0.9));
        assert_eq!(options.seed, Some(u64::MAX));
        assert_eq!(options.stop, ["x"]);
        assert!(streaming.stream && streaming.include_usage);
        let null: GenerationBody =
            serde_json::from_str(r#"{"prompt": "a", "stream": null}"#).unwrap();
        assert!(!null.options().unwrap().1.stream);
    }

    #[test]
    fn more_than_one_choice_or_prompt_or_an_image_is_refused() {
        let n: GenerationBody = serde_json::from_str(r#"{"n": 2}"#).unwrap();
        assert_eq!(n.options().unwrap_err().status(), 422);
        assert!(serde_json::from_str::<GenerationBody>(r#"{"prompt": ["a", "b"]}"#).is_err());
        let stops = format!(
            r#"{{"stop": [{}]}}"#,
            vec![r#""s""#; MAX_STOPS + 1].join(",")
        );
        assert!(serde_json::from_str::<GenerationBody>(&stops).is_err());
        let image: InMessage =
            serde_json::from_str(r#"{"role": "user", "content": [{"type": "image_url"}]}"#)
                .unwrap();
        assert!(image
            .into_chat(0)
            .unwrap_err()
            .message
            .contains("image_url"));
    }
}
