//! The migration stream: frames with a fixed header, a CRC-32 of the payload, optional
//! LZ4, and four kinds: control messages (postcard), RAM page runs, device chunks and
//! pieces of attached files.
//!
//! Everything read is validated before use: magic, kind, flags, lengths against fixed
//! caps (so a hostile peer cannot make us allocate more than one frame's worth), the
//! checksum, the decompressed size, and each record's own fields. Addresses are checked
//! against the VM by the receiver, which knows its size.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ferry_abi::accel::MAX_BUFFERS;
use ferry_abi::file::MAX_FILES;

use crate::replay::{DeviceDigest, DeviceTransfer, LoggedCommand, MAX_MESSAGE_COMMANDS};
use crate::send::MAX_STREAMS;
use crate::vm::{
    ChunkKey, ChunkOrigin, DeviceBuffer, FileTransfer, VmDescription, MAX_CHUNK_BYTES,
    MAX_FILE_PIECE, PAGE_SIZE,
};
use crate::MigrationError;

/// Version of this protocol; peers must speak the same. 2: attached files; 3: settling
/// an in-doubt switchover; 4: a migration key derived from the secret; 5: the VM state's
/// version in the offer; 6: device chunks sent as the file piece they hold; 7: device
/// command replay; 8: the VM's CPU features in the offer, and keepalives in long rounds;
/// 9: the destination's keepalives while it applies a round after its end.
pub const PROTOCOL_VERSION: u32 = 9;
/// Most pages in one RAM record (1 MiB).
pub const MAX_RUN_PAGES: u64 = 256;
/// Largest control message.
pub const MAX_CONTROL_BYTES: usize = 16 << 20;
/// Largest payload of any frame (a control message).
const MAX_PAYLOAD: usize = MAX_CONTROL_BYTES;
/// Largest frame while a connection authenticates: every handshake message fits, and a
/// peer that has not proven who it is cannot make us allocate more.
pub const MAX_HANDSHAKE_FRAME: usize = 4 << 10;
/// Largest data frame a sender makes: a run of pages or a file piece after its record
/// (a device chunk, with its origin or offset, is smaller). A destination's data
/// connections take no larger frames, compressed or not.
pub const MAX_DATA_FRAME: usize = max(
    max(
        RAM_RECORD_BYTES + (MAX_RUN_PAGES * PAGE_SIZE) as usize,
        FILE_RECORD_BYTES + MAX_FILE_PIECE as usize,
    ),
    CHUNK_RECORD_BYTES + 12 + MAX_CHUNK_BYTES as usize,
);
/// Largest control frame on a data connection, where the only control message is a
/// `Keepalive` (one byte).
pub const MAX_DATA_STREAM_CONTROL: usize = 64;
/// Longest reason a destination gives a source (refusing, busy or aborting); a longer
/// one is cut at a character boundary, by the destination. The error chains it gives fit with room to spare.
pub const MAX_REASON_BYTES: usize = 1 << 10;
/// Most bytes postcard writes for one integer (a u64's varint), or for a length.
const MAX_VARINT: usize = 10;
/// Largest control frame a source takes from an authenticated destination, whose answers
/// are small: a reason of [`MAX_REASON_BYTES`] (`Refuse`, `Busy`, `Abort`), or an
/// `Accept` naming every attached file; the others are a few bytes. A destination that
/// announced a larger frame and sent it a byte at a time could otherwise hold the source
/// (and its VM, throttled or paused) for a frame time per KiB: days.
pub const MAX_ANSWER_FRAME: usize = max(
    // The variant, the reason's length, its bytes.
    MAX_VARINT + MAX_VARINT + MAX_REASON_BYTES,
    // The variant, the session, the count of files, each file, whether it replays.
    MAX_VARINT + MAX_VARINT + MAX_VARINT + MAX_FILES * MAX_VARINT + 1,
);

const MAGIC: [u8; 2] = *b"FY";
const HEADER_BYTES: usize = 16;
const KIND_CONTROL: u8 = 1;
const KIND_RAM: u8 = 2;
const KIND_CHUNK: u8 = 3;
const KIND_FILE: u8 = 4;
const FLAG_COMPRESSED: u8 = 1;
const RAM_RECORD_BYTES: usize = 16;
const CHUNK_RECORD_BYTES: usize = 24;
/// A chunk record's form field for a chunk sent as the file piece it holds.
const CHUNK_FROM_FILE: u32 = 2;
/// A chunk record's form field for a chunk's bytes preceded by the file piece they are.
const CHUNK_WITH_ORIGIN: u32 = 3;
/// A chunk record's form field for the bytes written of a chunk, after their offset in it.
const CHUNK_PART: u32 = 4;
const FILE_RECORD_BYTES: usize = 16;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Which connection of a migration this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRole {
    /// The control connection (handshake, rounds, switchover).
    Control,
    /// Data connection `index` of session `session`.
    Data {
        /// Session id the destination gave in [`Message::Accept`].
        session: u64,
        /// Stream number, from 0.
        index: u8,
    },
}

/// How the VM is moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transfer {
    /// Pre-copy while the VM runs, then a short pause.
    Live,
    /// Pause, copy everything, resume on the destination.
    StopAndCopy,
}

/// Control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message of the connecting side.
    Hello {
        /// Protocol version spoken.
        version: u32,
        /// Which connection this is.
        role: StreamRole,
        /// Challenge for the listener.
        nonce: [u8; 32],
    },
    /// The listener's answer: its challenge, and its proof of the secret.
    Challenge {
        /// Challenge for the connecting side.
        nonce: [u8; 32],
        /// HMAC proving the listener knows the secret.
        proof: [u8; 32],
    },
    /// The connecting side's proof of the secret.
    Proof {
        /// HMAC over both challenges.
        proof: [u8; 32],
    },
    /// Authentication passed.
    AuthOk,
    /// The VM on offer and how it will be sent.
    Offer {
        /// The VM.
        vm: VmDescription,
        /// Data connections that will follow.
        streams: u8,
        /// Live or stop-and-copy.
        transfer: Transfer,
        /// Whether attached files the destination has are sent anyway.
        files: FileTransfer,
        /// How device memory may be sent (replay needs the destination's consent).
        device: DeviceTransfer,
    },
    /// The destination prepared a paused VM.
    Accept {
        /// Session id for the data connections.
        session: u64,
        /// The attached files (indices into the offer's) the source must send with round
        /// 0; the destination has the others.
        #[serde(deserialize_with = "at_most::<_, _, MAX_FILES>")]
        send_files: Vec<u32>,
        /// Whether the destination replays device commands (asked for by the offer).
        replay: bool,
    },
    /// Refused (authentication, version, compatibility, resources), with the reason.
    Refuse {
        /// Why.
        reason: String,
    },
    /// A round starts; the device buffer table is as given.
    BeginRound {
        /// Round number from 0.
        round: u32,
        /// Device buffers now; `None` in a replay round (the replayed commands make the
        /// table).
        #[serde(deserialize_with = "buffers_at_most")]
        buffers: Option<Vec<DeviceBuffer>>,
    },
    /// A round's data is all sent: this many frames on each data stream.
    EndRound {
        /// Round number.
        round: u32,
        /// Frames per stream.
        #[serde(deserialize_with = "at_most::<_, _, { MAX_STREAMS as usize }>")]
        frames: Vec<u64>,
    },
    /// The destination applied a whole round.
    RoundApplied {
        /// Round number.
        round: u32,
    },
    /// The final state (vCPUs, devices, ring) of the paused VM.
    State {
        /// Opaque to the engine; the target validates it.
        blob: Vec<u8>,
        /// After a replay: the digest of the source's device memory, which the
        /// destination's must equal.
        device: Option<DeviceDigest>,
    },
    /// The destination restored the VM, paused, and waits for [`Message::Go`].
    Ready,
    /// Resume on the destination: from now on the source will not run the VM.
    Go,
    /// The destination runs the VM.
    Resumed,
    /// Either side gives up, with the reason.
    Abort {
        /// Why.
        reason: String,
    },
    /// Instead of an offer: whether the destination runs the VM of migration `session`
    /// (see [`mod@crate::settle`]).
    Settle {
        /// The session the destination gave in [`Message::Accept`].
        session: u64,
    },
    /// The answer to [`Message::Settle`].
    Settled {
        /// Whether the VM runs there.
        settlement: crate::settle::Settlement,
    },
    /// Instead of a challenge: too many connections are authenticating now (from this
    /// peer, or in all); or instead of an answer to an offer: the host receives as many
    /// migrations as it takes (or, to an offer that must replay, as many that may
    /// replay). Connect again shortly.
    Busy {
        /// Which limit was reached.
        reason: String,
    },
    /// Device commands to replay, in order, after those sent before (inside a round, once
    /// the base is complete). Last, so the other variants keep their wire numbers.
    Commands {
        /// The commands.
        #[serde(deserialize_with = "at_most::<_, _, MAX_MESSAGE_COMMANDS>")]
        commands: Vec<LoggedCommand>,
    },
    /// The sender is still at work on a long round (pre-copy at a low rate ceiling, or a
    /// large stop-and-copy): the reader's idle limit starts again. Sent on the control
    /// stream, and on a data stream that had nothing to carry in a round; by the
    /// destination, on the control stream, at once and then every keepalive period while
    /// it applies a round's frames after its end (the source waits that much longer).
    Keepalive,
}

/// `reason` cut to at most [`MAX_REASON_BYTES`] (at a character boundary, marked with an
/// ellipsis), as a destination sends it: a source takes no larger answer.
pub(crate) fn bounded_reason(reason: String) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    text_start(reason, MAX_REASON_BYTES)
}

/// A reason the peer gave (refusing, busy, aborting), as this side keeps, shows and logs
/// it: at most [`MAX_REASON_BYTES`], control characters escaped (a newline or a
/// terminal's escape would forge log lines). A source's reason may fill a control frame:
/// megabytes.
pub(crate) fn peer_reason(reason: &str) -> String {
    struct Escaped<'a>(&'a str);
    impl std::fmt::Display for Escaped<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            use std::fmt::Write as _;
            self.0.chars().try_for_each(|c| {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())
                } else {
                    f.write_char(c)
                }
            })
        }
    }
    text_start(Escaped(reason), MAX_REASON_BYTES)
}

/// `text` as displayed, cut to at most `most` bytes (at a character boundary, the cut
/// marked with an ellipsis). Formatting stops at the cut, so a huge value costs no more
/// than its start.
pub(crate) fn text_start(text: impl std::fmt::Display, most: usize) -> String {
    use std::fmt::Write as _;
    let mut start = TextStart {
        text: String::new(),
        most,
    };
    if write!(start, "{text}").is_err() {
        let mut end = most.saturating_sub(CUT.len());
        while !start.text.is_char_boundary(end) {
            end -= 1;
        }
        start.text.truncate(end);
        start.text.push_str(CUT);
    }
    start.text
}

/// What marks a text cut short.
const CUT: &str = "...";

/// The first `most` bytes of what is written, up to a character boundary; writing more
/// fails, which stops a formatting.
struct TextStart {
    text: String,
    most: usize,
}

impl std::fmt::Write for TextStart {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.most - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.most = self.text.len();
        Err(std::fmt::Error)
    }
}

/// Decodes a sequence of at most `MAX` elements: a peer's count cannot make the decoder
/// hold more than the bound, whatever fits in a message (an element that takes a few
/// bytes on the wire may take tens in memory). For `#[serde(deserialize_with)]` on the
/// sequences of every state a peer or a file gives.
pub fn at_most<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX}")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::custom(format_args!(
                        "more than {MAX} elements"
                    )));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}

/// A round's buffer table, at most [`MAX_BUFFERS`] buffers (the same wire format as the
/// plain `Option<Vec<_>>`: postcard writes a newtype as what it wraps).
fn buffers_at_most<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<DeviceBuffer>>, D::Error> {
    #[derive(Deserialize)]
    struct Table(
        #[serde(deserialize_with = "at_most::<_, _, { MAX_BUFFERS as usize }>")] Vec<DeviceBuffer>,
    );
    Ok(Option::<Table>::deserialize(d)?.map(|t| t.0))
}

/// One record read off the wire (borrowing the reader's buffer).
#[derive(Debug)]
pub enum Frame<'a> {
    /// A control message.
    Control(Message),
    /// Pages `[gpa, gpa + pages * 4096)`: their contents, or `None` for zeros.
    Ram {
        /// First address (page aligned).
        gpa: u64,
        /// Page count (1..=[`MAX_RUN_PAGES`]).
        pages: u64,
        /// Contents.
        data: Option<&'a [u8]>,
    },
    /// A device chunk: its contents (`len` bytes), or `None` for zeros.
    Chunk {
        /// Which chunk.
        key: ChunkKey,
        /// Its length (at most [`MAX_CHUNK_BYTES`]).
        len: u64,
        /// Contents.
        data: Option<&'a [u8]>,
        /// The piece of an attached file the contents are, if they are one (the
        /// destination is receiving the file).
        origin: Option<ChunkOrigin>,
    },
    /// The bytes written of a device chunk (the rest is unchanged since it was sent).
    ChunkPart {
        /// Which chunk.
        key: ChunkKey,
        /// Where the bytes go in the chunk (they end within [`MAX_CHUNK_BYTES`]).
        offset: u64,
        /// The bytes (1 to [`MAX_CHUNK_BYTES`]).
        data: &'a [u8],
    },
    /// A device chunk that holds a piece of an attached file the destination has.
    FileChunk {
        /// Which chunk.
        key: ChunkKey,
        /// Its length (at most [`MAX_CHUNK_BYTES`]).
        len: u64,
        /// The piece.
        origin: ChunkOrigin,
    },
    /// Bytes of an attached file.
    File {
        /// The file's index in the offer.
        file: u32,
        /// Where they go in the file.
        offset: u64,
        /// The bytes (1 to [`MAX_FILE_PIECE`]).
        data: &'a [u8],
    },
}

fn malformed(what: impl Into<String>) -> MigrationError {
    MigrationError::MalformedFrame(what.into())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The (file, offset) at the start of `b` (at least 12 bytes).
fn origin_at(b: &[u8]) -> ChunkOrigin {
    ChunkOrigin {
        file: u32_at(b, 0),
        offset: u64_at(b, 4),
    }
}

/// A chunk record's head for chunk `key` of `len` bytes in `form`, followed by `origin`.
fn chunk_head_with_origin(
    key: ChunkKey,
    form: u32,
    len: u64,
    origin: ChunkOrigin,
) -> [u8; CHUNK_RECORD_BYTES + 12] {
    let mut head = [0u8; CHUNK_RECORD_BYTES + 12];
    head[..4].copy_from_slice(&key.buffer.to_le_bytes());
    head[4..8].copy_from_slice(&form.to_le_bytes());
    head[8..16].copy_from_slice(&key.index.to_le_bytes());
    head[16..24].copy_from_slice(&len.to_le_bytes());
    head[24..28].copy_from_slice(&origin.file.to_le_bytes());
    head[28..].copy_from_slice(&origin.offset.to_le_bytes());
    head
}

/// Frames both ways over one connection that is read and written through a single
/// object, as a TLS session must be (it cannot be split into a read half and a write
/// half the way a `TcpStream` can). Used from one thread at a time.
pub struct FrameStream<S> {
    /// Sends frames; it owns the connection, which [`FrameStream::read`] reads too.
    pub writer: FrameWriter<S>,
    decoder: Decoder,
    /// Bytes read so far, headers included.
    pub bytes_read: u64,
}

impl<S: Read + Write> FrameStream<S> {
    /// Frames over `stream`; data frames are LZ4-compressed when `compress` (see
    /// [`FrameWriter::new`]).
    pub fn new(stream: S, compress: bool) -> Self {
        Self {
            writer: FrameWriter::new(stream, compress),
            decoder: Decoder::default(),
            bytes_read: 0,
        }
    }

    /// Refuses frames larger than `bytes` (both as sent and uncompressed), up to the
    /// protocol's own limit: [`MAX_HANDSHAKE_FRAME`] while authenticating.
    pub fn limit_frames(&mut self, bytes: usize) {
        self.limit_frames_by_kind(bytes, bytes);
    }

    /// Refuses data frames larger than `data` and control frames larger than `control`
    /// (both as sent and uncompressed), up to the protocol's own limit: a data connection
    /// takes [`MAX_DATA_FRAME`] and [`MAX_DATA_STREAM_CONTROL`].
    pub fn limit_frames_by_kind(&mut self, data: usize, control: usize) {
        self.decoder.limit = Some(Limits {
            data: data.min(MAX_PAYLOAD),
            control: control.min(MAX_PAYLOAD),
        });
    }

    /// Takes frames up to the protocol's limit again.
    pub fn unlimit_frames(&mut self) {
        self.decoder.limit = None;
    }

    /// Gives a frame's header, and each KiB of its payload, `time` to arrive from the
    /// frame's first byte (by default the destination's idle limit).
    pub fn time_frames(&mut self, time: Duration) {
        self.decoder.frame_time = time;
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut S {
        self.writer.get_mut()
    }

    /// The next frame. A clean end of stream is an [`MigrationError::Io`] of kind
    /// `UnexpectedEof`, like any other cut.
    pub fn read(&mut self) -> Result<Frame<'_>, MigrationError> {
        // The writer keeps nothing back (each frame goes straight to the connection),
        // so reading the connection under it is in order; a connection that buffers
        // writes flushes them before it waits for a read (as the engine's do).
        self.decoder
            .read(self.writer.get_mut(), &mut self.bytes_read)
    }

    /// The next frame, which must be a control message (an Abort is the peer's error).
    pub fn expect_control(&mut self, what: &str) -> Result<Message, MigrationError> {
        control_of(self.read(), what)
    }

    /// Sends a control message (and flushes).
    pub fn send(&mut self, message: &Message) -> Result<(), MigrationError> {
        self.writer.send(message)
    }
}

/// Reads and validates frames from one direction only (a file, a byte slice): the
/// read-only half of a [`FrameStream`].
pub struct FrameReader<R> {
    input: R,
    decoder: Decoder,
    /// Bytes read so far, headers included.
    pub bytes_read: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `input`, of which `bytes_read` bytes were read already (a frame
    /// read first is checked for a TLS record instead).
    pub fn new(input: R, bytes_read: u64) -> Self {
        Self {
            input,
            decoder: Decoder::default(),
            bytes_read,
        }
    }

    /// The next frame. A clean end of stream is an [`MigrationError::Io`] of kind
    /// `UnexpectedEof`, like any other cut.
    pub fn read(&mut self) -> Result<Frame<'_>, MigrationError> {
        self.decoder.read(&mut self.input, &mut self.bytes_read)
    }

    /// The next frame, which must be a control message.
    pub fn expect_control(&mut self, what: &str) -> Result<Message, MigrationError> {
        control_of(self.read(), what)
    }

    /// The input, positioned after the last frame read.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }
}

/// Decoding state: the buffers of the last frame, reused, and limits below the
/// protocol's, if any.
struct Decoder {
    wire: Vec<u8>,
    raw: Vec<u8>,
    limit: Option<Limits>,
    /// How long a frame's header, and each [`FRAME_BYTES_PER_FRAME_TIME`] of its
    /// payload, may take to arrive, from its first byte. Each read has its own timeout,
    /// but a peer that sends a frame a byte at a time, each within that timeout, would
    /// otherwise hold the connection (and a session, or a switchover waiting for `Go`)
    /// for ever. Checked as each read returns: a frame is given up on within its
    /// allowance and one read's timeout. A slow link keeps far more than this rate.
    frame_time: Duration,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            wire: Vec::new(),
            raw: Vec::new(),
            limit: None,
            frame_time: crate::deadline::idle_limit(),
        }
    }
}

/// Payload bytes a frame is given one more [`Decoder::frame_time`] for: 1 KiB, so a 4 KiB
/// page arrives over up to five idle limits (ten minutes by default), and `Go` within one.
const FRAME_BYTES_PER_FRAME_TIME: usize = 1 << 10;

/// When a frame's first byte arrived, against [`Decoder::frame_time`].
struct FrameClock {
    first_byte: Option<Instant>,
    limit: Duration,
}

impl FrameClock {
    /// The header says `payload` bytes follow: they are given their time too.
    fn allow_payload(&mut self, payload: usize) {
        let times = 1 + payload / FRAME_BYTES_PER_FRAME_TIME;
        self.limit = self
            .limit
            .saturating_mul(u32::try_from(times).unwrap_or(u32::MAX));
    }

    /// Some of the frame arrived and more is to come: refused if it has taken too long.
    fn more_to_come(&mut self) -> Result<(), MigrationError> {
        let first = *self.first_byte.get_or_insert_with(Instant::now);
        if first.elapsed() > self.limit {
            return Err(MigrationError::TimedOut {
                phase: "a frame".into(),
                what: "receiving it a few bytes at a time".into(),
                limit_ms: self.limit.as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// Fills `buf` from `input`, a frame's payload that `clock` times.
fn read_payload(
    input: &mut impl Read,
    buf: &mut [u8],
    clock: &mut FrameClock,
) -> Result<(), MigrationError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(MigrationError::io("reading a frame")(std::io::Error::from(
                    ErrorKind::UnexpectedEof,
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(MigrationError::io("reading a frame")(e)),
        }
        if got < buf.len() {
            clock.more_to_come()?;
        }
    }
    Ok(())
}

/// Largest payloads a decoder takes, by kind (as sent and uncompressed alike).
#[derive(Clone, Copy)]
struct Limits {
    data: usize,
    control: usize,
}

impl Decoder {
    /// The next frame from `input`; `bytes` counts what was read.
    fn read<'a>(
        &'a mut self,
        input: &mut impl Read,
        bytes: &mut u64,
    ) -> Result<Frame<'a>, MigrationError> {
        let mut header = [0u8; HEADER_BYTES];
        let mut clock = FrameClock {
            first_byte: None,
            limit: self.frame_time,
        };
        read_header(input, &mut header, *bytes == 0, &mut clock)?;
        if header[..2] == *b"HT" {
            // An HTTP server's answer ("HTTP/1.1 400 ..."): the usual mistake is a host's
            // API address given where its migration address was meant.
            return Err(malformed(
                "bad frame magic 4854: the peer answered in HTTP; a migration goes to the \
                 destination's migration address (its --migration-listen), not its API",
            ));
        }
        if header[..2] != MAGIC {
            return Err(malformed(format!(
                "bad frame magic {:02x}{:02x} (not a Ferry migration stream, or out of sync)",
                header[0], header[1]
            )));
        }
        let kind = header[2];
        let flags = header[3];
        let wire_len = u32_at(&header, 4) as usize;
        let raw_len = u32_at(&header, 8) as usize;
        let crc = u32_at(&header, 12);
        if !matches!(kind, KIND_CONTROL | KIND_RAM | KIND_CHUNK | KIND_FILE) {
            return Err(malformed(format!("unknown frame kind {kind}")));
        }
        if flags & !FLAG_COMPRESSED != 0 {
            return Err(malformed(format!("unknown frame flags {flags:#x}")));
        }
        let compressed = flags & FLAG_COMPRESSED != 0;
        // Senders never compress control messages: one that is would only make a small
        // frame expand to a large buffer here.
        if compressed && kind == KIND_CONTROL {
            return Err(malformed("a compressed control frame"));
        }
        let limit = self.limit.map_or(MAX_PAYLOAD, |l| {
            if kind == KIND_CONTROL {
                l.control
            } else {
                l.data
            }
        });
        if wire_len > limit || raw_len > limit || (!compressed && wire_len != raw_len) {
            return Err(malformed(format!(
                "frame of {wire_len} bytes ({raw_len} uncompressed) exceeds the {limit}-byte limit or is inconsistent"
            )));
        }
        // The buffers only grow (up to the limits): shrinking them would zero-fill them
        // again for the next large frame, and small and large frames alternate.
        let wire = grown(&mut self.wire, wire_len);
        clock.allow_payload(wire_len);
        if wire_len > 0 {
            clock.more_to_come()?;
        }
        read_payload(input, wire, &mut clock)?;
        *bytes += (HEADER_BYTES + wire_len) as u64;
        // Under a fuzzer the checksum is not checked, so that it reaches what follows.
        if !cfg!(fuzzing) && crc32fast::hash(wire) != crc {
            return Err(malformed("frame checksum mismatch (corrupted stream)"));
        }
        let payload: &[u8] = if compressed {
            let raw = grown(&mut self.raw, raw_len);
            let n = lz4_flex::block::decompress_into(wire, raw)
                .map_err(|e| malformed(format!("bad compressed frame: {e}")))?;
            if n != raw_len {
                return Err(malformed(format!(
                    "compressed frame expands to {n} bytes, header says {raw_len}"
                )));
            }
            raw
        } else {
            wire
        };
        parse(kind, payload)
    }
}

/// A frame header: magic, kind, flags, payload length on the wire and uncompressed,
/// CRC-32 of the payload on the wire.
fn frame_header(
    kind: u8,
    flags: u8,
    wire_len: usize,
    raw_len: usize,
    crc: u32,
) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..2].copy_from_slice(&MAGIC);
    header[2] = kind;
    header[3] = flags;
    header[4..8].copy_from_slice(&(wire_len as u32).to_le_bytes());
    header[8..12].copy_from_slice(&(raw_len as u32).to_le_bytes());
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Writes a frame header and its payload's parts (at most two) in one vectored write,
/// so a connection's buffer can pass large payloads straight to the socket instead of
/// copying them; returns the bytes written.
fn write_frame(
    output: &mut impl Write,
    header: &[u8; HEADER_BYTES],
    parts: &[&[u8]],
) -> Result<usize, MigrationError> {
    debug_assert!(parts.len() <= 2);
    let part = |i: usize| IoSlice::new(parts.get(i).copied().unwrap_or_default());
    let mut slices = [IoSlice::new(header), part(0), part(1)];
    let total = slices.iter().map(|s| s.len()).sum::<usize>();
    let mut left: &mut [IoSlice<'_>] = &mut slices;
    while !left.is_empty() {
        match output.write_vectored(left) {
            Ok(0) => {
                return Err(MigrationError::io("sending")(std::io::Error::from(
                    ErrorKind::WriteZero,
                )))
            }
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(MigrationError::io("sending")(e)),
        }
    }
    Ok(total)
}

/// The first `len` bytes of `buf`, growing it (never shrinking it) to hold them.
fn grown(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Reads a frame header. On a connection's `first` frame, a peer that sent a TLS record
/// instead (a TLS alert or handshake) is told apart from a cut or from garbage, even when
/// that record is shorter than a header: the two hosts disagree on TLS.
fn read_header(
    input: &mut impl Read,
    header: &mut [u8; HEADER_BYTES],
    first: bool,
    clock: &mut FrameClock,
) -> Result<(), MigrationError> {
    let mut got = 0;
    while got < HEADER_BYTES {
        match input.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(MigrationError::io("reading a frame header")(e)),
        }
        if (1..HEADER_BYTES).contains(&got) {
            clock.more_to_come()?;
        }
    }
    // A TLS record starts with its content type (20 to 23) and major version 3.
    if first && got >= 2 && (20..=23).contains(&header[0]) && header[1] == 3 {
        return Err(MigrationError::Auth(
            "TLS handshake failed: the peer speaks TLS and this host has TLS off; \
             enable TLS on both hosts or on neither"
                .into(),
        ));
    }
    if got < HEADER_BYTES {
        return Err(MigrationError::io("reading a frame header")(
            std::io::Error::new(ErrorKind::UnexpectedEof, "failed to fill whole buffer"),
        ));
    }
    Ok(())
}

fn parse(kind: u8, p: &[u8]) -> Result<Frame<'_>, MigrationError> {
    match kind {
        KIND_CONTROL => postcard::from_bytes(p)
            .map(Frame::Control)
            .map_err(|e| match e {
                // Postcard drops a decoder's own words (`at_most`'s count, an unknown variant).
                postcard::Error::SerdeDeCustom => malformed(
                    "undecodable control message: a value outside the protocol's bounds \
                 (a list longer than it allows, or an unknown variant)",
                ),
                e => malformed(format!("undecodable control message: {e}")),
            }),
        KIND_RAM => {
            if p.len() < RAM_RECORD_BYTES {
                return Err(malformed("short RAM record"));
            }
            let gpa = u64_at(p, 0);
            let pages = u64::from(u32_at(p, 8));
            let zero = u32_at(p, 12);
            let data = &p[RAM_RECORD_BYTES..];
            let expected = if zero == 0 { pages * PAGE_SIZE } else { 0 };
            if !gpa.is_multiple_of(PAGE_SIZE)
                || !(1..=MAX_RUN_PAGES).contains(&pages)
                || zero > 1
                || data.len() as u64 != expected
            {
                return Err(malformed(format!(
                    "bad RAM record: {pages} pages at {gpa:#x} with {} data bytes",
                    data.len()
                )));
            }
            Ok(Frame::Ram {
                gpa,
                pages,
                data: (zero == 0).then_some(data),
            })
        }
        KIND_FILE => {
            if p.len() < FILE_RECORD_BYTES {
                return Err(malformed("short file record"));
            }
            let file = u32_at(p, 0);
            let reserved = u32_at(p, 4);
            let offset = u64_at(p, 8);
            let data = &p[FILE_RECORD_BYTES..];
            if reserved != 0
                || !(1..=MAX_FILE_PIECE).contains(&(data.len() as u64))
                || offset.checked_add(data.len() as u64).is_none()
            {
                return Err(malformed(format!(
                    "bad file record: {} bytes at {offset} of file {file}",
                    data.len()
                )));
            }
            Ok(Frame::File { file, offset, data })
        }
        _ => {
            if p.len() < CHUNK_RECORD_BYTES {
                return Err(malformed("short chunk record"));
            }
            let key = ChunkKey {
                buffer: u32_at(p, 0),
                index: u64_at(p, 8),
            };
            // The form: 0 the bytes follow, 1 zeros, 2 a file piece (file, offset) follows.
            let zero = u32_at(p, 4);
            let len = u64_at(p, 16);
            let data = &p[CHUNK_RECORD_BYTES..];
            if zero == CHUNK_WITH_ORIGIN {
                if !(1..=MAX_CHUNK_BYTES).contains(&len) || data.len() as u64 != 12 + len {
                    return Err(malformed(format!(
                        "bad chunk record with origin: {len} bytes for {key} with {} bytes",
                        data.len()
                    )));
                }
                return Ok(Frame::Chunk {
                    key,
                    len,
                    data: Some(&data[12..]),
                    origin: Some(origin_at(data)),
                });
            }
            if zero == CHUNK_PART {
                let offset = (data.len() >= 8).then(|| u64_at(data, 0));
                let fits = offset
                    .is_some_and(|o| o.checked_add(len).is_some_and(|end| end <= MAX_CHUNK_BYTES));
                if !(1..=MAX_CHUNK_BYTES).contains(&len) || data.len() as u64 != 8 + len || !fits {
                    return Err(malformed(format!(
                        "bad chunk part record: {len} bytes at {offset:?} of {key} with {} bytes",
                        data.len()
                    )));
                }
                return Ok(Frame::ChunkPart {
                    key,
                    offset: offset.unwrap_or(0),
                    data: &data[8..],
                });
            }
            if zero == CHUNK_FROM_FILE {
                if !(1..=MAX_CHUNK_BYTES).contains(&len) || data.len() != 12 {
                    return Err(malformed(format!(
                        "bad file chunk record: {len} bytes for {key} with {} bytes of origin",
                        data.len()
                    )));
                }
                return Ok(Frame::FileChunk {
                    key,
                    len,
                    origin: origin_at(data),
                });
            }
            let expected = if zero == 0 { len } else { 0 };
            if !(1..=MAX_CHUNK_BYTES).contains(&len) || zero > 1 || data.len() as u64 != expected {
                return Err(malformed(format!(
                    "bad chunk record: {len} bytes for {key} with {} data bytes",
                    data.len()
                )));
            }
            Ok(Frame::Chunk {
                key,
                len,
                data: (zero == 0).then_some(data),
                origin: None,
            })
        }
    }
}

/// Writes frames to one connection.
pub struct FrameWriter<W> {
    output: W,
    compress: bool,
    raw: Vec<u8>,
    packed: Vec<u8>,
    /// Bytes written so far, headers included.
    pub bytes: u64,
    /// Frames written so far.
    pub frames: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `output`; data frames are LZ4-compressed when `compress` (and when
    /// that makes them smaller).
    pub fn new(output: W, compress: bool) -> Self {
        Self {
            output,
            compress,
            raw: Vec::new(),
            packed: Vec::new(),
            bytes: 0,
            frames: 0,
        }
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.output
    }

    /// The connection, once every frame is written.
    pub fn into_inner(self) -> W {
        self.output
    }

    /// Sends a control message (and flushes).
    pub fn send(&mut self, message: &Message) -> Result<(), MigrationError> {
        let bytes = postcard::to_stdvec(message)
            .map_err(|e| MigrationError::Encode(format!("a control message: {e}")))?;
        if bytes.len() > MAX_CONTROL_BYTES {
            return Err(MigrationError::Encode(
                "a control message over the size limit".into(),
            ));
        }
        // Never compressed: readers refuse compressed control frames.
        self.emit(KIND_CONTROL, &bytes, &[], false)?;
        self.flush()
    }

    /// Sends pages starting at `gpa` (`data` a whole number of pages), or `pages` zero
    /// pages when `data` is `None`.
    pub fn send_ram(
        &mut self,
        gpa: u64,
        pages: u64,
        data: Option<&[u8]>,
    ) -> Result<(), MigrationError> {
        debug_assert!(pages <= MAX_RUN_PAGES);
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&gpa.to_le_bytes());
        head[8..12].copy_from_slice(&(pages as u32).to_le_bytes());
        head[12..].copy_from_slice(&u32::from(data.is_none()).to_le_bytes());
        self.emit(KIND_RAM, &head, data.unwrap_or_default(), data.is_some())
    }

    /// Sends a device chunk of `len` bytes (`data`, or zeros when `None`).
    pub fn send_chunk(
        &mut self,
        key: ChunkKey,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), MigrationError> {
        let mut head = [0u8; 24];
        head[..4].copy_from_slice(&key.buffer.to_le_bytes());
        head[4..8].copy_from_slice(&u32::from(data.is_none()).to_le_bytes());
        head[8..16].copy_from_slice(&key.index.to_le_bytes());
        head[16..].copy_from_slice(&len.to_le_bytes());
        self.emit(KIND_CHUNK, &head, data.unwrap_or_default(), data.is_some())
    }

    /// Sends device chunk `key`'s bytes, which are the file piece `origin`.
    pub fn send_chunk_with_origin(
        &mut self,
        key: ChunkKey,
        data: &[u8],
        origin: ChunkOrigin,
    ) -> Result<(), MigrationError> {
        let head = chunk_head_with_origin(key, CHUNK_WITH_ORIGIN, data.len() as u64, origin);
        self.emit(KIND_CHUNK, &head, data, true)
    }

    /// Sends `data`, the bytes written of device chunk `key` at `offset` in it.
    pub fn send_chunk_part(
        &mut self,
        key: ChunkKey,
        offset: u64,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let mut head = [0u8; CHUNK_RECORD_BYTES + 8];
        head[..4].copy_from_slice(&key.buffer.to_le_bytes());
        head[4..8].copy_from_slice(&CHUNK_PART.to_le_bytes());
        head[8..16].copy_from_slice(&key.index.to_le_bytes());
        head[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
        head[24..].copy_from_slice(&offset.to_le_bytes());
        self.emit(KIND_CHUNK, &head, data, true)
    }

    /// Sends device chunk `key` (`len` bytes) as the file piece `origin` it holds.
    pub fn send_chunk_origin(
        &mut self,
        key: ChunkKey,
        len: u64,
        origin: ChunkOrigin,
    ) -> Result<(), MigrationError> {
        let head = chunk_head_with_origin(key, CHUNK_FROM_FILE, len, origin);
        self.emit(KIND_CHUNK, &head, &[], false)
    }

    /// Sends `data` (1 to [`MAX_FILE_PIECE`] bytes) of attached file `file` at `offset`.
    pub fn send_file(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        debug_assert!(!data.is_empty() && data.len() as u64 <= MAX_FILE_PIECE);
        let mut head = [0u8; FILE_RECORD_BYTES];
        head[..4].copy_from_slice(&file.to_le_bytes());
        head[8..].copy_from_slice(&offset.to_le_bytes());
        self.emit(KIND_FILE, &head, data, true)
    }

    /// Writes one frame whose payload is `head` then `data`. Uncompressed, the parts go
    /// out as they are (no staging copy of the data); compressed, they are joined first.
    fn emit(
        &mut self,
        kind: u8,
        head: &[u8],
        data: &[u8],
        compressible: bool,
    ) -> Result<(), MigrationError> {
        let raw_len = head.len() + data.len();
        if self.compress && compressible {
            self.raw.clear();
            self.raw.extend_from_slice(head);
            self.raw.extend_from_slice(data);
            let packed = grown(
                &mut self.packed,
                lz4_flex::block::get_maximum_output_size(raw_len),
            );
            let n = lz4_flex::block::compress_into(&self.raw, packed)
                .map_err(|e| MigrationError::Encode(format!("compression failed: {e}")))?;
            if n < raw_len {
                let crc = crc32fast::hash(&self.packed[..n]);
                let header = frame_header(kind, FLAG_COMPRESSED, n, raw_len, crc);
                let written = write_frame(&mut self.output, &header, &[&self.packed[..n]]);
                return self.count(written);
            }
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(data);
        let header = frame_header(kind, 0, raw_len, raw_len, crc.finalize());
        let written = write_frame(&mut self.output, &header, &[head, data]);
        self.count(written)
    }

    /// Counts a frame written (`written` bytes, header included).
    fn count(&mut self, written: Result<usize, MigrationError>) -> Result<(), MigrationError> {
        self.bytes += written? as u64;
        self.frames += 1;
        Ok(())
    }

    /// Flushes buffered frames.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.output.flush().map_err(MigrationError::io("sending"))
    }
}

fn control_of(
    frame: Result<Frame<'_>, MigrationError>,
    what: &str,
) -> Result<Message, MigrationError> {
    match frame? {
        Frame::Control(Message::Abort { reason }) => {
            Err(MigrationError::PeerAborted(peer_reason(&reason)))
        }
        Frame::Control(message) => Ok(message),
        _ => Err(MigrationError::UnexpectedMessage {
            expected: what.to_string(),
            got: "a data frame".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(compress: bool) {
        let mut w = FrameWriter::new(Vec::new(), compress);
        let page = vec![7u8; PAGE_SIZE as usize * 2];
        w.send_ram(0x10000, 2, Some(&page)).unwrap();
        w.send_ram(0x20000, 5, None).unwrap();
        let key = ChunkKey {
            buffer: 3,
            index: 9,
        };
        w.send_chunk(key, 100, Some(&[1; 100])).unwrap();
        let origin = ChunkOrigin {
            file: 1,
            offset: 1 << 33,
        };
        w.send_chunk_origin(key, 4096, origin).unwrap();
        w.send_chunk_with_origin(key, &[5; 300], origin).unwrap();
        w.send_chunk_part(key, 1000, &[6; 24]).unwrap();
        w.send_file(2, 1 << 40, &[3; 77]).unwrap();
        w.send(&Message::Go).unwrap();
        let bytes = w.output;
        let mut r = FrameReader::new(&bytes[..], 0);
        assert!(
            matches!(r.read().unwrap(), Frame::Ram { gpa: 0x10000, pages: 2, data: Some(d) } if d == page)
        );
        assert!(matches!(
            r.read().unwrap(),
            Frame::Ram {
                gpa: 0x20000,
                pages: 5,
                data: None
            }
        ));
        assert!(
            matches!(r.read().unwrap(), Frame::Chunk { key: k, len: 100, data: Some(d), origin: None } if k == key && d == [1; 100])
        );
        assert!(
            matches!(r.read().unwrap(), Frame::FileChunk { key: k, len: 4096, origin: o } if k == key && o == origin)
        );
        assert!(
            matches!(r.read().unwrap(), Frame::Chunk { key: k, len: 300, data: Some(d), origin: Some(o) } if k == key && d == [5; 300] && o == origin)
        );
        assert!(
            matches!(r.read().unwrap(), Frame::ChunkPart { key: k, offset: 1000, data: d } if k == key && d == [6; 24])
        );
        assert!(
            matches!(r.read().unwrap(), Frame::File { file: 2, offset: 0x100_0000_0000, data } if data == [3; 77])
        );
        assert!(matches!(r.read().unwrap(), Frame::Control(Message::Go)));
        assert!(matches!(r.read(), Err(MigrationError::Io { .. })));
    }

    #[test]
    fn frames_roundtrip_plain_and_compressed() {
        roundtrip(false);
        roundtrip(true);
    }

    /// A connection that takes a few bytes per write, and sometimes is interrupted.
    struct Trickle {
        out: Vec<u8>,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(7);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn frames_survive_short_and_interrupted_writes() {
        let mut w = FrameWriter::new(
            Trickle {
                out: Vec::new(),
                calls: 0,
            },
            false,
        );
        let key = ChunkKey {
            buffer: 1,
            index: 2,
        };
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        w.send_chunk(key, 1000, Some(&data)).unwrap();
        w.send(&Message::Go).unwrap();
        let bytes = w.output.out;
        let mut r = FrameReader::new(&bytes[..], 0);
        assert!(
            matches!(r.read().unwrap(), Frame::Chunk { key: k, len: 1000, data: Some(d), origin: None } if k == key && d == data)
        );
        assert!(matches!(r.read().unwrap(), Frame::Control(Message::Go)));
    }

    fn one_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn read_err(bytes: &[u8]) -> String {
        match FrameReader::new(bytes, 0).read() {
            Err(e) => e.to_string(),
            Ok(f) => panic!("accepted {f:?}"),
        }
    }

    #[test]
    fn hostile_frames_are_refused_with_a_reason() {
        assert!(read_err(b"GET / HTTP/1.1\r\n\r\n").contains("magic"));
        // An API's answer names the address that was meant.
        let http = read_err(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert!(http.contains("--migration-listen"), "{http}");
        let mut huge = one_frame(KIND_CONTROL, 0, b"");
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_err(&huge).contains("limit"));
        assert!(read_err(&one_frame(9, 0, b"")).contains("kind"));
        assert!(read_err(&one_frame(KIND_CONTROL, 0x80, b"")).contains("flags"));
        let mut bad_crc = one_frame(KIND_CONTROL, 0, &[1, 2, 3]);
        bad_crc[16] ^= 1;
        assert!(read_err(&bad_crc).contains("checksum"));
        assert!(read_err(&one_frame(KIND_CONTROL, 0, &[200, 200, 200])).contains("control"));
        // A RAM record claiming more pages than it carries, or unaligned.
        let mut rec = Vec::new();
        rec.extend_from_slice(&0x1000u64.to_le_bytes());
        rec.extend_from_slice(&2u32.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rec.extend_from_slice(&[0; 4096]);
        assert!(read_err(&one_frame(KIND_RAM, 0, &rec)).contains("bad RAM record"));
        rec[0] = 1;
        assert!(read_err(&one_frame(KIND_RAM, 0, &rec)).contains("bad RAM record"));
        // A chunk longer than the largest chunk.
        let mut chunk = vec![0u8; CHUNK_RECORD_BYTES];
        chunk[16..24].copy_from_slice(&(MAX_CHUNK_BYTES + 1).to_le_bytes());
        chunk[4] = 1;
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk record"));
        // A file chunk without its origin, or with more; an unknown form.
        chunk[16..24].copy_from_slice(&4096u64.to_le_bytes());
        chunk[4] = CHUNK_FROM_FILE as u8;
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad file chunk record"));
        chunk.extend_from_slice(&[0; 13]);
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad file chunk record"));
        // Bytes with an origin, one byte short.
        chunk[4] = CHUNK_WITH_ORIGIN as u8;
        chunk.truncate(CHUNK_RECORD_BYTES + 12 + 4095);
        chunk.resize(CHUNK_RECORD_BYTES + 12 + 4095, 0);
        assert!(
            read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk record with origin")
        );
        chunk.truncate(CHUNK_RECORD_BYTES);
        chunk[4] = 5;
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk record"));
        // A part without its offset, one that ends past the chunk, one miscounted.
        chunk[4] = CHUNK_PART as u8;
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk part record"));
        chunk.extend_from_slice(&(MAX_CHUNK_BYTES - 4095).to_le_bytes());
        chunk.resize(CHUNK_RECORD_BYTES + 8 + 4096, 0);
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk part record"));
        chunk[24..32].copy_from_slice(&0u64.to_le_bytes());
        chunk.pop();
        assert!(read_err(&one_frame(KIND_CHUNK, 0, &chunk)).contains("bad chunk part record"));
        // File pieces: empty, too long, running past 2^64, a nonzero reserved field.
        let file = |offset: u64, len: usize, reserved: u32| {
            let mut rec = vec![0u8; FILE_RECORD_BYTES];
            rec[4..8].copy_from_slice(&reserved.to_le_bytes());
            rec[8..16].copy_from_slice(&offset.to_le_bytes());
            rec.resize(FILE_RECORD_BYTES + len, 1);
            one_frame(KIND_FILE, 0, &rec)
        };
        assert!(read_err(&file(0, 0, 0)).contains("bad file record"));
        assert!(read_err(&file(0, MAX_FILE_PIECE as usize + 1, 0)).contains("bad file record"));
        assert!(read_err(&file(u64::MAX - 4, 10, 0)).contains("bad file record"));
        assert!(read_err(&file(0, 10, 1)).contains("bad file record"));
        assert!(read_err(&one_frame(KIND_FILE, 0, &[0; 15])).contains("short file record"));
        // Compressed data that does not expand to the announced size.
        let mut lying = one_frame(KIND_RAM, FLAG_COMPRESSED, &[0x10, 1]);
        lying[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(read_err(&lying).contains("compressed"));
        // Truncated anywhere: a clean I/O error, never a panic.
        let mut w = FrameWriter::new(Vec::new(), false);
        w.send_ram(0, 1, Some(&[5; 4096])).unwrap();
        for cut in 0..w.output.len() {
            assert!(matches!(
                FrameReader::new(&w.output[..cut], 0).read(),
                Err(MigrationError::Io { .. })
            ));
        }
    }

    /// A reader with a data connection's limits.
    fn data_reader(bytes: &[u8]) -> FrameReader<&[u8]> {
        let mut r = FrameReader::new(bytes, 0);
        r.decoder.limit = Some(Limits {
            data: MAX_DATA_FRAME,
            control: MAX_DATA_STREAM_CONTROL,
        });
        r
    }

    #[test]
    fn a_data_connection_takes_the_largest_data_frames_and_nothing_larger() {
        // What senders make, at its largest, plain and compressed: taken.
        let key = ChunkKey {
            buffer: 1,
            index: 2,
        };
        let origin = ChunkOrigin { file: 0, offset: 0 };
        let pages = vec![3u8; (MAX_RUN_PAGES * PAGE_SIZE) as usize];
        let piece = vec![4u8; MAX_FILE_PIECE as usize];
        let chunk = vec![5u8; MAX_CHUNK_BYTES as usize];
        for compress in [false, true] {
            let mut w = FrameWriter::new(Vec::new(), compress);
            w.send_ram(0, MAX_RUN_PAGES, Some(&pages)).unwrap();
            w.send_file(0, 0, &piece).unwrap();
            w.send_chunk_with_origin(key, &chunk, origin).unwrap();
            w.send_chunk_part(key, 0, &chunk).unwrap();
            w.send(&Message::Keepalive).unwrap();
            let mut r = data_reader(&w.output);
            for _ in 0..4 {
                assert!(!matches!(r.read().unwrap(), Frame::Control(_)));
            }
            assert!(matches!(
                r.read().unwrap(),
                Frame::Control(Message::Keepalive)
            ));
        }
        // One byte more, plain: refused before its payload is read.
        let over = one_frame(KIND_RAM, 0, &vec![0; MAX_DATA_FRAME + 1]);
        let mut r = data_reader(&over);
        assert!(r.read().unwrap_err().to_string().contains("limit"));
        assert!(r.decoder.wire.capacity() < MAX_DATA_FRAME);
        // 16 MiB of zeros in 66 KiB of LZ4: refused before anything expands.
        let bomb = lz4_flex::block::compress(&vec![0u8; MAX_PAYLOAD]);
        let mut frame = one_frame(KIND_RAM, FLAG_COMPRESSED, &bomb);
        frame[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        let mut r = data_reader(&frame);
        assert!(r.read().unwrap_err().to_string().contains("limit"));
        assert_eq!(r.decoder.raw.capacity(), 0);
        // A control message other than a keepalive's size.
        let mut w = FrameWriter::new(Vec::new(), false);
        w.send(&Message::Abort {
            reason: "x".repeat(MAX_DATA_STREAM_CONTROL),
        })
        .unwrap();
        assert!(data_reader(&w.output)
            .read()
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn compressed_control_frames_are_refused() {
        // A control message of 16 MiB in a few KiB, on any connection.
        let mut w = FrameWriter::new(Vec::new(), false);
        w.send(&Message::Refuse {
            reason: "x".repeat(MAX_CONTROL_BYTES - 8),
        })
        .unwrap();
        let raw = &w.output[HEADER_BYTES..];
        let packed = lz4_flex::block::compress(raw);
        let mut frame = one_frame(KIND_CONTROL, FLAG_COMPRESSED, &packed);
        frame[8..12].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        let mut r = FrameReader::new(&frame[..], 0);
        assert!(r
            .read()
            .unwrap_err()
            .to_string()
            .contains("compressed control"));
        assert_eq!(r.decoder.raw.capacity(), 0);
    }

    #[test]
    fn a_message_of_commands_decodes_no_more_than_its_bounds() {
        use crate::replay::MAX_MESSAGE_COMMANDS;
        use ferry_abi::accel::COMMAND_ARGS;
        let command = |args: usize| LoggedCommand {
            opcode: 1,
            args: vec![0; args],
            payload: Vec::new(),
            status: 0,
        };
        let encoded = |commands: Vec<LoggedCommand>| {
            let mut w = FrameWriter::new(Vec::new(), false);
            w.send(&Message::Commands { commands }).unwrap();
            w.output
        };
        let count = |bytes: &[u8]| match FrameReader::new(bytes, 0).read() {
            Ok(Frame::Control(Message::Commands { commands })) => commands.len(),
            other => panic!("{other:?}"),
        };
        // At the bounds: decoded.
        assert_eq!(count(&encoded(vec![command(COMMAND_ARGS); 3])), 3);
        let most = encoded(vec![command(0); MAX_MESSAGE_COMMANDS]);
        assert_eq!(count(&most), MAX_MESSAGE_COMMANDS);
        // Past them (empty commands take 4 bytes here, 14 times that decoded): refused.
        assert!(read_err(&encoded(vec![command(COMMAND_ARGS + 1)])).contains("control"));
        let more = encoded(vec![command(0); MAX_MESSAGE_COMMANDS + 1]);
        assert!(read_err(&more).contains("control"));
    }

    #[test]
    fn an_offer_a_rounds_lists_and_a_device_digest_decode_no_more_than_their_bounds() {
        use crate::cpu::MAX_CPUID_WORDS;
        use crate::receive::MAX_EXTRA_ENTRIES;
        let encoded = |message: &Message| {
            let mut w = FrameWriter::new(Vec::new(), false);
            w.send(message).unwrap();
            w.output
        };
        let decodes = |message: &Message| {
            let bytes = encoded(message);
            match FrameReader::new(&bytes[..], 0).read() {
                Ok(Frame::Control(m)) => assert_eq!(&m, message),
                other => panic!("{other:?}"),
            }
        };
        let file = crate::vm::FileOffer {
            name: "f".into(),
            size: 1,
            sha256: "0".repeat(64),
            path: "/f".into(),
        };
        let offer = |extra: usize, files: usize, words: usize| Message::Offer {
            vm: VmDescription {
                name: String::new(),
                ram_size: 0,
                vcpus: 1,
                accel_memory: 0,
                abi_version: 0,
                state_version: 0,
                backend_kind: String::new(),
                kernel_version: 0,
                microkernel: String::new(),
                // Empty ones: 2 bytes here, 48 decoded.
                extra: vec![(String::new(), String::new()); extra],
                files: vec![file.clone(); files],
                cpu_features: vec![crate::cpu::cpu_features(|_, _, _| 0)[0]; words],
            },
            streams: 1,
            transfer: Transfer::Live,
            files: FileTransfer::Reuse,
            device: DeviceTransfer::Auto,
        };
        // At the bounds: decoded whole.
        decodes(&offer(MAX_EXTRA_ENTRIES, MAX_FILES, MAX_CPUID_WORDS));
        decodes(&Message::EndRound {
            round: 0,
            frames: vec![7; usize::from(MAX_STREAMS)],
        });
        let table = |n: u64| Message::BeginRound {
            round: 0,
            buffers: Some(
                (0..n)
                    .map(|id| DeviceBuffer {
                        id: id as u32,
                        bytes: 1,
                    })
                    .collect(),
            ),
        };
        decodes(&table(MAX_BUFFERS));
        let digest = |n: u64| Message::State {
            blob: Vec::new(),
            device: Some(crate::replay::DeviceDigest(vec![(0, 0, 0); n as usize])),
        };
        decodes(&digest(MAX_BUFFERS));
        decodes(&Message::BeginRound {
            round: 1,
            buffers: None,
        });
        // Past them, however cheap on the wire: refused while decoding, not validated
        // after the whole list was built.
        for past in [
            offer(1 << 20, 0, 0),
            offer(0, MAX_FILES + 1, 0),
            offer(0, 0, MAX_CPUID_WORDS + 1),
            Message::EndRound {
                round: 0,
                frames: vec![0; usize::from(MAX_STREAMS) + 1],
            },
            table(MAX_BUFFERS + 1),
            digest(MAX_BUFFERS + 1),
        ] {
            assert!(read_err(&encoded(&past)).contains("control"), "{past:?}");
        }
    }

    #[test]
    fn every_answer_of_a_destination_fits_the_frames_a_source_takes() {
        // Cut at a character boundary: two-byte characters, longer than a frame.
        let long = "\u{e9}".repeat(MAX_CONTROL_BYTES / 2);
        let reason = bounded_reason(long.clone());
        assert!(reason.len() <= MAX_REASON_BYTES && reason.ends_with("..."));
        assert!(long.starts_with(reason.trim_end_matches('.')));
        assert_eq!(bounded_reason("short".into()), "short");
        // What a source may send back is cut the same way, and cannot forge log lines.
        let shown = peer_reason(&format!("{}\n2026 INFO forged\u{1b}[2J", "x".repeat(10)));
        assert_eq!(shown, "xxxxxxxxxx\\n2026 INFO forged\\u{1b}[2J");
        let shown = peer_reason(&"\u{1}".repeat(MAX_CONTROL_BYTES));
        assert!(
            shown.len() <= MAX_REASON_BYTES && shown.ends_with("..."),
            "{shown}"
        );
        assert!(shown.starts_with("\\u{1}\\u{1}"));
        // Formatting stops at the cut: what would write forever ends.
        struct Endless;
        impl std::fmt::Display for Endless {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                loop {
                    f.write_str("ab")?;
                }
            }
        }
        assert_eq!(text_start(Endless, 7), "abab...");
        let taken = |message: &Message| {
            let mut w = FrameWriter::new(Vec::new(), false);
            w.send(message).unwrap();
            let mut r = FrameReader::new(&w.output[..], 0);
            r.decoder.limit = Some(Limits {
                data: MAX_ANSWER_FRAME,
                control: MAX_ANSWER_FRAME,
            });
            r.read().map(|f| match f {
                Frame::Control(m) => m,
                other => panic!("{other:?}"),
            })
        };
        // Each answer at its largest.
        for answer in [
            Message::Accept {
                session: u64::MAX,
                send_files: vec![u32::MAX; MAX_FILES],
                replay: true,
            },
            Message::Refuse {
                reason: reason.clone(),
            },
            Message::Busy {
                reason: reason.clone(),
            },
            Message::Abort {
                reason: reason.clone(),
            },
            Message::RoundApplied { round: u32::MAX },
            Message::Keepalive,
            Message::Ready,
            Message::Resumed,
            Message::Settled {
                settlement: crate::settle::Settlement::Undecided,
            },
        ] {
            assert_eq!(taken(&answer).unwrap(), answer);
        }
        // A larger frame is refused before its payload is read.
        let over = Message::Refuse {
            reason: "x".repeat(MAX_ANSWER_FRAME),
        };
        assert!(taken(&over).unwrap_err().to_string().contains("limit"));
    }

    /// Gives `bytes` one at a time, each after `every`, as a peer that trickles a frame
    /// to stay within every read's timeout does.
    struct SlowPeer<'a> {
        bytes: &'a [u8],
        every: std::time::Duration,
    }

    impl Read for SlowPeer<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some((&first, rest)) = self.bytes.split_first() else {
                return Ok(0);
            };
            std::thread::sleep(self.every);
            buf[0] = first;
            self.bytes = rest;
            Ok(1)
        }
    }

    #[test]
    fn a_frame_trickled_a_byte_at_a_time_is_given_up_on_at_the_frame_time_limit() {
        let mut w = FrameWriter::new(Vec::new(), false);
        w.send(&Message::Abort {
            reason: "x".repeat(200),
        })
        .unwrap();
        let every = std::time::Duration::from_millis(2);
        let read = |limit_ms: u64| {
            let mut r = FrameReader::new(
                SlowPeer {
                    bytes: &w.output,
                    every,
                },
                0,
            );
            r.decoder.frame_time = std::time::Duration::from_millis(limit_ms);
            let started = std::time::Instant::now();
            let got = r
                .read()
                .map(|f| matches!(f, Frame::Control(Message::Abort { .. })));
            (got, started.elapsed())
        };
        // Whole within the limit: read.
        let (got, _) = read(60_000);
        assert!(got.unwrap());
        // A frame of about 220 bytes (less than 1 KiB: one frame time), trickled over
        // about 440 ms: given up on after 100.
        let (got, took) = read(100);
        match got {
            Err(MigrationError::TimedOut { limit_ms: 100, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(took < std::time::Duration::from_millis(300), "{took:?}");
    }

    #[test]
    fn a_tls_peer_is_told_apart_from_garbage() {
        // A TLS alert (shorter than a frame header) and the start of a ClientHello.
        let alert: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
        let hello: &[u8] = &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for record in [alert, hello] {
            match FrameReader::new(record, 0).read() {
                Err(MigrationError::Auth(why)) => assert!(why.contains("speaks TLS"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_frame_stream_reads_and_writes_one_connection() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = FrameStream::new(a, true);
        let mut b = FrameStream::new(b, false);
        a.writer.send_ram(0x1000, 1, Some(&[9; 4096])).unwrap();
        a.send(&Message::Go).unwrap();
        assert!(
            matches!(b.read().unwrap(), Frame::Ram { gpa: 0x1000, pages: 1, data: Some(d) } if d == [9; 4096])
        );
        assert!(matches!(b.expect_control("go").unwrap(), Message::Go));
        b.send(&Message::Resumed).unwrap();
        assert!(matches!(
            a.expect_control("resumed").unwrap(),
            Message::Resumed
        ));
        assert_eq!(a.bytes_read, b.writer.bytes);
        assert_eq!(b.bytes_read, a.writer.bytes);
    }
}
