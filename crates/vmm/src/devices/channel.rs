//! The message channel ([`ferry_abi::channel`]): requests the host queues for the guest,
//! delivered into the request ring at the guest's kicks, and the guest's responses, kept
//! per stream until the host releases them.
//!
//! Everything the channel holds (the ring's geometry and indices, requests not yet in the
//! ring, every stream's responses) is saved with the VM, so a request queued before a
//! migration's pause is delivered on the destination exactly once, and a reader that
//! had the first `k` responses of a stream on the source reads the rest there.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_abi::channel::{
    flags, status, ChannelHeader, MessageHeader, CHANNEL_MAGIC, CHANNEL_VERSION, MAX_KICK_WAIT_US,
    MESSAGE_HEADER_SIZE,
};
use ferry_abi::{IMAGE_BASE, PAGE_SIZE};
use ferry_migrate::wire::at_most;
use serde::{Deserialize, Serialize};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestRam;

/// Most requests queued on the host beyond those in the ring.
pub const MAX_QUEUED: usize = 32;
/// Most streams kept at once, open or ended but not yet released.
pub const MAX_STREAMS: usize = 64;
/// Most entries the queue holds: the queued requests and one control message (a cancel
/// or a release notice) per stream. A saved queue holds no more ([`queued_at_most`]).
const MAX_QUEUE_ENTRIES: usize = MAX_QUEUED + MAX_STREAMS;
/// Most payload bytes one stream may hold unread (a read from index K lets go of what
/// came before K); a guest sending more ends the stream as [`StreamEnd::Overflow`].
pub const MAX_STREAM_BYTES: usize = 96 << 10;
/// Most responses one stream may hold unread, however small (the host keeps a record of
/// each, so empty ones must not come free); a guest sending more ends the stream as
/// [`StreamEnd::Overflow`]. Room for a token each of the longest answer the gateway
/// asks for (4,096 tokens), twice over.
pub const MAX_STREAM_EVENTS: usize = 8192;
/// Most messages taken from, or written to, each ring at one kick.
const MAX_PER_KICK: u64 = 64;

// The saved channel fits in a migration's control message (16 MiB): a saved response
// takes its payload and at most 8 bytes more (two varints); the queue holds the queued
// requests and one control message (a cancel, or a release notice) per stream, each at
// most a slot.
const _: () = assert!(
    MAX_STREAMS * (MAX_STREAM_BYTES + 8 * MAX_STREAM_EVENTS)
        + MAX_QUEUE_ENTRIES * ferry_abi::channel::MAX_SLOT_SIZE as usize
        <= 16 << 20
);

/// One message: a request the host queued, or one response of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// What it is (up to the host's server and the guest).
    pub kind: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// How a stream ended, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamEnd {
    /// The guest may still respond.
    Open,
    /// The guest sent its final response.
    Final,
    /// The guest sent more than [`MAX_STREAM_BYTES`]; later responses were dropped.
    Overflow,
    /// The VM ended before the stream did.
    VmEnded,
}

/// The ring the guest set up, as checked and copied at setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Ring {
    addr: u64,
    request_slots: u32,
    request_slot_size: u32,
    response_slots: u32,
    response_slot_size: u32,
}

impl Ring {
    fn header(&self) -> ChannelHeader {
        ChannelHeader {
            request_slots: self.request_slots,
            request_slot_size: self.request_slot_size,
            response_slots: self.response_slots,
            response_slot_size: self.response_slot_size,
            ..ChannelHeader::default()
        }
    }

    /// Largest payload a request slot takes.
    fn request_payload(&self) -> usize {
        (self.request_slot_size - MESSAGE_HEADER_SIZE) as usize
    }
}

/// A request waiting for room in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Queued {
    stream: u64,
    delivery: Delivery,
    message: Message,
}

/// What a queued request is to its stream, as the flags it is delivered with say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Delivery {
    /// It opens the stream ([`flags::OPEN`]).
    Opens,
    /// A control message for the open stream (a cancel).
    Signal,
    /// The host let go of the open stream ([`flags::RELEASED`]).
    Released,
}

impl Queued {
    /// The notice that the host let go of `stream` (kind 0, empty).
    fn released(stream: u64) -> Self {
        Self {
            stream,
            delivery: Delivery::Released,
            message: Message {
                kind: 0,
                payload: Vec::new(),
            },
        }
    }
}

impl Delivery {
    fn flags(self) -> u32 {
        match self {
            Delivery::Opens => flags::OPEN,
            Delivery::Signal => 0,
            Delivery::Released => flags::RELEASED,
        }
    }
}

/// One stream's responses not yet let go of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stream {
    id: u64,
    /// The stream's index of `events[0]`: those before it were read and let go of.
    first: usize,
    #[serde(deserialize_with = "at_most::<_, _, MAX_STREAM_EVENTS>")]
    events: Vec<Message>,
    /// Payload bytes of `events`.
    bytes: usize,
    end: StreamEnd,
    /// Control messages the host sent after the opening request (one is enough: cancel).
    signalled: bool,
    /// Whether a read returned its last response after it ended: then only a release
    /// lost on the way is missing (or that read's answer, lost: read again), and it goes
    /// first when room is needed, [`READ_WHOLE_GRACE`] after that read.
    read_whole: bool,
    /// When this ended stream's grace began: the read that returned its end, or, for one
    /// unread (or restored), when room for another stream was first sought since; its
    /// place is kept [`READ_WHOLE_GRACE`] or [`UNREAD_END_GRACE`] from then. This host's
    /// own clock: not part of the saved state (a destination's grace starts anew).
    #[serde(skip)]
    grace_since: Option<Instant>,
}

/// Which of `streams` (all [`MAX_STREAMS`] places taken, at `now`) that `may_go` lets go
/// gives up its place for a new one: the oldest whose reader has had it all for
/// [`READ_WHOLE_GRACE`], else the oldest that ended unread [`UNREAD_END_GRACE`] ago (its
/// reader may never come: a stream is not kept for ever). One whose reader may be about
/// to come, or to read its end again (the answer to its read lost), keeps its place:
/// taking it would lose its answer's end.
fn place_to_take(
    streams: &mut [Stream],
    now: Instant,
    may_go: impl Fn(&Stream) -> bool,
) -> Result<usize, SubmitError> {
    for s in streams.iter_mut() {
        if s.end != StreamEnd::Open {
            s.grace_since.get_or_insert(now);
        }
    }
    let past = |s: &Stream, grace| {
        s.end != StreamEnd::Open
            && s.grace_since
                .is_some_and(|since| now.saturating_duration_since(since) >= grace)
            && may_go(s)
    };
    (streams.iter())
        .position(|s| s.read_whole && past(s, READ_WHOLE_GRACE))
        .or_else(|| streams.iter().position(|s| past(s, UNREAD_END_GRACE)))
        .ok_or(SubmitError::TooManyStreams)
}

/// How long a stream that ended keeps its place, unread, while another stream needs it:
/// its reader (the center's gateway) may be held up by a slow client for up to a
/// minute between two reads; past this it is taken for gone.
pub const UNREAD_END_GRACE: Duration = Duration::from_secs(120);

/// How long a stream whose end was read keeps its place: the reader whose answer was
/// lost reads again within its read's time limit (seconds), here or where the VM went.
pub const READ_WHOLE_GRACE: Duration = Duration::from_secs(15);

impl Stream {
    /// Stream `id`, just opened: nothing answered yet.
    fn opened(id: u64) -> Self {
        Self {
            id,
            first: 0,
            events: Vec::new(),
            bytes: 0,
            end: StreamEnd::Open,
            signalled: false,
            read_whole: false,
            grace_since: None,
        }
    }

    /// Whether its guest is to be told ([`flags::RELEASED`]) when the host lets go of it
    /// now: it may still be answering (open, or overflowed), and no control message (a
    /// cancel) went to it. (Any control message stands for the notice: the workload's, a
    /// cancel, already says what to do.)
    fn owed_notice(&self) -> bool {
        matches!(self.end, StreamEnd::Open | StreamEnd::Overflow) && !self.signalled
    }

    /// Drops the responses before stream index `from`: their reader has them.
    fn let_go_before(&mut self, from: usize) {
        let n = from.saturating_sub(self.first).min(self.events.len());
        if n > 0 {
            let gone: usize = self.events.drain(..n).map(|m| m.payload.len()).sum();
            self.bytes = self.bytes.saturating_sub(gone);
            self.first += n;
        }
    }
}

/// The saved channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    ring: Option<Ring>,
    request_head: u64,
    request_tail: u64,
    response_tail: u64,
    #[serde(deserialize_with = "queued_at_most")]
    queued: VecDeque<Queued>,
    /// Oldest first.
    #[serde(deserialize_with = "at_most::<_, _, MAX_STREAMS>")]
    streams: Vec<Stream>,
    /// Responses the guest sent to streams that were not open.
    dropped: u64,
}

/// A saved queue, of at most the requests and notices it can hold ([`at_most`]).
fn queued_at_most<'de, D: serde::Deserializer<'de>>(d: D) -> Result<VecDeque<Queued>, D::Error> {
    at_most::<_, _, MAX_QUEUE_ENTRIES>(d).map(VecDeque::from)
}

impl ChannelState {
    /// Drops the stream that gives up its place for a new one at `now`
    /// ([`place_to_take`]). An overflowed one's guest may still be answering: it is told,
    /// as by a release, and the notice counts against the queue's bound with the opening
    /// to come, so the queue keeps its bound of queued requests and one message per
    /// stream. Without room for a notice, one that needs none goes (the queue is full only
    /// if no such one may).
    fn make_room(&mut self, now: Instant) -> Result<(), SubmitError> {
        let room_for_notice = self.queued.len() + 1 < MAX_QUEUED;
        let taken = place_to_take(&mut self.streams, now, |s| {
            room_for_notice || !s.owed_notice()
        });
        let at = match taken {
            Ok(at) => at,
            Err(_) if place_to_take(&mut self.streams, now, |_| true).is_ok() => {
                return Err(SubmitError::QueueFull)
            }
            Err(e) => return Err(e),
        };
        let gone = self.streams.remove(at);
        // A guest may end a stream before it takes the stream's opening: that opening
        // would reach it later for a stream the host has forgotten.
        let undelivered = unqueue_undelivered(&mut self.queued, gone.id);
        if gone.owed_notice() && !undelivered {
            self.queue_control(Queued::released(gone.id));
        }
        Ok(())
    }

    /// Queues a control message (a cancel, or a release notice) if the queue has room
    /// for it ([`MAX_QUEUE_ENTRIES`]); whether it did. The channel's own moves always
    /// leave room (each stream's one message has its place), but a state restored from
    /// elsewhere may hold a full queue and owe every stream a notice: queued past the
    /// bound, the VM's next save would not decode at its next destination.
    fn queue_control(&mut self, control: Queued) -> bool {
        let room = self.queued.len() < MAX_QUEUE_ENTRIES;
        if room {
            self.queued.push_back(control);
        }
        room
    }
}

/// Takes `stream`'s opening out of `queued` if the guest has not been given it yet, with
/// whatever was queued for that stream after it (the guest never hears of the stream);
/// whether there was one. Only from that opening on: a notice for an earlier stream of
/// the same id stays.
fn unqueue_undelivered(queued: &mut VecDeque<Queued>, stream: u64) -> bool {
    let opening =
        (queued.iter()).rposition(|q| q.stream == stream && q.delivery == Delivery::Opens);
    if let Some(opening) = opening {
        let mut from_opening = queued.split_off(opening);
        from_opening.retain(|q| q.stream != stream);
        queued.append(&mut from_opening);
    }
    opening.is_some()
}

/// Whether the host may queue requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The VM runs: requests are taken.
    Open,
    /// The VM is paused (perhaps for a migration's switchover, after which its state is
    /// no longer this host's): requests are refused, to be sent again.
    Paused,
    /// The VM ended.
    Ended,
    /// The VM's state became another host's (it migrated away): readers are let go and
    /// requests refused; the streams live on there.
    Detached,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The guest has not set the channel up (yet).
    #[error("the guest has not set up its message channel (it may still be starting)")]
    NotReady,
    /// The VM is paused (a migration may be switching it over); send again shortly.
    #[error("the VM is paused; send the request again shortly")]
    Paused,
    /// The VM ended.
    #[error("the VM has ended")]
    Ended,
    /// The VM runs on another host now.
    #[error("the VM runs on another host now")]
    Detached,
    /// The guest's queue has no room: [`MAX_QUEUED`] messages wait, or one fewer and only
    /// a stream its guest is to be told of could give up its place (for a cancel, of a
    /// state restored from elsewhere: [`MAX_QUEUED`] and one per stream wait).
    #[error("the guest's queue has no room ({MAX_QUEUED} requests at most)")]
    QueueFull,
    /// [`MAX_STREAMS`] streams are open.
    #[error("{MAX_STREAMS} streams are open already")]
    TooManyStreams,
    /// The payload does not fit a request slot.
    #[error("a request of {len} bytes does not fit the guest's request slots ({max} bytes)")]
    TooLarge {
        /// Bytes of the payload.
        len: usize,
        /// Most the guest takes.
        max: usize,
    },
    /// A stream with that id exists.
    #[error("stream {0} exists already")]
    StreamExists(u64),
    /// No stream with that id is open.
    #[error("no open stream {0}")]
    NoSuchStream(u64),
}

/// What a read of a stream does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The stream's own reader: what came before the index read from is let go of.
    Consume,
    /// An onlooker (a read-only token): the stream is left as it is, so that its reads
    /// can never take responses from the reader they are for.
    Peek,
}

/// Why a stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No stream with that id (never opened here, or released).
    #[error("no stream {0}")]
    NoSuchStream(u64),
    /// A read from beyond the next response to come: no reader has seen those.
    #[error("stream {stream} has had {next} responses; cannot read from {from}")]
    Beyond {
        /// Which.
        stream: u64,
        /// The index asked for.
        from: usize,
        /// The index of the next response to come.
        next: usize,
    },
    /// A read from before what an earlier read let go of.
    #[error("stream {stream}'s responses before {first} were read and let go of; cannot read from {from}")]
    LetGo {
        /// Which.
        stream: u64,
        /// The index asked for.
        from: usize,
        /// The first index held.
        first: usize,
    },
}

/// What a read of a stream found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRead {
    /// Responses from the index asked for on.
    pub events: Vec<Message>,
    /// Whether (and how) the stream ended.
    pub end: StreamEnd,
}

struct Core {
    state: ChannelState,
    gate: Gate,
    /// The last status written to the header; `None` after a restore, whose header
    /// (in the migrated RAM) may hold any status the source last wrote.
    status: Option<u32>,
}

struct Shared {
    core: Mutex<Core>,
    /// Signalled when a request is queued, a response arrives or the gate moves.
    changed: Condvar,
}

/// The message channel device; clones are handles to the same channel (the VMM's port
/// bus holds one, the host's server another).
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

/// The guest-visible form of a [`ChannelHeader`] in guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct HeaderBytes(ChannelHeader);

// SAFETY: ChannelHeader is repr(C) with only u32 (8 of them) then u64 fields and no
// padding, so every byte pattern is a valid value.
unsafe impl ByteValued for HeaderBytes {}

/// The guest-visible form of a [`MessageHeader`] in guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MessageBytes(MessageHeader);

// SAFETY: MessageHeader is repr(C): u32, u32, u64, u32, u32 with no padding, so every
// byte pattern is a valid value.
unsafe impl ByteValued for MessageBytes {}

/// Whether the `size` bytes at `addr` are all guest RAM (where a ring may lie).
fn in_ram(mem: &GuestRam, addr: u64, size: u64) -> bool {
    usize::try_from(size).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
}

fn field(ring: &Ring, offset: usize) -> GuestAddress {
    GuestAddress(ring.addr + offset as u64)
}

impl Default for Channel {
    fn default() -> Self {
        Self::with_state(ChannelState::default())
    }
}

impl Channel {
    /// A new, unconfigured channel of a paused VM.
    pub fn new() -> Self {
        Self::default()
    }

    /// A channel continuing from a saved state (of a paused VM whose RAM is `mem`). The
    /// state came from a file or the network: what does not fit the limits is cut.
    pub fn restore(state: &ChannelState, mem: &GuestRam) -> Self {
        let mut state = state.clone();
        state.queued.truncate(MAX_QUEUE_ENTRIES);
        let excess = state.streams.len().saturating_sub(MAX_STREAMS);
        state.streams.drain(..excess);
        // A ring the guest's setup would have refused (of impossible geometry, over the
        // VMM's system pages, not on a page, not all in RAM) is dropped: the channel is
        // as if never set up (kicks do nothing until the guest sets it up again), rather
        // than reading and writing where no ring may lie.
        if state.ring.is_some_and(|r| {
            let in_ram = (r.header().region_size()).is_some_and(|size| in_ram(mem, r.addr, size));
            !in_ram || r.addr < IMAGE_BASE || r.addr % PAGE_SIZE != 0
        }) {
            state.ring = None;
        }
        // The guest's tail can never pass the host's head.
        state.request_tail = state.request_tail.min(state.request_head);
        // A stream holds what it could have taken from the guest: responses of a slot at
        // most, within its bounds; past them it overflowed, as it would have here. Its
        // byte count is what its responses hold, not what the state says. (Kept whole, a
        // stream could make the channel too large for the VM's next migration.)
        for stream in &mut state.streams {
            let mut bytes = 0usize;
            let first_too_many = stream.events.iter().take(MAX_STREAM_EVENTS).position(|m| {
                bytes = bytes.saturating_add(m.payload.len());
                m.payload.len() > ferry_abi::channel::MAX_SLOT_SIZE as usize
                    || bytes > MAX_STREAM_BYTES
            });
            let kept = first_too_many.unwrap_or(stream.events.len().min(MAX_STREAM_EVENTS));
            if kept < stream.events.len() {
                stream.events.truncate(kept);
                stream.end = StreamEnd::Overflow;
            }
            stream.bytes = stream
                .events
                .iter()
                .fold(0usize, |sum, m| sum.saturating_add(m.payload.len()));
        }
        Self::with_state(state)
    }

    /// A paused VM's channel holding `state` (checked).
    fn with_state(state: ChannelState) -> Self {
        Self {
            shared: Arc::new(Shared {
                core: Mutex::new(Core {
                    state,
                    gate: Gate::Paused,
                    status: None,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.shared.core.lock().expect("channel lock")
    }

    /// The channel's state, for a snapshot or a migration (of a paused VM).
    pub fn save(&self) -> ChannelState {
        self.core().state.clone()
    }

    fn set_gate(&self, gate: Gate) {
        let mut core = self.core();
        if !matches!(core.gate, Gate::Ended | Gate::Detached) {
            core.gate = gate;
        }
        if gate == Gate::Detached {
            core.state.streams.clear();
            core.state.queued.clear();
        }
        if gate == Gate::Ended {
            for stream in &mut core.state.streams {
                if stream.end == StreamEnd::Open {
                    stream.end = StreamEnd::VmEnded;
                }
            }
        }
        drop(core);
        self.shared.changed.notify_all();
    }

    /// The VM runs: requests are taken.
    pub fn open(&self) {
        self.set_gate(Gate::Open);
    }

    /// The VM is paused: requests are refused until [`Self::open`].
    pub fn pause(&self) {
        self.set_gate(Gate::Paused);
    }

    /// The VM ended: requests are refused and open streams end.
    pub fn end(&self) {
        self.set_gate(Gate::Ended);
    }

    /// The VM migrated away: readers are let go, requests refused, and what this copy
    /// held is dropped (the destination has it).
    pub fn detach(&self) {
        self.set_gate(Gate::Detached);
    }

    /// Drops what the streams of a VM that ended still hold, and the requests it never
    /// took, once their readers have had [`UNREAD_END_GRACE`] to come: a record of an
    /// ended VM is kept listed for long, and its guest may have filled every stream
    /// before it ended. Nothing while the VM runs (or may run again).
    pub fn forget_after_end(&self) {
        let mut core = self.core();
        if core.gate != Gate::Ended {
            return;
        }
        core.state.streams.clear();
        core.state.queued.clear();
        drop(core);
        self.shared.changed.notify_all();
    }

    /// Queues a request that opens stream `stream`.
    pub fn submit(&self, stream: u64, message: Message) -> Result<(), SubmitError> {
        let mut core = self.core();
        core.ready_for(&message)?;
        let state = &mut core.state;
        // Before the queue's bound: a retried submit whose first try was queued (its
        // answer lost) must learn that it was, full queue or not.
        if state.streams.iter().any(|s| s.id == stream) {
            return Err(SubmitError::StreamExists(stream));
        }
        if state.queued.len() >= MAX_QUEUED {
            return Err(SubmitError::QueueFull);
        }
        if state.streams.len() >= MAX_STREAMS {
            state.make_room(Instant::now())?;
        }
        state.streams.push(Stream::opened(stream));
        state.queued.push_back(Queued {
            stream,
            delivery: Delivery::Opens,
            message,
        });
        drop(core);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Queues a control message (a cancel) for open stream `stream`: one per stream,
    /// beyond the bound of queued requests, so it gets through a queue full of them (only
    /// a state restored from elsewhere can leave it no room: [`SubmitError::QueueFull`]).
    pub fn signal(&self, stream: u64, message: Message) -> Result<(), SubmitError> {
        let mut core = self.core();
        core.ready_for(&message)?;
        let state = &mut core.state;
        let Some(at) = (state.streams.iter())
            // An overflowed stream's guest may still be answering: it can be told to stop.
            .position(|s| s.id == stream && matches!(s.end, StreamEnd::Open | StreamEnd::Overflow))
        else {
            return Err(SubmitError::NoSuchStream(stream));
        };
        if !state.streams[at].signalled {
            let signal = Queued {
                stream,
                delivery: Delivery::Signal,
                message,
            };
            if !state.queue_control(signal) {
                return Err(SubmitError::QueueFull);
            }
            state.streams[at].signalled = true;
        }
        drop(core);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The responses of `stream` from index `from` on, letting go of those before it
    /// ([`Reading::Consume`]); waits up to `wait` for one if there are none yet and the
    /// stream is open. A pause does not end the wait (the guest answers once it resumes,
    /// here or on its destination); a move does, with [`ReadError::NoSuchStream`]: the
    /// streams went with the VM.
    pub fn read(&self, stream: u64, from: usize, wait: Duration) -> Result<StreamRead, ReadError> {
        self.read_as(stream, from, wait, Reading::Consume)
    }

    /// [`Self::read`], by a reader that lets go of what it read only if `reading` says so.
    pub fn read_as(
        &self,
        stream: u64,
        from: usize,
        wait: Duration,
        reading: Reading,
    ) -> Result<StreamRead, ReadError> {
        let deadline = Instant::now() + wait;
        let mut core = self.core();
        loop {
            let s = core
                .state
                .streams
                .iter_mut()
                .find(|s| s.id == stream)
                .ok_or(ReadError::NoSuchStream(stream))?;
            let held = s.first.saturating_add(s.events.len());
            // Only a reader that has seen responses up to `from` lets go of them: one
            // from beyond the next response would otherwise drop those no one has read.
            // (`held` only grows while this waits: checked once in effect.)
            if from > held {
                return Err(ReadError::Beyond {
                    stream,
                    from,
                    next: held,
                });
            }
            if reading == Reading::Consume {
                // The reader has what came before `from`: its bytes no longer count
                // against the stream's bound, so an answer's length is bounded by the
                // reader's pace, not by what one stream may hold.
                s.let_go_before(from);
            }
            if from < s.first {
                return Err(ReadError::LetGo {
                    stream,
                    from,
                    first: s.first,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if held > from || s.end != StreamEnd::Open || left.is_zero() {
                // An onlooker's read of the end says nothing of whether the reader has it.
                if reading == Reading::Consume && s.end != StreamEnd::Open {
                    s.read_whole = true;
                    s.grace_since = Some(Instant::now());
                }
                return Ok(StreamRead {
                    events: s.events.get(from - s.first..).unwrap_or_default().to_vec(),
                    end: s.end,
                });
            }
            core = self
                .shared
                .changed
                .wait_timeout(core, left)
                .expect("channel lock")
                .0;
        }
    }

    /// Forgets `stream` (its reader has everything, or gave up); an open stream's later
    /// responses are dropped, and its guest is told ([`flags::RELEASED`]) unless a
    /// control message (a cancel) went to it already (or, in a state restored from
    /// elsewhere, the queue has no room left for the notice).
    /// Refused while the VM is paused
    /// (its state may be on its way to another host, which would keep the stream) or
    /// gone elsewhere.
    pub fn release(&self, stream: u64) -> Result<(), SubmitError> {
        let mut core = self.core();
        match core.gate {
            Gate::Paused => return Err(SubmitError::Paused),
            Gate::Detached => return Err(SubmitError::Detached),
            Gate::Open | Gate::Ended => {}
        }
        let Some(at) = core.state.streams.iter().position(|s| s.id == stream) else {
            return Ok(());
        };
        let gone = core.state.streams.remove(at);
        let undelivered = unqueue_undelivered(&mut core.state.queued, stream);
        // The notice takes the place the stream's control message would have: one per
        // stream, so the queue stays within its queued requests and one message per
        // stream.
        if gone.owed_notice() && !undelivered && core.gate == Gate::Open {
            core.state.queue_control(Queued::released(stream));
        }
        drop(core);
        // A reader waiting on it learns it is gone now, not at its wait's end.
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Guest `out` to `CHANNEL_SETUP` of `page`: checks and copies the ring's geometry.
    pub fn setup(&self, mem: &GuestRam, page: u32) {
        let addr = u64::from(page) * PAGE_SIZE;
        let Ok(HeaderBytes(header)) = mem.read_obj(GuestAddress(addr)) else {
            tracing::debug!(addr, "channel setup at an address outside guest RAM");
            return;
        };
        let mut core = self.core();
        let code = if core.state.ring.is_some() {
            status::ALREADY_SET_UP
        } else if addr < IMAGE_BASE {
            status::BAD_GUEST_RANGE
        } else if header.magic != CHANNEL_MAGIC || header.version != CHANNEL_VERSION {
            status::BAD_VERSION
        } else if let Some(size) = header.region_size() {
            if !in_ram(mem, addr, size) {
                status::BAD_GUEST_RANGE
            } else {
                core.state.ring = Some(Ring {
                    addr,
                    request_slots: header.request_slots,
                    request_slot_size: header.request_slot_size,
                    response_slots: header.response_slots,
                    response_slot_size: header.response_slot_size,
                });
                status::OK
            }
        } else {
            status::BAD_GEOMETRY
        };
        // Into the header only where the guest's own memory begins: never into the VMM's
        // page tables and descriptor tables below it, which ring 3 must not reach.
        if addr >= IMAGE_BASE {
            core.status = Some(code);
            let at = GuestAddress(addr + core::mem::offset_of!(ChannelHeader, status) as u64);
            // Written through GuestRam: the page lands in the dirty log.
            let _ = mem.write_obj(code, at);
        }
        if code == status::OK {
            core.write_indices(mem);
        }
    }

    /// Guest `out` to `CHANNEL_KICK`: takes the guest's responses and delivers queued
    /// requests, first waiting up to `wait_us` for one if there is nothing to deliver.
    pub fn kick(&self, mem: &GuestRam, wait_us: u32) {
        let mut core = self.core();
        let Some(ring) = core.state.ring else {
            return;
        };
        let Ok(HeaderBytes(header)) = mem.read_obj(GuestAddress(ring.addr)) else {
            return;
        };
        let (took, mut code) = core.take_responses(mem, &ring, header.response_head);
        let state = &mut core.state;
        if header.request_tail < state.request_tail || header.request_tail > state.request_head {
            code = status::INVALID_INDEX;
        } else {
            state.request_tail = header.request_tail;
        }
        if took > 0 {
            self.shared.changed.notify_all();
        }
        if core.state.queued.is_empty() && took == 0 && wait_us > 0 {
            let wait = Duration::from_micros(u64::from(wait_us.min(MAX_KICK_WAIT_US)));
            core = self
                .shared
                .changed
                .wait_timeout_while(core, wait, |c| {
                    c.state.queued.is_empty() && c.gate == Gate::Open
                })
                .expect("channel lock")
                .0;
        }
        core.deliver_requests(mem, &ring);
        if code != status::OK || core.status != Some(code) {
            core.status = Some(code);
            let _ = mem.write_obj(
                code,
                field(&ring, core::mem::offset_of!(ChannelHeader, status)),
            );
        }
        core.write_indices(mem);
    }
}

impl Core {
    /// Whether `message` may be queued now: the VM runs, the guest set the channel up,
    /// and the message fits its request slots.
    fn ready_for(&self, message: &Message) -> Result<(), SubmitError> {
        let ring = self.ready()?;
        if message.payload.len() > ring.request_payload() {
            return Err(SubmitError::TooLarge {
                len: message.payload.len(),
                max: ring.request_payload(),
            });
        }
        Ok(())
    }

    fn ready(&self) -> Result<Ring, SubmitError> {
        match self.gate {
            Gate::Paused => return Err(SubmitError::Paused),
            Gate::Ended => return Err(SubmitError::Ended),
            Gate::Detached => return Err(SubmitError::Detached),
            Gate::Open => {}
        }
        self.state.ring.ok_or(SubmitError::NotReady)
    }

    /// Writes the indices the VMM owns (whatever the guest wrote over them).
    fn write_indices(&self, mem: &GuestRam) {
        let Some(ring) = self.state.ring else {
            return;
        };
        let s = &self.state;
        for (offset, value) in [
            (
                core::mem::offset_of!(ChannelHeader, request_head),
                s.request_head,
            ),
            (
                core::mem::offset_of!(ChannelHeader, response_tail),
                s.response_tail,
            ),
            (
                core::mem::offset_of!(ChannelHeader, pending),
                s.queued.len() as u64,
            ),
        ] {
            let _ = mem.write_obj(value, field(&ring, offset));
        }
    }

    /// Takes the responses up to the guest's `head`; returns how many, and the status
    /// code: that of a lying index, or of a malformed message (skipped, the good ones
    /// around it still delivered and their readers woken).
    fn take_responses(&mut self, mem: &GuestRam, ring: &Ring, head: u64) -> (u64, u32) {
        let tail = self.state.response_tail;
        if head < tail || head - tail > u64::from(ring.response_slots) {
            return (0, status::INVALID_INDEX);
        }
        let n = (head - tail).min(MAX_PER_KICK);
        let mut code = status::OK;
        let header = ring.header();
        let max = ring.response_slot_size - MESSAGE_HEADER_SIZE;
        for index in tail..tail + n {
            let slot = ring.addr + header.response_slot(index);
            let Ok(MessageBytes(m)) = mem.read_obj(GuestAddress(slot)) else {
                code = status::BAD_MESSAGE;
                continue;
            };
            if m.len > max {
                code = status::BAD_MESSAGE;
                continue;
            }
            let mut payload = vec![0u8; m.len as usize];
            let at = GuestAddress(slot + u64::from(MESSAGE_HEADER_SIZE));
            if mem.read_slice(&mut payload, at).is_err() {
                code = status::BAD_MESSAGE;
                continue;
            }
            self.accept(m, payload);
        }
        self.state.response_tail = tail + n;
        (n, code)
    }

    /// Adds one response to its stream.
    fn accept(&mut self, m: MessageHeader, payload: Vec<u8>) {
        let Some(stream) = self
            .state
            .streams
            .iter_mut()
            .find(|s| s.id == m.stream && s.end == StreamEnd::Open)
        else {
            self.state.dropped = self.state.dropped.saturating_add(1);
            return;
        };
        if stream.bytes.saturating_add(payload.len()) > MAX_STREAM_BYTES
            || stream.events.len() >= MAX_STREAM_EVENTS
        {
            stream.end = StreamEnd::Overflow;
            return;
        }
        stream.bytes += payload.len();
        stream.events.push(Message {
            kind: m.kind,
            payload,
        });
        if m.flags & flags::FINAL != 0 {
            stream.end = StreamEnd::Final;
        }
    }

    /// Writes queued requests into free request slots.
    fn deliver_requests(&mut self, mem: &GuestRam, ring: &Ring) {
        let header = ring.header();
        let mut delivered = 0;
        while delivered < MAX_PER_KICK
            && self.state.request_head - self.state.request_tail < u64::from(ring.request_slots)
        {
            let Some(q) = self.state.queued.front() else {
                break;
            };
            if q.message.payload.len() as u64 + u64::from(MESSAGE_HEADER_SIZE)
                > u64::from(ring.request_slot_size)
            {
                // Queued for other slots (a restored state): it cannot be delivered.
                self.state.queued.pop_front();
                continue;
            }
            let slot = ring.addr + header.request_slot(self.state.request_head);
            let m = MessageHeader {
                kind: q.message.kind,
                flags: q.delivery.flags(),
                stream: q.stream,
                len: q.message.payload.len() as u32,
                reserved: 0,
            };
            let at = GuestAddress(slot + u64::from(MESSAGE_HEADER_SIZE));
            // Written through GuestRam: the pages land in the dirty log. The slot is in
            // the checked region, so neither write fails; if one did, the request stays
            // queued rather than being lost.
            // A restored head at the end of the index space takes nothing more.
            let Some(next_head) = self.state.request_head.checked_add(1) else {
                break;
            };
            if mem.write_obj(MessageBytes(m), GuestAddress(slot)).is_err()
                || mem.write_slice(&q.message.payload, at).is_err()
            {
                break;
            }
            self.state.queued.pop_front();
            self.state.request_head = next_head;
            delivered += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;

    /// The saved devices (port devices and accelerator) with every field and collection
    /// filled, and the state version, as a migration or a snapshot encodes them.
    const SAVED_DEVICES: &str =
        "040163020103010405060708090a0b010c000d0171010e0f01100165010101011101016212131415011617";

    /// The length and SHA-256 of the encoding of a whole saved VM state (with the devices
    /// above), and the state version.
    const SAVED_STATE: (usize, &str) = (
        5268,
        "db3643d5f526fc4e27d4f8139d66b75d862c6cf8d2d2f108f406acf496070fc5",
    );

    #[test]
    fn the_saved_state_keeps_its_shape_unless_the_state_version_changes() {
        use crate::devices::{ClockState, ConsoleState, DeviceStates};
        use sha2::Digest;
        let devices = DeviceStates {
            console: ConsoleState {
                tail: b"c".to_vec(),
            },
            clock: ClockState {
                now_ns: 2,
                latched_high: vec![3],
            },
            channel: ChannelState {
                ring: Some(Ring {
                    addr: 4,
                    request_slots: 5,
                    request_slot_size: 6,
                    response_slots: 7,
                    response_slot_size: 8,
                }),
                request_head: 9,
                request_tail: 10,
                response_tail: 11,
                queued: [Queued {
                    stream: 12,
                    delivery: Delivery::Opens,
                    message: message(13, "q"),
                }]
                .into(),
                streams: vec![Stream {
                    id: 14,
                    first: 15,
                    events: vec![message(16, "e")],
                    bytes: 1,
                    end: StreamEnd::Final,
                    signalled: true,
                    read_whole: true,
                    grace_since: None,
                }],
                dropped: 17,
            },
        };
        let accel = ferry_accel::device::AccelState {
            backend_kind: "b".into(),
            kernel_version: 18,
            capacity: 19,
            ring_gpa: 20,
            tail: 21,
            buffers: vec![ferry_accel::device::BufferState { id: 22, bytes: 23 }],
        };
        let version = crate::vm::STATE_VERSION;
        let bytes = postcard::to_stdvec(&(version, &devices, Some(&accel))).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // A field added, removed or retyped changes the bytes: another ferry would
        // fail to decode this one's state at a migration's end, or a snapshot's load.
        // Raise STATE_VERSION (vm.rs) so that the handshake refuses it by name, then
        // put the new bytes here.
        assert_eq!(
            hex, SAVED_DEVICES,
            "the saved devices' shape changed: raise STATE_VERSION"
        );
        // The rest of the state too: the VM's shape, its vCPU (KVM's structures, as the
        // kvm-bindings crate serializes them) and its files (an API type), pinned by the
        // digest of their encoding, KVM's structures being kilobytes.
        let state = crate::vm::MicrovmState {
            abi_version: 24,
            config: crate::vm::VmConfig {
                ram_size: 25,
                vcpus: 26,
                accel_memory: 27,
            },
            vcpus: vec![crate::vcpu::VcpuState {
                cpuid: vec![Default::default()],
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debug_regs: Default::default(),
                msrs: vec![Default::default()],
                vcpu_events: Default::default(),
            }],
            devices,
            accel: Some(accel),
            files: vec![crate::files::FileInfo {
                name: "f".into(),
                size: 28,
                sha256: "s".into(),
                path: "p".into(),
            }],
        };
        let bytes = postcard::to_stdvec(&(version, &state)).unwrap();
        let digest = crate::files::hex(&sha2::Sha256::digest(&bytes));
        assert_eq!(
            (bytes.len(), digest.as_str()),
            SAVED_STATE,
            "the saved VM state's shape changed: raise STATE_VERSION"
        );
    }

    const REGION: u64 = 0x20_0000;

    /// A guest that took request "a" on stream `stream`.
    fn guest_with_request(stream: u64) -> (GuestRam, Channel) {
        let (mem, channel) = guest();
        channel.submit(stream, message(1, "a")).unwrap();
        channel.kick(&mem, 0);
        take_requests(&mem);
        (mem, channel)
    }

    fn guest() -> (GuestRam, Channel) {
        let mem = create_guest_ram(16 << 20).unwrap();
        let header = ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            request_slots: 4,
            request_slot_size: 512,
            response_slots: 8,
            response_slot_size: 256,
            ..ChannelHeader::default()
        };
        mem.write_obj(HeaderBytes(header), GuestAddress(REGION))
            .unwrap();
        let channel = Channel::new();
        channel.setup(&mem, (REGION / PAGE_SIZE) as u32);
        channel.open();
        assert_eq!(read_header(&mem).status, status::OK);
        (mem, channel)
    }

    /// A reader of `stream` from its start, waiting (up to 10 s) for a response.
    fn waiting_reader(channel: &Channel, stream: u64) -> std::thread::JoinHandle<StreamRead> {
        let reader = channel.clone();
        let waiting =
            std::thread::spawn(move || reader.read(stream, 0, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        waiting
    }

    fn read_header(mem: &GuestRam) -> ChannelHeader {
        mem.read_obj::<HeaderBytes>(GuestAddress(REGION)).unwrap().0
    }

    /// Kicks the channel and checks that it refused what the guest wrote with `status`,
    /// and that nothing reached stream 1.
    fn assert_refused(mem: &GuestRam, channel: &Channel, status: u32) {
        channel.kick(mem, 0);
        assert_eq!(read_header(mem).status, status);
        let read = channel.read(1, 0, Duration::ZERO).unwrap();
        assert!(read.events.is_empty(), "{:?}", read.events);
    }

    fn set(mem: &GuestRam, offset: usize, value: u64) {
        mem.write_obj(value, GuestAddress(REGION + offset as u64))
            .unwrap();
    }

    fn message(kind: u32, text: &str) -> Message {
        Message {
            kind,
            payload: text.as_bytes().to_vec(),
        }
    }

    /// The guest side: takes every request in the ring.
    fn take_requests(mem: &GuestRam) -> Vec<(MessageHeader, Vec<u8>)> {
        let h = read_header(mem);
        let mut out = Vec::new();
        for i in h.request_tail..h.request_head {
            let slot = REGION + h.request_slot(i);
            let m = mem.read_obj::<MessageBytes>(GuestAddress(slot)).unwrap().0;
            let mut payload = vec![0; m.len as usize];
            mem.read_slice(&mut payload, GuestAddress(slot + 24))
                .unwrap();
            out.push((m, payload));
        }
        set(
            mem,
            core::mem::offset_of!(ChannelHeader, request_tail),
            h.request_head,
        );
        out
    }

    /// The guest side: writes one response.
    fn respond(mem: &GuestRam, stream: u64, kind: u32, flags: u32, payload: &[u8]) {
        let h = read_header(mem);
        let slot = REGION + h.response_slot(h.response_head);
        let m = MessageHeader {
            kind,
            flags,
            stream,
            len: payload.len() as u32,
            reserved: 0,
        };
        mem.write_obj(MessageBytes(m), GuestAddress(slot)).unwrap();
        mem.write_slice(payload, GuestAddress(slot + 24)).unwrap();
        set(
            mem,
            core::mem::offset_of!(ChannelHeader, response_head),
            h.response_head + 1,
        );
    }

    #[test]
    fn requests_reach_the_guest_and_responses_reach_the_stream() {
        let (mem, channel) = guest();
        channel.submit(7, message(1, "hello")).unwrap();
        channel.kick(&mem, 0);
        let got = take_requests(&mem);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.stream, got[0].0.flags), (7, flags::OPEN));
        assert_eq!(got[0].1, b"hello");
        respond(&mem, 7, 2, 0, b"wor");
        respond(&mem, 7, 2, flags::FINAL, b"ld");
        channel.kick(&mem, 0);
        let read = channel.read(7, 0, Duration::ZERO).unwrap();
        assert_eq!(read.end, StreamEnd::Final);
        assert_eq!(read.events, [message(2, "wor"), message(2, "ld")]);
        assert_eq!(channel.read(7, 1, Duration::ZERO).unwrap().events.len(), 1);
        // Not while the VM is paused: its state may be going to another host.
        channel.pause();
        assert_eq!(channel.release(7), Err(SubmitError::Paused));
        channel.open();
        channel.release(7).unwrap();
        assert_eq!(
            channel.read(7, 0, Duration::ZERO),
            Err(ReadError::NoSuchStream(7))
        );
    }

    #[test]
    fn a_stream_let_go_of_while_open_is_announced_to_its_guest_once() {
        let (mem, channel) = guest();
        let flags_of = |got: &[(MessageHeader, Vec<u8>)]| -> Vec<(u64, u32, u32, usize)> {
            got.iter()
                .map(|(m, p)| (m.stream, m.flags, m.kind, p.len()))
                .collect()
        };
        for stream in 1..=4 {
            channel.submit(stream, message(1, "q")).unwrap();
        }
        channel.kick(&mem, 0);
        assert_eq!(take_requests(&mem).len(), 4);
        // 1 ends before it is let go of; 2 is cancelled first (the cancel says it all);
        // 3 overflows (its guest may still be answering); 4 is let go of while open.
        respond(&mem, 1, 2, flags::FINAL, b"done");
        respond(&mem, 3, 2, 0, &[0; 200]);
        channel.kick(&mem, 0);
        channel.signal(2, message(9, "")).unwrap();
        let big = vec![0u8; 200];
        for _ in 0..MAX_STREAM_BYTES / 200 + 1 {
            respond(&mem, 3, 2, 0, &big);
            channel.kick(&mem, 0);
        }
        assert_eq!(
            channel
                .read_as(3, 0, Duration::ZERO, Reading::Peek)
                .unwrap()
                .end,
            StreamEnd::Overflow
        );
        for stream in 1..=4 {
            channel.release(stream).unwrap();
            // Again, as a release whose answer was lost is: nothing more is sent.
            channel.release(stream).unwrap();
        }
        // Id 4 used again, let go of before that opening was delivered: the first stream
        // 4's notice stays, the second stream is never heard of.
        channel.submit(4, message(1, "again")).unwrap();
        channel.release(4).unwrap();
        channel.kick(&mem, 0);
        assert_eq!(
            flags_of(&take_requests(&mem)),
            [
                (2, 0, 9, 0),
                (3, flags::RELEASED, 0, 0),
                (4, flags::RELEASED, 0, 0)
            ]
        );
        // Once the VM has ended, nobody is told.
        channel.submit(5, message(1, "q")).unwrap();
        channel.kick(&mem, 0);
        assert_eq!(take_requests(&mem).len(), 1);
        channel.end();
        channel.release(5).unwrap();
        channel.kick(&mem, 0);
        assert!(take_requests(&mem).is_empty());
    }

    #[test]
    fn a_full_ring_keeps_requests_queued_in_order() {
        let (mem, channel) = guest();
        for i in 0..6 {
            channel.submit(i, message(1, &i.to_string())).unwrap();
        }
        channel.kick(&mem, 0);
        let first: Vec<u64> = take_requests(&mem).iter().map(|m| m.0.stream).collect();
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(read_header(&mem).pending, 2);
        channel.kick(&mem, 0);
        let rest: Vec<u64> = take_requests(&mem).iter().map(|m| m.0.stream).collect();
        assert_eq!(rest, [4, 5]);
    }

    #[test]
    fn queued_requests_and_streams_survive_save_and_restore_exactly_once() {
        let (mem, channel) = guest();
        for i in 0..6 {
            channel.submit(i, message(1, "q")).unwrap();
        }
        channel.kick(&mem, 0);
        take_requests(&mem);
        respond(&mem, 0, 2, 0, b"before");
        channel.kick(&mem, 0);
        channel.pause();
        assert_eq!(
            channel.submit(9, message(1, "late")),
            Err(SubmitError::Paused)
        );
        let state = channel.save();
        // The destination: the same RAM (migrated), the restored channel.
        let moved = Channel::restore(&state, &mem);
        moved.open();
        moved.kick(&mem, 0);
        let rest: Vec<u64> = take_requests(&mem).iter().map(|m| m.0.stream).collect();
        assert_eq!(rest, [4, 5], "each queued request once, none again");
        moved.kick(&mem, 0);
        assert!(take_requests(&mem).is_empty());
        respond(&mem, 0, 2, flags::FINAL, b"after");
        moved.kick(&mem, 0);
        let read = moved.read(0, 0, Duration::ZERO).unwrap();
        assert_eq!(read.events, [message(2, "before"), message(2, "after")]);
    }

    #[test]
    fn a_restored_channel_clears_the_error_its_source_last_wrote() {
        let (mem, channel) = guest_with_request(1);
        respond(&mem, 1, 2, 0, b"x");
        let h = read_header(&mem);
        let slot = REGION + h.response_slot(h.response_head - 1);
        mem.write_obj(u32::MAX, GuestAddress(slot + 16)).unwrap();
        assert_refused(&mem, &channel, status::BAD_MESSAGE);
        channel.pause();
        // The destination: the same RAM (migrated, the error in its header).
        let moved = Channel::restore(&channel.save(), &mem);
        moved.open();
        moved.kick(&mem, 0);
        assert_eq!(read_header(&mem).status, status::OK);
    }

    #[test]
    fn a_restored_state_keeps_only_what_is_safe_to_use() {
        let (mem, channel) = guest();
        channel.kick(&mem, 0);
        channel.pause();
        let saved = channel.save();
        // The guest's tail past the host's head.
        let mut state = saved.clone();
        state.request_tail = state.request_head + 5;
        let restored = Channel::restore(&state, &mem).save();
        assert_eq!(restored.request_tail, restored.request_head);
        // A ring over the VMM's system pages, running off the address space or the end of
        // RAM, past it, or not on a page.
        let ram_end = mem.last_addr().0 + 1;
        for addr in [
            0x1000,
            u64::MAX - 100,
            ram_end - PAGE_SIZE,
            ram_end,
            REGION + 8,
        ] {
            let mut state = saved.clone();
            state.ring.as_mut().unwrap().addr = addr;
            assert!(
                Channel::restore(&state, &mem).save().ring.is_none(),
                "{addr:#x}"
            );
        }
        assert!(Channel::restore(&saved, &mem).save().ring.is_some());
        // A queued request larger than the guest's slots is dropped, never written past
        // its slot; the one after it is delivered.
        let mut state = saved.clone();
        for (stream, text) in [(7, "x".repeat(4096)), (8, "ok".to_string())] {
            state.queued.push_back(Queued {
                stream,
                delivery: Delivery::Opens,
                message: message(1, &text),
            });
        }
        let moved = Channel::restore(&state, &mem);
        moved.open();
        moved.kick(&mem, 0);
        let got: Vec<u64> = take_requests(&mem).iter().map(|m| m.0.stream).collect();
        assert_eq!(got, [8]);
        // Counters at the end of their range: recounted, or left to stall the ring, never
        // an overflow.
        let mut state = moved.save();
        state.streams.push(Stream {
            id: 3,
            first: usize::MAX - 1,
            events: vec![message(16, "abc")],
            bytes: usize::MAX,
            end: StreamEnd::Open,
            signalled: false,
            read_whole: false,
            grace_since: None,
        });
        (state.request_head, state.request_tail) = (u64::MAX, u64::MAX);
        state.queued.push_back(Queued {
            stream: 9,
            delivery: Delivery::Opens,
            message: message(1, "late"),
        });
        // A stream holding more than it could have taken: cut where it overflowed.
        let big = |n: usize| message(16, &"y".repeat(n));
        for (events, kept) in [
            (vec![big(1000), big(40 << 10), big(10)], 1),
            (vec![big(30 << 10); 4], 3),
        ] {
            state.streams.push(Stream {
                id: 4,
                first: 0,
                events,
                bytes: 0,
                end: StreamEnd::Final,
                signalled: false,
                read_whole: false,
                grace_since: None,
            });
            let cut = Channel::restore(&state, &mem).save().streams.pop().unwrap();
            assert_eq!((cut.events.len(), cut.end), (kept, StreamEnd::Overflow));
            assert!(cut.bytes <= MAX_STREAM_BYTES);
            state.streams.pop();
        }
        let restored = Channel::restore(&state, &mem);
        assert_eq!(restored.save().streams.last().unwrap().bytes, 3);
        let read = restored.read(3, usize::MAX, Duration::ZERO).unwrap();
        assert!(read.events.is_empty());
        restored.open();
        restored.kick(&mem, 0);
        assert_eq!(restored.save().queued.len(), 1, "kept, not delivered");
    }

    #[test]
    fn a_saved_state_decodes_only_within_the_channels_bounds() {
        // Empty messages take a few bytes saved and tens in memory: a state of a message
        // more than a bound allows is refused as it is read, not cut after.
        let stream = |events: usize| Stream {
            id: 1,
            first: 0,
            events: vec![message(0, ""); events],
            bytes: 0,
            end: StreamEnd::Open,
            signalled: false,
            read_whole: false,
            grace_since: None,
        };
        let queued = |n: usize| {
            let one = Queued {
                stream: 1,
                delivery: Delivery::Signal,
                message: message(0, ""),
            };
            vec![one; n].into()
        };
        let state = |streams: usize, events: usize, queue: usize| ChannelState {
            streams: (0..streams).map(|_| stream(events)).collect(),
            queued: queued(queue),
            ..ChannelState::default()
        };
        let decodes = |s: ChannelState| {
            postcard::from_bytes::<ChannelState>(&postcard::to_allocvec(&s).unwrap()).is_ok()
        };
        let most = MAX_QUEUE_ENTRIES;
        assert!(decodes(state(MAX_STREAMS, 1, most)));
        assert!(decodes(state(1, MAX_STREAM_EVENTS, 0)));
        assert!(!decodes(state(MAX_STREAMS + 1, 1, 0)));
        assert!(!decodes(state(1, MAX_STREAM_EVENTS + 1, 0)));
        assert!(!decodes(state(0, 0, most + 1)));
    }

    #[test]
    fn a_restored_full_queue_owing_every_stream_a_notice_stays_within_what_a_save_holds() {
        // A state from elsewhere: every place taken by an open stream the guest is still
        // to be told of, and the queue full of notices for streams gone before.
        let (mem, channel) = guest();
        let mut state = channel.save();
        state.streams = (0..MAX_STREAMS as u64).map(Stream::opened).collect();
        state.queued = (0..MAX_QUEUE_ENTRIES as u64)
            .map(|i| Queued::released(1000 + i))
            .collect();
        let full = Channel::restore(&state, &mem);
        full.open();
        // A cancel finds no room, and says so: the stream may be told later.
        assert_eq!(
            full.signal(0, message(9, "stop")),
            Err(SubmitError::QueueFull)
        );
        for stream in 0..8 {
            full.release(stream).unwrap();
        }
        let saved = full.save();
        assert_eq!(saved.queued.len(), MAX_QUEUE_ENTRIES);
        let bytes = postcard::to_allocvec(&saved).unwrap();
        assert!(
            postcard::from_bytes::<ChannelState>(&bytes).is_ok(),
            "its next destination decodes it"
        );
    }

    #[test]
    fn lying_indices_are_ignored_and_reported() {
        let (mem, channel) = guest();
        channel.submit(1, message(1, "a")).unwrap();
        // The guest claims to have taken a request that was never delivered, and
        // overwrites the host's index.
        set(&mem, core::mem::offset_of!(ChannelHeader, request_tail), 50);
        set(&mem, core::mem::offset_of!(ChannelHeader, request_head), 99);
        channel.kick(&mem, 0);
        let h = read_header(&mem);
        assert_eq!(h.status, status::INVALID_INDEX);
        assert_eq!(h.request_head, 1, "the host's index is restored");
        // A response head far ahead of the tail.
        set(&mem, core::mem::offset_of!(ChannelHeader, request_tail), 0);
        set(
            &mem,
            core::mem::offset_of!(ChannelHeader, response_head),
            1 << 40,
        );
        assert_refused(&mem, &channel, status::INVALID_INDEX);
        // Sane again: the request is delivered once.
        set(&mem, core::mem::offset_of!(ChannelHeader, response_head), 0);
        channel.kick(&mem, 0);
        assert_eq!(read_header(&mem).status, status::OK);
        assert_eq!(take_requests(&mem).len(), 1);
    }

    #[test]
    fn hostile_responses_cannot_grow_memory_or_reach_other_streams() {
        let (mem, channel) = guest_with_request(1);
        // A length beyond the slot, and a response to a stream never opened.
        respond(&mem, 1, 2, 0, b"x");
        let h = read_header(&mem);
        let slot = REGION + h.response_slot(h.response_head - 1);
        mem.write_obj(u32::MAX, GuestAddress(slot + 16)).unwrap();
        respond(&mem, 77, 2, 0, b"stray");
        assert_refused(&mem, &channel, status::BAD_MESSAGE);
        assert_eq!(channel.save().dropped, 1);
        // A stream bounded in bytes.
        let big = vec![b'y'; 200];
        for _ in 0..MAX_STREAM_BYTES / 200 + 1 {
            respond(&mem, 1, 2, 0, &big);
            channel.kick(&mem, 0);
        }
        let read = channel.read(1, 0, Duration::ZERO).unwrap();
        assert_eq!(read.end, StreamEnd::Overflow);
        assert!(read.events.len() * 200 <= MAX_STREAM_BYTES);
        // The guest would go on answering for nobody: a cancel still reaches it.
        channel.signal(1, message(3, "")).unwrap();
        channel.kick(&mem, 0);
        let got = take_requests(&mem);
        assert!(
            got.iter()
                .any(|(r, _)| r.stream == 1 && r.flags & flags::OPEN == 0),
            "{got:?}"
        );
    }

    #[test]
    fn a_malformed_response_does_not_hold_back_the_good_ones_of_its_kick() {
        let (mem, channel) = guest_with_request(1);
        let waiting = waiting_reader(&channel, 1);
        respond(&mem, 1, 2, 0, b"good");
        respond(&mem, 1, 2, 0, b"x");
        let h = read_header(&mem);
        let slot = REGION + h.response_slot(h.response_head - 1);
        mem.write_obj(u32::MAX, GuestAddress(slot + 16)).unwrap();
        let kicked = Instant::now();
        channel.kick(&mem, 0);
        assert_eq!(read_header(&mem).status, status::BAD_MESSAGE);
        let read = waiting.join().unwrap();
        assert_eq!(read.events, [message(2, "good")]);
        assert!(
            kicked.elapsed() < Duration::from_secs(5),
            "the reader waited for its timeout, not the kick"
        );
    }

    #[test]
    fn an_answer_read_as_it_comes_is_bounded_by_its_unread_part_only() {
        let (mem, channel) = guest_with_request(1);
        // Four times what a stream may hold, read as it comes.
        let big = vec![b'y'; 200];
        let mut next = 0;
        for _ in 0..4 * MAX_STREAM_BYTES / 200 {
            respond(&mem, 1, 2, 0, &big);
            channel.kick(&mem, 0);
            let read = channel.read(1, next, Duration::ZERO).unwrap();
            assert_eq!(read.end, StreamEnd::Open);
            next += read.events.len();
        }
        assert_eq!(next, 4 * MAX_STREAM_BYTES / 200);
        // A read again of the last response is answered; one from before it is refused.
        let again = channel.read(1, next - 1, Duration::ZERO).unwrap();
        assert_eq!(again.events.len(), 1);
        assert!(matches!(
            channel.read(1, next - 2, Duration::ZERO),
            Err(ReadError::LetGo { .. })
        ));
        assert!(channel.save().streams[0].bytes <= 200);
    }

    #[test]
    fn an_onlookers_read_and_one_from_beyond_the_end_leave_the_stream_to_its_reader() {
        let (mem, channel) = guest_with_request(1);
        respond(&mem, 1, 2, 0, b"one");
        respond(&mem, 1, 2, flags::FINAL, b"two");
        channel.kick(&mem, 0);
        // An onlooker from the next response to come: nothing yet, and nothing let go of.
        let peeked = channel
            .read_as(1, 2, Duration::ZERO, Reading::Peek)
            .unwrap();
        assert!(peeked.events.is_empty());
        // From beyond it, by anyone: refused, and the stream is as it was.
        for reading in [Reading::Peek, Reading::Consume] {
            assert_eq!(
                channel.read_as(1, usize::MAX, Duration::ZERO, reading),
                Err(ReadError::Beyond {
                    stream: 1,
                    from: usize::MAX,
                    next: 2
                })
            );
        }
        // An onlooker reading the end lets go of nothing, nor marks the stream as read.
        let peeked = channel
            .read_as(1, 2, Duration::ZERO, Reading::Peek)
            .unwrap();
        assert_eq!(peeked.end, StreamEnd::Final);
        let saved = channel.save();
        assert_eq!(
            (saved.streams[0].first, saved.streams[0].read_whole),
            (0, false)
        );
        let reader = channel.read(1, 0, Duration::ZERO).unwrap();
        assert_eq!(reader.events, [message(2, "one"), message(2, "two")]);
    }

    #[test]
    fn empty_responses_count_against_their_streams_bound() {
        let (mem, channel) = guest_with_request(1);
        // Responses of no bytes at all, as many as fit the ring at each kick.
        for _ in 0..MAX_STREAM_EVENTS / 4 + 1 {
            for _ in 0..4 {
                respond(&mem, 1, 2, 0, b"");
            }
            channel.kick(&mem, 0);
        }
        let read = channel.read(1, 0, Duration::ZERO).unwrap();
        assert_eq!(
            read.end,
            StreamEnd::Overflow,
            "{} events",
            read.events.len()
        );
        assert_eq!(read.events.len(), MAX_STREAM_EVENTS);
    }

    #[test]
    fn bounds_on_the_host_side() {
        let (mem, channel) = guest();
        let too_big = Message {
            kind: 1,
            payload: vec![0; 512],
        };
        assert!(matches!(
            channel.submit(1, too_big),
            Err(SubmitError::TooLarge { max: 488, .. })
        ));
        for i in 0..MAX_QUEUED as u64 {
            channel.submit(i, message(1, "q")).unwrap();
        }
        assert_eq!(
            channel.submit(999, message(1, "q")),
            Err(SubmitError::QueueFull)
        );
        // A cancel still gets through, once.
        channel.signal(3, message(9, "")).unwrap();
        channel.signal(3, message(9, "")).unwrap();
        assert_eq!(channel.save().queued.len(), MAX_QUEUED + 1);
        // Stream 0's request sent again (its answer lost): known as queued, not refused
        // as if it had not been.
        assert_eq!(
            channel.submit(0, message(1, "q")),
            Err(SubmitError::StreamExists(0))
        );
        drop(mem);
        channel.end();
        assert_eq!(
            channel.read(3, 0, Duration::ZERO).unwrap().end,
            StreamEnd::VmEnded
        );
        assert_eq!(
            channel.submit(1000, message(1, "q")),
            Err(SubmitError::Ended)
        );
    }

    #[test]
    fn streams_let_go_of_keep_the_queue_within_its_bound() {
        let (mem, channel) = guest();
        // Four openings delivered (the ring's slots; the guest takes none), then the
        // queue filled.
        for i in 0..4 {
            channel.submit(i, message(1, "q")).unwrap();
        }
        channel.kick(&mem, 0);
        for i in 4..4 + MAX_QUEUED as u64 {
            channel.submit(i, message(1, "q")).unwrap();
        }
        let full = Err(SubmitError::QueueFull);
        assert_eq!(channel.submit(999, message(1, "q")), full);
        // An opening still queued leaves with its stream: nothing to announce. The
        // delivered ones are announced, within the queue's room for one per stream.
        channel.signal(5, message(9, "")).unwrap();
        for i in [5, 0, 1, 2, 3] {
            channel.release(i).unwrap();
        }
        let queued = channel.save().queued;
        assert!(queued.iter().all(|q| q.stream != 5));
        let notices = queued.iter().filter(|q| q.delivery == Delivery::Released);
        assert_eq!(notices.count(), 4);
        assert_eq!(queued.len(), MAX_QUEUED - 1 + 4);
        assert_eq!(channel.submit(999, message(1, "q")), full);
    }

    /// A running channel with every place taken by a stream of one answer, ended as
    /// `end` says of its id (and cancelled if it says so).
    fn every_place_taken(end: impl Fn(u64) -> (StreamEnd, bool)) -> Channel {
        let (mem, channel) = guest();
        let mut state = channel.save();
        state.streams = (0..MAX_STREAMS as u64)
            .map(|id| Stream {
                id,
                first: 0,
                events: vec![message(16, "answer")],
                bytes: 6,
                end: end(id).0,
                signalled: end(id).1,
                read_whole: false,
                grace_since: None,
            })
            .collect();
        let full = Channel::restore(&state, &mem);
        full.open();
        full
    }

    #[test]
    fn room_for_a_stream_is_made_from_one_read_whole_before_one_unread() {
        let full = every_place_taken(|_| (StreamEnd::Final, false));
        let read = full.read(10, 0, Duration::ZERO).unwrap();
        assert_eq!(read.end, StreamEnd::Final);
        // Its reader may not have that answer (lost on the way): it keeps its place a
        // while, and reads it again.
        assert_eq!(
            full.submit(1000, message(1, "q")),
            Err(SubmitError::TooManyStreams)
        );
        assert_eq!(full.read(10, 0, Duration::ZERO).unwrap(), read);
        // Then it goes first.
        (full.core().state)
            .make_room(Instant::now() + READ_WHOLE_GRACE)
            .unwrap();
        full.submit(1000, message(1, "q")).unwrap();
        let kept: Vec<u64> = full.save().streams.iter().map(|s| s.id).collect();
        assert!(kept.contains(&0) && !kept.contains(&10), "{kept:?}");
        // None read whole: the ended ones keep their places while their readers may come.
        assert_eq!(
            full.submit(1001, message(1, "q")),
            Err(SubmitError::TooManyStreams)
        );
        // Past the grace, the oldest one goes.
        (full.core().state)
            .make_room(Instant::now() + UNREAD_END_GRACE)
            .unwrap();
        full.submit(1001, message(1, "q")).unwrap();
        let kept: Vec<u64> = full.save().streams.iter().map(|s| s.id).collect();
        assert!(!kept.contains(&0) && kept.contains(&1001), "{kept:?}");
    }

    #[test]
    fn an_ended_vms_streams_are_dropped_only_after_it_ended() {
        let (mem, channel) = guest_with_request(5);
        channel.submit(6, message(1, "b")).unwrap();
        // While the VM runs (or is paused, perhaps to move), nothing goes.
        channel.forget_after_end();
        channel.pause();
        channel.forget_after_end();
        let kept = channel.save();
        assert_eq!((kept.streams.len(), kept.queued.len()), (2, 1));
        channel.open();
        channel.kick(&mem, 0);
        channel.end();
        assert_eq!(
            channel.read(5, 0, Duration::ZERO).unwrap().end,
            StreamEnd::VmEnded
        );
        channel.forget_after_end();
        let state = channel.save();
        assert!(state.streams.is_empty() && state.queued.is_empty());
        assert_eq!(
            channel.read(5, 0, Duration::ZERO),
            Err(ReadError::NoSuchStream(5))
        );
    }

    #[test]
    fn a_stream_giving_up_its_place_takes_its_undelivered_opening_with_it() {
        // Stream 0 ended (its guest answered it whole) before the guest took its opening.
        let mut state = every_place_taken(|_| (StreamEnd::Final, false)).save();
        state.queued.push_back(Queued {
            stream: 0,
            delivery: Delivery::Opens,
            message: message(1, "q"),
        });
        let full = Channel::restore(&state, &guest().0);
        full.open();
        // Its grace starts at the first stream wanting a place.
        assert_eq!(
            full.submit(1000, message(1, "q")),
            Err(SubmitError::TooManyStreams)
        );
        (full.core().state)
            .make_room(Instant::now() + UNREAD_END_GRACE)
            .unwrap();
        let after = full.save();
        assert!(after.streams.iter().all(|s| s.id != 0));
        // Delivered later, the opening would start an answer nobody can read.
        assert!(after.queued.is_empty(), "{:?}", after.queued);
    }

    #[test]
    fn an_overflowed_stream_giving_up_its_place_is_announced_to_its_guest() {
        // Every place taken by a stream whose reader read its end: stream 0 overflowed
        // (its guest may still be answering), stream 1 overflowed and was cancelled, the
        // others final.
        let full = every_place_taken(|id| match id {
            0 | 1 => (StreamEnd::Overflow, id == 1),
            _ => (StreamEnd::Final, false),
        });
        for id in 0..MAX_STREAMS as u64 {
            assert_ne!(
                full.read(id, 0, Duration::ZERO).unwrap().end,
                StreamEnd::Open
            );
        }
        let later = Instant::now() + READ_WHOLE_GRACE;
        // Stream 0 goes first, announced; stream 1's guest had its cancel; stream 2's
        // had finished.
        for (gone, told) in [(0, true), (1, false), (2, false)] {
            let before = full.save().queued.len();
            full.core().state.make_room(later).unwrap();
            let state = full.save();
            assert!(state.streams.iter().all(|s| s.id != gone), "{gone} left");
            let notices: Vec<_> = (state.queued.iter())
                .filter(|q| q.delivery == Delivery::Released)
                .map(|q| q.stream)
                .collect();
            assert_eq!(notices, [0], "after {gone}");
            assert_eq!(
                state.queued.len(),
                before + usize::from(told),
                "after {gone}"
            );
        }
        // The notice counts against the queue's bound: with room for the opening and
        // it, the overflowed stream goes first; with room for the opening only, a final
        // one goes instead, and if every one is overflowed, the new stream is refused.
        let mut state = full.save();
        let first = state.streams[0].id;
        for (queued, all_overflowed, gone) in [
            (MAX_QUEUED - 2, false, Some(first)),
            (MAX_QUEUED - 1, false, Some(state.streams[1].id)),
            (MAX_QUEUED - 1, true, None),
        ] {
            for (i, s) in state.streams.iter_mut().enumerate() {
                if i == 0 || all_overflowed {
                    (s.end, s.signalled) = (StreamEnd::Overflow, false);
                }
            }
            state.queued = (0..queued as u64)
                .map(|i| Queued::released(10_000 + i))
                .collect();
            let nearly_full = Channel::restore(&state, &guest().0);
            nearly_full.open();
            for s in &state.streams {
                nearly_full.read(s.id, 0, Duration::ZERO).unwrap();
            }
            let later = Instant::now() + READ_WHOLE_GRACE;
            let made = nearly_full.core().state.make_room(later);
            let after = nearly_full.save();
            let left: Vec<u64> = (state.streams.iter())
                .map(|s| s.id)
                .filter(|id| after.streams.iter().all(|s| s.id != *id))
                .collect();
            let told = after.queued.len() - queued;
            match gone {
                Some(gone) => {
                    assert_eq!(made, Ok(()), "{queued} queued");
                    assert_eq!(left, [gone], "{queued} queued");
                    assert_eq!(told, usize::from(gone == first), "{queued} queued");
                }
                None => {
                    assert_eq!(made, Err(SubmitError::QueueFull));
                    assert!(left.is_empty() && told == 0, "{left:?}, {told}");
                }
            }
        }
    }

    #[test]
    fn a_reader_waits_for_the_next_response() {
        let (mem, channel) = guest_with_request(5);
        let waiting = waiting_reader(&channel, 5);
        respond(&mem, 5, 2, 0, b"tok");
        channel.kick(&mem, 0);
        let read = waiting.join().unwrap();
        assert_eq!(read.events, [message(2, "tok")]);
    }

    #[test]
    fn a_reader_waits_through_a_pause_and_hears_of_a_move_at_once() {
        let (mem, channel) = guest_with_request(5);
        // Paused and run again (a throttle, or a switchover that failed): the reader
        // gets the response that comes after, not an empty answer at the pause.
        let waiting = waiting_reader(&channel, 5);
        channel.pause();
        channel.open();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "the pause ended the wait");
        respond(&mem, 5, 2, 0, b"tok");
        channel.kick(&mem, 0);
        assert_eq!(waiting.join().unwrap().events, [message(2, "tok")]);
        // Paused for a switchover, then gone to the destination: the reader waiting for
        // the next response hears at once that the stream left with the VM.
        let reader = channel.clone();
        let waiting = std::thread::spawn(move || reader.read(5, 1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        channel.pause();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "the pause ended the wait");
        let left = std::time::Instant::now();
        channel.detach();
        let read = waiting.join().unwrap();
        assert!(matches!(read, Err(ReadError::NoSuchStream(5))), "{read:?}");
        assert!(
            left.elapsed() < Duration::from_secs(5),
            "heard of the move late"
        );
    }

    #[test]
    fn setup_is_checked() {
        let mem = create_guest_ram(16 << 20).unwrap();
        let channel = Channel::new();
        let mut header = ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: CHANNEL_VERSION,
            request_slots: 4,
            request_slot_size: 512,
            response_slots: 4,
            response_slot_size: 100,
            ..ChannelHeader::default()
        };
        let status_of = |h: ChannelHeader, addr: u64| {
            mem.write_obj(HeaderBytes(h), GuestAddress(addr)).unwrap();
            channel.setup(&mem, (addr / PAGE_SIZE) as u32);
            mem.read_obj::<HeaderBytes>(GuestAddress(addr))
                .unwrap()
                .0
                .status
        };
        assert_eq!(status_of(header, REGION), status::BAD_GEOMETRY);
        header.response_slot_size = 256;
        // Over the VMM's system pages: refused without a byte written there.
        let below = ChannelHeader {
            status: 0xdead,
            ..header
        };
        assert_eq!(status_of(below, 0x5000), 0xdead);
        assert_eq!(
            status_of(header, (16 << 20) - 4096),
            status::BAD_GUEST_RANGE
        );
        header.version = 9;
        assert_eq!(status_of(header, REGION), status::BAD_VERSION);
        header.version = CHANNEL_VERSION;
        assert_eq!(status_of(header, REGION), status::OK);
        assert_eq!(status_of(header, REGION), status::ALREADY_SET_UP);
        assert_eq!(status_of(below, 0x5000), 0xdead);
        channel.open();
        assert!(channel.submit(1, message(1, "x")).is_ok());
    }
}
