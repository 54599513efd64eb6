//! Test guest for attached files: lists them, reads each whole through the file port
//! and loads it into device memory, and prints FNV-1a checksums of both (the host
//! compares them with the files' own); then makes hostile requests and prints the status
//! each got.
//!
//! Output: `file <name> <size> read=<hex> device=<hex>` per file (device only with an
//! accelerator), then `hostile <what> <status>` lines, then `done`.
//!
//! With `--probe OFFSET,...` it reads only 16 bytes of the first file at each offset,
//! through the port and the device, and prints `probe <offset> <hex> <hex>`: for files of
//! many GiB (sparse ones in the tests).
#![no_std]
#![no_main]

use ferry_sdk::abi::file::{self, FileRequest, FILE_REQUEST_ADDR, MAX_READ};
use ferry_sdk::abi::port;
use ferry_sdk::accel::Accel;
use ferry_sdk::checksum::Fnv1a;
use ferry_sdk::files;
use ferry_sdk::prelude::*;

ferry_sdk::entry!(main);

/// A raw request, to send what the SDK never would.
fn raw(file: u32, offset: u64, addr: u64, len: u64) -> u32 {
    let page = FILE_REQUEST_ADDR as *mut FileRequest;
    // SAFETY: the request page is mapped user read/write at this fixed address; the `out`
    // has the VMM execute the request (it validates every field) and write the status.
    unsafe {
        page.write_volatile(FileRequest {
            file,
            status: file::status::PENDING,
            offset,
            addr,
            len,
        });
        core::arch::asm!("out dx, eax", in("dx") port::FILE_READ, in("eax") 0u32,
                         options(nostack, preserves_flags));
        (&raw const (*page).status).read_volatile()
    }
}

/// Reads 16 bytes at each offset of the first file, through the port and the device.
fn probe(offsets: &str) -> i32 {
    let Some(f) = files::list().next() else {
        println!("files: error: no file attached");
        return 1;
    };
    let mut acc = match Accel::open() {
        Ok(a) => a,
        Err(e) => {
            println!("files: error: {e}");
            return 1;
        }
    };
    let Ok(mut t) = acc.alloc::<u32>(1, 4) else {
        println!("files: error: no device memory");
        return 1;
    };
    for offset in offsets.split(',') {
        let Ok(offset) = offset.parse::<u64>() else {
            println!("files: error: bad offset {offset:?}");
            return ferry_sdk::EXIT_USAGE;
        };
        let mut port = [0u8; 16];
        if let Err(e) = f.read_at(offset, &mut port) {
            println!("files: error: {e}");
            return 1;
        }
        acc.load_file(&mut t, &f, offset);
        let mut words = [0u32; 4];
        if let Err(e) = acc.download(&t, &mut words) {
            println!("files: error: {e}");
            return 1;
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let device: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        println!("probe {offset} {} {}", hex(&port), hex(&device));
    }
    println!("done");
    0
}

fn main(args: Args) -> i32 {
    if let Ok(Some(offsets)) = args.value("probe") {
        return probe(offsets);
    }
    let mut accel = Accel::open().ok();
    for f in files::list() {
        let mut hash = Fnv1a::new();
        // Odd-sized pieces, so reads start and end off page boundaries.
        let mut buf = vec![0u8; 3 << 20 | 123];
        let mut at = 0;
        while at < f.size() {
            let n = (f.size() - at).min(buf.len() as u64) as usize;
            if let Err(e) = f.read_at(at, &mut buf[..n]) {
                println!("files: error: {e}");
                return 1;
            }
            hash.write(&buf[..n]);
            at += n as u64;
        }
        let device = match &mut accel {
            Some(acc) if f.size() > 0 => {
                let words = (f.size() as usize).div_ceil(4);
                let mut t = match acc.alloc::<u32>(1, words) {
                    Ok(t) => t,
                    Err(e) => {
                        println!("files: error: {e}");
                        return 1;
                    }
                };
                acc.load_file_at(&mut t, 0, &f, 0, f.size());
                let mut out = vec![0u32; words];
                if let Err(e) = acc.download(&t, &mut out) {
                    println!("files: error: device load of {}: {e}", f.name());
                    return 1;
                }
                acc.free(t);
                let bytes: Vec<u8> = out.iter().flat_map(|w| w.to_le_bytes()).collect();
                let mut dh = Fnv1a::new();
                dh.write(&bytes[..f.size() as usize]);
                dh.value()
            }
            _ => 0,
        };
        println!(
            "file {} {} read={:016x} device={:016x}",
            f.name(),
            f.size(),
            hash.value(),
            device
        );
    }
    let mut scratch = vec![0u8; 4096];
    let addr = scratch.as_mut_ptr() as u64;
    let count = files::list().count() as u32;
    let size = files::list().next().map_or(0, |f| f.size());
    for (what, status) in [
        ("no-such-file", raw(count, 0, addr, 1)),
        ("past-the-end", raw(0, size, addr, 1)),
        ("offset-overflow", raw(0, u64::MAX, addr, 2)),
        ("too-long", raw(0, 0, addr, MAX_READ + 1)),
        ("system-page", raw(0, 0, 0x1000, 1)),
        ("beyond-ram", raw(0, 0, u64::MAX - 8, 1)),
        ("in-bounds", raw(0, 0, addr, 1)),
    ] {
        println!("hostile {what} {}", file::status::name(status));
    }
    println!("done");
    0
}
