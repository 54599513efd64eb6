//! Where the center keeps what it knows: hosts, VMs, migration history, operations and
//! events. Every change to the inventory is written through at once, so a restarted
//! center (or the next leader of several) finds what it knew. [`SqliteStore`] is the
//! embedded default for a single center; [`EtcdStore`] is shared by center replicas,
//! and every write it makes is fenced by the writer's leadership.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags};

use crate::etcd::{Compare, Etcd, EtcdError, Op, RangeOptions};
use crate::inventory::{Event, HostRecord, MigrationRecord, VmRecord, MIGRATIONS_KEPT};
use crate::operations::{Operation, OPERATIONS_KEPT};

/// What a store does; both kinds answer the same calls.
pub trait Store: Send + Sync {
    /// Everything stored (the last [`MIGRATIONS_KEPT`] migrations and [`OPERATIONS_KEPT`]
    /// operations).
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Writes a host's record.
    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError>;
    /// Deletes host `name`'s record and the records of its VMs `vms`.
    fn forget_host(&self, name: &str, vms: &[String]) -> Result<(), StoreError>;
    /// Writes VM records and deletes those in `gone`.
    fn put_vms(&self, vms: &[&VmRecord], gone: &[String]) -> Result<(), StoreError>;
    /// Records a new migration and returns its id.
    fn add_migration(&self, record: &MigrationRecord) -> Result<i64, StoreError>;
    /// Rewrites a migration's record.
    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError>;
    /// Deletes the records of migrations the center forgot, which it would never load again.
    fn forget_migrations(&self, ids: &[i64]) -> Result<(), StoreError>;
    /// Writes an operation's record.
    fn put_operation(&self, op: &Operation) -> Result<(), StoreError>;
    /// Deletes the records of operations the center forgot.
    fn forget_operations(&self, ids: &[u64]) -> Result<(), StoreError>;
    /// Deletes the migrations with ids below `migrations_from` and the operations with ids
    /// below `operations_from` (none: nothing of that kind).
    fn prune_before(
        &self,
        migrations_from: Option<i64>,
        operations_from: Option<u64>,
    ) -> Result<(), StoreError>;
    /// Appends an event.
    fn add_event(&self, event: &Event) -> Result<(), StoreError>;
    /// The last `n` events, newest first.
    fn events(&self, n: usize) -> Result<Vec<Event>, StoreError>;
    /// What it is, for the log (`SQLite ferry-center.db`, `etcd http://...`).
    fn describe(&self) -> String;
    /// A number that changes whenever the leader writes what followers refresh (modes,
    /// migrations, operations), so a follower reloads only then; `None`: always reload.
    fn generation(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }
    /// Marks such a change (a host's mode: the other writes mark it themselves).
    fn touch(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether a write would be taken now (the leadership holds and etcd has a quorum):
    /// checked before acting on a host, so nothing is done that cannot be recorded.
    fn writable(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The etcd store, when it is one (leader election needs it).
    fn as_etcd(&self) -> Option<&EtcdStore> {
        None
    }
}

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (not a `#[source]`: its message is already in this one, and a
    /// chain would print it twice).
    #[error("center database: {0}")]
    Sqlite(rusqlite::Error),
    /// The database file's folder is missing and could not be created.
    #[error("cannot create the center database's folder {folder}: {error}")]
    Folder {
        /// The folder.
        folder: String,
        /// Why.
        error: std::io::Error,
    },
    /// Another center serves the database: both would lead, each hearing only its own
    /// hosts' beats, and record the other's hosts as down.
    #[error("the center database {path} is in use by another ferry center: stop that one, or give this one a --db of its own")]
    InUse {
        /// The database.
        path: String,
    },
    /// The database's lock file could not be opened or locked.
    #[error("cannot {what} the center database's lock file {lock}: {error}")]
    Lock {
        /// What was being done.
        what: &'static str,
        /// The lock file.
        lock: String,
        /// Why.
        error: std::io::Error,
    },
    /// A stored record could not be read back.
    #[error("center database: a stored {what} is unreadable: {error}")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Why.
        error: serde_json::Error,
    },
    /// The database was written by a newer Ferry (its schema version is past this one's):
    /// this one would drop what it cannot read from every record it rewrites.
    #[error("the center database {path} has schema version {found}, newer than this ferry's {supported}: run a newer ferry center on it")]
    NewerSchema {
        /// The database.
        path: String,
        /// Its schema version.
        found: i64,
        /// The newest this build reads.
        supported: i64,
    },
    /// etcd failed or refused (without a quorum it refuses every write).
    #[error("the cluster store (etcd) failed")]
    Etcd(#[from] EtcdError),
    /// This center is not (or no longer) the leader: its writes are refused.
    #[error("this center replica is not (or no longer) the leader; only the leader writes, and this write was refused")]
    NotLeader,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

/// Schema version kept in `PRAGMA user_version` (2 added operations).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
";

/// The SQLite database of a single center.
pub struct SqliteStore {
    /// A read-only connection to the same WAL database, so that reads (the dashboard's
    /// events, say) never queue behind a write or its checkpoint's fsync on `db`'s lock;
    /// `None` where the database is not in WAL mode or has no file (`:memory:`: a second
    /// connection would open another, empty database). Declared first to be closed
    /// first: the last connection to close checkpoints the WAL and removes its files,
    /// which a read-only one cannot.
    reader: Option<Mutex<Connection>>,
    /// The connection that writes (and reads, when there is no `reader`).
    db: Mutex<Connection>,
    /// The locked `<database>.lock` that keeps other centers out for the store's life;
    /// `None` in memory. Declared after the connections to be let go after them: a
    /// center started next opens a database the last one has finished with.
    _lock: Option<File>,
    path: String,
}

/// Everything stored, as loaded at start.
#[derive(Default)]
pub struct Loaded {
    /// Hosts.
    pub hosts: Vec<HostRecord>,
    /// VMs.
    pub vms: Vec<VmRecord>,
    /// Migrations, oldest first.
    pub migrations: Vec<MigrationRecord>,
    /// Operations, oldest first.
    pub operations: Vec<Operation>,
}

/// Locks `<file>.lock` (the database `file`, named `path` by the user) for one center,
/// or fails if another center holds it. The lock file stays when the lock goes: removing
/// it could let two centers lock two files of that name.
fn hold(file: &Path, path: &Path) -> Result<File, StoreError> {
    let mut lock = file.as_os_str().to_owned();
    lock.push(".lock");
    let lock = Path::new(&lock);
    let failed = |what| {
        move |error| StoreError::Lock {
            what,
            lock: lock.display().to_string(),
            error,
        }
    };
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock)
        .map_err(failed("open"))?;
    match try_lock(&held) {
        Ok(()) => Ok(held),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(StoreError::InUse {
            path: path.display().to_string(),
        }),
        Err(e) => Err(failed("lock")(e)),
    }
}

/// Takes `file`'s exclusive lock, or fails at once if another open file holds it (a
/// host's file store is held the same way).
fn try_lock(file: &File) -> std::io::Result<()> {
    // (`File::try_lock` came in Rust 1.89, after this workspace's 1.88.)
    // SAFETY: the descriptor is `file`'s; flock touches no memory of ours.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt { what, error })
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("inventory records serialize")
}

impl SqliteStore {
    /// Opens (or creates, with its folder) the database at `path`; `:memory:` keeps it
    /// in memory.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(|error| StoreError::Folder {
                folder: folder.display().to_string(),
                error,
            })?;
        }
        let db = Connection::open(path)?;
        // Taken before the first write. The file SQLite opened (absolute, whatever the
        // spelling of `path`); `Some("")`: in memory, where no other center can reach;
        // `None`: a name it gives back in no UTF-8, so `path` itself.
        let lock = match db.path() {
            Some("") => None,
            Some(file) => Some(hold(Path::new(file), path)?),
            None => Some(hold(path, path)?),
        };
        // Before anything is written: `user_version` is set to this build's below.
        let found: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.display().to_string(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        // WAL: heartbeats write often; readers on a connection of their own never wait
        // for them. An in-memory database answers `memory` and stays so.
        let mode: String =
            db.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // The file the writer opened (absolute); none for a temporary or in-memory one.
        let file = db.path().filter(|file| !file.is_empty());
        let reader = match file {
            Some(file) if mode.eq_ignore_ascii_case("wal") => {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                Some(Mutex::new(Connection::open_with_flags(file, flags)?))
            }
            _ => None,
        };
        Ok(Self {
            db: Mutex::new(db),
            reader,
            _lock: lock,
            path: path.display().to_string(),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection for reads: the reader's, else the writer's.
    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        match &self.reader {
            Some(reader) => reader.lock().unwrap_or_else(|e| e.into_inner()),
            None => self.db(),
        }
    }

    /// Runs `delete` (one `?1`) for each of `ids`, in one transaction.
    fn delete_ids(&self, delete: &str, ids: impl Iterator<Item = i64>) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for id in ids {
            tx.execute(delete, params![id])?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let db = self.reader();
        // One read transaction: the tables as of one moment, not a write between two.
        let db = db.unchecked_transaction()?;
        let mut loaded = Loaded::default();
        let mut rows = db.prepare("SELECT record FROM hosts ORDER BY name")?;
        for text in rows.query_map([], |r| r.get::<_, String>(0))? {
            loaded.hosts.push(decode("host", &text?)?);
        }
        let mut rows = db.prepare("SELECT record FROM vms ORDER BY id")?;
        for text in rows.query_map([], |r| r.get::<_, String>(0))? {
            loaded.vms.push(decode("VM", &text?)?);
        }
        let mut rows = db.prepare(
            "SELECT id, record FROM (SELECT id, record FROM migrations ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let newest = params![MIGRATIONS_KEPT as i64];
        for row in rows.query_map(newest, |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })? {
            let (id, text) = row?;
            let mut record: MigrationRecord = decode("migration", &text)?;
            record.id = id;
            loaded.migrations.push(record);
        }
        let mut rows = db.prepare(
            "SELECT id, record FROM (SELECT id, record FROM operations ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let newest = params![OPERATIONS_KEPT as i64];
        for row in rows.query_map(newest, |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })? {
            let (id, text) = row?;
            let mut op: Operation = decode("operation", &text)?;
            op.id = operation_id(u64::try_from(id).ok(), &format!("row id {id}"))?;
            loaded.operations.push(op);
        }
        Ok(loaded)
    }

    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO hosts (name, record) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET record = excluded.record",
            params![host.name, encode(host)],
        )?;
        Ok(())
    }

    fn forget_host(&self, name: &str, vms: &[String]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM hosts WHERE name = ?1", params![name])?;
        for id in vms {
            tx.execute("DELETE FROM vms WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_vms(&self, vms: &[&VmRecord], gone: &[String]) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for vm in vms {
            tx.execute(
                "INSERT INTO vms (id, record) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![vm.id, encode(vm)],
            )?;
        }
        for id in gone {
            tx.execute("DELETE FROM vms WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn add_migration(&self, record: &MigrationRecord) -> Result<i64, StoreError> {
        let db = self.db();
        db.execute(
            "INSERT INTO migrations (record) VALUES (?1)",
            params![encode(record)],
        )?;
        Ok(db.last_insert_rowid())
    }

    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE migrations SET record = ?2 WHERE id = ?1",
            params![record.id, encode(record)],
        )?;
        Ok(())
    }

    fn forget_migrations(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.delete_ids("DELETE FROM migrations WHERE id = ?1", ids.iter().copied())
    }

    fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO operations (id, record) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![op.id as i64, encode(op)],
        )?;
        Ok(())
    }

    fn forget_operations(&self, ids: &[u64]) -> Result<(), StoreError> {
        let ids = ids.iter().map(|&id| id as i64);
        self.delete_ids("DELETE FROM operations WHERE id = ?1", ids)
    }

    fn prune_before(
        &self,
        migrations_from: Option<i64>,
        operations_from: Option<u64>,
    ) -> Result<(), StoreError> {
        let db = self.db();
        if let Some(from) = migrations_from {
            db.execute("DELETE FROM migrations WHERE id < ?1", params![from])?;
        }
        if let Some(from) = operations_from {
            db.execute("DELETE FROM operations WHERE id < ?1", params![from as i64])?;
        }
        Ok(())
    }

    fn add_event(&self, event: &Event) -> Result<(), StoreError> {
        let db = self.db();
        db.execute(
            "INSERT INTO events (at_ms, kind, message) VALUES (?1, ?2, ?3)",
            params![event.at_ms, event.kind, event.message],
        )?;
        // Now and then, events beyond what is kept go, as in etcd: no archive either.
        let id = db.last_insert_rowid();
        if id % 256 == 0 {
            db.execute(
                "DELETE FROM events WHERE at_ms < ?1 OR id <= ?2",
                params![
                    event.at_ms.saturating_sub(EVENTS_KEPT_MS),
                    id - EVENTS_STORED
                ],
            )?;
        }
        Ok(())
    }

    fn events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let db = self.reader();
        let mut rows =
            db.prepare("SELECT at_ms, kind, message FROM events ORDER BY id DESC LIMIT ?1")?;
        let events = rows
            .query_map(params![n as i64], |r| {
                Ok(Event {
                    at_ms: r.get(0)?,
                    kind: r.get(1)?,
                    message: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(events)
    }

    fn describe(&self) -> String {
        format!("SQLite {}", self.path)
    }
}

/// The leadership a writer holds: its leader key, as created. Every write compares it,
/// so a deposed leader (its lease expired while it was paused, say) changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leader key.
    pub key: String,
    /// The revision that created it for this leader.
    pub create_revision: i64,
    /// The etcd cluster's id.
    pub cluster: u64,
}

/// The center's state in etcd, under a key prefix, shared by center replicas.
pub struct EtcdStore {
    etcd: Etcd,
    prefix: String,
    /// The leadership this replica holds, if any: only then does it write.
    fence: Mutex<Option<Fence>>,
}

/// How long a store keeps events.
const EVENTS_KEPT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Most events a store keeps (the API lists at most 10,000).
const EVENTS_STORED: i64 = 100_000;

/// Most events one sweep of etcd deletes for [`EVENTS_STORED`] (their keys are listed,
/// about 50 bytes each): a backlog goes over later sweeps.
const EVENTS_SWEPT: usize = 10_000;

/// Where etcd keeps migrations and operations, each under its id ([`numbered`]).
const MIGRATIONS: &str = "migrations/";
const OPERATIONS: &str = "operations/";

/// The key of record `id` in `dir`: the id zero-padded, so that the keys' order is the
/// ids' (the newest load first, and a range below an id is the older ones).
fn numbered(dir: &str, id: impl std::fmt::Display) -> String {
    format!("{dir}{id:020}")
}

/// Operation ids end below this: they are stored as SQLite's signed integers and as
/// 20-digit keys.
pub const OPERATION_IDS_END: u64 = i64::MAX as u64;

/// An operation's id as where it is stored says (its row's id, its key's number), if
/// that is one: the id in its record is not trusted. A record another center wrote
/// (corrupt, or hostile) could otherwise name the last id (the next would overflow) or
/// another record's (loaded over it).
fn operation_id(stored: Option<u64>, at: &str) -> Result<u64, StoreError> {
    stored
        .filter(|id| (1..OPERATION_IDS_END).contains(id))
        .ok_or_else(|| StoreError::Corrupt {
            what: "operation",
            error: serde::de::Error::custom(format!("{at} is not that of an operation id")),
        })
}

/// The last id the migration counter gave, as stored: a value that is no such id (not
/// a number, negative, or the last i64) is an error, not a count restarted at 1, whose
/// records would overwrite older ones and sort below those a next leader loads.
fn counted(value: &[u8]) -> Result<i64, StoreError> {
    let corrupt = |error| StoreError::Corrupt {
        what: "migration counter",
        error,
    };
    let last: i64 = serde_json::from_slice(value).map_err(corrupt)?;
    if !(0..i64::MAX).contains(&last) {
        return Err(corrupt(serde::de::Error::custom(format!(
            "{last} is no migration id"
        ))));
    }
    Ok(last)
}

/// Most operations in one etcd transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;
/// Records read a request when the store is loaded (hosts, VMs, the newest migrations):
/// a VM's record holds at most its host's 12 KiB report (16 KiB in the gateway's
/// base64), so a page of them stays near 16 MiB, within the 64 MiB a call reads, however
/// large the cluster.
const LOAD_PAGE: i64 = 1000;
/// Operations read a request: an evacuation's record lists a move for each VM of its
/// host (2,048 at most, a few hundred KiB), so fewer a page.
const OPERATIONS_PAGE: i64 = 64;

impl EtcdStore {
    /// A store in the etcd cluster at `endpoints`, under `prefix` (e.g. `/ferry/`).
    pub fn open(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let etcd = Etcd::new(endpoints, std::time::Duration::from_secs(3))?;
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        let store = Self {
            etcd,
            prefix,
            fence: Mutex::new(None),
        };
        // Reachable at all? A clear error at start beats one at the first heartbeat.
        store.etcd.get(&store.key("leader"))?;
        Ok(store)
    }

    /// The etcd client.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// `prefix` + `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Sets (or clears) the leadership this replica's writes are fenced by.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = fence;
    }

    /// Whether this replica holds a leadership to write with.
    pub fn fenced(&self) -> bool {
        self.term().is_some()
    }

    /// The term of the leadership this replica holds, if it holds one.
    pub fn term(&self) -> Option<ferry_api::LeaderTerm> {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| ferry_api::LeaderTerm {
                cluster: f.cluster,
                revision: f.create_revision,
            })
    }

    fn fence(&self) -> Result<Fence, StoreError> {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::NotLeader)
    }

    /// Runs `ops` in transactions fenced by this replica's leadership.
    fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        for chunk in ops.chunks(TXN_OPS) {
            self.write_checked(chunk)?;
        }
        Ok(())
    }

    /// One fenced transaction of `ops` (none: only the check).
    fn write_checked(&self, ops: &[Op]) -> Result<(), StoreError> {
        let fence = self.fence()?;
        let when = [Compare::CreateRevision(fence.key, fence.create_revision)];
        // Puts of fixed values and deletes: the same if run twice.
        if !self.etcd.txn_repeatable(&when, ops, &[])?.succeeded {
            self.set_fence(None);
            return Err(StoreError::NotLeader);
        }
        Ok(())
    }

    /// The write that marks a change followers reload.
    fn bump(&self) -> Op {
        Op::Put {
            key: self.key("generation"),
            value: Vec::new(),
            lease: None,
        }
    }

    fn put_op<T: serde::Serialize>(&self, name: String, value: &T) -> Op {
        Op::Put {
            key: self.key(&name),
            value: encode(value).into_bytes(),
            lease: None,
        }
    }

    /// Writes record `id` of `dir` (migrations, operations), a change followers reload.
    fn put_numbered<T: serde::Serialize>(
        &self,
        dir: &str,
        id: impl std::fmt::Display,
        value: &T,
    ) -> Result<(), StoreError> {
        let put = self.put_op(numbered(dir, id), value);
        self.write(vec![put, self.bump()])
    }

    /// Deletes records `ids` of `dir`.
    fn forget_numbered(&self, dir: &str, ids: &[impl std::fmt::Display]) -> Result<(), StoreError> {
        let delete = |id| Op::Delete(self.key(&numbered(dir, id)));
        self.write(ids.iter().map(delete).collect())
    }

    /// Deletes events but the newest `keep`, at most `at_most` of them (the oldest): an
    /// answer listing a backlog's keys all at once could pass the client's size limit,
    /// and every sweep would fail. Later sweeps delete the rest.
    pub fn keep_newest_events(&self, keep: usize, at_most: usize) -> Result<(), StoreError> {
        let prefix = self.key("events/");
        // Saturating: the count is the server's word.
        let excess = (self.etcd.count(&prefix)?)
            .saturating_sub(keep as i64)
            .min(at_most as i64);
        if excess <= 0 {
            return Ok(());
        }
        // Their keys start with the time: the oldest come first.
        let oldest = RangeOptions {
            limit: excess,
            keys_only: true,
            ..RangeOptions::default()
        };
        let Some(last) = self.etcd.range(&prefix, true, oldest)?.pop() else {
            return Ok(());
        };
        self.write(vec![Op::DeleteRange(prefix, format!("{}\0", last.key))])
    }

    /// Migration records, each with the id its key says, as SQLite's are with their row
    /// id: the oldest loaded is where pruning starts, and an id written inside a record
    /// (corrupt, or hostile) would otherwise delete every record below it.
    fn migrations(&self, newest: usize) -> Result<Vec<MigrationRecord>, StoreError> {
        self.numbered_records(
            "migration",
            MIGRATIONS,
            (newest, LOAD_PAGE),
            |record: &mut MigrationRecord, id, key| {
                record.id = id
                    .and_then(|id| i64::try_from(id).ok())
                    .filter(|&id| id > 0)
                    .ok_or_else(|| StoreError::Corrupt {
                        what: "migration",
                        error: serde::de::Error::custom(format!(
                            "its key {key} is not that of a migration id"
                        )),
                    })?;
                Ok(())
            },
        )
    }

    /// The `newest` operations, the newest first, each with the id of its key.
    fn operations(&self, newest: usize) -> Result<Vec<Operation>, StoreError> {
        self.numbered_records(
            "operation",
            OPERATIONS,
            (newest, OPERATIONS_PAGE),
            |op: &mut Operation, id, key| {
                op.id = operation_id(id, &format!("key {key}"))?;
                Ok(())
            },
        )
    }

    /// The `newest` records under `dir` (keys made by [`numbered`]), the newest first,
    /// `page` a request ([`Etcd::range_newest`]), each given by `with_id` the number its key
    /// names (`None` for a key that names none): the id inside a record is not trusted.
    fn numbered_records<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        dir: &str,
        (newest, page): (usize, i64),
        with_id: impl Fn(&mut T, Option<u64>, &str) -> Result<(), StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let prefix = self.key(dir);
        (self.etcd.range_newest(&prefix, newest, page)?.into_iter())
            .map(|kv| {
                let mut record: T = decode(what, &String::from_utf8_lossy(&kv.value))?;
                let id = (kv.key.strip_prefix(&prefix))
                    .and_then(|id| id.parse::<u64>().ok())
                    .filter(|&id| self.key(&numbered(dir, id)) == kv.key);
                with_id(&mut record, id, &kv.key)?;
                Ok(record)
            })
            .collect()
    }

    fn list<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        dir: &str,
        options: RangeOptions,
    ) -> Result<Vec<T>, StoreError> {
        decode_all(what, self.etcd.range(&self.key(dir), true, options)?)
    }

    /// Whether migration `id` was recorded: the counter at it and the record there.
    fn migration_recorded(&self, counter: &str, id: i64) -> Result<bool, StoreError> {
        let counted_to = match self.etcd.get(counter)? {
            Some(kv) => counted(&kv.value)?,
            None => 0,
        };
        let record = self.key(&numbered(MIGRATIONS, id));
        Ok(counted_to == id && self.etcd.get(&record)?.is_some())
    }

    /// Every record under `dir` ([`Etcd::range_all`]: however many hosts or VMs there
    /// are, no answer outgrows what a call reads).
    fn list_all<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        dir: &str,
    ) -> Result<Vec<T>, StoreError> {
        decode_all(what, self.etcd.range_all(&self.key(dir), LOAD_PAGE)?)
    }
}

/// The records `kvs` hold (`what` names them in errors).
fn decode_all<T: serde::de::DeserializeOwned>(
    what: &'static str,
    kvs: Vec<crate::etcd::KeyValue>,
) -> Result<Vec<T>, StoreError> {
    (kvs.iter())
        .map(|kv| decode(what, &String::from_utf8_lossy(&kv.value)))
        .collect()
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut migrations = self.migrations(MIGRATIONS_KEPT)?;
        migrations.reverse();
        let mut operations = self.operations(OPERATIONS_KEPT)?;
        operations.reverse();
        Ok(Loaded {
            hosts: self.list_all("host", "hosts/")?,
            vms: self.list_all("VM", "vms/")?,
            migrations,
            operations,
        })
    }

    fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.write(vec![self.put_op(format!("hosts/{}", host.name), host)])
    }

    fn forget_host(&self, name: &str, vms: &[String]) -> Result<(), StoreError> {
        // The VMs first, the host last: more than one transaction's worth goes in
        // several, and one that fails part way leaves the host on record with some of its
        // VMs, to forget again, never VMs on record whose host is gone.
        let mut ops: Vec<Op> = vms
            .iter()
            .map(|id| Op::Delete(self.key(&format!("vms/{id}"))))
            .collect();
        ops.push(Op::Delete(self.key(&format!("hosts/{name}"))));
        // Followers drop the host from their views at their next refresh.
        ops.push(self.bump());
        self.write(ops)
    }

    fn put_vms(&self, vms: &[&VmRecord], gone: &[String]) -> Result<(), StoreError> {
        let mut ops: Vec<Op> = vms
            .iter()
            .map(|vm| self.put_op(format!("vms/{}", vm.id), vm))
            .collect();
        ops.extend(
            gone.iter()
                .map(|id| Op::Delete(self.key(&format!("vms/{id}")))),
        );
        self.write(ops)
    }

    fn add_migration(&self, record: &MigrationRecord) -> Result<i64, StoreError> {
        // Ids count up through a counter key, changed only if nobody else changed it.
        let counter = self.key("counters/migrations");
        let fence = self.fence()?;
        for _ in 0..16 {
            let current = self.etcd.get(&counter)?;
            let (last, revision) = match &current {
                Some(kv) => (counted(&kv.value)?, kv.mod_revision),
                None => (0, 0),
            };
            let id = last + 1;
            let mut record = record.clone();
            record.id = id;
            let when = [
                Compare::CreateRevision(fence.key.clone(), fence.create_revision),
                match current {
                    Some(_) => Compare::ModRevision(counter.clone(), revision),
                    None => Compare::CreateRevision(counter.clone(), 0),
                },
            ];
            let then = [
                Op::Put {
                    key: counter.clone(),
                    value: id.to_string().into_bytes(),
                    lease: None,
                },
                self.put_op(numbered(MIGRATIONS, id), &record),
                self.bump(),
            ];
            let outcome = match self.etcd.txn(&when, &then, &[Op::Get(fence.key.clone())]) {
                Ok(outcome) => outcome,
                // Its answer lost, or refused in a way etcd may still have applied (a
                // timeout, a leader change): taken if the counter and the record say so
                // (only this leader writes them, behind its fence). Failed with the record
                // written, the move would never be ordered, and the record would show it
                // running for as long as this leader lives.
                Err(e) => {
                    return match self.migration_recorded(&counter, id) {
                        Ok(true) => Ok(id),
                        _ => Err(e.into()),
                    }
                }
            };
            if outcome.succeeded {
                return Ok(id);
            }
            if outcome
                .read
                .first()
                .is_none_or(|kv| kv.create_revision != fence.create_revision)
            {
                self.set_fence(None);
                return Err(StoreError::NotLeader);
            }
        }
        Err(StoreError::Etcd(EtcdError::Refused {
            call: "txn",
            message: "the migration counter kept changing under this writer".into(),
        }))
    }

    fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError> {
        self.put_numbered(MIGRATIONS, record.id, record)
    }

    fn forget_migrations(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.forget_numbered(MIGRATIONS, ids)
    }

    fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        self.put_numbered(OPERATIONS, op.id, op)
    }

    fn forget_operations(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.forget_numbered(OPERATIONS, ids)
    }

    fn prune_before(
        &self,
        migrations_from: Option<i64>,
        operations_from: Option<u64>,
    ) -> Result<(), StoreError> {
        let below = |dir: &str, from: String| Op::DeleteRange(self.key(dir), self.key(&from));
        let ops: Vec<Op> = [
            migrations_from.map(|from| below(MIGRATIONS, numbered(MIGRATIONS, from))),
            operations_from.map(|from| below(OPERATIONS, numbered(OPERATIONS, from))),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.write(ops)
    }

    fn add_event(&self, event: &Event) -> Result<(), StoreError> {
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        let nonce = u64::from_le_bytes(nonce);
        let name = format!("events/{:013}-{nonce:016x}", event.at_ms);
        let mut ops = vec![self.put_op(name, event)];
        // Now and then, events older than EVENTS_KEPT_MS go, and those beyond the newest
        // EVENTS_STORED: etcd is no archive.
        let sweep = nonce % 256 == 0;
        if sweep {
            let before = event.at_ms.saturating_sub(EVENTS_KEPT_MS);
            ops.push(Op::DeleteRange(
                self.key("events/"),
                self.key(&format!("events/{before:013}")),
            ));
        }
        self.write(ops)?;
        // The event is written: a failed sweep is the next sweep's to finish.
        if sweep {
            if let Err(e) = self.keep_newest_events(EVENTS_STORED as usize, EVENTS_SWEPT) {
                tracing::warn!("deleting the oldest events beyond the newest {EVENTS_STORED}: {e}");
            }
        }
        Ok(())
    }

    fn events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        // A limit of 0 is none to etcd: every stored event, where none were asked for.
        if n == 0 {
            return Ok(Vec::new());
        }
        self.list(
            "event",
            "events/",
            RangeOptions {
                limit: n as i64,
                descending: true,
                ..RangeOptions::default()
            },
        )
    }

    fn describe(&self) -> String {
        format!(
            "etcd {} (keys under {})",
            self.etcd.endpoints(),
            self.prefix
        )
    }

    fn writable(&self) -> Result<(), StoreError> {
        // A transaction with no writes still needs the quorum, and compares the fence.
        self.write_checked(&[])
    }

    fn generation(&self) -> Result<Option<i64>, StoreError> {
        Ok(Some(
            self.etcd
                .get(&self.key("generation"))?
                .map_or(0, |kv| kv.mod_revision),
        ))
    }

    fn touch(&self) -> Result<(), StoreError> {
        self.write(vec![self.bump()])
    }

    fn as_etcd(&self) -> Option<&EtcdStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_drops_events_older_than_it_keeps() {
        let store = SqliteStore::open(Path::new(":memory:")).unwrap();
        let event = |at_ms| Event {
            at_ms,
            kind: "test".into(),
            message: String::new(),
        };
        let now = 30 * 24 * 3600 * 1000;
        for _ in 0..255 {
            store.add_event(&event(1)).unwrap();
        }
        assert_eq!(store.events(1000).unwrap().len(), 255);
        // The 256th event sweeps those older than a week.
        store.add_event(&event(now)).unwrap();
        let left = store.events(1000).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].at_ms, now);
    }

    #[test]
    fn sqlite_reads_do_not_wait_for_a_write_under_way() {
        let scratch = ferry_testdata::scratch_dir("store-reader");
        let store = std::sync::Arc::new(SqliteStore::open(&scratch.join("center.db")).unwrap());
        let event = |message: &str| Event {
            at_ms: 1,
            kind: "test".into(),
            message: message.into(),
        };
        store.add_event(&event("written")).unwrap();
        // A write under way: the writer's connection taken, its transaction open.
        let mut db = store.db();
        let tx = db.transaction().unwrap();
        tx.execute(
            "INSERT INTO events (at_ms, kind, message) VALUES (2, 'test', 'under way')",
            [],
        )
        .unwrap();
        let (sent, got) = std::sync::mpsc::channel();
        let reading = store.clone();
        std::thread::spawn(move || {
            let read = reading.load().and_then(|_| reading.events(10));
            sent.send(read.map(|events| events.into_iter().map(|e| e.message).collect()))
        });
        let read: Result<Vec<String>, _> = got
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a read answers while a write is under way");
        // What was committed, not what is under way.
        assert_eq!(read.unwrap(), ["written"]);
        tx.commit().unwrap();
        drop(db);
        let messages: Vec<String> = store
            .events(10)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(messages, ["under way", "written"]);
        drop(store);
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn a_closed_sqlite_store_leaves_no_write_ahead_log_behind() {
        let scratch = ferry_testdata::scratch_dir("store-closed");
        let path = scratch.join("center.db");
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.reader.is_some(), "a file database gets a reader");
        store
            .add_event(&Event {
                at_ms: 1,
                kind: "test".into(),
                message: "written".into(),
            })
            .unwrap();
        assert_eq!(store.events(10).unwrap().len(), 1);
        drop(store);
        // The writer closed last, checkpointed the log into the database and removed it.
        for leftover in ["center.db-wal", "center.db-shm"] {
            assert!(!scratch.join(leftover).exists(), "{leftover} is left");
        }
        assert_eq!(
            SqliteStore::open(&path).unwrap().events(10).unwrap().len(),
            1
        );
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn a_second_sqlite_store_on_one_database_is_refused_until_the_first_is_gone() {
        let scratch = ferry_testdata::scratch_dir("store-in-use");
        let path = scratch.join("center.db");
        let first = SqliteStore::open(&path).unwrap();
        // Another center, or this one twice: both would lead and mark each other's hosts
        // down.
        let second = SqliteStore::open(&path).err().expect("a second center");
        let message = second.to_string();
        assert!(
            matches!(&second, StoreError::InUse { path: named } if *named == path.display().to_string()),
            "{second:?}"
        );
        assert!(
            message.contains("in use by another ferry center"),
            "{message}"
        );
        // Another spelling of the same file is the same database.
        let spelled = scratch.join(".").join("center.db");
        assert!(
            matches!(SqliteStore::open(&spelled), Err(StoreError::InUse { .. })),
            "{} opened beside {}",
            spelled.display(),
            path.display()
        );
        drop(first);
        let reopened = SqliteStore::open(&path).unwrap();
        // In memory, nothing is shared and nothing locked.
        let _memory = SqliteStore::open(Path::new(":memory:")).unwrap();
        SqliteStore::open(Path::new(":memory:")).unwrap();
        drop(reopened);
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn sqlite_refuses_a_database_of_a_newer_schema_and_leaves_it_as_it_was() {
        let scratch = ferry_testdata::scratch_dir("store-newer");
        let path = scratch.join("center.db");
        let _ = std::fs::remove_file(&path);
        let newer = Connection::open(&path).unwrap();
        newer
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(newer);
        let error = SqliteStore::open(&path).err().expect("a newer database");
        assert!(
            matches!(error, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("run a newer ferry center"),
            "{error}"
        );
        // Not marked as this build's, which the newer one would then misread.
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION + 1);
        // This build's own, and older ones, open.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 1)
            .unwrap();
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn a_corrupt_migration_counter_in_etcd_is_an_error_not_a_restart_or_a_panic() {
        let test = "a_corrupt_migration_counter_in_etcd_is_an_error_not_a_restart_or_a_panic";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let store = etcd.leading_store("/counter/");
        let record = MigrationRecord::default();
        assert_eq!(store.add_migration(&record).unwrap(), 1);
        assert_eq!(store.add_migration(&record).unwrap(), 2);
        let counter = store.key("counters/migrations");
        for corrupt in ["two", "", "-5", "9223372036854775807", "1e3"] {
            store.etcd().put(&counter, corrupt.as_bytes()).unwrap();
            let error = store
                .add_migration(&record)
                .err()
                .unwrap_or_else(|| panic!("a migration recorded under the counter {corrupt:?}"));
            assert!(
                matches!(
                    error,
                    StoreError::Corrupt {
                        what: "migration counter",
                        ..
                    }
                ),
                "{corrupt:?}: {error:?}"
            );
        }
        // Nothing was written over the records there are.
        let ids: Vec<i64> = (store.load().unwrap().migrations.iter())
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, [1, 2]);
        store.etcd().put(&counter, b"7").unwrap();
        assert_eq!(store.add_migration(&record).unwrap(), 8);
    }

    #[test]
    fn etcd_reads_every_key_under_a_prefix_a_page_at_a_time() {
        let test = "etcd_reads_every_key_under_a_prefix_a_page_at_a_time";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let store = etcd.leading_store("/paged/");
        let (etcd, dir) = (store.etcd(), store.key("vms/"));
        let keys: Vec<String> = (0..250).map(|i| format!("{dir}{i:04}")).collect();
        for key in &keys {
            etcd.put(key, key.as_bytes()).unwrap();
        }
        // Keys just outside the prefix, either side, are not read.
        etcd.put(&store.key("vms"), b"before").unwrap();
        etcd.put(&store.key("vms0"), b"after").unwrap();
        for page in [7, 250, 1000, 0] {
            let read = etcd.range_all(&dir, page).unwrap();
            let got: Vec<&str> = read.iter().map(|kv| kv.key.as_str()).collect();
            assert_eq!(got, keys, "pages of {page}");
            assert!(read.iter().all(|kv| kv.value == kv.key.as_bytes()));
        }
        assert!(etcd.range_all(&store.key("none/"), 7).unwrap().is_empty());
        // The newest first, as many as asked for (0: all), a page at a time.
        let newest_first: Vec<&String> = keys.iter().rev().collect();
        for (most, page, want) in [(10, 3, 10), (0, 7, 250), (300, 1000, 250), (250, 250, 250)] {
            let read = etcd.range_newest(&dir, most, page).unwrap();
            let got: Vec<&String> = read.iter().map(|kv| &kv.key).collect();
            assert_eq!(got, newest_first[..want], "{most} in pages of {page}");
        }
    }

    #[test]
    fn a_migration_recorded_whose_answer_was_lost_is_taken_as_recorded() {
        let test = "a_migration_recorded_whose_answer_was_lost_is_taken_as_recorded";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let store = etcd.leading_store("/lost-answer/");
        let record = MigrationRecord::default();
        assert_eq!(store.add_migration(&record).unwrap(), 1);
        // Applied, its answer lost: the id it took, not an error that leaves a record
        // of a move never ordered.
        (store.etcd().lose_txn_answers).store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(store.add_migration(&record).unwrap(), 2);
        assert_eq!(store.add_migration(&record).unwrap(), 3);
        let ids: Vec<i64> = (store.load().unwrap().migrations.iter())
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[test]
    fn etcd_loads_each_migration_with_the_id_of_its_key() {
        let test = "etcd_loads_each_migration_with_the_id_of_its_key";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let store = etcd.leading_store("/migration-ids/");
        let record = MigrationRecord::default();
        for id in 1..=3 {
            assert_eq!(store.add_migration(&record).unwrap(), id);
        }
        // The oldest record says it is a much later one: loaded as such, the center
        // would prune every record below that id, the running ones among them.
        let lying = MigrationRecord {
            id: 1_000_000,
            ..record.clone()
        };
        let first = store.key(&numbered(MIGRATIONS, 1));
        store.etcd().put(&first, encode(&lying).as_bytes()).unwrap();
        let ids = || -> Vec<i64> {
            (store.load().unwrap().migrations.iter())
                .map(|m| m.id)
                .collect()
        };
        assert_eq!(ids(), [1, 2, 3]);
        // A key that names no id is an error, not a record of some id.
        let stray = store.key(&format!("{MIGRATIONS}12"));
        store
            .etcd()
            .put(&stray, encode(&record).as_bytes())
            .unwrap();
        let error = store.load().err().expect("a stray migration key");
        assert!(
            matches!(
                error,
                StoreError::Corrupt {
                    what: "migration",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    /// Operation `id`, finished, with a summary saying `says`.
    fn operation(id: u64, says: &str) -> Operation {
        Operation {
            id,
            kind: crate::operations::OperationKind::Balance,
            host: None,
            state: crate::operations::OperationState::Done,
            started_ms: 1,
            finished_ms: Some(2),
            planned: Vec::new(),
            migrations: Vec::new(),
            problems: Vec::new(),
            summary: says.into(),
        }
    }

    /// Writes operations 1 and 2 into `store`, then `rewrite(2, record)` puts a record
    /// claiming the last id where operation 2 is: loaded, each has the id of where it is
    /// stored; then `stray(record)` stores one where no id is, which is an error.
    fn operations_load_with_the_ids_of_where_they_are(
        store: &dyn Store,
        rewrite: impl Fn(u64, &Operation),
        stray: impl Fn(&Operation),
    ) {
        store.put_operation(&operation(1, "first")).unwrap();
        store.put_operation(&operation(2, "second")).unwrap();
        // A record naming the last id: a center counting on from it would overflow.
        rewrite(2, &operation(u64::MAX, "lying"));
        let loaded = store.load().unwrap().operations;
        let ids: Vec<(u64, &str)> = (loaded.iter())
            .map(|o| (o.id, o.summary.as_str()))
            .collect();
        assert_eq!(ids, [(1, "first"), (2, "lying")]);
        stray(&operation(3, "stray"));
        let error = store.load().err().expect("a stray operation");
        assert!(
            matches!(
                error,
                StoreError::Corrupt {
                    what: "operation",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn sqlite_loads_each_operation_with_the_id_of_its_row() {
        let store = SqliteStore::open(Path::new(":memory:")).unwrap();
        let write = |id: i64, op: &Operation| {
            store
                .db()
                .execute(
                    "INSERT INTO operations (id, record) VALUES (?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                    params![id, encode(op)],
                )
                .unwrap();
        };
        operations_load_with_the_ids_of_where_they_are(
            &store,
            |id, op| write(id as i64, op),
            // Row ids past the operation ids (as a u64 id stored as an i64 would be).
            |op| write(-1, op),
        );
    }

    #[test]
    fn etcd_loads_each_operation_with_the_id_of_its_key() {
        let test = "etcd_loads_each_operation_with_the_id_of_its_key";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let store = etcd.leading_store("/operation-ids/");
        let put = |key: String, op: &Operation| {
            store
                .etcd()
                .put(&store.key(&key), encode(op).as_bytes())
                .unwrap();
        };
        operations_load_with_the_ids_of_where_they_are(
            &store,
            |id, op| put(numbered(OPERATIONS, id), op),
            |op| put(format!("{OPERATIONS}12"), op),
        );
    }

    #[test]
    fn asked_for_no_events_etcd_answers_none_as_sqlite_does() {
        let test = "asked_for_no_events_etcd_answers_none_as_sqlite_does";
        let Some(etcd) = test_etcd::TestEtcd::start(test) else {
            return;
        };
        let sqlite = SqliteStore::open(Path::new(":memory:")).unwrap();
        let etcd = etcd.leading_store("/no-events/");
        for store in [&sqlite as &dyn Store, &etcd] {
            for i in 0..3 {
                store
                    .add_event(&Event::now("test", format!("event {i}")))
                    .unwrap();
            }
            assert_eq!(store.events(2).unwrap().len(), 2, "{}", store.describe());
            assert!(store.events(0).unwrap().is_empty(), "{}", store.describe());
        }
    }

    #[test]
    fn sqlite_creates_the_missing_folders_of_its_file() {
        let scratch = ferry_testdata::scratch_dir("store-folder");
        let path = scratch.join("var/lib/ferry/center.db");
        SqliteStore::open(&path).unwrap();
        assert!(path.is_file());

        // A folder that cannot be made is named once in the error.
        let blocked = scratch.join("file");
        std::fs::write(&blocked, b"").unwrap();
        let error = SqliteStore::open(&blocked.join("center.db"))
            .err()
            .expect("a file in the way of the folder")
            .to_string();
        let folder = blocked.display().to_string();
        assert!(
            error.starts_with("cannot create the center database's folder"),
            "{error}"
        );
        assert_eq!(error.matches(&folder).count(), 1, "{error}");
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}

/// A one-member etcd on loopback for tests of the etcd store and of leadership.
#[cfg(test)]
pub(crate) mod test_etcd {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::etcd::{Compare, Etcd, Op};

    use super::{EtcdStore, Fence};

    /// The member, killed (and its data removed) on drop.
    pub(crate) struct TestEtcd {
        child: Child,
        dir: std::path::PathBuf,
        /// Its client URL.
        pub(crate) endpoint: String,
    }

    impl TestEtcd {
        /// Starts one for `test`; none (said so) where etcd is not installed, a failure
        /// then under `FERRY_REQUIRE_ETCD=1`.
        pub(crate) fn start(test: &str) -> Option<Self> {
            let binary = ferry_testdata::etcd(test)?;
            let dir = ferry_testdata::scratch_dir("etcd").join(test);
            let _ = std::fs::remove_dir_all(&dir);
            let ports: Vec<std::net::TcpListener> = (0..2)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            let [client, peer] = [0, 1]
                .map(|i| format!("http://127.0.0.1:{}", ports[i].local_addr().unwrap().port()));
            drop(ports);
            let child = Command::new(binary)
                .args(["--name", "e0", "--data-dir"])
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("e0={peer}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd");
            let etcd = Self {
                child,
                dir,
                endpoint: client,
            };
            let client =
                Etcd::new(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(2)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while client.put("/probe", b"1").is_err() {
                assert!(Instant::now() < deadline, "etcd did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(etcd)
        }

        /// Its process id.
        pub(crate) fn pid(&self) -> i32 {
            self.child.id() as i32
        }

        /// A store under `prefix` that leads: its leader key made as a winning replica
        /// makes it (no lease), and its writes fenced by it.
        pub(crate) fn leading_store(&self, prefix: &str) -> EtcdStore {
            let store = EtcdStore::open(std::slice::from_ref(&self.endpoint), prefix).unwrap();
            let key = store.key("leader");
            let put = Op::Put {
                key: key.clone(),
                value: b"me".to_vec(),
                lease: None,
            };
            let won = (store.etcd())
                .txn(
                    &[Compare::CreateRevision(key.clone(), 0)],
                    &[put, Op::Get(key.clone())],
                    &[],
                )
                .unwrap();
            assert!(won.succeeded);
            store.set_fence(Some(Fence {
                key,
                create_revision: won.read[0].create_revision,
                cluster: won.cluster,
            }));
            store
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
