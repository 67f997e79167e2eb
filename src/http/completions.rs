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
use super::inference::{ok_json, unix_now, Call};
use super::local_serving::budget_ms;
use super::request_body::parse;
use super::{sse, Body};

/// The sampling and streaming fields both routes take. Others OpenAI defines
/// (`user`, `frequency_penalty`, ...) are ignored; `n` must be 1.
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    max_tokens: Option<u32>,
    /// The chat route's newer name for `max_tokens`.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
}

/// One stop string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Sampling {
    /// The mesh's options for these fields; unset ones take the model's
    /// `generation_config.json`, as on the mesh.
    fn options(self) -> Result<(GenerateOptions, Streaming), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad_input(format!(
                "n = {n}: this node makes one choice per request; send n = 1 (or leave it out) and make {n} requests"
            )));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(stop)) => vec![stop],
            Some(Stop::Many(stops)) => stops,
        };
        let streaming = Streaming {
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        };
        let options = GenerateOptions {
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop,
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

/// `POST /v1/chat/completions`'s body.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// A message as OpenAI's clients send it.
#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a text, or parts of which only text ones are taken.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
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

/// `POST /v1/completions`'s body.
#[derive(Debug, Deserialize)]
struct TextRequest {
    prompt: TextPrompt,
    #[serde(flatten)]
    sampling: Sampling,
}

/// A prompt: a text, or a list of exactly one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TextPrompt {
    One(String),
    Many(Vec<String>),
}

/// Which route answers, which decides the objects' names and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`.
pub async fn chat(call: &Call<'_>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let request: ChatRequest = parse(body)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_input("`messages` is an empty list"));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_chat(i))
        .collect::<Result<Vec<_>, _>>()?;
    let (options, streaming) = request.sampling.options()?;
    complete(call, Kind::Chat, Prompt::Chat(messages), options, streaming).await
}

/// `POST /v1/completions`.
pub async fn text(call: &Call<'_>, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let request: TextRequest = parse(body)?;
    let prompt = match request.prompt {
        TextPrompt::One(text) => text,
        TextPrompt::Many(mut texts) if texts.len() == 1 => texts.remove(0),
        TextPrompt::Many(texts) => {
            return Err(ApiError::bad_input(format!(
                "`prompt` is a list of {} texts; this node takes one prompt per request",
                texts.len()
            )))
        }
    };
    let (options, streaming) = request.sampling.options()?;
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
        let request: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": "hi"}],
                "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "x", "stream": true,
                "stream_options": {"include_usage": true}, "user": "ignored"}"#,
        )
        .unwrap();
        let messages: Vec<ChatMessage> = request
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_chat(i).unwrap())
            .collect();
        assert_eq!(
            messages,
            [ChatMessage::system("be brief"), ChatMessage::user("hi")]
        );
        let (options, streaming) = request.sampling.options().unwrap();
        assert_eq!(options.max_new_tokens, Some(5));
        assert_eq!(options.temperature, Some(0.5));
        assert_eq!(options.top_p, Some(0.9));
        assert_eq!(options.seed, Some(7));
        assert_eq!(options.stop, ["x"]);
        assert!(streaming.stream && streaming.include_usage);
    }

    #[test]
    fn more_than_one_choice_or_an_image_is_refused() {
        let n: Sampling = serde_json::from_str(r#"{"n": 2}"#).unwrap();
        assert_eq!(n.options().unwrap_err().status(), 422);
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
