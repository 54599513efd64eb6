//! The cpu backend against straightforward f64 references, and across thread counts.
//!
//! Error bounds (relative to the stated scale, per element):
//! - MATMUL: 1e-5 × Σ_p |a_ip·b_pj| (f32 GEMM with sequential accumulation);
//! - elementwise ADD, MUL, SCALE, AXPY, SGD, ADD_BIAS: exact against the same f32
//!   expression, and 1e-6 × magnitude against f64;
//! - GELU, GELU_BACKWARD: 1e-6 relative (+1e-7 absolute near 0);
//! - SOFTMAX, CROSS_ENTROPY gradient: 1e-6 relative (+1e-9 absolute); loss 1e-6 relative;
//! - SUM_ROWS, SUM_COLS: 1e-6 × Σ|x|;
//! - LAYER_NORM: 1e-5 relative (+1e-6 absolute);
//! - ADAM: param 1e-6 relative (+1e-7 absolute), moments 1e-6 relative;
//! - ATTENTION_DECODE: 1e-6 × max|v| (+1e-6 absolute);
//! - RNG_FILL: moments of 200k samples within 1%/2% of the distribution's;
//! - EMBEDDING, COPY, RELU, RELU_BACKWARD, ARGMAX: exact.
//!
//! Every comparison fails on a non-finite result.

use super::*;
use crate::backend::{numbered, square_matmul};
use crate::kernel::{Distribution, MatmulFlags};

pub(super) use crate::backend::Rng;

impl Rng {
    pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(scale)).collect()
    }
}

/// Fails unless `got` is finite and within `tol` of `want`.
#[track_caller]
pub(super) fn close(what: &str, i: usize, got: f32, want: f64, tol: f64) {
    assert!(
        got.is_finite() && want.is_finite(),
        "{what}[{i}]: non-finite {got} (want {want})"
    );
    let err = (f64::from(got) - want).abs();
    assert!(
        err <= tol,
        "{what}[{i}]: {got} vs {want}: error {err:e} > {tol:e}"
    );
}

/// A backend with buffers `1..` holding `data` (f32 or u32 words as f32 bits).
pub(super) fn backend(threads: usize, data: &[&[f32]]) -> CpuBackend {
    let mut b = CpuBackend::new(threads, DeviceMemory::default());
    for (i, d) in data.iter().enumerate() {
        let id = i as BufferId + 1;
        b.alloc(id, (d.len().max(1) * 4) as u64).unwrap();
        b.write(id, 0, bytemuck::cast_slice(d));
    }
    b
}

/// Kernel threads, `threads` of them.
fn workers(threads: usize) -> super::Workers {
    super::Workers::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap(),
    )
}

pub(super) fn read(b: &CpuBackend, id: BufferId) -> Vec<f32> {
    b.buffers.expect(id).read().to_vec()
}

pub(super) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `kernel` on fresh copies of `data` with 1, 2 and 4 threads; checks that every
/// buffer ends bit-identical and returns the final buffers.
pub(super) fn run_all(data: &[&[f32]], kernel: &Kernel) -> Vec<Vec<f32>> {
    let mut first: Option<Vec<Vec<f32>>> = None;
    for threads in [1, 2, 4] {
        let mut b = backend(threads, data);
        b.launch(kernel).unwrap();
        let out: Vec<Vec<f32>> = (1..=data.len() as BufferId)
            .map(|id| read(&b, id))
            .collect();
        match &first {
            None => first = Some(out),
            Some(f) => {
                for (id, (x, y)) in f.iter().zip(&out).enumerate() {
                    assert!(
                        bits(x) == bits(y),
                        "{kernel:?}: buffer {} differs with {threads} threads",
                        id + 1
                    );
                }
            }
        }
    }
    first.unwrap()
}

fn matmul_ref(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let x = f64::from(if ta { a[p * m + i] } else { a[i * k + p] });
                let y = f64::from(if tb { b[j * k + p] } else { b[p * n + j] });
                c[i * n + j] += x * y;
                mag[i * n + j] += (x * y).abs();
            }
        }
    }
    (c, mag)
}

#[test]
fn matmul_matches_reference() {
    let mut rng = Rng(1);
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (67, 131, 257),
        (1, 300, 64),
        (130, 1, 9),
        (65, 257, 3),
    ];
    for (m, n, k) in shapes {
        for flags in 0..8u64 {
            let (ta, tb, acc) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
            let a = rng.vec(m * k, 1.0);
            let b = rng.vec(k * n, 1.0);
            let c0 = rng.vec(m * n, 1.0);
            let flags = MatmulFlags {
                transpose_a: ta,
                transpose_b: tb,
                accumulate: acc,
            };
            let out = run_all(&[&a, &b, &c0], &numbered::matmul(m, n, k, flags));
            let (want, mag) = matmul_ref(&a, &b, m, n, k, ta, tb);
            for i in 0..m * n {
                let base = if acc { f64::from(c0[i]) } else { 0.0 };
                let tol = 1e-5 * (mag[i] + base.abs()) + 1e-30;
                close("matmul", i, out[2][i], want[i] + base, tol);
            }
        }
    }
}

#[test]
fn matmul_ignores_garbage_in_c_when_overwriting() {
    let (m, n, k) = (5, 6, 7);
    let mut rng = Rng(2);
    let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
    let c0 = vec![f32::NAN; m * n];
    let out = run_all(
        &[&a, &b, &c0],
        &numbered::matmul(m, n, k, MatmulFlags::default()),
    );
    let (want, mag) = matmul_ref(&a, &b, m, n, k, false, false);
    for i in 0..m * n {
        close("matmul", i, out[2][i], want[i], 1e-5 * mag[i]);
    }
}

/// The GEMM alone, on large odd shapes, is bit-identical for 1, 2 and 4 threads, and
/// equal to one untiled single-threaded `sgemm` call.
fn gemm_determinism(m: usize, n: usize, k: usize) {
    let mut rng = Rng(3);
    let (a, b) = (rng.vec(m * k, 1.0), rng.vec(k * n, 1.0));
    let mut whole = vec![0.0f32; m * n];
    let one = ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    gemm::direct(&one, 1, &a, &b, &mut whole, (m, n, k));
    for threads in [1, 2, 4] {
        let pool = workers(threads);
        for (ta, tb) in [(false, false), (true, true)] {
            let g = gemm::Gemm {
                m,
                n,
                k,
                transpose_a: ta,
                transpose_b: tb,
                accumulate: false,
            };
            // The same operands, stored transposed where the flags say so.
            let at: Vec<f32> = if ta {
                (0..m * k).map(|x| a[(x % m) * k + x / m]).collect()
            } else {
                a.clone()
            };
            let bt: Vec<f32> = if tb {
                (0..k * n).map(|x| b[(x % k) * n + x / k]).collect()
            } else {
                b.clone()
            };
            let mut c = vec![f32::NAN; m * n];
            g.run(&pool, &at, &bt, &mut c);
            if !ta && !tb {
                assert!(
                    bits(&c) == bits(&whole),
                    "{m}x{n}x{k}: tiled differs from one call ({threads} threads)"
                );
            } else {
                // Transposed layouts pack differently but accumulate in the same order.
                assert!(
                    bits(&c) == bits(&whole),
                    "{m}x{n}x{k}: transposed differs ({threads} threads)"
                );
            }
        }
    }
}

#[test]
fn gemm_is_bit_identical_across_threads() {
    gemm_determinism(67, 131, 257);
    gemm_determinism(130, 513, 300);
}

#[test]
fn gemm_is_bit_identical_across_threads_512() {
    gemm_determinism(512, 512, 512);
    gemm_determinism(333, 1031, 771);
}

/// An elementwise kernel, its data, the buffer it writes, and that buffer's elements as
/// the same f32 expression computes them.
type Exact<'a> = (Kernel, Vec<&'a [f32]>, usize, &'a dyn Fn(usize) -> f32);

#[test]
fn elementwise_kernels() {
    let mut rng = Rng(4);
    for n in [1, 7, 1000, 40_000] {
        let (a, b, z) = (rng.vec(n, 3.0), rng.vec(n, 3.0), vec![0.0; n]);
        let exact: [Exact<'_>; 7] = [
            (numbered::add(n), vec![&a, &b, &z], 2, &|i| a[i] + b[i]),
            (numbered::mul(n), vec![&a, &b, &z], 2, &|i| a[i] * b[i]),
            (
                Kernel::Scale {
                    x: 1,
                    n,
                    alpha: -1.5,
                },
                vec![&a],
                0,
                &|i| a[i] * -1.5,
            ),
            (
                Kernel::Axpy {
                    x: 1,
                    y: 2,
                    n,
                    alpha: 0.25,
                },
                vec![&a, &b],
                1,
                &|i| b[i] + 0.25 * a[i],
            ),
            (
                Kernel::Sgd {
                    param: 1,
                    grad: 2,
                    n,
                    lr: 0.1,
                },
                vec![&a, &b],
                0,
                &|i| a[i] - 0.1 * b[i],
            ),
            (Kernel::Relu { x: 1, out: 2, n }, vec![&a, &z], 1, &|i| {
                a[i].max(0.0)
            }),
            (numbered::relu_backward(n), vec![&a, &b, &z], 2, &|i| {
                if a[i] > 0.0 {
                    b[i]
                } else {
                    0.0
                }
            }),
        ];
        for (kernel, data, written, want) in exact {
            let out = &run_all(&data, &kernel)[written];
            for (i, o) in out.iter().enumerate() {
                assert_eq!(o.to_bits(), want(i).to_bits(), "{kernel:?}: element {i}");
            }
            if let Kernel::Axpy { alpha, .. } = kernel {
                for (i, &o) in out.iter().enumerate() {
                    let want = f64::from(b[i]) + f64::from(alpha) * f64::from(a[i]);
                    close("axpy", i, o, want, 1e-6 * 4.0);
                }
            }
        }
    }
    // Only the first n elements change.
    let a = vec![1.0f32; 8];
    let out = run_all(
        &[&a],
        &Kernel::Scale {
            x: 1,
            n: 5,
            alpha: 2.0,
        },
    );
    assert_eq!(out[0], [2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0]);
}

#[test]
fn add_bias_matches() {
    let mut rng = Rng(5);
    for (rows, cols) in [(1, 1), (3, 17), (200, 129)] {
        let (x, bias) = (rng.vec(rows * cols, 2.0), rng.vec(cols, 2.0));
        let out = run_all(
            &[&x, &bias],
            &Kernel::AddBias {
                x: 1,
                bias: 2,
                rows,
                cols,
            },
        );
        for i in 0..rows * cols {
            assert_eq!(out[0][i].to_bits(), (x[i] + bias[i % cols]).to_bits());
        }
    }
}

fn gelu_ref(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

#[test]
fn gelu_and_gradient() {
    let mut rng = Rng(6);
    let n = 20_000;
    let mut x = rng.vec(n, 8.0);
    x.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-8,
        30.0,
        -30.0,
        1e20,
        -1e20,
        f32::MAX,
        f32::MIN,
    ]);
    let n = x.len();
    let g = rng.vec(n, 2.0);
    let out = run_all(&[&x, &vec![0.0; n]], &Kernel::Gelu { x: 1, out: 2, n });
    for i in 0..n {
        let want = gelu_ref(f64::from(x[i]));
        close("gelu", i, out[1][i], want, 1e-6 * want.abs() + 1e-7 * 1e-7);
    }
    let out = run_all(&[&x, &g, &vec![0.0; n]], &numbered::gelu_backward(n));
    for i in 0..n {
        let xi = f64::from(x[i]);
        // Central difference of the f64 reference: accurate to ~1e-9 at this step.
        let h = 1e-4 * xi.abs().max(1.0);
        let d = if xi.abs() > 20.0 {
            if xi > 0.0 {
                1.0
            } else {
                0.0
            }
        } else {
            (gelu_ref(xi + h) - gelu_ref(xi - h)) / (2.0 * h)
        };
        let want = f64::from(g[i]) * d;
        close("gelu'", i, out[2][i], want, 1e-6 * want.abs() + 1e-7);
    }
}

fn softmax_ref(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn softmax_matches() {
    let mut rng = Rng(7);
    for (rows, cols) in [(1, 1), (5, 3), (37, 1000), (300, 65)] {
        let mut x = rng.vec(rows * cols, 20.0);
        x[0] = 1000.0; // stability: a huge logit
        let out = run_all(
            &[&x, &vec![0.0; rows * cols]],
            &numbered::softmax(rows, cols),
        );
        for r in 0..rows {
            let want = softmax_ref(&x[r * cols..][..cols]);
            for c in 0..cols {
                close(
                    "softmax",
                    r * cols + c,
                    out[1][r * cols + c],
                    want[c],
                    1e-6 * want[c] + 1e-9,
                );
            }
        }
    }
}

#[test]
fn cross_entropy_matches() {
    let mut rng = Rng(8);
    for (rows, cols) in [(1, 1), (4, 10), (300, 77), (33, 2000)] {
        let x = rng.vec(rows * cols, 10.0);
        let labels: Vec<u32> = (0..rows).map(|_| rng.below(cols as u32)).collect();
        let labels_f: &[f32] = bytemuck::cast_slice(&labels);
        let k = numbered::cross_entropy(rows, cols);
        let out = run_all(&[&x, labels_f, &vec![0.0; rows * cols], &[0.0]], &k);
        let mut loss = 0.0;
        for r in 0..rows {
            let p = softmax_ref(&x[r * cols..][..cols]);
            let l = labels[r] as usize;
            loss -= p[l].ln();
            for c in 0..cols {
                let want = (p[c] - if c == l { 1.0 } else { 0.0 }) / rows as f64;
                close(
                    "ce grad",
                    r * cols + c,
                    out[2][r * cols + c],
                    want,
                    1e-6 * want.abs() + 1e-9,
                );
            }
        }
        loss /= rows as f64;
        close("ce loss", 0, out[3][0], loss, 1e-6 * loss.abs() + 1e-9);
    }
}

#[test]
fn cross_entropy_rejects_bad_labels() {
    let labels = [0u32, 3];
    let mut b = backend(
        2,
        &[&[0.0; 6], bytemuck::cast_slice(&labels), &[0.0; 6], &[0.0]],
    );
    let k = numbered::cross_entropy(2, 3);
    assert!(matches!(b.launch(&k), Err(BackendError::BadData(_))));
    let labels = [0u32, u32::MAX];
    b.write(2, 0, bytemuck::cast_slice(&labels));
    assert!(matches!(b.launch(&k), Err(BackendError::BadData(_))));
    // The buffers are all still there.
    assert_eq!(b.buffers.read().len(), 4);
}

#[test]
fn sums_match() {
    let mut rng = Rng(9);
    for (rows, cols) in [(1, 1), (3, 5), (1000, 37), (700, 300), (5000, 1)] {
        let x = rng.vec(rows * cols, 5.0);
        let out = run_all(&[&x, &vec![0.0; rows]], &numbered::sum_rows(rows, cols));
        for r in 0..rows {
            let row = &x[r * cols..][..cols];
            let want: f64 = row.iter().map(|&v| f64::from(v)).sum();
            let mag: f64 = row.iter().map(|&v| f64::from(v).abs()).sum();
            close("sum_rows", r, out[1][r], want, 1e-6 * mag);
        }
        let out = run_all(&[&x, &vec![0.0; cols]], &numbered::sum_cols(rows, cols));
        for c in 0..cols {
            let want: f64 = (0..rows).map(|r| f64::from(x[r * cols + c])).sum();
            let mag: f64 = (0..rows).map(|r| f64::from(x[r * cols + c]).abs()).sum();
            close("sum_cols", c, out[1][c], want, 1e-6 * mag);
        }
    }
}

#[test]
fn layer_norm_matches() {
    let mut rng = Rng(10);
    for (rows, cols) in [(1, 1), (3, 8), (100, 768), (1000, 33)] {
        let x: Vec<f32> = rng
            .vec(rows * cols, 4.0)
            .iter()
            .map(|v| v + 100.0)
            .collect();
        let (g, b) = (rng.vec(cols, 2.0), rng.vec(cols, 1.0));
        let eps = 1e-5f32;
        let k = numbered::layer_norm(rows, cols, eps);
        let out = run_all(&[&x, &g, &b, &vec![0.0; rows * cols]], &k);
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..][..cols]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            for c in 0..cols {
                let want = (row[c] - mean) / (var + f64::from(eps)).sqrt() * f64::from(g[c])
                    + f64::from(b[c]);
                close(
                    "layer_norm",
                    r * cols + c,
                    out[3][r * cols + c],
                    want,
                    1e-5 * want.abs() + 1e-6,
                );
            }
        }
    }
}

#[test]
fn adam_matches() {
    let mut rng = Rng(11);
    for (n, step) in [(1, 1), (100, 3), (50_000, 1000), (7, u64::MAX)] {
        let (p, g) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        let m = rng.vec(n, 0.1);
        let v: Vec<f32> = rng.vec(n, 0.01).iter().map(|x| x.abs()).collect();
        let (lr, b1, b2, eps) = (1e-3f32, 0.9f32, 0.999f32, 1e-8f32);
        let k = Kernel::Adam {
            param: 1,
            grad: 2,
            m: 3,
            v: 4,
            n,
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            step,
        };
        let out = run_all(&[&p, &g, &m, &v], &k);
        let (b1, b2) = (f64::from(b1), f64::from(b2));
        let t = step.min(100_000) as i32;
        for i in 0..n {
            let gi = f64::from(g[i]);
            let m1 = b1 * f64::from(m[i]) + (1.0 - b1) * gi;
            let v1 = b2 * f64::from(v[i]) + (1.0 - b2) * gi * gi;
            let mh = m1 / (1.0 - b1.powi(t));
            let vh = v1 / (1.0 - b2.powi(t));
            let want = f64::from(p[i]) - f64::from(lr) * mh / (vh.sqrt() + f64::from(eps));
            close("adam p", i, out[0][i], want, 1e-6 * want.abs() + 1e-7);
            close("adam m", i, out[2][i], m1, 1e-6 * m1.abs() + 1e-12);
            close("adam v", i, out[3][i], v1, 1e-6 * v1.abs() + 1e-12);
        }
    }
}

#[test]
fn embedding_and_copy() {
    let mut rng = Rng(12);
    let (vocab, dim, count) = (50, 17, 300);
    let table = rng.vec(vocab * dim, 1.0);
    let ids: Vec<u32> = (0..count).map(|_| rng.below(vocab as u32)).collect();
    let out = run_all(
        &[&table, bytemuck::cast_slice(&ids), &vec![0.0; count * dim]],
        &numbered::embedding(count, dim, vocab),
    );
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(out[2][i * dim..][..dim], table[id as usize * dim..][..dim]);
    }
    // An id beyond the vocabulary (the table buffer may be larger than vocab rows).
    let mut bad = ids.clone();
    bad[count - 1] = vocab as u32;
    let mut b = backend(
        2,
        &[&table, bytemuck::cast_slice(&bad), &vec![0.0; count * dim]],
    );
    assert!(matches!(
        b.launch(&numbered::embedding(count, dim, vocab - 1)),
        Err(BackendError::BadData(_))
    ));

    let src = rng.vec(100, 1.0);
    let dst = vec![7.0f32; 50];
    let out = run_all(
        &[&src, &dst],
        &Kernel::Copy {
            src: 1,
            src_offset: 90,
            dst: 2,
            dst_offset: 40,
            n: 10,
        },
    );
    assert_eq!(out[1][..40], [7.0; 40]);
    assert_eq!(out[1][40..], src[90..]);
}

#[test]
fn rng_fill_statistics_and_slicing() {
    // `n` values of stream `seed` from `counter` on.
    let fill = |n, seed, counter, distribution, scale| {
        let k = Kernel::RngFill {
            out: 1,
            n,
            seed,
            counter,
            distribution,
            scale,
        };
        run_all(&[&vec![0.0; n]], &k).remove(0)
    };
    let n = 200_000;
    for (dist, scale) in [(Distribution::Uniform, 0.5f32), (Distribution::Normal, 2.0)] {
        let out = fill(n, 42, 1000, dist, scale);
        let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = out
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let want_var = match dist {
            Distribution::Uniform => f64::from(scale).powi(2) / 3.0,
            Distribution::Normal => f64::from(scale).powi(2),
        };
        assert!(out.iter().all(|v| v.is_finite()));
        assert!(mean.abs() < 0.01 * f64::from(scale), "{dist:?} mean {mean}");
        assert!(
            (var / want_var - 1.0).abs() < 0.02,
            "{dist:?} variance {var} vs {want_var}"
        );
        if dist == Distribution::Uniform {
            assert!(out.iter().all(|&v| (-scale..scale).contains(&v)));
        } else {
            // Roughly 68% within one standard deviation.
            let within = out.iter().filter(|v| v.abs() < scale).count() as f64 / n as f64;
            assert!((within - 0.6827).abs() < 0.01, "{within}");
        }
        // Element i depends only on (seed, counter + i): a slice from counter 1500 matches.
        let part = fill(100, 42, 1500, dist, scale);
        assert!(bits(&part) == bits(&out[500..600]));
        // Another seed gives other values.
        let other = fill(100, 43, 1500, dist, scale);
        assert!(other.iter().zip(&part).filter(|(a, b)| a == b).count() < 3);
    }
    // Counters wrap.
    let out = fill(4, 1, u64::MAX - 1, Distribution::Normal, 1.0);
    assert!(out.iter().all(|v| v.is_finite()));
    assert_eq!(
        out[2].to_bits(),
        ops::rng_value(1, 0, Distribution::Normal, 1.0).to_bits()
    );
}

/// FNV-1a over the bits of `v`.
pub(super) fn fingerprint(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        x.to_bits()
            .to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    })
}

/// The outputs of every kernel on fixed inputs, as fingerprints.
fn golden_outputs() -> Vec<(&'static str, u64)> {
    let mut rng = Rng(99);
    let (r, c) = (19, 37);
    let x = rng.vec(r * c, 4.0);
    let y = rng.vec(r * c, 4.0);
    let row = rng.vec(c, 1.0);
    let labels: Vec<u32> = (0..r).map(|_| rng.below(c as u32)).collect();
    let labels: &[f32] = bytemuck::cast_slice(&labels);
    let z = vec![0.0f32; r * c];
    let one = |k: Kernel, data: &[&[f32]], out: usize| fingerprint(&run_all(data, &k)[out]);
    let n = r * c;
    // Its gradient and its loss, from one run.
    let ce = run_all(&[&x, labels, &z, &[0.0]], &numbered::cross_entropy(r, c));
    let rng_fill = |distribution| {
        let k = Kernel::RngFill {
            out: 1,
            n,
            seed: 7,
            counter: 3,
            distribution,
            scale: 1.0,
        };
        one(k, &[&z], 0)
    };
    vec![
        (
            "matmul",
            one(
                numbered::matmul(
                    r,
                    r,
                    c,
                    MatmulFlags {
                        transpose_a: false,
                        transpose_b: true,
                        accumulate: true,
                    },
                ),
                &[&x, &y, &z],
                2,
            ),
        ),
        (
            "add_bias",
            one(
                Kernel::AddBias {
                    x: 1,
                    bias: 2,
                    rows: r,
                    cols: c,
                },
                &[&x, &row],
                0,
            ),
        ),
        (
            "axpy",
            one(
                Kernel::Axpy {
                    x: 1,
                    y: 2,
                    n,
                    alpha: 0.3,
                },
                &[&x, &y],
                1,
            ),
        ),
        ("gelu", one(Kernel::Gelu { x: 1, out: 2, n }, &[&x, &z], 1)),
        (
            "gelu_backward",
            one(numbered::gelu_backward(n), &[&x, &y, &z], 2),
        ),
        ("softmax", one(numbered::softmax(r, c), &[&x, &z], 1)),
        ("cross_entropy grad", fingerprint(&ce[2])),
        ("cross_entropy loss", fingerprint(&ce[3])),
        ("sum_rows", one(numbered::sum_rows(r, c), &[&x, &z], 1)),
        ("sum_cols", one(numbered::sum_cols(r, c), &[&x, &z], 1)),
        (
            "adam",
            one(
                Kernel::Adam {
                    param: 1,
                    grad: 2,
                    m: 3,
                    v: 4,
                    n: c,
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.99,
                    eps: 1e-6,
                    step: 7,
                },
                &[&x[..c], &y[..c], &row, &z[..c]],
                0,
            ),
        ),
        (
            "layer_norm",
            one(numbered::layer_norm(r, c, 1e-5), &[&x, &row, &row, &z], 3),
        ),
        ("rng uniform", rng_fill(Distribution::Uniform)),
        ("rng normal", rng_fill(Distribution::Normal)),
        (
            "attention",
            one(numbered::attention_decode(1, c, r), &[&row, &x, &y, &z], 3),
        ),
    ]
}

/// Kernel version 2 promises these exact bits on every host (for MATMUL: every x86-64
/// host with AVX2 and FMA, see `gemm`). A change here needs a new `kernel_version`.
#[test]
fn kernel_outputs_are_pinned() {
    let got = golden_outputs();
    let pinned: &[(&str, u64)] = &[
        ("matmul", 0x84cfd266849e708a),
        ("add_bias", 0xfd1dd56f2f4c84ce),
        ("axpy", 0x5e7720e30fff05ef),
        ("gelu", 0xeafc51d4575a8930),
        ("gelu_backward", 0x91d83a5a205af9de),
        ("softmax", 0x7f602d85bfc21dab),
        ("cross_entropy grad", 0x9472b18d5d85c362),
        ("cross_entropy loss", 0x49e7137e82d66180),
        ("sum_rows", 0xe61559012817a67a),
        ("sum_cols", 0x5fe0deca8d482a37),
        ("adam", 0x707e2d8b53f10cd5),
        ("layer_norm", 0x75612878c1f6c1ec),
        ("rng uniform", 0x8315c4b242b77248),
        ("rng normal", 0xc27d5fddeb56d5e8),
        ("attention", 0x9bf4e5fd58c805ec),
    ];
    for (name, h) in &got {
        eprintln!("(\"{name}\", {h:#018x}),");
    }
    assert_eq!(got, pinned);
}

fn attention_ref(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    heads: usize,
    hd: usize,
    len: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; heads * hd];
    for h in 0..heads {
        let s: Vec<f64> = (0..len)
            .map(|p| {
                (0..hd)
                    .map(|d| f64::from(q[h * hd + d]) * f64::from(kc[(p * heads + h) * hd + d]))
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let max = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..hd {
            out[h * hd + d] = (0..len)
                .map(|p| e[p] * f64::from(vc[(p * heads + h) * hd + d]))
                .sum::<f64>()
                / sum;
        }
    }
    out
}

#[test]
fn attention_decode_matches() {
    let mut rng = Rng(13);
    for (heads, hd, len, cap) in [
        (1, 1, 1, 1),
        (2, 3, 5, 9),
        (12, 64, 100, 128),
        (3, 17, 333, 333),
    ] {
        let q = rng.vec(heads * hd, 3.0);
        let (kc, vc) = (
            rng.vec(cap * heads * hd, 3.0),
            rng.vec(cap * heads * hd, 1.0),
        );
        let k = numbered::attention_decode(heads, hd, len);
        let out = run_all(&[&q, &kc, &vc, &vec![0.0; heads * hd]], &k);
        let want = attention_ref(&q, &kc, &vc, heads, hd, len);
        for i in 0..heads * hd {
            close(
                "attention",
                i,
                out[3][i],
                want[i],
                1e-6 + 1e-6 * want[i].abs(),
            );
        }
    }
}

#[test]
fn argmax_first_maximum_and_nan() {
    let x = [
        1.0,
        3.0,
        3.0,
        2.0,
        /**/ -1.0,
        -1.0,
        -1.0,
        -1.0,
        /**/ 0.0,
        f32::NAN,
        5.0,
        f32::NAN,
        /**/ f32::NAN,
        1.0,
        2.0,
        3.0,
    ];
    let out = run_all(&[&x, &[0.0; 4]], &numbered::argmax(4, 4));
    let idx: &[u32] = bytemuck::cast_slice(&out[1]);
    assert_eq!(idx, [1, 0, 1, 0]);
    // Past the lanes of the vectorized scan: a NaN late in a row of a thousand (before a
    // larger value), the first of equal maxima (±0 alike), a row of -∞.
    let cols = 1000;
    let mut x = vec![-2.0f32; 4 * cols];
    x[777] = f32::NAN;
    x[900] = 9.0;
    x[cols + 400] = -0.0;
    x[cols + 401] = 0.0;
    x[cols + 999] = 0.0;
    x[2 * cols..3 * cols].fill(f32::NEG_INFINITY);
    x[3 * cols + 999] = 1.0;
    let out = run_all(&[&x, &[0.0; 4]], &numbered::argmax(4, cols));
    let idx: &[u32] = bytemuck::cast_slice(&out[1]);
    assert_eq!(idx, [777, 400, 0, 999]);
    let mut rng = Rng(14);
    let (rows, cols) = (500, 301);
    let x = rng.vec(rows * cols, 1.0);
    let out = run_all(&[&x, &vec![0.0; rows]], &numbered::argmax(rows, cols));
    let idx: &[u32] = bytemuck::cast_slice(&out[1]);
    for r in 0..rows {
        let row = &x[r * cols..][..cols];
        let best = (0..cols).fold(0, |b, c| if row[c] > row[b] { c } else { b });
        assert_eq!(idx[r] as usize, best);
    }
}

#[test]
fn buffers_read_write_and_alloc_failure() {
    let mut b = CpuBackend::new(1, DeviceMemory::default());
    assert_eq!((b.kind(), b.kernel_version()), ("cpu", 2));
    b.alloc(1, 64).unwrap();
    let mut out = [0xffu8; 64];
    b.read(1, 0, &mut out);
    assert_eq!(out, [0; 64]);
    b.write(1, 6, &[1, 2, 3]);
    let mut out = [0u8; 5];
    b.read(1, 5, &mut out);
    assert_eq!(out, [0, 1, 2, 3, 0]);
    b.free(1);
    assert!(b.buffers.read().is_empty());
    // Far beyond any host: an error, not an abort.
    assert!(matches!(
        b.alloc(2, u64::MAX - 3),
        Err(BackendError::Alloc { .. })
    ));
    assert!(matches!(
        b.alloc(2, 1 << 62),
        Err(BackendError::Alloc { .. })
    ));
    // A large allocation is lazily backed: cheap to create and free.
    b.alloc(3, 1 << 30).unwrap();
    b.write(3, (1 << 30) - 4, &[9, 9, 9, 9]);
    b.free(3);
}

#[test]
fn bench_gemm_runs() {
    let (backend, direct) = bench_gemm(16, 2);
    assert!(backend > 0.0 && direct > 0.0);
}

#[test]
fn readers_wait_only_for_kernels_that_write_the_buffer_they_read() {
    // A matmul long enough (hundreds of ms) to read around (the crate is optimized in
    // every profile).
    let n = 2048;
    let mut b = CpuBackend::new(1, DeviceMemory::default());
    for id in 1..=3 {
        b.alloc(id, (n * n * 4) as u64).unwrap();
    }
    b.write(1, 0, &[7; 64]);
    let reader = b.reader();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mm = square_matmul(n);
    std::thread::scope(|s| {
        s.spawn(|| {
            b.launch(&mm).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(20));
        // Buffer 1 is only read by the kernel: no wait for it.
        let mut first = Vec::new();
        assert!(reader.with_buffer(1, &mut |bytes| first = bytes[..64].to_vec()));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the read waited for the kernel"
        );
        assert_eq!(first, vec![7; 64]);
    });
    assert!(!reader.with_buffer(9, &mut |_| panic!("no buffer 9")));
}

#[test]
fn freed_buffers_go_back_to_the_device_memory() {
    let memory = DeviceMemory::new(64 << 20);
    let mut b = CpuBackend::new(1, memory.clone());
    b.alloc(1, 8 << 20).unwrap();
    b.write(1, 4, &[1, 2, 3, 4]);
    b.free(1);
    assert_eq!(memory.kept_bytes(), 8 << 20);
    b.alloc(2, 8 << 20).unwrap();
    assert_eq!(memory.kept_bytes(), 0, "reused");
    let mut out = [9u8; 8];
    b.read(2, 0, &mut out);
    assert_eq!(out, [0; 8], "and zeroed");
}

/// One kernel thread at most is kept warm between kernels, and it goes back to sleep
/// once the kernels stop: none is left spinning.
#[test]
fn kept_warm_threads_are_bounded_and_let_go_once_kernels_stop() {
    use std::sync::atomic::Ordering;
    let pool = workers(4);
    pool.install(|| {
        // On the launching thread, as the device loop's kernels are.
        super::LAUNCHING.set(true);
        for round in 0..50u64 {
            pool.keep_warm();
            let warm = pool.warm.load(Ordering::Relaxed);
            assert!(warm <= 1, "{warm} threads kept warm");
            let sum: u64 = (0..4096u64).into_par_iter().map(|i| i ^ round).sum();
            assert_eq!(sum, (0..4096u64).map(|i| i ^ round).sum::<u64>());
        }
        super::LAUNCHING.set(false);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.warm.load(Ordering::Relaxed) > 0 {
        assert!(
            Instant::now() < deadline,
            "a kept-warm thread still spins 10 s after the last kernel"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// [`super::Workers::share`] runs each item once, whatever the thread count, its parts at
/// the same time, and a part that panics is the caller's panic, not a hang.
#[test]
fn shared_items_run_once_each_and_a_panic_reaches_the_caller() {
    use std::sync::atomic::{AtomicU32, Ordering};
    for threads in [1, 2, 4] {
        let pool = workers(threads);
        for count in [0, 1, 2, 3, 100] {
            let runs: Vec<AtomicU32> = (0..count).map(|_| AtomicU32::new(0)).collect();
            let mut out = vec![0usize; count];
            pool.share(out.iter_mut(), |i, o| {
                *o = i * 3;
                runs[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
            assert_eq!(out, (0..count).map(|i| i * 3).collect::<Vec<_>>());
        }
        // Parts run at the same time: each waits here for the other (a part holding
        // what the next part's thread needs to take it would leave it waiting alone).
        let arrived = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let parts = threads.min(2) as u32;
        pool.share(0..parts, |_, _| {
            arrived.fetch_add(1, Ordering::SeqCst);
            while arrived.load(Ordering::SeqCst) < parts && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        });
        assert!(
            Instant::now() < deadline,
            "{threads} threads: the parts ran one after the other"
        );
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.share(0..50, |i, _: usize| assert!(i != 37, "item 37"));
        }));
        assert!(panicked.is_err(), "{threads} threads: the panic was lost");
    }
}
