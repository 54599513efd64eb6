//! Attached files a source sends with a VM: a migration that fails after they arrived
//! leaves none of them on the destination's disk; one that succeeds keeps them in its
//! store, and a VM that comes back finds its file where it left it.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_api::{Attachment, MigrateRequest, MigrationState, MigrationStatus};
use ferry_host::{AttachDir, AttachPolicy, Host};
use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::{
    migrate_vm, ChunkKey, DeviceBuffer, FileOffer, MigrationOptions, MigrationSource, PageSet,
    VmContents, VmDescription, VmError,
};

/// A VM of zeroed RAM with attached files, whose source fails at the pause: after the
/// first round, with every file sent and checked.
struct Aborting {
    description: VmDescription,
    contents: Vec<Vec<u8>>,
    store: std::path::PathBuf,
    /// The store's files when the source paused.
    at_pause: Mutex<Option<Vec<String>>>,
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The names in `dir`, sorted (none if it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                // The host's records (of the migrations it received, of the VM ids it
                // gave), not received files.
                .filter(|name| {
                    ![ferry_host::RESUMED_MIGRATIONS, ferry_host::VM_IDS].contains(&name.as_str())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Aborting {
    fn pages(&self) -> u64 {
        self.description.ram_size / PAGE_SIZE
    }
}

impl VmContents for Aborting {
    fn describe(&self) -> VmDescription {
        self.description.clone()
    }

    fn device_buffers(&self) -> Vec<DeviceBuffer> {
        Vec::new()
    }

    fn populated_pages(&self) -> Option<PageSet> {
        Some(PageSet::empty(self.pages()))
    }

    fn populated_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }

    fn read_ram(&self, _gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        out.fill(0);
        Ok(())
    }

    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let start = offset as usize;
        out.copy_from_slice(&self.contents[file as usize][start..start + out.len()]);
        Ok(())
    }

    fn read_chunk(&self, _chunk: ChunkKey, _out: &mut Vec<u8>) -> Option<u64> {
        None
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Err(VmError::SaveState("never paused".into()))
    }
}

impl MigrationSource for Aborting {
    fn start_device_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn start_ram_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }

    fn stop_tracking(&self) {}

    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        Ok(PageSet::empty(self.pages()))
    }

    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }

    fn set_throttle(&self, _percent: u8) {}

    fn pause(&self) -> Result<Instant, VmError> {
        *self.at_pause.lock().unwrap() = Some(names(&self.store));
        Err(VmError::Pause("the source gives up".into()))
    }

    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
}

#[test]
fn files_of_a_migration_that_fails_after_they_arrived_are_not_kept() {
    ferry_testdata::require_kvm!();
    let scratch = std::env::temp_dir().join(format!("ferry-received-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let store = scratch.join("store");
    let secret = b"received files test secret".to_vec();
    let host = Host::new(common::config("b", &secret, store.clone(), (0, 1), None)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    host.serve_migrations(listener).unwrap();

    // Files of distinct content, as a source filling the destination's disk would send.
    let contents: Vec<Vec<u8>> = (0..8u8)
        .map(|i| vec![i; 100_000 + usize::from(i)])
        .collect();
    let local = ferry_host::migration::local_description("cpu").unwrap();
    let description = VmDescription {
        name: "attached".into(),
        ram_size: 16 << 20,
        files: contents
            .iter()
            .enumerate()
            .map(|(i, c)| FileOffer {
                name: format!("f{i}"),
                size: c.len() as u64,
                sha256: sha256(c),
                path: format!("/models/f{i}"),
            })
            .collect(),
        ..local
    };
    let source = Aborting {
        description,
        contents,
        store: store.clone(),
        at_pause: Mutex::new(None),
    };
    let secret = ferry_migrate::Secret::new(secret).unwrap();
    let err = migrate_vm(
        &source,
        &addr,
        &secret,
        &MigrationOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    let why = ferry_migrate::error_chain(&err);
    assert!(why.contains("gives up"), "{why}");
    // Every file arrived and was checked before the pause (the first round's end).
    let at_pause = source.at_pause.lock().unwrap().clone().expect("paused");
    assert_eq!(at_pause.len(), 8, "{at_pause:?}");
    // The destination ends the session when it hears of the abort.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names(&store).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(names(&store), Vec::<String>::new());
    host.shutdown();
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `id`'s migration from `host`, once it ended.
fn finished(host: &Host, id: &str) -> MigrationStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = host.migration(id).unwrap();
        if status.state != MigrationState::Running || Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vm_keeps_its_received_file_and_finds_the_original_when_it_comes_back() {
    ferry_testdata::require_kvm!();
    let scratch = std::env::temp_dir().join(format!("ferry-kept-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let models = scratch.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = models.join("weights.bin");
    let content = vec![42u8; 300_000];
    std::fs::write(&model, &content).unwrap();
    let secret = b"kept files test secret".to_vec();
    let start = |name: &str, attach| {
        let mut config = common::config(name, &secret, scratch.join(name), (0, 1), None);
        config.attach = attach;
        let host = Host::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        host.serve_migrations(listener).unwrap();
        (host, addr)
    };
    let (a, a_addr) = start(
        "a",
        AttachPolicy::Under(vec![AttachDir::new(&models).unwrap()]),
    );
    // b attaches no files by path: the source's path is not looked at there.
    let (b, b_addr) = start("b", AttachPolicy::Under(Vec::new()));
    let id = a
        .create_vm(&common::long_memtouch(vec![Attachment {
            name: "model".into(),
            path: model.clone(),
        }]))
        .unwrap()
        .id;

    a.start_migration(&id, MigrateRequest::to(&b_addr)).unwrap();
    let there = finished(&a, &id);
    assert_eq!(there.state, MigrationState::Succeeded, "{there:?}");
    assert_eq!(there.report.unwrap().files_sent, 1);
    // Adopted: the file is in b's store, where b's VM knows it.
    let stored = scratch
        .join("b")
        .join(format!("sha256-{}", sha256(&content)));
    assert_eq!(
        names(&scratch.join("b")),
        [format!("sha256-{}", sha256(&content))]
    );
    assert_eq!(b.get(&id).unwrap().files[0].path, stored);

    // Back on a, which still has the file the VM was created with: nothing is sent.
    b.start_migration(&id, MigrateRequest::to(&a_addr)).unwrap();
    let back = finished(&b, &id);
    assert_eq!(back.state, MigrationState::Succeeded, "{back:?}");
    let report = back.report.unwrap();
    assert_eq!((report.files_sent, report.files_reused), (0, 1));
    assert_eq!(a.get(&id).unwrap().files[0].path, model);
    assert_eq!(names(&scratch.join("a")), Vec::<String>::new());
    a.shutdown();
    b.shutdown();
    std::fs::remove_dir_all(&scratch).unwrap();
}
