//! `ferry bench center`: a `ferry center serve` process and, in a second process, N
//! simulated hosts of M VMs each sending real heartbeat bodies at 1 Hz on loopback. For
//! each N: the center's CPU (share of one core), the heartbeats it took per second, its
//! memory, and the latency of the cluster API while the beats come in.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_api::{BeatAnswer, BeatSeries, FileInfo, HostInfo, VmInfo, VmState};
use ferry_client::ApiClient;
use serde::{Deserialize, Serialize};

use crate::cmd::bench::{figure, percentile, Emit};
use crate::cmd::child::Killed;
use crate::cmd::poll_every;

/// What to run.
pub struct CenterBench<'a> {
    /// Simulated host counts, one run each.
    pub hosts: &'a [usize],
    /// VMs per simulated host.
    pub vms_per_host: usize,
    /// Seconds measured per run (after every host has joined).
    pub seconds: u64,
    /// Simulated hosts send every VM in every beat (the protocol before deltas).
    pub full_beats: bool,
    /// etcd endpoints for the center's store (none: SQLite).
    pub etcd: Option<&'a str>,
}

/// The keys a run wrote under its etcd prefix (hosts, VMs, events: tens of thousands),
/// deleted once it ends: an operator's etcd keeps nothing of a benchmark.
struct EtcdPrefixRemoved {
    urls: String,
    /// Ends with '/'.
    prefix: String,
}

impl Drop for EtcdPrefixRemoved {
    fn drop(&mut self) {
        use ferry_center::etcd::{Etcd, Op};
        // Every key from the prefix to just past it ('0' follows '/').
        let end = format!("{}0", self.prefix.trim_end_matches('/'));
        let removed = Etcd::new(std::slice::from_ref(&self.urls), Duration::from_secs(10))
            .and_then(|etcd| {
                etcd.txn_repeatable(&[], &[Op::DeleteRange(self.prefix.clone(), end)], &[])
            });
        if let Err(e) = removed {
            eprintln!(
                "ferry: cannot delete the benchmark's keys under {} in etcd: {e}",
                self.prefix
            );
        }
    }
}

/// One second of the simulator's counts, printed as a JSON line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct SimCounts {
    /// Beats sent.
    sent: u64,
    /// Beats the center took.
    taken: u64,
    /// Deltas refused (a full beat followed).
    refused: u64,
    /// Beats that failed (no answer, error status).
    failed: u64,
    /// Body bytes sent.
    bytes: u64,
    /// Beats sent more than 500 ms after they were due (the simulator fell behind).
    late: u64,
}

/// Runs the benchmark, one center and one simulator per host count.
pub fn bench_center(bench: &CenterBench<'_>, emit: &mut Emit) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -- bench center` for figures");
    }
    let store = match bench.etcd {
        Some(urls) => format!("etcd {urls}"),
        None => "SQLite".to_string(),
    };
    let protocol = if bench.full_beats { "full" } else { "delta" };
    eprintln!(
        "center with {store}; simulated hosts of {} VMs each, one beat a second each ({protocol} beats), from a separate process; {} s measured per run",
        bench.vms_per_host, bench.seconds
    );
    for &n in bench.hosts {
        run_one(bench, n, &store, protocol, emit)?;
    }
    Ok(())
}

fn run_one(
    bench: &CenterBench<'_>,
    n: usize,
    store: &str,
    protocol: &str,
    emit: &mut Emit,
) -> anyhow::Result<()> {
    // A folder of its own (0700, removed on drop, after the center: declared before it).
    let scratch = tempfile::Builder::new()
        .prefix("ferry-bench-center-")
        .tempdir()
        .context("cannot make a folder for the center's database")?;
    let db = scratch.path().join("center.db");
    let log = scratch.path().join("center.log");
    let secret = ferry_migrate::Secret::generate_hex();
    let token = ferry_migrate::Secret::generate_hex();
    let exe = std::env::current_exe()?;
    let mut center = Command::new(&exe);
    center
        .args(["center", "serve", "--listen", "127.0.0.1:0"])
        .env("FERRY_SECRET", &secret)
        .env("FERRY_CENTER_TOKEN", &token)
        // Its log (a line a host joining) to a file, shown where it fails to start.
        .stderr(File::create(&log).context("cannot make the center's log")?);
    // Dropped after the center (declared before it): its keys go once it has stopped.
    let mut _etcd_removed = None;
    if let Some(urls) = bench.etcd {
        // Each run starts from an empty cluster under its own prefix.
        let prefix = format!("/ferry-bench-{}-{n}/", std::process::id());
        center.args(["--etcd", urls, "--etcd-prefix"]).arg(&prefix);
        _etcd_removed = Some(EtcdPrefixRemoved {
            urls: urls.to_string(),
            prefix,
        });
    } else {
        center.arg("--db").arg(&db);
    }
    let mut center = Killed::spawn(&mut center, "`ferry center serve`")?;
    let line = center.first_line("the center").map_err(|e| {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!("{e:#}; its log ends:\n{}", tail.join("\n"))
    })?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .with_context(|| format!("the center did not say where it listens: {line:?}"))?
        .to_string();
    let url = format!("http://{addr}");
    let pid = center.0.id();

    let mut sim = Killed::spawn(
        Command::new(&exe)
            .args(["bench", "center-sim", "--center", &url])
            .args(["--hosts", &n.to_string()])
            .args(["--vms-per-host", &bench.vms_per_host.to_string()])
            .args(if bench.full_beats {
                &["--full-beats"][..]
            } else {
                &[][..]
            })
            .env("FERRY_SECRET", &secret)
            .stderr(Stdio::inherit()),
        "the host simulator",
    )?;
    let latest = Arc::new(std::sync::Mutex::new(SimCounts::default()));
    let reader = {
        let latest = latest.clone();
        let out = sim.0.stdout.take().context("simulator stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(counts) = serde_json::from_str::<SimCounts>(&line) {
                    *latest.lock().expect("counts lock") = counts;
                }
            }
        })
    };

    let client = ApiClient::new(&url, token.as_bytes())?;
    // Every host joins within a second or two of starting; give it ten.
    let mut joined = 0;
    poll_every(
        &format!("all {n} simulated hosts to join"),
        Duration::from_secs(10 + n as u64 / 100),
        Duration::from_millis(500),
        || {
            let hosts: Vec<serde_json::Value> = client.get("/v1/hosts")?;
            joined = hosts.len();
            Ok((joined == n).then_some(()))
        },
    )
    .with_context(|| format!("{joined} of {n} simulated hosts had joined"))?;
    // Past the first (full) beats.
    std::thread::sleep(Duration::from_secs(3));

    // First the beats alone, then with an operator calling the API.
    let cpu0 = process_cpu_s(pid)?;
    let counts0 = latest.lock().expect("counts lock").clone();
    let taken0 = beats_taken(&client)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(bench.seconds));
    let cpu = process_cpu_s(pid)? - cpu0;
    let taken = beats_taken(&client)? - taken0;
    let wall = t0.elapsed().as_secs_f64();
    let counts1 = latest.lock().expect("counts lock").clone();

    let paths = [
        "/v1/hosts/sim-00000".to_string(),
        "/v1/hosts".to_string(),
        "/v1/cluster".to_string(),
        "/v1/vms".to_string(),
    ];
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let cpu_api0 = process_cpu_s(pid)?;
    let t1 = Instant::now();
    let mut i = 0usize;
    while t1.elapsed() < Duration::from_secs(bench.seconds) {
        let which = i % paths.len();
        i += 1;
        // To the answer's last byte, not counting this side's parsing of it.
        let start = Instant::now();
        client.get_text(&paths[which])?;
        latencies[which].push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu_api = (process_cpu_s(pid)? - cpu_api0) / t1.elapsed().as_secs_f64();
    let rss = process_rss_mib(pid)?;
    drop(sim);
    let _ = reader.join();
    drop(center);

    let sent = counts1.sent.saturating_sub(counts0.sent);
    let bytes = counts1.bytes.saturating_sub(counts0.bytes);
    let detail = format!(
        "{n} hosts x {} VMs, {protocol} beats, {store}",
        bench.vms_per_host
    );
    let figure = |name: &'static str, value: f64, unit: &'static str, extra: String| {
        let detail = if extra.is_empty() {
            detail.clone()
        } else {
            format!("{detail}; {extra}")
        };
        figure(name, value, unit, detail)
    };
    emit(figure(
        "center_cpu",
        100.0 * cpu / wall,
        "% of a core",
        "heartbeats alone".into(),
    ))?;
    emit(figure(
        "center_cpu_with_api",
        100.0 * cpu_api,
        "% of a core",
        "heartbeats and an operator calling the API about 10 times a second (a call, then 100 ms)"
            .into(),
    ))?;
    emit(figure(
        "center_heartbeats_taken",
        taken / wall,
        "per s",
        format!("of {n} due; simulator sent {:.0}/s", sent as f64 / wall),
    ))?;
    emit(figure(
        "center_heartbeat_size",
        if sent == 0 {
            0.0
        } else {
            bytes as f64 / sent as f64
        },
        "bytes",
        format!(
            "late beats {}, failed {}, refused {}",
            counts1.late.saturating_sub(counts0.late),
            counts1.failed.saturating_sub(counts0.failed),
            counts1.refused.saturating_sub(counts0.refused)
        ),
    ))?;
    emit(figure("center_rss", rss, "MiB", String::new()))?;
    let names = [
        "center_api_host",
        "center_api_hosts",
        "center_api_cluster",
        "center_api_vms",
    ];
    for ((name, path), mut samples) in names.into_iter().zip(&paths).zip(latencies) {
        let p50 = percentile(&mut samples, 0.5);
        // Under a hundred calls, the 99th percentile is the slowest call: said so.
        let (tail, unit) = match samples.len() {
            100.. => (percentile(&mut samples, 0.99), "ms p99"),
            _ => (percentile(&mut samples, 1.0), "ms max"),
        };
        emit(figure(
            name,
            tail,
            unit,
            format!("GET {path}: p50 {p50:.1} ms over {} calls", samples.len()),
        ))?;
    }
    Ok(())
}

/// The heartbeats the center has taken, from its metrics.
fn beats_taken(client: &ApiClient) -> anyhow::Result<f64> {
    let text = client.get_text("/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| {
            l.strip_prefix("ferry_heartbeats_total{result=\"taken\"} ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0))
}

/// User + system CPU seconds a process has used.
fn process_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = procfs::process::Process::new(pid as i32)?.stat()?;
    Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// A process's resident memory, MiB.
fn process_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = procfs::process::Process::new(pid as i32)?.status()?;
    Ok(status.vmrss.context("no VmRSS in /proc status")? as f64 / 1024.0)
}

/// One simulated host: what it reports.
struct SimHost {
    info: HostInfo,
    vms: Vec<VmInfo>,
    series: BeatSeries,
}

impl SimHost {
    fn new(i: usize, vms_per_host: usize, started_ms: u64) -> Self {
        let name = format!("sim-{i:05}");
        let info = HostInfo {
            name: name.clone(),
            migration_addr: format!("10.{}.{}.{}:7071", i >> 16, (i >> 8) & 255, i & 255),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: "cpu".into(),
            backends: vec!["cpu".into()],
            cpus: 64,
            accel_threads: 4,
            load_avg: 12.5,
            memory_capacity: 1 << 40,
            memory_used: vms_per_host as u64 * (24 << 30),
            accel_capacity: 640 << 30,
            accel_used: vms_per_host as u64 * (16 << 30),
            accel_load: vms_per_host as f64 * 0.5,
            vms_running: vms_per_host,
            vms_in_doubt: 0,
        };
        let vms = (0..vms_per_host)
            .map(|j| VmInfo {
                id: format!("{:08x}-{:04x}-4000-8000-{:012x}", i, j, i * 1000 + j),
                workload: if j % 2 == 0 { "mlp-train" } else { "llm-serve" }.into(),
                name: (j % 2 == 1).then(|| format!("model-{i}-{j}")),
                args: ["--steps", "100000000", "--hidden", "2048", "--batch", "256"]
                    .map(str::to_string)
                    .to_vec(),
                state: VmState::Running,
                memory: 8 << 30,
                accel_memory: 16 << 30,
                accel_backend: Some("cpu".into()),
                accel_load: 0.5,
                uptime_ms: 0,
                since_unix_ms: started_ms,
                migrated_from: None,
                files: (j % 2 == 1)
                    .then(|| FileInfo {
                        name: "model".into(),
                        size: 4 << 30,
                        sha256: "ab".repeat(32),
                        path: "/var/lib/ferry/models/llama-3-8b-instruct.Q4_K_M.gguf".into(),
                    })
                    .into_iter()
                    .collect(),
                console_tail: String::new(),
                idempotency_key: None,
            })
            .collect();
        Self {
            info,
            vms,
            series: BeatSeries::new(i as u64),
        }
    }
}

/// `ferry bench center-sim`: the simulated hosts, until killed. Each beat, one host in
/// ten sees one of its VMs' load change (news); the rest only count uptime on. Prints
/// cumulative [`SimCounts`] as a JSON line every second.
pub fn simulate_hosts(
    center: &str,
    hosts: usize,
    vms_per_host: usize,
    full_beats: bool,
) -> anyhow::Result<()> {
    let secret = crate::cmd::host::SecretArgs { secret_file: None }.secret()?;
    let token = secret.token(ferry_migrate::Purpose::Heartbeat);
    let started_ms = ferry_center::inventory::unix_ms();
    let threads = hosts.clamp(1, 16);
    let counters: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let start = Instant::now();
    for t in 0..threads {
        let client = ApiClient::new(center, token.as_bytes())?;
        let counters = counters.clone();
        let mut mine: Vec<(usize, SimHost)> = (t..hosts)
            .step_by(threads)
            .map(|i| (i, SimHost::new(i, vms_per_host, started_ms)))
            .collect();
        std::thread::spawn(move || {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
            for second in 0u64.. {
                for (i, host) in mine.iter_mut() {
                    let due = start
                        + Duration::from_secs(second)
                        + Duration::from_secs_f64(*i as f64 / hosts as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(500) {
                        counters[5].fetch_add(1, Ordering::Relaxed);
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if rng.is_multiple_of(10) && !host.vms.is_empty() {
                        let vm = (rng >> 8) as usize % host.vms.len();
                        host.vms[vm].accel_load = ((rng >> 16) % 100) as f64 / 100.0;
                    }
                    let uptime = start.elapsed().as_millis() as u64;
                    for vm in &mut host.vms {
                        vm.uptime_ms = uptime;
                    }
                    let mut beat = host.series.beat(
                        format!(
                            "http://{}",
                            host.info.migration_addr.replace(":7071", ":7070")
                        ),
                        host.info.clone(),
                        host.vms.clone(),
                    );
                    if full_beats {
                        beat.seq = None;
                        beat.delta = None;
                        beat.vms = host.vms.clone();
                    }
                    let size = serde_json::to_vec(&beat).map_or(0, |b| b.len() as u64);
                    let answer = client.post::<_, BeatAnswer>("/v1/heartbeat", &beat).ok();
                    host.series.answered(answer.as_ref());
                    counters[0].fetch_add(1, Ordering::Relaxed);
                    counters[4].fetch_add(size, Ordering::Relaxed);
                    match answer {
                        Some(BeatAnswer { taken: true, .. }) => &counters[1],
                        Some(BeatAnswer { taken: false, .. }) => &counters[2],
                        None => &counters[3],
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = |i: usize| counters[i].load(Ordering::Relaxed);
        let counts = SimCounts {
            sent: c(0),
            taken: c(1),
            refused: c(2),
            failed: c(3),
            bytes: c(4),
            late: c(5),
        };
        crate::cmd::print_line(format_args!("{}", serde_json::to_string(&counts)?))?;
    }
}
