//! Guest-physical memory map of the pages the VMM owns (all below `abi::IMAGE_BASE`).
//!
//! ```text
//! 0x0000_0000  null page            not present: catches null dereferences
//! 0x0000_1000  GDT                  supervisor only
//! 0x0000_2000  IDT                  supervisor only
//! 0x0000_3000  TSS                  supervisor only
//! 0x0000_4000  fault stubs (code)   supervisor only
//! 0x0000_5000  boot-info page       user read-only (abi::BOOT_INFO_ADDR)
//! 0x0000_6000  ring-0 stack         supervisor only, 8 KiB, for the fault stubs
//! 0x0000_9000  console buffer       user read/write (abi::CONSOLE_BUFFER_ADDR)
//! 0x0000_a000  attached-file table  user read-only (abi::file::FILE_TABLE_ADDR)
//! 0x0000_b000  file read request    user read/write (abi::file::FILE_REQUEST_ADDR)
//! 0x0001_0000  page tables          supervisor only: PML4, PDPT, low PT, PDs
//! 0x0010_0000  guest image          (abi::IMAGE_BASE), then heap, stack at the top of RAM
//! ```

use ferry_abi::file::{FILE_REQUEST_ADDR, FILE_TABLE_ADDR};
use ferry_abi::{BOOT_INFO_ADDR, CONSOLE_BUFFER_ADDR, IMAGE_BASE, PAGE_SIZE};

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table.
pub const IDT_ADDR: u64 = 0x2000;
/// 64-bit task-state segment (holds RSP0 for faults taken in ring 3).
pub const TSS_ADDR: u64 = 0x3000;
/// Ring-0 fault stubs.
pub const FAULT_STUBS_ADDR: u64 = 0x4000;
/// Bottom of the ring-0 stack.
pub const RING0_STACK_ADDR: u64 = 0x6000;
/// Top of the ring-0 stack (TSS.RSP0).
pub const RING0_STACK_TOP: u64 = 0x8000;
/// Page-map level 4 (CR3).
pub const PML4_ADDR: u64 = 0x1_0000;
/// The one page-directory-pointer table (covers 512 GiB).
pub const PDPT_ADDR: u64 = 0x1_1000;
/// 4 KiB page table for the first 2 MiB, so system pages can be protected one by one.
pub const LOW_PT_ADDR: u64 = 0x1_2000;
/// First page directory; PD `i` maps GiB `i` with 2 MiB pages.
pub const PD_BASE_ADDR: u64 = 0x1_3000;

/// Most guest RAM supported: one PD page per GiB must fit below the image.
pub const MAX_RAM_SIZE: u64 = 64 << 30;
/// Least guest RAM: the system pages, an image, a heap and the stack.
pub const MIN_RAM_SIZE: u64 = 16 << 20;
/// Guest RAM size granularity (the identity map uses 2 MiB pages).
pub const RAM_ALIGN: u64 = 2 << 20;

const _: () = assert!(PD_BASE_ADDR + (MAX_RAM_SIZE >> 30) * PAGE_SIZE <= IMAGE_BASE);
const _: () = assert!(BOOT_INFO_ADDR == 0x5000 && CONSOLE_BUFFER_ADDR == 0x9000);
const _: () = assert!(FILE_TABLE_ADDR == 0xa000 && FILE_REQUEST_ADDR == 0xb000);

/// What ring 3 may do with a page in the first 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowPageAccess {
    /// Not present at all.
    None,
    /// Present for ring 0 only.
    Supervisor,
    /// Present, ring 3 may read.
    UserReadOnly,
    /// Present, ring 3 may read and write.
    UserReadWrite,
}

/// Access rule for the 4 KiB page at `addr` (< 2 MiB).
pub fn low_page_access(addr: u64) -> LowPageAccess {
    match addr {
        0 => LowPageAccess::None,
        BOOT_INFO_ADDR | FILE_TABLE_ADDR => LowPageAccess::UserReadOnly,
        CONSOLE_BUFFER_ADDR | FILE_REQUEST_ADDR => LowPageAccess::UserReadWrite,
        a if a < IMAGE_BASE => LowPageAccess::Supervisor,
        _ => LowPageAccess::UserReadWrite,
    }
}
