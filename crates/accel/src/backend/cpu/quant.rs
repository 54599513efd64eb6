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

/// `s[l] += q(l)·x[l]` and `t[l] += x[l]` for one group of eight elements.
#[inline(always)]
fn group(s: &mut Lanes, t: &mut Lanes, x: &[f32], q: impl Fn(usize) -> f32) {
    let x: &[f32; LANES] = x[..LANES].try_into().expect("eight elements");
    for l in 0..LANES {
        s[l] += q(l) * x[l];
        t[l] += x[l];
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

#[inline(always)]
fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0; LANES];
    for (w, x) in row.chunks_exact(4 * LANES).zip(x.chunks_exact(LANES)) {
        group_q(&mut acc, x, |l| {
            f32::from_le_bytes([w[4 * l], w[4 * l + 1], w[4 * l + 2], w[4 * l + 3]])
        });
    }
    // The tail (fewer than eight elements), in order, into lane 0's partner sum.
    let done = x.len() / LANES * LANES;
    let mut tail = 0.0;
    for (i, &xv) in x[done..].iter().enumerate() {
        let at = 4 * (done + i);
        tail += f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]) * xv;
    }
    lane_sum(acc) + tail
}

#[inline(always)]
fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
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
fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
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
fn dot_q4_0(row: &[u8], x: &[f32]) -> f32 {
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
fn dot_q4_1(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0; LANES];
    for (b, x) in row.chunks_exact(20).zip(x.chunks_exact(32)) {
        let (d, m) = (half(b, 0), half(b, 2));
        let q = &b[4..20];
        let (mut s, mut t) = ([0.0; LANES], [0.0; LANES]);
        for g in 0..2 {
            group(&mut s, &mut t, &x[8 * g..], |l| {
                f32::from(q[8 * g + l] & 0xf)
            });
        }
        for g in 0..2 {
            group(&mut s, &mut t, &x[16 + 8 * g..], |l| {
                f32::from(q[8 * g + l] >> 4)
            });
        }
        add_scaled_offset(&mut acc, d, &s, m, &t);
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
fn dot_q4k(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0; LANES];
    for (b, x) in row.chunks_exact(144).zip(x.chunks_exact(256)) {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let scales = &b[4..16];
        for j in 0..4 {
            let q = &b[16 + 32 * j..16 + 32 * j + 32];
            let x = &x[64 * j..];
            for (sub, shift) in [(0, 0), (1, 4)] {
                let (sc, mn) = q4k_scale_min(2 * j + sub, scales);
                let (mut s, mut t) = ([0.0; LANES], [0.0; LANES]);
                for g in 0..4 {
                    group(&mut s, &mut t, &x[32 * sub + 8 * g..], |l| {
                        f32::from((q[8 * g + l] >> shift) & 0xf)
                    });
                }
                add_scaled_offset(&mut acc, d * f32::from(sc), &s, -(dmin * f32::from(mn)), &t);
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
fn dot_q6k(row: &[u8], x: &[f32]) -> f32 {
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

/// `out[i] = row(first + i) · x` for the rows of `w` (rows of `row_bytes` in `dtype`).
#[inline(always)]
fn dot_rows_inline(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let dot: fn(&[u8], &[f32]) -> f32 = match dtype {
        DType::F32 => dot_f32,
        DType::F16 => dot_f16,
        DType::Q4_0 => dot_q4_0,
        DType::Q4_1 => dot_q4_1,
        DType::Q8_0 => dot_q8_0,
        DType::Q4K => dot_q4k,
        DType::Q6K => dot_q6k,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot(&w[(first + i) * row_bytes..][..row_bytes], x);
    }
}

/// [`dot_rows_inline`] compiled for AVX2: the same operations, eight lanes at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_rows_avx2(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    x: &[f32],
    out: &mut [f32],
) {
    dot_rows_inline(dtype, w, row_bytes, first, x, out);
}

/// `out[i] = dot(row first + i of w, x)`: rows of `x.len()` elements in `dtype`, each
/// `row_bytes` long (the caller checked the sizes). Same bits on every x86-64 CPU.
pub fn dot_rows(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    first: usize,
    x: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above); the function is otherwise safe.
        unsafe { dot_rows_avx2(dtype, w, row_bytes, first, x, out) };
        return;
    }
    dot_rows_inline(dtype, w, row_bytes, first, x, out);
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
