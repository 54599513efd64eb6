//! `ferry demo`: two host daemons on loopback, an mlp-train VM migrated live between
//! them in mid-training, and the result compared with an unmigrated run.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferry_host::CreateVm;
use serde_json::{json, Value};

use crate::cmd::host::LoopbackPair;
use crate::cmd::last_field;
use crate::cmd::migrate::{follow, spinner, summary};
use ferry_client::ApiClient;

/// Training steps of the demo VM (about 9 s on a 2-core machine).
const STEPS: u64 = 3000;
/// Migrate once this share of the steps is done.
const MIGRATE_AT: f64 = 0.4;

/// `ferry demo`.
#[derive(Args)]
#[command(
    after_help = "With --json the last line is one JSON object: downtime_ms, total_ms, rounds, \
    bytes_sent, identical, checksum, reference_checksum, migrated_at_step, report."
)]
pub struct DemoArgs {
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Training steps.
    #[arg(long, default_value_t = STEPS)]
    pub steps: u64,
}

fn guest_args(steps: u64) -> Vec<String> {
    let every = (steps / 30).max(1);
    format!(
        "--steps {steps} --hidden 512 --batch 128 --inputs 128 --samples 8192 --print-every {every}"
    )
    .split(' ')
    .map(str::to_string)
    .collect()
}

/// `(step, loss)` from mlp-train's `step=N loss=X ...` lines.
fn losses(console: &str) -> Vec<(u64, f64)> {
    console
        .lines()
        .filter_map(|line| {
            let mut step = None;
            let mut loss = None;
            for word in line.split_whitespace() {
                if let Some(v) = word.strip_prefix("step=") {
                    step = v.parse().ok();
                } else if let Some(v) = word.strip_prefix("loss=") {
                    loss = v.parse().ok();
                }
            }
            Some((step?, loss?))
        })
        .collect()
}

fn vm_state(vm: &Value) -> &str {
    vm.get("state").and_then(Value::as_str).unwrap_or("")
}

/// Waits for VM `id` on `client` to end; returns its console.
fn wait_end(client: &ApiClient, id: &str, timeout: Duration) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let vm: Value = client.get(&format!("/v1/vms/{id}"))?;
        match vm_state(&vm) {
            "exited" => return client_console(client, id),
            "running" | "migrating" | "paused" => {}
            other => bail!("VM {id} ended as {other}: {vm}"),
        }
        if started.elapsed() > timeout {
            bail!("VM {id} still running after {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// VM `id`'s whole console tail (64 KiB).
fn client_console(client: &ApiClient, id: &str) -> anyhow::Result<String> {
    client.get_text(&format!("/v1/vms/{id}/console"))
}

/// `ferry demo`.
pub fn demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    ferry_vmm::check_kvm().map_err(|e| anyhow::anyhow!("the demo runs VMs on KVM: {e}"))?;
    let pair = LoopbackPair::start(4 << 30)?;
    let (a, b, ca, cb) = (&pair.a, &pair.b, &pair.client_a, &pair.client_b);
    say(format!(
        "host a: API http://{}, migrations {}\nhost b: API http://{}, migrations {}",
        a.api_addr, a.migration_addr, b.api_addr, b.migration_addr
    ));

    let request = CreateVm {
        workload: "mlp-train".into(),
        args: guest_args(args.steps),
        memory: 256 << 20,
        accel_memory: 256 << 20,
        attach: Vec::new(),
    };
    let vm: Value = ca.post("/v1/vms", &request)?;
    let id = vm["id"].as_str().context("no VM id")?.to_string();
    say(format!(
        "started {id} on host a: mlp-train {} (256 MiB RAM, 256 MiB accelerator memory)",
        request.args.join(" ")
    ));

    // Let it train for a while, then move it.
    let migrate_step = (args.steps as f64 * MIGRATE_AT) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let console = client_console(ca, &id)?;
        if losses(&console)
            .last()
            .is_some_and(|&(s, _)| s >= migrate_step)
        {
            break;
        }
        let vm: Value = ca.get(&format!("/v1/vms/{id}"))?;
        if vm_state(&vm) != "running" {
            bail!("the VM ended before the migration point: {vm}");
        }
        if Instant::now() > deadline {
            bail!("the VM did not reach step {migrate_step} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    say(format!(
        "{id} reached step {migrate_step}: migrating it live to host b ..."
    ));
    let bar = spinner(args.json);
    let report = follow(
        ca,
        &id,
        &ferry_host::MigrateRequest::to(&b.migration_addr.to_string()),
        &bar,
    );
    bar.finish_and_clear();
    let report = report?;
    let on_a = client_console(ca, &id)?;
    let last_on_a = losses(&on_a).last().map_or(0, |&(s, _)| s);
    say(format!("  {}", summary(&report)));
    let a_state: Value = ca.get(&format!("/v1/vms/{id}"))?;
    say(format!(
        "  host a now shows {id} as {}; host b runs it",
        vm_state(&a_state)
    ));

    let console = wait_end(cb, &id, Duration::from_secs(120))?;
    let checksum = last_field(&console, "checksum")
        .context("the migrated run printed no checksum")?
        .to_string();
    say("loss curve (one run, two hosts):".into());
    let curve = losses(&console);
    let every = (curve.len() / 12).max(1);
    for (i, &(step, loss)) in curve.iter().enumerate() {
        if i % every == 0 || i + 1 == curve.len() || step == last_on_a {
            let host = if step <= last_on_a { "a" } else { "b" };
            let mark = if step == last_on_a {
                "   <- last step on host a; migrated here"
            } else {
                ""
            };
            say(format!(
                "  step {step:>6}  loss {loss:.6}  (host {host}){mark}"
            ));
        }
    }

    say("reference: the same workload without migration, on host a ...".into());
    let reference: Value = ca.post("/v1/vms", &request)?;
    let ref_id = reference["id"].as_str().context("no VM id")?.to_string();
    let ref_console = wait_end(ca, &ref_id, Duration::from_secs(120))?;
    let ref_checksum = last_field(&ref_console, "checksum")
        .context("the reference run printed no checksum")?
        .to_string();
    let identical = checksum == ref_checksum;
    say(format!(
        "final checksum migrated {checksum} vs unmigrated {ref_checksum}: {}",
        if identical {
            "IDENTICAL — the workload did not notice the move"
        } else {
            "DIFFERENT"
        }
    ));
    if args.json {
        println!(
            "{}",
            json!({
                "downtime_ms": report.downtime_ms,
                "total_ms": report.total_ms,
                "rounds": report.rounds,
                "bytes_sent": report.bytes_sent,
                "identical": identical,
                "checksum": checksum,
                "reference_checksum": ref_checksum,
                "migrated_at_step": last_on_a,
                "report": report,
            })
        );
    }
    Ok(if identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
