//! Console output through [`ferry_abi::port::CONSOLE`].
//!
//! Every VM exit costs microseconds, so output is line buffered in the console buffer
//! page ([`CONSOLE_BUFFER_ADDR`]) and sent with one 32-bit `out` of the byte count (string
//! I/O such as `rep outsb` faults in ring 3 on our KVM): one exit per line, or per page
//! for long lines, or at exit.

use core::arch::asm;
use core::cell::{Cell, UnsafeCell};
use core::fmt::{self, Write};
use ferry_abi::{port, CONSOLE_BUFFER_ADDR, CONSOLE_BUFFER_SIZE};

/// The console buffer page, mapped user read/write by the VMM.
const PAGE: *mut u8 = CONSOLE_BUFFER_ADDR as *mut u8;

/// Prints to the guest console (line buffered).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(::core::format_args!($($arg)*)) };
}

/// Prints to the guest console, with a newline (which flushes the buffer).
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(::core::format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

/// Bytes waiting in the console buffer page.
struct Buffer {
    len: usize,
}

impl Buffer {
    /// Has the host print the first `len` bytes of the page.
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: a 32-bit `out` to the console port. Without `nomem` the compiler
        // treats it as reading memory, so the buffered bytes are stored before the host
        // reads the page.
        unsafe {
            asm!("out dx, eax", in("dx") port::CONSOLE, in("eax") self.len as u32,
                 options(nostack, preserves_flags));
        }
        self.len = 0;
    }
}

impl Write for Buffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            let n = rest.len().min(CONSOLE_BUFFER_SIZE - self.len);
            // SAFETY: `len + n <= CONSOLE_BUFFER_SIZE`, so this stays inside the page the
            // ABI maps for us; only the `busy`-guarded buffer writes it.
            unsafe { core::ptr::copy_nonoverlapping(rest.as_ptr(), PAGE.add(self.len), n) };
            self.len += n;
            rest = &rest[n..];
            if self.len == CONSOLE_BUFFER_SIZE {
                self.flush();
            }
        }
        if s.as_bytes().contains(&b'\n') {
            self.flush();
        }
        Ok(())
    }
}

/// Writes byte by byte with 8-bit `out`s (an exit each), leaving the page alone; used
/// only when the buffer is already in use.
struct Unbuffered;

impl Write for Unbuffered {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &byte in s.as_bytes() {
            // SAFETY: an 8-bit `out` to the console port has no memory effects.
            unsafe {
                asm!("out dx, al", in("dx") port::CONSOLE, in("al") byte,
                     options(nomem, nostack, preserves_flags));
            }
        }
        Ok(())
    }
}

struct Console {
    busy: Cell<bool>,
    buffer: UnsafeCell<Buffer>,
}

// SAFETY: a guest has one vCPU and no interrupts, so there is no concurrent access;
// `busy` catches re-entry (a `Display` impl that prints, a panic while printing).
unsafe impl Sync for Console {}

static CONSOLE: Console = Console {
    busy: Cell::new(false),
    buffer: UnsafeCell::new(Buffer { len: 0 }),
};

/// Runs `f` on the buffer, or returns `None` if the buffer is already borrowed.
fn with_buffer<R>(f: impl FnOnce(&mut Buffer) -> R) -> Option<R> {
    if CONSOLE.busy.replace(true) {
        return None;
    }
    // SAFETY: `busy` was false, so no other reference to the buffer exists, and it
    // stays set until this one is dropped.
    let result = f(unsafe { &mut *CONSOLE.buffer.get() });
    CONSOLE.busy.set(false);
    Some(result)
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if with_buffer(|b| b.write_fmt(args)).is_none() {
        // Re-entered: write around the buffer rather than lose the text.
        let _ = Unbuffered.write_fmt(args);
    }
}

/// Sends any buffered output to the host now.
pub fn flush() {
    with_buffer(Buffer::flush);
}
