//! x86-64 machine setup: memory map, identity page tables, descriptor tables, fault stubs
//! and the entry register state.

pub mod layout;
pub mod paging;
pub mod regs;
pub mod tables;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::memory::GuestRam;

/// Writes the VMM-owned system pages (page tables, GDT, TSS, IDT, fault stubs) for a VM
/// with `ram_size` bytes of RAM.
pub fn write_system_pages(mem: &GuestRam, ram_size: u64) -> Result<(), GuestMemoryError> {
    for page in paging::identity_map(ram_size) {
        mem.write_slice(&page.to_bytes(), GuestAddress(page.addr))?;
    }
    let gdt: Vec<u8> = tables::gdt(layout::TSS_ADDR)
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    mem.write_slice(&gdt, GuestAddress(layout::GDT_ADDR))?;
    mem.write_slice(&tables::tss(), GuestAddress(layout::TSS_ADDR))?;
    mem.write_slice(&tables::idt(), GuestAddress(layout::IDT_ADDR))?;
    // The whole page, so nothing but the stubs is there to run in ring 0 (a snapshot's
    // RAM is not trusted).
    let mut stubs = tables::fault_stubs();
    stubs.resize(ferry_abi::PAGE_SIZE as usize, 0xcc);
    mem.write_slice(&stubs, GuestAddress(layout::FAULT_STUBS_ADDR))?;
    Ok(())
}
