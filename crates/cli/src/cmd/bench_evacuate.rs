//! `ferry bench evacuate`: a center and three hosts in this process, on loopback. For
//! each N, N training VMs run on host a; `maintenance enter a` empties it live. Prints
//! the time from the request to the host being empty and in maintenance, and each VM's
//! pause.

use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_api::CreateVm;
use ferry_center::inventory::MigrationRecord;
use ferry_center::operations::{Operation, OperationState};
use ferry_center::{PlaceVm, Placed};
use serde::Serialize;

use crate::cmd::loopback::LoopbackCluster;
use crate::cmd::{poll_every, poll_until};

/// Each VM: a training run that outlasts the measurement.
const GUEST_ARGS: &str =
    "--steps 100000000 --hidden 512 --batch 128 --inputs 128 --samples 8192 --print-every 50";
const VM_RAM: u64 = 64 << 20;
const VM_ACCEL: u64 = 256 << 20;

/// One evacuation, as measured.
#[derive(Serialize)]
struct Evacuation {
    vms: usize,
    /// Request to "host empty and in maintenance", ms.
    evacuate_ms: f64,
    /// Each VM's pause, ms.
    pauses_ms: Vec<f64>,
    /// Each VM's whole migration, ms.
    totals_ms: Vec<f64>,
    bytes_sent: u64,
    parallel: usize,
}

/// The evacuation measurements over a [`LoopbackCluster`].
impl LoopbackCluster {
    /// Runs `n` VMs on a, empties a, and cleans up.
    fn evacuate(&self, n: usize, parallel: usize) -> anyhow::Result<Evacuation> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let placed: Placed = self.center.post(
                "/v1/vms",
                &PlaceVm {
                    vm: CreateVm {
                        name: None,
                        workload: "mlp-train".into(),
                        args: GUEST_ARGS.split_whitespace().map(str::to_string).collect(),
                        memory: VM_RAM,
                        accel_memory: VM_ACCEL,
                        attach: Vec::new(),
                        backend: None,
                        idempotency_key: None,
                    },
                    host: Some("a".into()),
                },
            )?;
            ids.push(placed.vm.id);
        }
        // Let every VM train for a while first, so each move is of a busy VM.
        for id in &ids {
            let what = format!("{id} to start training");
            poll_until(&what, Duration::from_secs(120), || {
                let console = self.host("a").get_text(&format!("/v1/vms/{id}/console"))?;
                Ok(console.contains("step=100 ").then_some(()))
            })?;
        }
        self.wait("the VMs running on a", |v| {
            ids.iter()
                .all(|id| v.vms.iter().any(|vm| &vm.id == id && vm.state == "running"))
        })?;
        let started = Instant::now();
        let op: Operation = self
            .center
            .post("/v1/hosts/a/maintenance", &serde_json::json!({}))?;
        // Asked often: the evacuation's time is taken from when its end is seen.
        let what = format!("the evacuation of {n} VM(s) to end");
        let op = poll_every(&what, EVACUATION_WITHIN, Duration::from_millis(5), || {
            let now: Operation = self.center.get(&format!("/v1/operations/{}", op.id))?;
            Ok((now.state != OperationState::Running).then_some(now))
        })?;
        let evacuate_ms = started.elapsed().as_secs_f64() * 1e3;
        if op.state != OperationState::Done {
            bail!("evacuation of {n} VM(s) failed: {}", op.summary);
        }
        let all: Vec<MigrationRecord> = self.center.get("/v1/migrations")?;
        let mine: Vec<&MigrationRecord> = all
            .iter()
            .filter(|m| op.migrations.contains(&m.id))
            .collect();
        // Clean up: stop the VMs where they are now, and put a back in service.
        for m in &mine {
            let _: serde_json::Value = self.host(&m.to).delete(&format!("/v1/vms/{}", m.vm))?;
        }
        let _: serde_json::Value = self.center.delete("/v1/hosts/a/maintenance")?;
        self.wait("the stopped VMs gone", |v| {
            !v.vms.iter().any(|vm| ids.contains(&vm.id))
        })?;
        Ok(Evacuation {
            vms: n,
            evacuate_ms,
            pauses_ms: mine.iter().filter_map(|m| m.downtime_ms).collect(),
            totals_ms: mine.iter().filter_map(|m| m.total_ms).collect(),
            bytes_sent: mine.iter().map(|m| m.bytes_sent).sum(),
            parallel,
        })
    }
}

/// `ferry bench evacuate`.
pub fn bench_evacuate(json: bool, counts: &[usize], backend: &'static str) -> anyhow::Result<()> {
    let most = counts.iter().copied().max().unwrap_or(1);
    if counts.is_empty() || counts.contains(&0) || most > 16 {
        bail!("--vms takes counts from 1 to 16");
    }
    let parallel = 2;
    // Every host has room for all of them.
    let capacity = (most as u64) * (VM_RAM + VM_ACCEL);
    let cluster = LoopbackCluster::start(parallel, capacity, 0, backend)?;
    if !json {
        crate::cmd::print_line(format_args!(
            "evacuating host a (mlp-train VMs, {} MiB RAM + {} MiB accelerator each, {parallel} migrations at once, 3 hosts on loopback)",
            VM_RAM >> 20,
            VM_ACCEL >> 20
        ))?;
        crate::cmd::print_line(format_args!(
            "{:>4} {:>14} {:>10}  pauses (ms)",
            "VMs", "evacuate (ms)", "MiB sent"
        ))?;
    }
    for &n in counts {
        let e = cluster.evacuate(n, parallel)?;
        if json {
            crate::cmd::print_line(format_args!("{}", serde_json::to_string(&e)?))?;
        } else {
            let pauses: Vec<String> = e.pauses_ms.iter().map(|p| format!("{p:.1}")).collect();
            crate::cmd::print_line(format_args!(
                "{:>4} {:>14.0} {:>10.1}  {}",
                e.vms,
                e.evacuate_ms,
                e.bytes_sent as f64 / (1 << 20) as f64,
                pauses.join(", ")
            ))?;
        }
    }
    Ok(())
}

/// The longest an evacuation may take: seconds a VM, even for the most VMs benched.
const EVACUATION_WITHIN: Duration = Duration::from_secs(600);
