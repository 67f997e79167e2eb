//! How one batch's requests become one forward's inputs, and its outputs each
//! caller's answer.
//!
//! The tensor task stacks items of one dtype and trailing shape. The embedding task
//! batches token sequences of similar length: each batch is padded only to its own
//! longest sequence (a short text is never padded to the longest in the queue). What
//! a task does to the outputs on the device (pooling) is its own [`Finish`].

use tch::{Kind, Tensor};

use super::error::ForwardError;

/// What a batch key compares: the dtype and trailing shape of each input (for
/// token inputs, the length bucket instead of the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BatchKey(Vec<(Kind, Vec<i64>)>);

/// How an engine joins requests and shares out outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Collate {
    /// Concatenate along dim 0; requests of one batch share every trailing shape.
    #[default]
    Stack,
    /// Token sequences `[items, tokens]`, batched by length bucket and padded per
    /// batch to its longest, each input with its own value (the pad token id for
    /// `input_ids`, 0 for the attention mask and token types), in the model's order.
    Tokens { pad_values: Vec<i64> },
}

/// A task's step after each forward, on the model's device, before the outputs go
/// back to the CPU (the embedding task pools token vectors here). It sees the
/// forward's inputs (on the device) and outputs, and returns what the callers get,
/// still leading with the item dimension.
pub trait Finish: Send + Sync {
    fn finish(&self, inputs: &[Tensor], outputs: Vec<Tensor>) -> Result<Vec<Tensor>, ForwardError>;
}

/// Length buckets for token batches: texts batch with others of their bucket and
/// are padded to the longest in the batch, at most about half again their length.
const TOKEN_BUCKETS: &[i64] = &[8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];

fn token_bucket(tokens: i64) -> i64 {
    TOKEN_BUCKETS
        .iter()
        .copied()
        .find(|&b| tokens <= b)
        .unwrap_or_else(|| (tokens + 255) / 256 * 256)
}

impl Collate {
    /// Checks a request's inputs and gives the key of the batches it may join.
    pub(super) fn key(&self, inputs: &[Tensor]) -> Result<BatchKey, ForwardError> {
        match self {
            Collate::Stack => Ok(BatchKey(
                inputs
                    .iter()
                    .map(|t| (t.kind(), t.size().get(1..).unwrap_or_default().to_vec()))
                    .collect(),
            )),
            Collate::Tokens { pad_values } => {
                let shape = |t: &Tensor| t.size();
                let first = inputs.first().map(shape).unwrap_or_default();
                let fits = inputs.len() == pad_values.len()
                    && first.len() == 2
                    && first[1] > 0
                    && inputs
                        .iter()
                        .all(|t| shape(t) == first && t.kind() == Kind::Int64);
                if !fits {
                    return Err(ForwardError::Shape {
                        message: format!(
                            "token inputs are {} int64 tensors of one shape [items, tokens]; got {:?}",
                            pad_values.len(),
                            inputs.iter().map(|t| (t.kind(), t.size())).collect::<Vec<_>>()
                        ),
                    });
                }
                let bucket = token_bucket(first[1]);
                Ok(BatchKey(vec![(Kind::Int64, vec![bucket]); inputs.len()]))
            }
        }
    }

    /// Input `i` of every request, joined along dim 0 (token inputs padded first to
    /// the batch's longest).
    pub(super) fn join(&self, mut inputs: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, ForwardError> {
        if inputs.len() == 1 {
            return Ok(inputs.pop().unwrap_or_default());
        }
        let longest = inputs
            .iter()
            .filter_map(|r| r.first().and_then(|t| t.size().get(1).copied()))
            .max()
            .unwrap_or(0);
        let arity = inputs.first().map_or(0, Vec::len);
        (0..arity)
            .map(|i| {
                let parts = inputs
                    .iter()
                    .map(|r| match self {
                        Collate::Stack => Ok(r[i].shallow_clone()),
                        Collate::Tokens { pad_values } => {
                            let short = longest - r[i].size()[1];
                            r[i].f_pad([0, short], "constant", pad_values[i] as f64)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ForwardError::from_torch)?;
                Tensor::f_cat(&parts, 0).map_err(ForwardError::from_torch)
            })
            .collect()
    }
}

/// Each output cut into the callers' shares along dim 0.
pub(super) fn split(
    outputs: Vec<Tensor>,
    sizes: &[i64],
    total: i64,
) -> Result<Vec<Vec<Tensor>>, ForwardError> {
    if let Some(bad) = outputs.iter().find(|o| o.size().first() != Some(&total)) {
        return Err(ForwardError::Model {
            message: format!(
                "the model returned shape {:?} for a batch of {total} items; a batchable model's outputs lead with the item dimension",
                bad.size()
            ),
        });
    }
    let mut parts: Vec<Vec<Tensor>> = sizes
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in &outputs {
        let pieces = output
            .f_split_with_sizes(sizes, 0)
            .map_err(ForwardError::from_torch)?;
        for (part, piece) in parts.iter_mut().zip(pieces) {
            part.push(piece);
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(pad: i64) -> Collate {
        Collate::Tokens {
            pad_values: vec![pad, 0],
        }
    }

    #[test]
    fn buckets_grow_with_length() {
        assert_eq!(token_bucket(1), 8);
        assert_eq!(token_bucket(9), 16);
        assert_eq!(token_bucket(33), 48);
        assert_eq!(token_bucket(512), 512);
        assert_eq!(token_bucket(513), 768);
    }

    #[test]
    fn token_requests_pad_to_the_batch_longest_with_each_inputs_value() {
        let collate = tokens(7);
        let a = vec![
            Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]),
            Tensor::from_slice(&[1i64, 1, 1]).view([1, 3]),
        ];
        let b = vec![
            Tensor::from_slice(&[4i64]).view([1, 1]),
            Tensor::from_slice(&[1i64]).view([1, 1]),
        ];
        assert_eq!(collate.key(&a).unwrap(), collate.key(&b).unwrap());
        let joined = collate.join(vec![a, b]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(joined[0].view([-1])).unwrap(),
            vec![1, 2, 3, 4, 7, 7]
        );
        assert_eq!(
            Vec::<i64>::try_from(joined[1].view([-1])).unwrap(),
            vec![1, 1, 1, 1, 0, 0]
        );
    }

    #[test]
    fn token_inputs_of_the_wrong_form_are_refused() {
        let collate = tokens(0);
        let floats: Vec<_> = (0..2)
            .map(|_| Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu)))
            .collect();
        assert!(matches!(
            collate.key(&floats),
            Err(ForwardError::Shape { .. })
        ));
        let one = vec![Tensor::zeros([1, 3], (Kind::Int64, tch::Device::Cpu))];
        assert!(matches!(collate.key(&one), Err(ForwardError::Shape { .. })));
    }
}
