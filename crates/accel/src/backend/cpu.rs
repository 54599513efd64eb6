//! The `cpu` backend: buffers in host RAM, kernels on a private rayon pool.
//!
//! Results are bit-identical whatever the pool's thread count: see `gemm` for MATMUL
//! and `ops` for the rest. Transcendental functions are computed by
//! `ferry_abi::accel::math` from basic IEEE operations, so they do not depend on the
//! host's libm either.

mod gemm;
#[cfg(test)]
mod llama_tests;
mod memory;
mod ops;
mod quant;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wide_tests;

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

use super::{
    check_indices_part, index_check, lookup_dtype, AbortSwitch, Backend, BackendError, BufferId,
    BufferReader, BufferTable, DeviceLoop, HostThreads,
};
use crate::kernel::{DType, Kernel};
use memory::DeviceBuffer;
pub use memory::DeviceMemory;
pub use ops::adam_bias_corrections;
pub use quant::has_avx512;

#[cfg(target_endian = "big")]
compile_error!(
    "the cpu backend stores device memory in host byte order, which must be little-endian"
);

/// How long a kernel thread kept warm ([`Workers::keep_warm`]) spins without work before
/// it lets rayon put it to sleep: longer than the gaps between a decoded token's kernels.
const WARM_FOR: Duration = Duration::from_micros(500);

thread_local! {
    /// On the thread that launches kernels (the device loop's).
    static LAUNCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs the pool's work as it comes, spinning between, until none came for [`WARM_FOR`].
/// Every [`SPINS_PER_YIELD`] looks it lets the OS run another thread on its core, if one
/// is waiting (a vCPU, another VM's kernels), as rayon's own idle threads do.
fn wait_for_work() {
    let mut last = Instant::now();
    let mut idle: u32 = 0;
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => (last, idle) = (Instant::now(), 0),
            _ => {
                idle = idle.wrapping_add(1);
                if !idle.is_multiple_of(SPINS_PER_YIELD) {
                    std::hint::spin_loop();
                    continue;
                }
                // The clock read here, not at each look: on nested virtualization a
                // read took as long as a look for work.
                if last.elapsed() > WARM_FOR {
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `take` on up to `n` threads: this one and, through joins, others as they come
/// ([`Workers::share`]); a thread that comes after the last item has nothing to do.
fn help(n: usize, take: &(impl Fn() + Sync)) {
    if n <= 1 {
        take();
    } else {
        rayon::join(take, || help(n - 1, take));
    }
}

/// The items of a [`Workers::share`], taken one at a time.
struct Queue<I> {
    items: std::iter::Enumerate<I>,
    /// Items taken so far.
    taken: usize,
    /// No item is taken any more: none is left, or the kernel is to stop.
    closed: bool,
}

impl<I: Iterator> Queue<I> {
    /// The next item and its index, unless none is left or the kernel is to stop.
    fn next(&mut self, workers: &Workers) -> Option<(usize, I::Item)> {
        if self.closed || workers.stops() {
            self.closed = true;
            return None;
        }
        let next = self.items.next();
        match next {
            Some(_) => self.taken += 1,
            None => self.closed = true,
        }
        next
    }
}

/// Counts one item of [`Workers::share`] done as it is dropped: after the item's work,
/// or its panic.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Looks for work between two of [`wait_for_work`]'s yields to the OS: a few
/// microseconds.
const SPINS_PER_YIELD: u32 = 64;

/// Where a kernel's parallel tasks run: the kernel threads, and the switch that cuts
/// the kernel short (each task checks it before it starts, and every [`CHECK_WORK`]
/// steps within, so a kernel of minutes ends within milliseconds of the pull).
pub(crate) struct Workers {
    threads: ThreadPool,
    abort: AbortSwitch,
    /// Keeper jobs queued or running, 0 or 1 ([`Workers::keep_warm`]).
    warm: Arc<AtomicUsize>,
    /// Tests: checks of the switch left before it pulls itself, so that a test stops a
    /// kernel at a point of its work rather than of the clock.
    #[cfg(test)]
    checks_left: std::sync::atomic::AtomicU64,
}

impl Workers {
    /// `threads` (the same bits whatever their number) with a switch of their own.
    pub fn new(threads: ThreadPool) -> Self {
        Self {
            threads,
            abort: AbortSwitch::default(),
            warm: Arc::default(),
            #[cfg(test)]
            checks_left: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Tests: the switch pulls itself at the `n`th check from now (`n` at least 1; 0 is the
    /// first check too).
    #[cfg(test)]
    pub fn pull_at_check(&self, n: u64) {
        self.checks_left
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps another kernel thread from going to sleep between the kernels of a run of
    /// them: it waits for a kernel's tasks, spinning, until none came for [`WARM_FOR`].
    /// Called as a kernel starts, by the thread that launches it, before it splits the
    /// kernel's work.
    ///
    /// A rayon thread with nothing to do yields to the OS about 32 times and then
    /// sleeps; a kernel's tasks then wake it, a futex and a trip through the scheduler
    /// (tens of microseconds on nested virtualization), while a decoded token's
    /// kernels are tens of microseconds apart and take about as long.
    ///
    /// One thread, whatever their number: the job that keeps it is queued before the
    /// kernel's tasks, so the first thread to look for work takes it, one idle between
    /// kernels. A second would be taken once the first is busy, maybe by a thread
    /// waiting for a task it split off, which it would then hold until [`WARM_FOR`]
    /// passed with no work.
    pub fn keep_warm(&self) {
        // One keeper at a time: the next is queued once the last has ended.
        let idle = self.threads() < 2;
        if idle
            || self
                .warm
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let warm = self.warm.clone();
        self.threads.spawn(move || {
            // Not on the launching thread, which took this job while it waited for a
            // kernel's tasks: it would hold that thread here.
            if !LAUNCHING.get() {
                wait_for_work();
            }
            warm.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Runs `part(i, item)` on each of `items` on the kernel threads: each thread takes
    /// the next item not yet taken until none is left. The calling thread waits for the
    /// last one out by spinning, not as rayon waits (yielding to the OS first): a small
    /// kernel ended about 1.5 µs sooner on nested virtualization. The items are taken
    /// one at a time from the iterator, so a guest's billions of them cost no memory,
    /// and none is taken once the kernel is to stop (see [`Self::stops`]).
    pub fn share<I>(&self, items: I, part: impl Fn(usize, I::Item) + Sync)
    where
        I: Iterator + Send,
        I::Item: Send,
    {
        let helpers = self.threads().saturating_sub(1);
        let mut items = items.enumerate();
        if helpers == 0 {
            while let Some((i, item)) = items.next().filter(|_| !self.stops()) {
                part(i, item);
            }
            return;
        }
        let queue = Mutex::new(Queue {
            items,
            taken: 0,
            closed: false,
        });
        let done = AtomicUsize::new(0);
        let take = || loop {
            // Unlocked before the part runs (a guard in a `while let` would be held).
            let next = queue.lock().next(self);
            let Some((i, item)) = next else {
                return;
            };
            let _counted = Counted(&done);
            part(i, item);
        };
        self.install(|| {
            rayon::join(
                || {
                    take();
                    // Closed: every item is taken, and those of other threads end within
                    // one item's time. Yielding every few microseconds, as a kept-warm
                    // thread does: where kernel threads outnumber cores (a replay beside
                    // the VM it copies), the thread awaited may be waiting for this core.
                    let taken = queue.lock().taken;
                    let mut spins = 0u32;
                    while done.load(Ordering::Acquire) < taken {
                        spins = spins.wrapping_add(1);
                        if spins.is_multiple_of(SPINS_PER_YIELD) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                },
                || help(helpers, &take),
            )
        });
    }

    /// How many kernel threads there are.
    pub fn threads(&self) -> usize {
        self.threads.current_num_threads()
    }

    /// Runs `op` on the kernel threads (see [`ThreadPool::install`]).
    pub fn install<R: Send>(&self, op: impl FnOnce() -> R + Send) -> R {
        self.threads.install(op)
    }

    /// `task`, but doing nothing once the kernel is to stop: a parallel loop's body.
    pub fn task<'a, T>(
        &'a self,
        task: impl Fn(T) + Sync + Send + 'a,
    ) -> impl Fn(T) + Sync + Send + 'a {
        move |t| {
            if !self.stops() {
                task(t);
            }
        }
    }

    /// Whether the kernel running is to stop now (see [`AbortSwitch::stops_kernels`]):
    /// a task checks between parts of its work, and skips the rest if so.
    #[inline]
    pub fn stops(&self) -> bool {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::Relaxed;
            let left = self
                .checks_left
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
            // Every check from the nth pulls it, so one whose thread is held off the core
            // between the count and the pull leaves no other check to pass meanwhile.
            if matches!(left, Ok(1) | Err(0)) {
                self.abort.pull();
            }
        }
        self.abort.stops_kernels()
    }

    /// [`Stopped`] if the kernel is to stop now ([`Self::stops`]).
    #[inline]
    pub fn check(&self) -> Result<(), Stopped> {
        match self.stops() {
            true => Err(Stopped),
            false => Ok(()),
        }
    }
}

/// Steps (elements, multiply-adds) of a task between two checks of its kernel's switch:
/// tens of microseconds of work, next to a load (and in a replay a clock read).
pub(crate) const CHECK_WORK: usize = 1 << 14;

/// The kernel is to stop (see [`Workers::stops`]): the rest of a task is skipped, its
/// outputs left partly written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// Counts the work of one task since it last checked its kernel's switch, for loops whose
/// steps are too small to check each: it checks once they add up to [`CHECK_WORK`].
pub(crate) struct Ticker<'a> {
    /// The switch's workers, or none for work that is never cut short (benchmarks).
    pool: Option<&'a Workers>,
    since: usize,
}

impl<'a> Ticker<'a> {
    /// A ticker of a task of `pool`'s.
    pub fn new(pool: &'a Workers) -> Self {
        Self {
            pool: Some(pool),
            since: 0,
        }
    }

    /// A ticker that never stops its work.
    pub fn unchecked() -> Ticker<'static> {
        Ticker {
            pool: None,
            since: 0,
        }
    }

    /// Counts `work` more steps done; [`Stopped`] if the kernel is to stop, checked once
    /// the steps since the last check reach [`CHECK_WORK`].
    #[inline]
    pub fn done(&mut self, work: usize) -> Result<(), Stopped> {
        self.since += work;
        if self.since < CHECK_WORK {
            return Ok(());
        }
        self.since = 0;
        self.pool.map_or(Ok(()), Workers::check)
    }
}

/// Device memory and kernels in host RAM.
pub struct CpuBackend {
    /// The kernel threads; one of them also runs the device's command loop.
    pool: Arc<Workers>,
    /// The pool's threads, as they start.
    threads: HostThreads,
    memory: DeviceMemory,
    buffers: Arc<Buffers>,
    /// The rotations of the last one-row ROPE, for the next like it.
    rope_angles: ops::RopeAngles,
}

impl core::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.pool.threads.current_num_threads())
            .field("buffers", &self.buffers.read().len())
            .finish()
    }
}

/// The buffer table: each buffer as f32 words (u32 data shares the storage through
/// bytemuck casts), with a lock of its own so a reader on another thread (a migration's
/// pre-copy) waits only for a kernel that writes this buffer, not for whatever the
/// device runs. Its writer (the device thread, kernel after kernel) unlocks it fairly:
/// a waiting reader gets it next, where an unfair lock would go back to the writer
/// time after time.
type Buffers = BufferTable<RwLock<DeviceBuffer>>;

impl BufferReader for Buffers {
    fn with_buffer(&self, id: BufferId, f: &mut dyn FnMut(&[u8])) -> bool {
        let Some(buffer) = self.get(id) else {
            return false;
        };
        f(bytemuck::cast_slice(&buffer.read()));
        true
    }
}

/// Read access to the buffers a kernel does not write.
struct Inputs<'a>(Vec<(BufferId, RwLockReadGuard<'a, DeviceBuffer>)>);

impl Inputs<'_> {
    fn f32(&self, id: BufferId) -> &[f32] {
        self.0
            .iter()
            .find(|(b, _)| *b == id)
            .map(|(_, guard)| &***guard)
            .expect("kernel input buffer validated by the device")
    }

    fn u32(&self, id: BufferId) -> &[u32] {
        bytemuck::cast_slice(self.f32(id))
    }

    fn bytes(&self, id: BufferId) -> &[u8] {
        bytemuck::cast_slice(self.f32(id))
    }
}

impl CpuBackend {
    /// A backend running kernels on `threads` threads (at least 1), its buffers in
    /// `memory`.
    ///
    /// # Panics
    ///
    /// If the host cannot start the threads.
    pub fn new(threads: usize, memory: DeviceMemory) -> CpuBackend {
        let started = HostThreads::default();
        let on_start = started.clone();
        let pool = ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("ferry-accel-{i}"))
            .start_handler(move |_| on_start.add_current())
            .build()
            .expect("cannot start the accelerator's kernel threads");
        CpuBackend {
            pool: Arc::new(Workers::new(pool)),
            threads: started,
            memory,
            buffers: Arc::default(),
            rope_angles: ops::RopeAngles::default(),
        }
    }

    /// Runs `f` on the `outputs` buffers, locked for writing, with the other buffers
    /// `kernel` reads locked for reading. The device guarantees that outputs are distinct
    /// from each other and from the inputs.
    fn with_outputs<const N: usize>(
        &mut self,
        kernel: &Kernel,
        outputs: [BufferId; N],
        f: impl FnOnce(&Workers, &Inputs<'_>, [&mut [f32]; N]),
    ) {
        // Only this thread changes the table, so holding it for reading blocks nobody.
        let table = self.buffers.read();
        let mut written = outputs.map(|id| {
            table
                .get(&id)
                .expect("kernel output buffer validated by the device")
                .write()
        });
        let access = kernel.access().expect("kernel validated by the device");
        // The outputs handed over are exactly those the kernel table declares written:
        // one it only reads would be written with no dirty mark (a migration would miss
        // it), one it writes but not given here would not be written at all.
        debug_assert!(
            outputs
                .iter()
                .all(|o| access.writes().any(|(w, _)| w == *o))
                && access.writes().all(|(w, _)| outputs.contains(&w)),
            "{}: outputs {outputs:?} are not the buffers its table entry writes",
            kernel.name()
        );
        let inputs = Inputs(
            access
                .reads()
                .filter(|id| !outputs.contains(id))
                .map(|id| {
                    let buffer = table
                        .get(&id)
                        .expect("kernel input buffer validated by the device");
                    (id, buffer.read())
                })
                .collect(),
        );
        f(&self.pool, &inputs, written.each_mut().map(|b| &mut ***b));
        written.into_iter().for_each(RwLockWriteGuard::unlock_fair);
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    /// 2: ROPE divides each pair's frequency by a factor.
    fn kernel_version(&self) -> u32 {
        2
    }

    fn alloc(&mut self, id: BufferId, bytes: u64) -> Result<(), BackendError> {
        let buffer = usize::try_from(bytes.div_ceil(4))
            .ok()
            .and_then(|words| self.memory.alloc(words))
            .ok_or(BackendError::Alloc { bytes })?;
        self.buffers.insert(id, RwLock::new(buffer));
        Ok(())
    }

    fn free(&mut self, id: BufferId) {
        self.buffers.remove(id);
    }

    fn write(&mut self, id: BufferId, offset: u64, data: &[u8]) {
        self.with_bytes_mut(id, offset, data.len(), |bytes| bytes.copy_from_slice(data));
    }

    fn read(&self, id: BufferId, offset: u64, out: &mut [u8]) {
        let start = usize::try_from(offset).expect("offset validated by the device");
        let buffer = self.buffers.expect(id);
        let words = buffer.read();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        out.copy_from_slice(&bytes[start..][..out.len()]);
    }

    fn reader(&self) -> Arc<dyn BufferReader> {
        self.buffers.clone()
    }

    fn host_threads(&self) -> HostThreads {
        self.threads.clone()
    }

    fn abort_switch(&self) -> Option<AbortSwitch> {
        Some(self.pool.abort.clone())
    }

    /// Runs the device's loop on one of the kernel threads: a kernel's parallel work
    /// then starts on the thread that launches it, which takes part in it, instead of
    /// waking the pool's threads and sleeping until they finish (on few cores the
    /// hand-offs cost as much as small kernels).
    fn spawn_device_loop(&self, run: Box<dyn FnOnce() + Send>) -> std::io::Result<DeviceLoop> {
        let (done, ended) = std::sync::mpsc::channel::<()>();
        self.pool.threads.spawn(move || {
            let _done = done;
            LAUNCHING.set(true);
            // A panic in a spawned job would abort the process: keep it to this device.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                tracing::error!("the accelerator's device loop panicked; the device stops");
            }
        });
        Ok(DeviceLoop::new(ended))
    }

    fn launch(&mut self, kernel: &Kernel) -> Result<(), BackendError> {
        let abort = &self.pool.abort;
        abort.check()?;
        // What only the data can say, checked before anything is written (in parts: a
        // guest may give billions of ids).
        if let Some(check) = index_check(kernel) {
            let buffer = self.buffers.expect(check.buffer);
            let words = buffer.read();
            let ids: &[u32] = bytemuck::cast_slice(&words);
            for part in ids[..check.count].chunks(CHECK_WORK << 4) {
                abort.check()?;
                check_indices_part(&check, part)?;
            }
        }
        self.pool.keep_warm();
        self.run(kernel);
        // Pulled or past its deadline meanwhile, tasks may have been skipped: the outputs
        // are partly written.
        self.pool.abort.stopped()
    }
}

impl CpuBackend {
    /// Runs `f` on `len` bytes of buffer `id` from byte `offset` (validated by the
    /// device), under the buffer's write lock.
    fn with_bytes_mut<R>(
        &self,
        id: BufferId,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        let buffer = self.buffers.expect(id);
        let mut words = buffer.write();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let start = usize::try_from(offset).expect("offset validated by the device");
        let done = f(&mut bytes[start..][..len]);
        RwLockWriteGuard::unlock_fair(words);
        done
    }

    /// Runs a kernel whose data has passed its index check ([`index_check`]).
    fn run(&mut self, kernel: &Kernel) {
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
                let g = gemm::Gemm {
                    m,
                    n,
                    k,
                    transpose_a: flags.transpose_a,
                    transpose_b: flags.transpose_b,
                    accumulate: flags.accumulate,
                };
                self.with_outputs(kernel, [c], |pool, inp, [c]| {
                    g.run(pool, inp.f32(a), inp.f32(b), c);
                })
            }
            Kernel::AddBias {
                x,
                bias,
                rows,
                cols,
            } => self.with_outputs(kernel, [x], |pool, inp, [x]| {
                ops::add_bias(pool, x, inp.f32(bias), rows, cols);
            }),
            Kernel::Add { a, b, out, n } => self.with_outputs(kernel, [out], |pool, inp, [out]| {
                ops::add(pool, inp.f32(a), inp.f32(b), out, n);
            }),
            Kernel::Mul { a, b, out, n } => self.with_outputs(kernel, [out], |pool, inp, [out]| {
                ops::mul(pool, inp.f32(a), inp.f32(b), out, n);
            }),
            Kernel::Scale { x, n, alpha } => self.with_outputs(kernel, [x], |pool, _, [x]| {
                ops::scale(pool, x, n, alpha);
            }),
            Kernel::Axpy { x, y, n, alpha } => self.with_outputs(kernel, [y], |pool, inp, [y]| {
                ops::axpy(pool, inp.f32(x), y, n, alpha);
            }),
            Kernel::Relu { x, out, n } | Kernel::Gelu { x, out, n } => {
                let activation = match kernel {
                    Kernel::Relu { .. } => ops::relu,
                    _ => ops::gelu,
                };
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    activation(pool, inp.f32(x), out, n);
                })
            }
            Kernel::ReluBackward {
                x,
                grad_out,
                grad_in,
                n,
            }
            | Kernel::GeluBackward {
                x,
                grad_out,
                grad_in,
                n,
            } => {
                let gradient = match kernel {
                    Kernel::ReluBackward { .. } => ops::relu_backward,
                    _ => ops::gelu_backward,
                };
                self.with_outputs(kernel, [grad_in], |pool, inp, [gi]| {
                    gradient(pool, inp.f32(x), inp.f32(grad_out), gi, n);
                })
            }
            Kernel::Softmax { x, out, rows, cols } => {
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    ops::softmax(pool, inp.f32(x), out, rows, cols);
                })
            }
            Kernel::CrossEntropy {
                logits,
                labels,
                grad,
                loss,
                rows,
                cols,
            } => self.with_outputs(kernel, [grad, loss], |pool, inp, [grad, loss]| {
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
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    ops::sum_rows(pool, inp.f32(x), out, rows, cols);
                })
            }
            Kernel::SumCols { x, out, rows, cols } => {
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    ops::sum_cols(pool, inp.f32(x), out, rows, cols);
                })
            }
            Kernel::Sgd { param, grad, n, lr } => {
                self.with_outputs(kernel, [param], |pool, inp, [p]| {
                    ops::sgd(pool, p, inp.f32(grad), n, lr);
                })
            }
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
                self.with_outputs(kernel, [param, m, v], |pool, inp, [p, m, v]| {
                    ops::adam(pool, p, inp.f32(grad), m, v, n, h);
                })
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
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    let (table, ids) = (inp.bytes(table), inp.u32(ids));
                    ops::qembedding(pool, dtype, table, ids, out, count, dim);
                })
            }
            Kernel::LayerNorm {
                x,
                gamma,
                beta,
                out,
                rows,
                cols,
                eps,
            } => self.with_outputs(kernel, [out], |pool, inp, [out]| {
                ops::layer_norm(
                    pool,
                    inp.f32(x),
                    inp.f32(gamma),
                    inp.f32(beta),
                    out,
                    (rows, cols),
                    eps,
                );
            }),
            Kernel::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                n,
            } => self.with_outputs(kernel, [dst], |pool, inp, [dst]| {
                ops::copy(pool, inp.f32(src), src_offset, dst, dst_offset, n);
            }),
            Kernel::RngFill {
                out,
                n,
                seed,
                counter,
                distribution,
                scale,
            } => self.with_outputs(kernel, [out], |pool, _, [out]| {
                ops::rng_fill(pool, out, n, seed, counter, distribution, scale);
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
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    let (q, kc, vc) = (inp.f32(q), inp.f32(k_cache), inp.f32(v_cache));
                    ops::attention_decode(pool, q, kc, vc, out, shape);
                })
            }
            Kernel::QMatmul {
                w,
                x,
                out,
                n,
                k,
                m,
                dtype,
            } => self.with_outputs(kernel, [out], |pool, inp, [out]| {
                ops::qmatmul(pool, dtype, inp.bytes(w), inp.f32(x), out, n, k, m);
            }),
            Kernel::RmsNorm {
                x,
                weight,
                out,
                rows,
                cols,
                eps,
            } => self.with_outputs(kernel, [out], |pool, inp, [out]| {
                ops::rms_norm(pool, inp.f32(x), inp.f32(weight), out, (rows, cols), eps);
            }),
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
                let shape = ops::RopeShape {
                    rows,
                    heads,
                    head_dim,
                    pos,
                    base,
                    style,
                };
                let mut kept = std::mem::take(&mut self.rope_angles);
                self.with_outputs(kernel, [x], |pool, inp, [x]| {
                    ops::rope(pool, x, inp.f32(factors), shape, &mut kept);
                });
                self.rope_angles = kept;
            }
            Kernel::Swiglu { gate, up, out, n } => {
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    ops::swiglu(pool, inp.f32(gate), inp.f32(up), out, n);
                })
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
                let shape = ops::GqaShape {
                    rows,
                    heads,
                    kv_heads,
                    head_dim,
                    pos,
                };
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    let (q, kc, vc) = (inp.f32(q), inp.f32(k_cache), inp.f32(v_cache));
                    ops::attention(pool, q, kc, vc, out, shape);
                })
            }
            Kernel::Argmax { x, out, rows, cols } => {
                self.with_outputs(kernel, [out], |pool, inp, [out]| {
                    ops::argmax(pool, inp.f32(x), bytemuck::cast_slice_mut(out), rows, cols);
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

    let mut backend = CpuBackend::new(threads, DeviceMemory::default());
    for id in 1..=3 {
        backend.alloc(id, bytes).expect("benchmark buffers");
    }
    for (id, seed) in [(1, 1), (2, 2)] {
        backend
            .launch(&super::uniform_fill(id, n * n, seed))
            .expect("benchmark fill");
    }
    let mm = super::square_matmul(n);
    let backend_time = best_time(budget, || backend.launch(&mm).expect("benchmark matmul"));

    let a = backend.buffers.expect(1).read().to_vec();
    let b = backend.buffers.expect(2).read().to_vec();
    let mut c = vec![0.0f32; n * n];
    let pool = &backend.pool.threads;
    let direct_time = best_time(budget, || {
        gemm::direct(pool, threads, &a, &b, &mut c, (n, n, n))
    });
    (gflops(backend_time), gflops(direct_time))
}

/// Measures QMATMUL's dot products of `rows` weight rows of `cols` elements in `dtype`
/// with prepared input rows, on one thread, in GMAC/s of all inputs (best of several
/// runs), for the code `code` names.
pub fn bench_qdot(dtype: DType, rows: usize, cols: usize, code: QdotCode) -> f64 {
    let row_bytes = dtype.row_bytes(cols as u64).expect("whole blocks") as usize;
    // Normal floats for f32 and f16 (subnormals would be slow on some CPUs), and for the
    // block formats bytes whose half floats (the scales) are all finite and small.
    let w: Vec<u8> = match dtype {
        DType::F32 => (0..rows * cols)
            .flat_map(|i| ((i % 13) as f32 * 0.01 - 0.06).to_le_bytes())
            .collect(),
        DType::F16 => (0..rows * cols)
            .flat_map(|i| (0x3000 | (i * 37 % 1024) as u16).to_le_bytes())
            .collect(),
        _ => (0..rows * row_bytes)
            .map(|i| (i * 37 % 251) as u8 & 0x3b)
            .collect(),
    };
    let xs: Vec<Vec<f32>> = (0..quant::INPUT_GROUP)
        .map(|j| {
            (0..cols)
                .map(|i| ((i + j) % 13) as f32 * 0.1 - 0.6)
                .collect()
        })
        .collect();
    let inputs: Vec<_> = xs.iter().map(|x| quant::prepare(x)).collect();
    let (inputs, simd) = match code {
        QdotCode::Portable => (&inputs[..1], quant::Simd::Portable),
        QdotCode::Avx2 => (&inputs[..1], quant::Simd::Avx2),
        QdotCode::Avx512 => (&inputs[..1], quant::Simd::Avx512),
        QdotCode::Grouped => (&inputs[..], quant::Simd::best()),
    };
    let mut out = vec![0.0f32; rows * inputs.len()];
    let time = best_time(Duration::from_millis(300), || {
        // As QMATMUL takes several inputs: a row unpacked once for a group of them where
        // the format does that, else one input after the other.
        if inputs.len() > 1 && quant::unpacks_once(dtype) {
            quant::dot_inputs(dtype, &w, row_bytes, 0, inputs, &mut out)
        } else {
            for (input, out) in inputs.iter().zip(out.chunks_exact_mut(rows)) {
                quant::dot_rows(dtype, &w, row_bytes, 0, input, out, simd)
            }
        }
    });
    (rows * cols * inputs.len()) as f64 / time.as_secs_f64().max(1e-9) / 1e9
}

/// A benchmark's f32 values starting on a cache line, as a device buffer's (whole pages)
/// do: how its loads split across lines is then theirs.
struct OnACacheLine {
    storage: Vec<f32>,
    skip: usize,
    len: usize,
}

impl OnACacheLine {
    /// `len` values, value `i` being `value(i)`.
    fn new(len: usize, value: impl Fn(usize) -> f32) -> Self {
        let mut storage = vec![0.0f32; len + 16];
        let skip = storage.as_ptr().align_offset(64);
        for (i, e) in storage[skip..][..len].iter_mut().enumerate() {
            *e = value(i);
        }
        Self { storage, skip, len }
    }

    /// The values.
    fn values(&self) -> &[f32] {
        &self.storage[self.skip..][..self.len]
    }
}

/// The attention benchmarks' values: small, varied, none of them subnormal.
fn attention_value(i: usize, m: usize) -> f32 {
    (i * m % 97) as f32 * 0.01 - 0.48
}

/// The attention benchmarks' query row of `n` elements.
fn attention_query(n: usize) -> Vec<f32> {
    (0..n).map(|i| attention_value(i, 31)).collect()
}

/// The attention benchmarks' key and value caches of `n` elements for layer `layer`.
fn attention_caches(n: usize, layer: usize) -> (OnACacheLine, OnACacheLine) {
    let cache = |m: usize| OnACacheLine::new(n, |i| attention_value(i + layer, m));
    (cache(37), cache(41))
}

/// Measures ATTENTION of one query row (a decoded token) over `len` positions, `heads`
/// query heads sharing `kv_heads` KV heads of `head_dim`, on one thread: million
/// (position, head) pairs a second, best of several runs; the AVX2 code if `avx2`, else
/// the portable code (the same bits; the tests check that).
pub fn bench_attention(shape: (usize, usize, usize), len: usize, avx2: bool) -> f64 {
    let (heads, kv_heads, head_dim) = shape;
    let kv = len * kv_heads * head_dim;
    let q = attention_query(heads * head_dim);
    let (kc, vc) = attention_caches(kv, 0);
    let (kc, vc) = (kc.values(), vc.values());
    let mut out = vec![0.0f32; heads * head_dim];
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let time = best_time(Duration::from_millis(300), || {
        for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
            let kvh = h / (heads / kv_heads);
            let one = ops::AttendedHead {
                q: &q[h * head_dim..][..head_dim],
                kc: &kc[kvh * head_dim..],
                vc: &vc[kvh * head_dim..],
                stride: kv_heads * head_dim,
                len,
                scale,
            };
            ops::attend(&one, o, avx2);
        }
    });
    (len * heads) as f64 / time.as_secs_f64().max(1e-9) / 1e6
}

/// Measures ATTENTION as a decoded token runs it: one query row over `len` positions, on
/// `threads` kernel threads (one head a task: with 9 heads, 9 at most busy), over the
/// caches of `layers` layers in turn with a layer's weights (3 MiB, read between two
/// ATTENTIONs, not timed) in between, so each layer's keys and values have left the
/// cores' own caches when they are read again, as between two tokens (and a last-level
/// cache smaller than all the layers' caches and weights: at 30 layers of SmolLM2's
/// shape, 46 KB a position plus 90 MiB). Million (position, head) pairs a second, over
/// about 300 ms.
pub fn bench_attention_cold(
    shape: (usize, usize, usize),
    len: usize,
    threads: usize,
    layers: usize,
) -> f64 {
    let (heads, kv_heads, head_dim) = shape;
    let pool = Workers::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("benchmark threads"),
    );
    let kv = len * kv_heads * head_dim;
    let q = attention_query(heads * head_dim);
    let caches: Vec<_> = (0..layers.max(1))
        .map(|l| attention_caches(kv, l))
        .collect();
    let weights = vec![1u8; 3 << 20];
    let mut out = vec![0.0f32; heads * head_dim];
    let gqa = ops::GqaShape {
        rows: 1,
        heads,
        kv_heads,
        head_dim,
        pos: len - 1,
    };
    // On a kernel thread, the weights read by every thread, as a device runs its kernels:
    // the threads are busy between two ATTENTIONs, not asleep.
    let (timed, calls) = pool.install(|| {
        let (mut timed, mut calls) = (Duration::ZERO, 0usize);
        let start = Instant::now();
        while calls < 3 * caches.len() || start.elapsed() < Duration::from_millis(300) {
            for (kc, vc) in &caches {
                let sum: u64 = weights
                    .par_chunks(64 << 10)
                    .map(|c| c.iter().step_by(64).map(|&b| u64::from(b)).sum::<u64>())
                    .sum();
                std::hint::black_box(sum);
                let t = Instant::now();
                ops::attention(&pool, &q, kc.values(), vc.values(), &mut out, gqa);
                timed += t.elapsed();
                calls += 1;
            }
        }
        (timed, calls)
    });
    (calls * len * heads) as f64 / timed.as_secs_f64().max(1e-9) / 1e6
}

/// The dot product code [`bench_qdot`] measures.
#[derive(Debug, Clone, Copy)]
pub enum QdotCode {
    /// The portable code, one input.
    Portable,
    /// The AVX2 code where the CPU has it, one input.
    Avx2,
    /// The AVX-512 code where the CPU has it (four rows at a time, then two, for Q4_0,
    /// Q4_1 and Q8_0), one input.
    Avx512,
    /// Several inputs (a prompt's tokens, sequences decoded together), each weight row
    /// unpacked once for a group of them where the format allows.
    Grouped,
}

/// Host memory read bandwidth with `threads` threads, bytes/s: the best of several passes
/// summing a 1 GiB buffer in `threads` equal parts (each thread streams its own), the
/// way a matrix–vector product streams its weights.
pub fn bench_memory_read(threads: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let threads = threads.max(1);
    let words: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("benchmark threads");
    let part = words.len().div_ceil(threads);
    let pass = || {
        pool.install(|| {
            use rayon::prelude::*;
            words
                .par_chunks(part)
                .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
                .reduce(|| 0, u64::wrapping_add)
        })
    };
    let best = best_time(Duration::from_millis(600), || {
        std::hint::black_box(pass());
    });
    BYTES as f64 / best.as_secs_f64().max(1e-9)
}
