//! Test guest that fails on purpose; the first argument picks how.
#![no_std]
#![no_main]

use core::arch::asm;
use ferry_sdk::prelude::*;
use ferry_sdk::EXIT_USAGE;

ferry_sdk::entry!(main);

/// Canonical, but far above any RAM a Ferry VM maps: reading it page faults.
const UNMAPPED: u64 = 0x40_0000_0000;

const USAGE: &str = "usage: faults unmapped|null|invalid-opcode|divide-by-zero|panic";

fn main(args: Args) -> i32 {
    let how = args.get(0).unwrap_or("");
    println!("faults: {how}");
    match how {
        "unmapped" => read(UNMAPPED),
        "null" => read(0),
        // SAFETY: `ud2` raises #UD; that fault is the point of this guest.
        "invalid-opcode" => unsafe { asm!("ud2", options(nomem, nostack)) },
        "divide-by-zero" => divide_by_zero(),
        "panic" => panic!("deliberate panic from the faults guest"),
        _ => {
            println!("{USAGE}");
            return EXIT_USAGE;
        }
    }
    println!("faults: {how} did not fault");
    1
}

/// Loads a u64 from `addr` in asm, so that no null or UB check gets in the way.
fn read(addr: u64) {
    let value: u64;
    // SAFETY: the address is unmapped and the load faults, which is the point; a
    // plain load writes nothing, so even if it succeeded no memory would change.
    unsafe {
        asm!("mov {0}, qword ptr [{1}]", out(reg) value, in(reg) addr,
             options(nostack, readonly, preserves_flags));
    }
    println!("read {value:#x} from {addr:#x}");
}

/// Executes `div` by zero (#DE); Rust's `/` would check for zero and panic instead.
fn divide_by_zero() {
    let zero = core::hint::black_box(0u64);
    // SAFETY: `div` only touches rax/rdx; dividing by zero raises #DE, which is the point.
    unsafe {
        asm!("div {0}", in(reg) zero, inout("rax") 1u64 => _, inout("rdx") 0u64 => _,
             options(nomem, nostack));
    }
}
