//! The microVM as the migration engine sees it: [`VmSource`] adapts a running
//! [`HostedVm`], [`VmTarget`] a VM being received.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_accel::backend;
use ferry_accel::device::{Accelerator, DeviceReplay, DeviceTracker};
use ferry_accel::dirty::ChunkId;
use ferry_migrate::{
    CaptureLimits, CaptureReport, Cause, ChunkKey, ChunkPart, ChunkWrite, DeviceBuffer,
    DeviceDigest, DigestAhead, FileOffer, LoggedCommand, MigrationSource, MigrationTarget, PageSet,
    VmContents, VmDescription, VmError,
};
use ferry_vmm::files::AttachedFile;
use ferry_vmm::migration::{device_buffers, file_offers, to_chunk, to_key, FillingVm};
pub use ferry_vmm::migration::{incompatibility, local_description};
use ferry_vmm::vm::IncomingVm;
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig};

use crate::capacity::Reservation;
use crate::files::{FileStore, IncomingFile, ReceivedFile, ReceivingPin};
use crate::hosted::{HostedVm, MemoryLoan};

/// Keys of [`VmDescription::extra`].
pub(crate) const EXTRA_ID: &str = "id";
pub(crate) const EXTRA_ARGS: &str = "args";
/// The source host's name.
pub(crate) const EXTRA_FROM: &str = "from";
/// The source daemon's instance ([`crate::Host`]'s random token): a host knows a VM sent
/// to itself by it (names need not be unique without a center).
pub(crate) const EXTRA_FROM_INSTANCE: &str = "from-instance";
/// The name given at creation (absent if none).
pub(crate) const EXTRA_NAME: &str = "name";
/// The key it was created with (absent if none).
pub(crate) const EXTRA_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The [`VmDescription::extra`] value of `key` in `description`.
pub(crate) fn extra<'a>(description: &'a VmDescription, key: &str) -> Option<&'a str> {
    (description.extra.iter())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `description` as this host keeps it: a source's name ([`EXTRA_FROM`]) that is not a
/// host name is dropped (the VM is taken without it), as it is stored and shown.
fn checked(description: &VmDescription) -> VmDescription {
    let mut description = description.clone();
    description.extra.retain(|(key, value)| {
        let keep = key != EXTRA_FROM || ferry_api::valid_host_name(value);
        if !keep {
            tracing::warn!(
                bytes = value.len(),
                "the source's name for itself is not a host name: dropped"
            );
        }
        keep
    });
    description
}

/// A hosted VM being sent.
pub struct VmSource {
    vm: Arc<HostedVm>,
    /// This host's name, for the destination's records.
    host_name: String,
    instance: String,
    /// The attached files (read-only: read without the VM's lock).
    files: AttachedFiles,
    /// The accelerator's backend kind ("" without one).
    backend_kind: String,
    /// The CPU features its CPUID shows the guest.
    cpu_features: Vec<ferry_migrate::CpuidWord>,
    /// The accelerator's side of a replay (used without the VM's lock: its calls wait
    /// for a command in flight).
    replayer: Option<DeviceReplay>,
    /// Guest RAM, its dirty log and the accelerator's memory, read without the VM's
    /// control lock: a page or chunk changed meanwhile is dirty again and sent in the
    /// next round. Lent: a VM that ends meanwhile keeps its capacity held until this is
    /// dropped. Last, so that it drops after every other hold on the VM's memory.
    tracker: MemoryLoan,
}

impl VmSource {
    /// Adapts `vm`, sent from host `host_name` (daemon instance `instance`); `None` if
    /// it was released.
    pub fn new(vm: Arc<HostedVm>, host_name: &str, instance: &str) -> Option<Self> {
        // First: a VM that ends from here on keeps its capacity while this is built.
        let tracker = vm.lend_memory()?;
        let (files, backend_kind, cpu_features, replayer) = vm.with_vm(|v| {
            (
                v.files().clone(),
                v.accel()
                    .map_or_else(String::new, |a| a.backend_kind().to_string()),
                v.cpu_features().to_vec(),
                v.accel().map(Accelerator::replayer),
            )
        })?;
        Some(Self {
            tracker,
            vm,
            host_name: host_name.to_string(),
            instance: instance.to_string(),
            files,
            backend_kind,
            cpu_features,
            replayer,
        })
    }

    /// The accelerator's tracker, if the VM has one.
    fn accel(&self) -> Option<&DeviceTracker> {
        self.tracker.accel()
    }

    /// The accelerator's side of a replay, or the error of a VM without one.
    fn replayer(&self) -> Result<&DeviceReplay, Cause> {
        self.replayer
            .as_ref()
            .ok_or_else(|| "the VM has no accelerator".into())
    }
}

impl VmContents for VmSource {
    fn describe(&self) -> VmDescription {
        // The VM runs here, so its backend is one of this host's.
        let local = local_description(&self.backend_kind)
            .or_else(|| local_description(backend::CPU))
            .expect("the cpu backend is always available");
        let backend_kind = self.backend_kind.clone();
        VmDescription {
            name: self.vm.workload.clone(),
            cpu_features: self.cpu_features.clone(),
            ram_size: self.vm.config.ram_size,
            vcpus: self.vm.config.vcpus,
            accel_memory: self.vm.config.accel_memory,
            backend_kind,
            extra: vec![
                (EXTRA_ID.into(), self.vm.id.clone()),
                (
                    EXTRA_ARGS.into(),
                    serde_json::to_string(&self.vm.args).unwrap_or_default(),
                ),
                (EXTRA_FROM.into(), self.host_name.clone()),
                (EXTRA_FROM_INSTANCE.into(), self.instance.clone()),
            ]
            .into_iter()
            .chain(self.vm.name.clone().map(|n| (EXTRA_NAME.into(), n)))
            .chain((self.vm.idempotency_key.clone()).map(|k| (EXTRA_IDEMPOTENCY_KEY.into(), k)))
            .collect(),
            files: file_offers(self.files.infos()),
            ..local
        }
    }

    fn check_files(&self) -> Result<(), VmError> {
        self.files
            .check_unchanged()
            .map_err(|e| VmError::CheckFiles(e.into()))
    }

    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let failed = |source: Cause| VmError::ReadFile {
            file,
            offset,
            source,
        };
        let f = self
            .files
            .files()
            .get(file as usize)
            .ok_or_else(|| failed("no such attached file".into()))?;
        f.read_at(offset, out).map_err(|e| failed(e.into()))
    }

    ferry_vmm::reads_through_tracker!(tracker);

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        let state = self
            .vm
            .with_vm(Microvm::save_state)
            .ok_or_else(|| VmError::Gone(format!("VM {} was released", self.vm.id)))?
            .map_err(|e| VmError::SaveState(e.into()))?;
        postcard::to_stdvec(&state).map_err(|e| VmError::SaveState(e.into()))
    }

    fn read_base_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Result<bool, VmError> {
        self.replayer()
            .map_err(VmError::Capture)?
            .read_base_chunk(to_chunk(chunk), out)
            .map_err(|e| VmError::Capture(e.into()))
    }
}

impl MigrationSource for VmSource {
    fn start_device_tracking(&self) -> Result<(), VmError> {
        if let Some(accel) = self.accel() {
            accel.start_dirty_tracking();
        }
        Ok(())
    }

    fn start_ram_tracking(&self) -> Result<(), VmError> {
        self.tracker
            .start_dirty_log()
            .map_err(|e| VmError::StartTracking(e.into()))
    }

    fn stop_tracking(&self) {
        let _ = self.tracker.stop_dirty_log();
        if let Some(accel) = self.accel() {
            accel.stop_dirty_tracking();
        }
    }

    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        self.tracker
            .take_dirty_pages()
            .map_err(|e| VmError::DirtyLog(e.into()))
    }

    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        self.accel().map_or_else(Vec::new, |a| {
            a.take_dirty_chunks().into_iter().map(to_key).collect()
        })
    }

    fn take_dirty_parts(&self) -> Vec<ChunkPart> {
        self.accel().map_or_else(Vec::new, |a| {
            a.take_dirty_parts()
                .into_iter()
                .map(|(chunk, bytes)| ChunkPart {
                    key: to_key(chunk),
                    bytes,
                })
                .collect()
        })
    }

    fn set_throttle(&self, percent: u8) {
        self.vm.set_throttle(percent);
    }

    fn pause(&self) -> Result<Instant, VmError> {
        self.vm.hold()
    }

    fn resume(&self) -> Result<(), VmError> {
        // Before Go: a switchover that gave way goes back to migrating, so that the
        // migration's next pause holds it again and its pre-copy throttles it.
        self.vm.end_switchover()
    }

    fn start_capture(
        &self,
        limits: CaptureLimits,
        since: Option<&[ChunkKey]>,
    ) -> Result<(Vec<DeviceBuffer>, Vec<ChunkKey>), VmError> {
        let replayer = self.replayer().map_err(VmError::Capture)?;
        let since: Option<Vec<ChunkId>> = since.map(|c| c.iter().copied().map(to_chunk).collect());
        let (table, chunks) = replayer.start_capture(limits, since.as_deref());
        Ok((
            device_buffers(table),
            chunks.into_iter().map(to_key).collect(),
        ))
    }

    fn take_commands(&self) -> Result<Vec<LoggedCommand>, VmError> {
        self.replayer()
            .map_err(VmError::Capture)?
            .take_log()
            .map_err(|e| VmError::Capture(e.into()))
    }

    fn stop_capture(&self) -> Option<CaptureReport> {
        self.replayer.as_ref()?.stop_capture()
    }

    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        self.replayer()
            .map_err(VmError::Capture)?
            .digest()
            .map_err(|e| VmError::Capture(e.into()))
    }

    fn device_digest_estimate(&self) -> Duration {
        self.replayer()
            .map_or(Duration::ZERO, DeviceReplay::digest_estimate)
    }

    fn digest_ahead(&self) -> Option<DigestAhead> {
        let replayer = self.replayer().ok()?.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Not joined: a stop waits for no kernel in flight (the hashing runs between
        // commands), and the thread ends after the buffer it hashes.
        std::thread::Builder::new()
            .name("ferry-digest-ahead".into())
            .spawn(move || {
                let bytes = replayer.digest_ahead(&stopped);
                tracing::debug!(bytes, "device memory digested ahead");
            })
            .ok()?;
        Some(DigestAhead::new(stop))
    }
}

/// Where each offered file comes from on this host.
enum FileSlot {
    /// This host has the content already.
    Present(AttachedFile),
    /// Being received (shared so that writes happen outside the slots' lock).
    Receiving(Arc<IncomingFile>),
    /// Received and checked.
    Received(AttachedFile),
    /// Neither found nor asked for (yet).
    Missing,
}

/// A VM being received: RAM and device filled round by round, restored at switchover.
pub struct VmTarget {
    /// What the source offered.
    pub description: VmDescription,
    vm: FillingVm,
    store: FileStore,
    /// By offer index.
    files: Mutex<Vec<FileSlot>>,
    /// The received files, moved into the store once the VM is adopted; deleted with
    /// the target if the migration fails.
    received: Mutex<Vec<ReceivedFile>>,
    /// This host's capacity for the VM, held from the offer's acceptance: given back if
    /// the target is dropped, handed on to the VM once it runs.
    reservation: Mutex<Option<Reservation>>,
    /// Keeps the store's copies of its files from eviction until it is listed here (the
    /// target is dropped after) or its migration fails.
    _pinned: ReceivingPin,
}

impl VmTarget {
    /// An empty VM shaped like `description` (compatibility already checked); its
    /// attached files are looked for on this host, or received into `store`.
    pub fn prepare(
        description: &VmDescription,
        host: HostOptions,
        store: FileStore,
        reservation: Reservation,
    ) -> Result<Self, VmError> {
        let config = VmConfig {
            ram_size: description.ram_size,
            vcpus: description.vcpus,
            accel_memory: description.accel_memory,
        };
        let kind = (config.accel_memory > 0).then_some(description.backend_kind.as_str());
        let incoming = IncomingVm::new(config, kind, &description.cpu_features, host)
            .map_err(|e| VmError::Create(e.into()))?;
        // Before they are looked for: a copy found is never evicted under the VM.
        let pinned = store.pin(&description.files);
        let files = description
            .files
            .iter()
            .map(|offer| {
                store
                    .find(offer)
                    .map_or(FileSlot::Missing, FileSlot::Present)
            })
            .collect();
        Ok(Self {
            description: checked(description),
            vm: FillingVm::new(incoming),
            store,
            files: Mutex::new(files),
            received: Mutex::default(),
            reservation: Mutex::new(Some(reservation)),
            _pinned: pinned,
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<FileSlot>> {
        self.files.lock().expect("target files lock")
    }

    /// The attached files, if every one is on this host now (the same open files).
    fn files_here(&self) -> Option<AttachedFiles> {
        let files = self
            .slots()
            .iter()
            .map(|slot| match slot {
                FileSlot::Present(f) | FileSlot::Received(f) => Some(f.clone()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        AttachedFiles::new(files).ok()
    }

    /// The restored VM (after [`MigrationTarget::resume`]) and its reservation; the
    /// files received with it go into the store.
    pub fn take_vm(&self) -> Option<(Microvm, Reservation)> {
        let vm = self.vm.take_vm()?;
        let reservation = self.reservation.lock().expect("target lock").take()?;
        let received = std::mem::take(&mut *self.received.lock().expect("target lock"));
        for file in received {
            // The VM has the file open: it runs on without it in the store.
            if let Err(e) = file.keep() {
                tracing::warn!(
                    "a received file is not kept: {}",
                    ferry_migrate::error_chain(&e)
                );
            }
        }
        Some((vm, reservation))
    }

    /// An [`VmDescription::extra`] value.
    pub fn extra(&self, key: &str) -> Option<&str> {
        extra(&self.description, key)
    }
}

impl MigrationTarget for VmTarget {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.vm.write_ram(gpa, data)
    }

    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        self.vm.sync_buffers(table)
    }

    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        match write {
            ChunkWrite::LocalFile { len, origin } => {
                // This host's copy (the same content: checked by hash at the handshake); a
                // clone (the same open file), so no lock is held while reading.
                let file = match self.slots().get(origin.file as usize) {
                    Some(FileSlot::Present(f) | FileSlot::Received(f)) => Some(f.clone()),
                    _ => None,
                };
                self.vm.write_chunk_from(chunk, len, origin, file.as_ref())
            }
            write => self.vm.write_chunk(chunk, write),
        }
    }

    fn has_file(&self, file: u32) -> bool {
        matches!(self.slots().get(file as usize), Some(FileSlot::Present(_)))
    }

    fn read_local_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let failed = |source: Cause| VmError::ReadFile {
            file,
            offset,
            source,
        };
        // A clone (the same open file), read with no lock held.
        let copy = match self.slots().get(file as usize) {
            Some(FileSlot::Present(f) | FileSlot::Received(f)) => f.clone(),
            Some(_) => return Err(failed("this host has no checked copy of it yet".into())),
            None => return Err(failed("no such attached file".into())),
        };
        copy.read_at(offset, out).map_err(|e| failed(e.into()))
    }

    fn receive_files(&self, files: &[u32]) -> Result<(), VmError> {
        let offers: Vec<&FileOffer> = files
            .iter()
            .map(|&f| &self.description.files[f as usize])
            .collect();
        let incoming = self
            .store
            .receive(&offers)
            .map_err(|e| VmError::ReceiveFiles(e.into()))?;
        let mut slots = self.slots();
        for (&f, file) in files.iter().zip(incoming) {
            slots[f as usize] = FileSlot::Receiving(Arc::new(file));
        }
        Ok(())
    }

    fn write_file(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), VmError> {
        let incoming = match self.slots().get(file as usize) {
            Some(FileSlot::Receiving(incoming)) => Some(incoming.clone()),
            _ => None,
        };
        let written = match incoming {
            Some(incoming) => incoming.write_at(offset, data).map_err(Cause::from),
            None => Err("the file is not being received".into()),
        };
        written.map_err(|source| VmError::WriteFile {
            file,
            offset,
            source,
        })
    }

    fn files_received(&self) -> Result<(), VmError> {
        // Taken out of the slots, then checked (a hash of up to gigabytes) unlocked.
        let received: Vec<(usize, Arc<IncomingFile>)> = self
            .slots()
            .iter_mut()
            .enumerate()
            .filter(|(_, slot)| matches!(slot, FileSlot::Receiving(_)))
            .filter_map(
                |(i, slot)| match std::mem::replace(slot, FileSlot::Missing) {
                    FileSlot::Receiving(incoming) => Some((i, incoming)),
                    _ => None,
                },
            )
            .collect();
        for (i, incoming) in received {
            let incoming = Arc::try_unwrap(incoming).map_err(|_| {
                VmError::FilesReceived(format!("attached file {i} is still being written").into())
            })?;
            let received = self
                .store
                .finish(incoming)
                .map_err(|e| VmError::FilesReceived(e.into()))?;
            self.slots()[i] = FileSlot::Received(received.file().clone());
            self.received.lock().expect("target lock").push(received);
        }
        Ok(())
    }

    fn restore(&self, blob: &[u8]) -> Result<(), VmError> {
        let files = {
            let mut slots = self.slots();
            let mut files = Vec::with_capacity(slots.len());
            for (i, slot) in slots.iter_mut().enumerate() {
                match std::mem::replace(slot, FileSlot::Missing) {
                    FileSlot::Present(f) | FileSlot::Received(f) => files.push(f),
                    _ => {
                        return Err(VmError::Restore(
                            format!("attached file {i} is not on this host").into(),
                        ))
                    }
                }
            }
            AttachedFiles::new(files).map_err(|e| VmError::Restore(e.into()))?
        };
        self.vm.restore_with(blob, Some(files))
    }

    fn resume(&self) -> Result<(), VmError> {
        self.vm.resume()
    }

    fn can_replay(&self) -> bool {
        self.description.accel_memory > 0
    }

    fn replay(&self, commands: Vec<LoggedCommand>, deadline: Instant) -> Result<(), VmError> {
        // A replayed file load reads this host's copies (all here once round 0 is done).
        let files = self.files_here();
        let device = self
            .vm
            .with_incoming(|vm| {
                let accel = vm.accel().ok_or("the VM has no accelerator")?;
                if let Some(files) = files {
                    accel.set_files(Arc::new(files));
                }
                Ok(accel.replayer())
            })
            .map_err(VmError::Replay)?;
        // Without the target's lock: the commands run kernels.
        device
            .replay(commands, deadline)
            .map_err(|e| VmError::Replay(e.into()))?;
        // Digest now what these commands wrote, while the VM still runs on the source:
        // the switchover's digest then hashes only what the last ones wrote. (A buffer
        // that cannot be read now is read again then, and fails that digest.)
        let _ = device.digest();
        Ok(())
    }

    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        self.vm
            .with_incoming(|vm| Ok(vm.accel().ok_or("the VM has no accelerator")?.replayer()))
            .map_err(VmError::Replay)?
            .digest()
            .map_err(|e| VmError::Replay(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_name_that_is_not_a_host_name_is_not_kept() {
        let local = local_description(backend::CPU).expect("the cpu backend");
        let from = |name: &str| VmDescription {
            extra: vec![
                (EXTRA_ID.into(), "a-vm1".into()),
                (EXTRA_FROM.into(), name.into()),
            ],
            ..local.clone()
        };
        let kept = checked(&from("host-a.2"));
        assert_eq!(kept.extra, from("host-a.2").extra);
        for bad in [
            "h".repeat(64),
            "a\nb".into(),
            "\u{1b}[2J".into(),
            String::new(),
        ] {
            let kept = checked(&from(&bad));
            assert_eq!(
                kept.extra,
                [(EXTRA_ID.to_string(), "a-vm1".to_string())],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_vm_whose_guest_saw_a_cpu_feature_this_host_lacks_is_refused_by_name() {
        let local = local_description(backend::CPU).expect("the cpu backend");
        assert!(local.cpu_features.iter().any(|w| w.bits != 0));
        // A VM that has run only on CPUs like this one is taken.
        assert_eq!(incompatibility(&local), None);
        // One whose guest has seen every feature named in the extended leaf (AMD's XOP,
        // FMA4 and TBM with the others: no current CPU has them all) is not.
        let extended =
            ferry_migrate::cpu::cpu_features(
                |leaf, _, _| {
                    if leaf == 0x8000_0001 {
                        u32::MAX
                    } else {
                        0
                    }
                },
            );
        let offered = VmDescription {
            cpu_features: ferry_migrate::cpu::joined(&local.cpu_features, &extended),
            ..local
        };
        let why = incompatibility(&offered).expect("refused");
        assert!(why.contains("fma4") && why.contains("lacks"), "{why}");
    }
}
