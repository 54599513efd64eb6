//! A round longer than the destination's idle limit on a connection (pre-copy under a
//! low rate ceiling; a large stop-and-copy) keeps its connections: the source says it is
//! at work. A destination that says it is at work on a round for ever is not waited for
//! for ever. The limits are shortened for this test binary's process, so the round takes
//! seconds rather than minutes.

mod memory_vm;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migrate::auth::authenticate_stream_listener;
use ferry_migrate::wire::{FrameStream, FrameWriter, Message};
use ferry_migrate::{
    migrate_vm, serve, CancelToken, MigrationError, MigrationOptions, Mode, ReceiveReport, Secret,
    TargetFactory, VmDescription, VmError,
};
use memory_vm::{description, MemoryVm, StillVm};

const RAM: u64 = 12 << 20;
const PAGE: usize = 4096;
const KEEPALIVE_EVERY: Duration = Duration::from_millis(200);
const IDLE_LIMIT: Duration = Duration::from_secs(1);
/// How long the fake destination below says it is at work, at most: far past what a
/// source should wait for it.
const FOR_EVER: Duration = Duration::from_secs(20);

fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

/// Hands each adopted VM to the test.
struct Factory(Mutex<Sender<MemoryVm>>);

impl TargetFactory for Factory {
    type Target = MemoryVm;
    fn prepare(&self, vm: &VmDescription) -> Result<MemoryVm, VmError> {
        Ok(MemoryVm::new(vm.ram_size))
    }
    fn adopt(&self, target: MemoryVm, _: ReceiveReport) {
        let _ = self.0.lock().unwrap().send(target);
    }
}

#[test]
fn a_round_longer_than_the_idle_limit_keeps_its_connections() {
    let idle_limit = IDLE_LIMIT;
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, idle_limit);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (adopted, arrived) = channel();
    let factory = Arc::new(Factory(Mutex::new(adopted)));
    std::thread::spawn(move || serve(listener, secret(), factory));
    // Every other page written: runs of one page, so each data stream sends a frame every
    // few milliseconds and only the control stream waits out the round.
    let mut ram = vec![0u8; RAM as usize];
    for (i, page) in ram.chunks_mut(PAGE).enumerate().filter(|(i, _)| i % 2 == 0) {
        page.fill(i as u8 | 1);
    }
    let source = StillVm::new(description("keepalive", RAM, 0), ram);
    let options = MigrationOptions {
        streams: 2,
        // 6 MiB to send at 2 MiB/s: a round 0 of about 3 s, three idle limits.
        max_rate: Some(2 << 20),
        io_timeout: Duration::from_secs(10),
        ..MigrationOptions::default()
    };
    let report = migrate_vm(&source, &addr, &secret(), &options, &mut |_| {})
        .expect("a long round keeps its connections");
    let round_0 = Duration::from_secs_f64(report.round_log[0].ms / 1e3);
    assert!(round_0 > idle_limit * 2, "round 0 took only {round_0:?}");
    let target = arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(*target.ram.lock().unwrap() == source.ram, "RAM differs");
}

/// A fake destination's side of a source's handshake on `listener`: the control
/// connection, authenticated, its offer accepted (nothing to replay, no file to send), and
/// the data streams, authenticated.
fn accepted(listener: &TcpListener) -> (FrameStream<TcpStream>, Vec<FrameStream<TcpStream>>) {
    let accept = || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(FOR_EVER)).unwrap();
        let mut c = FrameStream::new(s, false);
        authenticate_stream_listener(&mut c, &secret()).unwrap();
        c
    };
    let mut control = accept();
    let Ok(Message::Offer { streams, .. }) = control.expect_control("an offer") else {
        panic!("expected an offer");
    };
    control
        .send(&Message::Accept {
            session: 9,
            send_files: Vec::new(),
            replay: false,
        })
        .unwrap();
    let data = (0..streams).map(|_| accept()).collect();
    (control, data)
}

/// A destination that accepts a VM, takes round 0's data without applying it, and from
/// the round's end says it is at work every keepalive period, for ever (up to
/// [`FOR_EVER`]). Its thread returns the reason the source aborted with, if it did, and
/// how many keepalives it sent.
fn at_work_for_ever() -> (String, JoinHandle<(Option<String>, u64)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut control, data) = accepted(&listener);
        for mut data in data {
            std::thread::spawn(move || while data.read().is_ok() {});
        }
        loop {
            match control.expect_control("the round's end") {
                Ok(Message::EndRound { .. }) => break,
                Ok(_) => {}
                Err(e) => panic!("before the round's end: {e}"),
            }
        }
        let (done, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let socket = control.writer.get_mut().try_clone().unwrap();
        let keepalives = {
            let (done, sent) = (done.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut writer = FrameWriter::new(socket, false);
                let started = Instant::now();
                while !done.load(Ordering::SeqCst) && started.elapsed() < FOR_EVER {
                    if writer.send(&Message::Keepalive).is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(KEEPALIVE_EVERY);
                }
            })
        };
        let reason = match control.expect_control("the source's word") {
            Err(MigrationError::PeerAborted(reason)) => Some(reason),
            _ => None,
        };
        done.store(true, Ordering::SeqCst);
        keepalives.join().unwrap();
        (reason, sent.load(Ordering::SeqCst))
    });
    (addr, handle)
}

/// A VM of 1 MiB with a few pages written, and options to migrate it over two streams
/// with `io_timeout`, cancelled by `cancel`.
fn small_vm(name: &str, io_timeout: Duration, cancel: CancelToken) -> (StillVm, MigrationOptions) {
    let mut ram = vec![0u8; 1 << 20];
    for (i, page) in ram.chunks_mut(PAGE).enumerate().step_by(16) {
        page.fill(i as u8 | 1);
    }
    let options = MigrationOptions {
        streams: 2,
        io_timeout,
        cancel,
        ..MigrationOptions::default()
    };
    (StillVm::new(description(name, 1 << 20, 0), ram), options)
}

#[test]
fn a_destination_at_work_on_a_round_for_ever_is_given_up_on_and_the_vm_runs_on() {
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, IDLE_LIMIT);
    let (addr, dest) = at_work_for_ever();
    let (source, options) = small_vm("at-work", IDLE_LIMIT, CancelToken::default());
    let started = Instant::now();
    let err = migrate_vm(&source, &addr, &secret(), &options, &mut |_| {})
        .expect_err("the round is never applied");
    let waited = started.elapsed();
    let MigrationError::RoundApplyDeadline {
        round,
        limit_ms,
        keepalives,
    } = err
    else {
        panic!("expected RoundApplyDeadline after {waited:?}, got {err:?}");
    };
    assert_eq!(round, 0);
    // The I/O timeout, a keepalive period and a few frames (16 pages, a keepalive per
    // stream) at 20 ms each.
    let limit = Duration::from_millis(limit_ms);
    assert!(
        limit > IDLE_LIMIT + KEEPALIVE_EVERY && limit < IDLE_LIMIT * 2,
        "{limit:?}"
    );
    // The ceiling, and the handshake, round 0 and the abort on a loaded machine (before
    // it, the wait lasted as long as the destination went on: over 20 s).
    assert!(
        waited >= limit && waited < limit + 3 * IDLE_LIMIT,
        "{waited:?}"
    );
    // Every keepalive was taken for work, until the ceiling.
    assert!(keepalives >= 4, "{keepalives} keepalives");
    assert!(!source.paused.load(Ordering::SeqCst), "the VM is paused");
    let (reason, sent) = dest.join().expect("fake destination");
    let reason = reason.expect("the source says why it gives up");
    assert!(reason.contains("did not apply round 0"), "{reason}");
    assert!(sent >= keepalives, "{sent} sent, {keepalives} seen");
}

/// Migrates `source` to `addr`, cancelled by `cancel` an idle limit after it starts: its
/// error, and how long after the cancel it came.
fn cancelled_after_idle_limit(
    source: &StillVm,
    addr: &str,
    options: &MigrationOptions,
    cancel: CancelToken,
) -> (MigrationError, Duration) {
    let cancelled_at = Arc::new(Mutex::new(None));
    let canceller = {
        let cancelled_at = cancelled_at.clone();
        std::thread::spawn(move || {
            std::thread::sleep(IDLE_LIMIT);
            *cancelled_at.lock().unwrap() = Some(Instant::now());
            cancel.cancel();
        })
    };
    let err = migrate_vm(source, addr, &secret(), options, &mut |_| {}).expect_err("cancelled");
    let ended = Instant::now();
    canceller.join().unwrap();
    let cancelled_at = cancelled_at.lock().unwrap().expect("cancelled");
    (err, ended - cancelled_at)
}

#[test]
fn a_cancel_ends_the_wait_for_a_destination_at_work_at_its_next_keepalive() {
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, IDLE_LIMIT);
    let (addr, dest) = at_work_for_ever();
    // A long I/O timeout: only the cancel ends the wait soon.
    let cancel = CancelToken::default();
    let (source, options) = small_vm("cancelled", FOR_EVER, cancel.clone());
    let (err, after) = cancelled_after_idle_limit(&source, &addr, &options, cancel);
    match &err {
        MigrationError::Cancelled { phase } => assert_eq!(phase, "pre-copy round 0"),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert!(
        after < KEEPALIVE_EVERY * 5,
        "ended {after:?} after the cancel"
    );
    assert!(!source.paused.load(Ordering::SeqCst), "the VM is paused");
    let (reason, _) = dest.join().expect("fake destination");
    assert!(reason.is_some_and(|r| r.contains("cancelled")));
}

/// A destination that takes the offer and the data streams, then reads no data: the
/// source's writes block once the sockets' buffers are full, for as long as its I/O
/// timeout (a destination that read a little now and then would hold them longer).
fn never_reading() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut control, data) = accepted(&listener);
        // Until the source gives up: its Abort, or its connection closed.
        while control.expect_control("the source's word").is_ok() {}
        drop(data);
    });
    (addr, handle)
}

#[test]
fn a_cancel_ends_a_round_whose_data_the_destination_does_not_read_at_once() {
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, IDLE_LIMIT);
    for mode in [Mode::Live, Mode::StopAndCopy] {
        let (addr, dest) = never_reading();
        // 64 MiB of pages that differ: more than the sockets' buffers take.
        let ram_size = 64 << 20;
        let mut ram = vec![0u8; ram_size];
        for (i, page) in ram.chunks_mut(PAGE).enumerate() {
            page.fill(i as u8 | 1);
        }
        let source = StillVm::new(description("unread", ram_size as u64, 0), ram);
        let cancel = CancelToken::default();
        // A long I/O timeout: only the cancel ends the round soon.
        let options = MigrationOptions {
            mode,
            streams: 2,
            io_timeout: FOR_EVER,
            cancel: cancel.clone(),
            ..MigrationOptions::default()
        };
        let (err, after) = cancelled_after_idle_limit(&source, &addr, &options, cancel);
        let phase = match mode {
            Mode::Live => "pre-copy round 0",
            Mode::StopAndCopy => "the switchover",
        };
        match &err {
            MigrationError::Cancelled { phase: said } => assert_eq!(said, phase, "{mode:?}"),
            other => panic!("{mode:?}: expected Cancelled, got {other:?}"),
        }
        // Before, the round's writes waited out the I/O timeout: 20 s.
        assert!(
            after < KEEPALIVE_EVERY * 5,
            "{mode:?}: ended {after:?} after the cancel"
        );
        assert!(
            !source.paused.load(Ordering::SeqCst),
            "{mode:?}: the VM is paused"
        );
        dest.join().expect("fake destination");
    }
}
