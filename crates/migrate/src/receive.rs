//! The destination side: a listener that authenticates every connection, prepares a
//! paused VM for an acceptable offer, applies rounds from the data streams, restores the
//! VM from the final state and runs it on the source's word. Until then a failure of any
//! kind discards what was received.

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_abi::file::valid_name;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::auth::{authenticate_stream_listener, Secret};
use crate::gate::{Gate, Refusal, Ticket, HANDSHAKE_TIME};
use crate::link::Link;
use crate::replay::{DeviceTransfer, LoggedCommand, MAX_ROUND_REPLAY};
use crate::send::{ms, MAX_STREAMS};
use crate::settle::Outcomes;
use crate::tls::TlsConfig;
use crate::vm::{
    error_chain, valid_sha256, ChunkKey, ChunkOrigin, ChunkWrite, DeviceBuffer, FileTransfer,
    MigrationTarget, VmDescription, VmError, MAX_CHUNK_BYTES, PAGE_SIZE,
};
use crate::wire::{
    bounded_reason, Frame, FrameStream, Message, StreamRole, Transfer, MAX_CONTROL_BYTES,
    MAX_DATA_FRAME, MAX_DATA_STREAM_CONTROL, MAX_HANDSHAKE_FRAME, MAX_RUN_PAGES,
};
use crate::MigrationError;

/// How long the destination waits for the data connections.
const STREAM_WAIT: Duration = Duration::from_secs(30);
/// Beyond [`MAX_ROUND_REPLAY`], how long a round's replay may run here: the source's
/// default I/O timeout, which it waits on top of its allowance.
const REPLAY_GRACE: Duration = Duration::from_secs(10);
/// What a zero-page record writes (the largest run), shared rather than allocated per
/// record.
static ZERO_RUN: [u8; (MAX_RUN_PAGES * PAGE_SIZE) as usize] =
    [0; (MAX_RUN_PAGES * PAGE_SIZE) as usize];
/// Largest guest RAM accepted in an offer.
const MAX_RAM: u64 = 1 << 40;
/// Most weight ([`LoggedCommand::weight`]) of device commands one round may carry (twice
/// the source's default log bound): what a destination keeps before replaying them takes
/// up to half as much memory again ([`COMMAND_MEMORY_RATIO`]).
pub(crate) const MAX_ROUND_COMMAND_BYTES: u64 = 512 << 20;
/// Migrations a host receives at once (from its control connection's authentication to
/// the end): a center runs at most this many at once. One more is told this host is busy
/// until one ends.
pub const MAX_INCOMING_SESSIONS: usize = 16;
/// Incoming live migrations that may replay device commands at once: each may keep up to
/// 768 MiB of them (`MAX_ROUND_COMMAND_BYTES` × `COMMAND_MEMORY_RATIO`), far more than
/// a pre-copy session holds, so a host bounds the sum. An `auto` offer past it is received
/// by pre-copy; a `replay` one is told this host is busy. An `auto` session holds its
/// place to its end, replaying or not (the source decides later, and the destination
/// must have the room by then).
pub const MAX_REPLAY_SESSIONS: usize = 4;
/// Longest name of the VM's workload in an offer (a built-in name, or a path on the
/// source: `PATH_MAX`).
pub const MAX_WORKLOAD_NAME: usize = 4095;
/// Most `extra` entries of an offer (a host sends four).
pub const MAX_EXTRA_ENTRIES: usize = 16;
/// Longest key of an offer's `extra` entry.
pub const MAX_EXTRA_KEY: usize = 64;
/// Longest value of an offer's `extra` entry: one may hold the guest's arguments as JSON,
/// a boot-info page's worth, each byte escaped at worst.
pub const MAX_EXTRA_VALUE: usize = 64 << 10;
/// Longest backend kind or microkernel name in an offer.
const MAX_LABEL: usize = 256;

/// The host's side of receiving: make a paused VM for an offer, adopt it when it runs.
pub trait TargetFactory: Send + Sync + 'static {
    /// The VM being received.
    type Target: MigrationTarget + 'static;
    /// A paused, empty VM for `vm`, or the reason to refuse it (incompatible, no room).
    fn prepare(&self, vm: &VmDescription) -> Result<Self::Target, VmError>;
    /// The VM now runs here: the host owns it.
    fn adopt(&self, target: Self::Target, report: ReceiveReport);
}

/// What a received migration did.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    /// The VM.
    pub vm: VmDescription,
    /// Rounds applied.
    pub rounds: u32,
    /// Bytes received on all connections.
    pub bytes_received: u64,
    /// Offer to resume, ms.
    pub total_ms: f64,
}

/// One connection from the source.
type Conn = FrameStream<Counted>;

/// A connection whose bytes read are counted as they come, for another thread to see: a
/// frame arriving over a slow link is progress before it is whole.
struct Counted {
    link: Link,
    read: Arc<AtomicU64>,
}

impl Counted {
    fn new(link: Link) -> Self {
        Self {
            link,
            read: Arc::default(),
        }
    }
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.link.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.link.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.link.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.link.flush()
    }
}

/// Read buffer of a plain connection. No larger than the data streams' frames (device
/// chunks of 64 KiB, up to 1 MiB of pages): a read that large bypasses the buffer, so
/// most of a payload goes from the socket to its frame buffer without an extra copy.
const READ_BUFFER: usize = 64 << 10;
/// Write buffer of a connection (only answers go out).
const WRITE_BUFFER: usize = 8 << 10;

/// A data connection, and its socket to shut it down with.
type DataConn = (Conn, TcpStream);

/// Data connections waiting for their session's control connection.
type Sessions = Arc<Mutex<HashMap<u64, Sender<(u8, DataConn)>>>>;

/// The places of incoming sessions (or of those replaying), at most `limit` taken at once.
#[derive(Clone)]
struct SessionSlots {
    taken: Arc<AtomicUsize>,
    limit: usize,
}

/// A place taken among incoming sessions; dropping it gives it back.
struct SessionSlot(Arc<AtomicUsize>);

impl SessionSlots {
    fn new(limit: usize) -> Self {
        Self {
            taken: Arc::default(),
            limit,
        }
    }

    /// A place, if one is free.
    fn take(&self) -> Option<SessionSlot> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot(self.taken.clone()))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts migration connections on `listener` forever, each on its own thread, over
/// plain TCP.
pub fn serve<F: TargetFactory>(listener: TcpListener, secret: Secret, factory: Arc<F>) {
    serve_with_tls(listener, secret, None, factory, Outcomes::default());
}

/// Accepts migration connections on `listener` forever, each on its own thread. With
/// `tls`, every connection must first complete a mutual TLS handshake (the peer's
/// certificate signed by the configured CA; see [`crate::tls`]), and the shared-secret
/// authentication runs inside it; a connection that fails either is logged and closed,
/// and the listener goes on. Until it has authenticated, a connection is one of at most
/// [`crate::gate::MAX_HANDSHAKES`] (and of its peer address's
/// [`crate::gate::MAX_HANDSHAKES_PER_PEER`]), has `HANDSHAKE_TIME` to finish, and
/// may send only handshake-sized frames; one over the limits is closed at once. At most
/// [`MAX_INCOMING_SESSIONS`] migrations are received at once: an offer past that is
/// told this host is busy; of them, at most [`MAX_REPLAY_SESSIONS`] replay device
/// commands. Every incoming session's outcome is kept in `outcomes`, to settle in-doubt
/// switchovers.
pub fn serve_with_tls<F: TargetFactory>(
    listener: TcpListener,
    secret: Secret,
    tls: Option<TlsConfig>,
    factory: Arc<F>,
    outcomes: Outcomes,
) {
    let (_forever, stop) = mpsc::channel();
    serve_until(listener, secret, tls, factory, outcomes, &stop);
}

/// A migration listener on a thread of its own ([`spawn_receiver`]): dropping it stops
/// the listener and its reaper, closes the port and joins the thread. Migrations
/// already accepted run on to their end.
pub struct Receiving {
    /// Dropped to stop the listener.
    stop: Option<mpsc::Sender<()>>,
    /// The listening socket, shut down to wake its `accept`.
    listener: TcpListener,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Err(e) = wake_accept(&self.listener) {
            // Without it the thread waits for a peer to connect: not joined, not hung.
            tracing::warn!("cannot wake the migration listener to stop it: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Wakes a thread blocked in `listener`'s accept without a connection (which a firewall,
/// a loopback without the address's family or a full backlog may stop): a listening
/// socket shut down fails that accept, and every later one, at once.
fn wake_accept(listener: &TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).shutdown(Shutdown::Both)
}

/// [`serve_with_tls`] on a thread of its own, until the [`Receiving`] returned is dropped.
pub fn spawn_receiver<F: TargetFactory>(
    listener: TcpListener,
    secret: Secret,
    tls: Option<TlsConfig>,
    factory: Arc<F>,
    outcomes: Outcomes,
) -> std::io::Result<Receiving> {
    let shared = listener.try_clone()?;
    let (stop, stopped) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("migrate-listener".into())
        .spawn(move || serve_until(listener, secret, tls, factory, outcomes, &stopped))?;
    Ok(Receiving {
        stop: Some(stop),
        listener: shared,
        thread: Some(thread),
    })
}

/// A listener's failed accepts since it last logged one (the migration listener's, the
/// APIs'): a connection lost before it was taken is skipped; anything else (out of
/// descriptors or memory) is waited out for [`ACCEPT_BACKOFF`], as the connection stays
/// in the backlog and trying again at once would spin a core, and logged at most once a
/// second.
pub struct AcceptFailures {
    what: &'static str,
    count: u64,
    logged: Option<Instant>,
}

/// Pause after an accept that failed for want of resources.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl AcceptFailures {
    /// The failures of the listener for `what` ("migration connections").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            count: 0,
            logged: None,
        }
    }

    /// Notes an accept that failed with `e`: how long to wait before the next, if at all.
    pub fn failed(&mut self, e: &std::io::Error) -> Option<Duration> {
        use std::io::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
        ) {
            return None;
        }
        self.count += 1;
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                failed = self.count,
                "cannot accept {}: {e}; trying again every {} ms",
                self.what,
                ACCEPT_BACKOFF.as_millis()
            );
            self.count = 0;
            self.logged = Some(Instant::now());
        }
        Some(ACCEPT_BACKOFF)
    }
}

/// The accept loop, until `stop`'s sender is gone.
fn serve_until<F: TargetFactory>(
    listener: TcpListener,
    secret: Secret,
    tls: Option<TlsConfig>,
    factory: Arc<F>,
    outcomes: Outcomes,
    stop: &mpsc::Receiver<()>,
) {
    let sessions: Sessions = Arc::default();
    let slots = SessionSlots::new(MAX_INCOMING_SESSIONS);
    let replay_slots = SessionSlots::new(MAX_REPLAY_SESSIONS);
    let gate = Gate::default();
    // The reaper stops when this loop does, and is waited for: a listener stopped leaves
    // no thread behind.
    let (reaping, reaper_stop) = mpsc::channel();
    let reaper = match gate.start_reaper(reaper_stop) {
        Ok(reaper) => reaper,
        Err(e) => {
            tracing::error!(
                "cannot start the handshake reaper thread; not receiving migrations: {e}"
            );
            return;
        }
    };
    let mut accept_failures = AcceptFailures::new("migration connections");
    for conn in listener.incoming() {
        if matches!(stop.try_recv(), Err(mpsc::TryRecvError::Disconnected)) {
            break;
        }
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(pause) = accept_failures.failed(&e) {
                    std::thread::sleep(pause);
                }
                continue;
            }
        };
        let Ok(peer_addr) = stream.peer_addr() else {
            continue;
        };
        let ticket = match gate.admit(&stream, peer_addr.ip()) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                let limit = match refusal {
                    Refusal::Host => "this host's limit of unauthenticated connections",
                    Refusal::Peer => "the limit of unauthenticated connections per peer",
                };
                if let Some(n) = gate.log_refusal(peer_addr.ip()) {
                    tracing::warn!(peer = %peer_addr, refused = n, "migration connections refused: {limit} reached");
                }
                if tls.is_none() {
                    tell_busy(&stream, limit);
                }
                continue;
            }
        };
        let (secret, tls, factory, sessions, outcomes) = (
            secret.clone(),
            tls.clone(),
            factory.clone(),
            sessions.clone(),
            outcomes.clone(),
        );
        let (slots, replay_slots, gate) = (slots.clone(), replay_slots.clone(), gate.clone());
        let peer = peer_addr.to_string();
        let spawned = std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn(move || {
                let shared = Shared {
                    factory: &*factory,
                    sessions: &sessions,
                    slots: &slots,
                    replay_slots: &replay_slots,
                    outcomes: &outcomes,
                };
                match handle_connection(stream, ticket, &secret, tls.as_ref(), shared) {
                    Ok(()) => {}
                    Err(ConnectionError::Authenticated(e)) => {
                        let e = error_chain(&e);
                        tracing::warn!(%peer, "incoming migration connection failed: {e}");
                    }
                    // Anyone can cause these as fast as connections open: logged as
                    // refusals are.
                    Err(ConnectionError::Unauthenticated(e)) => {
                        if let Some(n) = gate.log_failure(peer_addr.ip()) {
                            let e = error_chain(&e);
                            tracing::warn!(%peer, failed = n, "incoming migration connections failed before authenticating, the last: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a migration thread: {e}");
        }
    }
    drop(reaping);
    let _ = reaper.join();
}

/// Tells a connection refused before its handshake that this host is busy, if that costs
/// nothing: one small frame into an empty socket buffer, never waiting (a TLS peer gets no
/// plain frame).
fn tell_busy(stream: &TcpStream, limit: &str) {
    if stream.set_nonblocking(true).is_ok() {
        let mut writer = crate::wire::FrameWriter::new(stream, false);
        let _ = writer.send(&Message::Busy {
            reason: format!("{limit} is reached"),
        });
    }
}

/// What every connection of a listener shares.
#[derive(Clone, Copy)]
struct Shared<'a, F> {
    factory: &'a F,
    sessions: &'a Sessions,
    slots: &'a SessionSlots,
    /// Of the sessions, the live ones that may replay device commands.
    replay_slots: &'a SessionSlots,
    outcomes: &'a Outcomes,
}

/// Answers a question about migration `session` (see [`crate::settle`]).
fn settle(mut conn: Conn, outcomes: &Outcomes, session: u64) -> Result<(), MigrationError> {
    let settlement = outcomes.settle(session);
    tracing::info!(
        session,
        ?settlement,
        "asked whether a migrated VM runs here"
    );
    conn.send(&Message::Settled { settlement })
}

/// How long an offer turned away over [`MAX_INCOMING_SESSIONS`] is read on, to close its
/// connection without a reset (which could lose the answer), and how much of it.
const BUSY_DRAIN_TIME: Duration = Duration::from_secs(2);
const BUSY_DRAIN_BYTES: u64 = MAX_CONTROL_BYTES as u64;

/// An authenticated control connection while [`MAX_INCOMING_SESSIONS`] are received: a
/// question about a migration is answered (it is small and ends at once); an offer is
/// told this host is busy (it may come again once a migration has ended, unlike one
/// refused), read no further than a handshake frame.
fn serve_over_capacity(
    mut conn: Conn,
    socket: &TcpStream,
    outcomes: &Outcomes,
) -> Result<(), MigrationError> {
    conn.limit_frames(MAX_HANDSHAKE_FRAME);
    match conn.expect_control("an offer") {
        Ok(Message::Settle { session }) => return settle(conn, outcomes, session),
        // An offer, or a frame too large to be anything but one.
        Ok(_) | Err(MigrationError::MalformedFrame(_)) => {}
        Err(e) => return Err(e),
    }
    let reason = format!(
        "this host is receiving {MAX_INCOMING_SESSIONS} migrations, its limit, until one ends"
    );
    let _ = conn.send(&Message::Busy {
        reason: reason.clone(),
    });
    // The rest of an offer left unread would make the close a reset, and the source
    // might lose the answer with it: read on (without keeping it) until it closes.
    let until = Instant::now() + BUSY_DRAIN_TIME;
    let mut rest = socket.take(BUSY_DRAIN_BYTES);
    let mut sink = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero()
            || socket.set_read_timeout(Some(left)).is_err()
            || !matches!(rest.read(&mut sink), Ok(1..))
        {
            break;
        }
    }
    Err(MigrationError::Busy(reason))
}

/// How an incoming connection failed.
enum ConnectionError {
    /// Before the peer proved it knows the secret.
    Unauthenticated(MigrationError),
    /// After.
    Authenticated(MigrationError),
}

/// One connection: authenticated under `ticket` (given back once it has), then served.
fn handle_connection<F: TargetFactory>(
    stream: TcpStream,
    ticket: Ticket,
    secret: &Secret,
    tls: Option<&TlsConfig>,
    shared: Shared<'_, F>,
) -> Result<(), ConnectionError> {
    let (conn, keep, role) =
        authenticate_peer(stream, secret, tls).map_err(ConnectionError::Unauthenticated)?;
    serve_authenticated(conn, keep, role, ticket, shared).map_err(ConnectionError::Authenticated)
}

/// Sets up an incoming connection and authenticates its peer: the connection, a handle
/// on its socket, and the role it claims.
fn authenticate_peer(
    stream: TcpStream,
    secret: &Secret,
    tls: Option<&TlsConfig>,
) -> Result<(Conn, TcpStream, StreamRole), MigrationError> {
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(HANDSHAKE_TIME)))
        .and_then(|()| crate::deadline::tune(&stream, STREAM_WAIT))
        .map_err(MigrationError::io("setting up a connection"))?;
    let keep = stream
        .try_clone()
        .map_err(MigrationError::io("setting up a connection"))?;
    let link = match tls {
        None => Link::plain(stream, READ_BUFFER, WRITE_BUFFER)
            .map_err(MigrationError::io("setting up a connection"))?,
        Some(tls) => Link::tls(
            tls.accept(stream)
                .map_err(|why| MigrationError::Auth(format!("TLS handshake failed: {why}")))?,
            WRITE_BUFFER,
        ),
    };
    let mut conn = FrameStream::new(Counted::new(link), false);
    let role = authenticate_stream_listener(&mut conn, secret)?;
    Ok((conn, keep, role))
}

/// Serves an authenticated connection claiming `role`; `ticket` is given back once it
/// has a session's place (or is a data connection).
fn serve_authenticated<F: TargetFactory>(
    mut conn: Conn,
    keep: TcpStream,
    role: StreamRole,
    ticket: Ticket,
    shared: Shared<'_, F>,
) -> Result<(), MigrationError> {
    let slot = match role {
        StreamRole::Control => match shared.slots.take() {
            Some(slot) => Some(slot),
            // Still under its ticket, so such connections stay few and brief.
            None => return serve_over_capacity(conn, &keep, shared.outcomes),
        },
        StreamRole::Data { .. } => None,
    };
    drop(ticket);
    // The source sends at least once per round, and says a long round is at work.
    keep.set_read_timeout(Some(crate::deadline::idle_limit()))
        .map_err(MigrationError::io("setting up a connection"))?;
    if role == StreamRole::Control {
        // Control messages up to the protocol's limit, and no data frame beyond what a
        // sender makes (none is valid here: it is refused once read).
        conn.limit_frames_by_kind(MAX_DATA_FRAME, MAX_CONTROL_BYTES);
    }
    match role {
        StreamRole::Control => match conn.expect_control("an offer").inspect_err(|e| {
            // An authenticated source whose offer this host cannot read is told why.
            if let MigrationError::MalformedFrame(why) = e {
                let reason = bounded_reason(format!("this host cannot read the offer: {why}"));
                let _ = conn.send(&Message::Refuse { reason });
            }
        })? {
            Message::Settle { session } => settle(conn, shared.outcomes, session),
            Message::Offer {
                vm,
                streams,
                transfer,
                files,
                device,
            } => {
                let offer = Offered {
                    vm,
                    streams,
                    transfer,
                    files,
                    device,
                };
                let result = receive_vm(conn, keep, shared, offer);
                drop(slot);
                if let Err(e) = &result {
                    let e = error_chain(e);
                    tracing::warn!("incoming migration discarded: {e}");
                }
                result.map(drop)
            }
            other => Err(MigrationError::unexpected("an offer", &other)),
        },
        StreamRole::Data { session, index } => {
            // Nothing larger than the sender's data frames, and no control message but a
            // keepalive: what a peer makes this host hold per stream is bounded.
            conn.limit_frames_by_kind(MAX_DATA_FRAME, MAX_DATA_STREAM_CONTROL);
            let slot = shared
                .sessions
                .lock()
                .expect("sessions lock")
                .get(&session)
                .cloned();
            match slot {
                Some(tx) => {
                    let _ = tx.send((index, (conn, keep)));
                    Ok(())
                }
                None => Err(MigrationError::BrokenSequence(format!(
                    "data connection for unknown session {session:#x}"
                ))),
            }
        }
    }
}

struct InboundState {
    round_open: bool,
    /// The open round's end came and its frames are waited for: the control thread bounds
    /// that wait, not the data streams' idle limit.
    ending: bool,
    /// The round open or last open.
    round: u32,
    /// Frames applied, per stream.
    applied: Vec<u64>,
    /// Frames taken into the open round and not yet applied: its end waits for them,
    /// so that one more than announced is counted before the round is judged.
    in_flight: usize,
    /// When a data frame last came into a round or was applied: what a source's
    /// keepalives cannot stand in for.
    last_data: Instant,
    /// Bytes of the keepalive frames read on the data streams.
    keepalive_bytes: u64,
    failed: Option<MigrationError>,
    done: bool,
    /// Bytes received of each attached file being sent (by offer index).
    file_bytes: Vec<u64>,
    /// Which data streams' threads have returned (their connections closed).
    returned: Vec<bool>,
}

struct Inbound {
    state: Mutex<InboundState>,
    changed: Condvar,
    /// The control stream's socket: a failed data stream shuts its read side so the
    /// control thread stops waiting for the round's end and sends the Abort at once.
    control_socket: TcpStream,
    /// Size of each offered file that is being sent (`None`: not sent, the destination
    /// has it), by offer index.
    files: Vec<Option<u64>>,
    /// Bytes read on each data stream so far, partial frames included.
    received: Vec<Arc<AtomicU64>>,
    /// The chunk origins of the open round to check at its end.
    claims: ClaimedOrigins,
}

impl Inbound {
    fn new(
        received: Vec<Arc<AtomicU64>>,
        control_socket: TcpStream,
        files: Vec<Option<u64>>,
        claims: ClaimedOrigins,
    ) -> Self {
        Self {
            state: Mutex::new(InboundState {
                round_open: false,
                ending: false,
                round: 0,
                applied: vec![0; received.len()],
                in_flight: 0,
                last_data: Instant::now(),
                keepalive_bytes: 0,
                failed: None,
                done: false,
                file_bytes: vec![0; files.len()],
                returned: vec![false; received.len()],
            }),
            changed: Condvar::new(),
            control_socket,
            files,
            received,
            claims,
        }
    }

    /// Bytes of data read on the data streams, keepalives aside: partial frames count, so
    /// a slow link shows its progress. A keepalive read and not yet counted as one counts
    /// for a moment (a frame's bytes at most per stream).
    fn data_bytes(&self, s: &InboundState) -> u64 {
        let read: u64 = self
            .received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum();
        read.saturating_sub(s.keepalive_bytes)
    }

    /// Whether a data stream that read nothing for the idle limit waits on: while the
    /// control thread is in charge (no round open, or the open one ending: it bounds
    /// those), or another stream moved the session on within the limit.
    fn waits_on(&self) -> bool {
        let s = self.lock();
        s.failed.is_none()
            && !s.done
            && (!s.round_open || s.ending || s.last_data.elapsed() < crate::deadline::idle_limit())
    }

    /// Opens round `round`. Its data streams' idle limit counts from now, not from the
    /// last round's data: the control thread may have spent long since (applying and
    /// replaying that round, reading this one's commands), and a stream that timed out
    /// before this round's first frame would fail a migration that moves.
    fn open_round(&self, round: u32) {
        let mut s = self.lock();
        s.round_open = true;
        s.round = round;
        s.last_data = Instant::now();
        drop(s);
        self.changed.notify_all();
    }

    /// Checks a file piece against the offer and what was sent already, and counts it.
    fn take_file_piece(&self, file: u32, offset: u64, len: u64) -> Result<(), String> {
        let size = self
            .files
            .get(file as usize)
            .copied()
            .flatten()
            .ok_or_else(|| format!("data for attached file {file}, which is not being sent"))?;
        let mut s = self.lock();
        if s.round != 0 {
            return Err(format!("data for attached file {file} after round 0"));
        }
        let received = &mut s.file_bytes[file as usize];
        if offset.saturating_add(len) > size || *received + len > size {
            return Err(format!(
                "{len} bytes at {offset} of attached file {file} exceed its {size} bytes"
            ));
        }
        *received += len;
        Ok(())
    }

    /// Whether every byte of the files being sent has arrived (by count; the target
    /// checks the content).
    fn files_complete(&self) -> Result<(), String> {
        let s = self.lock();
        for (i, (size, got)) in self.files.iter().zip(&s.file_bytes).enumerate() {
            if let Some(size) = size {
                if got != size {
                    return Err(format!(
                        "attached file {i}: {got} of its {size} bytes arrived in round 0"
                    ));
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboundState> {
        // A stream thread that panicked holding the lock leaves flags that are still
        // whole (each update is one store), and `fail` must still reach the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, index: usize, error: MigrationError) {
        let mut s = self.lock();
        if s.failed.is_some() || s.done {
            return;
        }
        s.failed = Some(MigrationError::DataStream {
            index,
            source: Box::new(error),
        });
        drop(s);
        self.changed.notify_all();
        // It stays writable for the Abort that names the reason.
        let _ = self.control_socket.shutdown(Shutdown::Read);
    }
}

/// Fails the migration at once when a data stream's thread panics (a bug, in the engine
/// or the target), instead of leaving the control stream to wait out its timeout for
/// frames that will never be applied.
struct FailOnPanic<'a> {
    index: usize,
    inbound: &'a Inbound,
}

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.inbound.fail(
                self.index,
                MigrationError::StreamPanicked("applying frames".into()),
            );
        }
    }
}

/// Applies one data stream's frames until it ends.
fn apply_stream<T: MigrationTarget>(
    index: usize,
    mut reader: Conn,
    target: &T,
    vm: &VmDescription,
    inbound: &Inbound,
) -> u64 {
    let _fail_on_panic = FailOnPanic { index, inbound };
    let received = reader.get_mut().read.clone();
    loop {
        let before = reader.bytes_read;
        let frame = loop {
            let at = received.load(Ordering::Relaxed);
            match reader.read() {
                Ok(f) => break f,
                // Nothing of a frame read, so reading again loses nothing: this stream
                // has no more to carry for now, while others do or the round ends.
                Err(MigrationError::Io { source, .. })
                    if crate::deadline::is_timeout(&source)
                        && received.load(Ordering::Relaxed) == at
                        && inbound.waits_on() => {}
                Err(e) => {
                    inbound.fail(index, e);
                    return reader.bytes_read;
                }
            }
        };
        let data = !matches!(frame, Frame::Control(Message::Keepalive));
        // Frames belong to the open round; wait for the control stream to open it (and
        // sync the buffer table) before applying anything. Taken into it in flight, so
        // that its end waits for the frame and counts it.
        {
            let mut s = inbound
                .changed
                .wait_while(inbound.lock(), |s| {
                    !s.round_open && s.failed.is_none() && !s.done
                })
                .unwrap_or_else(PoisonError::into_inner);
            if s.failed.is_some() || s.done {
                return reader.bytes_read;
            }
            s.in_flight += 1;
            if data {
                s.last_data = Instant::now();
            }
        }
        let applied = match frame {
            // A stream with nothing to carry for a while, still there (counted in the
            // round's frames like any other).
            Frame::Control(Message::Keepalive) => Ok(()),
            Frame::File { file, offset, data } => inbound
                .take_file_piece(file, offset, data.len() as u64)
                .map_err(MigrationError::BrokenSequence)
                .and_then(|()| {
                    target
                        .write_file(file, offset, data)
                        .map_err(MigrationError::Target)
                }),
            other => apply_data(target, other, vm, Some(&inbound.claims)),
        };
        let mut s = inbound.lock();
        s.in_flight -= 1;
        if let Err(e) = applied {
            drop(s);
            inbound.fail(index, e);
            return reader.bytes_read;
        }
        s.applied[index] += 1;
        if data {
            s.last_data = Instant::now();
        } else {
            s.keepalive_bytes += reader.bytes_read - before;
        }
        drop(s);
        inbound.changed.notify_all();
    }
}

/// Chunk origins a source sent with the chunks' bytes (an honest one does for the files
/// this host is receiving), until the round's end. Kept unchecked, a wrong origin would
/// have the VM's next migration send where instead of what, and the chunk become the
/// file's bytes there: the VM's memory would change without a word. So the chunks are
/// written without them, and an origin is kept only once this host's copy of the file
/// shows it true ([`keep_true_origins`]).
pub(crate) struct ClaimedOrigins {
    claims: Mutex<HashMap<ChunkKey, Claim>>,
    /// Most claims in a round: one per page of the VM's device memory, and per buffer.
    most: usize,
}

/// A chunk's origin as its source claims it, and what the chunk's bytes were.
struct Claim {
    origin: ChunkOrigin,
    len: u64,
    sha256: [u8; 32],
}

impl ClaimedOrigins {
    fn new(vm: &VmDescription) -> Self {
        let pages = usize::try_from(vm.accel_memory / PAGE_SIZE).unwrap_or(usize::MAX);
        Self {
            claims: Mutex::default(),
            most: pages.saturating_add(ferry_abi::accel::MAX_BUFFERS as usize),
        }
    }

    /// Keeps `origin` as the claim of chunk `key`, whose bytes `data` were written.
    fn claim(&self, key: ChunkKey, origin: ChunkOrigin, data: &[u8]) -> Result<(), MigrationError> {
        let sha256 = Sha256::digest(data).into();
        let mut claims = self.lock();
        if claims.len() >= self.most && !claims.contains_key(&key) {
            return Err(MigrationError::BrokenSequence(format!(
                "more than {} device chunks with their origins in one round, more than the VM's device memory holds",
                self.most
            )));
        }
        let len = data.len() as u64;
        claims.insert(
            key,
            Claim {
                origin,
                len,
                sha256,
            },
        );
        Ok(())
    }

    /// The claims of the round, none kept after.
    fn take(&self) -> HashMap<ChunkKey, Claim> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkKey, Claim>> {
        // Each update is one insert: whole after a panic.
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Records the `claims` of a round that are true, at its end (the files being received
/// are whole here from round 0's end): a chunk whose bytes are those of the file piece
/// its origin names, in this host's copy, is written again as that piece, with its
/// origin. The others keep the bytes received without it: a source that read a chunk's
/// origin before a write changed the chunk sends the chunk again next round, and one
/// that claims a false origin loses only the chance to send where next time. Tells the
/// source every keepalive period that it is still at work (this reads the files).
fn keep_true_origins<T: MigrationTarget>(
    conn: &mut Conn,
    target: &T,
    claims: HashMap<ChunkKey, Claim>,
) -> Result<(), MigrationError> {
    if claims.is_empty() {
        return Ok(());
    }
    let mut claims: Vec<(ChunkKey, Claim)> = claims.into_iter().collect();
    // In file order: this host's copies are read front to back.
    claims.sort_unstable_by_key(|(_, c)| (c.origin.file, c.origin.offset));
    let (checking, every) = (Instant::now(), crate::deadline::keepalive_every());
    let mut keepalive = checking;
    let mut piece = vec![0u8; MAX_CHUNK_BYTES as usize];
    let (mut kept, mut dropped) = (0u64, 0u64);
    let mut why_dropped = None;
    for (key, claim) in claims {
        if Instant::now() >= keepalive {
            conn.send(&Message::Keepalive)?;
            keepalive = Instant::now() + every;
        }
        let piece = &mut piece[..claim.len as usize];
        let (file, offset) = (claim.origin.file, claim.origin.offset);
        let why = match target.read_local_file(file, offset, piece) {
            Err(e) => Some(error_chain(&e)),
            Ok(()) if <[u8; 32]>::from(Sha256::digest(&*piece)) != claim.sha256 => Some(format!(
                "its bytes are not those of attached file {file} at {offset}"
            )),
            Ok(()) => None,
        };
        if let Some(why) = why {
            dropped += 1;
            why_dropped.get_or_insert_with(|| format!("{key}: {why}"));
            continue;
        }
        let write = ChunkWrite::FilePiece {
            data: piece,
            origin: claim.origin,
        };
        target
            .write_chunk(key, write)
            .map_err(MigrationError::Target)?;
        kept += 1;
    }
    tracing::debug!(
        kept,
        dropped,
        first_dropped = why_dropped.as_deref(),
        ms = ms(checking.elapsed()),
        "device chunk origins checked"
    );
    Ok(())
}

/// Refuses chunk origin `origin` of `len` bytes unless it lies inside a file `vm` offers:
/// the destination records it, and reads that file there for the VM's next migration.
fn check_origin(vm: &VmDescription, origin: ChunkOrigin, len: u64) -> Result<(), MigrationError> {
    let Some(file) = vm.files.get(origin.file as usize) else {
        return Err(MigrationError::BrokenSequence(format!(
            "a chunk origin in attached file {}, but {} were offered",
            origin.file,
            vm.files.len()
        )));
    };
    if origin
        .offset
        .checked_add(len)
        .is_none_or(|end| end > file.size)
    {
        return Err(MigrationError::BrokenSequence(format!(
            "a chunk origin of bytes {}..+{len} is outside attached file {} ({} bytes)",
            origin.offset, origin.file, file.size
        )));
    }
    Ok(())
}

/// Applies a frame of RAM or device memory to `target`, checked against the VM `vm`
/// offered first (its RAM size, its files); anything else (a file piece, a control
/// message) is out of place. A chunk's bytes sent with their origin are written without
/// it, and the origin is kept in `claims` to check (see [`ClaimedOrigins`]); without
/// `claims` such a chunk is refused (a snapshot names the file piece instead).
pub(crate) fn apply_data<T: MigrationTarget + ?Sized>(
    target: &T,
    frame: Frame<'_>,
    vm: &VmDescription,
    claims: Option<&ClaimedOrigins>,
) -> Result<(), MigrationError> {
    let ram_size = vm.ram_size;
    match frame {
        Frame::Ram { gpa, pages, data } => {
            let end = gpa.checked_add(pages * PAGE_SIZE);
            if end.is_none_or(|end| end > ram_size) {
                Err(MigrationError::BrokenSequence(format!(
                    "RAM record of {pages} pages at {gpa:#x} is outside the VM's {ram_size:#x} bytes"
                )))
            } else {
                let data = data.unwrap_or(&ZERO_RUN[..(pages * PAGE_SIZE) as usize]);
                target.write_ram(gpa, data).map_err(MigrationError::Target)
            }
        }
        // The wire checked `len` (at most a chunk, the data's length if any).
        Frame::Chunk {
            key,
            len,
            data,
            origin,
        } => {
            let data = data.unwrap_or(&ZERO_RUN[..len as usize]);
            let claims = match origin {
                Some(origin) => {
                    check_origin(vm, origin, len)?;
                    let claims = claims.ok_or_else(|| {
                        MigrationError::BrokenSequence(format!(
                            "the bytes of {key} with their origin, where a chunk from a file is named, not sent"
                        ))
                    })?;
                    Some((claims, origin))
                }
                None => None,
            };
            target
                .write_chunk(key, ChunkWrite::Whole(data))
                .map_err(MigrationError::Target)?;
            match claims {
                Some((claims, origin)) => claims.claim(key, origin, data),
                None => Ok(()),
            }
        }
        Frame::ChunkPart { key, offset, data } => target
            .write_chunk(key, ChunkWrite::Part { offset, data })
            .map_err(MigrationError::Target),
        Frame::FileChunk { key, len, origin } => {
            check_origin(vm, origin, len)?;
            target
                .write_chunk(key, ChunkWrite::LocalFile { len, origin })
                .map_err(MigrationError::Target)
        }
        Frame::File { .. } => Err(MigrationError::BrokenSequence(
            "a piece of an attached file where none was asked for".into(),
        )),
        Frame::Control(m) => Err(MigrationError::unexpected("a data frame", &m)),
    }
}

fn refuse(conn: &mut Conn, reason: String) -> MigrationError {
    let _ = conn.send(&Message::Refuse {
        reason: bounded_reason(reason.clone()),
    });
    MigrationError::Refused(reason)
}

/// Why an offered VM description is refused: a field no VM this host runs could have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadOffer {
    /// Too few or too many data streams.
    #[error("{0} data streams (1 to {MAX_STREAMS} allowed)")]
    Streams(u8),
    /// Guest RAM that is empty, not whole pages, or beyond the limit.
    #[error("guest RAM of {0} bytes")]
    Ram(u64),
    /// A workload name too long or with control characters.
    #[error("a workload name of {0} bytes, or with control characters (at most {MAX_WORKLOAD_NAME} printable)")]
    WorkloadName(usize),
    /// A backend kind or microkernel label too long or with control characters.
    #[error("a {what} of {len} bytes, or with control characters (at most {MAX_LABEL} printable)")]
    Label {
        /// Which label.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// An extra entry whose key or value is out of bounds.
    #[error("an extra entry with a key of {key} bytes, or with control characters, or a value of {value} bytes (keys of at most {MAX_EXTRA_KEY} printable, values of at most {MAX_EXTRA_VALUE})")]
    Extra {
        /// The key's length in bytes.
        key: usize,
        /// The value's length in bytes.
        value: usize,
    },
    /// An attached file's name is not a valid file name.
    #[error("attached file {index} has an invalid name {name:?}")]
    FileName {
        /// The file's place in the offer.
        index: usize,
        /// The name offered.
        name: String,
    },
    /// Two attached files have the same name.
    #[error("two attached files are named '{0}'")]
    DuplicateFile(String),
    /// An attached file's sha256 is not 64 lowercase hex digits.
    #[error("attached file '{name}' has an invalid sha256 {sha256:?} (64 lowercase hex digits)")]
    FileSha256 {
        /// The file's name.
        name: String,
        /// The digest offered.
        sha256: String,
    },
    /// An attached file's source path is too long or has control characters.
    #[error("attached file '{name}' has a path of {len} bytes, or with control characters (at most {MAX_WORKLOAD_NAME} printable)")]
    FilePath {
        /// The file's name.
        name: String,
        /// The path's length in bytes.
        len: usize,
    },
}

/// Checks an offered VM description (and its count of data streams) before anything is
/// prepared for it; a snapshot's description is checked the same way.
pub(crate) fn validate_offer(vm: &VmDescription, streams: u8) -> Result<(), BadOffer> {
    if !(1..=MAX_STREAMS).contains(&streams) {
        return Err(BadOffer::Streams(streams));
    }
    if vm.ram_size == 0 || !vm.ram_size.is_multiple_of(PAGE_SIZE) || vm.ram_size > MAX_RAM {
        return Err(BadOffer::Ram(vm.ram_size));
    }
    // What this host shows and logs of the VM: short, and without control characters (a
    // newline or a terminal's escape would forge lines).
    if !printable(&vm.name, MAX_WORKLOAD_NAME) {
        return Err(BadOffer::WorkloadName(vm.name.len()));
    }
    for (what, label) in [
        ("backend kind", &vm.backend_kind),
        ("microkernel", &vm.microkernel),
    ] {
        if !printable(label, MAX_LABEL) {
            return Err(BadOffer::Label {
                what,
                len: label.len(),
            });
        }
    }
    // The counts of `extra` and `files` were bounded as the offer was decoded
    // (`wire::at_most`).
    for (key, value) in &vm.extra {
        if !printable(key, MAX_EXTRA_KEY) || value.len() > MAX_EXTRA_VALUE {
            return Err(BadOffer::Extra {
                key: key.len(),
                value: value.len(),
            });
        }
    }
    // The VM could not take these files: refused now, not after the whole transfer.
    for (index, f) in vm.files.iter().enumerate() {
        if !valid_name(&f.name) {
            return Err(BadOffer::FileName {
                index,
                name: f.name.clone(),
            });
        }
        if vm.files[..index].iter().any(|o| o.name == f.name) {
            return Err(BadOffer::DuplicateFile(f.name.clone()));
        }
        if !valid_sha256(&f.sha256) {
            return Err(BadOffer::FileSha256 {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
            });
        }
        // Shown in this host's messages about the file.
        if !printable(&f.path, MAX_WORKLOAD_NAME) {
            return Err(BadOffer::FilePath {
                name: f.name.clone(),
                len: f.path.len(),
            });
        }
    }
    Ok(())
}

/// Whether `text` has at most `max` bytes and no control character: what an offer's
/// labels must be (a host creating a VM checks its workload the same way, so that every
/// VM it runs can migrate).
pub fn printable(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

/// The offered files the source must send: by `transfer`, the ones this host lacks, all
/// of them, or none (refused if this host lacks one).
fn files_to_send<T: MigrationTarget>(
    vm: &VmDescription,
    target: &T,
    transfer: FileTransfer,
) -> Result<Vec<u32>, String> {
    let all = 0..vm.files.len() as u32;
    let missing: Vec<u32> = all.clone().filter(|&i| !target.has_file(i)).collect();
    match transfer {
        FileTransfer::Reuse => Ok(missing),
        FileTransfer::Send => Ok(all.collect()),
        FileTransfer::Require if missing.is_empty() => Ok(Vec::new()),
        FileTransfer::Require => {
            let names: Vec<String> = missing
                .iter()
                .map(|&i| {
                    let f = &vm.files[i as usize];
                    format!(
                        "'{}' ({} bytes, sha256 {}, at {} on the source)",
                        f.name, f.size, f.sha256, f.path
                    )
                })
                .collect();
            Err(format!(
                "this host does not have the attached files {} (missing, or with other content), and the migration asked not to send files",
                names.join(", ")
            ))
        }
    }
}

/// Whether the peer has closed (or reset) `socket`, looking without taking anything.
/// Only for a socket nobody else reads meanwhile: it is made non-blocking for the look.
fn closed_by_peer(socket: &TcpStream) -> bool {
    if socket.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let closed = match socket.peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = socket.set_nonblocking(false);
    closed
}

/// How often the destination looks at the control connection while it waits for the
/// data streams.
const STREAM_WAIT_SLICE: Duration = Duration::from_millis(50);

/// The source's `streams` data connections, as they arrive; an error if they do not
/// within [`STREAM_WAIT`], or once the source closes its `control` connection (so a
/// source that died frees the VM prepared for it at once).
fn collect_streams(
    rx: &Receiver<(u8, DataConn)>,
    streams: u8,
    control: &TcpStream,
) -> Result<Vec<DataConn>, MigrationError> {
    let mut slots: Vec<Option<DataConn>> = (0..streams).map(|_| None).collect();
    let deadline = Instant::now() + STREAM_WAIT;
    while slots.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(STREAM_WAIT_SLICE)) {
            Ok((index, data)) => {
                let slot = slots.get_mut(usize::from(index)).ok_or_else(|| {
                    MigrationError::BrokenSequence(format!("data stream {index} of {streams}"))
                })?;
                if slot.is_some() {
                    return Err(MigrationError::BrokenSequence(format!(
                        "data stream {index} opened twice"
                    )));
                }
                *slot = Some(data);
            }
            Err(RecvTimeoutError::Timeout) if !left.is_zero() => {
                if closed_by_peer(control) {
                    return Err(MigrationError::BrokenSequence(
                        "the source closed its control connection before opening its data \
                         streams"
                            .into(),
                    ));
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::BrokenSequence(format!(
                    "the source did not open its {streams} data streams within {}s",
                    STREAM_WAIT.as_secs()
                )))
            }
        }
    }
    Ok(slots.into_iter().map(|s| s.expect("all filled")).collect())
}

/// What an offer asks for.
struct Offered {
    vm: VmDescription,
    streams: u8,
    transfer: Transfer,
    files: FileTransfer,
    device: DeviceTransfer,
}

/// Receives the VM `offer`ed on an authenticated control connection.
fn receive_vm<F: TargetFactory>(
    mut conn: Conn,
    control_socket: TcpStream,
    shared: Shared<'_, F>,
    offer: Offered,
) -> Result<(), MigrationError> {
    let Shared {
        factory, outcomes, ..
    } = shared;
    let started = Instant::now();
    let Offered {
        vm,
        streams,
        transfer,
        files: file_transfer,
        device,
    } = offer;
    if let Err(bad) = validate_offer(&vm, streams) {
        return Err(refuse(
            &mut conn,
            MigrationError::InvalidOffer(bad).to_string(),
        ));
    }
    // A replay place is taken before the costly work (a VM prepared, files hashed and
    // room made for them in the store): an offer that must replay and finds none costs
    // this host nothing more. (A host that turns out unable to replay would rather
    // refuse it, but it can replay whenever the VM has device memory.) Stop-and-copy
    // never replays: it takes no place.
    let wants_replay =
        device != DeviceTransfer::Precopy && vm.accel_memory > 0 && transfer == Transfer::Live;
    let replay_slot = wants_replay.then(|| shared.replay_slots.take()).flatten();
    if device == DeviceTransfer::Replay && wants_replay && replay_slot.is_none() {
        // Busy, not refused: it may come again once a replaying migration has ended.
        let reason = format!(
            "this host receives {MAX_REPLAY_SESSIONS} migrations that may replay device commands, its limit, until one ends (or ask for --device-transfer auto)"
        );
        let _ = conn.send(&Message::Busy {
            reason: reason.clone(),
        });
        return Err(MigrationError::Busy(reason));
    }
    let target = match factory.prepare(&vm) {
        Ok(t) => t,
        Err(e) => return Err(refuse(&mut conn, error_chain(&e))),
    };
    // Replay only with a device to replay on, a target that can, and a replay place.
    let can_replay = wants_replay && target.can_replay();
    if device == DeviceTransfer::Replay && !can_replay {
        return Err(refuse(
            &mut conn,
            "this host cannot replay the VM's device commands (ask for --device-transfer precopy or auto)".into(),
        ));
    }
    let replay_slot = replay_slot.filter(|_| can_replay);
    if can_replay && replay_slot.is_none() {
        tracing::info!(
            "{MAX_REPLAY_SESSIONS} incoming migrations may replay device commands, the limit: this one moves device memory by pre-copy"
        );
    }
    let send_files = match files_to_send(&vm, &target, file_transfer) {
        Ok(files) => files,
        Err(reason) => return Err(refuse(&mut conn, reason)),
    };
    if let Err(e) = target.receive_files(&send_files) {
        return Err(refuse(&mut conn, error_chain(&e)));
    }
    let mut file_sizes = vec![None; vm.files.len()];
    for &f in &send_files {
        file_sizes[f as usize] = Some(vm.files[f as usize].size);
    }
    tracing::debug!(ms = ms(started.elapsed()), "destination VM prepared");
    let mut session_bytes = [0u8; 8];
    getrandom::fill(&mut session_bytes).expect("the OS random source");
    let session = u64::from_le_bytes(session_bytes);
    if !outcomes.receiving(session) {
        return Err(refuse(
            &mut conn,
            "this host is shutting down: migrate the VM elsewhere".into(),
        ));
    }
    let accepted = Accepted {
        started,
        target: SessionVm {
            target: Some(target),
            outcomes,
            session,
        },
        vm,
        streams,
        send_files,
        file_sizes,
        replay: replay_slot,
    };
    receive_session(conn, control_socket, shared, accepted, session)
}

/// The VM of an incoming session until the host adopts it. Dropped unadopted (the session
/// failed, or the engine or the target panicked), it drops the VM first, which stops it
/// for good, and only then records that it never ran here: a source that asks is told
/// so only once that is true. A VM that resumed is answered for as running (see
/// [`Outcomes::unadopted`]).
struct SessionVm<'a, T> {
    /// The VM; `None` once adopted.
    target: Option<T>,
    outcomes: &'a Outcomes,
    session: u64,
}

impl<T> SessionVm<'_, T> {
    fn get(&self) -> &T {
        self.target.as_ref().expect("the VM is held until adopted")
    }

    /// The VM, for the host to adopt (it resumed).
    fn adopt(mut self) -> T {
        self.target.take().expect("the VM is held until adopted")
    }
}

impl<T> Drop for SessionVm<'_, T> {
    fn drop(&mut self) {
        // A target dropped stops its VM (see `MigrationTarget`): gone before recorded.
        // One adopted runs here: its session was recorded as run before.
        if let Some(target) = self.target.take() {
            drop(target);
            self.outcomes.unadopted(self.session);
        }
    }
}

/// An offer the destination accepted, with the VM prepared for it.
struct Accepted<'a, T> {
    /// When the offer arrived.
    started: Instant,
    target: SessionVm<'a, T>,
    vm: VmDescription,
    streams: u8,
    /// The offered files the source must send.
    send_files: Vec<u32>,
    /// Size of each offered file being sent (`None`: not sent), by offer index.
    file_sizes: Vec<Option<u64>>,
    /// The session's replay place, if the source may send device commands to replay.
    replay: Option<SessionSlot>,
}

/// The rest of [`receive_vm`] once the session exists: the VM runs here and is adopted
/// when it returns `Ok`.
fn receive_session<F: TargetFactory>(
    mut conn: Conn,
    control_socket: TcpStream,
    shared: Shared<'_, F>,
    accepted: Accepted<'_, F::Target>,
    session: u64,
) -> Result<(), MigrationError> {
    // The replay place is held to the session's end.
    let (started, streams, replay_slot) = (accepted.started, accepted.streams, accepted.replay);
    let replay = replay_slot.is_some();
    let sessions = shared.sessions;
    let (tx, rx) = channel();
    sessions.lock().expect("sessions lock").insert(session, tx);
    let opened = conn
        .send(&Message::Accept {
            session,
            send_files: accepted.send_files,
            replay,
        })
        .and_then(|()| collect_streams(&rx, streams, &control_socket));
    sessions.lock().expect("sessions lock").remove(&session);
    let data = opened?;
    tracing::debug!(ms = ms(started.elapsed()), "data streams collected");
    let (target, vm) = (accepted.target, accepted.vm);
    // Each data connection comes with a handle on its socket, to shut it down.
    let (mut readers, shutdowns): (Vec<Conn>, Vec<TcpStream>) = data.into_iter().unzip();
    let received = readers.iter_mut().map(|r| r.get_mut().read.clone());
    let claims = ClaimedOrigins::new(&vm);
    let inbound = Inbound::new(
        received.collect(),
        control_socket,
        accepted.file_sizes,
        claims,
    );
    let result = std::thread::scope(|scope| {
        // Before the threads: one that cannot start fails the session, and those started
        // must be ended with it, not left reading while the source keeps them open.
        let mut stream_threads = StreamsEnd {
            inbound: &inbound,
            sockets: shutdowns,
        };
        let mut handles = Vec::with_capacity(readers.len());
        let mut started = Ok(());
        for (i, reader) in readers.into_iter().enumerate() {
            let (target, vm, inbound) = (target.get(), &vm, &inbound);
            let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                let read = apply_stream(i, reader, target, vm, inbound);
                // Its connection is closed: a failed session lets go of its socket.
                inbound.lock().returned[i] = true;
                inbound.changed.notify_all();
                read
            });
            match spawned {
                Ok(handle) => handles.push(handle),
                // Out of threads or memory: a host's limit, not the source's fault.
                Err(source) => {
                    started = Err(MigrationError::StreamThread { index: i, source });
                    break;
                }
            }
        }
        let result = started
            .and_then(|()| {
                control_loop(
                    &mut conn,
                    target.get(),
                    &inbound,
                    (streams, replay),
                    (shared.outcomes, session),
                )
            })
            .map_err(|e| {
                // A failed data stream cut the control stream: its reason is the real one.
                inbound.lock().failed.take().unwrap_or(e)
            });
        if let Err(e) = &result {
            // Tell the source why before anything else, so it stops sending.
            if !matches!(
                e,
                MigrationError::PeerAborted(_) | MigrationError::Io { .. }
            ) {
                let _ = conn.send(&Message::Abort {
                    reason: bounded_reason(error_chain(e)),
                });
            }
        }
        // Done, the source has sent everything: the stream threads blocked in reads are
        // woken. On failure they return at their next frame, or at the source's close
        // once it has the Abort. Their sockets then close with data unread, which resets
        // the connection, so a source blocked writing fails at once. (Shutting the read
        // side instead would leave the source probing a zero window until the kernel's
        // FIN timeout.) Those still reading after a grace are shut down (see `end`).
        stream_threads.end(result.is_ok());
        let data_bytes: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        result.map(|rounds| (rounds, data_bytes))
    });
    let (rounds, data_bytes) = result?;
    let report = ReceiveReport {
        vm,
        rounds,
        bytes_received: conn.bytes_read + data_bytes,
        total_ms: ms(started.elapsed()),
    };
    tracing::info!(vm = %report.vm.name, rounds, bytes = report.bytes_received, "VM received and running");
    // Adopted before the source hears it runs here: a client the source then sends
    // here finds the VM listed as running, not an earlier stay's record.
    shared.factory.adopt(target.adopt(), report);
    // The VM runs here now; a lost confirmation leaves it running here and paused at
    // the source, never running on both.
    let _ = conn.send(&Message::Resumed);
    Ok(())
}

/// A session's data stream threads, to end once the control conversation does: they
/// return at their next frame, or at once when their sockets are shut down.
struct StreamsEnd<'a> {
    inbound: &'a Inbound,
    /// The data connections' sockets.
    sockets: Vec<TcpStream>,
}

/// How long the stream threads of a failed session are given to return on their own (at
/// their next frame, or at the source's close once it has the Abort: moments for a source
/// that sends or hears) before the sockets of those still reading are shut down.
const STREAMS_END_GRACE: Duration = Duration::from_secs(2);

impl StreamsEnd<'_> {
    /// Ends the stream threads, shutting their sockets down at once if `shut_down`. Else
    /// each handle is let go as its thread returns (so the socket closes, resetting a
    /// source blocked writing), and the sockets of threads still reading after
    /// [`STREAMS_END_GRACE`] are shut down: a source that keeps its data connections open,
    /// idle or trickling a frame, would otherwise hold the discarded VM (its memory, its
    /// files, the session's place) for an idle limit, or an idle limit per KiB of a frame.
    fn end(&mut self, shut_down: bool) {
        self.inbound.lock().done = true;
        self.inbound.changed.notify_all();
        if shut_down {
            for socket in self.sockets.drain(..) {
                let _ = socket.shutdown(Shutdown::Both);
            }
            return;
        }
        let mut open: Vec<(usize, TcpStream)> = self.sockets.drain(..).enumerate().collect();
        let deadline = Instant::now() + STREAMS_END_GRACE;
        loop {
            let returned = self.inbound.lock().returned.clone();
            open.retain(|(i, _)| !returned[*i]);
            let left = deadline.saturating_duration_since(Instant::now());
            if open.is_empty() || left.is_zero() {
                break;
            }
            let s = self.inbound.lock();
            let _ = self
                .inbound
                .changed
                .wait_timeout_while(s, left, |s| s.returned == returned);
        }
        for (_, socket) in open {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for StreamsEnd<'_> {
    fn drop(&mut self) {
        // The control thread panicked (a bug, in the engine or the target): the scope
        // waits for the stream threads before the VM is dropped, and nothing else would
        // wake them until the source gave up.
        self.end(std::thread::panicking());
    }
}

/// What the allocator spends on an allocation beyond its bytes, at least (glibc: a
/// header of 8 bytes, sizes rounded to 16).
const ALLOCATION_OVERHEAD: u64 = 16;

/// How much more memory than the source's weight bound a round's commands may take here
/// (numerator, denominator): a command takes its weight and at most two allocations'
/// overhead, 32 bytes for the 65 it weighs at least with both (an argument and a byte of
/// payload: 97 / 65 < 3 / 2), and the vector of them gives back room it kept for more
/// commands once their buffers need it.
const COMMAND_MEMORY_RATIO: (u64, u64) = (3, 2);

/// Bytes of memory `v`'s buffer takes.
fn allocated<T>(v: &Vec<T>) -> u64 {
    match v.capacity() * std::mem::size_of::<T>() {
        0 => 0,
        bytes => bytes as u64 + ALLOCATION_OVERHEAD,
    }
}

/// The open round's device commands, kept until its data is in, within a bound on the
/// memory they hold: what is allocated, not what the commands weigh (each buffer's
/// overhead, and the room a growing vector of them keeps). The bound is
/// [`COMMAND_MEMORY_RATIO`] of the weight a source sends in a round at most, so that
/// every round a source sends fits.
struct RoundCommands {
    commands: Vec<LoggedCommand>,
    /// Bytes of the commands' own buffers (payloads, arguments).
    buffers: u64,
    /// The most memory held.
    limit: u64,
}

impl RoundCommands {
    /// Commands kept for rounds of at most `weight_limit` of weight.
    fn new(weight_limit: u64) -> Self {
        let (num, den) = COMMAND_MEMORY_RATIO;
        Self {
            commands: Vec::new(),
            buffers: 0,
            limit: weight_limit / den * num,
        }
    }

    /// Bytes of memory held.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.buffers + allocated(&self.commands)
    }

    fn len(&self) -> usize {
        self.commands.len()
    }

    fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Keeps `batch` after those kept, or returns the bytes it would make them hold, over
    /// the limit.
    fn add(&mut self, batch: Vec<LoggedCommand>) -> Result<(), u64> {
        let mut buffers = self.buffers;
        for command in &batch {
            buffers += allocated(&command.payload) + allocated(&command.args);
        }
        let size = std::mem::size_of::<LoggedCommand>() as u64;
        let (len, capacity) = (self.commands.len() + batch.len(), self.commands.capacity());
        let exact = buffers + len as u64 * size + ALLOCATION_OVERHEAD;
        if exact > self.limit {
            return Err(exact);
        }
        if len > capacity {
            // Doubled while the limit leaves room for it (few copies), else no more than
            // needed.
            let room = (self.limit - buffers - ALLOCATION_OVERHEAD) / size;
            let doubled = len.max(2 * capacity);
            let grown = if doubled as u64 <= room { doubled } else { len };
            self.commands.reserve_exact(grown - self.commands.len());
        } else if buffers + allocated(&self.commands) > self.limit {
            // Room the vector kept for more commands, needed for these ones' buffers.
            self.commands.shrink_to(len);
        }
        let held = buffers + allocated(&self.commands);
        if held > self.limit {
            return Err(held);
        }
        self.commands.extend(batch);
        self.buffers = buffers;
        Ok(())
    }

    /// The commands kept, to replay; none are kept after.
    fn take(&mut self) -> Vec<LoggedCommand> {
        self.buffers = 0;
        std::mem::take(&mut self.commands)
    }
}

/// The control conversation after the streams are open; returns the rounds applied.
fn control_loop<T: MigrationTarget>(
    conn: &mut Conn,
    target: &T,
    inbound: &Inbound,
    (streams, replay): (u8, bool),
    (outcomes, session): (&Outcomes, u64),
) -> Result<u32, MigrationError> {
    let mut expected_round = 0u32;
    let mut expected_frames = vec![0u64; usize::from(streams)];
    // The open round's device commands, replayed once its data is in.
    let mut round_commands = RoundCommands::new(MAX_ROUND_COMMAND_BYTES);
    // Whether the open round began without a buffer table (its commands make it).
    let mut round_replays = false;
    // Whether the device memory here was last made by replayed commands: the final state
    // must then bring the source's digest, or a replay that went astray would go unseen.
    // A later round with its table and no commands (pre-copy taking over) resends it.
    let mut device_replayed = false;
    // When the source last moved the migration on (not counting keepalives), and the
    // most data bytes seen then.
    let mut progress = Instant::now();
    let mut data_seen = 0;
    loop {
        let message = conn.expect_control("the next round")?;
        if matches!(message, Message::Keepalive) {
            // The source is at work on a long round; the idle limit starts again, unless
            // all it did for that long was say so (a source at work sends data, if slowly).
            let s = inbound.lock();
            let data = inbound.data_bytes(&s);
            if data > data_seen {
                (data_seen, progress) = (data, Instant::now());
            }
            let since = progress.max(s.last_data).elapsed();
            let limit = crate::deadline::idle_limit();
            if s.in_flight == 0 && since > limit {
                return Err(MigrationError::TimedOut {
                    phase: format!("round {}", s.round),
                    what: "receiving keepalives and no data".into(),
                    limit_ms: limit.as_millis() as u64,
                });
            }
            continue;
        }
        match message {
            Message::BeginRound { round, buffers } => {
                if round != expected_round {
                    return Err(MigrationError::BrokenSequence(format!(
                        "round {round} began, expected {expected_round}"
                    )));
                }
                if inbound.lock().round_open {
                    return Err(MigrationError::BrokenSequence(format!(
                        "round {round} began again while it was open"
                    )));
                }
                round_replays = buffers.is_none();
                match buffers {
                    Some(buffers) => sync_buffers(target, &buffers)?,
                    // The base came with round 0: later rounds may leave the table to
                    // the replayed commands.
                    None if replay && round > 0 => {}
                    None => {
                        return Err(MigrationError::BrokenSequence(format!(
                            "round {round} began without a device buffer table"
                        )))
                    }
                }
                inbound.open_round(round);
            }
            Message::EndRound { round, frames } => {
                if round != expected_round || frames.len() != usize::from(streams) {
                    return Err(MigrationError::BrokenSequence(format!(
                        "round {round} ended with {} stream counts (expected round {expected_round}, {streams} streams)",
                        frames.len()
                    )));
                }
                if !inbound.lock().round_open {
                    return Err(MigrationError::BrokenSequence(format!(
                        "round {round} ended before it began"
                    )));
                }
                for (total, n) in expected_frames.iter_mut().zip(&frames) {
                    *total = total.checked_add(*n).ok_or_else(|| {
                        MigrationError::BrokenSequence("frame count overflow".into())
                    })?;
                }
                let pending = |s: &InboundState| {
                    s.failed.is_none()
                        && (s.in_flight > 0
                            || s.applied.iter().zip(&expected_frames).any(|(a, e)| a < e))
                };
                // Waits while frames arrive or are applied, however long that takes (up
                // to the idle limit without one): a file chunk is a few bytes on the wire
                // and a 64 KiB read of this host's copy of the file, so a large model's
                // are mostly read after the round's end, at the speed of this disk. The
                // source, which waits its I/O timeout for the answer, is told at once and
                // then every keepalive period that it is still at work.
                let ended = Instant::now();
                let (limit, every) = (
                    crate::deadline::idle_limit(),
                    crate::deadline::keepalive_every(),
                );
                let mut keepalive = ended;
                let mut s = inbound.lock();
                s.ending = true;
                while pending(&s) {
                    let left = limit.saturating_sub(s.last_data.max(ended).elapsed());
                    if left.is_zero() {
                        return Err(MigrationError::BrokenSequence(format!(
                            "round {round}'s frames stopped arriving for {} ms before all of them were applied",
                            limit.as_millis()
                        )));
                    }
                    let until_keepalive = keepalive.saturating_duration_since(Instant::now());
                    if until_keepalive.is_zero() {
                        drop(s);
                        conn.send(&Message::Keepalive)?;
                        keepalive = Instant::now() + every;
                        s = inbound.lock();
                        continue;
                    }
                    s = inbound
                        .changed
                        .wait_timeout_while(s, left.min(until_keepalive), |s| pending(s))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if let Some(failed) = s.failed.take() {
                    return Err(failed);
                }
                if s.applied != expected_frames {
                    return Err(MigrationError::BrokenSequence(format!(
                        "round {round}: more frames than announced"
                    )));
                }
                // Closed under the lock that saw no frame in flight: no stream takes one
                // into it after its count was judged.
                (s.round_open, s.ending) = (false, false);
                drop(s);
                if round == 0 {
                    // The attached files were all sent with round 0: check they are whole
                    // (before the pause, while the VM still runs on the source).
                    inbound
                        .files_complete()
                        .map_err(MigrationError::BrokenSequence)?;
                    target.files_received().map_err(MigrationError::Target)?;
                }
                // Before the replay, whose writes must clear the origins kept.
                keep_true_origins(conn, target, inbound.claims.take())?;
                device_replayed = round_replays || !round_commands.is_empty();
                if !round_commands.is_empty() {
                    let (n, replaying) = (round_commands.len(), Instant::now());
                    // Bounded: the source waits at most about as long, and a peer's
                    // commands may not hold this host's device for ever.
                    let deadline = replaying + MAX_ROUND_REPLAY + REPLAY_GRACE;
                    target
                        .replay(round_commands.take(), deadline)
                        .map_err(MigrationError::Target)?;
                    tracing::debug!(
                        commands = n,
                        ms = ms(replaying.elapsed()),
                        "device commands replayed"
                    );
                }
                conn.send(&Message::RoundApplied { round })?;
                expected_round = expected_round.checked_add(1).ok_or_else(|| {
                    MigrationError::BrokenSequence(format!("more than {} rounds", u32::MAX))
                })?;
            }
            Message::Commands { commands } => {
                let open = inbound.lock().round_open;
                if !replay || !open || expected_round == 0 {
                    return Err(MigrationError::BrokenSequence(format!(
                        "device commands sent {}",
                        if replay {
                            "outside a round after the base"
                        } else {
                            "without replay agreed"
                        }
                    )));
                }
                // Kept until the round's data is in, then replayed: reading goes on (a
                // source blocked writing a replaying destination would time out), and
                // what is kept is bounded. The commands are the round's data so far: the
                // data streams, which wait for them, wait on.
                inbound.lock().last_data = Instant::now();
                let limit = round_commands.limit;
                round_commands.add(commands).map_err(|held| {
                    MigrationError::BrokenSequence(format!(
                        "device commands of round {expected_round} would take {held} bytes of memory here, more than {limit}"
                    ))
                })?;
            }
            Message::State { blob, device } => {
                {
                    let mut s = inbound.lock();
                    if let Some(failed) = s.failed.take() {
                        return Err(failed);
                    }
                    if s.round_open || expected_round == 0 {
                        return Err(MigrationError::BrokenSequence(
                            "final state sent before the last round was complete".into(),
                        ));
                    }
                    // Its end compared the counts and closed it at once (under one lock):
                    // no frame came into it since.
                    debug_assert_eq!(s.applied, expected_frames);
                }
                match device {
                    Some(_) if !replay => {
                        return Err(MigrationError::BrokenSequence(
                            "a device digest without replay agreed".into(),
                        ))
                    }
                    Some(source) => {
                        let here = target.device_digest().map_err(MigrationError::Target)?;
                        if let Some(why) = source.difference(&here) {
                            return Err(MigrationError::DeviceDiverged(why));
                        }
                    }
                    None if device_replayed => {
                        return Err(MigrationError::BrokenSequence(
                            "the final state came without the digest of the device memory the replayed commands made here".into(),
                        ))
                    }
                    None => {}
                }
                let restoring = Instant::now();
                target.restore(&blob).map_err(MigrationError::Target)?;
                tracing::debug!(ms = ms(restoring.elapsed()), "state restored");
                conn.send(&Message::Ready)?;
                match conn.expect_control("go")? {
                    Message::Go => {}
                    other => return Err(MigrationError::unexpected("go", &other)),
                }
                if !outcomes.begin_resume(session) {
                    // Fenced by a settle question, or by this host's shutdown.
                    let why = if outcomes.is_closed() {
                        "this host is shutting down: it runs no VM arriving now"
                    } else {
                        "the source settled this migration as not run here before its Go arrived"
                    };
                    return Err(MigrationError::BrokenSequence(why.into()));
                }
                let resuming = Instant::now();
                target.resume().map_err(MigrationError::Target)?;
                outcomes.ended(session, true);
                tracing::debug!(ms = ms(resuming.elapsed()), "resumed");
                return Ok(expected_round);
            }
            other => {
                return Err(MigrationError::unexpected(
                    "the next round or the final state",
                    &other,
                ))
            }
        }
        progress = Instant::now();
    }
}

pub(crate) fn sync_buffers<T: MigrationTarget + ?Sized>(
    target: &T,
    buffers: &[DeviceBuffer],
) -> Result<(), MigrationError> {
    target.sync_buffers(buffers).map_err(MigrationError::Target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::COMMAND_BATCH;
    use crate::wire::{FrameReader, FrameWriter};

    #[test]
    fn a_blocked_accept_is_woken_without_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let waker = listener.try_clone().unwrap();
        let (accepted, result) = mpsc::channel();
        std::thread::spawn(move || accepted.send(listener.accept().map(|_| ())));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            result.try_recv().is_err(),
            "accept returned with nobody connecting"
        );
        wake_accept(&waker).unwrap();
        let woken = result.recv_timeout(Duration::from_secs(5));
        assert!(matches!(woken, Ok(Err(_))), "{woken:?}");
    }

    #[test]
    fn an_accept_out_of_descriptors_waits_before_trying_again_a_lost_connection_does_not() {
        let mut failures = AcceptFailures::new("test connections");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(failures.failed(&emfile), Some(ACCEPT_BACKOFF));
        assert!(failures.logged.is_some());
        // Logged at most once a second: counted meanwhile.
        assert_eq!(failures.failed(&emfile), Some(ACCEPT_BACKOFF));
        assert_eq!(failures.count, 1);
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(failures.failed(&aborted), None);
    }

    /// A VM of 1 MiB of RAM, `accel_memory` and `files`.
    fn description(
        name: &str,
        accel_memory: u64,
        files: Vec<crate::vm::FileOffer>,
    ) -> VmDescription {
        VmDescription {
            name: name.into(),
            ram_size: 1 << 20,
            vcpus: 1,
            accel_memory,
            abi_version: 1,
            state_version: 1,
            backend_kind: "cpu".into(),
            kernel_version: 1,
            microkernel: String::new(),
            extra: Vec::new(),
            files,
            cpu_features: Vec::new(),
        }
    }

    #[test]
    fn a_round_opened_after_a_long_wait_gives_its_data_streams_the_whole_idle_limit() {
        let (control, _peer) = crate::tcp_pair();
        let vm = description("idle", 0, Vec::new());
        let inbound = Inbound::new(Vec::new(), control, Vec::new(), ClaimedOrigins::new(&vm));
        let limit = crate::deadline::idle_limit();
        // The last round's data came longer than the idle limit ago (its replay, the
        // next round's commands): a machine up that long only.
        let Some(long_ago) = Instant::now().checked_sub(limit + Duration::from_secs(1)) else {
            ferry_testdata::cannot_run_here(
                "a_round_opened_after_a_long_wait_gives_its_data_streams_the_whole_idle_limit",
                "the machine has not been up for the idle limit",
            );
            return;
        };
        inbound.lock().last_data = long_ago;
        inbound.open_round(1);
        assert!(
            inbound.waits_on(),
            "a stream timed out before the round's first frame"
        );
    }

    /// Bytes of memory `commands` take, counted from their allocations.
    fn allocated_by(commands: &RoundCommands) -> u64 {
        let size = std::mem::size_of::<LoggedCommand>();
        let buffers: usize = commands
            .commands
            .iter()
            .map(|c| c.payload.capacity() + 8 * c.args.capacity())
            .sum();
        (commands.commands.capacity() * size + buffers) as u64
    }

    /// `commands` as a destination decodes them off the wire.
    fn decoded(commands: Vec<LoggedCommand>) -> Vec<LoggedCommand> {
        let mut w = FrameWriter::new(Vec::new(), false);
        w.send(&Message::Commands { commands }).unwrap();
        let bytes = w.into_inner();
        match FrameReader::new(&bytes[..], 0).read() {
            Ok(Frame::Control(Message::Commands { commands })) => commands,
            other => panic!("{other:?}"),
        }
    }

    fn upload(bytes: usize) -> LoggedCommand {
        LoggedCommand {
            opcode: 3,
            args: vec![1, 2],
            payload: vec![9; bytes],
            status: 0,
        }
    }

    /// Keeps `commands` in batches as a source sends them (at most [`COMMAND_BATCH`] of
    /// weight each), decoded; the error of the first batch refused.
    fn keep_as_sent(kept: &mut RoundCommands, commands: Vec<LoggedCommand>) -> Result<(), u64> {
        let (mut batch, mut weight) = (Vec::new(), 0);
        for command in commands {
            if !batch.is_empty() && weight + command.weight() > COMMAND_BATCH {
                kept.add(decoded(std::mem::take(&mut batch)))?;
                weight = 0;
            }
            weight += command.weight();
            batch.push(command);
        }
        kept.add(decoded(batch))
    }

    /// A VM that must not be written: what is refused never reaches it.
    struct Untouched;

    impl MigrationTarget for Untouched {
        fn write_ram(&self, _: u64, _: &[u8]) -> Result<(), VmError> {
            unreachable!("RAM written")
        }
        fn sync_buffers(&self, _: &[DeviceBuffer]) -> Result<(), VmError> {
            unreachable!("buffers synced")
        }
        fn write_chunk(&self, chunk: ChunkKey, _: ChunkWrite<'_>) -> Result<(), VmError> {
            unreachable!("{chunk} written")
        }
        fn restore(&self, _: &[u8]) -> Result<(), VmError> {
            unreachable!("restored")
        }
        fn resume(&self) -> Result<(), VmError> {
            unreachable!("resumed")
        }
    }

    #[test]
    fn a_chunks_bytes_with_their_origin_are_refused_where_origins_are_not_checked() {
        // A snapshot names the file pieces its chunks hold; it never sends both.
        let vm = description(
            "snapshot",
            1 << 20,
            vec![crate::vm::FileOffer {
                name: "model".into(),
                size: 4096,
                sha256: "0".repeat(64),
                path: "/models/model".into(),
            }],
        );
        let frame = Frame::Chunk {
            key: ChunkKey {
                buffer: 1,
                index: 0,
            },
            len: 100,
            data: Some(&[7; 100]),
            origin: Some(ChunkOrigin { file: 0, offset: 0 }),
        };
        match apply_data(&Untouched, frame, &vm, None) {
            Err(MigrationError::BrokenSequence(why)) => assert!(why.contains("origin"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_decoded_upload_holds_exactly_its_bytes() {
        let sent = upload((1 << 20) + 1);
        let command = decoded(vec![sent.clone()]).remove(0);
        assert_eq!(command, sent);
        assert_eq!(command.payload.capacity(), command.payload.len());
        assert_eq!(command.args.capacity(), command.args.len());
    }

    #[test]
    fn a_round_at_the_sources_weight_bound_is_kept_however_its_commands_allocate() {
        const WEIGHT: u64 = 24 << 20;
        let command = |args: usize, payload: usize| LoggedCommand {
            opcode: 5,
            args: vec![7; args],
            payload: vec![1; payload],
            status: 0,
        };
        // The most memory per weight: an argument and a byte of payload (two allocations
        // for 65 bytes of weight), or an argument alone; and empty commands first, enough
        // to double the vector to 32 MiB of the 36 allowed, then the worst.
        let round = |parts: &[(LoggedCommand, u64)]| -> Vec<LoggedCommand> {
            parts
                .iter()
                .flat_map(|(c, weight)| vec![c.clone(); (weight / c.weight()) as usize])
                .collect()
        };
        for commands in [
            round(&[(command(1, 1), WEIGHT)]),
            round(&[(command(1, 0), WEIGHT)]),
            round(&[(command(0, 0), 17 << 20), (command(1, 1), 7 << 20)]),
        ] {
            let weight: u64 = commands.iter().map(LoggedCommand::weight).sum();
            assert!(weight <= WEIGHT && weight > WEIGHT - 128);
            let (n, last) = (commands.len(), commands[commands.len() - 1].clone());
            let mut kept = RoundCommands::new(WEIGHT);
            keep_as_sent(&mut kept, commands).unwrap_or_else(|held| {
                panic!("a round of {n} commands, {weight} bytes of weight, refused at {held} bytes")
            });
            assert_eq!(kept.len(), n);
            assert!(allocated_by(&kept) <= kept.held());
            assert!(kept.held() <= kept.limit);
            // Beyond the source's bound, refused once the memory bound is reached.
            let refused = loop {
                match kept.add(decoded(vec![last.clone(); 1000])) {
                    Ok(()) => {
                        assert!(allocated_by(&kept) <= kept.held());
                        assert!(kept.held() <= kept.limit, "{} bytes held", kept.held());
                    }
                    Err(held) => break held,
                }
            };
            assert!(refused > kept.limit, "refused at {refused} bytes");
        }
    }

    #[test]
    fn a_round_keeps_no_more_command_memory_than_its_bound() {
        // Memory for 24 MiB of commands.
        const WEIGHT: u64 = 16 << 20;
        const LIMIT: u64 = WEIGHT * 3 / 2;
        // Payloads just over 1 MiB: decoded by doubling, they would take 2 MiB each.
        let mut kept = RoundCommands::new(WEIGHT);
        assert_eq!(kept.limit, LIMIT);
        let mut taken = 0;
        while kept.add(decoded(vec![upload((1 << 20) + 1)])).is_ok() {
            taken += 1;
            assert!(allocated_by(&kept) <= kept.held());
            assert!(kept.held() <= LIMIT, "{} bytes held", kept.held());
        }
        assert!(
            taken >= 22,
            "only {taken} MiB-sized commands kept in 24 MiB"
        );
        assert_eq!(kept.take().len(), taken);
        assert_eq!(kept.held(), 0);
        // Empty commands in batches: the vector of them grows within the bound too.
        let mut kept = RoundCommands::new(WEIGHT);
        let batch = 10_000;
        let mut taken = 0;
        while kept
            .add(decoded(vec![
                LoggedCommand {
                    opcode: 1,
                    args: Vec::new(),
                    payload: Vec::new(),
                    status: 0,
                };
                batch
            ]))
            .is_ok()
        {
            taken += batch;
            assert!(allocated_by(&kept) <= kept.held());
            assert!(kept.held() <= LIMIT, "{} bytes held", kept.held());
        }
        let most = LIMIT as usize / std::mem::size_of::<LoggedCommand>();
        assert!(taken + batch > most, "only {taken} of {most} commands kept");
    }
}
