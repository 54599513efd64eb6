//! Test guest for the message channel's defences: sets up a channel, then for ever
//! writes garbage over its header and slots (indices far ahead, behind and wrapped,
//! lengths beyond the slots, responses to streams never opened, its own FINAL flags on
//! random streams) and kicks with random waits, taking requests only now and then.
//!
//! Prints `channel-abuse: set up` once the channel is set up, then `round <n>
//! status=<s>` every 1,000 kicks with the status the host last wrote.
#![no_std]
#![no_main]

extern crate alloc;

use core::mem::offset_of;

use ferry_sdk::abi::channel::{
    status, ChannelHeader, MessageHeader, CHANNEL_MAGIC, CHANNEL_VERSION, MESSAGE_HEADER_SIZE,
};
use ferry_sdk::abi::{port, PAGE_SIZE};
use ferry_sdk::prelude::*;

ferry_sdk::entry!(main);

const REQUEST_SLOTS: u32 = 4;
const RESPONSE_SLOTS: u32 = 8;
const SLOT: u32 = 1024;

fn out(port: u16, value: u32) {
    // SAFETY: port I/O exits to the VMM, which validates what it reads of our memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value,
                         options(nostack, preserves_flags));
    }
}

/// xorshift64: garbage that differs every time.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main(_args: Args) -> i32 {
    let header = ChannelHeader {
        magic: CHANNEL_MAGIC,
        version: CHANNEL_VERSION,
        request_slots: REQUEST_SLOTS,
        request_slot_size: SLOT,
        response_slots: RESPONSE_SLOTS,
        response_slot_size: SLOT,
        ..ChannelHeader::default()
    };
    let size = header.region_size().expect("a valid geometry") as usize;
    let layout = core::alloc::Layout::from_size_align(size, PAGE_SIZE as usize).expect("layout");
    // SAFETY: a non-zero size; the region is never freed.
    let base = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!base.is_null(), "no memory for the channel");
    let u64_at = |offset: usize| base.wrapping_add(offset).cast::<u64>();
    // SAFETY: the header page is ours.
    unsafe { base.cast::<ChannelHeader>().write_volatile(header) };
    out(port::CHANNEL_SETUP, (base as u64 / PAGE_SIZE) as u32);
    // SAFETY: as above.
    let code = unsafe { (&raw const (*base.cast::<ChannelHeader>()).status).read_volatile() };
    if code != status::OK {
        println!("channel-abuse: setup refused with status {code}");
        return 1;
    }
    println!("channel-abuse: set up");
    let mut g = Garbage(0x9e37_79b9_7f4a_7c15);
    let mut round = 0u64;
    loop {
        let r = g.next();
        // SAFETY: every write below lands inside the region we own (offsets are taken
        // modulo its size, and aligned for u64 writes); only the host is lied to.
        unsafe {
            match r % 8 {
                // Indices: far ahead, behind, random.
                0 => u64_at(offset_of!(ChannelHeader, response_head)).write_volatile(g.next()),
                1 => u64_at(offset_of!(ChannelHeader, request_tail)).write_volatile(g.next()),
                2 => u64_at(offset_of!(ChannelHeader, request_head)).write_volatile(g.next()),
                // A plausible response head, over slots full of garbage.
                3 | 4 => {
                    let tail = u64_at(offset_of!(ChannelHeader, response_tail)).read_volatile();
                    let head = tail + g.next() % (u64::from(RESPONSE_SLOTS) + 2);
                    for i in tail..head {
                        let slot = base.add(header.response_slot(i) as usize);
                        let m = MessageHeader {
                            kind: g.next() as u32,
                            flags: g.next() as u32,
                            stream: g.next() % 4,
                            len: (g.next() % u64::from(2 * SLOT)) as u32,
                            reserved: 0,
                        };
                        slot.cast::<MessageHeader>().write_volatile(m);
                        let words = (SLOT - MESSAGE_HEADER_SIZE) as usize / 8;
                        let payload = slot.add(MESSAGE_HEADER_SIZE as usize).cast::<u64>();
                        for w in 0..words.min(8) {
                            payload.add(w).write_volatile(g.next());
                        }
                    }
                    u64_at(offset_of!(ChannelHeader, response_head)).write_volatile(head);
                }
                // Take what was delivered, sometimes.
                5 => {
                    let head = u64_at(offset_of!(ChannelHeader, request_head)).read_volatile();
                    u64_at(offset_of!(ChannelHeader, request_tail)).write_volatile(head);
                }
                // Garbage over the geometry (the host kept its own copy).
                6 => base
                    .cast::<u32>()
                    .add(2 + (g.next() % 4) as usize)
                    .write_volatile(g.next() as u32),
                _ => {}
            }
        }
        out(port::CHANNEL_KICK, (g.next() % 5000) as u32);
        round += 1;
        if round % 1000 == 0 {
            // SAFETY: as above.
            let s = unsafe { (&raw const (*base.cast::<ChannelHeader>()).status).read_volatile() };
            println!("round {round} status={s}");
        }
    }
}
