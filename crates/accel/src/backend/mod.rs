//! Where device memory lives and kernels run. The device (command processing,
//! validation, dirty tracking, state) is the same for every backend; a backend only
//! stores buffers and executes already-validated kernels.

pub mod cpu;
pub mod cuda;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::kernel::{DType, Indices, Kernel};
pub use cpu::DeviceMemory;

pub use ferry_abi::accel::kernel::BufferId;

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host could not provide the memory.
    #[error("cannot allocate {bytes} bytes of device memory")]
    Alloc {
        /// Bytes asked for.
        bytes: u64,
    },
    /// A kernel found bad values in its data (e.g. an embedding id beyond the vocabulary).
    /// Its outputs may be partly written.
    #[error("kernel rejected its input data: {0}")]
    BadData(&'static str),
    /// The launch's shape asks this backend for more work than one launch may do
    /// ([`ferry_abi::accel::kernel::MAX_LAUNCH_WORK`]); nothing was written.
    #[error("the launch asks this backend for more work than one launch may do")]
    TooMuchWork,
    /// The device (a GPU or its driver) failed.
    #[error("device failure: {0}")]
    Device(String),
    /// The device is being ended ([`AbortSwitch`]): the kernel was cut short, its outputs
    /// partly written.
    #[error("kernel abandoned: the device is being ended")]
    Aborted,
    /// The deadline set on the backend's [`AbortSwitch`] (a replay's) passed while the
    /// kernel ran: it was cut short, its outputs partly written.
    #[error("kernel cut short: its deadline passed")]
    OutOfTime,
}

/// Cuts a backend's kernels short: for good, for a device being ended (a VM stopped or
/// dropped), which need not wait minutes for a result no one will read ([`Self::pull`]);
/// or once a deadline passes, for a replay that may not hold its device for ever
/// ([`Self::until`]). Pulled once and for good: every kernel from then on stops early, so
/// a device that is paused and then run on must never have it pulled.
#[derive(Debug, Clone, Default)]
pub struct AbortSwitch(Arc<Switch>);

/// An [`AbortSwitch`]'s [`Cut`], in one word that kernel threads load, and the instant
/// its deadlines count from.
#[derive(Debug)]
struct Switch {
    word: AtomicU64,
    epoch: Instant,
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            word: AtomicU64::new(Cut::Never.word()),
            epoch: Instant::now(),
        }
    }
}

/// When an [`AbortSwitch`] cuts kernels short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Never: they run to their end.
    Never,
    /// Once this many nanoseconds (at least 1) have passed since the switch's epoch.
    At(u64),
    /// Now, until the deadline is lifted: a check saw it pass.
    Expired,
    /// Now and for good: pulled.
    Pulled,
}

impl Cut {
    const EXPIRED: u64 = u64::MAX - 1;

    /// The word that holds it: 0, the deadline's nanoseconds, or one of the two greatest.
    fn word(self) -> u64 {
        match self {
            Cut::Never => 0,
            Cut::At(ns) => ns.clamp(1, Self::EXPIRED - 1),
            Cut::Expired => Self::EXPIRED,
            Cut::Pulled => u64::MAX,
        }
    }

    fn of(word: u64) -> Self {
        match word {
            0 => Cut::Never,
            Self::EXPIRED => Cut::Expired,
            u64::MAX => Cut::Pulled,
            ns => Cut::At(ns),
        }
    }
}

impl AbortSwitch {
    /// Pulls it: kernels in flight stop at their next check, later ones at once.
    pub fn pull(&self) {
        self.0.word.store(Cut::Pulled.word(), Ordering::Relaxed);
    }

    fn cut(&self) -> Cut {
        Cut::of(self.0.word.load(Ordering::Relaxed))
    }

    /// Whether kernels are to stop now: it was pulled, or its deadline passed. A kernel
    /// checks before each parallel task and every few thousand steps within one: a load,
    /// and a clock read while a deadline is set (a replay's kernels only).
    #[inline]
    pub fn stops_kernels(&self) -> bool {
        match self.cut() {
            Cut::Never => false,
            Cut::Expired | Cut::Pulled => true,
            Cut::At(ns) => self.expires(ns),
        }
    }

    /// Whether deadline `ns` has passed; if it has, kernels stop from now on until it is
    /// lifted (unless the switch was pulled or the deadline lifted meanwhile).
    fn expires(&self, ns: u64) -> bool {
        let now = u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if now < ns {
            return false;
        }
        let at = Cut::At(ns).word();
        let _ = self.0.word.compare_exchange(
            at,
            Cut::Expired.word(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        true
    }

    /// Why kernels stop, if a check found that they do ([`Self::stops_kernels`]): the
    /// switch was pulled ([`BackendError::Aborted`]) or its deadline passed
    /// ([`BackendError::OutOfTime`]).
    pub fn stopped(&self) -> Result<(), BackendError> {
        match self.cut() {
            Cut::Pulled => Err(BackendError::Aborted),
            Cut::Expired => Err(BackendError::OutOfTime),
            Cut::Never | Cut::At(_) => Ok(()),
        }
    }

    /// [`Self::stopped`], after a check ([`Self::stops_kernels`]).
    pub fn check(&self) -> Result<(), BackendError> {
        self.stops_kernels();
        self.stopped()
    }

    /// Cuts kernels short also once `deadline` passes, until the guard it returns is
    /// dropped (never later: a deadline must not outlive the commands it bounds, or it
    /// would cut the guest's own kernels). A pulled switch stays pulled.
    pub fn until(&self, deadline: Instant) -> Deadline {
        // Counted from the epoch, plus one: 0 means no deadline.
        let ns = deadline
            .saturating_duration_since(self.0.epoch)
            .as_nanos()
            .saturating_add(1);
        let at = Cut::At(u64::try_from(ns).unwrap_or(u64::MAX)).word();
        self.set_unless_pulled(at);
        Deadline(self.clone())
    }

    fn set_unless_pulled(&self, word: u64) {
        let _ = self
            .0
            .word
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (Cut::of(now) != Cut::Pulled).then_some(word)
            });
    }
}

/// A deadline set on an [`AbortSwitch`] ([`AbortSwitch::until`]), lifted when this is
/// dropped.
#[derive(Debug)]
#[must_use = "the deadline is lifted when this is dropped"]
pub struct Deadline(AbortSwitch);

impl Drop for Deadline {
    fn drop(&mut self) {
        self.0.set_unless_pulled(Cut::Never.word());
    }
}

/// `kernel`'s condition on its data that only the data can show (the device validates
/// ids, ranges and shapes), as its table entry declares it: class labels, embedding ids.
/// Every backend checks it before writing anything, so all refuse the same data alike.
fn index_check(kernel: &Kernel) -> Option<Indices> {
    kernel
        .access()
        .expect("kernel validated by the device")
        .indices()
}

/// Checks some of the values `check` bounds (all of them are its first `count`).
fn check_indices_part(check: &Indices, values: &[u32]) -> Result<(), BackendError> {
    if values.iter().any(|&v| v as usize >= check.bound) {
        return Err(BackendError::BadData(check.what));
    }
    Ok(())
}

/// The format of the table of an EMBEDDING or a QEMBEDDING `kernel`: an EMBEDDING looks
/// up in an f32 table, as a QEMBEDDING of one does, and the backends run both alike.
fn lookup_dtype(kernel: &Kernel) -> DType {
    match *kernel {
        Kernel::QEmbedding { dtype, .. } => dtype,
        _ => DType::F32,
    }
}

// A panic while a lock is held (a kernel's, or a failed GPU's) leaves what it guards as
// far as it got, which the device already treats as "partly written": poisoning carries
// no extra meaning here.
fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// A backend's buffers by id, shared with its [`BufferReader`]s. Only the device thread
/// changes it.
struct BufferTable<B>(RwLock<HashMap<BufferId, Arc<B>>>);

impl<B> Default for BufferTable<B> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<B> BufferTable<B> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<BufferId, Arc<B>>> {
        read_lock(&self.0)
    }

    fn get(&self, id: BufferId) -> Option<Arc<B>> {
        self.read().get(&id).cloned()
    }

    fn expect(&self, id: BufferId) -> Arc<B> {
        self.get(id).expect("buffer validated by the device")
    }

    fn insert(&self, id: BufferId, buffer: B) {
        write_lock(&self.0).insert(id, Arc::new(buffer));
    }

    /// Drops buffer `id` (once no reader holds it), outside the table's lock: a large
    /// buffer may take a while to go back.
    fn remove(&self, id: BufferId) {
        let buffer = write_lock(&self.0).remove(&id);
        drop(buffer);
    }
}

/// Device memory and kernel execution.
///
/// The device validates every id, range and shape before calling in, so a backend may
/// treat a violation of those as a bug (panic is acceptable there, never reachable from
/// a guest).
pub trait Backend: Send {
    /// "cpu", "cuda", ...: part of the migration compatibility check.
    fn kind(&self) -> &'static str;
    /// Version of the kernel library: the same kind and version give bit-identical
    /// results on every host.
    fn kernel_version(&self) -> u32;
    /// Creates buffer `id`, zero-filled.
    fn alloc(&mut self, id: BufferId, bytes: u64) -> Result<(), BackendError>;
    /// Releases buffer `id`.
    fn free(&mut self, id: BufferId);
    /// Copies `data` into buffer `id` at byte `offset`.
    fn write(&mut self, id: BufferId, offset: u64, data: &[u8]);
    /// Copies buffer `id` bytes from `offset` into `out`.
    fn read(&self, id: BufferId, offset: u64, out: &mut [u8]);
    /// Runs a validated kernel.
    fn launch(&mut self, kernel: &Kernel) -> Result<(), BackendError>;
    /// A reader of this backend's buffers for other threads.
    fn reader(&self) -> Arc<dyn BufferReader>;
    /// The switch that cuts its kernels short (see [`AbortSwitch`]), if it has one; by
    /// default none: its kernels run to their end (a GPU's, which a device being ended
    /// waits for, as a pause does, and a replay past its deadline too).
    fn abort_switch(&self) -> Option<AbortSwitch> {
        None
    }
    /// The host threads that run this backend's kernels, for the host to lift while it
    /// waits on them (none by default: a GPU's kernels do not need host threads).
    fn host_threads(&self) -> HostThreads {
        HostThreads::default()
    }
    /// Starts the device's command loop `run` on a thread of the backend's choosing
    /// (by default a thread of its own, "accel").
    fn spawn_device_loop(&self, run: Box<dyn FnOnce() + Send>) -> std::io::Result<DeviceLoop> {
        let (done, ended) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("accel".into())
            .spawn(move || {
                let _done = done;
                run();
            })?;
        Ok(DeviceLoop::new(ended))
    }
}

/// The Linux ids of the host threads a backend runs kernels on, recorded as each starts.
/// A host pausing the VM waits for the kernel in flight: it lifts these threads to its
/// own priority meanwhile, so a guest run at a low one does not stretch the pause.
#[derive(Debug, Clone, Default)]
pub struct HostThreads(Arc<Mutex<Vec<libc::pid_t>>>);

impl HostThreads {
    /// Records the calling thread.
    pub fn add_current(&self) {
        // SAFETY: gettid has no preconditions and touches no memory.
        let tid = unsafe { libc::gettid() };
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tid);
    }

    /// The threads recorded so far.
    pub fn ids(&self) -> Vec<libc::pid_t> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The device's command loop, running where its backend started it.
#[derive(Debug)]
pub struct DeviceLoop(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl DeviceLoop {
    /// The loop whose thread holds the sender of `ended` while it runs.
    pub fn new(ended: std::sync::mpsc::Receiver<()>) -> Self {
        Self(std::sync::Mutex::new(ended))
    }

    /// Waits until the loop has returned (or panicked).
    pub fn join(self) {
        // The sender is dropped when the loop's thread leaves it: recv then fails.
        let ended = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        let _ = ended.recv();
    }
}

/// Reads buffers from another thread while the device runs, waiting only for a kernel
/// that writes the buffer read: a migration's pre-copy must not queue behind every
/// kernel (one can take tens of milliseconds on gigabytes of weights).
pub trait BufferReader: Send + Sync {
    /// Calls `f` with all of buffer `id`'s bytes; `false` if there is no such buffer.
    fn with_buffer(&self, id: BufferId, f: &mut dyn FnMut(&[u8])) -> bool;

    /// Copies the bytes of buffer `id` in `range` (clamped to the buffer) into `out`;
    /// returns the buffer's size, or `None` if there is no such buffer. Backends whose
    /// memory is not the host's copy just those bytes.
    fn read_range(&self, id: BufferId, range: Range<u64>, out: &mut Vec<u8>) -> Option<u64> {
        let mut size = None;
        self.with_buffer(id, &mut |bytes| {
            let len = bytes.len() as u64;
            let (start, end) = (range.start.min(len), range.end.min(len));
            out.clear();
            out.extend_from_slice(&bytes[start as usize..end as usize]);
            size = Some(len);
        });
        size
    }

    /// The CRC-32 of all of buffer `id`'s bytes, or `None` if there is no such buffer.
    /// Hashed where the bytes lie, in parts on every core (the parts' CRCs combined);
    /// backends whose memory is not the host's copy it out in pieces instead.
    fn crc32(&self, id: BufferId) -> Option<u32> {
        let mut crc = None;
        let found = self.with_buffer(id, &mut |bytes| crc = Some(crc32_on_every_core(bytes)));
        crc.filter(|_| found)
    }
}

/// The least of a buffer one thread hashes for [`BufferReader::crc32`] (smaller buffers
/// are hashed by one thread: a thread costs more than hashing them).
const CRC_PART: usize = 4 << 20;

/// The CRC-32 of `bytes`, hashed in parts on every core and the parts' CRCs combined.
pub(crate) fn crc32_on_every_core(bytes: &[u8]) -> u32 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let part = bytes.len().div_ceil(threads).max(CRC_PART);
    if bytes.len() <= part {
        return crc32fast::hash(bytes);
    }
    let parts: Vec<crc32fast::Hasher> = std::thread::scope(|scope| {
        let hashing: Vec<_> = bytes
            .chunks(part)
            .map(|p| {
                scope.spawn(move || {
                    let mut h = crc32fast::Hasher::new();
                    h.update(p);
                    h
                })
            })
            .collect();
        hashing
            .into_iter()
            .map(|h| h.join().expect("hashing a part of a buffer"))
            .collect()
    });
    let mut crc = crc32fast::Hasher::new();
    for p in &parts {
        crc.combine(p);
    }
    crc.finalize()
}

/// Deterministic data for the conformance check and the tests (splitmix64): a seed gives
/// the same values on every host.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    fn f32(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0) * scale
    }

    /// Uniform below `n`.
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

/// Kernels on buffers `1..` in the order of their fields, as the conformance check and
/// the tests lay out their data.
mod numbered {
    use crate::kernel::{DType, Kernel, MatmulFlags};

    /// For each `fn name(fields) = Variant { buffer: id, ... };`, a function of the
    /// kernel's other fields that gives it on those buffers.
    macro_rules! numbered {
        ($(
            $(#[doc = $doc:literal])*
            fn $name:ident($($field:ident: $T:ty),+) = $Variant:ident {
                $($buffer:ident: $id:literal),+ $(,)?
            };
        )+) => {$(
            $(#[doc = $doc])*
            pub(super) fn $name($($field: $T),+) -> Kernel {
                Kernel::$Variant { $($buffer: $id,)+ $($field),+ }
            }
        )+};
    }

    numbered! {
        /// Buffer 3 = buffer 1 × buffer 2 (`m×k` by `k×n`, as `flags` say).
        fn matmul(m: usize, n: usize, k: usize, flags: MatmulFlags) = Matmul { a: 1, b: 2, c: 3 };
        /// Buffer 3 = buffer 1 + buffer 2, elementwise.
        fn add(n: usize) = Add { a: 1, b: 2, out: 3 };
        /// Buffer 3 = buffer 1 · buffer 2, elementwise.
        fn mul(n: usize) = Mul { a: 1, b: 2, out: 3 };
        /// RELU_BACKWARD of the input in buffer 1 and the gradient in buffer 2 into buffer 3.
        fn relu_backward(n: usize) = ReluBackward { x: 1, grad_out: 2, grad_in: 3 };
        /// GELU_BACKWARD of the input in buffer 1 and the gradient in buffer 2 into buffer 3.
        fn gelu_backward(n: usize) = GeluBackward { x: 1, grad_out: 2, grad_in: 3 };
        /// SOFTMAX of the `rows×cols` buffer 1 into buffer 2.
        fn softmax(rows: usize, cols: usize) = Softmax { x: 1, out: 2 };
        /// CROSS_ENTROPY of the logits in buffer 1 and the labels in buffer 2, its gradient
        /// into buffer 3 and its loss into buffer 4.
        fn cross_entropy(rows: usize, cols: usize) = CrossEntropy {
            logits: 1,
            labels: 2,
            grad: 3,
            loss: 4,
        };
        /// The sums of the rows of the `rows×cols` buffer 1 into buffer 2.
        fn sum_rows(rows: usize, cols: usize) = SumRows { x: 1, out: 2 };
        /// The sums of the columns of the `rows×cols` buffer 1 into buffer 2.
        fn sum_cols(rows: usize, cols: usize) = SumCols { x: 1, out: 2 };
        /// EMBEDDING of the `count` ids in buffer 2 from the f32 table in buffer 1 (`vocab`
        /// rows of `dim`) into buffer 3.
        fn embedding(count: usize, dim: usize, vocab: usize) = Embedding {
            table: 1,
            ids: 2,
            out: 3,
        };
        /// LAYER_NORM of the `rows×cols` buffer 1 with the gains in buffer 2 and the biases
        /// in buffer 3, into buffer 4.
        fn layer_norm(rows: usize, cols: usize, eps: f32) = LayerNorm {
            x: 1,
            gamma: 2,
            beta: 3,
            out: 4,
        };
        /// ATTENTION_DECODE of the query in buffer 1 over the first `len` positions of the
        /// key and value caches in buffers 2 and 3, into buffer 4.
        fn attention_decode(heads: usize, head_dim: usize, len: usize) = AttentionDecode {
            q: 1,
            k_cache: 2,
            v_cache: 3,
            out: 4,
        };
        /// ATTENTION of the `rows` queries in buffer 1 (at positions `pos`...) over the
        /// key and value caches in buffers 2 and 3, into buffer 4.
        fn attention(
            rows: usize,
            heads: usize,
            kv_heads: usize,
            head_dim: usize,
            pos: usize
        ) = Attention {
            q: 1,
            k_cache: 2,
            v_cache: 3,
            out: 4,
        };
        /// The indices of the row maxima of the `rows×cols` buffer 1 into buffer 2.
        fn argmax(rows: usize, cols: usize) = Argmax { x: 1, out: 2 };
        /// QEMBEDDING of the `count` ids in buffer 2 from the table in buffer 1 (`vocab`
        /// rows of `dim` in `dtype`) into buffer 3.
        fn qembedding(count: usize, dim: usize, vocab: usize, dtype: DType) = QEmbedding {
            table: 1,
            ids: 2,
            out: 3,
        };
        /// RMS_NORM of the `rows×cols` buffer 1 with the gains in buffer 2 into buffer 3.
        fn rms_norm(rows: usize, cols: usize, eps: f32) = RmsNorm { x: 1, weight: 2, out: 3 };
        /// SWIGLU of the gate in buffer 1 and the up projection in buffer 2 into buffer 3.
        fn swiglu(n: usize) = Swiglu { gate: 1, up: 2, out: 3 };
    }
}

/// Buffer 3 = buffer 1 × buffer 2, all `n×n`: the GEMM benchmarks' kernel.
pub fn square_matmul(n: usize) -> Kernel {
    numbered::matmul(n, n, n, crate::kernel::MatmulFlags::default())
}

/// Fills the first `n` f32 of buffer `out` with uniform values in [-1, 1) from stream
/// `seed`: the benchmarks' inputs.
pub fn uniform_fill(out: BufferId, n: usize, seed: u64) -> Kernel {
    Kernel::RngFill {
        out,
        n,
        seed,
        counter: 0,
        distribution: crate::kernel::Distribution::Uniform,
        scale: 1.0,
    }
}

/// The kind of the cpu backend.
pub const CPU: &str = "cpu";

/// Which backend a host gives its VMs' accelerators (`--backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Kernels on the host's CPU cores.
    #[default]
    Cpu,
    /// Kernels on the host's NVIDIA GPU; an error without one.
    Cuda,
    /// CUDA when the host has a GPU, else the CPU.
    Auto,
}

/// The GPU the cuda backend runs on here.
enum LocalGpu {
    /// A real one.
    Cuda(Arc<cuda::driver::CudaGpu>),
    /// `kernels.cu` emulated on the CPU (`FERRY_CUDA_EMULATOR=1`).
    Emulated(Arc<cuda::emulator::Emulator>),
}

/// Why this host has no cuda backend ([`cuda_kind`]).
#[derive(Debug, thiserror::Error)]
pub enum NoGpu {
    /// No GPU, driver or compiler, or the GPU failed to open.
    #[error(transparent)]
    Gpu(#[from] cuda::GpuError),
    /// `FERRY_CUDA_EMULATOR=1`, and the emulated GPU could not be built.
    #[error("cannot build the emulated GPU (FERRY_CUDA_EMULATOR=1)")]
    Emulator(#[from] cuda::emulator::EmulatorError),
}

/// A backend asked for by name that this host does not have ([`by_name`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "accelerator backend '{name}' is not available here (this host has: {})",
    available.join(", ")
)]
pub struct BackendUnavailable {
    /// The name asked for.
    pub name: String,
    /// The kinds this host has.
    pub available: Vec<&'static str>,
    /// Why it has no GPU, where a cuda backend was asked for.
    #[source]
    pub no_gpu: Option<&'static NoGpu>,
}

/// This host's GPU once [`cuda`] has opened it (or failed to).
static CUDA: std::sync::OnceLock<Result<(LocalGpu, &'static str), NoGpu>> =
    std::sync::OnceLock::new();

/// This host's GPU, opened once (compiling the kernels takes about a second), and its
/// backend kind: `cuda-sm_90-d13` names what the kernels' bits depend on besides their
/// source (the GPU's architecture, the driver's major version), so migrations between
/// hosts that differ there are refused at the handshake.
///
/// With `FERRY_CUDA_EMULATOR=1` the "GPU" is `kernels.cu` compiled by the host's C++
/// compiler and run on one CPU thread, kind `cuda-emulated`: slow, but it runs whole VMs
/// on the cuda backend's code where there is no GPU (the tests do).
fn cuda() -> Result<&'static (LocalGpu, &'static str), &'static NoGpu> {
    CUDA.get_or_init(|| {
        if std::env::var("FERRY_CUDA_EMULATOR").is_ok_and(|v| v == "1") {
            let dir =
                std::env::temp_dir().join(format!("ferry-cuda-emulator-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|source| {
                cuda::emulator::EmulatorError::CreateDir {
                    path: dir.clone(),
                    source,
                }
            })?;
            let built = cuda::emulator::Emulator::build(&dir);
            // Loaded, the library no longer needs its files.
            let _ = std::fs::remove_dir_all(&dir);
            return Ok((LocalGpu::Emulated(Arc::new(built?)), "cuda-emulated"));
        }
        let gpu = cuda::driver::CudaGpu::open()?;
        let kind: &'static str = format!("cuda-{}", gpu.determinism_key()).leak();
        Ok((LocalGpu::Cuda(Arc::new(gpu)), kind))
    })
    .as_ref()
}

/// The cuda backend's kind on this host, or why there is none.
pub fn cuda_kind() -> Result<&'static str, &'static NoGpu> {
    cuda().map(|(_, kind)| *kind)
}

/// This host's GPU, if it has a real one (not the emulator): for the benchmarks that call
/// CUDA libraries directly.
pub fn cuda_gpu() -> Option<Arc<cuda::driver::CudaGpu>> {
    match cuda() {
        Ok((LocalGpu::Cuda(gpu), _)) => Some(gpu.clone()),
        _ => None,
    }
}

/// The kind of backend `name` (`cpu`, `cuda`, or an exact kind) on this host, or why this
/// host has none.
pub fn by_name(name: &str) -> Result<&'static str, BackendUnavailable> {
    if name == CPU {
        return Ok(CPU);
    }
    match cuda_kind() {
        Ok(kind) if name == "cuda" || name == kind => Ok(kind),
        found => Err(BackendUnavailable {
            name: name.to_string(),
            available: available(),
            // A name that is no cuda kind (a typo, another vendor's) is not for want of
            // a GPU.
            no_gpu: found
                .err()
                .filter(|_| name == "cuda" || name.starts_with("cuda-")),
        }),
    }
}

/// The backend kinds this host can run (opening its GPU, if it has one, the first time).
pub fn available() -> Vec<&'static str> {
    let _ = cuda();
    available_now()
}

/// The backend kinds this host is known to run now, without waiting: a GPU is listed once
/// opened (see [`probe_gpu`]). For answers that must not wait on a driver (heartbeats, the
/// host's status): opening one takes a second, and a wedged one would never answer.
pub fn available_now() -> Vec<&'static str> {
    let mut kinds = vec![CPU];
    if let Some(Ok((_, kind))) = CUDA.get() {
        kinds.push(kind);
    }
    kinds
}

/// Opens this host's GPU, if it has one, on a thread of its own, so that
/// [`available_now`] lists it soon without anyone waiting for the driver.
pub fn probe_gpu() {
    let probing = std::thread::Builder::new()
        .name("gpu-probe".into())
        .spawn(|| {
            let _ = cuda();
        });
    if let Err(e) = probing {
        tracing::warn!("cannot probe for a GPU: {e}");
    }
}

/// The backend kind `choice` gives on this host, and in words why (for `auto`).
pub fn resolve(choice: BackendChoice) -> Result<(&'static str, String), BackendUnavailable> {
    match choice {
        BackendChoice::Cpu => Ok((CPU, "asked for".into())),
        BackendChoice::Cuda => by_name("cuda").map(|kind| (kind, "asked for".into())),
        BackendChoice::Auto => Ok(match cuda_kind() {
            Ok(kind) => (kind, "auto: this host has a GPU".into()),
            Err(why) => (CPU, format!("auto: {}", ferry_migrate::error_chain(why))),
        }),
    }
}

/// Creates a backend of `kind` (see [`by_name`]) with `threads` worker threads, or says
/// why this host has none; backends that keep device memory in host RAM take it from
/// `memory`.
pub fn create(
    kind: &str,
    threads: usize,
    memory: &DeviceMemory,
) -> Result<Box<dyn Backend>, BackendUnavailable> {
    let kind = by_name(kind)?;
    if kind == CPU {
        return Ok(Box::new(cpu::CpuBackend::new(
            threads.max(1),
            memory.clone(),
        )));
    }
    // `by_name` gave a cuda kind only from the GPU it opened (kept once opened).
    let (gpu, local) = cuda().expect("by_name gave a cuda kind: the GPU is open");
    Ok(match gpu {
        LocalGpu::Cuda(gpu) => Box::new(cuda::GpuBackend::new(gpu.clone(), local)),
        LocalGpu::Emulated(gpu) => Box::new(cuda::GpuBackend::new(gpu.clone(), local)),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_deadline_stops_kernels_once_passed_and_only_until_lifted() {
        let switch = AbortSwitch::default();
        assert!(!switch.stops_kernels());
        let deadline = switch.until(Instant::now() + Duration::from_secs(3600));
        assert!(!switch.stops_kernels(), "not passed yet");
        assert!(switch.stopped().is_ok());
        drop(deadline);
        let deadline = switch.until(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
        assert!(
            matches!(switch.stopped(), Ok(())),
            "no check has seen it pass"
        );
        assert!(switch.stops_kernels());
        assert!(matches!(switch.check(), Err(BackendError::OutOfTime)));
        assert_ne!(switch.cut(), Cut::Pulled);
        drop(deadline);
        assert!(!switch.stops_kernels(), "lifted");
        assert!(switch.check().is_ok());
    }

    #[test]
    fn a_pulled_switch_stays_pulled_whatever_deadlines_come_and_go() {
        let switch = AbortSwitch::default();
        let deadline = switch.until(Instant::now());
        switch.pull();
        assert!(matches!(switch.check(), Err(BackendError::Aborted)));
        drop(deadline);
        let deadline = switch.until(Instant::now() + Duration::from_secs(3600));
        assert!(switch.cut() == Cut::Pulled && switch.stops_kernels());
        drop(deadline);
        assert!(matches!(switch.check(), Err(BackendError::Aborted)));
    }
}
