//! `GET /metrics` in the Prometheus text format: migrations (counts, pauses, bytes),
//! hosts and VMs.

use std::fmt::Write;

use crate::inventory::MigrationRecord;
use crate::{HostView, VmView};

/// Upper bounds (ms) of the pause histogram's buckets.
const PAUSE_BUCKETS_MS: [f64; 9] = [1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0];

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-host gauge: name, help, value.
type HostGauge = (&'static str, &'static str, fn(&HostView) -> f64);

/// The metrics text for this inventory.
pub fn render(hosts: &[HostView], vms: &[VmView], migrations: &[MigrationRecord]) -> String {
    let mut out = String::new();
    let w = &mut out;
    let count = |state: &str| migrations.iter().filter(|m| m.state == state).count();
    let _ = writeln!(
        w,
        "# HELP ferry_migrations_total Migrations the center ordered, by result."
    );
    let _ = writeln!(w, "# TYPE ferry_migrations_total counter");
    for state in ["succeeded", "failed"] {
        let _ = writeln!(
            w,
            "ferry_migrations_total{{result=\"{state}\"}} {}",
            count(state)
        );
    }
    let _ = writeln!(
        w,
        "# HELP ferry_migrations_in_progress Migrations running now."
    );
    let _ = writeln!(w, "# TYPE ferry_migrations_in_progress gauge");
    let _ = writeln!(w, "ferry_migrations_in_progress {}", count("running"));

    let pauses: Vec<f64> = migrations.iter().filter_map(|m| m.downtime_ms).collect();
    let _ = writeln!(w, "# HELP ferry_migration_pause_seconds Pause of each successful migration (source pause to destination resume).");
    let _ = writeln!(w, "# TYPE ferry_migration_pause_seconds histogram");
    for le in PAUSE_BUCKETS_MS {
        let n = pauses.iter().filter(|&&p| p <= le).count();
        let _ = writeln!(
            w,
            "ferry_migration_pause_seconds_bucket{{le=\"{}\"}} {n}",
            le / 1e3
        );
    }
    let _ = writeln!(
        w,
        "ferry_migration_pause_seconds_bucket{{le=\"+Inf\"}} {}",
        pauses.len()
    );
    let _ = writeln!(
        w,
        "ferry_migration_pause_seconds_sum {}",
        pauses.iter().sum::<f64>() / 1e3
    );
    let _ = writeln!(w, "ferry_migration_pause_seconds_count {}", pauses.len());

    let bytes: u64 = migrations.iter().map(|m| m.bytes_sent).sum();
    let _ = writeln!(
        w,
        "# HELP ferry_migration_bytes_total Bytes sent by finished migrations."
    );
    let _ = writeln!(w, "# TYPE ferry_migration_bytes_total counter");
    let _ = writeln!(w, "ferry_migration_bytes_total {bytes}");

    let _ = writeln!(
        w,
        "# HELP ferry_host_up Whether the host's heartbeats arrive (1) or not (0)."
    );
    let _ = writeln!(w, "# TYPE ferry_host_up gauge");
    for h in hosts {
        let up = u8::from(h.status == "up");
        let _ = writeln!(
            w,
            "ferry_host_up{{host=\"{}\",mode=\"{}\"}} {up}",
            escape(&h.name),
            h.mode
        );
    }
    let gauges: [HostGauge; 5] = [
        (
            "ferry_host_accel_memory_bytes",
            "Accelerator memory the host may hand out.",
            |h| h.info.accel_capacity as f64,
        ),
        (
            "ferry_host_accel_memory_used_bytes",
            "Accelerator memory held by its VMs.",
            |h| h.info.accel_used as f64,
        ),
        (
            "ferry_host_accel_load",
            "Busy accelerators' worth of work on the host.",
            |h| h.info.accel_load,
        ),
        (
            "ferry_host_memory_used_bytes",
            "VM memory (RAM + accelerator) held by its VMs.",
            |h| h.info.memory_used as f64,
        ),
        (
            "ferry_host_pressure",
            "Balancing pressure (0 idle, 1 full).",
            |h| h.pressure,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(w, "# HELP {name} {help}");
        let _ = writeln!(w, "# TYPE {name} gauge");
        for h in hosts {
            let _ = writeln!(w, "{name}{{host=\"{}\"}} {}", escape(&h.name), value(h));
        }
    }
    let _ = writeln!(w, "# HELP ferry_vms VMs known to the center, by state.");
    let _ = writeln!(w, "# TYPE ferry_vms gauge");
    let mut states: Vec<&str> = vms.iter().map(|v| v.state.as_str()).collect();
    states.sort_unstable();
    states.dedup();
    for state in states {
        let n = vms.iter().filter(|v| v.state == state).count();
        let _ = writeln!(w, "ferry_vms{{state=\"{}\"}} {n}", escape(state));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_fall_in_their_buckets_and_counts_add_up() {
        let done = |ms: f64| MigrationRecord {
            state: "succeeded".into(),
            downtime_ms: Some(ms),
            bytes_sent: 1000,
            ..MigrationRecord::default()
        };
        let failed = MigrationRecord {
            state: "failed".into(),
            ..MigrationRecord::default()
        };
        let text = render(&[], &[], &[done(3.0), done(40.0), failed]);
        assert!(
            text.contains("ferry_migrations_total{result=\"succeeded\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migrations_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_pause_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_pause_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_pause_seconds_bucket{le=\"0.05\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_pause_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("ferry_migration_bytes_total 2000"), "{text}");
    }
}
