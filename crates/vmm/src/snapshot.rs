//! Snapshots of a microVM: a paused VM saved to one file, and a new VM loaded from it.
//! The engine writes and reads the file as a migration to a file (see
//! [`ferry_migrate::snapshot`]); this module adapts the microVM to it.

use std::path::Path;

use ferry_migrate::snapshot::SnapshotReader;
pub use ferry_migrate::snapshot::{SnapshotError, SnapshotStats, FORMAT_VERSION};

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
    if host.files.files().is_empty() && !files.is_empty() {
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
    Ok((vm, stats))
}
