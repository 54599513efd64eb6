//! An in-process host shut down leaves nothing running: its migration port closes, its
//! threads end and its VMs stop, however many times one is started and stopped.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ferry_api::{CreateVm, VmState};
use ferry_host::{Host, HostConfig};
use ferry_migrate::Secret;

fn threads() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Starts a host with a migration listener and one running VM, then shuts it down;
/// returns whether its migration port still took connections afterwards.
fn one_life(n: usize) -> bool {
    let store = std::env::temp_dir().join(format!("ferry-shutdown-{}-{n}", std::process::id()));
    let host = Host::new(HostConfig {
        name: format!("h{n}"),
        secret: Secret::new(b"shutdown-test-secret-0123456789".to_vec()).unwrap(),
        memory_capacity: 1 << 30,
        accel_capacity: 512 << 20,
        accel_threads: 2,
        guest_nice: 0,
        tls: None,
        file_store: store.clone(),
        api_tokens: None,
        backend: ferry_accel::backend::CPU,
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    host.serve_migrations(listener).unwrap();
    let vm = host
        .create_vm(&CreateVm {
            name: None,
            workload: "memtouch".into(),
            args: ["--mib", "4", "--passes", "1000000"]
                .map(String::from)
                .to_vec(),
            memory: 32 << 20,
            accel_memory: 0,
            attach: Vec::new(),
            backend: None,
        })
        .unwrap();
    assert_eq!(vm.state, VmState::Running);
    let running = host.get(&vm.id).unwrap();
    host.shutdown();
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
    let after = threads();
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    eprintln!("5 hosts started and shut down: threads {before} -> {after}");
    assert_eq!(after, before, "threads left behind: {names:?}");
}

/// A center that answers every heartbeat `{"taken": false}`; counts the beats.
fn refusing_center() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let beats = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = beats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    // One request: its headers, then its body.
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = r#"{"taken":false}"#;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if conn.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, beats)
}

#[test]
fn a_center_refusing_every_heartbeat_gets_one_a_beat_interval_and_the_host_still_stops() {
    use std::sync::atomic::Ordering;
    let store = std::env::temp_dir().join(format!("ferry-refused-beats-{}", std::process::id()));
    let host = Host::new(HostConfig {
        name: "refused".into(),
        secret: Secret::new(b"shutdown-test-secret-0123456789".to_vec()).unwrap(),
        memory_capacity: 1 << 30,
        accel_capacity: 0,
        accel_threads: 1,
        guest_nice: 0,
        tls: None,
        file_store: store.clone(),
        api_tokens: None,
        backend: ferry_accel::backend::CPU,
    });
    let (url, beats) = refusing_center();
    let interval = Duration::from_millis(200);
    ferry_host::heartbeat::start(
        host.clone(),
        ferry_host::heartbeat::CenterLink {
            center_url: url,
            api_url: "http://127.0.0.1:1".into(),
            migration_addr: "127.0.0.1:1".into(),
            interval,
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let sent = beats.load(Ordering::SeqCst);
    // A beat and its one full resend per interval: about 10 in the second.
    assert!(sent >= 2, "{sent} beats");
    assert!(sent <= 14, "{sent} beats in 1 s at one per {interval:?}");
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        host.shutdown();
        done.send(()).unwrap();
    });
    stopped
        .recv_timeout(Duration::from_secs(10))
        .expect("the host did not stop");
    let _ = std::fs::remove_dir_all(&store);
}
