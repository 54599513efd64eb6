//! The command ring in guest memory, as the device sees it.
//!
//! Everything here is read from memory the guest controls, so every read is checked:
//! `head` must lie within one ring of the device's own `tail` (the device never trusts
//! the `tail` in guest memory; it only publishes its own there).

use std::mem::offset_of;

use ferry_abi::accel::{
    Command, RingHeader, ACCEL_ABI_VERSION, COMMAND_ARGS, COMMAND_SIZE, RING_MAGIC, RING_SLOTS,
};
use ferry_abi::PAGE_SIZE;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest RAM as the device accesses it: writes through it are dirty-tracked.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Where the ring lives and how to access its fields.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    gpa: u64,
}

fn header_field(gpa: u64, offset: usize) -> GuestAddress {
    GuestAddress(gpa + offset as u64)
}

impl Ring {
    /// The ring whose header is at `gpa`.
    pub fn at(gpa: u64) -> Self {
        Self { gpa }
    }

    /// Guest address of the header.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Writes a fresh header (the VMM does this once at boot).
    pub fn init(&self, mem: &GuestRam, capacity: u64) -> Result<(), GuestMemoryError> {
        let h = |f| header_field(self.gpa, f);
        mem.write_obj(RING_MAGIC, h(offset_of!(RingHeader, magic)))?;
        mem.write_obj(ACCEL_ABI_VERSION, h(offset_of!(RingHeader, version)))?;
        mem.write_obj(RING_SLOTS as u32, h(offset_of!(RingHeader, slots)))?;
        mem.write_obj(capacity, h(offset_of!(RingHeader, capacity)))
    }

    /// The guest's `head`.
    pub fn head(&self, mem: &GuestRam) -> Result<u64, GuestMemoryError> {
        mem.read_obj(header_field(self.gpa, offset_of!(RingHeader, head)))
    }

    /// Publishes the device's `tail`.
    pub fn publish_tail(&self, mem: &GuestRam, tail: u64) -> Result<(), GuestMemoryError> {
        mem.write_obj(tail, header_field(self.gpa, offset_of!(RingHeader, tail)))
    }

    /// Publishes a completed fence value.
    pub fn publish_fence(&self, mem: &GuestRam, value: u64) -> Result<(), GuestMemoryError> {
        mem.write_obj(
            value,
            header_field(self.gpa, offset_of!(RingHeader, completed_fence)),
        )
    }

    /// Publishes the device status (a `device_status` code).
    pub fn publish_device_status(
        &self,
        mem: &GuestRam,
        status: u32,
    ) -> Result<(), GuestMemoryError> {
        mem.write_obj(
            status,
            header_field(self.gpa, offset_of!(RingHeader, device_status)),
        )
    }

    /// Publishes the bytes of device memory in use.
    pub fn publish_used(&self, mem: &GuestRam, used: u64) -> Result<(), GuestMemoryError> {
        mem.write_obj(used, header_field(self.gpa, offset_of!(RingHeader, used)))
    }

    fn slot(&self, index: u64) -> GuestAddress {
        GuestAddress(self.gpa + PAGE_SIZE + (index % RING_SLOTS) * COMMAND_SIZE)
    }

    /// Reads command number `index` (any index; slots wrap).
    pub fn command(&self, mem: &GuestRam, index: u64) -> Result<Command, GuestMemoryError> {
        let mut bytes = [0u8; COMMAND_SIZE as usize];
        mem.read_slice(&mut bytes, self.slot(index))?;
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let mut args = [0u64; COMMAND_ARGS];
        for (i, arg) in args.iter_mut().enumerate() {
            *arg = word(8 + 8 * i);
        }
        Ok(Command {
            opcode: u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
            status: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
            args,
        })
    }

    /// Writes the outcome of command number `index`.
    pub fn complete(
        &self,
        mem: &GuestRam,
        index: u64,
        status: u32,
    ) -> Result<(), GuestMemoryError> {
        mem.write_obj(
            status,
            self.slot(index)
                .unchecked_add(offset_of!(Command, status) as u64),
        )
    }
}

/// Whether a guest-supplied `head` is consistent with the device's `tail`.
pub fn head_is_sane(head: u64, tail: u64) -> bool {
    head >= tail && head - tail <= RING_SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Address;

    #[test]
    fn lying_heads_are_detected() {
        assert!(head_is_sane(5, 5));
        assert!(head_is_sane(5 + RING_SLOTS, 5));
        assert!(!head_is_sane(4, 5), "head behind tail");
        assert!(!head_is_sane(6 + RING_SLOTS, 5), "more than one ring ahead");
        assert!(!head_is_sane(u64::MAX, 0));
    }

    #[test]
    fn commands_round_trip_through_guest_memory() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ring = Ring::at(0x1000);
        ring.init(&mem, 1 << 30).unwrap();
        let at = ring.slot(RING_SLOTS + 3); // wraps to slot 3
        assert_eq!(at.raw_value(), 0x1000 + PAGE_SIZE + 3 * COMMAND_SIZE);
        mem.write_obj(5u32, at).unwrap();
        mem.write_obj(0xdead_beefu64, at.unchecked_add(8 + 8 * 14))
            .unwrap();
        let cmd = ring.command(&mem, 3).unwrap();
        assert_eq!((cmd.opcode, cmd.args[14]), (5, 0xdead_beef));
        ring.complete(&mem, 3, 9).unwrap();
        assert_eq!(ring.command(&mem, 3).unwrap().status, 9);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            RING_MAGIC
        );
    }
}
