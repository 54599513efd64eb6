//! Attached files seen from inside a VM on real KVM: the `files` guest reads each file
//! through the file port and the accelerator and prints checksums, makes hostile
//! requests, and a snapshot of a VM with files restores only with the same content.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_vmm::vm::CreateVmError;
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig, VmExit};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch folder of the test's own, removed when dropped (the files are up to 9 MiB).
fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-vmm-files-")
        .tempdir()
        .unwrap()
}

/// FNV-1a, as the guest prints it.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn write(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// Boots the `files` guest with `files` attached and `args`, and returns its console
/// once it exited with status 0.
fn run_files_guest(files: AttachedFiles, args: &[&str]) -> String {
    let host = HostOptions {
        files,
        ..HostOptions::quiet()
    };
    let config = VmConfig::new(128 << 20).with_accel(32 << 20);
    let image = ferry_guest_images::find("files").unwrap().elf;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut vm = Microvm::boot(config, image, &args, host).expect("boot");
    vm.resume().unwrap();
    let exit = vm.wait(Some(TIMEOUT)).expect("guest did not end in time");
    let console = vm.console_tail();
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}\n{console}");
    console
}

#[test]
fn the_guest_reads_attached_files_and_hostile_reads_are_refused() {
    if !ferry_testdata::kvm("the_guest_reads_attached_files_and_hostile_reads_are_refused") {
        return;
    }
    let scratch = dir();
    let d = scratch.path();
    // 9 MiB + 5 bytes: more than two of the guest's pieces, not a whole number of pages.
    let big = write(&d.join("big"), (9 << 20) + 5, 1);
    let small = write(&d.join("small"), 3, 2);
    let files = AttachedFiles::open(&[
        ("weights.bin".into(), d.join("big")),
        ("tiny".into(), d.join("small")),
    ])
    .unwrap();
    let console = run_files_guest(files, &[]);
    for (name, data) in [("weights.bin", &big), ("tiny", &small)] {
        let h = fnv(data);
        let line = format!("file {name} {} read={h:016x} device={h:016x}", data.len());
        assert!(console.contains(&line), "missing '{line}' in:\n{console}");
    }
    for (what, status) in [
        ("no-such-file", "no such file"),
        ("past-the-end", "range outside the file"),
        ("offset-overflow", "range outside the file"),
        ("too-long", "read too long"),
        ("system-page", "bad guest address range"),
        ("beyond-ram", "bad guest address range"),
        ("in-bounds", "ok"),
    ] {
        let line = format!("hostile {what} {status}\n");
        assert!(console.contains(&line), "missing '{line}' in:\n{console}");
    }
}

#[test]
fn files_of_many_gib_are_read_at_any_offset() {
    if !ferry_testdata::kvm("files_of_many_gib_are_read_at_any_offset") {
        return;
    }
    // A sparse file of 4 GiB and 1 MiB (every offset past 32 bits: hashing more costs the
    // suite seconds) with 16-byte markers past 4 GiB and at its very end.
    let scratch = dir();
    let path = scratch.path().join("huge");
    let size: u64 = (4 << 30) + (1 << 20);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    let marks: [(u64, [u8; 16]); 3] = [
        (0, *b"first sixteen b!"),
        ((4 << 30) + 12345, *b"past four GiB..."),
        (size - 16, *b"the last 16 byte"),
    ];
    for (at, bytes) in &marks {
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, *at).unwrap();
    }
    drop(file);
    let files = AttachedFiles::open(&[("huge".into(), path.clone())]).unwrap();
    let offsets: Vec<String> = marks.iter().map(|(at, _)| at.to_string()).collect();
    let console = run_files_guest(files, &["--probe", &offsets.join(",")]);
    for (at, bytes) in &marks {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let line = format!("probe {at} {hex} {hex}\n");
        assert!(console.contains(&line), "missing {line:?} in:\n{console}");
    }
    std::fs::remove_file(&path).unwrap();
}

/// A running guest, that runs long enough to be snapshotted, with `data` attached: a
/// file of 1 MiB written from `seed` in a scratch folder of its own (returned, with the
/// file's path).
fn running_with_file(seed: u64) -> (tempfile::TempDir, PathBuf, Microvm) {
    let scratch = dir();
    let path = scratch.path().join("data");
    write(&path, 1 << 20, seed);
    let host = HostOptions {
        files: AttachedFiles::open(&[("data".into(), path.clone())]).unwrap(),
        ..HostOptions::quiet()
    };
    let image = ferry_guest_images::find("memtouch").unwrap().elf;
    let args: Vec<String> = ["--mib", "8", "--passes", "100000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut vm = Microvm::boot(VmConfig::new(64 << 20), image, &args, host).unwrap();
    vm.resume().unwrap();
    (scratch, path, vm)
}

#[test]
fn a_snapshot_restores_only_with_the_same_file_content() {
    if !ferry_testdata::kvm("a_snapshot_restores_only_with_the_same_file_content") {
        return;
    }
    let (scratch, path, mut vm) = running_with_file(3);
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().unwrap();
    let snap = scratch.path().join("vm.snap");
    vm.save(&snap).unwrap();
    drop(vm);

    // The same content (the path recorded in the snapshot is reopened): restores.
    let (vm, _) = Microvm::restore(&snap, HostOptions::quiet()).expect("restore");
    drop(vm);
    // Changed in place, same size: refused before the VM can run, saying nothing of
    // what the recorded path holds now (a forged snapshot may name any host file).
    write(&path, 1 << 20, 4);
    let err = Microvm::restore(&snap, HostOptions::quiet())
        .err()
        .expect("refused");
    assert!(matches!(err, CreateVmError::Files(_)), "{err:?}");
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("not the content recorded"), "{chain}");
    let found = AttachedFiles::open(&[("data".into(), path.clone())]).unwrap();
    assert!(!chain.contains(&found.infos()[0].sha256), "{chain}");
    // Other files given explicitly: refused too.
    let other = AttachedFiles::open(&[("other".into(), path.clone())]).unwrap();
    let err = Microvm::restore(
        &snap,
        HostOptions {
            files: other,
            ..HostOptions::quiet()
        },
    )
    .err()
    .expect("refused");
    assert!(matches!(err, CreateVmError::FilesDiffer(_)), "{err:?}");
}

#[test]
fn a_snapshot_is_refused_once_an_attached_file_changed_in_place() {
    if !ferry_testdata::kvm("a_snapshot_is_refused_once_an_attached_file_changed_in_place") {
        return;
    }
    let (scratch, path, mut vm) = running_with_file(5);
    // Rewritten in place, same size, while attached; the mtime moved on as a later write
    // would (a write within the attach's timestamp tick keeps the stamp).
    write(&path, 1 << 20, 6);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    vm.pause().unwrap();
    let snap = scratch.path().join("vm.snap");
    let err = vm.save(&snap).expect_err("refused");
    let chain = ferry_migrate::error_chain(&err);
    assert!(
        chain.contains("'data'") && chain.contains("has changed"),
        "{chain}"
    );
    assert!(!snap.exists(), "nothing is left behind");
}
