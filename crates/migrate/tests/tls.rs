//! Migrations over mutual TLS, end to end through `migrate_vm` and `serve_with_tls`, with
//! a small fake VM on each side and certificates made at test time.

mod pki;

use std::net::TcpListener;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_migrate::{
    migrate_vm, serve, serve_with_tls, ChunkKey, DeviceBuffer, MigrationError, MigrationOptions,
    MigrationSource, MigrationTarget, Mode, PageSet, ReceiveReport, Secret, TargetFactory,
    TlsConfig, VmDescription, VmError,
};
use pki::{Ca, Identity};

const RAM: u64 = 4 << 20;
const PAGE: u64 = 4096;

fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

fn config(id: &Identity, ca: &str) -> TlsConfig {
    TlsConfig::from_pem(id.cert.as_bytes(), id.key.as_bytes(), ca.as_bytes()).unwrap()
}

fn describe() -> VmDescription {
    VmDescription {
        name: "tls-test".into(),
        ram_size: RAM,
        vcpus: 1,
        accel_memory: 0,
        abi_version: 1,
        state_version: 1,
        backend_kind: String::new(),
        kernel_version: 0,
        microkernel: String::new(),
        extra: Vec::new(),
        files: Vec::new(),
    }
}

/// A VM with patterned RAM (every fourth page left zero) and no device; it dirties
/// nothing, so live pre-copy converges after the first round.
struct FakeSource {
    ram: Vec<u8>,
    paused: Mutex<bool>,
}

impl FakeSource {
    fn new() -> Self {
        let mut ram = vec![0u8; RAM as usize];
        for (page, bytes) in ram.chunks_mut(PAGE as usize).enumerate() {
            if page % 4 != 3 {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = (page * 7 + i) as u8 | 1;
                }
            }
        }
        Self {
            ram,
            paused: Mutex::new(false),
        }
    }
}

impl MigrationSource for FakeSource {
    fn describe(&self) -> VmDescription {
        describe()
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        Ok(PageSet::from_words(Vec::new(), RAM / PAGE))
    }
    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }
    fn populated_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }
    fn device_buffers(&self) -> Vec<DeviceBuffer> {
        Vec::new()
    }
    fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        out.copy_from_slice(&self.ram[gpa as usize..gpa as usize + out.len()]);
        Ok(())
    }
    fn read_chunk(&self, _: ChunkKey, _: &mut Vec<u8>) -> Option<u64> {
        None
    }
    fn set_throttle(&self, _: u8) {}
    fn pause(&self) -> Result<std::time::Instant, VmError> {
        *self.paused.lock().unwrap() = true;
        Ok(std::time::Instant::now())
    }
    fn resume(&self) -> Result<(), VmError> {
        *self.paused.lock().unwrap() = false;
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(b"final state".to_vec())
    }
}

/// The VM received: its RAM, final state and whether it runs.
#[derive(Default)]
struct FakeTarget {
    ram: Mutex<Vec<u8>>,
    state: Mutex<Vec<u8>>,
    running: Mutex<bool>,
}

impl MigrationTarget for FakeTarget {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.ram.lock().unwrap()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        match table {
            [] => Ok(()),
            _ => Err(VmError::SyncBuffers("this VM has no device".into())),
        }
    }
    fn write_chunk(&self, chunk: ChunkKey, _: &[u8]) -> Result<(), VmError> {
        Err(VmError::WriteChunk {
            chunk,
            source: "this VM has no device".into(),
        })
    }
    fn restore(&self, state: &[u8]) -> Result<(), VmError> {
        *self.state.lock().unwrap() = state.to_vec();
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        *self.running.lock().unwrap() = true;
        Ok(())
    }
}

/// Hands each adopted VM to the test.
struct Factory(Mutex<Sender<(FakeTarget, ReceiveReport)>>);

impl TargetFactory for Factory {
    type Target = FakeTarget;
    fn prepare(&self, vm: &VmDescription) -> Result<FakeTarget, VmError> {
        Ok(FakeTarget {
            ram: Mutex::new(vec![0; vm.ram_size as usize]),
            ..FakeTarget::default()
        })
    }
    fn adopt(&self, target: FakeTarget, report: ReceiveReport) {
        let _ = self.0.lock().unwrap().send((target, report));
    }
}

/// A destination listening on loopback (with TLS when `tls`), on its own thread.
fn destination(tls: Option<TlsConfig>) -> (String, Receiver<(FakeTarget, ReceiveReport)>) {
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
    migrate_vm(&FakeSource::new(), addr, &secret(), options, &mut |_| {}).map(drop)
}

/// Migrates a fresh fake VM to `addr` and checks that it arrived whole and runs.
fn migrate_and_check(
    addr: &str,
    rx: &Receiver<(FakeTarget, ReceiveReport)>,
    opts: MigrationOptions,
) {
    let source = FakeSource::new();
    let report = migrate_vm(&source, addr, &secret(), &opts, &mut |_| {}).unwrap();
    assert_eq!(report.streams, 3);
    assert!(*source.paused.lock().unwrap(), "the source stays paused");
    let (target, received) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(*target.running.lock().unwrap());
    assert_eq!(*target.state.lock().unwrap(), b"final state");
    assert!(*target.ram.lock().unwrap() == source.ram, "RAM differs");
    assert_eq!(received.vm, describe());
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
    let dir = pki::temp_dir("files");
    let [cert, key, ca_file] = pki::write(&dir, "dest", &ca.host(), &ca.cert);
    let dest = TlsConfig::from_pem_files(&cert, &key, &ca_file).unwrap();
    let [cert, key, ca_file] = pki::write(&dir, "source", &ca.host(), &ca.cert);
    let source = TlsConfig::from_pem_files(&cert, &key, &ca_file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
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
