//! Kernels on shapes wide enough that one task's work is cut in parts, between which it
//! checks whether the kernel is to stop: rows, heads and dot products longer than the
//! work between two checks, matrix products deep enough for several segments of their
//! depth, many inputs to one weight row. Their bits are pinned as the kernels gave them
//! before they checked inside a task, or compared with the whole computation's, and must
//! be the same on every thread count.

use super::llama_tests::{random_rows, words};
use super::tests::{bits, fingerprint, run_all, Rng};
use super::*;
use crate::backend::numbered;
use crate::kernel::{MatmulFlags, RopeStyle};

/// A row wider than the work between two checks: three parts, the last one short.
const W: usize = 40_000;

/// One fingerprint of every buffer a kernel left.
fn all_buffers(out: &[Vec<f32>]) -> u64 {
    out.iter()
        .fold(0, |h, b| h.rotate_left(17) ^ fingerprint(b))
}

/// `values` as the f32 words a buffer of u32 holds.
fn u32s(values: &[u32]) -> Vec<f32> {
    bytemuck::cast_slice(values).to_vec()
}

/// The fingerprints of every kernel that checks inside a task, on wide shapes.
fn wide_outputs() -> Vec<(String, u64)> {
    let mut rng = Rng(2024);
    let mut got = Vec::new();
    // The fingerprint of the first `kept` buffers a kernel left (or of them all).
    const ALL: usize = usize::MAX;
    let mut pin = |kept: usize, name: String, data: &[&[f32]], kernel: Kernel| {
        let out = run_all(data, &kernel);
        got.push((name, all_buffers(&out[..kept.min(out.len())])));
    };
    // One tile of one element and many segments; several segments of a small tile; and
    // several tiles of two segments each.
    for (m, n, k, bits) in [
        (1, 1, (1 << 19) + 777, 0u8),
        (24, 40, 70_000, 7),
        (130, 300, 3000, 0),
        (130, 300, 3000, 5),
    ] {
        let a = rng.vec(m * k, 1.0);
        let b = rng.vec(k * n, 1.0);
        let c = rng.vec(m * n, 1.0);
        let flags = MatmulFlags {
            transpose_a: bits & 1 != 0,
            transpose_b: bits & 2 != 0,
            accumulate: bits & 4 != 0,
        };
        let matmul = numbered::matmul(m, n, k, flags);
        pin(
            ALL,
            format!("matmul {m}x{n}x{k} flags {bits}"),
            &[&a, &b, &c],
            matmul,
        );
    }

    let x = rng.vec(3 * W, 4.0);
    let (x2, gain, bias) = (&x[..2 * W], rng.vec(W, 1.0), rng.vec(W, 1.0));
    let z = vec![0.0f32; 3 * W];
    let add_bias = Kernel::AddBias {
        x: 1,
        bias: 2,
        rows: 2,
        cols: W,
    };
    pin(ALL, "add_bias".into(), &[x2, &gain], add_bias);
    pin(
        ALL,
        "softmax".into(),
        &[x2, &z[..2 * W]],
        numbered::softmax(2, W),
    );
    let labels = u32s(&[5, W as u32 - 3]);
    pin(
        ALL,
        "cross_entropy".into(),
        &[x2, &labels, &z[..2 * W], &[0.0]],
        numbered::cross_entropy(2, W),
    );
    pin(
        ALL,
        "sum_rows".into(),
        &[x2, &z[..2]],
        numbered::sum_rows(2, W),
    );
    let tall = rng.vec(257 * 20_000, 1.0);
    pin(
        ALL,
        "sum_cols".into(),
        &[&tall, &z[..20_000]],
        numbered::sum_cols(257, 20_000),
    );
    pin(
        ALL,
        "layer_norm".into(),
        &[x2, &gain, &bias, &z[..2 * W]],
        numbered::layer_norm(2, W, 1e-5),
    );
    pin(
        ALL,
        "rms_norm".into(),
        &[x2, &gain, &z[..2 * W]],
        numbered::rms_norm(2, W, 1e-5),
    );
    let mut maxima = x.clone();
    maxima[W + 30_000] = f32::NAN;
    maxima[2 * W + 35_000] = 100.0;
    pin(
        ALL,
        "argmax".into(),
        &[&maxima, &z[..3]],
        numbered::argmax(3, W),
    );
    let ids = u32s(&[2, 0]);
    pin(
        ALL,
        "embedding".into(),
        &[&x, &ids, &z[..2 * W]],
        numbered::embedding(2, W, 3),
    );
    let dim = 40_960;
    for dtype in DType::ALL {
        let table = words(&random_rows(&mut rng, dtype, 2, dim));
        let ids = u32s(&[1, 0]);
        let out = vec![f32::NAN; 2 * dim];
        pin(
            ALL,
            format!("qembedding {}", dtype.name()),
            &[&table, &ids, &out],
            numbered::qembedding(2, dim, 2, dtype),
        );
    }
    let (src, dst) = (rng.vec(300_010, 1.0), vec![f32::NAN; 300_010]);
    let copy = Kernel::Copy {
        src: 1,
        src_offset: 7,
        dst: 2,
        dst_offset: 3,
        n: 300_000,
    };
    pin(ALL, "copy".into(), &[&src, &dst], copy);
    for style in [RopeStyle::Adjacent, RopeStyle::HalfSplit] {
        for (rows, heads, head_dim) in [(2, 1, W), (1, 3000, 16)] {
            let rope = Kernel::Rope {
                x: 1,
                factors: 2,
                rows,
                heads,
                head_dim,
                pos: 5,
                base: 10_000.0,
                style,
            };
            let x = rng.vec(rows * heads * head_dim, 1.0);
            // Factors of 1 give the bits of plain rope (pinned before there were
            // factors): the fingerprint is of `x` alone.
            let ones = vec![1.0; head_dim / 2];
            let name = format!("rope {rows}x{heads}x{head_dim} {style:?}");
            pin(1, name, &[&x, &ones], rope);
            // Llama 3.1's shape of factors, 1 to 8.
            let last = (head_dim / 2 - 1) as f32;
            let factors: Vec<f32> = (0..head_dim / 2)
                .map(|i| 1.0 + 7.0 * (i as f32 / last).powi(2))
                .collect();
            let name = format!("rope {rows}x{heads}x{head_dim} {style:?}, factors");
            pin(ALL, name, &[&x, &factors], rope);
        }
    }
    for (heads, head_dim, len) in [(1, W, 3), (2, 64, 20_000)] {
        let q = rng.vec(heads * head_dim, 1.0);
        let kc = rng.vec(len * heads * head_dim, 1.0);
        let vc = rng.vec(len * heads * head_dim, 1.0);
        pin(
            ALL,
            format!("attention_decode {heads}x{head_dim} over {len}"),
            &[&q, &kc, &vc, &vec![f32::NAN; heads * head_dim]],
            numbered::attention_decode(heads, head_dim, len),
        );
    }
    for (rows, heads, kv_heads, head_dim, pos) in [(1, 2, 1, W, 4), (2, 4, 2, 64, 30_000)] {
        let q = rng.vec(rows * heads * head_dim, 1.0);
        let kc = rng.vec((pos + rows) * kv_heads * head_dim, 1.0);
        let vc = rng.vec((pos + rows) * kv_heads * head_dim, 1.0);
        let attention = numbered::attention(rows, heads, kv_heads, head_dim, pos);
        pin(
            ALL,
            format!("attention {rows}x{heads}/{kv_heads}x{head_dim} at {pos}"),
            &[&q, &kc, &vc, &vec![f32::NAN; rows * heads * head_dim]],
            attention,
        );
    }
    // Rows of a quarter million elements, one input and a group of them; and many inputs
    // to short rows.
    for dtype in DType::ALL {
        for (n, k, m) in [(3, 263_168, 1), (3, 263_168, 5), (50, 256, 300)] {
            let w = words(&random_rows(&mut rng, dtype, n, k));
            let x = rng.vec(m * k, 1.0);
            let qmatmul = Kernel::QMatmul {
                w: 1,
                x: 2,
                out: 3,
                n,
                k,
                m,
                dtype,
            };
            pin(
                ALL,
                format!("qmatmul {} {n}x{k} by {m}", dtype.name()),
                &[&w, &x, &vec![f32::NAN; m * n]],
                qmatmul,
            );
        }
    }
    got
}

#[test]
fn kernels_cut_in_parts_keep_their_bits() {
    let got = wide_outputs();
    for (name, h) in &got {
        eprintln!("(\"{name}\", {h:#018x}),");
    }
    // As the kernels gave them when a task ran whole, without a check inside.
    let pinned: &[(&str, u64)] = &[
        ("matmul 1x1x525065 flags 0", 0xd40303686ce6b9ac),
        ("matmul 24x40x70000 flags 7", 0x103c5951e770f611),
        ("matmul 130x300x3000 flags 0", 0x7bd3ba97bdf77f77),
        ("matmul 130x300x3000 flags 5", 0x73ba1cf3e3f1d8cf),
        ("add_bias", 0x7095de225ab5ceb1),
        ("softmax", 0xa87d74a98902d3d7),
        ("cross_entropy", 0xeecdbf4988b1c9c4),
        ("sum_rows", 0x02d2b91832ff30a8),
        ("sum_cols", 0x238d8014a697a8a0),
        ("layer_norm", 0x581f771de77b6278),
        ("rms_norm", 0xf1aaf12ad9347ccf),
        ("argmax", 0x00a5486a5236e920),
        ("embedding", 0x2f823656c2a9232a),
        ("qembedding f32", 0xf4d733c4f43cb8b0),
        ("qembedding f16", 0x3116130347f374e3),
        ("qembedding q4_0", 0xe250d31dae4fd0d7),
        ("qembedding q4_1", 0xd706b7bc525789e7),
        ("qembedding q8_0", 0x1b3490d3666d78e8),
        ("qembedding q4_k", 0x0c02dc67d7a922a1),
        ("qembedding q6_k", 0xab3ce498bde47a3c),
        ("copy", 0x56fbadfe14ceb5c3),
        ("rope 2x1x40000 Adjacent", 0x8541adc846e6d6cb),
        // Kernel version 2's, with factors.
        ("rope 2x1x40000 Adjacent, factors", 0x9dd27801c76db666),
        ("rope 1x3000x16 Adjacent", 0xef2e24421f03e185),
        ("rope 1x3000x16 Adjacent, factors", 0x92d467353502ae3d),
        ("rope 2x1x40000 HalfSplit", 0x2e2e0bc7c29df2b4),
        ("rope 2x1x40000 HalfSplit, factors", 0x4867b9541871a4da),
        ("rope 1x3000x16 HalfSplit", 0x7def613cdc134880),
        ("rope 1x3000x16 HalfSplit, factors", 0x23374189ec0cf8e4),
        ("attention_decode 1x40000 over 3", 0x18df1fb456be6d9b),
        ("attention_decode 2x64 over 20000", 0x4aa14c21baac7d99),
        ("attention 1x2/1x40000 at 4", 0x539fff37b139dc78),
        ("attention 2x4/2x64 at 30000", 0xdba511329c06db8f),
        ("qmatmul f32 3x263168 by 1", 0x672bd14af30ac352),
        ("qmatmul f32 3x263168 by 5", 0x2ecbf0d2c06b775e),
        ("qmatmul f32 50x256 by 300", 0x2f431ee6b3bef514),
        ("qmatmul f16 3x263168 by 1", 0xc8485f3429b321dc),
        ("qmatmul f16 3x263168 by 5", 0x888c0ec57cb49538),
        ("qmatmul f16 50x256 by 300", 0xeaba4382b2d83241),
        ("qmatmul q4_0 3x263168 by 1", 0x025ca8254708602e),
        ("qmatmul q4_0 3x263168 by 5", 0x93c2e046b26b98e6),
        ("qmatmul q4_0 50x256 by 300", 0x6d62f9d8f41a0d91),
        ("qmatmul q4_1 3x263168 by 1", 0xbca8e52bce6123cb),
        ("qmatmul q4_1 3x263168 by 5", 0xb05acfdf7b0e16ae),
        ("qmatmul q4_1 50x256 by 300", 0x74273be16ec1250e),
        ("qmatmul q8_0 3x263168 by 1", 0x785bd604609d1b49),
        ("qmatmul q8_0 3x263168 by 5", 0xb1eaf97e8ef3a98b),
        ("qmatmul q8_0 50x256 by 300", 0xc8d34959d0070f22),
        ("qmatmul q4_k 3x263168 by 1", 0x1b8faba6206459d6),
        ("qmatmul q4_k 3x263168 by 5", 0x5276d5a83ea658e9),
        ("qmatmul q4_k 50x256 by 300", 0x39814ff40b44d4c2),
        ("qmatmul q6_k 3x263168 by 1", 0xb924d9a59b8677f1),
        ("qmatmul q6_k 3x263168 by 5", 0x0cb0af8c00f1a0a5),
        ("qmatmul q6_k 50x256 by 300", 0x6686537f9a190f48),
    ];
    let got: Vec<(&str, u64)> = got.iter().map(|(n, h)| (n.as_str(), *h)).collect();
    assert_eq!(got, pinned);
}

#[test]
fn wide_rows_and_heads_with_a_tail_give_the_bits_of_the_whole_computation() {
    let mut rng = Rng(77);
    // QMATMUL rows of f32 and f16 weights longer than `quant::WIDE_ROW`, with elements
    // after their last group of eight, against one whole dot product of each row.
    let (n, k) = (2, quant::WIDE_ROW + 13);
    for dtype in [DType::F32, DType::F16] {
        let w = random_rows(&mut rng, dtype, n, k);
        let x = rng.vec(k, 1.0);
        let qmatmul = Kernel::QMatmul {
            w: 1,
            x: 2,
            out: 3,
            n,
            k,
            m: 1,
            dtype,
        };
        let out = &run_all(&[&words(&w), &x, &[f32::NAN; 2]], &qmatmul)[2];
        let row_bytes = dtype.row_bytes(k as u64).unwrap() as usize;
        let mut whole = vec![f32::NAN; n];
        quant::dot_rows(
            dtype,
            &w,
            row_bytes,
            0,
            &quant::prepare(&x),
            &mut whole,
            quant::Simd::best(),
        );
        assert_eq!(bits(out), bits(&whole), "{}", dtype.name());
    }
    // An ATTENTION head wider than the widest attended whole, with a tail after its
    // groups of eight, over positions that are not a whole number of groups.
    let (hd, pos) = (40_003, 5);
    let q = rng.vec(hd, 1.0);
    let kc = rng.vec((pos + 1) * hd, 1.0);
    let vc = rng.vec((pos + 1) * hd, 1.0);
    let attention = Kernel::Attention {
        q: 1,
        k_cache: 2,
        v_cache: 3,
        out: 4,
        rows: 1,
        heads: 1,
        kv_heads: 1,
        head_dim: hd,
        pos,
    };
    let out = &run_all(&[&q, &kc, &vc, &vec![f32::NAN; hd]], &attention)[3];
    let head = ops::AttendedHead {
        q: &q,
        kc: &kc,
        vc: &vc,
        stride: hd,
        len: pos + 1,
        scale: (1.0 / (hd as f64).sqrt()) as f32,
    };
    let mut whole = vec![f32::NAN; hd];
    ops::attend(&head, &mut whole, true);
    assert_eq!(bits(out), bits(&whole));
}
