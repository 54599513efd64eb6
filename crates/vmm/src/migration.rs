//! The microVM as the migration engine sees it, for a migration's host adapters and for
//! snapshots alike: reading a VM's RAM and device memory through its [`VmTracker`],
//! filling an [`IncomingVm`] ([`FillingVm`]), and a paused VM as a source
//! ([`PausedVm`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use ferry_abi::ABI_VERSION;
use ferry_accel::backend::{self, cpu::gemm_microkernel, DeviceMemory};
use ferry_accel::device::{AccelStateError, Accelerator, BufferState};
use ferry_accel::dirty::ChunkId;
use ferry_migrate::vm::MAX_CHUNK_BYTES;
use ferry_migrate::{
    Cause, ChunkKey, ChunkOrigin, ChunkWrite, DeviceBuffer, FileChunk, FileOffer, MigrationTarget,
    PageSet, VmContents, VmDescription, VmError,
};
use vm_memory::{Bytes, GuestAddress};

use crate::files::{AttachedFile, AttachedFiles, FileInfo};
use crate::memory::{populated_pages, GuestRam};
use crate::vm::{IncomingVm, Microvm, MicrovmState, VmControlError, VmTracker, STATE_VERSION};

// A device chunk must fit one chunk frame of the wire.
const _: () = assert!(ferry_accel::dirty::CHUNK_SIZE <= MAX_CHUNK_BYTES);

/// The engine's name for device chunk `c`.
pub fn to_key(c: ChunkId) -> ChunkKey {
    ChunkKey {
        buffer: c.buffer,
        index: c.index,
    }
}

/// The device's name for chunk `k`.
pub fn to_chunk(k: ChunkKey) -> ChunkId {
    ChunkId {
        buffer: k.buffer,
        index: k.index,
    }
}

/// The device's record that a chunk's `len` bytes are the file piece `origin` names.
fn to_origin(origin: ChunkOrigin, len: u64) -> ferry_accel::device::ChunkOrigin {
    ferry_accel::device::ChunkOrigin {
        file: origin.file,
        offset: origin.offset,
        len,
    }
}

/// The engine's form of the device buffer table `table`.
pub fn device_buffers(table: Vec<BufferState>) -> Vec<DeviceBuffer> {
    table
        .into_iter()
        .map(|b| DeviceBuffer {
            id: b.id,
            bytes: b.bytes,
        })
        .collect()
}

/// How the engine offers attached files `files`.
pub fn file_offers(files: Vec<FileInfo>) -> Vec<FileOffer> {
    files
        .into_iter()
        .map(|f| FileOffer {
            name: f.name,
            size: f.size,
            sha256: f.sha256,
            path: f.path.display().to_string(),
        })
        .collect()
}

/// Attached file `offer` as found at `path`.
pub fn file_info(offer: &FileOffer, path: PathBuf) -> FileInfo {
    FileInfo {
        name: offer.name.clone(),
        size: offer.size,
        sha256: offer.sha256.clone(),
        path,
    }
}

/// The attached files as `offers` describes them (to open them again where they were).
pub fn file_infos(offers: &[FileOffer]) -> Vec<FileInfo> {
    offers
        .iter()
        .map(|f| file_info(f, f.path.clone().into()))
        .collect()
}

/// What [`VmContents`] reads of a VM, through its tracker (without the VM's lock).
/// What this host can run a VM on accelerator backend `kind` with: the facts compared at
/// the handshake. `None` if this host has no such backend.
pub fn local_description(kind: &str) -> Option<VmDescription> {
    // Computed once per kind: finding the kernel version builds a backend (a GPU's
    // context), which no other handshake waits for (it is built outside the lock); a
    // kind this host lacks is asked about again.
    static LOCAL: OnceLock<Mutex<HashMap<String, VmDescription>>> = OnceLock::new();
    let known = || {
        LOCAL
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    if let Some(found) = known().get(kind) {
        return Some(found.clone());
    }
    let described = described_here(kind)?;
    Some(known().entry(kind.to_string()).or_insert(described).clone())
}

/// What this host can run a VM on backend `kind` with, found by building one.
fn described_here(kind: &str) -> Option<VmDescription> {
    let backend = backend::create(kind, 1, &DeviceMemory::default()).ok()?;
    Some(VmDescription {
        name: String::new(),
        ram_size: 0,
        vcpus: 1,
        accel_memory: 0,
        abi_version: ABI_VERSION,
        state_version: STATE_VERSION,
        backend_kind: backend.kind().into(),
        kernel_version: backend.kernel_version(),
        // The cpu backend's MATMUL bits depend on the CPU's microkernel; a cuda
        // backend's kind names what its bits depend on.
        microkernel: if kind == backend::CPU {
            gemm_microkernel().into()
        } else {
            String::new()
        },
        extra: Vec::new(),
        files: Vec::new(),
        cpu_features: ferry_migrate::cpu::native_cpu_features().to_vec(),
    })
}

/// Why this host cannot run `vm`, if it cannot.
pub fn incompatibility(vm: &VmDescription) -> Option<String> {
    let kind = if vm.accel_memory > 0 {
        vm.backend_kind.as_str()
    } else {
        backend::CPU
    };
    match backend::by_name(kind).map(local_description) {
        Ok(Some(local)) => vm.incompatibility(&local),
        Ok(None) => Some(format!("accelerator backend '{kind}' does not start here")),
        Err(why) => Some(ferry_migrate::error_chain(&why)),
    }
}

impl VmTracker {
    /// The device buffer table now.
    pub fn device_buffers(&self) -> Vec<DeviceBuffer> {
        self.accel()
            .map_or_else(Vec::new, |a| device_buffers(a.buffer_table()))
    }

    /// Device chunks that may hold data.
    pub fn populated_chunks(&self) -> Vec<ChunkKey> {
        self.accel().map_or_else(Vec::new, |a| {
            a.written_chunks().into_iter().map(to_key).collect()
        })
    }

    /// RAM pages that may hold data (`None`: not known).
    pub fn populated_pages(&self) -> Option<PageSet> {
        populated_pages(self.memory())
            .inspect_err(|e| {
                tracing::warn!("cannot read which guest pages are backed ({e}); reading them all");
            })
            .ok()
    }

    /// Reads guest RAM at `gpa` into `out`.
    pub fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        self.memory()
            .read_slice(out, GuestAddress(gpa))
            .map_err(|e| VmError::ReadRam {
                gpa,
                source: e.into(),
            })
    }

    /// Copies chunk `chunk` into `out`; its buffer's size, `None` if it is gone.
    pub fn read_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Option<u64> {
        self.accel()?.read_chunk(to_chunk(chunk), out)
    }

    /// Chunk `chunk` as the piece of an attached file it holds, if it holds one.
    pub fn file_chunk(&self, chunk: ChunkKey) -> Option<FileChunk> {
        let (origin, buffer_bytes) = self.accel()?.chunk_origin(to_chunk(chunk))?;
        Some(FileChunk {
            origin: ChunkOrigin {
                file: origin.file,
                offset: origin.offset,
            },
            len: origin.len,
            buffer_bytes,
        })
    }
}

/// The [`VmContents`] methods that read a VM's memory, each through the
/// [`VmTracker`] in field `$tracker`: one definition for every adapter of a microVM.
#[macro_export]
macro_rules! reads_through_tracker {
    ($tracker:ident) => {
        fn populated_chunks(&self) -> Vec<::ferry_migrate::ChunkKey> {
            self.$tracker.populated_chunks()
        }

        fn device_buffers(&self) -> Vec<::ferry_migrate::DeviceBuffer> {
            self.$tracker.device_buffers()
        }

        fn populated_pages(&self) -> Option<::ferry_migrate::PageSet> {
            self.$tracker.populated_pages()
        }

        fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), ::ferry_migrate::VmError> {
            self.$tracker.read_ram(gpa, out)
        }

        fn read_chunk(&self, chunk: ::ferry_migrate::ChunkKey, out: &mut Vec<u8>) -> Option<u64> {
            self.$tracker.read_chunk(chunk, out)
        }

        fn file_chunk(
            &self,
            chunk: ::ferry_migrate::ChunkKey,
        ) -> Option<::ferry_migrate::FileChunk> {
            self.$tracker.file_chunk(chunk)
        }
    };
}

/// A paused microVM as the source of a snapshot: its state, taken once, and its memory.
pub struct PausedVm {
    tracker: VmTracker,
    /// The attached files, to check before their recorded hashes are saved.
    files: AttachedFiles,
    /// What the snapshot says of the VM (public, as the state, for tests of refusals).
    pub description: VmDescription,
    /// The state saved (public so that a test can save a state KVM will refuse).
    pub state: MicrovmState,
}

impl PausedVm {
    /// `vm`, which must be paused (and stay so while it is read).
    pub fn new(vm: &Microvm) -> Result<Self, VmControlError> {
        let state = vm.save_state()?;
        let config = vm.config();
        let accel = state.accel.as_ref();
        let description = VmDescription {
            name: String::new(),
            ram_size: config.ram_size,
            vcpus: config.vcpus,
            accel_memory: config.accel_memory,
            abi_version: ABI_VERSION,
            state_version: STATE_VERSION,
            backend_kind: accel.map_or_else(String::new, |a| a.backend_kind.clone()),
            kernel_version: accel.map_or(0, |a| a.kernel_version),
            // What the VM's MATMUL bits depend on here, as a migration's source says.
            microkernel: accel
                .and_then(|a| local_description(&a.backend_kind))
                .map_or_else(String::new, |local| local.microkernel),
            extra: Vec::new(),
            files: file_offers(vm.files().infos()),
            cpu_features: vm.cpu_features().to_vec(),
        };
        Ok(Self {
            tracker: vm.tracker(),
            files: vm.files().clone(),
            description,
            state,
        })
    }
}

impl VmContents for PausedVm {
    fn describe(&self) -> VmDescription {
        self.description.clone()
    }

    fn check_files(&self) -> Result<(), VmError> {
        self.files
            .check_unchanged()
            .map_err(|e| VmError::CheckFiles(e.into()))
    }

    reads_through_tracker!(tracker);

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        postcard::to_stdvec(&self.state).map_err(|e| VmError::SaveState(e.into()))
    }
}

enum Filling {
    /// RAM and device take contents.
    Empty(IncomingVm),
    /// Restored from the final state, paused or running.
    Restored(Microvm),
    /// Taken by its owner.
    Gone,
}

/// An [`IncomingVm`] being filled by the engine (a migration's round or a snapshot's
/// contents), then restored from the final state.
pub struct FillingVm {
    memory: GuestRam,
    state: Mutex<Filling>,
}

impl FillingVm {
    /// Fills `vm`.
    pub fn new(vm: IncomingVm) -> Self {
        Self {
            memory: vm.memory().clone(),
            state: Mutex::new(Filling::Empty(vm)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Filling> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the VM while it is being filled.
    pub fn with_incoming<R>(
        &self,
        f: impl FnOnce(&IncomingVm) -> Result<R, Cause>,
    ) -> Result<R, Cause> {
        match &*self.lock() {
            Filling::Empty(vm) => f(vm),
            _ => Err("the VM is already restored".into()),
        }
    }

    /// Writes device chunk `chunk` of the VM being filled with `write`.
    fn with_accel(
        &self,
        chunk: ChunkKey,
        write: impl FnOnce(&Accelerator, ChunkId) -> Result<(), AccelStateError>,
    ) -> Result<(), VmError> {
        self.with_incoming(|vm| {
            let accel = vm
                .accel()
                .ok_or("a device chunk for a VM without an accelerator")?;
            write(accel, to_chunk(chunk)).map_err(Cause::from)
        })
        .map_err(|source| VmError::WriteChunk { chunk, source })
    }

    /// Writes chunk `chunk` (`len` bytes) from `file`, the attached file `origin` names,
    /// bounds checked: the peer or file that said so is not trusted to count.
    pub fn write_chunk_from(
        &self,
        chunk: ChunkKey,
        len: u64,
        origin: ChunkOrigin,
        file: Option<&AttachedFile>,
    ) -> Result<(), VmError> {
        let fail = |why: String| VmError::WriteChunk {
            chunk,
            source: why.into(),
        };
        let file =
            file.ok_or_else(|| fail(format!("attached file {} is not on this host", origin.file)))?;
        let size = file.info().size;
        if origin.offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(fail(format!(
                "bytes {}..+{len} are not inside attached file {} ({size} bytes)",
                origin.offset, origin.file
            )));
        }
        if len > MAX_CHUNK_BYTES {
            return Err(fail(format!(
                "{len} bytes is more than a chunk ({MAX_CHUNK_BYTES})"
            )));
        }
        // Read before the VM's and the device's locks are taken: a disk read (of a slow or
        // network file system) must not hold up the other streams' writes. Into a buffer
        // this thread keeps: a fresh one per chunk costs an allocation and a zeroing,
        // thousands of times for a model, on cores the source VM may share.
        thread_local! {
            static PIECE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PIECE.with_borrow_mut(|piece| {
            piece.resize(len as usize, 0);
            file.read_at(origin.offset, piece)
                .map_err(|e| fail(format!("cannot read attached file {}: {e}", origin.file)))?;
            self.write_chunk(
                chunk,
                ChunkWrite::FilePiece {
                    data: piece,
                    origin,
                },
            )
        })
    }

    /// Restores the VM from the final state `blob`, with its attached files `files`
    /// (`None`: those it was made with), still paused.
    pub fn restore_with(&self, blob: &[u8], files: Option<AttachedFiles>) -> Result<(), VmError> {
        let state: MicrovmState =
            postcard::from_bytes(blob).map_err(|e| VmError::Restore(e.into()))?;
        let mut slot = self.lock();
        match std::mem::replace(&mut *slot, Filling::Gone) {
            Filling::Empty(mut incoming) => {
                if let Some(files) = files {
                    incoming.attach_files(files);
                }
                let vm = incoming
                    .finish(&state)
                    .map_err(|e| VmError::Restore(e.into()))?;
                *slot = Filling::Restored(vm);
                Ok(())
            }
            _ => Err(VmError::Restore("the VM was already restored".into())),
        }
    }

    /// The restored VM, taken by its owner.
    pub fn take_vm(&self) -> Option<Microvm> {
        let mut slot = self.lock();
        match std::mem::replace(&mut *slot, Filling::Gone) {
            Filling::Restored(vm) => Some(vm),
            other => {
                *slot = other;
                None
            }
        }
    }
}

impl MigrationTarget for FillingVm {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| VmError::WriteRam {
                gpa,
                source: e.into(),
            })
    }

    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        self.with_incoming(|vm| match vm.accel() {
            Some(accel) => {
                let table: Vec<BufferState> = table
                    .iter()
                    .map(|b| BufferState {
                        id: b.id,
                        bytes: b.bytes,
                    })
                    .collect();
                accel.sync_buffers(&table).map_err(Cause::from)
            }
            None if table.is_empty() => Ok(()),
            None => Err("device buffers for a VM without an accelerator".into()),
        })
        .map_err(VmError::SyncBuffers)
    }

    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        match write {
            ChunkWrite::Whole(data) => {
                self.with_accel(chunk, |accel, id| accel.write_chunk(id, data))
            }
            ChunkWrite::Part { offset, data } => {
                self.with_accel(chunk, |accel, id| accel.write_chunk_part(id, offset, data))
            }
            ChunkWrite::FilePiece { data, origin } => {
                let from = to_origin(origin, data.len() as u64);
                self.with_accel(chunk, |accel, id| {
                    accel.write_chunk_from_file(id, data, from)
                })
            }
            ChunkWrite::LocalFile { len, origin } => {
                // The files the VM was made with (a clone: no lock is held while reading).
                let file = self
                    .with_incoming(|vm| Ok(vm.files().files().get(origin.file as usize).cloned()))
                    .map_err(|source| VmError::WriteChunk { chunk, source })?;
                self.write_chunk_from(chunk, len, origin, file.as_ref())
            }
        }
    }

    fn restore(&self, blob: &[u8]) -> Result<(), VmError> {
        self.restore_with(blob, None)
    }

    fn resume(&self) -> Result<(), VmError> {
        match &mut *self.lock() {
            Filling::Restored(vm) => vm.resume().map_err(|e| VmError::Resume(e.into())),
            _ => Err(VmError::Resume("no restored VM to resume".into())),
        }
    }
}
