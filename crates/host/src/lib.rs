//! The Ferry host daemon (`ferry host serve`): runs VMs, serves the HTTP/JSON API, sends
//! VMs to other hosts and receives them.
//!
//! - [`Host`]: the VMs of this host and every operation on them.
//! - [`lifecycle`]: a VM's state machine, one per VM.
//! - [`capacity`]: the memory this host has promised to VMs, reserved before use.
//! - [`hosted`]: one VM: its lifecycle, its microVM's control, its watcher and throttle.
//! - [`files`]: where attached files of VMs migrated here come from (the file store).
//! - `ids`: VM ids, never given twice, not even after a restart.
//! - [`migration`]: the microVM adapted to the migration engine's traits.
//! - [`api`]: the HTTP/JSON API over [`Host`].
//! - [`heartbeat`]: reports to the cluster center (`ferry host serve --center URL`).

pub mod api;
pub mod capacity;
mod channel;
pub mod files;
pub mod heartbeat;
pub mod hosted;
mod ids;
pub mod lifecycle;
pub mod migration;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_accel::backend::DeviceMemory;
use ferry_migrate::{
    error_chain, FileTransfer, MigrationError, MigrationOptions, Mode, Outcomes, Progress, Secret,
    Settlement, VmError,
};
use ferry_vmm::devices::channel::UNREAD_END_GRACE;
use ferry_vmm::files::AttachError;
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig};

use capacity::{Amount, Ledger, Reservation};
use ferry_api::{
    Attachment, CreateVm, HostInfo, LeaderTerm, MigrateRequest, MigrationState, MigrationStatus,
    SettleRequest, VmInfo, VmState,
};
use ferry_http::cluster_roots;
use files::{FileStore, ReceivingPin};
use hosted::{HostedVm, MigrationTicket, Origin};
use migration::{
    VmSource, VmTarget, EXTRA_ARGS, EXTRA_FROM, EXTRA_FROM_INSTANCE, EXTRA_ID,
    EXTRA_IDEMPOTENCY_KEY, EXTRA_NAME,
};

/// Errors of host operations, each with the HTTP status the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No such VM.
    #[error("no VM with id '{0}' on this host")]
    NotFound(String),
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The VM is not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// Not enough memory on this host.
    #[error("{0}")]
    NoRoom(String),
    /// Creating or running the VM failed.
    #[error("{0}")]
    Failed(String),
    /// Not now (the guest is starting, or the VM is pausing for a switchover): try again
    /// shortly.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests are waiting: try again later.
    #[error("{0}")]
    Busy(String),
    /// The VM runs on another host now.
    #[error("{0}")]
    Moved(String),
    /// No such stream on the VM's channel.
    #[error("{0}")]
    StreamNotFound(String),
    /// A request opening a stream the VM's channel already has.
    #[error("{0}")]
    StreamExists(String),
    /// A message larger than the guest takes.
    #[error("{0}")]
    TooLarge(String),
    /// An order from a center leader older than one this host has heard from.
    #[error("{0}")]
    StaleLeader(String),
}

impl HostError {
    /// The API's stable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            HostError::NotFound(_) => "vm_not_found",
            HostError::BadRequest(_) => "bad_request",
            HostError::Conflict(_) => "wrong_state",
            HostError::NoRoom(_) => "no_room",
            HostError::Failed(_) => "vm_failed",
            HostError::Unavailable(_) => "unavailable",
            HostError::Busy(_) => "busy",
            HostError::Moved(_) => "migrated",
            HostError::StreamNotFound(_) => "stream_not_found",
            HostError::StreamExists(_) => "stream_exists",
            HostError::TooLarge(_) => "too_large",
            HostError::StaleLeader(_) => "stale_leader",
        }
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostStartError {
    /// Its file store's folder could not be made.
    #[error("cannot create the file store {}", .0.display())]
    FileStore(PathBuf, #[source] std::io::Error),
    /// The record of the migrations it received could not be read.
    #[error(transparent)]
    Record(#[from] ferry_migrate::RecordError),
    /// The record of the VM ids it gave could not be read, or the next ids reserved.
    #[error(transparent)]
    Ids(#[from] ids::IdRecordError),
}

/// The file, in a host's file store, listing the migrations whose VM ran here (see
/// [`Outcomes::recorded`]).
pub const RESUMED_MIGRATIONS: &str = "resumed-migrations";

pub use ids::{IdRecordError, VM_IDS};

/// A migration refused because the host is shutting down.
fn shutting_down() -> HostError {
    HostError::Unavailable("the host is shutting down: it starts no migration".into())
}

/// Whether a VM id a migration's source sent can be kept here: it names the VM in URL
/// paths, logs and thread names, so only the characters of a VM name
/// ([`ferry_api::valid_vm_id`]); otherwise the VM gets an id of this host's.
fn usable_id(id: &str) -> bool {
    ferry_api::valid_vm_id(id)
}

/// How this host runs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Name shown in listings.
    pub name: String,
    /// Shared secret for migrations and the API.
    pub secret: Secret,
    /// Bytes of VM memory (RAM + accelerator) this host may hand out.
    pub memory_capacity: u64,
    /// Bytes of accelerator memory (part of `memory_capacity`) this host may hand out.
    pub accel_capacity: u64,
    /// Accelerator threads per VM.
    pub accel_threads: usize,
    /// Nice value of the VMs' threads (vCPUs, accelerators), below the daemon's own.
    pub guest_nice: i32,
    /// Mutual TLS on migration connections (both hosts need it on, or both off).
    pub tls: Option<ferry_migrate::TlsConfig>,
    /// Where attached files received with migrated VMs are kept.
    pub file_store: PathBuf,
    /// Operators' API tokens, one per line (`TOKEN` or `TOKEN read-only`), read again
    /// when the file changes.
    pub api_tokens: Option<PathBuf>,
    /// The accelerator backend kind of VMs created here (`backend::resolve` gives it);
    /// VMs migrated in keep theirs.
    pub backend: &'static str,
    /// Which of this host's files a create request may attach.
    pub attach: AttachPolicy,
}

/// Which host files a create request may attach to its VM. An API client names host
/// paths, and a guest can read what is attached: without a bound, any operator's token
/// could read every file the daemon can (the cluster secret and TLS keys included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachPolicy {
    /// Any file the daemon can read: an in-process host, whose API only the process that
    /// started it can use (the demo and the benchmarks).
    Anywhere,
    /// Only files under these directories; none if empty.
    Under(Vec<AttachDir>),
}

/// A directory whose files a create request may attach: as the operator named it (the
/// paths clients give go through the same links) and with its links resolved (where the
/// files it holds really are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachDir {
    /// As named, made absolute.
    pub given: PathBuf,
    /// Canonical.
    pub canonical: PathBuf,
}

impl AttachDir {
    /// `dir`, which must exist.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            given: std::path::absolute(dir)?,
            canonical: std::fs::canonicalize(dir)?,
        })
    }
}

impl AttachPolicy {
    /// `path` (relative to the daemon's directory) as the canonical path to open, if
    /// this policy lets a client attach it; otherwise why not. A path outside the
    /// directories is refused before the file system is asked, and one inside that names
    /// no file, or leads outside through a link, gets that same refusal: the answer does
    /// not tell whether a file exists outside.
    fn admit(&self, path: &Path) -> Result<PathBuf, String> {
        let dirs = match self {
            Self::Anywhere => {
                return std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))
            }
            Self::Under(dirs) => dirs,
        };
        let lexical = std::path::absolute(path).map_err(|_| self.refusal(path))?;
        let parent_dir = lexical
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        let named_inside = dirs
            .iter()
            .any(|d| lexical.starts_with(&d.given) || lexical.starts_with(&d.canonical));
        if parent_dir || !named_inside {
            return Err(self.refusal(path));
        }
        // A symlink inside may point outside, to a file there or to none: alike.
        match std::fs::canonicalize(&lexical) {
            Ok(canonical) if self.holds(&canonical) => Ok(canonical),
            _ => Err(self.refusal(path)),
        }
    }

    /// The one refusal of `path` as a client named it, whether it is outside the
    /// directories, names no file inside, leads outside through a link, or could not be
    /// opened where it led: it tells nothing of what is outside.
    fn refusal(&self, path: &Path) -> String {
        let dirs = match self {
            Self::Anywhere => &Vec::new(),
            Self::Under(dirs) => dirs,
        };
        if dirs.is_empty() {
            return "this host attaches no files named by path (start it with --attach-dir DIR)"
                .to_string();
        }
        let allowed: Vec<String> = dirs.iter().map(|d| d.given.display().to_string()).collect();
        format!(
            "{} names no file under the directories this host attaches files from ({})",
            path.display(),
            allowed.join(", ")
        )
    }

    /// Whether the file at `real` (a path with its links resolved) may be attached.
    fn holds(&self, real: &Path) -> bool {
        match self {
            Self::Anywhere => true,
            Self::Under(dirs) => dirs.iter().any(|d| real.starts_with(&d.canonical)),
        }
    }

    /// Refuses the open `file`, before any of it is read, if it lies outside the
    /// directories: a path [`Self::admit`] let through may have been made a link to
    /// elsewhere before it was opened.
    fn check_open(&self, file: &std::fs::File) -> std::io::Result<()> {
        if let Self::Anywhere = self {
            return Ok(());
        }
        if self.holds(&ferry_vmm::files::opened_path(file)?) {
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "opened outside the directories files are attached from",
        ))
    }

    /// The refusal of a create whose files `attach` named failed to open with `e`.
    /// Confined, a file that could not be opened, or was opened outside, is refused as a
    /// path outside is: the answer tells nothing of what is there (the log has why).
    /// Past that check, the file is inside, and its errors are told.
    fn open_refusal(&self, e: AttachError, attach: &[Attachment]) -> HostError {
        match e {
            AttachError::Open { ref name, .. } | AttachError::Refused { ref name, .. }
                if matches!(self, Self::Under(_)) =>
            {
                tracing::info!("a create's file refused: {}", error_chain(&e));
                let asked = attach.iter().find(|a| a.name == *name).map(|a| &a.path);
                let why = self.refusal(asked.map_or(Path::new(""), PathBuf::as_path));
                HostError::BadRequest(format!("cannot attach '{name}': {why}"))
            }
            e => HostError::BadRequest(format!("cannot attach the files: {}", error_chain(&e))),
        }
    }
}

/// Most records of VMs that ended here (exited, failed, migrated away) kept listed.
pub const ENDED_VMS_KEPT: usize = 256;
/// How long a VM that ended here stays listed.
pub const ENDED_VMS_KEPT_FOR: Duration = Duration::from_secs(3600);

/// How long a source keeps asking where an in-doubt VM runs before leaving it to the
/// operator (well within how long destinations remember their sessions).
pub const IN_DOUBT_PATIENCE: Duration = Duration::from_secs(600);
/// Settle attempts kept in a migration's status.
const MAX_SETTLEMENT_LINES: usize = 20;
/// Times a create looks again for a store file it attaches that is missing, and how long
/// apart: an eviction that finds it pinned puts it back within microseconds.
const STORE_FILE_RETRIES: u32 = 10;
const STORE_FILE_RETRY_WAIT: Duration = Duration::from_millis(10);

/// What an operator's settlement of an in-doubt VM (`resume` it here, or release it)
/// rests on, given the answer to the settle question asked first (`None`: no session
/// to ask about); or why the answer refuses it.
fn manual_settlement(
    resume: bool,
    asked: Option<Result<(&'static str, Settlement), String>>,
) -> Result<String, String> {
    match asked {
        None => Ok("the destination could not be asked: no session recorded".into()),
        Some(Err(e)) => Ok(format!(
            "the destination did not answer ({e}): on the operator's word"
        )),
        Some(Ok((who, Settlement::Undecided))) => Err(format!(
            "{who} is resuming the VM right now: settle it again in a moment"
        )),
        Some(Ok((who, Settlement::Running))) if resume => Err(format!(
            "{who} runs the VM: resumed here it would run twice; release it instead"
        )),
        Some(Ok((who, Settlement::NotRunning))) if !resume => Err(format!(
            "{who} does not run the VM, and now never will: released here it would be lost; resume it instead"
        )),
        Some(Ok((who, Settlement::Running))) => Ok(format!("{who} runs the VM")),
        Some(Ok((who, Settlement::NotRunning))) => {
            Ok(format!("{who} does not run the VM, and now never will"))
        }
    }
}

/// Why a settle question through the center got no answer.
#[derive(Debug, thiserror::Error)]
enum CenterAskError {
    /// The center's address cannot be called.
    #[error("the center's address")]
    Address(#[from] ferry_client::ConfigError),
    /// The center did not answer, or refused.
    #[error(transparent)]
    Asked(#[from] ferry_client::ClientError),
}

/// Who answered a settle question, and the answer; or why there is none yet. `direct` is
/// the destination's own answer; `through_center` asks the center (`None` without one),
/// which relays the question to the destination's API.
///
/// A refused connection proves only that the destination's daemon is gone (its VMs ended
/// with its process) if nothing forged it: a firewall REJECT or a forged RST during a
/// partition looks the same, and resuming here then runs the VM twice. So with a center,
/// the destination's API must refuse the center too; and the center answers `Running`
/// itself for a VM another host reports running (the destination moved it on before its
/// daemon went). Without a center, a VM moved on from a destination that is down runs
/// twice: a cluster that moves VMs on from a VM's destination reports to a center.
fn settlement(
    direct: Result<Settlement, MigrationError>,
    through_center: impl FnOnce() -> Option<Result<Settlement, CenterAskError>>,
) -> Result<(&'static str, Settlement), String> {
    let direct = match direct {
        Ok(answer) => return Ok(("the destination", answer)),
        Err(e) => e,
    };
    let refused = matches!(&direct, MigrationError::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::ConnectionRefused);
    match through_center() {
        None if refused => Ok((
            "the destination's host (no daemon listens)",
            Settlement::NotRunning,
        )),
        None => Err(error_chain(&direct)),
        Some(Ok(answer)) => Ok((
            "the center (asking the destination, or from where the cluster reports the VM)",
            answer,
        )),
        Some(Err(relayed)) => {
            let code = match &relayed {
                CenterAskError::Asked(e) => e.code(),
                CenterAskError::Address(_) => None,
            };
            if refused && code == Some("host_refused") {
                Ok((
                    "the destination's host, to this host and to the center (no daemon listens)",
                    Settlement::NotRunning,
                ))
            } else {
                Err(format!(
                    "{}; through the center: {}",
                    error_chain(&direct),
                    error_chain(&relayed)
                ))
            }
        }
    }
}

/// What a failed outgoing migration's status says of `e`: that the VM ended meanwhile
/// (`ended_as`, its final state), or that the host's shutdown (`closing`) cancelled it,
/// since its VMs stop with it (not "the VM keeps running on the source").
fn migration_failure(e: &MigrationError, ended_as: Option<&VmState>, closing: bool) -> String {
    match (e, ended_as) {
        (_, Some(state)) => format!(
            "the VM ended during its migration ({state}): {}",
            error_chain(e)
        ),
        (MigrationError::Cancelled { phase }, None) if closing => format!(
            "cancelled during {phase}: the source's host is shutting down, and the VM stops with it"
        ),
        (_, None) => error_chain(e),
    }
}

/// Joins `thread` (`what`) if it ends before `deadline`; else leaves it, saying so.
fn join_before(thread: std::thread::JoinHandle<()>, deadline: std::time::Instant, what: &str) {
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if thread.is_finished() {
        let _ = thread.join();
    } else {
        tracing::warn!("{what} had not ended at shutdown");
    }
}

/// Default nice value of a host's VM threads: under contention the daemon's own work
/// (API, heartbeats, migrations) gets about ten times their share of a core, so busy
/// guests cannot starve it; VMs keep equal shares among themselves.
pub const DEFAULT_GUEST_NICE: i32 = 10;

/// The engine's options for `req`, validated.
pub fn migration_options(req: &MigrateRequest) -> Result<MigrationOptions, HostError> {
    let mode = match req.mode.as_str() {
        "live" => Mode::Live,
        "stop-and-copy" => Mode::StopAndCopy,
        other => {
            return Err(HostError::BadRequest(format!(
                "mode '{other}' is not live or stop-and-copy"
            )))
        }
    };
    if !(1..=ferry_migrate::send::MAX_STREAMS).contains(&req.streams) {
        return Err(HostError::BadRequest(format!(
            "streams must be 1 to {}",
            ferry_migrate::send::MAX_STREAMS
        )));
    }
    let files = match req.files.as_str() {
        "reuse" => FileTransfer::Reuse,
        "send" => FileTransfer::Send,
        "require" => FileTransfer::Require,
        other => {
            return Err(HostError::BadRequest(format!(
                "files '{other}' is not reuse, send or require"
            )))
        }
    };
    if !ferry_api::valid_peer_addr(&req.to) {
        return Err(HostError::BadRequest(format!(
            "to '{}' is not a migration address HOST:PORT",
            req.to.escape_debug().take(300).collect::<String>()
        )));
    }
    if req.downtime_ms == 0 || req.max_rounds == 0 {
        return Err(HostError::BadRequest(
            "downtime_ms and max_rounds must be at least 1".into(),
        ));
    }
    if req.downtime_ms > ferry_api::MAX_DOWNTIME_MS {
        return Err(HostError::BadRequest(format!(
            "downtime_ms {} is more than {} (ten minutes)",
            req.downtime_ms,
            ferry_api::MAX_DOWNTIME_MS
        )));
    }
    if req.max_rounds > ferry_api::MAX_ROUNDS {
        return Err(HostError::BadRequest(format!(
            "max_rounds {} is more than {}",
            req.max_rounds,
            ferry_api::MAX_ROUNDS
        )));
    }
    if req.max_precopy_s > ferry_api::MAX_PRECOPY_S {
        return Err(HostError::BadRequest(format!(
            "max_precopy_s {} is more than {} (a day)",
            req.max_precopy_s,
            ferry_api::MAX_PRECOPY_S
        )));
    }
    let max_rate = match req.max_rate_mib_s {
        None => None,
        Some(mib) if (1..=ferry_api::MAX_RATE_MIB_S).contains(&mib) => Some(mib << 20),
        Some(mib) => {
            return Err(HostError::BadRequest(format!(
                "max_rate_mib_s {mib} is not 1 to {}",
                ferry_api::MAX_RATE_MIB_S
            )))
        }
    };
    Ok(MigrationOptions {
        mode,
        downtime_target: Duration::from_millis(req.downtime_ms),
        streams: req.streams,
        compress: req.compress,
        max_rounds: req.max_rounds,
        max_precopy: Duration::from_secs(req.max_precopy_s),
        throttle: req.throttle,
        allow_longer_pause: req.allow_longer_pause,
        files,
        device: req.device,
        max_rate,
        ..MigrationOptions::default()
    })
}

/// The VMs of this host.
pub struct Host {
    config: HostConfig,
    /// Host memory behind the VMs' accelerator buffers: freed buffers' memory stays
    /// backed, up to the accelerator capacity, like a GPU's memory.
    device_memory: DeviceMemory,
    /// What VMs (created, running, or arriving) hold of the capacity.
    ledger: Ledger,
    /// How each migration received here ended, to settle in-doubt switchovers; closed
    /// once the host shuts down.
    outcomes: Outcomes,
    /// The cluster center this host reports to, if any: it relays settle questions to a
    /// destination this host cannot reach.
    center: Mutex<Option<String>>,
    vms: Mutex<Vms>,
    /// The ids of VMs created (or arrived with an id in use); taken under the `vms` lock.
    ids: ids::VmIds,
    /// This daemon's random token, sent with the VMs it migrates: a VM sent to the host it
    /// runs on (its own address given as the destination) is known by it and refused.
    instance: String,
    /// The newest center leader's term this host has heard of, and the etcd clusters the
    /// center's store has left: orders of older terms, and of those clusters, are
    /// refused. Not kept across restarts; the next heartbeat brings it back.
    leader_term: Mutex<LeaderTerms>,
    /// Its threads that run until [`Host::shutdown`].
    background: Mutex<Background>,
    /// Tests: run at the start of the next [`Host::list_vm`], before its VM is listed
    /// (to force an eviction, or a panic, there).
    #[cfg(test)]
    before_listing: Mutex<Option<BeforeListing>>,
}

/// Tests: see [`Host::before_listing`].
#[cfg(test)]
type BeforeListing = Box<dyn FnOnce() + Send>;

/// The VMs of a host, and the ids of those being started.
#[derive(Default)]
struct Vms {
    /// Every VM listed, by id: live ones and, for a while, the records of ended ones.
    listed: BTreeMap<String, Arc<HostedVm>>,
    /// Ids of VMs being started, not yet listed: given to no other VM.
    claimed: BTreeSet<String>,
    /// Idempotency keys of the creates under way ([`KeyClaim`]).
    creating_keys: BTreeSet<String>,
}

impl Vms {
    /// Whether `id` may be given to a VM: no live VM has it and none being started (an
    /// ended one's record it replaces).
    fn free(&self, id: &str) -> bool {
        !self.claimed.contains(id) && !self.listed.get(id).is_some_and(|vm| vm.state().is_live())
    }
}

/// An id claimed for a VM being started, until [`Host::register`] lists the VM under it
/// (or the claim is dropped): no other VM gets it meanwhile, so no VM can replace another
/// in the list while both run.
struct IdClaim<'a> {
    vms: &'a Mutex<Vms>,
    /// Empty once registered.
    id: String,
}

impl IdClaim<'_> {
    /// The id claimed.
    fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for IdClaim<'_> {
    fn drop(&mut self) {
        if !self.id.is_empty() {
            let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
            vms.claimed.remove(&self.id);
        }
    }
}

/// A create's idempotency key, claimed until the create has ended (its VM listed, or
/// not made): a second create with the key meanwhile is refused, not run alongside.
struct KeyClaim<'a> {
    vms: &'a Mutex<Vms>,
    key: String,
}

impl Drop for KeyClaim<'_> {
    fn drop(&mut self) {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.creating_keys.remove(&self.key);
    }
}

/// What a create's idempotency key finds.
enum KeyedCreate<'a> {
    /// No VM here was created with it: the create goes on, holding the key.
    New(KeyClaim<'a>),
    /// This VM was.
    Made(Arc<HostedVm>),
}

/// A VM started here (created, or arrived and resumed), until [`Host::register`] lists
/// it. Dropped unlisted (a failure or a panic on the way), it is stopped: a VM never runs
/// here unlisted, where nobody could manage, stop or migrate it.
struct Unlisted(Option<Arc<HostedVm>>);

impl Unlisted {
    /// The VM.
    fn vm(&self) -> &Arc<HostedVm> {
        self.0.as_ref().expect("held until listed")
    }

    /// The VM, listed now: no longer stopped when this drops.
    fn listed(mut self) -> Arc<HostedVm> {
        self.0.take().expect("held until listed")
    }
}

impl Drop for Unlisted {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            // Its watcher thread holds it too: without this it would run on, unreachable.
            match vm.stop() {
                Ok(()) => tracing::error!(vm = %vm.id, "a VM that could not be listed was stopped"),
                Err(e) => {
                    tracing::error!(vm = %vm.id, "a VM that could not be listed could not be stopped either: {e}")
                }
            }
        }
    }
}

/// The center leader terms a host has heard of.
#[derive(Default)]
struct LeaderTerms {
    /// The newest.
    newest: Option<LeaderTerm>,
    /// The etcd clusters the center's store has left, oldest first (at most
    /// [`MAX_RETIRED_CLUSTERS`]).
    retired: Vec<u64>,
}

/// Most retired etcd clusters a host remembers: a store moves a handful of times in a
/// host's life, at most.
const MAX_RETIRED_CLUSTERS: usize = 16;

/// A host's long-running threads, each stopped by dropping its handle.
#[derive(Default)]
struct Background {
    /// The migration listener.
    migrations: Option<ferry_migrate::Receiving>,
    /// The heartbeat threads, one per center replica: dropping a sender stops its thread.
    heartbeats: Vec<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    /// The threads of migrations out of this host (and of settling those left in
    /// doubt), the finished ones let go as new ones start.
    outgoing: Vec<std::thread::JoinHandle<()>>,
}

impl Host {
    /// A host with no VMs, which knows the migrations received by its earlier runs on
    /// the same file store (their sources may ask whether their VM ran here).
    pub fn new(config: HostConfig) -> Result<Arc<Self>, HostStartError> {
        std::fs::create_dir_all(&config.file_store)
            .map_err(|e| HostStartError::FileStore(config.file_store.clone(), e))?;
        let outcomes = Outcomes::recorded(&config.file_store.join(RESUMED_MIGRATIONS))?;
        let ids = ids::VmIds::open(&config.file_store)?;
        // Heartbeats list the GPU once it is open; they never wait for its driver.
        ferry_accel::backend::probe_gpu();
        Ok(Arc::new(Self {
            device_memory: DeviceMemory::new(config.accel_capacity),
            ledger: Ledger::new(Amount {
                memory: config.memory_capacity,
                accel: config.accel_capacity,
            }),
            config,
            outcomes,
            center: Mutex::default(),
            vms: Mutex::default(),
            ids,
            instance: {
                let mut token = [0u8; 16];
                getrandom::fill(&mut token).expect("the OS random source");
                ferry_vmm::files::hex(&token)
            },
            leader_term: Mutex::default(),
            background: Mutex::default(),
            #[cfg(test)]
            before_listing: Mutex::default(),
        }))
    }

    /// Takes an order of center leader term `term`: refused if a newer leader of the same
    /// etcd cluster has been heard from (that leader was deposed), else remembered as the
    /// newest. A term of another etcd cluster replaces the one known: the center's store
    /// moved to a new etcd cluster, whose revisions count from 1 again. The cluster left
    /// is retired: a leader still on it (two centers, each on its own cluster) is refused
    /// for good, not followed in turn with the new one.
    pub fn follow_leader_term(&self, term: LeaderTerm) -> Result<(), HostError> {
        let mut terms = self.leader_term.lock().unwrap_or_else(|e| e.into_inner());
        if terms.retired.contains(&term.cluster) {
            return Err(HostError::StaleLeader(format!(
                "refused: this order comes from the center leader of term {term}, on an etcd cluster the center's store has left (its leaders since are on another); the sender no longer leads"
            )));
        }
        match terms.newest {
            Some(known) if known.cluster == term.cluster && term.revision < known.revision => {
                Err(HostError::StaleLeader(format!(
                    "refused: this order comes from the center leader of term {term}, but the leader of term {known} has since spoken to this host; the sender no longer leads"
                )))
            }
            Some(known) if known.cluster == term.cluster && term.revision == known.revision => {
                Ok(())
            }
            known => {
                if let Some(left) = known.filter(|known| known.cluster != term.cluster) {
                    tracing::warn!("center leader of term {term} now: another etcd cluster than before; leaders of the earlier one ({left}) are refused from now on");
                    if terms.retired.len() == MAX_RETIRED_CLUSTERS {
                        terms.retired.remove(0);
                    }
                    terms.retired.push(left.cluster);
                }
                terms.newest = Some(term);
                Ok(())
            }
        }
    }

    /// Stops this host: its heartbeats, the migrations out of it (cancelled) and its VMs,
    /// then its migration listener (the port closes), and waits for their threads, so
    /// that an in-process host leaves nothing running, but for a VM in doubt (or still
    /// migrating after 10 s): that one stays paused, with its threads and memory, until
    /// the process ends, since it may run on the other host. Migrations arriving are refused,
    /// and those not yet told to run their VM are fenced; the port answers settle
    /// questions until the VMs have stopped, so a source in doubt never resumes a VM that
    /// still runs here.
    pub fn shutdown(&self) {
        self.outcomes.close();
        let background = std::mem::take(&mut *self.background.lock().expect("background lock"));
        // All told at once, then waited for together: each may be in a post to a center
        // that does not answer (for up to a minute), which must not delay the others,
        // nor the VMs' stop, one after another.
        let beating: Vec<_> = (background.heartbeats.into_iter())
            .map(|(stop, thread)| {
                drop(stop);
                thread
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for thread in beating {
            join_before(thread, deadline, "a heartbeat thread");
        }
        // A VM being resumed here is adopted, and stopped below or by `register`.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.outcomes.resuming() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let vms: Vec<Arc<HostedVm>> = self.vms().listed.values().cloned().collect();
        for vm in &vms {
            let _ = vm.cancel_migration();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Cancelled, and settling no in-doubt VM once the host closed, they end soon;
        // joined before the VMs are stopped, none resumes an in-doubt VM after.
        for thread in background.outgoing {
            join_before(thread, deadline, "a migration thread");
        }
        for vm in &vms {
            while matches!(
                vm.state(),
                VmState::Migrating { .. } | VmState::Switchover { .. }
            ) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if vm.state().is_running() {
                if let Err(e) = vm.stop() {
                    tracing::warn!(vm = %vm.id, "not stopped at shutdown: {e}");
                }
            }
            if vm.state().has_ended() {
                vm.join_watcher();
            }
        }
        // Dropped outside the lock, like every record let go of.
        let records = std::mem::take(&mut self.vms().listed);
        drop(records);
        drop(background.migrations);
    }

    /// The ELF of `workload`: a built-in guest's, or a client's file, read only where
    /// this host attaches files from (a path elsewhere, or a name not built in, is refused
    /// before the file system is asked: its answers would tell what files exist there).
    fn guest_image(&self, workload: &str) -> Result<std::borrow::Cow<'static, [u8]>, HostError> {
        let confined = matches!(self.config.attach, AttachPolicy::Under(_));
        if !confined || ferry_guest_images::find(workload).is_some() {
            return ferry_guest_images::resolve(workload)
                .map_err(|e| HostError::BadRequest(error_chain(&e)));
        }
        if !workload.contains('/') {
            return Err(HostError::BadRequest(
                ferry_guest_images::not_found(workload).to_string(),
            ));
        }
        let path = (self.config.attach)
            .admit(std::path::Path::new(workload))
            .map_err(|e| HostError::BadRequest(format!("guest image {workload}: {e}")))?;
        self.read_confined_image(workload, &path)
    }

    /// The guest ELF at `path` (which [`AttachPolicy::admit`] let through as `workload`),
    /// if the file opened there is still under the attach directories. One that cannot be
    /// opened, or that a link swapped in since led outside, gets the refusal of a path
    /// outside: whether it opened would tell whether a file exists there.
    fn read_confined_image(
        &self,
        workload: &str,
        path: &Path,
    ) -> Result<std::borrow::Cow<'static, [u8]>, HostError> {
        let policy = &self.config.attach;
        let inside = std::cell::Cell::new(false);
        let image = ferry_guest_images::read_checked(path, |file| {
            policy.check_open(file)?;
            inside.set(true);
            Ok(())
        });
        image.map(std::borrow::Cow::Owned).map_err(|e| {
            HostError::BadRequest(if inside.get() {
                format!("cannot read guest image {workload}: {e}")
            } else {
                format!(
                    "guest image {workload}: {}",
                    policy.refusal(Path::new(workload))
                )
            })
        })
    }

    /// Claims idempotency key `key` for a create, or finds the VM created with it.
    fn claim_key(&self, key: &str) -> Result<KeyedCreate<'_>, HostError> {
        let mut vms = self.vms();
        if vms.creating_keys.contains(key) {
            return Err(HostError::Unavailable(format!(
                "a create with idempotency key {key} is under way here; send it again shortly"
            )));
        }
        let made = (vms.listed.values()).find(|vm| vm.idempotency_key.as_deref() == Some(key));
        if let Some(vm) = made {
            return Ok(KeyedCreate::Made(vm.clone()));
        }
        vms.creating_keys.insert(key.to_string());
        Ok(KeyedCreate::New(KeyClaim {
            vms: &self.vms,
            key: key.to_string(),
        }))
    }

    /// Claims an id for a VM about to start: `wanted` (the id a migrated VM had) if it
    /// is free, else a fresh one; checked and claimed in one critical section.
    fn claim_id(&self, wanted: Option<&str>) -> IdClaim<'_> {
        let mut vms = self.vms();
        let id = match wanted {
            Some(id) if vms.free(id) => id.to_string(),
            // Not even an ended VM's: a fresh id names no record.
            _ => self.ids.fresh(&self.config.name, |id| {
                vms.listed.contains_key(id) || vms.claimed.contains(id)
            }),
        };
        vms.claimed.insert(id.clone());
        IdClaim { vms: &self.vms, id }
    }

    /// Lists the VM `unlisted` (created or arrived) under the id it was started with,
    /// `claim` ([`Self::list_vm`] then [`Self::after_listing`]), and returns it.
    fn register(&self, claim: IdClaim<'_>, unlisted: Unlisted) -> Arc<HostedVm> {
        let hosted = self.list_vm(claim, unlisted);
        self.after_listing(&hosted);
        hosted
    }

    /// Lists the VM `unlisted` under the id it was started with, `claim`, and returns it;
    /// a panic before it is listed stops it.
    fn list_vm(&self, mut claim: IdClaim<'_>, unlisted: Unlisted) -> Arc<HostedVm> {
        #[cfg(test)]
        if let Some(hook) = self.before_listing.lock().expect("hook lock").take() {
            hook();
        }
        debug_assert_eq!(claim.id(), unlisted.vm().id);
        let (hosted, replaced) = {
            let mut vms = self.vms();
            let id = std::mem::take(&mut claim.id);
            vms.claimed.remove(&id);
            let replaced = vms.listed.insert(id, unlisted.vm().clone());
            (unlisted.listed(), replaced)
        };
        // The claim kept live VMs off this id: an entry replaced is the record of the
        // VM's earlier stay here, dropped outside the lock.
        debug_assert!(replaced.as_ref().is_none_or(|vm| vm.state().has_ended()));
        drop(replaced);
        hosted
    }

    /// What follows listing `hosted`. One that comes while the host shuts down is stopped
    /// at once: [`Host::shutdown`] may have taken its list of VMs to stop already (it
    /// closes `outcomes` before taking it, and this looks after adding).
    fn after_listing(&self, hosted: &HostedVm) {
        if self.outcomes.is_closed() && hosted.state().is_running() {
            if let Err(e) = hosted.stop() {
                tracing::warn!(vm = %hosted.id, "not stopped at shutdown: {e}");
            }
        }
        self.forget_old_ended_vms();
    }

    /// Keeps a heartbeat thread `thread` (stopped by dropping `stop`) until shutdown.
    pub(crate) fn keep_heartbeat(
        &self,
        stop: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    ) {
        self.background
            .lock()
            .expect("background lock")
            .heartbeats
            .push((stop, thread));
    }

    /// The configuration.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Backs `bytes` of accelerator memory now, so the first VMs created or migrated
    /// here write into memory the kernel has already backed (a first touch costs a page
    /// fault and a zeroing each, slower than a fast link).
    pub fn prefault_accel_memory(&self, bytes: u64) -> Result<(), HostError> {
        if bytes > self.config.accel_capacity {
            return Err(HostError::BadRequest(format!(
                "cannot prefault {} MiB: the accelerator capacity is {} MiB",
                bytes >> 20,
                self.config.accel_capacity >> 20
            )));
        }
        self.device_memory.prefault(bytes).map_err(|e| {
            HostError::Failed(format!(
                "cannot back {} MiB of accelerator memory: {e}",
                bytes >> 20
            ))
        })
    }

    /// Gives the accelerator memory kept for reuse back to the operating system; returns
    /// the bytes given back.
    pub fn release_kept_accel_memory(&self) -> u64 {
        self.device_memory.release_kept()
    }

    /// What a VM here gets from the host: its accelerator threads and device memory.
    fn vm_host_options(&self) -> HostOptions {
        HostOptions {
            accel_threads: self.config.accel_threads,
            device_memory: self.device_memory.clone(),
            guest_nice: self.config.guest_nice,
            backend: self.config.backend,
            ..HostOptions::quiet()
        }
    }

    /// The VM map. A thread that panicked holding it (a bug) leaves it as whole as any
    /// other: only map and set steps run under it. Taken up again, the host goes on
    /// serving its VMs instead of failing every request that names one.
    fn vms(&self) -> std::sync::MutexGuard<'_, Vms> {
        self.vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live_vms(&self) -> Vec<Arc<HostedVm>> {
        self.vms()
            .listed
            .values()
            .filter(|vm| vm.state().is_live())
            .cloned()
            .collect()
    }

    /// Bytes of VM memory reserved (by VMs here, being created, or arriving).
    pub fn memory_used(&self) -> u64 {
        self.ledger.held().memory
    }

    /// Capacity and load now; `migration_addr` is where this host receives migrations.
    pub fn info(&self, migration_addr: &str) -> HostInfo {
        let live = self.live_vms();
        let held = self.ledger.held();
        HostInfo {
            name: self.config.name.clone(),
            migration_addr: migration_addr.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: self.config.backend.into(),
            backends: ferry_accel::backend::available_now()
                .into_iter()
                .map(String::from)
                .collect(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            accel_threads: self.config.accel_threads,
            load_avg: heartbeat::load_average().unwrap_or(0.0),
            memory_capacity: self.config.memory_capacity,
            memory_used: held.memory,
            accel_capacity: self.config.accel_capacity,
            accel_used: held.accel,
            // A fold, not sum(): an empty f64 sum is -0.0.
            accel_load: live
                .iter()
                .map(|vm| vm.accel_load())
                .fold(0.0, |a, b| a + b),
            vms_running: live.iter().filter(|vm| vm.state().is_running()).count(),
            vms_in_doubt: live
                .iter()
                .filter(|vm| matches!(vm.state(), VmState::InDoubt { .. }))
                .count(),
        }
    }

    /// Reserves room for a VM of `config`, or says why there is none.
    fn reserve(&self, config: &VmConfig) -> Result<Reservation, HostError> {
        self.ledger
            .reserve(Amount::for_vm(config.ram_size, config.accel_memory))
            .map_err(|e| HostError::NoRoom(format!("host {}: {e}", self.config.name)))
    }

    /// Opens the files of a create request, if [`HostConfig::attach`] lets it name them
    /// (absolute paths, so a migration's destination can look for the same path); with
    /// the pin, taken before they are opened, that keeps those in the file store from
    /// eviction until the VM is listed (then its state pins them).
    fn attach(&self, attach: &[Attachment]) -> Result<(AttachedFiles, ReceivingPin), HostError> {
        // Before any path is looked at: thousands of entries cost nothing to refuse.
        let names: Vec<&str> = attach.iter().map(|a| a.name.as_str()).collect();
        ferry_vmm::files::check_names(&names).map_err(|e| {
            HostError::BadRequest(format!("cannot attach the files: {}", error_chain(&e)))
        })?;
        let specs = attach
            .iter()
            .map(|a| {
                self.config
                    .attach
                    .admit(&a.path)
                    .map(|path| (a.name.clone(), path))
                    .map_err(|why| {
                        HostError::BadRequest(format!("cannot attach '{}': {why}", a.name))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let paths: Vec<&Path> = specs.iter().map(|(_, path)| path.as_path()).collect();
        let pin = FileStore::new(self.config.file_store.clone(), self.config.attach.clone())
            .pin_attached(&paths);
        let policy = &self.config.attach;
        let files = open_attached(&specs, &pin, &|file| policy.check_open(file))
            .map_err(|e| policy.open_refusal(e, attach))?;
        Ok((files, pin))
    }

    /// Creates and starts a VM.
    pub fn create_vm(&self, req: &CreateVm) -> Result<VmInfo, HostError> {
        if let Some(name) = req.name.as_deref().filter(|n| !ferry_api::valid_vm_name(n)) {
            return Err(HostError::BadRequest(format!(
                "'{name}' is not a VM name: {}",
                ferry_api::NAME_RULE
            )));
        }
        let max = ferry_migrate::receive::MAX_WORKLOAD_NAME;
        if !ferry_migrate::receive::printable(&req.workload, max) {
            return Err(HostError::BadRequest(format!(
                "a workload is named by at most {max} bytes and no control characters (a VM's offer carries it when it migrates)"
            )));
        }
        let image = self.guest_image(&req.workload)?;
        // Held to the end: the VM is listed with its key before another create can look.
        let _key = match req.idempotency_key.as_deref() {
            None => None,
            Some(key) => {
                ferry_api::check_idempotency_key(key).map_err(HostError::BadRequest)?;
                match self.claim_key(key)? {
                    KeyedCreate::New(claim) => Some(claim),
                    KeyedCreate::Made(vm) => {
                        let info = vm.info();
                        if !info.answers_create(req) {
                            return Err(HostError::Conflict(format!(
                                "idempotency key {key} created VM {}, which is not the VM this create asks for",
                                info.id
                            )));
                        }
                        return Ok(info);
                    }
                }
            }
        };
        let config = VmConfig::new(req.memory).with_accel(req.accel_memory);
        // Before any room is reserved: an impossible shape is a bad request, not a
        // lack of room.
        config.validate().map_err(|e| {
            HostError::BadRequest(format!("cannot create the VM: {}", error_chain(&e)))
        })?;
        let backend = match req.backend.as_deref() {
            None => self.config.backend,
            Some(name) => ferry_accel::backend::by_name(name)
                .map_err(|e| HostError::BadRequest(error_chain(&e)))?,
        };
        let (files, pinned) = self.attach(&req.attach)?;
        let reservation = self.reserve(&config)?;
        let host = HostOptions {
            files,
            backend,
            ..self.vm_host_options()
        };
        let vm = Microvm::boot(config, &image, &req.args, host).map_err(|e| {
            use ferry_vmm::memory::MemoryError;
            use ferry_vmm::vm::CreateVmError;
            let msg = format!("cannot create the VM: {}", error_chain(&e));
            match e {
                // The shape was validated above: what is left is this host's lack of
                // memory, or its fault, not the request's.
                CreateVmError::Memory(MemoryError::Map { .. }) => HostError::NoRoom(msg),
                CreateVmError::Memory(MemoryError::InvalidSize { .. })
                | CreateVmError::AccelMemory(_)
                | CreateVmError::Image(_)
                | CreateVmError::ArgsTooLong => HostError::BadRequest(msg),
                _ => HostError::Failed(msg),
            }
        })?;
        // Outside the list's lock: it may write the record of ids.
        self.ids.reserve_ahead();
        let claim = self.claim_id(None);
        let started = HostedVm::launch(
            claim.id().to_string(),
            (req.workload.clone(), req.name.clone()),
            req.args.clone(),
            vm,
            Origin::Created {
                idempotency_key: req.idempotency_key.clone(),
            },
            reservation,
        )
        .map_err(HostError::Failed)?;
        let started = Unlisted(Some(started));
        tracing::info!(id = %claim.id(), workload = %req.workload, "VM started");
        let hosted = self.register(claim, started);
        // Listed, the VM's state pins its files now.
        drop(pinned);
        Ok(hosted.info())
    }

    /// Every VM this host knows (including ended and migrated ones, for a while).
    pub fn list(&self) -> Vec<VmInfo> {
        self.each_vm(HostedVm::info).0
    }

    /// What a heartbeat carries: [`Host::list`] without the console tails, and the
    /// idempotency keys of the creates under way. Both are taken in one look at the VM
    /// map, so a create's key is in one or the other (its VM is listed before its key is
    /// let go of).
    pub fn beat_report(&self) -> (Vec<VmInfo>, Vec<String>) {
        self.each_vm(HostedVm::summary)
    }

    /// `show` of every VM listed, read outside the VM map's lock, and the keys of the
    /// creates under way then.
    fn each_vm(&self, show: impl Fn(&HostedVm) -> VmInfo) -> (Vec<VmInfo>, Vec<String>) {
        self.forget_old_ended_vms();
        let (vms, creating): (Vec<_>, Vec<_>) = {
            let vms = self.vms();
            let creating = vms.creating_keys.iter().cloned().collect();
            (vms.listed.values().cloned().collect(), creating)
        };
        (vms.iter().map(|vm| show(vm)).collect(), creating)
    }

    /// Drops the records of VMs that ended more than [`ENDED_VMS_KEPT_FOR`] ago, and of
    /// all but the [`ENDED_VMS_KEPT`] that ended last: a long-running host lists a
    /// bounded number of them. Those kept let go of their channels' answers once their
    /// readers have had [`UNREAD_END_GRACE`] to take them (each may hold megabytes).
    fn forget_old_ended_vms(&self) {
        let now = std::time::Instant::now();
        let (forgotten, quiet): (Vec<Arc<HostedVm>>, Vec<Arc<HostedVm>>) = {
            let vms = &mut self.vms().listed;
            let mut ended: Vec<(std::time::Instant, String)> = vms
                .iter()
                .filter_map(|(id, vm)| vm.ended_at().map(|at| (at, id.clone())))
                .collect();
            ended.sort_unstable();
            let excess = ended.len().saturating_sub(ENDED_VMS_KEPT);
            let (old, kept): (Vec<_>, Vec<_>) =
                ended.iter().enumerate().partition(|(i, (at, _))| {
                    *i < excess || now.duration_since(*at) > ENDED_VMS_KEPT_FOR
                });
            let quiet = (kept.iter())
                .filter(|(_, (at, _))| now.duration_since(*at) >= UNREAD_END_GRACE)
                .filter_map(|(_, (_, id))| vms.get(id).cloned())
                .collect();
            let forgotten = (old.iter())
                .filter_map(|(_, (_, id))| vms.remove(id))
                .collect();
            (forgotten, quiet)
        };
        // Outside the lock (a record may hold the last console buffer).
        drop(forgotten);
        for vm in quiet {
            vm.channel().forget_after_end();
        }
    }

    /// One VM.
    pub fn get(&self, id: &str) -> Result<Arc<HostedVm>, HostError> {
        self.vms()
            .listed
            .get(id)
            .cloned()
            .ok_or_else(|| HostError::NotFound(id.to_string()))
    }

    /// Stops a VM (if running) and forgets it; an ended VM's record is forgotten. A VM
    /// being migrated or in doubt is not stopped (cancel or resolve it first), nor one
    /// that runs elsewhere now (the answer says where).
    pub fn stop(&self, id: &str) -> Result<VmInfo, HostError> {
        let vm = self.get(id)?;
        match vm.state() {
            VmState::MigratedAway { to } => {
                return Err(HostError::Conflict(format!(
                    "VM {id} migrated to the host migrating at {to}; \
                     stop it through that host's API"
                )))
            }
            state if state.has_ended() => {}
            _ => {
                if let Err(e) = vm.stop() {
                    // Ended on its own between the look and the stop (its guest exited as
                    // the stop came): forgotten as an ended VM is, not refused.
                    let state = vm.state();
                    if !state.has_ended() || matches!(state, VmState::MigratedAway { .. }) {
                        return Err(HostError::Conflict(format!("VM {id}: {e}")));
                    }
                }
            }
        }
        self.unlist(&vm);
        tracing::info!(%id, "VM stopped");
        Ok(vm.info())
    }

    /// Forgets the record of `vm`, and only it: a VM listed under its id since (one that
    /// came back with it once it ended) stays.
    fn unlist(&self, vm: &Arc<HostedVm>) {
        let mut vms = self.vms();
        if vms
            .listed
            .get(&vm.id)
            .is_some_and(|listed| Arc::ptr_eq(listed, vm))
        {
            // `vm` is still held: the record is dropped by the caller, outside the lock.
            vms.listed.remove(&vm.id);
        }
    }

    /// Starts migrating a VM to `req.to` in the background; follow it with
    /// [`Self::migration`]. A VM already being migrated (or not running) is refused.
    pub fn start_migration(
        self: &Arc<Self>,
        id: &str,
        req: MigrateRequest,
    ) -> Result<MigrationStatus, HostError> {
        let mut options = migration_options(&req)?;
        options.tls = self.config.tls.clone();
        // Its thread would start after the shutdown took the list of those to join.
        if self.outcomes.is_closed() {
            return Err(shutting_down());
        }
        let vm = self.get(id)?;
        let status = MigrationStatus {
            vm: id.to_string(),
            to: req.to.clone(),
            state: MigrationState::Running,
            progress: None,
            report: None,
            error: None,
            settlement: Vec::new(),
        };
        let ticket = vm
            .begin_migration(&req.to, status.clone(), options.cancel.clone())
            .map_err(|e| HostError::Conflict(format!("VM {id}: {e}")))?;
        let host = self.clone();
        let migrating = vm.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{id}"))
            .spawn(move || {
                // A panic would leave the VM in its migration for good (stop and
                // migrate refused, the throttle on): it is settled as the state allows.
                let run = || host.migrate(&migrating, ticket, &req.to, &options);
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    migrating.migration_panicked(ticket, panic_message(&*panic));
                }
            });
        match spawned {
            Ok(thread) => {
                let mut background = self.background.lock().expect("background lock");
                // Closed before the shutdown takes the threads to join: seen open here,
                // under the lock, this one is among them; seen closed, it may not be.
                if self.outcomes.is_closed() {
                    drop(background);
                    let _ = vm.cancel_migration();
                    let _ = thread.join();
                    return Err(shutting_down());
                }
                background.outgoing.retain(|t| !t.is_finished());
                background.outgoing.push(thread);
            }
            Err(e) => {
                let error = format!("cannot start the migration thread: {e}");
                vm.update_migration(ticket, |s| {
                    s.state = MigrationState::Failed;
                    s.error = Some(error.clone());
                });
                let _ = vm.abandon_migration();
                return Err(HostError::Failed(error));
            }
        }
        Ok(status)
    }

    /// Migrates `vm` now (blocking) as its migration `ticket`; the outcome lands in its
    /// state and that migration's status.
    fn migrate(
        &self,
        vm: &Arc<HostedVm>,
        ticket: MigrationTicket,
        to: &str,
        options: &MigrationOptions,
    ) {
        let id = vm.id.clone();
        let mut on_progress = |p: &Progress| {
            tracing::debug!(vm = %id, round = p.round, phase = p.phase, "migration progress");
            vm.update_migration(ticket, |s| s.progress = Some(p.clone()));
        };
        let recorded = self.outcomes.sync().map_err(MigrationError::Unrecorded);
        let result =
            match recorded.map(|()| VmSource::new(vm.clone(), &self.config.name, &self.instance)) {
                Err(e) => Err(e),
                Ok(Some(source)) => ferry_migrate::migrate_vm(
                    &source,
                    to,
                    &self.config.secret,
                    options,
                    &mut on_progress,
                ),
                Ok(None) => Err(MigrationError::Source(VmError::Gone(format!(
                    "VM {id} ended before its migration began"
                )))),
            };
        match result {
            // The status is final before the VM's transition: once the VM runs here again
            // (free for another migration), whoever looks sees how this one ended.
            Ok(report) => {
                tracing::info!(vm = %id, %to, downtime_ms = report.downtime_ms, "VM migrated");
                vm.update_migration(ticket, |s| {
                    s.state = MigrationState::Succeeded;
                    s.report = Some(report);
                });
                if let Err(e) = vm.leave() {
                    tracing::error!(vm = %id, "a migrated VM could not be released: {e}");
                }
            }
            Err(e) => {
                // A guest that ended during its migration cancels it: a failure to name,
                // not an operator's cancel.
                let ended = vm.state().has_ended();
                let ended_as = ended.then(|| vm.state());
                let error = migration_failure(&e, ended_as.as_ref(), self.outcomes.is_closed());
                tracing::warn!(vm = %id, %to, "migration failed: {error}");
                vm.update_migration(ticket, |s| {
                    s.state = match e {
                        MigrationError::InDoubt { .. } => MigrationState::InDoubt,
                        MigrationError::Cancelled { .. } if !ended => MigrationState::Cancelled,
                        _ => MigrationState::Failed,
                    };
                    s.error = Some(error);
                });
                let outcome = match &e {
                    MigrationError::InDoubt { reason, session } => {
                        vm.note_in_doubt_session(ticket, *session);
                        vm.lose_confirmation(reason).map_err(|e| e.to_string())
                    }
                    _ => vm.abandon_migration(),
                };
                if let Err(why) = outcome {
                    tracing::error!(vm = %id, "after the failed migration: {why}");
                }
                if let MigrationError::InDoubt { session, .. } = e {
                    self.settle(vm, ticket, to, session, options);
                }
            }
        }
    }

    /// Settles an in-doubt switchover: asks the destination (or, when it cannot be
    /// reached, the center, which asks it in turn) whether it runs the VM, with backoff,
    /// until the answer is final; then releases the VM here or resumes it. Gives up after
    /// [`IN_DOUBT_PATIENCE`], leaving it to `ferry vm resolve`. Only migration `ticket`
    /// is settled: once the VM is no longer in doubt about it, this stops.
    fn settle(
        &self,
        vm: &HostedVm,
        ticket: MigrationTicket,
        to: &str,
        session: u64,
        options: &MigrationOptions,
    ) {
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        let note = |line: String| {
            tracing::info!(vm = %vm.id, "{line}");
            vm.update_migration(ticket, |s| {
                if s.settlement.len() >= MAX_SETTLEMENT_LINES {
                    s.settlement.remove(0);
                }
                s.settlement.push(line);
            });
        };
        loop {
            // Resolved (by the operator), and maybe migrated again since: not ours.
            if !matches!(vm.state(), VmState::InDoubt { .. })
                || vm.migration_ticket() != Some(ticket)
            {
                return;
            }
            // The host is shutting down: the VM is left in doubt, paused, and ends with
            // the host; resumed after the shutdown, it would run unlisted.
            if self.outcomes.is_closed() {
                note("the host is shutting down: left in doubt".to_string());
                return;
            }
            let asked = settlement(
                ferry_migrate::settle(to, &self.config.secret, options, session),
                || self.settle_through_center(to, session, &vm.id),
            );
            let after = format!("{:.1} s", started.elapsed().as_secs_f64());
            let done = match asked {
                Ok((who, Settlement::Running)) => {
                    note(format!("{after}: {who} runs the VM: released here"));
                    vm.release_in_doubt(ticket).map_err(|e| e.to_string())
                }
                // The answer may have taken a while (through the center): a host that
                // began shutting down meanwhile resumes nothing.
                Ok((_, Settlement::NotRunning)) if self.outcomes.is_closed() => {
                    note(format!(
                        "{after}: the destination does not run the VM, but the host is shutting down: left in doubt"
                    ));
                    return;
                }
                Ok((who, Settlement::NotRunning)) => {
                    note(format!(
                        "{after}: {who} does not run the VM, and never will: resumed here"
                    ));
                    vm.resume_here(ticket).map_err(|e| e.to_string())
                }
                Ok((who, Settlement::Undecided)) => {
                    note(format!(
                        "{after}: {who} is resuming the VM right now; asking again"
                    ));
                    Err(String::new())
                }
                Err(e) => {
                    note(format!("{after}: no answer ({e}); asking again"));
                    Err(String::new())
                }
            };
            match done {
                Ok(()) => return,
                Err(e) if !e.is_empty() => {
                    tracing::error!(vm = %vm.id, "settling the in-doubt VM: {e}");
                    return;
                }
                Err(_) => {}
            }
            if started.elapsed() >= IN_DOUBT_PATIENCE {
                note(format!(
                    "gave up asking after {:.0} s: resolve it with `ferry vm resolve {} --resume|--release`",
                    started.elapsed().as_secs_f64(),
                    vm.id
                ));
                return;
            }
            // In steps, so a shutdown is seen within one.
            let asked_again = std::time::Instant::now() + wait;
            while std::time::Instant::now() < asked_again && !self.outcomes.is_closed() {
                std::thread::sleep(Duration::from_millis(50));
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Asks the center (if this host reports to one) to settle `session` (of VM `vm`)
    /// with the destination whose migration address is `to`.
    fn settle_through_center(
        &self,
        to: &str,
        session: u64,
        vm: &str,
    ) -> Option<Result<Settlement, CenterAskError>> {
        let center = self.center.lock().expect("center lock").clone()?;
        let token = self.config.secret.token(ferry_migrate::Purpose::Heartbeat);
        let roots = cluster_roots(self.config.tls.as_ref());
        let client = ferry_client::ApiClient::with_roots(&center, token.as_bytes(), &roots);
        let asked = client.map_err(CenterAskError::from).and_then(|client| {
            Ok(client.post(
                "/v1/settle",
                &SettleRequest {
                    migration_addr: to.to_string(),
                    session,
                    vm: Some(vm.to_string()),
                    from: Some(self.config.name.clone()),
                },
            )?)
        });
        Some(asked)
    }

    /// Reports to the center at `url` (replicas comma-separated) from now on; settle
    /// questions go through it too, to whichever replica answers.
    pub fn set_center(&self, url: &str) {
        *self.center.lock().expect("center lock") = Some(url.to_string());
    }

    /// Answers a settle question about a migration received here (see
    /// [`mod@ferry_migrate::settle`]): asked by a source through the center.
    pub fn settle_incoming(&self, session: u64) -> Settlement {
        self.outcomes.settle(session)
    }

    /// Settles an in-doubt VM by hand: `resume` runs it here (the operator knows the
    /// destination does not run it), otherwise it is released here (it runs there).
    /// The destination (or the center) is asked first, as the host's own settling asks:
    /// the question fences a destination not yet told to run the VM, and an answer that
    /// contradicts the operator refuses the settlement (resumed here, a VM the
    /// destination runs would run twice; released, one it does not run would be lost).
    /// Only when nobody answers is the operator's word taken alone.
    pub fn resolve(&self, id: &str, resume: bool) -> Result<MigrationStatus, HostError> {
        let vm = self.get(id)?;
        // The operator settles the migration the VM is in doubt about: its latest.
        let ticket = match vm.migration_ticket() {
            Some(ticket) if matches!(vm.state(), VmState::InDoubt { .. }) => ticket,
            _ => {
                return Err(HostError::Conflict(format!(
                    "VM {id}: it is {}, not in doubt",
                    vm.state()
                )))
            }
        };
        let asked = vm.in_doubt_question(ticket).map(|(to, session)| {
            let options = MigrationOptions {
                tls: self.config.tls.clone(),
                ..MigrationOptions::default()
            };
            settlement(
                ferry_migrate::settle(&to, &self.config.secret, &options, session),
                || self.settle_through_center(&to, session, id),
            )
        });
        let found = manual_settlement(resume, asked)
            .map_err(|why| HostError::Conflict(format!("VM {id}: {why}")))?;
        let done = if resume {
            vm.resume_here(ticket)
        } else {
            vm.release_in_doubt(ticket)
        };
        done.map_err(|e| match e {
            // Settled, but the VM failed to run: the host's failure, not a request to
            // retry.
            hosted::SettleError::CannotRun(why) => HostError::Failed(format!("VM {id}: {why}")),
            other => HostError::Conflict(format!("VM {id}: {other}")),
        })?;
        let line = if resume {
            format!("resolved by the operator: resumed here ({found})")
        } else {
            format!("resolved by the operator: released here, it runs on the destination ({found})")
        };
        tracing::warn!(%id, "{line}");
        vm.update_migration(ticket, |s| s.settlement.push(line));
        self.migration(id)
    }

    /// Cancels the migration of VM `id`, if it has not yet told its destination to run
    /// the VM; follow it with [`Self::migration`] (it ends as cancelled, or as succeeded
    /// if the cancel came too late).
    pub fn cancel_migration(&self, id: &str) -> Result<MigrationStatus, HostError> {
        self.get(id)?
            .cancel_migration()
            .map_err(|e| HostError::Conflict(format!("VM {id}: {e}")))
    }

    /// The last migration of VM `id` from this host; a VM that never left is a conflict,
    /// not a missing VM.
    pub fn migration(&self, id: &str) -> Result<MigrationStatus, HostError> {
        self.get(id)?.migration().ok_or_else(|| {
            HostError::Conflict(format!(
                "VM {id} has no migration from this host to show or resolve"
            ))
        })
    }

    /// Receives migrations on `listener` (runs forever on its own thread).
    pub fn serve_migrations(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let factory = Arc::new(Receiver { host: self.clone() });
        let secret = self.config.secret.clone();
        let tls = self.config.tls.clone();
        let outcomes = self.outcomes.clone();
        let receiving = ferry_migrate::spawn_receiver(listener, secret, tls, factory, outcomes)?;
        self.background.lock().expect("background lock").migrations = Some(receiving);
        Ok(())
    }
}

/// The host as the engine's [`ferry_migrate::TargetFactory`].
struct Receiver {
    host: Arc<Host>,
}

impl ferry_migrate::TargetFactory for Receiver {
    type Target = VmTarget;

    fn prepare(&self, vm: &ferry_migrate::VmDescription) -> Result<VmTarget, VmError> {
        if let Some(why) = migration::incompatibility(vm) {
            return Err(VmError::Incompatible(format!(
                "host {} cannot run this VM: {why}",
                self.host.config.name
            )));
        }
        // Its source is this daemon (a destination given as this host's own address):
        // taken, it would run here twice, the copy under a new id.
        if migration::extra(vm, EXTRA_FROM_INSTANCE) == Some(&self.host.instance) {
            return Err(VmError::Incompatible(format!(
                "VM {} runs on host {} already: a VM migrates to another host",
                migration::extra(vm, EXTRA_ID).unwrap_or_default(),
                self.host.config.name
            )));
        }
        let config = VmConfig {
            ram_size: vm.ram_size,
            vcpus: vm.vcpus,
            accel_memory: vm.accel_memory,
        };
        // An impossible shape is refused as such, not as a lack of room.
        config.validate().map_err(|e| VmError::Create(e.into()))?;
        // Held from here until the VM is adopted, or dropped with the target if the
        // migration fails: concurrent creations and arrivals see it.
        let reservation = self
            .host
            .reserve(&config)
            .map_err(|e| VmError::NoRoom(e.into()))?;
        VmTarget::prepare(
            vm,
            self.host.vm_host_options(),
            FileStore::of_host(&self.host),
            reservation,
        )
    }

    fn adopt(&self, target: VmTarget, report: ferry_migrate::ReceiveReport) {
        // The VM resumed here, and its source is told so for good (it may release its
        // copy): from here it is listed, or stopped and reported lost, never left running
        // unlisted; a panic on the way included, which would otherwise end this thread
        // with the VM still running under its watcher.
        let mut arrival = Arrival::Unlisted;
        let adopted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.host_arrival(&target, &report, &mut arrival)
        }));
        let why = match adopted {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(panic) => format!("adopting it panicked: {}", panic_message(&*panic)),
        };
        match arrival {
            Arrival::Unlisted => tracing::error!(
                vm = %report.vm.name,
                "a VM that arrived and ran here could not be adopted, and was stopped; its \
                 source was told it runs here, so it runs nowhere now: {why}"
            ),
            Arrival::Listed { id } => tracing::error!(
                vm = %id,
                "a VM that arrived is listed and runs here, but its adoption failed after: {why}"
            ),
        }
    }
}

/// How far adopting an arrived VM got: what its failure or panic left.
enum Arrival {
    /// Not listed: the VM was stopped, or never started here.
    Unlisted,
    /// Listed under `id`: it runs here, managed as any other.
    Listed {
        /// Its id here.
        id: String,
    },
}

impl Receiver {
    /// Launches the VM `target` received (it resumed) and lists it, saying so in
    /// `arrival` as soon as it is.
    fn host_arrival(
        &self,
        target: &VmTarget,
        report: &ferry_migrate::ReceiveReport,
        arrival: &mut Arrival,
    ) -> Result<(), String> {
        let Some((vm, reservation)) = target.take_vm() else {
            return Err("the VM vanished before it was adopted".into());
        };
        let args: Vec<String> = target
            .extra(EXTRA_ARGS)
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default();
        // Its id if usable and no live VM here has it (one created here since it left may
        // have been given it), else a fresh one.
        let claim = self
            .host
            .claim_id(target.extra(EXTRA_ID).filter(|id| usable_id(id)));
        let id = claim.id().to_string();
        let from = target.extra(EXTRA_FROM).map(str::to_string);
        let name = target
            .extra(EXTRA_NAME)
            .filter(|n| ferry_api::valid_vm_name(n))
            .map(str::to_string);
        let idempotency_key = target
            .extra(EXTRA_IDEMPOTENCY_KEY)
            .filter(|k| ferry_api::check_idempotency_key(k).is_ok())
            .map(str::to_string);
        let hosted = HostedVm::launch(
            id.clone(),
            (report.vm.name.clone(), name),
            args,
            vm,
            Origin::Migrated {
                from,
                idempotency_key,
            },
            reservation,
        )
        .map_err(|e| format!("VM {id}: {e}"))?;
        let hosted = Unlisted(Some(hosted));
        tracing::info!(%id, rounds = report.rounds, bytes = report.bytes_received, "VM arrived");
        let hosted = self.host.list_vm(claim, hosted);
        *arrival = Arrival::Listed { id };
        self.host.after_listing(&hosted);
        Ok(())
    }
}

/// Opens the files `specs` names for a VM being created, `pin` keeping those in the file
/// store. An eviction that moved a store file aside just before the pin puts it back at
/// once, finding it pinned: a file missing from a create that attaches store files is
/// looked for again, briefly.
fn open_attached(
    specs: &[(String, PathBuf)],
    pin: &ReceivingPin,
    check: &ferry_vmm::files::OpenCheck<'_>,
) -> Result<AttachedFiles, AttachError> {
    open_attached_retrying(specs, pin, check, STORE_FILE_RETRIES)
}

/// [`open_attached`], looking again at most `retries` times.
fn open_attached_retrying(
    specs: &[(String, PathBuf)],
    pin: &ReceivingPin,
    check: &ferry_vmm::files::OpenCheck<'_>,
    mut retries: u32,
) -> Result<AttachedFiles, AttachError> {
    loop {
        match AttachedFiles::open_checked(specs, check) {
            // Only a pinned store file's: retrying any other would take time that tells
            // whether a file it led to exists.
            Err(AttachError::Open { source, path, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && pin.pins(&path)
                    && retries > 0 =>
            {
                retries -= 1;
                std::thread::sleep(STORE_FILE_RETRY_WAIT);
            }
            opened => return opened,
        }
    }
}

/// What a panic carried, if it was a message.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn refused() -> MigrationError {
        MigrationError::Connect {
            addr: "10.0.0.2:7071".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        }
    }

    fn center_error(code: &str) -> CenterAskError {
        ferry_client::ClientError::Api(ferry_client::ApiError {
            what: "POST /v1/settle".into(),
            status: 503,
            code: Some(code.into()),
            message: "host b did not answer".into(),
        })
        .into()
    }

    #[test]
    fn a_refused_connection_resumes_the_vm_only_if_the_center_is_refused_too() {
        use Settlement::*;
        // Without a center, a refusal means the daemon is gone.
        let (who, answer) = settlement(Err(refused()), || None).unwrap();
        assert_eq!(answer, NotRunning, "{who}");
        // With one, a forged refusal is overruled by the destination's answer through it.
        let (who, answer) = settlement(Err(refused()), || Some(Ok(Running))).unwrap();
        assert_eq!(
            (who, answer),
            (
                "the center (asking the destination, or from where the cluster reports the VM)",
                Running
            )
        );
        // The center cannot reach the destination either: no answer yet, ask again.
        let unanswered = settlement(Err(refused()), || Some(Err(center_error("unavailable"))));
        assert!(unanswered.unwrap_err().contains("through the center"));
        // The destination's machine refused the center too: its daemon is gone.
        let (who, answer) =
            settlement(Err(refused()), || Some(Err(center_error("host_refused")))).unwrap();
        assert_eq!(answer, NotRunning, "{who}");
        // Any other failure to connect proves nothing, however the center's call ends.
        let timed_out = MigrationError::Connect {
            addr: "10.0.0.2:7071".into(),
            source: std::io::ErrorKind::TimedOut.into(),
        };
        assert!(settlement(Err(timed_out), || Some(Err(center_error("host_refused")))).is_err());
        // The destination's own answer needs no center.
        let (who, answer) = settlement(Ok(Running), || panic!("the center was asked")).unwrap();
        assert_eq!((who, answer), ("the destination", Running));
    }

    #[test]
    fn a_received_vm_keeps_its_id_only_if_the_id_is_safe_to_use() {
        assert!(usable_id("a-vm3"));
        assert!(usable_id("host.example_1-vm12"));
        for bad in ["", "a\0b", "a/b", "a b", "é", &"x".repeat(256)] {
            assert!(!usable_id(bad), "{bad:?}");
        }
        // Nor one that would need escaping in a URL path.
        for bad in ["a?b", "a#b", "a%2Fb", "a+b", "a:b", "a\\b"] {
            assert!(!usable_id(bad), "{bad:?}");
        }
    }

    /// Host h, on [`test_config`].
    pub(crate) fn test_host() -> Arc<Host> {
        Host::new(test_config("h")).unwrap()
    }

    /// Host `name`'s configuration: 1 GiB, its file store in the temporary folder.
    fn test_config(name: &str) -> HostConfig {
        HostConfig {
            name: name.into(),
            secret: Secret::new(b"host-unit-test-secret-0123456789".to_vec()).unwrap(),
            memory_capacity: 1 << 30,
            accel_capacity: 256 << 20,
            accel_threads: 1,
            guest_nice: 0,
            tls: None,
            // Its own: the store keeps the host's record of VM ids, and of migrations.
            file_store: {
                static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ferry_testdata::scratch_dir("host-unit").join(format!("{name}-{n}"))
            },
            api_tokens: None,
            backend: ferry_accel::backend::CPU,
            attach: AttachPolicy::Under(Vec::new()),
        }
    }

    /// Waits up to `secs` seconds for `done`; whether it came.
    fn eventually(secs: u64, done: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while !done() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The status of VM `id`'s migration out of `host` once it has ended (or after a
    /// minute).
    fn migration_ended(host: &Host, id: &str) -> MigrationStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = host.migration(id).unwrap();
            if status.state != MigrationState::Running || std::time::Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn memtouch(memory: u64, accel_memory: u64) -> CreateVm {
        CreateVm {
            name: None,
            workload: "memtouch".into(),
            args: ["--mib", "1", "--passes", "1000000"]
                .map(String::from)
                .to_vec(),
            memory,
            accel_memory,
            attach: Vec::new(),
            backend: None,
            idempotency_key: None,
        }
    }

    #[test]
    fn an_id_claimed_for_a_vm_being_started_goes_to_no_other_vm() {
        // `h-vm1`, given by an earlier host of this name (one whose file store was
        // wiped), arrives while an operator creates a VM.
        let host = test_host();
        let arriving = host.claim_id(Some("h-vm1"));
        assert_eq!(arriving.id(), "h-vm1");
        let created = host.claim_id(None);
        assert_eq!(created.id(), "h-vm2");
        // Nor does another arrival with that id get it while it is claimed.
        assert_eq!(host.claim_id(Some("h-vm1")).id(), "h-vm3");
        // A claim given up (its VM did not start) frees the id.
        drop(arriving);
        assert_eq!(host.claim_id(Some("h-vm1")).id(), "h-vm1");
    }

    #[test]
    fn a_create_attaches_only_files_under_the_attach_dirs() {
        let root = ferry_testdata::scratch_dir("attach-policy");
        let (models, elsewhere) = (root.join("models"), root.join("elsewhere"));
        for dir in [&models, &elsewhere] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let (model, secret) = (models.join("m.gguf"), elsewhere.join("secret"));
        std::fs::write(&model, b"weights").unwrap();
        std::fs::write(&secret, b"the cluster secret").unwrap();
        let (link, linked_dir) = (models.join("link"), root.join("linked-models"));
        let dangling = models.join("dangling");
        let links = [
            (&secret, &link),
            (&models, &linked_dir),
            (&elsewhere.join("no-such-file"), &dangling),
        ];
        for (target, link) in links {
            let _ = std::fs::remove_file(link);
            std::os::unix::fs::symlink(target, link).unwrap();
        }
        // The folder named through a link, as an operator may; a client names the file
        // through the same link, or where it really is.
        let policy = AttachPolicy::Under(vec![AttachDir::new(&linked_dir).unwrap()]);
        for named in [&model, &linked_dir.join("m.gguf")] {
            assert_eq!(
                policy.admit(named).unwrap(),
                std::fs::canonicalize(&model).unwrap()
            );
        }
        // Outside, through `..`, through a symlink to a file outside or to none, or
        // missing inside: refused alike, so whether a file exists outside is not told.
        let dotdot = models.join("../elsewhere/secret");
        let missing = elsewhere.join("no-such-file");
        let missing_inside = models.join("no-such-file");
        let refusals: Vec<String> = [
            &secret,
            &dotdot,
            &link,
            &missing,
            &dangling,
            &missing_inside,
        ]
        .into_iter()
        .map(|refused| {
            let why = policy.admit(refused).unwrap_err();
            why.replace(refused.to_str().unwrap(), "PATH")
        })
        .collect();
        assert!(
            refusals[0].contains("names no file under the directories"),
            "{refusals:?}"
        );
        assert!(refusals.iter().all(|r| *r == refusals[0]), "{refusals:?}");
        // By default nothing is attached by path, and the refusal says what to do.
        let host = test_host();
        let mut req = memtouch(64 << 20, 0);
        req.attach = vec![Attachment {
            name: "model".into(),
            path: model.clone(),
        }];
        match host.create_vm(&req) {
            Err(HostError::BadRequest(why)) => assert!(why.contains("--attach-dir"), "{why}"),
            other => panic!("attached without an --attach-dir: {other:?}"),
        }
        assert_eq!(host.memory_used(), 0);
        // A path made a link to elsewhere, or to nothing, after it was admitted: the
        // open file is checked where it really is before any of it is read, and either
        // is refused as a path outside is, telling nothing of what it led to.
        let asked = vec![Attachment {
            name: "model".into(),
            path: models.join("m.gguf"),
        }];
        let check: &ferry_vmm::files::OpenCheck<'_> = &|file| policy.check_open(file);
        let opened_outside = AttachedFiles::open_checked(&[("model".into(), link.clone())], check);
        let opened_nothing =
            AttachedFiles::open_checked(&[("model".into(), dangling.clone())], check);
        let outside = format!("cannot attach 'model': {}", policy.refusal(&asked[0].path));
        for opened in [opened_outside, opened_nothing] {
            match policy.open_refusal(opened.map(|_| ()).unwrap_err(), &asked) {
                HostError::BadRequest(why) => assert_eq!(why, outside),
                other => panic!("{other:?}"),
            }
        }
        AttachedFiles::open_checked(&[("model".into(), model.clone())], check).unwrap();
        // Past the check the file is inside, and what is wrong with it is told.
        let inside_dir = AttachedFiles::open_checked(&[("model".into(), models.clone())], check);
        match policy.open_refusal(inside_dir.map(|_| ()).unwrap_err(), &asked) {
            HostError::BadRequest(why) => assert!(why.contains("not a regular file"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Thousands of entries are refused before any is looked for.
        req.attach = (0..40_000)
            .map(|_| Attachment {
                name: "model".into(),
                path: model.clone(),
            })
            .collect();
        match host.create_vm(&req) {
            Err(HostError::BadRequest(why)) => assert!(why.contains("40000"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_vm_sent_to_its_own_host_is_refused_and_runs_on_as_it_was() {
        if !ferry_testdata::kvm("a_vm_sent_to_its_own_host_is_refused_and_runs_on_as_it_was") {
            return;
        }
        let host = test_host();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let own = listener.local_addr().unwrap().to_string();
        host.serve_migrations(listener).unwrap();
        let id = host.create_vm(&memtouch(64 << 20, 0)).unwrap().id;
        host.start_migration(&id, MigrateRequest::to(&own)).unwrap();
        let status = migration_ended(&host, &id);
        assert_eq!(status.state, MigrationState::Failed, "{status:?}");
        let error = status.error.unwrap_or_default();
        assert!(error.contains("runs on host"), "{error}");
        // One VM, under its id, running.
        let listed: Vec<VmInfo> = host.list();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].id, id);
        assert!(
            eventually(10, || host.get(&id).unwrap().state().is_running()),
            "{:?}",
            host.get(&id).unwrap().state()
        );
        host.shutdown();
    }

    #[test]
    fn hosts_that_share_a_name_migrate_between_them_and_the_arrival_gets_a_new_id() {
        if !ferry_testdata::kvm("hosts_that_share_a_name_migrate_between_them") {
            return;
        }
        // Two hosts named h without a center (nothing refuses the name): each has h-vm1.
        let (a, b) = (test_host(), test_host());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap().to_string();
        b.serve_migrations(listener).unwrap();
        let id = a.create_vm(&memtouch(64 << 20, 0)).unwrap().id;
        let theirs = b.create_vm(&memtouch(64 << 20, 0)).unwrap().id;
        assert_eq!(id, theirs);
        a.start_migration(&id, MigrateRequest::to(&to)).unwrap();
        let status = migration_ended(&a, &id);
        assert_eq!(status.state, MigrationState::Succeeded, "{status:?}");
        let there: Vec<String> = b.list().into_iter().map(|vm| vm.id).collect();
        assert_eq!(there.len(), 2, "{there:?}");
        assert!(there.contains(&id), "{there:?}");
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn a_migration_whose_guest_ends_fails_saying_so() {
        if !ferry_testdata::kvm("a_migration_whose_guest_ends_fails_saying_so") {
            return;
        }
        let host = test_host();
        // A destination that takes the connection and never answers: the migration waits
        // in its handshake while the guest ends on its own.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut req = memtouch(64 << 20, 0);
        req.args = ["--mib", "4", "--passes", "200"].map(String::from).to_vec();
        let id = host.create_vm(&req).unwrap().id;
        let to = silent.local_addr().unwrap().to_string();
        host.start_migration(&id, MigrateRequest::to(&to)).unwrap();
        let status = migration_ended(&host, &id);
        assert_eq!(status.state, MigrationState::Failed, "{status:?}");
        let error = status.error.unwrap_or_default();
        assert!(error.contains("ended during its migration"), "{error}");
        drop(silent);
    }

    #[test]
    fn an_impossible_vm_is_a_bad_request_whatever_room_there_is() {
        let host = test_host();
        // Sizes past the host's capacity but also past what a VM may have, or misaligned.
        for (memory, accel) in [(1 << 50, 0), (64 << 20, 1 << 50), (64 << 20, 4097)] {
            let error = host.create_vm(&memtouch(memory, accel)).unwrap_err();
            assert!(
                matches!(error, HostError::BadRequest(_)),
                "{memory} + {accel}: {error:?}"
            );
        }
        // A workload whose offer no host would take: it could never migrate.
        for workload in ["hello\x1b[2J".to_string(), "x".repeat(4096)] {
            let mut req = memtouch(64 << 20, 0);
            req.workload = workload;
            let error = host.create_vm(&req).unwrap_err();
            assert!(
                matches!(error, HostError::BadRequest(ref why) if why.contains("control characters")),
                "{error:?}"
            );
        }
        assert_eq!(host.memory_used(), 0);
        assert!(host.list().is_empty());
    }

    #[test]
    fn pre_copy_bounds_beyond_their_maxima_are_refused() {
        // `req` refused, naming `field`.
        let refused = |req: &MigrateRequest, field: &str| {
            let error = migration_options(req).unwrap_err();
            assert!(
                matches!(&error, HostError::BadRequest(m) if m.contains(field)),
                "{field}: {error:?}"
            );
        };
        let mut req = MigrateRequest::to("127.0.0.1:1");
        req.max_rounds = ferry_api::MAX_ROUNDS;
        req.max_precopy_s = ferry_api::MAX_PRECOPY_S;
        let options = migration_options(&req).unwrap();
        assert_eq!(options.max_rounds, ferry_api::MAX_ROUNDS);
        req.max_rounds += 1;
        refused(&req, "max_rounds");
        req.max_rounds = 30;
        req.max_precopy_s = u64::MAX;
        refused(&req, "max_precopy_s");
        // A pause target whose deadline would overflow the clock.
        req.max_precopy_s = 60;
        req.downtime_ms = u64::MAX;
        refused(&req, "downtime_ms");
        req.downtime_ms = ferry_api::MAX_DOWNTIME_MS;
        assert!(migration_options(&req).is_ok());
        // Destinations that are no address (kept in the VM's state and its heartbeats).
        for to in [
            "",
            "host",
            "host:0",
            "host:99999",
            "a b:1",
            "::1:7071",
            &"h".repeat(300),
        ] {
            req.to = to.to_string();
            refused(&req, "not a migration address");
        }
        for to in ["10.0.0.2:7071", "[::1]:7071", "host-b.example:7071"] {
            req.to = to.into();
            assert!(migration_options(&req).is_ok(), "{to}");
        }
    }

    #[test]
    fn stopping_a_vm_forgets_its_record_and_not_the_vm_that_took_its_id_since() {
        if !ferry_testdata::kvm(
            "stopping_a_vm_forgets_its_record_and_not_the_vm_that_took_its_id_since",
        ) {
            return;
        }
        let host = test_host();
        let created = host.create_vm(&memtouch(32 << 20, 0)).unwrap();
        let stopped = host.get(&created.id).unwrap();
        stopped.stop().unwrap();
        // It ended: a VM migrated here with its id takes it (as `adopt` does).
        let claim = host.claim_id(Some(&created.id));
        assert_eq!(claim.id(), created.id);
        let config = VmConfig::new(32 << 20);
        let image = ferry_guest_images::resolve("memtouch").unwrap();
        let args = memtouch(0, 0).args;
        let vm = Microvm::boot(config, &image, &args, host.vm_host_options()).unwrap();
        let arrived = HostedVm::launch(
            claim.id().to_string(),
            ("memtouch".into(), None),
            args,
            vm,
            Origin::Migrated {
                from: Some("g".into()),
                idempotency_key: None,
            },
            host.reserve(&config).unwrap(),
        )
        .unwrap();
        host.register(claim, Unlisted(Some(arrived.clone())));
        // Forgetting the stopped VM's record leaves the running one listed.
        host.unlist(&stopped);
        let listed = host.get(&created.id).unwrap();
        assert!(Arc::ptr_eq(&listed, &arrived));
        host.shutdown();
        assert!(arrived.state().has_ended());
        assert_eq!(host.memory_used(), 0);
    }

    #[test]
    fn a_rate_ceiling_is_taken_in_mib_s_and_refused_outside_its_range() {
        let mut req = MigrateRequest::to("127.0.0.1:1");
        assert_eq!(migration_options(&req).unwrap().max_rate, None);
        req.max_rate_mib_s = Some(200);
        assert_eq!(migration_options(&req).unwrap().max_rate, Some(200 << 20));
        for bad in [0, ferry_api::MAX_RATE_MIB_S + 1] {
            req.max_rate_mib_s = Some(bad);
            let error = migration_options(&req).unwrap_err().to_string();
            assert!(error.contains("max_rate_mib_s"), "{error}");
        }
    }

    #[test]
    fn a_vm_whose_adoption_panics_before_it_is_listed_is_stopped_not_left_running() {
        if !ferry_testdata::kvm("a_vm_whose_adoption_panics_before_it_is_listed_is_stopped") {
            return;
        }
        let a = Host::new(test_config("pa")).unwrap();
        let b = Host::new(test_config("pb")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap().to_string();
        b.serve_migrations(listener).unwrap();
        let id = a.create_vm(&memtouch(64 << 20, 0)).unwrap().id;
        // b's adoption panics once the VM resumed there and runs under its watcher.
        *b.before_listing.lock().unwrap() = Some(Box::new(|| panic!("adopting fails (test)")));
        a.start_migration(&id, MigrateRequest::to(&to)).unwrap();
        // b answers that the VM runs there (it did, and the source may have let go):
        // the source releases its copy, settling if it must.
        let left = || a.get(&id).is_ok_and(|vm| !vm.state().is_live());
        assert!(
            eventually(60, left),
            "{:?}",
            a.get(&id).map(|vm| vm.state())
        );
        // Unlisted on b, the VM is stopped there, and gives its memory back; not left
        // running where nobody can stop it.
        assert!(b.list().is_empty());
        assert!(
            eventually(10, || b.memory_used() == 0),
            "b holds {} bytes for a VM it does not list",
            b.memory_used()
        );
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn a_restarted_host_answers_for_the_migrations_its_earlier_run_received() {
        let store = std::env::temp_dir().join(format!("ferry-resumed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        let config = HostConfig {
            file_store: store.clone(),
            ..test_config("restarted")
        };
        let first = Host::new(config.clone()).unwrap();
        assert_eq!(first.settle_incoming(42), Settlement::NotRunning);
        first.shutdown();
        drop(first);
        // As its run would have appended it when the VM of session 42 resumed here.
        std::fs::write(store.join(RESUMED_MIGRATIONS), 42u64.to_le_bytes()).unwrap();
        let restarted = Host::new(config).unwrap();
        assert_eq!(restarted.settle_incoming(42), Settlement::Running);
        assert_eq!(restarted.settle_incoming(43), Settlement::NotRunning);
        restarted.shutdown();
        let _ = std::fs::remove_dir_all(&store);
    }

    #[test]
    fn a_store_file_an_eviction_has_just_moved_aside_is_found_once_it_is_put_back() {
        let store = std::env::temp_dir().join(format!("ferry-attach-aside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store).unwrap();
        let content = b"weights an eviction moved aside".to_vec();
        let sha256 = crate::files::tests::sha(&content);
        let stored = store.join(format!("sha256-{sha256}"));
        let aside = store.join("moved-aside");
        std::fs::write(&aside, &content).unwrap();
        let files = FileStore::new(store.clone(), AttachPolicy::Anywhere);
        let specs = |path: &Path| vec![("model".to_string(), path.to_path_buf())];
        // Admitted while it was there; aside as the create opens it, and back soon.
        let pin = files.pin_attached(&[stored.as_path()]);
        assert!(pin.pins(&stored));
        let putting_back = {
            let (aside, stored) = (aside.clone(), stored.clone());
            std::thread::spawn(move || {
                std::thread::sleep(STORE_FILE_RETRY_WAIT);
                std::fs::rename(aside, stored).unwrap();
            })
        };
        // Patient enough for a put-back thread a loaded machine runs late.
        let opened = open_attached_retrying(&specs(&stored), &pin, &|_| Ok(()), 1000)
            .expect("the store file, once back");
        putting_back.join().unwrap();
        assert_eq!(opened.infos()[0].sha256, sha256);
        // One gone for good is still refused, as is a file outside the store at once.
        std::fs::remove_file(&stored).unwrap();
        let started = std::time::Instant::now();
        assert!(open_attached(&specs(&stored), &pin, &|_| Ok(())).is_err());
        assert!(started.elapsed() >= STORE_FILE_RETRY_WAIT * STORE_FILE_RETRIES);
        let elsewhere = store.join("not-in-the-store");
        let unpinned = files.pin_attached(&[elsewhere.as_path()]);
        assert!(!unpinned.pins(&elsewhere));
        assert!(open_attached(&specs(&elsewhere), &unpinned, &|_| Ok(())).is_err());
        // Nor is another missing file looked for again because a store file is pinned:
        // the time taken would tell that it is missing.
        assert!(!pin.pins(&elsewhere));
        let started = std::time::Instant::now();
        assert!(open_attached(&specs(&elsewhere), &pin, &|_| Ok(())).is_err());
        assert!(started.elapsed() < STORE_FILE_RETRY_WAIT * STORE_FILE_RETRIES);
        drop((pin, unpinned));
        std::fs::remove_dir_all(&store).unwrap();
    }

    /// A memtouch VM on `host` whose migration `session` to `to` is in doubt.
    fn in_doubt_vm(host: &Arc<Host>, to: &str, session: u64) -> (Arc<HostedVm>, MigrationTicket) {
        let vm = host
            .get(&host.create_vm(&memtouch(64 << 20, 0)).unwrap().id)
            .unwrap();
        let status = MigrationStatus {
            vm: vm.id.clone(),
            to: to.into(),
            state: MigrationState::InDoubt,
            progress: None,
            report: None,
            error: None,
            settlement: Vec::new(),
        };
        let ticket = vm.begin_migration(to, status, Default::default()).unwrap();
        vm.hold().unwrap();
        vm.note_in_doubt_session(ticket, session);
        vm.lose_confirmation("the confirmation was lost (test)")
            .unwrap();
        (vm, ticket)
    }

    #[test]
    fn a_host_shutting_down_stops_settling_an_in_doubt_vm_and_resumes_it_nowhere() {
        if !ferry_testdata::kvm("a_host_shutting_down_stops_settling_an_in_doubt_vm") {
            return;
        }
        // A destination that takes each settle question and hangs up: never an answer.
        let destination = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = destination.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for taken in destination.incoming() {
                drop(taken);
            }
        });
        let host = test_host();
        let (vm, ticket) = in_doubt_vm(&host, &to, 1);
        let (settling, in_doubt) = (host.clone(), vm.clone());
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let options = MigrationOptions::default();
            settling.settle(&in_doubt, ticket, &to, 1, &options);
            let _ = done.send(());
        });
        assert!(eventually(10, || vm
            .migration()
            .is_some_and(|m| !m.settlement.is_empty())));
        host.shutdown();
        assert!(
            ended.recv_timeout(Duration::from_secs(10)).is_ok(),
            "still settling after the shutdown"
        );
        assert_eq!(vm.state().name(), "in-doubt", "resumed after the shutdown");
        let settlement = vm.migration().unwrap().settlement;
        assert!(
            settlement
                .last()
                .is_some_and(|l| l.contains("shutting down")),
            "{settlement:?}"
        );
    }

    #[test]
    fn a_migration_cancelled_by_the_shutdown_does_not_say_the_vm_keeps_running() {
        let cancelled = || MigrationError::Cancelled {
            phase: "round 2".into(),
        };
        let by_operator = migration_failure(&cancelled(), None, false);
        assert!(
            by_operator.contains("keeps running on the source"),
            "{by_operator}"
        );
        let by_shutdown = migration_failure(&cancelled(), None, true);
        assert!(!by_shutdown.contains("keeps running"), "{by_shutdown}");
        assert!(by_shutdown.contains("shutting down"), "{by_shutdown}");
        let exited = VmState::Exited { code: 0 };
        let ended = migration_failure(&cancelled(), Some(&exited), true);
        assert!(
            ended.starts_with("the VM ended during its migration"),
            "{ended}"
        );
    }

    #[test]
    fn an_operators_settlement_is_refused_when_the_destination_answers_otherwise() {
        let running = Some(Ok(("the destination", Settlement::Running)));
        let not_running = Some(Ok(("the destination", Settlement::NotRunning)));
        let undecided = Some(Ok(("the destination", Settlement::Undecided)));
        let silent = Some(Err("connection timed out".to_string()));
        assert!(manual_settlement(true, running.clone())
            .unwrap_err()
            .contains("run twice"));
        assert!(manual_settlement(false, running).is_ok());
        assert!(manual_settlement(false, not_running.clone())
            .unwrap_err()
            .contains("would be lost"));
        assert!(manual_settlement(true, not_running).is_ok());
        for resume in [true, false] {
            assert!(manual_settlement(resume, undecided.clone()).is_err());
            let word = manual_settlement(resume, silent.clone()).unwrap();
            assert!(word.contains("operator's word"), "{word}");
        }
    }

    #[test]
    fn resolving_an_in_doubt_vm_by_hand_asks_its_destination_first() {
        if !ferry_testdata::kvm("resolving_an_in_doubt_vm_by_hand_asks_its_destination_first") {
            return;
        }
        // A destination (same secret) that never received the session: it does not run
        // the VM.
        let destination = Host::new(test_config("d")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap().to_string();
        destination.serve_migrations(listener).unwrap();
        let host = test_host();
        let (vm, _) = in_doubt_vm(&host, &to, 7);
        // Released, it would run nowhere.
        match host.resolve(&vm.id, false) {
            Err(HostError::Conflict(why)) => assert!(why.contains("would be lost"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(vm.state().name(), "in-doubt");
        let resolved = host.resolve(&vm.id, true).unwrap();
        assert_eq!(vm.state().name(), "running");
        let line = resolved.settlement.last().unwrap();
        assert!(line.contains("does not run the VM"), "{line}");
        host.shutdown();
        destination.shutdown();
    }

    #[test]
    fn a_panic_holding_the_vm_map_does_not_fail_the_hosts_later_requests() {
        let host = test_host();
        let holder = host.clone();
        let panicked = std::thread::spawn(move || {
            let _vms = holder.vms();
            panic!("a bug while the map is held (test)");
        })
        .join();
        assert!(panicked.is_err() && host.vms.is_poisoned());
        assert!(host.list().is_empty());
        assert!(matches!(host.stop("h-vm9"), Err(HostError::NotFound(_))));
    }

    #[test]
    fn a_guest_image_path_is_read_only_where_files_are_attached() {
        let dir = std::env::temp_dir().join(format!("ferry-image-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = Host::new(HostConfig {
            attach: AttachPolicy::Under(vec![AttachDir::new(&dir).unwrap()]),
            ..test_config("images")
        })
        .unwrap();
        let refusal = |workload: &str| {
            let mut req = memtouch(64 << 20, 0);
            req.workload = workload.into();
            match host.create_vm(&req) {
                Err(HostError::BadRequest(why)) => why,
                other => panic!("{workload}: {other:?}"),
            }
        };
        // Outside the directory, a file there and one not there are refused alike: the
        // answer tells nothing of what is there.
        let exists = std::env::current_exe().unwrap();
        let exists = exists.to_str().unwrap();
        for path in [exists, "/no/such/image"] {
            let why = refusal(path);
            assert_eq!(
                why.replace(path, "PATH"),
                refusal("/no/such/image").replace("/no/such/image", "PATH")
            );
            assert!(why.contains("names no file under the directories"), "{why}");
        }
        // A bare name not built in is not looked for in the daemon's folder.
        let here = "Cargo.toml";
        assert!(std::path::Path::new(here).exists());
        assert!(
            refusal(here).starts_with("no workload named"),
            "{}",
            refusal(here)
        );
        // Inside, the file is read (and this one is no guest).
        let inside = dir.join("not-an-elf");
        std::fs::write(&inside, b"text").unwrap();
        let why = refusal(inside.to_str().unwrap());
        assert!(!why.contains("names no file under"), "{why}");
        assert!(why.contains("truncated"), "{why}");
        // A path admitted, then made a link to elsewhere before it was opened: the open
        // file is checked where it really is, and refused as a path outside is, telling
        // nothing of what it led to.
        let swapped = dir.join("swapped");
        let _ = std::fs::remove_file(&swapped);
        std::os::unix::fs::symlink(exists, &swapped).unwrap();
        let why = match host.read_confined_image("swapped", &swapped) {
            Err(HostError::BadRequest(why)) => why,
            other => panic!("read through a swapped link: {:?}", other.map(|i| i.len())),
        };
        assert!(why.contains("names no file under the directories"), "{why}");
        assert!(!why.contains(exists), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
        host.shutdown();
    }

    #[test]
    fn a_create_sent_again_with_its_key_answers_with_the_vm_the_first_made() {
        if !ferry_testdata::kvm("a_create_sent_again_with_its_key_answers_with_the_vm") {
            return;
        }
        let host = test_host();
        let mut req = memtouch(64 << 20, 0);
        req.idempotency_key = Some("job-1".into());
        // A second create with the key while the first is under way is refused.
        let during = host.clone();
        let concurrent = req.clone();
        let refused = Arc::new(Mutex::new(None));
        let (seen, beat_during) = (refused.clone(), Arc::new(Mutex::new(None)));
        let beat_seen = beat_during.clone();
        *host.before_listing.lock().unwrap() = Some(Box::new(move || {
            *seen.lock().unwrap() = Some(during.create_vm(&concurrent));
            *beat_seen.lock().unwrap() = Some(during.beat_report());
        }));
        let first = host.create_vm(&req).unwrap();
        match refused.lock().unwrap().take() {
            Some(Err(HostError::Unavailable(why))) => assert!(why.contains("under way"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(first.idempotency_key.as_deref(), Some("job-1"));
        // A beat meanwhile names the create under way (a new leader sends it here again);
        // one after lists its VM, with the key, and the create no more.
        let (listed, creating) = beat_during.lock().unwrap().take().unwrap();
        assert!(listed.is_empty());
        assert_eq!(creating, ["job-1"]);
        let (listed, creating) = host.beat_report();
        assert_eq!(listed[0].idempotency_key.as_deref(), Some("job-1"));
        assert!(creating.is_empty());
        // Sent again (its answer lost), it answers with the same VM, and makes none.
        let again = host.create_vm(&req).unwrap();
        assert_eq!(again.id, first.id);
        assert_eq!(host.list().len(), 1);
        // The key asking for another VM is refused; another key makes another VM.
        let mut other = req.clone();
        other.memory = 128 << 20;
        match host.create_vm(&other) {
            Err(HostError::Conflict(why)) => assert!(why.contains(&first.id), "{why}"),
            other => panic!("{other:?}"),
        }
        other.idempotency_key = Some("job-2".into());
        assert_ne!(host.create_vm(&other).unwrap().id, first.id);
        // A key that is no key is a bad request.
        req.idempotency_key = Some("no spaces".into());
        assert!(matches!(
            host.create_vm(&req),
            Err(HostError::BadRequest(_))
        ));
        host.shutdown();
    }

    #[test]
    fn a_store_file_a_vm_being_created_attaches_is_not_evicted_before_it_is_listed() {
        if !ferry_testdata::kvm("a_store_file_a_vm_being_created_attaches_is_not_evicted") {
            return;
        }
        let store = std::env::temp_dir().join(format!("ferry-create-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store).unwrap();
        let content = b"weights attached straight from the store".to_vec();
        let sha256 = crate::files::tests::sha(&content);
        let stored = store.join(format!("sha256-{sha256}"));
        std::fs::write(&stored, &content).unwrap();
        let host = Host::new(HostConfig {
            file_store: store.clone(),
            attach: AttachPolicy::Under(vec![AttachDir::new(&store).unwrap()]),
            ..test_config("pin")
        })
        .unwrap();
        // A migration arriving needs all the room while the VM is opened and started but
        // not yet listed.
        let evicting = host.clone();
        let evicted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let freed = evicted.clone();
        *host.before_listing.lock().unwrap() = Some(Box::new(move || {
            let bytes = FileStore::of_host(&evicting).evict_unused();
            freed.store(bytes, std::sync::atomic::Ordering::SeqCst);
        }));
        let mut req = memtouch(64 << 20, 0);
        req.attach = vec![Attachment {
            name: "model".into(),
            path: stored.clone(),
        }];
        let vm = host.create_vm(&req).unwrap();
        assert_eq!(evicted.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(vm.files[0].path, stored);
        assert_eq!(std::fs::read(&stored).unwrap(), content);
        // Listed, its state pins it; stopped, it is the cache's to evict.
        assert_eq!(FileStore::of_host(&host).evict_unused(), 0);
        host.stop(&vm.id).unwrap();
        assert!(FileStore::of_host(&host).evict_unused() > 0);
        assert!(!stored.exists());
        host.shutdown();
        std::fs::remove_dir_all(&store).unwrap();
    }
}
