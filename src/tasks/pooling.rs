//! sentence-transformers' pooling, run by the engine on the model's device after
//! each forward of an embedding model: token vectors `[batch, tokens, hidden]`
//! become one vector per text, L2-normalized where the model says so.

use tch::Tensor;

use crate::engine::{Finish, ForwardError};

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

/// The embedding task's finishing step for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooler {
    /// Which input is the attention mask (1 for a token, 0 for padding).
    pub mask_input: usize,
    pub pooling: Pooling,
    /// L2-normalize each pooled vector.
    pub normalize: bool,
}

impl Finish for Pooler {
    fn finish(&self, inputs: &[Tensor], outputs: Vec<Tensor>) -> Result<Vec<Tensor>, ForwardError> {
        let Some(hidden) = outputs.into_iter().next() else {
            return Err(ForwardError::Model {
                message: "the model returned nothing".to_string(),
            });
        };
        let Some(mask) = inputs.get(self.mask_input) else {
            return Err(ForwardError::Arity {
                message: format!(
                    "the attention mask is input {}, but the forward had {} inputs",
                    self.mask_input,
                    inputs.len()
                ),
            });
        };
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
        // Vectors go to the caller as f32 whatever the model computes in.
        self.pool(&hidden, mask)
            .and_then(|pooled| pooled.f_to_kind(tch::Kind::Float))
            .map(|pooled| vec![pooled])
            .map_err(ForwardError::from_torch)
    }
}

impl Pooler {
    /// sentence-transformers' pooling and normalization, in the same arithmetic.
    fn pool(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor, tch::TchError> {
        let kind = hidden.kind();
        let mask = mask.f_unsqueeze(-1)?.f_to_kind(kind)?;
        let pooled = match self.pooling {
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
        if self.normalize {
            // torch.nn.functional.normalize: x / max(||x||, eps).
            let norm = pooled
                .f_norm_scalaropt_dim(2.0, 1, true)?
                .f_clamp_min(1e-12)?;
            pooled.f_div(&norm)
        } else {
            Ok(pooled)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn mean_pooling_ignores_padding_and_normalizing_gives_unit_vectors() {
        let hidden = Tensor::from_slice(&[1f32, 2., 3., 4., 100., 100.]).view([1, 3, 2]);
        let mask = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let mut pooler = Pooler {
            mask_input: 1,
            pooling: Pooling::Mean,
            normalize: false,
        };
        let mean = pooler.pool(&hidden, &mask).unwrap();
        assert_eq!(Vec::<f32>::try_from(mean.view([-1])).unwrap(), vec![2., 3.]);
        pooler.pooling = Pooling::Max;
        let max = pooler.pool(&hidden, &mask).unwrap();
        assert_eq!(Vec::<f32>::try_from(max.view([-1])).unwrap(), vec![3., 4.]);
        pooler.pooling = Pooling::Cls;
        pooler.normalize = true;
        let cls = pooler.pool(&hidden, &mask).unwrap();
        let v = Vec::<f32>::try_from(cls.view([-1])).unwrap();
        assert!((v[0] - 1. / 5f32.sqrt()).abs() < 1e-6 && (v[1] - 2. / 5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn a_model_that_returns_no_token_vectors_is_a_model_error() {
        let pooler = Pooler {
            mask_input: 1,
            pooling: Pooling::Mean,
            normalize: false,
        };
        let mask = Tensor::from_slice(&[1i64, 1]).view([1, 2]);
        let flat = Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu));
        let err = pooler
            .finish(&[mask.shallow_clone(), mask], vec![flat])
            .unwrap_err();
        assert!(matches!(err, ForwardError::Model { .. }), "{err}");
    }
}
