//! The source side: handshake, pre-copy rounds, convergence with throttling, and the
//! switchover. Any failure before the destination confirms resumes the VM here.

use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{authenticate_stream_connector, Secret};
use crate::deadline::{self, Watchdog};
use crate::link::Link;
use crate::pace::{Activity, Pacer};
use crate::replay::{
    falling_behind, predicted_replay_pause, predicted_tail, CaptureLimits, DeviceDigest,
    DeviceTransfer, LoggedCommand, ReplayReport, COMMAND_BATCH, MAX_ROUND_REPLAY,
};
use crate::tls::{self, TlsConfig};
use crate::vm::{
    error_chain, ChunkKey, ChunkPart, DeviceBuffer, FileTransfer, MigrationSource, PageSet,
    VmContents, MAX_CHUNK_BYTES, MAX_FILE_PIECE, PAGE_SIZE,
};
use crate::wire::{
    peer_reason, FrameStream, FrameWriter, Message, StreamRole, Transfer, MAX_ANSWER_FRAME,
    MAX_CONTROL_BYTES, MAX_RUN_PAGES,
};
use crate::MigrationError;

pub use crate::wire::Transfer as Mode;

/// Most data streams.
pub const MAX_STREAMS: u8 = 16;
/// Data streams unless asked otherwise. With both ends and the workload sharing few
/// cores, four streams' threads get the copy more of the CPU than two: round 0 of a live
/// migration at 256 MiB ran 5-20% faster on 2 cores, and eight gained nothing more.
pub const DEFAULT_STREAMS: u8 = 4;
/// What restoring and resuming costs beyond the transfer, added to predictions.
const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(5);
/// Throttle steps: how much of the time the VM is held paused.
const THROTTLE_STEPS: [u8; 5] = [0, 30, 50, 70, 90];
/// Throttle steps while a destination's replay catches up: lighter than pre-copy's (the
/// destination needs only to be faster than the source, not the link than the device).
const REPLAY_THROTTLE_STEPS: [u8; 4] = [0, 10, 20, 30];
/// A replay round at least this long relative to the one before does not catch up fast
/// enough: the source is slowed a step.
const CATCH_UP_RATIO: f64 = 0.85;
/// Rounds taken past the point where the pause target is met, at most.
const MAX_EXTRA_ROUNDS: u32 = 3;

/// Whether one more pre-copy round is worth taking although the predicted pause already
/// meets the target: the pause is a ceiling, not the aim. The next round sends the
/// `dirty_bytes` pending at `rate` (bytes/s); meanwhile the VM dirties at `dirty_rate`.
/// Worth it if what would then be left is under four fifths of what is pending now and
/// the pause it saves is at least a millisecond.
fn worth_another_round(dirty_bytes: u64, rate: f64, dirty_rate: f64) -> bool {
    if dirty_bytes == 0 || rate <= 0.0 {
        return false;
    }
    let pending = dirty_bytes as f64;
    let round_s = pending / rate;
    let left = (dirty_rate * round_s).min(pending);
    let saved_s = (pending - left) / rate;
    left < pending * 0.8 && saved_s >= 1e-3
}
/// What a live switchover may take beyond its pause target (or beyond twice the
/// predicted pause, when a longer pause is allowed; a stop-and-copy beyond its bytes at
/// [`STOP_AND_COPY_RATE`]) before it is abandoned.
const SWITCHOVER_MARGIN: Duration = Duration::from_secs(1);

/// The least rate a stop-and-copy's pause is given to send the VM, MiB/s: below even a
/// 100 Mbit/s link's, so only a destination stalling it on purpose or a broken link runs
/// past.
pub(crate) const STOP_AND_COPY_MIB_S: u32 = 4;
/// [`STOP_AND_COPY_MIB_S`] in bytes/s.
const STOP_AND_COPY_RATE: f64 = STOP_AND_COPY_MIB_S as f64 * MIB;

/// Cancels a migration from another thread: it stops at its next step, up to the
/// moment the destination is told to run the VM, and the VM runs on at the source. A
/// handshake step waiting on the destination (connecting, authenticating, awaiting its
/// answer), or a round's data streams waiting for it to read, are woken at once: their
/// sockets are shut down.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<Cancel>);

/// What a [`CancelToken`]'s clones share.
#[derive(Default)]
struct Cancel {
    cancelled: AtomicBool,
    /// The sockets handshake steps now wait on. Set and read under this lock with the
    /// flag, so a socket is either seen cancelled when watched or shut down by `cancel`.
    waits: Mutex<Waits>,
    /// Wakes a backoff between connection attempts.
    woken: Condvar,
}

/// Watched sockets, each with the number its guard removes it by.
#[derive(Default)]
struct Waits {
    next: u64,
    sockets: Vec<(u64, TcpStream)>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// Asks the migration to stop.
    pub fn cancel(&self) {
        let waits = self.waits();
        self.0.cancelled.store(true, Ordering::SeqCst);
        for (_, socket) in &waits.sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.0.woken.notify_all();
    }

    /// Whether it was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.0.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(Cancelled)` in `phase` once cancelled.
    fn check(&self, phase: Phase) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            return Err(MigrationError::Cancelled {
                phase: phase.to_string(),
            });
        }
        Ok(())
    }

    /// Shuts `socket` down if cancelled while the guard lives, so a step blocked on it
    /// wakes; `Err(Cancelled)` in `phase` if cancelled already.
    fn watch(&self, socket: &TcpStream, phase: Phase) -> Result<Watched<'_>, MigrationError> {
        let socket = socket
            .try_clone()
            .map_err(MigrationError::io("watching for a cancel"))?;
        let mut waits = self.waits();
        self.check(phase)?;
        let id = waits.next;
        waits.next += 1;
        waits.sockets.push((id, socket));
        Ok(Watched { token: self, id })
    }

    /// Runs handshake step `step`, which blocks on `socket`, so that a cancel wakes it.
    /// A cancelled step fails as cancelled: its error is the cut socket's, not a reason.
    fn interruptible<T>(
        &self,
        socket: &TcpStream,
        step: impl FnOnce() -> Result<T, MigrationError>,
    ) -> Result<T, MigrationError> {
        let watched = self.watch(socket, Phase::Handshake)?;
        let outcome = step();
        drop(watched);
        self.check(Phase::Handshake)?;
        outcome
    }

    /// Sleeps for `time` or until cancelled.
    fn sleep(&self, time: Duration) {
        let waits = self.waits();
        let _ = self
            .0
            .woken
            .wait_timeout_while(waits, time, |_| !self.is_cancelled());
    }
}

/// A socket a cancel shuts down, until this is dropped.
struct Watched<'a> {
    token: &'a CancelToken,
    id: u64,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.token.waits().sockets.retain(|(id, _)| *id != self.id);
    }
}

/// Where a migration is, for errors that must say where it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Round(u32),
    Switchover,
    Confirmation,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Handshake => write!(f, "the handshake"),
            Self::Round(n) => write!(f, "pre-copy round {n}"),
            Self::Switchover => write!(f, "the switchover"),
            Self::Confirmation => write!(f, "the wait for the destination's confirmation"),
        }
    }
}

/// `error` as it happened in `phase`: an I/O timeout becomes [`MigrationError::TimedOut`]
/// naming the phase and `limit`; other I/O errors say the phase too.
fn in_phase(error: MigrationError, phase: Phase, limit: Duration) -> MigrationError {
    match error {
        MigrationError::Io { what, source } if deadline::is_timeout(&source) => {
            MigrationError::TimedOut {
                phase: phase.to_string(),
                what,
                limit_ms: limit.as_millis() as u64,
            }
        }
        MigrationError::Io { what, source } => MigrationError::Io {
            what: format!("{what} in {phase}"),
            source,
        },
        other => other,
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Live (pre-copy) or stop-and-copy.
    pub mode: Mode,
    /// The longest pause to switch over with: a ceiling, not the aim (pre-copy goes on
    /// for a few more rounds while each shrinks the pause further).
    pub downtime_target: Duration,
    /// Parallel data connections (1..=[`MAX_STREAMS`]).
    pub streams: u8,
    /// LZ4-compress data frames.
    pub compress: bool,
    /// Most pre-copy rounds before giving up (or switching over anyway).
    pub max_rounds: u32,
    /// Most pre-copy time before giving up (or switching over anyway).
    pub max_precopy: Duration,
    /// Throttle the VM when it dirties memory faster than the link sends it.
    pub throttle: bool,
    /// When the bounds are reached, switch over anyway with the longer pause instead of
    /// stopping with an error.
    pub allow_longer_pause: bool,
    /// Connection timeout, and the longest any read or write may wait (also how long
    /// sent data may stay unacknowledged before the kernel gives the connection up).
    pub io_timeout: Duration,
    /// Mutual TLS on every connection (the destination must serve with TLS too), under
    /// the shared-secret authentication; `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// Whether attached files the destination already has are sent anyway.
    pub files: FileTransfer,
    /// How device memory is moved: resent as it is dirtied, or replayed from the
    /// commands that dirty it (see [`crate::replay`]).
    pub device: DeviceTransfer,
    /// Bounds on the source's capture when replaying.
    pub capture: CaptureLimits,
    /// The most bytes of state per second pre-copy moves (at least
    /// [`pace::MIN_RATE`](crate::pace::MIN_RATE)): pages, device chunks, and the file
    /// pieces the destination reads itself, at their size. It spares the VM's hosts and
    /// the link at the cost of a longer migration; the final round, in the pause, is not
    /// limited. `None`: as fast as they go.
    pub max_rate: Option<u64>,
    /// Cancels the migration from another thread.
    pub cancel: CancelToken,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Live,
            downtime_target: Duration::from_millis(50),
            streams: DEFAULT_STREAMS,
            compress: false,
            max_rounds: 30,
            max_precopy: Duration::from_secs(60),
            throttle: true,
            allow_longer_pause: false,
            io_timeout: Duration::from_secs(10),
            tls: None,
            files: FileTransfer::default(),
            device: DeviceTransfer::default(),
            capture: CaptureLimits::default(),
            max_rate: None,
            cancel: CancelToken::default(),
        }
    }
}

/// Where a migration is, reported after each round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// "precopy", "switchover" or "done".
    pub phase: String,
    /// Round just finished.
    pub round: u32,
    /// Bytes sent so far on all connections.
    pub bytes_sent: u64,
    /// Bytes the last round sent.
    pub round_bytes: u64,
    /// The link's rate, MiB/s: the best any round of this migration reached (small rounds
    /// are dominated by their round trip).
    pub rate_mib_s: f64,
    /// Rate at which the VM dirtied memory during the last round, MiB/s.
    pub dirty_mib_s: f64,
    /// Bytes left to send (dirty now).
    pub dirty_bytes: u64,
    /// Predicted pause if switching over now, ms.
    pub predicted_pause_ms: f64,
    /// Throttle applied, % of time paused.
    pub throttle_pct: u8,
    /// Time since the migration started, ms.
    pub elapsed_ms: f64,
}

/// One pre-copy round, as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrecopyRound {
    /// Round number (0 sends everything).
    pub round: u32,
    /// Pages sent with contents.
    pub pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Device chunks sent with contents.
    pub chunks: u64,
    /// Device chunks sent as zero markers.
    pub zero_chunks: u64,
    /// Device chunks sent as the piece of an attached file they hold (the destination
    /// has the file).
    #[serde(default)]
    pub file_chunks: u64,
    /// Device chunks of which only the bytes written were sent.
    #[serde(default)]
    pub chunk_parts: u64,
    /// Device commands sent for replay.
    #[serde(default)]
    pub commands: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Duration, ms.
    pub ms: f64,
    /// Of which the data streams all waited for the pace (a rate ceiling), ms.
    #[serde(default)]
    pub paced_ms: f64,
    /// Throttle during the round, %.
    pub throttle_pct: u8,
}

/// What a finished migration did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    /// "live" or "stop-and-copy".
    pub mode: String,
    /// Source pause to destination resume, ms.
    pub downtime_ms: f64,
    /// Whole migration, connect to confirmation, ms.
    pub total_ms: f64,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Bytes sent on all connections.
    pub bytes_sent: u64,
    /// Bytes sent during the pause.
    pub final_bytes: u64,
    /// Highest throttle applied, %.
    pub max_throttle_pct: u8,
    /// Data connections used.
    pub streams: u8,
    /// Attached files sent (the destination lacked them, or `--files send`).
    pub files_sent: u32,
    /// Attached files the destination already had, not sent.
    pub files_reused: u32,
    /// Bytes of attached files sent.
    pub file_bytes: u64,
    /// Device chunks sent as the piece of a file the destination has (a model's
    /// weights), not as their bytes.
    #[serde(default)]
    pub chunks_from_files: u64,
    /// How device memory moved: "precopy", "replay", or "replay, then precopy" (replay
    /// gave way; [`ReplayReport::fell_back`] says why).
    #[serde(default)]
    pub device_transfer: String,
    /// What replaying the device's commands did, if it was tried.
    #[serde(default)]
    pub replay: Option<ReplayReport>,
    /// Each round.
    pub round_log: Vec<PrecopyRound>,
}

impl PrecopyRound {
    /// How long the round took without its waits for a pace, ms: what it would have
    /// taken unpaced, as the final round is.
    fn busy_ms(&self) -> f64 {
        (self.ms - self.paced_ms).max(0.0)
    }

    /// The rate the round moved its bytes at while sending (bytes/s): the time it
    /// waited for a pace is not the link's.
    fn link_rate(&self) -> f64 {
        self.bytes as f64 / (self.busy_ms() / 1e3).max(1e-6)
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Transfer::Live => "live",
        Transfer::StopAndCopy => "stop-and-copy",
    }
}

/// Of a connection's error so far and the next address's, the one to report: a refusal
/// only if every address refused, as a refusal is taken for proof that no daemon runs
/// there (see `settle`), which an address that timed out does not give.
fn kept_error(kept: Option<std::io::Error>, next: std::io::Error) -> std::io::Error {
    match kept {
        Some(kept) if kept.kind() != std::io::ErrorKind::ConnectionRefused => kept,
        _ => next,
    }
}

/// Connects to `addr`; a cancel cuts a connection attempt short.
fn connect(
    addr: &str,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<TcpStream, MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut last = None;
    for sock in addr.to_socket_addrs().map_err(err)? {
        let attempt = connect_one(sock, timeout, cancel)?;
        // An attempt a cancel cut short failed for that, whatever it says.
        cancel.check(Phase::Handshake)?;
        match attempt {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(err)?;
                stream.set_read_timeout(Some(timeout)).map_err(err)?;
                stream.set_write_timeout(Some(timeout)).map_err(err)?;
                deadline::tune(&stream, timeout).map_err(err)?;
                return Ok(stream);
            }
            Err(e) => last = Some(kept_error(last, e)),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// One connection attempt to `sock`: the outer error ends the migration (cancelled
/// before the attempt), the inner one is the attempt's. The socket is made first so a
/// cancel can shut it down while it connects, which ends the connect at once on Linux
/// (a cancel between `watch` and the connect call is seen only after it, within
/// `timeout`).
fn connect_one(
    sock: SocketAddr,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<std::io::Result<TcpStream>, MigrationError> {
    let socket = match socket2::Socket::new(
        socket2::Domain::for_address(sock),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    ) {
        Ok(socket) => TcpStream::from(socket),
        Err(e) => return Ok(Err(e)),
    };
    let _watched = cancel.watch(&socket, Phase::Handshake)?;
    Ok(socket2::SockRef::from(&socket)
        .connect_timeout(&sock.into(), timeout)
        .map(|()| socket))
}

/// One connection to the destination.
type Conn = FrameStream<Link>;

/// Write buffer of a connection: it gathers small frames (control messages, short page
/// runs); a frame at least this large (a device chunk) goes straight to the socket.
const WRITE_BUFFER: usize = 64 << 10;
/// Write buffer of a TLS connection: frames up to 1 MiB are gathered so each becomes a
/// few full records rather than one per part.
const TLS_WRITE_BUFFER: usize = 1 << 20;
/// Read buffer of a plain connection (the destination only answers).
const READ_BUFFER: usize = 8 << 10;

/// Opens and authenticates a connection; returns it with a handle on its socket (to shut
/// it down from another thread). `cancel` ends it early, as [`MigrationError::Cancelled`].
fn open_stream(
    addr: &str,
    secret: &Secret,
    role: StreamRole,
    options: &MigrationOptions,
    cancel: &CancelToken,
) -> Result<(Conn, TcpStream), MigrationError> {
    // A destination with too many connections authenticating at once (a burst of data
    // streams, several migrations to it) says so at once, or with TLS closes the
    // connection unheard: connect again, backing off.
    let mut wait = Duration::from_millis(10);
    for tries in 1.. {
        let mut unheard = false;
        let opened = open_stream_once(addr, secret, role, options, cancel, &mut unheard);
        match opened {
            Err(MigrationError::Busy(_)) if tries <= BUSY_RETRIES => {}
            Err(_) if unheard && tries <= BUSY_RETRIES => {}
            Err(MigrationError::Auth(why)) if unheard => {
                return Err(MigrationError::Auth(format!(
                    "{why}; or it is at its limit of connections authenticating at once (tried {tries} times)"
                )))
            }
            other => return other,
        }
        cancel.sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(500));
    }
    unreachable!("the tries end in a return")
}

/// Times a source connects again to a busy destination before it gives up (about 3 s of
/// waiting in all).
const BUSY_RETRIES: usize = 10;

/// One try of [`open_stream`]; `unheard` says whether a TLS destination closed the
/// connection before answering a word (see [`tls::HandshakeFailure::unheard`]).
fn open_stream_once(
    addr: &str,
    secret: &Secret,
    role: StreamRole,
    options: &MigrationOptions,
    cancel: &CancelToken,
    unheard: &mut bool,
) -> Result<(Conn, TcpStream), MigrationError> {
    let stream = connect(addr, options.io_timeout, cancel)?;
    let socket = stream
        .try_clone()
        .map_err(MigrationError::io("opening a stream"))?;
    // The whole handshake gets `io_timeout`, as the listening side's reaper gives the
    // other end: per-read timeouts alone let a peer that trickles its bytes (or keeps a
    // failed TLS handshake talking) hold this side, and a settlement waiting on it, for
    // hours.
    let watchdog = socket
        .try_clone()
        .and_then(|watched| Watchdog::arm(Instant::now() + options.io_timeout, vec![watched]))
        .map_err(MigrationError::io("opening a stream"))?;
    let opened = cancel.interruptible(&socket, || {
        let link = match &options.tls {
            None => Link::plain(stream, READ_BUFFER, WRITE_BUFFER)
                .map_err(MigrationError::io("opening a stream"))?,
            Some(tls) => Link::tls(
                tls.connect(stream).map_err(|failure| {
                    *unheard = failure.unheard;
                    MigrationError::Auth(format!("TLS handshake with {addr} failed: {failure}"))
                })?,
                TLS_WRITE_BUFFER,
            ),
        };
        let mut conn = FrameStream::new(link, options.compress);
        authenticate_stream_connector(&mut conn, secret, role).map_err(|e| {
            if options.tls.is_some() {
                tls::refused_after_handshake(e, addr)
            } else {
                e
            }
        })?;
        // Only answers come back, each small and sent at once: one trickled in is given
        // up on within two I/O timeouts of its first byte (one per KiB begun), not a
        // frame time per KiB of the protocol's largest frame (days).
        conn.limit_frames(MAX_ANSWER_FRAME);
        conn.time_frames(options.io_timeout);
        Ok(conn)
    });
    if !watchdog.disarm() && !cancel.is_cancelled() {
        return Err(MigrationError::TimedOut {
            phase: "the handshake".into(),
            what: format!("authenticating with {addr}"),
            limit_ms: options.io_timeout.as_millis() as u64,
        });
    }
    Ok((opened?, socket))
}

/// Opens an authenticated control connection to the destination at `addr` (not
/// cancellable: settling a migration in doubt must not be cut short by its cancel).
pub(crate) fn open_control(
    addr: &str,
    secret: &Secret,
    options: &MigrationOptions,
) -> Result<Conn, MigrationError> {
    open_stream(
        addr,
        secret,
        StreamRole::Control,
        options,
        &CancelToken::default(),
    )
    .map(|(conn, _)| conn)
}

/// A piece of an attached file to send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FilePiece {
    file: u32,
    offset: u64,
    len: u64,
}

/// The device buffer table a round gives the destination.
#[derive(Default)]
enum RoundTable {
    /// The table now.
    #[default]
    Current,
    /// A replay's base table: its chunks are read from the base.
    Base(Vec<DeviceBuffer>),
    /// None: the replayed commands make the table.
    Replayed,
}

/// What one round must send.
#[derive(Default)]
pub(crate) struct RoundWork {
    runs: Vec<(u64, u64)>,
    chunks: Vec<ChunkPart>,
    files: Vec<FilePiece>,
    /// Device commands to replay (sent on the control stream first).
    commands: Vec<LoggedCommand>,
    /// How much longer than the I/O timeout the destination may take to acknowledge the
    /// round: the time replaying its commands may take.
    replay_time: Duration,
    table: RoundTable,
    /// Zero pages are skipped: none was sent before, and the destination starts zeroed.
    skip_zero_pages: bool,
    /// Zero chunks are skipped, likewise.
    skip_zero_chunks: bool,
}

impl RoundWork {
    /// Round 0's work: every page and chunk of `source` (of `ram_pages` pages) that may
    /// hold data, and the files. Called once dirty tracking runs (or the VM is paused),
    /// so a page or chunk populated after the query is in a later round's dirty set.
    pub(crate) fn first<S: VmContents + ?Sized>(
        source: &S,
        ram_pages: u64,
        files: Vec<FilePiece>,
    ) -> Self {
        Self {
            runs: populated_pages(source, ram_pages).runs(MAX_RUN_PAGES),
            skip_zero_pages: true,
            ..Self::first_device(source, files)
        }
    }

    /// [`Self::first`] less RAM: every device chunk that may hold data, and the files.
    fn first_device<S: VmContents + ?Sized>(source: &S, files: Vec<FilePiece>) -> Self {
        Self {
            chunks: whole(source.populated_chunks()),
            files,
            skip_zero_chunks: true,
            ..Self::default()
        }
    }

    /// A replay round: `commands` and the RAM `pages` dirtied while they ran.
    fn replayed(pages: &PageSet, commands: Vec<LoggedCommand>, replay_time: Duration) -> Self {
        Self {
            runs: pages.runs(MAX_RUN_PAGES),
            commands,
            table: RoundTable::Replayed,
            replay_time,
            ..Self::default()
        }
    }

    fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1 * PAGE_SIZE).sum::<u64>()
            + part_bytes(&self.chunks)
            + self.files.iter().map(|p| p.len).sum::<u64>()
            + self.commands.iter().map(LoggedCommand::weight).sum::<u64>()
    }
}

/// RAM pages of `source` (of `ram_pages`) that may hold data: all if it cannot say.
fn populated_pages<S: VmContents + ?Sized>(source: &S, ram_pages: u64) -> PageSet {
    source
        .populated_pages()
        .unwrap_or_else(|| PageSet::all(ram_pages))
}

/// Every byte of `keys`.
fn whole(keys: Vec<ChunkKey>) -> Vec<ChunkPart> {
    keys.into_iter().map(ChunkPart::whole).collect()
}

/// Bytes of device memory `parts` send (a whole chunk counts as the largest).
fn part_bytes(parts: &[ChunkPart]) -> u64 {
    parts
        .iter()
        .map(|p| p.bytes.map_or(MAX_CHUNK_BYTES, |(a, b)| u64::from(b - a)))
        .sum()
}

/// How long beyond the I/O timeout the source waits for a destination replaying commands
/// that ran for `ran`: four times as long, at most [`MAX_ROUND_REPLAY`].
fn replay_allowance(ran: Duration) -> Duration {
    (ran * 4).min(MAX_ROUND_REPLAY)
}

/// The least rate at which a destination is expected to check attached files (SHA-256
/// of its own copy, or of what it received; a CPU without SHA instructions, a cold
/// disk): the source waits that long beyond its I/O timeout for the answer.
const FILE_CHECK_RATE: f64 = 100e6;

/// How long a destination may take to check `bytes` of attached files (its data streams
/// wait for the next round meanwhile, however long).
fn file_check_time(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / FILE_CHECK_RATE)
}

/// The longest one frame of a round may take a destination to apply after the round's
/// end: the largest frame's bytes at [`FILE_CHECK_RATE`] (a chunk or a run of pages read
/// from its copy of a file) and a cold disk's seek.
const FRAME_APPLY_TIME: Duration =
    Duration::from_millis(MAX_FILE_PIECE * 1000 / FILE_CHECK_RATE as u64 + 10);

/// The longest a source waits for a destination to acknowledge a round after its end,
/// however often it says it is at work: its I/O timeout, `answer_time` (replaying and
/// checking files), `frames` each applied at [`FRAME_APPLY_TIME`] (all of them, as if
/// none were applied before the end), and a keepalive period to say it is done.
fn answer_limit(io_timeout: Duration, answer_time: Duration, frames: u64) -> Duration {
    let frames = FRAME_APPLY_TIME.saturating_mul(u32::try_from(frames).unwrap_or(u32::MAX));
    io_timeout
        .saturating_add(answer_time)
        .saturating_add(frames)
        .saturating_add(crate::deadline::keepalive_every())
}

/// Runs `read` (a wait for the destination's answer on `socket`) with `extra` beyond
/// the `io_timeout` it waits otherwise. The answer's error (the destination's reason)
/// comes before the socket's.
fn with_patience<T>(
    socket: &TcpStream,
    io_timeout: Duration,
    extra: Duration,
    read: impl FnOnce() -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    if extra.is_zero() {
        return read();
    }
    read_within(socket, io_timeout, io_timeout + extra, read)
}

/// Runs `read` (a wait for the destination's answer on `socket`) with `wait` as its
/// read timeout, then puts back the `io_timeout`. The answer's error (the destination's
/// reason) comes before the socket's.
fn read_within<T>(
    socket: &TcpStream,
    io_timeout: Duration,
    wait: Duration,
    read: impl FnOnce() -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    let timeout = |t: Duration| socket.set_read_timeout(Some(t.max(Duration::from_millis(1))));
    timeout(wait).map_err(MigrationError::io("waiting for the destination"))?;
    let answer = read();
    let restored = timeout(io_timeout);
    let answer = answer?;
    restored.map_err(MigrationError::io("waiting for the destination"))?;
    Ok(answer)
}

/// The heaviest command a control message can carry (an upload's data travels in it).
const MAX_COMMAND_WEIGHT: u64 = MAX_CONTROL_BYTES as u64 - (64 << 10);

/// The pieces of the files `send` (indices into `sizes`).
fn file_pieces(sizes: &[u64], send: &[u32]) -> Vec<FilePiece> {
    let mut pieces = Vec::new();
    for &file in send {
        let size = sizes[file as usize];
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(MAX_FILE_PIECE);
            pieces.push(FilePiece { file, offset, len });
            offset += len;
        }
    }
    pieces
}

/// A round's work as the data streams share it: each takes the next run, then the next
/// chunk, until none is left, so a stream that gets less CPU than the others does not
/// hold up the round with a backlog of its own.
pub(crate) struct WorkQueue<'a> {
    work: &'a RoundWork,
    /// The buffer table sent with the round: (id, bytes), by id.
    buffers: &'a [DeviceBuffer],
    /// Once cancelled, no more work is handed out.
    cancel: &'a CancelToken,
    /// Per attached file: whether the destination has it (it is not being sent).
    destination_files: &'a [bool],
    /// Spaces out what the streams send, if the round is paced.
    pacer: Option<&'a Pacer>,
    /// When the streams were sending, to tell the link's rate from the pace's.
    activity: Activity,
    next_run: AtomicUsize,
    next_chunk: AtomicUsize,
    next_piece: AtomicUsize,
    /// Why the base could not be read (the capture failed), if it could not.
    base_lost: Mutex<Option<String>>,
    /// A stream failed: the round fails, so the others stop taking work.
    failed: std::sync::atomic::AtomicBool,
}

impl<'a> WorkQueue<'a> {
    pub(crate) fn new(
        work: &'a RoundWork,
        buffers: &'a [DeviceBuffer],
        cancel: &'a CancelToken,
        destination_files: &'a [bool],
        pacer: Option<&'a Pacer>,
    ) -> Self {
        Self {
            work,
            buffers,
            cancel,
            destination_files,
            pacer,
            activity: Activity::default(),
            next_run: AtomicUsize::new(0),
            next_chunk: AtomicUsize::new(0),
            next_piece: AtomicUsize::new(0),
            base_lost: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether no more work is handed out: the migration was cancelled or a stream failed.
    fn stopped(&self) -> bool {
        self.cancel.is_cancelled() || self.failed.load(Ordering::Relaxed)
    }

    /// Whether the round's chunks come from a replay's base.
    fn reads_base(&self) -> bool {
        matches!(self.work.table, RoundTable::Base(_))
    }

    /// The size of buffer `id` in the round's table.
    fn buffer_size(&self, id: u32) -> Option<u64> {
        self.buffers
            .binary_search_by_key(&id, |b| b.id)
            .ok()
            .map(|i| self.buffers[i].bytes)
    }

    /// Whether the destination has attached file `file` (and so can read chunks there).
    fn destination_has(&self, file: u32) -> bool {
        self.destination_files
            .get(file as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Counts `bytes` of state just sent against the round's pace, if any.
    fn sent(&self, bytes: u64) {
        let Some(pacer) = self.pacer.filter(|_| bytes > 0) else {
            return;
        };
        let now = Instant::now();
        let due = pacer.reserve(now, bytes);
        if due > now {
            self.activity.rest(now);
            std::thread::sleep(due - now);
            self.activity.resume(Instant::now());
        }
    }

    fn next_piece(&self) -> Option<FilePiece> {
        if self.stopped() {
            return None;
        }
        let i = self.next_piece.fetch_add(1, Ordering::Relaxed);
        self.work.files.get(i).copied()
    }

    fn next_run(&self) -> Option<(u64, u64)> {
        if self.stopped() {
            return None;
        }
        let i = self.next_run.fetch_add(1, Ordering::Relaxed);
        self.work.runs.get(i).copied()
    }

    fn next_chunk(&self) -> Option<ChunkPart> {
        if self.stopped() {
            return None;
        }
        let i = self.next_chunk.fetch_add(1, Ordering::Relaxed);
        self.work.chunks.get(i).copied()
    }
}

/// The result of a data stream's thread, `what` it was doing. A panic (a bug, here or in
/// the source) fails the migration like any error, so the VM runs on here.
fn joined<T>(
    handle: std::thread::ScopedJoinHandle<'_, Result<T, MigrationError>>,
    what: &str,
) -> Result<T, MigrationError> {
    handle
        .join()
        .unwrap_or_else(|_| Err(MigrationError::StreamPanicked(what.to_string())))
}

fn is_zero(bytes: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { bytes.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[derive(Default)]
pub(crate) struct StreamCounts {
    pub(crate) pages: u64,
    zero_pages: u64,
    pub(crate) chunks: u64,
    zero_chunks: u64,
    pub(crate) file_chunks: u64,
    chunk_parts: u64,
    /// Chunks sent with their origin: the destination reads each again from its copy
    /// of the file once the round's frames are in.
    claimed_chunks: u64,
}

/// What a data stream reads into before sending, kept across rounds (the final round,
/// during the pause, allocates nothing).
#[derive(Default)]
pub(crate) struct StreamBuffers {
    /// A run of pages, or a piece of a file.
    pages: Vec<u8>,
    /// A device chunk, copied out so the device's buffer is never locked during I/O.
    chunk: Vec<u8>,
}

/// Sends a whole device chunk `data`: its bytes, or a zero chunk's length alone (nothing
/// at all where the destination's memory is known to be zero).
fn send_whole_chunk<W: std::io::Write>(
    writer: &mut FrameWriter<W>,
    queue: &WorkQueue<'_>,
    counts: &mut StreamCounts,
    key: ChunkKey,
    data: &[u8],
) -> Result<(), MigrationError> {
    if !is_zero(data) {
        counts.chunks += 1;
        writer.send_chunk(key, data.len() as u64, Some(data))?;
        queue.sent(data.len() as u64);
    } else if !queue.work.skip_zero_chunks {
        counts.zero_chunks += 1;
        writer.send_chunk(key, data.len() as u64, None)?;
    }
    Ok(())
}

/// Sends what it takes from `queue` on one stream: runs of pages (split around zero
/// pages), then chunks.
pub(crate) fn send_share<W: std::io::Write, S: VmContents + ?Sized>(
    source: &S,
    writer: &mut FrameWriter<W>,
    buffers: &mut StreamBuffers,
    queue: &WorkQueue<'_>,
) -> Result<StreamCounts, MigrationError> {
    let skip_zeros = queue.work.skip_zero_pages;
    let mut counts = StreamCounts::default();
    let page_buffer = &mut buffers.pages;
    page_buffer.resize((MAX_RUN_PAGES * PAGE_SIZE) as usize, 0);
    while let Some((first, pages)) = queue.next_run() {
        let bytes = &mut page_buffer[..(pages * PAGE_SIZE) as usize];
        source
            .read_ram(first * PAGE_SIZE, bytes)
            .map_err(MigrationError::Source)?;
        // Split the run into maximal sub-runs of non-zero and of zero pages (each page
        // is scanned once).
        let page_bytes = PAGE_SIZE as usize;
        let mut zero_flags = [false; MAX_RUN_PAGES as usize];
        let zero = &mut zero_flags[..pages as usize];
        for (z, page) in zero.iter_mut().zip(bytes.chunks_exact(page_bytes)) {
            *z = is_zero(page);
        }
        let mut i = 0;
        while i < zero.len() {
            let j = i + zero[i..].iter().take_while(|&&z| z == zero[i]).count();
            let gpa = (first + i as u64) * PAGE_SIZE;
            let n = (j - i) as u64;
            if !zero[i] {
                writer.send_ram(gpa, n, Some(&bytes[i * page_bytes..j * page_bytes]))?;
                counts.pages += n;
                queue.sent(n * PAGE_SIZE);
            } else if !skip_zeros {
                writer.send_ram(gpa, n, None)?;
                counts.zero_pages += n;
            }
            i = j;
        }
    }
    if queue.reads_base() {
        while let Some(ChunkPart { key, .. }) = queue.next_chunk() {
            // A base chunk, as it was at the capture's boundary (its buffer in the base's
            // table). Once the capture failed, the rest is skipped: replay gives way.
            match source.read_base_chunk(key, &mut buffers.chunk) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    let mut lost = queue.base_lost.lock().unwrap_or_else(|p| p.into_inner());
                    lost.get_or_insert_with(|| error_chain(&e));
                    continue;
                }
            }
            send_whole_chunk(writer, queue, &mut counts, key, &buffers.chunk)?;
        }
    }
    while let Some(ChunkPart { key, bytes }) = queue.next_chunk() {
        if let Some((start, end)) = bytes {
            // Only these bytes changed since the chunk was sent (the destination has the
            // rest): a KV cache's new row, not its chunk. Skipped like a whole chunk if
            // its buffer changed since the round's table.
            let size = source.read_chunk(key, &mut buffers.chunk);
            if size.is_none() || size != queue.buffer_size(key.buffer) {
                continue;
            }
            if let Some(part) = buffers.chunk.get(start as usize..end as usize) {
                if !part.is_empty() {
                    counts.chunk_parts += 1;
                    writer.send_chunk_part(key, u64::from(start), part)?;
                    queue.sent(part.len() as u64);
                }
            }
            continue;
        }
        // A chunk of a buffer freed, or freed and made again with another size, since
        // the round's buffer table was sent is skipped: the next round's table drops or
        // remakes the buffer at the destination, and the new buffer's written chunks are
        // dirty.
        // A chunk holding a piece of a file the destination has: where, not what. (Its
        // origin is read before any later write clears it; such a write also marks the
        // chunk dirty, and the next round sends it again.)
        let piece = source
            .file_chunk(key)
            .filter(|p| Some(p.buffer_bytes) == queue.buffer_size(key.buffer));
        if let Some(p) = piece.filter(|p| queue.destination_has(p.origin.file)) {
            counts.file_chunks += 1;
            writer.send_chunk_origin(key, p.len, p.origin)?;
            // The destination reads these bytes itself: work at that end all the same.
            queue.sent(p.len);
            continue;
        }
        let origin = piece.map(|p| p.origin);
        let size = source.read_chunk(key, &mut buffers.chunk);
        if size.is_none() || size != queue.buffer_size(key.buffer) {
            continue;
        }
        let data = &buffers.chunk;
        if let Some(origin) = origin {
            // The destination is receiving the file: the bytes, and what they are, so its
            // next migration of the VM can send where.
            counts.chunks += 1;
            counts.claimed_chunks += 1;
            writer.send_chunk_with_origin(key, data, origin)?;
            queue.sent(data.len() as u64);
        } else {
            send_whole_chunk(writer, queue, &mut counts, key, data)?;
        }
    }
    // A file piece is read into the page buffer.
    const _: () = assert!(MAX_FILE_PIECE <= MAX_RUN_PAGES * PAGE_SIZE);
    while let Some(piece) = queue.next_piece() {
        let bytes = &mut page_buffer[..piece.len as usize];
        source
            .read_file(piece.file, piece.offset, bytes)
            .map_err(MigrationError::Source)?;
        writer.send_file(piece.file, piece.offset, bytes)?;
        queue.sent(piece.len);
    }
    writer.flush()?;
    queue.activity.rest(Instant::now());
    Ok(counts)
}

struct Session<'a> {
    source: &'a dyn MigrationSource,
    /// What the caller asked for.
    options: &'a MigrationOptions,
    control: Conn,
    /// Every connection's socket (control first), to shut them all at a deadline.
    sockets: Vec<TcpStream>,
    /// Where the migration is.
    phase: Phase,
    /// The session the destination gave it.
    session: u64,
    /// The switchover's deadline, once armed, and whether it fired.
    watchdog: Option<Watchdog>,
    /// The data connections (only written).
    data: Vec<Conn>,
    /// What each data stream reads into.
    buffers: Vec<StreamBuffers>,
    /// Pages of guest RAM.
    ram_pages: u64,
    started: Instant,
    /// Every round sent so far (its length is the next round's number).
    round_log: Vec<PrecopyRound>,
    /// The pause the last pre-copy round predicted.
    predicted_pause: Duration,
    /// Per attached file: whether the destination has it (it is not being sent).
    destination_files: Vec<bool>,
    /// Whether the destination agreed to replay device commands.
    replay_agreed: bool,
    /// Why a replay's base could not be read, once it could not.
    base_lost: Option<String>,
    /// What replay did, once tried.
    replay: Option<ReplayReport>,
    /// When device commands were last taken, while replaying.
    commands_taken_at: Option<Instant>,
    /// Paces pre-copy, if its rate is limited.
    pacer: Option<Pacer>,
}

/// How long after the pause a switchover may take before it is abandoned: the pause
/// target (or twice the predicted pause, if a longer one is allowed; a stop-and-copy's
/// predicted pause, its bytes at [`STOP_AND_COPY_RATE`]) plus a margin.
fn switchover_deadline(options: &MigrationOptions, predicted: Duration) -> Duration {
    let expected = if options.mode == Transfer::StopAndCopy {
        predicted
    } else if options.allow_longer_pause {
        options.downtime_target.max(predicted * 2)
    } else {
        options.downtime_target
    };
    expected + SWITCHOVER_MARGIN
}

impl Session<'_> {
    /// How long the source took to run the commands taken now (since the last take).
    fn commands_ran(&mut self) -> Duration {
        let now = Instant::now();
        self.commands_taken_at
            .replace(now)
            .map_or(Duration::ZERO, |at| now - at)
    }

    fn cancelled(&self) -> Result<(), MigrationError> {
        self.options.cancel.check(self.phase)
    }

    /// Rounds sent so far.
    fn rounds(&self) -> u32 {
        self.round_log.len() as u32
    }

    fn bytes_sent(&self) -> u64 {
        self.control.writer.bytes + self.data.iter().map(|c| c.writer.bytes).sum::<u64>()
    }

    /// Sends one round over the data streams in parallel and waits until the destination
    /// has applied it. Its commands are moved onto the wire (`work` keeps none).
    fn send_round(
        &mut self,
        work: &mut RoundWork,
        throttle_pct: u8,
    ) -> Result<PrecopyRound, MigrationError> {
        let started = Instant::now();
        let before = self.bytes_sent();
        let round = self.rounds();
        if self.phase != Phase::Switchover {
            self.phase = Phase::Round(round);
        }
        self.cancelled()?;
        let mut buffers = match &work.table {
            RoundTable::Current => self.source.device_buffers(),
            RoundTable::Base(table) => table.clone(),
            RoundTable::Replayed => Vec::new(),
        };
        buffers.sort_unstable_by_key(|b| b.id);
        self.control.send(&Message::BeginRound {
            round,
            buffers: match work.table {
                RoundTable::Replayed => None,
                _ => Some(buffers.clone()),
            },
        })?;
        // The commands first; the destination replays them once the round's data is in.
        let commands = std::mem::take(&mut work.commands);
        let command_count = commands.len() as u64;
        if !commands.is_empty() {
            let report = self.replay.get_or_insert_with(ReplayReport::default);
            report.commands += command_count;
            report.command_bytes += commands.iter().map(LoggedCommand::weight).sum::<u64>();
        }
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for command in commands {
            if !batch.is_empty() && batch_bytes + command.weight() > COMMAND_BATCH {
                self.control.send(&Message::Commands {
                    commands: std::mem::take(&mut batch),
                })?;
                batch_bytes = 0;
            }
            batch_bytes += command.weight();
            batch.push(command);
        }
        if !batch.is_empty() {
            self.control.send(&Message::Commands { commands: batch })?;
        }
        let work = &*work;
        // The pause is never paced.
        let pacer = self
            .pacer
            .as_ref()
            .filter(|_| self.phase != Phase::Switchover);
        let queue = WorkQueue::new(
            work,
            &buffers,
            &self.options.cancel,
            &self.destination_files,
            pacer,
        );
        // A destination that reads slowly holds a data stream's write for as long as each
        // piece it takes comes within the I/O timeout: a cancel shuts the streams, so it
        // ends the round at once rather than at the next frame.
        let _watched = (self.sockets[1..].iter())
            .map(|socket| self.options.cancel.watch(socket, self.phase))
            .collect::<Result<Vec<_>, _>>()?;
        queue.activity.start(self.data.len());
        let frames_before: Vec<u64> = self.data.iter().map(|c| c.writer.frames).collect();
        let source = self.source;
        let control = &mut self.control;
        let keepalive_every = crate::deadline::keepalive_every();
        let mut keepalive = Ok(());
        let results: Vec<Result<StreamCounts, MigrationError>> = std::thread::scope(|scope| {
            // Each thread holds a sender until it ends: the channel closes once all have.
            let (running, finished) = std::sync::mpsc::channel::<()>();
            let handles: Vec<_> = self
                .data
                .iter_mut()
                .zip(self.buffers.iter_mut())
                .zip(&frames_before)
                .map(|((conn, buffers), &before)| {
                    let (writer, queue, running) = (&mut conn.writer, &queue, running.clone());
                    scope.spawn(move || {
                        let _running = running;
                        let sent = send_share(source, writer, buffers, queue).and_then(|sent| {
                            // A stream with nothing to carry this round says it is still
                            // there, or after rounds without (replay rounds carry a few
                            // pages, on one stream) and a destination's replay, it would
                            // be taken for a dead one.
                            if writer.frames == before {
                                writer.send(&Message::Keepalive)?;
                            }
                            Ok(sent)
                        });
                        if sent.is_err() {
                            queue.failed.store(true, Ordering::Relaxed);
                        }
                        sent
                    })
                })
                .collect();
            drop(running);
            // A long round (a low rate ceiling, a large pause) says it is at work, or the
            // destination would take the silent control connection for a dead source.
            let mut next_keepalive = Instant::now() + keepalive_every;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(next_keepalive.saturating_duration_since(Instant::now()))
            {
                next_keepalive = Instant::now() + keepalive_every;
                if let Err(e) = control.send(&Message::Keepalive) {
                    queue.failed.store(true, Ordering::Relaxed);
                    keepalive = Err(e);
                }
            }
            handles.into_iter().map(|h| joined(h, "sending")).collect()
        });
        keepalive?;
        let paced = queue.activity.idle();
        if let Some(why) = queue
            .base_lost
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
        {
            self.base_lost.get_or_insert(why);
        }
        self.cancelled()?;
        let mut total = StreamCounts::default();
        for r in results {
            let c = r?;
            total.pages += c.pages;
            total.zero_pages += c.zero_pages;
            total.chunks += c.chunks;
            total.zero_chunks += c.zero_chunks;
            total.file_chunks += c.file_chunks;
            total.chunk_parts += c.chunk_parts;
            total.claimed_chunks += c.claimed_chunks;
        }
        let frames: Vec<u64> = self
            .data
            .iter()
            .zip(frames_before)
            .map(|(c, before)| c.writer.frames - before)
            .collect();
        let frame_count = frames.iter().sum::<u64>() + total.claimed_chunks;
        self.control.send(&Message::EndRound { round, frames })?;
        // The destination acknowledges a round of commands once it replayed them, and one
        // that carried files once it checked them. Before, it applies the round's frames,
        // which may take long after their last one came (chunks it reads from its copy of a
        // file: a few bytes each on the wire); meanwhile it says so every keepalive period.
        // A destination that says so for ever is given up on past the longest all of that
        // may take.
        let answer_time =
            work.replay_time + file_check_time(work.files.iter().map(|f| f.len).sum());
        let limit = answer_limit(self.options.io_timeout, answer_time, frame_count);
        let ceiling = Instant::now() + limit;
        let overdue = |keepalives| MigrationError::RoundApplyDeadline {
            round,
            limit_ms: limit.as_millis() as u64,
            keepalives,
        };
        let mut patience = self.options.io_timeout + answer_time;
        let mut keepalives = 0;
        let acknowledged = loop {
            let left = ceiling.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(overdue(keepalives));
            }
            let wait = patience.min(left);
            let answer = read_within(&self.sockets[0], self.options.io_timeout, wait, || {
                self.control.expect_control("the round's acknowledgement")
            });
            match answer {
                // The wait may be long: a cancel ends it at the next keepalive.
                Ok(Message::Keepalive) => {
                    self.cancelled()?;
                    keepalives += 1;
                    patience =
                        self.options.io_timeout + answer_time + crate::deadline::keepalive_every();
                }
                Ok(answer) => break answer,
                Err(MigrationError::Io { source, .. })
                    if wait < patience && deadline::is_timeout(&source) =>
                {
                    return Err(overdue(keepalives))
                }
                Err(e) => return Err(e),
            }
        };
        match acknowledged {
            Message::RoundApplied { round: r } if r == round => {}
            other => {
                return Err(MigrationError::unexpected(
                    &format!("round {round} applied"),
                    &other,
                ))
            }
        }
        tracing::debug!(
            round,
            ms = ms(self.started.elapsed()),
            round_ms = ms(started.elapsed()),
            "round applied"
        );
        let log = PrecopyRound {
            round,
            pages: total.pages,
            zero_pages: total.zero_pages,
            chunks: total.chunks,
            zero_chunks: total.zero_chunks,
            file_chunks: total.file_chunks,
            chunk_parts: total.chunk_parts,
            commands: command_count,
            bytes: self.bytes_sent() - before,
            ms: ms(started.elapsed()),
            paced_ms: ms(paced),
            throttle_pct,
        };
        self.round_log.push(log.clone());
        Ok(log)
    }

    #[allow(clippy::too_many_arguments)]
    fn progress(
        &self,
        phase: &'static str,
        log: &PrecopyRound,
        dirty_bytes: u64,
        rate: f64,
        dirty_rate: f64,
        predicted: Duration,
        throttle_pct: u8,
    ) -> Progress {
        Progress {
            phase: phase.into(),
            round: log.round,
            bytes_sent: self.bytes_sent(),
            round_bytes: log.bytes,
            rate_mib_s: rate / MIB,
            dirty_mib_s: dirty_rate / MIB,
            dirty_bytes,
            predicted_pause_ms: ms(predicted),
            throttle_pct,
            elapsed_ms: ms(self.started.elapsed()),
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A duration in milliseconds, as reports and logs give them.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Pages and chunks dirtied since the last take, added to `pending` (what an earlier
/// take found and no round has sent yet).
fn take_dirty(
    source: &dyn MigrationSource,
    pending: Option<Pending>,
) -> Result<Pending, MigrationError> {
    let mut pages: PageSet = source.take_dirty_pages().map_err(MigrationError::Source)?;
    let mut chunks = source.take_dirty_parts();
    let mut ram_unsent = false;
    if let Some(earlier) = pending {
        pages.union_with(&earlier.pages);
        chunks.extend(earlier.chunks);
        ram_unsent = earlier.ram_unsent;
    }
    ChunkPart::merge(&mut chunks);
    Ok(Pending {
        pages,
        chunks,
        ram_unsent,
    })
}

/// Dirty state found by a take and not yet sent.
struct Pending {
    pages: PageSet,
    chunks: Vec<ChunkPart>,
    /// No page of RAM was sent yet (see [`RamCopy::AfterRound0`]): zero pages are
    /// skipped.
    ram_unsent: bool,
}

impl Pending {
    fn to_work(&self) -> RoundWork {
        RoundWork {
            runs: self.pages.runs(MAX_RUN_PAGES),
            chunks: self.chunks.clone(),
            skip_zero_pages: self.ram_unsent,
            ..RoundWork::default()
        }
    }
}

/// Migrates the VM `source` to the host listening for migrations at `addr`.
///
/// On success the VM runs on the destination and `source` is left paused: the caller
/// releases it. On error the VM runs on `source` again (unless the error is
/// [`MigrationError::InDoubt`], where it stays paused) and the destination has discarded
/// what it received.
pub fn migrate_vm(
    source: &dyn MigrationSource,
    addr: &str,
    secret: &Secret,
    options: &MigrationOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    if options.mode == Mode::StopAndCopy && options.device == DeviceTransfer::Replay {
        return Err(MigrationError::InvalidOptions(
            "device command replay is a live migration's; stop-and-copy sends device memory in the pause".into(),
        ));
    }
    if options.capture.log_bytes > crate::receive::MAX_ROUND_COMMAND_BYTES / 2 {
        return Err(MigrationError::InvalidOptions(format!(
            "the command log bound is at most {} bytes (a destination takes {} in a round, and the last round carries two takes)",
            crate::receive::MAX_ROUND_COMMAND_BYTES / 2,
            crate::receive::MAX_ROUND_COMMAND_BYTES
        )));
    }
    if !(1..=MAX_STREAMS).contains(&options.streams) {
        return Err(MigrationError::InvalidOptions(format!(
            "--streams must be 1 to {MAX_STREAMS}, got {}",
            options.streams
        )));
    }
    // Before anything is sent: a destination holding the recorded content would fill
    // the VM from it, not from the changed file the VM runs with here.
    source.check_files().map_err(MigrationError::Source)?;
    let started = Instant::now();
    // The handshake's waits on the destination (which may take minutes to check large
    // files) end at once on a cancel; nothing is paused or tracked yet to undo.
    let cancel = &options.cancel;
    let (mut control, control_socket) =
        open_stream(addr, secret, StreamRole::Control, options, cancel)
            .map_err(|e| in_phase(e, Phase::Handshake, options.io_timeout))?;
    let vm = source.describe();
    let ram_pages = vm.ram_size / PAGE_SIZE;
    let file_sizes: Vec<u64> = vm.files.iter().map(|f| f.size).collect();
    // The destination checks the files it has before it answers.
    let checking = file_check_time(file_sizes.iter().sum());
    let answer = cancel
        .interruptible(&control_socket, || {
            control.send(&Message::Offer {
                vm,
                streams: options.streams,
                transfer: options.mode,
                files: options.files,
                device: options.device,
            })?;
            with_patience(&control_socket, options.io_timeout, checking, || {
                control.expect_control("the destination's answer")
            })
        })
        .map_err(|e| in_phase(e, Phase::Handshake, options.io_timeout))?;
    let (session, send_files, replay_agreed) = match answer {
        Message::Accept {
            session,
            send_files,
            replay,
        } => (session, send_files, replay),
        Message::Refuse { reason } => return Err(MigrationError::Refused(peer_reason(&reason))),
        // Receiving as many migrations (or replaying ones) as it takes: not retried
        // here, as one ends in minutes, but reported as the passing state it is.
        Message::Busy { reason } => return Err(MigrationError::Busy(peer_reason(&reason))),
        other => return Err(MigrationError::unexpected("accept or refuse", &other)),
    };
    let mut asked: Vec<u32> = send_files.clone();
    asked.sort_unstable();
    asked.dedup();
    let expected_len = match options.files {
        FileTransfer::Send => Some(file_sizes.len()),
        FileTransfer::Require => Some(0),
        FileTransfer::Reuse => None,
    };
    if asked.len() != send_files.len()
        || asked.iter().any(|&f| f as usize >= file_sizes.len())
        || expected_len.is_some_and(|n| n != asked.len())
    {
        return Err(MigrationError::BrokenSequence(format!(
            "the destination asked for attached files {send_files:?} of {} ({:?} transfer)",
            file_sizes.len(),
            options.files
        )));
    }
    let files = file_pieces(&file_sizes, &send_files);
    tracing::debug!(ms = ms(started.elapsed()), "offer accepted");
    // In parallel: each costs a connection and an authentication's round trips.
    let data = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..options.streams)
            .map(|index| {
                scope.spawn(move || {
                    let role = StreamRole::Data { session, index };
                    open_stream(addr, secret, role, options, cancel)
                })
            })
            .collect();
        opening
            .into_iter()
            .map(|h| joined(h, "opening"))
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|e| in_phase(e, Phase::Handshake, options.io_timeout))?;
    tracing::debug!(ms = ms(started.elapsed()), "data streams open");
    let (data, data_sockets): (Vec<Conn>, Vec<TcpStream>) = data.into_iter().unzip();
    let mut s = Session {
        source,
        options,
        control,
        sockets: std::iter::once(control_socket)
            .chain(data_sockets)
            .collect(),
        phase: Phase::Handshake,
        session,
        watchdog: None,
        buffers: data.iter().map(|_| StreamBuffers::default()).collect(),
        ram_pages,
        data,
        started,
        round_log: Vec::new(),
        predicted_pause: Duration::ZERO,
        destination_files: (0..file_sizes.len() as u32)
            .map(|f| !send_files.contains(&f))
            .collect(),
        replay_agreed: replay_agreed && options.mode == Mode::Live,
        base_lost: None,
        replay: None,
        commands_taken_at: None,
        pacer: options.max_rate.map(Pacer::new),
    };
    if options.device == DeviceTransfer::Replay && !s.replay_agreed {
        return Err(MigrationError::BrokenSequence(
            "the destination accepted the VM without agreeing to replay its device commands".into(),
        ));
    }
    let outcome = run(&mut s, files, progress);
    source.set_throttle(0);
    source.stop_tracking();
    if let Some(capture) = source.stop_capture() {
        s.replay.get_or_insert_with(ReplayReport::default).capture = capture;
    }
    match outcome {
        Ok(Switched {
            downtime,
            final_bytes,
        }) => Ok(MigrationReport {
            mode: mode_name(options.mode).into(),
            downtime_ms: ms(downtime),
            total_ms: ms(started.elapsed()),
            rounds: s.rounds(),
            bytes_sent: s.bytes_sent(),
            final_bytes,
            // Every throttle step is followed by a round at that step before switchover.
            max_throttle_pct: s
                .round_log
                .iter()
                .map(|r| r.throttle_pct)
                .max()
                .unwrap_or(0),
            streams: options.streams,
            files_sent: send_files.len() as u32,
            files_reused: (file_sizes.len() - send_files.len()) as u32,
            file_bytes: send_files.iter().map(|&f| file_sizes[f as usize]).sum(),
            chunks_from_files: s.round_log.iter().map(|r| r.file_chunks).sum(),
            device_transfer: match &s.replay {
                None => "precopy",
                Some(r) if r.fell_back.is_some() => "replay, then precopy",
                Some(_) => "replay",
            }
            .into(),
            replay: s.replay,
            round_log: s.round_log,
        }),
        Err(Failure::InDoubt(e)) => Err(e),
        Err(Failure::BeforeGo { error, paused }) => {
            let mut error = match &s.watchdog {
                Some(dog) if dog.fired() => MigrationError::SwitchoverDeadline {
                    deadline_ms: switchover_deadline(options, s.predicted_pause).as_millis() as u64,
                    target_ms: options.downtime_target.as_millis() as u64,
                },
                _ => in_phase(error, s.phase, options.io_timeout),
            };
            // Before Go the destination cannot run the VM: it runs here again first, not
            // after a silent destination's reason was waited for.
            let resumed = if paused { source.resume() } else { Ok(()) };
            // A destination that fails mid-round cuts the data streams and says why on
            // the control stream: report its reason rather than the cut.
            if matches!(error, MigrationError::Io { .. }) {
                if let Err(MigrationError::PeerAborted(reason)) =
                    s.control.expect_control("the destination's reason")
                {
                    error = MigrationError::PeerAborted(reason);
                }
            }
            let _ = s.control.send(&Message::Abort {
                reason: error_chain(&error),
            });
            resumed.map_err(|resume| MigrationError::ResumeAfterFailure {
                failed: error_chain(&error),
                resume,
            })?;
            Err(error)
        }
    }
}

struct Switched {
    downtime: Duration,
    final_bytes: u64,
}

enum Failure {
    /// Before `Go`: the source may run again.
    BeforeGo { error: MigrationError, paused: bool },
    /// After `Go` without confirmation.
    InDoubt(MigrationError),
}

fn before_go(paused: bool) -> impl Fn(MigrationError) -> Failure {
    move |error| Failure::BeforeGo { error, paused }
}

/// How the live rounds ended: what the final round, in the pause, must add to what it
/// takes then.
enum LiveEnd {
    /// Pre-copy converged; what its last take found is unsent.
    Precopy(Pending),
    /// Replay converged; the pages and commands its last take found are unsent.
    Replay(PageSet, Vec<LoggedCommand>, Duration),
}

/// How the pre-copy rounds ended.
enum PrecopyEnd {
    /// The pause would now meet the target.
    Converged(Pending),
    /// The device dirties memory faster than the link resends it: replay instead (auto).
    ToReplay(Pending),
}

/// Where a replay starts.
enum ReplayStart {
    /// From the first round: the base is all device memory, with the files and RAM.
    Fresh(Vec<FilePiece>),
    /// From pre-copy: the destination holds the device memory except the chunks pending.
    AfterPrecopy(Pending),
}

/// How the replay rounds ended.
enum ReplayEnd {
    /// With the pages and commands of the last take, and how long those commands ran.
    Converged(PageSet, Vec<LoggedCommand>, Duration),
    /// Replay gave way (the reason is in the report): pre-copy goes on from this work.
    FellBack(RoundWork),
}

/// Runs the migration; `files` are the pieces of the attached files to send, which go
/// with the first round, while the VM runs (in stop-and-copy too: they are read-only).
fn run(
    s: &mut Session<'_>,
    files: Vec<FilePiece>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Switched, Failure> {
    let source = s.source;
    let options = s.options;
    if options.mode == Transfer::StopAndCopy {
        if !files.is_empty() {
            let mut work = RoundWork {
                files,
                ..RoundWork::default()
            };
            let log = s.send_round(&mut work, 0).map_err(before_go(false))?;
            progress(&s.progress("precopy", &log, 0, 0.0, 0.0, Duration::ZERO, 0));
        }
        s.cancelled().map_err(before_go(false))?;
        let pause_at = source
            .pause()
            .map_err(|e| before_go(false)(MigrationError::Source(e)))?;
        // The whole transfer happens in this pause: a destination that takes it slowly
        // (each piece within the I/O timeout) must not hold the VM paused for long.
        s.phase = Phase::Switchover;
        let mut work = round0(s, Vec::new());
        s.predicted_pause = Duration::from_secs_f64(work.bytes() as f64 / STOP_AND_COPY_RATE);
        arm_switchover_deadline(s, pause_at)?;
        let log = s.send_round(&mut work, 0).map_err(before_go(true))?;
        progress(&s.progress("switchover", &log, 0, 0.0, 0.0, Duration::ZERO, 0));
        return finish(s, pause_at, None);
    }
    source
        .start_device_tracking()
        .map_err(|e| before_go(false)(MigrationError::Source(e)))?;
    let replay_from = |s: &mut Session<'_>, start, progress: &mut dyn FnMut(&Progress)| {
        Ok(match replay_rounds(s, start, progress)? {
            ReplayEnd::Converged(pages, commands, ran) => LiveEnd::Replay(pages, commands, ran),
            ReplayEnd::FellBack(work) => precopy_after_replay(s, work, progress)?,
        })
    };
    let replay_now = s.replay_agreed && options.device == DeviceTransfer::Replay;
    let too_long = replay_now
        .then(|| digest_outlasts_target(source.device_digest_estimate(), options))
        .flatten();
    let mut end = if replay_now && too_long.is_none() {
        start_ram_tracking(source).map_err(before_go(false))?;
        replay_from(s, ReplayStart::Fresh(files), progress)?
    } else if let Some(why) = too_long {
        start_ram_tracking(source).map_err(before_go(false))?;
        // Given way before it began: the device memory goes by pre-copy from the start.
        gave_way(s, why);
        precopy_after_replay(s, round0(s, files), progress)?
    } else {
        let auto = s.replay_agreed && options.device == DeviceTransfer::Auto;
        let (work, ram) = precopy_round0(s, files).map_err(before_go(false))?;
        match precopy_rounds(s, work, ram, auto, progress)? {
            PrecopyEnd::Converged(pending) => LiveEnd::Precopy(pending),
            PrecopyEnd::ToReplay(pending) => {
                replay_from(s, ReplayStart::AfterPrecopy(pending), progress)?
            }
        }
    };
    // Once more only if the replay's tail, found in the pause, gives way to pre-copy.
    let (pause_at, digest) = loop {
        source.set_throttle(0);
        s.cancelled().map_err(before_go(false))?;
        let pause_at = pause_for_switchover(s)?;
        let digest = match end {
            LiveEnd::Precopy(pending) => {
                // What the last take found is still unsent: the final round sends it too.
                let mut work = take_dirty(source, Some(pending))
                    .map_err(before_go(true))?
                    .to_work();
                tracing::debug!(
                    ms = ms(s.started.elapsed()),
                    bytes = work.bytes(),
                    "final dirty state taken"
                );
                let log = s.send_round(&mut work, 0).map_err(before_go(true))?;
                progress(&s.progress("switchover", &log, 0, 0.0, 0.0, Duration::ZERO, 0));
                None
            }
            LiveEnd::Replay(mut pages, mut commands, ran) => {
                // The tail: what ran since the last take. If it cannot be replayed (the
                // capture overflowed just now, an upload too large for a message), the VM
                // runs on and pre-copy takes over, as in the rounds: what the tail wrote is
                // in the device's dirty log.
                let tail = match replayable_tail(source) {
                    Ok(tail) => tail,
                    Err(why) => {
                        resume_for_precopy(s)?;
                        let ReplayEnd::FellBack(work) = fall_back(s, why, &pages) else {
                            unreachable!("fall_back always falls back")
                        };
                        end = precopy_after_replay(s, work, progress)?;
                        continue;
                    }
                };
                let replay_time = replay_allowance(ran + s.commands_ran());
                pages.union_with(
                    &source
                        .take_dirty_pages()
                        .map_err(|e| before_go(true)(MigrationError::Source(e)))?,
                );
                commands.extend(tail);
                let tail_commands = commands.len() as u64;
                let mut work = RoundWork::replayed(&pages, commands, replay_time);
                // The source digests its device while the destination replays the tail.
                let (log, digest) = std::thread::scope(|scope| {
                    let digesting = scope.spawn(|| {
                        let started = Instant::now();
                        source.device_digest().map(|d| (d, started.elapsed()))
                    });
                    let log = s.send_round(&mut work, 0);
                    let digest = digesting.join().unwrap_or_else(|_| {
                        Err(crate::VmError::Capture("digesting panicked (a bug)".into()))
                    });
                    (log, digest)
                });
                let log = log.map_err(before_go(true))?;
                let (digest, took) =
                    digest.map_err(|e| before_go(true)(MigrationError::Source(e)))?;
                let report = s.replay.get_or_insert_with(ReplayReport::default);
                report.digest_ms = ms(took);
                report.tail_commands = tail_commands;
                progress(&s.progress("switchover", &log, 0, 0.0, 0.0, Duration::ZERO, 0));
                Some(digest)
            }
        };
        break (pause_at, digest);
    };
    finish(s, pause_at, digest)
}

/// Why replay cannot meet the pause target whatever its rounds do, if it cannot: the
/// source's digest of its device memory (about `digest`) runs in the pause and alone
/// outlasts the target (a longer pause allowed, it may).
fn digest_outlasts_target(digest: Duration, options: &MigrationOptions) -> Option<String> {
    (!options.allow_longer_pause && digest > options.downtime_target).then(|| {
        format!(
            "digesting the device memory would alone pause the VM for about {:.0} ms, more than the {} ms target",
            ms(digest),
            options.downtime_target.as_millis()
        )
    })
}

/// Pre-copy from `work` after replay gave way to it (never back to replay).
fn precopy_after_replay(
    s: &mut Session<'_>,
    work: RoundWork,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LiveEnd, Failure> {
    match precopy_rounds(s, work, RamCopy::Tracked, false, progress)? {
        PrecopyEnd::Converged(pending) | PrecopyEnd::ToReplay(pending) => {
            Ok(LiveEnd::Precopy(pending))
        }
    }
}

/// The commands run since the last take, taken in the pause, or why they cannot be
/// replayed.
fn replayable_tail(source: &dyn MigrationSource) -> Result<Vec<LoggedCommand>, String> {
    let tail = source.take_commands().map_err(|e| error_chain(&e))?;
    match tail.iter().find(|c| c.weight() > MAX_COMMAND_WEIGHT) {
        Some(heavy) => Err(format!(
            "a device command of {} bytes (an upload) in the last ones is larger than a message can carry",
            heavy.weight()
        )),
        None => Ok(tail),
    }
}

/// Ends a switchover's pause before anything of it was sent: the deadline disarmed,
/// the VM running again (it fails if the deadline passed already, and the VM resumes
/// then as after any failure before Go).
fn resume_for_precopy(s: &mut Session<'_>) -> Result<(), Failure> {
    if let Some(dog) = &s.watchdog {
        // A watchdog that fired stays: the failure is reported as the deadline it is.
        if !dog.disarm() {
            return Err(before_go(true)(MigrationError::BrokenSequence(
                "the switchover deadline passed".into(),
            )));
        }
    }
    s.watchdog = None;
    s.phase = Phase::Round(s.rounds());
    s.source
        .resume()
        .map_err(|e| before_go(true)(MigrationError::Source(e)))
}

/// Round 0's work of `s`: see [`RoundWork::first`].
fn round0(s: &Session<'_>, files: Vec<FilePiece>) -> RoundWork {
    RoundWork::first(s.source, s.ram_pages, files)
}

/// Starts tracking the source's RAM.
fn start_ram_tracking(source: &dyn MigrationSource) -> Result<(), MigrationError> {
    source.start_ram_tracking().map_err(MigrationError::Source)
}

/// When pre-copy first sends the source's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RamCopy {
    /// RAM is tracked, and its first copy is in round 0 (or sent already).
    Tracked,
    /// After round 0, which sends device memory alone: RAM is tracked from its end.
    AfterRound0,
}

/// Pre-copy's round 0 and when RAM goes. A VM with device memory to send sends it
/// first and its RAM from round 1: tracking RAM costs the guest a fault for each page
/// it writes after each take (tens of microseconds under shadow paging), and round 0,
/// which carries all of device memory, is most of a migration. Device tracking runs.
fn precopy_round0(
    s: &Session<'_>,
    files: Vec<FilePiece>,
) -> Result<(RoundWork, RamCopy), MigrationError> {
    let device = RoundWork::first_device(s.source, files);
    if device.chunks.is_empty() && device.files.is_empty() {
        start_ram_tracking(s.source)?;
        return Ok((round0(s, Vec::new()), RamCopy::Tracked));
    }
    Ok((device, RamCopy::AfterRound0))
}

/// What a round after round 0 sends when RAM was left out of it: RAM is tracked from
/// now, and every page that may hold data is sent with what the device dirtied.
fn first_ram_copy(s: &Session<'_>) -> Result<Pending, MigrationError> {
    start_ram_tracking(s.source)?;
    let mut pending = take_dirty(s.source, None)?;
    // Asked once tracking runs: a page populated after this is in a later take.
    pending
        .pages
        .union_with(&populated_pages(s.source, s.ram_pages));
    pending.ram_unsent = true;
    Ok(pending)
}

/// Pre-copy rounds from `work` until the predicted pause meets the target (throttling
/// the VM if needed). With `auto`, a device dirtying memory faster than the link resends
/// it hands over to replay instead of being throttled.
fn precopy_rounds(
    s: &mut Session<'_>,
    mut work: RoundWork,
    mut ram: RamCopy,
    auto: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PrecopyEnd, Failure> {
    let source = s.source;
    let options = s.options;
    let mut throttle_step = 0usize;
    let mut best_rate = 0f64;
    let mut extra_rounds = 0u32;
    loop {
        let throttle_pct = THROTTLE_STEPS[throttle_step];
        let log = s
            .send_round(&mut work, throttle_pct)
            .map_err(before_go(false))?;
        // RAM's first copy, if it is next: it goes before the pause, and the VM did not
        // dirty it (it neither sets the dirty rate nor counts against replay).
        let (pending, first_ram_bytes) = match ram {
            RamCopy::Tracked => (take_dirty(source, None), 0),
            RamCopy::AfterRound0 => {
                ram = RamCopy::Tracked;
                let pending = first_ram_copy(s);
                let bytes = pending.as_ref().map_or(0, |p| p.pages.count() * PAGE_SIZE);
                (pending, bytes)
            }
        };
        let pending = pending.map_err(before_go(false))?;
        tracing::debug!(ms = ms(s.started.elapsed()), "dirty state taken");
        work = pending.to_work();
        let dirty_bytes = work.bytes();
        let dirtied_bytes = dirty_bytes.saturating_sub(first_ram_bytes);
        let secs = (log.ms / 1e3).max(1e-6);
        // Small rounds are dominated by the round trip, so the link's bandwidth is
        // the best rate seen in any round.
        best_rate = best_rate.max(log.link_rate());
        let rate = best_rate;
        let dirty_rate = dirtied_bytes as f64 / secs;
        // The final round moves what is dirty at the pause at the link's rate.
        let predicted =
            Duration::from_secs_f64(dirty_bytes as f64 / rate.max(1.0)) + SWITCHOVER_OVERHEAD;
        progress(&s.progress(
            "precopy",
            &log,
            dirty_bytes,
            rate,
            dirty_rate,
            predicted,
            throttle_pct,
        ));
        s.predicted_pause = predicted;
        let out_of_bounds =
            s.rounds() >= options.max_rounds || s.started.elapsed() >= options.max_precopy;
        // Another round goes at the ceiling, if there is one; the pause would not.
        let round_rate = options.max_rate.map_or(rate, |max| rate.min(max as f64));
        // RAM's first copy goes in a round of its own, whatever the prediction and the
        // bounds: in the pause it would make it as long as RAM takes to send, and a
        // migration out of bounds would fail without RAM sent once. Once, so bounded.
        let first_ram_next = first_ram_bytes > 0;
        if predicted <= options.downtime_target && !first_ram_next {
            if out_of_bounds
                || extra_rounds >= MAX_EXTRA_ROUNDS
                || !worth_another_round(dirty_bytes, round_rate, dirty_rate)
            {
                return Ok(PrecopyEnd::Converged(pending));
            }
            extra_rounds += 1;
            tracing::debug!(
                predicted_ms = ms(predicted),
                "one more round shrinks the pause further"
            );
            continue;
        }
        // Dirtying at more than half the rate rounds move at will not converge quickly.
        let too_fast = dirty_rate > round_rate * 0.5;
        // Mostly device memory: replay it rather than slow the VM down.
        let device_bytes = part_bytes(&pending.chunks);
        let replayable = || match digest_outlasts_target(s.source.device_digest_estimate(), options)
        {
            Some(why) => {
                tracing::debug!("pre-copy goes on: {why}");
                false
            }
            None => true,
        };
        if auto
            && too_fast
            && device_bytes * 2 > dirtied_bytes
            && throttle_step == 0
            && replayable()
        {
            tracing::info!(
                dirty_mib_s = dirty_rate / MIB,
                link_mib_s = rate / MIB,
                "the device dirties memory faster than the link resends it: replaying its commands instead"
            );
            return Ok(PrecopyEnd::ToReplay(pending));
        }
        if out_of_bounds && !first_ram_next {
            if options.allow_longer_pause {
                return Ok(PrecopyEnd::Converged(pending));
            }
            return Err(before_go(false)(MigrationError::NotConverged {
                rounds: s.rounds(),
                elapsed_ms: s.started.elapsed().as_millis() as u64,
                predicted_ms: predicted.as_millis() as u64,
                target_ms: options.downtime_target.as_millis() as u64,
                dirty_mib_s: dirty_rate / MIB,
                link_mib_s: rate / MIB,
                throttle_pct,
            }));
        }
        // Slow the VM down a step.
        if options.throttle && too_fast && throttle_step + 1 < THROTTLE_STEPS.len() {
            throttle_step += 1;
            source.set_throttle(THROTTLE_STEPS[throttle_step]);
            tracing::info!(
                pct = THROTTLE_STEPS[throttle_step],
                "throttling the VM to converge"
            );
        }
    }
}

/// Replay rounds: the base, then the commands the source runs (with the RAM it dirties)
/// until the destination is close enough behind for the pause to meet the target. Gives
/// way to pre-copy when the capture fails or overflows, when the destination falls
/// behind, or when replay spends half the migration's bounds without converging.
fn replay_rounds(
    s: &mut Session<'_>,
    start: ReplayStart,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ReplayEnd, Failure> {
    let source = s.source;
    let options = s.options;
    s.replay = Some(ReplayReport::default());
    // Replay may take half of what is left of the bounds; pre-copy, if it gives way,
    // the rest.
    let elapsed = s.started.elapsed();
    let bound_rounds = s.rounds() + options.max_rounds.saturating_sub(s.rounds()).div_ceil(2);
    let bound_time = elapsed + options.max_precopy.saturating_sub(elapsed) / 2;
    let (since, mut work) = match start {
        ReplayStart::Fresh(files) => (None, round0(s, files)),
        ReplayStart::AfterPrecopy(pending) => {
            let work = RoundWork {
                runs: pending.pages.runs(MAX_RUN_PAGES),
                skip_zero_pages: pending.ram_unsent,
                ..RoundWork::default()
            };
            (Some(pending.chunks), work)
        }
    };
    let fresh = since.is_none();
    let since_keys: Option<Vec<ChunkKey>> = since
        .as_ref()
        .map(|parts| parts.iter().map(|p| p.key).collect());
    let (table, base) = match source.start_capture(options.capture, since_keys.as_deref()) {
        Ok(started) => started,
        Err(e) => {
            gave_way(s, error_chain(&e));
            // Pre-copy as it would have gone: round 0 (its work already), or the chunks
            // pending.
            if let Some(parts) = since {
                work.chunks = parts;
            }
            return Ok(ReplayEnd::FellBack(work));
        }
    };
    s.commands_taken_at = Some(Instant::now());
    work.chunks = whole(base);
    work.table = RoundTable::Base(table);
    // (Its pages skip zeros as built: round 0's, or RAM not sent yet.)
    work.skip_zero_chunks = fresh;
    let log = s.send_round(&mut work, 0).map_err(before_go(false))?;
    s.replay
        .get_or_insert_with(ReplayReport::default)
        .base_bytes = log.bytes;
    progress(&s.progress("replay", &log, 0, 0.0, 0.0, Duration::ZERO, 0));
    let mut best_rate = log.link_rate();
    let mut rounds_ms: Vec<f64> = Vec::new();
    let mut throttle_step = 0usize;
    let mut extra_rounds = 0u32;
    // How long the last round's commands ran on the source.
    let mut sent_ran: Option<Duration> = None;
    loop {
        // Near the switchover, as the destination replays each round.
        let mut digest_ahead = false;
        let pages = source
            .take_dirty_pages()
            .map_err(|e| before_go(false)(MigrationError::Source(e)))?;
        if let Some(why) = s.base_lost.take() {
            return Ok(fall_back(s, why, &pages));
        }
        let commands = match source.take_commands() {
            Ok(commands) => commands,
            Err(e) => return Ok(fall_back(s, error_chain(&e), &pages)),
        };
        let ran = s.commands_ran();
        let replay_time = replay_allowance(ran);
        if let Some(heavy) = commands.iter().find(|c| c.weight() > MAX_COMMAND_WEIGHT) {
            let why = format!(
                "a device command of {} bytes (an upload) is larger than a message can carry",
                heavy.weight()
            );
            return Ok(fall_back(s, why, &pages));
        }
        if ran > MAX_ROUND_REPLAY / 2 {
            // The commands of a long base round: the destination could not replay them
            // within what a round may take.
            let why = format!(
                "the commands to replay ran for {:.0} s, longer than a round's replay may take ({} s)",
                ran.as_secs_f64(),
                MAX_ROUND_REPLAY.as_secs() / 2
            );
            return Ok(fall_back(s, why, &pages));
        }
        // Checked before replay began too; device memory may have grown since.
        let digest = source.device_digest_estimate();
        if let Some(why) = digest_outlasts_target(digest, options) {
            return Ok(fall_back(s, why, &pages));
        }
        if let Some(log) = s.round_log.last().filter(|_| !rounds_ms.is_empty()) {
            // Decide on what the last replay round showed, with what it left pending.
            let last = Duration::from_secs_f64(log.busy_ms() / 1e3);
            let ratio = match rounds_ms.as_slice() {
                [.., before, now] => now / before.max(1e-3),
                _ => 1.0,
            };
            let ram = pages.count() * PAGE_SIZE;
            let tail = predicted_tail(last, ratio, ran, sent_ran);
            // The pause but for the digest, which hashing ahead shrinks (below).
            let undigested = predicted_replay_pause(tail, ram, best_rate, Duration::ZERO);
            let predicted = undigested.max(digest) + SWITCHOVER_OVERHEAD;
            s.predicted_pause = predicted;
            let pending_bytes = ram + commands.iter().map(LoggedCommand::weight).sum::<u64>();
            progress(&s.progress(
                "replay",
                log,
                pending_bytes,
                best_rate,
                pending_bytes as f64 / (log.ms / 1e3).max(1e-6),
                predicted,
                REPLAY_THROTTLE_STEPS[throttle_step],
            ));
            let out_of_bounds = s.rounds() >= bound_rounds || s.started.elapsed() >= bound_time;
            // The target is a ceiling: while rounds still shrink, one more shortens the
            // tail the pause replays. A longer pause allowed, no round can go below the
            // digest: the aim is then the target or the digest, the longer.
            let aim = if options.allow_longer_pause {
                options.downtime_target.max(digest + SWITCHOVER_OVERHEAD)
            } else {
                options.downtime_target
            };
            // Near the target, the source hashes its device memory meanwhile, so that
            // the pause's digest hashes only what the last commands wrote (it competes
            // there with the tail's replay for the CPU, on a host that shares it). Near
            // it but for the digest: decided on the rest.
            digest_ahead = undigested + SWITCHOVER_OVERHEAD <= options.downtime_target * 2;
            if predicted <= aim {
                let shrinking = ratio < 0.8 && log.busy_ms() >= 2.0;
                if extra_rounds >= MAX_EXTRA_ROUNDS || !shrinking || out_of_bounds {
                    return Ok(ReplayEnd::Converged(pages, commands, ran));
                }
                extra_rounds += 1;
            } else if falling_behind(&rounds_ms) {
                let why = format!(
                    "the destination falls behind: its last {} rounds of replay grew, to {:.0} ms",
                    crate::replay::ROUNDS_BEHIND,
                    log.ms
                );
                return Ok(fall_back(s, why, &pages));
            } else if out_of_bounds {
                let why = format!(
                    "replay did not converge in {} rounds: predicted pause {:.0} ms > target {} ms",
                    rounds_ms.len(),
                    ms(predicted),
                    options.downtime_target.as_millis()
                );
                return Ok(fall_back(s, why, &pages));
            } else if ratio > CATCH_UP_RATIO
                && options.throttle
                && throttle_step + 1 < REPLAY_THROTTLE_STEPS.len()
            {
                // A destination replaying no faster than the source runs stays as far
                // behind as it is: slow the source a little, so each round is shorter
                // than the last.
                throttle_step += 1;
                source.set_throttle(REPLAY_THROTTLE_STEPS[throttle_step]);
                tracing::info!(
                    pct = REPLAY_THROTTLE_STEPS[throttle_step],
                    "throttling the VM lightly so the destination's replay catches up"
                );
            }
        }
        let mut work = RoundWork::replayed(&pages, commands, replay_time);
        let _ahead = digest_ahead.then(|| source.digest_ahead()).flatten();
        let log = s
            .send_round(&mut work, REPLAY_THROTTLE_STEPS[throttle_step])
            .map_err(before_go(false))?;
        sent_ran = Some(ran);
        best_rate = best_rate.max(log.link_rate());
        rounds_ms.push(log.busy_ms());
    }
}

/// Records why replay gave way, and ends the capture.
fn gave_way(s: &mut Session<'_>, why: String) {
    tracing::warn!("device command replay gives way to pre-copy: {why}");
    // Pre-copy throttles from its own first step.
    s.source.set_throttle(0);
    let capture = s.source.stop_capture();
    let report = s.replay.get_or_insert_with(ReplayReport::default);
    if let Some(capture) = capture {
        report.capture = capture;
    }
    report.fell_back = Some(why);
}

/// Replay gives way to pre-copy, which starts from the dirty `pages` and every chunk that
/// may hold data or changed since tracking began (the destination holds the base and
/// some of the commands; commands taken and not sent need not be: what they wrote is
/// dirty).
fn fall_back(s: &mut Session<'_>, why: String, pages: &PageSet) -> ReplayEnd {
    gave_way(s, why);
    let mut chunks = s.source.populated_chunks();
    chunks.extend(s.source.take_dirty_chunks());
    chunks.sort_unstable();
    chunks.dedup();
    ReplayEnd::FellBack(RoundWork {
        runs: pages.runs(MAX_RUN_PAGES),
        chunks: whole(chunks),
        ..RoundWork::default()
    })
}

/// Pauses the VM for the switchover and arms the deadline by which the destination must
/// be ready: one that is not is abandoned before Go, and the VM resumes here, so the
/// pause stays bounded whatever the destination does.
fn pause_for_switchover(s: &mut Session<'_>) -> Result<Instant, Failure> {
    let pause_at = s
        .source
        .pause()
        .map_err(|e| before_go(false)(MigrationError::Source(e)))?;
    s.phase = Phase::Switchover;
    arm_switchover_deadline(s, pause_at)?;
    tracing::debug!(ms = ms(s.started.elapsed()), "paused");
    Ok(pause_at)
}

/// Arms the deadline, from the pause at `pause_at`, by which the destination must be
/// ready (see [`switchover_deadline`]).
fn arm_switchover_deadline(s: &mut Session<'_>, pause_at: Instant) -> Result<(), Failure> {
    let deadline = pause_at + switchover_deadline(s.options, s.predicted_pause);
    let sockets = s
        .sockets
        .iter()
        .map(TcpStream::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| before_go(true)(MigrationError::io("arming the switchover deadline")(e)))?;
    s.watchdog =
        Some(Watchdog::arm(deadline, sockets).map_err(|e| {
            before_go(true)(MigrationError::io("arming the switchover deadline")(e))
        })?);
    Ok(())
}

/// The switchover after the final round: the state (with the device digest after a
/// replay), the destination's restore, Go and its confirmation.
fn finish(
    s: &mut Session<'_>,
    pause_at: Instant,
    device: Option<DeviceDigest>,
) -> Result<Switched, Failure> {
    let source = s.source;
    let final_bytes = s.round_log.last().map_or(0, |r| r.bytes);
    let blob = source
        .save_state()
        .map_err(|e| before_go(true)(MigrationError::Source(e)))?;
    tracing::debug!(
        ms = ms(s.started.elapsed()),
        bytes = blob.len(),
        "state saved"
    );
    let before_state = s.control.writer.bytes;
    s.control
        .send(&Message::State { blob, device })
        .map_err(before_go(true))?;
    // The VM's state goes in the pause too.
    let final_bytes = final_bytes + (s.control.writer.bytes - before_state);
    match s
        .control
        .expect_control("the destination's restore")
        .map_err(before_go(true))?
    {
        Message::Ready => tracing::debug!(ms = ms(s.started.elapsed()), "destination ready"),
        other => return Err(before_go(true)(MigrationError::unexpected("ready", &other))),
    }
    s.cancelled().map_err(before_go(true))?;
    if let Some(dog) = &s.watchdog {
        if !dog.disarm() {
            return Err(before_go(true)(MigrationError::BrokenSequence(
                "the switchover deadline passed".into(),
            )));
        }
    }
    // From here the destination may run the VM: the source must never resume it.
    s.phase = Phase::Confirmation;
    let session = s.session;
    let in_doubt = |e: MigrationError| {
        let reason = error_chain(&in_phase(e, Phase::Confirmation, s.options.io_timeout));
        Failure::InDoubt(MigrationError::InDoubt { reason, session })
    };
    s.control.send(&Message::Go).map_err(in_doubt)?;
    match s.control.expect_control("the destination's confirmation") {
        Ok(Message::Resumed) => {}
        Ok(other) => {
            return Err(in_doubt(MigrationError::unexpected(
                "the destination's confirmation",
                &other,
            )))
        }
        Err(e) => return Err(in_doubt(e)),
    }
    let downtime = pause_at.elapsed();
    Ok(Switched {
        downtime,
        final_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GBIT: f64 = 1.25e8;

    #[test]
    fn a_connection_is_refused_only_if_every_address_refused_it() {
        use std::io::{Error, ErrorKind::*};
        let kept = |kinds: &[std::io::ErrorKind]| {
            kinds
                .iter()
                .fold(None, |kept, &kind| {
                    Some(kept_error(kept, Error::from(kind)))
                })
                .map(|e| e.kind())
        };
        assert_eq!(
            kept(&[ConnectionRefused, ConnectionRefused]),
            Some(ConnectionRefused)
        );
        assert_eq!(kept(&[TimedOut, ConnectionRefused]), Some(TimedOut));
        assert_eq!(kept(&[ConnectionRefused, TimedOut]), Some(TimedOut));
        assert_eq!(
            kept(&[HostUnreachable, ConnectionRefused, TimedOut]),
            Some(HostUnreachable)
        );
    }

    #[test]
    fn another_round_is_taken_while_it_shrinks_the_pause_and_not_once_it_cannot() {
        // 4 MB pending on 1 Gbit/s (32 ms) while the VM dirties 20 MB/s: the next round
        // leaves 0.64 MB (5 ms). Worth it.
        assert!(worth_another_round(4_000_000, GBIT, 2e7));
        // Dirtying at the link's rate: a round leaves as much as it sends.
        assert!(!worth_another_round(4_000_000, GBIT, GBIT));
        // 50 KB pending: at most 0.4 ms to save.
        assert!(!worth_another_round(50_000, GBIT, 0.0));
        assert!(!worth_another_round(0, GBIT, 0.0));
        assert!(!worth_another_round(4_000_000, 0.0, 0.0));
    }
}
