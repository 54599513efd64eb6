//! What a source does with a destination that proves the secret and then holds it: an
//! answer announced as a large frame and sent a byte at a time (each byte within the
//! source's read timeout) ends the migration within a few I/O timeouts, the VM running
//! on at the source, and a settle question likewise.

mod memory_vm;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_migrate::auth::authenticate_stream_listener;
use ferry_migrate::wire::{FrameStream, Message, MAX_ANSWER_FRAME, MAX_CONTROL_BYTES};
use ferry_migrate::{error_chain, migrate_vm, MigrationError, MigrationOptions, Mode, Secret};
use memory_vm::StillVm;

const MIB: u64 = 1 << 20;
/// The source's I/O timeout in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the destination sends a byte of its answer: within the source's read
/// timeout, so only a limit on the whole frame ends the wait.
const TRICKLE_EVERY: Duration = Duration::from_millis(500);
/// Longer than any wait of these migrations may take, far shorter than a trickled frame
/// of the protocol's largest size would (a frame time per KiB: hours).
const PATIENCE: Duration = Duration::from_secs(30);

fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

/// Where the destination stops answering and trickles a frame in instead.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stall {
    /// The answer to the end of round 0 (live: the VM runs, and may be throttled).
    RoundEnd,
    /// The answer to the state (stop-and-copy: the VM is paused).
    Restore,
    /// The answer to a settle question.
    Settle,
}

/// A destination on loopback that authenticates, accepts the VM offered (or takes a
/// settle question), and at `stall` sends the header of a control frame of `announced`
/// bytes, then a byte of it every [`TRICKLE_EVERY`]; returns its address.
fn hostile_destination(stall: Stall, announced: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut control = accept(&listener);
        match control.expect_control("an offer").unwrap() {
            Message::Settle { .. } => return trickle(control, announced),
            Message::Offer { streams, .. } => {
                control
                    .send(&Message::Accept {
                        session: 7,
                        send_files: Vec::new(),
                        replay: false,
                    })
                    .unwrap();
                for _ in 0..streams {
                    let mut data = accept(&listener);
                    std::thread::spawn(move || while data.read().is_ok() {});
                }
            }
            other => panic!("expected an offer, got {other:?}"),
        }
        loop {
            match control.expect_control("the next message") {
                Ok(Message::EndRound { .. }) if stall == Stall::RoundEnd => {
                    return trickle(control, announced)
                }
                Ok(Message::EndRound { round, .. }) => {
                    control.send(&Message::RoundApplied { round }).unwrap()
                }
                Ok(Message::State { .. }) if stall == Stall::Restore => {
                    return trickle(control, announced)
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    addr
}

/// The next connection, authenticated.
fn accept(listener: &TcpListener) -> FrameStream<TcpStream> {
    let (stream, _) = listener.accept().unwrap();
    let mut conn = FrameStream::new(stream, false);
    authenticate_stream_listener(&mut conn, &secret()).unwrap();
    conn
}

/// Sends the header of a control frame of `announced` bytes, then a byte at a time, until
/// the source hangs up (or for a few minutes at most).
fn trickle(mut control: FrameStream<TcpStream>, announced: usize) {
    let mut header = b"FY".to_vec();
    header.extend_from_slice(&[1, 0]);
    header.extend_from_slice(&(announced as u32).to_le_bytes());
    header.extend_from_slice(&(announced as u32).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let socket = control.get_mut();
    if socket.write_all(&header).is_err() {
        return;
    }
    for _ in 0..600 {
        std::thread::sleep(TRICKLE_EVERY);
        if socket.write_all(&[0]).is_err() {
            return;
        }
    }
}

fn options(mode: Mode) -> MigrationOptions {
    MigrationOptions {
        mode,
        io_timeout: IO_TIMEOUT,
        streams: 1,
        ..MigrationOptions::default()
    }
}

/// Runs `f` on a thread; its result, and how long it took, or a failure if it takes
/// longer than [`PATIENCE`].
fn within_patience<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let got = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
        panic!("the source still waits on a trickled answer after {PATIENCE:?}")
    });
    (got, started.elapsed())
}

/// Migrates a VM of 1 MiB to a destination that stalls at `stall` with a frame of
/// `announced` bytes: the error, and the VM.
fn migrate_to_stalling(stall: Stall, announced: usize) -> (MigrationError, Arc<StillVm>) {
    let addr = hostile_destination(stall, announced);
    let mut ram = vec![0u8; MIB as usize];
    ram[..4096].fill(7);
    let source = Arc::new(StillVm::new(memory_vm::description("held", MIB, 0), ram));
    let mode = if stall == Stall::Restore {
        Mode::StopAndCopy
    } else {
        Mode::Live
    };
    let vm = source.clone();
    let (result, _) =
        within_patience(move || migrate_vm(&*vm, &addr, &secret(), &options(mode), &mut |_| {}));
    (
        result.expect_err("a destination that never answers"),
        source,
    )
}

#[test]
fn an_answer_announced_larger_than_any_answer_is_refused_at_once() {
    for stall in [Stall::RoundEnd, Stall::Restore] {
        let (err, source) = migrate_to_stalling(stall, MAX_CONTROL_BYTES);
        let text = error_chain(&err);
        assert!(
            matches!(err, MigrationError::MalformedFrame(_)) && text.contains("limit"),
            "{stall:?}: {text}"
        );
        assert!(
            !source.paused.load(Ordering::SeqCst),
            "{stall:?}: the VM runs on at the source"
        );
    }
}

#[test]
fn an_answer_trickled_in_is_given_up_on_within_a_few_io_timeouts() {
    // As large as an answer may be: taken, but given two I/O timeouts (one per KiB
    // begun) from its first byte.
    for stall in [Stall::RoundEnd, Stall::Restore] {
        let (err, source) = migrate_to_stalling(stall, MAX_ANSWER_FRAME);
        match (&err, stall) {
            (MigrationError::TimedOut { limit_ms, .. }, Stall::RoundEnd) => {
                assert!(*limit_ms <= 2 * IO_TIMEOUT.as_millis() as u64, "{err:?}")
            }
            // The stop-and-copy's pause has a deadline of its own (its MiB at 4 MiB/s,
            // plus 1 s), which comes first.
            (MigrationError::SwitchoverDeadline { deadline_ms, .. }, Stall::Restore) => {
                assert!(*deadline_ms <= 2 * IO_TIMEOUT.as_millis() as u64, "{err:?}")
            }
            (other, _) => panic!("{stall:?}: {}", error_chain(other)),
        }
        assert!(
            !source.paused.load(Ordering::SeqCst),
            "{stall:?}: the VM runs on at the source"
        );
    }
}

#[test]
fn a_settlement_trickled_in_is_given_up_on() {
    for announced in [MAX_CONTROL_BYTES, MAX_ANSWER_FRAME] {
        let addr = hostile_destination(Stall::Settle, announced);
        let (settled, _) = within_patience(move || {
            ferry_migrate::settle(&addr, &secret(), &options(Mode::Live), 7)
        });
        let err = settled.expect_err("a destination that never answers");
        assert!(
            matches!(
                err,
                MigrationError::MalformedFrame(_) | MigrationError::TimedOut { .. }
            ),
            "{}",
            error_chain(&err)
        );
    }
}
