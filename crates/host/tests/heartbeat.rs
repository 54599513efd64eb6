//! What a host does with its center's answers to heartbeats: refused every time, it
//! beats at its interval, not in a loop, and still stops; told of a new leader's term, it
//! refuses orders of older leaders.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use ferry_host::Host;
use ferry_migrate::Secret;

/// A center that answers every heartbeat with `answer`; counts the beats.
fn fake_center(answer: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufReader, Write};
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
                while ferry_testdata::read_http_request(&mut reader).is_some() {
                    counted.fetch_add(1, Ordering::SeqCst);
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

/// A host with no VMs named `name`, its files under a scratch directory.
fn host(name: &str) -> (std::sync::Arc<Host>, std::path::PathBuf) {
    host_with_tokens(name, None)
}

/// [`host`] taking the operators' tokens of `api_tokens` too.
fn host_with_tokens(
    name: &str,
    api_tokens: Option<std::path::PathBuf>,
) -> (std::sync::Arc<Host>, std::path::PathBuf) {
    let store = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
    let host = Host::new(common::config(
        name,
        SECRET,
        store.clone(),
        (0, 1),
        api_tokens,
    ))
    .unwrap();
    (host, store)
}

const SECRET: &[u8] = b"shutdown-test-secret-0123456789";

/// Starts `host`'s heartbeats to the center at `url`.
fn beat_to(host: &std::sync::Arc<Host>, url: String, interval: Duration) {
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
}

#[test]
fn a_center_refusing_every_heartbeat_gets_one_a_beat_interval_and_the_host_still_stops() {
    use std::sync::atomic::Ordering;
    let (host, store) = host("refused-beats");
    let (url, beats) = fake_center(r#"{"taken":false}"#);
    let interval = Duration::from_millis(200);
    beat_to(&host, url, interval);
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

#[test]
fn centers_that_never_answer_delay_the_host_s_stop_by_seconds_not_a_minute_each() {
    let (host, store) = host("silent-centers");
    // Two replicas that take the connection and the beat, and never answer: each
    // heartbeat thread waits in its post (a minute, the client's limit).
    let silent: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = (silent.iter())
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    beat_to(&host, urls.join(","), Duration::from_millis(200));
    // Both posts are under way.
    std::thread::sleep(Duration::from_millis(500));
    let (done, stopped) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        host.shutdown();
        done.send(()).unwrap();
    });
    stopped
        .recv_timeout(Duration::from_secs(30))
        .expect("the host did not stop within 30 s");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        started.elapsed()
    );
    drop(silent);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn orders_of_a_leader_older_than_one_heard_of_are_refused() {
    use ferry_api::{LeaderTerm, LEADER_TERM_HEADER};
    let tokens = std::env::temp_dir().join(format!("ferry-term-tokens-{}", std::process::id()));
    const OPERATOR: &str = "operator-token-0123456789abcdef";
    std::fs::write(&tokens, format!("{OPERATOR}\n")).unwrap();
    let (host, store) = host_with_tokens("leader-term", Some(tokens.clone()));
    let (_runtime, _serving, url) = common::serve_api(&host);
    let token = Secret::new(SECRET.to_vec())
        .unwrap()
        .token(ferry_migrate::Purpose::HostApi);
    let client = ferry_client::ApiClient::new(&url, token.as_bytes()).unwrap();
    let term = |cluster, revision| LeaderTerm { cluster, revision }.header_value();
    // An order for a VM that is not here: 404 once past the fence, 409 if fenced.
    let order = |client: &ferry_client::ApiClient, term: &str| {
        let sent = client
            .with_header(LEADER_TERM_HEADER, term.to_string())
            .post::<_, serde_json::Value>(
                "/v1/vms/none/migrate",
                &serde_json::json!({ "to": "127.0.0.1:1" }),
            );
        let e = sent.expect_err("no such VM");
        let e = e.api().expect("an API error");
        (e.status, e.code.clone().unwrap_or_default())
    };
    let passed = (404, "vm_not_found".to_string());
    let fenced = (409, "stale_leader".to_string());
    assert_eq!(order(&client, &term(0xc, 20)), passed);
    assert_eq!(order(&client, &term(0xc, 19)), fenced);
    assert_eq!(order(&client, &term(0xc, 20)), passed);
    assert_eq!(order(&client, "twenty").0, 400);
    // Without the header (an operator, a center of one), and reads, are not fenced.
    let plain = client.post::<_, serde_json::Value>(
        "/v1/vms/none/migrate",
        &serde_json::json!({ "to": "127.0.0.1:1" }),
    );
    assert_eq!(plain.unwrap_err().api().unwrap().status, 404);
    let read = client.with_header(LEADER_TERM_HEADER, term(0xc, 1));
    assert!(read.get::<serde_json::Value>("/v1/vms").is_ok());
    // Neither a stranger nor an operator can move the term on.
    let stranger = ferry_client::ApiClient::new(&url, b"not-the-token").unwrap();
    assert_eq!(order(&stranger, &term(0xc, 1000)).0, 401);
    let operator = ferry_client::ApiClient::new(&url, OPERATOR.as_bytes()).unwrap();
    assert_eq!(order(&operator, &term(0xc, 1000)).0, 403);
    assert_eq!(order(&client, &term(0xc, 21)), passed);
    // A new etcd cluster counts its revisions from 1 again: its leader is followed.
    assert_eq!(order(&client, &term(0xd, 2)), passed);
    assert_eq!(order(&client, &term(0xd, 1)), fenced);
    // A leader still on the cluster the store left is refused, however new its term,
    // and does not make the new cluster's leader refused in turn.
    assert_eq!(order(&client, &term(0xc, 1000)), fenced);
    assert_eq!(order(&client, &term(0xd, 2)), passed);
    // A heartbeat's answer brings a newer leader's term before it orders anything.
    let (center, _) = fake_center(r#"{"taken":true,"leader_term":{"cluster":13,"revision":50}}"#);
    beat_to(&host, center, Duration::from_millis(100));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while order(&client, &term(0xd, 49)) != fenced {
        assert!(
            std::time::Instant::now() < deadline,
            "the beat's term was not taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(order(&client, &term(0xd, 50)), passed);
    host.shutdown();
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(&tokens);
}
