//! An in-process host shut down leaves nothing running: its migration port closes, its
//! threads end and its VMs stop, however many times one is started and stopped. (Alone in
//! its test binary: it counts the whole process's threads.)

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ferry_api::VmState;
use ferry_host::Host;

/// This process's threads: their ids and names.
fn threads() -> std::collections::BTreeMap<u64, String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let id = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((id, name.trim().to_string()))
        })
        .collect()
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
    let before = threads();
    for n in 1..=5 {
        assert!(!one_life(n), "the migration port still takes connections");
    }
    // Every thread the later lives started has ended: given time to wind down on a
    // loaded machine (and to leave the kernel's list, which shows a joined thread a
    // moment longer). A thread of the first life's that ends meanwhile changes nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let mut left = threads();
        left.retain(|id, _| !before.contains_key(id));
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "5 hosts started and shut down: {} threads before, {} new left",
        before.len(),
        left.len()
    );
    assert!(left.is_empty(), "threads left behind: {left:?}");
}
