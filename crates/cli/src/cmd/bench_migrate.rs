//! `ferry bench migrate`: live migration vs stop-and-copy for a read-mostly (llm-decode)
//! and an all-dirty (mlp-train) VM at several accelerator memory sizes, between two
//! daemons on loopback, with the loopback's raw TCP throughput measured in the same run.
//! Each figure is the median over several migrations of one VM back and forth, and the
//! link's rate the median of several samples: single runs on a shared machine vary by
//! tens of percent.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_host::{CreateVm, MigrateRequest};
use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::Value;

use crate::cmd::bench::median;
use crate::cmd::host::LoopbackPair;
use crate::cmd::migrate::follow;
use ferry_client::ApiClient;

/// Migrations measured per figure (back and forth between the two hosts).
const REPEATS: usize = 3;
/// Samples of the loopback's rate.
const LINK_SAMPLES: usize = 3;

/// One kind of migration measured: medians over [`REPEATS`] migrations (each field on
/// its own), and every migration's total and pause.
#[derive(Debug, Serialize)]
struct MigrationFigure {
    workload: &'static str,
    accel_mib: u64,
    mode: String,
    downtime_ms: f64,
    total_ms: f64,
    bytes_sent: u64,
    rounds: u64,
    /// Highest throttle any of the migrations needed.
    max_throttle_pct: u64,
    /// Workload progress rate during the migrations (their windows together: one is
    /// often shorter than a step or token) ÷ before them.
    throughput_during_vs_before: f64,
    /// Total time ÷ (bytes sent ÷ raw loopback throughput).
    total_vs_link_time: f64,
    /// Each migration's total time, in order.
    total_ms_each: Vec<f64>,
    /// Each migration's pause, in order.
    downtime_ms_each: Vec<f64>,
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
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..bytes >> 20 {
        s.write_all(&buf)?;
    }
    drop(s);
    let got = reader.join().expect("reader thread")?;
    let secs = started.elapsed().as_secs_f64();
    if got != bytes >> 20 << 20 {
        bail!("loopback test lost data ({got} of {bytes} bytes)");
    }
    Ok(got as f64 / secs)
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
    let vm: Value = client.get(&format!("/v1/vms/{id}"))?;
    let console = vm["console_tail"].as_str().unwrap_or("");
    Ok(crate::cmd::last_field(console, key).and_then(|v| v.parse().ok()))
}

/// Runs the benchmark, printing each figure.
pub fn bench_migrate(json: bool, sizes: &[u64]) -> anyhow::Result<()> {
    ferry_vmm::check_kvm().map_err(|e| anyhow::anyhow!("the benchmark runs VMs on KVM: {e}"))?;
    let samples = (0..LINK_SAMPLES)
        .map(|_| loopback_throughput(1 << 30))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let raw = median(&mut samples.clone());
    if json {
        let mib_s: Vec<f64> = samples.iter().map(|s| s / (1 << 20) as f64).collect();
        println!(
            "{}",
            serde_json::json!({"figure": "loopback_tcp_throughput", "mib_s": raw / (1 << 20) as f64, "samples_mib_s": mib_s})
        );
    } else {
        let (lo, hi) = samples
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        println!(
            "loopback TCP throughput (one stream, 1 MiB writes; median of {LINK_SAMPLES}): {:.0} MiB/s (samples {:.0}-{:.0})",
            raw / (1 << 20) as f64,
            lo / (1 << 20) as f64,
            hi / (1 << 20) as f64
        );
        println!("each row: medians over {REPEATS} migrations of one VM, back and forth");
        println!(
            "{:<11} {:>9} {:<14} {:>11} {:>10} {:>10} {:>7} {:>9} {:>12} {:>10}",
            "workload",
            "accel",
            "mode",
            "pause ms",
            "total ms",
            "MiB sent",
            "rounds",
            "throttle",
            "during/before",
            "total/link"
        );
    }
    let pair = LoopbackPair::start(1 << 40)?;
    // The destination's device memory is backed up front, as a GPU's is; freed buffers
    // stay backed between runs on both hosts.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    pair.b
        .host
        .prefault_accel_memory(largest + (64 << 20))
        .context("backing the destination's accelerator memory")?;
    for name in ["llm-decode", "mlp-train"] {
        for &accel in sizes {
            for mode in ["live", "stop-and-copy"] {
                let figure = measure(&pair, name, accel, mode, raw)
                    .with_context(|| format!("{name} with {} MiB, {mode}", accel >> 20))?;
                if json {
                    println!("{}", serde_json::to_string(&figure)?);
                } else {
                    println!(
                        "{:<11} {:>5} MiB {:<14} {:>11.1} {:>10.0} {:>10.1} {:>7} {:>8}% {:>12.2} {:>10.2}",
                        figure.workload,
                        figure.accel_mib,
                        figure.mode,
                        figure.downtime_ms,
                        figure.total_ms,
                        figure.bytes_sent as f64 / (1 << 20) as f64,
                        figure.rounds,
                        figure.max_throttle_pct,
                        figure.throughput_during_vs_before,
                        figure.total_vs_link_time
                    );
                }
            }
        }
    }
    Ok(())
}

fn measure(
    pair: &LoopbackPair,
    name: &'static str,
    accel: u64,
    mode: &str,
    raw: f64,
) -> anyhow::Result<MigrationFigure> {
    let (ca, cb) = (&pair.client_a, &pair.client_b);
    let (args, key) = workload(name, accel);
    let vm: Value = ca.post(
        "/v1/vms",
        &CreateVm {
            workload: name.into(),
            args,
            memory: 256 << 20,
            accel_memory: accel,
        },
    )?;
    let id = vm["id"].as_str().context("no VM id")?.to_string();
    // Wait for the workload to be under way (the weights or dataset filled).
    let started = Instant::now();
    while count_now(ca, &id, key)?.unwrap_or(0) < 2 {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{name} did not start working within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Rate before: over a window.
    let window = Duration::from_millis(1500);
    let (t0, c0) = (Instant::now(), count_now(ca, &id, key)?.unwrap_or(0));
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), count_now(ca, &id, key)?.unwrap_or(0));
    let before = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
    let mut runs = Vec::with_capacity(REPEATS);
    for i in 0..REPEATS {
        let (from, to, to_addr) = if i % 2 == 0 {
            (ca, cb, pair.b.migration_addr)
        } else {
            (cb, ca, pair.a.migration_addr)
        };
        if i > 0 {
            // Let the VM settle into its pace on the host it arrived at.
            std::thread::sleep(Duration::from_millis(500));
        }
        let request = MigrateRequest {
            mode: mode.to_string(),
            allow_longer_pause: true,
            max_precopy_s: 120,
            ..MigrateRequest::to(&to_addr.to_string())
        };
        let c2 = count_now(from, &id, key)?.unwrap_or(0);
        let t2 = Instant::now();
        let report = follow(from, &id, &request, &ProgressBar::hidden())
            .with_context(|| format!("migration {} of {REPEATS}", i + 1))?;
        let t3 = Instant::now();
        let c3 = count_now(to, &id, key)?.unwrap_or(c2);
        runs.push(Run {
            report,
            progress: c3.saturating_sub(c2),
            window: t3 - t2,
        });
    }
    let _: Value = cb.delete(&format!("/v1/vms/{id}"))?;
    let _: Value = ca.delete(&format!("/v1/vms/{id}"))?;
    let each = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let link_time = |r: &Run| r.report.bytes_sent as f64 / raw * 1e3;
    Ok(MigrationFigure {
        workload: name,
        accel_mib: accel >> 20,
        mode: mode.to_string(),
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
        total_vs_link_time: median(&mut each(&|r| r.report.total_ms / link_time(r))),
        total_ms_each: each(&|r| r.report.total_ms),
        downtime_ms_each: each(&|r| r.report.downtime_ms),
    })
}
