//! What replaying the device's commands on another host needs of this device: a
//! consistent base and the log of what ran after it.
//!
//! The base is device memory as of one command boundary, read while the device runs on:
//! before a command writes a chunk of the base that has not been read yet, the chunk is
//! preserved (copied into a bounded side pool), so every base chunk reads as it was at
//! the boundary. Every command executed after the boundary is logged with the guest-RAM
//! bytes it read (an upload's data). A destination that restores the base and replays
//! the log on a backend of the same kind and kernel version has the same device memory:
//! the kernels are deterministic. [`DeviceDigest`] checks that it does.
//!
//! Replay leaves guest RAM alone: downloads and fences write guest RAM, which the
//! migration copies as RAM. A failed upload, file load, alloc or free changed nothing and
//! is skipped; a kernel runs again even if it failed (it may have written part), and must
//! fail again. A command the host failed (`DEVICE_ERROR`: memory ran out, a file could
//! not be read, the GPU failed) is not logged: it fails the capture, since the
//! destination would not fail it alike.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_abi::accel::{op, status, Command};

use crate::dirty::ChunkId;

pub use ferry_migrate::replay::{CaptureLimits, CaptureReport, DeviceDigest, LoggedCommand};

/// `entry` as the ring held it.
pub fn command_of(entry: &LoggedCommand) -> Command {
    let mut command = Command {
        opcode: entry.opcode,
        ..Command::default()
    };
    for (slot, &arg) in command.args.iter_mut().zip(&entry.args) {
        *slot = arg;
    }
    command
}

/// Whether replaying `entry` touches device memory (downloads and fences write guest RAM
/// only; a failed upload, file load, alloc or free changed nothing, whatever the status:
/// the buffer table and contents they leave are checked by the digest).
pub fn replays(entry: &LoggedCommand) -> bool {
    match entry.opcode {
        op::DOWNLOAD | op::FENCE => false,
        op::UPLOAD | op::LOAD_FILE | op::ALLOC | op::FREE => entry.status == status::OK,
        _ => true,
    }
}

/// A device's memory left partly written by a replayed command cut short at its
/// deadline ([`ReplayError::DeadlinePassed`]), or failed here midway where the source's
/// completed ([`ReplayError::FailedMidway`]): it is no state the source ever had, so
/// the device replays, digests and runs nothing more, and is only fit to be discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device memory was left partly written by replayed command {index} (opcode {opcode}), cut short or failed midway")]
pub struct TornMemory {
    /// The command's place in its log.
    pub index: usize,
    /// Its opcode.
    pub opcode: u32,
}

/// Why a capture can no longer give a consistent base and log; the migration falls back
/// to pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// No capture runs.
    #[error("no command capture is running")]
    NotCapturing,
    /// The side pool would have exceeded its bound.
    #[error("the side pool of preserved chunks would exceed {limit} bytes")]
    PoolFull {
        /// The bound.
        limit: u64,
    },
    /// A command failed on the host, not for its arguments (`DEVICE_ERROR`: memory ran
    /// out, a file could not be read, the GPU failed), perhaps after writing part: the
    /// destination would not fail it alike.
    #[error("command (opcode {opcode}) failed on this host's device, which replay cannot repeat")]
    Unreplayable {
        /// Its opcode.
        opcode: u32,
    },
    /// The device thread died (see `Accelerator::is_dead`): device memory may hold part
    /// of a command that is in no log.
    #[error("the accelerator's device thread is gone")]
    DeviceGone,
    /// The device's memory is torn by a replay cut short: no base can be read from it.
    #[error("no capture of a device whose memory a replay left torn")]
    Torn(#[source] TornMemory),
    /// The log would have exceeded its bound (it is not taken fast enough).
    #[error("the command log would exceed {limit} bytes before being taken")]
    LogFull {
        /// The bound.
        limit: u64,
    },
    /// A base chunk that was never written since the boundary could not be read from
    /// the backend.
    #[error("base chunk {index} of buffer {buffer} could not be read from the device")]
    BaseUnreadable {
        /// Its buffer.
        buffer: u32,
        /// Its index in the buffer.
        index: u64,
    },
}

/// A running capture: the base chunks not yet read, the preserved ones, and the log.
#[derive(Debug)]
pub(crate) struct Capture {
    /// Tells this capture from one started after it (a base read made without the
    /// capture lock must land in the capture it began in).
    generation: u64,
    limits: CaptureLimits,
    /// Base chunks not read yet.
    unread: BTreeSet<ChunkId>,
    /// Base chunks not written at the boundary (they read as zeros), with their lengths.
    zeros: BTreeMap<ChunkId, u64>,
    /// Preserved base chunks, as they were at the boundary.
    pool: BTreeMap<ChunkId, Vec<u8>>,
    pool_bytes: u64,
    log: Vec<LoggedCommand>,
    log_bytes: u64,
    failed: Option<CaptureError>,
    report: CaptureReport,
}

impl Capture {
    /// A capture of a base made of `chunks` and of `zeros`, chunks not written at the
    /// boundary (each with its length).
    pub(crate) fn new(
        limits: CaptureLimits,
        chunks: impl IntoIterator<Item = ChunkId>,
        zeros: impl IntoIterator<Item = (ChunkId, u64)>,
    ) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(0);
        Self {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            limits,
            unread: chunks.into_iter().collect(),
            zeros: zeros.into_iter().collect(),
            pool: BTreeMap::new(),
            pool_bytes: 0,
            log: Vec::new(),
            log_bytes: 0,
            failed: None,
            report: CaptureReport::default(),
        }
    }

    /// Whether `chunk` must be preserved before it is written.
    pub(crate) fn needs_preserving(&self, chunk: &ChunkId) -> bool {
        self.failed.is_none() && self.unread.contains(chunk) && !self.pool.contains_key(chunk)
    }

    /// Whether the pool has room for `bytes` more; if not, the capture fails as full.
    pub(crate) fn makes_room_for(&mut self, bytes: u64) -> bool {
        if self.pool_bytes.saturating_add(bytes) > self.limits.pool_bytes {
            self.fail(CaptureError::PoolFull {
                limit: self.limits.pool_bytes,
            });
            return false;
        }
        true
    }

    /// Keeps `data`, chunk `chunk` as it is before its first write.
    pub(crate) fn preserve(&mut self, chunk: ChunkId, data: Vec<u8>) {
        let len = data.len() as u64;
        if self.pool_bytes + len > self.limits.pool_bytes {
            self.fail(CaptureError::PoolFull {
                limit: self.limits.pool_bytes,
            });
            return;
        }
        self.pool_bytes += len;
        self.report.pool_peak_bytes = self.report.pool_peak_bytes.max(self.pool_bytes);
        self.report.chunks_preserved += 1;
        self.pool.insert(chunk, data);
    }

    /// Appends a command executed after the boundary.
    pub(crate) fn log(&mut self, entry: LoggedCommand) {
        if self.failed.is_some() {
            return;
        }
        let weight = entry.weight();
        if self.log_bytes + weight > self.limits.log_bytes {
            self.fail(CaptureError::LogFull {
                limit: self.limits.log_bytes,
            });
            return;
        }
        self.log_bytes += weight;
        self.report.commands_logged += 1;
        self.report.log_bytes += weight;
        self.log.push(entry);
    }

    /// Whether the log can take `payload` more bytes (an upload's data, to be read for
    /// it): false once the capture failed, and failing it (the log full) if they would
    /// not fit, so that no payload is copied only to be refused.
    pub(crate) fn makes_room(&mut self, payload: u64) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.log_bytes.saturating_add(payload) > self.limits.log_bytes {
            self.fail(CaptureError::LogFull {
                limit: self.limits.log_bytes,
            });
            return false;
        }
        true
    }

    /// Ends the capture as failed; the first failure stays its cause (a command failing
    /// after the pool overflowed is not why replay was given up).
    pub(crate) fn fail(&mut self, error: CaptureError) {
        self.failed.get_or_insert(error);
        // Nothing more is needed of a failed capture: free what it holds.
        self.pool.clear();
        self.pool_bytes = 0;
        self.log.clear();
        self.log_bytes = 0;
    }

    /// Base chunks that read as zeros and were not read yet: a failed capture never gives
    /// them, and what had them written last may be an earlier buffer of the same id.
    pub(crate) fn zeros_unread(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.zeros.keys().copied()
    }

    /// The failure, if the capture failed.
    pub(crate) fn failure(&self) -> Result<(), CaptureError> {
        self.failed.map_or(Ok(()), Err)
    }

    /// Which capture this is: no other capture of this process has the same.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Base chunk `chunk` if it is had without reading the device (zeros, or its
    /// preserved copy: read now, as [`Self::take_base_chunk`] reads them); `Ok(None)`
    /// with the chunk left unread if it is to be read live; `Err` as there.
    pub(crate) fn peek_base_chunk(&mut self, chunk: ChunkId) -> Result<Option<Vec<u8>>, ()> {
        if self.zeros.contains_key(&chunk) || self.pool.contains_key(&chunk) {
            return self.take_base_chunk(chunk);
        }
        if self.unread.contains(&chunk) {
            Ok(None)
        } else {
            Err(())
        }
    }

    /// Base chunk `chunk` is read now: its preserved copy if it has one (handed over),
    /// else `Ok(None)` with the chunk marked read (its live content is the base's: it was
    /// never written since the boundary). `Err` for a chunk not in the base or already
    /// read.
    pub(crate) fn take_base_chunk(&mut self, chunk: ChunkId) -> Result<Option<Vec<u8>>, ()> {
        if let Some(len) = self.zeros.remove(&chunk) {
            return Ok(Some(vec![0; len as usize]));
        }
        if !self.unread.remove(&chunk) {
            return Err(());
        }
        Ok(self.pool.remove(&chunk).inspect(|data| {
            self.pool_bytes -= data.len() as u64;
        }))
    }

    /// The base chunks not read yet, in order.
    pub(crate) fn unread(&self) -> Vec<ChunkId> {
        let mut chunks: Vec<ChunkId> = self
            .unread
            .iter()
            .chain(self.zeros.keys())
            .copied()
            .collect();
        chunks.sort_unstable();
        chunks
    }

    /// The log so far, emptied.
    pub(crate) fn take_log(&mut self) -> Vec<LoggedCommand> {
        self.log_bytes = 0;
        std::mem::take(&mut self.log)
    }

    /// What it cost.
    pub(crate) fn report(&self) -> CaptureReport {
        self.report
    }
}

/// Why a replay failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A command completed differently here than on the source.
    #[error("replayed command {index} (opcode {opcode}) completed with status {got}, the source's with {expected}")]
    Diverged {
        /// Its place in the log.
        index: usize,
        /// Its opcode.
        opcode: u32,
        /// The source's status.
        expected: u32,
        /// This device's.
        got: u32,
    },
    /// A command failed here after writing part of its outputs (a file load whose read
    /// failed midway), where the source's completed otherwise: this device's memory is
    /// no longer the source's ([`TornMemory`]).
    #[error("replayed command {index} (opcode {opcode}) failed here midway with status {got}, its outputs partly written; the source's completed with {expected}")]
    FailedMidway {
        /// Its place in the log.
        index: usize,
        /// Its opcode.
        opcode: u32,
        /// The source's status.
        expected: u32,
        /// This device's.
        got: u32,
    },
    /// The commands took longer than they may: replay stopped before command `index`.
    #[error("replay ran out of time before command {index} of {total}")]
    OutOfTime {
        /// The first command not replayed.
        index: usize,
        /// The commands given.
        total: usize,
    },
    /// The deadline passed while command `index` ran: it (a kernel, a copy) was cut
    /// short, its outputs partly written, so this device's memory is no longer the
    /// source's.
    #[error("replay ran out of time during command {index} (opcode {opcode}): it was cut short")]
    DeadlinePassed {
        /// Its place in the log.
        index: usize,
        /// Its opcode.
        opcode: u32,
    },
    /// An upload's logged data does not match its length.
    #[error("replayed upload {index} carries {got} bytes for {expected}")]
    BadPayload {
        /// Its place in the log.
        index: usize,
        /// The length its arguments give.
        expected: u64,
        /// The bytes it carries.
        got: u64,
    },
    /// The device thread is gone (it panicked, or the device was dropped or ended, which
    /// cuts a replayed command short): nothing can run on it.
    #[error("the accelerator's device thread is gone")]
    DeviceGone,
    /// An earlier replay was cut short on this device: its memory is not the source's,
    /// and replaying more on it would not make it so.
    #[error("no replay on a device whose memory an earlier replay left torn")]
    Torn(#[source] TornMemory),
}

/// Why a digest of device memory could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The device thread is gone: its memory may hold part of a command.
    #[error("the accelerator's device thread is gone")]
    DeviceGone,
    /// A replay was cut short on this device: a digest of its memory would be one of no
    /// state the source ever had.
    #[error("no digest of a device whose memory a replay left torn")]
    Torn(#[source] TornMemory),
    /// A buffer could not be read to hash it (a GPU copy failed).
    #[error("device buffer {buffer} could not be read to digest it")]
    Unreadable {
        /// The buffer.
        buffer: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(buffer: u32, index: u64) -> ChunkId {
        ChunkId { buffer, index }
    }

    #[test]
    fn a_preserved_chunk_is_read_once_and_the_pool_is_bounded() {
        let limits = CaptureLimits {
            pool_bytes: 8,
            log_bytes: 1 << 20,
        };
        let mut capture = Capture::new(limits, [chunk(1, 0), chunk(1, 1)], []);
        assert!(capture.needs_preserving(&chunk(1, 0)));
        assert!(!capture.needs_preserving(&chunk(2, 0)), "not in the base");
        capture.preserve(chunk(1, 0), vec![7; 8]);
        assert!(!capture.needs_preserving(&chunk(1, 0)), "preserved once");
        assert_eq!(capture.take_base_chunk(chunk(1, 0)), Ok(Some(vec![7; 8])));
        assert_eq!(capture.take_base_chunk(chunk(1, 0)), Err(()), "read once");
        assert_eq!(capture.take_base_chunk(chunk(1, 1)), Ok(None), "live");
        // The pool had room again after the read; now it overflows.
        let mut capture = Capture::new(limits, [chunk(1, 0), chunk(1, 1)], []);
        capture.preserve(chunk(1, 0), vec![0; 8]);
        capture.preserve(chunk(1, 1), vec![0; 8]);
        assert_eq!(capture.failure(), Err(CaptureError::PoolFull { limit: 8 }));
        assert!(!capture.needs_preserving(&chunk(1, 1)));
        // A command failing later is not why replay was given up.
        capture.fail(CaptureError::Unreplayable { opcode: 3 });
        assert_eq!(capture.failure(), Err(CaptureError::PoolFull { limit: 8 }));
    }

    #[test]
    fn the_log_is_bounded_until_taken() {
        let entry = LoggedCommand {
            opcode: op::UPLOAD,
            args: vec![1, 0, 0, 64],
            payload: vec![0; 64],
            status: status::OK,
        };
        // Room for two entries, not three.
        let room = 2 * entry.weight() + entry.weight() / 2;
        let limits = CaptureLimits {
            pool_bytes: 0,
            log_bytes: room,
        };
        let mut capture = Capture::new(limits, [], [(chunk(2, 0), 5)]);
        assert_eq!(
            capture.take_base_chunk(chunk(2, 0)),
            Ok(Some(vec![0; 5])),
            "unwritten"
        );
        capture.log(entry.clone());
        capture.log(entry.clone());
        assert_eq!(capture.take_log().len(), 2);
        capture.log(entry.clone());
        capture.log(entry.clone());
        capture.log(entry);
        assert_eq!(
            capture.failure(),
            Err(CaptureError::LogFull { limit: room })
        );
        assert_eq!(capture.report().commands_logged, 4);
    }

    #[test]
    fn an_upload_too_large_for_the_log_fails_it_before_its_data_is_read() {
        let limits = CaptureLimits {
            pool_bytes: 0,
            log_bytes: 1 << 10,
        };
        let mut capture = Capture::new(limits, [], []);
        assert!(capture.makes_room(512));
        assert!(!capture.makes_room(1 << 30), "a whole device's upload");
        assert_eq!(
            capture.failure(),
            Err(CaptureError::LogFull { limit: 1 << 10 })
        );
        assert!(!capture.makes_room(1), "nothing more once failed");
        assert!(!capture.makes_room(u64::MAX));
    }
}
