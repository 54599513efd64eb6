//! What the engine needs from a VM on each side, as traits (the host adapts its microVM).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cpu::CpuidWord;
use crate::replay::{CaptureLimits, CaptureReport, DeviceDigest, DigestAhead, LoggedCommand};

/// Guest page size the engine copies in.
pub const PAGE_SIZE: u64 = 4096;
/// Largest device chunk (the accelerator's dirty-tracking granule).
pub const MAX_CHUNK_BYTES: u64 = 256 << 10;
/// Largest piece of an attached file in one frame.
pub const MAX_FILE_PIECE: u64 = 1 << 20;

/// A cause from the VM's side (a KVM ioctl's errno, a file's I/O error, ...), kept whole
/// so that its chain reaches the operator.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a VM, on either side, failed to do for the engine, with the cause beneath.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM ended or was released before the engine could use it.
    #[error("the VM is gone ({0})")]
    Gone(String),
    /// Dirty tracking could not start.
    #[error("cannot start dirty tracking")]
    StartTracking(#[source] Cause),
    /// The dirty-page log could not be read.
    #[error("cannot read the dirty-page log")]
    DirtyLog(#[source] Cause),
    /// Guest RAM could not be read.
    #[error("cannot read guest RAM at {gpa:#x}")]
    ReadRam {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: Cause,
    },
    /// An attached file could not be read.
    #[error("cannot read attached file {file} at offset {offset}")]
    ReadFile {
        /// Its index in the offer.
        file: u32,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The VM could not be paused.
    #[error("cannot pause the VM")]
    Pause(#[source] Cause),
    /// The VM could not run again.
    #[error("cannot resume the VM")]
    Resume(#[source] Cause),
    /// The paused VM's state could not be saved.
    #[error("cannot save the VM's state")]
    SaveState(#[source] Cause),
    /// An attached file is not the content recorded (changed in place), or could not be
    /// checked.
    #[error("the attached files are not as recorded")]
    CheckFiles(#[source] Cause),
    /// This host cannot run the VM offered (ABI, backend, kernels).
    #[error("{0}")]
    Incompatible(String),
    /// This host has no room for the VM offered.
    #[error("no room for the VM")]
    NoRoom(#[source] Cause),
    /// The empty VM to receive into could not be created.
    #[error("cannot create the VM to receive into")]
    Create(#[source] Cause),
    /// Guest RAM could not be written.
    #[error("cannot write guest RAM at {gpa:#x}")]
    WriteRam {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The device buffer table could not be made equal to the source's.
    #[error("cannot set up the device buffers")]
    SyncBuffers(#[source] Cause),
    /// A device chunk could not be written.
    #[error("cannot write device {chunk}")]
    WriteChunk {
        /// Which.
        chunk: ChunkKey,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The attached files offered could not be made room for.
    #[error("cannot receive the attached files")]
    ReceiveFiles(#[source] Cause),
    /// An attached file being received could not be written.
    #[error("cannot write attached file {file} at offset {offset}")]
    WriteFile {
        /// Its index in the offer.
        file: u32,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The attached files received are not the ones offered, or could not be kept.
    #[error("cannot keep the attached files received")]
    FilesReceived(#[source] Cause),
    /// The final state could not be restored.
    #[error("cannot restore the VM's state")]
    Restore(#[source] Cause),
    /// The device's command capture failed or overflowed its bounds (replay gives way
    /// to pre-copy).
    #[error("the device's command capture failed")]
    Capture(#[source] Cause),
    /// The device commands sent could not be replayed here.
    #[error("cannot replay the device's commands")]
    Replay(#[source] Cause),
}

/// The error of a replay method a VM does not implement.
fn no_replay(what: &str) -> Cause {
    format!("this VM cannot {what} (no accelerator, or no command replay)").into()
}

/// `err` and every cause beneath it, joined by ": " (how an error reaches an operator or
/// a peer as text).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// A read-only file attached to the VM, as offered: the destination must run the VM
/// with exactly this content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// Name the guest finds it by.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Its path on the source (the destination looks there for a copy).
    pub path: String,
}

/// Whether `sha` is a SHA-256 in lowercase hex, as [`FileOffer::sha256`] must be (a
/// destination makes it part of a file name).
pub fn valid_sha256(sha: &str) -> bool {
    sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What to do with attached files the destination already has (same content hash).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileTransfer {
    /// Use the destination's copy; send only the files it lacks.
    #[default]
    Reuse,
    /// Send every file, even those the destination has (to measure, or to refresh).
    Send,
    /// Send none: the destination must have them all, or it refuses the migration.
    Require,
}

/// What both sides must agree on before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Name shown by the hosts (the workload).
    pub name: String,
    /// Guest RAM bytes.
    pub ram_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Accelerator memory bytes (0: none).
    pub accel_memory: u64,
    /// Guest ABI version.
    pub abi_version: u32,
    /// Version of the encoding of the VM's state (sent last, at switchover): a mismatch is
    /// refused here, before pre-copy, not found undecodable in the pause.
    pub state_version: u32,
    /// Accelerator backend kind ("cpu", ...), empty without an accelerator.
    pub backend_kind: String,
    /// Kernel library version of that backend.
    pub kernel_version: u32,
    /// Matmul microkernel (results are bit-identical only between equal ones).
    pub microkernel: String,
    /// Anything else the destination needs to start it (e.g. the guest arguments).
    #[serde(
        deserialize_with = "crate::wire::at_most::<_, _, { crate::receive::MAX_EXTRA_ENTRIES }>"
    )]
    pub extra: Vec<(String, String)>,
    /// The attached files, in the guest's order.
    #[serde(deserialize_with = "crate::wire::at_most::<_, _, { ferry_abi::file::MAX_FILES }>")]
    pub files: Vec<FileOffer>,
    /// The CPU features the VM's guest has seen: those of every CPU it ran on (a host:
    /// its own CPU's).
    #[serde(deserialize_with = "crate::wire::at_most::<_, _, { crate::cpu::MAX_CPUID_WORDS }>")]
    pub cpu_features: Vec<CpuidWord>,
}

impl VmDescription {
    /// Why `self` (the VM offered) cannot run where `local` describes the host's
    /// capabilities (only backend, kernel version, microkernel, ABI and CPU features are
    /// compared).
    pub fn incompatibility(&self, local: &VmDescription) -> Option<String> {
        if self.abi_version != local.abi_version {
            return Some(format!(
                "guest ABI version {} (this host runs {})",
                self.abi_version, local.abi_version
            ));
        }
        if self.state_version != local.state_version {
            return Some(format!(
                "VM state format v{} (this host reads v{})",
                self.state_version, local.state_version
            ));
        }
        if let Some(why) = crate::cpu::refusal(&self.cpu_features, &local.cpu_features) {
            return Some(why);
        }
        if self.accel_memory == 0 {
            return None;
        }
        if self.backend_kind != local.backend_kind {
            return Some(format!(
                "accelerator backend '{}' (this host runs '{}')",
                self.backend_kind, local.backend_kind
            ));
        }
        if self.kernel_version != local.kernel_version {
            return Some(format!(
                "kernel library v{} (this host runs v{}): results would not be bit-identical",
                self.kernel_version, local.kernel_version
            ));
        }
        if self.microkernel != local.microkernel {
            // A snapshot written before ferry recorded it names none.
            let theirs = match self.microkernel.as_str() {
                "" => "unrecorded",
                named => named,
            };
            return Some(format!(
                "matmul microkernel {theirs} (this host uses {}): results would not be bit-identical",
                local.microkernel
            ));
        }
        None
    }
}

/// One device-memory chunk: `index` of buffer `buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkKey {
    /// Buffer id.
    pub buffer: u32,
    /// Chunk index within the buffer.
    pub index: u64,
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chunk {} of buffer {}", self.index, self.buffer)
    }
}

/// A dirty device chunk and the bytes of it written since the last take: `bytes`
/// `(start, end)` within the chunk, or `None` for all of it. A decode step appends a row
/// to each KV cache; the part is that row, not its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkPart {
    /// The chunk.
    pub key: ChunkKey,
    /// The bytes written, if not all of the chunk.
    pub bytes: Option<(u32, u32)>,
}

impl ChunkPart {
    /// All of chunk `key`.
    pub fn whole(key: ChunkKey) -> Self {
        Self { key, bytes: None }
    }

    /// Parts of the same chunks made one each (sorted by chunk): the span of both, or
    /// the whole chunk if either is whole.
    pub fn merge(parts: &mut Vec<ChunkPart>) {
        parts.sort_unstable();
        parts.dedup_by(|later, kept| {
            if later.key != kept.key {
                return false;
            }
            kept.bytes = match (kept.bytes, later.bytes) {
                (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                _ => None,
            };
            true
        });
    }
}

/// One device buffer as the destination must allocate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBuffer {
    /// Buffer id.
    pub id: u32,
    /// Size in bytes.
    pub bytes: u64,
}

/// A set of guest pages as a bitmap (bit `i` = page `i`): the dirty log's pages, the
/// pages a round sends, the pages a RAM has backed. One type for all of them, from the
/// vmm's dirty log to the engine's rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// The set whose bit `i` of `words` is page `i`, for `pages` pages.
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1 << (pages % 64)) - 1;
            }
        }
        Self { words, pages }
    }

    /// No page of `pages`.
    pub fn empty(pages: u64) -> Self {
        Self::from_words(Vec::new(), pages)
    }

    /// Every page.
    pub fn all(pages: u64) -> Self {
        Self::from_words(vec![u64::MAX; pages.div_ceil(64) as usize], pages)
    }

    /// How many pages the set ranges over (members or not).
    pub fn span(&self) -> u64 {
        self.pages
    }

    /// Adds page `page` (ignored past the end).
    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Adds the pages in `range` (those past the end are ignored).
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) {
        let end = range.end.min(self.pages);
        let mut page = range.start;
        while page < end {
            let (word, bit) = ((page / 64) as usize, page % 64);
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word] |= mask;
            page += n;
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds every page of `other` (same size).
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Whether the page holding guest address `addr` is in the set.
    pub fn contains_addr(&self, addr: u64) -> bool {
        self.contains(addr / PAGE_SIZE)
    }

    /// The bitmap: bit `i % 64` of word `i / 64` is page `i`.
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The pages in the set, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    /// Runs `(first page, pages)` of consecutive pages, each at most `max` long.
    pub fn runs(&self, max: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in self.pages() {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == page && *n < max => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }
}

/// Where a device chunk's content came from: the chunk's length of bytes of attached
/// file `file` from `offset` on, loaded and not written since. A destination that has the
/// file (the same content, checked at the handshake) reads the chunk there instead of
/// receiving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOrigin {
    /// Index of the file in the offer (and the VM's file table).
    pub file: u32,
    /// First byte of the piece in the file.
    pub offset: u64,
}

/// What [`MigrationTarget::write_chunk`] writes into a device chunk.
#[derive(Debug, Clone, Copy)]
pub enum ChunkWrite<'a> {
    /// The whole chunk (zero chunks arrive as zeros).
    Whole(&'a [u8]),
    /// `data` at `offset` in the chunk; the rest of the chunk is as sent before (the
    /// engine checked that the part ends within the chunk).
    Part {
        /// First byte of the part in the chunk.
        offset: u64,
        /// The part's bytes.
        data: &'a [u8],
    },
    /// The whole chunk, `data`, which is the piece of attached file `origin` (received
    /// here with the VM, and read back by the engine to check the source's word): a
    /// destination may keep the origin, so the VM's next migration can send where
    /// instead of what.
    FilePiece {
        /// The chunk's bytes.
        data: &'a [u8],
        /// The piece of the file they are.
        origin: ChunkOrigin,
    },
    /// The whole chunk (`len` bytes), read from this host's copy of the attached file
    /// `origin` names.
    LocalFile {
        /// Bytes of the chunk.
        len: u64,
        /// The piece of the file to read.
        origin: ChunkOrigin,
    },
}

impl<'a> ChunkWrite<'a> {
    /// The bytes of the whole chunk `chunk`, for a destination that keeps no origins and
    /// reads no files: the data of [`Self::Whole`] and [`Self::FilePiece`]; the other
    /// writes are refused.
    pub fn whole(self, chunk: ChunkKey) -> Result<&'a [u8], VmError> {
        let refuse = |why: &str| VmError::WriteChunk {
            chunk,
            source: why.into(),
        };
        match self {
            Self::Whole(data) | Self::FilePiece { data, .. } => Ok(data),
            Self::Part { .. } => Err(refuse(
                "this destination cannot write parts of device chunks",
            )),
            Self::LocalFile { .. } => Err(refuse(
                "this destination cannot read device chunks from files",
            )),
        }
    }
}

/// A device chunk that holds a piece of an attached file, as the source sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChunk {
    /// The piece.
    pub origin: ChunkOrigin,
    /// Bytes of the chunk.
    pub len: u64,
    /// Size of the chunk's buffer now (a chunk of a buffer remade with another size
    /// since the round's buffer table is not sent this round).
    pub buffer_bytes: u64,
}

/// What a VM holds, as the engine reads it to send it or to save it: its shape, RAM,
/// device memory, attached files and (paused) state. Methods take `&self`: the engine
/// reads from several threads, while the VM runs.
pub trait VmContents: Sync {
    /// Shape and compatibility facts.
    fn describe(&self) -> VmDescription;
    /// Refuses attached files whose content is no longer the one [`Self::describe`]
    /// offers (changed in place since they were attached); the default: none to check.
    fn check_files(&self) -> Result<(), VmError> {
        Ok(())
    }
    /// The device buffer table now.
    fn device_buffers(&self) -> Vec<DeviceBuffer>;
    /// RAM pages that may hold data now; the others are known to read as zero, and the
    /// first round skips them without reading. `None`: not known, read every page.
    fn populated_pages(&self) -> Option<PageSet> {
        None
    }
    /// Device chunks that may hold data now (at most every chunk of every buffer); the
    /// others are known to read as zero, and the first round skips them without reading.
    fn populated_chunks(&self) -> Vec<ChunkKey>;
    /// Reads guest RAM at `gpa` into `out`.
    fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError>;
    /// Reads bytes of attached file `file` (its index in [`VmDescription::files`]).
    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let _ = out;
        Err(VmError::ReadFile {
            file,
            offset,
            source: "this VM has no attached files".into(),
        })
    }
    /// Copies chunk `chunk`'s bytes into `out` (resized to them) and returns the size of
    /// its buffer now; `None` if the chunk no longer exists (its buffer freed since). A
    /// copy, so that no device buffer stays locked while a slow destination takes the
    /// bytes.
    fn read_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Option<u64>;
    /// Chunk `chunk` as the piece of an attached file it holds (a model's weights), if
    /// it holds one; `None` (the default) sends its bytes.
    fn file_chunk(&self, _chunk: ChunkKey) -> Option<FileChunk> {
        None
    }
    /// Copies base chunk `chunk` into `out` as it was at the boundary of the capture
    /// [`MigrationSource::start_capture`] started (zeros for a chunk not written then);
    /// `false` if it is not in the base or was read already.
    fn read_base_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Result<bool, VmError> {
        let _ = (chunk, out);
        Err(VmError::Capture(no_replay("read a device base")))
    }
    /// The paused VM's complete state less RAM and chunk contents.
    fn save_state(&self) -> Result<Vec<u8>, VmError>;
}

/// The VM being sent: its contents, and what the engine does to it while it runs
/// (dirty tracking, throttling, the pause, the device's command capture).
pub trait MigrationSource: VmContents {
    /// Starts dirty tracking of device memory.
    fn start_device_tracking(&self) -> Result<(), VmError>;
    /// Starts dirty tracking of RAM: [`Self::take_dirty_pages`] works from here on.
    fn start_ram_tracking(&self) -> Result<(), VmError>;
    /// Stops dirty tracking of both.
    fn stop_tracking(&self);
    /// RAM pages written since the last call (or since tracking started), cleared.
    fn take_dirty_pages(&self) -> Result<PageSet, VmError>;
    /// Device chunks written since the last call, cleared.
    fn take_dirty_chunks(&self) -> Vec<ChunkKey>;
    /// Device chunks written since the last call, with the bytes of each written,
    /// cleared (the default: whole chunks).
    fn take_dirty_parts(&self) -> Vec<ChunkPart> {
        self.take_dirty_chunks()
            .into_iter()
            .map(ChunkPart::whole)
            .collect()
    }
    /// Slows the VM down to let pre-copy converge: the vCPU and device run only
    /// `100 - percent` % of the time (0 = full speed).
    fn set_throttle(&self, percent: u8);
    /// Pauses the device at a command boundary, then the vCPUs; returns when the VM
    /// stopped making progress (the pause's start, from which downtime is measured: once
    /// the device's command in flight ended, or earlier, by a throttle).
    fn pause(&self) -> Result<Instant, VmError>;
    /// Runs the VM again (a migration that failed before the switchover completed).
    fn resume(&self) -> Result<(), VmError>;
    /// Starts capturing the device for replay (see [`crate::replay`]) at its next
    /// command boundary, and returns the base's buffer table and the chunks to read with
    /// [`VmContents::read_base_chunk`]; every command from then on is logged. The base is, with
    /// `since` `None`, every chunk that may hold data; with `Some(pending)`, the chunks
    /// `pending` and those dirtied since the last take (taken at the boundary), of the
    /// base's buffers: a destination that has the rest from pre-copy.
    fn start_capture(
        &self,
        limits: CaptureLimits,
        since: Option<&[ChunkKey]>,
    ) -> Result<(Vec<DeviceBuffer>, Vec<ChunkKey>), VmError> {
        let _ = (limits, since);
        Err(VmError::Capture(no_replay("capture its device")))
    }
    /// The commands logged since the last take, in order.
    fn take_commands(&self) -> Result<Vec<LoggedCommand>, VmError> {
        Err(VmError::Capture(no_replay("log device commands")))
    }
    /// Ends the capture and says what it cost (`None`: none ran).
    fn stop_capture(&self) -> Option<CaptureReport> {
        None
    }
    /// A digest of device memory; the VM is paused.
    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        Err(VmError::Capture(no_replay("digest its device memory")))
    }
    /// About how long [`Self::device_digest`] would take now: it runs in the
    /// switchover's pause, so the pause's prediction counts it.
    fn device_digest_estimate(&self) -> Duration {
        Duration::ZERO
    }
    /// Starts hashing, while the VM runs, what [`Self::device_digest`] would hash now,
    /// until the handle is dropped: the pause's digest then hashes only what is written
    /// after. `None`: nothing to hash ahead.
    fn digest_ahead(&self) -> Option<DigestAhead> {
        None
    }
}

/// The VM being received, created paused by a [`crate::TargetFactory`]. Each call is
/// already validated against the VM's shape by the engine; implementations check again
/// what only they can (e.g. a chunk against the buffer table). Dropping a target stops
/// its VM for good, even one resumed (or part way through [`Self::resume`]): the engine
/// drops one the host does not adopt (a failed migration, a panic) before it tells a
/// source that asks that the VM does not run here.
pub trait MigrationTarget: Send + Sync {
    /// Writes guest RAM.
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError>;
    /// Makes the device buffer table equal to `table` (new buffers start zeroed).
    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError>;
    /// Writes device chunk `chunk` as `write` says (a destination that writes whole
    /// chunks only takes their bytes with [`ChunkWrite::whole`]).
    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError>;
    /// Whether this host has offered file `file` already, with the same content.
    fn has_file(&self, file: u32) -> bool {
        let _ = file;
        false
    }
    /// Gets ready to receive the offered files `files` (checks there is room for them).
    fn receive_files(&self, files: &[u32]) -> Result<(), VmError> {
        if files.is_empty() {
            Ok(())
        } else {
            Err(VmError::ReceiveFiles(
                "this host cannot receive attached files".into(),
            ))
        }
    }
    /// Writes bytes of a file being received (the engine checked the range).
    fn write_file(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), VmError> {
        let _ = data;
        Err(VmError::WriteFile {
            file,
            offset,
            source: "the file was not expected".into(),
        })
    }
    /// Every byte of the files being received arrived: checks their content.
    fn files_received(&self) -> Result<(), VmError> {
        Ok(())
    }
    /// Reads bytes of this host's copy of attached file `file` (one it had, or one
    /// received, once [`Self::files_received`] checked it), to check the origins a source
    /// sends with device chunks' bytes. The default: none can be read, and such chunks
    /// keep their bytes without their origin (the VM's next migration sends the bytes).
    fn read_local_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let _ = out;
        Err(VmError::ReadFile {
            file,
            offset,
            source: "this host does not read its copies of attached files for the engine".into(),
        })
    }
    /// Builds the VM from the final state, still paused.
    fn restore(&self, state: &[u8]) -> Result<(), VmError>;
    /// Runs the restored VM.
    fn resume(&self) -> Result<(), VmError>;

    /// Whether this VM can replay the source's device commands.
    fn can_replay(&self) -> bool {
        false
    }
    /// Replays `commands` (the source's, in order) on the device memory received,
    /// giving up on those that would start after `deadline`.
    fn replay(&self, commands: Vec<LoggedCommand>, deadline: Instant) -> Result<(), VmError> {
        let _ = (commands, deadline);
        Err(VmError::Replay(no_replay("replay device commands")))
    }
    /// A digest of the device memory received (and replayed).
    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        Err(VmError::Replay(no_replay("digest its device memory")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_range_sets_exactly_its_pages_across_words() {
        let mut set = PageSet::empty(200);
        set.insert_range(60..130);
        set.insert_range(190..250);
        let pages: Vec<u64> = set.pages().collect();
        let want: Vec<u64> = (60..130).chain(190..200).collect();
        assert_eq!(pages, want);
        set.insert_range(5..5);
        assert_eq!(set.count(), want.len() as u64);
        set.clear();
        assert!(set.is_empty());
    }

    use super::*;

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        let mut words = vec![0u64; 2];
        words[0] = 0b1110_0111;
        words[1] = u64::MAX;
        let set = PageSet::from_words(words, 70);
        assert_eq!(set.count(), 6 + 6);
        assert_eq!(set.runs(4), vec![(0, 3), (5, 3), (64, 4), (68, 2)]);
        assert_eq!(PageSet::all(130).count(), 130);
        let mut set = PageSet::empty(256);
        assert!(set.is_empty());
        set.insert(3);
        set.insert(255);
        set.insert(256);
        assert_eq!(set.pages().collect::<Vec<_>>(), vec![3, 255]);
        assert!(set.contains_addr(3 * PAGE_SIZE + 17));
        assert!(!set.contains_addr(2 * PAGE_SIZE));
        assert!(!set.contains_addr(1 << 40));
    }

    #[test]
    fn incompatibility_names_the_difference() {
        let local = VmDescription {
            name: String::new(),
            ram_size: 0,
            vcpus: 1,
            accel_memory: 0,
            abi_version: 3,
            state_version: 1,
            backend_kind: "cpu".into(),
            kernel_version: 2,
            microkernel: "avx2+fma".into(),
            extra: Vec::new(),
            files: Vec::new(),
            cpu_features: crate::cpu::cpu_features(|_, _, _| 1 << 5),
        };
        let mut offered = VmDescription {
            accel_memory: 1 << 30,
            ..local.clone()
        };
        assert_eq!(offered.incompatibility(&local), None);
        // A guest of another contract (an accelerator ring of another layout among them).
        offered.abi_version = 4;
        assert_eq!(
            offered.incompatibility(&local).as_deref(),
            Some("guest ABI version 4 (this host runs 3)")
        );
        offered.abi_version = 3;
        offered.state_version = 2;
        assert!(offered
            .incompatibility(&local)
            .unwrap()
            .contains("state format v2"));
        offered.state_version = 1;
        offered.backend_kind = "cuda".into();
        assert!(offered.incompatibility(&local).unwrap().contains("'cuda'"));
        offered.backend_kind = "cpu".into();
        offered.microkernel = "sse2".into();
        assert!(offered.incompatibility(&local).unwrap().contains("sse2"));
        offered.microkernel = local.microkernel.clone();
        // Leaf 7 EBX bit 16 as well as bit 5: AVX-512 where the host has only AVX2.
        offered.cpu_features = crate::cpu::cpu_features(|_, _, _| 1 << 5 | 1 << 16);
        let why = offered.incompatibility(&local).unwrap();
        assert!(why.contains("avx512f"), "{why}");
        assert!(!why.contains("avx2"), "{why}");
    }
}
