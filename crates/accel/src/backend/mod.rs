//! Where device memory lives and kernels run. The device (command processing,
//! validation, dirty tracking, state) is the same for every backend; a backend only
//! stores buffers and executes already-validated kernels.

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::kernel::Kernel;
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
    /// The device (a GPU or its driver) failed.
    #[error("device failure: {0}")]
    Device(String),
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
}

/// Backend kinds this build provides.
pub const AVAILABLE: &[&str] = &["cpu"];

/// Creates a backend of `kind` with `threads` worker threads, if this build has it;
/// backends that keep device memory in host RAM take it from `memory`.
pub fn create(kind: &str, threads: usize, memory: &DeviceMemory) -> Option<Box<dyn Backend>> {
    match kind {
        "cpu" => Some(Box::new(cpu::CpuBackend::new(
            threads.max(1),
            memory.clone(),
        ))),
        _ => None,
    }
}
