//! Snapshots: a paused VM saved to a file, and loaded back into a new VM.
//!
//! A snapshot is a migration whose destination is a file. It is written from the VM's
//! [`VmContents`] by the sender of a stop-and-copy migration's round 0, in the
//! migration stream's frames, and read back into a [`MigrationTarget`] with the
//! receiver's record checks. One serializer of a whole VM serves both.
//!
//! ```text
//! header   magic "FERRYSNP" | format version u32 | wire protocol version u32
//! frames   Offer        the VM's description: shape, versions, attached files
//!          BeginRound   round 0, with the device buffer table
//!          RAM runs and device chunks, as round 0 of a migration sends them: zero pages
//!            and chunks are left out (a VM starts zeroed), and a chunk that holds a
//!            piece of an attached file is named by the piece, not copied (the file is
//!            attached again when the snapshot is loaded)
//!          EndRound     round 0, with the number of data frames
//!          State        the VM's state (vCPUs, devices), opaque here; nothing follows
//! ```
//!
//! Integers are little endian. Each frame carries a CRC-32 of its payload and a header
//! whose every field is checked (one CRC pass over the file, not two: a file-wide
//! checksum as well made restoring a third slower). A reader checks every record against
//! the VM's shape, and that the state ends the file, before the target is restored, so a
//! truncated, corrupted or foreign file is refused with a reason and never runs
//! half-loaded.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::durable::{create_temporary, sync_folder_of};
use crate::receive::{apply_data, sync_buffers, validate_offer, BadOffer};
use crate::replay::DeviceTransfer;
use crate::send::{send_share, CancelToken, RoundWork, StreamBuffers, WorkQueue};
use crate::vm::{FileTransfer, MigrationTarget, VmContents, VmDescription, VmError, PAGE_SIZE};
use crate::wire::{Frame, FrameReader, FrameWriter, Message, Transfer, PROTOCOL_VERSION};
use crate::MigrationError;

/// Format version this engine writes and reads. 4: the migration stream's frames.
pub const FORMAT_VERSION: u32 = 4;
/// The migration stream protocol of the frames a snapshot holds: the last version that
/// changed them (9 changed only what a destination tells its source), so that snapshots
/// stay readable across versions that do not.
pub const SNAPSHOT_PROTOCOL: u32 = 8;
const _: () = assert!(SNAPSHOT_PROTOCOL <= PROTOCOL_VERSION);
/// The first bytes of a snapshot.
pub const MAGIC: [u8; 8] = *b"FERRYSNP";
/// Bytes before the first frame: magic, format version, wire protocol version.
pub const HEADER_LEN: usize = 16;

/// Errors saving or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened, read or written.
    #[error("{}: I/O error", path.display())]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file ends early.
    #[error("{}: snapshot is truncated", path.display())]
    Truncated {
        /// The snapshot file.
        path: PathBuf,
    },
    /// Not a Ferry snapshot.
    #[error("{}: not a Ferry snapshot (bad magic)", path.display())]
    BadMagic {
        /// The snapshot file.
        path: PathBuf,
    },
    /// Written by an incompatible version of Ferry.
    #[error("{}: snapshot format version {found} is not supported (this ferry reads version {FORMAT_VERSION})", path.display())]
    UnsupportedVersion {
        /// The snapshot file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
    },
    /// Its frames are of another version of the migration stream.
    #[error("{}: snapshot written with migration stream protocol {found} (this ferry reads protocol {SNAPSHOT_PROTOCOL})", path.display())]
    UnsupportedProtocol {
        /// The snapshot file.
        path: PathBuf,
        /// Protocol in the file.
        found: u32,
    },
    /// A frame or record is malformed, out of order, or outside the VM's shape.
    #[error("{}: corrupt snapshot", path.display())]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// Which check failed.
        #[source]
        source: MigrationError,
    },
    /// The VM being saved could not be read.
    #[error("cannot read the VM to save it")]
    Save(#[source] VmError),
    /// The VM's description is one a load refuses: saved, the VM could not come back.
    #[error("cannot save the VM: {0}, which a restore would refuse")]
    Unloadable(BadOffer),
    /// The VM being loaded could not take the snapshot's contents or state.
    #[error("{}: cannot load the snapshot into the VM", path.display())]
    Load {
        /// The snapshot file.
        path: PathBuf,
        /// What the VM said.
        #[source]
        source: VmError,
    },
}

/// Sizes of a saved or loaded snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// Non-zero accelerator chunks stored.
    pub chunks_stored: u64,
    /// Accelerator chunks stored as the piece of an attached file they hold.
    pub file_chunks: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
}

/// The snapshot error for `error`, met reading or writing `path`.
fn file_error(path: &Path, error: MigrationError) -> SnapshotError {
    let path = path.to_owned();
    match error {
        MigrationError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
            SnapshotError::Truncated { path }
        }
        MigrationError::Io { source, .. } => SnapshotError::Io { path, source },
        MigrationError::Source(source) => SnapshotError::Save(source),
        MigrationError::Target(source) => SnapshotError::Load { path, source },
        source => SnapshotError::Corrupt { path, source },
    }
}

/// Saves the paused VM `vm` to `path`, atomically: the file appears (renamed from a
/// temporary) only once complete and synced, and a failed save leaves nothing behind.
pub fn save(vm: &dyn VmContents, path: &Path) -> Result<SnapshotStats, SnapshotError> {
    // The snapshot names file pieces by the recorded hash: refuse a file changed since.
    vm.check_files().map_err(SnapshotError::Save)?;
    let description = vm.describe();
    // Checked as a load checks it, before the caller stops the VM for a snapshot that
    // could never be restored.
    validate_offer(&description, 1).map_err(SnapshotError::Unloadable)?;
    let state = vm.save_state().map_err(SnapshotError::Save)?;
    let mut buffers = vm.device_buffers();
    buffers.sort_unstable_by_key(|b| b.id);
    let (tmp, file) = create_temporary(path).map_err(|source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    })?;
    let write = || -> Result<SnapshotStats, MigrationError> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&MAGIC)
            .and_then(|()| out.write_all(&FORMAT_VERSION.to_le_bytes()))
            .and_then(|()| out.write_all(&SNAPSHOT_PROTOCOL.to_le_bytes()))
            .map_err(MigrationError::io("writing the header"))?;
        let mut writer = FrameWriter::new(out, false);
        writer.send(&Message::Offer {
            vm: description.clone(),
            streams: 1,
            transfer: Transfer::StopAndCopy,
            // The files are attached again at load, by their paths and checked by hash.
            files: FileTransfer::Require,
            device: DeviceTransfer::Precopy,
        })?;
        writer.send(&Message::BeginRound {
            round: 0,
            buffers: Some(buffers.clone()),
        })?;
        let before = writer.frames;
        let work = RoundWork::first(vm, description.ram_size / PAGE_SIZE, Vec::new());
        let files_attached = vec![true; description.files.len()];
        let cancel = CancelToken::default();
        let queue = WorkQueue::new(&work, &buffers, &cancel, &files_attached, None);
        let counts = send_share(vm, &mut writer, &mut StreamBuffers::default(), &queue)?;
        writer.send(&Message::EndRound {
            round: 0,
            frames: vec![writer.frames - before],
        })?;
        writer.send(&Message::State {
            blob: state,
            device: None,
        })?;
        let bytes = HEADER_LEN as u64 + writer.bytes;
        let file = writer
            .into_inner()
            .into_inner()
            .map_err(|e| MigrationError::io("writing the snapshot")(e.into_error()))?;
        file.sync_all()
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(MigrationError::io("finishing the snapshot"))?;
        // The rename is durable only once the folder is synced: a snapshot said to be
        // saved must still be there after a power loss. One that may not be is removed:
        // told the save failed, the caller runs the VM on, which a snapshot left behind
        // would fork (restored, it would run twice).
        if let Err(e) = sync_folder_of(path) {
            let _ = std::fs::remove_file(path);
            return Err(MigrationError::io("syncing the snapshot's folder")(e));
        }
        Ok(SnapshotStats {
            ram_bytes: description.ram_size,
            pages_stored: counts.pages,
            chunks_stored: counts.chunks,
            file_chunks: counts.file_chunks,
            file_bytes: bytes,
        })
    };
    write().map_err(|e| {
        // A snapshot that could not be written whole leaves nothing behind (a full disk
        // gets its space back).
        let _ = std::fs::remove_file(&tmp);
        file_error(path, e)
    })
}

/// A snapshot being loaded: the VM's description first, for the caller to make a target
/// of that shape, then the contents and the state into it.
pub struct SnapshotReader {
    path: PathBuf,
    frames: FrameReader<BufReader<File>>,
    vm: VmDescription,
}

impl SnapshotReader {
    /// Opens `path` and checks its header and the VM's description.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let io_error = |source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        };
        // Without blocking (a FIFO would wait for a writer for ever), and only a regular
        // file, checked on the file opened.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io_error)?;
        if !file.metadata().map_err(io_error)?.is_file() {
            return Err(io_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN];
        input
            .read_exact(&mut header)
            .map_err(|e| file_error(path, MigrationError::io("reading the header")(e)))?;
        if header[..8] != MAGIC {
            return Err(SnapshotError::BadMagic {
                path: path.to_owned(),
            });
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        let protocol = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        if protocol != SNAPSHOT_PROTOCOL {
            return Err(SnapshotError::UnsupportedProtocol {
                path: path.to_owned(),
                found: protocol,
            });
        }
        let mut frames = FrameReader::new(input, HEADER_LEN as u64);
        let corrupt = |e| file_error(path, e);
        let vm = match frames
            .expect_control("the VM's description")
            .map_err(corrupt)?
        {
            Message::Offer { vm, .. } => vm,
            other => {
                return Err(corrupt(MigrationError::unexpected(
                    "the VM's description",
                    &other,
                )))
            }
        };
        validate_offer(&vm, 1).map_err(|why| corrupt(MigrationError::InvalidOffer(why)))?;
        Ok(Self {
            path: path.to_owned(),
            frames,
            vm,
        })
    }

    /// The VM saved: its shape, versions and attached files.
    pub fn vm(&self) -> &VmDescription {
        &self.vm
    }

    /// Loads the contents into `target` (an empty VM shaped as [`Self::vm`] says),
    /// checks that the state ends the file, and only then restores the target from it,
    /// still paused.
    pub fn load_into<T: MigrationTarget + ?Sized>(
        mut self,
        target: &T,
    ) -> Result<SnapshotStats, SnapshotError> {
        let path = std::mem::take(&mut self.path);
        let failed = |e| file_error(&path, e);
        let (stats, state) = self.contents_into(target).map_err(failed)?;
        let mut extra = [0u8; 1];
        let after = self
            .frames
            .get_mut()
            .read(&mut extra)
            .map_err(|e| failed(MigrationError::io("reading past the state")(e)))?;
        if after != 0 {
            return Err(failed(MigrationError::BrokenSequence(
                "data after the VM's state".into(),
            )));
        }
        target
            .restore(&state)
            .map_err(|source| SnapshotError::Load { path, source })?;
        Ok(stats)
    }

    /// Applies round 0 to `target` and returns its counts and the saved state.
    fn contents_into<T: MigrationTarget + ?Sized>(
        &mut self,
        target: &T,
    ) -> Result<(SnapshotStats, Vec<u8>), MigrationError> {
        match self.frames.expect_control("round 0")? {
            Message::BeginRound {
                round: 0,
                buffers: Some(buffers),
            } => sync_buffers(target, &buffers)?,
            other => return Err(MigrationError::unexpected("round 0", &other)),
        }
        let mut stats = SnapshotStats {
            ram_bytes: self.vm.ram_size,
            ..SnapshotStats::default()
        };
        let mut frames = 0;
        let sent = loop {
            let frame = self.frames.read()?;
            match &frame {
                Frame::Control(Message::EndRound { round: 0, frames }) => break frames.clone(),
                Frame::Ram { pages, .. } => stats.pages_stored += pages,
                Frame::Chunk { .. } => stats.chunks_stored += 1,
                Frame::FileChunk { .. } => stats.file_chunks += 1,
                _ => {}
            }
            apply_data(target, frame, &self.vm, None)?;
            frames += 1;
        };
        if sent != [frames] {
            return Err(MigrationError::BrokenSequence(format!(
                "round 0 says {sent:?} frames; {frames} came"
            )));
        }
        let state = match self.frames.expect_control("the VM's state")? {
            Message::State { blob, device: None } => blob,
            other => return Err(MigrationError::unexpected("the VM's state", &other)),
        };
        stats.file_bytes = self.frames.bytes_read;
        Ok((stats, state))
    }
}
