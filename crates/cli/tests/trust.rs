//! A host's trust boundary, attacked from the migration network as an outsider would:
//! floods of unauthenticated connections (each claiming a 16 MiB frame, or idle) cost
//! the daemon almost nothing, while a genuine migration completes and the API answers.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

/// A connection to `to` from 127.0.0.2 (the attacker's own address).
fn attacker(to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(1))?;
    Ok(socket.into())
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn floods_of_unauthenticated_connections_cost_the_host_almost_nothing() {
    ferry_testdata::require_kvm!(kvm_available);
    let files = ferry_testdata::raise_file_limit();
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let target: SocketAddr = b.migration.parse().unwrap();
    let pid = b.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, threads0) = footprint(pid);
    let args = "--steps 8000 --print-every 4000";

    // 1,000 connections that each claim a 16 MiB control frame, then 10,000 idle ones
    // (or as many as this process may open), kept open, while a genuine migration runs.
    let idle = 10_000.min(files.saturating_sub(1_200) as usize);
    let stop = AtomicBool::new(false);
    let (flooded, all_open) = std::sync::mpsc::channel();
    let (peak_rss, peak_threads) = (AtomicU64::new(rss0), AtomicU64::new(threads0));
    let mut header = [0u8; 16];
    header[..2].copy_from_slice(b"FY");
    header[2] = 1;
    header[4..8].copy_from_slice(&(16u32 << 20).to_le_bytes());
    header[8..12].copy_from_slice(&(16u32 << 20).to_le_bytes());
    let (opened, report, api_worst, id) = std::thread::scope(|scope| {
        // Whatever happens below, even a panic, the flood and the watcher end, so the
        // scope can join them.
        let _stop_at_exit = StopOnDrop(&stop);
        let watcher = scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let (rss, threads) = footprint(pid);
                peak_rss.fetch_max(rss, Ordering::SeqCst);
                peak_threads.fetch_max(threads, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let flood = scope.spawn(|| {
            let started = Instant::now();
            let mut held = Vec::new();
            for i in 0..1_000 + idle {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = attacker(target) else {
                    continue;
                };
                if i < 1_000 {
                    let _ = c.write_all(&header);
                }
                held.push(c);
            }
            let opened = held.len();
            eprintln!(
                "flood: {opened} connections open after {:.1?}",
                started.elapsed()
            );
            let _ = flooded.send(opened);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            opened
        });
        // The genuine work, with every attacking connection open.
        all_open.recv_timeout(Duration::from_secs(120)).unwrap();
        let id = a.create("mlp-train", "32M", args);
        a.wait_console(&id, "mlp-train: seed");
        let api = host_api(&b);
        let mut api_worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let _: serde_json::Value = api.get("/v1/host").unwrap();
            api_worst = api_worst.max(t.elapsed());
        }
        let out = a.migrate(&id, &b.migration, &[]);
        let report = report(&out);
        stop.store(true, Ordering::SeqCst);
        watcher.join().unwrap();
        (flood.join().unwrap(), report, api_worst, id)
    });
    let (rss, threads) = (
        peak_rss.load(Ordering::SeqCst),
        peak_threads.load(Ordering::SeqCst),
    );
    eprintln!(
        "flood: {opened} connections from 127.0.0.2 (1,000 claiming 16 MiB frames); daemon RSS {} -> peak {} MiB, threads {threads0} -> peak {threads}; genuine migration paused {:.1} ms; slowest API call {:.1} ms",
        rss0 >> 20,
        rss >> 20,
        report["downtime_ms"].as_f64().unwrap(),
        api_worst.as_secs_f64() * 1e3,
    );
    assert!(opened >= 1_000, "only {opened} connections opened");
    assert!(
        rss < rss0 + (100 << 20),
        "RSS {} MiB -> {} MiB",
        rss0 >> 20,
        rss >> 20
    );
    // The daemon's own threads, at most 64 authenticating, and the arriving VM's.
    assert!(threads < threads0 + 100, "threads {threads0} -> {threads}");
    b.assert_unmigrated_checksum(&id, "mlp-train", "32M", args);
}

#[test]
fn api_tokens_have_one_purpose_each_and_read_only_ones_only_read() {
    ferry_testdata::require_kvm!(kvm_available);
    let dir = ferry_testdata::scratch_dir("tokens-test");
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "# operators\nalice-token-0123456789\ngrafana-token-0123456789 read-only\n",
    )
    .unwrap();
    let b = Daemon::start_with("b", &["--api-tokens", tokens.to_str().unwrap()]);
    let with = |token: &str| ferry_client::ApiClient::new(&b.api, token.as_bytes()).unwrap();
    let create = serde_json::json!({ "workload": "hello", "memory": 16 << 20 });
    // The host-API key and an operator's token do everything.
    let _: serde_json::Value = host_api(&b).get("/v1/host").unwrap();
    let vm: serde_json::Value = with("alice-token-0123456789")
        .post("/v1/vms", &create)
        .unwrap();
    assert!(vm["id"].is_string(), "{vm}");
    // A read-only token reads, and nothing else.
    let ro = with("grafana-token-0123456789");
    let _: serde_json::Value = ro.get("/v1/vms").unwrap();
    let refused = ro
        .post::<_, serde_json::Value>("/v1/vms", &create)
        .unwrap_err();
    assert!(format!("{refused:#}").contains("HTTP 403"), "{refused:#}");
    let code = |e: &ferry_client::ClientError| e.code().map(str::to_string);
    assert_eq!(code(&refused).as_deref(), Some("forbidden"));
    let missing = ro
        .get::<serde_json::Value>("/v1/vms/no-such-vm")
        .unwrap_err();
    assert_eq!(
        code(&missing).as_deref(),
        Some("vm_not_found"),
        "{missing:#}"
    );
    // The cluster secret itself, and the keys derived for other purposes, open nothing.
    let secret = ferry_migrate::Secret::new(SECRET.as_bytes()).unwrap();
    for token in [
        SECRET.to_string(),
        secret.token(ferry_migrate::Purpose::Heartbeat),
        secret.token(ferry_migrate::Purpose::Migration),
    ] {
        let refused = with(&token)
            .get::<serde_json::Value>("/v1/host")
            .unwrap_err();
        assert!(format!("{refused:#}").contains("HTTP 401"), "{refused:#}");
    }
    // Rotation without a restart: alice's token out, a new one in.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&tokens, "bob-token-0123456789abc\n").unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(1);
    std::fs::File::options()
        .write(true)
        .open(&tokens)
        .unwrap()
        .set_modified(later)
        .unwrap();
    // The file is checked every second, off the requests' path.
    common::wait_for(
        "the rewritten token file to be read",
        Duration::from_secs(10),
        || {
            with("bob-token-0123456789abc")
                .get::<serde_json::Value>("/v1/host")
                .ok()
        },
    );
    assert!(with("alice-token-0123456789")
        .get::<serde_json::Value>("/v1/host")
        .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[path = "../../migrate/tests/pki/mod.rs"]
mod pki;

#[test]
fn with_tls_the_apis_speak_https_checked_against_the_cluster_ca() {
    ferry_testdata::require_kvm!(kvm_available);
    let ca = pki::Ca::new("Ferry test cluster CA");
    // The migration name, and the address the API's clients use.
    let identity = ca.issue(
        &["ferry-host", "127.0.0.1"],
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let dir = pki::temp_dir("api-https");
    let [cert, key, ca_file] = pki::write(&dir, "host", &identity, &ca.cert);
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca_file.to_str().unwrap(),
    ];
    let (a, b) = (Daemon::start_with("a", &tls), Daemon::start_with("b", &tls));
    assert!(a.api.starts_with("https://"), "{}", a.api);
    let vm = |d: &Daemon, extra: &[&str]| {
        let mut args = vec!["vm", "list", "--host", &d.api, "--json"];
        args.extend_from_slice(extra);
        ferry(&args)
    };
    // Checked against the cluster CA: it works.
    let out = vm(&a, &["--tls-ca", ca_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Against the web's roots it does not: the certificate is the cluster's own.
    let out = vm(&a, &[]);
    assert!(!out.status.success());
    assert_says(&out.stderr, "cannot reach the API");
    // Plain HTTP to an HTTPS API gets nothing.
    let plain = a.api.replacen("https://", "http://", 1);
    let out = ferry(&["vm", "list", "--host", &plain]);
    assert!(!out.status.success());
    // A VM created and migrated over the HTTPS API and the mutual-TLS migration link.
    let args = "--steps 8000 --print-every 4000";
    let id = a.create("mlp-train", "32M", args);
    let r = report(&a.migrate(&id, &b.migration, &[]));
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
    b.assert_unmigrated_checksum(&id, "mlp-train", "32M", args);

    // A center over HTTPS too: a host reports to it, and it checks the host's API back.
    let token = "operator-token-0123456789";
    let center = CenterProcess::start(&dir.join("center.db"), "127.0.0.1:0", token, &tls);
    let url = &center.url;
    assert!(url.starts_with("https://"), "{url}");
    let mut joined = tls.to_vec();
    joined.extend(["--center", url.as_str(), "--heartbeat-ms", "200"]);
    let _c = Daemon::start_with("c", &joined);
    wait_for("host c up at the center", Duration::from_secs(20), || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["center", "status", "--json", "--center", url])
            .env("FERRY_CENTER_TOKEN", token)
            .env("FERRY_TLS_CA", &ca_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let hosts = status["hosts"].as_array().unwrap();
        hosts
            .iter()
            .any(|h| h["name"] == "c" && h["status"] == "up")
            .then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}
