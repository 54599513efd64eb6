//! Ferry's live-migration engine.
//!
//! It moves a VM from a [`MigrationSource`] on one host to a [`MigrationTarget`] on
//! another without knowing what either is (the host daemon adapts a microVM to both
//! traits), so the engine never imports KVM:
//!
//! - [`wire`]: the framed, checksummed, validated stream format and its messages.
//! - [`auth`]: shared-secret challenge–response on every connection.
//! - [`cpu`]: the CPU features a VM shows its guest, which its destination must have.
//! - [`tls`]: optional mutual TLS under that authentication (rustls).
//! - [`send`]: the source side: pre-copy rounds, convergence, throttling, switchover.
//! - [`pace`]: a ceiling on pre-copy's rate, to move a VM gently.
//! - [`replay`]: moving device memory as a base and the commands run after it.
//! - [`receive`]: the destination side: validates everything off the wire, applies it,
//!   and restores the VM only when the source's final state is complete.
//! - [`snapshot`]: a migration to a file and back: a paused VM saved and loaded with the
//!   same sender, frames and checks.
//!
//! The phases are those of ARCHITECTURE.md: handshake, pre-copy, convergence,
//! switchover; a failure before the destination confirms leaves the VM on the source.

pub mod auth;
pub mod cpu;
mod deadline;
pub mod durable;
mod gate;
mod link;
pub mod pace;
pub mod receive;
pub mod replay;
pub mod send;
pub mod settle;
pub mod snapshot;
pub mod tls;
pub mod vm;
pub mod wire;

pub use auth::{Purpose, Secret, SecretError};
pub use cpu::{CpuidRegister, CpuidWord};
pub use deadline::shorten_idle_limits;
pub use gate::{MAX_HANDSHAKES, MAX_HANDSHAKES_PER_PEER};
pub use receive::{
    serve, serve_with_tls, spawn_receiver, BadOffer, ReceiveReport, Receiving, TargetFactory,
};
pub use replay::{
    CaptureLimits, CaptureReport, DeviceDigest, DeviceTransfer, DigestAhead, LoggedCommand,
    ReplayReport,
};
pub use send::{
    migrate_vm, CancelToken, MigrationOptions, MigrationReport, Mode, Progress, DEFAULT_STREAMS,
};
pub use settle::{settle, Outcomes, RecordError, Settlement};
pub use tls::{TlsConfig, TlsConfigError, TLS_SERVER_NAME};
pub use vm::{
    error_chain, Cause, ChunkKey, ChunkOrigin, ChunkPart, ChunkWrite, DeviceBuffer, FileChunk,
    FileOffer, FileTransfer, MigrationSource, MigrationTarget, PageSet, VmContents, VmDescription,
    VmError,
};

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer could not be reached.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The peer's address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed (peer gone, cut, timed out).
    #[error("connection lost while {what}")]
    Io {
        /// What was going on.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer failed authentication, or we did.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The destination is at a limit that passes: too many connections authenticating
    /// (the source retries a few times before it reports this), as many migrations
    /// being received as it takes, or (asked to replay) as many that may replay.
    #[error("the destination is busy: {0}; try again shortly")]
    Busy(String),
    /// The destination refused the VM.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The peer's bytes are not a valid frame of the migration stream.
    #[error("invalid migration stream: {0}")]
    MalformedFrame(String),
    /// The peer sent a valid message at the wrong point of the conversation.
    #[error("invalid migration stream: expected {expected}, got {got}")]
    UnexpectedMessage {
        /// What this side waited for.
        expected: String,
        /// What came (the message, abridged).
        got: String,
    },
    /// The peer's messages contradict the migration: records outside the VM's shape,
    /// rounds, streams or files out of order or miscounted.
    #[error("invalid migration stream: {0}")]
    BrokenSequence(String),
    /// The VM's description offered (or read from a snapshot) has a field no VM here
    /// could have.
    #[error("invalid offer: {0}")]
    InvalidOffer(receive::BadOffer),
    /// This side could not encode what it had to send (a bug, or a message over the
    /// protocol's limits).
    #[error("cannot encode a message: {0}")]
    Encode(String),
    /// The peer gave up and said why.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The VM being sent failed (pause, read, state).
    #[error("source VM")]
    Source(#[source] VmError),
    /// The VM being received could not take what was sent.
    #[error("destination VM")]
    Target(#[source] VmError),
    /// The migration failed, and so did resuming the VM on the source afterwards.
    #[error("{failed}; and resuming the VM on the source failed")]
    ResumeAfterFailure {
        /// Why the migration failed (as text: its own chain, flattened).
        failed: String,
        /// Why the VM could not resume.
        #[source]
        resume: VmError,
    },
    /// The options asked for something the engine does not do.
    #[error("invalid migration options: {0}")]
    InvalidOptions(String),
    /// A data stream failed (the first to fail, on the destination).
    #[error("data stream {index}")]
    DataStream {
        /// Which.
        index: usize,
        /// What failed on it.
        #[source]
        source: Box<MigrationError>,
    },
    /// A data stream's thread could not be started (the host is out of threads or
    /// memory).
    #[error("cannot start the thread of data stream {index}")]
    StreamThread {
        /// The stream's index.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A data stream's thread panicked (a bug; the log has it).
    #[error("a data stream's thread panicked {0} (a bug; see the log)")]
    StreamPanicked(String),
    /// Pre-copy did not reach the downtime target within its bounds.
    #[error("did not converge after {rounds} rounds in {elapsed_ms} ms: predicted pause {predicted_ms} ms > target {target_ms} ms (dirty rate {dirty_mib_s:.0} MiB/s vs link {link_mib_s:.0} MiB/s, throttle {throttle_pct}%); the VM keeps running on the source")]
    NotConverged {
        /// Rounds done.
        rounds: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// Last predicted pause.
        predicted_ms: u64,
        /// The target.
        target_ms: u64,
        /// Last dirty rate.
        dirty_mib_s: f64,
        /// Last link rate.
        link_mib_s: f64,
        /// Throttle reached.
        throttle_pct: u8,
    },
    /// A phase ran out of time: the peer stopped reading or answering (frozen, gone, or a
    /// link that silently drops packets).
    #[error("timed out in {phase} while {what}: no progress for {limit_ms} ms")]
    TimedOut {
        /// The phase.
        phase: String,
        /// What was going on.
        what: String,
        /// The limit that ran out.
        limit_ms: u64,
    },
    /// The switchover ran past its deadline (the pause target plus a margin; for a
    /// stop-and-copy, its bytes at a floor rate plus a margin) before the destination
    /// was told to run the VM: abandoned, the VM resumed on the source.
    #[error("the switchover ran past its deadline of {deadline_ms} ms (pause target {target_ms} ms, or a stop-and-copy's bytes at {rate} MiB/s, plus a margin) before the destination was ready; the VM resumed on the source", rate = send::STOP_AND_COPY_MIB_S)]
    SwitchoverDeadline {
        /// The deadline, from the pause.
        deadline_ms: u64,
        /// The pause target.
        target_ms: u64,
    },
    /// The destination did not acknowledge a round within the longest its work on it may
    /// take, though it kept saying it was at work: given up, the VM runs on at the source.
    #[error("the destination did not apply round {round} within {limit_ms} ms of its end, the most its work on the round allows (it said {keepalives} times that it was at work); the VM keeps running on the source")]
    RoundApplyDeadline {
        /// The round.
        round: u32,
        /// The ceiling, from the round's end.
        limit_ms: u64,
        /// The destination's keepalives meanwhile.
        keepalives: u64,
    },
    /// The device memory the destination replayed differs from the source's (a
    /// nondeterministic kernel, a lost command): the VM runs on at the source.
    #[error("the replayed device memory differs from the source's: {0}")]
    DeviceDiverged(String),
    /// The record of the migrations this host received could not be made durable: a VM
    /// that came here may not leave (a restart that forgot it came would let its earlier
    /// source run it again).
    #[error("this host's record of the migrations it received is not durable; the VM keeps running here")]
    Unrecorded(#[source] settle::RecordError),
    /// Cancelled before the destination was told to run the VM.
    #[error("cancelled during {phase}; the VM keeps running on the source")]
    Cancelled {
        /// The phase it was cancelled in.
        phase: String,
    },
    /// The destination was told to resume but its confirmation never came: the VM stays
    /// paused on the source so it can never run on both hosts.
    #[error("switchover outcome unknown: the destination was told to resume but did not confirm ({reason}); the VM is kept paused on the source so it never runs twice until settled")]
    InDoubt {
        /// What broke.
        reason: String,
        /// The migration's session, to settle it with the destination
        /// ([`crate::settle()`]).
        session: u64,
    },
}

impl MigrationError {
    /// The peer sent `got` where this side expected `expected`.
    fn unexpected(expected: &str, got: &impl std::fmt::Debug) -> Self {
        // A message's Debug text can be large (a state blob of megabytes, five bytes of
        // text each): the start says enough, and formatting stops there.
        Self::UnexpectedMessage {
            expected: expected.to_string(),
            got: wire::text_start(format_args!("{got:?}"), 200),
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// A connected loopback TCP pair (client, server), for the unit tests of socket code.
#[cfg(test)]
pub(crate) fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unexpected_message_names_both_and_abridges_what_came() {
        let blob = wire::Message::State {
            blob: vec![7; 100_000],
            device: None,
        };
        let MigrationError::UnexpectedMessage { expected, got } =
            MigrationError::unexpected("go", &blob)
        else {
            panic!("not an unexpected-message error");
        };
        assert_eq!(expected, "go");
        assert!(got.starts_with("State") && got.ends_with("..."), "{got}");
        assert!(got.len() <= 200, "{} bytes", got.len());
    }
}
