//! The GGML block formats ([`DType`]) on the cpu backend: dequantization, and the dot
//! product of a quantized row with an f32 vector that QMATMUL is made of.
//!
//! # Determinism
//!
//! A row's dot product is computed by one thread, block after block in order, into eight
//! f32 lanes (lane `l` takes elements `8j + l`); within a block the lanes first sum
//! `q·x` (and `x`, for formats with a minimum), then add `scale · sum` (and
//! `min · sum(x)`), and the lanes are added in a fixed tree at the end. Every step is a
//! separate IEEE multiply or add (Rust never fuses them), so the result depends only on
//! the data: not on the thread count, and not on whether the AVX2 copy of the same code
//! runs (it only does eight lanes at once). The formats' scales are half floats,
//! converted exactly.

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

/// The lane sums of each block of 32 elements of `x`: lane `l` of block `b` is
/// `((x[32b+l] + x[32b+8+l]) + x[32b+16+l]) + x[32b+24+l]` (from zero), the term that the
/// formats with a minimum multiply by it. Computed once per input row: every weight row
/// shares it.
pub fn x_sums(x: &[f32]) -> Vec<Lanes> {
    x.chunks_exact(32)
        .map(|b| {
            let mut t = [0.0; LANES];
            for g in 0..4 {
                for l in 0..LANES {
                    t[l] += b[8 * g + l];
                }
            }
            t
        })
        .collect()
}

#[inline(always)]
fn dot_f32(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for (w, x) in row.chunks_exact(4 * LANES).zip(x.chunks_exact(LANES)) {
        group_q(&mut acc, x, |l| {
            f32::from_le_bytes([w[4 * l], w[4 * l + 1], w[4 * l + 2], w[4 * l + 3]])
        });
    }
    // The tail (fewer than eight elements), in order, added after the lanes.
    let done = x.len() / LANES * LANES;
    let mut tail = 0.0;
    for (i, &xv) in x[done..].iter().enumerate() {
        let at = 4 * (done + i);
        tail += f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]) * xv;
    }
    lane_sum(acc) + tail
}

#[inline(always)]
fn dot_f16(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for (w, x) in row.chunks_exact(2 * LANES).zip(x.chunks_exact(LANES)) {
        group_q(&mut acc, x, |l| half(w, 2 * l));
    }
    let done = x.len() / LANES * LANES;
    let mut tail = 0.0;
    for (i, &xv) in x[done..].iter().enumerate() {
        tail += half(row, 2 * (done + i)) * xv;
    }
    lane_sum(acc) + tail
}

#[inline(always)]
fn dot_q8_0(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for (b, x) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = half(b, 0);
        let q = &b[2..34];
        let mut s = [0.0; LANES];
        for g in 0..4 {
            group_q(&mut s, &x[8 * g..], |l| f32::from(q[8 * g + l] as i8));
        }
        add_scaled(&mut acc, d, &s);
    }
    lane_sum(acc)
}

#[inline(always)]
fn dot_q4_0(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for (b, x) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
        let d = half(b, 0);
        let q = &b[2..18];
        let mut s = [0.0; LANES];
        for g in 0..2 {
            group_q(&mut s, &x[8 * g..], |l| f32::from(q[8 * g + l] & 0xf) - 8.0);
        }
        for g in 0..2 {
            group_q(&mut s, &x[16 + 8 * g..], |l| {
                f32::from(q[8 * g + l] >> 4) - 8.0
            });
        }
        add_scaled(&mut acc, d, &s);
    }
    lane_sum(acc)
}

#[inline(always)]
fn dot_q4_1(row: &[u8], x: &[f32], sums: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for ((b, x), t) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(sums) {
        let (d, m) = (half(b, 0), half(b, 2));
        let q = &b[4..20];
        let mut s = [0.0; LANES];
        for g in 0..2 {
            group_q(&mut s, &x[8 * g..], |l| f32::from(q[8 * g + l] & 0xf));
        }
        for g in 0..2 {
            group_q(&mut s, &x[16 + 8 * g..], |l| f32::from(q[8 * g + l] >> 4));
        }
        add_scaled_offset(&mut acc, d, &s, m, t);
    }
    lane_sum(acc)
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
fn dot_q4k(row: &[u8], x: &[f32], sums: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for ((b, x), sums) in row
        .chunks_exact(144)
        .zip(x.chunks_exact(256))
        .zip(sums.chunks_exact(8))
    {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let scales = &b[4..16];
        for j in 0..4 {
            let q = &b[16 + 32 * j..16 + 32 * j + 32];
            let x = &x[64 * j..];
            for (sub, shift) in [(0, 0), (1, 4)] {
                let (sc, mn) = q4k_scale_min(2 * j + sub, scales);
                let mut s = [0.0; LANES];
                for g in 0..4 {
                    group_q(&mut s, &x[32 * sub + 8 * g..], |l| {
                        f32::from((q[8 * g + l] >> shift) & 0xf)
                    });
                }
                let t = &sums[2 * j + sub];
                add_scaled_offset(&mut acc, d * f32::from(sc), &s, -(dmin * f32::from(mn)), t);
            }
        }
    }
    lane_sum(acc)
}

/// Element `l` (0..32) of quarter `quarter` (0..4) of a Q6_K half super-block, minus 32.
#[inline(always)]
fn q6k_value(ql: &[u8], qh: &[u8], quarter: usize, l: usize) -> f32 {
    let low = match quarter {
        0 => ql[l] & 0xf,
        1 => ql[l + 32] & 0xf,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    let high = (qh[l] >> (2 * quarter)) & 3;
    f32::from((low | (high << 4)) as i8 - 32)
}

#[inline(always)]
fn dot_q6k(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
    let mut acc = [0.0; LANES];
    for (b, x) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = half(b, 208);
        for h in 0..2 {
            let ql = &b[64 * h..64 * h + 64];
            let qh = &b[128 + 32 * h..128 + 32 * h + 32];
            let sc = &b[192 + 8 * h..192 + 8 * h + 8];
            let x = &x[128 * h..];
            for quarter in 0..4 {
                // Two sub-blocks of 16 elements, each with its own scale.
                for half_q in 0..2 {
                    let mut s = [0.0; LANES];
                    for g in 0..2 {
                        let l0 = 16 * half_q + 8 * g;
                        group_q(&mut s, &x[32 * quarter + l0..], |l| {
                            q6k_value(ql, qh, quarter, l0 + l)
                        });
                    }
                    let scale = d * f32::from(sc[half_q + 2 * quarter] as i8);
                    add_scaled(&mut acc, scale, &s);
                }
            }
        }
    }
    lane_sum(acc)
}

/// The hot formats with AVX2 intrinsics: the very operations of the portable code above
/// (multiplies and adds, never fused, in the same order per lane), so the same bits, but
/// with the integer-to-float conversions done eight at a time, which LLVM does not do
/// from the portable code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{lane_sum, Lanes};

    /// The half float at `b[at..at + 2]`, broadcast (F16C converts exactly, as
    /// `f16_to_f32` does, without its branches).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scale(b: &[u8], at: usize) -> __m256 {
        let h = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h)))))
    }

    /// Eight f32 from `x[at..at + 8]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load(x: &[f32], at: usize) -> __m256 {
        let x: &[f32; 8] = x[at..at + 8].try_into().expect("eight elements");
        // SAFETY: `x` is eight readable f32; the load has no alignment requirement.
        unsafe { _mm256_loadu_ps(x.as_ptr()) }
    }

    /// Eight u8 (`b[at..at + 8]`) widened to i32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn bytes8(b: &[u8], at: usize) -> __m128i {
        let b: &[u8; 8] = b[at..at + 8].try_into().expect("eight bytes");
        // SAFETY: `b` is eight readable bytes; _mm_loadl_epi64 reads exactly eight.
        unsafe { _mm_loadl_epi64(b.as_ptr().cast()) }
    }

    /// Sixteen bytes `b[at..at + 16]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn bytes16(b: &[u8], at: usize) -> __m128i {
        let b: &[u8; 16] = b[at..at + 16].try_into().expect("sixteen bytes");
        // SAFETY: `b` is sixteen readable bytes; the load has no alignment requirement.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn lanes(v: __m256) -> Lanes {
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds eight f32; the store has no alignment requirement.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// `s + q·x` for eight elements: the portable `group_q` step.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn step(s: __m256, q: __m256, x: __m256) -> __m256 {
        _mm256_add_ps(s, _mm256_mul_ps(q, x))
    }

    /// The low eight bytes of `v`, signed, as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn i8_to_f32(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// The four groups of eight 4-bit values of a 16-byte block (low nibbles, then high),
    /// less `bias`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn nibbles(q: __m128i, bias: i32) -> [__m256; 4] {
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let b = _mm256_set1_epi32(bias);
        [
            unsigned_less(lo, b),
            unsigned_less(_mm_srli_si128(lo, 8), b),
            unsigned_less(hi, b),
            unsigned_less(_mm_srli_si128(hi, 8), b),
        ]
    }

    /// The low eight bytes of `v`, unsigned, less `bias` (eight i32), as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn unsigned_less(v: __m128i, bias: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), bias))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q8_0(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
            let d = scale(b, 0);
            let mut s = _mm256_setzero_ps();
            for g in 0..4 {
                s = step(s, i8_to_f32(bytes8(b, 2 + 8 * g)), load(x, 8 * g));
            }
            acc = _mm256_add_ps(acc, _mm256_mul_ps(d, s));
        }
        lane_sum(lanes(acc))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_0(row: &[u8], x: &[f32], _: &[Lanes]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
            let d = scale(b, 0);
            let q = nibbles(bytes16(b, 2), 8);
            let mut s = _mm256_setzero_ps();
            for (g, q) in q.into_iter().enumerate() {
                s = step(s, q, load(x, 8 * g));
            }
            acc = _mm256_add_ps(acc, _mm256_mul_ps(d, s));
        }
        lane_sum(lanes(acc))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub fn dot_q4_1(row: &[u8], x: &[f32], sums: &[Lanes]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for ((b, x), t) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(sums) {
            let (d, m) = (scale(b, 0), scale(b, 2));
            let q = nibbles(bytes16(b, 4), 0);
            let mut s = _mm256_setzero_ps();
            for (g, q) in q.into_iter().enumerate() {
                s = step(s, q, load(x, 8 * g));
            }
            let t = load(t, 0);
            let block = _mm256_add_ps(_mm256_mul_ps(d, s), _mm256_mul_ps(m, t));
            acc = _mm256_add_ps(acc, block);
        }
        lane_sum(lanes(acc))
    }
}

/// `out[i] = row(first + i) · x` for the rows of `w` (rows of `row_bytes` in `dtype`),
/// `sums` being [`x_sums`] of `x`: with the AVX2 code for the formats that have it when
/// `avx2`, else the portable code (each format's loop calls its dot product directly so
/// that it inlines).
#[inline(always)]
fn dot_rows_inline(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    (x, sums): (&[f32], &[Lanes]),
    out: &mut [f32],
    avx2: bool,
) {
    macro_rules! rows {
        ($dot:expr) => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = $dot(&w[(first + i) * row_bytes..][..row_bytes], x, sums);
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        type Dot = unsafe fn(&[u8], &[f32], &[Lanes]) -> f32;
        let fast: Option<Dot> = match dtype {
            DType::Q4_0 => Some(avx2::dot_q4_0),
            DType::Q4_1 => Some(avx2::dot_q4_1),
            DType::Q8_0 => Some(avx2::dot_q8_0),
            _ => None,
        };
        if let Some(dot) = fast {
            for (i, o) in out.iter_mut().enumerate() {
                let row = &w[(first + i) * row_bytes..][..row_bytes];
                // SAFETY: the caller checked that the CPU has AVX2 and F16C, all these need.
                *o = unsafe { dot(row, x, sums) };
            }
            return;
        }
    }
    let _ = avx2;
    match dtype {
        DType::F32 => rows!(dot_f32),
        DType::F16 => rows!(dot_f16),
        DType::Q4_0 => rows!(dot_q4_0),
        DType::Q4_1 => rows!(dot_q4_1),
        DType::Q8_0 => rows!(dot_q8_0),
        DType::Q4K => rows!(dot_q4k),
        DType::Q6K => rows!(dot_q6k),
    }
}

/// `out[i] = dot(row first + i of w, x)`: rows of `x.len()` elements in `dtype`, each
/// `row_bytes` long (the caller checked the sizes), `sums` being [`x_sums`] of `x`. Same
/// bits on every x86-64 CPU, with or without AVX2.
pub fn dot_rows(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    x: (&[f32], &[Lanes]),
    out: &mut [f32],
) {
    dot_rows_inline(dtype, w, row_bytes, first, x, out, has_avx2());
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

/// [`dot_rows`] with the AVX2 code on or off: the tests check both give the same bits.
#[cfg(test)]
pub fn dot_rows_with(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    x: (&[f32], &[Lanes]),
    out: &mut [f32],
    avx2: bool,
) {
    dot_rows_inline(dtype, w, row_bytes, 0, x, out, avx2 && has_avx2());
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
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    for quarter in 0..4 {
                        for l in 0..32 {
                            let scale = d * f32::from(sc[l / 16 + 2 * quarter] as i8);
                            o[128 * h + 32 * quarter + l] = scale * q6k_value(ql, qh, quarter, l);
                        }
                    }
                }
            }
        }
    }
}
