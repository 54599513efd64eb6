//! What a destination refuses from an authenticated source that breaks the protocol:
//! frames larger than a sender makes, rounds out of order, frames more than announced,
//! offers with names it would show and could not; and what it tells one over the sessions
//! it takes at once.

mod hostile;
mod memory_vm;

use std::io::Write;
use std::time::{Duration, Instant};

use ferry_migrate::receive::{
    MAX_EXTRA_ENTRIES, MAX_EXTRA_VALUE, MAX_INCOMING_SESSIONS, MAX_REPLAY_SESSIONS,
    MAX_WORKLOAD_NAME,
};
use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::wire::{Message, StreamRole, MAX_DATA_FRAME};
use ferry_migrate::{
    ChunkKey, ChunkOrigin, DeviceBuffer, DeviceTransfer, FileOffer, MigrationError, Settlement,
    VmDescription,
};
use hostile::{
    abort_reason, assert_applied, offer, offer_moving_device, Destination, MIB, PATIENCE,
};
use sha2::{Digest, Sha256};

/// Frame kinds and flags of the wire format (see `wire.rs`).
const KIND_CONTROL: u8 = 1;
const KIND_RAM: u8 = 2;
const FLAG_COMPRESSED: u8 = 1;

/// A frame of `kind` carrying `wire` as sent, `raw_len` bytes once uncompressed.
fn frame(kind: u8, flags: u8, wire: &[u8], raw_len: usize) -> Vec<u8> {
    let mut out = b"FY".to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(wire.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw_len as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(wire).to_le_bytes());
    out.extend_from_slice(wire);
    out
}

/// A VM of 1 MiB of RAM.
fn small_vm() -> VmDescription {
    memory_vm::description("hostile", MIB, 0)
}

fn begin(round: u32) -> Message {
    Message::BeginRound {
        round,
        buffers: Some(Vec::new()),
    }
}

#[test]
fn data_streams_take_no_frame_larger_than_a_sender_makes() {
    let dest = Destination::start();
    // A RAM record of 16 MiB of zeros in 66 KiB of LZ4 (invalid once expanded: more
    // pages than a record holds, but expanded first); one plain byte over the largest
    // frame; a control message other than a keepalive on a data stream.
    let mut bomb = vec![0u8; 16 << 20];
    bomb[8] = 1; // pages
    let packed = lz4_flex::block::compress(&bomb);
    let mut abort = Vec::new();
    {
        let mut w = ferry_migrate::wire::FrameWriter::new(&mut abort, false);
        w.send(&Message::Abort {
            reason: "x".repeat(4096),
        })
        .unwrap();
    }
    for (what, bytes) in [
        (
            "an LZ4 bomb",
            frame(KIND_RAM, FLAG_COMPRESSED, &packed, bomb.len()),
        ),
        (
            "a frame one byte too large",
            frame(
                KIND_RAM,
                0,
                &vec![0; MAX_DATA_FRAME + 1],
                MAX_DATA_FRAME + 1,
            ),
        ),
        ("a large control message", abort),
    ] {
        let (mut c, mut data) = dest.session(small_vm(), 1);
        c.send(&begin(0)).unwrap();
        let _ = data[0].get_mut().write_all(&bytes);
        let reason = abort_reason(&mut c);
        assert!(reason.contains("limit"), "{what}: {reason}");
    }
    dest.assert_nothing_adopted();
}

#[test]
fn compressed_control_frames_are_refused() {
    let dest = Destination::start();
    let (mut c, _data) = dest.session(small_vm(), 1);
    // Round 0 begun, as a compressed control frame.
    let mut plain = Vec::new();
    ferry_migrate::wire::FrameWriter::new(&mut plain, false)
        .send(&begin(0))
        .unwrap();
    let payload = &plain[16..];
    let packed = lz4_flex::block::compress(payload);
    c.get_mut()
        .write_all(&frame(
            KIND_CONTROL,
            FLAG_COMPRESSED,
            &packed,
            payload.len(),
        ))
        .unwrap();
    let reason = abort_reason(&mut c);
    assert!(reason.contains("compressed control"), "{reason}");
}

#[test]
fn rounds_out_of_order_are_refused() {
    let dest = Destination::start();
    // Begun twice (its table synced again while its data is applied).
    let (mut c, _data) = dest.session(small_vm(), 1);
    c.send(&begin(0)).unwrap();
    c.send(&begin(0)).unwrap();
    let _ = c.send(&Message::EndRound {
        round: 0,
        frames: vec![0],
    });
    let reason = abort_reason(&mut c);
    assert!(reason.contains("began again"), "{reason}");
    // Ended without beginning.
    let (mut c, _data) = dest.session(small_vm(), 1);
    c.send(&Message::EndRound {
        round: 0,
        frames: vec![0],
    })
    .unwrap();
    let reason = abort_reason(&mut c);
    assert!(reason.contains("before it began"), "{reason}");
    // A later round ended without beginning.
    let (mut c, _data) = dest.session(small_vm(), 1);
    c.send(&begin(0)).unwrap();
    c.send(&Message::EndRound {
        round: 0,
        frames: vec![0],
    })
    .unwrap();
    assert_applied(&mut c, 0);
    c.send(&Message::EndRound {
        round: 1,
        frames: vec![0],
    })
    .unwrap();
    let reason = abort_reason(&mut c);
    assert!(reason.contains("before it began"), "{reason}");
    dest.assert_nothing_adopted();
}

#[test]
fn a_frame_more_than_announced_is_refused_in_the_last_round() {
    let dest = Destination::start();
    // The frame is being applied (slowly) when the round ends announcing none: its end
    // waits for it, and counts it.
    *dest.factory.ram_delay.lock().unwrap() = Duration::from_millis(500);
    let (mut c, mut data) = dest.session(small_vm(), 1);
    c.send(&begin(0)).unwrap();
    data[0]
        .writer
        .send_ram(0, 1, Some(&[0xee; PAGE_SIZE as usize]))
        .unwrap();
    data[0].writer.flush().unwrap();
    dest.wait_for_ram_writes(1);
    c.send(&Message::EndRound {
        round: 0,
        frames: vec![0],
    })
    .unwrap();
    let reason = abort_reason(&mut c);
    assert!(reason.contains("more frames than announced"), "{reason}");
    dest.assert_nothing_adopted();
}

#[test]
fn offers_with_names_this_host_could_not_show_are_refused() {
    let dest = Destination::start();
    let with = |change: &dyn Fn(&mut VmDescription)| {
        let mut vm = small_vm();
        change(&mut vm);
        vm
    };
    let extra = |key: &str, value: String| (key.to_string(), value);
    for (vm, why) in [
        (
            with(&|vm| vm.name = "a\nforged log line".into()),
            "workload name",
        ),
        (
            with(&|vm| vm.name = "\x1b[2J\x1b[31mred".into()),
            "workload name",
        ),
        (with(&|vm| vm.name = "\u{9b}31m".into()), "workload name"),
        (
            with(&|vm| vm.name = "n".repeat(MAX_WORKLOAD_NAME + 1)),
            "workload name",
        ),
        (
            with(&|vm| {
                vm.extra = (0..=MAX_EXTRA_ENTRIES)
                    .map(|i| extra(&format!("k{i}"), String::new()))
                    .collect()
            }),
            // More than the list may hold: refused as it is decoded.
            "a list longer than it allows",
        ),
        (
            with(&|vm| vm.extra = vec![extra("args", "a".repeat(MAX_EXTRA_VALUE + 1))]),
            "extra entry",
        ),
        (
            with(&|vm| vm.extra = vec![extra("a\rb", String::new())]),
            "extra entry",
        ),
        (with(&|vm| vm.microkernel = "m".repeat(1000)), "microkernel"),
    ] {
        let mut c = dest.connect(StreamRole::Control);
        c.send(&offer(vm, 1)).unwrap();
        match c.expect_control("refusal") {
            Ok(Message::Refuse { reason }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected a refusal for {why}, got {other:?}"),
        }
    }
    assert_eq!(
        dest.factory
            .prepared
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // What a host sends: a workload's path (spaces and all), its id, arguments, name.
    let vm = with(&|vm| {
        vm.name = "/opt/guests/my guest é.elf".into();
        vm.extra = vec![
            extra("id", "host-a.7".into()),
            extra("args", serde_json_like_args()),
            extra("from", "host-a".into()),
            extra("name", "trainer".into()),
        ];
    });
    let (_c, _data) = dest.session(vm, 1);
}

/// A guest's arguments as a host sends them: a JSON list filling a boot-info page, every
/// byte escaped.
fn serde_json_like_args() -> String {
    let mut args = String::from("[\"");
    while args.len() < 6 * 4000 {
        args.push_str("\\u0001");
    }
    args.push_str("\"]");
    args
}

#[test]
fn a_host_receives_a_bounded_number_of_migrations_at_once() {
    let dest = Destination::start();
    // Sessions accepted and waiting for their data streams: every place taken.
    let mut held: Vec<_> = (0..MAX_INCOMING_SESSIONS)
        .map(|_| {
            let mut c = dest.connect(StreamRole::Control);
            c.send(&offer(small_vm(), 1)).unwrap();
            assert!(matches!(
                c.expect_control("accept"),
                Ok(Message::Accept { .. })
            ));
            c
        })
        .collect();
    // One more is told the host is busy (it may come again, unlike one refused), small
    // or larger than a handshake frame, saying why.
    let mut large = small_vm();
    large.extra = vec![("args".into(), "a".repeat(32 << 10))];
    for vm in [small_vm(), large] {
        let mut c = dest.connect(StreamRole::Control);
        c.send(&offer(vm, 1)).unwrap();
        match c.expect_control("busy") {
            Ok(Message::Busy { reason }) => {
                assert!(reason.contains("migrations, its limit"), "{reason}")
            }
            other => panic!("expected busy, got {other:?}"),
        }
    }
    // A source hears it as such, and its VM runs on.
    let source = memory_vm::StillVm::new(small_vm(), vec![1; MIB as usize]);
    let options = ferry_migrate::MigrationOptions::default();
    let err = ferry_migrate::migrate_vm(
        &source,
        &dest.addr,
        &hostile::secret(),
        &options,
        &mut |_| {},
    )
    .expect_err("the destination is full");
    match &err {
        MigrationError::Busy(reason) => {
            assert!(reason.contains("migrations, its limit"), "{reason}")
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(!source.paused.load(std::sync::atomic::Ordering::SeqCst));
    // A question about an earlier migration is still answered.
    let mut c = dest.connect(StreamRole::Control);
    c.send(&Message::Settle { session: 7 }).unwrap();
    assert_eq!(
        c.expect_control("settled").unwrap(),
        Message::Settled {
            settlement: Settlement::NotRunning
        }
    );
    assert_eq!(
        dest.factory
            .prepared
            .load(std::sync::atomic::Ordering::SeqCst),
        MAX_INCOMING_SESSIONS
    );
    // A session that ends gives its place back.
    drop(held.pop());
    let since = Instant::now();
    loop {
        let mut c = dest.connect(StreamRole::Control);
        c.send(&offer(small_vm(), 1)).unwrap();
        match c.expect_control("accept") {
            Ok(Message::Accept { .. }) => break,
            Ok(Message::Busy { .. }) | Err(MigrationError::Io { .. })
                if since.elapsed() < PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("expected accept once a place was free, got {other:?}"),
        }
    }
}

#[test]
fn a_host_replays_the_device_commands_of_a_bounded_number_of_migrations_at_once() {
    let dest = Destination::start();
    let with_device = || memory_vm::description("hostile", MIB, MIB);
    let ask = |device| {
        let mut c = dest.connect(StreamRole::Control);
        c.send(&offer_moving_device(with_device(), 1, device))
            .unwrap();
        let answer = c.expect_control("an answer");
        (c, answer)
    };
    // A stop-and-copy never replays: it takes no replay place.
    let mut stop_and_copy = offer_moving_device(with_device(), 1, DeviceTransfer::Auto);
    if let Message::Offer { transfer, .. } = &mut stop_and_copy {
        *transfer = ferry_migrate::wire::Transfer::StopAndCopy;
    }
    let mut c = dest.connect(StreamRole::Control);
    c.send(&stop_and_copy).unwrap();
    let answer = c.expect_control("an answer");
    assert!(
        matches!(answer, Ok(Message::Accept { replay: false, .. })),
        "expected a stop-and-copy accepted, got {answer:?}"
    );
    let _stop_and_copy = c;
    // Replaying sessions waiting for their data streams: every replay place taken.
    let mut held: Vec<_> = (0..MAX_REPLAY_SESSIONS)
        .map(|_| match ask(DeviceTransfer::Replay) {
            (c, Ok(Message::Accept { replay: true, .. })) => c,
            (_, other) => panic!("expected a replay accepted, got {other:?}"),
        })
        .collect();
    // One more asking for replay is told the host is busy, saying why, before a VM is
    // prepared for it.
    let prepared = || {
        dest.factory
            .prepared
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = prepared();
    match ask(DeviceTransfer::Replay) {
        (_, Ok(Message::Busy { reason })) => assert!(
            reason.contains("migrations that may replay device commands"),
            "{reason}"
        ),
        (_, other) => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(
        prepared(),
        before,
        "a VM was prepared for an offer told busy"
    );
    // One leaving the choice to the host is received by pre-copy.
    let (_precopy, answer) = ask(DeviceTransfer::Auto);
    assert!(
        matches!(answer, Ok(Message::Accept { replay: false, .. })),
        "expected a pre-copy accepted, got {answer:?}"
    );
    // A replaying session that ends gives its place back.
    drop(held.pop());
    let since = Instant::now();
    loop {
        match ask(DeviceTransfer::Replay) {
            (_, Ok(Message::Accept { replay: true, .. })) => break,
            (_, Ok(Message::Busy { .. })) if since.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(50))
            }
            (_, other) => panic!("expected a replay accepted once a place was free, got {other:?}"),
        }
    }
}

#[test]
fn a_chunk_origin_sent_with_the_bytes_is_kept_only_if_the_file_received_bears_it_out() {
    let dest = Destination::start();
    let content: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
    let mut vm = memory_vm::description("hostile", MIB, 3 * 512);
    vm.files = vec![FileOffer {
        name: "model".into(),
        size: content.len() as u64,
        sha256: Sha256::digest(&content)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        path: "/fake/model".into(),
    }];
    // The destination lacks the file: it is sent, and the chunks loaded from it come with
    // their bytes and their origins. Chunk 2's bytes are not those of its origin.
    let (mut c, mut data) = dest.session(vm, 1);
    c.send(&Message::BeginRound {
        round: 0,
        buffers: Some((1..=3).map(|id| DeviceBuffer { id, bytes: 512 }).collect()),
    })
    .unwrap();
    let key = |buffer| ChunkKey { buffer, index: 0 };
    let origin = |offset| ChunkOrigin { file: 0, offset };
    let forged = vec![0xab; 512];
    let d = &mut data[0].writer;
    // Before the file's bytes and after them.
    d.send_chunk_with_origin(key(1), &content[100..612], origin(100))
        .unwrap();
    d.send_chunk_with_origin(key(2), &forged, origin(300))
        .unwrap();
    d.send_file(0, 0, &content).unwrap();
    d.send_chunk_with_origin(key(3), &content[4000..4512], origin(4000))
        .unwrap();
    d.flush().unwrap();
    c.send(&Message::EndRound {
        round: 0,
        frames: vec![4],
    })
    .unwrap();
    assert_applied(&mut c, 0);
    c.send(&Message::State {
        blob: b"state".to_vec(),
        device: None,
    })
    .unwrap();
    assert_eq!(hostile::answer(&mut c).0.unwrap(), Message::Ready);
    c.send(&Message::Go).unwrap();
    assert_eq!(hostile::answer(&mut c).0.unwrap(), Message::Resumed);
    let target = dest.adopted();
    // Every chunk holds the bytes sent; only the true origins are kept, so the VM's next
    // migration sends chunk 2's bytes, not the file's.
    let chunks = target.vm.chunks.lock().unwrap();
    assert_eq!(chunks[&key(1)], content[100..612]);
    assert_eq!(chunks[&key(2)], forged);
    assert_eq!(chunks[&key(3)], content[4000..4512]);
    let origins = target.vm.origins.lock().unwrap();
    let kept: Vec<_> = origins.iter().map(|(k, o)| (k.buffer, o.offset)).collect();
    assert_eq!(kept, [(1, 100), (3, 4000)]);
}

#[test]
fn a_final_state_after_replayed_rounds_must_bring_the_device_digest() {
    let dest = Destination::start();
    let vm = || memory_vm::description("hostile", MIB, 512);
    let table = || Some(vec![DeviceBuffer { id: 1, bytes: 512 }]);
    let key = ChunkKey {
        buffer: 1,
        index: 0,
    };
    // The base, then a round the replayed commands make; `resent`: then a round that
    // sends the device memory again with its table (pre-copy taking over).
    let run = |resent: bool| {
        let (mut c, mut data) = dest.session_moving_device(vm(), 1, DeviceTransfer::Replay);
        let mut round = |round: u32, buffers: Option<Vec<DeviceBuffer>>| {
            c.send(&Message::BeginRound { round, buffers }).unwrap();
            let chunks = u64::from(round != 1);
            if chunks == 1 {
                let bytes = [round as u8; 512];
                data[0].writer.send_chunk(key, 512, Some(&bytes)).unwrap();
                data[0].writer.flush().unwrap();
            }
            c.send(&Message::EndRound {
                round,
                frames: vec![chunks],
            })
            .unwrap();
            assert_applied(&mut c, round);
        };
        round(0, table());
        round(1, None);
        if resent {
            round(2, table());
        }
        c.send(&Message::State {
            blob: b"state".to_vec(),
            device: None,
        })
        .unwrap();
        // The data streams too: one closed would fail the session on its own.
        (c, data)
    };
    // Without the digest, a replay gone astray would run unseen: refused.
    let reason = abort_reason(&mut run(false).0);
    assert!(reason.contains("without the digest"), "{reason}");
    dest.assert_nothing_adopted();
    // Sent again whole, the device memory needs none.
    let (mut c, _data) = run(true);
    assert_eq!(hostile::answer(&mut c).0.unwrap(), Message::Ready);
}
