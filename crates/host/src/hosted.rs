//! One VM run by the daemon: its [`Lifecycle`], its microVM behind a control lock, a
//! watcher thread that notices the guest's end and runs the migration throttle, and what
//! the API shows of it.
//!
//! Three things are kept apart so that no reader ever waits for the guest:
//! - the lifecycle state, changed only by quick transitions;
//! - the microVM's control (pause, resume, save, release), which may wait for a kernel
//!   in flight (a release abandons it where the backend can): only migrations, stops,
//!   the throttle and the watcher take it;
//! - what is read while it runs (console, load: [`VmReadout`]; dirty pages and chunks:
//!   a [`VmTracker`] lent to a migration as a [`MemoryLoan`]), read without either lock.
//!
//! Lock order: control, then lifecycle (briefly); migration, then lifecycle (briefly);
//! control, then migration, only for an in-doubt VM's resumption and after a migration
//! thread's panic (briefly, see [`HostedVm::resume_here`] and
//! [`HostedVm::migration_panicked`]); never the other way round (no migration, then
//! control).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_vmm::{FileInfo, Microvm, RunState, VmConfig, VmExit, VmReadout, VmTracker};

use crate::capacity::Reservation;
use crate::lifecycle::{Lifecycle, TransitionError, Vacated};
use crate::MigrationStatus;
use ferry_api::MigrationState;
use ferry_api::{VmInfo, VmState};
use ferry_migrate::{error_chain, CancelToken, VmError};

/// Throttle duty-cycle period: the VM is held paused for `pct`% of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
/// How often the watcher looks for the guest's end.
const WATCH_PERIOD: Duration = Duration::from_millis(10);
/// Window over which the accelerator's load is measured.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// Which of a VM's migrations out of this host an update or a settlement is for: the
/// threads of an earlier migration (its end, its settlement) never touch a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationTicket(u64);

/// A migration out of this host: its status for the API, and how to cancel it.
struct Outgoing {
    ticket: MigrationTicket,
    status: MigrationStatus,
    cancel: CancelToken,
    /// The engine's session with the destination, once the switchover is in doubt:
    /// what a settle question names.
    session: Option<u64>,
}

/// Why the settlement of an in-doubt VM was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The migration settled is no longer the VM's latest (another began since).
    #[error("a later migration of the VM began since: this settlement is for an earlier one")]
    Superseded,
    /// The VM is not in doubt (settled already, or not migrating).
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// Resumed here, it could not run again: it ended as failed.
    #[error("{0}")]
    CannotRun(String),
}

/// A VM's memory lent to a migration's source ([`HostedVm::lend_memory`]): reads its
/// RAM and accelerator memory through the tracker, which keeps them mapped after the VM
/// is released. Dropped, it lets go of the tracker, then gives the VM's capacity back if
/// the VM's life here ended meanwhile (and no other loan maps the memory).
pub struct MemoryLoan {
    /// `None` only while it is dropped.
    tracker: Option<VmTracker>,
    vm: Arc<HostedVm>,
}

impl std::ops::Deref for MemoryLoan {
    type Target = VmTracker;

    fn deref(&self) -> &VmTracker {
        self.tracker
            .as_ref()
            .expect("a loan has its tracker until dropped")
    }
}

impl Drop for MemoryLoan {
    fn drop(&mut self) {
        // The mapping goes first: only then is the memory free to promise again.
        drop(self.tracker.take());
        drop(self.vm.life.give_back());
    }
}

/// Who holds the microVM paused, if anyone.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Nobody: it runs (or has ended).
    Free,
    /// The migration throttle, for part of its duty cycle, since then.
    Throttle { since: Instant },
    /// A migration's switchover (or an in-doubt outcome).
    Switchover,
}

/// The microVM and who holds it paused.
struct Control {
    /// `None` once released: its memory, threads and device memory went back.
    vm: Option<Microvm>,
    hold: Hold,
    /// What migrations track while it runs (it keeps the RAM alive: dropped with it).
    tracker: Option<VmTracker>,
    /// Whether the throttle's resume was refused since the VM last ran again (said once,
    /// not every cycle).
    throttle_resume_refused: bool,
    /// Tests: resumes to refuse, as a torn accelerator's VM refuses them.
    #[cfg(test)]
    resumes_to_fail: u32,
}

impl Control {
    /// Runs the microVM again if it is paused; one that cannot run stays paused.
    fn resume_paused(&mut self) -> Result<(), ferry_vmm::vm::VmControlError> {
        let Some(vm) = self.vm.as_mut() else {
            return Ok(());
        };
        if !matches!(vm.run_state(), RunState::Paused) {
            return Ok(());
        }
        #[cfg(test)]
        if self.resumes_to_fail > 0 {
            self.resumes_to_fail -= 1;
            return Err(ferry_vmm::vm::VmControlError::WrongState {
                op: "resume",
                state: "refusing (a test)".into(),
                needs: "to run",
            });
        }
        vm.resume()
    }
}

/// A VM run by this host.
pub struct HostedVm {
    /// Id.
    pub id: String,
    /// Workload name.
    pub workload: String,
    /// The name given at creation.
    pub name: Option<String>,
    /// Guest arguments.
    pub args: Vec<String>,
    /// Shape.
    pub config: VmConfig,
    /// Host it came from.
    pub migrated_from: Option<String>,
    /// The key it was created with here, if any.
    pub idempotency_key: Option<String>,
    /// Its attached files.
    pub files: Vec<FileInfo>,
    /// Its accelerator's backend kind, if it has an accelerator.
    pub accel_backend: Option<String>,
    /// Declared before `life`, which holds the capacity reservation: fields drop in
    /// order, so a record dropped with its microVM frees the memory before the room.
    control: Mutex<Control>,
    life: Lifecycle,
    readout: VmReadout,
    throttle_pct: AtomicU8,
    /// `accel_load` as f64 bits, updated by the watcher.
    accel_load: AtomicU64,
    /// Its migration out of this host, the one running or the last one.
    migration: Mutex<Option<Outgoing>>,
    arrived: Instant,
    arrived_unix_ms: u64,
    /// Its watcher thread, joined at the host's shutdown.
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lines of the console a VM's [`HostedVm::info`] shows, at most.
const TAIL_LINES: usize = 40;
/// Bytes of the console a VM's [`HostedVm::info`] shows, at most: a guest that prints
/// long lines, or junk with no line breaks, must not make every listing of the host's
/// VMs (up to 64 KiB of console each, control characters six times that in JSON) grow
/// with it. The whole console is `GET /v1/vms/{id}/console`.
const TAIL_BYTES: usize = 4096;

/// The end of `console` that [`HostedVm::info`] shows: its last [`TAIL_LINES`] lines,
/// and of them no more than the last [`TAIL_BYTES`], from the first line that begins in
/// them (or, where none does, from the first whole character).
fn console_tail(console: &str) -> &str {
    let lines = console
        .char_indices()
        .rev()
        .filter(|&(_, c)| c == '\n')
        .nth(TAIL_LINES)
        .map_or(0, |(i, _)| i + 1);
    let tail = &console[lines..];
    if tail.len() <= TAIL_BYTES {
        return tail;
    }
    let mut start = tail.len() - TAIL_BYTES;
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    let cut = &tail[start..];
    if tail.as_bytes()[start - 1] == b'\n' {
        return cut;
    }
    // A line cut in two is left out if a whole one follows it.
    match cut.find('\n') {
        Some(i) if i + 1 < cut.len() => &cut[i + 1..],
        _ => cut,
    }
}

/// The state a guest's end puts a VM in.
fn ended_state(exit: VmExit) -> VmState {
    match exit {
        VmExit::Exited(code) => VmState::Exited { code },
        VmExit::Failed(e) => VmState::Failed {
            error: e.to_string(),
        },
    }
}

/// How a VM came to run on this host: what a failure to watch it does to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Created here: a VM that cannot be watched is not started (nothing is lost).
    Created {
        /// The key the create came with ([`ferry_api::CreateVm::idempotency_key`]).
        idempotency_key: Option<String>,
    },
    /// Received by a migration, confirmed to its source, which has released its copy:
    /// this one is the only one, and runs on even unwatched. `from` is the name the
    /// source gave (checked when received), only shown.
    Migrated {
        /// The source host's name, if it gave one.
        from: Option<String>,
        /// The key it was created with, as the source gave it (checked when received):
        /// a create sent again finds the VM where it runs now.
        idempotency_key: Option<String>,
    },
}

#[cfg(test)]
thread_local! {
    /// Tests: the next watcher thread started on this thread fails to start.
    static FAIL_NEXT_WATCHER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl HostedVm {
    /// Takes `vm` (paused before its first instruction, or received and restored) with
    /// the capacity `reservation` it was made in, runs it, and starts its watcher.
    pub fn launch(
        id: String,
        (workload, name): (String, Option<String>),
        args: Vec<String>,
        mut vm: Microvm,
        origin: Origin,
        reservation: Reservation,
    ) -> Result<Arc<Self>, String> {
        let life = Lifecycle::new(reservation);
        let started = match vm.run_state() {
            RunState::Paused => vm.resume().map_err(|e| format!("cannot start the VM: {e}")),
            _ => Ok(()),
        };
        if let Err(e) = started.and_then(|()| life.start().map_err(|e| e.to_string())) {
            // Its memory goes before its room (parameters are dropped last to first).
            drop(vm);
            return Err(e);
        }
        let hosted = Arc::new(Self {
            id,
            workload,
            name,
            args,
            config: vm.config(),
            migrated_from: match &origin {
                Origin::Created { .. } => None,
                Origin::Migrated { from, .. } => from.clone(),
            },
            idempotency_key: match &origin {
                Origin::Created { idempotency_key }
                | Origin::Migrated {
                    idempotency_key, ..
                } => idempotency_key.clone(),
            },
            files: vm.files().infos(),
            accel_backend: vm.accel().map(|a| a.backend_kind().to_string()),
            life,
            readout: vm.readout(),
            control: Mutex::new(Control {
                tracker: Some(vm.tracker()),
                vm: Some(vm),
                hold: Hold::Free,
                throttle_resume_refused: false,
                #[cfg(test)]
                resumes_to_fail: 0,
            }),
            throttle_pct: AtomicU8::new(0),
            accel_load: AtomicU64::new(0),
            migration: Mutex::new(None),
            arrived: Instant::now(),
            arrived_unix_ms: unix_ms(),
            watcher: Mutex::new(None),
        });
        match hosted.spawn_watcher() {
            Ok(watcher) => *hosted.watcher.lock().expect("watcher lock") = Some(watcher),
            // A VM that arrived was confirmed to its source, which has released its copy:
            // it runs on unwatched (its end goes unnoticed until it is stopped) rather
            // than being destroyed. Decided on what this host knows, not on the name the
            // source may give.
            Err(e) if matches!(origin, Origin::Migrated { .. }) => tracing::error!(
                vm = %hosted.id,
                "the VM runs without its watcher thread (its end will not be noticed; \
                 stop it to release it): {e}"
            ),
            Err(e) => {
                // Released now, before its room goes with `hosted`.
                hosted.release();
                return Err(format!("cannot start the VM's watcher thread: {e}"));
            }
        }
        Ok(hosted)
    }

    /// Starts the watcher thread.
    fn spawn_watcher(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        #[cfg(test)]
        if FAIL_NEXT_WATCHER.replace(false) {
            return Err(std::io::Error::other("no thread for the test"));
        }
        let watched = self.clone();
        std::thread::Builder::new()
            .name(format!("watch-{}", self.id))
            .spawn(move || watched.watch())
    }

    /// Waits for the watcher thread to end (it does once the VM's life here is over).
    /// Never called from the watcher itself.
    pub fn join_watcher(&self) {
        let watcher = self.watcher.lock().expect("watcher lock").take();
        if let Some(watcher) = watcher {
            let _ = watcher.join();
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // Whole after a panic (each field is set in one assignment): a migration thread
        // that panicked holding it leaves the VM to be settled, not every later call to
        // panic too.
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state now (never waits for the guest).
    pub fn state(&self) -> VmState {
        self.life.state()
    }

    /// When its life here ended, if it has.
    pub fn ended_at(&self) -> Option<Instant> {
        self.life.ended_at()
    }

    /// What the API shows (never waits for the guest), with the console's last lines
    /// (bounded in lines and bytes, as every VM's is listed).
    pub fn info(&self) -> VmInfo {
        VmInfo {
            console_tail: console_tail(&self.console()).to_string(),
            ..self.summary()
        }
    }

    /// What the API shows less the console tail (what heartbeats carry): never copies the
    /// console.
    pub fn summary(&self) -> VmInfo {
        VmInfo {
            id: self.id.clone(),
            workload: self.workload.clone(),
            name: self.name.clone(),
            args: self.args.clone(),
            state: self.state(),
            memory: self.config.ram_size,
            accel_memory: self.config.accel_memory,
            accel_backend: self.accel_backend.clone(),
            accel_load: self.accel_load(),
            // The clock stops when its life here ends (exited, stopped, migrated away).
            uptime_ms: self
                .ended_at()
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(self.arrived)
                .as_millis() as u64,
            since_unix_ms: self.arrived_unix_ms,
            migrated_from: self.migrated_from.clone(),
            files: self.files.clone(),
            idempotency_key: self.idempotency_key.clone(),
            console_tail: String::new(),
        }
    }

    /// Share of the last second the accelerator was busy (0 to 1).
    pub fn accel_load(&self) -> f64 {
        f64::from_bits(self.accel_load.load(Ordering::Relaxed))
    }

    /// Whole console tail (64 KiB), also after the VM was released.
    pub fn console(&self) -> String {
        self.readout.console_tail()
    }

    fn outgoing(&self) -> MutexGuard<'_, Option<Outgoing>> {
        self.migration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Its migration out of this host (running or last).
    pub fn migration(&self) -> Option<MigrationStatus> {
        self.outgoing().as_ref().map(|m| m.status.clone())
    }

    /// Its latest migration out of this host, if any.
    pub fn migration_ticket(&self) -> Option<MigrationTicket> {
        self.outgoing().as_ref().map(|m| m.ticket)
    }

    /// Updates the status of migration `ticket`, unless a later one replaced it.
    pub fn update_migration(&self, ticket: MigrationTicket, f: impl FnOnce(&mut MigrationStatus)) {
        if let Some(m) = self.outgoing().as_mut().filter(|m| m.ticket == ticket) {
            f(&mut m.status);
        }
    }

    /// Records the engine's session of migration `ticket`, whose switchover is in doubt
    /// (before the VM is said to be in doubt, so whoever settles it can ask about it).
    pub fn note_in_doubt_session(&self, ticket: MigrationTicket, session: u64) {
        if let Some(m) = self.outgoing().as_mut().filter(|m| m.ticket == ticket) {
            m.session = Some(session);
        }
    }

    /// The destination of migration `ticket` and its session, to ask whether it runs
    /// the VM: `None` if no session was recorded, or a later migration began.
    pub fn in_doubt_question(&self, ticket: MigrationTicket) -> Option<(String, u64)> {
        let outgoing = self.outgoing();
        let m = outgoing.as_ref().filter(|m| m.ticket == ticket)?;
        Some((m.status.to.clone(), m.session?))
    }

    /// Asks its migration to stop before the destination is told to run the VM.
    pub fn cancel_migration(&self) -> Result<MigrationStatus, String> {
        // The state is read under the migration lock, which a migration's start holds
        // across its transition: the token cancelled is that of the migration seen.
        let outgoing = self.outgoing();
        match self.state() {
            VmState::Migrating { .. } | VmState::Switchover { .. } => {}
            VmState::InDoubt { .. } => {
                return Err(format!(
                    "too late to cancel: the destination was told to run the VM, which is {}",
                    self.state()
                ))
            }
            other => return Err(format!("it is {other}: no migration to cancel")),
        }
        let m = outgoing.as_ref().ok_or("no migration recorded")?;
        m.cancel.cancel();
        Ok(m.status.clone())
    }

    /// Lends its memory to a migration's source: what the migration tracks and reads of
    /// it, which keeps the memory mapped, and with it the VM's capacity held, until the
    /// loan is dropped. `None` once released or ended.
    pub fn lend_memory(self: &Arc<Self>) -> Option<MemoryLoan> {
        let control = self.control();
        // Under the control lock, which a release takes to drop the tracker: a VM whose
        // life ended before this is refused by `lend`, one that ends after it keeps its
        // reservation for the loan.
        let tracker = control.tracker.clone()?;
        self.life.lend().ok()?;
        drop(control);
        Some(MemoryLoan {
            tracker: Some(tracker),
            vm: self.clone(),
        })
    }

    /// Runs `f` on the microVM under its control lock (it may wait for a pause in
    /// progress); `None` once released.
    pub fn with_vm<R>(&self, f: impl FnOnce(&Microvm) -> R) -> Option<R> {
        self.control().vm.as_ref().map(f)
    }

    /// Running → migrating to `to`, recording `status` as its migration, which `cancel`
    /// cancels; the ticket names this migration in its later updates.
    pub fn begin_migration(
        &self,
        to: &str,
        status: MigrationStatus,
        cancel: CancelToken,
    ) -> Result<MigrationTicket, TransitionError> {
        // One critical section: a cancel that sees the VM migrating finds this
        // migration's token, never the previous one's.
        let mut outgoing = self.outgoing();
        self.life.migrate(to)?;
        let ticket = MigrationTicket(outgoing.as_ref().map_or(1, |m| m.ticket.0 + 1));
        *outgoing = Some(Outgoing {
            ticket,
            status,
            cancel,
            session: None,
        });
        Ok(ticket)
    }

    /// Migrating → switchover: holds the VM paused (taking over a throttle's pause) and
    /// returns when it stopped making progress.
    pub fn hold(&self) -> Result<Instant, VmError> {
        self.life
            .begin_switchover()
            .map_err(|e| VmError::Pause(e.into()))?;
        self.throttle_pct.store(0, Ordering::SeqCst);
        let mut control = self.control();
        let since = match control.hold {
            Hold::Throttle { since } => {
                // The throttle's pause took requests; from here the VM's state may
                // become the destination's, so they are refused, as by a pause.
                if let Some(vm) = control.vm.as_ref() {
                    vm.refuse_requests();
                }
                since
            }
            // Held for a switchover, yet this one just began: a hold left over (an
            // in-doubt VM resumed here is let go under the control lock with its
            // transition, so none should be). Taken over, the VM could be let go by
            // whoever held it, and this switchover's copy made of a running VM: refused,
            // the switchover undone; the migration then fails, and its abandon lets the
            // VM go.
            Hold::Switchover => {
                let _ = self.life.end_switchover();
                return Err(VmError::Pause(
                    "the VM is held paused for another switchover".into(),
                ));
            }
            Hold::Free => {
                let Some(vm) = control.vm.as_mut() else {
                    return Err(VmError::Gone("the VM was released".into()));
                };
                match vm.pause() {
                    // Mostly the kernel in flight: the device stops between commands, and
                    // the VM's pause counts from then.
                    Ok(paused) => {
                        tracing::debug!(ms = paused.took.as_secs_f64() * 1e3, "the VM stopped");
                        paused.stopped_at
                    }
                    Err(e) => {
                        // The guest ended as it was paused: the migration fails and the
                        // VM ends here. Otherwise the migration's own abandon moves it
                        // back to running: until then it is this migration's switchover,
                        // and no other migration may begin and be undone by that abandon.
                        let exit = vm.wait(Some(Duration::ZERO));
                        drop(control);
                        if let Some(exit) = exit {
                            self.end(ended_state(exit));
                        }
                        return Err(VmError::Pause(e.into()));
                    }
                }
            }
        };
        control.hold = Hold::Switchover;
        Ok(since)
    }

    /// Lets a VM held paused by its migration (or its throttle) run again.
    pub fn resume_from_hold(&self) -> Result<(), VmError> {
        Self::let_go(&mut self.control()).map(drop)
    }

    /// Switchover → migrating: lets the VM its migration held paused for the switchover
    /// run again before the destination was told to run it, the migration going on
    /// (pre-copy after a replay's tail gave way in the pause): the throttle applies to it
    /// again, and the next switchover holds it anew. A VM not held for a switchover is
    /// let go as by [`Self::resume_from_hold`], its state unchanged (a failed migration
    /// resumes it so, then abandons).
    pub fn end_switchover(&self) -> Result<(), VmError> {
        let mut control = self.control();
        if let Hold::Switchover = Self::let_go(&mut control)? {
            // Under the control lock (control, then lifecycle): the throttle never finds
            // the VM free yet still in its switchover.
            self.life
                .end_switchover()
                .map_err(|e| VmError::Resume(e.into()))?;
        }
        Ok(())
    }

    /// Runs the microVM again if a migration or its throttle holds it paused; returns
    /// who held it (it stays held if it cannot run again).
    fn let_go(control: &mut Control) -> Result<Hold, VmError> {
        let held = control.hold;
        if let Hold::Throttle { .. } | Hold::Switchover = held {
            control
                .resume_paused()
                .map_err(|e| VmError::Resume(e.into()))?;
        }
        control.hold = Hold::Free;
        control.throttle_resume_refused = false;
        Ok(held)
    }

    /// The migration ended before the destination was told to run the VM: it runs on
    /// here (unless it ended meanwhile).
    pub fn abandon_migration(&self) -> Result<(), String> {
        self.throttle_pct.store(0, Ordering::SeqCst);
        if let Err(e) = self.resume_from_hold() {
            return Err(self.fail_to_run("its migration failed", &e));
        }
        match self.life.abandon_migration() {
            Ok(()) => Ok(()),
            // The guest ended during the migration: it stays ended.
            Err(e) if e.state.has_ended() => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A VM paused for its migration that cannot run again `after` ends as failed and is
    /// released, rather than stay paused and listed as it was, with no way out for the
    /// operator (no stop, no resolve) and its capacity held. Returns the error recorded.
    fn fail_to_run(&self, after: &str, e: &VmError) -> String {
        let error = format!("cannot run again after {after}: {}", error_chain(e));
        self.end(VmState::Failed {
            error: error.clone(),
        });
        error
    }

    /// Its migration `ticket`'s thread panicked (`why`): a VM still in that migration runs
    /// on here if the destination cannot have been told to run it yet (migrating, or a
    /// switchover that does not hold it paused: Go is sent only while one does), and is
    /// left in doubt if it may have been, for `ferry vm resolve`; the migration's status
    /// says so. Anything else (ended, gone, a later migration's) stays.
    pub fn migration_panicked(&self, ticket: MigrationTicket, why: &str) {
        let error = format!("the migration panicked: {why}");
        tracing::error!(vm = %self.id, "{error}");
        // The control lock, then the migration lock, which a migration's start holds:
        // the hold and the state read are this migration's.
        let control = self.control();
        let held = matches!(control.hold, Hold::Switchover);
        let mut outgoing = self.outgoing();
        let Some(m) = outgoing.as_mut().filter(|m| m.ticket == ticket) else {
            return;
        };
        let (status, in_doubt) = match self.state() {
            VmState::Migrating { .. } => (MigrationState::Failed, false),
            VmState::Switchover { .. } if !held => (MigrationState::Failed, false),
            VmState::Switchover { .. } => (MigrationState::InDoubt, true),
            _ => return,
        };
        m.status.state = status;
        m.status.error = Some(error.clone());
        drop((outgoing, control));
        let outcome = match in_doubt {
            true => self.lose_confirmation(&error).map_err(|e| e.to_string()),
            false => self.abandon_migration(),
        };
        if let Err(e) = outcome {
            tracing::error!(vm = %self.id, "after its migration panicked: {e}");
        }
    }

    /// Switchover → in-doubt: the VM stays paused here until resolved.
    pub fn lose_confirmation(&self, reason: &str) -> Result<(), TransitionError> {
        self.life.lose_confirmation(reason)
    }

    /// Its message channel (usable without the VM's control, and after it ended).
    pub fn channel(&self) -> &ferry_vmm::devices::channel::Channel {
        self.readout.channel()
    }

    /// Switchover → migrated-away: the destination confirmed it runs the VM; releases it
    /// here.
    pub fn leave(&self) -> Result<(), TransitionError> {
        let vacated = self.life.leave()?;
        self.release_left(vacated);
        Ok(())
    }

    /// In-doubt → migrated-away, settling migration `ticket`: its destination runs the
    /// VM; releases it here.
    pub fn release_in_doubt(&self, ticket: MigrationTicket) -> Result<(), SettleError> {
        let vacated = self.settle(ticket, Lifecycle::release)?;
        self.release_left(vacated);
        Ok(())
    }

    /// In-doubt → running, settling migration `ticket`: its destination does not run the
    /// VM. The transition comes first, so that of two settlements racing (the host's own
    /// and an operator's), only the one that won runs the VM here. One that cannot run
    /// again ends as failed.
    ///
    /// The transition and the VM's letting go are made under the control lock, together:
    /// a migration that begins once the VM is running again (which it may as soon as the
    /// state says so) holds it only after it was let go, and pauses it itself.
    pub fn resume_here(&self, ticket: MigrationTicket) -> Result<(), SettleError> {
        let resumed = {
            let mut control = self.control();
            self.settle(ticket, Lifecycle::resume_here)?;
            Self::let_go(&mut control).map(drop)
        };
        // Outside the control lock, which the VM's release takes.
        resumed.map_err(|e| SettleError::CannotRun(self.fail_to_run("it was resumed here", &e)))
    }

    /// Makes the settling transition `t` if `ticket` is still the VM's latest migration,
    /// in one critical section with that check (a migration's start takes the same lock).
    fn settle<'a, R>(
        &'a self,
        ticket: MigrationTicket,
        t: impl FnOnce(&'a Lifecycle) -> Result<R, TransitionError>,
    ) -> Result<R, SettleError> {
        let outgoing = self.outgoing();
        if outgoing.as_ref().map(|m| m.ticket) != Some(ticket) {
            return Err(SettleError::Superseded);
        }
        Ok(t(&self.life)?)
    }

    /// Releases a VM that runs on its destination now.
    fn release_left(&self, vacated: Vacated<'_>) {
        // Readers and senders go to the destination now; it has the channel's contents.
        self.readout.channel().detach();
        // Below the VMs: freeing (and zeroing) its memory is not urgent, and it would take
        // the cores from this host's VMs (and, where both ends share them, from this VM's
        // first steps on its destination).
        ferry_vmm::at_background_priority(|| self.release());
        drop(vacated);
    }

    /// Running → stopping → stopped, releasing it.
    pub fn stop(&self) -> Result<(), TransitionError> {
        self.life.stop()?;
        self.release();
        // Released: the room may go back now.
        self.life.finish_stop().map(drop)
    }

    /// Sets the migration throttle (% of the time held paused).
    pub fn set_throttle(&self, pct: u8) {
        self.throttle_pct.store(pct.min(95), Ordering::SeqCst);
    }

    /// Gives the microVM's RAM, device memory and threads back to the host; its record
    /// and console tail stay. Returns once they are freed: the VM's capacity reservation
    /// is dropped after this. Its accelerator's kernel in flight is abandoned, not waited
    /// for (minutes, at worst): the VM ends here (stopped, ended, or run elsewhere now,
    /// which a paused VM's device, at a command boundary, does not notice). Its channel
    /// ends: readers learn so, and requests are refused as for an ended VM (a channel
    /// that a migration's hold paused would otherwise say "retry" for ever); one detached
    /// for the VM's destination stays so.
    fn release(&self) {
        let mut control = self.control();
        let mut vm = control.vm.take();
        let tracker = control.tracker.take();
        control.hold = Hold::Free;
        drop(control);
        // Outside the lock (the VM is taken: nothing else reaches it): a backend that
        // cannot abort waits for its kernel, and freeing gigabytes takes a while.
        if let Some(vm) = vm.as_mut() {
            vm.abort_accel();
            if matches!(vm.run_state(), RunState::Running) {
                let _ = vm.pause();
            }
        }
        drop((vm, tracker));
        self.readout.channel().end();
    }

    /// The guest ended: records how, stops its migration, if any (nothing is left to
    /// send), and releases the VM, then its capacity (once no migration's source maps
    /// its memory: see [`MemoryLoan`]).
    fn end(&self, ended: VmState) {
        if let Ok(vacated) = self.life.end(ended) {
            // The latest migration's token: cancelling one that is over changes nothing.
            if let Some(m) = self.outgoing().as_ref() {
                m.cancel.cancel();
            }
            self.release();
            drop(vacated);
        }
    }

    /// If the guest has ended, records it and releases the VM.
    fn check_end(&self) {
        let mut control = self.control();
        let exit = match (control.hold, control.vm.as_mut()) {
            // Whatever its run state: a throttle's pause that met the guest's end left
            // it ended (not running) with the exit saved, which `wait` returns first; a
            // paused VM gives `None`.
            (Hold::Free, Some(vm)) => vm.wait(Some(Duration::ZERO)),
            _ => None,
        };
        drop(control);
        if let Some(exit) = exit {
            self.end(ended_state(exit));
        }
    }

    /// One throttle duty cycle at `pct`: the VM paused for `pct`% of the period, if it
    /// is being migrated and nobody else holds it.
    fn throttle_cycle(&self, pct: u8) {
        let held_for = THROTTLE_PERIOD * u32::from(pct) / 100;
        {
            let mut control = self.control();
            // Read again under the lock, which an abandon's letting go takes after it set
            // the throttle to 0: a pause after that would have nobody to end it.
            let migrating = matches!(self.state(), VmState::Migrating { .. })
                && self.throttle_pct.load(Ordering::SeqCst) > 0;
            if let (Hold::Free, Some(vm), true) = (control.hold, control.vm.as_mut(), migrating) {
                // Requests keep being taken: the VM runs on here after this pause
                // (a switchover that takes it over refuses them from then on).
                if matches!(vm.run_state(), RunState::Running) {
                    if let Ok(paused) = vm.pause_for_throttle() {
                        control.hold = Hold::Throttle {
                            since: paused.stopped_at,
                        };
                    }
                }
            }
        }
        std::thread::sleep(held_for);
        {
            let mut control = self.control();
            // A switchover that began meanwhile took the pause over: it stays.
            if let Hold::Throttle { .. } = control.hold {
                // A guest that ended in the pause is not `Paused` (its end is noticed
                // by the watcher). One that cannot run again stays held by the
                // throttle, not left paused as if free: the next cycle tries again, a
                // switchover takes the pause over, and a failed migration's abandon
                // ends it as failed if it still cannot run.
                match control.resume_paused() {
                    Ok(()) => {
                        control.hold = Hold::Free;
                        control.throttle_resume_refused = false;
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut control.throttle_resume_refused, true) {
                            tracing::error!(vm = %self.id, "the VM could not run again after a throttle pause (tried again each cycle): {e}");
                        }
                    }
                }
            }
        }
        std::thread::sleep(THROTTLE_PERIOD - held_for);
    }

    /// The watcher: measures the load, runs the throttle duty cycle and notices the end
    /// of the guest, until the VM's life here ends.
    fn watch(self: Arc<Self>) {
        let mut window = (Instant::now(), self.readout.accel_busy_time());
        while self.state().is_live() {
            if window.0.elapsed() >= LOAD_WINDOW {
                let busy = self.readout.accel_busy_time();
                let load = (busy.saturating_sub(window.1)).as_secs_f64()
                    / window.0.elapsed().as_secs_f64();
                self.accel_load
                    .store(load.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
                window = (Instant::now(), busy);
            }
            match self.throttle_pct.load(Ordering::SeqCst) {
                0 => std::thread::sleep(WATCH_PERIOD),
                pct => self.throttle_cycle(pct),
            }
            self.check_end();
        }
        // An ended VM puts no load on the host.
        self.accel_load.store(0f64.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{Amount, Ledger};
    use crate::migration::VmSource;
    use ferry_migrate::{MigrationSource, VmContents};
    use ferry_vmm::HostOptions;

    /// A running `memtouch` VM with `args`, and the ledger it holds room in.
    fn hosted(args: &[&str]) -> (Ledger, Arc<HostedVm>) {
        let (ledger, hosted) = launched(
            args,
            Origin::Created {
                idempotency_key: None,
            },
        );
        (ledger, hosted.unwrap())
    }

    /// [`HostedVm::launch`] of a `memtouch` VM with `args` come as `origin`, and the
    /// ledger it holds room in.
    fn launched(args: &[&str], origin: Origin) -> (Ledger, Result<Arc<HostedVm>, String>) {
        let ledger = Ledger::new(Amount {
            memory: 1 << 30,
            accel: 0,
        });
        let config = VmConfig::new(32 << 20);
        let image = ferry_guest_images::resolve("memtouch").unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let vm = Microvm::boot(config, &image, &args, HostOptions::quiet()).unwrap();
        let reservation = ledger.reserve(Amount::for_vm(config.ram_size, 0)).unwrap();
        let hosted = HostedVm::launch(
            "t-vm1".into(),
            ("memtouch".into(), None),
            args,
            vm,
            origin,
            reservation,
        );
        (ledger, hosted)
    }

    fn status(to: &str) -> MigrationStatus {
        MigrationStatus {
            vm: "t-vm1".into(),
            to: to.into(),
            state: MigrationState::Running,
            progress: None,
            report: None,
            error: None,
            settlement: Vec::new(),
        }
    }

    /// A `memtouch` VM with `args` whose migration to `b:1` began with `cancel`, and the
    /// migration's source of it; `None` (said loudly) without KVM.
    fn migrating(
        test: &str,
        args: &[&str],
        cancel: CancelToken,
    ) -> Option<(Ledger, Arc<HostedVm>, VmSource)> {
        if !ferry_testdata::kvm(test) {
            return None;
        }
        let (ledger, vm) = hosted(args);
        vm.begin_migration("b:1", status("b:1"), cancel)
            .expect("the guest ran long enough to be migrated");
        let source = VmSource::new(vm.clone(), "h", "test").expect("the VM runs");
        Some((ledger, vm, source))
    }

    /// Waits up to 60 s for `vm`'s life here to end (a guest that finishes its work,
    /// beside other tests on two cores, may take several).
    fn ended(vm: &HostedVm) -> VmState {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !vm.state().has_ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        vm.state()
    }

    #[test]
    fn a_guest_that_ends_while_the_throttle_pauses_it_is_seen_to_end() {
        if !ferry_testdata::kvm("a_guest_that_ends_while_the_throttle_pauses_it_is_seen_to_end") {
            return;
        }
        // The pause must find the guest ending, not ended (its vCPU thread gone, which
        // `wait` sees): step it to its end one exit at a time, each step a resume and at
        // once a pause, which the vCPU thread answers after that one exit. Many tries (a
        // few ms each), as on a loaded machine a step often outruns its pause.
        for _ in 0..50 {
            let (ledger, vm) = hosted(&["--mib", "1", "--passes", "1"]);
            let recorded = {
                // Under the control lock, as the throttle pauses: the watcher waits.
                let mut control = vm.control();
                let microvm = control.vm.as_mut().unwrap();
                let mut steps = 0;
                while microvm.pause().is_ok() {
                    steps += 1;
                    assert!(steps < 1_000_000, "the guest did not end");
                    microvm.resume().unwrap();
                }
                matches!(microvm.run_state(), RunState::Exited(0))
            };
            // Either way the watcher sees the end, and has released the VM when it ends.
            assert_eq!(ended(&vm), VmState::Exited { code: 0 });
            vm.join_watcher();
            assert_eq!(ledger.held().memory, 0);
            if recorded {
                return;
            }
        }
        panic!("no pause met the guest's end in 50 tries");
    }

    #[test]
    fn a_guest_that_ends_during_its_migration_holds_its_memory_until_the_source_lets_go() {
        // A guest that ends on its own a moment after its migration began.
        let cancel = CancelToken::default();
        let Some((ledger, vm, source)) = migrating(
            "a_guest_that_ends_during_its_migration_holds_its_memory_until_the_source_lets_go",
            &["--mib", "4", "--passes", "200"],
            cancel.clone(),
        ) else {
            return;
        };
        assert_eq!(ended(&vm), VmState::Exited { code: 0 });
        // Its watcher, which saw the end, ends once it released the VM.
        vm.join_watcher();
        assert!(cancel.is_cancelled(), "the migration of an ended VM stops");
        // Released, but its memory is still mapped (and read) by the source: the room
        // is not promised to another VM yet.
        assert!(vm.with_vm(|_| ()).is_none());
        let mut page = [0u8; 4096];
        source.read_ram(0, &mut page).unwrap();
        assert_eq!(ledger.held().memory, 32 << 20);
        // Nor is it lent again.
        assert!(VmSource::new(vm.clone(), "h", "test").is_none());
        drop(source);
        assert_eq!(ledger.held().memory, 0);
    }

    #[test]
    fn an_arrived_vm_runs_on_without_its_watcher_whatever_its_source_said_and_a_created_one_does_not(
    ) {
        if !ferry_testdata::kvm(
            "an_arrived_vm_runs_on_without_its_watcher_whatever_its_source_said_and_a_created_one_does_not",
        ) {
            return;
        }
        let args = ["--mib", "1", "--passes", "1000000"];
        // Its source did not name itself: it arrived all the same, and is the only copy.
        FAIL_NEXT_WATCHER.set(true);
        let (ledger, arrived) = launched(
            &args,
            Origin::Migrated {
                from: None,
                idempotency_key: None,
            },
        );
        let arrived = arrived.expect("an arrived VM is kept");
        assert_eq!(arrived.state(), VmState::Running);
        assert_eq!(arrived.summary().migrated_from, None);
        arrived.stop().unwrap();
        assert_eq!(ledger.held().memory, 0);
        // One created here is not started unwatched: nothing is lost.
        FAIL_NEXT_WATCHER.set(true);
        let (ledger, created) = launched(
            &args,
            Origin::Created {
                idempotency_key: None,
            },
        );
        let refused = created
            .err()
            .expect("a created VM is not started unwatched");
        assert!(refused.contains("watcher"), "{refused}");
        assert_eq!(ledger.held().memory, 0);
    }

    /// Whether the throttle holds `vm` paused at some moment within 2 s.
    fn throttled(vm: &HostedVm) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(vm.control().hold, Hold::Throttle { .. }) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits up to 5 s for `done(vm)`.
    fn soon(vm: &HostedVm, done: impl Fn(&HostedVm) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(vm) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    #[test]
    fn a_vm_that_cannot_run_after_a_throttle_pause_stays_held_until_it_runs_or_fails() {
        let Some((ledger, vm, source)) = migrating(
            "a_vm_that_cannot_run_after_a_throttle_pause_stays_held_until_it_runs_or_fails",
            &["--mib", "1", "--passes", "1000000"],
            CancelToken::default(),
        ) else {
            return;
        };
        // One resume refused: the next cycle's runs it, and the throttle lets it go.
        vm.control().resumes_to_fail = 1;
        vm.set_throttle(50);
        assert!(soon(&vm, |vm| vm.control().resumes_to_fail == 0));
        let runs_free = |vm: &HostedVm| {
            let mut control = vm.control();
            let running = matches!(
                control.vm.as_mut().map(|v| v.run_state()),
                Some(RunState::Running)
            );
            running && matches!(control.hold, Hold::Free)
        };
        assert!(soon(&vm, runs_free), "left paused, as if nobody held it");
        // Every resume refused: still held when its migration fails, it ends as failed
        // (not listed running while paused for good), and its room goes back.
        vm.control().resumes_to_fail = u32::MAX;
        vm.set_throttle(50);
        assert!(soon(&vm, |vm| vm.control().resumes_to_fail < u32::MAX));
        let error = vm.abandon_migration().unwrap_err();
        assert!(error.contains("cannot run again"), "{error}");
        assert!(
            matches!(vm.state(), VmState::Failed { .. }),
            "{}",
            vm.state()
        );
        drop(source);
        vm.join_watcher();
        assert_eq!(ledger.held().memory, 0);
    }

    #[test]
    fn a_migration_whose_thread_panicked_runs_the_vm_on_before_its_switchover_and_leaves_it_in_doubt_after(
    ) {
        if !ferry_testdata::kvm(
            "a_migration_whose_thread_panicked_runs_the_vm_on_before_its_switchover_and_leaves_it_in_doubt_after",
        ) {
            return;
        }
        let (_ledger, vm) = hosted(&["--mib", "1", "--passes", "1000000"]);
        let first = vm
            .begin_migration("b:1", status("b:1"), CancelToken::default())
            .unwrap();
        vm.migration_panicked(first, "boom");
        assert_eq!(vm.state(), VmState::Running);
        let failed = vm.migration().unwrap();
        assert_eq!(failed.state, MigrationState::Failed);
        assert!(failed.error.unwrap().contains("panicked: boom"));
        // In its switchover, Go may have been sent: in doubt, not resumed.
        let second = vm
            .begin_migration("c:1", status("c:1"), CancelToken::default())
            .unwrap();
        vm.hold().unwrap();
        // The first's late word changes nothing of the second's.
        vm.migration_panicked(first, "late");
        assert_eq!(vm.state(), VmState::Switchover { to: "c:1".into() });
        vm.migration_panicked(second, "boom");
        assert!(
            matches!(vm.state(), VmState::InDoubt { .. }),
            "{}",
            vm.state()
        );
        assert_eq!(vm.migration().unwrap().state, MigrationState::InDoubt);
        assert_eq!(
            vm.with_vm(|v| matches!(v.run_state(), RunState::Paused)),
            Some(true)
        );
        vm.resume_here(second).unwrap();
        // A switchover that never held it (its pause failed): Go was never sent.
        let third = vm
            .begin_migration("d:1", status("d:1"), CancelToken::default())
            .unwrap();
        vm.control().vm.as_mut().unwrap().pause().unwrap();
        assert!(vm.hold().is_err());
        vm.migration_panicked(third, "boom");
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!(vm.migration().unwrap().state, MigrationState::Failed);
        vm.control().vm.as_mut().unwrap().resume().unwrap();
        vm.stop().unwrap();
    }

    #[test]
    fn a_switchover_whose_pause_fails_stays_its_migrations_until_that_one_abandons() {
        let Some((_ledger, vm, _source)) = migrating(
            "a_switchover_whose_pause_fails_stays_its_migrations_until_that_one_abandons",
            &["--mib", "1", "--passes", "1000000"],
            CancelToken::default(),
        ) else {
            return;
        };
        // Paused by another hand: the switchover's own pause fails.
        vm.control().vm.as_mut().unwrap().pause().unwrap();
        assert!(vm.hold().is_err());
        // Not running again before this migration's abandon, so no other migration
        // begins that the abandon would undo.
        assert_eq!(vm.state(), VmState::Switchover { to: "b:1".into() });
        let refused = vm.begin_migration("c:1", status("c:1"), CancelToken::default());
        assert!(refused.is_err());
        vm.abandon_migration().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        vm.control().vm.as_mut().unwrap().resume().unwrap();
        vm.stop().unwrap();
    }

    #[test]
    fn a_switchover_that_gives_way_before_go_goes_back_to_migrating_throttled_and_pauses_again() {
        // As the engine does when a replay's tail cannot be sent in the pause: it resumes
        // the VM, pre-copies (throttled), then pauses it again for the switchover.
        let Some((ledger, vm, source)) = migrating(
            "a_switchover_that_gives_way_before_go_goes_back_to_migrating_throttled_and_pauses_again",
            &["--mib", "1", "--passes", "1000000"],
            CancelToken::default(),
        ) else {
            return;
        };
        let migrating = VmState::Migrating { to: "b:1".into() };
        let running = || vm.with_vm(|v| matches!(v.run_state(), RunState::Running));
        source.pause().unwrap();
        assert_eq!(vm.state(), VmState::Switchover { to: "b:1".into() });
        assert_eq!(running(), Some(false));
        source.resume().unwrap();
        assert_eq!(vm.state(), migrating, "resumed before Go: migrating again");
        assert_eq!(running(), Some(true));
        // Its pre-copy is throttled again.
        source.set_throttle(50);
        assert!(throttled(&vm), "the throttle never paused the VM");
        // And the next switchover holds it (taking over a throttle's pause).
        source.pause().expect("a second pause for the switchover");
        assert_eq!(vm.state(), VmState::Switchover { to: "b:1".into() });
        assert_eq!(running(), Some(false));
        // That one fails before Go: resumed (twice, as the engine may), then abandoned.
        source.resume().unwrap();
        source.resume().unwrap();
        assert_eq!(vm.state(), migrating);
        vm.abandon_migration().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!(running(), Some(true));
        drop(source);
        vm.stop().unwrap();
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }

    /// Whether `vm`'s accelerator runs a MATMUL now: the command at its ring's tail
    /// (submitted, not completed).
    fn in_matmul(vm: &HostedVm) -> bool {
        use ferry_abi::accel::{kernel, op, RingHeader};
        use ferry_abi::{BootInfo, BOOT_INFO_ADDR};
        use vm_memory::{Bytes, GuestAddress};
        vm.with_vm(|v| {
            let mem = v.memory();
            let at = |base: u64, offset: usize| GuestAddress(base + offset as u64);
            let ring: u64 = mem
                .read_obj(at(
                    BOOT_INFO_ADDR,
                    std::mem::offset_of!(BootInfo, accel_ring),
                ))
                .unwrap();
            let tail: u64 = mem
                .read_obj(at(ring, std::mem::offset_of!(RingHeader, tail)))
                .unwrap();
            let ring = ferry_accel::ring::Ring::at(ring);
            ring.head(mem).unwrap() > tail
                && ring
                    .command(mem, tail)
                    .is_ok_and(|c| c.opcode == op::LAUNCH && c.args[0] == kernel::MATMUL)
        })
        .unwrap_or(false)
    }

    #[test]
    fn a_stop_abandons_the_kernel_in_flight_instead_of_waiting_for_it() {
        if !ferry_testdata::kvm("a_stop_abandons_the_kernel_in_flight_instead_of_waiting_for_it") {
            return;
        }
        // mlp-train labels its dataset with one MATMUL, here 8192 x 8192 by 8192 x 8192
        // (768 MiB of device memory): about 13 s on the 2 threads of the machine this was
        // written on, where a stop that waited for it took 12.6 s and 13.1 s, and one
        // that abandons it 0.4 s.
        let n = "8192";
        let args: Vec<String> = [
            "--samples",
            n,
            "--inputs",
            n,
            "--classes",
            n,
            "--batch",
            "64",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--steps",
            "1",
        ]
        .map(String::from)
        .to_vec();
        let config = VmConfig::new(64 << 20).with_accel(800 << 20);
        let ledger = Ledger::new(Amount {
            memory: 1 << 30,
            accel: 1 << 30,
        });
        let image = ferry_guest_images::resolve("mlp-train").unwrap();
        let microvm = Microvm::boot(config, &image, &args, HostOptions::quiet()).unwrap();
        let reservation = ledger
            .reserve(Amount::for_vm(config.ram_size, config.accel_memory))
            .unwrap();
        let vm = HostedVm::launch(
            "t-vm1".into(),
            ("mlp-train".into(), None),
            args,
            microvm,
            Origin::Created {
                idempotency_key: None,
            },
            reservation,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !in_matmul(&vm) {
            assert!(Instant::now() < deadline, "the guest never ran its MATMUL");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(in_matmul(&vm), "the MATMUL ended in 100 ms");
        let started = Instant::now();
        vm.stop().unwrap();
        let took = started.elapsed();
        eprintln!("stopped in {took:?} during the MATMUL");
        assert!(
            took < Duration::from_secs(3),
            "the stop took {took:?}: it waited for the kernel"
        );
        assert_eq!(vm.state(), VmState::Stopped);
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }

    #[test]
    fn a_vm_that_cannot_run_after_its_migration_ends_its_channel_too() {
        if !ferry_testdata::kvm("a_vm_that_cannot_run_after_its_migration_ends_its_channel_too") {
            return;
        }
        use ferry_vmm::devices::channel::{Message, SubmitError};
        let (ledger, vm) = hosted(&["--mib", "1", "--passes", "1000000"]);
        vm.begin_migration("b:1", status("b:1"), CancelToken::default())
            .unwrap();
        vm.hold().unwrap();
        let request = || {
            vm.channel().submit(
                1,
                Message {
                    kind: 1,
                    payload: Vec::new(),
                },
            )
        };
        assert_eq!(request(), Err(SubmitError::Paused));
        // Its resume failed (as a torn accelerator's does): it ends as failed.
        let why = VmError::Resume("the accelerator is torn (test)".into());
        vm.fail_to_run("its migration failed", &why);
        assert_eq!(vm.state().name(), "failed");
        // Clients are told it ended, not to try again shortly, for ever.
        assert_eq!(request(), Err(SubmitError::Ended));
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }

    #[test]
    fn an_earlier_migration_never_updates_nor_settles_a_later_one() {
        if !ferry_testdata::kvm("an_earlier_migration_never_updates_nor_settles_a_later_one") {
            return;
        }
        let (ledger, vm) = hosted(&["--mib", "1", "--passes", "1000000"]);
        let first_cancel = CancelToken::default();
        let first = vm
            .begin_migration("b:1", status("b:1"), first_cancel.clone())
            .unwrap();
        vm.abandon_migration().unwrap();
        let second_cancel = CancelToken::default();
        let second = vm
            .begin_migration("c:1", status("c:1"), second_cancel.clone())
            .unwrap();
        assert_ne!(first, second);
        // The first migration's thread records its end after the second began.
        vm.update_migration(first, |s| s.state = MigrationState::Failed);
        let shown = vm.migration().unwrap();
        assert_eq!(
            (shown.to.as_str(), shown.state),
            ("c:1", MigrationState::Running)
        );
        vm.cancel_migration().unwrap();
        assert!(second_cancel.is_cancelled() && !first_cancel.is_cancelled());
        // In doubt about the second: a settlement of the first changes nothing.
        vm.hold().unwrap();
        vm.lose_confirmation("timed out").unwrap();
        for settle in [HostedVm::resume_here, HostedVm::release_in_doubt] {
            let refused = settle(&vm, first).unwrap_err();
            assert!(matches!(refused, SettleError::Superseded), "{refused}");
        }
        assert_eq!(vm.state().name(), "in-doubt");
        vm.resume_here(second).unwrap();
        assert_eq!(vm.state(), VmState::Running);
        vm.stop().unwrap();
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }
    #[test]
    fn the_console_tail_shown_is_bounded_in_bytes_too() {
        // A guest that prints junk without line breaks: no line cut helps.
        let junk = "\x01".repeat(64 << 10);
        let tail = console_tail(&junk);
        assert_eq!(tail.len(), TAIL_BYTES);
        assert!(junk.ends_with(tail));
        // What a listing carries of it, escaped: bounded too.
        let escaped = serde_json::to_string(tail).unwrap();
        assert!(escaped.len() <= 6 * TAIL_BYTES + 2, "{}", escaped.len());
        // Cut at a character's boundary, whatever the characters.
        for odd in ["", "x", "xy"] {
            let wide = format!("{odd}{}", "\u{e9}\u{20ac}\u{1f600}".repeat(8 << 10));
            let tail = console_tail(&wide);
            assert!(tail.len() <= TAIL_BYTES && tail.len() > TAIL_BYTES - 4);
            assert!(wide.ends_with(tail));
        }
        // Junk and then lines: from the first whole line in the bound.
        let ended = format!("{junk}\nchecksum=abc\n");
        assert_eq!(console_tail(&ended), "checksum=abc\n");
        let long_lines: String = (0..40)
            .map(|i| format!("{i:03}{}\n", "-".repeat(196)))
            .collect();
        let from_20 = long_lines.find("020").unwrap();
        assert_eq!(console_tail(&long_lines), &long_lines[from_20..]);
        // A cut that falls at a line's start keeps that line.
        let exact: String = (0..64)
            .map(|i| format!("{i:03}{}\n", "-".repeat(124)))
            .collect();
        assert!(console_tail(&exact).starts_with("032"));
        // The last 40 lines of short ones, as before; a short console whole.
        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = console_tail(&lines);
        assert_eq!(tail.lines().count(), 40);
        assert!(tail.starts_with("line 60\n") && tail.ends_with("line 99\n"));
        assert_eq!(console_tail("hello\nwor"), "hello\nwor");
        assert_eq!(console_tail(""), "");
    }

    /// Whether `vm`'s microVM is running (`Some(false)`: paused, or ended).
    fn running(vm: &HostedVm) -> Option<bool> {
        vm.with_vm(|v| matches!(v.run_state(), RunState::Running))
    }

    #[test]
    fn a_vm_resumed_from_doubt_runs_again_before_another_migration_can_hold_it() {
        if !ferry_testdata::kvm(
            "a_vm_resumed_from_doubt_runs_again_before_another_migration_can_hold_it",
        ) {
            return;
        }
        let (ledger, vm) = hosted(&["--mib", "1", "--passes", "1000000"]);
        let first = vm
            .begin_migration("b:1", status("b:1"), CancelToken::default())
            .unwrap();
        vm.hold().unwrap();
        vm.lose_confirmation("timed out").unwrap();
        // The settlement finds the control lock taken (as by a kernel in flight): it
        // does not say the VM runs before it was let go, so no migration begins, and
        // none can take the switchover's pause over to copy a VM about to run.
        let control = vm.control();
        let settling = {
            let vm = vm.clone();
            std::thread::spawn(move || vm.resume_here(first))
        };
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            assert_eq!(vm.state().name(), "in-doubt");
            let refused = vm
                .begin_migration("c:1", status("c:1"), CancelToken::default())
                .unwrap_err();
            assert_eq!(refused.transition, crate::lifecycle::Transition::Migrate);
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(control);
        settling.join().unwrap().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!(running(&vm), Some(true));
        // The next migration's switchover pauses the VM itself.
        vm.begin_migration("c:1", status("c:1"), CancelToken::default())
            .unwrap();
        vm.hold().unwrap();
        assert_eq!(running(&vm), Some(false));
        vm.abandon_migration().unwrap();
        assert_eq!(running(&vm), Some(true));
        vm.stop().unwrap();
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }

    #[test]
    fn a_switchover_never_takes_over_a_hold_left_by_another() {
        if !ferry_testdata::kvm("a_switchover_never_takes_over_a_hold_left_by_another") {
            return;
        }
        let (ledger, vm) = hosted(&["--mib", "1", "--passes", "1000000"]);
        vm.begin_migration("b:1", status("b:1"), CancelToken::default())
            .unwrap();
        vm.hold().unwrap();
        vm.lose_confirmation("timed out").unwrap();
        // Running again by its state, its in-doubt pause not yet let go (as a
        // settlement that let go after its transition once left it): a migration begins.
        vm.life.resume_here().unwrap();
        vm.begin_migration("c:1", status("c:1"), CancelToken::default())
            .unwrap();
        let refused = vm.hold().unwrap_err();
        assert!(matches!(refused, VmError::Pause(_)), "{refused}");
        assert_eq!(vm.state(), VmState::Migrating { to: "c:1".into() });
        // The migration fails: its abandon lets the VM go, paused for nobody no more.
        vm.abandon_migration().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!(running(&vm), Some(true));
        assert!(matches!(vm.control().hold, Hold::Free));
        vm.stop().unwrap();
        assert_eq!(ledger.held().memory, 0);
        vm.join_watcher();
    }
}
