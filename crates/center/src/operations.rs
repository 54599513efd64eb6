//! What the center does to the cluster: live migrations it orders through the hosts'
//! APIs (each one verified on the destination), host maintenance (evacuation) and
//! balancing. One operation runs at a time, so two plans never count on the same room.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::VmInfo;
use ferry_api::VmState;
use ferry_api::{MigrationState, MigrationStatus};
use ferry_migrate::MigrationReport;
use serde::{Deserialize, Serialize};

use crate::balance::{self, BalancePlan, MovableVm, PlannedMove};
use crate::inventory::{
    check_vm_report, unix_ms, Event, Hold, HostMode, Inventory, MigrationRecord, Reservation,
    VmRecord,
};
use crate::placement::{self, Need};
use crate::store::StoreError;
use crate::{Center, CenterError, ForgottenHost};

/// How often a running migration's progress is polled.
const POLL: Duration = Duration::from_millis(100);
/// How long the source may be unreachable before the center gives up following it.
const LOST_CONTACT: Duration = Duration::from_secs(15);
/// How long a VM that moved is left out of balance plans: its load, sampled over a
/// second, moved with it, and a bursty one would otherwise go back and forth between
/// hosts, a balance after another.
pub const SETTLING_AFTER_A_MOVE: Duration = Duration::from_secs(600);
/// Longest a move's migration is followed while its source says it runs: far past any
/// migration's own bounds (its pre-copy gives up within minutes), so only a host that
/// says so for ever is given up on, and the operations behind it run.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(3600);
/// How often a VM left in doubt by its move is looked at until its source settles it.
const SETTLE_POLL: Duration = Duration::from_secs(1);
/// How long the center follows a VM left in doubt: past the ten minutes a source keeps
/// asking its destination before it leaves the VM to `ferry vm resolve`.
const SETTLE_PATIENCE: Duration = Duration::from_secs(11 * 60);
/// How long a source that shows no migration of a move whose order may have reached it is
/// asked again before the move is taken as never started: the order may still be taking
/// effect there.
const ORDER_GRACE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(3)
};

/// Why a move the center ordered did not end with the VM verified on its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MoveFailure {
    /// The VM stays on its source, where it runs as before.
    Stayed(String),
    /// Where the VM runs is not known (its confirmation was lost and not yet settled, or
    /// the source could not be reached): the operator looks.
    Unsettled(String),
}

impl MoveFailure {
    /// What went wrong.
    pub(crate) fn text(&self) -> &str {
        match self {
            Self::Stayed(why) | Self::Unsettled(why) => why,
        }
    }
}

impl From<String> for MoveFailure {
    fn from(why: String) -> Self {
        Self::Stayed(why)
    }
}

/// A long action of the center (maintenance, balancing), followed by polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Id.
    pub id: u64,
    /// What it does.
    pub kind: OperationKind,
    /// Host it is about, for maintenance.
    pub host: Option<String>,
    /// Where it is.
    pub state: OperationState,
    /// Started, ms since the epoch.
    pub started_ms: u64,
    /// Ended.
    pub finished_ms: Option<u64>,
    /// Moves planned: VM, from, to.
    pub planned: Vec<(String, String, String)>,
    /// Migrations started (ids in the history).
    pub migrations: Vec<i64>,
    /// What went wrong, per VM.
    pub problems: Vec<String>,
    /// The outcome in words.
    pub summary: String,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    /// Empties a host for maintenance.
    Maintenance,
    /// Moves VMs to even out the hosts' load.
    Balance,
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Maintenance => "maintenance",
            Self::Balance => "balance",
        })
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperationState {
    /// Its moves are under way.
    Running,
    /// Everything worked.
    Done,
    /// It ended with something left undone (see its problems and summary).
    Incomplete,
}

/// Most operations the center keeps in memory (`GET /v1/operations` lists the newest).
pub const OPERATIONS_KEPT: usize = 1_000;

/// Forgets the oldest ended operations beyond [`OPERATIONS_KEPT`], so a center that runs
/// for months stays bounded; a running one always stays. Returns the ids forgotten.
pub(crate) fn keep_newest(ops: &mut std::collections::BTreeMap<u64, Operation>) -> Vec<u64> {
    let mut forgotten = Vec::new();
    while ops.len() > OPERATIONS_KEPT {
        let Some(oldest) = ops
            .iter()
            .find(|(_, o)| o.state != OperationState::Running)
            .map(|(&id, _)| id)
        else {
            break;
        };
        ops.remove(&oldest);
        forgotten.push(oldest);
    }
    forgotten
}

/// A move to make: the VM, where it is and where it goes; and the holding of its room on
/// the destination, which only this move gives back.
#[derive(Debug, Clone)]
struct Move {
    vm: VmRecord,
    to: String,
    hold: Hold,
}

/// What `POST /v1/balance` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalanceOutcome {
    /// The plan.
    pub plan: BalancePlan,
    /// The operation carrying it out (none for a dry run or an empty plan).
    pub operation: Option<Operation>,
}

impl Center {
    /// Recent operations, newest first.
    pub fn operations(&self, n: usize) -> Vec<Operation> {
        let ops = self.operations.lock().expect("operations lock");
        ops.values().rev().take(n).cloned().collect()
    }

    /// One operation.
    pub fn operation(&self, id: u64) -> Result<Operation, CenterError> {
        self.operations
            .lock()
            .expect("operations lock")
            .get(&id)
            .cloned()
            .ok_or_else(|| CenterError::NotFound(format!("no operation {id}")))
    }

    /// Changes an operation and writes it through, so the next leader can resume it.
    fn update_operation(&self, id: u64, f: impl FnOnce(&mut Operation)) {
        let op = {
            let mut ops = self.operations.lock().expect("operations lock");
            let Some(op) = ops.get_mut(&id) else { return };
            f(op);
            op.clone()
        };
        self.write_operation(op);
    }

    /// Writes `op` through. An operation has one writer at a time: two writes of one
    /// record can land in either order, and the store would keep the older. A write made
    /// while another is in flight is left to that writer, which writes the record again
    /// as long as it changed meanwhile. One whose write failed is written again by the
    /// monitor ([`Self::rewrite_operations`]): else the store could say running, for
    /// followers and the next leader, an operation that ended.
    fn write_operation(&self, mut op: Operation) {
        if !(self.operation_writes.lock().expect("writes lock"))
            .writing
            .insert(op.id)
        {
            return;
        }
        loop {
            let written = match self.store().put_operation(&op) {
                Ok(()) => Ok(()),
                // No longer the leader: the next one resumes the operation from its record.
                Err(StoreError::NotLeader) => Err(false),
                Err(e) => {
                    tracing::error!("recording operation {}: {e}; it is written again", op.id);
                    Err(true)
                }
            };
            // The writer lets go under the operations' lock: an update after this check
            // finds no writer, and writes itself.
            let ops = self.operations.lock().expect("operations lock");
            let mut writes = self.operation_writes.lock().expect("writes lock");
            match (written, ops.get(&op.id)) {
                (Ok(()), Some(now)) if *now != op => {
                    op = now.clone();
                    continue;
                }
                (Ok(()), _) => {
                    writes.unwritten.remove(&op.id);
                }
                (Err(true), Some(_)) => {
                    writes.unwritten.insert(op.id);
                }
                (Err(_), _) => {}
            }
            writes.writing.remove(&op.id);
            return;
        }
    }

    /// Writes again, as they are now, the operations whose last write failed; run
    /// periodically by the monitor while this replica leads.
    pub(crate) fn rewrite_operations(&self) {
        if !self.is_leader() {
            return;
        }
        let ids =
            std::mem::take(&mut (self.operation_writes.lock().expect("writes lock")).unwritten);
        for id in ids {
            let op = self
                .operations
                .lock()
                .expect("operations lock")
                .get(&id)
                .cloned();
            if let Some(op) = op {
                self.write_operation(op);
            }
        }
    }

    /// Writes again, as they are now, the migrations whose end the store missed; run
    /// periodically by the monitor while this replica leads.
    pub(crate) fn rewrite_migrations(&self) {
        if !self.is_leader() {
            return;
        }
        let ids = std::mem::take(&mut *self.unwritten_migrations.lock().expect("unwritten lock"));
        for id in ids {
            let record = (self.inventory().migrations.iter())
                .find(|m| m.id == id)
                .cloned();
            // Forgotten since (too old to keep): nothing to write.
            let Some(record) = record else { continue };
            match self.store().put_migration(&record) {
                Ok(()) | Err(StoreError::NotLeader) => {}
                Err(e) => {
                    tracing::debug!("recording migration {id} again: {e}");
                    (self.unwritten_migrations.lock().expect("unwritten lock")).insert(id);
                }
            }
        }
    }

    /// Whether a maintenance operation of `host` runs now. A host's mode can say
    /// `Evacuating` after its operation ended, if the mode's last write failed: the
    /// operation, not the mode, decides, so such a host can be put back in service.
    fn evacuating_now(&self, host: &str) -> bool {
        self.operations
            .lock()
            .expect("operations lock")
            .values()
            .any(|o| {
                o.state == OperationState::Running
                    && o.kind == OperationKind::Maintenance
                    && o.host.as_deref() == Some(host)
            })
    }

    /// Registers a new operation, unless one is running; the oldest beyond
    /// [`OPERATIONS_KEPT`] are forgotten here.
    fn begin_operation(
        &self,
        kind: OperationKind,
        host: Option<&str>,
        planned: &[Move],
    ) -> Result<Operation, CenterError> {
        if !self.is_leader() {
            return Err(StoreError::NotLeader.into());
        }
        let mut ops = self.operations.lock().expect("operations lock");
        if let Some(running) = ops.values().find(|op| op.state == OperationState::Running) {
            return Err(CenterError::Conflict(format!(
                "operation {} ({}{}) is still running; wait for it to end",
                running.id,
                running.kind,
                running
                    .host
                    .as_deref()
                    .map(|h| format!(" of {h}"))
                    .unwrap_or_default()
            )));
        }
        let last = ops.keys().next_back().copied().unwrap_or(0);
        let id = (last.checked_add(1))
            .filter(|&id| id < crate::store::OPERATION_IDS_END)
            .ok_or_else(|| {
                CenterError::Unavailable(format!(
                    "operation ids are used up (the last is {last}): forget old operations first"
                ))
            })?;
        let op = Operation {
            id,
            kind,
            host: host.map(str::to_string),
            state: OperationState::Running,
            started_ms: unix_ms(),
            finished_ms: None,
            planned: planned
                .iter()
                .map(|m| (m.vm.id.clone(), m.vm.host.clone(), m.to.clone()))
                .collect(),
            migrations: Vec::new(),
            problems: Vec::new(),
            summary: String::new(),
        };
        ops.insert(op.id, op.clone());
        // Written without the lock (no I/O under it): a second operation meanwhile sees
        // this one running and is refused.
        drop(ops);
        if let Err(e) = self.store().put_operation(&op) {
            self.operations
                .lock()
                .expect("operations lock")
                .remove(&op.id);
            return Err(e.into());
        }
        // Only once the new one is stored: a failed start forgets nothing.
        let forgotten = keep_newest(&mut self.operations.lock().expect("operations lock"));
        if let Err(e) = self.store().forget_operations(&forgotten) {
            tracing::warn!("deleting the records of forgotten operations: {e}");
        }
        Ok(op)
    }

    /// Gives back the room held for `moves` (those that ran gave theirs back already).
    fn release_room(&self, moves: &[Move]) {
        self.inventory()
            .reservations
            .retain(|r| !moves.iter().any(|m| r.hold == m.hold));
    }

    /// Begins an operation of `kind` (of `host`) for `moves`, whose room is held: the term
    /// it leads in and the operation; or, given their room back, why it cannot begin.
    fn begin_holding(
        &self,
        kind: OperationKind,
        host: Option<&str>,
        moves: &[Move],
    ) -> Result<(u64, Operation), CenterError> {
        let begun = (self.term().ok_or(CenterError::from(StoreError::NotLeader)))
            .and_then(|term| Ok((term, self.begin_operation(kind, host, moves)?)));
        begun.inspect_err(|_| self.release_room(moves))
    }

    /// Holds room on each move's destination until the move ends.
    fn reserve(&self, moves: &[Move]) {
        hold_room(&mut self.inventory(), moves);
    }

    /// Live-migrates `m.vm` to `m.to` through the source host's API, follows it, and
    /// checks the VM runs on the destination. Returns the migration's record.
    /// Ordered only while this replica leads in `term`, the one the move was planned in.
    fn move_vm(&self, m: &Move, reason: &str, op: u64, term: u64) -> MigrationRecord {
        let mut record = MigrationRecord {
            vm: m.vm.id.clone(),
            from: m.vm.host.clone(),
            to: m.to.clone(),
            reason: reason.into(),
            state: MigrationState::Running,
            started_ms: unix_ms(),
            ..MigrationRecord::default()
        };
        // Recorded (fenced by the leadership) before the source is told: a next leader
        // finds every migration that may be running, and a deposed one starts none.
        if let Err(e) = self.record_migration(&mut record) {
            self.release_room(std::slice::from_ref(m));
            record.state = MigrationState::Failed;
            record.error = Some(e.to_string());
            return record;
        }
        let _in_progress = self.metrics().migration_started();
        self.update_operation(op, |o| o.migrations.push(record.id));
        let outcome = self.follow_migration(m, record.id, term);
        self.conclude_migration(&m.vm.id, &m.to, Some(m.hold), record.id, reason, outcome)
    }

    /// Records a new migration, in the store first (so a next leader finds it) and then
    /// in memory, and deletes from the store the old ones memory forgets.
    fn record_migration(&self, record: &mut MigrationRecord) -> Result<(), StoreError> {
        record.id = self.store().add_migration(record)?;
        let forgotten = self.inventory().add_migration(record.clone());
        if let Err(e) = self.store().forget_migrations(&forgotten) {
            tracing::warn!("deleting the records of forgotten migrations: {e}");
        }
        Ok(())
    }

    /// Records how migration `id` of VM `vm` to host `to` ended, and where the VM runs
    /// now; gives back the room it held (`hold`) in the same step.
    fn conclude_migration(
        &self,
        vm: &str,
        to: &str,
        hold: Option<Hold>,
        id: i64,
        reason: &str,
        outcome: Result<(Option<MigrationReport>, VmInfo), MoveFailure>,
    ) -> MigrationRecord {
        let mut inventory = self.inventory();
        inventory.reservations.retain(|r| Some(r.hold) != hold);
        let Some(entry) = inventory.migration_mut(id) else {
            return MigrationRecord::default();
        };
        entry.finished_ms = Some(unix_ms());
        entry.progress = None;
        let arrived = match outcome {
            Ok((report, arrived)) => {
                entry.state = MigrationState::Succeeded;
                if let Some(report) = report {
                    entry.downtime_ms = Some(report.downtime_ms);
                    entry.total_ms = Some(report.total_ms);
                    entry.bytes_sent = report.bytes_sent;
                    entry.rounds = report.rounds;
                }
                Some(arrived)
            }
            Err(failure) => {
                entry.state = match failure {
                    MoveFailure::Stayed(_) => MigrationState::Failed,
                    MoveFailure::Unsettled(_) => MigrationState::InDoubt,
                };
                entry.error = Some(failure.text().to_string());
                None
            }
        };
        let record = entry.clone();
        self.metrics().count_finished(&record);
        // Bounded as the destination's beats are (what is not kept, its next beat tells).
        let moved = arrived.and_then(|mut info| match check_vm_report(&mut info) {
            Ok(()) => Some(VmRecord {
                id: vm.to_string(),
                ..VmRecord::new(to, info)
            }),
            Err(e) => {
                tracing::warn!("host {to}'s report of VM {vm}, moved there, is not kept: {e}");
                None
            }
        });
        if let Some(vm) = &moved {
            inventory.put_vm_placed(vm.clone());
        }
        drop(inventory);
        let message = match (&record.error, record.downtime_ms) {
            (None, pause) => format!(
                "VM {} moved {} -> {} ({reason}): pause {}, {} MiB in {} round(s)",
                record.vm,
                record.from,
                record.to,
                pause.map_or("unknown".into(), |p| format!("{p:.1} ms")),
                record.bytes_sent >> 20,
                record.rounds
            ),
            (Some(error), _) if record.state == MigrationState::InDoubt => format!(
                "VM {} may or may not have moved {} -> {} ({reason}): {error}",
                record.vm, record.from, record.to,
            ),
            (Some(error), _) => format!(
                "VM {} could not move {} -> {} ({reason}); it keeps running on {}: {error}",
                record.vm, record.from, record.to, record.from,
            ),
        };
        let store = self.store();
        if let Err(e) = store.put_migration(&record) {
            tracing::error!(
                "recording migration {}: {e}; it is written again",
                record.id
            );
            (self.unwritten_migrations.lock().expect("unwritten lock")).insert(record.id);
        }
        if let Some(vm) = &moved {
            if let Err(e) = store.put_vms(&[vm], &[]) {
                tracing::error!("recording VM {} moved to {to}: {e}", vm.id);
                // Its host's next beat writes it.
                self.inventory().rewrite_next_beat(to);
            }
        }
        if let Err(e) = self.record(&[Event::now("migration", message)]) {
            tracing::error!("recording an event: {e}");
        }
        record
    }

    /// The source's and the destination's records, for a move.
    fn move_hosts(&self, m: &Move) -> Result<(crate::HostRecord, crate::HostRecord), String> {
        let inventory = self.inventory();
        let host = |name: &str| {
            inventory
                .hosts
                .get(name)
                .cloned()
                .ok_or_else(|| format!("host {name} is not in the inventory"))
        };
        Ok((host(&m.vm.host)?, host(&m.to)?))
    }

    /// Starts the migration on the source and polls it to its end; then verifies the VM
    /// on the destination. The error says what went wrong.
    fn follow_migration(
        &self,
        m: &Move,
        record_id: i64,
        term: u64,
    ) -> Result<(Option<MigrationReport>, VmInfo), MoveFailure> {
        let (source, dest) = self.move_hosts(m)?;
        // Its mode may have changed since the move was planned (a balance is planned
        // before its operation begins, and a maintenance may end in between): a host
        // about to be patched takes no VM. While this operation runs, no other begins.
        if !dest.mode.accepts_vms() {
            return Err(format!(
                "not moved: host {} is {} and takes no VMs",
                dest.name,
                dest.mode.name()
            )
            .into());
        }
        let src = self.order_client(&source).map_err(|e| e.to_string())?;
        let path = format!("/v1/vms/{}", m.vm.id);
        // Checked last thing before the order, after its client took the term it
        // carries: a replica deposed since the record was written orders nothing, nor
        // one that leads again, in a later term (that term's leader resumes the moves).
        self.store()
            .writable()
            .map_err(|e| format!("not ordered: {e}"))?;
        if !self.leads_in(term) {
            return Err(format!(
                "not ordered: this replica no longer leads in term {term}, the one the move was planned in"
            )
            .into());
        }
        let ordered = src.post::<_, MigrationStatus>(
            &format!("{path}/migrate"),
            &serde_json::json!({ "to": dest.info.migration_addr }),
        );
        match ordered {
            Ok(_) => {}
            // Sent, and no answer came back (or one cut short, or that makes no sense: a
            // success may have come with it): the source may have taken the order, and
            // the VM may be moving. The source says which. Only its refusal, or an order
            // never sent, is a move that did not start.
            Err(e) if may_have_taken(&e) => {
                tracing::warn!(vm = %m.vm.id, "host {} did not answer a migrate order: {e:#}", source.name);
                let lost = "the source did not answer the order, and did not take it";
                return self.follow_order_in_doubt(&source, &dest, &m.vm.id, record_id, lost);
            }
            Err(e) => {
                return Err(
                    format!("host {} did not start the migration: {e:#}", source.name).into(),
                )
            }
        }
        let report = self.poll_migration(&source, &dest, &m.vm.id, record_id)?;
        Ok((report, self.verify_arrival(&dest, &source.name, &m.vm.id)?))
    }

    /// Follows a migration of `vm` from `source` to `dest` that may or may not have been
    /// ordered (a previous leader recorded it, or the order's answer was lost): the source
    /// is asked until it answers. One it has is followed to its end; none means the VM
    /// moved (it runs on the destination) or the source never took the order (which
    /// `not_started` says how).
    fn follow_order_in_doubt(
        &self,
        source: &crate::HostRecord,
        dest: &crate::HostRecord,
        vm: &str,
        record_id: i64,
        not_started: &str,
    ) -> Result<(Option<MigrationReport>, VmInfo), MoveFailure> {
        let src = self.host_client(source).map_err(|e| e.to_string())?;
        // Only the source's "no such VM" (404) or "no migration of it" (409
        // `wrong_state`) means none: an unreachable source is asked again, as a running
        // migration is polled.
        let path = format!("/v1/vms/{vm}/migration");
        // A migration of this move: to its destination (the source tells the VM's last
        // migration, which may be an earlier one, to elsewhere).
        let this_move = |s: &MigrationStatus| s.to == dest.info.migration_addr;
        let since = Instant::now();
        let asked = loop {
            let answer = src.get::<MigrationStatus>(&path);
            if let Err(e) = &answer {
                let none = e
                    .api()
                    .is_some_and(|a| a.status == 404 || a.code.as_deref() == Some("wrong_state"));
                if !none {
                    if since.elapsed() > LOST_CONTACT {
                        return Err(MoveFailure::Unsettled(format!(
                            "lost contact with host {} while finding out whether it took a migrate order ({e:#}); check where the VM runs",
                            source.name
                        )));
                    }
                    std::thread::sleep(POLL);
                    continue;
                }
            }
            // None yet, or an earlier one's: an order just sent may still be taking
            // effect on the source, so it is asked again for a moment.
            let under_way = matches!(&answer, Ok(s) if this_move(s)
                && !matches!(s.state, MigrationState::Failed | MigrationState::Cancelled));
            if !under_way && since.elapsed() < ORDER_GRACE {
                std::thread::sleep(POLL);
                continue;
            }
            break match answer {
                Ok(s) if !this_move(&s) => Err(format!(
                    "its last migration of the VM was to {}",
                    crate::inventory::shown(&s.to)
                )),
                other => other.map_err(|e| format!("{e:#}")),
            };
        };
        match asked {
            // Running, or in doubt (followed until settled), as one just ordered.
            Ok(status)
                if matches!(status.state, MigrationState::Running | MigrationState::InDoubt) =>
            {
                let report = self.poll_migration(source, dest, vm, record_id)?;
                Ok((report, self.verify_arrival(dest, &source.name, vm)?))
            }
            Ok(status) if status.state == MigrationState::Succeeded => Ok((
                status.report,
                self.verify_arrival(dest, &source.name, vm)?,
            )),
            Ok(status) => Err(status
                .error
                .unwrap_or_else(|| format!("the migration ended {:?}", status.state))
                .into()),
            // No migration there: it moved (the VM runs on the destination) or the order
            // never arrived.
            Err(asked) => match self.verify_arrival(dest, &source.name, vm) {
                Ok(arrived) => Ok((None, arrived)),
                Err(there) => Err(format!(
                    "not started: {not_started}; the VM stayed on {} (source: {asked}; destination: {})",
                    source.name,
                    there.text()
                )
                .into()),
            },
        }
    }

    /// Polls the source's migration of `vm` until it ends, and a migration left in doubt
    /// until it is settled: its report, if the source has one (a settled one has none).
    fn poll_migration(
        &self,
        source: &crate::HostRecord,
        dest: &crate::HostRecord,
        vm: &str,
        record_id: i64,
    ) -> Result<Option<MigrationReport>, MoveFailure> {
        let src = self.host_client(source).map_err(|e| e.to_string())?;
        let path = format!("/v1/vms/{vm}/migration");
        let started = Instant::now();
        let mut last_contact = started;
        loop {
            std::thread::sleep(POLL);
            match src.get::<MigrationStatus>(&path) {
                // Another migration's status (a host that lost this one): not its end.
                Ok(status) if status.to != dest.info.migration_addr => {
                    return Err(MoveFailure::Unsettled(format!(
                        "host {} reports a migration of the VM to {}, not this move's; check where the VM runs",
                        source.name,
                        crate::inventory::shown(&status.to)
                    )))
                }
                Ok(status)
                    if status.state == MigrationState::Running
                        && started.elapsed() > MIGRATION_PATIENCE =>
                {
                    return Err(MoveFailure::Unsettled(format!(
                        "host {} still reports the migration running after {} s; it may still end: check where the VM runs",
                        source.name,
                        MIGRATION_PATIENCE.as_secs()
                    )))
                }
                Ok(status) => {
                    last_contact = Instant::now();
                    match status.state {
                        MigrationState::Succeeded => {
                            return status.report.map(Some).ok_or_else(|| {
                                format!("host {} reported success without a report", source.name)
                                    .into()
                            })
                        }
                        MigrationState::Failed
                        | MigrationState::Cancelled
                        | MigrationState::InDoubt => {
                            // The host's words are kept and stored: bounded.
                            let mut error = status
                                .error
                                .unwrap_or_else(|| "the migration failed".into());
                            crate::inventory::cut_state_text(&mut error);
                            if status.state == MigrationState::InDoubt {
                                return self.follow_settlement(source, vm, error).map(|()| None);
                            }
                            return Err(error.into());
                        }
                        MigrationState::Running => {
                            if let Some(progress) = status.progress {
                                if let Some(r) = self.inventory().migration_mut(record_id) {
                                    r.progress = Some(progress);
                                }
                            }
                        }
                    }
                }
                Err(e) if last_contact.elapsed() > LOST_CONTACT => {
                    return Err(MoveFailure::Unsettled(format!(
                        "lost contact with host {} during the migration ({e:#}); check where the VM runs",
                        source.name
                    )))
                }
                Err(_) => {}
            }
        }
    }

    /// Follows VM `vm`, left in doubt on `source` by its move (the destination was told
    /// to run it, and the confirmation was lost: `why`), until the source settles it:
    /// released there, it moved; resumed, it stayed.
    fn follow_settlement(
        &self,
        source: &crate::HostRecord,
        vm: &str,
        why: String,
    ) -> Result<(), MoveFailure> {
        let src = self.host_client(source).map_err(|e| e.to_string())?;
        let path = format!("/v1/vms/{vm}");
        let (since, mut last_contact) = (Instant::now(), Instant::now());
        loop {
            match src.get::<VmInfo>(&path) {
                Ok(info) => {
                    last_contact = Instant::now();
                    match info.state {
                        VmState::InDoubt { .. } => {}
                        VmState::MigratedAway { .. } => return Ok(()),
                        other => {
                            return Err(MoveFailure::Stayed(format!(
                                "{why}; settled: {} on host {}",
                                other.name(),
                                source.name
                            )))
                        }
                    }
                }
                Err(e) if last_contact.elapsed() > LOST_CONTACT => {
                    return Err(MoveFailure::Unsettled(format!(
                        "{why}; then contact with host {} was lost ({e:#}): check where the VM runs",
                        source.name
                    )))
                }
                Err(_) => {}
            }
            if since.elapsed() > SETTLE_PATIENCE {
                return Err(MoveFailure::Unsettled(format!(
                    "{why}; still in doubt after {} s: it stays paused on host {} until settled (`ferry vm resolve {vm}`)",
                    since.elapsed().as_secs(),
                    source.name
                )));
            }
            std::thread::sleep(SETTLE_POLL);
        }
    }

    /// The destination has the VM, running (or already finished cleanly). Asked once
    /// the source let the VM go: where it is otherwise is for the operator to find out.
    fn verify_arrival(
        &self,
        dest: &crate::HostRecord,
        source: &str,
        vm: &str,
    ) -> Result<VmInfo, MoveFailure> {
        let unsettled = MoveFailure::Unsettled;
        let dst = self
            .host_client(dest)
            .map_err(|e| unsettled(e.to_string()))?;
        let arrived: VmInfo = dst.get(&format!("/v1/vms/{vm}")).map_err(|e| {
            unsettled(format!(
                "host {source} let the VM go, but host {} does not show it: {e:#}",
                dest.name
            ))
        })?;
        // The VM that came from `source`: one there that did not is another (a VM made
        // there while this one was away may hold its id, and the arrival another).
        if arrived.id != vm || arrived.migrated_from.as_deref() != Some(source) {
            return Err(unsettled(format!(
                "host {} shows a VM {vm} that did not come from host {source}",
                dest.name
            )));
        }
        match &arrived.state {
            VmState::Running | VmState::Exited { code: 0 } => Ok(arrived),
            other => Err(unsettled(format!(
                "the VM arrived on host {} but is {other:?} there",
                dest.name
            ))),
        }
    }

    /// Finds out how a migration a previous leader ordered ends, from the hosts, which
    /// know: the source, if it still has a migration of the VM, is followed to its end;
    /// otherwise the VM runs on the destination (it moved) or it does not (the order
    /// never reached the source, or the move failed).
    fn settle_recorded_migration(&self, record: &MigrationRecord) -> MigrationRecord {
        // Its own statement: a guard in the `match` would be held through the arms, and
        // concluding takes the inventory lock again (the center hung for good).
        let known = self.inventory().vms().get(&record.vm).cloned();
        let m = match known {
            Some(mut vm) => {
                vm.host = record.from.clone();
                Move {
                    vm,
                    to: record.to.clone(),
                    hold: Hold::new(),
                }
            }
            None => {
                return self.conclude_migration(
                    &record.vm,
                    &record.to,
                    None,
                    record.id,
                    &record.reason,
                    Err("the VM is no longer known to the cluster"
                        .to_string()
                        .into()),
                );
            }
        };
        // Room on the destination while it is followed, and counted as in progress, as a
        // move ordered here (a new leader starts with none held): concluding gives the
        // room back, and the count ends when the move is concluded.
        let _in_progress = self.metrics().migration_started();
        self.reserve(std::slice::from_ref(&m));
        let outcome = (|| -> Result<_, MoveFailure> {
            let (source, dest) = self.move_hosts(&m)?;
            let recorded = "the leader that recorded it stopped before the source took the order";
            self.follow_order_in_doubt(&source, &dest, &record.vm, record.id, recorded)
        })();
        let hold = Some(m.hold);
        self.conclude_migration(
            &record.vm,
            &record.to,
            hold,
            record.id,
            &record.reason,
            outcome,
        )
    }

    /// Resumes, as the new leader, the operations and migrations that were running.
    pub(crate) fn resume_operations(self: &Arc<Self>) {
        let running: Vec<Operation> = self
            .operations
            .lock()
            .expect("operations lock")
            .values()
            .filter(|op| op.state == OperationState::Running)
            .cloned()
            .collect();
        let orphans: Vec<MigrationRecord> = {
            let owned: Vec<i64> = running
                .iter()
                .flat_map(|op| op.migrations.clone())
                .collect();
            self.inventory()
                .migrations
                .iter()
                .filter(|m| m.state == MigrationState::Running && !owned.contains(&m.id))
                .cloned()
                .collect()
        };
        if running.is_empty() && orphans.is_empty() {
            return;
        }
        let Some(term) = self.term() else { return };
        // Migrations recorded outside any operation (the old leader died between
        // recording one and noting it in its operation) are settled first.
        let center = self.clone();
        let spawned = std::thread::Builder::new()
            .name("resume".into())
            .spawn(move || {
                for m in orphans {
                    center.settle_recorded_migration(&m);
                }
                for op in running {
                    center.resume_operation(op, term);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot resume the operations: {e}");
        }
    }

    fn resume_operation(self: &Arc<Self>, op: Operation, term: u64) {
        let _ = self.record(&[Event::now(
            "operation-resumed",
            format!(
                "center {} resumes operation {} ({}{})",
                self.config.name,
                op.id,
                op.kind,
                op.host
                    .as_deref()
                    .map(|h| format!(" of {h}"))
                    .unwrap_or_default()
            ),
        )]);
        let recorded: Vec<MigrationRecord> = {
            let inventory = self.inventory();
            op.migrations
                .iter()
                .filter_map(|id| inventory.migrations.iter().find(|m| m.id == *id).cloned())
                .collect()
        };
        // First, how every migration already ordered ends: never a second one of a VM
        // whose first may still run.
        let mut records: Vec<MigrationRecord> = recorded
            .iter()
            .map(|m| {
                if m.state == MigrationState::Running {
                    self.settle_recorded_migration(m)
                } else {
                    m.clone()
                }
            })
            .collect();
        match (op.kind, op.host.clone()) {
            (OperationKind::Maintenance, Some(host)) if self.host_active(&host) => {
                // Returned to service (or never set evacuating) since: its record's last
                // write was lost. Evacuating it again would empty a host in use.
                self.update_operation(op.id, |o| {
                    o.state = OperationState::Incomplete;
                    o.finished_ms = Some(unix_ms());
                    o.summary = format!("not resumed: host {host} is back in service");
                });
            }
            (OperationKind::Maintenance, Some(host)) => {
                // This replica's view of the host must be first-hand, and its VMs settled
                // (none still in a move), before planning what is left.
                let deadline = Instant::now() + self.config.down_after + LOST_CONTACT;
                while Instant::now() < deadline {
                    let inventory = self.inventory();
                    let settled = inventory.beat_taken_from(&host)
                        && inventory
                            .live_vms_on(&host)
                            .iter()
                            .all(|vm| vm.info.state == VmState::Running);
                    drop(inventory);
                    if settled {
                        break;
                    }
                    std::thread::sleep(POLL);
                }
                // The lead may have changed during that wait: the leader of a later term
                // resumes the operation, and plans (and holds room) for it itself.
                if !self.leads_in(term) {
                    return;
                }
                let moves = match self.plan_evacuation(&host) {
                    Ok(moves) => moves,
                    Err(e) => {
                        self.finish_evacuation(&host, &records, op.id, term, Some(e.to_string()));
                        return;
                    }
                };
                self.update_operation(op.id, |o| {
                    o.planned.extend(
                        moves
                            .iter()
                            .map(|m| (m.vm.id.clone(), m.vm.host.clone(), m.to.clone())),
                    );
                });
                records.extend(self.run_moves(
                    &moves,
                    &format!("maintenance of {host}"),
                    op.id,
                    term,
                ));
                self.finish_evacuation(&host, &records, op.id, term, None);
            }
            // The moves not ordered before the lead changed are not made: the plan may
            // no longer hold. The operation says so.
            _ => self.finish_balance(op.id, term, op.planned.len(), &records),
        }
    }

    /// Whether `host`'s mode says it is in service (not being evacuated, nor in
    /// maintenance: an evacuation whose end was written to the host's mode but not to
    /// its operation is finished again, not dropped).
    fn host_active(&self, host: &str) -> bool {
        self.inventory()
            .hosts
            .get(host)
            .is_some_and(|h| h.mode == HostMode::Active)
    }

    /// Runs `moves`, at most `parallel` at once; returns each one's record.
    fn run_moves(&self, moves: &[Move], reason: &str, op: u64, term: u64) -> Vec<MigrationRecord> {
        let next = AtomicUsize::new(0);
        let records = std::sync::Mutex::new(Vec::new());
        let workers = self.config.parallel.clamp(1, moves.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(m) = moves.get(i) else { break };
                    // A replica that lost the lead (even if it leads again since) orders
                    // nothing more: the leader resumes from the record.
                    if !self.leads_in(term) {
                        break;
                    }
                    let record = self.move_vm(m, reason, op, term);
                    records.lock().expect("records lock").push(record);
                });
            }
        });
        // The moves not made (the lead was lost) hold nothing either.
        self.release_room(moves);
        records.into_inner().expect("records lock")
    }

    fn up_host(&self, name: &str) -> Result<(), CenterError> {
        let inventory = self.inventory();
        if !inventory.hosts.contains_key(name) {
            return Err(CenterError::NotFound(format!(
                "no host named '{name}' has joined"
            )));
        }
        if !inventory.is_up(name, unix_ms(), self.down_after_ms()) {
            return Err(CenterError::Unavailable(format!(
                "host {name} is down: its VMs cannot be moved live until it is back"
            )));
        }
        // Its VMs as the store last had them (a center that just started) may not be
        // what runs there: the plan, and the check that the host is empty after it,
        // would miss the others.
        if !inventory.beat_taken_from(name) {
            return Err(CenterError::Unavailable(format!(
                "host {name} has not reported to this center since it started; try again after its next heartbeat"
            )));
        }
        Ok(())
    }

    /// A place for each of `host`'s live VMs on other hosts with room, or why not.
    fn plan_evacuation(&self, host: &str) -> Result<Vec<Move>, CenterError> {
        let mut inventory = self.inventory();
        let vms = inventory.live_vms_on(host);
        if let Some(busy) = vms.iter().find(|vm| vm.info.state != VmState::Running) {
            return Err(CenterError::Conflict(format!(
                "VM {} on host {host} is {}; wait for it and try again",
                busy.id,
                busy.info.state.name()
            )));
        }
        let mut open: Vec<_> = inventory
            .open_hosts(unix_ms(), self.down_after_ms())
            .into_iter()
            .filter(|h| h.name != host)
            .collect();
        let mut moves = Vec::new();
        let mut homeless = Vec::new();
        for vm in vms {
            let need = Need::of_vm(&vm.info);
            match placement::choose(&open, &need) {
                Ok(to) => {
                    let to = to.name.clone();
                    let slot = open.iter_mut().find(|h| h.name == to).expect("chosen");
                    placement::take(slot, &need);
                    moves.push(Move {
                        vm,
                        to,
                        hold: Hold::new(),
                    });
                }
                Err(why) => homeless.push(format!("{}: {why}", vm.id)),
            }
        }
        if !homeless.is_empty() {
            return Err(CenterError::NoRoom(format!(
                "cannot put host {host} in maintenance: {} of its VMs have nowhere to go ({}); nothing was moved",
                homeless.len(),
                homeless.join("; ")
            )));
        }
        // Held under the lock the plan was made under: a create placed after it sees the
        // room taken, and cannot overbook a destination the moves count on.
        hold_room(&mut inventory, &moves);
        Ok(moves)
    }

    /// Puts `host` in maintenance: plans a place for each of its VMs on other hosts with
    /// room, refuses (moving nothing) if one has none, then moves them in the background.
    /// Follow it with [`Self::operation`].
    pub fn enter_maintenance(self: &Arc<Self>, host: &str) -> Result<Operation, CenterError> {
        let _claim = self.claim_mode_change(host)?;
        self.store().writable()?;
        self.up_host(host)?;
        if self.evacuating_now(host) {
            return Err(CenterError::Conflict(format!(
                "host {host} is already being evacuated"
            )));
        }
        let moves = self.plan_evacuation(host)?;
        let (term, op) = self.begin_holding(OperationKind::Maintenance, Some(host), &moves)?;
        // What the host goes back to if the evacuation cannot start (one in maintenance
        // after an incomplete one stays closed).
        let before =
            (self.inventory().hosts.get(host)).map_or(HostMode::Active, |h| h.mode.clone());
        if let Err(e) = self.set_mode(host, HostMode::Evacuating) {
            return Err(self.abandon(&op, &moves, e));
        }
        let message = format!(
            "host {host} entering maintenance: {} VM(s) to move",
            moves.len()
        );
        if let Err(e) = self.record(&[Event::now("maintenance", message)]) {
            tracing::warn!("recording an event: {e}");
        }
        let center = self.clone();
        let evacuated = host.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("evacuate-{host}"))
            .spawn({
                let moves = moves.clone();
                move || {
                    let host = evacuated;
                    let records =
                        center.run_moves(&moves, &format!("maintenance of {host}"), op.id, term);
                    center.finish_evacuation(&host, &records, op.id, term, None);
                }
            });
        if let Err(e) = spawned {
            let _ = self.set_mode(host, before);
            let e = CenterError::Conflict(format!("cannot start the evacuation: {e}"));
            return Err(self.abandon(&op, &moves, e));
        }
        Ok(op)
    }

    /// Operation `op` could not start after all (`error`): its room is given back and it
    /// ends as incomplete, so it neither blocks the next one nor is resumed.
    fn abandon(&self, op: &Operation, moves: &[Move], error: CenterError) -> CenterError {
        self.release_room(moves);
        let why = error.to_string();
        self.update_operation(op.id, |o| {
            o.state = OperationState::Incomplete;
            o.finished_ms = Some(unix_ms());
            o.summary = format!("not started: {why}");
        });
        error
    }

    /// Ends maintenance operation `op` of `host` after its moves (`records`): the host is
    /// in maintenance if it is empty, incomplete otherwise. A replica that lost the lead
    /// leaves it to the next leader.
    fn finish_evacuation(
        &self,
        host: &str,
        records: &[MigrationRecord],
        op: u64,
        term: u64,
        problem: Option<String>,
    ) {
        if !self.leads_in(term) {
            return;
        }
        // A VM's last attempt is what counts: one a previous leader recorded but never
        // started may be followed by this leader's successful move.
        let mut last: std::collections::BTreeMap<&str, &MigrationRecord> = Default::default();
        for r in records {
            last.insert(r.vm.as_str(), r);
        }
        let mut problems: Vec<String> = last
            .values()
            .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.vm)))
            .collect();
        problems.extend(problem);
        // A VM placed here before the host stopped taking new ones may still be starting:
        // the host is not empty until it has come (and then it stays, to move again).
        if !self.creations_ended(host) {
            problems.push("VMs were still being created on the host".into());
        }
        // Asked again after that wait (minutes, at worst): the lead may have been lost
        // meanwhile, even won again in a later term, whose leader resumed the evacuation
        // and is still at it. Only that one ends it.
        if !self.leads_in(term) {
            return;
        }
        let left: Vec<String> = self
            .inventory()
            .live_vms_on(host)
            .into_iter()
            .map(|vm| vm.id)
            .collect();
        let moved = last
            .values()
            .filter(|r| r.state == MigrationState::Succeeded)
            .count();
        let (mode, state, summary) = if problems.is_empty() && left.is_empty() {
            (
                HostMode::Maintenance,
                OperationState::Done,
                format!(
                    "host {host} is empty and in maintenance: {moved} VM(s) moved in {:.1} s",
                    self.operation(op)
                        .map_or(0, |o| unix_ms().saturating_sub(o.started_ms))
                        as f64
                        / 1e3
                ),
            )
        } else {
            let reason = format!(
                "{} VM(s) still on the host ({}){}",
                left.len(),
                left.join(", "),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!("; failed: {}", problems.join("; "))
                }
            );
            (
                HostMode::MaintenanceIncomplete {
                    reason: reason.clone(),
                },
                OperationState::Incomplete,
                format!("host {host} is NOT ready for maintenance: {reason}"),
            )
        };
        if let Err(e) = self.set_mode(host, mode) {
            tracing::error!("recording host {host}'s mode: {e}");
        }
        if let Err(e) = self.record(&[Event::now("maintenance", summary.clone())]) {
            tracing::error!("recording an event: {e}");
        }
        self.update_operation(op, |o| {
            o.state = state;
            o.finished_ms = Some(unix_ms());
            o.problems = problems;
            o.summary = summary;
        });
    }

    /// Ends balance operation `op` after its moves (`planned` were planned).
    fn finish_balance(&self, op: u64, term: u64, planned: usize, records: &[MigrationRecord]) {
        if !self.leads_in(term) {
            return;
        }
        let problems: Vec<String> = records
            .iter()
            .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.vm)))
            .collect();
        let moved = records.len() - problems.len();
        let complete = problems.is_empty() && records.len() >= planned;
        self.update_operation(op, |o| {
            o.state = if complete {
                OperationState::Done
            } else {
                OperationState::Incomplete
            };
            o.finished_ms = Some(unix_ms());
            o.summary = format!("balance: {moved} of {planned} move(s) made");
            o.problems = problems;
        });
    }

    /// Returns `host` to service.
    pub fn exit_maintenance(&self, host: &str) -> Result<crate::HostView, CenterError> {
        let _claim = self.claim_mode_change(host)?;
        self.store().writable()?;
        let mode = self
            .inventory()
            .hosts
            .get(host)
            .map(|h| h.mode.clone())
            .ok_or_else(|| CenterError::NotFound(format!("no host named '{host}' has joined")))?;
        if self.evacuating_now(host) {
            return Err(CenterError::Conflict(format!(
                "host {host} is being evacuated; wait for the evacuation to end"
            )));
        }
        if mode != HostMode::Active {
            self.set_mode(host, HostMode::Active)?;
            // The host is back in service once its mode is written: an event lost now
            // must not tell the operator it is not.
            let back = Event::now("maintenance", format!("host {host} is back in service"));
            if let Err(e) = self.record(&[back]) {
                tracing::warn!("recording an event: {e}");
            }
        }
        self.host(host)
    }

    /// Forgets host `name` for good (a machine taken out of the cluster), and with
    /// `with_vms` the VMs recorded on it. Refused while it beats (it would join again),
    /// while anything runs that involves it, and while VMs are recorded on it unless
    /// `with_vms` (they may still run there: say so only if they do not).
    pub fn forget_host(&self, name: &str, with_vms: bool) -> Result<ForgottenHost, CenterError> {
        let _claim = self.claim_mode_change(name)?;
        self.store().writable()?;
        if self.evacuating_now(name) {
            return Err(CenterError::Conflict(format!(
                "host {name} is being evacuated; wait for the evacuation to end"
            )));
        }
        // Checked and taken out of memory under one lock, so that a beat cannot come
        // between; the store follows, and if it refuses, the host is put back.
        let (host, vms) = {
            let mut inventory = self.inventory();
            let host = inventory.hosts.get(name).ok_or_else(|| {
                CenterError::NotFound(format!("no host named '{name}' has joined"))
            })?;
            if inventory.is_up(name, unix_ms(), self.down_after_ms()) {
                return Err(CenterError::Conflict(format!(
                    "host {name} is up (its last heartbeat came {} ms ago): stop its daemon first, or it joins again with its next beat",
                    unix_ms().saturating_sub(host.last_heartbeat_ms)
                )));
            }
            let moving = inventory
                .migrations
                .iter()
                .any(|m| !m.state.has_ended() && (m.from == name || m.to == name))
                || inventory.reservations.iter().any(|r| r.host == name)
                || inventory.creating.contains_key(name);
            if moving {
                return Err(CenterError::Conflict(format!(
                    "a migration or a create involving host {name} is under way; wait for it to end"
                )));
            }
            let vms: Vec<String> = inventory.vms_on(name).map(|vm| vm.id.clone()).collect();
            if !vms.is_empty() && !with_vms {
                let shown: Vec<&str> = vms.iter().take(5).map(String::as_str).collect();
                return Err(CenterError::Conflict(format!(
                    "host {name} still has {} VM(s) on record ({}{}); they may still run there. Forget them with it only if they do not (--with-vms)",
                    vms.len(),
                    shown.join(", "),
                    if vms.len() > shown.len() { ", ..." } else { "" }
                )));
            }
            inventory
                .remove_host(name)
                .expect("the host was just found")
        };
        let ids: Vec<String> = vms.iter().map(|vm| vm.id.clone()).collect();
        if let Err(e) = self.store().forget_host(name, &ids) {
            self.inventory().restore_host(host, vms);
            return Err(e.into());
        }
        let message = format!("host {name} forgotten, with {} VM record(s)", ids.len());
        if let Err(e) = self.record(&[Event::now("host-forgotten", message)]) {
            tracing::warn!("recording an event: {e}");
        }
        Ok(ForgottenHost {
            host: name.to_string(),
            vms: ids,
        })
    }

    /// The balance plan for the cluster now. A VM that moved in the last
    /// [`SETTLING_AFTER_A_MOVE`] stays where it is: moved by the center, or by an
    /// operator's `ferry migrate` (its host says where it came from, and since when).
    pub fn balance_plan(&self) -> BalancePlan {
        let now = unix_ms();
        let settle_ms = SETTLING_AFTER_A_MOVE.as_millis() as u64;
        let arrived_lately = |info: &VmInfo| {
            info.migrated_from.is_some() && now.saturating_sub(info.since_unix_ms) < settle_ms
        };
        let (open, vms, settling) = {
            let inventory = self.inventory();
            let open = inventory.open_hosts(now, self.down_after_ms());
            let settling: BTreeSet<&str> = (inventory.migrations.iter())
                .filter(|m| m.state == MigrationState::Succeeded)
                .filter(|m| {
                    m.finished_ms
                        .is_some_and(|at| now.saturating_sub(at) < settle_ms)
                })
                .map(|m| m.vm.as_str())
                .collect();
            let running = open
                .iter()
                .flat_map(|h| inventory.live_vms_on(&h.name))
                .filter(|vm| vm.info.state == VmState::Running);
            let (held, movable): (Vec<_>, Vec<_>) = running
                .partition(|vm| settling.contains(vm.id.as_str()) || arrived_lately(&vm.info));
            let vms: Vec<MovableVm> = movable
                .into_iter()
                .map(|vm| MovableVm {
                    need: Need::of_vm(&vm.info),
                    load: vm.info.accel_load,
                    host: vm.host,
                    id: vm.id,
                })
                .collect();
            (open, vms, held.len())
        };
        // Planned on copies, without the lock: on a large cluster planning takes long
        // enough to hold up every heartbeat.
        let mut plan = balance::plan(&open, &vms, self.config.balance_threshold);
        if settling > 0 {
            plan.summary.push_str(&format!(
                " ({settling} VM(s) that moved in the last {} minutes stay where they are)",
                SETTLING_AFTER_A_MOVE.as_secs() / 60
            ));
        }
        plan
    }

    /// Plans and, unless `dry_run`, carries out the plan in the background.
    pub fn balance(self: &Arc<Self>, dry_run: bool) -> Result<BalanceOutcome, CenterError> {
        let plan = self.balance_plan();
        if dry_run || plan.moves.is_empty() {
            return Ok(BalanceOutcome {
                plan,
                operation: None,
            });
        }
        self.store().writable()?;
        // Checked and held under one lock: a create placed after it sees the room taken.
        let moves = {
            let mut inventory = self.inventory();
            let moves =
                moves_still_planned(&inventory, &plan.moves, unix_ms(), self.down_after_ms());
            hold_room(&mut inventory, &moves);
            moves
        };
        let (term, op) = self.begin_holding(OperationKind::Balance, None, &moves)?;
        if let Err(e) = self.record(&[Event::now("balance", plan.summary.clone())]) {
            tracing::warn!("recording an event: {e}");
        }
        let center = self.clone();
        let id = op.id;
        let spawned = std::thread::Builder::new().name("balance".into()).spawn({
            let moves = moves.clone();
            move || {
                let records = center.run_moves(&moves, "balance", id, term);
                center.finish_balance(id, term, moves.len(), &records);
            }
        });
        if let Err(e) = spawned {
            let e = CenterError::Conflict(format!("cannot start balancing: {e}"));
            return Err(self.abandon(&op, &moves, e));
        }
        Ok(BalanceOutcome {
            plan,
            operation: Some(op),
        })
    }
}

/// Holds room in `inventory` on each move's destination until the move ends.
fn hold_room(inventory: &mut Inventory, moves: &[Move]) {
    for m in moves {
        inventory.reservations.push(Reservation {
            hold: m.hold,
            host: m.to.clone(),
            vm: m.vm.id.clone(),
            accel: m.vm.info.accel_memory,
            memory: Need::of_vm(&m.vm.info).memory,
        });
    }
}

/// The moves of `planned` whose VMs are still where the plan found them, running, with no
/// move under way, to a destination still open with room for them (counting the moves
/// before them) at `now`.
/// The plan is made without the inventory's lock: a VM that moved meanwhile (to the
/// plan's destination, or elsewhere), or stopped, is left where it is, else its new host
/// would be told to move it to itself, or a host the plan never weighed would lose it;
/// and a destination a create filled meanwhile, or that went down or into maintenance,
/// would refuse the move.
fn moves_still_planned(
    inventory: &Inventory,
    planned: &[PlannedMove],
    now: u64,
    down_after_ms: u64,
) -> Vec<Move> {
    let mut open = inventory.open_hosts(now, down_after_ms);
    planned
        .iter()
        .filter_map(|m| {
            let vm = inventory.vms().get(&m.vm)?;
            let as_planned =
                vm.host == m.from && vm.host != m.to && vm.info.state == VmState::Running;
            if !as_planned {
                tracing::info!(
                    "VM {} is not moved {} -> {}: it is {} on host {} now",
                    m.vm,
                    m.from,
                    m.to,
                    vm.info.state.name(),
                    vm.host
                );
                return None;
            }
            // Room held for it means a move of it is under way (another balance, say).
            if inventory.reservations.iter().any(|r| r.vm == m.vm) {
                tracing::info!(
                    "VM {} is not moved {} -> {}: a move of it is under way",
                    m.vm,
                    m.from,
                    m.to
                );
                return None;
            }
            let need = Need::of_vm(&vm.info);
            let Some(room) = (open.iter_mut())
                .find(|h| h.name == m.to)
                .filter(|h| placement::fits(h, &need))
            else {
                tracing::info!(
                    "VM {} is not moved {} -> {}: the destination is no longer open with room for it",
                    m.vm,
                    m.from,
                    m.to
                );
                return None;
            };
            placement::take(room, &need);
            Some(Move {
                vm: vm.clone(),
                to: m.to.clone(),
                hold: Hold::new(),
            })
        })
        .collect()
}

/// The writes of operations' records under way, and those to make again.
#[derive(Debug, Default)]
pub(crate) struct OperationWrites {
    /// Operations a thread is writing now: their one writer.
    pub(crate) writing: BTreeSet<u64>,
    /// Operations whose record the store does not hold as they are (a write failed).
    pub(crate) unwritten: BTreeSet<u64>,
}

/// Whether a host may have taken an order that failed with `e`: anything but its API's
/// refusal (an error answer, read whole) or a request that never left.
fn may_have_taken(e: &ferry_client::ClientError) -> bool {
    let refused = e.api().is_some();
    let unsent = e.unreachable().is_some_and(|u| u.unsent);
    !refused && !unsent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::tests::vm;
    use crate::inventory::MIGRATIONS_KEPT;
    use crate::tests::ScratchCenter;

    #[test]
    fn operations_kept_are_bounded() {
        let scratch = ScratchCenter::open("operations-kept");
        let center = &scratch.center;
        for _ in 0..OPERATIONS_KEPT + 5 {
            let op = center
                .begin_operation(OperationKind::Balance, None, &[])
                .unwrap();
            center.update_operation(op.id, |o| o.state = OperationState::Done);
        }
        let ops = center.operations.lock().unwrap();
        assert_eq!(ops.len(), OPERATIONS_KEPT);
        // The newest are kept, and ids keep counting on.
        assert_eq!(ops.keys().next_back(), Some(&(OPERATIONS_KEPT as u64 + 5)));
        // The store keeps the same ones, not every operation ever run.
        assert_eq!(scratch.stored_rows("operations"), OPERATIONS_KEPT as i64);
    }

    #[test]
    fn an_operations_record_whose_write_failed_is_written_again() {
        let scratch = ScratchCenter::open("operation-rewritten");
        let center = &scratch.center;
        let op = center
            .begin_operation(OperationKind::Balance, None, &[])
            .unwrap();
        let stored = || {
            let loaded = center.store().load().unwrap();
            let stored = loaded.operations.into_iter().find(|o| o.id == op.id);
            stored.unwrap().state
        };
        // The store fails the write of the operation's end (a passing failure).
        scratch.fail_writes("UPDATE ON operations");
        center.update_operation(op.id, |o| o.state = OperationState::Done);
        assert_eq!(stored(), OperationState::Running);
        center.check_hosts().unwrap();
        assert_eq!(stored(), OperationState::Running, "still failing");
        scratch.heal();
        center.check_hosts().unwrap();
        assert_eq!(stored(), OperationState::Done, "written again");
        assert!(center.operation_writes.lock().unwrap().unwritten.is_empty());
    }

    #[test]
    fn an_operation_has_one_writer_which_writes_its_latest_state() {
        let scratch = ScratchCenter::open("operation-one-writer");
        let center = scratch.center.clone();
        let op = center
            .begin_operation(OperationKind::Balance, None, &[])
            .unwrap();
        // Another connection holds the database's write lock: the first update's write
        // waits on it (up to the store's busy timeout of seconds).
        let db = rusqlite::Connection::open(scratch.store_path()).unwrap();
        db.execute_batch("BEGIN IMMEDIATE;").unwrap();
        let first = {
            let center = center.clone();
            std::thread::spawn(move || {
                center.update_operation(op.id, |o| o.problems.push("first".into()));
            })
        };
        let writing = || (center.operation_writes.lock().unwrap().writing).contains(&op.id);
        let waited = Instant::now();
        while !writing() && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(writing(), "the first update never wrote");
        std::thread::sleep(Duration::from_millis(50));
        // A second update meanwhile leaves its write to the first's writer: it does not
        // race it (the older could land last), nor wait on the store.
        let started = Instant::now();
        center.update_operation(op.id, |o| o.state = OperationState::Done);
        assert!(started.elapsed() < Duration::from_secs(1), "it waited");
        db.execute_batch("COMMIT;").unwrap();
        first.join().unwrap();
        let loaded = center.store().load().unwrap();
        let stored = loaded
            .operations
            .into_iter()
            .find(|o| o.id == op.id)
            .unwrap();
        assert_eq!(
            (stored.state, stored.problems),
            (OperationState::Done, vec!["first".to_string()])
        );
        let writes = center.operation_writes.lock().unwrap();
        assert!(writes.writing.is_empty() && writes.unwritten.is_empty());
    }

    #[test]
    fn a_migration_whose_end_could_not_be_written_is_written_again() {
        let scratch = hosts_a_and_b_answering_nothing("migration-rewritten");
        let center = &scratch.center;
        let record = running_move_recorded(center, "v");
        let stored = || {
            let loaded = center.store().load().unwrap();
            let stored = loaded.migrations.into_iter().find(|m| m.id == record.id);
            stored.unwrap().state
        };
        scratch.fail_writes("UPDATE ON migrations");
        let stayed = MoveFailure::Stayed("refused".into());
        let ended = center.conclude_migration("v", "b", None, record.id, "test", Err(stayed));
        assert_eq!(ended.state, MigrationState::Failed);
        assert_eq!(stored(), MigrationState::Running);
        center.check_hosts().unwrap();
        assert_eq!(stored(), MigrationState::Running, "still failing");
        scratch.heal();
        center.check_hosts().unwrap();
        assert_eq!(stored(), MigrationState::Failed, "written again");
        assert!(center.unwritten_migrations.lock().unwrap().is_empty());
    }

    #[test]
    fn migrations_kept_are_bounded_in_memory_and_in_the_store() {
        let scratch = ScratchCenter::open("migrations-kept");
        let center = &scratch.center;
        let record = |state| MigrationRecord {
            vm: "v".into(),
            state,
            ..MigrationRecord::default()
        };
        center
            .record_migration(&mut record(MigrationState::Running))
            .unwrap();
        for _ in 0..MIGRATIONS_KEPT + 5 {
            center
                .record_migration(&mut record(MigrationState::Succeeded))
                .unwrap();
        }
        let kept: Vec<i64> = center.migrations().iter().map(|m| m.id).collect();
        assert_eq!(kept.len(), MIGRATIONS_KEPT);
        // The running one stays; the oldest ended ones go.
        assert_eq!(kept[0], 1);
        assert_eq!(kept[1], 8);
        assert_eq!(scratch.stored_rows("migrations"), MIGRATIONS_KEPT as i64);
        // History stored before stores were pruned (or a delete that failed) goes when a
        // replica takes the lead.
        for _ in 0..5 {
            center
                .store()
                .add_migration(&record(MigrationState::Succeeded))
                .unwrap();
        }
        assert_eq!(
            scratch.stored_rows("migrations"),
            MIGRATIONS_KEPT as i64 + 5
        );
        center.lead().unwrap();
        assert_eq!(scratch.stored_rows("migrations"), MIGRATIONS_KEPT as i64);
        let kept: Vec<i64> = center.migrations().iter().map(|m| m.id).collect();
        let loaded: Vec<i64> = center
            .store()
            .load()
            .unwrap()
            .migrations
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(loaded, kept);
    }

    /// A center named after `tag` that hosts a and b report to, neither answering at the
    /// address it gives.
    fn hosts_a_and_b_answering_nothing(tag: &str) -> ScratchCenter {
        let scratch = ScratchCenter::open(tag);
        scratch.report("a", ferry_testdata::refusing_addr());
        scratch.report("b", ferry_testdata::refusing_addr());
        scratch
    }

    #[test]
    fn an_evacuation_holds_its_room_as_it_plans() {
        let scratch = hosts_a_and_b_answering_nothing("evacuation-room");
        let center = &scratch.center;
        let mut on_a = crate::inventory::tests::beat("a", vec![vm("v", VmState::Running)]);
        on_a.api_url = center.inventory().hosts["a"].api_url.clone();
        on_a.host.migration_addr = "a.example:7071".into();
        center.heartbeat(on_a).unwrap();
        let free = || {
            let inventory = center.inventory();
            inventory.load(&inventory.hosts["b"]).accel_free
        };
        let before = free();
        // Held by the time the plan is in hand, under the lock it was made under: a
        // create placed before the operation began would otherwise take the same room.
        let moves = center.plan_evacuation("a").unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(free(), before - (512 << 20));
        center.release_room(&moves);
        assert_eq!(free(), before);
    }

    /// A running move of VM `vm` from a to b, recorded by `center` (as a previous
    /// leader would have).
    fn running_move_recorded(center: &Center, vm: &str) -> MigrationRecord {
        let mut record = MigrationRecord {
            vm: vm.into(),
            from: "a".into(),
            to: "b".into(),
            reason: "test".into(),
            state: MigrationState::Running,
            ..MigrationRecord::default()
        };
        center.record_migration(&mut record).unwrap();
        record
    }

    /// Checks that a move failed with the VM staying where it was, saying `why`.
    #[track_caller]
    fn assert_stayed(failure: &MoveFailure, why: &str) {
        assert!(
            matches!(failure, MoveFailure::Stayed(said) if said.contains(why)),
            "{failure:?}"
        );
    }

    /// A move of running VM `v` from host a to host b.
    fn move_v_from_a_to_b() -> Move {
        Move {
            vm: VmRecord {
                id: "v".into(),
                host: "a".into(),
                info: vm("v", VmState::Running),
            },
            to: "b".into(),
            hold: Hold::new(),
        }
    }

    #[test]
    fn no_vm_is_moved_to_a_host_that_went_into_maintenance_after_the_move_was_planned() {
        // Host b is in maintenance. (Neither answers: an order would fail otherwise.)
        let scratch = hosts_a_and_b_answering_nothing("moved-to-maintenance");
        let center = &scratch.center;
        center.inventory().hosts.get_mut("b").unwrap().mode = HostMode::Maintenance;
        let m = move_v_from_a_to_b();
        let refused = center
            .follow_migration(&m, 1, center.term().unwrap())
            .unwrap_err();
        assert_stayed(&refused, "takes no VMs");
    }

    /// A source's status of its migration of `v` to b, in `state`.
    fn status(state: MigrationState) -> String {
        serde_json::to_string(&MigrationStatus {
            vm: "v".into(),
            to: "b.example:7071".into(),
            state,
            progress: None,
            report: None,
            error: Some("the destination's confirmation was lost".into()),
            settlement: Vec::new(),
        })
        .unwrap()
    }

    /// A host's report of `v` in `state` (as having come from a, where that matters).
    fn v_in(state: VmState) -> String {
        let mut v = vm("v", state);
        v.migrated_from = Some("a".into());
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn a_source_reporting_another_migration_of_the_vm_is_not_followed_as_this_move() {
        use crate::fake_host::{fake_host, Reply};
        let scratch = ScratchCenter::open("another-migration");
        let mut elsewhere: MigrationStatus =
            serde_json::from_str(&status(MigrationState::Running)).unwrap();
        elsewhere.to = "c.example:7071".into();
        let elsewhere = serde_json::to_string(&elsewhere).unwrap();
        let (a, _) = fake_host(vec![
            Reply::Json("200 OK", status(MigrationState::Running)),
            Reply::Json("200 OK", elsewhere),
        ]);
        scratch.report("a", a);
        scratch.report("b", ferry_testdata::refusing_addr());
        let lost = scratch
            .center
            .follow_migration(&move_v_from_a_to_b(), 1, scratch.center.term().unwrap())
            .unwrap_err();
        assert!(
            matches!(&lost, MoveFailure::Unsettled(said) if said.contains("c.example:7071, not this move's")),
            "{lost:?}"
        );
    }

    #[test]
    fn a_move_left_in_doubt_is_followed_until_its_source_settles_where_the_vm_runs() {
        use crate::fake_host::{fake_host, Reply};
        let doubt = VmState::InDoubt {
            to: "b.example:7071".into(),
            reason: "link cut".into(),
        };
        let ordered = || Reply::Json("200 OK", status(MigrationState::Running));
        let in_doubt = || Reply::Json("200 OK", status(MigrationState::InDoubt));
        // Released on a: it moved, and runs on b.
        let scratch = ScratchCenter::open("in-doubt-moved");
        let (a, _) = fake_host(vec![
            ordered(),
            in_doubt(),
            Reply::Json("200 OK", v_in(doubt.clone())),
            Reply::Json(
                "200 OK",
                v_in(VmState::MigratedAway {
                    to: "b.example:7071".into(),
                }),
            ),
        ]);
        let (b, _) = fake_host(vec![Reply::Json("200 OK", v_in(VmState::Running))]);
        scratch.report("a", a);
        scratch.report("b", b);
        let (report, arrived) = scratch
            .center
            .follow_migration(&move_v_from_a_to_b(), 1, scratch.center.term().unwrap())
            .unwrap();
        assert!(report.is_none());
        assert_eq!(arrived.state, VmState::Running);
        // Resumed on a: it stayed, and says so.
        let scratch = ScratchCenter::open("in-doubt-stayed");
        let (a, _) = fake_host(vec![
            ordered(),
            in_doubt(),
            Reply::Json("200 OK", v_in(doubt)),
            Reply::Json("200 OK", v_in(VmState::Running)),
        ]);
        scratch.report("a", a);
        scratch.report("b", ferry_testdata::refusing_addr());
        let stayed = scratch
            .center
            .follow_migration(&move_v_from_a_to_b(), 1, scratch.center.term().unwrap())
            .unwrap_err();
        assert_stayed(&stayed, "running on host a");
    }

    #[test]
    fn a_move_whose_source_is_lost_is_recorded_as_unsettled_not_as_staying() {
        let scratch = hosts_a_and_b_answering_nothing("move-unsettled");
        let center = &scratch.center;
        let record = running_move_recorded(center, "v");
        let lost = MoveFailure::Unsettled("lost contact with host a".into());
        let ended = center.conclude_migration("v", "b", None, record.id, "test", Err(lost));
        assert_eq!(ended.state, MigrationState::InDoubt);
        let events = center.events(1).unwrap();
        assert!(
            events[0].message.contains("may or may not have moved")
                && !events[0].message.contains("keeps running"),
            "{}",
            events[0].message
        );
    }

    #[test]
    fn a_migrate_order_whose_answer_was_lost_or_garbled_is_followed_as_the_source_says() {
        use crate::fake_host::{fake_host, Reply};
        // The order arrived and the VM moved; only the answer was lost, or cut short on
        // the way (the room held on b must not be given back while the VM arrives).
        for (tag, answer) in [
            ("lost", Reply::Nothing),
            ("cut", Reply::Json("202 Accepted", "{\"vm\": ".into())),
        ] {
            let scratch = ScratchCenter::open(&format!("order-answer-{tag}-moved"));
            let moved = Reply::Json("200 OK", status(MigrationState::Succeeded));
            let (a, _) = fake_host(vec![answer, moved]);
            let (b, _) = fake_host(vec![Reply::Json("200 OK", v_in(VmState::Running))]);
            scratch.report("a", a);
            scratch.report("b", b);
            let center = &scratch.center;
            let (_, arrived) = center
                .follow_migration(&move_v_from_a_to_b(), 1, center.term().unwrap())
                .unwrap();
            assert_eq!(arrived.state, VmState::Running, "{tag}");
        }
        // The order never took: the source shows only an earlier migration, to another
        // host (asked again for a moment), and b has no VM v.
        let scratch = ScratchCenter::open("order-answer-lost-stayed");
        let earlier = status(MigrationState::Succeeded).replace("b.example", "c.example");
        let missing = r#"{"error":"no VM v","code":"vm_not_found"}"#;
        let mut answers = vec![Reply::Nothing];
        answers.extend((0..10).map(|_| Reply::Json("200 OK", earlier.clone())));
        let (a, _) = fake_host(answers);
        let (b, _) = fake_host(vec![Reply::Json("404 Not Found", missing.to_string())]);
        scratch.report("a", a);
        scratch.report("b", b);
        let center = &scratch.center;
        let stayed = center
            .follow_migration(&move_v_from_a_to_b(), 1, center.term().unwrap())
            .unwrap_err();
        assert_stayed(&stayed, "did not answer the order");
    }

    #[test]
    fn another_vm_answered_for_the_one_moved_is_not_taken_for_it() {
        use crate::fake_host::{fake_host, Reply};
        let scratch = ScratchCenter::open("arrival-of-another");
        // A VM v made on b while v was away (the arrival got another id there).
        let made_there = serde_json::to_string(&vm("v", VmState::Running)).unwrap();
        let (b, _) = fake_host(vec![
            Reply::Json("200 OK", made_there),
            Reply::Json("200 OK", v_in(VmState::Running)),
        ]);
        let dest = scratch.report("b", b);
        let refused = scratch.center.verify_arrival(&dest, "a", "v").unwrap_err();
        assert!(
            matches!(&refused, MoveFailure::Unsettled(why) if why.contains("did not come from host a")),
            "{refused:?}"
        );
        // The one that came from a is its arrival.
        scratch.center.verify_arrival(&dest, "a", "v").unwrap();
    }

    #[test]
    fn a_recorded_move_being_settled_holds_room_on_its_destination() {
        use crate::fake_host::{fake_host, Reply};
        let scratch = ScratchCenter::open("settle-holds-room");
        let late = Duration::from_millis(500);
        let moved = status(MigrationState::Succeeded);
        let (a, _) = fake_host(vec![Reply::Late(late, "200 OK", moved)]);
        let (b, _) = fake_host(vec![Reply::Json("200 OK", v_in(VmState::Running))]);
        scratch.report("b", b);
        let mut beat = crate::inventory::tests::beat("a", vec![vm("v", VmState::Running)]);
        beat.api_url = format!("http://{a}");
        scratch.center.heartbeat(beat).unwrap();
        let record = running_move_recorded(&scratch.center, "v");
        let center = scratch.center.clone();
        let settling = std::thread::spawn(move || center.settle_recorded_migration(&record));
        std::thread::sleep(late / 2);
        let held: Vec<_> = (scratch.center.inventory().reservations.iter())
            .map(|r| (r.vm.clone(), r.host.clone()))
            .collect();
        assert_eq!(held, [("v".to_string(), "b".to_string())]);
        // Followed, it is a migration in progress, as one ordered here.
        let text = scratch.center.metrics_text();
        assert!(text.contains("ferry_migrations_in_progress 1\n"), "{text}");
        let ended = settling.join().unwrap();
        assert_eq!(ended.state, MigrationState::Succeeded, "{ended:?}");
        assert!(scratch.center.inventory().reservations.is_empty());
        let text = scratch.center.metrics_text();
        assert!(text.contains("ferry_migrations_in_progress 0\n"), "{text}");
        assert!(
            text.contains("ferry_migrations_total{result=\"succeeded\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_recorded_move_of_a_vm_no_longer_known_is_concluded_without_hanging() {
        let scratch = hosts_a_and_b_answering_nothing("move-of-a-ghost");
        let center = scratch.center.clone();
        let record = running_move_recorded(&center, "ghost");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(center.settle_recorded_migration(&record));
        });
        let ended = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("settling a move of a VM no longer known hung");
        assert_eq!(ended.state, MigrationState::Failed, "{ended:?}");
        assert!(scratch.center.inventory().vms().get("ghost").is_none());
    }

    #[test]
    fn a_move_planned_in_an_earlier_term_of_this_replica_is_not_ordered() {
        // (Neither host answers: an order sent would fail as not started.)
        let scratch = hosts_a_and_b_answering_nothing("move-old-term");
        let center = &scratch.center;
        // This replica lost the lead and leads again: a worker of the earlier term.
        let earlier = center.term().unwrap() - 1;
        let refused = center
            .follow_migration(&move_v_from_a_to_b(), 1, earlier)
            .unwrap_err();
        assert_stayed(&refused, "no longer leads");
    }

    #[test]
    fn a_maintenance_whose_host_was_returned_to_service_is_not_resumed() {
        let scratch = ScratchCenter::open("stale-maintenance");
        let center = &scratch.center;
        scratch.report("a", ferry_testdata::refusing_addr());
        // Its end was not recorded (the store refused the write): it reads as running,
        // while its host is back in service.
        let op = center
            .begin_operation(OperationKind::Maintenance, Some("a"), &[])
            .unwrap();
        assert_eq!(center.inventory().hosts["a"].mode, HostMode::Active);
        center.resume_operation(op.clone(), center.term().unwrap());
        let ended = center.operation(op.id).unwrap();
        assert_eq!(ended.state, OperationState::Incomplete, "{}", ended.summary);
        assert!(
            ended.summary.contains("back in service"),
            "{}",
            ended.summary
        );
        assert_eq!(center.inventory().hosts["a"].mode, HostMode::Active);
    }

    #[test]
    fn an_evacuation_ended_after_its_replica_lost_and_won_the_lead_again_is_left_to_the_new_term() {
        let scratch = ScratchCenter::open("evacuation-old-term");
        let center = &scratch.center;
        // VM v is still being made on a (the next term's resumption waits for it), and a
        // create placed there before the evacuation has not ended.
        let beat = |state| {
            let beat = crate::inventory::tests::beat("a", vec![vm("v", state)]);
            center.heartbeat(beat).unwrap();
        };
        beat(VmState::Creating);
        let op = center
            .begin_operation(OperationKind::Maintenance, Some("a"), &[])
            .unwrap();
        center.set_mode("a", HostMode::Evacuating).unwrap();
        center.inventory().creating.insert("a".into(), 1);
        let first = center.term().unwrap();
        let ending = std::thread::spawn({
            let center = center.clone();
            move || center.finish_evacuation("a", &[], op.id, first, None)
        });
        // (Time for it to pass its first check of the lead and wait for the create; had
        // it not, it would end nothing either way.)
        std::thread::sleep(Duration::from_millis(200));
        // The lead is lost and won again: the next term resumes the evacuation.
        center.lead().unwrap();
        assert_ne!(center.term(), Some(first));
        center.inventory().creating.clear();
        ending.join().unwrap();
        let now = center.operation(op.id).unwrap();
        assert_eq!(now.state, OperationState::Running, "{}", now.summary);
        assert_eq!(center.inventory().hosts["a"].mode, HostMode::Evacuating);
        // The next term's resumption ends it (v has nowhere to go).
        beat(VmState::Running);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ended = loop {
            let now = center.operation(op.id).unwrap();
            if now.state != OperationState::Running {
                break now;
            }
            assert!(Instant::now() < deadline, "the next term never ended it");
            std::thread::sleep(POLL);
        };
        assert!(ended.summary.contains("nowhere to go"), "{}", ended.summary);
    }

    #[test]
    fn an_evacuation_resumed_in_a_term_since_lost_plans_nothing_and_holds_no_room() {
        let scratch = ScratchCenter::open("resume-old-term");
        let center = &scratch.center;
        scratch.report("b", ferry_testdata::refusing_addr());
        let beat = crate::inventory::tests::beat("a", vec![vm("v", VmState::Running)]);
        center.heartbeat(beat).unwrap();
        let op = center
            .begin_operation(OperationKind::Maintenance, Some("a"), &[])
            .unwrap();
        center.set_mode("a", HostMode::Evacuating).unwrap();
        // A term this replica does not lead in (it lost the lead while it waited to
        // hear the host).
        center.resume_operation(op.clone(), u64::MAX);
        let now = center.operation(op.id).unwrap();
        assert!(now.planned.is_empty(), "{:?}", now.planned);
        assert_eq!(now.state, OperationState::Running);
        assert!(center.inventory().reservations.is_empty());
    }

    /// Host `host` beats to `center`, reporting `vms`.
    fn beat_with(center: &Center, host: &str, vms: Vec<VmInfo>) {
        let beat = crate::inventory::tests::beat(host, vms);
        center.heartbeat(beat).unwrap();
    }

    #[test]
    fn maintenance_waits_for_a_beat_to_this_center_not_the_stores_last_view() {
        let scratch = ScratchCenter::open("maintenance-unheard");
        let api = ferry_testdata::refusing_addr();
        scratch.report("a", api);
        // Host a as a center that just started knows it from the store: up a moment
        // ago, its VMs as they were then, not one beat heard.
        {
            let mut inventory = scratch.center.inventory();
            let (host, vms) = inventory.remove_host("a").unwrap();
            inventory.restore_host(host, vms);
        }
        let refused = scratch.center.enter_maintenance("a").unwrap_err();
        assert!(
            matches!(&refused, CenterError::Unavailable(why) if why.contains("has not reported")),
            "{refused}"
        );
        // Its next beat makes the host's word the center's.
        scratch.report("a", api);
        let entered = scratch.center.enter_maintenance("a");
        assert!(entered.is_ok(), "{:?}", entered.err());
    }

    #[test]
    fn a_vm_that_moved_lately_is_left_out_of_balance_plans() {
        let scratch = ScratchCenter::open("balance-settling");
        let center = &scratch.center;
        let beat = |host: &str, vms| beat_with(center, host, vms);
        let ids = ["v", "w", "x"];
        beat("a", ids.map(|id| vm(id, VmState::Running)).to_vec());
        beat("b", Vec::new());
        let moved = |plan: &BalancePlan| -> Vec<String> {
            plan.moves.iter().map(|m| m.vm.clone()).collect()
        };
        let planned = moved(&center.balance_plan());
        assert!(
            !planned.is_empty(),
            "a busy host and an idle one: no move planned"
        );
        // Every one of them just arrived on a (from b, say): none moves again yet.
        for id in ids {
            let mut record = MigrationRecord {
                vm: id.into(),
                from: "b".into(),
                to: "a".into(),
                reason: "balance".into(),
                state: MigrationState::Succeeded,
                finished_ms: Some(unix_ms()),
                ..MigrationRecord::default()
            };
            center.record_migration(&mut record).unwrap();
        }
        let plan = center.balance_plan();
        assert_eq!(moved(&plan), Vec::<String>::new(), "{}", plan.summary);
        assert!(
            plan.summary.contains("3 VM(s) that moved"),
            "{}",
            plan.summary
        );
        // Long ago, they may move again.
        for m in center.inventory().migrations.iter_mut() {
            m.finished_ms = Some(unix_ms() - 2 * SETTLING_AFTER_A_MOVE.as_millis() as u64);
        }
        assert_eq!(moved(&center.balance_plan()), planned);
        // Moved by an operator (`ferry migrate`, no record here): their host says they
        // came from b a moment ago, and they stay too; long ago, they may move.
        let arrived = |since_unix_ms| {
            ids.map(|id| VmInfo {
                migrated_from: Some("b".into()),
                since_unix_ms,
                ..vm(id, VmState::Running)
            })
            .to_vec()
        };
        beat("a", arrived(unix_ms()));
        let plan = center.balance_plan();
        assert_eq!(moved(&plan), Vec::<String>::new(), "{}", plan.summary);
        beat(
            "a",
            arrived(unix_ms() - 2 * SETTLING_AFTER_A_MOVE.as_millis() as u64),
        );
        assert_eq!(moved(&center.balance_plan()), planned);
    }

    #[test]
    fn a_balance_move_of_a_vm_that_moved_or_stopped_since_it_was_planned_is_not_made() {
        let scratch = ScratchCenter::open("balance-stale-plan");
        let center = &scratch.center;
        let beat = |host: &str, vms| beat_with(center, host, vms);
        // Planned from a to b; v landed on b meanwhile, w on c, x stopped; y is as
        // planned.
        beat(
            "a",
            vec![vm("x", VmState::Stopped), vm("y", VmState::Running)],
        );
        beat("b", vec![vm("v", VmState::Running)]);
        beat("c", vec![vm("w", VmState::Running)]);
        let planned: Vec<PlannedMove> = ["v", "w", "x", "y"]
            .iter()
            .map(|id| PlannedMove {
                vm: id.to_string(),
                from: "a".into(),
                to: "b".into(),
                accel_memory: 0,
                load: 0.5,
            })
            .collect();
        let still = || {
            let moves = moves_still_planned(&center.inventory(), &planned, unix_ms(), 60_000);
            (moves.iter())
                .map(|m| (m.vm.id.clone(), m.vm.host.clone(), m.to.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(still(), [("y".into(), "a".into(), "b".into())]);
        // Another operation holds room for moving y: it stays while that move is under way.
        let other = Hold::new();
        center.inventory().reservations.push(Reservation {
            hold: other,
            host: "c".into(),
            vm: "y".into(),
            accel: 0,
            memory: 0,
        });
        assert_eq!(still(), []);
        center.inventory().reservations.retain(|r| r.hold != other);
        assert_eq!(still(), [("y".into(), "a".into(), "b".into())]);
        // A create took b's room since: y stays too.
        center.inventory().reservations.push(Reservation {
            hold: Hold::new(),
            host: "b".into(),
            vm: "created".into(),
            accel: 3 << 29,
            memory: 3 << 29,
        });
        assert_eq!(still(), []);
    }

    #[test]
    fn leaving_maintenance_whose_event_could_not_be_written_still_answers_the_host() {
        let scratch = ScratchCenter::open("exit-maintenance-event");
        let center = &scratch.center;
        scratch.report("a", ferry_testdata::refusing_addr());
        center.set_mode("a", HostMode::Maintenance).unwrap();
        scratch.fail_writes("INSERT ON events");
        let view = center.exit_maintenance("a").unwrap();
        assert_eq!(view.mode, HostMode::Active.name());
        assert_eq!(center.inventory().hosts["a"].mode, HostMode::Active);
    }

    #[test]
    fn a_holding_that_cannot_begin_gives_back_its_own_room_only() {
        let scratch = ScratchCenter::open("own-room");
        let center = &scratch.center;
        // An operation under way holds room for moving v to b; a second plan (a balance
        // sent twice) holds room for the same move, then cannot begin.
        let running = move_v_from_a_to_b();
        center.reserve(std::slice::from_ref(&running));
        let again = move_v_from_a_to_b();
        center.reserve(std::slice::from_ref(&again));
        center.release_room(std::slice::from_ref(&again));
        let holds: Vec<Hold> = (center.inventory().reservations.iter())
            .map(|r| r.hold)
            .collect();
        assert_eq!(
            holds,
            [running.hold],
            "the running operation keeps its room"
        );
    }

    #[test]
    fn moves_never_made_give_their_room_back() {
        let scratch = ScratchCenter::open("unmade-moves");
        let center = &scratch.center;
        let m = move_v_from_a_to_b();
        center.reserve(std::slice::from_ref(&m));
        assert_eq!(center.inventory().reservations.len(), 1);
        // A term this replica does not lead in: no move is made.
        let records = center.run_moves(std::slice::from_ref(&m), "test", 0, u64::MAX);
        assert!(records.is_empty());
        assert!(center.inventory().reservations.is_empty());
    }
}
