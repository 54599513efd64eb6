//! The vCPU state at the first instruction: long mode, ring 3, IOPL 3, SSE on.

use ferry_abi::BOOT_INFO_ADDR;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR, TSS_ADDR};
use super::tables::{IDT_SIZE, TSS_SELECTOR, TSS_SIZE, USER_CODE_SELECTOR, USER_DATA_SELECTOR};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Reserved bit 1 plus IOPL 3: `in`/`out` from ring 3 exit straight to the VMM.
/// (Our nested PVM KVM clears IOPL on entry to user mode and honours the TSS I/O bitmap
/// instead, so the TSS grants the same ports; see `tables::tss`.)
/// Interrupts stay disabled: the guest polls, it takes no interrupts.
pub const ENTRY_RFLAGS: u64 = 0x3002;

/// General registers at entry: `rdi` carries the boot-info address (first System V
/// argument) and `rsp` is 8 below 16-byte alignment, as after a `call`.
pub fn entry_regs(entry: u64, stack_top: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top - 8,
        rdi: BOOT_INFO_ADDR,
        rflags: ENTRY_RFLAGS,
        ..Default::default()
    }
}

fn segment(selector: u16, type_: u8, s: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers at entry, on top of what KVM reports for a fresh vCPU.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(USER_CODE_SELECTOR, 0xb, 1, 3, 1, 0);
    let data = segment(USER_DATA_SELECTOR, 0x3, 1, 3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (7 * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (IDT_SIZE - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state at entry: the power-on control words.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}
