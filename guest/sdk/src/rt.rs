//! Entry, exit, heap and panic handling.

use crate::{console, println, Args};
use alloc::vec::Vec;
use core::arch::asm;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use ferry_abi::{port, BootInfo, ABI_VERSION, BOOT_INFO_MAGIC, PAGE_SIZE};
use linked_list_allocator::LockedHeap;

/// Exit code after a panic (as Rust's std uses for a panicking process).
pub const EXIT_PANIC: i32 = 101;
/// Exit code when the boot info is unusable (wrong magic or ABI version, bad heap or args).
pub const EXIT_BAD_BOOT_INFO: i32 = 120;
/// Conventional exit code for a bad command line.
pub const EXIT_USAGE: i32 = 2;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The validated boot-info page, set once by [`start`] before `main` runs.
static BOOT_INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());

extern "C" {
    /// End of the loaded image (after .bss), defined by the workloads' linker script.
    static __ferry_image_end: u8;
}

/// Declares the workload's `fn main(args: ferry_sdk::Args) -> i32` and defines the
/// `_start` entry point that calls it; the return value becomes the exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Guest entry point: the VMM jumps here with `rdi` = the boot-info address.
        ///
        /// # Safety
        /// Only the VMM may call this, once, with its boot-info page.
        #[no_mangle]
        pub unsafe extern "C" fn _start(boot: *const $crate::abi::BootInfo) -> ! {
            let main: fn($crate::Args) -> i32 = $main;
            // SAFETY: our caller, the VMM, upholds `start`'s contract.
            unsafe { $crate::rt::start(boot, main) }
        }
    };
}

/// Validates the boot info, sets up the heap, runs `main` and exits with its result.
///
/// # Safety
/// `boot` must point to the boot-info page written by the VMM, and this must be the
/// only call (it takes ownership of the heap).
#[doc(hidden)]
pub unsafe fn start(boot: *const BootInfo, main: fn(Args) -> i32) -> ! {
    if boot.is_null() || !boot.is_aligned() {
        bad_boot_info(format_args!(
            "boot info pointer {boot:p} is null or misaligned"
        ));
    }
    // SAFETY: the caller guarantees `boot` points to the boot-info page, which nothing
    // writes while the guest runs.
    let info: &'static BootInfo = unsafe { &*boot };
    if info.magic != BOOT_INFO_MAGIC {
        bad_boot_info(format_args!(
            "magic is {:#018x}, expected {BOOT_INFO_MAGIC:#018x} (not started by a Ferry VMM?)",
            info.magic
        ));
    }
    if info.abi_version != ABI_VERSION {
        bad_boot_info(format_args!(
            "ABI version is {}, this guest was built for version {ABI_VERSION}",
            info.abi_version
        ));
    }
    // SAFETY: as above; this is the only call, so the heap is not initialised yet.
    unsafe { init_heap(info) };
    BOOT_INFO.store(boot.cast_mut(), Ordering::Release);
    exit(main(args(info)))
}

/// The boot-info page the VMM wrote (RAM size, heap, accelerator ring), as validated
/// before `main` was called.
///
/// # Panics
/// If called before the SDK's entry point ran, which cannot happen in a workload.
pub fn boot_info() -> &'static BootInfo {
    let info = BOOT_INFO.load(Ordering::Acquire);
    assert!(!info.is_null(), "boot_info() called before the SDK started");
    // SAFETY: `start` stored a pointer it validated, to the boot-info page that nothing
    // writes while the guest runs.
    unsafe { &*info }
}

/// Hands `heap_start..heap_end` to the allocator after checking it is plausible.
///
/// # Safety
/// The range must be RAM that nothing else uses; call at most once.
unsafe fn init_heap(info: &BootInfo) {
    let image_end = &raw const __ferry_image_end as u64;
    let (start, end) = (info.heap_start, info.heap_end);
    if start % PAGE_SIZE != 0 || start < image_end || start > end || end > info.ram_size {
        bad_boot_info(format_args!(
            "heap {start:#x}..{end:#x} is not page aligned, overlaps the image \
             (ends at {image_end:#x}) or exceeds RAM ({:#x})",
            info.ram_size
        ));
    }
    // SAFETY: checked above to be RAM past the image; the caller guarantees it is ours.
    unsafe { HEAP.lock().init(start as *mut u8, (end - start) as usize) };
}

/// The arguments as strings, or a bad-boot-info exit if they are malformed.
fn args(info: &'static BootInfo) -> Args {
    let Some(raw) = info.args() else {
        bad_boot_info(format_args!(
            "argc {} and args_len {} do not match the argument bytes",
            info.argc, info.args_len
        ));
    };
    let mut items = Vec::with_capacity(info.argc as usize);
    for (i, bytes) in raw.enumerate() {
        match core::str::from_utf8(bytes) {
            Ok(s) => items.push(s),
            Err(e) => bad_boot_info(format_args!("argument {i} is not UTF-8: {e}")),
        }
    }
    Args::new(items)
}

fn bad_boot_info(why: core::fmt::Arguments<'_>) -> ! {
    println!("ferry-sdk: bad boot info: {why}");
    exit(EXIT_BAD_BOOT_INFO)
}

/// Flushes the console and ends the guest with `code` through the EXIT port.
pub fn exit(code: i32) -> ! {
    console::flush();
    // SAFETY: a 32-bit `out` to the EXIT port has no memory effects; the VMM stops us.
    unsafe {
        asm!("out dx, eax", in("dx") port::EXIT, in("eax") code as u32,
             options(nomem, nostack, preserves_flags));
    }
    // A host that ignores the exit must not see us run on; `hlt` would fault in ring 3.
    loop {
        core::hint::spin_loop();
    }
}

/// Unwinder entry referenced by the landing pads of the prebuilt `core`/`alloc`, which
/// were compiled for unwinding; with `panic = "abort"` nothing ever unwinds to them.
#[no_mangle]
#[allow(non_snake_case)]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(EXIT_PANIC)
}

/// Personality routine named by the unwind tables of the prebuilt `core`/`alloc` in
/// unoptimised builds; never called, since nothing unwinds.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::Relaxed) {
        exit(EXIT_PANIC); // panicked while reporting a panic
    }
    match info.location() {
        Some(at) => println!(
            "panicked at {}:{}:{}: {}",
            at.file(),
            at.line(),
            at.column(),
            info.message()
        ),
        None => println!("panicked: {}", info.message()),
    }
    exit(EXIT_PANIC)
}
