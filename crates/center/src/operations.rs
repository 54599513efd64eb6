//! What the center does to the cluster: live migrations it orders through the hosts'
//! APIs (each one verified on the destination), host maintenance (evacuation) and
//! balancing. One operation runs at a time, so two plans never count on the same room.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::VmInfo;
use ferry_api::VmState;
use ferry_api::{MigrationState, MigrationStatus};
use ferry_migrate::MigrationReport;
use serde::{Deserialize, Serialize};

use crate::balance::{self, BalancePlan, MovableVm};
use crate::inventory::{unix_ms, Event, HostMode, MigrationRecord, Reservation, VmRecord};
use crate::placement::{self, Need};
use crate::{Center, CenterError};

/// How often a running migration's progress is polled.
const POLL: Duration = Duration::from_millis(100);
/// How long the source may be unreachable before the center gives up following it.
const LOST_CONTACT: Duration = Duration::from_secs(15);

/// A long action of the center (maintenance, balancing), followed by polling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    /// Id.
    pub id: u64,
    /// "maintenance" or "balance".
    pub kind: String,
    /// Host it is about, for maintenance.
    pub host: Option<String>,
    /// "running", "done" (everything worked) or "incomplete".
    pub state: String,
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

/// A move to make: the VM, where it is and where it goes.
#[derive(Debug, Clone)]
struct Move {
    vm: VmRecord,
    to: String,
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

    fn update_operation(&self, id: u64, f: impl FnOnce(&mut Operation)) {
        if let Some(op) = self
            .operations
            .lock()
            .expect("operations lock")
            .get_mut(&id)
        {
            f(op);
        }
    }

    /// Registers a new operation, unless one is running.
    fn begin_operation(
        &self,
        kind: &str,
        host: Option<&str>,
        planned: &[Move],
    ) -> Result<Operation, CenterError> {
        let mut ops = self.operations.lock().expect("operations lock");
        if let Some(running) = ops.values().find(|op| op.state == "running") {
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
        let op = Operation {
            id: ops.keys().next_back().map_or(1, |id| id + 1),
            kind: kind.into(),
            host: host.map(str::to_string),
            state: "running".into(),
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
        Ok(op)
    }

    /// Holds room on each move's destination until the move ends.
    fn reserve(&self, moves: &[Move]) {
        let mut inventory = self.inventory();
        for m in moves {
            inventory.reservations.push(Reservation {
                host: m.to.clone(),
                vm: m.vm.id.clone(),
                accel: m.vm.info.accel_memory,
                memory: m.vm.info.memory + m.vm.info.accel_memory,
            });
        }
    }

    /// Live-migrates `m.vm` to `m.to` through the source host's API, follows it, and
    /// checks the VM runs on the destination. Returns the migration's record.
    fn move_vm(&self, m: &Move, reason: &str, op: u64) -> MigrationRecord {
        let mut record = MigrationRecord {
            vm: m.vm.id.clone(),
            from: m.vm.host.clone(),
            to: m.to.clone(),
            reason: reason.into(),
            state: "running".into(),
            started_ms: unix_ms(),
            ..MigrationRecord::default()
        };
        match self.store().add_migration(&record) {
            Ok(id) => record.id = id,
            Err(e) => {
                record.state = "failed".into();
                record.error = Some(e.to_string());
                return record;
            }
        }
        self.inventory().add_migration(record.clone());
        self.metrics().migration_started();
        self.update_operation(op, |o| o.migrations.push(record.id));
        let outcome = self.follow_migration(m, record.id);
        let mut inventory = self.inventory();
        inventory
            .reservations
            .retain(|r| !(r.vm == m.vm.id && r.host == m.to));
        let entry = inventory
            .migration_mut(record.id)
            .expect("migration recorded above");
        entry.finished_ms = Some(unix_ms());
        entry.progress = None;
        let arrived = match outcome {
            Ok((report, arrived)) => {
                entry.state = "succeeded".into();
                entry.downtime_ms = Some(report.downtime_ms);
                entry.total_ms = Some(report.total_ms);
                entry.bytes_sent = report.bytes_sent;
                entry.rounds = report.rounds;
                Some(arrived)
            }
            Err(why) => {
                entry.state = "failed".into();
                entry.error = Some(why);
                None
            }
        };
        let record = entry.clone();
        self.metrics().migration_ended(&record);
        let moved = arrived.map(|info| VmRecord {
            id: m.vm.id.clone(),
            host: m.to.clone(),
            info,
        });
        if let Some(vm) = &moved {
            inventory.put_vm(vm.clone());
        }
        drop(inventory);
        let message = match (&record.error, record.downtime_ms) {
            (None, Some(pause)) => format!(
                "VM {} moved {} -> {} ({reason}): pause {pause:.1} ms, {} MiB in {} round(s)",
                record.vm,
                record.from,
                record.to,
                record.bytes_sent >> 20,
                record.rounds
            ),
            (error, _) => format!(
                "VM {} could not move {} -> {} ({reason}); it keeps running on {}: {}",
                record.vm,
                record.from,
                record.to,
                record.from,
                error.as_deref().unwrap_or("unknown")
            ),
        };
        let mut store = self.store();
        let written = store.put_migration(&record).and_then(|()| match &moved {
            Some(vm) => store.put_vms(&[vm], &[]),
            None => Ok(()),
        });
        drop(store);
        if let Err(e) = written {
            tracing::error!("recording migration {}: {e}", record.id);
        }
        if let Err(e) = self.record(&[Event::now("migration", message)]) {
            tracing::error!("recording an event: {e}");
        }
        record
    }

    /// Starts the migration on the source and polls it to its end; then verifies the VM
    /// on the destination. The error says what went wrong.
    fn follow_migration(
        &self,
        m: &Move,
        record_id: i64,
    ) -> Result<(MigrationReport, VmInfo), String> {
        let (source, dest) = {
            let inventory = self.inventory();
            let host = |name: &str| {
                inventory
                    .hosts
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("host {name} is not in the inventory"))
            };
            (host(&m.vm.host)?, host(&m.to)?)
        };
        let src = self.host_client(&source).map_err(|e| e.to_string())?;
        let dst = self.host_client(&dest).map_err(|e| e.to_string())?;
        let path = format!("/v1/vms/{}", m.vm.id);
        src.post::<_, MigrationStatus>(
            &format!("{path}/migrate"),
            &serde_json::json!({ "to": dest.info.migration_addr }),
        )
        .map_err(|e| format!("host {} did not start the migration: {e:#}", source.name))?;
        let mut last_contact = Instant::now();
        let report = loop {
            std::thread::sleep(POLL);
            match src.get::<MigrationStatus>(&format!("{path}/migration")) {
                Ok(status) => {
                    last_contact = Instant::now();
                    match status.state {
                        MigrationState::Succeeded => {
                            break status.report.ok_or_else(|| {
                                format!("host {} reported success without a report", source.name)
                            })?
                        }
                        MigrationState::Failed
                        | MigrationState::Cancelled
                        | MigrationState::InDoubt => {
                            return Err(status
                                .error
                                .unwrap_or_else(|| "the migration failed".into()))
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
                    return Err(format!(
                    "lost contact with host {} during the migration ({e:#}); check the VM there",
                    source.name
                ))
                }
                Err(_) => {}
            }
        };
        // Verify: the destination has it, running (or already finished cleanly).
        let arrived: VmInfo = dst.get(&path).map_err(|e| {
            format!(
                "host {} reported success, but host {} does not show the VM: {e:#}",
                source.name, dest.name
            )
        })?;
        match &arrived.state {
            VmState::Running | VmState::Exited { code: 0 } => Ok((report, arrived)),
            other => Err(format!(
                "the VM arrived on host {} but is {other:?} there",
                dest.name
            )),
        }
    }

    /// Runs `moves`, at most `parallel` at once; returns each one's record.
    fn run_moves(&self, moves: &[Move], reason: &str, op: u64) -> Vec<MigrationRecord> {
        let next = AtomicUsize::new(0);
        let records = std::sync::Mutex::new(Vec::new());
        let workers = self.config.parallel.clamp(1, moves.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(m) = moves.get(i) else { break };
                    let record = self.move_vm(m, reason, op);
                    records.lock().expect("records lock").push(record);
                });
            }
        });
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
        Ok(())
    }

    /// Puts `host` in maintenance: plans a place for each of its VMs on other hosts with
    /// room, refuses (moving nothing) if one has none, then moves them in the background.
    /// Follow it with [`Self::operation`].
    pub fn enter_maintenance(self: &Arc<Self>, host: &str) -> Result<Operation, CenterError> {
        self.up_host(host)?;
        let moves = {
            let inventory = self.inventory();
            if inventory.hosts[host].mode == HostMode::Evacuating {
                return Err(CenterError::Conflict(format!(
                    "host {host} is already being evacuated"
                )));
            }
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
                let need = Need::of(vm.info.memory, vm.info.accel_memory);
                match placement::choose(&open, need) {
                    Ok(to) => {
                        let to = to.name.clone();
                        let slot = open.iter_mut().find(|h| h.name == to).expect("chosen");
                        placement::take(slot, need);
                        moves.push(Move { vm, to });
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
            moves
        };
        let op = self.begin_operation("maintenance", Some(host), &moves)?;
        self.reserve(&moves);
        self.set_mode(host, HostMode::Evacuating)?;
        self.record(&[Event::now(
            "maintenance",
            format!(
                "host {host} entering maintenance: {} VM(s) to move",
                moves.len()
            ),
        )])?;
        let center = self.clone();
        let host = host.to_string();
        let id = op.id;
        std::thread::Builder::new()
            .name(format!("evacuate-{host}"))
            .spawn(move || center.evacuate(&host, &moves, id))
            .map_err(|e| CenterError::Conflict(format!("cannot start the evacuation: {e}")))?;
        Ok(op)
    }

    fn evacuate(&self, host: &str, moves: &[Move], op: u64) {
        let started = Instant::now();
        let records = self.run_moves(moves, &format!("maintenance of {host}"), op);
        let problems: Vec<String> = records
            .iter()
            .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.vm)))
            .collect();
        let left: Vec<String> = self
            .inventory()
            .live_vms_on(host)
            .into_iter()
            .map(|vm| vm.id)
            .collect();
        let (mode, state, summary) = if problems.is_empty() && left.is_empty() {
            (
                HostMode::Maintenance,
                "done",
                format!(
                    "host {host} is empty and in maintenance: {} VM(s) moved in {:.1} s",
                    records.len(),
                    started.elapsed().as_secs_f64()
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
                "incomplete",
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
            o.state = state.into();
            o.finished_ms = Some(unix_ms());
            o.problems = problems;
            o.summary = summary;
        });
    }

    /// Returns `host` to service.
    pub fn exit_maintenance(&self, host: &str) -> Result<crate::HostView, CenterError> {
        let mode = self
            .inventory()
            .hosts
            .get(host)
            .map(|h| h.mode.clone())
            .ok_or_else(|| CenterError::NotFound(format!("no host named '{host}' has joined")))?;
        if mode == HostMode::Evacuating {
            return Err(CenterError::Conflict(format!(
                "host {host} is being evacuated; wait for the evacuation to end"
            )));
        }
        if mode != HostMode::Active {
            self.set_mode(host, HostMode::Active)?;
            self.record(&[Event::now(
                "maintenance",
                format!("host {host} is back in service"),
            )])?;
        }
        self.host(host)
    }

    /// The balance plan for the cluster now.
    pub fn balance_plan(&self) -> BalancePlan {
        let inventory = self.inventory();
        let open = inventory.open_hosts(unix_ms(), self.down_after_ms());
        let vms: Vec<MovableVm> = open
            .iter()
            .flat_map(|h| inventory.live_vms_on(&h.name))
            .filter(|vm| vm.info.state == VmState::Running)
            .map(|vm| MovableVm {
                need: Need::of(vm.info.memory, vm.info.accel_memory),
                load: vm.info.accel_load,
                host: vm.host,
                id: vm.id,
            })
            .collect();
        balance::plan(&open, &vms, self.config.balance_threshold)
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
        let moves: Vec<Move> = {
            let inventory = self.inventory();
            plan.moves
                .iter()
                .filter_map(|m| {
                    inventory.vms().get(&m.vm).map(|vm| Move {
                        vm: vm.clone(),
                        to: m.to.clone(),
                    })
                })
                .collect()
        };
        let op = self.begin_operation("balance", None, &moves)?;
        self.reserve(&moves);
        self.record(&[Event::now("balance", plan.summary.clone())])?;
        let center = self.clone();
        let id = op.id;
        std::thread::Builder::new()
            .name("balance".into())
            .spawn(move || {
                let records = center.run_moves(&moves, "balance", id);
                let problems: Vec<String> = records
                    .iter()
                    .filter_map(|r| r.error.as_ref().map(|e| format!("{}: {e}", r.vm)))
                    .collect();
                let moved = records.len() - problems.len();
                center.update_operation(id, |o| {
                    o.state = if problems.is_empty() {
                        "done"
                    } else {
                        "incomplete"
                    }
                    .into();
                    o.finished_ms = Some(unix_ms());
                    o.summary = format!("balance: {moved} of {} move(s) made", records.len());
                    o.problems = problems;
                });
            })
            .map_err(|e| CenterError::Conflict(format!("cannot start balancing: {e}")))?;
        Ok(BalanceOutcome {
            plan,
            operation: Some(op),
        })
    }
}
