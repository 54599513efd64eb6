//! One Ferry microVM on KVM.
//!
//! The guest runs in 64-bit ring 3 with IOPL 3 (see `ferry_abi` for its contract); the
//! VMM builds the page tables and descriptor tables itself and enters the guest directly,
//! so there is no guest boot code. Ring 0 only hosts fault stubs that report to the VMM.
//!
//! - [`vm::Microvm`]: lifecycle (boot, run, pause, resume, save, restore, dirty log).
//! - [`vcpu`]: the vCPU thread, its exits, and its state in KVM's save/restore order.
//! - [`memory`]: guest RAM and exact dirty-page tracking.
//! - [`loader`]: guest ELF checks and loading.
//! - [`devices`]: console, clock, exit and file-read ports, and the message channel.
//! - [`files`]: attached read-only files (models, datasets).
//! - [`migration`]: the microVM as the migration engine's source and target.
//! - `priority`: the VM threads' priority below the host's, lifted while it waits on them;
//!   background work below both.
//! - [`snapshot`]: a paused VM saved to a file and restored, by the migration engine.
//! - [`arch`]: x86-64 memory map, page tables, GDT/TSS/IDT, entry registers.

pub mod arch;
pub mod devices;
pub mod files;
pub mod loader;
pub mod memory;
pub mod migration;
mod priority;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use devices::console::ConsoleSink;
pub use files::{AttachedFiles, FileInfo};
pub use memory::PageSet;
pub use priority::{at_background_priority, BACKGROUND_NICE};
pub use vm::{
    HostOptions, Microvm, MicrovmState, Paused, RunState, VmConfig, VmExit, VmReadout, VmTracker,
};

/// Checks that `/dev/kvm` can be opened; `Err` carries the reason it cannot.
pub fn check_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}
