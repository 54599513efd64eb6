//! `ferry bench`: measurements that print figures (never pass/fail timings).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::Args;
use ferry_abi::calibration;
use ferry_vmm::{HostOptions, Microvm, VmConfig, VmExit};
use serde::Serialize;

use crate::cmd::poll_until;

/// The benchmarks `ferry bench` runs; anything else is a usage error (exit 2) that
/// lists them. `center-sim` is `center`'s other process, not for operators.
const BENCHMARKS: [&str; 10] = [
    "vm",
    "accel",
    "gpu",
    "migrate",
    "evacuate",
    "llm",
    "soak",
    "serve",
    "center",
    "center-sim",
];

/// [`BENCHMARKS`] for clap, `center-sim` hidden from `--help`.
fn benchmarks() -> PossibleValuesParser {
    PossibleValuesParser::new(
        BENCHMARKS.map(|name| PossibleValue::new(name).hide(name == "center-sim")),
    )
}

/// `ferry bench`.
#[derive(Args)]
#[command(
    after_help = "Build with --release for meaningful host-side figures:\n  cargo run --release -- bench vm"
)]
pub struct BenchArgs {
    /// What to measure: `vm` (guest speed vs host, start-up, pause latency, snapshot
    /// save/restore throughput of a 1 GiB guest) or `accel` (GEMM vs the GEMM crate
    /// called directly, mlp-train steps/s, llm-decode tokens/s, dirty-chunk take latency
    /// with 4 GiB of device memory) or `gpu` (the cuda backend without a VM: every kernel
    /// against the cpu backend, MATMUL against cuBLAS, a migration's chunk reads while
    /// kernels keep the GPU busy against idle and one plain copy, chunk writes) or
    /// `migrate` (live vs stop-and-copy pause, total
    /// time and bytes for llm-decode and mlp-train at --accel-sizes, vs the loopback's
    /// raw TCP throughput) or `evacuate` (time to empty a host of N running VMs with
    /// `maintenance enter` through a center, and each VM's pause, for N in --vms) or
    /// `llm` (a GGUF model's prompt and generation tokens/s against the bound the
    /// host's memory bandwidth sets, and migrating it with its file sent or reused) or
    /// `soak` (a training VM and a decoding VM migrated back and forth --migrations times
    /// each: pause median/p99/max, and the daemons' memory, threads and open files before
    /// and after) or `serve` (an llm-serve VM behind the center's OpenAI gateway:
    /// requests/s, tokens/s, time to first token and inter-token latency at 1, 4 and 8
    /// streaming clients, then the gaps while the VM migrates back and forth, against
    /// the steady ones and the pauses) or `center` (a center process taking heartbeats
    /// from --hosts simulated hosts of --vms-per-host VMs in another process: its CPU,
    /// beats taken, memory and API latency).
    #[arg(value_parser = benchmarks())]
    pub what: String,
    /// Print one JSON object per figure (one per line) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Guest RAM for the snapshot figures.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::size::parse_size)]
    pub snapshot_memory: u64,
    /// Accelerator memory sizes for `migrate`.
    #[arg(long, value_name = "SIZES", value_delimiter = ',', default_value = "256M,1G,4G", value_parser = crate::size::parse_size)]
    pub accel_sizes: Vec<u64>,
    /// `migrate`: migrations of each VM per figure, back and forth (their medians are
    /// reported).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub repeats: usize,
    /// VM counts for `evacuate`.
    #[arg(
        long,
        value_name = "NS",
        value_delimiter = ',',
        default_value = "1,2,4",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16)
    )]
    pub vms: Vec<usize>,
    /// Migrations of each VM for `soak`.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub migrations: usize,
    /// The GGUF model for `llm` and `serve` (default: what scripts/fetch-model fetches).
    #[arg(
        long,
        value_name = "FILE.gguf",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: std::path::PathBuf,
    /// `serve`: migrate at most this many MiB/s during pre-copy (`ferry migrate
    /// --max-rate`), to see what a gentler migration does to the gaps.
    #[arg(long, value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..=ferry_api::MAX_RATE_MIB_S))]
    pub max_rate: Option<u64>,
    /// Simulated host counts for `center`, one run each.
    #[arg(
        long,
        value_name = "NS",
        value_delimiter = ',',
        default_value = "100,500,1000,2500",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000)
    )]
    pub hosts: Vec<usize>,
    /// VMs per simulated host for `center`.
    #[arg(long, value_name = "M", default_value_t = 16)]
    pub vms_per_host: usize,
    /// Seconds measured per run of `center`.
    #[arg(long, value_name = "S", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// `center`: the simulated hosts send every VM in every beat (the protocol before
    /// delta beats), for comparison.
    #[arg(long)]
    pub full_beats: bool,
    /// `center`: keep the center's state in etcd at these endpoints (default SQLite).
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// `migrate`: migrate across a veth pair between network namespaces shaped to this
    /// rate with `tc tbf` (e.g. `10gbit`, `25gbit`) instead of loopback, and add a
    /// training VM that dirties device memory faster than that. Needs root.
    #[arg(long, value_name = "RATE")]
    pub link: Option<String>,
    /// `migrate --link`: run host a on the first half of the cores this process may use
    /// and host b on the other half (scheduler affinity; a core's hyperthreads stay
    /// together), as two machines each have their own, so a destination's work does not
    /// take the source's CPU. Each workload's speed before a migration is then its speed
    /// on its host's half.
    #[arg(long, requires = "link")]
    pub split_cpus: bool,
    /// `migrate`: the workloads measured (mlp-train-large only across --link).
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        default_value = "llm-decode,mlp-train,mlp-train-large",
        value_parser = ["llm-decode", "mlp-train", "mlp-train-large"]
    )]
    pub workloads: Vec<String>,
    /// `center-sim` (run by `center`): the center the simulated hosts beat to.
    #[arg(long, value_name = "URL", hide = true)]
    pub center: Option<String>,
    #[command(flatten)]
    pub backend: crate::cmd::backend::BackendArgs,
}

/// One measured figure.
#[derive(Serialize)]
pub(crate) struct Figure {
    bench: &'static str,
    figure: &'static str,
    value: f64,
    unit: &'static str,
    detail: String,
}

/// Runs a benchmark.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    match args.what.as_str() {
        "vm" => bench_vm(args),
        "accel" => bench_accel(args),
        "gpu" => {
            // No VM: a GPU machine without KVM may run it.
            header(args)?;
            crate::cmd::bench_gpu::bench_gpu(&mut |f| print(&f, args.json))
        }
        "migrate" => crate::cmd::bench_migrate::bench_migrate(
            args.json,
            &args.accel_sizes,
            args.link.as_deref(),
            &args.workloads,
            args.repeats,
            args.backend.resolve()?,
            args.split_cpus,
        ),
        "evacuate" => crate::cmd::bench_evacuate::bench_evacuate(
            args.json,
            &args.vms,
            args.backend.resolve()?,
        ),
        "llm" => {
            begin(args)?;
            let backend = args.backend.resolve()?;
            crate::cmd::bench_llm::bench_llm(&args.model, backend, &mut |f| print(&f, args.json))
        }
        "soak" => {
            begin(args)?;
            let backend = args.backend.resolve()?;
            crate::cmd::bench_soak::bench_soak(args.migrations, backend, &mut |f| {
                print(&f, args.json)
            })
        }
        "serve" => {
            begin(args)?;
            let backend = args.backend.resolve()?;
            crate::cmd::bench_serve::bench_serve(&args.model, backend, args.max_rate, &mut |f| {
                print(&f, args.json)
            })
        }
        "center" => crate::cmd::bench_center::bench_center(
            &crate::cmd::bench_center::CenterBench {
                hosts: &args.hosts,
                vms_per_host: args.vms_per_host,
                seconds: args.seconds,
                full_beats: args.full_beats,
                etcd: args.etcd.as_deref(),
            },
            &mut |f| print(&f, args.json),
        ),
        "center-sim" => crate::cmd::bench_center::simulate_hosts(
            args.center
                .as_deref()
                .context("center-sim needs --center URL")?,
            args.hosts.first().copied().unwrap_or(1),
            args.vms_per_host,
            args.full_beats,
        ),
        other => {
            bail!(
                "unknown benchmark '{other}' (available: vm, accel, gpu, migrate, evacuate, llm, soak, serve, center)"
            )
        }
    }
}

fn print(figure: &Figure, json: bool) -> anyhow::Result<()> {
    if json {
        crate::cmd::print_line(format_args!("{}", serde_json::to_string(figure)?))?;
    } else {
        crate::cmd::print_line(format_args!(
            "{:<28} {:>12.3} {:<10} {}",
            figure.figure, figure.value, figure.unit, figure.detail
        ))?;
    }
    Ok(())
}

/// Checks KVM, then [`header`].
fn begin(args: &BenchArgs) -> anyhow::Result<()> {
    ferry_vmm::check_kvm().map_err(anyhow::Error::msg)?;
    header(args)
}

/// Warns about debug builds, prints the table header.
fn header(args: &BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "ferry: warning: this is a debug build; figures are not meaningful (use --release)"
        );
    }
    if !args.json {
        crate::cmd::print_line(format_args!(
            "{:<28} {:>12} {:<10} detail",
            "figure", "value", "unit"
        ))?;
    }
    Ok(())
}

fn bench_vm(args: &BenchArgs) -> anyhow::Result<()> {
    // Its VMs measure the VMM (start, pause, snapshot), never the accelerator.
    if args.backend.backend != crate::cmd::backend::Backend::Cpu {
        bail!("`bench vm` measures the VMM, not the accelerator: --backend does not apply");
    }
    begin(args)?;
    let mut emit = |figure: Figure| print(&figure, args.json);
    guest_speed(&mut emit)?;
    startup(&mut emit)?;
    pause_latency(&mut emit)?;
    snapshot_throughput(args.snapshot_memory, &mut emit)
}

pub(crate) type Emit<'a> = dyn FnMut(Figure) -> anyhow::Result<()> + 'a;

/// A figure; its bench is the figure name's prefix (`accel_...`, `llm_...`, `gpu_...`,
/// else vm).
pub(crate) fn figure(
    figure: &'static str,
    value: f64,
    unit: &'static str,
    detail: String,
) -> Figure {
    Figure {
        bench: if figure.starts_with("accel") {
            "accel"
        } else if figure.starts_with("llm") {
            "llm"
        } else if figure.starts_with("soak") {
            "soak"
        } else if figure.starts_with("serve") {
            "serve"
        } else if figure.starts_with("center") {
            "center"
        } else if figure.starts_with("gpu") {
            "gpu"
        } else {
            "vm"
        },
        figure,
        value,
        unit,
        detail,
    }
}

/// Boots `name` with `args` in a VM shaped by `config`, running, console kept in memory.
fn start(
    name: &str,
    args: &[&str],
    config: VmConfig,
    backend: &'static str,
) -> anyhow::Result<Microvm> {
    let image =
        ferry_guest_images::find(name).with_context(|| format!("no built-in guest {name}"))?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let host = HostOptions {
        backend,
        ..HostOptions::quiet()
    };
    let mut vm = Microvm::boot(config, image.elf, &args, host)?;
    vm.resume()?;
    Ok(vm)
}

/// Runs `name` to a clean exit; returns its console.
fn run_to_end(
    name: &str,
    args: &[&str],
    config: VmConfig,
    backend: &'static str,
) -> anyhow::Result<String> {
    let mut vm = start(name, args, config, backend)?;
    match vm.wait(Some(Duration::from_secs(300))) {
        Some(VmExit::Exited(0)) => Ok(vm.console_tail()),
        Some(VmExit::Exited(code)) => bail!("{name} exited with {code}: {}", vm.console_tail()),
        Some(VmExit::Failed(e)) => Err(e).context(format!("{name} failed")),
        None => bail!("{name} did not finish in 300 s"),
    }
}

/// `key=value` from the console line starting with `prefix`.
fn field(console: &str, prefix: &str, key: &str) -> anyhow::Result<String> {
    let line = console
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no '{prefix}' line in {console}"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .with_context(|| format!("no {key}= in '{line}'"))
}

fn guest_speed(emit: &mut Emit) -> anyhow::Result<()> {
    const ITERATIONS: u64 = 200_000_000;
    const MIB: usize = 64;
    const PASSES: u32 = 10;
    let console = run_to_end(
        "calibrate",
        &[
            "--iterations",
            &ITERATIONS.to_string(),
            "--mib",
            &MIB.to_string(),
            "--passes",
            &PASSES.to_string(),
        ],
        VmConfig::new(256 << 20),
        ferry_accel::backend::CPU,
    )?;

    let started = Instant::now();
    let host_compute = calibration::compute(black_box(ITERATIONS));
    let host_compute_ns = started.elapsed().as_nanos() as f64;
    let mut words = vec![1u64; MIB << 17];
    let started = Instant::now();
    let host_memory = calibration::memory(black_box(&mut words), PASSES);
    let host_memory_ns = started.elapsed().as_nanos() as f64;

    for (loop_name, host_ns, host_result) in [
        ("compute", host_compute_ns, host_compute),
        ("memory", host_memory_ns, host_memory),
    ] {
        let guest_ns: f64 = field(&console, loop_name, "ns")?.parse()?;
        let guest_result = field(&console, loop_name, "result")?;
        ensure!(
            guest_result == format!("{host_result:016x}"),
            "the {loop_name} loop gave {guest_result} in the guest and {host_result:016x} on the host"
        );
        let name = if loop_name == "compute" {
            "guest_compute_speed"
        } else {
            "guest_memory_speed"
        };
        emit(figure(
            name,
            host_ns / guest_ns,
            "x host",
            format!(
                "same {loop_name} loop: guest {:.1} ms, host {:.1} ms",
                guest_ns / 1e6,
                host_ns / 1e6
            ),
        ))?;
    }
    Ok(())
}

/// The middle value (the upper one of an even count); sorts `values`.
/// The `p` quantile (0 to 1) of `values` (sorted in place), nearest rank; NaN if none.
pub(crate) fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn startup(emit: &mut Emit) -> anyhow::Result<()> {
    let image = ferry_guest_images::find("hello").context("no hello guest")?;
    let mut boot_ms = Vec::new();
    let mut total_ms = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let mut vm = Microvm::boot(
            VmConfig::new(256 << 20),
            image.elf,
            &[],
            HostOptions::quiet(),
        )?;
        boot_ms.push(started.elapsed().as_secs_f64() * 1e3);
        vm.resume()?;
        match vm.wait(Some(Duration::from_secs(30))) {
            Some(VmExit::Exited(0)) => {}
            Some(exit) => bail!("hello did not exit cleanly: it {exit}"),
            None => bail!("hello did not end within 30 s"),
        }
        total_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    emit(figure(
        "vm_boot",
        median(&mut boot_ms),
        "ms",
        "median of 10: KVM VM, 256 MiB RAM, ELF load, vCPU setup".into(),
    ))?;
    emit(figure(
        "vm_start_to_exit",
        median(&mut total_ms),
        "ms",
        "median of 10: boot + run `hello` to its exit".into(),
    ))
}

fn pause_latency(emit: &mut Emit) -> anyhow::Result<()> {
    let mut vm = start(
        "memtouch",
        &["--mib", "64", "--seconds", "600"],
        VmConfig::new(256 << 20),
        ferry_accel::backend::CPU,
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let mut micros = Vec::new();
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(2));
        micros.push(vm.pause()?.took.as_secs_f64() * 1e6);
        vm.resume()?;
    }
    let p99 = percentile(&mut micros, 0.99);
    let max = micros[micros.len() - 1];
    emit(figure(
        "pause_latency_median",
        median(&mut micros),
        "us",
        "200 pauses of a running memtouch (kick out of KVM_RUN)".into(),
    ))?;
    emit(figure(
        "pause_latency_p99",
        p99,
        "us",
        format!("max {max:.0} us"),
    ))
}

fn snapshot_throughput(ram_size: u64, emit: &mut Emit) -> anyhow::Result<()> {
    let gib = ram_size as f64 / f64::from(1 << 30);
    let working_mib = (ram_size >> 20).saturating_sub(64).max(8);
    let mut vm = start(
        "memtouch",
        &["--mib", &working_mib.to_string(), "--seconds", "600"],
        VmConfig::new(ram_size),
        ferry_accel::backend::CPU,
    )?;
    poll_until(
        "memtouch to fill its working set",
        Duration::from_secs(120),
        || Ok(vm.console_tail().contains("memtouch: seed=").then_some(())),
    )
    .map_err(|e| anyhow::anyhow!("{e}: {}", vm.console_tail()))?;
    vm.pause()?;
    // A folder of its own (0700, removed on drop whatever fails): a fixed name in the
    // shared temporary folder could be another user's.
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir()
        .context("cannot make a folder for the snapshot")?;
    let path = dir.path().join(ferry_vmm::snapshot::SNAPSHOT_FILE);
    let started = Instant::now();
    let saved = vm.save(&path)?;
    let save_s = started.elapsed().as_secs_f64();
    drop(vm);

    let started = Instant::now();
    let (mut restored, _) = Microvm::restore(&path, HostOptions::quiet())?;
    let restore_s = started.elapsed().as_secs_f64();
    restored.resume()?;
    let still_running = restored.wait(Some(Duration::from_millis(100))).is_none();
    drop(restored);
    drop(dir);
    ensure!(still_running, "the restored VM stopped");

    let stored_mib = saved.file_bytes as f64 / f64::from(1 << 20);
    emit(figure(
        "snapshot_save",
        gib / save_s,
        "GiB/s",
        format!(
            "{gib:.2} GiB guest, {stored_mib:.0} MiB non-zero, {:.0} ms incl. fsync",
            save_s * 1e3
        ),
    ))?;
    emit(figure(
        "snapshot_restore",
        gib / restore_s,
        "GiB/s",
        format!(
            "{gib:.2} GiB guest, {:.0} ms: read, CRC check, RAM fill, vCPU restore",
            restore_s * 1e3
        ),
    ))
}

/// The last `key=value` printed on any console line, as a number.
pub(crate) fn last_value(console: &str, key: &str) -> anyhow::Result<f64> {
    crate::cmd::last_field(console, key)
        .with_context(|| format!("no {key}= in {console}"))?
        .parse()
        .with_context(|| format!("bad {key}= value"))
}

fn bench_accel(args: &BenchArgs) -> anyhow::Result<()> {
    begin(args)?;
    let backend = args.backend.resolve()?;
    let mut emit = |figure: Figure| print(&figure, args.json);
    let threads = ferry_vmm::vm::default_accel_threads();
    let kernel = ferry_accel::backend::cpu::gemm_microkernel();
    for n in [512, 1024] {
        let (backend, direct) = ferry_accel::backend::cpu::bench_gemm(n, threads);
        emit(figure(
            if n == 512 { "accel_gemm_512" } else { "accel_gemm_1024" },
            backend / direct,
            "x direct",
            format!("{n}^3 f32 on {threads} threads: backend {backend:.0} GFLOP/s, matrixmultiply direct {direct:.0} GFLOP/s ({kernel})"),
        ))?;
    }

    let accel = |mib: u64| VmConfig::new(256 << 20).with_accel(mib << 20);
    for (figure_name, mlp_args) in [
        (
            "accel_mlp_train_small",
            &["--steps", "3000", "--print-every", "1000"][..],
        ),
        (
            "accel_mlp_train_large",
            &[
                "--steps",
                "300",
                "--print-every",
                "100",
                "--batch",
                "256",
                "--inputs",
                "256",
                "--hidden",
                "1024",
                "--samples",
                "65536",
            ][..],
        ),
    ] {
        let console = run_to_end("mlp-train", mlp_args, accel(512), backend)?;
        emit(figure(
            figure_name,
            last_value(&console, "steps/s")?,
            "steps/s",
            format!("mlp-train {}", mlp_args.join(" ")),
        ))?;
    }
    for (figure_name, mib) in [
        ("accel_llm_decode_16mib", "16"),
        ("accel_llm_decode_128mib", "128"),
    ] {
        let llm_args = [
            "--weights-mib",
            mib,
            "--tokens",
            "128",
            "--print-every",
            "64",
        ];
        let console = run_to_end("llm-decode", &llm_args, accel(512), backend)?;
        emit(figure(
            figure_name,
            last_value(&console, "tokens/s")?,
            "tokens/s",
            format!("llm-decode {}", llm_args.join(" ")),
        ))?;
    }
    dirty_take_latency(backend, &mut emit)
}

fn dirty_take_latency(backend: &'static str, emit: &mut Emit) -> anyhow::Result<()> {
    // 4 GiB of dataset (4 Mi samples x 256 inputs x 4 bytes) plus the model.
    let config = VmConfig::new(256 << 20).with_accel(4608 << 20);
    let mlp_args = [
        "--inputs",
        "256",
        "--samples",
        "4194304",
        "--steps",
        "100000000",
        "--print-every",
        "100000",
    ];
    let vm = start("mlp-train", &mlp_args, config, backend)?;
    poll_until(
        "mlp-train to start training",
        Duration::from_secs(300),
        || Ok(vm.console_tail().contains("step=1 ").then_some(())),
    )
    .map_err(|e| anyhow::anyhow!("{e}: {}", vm.console_tail()))?;
    let device = vm.accel().context("VM has no accelerator")?;
    let started = Instant::now();
    let all = device.all_chunks().len();
    let enumerate_us = started.elapsed().as_secs_f64() * 1e6;
    let started = Instant::now();
    let written = device.written_chunks().len();
    let written_us = started.elapsed().as_secs_f64() * 1e6;
    device.start_dirty_tracking();
    let mut micros = Vec::new();
    let mut taken = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(5));
        let started = Instant::now();
        taken += device.take_dirty_chunks().len();
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    device.stop_dirty_tracking();
    drop(vm);
    let gib = all as f64 * ferry_accel::dirty::CHUNK_SIZE as f64 / f64::from(1 << 30);
    emit(figure(
        "accel_dirty_take_median",
        median(&mut micros),
        "us",
        format!("{gib:.1} GiB device memory ({all} chunks) while mlp-train runs; {:.0} dirty chunks per take (weights, optimizer state); never waits for the command in progress", taken as f64 / 100.0),
    ))?;
    emit(figure(
        "accel_all_chunks",
        enumerate_us,
        "us",
        format!("listing all {all} chunks"),
    ))?;
    emit(figure(
        "accel_written_chunks",
        written_us,
        "us",
        format!(
            "listing the {written} of {all} chunks written since their buffers were created (what round 0 of a live migration sends)"
        ),
    ))
}
