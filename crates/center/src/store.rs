//! The center's SQLite database: hosts, VMs, migration history and events. Every change
//! to the inventory is written through at once, so a restarted center finds what it
//! knew.

use std::path::Path;

use rusqlite::{params, Connection};

use crate::inventory::{Event, HostRecord, MigrationRecord, VmRecord};

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("center database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record could not be read back.
    #[error("center database: a stored {what} is unreadable: {error}")]
    Corrupt {
        /// What kind of record.
        what: &'static str,
        /// Why.
        error: serde_json::Error,
    },
}

/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

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
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
";

/// The database.
pub struct Store {
    db: Connection,
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
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt { what, error })
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("inventory records serialize")
}

impl Store {
    /// Opens (or creates) the database at `path`; `:memory:` keeps it in memory.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        // WAL: heartbeats write often; readers never wait for them.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { db })
    }

    /// Everything stored.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        let mut rows = self.db.prepare("SELECT record FROM hosts ORDER BY name")?;
        for text in rows.query_map([], |r| r.get::<_, String>(0))? {
            loaded.hosts.push(decode("host", &text?)?);
        }
        let mut rows = self.db.prepare("SELECT record FROM vms ORDER BY id")?;
        for text in rows.query_map([], |r| r.get::<_, String>(0))? {
            loaded.vms.push(decode("VM", &text?)?);
        }
        let mut rows = self
            .db
            .prepare("SELECT id, record FROM migrations ORDER BY id")?;
        for row in rows.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (id, text) = row?;
            let mut record: MigrationRecord = decode("migration", &text)?;
            record.id = id;
            loaded.migrations.push(record);
        }
        Ok(loaded)
    }

    /// Writes a host's record.
    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO hosts (name, record) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET record = excluded.record",
            params![host.name, encode(host)],
        )?;
        Ok(())
    }

    /// Writes VM records and deletes those in `gone`, in one transaction.
    pub fn put_vms(&mut self, vms: &[&VmRecord], gone: &[String]) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
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

    /// Records a new migration and returns its id.
    pub fn add_migration(&self, record: &MigrationRecord) -> Result<i64, StoreError> {
        self.db.execute(
            "INSERT INTO migrations (record) VALUES (?1)",
            params![encode(record)],
        )?;
        Ok(self.db.last_insert_rowid())
    }

    /// Rewrites a migration's record.
    pub fn put_migration(&self, record: &MigrationRecord) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE migrations SET record = ?2 WHERE id = ?1",
            params![record.id, encode(record)],
        )?;
        Ok(())
    }

    /// Appends an event.
    pub fn add_event(&self, event: &Event) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO events (at_ms, kind, message) VALUES (?1, ?2, ?3)",
            params![event.at_ms, event.kind, event.message],
        )?;
        Ok(())
    }

    /// The last `n` events, newest first.
    pub fn events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let mut rows = self
            .db
            .prepare("SELECT at_ms, kind, message FROM events ORDER BY id DESC LIMIT ?1")?;
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
}
