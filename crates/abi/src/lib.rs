//! The contract between a Ferry guest and the host.
//!
//! Both sides compile this one crate (the VMM and devices on the host, the SDK in the
//! guest), so the port numbers, the boot-info layout and the memory map can never drift.
//!
//! # Machine model seen by a guest
//!
//! - 64-bit long mode, ring 3, IOPL 3 (port I/O exits straight to the VMM), SSE enabled,
//!   interrupts disabled. Guest RAM is identity mapped (virtual = physical) up to
//!   `ram_size`. Page 0, the VMM's system pages below [`IMAGE_BASE`] (except the boot-info
//!   console buffer and attached-file pages) and everything at or above `ram_size` are not
//!   accessible: touching them faults.
//! - The guest image is a static ELF linked at [`IMAGE_BASE`]. Its entry point is called
//!   with `rdi` = [`BOOT_INFO_ADDR`] and `rsp` 8 bytes below a 16-byte boundary, exactly as
//!   if `call` had just pushed a return address (System V). It must never return.
//! - The guest talks to the host only through the ports in [`port`] and the boot-info page.
#![no_std]

/// Declares status codes and their `name` function together, so that every code has a
/// name for messages (an undeclared code is "unknown status").
macro_rules! status_codes {
    ($($(#[doc = $doc:literal])* $CODE:ident = $value:literal, $name:literal;)+) => {
        $(
            $(#[doc = $doc])*
            pub const $CODE: u32 = $value;
        )+

        /// Name of a status code, for messages.
        pub fn name(status: u32) -> &'static str {
            match status {
                $($CODE => $name,)+
                _ => "unknown status",
            }
        }
    };
}

pub mod accel;
pub mod channel;
pub mod file;

/// Version of this contract; the VMM writes it into [`BootInfo::abi_version`].
/// 2: attached files ([`mod@file`]). 3: the message channel ([`channel`]). 4: the
/// accelerator's ROPE takes frequency factors ([`accel::ACCEL_ABI_VERSION`] 2), and the
/// channel tells the guest of a stream let go of while open ([`channel::flags::RELEASED`]).
pub const ABI_VERSION: u32 = 4;

/// Size of a guest page, and the granularity of guest RAM dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Guest-physical (= guest-virtual) address where the ELF image must be linked.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Guest-physical address of the [`BootInfo`] page.
pub const BOOT_INFO_ADDR: u64 = 0x5000;

/// Guest-physical address of the console buffer page (user read/write).
pub const CONSOLE_BUFFER_ADDR: u64 = 0x9000;

/// Bytes of the console buffer page.
pub const CONSOLE_BUFFER_SIZE: usize = PAGE_SIZE as usize;

/// Bytes of guest RAM reserved for the guest's stack, at the top of RAM.
pub const STACK_SIZE: u64 = 2 << 20;

/// Value of [`BootInfo::magic`]: "FERRYBT1" little endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FERRYBT1");

/// I/O ports. Access widths are part of the contract; other widths are ignored on `out`
/// and read as all-ones on `in`.
pub mod port {
    /// Console output. 8-bit `out`: one byte. 32-bit `out` of `n` (at most
    /// [`CONSOLE_BUFFER_SIZE`](super::CONSOLE_BUFFER_SIZE)): the first `n` bytes of the
    /// console buffer page at [`CONSOLE_BUFFER_ADDR`](super::CONSOLE_BUFFER_ADDR), so a
    /// whole line costs one exit. (String I/O, `rep outsb`, faults in ring 3 on our KVM.)
    pub const CONSOLE: u16 = 0x0500;
    /// 32-bit `in`: latches the monotonic guest clock (ns since boot, paused time
    /// excluded) and returns its low half.
    pub const CLOCK_LO: u16 = 0x0504;
    /// 32-bit `in`: the high half of the value latched by the last [`CLOCK_LO`] read.
    pub const CLOCK_HI: u16 = 0x0508;
    /// 32-bit `out`: the guest ends with this exit code (0 = success).
    pub const EXIT: u16 = 0x0510;
    /// Reserved for the VMM's ring-0 fault stubs; a guest write here is treated as a
    /// fault report and stops the VM.
    pub const FAULT: u16 = 0x0518;
    /// 32-bit `out` (any value): new commands are in the accelerator ring.
    pub const ACCEL_DOORBELL: u16 = 0x0520;
    /// 32-bit `out` of 0: sleep until the accelerator has completed every submitted
    /// command or about a millisecond has passed, whichever is first; of any other value
    /// `T`: until then, until the ring's `tail` reaches `T` (its low 32 bits, compared as
    /// a ring: the tail past a fence, or room for more commands), or for about ten.
    pub const ACCEL_WAIT: u16 = 0x0524;
    /// 32-bit `out` (any value): execute the [`FileRequest`](crate::file::FileRequest) at
    /// [`FILE_REQUEST_ADDR`](crate::file::FILE_REQUEST_ADDR); its status is written before
    /// the `out` returns.
    pub const FILE_READ: u16 = 0x0528;
    /// 32-bit `out` of a page number: set up the [message channel](crate::channel) whose
    /// region starts at that page; the outcome is in its header's `status`.
    pub const CHANNEL_SETUP: u16 = 0x0530;
    /// 32-bit `out` of a wait in microseconds: exchange messages with the host through
    /// the [message channel](crate::channel), first waiting up to that long (at most
    /// [`MAX_KICK_WAIT_US`](crate::channel::MAX_KICK_WAIT_US)) if no request is queued.
    pub const CHANNEL_KICK: u16 = 0x0534;
}

/// Capacity of [`BootInfo::args`] in bytes.
pub const ARGS_CAPACITY: usize = 4096 - 64;

/// The boot-info page the VMM writes at [`BOOT_INFO_ADDR`] before the guest starts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the VMM that wrote this page.
    pub abi_version: u32,
    /// Number of arguments in [`Self::args`].
    pub argc: u32,
    /// Bytes of guest RAM, starting at address 0.
    pub ram_size: u64,
    /// First byte of the heap (page aligned, after the loaded image).
    pub heap_start: u64,
    /// One past the last byte of the heap (the stack lies above it).
    pub heap_end: u64,
    /// Initial stack top (16-byte aligned); the stack grows down to `heap_end`.
    pub stack_top: u64,
    /// Guest-physical address of the accelerator command ring, 0 when the VM has none.
    pub accel_ring: u64,
    /// Bytes used in [`Self::args`].
    pub args_len: u32,
    /// Zero.
    pub reserved: u32,
    /// `argc` UTF-8 strings, each terminated by a NUL byte, back to back.
    pub args: [u8; ARGS_CAPACITY],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == PAGE_SIZE as usize);

impl BootInfo {
    /// An all-zero page, to be filled in by the VMM.
    pub const EMPTY: BootInfo = BootInfo {
        magic: 0,
        abi_version: 0,
        argc: 0,
        ram_size: 0,
        heap_start: 0,
        heap_end: 0,
        stack_top: 0,
        accel_ring: 0,
        args_len: 0,
        reserved: 0,
        args: [0; ARGS_CAPACITY],
    };

    /// The arguments, or `None` if `args_len`/`argc` are inconsistent.
    pub fn args(&self) -> Option<Args<'_>> {
        let len = self.args_len as usize;
        if len > ARGS_CAPACITY {
            return None;
        }
        let bytes = &self.args[..len];
        let nuls = bytes.iter().filter(|&&b| b == 0).count();
        if nuls != self.argc as usize || bytes.last().is_some_and(|&b| b != 0) {
            return None;
        }
        Some(Args { rest: bytes })
    }
}

/// Iterator over the NUL-terminated argument strings of a [`BootInfo`].
#[derive(Clone)]
pub struct Args<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let end = self.rest.iter().position(|&b| b == 0)?;
        let (arg, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        Some(arg)
    }
}

/// Encodes `args` into the [`BootInfo::args`] format; returns `(argc, args_len)`, or
/// `None` if they do not fit or one contains a NUL byte.
pub fn encode_args<'s, I>(args: I, out: &mut [u8; ARGS_CAPACITY]) -> Option<(u32, u32)>
where
    I: IntoIterator<Item = &'s str>,
{
    let mut len = 0usize;
    let mut argc = 0u32;
    for arg in args {
        let bytes = arg.as_bytes();
        if bytes.contains(&0) {
            return None;
        }
        let end = len.checked_add(bytes.len())?.checked_add(1)?;
        if end > ARGS_CAPACITY {
            return None;
        }
        out[len..end - 1].copy_from_slice(bytes);
        out[end - 1] = 0;
        len = end;
        argc += 1;
    }
    Some((argc, len as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_info() -> BootInfo {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION,
            ..BootInfo::EMPTY
        }
    }

    #[test]
    fn args_round_trip() {
        let mut info = boot_info();
        let (argc, len) = encode_args(["a", "", "--seed=3"], &mut info.args).unwrap();
        info.argc = argc;
        info.args_len = len;
        let got: [&[u8]; 3] = {
            let mut it = info.args().unwrap();
            [it.next().unwrap(), it.next().unwrap(), it.next().unwrap()]
        };
        assert_eq!(got, [&b"a"[..], b"", b"--seed=3"]);
        assert_eq!(info.args().unwrap().count(), 3);
    }

    #[test]
    fn args_that_do_not_fit_are_refused() {
        let mut out = [0u8; ARGS_CAPACITY];
        let long = [b'x'; ARGS_CAPACITY];
        let long = core::str::from_utf8(&long).unwrap();
        assert!(encode_args([long], &mut out).is_none());
        assert!(encode_args(["nul\0inside"], &mut out).is_none());
    }

    #[test]
    fn inconsistent_args_are_refused() {
        let mut info = boot_info();
        info.args[..2].copy_from_slice(b"a\0");
        info.args_len = 2;
        info.argc = 2; // claims two, holds one
        assert!(info.args().is_none());
        info.argc = 1;
        info.args_len = ARGS_CAPACITY as u32 + 1;
        assert!(info.args().is_none());
    }
}

/// The loops `ferry bench vm` runs both inside a guest (ring 3) and on the host, to
/// measure how fast guest code runs. They live here so both sides compile the same code.
pub mod calibration {
    /// An integer-compute loop (xorshift and multiply chains); returns a value that
    /// depends on every iteration so it cannot be optimised away.
    pub fn compute(iterations: u64) -> u64 {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut acc = 0u64;
        for i in 0..iterations {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            acc = acc.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(x ^ i);
        }
        acc
    }

    /// A memory-streaming loop: `passes` read-modify-write sweeps over `words`; returns a
    /// fold of the result.
    pub fn memory(words: &mut [u64], passes: u32) -> u64 {
        for pass in 0..u64::from(passes) {
            for (i, w) in words.iter_mut().enumerate() {
                *w = w
                    .wrapping_mul(0x5851_f42d_4c95_7f2d)
                    .wrapping_add(i as u64 ^ pass);
            }
        }
        words.iter().fold(0, |h, &w| h.rotate_left(5) ^ w)
    }
}
