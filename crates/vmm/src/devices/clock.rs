//! The guest clock: nanoseconds since boot, frozen while the VM is paused or saved.
//!
//! Freezing (rather than following host time) is what keeps the clock monotonic across a
//! snapshot or a move to a host whose clock started elsewhere: the restored VM continues
//! from the value it saved.

use std::sync::Mutex;
use std::time::Instant;

use ferry_migrate::wire::at_most;
use serde::{Deserialize, Serialize};

/// Saved clock state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Guest time at the save, in ns.
    pub now_ns: u64,
    /// High half latched by each vCPU's last `CLOCK_LO` read.
    #[serde(deserialize_with = "at_most::<_, _, { u8::MAX as usize }>")]
    pub latched_high: Vec<u32>,
}

struct ClockInner {
    /// Guest time when the clock last stopped (or at boot/restore).
    base_ns: u64,
    /// Host instant the clock last started, `None` while stopped.
    running_since: Option<Instant>,
    latched_high: Vec<u32>,
}

/// The guest clock device.
pub struct GuestClock {
    inner: Mutex<ClockInner>,
}

impl GuestClock {
    /// A stopped clock at 0 for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self::restore(&ClockState::default(), vcpus)
    }

    /// A stopped clock continuing from a saved state, for `vcpus` vCPUs: a latch each,
    /// whatever the state holds (it came from a file or the network); one it lacks holds
    /// the saved time's high half, as a read at the save would have latched.
    pub fn restore(state: &ClockState, vcpus: usize) -> Self {
        let mut latched_high = state.latched_high.clone();
        latched_high.resize(vcpus, (state.now_ns >> 32) as u32);
        Self {
            inner: Mutex::new(ClockInner {
                base_ns: state.now_ns,
                running_since: None,
                latched_high,
            }),
        }
    }

    fn now(inner: &ClockInner) -> u64 {
        let running = inner
            .running_since
            .map_or(0, |t| t.elapsed().as_nanos() as u64);
        inner.base_ns.saturating_add(running)
    }

    /// Current guest time in ns.
    pub fn now_ns(&self) -> u64 {
        Self::now(&self.inner.lock().expect("clock lock"))
    }

    /// Starts the clock (on resume).
    pub fn start(&self) {
        let mut inner = self.inner.lock().expect("clock lock");
        if inner.running_since.is_none() {
            inner.running_since = Some(Instant::now());
        }
    }

    /// Stops the clock (on pause).
    pub fn stop(&self) {
        let mut inner = self.inner.lock().expect("clock lock");
        inner.base_ns = Self::now(&inner);
        inner.running_since = None;
    }

    /// `CLOCK_LO` read by vCPU `vcpu`: latches the time, returns the low half.
    pub fn read_low(&self, vcpu: usize) -> u32 {
        let mut inner = self.inner.lock().expect("clock lock");
        let now = Self::now(&inner);
        if let Some(latch) = inner.latched_high.get_mut(vcpu) {
            *latch = (now >> 32) as u32;
        }
        now as u32
    }

    /// `CLOCK_HI` read by vCPU `vcpu`: the high half latched by its last `read_low`.
    pub fn read_high(&self, vcpu: usize) -> u32 {
        let inner = self.inner.lock().expect("clock lock");
        inner.latched_high.get(vcpu).copied().unwrap_or(0)
    }

    /// Saves the clock (stop it first, or the saved time is already stale).
    pub fn save(&self) -> ClockState {
        let inner = self.inner.lock().expect("clock lock");
        ClockState {
            now_ns: Self::now(&inner),
            latched_high: inner.latched_high.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_clock_does_not_move_and_restore_continues() {
        let clock = GuestClock::new(1);
        assert_eq!(clock.now_ns(), 0);
        clock.start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        clock.stop();
        let t = clock.now_ns();
        assert!(t >= 2_000_000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(clock.now_ns(), t);
        let restored = GuestClock::restore(&clock.save(), 1);
        assert_eq!(restored.now_ns(), t);
        restored.start();
        assert!(restored.now_ns() >= t);
    }

    #[test]
    fn latch_returns_consistent_halves() {
        let saved = ClockState {
            now_ns: 0x1_0000_0005,
            latched_high: vec![0],
        };
        let clock = GuestClock::restore(&saved, 1);
        assert_eq!(clock.read_low(0), 5);
        assert_eq!(clock.read_high(0), 1);
        assert_eq!(clock.read_high(7), 0, "unknown vCPU reads 0, never panics");
        // A state with latches for fewer vCPUs, or more, than the VM has.
        for latched_high in [Vec::new(), vec![1; 64]] {
            let clock = GuestClock::restore(
                &ClockState {
                    latched_high,
                    ..saved.clone()
                },
                2,
            );
            assert_eq!(clock.save().latched_high.len(), 2);
            assert_eq!(clock.read_low(1), 5);
            assert_eq!(clock.read_high(1), 1);
        }
    }
}
