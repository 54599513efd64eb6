//! A VM's streams over the host API: only the stream's reader (a full token, as the
//! center's gateway has) lets go of what it read.

mod common;

use std::time::{Duration, Instant};

use ferry_api::CreateVm;
use ferry_client::{ApiClient, ClientError};
use ferry_host::Host;
use ferry_migrate::Secret;
use serde_json::{json, Value};

const SECRET: &[u8] = b"streams-test-secret-0123456789ab";
const READ_ONLY: &str = "dashboard-0123456789abcdef";

/// The status of a refused request.
fn status(refused: ClientError) -> u16 {
    refused.api().expect("an API error").status
}

#[test]
fn a_read_only_read_never_takes_a_streams_responses_from_its_reader() {
    if !ferry_testdata::kvm("a_read_only_read_never_takes_a_streams_responses_from_its_reader") {
        return;
    }
    let scratch = std::env::temp_dir().join(format!("ferry-streams-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let tokens = scratch.join("tokens");
    std::fs::write(&tokens, format!("{READ_ONLY} read-only\n")).unwrap();
    let host = Host::new(common::config(
        "streams",
        SECRET,
        scratch.join("store"),
        (0, 1),
        Some(tokens),
    ))
    .unwrap();
    let (_runtime, _serving, url) = common::serve_api(&host);
    // The gateway's token.
    let key = Secret::new(SECRET.to_vec())
        .unwrap()
        .token(ferry_migrate::Purpose::HostApi);
    let reader = ApiClient::new(&url, key.as_bytes()).unwrap();
    let onlooker = ApiClient::new(&url, READ_ONLY.as_bytes()).unwrap();
    // A guest that answers the streams it is sent (0 to 3) with garbage.
    let vm = host
        .create_vm(&CreateVm {
            name: None,
            workload: "channel-abuse".into(),
            args: Vec::new(),
            memory: 64 << 20,
            accel_memory: 0,
            attach: Vec::new(),
            backend: None,
            idempotency_key: None,
        })
        .unwrap();
    let id = vm.id;
    // A stream with responses: the onlooker's reads from 0 change nothing, either way.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (stream, seen) = 'found: loop {
        assert!(Instant::now() < deadline, "no stream got a response");
        for s in 0..4u64 {
            let message = json!({"stream": s, "kind": 1, "payload": "aGVsbG8="});
            let _ = reader.post::<_, Value>(&format!("/v1/vms/{id}/streams"), &message);
            let path = format!("/v1/vms/{id}/streams/{s}?from=0");
            if let Ok(chunk) = onlooker.get::<Value>(&path) {
                let n = chunk["events"].as_array().unwrap().len();
                if n > 0 {
                    break 'found (s, n);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let path = |from: u64| format!("/v1/vms/{id}/streams/{stream}?from={from}");
    // From beyond the next response, with either token: refused, and nothing dropped.
    for client in [&onlooker, &reader] {
        let refused = client.get::<Value>(&path(u64::MAX)).unwrap_err();
        assert_eq!(status(refused), 400);
    }
    // From what the onlooker has seen: an onlooker's read that lets nothing go.
    let peeked = onlooker.get::<Value>(&path(seen as u64)).unwrap();
    assert_eq!(peeked["from"], seen);
    // The reader still has every response from the first.
    let read = reader.get::<Value>(&path(0)).unwrap();
    let events = read["events"].as_array().unwrap().len();
    assert!(events >= seen, "{events} events, {seen} seen before");
    // Its own read lets go of what it read: a read from before that is a conflict.
    reader.get::<Value>(&path(events as u64)).unwrap();
    assert_eq!(status(reader.get::<Value>(&path(0)).unwrap_err()), 409);
    host.shutdown();
    let _ = std::fs::remove_dir_all(&scratch);
}
