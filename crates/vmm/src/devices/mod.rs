//! Port-I/O devices and their dispatch.

pub mod channel;
pub mod clock;
pub mod console;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_abi::file::{self, FileRequest, FILE_REQUEST_ADDR, MAX_READ};
use ferry_abi::{port, CONSOLE_BUFFER_ADDR, CONSOLE_BUFFER_SIZE, IMAGE_BASE};
use ferry_accel::device::Accelerator;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::files::AttachedFiles;
use crate::memory::GuestRam;

use self::channel::{Channel, ChannelState};
use self::clock::{ClockState, GuestClock};
use self::console::{Console, ConsoleSink, ConsoleState};

/// What the vCPU loop does after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Keep running.
    Continue,
    /// The guest asked to end with this code.
    Exit(i32),
    /// A fault stub (or a misbehaving guest) wrote the fault port.
    FaultReported,
}

/// Saved state of all port devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// Console.
    pub console: ConsoleState,
    /// Clock.
    pub clock: ClockState,
    /// The message channel.
    pub channel: ChannelState,
}

/// Longest an `ACCEL_WAIT` for the device to be idle keeps the vCPU in the VMM: short
/// enough that a guest waiting for one command while others run after it sees it done
/// soon, long enough that it does not spin on exits.
const ACCEL_WAIT_SLICE: Duration = Duration::from_millis(1);

/// Longest an `ACCEL_WAIT` for a `tail` keeps the vCPU in the VMM: the device wakes it
/// when `tail` gets there, and a pause lets it go once the command in flight ends, so
/// this only bounds a wait for a `tail` that never comes. Each slice is a VM exit: a
/// waiting guest took a fifth of a core on nested virtualization at 1 ms.
const ACCEL_WAIT_FOR_TAIL: Duration = Duration::from_millis(10);

/// The devices on the port-I/O bus.
pub struct PortDevices {
    /// Console.
    pub console: Console,
    /// Clock.
    pub clock: GuestClock,
    /// The virtual accelerator, if the VM has one.
    pub accel: Option<Accelerator>,
    /// The attached files ([`port::FILE_READ`]).
    pub files: AttachedFiles,
    /// The message channel ([`port::CHANNEL_SETUP`], [`port::CHANNEL_KICK`]).
    pub channel: Channel,
    /// Whether a failed read of an attached file was logged as a warning: a guest may
    /// retry it in a loop, so later ones go to the debug log.
    file_error_warned: AtomicBool,
}

/// The value of a 32-bit port write.
fn u32_of(data: &[u8]) -> u32 {
    u32::from_le_bytes(data.try_into().expect("4 bytes"))
}

/// Largest piece of a file read copied at once (bounds the staging buffer).
const FILE_PIECE: u64 = 1 << 20;

/// The guest-visible form of a [`FileRequest`] in guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct FileRequestPage(FileRequest);

// SAFETY: FileRequest is repr(C) with only integer fields and no padding (u32, u32, then
// three u64), so every byte pattern is a valid value.
unsafe impl vm_memory::ByteValued for FileRequestPage {}

impl PortDevices {
    /// Fresh devices for a VM with `vcpus` vCPUs.
    pub fn new(
        sink: ConsoleSink,
        vcpus: usize,
        accel: Option<Accelerator>,
        files: AttachedFiles,
    ) -> Self {
        Self {
            console: Console::new(sink),
            clock: GuestClock::new(vcpus),
            accel,
            files,
            channel: Channel::new(),
            file_error_warned: AtomicBool::new(false),
        }
    }

    /// Devices continuing from a saved state, of a VM of `vcpus` vCPUs and RAM `mem`.
    pub fn restore(
        sink: ConsoleSink,
        state: &DeviceStates,
        (vcpus, mem): (usize, &GuestRam),
        accel: Option<Accelerator>,
        files: AttachedFiles,
    ) -> Self {
        Self {
            console: Console::restore(sink, &state.console),
            clock: GuestClock::restore(&state.clock, vcpus),
            accel,
            files,
            channel: Channel::restore(&state.channel, mem),
            file_error_warned: AtomicBool::new(false),
        }
    }

    /// Saves every device.
    pub fn save(&self) -> DeviceStates {
        DeviceStates {
            console: self.console.save(),
            clock: self.clock.save(),
            channel: self.channel.save(),
        }
    }

    /// Guest `out` to `port`. Writes of the wrong width or out-of-range values are ignored.
    pub fn io_out(&self, mem: &GuestRam, port: u16, data: &[u8]) -> PortAction {
        match (port, data.len()) {
            (port::CONSOLE, 1) => self.console.write(data),
            (port::CONSOLE, 4) => self.console_buffer(mem, data),
            (port::EXIT, 4) => {
                return PortAction::Exit(i32::from_le_bytes(data.try_into().expect("4 bytes")))
            }
            (port::FAULT, _) => return PortAction::FaultReported,
            (port::ACCEL_DOORBELL, 4) => {
                if let Some(accel) = &self.accel {
                    accel.doorbell();
                }
            }
            (port::ACCEL_WAIT, 4) => {
                if let Some(accel) = &self.accel {
                    match u32_of(data) {
                        0 => accel.wait(None, ACCEL_WAIT_SLICE),
                        tail => accel.wait(Some(tail), ACCEL_WAIT_FOR_TAIL),
                    }
                }
            }
            (port::FILE_READ, 4) => self.file_read(mem),
            (port::CHANNEL_SETUP, 4) => self.channel.setup(mem, u32_of(data)),
            (port::CHANNEL_KICK, 4) => self.channel.kick(mem, u32_of(data)),
            _ => tracing::debug!(port, len = data.len(), "write ignored"),
        }
        PortAction::Continue
    }

    /// Console output of the first `n` bytes of the console buffer page.
    fn console_buffer(&self, mem: &GuestRam, data: &[u8]) {
        let len = u32::from_le_bytes(data.try_into().expect("4 bytes")) as usize;
        if len > CONSOLE_BUFFER_SIZE {
            tracing::debug!(len, "console write longer than the buffer page ignored");
            return;
        }
        let mut bytes = [0u8; CONSOLE_BUFFER_SIZE];
        match mem.read_slice(&mut bytes[..len], GuestAddress(CONSOLE_BUFFER_ADDR)) {
            Ok(()) => self.console.write(&bytes[..len]),
            Err(e) => tracing::debug!(%e, "console buffer unreadable"),
        }
    }

    /// Executes the guest's [`FileRequest`] and writes its status back.
    fn file_read(&self, mem: &GuestRam) {
        let Ok(FileRequestPage(mut req)) = mem.read_obj(GuestAddress(FILE_REQUEST_ADDR)) else {
            return;
        };
        req.status = self.execute_file_read(mem, &req);
        if req.status != file::status::OK {
            tracing::debug!(
                file = req.file,
                offset = req.offset,
                len = req.len,
                status = file::status::name(req.status),
                "guest file read failed"
            );
        }
        let status_at =
            GuestAddress(FILE_REQUEST_ADDR + core::mem::offset_of!(FileRequest, status) as u64);
        let _ = mem.write_obj(req.status, status_at);
    }

    /// Validates a file read (every field comes from the guest) and copies.
    fn execute_file_read(&self, mem: &GuestRam, req: &FileRequest) -> u32 {
        let Some(file) = self.files.files().get(req.file as usize) else {
            return file::status::BAD_FILE;
        };
        if req.len > MAX_READ {
            return file::status::TOO_LONG;
        }
        if req
            .offset
            .checked_add(req.len)
            .is_none_or(|end| end > file.info().size)
        {
            return file::status::OUT_OF_BOUNDS;
        }
        let in_ram = usize::try_from(req.len)
            .is_ok_and(|len| len == 0 || mem.check_range(GuestAddress(req.addr), len));
        if req.addr < IMAGE_BASE || !in_ram {
            return file::status::BAD_GUEST_RANGE;
        }
        let mut piece = vec![0u8; FILE_PIECE.min(req.len) as usize];
        let mut done = 0;
        while done < req.len {
            let n = (req.len - done).min(FILE_PIECE) as usize;
            if let Err(e) = file.read_at(req.offset + done, &mut piece[..n]) {
                let name = &file.info().name;
                if self.file_error_warned.swap(true, Ordering::Relaxed) {
                    tracing::debug!(file = %name, "cannot read an attached file: {e}");
                } else {
                    tracing::warn!(
                        file = %name,
                        "cannot read an attached file: {e} (said once; the guest gets an I/O error each time)"
                    );
                }
                return file::status::IO_ERROR;
            }
            // Written through GuestRam: the pages land in the dirty log.
            if mem
                .write_slice(&piece[..n], GuestAddress(req.addr + done))
                .is_err()
            {
                return file::status::BAD_GUEST_RANGE;
            }
            done += n as u64;
        }
        file::status::OK
    }

    /// Guest `in` from `port` by vCPU `vcpu`. Unknown ports and widths read all-ones.
    pub fn io_in(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        let value = match (port, data.len()) {
            (port::CLOCK_LO, 4) => self.clock.read_low(vcpu),
            (port::CLOCK_HI, 4) => self.clock.read_high(vcpu),
            _ => {
                tracing::debug!(port, len = data.len(), "read from unknown port");
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }
}
