//! The GGML block formats ([`DType`]) on the cpu backend: dequantization, and the dot
//! product of a quantized row with an f32 vector that QMATMUL is made of.
//!
//! # Arithmetic and determinism
//!
//! For the block formats the input row is first [`prepare`]d: rounded to 16-bit integers
//! with one scale per 32 elements. A block's products of integer weights and integer
//! inputs are then summed exactly in eight i32 lanes (lane `l` takes elements `2l`,
//! `2l+1`, `16+2l` and `17+2l`), converted to f32, and added to eight f32 accumulators as
//! `scale · lanes` (plus `min · sum(x)` for the formats with a minimum, with the sums of
//! the f32 inputs); the lanes are added in a fixed tree at the end. f32 and f16 weights
//! take the f32 inputs, eight lanes of `w·x`. Every float step is a separate IEEE
//! multiply or add (Rust never fuses them) in a fixed order, and the integer sums are
//! exact, so the result depends only on the data: not on the thread count, and not on
//! whether the AVX2 code runs. A row's dot product is computed whole by one thread. The
//! formats' scales are half floats, converted exactly.
//!
//! A QMATMUL task checks whether its kernel is to stop as it goes ([`Ticker`]): between
//! inputs it prepares, between rows, and within rows longer than [`WIDE_ROW`], which it
//! computes with the portable code in parts (the same bits, as said above).

use super::{Stopped, Ticker};
use crate::kernel::DType;

/// Lanes of the dot products.
const LANES: usize = 8;

type Lanes = [f32; LANES];

/// An IEEE half float's value, exactly (every f16 is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man · 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The sum of the lanes, in a fixed order.
#[inline(always)]
fn lane_sum(a: Lanes) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `acc[l] += scale · s[l]`.
#[inline(always)]
fn add_scaled(acc: &mut Lanes, scale: f32, s: &Lanes) {
    for l in 0..LANES {
        acc[l] += scale * s[l];
    }
}

/// `acc[l] += scale · s[l] + offset · t[l]`.
#[inline(always)]
fn add_scaled_offset(acc: &mut Lanes, scale: f32, s: &Lanes, offset: f32, t: &Lanes) {
    for l in 0..LANES {
        acc[l] += scale * s[l] + offset * t[l];
    }
}

/// `s[l] += q(l)·x[l]` for one group of eight elements.
#[inline(always)]
fn group_q(s: &mut Lanes, x: &[f32], q: impl Fn(usize) -> f32) {
    let x: &[f32; LANES] = x[..LANES].try_into().expect("eight elements");
    for l in 0..LANES {
        s[l] += q(l) * x[l];
    }
}

/// Elements of the input that share one 16-bit scale.
pub const INPUT_BLOCK: usize = 32;
/// Largest magnitude of a 16-bit input element.
const INPUT_MAX: f32 = 32767.0;

/// The 16-bit inputs of a prepared row (for tests).
#[cfg(test)]
pub fn input_q<'i>(inp: &'i Input<'_>) -> &'i [i16] {
    &inp.q
}

/// The bits of everything a prepared row holds (for tests): its lane sums, 16-bit
/// inputs and scales.
#[cfg(test)]
pub fn input_bits(inp: &Input<'_>) -> (Vec<u32>, Vec<i16>, Vec<u32>) {
    let sums = inp.sums.iter().flatten().map(|v| v.to_bits()).collect();
    (
        sums,
        inp.q.clone(),
        inp.d.iter().map(|v| v.to_bits()).collect(),
    )
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22` (and NaN for
/// NaN): adding and subtracting 1.5·2^23 leaves no fraction bits, and the default IEEE
/// rounding mode rounds to even. (`f32::round_ties_even` calls libm's `rintf` where the
/// target lacks SSE4.1: a call per element.)
#[inline(always)]
fn round_even(v: f32) -> f32 {
    (v + ROUNDING) - ROUNDING
}

/// 1.5·2^23, which [`round_even`] adds and subtracts.
const ROUNDING: f32 = 12_582_912.0;

/// An input row ready for the dot products: as it is (for f32 and f16 weights), and for
/// the block formats in 16-bit integers with one f32 scale per [`INPUT_BLOCK`] elements
/// (`x ≈ d·q`, `d = max|x| / 32767`), plus each block's lane sums of the f32 values
/// (lane `l` of block `b`: `((x[32b+l] + x[32b+8+l]) + x[32b+16+l]) + x[32b+24+l]`),
/// which the formats with a minimum multiply by it. Made once per row of `x`: every
/// weight row shares it.
///
/// The 16-bit inputs make a block's products exact integers, summed exactly, so a block
/// costs a few integer instructions where converting its weights to floats cost many;
/// their rounding (at most half a step of `max|x| / 32767` per element) moves SmolLM2's
/// logits by about 1e-3, where 8-bit inputs (llama.cpp's choice) move them by 0.5 and
/// change its answers.
pub struct Input<'a> {
    x: &'a [f32],
    sums: Vec<Lanes>,
    q: Vec<i16>,
    d: Vec<f32>,
}

/// Prepares `x` (a whole number of [`INPUT_BLOCK`]s for the block formats).
pub fn prepare(x: &[f32]) -> Input<'_> {
    prepare_checked(x, &mut Ticker::unchecked())
        .unwrap_or_else(|Stopped| unreachable!("an unchecked ticker never stops"))
}

/// [`prepare`], counting its steps on `tick`.
pub fn prepare_checked<'a>(x: &'a [f32], tick: &mut Ticker<'_>) -> Result<Input<'a>, Stopped> {
    prepare_with(x, tick, has_avx2())
}

/// [`prepare_checked`], by the AVX2 code if `avx2` (the same bits: tests compare them).
pub(super) fn prepare_with<'a>(
    x: &'a [f32],
    tick: &mut Ticker<'_>,
    avx2: bool,
) -> Result<Input<'a>, Stopped> {
    let blocks = x.len() / INPUT_BLOCK;
    let mut sums = Vec::with_capacity(blocks);
    let mut q = vec![0i16; blocks * INPUT_BLOCK];
    let mut d = Vec::with_capacity(blocks);
    let (q_blocks, _) = q.as_chunks_mut::<INPUT_BLOCK>();
    let (x_blocks, _) = x.as_chunks::<INPUT_BLOCK>();
    for (b, q) in x_blocks.iter().zip(q_blocks) {
        #[cfg(target_arch = "x86_64")]
        let (t, scale) = if avx2 {
            // SAFETY: the caller checked that this CPU has AVX2 and F16C.
            unsafe { avx2::prepare_block(b, q) }
        } else {
            prepare_block(b, q)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (t, scale) = {
            let _ = avx2;
            prepare_block(b, q)
        };
        sums.push(t);
        d.push(scale);
        tick.done(INPUT_BLOCK)?;
    }
    Ok(Input { x, sums, q, d })
}

/// One block of [`prepare`]: its lane sums and scale, its 16-bit inputs into `q`.
#[inline(always)]
fn prepare_block(b: &[f32; INPUT_BLOCK], q: &mut [i16; INPUT_BLOCK]) -> (Lanes, f32) {
    let mut t = [0.0; LANES];
    for g in 0..4 {
        for l in 0..LANES {
            t[l] += b[8 * g + l];
        }
    }
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { INPUT_MAX / amax } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(b) {
        *q = round_even(v * inv).clamp(-INPUT_MAX, INPUT_MAX) as i16;
    }
    (t, amax / INPUT_MAX)
}

/// The lanes of 16 weights `w(j)` times the 16-bit inputs `q`: lane `l` holds
/// `w(2l)·q[2l] + w(2l+1)·q[2l+1]`, exact.
#[inline(always)]
fn pairs(q: &[i16], w: impl Fn(usize) -> i32) -> [i32; LANES] {
    let q: &[i16; 16] = q[..16].try_into().expect("sixteen inputs");
    let mut out = [0; LANES];
    for l in 0..LANES {
        out[l] = w(2 * l) * i32::from(q[2 * l]) + w(2 * l + 1) * i32::from(q[2 * l + 1]);
    }
    out
}

/// A block's exact integer lanes (two halves of 16) as f32.
#[inline(always)]
fn to_f32(lo: [i32; LANES], hi: [i32; LANES]) -> Lanes {
    let mut out = [0.0; LANES];
    for l in 0..LANES {
        out[l] = (lo[l] + hi[l]) as f32;
    }
    out
}

/// Weight `i` of a row of f32 (`width` 4) or f16 (`width` 2) weights.
#[inline(always)]
fn float_weight(row: &[u8], width: usize, i: usize) -> f32 {
    if width == 4 {
        let at = 4 * i;
        f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]])
    } else {
        half(row, 2 * i)
    }
}

/// The elements of `x` after its whole groups of eight times their weights, added in
/// order (added after the lanes).
#[inline(always)]
fn float_tail(row: &[u8], width: usize, x: &[f32]) -> f32 {
    let done = x.len() / LANES * LANES;
    let mut tail = 0.0;
    for (i, &xv) in x.iter().enumerate().skip(done) {
        tail += float_weight(row, width, i) * xv;
    }
    tail
}

/// A row of f32 (`width` 4) or f16 (`width` 2) weights times the f32 inputs.
#[inline(always)]
fn dot_float(row: &[u8], width: usize, inp: &Input<'_>) -> f32 {
    let x = inp.x;
    let mut acc = [0.0; LANES];
    float_lanes(&mut acc, row, width, x);
    lane_sum(acc) + float_tail(row, width, x)
}

/// Adds the products of the whole groups of eight of `row`'s f32 (`width` 4) or f16
/// (`width` 2) weights and the inputs `x` to the lanes, group after group.
#[inline(always)]
fn float_lanes(acc: &mut Lanes, row: &[u8], width: usize, x: &[f32]) {
    for (w, x) in row.chunks_exact(width * LANES).zip(x.chunks_exact(LANES)) {
        group_q(acc, x, |l| float_weight(w, width, l));
    }
}

/// The 16-bit inputs of block `b`, its scale and lane sums.
#[inline(always)]
fn block_input<'i>(inp: &'i Input<'_>, b: usize) -> (&'i [i16], f32, &'i Lanes) {
    (
        &inp.q[INPUT_BLOCK * b..][..INPUT_BLOCK],
        inp.d[b],
        &inp.sums[b],
    )
}

/// The dot product of the row `row` of a block format with `inp`: `lanes(acc, row,
/// inp, 0)` adds its terms to the lanes (see [`q8_0_lanes`]).
#[inline(always)]
fn dot_blocks(
    row: &[u8],
    inp: &Input<'_>,
    lanes: impl Fn(&mut Lanes, &[u8], &Input<'_>, usize),
) -> f32 {
    let mut acc = [0.0; LANES];
    lanes(&mut acc, row, inp, 0);
    lane_sum(acc)
}

/// Adds the terms of `blocks`, 32-element blocks of `block_bytes` each, to the lanes,
/// block after block: `add(acc, block, inputs)` adds one block's. The first of them is
/// block `first` of its row, which says which inputs it takes.
#[inline(always)]
fn add_blocks(
    acc: &mut Lanes,
    blocks: &[u8],
    block_bytes: usize,
    (inp, first): (&Input<'_>, usize),
    add: impl Fn(&mut Lanes, &[u8], (&[i16], f32, &Lanes)),
) {
    for (i, b) in blocks.chunks_exact(block_bytes).enumerate() {
        add(acc, b, block_input(inp, first + i));
    }
}

/// Adds the terms of Q8_0 `blocks`, from block `first` of their row, to the lanes.
#[inline(always)]
fn q8_0_lanes(acc: &mut Lanes, blocks: &[u8], inp: &Input<'_>, first: usize) {
    add_blocks(acc, blocks, 34, (inp, first), |acc, b, (q, dx, _)| {
        let w = |j: usize| i32::from(b[2 + j] as i8);
        let f = to_f32(pairs(q, w), pairs(&q[16..], |j| w(16 + j)));
        add_scaled(acc, half(b, 0) * dx, &f);
    });
}

/// Adds the terms of Q4_0 `blocks`, from block `first` of their row, to the lanes.
#[inline(always)]
fn q4_0_lanes(acc: &mut Lanes, blocks: &[u8], inp: &Input<'_>, first: usize) {
    add_blocks(acc, blocks, 18, (inp, first), |acc, b, (q, dx, _)| {
        let lo = pairs(q, |j| i32::from(b[2 + j] & 0xf) - 8);
        let hi = pairs(&q[16..], |j| i32::from(b[2 + j] >> 4) - 8);
        add_scaled(acc, half(b, 0) * dx, &to_f32(lo, hi));
    });
}

/// Adds the terms of Q4_1 `blocks`, from block `first` of their row, to the lanes.
#[inline(always)]
fn q4_1_lanes(acc: &mut Lanes, blocks: &[u8], inp: &Input<'_>, first: usize) {
    add_blocks(acc, blocks, 20, (inp, first), |acc, b, (q, dx, t)| {
        let lo = pairs(q, |j| i32::from(b[4 + j] & 0xf));
        let hi = pairs(&q[16..], |j| i32::from(b[4 + j] >> 4));
        add_scaled_offset(acc, half(b, 0) * dx, &to_f32(lo, hi), half(b, 2), t);
    });
}

#[inline(always)]
fn dot_q8_0(row: &[u8], inp: &Input<'_>) -> f32 {
    dot_blocks(row, inp, q8_0_lanes)
}

#[inline(always)]
fn dot_q4_0(row: &[u8], inp: &Input<'_>) -> f32 {
    dot_blocks(row, inp, q4_0_lanes)
}

#[inline(always)]
fn dot_q4_1(row: &[u8], inp: &Input<'_>) -> f32 {
    dot_blocks(row, inp, q4_1_lanes)
}

/// Scale and minimum `j` (0..8) of a Q4_K super-block's 12 packed bytes (6 bits each).
#[inline(always)]
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn dot_q4k(row: &[u8], inp: &Input<'_>) -> f32 {
    dot_blocks(row, inp, q4k_lanes)
}

/// Adds the terms of Q4_K `blocks` (super-blocks), from super-block `first` of their row,
/// to the lanes.
#[inline(always)]
fn q4k_lanes(acc: &mut Lanes, blocks: &[u8], inp: &Input<'_>, first: usize) {
    for (sb, b) in blocks.chunks_exact(144).enumerate() {
        let sb = first + sb;
        let (d, dmin) = (half(b, 0), half(b, 2));
        let scales = &b[4..16];
        for j in 0..4 {
            let bytes = &b[16 + 32 * j..16 + 32 * j + 32];
            for (sub, shift) in [(0, 0), (1, 4)] {
                let (q, dx, t) = block_input(inp, 8 * sb + 2 * j + sub);
                let (sc, mn) = q4k_scale_min(2 * j + sub, scales);
                let w = |e: usize| i32::from((bytes[e] >> shift) & 0xf);
                let f = to_f32(pairs(q, w), pairs(&q[16..], |e| w(16 + e)));
                let scale = d * f32::from(sc) * dx;
                add_scaled_offset(acc, scale, &f, -(dmin * f32::from(mn)), t);
            }
        }
    }
}

/// Element `l` (0..32) of quarter `quarter` (0..4) of a Q6_K half super-block, minus 32.
#[inline(always)]
fn q6k_value(ql: &[u8], qh: &[u8], quarter: usize, l: usize) -> i32 {
    let low = match quarter {
        0 => ql[l] & 0xf,
        1 => ql[l + 32] & 0xf,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    let high = (qh[l] >> (2 * quarter)) & 3;
    i32::from(low | (high << 4)) - 32
}

/// Half `h` (0..2) of a Q6_K super-block: its low bits, high bits and scales.
#[inline(always)]
fn q6k_half(b: &[u8], h: usize) -> (&[u8], &[u8], &[u8]) {
    (
        &b[64 * h..][..64],
        &b[128 + 32 * h..][..32],
        &b[192 + 8 * h..][..8],
    )
}

/// One 32-element quarter of a Q6_K super-block: its scale `d`, its half's low bits,
/// high bits and scales, which quarter of the half (0..4), and its block of inputs.
struct Q6kQuarter<'r, 'i> {
    d: f32,
    ql: &'r [u8],
    qh: &'r [u8],
    sc: &'r [u8],
    quarter: usize,
    q: &'i [i16],
    dx: f32,
}

/// Calls `f` on each quarter of the Q6_K super-blocks `blocks`, in order; the first of
/// them is super-block `first` of its row, and `input(b)` gives block `b`'s inputs
/// ([`block_input`]).
#[inline(always)]
fn q6k_quarters<'r, 'i>(
    (blocks, first): (&'r [u8], usize),
    input: impl Fn(usize) -> (&'i [i16], f32, &'i Lanes),
    mut f: impl FnMut(Q6kQuarter<'r, 'i>),
) {
    for (sb, b) in blocks.chunks_exact(210).enumerate() {
        let sb = first + sb;
        let d = half(b, 208);
        for h in 0..2 {
            let (ql, qh, sc) = q6k_half(b, h);
            for quarter in 0..4 {
                let (q, dx, _) = input(8 * sb + 4 * h + quarter);
                f(Q6kQuarter {
                    d,
                    ql,
                    qh,
                    sc,
                    quarter,
                    q,
                    dx,
                });
            }
        }
    }
}

#[inline(always)]
fn dot_q6k(row: &[u8], inp: &Input<'_>) -> f32 {
    dot_blocks(row, inp, q6k_lanes)
}

/// Adds the terms of Q6_K `blocks` (super-blocks), from super-block `first` of their row,
/// to the lanes.
#[inline(always)]
fn q6k_lanes(acc: &mut Lanes, blocks: &[u8], inp: &Input<'_>, first: usize) {
    q6k_quarters(
        (blocks, first),
        |b| block_input(inp, b),
        |t| {
            // Two sub-blocks of 16 elements, each with its own scale.
            for half_q in 0..2 {
                let l0 = 16 * half_q;
                let lanes = pairs(&t.q[l0..], |e| q6k_value(t.ql, t.qh, t.quarter, l0 + e));
                let scale = t.d * f32::from(t.sc[half_q + 2 * t.quarter] as i8) * t.dx;
                add_scaled(acc, scale, &lanes.map(|v| v as f32));
            }
        },
    );
}

/// Every format with AVX2 intrinsics: the very operations of the portable code above
/// (exact integer lanes, then the same f32 multiplies and adds in the same order, never
/// fused), so the same bits, eight lanes at once with the pairs multiplied and added by
/// one instruction.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{
        float_tail, prefetch, q4k_scale_min, q6k_quarters, Input, Lanes, INPUT_BLOCK, INPUT_GROUP,
    };

    /// How far past the block being read the weights are prefetched: a task's rows are
    /// contiguous, so this reaches into the next rows, and the stream no longer waits on
    /// memory at each row (generation went from about 0.27 to 0.35 of the bandwidth
    /// bound). 4 KiB rather than 1: a decoded token's smaller products start cold, and
    /// took 13% less time for it (SmolLM2's gate and up 40 to 35 µs, k and v 8.7 to 7.5);
    /// 8 KiB gained nothing more.
    pub(super) const WEIGHTS_AHEAD: usize = 4096;

    /// The half float at `b[at..at + 2]` in all eight lanes (F16C converts exactly, as
    /// `f16_to_f32` does). Kept a vector: reduced to one float, the conversion compiles to
    /// an insert into a register the loop uses for something else, which chains every
    /// block to the one before it.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn half(b: &[u8], at: usize) -> __m256 {
        let h = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm256_cvtph_ps(_mm_set1_epi16(h as i16))
    }

    /// [`super::prepare_block`] by the same operations, eight lanes at a time: sums from
    /// zero (so a sum of negative zeros is a positive one, as there), the largest
    /// magnitude (a maximum, exact in any order; NaN passed over, as `f32::max` does),
    /// and NaN rounded to 0 (as `as i16` makes it).
    #[target_feature(enable = "avx2,f16c")]
    pub fn prepare_block(b: &[f32; INPUT_BLOCK], q: &mut [i16; INPUT_BLOCK]) -> (Lanes, f32) {
        let (b, _) = b.as_chunks::<8>();
        let v = [0, 1, 2, 3].map(|g| lanes_in(&b[g]));
        let mut t = _mm256_setzero_ps();
        for v in v {
            t = _mm256_add_ps(t, v);
        }
        let magnitude = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
        let mut amax = _mm256_setzero_ps();
        for v in v {
            // The second operand where either is NaN: the maximum so far.
            amax = _mm256_max_ps(_mm256_and_ps(v, magnitude), amax);
        }
        let amax = lanes_out(amax).into_iter().fold(0.0f32, f32::max);
        let inv = if amax > 0.0 {
            super::INPUT_MAX / amax
        } else {
            0.0
        };
        let (inv, magic) = (_mm256_set1_ps(inv), _mm256_set1_ps(super::ROUNDING));
        let (lo, hi) = (
            _mm256_set1_ps(-super::INPUT_MAX),
            _mm256_set1_ps(super::INPUT_MAX),
        );
        let ints = v.map(|v| {
            // `round_even(v · inv)`, NaN made 0, clamped.
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), magic), magic);
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        // Packed in 128-bit halves (a0-3 b0-3 a4-7 b4-7), then put in order.
        let pack = |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        let (first, second) = (pack(ints[0], ints[1]), pack(ints[2], ints[3]));
        let (q0, q1) = q.split_at_mut(16);
        // SAFETY: each half of `q` is sixteen writable i16; the stores have no alignment
        // requirement.
        unsafe {
            _mm256_storeu_si256(q0.as_mut_ptr().cast(), first);
            _mm256_storeu_si256(q1.as_mut_ptr().cast(), second);
        }
        (lanes_out(t), amax / super::INPUT_MAX)
    }

    /// [`super::lane_sum`] of the eight lanes, in registers: the same additions in the same
    /// order (`(l0 + l4) + (l2 + l6)`, then `(l1 + l5) + (l3 + l7)`, then their sum),
    /// without the trip through memory that took 6% of a product's time.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn lane_total(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
    }

    /// Sixteen bytes `b[at..at + 16]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn bytes16(b: &[u8], at: usize) -> __m128i {
        let b: &[u8; 16] = b[at..at + 16].try_into().expect("sixteen bytes");
        // SAFETY: `b` is sixteen readable bytes; the load has no alignment requirement.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    /// Sixteen 16-bit inputs `q[at..at + 16]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn inputs16(q: &[i16], at: usize) -> __m256i {
        let q: &[i16; 16] = q[at..at + 16].try_into().expect("sixteen inputs");
        // SAFETY: `q` is sixteen readable i16; the load has no alignment requirement.
        unsafe { _mm256_loadu_si256(q.as_ptr().cast()) }
    }

    /// Eight f32 `t[0..8]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn lanes_in(t: &Lanes) -> __m256 {
        // SAFETY: `t` is eight readable f32; the load has no alignment requirement.
        unsafe { _mm256_loadu_ps(t.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn lanes_out(v: __m256) -> Lanes {
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds eight f32; the store has no alignment requirement.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// One input's blocks for a row of a known number of blocks, each slice exactly that
    /// long: a block's reads then need no bounds checks of their own (the loop index is
    /// below the count). Three checks a block and input took as many instructions as the
    /// products of four inputs.
    pub(super) struct RowInputs<'i> {
        q: &'i [[i16; INPUT_BLOCK]],
        d: &'i [f32],
        sums: &'i [Lanes],
    }

    impl<'i> RowInputs<'i> {
        /// The first `blocks` blocks of `inp`.
        #[inline(always)]
        pub(super) fn new(inp: &'i Input<'_>, blocks: usize) -> Self {
            let (q, _) = inp.q.as_chunks::<INPUT_BLOCK>();
            Self {
                q: &q[..blocks],
                d: &inp.d[..blocks],
                sums: &inp.sums[..blocks],
            }
        }

        /// Block `i`'s 16-bit inputs, scale and lane sums (`block_input`).
        #[inline(always)]
        pub(super) fn block(&self, i: usize) -> (&'i [i16], f32, &'i Lanes) {
            (&self.q[i], self.d[i], &self.sums[i])
        }
    }

    /// A block's lanes: weights `w0` (elements 0..16) and `w1` (16..32), as i16, times
    /// the block's inputs, pairs summed, the two halves added, as f32 (`to_f32`).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn block(w0: __m256i, w1: __m256i, q: &[i16]) -> __m256 {
        let lo = _mm256_madd_epi16(w0, inputs16(q, 0));
        let hi = _mm256_madd_epi16(w1, inputs16(q, 16));
        _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi))
    }

    /// The low and high nibbles of 16 bytes, each widened to sixteen i16: the bytes are
    /// widened once, then masked and shifted (three instructions where widening each
    /// nibble takes five: a block's dot product is bound by its instruction count).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn nibbles(bytes: __m128i) -> (__m256i, __m256i) {
        let wide = _mm256_cvtepu8_epi16(bytes);
        (low_nibbles(wide), high_nibbles(wide))
    }

    /// The low nibble of each of sixteen widened bytes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn low_nibbles(wide: __m256i) -> __m256i {
        _mm256_and_si256(wide, _mm256_set1_epi16(0x0f))
    }

    /// The high nibble of each of sixteen widened bytes (their upper bytes are zero).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn high_nibbles(wide: __m256i) -> __m256i {
        let high: __m256i;
        // One 16-bit shift, in assembly: written as `_mm256_srli_epi16`, LLVM sees that
        // the upper bytes are zero and moves the shift before the widening, which then
        // takes two widenings and two masks again.
        // SAFETY: AVX2 (this function's target feature) has VPSRLW on ymm registers; it
        // reads and writes registers only.
        unsafe {
            core::arch::asm!(
                "vpsrlw {high}, {wide}, 4",
                high = lateout(ymm_reg) high,
                wide = in(ymm_reg) wide,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        high
    }

    /// `a·b` in every lane (a scale made of factors, as the portable code multiplies them).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn times(a: __m256, b: f32) -> __m256 {
        _mm256_mul_ps(a, _mm256_set1_ps(b))
    }

    /// `acc + scale·f` (`add_scaled`).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scaled(acc: __m256, scale: __m256, f: __m256) -> __m256 {
        _mm256_add_ps(acc, _mm256_mul_ps(scale, f))
    }

    /// `acc + (scale·f + offset·t)` (`add_scaled_offset`).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scaled_offset(acc: __m256, scale: __m256, f: __m256, offset: __m256, t: &Lanes) -> __m256 {
        let s = _mm256_mul_ps(scale, f);
        let o = _mm256_mul_ps(offset, lanes_in(t));
        _mm256_add_ps(acc, _mm256_add_ps(s, o))
    }

    /// A row of f32 (`width` 4) or f16 (`width` 2) weights times the f32 inputs, eight
    /// weights `load`ed at a time (`dot_float`).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn floats(row: &[u8], width: usize, inp: &Input<'_>, load: impl Fn(&[u8]) -> __m256) -> f32 {
        let x = inp.x;
        let mut acc = _mm256_setzero_ps();
        for (w, xs) in row.chunks_exact(width * 8).zip(x.chunks_exact(8)) {
            let xs: &Lanes = xs.try_into().expect("eight inputs");
            acc = _mm256_add_ps(acc, _mm256_mul_ps(load(w), lanes_in(xs)));
        }
        lane_total(acc) + float_tail(row, width, x)
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_f32(row: &[u8], inp: &Input<'_>) -> f32 {
        floats(row, 4, inp, |w| {
            let w: &[u8; 32] = w.try_into().expect("eight f32");
            // SAFETY: `w` is 32 readable bytes; the load has no alignment requirement.
            unsafe { _mm256_loadu_ps(w.as_ptr().cast()) }
        })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_f16(row: &[u8], inp: &Input<'_>) -> f32 {
        floats(row, 2, inp, |w| _mm256_cvtph_ps(bytes16(w, 0)))
    }

    /// The dot product of a row of 32-element blocks of `block_bytes` each with `inp`:
    /// `add(acc, block, inputs)` is the lanes with one block's terms added.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn dot_blocks(
        row: &[u8],
        block_bytes: usize,
        inp: &Input<'_>,
        add: impl Fn(__m256, &[u8], (&[i16], f32, &Lanes)) -> __m256,
    ) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let inputs = RowInputs::new(inp, row.len() / block_bytes);
        for (i, b) in row.chunks_exact(block_bytes).enumerate() {
            prefetch(b.as_ptr().wrapping_add(WEIGHTS_AHEAD));
            acc = add(acc, b, inputs.block(i));
        }
        lane_total(acc)
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q8_0(row: &[u8], inp: &Input<'_>) -> f32 {
        dot_blocks(row, 34, inp, |acc, b, (q, dx, _)| {
            let w0 = _mm256_cvtepi8_epi16(bytes16(b, 2));
            let w1 = _mm256_cvtepi8_epi16(bytes16(b, 18));
            scaled(acc, times(half(b, 0), dx), block(w0, w1, q))
        })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_0(row: &[u8], inp: &Input<'_>) -> f32 {
        let eight = _mm256_set1_epi16(8);
        dot_blocks(row, 18, inp, |acc, b, (q, dx, _)| {
            let (w0, w1) = nibbles(bytes16(b, 2));
            let (w0, w1) = (_mm256_sub_epi16(w0, eight), _mm256_sub_epi16(w1, eight));
            scaled(acc, times(half(b, 0), dx), block(w0, w1, q))
        })
    }

    /// The two half floats at `b[0..4]` (a block's scale and minimum), each in all eight
    /// lanes: converted together, exactly, as [`half`] converts one.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn half_pair(b: &[u8]) -> (__m256, __m256) {
        let pair = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let both = _mm_cvtph_ps(_mm_cvtsi32_si128(pair as i32));
        (
            _mm256_broadcastss_ps(both),
            _mm256_broadcastss_ps(_mm_movehdup_ps(both)),
        )
    }

    /// Its own loop rather than [`dot_blocks`]: through that one's closure the block's
    /// unpacking is not inlined (measured ten times slower).
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_1(row: &[u8], inp: &Input<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let blocks = row.chunks_exact(20).zip(inp.q.chunks_exact(INPUT_BLOCK));
        for ((b, q), (&dx, t)) in blocks.zip(inp.d.iter().zip(&inp.sums)) {
            prefetch(b.as_ptr().wrapping_add(WEIGHTS_AHEAD));
            let (w0, w1) = nibbles(bytes16(b, 4));
            let (d, m) = half_pair(b);
            acc = scaled_offset(acc, times(d, dx), block(w0, w1, q), m, t);
        }
        lane_total(acc)
    }

    /// A row of a 32-element block format with [`INPUT_GROUP`] inputs: `unpack` gives
    /// each block's weights (elements 0..16 and 16..32, as i16), scale and minimum (the
    /// formats without one give none) once for all inputs, and each input's lanes see the
    /// very operations its format's single-input dot product does, so each result has its
    /// bits.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn group(
        row: &[u8],
        block_bytes: usize,
        inps: [&Input<'_>; INPUT_GROUP],
        unpack: impl Fn(&[u8]) -> (__m256i, __m256i, __m256, Option<__m256>),
    ) -> [f32; INPUT_GROUP] {
        let mut acc = [_mm256_setzero_ps(); INPUT_GROUP];
        let blocks = row.len() / block_bytes;
        let inputs = inps.map(|inp| RowInputs::new(inp, blocks));
        for (i, b) in row.chunks_exact(block_bytes).enumerate() {
            let (w0, w1, d, m) = unpack(b);
            for (a, inp) in acc.iter_mut().zip(&inputs) {
                let (q, dx, t) = inp.block(i);
                let lanes = block(w0, w1, q);
                *a = match m {
                    Some(m) => scaled_offset(*a, times(d, dx), lanes, m, t),
                    None => scaled(*a, times(d, dx), lanes),
                };
            }
        }
        acc.map(|a| lane_total(a))
    }

    /// [`dot_q4_1`] of one row with [`INPUT_GROUP`] inputs (see [`group`]).
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_1_group(row: &[u8], inps: [&Input<'_>; INPUT_GROUP]) -> [f32; INPUT_GROUP] {
        group(row, 20, inps, |b| {
            let (w0, w1) = nibbles(bytes16(b, 4));
            let (d, m) = half_pair(b);
            (w0, w1, d, Some(m))
        })
    }

    /// [`dot_q4_0`] of one row with [`INPUT_GROUP`] inputs (see [`group`]).
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_0_group(row: &[u8], inps: [&Input<'_>; INPUT_GROUP]) -> [f32; INPUT_GROUP] {
        let eight = _mm256_set1_epi16(8);
        group(row, 18, inps, |b| {
            let (w0, w1) = nibbles(bytes16(b, 2));
            let (w0, w1) = (_mm256_sub_epi16(w0, eight), _mm256_sub_epi16(w1, eight));
            (w0, w1, half(b, 0), None)
        })
    }

    /// [`dot_q8_0`] of one row with [`INPUT_GROUP`] inputs (see [`group`]).
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q8_0_group(row: &[u8], inps: [&Input<'_>; INPUT_GROUP]) -> [f32; INPUT_GROUP] {
        group(row, 34, inps, |b| {
            let w0 = _mm256_cvtepi8_epi16(bytes16(b, 2));
            let w1 = _mm256_cvtepi8_epi16(bytes16(b, 18));
            (w0, w1, half(b, 0), None)
        })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4k(row: &[u8], inp: &Input<'_>) -> f32 {
        let [out] = q4k_inputs(row, [inp]);
        out
    }

    /// [`dot_q4k`] of one row with [`INPUT_GROUP`] inputs: each sub-block's weights,
    /// scale and minimum unpacked once for all of them.
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4k_group(row: &[u8], inps: [&Input<'_>; INPUT_GROUP]) -> [f32; INPUT_GROUP] {
        q4k_inputs(row, inps)
    }

    /// A Q4_K row with `N` inputs: each 32-element sub-block is rebuilt from its nibbles
    /// (the low ones for the first of a pair, the high for the second), with scale
    /// `(d·sc)·dx` and minimum `-(dmin·mn)`, once for every input.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn q4k_inputs<const N: usize>(row: &[u8], inps: [&Input<'_>; N]) -> [f32; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        let inputs = inps.map(|inp| RowInputs::new(inp, 8 * (row.len() / 144)));
        for (sb, b) in row.chunks_exact(144).enumerate() {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let scales = &b[4..16];
            for j in 0..4 {
                let first = _mm256_cvtepu8_epi16(bytes16(b, 16 + 32 * j));
                let second = _mm256_cvtepu8_epi16(bytes16(b, 32 + 32 * j));
                for sub in 0..2 {
                    let (sc, mn) = q4k_scale_min(2 * j + sub, scales);
                    let pick = |wide| match sub {
                        0 => low_nibbles(wide),
                        _ => high_nibbles(wide),
                    };
                    let (w0, w1) = (pick(first), pick(second));
                    let ds = times(d, f32::from(sc));
                    // -(dmin·mn): the negation is exact, so a subtraction from zero.
                    let offset = _mm256_sub_ps(_mm256_setzero_ps(), times(dmin, f32::from(mn)));
                    for (a, inp) in acc.iter_mut().zip(&inputs) {
                        let (q, dx, t) = inp.block(8 * sb + 2 * j + sub);
                        *a = scaled_offset(*a, times(ds, dx), block(w0, w1, q), offset, t);
                    }
                }
            }
        }
        acc.map(|a| lane_total(a))
    }

    /// Q6_K: each sub-block of 16 weights is rebuilt from its four low bits (`ql`, the
    /// high nibble for quarters 2 and 3) and two high bits (`qh`, shifted by the quarter),
    /// minus 32, as `q6k_value` does, then multiplied with the inputs as the others are.
    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q6k(row: &[u8], inp: &Input<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let (low4, high2) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(3));
        let bias = _mm256_set1_epi16(32);
        let inputs = RowInputs::new(inp, 8 * (row.len() / 210));
        q6k_quarters(
            (row, 0),
            |b| inputs.block(b),
            |t| {
                let high_shift = _mm_cvtsi32_si128(2 * t.quarter as i32);
                for half_q in 0..2 {
                    let l0 = 16 * half_q;
                    let low = bytes16(t.ql, 32 * (t.quarter & 1) + l0);
                    let low = if t.quarter < 2 {
                        low
                    } else {
                        _mm_srli_epi16(low, 4)
                    };
                    let high = _mm_and_si128(_mm_srl_epi16(bytes16(t.qh, l0), high_shift), high2);
                    // Both masked first, so the 16-bit shift moves no bit across bytes.
                    let w = _mm_or_si128(_mm_and_si128(low, low4), _mm_slli_epi16(high, 4));
                    let w = _mm256_sub_epi16(_mm256_cvtepu8_epi16(w), bias);
                    let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(w, inputs16(t.q, l0)));
                    let sc = f32::from(t.sc[half_q + 2 * t.quarter] as i8);
                    acc = scaled(acc, times(times(_mm256_set1_ps(t.d), sc), t.dx), lanes);
                }
            },
        );
        lane_total(acc)
    }
}

/// The formats whose weights are 32-element blocks of 4 or 8 bits (Q4_0, Q4_1, Q8_0), two
/// rows at a time: each row in one half of the 512-bit registers, so one instruction
/// does for two rows what the [`avx2`] code does for one. Each half sees the very
/// operations of the [`avx2`] code's lanes, so each row's product has its bits (the
/// tests compare them). A decoded token's matrix–vector products are bound by their
/// count of vector instructions (17 a block and row in the [`avx2`] code, about 9 here),
/// not by memory. Four rows go together where there are four (two pairs), sharing a
/// block's inputs, scale and sums: Q4_1 18.4 to 19.6 GMAC/s on one core (1536 × 1536), and
/// 125.5 to 130.5 tokens/s in six alternated pairs of `llm-chat` runs.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::avx2::{lane_total, RowInputs, WEIGHTS_AHEAD};
    use super::{prefetch, Input};

    /// Two rows' 16 bytes at `at` of their blocks `a` and `b`, side by side.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn bytes16x2(a: &[u8], b: &[u8], at: usize) -> __m256i {
        let a: &[u8; 16] = a[at..at + 16].try_into().expect("sixteen bytes");
        let b: &[u8; 16] = b[at..at + 16].try_into().expect("sixteen bytes");
        // SAFETY: `a` and `b` are sixteen readable bytes each; the loads have no
        // alignment requirement.
        unsafe {
            let lo = _mm_loadu_si128(a.as_ptr().cast());
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(lo),
                _mm_loadu_si128(b.as_ptr().cast()),
            )
        }
    }

    /// Sixteen 16-bit inputs `q[at..at + 16]` in both halves.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn inputs16x2(q: &[i16], at: usize) -> __m512i {
        let q: &[i16; 16] = q[at..at + 16].try_into().expect("sixteen inputs");
        // SAFETY: `q` is sixteen readable i16; the load has no alignment requirement.
        _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(q.as_ptr().cast()) })
    }

    /// The first `N` half floats of two blocks `a` and `b` (a scale, and a minimum for
    /// Q4_1), converted exactly: `[a0, .., aN-1, b0, .., bN-1]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn halves<const N: usize>(a: &[u8], b: &[u8]) -> __m128 {
        // Whole loads: built from bytes, the words took seven scalar instructions more.
        let word = |b: &[u8]| match N {
            1 => u64::from(u16::from_le_bytes(*b.first_chunk().expect("a half float"))),
            _ => u64::from(u32::from_le_bytes(
                *b.first_chunk().expect("two half floats"),
            )),
        };
        let both = word(a) | word(b) << (16 * N);
        _mm_cvtph_ps(_mm_cvtsi64_si128(both as i64))
    }

    /// Lane `i` of `v` in the eight lanes of the first row and lane `j` in the second's.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn spread(v: __m128, i: i32, j: i32) -> __m512 {
        let at = _mm512_setr_epi32(i, i, i, i, i, i, i, i, j, j, j, j, j, j, j, j);
        _mm512_permutexvar_ps(at, _mm512_castps128_ps512(v))
    }

    /// One block's inputs as the AVX-512 code uses them: the 16-bit inputs (elements 0..16
    /// and 16..32) in both halves, the scale, and the lane sums in both halves (for
    /// formats with a minimum, else zero).
    struct BlockInputs {
        q: (__m512i, __m512i),
        dx: __m128,
        t: __m512,
    }

    impl BlockInputs {
        /// Block `i` of `inputs`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
        fn of<const MIN: bool>(inputs: &RowInputs<'_>, i: usize) -> Self {
            let (q, dx, t) = inputs.block(i);
            let t = if MIN {
                // SAFETY: `t` is eight readable f32; the load has no alignment requirement.
                _mm512_broadcast_f32x8(unsafe { _mm256_loadu_ps(t.as_ptr()) })
            } else {
                _mm512_setzero_ps()
            };
            Self {
                q: (inputs16x2(q, 0), inputs16x2(q, 16)),
                dx: _mm_set1_ps(dx),
                t,
            }
        }
    }

    /// `acc` plus one block of two rows, `x` and `y`, whose weights `unpack` gives
    /// (elements 0..16 and 16..32, as i16, `x`'s in the low halves); `MIN` says whether
    /// the format has a minimum after its scale. Each half does what the AVX2 code's
    /// lanes do.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn add_block<const MIN: bool>(
        acc: __m512,
        (x, y): (&[u8], &[u8]),
        input: &BlockInputs,
        unpack: &impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
    ) -> __m512 {
        prefetch(x.as_ptr().wrapping_add(WEIGHTS_AHEAD));
        prefetch(y.as_ptr().wrapping_add(WEIGHTS_AHEAD));
        let (w0, w1) = unpack(x, y);
        let lo = _mm512_madd_epi16(w0, input.q.0);
        let hi = _mm512_madd_epi16(w1, input.q.1);
        let f = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
        if MIN {
            let h = halves::<2>(x, y);
            let scale = spread(_mm_mul_ps(h, input.dx), 0, 2);
            let o = _mm512_mul_ps(spread(h, 1, 3), input.t);
            _mm512_add_ps(acc, _mm512_add_ps(_mm512_mul_ps(scale, f), o))
        } else {
            let scale = spread(_mm_mul_ps(halves::<1>(x, y), input.dx), 0, 1);
            _mm512_add_ps(acc, _mm512_mul_ps(scale, f))
        }
    }

    /// The two rows' totals of an accumulator of [`add_block`]s.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn totals(acc: __m512) -> [f32; 2] {
        [
            lane_total(_mm512_castps512_ps256(acc)),
            lane_total(_mm512_extractf32x8_ps::<1>(acc)),
        ]
    }

    /// Two rows of `block_bytes`-byte blocks with one input (see [`add_block`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn pair<const MIN: bool>(
        rows: [&[u8]; 2],
        block_bytes: usize,
        inp: &Input<'_>,
        unpack: impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
    ) -> [f32; 2] {
        let blocks = rows[0].len() / block_bytes;
        let [a, b] = rows.map(|r| r[..blocks * block_bytes].chunks_exact(block_bytes));
        let inputs = RowInputs::new(inp, blocks);
        let mut acc = _mm512_setzero_ps();
        for (i, block) in a.zip(b).enumerate() {
            let input = BlockInputs::of::<MIN>(&inputs, i);
            acc = add_block::<MIN>(acc, block, &input, &unpack);
        }
        totals(acc)
    }

    /// [`pair`] of two pairs of rows at once, `rows[0..2]` and `rows[2..4]`, each pair's
    /// operations [`pair`]'s (so its bits), a block's inputs, scale and sums loaded once
    /// for the four rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn quad<const MIN: bool>(
        rows: [&[u8]; 4],
        block_bytes: usize,
        inp: &Input<'_>,
        unpack: impl Fn(&[u8], &[u8]) -> (__m512i, __m512i),
    ) -> [f32; 4] {
        let blocks = rows[0].len() / block_bytes;
        let [a, b, c, d] = rows.map(|r| r[..blocks * block_bytes].chunks_exact(block_bytes));
        let inputs = RowInputs::new(inp, blocks);
        let (mut ab, mut cd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (i, (first, second)) in a.zip(b).zip(c.zip(d)).enumerate() {
            let input = BlockInputs::of::<MIN>(&inputs, i);
            ab = add_block::<MIN>(ab, first, &input, &unpack);
            cd = add_block::<MIN>(cd, second, &input, &unpack);
        }
        let ([r0, r1], [r2, r3]) = (totals(ab), totals(cd));
        [r0, r1, r2, r3]
    }

    /// The low and high nibbles of two rows' 16 bytes, widened to i16 (see
    /// [`super::avx2`]'s `nibbles`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn nibbles(bytes: __m256i) -> (__m512i, __m512i) {
        let wide = _mm512_cvtepu8_epi16(bytes);
        (
            _mm512_and_si512(wide, _mm512_set1_epi16(0x0f)),
            _mm512_srli_epi16::<4>(wide),
        )
    }

    /// Two rows' Q4_0 weights of a block (see `pair`'s `unpack`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn q4_0(a: &[u8], b: &[u8]) -> (__m512i, __m512i) {
        let eight = _mm512_set1_epi16(8);
        let (w0, w1) = nibbles(bytes16x2(a, b, 2));
        (_mm512_sub_epi16(w0, eight), _mm512_sub_epi16(w1, eight))
    }

    /// Two rows' Q4_1 weights of a block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn q4_1(a: &[u8], b: &[u8]) -> (__m512i, __m512i) {
        nibbles(bytes16x2(a, b, 4))
    }

    /// Two rows' Q8_0 weights of a block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    fn q8_0(a: &[u8], b: &[u8]) -> (__m512i, __m512i) {
        (
            _mm512_cvtepi8_epi16(bytes16x2(a, b, 2)),
            _mm512_cvtepi8_epi16(bytes16x2(a, b, 18)),
        )
    }

    /// [`super::avx2::dot_q4_0`] of two rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q4_0(rows: [&[u8]; 2], inp: &Input<'_>) -> [f32; 2] {
        pair::<false>(rows, 18, inp, |a, b| q4_0(a, b))
    }

    /// [`super::avx2::dot_q4_0`] of four rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q4_0_x4(rows: [&[u8]; 4], inp: &Input<'_>) -> [f32; 4] {
        quad::<false>(rows, 18, inp, |a, b| q4_0(a, b))
    }

    /// [`super::avx2::dot_q4_1`] of two rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q4_1(rows: [&[u8]; 2], inp: &Input<'_>) -> [f32; 2] {
        pair::<true>(rows, 20, inp, |a, b| q4_1(a, b))
    }

    /// [`super::avx2::dot_q4_1`] of four rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q4_1_x4(rows: [&[u8]; 4], inp: &Input<'_>) -> [f32; 4] {
        quad::<true>(rows, 20, inp, |a, b| q4_1(a, b))
    }

    /// [`super::avx2::dot_q8_0`] of two rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q8_0(rows: [&[u8]; 2], inp: &Input<'_>) -> [f32; 2] {
        pair::<false>(rows, 34, inp, |a, b| q8_0(a, b))
    }

    /// [`super::avx2::dot_q8_0`] of four rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")]
    pub fn dot_q8_0_x4(rows: [&[u8]; 4], inp: &Input<'_>) -> [f32; 4] {
        quad::<false>(rows, 34, inp, |a, b| q8_0(a, b))
    }
}

/// The code the dot products run, each giving the same bits (the tests compare them on
/// every CPU that runs them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Portable Rust.
    Portable,
    /// AVX2 and F16C, a row at a time.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL), four rows at a time (then two) for Q4_0, Q4_1 and Q8_0 (the
    /// AVX2 code for the other formats).
    Avx512,
}

impl Simd {
    /// The fastest this CPU runs.
    pub fn best() -> Simd {
        if has_avx512() {
            Simd::Avx512
        } else if has_avx2() {
            Simd::Avx2
        } else {
            Simd::Portable
        }
    }

    /// Every one this CPU runs.
    #[cfg(test)]
    pub fn here() -> Vec<Simd> {
        [Simd::Portable, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|&code| code <= Simd::best())
            .collect()
    }
}

/// `out[i] = dot(row first + i of w, x)`: rows of `x`'s length in `dtype`, each
/// `row_bytes` long (the caller checked the sizes), `inp` being [`prepare`]d `x`, by the
/// `code` given where this CPU runs it, else the fastest it runs (the same bits).
pub fn dot_rows(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    inp: &Input<'_>,
    out: &mut [f32],
    code: Simd,
) {
    let code = code.min(Simd::best());
    let row = |i: usize| &w[(first + i) * row_bytes..][..row_bytes];
    // Each format's loop calls its dot product directly, so that it inlines.
    macro_rules! rows {
        ($portable:expr, $avx2:ident) => {{
            #[cfg(target_arch = "x86_64")]
            if code >= Simd::Avx2 {
                for (i, o) in out.iter_mut().enumerate() {
                    // SAFETY: `Simd::best` said this CPU has AVX2 and F16C, all these need.
                    *o = unsafe { avx2::$avx2(row(i), inp) };
                }
                return;
            }
            for (i, o) in out.iter_mut().enumerate() {
                *o = $portable(row(i), inp);
            }
        }};
    }
    // The formats with AVX-512 code: four rows at a time, then two, the last of an odd
    // count alone.
    macro_rules! quads {
        ($portable:expr, $simd:ident, $simd4:ident) => {{
            #[cfg(target_arch = "x86_64")]
            if code == Simd::Avx512 {
                let quads = out.len() / 4;
                for (j, o) in out[..4 * quads].chunks_exact_mut(4).enumerate() {
                    let r = 4 * j;
                    let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                    // SAFETY: `Simd::best` said this CPU has AVX-512 F, BW, DQ and VL, AVX2
                    // and F16C, all these need.
                    o.copy_from_slice(&unsafe { avx512::$simd4(rows, inp) });
                }
                let r = 4 * quads;
                let rest = &mut out[r..];
                if rest.len() >= 2 {
                    // SAFETY: as above.
                    rest[..2].copy_from_slice(&unsafe { avx512::$simd([row(r), row(r + 1)], inp) });
                }
                if rest.len() % 2 == 1 {
                    let last = rest.len() - 1;
                    // SAFETY: as above.
                    rest[last] = unsafe { avx2::$simd(row(r + last), inp) };
                }
                return;
            }
            rows!($portable, $simd)
        }};
    }
    match dtype {
        DType::F32 => rows!(|row, inp| dot_float(row, 4, inp), dot_f32),
        DType::F16 => rows!(|row, inp| dot_float(row, 2, inp), dot_f16),
        DType::Q4_0 => quads!(dot_q4_0, dot_q4_0, dot_q4_0_x4),
        DType::Q4_1 => quads!(dot_q4_1, dot_q4_1, dot_q4_1_x4),
        DType::Q8_0 => quads!(dot_q8_0, dot_q8_0, dot_q8_0_x4),
        DType::Q4K => rows!(dot_q4k, dot_q4k),
        DType::Q6K => rows!(dot_q6k, dot_q6k),
    }
}

/// Elements of a row beyond which a QMATMUL task computes its dot products in parts,
/// checking between them ([`dot_rows_checked`]): no model's rows are that long (a
/// hostile guest's may be billions).
pub const WIDE_ROW: usize = 1 << 18;

/// [`dot_rows`] (by the fastest code this CPU runs) in a QMATMUL task, counting its steps on `tick`:
/// rows longer than [`WIDE_ROW`] one at a time, each in parts ([`dot_wide`]).
pub fn dot_rows_checked(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    inp: &Input<'_>,
    out: &mut [f32],
    tick: &mut Ticker<'_>,
) -> Result<(), Stopped> {
    let k = inp.x.len();
    if k <= WIDE_ROW {
        dot_rows(dtype, w, row_bytes, first, inp, out, Simd::best());
        return tick.done(out.len() * k);
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_wide(dtype, &w[(first + i) * row_bytes..][..row_bytes], inp, tick)?;
    }
    Ok(())
}

/// Adds the terms of a run of a row's whole units (groups of eight f32 or f16, blocks,
/// super-blocks) to the lanes, from the unit of the row given on.
type AddLanes = fn(&mut Lanes, &[u8], &Input<'_>, usize);

/// The dot product of `row` with `inp` by the portable code, in parts of about
/// [`CHECK_WORK`](super::CHECK_WORK) elements counted on `tick`: the lanes go on from one
/// part to the next, so the bits are those of the whole row's (and of the AVX2 code's).
fn dot_wide(
    dtype: DType,
    row: &[u8],
    inp: &Input<'_>,
    tick: &mut Ticker<'_>,
) -> Result<f32, Stopped> {
    // The unit a format's lanes take whole: eight f32 or f16, a block, a super-block.
    let (unit, lanes): (usize, AddLanes) = match dtype {
        DType::F32 => (LANES, |acc, w, inp, first| {
            float_lanes(acc, w, 4, &inp.x[LANES * first..])
        }),
        DType::F16 => (LANES, |acc, w, inp, first| {
            float_lanes(acc, w, 2, &inp.x[LANES * first..])
        }),
        DType::Q4_0 => (32, q4_0_lanes),
        DType::Q4_1 => (32, q4_1_lanes),
        DType::Q8_0 => (32, q8_0_lanes),
        DType::Q4K => (256, q4k_lanes),
        DType::Q6K => (256, q6k_lanes),
    };
    let unit_bytes = dtype.row_bytes(unit as u64).expect("whole blocks") as usize;
    let units = inp.x.len() / unit;
    let per_part = (super::CHECK_WORK / unit).max(1);
    let mut acc = [0.0; LANES];
    let parts = row[..units * unit_bytes].chunks(per_part * unit_bytes);
    for (p, part) in parts.enumerate() {
        lanes(&mut acc, part, inp, p * per_part);
        tick.done(per_part * unit)?;
    }
    Ok(match dtype {
        DType::F32 => lane_sum(acc) + float_tail(row, 4, inp.x),
        DType::F16 => lane_sum(acc) + float_tail(row, 2, inp.x),
        _ => lane_sum(acc),
    })
}

/// Inputs whose dot products with a weight row [`dot_inputs`] computes together.
pub const INPUT_GROUP: usize = 4;

/// A dot product of one weight row with [`INPUT_GROUP`] inputs, each row unpacked once.
type GroupDot = unsafe fn(&[u8], [&Input<'_>; INPUT_GROUP]) -> [f32; INPUT_GROUP];

/// The grouped dot product for `dtype` here, if there is one (it needs AVX2 and F16C).
fn group_dot(dtype: DType) -> Option<GroupDot> {
    if !has_avx2() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    match dtype {
        DType::Q4_0 => return Some(avx2::dot_q4_0_group),
        DType::Q4_1 => return Some(avx2::dot_q4_1_group),
        DType::Q8_0 => return Some(avx2::dot_q8_0_group),
        DType::Q4K => return Some(avx2::dot_q4k_group),
        _ => {}
    }
    None
}

/// Whether [`dot_inputs`] unpacks each weight row once for a group of inputs for
/// `dtype` here (elsewhere a matrix product goes one input at a time, as fast).
pub fn unpacks_once(dtype: DType) -> bool {
    group_dot(dtype).is_some()
}

/// `out[m·i + r] = dot(row first + i of w, inputs[r])` for the `m` inputs: where
/// [`unpacks_once`], each weight row's blocks are unpacked once for [`INPUT_GROUP`]
/// inputs at a time. Every result has the bits [`dot_rows`] gives it.
pub fn dot_inputs(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    inputs: &[Input<'_>],
    out: &mut [f32],
) {
    let mut tick = Ticker::unchecked();
    dot_inputs_checked(dtype, w, row_bytes, first, inputs, out, &mut tick)
        .unwrap_or_else(|Stopped| unreachable!("an unchecked ticker never stops"));
}

/// [`dot_inputs`] in a QMATMUL task, counting its steps on `tick` (rows longer than
/// [`WIDE_ROW`] one input at a time, each in parts: see [`dot_rows_checked`]).
pub fn dot_inputs_checked(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    inputs: &[Input<'_>],
    out: &mut [f32],
    tick: &mut Ticker<'_>,
) -> Result<(), Stopped> {
    let m = inputs.len();
    let k = inputs.first().map_or(0, |inp| inp.x.len());
    let grouped = group_dot(dtype).filter(|_| k <= WIDE_ROW);
    for (i, out) in out.chunks_exact_mut(m).enumerate() {
        let mut rest = (inputs, out);
        if let Some(dot) = grouped {
            let row = &w[(first + i) * row_bytes..][..row_bytes];
            let groups = inputs.chunks_exact(INPUT_GROUP);
            let outs = rest.1.chunks_exact_mut(INPUT_GROUP);
            for (g, o) in groups.clone().zip(outs) {
                // SAFETY: `group_dot` gives one only where this CPU has AVX2 and F16C.
                o.copy_from_slice(&unsafe { dot(row, [&g[0], &g[1], &g[2], &g[3]]) });
                tick.done(INPUT_GROUP * k)?;
            }
            let done = m - groups.remainder().len();
            rest = (&inputs[done..], &mut rest.1[done..]);
        }
        for (inp, o) in rest.0.iter().zip(rest.1.iter_mut()) {
            let o = core::slice::from_mut(o);
            dot_rows_checked(dtype, w, row_bytes, first + i, inp, o, tick)?;
        }
    }
    Ok(())
}

/// Asks for the cache line at `p` to be brought into the cache, ahead of a read: a hint,
/// with no effect on any result (and none where the target has no such instruction).
#[inline(always)]
pub fn prefetch(p: *const u8) {
    // SAFETY: a prefetch reads nothing and never faults, wherever `p` points.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether this CPU runs the AVX-512 code (AVX-512 F, BW, DQ and VL, with AVX2 and
/// F16C).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the [`avx2`] code (AVX2 and F16C).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dequantizes one row of `out.len()` elements in `dtype` (GGML's definitions, in f32
/// arithmetic: `d·q + m`, `(d·sc)·q - dmin·m`, ...).
pub fn dequant_row(dtype: DType, row: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, w) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            }
        }
        DType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = half(row, 2 * i);
            }
        }
        DType::Q8_0 => {
            for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = half(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let bytes = dtype.block_bytes() as usize;
            for (b, o) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(32)) {
                let d = half(b, 0);
                let (m, q) = if dtype == DType::Q4_1 {
                    (half(b, 2), &b[4..20])
                } else {
                    (0.0, &b[2..18])
                };
                for j in 0..16 {
                    let (lo, hi) = (f32::from(q[j] & 0xf), f32::from(q[j] >> 4));
                    if dtype == DType::Q4_1 {
                        o[j] = d * lo + m;
                        o[j + 16] = d * hi + m;
                    } else {
                        o[j] = d * (lo - 8.0);
                        o[j + 16] = d * (hi - 8.0);
                    }
                }
            }
        }
        DType::Q4K => {
            for (b, o) in row.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
                let (d, dmin) = (half(b, 0), half(b, 2));
                for j in 0..4 {
                    let q = &b[16 + 32 * j..16 + 32 * j + 32];
                    for (sub, shift) in [(0, 0), (1, 4)] {
                        let (sc, mn) = q4k_scale_min(2 * j + sub, &b[4..16]);
                        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(mn));
                        for l in 0..32 {
                            o[64 * j + 32 * sub + l] = d1 * f32::from((q[l] >> shift) & 0xf) - m1;
                        }
                    }
                }
            }
        }
        DType::Q6K => {
            for (b, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let d = half(b, 208);
                for h in 0..2 {
                    let (ql, qh, sc) = q6k_half(b, h);
                    for quarter in 0..4 {
                        for l in 0..32 {
                            let scale = d * f32::from(sc[l / 16 + 2 * quarter] as i8);
                            o[128 * h + 32 * quarter + l] =
                                scale * q6k_value(ql, qh, quarter, l) as f32;
                        }
                    }
                }
            }
        }
    }
}
