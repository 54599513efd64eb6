//! The accelerator device: a thread that executes the guest's command ring.
//!
//! The vCPU rings the doorbell and goes on; the device thread executes commands in order
//! and completes them in guest memory. Pausing stops the device at a command boundary
//! (the command in progress finishes), which is what makes its state consistent for a
//! snapshot or a migration: buffers, ring position, fence value, nothing half done.
//! Ending it ([`Accelerator::abort`], or dropping it) does not wait for the kernel in
//! flight where the backend can cut it short, nor for the rest of a copy (an UPLOAD,
//! DOWNLOAD or LOAD_FILE, cut between two pieces): the device of a VM being ended need
//! not finish minutes of work no one will read.
//!
//! Every command is validated before it touches anything (ids, ranges, shapes,
//! capacity, guest addresses); a bad one completes with an error status and the device
//! goes on with the next.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferry_abi::accel::{device_status, op, status, Command, MAX_BUFFERS};
use ferry_abi::file::MAX_READ;
use ferry_abi::IMAGE_BASE;
use ferry_migrate::wire::at_most;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::backend::{
    AbortSwitch, Backend, BackendError, BufferId, BufferReader, DeviceLoop, HostThreads,
};
use crate::dirty::{chunk_count, ChunkId, DirtyChunks, CHUNK_SIZE};
use crate::files::FileSource;
use crate::kernel::Kernel;
use crate::replay::{
    command_of, replays, Capture, CaptureError, CaptureLimits, CaptureReport, DeviceDigest,
    DigestError, LoggedCommand, ReplayError, TornMemory,
};
use crate::ring::{head_is_sane, GuestRam, Ring};

/// Largest piece copied between guest RAM (or a file, or a replayed upload's data) and a
/// buffer at once: bounds host memory use for a guest asking to move gigabytes in one
/// command, and how long such a copy runs before it checks whether it is to stop (about
/// a second for gigabytes).
const COPY_PIECE: u64 = 1 << 20;

/// Which way [`Core::transfer`] copies.
#[derive(Clone, Copy)]
enum Transfer {
    /// Guest memory into a buffer (UPLOAD).
    ToDevice,
    /// A buffer into guest memory (DOWNLOAD).
    ToGuest,
}

/// Why a LOAD_FILE that passed validation did not complete (its range partly written).
#[derive(Debug, thiserror::Error)]
enum LoadFailed {
    /// Reading the file failed.
    #[error("cannot read the attached file")]
    Read(#[source] std::io::Error),
    /// The switch cut it short between two pieces.
    #[error("the load was cut short")]
    Cut(#[source] BackendError),
}

/// Saved state of one buffer (its contents travel separately, chunk by chunk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferState {
    /// Guest-chosen id.
    pub id: BufferId,
    /// Size in bytes.
    pub bytes: u64,
}

/// Saved state of the device, less buffer contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelState {
    /// Backend kind that produced the buffers ("cpu", ...).
    pub backend_kind: String,
    /// Kernel library version: results are only bit-identical within one version.
    pub kernel_version: u32,
    /// Device memory capacity (the VM's profile).
    pub capacity: u64,
    /// Guest address of the ring header.
    pub ring_gpa: u64,
    /// Commands completed: the next one to execute is `tail`. Commands the guest had
    /// submitted but the device had not started stay in the ring (guest RAM) and run
    /// after restore.
    pub tail: u64,
    /// Allocated buffers.
    #[serde(deserialize_with = "at_most::<_, _, { MAX_BUFFERS as usize }>")]
    pub buffers: Vec<BufferState>,
}

/// Errors restoring a device or writing its chunks.
#[derive(Debug, thiserror::Error)]
pub enum AccelStateError {
    /// The saved state comes from another backend or kernel version.
    #[error("accelerator state is from backend {found} (kernel library v{found_version}); this host runs {ours} v{our_version}")]
    Incompatible {
        /// Saved backend kind.
        found: String,
        /// Saved kernel version.
        found_version: u32,
        /// Our backend kind.
        ours: &'static str,
        /// Our kernel version.
        our_version: u32,
    },
    /// A buffer in the state is invalid (id, size, total beyond capacity).
    #[error("accelerator state is corrupt: {0}")]
    Corrupt(String),
    /// The backend could not create a buffer.
    #[error("cannot recreate accelerator buffer {id}")]
    Alloc {
        /// The buffer.
        id: BufferId,
        /// What the backend said.
        #[source]
        source: BackendError,
    },
    /// A chunk does not belong to any buffer or has the wrong length.
    #[error("accelerator chunk {index} of buffer {buffer} does not fit the buffer table")]
    BadChunk {
        /// Buffer id.
        buffer: BufferId,
        /// Chunk index.
        index: u64,
    },
    /// An attached file could not be read into device memory.
    #[error("cannot read attached file {file} into device memory")]
    ReadFile {
        /// Index of the file in the VM's file table.
        file: u32,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
}

/// The buffer table and which chunks were written: what a migration reads while kernels
/// run. It has its own lock, held briefly, where the core lock is held for a whole
/// command (so a pre-copy round never waits for a kernel to see them).
struct BufferMap {
    sizes: BTreeMap<BufferId, u64>,
    /// Written since the last take, while a migration tracks them.
    dirty: DirtyChunks,
    /// Written since their buffer was created, by any path (commands, restore): the
    /// other chunks are still zero, and a migration's first round skips them unread.
    written: DirtyChunks,
    /// Chunks whose whole content is a piece of an attached file, as loaded and not
    /// written since: a migration to a host that has the file sends where, not what.
    origins: BTreeMap<ChunkId, ChunkOrigin>,
    /// The CRC-32 of each buffer not written since a digest computed it: a replay's
    /// destination digests after each round, so the switchover's digest hashes only what
    /// the last commands wrote.
    digests: BTreeMap<BufferId, u32>,
    /// Writes recorded ([`Core::mark`]) since the device began, wrapping: a replayed
    /// command that failed and changed it wrote part of its outputs.
    writes: u64,
}

/// Where a chunk's content came from: its `len` bytes are attached file `file`'s from
/// `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOrigin {
    /// Index of the file in the VM's file table.
    pub file: u32,
    /// First byte of the piece in the file.
    pub offset: u64,
    /// Bytes of the chunk (the last chunk of a buffer may be short).
    pub len: u64,
}

impl Default for BufferMap {
    fn default() -> Self {
        Self {
            sizes: BTreeMap::new(),
            dirty: DirtyChunks::default(),
            written: DirtyChunks::started(),
            origins: BTreeMap::new(),
            digests: BTreeMap::new(),
            writes: 0,
        }
    }
}

impl BufferMap {
    /// Forgets the origin of every chunk of buffer `id` overlapping `range`.
    fn forget_origins(&mut self, id: BufferId, range: &Range<u64>) {
        if range.is_empty() {
            return;
        }
        let first = range.start / CHUNK_SIZE;
        let last = (range.end - 1) / CHUNK_SIZE;
        let chunks = ChunkId {
            buffer: id,
            index: first,
        }..=ChunkId {
            buffer: id,
            index: last,
        };
        let stale: Vec<ChunkId> = self.origins.range(chunks).map(|(&c, _)| c).collect();
        for chunk in stale {
            self.origins.remove(&chunk);
        }
    }

    /// Records that bytes `range` of buffer `id` (of `bytes` bytes) hold file `file`
    /// from `offset` on: the chunks the range covers whole get that origin.
    fn set_origins(&mut self, id: BufferId, bytes: u64, range: Range<u64>, file: u32, offset: u64) {
        for index in range.start.div_ceil(CHUNK_SIZE)..chunk_count(bytes) {
            let Some(chunk) = chunk_range(bytes, index) else {
                break;
            };
            if chunk.end > range.end {
                break;
            }
            let origin = ChunkOrigin {
                file,
                offset: offset + (chunk.start - range.start),
                len: chunk.end - chunk.start,
            };
            self.origins.insert(ChunkId { buffer: id, index }, origin);
        }
    }

    fn table(&self) -> Vec<BufferState> {
        self.sizes
            .iter()
            .map(|(&id, &bytes)| BufferState { id, bytes })
            .collect()
    }
}

/// Takes `lock` even if a thread panicked holding it. Only the device thread can (a
/// failed GPU copy panics by design, a kernel may have a bug); the device is marked dead
/// as it goes (see [`device_thread`]) and what these locks guard stays usable: the
/// control's flags, the buffer table (no backend call runs under its lock), a capture
/// (failed when the device dies) and the core, whose tail is still before the command
/// that panicked. A migration thread must not panic on them in turn.
fn relock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock_map(map: &Mutex<BufferMap>) -> MutexGuard<'_, BufferMap> {
    relock(map)
}

/// What the device thread works on; guarded by one lock, held per command.
struct Core {
    backend: Box<dyn Backend>,
    /// Shared with [`Shared::map`]; the core lock is taken first where both are.
    map: Arc<Mutex<BufferMap>>,
    used: u64,
    capacity: u64,
    ring: Ring,
    tail: u64,
    /// Whether the device status in guest RAM says the ring is invalid, as this device
    /// last wrote it; `None` until it first does (guest RAM restored or received with
    /// the VM may say either), so its first look at the ring says which.
    ring_invalid: Option<bool>,
    /// Whether a bad ring was logged as a warning: once a device, since a guest flipping
    /// its indices could otherwise fill the host's log.
    ring_invalid_warned: bool,
    /// Whether a LOAD_FILE that could not read its file was logged as a warning: once a
    /// device, since a guest repeating it could otherwise fill the host's log.
    file_error_warned: bool,
    mem: GuestRam,
    /// The VM's attached files, for LOAD_FILE.
    files: Arc<dyn FileSource>,
    /// Staging for uploads, downloads and file loads, reused across commands.
    scratch: Vec<u8>,
    /// A capture of a base and a command log, while one runs (shared with
    /// [`Shared::capture`]; taken after the core lock where both are).
    capture: Arc<Mutex<Option<Capture>>>,
    /// Whether one runs: checked per command without the lock.
    capturing: Arc<AtomicBool>,
    /// Cuts the command in flight short (see [`AbortSwitch`]): the backend's, which
    /// its kernels check, or the device's own for a backend without one (a GPU's:
    /// its copies are cut, its kernels run to their end).
    switch: AbortSwitch,
}

impl Core {
    fn new(
        backend: Box<dyn Backend>,
        mem: GuestRam,
        ring: Ring,
        capacity: u64,
        tail: u64,
        files: Arc<dyn FileSource>,
    ) -> Self {
        let switch = backend.abort_switch().unwrap_or_default();
        Self {
            switch,
            backend,
            map: Arc::default(),
            used: 0,
            capacity,
            ring,
            tail,
            ring_invalid: None,
            ring_invalid_warned: false,
            file_error_warned: false,
            mem,
            files,
            scratch: Vec::new(),
            capture: Arc::default(),
            capturing: Arc::default(),
        }
    }
}

fn lock_capture(capture: &Mutex<Option<Capture>>) -> MutexGuard<'_, Option<Capture>> {
    relock(capture)
}

/// Refuses a saved device state made by another backend or kernel version.
/// Whether `addr..addr + len` is guest RAM the guest may name: not the VMM's system
/// pages below [`IMAGE_BASE`] (page tables, IDT, fault stubs), which a copy there would
/// let a ring-3 guest rewrite or read, as every other device refuses.
fn guest_may_name(mem: &GuestRam, addr: u64, len: usize) -> bool {
    addr >= IMAGE_BASE && mem.check_range(GuestAddress(addr), len)
}

/// The ring a saved state names, if its whole region is guest RAM the guest may use (the
/// state came from a file or a peer: an address near the top of the address space, or
/// over the VMM's system pages, is refused, not used).
fn ring_in(mem: &GuestRam, gpa: u64) -> Result<Ring, AccelStateError> {
    use ferry_abi::accel::RING_REGION_SIZE;
    if guest_may_name(mem, gpa, RING_REGION_SIZE as usize) {
        Ok(Ring::at(gpa))
    } else {
        Err(AccelStateError::Corrupt(format!(
            "the ring at {gpa:#x} is not in the guest's RAM"
        )))
    }
}

fn check_compatible(state: &AccelState, backend: &dyn Backend) -> Result<(), AccelStateError> {
    if state.backend_kind != backend.kind() || state.kernel_version != backend.kernel_version() {
        return Err(AccelStateError::Incompatible {
            found: state.backend_kind.clone(),
            found_version: state.kernel_version,
            ours: backend.kind(),
            our_version: backend.kernel_version(),
        });
    }
    Ok(())
}

/// Work handed to the device thread, run there between two commands, even while the
/// device is paused: a backend may run kernels only on the thread it started the device
/// loop on.
type Job = Box<dyn FnOnce(&mut Core) + Send>;

/// Where the device thread is in its life. Only `Live` memory is at a boundary of the
/// guest's commands: the device runs commands and jobs, digests and captures only then.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Running commands, or paused between two.
    #[default]
    Live,
    /// A replay was cut short (see [`TornMemory`]): the thread waits to be ended, taking
    /// no command or job, and the device is not resumed.
    Torn(TornMemory),
    /// Being ended (dropped, aborted): it leaves at the next command boundary, taking no
    /// other command or job.
    Ending,
    /// The device thread is gone (ended, or it panicked): nothing will clear `busy` or
    /// run a job again, so no one may wait for that.
    Gone,
}

impl Life {
    /// A replay cut short tore its memory: only a live device goes to `Torn` (one ending
    /// or gone is past running anything).
    fn tear(&mut self, torn: TornMemory) {
        if *self == Life::Live {
            *self = Life::Torn(torn);
        }
    }

    /// The device is to be ended: a live or torn device goes to `Ending`, one ending or
    /// gone stays so.
    fn end(&mut self) {
        if matches!(self, Life::Live | Life::Torn(_)) {
            *self = Life::Ending;
        }
    }
}

/// Hand-shake between the device thread, the vCPU (doorbell, wait) and the VMM (pause).
#[derive(Default)]
struct Control {
    doorbell: bool,
    pause_requested: bool,
    busy: bool,
    life: Life,
    job: Option<Job>,
}

struct Shared {
    core: Mutex<Core>,
    control: Mutex<Control>,
    /// Wakes the device thread.
    wake: Condvar,
    /// Wakes those waiting for progress or idleness.
    progress: Condvar,
    /// Nanoseconds the device thread has spent executing commands (its load).
    busy_ns: Arc<AtomicU64>,
    /// The ring's `tail` (commands completed), as the device thread last left it.
    tail: AtomicU64,
    /// The `tail` a waiting guest wants ([`Accelerator::wait`]), or [`NO_WAKE`]: the
    /// device thread wakes it when it gets there, not only once idle.
    wake_at: AtomicU64,
    /// The buffers, the buffer table and the dirty chunks, without the core lock (held
    /// for a whole kernel).
    tracker: DeviceTracker,
    /// The capture the core writes, read by a migration without the core lock.
    capture: Arc<Mutex<Option<Capture>>>,
}

/// What other threads (a migration's pre-copy) read and track of a running device
/// without waiting for it: the buffer table, written and dirty chunks, and chunk
/// contents, copied out so that only a kernel writing the same buffer waits, and only
/// for a memory copy.
#[derive(Clone)]
pub struct DeviceTracker {
    reader: Arc<dyn BufferReader>,
    map: Arc<Mutex<BufferMap>>,
}

impl DeviceTracker {
    fn map(&self) -> MutexGuard<'_, BufferMap> {
        lock_map(&self.map)
    }

    /// Every chunk written since its buffer was created, in (buffer, index) order: the
    /// others read as zero.
    pub fn written_chunks(&self) -> Vec<ChunkId> {
        self.map().written.marked()
    }

    /// Every chunk of every buffer, in (buffer, index) order.
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        self.map()
            .sizes
            .iter()
            .flat_map(|(&buffer, &bytes)| {
                (0..chunk_count(bytes)).map(move |index| ChunkId { buffer, index })
            })
            .collect()
    }

    /// Starts exact dirty tracking of device memory.
    pub fn start_dirty_tracking(&self) {
        self.map().dirty.start();
    }

    /// Stops dirty tracking.
    pub fn stop_dirty_tracking(&self) {
        self.map().dirty.stop();
    }

    /// Chunks written since the last take (or since tracking started), and clears them.
    pub fn take_dirty_chunks(&self) -> Vec<ChunkId> {
        self.map().dirty.take()
    }

    /// Chunks written since the last take, each with the bytes written if only part of
    /// it was, and clears them.
    pub fn take_dirty_parts(&self) -> Vec<(ChunkId, Option<(u32, u32)>)> {
        self.map().dirty.take_parts()
    }

    /// The buffer table now (it may change while the device runs).
    pub fn buffer_table(&self) -> Vec<BufferState> {
        self.map().table()
    }

    /// Where chunk `chunk`'s content came from, if it is a piece of an attached file
    /// not written since it was loaded, with the size of its buffer now.
    pub fn chunk_origin(&self, chunk: ChunkId) -> Option<(ChunkOrigin, u64)> {
        let map = self.map();
        let origin = map.origins.get(&chunk).copied()?;
        Some((origin, *map.sizes.get(&chunk.buffer)?))
    }

    /// Copies chunk `chunk` into `out` (resized to the chunk's length: the last chunk of
    /// a buffer may be short) and returns the size of its buffer; `None` if the chunk
    /// does not exist (buffer freed since).
    pub fn read_chunk(&self, chunk: ChunkId, out: &mut Vec<u8>) -> Option<u64> {
        // The buffer's size as the device knows it says which bytes the chunk holds.
        let size = *self.map().sizes.get(&chunk.buffer)?;
        let range = chunk_range(size, chunk.index)?;
        // The buffer may have been freed, or made again with another size, since.
        let read = self.reader.read_range(chunk.buffer, range.clone(), out)?;
        (read == size && out.len() as u64 == range.end - range.start).then_some(size)
    }
}

/// A device's load as other threads read it: the time it has spent executing commands.
/// Holds none of the device's memory.
#[derive(Clone)]
pub struct BusyClock(Arc<AtomicU64>);

impl BusyClock {
    /// Time the device has spent executing commands since it was created here.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The virtual accelerator of one VM.
pub struct Accelerator {
    shared: Arc<Shared>,
    thread: Option<DeviceLoop>,
    /// Its backend's kind, fixed for its life (read without waiting for the device).
    backend_kind: &'static str,
    /// The host threads its kernels run on (read without waiting for the device).
    host_threads: HostThreads,
    /// Cuts the command in flight short as it is ended: a copy between two pieces, a
    /// kernel where the backend can (taken without the core lock, which that command
    /// holds).
    abort_switch: AbortSwitch,
}

fn buffer_id(arg: u64) -> Option<BufferId> {
    (1..=MAX_BUFFERS).contains(&arg).then_some(arg as BufferId)
}

fn backend_status(e: &BackendError) -> u32 {
    match e {
        // Aborted: the host ended the device, whatever the arguments (and no one reads it).
        // Out of time: a replay's deadline cut it short (the replay fails: `Core::replay`).
        BackendError::Alloc { .. }
        | BackendError::Device(_)
        | BackendError::Aborted
        | BackendError::OutOfTime => status::DEVICE_ERROR,
        BackendError::BadData(_) => status::BAD_ARGUMENT,
        BackendError::TooMuchWork => status::BAD_SHAPE,
    }
}

impl Core {
    fn buffer_range(&self, id: u64, offset: u64, len: u64) -> Result<(BufferId, Range<u64>), u32> {
        let id = buffer_id(id).ok_or(status::BAD_BUFFER)?;
        let bytes = *lock_map(&self.map)
            .sizes
            .get(&id)
            .ok_or(status::BAD_BUFFER)?;
        let end = offset.checked_add(len).ok_or(status::OUT_OF_BOUNDS)?;
        if end > bytes {
            return Err(status::OUT_OF_BOUNDS);
        }
        Ok((id, offset..end))
    }

    /// The buffer range and guest range of an UPLOAD or a DOWNLOAD with arguments `a`,
    /// validated: `len` bytes of buffer `a[0]` from `a[1]`, of guest memory from `a[2]`.
    fn transfer_range(&self, a: &[u64]) -> Result<(BufferId, Range<u64>), u32> {
        let (id, range) = self.buffer_range(a[0], a[1], a[3])?;
        self.guest_range(a[2], a[3])?;
        Ok((id, range))
    }

    /// The buffer range, file and file offset of a LOAD_FILE with arguments `a`,
    /// validated: `len` (`a[4]`) bytes of buffer `a[0]` from `a[1]`, of attached file
    /// `a[2]` from `a[3]`, at most [`MAX_READ`] and within the file.
    fn load_file_range(&self, a: &[u64]) -> Result<(BufferId, Range<u64>, u32, u64), u32> {
        let (id, range) = self.buffer_range(a[0], a[1], a[4])?;
        let file = u32::try_from(a[2]).map_err(|_| status::BAD_FILE)?;
        let file_len = self.files.file_len(file).ok_or(status::BAD_FILE)?;
        let (start, len) = (a[3], a[4]);
        if len > MAX_READ || start.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(status::BAD_FILE);
        }
        Ok((id, range, file, start))
    }

    /// UPLOAD or DOWNLOAD of a validated range ([`Self::transfer_range`]): copies buffer
    /// `id`'s `range` from or to guest memory at `gpa`, in pieces of at most
    /// [`COPY_PIECE`], checking the switch before each: cut short, `DEVICE_ERROR`, the
    /// range partly copied.
    fn transfer(
        &mut self,
        way: Transfer,
        id: BufferId,
        range: Range<u64>,
        gpa: u64,
    ) -> Result<(), u32> {
        let piece = &mut self.scratch;
        piece.resize(COPY_PIECE.min(range.end - range.start) as usize, 0);
        for start in range.clone().step_by(COPY_PIECE as usize) {
            self.switch.check().map_err(|e| backend_status(&e))?;
            let piece = &mut piece[..(range.end - start).min(COPY_PIECE) as usize];
            let guest = GuestAddress(gpa + (start - range.start));
            match way {
                Transfer::ToDevice => {
                    // The whole range was checked to be guest RAM: a piece that cannot be
                    // read after others were written is the device's failure, not a
                    // refused command the replay log may skip.
                    let failed = if start == range.start {
                        status::BAD_GUEST_RANGE
                    } else {
                        status::DEVICE_ERROR
                    };
                    self.mem.read_slice(piece, guest).map_err(|_| failed)?;
                    self.backend.write(id, start, piece);
                }
                Transfer::ToGuest => {
                    self.backend.read(id, start, piece);
                    // Written through GuestRam: the pages land in the guest dirty log.
                    self.mem
                        .write_slice(piece, guest)
                        .map_err(|_| status::BAD_GUEST_RANGE)?;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` into buffer `id` from byte `offset` (validated), in pieces of at
    /// most [`COPY_PIECE`], checking the switch before each: cut short, the switch's
    /// error, the range partly written.
    fn write_in_pieces(
        &mut self,
        id: BufferId,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        for (i, piece) in data.chunks(COPY_PIECE as usize).enumerate() {
            self.switch.check()?;
            self.backend
                .write(id, offset + i as u64 * COPY_PIECE, piece);
        }
        Ok(())
    }

    /// Checks that a command's `addr..addr + len` is guest RAM it may name
    /// ([`guest_may_name`]).
    fn guest_range(&self, addr: u64, len: u64) -> Result<(), u32> {
        let len = usize::try_from(len).map_err(|_| status::BAD_GUEST_RANGE)?;
        if len == 0 || guest_may_name(&self.mem, addr, len) {
            Ok(())
        } else {
            Err(status::BAD_GUEST_RANGE)
        }
    }

    fn has_buffer(&self, id: BufferId) -> bool {
        lock_map(&self.map).sizes.contains_key(&id)
    }

    /// Fills `range` of buffer `id` with attached file `file`'s bytes from `start` on,
    /// which `read(offset, out)` reads, in pieces of at most [`COPY_PIECE`], each read
    /// into scratch and then copied (no buffer lock is held while a file is read),
    /// checking the switch before each.
    /// Marks what it may have written; once all is, the range keeps its origin, so a
    /// migration to a host with the file sends where, not what.
    fn load_file(
        &mut self,
        id: BufferId,
        range: Range<u64>,
        (file, start): (u32, u64),
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(), LoadFailed> {
        let len = range.end - range.start;
        let mut done = 0;
        let mut result = Ok(());
        while done < len && result.is_ok() {
            if let Err(cut) = self.switch.check() {
                result = Err(LoadFailed::Cut(cut));
                break;
            }
            let n = (len - done).min(COPY_PIECE);
            let piece = &mut self.scratch;
            piece.resize(n as usize, 0);
            result = read(start + done, piece).map_err(LoadFailed::Read);
            if result.is_ok() {
                self.backend.write(id, range.start + done, piece);
            }
            done += n;
        }
        self.mark([(id, range.start..range.start + done)]);
        if result.is_ok() {
            let mut map = lock_map(&self.map);
            if let Some(&bytes) = map.sizes.get(&id) {
                map.set_origins(id, bytes, range, file, start);
            }
        }
        result
    }

    /// Records writes (made before: a take between the write and this mark finds them
    /// at the next take, and the chunk is sent again).
    fn mark(&self, writes: impl IntoIterator<Item = (BufferId, Range<u64>)>) {
        let mut map = lock_map(&self.map);
        map.writes = map.writes.wrapping_add(1);
        for (id, range) in writes {
            map.digests.remove(&id);
            if let Some(&bytes) = map.sizes.get(&id) {
                map.forget_origins(id, &range);
                map.dirty.mark(id, bytes, range.clone());
                map.written.mark(id, bytes, range);
            }
        }
    }

    fn alloc(&mut self, id: BufferId, bytes: u64) -> Result<(), BackendError> {
        self.backend.alloc(id, bytes)?;
        let mut map = lock_map(&self.map);
        map.sizes.insert(id, bytes);
        map.digests.remove(&id);
        map.dirty.mark_all(id, bytes);
        self.used += bytes;
        Ok(())
    }

    fn free(&mut self, id: BufferId) -> Option<u64> {
        let bytes = {
            let mut map = lock_map(&self.map);
            let bytes = map.sizes.remove(&id)?;
            map.digests.remove(&id);
            map.dirty.forget(id);
            map.written.forget(id);
            map.forget_origins(id, &(0..bytes));
            bytes
        };
        self.used -= bytes;
        self.backend.free(id);
        Some(bytes)
    }

    /// Makes the buffer table equal to `table`: buffers missing from it or of another size
    /// are freed, new ones allocated (zeroed). Every entry is validated first, so a bad
    /// table changes nothing.
    fn sync_buffers(&mut self, table: &[BufferState]) -> Result<(), AccelStateError> {
        let mut wanted = BTreeMap::new();
        let mut total = 0u64;
        for buffer in table {
            let valid_id =
                buffer_id(u64::from(buffer.id)).is_some() && !wanted.contains_key(&buffer.id);
            total = total.saturating_add(buffer.bytes);
            if !valid_id || buffer.bytes == 0 || buffer.bytes % 4 != 0 || total > self.capacity {
                return Err(AccelStateError::Corrupt(format!(
                    "buffer {} of {} bytes (capacity {} bytes)",
                    buffer.id, buffer.bytes, self.capacity
                )));
            }
            wanted.insert(buffer.id, buffer.bytes);
        }
        let stale: Vec<BufferId> = lock_map(&self.map)
            .sizes
            .iter()
            .filter(|(id, bytes)| wanted.get(id) != Some(bytes))
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.free(id);
        }
        for (id, bytes) in wanted {
            if !self.has_buffer(id) {
                self.alloc(id, bytes)
                    .map_err(|source| AccelStateError::Alloc { id, source })?;
            }
        }
        Ok(())
    }

    fn execute(&mut self, cmd: &Command) -> Result<(), u32> {
        let a = &cmd.args;
        match cmd.opcode {
            op::ALLOC => {
                let id = buffer_id(a[0]).ok_or(status::BAD_BUFFER)?;
                if self.has_buffer(id) {
                    return Err(status::BAD_BUFFER);
                }
                if a[1] == 0 || !a[1].is_multiple_of(4) {
                    return Err(status::BAD_ARGUMENT);
                }
                if a[1] > self.capacity - self.used {
                    return Err(status::OUT_OF_MEMORY);
                }
                self.alloc(id, a[1]).map_err(|e| backend_status(&e))
            }
            op::FREE => {
                let id = buffer_id(a[0]).ok_or(status::BAD_BUFFER)?;
                self.free(id).map(drop).ok_or(status::BAD_BUFFER)
            }
            op::UPLOAD => {
                let (id, range) = self.transfer_range(a)?;
                let copied = self.transfer(Transfer::ToDevice, id, range.clone(), a[2]);
                // Marked even when cut short: the pieces before the cut are written.
                self.mark([(id, range)]);
                copied
            }
            op::DOWNLOAD => {
                // Written through GuestRam, cut short or not: the guest dirty log has it.
                let (id, range) = self.transfer_range(a)?;
                self.transfer(Transfer::ToGuest, id, range, a[2])
            }
            op::LOAD_FILE => {
                let (id, range, file, start) = self.load_file_range(a)?;
                let files = Arc::clone(&self.files);
                self.load_file(id, range, (file, start), &mut |at, piece| {
                    files.read_file(file, at, piece)
                })
                .map_err(|e| match e {
                    LoadFailed::Read(e) => {
                        if std::mem::replace(&mut self.file_error_warned, true) {
                            tracing::debug!(file, "accelerator cannot read an attached file: {e}");
                        } else {
                            tracing::warn!(
                                file,
                                "accelerator cannot read an attached file: {e} (said once; the command's status tells each time)"
                            );
                        }
                        status::DEVICE_ERROR
                    }
                    LoadFailed::Cut(e) => backend_status(&e),
                })
            }
            op::LAUNCH => self.launch(a)?.map_err(|e| backend_status(&e)),
            op::FENCE => self
                .ring
                .publish_fence(&self.mem, a[0])
                .map_err(|_| status::DEVICE_ERROR),
            _ => Err(status::BAD_OPCODE),
        }
    }

    /// LAUNCH with arguments `a`: the status of arguments that fail validation, else
    /// what the backend says of the kernel. What it may have written is marked, even
    /// when it failed.
    fn launch(&mut self, a: &[u64]) -> Result<Result<(), BackendError>, u32> {
        let (kernel, access) = {
            let map = lock_map(&self.map);
            Kernel::decode(a, |id| map.sizes.get(&id).copied())?
        };
        let result = self.backend.launch(&kernel);
        // Marked even on failure: a kernel rejecting its data, or cut short, may have
        // written part.
        self.mark(access.writes());
        Ok(result)
    }

    /// The device memory `cmd` would write, as far as its arguments are valid (one
    /// that fails validation writes nothing). Validated as [`Self::execute`] does, with
    /// the same helpers: a command it fails preserves no base chunk in a capture.
    fn write_set(&self, cmd: &Command) -> Vec<(BufferId, Range<u64>)> {
        let a = &cmd.args;
        match cmd.opcode {
            op::FREE => buffer_id(a[0])
                .and_then(|id| Some((id, 0..*lock_map(&self.map).sizes.get(&id)?)))
                .into_iter()
                .collect(),
            op::UPLOAD => self.transfer_range(a).ok().into_iter().collect(),
            op::LOAD_FILE => self
                .load_file_range(a)
                .map(|(id, range, ..)| (id, range))
                .ok()
                .into_iter()
                .collect(),
            op::LAUNCH => {
                let map = lock_map(&self.map);
                Kernel::decode(a, |id| map.sizes.get(&id).copied())
                    .map(|(_, access)| access.writes().collect())
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Before `cmd` runs: preserves each base chunk it writes that has not been read
    /// yet, as it is now.
    ///
    /// The chunks are listed under the capture's lock, read outside it, and kept under
    /// it again: a read may wait for the kernels in flight (on a GPU), and meanwhile the
    /// migration reads base chunks and the log under that lock. Nothing writes them in
    /// between (this thread runs the commands, and `cmd` has not run); one the migration
    /// read meanwhile is not kept.
    fn preserve_base(&mut self, cmd: &Command) {
        let writes = self.write_set(cmd);
        if writes.is_empty() {
            return;
        }
        let mut wanted = Vec::new();
        // A command's write ranges may share a chunk: listed once.
        let mut listed = std::collections::BTreeSet::new();
        {
            let mut capture = lock_capture(&self.capture);
            let Some(capture) = capture.as_mut() else {
                return;
            };
            // An empty range (a zero-length upload) writes no chunk.
            for (id, range) in writes.into_iter().filter(|(_, r)| !r.is_empty()) {
                let Some(&bytes) = lock_map(&self.map).sizes.get(&id) else {
                    continue;
                };
                let last = range.end.saturating_sub(1) / CHUNK_SIZE;
                for index in range.start / CHUNK_SIZE..=last {
                    let chunk = ChunkId { buffer: id, index };
                    let Some(span) = chunk_range(bytes, index) else {
                        break;
                    };
                    if capture.needs_preserving(&chunk) && listed.insert(chunk) {
                        wanted.push((chunk, span));
                    }
                }
            }
            // Refused before anything is read: a command may write far more than the pool.
            let bytes = wanted.iter().map(|(_, span)| span.end - span.start).sum();
            if !capture.makes_room_for(bytes) {
                return;
            }
        }
        if wanted.is_empty() {
            return;
        }
        let read: Vec<(ChunkId, Vec<u8>)> = wanted
            .into_iter()
            .map(|(chunk, span)| {
                let mut data = vec![0u8; (span.end - span.start) as usize];
                self.backend.read(chunk.buffer, span.start, &mut data);
                (chunk, data)
            })
            .collect();
        let mut capture = lock_capture(&self.capture);
        let Some(capture) = capture.as_mut() else {
            return;
        };
        for (chunk, data) in read {
            if capture.needs_preserving(&chunk) {
                capture.preserve(chunk, data);
            }
        }
    }

    /// After `cmd` ran with `outcome`: logs it, with an upload's data.
    fn log_command(&mut self, cmd: &Command, outcome: u32) {
        if outcome == status::DEVICE_ERROR {
            // The host failed it, not its arguments (memory ran out, a file could not be
            // read, the GPU failed), perhaps after writing part: the destination would
            // not fail it alike, and the migration falls back to pre-copy instead.
            if let Some(capture) = lock_capture(&self.capture).as_mut() {
                capture.fail(CaptureError::Unreplayable { opcode: cmd.opcode });
            }
            return;
        }
        let a = &cmd.args;
        let mut payload = Vec::new();
        if cmd.opcode == op::UPLOAD && outcome == status::OK {
            if let Ok((id, range)) = self.buffer_range(a[0], a[1], a[3]) {
                let len = range.end - range.start;
                // Copied only if the log takes it: an upload may be as large as the
                // device's memory, far beyond the log's bound.
                let room = lock_capture(&self.capture)
                    .as_mut()
                    .is_some_and(|c| c.makes_room(len));
                if !room {
                    return;
                }
                // What it wrote is what it read from guest RAM.
                payload.resize(len as usize, 0);
                self.backend.read(id, range.start, &mut payload);
            }
        }
        if let Some(capture) = lock_capture(&self.capture).as_mut() {
            capture.log(LoggedCommand {
                opcode: cmd.opcode,
                args: a.to_vec(),
                payload,
                status: outcome,
            });
        }
    }

    /// Replays one logged command (see [`crate::replay`]).
    fn replay(&mut self, index: usize, entry: &LoggedCommand) -> Result<(), ReplayError> {
        if !replays(entry) {
            return Ok(());
        }
        let diverged = |got: u32| ReplayError::Diverged {
            index,
            opcode: entry.opcode,
            expected: entry.status,
            got,
        };
        if entry.opcode == op::UPLOAD {
            let a = &entry.args;
            let arg = |i: usize| a.get(i).copied().unwrap_or(0);
            let (id, range) = self
                .buffer_range(arg(0), arg(1), arg(3))
                .map_err(diverged)?;
            if entry.payload.len() as u64 != range.end - range.start {
                return Err(ReplayError::BadPayload {
                    index,
                    expected: range.end - range.start,
                    got: entry.payload.len() as u64,
                });
            }
            let written = self.write_in_pieces(id, range.start, &entry.payload);
            // Marked even when cut short: the pieces before the cut are written.
            self.mark([(id, range)]);
            return written.map_err(|cut| cut_short(index, entry, cut));
        }
        let writes_before = lock_map(&self.map).writes;
        let got = self
            .execute(&command_of(entry))
            .map_or_else(|s| s, |()| status::OK);
        // A command the switch cut short (a kernel, a file load) did not diverge: its
        // outputs are partly written (marked), and stay so.
        if let Err(cut) = self.switch.stopped() {
            return Err(cut_short(index, entry, cut));
        }
        if got == entry.status {
            Ok(())
        } else if got != status::OK && lock_map(&self.map).writes != writes_before {
            Err(ReplayError::FailedMidway {
                index,
                opcode: entry.opcode,
                expected: entry.status,
                got,
            })
        } else {
            Err(diverged(got))
        }
    }

    /// Executes the next submitted command, if any. `false` when there is nothing to do
    /// (ring empty, or its indices are inconsistent).
    fn step(&mut self) -> bool {
        // Between the last command's `tail` and this `head`: a guest that publishes a
        // `head` and then sees that `tail` short of its last one rings no doorbell,
        // counting on this read to see it (the SDK's `flush`).
        fence(Ordering::SeqCst);
        let Ok(head) = self.ring.head(&self.mem) else {
            return false;
        };
        let sane = head_is_sane(head, self.tail);
        if self.ring_invalid != Some(!sane) {
            self.ring_invalid = Some(!sane);
            let code = if sane {
                device_status::OK
            } else {
                device_status::RING_INVALID
            };
            let _ = self.ring.publish_device_status(&self.mem, code);
            if !sane && std::mem::replace(&mut self.ring_invalid_warned, true) {
                tracing::debug!(head, tail = self.tail, "guest accelerator ring invalid");
            } else if !sane {
                tracing::warn!(
                    head,
                    tail = self.tail,
                    "guest accelerator ring indices are inconsistent; ring ignored (said once; the device status tells each time)"
                );
            }
        }
        if !sane || head == self.tail {
            return false;
        }
        let index = self.tail;
        let outcome = match self.ring.command(&self.mem, index) {
            Ok(cmd) => {
                let capturing = self.capturing.load(Ordering::Acquire);
                if capturing {
                    self.preserve_base(&cmd);
                }
                let outcome = self.execute(&cmd).map_or_else(|s| s, |()| status::OK);
                if capturing {
                    self.log_command(&cmd, outcome);
                }
                outcome
            }
            Err(_) => status::DEVICE_ERROR,
        };
        if outcome != status::OK {
            tracing::debug!(
                index,
                outcome = status::name(outcome),
                "accelerator command failed"
            );
        }
        let _ = self.ring.complete(&self.mem, index, outcome);
        let _ = self.ring.publish_used(&self.mem, self.used);
        self.tail += 1;
        let _ = self.ring.publish_tail(&self.mem, self.tail);
        true
    }
}

/// The replay error of logged command `index`, `entry`, cut short by the switch with
/// `cut` (see [`AbortSwitch::stopped`]): the device is being ended, or this host ran out
/// of the time it gives a peer's commands.
fn cut_short(index: usize, entry: &LoggedCommand, cut: BackendError) -> ReplayError {
    match cut {
        BackendError::Aborted => ReplayError::DeviceGone,
        _ => ReplayError::DeadlinePassed {
            index,
            opcode: entry.opcode,
        },
    }
}

fn device_thread(shared: Arc<Shared>) {
    // Caught here, not left to the backend's thread: whoever waits on the device (a
    // pause under the VM's control lock, a replay job) must learn that it is gone.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_device(&shared)));
    if ran.is_err() {
        tracing::error!("the accelerator's device thread panicked; the device is dead");
        device_died(&shared);
    }
    let job = {
        let mut control = relock(&shared.control);
        control.life = Life::Gone;
        control.busy = false;
        control.job.take()
    };
    // Dropping a job drops its sender: its caller's wait ends with an error.
    drop(job);
    shared.progress.notify_all();
}

/// After a panic on the device thread: the command it interrupted may have written part
/// of its buffers, unmarked, and is not in a capture's log. Every buffer is marked
/// written (a pre-copy then sends all of device memory as it is) and a capture fails
/// (its base and log no longer give this memory).
fn device_died(shared: &Shared) {
    // Under the core lock, as a capture starts: one started after this finds the device
    // dead, one started before is failed here.
    let core = relock(&shared.core);
    relock(&shared.control).life = Life::Gone;
    // The command cut short may have written any of its buffers, unmarked: all are.
    let whole: Vec<_> = lock_map(&core.map)
        .sizes
        .iter()
        .map(|(&id, &bytes)| (id, 0..bytes))
        .collect();
    core.mark(whole);
    if let Some(capture) = lock_capture(&shared.capture).as_mut() {
        capture.fail(CaptureError::DeviceGone);
    }
}

/// [`Shared::wake_at`] when no guest waits for a `tail`.
const NO_WAKE: u64 = u64::MAX;

/// Whether `tail` has reached the 32-bit `target` a guest waits for: the low 32 bits
/// compared as a ring, so a target up to 2^31 commands behind counts as reached (a
/// guest's real targets are within a ring of the tail; any other only waits less).
fn tail_reached(tail: u64, target: u32) -> bool {
    (tail as u32).wrapping_sub(target) as i32 >= 0
}

impl Shared {
    /// Publishes the device thread's `tail`, waking the guest waiting for it (once).
    fn reached(&self, tail: u64) {
        // SeqCst against `Accelerator::wait`: it stores `wake_at` and then reads `tail`,
        // this stores `tail` and then reads `wake_at`; one of the two sees the other.
        self.tail.store(tail, Ordering::SeqCst);
        let want = self.wake_at.load(Ordering::SeqCst);
        if want == NO_WAKE || !tail_reached(tail, want as u32) {
            return;
        }
        if self
            .wake_at
            .compare_exchange(want, NO_WAKE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // Taken, so that the waiter is either asleep or about to test `tail` again.
            drop(relock(&self.control));
            self.progress.notify_all();
        }
    }
}

/// The device thread's loop, until the device is stopped.
fn run_device(shared: &Shared) {
    loop {
        {
            let control = relock(&shared.control);
            let mut control = shared
                .wake
                .wait_while(control, |c| match c.life {
                    Life::Live => c.job.is_none() && (c.pause_requested || !c.doorbell),
                    // Runs nothing more, but its thread stays until it is ended.
                    Life::Torn(_) => true,
                    Life::Ending | Life::Gone => false,
                })
                .unwrap_or_else(PoisonError::into_inner);
            if control.life != Life::Live {
                return;
            }
            if let Some(job) = control.job.take() {
                control.busy = true;
                drop(control);
                job(&mut relock(&shared.core));
                relock(&shared.control).busy = false;
                shared.progress.notify_all();
                continue;
            }
            control.doorbell = false;
            control.busy = true;
        }
        let started = Instant::now();
        loop {
            let job = {
                // A device being ended runs nothing more: the VM is going away.
                let mut control = relock(&shared.control);
                if control.pause_requested || control.life != Life::Live {
                    break;
                }
                control.job.take()
            };
            if let Some(job) = job {
                // Run between two commands, not once the ring is empty: a guest that
                // keeps its ring full would hold a capture's start off for ever (the
                // core lock is not fair: this thread takes it back first).
                job(&mut relock(&shared.core));
                shared.progress.notify_all();
                continue;
            }
            // No wake-up per command: waiters care about `busy`, notified below, and
            // one may want a `tail` (a fence, room in the ring).
            let (progressed, tail) = {
                let mut core = relock(&shared.core);
                (core.step(), core.tail)
            };
            if !progressed {
                break;
            }
            shared.reached(tail);
        }
        let busy = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        shared.busy_ns.fetch_add(busy, Ordering::Relaxed);
        relock(&shared.control).busy = false;
        shared.progress.notify_all();
    }
}

impl Accelerator {
    fn start(core: Core) -> std::io::Result<Self> {
        let backend_kind = core.backend.kind();
        let host_threads = core.backend.host_threads();
        let abort_switch = core.switch.clone();
        let tracker = DeviceTracker {
            reader: core.backend.reader(),
            map: core.map.clone(),
        };
        let capture = core.capture.clone();
        let tail = core.tail;
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            control: Mutex::new(Control {
                pause_requested: true,
                ..Control::default()
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            busy_ns: Arc::default(),
            tail: AtomicU64::new(tail),
            wake_at: AtomicU64::new(NO_WAKE),
            tracker,
            capture,
        });
        let thread_shared = shared.clone();
        let thread = relock(&shared.core)
            .backend
            .spawn_device_loop(Box::new(move || device_thread(thread_shared)))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            backend_kind,
            host_threads,
            abort_switch,
        })
    }

    /// The Linux ids of the host threads its kernels run on (see [`HostThreads`]).
    pub fn host_threads(&self) -> Vec<libc::pid_t> {
        self.host_threads.ids()
    }

    /// Its backend's kind ("cpu").
    pub fn backend_kind(&self) -> &'static str {
        self.backend_kind
    }

    /// Time the device has spent executing commands since it was created here (its
    /// load, as the cluster center sees it).
    pub fn busy_time(&self) -> Duration {
        self.busy_clock().busy_time()
    }

    /// Its load, readable from other threads after the device is gone.
    pub fn busy_clock(&self) -> BusyClock {
        BusyClock(self.shared.busy_ns.clone())
    }

    /// A tracker of its memory for other threads (see [`DeviceTracker`]).
    pub fn tracker(&self) -> DeviceTracker {
        self.shared.tracker.clone()
    }

    /// A fresh device of `capacity` bytes whose ring is at `ring_gpa` (the header is
    /// written now). It starts paused, like the vCPUs.
    pub fn boot(
        mem: GuestRam,
        ring_gpa: u64,
        capacity: u64,
        backend: Box<dyn Backend>,
        files: Arc<dyn FileSource>,
    ) -> std::io::Result<Self> {
        let ring = Ring::at(ring_gpa);
        ring.init(&mem, capacity).map_err(std::io::Error::other)?;
        Self::start(Core::new(backend, mem, ring, capacity, 0, files))
    }

    /// A device rebuilt from `state` with empty (zero) buffers; fill them with
    /// [`Self::write_chunk`] before resuming. Starts paused.
    pub fn restore(
        mem: GuestRam,
        state: &AccelState,
        backend: Box<dyn Backend>,
        files: Arc<dyn FileSource>,
    ) -> Result<Self, AccelStateError> {
        check_compatible(state, backend.as_ref())?;
        let ring = ring_in(&mem, state.ring_gpa)?;
        let mut core = Core::new(backend, mem, ring, state.capacity, state.tail, files);
        core.sync_buffers(&state.buffers)?;
        Self::start(core).map_err(|e| AccelStateError::Corrupt(e.to_string()))
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        relock(&self.shared.control)
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        relock(&self.shared.core)
    }

    fn map(&self) -> MutexGuard<'_, BufferMap> {
        self.shared.tracker.map()
    }

    /// Replaces the attached files LOAD_FILE reads (a VM restored or received gets them
    /// once they are all on this host). The device must be paused.
    pub fn set_files(&self, files: Arc<dyn FileSource>) {
        self.core().files = files;
    }

    /// The guest rang the doorbell.
    pub fn doorbell(&self) {
        self.control().doorbell = true;
        self.shared.wake.notify_one();
    }

    /// The guest waits: returns once the device is idle or after `timeout`, whichever
    /// comes first (bounded, so a vCPU blocked here still answers a pause request). A
    /// dead or torn device is idle: nothing it was asked will run.
    pub fn wait_idle(&self, timeout: Duration) {
        self.wait(None, timeout);
    }

    /// The guest waits ([`port::ACCEL_WAIT`](ferry_abi::port::ACCEL_WAIT)): returns once
    /// the ring's `tail` has reached `until` (its low 32 bits, see the port), once the
    /// device is idle, or after `timeout`, whichever comes first. A guest waiting for one
    /// fence or for room in its ring then goes on while the device runs what it queued
    /// after, instead of waiting for all of it or a slice at a time.
    pub fn wait(&self, until: Option<u32>, timeout: Duration) {
        let control = self.control();
        if let Some(target) = until {
            self.shared
                .wake_at
                .store(u64::from(target), Ordering::SeqCst);
        }
        let shared = &self.shared;
        let waited = shared.progress.wait_timeout_while(control, timeout, |c| {
            if until.is_some_and(|t| tail_reached(shared.tail.load(Ordering::SeqCst), t)) {
                return false;
            }
            // A torn device serves no doorbell.
            let torn = matches!(c.life, Life::Torn(_));
            c.life != Life::Gone && (c.busy || (c.doorbell && !c.pause_requested && !torn))
        });
        drop(waited);
        if let Some(target) = until {
            // Not left for the device thread to find (it would wake nobody); a newer
            // waiter's own target is left as it is.
            let _ = shared.wake_at.compare_exchange(
                u64::from(target),
                NO_WAKE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// Whether the device thread is gone (it panicked: a failed GPU copy, a bug; or it was
    /// ended: [`Self::abort`]): the device runs no more commands, and its pause returns at
    /// once.
    pub fn is_dead(&self) -> bool {
        self.control().life == Life::Gone
    }

    /// Asks the device to stop at its next command boundary, without waiting (as
    /// [`Accelerator::pause`] does first, which then waits); a waiting vCPU is let go
    /// once the command in flight ends.
    pub fn request_pause(&self) {
        self.control().pause_requested = true;
    }

    /// Ends the device for good, without waiting for the command in flight where it can
    /// be cut short (a copy, within one piece of it; a kernel of the cpu backend's,
    /// within milliseconds; a GPU's kernel runs to its end, as for a pause): that
    /// command fails with `DEVICE_ERROR`, its writes marked, and the device thread stops;
    /// returns once it has.
    ///
    /// Only for a device whose VM is being ended (stopped, its guest ended, dropped): the
    /// command cut short leaves device memory half written, which no VM may run on from,
    /// and the device runs nothing more. A pause that the VM outlives (a migration, a
    /// snapshot, a throttle) uses [`Self::pause`], which waits.
    pub fn abort(&self) {
        let mut control = self.control();
        control.life.end();
        // Pulled under the control lock after `Ending`: the command it cuts short is the
        // last the device thread runs (it takes the lock before the next).
        self.abort_switch.pull();
        self.shared.wake.notify_all();
        drop(
            self.shared
                .progress
                .wait_while(control, |c| c.life != Life::Gone)
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// Stops the device at a command boundary and waits until it has (at once if the
    /// device is dead: see [`Self::is_dead`]).
    pub fn pause(&self) {
        let mut control = self.control();
        control.pause_requested = true;
        drop(
            self.shared
                .progress
                // A dying device thread clears `busy` last, once it has marked what
                // the command it was in may have written.
                .wait_while(control, |c| c.busy)
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// Lets a paused device run again (and look at the ring for work), unless a replay
    /// cut short tore its memory: no guest may run on that.
    pub fn resume(&self) -> Result<(), TornMemory> {
        // At a command boundary: a replayed command in progress tears (under the core
        // lock) before this looks, or after this returned, never in between unseen.
        let _boundary = self.core();
        let mut control = self.control();
        if let Life::Torn(torn) = control.life {
            return Err(torn);
        }
        control.pause_requested = false;
        control.doorbell = true;
        drop(control);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The device state, less buffer contents. Pause the device first. A torn device has
    /// no state worth keeping: its memory is neither the old nor the new.
    pub fn save_state(&self) -> Result<AccelState, TornMemory> {
        // The core lock first, as a tear is made under it (see [`Self::resume`]).
        let core = self.core();
        if let Life::Torn(torn) = self.control().life {
            return Err(torn);
        }
        Ok(AccelState {
            backend_kind: core.backend.kind().to_string(),
            kernel_version: core.backend.kernel_version(),
            capacity: core.capacity,
            ring_gpa: core.ring.gpa(),
            tail: core.tail,
            buffers: self.map().table(),
        })
    }

    /// See [`DeviceTracker::written_chunks`].
    pub fn written_chunks(&self) -> Vec<ChunkId> {
        self.shared.tracker.written_chunks()
    }

    /// See [`DeviceTracker::all_chunks`].
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        self.shared.tracker.all_chunks()
    }

    /// See [`DeviceTracker::start_dirty_tracking`].
    pub fn start_dirty_tracking(&self) {
        self.shared.tracker.start_dirty_tracking();
    }

    /// See [`DeviceTracker::stop_dirty_tracking`].
    pub fn stop_dirty_tracking(&self) {
        self.shared.tracker.stop_dirty_tracking();
    }

    /// See [`DeviceTracker::take_dirty_chunks`].
    pub fn take_dirty_chunks(&self) -> Vec<ChunkId> {
        self.shared.tracker.take_dirty_chunks()
    }

    /// See [`DeviceTracker::read_chunk`].
    pub fn read_chunk(&self, chunk: ChunkId, out: &mut Vec<u8>) -> Option<u64> {
        self.shared.tracker.read_chunk(chunk, out)
    }

    /// See [`DeviceTracker::buffer_table`].
    pub fn buffer_table(&self) -> Vec<BufferState> {
        self.shared.tracker.buffer_table()
    }

    /// Receiving side of a migration: makes the buffer table equal to `table` (buffers
    /// gone or resized are dropped, new ones start zeroed). The device must be paused.
    pub fn sync_buffers(&self, table: &[BufferState]) -> Result<(), AccelStateError> {
        self.core().sync_buffers(table)
    }

    /// Receiving side of a migration, at switchover: takes the final device state, whose
    /// buffer table must be the one already synced. The device must be paused.
    pub fn apply_state(&self, state: &AccelState) -> Result<(), AccelStateError> {
        let mut core = self.core();
        check_compatible(state, core.backend.as_ref())?;
        if state.capacity != core.capacity || state.buffers != self.map().table() {
            return Err(AccelStateError::Corrupt(
                "final device state disagrees with the buffers received".into(),
            ));
        }
        core.ring = ring_in(&core.mem, state.ring_gpa)?;
        core.tail = state.tail;
        self.shared.tail.store(state.tail, Ordering::SeqCst);
        core.ring_invalid = None;
        Ok(())
    }

    /// The device's side of a replay migration, used without the VM's lock.
    pub fn replayer(&self) -> DeviceReplay {
        DeviceReplay {
            shared: self.shared.clone(),
        }
    }

    /// See [`DeviceReplay::replay`].
    pub fn replay(
        &self,
        entries: Vec<LoggedCommand>,
        deadline: Instant,
    ) -> Result<(), ReplayError> {
        self.replayer().replay(entries, deadline)
    }

    /// See [`DeviceReplay::digest`].
    pub fn digest(&self) -> Result<DeviceDigest, DigestError> {
        self.replayer().digest()
    }

    /// Writes chunk `chunk` (receiving side of a migration, or a snapshot restore).
    pub fn write_chunk(&self, chunk: ChunkId, data: &[u8]) -> Result<(), AccelStateError> {
        self.chunk_bytes(chunk, |r| {
            (r.end - r.start == data.len() as u64).then_some(r)
        })?;
        self.write_chunk_part(chunk, 0, data)
    }

    /// The device memory of chunk `chunk` that `part` picks from the chunk's whole range;
    /// `BadChunk` if the buffer table has no such chunk or `part` finds none.
    fn chunk_bytes(
        &self,
        chunk: ChunkId,
        part: impl FnOnce(Range<u64>) -> Option<Range<u64>>,
    ) -> Result<Range<u64>, AccelStateError> {
        self.map()
            .sizes
            .get(&chunk.buffer)
            .and_then(|&bytes| chunk_range(bytes, chunk.index))
            .and_then(part)
            .ok_or(AccelStateError::BadChunk {
                buffer: chunk.buffer,
                index: chunk.index,
            })
    }

    /// Writes `data` into chunk `chunk` at `offset` (receiving side of a migration that
    /// sent only the bytes written of the chunk).
    pub fn write_chunk_part(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: &[u8],
    ) -> Result<(), AccelStateError> {
        let mut core = self.core();
        let range = self.chunk_bytes(chunk, |r| {
            let start = r.start.checked_add(offset)?;
            let end = start.checked_add(data.len() as u64)?;
            (end <= r.end).then_some(start..end)
        })?;
        core.backend.write(chunk.buffer, range.start, data);
        core.mark([(chunk.buffer, range)]);
        Ok(())
    }

    /// Writes chunk `chunk` with `data`, a piece of attached file `origin` (the
    /// receiving side of a migration that sent where the chunk came from): it keeps that
    /// origin, for the VM's next migration.
    pub fn write_chunk_from_file(
        &self,
        chunk: ChunkId,
        data: &[u8],
        origin: ChunkOrigin,
    ) -> Result<(), AccelStateError> {
        self.write_chunk(chunk, data)?;
        let mut map = self.map();
        if let Some(&bytes) = map.sizes.get(&chunk.buffer) {
            if let Some(range) = chunk_range(bytes, chunk.index) {
                map.set_origins(chunk.buffer, bytes, range, origin.file, origin.offset);
            }
        }
        Ok(())
    }
}

/// A device's side of a replay migration (see [`crate::replay`]): on the source, the
/// capture (a consistent base read while the device runs on, and the log of the
/// commands run after it); on the destination, the replay; on both, the digest they
/// compare. Held by the migration without the VM's lock (its calls wait at most for the
/// command in flight).
#[derive(Clone)]
pub struct DeviceReplay {
    shared: Arc<Shared>,
}

/// The device thread is gone (see [`Accelerator::is_dead`]): a job given it would never
/// run.
struct DeviceGone;

/// Runs `f` on the device thread of `shared` (where the backend runs kernels), at its
/// next command boundary, even while the device is paused, and returns what it returns;
/// [`DeviceGone`] if the device is dead or stopping, or dies before `f` returns.
fn on_device<R: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut Core) -> R + Send + 'static,
) -> Result<R, DeviceGone> {
    let (tx, rx) = std::sync::mpsc::channel();
    let job: Job = Box::new(move |core| {
        let _ = tx.send(f(core));
    });
    let mut control = shared
        .progress
        .wait_while(relock(&shared.control), |c| {
            c.job.is_some() && c.life == Life::Live
        })
        .unwrap_or_else(PoisonError::into_inner);
    if control.life != Life::Live {
        return Err(DeviceGone);
    }
    control.job = Some(job);
    drop(control);
    shared.wake.notify_all();
    // A job the device thread drops untaken as it ends, or that panics, drops the
    // sender: then this fails.
    rx.recv().map_err(|_| DeviceGone)
}

/// Records that a replay cut short tore `shared`'s memory (see [`Life::Torn`]); called
/// on the device thread, under the core lock. A job queued meanwhile will not run: it
/// is dropped, and its caller told at once.
fn tear(shared: &Shared, torn: TornMemory) {
    let queued = {
        let mut control = relock(&shared.control);
        control.life.tear(torn);
        control.job.take()
    };
    drop(queued);
}

/// Starts a capture on `core`, at a command boundary (see
/// [`DeviceReplay::start_capture`]); failed at once unless the device is `Live`: its
/// memory may hold part of a command that is in no log (one that panicked, or was cut
/// short as the device is ended).
fn begin_capture(
    core: &Core,
    limits: CaptureLimits,
    since: Option<&[ChunkId]>,
    life: Life,
) -> (Vec<BufferState>, Vec<ChunkId>) {
    let mut map = lock_map(&core.map);
    let table = map.table();
    let base: Vec<ChunkId> = match since {
        None => map.written.marked(),
        Some(pending) => {
            let mut chunks = map.dirty.take();
            chunks.extend_from_slice(pending);
            chunks.sort_unstable();
            chunks.dedup();
            chunks
        }
    };
    let (mut chunks, mut zeros) = (Vec::new(), Vec::new());
    let mut listed = Vec::new();
    for chunk in base {
        let Some(range) = map
            .sizes
            .get(&chunk.buffer)
            .and_then(|&bytes| chunk_range(bytes, chunk.index))
        else {
            continue;
        };
        if map.written.contains(chunk) {
            chunks.push(chunk);
        } else {
            zeros.push((chunk, range.end - range.start));
        }
        listed.push(chunk);
    }
    drop(map);
    let mut capture = Capture::new(limits, chunks, zeros);
    match life {
        Life::Live => {}
        Life::Torn(torn) => capture.fail(CaptureError::Torn(torn)),
        Life::Ending | Life::Gone => capture.fail(CaptureError::DeviceGone),
    }
    *lock_capture(&core.capture) = Some(capture);
    core.capturing.store(true, Ordering::Release);
    (table, listed)
}

/// Ends `core`'s capture, at a command boundary, and says what it cost.
fn end_capture(core: &Core) -> Option<CaptureReport> {
    core.capturing.store(false, Ordering::Release);
    let capture = lock_capture(&core.capture).take()?;
    if capture.failure().is_err() {
        // Replay gives way to pre-copy, which sends what is written or dirty: a base
        // chunk of zeros never read is neither (it left the dirty set at the boundary),
        // yet the destination may hold what an earlier buffer of its id had there.
        let mut map = lock_map(&core.map);
        for chunk in capture.zeros_unread() {
            if let Some(&bytes) = map.sizes.get(&chunk.buffer) {
                if let Some(range) = chunk_range(bytes, chunk.index) {
                    map.dirty.mark(chunk.buffer, bytes, range);
                }
            }
        }
    }
    Some(capture.report())
}

impl DeviceReplay {
    /// Replays `entries` (a source's log) on this device's memory, on the device thread.
    /// The device must be paused; it stops at the first command that completes otherwise
    /// than it did there, or that would start after `deadline` (a peer's commands may
    /// not hold the device for ever). A command still running at `deadline` is cut short
    /// where it can be (an upload or a file load within one piece of it, a kernel of the
    /// cpu backend's within milliseconds): [`ReplayError::DeadlinePassed`], its outputs
    /// partly written and marked, so this device's memory is no longer the source's: it
    /// is torn for good ([`TornMemory`]), and later replays ([`ReplayError::Torn`]),
    /// digests ([`DigestError::Torn`]), captures and resumes
    /// ([`Accelerator::resume`]) of it are refused. [`ReplayError::DeviceGone`] if
    /// the device thread is gone, dies or is ended meanwhile.
    pub fn replay(
        &self,
        entries: Vec<LoggedCommand>,
        deadline: Instant,
    ) -> Result<(), ReplayError> {
        let shared = self.shared.clone();
        on_device(&self.shared, move |core| {
            // Lifted as this job ends, before the device runs anything of the guest's.
            let _deadline = core.switch.until(deadline);
            for (index, entry) in entries.iter().enumerate() {
                if Instant::now() > deadline {
                    return Err(ReplayError::OutOfTime {
                        index,
                        total: entries.len(),
                    });
                }
                let replayed = core.replay(index, entry);
                if let Err(
                    ReplayError::DeadlinePassed { index, opcode }
                    | ReplayError::FailedMidway { index, opcode, .. },
                ) = replayed
                {
                    // Under the core lock still: nothing sees the memory before it is
                    // known torn.
                    tear(&shared, TornMemory { index, opcode });
                }
                replayed?;
            }
            Ok(())
        })
        .unwrap_or_else(|DeviceGone| match relock(&self.shared.control).life {
            Life::Torn(torn) => Err(ReplayError::Torn(torn)),
            _ => Err(ReplayError::DeviceGone),
        })
    }

    /// Starts a capture at the next command boundary (waiting for the command in flight,
    /// not for the guest's ring to empty) and returns the base's buffer table and chunks;
    /// every command from then on is logged, and the device may keep running. The base
    /// is device memory as of the boundary: with `since` `None`, its written chunks (the
    /// others read as zero); with `Some(pending)`, the chunks `pending` and those dirty
    /// now (taken), of the base's buffers, for a destination that has the rest from
    /// pre-copy.
    pub fn start_capture(
        &self,
        limits: CaptureLimits,
        since: Option<&[ChunkId]>,
    ) -> (Vec<BufferState>, Vec<ChunkId>) {
        let since: Option<Arc<[ChunkId]>> = since.map(Arc::from);
        let at_boundary = since.clone();
        // On the device thread, between two commands: nothing half done.
        on_device(&self.shared, move |core| {
            begin_capture(core, limits, at_boundary.as_deref(), Life::Live)
        })
        .unwrap_or_else(|DeviceGone| {
            // No thread runs commands (past the one an ending device cuts short).
            let core = relock(&self.shared.core);
            let life = relock(&self.shared.control).life;
            begin_capture(&core, limits, since.as_deref(), life)
        })
    }

    /// Copies base chunk `chunk` into `out` as it was at the capture's boundary; `false`
    /// if it is not in the base or was read already. Each base chunk is read once.
    pub fn read_base_chunk(&self, chunk: ChunkId, out: &mut Vec<u8>) -> Result<bool, CaptureError> {
        let generation = {
            let mut guard = lock_capture(&self.shared.capture);
            let capture = guard.as_mut().ok_or(CaptureError::NotCapturing)?;
            capture.failure()?;
            match capture.peek_base_chunk(chunk) {
                Err(()) => return Ok(false),
                Ok(Some(data)) => {
                    *out = data;
                    return Ok(true);
                }
                Ok(None) => capture.generation(),
            }
        };
        // Read live without the capture lock: the read may wait for a kernel that writes
        // elsewhere in the buffer (the cpu backend locks a whole buffer for a kernel),
        // and other base reads and the device's next command need the lock meanwhile.
        // The chunk stays unread, so a command that writes it preserves it first, under
        // the capture lock, before writing (`Core::preserve_base`, in `Core::step`).
        let live = self.shared.tracker.read_chunk(chunk, out);
        let mut guard = lock_capture(&self.shared.capture);
        let capture = guard
            .as_mut()
            .filter(|c| c.generation() == generation)
            .ok_or(CaptureError::NotCapturing)?;
        capture.failure()?;
        match capture.take_base_chunk(chunk) {
            // Read meanwhile by another caller.
            Err(()) => Ok(false),
            // Preserved meanwhile: the live read may have seen the write that followed.
            Ok(Some(data)) => {
                *out = data;
                Ok(true)
            }
            // Not preserved until now, so not written before the live read ended: that
            // is the base. A read that failed all the same is an error, so the base is
            // known lost at once rather than at the switchover's digest.
            Ok(None) => match live {
                Some(_) => Ok(true),
                None => Err(CaptureError::BaseUnreadable {
                    buffer: chunk.buffer,
                    index: chunk.index,
                }),
            },
        }
    }

    /// The base chunks not read yet.
    pub fn unread_base_chunks(&self) -> Result<Vec<ChunkId>, CaptureError> {
        let guard = lock_capture(&self.shared.capture);
        let capture = guard.as_ref().ok_or(CaptureError::NotCapturing)?;
        capture.failure()?;
        Ok(capture.unread())
    }

    /// The commands logged since the last take, in order.
    pub fn take_log(&self) -> Result<Vec<LoggedCommand>, CaptureError> {
        let mut guard = lock_capture(&self.shared.capture);
        let capture = guard.as_mut().ok_or(CaptureError::NotCapturing)?;
        capture.failure()?;
        Ok(capture.take_log())
    }

    /// Ends the capture (at the next command boundary, as [`Self::start_capture`] starts
    /// one) and says what it cost.
    pub fn stop_capture(&self) -> Option<CaptureReport> {
        on_device(&self.shared, |core| end_capture(core))
            .unwrap_or_else(|DeviceGone| end_capture(&relock(&self.shared.core)))
    }

    /// About how long [`digest`](Self::digest) would take now: the bytes of the buffers
    /// not hashed since they were last written, at this machine's hashing rate. A
    /// source's digest runs in the switchover's pause, so the pause's prediction counts
    /// it. (A backend whose memory is not the host's copies it out first: slower.)
    pub fn digest_estimate(&self) -> Duration {
        let unhashed: u64 = {
            let map = self.shared.tracker.map();
            map.table()
                .iter()
                .filter(|b| !map.digests.contains_key(&b.id))
                .map(|b| b.bytes)
                .sum()
        };
        Duration::from_secs_f64(unhashed as f64 / hashing_rate())
    }

    /// Hashes the buffers written since a digest last hashed them while the device runs
    /// on, until `stop` is set: each on the device thread between two of the guest's
    /// commands (not while the device is paused), so at the guest's priority and in place
    /// of its commands. A source's switchover digest then hashes only what was written
    /// after. Buffers larger than [`DIGEST_AHEAD_MAX_BUFFER`] are left to it: hashed
    /// whole here, one would hold the guest's commands too long. Returns the bytes hashed.
    pub fn digest_ahead(&self, stop: &Arc<AtomicBool>) -> u64 {
        let unhashed: Vec<BufferId> = {
            let map = self.shared.tracker.map();
            map.table()
                .iter()
                .filter(|b| b.bytes <= DIGEST_AHEAD_MAX_BUFFER && !map.digests.contains_key(&b.id))
                .map(|b| b.id)
                .collect()
        };
        let mut hashed = 0;
        for id in unhashed {
            // At a command boundary: a command that writes the buffer forgets its CRC
            // under the core lock, which the job holds. Not while the device is paused
            // (a throttle's time is the destination's) and not after the stop (a job
            // queued before it may run in a pause, or before a switchover's digest).
            let job = |(shared, stop): (Arc<Shared>, Arc<AtomicBool>)| {
                move |_: &mut Core| {
                    if stop.load(Ordering::SeqCst) {
                        return Some(0);
                    }
                    if relock(&shared.control).pause_requested {
                        return None;
                    }
                    let tracker = &shared.tracker;
                    if tracker.map().digests.contains_key(&id) {
                        return Some(0);
                    }
                    // Not kept if unreadable (or freed): the switchover's digest reads
                    // again.
                    let Some(crc) = tracker.reader.crc32(id) else {
                        return Some(0);
                    };
                    let mut map = tracker.map();
                    let Some(&bytes) = map.sizes.get(&id) else {
                        return Some(0);
                    };
                    map.digests.insert(id, crc);
                    Some(bytes)
                }
            };
            loop {
                if stop.load(Ordering::SeqCst) {
                    return hashed;
                }
                match on_device(&self.shared, job((self.shared.clone(), stop.clone()))) {
                    Ok(Some(bytes)) => {
                        hashed += bytes;
                        break;
                    }
                    // Paused: tried again once it may run.
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                    Err(DeviceGone) => return hashed,
                }
            }
        }
        hashed
    }

    /// A digest of device memory (every buffer's id, size and contents' CRC-32). The
    /// device must be paused. It runs in a switchover's pause, so each buffer is hashed
    /// where it lies (no copy), in parts on every core, and the parts' CRCs combined.
    /// An error if a buffer cannot be read (a GPU copy failed) or the device is dead:
    /// nothing stands in for a CRC not computed, which could agree with the other side's.
    pub fn digest(&self) -> Result<DeviceDigest, DigestError> {
        let _boundary = relock(&self.shared.core);
        match relock(&self.shared.control).life {
            Life::Live => {}
            Life::Torn(torn) => return Err(DigestError::Torn(torn)),
            // Ending too: the command cut short may have written part of its outputs.
            Life::Ending | Life::Gone => return Err(DigestError::DeviceGone),
        }
        let (table, cached) = {
            let map = self.shared.tracker.map();
            (map.table(), map.digests.clone())
        };
        let reader = &self.shared.tracker.reader;
        let mut entries = Vec::with_capacity(table.len());
        for b in &table {
            if let Some(&crc) = cached.get(&b.id) {
                entries.push((b.id, b.bytes, crc));
                continue;
            }
            // Every buffer of the table exists: the core lock is held.
            let crc = match reader.crc32(b.id) {
                Some(crc) => {
                    // Kept until the buffer is next written (under the core lock, held).
                    self.shared.tracker.map().digests.insert(b.id, crc);
                    crc
                }
                // Not kept: a failure may pass, and the next digest must read again.
                None => return Err(DigestError::Unreadable { buffer: b.id }),
            };
            entries.push((b.id, b.bytes, crc));
        }
        Ok(DeviceDigest(entries))
    }
}

/// The largest buffer [`DeviceReplay::digest_ahead`] hashes: a job that long (a few
/// milliseconds on the cpu backend, more where a GPU's buffer is copied out first) holds
/// the guest's next command.
pub const DIGEST_AHEAD_MAX_BUFFER: u64 = 64 << 20;

/// Bytes a second [`crate::backend::crc32_on_every_core`] hashes on this machine,
/// measured once: the best of three hashes of 32 MiB (a few ms each), so a thread
/// preempted during one does not make every later estimate too long.
fn hashing_rate() -> f64 {
    static RATE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *RATE.get_or_init(|| {
        let bytes: Vec<u8> = (0..32u32 << 20).map(|i| (i >> 12) as u8).collect();
        let best = (0..3)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(crate::backend::crc32_on_every_core(&bytes));
                started.elapsed()
            })
            .min()
            .unwrap_or_default();
        bytes.len() as f64 / best.as_secs_f64().max(1e-6)
    })
}

/// Byte range of chunk `index` in a buffer of `bytes` bytes, if it has that chunk.
fn chunk_range(bytes: u64, index: u64) -> Option<Range<u64>> {
    let start = index.checked_mul(CHUNK_SIZE).filter(|&s| s < bytes)?;
    Some(start..(start + CHUNK_SIZE).min(bytes))
}

impl Drop for Accelerator {
    fn drop(&mut self) {
        // Its VM is gone or going: a kernel in flight has no one to read it.
        self.abort();
        if let Some(thread) = self.thread.take() {
            thread.join();
        }
    }
}
