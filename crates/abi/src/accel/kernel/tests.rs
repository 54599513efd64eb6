//! Decoding, access sets and hostile launches of the kernel table.
extern crate std;

use std::collections::HashMap;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::accel::kernel as k;
use crate::accel::COMMAND_ARGS;

/// Buffers 1..=8 of 4096 bytes, 9 of 4 bytes, 10 of 64 KiB.
fn lens() -> HashMap<BufferId, u64> {
    let mut m: HashMap<BufferId, u64> = (1..=8).map(|id| (id, 4096)).collect();
    m.insert(9, 4);
    m.insert(10, 65536);
    m
}

fn dec(args: &[u64]) -> Result<Kernel, u32> {
    let lens = lens();
    let mut full = [0u64; COMMAND_ARGS];
    full[..args.len()].copy_from_slice(args);
    Kernel::decode(&full, |id| lens.get(&id).copied()).map(|(kernel, _)| kernel)
}

fn writes(kernel: &Kernel) -> Vec<(BufferId, core::ops::Range<u64>)> {
    kernel.access().unwrap().writes().collect()
}

fn reads(kernel: &Kernel) -> Vec<BufferId> {
    kernel.access().unwrap().reads().collect()
}

fn f(x: f32) -> u64 {
    u64::from(x.to_bits())
}

/// An ADAM launch over buffers `param, grad, m, v` of `n` elements, at step 1 with the
/// usual hyper-parameters.
fn adam([param, grad, m, v]: [u64; 4], n: u64) -> [u64; 11] {
    let (lr, beta1, beta2, eps) = (f(1e-3), f(0.9), f(0.999), f(1e-8));
    [k::ADAM, param, grad, m, v, n, lr, beta1, beta2, eps, 1]
}

#[test]
fn unknown_kernels() {
    assert_eq!(dec(&[0]), Err(status::BAD_KERNEL));
    assert_eq!(dec(&[29, 1, 2, 3, 4]), Err(status::BAD_KERNEL));
    assert_eq!(name(29), None);
    assert_eq!(KERNELS.len(), 28);
    assert_eq!(dec(&[u64::MAX]), Err(status::BAD_KERNEL));
    assert_eq!(Kernel::decode(&[], |_| Some(4096)), Err(status::BAD_KERNEL));
}

#[test]
fn accepts_good_launches() {
    let mm = dec(&[k::MATMUL, 1, 2, 3, 4, 5, 6, k::TRANSPOSE_B | k::ACCUMULATE]).unwrap();
    assert_eq!(
        mm,
        Kernel::Matmul {
            a: 1,
            b: 2,
            c: 3,
            m: 4,
            n: 5,
            k: 6,
            flags: MatmulFlags {
                transpose_a: false,
                transpose_b: true,
                accumulate: true
            }
        }
    );
    assert_eq!(writes(&mm), vec![(3, 0..80)]);
    assert_eq!(reads(&mm), vec![1, 2, 3]);
    // Both operands may be the same buffer.
    assert!(dec(&[k::MATMUL, 1, 1, 3, 32, 32, 32, 0]).is_ok());
    // Exactly full buffers.
    assert!(dec(&[k::MATMUL, 1, 2, 3, 32, 32, 32, 0]).is_ok());
    let copy = dec(&[k::COPY, 1, 3, 2, 5, 7]).unwrap();
    assert_eq!(writes(&copy), vec![(2, 20..48)]);
    assert_eq!(reads(&copy), vec![1]);
    let ce = dec(&[k::CROSS_ENTROPY, 1, 2, 3, 9, 4, 10]).unwrap();
    assert_eq!(writes(&ce), vec![(3, 0..160), (9, 0..4)]);
    let adam = dec(&adam([1, 2, 3, 4], 100)).unwrap();
    assert_eq!(writes(&adam), vec![(1, 0..400), (3, 0..400), (4, 0..400)]);
    assert_eq!(reads(&adam), vec![1, 2, 3, 4]);
    let rng = dec(&[k::RNG_FILL, 5, 1024, u64::MAX, u64::MAX, 1, f(0.02)]).unwrap();
    assert_eq!(writes(&rng), vec![(5, 0..4096)]);
    assert!(reads(&rng).is_empty());
    let att = dec(&[k::ATTENTION_DECODE, 1, 10, 10, 2, 4, 16, 256]).unwrap();
    assert_eq!(writes(&att), vec![(2, 0..256)]);
    assert_eq!(reads(&att), vec![1, 10]);
    let emb = dec(&[k::EMBEDDING, 10, 1, 2, 8, 16, 1024]).unwrap();
    assert_eq!(writes(&emb), vec![(2, 0..512)]);
    // The data conditions the entries declare, which every backend checks: embedding
    // ids below the vocabulary, labels below the classes; none elsewhere.
    let indices = |kernel: &Kernel| {
        let i = kernel.access().unwrap().indices()?;
        Some((i.buffer, i.count, i.bound))
    };
    assert_eq!(indices(&emb), Some((1, 8, 1024)));
    let qemb = dec(&[k::QEMBEDDING, 10, 1, 2, 4, 64, 16, DType::Q4_1.code()]).unwrap();
    assert_eq!(indices(&qemb), Some((1, 4, 16)));
    let ce = dec(&[k::CROSS_ENTROPY, 1, 2, 3, 4, 8, 10]).unwrap();
    assert_eq!(indices(&ce), Some((2, 8, 10)));
    assert_eq!(reads(&ce), vec![1, 2]);
    assert_eq!(indices(&att), None);
    let ln = dec(&[k::LAYER_NORM, 1, 2, 3, 4, 8, 128, f(1e-5)]).unwrap();
    assert_eq!(writes(&ln), vec![(4, 0..4096)]);
    assert_eq!(
        writes(&dec(&[k::SUM_COLS, 1, 9, 1000, 1]).unwrap()),
        vec![(9, 0..4)]
    );
    assert_eq!(
        writes(&dec(&[k::ARGMAX, 1, 2, 4, 256]).unwrap()),
        vec![(2, 0..16)]
    );
    assert_eq!(
        writes(&dec(&[k::SCALE, 1, 1024, f(-2.0)]).unwrap()),
        vec![(1, 0..4096)]
    );
    assert_eq!(
        writes(&dec(&[k::AXPY, 1, 2, 3, f(0.5)]).unwrap()),
        vec![(2, 0..12)]
    );
    assert!(dec(&[k::SGD, 1, 2, 1024, f(0.1)]).is_ok());
    for id in [k::ADD, k::MUL] {
        assert!(dec(&[id, 1, 1, 2, 1024]).is_ok());
    }
    for id in [k::RELU, k::GELU] {
        assert_eq!(writes(&dec(&[id, 1, 2, 7]).unwrap()), vec![(2, 0..28)]);
    }
    for id in [k::RELU_BACKWARD, k::GELU_BACKWARD] {
        assert_eq!(writes(&dec(&[id, 1, 2, 3, 7]).unwrap()), vec![(3, 0..28)]);
    }
    assert!(dec(&[k::ADD_BIAS, 1, 2, 4, 256]).is_ok());
    assert!(dec(&[k::SOFTMAX, 1, 2, 4, 256]).is_ok());
    assert!(dec(&[k::SUM_ROWS, 1, 2, 4, 256]).is_ok());
}

#[test]
fn rejects_bad_buffers() {
    for bad in [
        0,
        11,
        4096,
        4097,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ] {
        assert_eq!(
            dec(&[k::MATMUL, bad, 2, 3, 4, 4, 4, 0]),
            Err(status::BAD_BUFFER)
        );
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, bad, 4, 4, 4, 0]),
            Err(status::BAD_BUFFER)
        );
        assert_eq!(dec(&[k::COPY, 1, 0, bad, 0, 4]), Err(status::BAD_BUFFER));
        assert_eq!(
            dec(&[k::RNG_FILL, bad, 4, 0, 0, 0, 0]),
            Err(status::BAD_BUFFER)
        );
        assert_eq!(
            dec(&[k::ATTENTION_DECODE, 1, 2, 3, bad, 1, 1, 1]),
            Err(status::BAD_BUFFER)
        );
    }
}

#[test]
fn rejects_hostile_shapes() {
    let max = u64::MAX;
    // Zero dimensions.
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 0, 4, 4, 0]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(dec(&[k::ADD, 1, 2, 3, 0]), Err(status::BAD_SHAPE));
    assert_eq!(dec(&[k::COPY, 1, 0, 2, 0, 0]), Err(status::BAD_SHAPE));
    // u64::MAX everywhere.
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, max, max, max, 0]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(dec(&[k::ADD, 1, 2, 3, max]), Err(status::BAD_SHAPE));
    assert_eq!(dec(&[k::SCALE, 1, max, 0]), Err(status::BAD_SHAPE));
    // n * 4 overflows though n fits.
    assert_eq!(dec(&[k::RELU, 1, 2, 1 << 62]), Err(status::BAD_SHAPE));
    assert_eq!(
        dec(&[k::RNG_FILL, 1, max / 4 + 1, 0, 0, 0, 0]),
        Err(status::BAD_SHAPE)
    );
    // m * n * 4 overflows while each of m, n is small enough.
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 1 << 31, 1 << 31, 1, 0]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 1 << 32, 1 << 32, 1, 0]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(
        dec(&[k::SOFTMAX, 1, 2, 1 << 40, 1 << 30]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(
        dec(&[k::SUM_COLS, 1, 2, 1 << 40, 1 << 30]),
        Err(status::BAD_SHAPE)
    );
    // Three-way products.
    assert_eq!(
        dec(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1 << 21, 1 << 21, 1 << 21]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(
        dec(&[k::EMBEDDING, 1, 2, 3, 1, 1 << 62, 1]),
        Err(status::BAD_SHAPE)
    );
    assert_eq!(
        dec(&[k::CROSS_ENTROPY, 1, 2, 3, 4, 1, 1 << 32]),
        Err(status::BAD_SHAPE)
    );
}

#[test]
fn launches_asking_for_hours_of_work_are_refused() {
    // Buffers as large as a guest's device could hold: every range fits, the work alone
    // decides.
    let huge = |args: &[u64]| {
        let mut full = [0u64; COMMAND_ARGS];
        full[..args.len()].copy_from_slice(args);
        Kernel::decode(&full, |_| Some(1 << 40)).map(|(kernel, _)| kernel)
    };
    // 2^40 multiply-adds pass; one more row of them does not.
    assert!(huge(&[k::MATMUL, 1, 2, 3, 1 << 14, 1 << 13, 1 << 13, 0]).is_ok());
    assert_eq!(
        huge(&[k::MATMUL, 1, 2, 3, (1 << 14) + 1, 1 << 13, 1 << 13, 0]),
        Err(status::BAD_SHAPE)
    );
    let qmatmul = |m: u64| huge(&[k::QMATMUL, 1, 2, 3, 1 << 13, 1 << 13, m, DType::F32.code()]);
    assert!(qmatmul(1 << 14).is_ok());
    assert_eq!(qmatmul((1 << 14) + 1), Err(status::BAD_SHAPE));
    // A million one-wide heads over a million positions: 4 MiB buffers, 2^40 scores.
    assert_eq!(
        huge(&[k::ATTENTION, 1, 2, 3, 4, 1, 1 << 20, 1, 1, (1 << 20) - 1]),
        Err(status::BAD_SHAPE)
    );
    // A model's prompt batch of 32 rows over a 32 K context passes.
    assert!(huge(&[k::ATTENTION, 1, 2, 3, 4, 32, 32, 8, 128, 32 << 10]).is_ok());
    // No more positions than any context has.
    let most = MAX_POSITIONS as u64;
    assert!(huge(&[k::ATTENTION, 1, 2, 3, 4, 1, 1, 1, 64, most - 1]).is_ok());
    assert_eq!(
        huge(&[k::ATTENTION, 1, 2, 3, 4, 1, 1, 1, 64, most]),
        Err(status::BAD_SHAPE)
    );
    assert!(huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1, 64, most]).is_ok());
    assert_eq!(
        huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1, 64, most + 1]),
        Err(status::BAD_SHAPE)
    );
}

#[test]
fn attention_decode_asking_for_hours_of_work_is_refused() {
    // Buffers larger than the widest cache asked for: every range fits, the work alone
    // decides.
    let huge = |args: &[u64]| {
        let mut full = [0u64; COMMAND_ARGS];
        full[..args.len()].copy_from_slice(args);
        Kernel::decode(&full, |_| Some(1 << 44)).map(|(kernel, _)| kernel)
    };
    let decode = |heads: u64, head_dim: u64| {
        let len = MAX_POSITIONS as u64;
        huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, heads, head_dim, len])
    };
    // 64 heads of 64 over 2^22 positions, at 64² a score (the most a backend does for
    // a head that wide): exactly 2^40.
    assert_eq!(64 * (MAX_POSITIONS as u64) * 64 * 64, MAX_LAUNCH_WORK);
    assert!(decode(64, 64).is_ok());
    // One more head is past it, though every range fits and no width is too large.
    assert_eq!(decode(65, 64), Err(status::BAD_SHAPE));
    // Narrow heads cost 16 + 1024 a score, not 16².
    assert_eq!(SCORE_WORK, 1024);
    assert!(decode(252, 16).is_ok());
    assert_eq!(decode(253, 16), Err(status::BAD_SHAPE));
    // Hundreds of one-wide heads over a long context: about 2^41, in 8 GiB of each cache.
    assert_eq!(
        huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1 << 9, 1, 1 << 22]),
        Err(status::BAD_SHAPE)
    );
}

#[test]
fn rows_and_heads_wider_than_host_scratch_allows_are_refused() {
    // Buffers as large as a guest's device could hold: every range fits, the width alone
    // decides (a backend keeps scratch of the width per row or head in flight).
    let huge = |args: &[u64]| {
        let mut full = [0u64; COMMAND_ARGS];
        full[..args.len()].copy_from_slice(args);
        Kernel::decode(&full, |_| Some(1 << 40)).map(|(kernel, _)| kernel)
    };
    let (row, head) = (MAX_ROW as u64, MAX_HEAD_DIM as u64);
    assert!(huge(&[k::SOFTMAX, 1, 2, 3, row]).is_ok());
    assert_eq!(
        huge(&[k::SOFTMAX, 1, 2, 1, row + 1]),
        Err(status::BAD_SHAPE)
    );
    assert!(huge(&[k::CROSS_ENTROPY, 1, 2, 3, 4, 3, row]).is_ok());
    assert_eq!(
        huge(&[k::CROSS_ENTROPY, 1, 2, 3, 4, 1, row + 1]),
        Err(status::BAD_SHAPE)
    );
    // What one GPU thread sums alone, beyond any abort: a row's columns, a column's rows,
    // the mean loss over the rows.
    let eps = f(1e-5);
    let longest_runs: [(&[u64], &[u64]); 6] = [
        (
            &[k::SUM_ROWS, 1, 2, 3, row],
            &[k::SUM_ROWS, 1, 2, 1, row + 1],
        ),
        (
            &[k::SUM_COLS, 1, 2, row, 3],
            &[k::SUM_COLS, 1, 2, row + 1, 1],
        ),
        (
            &[k::LAYER_NORM, 1, 2, 3, 4, 3, row, eps],
            &[k::LAYER_NORM, 1, 2, 3, 4, 1, row + 1, eps],
        ),
        (
            &[k::RMS_NORM, 1, 2, 3, 3, row, eps],
            &[k::RMS_NORM, 1, 2, 3, 1, row + 1, eps],
        ),
        (&[k::ARGMAX, 1, 2, 3, row], &[k::ARGMAX, 1, 2, 1, row + 1]),
        (
            &[k::CROSS_ENTROPY, 1, 2, 3, 4, row, 3],
            &[k::CROSS_ENTROPY, 1, 2, 3, 4, row + 1, 1],
        ),
    ];
    for (widest, wider) in longest_runs {
        assert!(huge(widest).is_ok(), "{widest:?}");
        assert_eq!(huge(wider), Err(status::BAD_SHAPE), "{wider:?}");
    }
    let rope = |head_dim: u64| huge(&[k::ROPE, 1, 2, 1, 1, head_dim, 0, f(10000.0), 0]);
    assert!(rope(head).is_ok());
    assert_eq!(rope(head + 2), Err(status::BAD_SHAPE));
    // A head of 2^31: the angle tables alone would be tens of GiB.
    assert_eq!(rope(1 << 31), Err(status::BAD_SHAPE));
    // (One head over one position: a head this wide is at the work bound already.)
    assert!(huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1, head, 1]).is_ok());
    assert_eq!(
        huge(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1, head + 1, 1]),
        Err(status::BAD_SHAPE)
    );
}

#[test]
fn rejects_out_of_bounds() {
    // 4096-byte buffers hold 1024 elements.
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 32, 33, 32, 0]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::MATMUL, 10, 10, 3, 16, 128, 16, 0]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(dec(&[k::ADD, 1, 2, 3, 1025]), Err(status::OUT_OF_BOUNDS));
    assert_eq!(dec(&[k::ADD, 10, 10, 3, 2048]), Err(status::OUT_OF_BOUNDS));
    assert_eq!(
        dec(&[k::COPY, 1, 1, 2, 0, 1024]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::COPY, 1, 0, 2, 1, 1024]),
        Err(status::OUT_OF_BOUNDS)
    );
    // Offsets that overflow when added or scaled.
    assert_eq!(
        dec(&[k::COPY, 1, u64::MAX, 2, 0, 1]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::COPY, 1, 0, 2, u64::MAX - 1, 2]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::COPY, 1, 1 << 62, 2, 0, 1]),
        Err(status::OUT_OF_BOUNDS)
    );
    // The loss needs one element; the labels `rows`.
    assert_eq!(
        dec(&[k::CROSS_ENTROPY, 1, 2, 3, 9, 2, 16]),
        Ok(Kernel::CrossEntropy {
            logits: 1,
            labels: 2,
            grad: 3,
            loss: 9,
            rows: 2,
            cols: 16,
        })
    );
    assert_eq!(
        dec(&[k::CROSS_ENTROPY, 1, 9, 3, 4, 2, 16]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::EMBEDDING, 1, 2, 3, 4, 16, 65]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::LAYER_NORM, 1, 9, 2, 3, 4, 16, f(1e-5)]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 4, 16, 17]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::SUM_ROWS, 1, 9, 2, 512]),
        Err(status::OUT_OF_BOUNDS)
    );
    assert_eq!(
        dec(&[k::ADD_BIAS, 1, 9, 2, 512]),
        Err(status::OUT_OF_BOUNDS)
    );
}

#[test]
fn rejects_bad_arguments() {
    // Unknown MATMUL flags.
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 4, 4, 4, 8]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(
        dec(&[k::MATMUL, 1, 2, 3, 4, 4, 4, u64::MAX]),
        Err(status::BAD_ARGUMENT)
    );
    // Non-finite scalars, and bits above the low 32.
    for bad in [
        f(f32::NAN),
        f(f32::INFINITY),
        f(f32::NEG_INFINITY),
        1 << 32,
        u64::MAX,
    ] {
        assert_eq!(dec(&[k::SCALE, 1, 4, bad]), Err(status::BAD_ARGUMENT));
        assert_eq!(dec(&[k::SGD, 1, 2, 4, bad]), Err(status::BAD_ARGUMENT));
        assert_eq!(
            dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, bad]),
            Err(status::BAD_ARGUMENT)
        );
    }
    // eps must be > 0.
    assert_eq!(
        dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, 0]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(
        dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, f(-1e-5)]),
        Err(status::BAD_ARGUMENT)
    );
    // Adam: step 0, betas outside [0, 1), eps <= 0.
    let adam = |lr: f32, b1: f32, b2: f32, eps: f32, step: u64| {
        dec(&[k::ADAM, 1, 2, 3, 4, 16, f(lr), f(b1), f(b2), f(eps), step])
    };
    assert!(adam(1e-3, 0.9, 0.999, 1e-8, 1).is_ok());
    assert!(adam(1e-3, 0.0, 0.0, 1e-8, u64::MAX).is_ok());
    assert_eq!(adam(1e-3, 0.9, 0.999, 1e-8, 0), Err(status::BAD_ARGUMENT));
    assert_eq!(adam(1e-3, 1.0, 0.999, 1e-8, 1), Err(status::BAD_ARGUMENT));
    assert_eq!(adam(1e-3, 0.9, -0.1, 1e-8, 1), Err(status::BAD_ARGUMENT));
    assert_eq!(adam(1e-3, 0.9, 0.999, 0.0, 1), Err(status::BAD_ARGUMENT));
    assert_eq!(
        adam(f32::NAN, 0.9, 0.999, 1e-8, 1),
        Err(status::BAD_ARGUMENT)
    );
    // RNG: unknown distribution, negative scale.
    assert_eq!(
        dec(&[k::RNG_FILL, 1, 4, 0, 0, 2, f(1.0)]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(
        dec(&[k::RNG_FILL, 1, 4, 0, 0, u64::MAX, f(1.0)]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(
        dec(&[k::RNG_FILL, 1, 4, 0, 0, 0, f(-1.0)]),
        Err(status::BAD_ARGUMENT)
    );
}

#[test]
fn rejects_aliasing() {
    let aliased: &[&[u64]] = &[
        &[k::MATMUL, 1, 2, 1, 4, 4, 4, 0],
        &[k::MATMUL, 1, 2, 2, 4, 4, 4, k::ACCUMULATE],
        &[k::ADD_BIAS, 1, 1, 4, 4],
        &[k::ADD, 1, 2, 1, 4],
        &[k::MUL, 1, 2, 2, 4],
        &[k::AXPY, 1, 1, 4, f(1.0)],
        &[k::RELU, 1, 1, 4],
        &[k::GELU_BACKWARD, 1, 2, 2, 4],
        &[k::RELU_BACKWARD, 1, 2, 1, 4],
        &[k::SOFTMAX, 1, 1, 4, 4],
        &[k::CROSS_ENTROPY, 1, 2, 3, 3, 2, 2],
        &[k::CROSS_ENTROPY, 1, 2, 1, 4, 2, 2],
        &[k::CROSS_ENTROPY, 1, 2, 3, 2, 2, 2],
        &[k::SGD, 1, 1, 4, f(0.1)],
        &adam([1, 2, 3, 3], 16),
        &adam([1, 2, 2, 4], 16),
        &[k::EMBEDDING, 1, 2, 2, 4, 4, 4],
        &[k::LAYER_NORM, 1, 2, 3, 3, 4, 4, f(1e-5)],
        &[k::COPY, 1, 0, 1, 8, 4],
        &[k::ATTENTION_DECODE, 1, 2, 3, 2, 1, 4, 4],
        &[k::ARGMAX, 1, 1, 4, 4],
    ];
    for args in aliased {
        assert_eq!(dec(args), Err(status::BAD_ARGUMENT), "{args:?}");
    }
    // Inputs may be shared.
    assert!(dec(&[k::ADD, 1, 1, 2, 4]).is_ok());
    assert!(dec(&[k::ATTENTION_DECODE, 1, 2, 2, 3, 1, 4, 4]).is_ok());
}

#[test]
fn never_panics_on_garbage() {
    // A deterministic sweep of hostile argument patterns through every kernel id.
    let values = [
        0,
        1,
        2,
        3,
        4,
        9,
        10,
        11,
        1023,
        1024,
        1025,
        1 << 31,
        1 << 32,
        1 << 62,
        u64::MAX,
    ];
    let mut state = 0x1234_5678_9abc_def0u64;
    for _ in 0..20_000 {
        let mut args = [0u64; COMMAND_ARGS];
        for slot in &mut args {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *slot = values[(state >> 33) as usize % values.len()];
        }
        args[0] = (state >> 20) % (KERNELS.len() as u64 + 2);
        if let Ok(kernel) = dec(&args) {
            let lens = lens();
            for (id, range) in writes(&kernel) {
                assert!(
                    range.start < range.end && range.end <= lens[&id],
                    "{kernel:?}"
                );
            }
            for id in reads(&kernel) {
                assert!(lens.contains_key(&id));
            }
        }
    }
}

#[test]
fn table_ids_are_dense_and_named_once() {
    for (i, &(id, kname)) in KERNELS.iter().enumerate() {
        assert_eq!(id, i as u64 + 1, "{kname}");
        assert_eq!(name(id), Some(kname));
        assert!(
            !KERNELS[..i].iter().any(|&(_, n)| n == kname),
            "{kname} twice"
        );
    }
}

#[test]
fn encode_is_the_inverse_of_decode() {
    // One valid launch of every kernel, built as a decoded value and encoded: decoding
    // the encoding gives it back, so the SDK and the device agree on argument order.
    let kernels = [
        Kernel::QMatmul {
            w: 10,
            x: 1,
            out: 2,
            n: 100,
            k: 64,
            m: 2,
            dtype: DType::Q4_1,
        },
        Kernel::QEmbedding {
            table: 10,
            ids: 1,
            out: 2,
            count: 3,
            dim: 32,
            vocab: 90,
            dtype: DType::Q8_0,
        },
        Kernel::RmsNorm {
            x: 1,
            weight: 2,
            out: 3,
            rows: 4,
            cols: 64,
            eps: 1e-5,
        },
        Kernel::Rope {
            x: 1,
            factors: 2,
            rows: 2,
            heads: 4,
            head_dim: 64,
            pos: 7,
            base: 10000.0,
            style: RopeStyle::HalfSplit,
        },
        Kernel::Swiglu {
            gate: 1,
            up: 1,
            out: 2,
            n: 1024,
        },
        Kernel::Attention {
            q: 1,
            k_cache: 10,
            v_cache: 10,
            out: 2,
            rows: 2,
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            pos: 100,
        },
        Kernel::Matmul {
            a: 1,
            b: 2,
            c: 3,
            m: 4,
            n: 4,
            k: 4,
            flags: MatmulFlags {
                transpose_a: true,
                transpose_b: false,
                accumulate: true,
            },
        },
        Kernel::RngFill {
            out: 1,
            n: 4,
            seed: u64::MAX,
            counter: 3,
            distribution: Distribution::Normal,
            scale: 0.5,
        },
    ];
    for kernel in kernels {
        let encoded = kernel.encode();
        assert_eq!(encoded[0], kernel.id());
        assert_eq!(dec(&encoded), Ok(kernel), "{}", kernel.name());
    }
}

#[test]
fn encode_with_replaces_only_the_buffer_ids() {
    let kernel = Kernel::Axpy {
        x: 1,
        y: 2,
        n: 3,
        alpha: 0.5,
    };
    let args = kernel.encode_with(&|id| 0x1000 * u64::from(id));
    assert_eq!(args[..5], [k::AXPY, 0x1000, 0x2000, 3, f(0.5)]);
    assert_eq!(args[5..], [0; COMMAND_ARGS - 5]);
}

#[test]
fn quantized_launches_need_whole_blocks_and_known_formats() {
    // Buffer 10 holds 64 KiB: 100 rows of two Q4_1 blocks (40 bytes) fit.
    let q = |n: u64, kk: u64, dtype: u64| dec(&[k::QMATMUL, 10, 1, 2, n, kk, 1, dtype]);
    assert!(q(100, 64, DType::Q4_1.code()).is_ok());
    assert_eq!(
        writes(&q(100, 64, DType::Q4_1.code()).unwrap()),
        vec![(2, 0..400)]
    );
    // k not a whole number of blocks; K formats need 256.
    assert_eq!(q(100, 48, DType::Q4_1.code()), Err(status::BAD_SHAPE));
    assert_eq!(q(4, 64, DType::Q6K.code()), Err(status::BAD_SHAPE));
    assert!(q(4, 256, DType::Q6K.code()).is_ok());
    // Unknown or unsupported GGML codes.
    for code in [5, 6, 9, 10, 13, 15, 30, u64::MAX] {
        assert_eq!(q(4, 64, code), Err(status::BAD_ARGUMENT), "{code}");
    }
    // Weights too short: 2000 rows of 40 bytes exceed 64 KiB; the block count overflows.
    assert_eq!(q(2000, 64, DType::Q4_1.code()), Err(status::OUT_OF_BOUNDS));
    assert_eq!(
        q(1 << 62, 1 << 40, DType::Q4_1.code()),
        Err(status::BAD_SHAPE)
    );
    // x and out must hold m×k and m×n f32.
    assert_eq!(
        dec(&[k::QMATMUL, 10, 1, 2, 2000, 32, 1, DType::Q8_0.code()]),
        Err(status::OUT_OF_BOUNDS)
    );
    // Output aliasing the weights.
    assert_eq!(
        dec(&[k::QMATMUL, 10, 1, 10, 4, 64, 1, DType::Q4_0.code()]),
        Err(status::BAD_ARGUMENT)
    );
    // The embedding table must hold vocab rows.
    let e = |vocab: u64| dec(&[k::QEMBEDDING, 10, 1, 2, 4, 64, vocab, DType::Q4_1.code()]);
    assert!(e(1638).is_ok());
    assert_eq!(e(1639), Err(status::OUT_OF_BOUNDS));
}

#[test]
fn llama_operator_launches_are_checked() {
    // RoPE: odd head width, base <= 1, position overflow; factors (buffer 2) short of
    // head_dim / 2 elements, or the buffer rotated.
    let rope = |x: u64, factors: u64, rows: u64, head_dim: u64, pos: u64, base: f32| {
        dec(&[k::ROPE, x, factors, rows, 4, head_dim, pos, f(base), 0])
    };
    assert!(rope(1, 2, 2, 64, 0, 1e4).is_ok());
    assert_eq!(rope(1, 2, 2, 63, 0, 1e4), Err(status::BAD_SHAPE));
    assert_eq!(rope(1, 2, 2, 64, 0, 1.0), Err(status::BAD_ARGUMENT));
    assert_eq!(
        dec(&[k::ROPE, 1, 2, 2, 4, 64, 0, f(1e4), 2]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(rope(1, 2, 2, 64, u64::MAX, 1e4), Err(status::BAD_ARGUMENT));
    assert_eq!(rope(1, 2, 5, 64, 0, 1e4), Err(status::OUT_OF_BOUNDS));
    // Buffer 9 holds one f32: factors for a head of 2, not of 4.
    assert!(rope(1, 9, 1, 2, 0, 1e4).is_ok());
    assert_eq!(rope(1, 9, 1, 4, 0, 1e4), Err(status::OUT_OF_BOUNDS));
    assert_eq!(rope(1, 1, 2, 64, 0, 1e4), Err(status::BAD_ARGUMENT));
    let half_split = dec(&[k::ROPE, 1, 2, 2, 4, 64, 0, f(1e4), 1]).unwrap();
    assert_eq!(writes(&half_split), vec![(1, 0..2048)]);
    assert_eq!(reads(&half_split), vec![1, 2]);
    // Attention: heads not a multiple of the KV heads; cache too short for pos + rows.
    let att = |rows: u64, heads: u64, kv: u64, pos: u64| {
        dec(&[k::ATTENTION, 1, 10, 10, 2, rows, heads, kv, 32, pos])
    };
    assert!(att(2, 8, 2, 100).is_ok());
    assert_eq!(att(2, 8, 3, 100), Err(status::BAD_SHAPE));
    // 64 KiB of cache holds 256 positions of 2×32 floats.
    assert!(att(1, 2, 2, 255).is_ok());
    assert_eq!(att(1, 2, 2, 256), Err(status::OUT_OF_BOUNDS));
    assert_eq!(att(2, 8, 2, u64::MAX), Err(status::BAD_SHAPE));
    // RMS norm and SwiGLU.
    assert_eq!(
        dec(&[k::RMS_NORM, 1, 2, 3, 4, 64, 0]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(
        dec(&[k::RMS_NORM, 1, 1, 3, 4, 64, f(1e-5)]).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        dec(&[k::RMS_NORM, 1, 2, 1, 4, 64, f(1e-5)]),
        Err(status::BAD_ARGUMENT)
    );
    assert_eq!(dec(&[k::SWIGLU, 1, 2, 2, 64]), Err(status::BAD_ARGUMENT));
}
