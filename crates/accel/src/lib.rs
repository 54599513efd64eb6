//! Ferry's virtual accelerator (the "vGPU").
//!
//! The guest drives it through a command ring in guest memory (`ferry_abi::accel`).
//! The device runs on its own thread, asynchronously to the vCPU, like a real GPU:
//!
//! - [`device::Accelerator`]: the device thread, doorbell and wait, pause at a command
//!   boundary, save/restore.
//! - [`ring`]: reading and validating commands from guest memory.
//! - [`dirty`]: exact dirty tracking of device memory in [`dirty::CHUNK_SIZE`] chunks,
//!   driven by what each command declares it writes.
//! - [`kernel`]: the typed, validated kernel launches.
//! - [`files`]: the VM's attached files as LOAD_FILE reads them.
//! - [`replay`]: a consistent base of device memory and the log of the commands run
//!   after it, for a destination that replays them instead of receiving what they wrote.
//! - [`backend`]: where buffers live and kernels run (`cpu` today).

pub mod backend;
pub mod device;
pub mod dirty;
pub mod files;
pub mod kernel;
pub mod replay;
pub mod ring;
