//! What the center knows: hosts (from their heartbeats), VMs and where they run,
//! migrations and events. Plain data; [`crate::Center`] keeps it behind a lock and writes
//! every change through to the [`crate::store::Store`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_api::VmInfo;
use ferry_api::VmState;
use ferry_api::{vm_report_changed, BeatSeq, Heartbeat};
use ferry_api::{HostInfo, MigrationState};
use ferry_migrate::Progress;
use serde::{Deserialize, Serialize};

/// Milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a host takes VMs, set by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum HostMode {
    /// In service.
    Active,
    /// Its VMs are being moved off; nothing new lands here.
    Evacuating,
    /// In maintenance and empty: ready to patch.
    Maintenance,
    /// In maintenance, but some VMs could not be moved; not ready.
    MaintenanceIncomplete {
        /// Why.
        reason: String,
    },
}

impl HostMode {
    /// Whether new VMs may land here.
    pub fn accepts_vms(&self) -> bool {
        *self == Self::Active
    }

    /// Short name, as shown.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Evacuating => "evacuating",
            Self::Maintenance => "maintenance",
            Self::MaintenanceIncomplete { .. } => "maintenance-incomplete",
        }
    }
}

/// A host, as of its last heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostRecord {
    /// Name (unique in the cluster).
    pub name: String,
    /// Where the center reaches its API.
    pub api_url: String,
    /// Capacity and load.
    pub info: HostInfo,
    /// Maintenance state.
    pub mode: HostMode,
    /// When its last heartbeat came, ms since the epoch.
    pub last_heartbeat_ms: u64,
    /// When it first joined.
    pub joined_ms: u64,
}

/// A VM and the host it runs on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Id.
    pub id: String,
    /// Host it is on.
    pub host: String,
    /// As that host last reported it.
    pub info: VmInfo,
}

impl VmRecord {
    /// VM `info` on `host`, less its console tail: the center keeps none (a host's own
    /// API shows it), so records stay small whatever a host reports.
    pub fn new(host: &str, mut info: VmInfo) -> Self {
        info.console_tail = String::new();
        Self {
            id: info.id.clone(),
            host: host.to_string(),
            info,
        }
    }

    /// Whether it holds its host's resources.
    pub fn is_live(&self) -> bool {
        self.info.state.is_live()
    }
}

/// One migration the center ordered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Id (database row).
    #[serde(default)]
    pub id: i64,
    /// VM moved.
    pub vm: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// Why: "maintenance of a", "balance", ...
    pub reason: String,
    /// Running, succeeded or failed.
    pub state: MigrationState,
    /// Started, ms since the epoch.
    pub started_ms: u64,
    /// Ended, ms since the epoch.
    pub finished_ms: Option<u64>,
    /// Latest progress while it runs.
    pub progress: Option<Progress>,
    /// Measured pause, ms.
    pub downtime_ms: Option<f64>,
    /// Whole migration, ms.
    pub total_ms: Option<f64>,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Rounds.
    pub rounds: u32,
    /// Why it failed.
    pub error: Option<String>,
}

/// Something that happened, for the operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// "host-joined", "host-down", "host-up", "vm-gone", "maintenance", "migration", ...
    pub kind: String,
    /// What.
    pub message: String,
}

impl Event {
    /// An event now.
    pub fn now(kind: &str, message: String) -> Self {
        Self {
            at_ms: unix_ms(),
            kind: kind.into(),
            message,
        }
    }
}

/// Room held on a host for a VM that is moving there.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The holding it belongs to, which alone gives it back: one that fails to begin never
    /// gives back another's room for the same VM and host.
    pub hold: Hold,
    /// Destination host.
    pub host: String,
    /// VM.
    pub vm: String,
    /// Accelerator bytes.
    pub accel: u64,
    /// RAM + accelerator bytes.
    pub memory: u64,
}

/// One holding of room ([`Reservation`]), unique in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold(u64);

impl Hold {
    /// A holding no other is.
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for Hold {
    fn default() -> Self {
        Self::new()
    }
}

/// What a host has free and how loaded it is.
#[derive(Debug, Clone, Serialize)]
pub struct HostLoad {
    /// Host.
    pub name: String,
    /// Accelerator memory free, bytes (reservations counted).
    pub accel_free: u64,
    /// VM memory free, bytes (reservations counted).
    pub memory_free: u64,
    /// Accelerator memory capacity, bytes.
    pub accel_capacity: u64,
    /// Accelerator memory used, bytes.
    pub accel_used: u64,
    /// Busy devices' worth of accelerator work.
    pub accel_load: f64,
    /// Devices' worth of accelerator work it runs at full speed at once.
    pub accel_slots: f64,
    /// The accelerator backends it runs VMs on.
    pub backends: Vec<String>,
}

/// The changes a heartbeat made, to write through and log.
#[derive(Default)]
pub struct Changes {
    /// Whether the host's record changed enough to write through (joined, moved, new
    /// capacity, or not written for [`HOST_WRITE_EVERY_MS`]): its load alone is not.
    pub host: bool,
    /// VMs whose records changed.
    pub vms: Vec<String>,
    /// VMs no longer anywhere.
    pub gone: Vec<String>,
    /// Reports of live VMs not kept, as another host holds them (the host sends them
    /// again).
    pub skipped: Vec<String>,
    /// Events to record.
    pub events: Vec<Event>,
}

/// Most migrations the center keeps in memory.
pub const MIGRATIONS_KEPT: usize = 1_000;

/// A host's record is written through at least this often while it beats, so a center
/// started on the database knows roughly when each host was last heard.
pub const HOST_WRITE_EVERY_MS: u64 = 30_000;

/// Whether a heartbeat was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum BeatOutcome {
    /// Taken.
    Taken,
    /// A delta on a base this center does not hold: the host must send a full beat.
    NeedFull,
    /// Another live host (its own addresses) holds this name.
    NameTaken {
        /// The API address of the host that holds it.
        holder: String,
    },
}

/// Most VMs the center records on one host (a beat may list no more): far more than a
/// host runs plus the 256 ended ones it lists, and few enough that a host cannot fill
/// the store with made-up VMs.
pub const MAX_VMS_PER_HOST: usize = 2_048;

/// Most hosts the center records (a host's first beat past them is refused): far more
/// than a cluster runs, and few enough that hosts reporting under ever new names cannot
/// fill the center's memory and store. `ferry host forget` makes room.
pub const MAX_HOSTS: usize = 10_000;

/// Longest address, version or backend name a heartbeat may carry, bytes.
pub const MAX_HOST_FIELD_BYTES: usize = 256;

/// Most accelerator backends a host may list.
pub const MAX_BACKENDS: usize = 16;

/// Longest workload (a built-in name, or a guest's path on its host), bytes.
pub const MAX_WORKLOAD_BYTES: usize = 4_096;

/// Most bytes of a VM's guest arguments, each counted with the NUL that ends it: what a
/// host's boot-info page holds (a host boots no VM with more).
pub const MAX_ARGS_BYTES: usize = ferry_abi::ARGS_CAPACITY;

/// Most attached files of a VM: what a host attaches.
pub const MAX_FILES: usize = ferry_abi::file::MAX_FILES;

/// Longest failure or in-doubt reason of a VM's state the center keeps, bytes (a longer
/// one is cut).
pub const MAX_STATE_TEXT_BYTES: usize = 512;

/// Largest report of one VM (as JSON, less its console tail), bytes: an etcd transaction
/// of a hundred records stays under etcd's default request limit (1.5 MiB). A report
/// larger (many files with long paths, say) is kept without its files, then without its
/// arguments, then without its workload, until it fits.
pub const MAX_VM_REPORT_BYTES: usize = 12 << 10;

/// Why a heartbeat was refused: a host's report is not trusted (it may be buggy or
/// compromised), and what it says is bounded before the center keeps it.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The host's name is not one.
    #[error("'{0}' is not a host name: {rule}", rule = ferry_api::NAME_RULE)]
    HostName(String),
    /// The API address is not an `http://` or `https://` URL.
    #[error("the API address '{0}' is not an http:// or https:// URL (scheme, host, port) of at most {MAX_HOST_FIELD_BYTES} bytes")]
    ApiUrl(String),
    /// A text field of the host's is too long.
    #[error("the host's {field} is longer than {MAX_HOST_FIELD_BYTES} bytes")]
    LongField {
        /// Which.
        field: &'static str,
    },
    /// Too many backends listed.
    #[error("{count} accelerator backends listed; at most {MAX_BACKENDS}")]
    Backends {
        /// How many.
        count: usize,
    },
    /// The center records as many hosts as it may, and this one is new.
    #[error("the center records {MAX_HOSTS} hosts already; forget those retired (`ferry host forget`) to make room")]
    TooManyHosts,
    /// Too many VMs listed.
    #[error("{count} VMs {what}; a host may have at most {MAX_VMS_PER_HOST}")]
    TooManyVms {
        /// How many.
        count: usize,
        /// Listed, removed, or on record once the beat is taken.
        what: &'static str,
    },
    /// A load is not a finite number in its range.
    #[error("the host's {field} {value} is not a finite number of at least 0")]
    HostLoad {
        /// Which.
        field: &'static str,
        /// What was sent.
        value: f64,
    },
    /// A VM's id is not one.
    #[error("'{0}' is not a VM id: {rule}", rule = ferry_api::ID_RULE)]
    VmId(String),
    /// A key of a create under way is not an idempotency key.
    #[error("'{0}' (a create under way) is not an idempotency key: {rule}", rule = ferry_api::NAME_RULE)]
    CreatingKey(String),
    /// A VM's report is out of bounds.
    #[error("VM {id}: {problem}")]
    Vm {
        /// The VM.
        id: String,
        /// What is wrong with its report.
        problem: String,
    },
}

/// Cuts `text` (a host's words on a VM or a migration, kept and stored) to at most
/// [`MAX_STATE_TEXT_BYTES`], at a character's boundary, marking the cut.
pub(crate) fn cut_state_text(text: &mut String) {
    cut_text(text, MAX_STATE_TEXT_BYTES);
}

/// Cuts `text` to at most `max` bytes (at least 3), at a character's boundary, marking
/// the cut.
pub(crate) fn cut_text(text: &mut String, max: usize) {
    debug_assert!(max >= '…'.len_utf8(), "no room for the mark of a cut");
    if text.len() > max {
        let mut end = max - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// At most 64 bytes of `text` (sent by a host) for a message.
pub(crate) fn shown(text: &str) -> String {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ellipsis = if end < text.len() { "…" } else { "" };
    format!("{}{ellipsis}", &text[..end])
}

/// Whether `url` is an API address the center may call: `http://` or `https://`, a host
/// and maybe a port, nothing else (no user, path or query; no comma, which would make
/// it several addresses to the client).
fn valid_api_url(url: &str) -> bool {
    if url.len() > MAX_HOST_FIELD_BYTES || url.contains([',', '@']) {
        return false;
    }
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http" | "https"))
        && uri.authority().is_some_and(|a| !a.host().is_empty())
        && uri
            .path_and_query()
            .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
}

/// Checks what a host reports, before any of it is taken; VM reports too large to keep
/// are trimmed ([`check_vm_report`]).
pub fn check_heartbeat(beat: &mut Heartbeat) -> Result<(), HeartbeatError> {
    let host = &beat.host;
    if !ferry_api::valid_host_name(&host.name) {
        return Err(HeartbeatError::HostName(shown(&host.name)));
    }
    if !valid_api_url(&beat.api_url) {
        return Err(HeartbeatError::ApiUrl(shown(&beat.api_url)));
    }
    let fields = [
        ("migration address", &host.migration_addr),
        ("version", &host.version),
        ("backend", &host.backend),
    ];
    let backends = host.backends.iter().map(|b| ("backends' names", b));
    if let Some((field, _)) =
        (fields.into_iter().chain(backends)).find(|(_, text)| text.len() > MAX_HOST_FIELD_BYTES)
    {
        return Err(HeartbeatError::LongField { field });
    }
    if host.backends.len() > MAX_BACKENDS {
        return Err(HeartbeatError::Backends {
            count: host.backends.len(),
        });
    }
    // Infinite or negative loads would make pressures infinite (shown as null, which
    // typed clients cannot read) or a busy host look idle.
    for (field, value) in [
        ("accelerator load", host.accel_load),
        ("load average", host.load_avg),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(HeartbeatError::HostLoad { field, value });
        }
    }
    let removed = beat.delta.as_ref().map_or(&[][..], |d| &d.removed[..]);
    for (count, what) in [(beat.vms.len(), "listed"), (removed.len(), "removed")] {
        if count > MAX_VMS_PER_HOST {
            return Err(HeartbeatError::TooManyVms { count, what });
        }
    }
    if let Some(id) = removed.iter().find(|id| !ferry_api::valid_vm_id(id)) {
        return Err(HeartbeatError::VmId(shown(id)));
    }
    if beat.creating.len() > MAX_VMS_PER_HOST {
        return Err(HeartbeatError::TooManyVms {
            count: beat.creating.len(),
            what: "being created",
        });
    }
    let not_a_key = |key: &&String| ferry_api::check_idempotency_key(key).is_err();
    if let Some(key) = beat.creating.iter().find(not_a_key) {
        return Err(HeartbeatError::CreatingKey(shown(key)));
    }
    beat.vms.iter_mut().try_for_each(check_vm_report)
}

/// Checks one VM's report (of a beat, a create's answer, a migration's destination):
/// what is malformed (its id, name, accelerator load or backend, a migration address) is
/// refused; what is only too large to keep (its workload, arguments or files, beyond what
/// a host takes, or together beyond [`MAX_VM_REPORT_BYTES`]) is emptied, and a long
/// reason in its state is cut, so one VM never makes its host's beats fail.
pub fn check_vm_report(vm: &mut VmInfo) -> Result<(), HeartbeatError> {
    if !ferry_api::valid_vm_id(&vm.id) {
        return Err(HeartbeatError::VmId(shown(&vm.id)));
    }
    let long = |text: &Option<String>| {
        text.as_ref()
            .is_some_and(|t| t.len() > MAX_HOST_FIELD_BYTES)
    };
    let to = vm.state.destination().map(str::to_string);
    let problem = if vm
        .name
        .as_deref()
        .is_some_and(|n| !ferry_api::valid_vm_name(n))
    {
        format!(
            "its name '{}' is not a VM name",
            shown(vm.name.as_deref().unwrap_or_default())
        )
    } else if let Some(Err(why)) =
        (vm.idempotency_key.as_deref()).map(ferry_api::check_idempotency_key)
    {
        format!("its idempotency key is not one: {why}")
    } else if !(0.0..=1.0).contains(&vm.accel_load) {
        // NaN is in no range.
        format!(
            "its accelerator load {} is not between 0 and 1",
            vm.accel_load
        )
    } else if long(&vm.accel_backend) || long(&vm.migrated_from) || long(&to) {
        format!("its backend, origin or destination is longer than {MAX_HOST_FIELD_BYTES} bytes")
    } else {
        if trim_vm_report(vm) {
            return Ok(());
        }
        // Not reached: what is left is bounded well below.
        format!("its report is larger than {MAX_VM_REPORT_BYTES} bytes")
    };
    Err(HeartbeatError::Vm {
        id: vm.id.clone(),
        problem,
    })
}

/// Empties what of `vm`'s report is too large to keep ([`check_vm_report`]); whether
/// what is left fits in [`MAX_VM_REPORT_BYTES`].
fn trim_vm_report(vm: &mut VmInfo) -> bool {
    if let VmState::InDoubt { reason: text, .. } | VmState::Failed { error: text } = &mut vm.state {
        cut_state_text(text);
    }
    if vm.workload.len() > MAX_WORKLOAD_BYTES {
        vm.workload = String::new();
    }
    if vm.args.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGS_BYTES {
        vm.args = Vec::new();
    }
    if vm.files.len() > MAX_FILES {
        vm.files = Vec::new();
    }
    // While the whole is still too large, the files, then the arguments, then the
    // workload's name go (a report that fits is measured once).
    let emptied: [fn(&mut VmInfo); 3] = [
        |vm| vm.files = Vec::new(),
        |vm| vm.args = Vec::new(),
        |vm| vm.workload = String::new(),
    ];
    for empty in emptied {
        if report_bytes(vm) <= MAX_VM_REPORT_BYTES {
            return true;
        }
        empty(vm);
    }
    report_bytes(vm) <= MAX_VM_REPORT_BYTES
}

/// The size of `vm`'s report as JSON, less its console tail (which is not kept).
fn report_bytes(vm: &VmInfo) -> usize {
    /// Counts what is written to it.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, vm);
    (count.0).saturating_sub(serde_json::to_string(&vm.console_tail).map_or(0, |t| t.len()))
}

/// The whole inventory.
#[derive(Default)]
pub struct Inventory {
    /// Hosts by name.
    pub hosts: BTreeMap<String, HostRecord>,
    /// VMs by id (changed through [`Inventory::put_vm`] and [`Inventory::remove_vm`],
    /// which keep `by_host` in step).
    vms: BTreeMap<String, VmRecord>,
    /// The ids of the VMs on record with each idempotency key (kept in step as
    /// `by_host`), so a create sent again costs a lookup, not a pass over every VM. One
    /// VM as a rule; more while a moved VM has two records (a destination gave it another
    /// id), or if hosts report one key twice.
    by_key: BTreeMap<String, BTreeSet<String>>,
    /// The ids of each host's VMs, so a beat costs its own VMs, not the cluster's.
    by_host: BTreeMap<String, BTreeSet<String>>,
    /// Each host's last beat taken, which its next delta must build on.
    beat_bases: BTreeMap<String, BeatSeq>,
    /// Hosts the center placed a VM on since their last beat arrived: that beat may have
    /// been made before the placement, and is refused whatever its kind.
    placed_on: BTreeSet<String>,
    /// When each host's record was last written through.
    host_written_ms: BTreeMap<String, u64>,
    /// Hosts this process has taken a beat from (what it knows of their VMs is first-hand).
    heard: BTreeSet<String>,
    /// Beats taken from each host since this process last took the lead (counted up to
    /// `beats_to_hear`).
    beats_in_lead: BTreeMap<String, u8>,
    /// Per host, VMs gone whose records the store may still hold
    /// ([`Inventory::delete_with_next_beat`]).
    unwritten_gone: BTreeMap<String, BTreeSet<String>>,
    /// Beats a host is heard in, this lead ([`Inventory::begin_lead`]).
    beats_to_hear: u8,
    /// When this process last took the lead, ms since the epoch.
    led_since_ms: u64,
    /// Hosts whose last write-through failed: their record and every VM are written
    /// again with their next beat.
    rewrite: BTreeSet<String>,
    /// The last [`MIGRATIONS_KEPT`] migrations ordered, oldest first (the store keeps
    /// the same ones).
    pub migrations: VecDeque<MigrationRecord>,
    /// Room held for moves in flight.
    pub reservations: Vec<Reservation>,
    /// VMs being created, per host: asked for and not yet reported, so an evacuation
    /// that found the host empty waits for them.
    pub creating: BTreeMap<String, usize>,
    /// Hosts whose going down has been recorded as an event.
    pub down_noted: BTreeSet<String>,
    /// The host each recent create's idempotency key was sent to.
    pub create_keys: CreateKeys,
}

/// Beats a new leader of replicas takes from a host before it knows what the host made on
/// an earlier leader's orders: the first may have been sent before the host learnt of the
/// new leader, which its answer teaches (after that the host refuses the old one's
/// orders), so only the second surely lists every create the old leader ordered there. A
/// single center's earlier process is gone, and ordered nothing after the first.
pub const BEATS_TO_HEAR_A_HOST: u8 = 2;

/// The most idempotency keys [`CreateKeys`] remembers: far more creates than a client
/// sends again within the minutes a retry takes.
pub const CREATE_KEYS_KEPT: usize = 4096;

/// The host each of the last [`CREATE_KEYS_KEPT`] creates' idempotency keys was sent
/// to: a create sent again goes to the same host, which knows whether it made the VM,
/// even before the host's beat reports it (with its key). Beside them, the keys each
/// host's last beat lists as creates under way there (maybe an earlier leader's), kept
/// apart: a host may list any keys, and its list must not push out the creates this
/// center sent, or another host's.
#[derive(Debug, Default)]
pub struct CreateKeys {
    hosts: BTreeMap<String, String>,
    /// Keys, oldest first.
    order: VecDeque<String>,
    /// Keys hosts list as under way, and the first host that listed each.
    listed: BTreeMap<String, String>,
    /// The keys of `listed` each host holds: those its last beat listed.
    listed_by: BTreeMap<String, BTreeSet<String>>,
}

impl CreateKeys {
    /// The host a create with `key` was sent to, if remembered, or else the host that
    /// lists it as under way.
    pub fn host(&self, key: &str) -> Option<&str> {
        (self.hosts.get(key))
            .or_else(|| self.listed.get(key))
            .map(String::as_str)
    }

    /// Forgets `key`: its create made no VM, and may go to any host next time.
    pub fn forget(&mut self, key: &str) {
        if self.hosts.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
        if let Some(host) = self.listed.remove(key) {
            if let Some(keys) = self.listed_by.get_mut(&host) {
                keys.remove(key);
            }
        }
    }

    /// Takes the creates `host` lists as under way now (its beat lists every one, so
    /// those it no longer lists made their VM or failed): a key not held yet is taken
    /// to `host`; the first host that lists a key keeps it while it lists it, so a
    /// host's word never takes another's create. At most what one beat lists per host.
    pub fn list<'a>(&mut self, host: &str, keys: impl IntoIterator<Item = &'a str>) {
        let now: BTreeSet<&str> = keys.into_iter().collect();
        let Self {
            hosts,
            listed,
            listed_by,
            ..
        } = self;
        let held = listed_by.entry(host.to_string()).or_default();
        held.retain(|key| {
            let still = now.contains(key.as_str());
            if !still {
                listed.remove(key);
            }
            still
        });
        for key in now {
            if !hosts.contains_key(key) && !listed.contains_key(key) {
                listed.insert(key.to_string(), host.to_string());
                held.insert(key.to_string());
            }
        }
        if held.is_empty() {
            listed_by.remove(host);
        }
    }

    /// Remembers that a create with `key` goes to `host`, forgetting the oldest key
    /// past the bound.
    pub fn remember(&mut self, key: &str, host: &str) {
        if self
            .hosts
            .insert(key.to_string(), host.to_string())
            .is_none()
        {
            self.order.push_back(key.to_string());
        }
        while self.order.len() > CREATE_KEYS_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.hosts.remove(&oldest);
            }
        }
    }
}

impl Inventory {
    /// Whether `host` has sent a heartbeat within `down_after_ms` of `now`.
    pub fn is_up(&self, host: &str, now: u64, down_after_ms: u64) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| now.saturating_sub(h.last_heartbeat_ms) <= down_after_ms)
    }

    /// Writes `host`'s record and VMs through again with its next beat.
    pub fn rewrite_next_beat(&mut self, host: &str) {
        self.rewrite.insert(host.to_string());
    }

    /// VMs `ids` of `host` are gone, but the store may still hold them (their delete
    /// failed, or this replica did not write when they went): the host's next beat
    /// deletes them. At most [`MAX_VMS_PER_HOST`] a host: past that, a later lead finds
    /// them again.
    pub fn delete_with_next_beat(&mut self, host: &str, ids: impl IntoIterator<Item = String>) {
        let unwritten = self.unwritten_gone.entry(host.to_string()).or_default();
        for id in ids {
            if unwritten.len() >= MAX_VMS_PER_HOST {
                break;
            }
            unwritten.insert(id);
        }
    }

    /// Whether this process has taken a beat from `host`.
    pub fn beat_taken_from(&self, host: &str) -> bool {
        self.heard.contains(host)
    }

    /// This process takes the lead at `now`: what hosts made on an earlier leader's
    /// orders it knows only from their beats to come, `beats_to_hear` of each
    /// ([`Inventory::unheard_hosts`]).
    pub fn begin_lead(&mut self, now: u64, beats_to_hear: u8) {
        self.beats_in_lead.clear();
        self.beats_to_hear = beats_to_hear;
        self.led_since_ms = now;
    }

    /// Counts a beat of host `name` as heard in this lead: one whose answer gave the host
    /// this leader's term (the center of one store: any beat taken), so that the beats
    /// after it list every create an earlier leader ordered there.
    pub fn count_beat_in_lead(&mut self, name: &str) {
        let beats = self.beats_in_lead.entry(name.to_string()).or_default();
        *beats = beats.saturating_add(1).min(self.beats_to_hear);
    }

    /// The hosts that may hold what an earlier leader's create made, unknown here: those
    /// not heard the beats [`Inventory::begin_lead`] asked for since this process took
    /// the lead. Each host known counts until a live one has had time to beat (its record
    /// may be an old one, from the store), and then those up.
    pub fn unheard_hosts(&self, now: u64, down_after_ms: u64) -> Vec<&str> {
        let settling = now < self.led_since_ms.saturating_add(down_after_ms);
        (self.hosts.keys())
            .filter(|name| {
                self.beats_in_lead.get(*name).copied().unwrap_or(0) < self.beats_to_hear
                    && (settling || self.is_up(name, now, down_after_ms))
            })
            .map(String::as_str)
            .collect()
    }

    /// Every VM, by id.
    pub fn vms(&self) -> &BTreeMap<String, VmRecord> {
        &self.vms
    }

    /// The VM created with idempotency key `key`, if on record: a live record first.
    pub fn vm_created_with(&self, key: &str) -> Option<&VmRecord> {
        let mut records = self
            .by_key
            .get(key)?
            .iter()
            .filter_map(|id| self.vms.get(id));
        let first = records.clone().next();
        records.find(|vm| vm.is_live()).or(first)
    }

    /// Records `vm` where it runs now.
    pub fn put_vm(&mut self, vm: VmRecord) {
        if let Some(old) = self.vms.get(&vm.id) {
            if old.host != vm.host {
                if let Some(ids) = self.by_host.get_mut(&old.host) {
                    ids.remove(&vm.id);
                }
            }
        }
        self.by_host
            .entry(vm.host.clone())
            .or_default()
            .insert(vm.id.clone());
        if let Some(old) = self.vms.get(&vm.id) {
            if old.info.idempotency_key != vm.info.idempotency_key {
                let old = old.clone();
                self.unkey(&old);
            }
        }
        if let Some(key) = &vm.info.idempotency_key {
            (self.by_key.entry(key.clone()).or_default()).insert(vm.id.clone());
        }
        self.vms.insert(vm.id.clone(), vm);
    }

    /// Puts a VM the center learned of itself (it created or moved it there), not from
    /// its host's beats. The host's beats may never list it (it can be stopped there
    /// before the next beat), so no delta of theirs could say it went: the host's next
    /// beat is refused, and its full beat follows at once and is compared whole. Refused
    /// whatever its kind: a full beat made before the placement (on its way meanwhile)
    /// lacks the VM, and compared whole would take it for gone.
    pub fn put_vm_placed(&mut self, vm: VmRecord) {
        self.beat_bases.remove(&vm.host);
        self.placed_on.insert(vm.host.clone());
        self.put_vm(vm);
    }

    /// Drops record `gone` (removed, or replaced by one with another key) from
    /// [`Inventory::by_key`].
    fn unkey(&mut self, gone: &VmRecord) {
        let Some(key) = &gone.info.idempotency_key else {
            return;
        };
        if let Some(ids) = self.by_key.get_mut(key) {
            ids.remove(&gone.id);
            if ids.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Forgets VM `id`.
    pub fn remove_vm(&mut self, id: &str) -> Option<VmRecord> {
        let vm = self.vms.remove(id)?;
        self.unkey(&vm);
        if let Some(ids) = self.by_host.get_mut(&vm.host) {
            ids.remove(id);
        }
        Some(vm)
    }

    /// Forgets host `name` and every VM recorded on it; returns its record and theirs.
    pub fn remove_host(&mut self, name: &str) -> Option<(HostRecord, Vec<VmRecord>)> {
        let host = self.hosts.remove(name)?;
        let vms: Vec<VmRecord> = (self.by_host.remove(name).into_iter().flatten())
            .filter_map(|id| self.vms.remove(&id))
            .collect();
        for vm in &vms {
            self.unkey(vm);
        }
        self.beat_bases.remove(name);
        self.placed_on.remove(name);
        self.host_written_ms.remove(name);
        self.heard.remove(name);
        self.rewrite.remove(name);
        self.down_noted.remove(name);
        self.create_keys.list(name, []);
        Some((host, vms))
    }

    /// Puts back a host [`Inventory::remove_host`] took out, with its VMs, unless it has
    /// joined again meanwhile (then its beats tell).
    pub fn restore_host(&mut self, host: HostRecord, vms: Vec<VmRecord>) {
        if self.hosts.contains_key(&host.name) {
            return;
        }
        self.hosts.insert(host.name.clone(), host);
        for vm in vms {
            if !self.vms.contains_key(&vm.id) {
                self.put_vm(vm);
            }
        }
    }

    /// The VMs recorded on `host`.
    pub fn vms_on<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a VmRecord> + 'a {
        self.by_host
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|id| self.vms.get(id))
    }

    /// Takes a heartbeat: updates the host and the VMs it reports. A delta is refused
    /// unless it builds on the last beat taken from the same series.
    pub fn apply_heartbeat(
        &mut self,
        beat: Heartbeat,
        now: u64,
        down_after_ms: u64,
    ) -> (BeatOutcome, Changes) {
        let mut changes = Changes::default();
        let name = beat.host.name.clone();
        if let Some(holder) = self.hosts.get(&name) {
            let other = holder.api_url != beat.api_url
                || holder.info.migration_addr != beat.host.migration_addr;
            if other && self.is_up(&name, now, down_after_ms) {
                let holder = holder.api_url.clone();
                return (BeatOutcome::NameTaken { holder }, changes);
            }
        }
        if self.placed_on.remove(&name) {
            return (BeatOutcome::NeedFull, changes);
        }
        let base = self.beat_bases.get(&name);
        if let Some(delta) = &beat.delta {
            let builds_on_base = matches!((base, beat.seq), (Some(base), Some(seq))
                if base.series == seq.series && base.seq == delta.base);
            if !builds_on_base {
                return (BeatOutcome::NeedFull, changes);
            }
        }
        // A beat older than the one taken (delayed on the way) would roll the host back.
        if let (Some(base), Some(seq)) = (base, beat.seq) {
            if base.series == seq.series && seq.seq <= base.seq {
                return (BeatOutcome::NeedFull, changes);
            }
        }
        match beat.seq {
            Some(seq) => drop(self.beat_bases.insert(name.clone(), seq)),
            None => drop(self.beat_bases.remove(&name)),
        }
        match self.hosts.get_mut(&name) {
            Some(host) => {
                changes.host = host.api_url != beat.api_url
                    || capacity_changed(&host.info, &beat.host)
                    || self
                        .host_written_ms
                        .get(&name)
                        .is_none_or(|&at| now.saturating_sub(at) >= HOST_WRITE_EVERY_MS);
                host.api_url = beat.api_url;
                host.info = beat.host;
                host.last_heartbeat_ms = now;
            }
            None => {
                changes.host = true;
                changes.events.push(Event::now(
                    "host-joined",
                    format!("host {name} joined ({})", beat.api_url),
                ));
                self.hosts.insert(
                    name.clone(),
                    HostRecord {
                        name: name.clone(),
                        api_url: beat.api_url,
                        info: beat.host,
                        mode: HostMode::Active,
                        last_heartbeat_ms: now,
                        joined_ms: now,
                    },
                );
            }
        }
        let rewrite = self.rewrite.remove(&name);
        changes.host |= rewrite;
        if changes.host {
            self.host_written_ms.insert(name.clone(), now);
        }
        self.heard.insert(name.clone());
        // A create under way there (maybe an earlier leader's) is sent there again. The
        // first host named keeps a key: a host's word never takes another's create.
        let under_way: Vec<&str> = (beat.creating.iter())
            .map(String::as_str)
            .filter(|key| self.vm_created_with(key).is_none())
            .collect();
        self.create_keys.list(&name, under_way);
        if self.down_noted.remove(&name) {
            changes
                .events
                .push(Event::now("host-up", format!("host {name} is back up")));
        }
        // VMs this host had but no longer lists were stopped and removed there.
        let vanished: Vec<String> = match &beat.delta {
            Some(delta) => delta.removed.clone(),
            None => {
                let reported: BTreeSet<&str> = beat.vms.iter().map(|v| v.id.as_str()).collect();
                self.by_host
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .filter(|id| !reported.contains(id.as_str()))
                    .cloned()
                    .collect()
            }
        };
        for info in beat.vms {
            if !self.claims(&name, &info, now, down_after_ms) {
                // A destination's report that it moved the VM on, come before its
                // source's that the move there ended, is sent again until then too.
                let moved_on_here = matches!(info.state, VmState::MigratedAway { .. })
                    && (self.vms.get(&info.id))
                        .is_some_and(|known| self.moved_to(known, &name, now, down_after_ms));
                if info.state.is_live() || moved_on_here {
                    changes.skipped.push(info.id);
                }
                continue;
            }
            let changed = self
                .vms
                .get(&info.id)
                .is_none_or(|known| known.host != name || vm_report_changed(&known.info, &info));
            if changed {
                changes.vms.push(info.id.clone());
                self.put_vm(VmRecord::new(&name, info));
            }
        }
        if rewrite {
            // A delta lists only what changed: every VM of the host is written again.
            changes.vms = self.vms_on(&name).map(|vm| vm.id.clone()).collect();
        }
        for id in vanished {
            if self.vms.get(&id).is_none_or(|vm| vm.host != name) {
                continue;
            }
            self.remove_vm(&id);
            changes.gone.push(id);
        }
        // One event per beat, however many went: each is a write to the store.
        if let Some(event) = gone_event(&name, &changes.gone) {
            changes.events.push(event);
        }
        // Deletes the store missed, written with this beat's (told of once already).
        if let Some(unwritten) = self.unwritten_gone.remove(&name) {
            let still_gone = unwritten
                .into_iter()
                .filter(|id| !self.vms.contains_key(id));
            changes.gone.extend(still_gone);
        }
        (BeatOutcome::Taken, changes)
    }

    /// Refuses a beat that would leave more than [`MAX_VMS_PER_HOST`] VMs on record on
    /// its host (deltas add up where no single beat lists too many).
    pub fn check_room(&self, beat: &Heartbeat) -> Result<(), HeartbeatError> {
        if self.hosts.len() >= MAX_HOSTS && !self.hosts.contains_key(&beat.host.name) {
            return Err(HeartbeatError::TooManyHosts);
        }
        let count = self.vms_after(&beat.host.name, beat);
        if count > MAX_VMS_PER_HOST {
            return Err(HeartbeatError::TooManyVms {
                count,
                what: "on record once this beat is taken",
            });
        }
        Ok(())
    }

    /// How many VMs host `name` would have on record once `beat` is taken, at most: a
    /// full beat's list, or those it has with a delta's new ones and without its removed.
    fn vms_after(&self, name: &str, beat: &Heartbeat) -> usize {
        let Some(delta) = &beat.delta else {
            return beat.vms.len();
        };
        let held = self.by_host.get(name);
        let has = |id: &str| held.is_some_and(|ids| ids.contains(id));
        let new: BTreeSet<&str> = (beat.vms.iter())
            .map(|vm| vm.id.as_str())
            .filter(|id| !has(id))
            .collect();
        let removed: BTreeSet<&str> = (delta.removed.iter())
            .map(String::as_str)
            .filter(|id| has(id))
            .collect();
        (held.map_or(0, BTreeSet::len) + new.len()).saturating_sub(removed.len())
    }

    /// Whether host `name`'s report of a VM is the one to keep. A VM lives on one host
    /// at a time; the others report it as migrated away (or, briefly, still migrating).
    ///
    /// A host takes over a VM another host holds live only with evidence it is not its
    /// own word: the holder's report of a move to it, or the holder being down. Without
    /// it, a buggy host (every host holds the cluster key) could take any VM's record,
    /// and the gateway would send its clients there. A real destination waits one beat
    /// at most: its report is skipped and sent again, and the source's next beat says
    /// where the VM went. A VM its holder reports moved away is likewise taken only by
    /// the host it went to (or by any once no host up has that address).
    pub(crate) fn claims(&self, name: &str, info: &VmInfo, now: u64, down_after_ms: u64) -> bool {
        let away = matches!(info.state, VmState::MigratedAway { .. });
        let Some(known) = self.vms.get(&info.id) else {
            return !away;
        };
        if known.host == name {
            return true;
        }
        // Its holder migrating it here, in switchover or in doubt about a move here, or
        // done moving it here.
        let holder_moves_it_here = self.moved_to(known, name, now, down_after_ms);
        if !known.is_live() {
            return match &known.info.state {
                // Moved away: the destination's (which may have moved it on since), or,
                // with no host up at the address it went to, anyone's live report.
                VmState::MigratedAway { to } => {
                    holder_moves_it_here
                        || (info.state.is_live() && !self.any_up_at(to, now, down_after_ms))
                }
                // Ended there (exited, failed): any host's report but of a move away.
                _ => !away,
            };
        }
        if away {
            return false;
        }
        let holder_gone = !self.is_up(&known.host, now, down_after_ms);
        info.state.is_live() && (holder_moves_it_here || holder_gone)
    }

    /// Whether `known`'s state names host `name` as where it goes or went: by `name`'s
    /// migration address, which no other host up has (every host holds the cluster key,
    /// so one may report another's address, and must not pass for its moves' destination
    /// by it).
    fn moved_to(&self, known: &VmRecord, name: &str, now: u64, down_after_ms: u64) -> bool {
        let Some(to) = known.info.state.destination() else {
            return false;
        };
        // The claimer's own address first: the pass over every host is for a match only.
        (self.hosts.get(name)).is_some_and(|h| h.info.migration_addr == to)
            && !(self.hosts.values()).any(|h| {
                h.name != name
                    && h.info.migration_addr == to
                    && self.is_up(&h.name, now, down_after_ms)
            })
    }

    /// Whether a host up at `now` has migration address `addr`.
    fn any_up_at(&self, addr: &str, now: u64, down_after_ms: u64) -> bool {
        (self.hosts.values())
            .any(|h| h.info.migration_addr == addr && self.is_up(&h.name, now, down_after_ms))
    }

    /// Records that down hosts went down (once per outage) and returns those events.
    pub fn note_down_hosts(&mut self, now: u64, down_after_ms: u64) -> Vec<Event> {
        let down: Vec<String> = self
            .hosts
            .keys()
            .filter(|h| !self.is_up(h, now, down_after_ms) && !self.down_noted.contains(*h))
            .cloned()
            .collect();
        down.into_iter()
            .map(|host| {
                let vms: Vec<&str> = self
                    .vms_on(&host)
                    .filter(|vm| vm.is_live())
                    .map(|vm| vm.id.as_str())
                    .collect();
                let message = format!(
                    "host {host} is down (no heartbeat for {} ms); its VMs are unreachable: {}",
                    down_after_ms,
                    if vms.is_empty() {
                        "none".to_string()
                    } else {
                        some_ids(&vms)
                    }
                );
                self.down_noted.insert(host);
                Event::now("host-down", message)
            })
            .collect()
    }

    /// Free room and load of `host`, counting live VMs and reservations.
    pub fn load(&self, host: &HostRecord) -> HostLoad {
        let live = self.vms_on(&host.name).filter(|vm| vm.is_live());
        // Saturating: the sizes come from heartbeats, and a host reporting absurd ones
        // is full, not a panic under the inventory's lock.
        let (mut accel_used, mut memory_used, mut accel_load) = (0u64, 0u64, 0f64);
        for vm in live {
            accel_used = accel_used.saturating_add(vm.info.accel_memory);
            memory_used = memory_used
                .saturating_add(vm.info.memory)
                .saturating_add(vm.info.accel_memory);
            accel_load += vm.info.accel_load;
        }
        for r in self.reservations.iter().filter(|r| r.host == host.name) {
            accel_used = accel_used.saturating_add(r.accel);
            memory_used = memory_used.saturating_add(r.memory);
        }
        let slots = host.info.cpus as f64 / host.info.accel_threads.max(1) as f64;
        HostLoad {
            name: host.name.clone(),
            accel_free: host.info.accel_capacity.saturating_sub(accel_used),
            memory_free: host.info.memory_capacity.saturating_sub(memory_used),
            accel_capacity: host.info.accel_capacity,
            accel_used,
            accel_load,
            accel_slots: slots.max(1.0),
            backends: if host.info.backends.is_empty() {
                vec!["cpu".into()]
            } else {
                host.info.backends.clone()
            },
        }
    }

    /// Hosts that may take VMs now: up and active, with their room.
    pub fn open_hosts(&self, now: u64, down_after_ms: u64) -> Vec<HostLoad> {
        self.hosts
            .values()
            .filter(|h| h.mode.accepts_vms() && self.is_up(&h.name, now, down_after_ms))
            .map(|h| self.load(h))
            .collect()
    }

    /// Live VMs on `host`, largest accelerator memory first.
    pub fn live_vms_on(&self, host: &str) -> Vec<VmRecord> {
        let mut vms: Vec<VmRecord> = self
            .vms_on(host)
            .filter(|vm| vm.is_live())
            .cloned()
            .collect();
        vms.sort_by(|a, b| {
            b.info
                .accel_memory
                .cmp(&a.info.accel_memory)
                .then(a.id.cmp(&b.id))
        });
        vms
    }

    /// Records a migration, forgetting the oldest ended ones beyond [`MIGRATIONS_KEPT`]
    /// (a running one is kept until it ends); returns the ids forgotten.
    pub fn add_migration(&mut self, record: MigrationRecord) -> Vec<i64> {
        self.migrations.push_back(record);
        let mut forgotten = Vec::new();
        while self.migrations.len() > MIGRATIONS_KEPT {
            match self.migrations.iter().position(|m| m.state.has_ended()) {
                Some(oldest) => forgotten.extend(self.migrations.remove(oldest).map(|m| m.id)),
                None => break,
            }
        }
        forgotten
    }

    /// The migration with `id`.
    pub fn migration_mut(&mut self, id: i64) -> Option<&mut MigrationRecord> {
        self.migrations.iter_mut().find(|m| m.id == id)
    }
}

/// Ids named in one event at most; the rest are counted.
const EVENT_IDS_SHOWN: usize = 10;

/// The event of VMs `gone` from host `name`, if any went.
fn gone_event(name: &str, gone: &[String]) -> Option<Event> {
    let message = match gone {
        [] => return None,
        [id] => format!("VM {id} is no longer on host {name} (stopped there)"),
        _ => format!(
            "{} VMs are no longer on host {name} (stopped there): {}",
            gone.len(),
            some_ids(gone)
        ),
    };
    Some(Event::now("vm-gone", message))
}

/// The first [`EVENT_IDS_SHOWN`] of `ids`, and how many more: an event stays short
/// however many VMs a host reports.
fn some_ids<S: AsRef<str>>(ids: &[S]) -> String {
    let shown: Vec<&str> = ids
        .iter()
        .take(EVENT_IDS_SHOWN)
        .map(|id| id.as_ref())
        .collect();
    match ids.len().saturating_sub(EVENT_IDS_SHOWN) {
        0 => shown.join(", "),
        n => format!("{} and {n} more", shown.join(", ")),
    }
}

/// Whether a host's capacity or identity changed (its load changes every beat).
fn capacity_changed(old: &HostInfo, new: &HostInfo) -> bool {
    old.name != new.name
        || old.migration_addr != new.migration_addr
        || old.version != new.version
        || old.backend != new.backend
        || old.backends != new.backends
        || old.cpus != new.cpus
        || old.accel_threads != new.accel_threads
        || old.memory_capacity != new.memory_capacity
        || old.accel_capacity != new.accel_capacity
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::placement::Need;

    pub(crate) fn host_info(name: &str) -> HostInfo {
        HostInfo {
            name: name.into(),
            migration_addr: format!("{name}:7000"),
            version: "0".into(),
            backend: "cpu".into(),
            backends: vec!["cpu".into()],
            cpus: 2,
            accel_threads: 2,
            load_avg: 0.0,
            memory_capacity: 4 << 30,
            memory_used: 0,
            accel_capacity: 2 << 30,
            accel_used: 0,
            accel_load: 0.0,
            vms_running: 0,
            vms_in_doubt: 0,
        }
    }

    pub(crate) fn vm(id: &str, state: VmState) -> VmInfo {
        VmInfo {
            name: None,
            id: id.into(),
            workload: "mlp-train".into(),
            args: vec![],
            state,
            memory: 256 << 20,
            accel_memory: 512 << 20,
            accel_backend: Some("cpu".into()),
            accel_load: 0.5,
            uptime_ms: 0,
            since_unix_ms: 0,
            migrated_from: None,
            files: Vec::new(),
            console_tail: String::new(),
            idempotency_key: None,
        }
    }

    impl Inventory {
        fn apply_heartbeat3(&mut self, beat: Heartbeat, now: u64) -> (BeatOutcome, Changes) {
            self.apply_heartbeat(beat, now, 5_000)
        }
    }

    pub(crate) fn beat(host: &str, vms: Vec<VmInfo>) -> Heartbeat {
        Heartbeat {
            api_url: format!("http://{host}"),
            host: host_info(host),
            vms,
            seq: None,
            delta: None,
            creating: Vec::new(),
        }
    }

    #[test]
    fn hosts_past_the_bound_are_refused_and_those_on_record_still_beat() {
        let mut inv = Inventory::default();
        for i in 0..MAX_HOSTS {
            let (outcome, _) = inv.apply_heartbeat3(beat(&format!("h{i}"), vec![]), 1);
            assert!(matches!(outcome, BeatOutcome::Taken));
        }
        assert!(matches!(
            inv.check_room(&beat("one-more", vec![])),
            Err(HeartbeatError::TooManyHosts)
        ));
        assert!(inv.check_room(&beat("h7", vec![])).is_ok());
    }

    #[test]
    fn a_moved_vm_belongs_to_its_destination_whatever_order_heartbeats_come_in() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("b", vec![]), 1);
        inv.apply_heartbeat3(
            beat(
                "a",
                vec![vm(
                    "v",
                    VmState::Migrating {
                        to: "b:7000".into(),
                    },
                )],
            ),
            1,
        );
        assert_eq!(inv.vms["v"].host, "a");
        // The destination reports it first, then the source, still finishing.
        inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 2);
        assert_eq!(inv.vms["v"].host, "b");
        inv.apply_heartbeat3(
            beat(
                "a",
                vec![vm(
                    "v",
                    VmState::Switchover {
                        to: "b:7000".into(),
                    },
                )],
            ),
            3,
        );
        assert_eq!(
            inv.vms["v"].host, "b",
            "a lagging source must not reclaim it"
        );
        let away = VmState::MigratedAway {
            to: "b:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", away)]), 4);
        assert_eq!(inv.vms["v"].host, "b");
        assert!(inv.vms["v"].is_live());
    }

    #[test]
    fn a_vm_a_host_stops_reporting_is_dropped_with_an_event() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1);
        let (_, changes) = inv.apply_heartbeat3(beat("a", vec![]), 2);
        assert_eq!(changes.gone, vec!["v".to_string()]);
        assert!(changes.events.iter().any(|e| e.kind == "vm-gone"));
        assert!(inv.vms.is_empty());
    }

    #[test]
    fn a_beat_that_drops_many_vms_makes_one_event_naming_ten_and_counting_the_rest() {
        let mut inv = Inventory::default();
        let vms = (0..25).map(|i| vm(&format!("v{i:02}"), VmState::Running));
        inv.apply_heartbeat3(beat("a", vms.collect()), 1);
        let (_, changes) = inv.apply_heartbeat3(beat("a", vec![]), 2);
        assert_eq!(changes.gone.len(), 25);
        let gone: Vec<&Event> = (changes.events.iter())
            .filter(|e| e.kind == "vm-gone")
            .collect();
        assert_eq!(gone.len(), 1, "{gone:?}");
        let message = &gone[0].message;
        assert!(
            message.starts_with("25 VMs are no longer on host a")
                && message.contains("v00, v01")
                && message.contains("v09 and 15 more")
                && !message.contains("v10"),
            "{message}"
        );
    }

    #[test]
    fn a_silent_host_is_down_once_and_keeps_its_vms() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1000);
        assert!(inv.is_up("a", 1500, 1000));
        assert!(inv.note_down_hosts(1500, 1000).is_empty());
        let events = inv.note_down_hosts(2500, 1000);
        assert_eq!(events.len(), 1);
        assert!(events[0].message.contains("v"), "{}", events[0].message);
        assert!(inv.note_down_hosts(3000, 1000).is_empty(), "noted once");
        assert!(inv.vms.contains_key("v"), "VMs of a down host are kept");
        let (_, back) = inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 3100);
        assert!(back.events.iter().any(|e| e.kind == "host-up"));
        // A host of many VMs with long ids: its event names a few, as a gone event does.
        let long = |i: usize| format!("{i:03}{}", "x".repeat(250));
        let many = (0..2048).map(|i| vm(&long(i), VmState::Running)).collect();
        inv.apply_heartbeat3(beat("b", many), 4000);
        let events = inv.note_down_hosts(5500, 1000);
        let b_down = events.iter().find(|e| e.message.starts_with("host b "));
        let message = &b_down.expect("b is down").message;
        assert!(
            message.len() < 4096
                && message.contains(&long(9))
                && message.ends_with(" and 2038 more"),
            "{} bytes: {}",
            message.len(),
            message.chars().take(200).collect::<String>()
        );
    }

    #[test]
    fn absurd_sizes_in_a_heartbeat_make_a_full_host_not_a_panic() {
        let mut inv = Inventory::default();
        let huge = VmInfo {
            memory: u64::MAX,
            accel_memory: 4096,
            ..vm("v", VmState::Running)
        };
        let other = VmInfo {
            accel_memory: u64::MAX,
            ..vm("w", VmState::Running)
        };
        inv.apply_heartbeat3(beat("a", vec![huge, other]), 1);
        let load = inv.load(&inv.hosts["a"]);
        assert_eq!((load.memory_free, load.accel_free), (0, 0));
        let need = Need::of_vm(&inv.vms["v"].info);
        assert_eq!(need.memory, u64::MAX);
    }

    #[test]
    fn room_counts_live_vms_and_reservations_only() {
        let mut inv = Inventory::default();
        let ended = VmState::Exited { code: 0 };
        inv.apply_heartbeat3(
            beat("a", vec![vm("v", VmState::Running), vm("w", ended)]),
            1,
        );
        inv.reservations.push(Reservation {
            hold: Hold::new(),
            host: "a".into(),
            vm: "x".into(),
            accel: 256 << 20,
            memory: 512 << 20,
        });
        let load = inv.load(&inv.hosts["a"]);
        assert_eq!(load.accel_used, (512 + 256) << 20);
        assert_eq!(load.accel_free, (2048 - 768) << 20);
        assert_eq!(load.memory_free, (4096 - 768 - 512) << 20);
        assert_eq!(load.accel_slots, 1.0);
    }

    #[test]
    fn a_delta_beat_changes_only_what_it_lists_and_one_on_an_unknown_base_is_refused() {
        let mut inv = Inventory::default();
        let mut series = ferry_api::BeatSeries::new(7);
        let vms = vec![vm("v", VmState::Running), vm("w", VmState::Running)];
        let full = series.beat("http://a".into(), host_info("a"), vms.clone());
        assert!(full.delta.is_none(), "the first beat is full");
        let (outcome, changes) = inv.apply_heartbeat3(full, 1);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert_eq!(changes.vms.len(), 2);
        series.answered(Some(&ferry_api::BeatAnswer::taken()));

        // Steady: uptime counts on and the load wobbles; nothing is news.
        let mut steady = vms.clone();
        steady[0].uptime_ms += 1000;
        steady[1].accel_load += 0.01;
        let beat = series.beat("http://a".into(), host_info("a"), steady);
        assert!(beat.vms.is_empty() && beat.delta.is_some());
        let (outcome, changes) = inv.apply_heartbeat3(beat, 2);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert!(changes.vms.is_empty() && !changes.host, "nothing to write");
        series.answered(Some(&ferry_api::BeatAnswer::taken()));

        // w ends, v goes away.
        let beat = series.beat(
            "http://a".into(),
            host_info("a"),
            vec![vm("w", VmState::Exited { code: 0 })],
        );
        assert_eq!(beat.vms.len(), 1);
        assert_eq!(beat.delta.as_ref().unwrap().removed, vec!["v".to_string()]);
        let (_, changes) = inv.apply_heartbeat3(beat.clone(), 3);
        assert_eq!(changes.gone, vec!["v".to_string()]);
        assert_eq!(inv.vms()["w"].info.state, VmState::Exited { code: 0 });
        assert_eq!(inv.vms_on("a").count(), 1);

        // The same delta again builds on a base the inventory no longer holds.
        let (outcome, _) = inv.apply_heartbeat3(beat, 4);
        assert_eq!(outcome, BeatOutcome::NeedFull);
        // So does any delta after a restart (an empty inventory).
        let mut fresh = Inventory::default();
        let next = series.beat("http://a".into(), host_info("a"), vec![]);
        assert_eq!(fresh.apply_heartbeat3(next, 5).0, BeatOutcome::NeedFull);
        series.answered(Some(&ferry_api::BeatAnswer::need_full()));
        let again = series.beat("http://a".into(), host_info("a"), vec![]);
        assert!(
            again.delta.is_none(),
            "a refusal is followed by a full beat"
        );
        assert_eq!(fresh.apply_heartbeat3(again, 6).0, BeatOutcome::Taken);
    }

    #[test]
    fn a_vm_the_center_placed_and_its_host_stopped_before_a_beat_is_not_kept() {
        let mut inv = Inventory::default();
        let mut series = ferry_api::BeatSeries::new(9);
        let full = series.beat("http://b".into(), host_info("b"), vec![]);
        assert_eq!(inv.apply_heartbeat3(full, 1).0, BeatOutcome::Taken);
        series.answered(Some(&ferry_api::BeatAnswer::taken()));
        // The center moves v to b, and v is stopped there before b beats again.
        inv.put_vm_placed(VmRecord {
            id: "v".into(),
            host: "b".into(),
            info: vm("v", VmState::Running),
        });
        let delta = series.beat("http://b".into(), host_info("b"), vec![]);
        assert!(delta.delta.as_ref().is_some_and(|d| d.removed.is_empty()));
        assert_eq!(inv.apply_heartbeat3(delta, 2).0, BeatOutcome::NeedFull);
        series.answered(Some(&ferry_api::BeatAnswer::need_full()));
        let full = series.beat("http://b".into(), host_info("b"), vec![]);
        let (outcome, changes) = inv.apply_heartbeat3(full, 3);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert_eq!(changes.gone, vec!["v".to_string()]);
        assert!(inv.vms().get("v").is_none());
    }

    #[test]
    fn a_full_beat_made_before_a_placement_does_not_drop_the_vm_placed() {
        let mut inv = Inventory::default();
        let mut series = ferry_api::BeatSeries::new(9);
        let full = series.beat("http://b".into(), host_info("b"), vec![]);
        assert_eq!(inv.apply_heartbeat3(full, 1).0, BeatOutcome::Taken);
        series.answered(Some(&ferry_api::BeatAnswer::need_full()));
        // A full beat, made before v's move to b concludes, arrives after it.
        let in_flight = series.beat("http://b".into(), host_info("b"), vec![]);
        assert!(in_flight.delta.is_none());
        inv.put_vm_placed(VmRecord {
            id: "v".into(),
            host: "b".into(),
            info: vm("v", VmState::Running),
        });
        let (outcome, changes) = inv.apply_heartbeat3(in_flight, 2);
        assert_eq!(outcome, BeatOutcome::NeedFull);
        assert!(changes.gone.is_empty());
        assert!(inv.vms().contains_key("v"));
        // The next full beat, made since, lists it.
        series.answered(Some(&ferry_api::BeatAnswer::need_full()));
        let full = series.beat(
            "http://b".into(),
            host_info("b"),
            vec![vm("v", VmState::Running)],
        );
        let (outcome, changes) = inv.apply_heartbeat3(full, 3);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert!(changes.gone.is_empty());
        assert!(inv.vms().contains_key("v"));
    }

    #[test]
    fn a_vm_moving_between_hosts_is_indexed_under_its_new_host_only() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("b", vec![]), 1);
        let moving = VmState::Migrating {
            to: "b:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", moving)]), 1);
        inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 2);
        assert_eq!(inv.vms_on("a").count(), 0);
        assert_eq!(inv.vms_on("b").count(), 1);
        // a's next full beat no longer lists it: that is not news about b's VM.
        let (_, changes) = inv.apply_heartbeat3(beat("a", vec![]), 3);
        assert!(changes.gone.is_empty());
        assert!(inv.vms().contains_key("v"));
    }

    #[test]
    fn a_second_live_host_with_a_taken_name_is_refused_until_the_first_is_down() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1_000);
        let mut impostor = beat("a", vec![]);
        impostor.api_url = "http://10.0.0.9:7070".into();
        let (outcome, changes) = inv.apply_heartbeat3(impostor.clone(), 2_000);
        assert_eq!(
            outcome,
            BeatOutcome::NameTaken {
                holder: "http://a".into()
            }
        );
        assert!(
            changes.gone.is_empty() && inv.vms().contains_key("v"),
            "nothing changed"
        );
        // Once the holder has been silent past the limit, the name is free again.
        let (outcome, _) = inv.apply_heartbeat3(impostor, 7_000);
        assert_eq!(outcome, BeatOutcome::Taken);
    }

    #[test]
    fn a_host_takes_another_live_hosts_vm_only_with_evidence_of_a_move_to_it() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("c", vec![]), 1_000);
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1_000);
        // b's word alone: a holds v live and is up, so b's report is skipped.
        let (_, changes) = inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 1_500);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "a");
        // a moving v to another host (c) is no evidence for b either.
        let to_c = VmState::Migrating {
            to: "c:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", to_c)]), 2_000);
        let (_, changes) = inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 2_000);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "a");
        // a in doubt about a move to b: b's report is the one kept.
        let doubt = VmState::InDoubt {
            to: "b:7000".into(),
            reason: "link cut".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", doubt)]), 3_000);
        let (_, changes) = inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 3_000);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["v"].host, "b");
        // c's word against b, up: skipped; once b is silent past the limit, taken.
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", VmState::Running)]), 4_000);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "b");
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", VmState::Running)]), 9_000);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["v"].host, "c");
    }

    #[test]
    fn a_host_reporting_another_hosts_migration_address_takes_none_of_its_moves() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("c", vec![]), 1_000);
        let to_c = VmState::Migrating {
            to: "c:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", to_c)]), 1_000);
        // b says it has c's migration address, and that it runs v.
        let mut copy = beat("b", vec![vm("v", VmState::Running)]);
        copy.host.migration_addr = "c:7000".into();
        let (outcome, changes) = inv.apply_heartbeat3(copy, 1_500);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "a");
        // While both are up, the address names neither: c waits too.
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", VmState::Running)]), 2_000);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "a");
        // Once b is silent past the limit, c is the host at the address.
        inv.apply_heartbeat3(
            beat(
                "a",
                vec![vm(
                    "v",
                    VmState::Switchover {
                        to: "c:7000".into(),
                    },
                )],
            ),
            7_000,
        );
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", VmState::Running)]), 7_000);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["v"].host, "c");
    }

    #[test]
    fn a_vm_moved_away_is_taken_by_the_host_it_went_to_and_no_other() {
        let mut inv = Inventory::default();
        for host in ["b", "c", "d"] {
            inv.apply_heartbeat3(beat(host, vec![]), 1_000);
        }
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1_000);
        let to_c = VmState::Migrating {
            to: "c:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", to_c)]), 1_100);
        // c moves v on to d before a has said its move to c ended: c's word that v went
        // on is kept for later (sent again), and so is d's report.
        let on_to_d = VmState::MigratedAway {
            to: "d:7000".into(),
        };
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", on_to_d.clone())]), 1_200);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        let (_, changes) = inv.apply_heartbeat3(beat("d", vec![vm("v", VmState::Running)]), 1_200);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        let away = VmState::MigratedAway {
            to: "c:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", away)]), 1_300);
        // a moved v to c: b's word that it runs v is not taken.
        let (_, changes) = inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 1_400);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "a");
        // c's, then d's, sent again, are.
        let (_, changes) = inv.apply_heartbeat3(beat("c", vec![vm("v", on_to_d)]), 1_500);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["v"].host, "c");
        let (_, changes) = inv.apply_heartbeat3(beat("d", vec![vm("v", VmState::Running)]), 1_500);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["v"].host, "d");
        // A VM moved to an address no host up has is any host's that reports it live.
        let gone_to = VmState::MigratedAway {
            to: "x:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("w", VmState::Running)]), 1_600);
        inv.apply_heartbeat3(beat("a", vec![vm("w", gone_to)]), 1_700);
        let (_, changes) = inv.apply_heartbeat3(beat("b", vec![vm("w", VmState::Running)]), 1_800);
        assert!(changes.skipped.is_empty());
        assert_eq!(inv.vms()["w"].host, "b");
    }

    #[test]
    fn the_creates_a_host_lists_push_out_neither_the_centers_nor_another_hosts() {
        let mut inv = Inventory::default();
        inv.create_keys.remember("sent-1", "a");
        let mut listing = beat("a", vec![]);
        listing.creating = vec!["listed-1".into()];
        inv.apply_heartbeat3(listing.clone(), 1);
        // b lists ever new keys, more than the center remembers.
        for round in 0..3 {
            let mut junk = beat("b", vec![]);
            junk.creating = (0..MAX_VMS_PER_HOST)
                .map(|i| format!("junk-{round}-{i}"))
                .collect();
            inv.apply_heartbeat3(junk, 2 + round as u64);
        }
        assert_eq!(inv.create_keys.host("sent-1"), Some("a"));
        assert_eq!(inv.create_keys.host("listed-1"), Some("a"));
        assert_eq!(inv.create_keys.host("junk-2-7"), Some("b"));
        assert!(
            inv.create_keys.host("junk-0-7").is_none(),
            "no longer listed"
        );
        // b listing a's key does not take it; once a no longer lists it (its create
        // failed there), it is b's only with b's next beat.
        let mut copy = beat("b", vec![]);
        copy.creating = vec!["listed-1".into()];
        inv.apply_heartbeat3(copy.clone(), 10);
        assert_eq!(inv.create_keys.host("listed-1"), Some("a"));
        inv.apply_heartbeat3(beat("a", vec![]), 11);
        assert!(inv.create_keys.host("listed-1").is_none());
        inv.apply_heartbeat3(copy, 12);
        assert_eq!(inv.create_keys.host("listed-1"), Some("b"));
        // A forgotten host's listing goes with it.
        inv.remove_host("b");
        assert!(inv.create_keys.host("listed-1").is_none());
    }

    #[test]
    fn a_destination_skipped_before_its_sources_beat_is_taken_after_it() {
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("a", vec![vm("v", VmState::Running)]), 1_000);
        // A move shorter than a beat: b reports v before a has said it moved.
        let mut series = ferry_api::BeatSeries::new(5);
        let first = series.beat("http://b".into(), host_info("b"), vec![]);
        assert_eq!(inv.apply_heartbeat3(first, 1_000).0, BeatOutcome::Taken);
        series.answered(Some(&ferry_api::BeatAnswer::taken()));
        let running = vec![vm("v", VmState::Running)];
        let report = series.beat("http://b".into(), host_info("b"), running.clone());
        let (_, changes) = inv.apply_heartbeat3(report, 1_200);
        assert_eq!(inv.vms()["v"].host, "a");
        series.answered(Some(&ferry_api::BeatAnswer {
            skipped: changes.skipped,
            ..ferry_api::BeatAnswer::taken()
        }));
        let away = VmState::MigratedAway {
            to: "b:7000".into(),
        };
        inv.apply_heartbeat3(beat("a", vec![vm("v", away)]), 1_500);
        // b's next delta carries v again, though nothing about it changed.
        let again = series.beat("http://b".into(), host_info("b"), running);
        assert!(again.delta.is_some() && again.vms.len() == 1);
        inv.apply_heartbeat3(again, 2_000);
        assert_eq!(inv.vms()["v"].host, "b");
    }

    #[test]
    fn the_vm_a_key_made_is_found_wherever_its_record_goes_and_forgotten_with_it() {
        let keyed = |id: &str, key: Option<&str>| {
            let mut info = vm(id, VmState::Running);
            info.idempotency_key = key.map(String::from);
            info
        };
        let mut inv = Inventory::default();
        inv.apply_heartbeat3(beat("a", vec![keyed("v", Some("k1")), keyed("w", None)]), 1);
        assert_eq!(inv.vm_created_with("k1").map(|v| v.id.as_str()), Some("v"));
        assert!(inv.vm_created_with("k2").is_none());
        // Moved (its key with it): found on its new host.
        inv.put_vm_placed(VmRecord::new("b", keyed("v", Some("k1"))));
        assert_eq!(
            inv.vm_created_with("k1").map(|v| v.host.as_str()),
            Some("b")
        );
        // A record of it without the key (from a host that predates keys) drops it.
        inv.put_vm(VmRecord::new("b", keyed("v", None)));
        assert!(inv.vm_created_with("k1").is_none());
        // Gone, or its host forgotten: gone with it.
        inv.put_vm(VmRecord::new("b", keyed("v", Some("k1"))));
        inv.remove_vm("v");
        assert!(inv.vm_created_with("k1").is_none());
        inv.put_vm(VmRecord::new("a", keyed("x", Some("k3"))));
        inv.remove_host("a");
        assert!(inv.vm_created_with("k3").is_none());
        // Two records with one key (a VM given another id where it moved to): the live
        // one is found, and the other's going loses neither.
        let mut left = keyed("old", Some("k4"));
        left.state = VmState::MigratedAway {
            to: "c:7000".into(),
        };
        inv.put_vm(VmRecord::new("c", keyed("new", Some("k4"))));
        inv.put_vm(VmRecord::new("b", left));
        assert_eq!(
            inv.vm_created_with("k4").map(|v| v.id.as_str()),
            Some("new")
        );
        inv.remove_vm("old");
        assert_eq!(
            inv.vm_created_with("k4").map(|v| v.id.as_str()),
            Some("new")
        );
    }

    #[test]
    fn a_delayed_beat_is_refused_and_a_skipped_report_in_a_move_is_named() {
        let mut inv = Inventory::default();
        let mut series = ferry_api::BeatSeries::new(3);
        let first = series.beat(
            "http://b".into(),
            host_info("b"),
            vec![vm("v", VmState::Running)],
        );
        let second = series.beat("http://b".into(), host_info("b"), vec![]);
        // The second (full: no answer to the first yet) arrives first; the first, late.
        assert_eq!(inv.apply_heartbeat3(second, 1).0, BeatOutcome::Taken);
        assert_eq!(inv.apply_heartbeat3(first, 2).0, BeatOutcome::NeedFull);
        assert!(inv.vms().is_empty(), "the late beat changed nothing");

        // b runs v; a still reports it in doubt: not kept, but named.
        inv.apply_heartbeat3(beat("b", vec![vm("v", VmState::Running)]), 3);
        let doubt = VmState::InDoubt {
            to: "b".into(),
            reason: "link cut".into(),
        };
        let (_, changes) = inv.apply_heartbeat3(beat("a", vec![vm("v", doubt)]), 4);
        assert_eq!(changes.skipped, vec!["v".to_string()]);
        assert_eq!(inv.vms()["v"].host, "b");
    }
}
