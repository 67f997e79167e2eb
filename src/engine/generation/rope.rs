//! Rotary position embeddings, computed as `transformers` computes them (inverse
//! frequencies in f32, Llama 3's scaling, cos/sin cast to the model's dtype), as a
//! table for every position a sequence can reach.

use tch::{Device, Kind, Tensor};

use super::config::{ModelConfig, RopeScaling};

/// cos and sin for positions `0..positions`, `[positions, head_dim]`.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(config: &ModelConfig, positions: i64, kind: Kind, device: Device) -> Rope {
        let inv_freq = inverse_frequencies(config);
        let inv_freq = Tensor::from_slice(&inv_freq);
        let position = Tensor::arange(positions, (Kind::Float, Device::Cpu));
        // The outer product in f32, as transformers' matmul of one-long vectors.
        let freqs = position.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: emb.cos().to_kind(kind).to_device(device),
            sin: emb.sin().to_kind(kind).to_device(device),
        }
    }

    /// `x * cos + rotate_half(x) * sin`, for `x` of `[batch, heads, tokens, head_dim]`
    /// and `cos`/`sin` broadcastable to it.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3);
        x * cos + rotated * sin
    }
}

/// `1 / theta^(2i/d)`, then the config's scaling, in f32 as transformers has it.
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    // torch's own pow and reciprocal, as `1.0 / (base ** (arange(0, dim, 2) / dim))`.
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    let inv = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal();
    let inv: Vec<f32> = Vec::<f32>::try_from(&inv).unwrap_or_default();
    match config.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers' `~(wavelen < high) * ~(wavelen > low)`.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}
