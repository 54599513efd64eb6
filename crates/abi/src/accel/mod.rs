//! The virtual accelerator's contract: command ring, commands, kernels, status codes.
//!
//! # Protocol
//!
//! The VMM places a ring at [`BootInfo::accel_ring`](crate::BootInfo::accel_ring) (0 when
//! the VM has no accelerator): one [`RingHeader`] page followed by [`RING_SLOTS`]
//! [`Command`] slots. The guest is the only producer, the device the only consumer.
//!
//! 1. The guest writes a command into slot `head % RING_SLOTS` with `status` =
//!    [`status::PENDING`], then stores `head + 1` into [`RingHeader::head`] and writes
//!    [`port::ACCEL_DOORBELL`](crate::port::ACCEL_DOORBELL).
//! 2. The device executes commands in order, asynchronously to the vCPU. For each it
//!    writes the slot's `status` (OK or an error) and then advances
//!    [`RingHeader::tail`]. A slot may be reused once `tail` has passed it.
//! 3. [`op::FENCE`] writes its value to [`RingHeader::completed_fence`] when every command
//!    before it has completed. A guest waits with [`port::ACCEL_WAIT`](crate::port::ACCEL_WAIT)
//!    (the vCPU sleeps in the VMM until the device is idle, for at most about a
//!    millisecond; or, given the `tail` it wants (the one past a fence, or room in the
//!    ring), until `tail` gets there, for at most about ten) and re-reads the fence.
//!
//! A command with a bad id, range, shape or argument completes with an error status and
//! changes nothing; later commands still run. A header whose `head` is behind `tail` or
//! more than [`RING_SLOTS`] ahead of it sets [`RingHeader::device_status`] to
//! [`device_status::RING_INVALID`]; the device then ignores the ring until `head` is sane.
//!
//! The device re-reads `head` after every command, with a full fence between publishing
//! one command's `tail` and that read, so one doorbell may cover several submissions; a
//! guest must ring after its last submission, since an idle device only looks at the ring
//! when rung. It need not ring where, after storing `head` and a full fence, it reads a
//! `tail` short of the `head` it had published before, that one sane (see below): the
//! device has yet to complete that command, and reads the new `head` after it (the SDK
//! rings only then: a doorbell is a VM exit, tens of microseconds on nested
//! virtualization).
//!
//! Argument rules every kernel applies (violations complete with [`status::BAD_ARGUMENT`]):
//! an output buffer may not also be an input unless the kernel says "in place"; f32
//! scalars must be finite with the high 32 bits of their argument zero; `eps > 0`, Adam's
//! betas in `[0, 1)` and `step >= 1`, RNG `scale >= 0`. Ids found in data (embedding ids
//! `>= vocab`, labels `>= cols`) are checked before anything is written. Capacity counts
//! exactly the bytes requested by ALLOC.
//!
//! Device memory is a set of buffers the guest names by id (1..=[`MAX_BUFFERS`]), each
//! holding little-endian f32 (or u32 for ids and labels) elements. Kernels read and write
//! whole buffers by element counts given in their arguments, checked against buffer sizes.

pub mod dtype;

/// Version of the accelerator protocol, in [`RingHeader::version`]. 2: ROPE takes a
/// buffer of frequency factors after `x`. A change here bumps [`crate::ABI_VERSION`]
/// too: snapshots and migrations compare that one (a guest's ring outlives a move).
pub const ACCEL_ABI_VERSION: u32 = 2;
/// [`RingHeader::magic`]: "FRNG".
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"FRNG");
/// Command slots in the ring.
pub const RING_SLOTS: u64 = 256;
/// Bytes of one [`Command`].
pub const COMMAND_SIZE: u64 = 128;
/// Bytes of the ring region: the header page, then the slots.
pub const RING_REGION_SIZE: u64 = crate::PAGE_SIZE + RING_SLOTS * COMMAND_SIZE;
/// Highest buffer id.
pub const MAX_BUFFERS: u64 = 4096;
/// Arguments in a command.
pub const COMMAND_ARGS: usize = 15;

/// The ring header, at the start of the ring region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RingHeader {
    /// [`RING_MAGIC`] (written by the VMM).
    pub magic: u32,
    /// [`ACCEL_ABI_VERSION`] (written by the VMM).
    pub version: u32,
    /// [`RING_SLOTS`] (written by the VMM).
    pub slots: u32,
    /// [`device_status`] code (written by the device).
    pub device_status: u32,
    /// Commands submitted so far (written by the guest; only ever increases).
    pub head: u64,
    /// Commands completed so far (written by the device).
    pub tail: u64,
    /// Value of the last completed [`op::FENCE`] (written by the device).
    pub completed_fence: u64,
    /// Device memory capacity in bytes, the VM's profile (written by the VMM).
    pub capacity: u64,
    /// Device memory allocated now, in bytes (written by the device).
    pub used: u64,
}

/// One command slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Command {
    /// An [`op`] code.
    pub opcode: u32,
    /// [`status::PENDING`] when submitted; the device writes the outcome.
    pub status: u32,
    /// Opcode-specific arguments (see [`op`] and [`kernel`]).
    pub args: [u64; COMMAND_ARGS],
}

const _: () = assert!(core::mem::size_of::<Command>() as u64 == COMMAND_SIZE);
const _: () = assert!(core::mem::size_of::<RingHeader>() <= crate::PAGE_SIZE as usize);

/// Command opcodes and their arguments.
pub mod op {
    /// `[id, bytes]`: create buffer `id` of `bytes` (a multiple of 4), zero-filled.
    pub const ALLOC: u32 = 1;
    /// `[id]`: release buffer `id`.
    pub const FREE: u32 = 2;
    /// `[id, offset, guest_addr, len]`: copy guest RAM into buffer bytes `offset..+len`.
    pub const UPLOAD: u32 = 3;
    /// `[id, offset, guest_addr, len]`: copy buffer bytes `offset..+len` into guest RAM.
    pub const DOWNLOAD: u32 = 4;
    /// `[kernel, kernel args...]`: run a [`kernel`](super::kernel).
    pub const LAUNCH: u32 = 5;
    /// `[value]`: once all earlier commands completed, write `value` to `completed_fence`.
    pub const FENCE: u32 = 6;
    /// `[id, offset, file, file_offset, len]`: copy bytes `file_offset..+len` of attached
    /// file `file` (its index in the [`FileTable`](crate::file::FileTable)) into buffer
    /// bytes `offset..+len`; `len` at most [`MAX_READ`](crate::file::MAX_READ).
    pub const LOAD_FILE: u32 = 7;
}

/// Command outcomes, in [`Command::status`].
pub mod status {
    status_codes! {
        /// Not executed yet.
        PENDING = 0, "pending";
        /// Done.
        OK = 1, "ok";
        /// Unknown opcode.
        BAD_OPCODE = 2, "bad opcode";
        /// Buffer id out of range, unallocated, or (for ALLOC) already in use.
        BAD_BUFFER = 3, "bad buffer id";
        /// Offset/length outside the buffer, or element counts larger than a buffer.
        OUT_OF_BOUNDS = 4, "out of bounds";
        /// Inconsistent or zero dimensions.
        BAD_SHAPE = 5, "bad shape";
        /// Allocation beyond the device memory capacity.
        OUT_OF_MEMORY = 6, "out of device memory";
        /// Guest address range outside guest RAM.
        BAD_GUEST_RANGE = 7, "bad guest address range";
        /// Unknown kernel id.
        BAD_KERNEL = 8, "unknown kernel";
        /// Another argument out of range (flags, sizes not a multiple of 4, ids in data...).
        BAD_ARGUMENT = 9, "bad argument";
        /// The backend failed (e.g. the host could not allocate memory), or reading an
        /// attached file did.
        DEVICE_ERROR = 10, "device error";
        /// No attached file with that index, a range outside the file, or a LOAD_FILE
        /// longer than [`MAX_READ`](crate::file::MAX_READ).
        BAD_FILE = 11, "bad attached file or range";
    }
}

/// Values of [`RingHeader::device_status`].
pub mod device_status {
    /// The ring is being served.
    pub const OK: u32 = 0;
    /// `head` is behind `tail` or too far ahead: nothing is executed until it is sane.
    pub const RING_INVALID: u32 = 1;
}

pub mod kernel;
pub mod math;
