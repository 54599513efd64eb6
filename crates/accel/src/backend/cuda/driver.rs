//! The real [`Gpu`]: the CUDA driver and NVRTC through `cudarc`, both loaded at run time.
//!
//! Kernels run in order on one stream. Every buffer remembers the event recorded after
//! the last launch or copy that wrote it; a read waits for that event only, on a copy
//! stream of its own (one per concurrent read, pooled), so a migration's chunk reads do
//! not queue behind kernels that do not write the buffer read, nor behind each other.
//! Every call binds the context to its thread first (a buffer may be freed on any
//! thread: CUDA needs the context there).
//!
//! At most [`LAUNCH_WINDOW`] launches wait on the GPU at once: a guest launching small
//! kernels faster than the GPU runs them would otherwise fill the driver's queue, and a
//! migration's copies then waited behind it (on an H200, llm-decode's chunk reads and the
//! destination's writes crawled at 5 MiB/s, stuck inside the copy calls).
//!
//! `scripts/gpu-check.sh` runs the device tests and benches on a GPU (first run on an
//! H200, driver 580, in December 2026).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use super::{Args, Gpu, GpuError, Launch, ENTRY_POINTS, KERNELS_CU};

// SAFETY: Args is repr(C), sixteen u64 and no padding: kernels.cu's `struct Args`.
unsafe impl DeviceRepr for Args {}

/// Threads per block of every launch.
const BLOCK: u32 = 256;
/// Bytes of one pinned staging buffer: copies up to this size (a migration's chunks) go
/// through one, so the DMA engine copies at full speed and the caller's memory need not
/// be pinned; larger ones go directly.
const STAGING: usize = 1 << 20;
/// Launches queued on the GPU before the next waits for the oldest to end: deep enough to
/// keep the GPU fed, shallow enough that a copy never queues behind seconds of kernels.
/// `FERRY_CUDA_LAUNCH_WINDOW` sets another (0: unbounded), to measure the difference.
pub const LAUNCH_WINDOW: usize = 32;

/// How often a launch waiting for room in the window looks again.
const WINDOW_POLL: std::time::Duration = std::time::Duration::from_micros(20);

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Driver {
        what,
        message: e.to_string(),
    }
}

/// Whether this host has the CUDA driver library (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library and drops it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether this host has NVRTC (never panics).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library and drops it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, `major.minor` (`?` if it cannot say).
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints; only called once NVRTC is known to be present.
    match unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result() {
        Ok(()) => format!("{major}.{minor}"),
        Err(_) => "?".into(),
    }
}

/// Compiles `kernels.cu` to PTX for `arch` (e.g. `sm_90`): multiplies and adds never
/// fused, IEEE division and square root.
pub fn compile(arch: &str) -> Result<String, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoCompiler);
    }
    let options = CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture={arch}")],
        ..Default::default()
    };
    match compile_ptx_with_opts(KERNELS_CU, options) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, log, .. }) => Err(GpuError::Compile(format!(
            "{nvrtc:?}\n{}",
            log.to_string_lossy()
        ))),
        Err(e) => Err(GpuError::Compile(format!("{e:?}"))),
    }
}

/// A buffer in GPU memory.
pub struct CudaMemory {
    slice: CudaSlice<u8>,
    address: u64,
    /// Recorded after the last launch or copy that wrote it.
    written: Mutex<Option<Arc<CudaEvent>>>,
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        // The slice is freed after this, maybe on a thread that never used CUDA: the
        // free needs the context current there (cudarc does not bind it for a free).
        let _ = bind_context(self.slice.context());
    }
}

/// Makes `context` current on this thread. cudarc first hands back an error an earlier
/// free (on any thread) left behind, without binding: that error is logged, not taken for
/// this call's (a real fault of the context fails the call itself again), and the bind
/// tried once more; else the free that follows a failed bind fails too, and leaves an
/// error for some other VM's next call.
fn bind_context(context: &CudaContext) -> Result<(), cudarc::driver::DriverError> {
    context.bind_to_thread().or_else(|earlier| {
        tracing::warn!("a CUDA error left by an earlier asynchronous call: {earlier}");
        context.bind_to_thread()
    })
}

/// GPU 0 of this host, with `kernels.cu` loaded.
pub struct CudaGpu {
    context: Arc<CudaContext>,
    /// Kernels and writes, in order.
    compute: Arc<CudaStream>,
    /// Copy streams not in use, for reads.
    copies: Mutex<Vec<Arc<CudaStream>>>,
    _module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
    description: String,
    /// Pinned staging buffers not in use (one per concurrent copy at most).
    staging: Mutex<Vec<PinnedHostSlice<u8>>>,
    /// Events recorded after the launches that may still be queued, oldest first.
    queued: Mutex<VecDeque<Arc<CudaEvent>>>,
    /// Most launches queued at once (0: unbounded).
    launch_window: usize,
}

impl CudaGpu {
    /// Opens GPU 0 and compiles the kernels for it.
    pub fn open() -> Result<Self, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let launch_window = match std::env::var("FERRY_CUDA_LAUNCH_WINDOW") {
            Ok(set) => set.parse().map_err(|_| GpuError::LaunchWindow(set))?,
            Err(_) => LAUNCH_WINDOW,
        };
        let count = CudaContext::device_count().map_err(|e| GpuError::NoDevice(e.to_string()))?;
        if count < 1 {
            return Err(GpuError::NoDevice("the driver reports no device".into()));
        }
        let context = CudaContext::new(0).map_err(driver("context creation"))?;
        // Ordering is ours (the events below): the crate's own tracking would add a
        // wait and a record per buffer argument, and cannot see addresses in `Args`.
        // SAFETY: every launch, copy and free below is ordered by those events.
        unsafe { context.disable_event_tracking() };
        let (major, minor) = context
            .compute_capability()
            .map_err(driver("capability query"))?;
        let name = context.name().map_err(driver("name query"))?;
        let mut version = 0i32;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver("driver version query"))?;
        let arch = format!("sm_{major}{minor}");
        let ptx = compile(&arch)?;
        let module = context
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| GpuError::Driver {
                what: "module load",
                message: format!(
                    "{e} (a driver older than the NVRTC that compiled the kernels cannot \
                     load them: driver {}.{}, NVRTC {})",
                    version / 1000,
                    version % 1000 / 10,
                    nvrtc_version()
                ),
            })?;
        let mut functions = HashMap::new();
        for &entry in ENTRY_POINTS {
            let function = module
                .load_function(entry)
                .map_err(driver("kernel lookup"))?;
            functions.insert(entry, function);
        }
        let compute = context.new_stream().map_err(driver("stream creation"))?;
        Ok(Self {
            description: format!("{name}, {arch}, driver {}", version / 1000),
            context,
            compute,
            copies: Mutex::default(),
            _module: module,
            functions,
            staging: Mutex::default(),
            queued: Mutex::default(),
            launch_window,
        })
    }

    /// `sm_XY-dN`: what the kernels' bits depend on besides their source.
    pub fn determinism_key(&self) -> String {
        self.description
            .split(", ")
            .skip(1)
            .collect::<Vec<_>>()
            .join("-")
            .replace("driver ", "d")
    }

    /// Runs `copy` with a pinned staging buffer (taken from the pool, or made), and gives
    /// it back.
    fn with_staging<R>(
        &self,
        copy: impl FnOnce(&mut PinnedHostSlice<u8>) -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        let taken = self.staging.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut pinned = match taken {
            Some(p) => p,
            // SAFETY: flags 0 is plain page-locked memory (not write-combined, which the
            // CPU reads slowly); the slice is only used through its own accessors.
            None => unsafe { self.context.alloc_pinned_with_flags::<u8>(STAGING, 0) }
                .map_err(driver("pinned allocation"))?,
        };
        let result = copy(&mut pinned);
        match result {
            Ok(_) => (self.staging.lock())
                .unwrap_or_else(|e| e.into_inner())
                .push(pinned),
            // A copy that failed may not have waited for its DMA, which may still be
            // writing the buffer or reading it: neither reused nor freed (a megabyte
            // lost, on a GPU that is failing).
            Err(_) => std::mem::forget(pinned),
        }
        result
    }

    /// Makes the context current on this thread (a call from any thread may come).
    fn bind(&self, what: &'static str) -> Result<(), GpuError> {
        bind_context(&self.context).map_err(driver(what))
    }

    /// `len` bytes of `memory` from `offset`, with the context current on this thread,
    /// for the copy `what`.
    fn bound_view<'m>(
        &self,
        what: &'static str,
        memory: &'m CudaMemory,
        offset: u64,
        len: usize,
    ) -> Result<CudaView<'m, u8>, GpuError> {
        self.bind(what)?;
        let start = offset as usize;
        memory
            .slice
            .try_slice(start..start + len)
            .ok_or(GpuError::Driver {
                what,
                message: "range outside the buffer".into(),
            })
    }

    /// A copy stream of its own for one read (from the pool, or made).
    fn copy_stream(&self) -> Result<Arc<CudaStream>, GpuError> {
        let pooled = self.copies.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(stream) => Ok(stream),
            None => self.context.new_stream().map_err(driver("stream creation")),
        }
    }

    /// An event recorded on the compute stream after what is queued there now.
    fn record(&self) -> Result<Arc<CudaEvent>, GpuError> {
        self.compute
            .record_event(None)
            .map(Arc::new)
            .map_err(driver("event record"))
    }

    /// Marks `memory` written by what `event` follows.
    fn mark_written(memory: &CudaMemory, event: &Arc<CudaEvent>) {
        *memory.written.lock().unwrap_or_else(|e| e.into_inner()) = Some(event.clone());
    }

    /// Counts the launch `event` follows as queued; once more than the window are, waits
    /// (without the lock) for the launches beyond it to end.
    fn keep_window(&self, event: Arc<CudaEvent>) -> Result<(), GpuError> {
        if self.launch_window == 0 {
            return Ok(());
        }
        let mut oldest = None;
        {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            queued.push_back(event);
            while queued.len() > self.launch_window {
                // One stream runs in order: the newest of those ended means all did.
                oldest = queued.pop_front();
            }
        }
        // Polled with short sleeps, not synchronized on: a synchronize spins a core for
        // as long as the launches ahead run, and the window's others keep the GPU busy
        // while this thread sleeps.
        if let Some(event) = oldest {
            while !event.try_is_complete().map_err(driver("launch"))? {
                std::thread::sleep(WINDOW_POLL);
            }
        }
        Ok(())
    }
}

impl CudaGpu {
    /// An `n×n×n` f32 GEMM through cuBLAS called directly on this GPU, GFLOP/s (the best
    /// of several runs): what the cuda backend's MATMUL is measured against. `None` where
    /// cuBLAS is not installed.
    pub fn cublas_gemm_gflops(&self, n: usize) -> Result<Option<f64>, GpuError> {
        use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
        // SAFETY: only tries to load the library and drops it.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Ok(None);
        }
        let failed = |what: &'static str| {
            move |e: cudarc::cublas::result::CublasError| GpuError::Driver {
                what,
                message: format!("{e:?}"),
            }
        };
        let blas = CudaBlas::new(self.compute.clone()).map_err(failed("cuBLAS start"))?;
        let alloc = || {
            self.compute
                .alloc_zeros::<f32>(n * n)
                .map_err(driver("allocation"))
        };
        let (a, b, mut c) = (alloc()?, alloc()?, alloc()?);
        let side = i32::try_from(n).map_err(|_| GpuError::Driver {
            what: "cuBLAS GEMM",
            message: format!("{n} is too large"),
        })?;
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: side,
            n: side,
            k: side,
            alpha: 1.0f32,
            lda: side,
            ldb: side,
            beta: 0.0f32,
            ldc: side,
        };
        let mut best = f64::MAX;
        for _ in 0..6 {
            let started = std::time::Instant::now();
            // SAFETY: a, b and c hold n×n f32 each, as the configuration says.
            unsafe { blas.gemm(config, &a, &b, &mut c) }.map_err(failed("cuBLAS GEMM"))?;
            self.compute.synchronize().map_err(driver("cuBLAS GEMM"))?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok(Some(2.0 * (n as f64).powi(3) / best.max(1e-9) / 1e9))
    }
}

impl Gpu for CudaGpu {
    type Memory = CudaMemory;

    fn description(&self) -> String {
        self.description.clone()
    }

    fn alloc(&self, bytes: u64) -> Result<CudaMemory, GpuError> {
        self.bind("allocation")?;
        let len = usize::try_from(bytes).map_err(|_| GpuError::Driver {
            what: "allocation",
            message: format!("{bytes} bytes"),
        })?;
        let slice = self
            .compute
            .alloc_zeros::<u8>(len)
            .map_err(driver("allocation"))?;
        let address = {
            let (address, _guard) = slice.device_ptr(&self.compute);
            address
        };
        // Its zeroing is queued on the compute stream: a read waits for that.
        Ok(CudaMemory {
            slice,
            address,
            written: Mutex::new(Some(self.record()?)),
        })
    }

    fn address(&self, memory: &CudaMemory) -> u64 {
        memory.address
    }

    fn write(&self, memory: &CudaMemory, offset: u64, data: &[u8]) -> Result<(), GpuError> {
        let view = self.bound_view("write", memory, offset, data.len())?;
        let (dst, _guard) = view.device_ptr(&self.compute);
        let stream = self.compute.cu_stream();
        if data.len() <= STAGING {
            self.with_staging(|pinned| {
                let staged = &mut pinned.as_mut_slice().map_err(driver("write"))?[..data.len()];
                staged.copy_from_slice(data);
                // SAFETY: `dst` is `data.len()` bytes of device memory that `memory`
                // owns; the staging buffer is not reused before the stream is synchronized.
                unsafe { cudarc::driver::result::memcpy_htod_async(dst, staged, stream) }
                    .map_err(driver("write"))?;
                self.compute.synchronize().map_err(driver("write"))
            })?;
        } else {
            // SAFETY: as above; a pageable source is copied before the call returns.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, stream) }
                .map_err(driver("write"))?;
            self.compute.synchronize().map_err(driver("write"))?;
        }
        Self::mark_written(memory, &self.record()?);
        Ok(())
    }

    fn read(&self, memory: &CudaMemory, offset: u64, out: &mut [u8]) -> Result<(), GpuError> {
        let view = self.bound_view("read", memory, offset, out.len())?;
        let copies = self.copy_stream()?;
        let copied = (|| {
            // After the last writer of this buffer only, not after unrelated kernels;
            // waited for without the buffer's lock, which a launch marking it needs (the
            // wait may block while the driver's queue is full).
            let written = memory
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(event) = written {
                copies.wait(&event).map_err(driver("read"))?;
            }
            let (src, _guard) = view.device_ptr(&copies);
            let stream = copies.cu_stream();
            if out.len() > STAGING {
                // SAFETY: `src` is `out.len()` bytes of device memory that `memory` owns.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut *out, src, stream) }
                    .map_err(driver("read"))?;
                return copies.synchronize().map_err(driver("read"));
            }
            self.with_staging(|pinned| {
                let staged = &mut pinned.as_mut_slice().map_err(driver("read"))?[..out.len()];
                // SAFETY: `src` is `out.len()` bytes of device memory that `memory` owns;
                // the staging buffer is read only after the stream is synchronized.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut *staged, src, stream) }
                    .map_err(driver("read"))?;
                copies.synchronize().map_err(driver("read"))?;
                out.copy_from_slice(staged);
                Ok(())
            })
        })();
        self.copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(copies);
        copied
    }

    fn launch(&self, launch: &Launch, writes: &[&CudaMemory]) -> Result<(), GpuError> {
        self.bind("launch")?;
        let function = self.functions.get(launch.entry).ok_or(GpuError::Driver {
            what: "launch",
            message: format!("no kernel {}", launch.entry),
        })?;
        let blocks = u32::try_from(launch.items.div_ceil(u64::from(BLOCK)))
            .ok()
            .filter(|&b| b < (1 << 31))
            .ok_or(GpuError::Driver {
                what: "launch",
                message: format!("{} work items are more than one grid", launch.items),
            })?;
        if blocks == 0 {
            return Ok(());
        }
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.compute.launch_builder(function);
        builder.arg(&launch.args);
        // SAFETY: the device validated every buffer range the kernel touches (its
        // access set), and `plan` passes those buffers' addresses and sizes.
        unsafe { builder.launch(config) }.map_err(driver("launch"))?;
        // One event for every buffer the launch writes, and for the window. Without one
        // the kernel would be queued unmarked, and a read of what it writes not wait for
        // it: it is waited for here instead.
        let event = self.record().inspect_err(|_| {
            let _ = self.compute.synchronize();
        })?;
        for memory in writes {
            Self::mark_written(memory, &event);
        }
        self.keep_window(event)
    }
}
