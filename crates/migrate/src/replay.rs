//! Command-log replay, the engine's second way to move device memory: instead of
//! resending the chunks a training step rewrites, the source sends a consistent base
//! once and then the device commands it runs; the destination, on a backend of the same
//! kind and kernel version, runs them again and gets the same bytes (the kernels are
//! deterministic). Guest RAM is still pre-copied. A digest exchanged at switchover
//! checks the result; a capture that overflows its bounds, or a destination that cannot
//! keep up, falls back to pre-copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How device memory is moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceTransfer {
    /// Replay when pre-copy's first rounds show the device dirtying memory faster than
    /// the link can resend it, else pre-copy.
    #[default]
    Auto,
    /// Resend the chunks the device dirties (throttling if needed).
    Precopy,
    /// Send a base and the command log from the start.
    Replay,
}

impl DeviceTransfer {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Precopy => "precopy",
            Self::Replay => "replay",
        }
    }
}

impl std::str::FromStr for DeviceTransfer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "precopy" => Ok(Self::Precopy),
            "replay" => Ok(Self::Replay),
            other => Err(format!(
                "unknown device transfer '{other}' (auto, precopy or replay)"
            )),
        }
    }
}

/// One device command executed after the base's boundary, as the source ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedCommand {
    /// Its opcode.
    pub opcode: u32,
    /// Its arguments (at most a ring command's).
    #[serde(deserialize_with = "crate::wire::at_most::<_, _, { ferry_abi::accel::COMMAND_ARGS }>")]
    pub args: Vec<u64>,
    /// The guest-RAM bytes it read (an upload's data), else empty.
    #[serde(with = "payload")]
    pub payload: Vec<u8>,
    /// How it completed on the source.
    pub status: u32,
}

/// Bytes of commands' weight ([`LoggedCommand::weight`]) a source sends in one message
/// at most.
pub(crate) const COMMAND_BATCH: u64 = 4 << 20;

/// Most commands one message of them may carry: what a batch holds, each weighing at
/// least its size. Decoding counts them, as an empty command takes 4 bytes on the wire
/// and 14 times that in memory.
pub(crate) const MAX_MESSAGE_COMMANDS: usize =
    COMMAND_BATCH as usize / std::mem::size_of::<LoggedCommand>();

/// A payload as bytes, not as a sequence of them: encoded in one copy, and decoded into a
/// vector of exactly its length (a sequence grows by doubling, up to twice the memory,
/// byte by byte). Postcard writes both the same way (a varint length, then the bytes), so
/// the wire format is the one a `Vec<u8>` has.
mod payload {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(payload: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(payload)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an upload's bytes")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, mut bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            bytes.shrink_to_fit();
            Ok(bytes)
        }

        // A format without bytes (one that writes them as a list of numbers).
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Not trusting the peer's count beyond a page.
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            bytes.shrink_to_fit();
            Ok(bytes)
        }
    }
}

impl LoggedCommand {
    /// Bytes of memory it takes, its allocations' overhead aside (what the log's bounds
    /// and the wire's batches count; a destination allows for that overhead): a peer's
    /// empty commands cost their size too.
    pub fn weight(&self) -> u64 {
        (std::mem::size_of::<Self>() + self.payload.len() + 8 * self.args.len()) as u64
    }
}

/// Bounds on what a capture may hold on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureLimits {
    /// Bytes of preserved base chunks at once (the side pool).
    pub pool_bytes: u64,
    /// Bytes of log not yet taken by the engine.
    pub log_bytes: u64,
}

impl Default for CaptureLimits {
    fn default() -> Self {
        Self {
            pool_bytes: 256 << 20,
            log_bytes: 256 << 20,
        }
    }
}

/// What a capture cost on the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureReport {
    /// Most bytes the side pool held at once.
    pub pool_peak_bytes: u64,
    /// Base chunks preserved before a write.
    pub chunks_preserved: u64,
    /// Commands logged.
    pub commands_logged: u64,
    /// Bytes logged.
    pub log_bytes: u64,
}

/// A digest of device memory: every buffer's id, size and CRC-32 of its contents. It
/// catches divergence (a nondeterministic kernel, a lost command), not tampering. At most
/// one entry per buffer a device can hold, refused while decoding past that (an entry of
/// 3 bytes on the wire takes 16 in memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDigest(
    #[serde(
        deserialize_with = "crate::wire::at_most::<_, _, { ferry_abi::accel::MAX_BUFFERS as usize }>"
    )]
    pub Vec<(u32, u64, u32)>,
);

impl DeviceDigest {
    /// The first difference from `other` (this side's), in words; `None` if equal.
    pub fn difference(&self, other: &DeviceDigest) -> Option<String> {
        if self.0.len() != other.0.len() {
            return Some(format!(
                "{} device buffers here, {} on the source",
                other.0.len(),
                self.0.len()
            ));
        }
        self.0
            .iter()
            .zip(&other.0)
            .find(|(a, b)| a != b)
            .map(|(theirs, ours)| {
                format!(
                    "device buffer {} ({} bytes, crc {:08x}) differs from the source's buffer {} ({} bytes, crc {:08x})",
                    ours.0, ours.1, ours.2, theirs.0, theirs.1, theirs.2
                )
            })
    }
}

/// A source hashing its device memory ahead of a replay switchover's digest (see
/// [`crate::MigrationSource::digest_ahead`]): stopped when dropped, without waiting for
/// the buffer being hashed.
#[derive(Debug)]
pub struct DigestAhead(Arc<AtomicBool>);

impl DigestAhead {
    /// Hashing that stops once `stop` is set.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self(stop)
    }
}

impl Drop for DigestAhead {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What a replay migration did, in the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Bytes of the round that sent the base: its device chunks, and the guest RAM and
    /// files too where replay began the migration.
    pub base_bytes: u64,
    /// Commands sent for replay, the tail included.
    pub commands: u64,
    /// Bytes of those commands.
    pub command_bytes: u64,
    /// Commands replayed during the pause.
    pub tail_commands: u64,
    /// The source's capture: side pool and log.
    pub capture: CaptureReport,
    /// Time the source spent digesting device memory in the pause, ms.
    pub digest_ms: f64,
    /// Why replay gave way to pre-copy, if it did.
    pub fell_back: Option<String>,
}

/// The longest a replay round may take, relative to the round before it, for the
/// destination to count as keeping up: the commands of a round were run by the source in
/// the round before, and replaying them here must not take longer (with a tenth for
/// noise, once rounds are as short as one command).
pub const KEEP_UP_RATIO: f64 = 1.1;
/// Rounds in a row the destination may fall behind before replay gives way to pre-copy.
pub const ROUNDS_BEHIND: u32 = 3;

/// Whether the destination keeps up with the source's commands: each round replays what
/// the source ran during the previous one, so rounds that grow mean a backlog that
/// grows. `rounds_ms` are the replay rounds so far (round 0, the base, excluded).
pub fn falling_behind(rounds_ms: &[f64]) -> bool {
    let n = ROUNDS_BEHIND as usize;
    rounds_ms.len() > n
        && rounds_ms
            .windows(2)
            .rev()
            .take(n)
            .all(|w| w[1] > w[0] * KEEP_UP_RATIO)
}

/// The longest a destination may take to replay one round's commands, beyond the I/O
/// timeout (its data streams wait for the next round meanwhile, however long): a peer's
/// commands may not hold its device for ever. A destination stops replaying a round past
/// it.
pub(crate) const MAX_ROUND_REPLAY: Duration = Duration::from_secs(90);

/// How long a switchover's replay of the commands taken now is predicted to take: the
/// longer of two guesses, as commands differ a hundredfold in cost and each guess alone
/// has missed. The last round's replay time `last`, times `growth` (its length over the
/// round's before). And the source's time running the commands taken now (`ran`) at the
/// last round's speed: its commands ran for `sent_ran` on the source and were replayed in
/// `last` (a round that replayed one command while the source, unthrottled, ran twenty
/// shows there). The factors are bounded (4).
pub fn predicted_tail(
    last: Duration,
    growth: f64,
    ran: Duration,
    sent_ran: Option<Duration>,
) -> Duration {
    let speed = sent_ran.map_or(growth, |sent| {
        last.as_secs_f64() / sent.as_secs_f64().max(1e-3)
    });
    let bounded = |f: f64| f.clamp(0.0, 4.0);
    last.mul_f64(bounded(growth))
        .max(ran.mul_f64(bounded(speed)))
}

/// The pause a replay switchover is predicted to take: the destination replays the tail
/// (see [`predicted_tail`]) while the final RAM goes at `rate` and the source digests its
/// device memory (`digest`).
pub fn predicted_replay_pause(
    tail: Duration,
    ram_bytes: u64,
    rate: f64,
    digest: Duration,
) -> Duration {
    let ram = Duration::from_secs_f64(ram_bytes as f64 / rate.max(1.0));
    tail.max(ram).max(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`LoggedCommand`] as it was encoded before its payload was bytes: a sequence.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct SeqCommand {
        opcode: u32,
        args: Vec<u64>,
        payload: Vec<u8>,
        status: u32,
    }

    #[test]
    fn a_payload_as_bytes_has_the_wire_format_of_a_sequence() {
        // Lengths around the varint's steps, and an upload of just over 1 MiB.
        for len in [0, 1, 127, 128, 16_383, 16_384, (1 << 20) + 1] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let command = LoggedCommand {
                opcode: 3,
                args: vec![1, u64::MAX],
                payload: payload.clone(),
                status: 2,
            };
            let old = SeqCommand {
                opcode: 3,
                args: vec![1, u64::MAX],
                payload,
                status: 2,
            };
            let bytes = postcard::to_stdvec(&command).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&old).unwrap(), "{len} bytes");
            let decoded: LoggedCommand = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(decoded, command);
            assert_eq!(decoded.payload.capacity(), len, "{len} bytes");
            assert_eq!(postcard::from_bytes::<SeqCommand>(&bytes).unwrap(), old);
        }
    }

    #[test]
    fn rounds_that_keep_growing_fall_behind_and_shrinking_ones_do_not() {
        assert!(!falling_behind(&[100.0, 80.0, 60.0, 50.0, 45.0]));
        assert!(falling_behind(&[100.0, 120.0, 140.0, 160.0]));
        // Three growths in a row are needed, after a shrink too.
        assert!(!falling_behind(&[100.0, 120.0, 140.0]));
        assert!(
            !falling_behind(&[100.0, 105.0, 110.0, 115.0]),
            "within the noise"
        );
        assert!(!falling_behind(&[100.0, 120.0, 90.0, 95.0, 99.0]));
        assert!(falling_behind(&[100.0, 90.0, 100.0, 115.0, 130.0]));
    }

    #[test]
    fn a_digest_names_the_first_buffer_that_differs() {
        let source = DeviceDigest(vec![(1, 4096, 7), (2, 8192, 9)]);
        assert_eq!(source.difference(&source.clone()), None);
        let here = DeviceDigest(vec![(1, 4096, 7), (2, 8192, 10)]);
        let why = source.difference(&here).unwrap();
        assert!(
            why.contains("buffer 2") && why.contains("0000000a"),
            "{why}"
        );
        assert!(source
            .difference(&DeviceDigest(vec![]))
            .unwrap()
            .contains("0 device buffers here"));
    }

    #[test]
    fn the_predicted_tail_is_the_longer_of_the_rounds_growth_and_the_sources_time() {
        let ms = Duration::from_millis;
        // To the microsecond: the factors are floating point.
        let near = |got: Duration, want: Duration| {
            assert!(
                got.abs_diff(want) < Duration::from_micros(1),
                "{got:?}, not {want:?}"
            );
        };
        // Shrinking rounds, the source's time in step with them: the growth's guess.
        near(predicted_tail(ms(20), 0.5, ms(8), Some(ms(25))), ms(10));
        // One command of 36 ms replayed in the last round, which the source had run over
        // 12 ms; over those 36 ms, unthrottled, it ran many more: the source's time.
        near(predicted_tail(ms(36), 1.0, ms(36), Some(ms(12))), ms(108));
        // Without the last round's time on the source, its growth stands for its speed.
        near(predicted_tail(ms(30), 1.0, ms(90), None), ms(90));
        // Each factor is bounded: 40 times as slow counts 4 times.
        near(predicted_tail(ms(40), 0.5, ms(10), Some(ms(1))), ms(40));
    }

    #[test]
    fn the_predicted_pause_is_the_longest_of_the_tail_the_ram_and_the_digest() {
        let gbit = 1.25e8;
        let (none, ms) = (Duration::ZERO, Duration::from_millis);
        assert_eq!(predicted_replay_pause(ms(10), 0, gbit, none), ms(10));
        assert_eq!(
            predicted_replay_pause(ms(1), 12_500_000, gbit, none),
            ms(100)
        );
        let digest = ms(300);
        assert_eq!(
            predicted_replay_pause(ms(1), 12_500_000, gbit, digest),
            digest
        );
        assert!("replay".parse::<DeviceTransfer>() == Ok(DeviceTransfer::Replay));
        assert!("copy".parse::<DeviceTransfer>().is_err());
    }
}
