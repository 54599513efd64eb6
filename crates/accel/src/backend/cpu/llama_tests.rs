//! The GGML block formats and the llama operators against f64 references written from
//! the formats' definitions, bit-identical across thread counts.
//!
//! Error bounds (per output element):
//! - QMATMUL: `(k/4 + 16) · 2^-24 · Σ_i mag_i·|x_i|`, where `mag_i` is the size of the
//!   terms weight `i` is made of (`|d·q| + |m|` for formats with a minimum, `|w_i|`
//!   otherwise): f32 lanes accumulate block sums, so cancellation between a block's scaled
//!   sum and its minimum's term is the worst case; plus, for the block formats, whose
//!   inputs are rounded to 16 bits per 32 elements, `Σ_i mag_i · d_b / 2` with `d_b` the
//!   input step of element `i`'s block (`max|x| / 32767`);
//! - QEMBEDDING (dequantization): `2 · 2^-24 · mag_i` (one or two f32 roundings);
//! - RMS_NORM, SWIGLU: `1e-6` relative (+`1e-30` absolute);
//! - ROPE: `1e-6 · (|x_a| + |x_b|)` for each rotated pair;
//! - ATTENTION: `1e-5 · max|v|` (f32 sums of at most a few hundred positions).

use super::quant::f16_to_f32;
use super::tests::{backend, bits, close, read, run_all, Rng};
use super::*;
use crate::backend::numbered;
use crate::kernel::{DType, RopeStyle};

/// The bytes of a buffer holding `bytes` (padded to whole f32 words).
pub(super) fn words(bytes: &[u8]) -> Vec<f32> {
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(4) * 4, 0);
    bytemuck::cast_slice(&padded).to_vec()
}

/// A random normal half float of magnitude 2^-10 .. 2^-2 and random sign.
fn scale_f16(rng: &mut Rng) -> [u8; 2] {
    let exp = 5 + rng.below(9) as u16; // biased 5..=13
    let bits = ((rng.below(2) as u16) << 15) | (exp << 10) | rng.below(1024) as u16;
    bits.to_le_bytes()
}

/// `rows` random rows of `cols` elements in `dtype`, with sane scales.
pub(super) fn random_rows(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = dtype.bytes(rows as u64, cols as u64).unwrap() as usize;
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.below(256) as u8).collect();
    let block = dtype.block_bytes() as usize;
    for b in out.chunks_exact_mut(block) {
        match dtype {
            DType::F32 => b.copy_from_slice(&rng.f32(2.0).to_le_bytes()),
            DType::F16 => b.copy_from_slice(&scale_f16(rng)),
            DType::Q4_0 | DType::Q8_0 => b[0..2].copy_from_slice(&scale_f16(rng)),
            DType::Q4_1 | DType::Q4K => {
                b[0..2].copy_from_slice(&scale_f16(rng));
                b[2..4].copy_from_slice(&scale_f16(rng));
            }
            DType::Q6K => b[208..210].copy_from_slice(&scale_f16(rng)),
        }
    }
    out
}

fn h(b: &[u8], at: usize) -> f64 {
    f64::from(f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]])))
}

/// One row dequantized in f64 from the GGML definitions: each element's value and the
/// size of the terms it is made of.
fn reference_row(dtype: DType, row: &[u8], cols: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(cols);
    let plain = |v: f64| (v, v.abs());
    for e in 0..cols {
        let be = dtype.block_elems() as usize;
        let b = &row[e / be * dtype.block_bytes() as usize..];
        let j = e % be;
        out.push(match dtype {
            DType::F32 => plain(f64::from(f32::from_le_bytes(
                row[4 * e..4 * e + 4].try_into().unwrap(),
            ))),
            DType::F16 => plain(h(row, 2 * e)),
            DType::Q8_0 => plain(h(b, 0) * f64::from(b[2 + j] as i8)),
            DType::Q4_0 => {
                let q = if j < 16 {
                    b[2 + j] & 15
                } else {
                    b[2 + j - 16] >> 4
                };
                plain(h(b, 0) * (f64::from(q) - 8.0))
            }
            DType::Q4_1 => {
                let q = if j < 16 {
                    b[4 + j] & 15
                } else {
                    b[4 + j - 16] >> 4
                };
                let (dq, m) = (h(b, 0) * f64::from(q), h(b, 2));
                (dq + m, dq.abs() + m.abs())
            }
            DType::Q4K => {
                // Sub-block `sb` of 32; 64-element chunk `sb / 2`, low then high nibbles.
                let sb = j / 32;
                let s = &b[4..16];
                let (sc, mn) = if sb < 4 {
                    (s[sb] & 63, s[sb + 4] & 63)
                } else {
                    (
                        (s[sb + 4] & 15) | ((s[sb - 4] >> 6) << 4),
                        (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4),
                    )
                };
                let byte = b[16 + 32 * (sb / 2) + j % 32];
                let q = if sb.is_multiple_of(2) {
                    byte & 15
                } else {
                    byte >> 4
                };
                let dq = h(b, 0) * f64::from(sc) * f64::from(q);
                let m = h(b, 2) * f64::from(mn);
                (dq - m, dq.abs() + m.abs())
            }
            DType::Q6K => {
                let (half, within) = (j / 128, j % 128);
                let (quarter, l) = (within / 32, within % 32);
                let ql = &b[64 * half..];
                let qh = b[128 + 32 * half + l];
                let low = match quarter {
                    0 => ql[l] & 15,
                    1 => ql[l + 32] & 15,
                    2 => ql[l] >> 4,
                    _ => ql[l + 32] >> 4,
                };
                let q = i32::from(low | (((qh >> (2 * quarter)) & 3) << 4)) - 32;
                let sc = b[192 + 8 * half + l / 16 + 2 * quarter] as i8;
                plain(h(b, 208) * f64::from(sc) * f64::from(q))
            }
        });
    }
    out
}

/// Runs QMATMUL of `n×k` random weights in `dtype` with `m` input rows, checks it against
/// the f64 reference and returns the output.
fn check_qmatmul(rng: &mut Rng, dtype: DType, n: usize, k: usize, m: usize) -> Vec<f32> {
    let w = random_rows(rng, dtype, n, k);
    let x = rng.vec(m * k, 1.0);
    let kernel = Kernel::QMatmul {
        w: 1,
        x: 2,
        out: 3,
        n,
        k,
        m,
        dtype,
    };
    let out = run_all(&[&words(&w), &x, &vec![f32::NAN; m * n]], &kernel)[2].clone();
    let row_bytes = dtype.row_bytes(k as u64).unwrap() as usize;
    let refs: Vec<_> = (0..n)
        .map(|i| reference_row(dtype, &w[i * row_bytes..][..row_bytes], k))
        .collect();
    let blocked = !matches!(dtype, DType::F32 | DType::F16);
    for r in 0..m {
        let xr = &x[r * k..][..k];
        // The input step of each element's block of 32.
        let step: Vec<f64> = xr
            .chunks(32)
            .flat_map(|b| {
                let amax = b.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                std::iter::repeat_n(amax / 32767.0, b.len())
            })
            .collect();
        for (i, row) in refs.iter().enumerate() {
            let want: f64 = row.iter().zip(xr).map(|(w, &x)| w.0 * f64::from(x)).sum();
            let mag: f64 = row
                .iter()
                .zip(xr)
                .map(|(w, &x)| w.1 * f64::from(x).abs())
                .sum();
            let rounding: f64 = if blocked {
                row.iter().zip(&step).map(|(w, s)| w.1 * s / 2.0).sum()
            } else {
                0.0
            };
            let tol = (k as f64 / 4.0 + 16.0) * 2f64.powi(-24) * mag + rounding;
            close(dtype.name(), r * n + i, out[r * n + i], want, tol);
        }
    }
    out
}

#[test]
fn qmatmul_matches_the_formats_definitions() {
    let mut rng = Rng(21);
    for dtype in DType::ALL {
        let be = dtype.block_elems() as usize;
        // One block, several blocks, a matrix large enough to split over threads, and
        // rows of inputs (a prompt).
        for (n, k, m) in [
            (1, be, 1),
            (7, 3 * be.max(32), 1),
            (300, 2 * be.max(64), 1),
            (5, be.max(32), 3),
        ] {
            check_qmatmul(&mut rng, dtype, n, k, m);
        }
    }
}

#[test]
fn qmatmul_rows_of_a_batch_equal_single_rows() {
    // A prompt's rows give bit for bit what decoding them one at a time gives.
    let mut rng = Rng(5);
    let (n, k, m) = (96, 256, 4);
    let w = random_rows(&mut rng, DType::Q4K, n, k);
    let x = rng.vec(m * k, 1.0);
    let batch = {
        let mut b = backend(2, &[&words(&w), &x, &vec![0.0; m * n]]);
        b.launch(&Kernel::QMatmul {
            w: 1,
            x: 2,
            out: 3,
            n,
            k,
            m,
            dtype: DType::Q4K,
        })
        .unwrap();
        read(&b, 3)
    };
    for r in 0..m {
        let mut b = backend(1, &[&words(&w), &x[r * k..][..k], &vec![0.0; n]]);
        b.launch(&Kernel::QMatmul {
            w: 1,
            x: 2,
            out: 3,
            n,
            k,
            m: 1,
            dtype: DType::Q4K,
        })
        .unwrap();
        let single = read(&b, 3);
        assert!(
            super::tests::bits(&single) == super::tests::bits(&batch[r * n..][..n]),
            "row {r}"
        );
    }
}

#[test]
fn half_floats_convert_exactly() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
    assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
    // Positive finite halves are strictly increasing in their bits.
    for b in 1..0x7c00u16 {
        assert!(f16_to_f32(b) > f16_to_f32(b - 1), "{b:#x}");
    }
}

#[test]
fn qembedding_dequantizes_the_rows_asked_for() {
    let mut rng = Rng(8);
    for dtype in DType::ALL {
        let dim = dtype.block_elems().max(32) as usize * 2;
        let vocab = 11;
        let table = random_rows(&mut rng, dtype, vocab, dim);
        let ids: Vec<u32> = vec![3, 0, 10, 3];
        let kernel = numbered::qembedding(ids.len(), dim, vocab, dtype);
        let id_words: Vec<f32> = ids.iter().map(|&i| f32::from_bits(i)).collect();
        let out = run_all(&[&words(&table), &id_words, &vec![0.0; 4 * dim]], &kernel)[2].clone();
        let row_bytes = dtype.row_bytes(dim as u64).unwrap() as usize;
        for (r, &id) in ids.iter().enumerate() {
            let want = reference_row(dtype, &table[id as usize * row_bytes..][..row_bytes], dim);
            for (c, (v, mag)) in want.iter().enumerate() {
                close(
                    dtype.name(),
                    r * dim + c,
                    out[r * dim + c],
                    *v,
                    2.0 * 2f64.powi(-24) * mag,
                );
            }
        }
        // An id beyond the vocabulary is the data's fault, found while running.
        let mut b = backend(1, &[&words(&table), &[f32::from_bits(11)], &vec![0.0; dim]]);
        let bad = numbered::qembedding(1, dim, vocab, dtype);
        assert!(matches!(b.launch(&bad), Err(BackendError::BadData(_))));
    }
}

#[test]
fn rms_norm_and_swiglu_match() {
    let mut rng = Rng(3);
    let (rows, cols) = (5, 576);
    let x = rng.vec(rows * cols, 3.0);
    let w = rng.vec(cols, 1.0);
    let out = run_all(
        &[&x, &w, &vec![0.0; rows * cols]],
        &numbered::rms_norm(rows, cols, 1e-5),
    )[2]
    .clone();
    for r in 0..rows {
        let row = &x[r * cols..][..cols];
        let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            let want = f64::from(row[c]) / (ms + 1e-5).sqrt() * f64::from(w[c]);
            close(
                "rms_norm",
                r * cols + c,
                out[r * cols + c],
                want,
                1e-6 * want.abs() + 1e-30,
            );
        }
    }
    let n = 40_000;
    let (g, u) = (rng.vec(n, 12.0), rng.vec(n, 2.0));
    let out = run_all(&[&g, &u, &vec![0.0; n]], &numbered::swiglu(n))[2].clone();
    for i in 0..n {
        let (gv, uv) = (f64::from(g[i]), f64::from(u[i]));
        let want = gv / (1.0 + (-gv).exp()) * uv;
        close("swiglu", i, out[i], want, 1e-6 * want.abs() + 1e-30);
    }
}

#[test]
fn rope_rotates_the_pairs_of_each_style() {
    let mut rng = Rng(4);
    let (rows, heads, hd, pos, base) = (3, 4, 64, 4093, 100_000.0f32);
    let x = rng.vec(rows * heads * hd, 2.0);
    let ones = vec![1.0; hd / 2];
    // Llama 3.1's shape of factors: 1 for the fast pairs, up to 8 for the slow ones.
    let llama31: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 + 7.0 * (i * i) as f32 / 961.0)
        .collect();
    for factors in [&ones, &llama31] {
        for style in [RopeStyle::Adjacent, RopeStyle::HalfSplit] {
            let kernel = Kernel::Rope {
                x: 1,
                factors: 2,
                rows,
                heads,
                head_dim: hd,
                pos,
                base,
                style,
            };
            let out = run_all(&[&x, factors], &kernel)[0].clone();
            for r in 0..rows {
                for head in 0..heads {
                    let at = (r * heads + head) * hd;
                    for (i, &factor) in factors.iter().enumerate() {
                        let (a, b) = match style {
                            RopeStyle::Adjacent => (at + 2 * i, at + 2 * i + 1),
                            RopeStyle::HalfSplit => (at + i, at + i + hd / 2),
                        };
                        let theta = (pos + r) as f64
                            * f64::from(base).powf(-((2 * i) as f64) / hd as f64)
                            / f64::from(factor);
                        let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
                        let tol = 1e-6 * (x0.abs() + x1.abs());
                        close("rope", a, out[a], x0 * theta.cos() - x1 * theta.sin(), tol);
                        close("rope", b, out[b], x0 * theta.sin() + x1 * theta.cos(), tol);
                    }
                }
            }
        }
    }
}

/// One-row ROPEs on one backend, which keeps the last one's rotations, end as each alone
/// on a fresh backend: a launch at another position, base, width or with other factors
/// (the same buffer rewritten) does not reuse the rotations kept.
#[test]
fn rope_rotations_kept_between_launches_are_those_asked_for() {
    let mut rng = Rng(40);
    let (heads, hd) = (3, 16);
    let x = rng.vec(heads * hd, 2.0);
    let ones = vec![1.0f32; hd / 2];
    let mut other = ones.clone();
    other[5] = 4.0;
    let rope = |pos, base, head_dim| Kernel::Rope {
        x: 1,
        factors: 2,
        rows: 1,
        heads: heads * hd / head_dim,
        head_dim,
        pos,
        base,
        style: RopeStyle::Adjacent,
    };
    let launches = [
        (rope(7, 10_000.0, hd), &ones),
        (rope(7, 10_000.0, hd), &ones),
        (rope(8, 10_000.0, hd), &ones),
        (rope(8, 10_000.0, hd), &other),
        (rope(8, 500_000.0, hd), &other),
        (rope(8, 500_000.0, hd / 2), &other),
    ];
    let mut kept = backend(2, &[&x, &ones]);
    for (i, (kernel, factors)) in launches.iter().enumerate() {
        kept.write(1, 0, bytemuck::cast_slice(&x));
        kept.write(2, 0, bytemuck::cast_slice(factors.as_slice()));
        kept.launch(kernel).unwrap();
        let alone = run_all(&[&x, factors], kernel);
        assert_eq!(
            bits(&read(&kept, 1)),
            bits(&alone[0]),
            "launch {i}, {kernel:?}, rotated by the rotations kept from the one before"
        );
    }
}

/// Causal GQA attention in f64.
fn attention_ref(q: &[f32], kc: &[f32], vc: &[f32], s: ops::GqaShape) -> Vec<f64> {
    let hd = s.head_dim;
    let mut out = vec![0.0; s.rows * s.heads * hd];
    for r in 0..s.rows {
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            let qv = &q[(r * s.heads + h) * hd..][..hd];
            let len = s.pos + r + 1;
            let scores: Vec<f64> = (0..len)
                .map(|p| {
                    let k = &kc[(p * s.kv_heads + kvh) * hd..][..hd];
                    qv.iter()
                        .zip(k)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (p, w) in e.iter().enumerate() {
                let v = &vc[(p * s.kv_heads + kvh) * hd..][..hd];
                for d in 0..hd {
                    out[(r * s.heads + h) * hd + d] += w / sum * f64::from(v[d]);
                }
            }
        }
    }
    out
}

#[test]
fn attention_is_causal_grouped_query_attention() {
    let mut rng = Rng(6);
    let s = ops::GqaShape {
        rows: 4,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        pos: 37,
    };
    let positions = s.pos + s.rows + 5; // the cache holds more than is attended to
    let q = rng.vec(s.rows * s.heads * s.head_dim, 2.0);
    let kc = rng.vec(positions * s.kv_heads * s.head_dim, 2.0);
    let vc = rng.vec(positions * s.kv_heads * s.head_dim, 1.0);
    let kernel = |rows, pos| Kernel::Attention {
        q: 1,
        k_cache: 2,
        v_cache: 3,
        out: 4,
        rows,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        pos,
    };
    let width = s.heads * s.head_dim;
    let out = run_all(
        &[&q, &kc, &vc, &vec![0.0; s.rows * width]],
        &kernel(s.rows, s.pos),
    )[3]
    .clone();
    let want = attention_ref(&q, &kc, &vc, s);
    for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
        close("attention", i, o, w, 1e-5);
    }
    // Row r of the batch equals a single query at position pos + r, bit for bit: the
    // positions after it (in the cache already) are masked.
    for r in 0..s.rows {
        let mut b = backend(2, &[&q[r * width..][..width], &kc, &vc, &vec![0.0; width]]);
        b.launch(&kernel(1, s.pos + r)).unwrap();
        assert!(
            super::tests::bits(&read(&b, 4)) == super::tests::bits(&out[r * width..][..width]),
            "row {r}"
        );
    }
}

/// `n` random rows of four blocks (at least 128 elements) of `dtype` weights, their
/// length in elements and in bytes: the dot product tests' matrix.
fn dot_matrix(rng: &mut Rng, dtype: DType, n: usize) -> (Vec<u8>, usize, usize) {
    let k = dtype.block_elems().max(32) as usize * 4;
    let row_bytes = dtype.row_bytes(k as u64).unwrap() as usize;
    (random_rows(rng, dtype, n, k), k, row_bytes)
}

/// Whether this CPU lacks AVX2, said loudly for test `name`, which then has no AVX2 code
/// to compare with the portable code.
fn lacks_avx2(name: &str) -> bool {
    if super::quant::has_avx2() {
        return false;
    }
    ferry_testdata::cannot_run_here(name, "no AVX2 here");
    true
}

#[test]
fn every_dot_product_code_gives_the_portable_codes_bits() {
    let name = "every_dot_product_code_gives_the_portable_codes_bits";
    if lacks_avx2(name) {
        return;
    }
    if !super::quant::has_avx512() {
        ferry_testdata::cannot_run_here(name, "no AVX-512 here: its code is not compared");
    }
    let mut rng = Rng(13);
    for dtype in DType::ALL {
        // 15 fours, a pair and one: each way the AVX-512 code takes rows.
        let n = 63;
        let (w, k, row_bytes) = dot_matrix(&mut rng, dtype, n);
        // Inputs with zeros and signed zeros, where a differing order of operations
        // would show in the sign of a zero.
        let mut x = rng.vec(k, 3.0);
        for v in x.iter_mut().step_by(5) {
            *v = -0.0;
        }
        let input = super::quant::prepare(&x);
        let run = |code| {
            let mut out = vec![0.0f32; n];
            super::quant::dot_rows(dtype, &w, row_bytes, 0, &input, &mut out, code);
            super::tests::bits(&out)
        };
        let portable = run(super::quant::Simd::Portable);
        for code in super::quant::Simd::here() {
            assert_eq!(run(code), portable, "{} by {code:?}", dtype.name());
        }
    }
}

#[test]
fn avx2_and_portable_attention_give_the_same_bits() {
    if lacks_avx2("avx2_and_portable_attention_give_the_same_bits") {
        return;
    }
    let mut rng = Rng(14);
    // A long context; a head width with a tail after its groups of eight; widths of one
    // group of eight, of a group more than the 64 elements the AVX2 code keeps in
    // registers, and of twice 64; contexts of one position, of one whole group of eight
    // positions and of part groups. Then, on contexts of several groups: a score far
    // above the others, one far below (a weight of zero) and a NaN value; and a NaN key
    // (every weight NaN).
    const NONE: u8 = 0;
    const FAR: u8 = 1;
    const NAN_KEY: u8 = 2;
    let shapes = [
        (64, 300, NONE),
        (20, 7, NONE),
        (8, 10, NONE),
        (72, 42, NONE),
        (128, 18, NONE),
        (64, 9, NONE),
        (64, 2, NONE),
        (64, 41, FAR),
        (64, 17, NAN_KEY),
    ];
    for (hd, len, outliers) in shapes {
        let stride = 3 * hd;
        let q = rng.vec(hd, 2.0);
        let mut kc = rng.vec(len * stride, 2.0);
        let mut vc = rng.vec(len * stride, 1.0);
        // The head's cache starts at element `hd`; position `p`'s key at `p · stride`.
        let at = |p: usize, i: usize| hd + p * stride + i;
        match outliers {
            FAR => {
                kc[at(3, 3)] = q[3].signum() * 30.0;
                kc[at(20, 3)] = -q[3].signum() * 3e7;
                vc[at(11, 1)] = f32::NAN;
            }
            NAN_KEY => kc[at(5, 2)] = f32::NAN,
            _ => {}
        }
        let head = ops::AttendedHead {
            q: &q,
            kc: &kc[hd..],
            vc: &vc[hd..],
            stride,
            len: len - 1,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let run = |avx2| {
            let mut out = vec![f32::NAN; hd];
            ops::attend(&head, &mut out, avx2);
            super::tests::bits(&out)
        };
        assert_eq!(run(true), run(false), "head width {hd}");
    }
}

#[test]
fn avx2_and_portable_swiglu_give_the_same_bits() {
    if lacks_avx2("avx2_and_portable_swiglu_give_the_same_bits") {
        return;
    }
    let mut rng = Rng(15);
    // Gates from tiny to beyond the exponential's range (each sign), NaN and the
    // infinities; 1,003 elements, so a tail after the groups of eight.
    let mut gate = rng.vec(1003, 4.0);
    for (i, g) in gate.iter_mut().enumerate().step_by(7) {
        *g *= [1e-30, 1e-3, 30.0, 300.0][i % 4];
    }
    gate[..5].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 104.5]);
    let up = rng.vec(1003, 2.0);
    let run = |avx2| {
        let mut out = vec![f32::NAN; gate.len()];
        ops::swiglu_part(&gate, &up, &mut out, avx2);
        super::tests::bits(&out)
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn dot_products_with_several_inputs_give_each_inputs_bits() {
    // Q4_0, Q4_1, Q8_0 and Q4_K unpack each weight row once for a group of inputs where
    // the CPU has AVX2;
    // every format must give the bits of one input at a time, for any count of inputs.
    let mut rng = Rng(17);
    for dtype in DType::ALL {
        let n = 24;
        let (w, k, row_bytes) = dot_matrix(&mut rng, dtype, n);
        let xs: Vec<Vec<f32>> = (0..9).map(|_| rng.vec(k, 3.0)).collect();
        for m in 1..=xs.len() {
            let inputs: Vec<_> = xs[..m].iter().map(|x| super::quant::prepare(x)).collect();
            let mut together = vec![0.0f32; n * m];
            super::quant::dot_inputs(dtype, &w, row_bytes, 0, &inputs, &mut together);
            for (r, inp) in inputs.iter().enumerate() {
                let mut alone = vec![0.0f32; n];
                let best = super::quant::Simd::best();
                super::quant::dot_rows(dtype, &w, row_bytes, 0, inp, &mut alone, best);
                let column: Vec<f32> = together.iter().skip(r).step_by(m).copied().collect();
                assert_eq!(
                    super::tests::bits(&column),
                    super::tests::bits(&alone),
                    "{} input {r} of {m}",
                    dtype.name()
                );
            }
        }
    }
}

#[test]
fn avx2_and_portable_inputs_give_the_same_bits() {
    if lacks_avx2("avx2_and_portable_inputs_give_the_same_bits") {
        return;
    }
    let mut rng = Rng(29);
    let specials = [
        -0.0,
        0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-45,
        -1e-45,
        f32::MAX,
        32766.5,
        0.5,
        -2.5,
    ];
    let mut x = rng.vec(64 * 32, 3.0);
    // Blocks all of one value, of signed zeros (their sums' signs), of a subnormal
    // largest magnitude (an infinite inverse), and with NaN and infinities among others.
    for (i, &v) in specials.iter().enumerate() {
        x[32 * i..32 * (i + 1)].fill(v);
        x[32 * (20 + i) + i] = v;
    }
    x[32 * 40..32 * 41]
        .iter_mut()
        .step_by(2)
        .for_each(|v| *v = -0.0);
    let prepared = |avx2| {
        let input = super::quant::prepare_with(&x, &mut super::Ticker::unchecked(), avx2);
        super::quant::input_bits(&input.expect("unchecked"))
    };
    assert_eq!(prepared(true), prepared(false));
}

#[test]
fn inputs_round_to_the_nearest_even_integer() {
    // The rounding the 16-bit inputs use, against Rust's own, on ties, near ties, signs
    // and the range's ends.
    let x: Vec<f32> = [
        0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 32766.5, -32766.5, 32767.0, 1e-8, -0.0,
    ]
    .into_iter()
    .chain((0..2000).map(|i| i as f32 * 16.38375 - 16383.0))
    .collect();
    let mut padded = x.clone();
    padded.resize(x.len().next_multiple_of(32), 0.0);
    for block in padded.chunks(32) {
        let input = super::quant::prepare(block);
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let inv = if amax > 0.0 { 32767.0 / amax } else { 0.0 };
        for (i, &v) in block.iter().enumerate() {
            let want = (v * inv).round_ties_even() as i16;
            assert_eq!(super::quant::input_q(&input)[i], want, "{v}");
        }
    }
}
