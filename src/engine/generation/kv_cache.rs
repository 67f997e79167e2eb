//! The KV cache: for every layer, keys and values of every sequence slot, allocated
//! once at load for the whole context (`[slots, kv_heads, context, head_dim]`), so
//! a step never allocates cache memory and a slot is reused by overwriting.

use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

/// The slots of one decode step, in the cache's terms.
pub struct Rows {
    /// The slots as an index tensor on the device.
    index: Tensor,
    /// `(first, count)` when the slots are consecutive: read in place, no gather.
    consecutive: Option<(i64, i64)>,
}

impl KvCache {
    /// Bytes the cache of `slots` sequences of `context` tokens takes as `kind`.
    pub fn bytes(config: &ModelConfig, slots: i64, context: i64, kind: Kind) -> u64 {
        let per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim;
        (per_token * slots * context) as u64 * kind.elt_size_in_bytes() as u64
    }

    /// Allocates the cache on `device`.
    pub fn new(
        config: &ModelConfig,
        slots: i64,
        context: i64,
        kind: Kind,
        device: Device,
    ) -> Result<KvCache, tch::TchError> {
        let shape = [slots, config.num_kv_heads, context, config.head_dim];
        let mut keys = Vec::with_capacity(config.num_layers as usize);
        let mut values = Vec::with_capacity(config.num_layers as usize);
        for _ in 0..config.num_layers {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(KvCache { keys, values })
    }

    /// Writes a prompt's keys and values (`[1, kv_heads, tokens, head_dim]`) at
    /// positions `0..tokens` of `slot`.
    pub fn write_prompt(&mut self, layer: usize, slot: i64, k: &Tensor, v: &Tensor) {
        let tokens = k.size()[2];
        for (cache, new) in [(&self.keys[layer], k), (&self.values[layer], v)] {
            let mut place = cache.get(slot).narrow(1, 0, tokens);
            place.copy_(&new.squeeze_dim(0));
        }
    }

    /// Copies the first `length` positions of slot `from` into slot `to`.
    pub fn move_slot(&mut self, from: i64, to: i64, length: i64) {
        for cache in self.keys.iter().chain(&self.values) {
            let source = cache.get(from).narrow(1, 0, length);
            let mut target = cache.get(to).narrow(1, 0, length);
            target.copy_(&source);
        }
    }

    /// The rows of `slots`.
    pub fn rows(&self, slots: &[i64]) -> Rows {
        let device = self.keys.first().map_or(Device::Cpu, |k| k.device());
        let consecutive = slots
            .windows(2)
            .all(|w| w[1] == w[0] + 1)
            .then(|| (slots.first().copied().unwrap_or(0), slots.len() as i64));
        Rows {
            index: Tensor::from_slice(slots).to_device(device),
            consecutive,
        }
    }

    /// Writes one token's keys and values (`[batch, kv_heads, 1, head_dim]`) of
    /// each row at its position (`[batch]`).
    pub fn write_step(
        &mut self,
        layer: usize,
        rows: &Rows,
        positions: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) {
        for (cache, new) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            // Slots and positions index dims 0 and 2: the values are [batch, kv_heads, head_dim].
            let _ = cache.index_put_(
                &[Some(&rows.index), None, Some(positions)],
                &new.squeeze_dim(2),
                false,
            );
        }
    }

    /// Keys and values of the rows' first `length` positions, `[batch, kv_heads,
    /// length, head_dim]`.
    pub fn read(&self, layer: usize, rows: &Rows, length: i64) -> (Tensor, Tensor) {
        let read = |cache: &Tensor| match rows.consecutive {
            Some((first, count)) => cache.narrow(0, first, count).narrow(2, 0, length),
            None => cache.narrow(2, 0, length).index_select(0, &rows.index),
        };
        (read(&self.keys[layer]), read(&self.values[layer]))
    }
}
