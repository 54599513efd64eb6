//! `ferry bench migrate`: live migration vs stop-and-copy for a read-mostly (llm-decode)
//! and an all-dirty (mlp-train) VM at several accelerator memory sizes, between two
//! daemons on loopback, with the loopback's raw TCP throughput measured in the same run.
//! Each figure is the median over several migrations of one VM back and forth, and the
//! link's rate the median of samples taken just before and just after that figure's VM
//! runs: single runs on a shared machine vary by tens of percent, and its slow spells
//! last seconds, so a rate measured once at the start can be far from the one a later
//! figure ran at.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ferry_api::{CreateVm, MigrateRequest};
use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::Value;

use crate::cmd::bench::median;
use crate::cmd::host::LoopbackPair;
use crate::cmd::migrate::follow;
use crate::cmd::poll_until;
use crate::cmd::shaped_link::{self, HostProcess, ShapedLink};
use ferry_client::ApiClient;
use ferry_migrate::DeviceTransfer;

/// Device memory of the large training row (`--link` only).
const LARGE_TRAINING_ACCEL: u64 = 512 << 20;

/// Samples of the loopback's rate taken before each figure's VM starts, and after it is
/// gone (with no VM running).
const LINK_SAMPLES_BEFORE: usize = 2;
const LINK_SAMPLES_AFTER: usize = 1;
/// Bytes per link sample.
const LINK_SAMPLE_BYTES: u64 = 1 << 30;

/// One kind of migration measured: medians over `--repeats` migrations (each field on
/// its own), and every migration's total and pause.
#[derive(Debug, Serialize)]
struct MigrationFigure {
    /// The link the two hosts migrate over ("raw loopback TCP", or shaped to a rate).
    link: String,
    /// Migrations each median is taken over.
    repeats: usize,
    workload: &'static str,
    accel_mib: u64,
    mode: String,
    /// How device memory moved in each migration ("precopy", "replay", "replay, then
    /// precopy"), in order.
    device_transfer_each: Vec<String>,
    downtime_ms: f64,
    total_ms: f64,
    bytes_sent: u64,
    rounds: u64,
    /// Highest throttle any of the migrations needed.
    max_throttle_pct: u64,
    /// Workload progress rate during the migrations (their windows together: one is
    /// often shorter than a step or token) ÷ before them.
    throughput_during_vs_before: f64,
    /// Raw throughput of the link for this figure: median of its samples, MiB/s.
    link_mib_s: f64,
    /// Those samples, MiB/s, in order (before the VM, then after).
    link_samples_mib_s: Vec<f64>,
    /// Total time ÷ (bytes sent ÷ the link's raw throughput), median over the migrations.
    total_vs_link_time: f64,
    /// Raw loopback throughput with the VM running (its workload competes with both
    /// ends of a migration for the same cores), one sample before the migrations, MiB/s.
    /// Not used for `total_vs_link_time`: it shows what the workload leaves of the link.
    busy_link_mib_s: f64,
    /// Each migration's total time, in order.
    total_ms_each: Vec<f64>,
    /// Each migration's pause, in order.
    downtime_ms_each: Vec<f64>,
    /// Each migration's highest throttle, %, in order.
    throttle_pct_each: Vec<u8>,
    /// Why replay gave way to pre-copy in each migration, in order (null where it did
    /// not, or was not tried).
    replay_gave_way_each: Vec<Option<String>>,
}

/// What [`measure`] saw of one VM.
struct Measured {
    runs: Vec<Run>,
    /// The workload's steps or tokens per second before the migrations.
    before: f64,
    /// Raw loopback throughput with the VM running, bytes/s.
    busy_link: f64,
}

/// One migration of the VM.
struct Run {
    report: ferry_migrate::MigrationReport,
    /// Steps or tokens the workload made from just before the migration to just after.
    progress: u64,
    /// That window.
    window: Duration,
}

/// Raw TCP throughput over loopback: 1 MiB writes for `bytes`, bytes/s.
fn loopback_throughput(bytes: u64) -> anyhow::Result<f64> {
    shaped_link::tcp_throughput(bytes, || TcpListener::bind("127.0.0.1:0"))
}

/// The workload and its arguments for `accel` bytes of device memory; `progress_key` is
/// the console field that counts its work.
fn workload(name: &'static str, accel: u64) -> (Vec<String>, &'static str) {
    let mib = accel >> 20;
    let (args, key) = match name {
        // Weights fill 60% of device memory and are only read; the KV cache (room for
        // 1024 tokens) grows by one position per token.
        "llm-decode" => (
            format!("--weights-mib {} --tokens 1024 --print-every 1", mib * 60 / 100),
            "token",
        ),
        // Half of device memory is the dataset; parameters and Adam state are rewritten
        // every step.
        // Four hidden layers of 2048: about 180 MiB of weights and Adam state rewritten
        // every step, faster than a 10 Gbit/s link sends it.
        "mlp-train-large" => (
            "--steps 10000000 --hidden 2048 --layers 4 --batch 256 --inputs 1024 --print-every 1"
                .to_string(),
            "step",
        ),
        "mlp-train" => (
            format!(
                "--steps 10000000 --hidden 512 --batch 128 --inputs 128 --samples {} --print-every 10",
                (accel / 2 / (128 * 4)).max(8192)
            ),
            "step",
        ),
        other => unreachable!("bench migrate has no workload {other}"),
    };
    (args.split(' ').map(str::to_string).collect(), key)
}

fn count_now(client: &ApiClient, id: &str, key: &str) -> anyhow::Result<Option<u64>> {
    let vm: ferry_api::VmInfo = client.get(&format!("/v1/vms/{id}"))?;
    Ok(crate::cmd::last_field(&vm.console_tail, key).and_then(|v| v.parse().ok()))
}

/// The two hosts a benchmark migrates between, and the link between them.
struct Ends {
    client_a: ApiClient,
    client_b: ApiClient,
    addr_a: String,
    addr_b: String,
    /// Raw TCP throughput from a to b over `bytes`, bytes/s.
    probe: Box<dyn Fn(u64) -> anyhow::Result<f64>>,
    /// What the link is, for the header.
    link: String,
    /// What keeps the hosts and the link up: dropped at the end.
    _held: Box<dyn std::any::Any>,
}

impl Ends {
    /// `n` samples of the link's raw throughput, bytes/s.
    fn samples(&self, n: usize) -> anyhow::Result<Vec<f64>> {
        (0..n).map(|_| (self.probe)(LINK_SAMPLE_BYTES)).collect()
    }

    /// Two in-process hosts on loopback.
    fn loopback(prefault: u64, backend: &'static str) -> anyhow::Result<Self> {
        let pair = LoopbackPair::start(1 << 40, backend)?;
        // The destination's device memory is backed up front, as a GPU's is; freed
        // buffers stay backed between runs on both hosts.
        pair.b
            .host
            .prefault_accel_memory(prefault)
            .context("backing the destination's accelerator memory")?;
        Ok(Self {
            client_a: pair.client_a.clone(),
            client_b: pair.client_b.clone(),
            addr_a: pair.a.migration_addr.to_string(),
            addr_b: pair.b.migration_addr.to_string(),
            probe: Box::new(loopback_throughput),
            link: "raw loopback TCP".into(),
            _held: Box::new(pair),
        })
    }

    /// Host a outside and host b inside a network namespace, joined by a veth pair
    /// shaped to `rate`; each host on its own half of this process's cores if `split`.
    fn shaped(
        rate: &str,
        prefault: u64,
        backend: &'static str,
        split: bool,
    ) -> anyhow::Result<Self> {
        // Checked before the link is made: a machine of one core has nothing to split.
        let cpus = if split {
            Some(shaped_link::split_cpus(
                &shaped_link::allowed_cpus()?,
                shaped_link::core_of,
            )?)
        } else {
            None
        };
        let link = ShapedLink::create(rate)?;
        let secret = ferry_migrate::Secret::generate_hex();
        let exe = std::env::current_exe()?;
        let serve = |command: &mut std::process::Command, name: &str, addr: &str| {
            command
                .args(["host", "serve", "--name", name])
                .args(["--listen", &format!("{addr}:0")])
                .args(["--migration-listen", &format!("{addr}:0")])
                .args(["--memory-capacity", "1T"])
                .args(["--accel-prefault", &prefault.to_string()])
                .args(["--backend", crate::cmd::backend::flag(backend)]);
        };
        let mut a = std::process::Command::new(&exe);
        serve(&mut a, "a", shaped_link::ADDR_A);
        let mut b = link.command_inside(&exe);
        serve(&mut b, "b", shaped_link::ADDR_B);
        let mut described = format!("raw TCP through a veth pair shaped to {rate} (tc tbf)");
        if let Some((cpus_a, cpus_b)) = &cpus {
            shaped_link::run_on(&mut a, cpus_a);
            shaped_link::run_on(&mut b, cpus_b);
            described.push_str(&format!(
                ", host a on CPU {} and host b on CPU {}",
                shaped_link::cpu_list(cpus_a),
                shaped_link::cpu_list(cpus_b)
            ));
        }
        let a = HostProcess::start(a, &secret)?;
        let b = HostProcess::start(b, &secret)?;
        let token =
            ferry_migrate::Secret::new(secret.into_bytes())?.token(ferry_migrate::Purpose::HostApi);
        let client = |api: &str| ApiClient::new(api, token.as_bytes());
        let link = std::sync::Arc::new(link);
        let probing = link.clone();
        Ok(Self {
            client_a: client(&a.api)?,
            client_b: client(&b.api)?,
            addr_a: a.migration_addr.clone(),
            addr_b: b.migration_addr.clone(),
            probe: Box::new(move |bytes| probing.throughput(bytes)),
            link: described,
            // Hosts first, then the link they run across.
            _held: Box::new((a, b, link)),
        })
    }
}

/// Runs the benchmark, printing each figure: between two hosts on loopback, or across a
/// link shaped to `link` (e.g. `10gbit`; root only), each host then on its own half of
/// the cores if `split_cpus`.
pub fn bench_migrate(
    json: bool,
    sizes: &[u64],
    link: Option<&str>,
    workloads: &[String],
    repeats: usize,
    backend: &'static str,
    split_cpus: bool,
) -> anyhow::Result<()> {
    ferry_vmm::check_kvm().map_err(|e| anyhow::anyhow!("the benchmark runs VMs on KVM: {e}"))?;
    // Checked before the hosts start: a run with no row would measure nothing.
    let rows_asked = workloads.iter().any(|w| w != "mlp-train-large") || link.is_some();
    anyhow::ensure!(
        rows_asked,
        "mlp-train-large runs only across a shaped link (--link RATE): with --workloads mlp-train-large alone there is nothing to measure"
    );
    let largest = sizes
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(LARGE_TRAINING_ACCEL);
    // Backing the cpu backend's device memory up front, as a GPU's is (a GPU's needs
    // nothing: it is its own).
    let prefault = if backend == ferry_accel::backend::CPU {
        largest + (64 << 20)
    } else {
        0
    };
    let ends = match link {
        None => Ends::loopback(prefault, backend)?,
        Some(rate) => Ends::shaped(rate, prefault, backend, split_cpus)?,
    };
    if !json {
        crate::cmd::print_line(format_args!(
            "each row: medians over {repeats} migrations of one VM, back and forth; link: {} \
             (one stream, 1 MiB writes), median of {} samples of {} MiB taken just before \
             and after the row's VM runs; busy link: one sample with the VM running",
            ends.link,
            LINK_SAMPLES_BEFORE + LINK_SAMPLES_AFTER,
            LINK_SAMPLE_BYTES >> 20
        ))?;
        crate::cmd::print_line(format_args!(
            "{:<15} {:>9} {:<14} {:<13} {:>9} {:>9} {:>9} {:>7} {:>9} {:>13} {:>10} {:>11} {:>10}",
            "workload",
            "accel",
            "mode",
            "device",
            "pause ms",
            "total ms",
            "MiB sent",
            "rounds",
            "throttle",
            "during/before",
            "link MiB/s",
            "total/link",
            "busy link"
        ))?;
    }
    let mut rows: Vec<(&'static str, u64)> = Vec::new();
    let wanted = |name: &str| workloads.iter().any(|w| w == name);
    for name in ["llm-decode", "mlp-train"]
        .into_iter()
        .filter(|n| wanted(n))
    {
        rows.extend(sizes.iter().map(|&accel| (name, accel)));
    }
    if link.is_some() && wanted("mlp-train-large") {
        // A training VM that dirties device memory faster than the shaped link sends it.
        rows.push(("mlp-train-large", LARGE_TRAINING_ACCEL));
    }
    for (name, accel) in rows {
        {
            // The training VM that outruns the link: today's throttled pre-copy, replay
            // of its device commands, and what auto picks, in the same run.
            let modes: &[(&str, DeviceTransfer)] = if name == "mlp-train-large" {
                &[
                    ("live", DeviceTransfer::Precopy),
                    ("live", DeviceTransfer::Replay),
                    ("live", DeviceTransfer::Auto),
                    ("stop-and-copy", DeviceTransfer::Precopy),
                ]
            } else {
                &[
                    ("live", DeviceTransfer::Auto),
                    ("stop-and-copy", DeviceTransfer::Precopy),
                ]
            };
            for &(mode, device) in modes {
                let mut link = ends.samples(LINK_SAMPLES_BEFORE)?;
                let measured =
                    measure(&ends, name, accel, (mode, device), repeats).with_context(|| {
                        format!(
                            "{name} with {} MiB, {mode} ({})",
                            accel >> 20,
                            device.name()
                        )
                    })?;
                link.extend(ends.samples(LINK_SAMPLES_AFTER)?);
                let figure = figure(&ends.link, name, accel, mode, &measured, &link);
                if json {
                    crate::cmd::print_line(format_args!("{}", serde_json::to_string(&figure)?))?;
                } else {
                    crate::cmd::print_line(format_args!(
                        "{:<15} {:>5} MiB {:<14} {:<13} {:>9.1} {:>9.0} {:>9.1} {:>7} {:>8}% {:>13.2} {:>10.0} {:>11.2} {:>10.0}",
                        figure.workload,
                        figure.accel_mib,
                        figure.mode,
                        device_column(device, &figure.device_transfer_each),
                        figure.downtime_ms,
                        figure.total_ms,
                        figure.bytes_sent as f64 / (1 << 20) as f64,
                        figure.rounds,
                        figure.max_throttle_pct,
                        figure.throughput_during_vs_before,
                        figure.link_mib_s,
                        figure.total_vs_link_time,
                        figure.busy_link_mib_s
                    ))?;
                }
            }
        }
    }
    Ok(())
}

/// The device column: what was asked for, and what happened when it differs (auto's
/// pick, or a replay that gave way).
fn device_column(asked: DeviceTransfer, each: &[String]) -> String {
    let mut used: Vec<&str> = each.iter().map(String::as_str).collect();
    used.sort_unstable();
    used.dedup();
    match (asked, used.as_slice()) {
        (DeviceTransfer::Auto, [one]) => format!("auto:{}", one.replace(", then ", ">")),
        (_, [one]) if *one == asked.name() => one.to_string(),
        _ => format!(
            "{}:{}",
            asked.name(),
            used.join("/").replace(", then ", ">")
        ),
    }
}

/// Starts the workload on host a, measures its rate and the link's beside it, migrates
/// it `repeats` times (`mode`, moving device memory as `device` says) and deletes it.
fn measure(
    ends: &Ends,
    name: &'static str,
    accel: u64,
    (mode, device): (&str, DeviceTransfer),
    repeats: usize,
) -> anyhow::Result<Measured> {
    let (ca, cb) = (&ends.client_a, &ends.client_b);
    let (args, key) = workload(name, accel);
    let vm: ferry_api::VmInfo = ca.post(
        "/v1/vms",
        &CreateVm {
            name: None,
            workload: name.trim_end_matches("-large").into(),
            args,
            memory: 256 << 20,
            accel_memory: accel,
            attach: Vec::new(),
            backend: None,
            idempotency_key: None,
        },
    )?;
    let id = vm.id;
    // Wait for the workload to be under way (the weights or dataset filled).
    let what = format!("{name} to start working");
    poll_until(&what, Duration::from_secs(120), || {
        Ok((count_now(ca, &id, key)?.unwrap_or(0) >= 2).then_some(()))
    })?;
    // Rate before: over a window.
    let window = Duration::from_millis(1500);
    // Counted from the workload's own lines: one gone from the console's tail (or a
    // counter that went back) would make a rate of nothing.
    let counted = || {
        count_now(ca, &id, key)?
            .with_context(|| format!("{name} printed no `{key}` count in its console's tail"))
    };
    let (t0, c0) = (Instant::now(), counted()?);
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), counted()?);
    ensure!(
        c1 >= c0,
        "{name}'s `{key}` count went back from {c0} to {c1}"
    );
    let before = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
    let busy_link = (ends.probe)(LINK_SAMPLE_BYTES)?;
    let mut runs = Vec::with_capacity(repeats);
    for i in 0..repeats {
        let (from, to, to_addr) = if i % 2 == 0 {
            (ca, cb, &ends.addr_b)
        } else {
            (cb, ca, &ends.addr_a)
        };
        if i > 0 {
            // Let the VM settle into its pace on the host it arrived at.
            std::thread::sleep(Duration::from_millis(500));
        }
        let request = MigrateRequest {
            mode: mode.to_string(),
            device,
            allow_longer_pause: true,
            max_precopy_s: 120,
            ..MigrateRequest::to(to_addr)
        };
        let c2 = count_now(from, &id, key)?.unwrap_or(0);
        let t2 = Instant::now();
        let report = follow(from, &id, &request, &ProgressBar::hidden())
            .with_context(|| format!("migration {} of {repeats}", i + 1))?;
        let t3 = Instant::now();
        let c3 = count_now(to, &id, key)?.unwrap_or(c2);
        runs.push(Run {
            report,
            progress: c3.saturating_sub(c2),
            window: t3 - t2,
        });
    }
    // Stopped where it runs now; the other host keeps a record that it migrated away
    // (which cannot be stopped there).
    let last = if repeats % 2 == 1 { cb } else { ca };
    let _: Value = last.delete(&format!("/v1/vms/{id}"))?;
    Ok(Measured {
        runs,
        before,
        busy_link,
    })
}

/// The figure for what was `measured` of `name` with `accel` bytes of device memory,
/// given the link's samples around it (bytes/s).
fn figure(
    link_name: &str,
    name: &'static str,
    accel: u64,
    mode: &str,
    measured: &Measured,
    link: &[f64],
) -> MigrationFigure {
    let (runs, before) = (&measured.runs, measured.before);
    let raw = median(&mut link.to_vec());
    let each = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let link_time = |r: &Run| r.report.bytes_sent as f64 / raw * 1e3;
    let mib_s = |bytes_s: f64| bytes_s / (1 << 20) as f64;
    MigrationFigure {
        link: link_name.to_string(),
        repeats: runs.len(),
        workload: name,
        accel_mib: accel >> 20,
        mode: mode.to_string(),
        device_transfer_each: runs
            .iter()
            .map(|r| r.report.device_transfer.clone())
            .collect(),
        downtime_ms: median(&mut each(&|r| r.report.downtime_ms)),
        total_ms: median(&mut each(&|r| r.report.total_ms)),
        bytes_sent: median(&mut each(&|r| r.report.bytes_sent as f64)) as u64,
        rounds: median(&mut each(&|r| f64::from(r.report.rounds))) as u64,
        max_throttle_pct: runs
            .iter()
            .map(|r| u64::from(r.report.max_throttle_pct))
            .max()
            .unwrap_or(0),
        throughput_during_vs_before: {
            let progress: u64 = runs.iter().map(|r| r.progress).sum();
            let window: Duration = runs.iter().map(|r| r.window).sum();
            let during = progress as f64 / window.as_secs_f64();
            if before > 0.0 {
                during / before
            } else {
                0.0
            }
        },
        link_mib_s: mib_s(raw),
        link_samples_mib_s: link.iter().map(|&s| mib_s(s)).collect(),
        total_vs_link_time: median(&mut each(&|r| r.report.total_ms / link_time(r))),
        busy_link_mib_s: mib_s(measured.busy_link),
        total_ms_each: each(&|r| r.report.total_ms),
        downtime_ms_each: each(&|r| r.report.downtime_ms),
        throttle_pct_each: runs.iter().map(|r| r.report.max_throttle_pct).collect(),
        replay_gave_way_each: runs
            .iter()
            .map(|r| r.report.replay.as_ref()?.fell_back.clone())
            .collect(),
    }
}
