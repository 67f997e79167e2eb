//! How one batch's requests become one forward's inputs, and which requests
//! make a batch.
//!
//! The tensor task stacks items of one dtype and trailing shape. The embedding
//! task batches token sequences: each batch is padded only to its own longest
//! sequence, and is chosen from everything queued by length, so that texts of
//! like length run together (a short text is never padded to the longest in the
//! queue). What a task does to the outputs on the device (pooling) is its own
//! [`Finish`].

use tch::{Kind, Tensor};

use super::error::ForwardError;
use super::host::HostTensor;

/// What a batch key compares: the dtype and trailing shape of each input (for
/// token inputs, only the dtypes: any lengths may share a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BatchKey(Vec<(Kind, Vec<i64>)>);

/// How an engine joins requests and shares out outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Collate {
    /// Concatenate along dim 0; requests of one batch share every trailing shape.
    #[default]
    Stack,
    /// Token sequences `[items, tokens]`, batched by length and padded per batch
    /// to its longest, each input with its own value (the pad token id for
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

impl Collate {
    /// Checks a request's inputs and gives the key of the batches it may join.
    pub(super) fn key(&self, inputs: &[HostTensor]) -> Result<BatchKey, ForwardError> {
        let first = inputs
            .first()
            .map(|t| t.shape.as_slice())
            .unwrap_or_default();
        let items = first.first().copied().unwrap_or(0);
        if items <= 0 || inputs.iter().any(|t| t.items() != items) {
            return Err(ForwardError::Shape {
                message: "every input must lead with the same, non-zero number of items"
                    .to_string(),
            });
        }
        if let Some((i, t)) = inputs.iter().enumerate().find(|(_, t)| !t.is_whole()) {
            return Err(ForwardError::Shape {
                message: format!(
                    "input {i}: shape {:?} of {:?} does not match its {} bytes",
                    t.shape,
                    t.kind,
                    t.data.len()
                ),
            });
        }
        match self {
            Collate::Stack => Ok(BatchKey(
                inputs
                    .iter()
                    .map(|t| (t.kind, t.shape[1..].to_vec()))
                    .collect(),
            )),
            Collate::Tokens { pad_values } => {
                let fits = inputs.len() == pad_values.len()
                    && first.len() == 2
                    && first[1] > 0
                    && inputs
                        .iter()
                        .all(|t| t.shape == first && t.kind == Kind::Int64);
                if !fits {
                    return Err(ForwardError::Shape {
                        message: format!(
                            "token inputs are {} int64 tensors of one shape [items, tokens]; got {:?}",
                            pad_values.len(),
                            inputs.iter().map(|t| (t.kind, &t.shape)).collect::<Vec<_>>()
                        ),
                    });
                }
                Ok(BatchKey(vec![(Kind::Int64, Vec::new()); inputs.len()]))
            }
        }
    }

    /// Whether batches are chosen by length ([`choose_by_length`]).
    pub(super) fn by_length(&self) -> bool {
        matches!(self, Collate::Tokens { .. })
    }

    /// Input `i` of every request, joined along dim 0 into one CPU tensor (token
    /// inputs padded to the batch's longest): one copy of each request's bytes.
    pub(super) fn join(&self, requests: &[&[HostTensor]]) -> Result<Vec<Tensor>, ForwardError> {
        let arity = requests.first().map_or(0, |r| r.len());
        if let [one] = requests {
            return one.iter().map(HostTensor::to_tensor).collect();
        }
        let total: i64 = requests.iter().map(|r| r[0].items()).sum();
        (0..arity)
            .map(|i| match self {
                Collate::Stack => {
                    let first = &requests[0][i];
                    let mut data = Vec::with_capacity(total as usize * first.row_bytes());
                    for r in requests {
                        data.extend_from_slice(&r[i].data);
                    }
                    let mut shape = first.shape.clone();
                    shape[0] = total;
                    Tensor::f_from_data_size(&data, &shape, first.kind)
                        .map_err(ForwardError::from_torch)
                }
                Collate::Tokens { pad_values } => {
                    let longest = requests.iter().map(|r| r[i].shape[1]).max().unwrap_or(0);
                    let mut values = Vec::with_capacity((total * longest) as usize);
                    for r in requests {
                        let t = &r[i];
                        for row in t.data.chunks_exact(t.row_bytes()) {
                            values.extend(
                                row.chunks_exact(8)
                                    .map(|b| i64::from_ne_bytes(b.try_into().unwrap_or_default())),
                            );
                            let short = (longest - t.shape[1]) as usize;
                            values.extend(std::iter::repeat_n(pad_values[i], short));
                        }
                    }
                    Tensor::f_from_slice(&values)
                        .and_then(|t| t.f_view([total, longest]))
                        .map_err(ForwardError::from_torch)
                }
            })
            .collect()
    }
}

/// What a token forward costs on this engine's device, learned from the
/// forwards it ran: `seconds = fixed + per_slot × slots`, fitted by least
/// squares over recent forwards. Its ratio, the fixed cost in token slots, is
/// what [`choose_by_length`] weighs padding against: large on a GPU (a forward
/// costs about the same whatever its size, so batches should be full), small on
/// a CPU (every slot costs, so padding should be avoided).
#[derive(Debug, Clone)]
pub(super) struct ForwardCost {
    /// Decayed sums of 1, slots, seconds, slots², slots × seconds.
    sums: [f64; 5],
    forwards: u64,
}

impl Default for ForwardCost {
    fn default() -> Self {
        ForwardCost {
            sums: [0.0; 5],
            forwards: 0,
        }
    }
}

impl ForwardCost {
    /// Before enough forwards are seen: all-MiniLM-L6-v2 on a 2-core CPU costs
    /// about 75 slots a forward (15 ms against 0.19 ms a slot).
    const PRIOR_SLOTS: i64 = 128;
    /// Forwards seen before the fit is used.
    const WARM: u64 = 16;
    /// How much each forward's weight fades per forward (about the last 200).
    const DECAY: f64 = 0.995;

    /// A forward of `slots` token slots took `seconds`.
    pub fn observe(&mut self, slots: i64, seconds: f64) {
        let x = slots as f64;
        for s in &mut self.sums {
            *s *= Self::DECAY;
        }
        let [n, sx, sy, sxx, sxy] = &mut self.sums;
        *n += 1.0;
        *sx += x;
        *sy += seconds;
        *sxx += x * x;
        *sxy += x * seconds;
        self.forwards += 1;
    }

    /// A forward's fixed cost in token slots, between 8 and 65536.
    pub fn fixed_slots(&self) -> i64 {
        let [n, sx, sy, sxx, sxy] = self.sums;
        let spread = n * sxx - sx * sx;
        if self.forwards < Self::WARM || spread <= f64::EPSILON * n * sxx {
            return Self::PRIOR_SLOTS;
        }
        let per_slot = (n * sxy - sx * sy) / spread;
        let fixed = (sy - per_slot * sx) / n;
        if per_slot <= 0.0 {
            // Slots cost nothing measurable: fill batches.
            return 65536;
        }
        ((fixed / per_slot).round() as i64).clamp(8, 65536)
    }
}

/// Which of the queued token requests run together, as indices into `queued`
/// (each `(tokens, items)`; index 0 is the oldest, which always runs). The
/// requests are taken in order of length outward from the oldest, each time the
/// neighbour that adds the least padding, up to `max_items` items, as long as
/// the batch's tokens per slot, counting `fixed_slots` for the forward itself
/// ([`ForwardCost`]), do not drop: padded token count, not the number of
/// items, decides.
pub(super) fn choose_by_length(
    queued: &[(i64, i64)],
    max_items: i64,
    fixed_slots: i64,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..queued.len()).collect();
    order.sort_by_key(|&i| (queued[i].0, i));
    let Some(at) = order.iter().position(|&i| i == 0) else {
        return Vec::new();
    };
    let (mut longest, mut items) = queued[0];
    let mut tokens_in = longest * items;
    let mut chosen = vec![0];
    // The next candidates in order of length, below and above the oldest.
    let (mut down, mut up) = (at.checked_sub(1), Some(at + 1).filter(|&j| j < order.len()));
    loop {
        // One too large for the room left is passed over, not a reason to stop.
        let room = |mut j: Option<usize>, step: fn(usize) -> Option<usize>| {
            while let Some(k) = j {
                if items + queued[order[k]].1 <= max_items {
                    break;
                }
                j = step(k).filter(|&k| k < order.len());
            }
            j
        };
        down = room(down, |k| k.checked_sub(1));
        up = room(up, |k| Some(k + 1));
        // Adding a shorter request pads it to the longest; a longer one pads
        // every row already chosen to its length. Worth it while the batch's
        // tokens per slot do not drop: own / (own + padding) against
        // tokens_in / (fixed_slots + slots so far).
        let padding = longest * items - tokens_in;
        let cost = |j: usize, shorter: bool| {
            let (tokens, n) = queued[order[j]];
            let cost = if shorter {
                (longest - tokens) * n
            } else {
                (tokens - longest) * items
            };
            let own = tokens * n;
            (cost * tokens_in <= own * (fixed_slots + padding)).then_some(cost)
        };
        let below = down.and_then(|j| cost(j, true).map(|c| (j, c)));
        let above = up.and_then(|j| cost(j, false).map(|c| (j, c)));
        // Past a neighbour that pads too much, every further one pads more.
        if below.is_none() {
            down = None;
        }
        if above.is_none() {
            up = None;
        }
        let j = match (below, above) {
            (Some((b, cb)), Some((_, ca))) if cb <= ca => b,
            (_, Some((a, _))) => a,
            (Some((b, _)), None) => b,
            (None, None) => break,
        };
        let (tokens, n) = queued[order[j]];
        if Some(j) == down {
            down = j.checked_sub(1);
        } else {
            up = Some(j + 1).filter(|&k| k < order.len());
        }
        longest = longest.max(tokens);
        items += n;
        tokens_in += tokens * n;
        chosen.push(order[j]);
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(pad: i64) -> Collate {
        Collate::Tokens {
            pad_values: vec![pad, 0],
        }
    }

    fn host(values: &[i64]) -> HostTensor {
        HostTensor::from_tensor(&Tensor::from_slice(values).view([1, values.len() as i64])).unwrap()
    }

    #[test]
    fn token_requests_pad_to_the_batch_longest_with_each_inputs_value() {
        let collate = tokens(7);
        let a = vec![host(&[1, 2, 3]), host(&[1, 1, 1])];
        let b = vec![host(&[4]), host(&[1])];
        assert_eq!(collate.key(&a).unwrap(), collate.key(&b).unwrap());
        let joined = collate.join(&[&a, &b]).unwrap();
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
    fn stacked_requests_join_in_order() {
        let a = vec![host(&[1, 2])];
        let b = vec![host(&[3, 4])];
        let joined = Collate::Stack.join(&[&a, &b]).unwrap();
        assert_eq!(joined[0].size(), vec![2, 2]);
        assert_eq!(
            Vec::<i64>::try_from(joined[0].view([-1])).unwrap(),
            vec![1, 2, 3, 4]
        );
        assert_ne!(
            Collate::Stack.key(&a).unwrap(),
            Collate::Stack.key(&[host(&[1, 2, 3])]).unwrap()
        );
    }

    #[test]
    fn token_inputs_of_the_wrong_form_are_refused() {
        let collate = tokens(0);
        let floats: Vec<_> = (0..2)
            .map(|_| {
                HostTensor::from_tensor(&Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu)))
                    .unwrap()
            })
            .collect();
        assert!(matches!(
            collate.key(&floats),
            Err(ForwardError::Shape { .. })
        ));
        assert!(matches!(
            collate.key(&[host(&[1, 2])]),
            Err(ForwardError::Shape { .. })
        ));
        let torn = HostTensor {
            data: vec![0; 3],
            ..host(&[1])
        };
        assert!(matches!(
            Collate::Stack.key(&[torn]),
            Err(ForwardError::Shape { .. })
        ));
    }

    #[test]
    fn batches_are_chosen_by_length_around_the_oldest() {
        // Four lengths, queued interleaved: the oldest (20 tokens) runs with the
        // others of 20; the 40s join (padding three rows costs less than a
        // forward of their own), a 60 or a 5 would pad too much.
        let lengths = [20, 5, 40, 20, 5, 60, 40, 20];
        let queued: Vec<(i64, i64)> = lengths.iter().map(|&t| (t, 1)).collect();
        assert_eq!(choose_by_length(&queued, 32, 128), vec![0, 2, 3, 6, 7]);
        // Where slots cost more than forwards (a CPU), only the 20s.
        assert_eq!(choose_by_length(&queued, 32, 8), vec![0, 3, 7]);
        // A short text does not join long ones.
        assert_eq!(
            choose_by_length(&[(40, 1), (40, 1), (5, 1)], 32, 128),
            vec![0, 1]
        );
        // Where forwards cost more than slots (a GPU), close lengths fill a batch.
        let close: Vec<(i64, i64)> = (0..40).map(|i| (30 + i % 5, 1)).collect();
        let chosen = choose_by_length(&close, 32, 4096);
        assert_eq!(chosen.len(), 32);
        assert!(chosen.contains(&0));
        // A request of several rows counts its rows.
        assert_eq!(
            choose_by_length(&[(10, 30), (10, 3), (10, 2)], 32, 128),
            vec![0, 2]
        );
        // The oldest runs even alone.
        assert_eq!(choose_by_length(&[(100, 1), (5, 1)], 32, 128), vec![0]);
    }

    #[test]
    fn the_forward_cost_is_learned_from_the_forwards() {
        let mut cost = ForwardCost::default();
        assert_eq!(cost.fixed_slots(), ForwardCost::PRIOR_SLOTS);
        // 15 ms a forward and 0.2 ms a slot: 75 slots.
        for i in 0..40 {
            let slots = 100 + 50 * (i % 8);
            cost.observe(slots, 0.015 + 0.0002 * slots as f64);
        }
        assert_eq!(cost.fixed_slots(), 75);
        // One size only: nothing to fit a line to, the prior stays.
        let mut same = ForwardCost::default();
        for _ in 0..40 {
            same.observe(256, 0.05);
        }
        assert_eq!(same.fixed_slots(), ForwardCost::PRIOR_SLOTS);
    }
}
