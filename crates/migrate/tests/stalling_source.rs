//! A source that keeps a round open saying it is at work, and sends no data, is given
//! up on after the idle limit; one that sends data slowly is not, nor a round whose
//! frames this host takes long to apply (on one stream while another has none left: a
//! source waits for it, told that the destination is at work). The limits are shortened
//! for this test binary's process.

mod hostile;
mod memory_vm;

use std::io::Write;
use std::time::{Duration, Instant};

use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::wire::Message;
use hostile::{abort_reason, assert_applied, Destination, MIB};

const IDLE_LIMIT: Duration = Duration::from_secs(1);
const KEEPALIVE_EVERY: Duration = Duration::from_millis(200);

fn begin(round: u32) -> Message {
    Message::BeginRound {
        round,
        buffers: Some(Vec::new()),
    }
}

type Stream = ferry_migrate::wire::FrameStream<std::net::TcpStream>;

/// A destination (with the limits shortened, each RAM write taking `ram_delay`) and a
/// session with it of a VM `name` over `streams` data streams, its round 0 begun.
fn round_zero(name: &str, streams: u8, ram_delay: Duration) -> (Destination, Stream, Vec<Stream>) {
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, IDLE_LIMIT);
    let dest = Destination::start();
    *dest.factory.ram_delay.lock().unwrap() = ram_delay;
    let (mut c, data) = dest.session(memory_vm::description(name, MIB, 0), streams);
    c.send(&begin(0)).unwrap();
    (dest, c, data)
}

/// Sends page `page` of RAM, filled with `byte`, on `stream` (buffered).
fn send_page(stream: &mut Stream, page: u64, byte: u8) {
    stream
        .writer
        .send_ram(page * PAGE_SIZE, 1, Some(&[byte; PAGE_SIZE as usize]))
        .unwrap();
}

/// Ends round 0, announcing `frames` per stream.
fn end_round_zero(c: &mut Stream, frames: Vec<u64>) {
    c.send(&Message::EndRound { round: 0, frames }).unwrap();
}

#[test]
fn keepalives_alone_do_not_hold_a_round_open() {
    let (dest, mut c, mut data) = round_zero("stalling", 1, Duration::ZERO);
    // Keepalives on both streams (each data one a frame of the round), and nothing else.
    let started = Instant::now();
    let sender = {
        let mut control = c.writer.get_mut().try_clone().unwrap();
        let mut data = data.remove(0);
        std::thread::spawn(move || {
            let mut w = ferry_migrate::wire::FrameWriter::new(&mut control, false);
            while started.elapsed() < IDLE_LIMIT * 10 {
                std::thread::sleep(KEEPALIVE_EVERY);
                if w.send(&Message::Keepalive).is_err() || data.send(&Message::Keepalive).is_err() {
                    break;
                }
            }
        })
    };
    let reason = abort_reason(&mut c);
    assert!(reason.contains("keepalives and no data"), "{reason}");
    assert!(
        started.elapsed() < IDLE_LIMIT * 5,
        "given up only after {:?}",
        started.elapsed()
    );
    drop(c);
    sender.join().unwrap();
    dest.assert_nothing_adopted();
}

#[test]
fn a_round_that_sends_data_slowly_stays_open() {
    let (_dest, mut c, mut data) = round_zero("slow", 1, Duration::ZERO);
    // A page every half idle limit, and keepalives, for three idle limits.
    let started = Instant::now();
    let mut pages = 0;
    let mut next_page = Instant::now();
    while started.elapsed() < IDLE_LIMIT * 3 {
        if Instant::now() >= next_page {
            send_page(&mut data[0], pages, 7);
            data[0].writer.flush().unwrap();
            pages += 1;
            next_page += IDLE_LIMIT / 2;
        }
        c.send(&Message::Keepalive).unwrap();
        std::thread::sleep(KEEPALIVE_EVERY);
    }
    end_round_zero(&mut c, vec![pages]);
    assert_applied(&mut c, 0);
}

#[test]
fn a_frame_that_takes_several_idle_limits_to_arrive_keeps_its_round() {
    let (_dest, mut c, mut data) = round_zero("slow-link", 1, Duration::ZERO);
    // A frame of a page, a few bytes at a time over three idle limits (a slow link), and
    // keepalives on the control stream meanwhile.
    let mut page = Vec::new();
    ferry_migrate::wire::FrameWriter::new(&mut page, false)
        .send_ram(0, 1, Some(&[7; PAGE_SIZE as usize]))
        .unwrap();
    let pieces = (IDLE_LIMIT * 3).as_millis() / KEEPALIVE_EVERY.as_millis();
    for piece in page.chunks(page.len().div_ceil(pieces as usize)) {
        data[0].get_mut().write_all(piece).unwrap();
        c.send(&Message::Keepalive).unwrap();
        std::thread::sleep(KEEPALIVE_EVERY);
    }
    end_round_zero(&mut c, vec![1]);
    assert_applied(&mut c, 0);
}

#[test]
fn a_round_whose_frames_take_longer_than_the_idle_limit_to_apply_is_waited_for() {
    // Each page takes a fifth of the idle limit to write here (a file chunk read from a
    // slow disk): the round's frames all arrive at once, and take three idle limits to
    // apply after its end.
    let (_dest, mut c, mut data) = round_zero("slow-disk", 1, IDLE_LIMIT / 5);
    let pages = 15;
    for page in 0..pages {
        send_page(&mut data[0], page, 7);
    }
    data[0].writer.flush().unwrap();
    end_round_zero(&mut c, vec![pages]);
    let keepalives = assert_applied(&mut c, 0);
    assert!(
        keepalives >= 2,
        "{keepalives} keepalives in three idle limits"
    );
}

#[test]
fn a_stream_whose_frames_are_applied_waits_while_another_stream_applies_its_own() {
    // Stream 0's frames take three idle limits to apply; stream 1's one frame is applied
    // at once, and that stream then has nothing to read until the round is over.
    let (_dest, mut c, mut data) = round_zero("one-slow-stream", 2, IDLE_LIMIT / 5);
    let started = Instant::now();
    let pages = 15;
    for page in 0..pages {
        send_page(&mut data[0], page, 7);
    }
    send_page(&mut data[1], pages, 8);
    for stream in &mut data {
        stream.writer.flush().unwrap();
    }
    end_round_zero(&mut c, vec![pages, 1]);
    assert_applied(&mut c, 0);
    assert!(
        started.elapsed() > IDLE_LIMIT * 2,
        "applied in {:?}",
        started.elapsed()
    );
}

#[test]
fn a_source_waits_for_a_round_applied_long_after_its_end() {
    ferry_migrate::shorten_idle_limits(KEEPALIVE_EVERY, IDLE_LIMIT);
    let dest = Destination::start();
    // 512 frames of a page, each written in 10 ms on two streams (as slow as a frame read
    // from a cold disk may be, within what the source allows each): the round is applied
    // more than two I/O timeouts of the source after its end (the frames fit in the
    // connections' buffers, so the source sends them all at once).
    *dest.factory.ram_delay.lock().unwrap() = Duration::from_millis(10);
    let mut ram = vec![0u8; 8 * MIB as usize];
    for (i, page) in ram.chunks_mut(PAGE_SIZE as usize).enumerate() {
        if i % 4 == 0 {
            page.fill(i as u8 | 1);
        }
    }
    let source = memory_vm::StillVm::new(memory_vm::description("long-end", 8 * MIB, 0), ram);
    let options = ferry_migrate::MigrationOptions {
        streams: 2,
        io_timeout: IDLE_LIMIT,
        ..ferry_migrate::MigrationOptions::default()
    };
    let report = ferry_migrate::migrate_vm(
        &source,
        &dest.addr,
        &hostile::secret(),
        &options,
        &mut |_| {},
    )
    .expect("the source waits while the destination applies the round");
    let round_0 = Duration::from_secs_f64(report.round_log[0].ms / 1e3);
    assert!(round_0 > IDLE_LIMIT * 2, "round 0 took only {round_0:?}");
    let target = dest.adopted();
    assert!(*target.vm.ram.lock().unwrap() == source.ram, "RAM differs");
}

#[test]
fn a_round_whose_announced_frames_never_come_is_given_up_on_after_the_idle_limit() {
    let (dest, mut c, mut data) = round_zero("missing", 1, Duration::ZERO);
    send_page(&mut data[0], 0, 7);
    data[0].writer.flush().unwrap();
    let started = Instant::now();
    end_round_zero(&mut c, vec![2]);
    let reason = abort_reason(&mut c);
    assert!(reason.contains("stopped arriving"), "{reason}");
    assert!(
        started.elapsed() < IDLE_LIMIT * 5,
        "given up only after {:?}",
        started.elapsed()
    );
    dest.assert_nothing_adopted();
}
