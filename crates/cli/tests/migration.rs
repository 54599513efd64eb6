//! Live migration between real `ferry host serve` daemons on loopback, driven through
//! the `ferry vm` and `ferry migrate` commands: results bit-identical to unmigrated runs,
//! convergence and its failure, and failures that must leave the VM running on the
//! source (destination killed, connection cut during the switchover).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{ferry, kvm_available, reference, report, text, wait_for, Daemon};

/// Training long enough (about 1 s in a debug build) that the VM is still running when
/// its second migration switches over, even on a loaded machine: with 400 steps it
/// sometimes ended first, and the move failed with "it is exited".
const MLP: &str = "--steps 1200 --print-every 20";

/// Hosts a and b, and an `mlp-train` VM of [`MLP`] on a that has trained 60 steps.
fn training_on_a() -> (Daemon, Daemon, String) {
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let id = a.create("mlp-train", "32M", MLP);
    a.wait_console(&id, "step=60 ");
    (a, b, id)
}

#[test]
fn mlp_train_moves_a_to_b_to_a_with_the_unmigrated_checksum() {
    ferry_testdata::require_kvm!(kvm_available);
    let (a, b, id) = training_on_a();
    let there = report(&a.migrate(&id, &b.migration, &[]));
    assert_eq!(there["mode"], "live");
    assert!(there["rounds"].as_u64().unwrap() >= 2, "{there}");
    assert_eq!(a.show(&id)["state"], "migrated-away");
    b.wait_console(&id, "step=140 ");
    let back = report(&b.migrate(&id, &a.migration, &["--streams", "3"]));
    assert!(back["bytes_sent"].as_u64().unwrap() > 0);
    assert_eq!(b.show(&id)["state"], "migrated-away");
    a.assert_unmigrated_checksum(&id, "mlp-train", "32M", MLP);
}

#[test]
fn mlp_train_moves_by_command_replay_both_ways_with_the_unmigrated_checksum() {
    ferry_testdata::require_kvm!(kvm_available);
    let (a, b, id) = training_on_a();
    for (from, to, step) in [(&a, &b, "step=140 "), (&b, &a, "step=220 ")] {
        let r = report(&from.migrate(&id, &to.migration, &common::BY_REPLAY));
        assert_eq!(r["device_transfer"], "replay", "{r}");
        let replayed = &r["replay"];
        // Every command the device ran after the boundary was sent (a move this short
        // may find the guest between steps, with none).
        assert_eq!(
            replayed["commands"], replayed["capture"]["commands_logged"],
            "{r}"
        );
        assert!(replayed["base_bytes"].as_u64().unwrap() > 0, "{r}");
        // After the base, the device moved as commands, never as chunks.
        let rounds = r["round_log"].as_array().unwrap();
        assert!(rounds[1..].iter().all(|round| round["chunks"] == 0), "{r}");
        assert_eq!(from.show(&id)["state"], "migrated-away");
        to.wait_console(&id, step);
    }
    a.assert_unmigrated_checksum(&id, "mlp-train", "32M", MLP);
}

#[test]
fn llm_decode_moves_with_the_unmigrated_checksum() {
    ferry_testdata::require_kvm!(kvm_available);
    // Long enough (seconds) that a migration after token 8 finds the VM still decoding.
    let args = "--tokens 3000 --weights-mib 8 --print-every 4";
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let id = a.create("llm-decode", "32M", args);
    a.wait_console(&id, "token=8 ");
    let r = report(&a.migrate(&id, &b.migration, &["--compress"]));
    // The weights cross (compressed); the 24 MiB of zero device memory and most of
    // the zero RAM do not.
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(sent > 1 << 20 && sent < 16 << 20, "{r}");
    assert!(r["round_log"][0]["chunks"].as_u64().unwrap() >= 32, "{r}");
    // Each token appends a row to the KV cache: later rounds send those rows, not
    // their chunks.
    let parts: u64 = r["round_log"].as_array().unwrap()[1..]
        .iter()
        .map(|round| round["chunk_parts"].as_u64().unwrap())
        .sum();
    assert!(parts > 0, "{r}");
    b.assert_unmigrated_checksum(&id, "llm-decode", "32M", args);
}

const MEMTOUCH: &str = "--mib 32 --passes 1200";

#[test]
fn dirtying_faster_than_the_link_fails_cleanly_or_converges_by_throttling() {
    ferry_testdata::require_kvm!(kvm_available);
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let expected = reference("memtouch", "64M", "0", MEMTOUCH);
    let id = a.create("memtouch", "0", MEMTOUCH);
    std::thread::sleep(Duration::from_millis(300));
    let out = a.migrate(
        &id,
        &b.migration,
        &["--no-throttle", "--downtime-ms", "1", "--max-rounds", "3"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("did not converge") && err.contains("keeps running"),
        "{err}"
    );
    assert_eq!(a.show(&id)["state"], "running");
    assert!(
        b.vm(&["list"]).as_array().unwrap().is_empty(),
        "nothing left on b"
    );

    // With throttling allowed, the same VM moves.
    let r = report(&a.migrate(&id, &b.migration, &["--downtime-ms", "50"]));
    eprintln!(
        "memtouch converged: pause {} ms after {} rounds, throttle up to {}%",
        r["downtime_ms"], r["rounds"], r["max_throttle_pct"]
    );
    assert_eq!(b.checksum_at_exit(&id), expected);
}

#[test]
fn destination_killed_during_precopy_leaves_the_vm_running_on_the_source() {
    ferry_testdata::require_kvm!(kvm_available);
    let a = Daemon::start("a");
    let mut b = Daemon::start("b");
    let args = "--mib 96 --passes 40 --rate-mib-s 200";
    let expected = reference("memtouch", "512M", "0", args);
    let id = a.vm(&[
        "create",
        "memtouch",
        "--memory",
        "512M",
        "--",
        "--mib",
        "96",
        "--passes",
        "40",
        "--rate-mib-s",
        "200",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(200));
    let to = b.migration.clone();
    let migrate = std::thread::spawn({
        let api = a.api.clone();
        let id = id.clone();
        move || {
            ferry(&[
                "migrate",
                &id,
                "--to",
                &to,
                "--host",
                &api,
                "--json",
                "--no-throttle",
                "--downtime-ms",
                "1",
                "--max-rounds",
                "1000",
            ])
        }
    });
    // Kill b once pre-copy is under way.
    wait_for("pre-copy to begin", Duration::from_secs(30), || {
        (a.show(&id)["state"] == "migrating").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    b.child.kill().unwrap();
    let out = migrate.join().unwrap();
    assert!(
        !out.status.success(),
        "the migration cannot succeed without b"
    );
    assert_eq!(a.show(&id)["state"], "running");
    assert_eq!(a.checksum_at_exit(&id), expected);
}

/// Forwards connections to `to` until the control stream (the first connection)
/// carries the source's final `State` message; then cuts every connection.
struct SwitchoverCutter {
    addr: String,
    cut: Arc<AtomicBool>,
}

/// Index of `Message::State` in the wire enum (postcard encodes the variant first).
const STATE_VARIANT: u8 = 10;

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    parse_control: bool,
    cut: Arc<AtomicBool>,
    all: Arc<std::sync::Mutex<Vec<TcpStream>>>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if parse_control {
            pending.extend_from_slice(&buf[..n]);
            // Forward whole frames, stopping at the State message.
            while pending.len() >= 16 {
                let len = u32::from_le_bytes(pending[4..8].try_into().unwrap()) as usize;
                if pending.len() < 16 + len {
                    break;
                }
                if pending[2] == 1 && len > 0 && pending[16] == STATE_VARIANT {
                    cut.store(true, Ordering::SeqCst);
                    for s in all.lock().unwrap().iter() {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return;
                }
                let frame: Vec<u8> = pending.drain(..16 + len).collect();
                if to.write_all(&frame).is_err() {
                    return;
                }
            }
        } else if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

impl SwitchoverCutter {
    fn start(to: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let all: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let thread_cut = cut.clone();
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(client) = conn else { return };
                let Ok(server) = TcpStream::connect(&to) else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                all.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (cut_a, cut_b) = (thread_cut.clone(), thread_cut.clone());
                let (all_a, all_b) = (all.clone(), all.clone());
                std::thread::spawn(move || pump(client, server, i == 0, cut_a, all_a));
                std::thread::spawn(move || pump(s2, c2, false, cut_b, all_b));
            }
        });
        Self { addr, cut }
    }
}

#[test]
fn connection_cut_during_switchover_leaves_the_vm_running_on_the_source_only() {
    ferry_testdata::require_kvm!(kvm_available);
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let cutter = SwitchoverCutter::start(b.migration.clone());
    let expected = reference("mlp-train", "64M", "32M", MLP);
    let id = a.create("mlp-train", "32M", MLP);
    a.wait_console(&id, "step=40 ");
    let out = a.migrate(&id, &cutter.addr, &[]);
    assert!(
        cutter.cut.load(Ordering::SeqCst),
        "the cut happened at the switchover"
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert_eq!(a.show(&id)["state"], "running");
    // b discarded what it received: nothing runs there.
    std::thread::sleep(Duration::from_millis(200));
    assert!(b.vm(&["list"]).as_array().unwrap().is_empty());
    assert_eq!(a.checksum_at_exit(&id), expected);
}

#[test]
fn wrong_secret_is_refused_by_the_api_and_by_the_migration_listener() {
    ferry_testdata::require_kvm!(kvm_available);
    let a = Daemon::start("a");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["vm", "--host", &a.api, "list"])
        .env("FERRY_SECRET", "not-the-secret-0123456789")
        .output()
        .unwrap();
    assert!(!out.status.success());
    common::assert_says(&out.stderr, "wrong API token");
    // A host with another secret cannot push a VM into a.
    let store = tempfile::tempdir().unwrap();
    let other = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "host",
            "serve",
            "--name",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--migration-listen",
            "127.0.0.1:0",
        ])
        .arg("--file-store")
        .arg(store.path())
        .env("FERRY_SECRET", "not-the-secret-0123456789")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut x = Daemon {
        child: other,
        api: String::new(),
        migration: String::new(),
        tls_ca: None,
        store,
    };
    let mut line = String::new();
    BufReader::new(x.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    x.api = line
        .split("API on ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let list = |d: &Daemon, secret: &str| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "vm", "--host", &d.api, "--json", "create", "memtouch", "--", "--passes", "100000",
            ])
            .env("FERRY_SECRET", secret)
            .output()
            .unwrap()
    };
    let created: Value =
        serde_json::from_slice(&list(&x, "not-the-secret-0123456789").stdout).unwrap();
    let id = created["id"].as_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "migrate",
            id,
            "--to",
            &a.migration,
            "--host",
            &x.api,
            "--json",
        ])
        .env("FERRY_SECRET", "not-the-secret-0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("authentication failed") || err.contains("refused"),
        "{err}"
    );
    // With --json, a script reads how it ended on stdout.
    let stdout = text(&out.stdout);
    let status: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["vm"], id, "{status}");
    assert!(
        status["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    assert!(a.vm(&["list"]).as_array().unwrap().is_empty());
}

#[test]
fn demo_migrates_and_reports_identical_checksums_as_json() {
    ferry_testdata::require_kvm!(kvm_available);
    // Enough steps after the migration point (40% in) for pre-copy to converge on a
    // loaded machine: with 40, the VM ended during round 7 once.
    let out = ferry(&["demo", "--json", "--steps", "200"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["identical"], true, "{last}");
    assert_eq!(last["checksum"], last["reference_checksum"]);
    // And an unmigrated run of its own, not the demo's comparison alone.
    let unmigrated = reference(
        "mlp-train",
        "256M",
        "256M",
        "--steps 200 --hidden 512 --batch 128 --inputs 128 --samples 8192 --print-every 6",
    );
    assert_eq!(last["checksum"], unmigrated.as_str(), "{last}");
    assert!(last["downtime_ms"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["rounds"].as_u64().unwrap() >= 2, "{last}");
    assert!(last["bytes_sent"].as_u64().unwrap() > 1 << 20, "{last}");
}
