//! `GET /metrics` in the OpenMetrics text format (`prometheus-client`): migrations as
//! counters and a pause histogram, updated once as each migration ends; hosts and VMs as
//! gauges set from the inventory at each scrape (bounded by the cluster's size, never by
//! its history).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::inventory::{BeatOutcome, MigrationRecord};
use crate::HostView;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the pause histogram's buckets.
const PAUSE_BUCKETS_S: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostModeLabel {
    host: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

type HostGauge = Family<HostLabel, Gauge<f64, AtomicU64>>;
/// What a per-host gauge shows of a host.
type HostReading = fn(&HostView) -> f64;

/// One migration counted in `ferry_migrations_in_progress`, until dropped: each count
/// ends exactly once, however the migration's follower ends, so the gauge neither
/// drifts up nor goes below zero.
#[must_use = "the migration counts as in progress only while this is held"]
pub struct MigrationInProgress(Gauge);

impl Drop for MigrationInProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The center's metrics.
pub struct Metrics {
    registry: Registry,
    migrations: Family<ResultLabel, Counter>,
    in_progress: Gauge,
    pauses: Histogram,
    bytes: Counter,
    host_up: Family<HostModeLabel, Gauge>,
    /// Per-host gauges, each with the reading it shows.
    host_gauges: Vec<(HostGauge, HostReading)>,
    vms: Family<StateLabel, Gauge>,
    heartbeats: Family<ResultLabel, Counter>,
    /// Migrations counted, by id.
    counted: Mutex<std::collections::BTreeSet<i64>>,
    /// One scrape at a time: each clears and refills the gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        // Help texts without their final period: the registry adds one.
        let mut registry = Registry::default();
        let migrations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ferry_migrations",
            "Migrations the center ordered, by result",
            migrations.clone(),
        );
        let in_progress = Gauge::default();
        registry.register(
            "ferry_migrations_in_progress",
            "Migrations running now",
            in_progress.clone(),
        );
        let pauses = Histogram::new(PAUSE_BUCKETS_S);
        registry.register(
            "ferry_migration_pause_seconds",
            "Pause of each successful migration (source pause to destination resume)",
            pauses.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "ferry_migration_bytes",
            "Bytes sent by finished migrations",
            bytes.clone(),
        );
        let host_up = Family::<HostModeLabel, Gauge>::default();
        registry.register(
            "ferry_host_up",
            "Whether the host's heartbeats arrive (1) or not (0)",
            host_up.clone(),
        );
        let readings: [(&str, &str, HostReading); 5] = [
            (
                "ferry_host_accel_memory_bytes",
                "Accelerator memory the host may hand out",
                |h| h.info.accel_capacity as f64,
            ),
            (
                "ferry_host_accel_memory_used_bytes",
                "Accelerator memory held by its VMs",
                |h| h.info.accel_used as f64,
            ),
            (
                "ferry_host_accel_load",
                "Busy accelerators' worth of work on the host",
                |h| h.info.accel_load,
            ),
            (
                "ferry_host_memory_used_bytes",
                "VM memory (RAM + accelerator) held by its VMs",
                |h| h.info.memory_used as f64,
            ),
            (
                "ferry_host_pressure",
                "Balancing pressure (0 idle, 1 full)",
                |h| h.pressure,
            ),
        ];
        let host_gauges = readings
            .into_iter()
            .map(|(name, help, reading)| {
                let gauge = HostGauge::default();
                registry.register(name, help, gauge.clone());
                (gauge, reading)
            })
            .collect();
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register(
            "ferry_vms",
            "VMs known to the center, by state",
            vms.clone(),
        );
        let heartbeats = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ferry_heartbeats",
            "Heartbeats taken from hosts (`taken`), or refused as deltas on a base this center does not hold (`need-full`)",
            heartbeats.clone(),
        );
        Self {
            heartbeats,
            counted: Mutex::default(),
            registry,
            migrations,
            in_progress,
            pauses,
            bytes,
            host_up,
            host_gauges,
            vms,
            scrape: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// A heartbeat arrived.
    pub fn heartbeat(&self, outcome: &BeatOutcome) {
        let result = match outcome {
            BeatOutcome::Taken => "taken",
            BeatOutcome::NeedFull => "need-full",
            BeatOutcome::NameTaken { .. } => "name-taken",
        };
        self.heartbeats
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// A migration is being followed (ordered here, or inherited from an earlier leader):
    /// it counts as in progress until the guard returned is dropped.
    pub fn migration_started(&self) -> MigrationInProgress {
        self.in_progress.inc();
        MigrationInProgress(self.in_progress.clone())
    }

    /// Counts a finished migration (one ended now, or one loaded from the store, which
    /// a follower replica does at each refresh): once per id.
    pub fn count_finished(&self, record: &MigrationRecord) {
        if record.id != 0 {
            let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            if !counted.insert(record.id) {
                return;
            }
            // Ids only grow: the oldest can go once past the in-memory window.
            while counted.len() > 2 * crate::inventory::MIGRATIONS_KEPT {
                counted.pop_first();
            }
        }
        self.migrations
            .get_or_create(&ResultLabel {
                result: record.state.name().to_string(),
            })
            .inc();
        if let Some(ms) = record.downtime_ms {
            self.pauses.observe(ms / 1e3);
        }
        self.bytes.inc_by(record.bytes_sent);
    }

    /// The metrics text, with the host gauges set from `hosts` and the VM gauge from
    /// `vm_states` (VMs per state).
    pub fn render(&self, hosts: &[HostView], vm_states: &BTreeMap<String, i64>) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        // Hosts and states that are gone must not linger as stale series.
        self.host_up.clear();
        for h in hosts {
            let label = HostModeLabel {
                host: h.name.clone(),
                mode: h.mode.clone(),
            };
            self.host_up
                .get_or_create(&label)
                .set(i64::from(h.status == "up"));
        }
        for (gauge, reading) in &self.host_gauges {
            gauge.clear();
            for h in hosts {
                let label = HostLabel {
                    host: h.name.clone(),
                };
                gauge.get_or_create(&label).set(reading(h));
            }
        }
        self.vms.clear();
        for (state, n) in vm_states {
            let label = StateLabel {
                state: state.clone(),
            };
            self.vms.get_or_create(&label).set(*n);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::MigrationState;

    #[test]
    fn pauses_fall_in_their_buckets_and_counts_add_up() {
        let metrics = Metrics::default();
        let done = |ms: f64| MigrationRecord {
            state: MigrationState::Succeeded,
            downtime_ms: Some(ms),
            bytes_sent: 1000,
            ..MigrationRecord::default()
        };
        let failed = MigrationRecord {
            state: MigrationState::Failed,
            ..MigrationRecord::default()
        };
        metrics.count_finished(&done(3.0));
        let ended = metrics.migration_started();
        metrics.count_finished(&done(40.0));
        drop(ended);
        let ended = metrics.migration_started();
        metrics.count_finished(&failed);
        drop(ended);
        let _running = metrics.migration_started();
        let text = metrics.render(&[], &BTreeMap::new());
        for line in [
            "ferry_migrations_total{result=\"succeeded\"} 2",
            "ferry_migrations_total{result=\"failed\"} 1",
            "ferry_migrations_in_progress 1",
            "ferry_migration_pause_seconds_bucket{le=\"0.0025\"} 0",
            "ferry_migration_pause_seconds_bucket{le=\"0.005\"} 1",
            "ferry_migration_pause_seconds_bucket{le=\"0.05\"} 2",
            "ferry_migration_pause_seconds_count 2",
            "ferry_migration_bytes_total 2000",
            "# HELP ferry_migrations_in_progress Migrations running now.\n",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
        // Each help text ends in one period (the registry adds it).
        let helps = text.lines().filter(|l| l.starts_with("# HELP"));
        assert!(helps.clone().count() >= 4, "{text}");
        for help in helps {
            assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
        }
    }
}
