//! Snapshots as the engine writes and reads them, without a VM: a still VM in memory
//! saved, loaded into an empty one, and files cut, bit-flipped or forged (well-formed
//! frames that contradict the VM) refused before anything is restored.

mod memory_vm;

use std::path::{Path, PathBuf};

use ferry_migrate::replay::DeviceTransfer;
use ferry_migrate::snapshot::{
    save, SnapshotError, SnapshotReader, SnapshotStats, FORMAT_VERSION, MAGIC, SNAPSHOT_PROTOCOL,
};
use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::wire::{FrameWriter, Message, Transfer};
use ferry_migrate::{error_chain, ChunkKey, FileTransfer, VmContents};
use memory_vm::{description, MemoryVm, StillVm};

const RAM: u64 = 64 * PAGE_SIZE;
const CHUNK: ChunkKey = ChunkKey {
    buffer: 2,
    index: 1,
};

/// A paused VM: two non-zero pages, one non-zero chunk and one zero chunk.
fn still() -> StillVm {
    let mut ram = vec![0u8; RAM as usize];
    ram[5 * PAGE_SIZE as usize..6 * PAGE_SIZE as usize].fill(0xab);
    ram[RAM as usize - 8..].copy_from_slice(&0x1234_5678u64.to_le_bytes());
    StillVm::new(description("test", RAM, 1 << 20), ram).with_buffer(
        CHUNK.buffer,
        8192,
        vec![(CHUNK.index, vec![7u8; 1000]), (0, vec![0u8; 4096])],
    )
}

/// Loads `path` into a fresh VM, which must not be restored if that fails.
fn load(path: &Path) -> Result<(MemoryVm, SnapshotStats), SnapshotError> {
    let target = MemoryVm::new(RAM);
    let loaded = SnapshotReader::open(path).and_then(|reader| {
        assert_eq!(reader.vm(), &still().description);
        reader.load_into(&target)
    });
    if loaded.is_err() {
        assert!(target.state.lock().unwrap().is_none(), "restored");
    }
    Ok((target, loaded?))
}

/// A snapshot saved in a fresh folder, and its bytes.
fn saved() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let stats = save(&still(), &path).unwrap();
    assert_eq!(
        (stats.pages_stored, stats.chunks_stored),
        (2, 1),
        "zero pages and chunks are left out"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary is left beside the snapshot"
    );
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(stats.file_bytes, bytes.len() as u64);
    (dir, path, bytes)
}

#[test]
fn a_saved_vm_loads_with_the_same_memory_device_and_state() {
    let (_dir, path, _) = saved();
    let (loaded, stats) = load(&path).unwrap();
    let source = still();
    assert!(*loaded.ram.lock().unwrap() == source.ram);
    let chunks = loaded.chunks.lock().unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[&CHUNK], source.chunks[&CHUNK]);
    assert_eq!(*loaded.buffers.lock().unwrap(), source.device_buffers());
    assert_eq!(
        loaded.state.lock().unwrap().as_deref(),
        Some(&b"final state"[..])
    );
    assert_eq!((stats.pages_stored, stats.chunks_stored), (2, 1));
}

#[test]
fn a_snapshot_cut_at_any_length_is_refused_and_never_restored() {
    let (_dir, path, bytes) = saved();
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let Err(err) = load(&path) else {
            panic!("length {len} accepted");
        };
        assert!(
            matches!(err, SnapshotError::Truncated { .. }),
            "length {len}: {}",
            error_chain(&err)
        );
    }
}

#[test]
fn a_bit_flipped_in_any_byte_is_refused_and_never_restored() {
    let (_dir, path, bytes) = saved();
    // Every byte: each is in a checked header field or in a payload under a CRC.
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let Err(err) = load(&path) else {
            panic!("byte {at} flipped accepted");
        };
        assert!(
            matches!(
                err,
                SnapshotError::Corrupt { .. }
                    | SnapshotError::Truncated { .. }
                    | SnapshotError::BadMagic { .. }
                    | SnapshotError::UnsupportedVersion { .. }
                    | SnapshotError::UnsupportedProtocol { .. }
            ),
            "byte {at}: {}",
            error_chain(&err)
        );
    }
}

#[test]
fn a_foreign_file_or_version_is_refused_by_name() {
    let (_dir, path, bytes) = saved();
    let mut bad = bytes.clone();
    bad[0] = b'X';
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(load(&path), Err(SnapshotError::BadMagic { .. })));

    let mut bad = bytes.clone();
    bad[8..12].copy_from_slice(&(FORMAT_VERSION - 1).to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    let err = load(&path).err().unwrap();
    assert!(
        err.to_string()
            .contains(&format!("version {} is not supported", FORMAT_VERSION - 1)),
        "{err}"
    );

    // The frames' protocol, not the live one: a version that changed only what a
    // destination says reads the snapshots of the one before, and they its.
    assert_eq!(bytes[12..16], SNAPSHOT_PROTOCOL.to_le_bytes());
    let mut bad = bytes;
    bad[12..16].copy_from_slice(&(SNAPSHOT_PROTOCOL - 1).to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        load(&path),
        Err(SnapshotError::UnsupportedProtocol { found, .. }) if found == SNAPSHOT_PROTOCOL - 1
    ));
}

#[test]
fn saves_of_one_path_at_once_all_succeed_and_leave_one_whole_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    std::thread::scope(|s| {
        let saves: Vec<_> = (0..8).map(|_| s.spawn(|| save(&still(), &path))).collect();
        for saved in saves {
            saved.join().unwrap().unwrap();
        }
    });
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    load(&path).unwrap();
}

#[test]
fn a_save_follows_no_planted_link_and_only_its_owner_reads_the_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"someone else's file").unwrap();
    let path = dir.path().join("vm.snap");
    // Links at the names this process's saves try (the fewer than 48 in this file's
    // tests come first), so this save meets some and goes past them.
    let pid = std::process::id();
    for save in 0..48 {
        let name = format!(".vm.snap.{pid}.{save}.partial");
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
    }
    save(&still(), &path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's file");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        meta.is_file(),
        "the snapshot is a file of its own, not the link"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    load(&path).unwrap();
}

#[test]
fn a_vm_whose_description_a_load_would_refuse_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let mut vm = still();
    vm.description.files.push(ferry_migrate::FileOffer {
        name: "model".into(),
        size: 1,
        sha256: "ab".repeat(32),
        path: "/models/a\tb.gguf".into(),
    });
    let error = save(&vm, &path).unwrap_err();
    assert!(
        matches!(
            &error,
            SnapshotError::Unloadable(ferry_migrate::BadOffer::FilePath { name, .. }) if name == "model"
        ),
        "{error}"
    );
    assert!(error.to_string().contains("control characters"), "{error}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_snapshot_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("vm.snap");
    ferry_testdata::make_fifo(&fifo);
    // A FIFO with no writer: opening it to read would wait for one for ever.
    let error = SnapshotReader::open(&fifo).err().expect("refused");
    assert!(
        error_chain(&error).contains("not a regular file"),
        "{}",
        error_chain(&error)
    );
    assert!(SnapshotReader::open(dir.path()).is_err(), "a folder");
}

/// A well-formed file (header, frame checksums) of `frames` after a valid description.
fn forged(frames: impl FnOnce(&mut FrameWriter<Vec<u8>>)) -> Vec<u8> {
    let mut head = MAGIC.to_vec();
    head.extend(FORMAT_VERSION.to_le_bytes());
    head.extend(SNAPSHOT_PROTOCOL.to_le_bytes());
    let mut writer = FrameWriter::new(head, false);
    writer
        .send(&Message::Offer {
            vm: still().description,
            streams: 1,
            transfer: Transfer::StopAndCopy,
            files: FileTransfer::Require,
            device: DeviceTransfer::Precopy,
        })
        .unwrap();
    frames(&mut writer);
    writer.into_inner()
}

#[test]
fn records_outside_the_vm_or_miscounted_are_refused_before_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forged.snap");
    let begin = |w: &mut FrameWriter<Vec<u8>>| {
        w.send(&Message::BeginRound {
            round: 0,
            buffers: Some(Vec::new()),
        })
        .unwrap();
    };
    let end = |w: &mut FrameWriter<Vec<u8>>, frames: u64| {
        w.send(&Message::EndRound {
            round: 0,
            frames: vec![frames],
        })
        .unwrap();
        w.send(&Message::State {
            blob: b"state".to_vec(),
            device: None,
        })
        .unwrap();
    };
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "outside",
            forged(|w| {
                begin(w);
                w.send_ram(RAM, 1, Some(&[1; PAGE_SIZE as usize])).unwrap();
                end(w, 1);
            }),
        ),
        (
            "frames",
            forged(|w| {
                begin(w);
                w.send_ram(0, 1, Some(&[1; PAGE_SIZE as usize])).unwrap();
                end(w, 2);
            }),
        ),
        ("round 0", forged(|w| end(w, 0))),
    ];
    for (why, bytes) in cases {
        std::fs::write(&path, bytes).unwrap();
        let err = load(&path).err().expect("accepted");
        let chain = error_chain(&err);
        assert!(
            matches!(err, SnapshotError::Corrupt { .. }) && chain.contains(why),
            "{why}: {chain}"
        );
    }
}
