//! Test guest for dirty-page tracking: dirties N pages, waits for the host to set a
//! flag, dirties N other pages, and prints every address it wrote (guest-physical,
//! since RAM is identity mapped).
//!
//! Output: `phase1 <addr>...`, `waiting flag=<addr>`, then, once the host has written
//! a nonzero u64 at the flag, `phase2 <addr>...`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, Layout};
use ferry_sdk::abi::PAGE_SIZE;
use ferry_sdk::prelude::*;
use ferry_sdk::EXIT_USAGE;

ferry_sdk::entry!(main);

const PAGE: usize = PAGE_SIZE as usize;

fn main(args: Args) -> i32 {
    let pages = match args
        .check(&["pages"], &[])
        .and_then(|()| args.parse_or("pages", 8usize))
    {
        Ok(n) => n,
        Err(e) => {
            println!("dirty-pages: error: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(layout) = pages
        .checked_mul(2 * PAGE)
        .and_then(|size| Layout::from_size_align(size + PAGE, PAGE).ok())
    else {
        println!("dirty-pages: error: --pages {pages} is too large");
        return EXIT_USAGE;
    };
    // Not alloc_zeroed: zeroing would dirty the phase-2 pages during phase 1.
    // SAFETY: the layout has a nonzero size.
    let base = unsafe { alloc(layout) };
    if base.is_null() {
        println!(
            "dirty-pages: error: cannot allocate {} pages",
            2 * pages + 1
        );
        return 1;
    }
    let page = |i: usize| base.wrapping_add(i * PAGE).cast::<u64>();
    let flag = page(2 * pages);
    // SAFETY: the flag page is part of the allocation; the host only ever sets it.
    unsafe { flag.write_volatile(0) };

    dirty("phase1", (0..pages).map(page));
    println!("waiting flag={:#x}", flag as usize);
    // SAFETY: as above; volatile, because the host changes it behind our back.
    while unsafe { flag.read_volatile() } == 0 {
        core::hint::spin_loop();
    }
    dirty("phase2", (pages..2 * pages).map(page));
    0
}

/// Writes one u64 to each page, then prints `label` and the page addresses. Prints
/// without allocating, so the heap gets no other writes.
fn dirty(label: &str, pages: impl Iterator<Item = *mut u64> + Clone) {
    for p in pages.clone() {
        // SAFETY: every page is inside the allocation and page aligned.
        unsafe { p.write_volatile(0xd1e7_0000_0000_0000 | p as u64) };
    }
    print!("{label}");
    for p in pages {
        print!(" {:#x}", p as usize);
    }
    println!();
}
