//! The memory functions the compiler emits calls to. A freestanding binary has no libc
//! to provide them.
//!
//! Copies and fills use `rep movsb`/`rep stosb` (fast on every CPU with ERMSB) in inline
//! asm: LLVM recognises plain copy/fill loops and would compile them into a call to
//! `memcpy`/`memset`, that is, into themselves.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`; the regions must not overlap.
///
/// # Safety
/// `src` must be valid for `n` reads and `dest` for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear per the System V ABI.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the regions may overlap.
///
/// # Safety
/// `src` must be valid for `n` reads and `dest` for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never reads a byte it
        // has already overwritten.
        // SAFETY: same contract as ours.
        return unsafe { memcpy(dest, src, n) };
    }
    // `dest` lies inside `src..src + n`: copy backwards, from the last byte down.
    // SAFETY: the caller guarantees both ranges, and `n > 0` here so `n - 1` is in
    // range; DF is set only for this instruction and cleared again, as the ABI wants.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// Fills `n` bytes at `dest` with the byte `c`.
///
/// # Safety
/// `dest` must be valid for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear per the System V ABI.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Compares `n` bytes; returns the difference of the first unequal pair, or 0.
///
/// # Safety
/// `a` and `b` must be valid for `n` reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees `n` readable bytes at each.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Returns 0 if the `n` bytes are equal, nonzero otherwise.
///
/// # Safety
/// `a` and `b` must be valid for `n` reads.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as ours.
    unsafe { memcmp(a, b, n) }
}
