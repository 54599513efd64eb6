//! GDT, TSS, IDT and the ring-0 fault stubs.
//!
//! The guest never runs ring-0 code of its own: on this KVM ring 0 is emulated (slow), so
//! ring 0 exists only to catch faults. Each exception vector enters a stub that pushes the
//! vector (and a zero error code where the CPU pushes none), saves the general registers on
//! the ring-0 stack and writes to [`port::FAULT`]; the VMM then reads the frame from guest
//! memory (see [`FaultFrame`]) and stops the VM with a report.

use ferry_abi::port;

use super::layout::{FAULT_STUBS_ADDR, IDT_ADDR, RING0_STACK_TOP};

/// GDT selector of the 64-bit kernel code segment.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// GDT selector (with RPL 3) of the user data segment.
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// GDT selector (with RPL 3) of the 64-bit user code segment.
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// GDT selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x28;
/// Bytes of the 64-bit TSS proper.
const TSS_BASE_SIZE: u64 = 104;
/// Ports covered by the I/O permission bitmap (all allowed); higher ports fault.
const IO_BITMAP_PORTS: u64 = 0x1000;
/// Bytes of the TSS with its I/O bitmap and the bitmap's terminating 0xff byte (the
/// limit is this minus one).
pub const TSS_SIZE: u64 = TSS_BASE_SIZE + IO_BITMAP_PORTS / 8 + 1;
/// Exception vectors with a stub; higher vectors lie beyond the IDT limit and #GP.
pub const EXCEPTION_VECTORS: usize = 32;
/// Bytes of the IDT in use.
pub const IDT_SIZE: u64 = EXCEPTION_VECTORS as u64 * 16;

const STUB_STRIDE: u64 = 16;
const COMMON_HANDLER_ADDR: u64 = FAULT_STUBS_ADDR + EXCEPTION_VECTORS as u64 * STUB_STRIDE;

/// The GDT: null, kernel code/data, user data/code (64-bit), 16-byte TSS descriptor.
pub fn gdt(tss_addr: u64) -> [u64; 7] {
    let tss_limit = TSS_SIZE - 1;
    let tss_low = (tss_limit & 0xffff)
        | ((tss_addr & 0xff_ffff) << 16)
        | (0x8b << 40) // present, DPL 0, type 0xB: busy 64-bit TSS
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((tss_addr >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code: present, DPL 0, exec/read, L=1
        0x00cf_9200_0000_ffff, // 0x10 kernel data: present, DPL 0, read/write
        0x00cf_f200_0000_ffff, // 0x18 user data: present, DPL 3, read/write
        0x00af_fa00_0000_ffff, // 0x20 user code: present, DPL 3, exec/read, L=1
        tss_low,               // 0x28 TSS, low half
        tss_addr >> 32,        //      TSS, high half
    ]
}

/// The 64-bit TSS: RSP0 (the stack faults from ring 3 switch to) and an I/O permission
/// bitmap allowing the low ports to ring 3. The bitmap matters on the nested PVM KVM we
/// run on, which drops RFLAGS.IOPL in user mode (measured: `out` with IOPL 3 and no
/// bitmap raises #GP there); with VT-x/AMD-V, IOPL 3 alone would do.
pub fn tss() -> [u8; TSS_SIZE as usize] {
    let mut tss = [0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&RING0_STACK_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&(TSS_BASE_SIZE as u16).to_le_bytes());
    tss[TSS_SIZE as usize - 1] = 0xff;
    tss
}

/// The IDT: one DPL-0 interrupt gate per exception vector, each to its stub.
pub fn idt() -> Vec<u8> {
    let mut idt = Vec::with_capacity(IDT_SIZE as usize);
    for vector in 0..EXCEPTION_VECTORS as u64 {
        let handler = FAULT_STUBS_ADDR + vector * STUB_STRIDE;
        let low = (handler & 0xffff)
            | ((KERNEL_CODE_SELECTOR as u64) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate, IST 0
            | (((handler >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    debug_assert_eq!(IDT_ADDR % 8, 0);
    idt
}

/// Whether the CPU pushes an error code for `vector`.
fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Machine code of the stubs, to be placed at [`FAULT_STUBS_ADDR`].
pub fn fault_stubs() -> Vec<u8> {
    assemble_stubs().0
}

/// Where each instruction of [`fault_stubs`] starts: the only places ring 0 may be
/// (a saved state whose ring 0 is elsewhere runs code no VMM wrote).
pub fn fault_stub_instructions() -> Vec<u64> {
    assemble_stubs()
        .1
        .into_iter()
        .map(|at| FAULT_STUBS_ADDR + at as u64)
        .collect()
}

/// The stubs' code, and the offset of each instruction in it.
fn assemble_stubs() -> (Vec<u8>, Vec<usize>) {
    let mut code = vec![0xcc; (COMMON_HANDLER_ADDR - FAULT_STUBS_ADDR) as usize];
    let mut starts = Vec::new();
    for vector in 0..EXCEPTION_VECTORS as u64 {
        let start = (vector * STUB_STRIDE) as usize;
        let mut stub = Vec::with_capacity(STUB_STRIDE as usize);
        let mut emit = |stub: &mut Vec<u8>, bytes: &[u8]| {
            starts.push(start + stub.len());
            stub.extend_from_slice(bytes);
        };
        if !has_error_code(vector) {
            emit(&mut stub, &[0x6a, 0x00]); // push 0
        }
        emit(&mut stub, &[0x6a, vector as u8]); // push vector
        let next_ip = FAULT_STUBS_ADDR + start as u64 + stub.len() as u64 + 5;
        let rel = (COMMON_HANDLER_ADDR as i64 - next_ip as i64) as i32;
        let mut jmp = vec![0xe9]; // jmp rel32 common
        jmp.extend_from_slice(&rel.to_le_bytes());
        emit(&mut stub, &jmp);
        code[start..start + stub.len()].copy_from_slice(&stub);
    }
    let mut emit = |bytes: &[u8]| {
        starts.push(code.len());
        code.extend_from_slice(bytes);
    };
    // common: push rax, rcx, rdx, rbx, rbp, rsi, rdi, r8..r15 (the order FaultFrame reads)
    for r in [0x50, 0x51, 0x52, 0x53, 0x55, 0x56, 0x57] {
        emit(&[r]);
    }
    for r in 0x50..=0x57 {
        emit(&[0x41, r]);
    }
    let [lo, hi] = port::FAULT.to_le_bytes();
    emit(&[0x66, 0xba, lo, hi]); // mov dx, FAULT
    emit(&[0xee]); // out dx, al
    emit(&[0xf4]); // 1: hlt
    emit(&[0xeb, 0xfd]); // jmp 1b (never resumed)
    (code, starts)
}

/// Mnemonic and name of an exception vector.
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "reserved vector",
    }
}

/// Number of u64 words the common handler leaves on the ring-0 stack.
pub const FAULT_FRAME_WORDS: usize = 22;

/// What a fault stub saved: general registers, then the CPU's interrupt frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultFrame {
    /// r15, r14, ..., r8, rdi, rsi, rbp, rbx, rdx, rcx, rax (stack order).
    pub gprs: [u64; 15],
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code segment at the fault (RPL 3 for the guest workload).
    pub cs: u64,
    /// Flags at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
}

impl FaultFrame {
    /// Decodes the words at the ring-0 stack pointer after the stub's pushes.
    pub fn from_words(w: &[u64; FAULT_FRAME_WORDS]) -> Self {
        let mut gprs = [0; 15];
        gprs.copy_from_slice(&w[..15]);
        Self {
            gprs,
            vector: w[15],
            error_code: w[16],
            rip: w[17],
            cs: w[18],
            rflags: w[19],
            rsp: w[20],
        }
    }

    /// Registers by name, in the conventional order.
    pub fn named_gprs(&self) -> [(&'static str, u64); 15] {
        let g = &self.gprs;
        [
            ("rax", g[14]),
            ("rbx", g[11]),
            ("rcx", g[13]),
            ("rdx", g[12]),
            ("rsi", g[9]),
            ("rdi", g[8]),
            ("rbp", g[10]),
            ("r8", g[7]),
            ("r9", g[6]),
            ("r10", g[5]),
            ("r11", g[4]),
            ("r12", g[3]),
            ("r13", g[2]),
            ("r14", g[1]),
            ("r15", g[0]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_fit_their_slots_and_jump_to_common() {
        let code = fault_stubs();
        for vector in 0..EXCEPTION_VECTORS as u64 {
            let at = (vector * STUB_STRIDE) as usize;
            let slot = &code[at..at + STUB_STRIDE as usize];
            let jmp = slot.iter().position(|&b| b == 0xe9).unwrap();
            let rel = i32::from_le_bytes(slot[jmp + 1..jmp + 5].try_into().unwrap());
            let target = FAULT_STUBS_ADDR as i64 + at as i64 + jmp as i64 + 5 + rel as i64;
            assert_eq!(target as u64, COMMON_HANDLER_ADDR, "vector {vector}");
            assert_eq!(slot[jmp - 1], vector as u8);
        }
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let g = gdt(0x3000);
        assert_eq!(g[5] & 0xffff, TSS_SIZE - 1);
        assert_eq!((g[5] >> 16) & 0xff_ffff, 0x3000);
        assert_eq!((g[5] >> 40) & 0xff, 0x8b);
    }
}
