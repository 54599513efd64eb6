//! The fault matrix: a migration between two real daemons (child processes) through a
//! frame-aware proxy that cuts, freezes, blackholes or corrupts the link, or kills or
//! stops a daemon, at an exact protocol step; plus racing stops and cancels, a full
//! destination and a snapshot save that fails (a wrong secret: `migration.rs`). Every
//! case must end with the VM running (or run to its end) on exactly one host with the
//! checksum of an unmigrated run, never two, and with an error that names the phase.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// The proxy.
// ---------------------------------------------------------------------------------------

/// Control messages by their index in the protocol's `Message` enum (the first byte of
/// a control frame's payload).
const OFFER: u8 = 4;
const BEGIN_ROUND: u8 = 7;
const STATE: u8 = 10;
const GO: u8 = 12;
/// Frame kinds.
const KIND_CONTROL: u8 = 1;

/// When the fault strikes: at a frame from the source.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    /// A control message (`BeginRound` of a given round, if `round` is set).
    Control { message: u8, round: Option<u8> },
    /// The first data frame after this many bytes of data frames.
    DataBytes(u64),
}

/// What the fault does.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// Shut every connection open now (new ones go through).
    Cut,
    /// Stop carrying anything on every connection open now, without closing it.
    Blackhole,
    /// Flip a bit of the triggering frame's payload.
    Corrupt,
    /// Kill the destination daemon (SIGKILL).
    KillDestination,
    /// Freeze the destination daemon (SIGSTOP; SIGCONT when the case ends).
    FreezeDestination,
    /// Kill the source daemon.
    KillSource,
}

/// A fault: the action, when, and whether the triggering frame is forwarded first.
#[derive(Clone, Copy, Debug)]
struct Fault {
    trigger: Trigger,
    action: Action,
    after_forwarding: bool,
}

#[derive(Default)]
struct ProxyState {
    /// Both sockets of every connection so far.
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Connections below this index carry nothing more.
    blackholed_below: AtomicUsize,
    data_bytes: AtomicU64,
    fired: AtomicBool,
    stop: AtomicBool,
    /// The destination is dead: its port refuses connections, so the listener closes.
    refusing: AtomicBool,
}

/// A TCP proxy in front of a destination's migration port.
struct Proxy {
    addr: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// Forwards to `target`; `fault` strikes once, through `act` for the daemon actions.
    fn start(target: String, fault: Option<Fault>, act: Arc<dyn Fn(Action) + Send + Sync>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                if shared.refusing.load(Ordering::SeqCst) {
                    // Dropped: connecting now gets "connection refused", as from a host
                    // whose daemon died.
                    return;
                }
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let index = {
                    let mut conns = shared.conns.lock().unwrap();
                    conns.push((client.try_clone().unwrap(), server.try_clone().unwrap()));
                    conns.len() - 1
                };
                let (up, down) = (shared.clone(), shared.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let act = act.clone();
                std::thread::spawn(move || frames(index, client, server, &up, fault, &*act));
                std::thread::spawn(move || bytes(index, s2, c2, &down));
            }
        });
        Self { addr, state }
    }

    fn blackholed(state: &ProxyState, index: usize) -> bool {
        index < state.blackholed_below.load(Ordering::SeqCst)
    }

    /// Holds a blackholed connection open, carrying nothing, until the proxy stops.
    fn hold(state: &ProxyState) {
        while !state.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shuts both sockets of every connection open now.
    fn shut_all(state: &ProxyState) {
        for (a, b) in state.conns.lock().unwrap().iter() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn strike(state: &ProxyState, action: Action, act: &dyn Fn(Action)) {
        match action {
            Action::Cut => Self::shut_all(state),
            Action::Blackhole => {
                let n = state.conns.lock().unwrap().len();
                state.blackholed_below.store(n, Ordering::SeqCst);
            }
            Action::Corrupt => {}
            Action::KillDestination => {
                state.refusing.store(true, Ordering::SeqCst);
                // A dead daemon's kernel resets its connections, so the source learns at
                // once. Passed on before the kill: a proxy still reading would let the rest
                // of a small round 0 fit into its buffers, and the source would first hear
                // of the death in round 1.
                Self::shut_all(state);
                act(action);
            }
            other => act(other),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        Self::shut_all(&self.state);
    }
}

/// Source → destination, frame by frame, striking the fault at its frame.
fn frames(
    index: usize,
    mut from: TcpStream,
    mut to: TcpStream,
    state: &ProxyState,
    fault: Option<Fault>,
    act: &dyn Fn(Action),
) {
    let mut header = [0u8; 16];
    loop {
        if from.read_exact(&mut header).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if Proxy::blackholed(state, index) {
            return Proxy::hold(state);
        }
        let kind = header[2];
        let hit = fault.filter(|f| {
            let matches = match f.trigger {
                Trigger::Control { message, round } => {
                    kind == KIND_CONTROL
                        && payload.first() == Some(&message)
                        && round.is_none_or(|r| payload.get(1) == Some(&r))
                }
                Trigger::DataBytes(n) => {
                    kind != KIND_CONTROL && state.data_bytes.load(Ordering::SeqCst) >= n
                }
            };
            matches && !state.fired.swap(true, Ordering::SeqCst)
        });
        if kind != KIND_CONTROL {
            state.data_bytes.fetch_add(len as u64, Ordering::SeqCst);
        }
        if let Some(f) = hit {
            if let Action::Corrupt = f.action {
                let at = payload.len() / 2;
                payload[at] ^= 0x40;
            }
            if !f.after_forwarding {
                Proxy::strike(state, f.action, act);
                if Proxy::blackholed(state, index) {
                    return Proxy::hold(state);
                }
            }
        }
        if to
            .write_all(&header)
            .and_then(|()| to.write_all(&payload))
            .is_err()
        {
            return;
        }
        if let Some(f) = hit.filter(|f| f.after_forwarding) {
            Proxy::strike(state, f.action, act);
        }
    }
}

/// Destination → source, as bytes.
fn bytes(index: usize, mut from: TcpStream, mut to: TcpStream, state: &ProxyState) {
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if Proxy::blackholed(state, index) {
            return Proxy::hold(state);
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------------

/// Where the VM must run at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Source,
    Destination,
    /// The source died with it: the destination must not run it.
    Nowhere,
}

/// Something other than a link fault.
#[derive(Clone, Copy, Debug)]
enum Race {
    None,
    /// `DELETE /v1/vms/ID` while it migrates.
    Stop,
    /// `DELETE /v1/vms/ID/migration` while it migrates.
    Cancel,
}

struct Case {
    name: &'static str,
    fault: Option<Fault>,
    race: Race,
    /// Flags of the destination daemon.
    destination: &'static [&'static str],
    /// The pause target (a small one makes several rounds).
    downtime_ms: u64,
    expect: Expect,
    /// What the failed migration's error (or the settlement) must say.
    says: &'static [&'static str],
}

const fn at(trigger: Trigger, action: Action, after_forwarding: bool) -> Option<Fault> {
    Some(Fault {
        trigger,
        action,
        after_forwarding,
    })
}

const fn control(message: u8) -> Trigger {
    Trigger::Control {
        message,
        round: None,
    }
}

const ROUND_2: Trigger = Trigger::Control {
    message: BEGIN_ROUND,
    round: Some(2),
};
const ROUND_0_DATA: Trigger = Trigger::DataBytes(256 << 10);

fn case(
    name: &'static str,
    fault: Option<Fault>,
    expect: Expect,
    says: &'static [&'static str],
) -> Case {
    Case {
        name,
        fault,
        race: Race::None,
        destination: &[],
        downtime_ms: 50,
        expect,
        says,
    }
}

fn cases() -> Vec<Case> {
    use Action::*;
    use Expect::*;
    vec![
        case(
            "destination killed during the handshake",
            at(control(OFFER), KillDestination, false),
            Source,
            &["handshake"],
        ),
        case(
            "destination killed in round 0",
            at(ROUND_0_DATA, KillDestination, false),
            Source,
            &["round 0"],
        ),
        Case {
            downtime_ms: 1,
            ..case(
                "destination killed in round 2",
                at(ROUND_2, KillDestination, false),
                Source,
                &["round 2"],
            )
        },
        case(
            "destination killed at the switchover",
            at(control(STATE), KillDestination, false),
            Source,
            &["switchover"],
        ),
        case(
            "destination killed after Go",
            at(control(GO), KillDestination, true),
            Source,
            &["outcome unknown", "no daemon listens"],
        ),
        Case {
            downtime_ms: 1,
            ..case(
                "source killed during pre-copy",
                at(ROUND_2, KillSource, false),
                Nowhere,
                &[],
            )
        },
        case(
            "destination frozen during pre-copy",
            at(ROUND_0_DATA, FreezeDestination, false),
            Source,
            &["timed out in pre-copy round 0"],
        ),
        case(
            "destination frozen at the switchover",
            at(control(STATE), FreezeDestination, false),
            Source,
            &["switchover", "deadline"],
        ),
        case(
            "link cut during the handshake",
            at(control(OFFER), Cut, false),
            Source,
            &["handshake"],
        ),
        case(
            "link cut in round 0",
            at(ROUND_0_DATA, Cut, false),
            Source,
            &["round 0"],
        ),
        Case {
            downtime_ms: 1,
            ..case(
                "link cut in round 2",
                at(ROUND_2, Cut, false),
                Source,
                &["round 2"],
            )
        },
        case(
            "link cut at the switchover",
            at(control(STATE), Cut, false),
            Source,
            &["switchover"],
        ),
        case(
            "link cut after Go",
            at(control(GO), Cut, true),
            Destination,
            &["outcome unknown", "runs the VM"],
        ),
        case(
            "link silent in round 0",
            at(ROUND_0_DATA, Blackhole, false),
            Source,
            &["timed out in pre-copy round 0"],
        ),
        case(
            "link silent at the switchover",
            at(control(STATE), Blackhole, false),
            Source,
            &["deadline"],
        ),
        case(
            "link silent after Go",
            at(control(GO), Blackhole, true),
            Destination,
            &["outcome unknown", "runs the VM"],
        ),
        case(
            "stream corrupted mid-round",
            at(ROUND_0_DATA, Corrupt, false),
            Source,
            &["checksum"],
        ),
        Case {
            race: Race::Stop,
            downtime_ms: 1,
            ..case("a stop racing the migration", None, Destination, &[])
        },
        Case {
            race: Race::Cancel,
            downtime_ms: 1,
            ..case(
                "a cancel racing the migration",
                None,
                Source,
                &["cancelled"],
            )
        },
        Case {
            destination: &["--memory-capacity", "64M"],
            ..case(
                "the destination out of memory",
                None,
                Source,
                &["not enough memory"],
            )
        },
    ]
}

const ARGS: &str = "--steps 8000 --print-every 4000";

/// `kill -SIG pid`.
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

/// Where `id` runs (or ran to its end) among the daemons still alive.
fn running_on(daemons: &[(&str, &Daemon, bool)], id: &str) -> Vec<String> {
    daemons
        .iter()
        .filter(|(_, _, alive)| *alive)
        .filter_map(|(name, d, _)| {
            let api = host_api(d);
            // A daemon that should be up and does not answer: say whether it still runs
            // (a reset connection once came from one thought alive).
            let vms: Vec<Value> = api.get("/v1/vms").unwrap_or_else(|e| {
                let pid = d.child.id();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_else(|_| "gone".into());
                panic!("daemon {name} (pid {pid}, /proc stat: {stat}) did not list its VMs: {e:#}")
            });
            vms.iter()
                .find(|vm| vm["id"] == id && (vm["state"] == "running" || vm["state"] == "exited"))
                .map(|_| name.to_string())
        })
        .collect()
}

fn run_case(c: &Case, expected: &str) {
    let source = Daemon::start("a");
    let destination = Daemon::start_with("b", c.destination);
    let (src_pid, dst_pid) = (source.child.id(), destination.child.id());
    let killed_src = Arc::new(AtomicBool::new(false));
    let killed_dst = Arc::new(AtomicBool::new(false));
    let frozen = Arc::new(AtomicBool::new(false));
    let act = {
        let (ks, kd, fr) = (killed_src.clone(), killed_dst.clone(), frozen.clone());
        Arc::new(move |action: Action| match action {
            Action::KillDestination => {
                kd.store(true, Ordering::SeqCst);
                signal(dst_pid, "-KILL");
            }
            Action::KillSource => {
                ks.store(true, Ordering::SeqCst);
                signal(src_pid, "-KILL");
            }
            Action::FreezeDestination => {
                fr.store(true, Ordering::SeqCst);
                signal(dst_pid, "-STOP");
            }
            _ => unreachable!(),
        })
    };
    let proxy = Proxy::start(destination.migration.clone(), c.fault, act);
    let src = host_api(&source);
    let args: Vec<&str> = ARGS.split_whitespace().collect();
    let id = source.create_with(["mlp-train", "64M", "32M"], &[], &args);
    // Past its first step, the VM's device holds its dataset and weights: a round 0 of
    // megabytes, so a fault at ROUND_0_DATA strikes in round 0 (the seed line comes
    // before they are made, and a migration begun then could carry them in round 1).
    source.wait_console(&id, "step=1 loss");
    let started = Instant::now();
    let _: Value = src
        .post(
            &format!("/v1/vms/{id}/migrate"),
            &json!({ "to": proxy.addr, "downtime_ms": c.downtime_ms, "max_rounds": 6, "allow_longer_pause": true }),
        )
        .unwrap();
    match c.race {
        Race::None => {}
        Race::Stop => {
            let refused = src.delete::<Value>(&format!("/v1/vms/{id}")).unwrap_err();
            let refused = format!("{refused:#}");
            assert!(
                refused.contains("HTTP 409") && refused.contains("being migrated"),
                "{refused}"
            );
        }
        Race::Cancel => {
            let _: Value = src.delete(&format!("/v1/vms/{id}/migration")).unwrap();
        }
    }
    // The outcome, and where the VM settles.
    let mut said = String::new();
    if !killed_src.load(Ordering::SeqCst) {
        loop {
            // The VM first: settling notes its answer before it moves the VM on, so a
            // status read after a VM no longer in doubt holds the note.
            let vm: Value = match src.get(&format!("/v1/vms/{id}")) {
                Ok(vm) => vm,
                Err(_) if killed_src.load(Ordering::SeqCst) => break,
                Err(e) => panic!("{}: {e:#}", c.name),
            };
            let status: Value = match src.get(&format!("/v1/vms/{id}/migration")) {
                Ok(s) => s,
                Err(_) if killed_src.load(Ordering::SeqCst) => break,
                Err(e) => panic!("{}: {e:#}", c.name),
            };
            // The migration ended, and the VM is past it: not still in the switchover
            // (the status may say failed a moment before the VM says in doubt) nor in
            // doubt.
            let settled = status["state"] != "running"
                && !["migrating", "switchover", "in-doubt"]
                    .contains(&vm["state"].as_str().unwrap_or(""));
            if settled {
                said = format!(
                    "{} {}",
                    status["error"].as_str().unwrap_or(""),
                    status["settlement"]
                );
                if status["state"] == "succeeded" {
                    let pause = status["report"]["downtime_ms"].as_f64().unwrap();
                    assert!(pause < 1050.0, "{}: paused {pause} ms", c.name);
                }
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{}: never settled: {status}",
                c.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if frozen.load(Ordering::SeqCst) {
        signal(dst_pid, "-CONT");
    }
    for word in c.says {
        assert!(said.contains(word), "{}: {word:?} not in {said:?}", c.name);
    }
    let daemons = [
        ("a", &source, !killed_src.load(Ordering::SeqCst)),
        ("b", &destination, !killed_dst.load(Ordering::SeqCst)),
    ];
    let places = running_on(&daemons, &id);
    let want: &[&str] = match c.expect {
        Expect::Source => &["a"],
        Expect::Destination => &["b"],
        Expect::Nowhere => &[],
    };
    assert_eq!(places, want, "{}: {said}", c.name);
    if let Some(name) = want.first() {
        let d = if *name == "a" { &source } else { &destination };
        assert_eq!(d.checksum_at_exit(&id), expected, "{}", c.name);
    }
    // The destination keeps no reservation for a VM it does not run (it discards a
    // half-received one when its connections end).
    if !killed_dst.load(Ordering::SeqCst) && c.expect != Expect::Destination {
        drop(proxy);
        let api = host_api(&destination);
        let started = Instant::now();
        while api.get::<Value>("/v1/host").unwrap()["memory_used"] != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(150),
                "{}: b kept the reservation",
                c.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "fault matrix: {} -> VM on {want:?} ({:.1} s): {said}",
        c.name,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn every_fault_leaves_the_vm_on_exactly_one_host() {
    ferry_testdata::require_kvm!(kvm_available);
    let expected = reference("mlp-train", "64M", "32M", ARGS);
    // Two cases at a time, each with daemons of its own: most of a case is waiting (for
    // a timeout, a settlement, the VM's end), so one at a time left a core idle.
    let cases = cases();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while let Some(c) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    run_case(c, &expected);
                }
            });
        }
    });
}

#[test]
fn a_failed_snapshot_save_leaves_the_vm_running_to_its_end() {
    ferry_testdata::require_kvm!(kvm_available);
    let dir = ferry_testdata::scratch_dir("failed-save");
    // A folder where the snapshot must go: the save's temporary cannot be renamed there.
    let _ = std::fs::remove_dir_all(&dir);
    let in_the_way = dir.join("vm.snap");
    std::fs::create_dir_all(&in_the_way).unwrap();
    let out = ferry(&[
        "run",
        "mlp-train",
        "--memory",
        "64M",
        "--accel-memory",
        "32M",
        "--snapshot-at-ms",
        "200",
        "--snapshot-dir",
        dir.to_str().unwrap(),
        "--",
        "--steps",
        "8000",
        "--print-every",
        "4000",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot save the snapshot"), "{stderr}");
    assert!(stderr.contains("the VM continues"), "{stderr}");
    // It ran to its end, with the unmigrated checksum, and no snapshot was left.
    assert_eq!(
        checksum(&text(&out.stdout)),
        reference("mlp-train", "64M", "32M", ARGS)
    );
    assert!(in_the_way.is_dir());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "a temporary was left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
