//! A host whose center refuses every heartbeat beats at its interval, not in a loop, and
//! still stops.

use std::net::TcpListener;
use std::time::Duration;

use ferry_host::{Host, HostConfig};
use ferry_migrate::Secret;

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
