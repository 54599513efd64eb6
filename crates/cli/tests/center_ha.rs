//! Center replicas on a three-member etcd cluster, with real host daemons, all on
//! loopback: the leader killed in the middle of a maintenance evacuation, etcd members
//! lost (one: nothing changes; two: writes are refused, reads answer, nothing is lost),
//! a stale leader woken after its lease ended, and the fence that stops its writes.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::{kvm_available, reference, wait_for, Daemon};
use ferry_center::etcd::{Compare, Etcd, Op};
use ferry_center::store::{EtcdStore, Fence, Store, StoreError};
use serde_json::Value;

const TOKEN: &str = "operator-token-0123456789";
const DOWN_AFTER_MS: &str = "1500";
/// A training run that is still running when its host is emptied.
const MLP: &str = "--steps 20000 --print-every 500";

/// Free ports of loopback address `host`, found by binding and letting go.
fn free_ports(host: &str, n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((host, 0)).unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A loopback address of its own for a cluster (127.0.N.1, another for each): its
/// members' ports, let go of between their choice and etcd's bind (and while a member is
/// down), cannot be taken meanwhile by the other tests' servers and connections, which
/// use 127.0.0.1.
fn own_loopback() -> String {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.0.{n}.1")
}

/// A three-member etcd cluster on loopback; members killed on drop.
struct EtcdCluster {
    binary: PathBuf,
    dir: PathBuf,
    /// The loopback address its members listen on ([`own_loopback`]).
    host: String,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    members: Vec<Option<Child>>,
}

impl EtcdCluster {
    fn start(binary: PathBuf, test: &str) -> Self {
        let dir = common::empty_dir(&format!("etcd-{test}"));
        let host = own_loopback();
        let ports = free_ports(&host, 6);
        let mut cluster = Self {
            binary,
            dir,
            host,
            client_ports: ports[..3].to_vec(),
            peer_ports: ports[3..].to_vec(),
            members: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.start_member(i);
        }
        let etcd = Etcd::new(&[cluster.endpoints()], Duration::from_secs(2)).unwrap();
        wait_for("etcd to elect a leader", Duration::from_secs(30), || {
            etcd.put("/probe", b"1").ok()
        });
        cluster
    }

    fn endpoints(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("http://{}:{p}", self.host))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .peer_ports
            .iter()
            .enumerate()
            .map(|(k, p)| format!("e{k}=http://{}:{p}", self.host))
            .collect();
        let client = format!("http://{}:{}", self.host, self.client_ports[i]);
        let peer = format!("http://{}:{}", self.host, self.peer_ports[i]);
        let log = std::fs::File::create(self.dir.join(format!("e{i}.log"))).unwrap();
        let child = Command::new(&self.binary)
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("e{i}")))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "ferry-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i] = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill_member(i);
        }
    }
}

/// A center replica process, killed on drop.
struct Replica {
    name: String,
    child: Option<Child>,
    url: String,
}

impl Replica {
    fn start(name: &str, etcd: &str, prefix: &str) -> Self {
        Self::start_on("127.0.0.1:0", name, etcd, prefix)
    }

    /// [`Replica::start`], listening on `listen`.
    fn start_on(listen: &str, name: &str, etcd: &str, prefix: &str) -> Self {
        let (child, line) = common::serve(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["center", "serve", "--listen", listen, "--name", name])
                .args(["--etcd", etcd, "--etcd-prefix", prefix])
                .args(["--down-after-ms", DOWN_AFTER_MS])
                .env("FERRY_CENTER_TOKEN", TOKEN),
        );
        Self {
            name: name.into(),
            child: Some(child),
            url: common::center_url(&line),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `method path` with the operator token: status and JSON body.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .new_agent();
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {TOKEN}");
        let response = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
            (_, body) => agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body.unwrap_or(Value::Null)),
        };
        match response {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r.body_mut().read_to_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    fn cluster(&self) -> Option<Value> {
        match self.call("GET", "/v1/cluster", None) {
            (200, view) => Some(view),
            _ => None,
        }
    }

    /// The leader's name, as this replica knows it.
    fn leader(&self) -> Option<String> {
        self.cluster()?["leader"]["name"]
            .as_str()
            .map(str::to_string)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three replicas on a three-member etcd and hosts a, b, c beating to all of them.
struct Ha {
    etcd: EtcdCluster,
    /// Its replicas' etcd prefix.
    prefix: String,
    replicas: Vec<Replica>,
    hosts: Vec<(String, Daemon)>,
}

impl Ha {
    fn start(test: &str, binary: PathBuf) -> Self {
        let etcd = EtcdCluster::start(binary, test);
        let prefix = format!("/{test}/");
        let replicas: Vec<Replica> = ["c1", "c2", "c3"]
            .iter()
            .map(|n| Replica::start(n, &etcd.endpoints(), &prefix))
            .collect();
        let centers = replicas
            .iter()
            .map(|r| r.url.clone())
            .collect::<Vec<_>>()
            .join(",");
        let hosts = common::cluster_hosts(&centers, "1G");
        let ha = Self {
            etcd,
            prefix,
            replicas,
            hosts,
        };
        for r in &ha.replicas {
            wait_for(
                &format!("replica {} to see three hosts up and a leader", r.name),
                Duration::from_secs(30),
                || {
                    let view = r.cluster()?;
                    let up = view["hosts"]
                        .as_array()?
                        .iter()
                        .filter(|h| h["status"] == "up")
                        .count();
                    (up == 3 && view["leader"]["name"].is_string()).then_some(())
                },
            );
        }
        ha
    }

    fn replica(&self, name: &str) -> &Replica {
        self.replicas.iter().find(|r| r.name == name).unwrap()
    }

    fn leader(&self) -> &Replica {
        let name = self.replicas[0].leader().expect("a leader");
        self.replica(&name)
    }

    /// The leader that replaces `gone` (killed or paused), as a replica other than
    /// `gone` reports it within 20 s. Failing, it says what each of them answered last
    /// and how long the answer took, and who holds the leader key: a replica's API slow
    /// to answer and an election that did not happen look alike otherwise.
    fn new_leader_after(&self, gone: &str) -> String {
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < Duration::from_secs(20) {
            last.clear();
            for r in self
                .replicas
                .iter()
                .filter(|r| r.name != gone && r.child.is_some())
            {
                let asked = Instant::now();
                let leader = r.leader();
                if let Some(l) = leader.as_ref().filter(|l| *l != gone) {
                    return l.clone();
                }
                last.push(format!(
                    "{} said {leader:?} in {:?}",
                    r.name,
                    asked.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let etcd = Etcd::new(&[self.etcd.endpoints()], Duration::from_secs(2)).unwrap();
        let key = format!("{}leader", self.prefix);
        let holder = etcd
            .get(&key)
            .map(|kv| kv.map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.lease)));
        panic!("no replica reported a leader other than {gone} within 20 s: {last:?}; the key {key} is held by {holder:?}");
    }

    fn daemon(&self, name: &str) -> &Daemon {
        &self.hosts.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// The hosts on which VM `id` is live (running, migrating, finished there).
    fn hosts_running(&self, id: &str) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, d)| {
                let out = d.ferry(&["vm", "--host", &d.api, "--json", "show", id]);
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|vm| {
                        matches!(
                            vm["state"].as_str(),
                            Some("running" | "migrating" | "switchover" | "exited")
                        )
                    })
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Creates an `mlp-train` VM on `host` through replica `via`.
    fn create_on(&self, via: &Replica, host: &str, guest_args: &str) -> String {
        let (status, placed) = via.call(
            "POST",
            "/v1/vms",
            Some(serde_json::json!({
                "workload": "mlp-train",
                "args": guest_args.split_whitespace().collect::<Vec<_>>(),
                "memory": 64u64 << 20,
                "accel_memory": 32u64 << 20,
                "host": host,
            })),
        );
        assert_eq!(status, 201, "{placed}");
        placed["vm"]["id"].as_str().unwrap().to_string()
    }
}

fn etcd_binary(test: &str) -> Option<PathBuf> {
    if !kvm_available(test) {
        return None;
    }
    ferry_testdata::etcd(test)
}

#[test]
fn the_leader_killed_during_maintenance_is_replaced_and_the_evacuation_completes() {
    let test = "the_leader_killed_during_maintenance_is_replaced_and_the_evacuation_completes";
    let Some(binary) = etcd_binary(test) else {
        return;
    };
    let seeds = ["--seed 5", "--seed 6", "--seed 7"];
    let expected: Vec<String> = seeds
        .iter()
        .map(|s| reference("mlp-train", "64M", "32M", &format!("{MLP} {s}")))
        .collect();
    let mut ha = Ha::start("leader-killed", binary);
    let leader = ha.leader().name.clone();
    let follower = ha
        .replicas
        .iter()
        .find(|r| r.name != leader)
        .unwrap()
        .name
        .clone();
    // Created through a follower: the write reaches the leader.
    let ids: Vec<String> = seeds
        .iter()
        .map(|s| ha.create_on(ha.replica(&follower), "a", &format!("{MLP} {s}")))
        .collect();
    for id in &ids {
        ha.daemon("a").wait_console(id, "step=500 ");
    }

    let (status, op) = ha
        .replica(&leader)
        .call("POST", "/v1/hosts/a/maintenance", None);
    assert_eq!(status, 202, "{op}");
    let op_id = op["id"].as_u64().unwrap();
    // Kill the leader once it has ordered a migration.
    wait_for("a migration to start", Duration::from_secs(30), || {
        let view = ha.replica(&leader).cluster()?;
        view["migrations"]
            .as_array()?
            .iter()
            .any(|m| m["state"] == "running")
            .then_some(())
    });
    let killed_at = Instant::now();
    ha.replicas
        .iter_mut()
        .find(|r| r.name == leader)
        .unwrap()
        .kill();
    let survivor = ha.replica(&follower);
    let new_leader = ha.new_leader_after(&leader);
    eprintln!(
        "leader {leader} killed; {new_leader} leads {:.1} s later",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "a new leader within a few seconds"
    );

    let done = wait_for("the evacuation to end", Duration::from_secs(180), || {
        let (status, op) = survivor.call("GET", &format!("/v1/operations/{op_id}"), None);
        (status == 200 && op["state"] != "running").then_some(op)
    });
    assert_eq!(done["state"], "done", "{done:#}");

    // Every VM runs on exactly one host, not a, and ends as if never moved.
    for (id, want) in ids.iter().zip(&expected) {
        let on = ha.hosts_running(id);
        assert_eq!(on.len(), 1, "{id} runs on {on:?}");
        assert_ne!(on[0], "a");
        assert_eq!(
            &ha.daemon(&on[0]).checksum_at_exit(id),
            want,
            "{id} on {}",
            on[0]
        );
    }
    // A surviving follower's dashboard data shows the whole history.
    let other = ha
        .replicas
        .iter()
        .find(|r| r.child.is_some() && r.name != new_leader)
        .unwrap();
    let view = wait_for(
        "the follower to show the operation done",
        Duration::from_secs(10),
        || {
            let view = other.cluster()?;
            view["operations"]
                .as_array()?
                .iter()
                .any(|o| o["id"] == op_id && o["state"] == "done")
                .then_some(view)
        },
    );
    let host_a = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "a")
        .unwrap();
    assert_eq!(host_a["mode"], "maintenance", "{host_a}");
    let succeeded: Vec<&Value> = view["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "succeeded")
        .collect();
    for id in &ids {
        assert_eq!(
            succeeded.iter().filter(|m| m["vm"] == id.as_str()).count(),
            1,
            "one successful migration of {id}: {:#}",
            view["migrations"]
        );
    }
    let events = common::texts(&view["events"], "message");
    assert!(
        events.iter().any(|e| e.contains("resumes operation")),
        "{events:#?}"
    );
    // And its metrics count the moves it did not make.
    let (status, metrics) = other.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("ferry_migrations_total{result=\"succeeded\"} 3"),
        "{metrics}"
    );
}

#[test]
fn losing_etcd_members_keeps_vms_running_refuses_writes_without_quorum_and_loses_nothing() {
    let test =
        "losing_etcd_members_keeps_vms_running_refuses_writes_without_quorum_and_loses_nothing";
    let Some(binary) = etcd_binary(test) else {
        return;
    };
    let mut ha = Ha::start("quorum", binary);
    let leader = ha.leader().name.clone();
    let first = ha.create_on(
        ha.replica(&leader),
        "b",
        "--steps 1000000 --print-every 1000",
    );

    // One member down: everything works.
    ha.etcd.kill_member(0);
    let second = ha.create_on(
        ha.replica(&leader),
        "c",
        "--steps 1000000 --print-every 1000",
    );

    // Two down: no quorum. Writes are refused, saying why; reads answer; VMs run on.
    ha.etcd.kill_member(1);
    let refused = wait_for("writes to be refused", Duration::from_secs(20), || {
        let (status, body) = ha.replica(&leader).call(
            "POST",
            "/v1/vms",
            Some(serde_json::json!({"workload": "hello", "memory": 64u64 << 20})),
        );
        (status == 503).then_some(body)
    });
    let code = refused["code"].as_str().unwrap_or_default();
    assert!(
        [
            "store_unavailable",
            "no_leader",
            "not_leader",
            "leader_unreachable"
        ]
        .contains(&code),
        "{refused}"
    );
    for r in &ha.replicas {
        let (status, hosts) = r.call("GET", "/v1/hosts", None);
        assert_eq!(status, 200, "{hosts}");
        assert_eq!(hosts.as_array().unwrap().len(), 3);
        let (status, vms) = r.call("GET", "/v1/vms", None);
        assert_eq!(status, 200, "{vms}");
    }
    for id in [&first, &second] {
        assert_eq!(ha.hosts_running(id).len(), 1, "{id}");
    }

    // Quorum back: a leader again, writes taken, nothing lost.
    ha.etcd.start_member(0);
    ha.etcd.start_member(1);
    let any = &ha.replicas[0];
    let third = wait_for("writes to be taken again", Duration::from_secs(30), || {
        let (status, placed) = any.call(
            "POST",
            "/v1/vms",
            Some(serde_json::json!({
                "workload": "mlp-train", "memory": 64u64 << 20, "accel_memory": 32u64 << 20,
                "args": ["--steps", "1000000", "--print-every", "1000"], "host": "a",
            })),
        );
        (status == 201).then(|| placed["vm"]["id"].as_str().unwrap().to_string())
    });
    let store = EtcdStore::open(&[ha.etcd.endpoints()], "/quorum/").unwrap();
    let stored: Vec<String> = store
        .load()
        .unwrap()
        .vms
        .into_iter()
        .map(|v| v.id)
        .collect();
    for id in [&first, &second, &third] {
        assert!(stored.contains(id), "{id} not in {stored:?}");
    }
}

#[test]
fn a_stale_leader_woken_after_its_lease_ended_writes_nothing_and_follows() {
    let test = "a_stale_leader_woken_after_its_lease_ended_writes_nothing_and_follows";
    let Some(binary) = etcd_binary(test) else {
        return;
    };
    let ha = Ha::start("stale", binary);
    let stale = ha.leader();
    let stale_name = stale.name.clone();
    let etcd = Etcd::new(&[ha.etcd.endpoints()], Duration::from_secs(2)).unwrap();
    // The leader's term: its key's creation revision, in this etcd cluster.
    let term = || {
        let read = etcd
            .txn(&[], &[Op::Get("/stale/leader".into())], &[])
            .unwrap();
        read.read.first().map(|kv| ferry_api::LeaderTerm {
            cluster: read.cluster,
            revision: kv.create_revision,
        })
    };
    let stale_term = term().expect("a leader key");
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(stale.pid(), libc::SIGSTOP) };
    let new_leader = ha.new_leader_after(&stale_name);
    // An order the stale leader had on its way when it was paused, arriving now: the
    // host heard the new leader's term in its heartbeats' answers, and refuses it,
    // though the new leader has ordered it nothing.
    let order = |term: ferry_api::LeaderTerm| {
        let sent = common::host_api(ha.daemon("a"))
            .with_header(ferry_api::LEADER_TERM_HEADER, term.header_value())
            .post::<_, Value>(
                "/v1/vms/none/migrate",
                &serde_json::json!({ "to": "127.0.0.1:1" }),
            );
        let e = sent.expect_err("there is no such VM");
        e.api().map(|e| e.code.clone().unwrap_or_default())
    };
    wait_for(
        "host a to refuse the stale leader's order",
        Duration::from_secs(10),
        || (order(stale_term).as_deref() == Some("stale_leader")).then_some(()),
    );
    let new_term = term().expect("the new leader's key");
    assert_eq!(new_term.cluster, stale_term.cluster);
    assert_ne!(new_term.cluster, 0, "etcd names its cluster");
    assert!(new_term.revision > stale_term.revision);
    assert_eq!(order(new_term).as_deref(), Some("vm_not_found"));
    let events_before = maintenance_event_count(&ha.etcd.endpoints(), "/stale/");
    // SAFETY: as above.
    unsafe { libc::kill(stale.pid(), libc::SIGCONT) };
    // Its first act awake: a write. It is forwarded to the new leader or refused; the
    // stale replica itself records nothing.
    let (status, body) = stale.call("POST", "/v1/hosts/a/maintenance", None);
    assert!(
        matches!(status, 202 | 503),
        "{status} {body}; the stale replica's process: {}",
        process_state(stale.pid())
    );
    wait_for(
        "the stale replica to follow",
        Duration::from_secs(10),
        || (stale.leader()? == new_leader).then_some(()),
    );
    let view = stale.cluster().unwrap();
    assert_ne!(view["leader"]["name"], stale_name, "{view:#}");
    if status == 503 {
        assert_eq!(
            maintenance_event_count(&ha.etcd.endpoints(), "/stale/"),
            events_before,
            "a refused write recorded nothing"
        );
    }
}

/// Process `pid`'s state line in /proc (running, stopped, a zombie: then with how it
/// ended), or "gone": a failure to reach a replica then says whether its process still
/// runs, and if not, whether a signal ended it.
fn process_state(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let Some(state) = status.lines().find(|l| l.starts_with("State:")) else {
        return "gone".into();
    };
    // A zombie's wait status is the last field of its stat line (Linux 3.5 and later).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ended = (stat.split_whitespace().last())
        .and_then(|w| w.parse::<i32>().ok())
        .filter(|_| state.contains("zombie"))
        .map(|w| match w & 0x7f {
            0 => format!(", exited with {}", (w >> 8) & 0xff),
            signal => format!(", ended by signal {signal}"),
        });
    format!("{}{}", state.trim(), ended.unwrap_or_default())
}

/// Events stored under `prefix` that a maintenance order records ("maintenance",
/// "migration"). Others, such as a host seen down or up while the replicas change
/// hands, may be recorded at any time by the new leader.
fn maintenance_event_count(endpoints: &str, prefix: &str) -> usize {
    let etcd = Etcd::new(&[endpoints.to_string()], Duration::from_secs(2)).unwrap();
    etcd.range(&format!("{prefix}events/"), true, Default::default())
        .unwrap()
        .iter()
        .filter(|kv| {
            let event: Value = serde_json::from_slice(&kv.value).unwrap();
            matches!(event["kind"].as_str(), Some("maintenance" | "migration"))
        })
        .count()
}

/// A fresh etcd cluster for one test (kept running while it lives), a client of it, and
/// the prefix of that test's keys.
struct ScratchEtcd {
    _cluster: EtcdCluster,
    etcd: Etcd,
    prefix: String,
}

impl ScratchEtcd {
    /// Starts one named `name` for `test`, its keys under `/NAME/`; none, said loudly,
    /// where etcd is missing.
    fn start(test: &str, name: &str) -> Option<Self> {
        let cluster = EtcdCluster::start(ferry_testdata::etcd(test)?, name);
        let etcd = Etcd::new(&[cluster.endpoints()], Duration::from_secs(2)).unwrap();
        Some(Self {
            _cluster: cluster,
            etcd,
            prefix: format!("/{name}/"),
        })
    }

    /// A store on the test's keys, as a center replica opens it.
    fn store(&self) -> EtcdStore {
        EtcdStore::open(&[self.etcd.endpoints()], &self.prefix).unwrap()
    }

    /// [`ScratchEtcd::start`], with a store on the test's keys that leads (its leader
    /// key holds `me`).
    fn leading(test: &str, name: &str) -> Option<(Self, EtcdStore)> {
        let scratch = Self::start(test, name)?;
        let store = scratch.store();
        scratch.take_lead(&store, b"me");
        Some((scratch, store))
    }

    /// Makes `store` the leader: creates its vacant leader key with `value`, as a
    /// replica that wins the lead does, and fences its writes with that leadership.
    fn take_lead(&self, store: &EtcdStore, value: &[u8]) {
        let key = &store.key("leader");
        let outcome = self
            .etcd
            .txn(
                &[Compare::CreateRevision(key.to_string(), 0)],
                &[
                    Op::Put {
                        key: key.to_string(),
                        value: value.to_vec(),
                        lease: None,
                    },
                    Op::Get(key.to_string()),
                ],
                &[],
            )
            .unwrap();
        assert!(outcome.succeeded);
        store.set_fence(Some(Fence {
            key: key.to_string(),
            create_revision: outcome.read[0].create_revision,
            cluster: outcome.cluster,
        }));
    }
}

#[test]
fn a_replica_that_finds_its_name_on_a_leader_key_it_does_not_hold_does_not_lead() {
    let test = "a_replica_that_finds_its_name_on_a_leader_key_it_does_not_hold_does_not_lead";
    let Some(scratch) = ScratchEtcd::start(test, "twin") else {
        return;
    };
    let (etcd, prefix) = (&scratch.etcd, scratch.prefix.clone());
    // Another replica going by the same name and URL (both left to their defaults, say)
    // leads, under its own lease, kept alive.
    let listen = format!("127.0.0.1:{}", free_ports("127.0.0.1", 1)[0]);
    let twin = serde_json::json!({ "name": "c1", "url": format!("http://{listen}") });
    // Long, so that no stall of this loaded machine lets it end before it is revoked.
    let lease = etcd.grant_lease(Duration::from_secs(30)).unwrap();
    let put = Op::Put {
        key: format!("{prefix}leader"),
        value: serde_json::to_vec(&twin).unwrap(),
        lease: Some(lease),
    };
    etcd.txn(&[], &[put], &[]).unwrap();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let endpoints = etcd.endpoints();
    let renewer = std::thread::spawn(move || {
        let etcd = Etcd::new(&[endpoints], Duration::from_secs(2)).unwrap();
        while stopped.recv_timeout(Duration::from_millis(500)) == Err(RecvTimeoutError::Timeout) {
            let _ = etcd.keep_alive(lease);
        }
    });
    let replica = Replica::start_on(&listen, "c1", &etcd.endpoints(), &prefix);
    // A leader records that it leads at once; several campaigns later, nothing.
    let events = || {
        etcd.range(&format!("{prefix}events/"), true, Default::default())
            .unwrap()
            .len()
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(events(), 0, "it led on a key another replica holds");
    // The twin's lease ends: the replica takes the lead (and records so).
    drop(stop);
    renewer.join().unwrap();
    etcd.revoke_lease(lease).unwrap();
    wait_for("the replica to lead", Duration::from_secs(20), || {
        (events() > 0).then_some(())
    });
    drop(replica);
}

#[test]
fn a_write_fenced_by_a_replaced_leadership_changes_nothing() {
    let test = "a_write_fenced_by_a_replaced_leadership_changes_nothing";
    let Some(scratch) = ScratchEtcd::start(test, "fence") else {
        return;
    };
    let (old, new) = (scratch.store(), scratch.store());
    scratch.take_lead(&old, b"old");
    let event = |message: &str| ferry_center::inventory::Event::now("test", message.into());
    old.add_event(&event("while leading")).unwrap();
    // Its lease ends (the key goes) and another replica takes the lead.
    let lease_end = Op::Delete(old.key("leader"));
    scratch.etcd.txn(&[], &[lease_end], &[]).unwrap();
    scratch.take_lead(&new, b"new");
    assert!(matches!(
        old.add_event(&event("after losing the lead")),
        Err(StoreError::NotLeader)
    ));
    assert!(matches!(old.writable(), Err(StoreError::NotLeader)));
    new.add_event(&event("the new leader")).unwrap();
    let mut messages: Vec<String> = new
        .events(10)
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    messages.sort();
    assert_eq!(messages, vec!["the new leader", "while leading"]);
}

#[test]
fn the_center_benchmark_leaves_nothing_in_the_etcd_it_used() {
    let test = "the_center_benchmark_leaves_nothing_in_the_etcd_it_used";
    let Some(scratch) = ScratchEtcd::start(test, "bench") else {
        return;
    };
    let out = common::ferry(&[
        "bench",
        "center",
        "--hosts",
        "2",
        "--vms-per-host",
        "2",
        "--seconds",
        "1",
        "--etcd",
        &scratch.etcd.endpoints(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The run wrote its hosts and VMs under its prefix, and deleted them at its end.
    assert_eq!(scratch.etcd.count("/ferry-bench-").unwrap(), 0);
}

#[test]
fn the_etcd_store_deletes_forgotten_and_older_migrations() {
    let test = "the_etcd_store_deletes_forgotten_and_older_migrations";
    let Some((_scratch, store)) = ScratchEtcd::leading(test, "prune") else {
        return;
    };
    let record = ferry_center::inventory::MigrationRecord::default();
    for id in 1..=5 {
        assert_eq!(store.add_migration(&record).unwrap(), id);
    }
    let stored = || -> Vec<i64> {
        store
            .load()
            .unwrap()
            .migrations
            .iter()
            .map(|m| m.id)
            .collect()
    };
    store.forget_migrations(&[2]).unwrap();
    assert_eq!(stored(), [1, 3, 4, 5]);
    store.prune_before(Some(4), None).unwrap();
    assert_eq!(stored(), [4, 5]);
    // Ids keep counting on.
    assert_eq!(store.add_migration(&record).unwrap(), 6);
}

#[test]
fn the_etcd_store_keeps_only_the_newest_events() {
    let test = "the_etcd_store_keeps_only_the_newest_events";
    let Some((_scratch, store)) = ScratchEtcd::leading(test, "events") else {
        return;
    };
    let now = ferry_center::inventory::unix_ms();
    for i in 0..12u64 {
        let event = ferry_center::inventory::Event {
            at_ms: now + i,
            kind: "test".into(),
            message: format!("event {i}"),
        };
        store.add_event(&event).unwrap();
    }
    let left = || -> Vec<String> {
        (store.events(100).unwrap().into_iter())
            .map(|e| e.message)
            .collect()
    };
    // A sweep deletes at most so many, the oldest; the next goes on.
    store.keep_newest_events(5, 4).unwrap();
    assert_eq!(left().len(), 8);
    assert_eq!(left().last().map(String::as_str), Some("event 4"));
    store.keep_newest_events(5, 4).unwrap();
    assert_eq!(
        left(),
        ["event 11", "event 10", "event 9", "event 8", "event 7"]
    );
    // Within the bound, nothing goes.
    store.keep_newest_events(5, 4).unwrap();
    assert_eq!(store.events(100).unwrap().len(), 5);
}
