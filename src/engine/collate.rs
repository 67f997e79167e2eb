//! How one batch's requests become one forward's inputs, and its outputs each
//! caller's answer.
//!
//! The tensor task stacks items of one dtype and trailing shape. The embedding task
//! batches token sequences of similar length: each batch is padded only to its own
//! longest sequence (a short text is never padded to the longest in the queue), and
//! the model's token vectors are pooled, per text, into one vector, on the device.

use tch::{Kind, Tensor};

use super::error::ForwardError;

/// What a batch key compares: the dtype and trailing shape of each input (for
/// token inputs, the length bucket instead of the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BatchKey(Vec<(Kind, Vec<i64>)>);

/// How an engine joins requests and shares out outputs.
#[derive(Debug, Clone, Default)]
pub enum Collate {
    /// Concatenate along dim 0; requests of one batch share every trailing shape.
    #[default]
    Stack,
    /// Token sequences `[items, tokens]`: padded per batch, pooled after the forward.
    Tokens(TokenPooling),
}

/// Padding and pooling for a model that returns token vectors `[batch, tokens, hidden]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPooling {
    /// The value each input is padded with (the pad token id for `input_ids`, 0 for
    /// the attention mask and token types), in the model's input order.
    pub pad_values: Vec<i64>,
    /// Which input is the attention mask (1 for a token, 0 for padding).
    pub mask_input: usize,
    pub pooling: Pooling,
    /// L2-normalize each pooled vector.
    pub normalize: bool,
}

/// How token vectors become one vector per text (sentence-transformers' modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the text's token vectors (padding excluded).
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The element-wise maximum over the text's token vectors.
    Max,
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
        })
    }
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
            Collate::Tokens(pooling) => {
                let shape = |t: &Tensor| t.size();
                let first = inputs.first().map(shape).unwrap_or_default();
                let fits = inputs.len() == pooling.pad_values.len()
                    && first.len() == 2
                    && first[1] > 0
                    && inputs
                        .iter()
                        .all(|t| shape(t) == first && t.kind() == Kind::Int64);
                if !fits {
                    return Err(ForwardError::Shape {
                        message: format!(
                            "token inputs are {} int64 tensors of one shape [items, tokens]; got {:?}",
                            pooling.pad_values.len(),
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
                        Collate::Tokens(pooling) => {
                            let short = longest - r[i].size()[1];
                            r[i].f_pad([0, short], "constant", pooling.pad_values[i] as f64)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ForwardError::from_torch)?;
                Tensor::f_cat(&parts, 0).map_err(ForwardError::from_torch)
            })
            .collect()
    }

    /// The forward's outputs as the callers' answers: as they are, or token
    /// vectors pooled (and normalized) into one vector per item. Runs on the
    /// model's device, before the outputs go back to the CPU.
    pub(super) fn finish(
        &self,
        inputs: &[Tensor],
        outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, ForwardError> {
        match self {
            Collate::Stack => Ok(outputs),
            Collate::Tokens(pooling) => {
                let Some(hidden) = outputs.into_iter().next() else {
                    return Err(ForwardError::Model {
                        message: "the model returned nothing".to_string(),
                    });
                };
                let mask = &inputs[pooling.mask_input];
                if hidden.dim() != 3 || hidden.size()[..2] != mask.size()[..] {
                    return Err(ForwardError::Model {
                        message: format!(
                            "an embedding model returns token vectors [batch, tokens, hidden] = [{}, {}, _]; this one returned {:?}",
                            mask.size()[0],
                            mask.size()[1],
                            hidden.size()
                        ),
                    });
                }
                pool(&hidden, mask, pooling)
                    .map(|pooled| vec![pooled])
                    .map_err(ForwardError::from_torch)
            }
        }
    }
}

/// sentence-transformers' pooling and normalization, in the same arithmetic.
fn pool(hidden: &Tensor, mask: &Tensor, pooling: &TokenPooling) -> Result<Tensor, tch::TchError> {
    let kind = hidden.kind();
    let mask = mask.f_unsqueeze(-1)?.f_to_kind(kind)?;
    let pooled = match pooling.pooling {
        Pooling::Mean => {
            let sum = hidden.f_mul(&mask)?.f_sum_dim_intlist(1, false, kind)?;
            let count = mask.f_sum_dim_intlist(1, false, kind)?.f_clamp_min(1e-9)?;
            sum.f_div(&count)?
        }
        Pooling::Cls => hidden.f_select(1, 0)?,
        Pooling::Max => {
            let padding = mask.f_eq(0)?.f_expand_as(hidden)?;
            hidden.f_masked_fill(&padding, -1e9)?.f_amax(1, false)?
        }
    };
    if pooling.normalize {
        // torch.nn.functional.normalize: x / max(||x||, eps).
        let norm = pooled
            .f_norm_scalaropt_dim(2.0, 1, true)?
            .f_clamp_min(1e-12)?;
        pooled.f_div(&norm)
    } else {
        Ok(pooled)
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
        Collate::Tokens(TokenPooling {
            pad_values: vec![pad, 0],
            mask_input: 1,
            pooling: Pooling::Mean,
            normalize: false,
        })
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
    fn mean_pooling_ignores_padding_and_normalizing_gives_unit_vectors() {
        let hidden = Tensor::from_slice(&[1f32, 2., 3., 4., 100., 100.]).view([1, 3, 2]);
        let mask = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let mut pooling = TokenPooling {
            pad_values: vec![0, 0],
            mask_input: 1,
            pooling: Pooling::Mean,
            normalize: false,
        };
        let mean = pool(&hidden, &mask, &pooling).unwrap();
        assert_eq!(Vec::<f32>::try_from(mean.view([-1])).unwrap(), vec![2., 3.]);
        pooling.pooling = Pooling::Max;
        let max = pool(&hidden, &mask, &pooling).unwrap();
        assert_eq!(Vec::<f32>::try_from(max.view([-1])).unwrap(), vec![3., 4.]);
        pooling.pooling = Pooling::Cls;
        pooling.normalize = true;
        let cls = pool(&hidden, &mask, &pooling).unwrap();
        let v = Vec::<f32>::try_from(cls.view([-1])).unwrap();
        assert!((v[0] - 1. / 5f32.sqrt()).abs() < 1e-6 && (v[1] - 2. / 5f32.sqrt()).abs() < 1e-6);
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
