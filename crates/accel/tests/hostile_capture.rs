//! A capture's base plus its replayed log must give the source's device memory bit for
//! bit, whatever a guest runs meanwhile: random commands (allocs, frees and remakes of
//! the same ids, partial uploads and copies, failing launches) interleaved with base
//! reads, from a fresh base and from one after pre-copy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_abi::accel::{kernel, op};
use ferry_accel::backend::{self, DeviceMemory};
use ferry_accel::device::BufferState;
use ferry_accel::dirty::{ChunkId, CHUNK_SIZE};
use ferry_accel::files::no_files;
use ferry_accel::replay::{CaptureLimits, ReplayError};
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{FakeGuest as Guest, Rng, DATA};

/// A guest of 16 MiB and a device of 8 MiB on the cpu backend with `threads` threads.
fn guest(threads: usize) -> Guest {
    let cpu = backend::create(backend::CPU, threads, &DeviceMemory::default()).unwrap();
    Guest::with_ram(cpu, no_files(), 8 << 20, 16 << 20)
}

/// Runs one random command: mostly valid ones on buffers 1 to 4, sized so that a
/// buffer has a short last chunk, and some that fail their checks.
fn random_command(g: &mut Guest, rng: &mut Rng) {
    let id = 1 + rng.below(4);
    let sizes = |g: &Guest| -> BTreeMap<u32, u64> {
        g.accel
            .buffer_table()
            .into_iter()
            .map(|b| (b.id, b.bytes))
            .collect()
    };
    let table = sizes(g);
    match rng.below(10) {
        0 => {
            let bytes = 4 * (1 + rng.below(3 * CHUNK_SIZE / 4 + 100));
            g.run(op::ALLOC, &[id, bytes]);
        }
        1 => {
            g.run(op::FREE, &[id]);
        }
        2..=4 => {
            let Some(&bytes) = table.get(&(id as u32)) else {
                return;
            };
            let offset = rng.below(bytes);
            let len = rng.below(bytes - offset + 1);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            g.run(op::UPLOAD, &[id, offset, DATA, len]);
        }
        5..=6 => {
            let dst = 1 + rng.below(4);
            let (Some(&a), Some(&b)) = (table.get(&(id as u32)), table.get(&(dst as u32))) else {
                return;
            };
            let (a, b) = (a / 4, b / 4);
            let n = 1 + rng.below(a.min(b));
            let (so, dso) = (rng.below(a - n + 1), rng.below(b - n + 1));
            g.run(op::LAUNCH, &[kernel::COPY, id, so, dst, dso, n]);
        }
        7 => {
            let Some(&bytes) = table.get(&(id as u32)) else {
                return;
            };
            let n = 1 + rng.below(bytes / 4);
            g.run(op::LAUNCH, &[kernel::SCALE, id, n, 0.5f32.to_bits().into()]);
        }
        8 => {
            // Fails its checks: out of bounds.
            g.run(op::LAUNCH, &[kernel::SCALE, id, 1 << 40, 0]);
            g.run(op::UPLOAD, &[id, u64::MAX, DATA, 16]);
        }
        _ => {
            g.run(op::DOWNLOAD, &[id, 0, DATA, 64]);
            g.run(op::FENCE, &[rng.next()]);
        }
    }
}

/// A paused destination of one thread with `table`, then `chunks` written.
fn destination_from(table: &[BufferState], chunks: &BTreeMap<ChunkId, Vec<u8>>, d: &Guest) {
    d.accel.sync_buffers(table).unwrap();
    for (chunk, data) in chunks {
        d.accel.write_chunk(*chunk, data).unwrap();
    }
}

/// Reads one random unread base chunk, if any, into `base`.
fn read_some(g: &Guest, rng: &mut Rng, base: &mut BTreeMap<ChunkId, Vec<u8>>) {
    let unread = g.accel.replayer().unread_base_chunks().unwrap();
    if unread.is_empty() {
        return;
    }
    let chunk = unread[rng.below(unread.len() as u64) as usize];
    let mut out = Vec::new();
    assert!(g.accel.replayer().read_base_chunk(chunk, &mut out).unwrap());
    assert!(base.insert(chunk, out).is_none(), "{chunk:?} read twice");
}

/// The capture's remaining base read, its log taken, and the source's digest: replayed
/// on `dest` (holding what it had before the base), the same digest.
fn finish_and_compare(
    g: &mut Guest,
    rng: &mut Rng,
    dest: &Guest,
    table: &[BufferState],
    mut base: BTreeMap<ChunkId, Vec<u8>>,
    seed: u64,
) {
    while !g.accel.replayer().unread_base_chunks().unwrap().is_empty() {
        read_some(g, rng, &mut base);
    }
    g.accel.pause();
    let log = g.accel.replayer().take_log().unwrap();
    g.accel.replayer().stop_capture().unwrap();
    let source = g.accel.digest().unwrap();
    destination_from(table, &base, dest);
    dest.accel
        .replay(log, common::far())
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(dest.accel.digest().unwrap(), source, "seed {seed}");
}

#[test]
fn a_fresh_base_and_its_log_replayed_equal_the_source_whatever_the_guest_ran() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut g = guest(2);
        for _ in 0..30 {
            random_command(&mut g, &mut rng);
        }
        let (table, _) = g
            .accel
            .replayer()
            .start_capture(CaptureLimits::default(), None);
        let mut base = BTreeMap::new();
        for _ in 0..60 {
            if rng.below(3) == 0 {
                read_some(&g, &mut rng, &mut base);
            }
            random_command(&mut g, &mut rng);
        }
        let dest = guest(1);
        dest.accel.pause();
        finish_and_compare(&mut g, &mut rng, &dest, &table, base, seed);
    }
}

#[test]
fn a_base_after_precopy_and_its_log_replayed_equal_the_source_whatever_the_guest_ran() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1);
        let mut g = guest(2);
        for _ in 0..20 {
            random_command(&mut g, &mut rng);
        }
        // Pre-copy's round: tracking starts, and every written chunk is sent (the device
        // paused meanwhile, so nothing is missed).
        g.accel.pause();
        g.accel.start_dirty_tracking();
        let dest = guest(1);
        dest.accel.pause();
        let mut sent = BTreeMap::new();
        for chunk in g.accel.written_chunks() {
            let mut out = Vec::new();
            g.accel.read_chunk(chunk, &mut out).unwrap();
            sent.insert(chunk, out);
        }
        destination_from(&g.accel.buffer_table(), &sent, &dest);
        g.accel.resume().unwrap();
        for _ in 0..20 {
            random_command(&mut g, &mut rng);
        }
        let (table, _) = g
            .accel
            .replayer()
            .start_capture(CaptureLimits::default(), Some(&[]));
        let mut base = BTreeMap::new();
        for _ in 0..40 {
            if rng.below(3) == 0 {
                read_some(&g, &mut rng, &mut base);
            }
            random_command(&mut g, &mut rng);
        }
        finish_and_compare(&mut g, &mut rng, &dest, &table, base, seed);
    }
}

#[test]
fn hostile_replayed_commands_fail_with_errors_and_never_kill_the_device() {
    use ferry_accel::replay::LoggedCommand;
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
        let mut g = guest(2);
        for _ in 0..10 {
            random_command(&mut g, &mut rng);
        }
        g.accel.pause();
        let mut entries = Vec::new();
        for _ in 0..30 {
            let opcode = rng.below(9) as u32;
            let nargs = rng.below(16) as usize;
            let args: Vec<u64> = (0..nargs)
                .map(|i| match rng.below(5) {
                    0 => rng.next(),
                    1 => rng.below(8),
                    2 if i == 0 && opcode == op::LAUNCH => rng.below(40),
                    3 => 1u64 << rng.below(64),
                    _ => rng.below(1 << 18),
                })
                .collect();
            let payload = if rng.below(2) == 0 {
                vec![1u8; (args.get(3).copied().unwrap_or(0) as usize).min(1 << 20)]
            } else {
                vec![]
            };
            let status = if rng.below(3) == 0 {
                rng.below(12) as u32
            } else {
                0
            };
            entries.push(LoggedCommand {
                opcode,
                args,
                payload,
                status,
            });
        }
        // A peer's commands, each alone: whatever they say, the device lives on, and a
        // digest of it is made unless a replay left it torn.
        let mut torn = false;
        for entry in entries {
            let replayed = g
                .accel
                .replay(vec![entry], Instant::now() + Duration::from_secs(5));
            assert!(!g.accel.is_dead(), "seed {seed}: the device thread died");
            torn |= matches!(
                replayed,
                Err(ReplayError::Torn(_)
                    | ReplayError::FailedMidway { .. }
                    | ReplayError::DeadlinePassed { .. })
            );
        }
        assert_eq!(g.accel.digest().is_ok(), !torn, "seed {seed}");
    }
}
