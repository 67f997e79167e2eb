//! The wire protocol between a client and a Harness node.
//!
//! [`ServingMessage`] is what remote nodes send to the `DelayedServing` actor over
//! `ractor_cluster`. Each payload is a serde type encoded with postcard inside a
//! [`Payload`], whose decoding never panics: a frame that does not decode arrives
//! as an error the node answers with [`ServingError::BadInput`], and the node keeps
//! serving. Tensor bytes travel little-endian, with their dtype and shape.

use ractor::{BytesConvertable, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The protocol version every request carries. A node answers a request of
/// another version with [`ServingError::BadInput`] naming both versions.
/// Version 2: `Embed` answers [`Embedding`]s (vector, token count, truncation).
/// Version 3: [`ServingStatus`] carries the model, the node's versions, the
/// requests in flight and the uptime, as HTTP `/status` does.
/// Version 4: `Generate` (the generation task).
/// Version 5: streamed generation (`OpenStream`, `PullStream`, `CancelStream`),
/// chat prompts ([`Prompt::Chat`]), the caller's presence group
/// ([`GenerateRequest::caller`]), [`FinishReason::Cancelled`].
pub const PROTOCOL_VERSION: u32 = 5;

/// The process group of the serving named `name`: `harness.serving.<name>`.
pub fn serving_group(name: &str) -> String {
    format!("harness.serving.{name}")
}

/// The process group a caller keeps one member in while it lives:
/// `harness.caller.<id>`. A node sees the group empty once the caller's session
/// closes (ractor_cluster removes a lost peer's members), and cancels the
/// generations that named it in [`GenerateRequest::caller`].
pub fn caller_group(id: &str) -> String {
    format!("harness.caller.{id}")
}

/// A postcard-encoded value, or why it could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload<T>(pub Result<T, String>);

impl<T> Payload<T> {
    /// A payload holding `value`.
    pub fn new(value: T) -> Self {
        Payload(Ok(value))
    }
}

/// `tag` then `value` in postcard, written once into a buffer of the right size.
fn tagged<V: Serialize + ?Sized>(tag: u8, value: &V) -> postcard::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(1 + postcard::experimental::serialized_size(value)?);
    bytes.push(tag);
    postcard::to_extend(value, bytes)
}

impl<T: Serialize + DeserializeOwned> BytesConvertable for Payload<T> {
    fn into_bytes(self) -> Vec<u8> {
        // Tag 0: a value; tag 1: an error text (a payload that failed to decode
        // and is passed on, which is rare but must not panic either).
        let encoded = match &self.0 {
            Ok(value) => tagged(0, value),
            Err(text) => tagged(1, text),
        };
        encoded.unwrap_or_else(|err| {
            tagged(1, &format!("cannot encode: {err}")).unwrap_or_else(|_| vec![1, 0])
        })
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        let decoded = match bytes.split_first() {
            Some((0, rest)) => postcard::from_bytes::<T>(rest)
                .map_err(|e| format!("cannot decode the message: {e}")),
            Some((1, rest)) => Err(postcard::from_bytes::<String>(rest)
                .unwrap_or_else(|e| format!("cannot decode the error: {e}"))),
            Some((tag, _)) => Err(format!(
                "unknown payload tag {tag}: is the peer a Harness node of this protocol?"
            )),
            None => Err("an empty message".to_string()),
        };
        Payload(decoded)
    }
}

/// A tensor element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 16-bit float (IEEE half).
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer (token ids, masks).
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

/// A tensor on the wire: dtype, shape, and the elements little-endian, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// The element type.
    pub dtype: DType,
    /// The dimensions, outermost first (the first one counts the items of a batch).
    pub shape: Vec<i64>,
    /// The elements, little-endian, row-major.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl WireTensor {
    /// A float tensor from its values.
    pub fn from_f32(shape: &[i64], values: &[f32]) -> Self {
        WireTensor {
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An i64 tensor from its values (token ids, masks).
    pub fn from_i64(shape: &[i64], values: &[i64]) -> Self {
        WireTensor {
            dtype: DType::I64,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values of a float tensor, or `None` for another dtype.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The values of an i64 tensor, or `None` for another dtype.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        (self.dtype == DType::I64).then(|| {
            self.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        })
    }

    /// Elements the shape holds, or `None` if a dimension is negative or it overflows.
    pub fn element_count(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }
}

/// `Run`: tensors in (sharing their leading dimension, the items), tensors out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The model's inputs, in order; each has the items as its first dimension.
    pub inputs: Vec<WireTensor>,
    /// How long the caller will wait, in milliseconds from when the node receives
    /// the request (a budget, since the two clocks may differ).
    pub timeout_ms: u64,
}

/// `Embed`: texts in, one [`Embedding`] per text out, in order. An empty list is
/// answered with an empty list; an empty text is embedded like any other (as its
/// special tokens); more texts than the node's `HARNESS_MAX_QUEUE` is `BadInput`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The texts to embed.
    pub texts: Vec<String>,
    /// How long the caller will wait, in milliseconds (see [`RunRequest::timeout_ms`]).
    pub timeout_ms: u64,
}

/// One text's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// The vector (unit length where the model normalizes).
    pub vector: Vec<f32>,
    /// Tokens the model saw, special tokens included.
    pub tokens: u32,
    /// The text was longer than the model's `max_seq_length` and only its first
    /// `tokens` tokens were embedded (as sentence-transformers does).
    pub truncated: bool,
}

/// `Generate` (the whole generation in one answer) and `OpenStream` (its text as
/// it is made, by `PullStream`): a prompt in, the model's continuation out (the
/// generation task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What to continue: a text, or chat messages.
    pub prompt: Prompt,
    /// How to choose tokens and when to stop.
    pub options: GenerateOptions,
    /// How long the caller will wait, in milliseconds (see [`RunRequest::timeout_ms`]):
    /// for a stream, until its last pull.
    pub timeout_ms: u64,
    /// The caller's presence group ([`caller_group`]); once it has no member on
    /// the node (the caller's session closed), the generation is cancelled and
    /// its sequence slot freed. `None`: only the deadline ends it early.
    pub caller: Option<String>,
}

/// What a generation continues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// A text, tokenized as `transformers`' tokenizer does by default (with the
    /// model's special tokens, such as Llama's `<s>`).
    Text(String),
    /// Chat messages, rendered with the model's chat template (its repo's
    /// `chat_template.jinja`, or the `chat_template` of `tokenizer_config.json`)
    /// with the assistant's turn opened, then tokenized as it is (the template
    /// writes the special tokens): the ids `transformers`' `apply_chat_template`
    /// gives. A model without a template answers `BadInput`.
    Chat(Vec<ChatMessage>),
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_string())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl From<Vec<ChatMessage>> for Prompt {
    fn from(messages: Vec<ChatMessage>) -> Self {
        Prompt::Chat(messages)
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (what the model's template knows).
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage::new("assistant", content)
    }
}

/// How a generation chooses its tokens and when it stops. Unset fields take the
/// model's `generation_config.json`, then `transformers`' defaults for sampling
/// (temperature 1, top-k 50, top-p 1); `max_new_tokens` then defaults to what the
/// node's context leaves after the prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Tokens to generate at most (the prompt not counted).
    pub max_new_tokens: Option<u32>,
    /// Sample (`true`) or take the most likely token (`false`). Unset: sampling
    /// when `temperature`, `top_p`, `top_k` or `seed` is set, else the model's
    /// `do_sample`.
    pub do_sample: Option<bool>,
    /// Divides the logits before sampling; `0` means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches it.
    pub top_p: Option<f32>,
    /// Sample among the `top_k` most likely tokens only; `0` means all.
    pub top_k: Option<u32>,
    /// The same seed (with the same request) gives the same tokens.
    pub seed: Option<u64>,
    /// Texts that end the generation where they first occur; the answer's text
    /// stops before it.
    pub stop: Vec<String>,
}

/// Why a generation ended. In JSON (`serde_json`), lowercase: `"eos"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced one of its end-of-sequence tokens.
    Eos,
    /// One of the request's stop strings occurred.
    Stop,
    /// `max_new_tokens` (or the node's context, `HARNESS_MAX_CONTEXT`) was reached.
    Length,
    /// The caller cancelled it, went away or let its deadline pass; its slot was
    /// freed at the next step.
    Cancelled,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FinishReason {
    /// `eos`, `stop`, `length` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The answer to a [`GenerateRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The generated text (special tokens left out; a stop string and what follows
    /// it cut off).
    pub text: String,
    /// The generated token ids, the end-of-sequence token included when it ended
    /// the generation, as `transformers`' `generate` returns them after the prompt;
    /// after a stop string, up to the token that completed it (whose text the
    /// answer leaves out).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated (`token_ids.len()`).
    pub generated_tokens: u32,
    /// From the node receiving the request to its first generated token, in
    /// milliseconds.
    pub time_to_first_token_ms: f64,
}

/// The answer to `OpenStream`: the generation is queued; its text comes by
/// `PullStream` with this id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpened {
    /// The stream's id on this serving.
    pub stream: u64,
    /// Tokens in the prompt (after the chat template, for a chat).
    pub prompt_tokens: u32,
}

/// `PullStream`: what the stream made since the last pull. The node answers as
/// soon as there is something (at once if there is already), or after
/// `wait_ms` with an empty delta; what a caller has not pulled yet waits on the
/// node, so a slow caller gets fewer, larger deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// [`StreamOpened::stream`].
    pub stream: u64,
    /// How long to wait for a token, in milliseconds (the node takes at most 10 s).
    pub wait_ms: u32,
}

/// `CancelStream` (a cast: nothing answers it): end the stream's generation and
/// free its slot at the next step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// [`StreamOpened::stream`].
    pub stream: u64,
}

/// The answer to a pull: new tokens and their text, and, in the last answer,
/// the end. Concatenated, the deltas' texts and ids are the [`Generation`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// What was made since the last pull (possibly nothing).
    pub delta: GenerationDelta,
    /// Set in the last chunk: why the generation ended, and its counts. The
    /// stream is gone from the node once this is answered.
    pub end: Option<GenerationEnd>,
}

/// Part of a generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationDelta {
    /// Text that is now final: whole characters (a character whose bytes span
    /// tokens waits for its last byte), never text a stop string could still
    /// take back.
    pub text: String,
    /// The tokens made since the last delta (their text may lag behind them by a
    /// character or a stop string's length).
    pub token_ids: Vec<u32>,
}

/// How a streamed generation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationEnd {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// From the node receiving the request to its first generated token, in
    /// milliseconds.
    pub time_to_first_token_ms: f64,
}

/// `Status`: ask for the serving's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
}

/// The answer to `Run`.
pub type RunReply = Result<Vec<WireTensor>, ServingError>;
/// The answer to `Embed`.
pub type EmbedReply = Result<Vec<Embedding>, ServingError>;
/// The answer to `Generate`.
pub type GenerateReply = Result<Generation, ServingError>;
/// The answer to `OpenStream`.
pub type OpenReply = Result<StreamOpened, ServingError>;
/// The answer to `PullStream`.
pub type PullReply = Result<StreamChunk, ServingError>;

/// The serving's state, as `Status` and `/status` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServingStatus {
    /// `starting`, `downloading`, `loading`, `warming`, `ready`, `no_gpu`,
    /// `failed`, `draining`.
    pub phase: String,
    /// Why, for `failed` and `no_gpu`.
    pub message: Option<String>,
    /// The serving's name (`HARNESS_SERVING_NAME`).
    pub serving: String,
    /// The device the model runs on (`cpu`, `cuda:0`), once chosen.
    pub device: Option<String>,
    /// Items waiting for a batch.
    pub queue_depth: u64,
    /// Times the serving was restarted after a failure.
    pub restarts: u64,
    /// The model served, once the serving has started fetching it.
    pub model: Option<StatusModel>,
    /// The node's Harness version (its crate version).
    pub server_version: String,
    /// The node's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Requests accepted and not yet answered.
    pub in_flight: u64,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// The largest message the node accepts (its `HARNESS_MAX_MESSAGE_BYTES`; 0 if
    /// it has no cluster port): a client checks its requests against it, so a
    /// request the node would drop is `TooLarge` at once.
    pub max_message_bytes: u64,
}

/// The model a serving serves, as [`ServingStatus`] and `/status` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusModel {
    /// The Hub repo (`org/name`), or the `HARNESS_MODEL_DIR` folder.
    pub repo: String,
    /// The revision asked for (`main`, a tag, a commit), or `local` for a folder.
    pub revision: String,
    /// The commit the revision resolved to; `None` until fetched, or for a folder.
    pub commit: Option<String>,
}

/// Why a request was not answered with a result. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServingError {
    /// The serving is not ready yet (or is draining): retry until your deadline.
    #[error("the serving is not ready (phase: {phase}); retry until your deadline")]
    NotReady {
        /// The phase it is in.
        phase: String,
    },
    /// The queue is full: back off and retry.
    #[error("the serving is overloaded ({queued} items queued of {capacity}); back off and retry")]
    Overloaded {
        /// Items queued now.
        queued: u64,
        /// `HARNESS_MAX_QUEUE`.
        capacity: u64,
    },
    /// The request breaks a rule of the serving (version, arity, dtype, shape,
    /// size, task); retrying the same request cannot help.
    #[error("bad input: {reason}")]
    BadInput {
        /// Which rule, and what was expected.
        reason: String,
    },
    /// The model failed on the batch (torch's message); the serving stays ready.
    #[error("the model failed on this batch: {message}")]
    Model {
        /// torch's message, in one line.
        message: String,
    },
    /// The request's `timeout_ms` passed: waiting in the queue (it was never
    /// run), or, for a generation, while generating (it was stopped and its
    /// sequence slot freed).
    #[error("the deadline passed after {waited_ms} ms; the request was not answered")]
    DeadlineExceeded {
        /// How long it waited.
        waited_ms: u64,
    },
    /// The serving stopped with the request in flight; it restarts: retry.
    #[error("internal error: {message}; the serving is restarting, retry")]
    Internal {
        /// What happened.
        message: String,
    },
}

/// A fault to inject, for tests of the restart path. A node refuses it with
/// `BadInput` unless it runs with `HARNESS_FAULT_INJECTION=1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The fault.
    pub fault: Fault,
}

/// The faults a node can be asked to suffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// The serving actor panics in its handler: the supervisor restarts it.
    Crash,
    /// The next warm-up panics (after the next restart): a panic outside any
    /// request, which must end in `failed` and a restart like any failure.
    PanicNextWarmUp,
}

/// What remote nodes send to a `DelayedServing` actor.
#[derive(RactorClusterMessage)]
pub enum ServingMessage {
    /// Run the model on tensors.
    #[rpc]
    Run(Payload<RunRequest>, RpcReplyPort<Payload<RunReply>>),
    /// Embed texts (the embedding task).
    #[rpc]
    Embed(Payload<EmbedRequest>, RpcReplyPort<Payload<EmbedReply>>),
    /// Generate text (the generation task).
    #[rpc]
    Generate(
        Payload<GenerateRequest>,
        RpcReplyPort<Payload<GenerateReply>>,
    ),
    /// Generate text as it is made (the generation task): answered at once
    /// with the stream's id; the text comes by `PullStream`.
    #[rpc]
    OpenStream(Payload<GenerateRequest>, RpcReplyPort<Payload<OpenReply>>),
    /// The next part of a stream (long-polled).
    #[rpc]
    PullStream(Payload<PullRequest>, RpcReplyPort<Payload<PullReply>>),
    /// End a stream now (its caller dropped it).
    CancelStream(Payload<CancelRequest>),
    /// The serving's status.
    #[rpc]
    Status(Payload<StatusRequest>, RpcReplyPort<Payload<ServingStatus>>),
    /// Inject a fault (tests only; refused unless enabled on the node).
    #[rpc]
    Inject(
        Payload<FaultRequest>,
        RpcReplyPort<Payload<Result<(), ServingError>>>,
    ),
}

/// What the member a client keeps in its [`caller_group`] takes. The member
/// exists only to be seen: while the group has it, a node knows the caller is
/// still there. It derives `RactorClusterMessage` because ractor_cluster syncs
/// only the process-group members of actors that support remoting.
#[derive(RactorClusterMessage)]
pub enum CallerMessage {
    /// Nothing sends it today; a caller's member ignores it (kept so the type
    /// has a variant a node could cast).
    Presence(Payload<()>),
}

/// Decodes `bytes` as every payload a node or a client receives, and checks that
/// nothing panics and that whatever decodes encodes back to the same value. The
/// body of the `protocol_decode` fuzz target (`fuzz/`) and of its property test.
#[doc(hidden)]
pub fn decode_everything(bytes: &[u8]) {
    fn one<T>(bytes: &[u8])
    where
        T: Serialize + DeserializeOwned,
    {
        let decoded = Payload::<T>::from_bytes(bytes.to_vec());
        if let Ok(value) = decoded.0 {
            // Compared as bytes, not values: a float may be NaN, which equals nothing.
            let encoded = Payload::new(value).into_bytes();
            let again = Payload::<T>::from_bytes(encoded.clone())
                .0
                .expect("an encoded payload decodes");
            assert_eq!(
                Payload::new(again).into_bytes(),
                encoded,
                "a decoded payload must encode back to itself"
            );
        }
    }
    one::<RunRequest>(bytes);
    one::<EmbedRequest>(bytes);
    one::<GenerateRequest>(bytes);
    one::<PullRequest>(bytes);
    one::<CancelRequest>(bytes);
    one::<StatusRequest>(bytes);
    one::<FaultRequest>(bytes);
    one::<RunReply>(bytes);
    one::<EmbedReply>(bytes);
    one::<GenerateReply>(bytes);
    one::<OpenReply>(bytes);
    one::<PullReply>(bytes);
    one::<ServingStatus>(bytes);
    one::<Result<(), ServingError>>(bytes);
    // What a node does first with a decoded request's tensors must not panic either.
    if let Ok(request) = Payload::<RunRequest>::from_bytes(bytes.to_vec()).0 {
        for tensor in &request.inputs {
            let _ = tensor.element_count();
            let _ = tensor.to_f32();
            let _ = tensor.to_i64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let request = RunRequest {
            version: PROTOCOL_VERSION,
            inputs: vec![WireTensor::from_f32(&[2, 2], &[1.0, -2.0, 3.5, 0.0])],
            timeout_ms: 250,
        };
        let bytes = Payload::new(request.clone()).into_bytes();
        assert_eq!(
            Payload::<RunRequest>::from_bytes(bytes),
            Payload::new(request.clone())
        );
        assert_eq!(
            request.inputs[0].to_f32().unwrap(),
            vec![1.0, -2.0, 3.5, 0.0]
        );

        let reply: RunReply = Err(ServingError::Overloaded {
            queued: 9,
            capacity: 8,
        });
        let bytes = Payload::new(reply.clone()).into_bytes();
        assert_eq!(Payload::<RunReply>::from_bytes(bytes).0, Ok(reply));
    }

    #[test]
    fn a_status_round_trips_with_its_model_and_versions() {
        let status = ServingStatus {
            phase: "ready".to_string(),
            message: None,
            serving: "default".to_string(),
            device: Some("cpu".to_string()),
            queue_depth: 3,
            restarts: 1,
            model: Some(StatusModel {
                repo: "org/name".to_string(),
                revision: "main".to_string(),
                commit: Some("0123456789abcdef0123456789abcdef01234567".to_string()),
            }),
            server_version: "0.1.0".to_string(),
            protocol_version: PROTOCOL_VERSION,
            in_flight: 2,
            uptime_s: 42,
            max_message_bytes: 1 << 20,
        };
        let bytes = Payload::new(status.clone()).into_bytes();
        assert_eq!(Payload::<ServingStatus>::from_bytes(bytes).0, Ok(status));
    }

    #[test]
    fn garbage_decodes_to_an_error_not_a_panic() {
        for bytes in [
            vec![],
            vec![0],
            vec![0, 0xff, 0xff, 0xff],
            vec![7, 1, 2],
            vec![1],
        ] {
            let decoded = Payload::<RunRequest>::from_bytes(bytes.clone());
            assert!(decoded.0.is_err(), "{bytes:?} decoded to {decoded:?}");
        }
    }

    #[test]
    fn element_counts_refuse_negative_and_overflowing_shapes() {
        let mut t = WireTensor::from_f32(&[2, 3], &[0.0; 6]);
        assert_eq!(t.element_count(), Some(6));
        t.shape = vec![2, -3];
        assert_eq!(t.element_count(), None);
        t.shape = vec![i64::MAX, i64::MAX];
        assert_eq!(t.element_count(), None);
    }

    #[test]
    fn the_group_name_is_the_designs() {
        assert_eq!(serving_group("embedder"), "harness.serving.embedder");
    }
}
