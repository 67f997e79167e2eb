//! Choosing the next token of one sequence from its logits, as `transformers`'
//! `generate` does: greedy (the first most likely token), or sampling after its
//! warpers in its order (temperature, top-k, top-p). Each sequence has its own
//! random stream, seeded by its request, so a seed draws the same numbers
//! whatever else runs in the batch.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this sample greedily.
const MIN_TEMPERATURE: f32 = 1e-5;

/// How one sequence chooses its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Sample; otherwise take the most likely token.
    pub do_sample: bool,
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens up to this probability mass; 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// The most likely token at each step.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether the token is the argmax (no randomness at all). A temperature
    /// this close to 0 is greedy too: dividing by it would overflow the logits.
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature < MIN_TEMPERATURE
    }
}

/// One sequence's chooser.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    /// Samples a token from `logits` (one row, the whole vocabulary).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature.max(f32::MIN_POSITIVE);
        let scaled: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
        let mut candidates: Vec<u32> = (0..scaled.len() as u32)
            .filter(|&i| !scaled[i as usize].is_nan())
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let by_logit_desc = |a: &u32, b: &u32| scaled[*b as usize].total_cmp(&scaled[*a as usize]);
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            // Every token tied with the k-th stays, as transformers removes only
            // those below it.
            let kth = scaled[candidates[k - 1] as usize];
            candidates.retain(|&i| scaled[i as usize] >= kth);
        }
        let max = candidates
            .iter()
            .map(|&i| scaled[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: u32| ((scaled[i as usize] - max) as f64).exp();
        let total: f64 = candidates.iter().map(|&i| weight(i)).sum();
        if self.params.top_p < 1.0 {
            candidates = nucleus(
                candidates,
                self.params.top_p as f64,
                total,
                &weight,
                &by_logit_desc,
            );
        }
        let kept: f64 = candidates.iter().map(|&i| weight(i)).sum();
        let mut target = self.uniform() * kept;
        for &i in &candidates {
            target -= weight(i);
            if target < 0.0 {
                return i;
            }
        }
        *candidates.last().expect("at least one candidate")
    }

    /// A uniform number in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The most likely candidates whose probability reaches `top_p` (at least one),
/// found without sorting the whole vocabulary: the top few are sorted, then more
/// while they do not reach it.
fn nucleus(
    mut candidates: Vec<u32>,
    top_p: f64,
    total: f64,
    weight: &dyn Fn(u32) -> f64,
    by_logit_desc: &dyn Fn(&u32, &u32) -> std::cmp::Ordering,
) -> Vec<u32> {
    let mut head = 64.min(candidates.len());
    loop {
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, by_logit_desc);
        }
        candidates[..head].sort_by(by_logit_desc);
        let mut mass = 0.0;
        for (n, &i) in candidates[..head].iter().enumerate() {
            mass += weight(i) / total;
            // Kept while the mass before it is under top_p (transformers removes a
            // token when the mass at or below it, ascending, is at most 1 - top_p).
            if mass >= top_p {
                candidates.truncate(n + 1);
                return candidates;
            }
        }
        if head == candidates.len() {
            return candidates;
        }
        head = (head * 4).min(candidates.len());
    }
}

/// A seed for a request that brings none.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            temperature: 1.0,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn a_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0, 0.9, seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_likely_tokens() {
        // Token 3 has most of the mass, token 1 the next, the rest almost none.
        let mut logits = vec![-10.0f32; 1000];
        logits[3] = 5.0;
        logits[1] = 4.0;
        let mut only_top = Sampler::new(params(1, 1.0, 1));
        assert!((0..100).all(|_| only_top.sample(&logits) == 3));
        // Tokens tied with the k-th are kept, as transformers keeps them.
        let mut tied = vec![-10.0f32; 100];
        tied[7] = 2.0;
        tied[9] = 2.0;
        let mut top_one = Sampler::new(params(1, 1.0, 3));
        let drawn: std::collections::HashSet<u32> =
            (0..200).map(|_| top_one.sample(&tied)).collect();
        assert_eq!(drawn, [7, 9].into_iter().collect());
        let mut two = Sampler::new(params(0, 0.9, 1));
        let drawn: Vec<u32> = (0..400).map(|_| two.sample(&logits)).collect();
        assert!(drawn.iter().all(|&t| t == 3 || t == 1), "{drawn:?}");
        assert!(drawn.contains(&1) && drawn.contains(&3));
        // The nucleus widens past its first 64 candidates when it has to.
        let flat = vec![0.0f32; 1000];
        let mut wide = Sampler::new(params(0, 0.95, 2));
        let distinct: std::collections::HashSet<u32> =
            (0..3000).map(|_| wide.sample(&flat)).collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
    }
}
