//! The runtime of a Ferry guest: a `#![no_std]` static ELF running in ring 3 of a
//! Ferry microVM, talking to the host only through the ports in [`ferry_abi::port`].
//!
//! A workload is a `#![no_std] #![no_main]` binary that declares its main with
//! [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! ferry_sdk::entry!(main);
//! fn main(args: ferry_sdk::Args) -> i32 {
//!     ferry_sdk::println!("hello");
//!     0
//! }
//! ```
//!
//! The SDK provides the entry point, console output ([`print!`], [`println!`]), the
//! guest clock ([`clock::now_ns`]), [`exit`], a global allocator over the heap the
//! VMM describes in the boot info, a panic handler, and the `mem*` functions that a
//! freestanding binary needs; [`accel`] is the tensor API of the virtual accelerator,
//! [`files`] reads the VM's attached files and [`workload`] is the usual shape of a `main`.
//! A workload starts with `use ferry_sdk::prelude::*;` for what nearly every one uses.
#![no_std]

extern crate alloc;

pub mod accel;
pub mod args;
pub mod channel;
pub mod checksum;
pub mod clock;
pub mod console;
pub mod files;
pub mod math;
mod mem;
pub mod rt;
pub mod workload;

pub use args::{ArgError, Args};
pub use ferry_abi as abi;
pub use rt::{exit, EXIT_BAD_BOOT_INFO, EXIT_PANIC, EXIT_USAGE};

/// What nearly every workload uses: `alloc`'s strings, vectors and boxes with their
/// macros, console output and the arguments, as `std`'s prelude would give them.
pub mod prelude {
    pub use crate::{print, println, ArgError, Args};
    pub use alloc::boxed::Box;
    pub use alloc::format;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec;
    pub use alloc::vec::Vec;
}
