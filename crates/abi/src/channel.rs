//! The message channel: a request ring and a response ring in guest memory, through
//! which the host delivers messages (client requests) to the guest and the guest answers.
//!
//! # Protocol
//!
//! 1. The guest lays out a region in its RAM (page aligned, at or above
//!    [`IMAGE_BASE`](crate::IMAGE_BASE)): a [`ChannelHeader`] page, then
//!    `request_slots` slots of `request_slot_size` bytes, then `response_slots` slots of
//!    `response_slot_size` bytes. It fills in the header's geometry and writes the
//!    region's page number (address >> 12) to [`port::CHANNEL_SETUP`](crate::port::CHANNEL_SETUP).
//!    The VMM checks the geometry, copies it (later changes by the guest are ignored) and
//!    writes [`ChannelHeader::status`].
//! 2. A slot holds a [`MessageHeader`] and `len` payload bytes.
//! 3. The guest writes [`port::CHANNEL_KICK`](crate::port::CHANNEL_KICK) with a wait in
//!    microseconds. Before the `out` returns, the VMM takes the responses between
//!    `response_tail` and `response_head`, and writes queued requests into free request
//!    slots, advancing `request_head`; if it had nothing to deliver it first waits up to
//!    the given time (at most about a millisecond) for a request.
//! 4. The guest takes requests between `request_tail` and `request_head`, advancing
//!    `request_tail`; it writes responses at `response_head`, advancing it.
//!
//! The VMM keeps its own copy of the indices it writes (`request_head`, `response_tail`)
//! and rewrites them at every kick: a guest that changes them changes nothing. A
//! guest-written index that moves backwards or past what the other side allows is
//! ignored, and [`status::INVALID_INDEX`] is written to `status`.
//!
//! Messages open and close *streams*: a request carrying [`flags::OPEN`] opens the
//! stream named by its `stream`; responses to it form that stream's events until one
//! carries [`flags::FINAL`]. Responses to a stream that is not open are dropped. What a
//! message's `kind` and payload mean is the business of the two ends (for a language
//! model server: `ferry_llm::serve`). When the host lets go of a stream whose guest may
//! still be answering (one still open, or one that overflowed: its reader gave up, or
//! its place went to a new stream) without having passed on a control message for it,
//! it delivers a request of kind 0 without payload carrying [`flags::RELEASED`]: nobody
//! reads that stream's responses any more, so the guest may stop working on it.

/// [`ChannelHeader::magic`]: "FCHN".
pub const CHANNEL_MAGIC: u32 = u32::from_le_bytes(*b"FCHN");
/// Version of this protocol, in [`ChannelHeader::version`].
pub const CHANNEL_VERSION: u32 = 1;
/// Most slots in either ring.
pub const MAX_SLOTS: u32 = 256;
/// Smallest slot.
pub const MIN_SLOT_SIZE: u32 = 256;
/// Largest slot (so the largest message is this less the [`MessageHeader`]).
pub const MAX_SLOT_SIZE: u32 = 32 << 10;
/// Bytes of the [`MessageHeader`] at the start of every slot.
pub const MESSAGE_HEADER_SIZE: u32 = core::mem::size_of::<MessageHeader>() as u32;
/// Longest a kick waits for a request, in microseconds (longer asks are cut to this), so
/// a pause request is answered promptly.
pub const MAX_KICK_WAIT_US: u32 = 1000;

/// The header at the start of the channel region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ChannelHeader {
    /// [`CHANNEL_MAGIC`] (written by the guest).
    pub magic: u32,
    /// [`CHANNEL_VERSION`] (written by the guest).
    pub version: u32,
    /// Slots in the request ring (guest; 1..=[`MAX_SLOTS`]).
    pub request_slots: u32,
    /// Bytes of a request slot (guest; a multiple of 8 in
    /// [`MIN_SLOT_SIZE`]..=[`MAX_SLOT_SIZE`]).
    pub request_slot_size: u32,
    /// Slots in the response ring (guest).
    pub response_slots: u32,
    /// Bytes of a response slot (guest).
    pub response_slot_size: u32,
    /// A [`status`] code (written by the VMM).
    pub status: u32,
    /// Zero.
    pub reserved: u32,
    /// Requests written so far (VMM).
    pub request_head: u64,
    /// Requests taken so far (guest).
    pub request_tail: u64,
    /// Responses written so far (guest).
    pub response_head: u64,
    /// Responses taken so far (VMM).
    pub response_tail: u64,
    /// Requests queued in the VMM beyond those in the ring (VMM).
    pub pending: u64,
}

const _: () = assert!(core::mem::size_of::<ChannelHeader>() <= crate::PAGE_SIZE as usize);

/// The header of one message, at the start of its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageHeader {
    /// What the message is (up to the two ends).
    pub kind: u32,
    /// [`flags`].
    pub flags: u32,
    /// The stream it belongs to.
    pub stream: u64,
    /// Payload bytes after this header (at most the slot size less this header).
    pub len: u32,
    /// Zero.
    pub reserved: u32,
}

/// [`MessageHeader::flags`].
pub mod flags {
    /// A request that opens its stream.
    pub const OPEN: u32 = 1;
    /// The last response of its stream.
    pub const FINAL: u32 = 2;
    /// The host's notice that it let go of this stream while its guest may still be
    /// answering (open, or overflowed): its later responses are dropped (kind 0, no
    /// payload; not a client's message).
    pub const RELEASED: u32 = 4;
}

/// [`ChannelHeader::status`] codes.
pub mod status {
    /// Not set up yet.
    pub const UNCONFIGURED: u32 = 0;
    /// Set up; every index the guest wrote so far was valid.
    pub const OK: u32 = 1;
    /// The magic or version is wrong.
    pub const BAD_VERSION: u32 = 2;
    /// A slot count or size is out of range.
    pub const BAD_GEOMETRY: u32 = 3;
    /// The region is not guest RAM the guest may use.
    pub const BAD_GUEST_RANGE: u32 = 4;
    /// A guest-written index moved backwards or too far, and was ignored.
    pub const INVALID_INDEX: u32 = 5;
    /// A response's `len` did not fit its slot; it was dropped.
    pub const BAD_MESSAGE: u32 = 6;
    /// The channel was already set up (it is set up once per VM life).
    pub const ALREADY_SET_UP: u32 = 7;
}

impl ChannelHeader {
    /// Bytes of the whole region this header describes (header page and both rings), or
    /// `None` if its geometry is out of range.
    pub fn region_size(&self) -> Option<u64> {
        let ring = |slots: u32, size: u32| {
            ((1..=MAX_SLOTS).contains(&slots)
                && (MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&size)
                && size.is_multiple_of(8))
            .then(|| u64::from(slots) * u64::from(size))
        };
        let requests = ring(self.request_slots, self.request_slot_size)?;
        let responses = ring(self.response_slots, self.response_slot_size)?;
        Some(crate::PAGE_SIZE + requests + responses)
    }

    /// Offset in the region of request slot `index` (taken modulo the slot count).
    pub fn request_slot(&self, index: u64) -> u64 {
        crate::PAGE_SIZE
            + (index % u64::from(self.request_slots.max(1))) * u64::from(self.request_slot_size)
    }

    /// Offset in the region of response slot `index` (taken modulo the slot count).
    pub fn response_slot(&self, index: u64) -> u64 {
        crate::PAGE_SIZE
            + u64::from(self.request_slots) * u64::from(self.request_slot_size)
            + (index % u64::from(self.response_slots.max(1))) * u64::from(self.response_slot_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(slots: u32, size: u32) -> ChannelHeader {
        ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            request_slots: slots,
            request_slot_size: size,
            response_slots: 2 * slots,
            response_slot_size: 512,
            ..ChannelHeader::default()
        }
    }

    #[test]
    fn geometry_in_range_gives_the_region_and_slot_offsets() {
        let h = header(4, 1024);
        assert_eq!(h.region_size(), Some(4096 + 4 * 1024 + 8 * 512));
        assert_eq!(h.request_slot(5), 4096 + 1024);
        assert_eq!(h.response_slot(9), 4096 + 4 * 1024 + 512);
    }

    #[test]
    fn geometry_out_of_range_is_refused() {
        assert_eq!(header(0, 1024).region_size(), None);
        assert_eq!(header(MAX_SLOTS + 1, 1024).region_size(), None);
        assert_eq!(header(4, MIN_SLOT_SIZE - 8).region_size(), None);
        assert_eq!(header(4, MAX_SLOT_SIZE + 8).region_size(), None);
        assert_eq!(header(4, 1020).region_size(), None);
    }
}
