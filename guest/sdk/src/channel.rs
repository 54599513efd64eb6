//! The VM's message channel ([`ferry_abi::channel`]): requests from the host, responses
//! back, through two rings in this guest's memory.
//!
//! ```ignore
//! let mut ch = ferry_sdk::channel::Channel::open(Geometry::default())?;
//! loop {
//!     ch.kick(1000); // waits up to 1 ms for a request
//!     while let Some(req) = ch.receive() {
//!         if req.opens {
//!             ch.send(req.stream, 16, true, b"answer")?;
//!         }
//!     }
//! }
//! ```

use crate::abi::channel::flags;
use crate::abi::channel::{
    status, ChannelHeader, MessageHeader, CHANNEL_MAGIC, CHANNEL_VERSION, MESSAGE_HEADER_SIZE,
};
use crate::abi::{port, PAGE_SIZE};
use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt;
use core::mem::offset_of;

/// Slot counts and sizes of the two rings.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Request slots.
    pub request_slots: u32,
    /// Bytes of a request slot (the largest request is this less the message header).
    pub request_slot_size: u32,
    /// Response slots.
    pub response_slots: u32,
    /// Bytes of a response slot.
    pub response_slot_size: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            request_slots: 16,
            request_slot_size: 32 << 10,
            response_slots: 256,
            response_slot_size: 512,
        }
    }
}

/// Why the channel could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// The host refused the setup with this [`status`] code.
    Refused(u32),
    /// No memory for the rings.
    OutOfMemory,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Refused(code) => {
                write!(f, "the host refused the message channel (status {code})")
            }
            ChannelError::OutOfMemory => f.write_str("no memory for the message channel"),
        }
    }
}

/// A response longer than a response slot takes ([`Channel::max_response`]): refused
/// whole, since a payload cut short would not decode on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// Bytes of the payload.
    pub len: usize,
    /// Most bytes a response takes.
    pub max: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a response of {} bytes does not fit the channel's response slots ({} bytes)",
            self.len, self.max
        )
    }
}

/// A request taken from the ring.
#[derive(Clone, Debug)]
pub struct Request {
    /// Its kind.
    pub kind: u32,
    /// Its stream.
    pub stream: u64,
    /// Whether it opens the stream.
    pub opens: bool,
    /// Whether it is the host's notice that nobody reads the stream any more
    /// ([`flags::RELEASED`]): its responses are dropped, its work may stop.
    pub released: bool,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// The set-up channel. The rings live for the rest of the guest's life.
pub struct Channel {
    base: *mut u8,
    geometry: ChannelHeader,
}

fn out(port: u16, value: u32) {
    // SAFETY: port I/O exits to the VMM, which reads and writes only the channel region
    // the guest set up; without `nomem` the compiler assumes memory changed across it.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

impl Channel {
    /// Allocates the rings and sets the channel up with the host.
    pub fn open(g: Geometry) -> Result<Channel, ChannelError> {
        let mut header = ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            request_slots: g.request_slots,
            request_slot_size: g.request_slot_size,
            response_slots: g.response_slots,
            response_slot_size: g.response_slot_size,
            ..ChannelHeader::default()
        };
        let size = header
            .region_size()
            .ok_or(ChannelError::Refused(status::BAD_GEOMETRY))?;
        let layout = Layout::from_size_align(size as usize, PAGE_SIZE as usize)
            .map_err(|_| ChannelError::OutOfMemory)?;
        // SAFETY: the layout has a non-zero size; the region is never freed.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            return Err(ChannelError::OutOfMemory);
        }
        let ch = Channel {
            base,
            geometry: header,
        };
        header.status = status::UNCONFIGURED;
        // SAFETY: the region starts with a page for the header, which we own.
        unsafe { ch.header().write_volatile(header) };
        out(port::CHANNEL_SETUP, (base as u64 / PAGE_SIZE) as u32);
        // SAFETY: as above.
        let code = unsafe { (&raw const (*ch.header()).status).read_volatile() };
        if code != status::OK {
            return Err(ChannelError::Refused(code));
        }
        Ok(ch)
    }

    fn header(&self) -> *mut ChannelHeader {
        self.base.cast()
    }

    /// The u64 header field at `offset` (an `offset_of!` of [`ChannelHeader`]).
    fn load(&self, offset: usize) -> u64 {
        // SAFETY: `offset` is that of an aligned u64 field of the header page we own.
        unsafe { self.base.add(offset).cast::<u64>().read_volatile() }
    }

    fn store(&self, offset: usize, value: u64) {
        // SAFETY: as in `load`.
        unsafe { self.base.add(offset).cast::<u64>().write_volatile(value) }
    }

    /// Exchanges messages with the host: it takes our responses and delivers requests,
    /// first waiting up to `wait_us` microseconds (at most about 1 ms) if it has none.
    pub fn kick(&self, wait_us: u32) {
        out(port::CHANNEL_KICK, wait_us);
    }

    /// Requests the host queued beyond those in the ring, as of the last kick.
    pub fn pending(&self) -> u64 {
        self.load(offset_of!(ChannelHeader, pending))
    }

    /// Takes the next request delivered into the ring, if any.
    pub fn receive(&mut self) -> Option<Request> {
        let head = self.load(offset_of!(ChannelHeader, request_head));
        let tail = self.load(offset_of!(ChannelHeader, request_tail));
        if tail >= head {
            return None;
        }
        // SAFETY: the slot lies inside our region; the host wrote it before the kick.
        let (m, payload) = unsafe {
            let slot = self.base.add(self.geometry.request_slot(tail) as usize);
            let m = slot.cast::<MessageHeader>().read_volatile();
            let max = (self.geometry.request_slot_size - MESSAGE_HEADER_SIZE) as usize;
            let len = (m.len as usize).min(max);
            let data = core::slice::from_raw_parts(slot.add(MESSAGE_HEADER_SIZE as usize), len);
            (m, data.to_vec())
        };
        self.store(offset_of!(ChannelHeader, request_tail), tail + 1);
        Some(Request {
            kind: m.kind,
            stream: m.stream,
            opens: m.flags & flags::OPEN != 0,
            released: m.flags & flags::RELEASED != 0,
            payload,
        })
    }

    /// Largest payload of one response.
    pub fn max_response(&self) -> usize {
        (self.geometry.response_slot_size - MESSAGE_HEADER_SIZE) as usize
    }

    /// Writes one response; when the ring is full, kicks the host until there is room.
    /// A payload longer than [`Self::max_response`] is refused, not sent.
    pub fn send(
        &mut self,
        stream: u64,
        kind: u32,
        last: bool,
        payload: &[u8],
    ) -> Result<(), TooLarge> {
        let len = payload.len();
        if len > self.max_response() {
            return Err(TooLarge {
                len,
                max: self.max_response(),
            });
        }
        let slots = u64::from(self.geometry.response_slots);
        let mut head = self.load(offset_of!(ChannelHeader, response_head));
        while head.saturating_sub(self.load(offset_of!(ChannelHeader, response_tail))) >= slots {
            self.kick(0);
            head = self.load(offset_of!(ChannelHeader, response_head));
        }
        let m = MessageHeader {
            kind,
            flags: if last { flags::FINAL } else { 0 },
            stream,
            len: len as u32,
            reserved: 0,
        };
        // SAFETY: the slot lies inside our region, and the host has taken what was in it.
        unsafe {
            let slot = self.base.add(self.geometry.response_slot(head) as usize);
            slot.cast::<MessageHeader>().write_volatile(m);
            core::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                slot.add(MESSAGE_HEADER_SIZE as usize),
                len,
            );
        }
        self.store(offset_of!(ChannelHeader, response_head), head + 1);
        Ok(())
    }
}
