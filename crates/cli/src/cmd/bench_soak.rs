//! `ferry bench soak`: hosts a and b in this process, on loopback. A training VM and a
//! decoding VM migrate back and forth between them, both at once, `--migrations` times
//! each; every VM that ends must end with the checksum of an unmigrated run (a new one
//! takes its place until the count is reached). Prints the pause distribution, and what
//! the process (both daemons) held before and after, with no VM running either time:
//! resident memory, threads and open file descriptors. Memory is sampled once the
//! allocators have given back what they keep for reuse (the hosts' device memory pools,
//! the heap's free pages), which can grow with fragmentation up to their limits: what is
//! left is what the daemons hold.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ferry_api::{CreateVm, MigrateRequest, MigrationState, MigrationStatus, VmInfo, VmState};
use ferry_client::ApiClient;
use ferry_migrate::Secret;
use ferry_vmm::{HostOptions, Microvm, VmConfig, VmExit};
use serde_json::Value;

use crate::cmd::bench::{figure, percentile, Emit};
use crate::cmd::poll_until;

/// One workload that migrates: name, guest arguments, RAM, accelerator memory.
struct Workload {
    name: &'static str,
    args: &'static str,
    ram: u64,
    accel: u64,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "mlp-train",
        args: "--steps 30000 --print-every 10000",
        ram: 64 << 20,
        accel: 64 << 20,
    },
    Workload {
        name: "llm-decode",
        args: "--tokens 3000 --weights-mib 8 --print-every 1000",
        ram: 64 << 20,
        accel: 64 << 20,
    },
];

/// What the process holds: resident bytes, threads, open file descriptors.
#[derive(Debug, Clone, Copy)]
struct Held {
    rss: u64,
    threads: usize,
    fds: usize,
}

fn held() -> anyhow::Result<Held> {
    let me = procfs::process::Process::myself()?;
    Ok(Held {
        rss: me
            .status()?
            .vmrss
            .context("no VmRSS in /proc/self/status")?
            << 10,
        threads: me.tasks()?.count(),
        fds: me.fd_count()?,
    })
}

/// The checksum an unmigrated run of `w` prints.
fn unmigrated(w: &Workload, backend: &'static str) -> anyhow::Result<String> {
    let image = ferry_guest_images::find(w.name).context("no built-in guest")?;
    let args: Vec<String> = w.args.split_whitespace().map(str::to_string).collect();
    let config = VmConfig::new(w.ram).with_accel(w.accel);
    let host = HostOptions {
        backend,
        ..HostOptions::quiet()
    };
    let mut vm = Microvm::boot(config, image.elf, &args, host)?;
    vm.resume()?;
    match vm.wait(Some(Duration::from_secs(600))) {
        Some(VmExit::Exited(0)) => checksum(&vm.console_tail()),
        other => bail!("the unmigrated {} run ended as {other:?}", w.name),
    }
}

fn checksum(console: &str) -> anyhow::Result<String> {
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("checksum="))
        .map(str::to_string)
        .with_context(|| format!("no checksum in the console: {console}"))
}

/// Hosts a and b: their APIs and migration addresses.
struct Hosts {
    /// The hosts, shut down (VMs stopped, ports closed) when this is dropped.
    daemons: Vec<crate::cmd::host::Daemon>,
    _runtime: tokio::runtime::Runtime,
    urls: [String; 2],
    /// The cluster's host-API key.
    token: String,
    migration: [String; 2],
}

impl Hosts {
    fn start(backend: &'static str) -> anyhow::Result<Self> {
        let text = Secret::generate_hex();
        let secret = Secret::new(text.as_bytes().to_vec())?;
        // Idle blocking threads (the API's) end within half a second, so that the
        // counts before and after see only what the daemons keep.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_keep_alive(Duration::from_millis(500))
            .build()
            .context("cannot start the async runtime")?;
        let mut urls = Vec::new();
        let mut migration = Vec::new();
        let mut daemons = Vec::new();
        for name in ["a", "b"] {
            let d = crate::cmd::host::start_loopback(&runtime, name, &secret, 2 << 30, backend)?;
            urls.push(format!("http://{}", d.api_addr));
            migration.push(d.migration_addr.to_string());
            daemons.push(d);
        }
        let two = |v: Vec<String>| -> anyhow::Result<[String; 2]> {
            v.try_into().map_err(|_| anyhow::anyhow!("two hosts"))
        };
        Ok(Self {
            daemons,
            _runtime: runtime,
            urls: two(urls)?,
            token: secret.token(ferry_migrate::Purpose::HostApi),
            migration: two(migration)?,
        })
    }

    /// A client of host `on`'s API, for one request: no pooled connection outlives it.
    fn api(&self, on: usize) -> ApiClient {
        ApiClient::new(&self.urls[on], self.token.as_bytes()).expect("a text token")
    }

    fn create(&self, on: usize, w: &Workload) -> anyhow::Result<String> {
        let vm: ferry_api::VmInfo = self.api(on).post(
            "/v1/vms",
            &CreateVm {
                name: None,
                workload: w.name.into(),
                args: w.args.split_whitespace().map(str::to_string).collect(),
                memory: w.ram,
                accel_memory: w.accel,
                attach: Vec::new(),
                backend: None,
                idempotency_key: None,
            },
        )?;
        Ok(vm.id)
    }

    fn state(&self, on: usize, id: &str) -> anyhow::Result<VmState> {
        let vm: VmInfo = self.api(on).get(&format!("/v1/vms/{id}"))?;
        Ok(vm.state)
    }

    /// Migrates `id` from host `on` to the other; `Ok(None)` if the guest ended first.
    fn migrate(&self, on: usize, id: &str) -> anyhow::Result<Option<f64>> {
        let request = MigrateRequest::to(&self.migration[1 - on]);
        let api = self.api(on);
        if let Err(e) = api.post::<_, MigrationStatus>(&format!("/v1/vms/{id}/migrate"), &request) {
            return match self.state(on, id)? {
                VmState::Exited { .. } => Ok(None),
                _ => Err(e.into()),
            };
        }
        let what = format!("the migration of {id} to end");
        poll_until(&what, Duration::from_secs(300), || {
            let status: MigrationStatus = api.get(&format!("/v1/vms/{id}/migration"))?;
            match status.state {
                MigrationState::Running => Ok(None),
                MigrationState::Succeeded => {
                    let report = status.report.context("a success without a report")?;
                    Ok(Some(Some(report.downtime_ms)))
                }
                _ if matches!(self.state(on, id)?, VmState::Exited { .. }) => Ok(Some(None)),
                other => bail!(
                    "migration {} of {id} ended {other:?}: {}",
                    ["a -> b", "b -> a"][on],
                    status.error.unwrap_or_default()
                ),
            }
        })
    }

    /// Waits for `id` on host `on` to end, and checks its checksum.
    fn finish(&self, on: usize, id: &str, expected: &str) -> anyhow::Result<()> {
        let what = format!("{id} to end");
        poll_until(&what, Duration::from_secs(600), || {
            match self.state(on, id)? {
                VmState::Exited { .. } => {
                    let console = self.api(on).get_text(&format!("/v1/vms/{id}/console"))?;
                    let got = checksum(&console)?;
                    ensure!(
                        got == expected,
                        "{id} ended with checksum {got}, an unmigrated run with {expected}"
                    );
                    Ok(Some(()))
                }
                VmState::Running => Ok(None),
                other => bail!("{id} is {other}"),
            }
        })
    }
}

/// What one workload's thread did: each migration's pause, VMs checked.
struct Soaked {
    pauses_ms: Vec<f64>,
    instances: usize,
}

/// Migrates instances of `w` back and forth `migrations` times.
fn soak(hosts: &Hosts, w: &Workload, expected: &str, migrations: usize) -> anyhow::Result<Soaked> {
    let mut on = 0;
    let mut id = hosts.create(on, w)?;
    let mut out = Soaked {
        pauses_ms: Vec::new(),
        instances: 1,
    };
    while out.pauses_ms.len() < migrations {
        match hosts.migrate(on, &id)? {
            Some(pause) => {
                out.pauses_ms.push(pause);
                on = 1 - on;
            }
            None => {
                hosts.finish(on, &id, expected)?;
                id = hosts.create(on, w)?;
                out.instances += 1;
            }
        }
    }
    hosts.finish(on, &id, expected)?;
    Ok(out)
}

/// Warms both hosts up the way the soak runs (both VMs on a, then both on b, then back,
/// then stopped), so that what is meant to persist (the hosts' device memory, backed up
/// to its high-water mark like a GPU's; connection pools) exists before the baseline.
fn warm_up(hosts: &Hosts) -> anyhow::Result<()> {
    let ids: Vec<String> = WORKLOADS
        .iter()
        .map(|w| hosts.create(0, w))
        .collect::<Result<_, _>>()?;
    for on in [0, 1] {
        for id in &ids {
            if hosts.migrate(on, id)?.is_none() {
                bail!("{id} ended during the warm-up");
            }
        }
    }
    for id in &ids {
        let _: Value = hosts.api(0).delete(&format!("/v1/vms/{id}"))?;
    }
    Ok(())
}

/// What the process holds once it has stopped changing for a second (threads of ended
/// VMs and idle API threads take a moment to exit) and the allocators have given back
/// what they keep for reuse; with the bytes of device memory the hosts had kept.
fn settled(hosts: &Hosts) -> anyhow::Result<(Held, u64)> {
    let mut last = held()?;
    let mut steady = Instant::now();
    let started = Instant::now();
    while steady.elapsed() < Duration::from_secs(1) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        let now = held()?;
        if now.threads != last.threads || now.fds != last.fds {
            steady = Instant::now();
        }
        last = now;
    }
    let kept = hosts
        .daemons
        .iter()
        .map(|d| d.host.release_kept_accel_memory())
        .sum();
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
    Ok((held()?, kept))
}

/// `ferry bench soak`.
pub fn bench_soak(migrations: usize, backend: &'static str, emit: &mut Emit) -> anyhow::Result<()> {
    ensure!(migrations >= 1, "--migrations must be at least 1");
    let expected: Vec<String> = WORKLOADS
        .iter()
        .map(|w| unmigrated(w, backend))
        .collect::<Result<_, _>>()?;
    let hosts = Hosts::start(backend)?;
    warm_up(&hosts)?;
    let (before, kept_before) = settled(&hosts)?;
    let started = Instant::now();
    let soaked: Vec<Soaked> = std::thread::scope(|scope| {
        let runs: Vec<_> = WORKLOADS
            .iter()
            .zip(&expected)
            .map(|(w, sum)| {
                let hosts = &hosts;
                scope.spawn(move || soak(hosts, w, sum, migrations))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap_or_else(|_| bail!("a soak thread panicked")))
            .collect::<Result<_, _>>()
    })?;
    let (after, kept_after) = settled(&hosts)?;
    let mut pauses: Vec<f64> = soaked.iter().flat_map(|s| s.pauses_ms.clone()).collect();
    pauses.sort_by(f64::total_cmp);
    let instances: usize = soaked.iter().map(|s| s.instances).sum();
    let what = format!(
        "{} migrations ({migrations} of mlp-train, {migrations} of llm-decode, both at once) in {:.0} s; {instances} VMs, each with the unmigrated checksum",
        pauses.len(),
        started.elapsed().as_secs_f64()
    );
    emit(figure(
        "soak_pause_median",
        percentile(&mut pauses, 0.5),
        "ms",
        what,
    ))?;
    emit(figure(
        "soak_pause_p99",
        percentile(&mut pauses, 0.99),
        "ms",
        String::new(),
    ))?;
    emit(figure(
        "soak_pause_max",
        percentile(&mut pauses, 1.0),
        "ms",
        String::new(),
    ))?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    emit(figure(
        "soak_rss_growth",
        mib(after.rss) - mib(before.rss),
        "MiB",
        format!(
            "both daemons' resident memory, no VM running: {:.0} MiB before, {:.0} MiB after \
             (device memory kept for reuse, {:.0} and {:.0} MiB, given back first)",
            mib(before.rss),
            mib(after.rss),
            mib(kept_before),
            mib(kept_after)
        ),
    ))?;
    for (name, unit, before, after) in [
        (
            "soak_thread_growth",
            "threads",
            before.threads,
            after.threads,
        ),
        ("soak_fd_growth", "fds", before.fds, after.fds),
    ] {
        let detail = format!("{before} before, {after} after");
        emit(figure(name, after as f64 - before as f64, unit, detail))?;
    }
    Ok(())
}
