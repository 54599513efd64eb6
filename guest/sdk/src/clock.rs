//! The monotonic guest clock.

use core::arch::asm;
use ferry_abi::port;

/// Nanoseconds since the guest booted, paused time excluded (never goes backwards).
pub fn now_ns() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: port reads have no memory effects; the VMM owns these ports and the
    // ABI defines them as 32-bit `in`. No `nomem`: the read also orders memory
    // accesses around it, which keeps timed regions honest.
    unsafe {
        asm!("in eax, dx", out("eax") lo, in("dx") port::CLOCK_LO, options(nostack, preserves_flags));
        asm!("in eax, dx", out("eax") hi, in("dx") port::CLOCK_HI, options(nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}
