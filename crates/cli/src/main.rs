//! `ferry`: run, snapshot and (later) live-migrate AI virtual machines.

mod attach;
mod cmd;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit code when ferry itself fails (bad snapshot, no KVM, ...).
const EXIT_FERRY_ERROR: u8 = 1;
/// Exit code when the guest faulted or the VM could not continue.
pub const EXIT_VM_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of AI virtual machines",
    long_about = "Ferry runs guest workloads in microVMs on KVM and moves them between hosts \
                  while they run.\n\nExit codes: the guest's own exit code when a VM runs to \
                  completion; 125 when the guest faulted; 1 when ferry itself failed; 2 for \
                  usage errors.",
    after_help = "Logging: set RUST_LOG (e.g. RUST_LOG=debug) for diagnostics on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest workload in a microVM, in the foreground, until it exits.
    Run(RunArgs),
    /// Continue a VM from a snapshot directory until it exits.
    Restore(RestoreArgs),
    /// List the guest workloads built into this binary.
    Workloads,
    /// Measure: the microVM, the accelerator, the GPU, live migration, evacuation, LLM
    /// speed, soak, serving, the center (`ferry bench --help` says what each prints).
    Bench(cmd::bench::BenchArgs),
    /// The per-host daemon (`ferry host serve`: HTTP/JSON API and migration listener),
    /// and a host's maintenance mode and retirement (`maintenance`, `forget`).
    Host(cmd::host::HostArgs),
    /// Create, list, show, stop and resolve VMs, and read their consoles, on a host
    /// daemon (--host); only `create` can go through the cluster center instead
    /// (--center), and `ferry center status` lists the cluster's VMs.
    Vm(cmd::vm::VmArgs),
    /// Live-migrate a VM from one host daemon to another.
    Migrate(cmd::migrate::MigrateArgs),
    /// The cluster manager: hosts, placement, maintenance, balancing, dashboard.
    Center(cmd::center::CenterArgs),
    /// Two hosts on loopback: migrate a training VM live in mid-run and check its result
    /// against an unmigrated run.
    Demo(cmd::demo::DemoArgs),
}

/// `ferry run`.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  ferry run hello -- one two\n  ferry run memtouch -- --mib 64 --passes 4\n  \
                        ferry run memtouch --snapshot-at-ms 300 --snapshot-dir /tmp/snap -- --passes 50\n  \
                        ferry run --accel-memory 256M mlp-train -- --steps 200\n  \
                        ferry run --accel-memory 512M --attach model=./model.gguf llm-chat -- --prompt 'Hi'\n  \
                        ferry restore /tmp/snap"
)]
pub struct RunArgs {
    /// A built-in workload name (see `ferry workloads`) or the path of a guest ELF.
    pub workload: String,
    /// Guest RAM: a multiple of 2 MiB, 16M to 64G.
    #[arg(short, long, value_name = "SIZE", default_value = "256M", value_parser = size::parse_ram)]
    pub memory: u64,
    /// Give the VM a virtual accelerator with this much device memory (e.g. 256M, 4G):
    /// whole 4 KiB pages, at most 64 GiB. Without it the VM has no accelerator.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_accel_memory)]
    pub accel_memory: Option<u64>,
    /// Host threads for the accelerator's cpu backend (default: all cores). Results are
    /// bit-identical whatever the count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..),
          requires = "accel_memory")]
    pub accel_threads: Option<u16>,
    /// The accelerator backend (`--backend`).
    #[command(flatten)]
    pub backend: cmd::backend::BackendArgs,
    /// Pause the VM this many ms after it starts, save it to --snapshot-dir, and stop.
    #[arg(long, value_name = "MS", requires = "snapshot_dir")]
    pub snapshot_at_ms: Option<u64>,
    /// Directory for the snapshot (created if missing).
    #[arg(long, value_name = "DIR", requires = "snapshot_at_ms")]
    pub snapshot_dir: Option<PathBuf>,
    /// Attach a read-only file the guest finds by NAME (repeatable), e.g.
    /// `--attach model=./SmolLM2-135M-Instruct.Q4_1.gguf`. Snapshots record its path and
    /// SHA-256; a restore refuses a file that changed.
    #[arg(long, value_name = "NAME=PATH", value_parser = attach::parse_local_attach)]
    pub attach: Vec<(String, PathBuf)>,
    /// Arguments passed to the guest (after `--`).
    #[arg(last = true, value_name = "GUEST_ARGS")]
    pub guest_args: Vec<String>,
}

/// `ferry restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot directory written by `ferry run --snapshot-at-ms`.
    pub dir: PathBuf,
    /// The attached files, where they are on this machine (repeatable, in the order they
    /// were attached), e.g. `--attach model=/data/model.gguf`. Default: the paths the
    /// snapshot recorded. Each must have the content the snapshot recorded (SHA-256),
    /// since device memory that held a piece of a file is read from it again.
    #[arg(long, value_name = "NAME=PATH", value_parser = attach::parse_local_attach)]
    pub attach: Vec<(String, PathBuf)>,
    /// Host threads for the accelerator's cpu backend (default: all cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub accel_threads: Option<u16>,
}

/// A client command ends quietly when its reader goes (`ferry vm list | head`), as Unix
/// tools do, instead of panicking in `println!`. Daemons and VM runs keep Rust's ignored
/// SIGPIPE: a client hanging up is then an error on its socket, not the process's end.
fn end_quietly_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default, before any thread that
    // could be writing to a pipe exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Lets this process open as many files as its hard limit allows, as Go's runtime does:
/// the soft limit (1024 under systemd) would leave a daemon's API few connections (it
/// serves at most a quarter of it) and its VMs, migrations and files few descriptors.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the rlimit they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let client = match &cli.command {
        Command::Vm(_) | Command::Migrate(_) => true,
        Command::Host(args) => !args.serves(),
        Command::Center(args) => !args.serves(),
        _ => false,
    };
    if client {
        end_quietly_on_closed_pipe();
    } else {
        raise_open_files_limit();
    }
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(&args),
        Command::Restore(args) => cmd::run::restore(&args),
        Command::Workloads => cmd::run::list_workloads(),
        Command::Bench(args) => cmd::bench::bench(&args).map(|()| ExitCode::SUCCESS),
        Command::Host(args) => cmd::host::host(&args).map(|()| ExitCode::SUCCESS),
        Command::Vm(args) => cmd::vm::vm(&args).map(|()| ExitCode::SUCCESS),
        Command::Migrate(args) => cmd::migrate::migrate(&args).map(|()| ExitCode::SUCCESS),
        Command::Center(args) => cmd::center::center(&args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => cmd::demo::demo(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) if e.is::<cmd::StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {}", cmd::error_text(&format!("{e:#}")));
            if let Some(hint) = cmd::hint(&e) {
                eprintln!("ferry: hint: {hint}");
            }
            ExitCode::from(EXIT_FERRY_ERROR)
        }
    }
}
