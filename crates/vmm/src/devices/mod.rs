//! Port-I/O devices and their dispatch.

pub mod clock;
pub mod console;

use std::time::Duration;

use ferry_abi::{port, CONSOLE_BUFFER_ADDR, CONSOLE_BUFFER_SIZE};
use ferry_accel::device::Accelerator;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

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
}

/// Longest an `ACCEL_WAIT` keeps the vCPU in the VMM: short enough that a pause request
/// is answered promptly, long enough that a waiting guest does not spin on exits.
const ACCEL_WAIT_SLICE: Duration = Duration::from_millis(1);

/// The devices on the port-I/O bus.
pub struct PortDevices {
    /// Console.
    pub console: Console,
    /// Clock.
    pub clock: GuestClock,
    /// The virtual accelerator, if the VM has one.
    pub accel: Option<Accelerator>,
}

impl PortDevices {
    /// Fresh devices for a VM with `vcpus` vCPUs.
    pub fn new(sink: ConsoleSink, vcpus: usize, accel: Option<Accelerator>) -> Self {
        Self {
            console: Console::new(sink),
            clock: GuestClock::new(vcpus),
            accel,
        }
    }

    /// Devices continuing from a saved state.
    pub fn restore(sink: ConsoleSink, state: &DeviceStates, accel: Option<Accelerator>) -> Self {
        Self {
            console: Console::restore(sink, &state.console),
            clock: GuestClock::restore(&state.clock),
            accel,
        }
    }

    /// Saves every device.
    pub fn save(&self) -> DeviceStates {
        DeviceStates {
            console: self.console.save(),
            clock: self.clock.save(),
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
                    accel.wait_idle(ACCEL_WAIT_SLICE);
                }
            }
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
