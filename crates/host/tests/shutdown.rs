//! An in-process host shut down leaves nothing running: its migration port closes, its
//! threads end and its VMs stop, however many times one is started and stopped. (Alone in
//! its test binary: it counts the whole process's threads.)

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ferry_api::VmState;
use ferry_host::Host;

/// This process's threads once those that just ended have left: a thread joined has
/// ended, but the kernel lists it a moment longer. Counts until two counts 20 ms apart
/// agree (up to 2 s).
fn threads_settled() -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut count = threads();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = threads();
        if now == count || std::time::Instant::now() >= deadline {
            return now;
        }
        count = now;
    }
}

fn threads() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Starts a host with a migration listener and one running VM, being migrated to a
/// destination that never answers, then shuts it down; returns whether its migration
/// port still took connections afterwards.
fn one_life(n: usize) -> bool {
    let store = std::env::temp_dir().join(format!("ferry-shutdown-{}-{n}", std::process::id()));
    let host = Host::new(common::config(
        &format!("h{n}"),
        b"shutdown-test-secret-0123456789",
        store.clone(),
        (512 << 20, 2),
        None,
    ))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    host.serve_migrations(listener).unwrap();
    let vm = host.create_vm(&common::long_memtouch(Vec::new())).unwrap();
    assert_eq!(vm.state, VmState::Running);
    let running = host.get(&vm.id).unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let request = serde_json::from_value(serde_json::json!({ "to": to })).unwrap();
    host.start_migration(&vm.id, request).unwrap();
    host.shutdown();
    drop(silent);
    assert!(running.state().has_ended(), "{:?}", running.state());
    let _ = std::fs::remove_dir_all(&store);
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn a_host_shut_down_leaves_no_thread_no_port_and_no_vm_behind() {
    if !ferry_testdata::kvm("a_host_shut_down_leaves_no_thread_no_port_and_no_vm_behind") {
        return;
    }
    // The first life starts what lives as long as the process (the accelerator
    // library's probe); the later ones must leave nothing of their own.
    assert!(!one_life(0), "the migration port still takes connections");
    let before = threads_settled();
    for n in 1..=5 {
        assert!(!one_life(n), "the migration port still takes connections");
    }
    // A thread of the last life still winding down on a loaded machine is given time;
    // one of the first life's that ends meanwhile leaves fewer, which leaks nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = threads_settled();
    while after > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = threads();
    }
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    eprintln!("5 hosts started and shut down: threads {before} -> {after}");
    assert!(after <= before, "threads left behind: {names:?}");
}
