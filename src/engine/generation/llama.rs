//! The Llama family's forward on libtorch operations (RMSNorm, rotary embeddings,
//! grouped-query attention, SwiGLU), written once for Llama, Mistral and Qwen2:
//! a prefill of one sequence's prompt into its KV-cache slot, and a decode step of
//! one token for many sequences at once. The arithmetic follows `transformers`'
//! modeling code step for step (norms in f32, cos/sin in the model's dtype), so
//! greedy answers equal its own.

use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::rope::Rope;
use super::weights::{Checkpoint, WeightsError};

/// A projection: `x @ w.T (+ b)`.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// q, k and v in one projection (their weights concatenated at load).
    qkv: Linear,
    o: Linear,
    /// The MLP's gate and up projections in one.
    gate_up: Linear,
    down: Linear,
}

/// The model on its device.
pub struct Llama {
    config: ModelConfig,
    kind: Kind,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
}

/// The tensors a checkpoint of `config` must have, by `transformers`' names.
pub fn tensor_names(config: &ModelConfig, checkpoint: &Checkpoint) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !tied(config, checkpoint) {
        names.push("lm_head.weight".to_string());
    }
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            names.push(format!("{p}.{norm}.weight"));
        }
        for proj in ["q_proj", "k_proj", "v_proj"] {
            names.push(format!("{p}.self_attn.{proj}.weight"));
            if config.qkv_bias {
                names.push(format!("{p}.self_attn.{proj}.bias"));
            }
        }
        names.push(format!("{p}.self_attn.o_proj.weight"));
        if config.o_bias {
            names.push(format!("{p}.self_attn.o_proj.bias"));
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}.mlp.{proj}.weight"));
            if config.mlp_bias {
                names.push(format!("{p}.mlp.{proj}.bias"));
            }
        }
    }
    names
}

/// The output projection is the embedding: the config says so, or the checkpoint
/// has no `lm_head` of its own.
fn tied(config: &ModelConfig, checkpoint: &Checkpoint) -> bool {
    config.tie_word_embeddings || !checkpoint.has("lm_head.weight")
}

/// The shape `transformers` gives each tensor of `config`, to check the checkpoint.
fn expected_shape(config: &ModelConfig, name: &str) -> Option<Vec<i64>> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let tail = name.rsplit_once("layers.").map_or(name, |(_, t)| t);
    let part = |suffix: &str| tail.ends_with(suffix);
    Some(
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            vec![v, h]
        } else if part("norm.weight") || part("layernorm.weight") {
            vec![h]
        } else if part("q_proj.weight") {
            vec![q, h]
        } else if part("k_proj.weight") || part("v_proj.weight") {
            vec![kv, h]
        } else if part("q_proj.bias") {
            vec![q]
        } else if part("k_proj.bias") || part("v_proj.bias") {
            vec![kv]
        } else if part("o_proj.weight") {
            vec![h, q]
        } else if part("gate_proj.weight") || part("up_proj.weight") {
            vec![i, h]
        } else if part("down_proj.weight") {
            vec![h, i]
        } else {
            return None;
        },
    )
}

impl Llama {
    /// Reads the checkpoint's tensors onto `device` as `kind` and builds the model,
    /// with rotary tables for `max_context` positions.
    pub fn load(
        config: &ModelConfig,
        checkpoint: &Checkpoint,
        kind: Kind,
        device: Device,
        max_context: i64,
    ) -> Result<Llama, WeightsError> {
        let names = tensor_names(config, checkpoint);
        for name in &names {
            let found = checkpoint.shape(name)?;
            if let Some(expected) = expected_shape(config, name) {
                if found != expected {
                    return Err(WeightsError::Shape {
                        name: name.clone(),
                        found,
                        expected,
                    });
                }
            }
        }
        let mut tensors = checkpoint.load(&names, kind, device)?;
        let mut take = |name: &str| tensors.remove(name).expect("loaded above");
        let embed = take("model.embed_tokens.weight");
        let lm_head = if tied(config, checkpoint) {
            embed.shallow_clone()
        } else {
            take("lm_head.weight")
        };
        let norm = take("model.norm.weight");
        let mut layers = Vec::with_capacity(config.num_layers as usize);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            let mut linear = |proj: &str, bias: bool| Linear {
                weight: take(&format!("{p}.{proj}.weight")),
                bias: bias.then(|| take(&format!("{p}.{proj}.bias"))),
            };
            let q = linear("self_attn.q_proj", config.qkv_bias);
            let k = linear("self_attn.k_proj", config.qkv_bias);
            let v = linear("self_attn.v_proj", config.qkv_bias);
            let o = linear("self_attn.o_proj", config.o_bias);
            let gate = linear("mlp.gate_proj", config.mlp_bias);
            let up = linear("mlp.up_proj", config.mlp_bias);
            let down = linear("mlp.down_proj", config.mlp_bias);
            layers.push(Layer {
                input_norm: take(&format!("{p}.input_layernorm.weight")),
                post_attention_norm: take(&format!("{p}.post_attention_layernorm.weight")),
                qkv: concat(&[q, k, v]),
                o,
                gate_up: concat(&[gate, up]),
                down,
            });
        }
        Ok(Llama {
            config: config.clone(),
            kind,
            device,
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(config, max_context, kind, device),
        })
    }

    /// Runs `tokens` (one sequence's prompt) into slot `slot` of the cache from
    /// position 0, and returns the logits of its last position, `[vocab]`.
    pub fn prefill(&self, cache: &mut KvCache, slot: i64, tokens: &[i64]) -> Tensor {
        let t = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens)
            .to_device(self.device)
            .unsqueeze(0);
        let mut x = Tensor::embedding(&self.embed, &ids, -1, false, false);
        let cos = self.rope.cos.narrow(0, 0, t).view([1, 1, t, -1]);
        let sin = self.rope.sin.narrow(0, 0, t).view([1, 1, t, -1]);
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.attention_inputs(layer, &x, &cos, &sin);
            cache.write_prompt(l, slot, &k, &v);
            let attended = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                self.grouped(),
            );
            x = self.rest_of_layer(layer, x, attended);
        }
        let last = x.narrow(1, t - 1, 1);
        self.logits(&last).view([-1])
    }

    /// One token for each of several sequences: `tokens[i]` at position
    /// `positions[i]` of slot `slots[i]`. Returns the logits, `[batch, vocab]`.
    pub fn decode(
        &self,
        cache: &mut KvCache,
        slots: &[i64],
        positions: &[i64],
        tokens: &[i64],
    ) -> Tensor {
        let b = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens)
            .to_device(self.device)
            .unsqueeze(1);
        let mut x = Tensor::embedding(&self.embed, &ids, -1, false, false);
        let position = Tensor::from_slice(positions).to_device(self.device);
        let cos = self.rope.cos.index_select(0, &position).view([b, 1, 1, -1]);
        let sin = self.rope.sin.index_select(0, &position).view([b, 1, 1, -1]);
        // Keys up to the longest sequence; each sees its own positions only.
        let length = positions.iter().max().copied().unwrap_or(0) + 1;
        let mask = Tensor::arange(length, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .le_tensor(&Tensor::from_slice(positions).unsqueeze(1))
            .view([b, 1, 1, length])
            .to_device(self.device);
        let rows = cache.rows(slots);
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.attention_inputs(layer, &x, &cos, &sin);
            cache.write_step(l, &rows, &position, &k, &v);
            let (keys, values) = cache.read(l, &rows, length);
            // The query heads that share a key/value head are that head's queries
            // (one token each): grouped-query attention without repeating the
            // keys, and a plain masked attention that every kernel takes.
            let c = &self.config;
            let q = q.reshape([b, c.num_kv_heads, c.num_heads / c.num_kv_heads, c.head_dim]);
            let attended = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&mask),
                0.0,
                false,
                None,
                false,
            )
            .reshape([b, c.num_heads, 1, c.head_dim]);
            x = self.rest_of_layer(layer, x, attended);
        }
        self.logits(&x).view([b, -1])
    }

    fn grouped(&self) -> bool {
        self.config.num_heads != self.config.num_kv_heads
    }

    /// q, k, v of `x` (`[batch, tokens, hidden]`) with rotary embeddings applied,
    /// each `[batch, heads, tokens, head_dim]`.
    fn attention_inputs(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let c = &self.config;
        let h = self.rms_norm(x, &layer.input_norm);
        let qkv = layer.qkv.forward(&h);
        let q_width = c.num_heads * c.head_dim;
        let kv_width = c.num_kv_heads * c.head_dim;
        let parts = qkv.split_with_sizes([q_width, kv_width, kv_width], -1);
        let heads = |x: &Tensor, n: i64| x.view([b, t, n, c.head_dim]).transpose(1, 2);
        let q = heads(&parts[0], c.num_heads);
        let k = heads(&parts[1], c.num_kv_heads);
        let v = heads(&parts[2], c.num_kv_heads);
        (Rope::apply(&q, cos, sin), Rope::apply(&k, cos, sin), v)
    }

    /// The attention's output projection, the residual, and the MLP.
    fn rest_of_layer(&self, layer: &Layer, x: Tensor, attended: Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let attended = attended.transpose(1, 2).reshape([b, t, -1]);
        let x = x + layer.o.forward(&attended);
        let h = self.rms_norm(&x, &layer.post_attention_norm);
        let gate_up = layer.gate_up.forward(&h);
        let parts = gate_up.chunk(2, -1);
        let mlp = layer.down.forward(&(parts[0].silu() * &parts[1]));
        x + mlp
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        self.rms_norm(x, &self.norm)
            .linear(&self.lm_head, None::<Tensor>)
    }

    /// `transformers`' LlamaRMSNorm: in f32, then back to the model's dtype.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.config.rms_norm_eps).rsqrt();
        weight * normed.to_kind(self.kind)
    }
}

/// Several projections of the same input as one (outputs concatenated).
fn concat(parts: &[Linear]) -> Linear {
    let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
    let bias = parts
        .iter()
        .map(|p| p.bias.as_ref())
        .collect::<Option<Vec<&Tensor>>>()
        .map(|b| Tensor::cat(&b, 0));
    Linear {
        weight: Tensor::cat(&weights, 0),
        bias,
    }
}

/// Bytes the weights of `names` take on the device as `kind`.
pub fn weight_bytes(checkpoint: &Checkpoint, names: &[String], kind: Kind) -> u64 {
    names
        .iter()
        .filter_map(|n| checkpoint.shape(n).ok())
        .map(|shape| shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64)
        .sum()
}
