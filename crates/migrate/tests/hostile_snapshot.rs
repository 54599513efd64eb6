//! Snapshots whose saving fails at its last step: the caller, told the save failed, runs
//! the VM on, so no snapshot of it may be left behind (restored, the VM would run twice).
//! One test only in this binary: it lowers the process's open-file limit.

mod memory_vm;

use ferry_migrate::error_chain;
use ferry_migrate::snapshot::{save, SnapshotError};
use ferry_migrate::vm::PAGE_SIZE;
use memory_vm::{description, StillVm};

/// The soft limit on open files (`None`: unchanged) and what it was.
fn set_open_files(soft: Option<u64>) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0);
    let was = limit.rlim_cur;
    if let Some(soft) = soft {
        limit.rlim_cur = soft;
        // SAFETY: setrlimit reads one rlimit, which `limit` is.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        assert_eq!(set, 0);
    }
    was
}

#[test]
fn a_snapshot_whose_folder_cannot_be_synced_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let ram = 16 * PAGE_SIZE;
    let mut bytes = vec![0u8; ram as usize];
    bytes[..8].copy_from_slice(b"nonzero!");
    let vm = StillVm::new(description("test", ram, 0), bytes);

    // Every descriptor but one taken: the snapshot's temporary gets the last, and the
    // folder cannot be opened to be synced once the snapshot is renamed into place.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let was = set_open_files(Some(highest + 16));
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    held.pop();
    let saved = save(&vm, &path);
    drop(held);
    set_open_files(Some(was));

    let err = saved.expect_err("the folder could not be synced");
    assert!(
        matches!(err, SnapshotError::Io { .. }),
        "{}",
        error_chain(&err)
    );
    assert!(
        !path.exists(),
        "a snapshot left behind by a save that failed: {}",
        error_chain(&err)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is left behind"
    );
    // With descriptors to spare, the same save succeeds.
    save(&vm, &path).unwrap();
}
