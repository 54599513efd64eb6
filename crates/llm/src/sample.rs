//! A seeded, deterministic token sampler: greedy, or temperature with top-k and top-p.
//!
//! The same configuration, seed and logits give the same tokens on every machine: the
//! softmax runs in f64 with our own `exp` (basic IEEE operations only), candidates are
//! ordered by logit with ties broken by token id, and draw `n` uses the counter-based
//! random number `splitmix64(seed + (n+1)·γ)`, so a sampler's whole state is its
//! configuration and step count.

use alloc::vec::Vec;
use core::fmt;

use ferry_abi::accel::math::{exp, exp_lanes};

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to `top_p` (1: all; 0: the
    /// most likely one alone).
    pub top_p: f32,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> SamplerConfig {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A configuration value out of range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerError {
    /// The temperature is negative, infinite or NaN.
    Temperature(f32),
    /// `top_p` is not in [0, 1].
    TopP(f32),
}

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SamplerError::Temperature(t) => {
                write!(f, "temperature {t} is not a finite number >= 0")
            }
            SamplerError::TopP(p) => write!(f, "top_p {p} is not in [0, 1]"),
        }
    }
}

/// splitmix64's increment (the golden ratio).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Picks tokens from logits. Its whole state is its configuration and draw count: the
/// memory a draw works in is the caller's ([`DrawScratch`]).
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    step: u64,
}

/// The memory draws work in: two words per token of the vocabulary (768 KiB for
/// 49,152), rewritten by every draw. Sequences decoded together draw one after another,
/// so one scratch serves them all, and a step rewrites one draw's pages, not one set per
/// sequence: in a VM under migration, each page rewritten after a round's dirty log was
/// taken costs a write fault, and is one more page for the pause to send.
#[derive(Clone, Debug, Default)]
pub struct DrawScratch {
    /// Candidates, each its logit's place in the order (inverted, so the most likely
    /// sorts first) above its token id.
    cand: Vec<u64>,
    /// Scratch of [`sort_keys`], then the candidates' probabilities (unnormalised, as
    /// bits) in their order.
    sorted: Vec<u64>,
}

impl Sampler {
    /// A sampler at step 0, if `config` is valid.
    pub fn new(config: SamplerConfig) -> Result<Sampler, SamplerError> {
        if !(config.temperature.is_finite() && config.temperature >= 0.0) {
            return Err(SamplerError::Temperature(config.temperature));
        }
        if !(0.0..=1.0).contains(&config.top_p) {
            return Err(SamplerError::TopP(config.top_p));
        }
        Ok(Sampler { config, step: 0 })
    }

    /// Its configuration.
    pub fn config(&self) -> SamplerConfig {
        self.config
    }

    /// Random draws made so far (greedy picks draw nothing).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets the draw counter (to resume a sequence).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The next token for `logits` (one per vocabulary entry), drawn in `scratch`. NaN
    /// logits never win; an empty slice gives 0.
    pub fn sample(&mut self, logits: &[f32], scratch: &mut DrawScratch) -> u32 {
        let Some(best) = argmax(logits) else {
            return 0;
        };
        let max = logits.get(best as usize).copied().unwrap_or(0.0);
        // Greedy, and the cases a softmax cannot weigh: +inf or all -inf.
        if self.config.temperature <= 0.0 || !max.is_finite() {
            return best;
        }
        // Most likely first, then lowest id: a total order, so the result does not
        // depend on the sort algorithm. It is one integer per candidate, which sorts
        // about three times faster than (id, logit) pairs compared field by field.
        let cand = &mut scratch.cand;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| u64::from(!total_order(l)) << 32 | i as u64),
        );
        let k = self.config.top_k;
        let selected = k > 0 && k < cand.len();
        if selected {
            cand.select_nth_unstable(k - 1);
            cand.truncate(k);
        }
        sort_keys(cand, &mut scratch.sorted, !selected);
        let cand = &*cand;
        let id = |key: u64| key as u32;

        let t = f64::from(self.config.temperature);
        let top = f64::from(max);
        let weight = |key: u64| (f64::from(logits[id(key) as usize]) - top) / t;
        // The sort is done with its scratch: the probabilities go there, as bits.
        let probs = &mut scratch.sorted;
        probs.clear();
        let eights = cand.chunks_exact(8);
        let rest = eights.remainder();
        probs.extend(
            eights
                .flat_map(|k| exp_lanes(core::array::from_fn::<_, 8, _>(|i| weight(k[i]))))
                .chain(rest.iter().map(|&key| exp(weight(key))))
                .map(f64::to_bits),
        );
        let probs = || probs.iter().map(|&p| f64::from_bits(p));
        let total: f64 = probs().sum();
        // Nucleus: the shortest prefix whose probability reaches top_p.
        let mut keep = cand.len();
        if self.config.top_p < 1.0 {
            let target = f64::from(self.config.top_p) * total;
            let mut acc = 0.0;
            for (i, p) in probs().enumerate() {
                acc += p;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
        }
        // All of them: their sum, in the same order, is the total.
        let mass: f64 = if keep == cand.len() {
            total
        } else {
            probs().take(keep).sum()
        };
        self.step = self.step.wrapping_add(1);
        let r = mix(self.config.seed.wrapping_add(self.step.wrapping_mul(GAMMA)));
        let u = (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let target = u * mass;
        let mut acc = 0.0;
        for (&key, p) in cand[..keep].iter().zip(probs()) {
            acc += p;
            if target < acc {
                return id(key);
            }
        }
        // Rounding left the target at the very end: the last kept candidate.
        cand[..keep].last().map_or(best, |&key| id(key))
    }
}

/// Sorts `keys` ascending, as `sort_unstable` does (they differ, so there is one order):
/// a byte at a time from the least significant, each pass stable, skipping a byte all
/// keys share. A few linear passes, where comparisons took half of a draw over a
/// vocabulary of 49,152. Keys already ascending in their low 32 bits (the candidates in
/// token order, before any top-k selection) need only the passes of the high 32 bits:
/// each pass is stable, so keys with equal high bits keep that order.
fn sort_keys(keys: &mut Vec<u64>, scratch: &mut Vec<u64>, low_ascending: bool) {
    let n = keys.len();
    if n <= 256 {
        keys.sort_unstable();
        return;
    }
    let first = if low_ascending { 4 } else { 0 };
    let mut counts = [[0usize; 256]; 8];
    for &k in keys.iter() {
        for (byte, count) in counts.iter_mut().enumerate().skip(first) {
            count[(k >> (8 * byte)) as usize & 0xff] += 1;
        }
    }
    scratch.clear();
    scratch.resize(n, 0);
    for (byte, count) in counts.iter().enumerate().skip(first) {
        if count.contains(&n) {
            continue;
        }
        // Each bucket filled from both ends: the first half of the keys forwards from its
        // start, the second half backwards from its end. Two chains of counter updates
        // instead of one, which a run of keys with the same digit made wait on each other.
        let (mut front, mut back) = ([0usize; 256], [0usize; 256]);
        let mut start = 0;
        for ((front, back), &c) in front.iter_mut().zip(&mut back).zip(count) {
            *front = start;
            start += c;
            *back = start;
        }
        let digit = |k: u64| (k >> (8 * byte)) as usize & 0xff;
        let (first_half, second_half) = keys.split_at(n / 2);
        for (&a, &b) in first_half.iter().zip(second_half.iter().rev()) {
            let (da, db) = (digit(a), digit(b));
            scratch[front[da]] = a;
            front[da] += 1;
            back[db] -= 1;
            scratch[back[db]] = b;
        }
        if n % 2 == 1 {
            // The middle key, between the halves: the one place left in its bucket.
            let m = keys[n / 2];
            scratch[front[digit(m)]] = m;
        }
        core::mem::swap(keys, scratch);
    }
}

/// `x`'s place in [`f32::total_cmp`]'s order, as an unsigned integer: negative numbers
/// (sign bit set) below positive ones, the more negative the lower.
fn total_order(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// The index of the first maximum of `logits`, ignoring NaN (NaN-only: 0).
fn argmax(logits: &[f32]) -> Option<u32> {
    if logits.is_empty() {
        return None;
    }
    let mut best = 0usize;
    let mut max = f32::NAN;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && (max.is_nan() || l > max) {
            best = i;
            max = l;
        }
    }
    Some(best as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_as_sort_unstable_sorts_them() {
        let mut z = 99u64;
        let mut next = || {
            z = z.wrapping_add(GAMMA);
            mix(z)
        };
        let (mut keys, mut scratch) = (Vec::new(), Vec::new());
        for n in [0, 1, 2, 255, 256, 257, 1000, 49_152] {
            // Logits of few distinct values (many ties) or of any value above ascending
            // ids, as the sampler makes them, sorted by their high bytes alone or by all;
            // then keys differing in every byte, by all.
            for (spread, low_ascending) in [
                (3u64, true),
                (3, false),
                (u64::from(u32::MAX), true),
                (u64::MAX, false),
            ] {
                let mut want: Vec<u64> = (0..n as u64)
                    .map(|id| (next() % spread) << 32 | id)
                    .collect();
                if spread == u64::MAX {
                    want.iter_mut().for_each(|k| *k = next());
                }
                keys.clone_from(&want);
                want.sort_unstable();
                sort_keys(&mut keys, &mut scratch, low_ascending);
                assert_eq!(keys, want, "{n} keys, spread {spread}, {low_ascending}");
            }
        }
    }

    #[test]
    fn mix_is_splitmix64() {
        // The first outputs of splitmix64 seeded with 1234567 (reference values).
        let seed = 1234567u64;
        assert_eq!(mix(seed.wrapping_add(GAMMA)), 6457827717110365317);
        assert_eq!(
            mix(seed.wrapping_add(GAMMA.wrapping_mul(2))),
            3203168211198807973
        );
    }

    #[test]
    fn total_order_is_total_cmp() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(
                    total_order(a).cmp(&total_order(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn argmax_first_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN]), Some(1));
        assert_eq!(argmax(&[f32::NAN]), Some(0));
        assert_eq!(argmax(&[]), None);
    }
}
