//! The `cpu` backend: buffers in host RAM, kernels on a private rayon pool.
//!
//! Results are bit-identical whatever the pool's thread count: see [`gemm`] for MATMUL
//! and [`ops`] for the rest. Transcendental functions are computed by [`math`] from basic
//! IEEE operations, so they do not depend on the host's libm either.

mod gemm;
mod math;
mod ops;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rayon::{ThreadPool, ThreadPoolBuilder};

use super::{Backend, BackendError, BufferId};
use crate::kernel::{Distribution, Kernel};

#[cfg(target_endian = "big")]
compile_error!(
    "the cpu backend stores device memory in host byte order, which must be little-endian"
);

/// Device memory and kernels in host RAM.
pub struct CpuBackend {
    pool: ThreadPool,
    /// Buffers as f32 words (u32 data shares the storage through bytemuck casts).
    buffers: HashMap<BufferId, Box<[f32]>>,
}

impl core::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.pool.current_num_threads())
            .field("buffers", &self.buffers.len())
            .finish()
    }
}

/// Read access to the buffers a kernel does not write.
struct Inputs<'a>(&'a HashMap<BufferId, Box<[f32]>>);

impl Inputs<'_> {
    fn f32(&self, id: BufferId) -> &[f32] {
        self.0
            .get(&id)
            .expect("kernel input buffer validated by the device")
    }

    fn u32(&self, id: BufferId) -> &[u32] {
        bytemuck::cast_slice(self.f32(id))
    }
}

impl CpuBackend {
    /// A backend running kernels on `threads` threads (at least 1).
    ///
    /// # Panics
    ///
    /// If the host cannot start the threads.
    pub fn new(threads: usize) -> CpuBackend {
        let threads = threads.max(1);
        let pool = ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferry-accel-{i}"))
            .build()
            .expect("cannot start the accelerator's kernel threads");
        CpuBackend {
            pool,
            buffers: HashMap::new(),
        }
    }

    /// Takes the `outputs` buffers out of the map, runs `f` on them with the others
    /// readable, and puts them back (even when `f` fails). The device guarantees that
    /// outputs are distinct from each other and from the inputs.
    fn with_outputs<const N: usize>(
        &mut self,
        outputs: [BufferId; N],
        f: impl FnOnce(&ThreadPool, &Inputs<'_>, [&mut [f32]; N]) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let mut taken = outputs.map(|id| {
            self.buffers
                .remove(&id)
                .expect("kernel output buffer validated by the device")
        });
        let result = f(
            &self.pool,
            &Inputs(&self.buffers),
            taken.each_mut().map(|b| &mut **b),
        );
        for (id, buffer) in outputs.into_iter().zip(taken) {
            self.buffers.insert(id, buffer);
        }
        result
    }

    fn buffer(&self, id: BufferId) -> &[u8] {
        bytemuck::cast_slice(
            self.buffers
                .get(&id)
                .expect("buffer validated by the device"),
        )
    }
}

/// Asks the kernel to back a large buffer with transparent huge pages. A migration fills
/// gigabytes of fresh buffers on the destination, and under nested virtualization a page
/// fault per 4 KiB (rather than per 2 MiB) makes that several times slower than memory.
fn advise_huge_pages(buffer: &mut [f32]) {
    const HUGE: usize = 2 << 20;
    let start = buffer.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buffer);
    let aligned = start.next_multiple_of(HUGE);
    if end < aligned + HUGE {
        return;
    }
    let len = (end - aligned) / HUGE * HUGE;
    // SAFETY: [aligned, aligned + len) lies inside `buffer`, which is ours and stays
    // allocated across the call; MADV_HUGEPAGE changes only how the kernel backs those
    // pages, never their contents. A failure (THP off) leaves small pages: ignored.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn kernel_version(&self) -> u32 {
        1
    }

    fn alloc(&mut self, id: BufferId, bytes: u64) -> Result<(), BackendError> {
        let words =
            usize::try_from(bytes.div_ceil(4)).map_err(|_| BackendError::Alloc { bytes })?;
        // alloc_zeroed: large buffers come as untouched zero pages from the OS.
        let mut buffer = bytemuck::allocation::try_zeroed_slice_box::<f32>(words)
            .map_err(|()| BackendError::Alloc { bytes })?;
        advise_huge_pages(&mut buffer);
        self.buffers.insert(id, buffer);
        Ok(())
    }

    fn free(&mut self, id: BufferId) {
        self.buffers.remove(&id);
    }

    fn write(&mut self, id: BufferId, offset: u64, data: &[u8]) {
        let buffer = self
            .buffers
            .get_mut(&id)
            .expect("buffer validated by the device");
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buffer);
        let start = usize::try_from(offset).expect("offset validated by the device");
        bytes[start..][..data.len()].copy_from_slice(data);
    }

    fn read(&self, id: BufferId, offset: u64, out: &mut [u8]) {
        let start = usize::try_from(offset).expect("offset validated by the device");
        out.copy_from_slice(&self.buffer(id)[start..][..out.len()]);
    }

    fn launch(&mut self, kernel: &Kernel) -> Result<(), BackendError> {
        match *kernel {
            Kernel::Matmul {
                a,
                b,
                c,
                m,
                n,
                k,
                transpose_a,
                transpose_b,
                accumulate,
            } => {
                let g = gemm::Gemm {
                    m,
                    n,
                    k,
                    transpose_a,
                    transpose_b,
                    accumulate,
                };
                self.with_outputs([c], |pool, inp, [c]| {
                    g.run(pool, inp.f32(a), inp.f32(b), c);
                    Ok(())
                })
            }
            Kernel::AddBias {
                x,
                bias,
                rows,
                cols,
            } => self.with_outputs([x], |pool, inp, [x]| {
                ops::add_bias(pool, x, inp.f32(bias), rows, cols);
                Ok(())
            }),
            Kernel::Add { a, b, out, n } => self.with_outputs([out], |pool, inp, [out]| {
                ops::add(pool, inp.f32(a), inp.f32(b), out, n);
                Ok(())
            }),
            Kernel::Mul { a, b, out, n } => self.with_outputs([out], |pool, inp, [out]| {
                ops::mul(pool, inp.f32(a), inp.f32(b), out, n);
                Ok(())
            }),
            Kernel::Scale { x, n, alpha } => self.with_outputs([x], |pool, _, [x]| {
                ops::scale(pool, x, n, alpha);
                Ok(())
            }),
            Kernel::Axpy { x, y, n, alpha } => self.with_outputs([y], |pool, inp, [y]| {
                ops::axpy(pool, inp.f32(x), y, n, alpha);
                Ok(())
            }),
            Kernel::Relu { x, out, n } => self.with_outputs([out], |pool, inp, [out]| {
                ops::relu(pool, inp.f32(x), out, n);
                Ok(())
            }),
            Kernel::ReluBackward {
                x,
                grad_out,
                grad_in,
                n,
            } => self.with_outputs([grad_in], |pool, inp, [gi]| {
                ops::relu_backward(pool, inp.f32(x), inp.f32(grad_out), gi, n);
                Ok(())
            }),
            Kernel::Gelu { x, out, n } => self.with_outputs([out], |pool, inp, [out]| {
                ops::gelu(pool, inp.f32(x), out, n);
                Ok(())
            }),
            Kernel::GeluBackward {
                x,
                grad_out,
                grad_in,
                n,
            } => self.with_outputs([grad_in], |pool, inp, [gi]| {
                ops::gelu_backward(pool, inp.f32(x), inp.f32(grad_out), gi, n);
                Ok(())
            }),
            Kernel::Softmax { x, out, rows, cols } => {
                self.with_outputs([out], |pool, inp, [out]| {
                    ops::softmax(pool, inp.f32(x), out, rows, cols);
                    Ok(())
                })
            }
            Kernel::CrossEntropy {
                logits,
                labels,
                grad,
                loss,
                rows,
                cols,
            } => self.with_outputs([grad, loss], |pool, inp, [grad, loss]| {
                ops::cross_entropy(
                    pool,
                    inp.f32(logits),
                    inp.u32(labels),
                    grad,
                    loss,
                    rows,
                    cols,
                )
            }),
            Kernel::SumRows { x, out, rows, cols } => {
                self.with_outputs([out], |pool, inp, [out]| {
                    ops::sum_rows(pool, inp.f32(x), out, rows, cols);
                    Ok(())
                })
            }
            Kernel::SumCols { x, out, rows, cols } => {
                self.with_outputs([out], |pool, inp, [out]| {
                    ops::sum_cols(pool, inp.f32(x), out, rows, cols);
                    Ok(())
                })
            }
            Kernel::Sgd { param, grad, n, lr } => self.with_outputs([param], |pool, inp, [p]| {
                ops::sgd(pool, p, inp.f32(grad), n, lr);
                Ok(())
            }),
            Kernel::Adam {
                param,
                grad,
                m,
                v,
                n,
                lr,
                beta1,
                beta2,
                eps,
                step,
            } => {
                let h = ops::AdamParams {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    step,
                };
                self.with_outputs([param, m, v], |pool, inp, [p, m, v]| {
                    ops::adam(pool, p, inp.f32(grad), m, v, n, h);
                    Ok(())
                })
            }
            Kernel::Embedding {
                table,
                ids,
                out,
                count,
                dim,
                vocab,
            } => self.with_outputs([out], |pool, inp, [out]| {
                ops::embedding(pool, inp.f32(table), inp.u32(ids), out, count, dim, vocab)
            }),
            Kernel::LayerNorm {
                x,
                gamma,
                beta,
                out,
                rows,
                cols,
                eps,
            } => self.with_outputs([out], |pool, inp, [out]| {
                ops::layer_norm(
                    pool,
                    inp.f32(x),
                    inp.f32(gamma),
                    inp.f32(beta),
                    out,
                    (rows, cols),
                    eps,
                );
                Ok(())
            }),
            Kernel::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                n,
            } => self.with_outputs([dst], |_, inp, [dst]| {
                ops::copy(inp.f32(src), src_offset, dst, dst_offset, n);
                Ok(())
            }),
            Kernel::RngFill {
                out,
                n,
                seed,
                counter,
                distribution,
                scale,
            } => self.with_outputs([out], |pool, _, [out]| {
                ops::rng_fill(pool, out, n, seed, counter, distribution, scale);
                Ok(())
            }),
            Kernel::AttentionDecode {
                q,
                k_cache,
                v_cache,
                out,
                heads,
                head_dim,
                len,
            } => {
                let shape = ops::AttentionShape {
                    heads,
                    head_dim,
                    len,
                };
                self.with_outputs([out], |pool, inp, [out]| {
                    let (q, kc, vc) = (inp.f32(q), inp.f32(k_cache), inp.f32(v_cache));
                    ops::attention_decode(pool, q, kc, vc, out, shape);
                    Ok(())
                })
            }
            Kernel::Argmax { x, out, rows, cols } => {
                self.with_outputs([out], |pool, inp, [out]| {
                    ops::argmax(pool, inp.f32(x), bytemuck::cast_slice_mut(out), rows, cols);
                    Ok(())
                })
            }
        }
    }
}

/// The GEMM microkernel this host uses ("x86_64-fma" on every x86-64 CPU with AVX2 and
/// FMA). `kind` and `kernel_version` promise bit-identical results only between hosts
/// where this is also equal; a migration check may want to compare it too.
pub fn gemm_microkernel() -> &'static str {
    gemm::microkernel()
}

/// Best time of `run` over at least 3 runs and about `budget` in all, after one warm-up.
fn best_time(budget: Duration, mut run: impl FnMut()) -> Duration {
    run();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || start.elapsed() < budget {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

/// Measures an `n×n×n` MATMUL with `threads` threads, in GFLOP/s (2n³ flops per
/// multiplication, best of several runs): through [`CpuBackend::launch`] (fixed tiles,
/// deterministic) and calling `matrixmultiply::sgemm` directly on `threads` equal row
/// blocks (the crate's fastest use of that many threads, not deterministic across thread
/// counts). Returns `(backend, direct)`.
pub fn bench_gemm(n: usize, threads: usize) -> (f64, f64) {
    let n = n.max(1);
    let threads = threads.max(1);
    let flops = 2.0 * (n as f64).powi(3);
    let budget = Duration::from_millis(400);
    let gflops = |t: Duration| flops / t.as_secs_f64().max(1e-9) / 1e9;
    let bytes = (n * n * 4) as u64;

    let mut backend = CpuBackend::new(threads);
    for id in 1..=3 {
        backend.alloc(id, bytes).expect("benchmark buffers");
    }
    let fill = |out, seed| Kernel::RngFill {
        out,
        n: n * n,
        seed,
        counter: 0,
        distribution: Distribution::Uniform,
        scale: 1.0,
    };
    for (id, seed) in [(1, 1), (2, 2)] {
        backend.launch(&fill(id, seed)).expect("benchmark fill");
    }
    let mm = Kernel::Matmul {
        a: 1,
        b: 2,
        c: 3,
        m: n,
        n,
        k: n,
        transpose_a: false,
        transpose_b: false,
        accumulate: false,
    };
    let backend_time = best_time(budget, || backend.launch(&mm).expect("benchmark matmul"));

    let a = backend.buffers[&1].clone();
    let b = backend.buffers[&2].clone();
    let mut c = vec![0.0f32; n * n];
    let pool = &backend.pool;
    let direct_time = best_time(budget, || {
        gemm::direct(pool, threads, &a, &b, &mut c, (n, n, n))
    });
    (gflops(backend_time), gflops(direct_time))
}
