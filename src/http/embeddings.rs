//! Embeddings over HTTP (the embedding task): text-embeddings-inference's
//! `POST /embed` and OpenAI's `POST /v1/embeddings`. Both send the texts as
//! one `Embed` to the serving, so they are batched with the mesh's callers and
//! answer the very vectors the mesh does.

use base64::Engine as _;
use harness_client::Embedding;
use hyper::Response;
use serde::{Deserialize, Serialize};

use super::api_error::ApiError;
use super::bounded::{OneOrMany, MAX_TEXTS};
use super::inference::{ok_json, Call};
use super::request_body::{parse, ReadBody};
use super::Body;

/// `POST /embed`'s body.
#[derive(Debug, Deserialize)]
struct TeiRequest {
    inputs: OneOrMany<MAX_TEXTS>,
    /// Scale each vector to unit length (text-embeddings-inference's default).
    #[serde(default = "yes")]
    normalize: bool,
    /// Embed only the first `max_seq_length` tokens of a longer text; without
    /// it such a text is refused, as text-embeddings-inference does.
    #[serde(default)]
    truncate: bool,
}

fn yes() -> bool {
    true
}

/// `POST /embed`: a list of vectors, one per input, in order.
pub async fn tei(call: &Call<'_>, body: ReadBody) -> Result<Response<Body>, ApiError> {
    let request: TeiRequest = parse(body).await?;
    let texts = request.inputs.0;
    if texts.is_empty() {
        return Err(ApiError::bad_input("`inputs` is an empty list"));
    }
    let embeddings = call.serving.embed(texts, call.deadline).await?;
    if !request.truncate {
        if let Some(i) = embeddings.iter().position(|e| e.truncated) {
            return Err(ApiError::bad_input(format!(
                "input {i} is longer than the model takes ({} tokens); send `truncate: true` to embed its beginning",
                embeddings[i].tokens
            )));
        }
    }
    let vectors: Vec<Vec<f32>> = embeddings
        .into_iter()
        .map(|e| {
            if request.normalize {
                unit(e.vector)
            } else {
                e.vector
            }
        })
        .collect();
    ok_json(&vectors)
}

/// `vector` scaled to unit length: as it is when the model made it so already
/// (to within f32 rounding, so that `/embed` answers the mesh's very vector),
/// or when it is all zeros.
fn unit(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > 0.0 && (norm - 1.0).abs() > 1e-4 {
        vector.iter_mut().for_each(|v| *v /= norm);
    }
    vector
}

/// `POST /v1/embeddings`'s body. `model` is accepted whatever it names (the
/// node serves one); `user` and other fields are ignored.
#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    input: OneOrMany<MAX_TEXTS>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
}

#[derive(Serialize)]
struct OpenAiResponse<'a> {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    embedding: Vector,
    index: usize,
}

/// A vector as floats, or as the base64 of its little-endian f32 bytes.
#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// `POST /v1/embeddings`: OpenAI's answer; longer texts are truncated to what
/// the model takes, as on the mesh.
pub async fn openai(call: &Call<'_>, body: ReadBody) -> Result<Response<Body>, ApiError> {
    let request: OpenAiRequest = parse(body).await?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_input(format!(
                "encoding_format {other:?} is not one of \"float\", \"base64\""
            )))
        }
    };
    let texts = request.input.0;
    if texts.is_empty() {
        return Err(ApiError::bad_input("`input` is an empty list"));
    }
    let embeddings = call.serving.embed(texts, call.deadline).await?;
    if let Some(asked) = request.dimensions {
        let has = embeddings.first().map_or(0, |e| e.vector.len());
        if asked as usize != has {
            return Err(ApiError::bad_input(format!(
                "dimensions {asked}: this model's vectors have {has} and cannot be shortened here"
            )));
        }
    }
    let tokens: u64 = embeddings.iter().map(|e| u64::from(e.tokens)).sum();
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, Embedding { vector, .. })| OpenAiEmbedding {
            object: "embedding",
            embedding: if base64 {
                Vector::Base64(
                    base64::engine::general_purpose::STANDARD.encode(
                        vector
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    ),
                )
            } else {
                Vector::Floats(vector)
            },
            index,
        })
        .collect();
    ok_json(&OpenAiResponse {
        object: "list",
        data,
        model: &call.model.id,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_a_string_or_a_list_and_nothing_else() {
        let one: TeiRequest = serde_json::from_str(r#"{"inputs": "a"}"#).unwrap();
        assert_eq!(one.inputs.0, ["a"]);
        assert!(one.normalize && !one.truncate);
        let many: OpenAiRequest = serde_json::from_str(r#"{"input": ["a", "b"]}"#).unwrap();
        assert_eq!(many.input.0, ["a", "b"]);
        let err = serde_json::from_str::<OpenAiRequest>(r#"{"input": [1, 2]}"#).unwrap_err();
        assert!(err.to_string().contains("token ids are not taken"), "{err}");
    }

    #[test]
    fn unit_scales_to_length_one_and_leaves_zeros() {
        let v = unit(vec![3.0, 4.0]);
        assert_eq!(v, [0.6, 0.8]);
        assert_eq!(unit(vec![0.0, 0.0]), [0.0, 0.0]);
    }
}
