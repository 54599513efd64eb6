//! Migrations over mutual TLS, end to end through `migrate_vm` and `serve_with_tls`, with
//! a small fake VM on each side and certificates made at test time.

mod memory_vm;
mod pki;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_migrate::{
    migrate_vm, serve, serve_with_tls, MigrationError, MigrationOptions, Mode, ReceiveReport,
    Secret, TargetFactory, TlsConfig, VmDescription, VmError,
};
use memory_vm::{description, MemoryVm, StillVm};
use pki::{Ca, Identity};

const RAM: u64 = 4 << 20;
const PAGE: u64 = 4096;

fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

fn config(id: &Identity, ca: &str) -> TlsConfig {
    TlsConfig::from_pem(id.cert.as_bytes(), id.key.as_bytes(), ca.as_bytes()).unwrap()
}

/// A VM with patterned RAM (every fourth page left zero) and no device; it dirties
/// nothing, so live pre-copy converges after the first round.
fn source() -> StillVm {
    let mut ram = vec![0u8; RAM as usize];
    for (page, bytes) in ram.chunks_mut(PAGE as usize).enumerate() {
        if page % 4 != 3 {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (page * 7 + i) as u8 | 1;
            }
        }
    }
    StillVm::new(description("tls-test", RAM, 0), ram)
}

/// Hands each adopted VM to the test.
struct Factory(Mutex<Sender<(MemoryVm, ReceiveReport)>>);

impl TargetFactory for Factory {
    type Target = MemoryVm;
    fn prepare(&self, vm: &VmDescription) -> Result<MemoryVm, VmError> {
        Ok(MemoryVm::new(vm.ram_size))
    }
    fn adopt(&self, target: MemoryVm, report: ReceiveReport) {
        let _ = self.0.lock().unwrap().send((target, report));
    }
}

/// A destination listening on loopback (with TLS when `tls`), on its own thread.
fn destination(tls: Option<TlsConfig>) -> (String, Receiver<(MemoryVm, ReceiveReport)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = channel();
    let factory = Arc::new(Factory(Mutex::new(tx)));
    std::thread::spawn(move || match tls {
        Some(tls) => serve_with_tls(listener, secret(), Some(tls), factory, Default::default()),
        None => serve(listener, secret(), factory),
    });
    (addr, rx)
}

fn options(tls: Option<TlsConfig>) -> MigrationOptions {
    MigrationOptions {
        streams: 3,
        io_timeout: Duration::from_secs(10),
        tls,
        ..MigrationOptions::default()
    }
}

fn migrate(addr: &str, options: &MigrationOptions) -> Result<(), MigrationError> {
    migrate_vm(&source(), addr, &secret(), options, &mut |_| {}).map(drop)
}

/// Migrates a fresh fake VM to `addr` and checks that it arrived whole and runs.
fn migrate_and_check(addr: &str, rx: &Receiver<(MemoryVm, ReceiveReport)>, opts: MigrationOptions) {
    let source = source();
    let report = migrate_vm(&source, addr, &secret(), &opts, &mut |_| {}).unwrap();
    assert_eq!(report.streams, 3);
    assert!(
        source.paused.load(Ordering::SeqCst),
        "the source stays paused"
    );
    let (target, received) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(target.running.load(Ordering::SeqCst));
    assert_eq!(
        target.state.lock().unwrap().as_deref(),
        Some(&b"final state"[..])
    );
    assert!(*target.ram.lock().unwrap() == source.ram, "RAM differs");
    assert_eq!(received.vm, source.description);
}

fn auth_error(result: Result<(), MigrationError>) -> String {
    match result {
        Err(MigrationError::Auth(why)) => why,
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[test]
fn live_and_stop_and_copy_migrations_over_mutual_tls() {
    let ca = Ca::new("Ferry test CA");
    let (addr, rx) = destination(Some(config(&ca.host(), &ca.cert)));
    let source_tls = config(&ca.host(), &ca.cert);
    migrate_and_check(&addr, &rx, options(Some(source_tls.clone())));
    migrate_and_check(
        &addr,
        &rx,
        MigrationOptions {
            mode: Mode::StopAndCopy,
            compress: true,
            ..options(Some(source_tls))
        },
    );
}

#[test]
fn certificates_read_from_pem_files_work() {
    let ca = Ca::new("Ferry test CA");
    let [dest, source] =
        pki::load_hosts("files", &ca, ["dest", "source"], TlsConfig::from_pem_files);
    let (addr, rx) = destination(Some(dest));
    migrate_and_check(&addr, &rx, options(Some(source)));
}

#[test]
fn refused_peers_fail_clearly_and_the_listener_keeps_serving() {
    let ca = Ca::new("Ferry test CA");
    let rogue_ca = Ca::new("Another CA");
    let (addr, rx) = destination(Some(config(&ca.host(), &ca.cert)));

    // A host whose certificate another CA signed (it trusts ours, so only the
    // destination can refuse it).
    let rogue = config(&rogue_ca.host(), &format!("{}{}", rogue_ca.cert, ca.cert));
    let why = auth_error(migrate(&addr, &options(Some(rogue))));
    assert!(
        why.contains("TLS handshake") && why.contains("does not accept this host's certificate"),
        "{why}"
    );

    // A host without TLS.
    let why = auth_error(migrate(&addr, &options(None)));
    assert!(
        why.contains("TLS handshake failed") && why.contains("TLS off"),
        "{why}"
    );

    // A host that trusts another CA only: it refuses the destination.
    let wary = config(&rogue_ca.host(), &rogue_ca.cert);
    let why = auth_error(migrate(&addr, &options(Some(wary))));
    assert!(
        why.contains("TLS handshake") && why.contains("UnknownIssuer"),
        "{why}"
    );

    // Nothing was received, and the listener still serves a good host.
    assert!(rx.try_recv().is_err());
    migrate_and_check(&addr, &rx, options(Some(config(&ca.host(), &ca.cert))));
}

#[test]
fn a_tls_destination_at_its_limit_of_handshakes_is_tried_again_not_taken_for_a_refusal() {
    let ca = Ca::new("Ferry test CA");
    let (addr, rx) = destination(Some(config(&ca.host(), &ca.cert)));
    // Connections that never begin their handshake fill this address's share: the
    // destination closes the next ones unheard (it cannot tell a TLS peer in plain).
    let fill = || -> Vec<std::net::TcpStream> {
        let idle = (0..ferry_migrate::MAX_HANDSHAKES_PER_PEER)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        idle
    };
    let tls = || options(Some(config(&ca.host(), &ca.cert)));
    let idle = fill();
    let why = auth_error(migrate(&addr, &tls()));
    assert!(why.contains("limit of connections"), "{why}");
    drop(idle);
    // A burst that passes while the source backs off costs a short wait, not the
    // migration.
    let idle = fill();
    let freed = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(idle);
    });
    migrate_and_check(&addr, &rx, tls());
    freed.join().unwrap();
}

#[test]
fn tls_to_a_plain_destination_fails_clearly() {
    let ca = Ca::new("Ferry test CA");
    let (addr, rx) = destination(None);
    let why = auth_error(migrate(&addr, &options(Some(config(&ca.host(), &ca.cert)))));
    assert!(
        why.contains("TLS handshake with") && why.contains("closed"),
        "{why}"
    );
    // The plain destination still serves plain sources.
    migrate_and_check(&addr, &rx, options(None));
}
