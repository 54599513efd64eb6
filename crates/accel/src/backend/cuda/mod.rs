//! The `cuda` backend: buffers in GPU memory, kernels from `kernels.cu`.
//!
//! What runs where is split in two, so that everything but the driver calls is checked on
//! machines without a GPU:
//!
//! - [`GpuBackend`] implements [`Backend`] over any [`Gpu`]: it keeps the buffer table,
//!   checks data-dependent conditions, and turns each [`Kernel`] into launches of
//!   `kernels.cu` ([`plan`]);
//! - [`driver::CudaGpu`] is the real [`Gpu`]: NVRTC compiles `kernels.cu` at start, and
//!   the CUDA driver runs it (loaded at run time: a build needs no CUDA, and a host
//!   without it gets an error, never a crash);
//! - [`emulator::Emulator`] compiles the same `kernels.cu` with the host's C++ compiler
//!   and runs each kernel's threads one after another on the CPU, so every kernel's code
//!   is checked against the cpu backend on hosts without a GPU (the tests, and whole VMs
//!   with `FERRY_CUDA_EMULATOR=1`: see [`super::cuda_kind`]).
//!
//! Every output element, row or dot product is computed by one thread in a fixed order
//! (see `kernels.cu`), so the bits depend only on the data; all kernels but MATMUL follow
//! the cpu backend's arithmetic and give its bits.

pub mod conformance;
pub mod driver;
pub mod emulator;

use std::sync::Arc;

use super::{
    check_indices_part, index_check, lookup_dtype, Backend, BackendError, BufferId, BufferReader,
    BufferTable,
};
use crate::kernel::Indices;
use crate::kernel::{DType, Kernel, RopeStyle};
use ferry_abi::accel::kernel::within_launch_work;

/// The CUDA C source of every kernel.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Version of `kernels.cu`'s arithmetic: hosts replay each other's commands only when
/// it is equal (with the GPU architecture and driver, in [`Gpu::description`]). 2: MATMUL
/// with few outputs slices its depth. 3: ROPE divides each pair's frequency by a factor.
pub const KERNEL_VERSION: u32 = 3;

/// The names of `kernels.cu`'s entry points, in the order [`plan`] may use them.
pub const ENTRY_POINTS: &[&str] = &[
    "ferry_add_bias",
    "ferry_add",
    "ferry_mul",
    "ferry_scale",
    "ferry_axpy",
    "ferry_relu",
    "ferry_relu_backward",
    "ferry_gelu",
    "ferry_gelu_backward",
    "ferry_sgd",
    "ferry_adam",
    "ferry_swiglu",
    "ferry_copy",
    "ferry_rng_fill",
    "ferry_softmax",
    "ferry_cross_entropy_rows",
    "ferry_cross_entropy_mean",
    "ferry_sum_rows",
    "ferry_sum_cols",
    "ferry_layer_norm",
    "ferry_layer_norm_stats",
    "ferry_layer_norm_apply",
    "ferry_rms_norm",
    "ferry_rms_norm_inv",
    "ferry_rms_norm_apply",
    "ferry_argmax",
    "ferry_argmax_chunks",
    "ferry_argmax_pick",
    "ferry_rope",
    "ferry_attention_decode",
    "ferry_attention_decode_scores",
    "ferry_attention_decode_max",
    "ferry_attention_decode_exps",
    "ferry_attention_decode_values",
    "ferry_attention",
    "ferry_attention_scores",
    "ferry_attention_max",
    "ferry_attention_exps",
    "ferry_attention_values",
    "ferry_matmul",
    "ferry_matmul_tiled",
    "ferry_matmul_split",
    "ferry_matmul_split_sum",
    "ferry_qprepare",
    "ferry_qmatmul",
    "ferry_qmatmul_lanes",
    "ferry_qmatmul_sum",
    "ferry_qembedding",
];

/// A kernel's one argument: sixteen words (addresses, counts, scalars as their bits), as
/// `kernels.cu` declares `Args`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Args(pub [u64; 16]);

/// One launch of an entry point of `kernels.cu` over `items` work items.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The entry point.
    pub entry: &'static str,
    /// Its argument.
    pub args: Args,
    /// Work items (one thread each).
    pub items: u64,
}

/// Errors of a GPU or of its driver.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The CUDA driver library is not on this host.
    #[error("no CUDA driver on this host (libcuda.so was not found): use the cpu backend")]
    NoDriver,
    /// The driver has no GPU to offer.
    #[error("no CUDA GPU on this host: {0}")]
    NoDevice(String),
    /// NVRTC (the runtime compiler) is not on this host.
    #[error("NVRTC (libnvrtc.so, the CUDA runtime compiler) was not found: install the CUDA toolkit, or the nvidia-cuda-nvrtc-cu12 wheel and put its lib folder on LD_LIBRARY_PATH")]
    NoCompiler,
    /// `kernels.cu` did not compile.
    #[error("the CUDA kernels did not compile: {0}")]
    Compile(String),
    /// `FERRY_CUDA_LAUNCH_WINDOW` is not a count.
    #[error("FERRY_CUDA_LAUNCH_WINDOW={0:?} is not a count of launches (0: unbounded)")]
    LaunchWindow(String),
    /// A driver call failed.
    #[error("CUDA {what} failed: {message}")]
    Driver {
        /// The operation.
        what: &'static str,
        /// What the driver said.
        message: String,
    },
}

/// What [`GpuBackend`] needs of a GPU: memory, copies and launches of `kernels.cu`. The
/// backend calls it from its device thread; a [`BufferReader`] from any other.
pub trait Gpu: Send + Sync + 'static {
    /// One allocation of device memory.
    type Memory: Send + Sync;
    /// The device and what its results depend on (architecture, driver), for `kind`.
    fn description(&self) -> String;
    /// `bytes` of zeroed device memory.
    fn alloc(&self, bytes: u64) -> Result<Self::Memory, GpuError>;
    /// The device address of `memory`, as kernels take it.
    fn address(&self, memory: &Self::Memory) -> u64;
    /// Copies `data` into `memory` at `offset`, after every launch before it.
    fn write(&self, memory: &Self::Memory, offset: u64, data: &[u8]) -> Result<(), GpuError>;
    /// Copies `memory` from `offset` into `out`, after the last launch or write that
    /// changes `memory` (not after unrelated launches).
    fn read(&self, memory: &Self::Memory, offset: u64, out: &mut [u8]) -> Result<(), GpuError>;
    /// Runs `launch`, which writes `writes` (their next reads wait for it).
    fn launch(&self, launch: &Launch, writes: &[&Self::Memory]) -> Result<(), GpuError>;
}

/// A buffer: its device memory and its size in bytes.
struct GpuBuffer<M> {
    memory: M,
    bytes: u64,
}

/// The buffer table and the GPU it is on, shared with [`BufferReader`]s.
struct Buffers<G: Gpu> {
    gpu: Arc<G>,
    table: BufferTable<GpuBuffer<G::Memory>>,
}

impl<G: Gpu> Buffers<G> {
    fn get(&self, id: BufferId) -> Option<Arc<GpuBuffer<G::Memory>>> {
        self.table.get(id)
    }

    fn expect(&self, id: BufferId) -> Arc<GpuBuffer<G::Memory>> {
        self.table.expect(id)
    }
}

impl<G: Gpu> BufferReader for Buffers<G> {
    fn with_buffer(&self, id: BufferId, f: &mut dyn FnMut(&[u8])) -> bool {
        let Some(buffer) = self.get(id) else {
            return false;
        };
        let mut bytes = vec![0u8; buffer.bytes as usize];
        if let Err(e) = self.gpu.read(&buffer.memory, 0, &mut bytes) {
            tracing::error!(buffer = id, "cannot read a device buffer: {e}");
            return false;
        }
        f(&bytes);
        true
    }

    fn crc32(&self, id: BufferId) -> Option<u32> {
        // In pieces: a GPU buffer may be larger than the host can copy whole.
        const PIECE: u64 = 64 << 20;
        let buffer = self.get(id)?;
        let mut crc = crc32fast::Hasher::new();
        let mut piece = Vec::new();
        let mut at = 0;
        while at < buffer.bytes {
            let len = PIECE.min(buffer.bytes - at);
            piece.resize(len as usize, 0);
            if let Err(e) = self.gpu.read(&buffer.memory, at, &mut piece) {
                tracing::error!(buffer = id, "cannot read a device buffer: {e}");
                return None;
            }
            crc.update(&piece);
            at += len;
        }
        Some(crc.finalize())
    }

    fn read_range(
        &self,
        id: BufferId,
        range: std::ops::Range<u64>,
        out: &mut Vec<u8>,
    ) -> Option<u64> {
        let buffer = self.get(id)?;
        let (start, end) = (range.start.min(buffer.bytes), range.end.min(buffer.bytes));
        out.resize((end - start.min(end)) as usize, 0);
        if let Err(e) = self.gpu.read(&buffer.memory, start, out) {
            tracing::error!(buffer = id, "cannot read a device buffer: {e}");
            return None;
        }
        Some(buffer.bytes)
    }
}

/// Device memory a launch needs besides its buffers (QMATMUL's prepared inputs,
/// CROSS_ENTROPY's row losses), kept and grown as needed.
struct Scratch<M> {
    memory: M,
    bytes: u64,
}

/// Kernels on a [`Gpu`].
pub struct GpuBackend<G: Gpu> {
    buffers: Arc<Buffers<G>>,
    scratch: Option<Scratch<G::Memory>>,
    kind: &'static str,
}

impl<G: Gpu> std::fmt::Debug for GpuBackend<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("gpu", &self.buffers.gpu.description())
            .finish()
    }
}

/// Bytes QMATMUL's prepared inputs take for `m` rows of `k`: 16-bit inputs, then a scale
/// and eight lane sums per block of 32. Each region is rounded up to [`SCRATCH_ALIGN`], so
/// the f32 regions after it are aligned whatever `m·k` is (a GPU faults on a misaligned
/// address: an odd count of f32 inputs put the lanes that follow at an odd address).
fn prepared_bytes(m: usize, k: usize) -> (u64, u64, u64) {
    let elems = (m * k) as u64;
    let blocks = elems / 32;
    let aligned = |bytes: u64| bytes.next_multiple_of(SCRATCH_ALIGN);
    (
        aligned(2 * elems),
        aligned(4 * blocks),
        aligned(32 * blocks),
    )
}

/// Input elements QMATMUL prepares at a time (about 13 MiB of scratch), as the cpu
/// backend does: a guest may give billions of rows, whose prepared form, 3 bytes an
/// element, would lie outside the VM's device memory.
const QMATMUL_INPUTS: usize = if cfg!(test) { 1 << 12 } else { 1 << 22 };

/// Input rows QMATMUL prepares and multiplies at a time, of `m` rows of `k`: at least one.
fn qmatmul_run_rows(m: usize, k: usize) -> usize {
    (QMATMUL_INPUTS / k.max(1)).clamp(1, m.max(1))
}

/// Alignment of each region of scratch memory (its start is the allocation's, aligned
/// for every element type).
const SCRATCH_ALIGN: u64 = 16;

/// Outputs from which MATMUL computes 4×4 tiles per thread.
pub const TILED_MATMUL_OUTPUTS: usize = 1 << 16;

/// Threads a MATMUL with few outputs is spread over, slicing its depth (about what keeps an
/// H200's memory busy; fixed, so the slices, and so the bits, depend on the shape alone).
const SPLIT_MATMUL_THREADS: usize = 1 << 17;

/// The shortest slice of depth a MATMUL thread is given.
const SPLIT_MATMUL_MIN_DEPTH: usize = 32;

/// How MATMUL of `m×k` by `k×n` slices its depth, as (slices, depth per slice), when its
/// outputs alone are too few threads to fill a GPU: a decode step's matrix-vector products
/// have a few thousand outputs, each thousands deep.
fn matmul_splits(m: usize, n: usize, k: usize) -> Option<(usize, usize)> {
    let outputs = m * n;
    if outputs == 0 || outputs >= TILED_MATMUL_OUTPUTS || k < 2 * SPLIT_MATMUL_MIN_DEPTH {
        return None;
    }
    let wanted = (SPLIT_MATMUL_THREADS / outputs).min(k / SPLIT_MATMUL_MIN_DEPTH);
    let depth = k.div_ceil(wanted.max(1));
    // No empty slice at the end.
    let splits = k.div_ceil(depth);
    (splits > 1).then_some((splits, depth))
}

/// Most bytes of scores (and as many of their exponentials) an attention keeps, so that
/// each is computed once: past it, each thread of the output computes its head's again.
const MAX_ATTENTION_SCRATCH: u64 = 64 << 20;

/// Where attention keeps its scores: for how many of its rows at once, and the bytes of
/// each of its two regions of scratch memory (the scores, then their exponentials), which
/// the largest score of each (row, head) follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScoreRoom {
    rows: usize,
    region: u64,
    maxes: u64,
}

impl ScoreRoom {
    /// Bytes of scratch memory it takes.
    fn bytes(&self) -> u64 {
        2 * self.region + self.maxes
    }
}

/// The room `kernel`'s scores take if they are kept ([`MAX_ATTENTION_SCRATCH`] at most):
/// `heads·len` f64 for ATTENTION_DECODE, and for ATTENTION `heads·(pos + rows)` f32 for
/// each of as many rows as fit (rows shorter than the last leave the rest of theirs
/// unused; a batch of more rows runs in parts); and a largest score (as f64) for each of
/// their heads.
fn score_room(kernel: &Kernel) -> Option<ScoreRoom> {
    let aligned = |bytes: u64| bytes.next_multiple_of(SCRATCH_ALIGN);
    let (heads, rows, region) = match *kernel {
        Kernel::AttentionDecode { heads, len, .. } => (
            heads,
            1,
            aligned(8 * (heads as u64).checked_mul(len as u64)?),
        ),
        Kernel::Attention {
            rows, heads, pos, ..
        } => {
            let span = (pos as u64).checked_add(rows as u64)?;
            // A row's scores and exponentials, its heads' maxima, and each region's
            // alignment.
            let row = 8 * (heads as u64).checked_mul(span)? + 8 * heads as u64;
            let fit = (MAX_ATTENTION_SCRATCH - 3 * SCRATCH_ALIGN) / row.max(1);
            let at_once = rows.min(usize::try_from(fit).unwrap_or(usize::MAX));
            (heads, at_once, aligned(4 * (heads * at_once) as u64 * span))
        }
        _ => return None,
    };
    let maxes = aligned(8 * (heads as u64).checked_mul(rows as u64)?);
    let room = ScoreRoom {
        rows,
        region,
        maxes,
    };
    (rows > 0 && room.bytes() <= MAX_ATTENTION_SCRATCH).then_some(room)
}

/// Rows below which a norm computes each row's statistics in a thread, then each element
/// in a thread of its own: one thread per row, which normalizes its columns too, leaves a
/// GPU all but idle for a decode step's single row.
const NORM_APART_ROWS: usize = 64;

/// Whether a norm of `rows` rows runs in two steps (see [`NORM_APART_ROWS`]).
fn norm_apart(rows: usize) -> bool {
    rows < NORM_APART_ROWS
}

/// Columns each thread of a wide ARGMAX scans for its chunk's pick.
const ARGMAX_CHUNK: usize = 256;

/// The chunks a row of `cols` is scanned in (a thread each, their picks then taken in
/// order by a thread per row), when it is wide enough to need them: a vocabulary's 49,152
/// logits were one thread's 49,152 steps in every decode step.
fn argmax_chunks(cols: usize) -> Option<usize> {
    (cols >= 2 * ARGMAX_CHUNK).then(|| cols.div_ceil(ARGMAX_CHUNK))
}

/// Most bytes of lane partials a QMATMUL keeps (eight f32 per output): up to this, each
/// lane of each output is a thread of its own.
const MAX_LANES_BYTES: u64 = 64 << 20;

/// Bytes of QMATMUL's lane partials for `m×n` outputs, if it computes lanes apart.
fn lanes_bytes(m: usize, n: usize) -> Option<u64> {
    Some(32 * (m * n) as u64).filter(|&b| b <= MAX_LANES_BYTES)
}

impl<G: Gpu> GpuBackend<G> {
    /// A backend on `gpu` (which other backends may share), reporting itself as `kind`.
    pub fn new(gpu: Arc<G>, kind: &'static str) -> Self {
        Self {
            buffers: Arc::new(Buffers {
                gpu,
                table: BufferTable::default(),
            }),
            scratch: None,
            kind,
        }
    }

    fn gpu(&self) -> &G {
        &self.buffers.gpu
    }

    fn address(&self, id: BufferId) -> u64 {
        self.gpu().address(&self.buffers.expect(id).memory)
    }

    /// The scratch memory's address, grown to at least `bytes` ([`scratch_room`]: a
    /// decode step's attention wants a little more than the last, and an allocation
    /// each step would cost more than its kernels).
    fn scratch(&mut self, bytes: u64) -> Result<u64, BackendError> {
        if self.scratch.as_ref().is_none_or(|s| s.bytes < bytes) {
            self.scratch = None;
            let bytes = scratch_room(bytes);
            let memory = self
                .gpu()
                .alloc(bytes)
                .map_err(|_| BackendError::Alloc { bytes })?;
            self.scratch = Some(Scratch { memory, bytes });
        }
        let scratch = self.scratch.as_ref().expect("just made");
        Ok(self.gpu().address(&scratch.memory))
    }

    /// Reads back the values `check` bounds and checks them, in pieces of at most
    /// [`CHECK_PIECE`] values: the host memory it takes is bounded, whatever the buffer.
    fn check_indices(&self, check: &Indices) -> Result<(), BackendError> {
        let memory = &self.buffers.expect(check.buffer).memory;
        let mut bytes = vec![0u8; check.count.min(CHECK_PIECE) * 4];
        let mut values = Vec::with_capacity(check.count.min(CHECK_PIECE));
        let mut done = 0;
        while done < check.count {
            let n = (check.count - done).min(CHECK_PIECE);
            self.gpu()
                .read(memory, done as u64 * 4, &mut bytes[..n * 4])
                .map_err(|e| BackendError::Device(e.to_string()))?;
            values.clear();
            values.extend(
                bytes[..n * 4]
                    .chunks_exact(4)
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])),
            );
            check_indices_part(check, &values)?;
            done += n;
        }
        Ok(())
    }
}

/// Refuses a launch whose work here is beyond one launch's bound: this backend's fused
/// attention (the one it falls back on when scores would take too much scratch memory,
/// [`score_room`]) computes a head's scores again in each thread of its output, so its work
/// grows with the head's width squared, and a GPU kernel cannot be cut short (a pause, a
/// stop, another VM on the GPU would wait for minutes of very wide heads). The kernel
/// table counts that much for every backend already
/// ([`ferry_abi::accel::kernel::attention_within_work`], so that a VM moving between
/// kinds of host is refused nothing new); this keeps the bound here should it not.
fn check_gpu_work(kernel: &Kernel) -> Result<(), BackendError> {
    let work = match *kernel {
        Kernel::AttentionDecode {
            heads,
            head_dim,
            len,
            ..
        } => [1, heads, len, head_dim, head_dim].map(|f| f as u64),
        Kernel::Attention {
            rows,
            heads,
            head_dim,
            pos,
            ..
        } => [rows, heads, pos.saturating_add(rows), head_dim, head_dim].map(|f| f as u64),
        _ => return Ok(()),
    };
    if within_launch_work(&work) {
        Ok(())
    } else {
        Err(BackendError::TooMuchWork)
    }
}

/// Values of an index check read back at once: 4 MiB of host memory.
const CHECK_PIECE: usize = 1 << 20;

/// Words of a launch's argument.
fn args(words: &[u64]) -> Args {
    let mut a = Args::default();
    a.0[..words.len()].copy_from_slice(words);
    a
}

/// A launch of `entry` over `items` work items with the argument `words`.
fn launch(entry: &'static str, words: &[u64], items: usize) -> Launch {
    Launch {
        entry,
        args: args(words),
        items: items as u64,
    }
}

fn f32w(v: f32) -> u64 {
    u64::from(v.to_bits())
}

/// The launches that run `kernel`, given each buffer's address, and (for QMATMUL and
/// CROSS_ENTROPY) the address of scratch memory of [`scratch_bytes`].
pub fn plan(kernel: &Kernel, at: impl Fn(BufferId) -> u64, scratch: u64) -> Vec<Launch> {
    let one = |entry, words: &[u64], items: usize| vec![launch(entry, words, items)];
    // A kernel whose LAUNCH arguments are already in the order of its entry point's
    // (the work items first after the buffers) passes them on as they are, without the
    // kernel id, its buffers as addresses.
    let as_launched = |entry, items| one(entry, &kernel.encode_with(&at)[1..], items);
    let u = |v: usize| v as u64;
    match *kernel {
        Kernel::Matmul {
            a,
            b,
            c,
            m,
            n,
            k,
            flags,
        } => {
            let flags = [flags.transpose_a, flags.transpose_b, flags.accumulate].map(u64::from);
            if let Some((splits, depth)) = matmul_splits(m, n, k) {
                let partials = (splits * m * n) as u64;
                return vec![
                    Launch {
                        entry: "ferry_matmul_split",
                        args: args(
                            &[
                                &[at(a), at(b), scratch, partials, u(m), u(n), u(k)],
                                &flags[..2],
                                &[u(depth)],
                            ]
                            .concat(),
                        ),
                        items: partials,
                    },
                    Launch {
                        entry: "ferry_matmul_split_sum",
                        args: args(&[scratch, at(c), u(m * n), u(splits), flags[2]]),
                        items: u(m * n),
                    },
                ];
            }
            // 4×4 tiles once there are enough of them to fill a GPU (same bits either way).
            let (entry, items) = if m * n >= TILED_MATMUL_OUTPUTS {
                ("ferry_matmul_tiled", m.div_ceil(4) * n.div_ceil(4))
            } else {
                ("ferry_matmul", m * n)
            };
            one(
                entry,
                &[
                    &[at(a), at(b), at(c), u(items), u(m), u(n), u(k)],
                    &flags[..],
                ]
                .concat(),
                items,
            )
        }
        Kernel::AddBias {
            x,
            bias,
            rows,
            cols,
        } => one(
            "ferry_add_bias",
            &[at(x), at(bias), u(rows * cols), u(cols)],
            rows * cols,
        ),
        Kernel::Add { n, .. } => as_launched("ferry_add", n),
        Kernel::Mul { n, .. } => as_launched("ferry_mul", n),
        Kernel::Scale { n, .. } => as_launched("ferry_scale", n),
        Kernel::Axpy { n, .. } => as_launched("ferry_axpy", n),
        Kernel::Relu { n, .. } => as_launched("ferry_relu", n),
        Kernel::ReluBackward { n, .. } => as_launched("ferry_relu_backward", n),
        Kernel::Gelu { n, .. } => as_launched("ferry_gelu", n),
        Kernel::GeluBackward { n, .. } => as_launched("ferry_gelu_backward", n),
        Kernel::Softmax { rows, .. } => as_launched("ferry_softmax", rows),
        Kernel::CrossEntropy {
            logits,
            labels,
            grad,
            loss,
            rows,
            cols,
        } => vec![
            Launch {
                entry: "ferry_cross_entropy_rows",
                args: args(&[at(logits), at(labels), at(grad), scratch, u(rows), u(cols)]),
                items: u(rows),
            },
            Launch {
                entry: "ferry_cross_entropy_mean",
                args: args(&[scratch, at(loss), 1, u(rows)]),
                items: 1,
            },
        ],
        Kernel::SumRows { rows, .. } => as_launched("ferry_sum_rows", rows),
        Kernel::SumCols { x, out, rows, cols } => {
            one("ferry_sum_cols", &[at(x), at(out), u(cols), u(rows)], cols)
        }
        Kernel::Sgd { n, .. } => as_launched("ferry_sgd", n),
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
            // The bias corrections as the cpu backend computes them, once.
            let (bc1, bc2) = super::cpu::adam_bias_corrections(beta1, beta2, step);
            one(
                "ferry_adam",
                &[
                    at(param),
                    at(grad),
                    at(m),
                    at(v),
                    u(n),
                    f32w(lr),
                    f32w(beta1),
                    f32w(beta2),
                    f32w(eps),
                    bc1.to_bits(),
                    bc2.to_bits(),
                ],
                n,
            )
        }
        Kernel::Embedding {
            table,
            ids,
            out,
            count,
            dim,
            ..
        }
        | Kernel::QEmbedding {
            table,
            ids,
            out,
            count,
            dim,
            ..
        } => {
            let dtype = lookup_dtype(kernel);
            one(
                "ferry_qembedding",
                &[
                    at(table),
                    at(ids),
                    at(out),
                    u(count * dim),
                    u(dim),
                    dtype
                        .row_bytes(dim as u64)
                        .expect("dim validated by the device"),
                    dtype.code(),
                ],
                count * dim,
            )
        }
        Kernel::LayerNorm {
            x,
            gamma,
            beta,
            out,
            rows,
            cols,
            eps,
        } if norm_apart(rows) => {
            let stats = [at(x), scratch, u(rows), u(cols), f32w(eps)];
            let apply = [
                at(x),
                at(gamma),
                at(beta),
                scratch,
                at(out),
                u(rows * cols),
                u(cols),
            ];
            vec![
                launch("ferry_layer_norm_stats", &stats, rows),
                launch("ferry_layer_norm_apply", &apply, rows * cols),
            ]
        }
        Kernel::LayerNorm { rows, .. } => as_launched("ferry_layer_norm", rows),
        Kernel::Copy {
            src,
            src_offset,
            dst,
            dst_offset,
            n,
        } => one(
            "ferry_copy",
            &[at(src), at(dst), u(n), u(src_offset), u(dst_offset)],
            n,
        ),
        Kernel::RngFill { n, .. } => as_launched("ferry_rng_fill", n),
        Kernel::AttentionDecode { .. } | Kernel::Attention { .. } => {
            attention_plan(kernel, at, score_room(kernel).map(|room| (scratch, room)))
        }
        Kernel::Argmax { x, out, rows, cols } => match argmax_chunks(cols) {
            None => as_launched("ferry_argmax", rows),
            Some(chunks) => {
                let picks = rows * chunks;
                let scan = [
                    at(x),
                    scratch,
                    u(picks),
                    u(cols),
                    u(ARGMAX_CHUNK),
                    u(chunks),
                ];
                let pick = [at(x), scratch, at(out), u(rows), u(cols), u(chunks)];
                vec![
                    launch("ferry_argmax_chunks", &scan, picks),
                    launch("ferry_argmax_pick", &pick, rows),
                ]
            }
        },
        Kernel::QMatmul {
            w,
            x,
            out,
            n,
            k,
            m,
            dtype,
        } => {
            let run = qmatmul_run_rows(m, k);
            let (q_bytes, d_bytes, sums_bytes) = prepared_bytes(run, k);
            let (q, d, sums) = (scratch, scratch + q_bytes, scratch + q_bytes + d_bytes);
            let shape = [u(n), u(k), dtype.code()];
            // A thread per lane where a run's lanes fit the scratch: decided for a whole run,
            // so the same for a ragged last one.
            let by_lane = lanes_bytes(run, n).is_some();
            let mut launches = Vec::new();
            // A run of input rows at a time, each with the scratch to itself: every output
            // row is its input row's alone, so the results are the same bits.
            for first in (0..m).step_by(run) {
                let m = run.min(m - first);
                let (x, out) = (at(x) + u(4 * first * k), at(out) + u(4 * first * n));
                if dtype.block_elems() > 1 {
                    let blocks = m * k / 32;
                    launches.push(Launch {
                        entry: "ferry_qprepare",
                        args: args(&[x, q, d, sums, u(blocks)]),
                        items: u(blocks),
                    });
                }
                if by_lane {
                    let lanes = scratch + q_bytes + d_bytes + sums_bytes;
                    launches.push(Launch {
                        entry: "ferry_qmatmul_lanes",
                        args: args(
                            &[&[at(w), x, lanes, q, d, sums, u(8 * m * n)], &shape[..]].concat(),
                        ),
                        items: u(8 * m * n),
                    });
                    launches.push(Launch {
                        entry: "ferry_qmatmul_sum",
                        args: args(&[&[at(w), x, out, lanes, u(m * n)], &shape[..]].concat()),
                        items: u(m * n),
                    });
                } else {
                    launches.push(Launch {
                        entry: "ferry_qmatmul",
                        args: args(&[&[at(w), x, out, q, d, sums, u(m * n)], &shape[..]].concat()),
                        items: u(m * n),
                    });
                }
            }
            launches
        }
        Kernel::RmsNorm {
            x,
            weight,
            out,
            rows,
            cols,
            eps,
        } if norm_apart(rows) => {
            let scale = [at(x), scratch, u(rows), u(cols), f32w(eps)];
            let apply = [at(x), at(weight), scratch, at(out), u(rows * cols), u(cols)];
            vec![
                launch("ferry_rms_norm_inv", &scale, rows),
                launch("ferry_rms_norm_apply", &apply, rows * cols),
            ]
        }
        Kernel::RmsNorm { rows, .. } => as_launched("ferry_rms_norm", rows),
        Kernel::Rope {
            x,
            factors,
            rows,
            heads,
            head_dim,
            pos,
            base,
            style,
        } => {
            let items = rows * heads * (head_dim / 2);
            one(
                "ferry_rope",
                &[
                    at(x),
                    at(factors),
                    u(items),
                    u(heads),
                    u(head_dim),
                    u(pos),
                    f32w(base),
                    u64::from(style == RopeStyle::HalfSplit),
                ],
                items,
            )
        }
        Kernel::Swiglu { n, .. } => as_launched("ferry_swiglu", n),
    }
}

/// The launches of an ATTENTION or ATTENTION_DECODE `kernel`: its scores, each head's
/// largest, their exponentials and its output apart, the first two kept at the scratch address given
/// (with its [`score_room`]), or with `None` the fused kernel, whose output threads each
/// compute their head's scores again. Both give the same bits.
fn attention_plan(
    kernel: &Kernel,
    at: impl Fn(BufferId) -> u64,
    kept: Option<(u64, ScoreRoom)>,
) -> Vec<Launch> {
    let u = |v: usize| v as u64;
    match *kernel {
        Kernel::AttentionDecode {
            q,
            k_cache,
            v_cache,
            out,
            heads,
            head_dim,
            len,
        } => {
            let (scores, outputs) = (heads * len, heads * head_dim);
            let shape = [u(heads), u(head_dim), u(len)];
            let Some((scratch, room)) = kept else {
                let buffers = [at(q), at(k_cache), at(v_cache), at(out), u(outputs)];
                return vec![launch(
                    "ferry_attention_decode",
                    &[&buffers[..], &shape].concat(),
                    outputs,
                )];
            };
            let (exps, maxes) = (scratch + room.region, scratch + 2 * room.region);
            vec![
                launch(
                    "ferry_attention_decode_scores",
                    &[&[at(q), at(k_cache), scratch, u(scores)], &shape[..]].concat(),
                    scores,
                ),
                launch(
                    "ferry_attention_decode_max",
                    &[scratch, maxes, u(heads), u(len)],
                    heads,
                ),
                launch(
                    "ferry_attention_decode_exps",
                    &[scratch, maxes, exps, u(scores), u(len)],
                    scores,
                ),
                launch(
                    "ferry_attention_decode_values",
                    &[&[exps, at(v_cache), at(out), u(outputs)], &shape[..]].concat(),
                    outputs,
                ),
            ]
        }
        Kernel::Attention {
            q,
            k_cache,
            v_cache,
            out,
            rows,
            heads,
            kv_heads,
            head_dim,
            pos,
        } => {
            let Some((scratch, room)) = kept else {
                let outputs = rows * heads * head_dim;
                let words = [at(q), at(k_cache), at(v_cache), at(out), u(outputs)];
                let shape = [u(heads), u(kv_heads), u(head_dim), u(pos)];
                return vec![launch(
                    "ferry_attention",
                    &[&words[..], &shape].concat(),
                    outputs,
                )];
            };
            let (exps, maxes) = (scratch + room.region, scratch + 2 * room.region);
            // Row `r` of a part from row `first` is row `first + r` of the whole, its
            // queries and outputs that far on, its length (`pos + first + r + 1`) the same.
            (0..rows)
                .step_by(room.rows)
                .flat_map(|first| {
                    let n = room.rows.min(rows - first);
                    let skip = 4 * u(first * heads * head_dim);
                    let (q, out) = (at(q) + skip, at(out) + skip);
                    let pos = pos + first;
                    let span = pos + n;
                    let (scores, outputs) = (n * heads * span, n * heads * head_dim);
                    let shape = [u(heads), u(kv_heads), u(head_dim), u(pos), u(span)];
                    [
                        launch(
                            "ferry_attention_scores",
                            &[&[q, at(k_cache), scratch, u(scores)], &shape[..]].concat(),
                            scores,
                        ),
                        launch(
                            "ferry_attention_max",
                            &[scratch, maxes, u(n * heads), u(heads), u(pos), u(span)],
                            n * heads,
                        ),
                        launch(
                            "ferry_attention_exps",
                            &[scratch, maxes, exps, u(scores), u(heads), u(pos), u(span)],
                            scores,
                        ),
                        launch(
                            "ferry_attention_values",
                            &[&[exps, at(v_cache), out, u(outputs)], &shape[..]].concat(),
                            outputs,
                        ),
                    ]
                })
                .collect()
        }
        _ => unreachable!("not an attention: {kernel:?}"),
    }
}

/// Scratch up to this size grows to a power of two at once.
const SCRATCH_DOUBLES_UP_TO: u64 = 64 << 20;

/// The scratch memory held for a launch needing `bytes`: the next power of two while
/// small, beyond [`SCRATCH_DOUBLES_UP_TO`] the next eighth of one. Scratch lies outside
/// the VM's device memory (QMATMUL's, the largest, is bounded by its runs of inputs): a
/// launch just past a power of two must not hold twice what it needs.
fn scratch_room(bytes: u64) -> u64 {
    if bytes <= SCRATCH_DOUBLES_UP_TO {
        return bytes.next_power_of_two();
    }
    let eighth = 1u64 << (63 - bytes.leading_zeros() - 3);
    bytes.div_ceil(eighth).saturating_mul(eighth)
}

/// Bytes of scratch memory [`plan`]'s launches of `kernel` use.
pub fn scratch_bytes(kernel: &Kernel) -> u64 {
    match *kernel {
        Kernel::QMatmul { n, k, m, .. } => {
            // A run of rows' at a time: the lanes follow the prepared inputs, whose room is
            // kept for every format.
            let run = qmatmul_run_rows(m, k);
            let (q, d, sums) = prepared_bytes(run, k);
            q + d + sums + lanes_bytes(run, n).unwrap_or(0)
        }
        Kernel::CrossEntropy { rows, .. } => 8 * rows as u64,
        Kernel::Matmul { m, n, k, .. } => {
            matmul_splits(m, n, k).map_or(0, |(splits, _)| 4 * (splits * m * n) as u64)
        }
        Kernel::AttentionDecode { .. } | Kernel::Attention { .. } => {
            score_room(kernel).map_or(0, |room| room.bytes())
        }
        Kernel::Argmax { rows, cols, .. } => {
            argmax_chunks(cols).map_or(0, |chunks| 4 * (rows * chunks) as u64)
        }
        // Each row's mean and scale; its scale.
        Kernel::LayerNorm { rows, .. } if norm_apart(rows) => 16 * rows as u64,
        Kernel::RmsNorm { rows, .. } if norm_apart(rows) => 8 * rows as u64,
        Kernel::LayerNorm { .. } | Kernel::RmsNorm { .. } => 0,
        // Named one by one, not `_`: a new kernel is given scratch (or none) by choice,
        // not handed address 0 by default.
        Kernel::AddBias { .. }
        | Kernel::Add { .. }
        | Kernel::Mul { .. }
        | Kernel::Scale { .. }
        | Kernel::Axpy { .. }
        | Kernel::Relu { .. }
        | Kernel::ReluBackward { .. }
        | Kernel::Gelu { .. }
        | Kernel::GeluBackward { .. }
        | Kernel::Softmax { .. }
        | Kernel::SumRows { .. }
        | Kernel::SumCols { .. }
        | Kernel::Sgd { .. }
        | Kernel::Adam { .. }
        | Kernel::Embedding { .. }
        | Kernel::Copy { .. }
        | Kernel::RngFill { .. }
        | Kernel::QEmbedding { .. }
        | Kernel::Rope { .. }
        | Kernel::Swiglu { .. } => 0,
    }
}

impl<G: Gpu> Backend for GpuBackend<G> {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn kernel_version(&self) -> u32 {
        KERNEL_VERSION
    }

    fn alloc(&mut self, id: BufferId, bytes: u64) -> Result<(), BackendError> {
        // Whole words, as the cpu backend keeps them (a kernel reads f32 or u32 elements).
        let memory = self
            .gpu()
            .alloc(bytes.next_multiple_of(4).max(4))
            .map_err(|_| BackendError::Alloc { bytes })?;
        self.buffers.table.insert(id, GpuBuffer { memory, bytes });
        Ok(())
    }

    fn free(&mut self, id: BufferId) {
        self.buffers.table.remove(id);
    }

    fn write(&mut self, id: BufferId, offset: u64, data: &[u8]) {
        let buffer = self.buffers.expect(id);
        // A failed copy is a failed GPU: the device stops (its loop reports the panic).
        self.gpu()
            .write(&buffer.memory, offset, data)
            .unwrap_or_else(|e| panic!("cannot write device buffer {id}: {e}"));
    }

    fn read(&self, id: BufferId, offset: u64, out: &mut [u8]) {
        let buffer = self.buffers.expect(id);
        self.gpu()
            .read(&buffer.memory, offset, out)
            .unwrap_or_else(|e| panic!("cannot read device buffer {id}: {e}"));
    }

    fn reader(&self) -> Arc<dyn BufferReader> {
        self.buffers.clone()
    }

    fn launch(&mut self, kernel: &Kernel) -> Result<(), BackendError> {
        // What only the data can say, checked before anything is written (as the cpu
        // backend does).
        check_gpu_work(kernel)?;
        if let Some(check) = index_check(kernel) {
            self.check_indices(&check)?;
        }
        let scratch = match scratch_bytes(kernel) {
            0 => 0,
            bytes => self.scratch(bytes)?,
        };
        let launches = plan(kernel, |id| self.address(id), scratch);
        let access = kernel.access().expect("kernel validated by the device");
        let written: Vec<_> = access
            .writes()
            .map(|(id, _)| self.buffers.expect(id))
            .collect();
        let writes: Vec<&G::Memory> = written.iter().map(|b| &b.memory).collect();
        for launch in &launches {
            self.gpu()
                .launch(launch, &writes)
                .map_err(|e| BackendError::Device(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scratch_grows_by_powers_of_two_then_by_eighths() {
        use super::{scratch_room, SCRATCH_DOUBLES_UP_TO};
        assert_eq!(scratch_room(1), 1);
        assert_eq!(scratch_room(3000), 4096);
        assert_eq!(scratch_room(SCRATCH_DOUBLES_UP_TO), SCRATCH_DOUBLES_UP_TO);
        // Just past 1 GiB: the next eighth of a GiB, not 2 GiB.
        assert_eq!(scratch_room((1 << 30) + 1), (1 << 30) + (1 << 27));
        assert_eq!(scratch_room(1_076_400_000), 9 << 27);
        for bytes in [(64 << 20) + 1, 100 << 20, 1 << 33, (1 << 40) - 7] {
            let room = scratch_room(bytes);
            assert!(
                room >= bytes && room - bytes <= bytes / 8,
                "{bytes}: {room}"
            );
        }
        assert_eq!(scratch_room(u64::MAX), u64::MAX);
    }

    #[test]
    fn qmatmul_scratch_is_a_run_of_inputs_whatever_the_rows() {
        use super::{scratch_bytes, DType, Kernel, QMATMUL_INPUTS};
        let qmatmul = |m| Kernel::QMatmul {
            w: 1,
            x: 2,
            out: 3,
            n: 4,
            k: 1024,
            m,
            dtype: DType::Q4_1,
        };
        let run = scratch_bytes(&qmatmul(QMATMUL_INPUTS / 1024));
        // A guest's billion rows take no more than a run's: 3 bytes an input and the lanes.
        assert_eq!(scratch_bytes(&qmatmul(1 << 30)), run);
        assert!(run <= 4 * QMATMUL_INPUTS as u64 + 32 * 4 * QMATMUL_INPUTS as u64 / 1024);
        assert!(scratch_bytes(&qmatmul(1)) < run);
    }

    use ferry_abi::accel::kernel as k;
    use ferry_abi::accel::COMMAND_ARGS;

    use super::*;

    /// `args` decoded with every buffer as large as a device could hold.
    fn kernel(args: &[u64]) -> Kernel {
        let mut full = [0u64; COMMAND_ARGS];
        full[..args.len()].copy_from_slice(args);
        Kernel::decode(&full, |_| Some(1 << 44)).unwrap().0
    }

    #[test]
    fn attention_this_backend_would_run_for_minutes_is_refused_for_every_backend() {
        // 256 heads of 2^20 over 4 positions: each of this backend's threads would redo
        // its head's scores. The table counts that, for the cpu backend too (a VM moving
        // between kinds of host is refused nothing new).
        let refused = |args: &[u64]| {
            let mut full = [0u64; COMMAND_ARGS];
            full[..args.len()].copy_from_slice(args);
            Kernel::decode(&full, |_| Some(1 << 44)).err()
        };
        let bad_shape = Some(ferry_abi::accel::status::BAD_SHAPE);
        let wide = [k::ATTENTION_DECODE, 1, 2, 3, 4, 256, 1 << 20, 4];
        assert_eq!(refused(&wide), bad_shape);
        let rows = [k::ATTENTION, 1, 2, 3, 4, 1, 256, 256, 1 << 20, 3];
        assert_eq!(refused(&rows), bad_shape);
        // 4 heads of 1024 over 2^18 positions: exactly the bound.
        let at_bound = kernel(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 4, 1024, 1 << 18]);
        assert!(check_gpu_work(&at_bound).is_ok());
        // Real models' shapes are far inside: SmolLM2's decode over 8 K positions, and
        // a Llama 3 prompt batch of 32 rows over a 32 K context.
        let decode = kernel(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 9, 64, 8192]);
        assert!(check_gpu_work(&decode).is_ok());
        let prefill = kernel(&[k::ATTENTION, 1, 2, 3, 4, 32, 32, 8, 128, 32 << 10]);
        assert!(check_gpu_work(&prefill).is_ok());
        // Both keep their scores (once each) in scratch memory: 2 × 9 × 8192 f64 and 9
        // maxima (16 bytes aligned); and 7 rows of 32 × (32 K + 32) f32 at a time (2 ×
        // 29.4 MB), in 5 parts.
        let room = score_room(&decode).expect("kept");
        assert_eq!(scratch_bytes(&decode), 2 * 9 * 8192 * 8 + 80);
        assert_eq!(room.rows, 1);
        assert_eq!(plan(&decode, |_| 0, 0).len(), 4);
        let room = score_room(&prefill).expect("kept");
        assert_eq!(room.rows, 7);
        assert_eq!(room.region, 7 * 32 * ((32 << 10) + 32) * 4);
        assert!(scratch_bytes(&prefill) <= MAX_ATTENTION_SCRATCH);
        assert_eq!(room.maxes, 7 * 32 * 8);
        let parts = plan(&prefill, |_| 0, 0);
        assert_eq!(parts.len(), 5 * 4);
        // The last part: rows 28..32, its queries 28 rows on, its scores as long as row 31.
        let last = &parts[16];
        assert_eq!(last.entry, "ferry_attention_scores");
        assert_eq!(last.args.0[0], 4 * 28 * 32 * 128);
        assert_eq!(last.args.0[7..9], [(32 << 10) + 28, (32 << 10) + 32]);
        assert_eq!(last.items, 4 * 32 * ((32 << 10) + 32));
        // Heads whose scores cannot fit, even one row at a time, run fused, without scratch.
        let wide = kernel(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 64, 64, 1 << 17]);
        assert!(check_gpu_work(&wide).is_ok());
        assert_eq!(score_room(&wide), None);
        assert_eq!(scratch_bytes(&wide), 0);
        let fused = plan(&wide, |_| 0, 0);
        assert_eq!(fused.len(), 1);
        assert_eq!(fused[0].entry, "ferry_attention_decode");
    }

    #[test]
    fn a_norm_of_few_rows_normalizes_each_element_in_a_thread_of_its_own() {
        let eps = u64::from(1e-5f32.to_bits());
        // A decode step's one row of 576: its scale, then 576 threads.
        let rms = kernel(&[k::RMS_NORM, 1, 2, 3, 1, 576, eps]);
        assert_eq!(scratch_bytes(&rms), 8);
        let launches = plan(&rms, |_| 0, 0);
        let entries: Vec<_> = launches.iter().map(|l| (l.entry, l.items)).collect();
        assert_eq!(
            entries,
            [("ferry_rms_norm_inv", 1), ("ferry_rms_norm_apply", 576)]
        );
        let layer = kernel(&[k::LAYER_NORM, 1, 2, 3, 4, 2, 256, eps]);
        assert_eq!(scratch_bytes(&layer), 2 * 16);
        assert_eq!(plan(&layer, |_| 0, 0)[1].items, 512);
        // A training batch's rows are threads enough.
        let batch = kernel(&[k::RMS_NORM, 1, 2, 3, 64, 576, eps]);
        assert_eq!(scratch_bytes(&batch), 0);
        assert_eq!(plan(&batch, |_| 0, 0).len(), 1);
    }

    #[test]
    fn argmax_of_a_vocabulary_is_scanned_in_chunks_of_its_row() {
        // SmolLM2's 49,152 logits: 192 chunks, their picks kept in scratch.
        let vocab = kernel(&[k::ARGMAX, 1, 2, 1, 49_152]);
        assert_eq!(scratch_bytes(&vocab), 4 * 192);
        let launches = plan(&vocab, |_| 0, 0);
        let entries: Vec<_> = launches.iter().map(|l| (l.entry, l.items)).collect();
        assert_eq!(
            entries,
            [("ferry_argmax_chunks", 192), ("ferry_argmax_pick", 1)]
        );
        // A row of a few chunks is one thread's.
        let narrow = kernel(&[k::ARGMAX, 1, 2, 64, 511]);
        assert_eq!(scratch_bytes(&narrow), 0);
        assert_eq!(plan(&narrow, |_| 0, 0).len(), 1);
    }

    #[test]
    fn matmul_slices_its_depth_only_when_its_outputs_are_few_and_every_slice_has_work() {
        // A decode step: 2048 outputs, 2048 deep, in 64 slices of 32.
        assert_eq!(matmul_splits(1, 2048, 2048), Some((64, 32)));
        // Ragged: 300 deep in 9 slices of 34, the last of 28.
        assert_eq!(matmul_splits(13, 17, 300), Some((9, 34)));
        // Too shallow, no depth at all, or outputs enough to fill a GPU: not sliced.
        for (m, n, k) in [(13, 17, 63), (1, 96, 0), (0, 96, 4096), (256, 256, 4096)] {
            assert_eq!(matmul_splits(m, n, k), None, "{m}x{n}x{k}");
        }
        for (m, n, k) in [
            (1, 1, 1 << 30),
            (1, 7, 1000),
            (3, 5000, 77),
            (255, 256, 1 << 20),
        ] {
            let (splits, depth) = matmul_splits(m, n, k).expect("sliced");
            // Every slice has work, and together they cover the depth once.
            assert!(depth >= SPLIT_MATMUL_MIN_DEPTH && (splits - 1) * depth < k);
            assert!(splits * depth >= k);
            // Partials (the scratch) stay within the threads' bound.
            assert!(
                splits * m * n <= SPLIT_MATMUL_THREADS + m * n,
                "{m}x{n}x{k}"
            );
        }
    }
}
