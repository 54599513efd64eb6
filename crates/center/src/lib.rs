//! The Ferry cluster manager (`ferry center serve`): hosts join it with heartbeats; it
//! keeps the inventory in SQLite, places new VMs, empties hosts for maintenance and
//! balances accelerator load, every move a live migration it verifies.
//!
//! - [`inventory`]: what the center knows (hosts, VMs, migrations, events).
//! - [`store`]: the SQLite database it is written through to.
//! - [`placement`] and [`balance`]: where VMs go, as pure functions of the inventory.
//! - [`operations`]: migrations the center orders, maintenance and balancing.
//! - [`api`]: the HTTP/JSON API, the dashboard and `/metrics`.

pub mod api;
pub mod balance;
pub mod etcd;
#[cfg(test)]
mod fake_host;
pub mod gateway;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod operations;
pub mod placement;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_api::VmInfo;
use ferry_api::{BeatAnswer, Heartbeat};
use ferry_api::{CreateVm, HostInfo};
use ferry_client::ApiClient;
use serde::{Deserialize, Serialize};

use inventory::{
    unix_ms, BeatOutcome, Event, HostMode, HostRecord, Inventory, MigrationRecord, VmRecord,
};
use operations::Operation;
use placement::Need;
use store::{EtcdStore, SqliteStore, Store, StoreError};

/// Errors of center operations, each with the HTTP status the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum CenterError {
    /// No such host, VM or operation.
    #[error("{0}")]
    NotFound(String),
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// Not possible in the current state.
    #[error("{0}")]
    Conflict(String),
    /// No host has room.
    #[error("{0}")]
    NoRoom(String),
    /// A host needed for it is down or unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// A host's machine refused the connection to its API: no daemon listens there.
    #[error("{0}")]
    HostRefused(String),
    /// A host refused a request passed on to it for a reason of the request's own (a
    /// 4xx answer): its status and code are the answer's.
    #[error("host {host}: {}: {} (HTTP {})", answer.what, answer.message, answer.status)]
    HostRejected {
        /// The host.
        host: String,
        /// Its answer.
        answer: ferry_client::ApiError,
    },
    /// A heartbeat was refused: what the host reports is out of bounds.
    #[error("heartbeat refused")]
    Heartbeat(#[from] inventory::HeartbeatError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the center keeps its state.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// A SQLite file: one center.
    Sqlite(PathBuf),
    /// An etcd cluster shared by center replicas, one of them the leader.
    Etcd {
        /// Client endpoints (`http://HOST:PORT`).
        endpoints: Vec<String>,
        /// The prefix of every key (several clusters may share one etcd).
        prefix: String,
    },
}

/// How the center runs.
#[derive(Clone)]
pub struct CenterConfig {
    /// Where its state is kept.
    pub store: StoreConfig,
    /// This replica's name (unique among the replicas on one etcd).
    pub name: String,
    /// Where the other replicas and clients reach this one's API (`http://HOST:PORT`):
    /// followers forward writes to the leader there.
    pub advertise_url: String,
    /// Bearer token of operators (API, dashboard, metrics).
    pub token: Vec<u8>,
    /// More operators' tokens, one per line (`TOKEN` or `TOKEN read-only`: enough for
    /// the dashboard and metrics), read again when the file changes.
    pub api_tokens: Option<PathBuf>,
    /// The cluster's shared secret (kept in memory only): hosts authenticate with the
    /// heartbeat key derived from it; the center calls hosts' APIs with the host-API key.
    pub secret: ferry_migrate::Secret,
    /// HTTPS for the API and dashboard, and the CA the hosts' HTTPS APIs are checked
    /// against (none: plain HTTP both ways).
    pub tls: Option<ferry_migrate::TlsConfig>,
    /// A host silent this long is down.
    pub down_after: Duration,
    /// Migrations run at once by maintenance and balancing.
    pub parallel: usize,
    /// Pressure spread above which the cluster is imbalanced.
    pub balance_threshold: f64,
    /// Balance automatically this often (none: only on request).
    pub balance_every: Option<Duration>,
}

/// Every field but the operator token, which a log of the config must not show.
impl std::fmt::Debug for CenterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Taken apart whole: a field added later is not left out unseen.
        let CenterConfig {
            store,
            name,
            advertise_url,
            token: _,
            api_tokens,
            secret,
            tls,
            down_after,
            parallel,
            balance_threshold,
            balance_every,
        } = self;
        f.debug_struct("CenterConfig")
            .field("store", store)
            .field("name", name)
            .field("advertise_url", advertise_url)
            .field("token", &format_args!(".."))
            .field("api_tokens", api_tokens)
            .field("secret", secret)
            .field("tls", tls)
            .field("down_after", down_after)
            .field("parallel", parallel)
            .field("balance_threshold", balance_threshold)
            .field("balance_every", balance_every)
            .finish()
    }
}

/// A request to create a VM through the center.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlaceVm {
    /// The VM.
    #[serde(flatten)]
    pub vm: CreateVm,
    /// Put it on this host instead of letting the center choose.
    #[serde(default)]
    pub host: Option<String>,
}

/// A VM placed by the center: where, and as its host reported it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placed {
    /// Host chosen.
    pub host: String,
    /// The VM.
    pub vm: VmInfo,
}

/// A host the center forgot (`DELETE /v1/hosts/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForgottenHost {
    /// Its name.
    pub host: String,
    /// The VMs recorded on it, forgotten with it.
    pub vms: Vec<String>,
}

/// A host as the API and dashboard show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    /// Name.
    pub name: String,
    /// "up" or "down" (no heartbeat within the limit).
    pub status: String,
    /// "active", "evacuating", "maintenance" or "maintenance-incomplete".
    pub mode: String,
    /// Why maintenance is incomplete.
    pub mode_reason: Option<String>,
    /// Its API.
    pub api_url: String,
    /// Milliseconds since its last heartbeat.
    pub since_heartbeat_ms: u64,
    /// Capacity and load, as of its last heartbeat.
    pub info: HostInfo,
    /// Live VMs the center places on it.
    pub vms: usize,
    /// Balancing pressure (0 idle, 1 full).
    pub pressure: f64,
}

/// A VM as the API and dashboard show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmView {
    /// Id.
    pub id: String,
    /// Host it is on.
    pub host: String,
    /// State; "unreachable" while its host is down.
    pub state: String,
    /// State its host last reported.
    pub last_state: String,
    /// Workload.
    pub workload: String,
    /// Guest RAM, bytes.
    pub memory: u64,
    /// Accelerator memory, bytes.
    pub accel_memory: u64,
    /// Its accelerator's backend kind, if it has an accelerator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_backend: Option<String>,
    /// Accelerator load.
    pub accel_load: f64,
    /// Time on its host, ms.
    pub uptime_ms: u64,
    /// Where it came from, if it moved.
    pub migrated_from: Option<String>,
}

/// The whole cluster at a glance (`GET /v1/cluster`, what the dashboard shows).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    /// Now, ms since the epoch.
    pub now_ms: u64,
    /// Hosts.
    pub hosts: Vec<HostView>,
    /// VMs, at most as many as asked for (`GET /v1/cluster?vms=N`): those not simply
    /// running first.
    pub vms: Vec<VmView>,
    /// VMs known, shown or not.
    #[serde(default)]
    pub vms_total: usize,
    /// VMs running, shown or not.
    #[serde(default)]
    pub vms_running: usize,
    /// Migrations in progress, then the last finished ones, newest first.
    pub migrations: Vec<MigrationRecord>,
    /// Recent operations, newest first.
    pub operations: Vec<Operation>,
    /// Recent events, newest first.
    pub events: Vec<Event>,
    /// The replica that answered.
    #[serde(default)]
    pub replica: String,
    /// The replica that leads (writes and runs operations), if known.
    #[serde(default)]
    pub leader: Option<leader::LeaderInfo>,
    /// Why the store could not be read (etcd without a quorum), if it could not.
    #[serde(default)]
    pub store_error: Option<String>,
}

/// The cluster manager.
pub struct Center {
    config: CenterConfig,
    inventory: Mutex<Inventory>,
    store: Box<dyn Store>,
    /// Leader (the only writer, which runs operations) or follower.
    role: Mutex<leader::Role>,
    /// Counts the terms this replica has led: an operation's threads carry the term
    /// they were started in and stop once it is over, even if this replica leads again.
    term: std::sync::atomic::AtomicU64,
    /// When this replica's lead ends unless the lease is renewed before (none on SQLite:
    /// a single center leads for ever).
    lead_until: Mutex<Option<leader::BootInstant>>,
    /// The store's generation a follower last refreshed at.
    refreshed_at: Mutex<Option<i64>>,
    operations: Mutex<BTreeMap<u64, Operation>>,
    /// Operations being written and those whose record the store does not hold as they
    /// are; taken after `operations` where both are held.
    operation_writes: Mutex<operations::OperationWrites>,
    /// Migrations whose end the store missed (its write failed), to write again: a
    /// later leader would take one for a move still under way, and settle it anew.
    unwritten_migrations: Mutex<BTreeSet<i64>>,
    metrics: metrics::Metrics,
    /// The monitor thread and, on etcd, the election's: each stopped by dropping its
    /// sender ([`Center::shutdown`]).
    monitor: Mutex<Vec<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// The serving gateway's relays.
    gateway: gateway::Gateway,
    /// Clients of the hosts' APIs, by address.
    host_clients: Mutex<std::collections::HashMap<String, Arc<ApiClient>>>,
    /// Hosts whose maintenance mode a request is changing now ([`Center::claim_mode_change`]).
    mode_changes: Mutex<BTreeSet<String>>,
}

/// Host API clients kept before the cache is emptied.
const MAX_HOST_CLIENTS: usize = 10_000;

impl Center {
    /// Opens the store. A center on SQLite leads at once: it loads what the database
    /// holds and resumes the operations that were running. A replica on etcd follows
    /// until [`Center::start_monitor`]'s election makes it the leader.
    pub fn open(config: CenterConfig) -> Result<Arc<Self>, CenterError> {
        let store: Box<dyn Store> = match &config.store {
            StoreConfig::Sqlite(path) => Box::new(SqliteStore::open(path)?),
            StoreConfig::Etcd { endpoints, prefix } => {
                Box::new(EtcdStore::open(endpoints, prefix)?)
            }
        };
        let center = Arc::new(Self {
            config,
            inventory: Mutex::default(),
            store,
            role: Mutex::new(leader::Role::Follower { leader: None }),
            term: std::sync::atomic::AtomicU64::new(0),
            lead_until: Mutex::default(),
            refreshed_at: Mutex::default(),
            operations: Mutex::default(),
            operation_writes: Mutex::default(),
            unwritten_migrations: Mutex::default(),
            metrics: metrics::Metrics::default(),
            monitor: Mutex::default(),
            gateway: gateway::Gateway::default(),
            host_clients: Mutex::default(),
            mode_changes: Mutex::default(),
        });
        if center.store.as_etcd().is_none() {
            center.lead()?;
        } else {
            center.refresh_from_store()?;
        }
        Ok(center)
    }

    /// Takes the lead: loads what the store holds (hosts' modes, VMs it has not heard
    /// of since, migrations, operations) over what heartbeats told this replica, then
    /// resumes the operations that were running.
    pub(crate) fn lead(self: &Arc<Self>) -> Result<(), CenterError> {
        let beats_to_hear = match self.store.as_etcd() {
            Some(_) => inventory::BEATS_TO_HEAR_A_HOST,
            None => 1,
        };
        self.inventory().begin_lead(unix_ms(), beats_to_hear);
        self.adopt(self.store.load()?);
        // This process's first lead is its start (a single center's is at open).
        let first = self.term.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        *self.role.lock().expect("role lock") = leader::Role::Leader;
        let inventory = self.inventory();
        let message = format!(
            "center {} leads ({}) with {} host(s), {} VM(s), {} migration(s) on record",
            self.config.name,
            self.store.describe(),
            inventory.hosts.len(),
            inventory.vms().len(),
            inventory.migrations.len()
        );
        drop(inventory);
        self.record(&[Event::now(
            if first {
                "center-started"
            } else {
                "center-leads"
            },
            message,
        )])?;
        self.prune_store();
        self.resume_operations();
        Ok(())
    }

    /// Deletes the stored migrations and operations older than the oldest this replica
    /// keeps, which no replica would load again: history stored before stores were
    /// pruned, and records whose delete failed or that a late write made again.
    fn prune_store(&self) {
        let migrations_from = self.inventory().migrations.front().map(|m| m.id);
        let operations_from = (self.operations.lock())
            .expect("operations lock")
            .keys()
            .next()
            .copied();
        if let Err(e) = self.store().prune_before(migrations_from, operations_from) {
            tracing::warn!("deleting old migrations and operations from the store: {e}");
        }
    }

    /// Hosts' modes and the VMs of hosts this replica has had no beat from, as stored.
    fn merge_loaded_hosts_and_vms(&self, inventory: &mut Inventory, loaded: &store::Loaded) {
        for host in &loaded.hosts {
            match inventory.hosts.get_mut(&host.name) {
                Some(known) => known.mode = host.mode.clone(),
                None => {
                    inventory.hosts.insert(host.name.clone(), host.clone());
                }
            }
        }
        for vm in &loaded.vms {
            let known = inventory.vms().get(&vm.id).is_some();
            if known {
                continue;
            }
            if inventory.beat_taken_from(&vm.host) {
                // Its host beat here since and does not list it: it went while no
                // replica wrote (or its delete failed). Deleted with the host's next
                // beat, lest every later replica load it as a VM still there.
                inventory.delete_with_next_beat(&vm.host, [vm.id.clone()]);
            } else {
                inventory.put_vm(vm.clone());
            }
        }
    }

    /// A follower's refresh of what only the leader writes: hosts' modes, migrations,
    /// operations; only when the store's generation moved since the last one.
    pub(crate) fn refresh_from_store(&self) -> Result<(), CenterError> {
        let generation = self.store.generation()?;
        if generation.is_some() && *self.refreshed_at.lock().expect("refresh lock") == generation {
            return Ok(());
        }
        let loaded = self.store.load()?;
        *self.refreshed_at.lock().expect("refresh lock") = generation;
        self.drop_forgotten_hosts(&loaded);
        self.adopt(loaded);
        Ok(())
    }

    /// A follower drops the hosts the leader forgot (`ferry host forget`): gone from the
    /// store, unless they beat here (then they have joined again). Not done on taking the
    /// lead: a host the leader knows whose first write failed is missing from the store
    /// too, and is written with its next beat.
    fn drop_forgotten_hosts(&self, loaded: &store::Loaded) {
        let stored: BTreeSet<&str> = loaded.hosts.iter().map(|h| h.name.as_str()).collect();
        let now = unix_ms();
        let mut inventory = self.inventory();
        let forgotten: Vec<String> = (inventory.hosts.keys())
            .filter(|name| !stored.contains(name.as_str()))
            .filter(|name| !inventory.is_up(name, now, self.down_after_ms()))
            .cloned()
            .collect();
        for name in forgotten {
            let _ = inventory.remove_host(&name);
        }
    }

    /// Takes what the store holds over this replica's view: hosts' modes, the VMs of
    /// hosts it has not heard, migrations (counting the finished ones not yet counted)
    /// and operations.
    fn adopt(&self, loaded: store::Loaded) {
        {
            let mut inventory = self.inventory();
            self.merge_loaded_hosts_and_vms(&mut inventory, &loaded);
            // Room held for moves of an earlier lead: its operations are resumed (and
            // hold room again) or concluded from the record.
            inventory.reservations.clear();
            inventory.migrations.clear();
            for m in loaded.migrations {
                if m.state.has_ended() {
                    self.metrics.count_finished(&m);
                }
                // The store loads no more than are kept: nothing is forgotten here (what
                // is stored beyond them goes when this replica leads: `prune_store`).
                let _ = inventory.add_migration(m);
            }
        }
        let mut operations = loaded
            .operations
            .into_iter()
            .map(|op| (op.id, op))
            .collect();
        let _ = operations::keep_newest(&mut operations);
        *self.operations.lock().expect("operations lock") = operations;
        // What is in memory now is what the store holds.
        (self.operation_writes.lock().expect("writes lock"))
            .unwritten
            .clear();
        self.unwritten_migrations
            .lock()
            .expect("unwritten lock")
            .clear();
    }

    /// Where the state is kept, in words.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// Whether this replica leads (a single center on SQLite always does): it has the
    /// role, and its lease has not run out by its own clock.
    pub fn is_leader(&self) -> bool {
        let in_time = self
            .lead_until
            .lock()
            .expect("lead lock")
            .is_none_or(|until| leader::BootInstant::now() < until);
        in_time && matches!(*self.role.lock().expect("role lock"), leader::Role::Leader)
    }

    /// The term this replica leads in, if it leads.
    pub(crate) fn term(&self) -> Option<u64> {
        self.is_leader()
            .then(|| self.term.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The cluster-wide term of this replica's lead, when it leads replicas sharing etcd
    /// (told to hosts in heartbeat answers). Hosts refuse orders of older terms
    /// ([`ferry_api::LEADER_TERM_HEADER`]).
    pub(crate) fn cluster_term(&self) -> Option<ferry_api::LeaderTerm> {
        if !self.is_leader() {
            return None;
        }
        self.store().as_etcd()?.term()
    }

    /// A client for orders to `host`. A replica of a replicated center orders only while
    /// it holds the leadership, and its orders carry that leadership's term: a replica
    /// stepping down (its fence already gone, its role not yet changed), or whose lead ran
    /// out before its renewal came (its fence still there), orders nothing.
    fn order_client(&self, host: &HostRecord) -> Result<ApiClient, CenterError> {
        let client = self.host_client(host)?;
        if self.store().as_etcd().is_none() {
            return Ok(client.as_ref().clone());
        }
        let term = self.cluster_term().ok_or(StoreError::NotLeader)?;
        Ok(client.with_header(ferry_api::LEADER_TERM_HEADER, term.header_value()))
    }

    /// Whether this replica still leads in `term`.
    pub(crate) fn leads_in(&self, term: u64) -> bool {
        self.term() == Some(term)
    }

    /// Renewed: this replica leads until `until` at the latest.
    pub(crate) fn lead_until(&self, until: leader::BootInstant) {
        *self.lead_until.lock().expect("lead lock") = Some(until);
    }

    /// Where the leader is, if this replica follows one it knows.
    pub fn leader(&self) -> Option<leader::LeaderInfo> {
        match &*self.role.lock().expect("role lock") {
            leader::Role::Leader => Some(leader::LeaderInfo {
                name: self.config.name.clone(),
                url: self.config.advertise_url.clone(),
            }),
            leader::Role::Follower { leader } => leader.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CenterConfig {
        &self.config
    }

    fn inventory(&self) -> MutexGuard<'_, Inventory> {
        self.inventory.lock().expect("inventory lock")
    }

    fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub(crate) fn down_after_ms(&self) -> u64 {
        self.config.down_after.as_millis() as u64
    }

    /// Records events (logged too); a follower only logs them (the leader, which takes
    /// the same heartbeats, records them).
    fn record(&self, events: &[Event]) -> Result<(), StoreError> {
        let leads = self.is_leader();
        for e in events {
            tracing::info!(kind = %e.kind, "{}", e.message);
            if leads {
                self.store().add_event(e)?;
            }
        }
        Ok(())
    }

    /// A client of `host`'s API: one per API address, kept, so its connections are
    /// reused (the gateway reads a stream with a request per token).
    fn host_client(&self, host: &HostRecord) -> Result<Arc<ApiClient>, CenterError> {
        self.client_of(&host.api_url)
    }

    /// A kept client of the cluster API at `url` (a host's, or the leader replica's),
    /// with the host-API key as its token and the cluster's roots.
    pub(crate) fn client_of(&self, url: &str) -> Result<Arc<ApiClient>, CenterError> {
        let mut clients = self.host_clients.lock().expect("host clients lock");
        if let Some(client) = clients.get(url) {
            return Ok(client.clone());
        }
        let token = self.config.secret.token(ferry_migrate::Purpose::HostApi);
        let roots = ferry_http::cluster_roots(self.config.tls.as_ref());
        // A bad address is a host's (or a replica's) fault, not the caller's.
        let client = Arc::new(
            ApiClient::with_pool(url, token.as_bytes(), &roots, gateway::MAX_RELAYS).map_err(
                |e| CenterError::Unavailable(format!("cannot call the API at '{url}': {e:#}")),
            )?,
        );
        // Hosts that changed address leave entries: bounded all the same.
        if clients.len() >= MAX_HOST_CLIENTS {
            clients.clear();
        }
        clients.insert(url.to_string(), client.clone());
        Ok(client)
    }

    /// Relays a source host's settle question about an in-doubt switchover to the
    /// destination (found by its migration address), over the destination's API: the
    /// source may not reach the destination's migration port while the center reaches
    /// its API. The destination's own answer is returned (and it fences the session, as
    /// a direct question would), so the center decides nothing it cannot know.
    pub fn settle(
        &self,
        req: &ferry_api::SettleRequest,
    ) -> Result<ferry_migrate::Settlement, CenterError> {
        let host = {
            let inventory = self.inventory();
            let (now, down_after) = (unix_ms(), self.down_after_ms());
            let matching: Vec<&HostRecord> = inventory
                .hosts
                .values()
                .filter(|h| h.info.migration_addr == req.migration_addr)
                .collect();
            let up: Vec<&HostRecord> = matching
                .iter()
                .copied()
                .filter(|h| inventory.is_up(&h.name, now, down_after))
                .collect();
            // A host record left behind (a host renamed, a machine replaced) must not
            // answer for the host that has the address now: with several, only the one
            // up does, and none if that is not one.
            match (matching.as_slice(), up.as_slice()) {
                ([], _) => {
                    return Err(CenterError::NotFound(format!(
                        "no host with migration address {}",
                        req.migration_addr
                    )))
                }
                ([one], _) | (_, [one]) => (*one).clone(),
                (several, _) => {
                    return Err(CenterError::Unavailable(format!(
                        "{} hosts had migration address {} and not one alone is up: cannot tell which to ask",
                        several.len(),
                        req.migration_addr
                    )))
                }
            }
        };
        let asked = self.host_client(&host).and_then(|client| {
            client
                .post(&format!("/v1/settle/{}", req.session), &())
                .map_err(|e| {
                    let why = format!("host {} did not answer: {e:#}", host.name);
                    match e.unreachable() {
                        Some(u) if u.refused => CenterError::HostRefused(why),
                        _ => CenterError::Unavailable(why),
                    }
                })
        });
        match asked {
            Err(e) if self.runs_on_a_third_host(req) => {
                tracing::info!(
                    vm = req.vm.as_deref().unwrap_or_default(),
                    "the destination did not answer a settle question ({e}); the VM runs on another host"
                );
                Ok(ferry_migrate::Settlement::Running)
            }
            asked => asked,
        }
    }

    /// Whether the VM of settle question `req` runs, as its host last reported, on a host
    /// up now that is neither the destination asked about nor the asking source (whose
    /// last beat may predate the doubt, and say running): it moved on from the
    /// destination, which cannot answer (a restarting daemon refuses), and resumed at the
    /// source it would run twice.
    fn runs_on_a_third_host(&self, req: &ferry_api::SettleRequest) -> bool {
        let (Some(id), Some(from)) = (req.vm.as_deref(), req.from.as_deref()) else {
            return false;
        };
        let inventory = self.inventory();
        let Some(record) = inventory.vms().get(id) else {
            return false;
        };
        let elsewhere = record.host != from
            && (inventory.hosts.get(&record.host))
                .is_some_and(|h| h.info.migration_addr != req.migration_addr);
        elsewhere
            && record.info.state.is_running()
            && inventory.is_up(&record.host, unix_ms(), self.down_after_ms())
    }

    /// Takes a host's heartbeat; a delta on a base this center does not hold is refused
    /// (`taken: false`), and the host sends a full beat next.
    pub fn heartbeat(&self, mut beat: Heartbeat) -> Result<BeatAnswer, CenterError> {
        let name = beat.host.name.clone();
        if let Err(e) = inventory::check_heartbeat(&mut beat) {
            return Err(refused_beat(&beat, e));
        }
        let mut inventory = self.inventory();
        if let Err(e) = inventory.check_room(&beat) {
            drop(inventory);
            return Err(refused_beat(&beat, e));
        }
        let (outcome, changes) = inventory.apply_heartbeat(beat, unix_ms(), self.down_after_ms());
        drop(inventory);
        self.metrics.heartbeat(&outcome);
        // The answer gives the host this leader's term, which fences an earlier leader's
        // orders there: only a beat so answered counts as heard in this lead (not one
        // taken while this replica loads the store, before it leads).
        let leader_term = self.cluster_term();
        match outcome {
            BeatOutcome::Taken => {}
            BeatOutcome::NeedFull => {
                return Ok(BeatAnswer {
                    leader_term,
                    ..BeatAnswer::need_full()
                })
            }
            BeatOutcome::NameTaken { holder } => {
                tracing::warn!(
                    "refused a heartbeat as host {name}: a live host at {holder} holds that name"
                );
                return Err(CenterError::Conflict(format!(
                    "host name {name} is held by a live host at {holder}; give this host another --name"
                )));
            }
        }
        let mut inventory = self.inventory();
        if leader_term.is_some() || self.store.as_etcd().is_none() {
            inventory.count_beat_in_lead(&name);
        }
        // Forgotten meanwhile (`ferry host forget`), it has no record to write.
        let host = (changes.host)
            .then(|| inventory.hosts.get(&name).cloned())
            .flatten();
        let vms: Vec<VmRecord> = changes
            .vms
            .iter()
            .filter_map(|id| inventory.vms().get(id).cloned())
            .collect();
        drop(inventory);
        // Followers take beats too (their views stay current); only the leader writes.
        // A write that fails (etcd without a quorum) leaves the beat taken: the view is
        // current, and a next leader hears every host itself.
        if self.is_leader() && (host.is_some() || !vms.is_empty() || !changes.gone.is_empty()) {
            if let Err(e) = self.write_beat(host.as_ref(), &vms, &changes.gone) {
                let mut inventory = self.inventory();
                inventory.rewrite_next_beat(&name);
                inventory.delete_with_next_beat(&name, changes.gone.iter().cloned());
                drop(inventory);
                // One line per 10 s, not one per host per second.
                static LAST_WARNED_MS: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(0);
                let now = unix_ms();
                let last = LAST_WARNED_MS.load(std::sync::atomic::Ordering::Relaxed);
                if now.saturating_sub(last) >= 10_000 {
                    LAST_WARNED_MS.store(now, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!("recording heartbeats (host {name}, and maybe others): {e}");
                }
            }
        }
        if let Err(e) = self.record(&changes.events) {
            tracing::debug!("recording host {name}'s events: {e}");
        }
        Ok(BeatAnswer {
            taken: true,
            skipped: changes.skipped,
            leader_term,
        })
    }

    /// Writes through what a beat changed.
    fn write_beat(
        &self,
        host: Option<&HostRecord>,
        vms: &[VmRecord],
        gone: &[String],
    ) -> Result<(), StoreError> {
        if let Some(host) = host {
            self.store().put_host(host)?;
            self.catch_up_host_write(host)?;
        }
        if !vms.is_empty() || !gone.is_empty() {
            self.store()
                .put_vms(&vms.iter().collect::<Vec<_>>(), gone)?;
        }
        Ok(())
    }

    /// Follows a beat's write of host record `written` with what memory holds now. A mode
    /// change or a forget may have written since the beat's copy was taken; landing after
    /// it, the beat's write undid it in the store, where a leader taking over would load
    /// it (a host out of maintenance, a forgotten host back). The last write to land is
    /// always followed by such a check, so the store ends as memory is.
    fn catch_up_host_write(&self, written: &HostRecord) -> Result<(), StoreError> {
        // A pass for each change that raced with the one before: a few at the most.
        let mut written = written.clone();
        for _ in 0..3 {
            let now = self.inventory().hosts.get(&written.name).cloned();
            match now {
                None => return self.store().forget_host(&written.name, &[]),
                Some(now) if now.mode != written.mode => {
                    self.store().put_host(&now)?;
                    written = now;
                }
                Some(_) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Notes hosts that went down, and writes again the operations and migrations whose
    /// write failed; run periodically by [`Self::start_monitor`].
    pub fn check_hosts(&self) -> Result<(), CenterError> {
        self.rewrite_operations();
        self.rewrite_migrations();
        let events = self
            .inventory()
            .note_down_hosts(unix_ms(), self.down_after_ms());
        self.record(&events)?;
        Ok(())
    }

    /// Starts the thread that notices hosts going down and, if configured, balances
    /// periodically, until [`Center::shutdown`].
    pub fn start_monitor(self: &Arc<Self>) -> std::io::Result<()> {
        let center = self.clone();
        let tick = (self.config.down_after / 4).max(Duration::from_millis(50));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("center-monitor".into())
            .spawn(move || {
                let mut last_balance = std::time::Instant::now();
                while stopped.recv_timeout(tick) == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    match center.check_hosts() {
                        // A replica losing the lead finds out here: not an error.
                        Err(CenterError::Store(StoreError::NotLeader)) | Ok(()) => {}
                        Err(e) => tracing::error!("checking hosts: {e}"),
                    }
                    if let (Some(every), true) = (center.config.balance_every, center.is_leader()) {
                        if last_balance.elapsed() >= every {
                            last_balance = std::time::Instant::now();
                            match center.balance(false) {
                                Ok(out) if !out.plan.moves.is_empty() => {
                                    tracing::info!("periodic balance: {}", out.plan.summary);
                                }
                                Ok(_) => {}
                                Err(e) => tracing::debug!("periodic balance skipped: {e}"),
                            }
                        }
                    }
                }
            })?;
        let mut threads = self.monitor.lock().expect("monitor lock");
        threads.push((stop, thread));
        if self.store.as_etcd().is_some() {
            let center = self.clone();
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("center-election".into())
                .spawn(move || center.run_election(&stopped))?;
            threads.push((stop, thread));
        }
        Ok(())
    }

    /// Stops the monitor thread and waits for it (operations already ordered run on).
    pub fn shutdown(&self) {
        let threads = std::mem::take(&mut *self.monitor.lock().expect("monitor lock"));
        for (stop, thread) in threads {
            drop(stop);
            let _ = thread.join();
        }
    }

    fn host_view(&self, inventory: &Inventory, host: &HostRecord, now: u64) -> HostView {
        let load = inventory.load(host);
        HostView {
            name: host.name.clone(),
            status: if inventory.is_up(&host.name, now, self.down_after_ms()) {
                "up".into()
            } else {
                "down".into()
            },
            mode: host.mode.name().into(),
            mode_reason: match &host.mode {
                HostMode::MaintenanceIncomplete { reason } => Some(reason.clone()),
                _ => None,
            },
            api_url: host.api_url.clone(),
            since_heartbeat_ms: now.saturating_sub(host.last_heartbeat_ms),
            info: host.info.clone(),
            vms: inventory
                .vms_on(&host.name)
                .filter(|vm| vm.is_live())
                .count(),
            pressure: balance::pressure(&load),
        }
    }

    /// Which hosts are up now, to look up per VM.
    fn hosts_up<'a>(
        &self,
        inventory: &'a Inventory,
        now: u64,
    ) -> std::collections::HashMap<&'a str, bool> {
        inventory
            .hosts
            .keys()
            .map(|h| (h.as_str(), inventory.is_up(h, now, self.down_after_ms())))
            .collect()
    }

    fn vm_view(vm: &VmRecord, host_up: bool, now: u64) -> VmView {
        let last_state = vm.info.state.name().to_string();
        VmView {
            id: vm.id.clone(),
            host: vm.host.clone(),
            state: if host_up {
                last_state.clone()
            } else {
                "unreachable".into()
            },
            last_state,
            workload: vm.info.workload.clone(),
            memory: vm.info.memory,
            accel_memory: vm.info.accel_memory,
            accel_backend: vm.info.accel_backend.clone(),
            accel_load: vm.info.accel_load,
            // Beats leave out uptime that only counted on.
            uptime_ms: match vm.info.since_unix_ms {
                0 => vm.info.uptime_ms,
                since => now.saturating_sub(since).max(vm.info.uptime_ms),
            },
            migrated_from: vm.info.migrated_from.clone(),
        }
    }

    /// Views of every VM, by id.
    fn vm_views(&self, inventory: &Inventory, now: u64) -> Vec<VmView> {
        let up = self.hosts_up(inventory, now);
        inventory
            .vms()
            .values()
            .map(|vm| Self::vm_view(vm, up.get(vm.host.as_str()) == Some(&true), now))
            .collect()
    }

    /// Every host.
    pub fn hosts(&self) -> Vec<HostView> {
        let now = unix_ms();
        let inventory = self.inventory();
        inventory
            .hosts
            .values()
            .map(|h| self.host_view(&inventory, h, now))
            .collect()
    }

    /// One host.
    pub fn host(&self, name: &str) -> Result<HostView, CenterError> {
        let now = unix_ms();
        let inventory = self.inventory();
        let host = inventory
            .hosts
            .get(name)
            .ok_or_else(|| CenterError::NotFound(format!("no host named '{name}' has joined")))?;
        Ok(self.host_view(&inventory, host, now))
    }

    /// Every VM.
    pub fn vms(&self) -> Vec<VmView> {
        self.vm_views(&self.inventory(), unix_ms())
    }

    /// The metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// The metrics text for a scrape.
    pub fn metrics_text(&self) -> String {
        let now = unix_ms();
        let states = {
            let inventory = self.inventory();
            let up = self.hosts_up(&inventory, now);
            let mut states = BTreeMap::<String, i64>::new();
            for vm in inventory.vms().values() {
                let state = match up.get(vm.host.as_str()) {
                    Some(true) => vm.info.state.name(),
                    _ => "unreachable",
                };
                *states.entry(state.to_string()).or_default() += 1;
            }
            states
        };
        self.metrics.render(&self.hosts(), &states)
    }

    /// The last [`inventory::MIGRATIONS_KEPT`] migrations, oldest first.
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.inventory().migrations.iter().cloned().collect()
    }

    /// The cluster at a glance, with at most `max_vms` VM rows: those not simply running
    /// first (they need attention), then by id.
    pub fn cluster(&self, max_vms: usize) -> Result<ClusterView, CenterError> {
        let now = unix_ms();
        // Without etcd's quorum the view still answers, from what heartbeats told.
        let (events, store_error) = match self.store().events(30) {
            Ok(events) => (events, None),
            Err(e) => (Vec::new(), Some(ferry_migrate::error_chain(&e))),
        };
        let operations = self.operations(10);
        let inventory = self.inventory();
        let mut migrations: Vec<MigrationRecord> = inventory
            .migrations
            .iter()
            .filter(|m| !m.state.has_ended())
            .cloned()
            .collect();
        migrations.extend(
            inventory
                .migrations
                .iter()
                .rev()
                .filter(|m| m.state.has_ended())
                .take(50)
                .cloned(),
        );
        let view = ClusterView {
            now_ms: now,
            hosts: inventory
                .hosts
                .values()
                .map(|h| self.host_view(&inventory, h, now))
                .collect(),
            vms_total: inventory.vms().len(),
            vms_running: 0,
            vms: Vec::new(),
            migrations,
            operations,
            replica: self.config.name.clone(),
            leader: self.leader(),
            store_error,
            events,
        };
        let mut view = view;
        let up = self.hosts_up(&inventory, now);
        let is_running = |vm: &VmRecord| {
            up.get(vm.host.as_str()) == Some(&true) && vm.info.state == ferry_api::VmState::Running
        };
        let (running, attention): (Vec<&VmRecord>, Vec<&VmRecord>) =
            inventory.vms().values().partition(|vm| is_running(vm));
        view.vms_running = running.len();
        let room = max_vms.saturating_sub(attention.len());
        let mut shown: Vec<&VmRecord> = attention.into_iter().take(max_vms).collect();
        shown.extend(running.into_iter().take(room));
        shown.sort_by(|a, b| a.id.cmp(&b.id));
        view.vms = shown
            .into_iter()
            .map(|vm| Self::vm_view(vm, up.get(vm.host.as_str()) == Some(&true), now))
            .collect();
        drop(inventory);
        Ok(view)
    }

    /// Recent events, newest first.
    pub fn events(&self, n: usize) -> Result<Vec<Event>, CenterError> {
        Ok(self.store().events(n)?)
    }

    /// Creates a VM on the host with the most free accelerator memory (or the one
    /// asked for), and records it.
    ///
    /// Every create goes to its host with an idempotency key (the client's, or one made
    /// here), so an answer lost on the way is asked for again safely. A client's create
    /// sent again with its key is answered with the VM the first one made: found on
    /// record, or asked of the host the first went to.
    pub fn create_vm(&self, req: &PlaceVm) -> Result<Placed, CenterError> {
        self.store().writable()?;
        let mut create = req.vm.clone();
        let key = match create.idempotency_key.clone() {
            Some(key) => {
                ferry_api::check_idempotency_key(&key).map_err(CenterError::BadRequest)?;
                key
            }
            None => ferry_api::fresh_idempotency_key("center"),
        };
        create.idempotency_key = Some(key.clone());
        let need = Need::of(create.memory, create.accel_memory).on(create.backend.as_deref());
        let (host, held) = {
            let mut inventory = self.inventory();
            if let Some(vm) = inventory.vm_created_with(&key) {
                if !vm.info.answers_create(&create) {
                    return Err(CenterError::Conflict(format!(
                        "idempotency key {key} created VM {}, which is not the VM this create asks for",
                        vm.id
                    )));
                }
                return Ok(Placed {
                    host: vm.host.clone(),
                    vm: vm.info.clone(),
                });
            }
            let open = inventory.open_hosts(unix_ms(), self.down_after_ms());
            // Sent again: to the host the first went to, which may have made the VM
            // (its room is taken then, by this very VM: no placement).
            if let Some(first) = inventory.create_keys.host(&key).map(str::to_string) {
                if let Some(asked) = req.host.as_ref().filter(|asked| **asked != first) {
                    return Err(CenterError::Conflict(format!(
                        "a create with idempotency key {key} went to host {first}, not {asked}"
                    )));
                }
                if !open.iter().any(|h| h.name == first) {
                    return Err(CenterError::Unavailable(format!(
                        "a create with idempotency key {key} went to host {first}, which is down or in maintenance now; send it again once the host is back"
                    )));
                }
                *inventory.creating.entry(first.clone()).or_default() += 1;
                // No room held: the first create holds it (or its VM takes it).
                (inventory.hosts[&first].clone(), None)
            } else {
                // A client's key may be a create an earlier leader sent: the host it went
                // to says so in its beats to this leader (the VM, or the create under
                // way), and until every host that may have has, it waits.
                let unheard = match req.vm.idempotency_key {
                    Some(_) => inventory.unheard_hosts(unix_ms(), self.down_after_ms()),
                    None => Vec::new(),
                };
                if let Some(first) = unheard.first() {
                    let others = match unheard.len() - 1 {
                        0 => String::new(),
                        n => format!(" and {n} more"),
                    };
                    return Err(CenterError::Unavailable(format!(
                        "this center took the lead moments ago and has yet to hear from host {first}{others}, which may hold what a create with idempotency key {key} made; send it again in a few seconds"
                    )));
                }
                let (host, held) =
                    Self::place(&mut inventory, open, req.host.as_deref(), &need, &key)?;
                (host, Some(held))
            }
        };
        let creating = Creating {
            center: self,
            host: host.name.clone(),
            held,
        };
        let client = self.order_client(&host)?;
        // Once more if the answer may have been lost: the key makes it safe, and the
        // host then answers with the VM it made, if it did.
        let (answered, asked_again) = match client.post("/v1/vms", &create) {
            Err(e) if e.unanswered() => {
                tracing::warn!(host = %host.name, %key, "asking again for a create whose answer was lost: {e:#}");
                (client.post("/v1/vms", &create), true)
            }
            answered => (answered, false),
        };
        let mut vm: VmInfo = match answered {
            Ok(vm) => vm,
            Err(e) => {
                // Only the host's refusal of the only try says no VM was made: sent
                // again, the create may go to another host. Anything else (an answer
                // lost or unreadable, a create still under way there (503), a VM made
                // with the key (409)) keeps the key to this host.
                let refused =
                    !asked_again && e.api().is_some_and(|a| !matches!(a.status, 409 | 503));
                if refused {
                    self.inventory().create_keys.forget(&key);
                }
                return Err(passed_on(&host.name, e));
            }
        };
        // Made here and moved on since (a create sent again): where it runs now is the
        // destination's record, if the center has it, never this report.
        if matches!(vm.state, ferry_api::VmState::MigratedAway { .. }) {
            let now = (self.inventory().vms().get(&vm.id))
                .filter(|r| r.host != host.name)
                .cloned();
            return Ok(match now {
                Some(record) => Placed {
                    host: record.host,
                    vm: record.info,
                },
                None => Placed {
                    host: host.name,
                    vm,
                },
            });
        }
        // Bounded as its beats are: its next beat would be refused too.
        inventory::check_vm_report(&mut vm).map_err(|e| {
            CenterError::Unavailable(format!(
                "host {} answered the create with a report the center cannot keep: {e}",
                host.name
            ))
        })?;
        let record = VmRecord::new(&host.name, vm.clone());
        let (now, down_after) = (unix_ms(), self.down_after_ms());
        {
            // The VM counts now, its room held no more: in one step, so that nothing
            // placed meanwhile sees the room taken twice.
            let mut inventory = self.inventory();
            // The answer is the host's word alone (every host holds the cluster key): one
            // with the id of a VM another host runs takes that VM's record no more than a
            // beat of it would (the gateway, and a maintenance emptying the other host,
            // would then look for the VM on the wrong one).
            if let Some(other) = (inventory.vms().get(&vm.id))
                .filter(|_| !inventory.claims(&host.name, &vm, now, down_after))
                .map(|known| known.host.clone())
            {
                return Err(CenterError::Unavailable(format!(
                    "host {} answered the create with VM {}, which host {other} runs: not recorded \
                     (stop the one on host {} if it made one)",
                    host.name, vm.id, host.name
                )));
            }
            inventory.put_vm_placed(record.clone());
            creating.release_room(&mut inventory);
        }
        // The VM runs: a failed write is not the create's failure (a client told so
        // would create it again). The host's next beat writes its VMs through.
        let recorded = self.store().put_vms(&[&record], &[]).and_then(|()| {
            self.record(&[Event::now(
                "vm-created",
                format!(
                    "VM {} ({}) placed on host {}",
                    vm.id, vm.workload, host.name
                ),
            )])
        });
        if let Err(e) = recorded {
            tracing::error!(vm = %vm.id, host = %host.name, "recording the created VM: {e}");
            self.inventory().rewrite_next_beat(&host.name);
        }
        Ok(Placed {
            host: host.name,
            vm,
        })
    }

    /// Chooses the host for a new VM that needs `need` among the `open` ones (or takes
    /// the one `asked` for), and counts the VM as being created there under `key`,
    /// holding its room there; returns the host and what the room is held for.
    fn place(
        inventory: &mut Inventory,
        open: Vec<inventory::HostLoad>,
        asked: Option<&str>,
        need: &Need,
        key: &str,
    ) -> Result<(HostRecord, String), CenterError> {
        let candidates = match asked {
            None => open,
            Some(name) => match open.into_iter().find(|h| h.name == name) {
                Some(h) => vec![h],
                None if inventory.hosts.contains_key(name) => {
                    let mode = &inventory.hosts[name].mode;
                    let why = if mode.accepts_vms() {
                        "down (no heartbeat lately)".to_string()
                    } else {
                        format!("in {} mode", mode.name())
                    };
                    // A conflict with the host's state, not a moment's unavailability:
                    // nothing was made, and sent again at once it still would not be.
                    return Err(CenterError::Conflict(format!(
                        "host {name} is {why} and takes no new VMs: ask for another host, or none"
                    )));
                }
                None => {
                    return Err(CenterError::NotFound(format!(
                        "no host named '{name}' has joined"
                    )))
                }
            },
        };
        let name = placement::choose(&candidates, need)
            .map_err(|why| CenterError::NoRoom(format!("cannot place the VM: {why}")))?
            .name
            .clone();
        *inventory.creating.entry(name.clone()).or_default() += 1;
        // Its room is held until its VM counts (or the create fails): creates placed
        // meanwhile see it taken.
        let held = Creating::label(key);
        inventory.reservations.push(inventory::Reservation {
            hold: inventory::Hold::new(),
            host: name.clone(),
            vm: held.clone(),
            accel: need.accel,
            memory: need.memory,
        });
        inventory.create_keys.remember(key, &name);
        Ok((inventory.hosts[&name].clone(), held))
    }

    /// Waits (up to [`CREATE_PATIENCE`]) for the VMs being created on `host` to be
    /// placed or to fail; whether none is left being created.
    fn creations_ended(&self, host: &str) -> bool {
        let started = std::time::Instant::now();
        while self.inventory().creating.get(host).is_some_and(|&n| n > 0) {
            if started.elapsed() > CREATE_PATIENCE {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Claims `host` for a change of its maintenance mode until the claim is dropped.
    /// Entering and leaving maintenance each check the host, then write its mode: they
    /// must not interleave, or a leave checked just before an evacuation began would put
    /// the host back in service in the middle of it.
    fn claim_mode_change(&self, host: &str) -> Result<ModeChange<'_>, CenterError> {
        let mut changing = self.mode_changes.lock().expect("mode changes lock");
        if !changing.insert(host.to_string()) {
            return Err(CenterError::Conflict(format!(
                "host {host}'s maintenance mode is being changed by another request; try again"
            )));
        }
        Ok(ModeChange {
            center: self,
            host: host.to_string(),
        })
    }

    /// Sets a host's maintenance mode and writes it through; if the write fails, the mode
    /// it had stays.
    fn set_mode(&self, host: &str, mode: HostMode) -> Result<(), CenterError> {
        let (record, before) = {
            let mut inventory = self.inventory();
            let record = inventory.hosts.get_mut(host).ok_or_else(|| {
                CenterError::NotFound(format!("no host named '{host}' has joined"))
            })?;
            let before = std::mem::replace(&mut record.mode, mode);
            (record.clone(), before)
        };
        let written = self
            .store()
            .put_host(&record)
            .and_then(|()| self.store().touch());
        if let Err(e) = written {
            // Unless another change came meanwhile.
            if let Some(now) = self.inventory().hosts.get_mut(host) {
                if now.mode == record.mode {
                    now.mode = before;
                }
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// A heartbeat refused for `error`, logged (at most once a second, not once per host per
/// beat): a host whose beats are refused shows as down, and its operator looks here.
fn refused_beat(beat: &Heartbeat, error: inventory::HeartbeatError) -> CenterError {
    static LAST_WARNED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = unix_ms();
    let last = LAST_WARNED_MS.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) >= 1_000 {
        LAST_WARNED_MS.store(now, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "refused a heartbeat of host '{}' ({}): {error}",
            inventory::shown(&beat.host.name),
            inventory::shown(&beat.api_url)
        );
    }
    CenterError::Heartbeat(error)
}

/// A host's failure to answer a request passed on to it: its refusal of the request
/// itself (a 4xx, bar a refusal of the center's own key) as it gave it, so a client does
/// not retry what cannot succeed; anything else (unreachable, failed) as unavailable.
fn passed_on(host: &str, error: ferry_client::ClientError) -> CenterError {
    use ferry_client::ClientError;
    match error {
        // An order of a term older than the host has heard: this replica no longer leads
        // (the request itself was not at fault).
        ClientError::Api(answer) if answer.code.as_deref() == Some("stale_leader") => {
            tracing::warn!(
                "host {host} refused an order of this replica's term: {}",
                answer.message
            );
            CenterError::Store(StoreError::NotLeader)
        }
        ClientError::Api(answer)
            if (400..500).contains(&answer.status) && !matches!(answer.status, 401 | 403) =>
        {
            CenterError::HostRejected {
                host: host.to_string(),
                answer,
            }
        }
        // No room there now: so the client is told, not to retry the same host.
        e @ ClientError::Api(ferry_client::ApiError { status: 507, .. }) => {
            CenterError::NoRoom(format!("host {host}: {e}"))
        }
        e => CenterError::Unavailable(format!("host {host}: {}", ferry_migrate::error_chain(&e))),
    }
}

/// Longest an evacuation waits for the VMs being created on its host (a create's request
/// to the host times out after 60 s, and one whose answer was lost is sent once more).
const CREATE_PATIENCE: Duration = Duration::from_secs(135);

/// A claim on a host's maintenance mode ([`Center::claim_mode_change`]).
struct ModeChange<'a> {
    center: &'a Center,
    host: String,
}

impl Drop for ModeChange<'_> {
    fn drop(&mut self) {
        (self.center.mode_changes.lock())
            .expect("mode changes lock")
            .remove(&self.host);
    }
}

/// A VM being created on `host` ([`Inventory::creating`]) until dropped.
struct Creating<'a> {
    center: &'a Center,
    host: String,
    /// What the room this create holds is held for, if it holds some (one sent again
    /// does not: the first holds it).
    held: Option<String>,
}

impl Creating<'_> {
    /// What the room of a create with idempotency key `key` is held for: no VM id (it
    /// has a space), and this create's own (a key may be sent twice at once).
    fn label(key: &str) -> String {
        static PLACED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PLACED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("(a VM being created with key {key}, #{n})")
    }

    /// Gives back the room this create holds, if it still does.
    fn release_room(&self, inventory: &mut Inventory) {
        if let Some(held) = &self.held {
            (inventory.reservations).retain(|r| !(r.host == self.host && r.vm == *held));
        }
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        let mut inventory = self.center.inventory();
        self.release_room(&mut inventory);
        if let Some(n) = inventory.creating.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inventory.creating.remove(&self.host);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fake_host::{fake_host, Reply};

    /// A center on a fresh SQLite file (removed on drop of the returned guard).
    pub(crate) struct ScratchCenter {
        pub(crate) center: Arc<Center>,
        store: PathBuf,
    }

    /// Center c's configuration on `store`: the operator token `operator`, hosts down
    /// after a minute, no balancing of its own.
    pub(crate) fn test_config(store: StoreConfig) -> CenterConfig {
        CenterConfig {
            store,
            name: "c".into(),
            advertise_url: "http://127.0.0.1:1".into(),
            token: b"operator".to_vec(),
            api_tokens: None,
            secret: ferry_migrate::Secret::new(b"center-test-secret-0123456789abc".to_vec())
                .unwrap(),
            tls: None,
            down_after: Duration::from_secs(60),
            parallel: 1,
            balance_threshold: 0.5,
            balance_every: None,
        }
    }

    #[test]
    fn a_logged_config_shows_neither_the_token_nor_the_secret() {
        let mut config = test_config(StoreConfig::Sqlite("/nonexistent".into()));
        config.token = b"operator-token-0123456789".to_vec();
        let shown = format!("{config:?}");
        let as_bytes = format!("{:?}", config.token);
        assert!(
            !shown.contains("operator-token") && !shown.contains(&as_bytes[1..20]),
            "{shown}"
        );
        assert!(!shown.contains("center-test-secret"), "{shown}");
        assert!(
            shown.contains("advertise_url: \"http://127.0.0.1:1\""),
            "{shown}"
        );
    }

    impl ScratchCenter {
        pub(crate) fn open(tag: &str) -> Self {
            let store = ferry_testdata::scratch_dir("center").join(format!("{tag}.db"));
            let _ = std::fs::remove_file(&store);
            let center = Center::open(test_config(StoreConfig::Sqlite(store.clone()))).unwrap();
            Self { center, store }
        }

        /// Host `name` last beat long ago: its daemon stopped.
        pub(crate) fn silence(&self, name: &str) {
            let mut inventory = self.center.inventory();
            inventory.hosts.get_mut(name).unwrap().last_heartbeat_ms = 0;
        }

        /// How many rows the store's `table` holds.
        pub(crate) fn stored_rows(&self, table: &str) -> i64 {
            let db = rusqlite::Connection::open(&self.store).unwrap();
            db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        }

        /// The store's database file.
        pub(crate) fn store_path(&self) -> &std::path::Path {
            &self.store
        }

        /// Runs `sql` on the store's database, from another connection.
        pub(crate) fn sql(&self, sql: &str) {
            let db = rusqlite::Connection::open(&self.store).unwrap();
            db.execute_batch(sql).unwrap();
        }

        /// The store fails each `write` (`UPDATE ON operations`, `DELETE ON vms`) until
        /// [`Self::heal`]: a disk gone for a while.
        pub(crate) fn fail_writes(&self, write: &str) {
            self.sql(&format!(
                "CREATE TRIGGER down BEFORE {write} BEGIN SELECT RAISE(ABORT, 'the disk is away'); END;"
            ));
        }

        /// Ends [`Self::fail_writes`].
        pub(crate) fn heal(&self) {
            self.sql("DROP TRIGGER down;");
        }

        /// Host `name` reports, its API at `api`, its migration address
        /// `NAME.example:7071`; its record.
        pub(crate) fn report(&self, name: &str, api: std::net::SocketAddr) -> HostRecord {
            let mut beat = inventory::tests::beat(name, Vec::new());
            beat.api_url = format!("http://{api}");
            beat.host.migration_addr = format!("{name}.example:7071");
            self.center.heartbeat(beat).unwrap();
            self.center.inventory().hosts[name].clone()
        }
    }

    impl Drop for ScratchCenter {
        fn drop(&mut self) {
            self.center.shutdown();
            let _ = std::fs::remove_file(&self.store);
        }
    }

    #[test]
    fn an_evacuation_waits_for_a_vm_being_created_on_its_host_and_does_not_call_it_empty() {
        let scratch = ScratchCenter::open("create-evacuate");
        // Host a answers a create after 1 s (a VM booting).
        let vm = serde_json::to_string(&inventory::tests::vm("a-vm1", ferry_api::VmState::Running))
            .unwrap();
        let (addr, _) = fake_host(vec![Reply::Late(Duration::from_secs(1), "201 Created", vm)]);
        scratch.report("a", addr);
        let center = scratch.center.clone();
        let create = std::thread::spawn(move || center.create_vm(&keyed_create("evacuate-1")));
        // The create has picked host a and waits for it.
        while scratch.center.inventory().creating.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let op = scratch.center.enter_maintenance("a").unwrap();
        let placed = create.join().unwrap().unwrap();
        assert_eq!(placed.host, "a");
        let ended = loop {
            let now = scratch.center.operation(op.id).unwrap();
            if now.state != operations::OperationState::Running {
                break now;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            ended.state,
            operations::OperationState::Incomplete,
            "{ended:?}"
        );
        assert!(ended.summary.contains("a-vm1"), "{}", ended.summary);
        assert!(scratch.center.inventory().creating.is_empty());
    }

    #[test]
    fn a_vm_being_created_holds_its_room_until_its_create_ends() {
        let scratch = ScratchCenter::open("create-room");
        let vm = made_with("a-vm1", "room-1");
        let (addr, _) = fake_host(vec![Reply::Late(Duration::from_secs(1), "201 Created", vm)]);
        scratch.report("a", addr);
        let free = |center: &Center| {
            let inventory = center.inventory();
            inventory.load(&inventory.hosts["a"]).memory_free
        };
        let before = free(&scratch.center);
        let center = scratch.center.clone();
        let create = std::thread::spawn(move || center.create_vm(&keyed_create("room-1")));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while scratch.center.inventory().creating.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the create never began"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Another create placed now sees the room taken.
        assert_eq!(free(&scratch.center), before - (256 << 20));
        create.join().unwrap().unwrap();
        assert!(scratch.center.inventory().reservations.is_empty());
    }

    /// A create of a `mlp-train` VM of 256 MiB with idempotency key `key`.
    fn keyed_create(key: &str) -> PlaceVm {
        PlaceVm {
            vm: CreateVm {
                name: None,
                workload: "mlp-train".into(),
                args: Vec::new(),
                memory: 256 << 20,
                accel_memory: 0,
                attach: Vec::new(),
                backend: None,
                idempotency_key: Some(key.into()),
            },
            host: None,
        }
    }

    /// What a host answers a [`keyed_create`] with: VM `id`, made with `key`.
    fn made_with(id: &str, key: &str) -> String {
        let mut vm = inventory::tests::vm(id, ferry_api::VmState::Running);
        (vm.accel_memory, vm.idempotency_key) = (0, Some(key.into()));
        serde_json::to_string(&vm).unwrap()
    }

    #[test]
    fn a_create_whose_answer_was_lost_is_asked_again_with_its_key_and_made_once() {
        let scratch = ScratchCenter::open("create-lost");
        let (addr, requests) = fake_host(vec![
            Reply::Nothing,
            Reply::Json("201 Created", made_with("a-vm1", "job-7")),
        ]);
        scratch.report("a", addr);
        let placed = scratch.center.create_vm(&keyed_create("job-7")).unwrap();
        assert_eq!(
            (placed.host.as_str(), placed.vm.id.as_str()),
            ("a", "a-vm1")
        );
        let requests = requests.join().unwrap();
        assert_eq!(requests.len(), 2, "asked once more");
        assert!(
            (requests.iter()).all(|r| r.contains(r#""idempotency_key":"job-7""#)),
            "{requests:?}"
        );
        // The client's own answer lost, it sends the create again: the VM on record
        // answers it, and no host is asked (none would answer now).
        let again = scratch.center.create_vm(&keyed_create("job-7")).unwrap();
        assert_eq!((again.host.as_str(), again.vm.id.as_str()), ("a", "a-vm1"));
        // The key of another VM is refused, not taken for a new one.
        let mut other = keyed_create("job-7");
        other.vm.memory = 512 << 20;
        let refused = scratch.center.create_vm(&other).unwrap_err();
        assert!(matches!(refused, CenterError::Conflict(_)), "{refused}");
        assert!(scratch.center.inventory().creating.is_empty());
    }

    #[test]
    fn a_create_sent_again_before_its_vm_is_on_record_goes_to_the_host_the_first_went_to() {
        let scratch = ScratchCenter::open("create-again");
        // Host a gets the create, and both answers are lost.
        let (a, to_a) = fake_host(vec![
            Reply::Nothing,
            Reply::Nothing,
            Reply::Json("201 Created", made_with("a-vm1", "job-8")),
        ]);
        scratch.report("a", a);
        let lost = scratch
            .center
            .create_vm(&keyed_create("job-8"))
            .unwrap_err();
        assert!(matches!(lost, CenterError::Unavailable(_)), "{lost}");
        // A host with far more room joins; the client sends the create again.
        let (b, to_b) = fake_host(Vec::<Reply>::new());
        let mut roomy = inventory::tests::beat("b", Vec::new());
        roomy.api_url = format!("http://{b}");
        roomy.host.accel_capacity *= 100;
        roomy.host.memory_capacity *= 100;
        scratch.center.heartbeat(roomy).unwrap();
        let place = scratch.center.inventory().open_hosts(unix_ms(), 60_000);
        let need = Need::of(256 << 20, 0);
        assert_eq!(
            placement::choose(&place, &need).unwrap().name,
            "b",
            "b is the place of a new VM"
        );
        let placed = scratch.center.create_vm(&keyed_create("job-8")).unwrap();
        assert_eq!(
            (placed.host.as_str(), placed.vm.id.as_str()),
            ("a", "a-vm1")
        );
        assert_eq!(to_a.join().unwrap().len(), 3);
        assert!(to_b.join().unwrap().is_empty());
    }

    #[test]
    fn a_create_a_host_refused_is_placed_anew_when_sent_again_with_its_key() {
        let scratch = ScratchCenter::open("create-refused-again");
        let full = r#"{"error":"no room for the VM","code":"no_room"}"#;
        let (a, _) = fake_host(vec![Reply::Json("507 Insufficient Storage", full.into())]);
        scratch.report("a", a);
        let refused = scratch
            .center
            .create_vm(&keyed_create("job-10"))
            .unwrap_err();
        assert!(matches!(refused, CenterError::NoRoom(_)), "{refused}");
        // Host b joins; a, still full, would be asked again if the key held it there.
        let (b, to_b) = fake_host(vec![Reply::Json(
            "201 Created",
            made_with("b-vm1", "job-10"),
        )]);
        scratch.report("b", b);
        scratch.silence("a");
        let placed = scratch.center.create_vm(&keyed_create("job-10")).unwrap();
        assert_eq!(
            (placed.host.as_str(), placed.vm.id.as_str()),
            ("b", "b-vm1")
        );
        assert_eq!(to_b.join().unwrap().len(), 1);
        // An answer that could not be read may have made a VM: the key stays with c.
        let (c, _) = fake_host(vec![Reply::Json("201 Created", "{not json".into())]);
        scratch.report("c", c);
        scratch.silence("b");
        scratch
            .center
            .create_vm(&keyed_create("job-13"))
            .unwrap_err();
        assert_eq!(
            scratch.center.inventory().create_keys.host("job-13"),
            Some("c")
        );
    }

    #[test]
    fn a_new_lead_holds_keyed_creates_until_live_hosts_beat_and_follows_creates_under_way() {
        let scratch = ScratchCenter::open("create-new-lead");
        let (a, to_a) = fake_host(vec![Reply::Json(
            "201 Created",
            made_with("a-vm1", "job-20"),
        )]);
        scratch.report("a", a);
        let (b, to_b) = fake_host(vec![Reply::Json(
            "400 Bad Request",
            r#"{"error":"no workload named no-such-workload","code":"unknown_workload"}"#.into(),
        )]);
        scratch.report("b", b);
        // This process takes the lead again; meanwhile another leader sent a create with
        // key job-20 to a, which is making the VM.
        scratch.center.inventory().begin_lead(unix_ms(), 1);
        let held = scratch
            .center
            .create_vm(&keyed_create("job-20"))
            .unwrap_err();
        assert!(
            matches!(&held, CenterError::Unavailable(why) if why.contains("host a and 1 more")),
            "{held}"
        );
        // A create without a client's key is no earlier leader's: it is sent at once.
        let sent = create_on(&scratch.center, "b").unwrap_err();
        assert!(matches!(sent, CenterError::HostRejected { .. }), "{sent}");
        // a's beat names the create under way: the create sent again goes there, though
        // b has not beaten yet. b's beat naming the key too does not take it from a.
        let beat_with = |host: &str, api: std::net::SocketAddr, creating: &[&str]| {
            let mut beat = inventory::tests::beat(host, Vec::new());
            beat.api_url = format!("http://{api}");
            beat.host.migration_addr = format!("{host}.example:7071");
            beat.creating = creating.iter().map(|k| k.to_string()).collect();
            beat
        };
        scratch
            .center
            .heartbeat(beat_with("a", a, &["job-20"]))
            .unwrap();
        scratch
            .center
            .heartbeat(beat_with("b", b, &["job-20"]))
            .unwrap();
        assert_eq!(
            scratch.center.inventory().create_keys.host("job-20"),
            Some("a")
        );
        let placed = scratch.center.create_vm(&keyed_create("job-20")).unwrap();
        assert_eq!(
            (placed.host.as_str(), placed.vm.id.as_str()),
            ("a", "a-vm1")
        );
        assert_eq!(to_a.join().unwrap().len(), 1);
        assert_eq!(
            to_b.join().unwrap().len(),
            1,
            "only the create without a key"
        );
        assert!(scratch
            .center
            .inventory()
            .unheard_hosts(unix_ms(), 60_000)
            .is_empty());
        // a's beat after the placement on it is refused (made before it, it may not
        // list the VM placed).
        let after = scratch.center.heartbeat(beat_with("a", a, &[])).unwrap();
        assert!(!after.taken);
        // A leader of replicas hears a host in its second beat (the first may predate
        // the host's learning of it); once a live host had time to beat, one down is not
        // waited for.
        scratch.center.inventory().begin_lead(unix_ms(), 2);
        scratch.center.heartbeat(beat_with("a", a, &[])).unwrap();
        let unheard = |now| {
            let inventory = scratch.center.inventory();
            let unheard: Vec<String> = (inventory.unheard_hosts(now, 60_000).iter())
                .map(|h| h.to_string())
                .collect();
            unheard
        };
        assert_eq!(unheard(unix_ms()), ["a", "b"]);
        scratch.center.heartbeat(beat_with("a", a, &[])).unwrap();
        assert_eq!(unheard(unix_ms()), ["b"]);
        scratch.silence("b");
        assert_eq!(
            unheard(unix_ms()),
            ["b"],
            "b may be live with an old record"
        );
        assert!(unheard(unix_ms() + 61_000).is_empty(), "b is down");
        // A key that is no key, named as a create under way, refuses the beat.
        let refused = scratch
            .center
            .heartbeat(beat_with("a", a, &["no spaces"]))
            .unwrap_err();
        assert!(
            matches!(&refused, CenterError::Heartbeat(inventory::HeartbeatError::CreatingKey(k)) if k == "no spaces"),
            "{refused}"
        );
    }

    #[test]
    fn a_repeated_create_answered_with_a_vm_that_moved_on_does_not_record_it_there() {
        let scratch = ScratchCenter::open("create-moved-on");
        // b runs v, made on a with key job-11 (a's answer to the first create was lost).
        let mut on_b = inventory::tests::vm("v", ferry_api::VmState::Running);
        on_b.idempotency_key = Some("job-11".into());
        let (b, _) = fake_host(Vec::<Reply>::new());
        scratch.report("b", b);
        scratch.center.inventory().put_vm(VmRecord::new("b", on_b));
        let mut away = inventory::tests::vm(
            "x",
            ferry_api::VmState::MigratedAway {
                to: "b.example:7071".into(),
            },
        );
        (away.accel_memory, away.idempotency_key) = (0, Some("job-12".into()));
        let answer = serde_json::to_string(&away).unwrap();
        let (a, _) = fake_host(vec![
            Reply::Json("201 Created", answer.clone()),
            Reply::Json("201 Created", answer),
        ]);
        scratch.report("a", a);
        scratch
            .center
            .inventory()
            .create_keys
            .remember("job-12", "a");
        let placed = scratch.center.create_vm(&keyed_create("job-12")).unwrap();
        assert_eq!(placed.vm.state.name(), "migrated-away");
        assert!(
            !scratch.center.inventory().vms().contains_key("x"),
            "a's record of a VM it no longer runs is not kept"
        );
        // Once b's report of x is on record (without the key: b predates keys), the
        // answer is where x runs.
        let on_b = inventory::tests::vm("x", ferry_api::VmState::Running);
        scratch.center.inventory().put_vm(VmRecord::new("b", on_b));
        let placed = scratch.center.create_vm(&keyed_create("job-12")).unwrap();
        assert_eq!(
            (placed.host.as_str(), placed.vm.state.name()),
            ("b", "running")
        );
        assert_eq!(scratch.center.inventory().vms()["x"].host, "b");
        // One on record is answered from the record, wherever it runs now.
        let mut again = keyed_create("job-11");
        again.vm.accel_memory = 512 << 20;
        let found = scratch.center.create_vm(&again).unwrap();
        assert_eq!((found.host.as_str(), found.vm.id.as_str()), ("b", "v"));
    }

    #[test]
    fn a_create_answered_with_the_id_of_a_vm_another_host_runs_does_not_take_its_record() {
        let scratch = ScratchCenter::open("create-foreign-id");
        // b runs v.
        let (b, _) = fake_host(Vec::<Reply>::new());
        scratch.report("b", b);
        let on_b = inventory::tests::vm("v", ferry_api::VmState::Running);
        scratch.center.inventory().put_vm(VmRecord::new("b", on_b));
        // a answers a create with a VM of v's id (a machine reinstalled under its name,
        // its counter of ids lost, say), then with one of its own.
        let (a, _) = fake_host(vec![
            Reply::Json("201 Created", made_with("v", "job-31")),
            Reply::Json("201 Created", made_with("a-vm1", "job-32")),
        ]);
        scratch.report("a", a);
        let on_a = |key: &str| {
            let mut create = keyed_create(key);
            create.host = Some("a".into());
            scratch.center.create_vm(&create)
        };
        let err = on_a("job-31").unwrap_err();
        assert!(
            matches!(&err, CenterError::Unavailable(e) if e.contains("which host b runs")),
            "{err}"
        );
        {
            let inventory = scratch.center.inventory();
            assert_eq!(inventory.vms()["v"].host, "b", "v stays where it runs");
            assert!(inventory.reservations.is_empty(), "no room left held");
        }
        assert_eq!(on_a("job-32").unwrap().host, "a");
        assert_eq!(scratch.center.inventory().vms()["a-vm1"].host, "a");
    }

    /// A host API at the address returned that answers one request with `status` and
    /// JSON `body`.
    fn answering_once(status: &'static str, body: &'static str) -> std::net::SocketAddr {
        fake_host(vec![Reply::Json(status, body.into())]).0
    }

    fn create_on(center: &Center, host: &str) -> Result<Placed, CenterError> {
        center.create_vm(&PlaceVm {
            vm: CreateVm {
                name: None,
                workload: "no-such-workload".into(),
                args: Vec::new(),
                memory: 256 << 20,
                accel_memory: 0,
                attach: Vec::new(),
                backend: None,
                idempotency_key: None,
            },
            host: Some(host.into()),
        })
    }

    #[test]
    fn a_hosts_refusal_of_a_create_is_passed_on_and_its_failure_is_unavailable() {
        use axum::response::IntoResponse;
        let scratch = ScratchCenter::open("create-refused");
        let refusing = answering_once(
            "400 Bad Request",
            r#"{"error":"no workload named no-such-workload","code":"unknown_workload"}"#,
        );
        scratch.report("a", refusing);
        let refused = create_on(&scratch.center, "a").unwrap_err();
        match &refused {
            CenterError::HostRejected { host, answer } => {
                assert_eq!(host, "a");
                assert_eq!(answer.status, 400);
                assert_eq!(answer.code.as_deref(), Some("unknown_workload"));
            }
            other => panic!("{other}"),
        }
        assert_eq!(refused.into_response().status(), 400);
        // A host that fails, or whose address cannot be called, is unavailable: the
        // operator's request was not at fault.
        let failing = answering_once("500 Internal Server Error", r#"{"error":"boom"}"#);
        scratch.report("b", failing);
        let failed = create_on(&scratch.center, "b").unwrap_err();
        assert!(matches!(failed, CenterError::Unavailable(_)), "{failed}");
        // One without room now says so: the client is not told to retry the same host.
        let full = answering_once(
            "507 Insufficient Storage",
            r#"{"error":"no room for 1 GiB","code":"no_room"}"#,
        );
        scratch.report("d", full);
        let no_room = create_on(&scratch.center, "d").unwrap_err();
        assert!(matches!(no_room, CenterError::NoRoom(_)), "{no_room}");
        // A host that heard of a newer leader refuses the order for this replica's
        // term, not for the request: this replica does not lead.
        let fenced = answering_once(
            "409 Conflict",
            r#"{"error":"an order of an older leader's term","code":"stale_leader"}"#,
        );
        scratch.report("c", fenced);
        let stale = create_on(&scratch.center, "c").unwrap_err();
        assert!(
            matches!(stale, CenterError::Store(StoreError::NotLeader)),
            "{stale}"
        );
        assert_eq!(stale.into_response().status(), 503);
        let bad_address = scratch.center.client_of("127.0.0.1:7070").err().unwrap();
        assert_eq!(bad_address.into_response().status(), 503);
    }

    #[test]
    fn a_heartbeat_out_of_bounds_is_refused_and_changes_nothing() {
        use axum::response::IntoResponse;
        use ferry_api::VmState;
        let scratch = ScratchCenter::open("beat-bounds");
        let center = &scratch.center;
        let good =
            || inventory::tests::beat("a", vec![inventory::tests::vm("v", VmState::Running)]);
        let vm_with = |change: &dyn Fn(&mut VmInfo)| {
            let mut beat = good();
            change(&mut beat.vms[0]);
            beat
        };
        let host_with = |change: &dyn Fn(&mut Heartbeat)| {
            let mut beat = good();
            change(&mut beat);
            beat
        };
        let many = |n: usize| (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>();
        let bad = [
            host_with(&|b| b.api_url = "ftp://a:7070".into()),
            host_with(&|b| b.api_url = "a:7070".into()),
            host_with(&|b| b.api_url = "http://a:7070,http://b:7070".into()),
            host_with(&|b| b.api_url = "http://a:7070/v1/vms?x=1".into()),
            host_with(&|b| b.api_url = format!("http://{}.example", "a".repeat(300))),
            host_with(&|b| b.host.version = "1".repeat(257)),
            host_with(&|b| b.host.migration_addr = "m".repeat(257)),
            host_with(&|b| b.host.backends = vec!["cpu".into(); 17]),
            host_with(&|b| b.host.accel_load = f64::INFINITY),
            host_with(&|b| b.host.accel_load = -1.0),
            host_with(&|b| b.host.load_avg = f64::NAN),
            host_with(&|b| {
                b.vms = many(inventory::MAX_VMS_PER_HOST + 1)
                    .iter()
                    .map(|id| inventory::tests::vm(id, VmState::Running))
                    .collect()
            }),
            host_with(&|b| {
                b.delta = Some(ferry_api::BeatDelta {
                    base: 0,
                    removed: many(inventory::MAX_VMS_PER_HOST + 1),
                })
            }),
            host_with(&|b| {
                b.delta = Some(ferry_api::BeatDelta {
                    base: 0,
                    removed: vec!["../hosts/a".into()],
                })
            }),
            vm_with(&|vm| vm.id = "../hosts/a".into()),
            vm_with(&|vm| vm.id = String::new()),
            vm_with(&|vm| vm.name = Some("a b".into())),
            vm_with(&|vm| vm.accel_load = 1e308),
            vm_with(&|vm| vm.accel_load = -0.5),
            vm_with(&|vm| vm.accel_load = f64::NAN),
            vm_with(&|vm| vm.accel_backend = Some("b".repeat(257))),
            vm_with(&|vm| vm.migrated_from = Some("h".repeat(257))),
            vm_with(&|vm| {
                vm.state = VmState::Migrating {
                    to: "m".repeat(257),
                }
            }),
        ];
        for beat in bad {
            let shown = format!("{:.300}", format!("{beat:?}"));
            let refused = center.heartbeat(beat).expect_err(&shown);
            assert!(matches!(refused, CenterError::Heartbeat(_)), "{refused}");
            assert_eq!(refused.into_response().status(), 400, "{shown}");
        }
        assert!(center.inventory().hosts.is_empty());
        assert_eq!(scratch.stored_rows("hosts") + scratch.stored_rows("vms"), 0);
        // In bounds (an IPv6 address, a trailing slash), it is taken; the console tail a
        // host should not have sent is not kept.
        let mut beat = vm_with(&|vm| vm.console_tail = "secret\n".repeat(1000));
        beat.api_url = "https://[::1]:7070/".into();
        center.heartbeat(beat).unwrap();
        assert_eq!(center.inventory().vms()["v"].info.console_tail, "");
        let stored = center.store().load().unwrap().vms;
        assert_eq!(stored[0].info.console_tail, "");
    }

    /// `n` attached files with paths of `path_bytes` bytes.
    fn files(n: usize, path_bytes: usize) -> Vec<ferry_api::FileInfo> {
        (0..n)
            .map(|i| ferry_api::FileInfo {
                name: format!("f{i}"),
                size: 1,
                sha256: "0".repeat(64),
                path: format!("/{}", "p".repeat(path_bytes - 1)).into(),
            })
            .collect()
    }

    #[test]
    fn a_vm_too_large_to_keep_is_kept_trimmed_and_its_host_beats_on() {
        use ferry_api::VmState;
        use inventory::tests::{beat, vm};
        let scratch = ScratchCenter::open("beat-trimmed");
        let center = &scratch.center;
        let with = |id: &str, change: &dyn Fn(&mut VmInfo)| {
            let mut vm = vm(id, VmState::Running);
            change(&mut vm);
            vm
        };
        // What a host boots: 300 short arguments, 63 files with long paths.
        let short_args = vec!["arg".to_string(); 300];
        let vms = vec![
            with("ok", &|_| {}),
            with("many-args", &|vm| vm.args = short_args.clone()),
            with("long-args", &|vm| vm.args = vec!["a".repeat(4096)]),
            with("files", &|vm| {
                vm.args = vec!["kept".into()];
                vm.files = files(63, 4096);
            }),
            with("too-many-files", &|vm| vm.files = files(64, 8)),
            with("workload", &|vm| vm.workload = "w".repeat(4097)),
            with("failed", &|vm| {
                vm.state = VmState::Failed {
                    error: "é".repeat(10_000),
                }
            }),
        ];
        assert!(center.heartbeat(beat("a", vms.clone())).unwrap().taken);
        let kept = |id: &str| center.inventory().vms()[id].info.clone();
        assert_eq!(kept("ok").args, vms[0].args);
        assert_eq!(kept("many-args").args, short_args);
        assert!(kept("long-args").args.is_empty());
        let files_vm = kept("files");
        assert!(files_vm.files.is_empty());
        assert_eq!(files_vm.args, ["kept"]);
        assert_eq!(files_vm.workload, "mlp-train");
        assert!(kept("too-many-files").files.is_empty());
        assert_eq!(kept("workload").workload, "");
        match kept("failed").state {
            VmState::Failed { error } => {
                assert!(error.len() <= inventory::MAX_STATE_TEXT_BYTES, "{error}");
                assert!(error.starts_with("éé") && error.ends_with('…'), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(scratch.stored_rows("vms"), vms.len() as i64);
        // Again, the same: nothing changed, nothing to write.
        let mut again = beat("a", vms);
        inventory::check_heartbeat(&mut again).unwrap();
        let (outcome, changes) = center.inventory().apply_heartbeat(again, unix_ms(), 5_000);
        assert_eq!(outcome, BeatOutcome::Taken);
        assert!(changes.vms.is_empty(), "{:?}", changes.vms);
    }

    #[test]
    fn a_created_vms_report_is_bounded_as_a_beats_is() {
        let scratch = ScratchCenter::open("create-trimmed");
        let mut vm = inventory::tests::vm("a-1", ferry_api::VmState::Running);
        vm.files = files(63, 4096);
        let answer: &'static str = String::leak(serde_json::to_string(&vm).unwrap());
        scratch.report("a", answering_once("200 OK", answer));
        let placed = create_on(&scratch.center, "a").unwrap();
        assert!(placed.vm.files.is_empty());
        assert!(scratch.center.inventory().vms()["a-1"]
            .info
            .files
            .is_empty());
        // A report not to be kept at all: the create is not recorded.
        vm.id = "../hosts/b".into();
        let answer: &'static str = String::leak(serde_json::to_string(&vm).unwrap());
        scratch.report("b", answering_once("200 OK", answer));
        let refused = create_on(&scratch.center, "b").unwrap_err();
        assert!(matches!(refused, CenterError::Unavailable(_)), "{refused}");
        assert_eq!(scratch.center.inventory().vms().len(), 1);
    }

    #[test]
    fn deltas_cannot_record_more_vms_on_a_host_than_the_cap() {
        use ferry_api::{BeatSeries, VmState};
        use inventory::tests::{host_info, vm};
        use inventory::MAX_VMS_PER_HOST;
        let scratch = ScratchCenter::open("vms-per-host");
        let center = &scratch.center;
        let mut series = BeatSeries::new(5);
        let mut beat = |vms: &[VmInfo]| {
            let beat = series.beat("http://a".into(), host_info("a"), vms.to_vec());
            let answer = center.heartbeat(beat);
            series.answered(answer.as_ref().ok());
            answer
        };
        let mut vms: Vec<VmInfo> = (0..MAX_VMS_PER_HOST)
            .map(|i| vm(&format!("v{i}"), VmState::Running))
            .collect();
        assert!(beat(&vms).unwrap().taken);
        // One more, in a delta of one VM.
        vms.push(vm("one-too-many", VmState::Running));
        let refused = beat(&vms).unwrap_err();
        assert!(
            matches!(
                refused,
                CenterError::Heartbeat(inventory::HeartbeatError::TooManyVms { count, .. })
                    if count == MAX_VMS_PER_HOST + 1
            ),
            "{refused:?}"
        );
        assert_eq!(center.inventory().vms_on("a").count(), MAX_VMS_PER_HOST);
        assert!(!center.inventory().vms().contains_key("one-too-many"));
        // One in for one out is taken.
        vms.remove(0);
        assert!(beat(&vms).unwrap().taken);
        assert!(center.inventory().vms().contains_key("one-too-many"));
        assert_eq!(center.inventory().vms_on("a").count(), MAX_VMS_PER_HOST);
    }

    #[test]
    fn a_vm_whose_delete_the_store_missed_is_deleted_with_a_later_beat() {
        use ferry_api::{BeatSeries, VmState};
        use inventory::tests::{host_info, vm};
        let scratch = ScratchCenter::open("unwritten-gone");
        let center = &scratch.center;
        let mut series = BeatSeries::new(6);
        let mut beat = |vms: &[VmInfo]| {
            let beat = series.beat("http://a".into(), host_info("a"), vms.to_vec());
            let answer = center.heartbeat(beat).unwrap();
            series.answered(Some(&answer));
            answer
        };
        assert!(beat(&[vm("v", VmState::Running), vm("w", VmState::Running)]).taken);
        assert_eq!(scratch.stored_rows("vms"), 2);
        // v goes while the store refuses deletes.
        scratch.fail_writes("DELETE ON vms");
        assert!(beat(&[vm("w", VmState::Running)]).taken);
        assert_eq!(scratch.stored_rows("vms"), 2);
        scratch.heal();
        assert!(beat(&[vm("w", VmState::Running)]).taken);
        assert_eq!(scratch.stored_rows("vms"), 1, "v deleted with a later beat");
        // A record the store holds of a VM its host, heard since, no longer lists (it
        // went while no replica wrote): deleted with the host's next beat after a load.
        let stale = VmRecord::new("a", vm("stale", VmState::Running));
        center.store().put_vms(&[&stale], &[]).unwrap();
        let loaded = center.store().load().unwrap();
        center.merge_loaded_hosts_and_vms(&mut center.inventory(), &loaded);
        assert!(!center.inventory().vms().contains_key("stale"));
        assert!(beat(&[vm("w", VmState::Running)]).taken);
        assert_eq!(scratch.stored_rows("vms"), 1, "the stale record deleted");
    }

    /// A center with host a (its API refusing) in `mode`.
    fn host_a_in(tag: &str, mode: HostMode) -> ScratchCenter {
        let scratch = ScratchCenter::open(tag);
        scratch.report("a", ferry_testdata::refusing_addr());
        scratch.center.inventory().hosts.get_mut("a").unwrap().mode = mode;
        scratch
    }

    #[test]
    fn a_host_left_evacuating_by_a_lost_write_can_be_put_back_in_service() {
        // As if the evacuation ended but the write of the host's new mode failed.
        let scratch = host_a_in("stuck-evacuating", HostMode::Evacuating);
        let view = scratch.center.exit_maintenance("a").unwrap();
        assert_eq!(view.mode, "active", "{view:?}");
    }

    #[test]
    fn entering_and_leaving_maintenance_of_a_host_do_not_interleave() {
        let scratch = host_a_in("mode-claim", HostMode::Maintenance);
        // Another request is between its check of host a and its write of a's mode.
        let claim = scratch.center.claim_mode_change("a").unwrap();
        let refused = scratch.center.exit_maintenance("a").unwrap_err();
        assert!(matches!(refused, CenterError::Conflict(_)), "{refused}");
        assert!(scratch.center.enter_maintenance("a").is_err());
        assert_eq!(
            scratch.center.inventory().hosts["a"].mode,
            HostMode::Maintenance
        );
        // Another host is not held up.
        scratch.report("b", ferry_testdata::refusing_addr());
        scratch.center.exit_maintenance("b").unwrap();
        drop(claim);
        let view = scratch.center.exit_maintenance("a").unwrap();
        assert_eq!(view.mode, "active", "{view:?}");
    }

    #[test]
    fn a_beat_written_late_undoes_neither_a_mode_change_nor_a_forget() {
        let scratch = host_a_in("late-beat", HostMode::Active);
        let center = &scratch.center;
        let stored_a = || {
            let hosts = center.store().load().unwrap().hosts;
            hosts.into_iter().find(|h| h.name == "a").map(|h| h.mode)
        };
        // A beat's copy of a's record, taken before the operator's change and written
        // after it.
        let copy = center.inventory().hosts["a"].clone();
        center.set_mode("a", HostMode::Maintenance).unwrap();
        center.write_beat(Some(&copy), &[], &[]).unwrap();
        assert_eq!(stored_a(), Some(HostMode::Maintenance));
        scratch.silence("a");
        center.forget_host("a", false).unwrap();
        center.write_beat(Some(&copy), &[], &[]).unwrap();
        assert_eq!(stored_a(), None);
    }

    #[test]
    fn a_host_is_forgotten_only_once_silent_and_its_vms_with_it_only_when_asked() {
        use ferry_api::VmState;
        let scratch = ScratchCenter::open("forget");
        let center = &scratch.center;
        let vms = vec![inventory::tests::vm("a-vm1", VmState::Running)];
        center.heartbeat(inventory::tests::beat("a", vms)).unwrap();
        assert_eq!(scratch.stored_rows("hosts"), 1);
        assert_eq!(scratch.stored_rows("vms"), 1);
        let refused = center.forget_host("a", true).unwrap_err();
        assert!(refused.to_string().contains("is up"), "{refused}");
        // Its daemon stopped long ago.
        scratch.silence("a");
        let refused = center.forget_host("a", false).unwrap_err();
        assert!(refused.to_string().contains("a-vm1"), "{refused}");
        assert!(center.inventory().hosts.contains_key("a"));
        let forgotten = center.forget_host("a", true).unwrap();
        assert_eq!(forgotten.vms, vec!["a-vm1".to_string()]);
        assert!(center.inventory().hosts.is_empty());
        assert!(center.inventory().vms().is_empty());
        assert_eq!(scratch.stored_rows("hosts"), 0);
        assert_eq!(scratch.stored_rows("vms"), 0);
        assert!(matches!(
            center.forget_host("a", true),
            Err(CenterError::NotFound(_))
        ));
        // Should its daemon come back, it joins again as new.
        center
            .heartbeat(inventory::tests::beat("a", Vec::new()))
            .unwrap();
        assert!(center.inventory().hosts.contains_key("a"));
    }

    #[test]
    fn a_follower_drops_a_host_the_leader_forgot_unless_it_beats_here() {
        let scratch = ScratchCenter::open("forget-follower");
        let center = &scratch.center;
        for name in ["gone", "beating"] {
            center
                .heartbeat(inventory::tests::beat(name, Vec::new()))
                .unwrap();
        }
        scratch.silence("gone");
        // The leader's store no longer has either.
        for name in ["gone", "beating"] {
            center.store().forget_host(name, &[]).unwrap();
        }
        // Taking the lead keeps them (a host whose record was never written is known).
        center.adopt(center.store().load().unwrap());
        assert_eq!(center.inventory().hosts.len(), 2);
        center.refresh_from_store().unwrap();
        let hosts: Vec<String> = center.inventory().hosts.keys().cloned().collect();
        assert_eq!(hosts, vec!["beating".to_string()]);
    }

    #[test]
    fn a_vm_that_moved_on_from_a_destination_that_cannot_answer_is_settled_as_running() {
        let scratch = ScratchCenter::open("settle-moved-on");
        // Host b, the destination, refuses (its daemon restarting); it had moved v on to
        // c, which runs it. Host a, the source, reports v in doubt about its move to b.
        scratch.report("b", ferry_testdata::refusing_addr());
        let mut beat = inventory::tests::beat(
            "c",
            vec![inventory::tests::vm("a-vm1", ferry_api::VmState::Running)],
        );
        beat.host.migration_addr = "c.example:7071".into();
        scratch.center.heartbeat(beat).unwrap();
        let question = |vm: Option<&str>| ferry_api::SettleRequest {
            migration_addr: "b.example:7071".into(),
            session: 7,
            vm: vm.map(String::from),
            from: Some("a".into()),
        };
        let answer = scratch.center.settle(&question(Some("a-vm1"))).unwrap();
        assert_eq!(answer, ferry_migrate::Settlement::Running);
        // Asked by c, which holds the record, the record is no evidence of a third host.
        let from_c = ferry_api::SettleRequest {
            from: Some("c".into()),
            ..question(Some("a-vm1"))
        };
        let answer = scratch.center.settle(&from_c).unwrap_err();
        assert!(matches!(answer, CenterError::HostRefused(_)), "{answer}");
        // The source's own last beat, from before the doubt, says its VM a-vm2 migrates:
        // b's silence is all the center knows of it.
        let migrating = ferry_api::VmState::Migrating {
            to: "b.example:7071".into(),
        };
        let mut beat = inventory::tests::beat("a", vec![inventory::tests::vm("a-vm2", migrating)]);
        beat.host.migration_addr = "a.example:7071".into();
        scratch.center.heartbeat(beat).unwrap();
        let answer = scratch.center.settle(&question(Some("a-vm2"))).unwrap_err();
        assert!(matches!(answer, CenterError::HostRefused(_)), "{answer}");
        // Without the VM named, or for a VM not running elsewhere, b's silence is all
        // the center knows.
        for vm in [None, Some("a-vm2"), Some("../x")] {
            let answer = scratch.center.settle(&question(vm)).unwrap_err();
            assert!(
                matches!(answer, CenterError::HostRefused(_)),
                "{vm:?}: {answer}"
            );
        }
        // Nor once c is down: it may no longer run it.
        scratch.silence("c");
        let answer = scratch.center.settle(&question(Some("a-vm1"))).unwrap_err();
        assert!(matches!(answer, CenterError::HostRefused(_)), "{answer}");
    }

    #[test]
    fn a_settle_question_says_whether_the_destinations_machine_refused_the_center() {
        let scratch = ScratchCenter::open("settle");
        // Host b's API: a port nothing listens on; host c's takes and drops.
        let closed_addr = ferry_testdata::refusing_addr();
        let silent_addr = ferry_testdata::dropping_addr(1);
        for (host, api, refused) in [("b", closed_addr, true), ("c", silent_addr, false)] {
            scratch.report(host, api);
            let question = ferry_api::SettleRequest {
                migration_addr: format!("{host}.example:7071"),
                session: 7,
                vm: None,
                from: None,
            };
            let answer = scratch.center.settle(&question).unwrap_err();
            assert_eq!(
                matches!(answer, CenterError::HostRefused(_)),
                refused,
                "{answer}"
            );
            assert!(answer
                .to_string()
                .contains(&format!("host {host} did not answer")));
        }
        // Host b's machine was replaced: the new one, up, has b's migration address, and
        // b's record (down now) must not answer for it.
        let mut beat = inventory::tests::beat("b2", Vec::new());
        beat.api_url = format!("http://{}", ferry_testdata::dropping_addr(1));
        beat.host.migration_addr = "b.example:7071".into();
        scratch.center.heartbeat(beat).unwrap();
        let set_last_beat = |ms| {
            scratch
                .center
                .inventory()
                .hosts
                .get_mut("b")
                .unwrap()
                .last_heartbeat_ms = ms;
        };
        set_last_beat(0);
        let question = ferry_api::SettleRequest {
            migration_addr: "b.example:7071".into(),
            session: 7,
            vm: None,
            from: None,
        };
        let answer = scratch.center.settle(&question).unwrap_err();
        assert!(matches!(answer, CenterError::Unavailable(_)), "{answer}");
        assert!(
            answer.to_string().contains("host b2 did not answer"),
            "{answer}"
        );
        // Two up with one address: neither is asked.
        set_last_beat(unix_ms());
        let answer = scratch.center.settle(&question).unwrap_err();
        assert!(answer.to_string().contains("cannot tell which"), "{answer}");
    }
}
