//! One VM run by the daemon: the microVM behind a lock, a watcher thread that notices
//! the guest's end and applies the migration throttle, and its status for the API.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_vmm::{FileInfo, Microvm, RunState, VmConfig, VmExit};
use serde::{Deserialize, Serialize};

/// Throttle duty-cycle period: the VM is held paused for `pct`% of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
/// How often the watcher looks for the guest's end.
const WATCH_PERIOD: Duration = Duration::from_millis(10);
/// Window over which the accelerator's load is measured.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// Where a hosted VM is in its life, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum VmPhase {
    /// Running its guest.
    Running,
    /// Paused for a migration's switchover.
    Paused,
    /// Being migrated away (still running here).
    Migrating,
    /// The guest ended with this code.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// The guest faulted or the VM failed.
    Failed {
        /// What happened.
        error: String,
    },
    /// Stopped by the operator.
    Stopped,
    /// Moved to another host; it runs there now.
    MigratedAway {
        /// The destination's migration address.
        to: String,
    },
}

impl VmPhase {
    /// Whether the VM still holds this host's resources.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Migrating)
    }
}

/// What the API shows of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Id, unique across the cluster (kept across migrations).
    pub id: String,
    /// Workload name (or image path).
    pub workload: String,
    /// Guest arguments.
    pub args: Vec<String>,
    /// State.
    #[serde(flatten)]
    pub phase: VmPhase,
    /// Guest RAM, bytes.
    pub memory: u64,
    /// Accelerator memory, bytes.
    pub accel_memory: u64,
    /// Share of the last second the accelerator spent executing commands (0 to 1).
    #[serde(default)]
    pub accel_load: f64,
    /// Time on this host, ms.
    pub uptime_ms: u64,
    /// Milliseconds since the epoch when it arrived on this host.
    pub since_unix_ms: u64,
    /// The host it came from, if it was migrated here.
    pub migrated_from: Option<String>,
    /// Its attached files (name, size, SHA-256, path on this host).
    #[serde(default)]
    pub files: Vec<FileInfo>,
    /// The console's last lines.
    pub console_tail: String,
}

struct Inner {
    /// `None` once retired: its memory and threads went back to the host.
    vm: Option<Microvm>,
    /// The console's end, kept when the VM is released.
    last_console: String,
    /// A migration holds the VM paused: the throttle must not resume it.
    held: bool,
    /// The throttle holds it paused for now.
    throttled: bool,
}

/// A VM run by this host.
pub struct HostedVm {
    /// Id.
    pub id: String,
    /// Workload name.
    pub workload: String,
    /// Guest arguments.
    pub args: Vec<String>,
    /// Shape.
    pub config: VmConfig,
    /// Host it came from.
    pub migrated_from: Option<String>,
    /// Its attached files.
    pub files: Vec<FileInfo>,
    inner: Mutex<Inner>,
    phase: Mutex<VmPhase>,
    throttle_pct: AtomicU8,
    /// `accel_load` as f64 bits, updated by the watcher.
    accel_load: AtomicU64,
    retired: AtomicBool,
    arrived: Instant,
    arrived_unix_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl HostedVm {
    /// Takes `vm` (running, or paused and then resumed here) and starts its watcher.
    pub fn start(
        id: String,
        workload: String,
        args: Vec<String>,
        mut vm: Microvm,
        migrated_from: Option<String>,
    ) -> Result<Arc<Self>, String> {
        if matches!(vm.run_state(), RunState::Paused) {
            vm.resume()
                .map_err(|e| format!("cannot start the VM: {e}"))?;
        }
        let hosted = Arc::new(Self {
            id,
            workload,
            args,
            config: vm.config(),
            migrated_from,
            files: vm.files().infos(),
            inner: Mutex::new(Inner {
                vm: Some(vm),
                last_console: String::new(),
                held: false,
                throttled: false,
            }),
            phase: Mutex::new(VmPhase::Running),
            throttle_pct: AtomicU8::new(0),
            accel_load: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            arrived: Instant::now(),
            arrived_unix_ms: unix_ms(),
        });
        let watched = hosted.clone();
        std::thread::Builder::new()
            .name(format!("watch-{}", hosted.id))
            .spawn(move || watched.watch())
            .map_err(|e| format!("cannot start the VM's watcher thread: {e}"))?;
        Ok(hosted)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("vm lock")
    }

    /// The state now.
    pub fn phase(&self) -> VmPhase {
        self.phase.lock().expect("phase lock").clone()
    }

    /// Sets the state.
    pub fn set_phase(&self, phase: VmPhase) {
        *self.phase.lock().expect("phase lock") = phase;
    }

    /// Runs `f` with the microVM locked; `None` once it was released (stopped or
    /// migrated away).
    pub fn with_vm<R>(&self, f: impl FnOnce(&Microvm) -> R) -> Option<R> {
        self.inner().vm.as_ref().map(f)
    }

    /// What the API shows.
    pub fn info(&self) -> VmInfo {
        let console_tail = self.console();
        let tail_start = console_tail
            .char_indices()
            .rev()
            .filter(|&(_, c)| c == '\n')
            .nth(40)
            .map_or(0, |(i, _)| i + 1);
        VmInfo {
            id: self.id.clone(),
            workload: self.workload.clone(),
            args: self.args.clone(),
            phase: self.phase(),
            memory: self.config.ram_size,
            accel_memory: self.config.accel_memory,
            accel_load: self.accel_load(),
            uptime_ms: self.arrived.elapsed().as_millis() as u64,
            since_unix_ms: self.arrived_unix_ms,
            migrated_from: self.migrated_from.clone(),
            files: self.files.clone(),
            console_tail: console_tail[tail_start..].to_string(),
        }
    }

    /// Share of the last second the accelerator was busy (0 to 1).
    pub fn accel_load(&self) -> f64 {
        f64::from_bits(self.accel_load.load(Ordering::Relaxed))
    }

    /// Whole console tail (64 KiB).
    pub fn console(&self) -> String {
        let inner = self.inner();
        match &inner.vm {
            Some(vm) => vm.console_tail(),
            None => inner.last_console.clone(),
        }
    }

    /// Stops the VM for good (operator stop, or after migrating away) and gives its
    /// RAM, device memory and threads back to the host; its console stays readable.
    pub fn retire(&self, phase: VmPhase) {
        self.retired.store(true, Ordering::SeqCst);
        let mut inner = self.inner();
        let mut released = inner.vm.take();
        if let Some(vm) = &mut released {
            if matches!(vm.run_state(), RunState::Running) {
                let _ = vm.pause();
            }
            inner.last_console = vm.console_tail();
        }
        inner.held = true;
        drop(inner);
        self.set_phase(phase);
        // Dropped outside the lock: freeing gigabytes takes a while.
        drop(released);
    }

    /// Holds the VM paused for a switchover (the throttle lets go of it first).
    pub fn hold(&self) -> Result<(), String> {
        self.throttle_pct.store(0, Ordering::SeqCst);
        let mut inner = self.inner();
        if inner.throttled {
            inner.throttled = false;
        } else {
            let Some(vm) = inner.vm.as_mut() else {
                return Err("the VM was released".into());
            };
            match vm.pause() {
                Ok(_) => {}
                Err(e) => {
                    drop(inner);
                    self.note_end();
                    return Err(format!("cannot pause the VM: {e}"));
                }
            }
        }
        inner.held = true;
        drop(inner);
        self.set_phase(VmPhase::Paused);
        Ok(())
    }

    /// Lets a held VM run again (its migration failed).
    pub fn release_hold(&self) -> Result<(), String> {
        let mut inner = self.inner();
        let held = inner.held;
        if let Some(vm) = inner.vm.as_mut() {
            if held && matches!(vm.run_state(), RunState::Paused) {
                vm.resume()
                    .map_err(|e| format!("cannot resume the VM: {e}"))?;
            }
        }
        inner.held = false;
        drop(inner);
        if self.phase() == VmPhase::Paused {
            self.set_phase(VmPhase::Migrating);
        }
        Ok(())
    }

    /// Sets the migration throttle (% of the time held paused).
    pub fn set_throttle(&self, pct: u8) {
        self.throttle_pct.store(pct.min(95), Ordering::SeqCst);
    }

    fn note_end(&self) {
        let mut inner = self.inner();
        let exit = inner
            .vm
            .as_mut()
            .and_then(|vm| vm.wait(Some(Duration::ZERO)));
        if let Some(exit) = exit {
            drop(inner);
            self.set_phase(match exit {
                VmExit::Exited(code) => VmPhase::Exited { code },
                VmExit::Failed(e) => VmPhase::Failed {
                    error: e.to_string(),
                },
            });
        }
    }

    /// The watcher: notices the end of the guest and runs the throttle duty cycle.
    fn watch(self: Arc<Self>) {
        let busy_time = || self.with_vm(Microvm::accel_busy_time).unwrap_or_default();
        let mut window = (Instant::now(), busy_time());
        while !self.retired.load(Ordering::SeqCst) {
            if window.0.elapsed() >= LOAD_WINDOW {
                let busy = busy_time();
                let load = (busy.saturating_sub(window.1)).as_secs_f64()
                    / window.0.elapsed().as_secs_f64();
                self.accel_load
                    .store(load.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
                window = (Instant::now(), busy);
            }
            let pct = self.throttle_pct.load(Ordering::SeqCst);
            if pct == 0 {
                std::thread::sleep(WATCH_PERIOD);
            } else {
                let held_for = THROTTLE_PERIOD * u32::from(pct) / 100;
                {
                    let mut inner = self.inner();
                    let held = inner.held;
                    let paused = inner.vm.as_mut().is_some_and(|vm| {
                        !held && matches!(vm.run_state(), RunState::Running) && vm.pause().is_ok()
                    });
                    if paused {
                        inner.throttled = true;
                    }
                }
                std::thread::sleep(held_for);
                {
                    let mut inner = self.inner();
                    if inner.throttled && !inner.held {
                        if let Some(vm) = inner.vm.as_mut() {
                            let _ = vm.resume();
                        }
                    }
                    inner.throttled = false;
                }
                std::thread::sleep(THROTTLE_PERIOD - held_for);
            }
            let running = self
                .with_vm(|vm| matches!(vm.run_state(), RunState::Running))
                .unwrap_or(false);
            if running {
                self.note_end();
            }
            if !self.phase().is_live() {
                break;
            }
        }
        // An ended VM puts no load on the host.
        self.accel_load.store(0f64.to_bits(), Ordering::Relaxed);
    }
}
