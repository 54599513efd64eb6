//! The types of Ferry's HTTP/JSON APIs, shared by the host daemon, the cluster center,
//! the client and the CLI: requests, answers, heartbeats, and VM and migration states as
//! enums. Plain serde types, with no behaviour beyond reading them.

use std::path::PathBuf;

use ferry_migrate::{MigrationReport, Progress};
use serde::{Deserialize, Serialize};

/// Where a VM is in its life on this host (the API's `state` field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum VmState {
    /// Being built: its capacity is reserved, its guest not yet started.
    Creating,
    /// Running its guest.
    Running,
    /// Being migrated (pre-copy): still running here.
    Migrating {
        /// The destination's migration address.
        to: String,
    },
    /// Paused here for the switchover of its migration, before the destination was told
    /// to run it: a failure now resumes it here.
    Switchover {
        /// The destination's migration address.
        to: String,
    },
    /// The destination was told to run it, but did not confirm: it stays paused here
    /// until it is known whether it runs there (then it is released here) or not (then
    /// it resumes here). It never runs on both.
    InDoubt {
        /// The destination's migration address.
        to: String,
        /// What broke.
        reason: String,
    },
    /// It runs on another host now.
    MigratedAway {
        /// The destination's migration address.
        to: String,
    },
    /// The operator stopped it; its resources are being given back.
    Stopping,
    /// Stopped by the operator.
    Stopped,
    /// The guest ended with this code.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// The guest faulted or the VM failed.
    Failed {
        /// What happened.
        error: String,
    },
}

impl VmState {
    /// Whether the VM holds this host's resources (memory, threads, capacity).
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            Self::Creating
                | Self::Running
                | Self::Migrating { .. }
                | Self::Switchover { .. }
                | Self::InDoubt { .. }
                | Self::Stopping
        )
    }

    /// Whether it counts as running here (an in-doubt VM does not: it may be running
    /// elsewhere).
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            Self::Running | Self::Migrating { .. } | Self::Switchover { .. }
        )
    }

    /// Whether its life here is over (only its record is left).
    pub fn has_ended(&self) -> bool {
        !self.is_live()
    }

    /// The migration address of the host it is moving, or moved, to.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Self::Migrating { to }
            | Self::Switchover { to }
            | Self::InDoubt { to, .. }
            | Self::MigratedAway { to } => Some(to),
            _ => None,
        }
    }

    /// The state's name, as the API's `state` field spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Migrating { .. } => "migrating",
            Self::Switchover { .. } => "switchover",
            Self::InDoubt { .. } => "in-doubt",
            Self::MigratedAway { .. } => "migrated-away",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Exited { .. } => "exited",
            Self::Failed { .. } => "failed",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Creating => write!(f, "being created"),
            Self::Running => write!(f, "running"),
            Self::Migrating { to } => write!(f, "being migrated to {to}"),
            Self::Switchover { to } => write!(f, "paused for its switchover to {to}"),
            Self::InDoubt { to, reason } => write!(
                f,
                "in doubt after its switchover to {to} ({reason}); resolve it with `ferry vm resolve`"
            ),
            Self::MigratedAway { to } => write!(f, "migrated to the host migrating at {to}"),
            Self::Stopping => write!(f, "stopping"),
            Self::Stopped => write!(f, "stopped"),
            Self::Exited { code } => write!(f, "exited with code {code}"),
            Self::Failed { error } => write!(f, "failed ({error})"),
        }
    }
}

/// What the API shows of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    /// Id, unique across the cluster (kept across migrations).
    pub id: String,
    /// Workload name (or image path).
    pub workload: String,
    /// The name given at creation, if any.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest arguments.
    pub args: Vec<String>,
    /// State.
    #[serde(flatten)]
    pub state: VmState,
    /// Guest RAM, bytes.
    pub memory: u64,
    /// Accelerator memory, bytes.
    pub accel_memory: u64,
    /// Its accelerator's backend kind (`cpu`, `cuda-sm_90-d13`); `None` without one. It
    /// moves only to hosts that run that backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_backend: Option<String>,
    /// Share of the last second the accelerator spent executing commands (0 to 1).
    #[serde(default)]
    pub accel_load: f64,
    /// Time on this host, ms (for a VM that ended here or left, until then).
    pub uptime_ms: u64,
    /// Milliseconds since the epoch when it arrived on this host.
    pub since_unix_ms: u64,
    /// The host it came from (its name), if it was migrated here.
    pub migrated_from: Option<String>,
    /// Its attached files (name, size, SHA-256, path on this host).
    #[serde(default)]
    pub files: Vec<FileInfo>,
    /// The key it was created with ([`CreateVm::idempotency_key`]), on the host that
    /// created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The console's last lines: at most 40, and 4 KiB (the whole console is
    /// `GET /v1/vms/{id}/console`).
    pub console_tail: String,
}

impl VmInfo {
    /// Whether this VM is what `req` asks for (its workload, name, arguments, sizes and
    /// files' names): a create sent again with the same key must ask for the same VM.
    pub fn answers_create(&self, req: &CreateVm) -> bool {
        self.workload == req.workload
            && self.name == req.name
            && self.args == req.args
            && self.memory == req.memory
            && self.accel_memory == req.accel_memory
            && self.files.len() == req.attach.len()
            && (self.files.iter().zip(&req.attach)).all(|(file, asked)| file.name == asked.name)
    }
}

/// An attached file: enough to find it again and to know it is the same content (what a
/// VM's state records of it, and what the API shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Name the guest finds it by.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Where it is on the host (in a saved VM state: where it was on the host that
    /// attached it, a hint for a restore there).
    pub path: PathBuf,
}

/// Where a migration out of this host (or one the center ordered) is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Under way.
    #[default]
    Running,
    /// The VM runs on the destination.
    Succeeded,
    /// It failed before the destination was told to run the VM: the VM runs here.
    Failed,
    /// Cancelled before the destination was told to run the VM: the VM runs here.
    Cancelled,
    /// The destination was told to run the VM but did not confirm: the VM is in doubt,
    /// paused here, until it is known where it runs.
    InDoubt,
}

impl MigrationState {
    /// Whether it has ended (any state but running).
    pub fn has_ended(self) -> bool {
        self != Self::Running
    }

    /// The state's name, as the API's `state` field spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::InDoubt => "in-doubt",
        }
    }
}

/// A migration out of this host, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// VM id.
    pub vm: String,
    /// Destination.
    pub to: String,
    /// Where it is.
    pub state: MigrationState,
    /// Last progress report.
    pub progress: Option<Progress>,
    /// The result, once it succeeded.
    pub report: Option<MigrationReport>,
    /// Why it failed.
    pub error: Option<String>,
    /// For an in-doubt migration: each attempt to settle where the VM runs, and how it
    /// was settled (the evidence an operator resolving it by hand sees).
    #[serde(default)]
    pub settlement: Vec<String>,
}

/// This host's capacity and load: `GET /v1/host`, and the heart of each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name.
    pub name: String,
    /// Where it receives migrations.
    pub migration_addr: String,
    /// Ferry version.
    pub version: String,
    /// Accelerator backend kind of the VMs created here (`cpu`, `cuda-sm_90-d13`).
    pub backend: String,
    /// Every backend kind it runs VMs on (`cpu` always, and its GPU's); empty from hosts
    /// that predate it, which run `cpu` only.
    #[serde(default)]
    pub backends: Vec<String>,
    /// CPU cores.
    pub cpus: usize,
    /// Threads each VM's accelerator runs kernels on.
    pub accel_threads: usize,
    /// One-minute load average of the machine.
    pub load_avg: f64,
    /// VM memory (RAM + accelerator) it may hand out, bytes.
    pub memory_capacity: u64,
    /// VM memory in use, bytes.
    pub memory_used: u64,
    /// Accelerator memory it may hand out, bytes.
    pub accel_capacity: u64,
    /// Accelerator memory in use, bytes.
    pub accel_used: u64,
    /// Sum of its VMs' accelerator loads (busy devices' worth, 0 to the VM count).
    pub accel_load: f64,
    /// VMs running here (being migrated included; in doubt not).
    pub vms_running: usize,
    /// VMs in doubt after a broken switchover: paused here until resolved.
    #[serde(default)]
    pub vms_in_doubt: usize,
}

/// A request to create a VM. A field it does not know is refused, not ignored: a
/// misspelled `idempotency_key` would otherwise create a second VM when sent again. (A
/// field added later must be optional and left out when unset, so that hosts that do not
/// know it yet still take the creates of a center that does.)
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Built-in workload name, or a path to a guest ELF on the host.
    pub workload: String,
    /// A name for it (1 to 63 letters, digits, `.`, `_`, `-`): what OpenAI clients of a
    /// serving VM give as `model`. It moves with the VM.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Guest RAM bytes (default 256 MiB).
    #[serde(default = "default_memory")]
    pub memory: u64,
    /// Accelerator memory bytes (default 0: none).
    #[serde(default)]
    pub accel_memory: u64,
    /// Read-only files to attach, in the order the guest sees them.
    #[serde(default)]
    pub attach: Vec<Attachment>,
    /// Its accelerator's backend: `cpu`, `cuda` (the host's GPU, whatever its kind) or an
    /// exact kind (`cuda-sm_90-d13`); default: the host's (`ferry host serve --backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// A key the client makes up for this create (1 to 63 letters, digits, `.`, `_`,
    /// `-`), so it can send the create again when the answer was lost: a host or center
    /// that created a VM with this key answers with that VM instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A fresh idempotency key for a create ([`CreateVm::idempotency_key`]), made by
/// `maker` (`center`, `cli`): unique to this process's keys, and unlikely to be any
/// other process's.
pub fn fresh_idempotency_key(maker: &str) -> String {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut random = [0u8; 8];
    // Without randomness, the time and the count still keep this process's keys apart.
    let _ = getrandom::fill(&mut random);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{maker}-{ms}-{n}-{:016x}", u64::from_le_bytes(random))
}

/// What is wrong with an idempotency key ([`CreateVm::idempotency_key`]), if anything.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if valid_vm_name(key) {
        Ok(())
    } else {
        Err(format!("an idempotency key is {NAME_RULE}"))
    }
}

/// Whether a host whose backends are `backends` runs the backend `wanted` names (`cuda`:
/// any GPU's).
pub fn runs_backend(backends: &[String], wanted: &str) -> bool {
    backends
        .iter()
        .any(|b| b == wanted || (wanted == "cuda" && b.starts_with("cuda-")))
}

/// A file on the host given to a VM (`--attach NAME=PATH`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Attachment {
    /// Name the guest finds it by.
    pub name: String,
    /// Path on the host.
    pub path: PathBuf,
}

fn default_memory() -> u64 {
    256 << 20
}

/// A request to migrate a VM. A field it does not know is refused, not ignored: a
/// misspelled `max_rate_mib_s` would otherwise migrate at full speed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination's migration address (`HOST:PORT`).
    pub to: String,
    /// "live" (default) or "stop-and-copy".
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Pause to aim for, ms (default 50).
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Parallel data connections (default 4).
    #[serde(default = "default_streams")]
    pub streams: u8,
    /// LZ4-compress the data.
    #[serde(default)]
    pub compress: bool,
    /// Throttle the VM if it dirties memory faster than the link (default true).
    #[serde(default = "default_true")]
    pub throttle: bool,
    /// Switch over with a longer pause rather than fail after the pre-copy bounds.
    #[serde(default)]
    pub allow_longer_pause: bool,
    /// Most pre-copy rounds (default 30; 1 to [`MAX_ROUNDS`]).
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Most pre-copy seconds (default 60; at most [`MAX_PRECOPY_S`]).
    #[serde(default = "default_precopy_s")]
    pub max_precopy_s: u64,
    /// Attached files: "reuse" (default: send only those the destination lacks),
    /// "send" (send all) or "require" (send none; the destination must have them).
    #[serde(default = "default_files")]
    pub files: String,
    /// Device memory: "auto" (default: replay the device's commands when it dirties
    /// memory faster than the link resends it), "precopy" or "replay".
    #[serde(default)]
    pub device: ferry_migrate::DeviceTransfer,
    /// The most MiB of state per second pre-copy moves (1 to [`MAX_RATE_MIB_S`]; absent:
    /// as fast as it goes): a gentler migration for a busy host or a shared link. The pause is not
    /// limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_mib_s: Option<u64>,
}

/// The highest rate ceiling a migration request may ask for, MiB/s (1 PiB/s: any more is
/// a mistake, and it must fit in bytes/s).
pub const MAX_RATE_MIB_S: u64 = 1 << 30;

/// The most pre-copy rounds a migration request may allow: a migration that has not
/// converged in a thousand rounds will not, and should switch over or give up.
pub const MAX_ROUNDS: u32 = 1000;

/// The longest pause a migration request may aim for, ms (ten minutes: longer is a
/// stopped VM, not a live migration; and bounded, so deadlines built on it cannot
/// overflow).
pub const MAX_DOWNTIME_MS: u64 = 600_000;

/// Whether `addr` may be a migration destination ([`MigrateRequest::to`]): `HOST:PORT`
/// with a port from 1, HOST a name, an IPv4 address or a bracketed IPv6 one, in at most
/// 255 bytes.
pub fn valid_peer_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    addr.len() <= 255 && host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// The most pre-copy seconds a migration request may allow (a day: enough to move the
/// largest VM at the lowest rate ceiling that makes sense, and bounded, so a mistyped
/// value cannot keep a VM migrating for ever).
pub const MAX_PRECOPY_S: u64 = 24 * 3600;

fn default_mode() -> String {
    "live".into()
}
fn default_downtime() -> u64 {
    50
}
fn default_streams() -> u8 {
    ferry_migrate::DEFAULT_STREAMS
}
fn default_true() -> bool {
    true
}
fn default_rounds() -> u32 {
    30
}
fn default_precopy_s() -> u64 {
    60
}
fn default_files() -> String {
    "reuse".into()
}

impl MigrateRequest {
    /// A request to migrate to `addr` with every other setting at its default.
    pub fn to(addr: &str) -> Self {
        Self {
            to: addr.to_string(),
            mode: default_mode(),
            downtime_ms: default_downtime(),
            streams: default_streams(),
            compress: false,
            throttle: default_true(),
            allow_longer_pause: false,
            max_rounds: default_rounds(),
            max_precopy_s: default_precopy_s(),
            files: default_files(),
            device: ferry_migrate::DeviceTransfer::default(),
            max_rate_mib_s: None,
        }
    }
}

/// A settle question relayed through the center: the destination (by its migration
/// address) and the migration's session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettleRequest {
    /// The destination's migration address.
    pub migration_addr: String,
    /// The migration's session.
    pub session: u64,
    /// The VM in doubt: the center, if the destination cannot answer, may know it runs
    /// on a third host (moved on from the destination).
    #[serde(default)]
    pub vm: Option<String>,
    /// The asking source's host name: its own record of the VM (from a beat before the
    /// doubt) is no evidence of a third host.
    #[serde(default)]
    pub from: Option<String>,
}

/// One heartbeat: in full (every VM), or as the changes since a beat the center took
/// (`delta`), so a steady host of many VMs sends little more than its load each second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Where the center reaches this host's API (`http://HOST:PORT`).
    pub api_url: String,
    /// Capacity and load.
    pub host: HostInfo,
    /// Without `delta`, every VM the host lists, ended and migrated ones included; with
    /// it, those that changed since the base beat. Summaries: without their console tails
    /// (the host's own API has those), so a beat stays small.
    pub vms: Vec<VmInfo>,
    /// This beat's place in the host's series (absent from hosts that only send full
    /// beats).
    #[serde(default)]
    pub seq: Option<BeatSeq>,
    /// Set when `vms` holds only the changes since beat `delta.base` of the same series.
    #[serde(default)]
    pub delta: Option<BeatDelta>,
    /// Idempotency keys of the creates under way on the host (their VMs not listed yet),
    /// in every beat: a center that took the lead meanwhile sends such a create, sent
    /// again, to this host rather than placing it anew.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub creating: Vec<String>,
}

/// Where a beat stands in its host's series of beats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeatSeq {
    /// Chosen at random when the host starts: a restarted host begins a new series.
    pub series: u64,
    /// Counts up by one per beat.
    pub seq: u64,
}

/// What a delta beat changes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeatDelta {
    /// The beat (of the same series) the center last took and the changes apply to.
    pub base: u64,
    /// VMs the host no longer lists since then.
    pub removed: Vec<String>,
}

/// The center's answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeatAnswer {
    /// Whether the beat was taken. A delta whose base the center does not hold (it
    /// restarted, another replica took the base, a beat was lost) is refused, and the
    /// host sends a full beat next.
    pub taken: bool,
    /// Live VMs of a taken beat whose report the center did not keep (another host's
    /// report of the VM stands: it is in a move, or the center awaits the other host's
    /// word that it moved here): the host reports them again, so the center has them
    /// should the other report go.
    #[serde(default)]
    pub skipped: Vec<String>,
    /// The leader's term, when the answering replica leads a replicated center: the
    /// host refuses orders of older terms from then on (see [`LEADER_TERM_HEADER`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_term: Option<LeaderTerm>,
}

impl BeatAnswer {
    /// A beat taken whole.
    pub fn taken() -> Self {
        Self {
            taken: true,
            skipped: Vec::new(),
            leader_term: None,
        }
    }

    /// A delta refused: send a full beat.
    pub fn need_full() -> Self {
        Self {
            taken: false,
            skipped: Vec::new(),
            leader_term: None,
        }
    }
}

/// Header on an order (a request that changes something) a replicated center's leader
/// sends a host: the leader's [`LeaderTerm`]. A host refuses an order whose term is older
/// than one it has seen, so a leader deposed while it was paused cannot act once its
/// successor has spoken to the host.
pub const LEADER_TERM_HEADER: &str = "x-ferry-leader-term";

/// A replicated center leader's term: the creation revision of the leader key, which
/// grows with each new leader, in the etcd cluster that holds it (a new etcd cluster
/// counts revisions from 1 again, so its terms are not compared with the old one's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderTerm {
    /// The etcd cluster's id.
    pub cluster: u64,
    /// The leader key's creation revision in it.
    pub revision: i64,
}

impl LeaderTerm {
    /// Its [`LEADER_TERM_HEADER`] value: `CLUSTER-REVISION`, the cluster in hex.
    pub fn header_value(&self) -> String {
        format!("{:x}-{}", self.cluster, self.revision)
    }

    /// A [`LEADER_TERM_HEADER`] value, if well formed.
    pub fn from_header(value: &str) -> Option<Self> {
        let (cluster, revision) = value.split_once('-')?;
        Some(Self {
            cluster: u64::from_str_radix(cluster, 16).ok()?,
            revision: revision.parse().ok()?,
        })
    }
}

impl std::fmt::Display for LeaderTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of etcd cluster {:x}", self.revision, self.cluster)
    }
}

/// Whether two reports of a VM differ in what the center keeps: its uptime counts on by
/// itself, and accelerator load within `LOAD_STEP` is noise.
pub fn vm_report_changed(old: &VmInfo, new: &VmInfo) -> bool {
    /// Load changes smaller than this are not news.
    const LOAD_STEP: f64 = 0.05;
    (old.accel_load - new.accel_load).abs() >= LOAD_STEP
        || old.state != new.state
        || old.since_unix_ms != new.since_unix_ms
        || old.id != new.id
        || old.name != new.name
        || old.workload != new.workload
        || old.args != new.args
        || old.memory != new.memory
        || old.accel_memory != new.accel_memory
        || old.migrated_from != new.migrated_from
        || old.files != new.files
}

/// A host's side of the heartbeat series: what the center last took, so the next beat
/// carries only the changes.
#[derive(Debug)]
pub struct BeatSeries {
    series: u64,
    seq: u64,
    /// The last beat the center took, and the VMs as it then listed them.
    taken: Option<(u64, std::collections::BTreeMap<String, VmInfo>)>,
    /// The beat in flight, and its full list.
    sent: Option<(u64, std::collections::BTreeMap<String, VmInfo>)>,
}

impl BeatSeries {
    /// A new series, named `series` (random per host start).
    pub fn new(series: u64) -> Self {
        Self {
            series,
            seq: 0,
            taken: None,
            sent: None,
        }
    }

    /// The next beat: in full at first and after a refusal, otherwise the changes.
    pub fn beat(&mut self, api_url: String, host: HostInfo, vms: Vec<VmInfo>) -> Heartbeat {
        self.seq += 1;
        let all: std::collections::BTreeMap<String, VmInfo> =
            vms.into_iter().map(|vm| (vm.id.clone(), vm)).collect();
        let (vms, delta) = match &self.taken {
            None => (all.values().cloned().collect(), None),
            Some((base, before)) => {
                let changed = all
                    .values()
                    .filter(|vm| {
                        before
                            .get(&vm.id)
                            .is_none_or(|old| vm_report_changed(old, vm))
                    })
                    .cloned()
                    .collect();
                let removed = before
                    .keys()
                    .filter(|id| !all.contains_key(*id))
                    .cloned()
                    .collect();
                (
                    changed,
                    Some(BeatDelta {
                        base: *base,
                        removed,
                    }),
                )
            }
        };
        self.sent = Some((self.seq, all));
        Heartbeat {
            api_url,
            host,
            vms,
            seq: Some(BeatSeq {
                series: self.series,
                seq: self.seq,
            }),
            delta,
            creating: Vec::new(),
        }
    }

    /// The center's answer to the last beat (`None`: it did not arrive, or failed).
    pub fn answered(&mut self, answer: Option<&BeatAnswer>) {
        let Some((seq, mut all)) = self.sent.take() else {
            return;
        };
        match answer {
            Some(BeatAnswer {
                taken: true,
                skipped,
                ..
            }) => {
                for id in skipped {
                    all.remove(id);
                }
                // A VM whose change was only noise stays as the center holds it, so
                // drift below the step cannot build up unseen.
                if let Some((_, before)) = &self.taken {
                    for (id, vm) in all.iter_mut() {
                        if let Some(old) = before.get(id) {
                            if !vm_report_changed(old, vm) {
                                *vm = old.clone();
                            }
                        }
                    }
                }
                self.taken = Some((seq, all));
            }
            Some(BeatAnswer { taken: false, .. }) => self.taken = None,
            // Unknown whether the center took it: if it did, it refuses the next delta
            // (built on the older base) and a full beat follows.
            None => {}
        }
    }
}

/// A message for a VM's message channel: `POST /v1/vms/{id}/streams` queues a request
/// that opens `stream`; `POST /v1/vms/{id}/streams/{stream}/signal` sends a control
/// message (a cancel) to an open one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelMessage {
    /// The stream it opens or belongs to.
    pub stream: u64,
    /// What it is (up to the guest: `ferry_llm::serve::kind` for `llm-serve`).
    pub kind: u32,
    /// Its bytes, base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
}

/// One response of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// What it is.
    pub kind: u32,
    /// Its bytes, base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
}

/// Whether a stream has ended, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamEnd {
    /// The guest may still respond.
    Open,
    /// The guest sent its final response.
    Final,
    /// The guest sent more than a stream may hold; the rest was dropped.
    Overflow,
    /// The VM ended first.
    VmEnded,
}

/// `GET /v1/vms/{id}/streams/{stream}?from=K&wait_ms=W`: the stream's responses from
/// index `from` on (waiting up to `wait_ms` for one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Index of the first event.
    pub from: usize,
    /// The events.
    pub events: Vec<StreamEvent>,
    /// Whether the stream has ended (after these events).
    pub end: StreamEnd,
}

/// Bytes as a base64 string in JSON.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// What a VM's or host's name (and an idempotency key) may be, for messages.
pub const NAME_RULE: &str = "1 to 63 ASCII letters, digits, '.', '_' and '-', not all dots";
/// What a VM's id may be, for messages.
pub const ID_RULE: &str = "1 to 255 ASCII letters, digits, '.', '_' and '-', not all dots";

/// Whether `name` may name a VM ([`CreateVm::name`]): [`NAME_RULE`].
pub fn valid_vm_name(name: &str) -> bool {
    (1..64).contains(&name.len()) && path_segment(name)
}

/// Whether `name` may name a host: as a VM name, since a host's name prefixes the ids of
/// the VMs created there and stands in URL paths.
pub fn valid_host_name(name: &str) -> bool {
    valid_vm_name(name)
}

/// Whether `id` may be a VM's id (a host keeps the id of a VM migrated to it only if
/// it is): [`ID_RULE`].
pub fn valid_vm_id(id: &str) -> bool {
    (1..=255).contains(&id.len()) && path_segment(id)
}

/// Whether `text` stands as itself in a URL path: letters, digits, `.`, `_` and `-`
/// need no escaping, and one not all dots is no `.` or `..` segment, which clients and
/// browsers resolve away (`/v1/hosts/./maintenance` is `/v1/hosts/maintenance`).
fn path_segment(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !text.bytes().all(|b| b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_migrate_requests_refuse_fields_they_do_not_know() {
        let create = r#"{"workload": "hello", "idempotency-key": "k1"}"#;
        let e = serde_json::from_str::<CreateVm>(create).unwrap_err();
        assert!(
            e.to_string().contains("unknown field `idempotency-key`"),
            "{e}"
        );
        let migrate = r#"{"to": "b:7070", "max_rate": 100}"#;
        let e = serde_json::from_str::<MigrateRequest>(migrate).unwrap_err();
        assert!(e.to_string().contains("unknown field `max_rate`"), "{e}");
        // What clients and the center send, every field set, is taken back.
        let create = CreateVm {
            workload: "hello".into(),
            name: Some("chat".into()),
            args: vec!["--steps".into(), "3".into()],
            memory: 16 << 20,
            accel_memory: 1 << 20,
            attach: vec![Attachment {
                name: "model".into(),
                path: "/models/m.gguf".into(),
            }],
            backend: Some("cpu".into()),
            idempotency_key: Some("k1".into()),
        };
        let back: CreateVm =
            serde_json::from_value(serde_json::to_value(&create).unwrap()).unwrap();
        assert_eq!(back.idempotency_key.as_deref(), Some("k1"));
        let migrate = MigrateRequest {
            max_rate_mib_s: Some(100),
            ..MigrateRequest::to("b:7070")
        };
        let back: MigrateRequest =
            serde_json::from_value(serde_json::to_value(&migrate).unwrap()).unwrap();
        assert_eq!(back.max_rate_mib_s, Some(100));
    }

    #[test]
    fn migration_state_names_are_their_json() {
        use MigrationState::*;
        for state in [Running, Succeeded, Failed, Cancelled, InDoubt] {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.name())
            );
        }
    }

    fn host() -> HostInfo {
        HostInfo {
            name: "a".into(),
            migration_addr: "127.0.0.1:1".into(),
            version: "0".into(),
            backend: "cpu".into(),
            backends: vec!["cpu".into()],
            cpus: 2,
            accel_threads: 1,
            load_avg: 0.0,
            memory_capacity: 1 << 30,
            memory_used: 0,
            accel_capacity: 1 << 30,
            accel_used: 0,
            accel_load: 0.0,
            vms_running: 1,
            vms_in_doubt: 0,
        }
    }

    fn vm(load: f64) -> VmInfo {
        VmInfo {
            id: "v".into(),
            workload: "mlp-train".into(),
            name: None,
            args: Vec::new(),
            state: VmState::Running,
            memory: 1 << 20,
            accel_memory: 0,
            accel_backend: None,
            accel_load: load,
            uptime_ms: 0,
            since_unix_ms: 1,
            migrated_from: None,
            files: Vec::new(),
            console_tail: String::new(),
            idempotency_key: None,
        }
    }

    #[test]
    fn load_drifting_below_the_step_each_beat_is_sent_once_it_adds_up() {
        let taken = BeatAnswer::taken();
        let mut series = BeatSeries::new(1);
        series.beat("u".into(), host(), vec![vm(0.50)]);
        series.answered(Some(&taken));
        let beat = series.beat("u".into(), host(), vec![vm(0.53)]);
        assert!(beat.vms.is_empty(), "0.03 is noise");
        series.answered(Some(&taken));
        let beat = series.beat("u".into(), host(), vec![vm(0.56)]);
        assert_eq!(beat.vms.len(), 1, "0.06 from what the center holds is news");
        assert_eq!(beat.delta.as_ref().map(|d| d.base), Some(2));
    }

    #[test]
    fn a_beat_that_got_no_answer_leaves_the_next_delta_on_the_last_base_taken() {
        let mut series = BeatSeries::new(1);
        series.beat("u".into(), host(), vec![vm(0.5)]);
        series.answered(Some(&BeatAnswer::taken()));
        series.beat("u".into(), host(), vec![]);
        series.answered(None);
        let beat = series.beat("u".into(), host(), vec![]);
        let delta = beat.delta.expect("a delta");
        assert_eq!(delta.base, 1);
        assert_eq!(delta.removed, vec!["v".to_string()]);
        assert_eq!(beat.seq.map(|s| s.seq), Some(3));
    }

    #[test]
    fn names_and_ids_stand_as_themselves_in_url_paths() {
        for good in [
            "a",
            "vm-1",
            "a.b",
            "host_7",
            ".hidden",
            "x..y",
            &"v".repeat(63),
        ] {
            assert!(
                valid_vm_name(good) && valid_host_name(good) && valid_vm_id(good),
                "{good}"
            );
        }
        // Dot segments resolve away; the rest needs escaping or is too long.
        for bad in [
            ".",
            "..",
            "...",
            "",
            "a/b",
            "a b",
            "é",
            "a%2e",
            &"v".repeat(64),
        ] {
            assert!(!valid_vm_name(bad) && !valid_host_name(bad), "{bad}");
        }
        assert!(valid_vm_id(&"v".repeat(255)) && !valid_vm_id(&"v".repeat(256)));
        assert!(!valid_vm_id("..") && !valid_vm_id("."));
    }

    #[test]
    fn fresh_idempotency_keys_are_keys_and_differ() {
        let (a, b) = (
            fresh_idempotency_key("center"),
            fresh_idempotency_key("center"),
        );
        assert_ne!(a, b);
        for key in [&a, &b] {
            assert!(check_idempotency_key(key).is_ok(), "{key}");
        }
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("a/b").is_err());
        assert!(check_idempotency_key(&"k".repeat(64)).is_err());
    }

    #[test]
    fn a_vm_answers_only_the_create_that_asks_for_it() {
        let create = CreateVm {
            workload: "llm-serve".into(),
            name: Some("chat".into()),
            args: vec!["--slots".into(), "4".into()],
            memory: 256 << 20,
            accel_memory: 1 << 30,
            attach: vec![Attachment {
                name: "model".into(),
                path: "/models/m.gguf".into(),
            }],
            backend: None,
            idempotency_key: Some("k".into()),
        };
        let made = VmInfo {
            id: "h-vm1".into(),
            workload: create.workload.clone(),
            name: create.name.clone(),
            args: create.args.clone(),
            state: VmState::Running,
            memory: create.memory,
            accel_memory: create.accel_memory,
            accel_backend: Some("cpu".into()),
            accel_load: 0.0,
            uptime_ms: 0,
            since_unix_ms: 0,
            migrated_from: None,
            files: vec![FileInfo {
                name: "model".into(),
                size: 1,
                sha256: String::new(),
                path: "/store/sha256-x".into(),
            }],
            idempotency_key: Some("k".into()),
            console_tail: String::new(),
        };
        assert!(made.answers_create(&create));
        let changes: [fn(&mut CreateVm); 5] = [
            |c| c.workload = "mlp-train".into(),
            |c| c.name = None,
            |c| c.args.clear(),
            |c| c.accel_memory = 0,
            |c| c.attach[0].name = "weights".into(),
        ];
        for change in changes {
            let mut other = create.clone();
            change(&mut other);
            assert!(!made.answers_create(&other), "{other:?}");
        }
    }

    #[test]
    fn a_report_the_center_skipped_is_sent_again() {
        let mut series = BeatSeries::new(1);
        series.beat("u".into(), host(), vec![vm(0.5)]);
        series.answered(Some(&BeatAnswer {
            skipped: vec!["v".into()],
            ..BeatAnswer::taken()
        }));
        let beat = series.beat("u".into(), host(), vec![vm(0.5)]);
        assert_eq!(
            beat.vms.len(),
            1,
            "unchanged, but the center does not hold it"
        );
        series.answered(Some(&BeatAnswer::taken()));
        let beat = series.beat("u".into(), host(), vec![vm(0.5)]);
        assert!(beat.vms.is_empty());
    }
}
