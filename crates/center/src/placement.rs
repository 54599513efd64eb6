//! Where a VM goes: the open host with the most free accelerator memory that fits it
//! (and runs its accelerator's backend), then the most free VM memory, then by name (so
//! plans are reproducible).

use std::sync::Arc;

use ferry_api::VmInfo;

use crate::inventory::HostLoad;

/// The backend every host runs.
const CPU: &str = "cpu";

/// What a VM needs of a host.
#[derive(Debug, Clone)]
pub struct Need {
    /// Accelerator memory, bytes.
    pub accel: u64,
    /// RAM + accelerator memory, bytes.
    pub memory: u64,
    /// The accelerator backend it runs on (a kind, or `cuda`: any GPU's), if not the one
    /// every host has (`cpu`).
    pub backend: Option<Arc<str>>,
}

impl Need {
    /// What a VM of these sizes needs (on any backend the host gives new VMs).
    pub fn of(ram: u64, accel: u64) -> Self {
        Self {
            accel,
            // Sizes from a request or a heartbeat: too large for any host, not a panic.
            memory: ram.saturating_add(accel),
            backend: None,
        }
    }

    /// What `vm` needs to move: its sizes, and a host that runs its backend.
    pub fn of_vm(vm: &VmInfo) -> Self {
        Self::of(vm.memory, vm.accel_memory).on(vm.accel_backend.as_deref())
    }

    /// The same, on accelerator backend `backend` (`None`: any).
    pub fn on(self, backend: Option<&str>) -> Self {
        Self {
            backend: backend.filter(|&b| b != CPU).map(Arc::from),
            ..self
        }
    }
}

/// Whether `host` has room for `need` and runs its backend.
pub fn fits(host: &HostLoad, need: &Need) -> bool {
    host.accel_free >= need.accel
        && host.memory_free >= need.memory
        && need
            .backend
            .as_deref()
            .is_none_or(|b| ferry_api::runs_backend(&host.backends, b))
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Why no host can take a VM ([`choose`]): what was needed and what the hosts have.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    /// There is no host to choose from.
    #[error("no host is up and in service")]
    NoHost,
    /// No host runs the VM's accelerator backend.
    #[error(
        "no host in service runs the VM's accelerator backend {backend} (hosts: {})",
        backends_of(hosts)
    )]
    NoBackend {
        /// The backend the VM runs on.
        backend: Arc<str>,
        /// The hosts there were.
        hosts: Vec<HostLoad>,
    },
    /// No host has the room.
    #[error(
        "no host has {} MiB of accelerator memory and {} MiB of VM memory free (free: {})",
        mib(need.accel),
        mib(need.memory),
        room_of(hosts)
    )]
    Full {
        /// What the VM needs.
        need: Need,
        /// The hosts there were.
        hosts: Vec<HostLoad>,
    },
}

/// Each host's name and backends, for a person.
fn backends_of(hosts: &[HostLoad]) -> String {
    hosts
        .iter()
        .map(|h| format!("{} {}", h.name, h.backends.join("+")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each host's name and free room, for a person.
fn room_of(hosts: &[HostLoad]) -> String {
    hosts
        .iter()
        .map(|h| {
            format!(
                "{} {} MiB accel / {} MiB memory",
                h.name,
                mib(h.accel_free),
                mib(h.memory_free)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The host for a VM needing `need`, among `hosts`; or why none fits.
pub fn choose<'h>(hosts: &'h [HostLoad], need: &Need) -> Result<&'h HostLoad, NoRoom> {
    hosts
        .iter()
        .filter(|h| fits(h, need))
        .max_by(|a, b| {
            a.accel_free
                .cmp(&b.accel_free)
                .then(a.memory_free.cmp(&b.memory_free))
                .then(b.name.cmp(&a.name))
        })
        .ok_or_else(|| no_room(hosts, need))
}

/// Why no host fits `need`.
fn no_room(hosts: &[HostLoad], need: &Need) -> NoRoom {
    if hosts.is_empty() {
        return NoRoom::NoHost;
    }
    if let Some(backend) = &need.backend {
        if !hosts
            .iter()
            .any(|h| ferry_api::runs_backend(&h.backends, backend))
        {
            return NoRoom::NoBackend {
                backend: backend.clone(),
                hosts: hosts.to_vec(),
            };
        }
    }
    NoRoom::Full {
        need: need.clone(),
        hosts: hosts.to_vec(),
    }
}

/// Takes `need` off `host`'s free room (a placement made in a plan).
pub fn take(host: &mut HostLoad, need: &Need) {
    host.accel_free -= need.accel;
    host.memory_free -= need.memory;
    host.accel_used += need.accel;
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn host(name: &str, accel_free_mib: u64, memory_free_mib: u64) -> HostLoad {
        HostLoad {
            name: name.into(),
            accel_free: accel_free_mib << 20,
            memory_free: memory_free_mib << 20,
            accel_capacity: 1 << 30,
            accel_used: (1 << 30) - (accel_free_mib << 20).min(1 << 30),
            accel_load: 0.0,
            accel_slots: 1.0,
            backends: vec!["cpu".into()],
        }
    }

    #[test]
    fn most_free_accelerator_memory_wins() {
        let hosts = [
            host("a", 512, 8000),
            host("b", 900, 1000),
            host("c", 700, 9000),
        ];
        let need = Need::of(256 << 20, 256 << 20);
        assert_eq!(choose(&hosts, &need).unwrap().name, "b");
    }

    #[test]
    fn a_host_without_vm_memory_is_skipped() {
        let hosts = [host("a", 900, 300), host("b", 600, 9000)];
        let need = Need::of(256 << 20, 256 << 20);
        assert_eq!(choose(&hosts, &need).unwrap().name, "b");
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let hosts = [host("b", 600, 600), host("a", 600, 600)];
        assert_eq!(choose(&hosts, &Need::of(0, 0)).unwrap().name, "a");
    }

    #[test]
    fn no_room_says_what_was_needed_and_what_is_free() {
        let hosts = [host("a", 100, 8000), host("b", 200, 8000)];
        let why = choose(&hosts, &Need::of(256 << 20, 1 << 30)).unwrap_err();
        assert!(matches!(why, NoRoom::Full { .. }), "{why:?}");
        let why = why.to_string();
        assert!(why.contains("1024 MiB of accelerator memory"), "{why}");
        assert!(
            why.contains("a 100 MiB accel") && why.contains("b 200 MiB"),
            "{why}"
        );
        let why = choose(&[], &Need::of(0, 0)).unwrap_err();
        assert!(matches!(why, NoRoom::NoHost), "{why:?}");
        assert_eq!(why.to_string(), "no host is up and in service");
    }

    #[test]
    fn a_vm_goes_only_to_hosts_that_run_its_backend() {
        let mut gpu = host("g", 100, 8000);
        gpu.backends = vec!["cpu".into(), "cuda-sm_90-d13".into()];
        let hosts = [host("a", 900, 9000), gpu];
        let vm = |backend: Option<&str>| VmInfo {
            id: "v".into(),
            workload: "mlp-train".into(),
            name: None,
            args: Vec::new(),
            state: ferry_api::VmState::Running,
            memory: 64 << 20,
            accel_memory: 64 << 20,
            accel_backend: backend.map(String::from),
            accel_load: 0.0,
            uptime_ms: 0,
            since_unix_ms: 0,
            migrated_from: None,
            files: Vec::new(),
            console_tail: String::new(),
            idempotency_key: None,
        };
        let cuda = Need::of_vm(&vm(Some("cuda-sm_90-d13")));
        assert_eq!(choose(&hosts, &cuda).unwrap().name, "g");
        // A cpu VM (or one without an accelerator) goes where there is most room.
        assert_eq!(
            choose(&hosts, &Need::of_vm(&vm(Some("cpu")))).unwrap().name,
            "a"
        );
        assert_eq!(choose(&hosts, &Need::of_vm(&vm(None))).unwrap().name, "a");
        let why = choose(&hosts[..1], &cuda).unwrap_err();
        assert!(matches!(why, NoRoom::NoBackend { .. }), "{why:?}");
        let why = why.to_string();
        assert!(
            why.contains("backend cuda-sm_90-d13") && why.contains("a cpu"),
            "{why}"
        );
    }
}
