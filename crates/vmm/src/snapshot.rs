//! Snapshots of a microVM: a paused VM saved to one file, and a new VM loaded from it.
//! The engine writes and reads the file as a migration to a file (see
//! [`ferry_migrate::snapshot`]); this module adapts the microVM to it.

use std::path::Path;

use ferry_migrate::snapshot::SnapshotReader;
pub use ferry_migrate::snapshot::{SnapshotError, SnapshotStats, FORMAT_VERSION};

use crate::files::AttachError;
use crate::migration::{file_infos, incompatibility, FillingVm, PausedVm};
use crate::vm::{CreateVmError, IncomingVm, Microvm, VmConfig, VmControlError};
use crate::{AttachedFiles, HostOptions};

/// File name of the snapshot inside a snapshot directory.
pub const SNAPSHOT_FILE: &str = "vm.snap";

/// Saves the paused `vm` to `path` (see [`Microvm::save`]).
pub(crate) fn save(vm: &Microvm, path: &Path) -> Result<SnapshotStats, VmControlError> {
    save_paused(&PausedVm::new(vm)?, path)
}

/// Saves `vm` to `path`, atomically.
pub fn save_paused(vm: &PausedVm, path: &Path) -> Result<SnapshotStats, VmControlError> {
    Ok(ferry_migrate::snapshot::save(vm, path)?)
}

/// Rebuilds a VM from the snapshot at `path`, paused (see [`Microvm::restore`]).
pub(crate) fn restore(
    path: &Path,
    mut host: HostOptions,
) -> Result<(Microvm, SnapshotStats), CreateVmError> {
    let reader = SnapshotReader::open(path)?;
    let saved = reader.vm();
    // Compared as a migration's handshake compares them (versions, CPU features, and what
    // the device's results depend on): a mismatch is refused by name before anything is
    // loaded, not found undecodable at the end, or run on to other results.
    if let Some(why) = incompatibility(saved) {
        return Err(CreateVmError::Incompatible(why));
    }
    let files = file_infos(&saved.files);
    let reopened = host.files.files().is_empty() && !files.is_empty();
    if reopened {
        host.files = AttachedFiles::reopen(&files).map_err(CreateVmError::Files)?;
    }
    // Refused before anything is loaded (the state checks the files again).
    if let Some(why) = host.files.mismatch(&files) {
        return Err(CreateVmError::FilesDiffer(why));
    }
    let config = VmConfig {
        ram_size: saved.ram_size,
        vcpus: saved.vcpus,
        accel_memory: saved.accel_memory,
    };
    let kind = (config.accel_memory > 0).then_some(saved.backend_kind.as_str());
    let vm = FillingVm::new(IncomingVm::new(config, kind, &saved.cpu_features, host)?);
    let stats = reader.load_into(&vm)?;
    let vm = vm.take_vm().expect("restored by a load that succeeded");
    // The device chunks named as file pieces were read from the files after their hashes
    // were taken: a file changed in place meanwhile gave the VM other bytes than those
    // recorded. A file reopened at a path the snapshot names is refused without saying
    // what is there now (as `AttachedFiles::reopen` refuses it).
    for file in vm.files().files() {
        file.check_unchanged().map_err(|changed| {
            CreateVmError::Files(if reopened {
                AttachError::NotAsRecorded {
                    name: file.info().name.clone(),
                    path: file.info().path.clone(),
                }
            } else {
                changed
            })
        })?;
    }
    Ok((vm, stats))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use ferry_accel::device::{BufferState, ChunkOrigin};
    use ferry_accel::dirty::{ChunkId, CHUNK_SIZE};

    use super::*;

    /// `len` bytes from `seed`, written at `path` (over what was there, in place).
    fn write(path: &Path, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let mut file = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        data
    }

    #[test]
    fn a_file_changed_in_place_after_it_was_hashed_is_refused_not_restored_from() {
        if !ferry_testdata::kvm(
            "a_file_changed_in_place_after_it_was_hashed_is_refused_not_restored_from",
        ) {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let data = scratch.path().join("data");
        let first = write(&data, CHUNK_SIZE as usize, 1);
        let attached = || AttachedFiles::open(&[("data".into(), data.clone())]).unwrap();
        let host = HostOptions {
            files: attached(),
            ..HostOptions::quiet()
        };
        // A paused VM whose device memory holds the file's first chunk, as a LOAD_FILE
        // leaves it: the snapshot names the piece rather than copying it.
        let image = ferry_guest_images::find("hello").unwrap().elf;
        let config = VmConfig::new(64 << 20).with_accel(1 << 20);
        let vm = Microvm::boot(config, image, &[], host).unwrap();
        let accel = vm.accel().unwrap();
        let chunk = ChunkId {
            buffer: 1,
            index: 0,
        };
        accel
            .sync_buffers(&[BufferState {
                id: 1,
                bytes: CHUNK_SIZE,
            }])
            .unwrap();
        let origin = ChunkOrigin {
            file: 0,
            offset: 0,
            len: CHUNK_SIZE,
        };
        accel.write_chunk_from_file(chunk, &first, origin).unwrap();
        let snap = scratch.path().join(SNAPSHOT_FILE);
        let stats = vm.save(&snap).unwrap();
        assert_eq!(stats.file_chunks, 1, "the chunk is named, not copied");
        drop(vm);

        // Given as `ferry restore --attach` gives it (opened and hashed), then rewritten
        // in place, same size, before the chunk is read from it.
        let files = attached();
        write(&data, CHUNK_SIZE as usize, 2);
        std::fs::File::options()
            .write(true)
            .open(&data)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        let restored = Microvm::restore(
            &snap,
            HostOptions {
                files,
                ..HostOptions::quiet()
            },
        );
        let err = match restored {
            Err(err) => err,
            Ok((vm, _)) => {
                let mut held = Vec::new();
                vm.accel().unwrap().read_chunk(chunk, &mut held);
                panic!(
                    "restored; its device chunk is the recorded content: {}",
                    held == first
                );
            }
        };
        let chain = ferry_migrate::error_chain(&err);
        assert!(matches!(err, CreateVmError::Files(_)), "{chain}");
        assert!(
            chain.contains("'data'") && chain.contains("has changed"),
            "{chain}"
        );
    }
}
