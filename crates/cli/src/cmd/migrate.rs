//! `ferry migrate`: move a VM to another host, with progress and a summary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferry_api::{MigrateRequest, MigrationState, MigrationStatus};
use ferry_migrate::MigrationReport;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cmd::say;
use crate::cmd::vm::HostAddr;
use ferry_client::ApiClient;

/// `ferry migrate`.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  ferry migrate a-vm1 --to 127.0.0.1:7081 --downtime-ms 50 --streams 4\n  \
    ferry migrate a-vm1 --to 127.0.0.1:7081 --max-rate 200\n  \
    ferry migrate a-vm1 --cancel\n\n\
    With --json the last line is one JSON object: mode, downtime_ms, total_ms, rounds,\n\
    bytes_sent, final_bytes, max_throttle_pct, streams, files_sent, files_reused,\n\
    file_bytes, chunks_from_files, device_transfer (precopy, replay, or replay then\n\
    precopy), replay (what replay sent and cost, and why it gave way) and the per-round log;\n\
    for a migration that failed, was cancelled or is in doubt, its status instead (vm, to,\n\
    state, error, settlement), and the command exits 1.\n\n\
    A migration can be cancelled (--cancel) until the destination is told to run the VM;\n\
    the VM then runs on at the source. A VM being migrated cannot be stopped: cancel the\n\
    migration first. If the switchover breaks after the destination was told to run the\n\
    VM, the VM is in doubt: paused at the source until it is known where it runs."
)]
pub struct MigrateArgs {
    /// The VM's id on the source host (--host).
    #[arg(value_parser = crate::cmd::vm::parse_vm_id)]
    pub vm: String,
    /// The destination's migration address, HOST:PORT (its `--migration-listen`).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "cancel", value_parser = parse_peer_addr)]
    pub to: Option<String>,
    /// Cancel the VM's migration instead, and wait until it has stopped.
    #[arg(long, conflicts_with = "to")]
    pub cancel: bool,
    /// `live`: copy while the VM runs, then a short pause; `stop-and-copy`: pause, copy
    /// everything, resume on the destination.
    #[arg(long, default_value = "live", value_parser = ["live", "stop-and-copy"])]
    pub mode: String,
    /// The pause target (1 ms to ten minutes): pre-copy switches over once the predicted
    /// pause is within it (after a few more rounds while each shrinks it further). The
    /// pause itself may run longer; only a switchover not done within the target plus
    /// 1 s is abandoned (the VM then runs on at the source).
    #[arg(long, value_name = "MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=ferry_api::MAX_DOWNTIME_MS))]
    pub downtime_ms: u64,
    /// Parallel TCP data streams (1 to 16).
    #[arg(long, value_name = "N", default_value_t = ferry_migrate::DEFAULT_STREAMS,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(ferry_migrate::send::MAX_STREAMS)))]
    pub streams: u8,
    /// LZ4-compress the data on the wire.
    #[arg(long)]
    pub compress: bool,
    /// Never throttle the VM (pre-copy may then fail to converge).
    #[arg(long)]
    pub no_throttle: bool,
    /// When pre-copy does not converge within its bounds, switch over anyway with a
    /// longer pause instead of failing.
    #[arg(long)]
    pub allow_longer_pause: bool,
    /// Most pre-copy rounds (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ferry_api::MAX_ROUNDS)))]
    pub max_rounds: u32,
    /// Attached files (models, datasets): `reuse` sends only those the destination does
    /// not have with the same SHA-256 (at the same path or in its file store); `send`
    /// sends them all; `require` sends none, and the destination refuses the migration
    /// if it lacks one.
    #[arg(long, default_value = "reuse", value_parser = ["reuse", "send", "require"])]
    pub files: String,
    /// Device memory: `precopy` resends the chunks the device dirties (throttling the VM
    /// if it dirties faster than the link); `replay` sends device memory once, then the
    /// device's commands, which the destination runs again (the same bytes: the kernels
    /// are deterministic); `auto` starts with pre-copy and replays when it would throttle.
    /// Replay gives way to pre-copy, and says so, when the destination cannot keep up.
    #[arg(long, value_name = "auto|precopy|replay", default_value = "auto")]
    pub device_transfer: ferry_migrate::DeviceTransfer,
    /// Move at most this many MiB of state per second during pre-copy (pages, device
    /// memory, and file pieces the destination reads itself): a longer migration that
    /// takes less CPU, memory bandwidth and link from the VM and its neighbours at any
    /// moment. The pause is not limited.
    #[arg(long, value_name = "MIB_S", value_parser = clap::value_parser!(u64).range(1..=ferry_api::MAX_RATE_MIB_S))]
    pub max_rate: Option<u64>,
    /// Print one JSON object (the report) as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub host: HostAddr,
}

/// Checks `--to` as the host does, so that a mistyped one is a usage error.
fn parse_peer_addr(addr: &str) -> Result<String, String> {
    if ferry_api::valid_peer_addr(addr) {
        Ok(addr.to_string())
    } else {
        Err(format!(
            "'{addr}' is not a migration address HOST:PORT (the destination's --migration-listen)"
        ))
    }
}

impl MigrateArgs {
    /// The API request.
    pub fn request(&self) -> MigrateRequest {
        MigrateRequest {
            mode: self.mode.clone(),
            downtime_ms: self.downtime_ms,
            streams: self.streams,
            compress: self.compress,
            throttle: !self.no_throttle,
            allow_longer_pause: self.allow_longer_pause,
            max_rounds: self.max_rounds,
            files: self.files.clone(),
            device: self.device_transfer,
            max_rate_mib_s: self.max_rate,
            ..MigrateRequest::to(self.to.as_deref().unwrap_or_default())
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Starts a migration through `client` and follows it to the end; returns the report.
/// `bar` shows progress unless hidden.
pub fn follow(
    client: &ApiClient,
    vm: &str,
    request: &MigrateRequest,
    bar: &ProgressBar,
) -> anyhow::Result<MigrationReport> {
    report_of(run_to_end(client, vm, request, bar)?)
}

/// Starts a migration through `client` and follows it to the end; returns its last status.
fn run_to_end(
    client: &ApiClient,
    vm: &str,
    request: &MigrateRequest,
    bar: &ProgressBar,
) -> anyhow::Result<MigrationStatus> {
    let _: MigrationStatus = client.post(&format!("/v1/vms/{vm}/migrate"), request)?;
    wait(client, vm, bar)
}

/// The report of an ended migration, or why it has none.
fn report_of(status: MigrationStatus) -> anyhow::Result<MigrationReport> {
    let vm = &status.vm;
    let error = status.error.as_deref().unwrap_or("unknown error");
    match status.state {
        MigrationState::Succeeded => status
            .report
            .with_context(|| format!("the migration of {vm} succeeded without a report")),
        MigrationState::Failed => bail!("migration of {vm} failed: {error}"),
        MigrationState::Cancelled => bail!("migration of {vm} {error}"),
        MigrationState::InDoubt => bail!(
            "migration of {vm} is in doubt: {error}\n(the source asks the destination and settles it; `ferry vm show {vm}` shows where it stands)"
        ),
        MigrationState::Running => unreachable!("wait returns once it has ended"),
    }
}

/// How long the host may not answer before following a migration is given up (the
/// migration itself goes on, or fails, on its own).
const LOST_CONTACT: Duration = Duration::from_secs(30);

/// Set by Ctrl-C while a migration is followed ([`cancel_on_interrupt`]).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Has the first Ctrl-C cancel the migration being followed (the command then waits for
/// it to end: the VM runs on here) rather than kill the command and leave the migration
/// running unseen; a second one kills the command as usual.
fn cancel_on_interrupt() {
    // SAFETY: the handler only stores to an atomic; SA_RESETHAND puts the default back
    // once it has run.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

/// Follows the migration of `vm` until it ends, however long it takes (the engine ends a
/// migration that stops making progress); returns its last status. After a Ctrl-C (see
/// [`cancel_on_interrupt`]) it asks for the migration's cancel, once, and follows on.
fn wait(client: &ApiClient, vm: &str, bar: &ProgressBar) -> anyhow::Result<MigrationStatus> {
    let mut last_contact = Instant::now();
    let mut cancelled = false;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if !cancelled && INTERRUPTED.load(Ordering::SeqCst) {
            cancelled = true;
            bar.suspend(|| {
                eprintln!(
                    "ferry: cancelling the migration of {vm} (Ctrl-C again to stop following it)"
                )
            });
            // Too late to cancel (or already ended) is what the end will say.
            let _ = client.delete::<MigrationStatus>(&format!("/v1/vms/{vm}/migration"));
        }
        let status: MigrationStatus = match client.get(&format!("/v1/vms/{vm}/migration")) {
            Ok(status) => status,
            Err(e) if e.unreachable().is_some()
                && last_contact.elapsed() < LOST_CONTACT =>
            {
                continue
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "lost track of the migration of {vm}; it may still be running: `ferry vm show {vm}` tells"
                )))
            }
        };
        last_contact = Instant::now();
        if let Some(p) = &status.progress {
            bar.set_message(format!(
                "{} round {} | sent {:.0} MiB | link {:.0} MiB/s | dirty {:.0} MiB/s | predicted pause {:.1} ms | throttle {}%",
                super::error_text(&p.phase),
                p.round,
                mib(p.bytes_sent),
                p.rate_mib_s,
                p.dirty_mib_s,
                p.predicted_pause_ms,
                p.throttle_pct,
            ));
        }
        bar.tick();
        if status.state.has_ended() {
            return Ok(status);
        }
    }
}

/// A spinner on stderr (hidden when `hidden`).
pub fn spinner(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// One line summing up a report.
pub fn summary(report: &MigrationReport) -> String {
    let mut line = format!(
        "{} migration: pause {:.1} ms, total {:.0} ms, {} rounds, {:.1} MiB sent ({:.2} MiB during the pause), throttle up to {}%",
        report.mode,
        report.downtime_ms,
        report.total_ms,
        report.rounds,
        mib(report.bytes_sent),
        mib(report.final_bytes),
        report.max_throttle_pct,
    );
    if let Some(replay) = &report.replay {
        line += &format!(
            "; device by replay: base {:.1} MiB, {} commands ({:.1} MiB), side pool peak {:.1} MiB",
            mib(replay.base_bytes),
            replay.commands,
            mib(replay.command_bytes),
            mib(replay.capture.pool_peak_bytes),
        );
        if let Some(why) = &replay.fell_back {
            line += &format!(", then pre-copy ({why})");
        }
    }
    if report.files_sent + report.files_reused > 0 {
        line += &format!(
            "; attached files: {} sent ({:.1} MiB), {} already on the destination",
            report.files_sent,
            mib(report.file_bytes),
            report.files_reused
        );
    }
    line
}

/// `ferry migrate`.
pub fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let client = args.host.client()?;
    let bar = spinner(args.json);
    if args.cancel {
        let _: MigrationStatus = client.delete(&format!("/v1/vms/{}/migration", args.vm))?;
        let status = wait(&client, &args.vm, &bar);
        bar.finish_and_clear();
        let status = status?;
        let error = status.error.as_deref().unwrap_or("unknown error");
        if args.json {
            // How it ended, too late for the cancel included: a script reads it here.
            println!("{}", serde_json::to_string(&status)?);
        }
        return match status.state {
            MigrationState::Cancelled | MigrationState::Failed => {
                if !args.json {
                    say!("migration of {}: {error}", args.vm);
                }
                Ok(())
            }
            MigrationState::Succeeded => bail!(
                "too late: the migration of {} completed before the cancel took effect",
                args.vm
            ),
            MigrationState::InDoubt => bail!(
                "too late: the migration of {} is in doubt: {error}",
                args.vm
            ),
            MigrationState::Running => unreachable!("wait returns once it has ended"),
        };
    }
    cancel_on_interrupt();
    let status = run_to_end(&client, &args.vm, &args.request(), &bar);
    bar.finish_and_clear();
    let status = status?;
    if args.json && status.state != MigrationState::Succeeded {
        // A script reads how it ended (state, error, settlement) where it reads a report.
        println!("{}", serde_json::to_string(&status)?);
    }
    let report = report_of(status)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let to = args.to.as_deref().unwrap_or_default();
        say!("{} -> {to}: {}", args.vm, summary(&report));
    }
    Ok(())
}
