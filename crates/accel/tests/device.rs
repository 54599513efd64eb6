//! The device driven through its ring by a fake guest (plain guest memory, no KVM), so
//! these run on every machine: command semantics, hostile input, dirty chunks, state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_abi::accel::{device_status, kernel, op, status, RingHeader, RING_SLOTS};
use ferry_accel::backend::{
    self, Backend, BackendError, BufferReader, DeviceLoop, DeviceMemory, HostThreads,
};
use ferry_accel::device::{Accelerator, ChunkOrigin};
use ferry_accel::dirty::{ChunkId, CHUNK_SIZE};
use ferry_accel::files::{no_files, FileSource};
use ferry_accel::kernel::Kernel;
use ferry_accel::replay::{LoggedCommand, ReplayError, TornMemory};
use ferry_accel::ring::GuestRam;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::*;

#[test]
fn alloc_upload_launch_download_and_fence() {
    on_every_backend(2, |g, _| {
        assert_eq!(g.run(op::ALLOC, &[1, 16]), status::OK);
        assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK);
        assert_eq!(g.run(op::ALLOC, &[3, 16]), status::OK);
        assert_eq!(g.upload(1, &[1.0, 2.0, 3.0, 4.0]), status::OK);
        assert_eq!(g.upload(2, &[10.0, 20.0, 30.0, 40.0]), status::OK);
        assert_eq!(g.run(op::LAUNCH, &[kernel::ADD, 1, 2, 3, 4]), status::OK);
        assert_eq!(g.download(3, 4), vec![11.0, 22.0, 33.0, 44.0]);
        assert_eq!(g.run(op::FENCE, &[77]), status::OK);
        assert_eq!(
            g.header(std::mem::offset_of!(RingHeader, completed_fence)),
            77
        );
        assert_eq!(g.header(std::mem::offset_of!(RingHeader, used)), 48);
        assert_eq!(g.run(op::FREE, &[2]), status::OK);
        assert_eq!(g.header(std::mem::offset_of!(RingHeader, used)), 32);
    });
}

#[test]
fn hostile_commands_fail_with_status_and_change_nothing() {
    on_every_backend(1, |g, kind| {
        assert_eq!(g.run(op::ALLOC, &[1, 64]), status::OK);
        assert_eq!(g.upload(1, &[5.0; 16]), status::OK);

        let cases: &[(u32, &[u64], u32)] = &[
            (99, &[], status::BAD_OPCODE),
            (op::ALLOC, &[0, 64], status::BAD_BUFFER),
            (op::ALLOC, &[1, 64], status::BAD_BUFFER),
            (op::ALLOC, &[u64::MAX, 64], status::BAD_BUFFER),
            (op::ALLOC, &[2, 6], status::BAD_ARGUMENT),
            (op::ALLOC, &[2, CAPACITY], status::OUT_OF_MEMORY),
            (op::ALLOC, &[2, u64::MAX - 3], status::OUT_OF_MEMORY),
            (op::FREE, &[9], status::BAD_BUFFER),
            (op::UPLOAD, &[9, 0, DATA, 4], status::BAD_BUFFER),
            (op::UPLOAD, &[1, 60, DATA, 8], status::OUT_OF_BOUNDS),
            (op::UPLOAD, &[1, u64::MAX, DATA, 8], status::OUT_OF_BOUNDS),
            (op::UPLOAD, &[1, 0, RAM - 4, 8], status::BAD_GUEST_RANGE),
            (
                op::UPLOAD,
                &[1, 0, u64::MAX - 2, 8],
                status::BAD_GUEST_RANGE,
            ),
            (op::DOWNLOAD, &[1, 0, RAM, 4], status::BAD_GUEST_RANGE),
            (op::DOWNLOAD, &[1, 0, 1 << 50, 64], status::BAD_GUEST_RANGE),
            // The VMM's system pages (page tables, IDT, fault stubs): never the guest's.
            (op::DOWNLOAD, &[1, 0, 0x4000, 64], status::BAD_GUEST_RANGE),
            (op::DOWNLOAD, &[1, 0, RING - 4, 8], status::BAD_GUEST_RANGE),
            (op::UPLOAD, &[1, 0, 0x2000, 64], status::BAD_GUEST_RANGE),
            (op::LAUNCH, &[12345], status::BAD_KERNEL),
            (op::LAUNCH, &[kernel::ADD, 1, 7, 1, 16], status::BAD_BUFFER),
            (
                op::LAUNCH,
                &[kernel::SCALE, 1, 17, 1],
                status::OUT_OF_BOUNDS,
            ),
            (
                op::LAUNCH,
                &[kernel::MATMUL, 1, 1, 1, u64::MAX, u64::MAX, 2, 0],
                status::BAD_SHAPE,
            ),
        ];
        for (i, (opcode, args, expected)) in cases.iter().enumerate() {
            let got = g.run(*opcode, args);
            assert_eq!(
                got,
                *expected,
                "{kind}: case {i}: {} instead of {}",
                status::name(got),
                status::name(*expected)
            );
        }
        // The buffer is intact and the device still works.
        assert_eq!(g.download(1, 16), vec![5.0; 16]);
        assert_eq!(g.header(std::mem::offset_of!(RingHeader, used)), 64);
    });
}

#[test]
fn rows_and_heads_wider_than_host_scratch_allows_fail_with_bad_shape() {
    // Each kernel keeps host scratch of a row's or a head's width while it works, outside
    // device memory: a guest's width beyond the table's limit is refused, never run.
    let mut g = FakeGuest::new(2);
    let (row, head) = (kernel::MAX_ROW as u64, kernel::MAX_HEAD_DIM as u64);
    for (id, elems) in [(1, row + 2), (2, row + 2), (3, row + 2), (4, head + 2)] {
        assert_eq!(g.run(op::ALLOC, &[id, 4 * elems]), status::OK);
    }
    let ten_thousand = u64::from(10000f32.to_bits());
    let cases: &[&[u64]] = &[
        &[kernel::SOFTMAX, 1, 2, 1, row + 1],
        &[kernel::CROSS_ENTROPY, 1, 2, 3, 4, 1, row + 1],
        &[kernel::ROPE, 1, 2, 1, 1, 2 * head, 0, ten_thousand, 0],
        &[kernel::ATTENTION_DECODE, 1, 2, 3, 4, 1, head + 1, 1],
        // f32 weights: one row of row + 1 inputs.
        &[kernel::QMATMUL, 1, 2, 3, 1, row + 1, 1, 0],
    ];
    for (i, args) in cases.iter().enumerate() {
        let got = g.run(op::LAUNCH, args);
        assert_eq!(got, status::BAD_SHAPE, "case {i}: {}", status::name(got));
    }
    // The widest accepted still run.
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::SOFTMAX, 1, 2, 1, row]),
        status::OK
    );
    let rope = [kernel::ROPE, 1, 2, 1, 1, head, 0, ten_thousand, 1];
    assert_eq!(g.run(op::LAUNCH, &rope), status::OK);
}

/// Sets the ring's `head` far ahead of its tail (the device must not execute stale
/// slots) and waits for the device to flag the ring invalid, however long its thread
/// takes to be scheduled.
fn lie_far_ahead(g: &mut FakeGuest) {
    g.set_head(g.tail() + RING_SLOTS + 1);
    g.accel.doorbell();
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.device_status() != device_status::RING_INVALID {
        assert!(Instant::now() < deadline, "the lying head never flagged");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn lying_ring_indices_are_ignored_until_sane() {
    on_every_backend(1, |g, _| {
        assert_eq!(g.run(op::ALLOC, &[1, 16]), status::OK);
        let tail = g.tail();
        lie_far_ahead(g);
        assert_eq!(g.tail(), tail, "nothing executed");
        // Behind the tail.
        g.set_head(tail - 1);
        g.accel.doorbell();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.tail(), tail);
        // Back to sane: work resumes.
        g.head = tail;
        g.set_head(tail);
        assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK);
        assert_eq!(g.device_status(), device_status::OK);
    });
}

#[test]
fn a_ring_left_invalid_across_a_restore_is_said_sane_once_it_is() {
    let mut g = FakeGuest::new(1);
    let flag_invalid = |g: &mut FakeGuest| {
        let tail = g.tail();
        lie_far_ahead(g);
        g.accel.pause();
        tail
    };
    let sane_again = |g: &mut FakeGuest, tail: u64, id: u64| {
        g.head = tail;
        g.set_head(tail);
        assert_eq!(g.run(op::ALLOC, &[id, 16]), status::OK);
        // The status in guest RAM moved with it: the new device must set it right.
        assert_eq!(g.device_status(), device_status::OK);
    };
    // Restored into a new device (a migration's destination, a snapshot).
    let tail = flag_invalid(&mut g);
    let state = g.accel.save_state().expect("a live device saves");
    let restored = Accelerator::restore(
        g.mem.clone(),
        &state,
        backend::create("cpu", 1, &DeviceMemory::default()).unwrap(),
        no_files(),
    )
    .unwrap();
    drop(std::mem::replace(&mut g.accel, restored));
    g.accel.resume().unwrap();
    sane_again(&mut g, tail, 1);
    // The final state applied to a device that received the buffers.
    let tail = flag_invalid(&mut g);
    let state = g.accel.save_state().expect("a live device saves");
    g.accel.apply_state(&state).unwrap();
    g.accel.resume().unwrap();
    sane_again(&mut g, tail, 2);
}

#[test]
fn random_command_words_never_hurt_the_host() {
    on_every_backend(2, |g, _| {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let mut next = || rng.next();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut sent = 0;
        while Instant::now() < deadline && sent < 20_000 {
            // Mostly real opcodes and small ids so commands get past the first checks.
            let opcode = (next() % 8) as u32;
            let args: Vec<u64> = (0..15)
                .map(|i| match next() % 4 {
                    0 => next(),
                    1 => next() % 8,
                    2 if i == 0 && opcode == op::LAUNCH => next() % 24,
                    _ => next() % 4096,
                })
                .collect();
            g.submit(opcode, &args);
            sent += 1;
            if g.head - g.tail() >= RING_SLOTS - 1 {
                g.wait_tail(g.head - RING_SLOTS / 2);
            }
        }
        g.wait_tail(g.head);
        assert!(sent > 100);
        // Still a working device.
        for id in 1..=4096u64 {
            let _ = g.run(op::FREE, &[id]);
        }
        assert_eq!(g.run(op::ALLOC, &[1, 16]), status::OK);
        assert_eq!(g.upload(1, &[1.0, 2.0, 3.0, 4.0]), status::OK);
        assert_eq!(g.download(1, 4), vec![1.0, 2.0, 3.0, 4.0]);
    });
}

#[test]
fn dirty_chunks_are_exactly_what_commands_wrote() {
    let mut g = FakeGuest::new(1);
    let big = 4 * CHUNK_SIZE;
    assert_eq!(g.run(op::ALLOC, &[1, big]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK);
    g.accel.start_dirty_tracking();
    assert!(g.accel.take_dirty_chunks().is_empty());

    // COPY 4 elements into the middle of chunk 2 of buffer 1.
    let dst = (2 * CHUNK_SIZE + 64) / 4;
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::COPY, 2, 0, 1, dst, 4]),
        status::OK
    );
    assert_eq!(g.accel.take_dirty_chunks(), vec![ChunkId::new(1, 2)]);

    // An upload spanning chunks 0 and 1; a download writes nothing on the device.
    let data = vec![0u8; 16];
    g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(
        g.run(op::UPLOAD, &[1, CHUNK_SIZE - 8, DATA, 16]),
        status::OK
    );
    assert_eq!(g.run(op::DOWNLOAD, &[1, 0, DATA, 16]), status::OK);
    assert_eq!(
        g.accel.take_dirty_chunks(),
        vec![ChunkId::new(1, 0), ChunkId::new(1, 1)]
    );
    // A buffer created while tracking is dirty as a whole.
    assert_eq!(g.run(op::ALLOC, &[3, CHUNK_SIZE + 4]), status::OK);
    assert_eq!(g.accel.take_dirty_chunks().len(), 2);
    g.accel.stop_dirty_tracking();
}

#[test]
fn dirty_chunks_and_buffer_table_are_read_without_waiting_for_a_kernel() {
    let mut g = FakeGuest::new(1);
    let n = g.alloc_long_matmul();
    g.accel.start_dirty_tracking();
    let index = g.submit(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.tail() <= index, "the matmul is still running");
    // What a pre-copy round asks the device for, while the kernel holds the core.
    assert!(g.accel.take_dirty_chunks().is_empty());
    assert_eq!(g.accel.buffer_table().len(), 3);
    assert_eq!(
        g.accel.all_chunks().len() as u64,
        3 * (n * n * 4).div_ceil(CHUNK_SIZE)
    );
    assert!(
        g.tail() <= index,
        "the questions were answered before the kernel finished"
    );
    g.wait_tail(index + 1);
    assert_eq!(g.status(index), status::OK);
    let written = g.accel.take_dirty_chunks();
    assert_eq!(written.len() as u64, (n * n * 4).div_ceil(CHUNK_SIZE));
    assert!(written.iter().all(|c| c.buffer == 3), "only the output");
}

#[test]
fn a_wait_for_a_tail_ends_when_the_device_gets_there_not_when_it_is_idle() {
    let mut g = FakeGuest::new(1);
    let first = g.queue_long_matmuls(3);
    // What a guest waiting for a fence after the first does: it goes on once that one
    // has run, the others still running or queued.
    let waited = Instant::now();
    g.accel
        .wait(Some((first + 1) as u32), Duration::from_secs(60));
    assert!(
        waited.elapsed() < Duration::from_secs(50),
        "the wait ran out"
    );
    let tail = g.tail();
    assert!(
        tail > first,
        "let go before the first command ended (tail {tail})"
    );
    assert!(
        tail < first + 3,
        "let go only once the device was idle (tail {tail})"
    );
    // A tail passed already, or as far ahead as a hostile guest likes, ends the wait
    // at once where the device is idle.
    g.wait_tail(first + 3);
    for target in [first + 1, first + 1_000_000, 1 << 31] {
        let waited = Instant::now();
        g.accel.wait(Some(target as u32), Duration::from_secs(60));
        assert!(
            waited.elapsed() < Duration::from_secs(50),
            "a wait for tail {target} on an idle device ran out"
        );
    }
}

#[test]
fn a_busy_device_runs_what_is_published_after_without_a_doorbell() {
    let mut g = FakeGuest::new(1);
    let first = g.queue_long_matmuls(1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.tail() <= first, "the matmul is still running");
    // As the SDK does, seeing `tail` short of its last `head`.
    let index = g.publish(op::FENCE, &[7]);
    g.wait_tail(index + 1);
    assert_eq!(g.status(index), status::OK);
    let fence: u64 = g
        .mem
        .read_obj(field(std::mem::offset_of!(RingHeader, completed_fence)))
        .unwrap();
    assert_eq!(fence, 7, "the fence published after the doorbell ran");
}

#[test]
fn a_pause_request_stops_the_device_after_the_command_in_flight_and_lets_waiters_go() {
    let mut g = FakeGuest::new(1);
    let first = g.queue_long_matmuls(3);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.tail() <= first, "the first matmul is still running");
    // What a VM's pause does first: it returns at once, the kernel still running.
    g.accel.request_pause();
    assert!(g.tail() <= first, "the request did not wait for the kernel");
    // A vCPU waiting on the device is let go when the command in flight ends, not
    // when its wait runs out or the ring is empty.
    let waited = Instant::now();
    g.accel.wait_idle(Duration::from_secs(60));
    assert!(
        waited.elapsed() < Duration::from_secs(50),
        "the wait ran out"
    );
    let stopped_at = g.tail();
    assert!(
        stopped_at < first + 3,
        "the device ran every command queued (tail {stopped_at})"
    );
    // It stays stopped until resumed.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.tail(), stopped_at, "a command ran after the pause");
    g.accel.pause();
    g.accel.resume().unwrap();
    g.wait_tail(first + 3);
    assert!((first..first + 3).all(|i| g.status(i) == status::OK));
}

#[test]
fn written_chunks_are_those_any_path_wrote_since_their_buffer_was_created() {
    let mut g = FakeGuest::new(1);
    let chunk = ChunkId::new;
    assert_eq!(g.run(op::ALLOC, &[1, 4 * CHUNK_SIZE]), status::OK);
    assert!(g.accel.written_chunks().is_empty(), "a new buffer is zero");
    let dst = (2 * CHUNK_SIZE + 64) / 4;
    assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK);
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::COPY, 2, 0, 1, dst, 4]),
        status::OK
    );
    g.mem.write_slice(&[1u8; 8], GuestAddress(DATA)).unwrap();
    assert_eq!(g.run(op::UPLOAD, &[1, 8, DATA, 8]), status::OK);
    // Dirty tracking (off here) does not matter, nor does a take.
    assert!(g.accel.take_dirty_chunks().is_empty());
    assert_eq!(g.accel.written_chunks(), vec![chunk(1, 0), chunk(1, 2)]);
    // A migration's destination writes chunks directly.
    g.accel.pause();
    g.accel
        .write_chunk(chunk(1, 3), &vec![5u8; CHUNK_SIZE as usize])
        .unwrap();
    g.accel.resume().unwrap();
    assert_eq!(
        g.accel.written_chunks(),
        vec![chunk(1, 0), chunk(1, 2), chunk(1, 3)]
    );
    // A buffer freed and created again under its id starts zero.
    assert_eq!(g.run(op::FREE, &[1]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[1, 4 * CHUNK_SIZE]), status::OK);
    assert!(g.accel.written_chunks().is_empty());
}

#[test]
fn paused_device_state_and_chunks_restore_into_a_new_device() {
    let mut g = FakeGuest::new(2);
    assert_eq!(g.run(op::ALLOC, &[5, 3 * CHUNK_SIZE]), status::OK);
    let n = 3 * CHUNK_SIZE / 4;
    assert_eq!(
        g.run(
            op::LAUNCH,
            &[kernel::RNG_FILL, 5, n, 7, 0, 0, f32::to_bits(1.0) as u64]
        ),
        status::OK
    );
    g.accel.pause();
    // Submitted while paused: stays in the ring and runs after the restore.
    let pending = g.submit(op::LAUNCH, &[kernel::SCALE, 5, n, f32::to_bits(2.0) as u64]);
    let state = g.accel.save_state().expect("a live device saves");
    assert_eq!(state.tail, pending, "the pending command was not executed");

    let mem2 = g.mem.clone(); // guest RAM moves with the VM
    let restored = Accelerator::restore(
        mem2,
        &state,
        backend::create("cpu", 1, &DeviceMemory::default()).unwrap(),
        no_files(),
    )
    .unwrap();
    let mut data = Vec::new();
    for chunk in g.accel.all_chunks() {
        assert!(g.accel.read_chunk(chunk, &mut data).is_some());
        restored.write_chunk(chunk, &data).unwrap();
    }
    let before: Vec<u8> = {
        let mut all = Vec::new();
        for chunk in g.accel.all_chunks() {
            g.accel.read_chunk(chunk, &mut data);
            all.extend_from_slice(&data);
        }
        all
    };
    drop(std::mem::replace(&mut g.accel, restored));
    g.accel.resume().unwrap();
    g.wait_tail(pending + 1);
    assert_eq!(g.status(pending), status::OK);
    let after = g.download(5, 16);
    let expected: Vec<f32> = before[..64]
        .chunks(4)
        .map(|c| 2.0 * f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(after, expected);
    assert!(after.iter().any(|&v| v != 0.0));
}

#[test]
fn restore_refuses_corrupt_state() {
    let g = FakeGuest::new(1);
    g.accel.pause();
    // `state` restored on a fresh cpu backend.
    let restore = |state: &ferry_accel::device::AccelState| {
        let cpu = backend::create("cpu", 1, &DeviceMemory::default()).unwrap();
        Accelerator::restore(g.mem.clone(), state, cpu, no_files())
    };
    let mut state = g.accel.save_state().expect("a live device saves");
    state
        .buffers
        .push(ferry_accel::device::BufferState { id: 0, bytes: 16 });
    assert!(restore(&state).is_err());
    state.buffers[0] = ferry_accel::device::BufferState {
        id: 1,
        bytes: CAPACITY + 4,
    };
    assert!(restore(&state).is_err());
    let mut other = g.accel.save_state().expect("a live device saves");
    other.backend_kind = "cuda".into();
    let err = restore(&other).err().unwrap();
    assert!(err.to_string().contains("cuda"), "{err}");
    // A ring outside the guest's RAM: at the top of the address space, past its end,
    // over the VMM's system pages.
    for ring_gpa in [u64::MAX - 8, RAM - 16, 0x2000] {
        let mut bad = g.accel.save_state().expect("a live device saves");
        bad.ring_gpa = ring_gpa;
        let err = restore(&bad).err().expect("a ring outside RAM");
        assert!(err.to_string().contains("ring"), "{err}");
        assert!(g.accel.apply_state(&bad).is_err());
    }
    let chunk = ChunkId::new(42, 0);
    assert!(g.accel.write_chunk(chunk, &[0; 4]).is_err());
}

/// Attached files held in memory; file 1 cannot be read, and file 2 only in its first
/// MiB.
struct MemFiles {
    files: Vec<Vec<u8>>,
}

impl FileSource for MemFiles {
    fn file_len(&self, file: u32) -> Option<u64> {
        self.files.get(file as usize).map(|f| f.len() as u64)
    }

    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let f = &self.files[file as usize];
        let end = offset as usize + out.len();
        if file == 1 || (file == 2 && end > 1 << 20) {
            // A file truncated behind the host's back.
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        out.copy_from_slice(&f[offset as usize..end]);
        Ok(())
    }
}

impl FakeGuest {
    /// A guest on 2 threads with two files attached: `data`, and 64 bytes that cannot be
    /// read.
    fn with_file(data: Vec<u8>) -> Self {
        let files = MemFiles {
            files: vec![data, vec![1; 64]],
        };
        Self::with_files(2, Arc::new(files))
    }
}

/// A file on storage that takes `delay` for each read.
struct SlowFile {
    delay: Duration,
}

impl FileSource for SlowFile {
    fn file_len(&self, _file: u32) -> Option<u64> {
        Some(1 << 20)
    }

    fn read_file(&self, _file: u32, _offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        out.fill(5);
        Ok(())
    }
}

#[test]
fn a_slow_file_load_does_not_hold_up_readers_of_its_buffer() {
    let delay = Duration::from_secs(2);
    let mut g = FakeGuest::with_files(2, Arc::new(SlowFile { delay }));
    assert_eq!(g.run(op::ALLOC, &[1, 2 * CHUNK_SIZE]), status::OK);
    g.accel.start_dirty_tracking();
    let load = g.submit(op::LOAD_FILE, &[1, 0, 0, 0, CHUNK_SIZE]);
    // The read has begun; a migration reads the buffer's other chunk meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let tracker = g.accel.tracker();
    let started = Instant::now();
    let mut chunk = Vec::new();
    tracker.read_chunk(ChunkId::new(1, 1), &mut chunk).unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "a chunk read waited {waited:?} for a file read"
    );
    g.wait_tail(load + 1);
    let mut loaded = Vec::new();
    g.accel.read_chunk(ChunkId::new(1, 0), &mut loaded).unwrap();
    assert!(loaded.iter().all(|&b| b == 5));
}

#[test]
fn load_file_copies_attached_files_into_buffers_and_refuses_bad_ranges() {
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i * 7 + i / 4099) as u8)
        .collect();
    let mut g = FakeGuest::with_file(data.clone());
    let size = 2 << 20;
    assert_eq!(g.run(op::ALLOC, &[1, size]), status::OK);
    g.accel.start_dirty_tracking();
    // 1.5 MiB from file offset 12345 into buffer offset 4096 (several copy pieces).
    let (off, foff, len) = (4096u64, 12345u64, 3 << 19);
    assert_eq!(g.run(op::LOAD_FILE, &[1, off, 0, foff, len]), status::OK);
    let mut chunk = Vec::new();
    let mut got = vec![0u8; size as usize];
    for (i, piece) in got.chunks_mut(CHUNK_SIZE as usize).enumerate() {
        let id = ChunkId::new(1, i as u64);
        g.accel.read_chunk(id, &mut chunk).unwrap();
        piece.copy_from_slice(&chunk);
    }
    assert!(got[..off as usize].iter().all(|&b| b == 0));
    assert_eq!(
        &got[off as usize..(off + len) as usize],
        &data[foff as usize..(foff + len) as usize]
    );
    assert!(got[(off + len) as usize..].iter().all(|&b| b == 0));
    // What was loaded is dirty, exactly: the chunks that bytes 4096..+1.5 MiB touch.
    let dirty: Vec<u64> = g
        .accel
        .take_dirty_chunks()
        .iter()
        .map(|c| c.index)
        .collect();
    let touched = off / CHUNK_SIZE..=(off + len - 1) / CHUNK_SIZE;
    assert_eq!(dirty, touched.collect::<Vec<_>>());
    // Hostile ranges: past the file, past the buffer, an unknown file, too long, overflow.
    let file_len = data.len() as u64;
    for (args, want) in [
        ([1, 0, 0, file_len - 8, 16], status::BAD_FILE),
        ([1, 0, 0, u64::MAX, 2], status::BAD_FILE),
        ([1, size - 8, 0, 0, 16], status::OUT_OF_BOUNDS),
        ([1, 0, 2, 0, 16], status::BAD_FILE),
        ([1, 0, u64::from(u32::MAX) + 1, 0, 16], status::BAD_FILE),
        ([7, 0, 0, 0, 16], status::BAD_BUFFER),
    ] {
        assert_eq!(g.run(op::LOAD_FILE, &args), want, "{args:?}");
    }
    assert_eq!(g.run(op::ALLOC, &[2, 65 << 20]), status::OUT_OF_MEMORY);
    // A file that can no longer be read fails the command; the device goes on.
    assert_eq!(
        g.run(op::LOAD_FILE, &[1, 0, 1, 0, 64]),
        status::DEVICE_ERROR
    );
    assert_eq!(g.run(op::LOAD_FILE, &[1, 0, 0, 0, 64]), status::OK);
}

#[test]
fn chunks_loaded_whole_from_a_file_remember_where_until_written() {
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i * 13 + i / 511) as u8)
        .collect();
    let mut g = FakeGuest::with_file(data);
    assert_eq!(g.run(op::ALLOC, &[1, 2 << 20]), status::OK);
    let (off, foff, len) = (4096u64, 12345u64, 3u64 << 19);
    assert_eq!(g.run(op::LOAD_FILE, &[1, off, 0, foff, len]), status::OK);
    let origin = |g: &FakeGuest, index| {
        let (origin, _) = g
            .accel
            .tracker()
            .chunk_origin(ChunkId { buffer: 1, index })?;
        Some(origin)
    };
    // The chunks wholly inside bytes 4096..4096 + 1.5 MiB have an origin; the first and
    // the last touched only partly do not.
    let whole = |index: u64| index * CHUNK_SIZE >= off && (index + 1) * CHUNK_SIZE <= off + len;
    assert!(!whole(0) && whole(1) && whole(3));
    for index in 0..(2 << 20) / CHUNK_SIZE {
        let want = whole(index).then(|| ChunkOrigin {
            file: 0,
            offset: foff + index * CHUNK_SIZE - off,
            len: CHUNK_SIZE,
        });
        assert_eq!(origin(&g, index), want, "chunk {index}");
    }
    // A write into chunk 2 (here a small load) makes it the device's own.
    assert_eq!(
        g.run(op::LOAD_FILE, &[1, 2 * CHUNK_SIZE + 100, 0, 0, 64]),
        status::OK
    );
    assert_eq!(origin(&g, 2), None);
    assert!(origin(&g, 3).is_some());
    // A freed buffer's chunks have no origin, nor does a new buffer with its id.
    assert_eq!(g.run(op::FREE, &[1]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[1, 2 << 20]), status::OK);
    assert_eq!(origin(&g, 3), None);
    // A receiving side writes a chunk with its origin, and keeps it.
    let chunk = ChunkId::new(1, 4);
    let piece = vec![7u8; CHUNK_SIZE as usize];
    let from = ChunkOrigin {
        file: 0,
        offset: 99,
        len: CHUNK_SIZE,
    };
    g.accel.write_chunk_from_file(chunk, &piece, from).unwrap();
    assert_eq!(origin(&g, 4), Some(from));
}

/// Random f32 values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A destination device (one thread, paused) with `table` and the `base` chunks.
fn destination(
    table: &[ferry_accel::device::BufferState],
    base: &std::collections::BTreeMap<ChunkId, Vec<u8>>,
) -> FakeGuest {
    let g = FakeGuest::new(1);
    g.accel.pause();
    g.accel.sync_buffers(table).unwrap();
    for (chunk, data) in base {
        g.accel.write_chunk(*chunk, data).unwrap();
    }
    g
}

#[test]
fn a_base_read_while_commands_run_plus_the_replayed_log_equals_the_source_bit_for_bit() {
    use ferry_accel::replay::CaptureLimits;
    let n: u64 = 256; // 256 KiB matrices: four chunks each
    let bytes = n * n * 4;
    let mut g = FakeGuest::new(2);
    for id in 1..=3 {
        assert_eq!(g.run(op::ALLOC, &[id, bytes]), status::OK);
    }
    assert_eq!(g.upload(1, &values((n * n) as usize, 1)), status::OK);
    assert_eq!(g.upload(2, &values((n * n) as usize, 2)), status::OK);
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]),
        status::OK
    );

    let (table, base_chunks) = g.accel.replayer().start_capture(
        CaptureLimits {
            pool_bytes: 16 << 20,
            log_bytes: 16 << 20,
        },
        None,
    );
    assert_eq!(
        base_chunks.len(),
        12,
        "three written buffers of four chunks"
    );
    let mut base = std::collections::BTreeMap::new();
    let mut read = |g: &FakeGuest, chunk: ChunkId| {
        let mut out = Vec::new();
        assert!(g.accel.replayer().read_base_chunk(chunk, &mut out).unwrap());
        base.insert(chunk, out);
    };
    // Half of buffer 2 is read before anything changes.
    read(&g, ChunkId::new(2, 0));
    read(&g, ChunkId::new(2, 1));

    // After the boundary: a new buffer holding a product of buffer 1 as it was, then
    // buffer 1 overwritten (its unread chunks are preserved first), buffer 3 freed and
    // made again with another size, a copy, a download and a fence (guest RAM only).
    assert_eq!(g.run(op::ALLOC, &[4, bytes]), status::OK);
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::MATMUL, 1, 2, 4, n, n, n, 0]),
        status::OK
    );
    assert_eq!(g.upload(1, &values((n * n) as usize, 3)), status::OK);
    assert_eq!(g.run(op::FREE, &[3]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[3, bytes / 2]), status::OK);
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::COPY, 4, 0, 3, 0, n * n / 2]),
        status::OK
    );
    assert_eq!(g.download(4, 16).len(), 16);
    assert_eq!(g.run(op::FENCE, &[9]), status::OK);
    // A command that fails is logged too, and must fail again.
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::ADD, 1, 7, 1, 16]),
        status::BAD_BUFFER
    );

    // The rest of the base, read after all that: as it was at the boundary.
    for chunk in g.accel.replayer().unread_base_chunks().unwrap() {
        read(&g, chunk);
    }
    assert!(g.accel.replayer().unread_base_chunks().unwrap().is_empty());
    g.accel.pause();
    let log = g.accel.replayer().take_log().unwrap();
    let report = g.accel.replayer().stop_capture().unwrap();
    assert_eq!(report.commands_logged, 9);
    assert_eq!(
        report.chunks_preserved, 8,
        "buffers 1 and 3, four chunks each"
    );
    assert!(report.pool_peak_bytes <= 16 << 20);

    let source = g.accel.digest().unwrap();
    let dest = destination(&table, &base);
    dest.accel.replay(log.clone(), far()).unwrap();
    assert_eq!(
        dest.accel.digest().unwrap(),
        source,
        "one thread replays what two computed"
    );

    // The digest catches a divergence: the same base without the product.
    let dest = destination(&table, &base);
    let mut short = log.clone();
    short.retain(|e| !(e.opcode == op::LAUNCH && e.args[0] == kernel::MATMUL));
    dest.accel.replay(short, far()).unwrap();
    assert_ne!(dest.accel.digest().unwrap(), source);
}

#[test]
fn a_capture_past_its_bounds_fails_cleanly_and_a_bad_log_is_refused() {
    use ferry_accel::replay::{CaptureError, CaptureLimits};
    let mut g = FakeGuest::new(1);
    assert_eq!(g.run(op::ALLOC, &[1, 4 * CHUNK_SIZE]), status::OK);
    // Written before the boundary, so in the base (unwritten chunks read as zero).
    assert_eq!(
        g.upload(1, &vec![0.5; (4 * CHUNK_SIZE / 4) as usize]),
        status::OK
    );
    g.accel.replayer().start_capture(
        CaptureLimits {
            pool_bytes: CHUNK_SIZE,
            log_bytes: 1 << 20,
        },
        None,
    );
    // Overwriting the whole unread buffer needs four chunks of pool: one fits.
    assert_eq!(
        g.upload(1, &vec![1.0; (4 * CHUNK_SIZE / 4) as usize]),
        status::OK
    );
    let mut out = Vec::new();
    let full = Err(CaptureError::PoolFull { limit: CHUNK_SIZE });
    assert_eq!(
        g.accel
            .replayer()
            .read_base_chunk(ChunkId::new(1, 0), &mut out),
        full
    );
    assert_eq!(
        g.accel.replayer().take_log().map(|l| l.len()),
        full.map(|_| 0)
    );
    g.accel.replayer().stop_capture();
    assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK, "the device runs on");

    // A log naming a buffer this device does not have, or an upload of the wrong size.
    g.accel.pause();
    let upload = |len: u64, payload: usize| LoggedCommand {
        opcode: op::UPLOAD,
        args: vec![9, 0, 0, len],
        payload: vec![0; payload],
        status: status::OK,
    };
    assert!(matches!(
        g.accel.replay(vec![upload(16, 16)], far()),
        Err(ReplayError::Diverged { got, .. }) if got == status::BAD_BUFFER
    ));
    let mut wrong = upload(16, 8);
    wrong.args[0] = 2;
    assert!(matches!(
        g.accel.replay(vec![wrong], far()),
        Err(ReplayError::BadPayload {
            expected: 16,
            got: 8,
            ..
        })
    ));
}

#[test]
fn a_replay_past_its_deadline_stops_before_its_next_command() {
    let mut g = FakeGuest::new(1);
    assert_eq!(g.run(op::ALLOC, &[1, CHUNK_SIZE]), status::OK);
    g.accel.pause();
    let before = g.accel.digest().unwrap();
    let upload = |at: u64| LoggedCommand {
        opcode: op::UPLOAD,
        args: vec![1, at, 0, 16],
        status: status::OK,
        payload: vec![7; 16],
    };
    assert!(matches!(
        g.accel.replay(vec![upload(0), upload(16)], Instant::now()),
        Err(ReplayError::OutOfTime { index: 0, total: 2 })
    ));
    assert_eq!(g.accel.digest().unwrap(), before, "nothing replayed");
}

#[test]
fn a_digest_kept_for_a_buffer_is_dropped_when_the_buffer_is_written() {
    let mut g = FakeGuest::new(1);
    for id in 1..=2 {
        assert_eq!(g.run(op::ALLOC, &[id, 2 * CHUNK_SIZE]), status::OK);
    }
    assert_eq!(g.upload(1, &values(1024, 1)), status::OK);
    g.accel.pause();
    // What a digest would cost counts the buffers not hashed since they were written.
    let whole = g.accel.replayer().digest_estimate();
    assert!(whole > Duration::ZERO);
    let first = g.accel.digest().unwrap();
    assert_eq!(g.accel.replayer().digest_estimate(), Duration::ZERO);
    assert_eq!(g.accel.digest().unwrap(), first, "kept, and the same");
    g.accel.resume().unwrap();
    // A kernel writes buffer 2, then a free and an alloc remake it: each drops what was
    // kept for buffer 2, and only for it.
    assert_eq!(
        g.run(op::LAUNCH, &[kernel::COPY, 1, 0, 2, 0, 1024]),
        status::OK
    );
    g.accel.pause();
    // Each estimate is rounded to a nanosecond, so half of it may be 1 ns off.
    let half = g.accel.replayer().digest_estimate();
    assert!(
        (half.as_nanos() * 2).abs_diff(whole.as_nanos()) <= 2,
        "only buffer 2 is to hash again: {half:?} of {whole:?}"
    );
    let copied = g.accel.digest().unwrap();
    assert_eq!(copied.0[0], first.0[0], "buffer 1 unchanged");
    assert_ne!(copied.0[1], first.0[1], "buffer 2 written by the kernel");
    g.accel.resume().unwrap();
    assert_eq!(g.run(op::FREE, &[2]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, 2 * CHUNK_SIZE]), status::OK);
    g.accel.pause();
    assert_eq!(g.accel.digest().unwrap(), first, "buffer 2 zero again");
}

#[test]
fn a_digest_hashed_ahead_while_kernels_run_is_the_one_hashed_afresh_in_the_pause() {
    // The same commands on two devices; one of them is hashed ahead while they run.
    let work = |g: &mut FakeGuest, round: u64| {
        assert_eq!(g.upload(1, &values(1024, round)), status::OK);
        for (to, from) in [(2, 1), (3, 2), (4, 1)] {
            assert_eq!(
                g.run(op::LAUNCH, &[kernel::ADD, from, 1, to, 1024]),
                status::OK
            );
        }
    };
    let (mut ahead, mut afresh) = (FakeGuest::new(1), FakeGuest::new(1));
    for g in [&mut ahead, &mut afresh] {
        for id in 1..=4 {
            assert_eq!(g.run(op::ALLOC, &[id, 2 * CHUNK_SIZE]), status::OK);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hashing = {
        let (replayer, stop) = (ahead.accel.replayer(), stop.clone());
        std::thread::spawn(move || {
            let mut hashed = 0;
            while !stop.load(Ordering::SeqCst) {
                match replayer.digest_ahead(&stop) {
                    0 => std::thread::sleep(Duration::from_millis(1)),
                    bytes => hashed += bytes,
                }
            }
            hashed
        })
    };
    // Compared at each round's end, so a CRC kept for a buffer written after it was
    // hashed shows at once (a later write would drop it).
    for round in 0..200 {
        for g in [&mut ahead, &mut afresh] {
            work(g, round);
            g.accel.pause();
        }
        assert_eq!(
            ahead.accel.digest().unwrap(),
            afresh.accel.digest().unwrap(),
            "round {round}: a digest kept from hashing ahead went stale"
        );
        ahead.accel.resume().unwrap();
        afresh.accel.resume().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    assert!(hashing.join().unwrap() > 0, "nothing was hashed ahead");
    // Written, then hashed ahead with the device idle: only that buffer is hashed, and
    // the pause's digest has nothing left to hash.
    for g in [&mut ahead, &mut afresh] {
        assert_eq!(g.upload(3, &values(16, 998)), status::OK);
    }
    let idle = Arc::new(AtomicBool::new(false));
    let hashed = ahead.accel.replayer().digest_ahead(&idle);
    assert_eq!(hashed, 2 * CHUNK_SIZE, "only buffer 3, written since");
    ahead.accel.pause();
    assert_eq!(
        ahead.accel.replayer().digest_estimate(),
        Duration::ZERO,
        "every buffer hashed ahead"
    );
    ahead.accel.resume().unwrap();
    // Written after: hashed again in the pause.
    for g in [&mut ahead, &mut afresh] {
        assert_eq!(g.upload(2, &values(16, 999)), status::OK);
        g.accel.pause();
    }
    assert!(ahead.accel.replayer().digest_estimate() > Duration::ZERO);
    assert_eq!(
        ahead.accel.digest().unwrap(),
        afresh.accel.digest().unwrap(),
        "a digest kept from hashing ahead went stale"
    );
}

#[test]
fn a_buffer_too_large_to_hash_between_two_commands_is_left_to_the_pauses_digest() {
    use ferry_accel::device::DIGEST_AHEAD_MAX_BUFFER;
    let large = DIGEST_AHEAD_MAX_BUFFER + CHUNK_SIZE;
    let cpu = backend::create(backend::CPU, 1, &DeviceMemory::default()).unwrap();
    let mut g = FakeGuest::sized(cpu, no_files(), large + CHUNK_SIZE);
    assert_eq!(g.run(op::ALLOC, &[1, large]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, CHUNK_SIZE]), status::OK);
    let hashed = g
        .accel
        .replayer()
        .digest_ahead(&Arc::new(AtomicBool::new(false)));
    assert_eq!(hashed, CHUNK_SIZE, "only the small buffer");
    g.accel.pause();
    assert!(g.accel.replayer().digest_estimate() > Duration::ZERO);
}

#[test]
fn a_capture_after_precopy_takes_the_pending_and_dirty_chunks_and_reads_unwritten_ones_as_zero() {
    use ferry_accel::replay::CaptureLimits;
    let chunk = ChunkId::new;
    let mut g = FakeGuest::new(1);
    assert_eq!(g.run(op::ALLOC, &[1, 2 * CHUNK_SIZE]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, CHUNK_SIZE]), status::OK);
    g.accel.start_dirty_tracking();
    assert_eq!(g.upload(1, &values(16, 3)), status::OK);
    // Pre-copy left chunk 0 of buffer 2 pending (never written: zeros); buffer 1's
    // chunk 0 is dirty, and taken at the boundary.
    let (_, base) = g
        .accel
        .replayer()
        .start_capture(CaptureLimits::default(), Some(&[chunk(2, 0), chunk(9, 0)]));
    assert_eq!(base, vec![chunk(1, 0), chunk(2, 0)], "no buffer 9");
    assert!(
        g.accel.take_dirty_chunks().is_empty(),
        "taken at the boundary"
    );
    let mut out = Vec::new();
    assert!(g
        .accel
        .replayer()
        .read_base_chunk(chunk(2, 0), &mut out)
        .unwrap());
    assert_eq!(out, vec![0u8; CHUNK_SIZE as usize]);
    // Written after the boundary: the base still reads as it was.
    assert_eq!(g.upload(1, &values(16, 4)), status::OK);
    assert!(g
        .accel
        .replayer()
        .read_base_chunk(chunk(1, 0), &mut out)
        .unwrap());
    let was: Vec<u8> = values(16, 3).iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(&out[..64], &was[..]);
    assert!(!g
        .accel
        .replayer()
        .read_base_chunk(chunk(1, 1), &mut out)
        .unwrap());
    g.accel.replayer().stop_capture();
}

#[test]
fn a_command_that_writes_nothing_preserves_no_base_chunk() {
    use ferry_accel::replay::CaptureLimits;
    // Each writes nothing, so the chunk it names need not be kept (the side pool would
    // fill with one such command per chunk): an upload of no bytes, one from the VMM's
    // system pages, and a load of a file that is not attached.
    for (opcode, args, refused) in [
        (op::UPLOAD, vec![1, 0, DATA, 0], status::OK),
        (
            op::UPLOAD,
            vec![1, 0, 0x1000, CHUNK_SIZE],
            status::BAD_GUEST_RANGE,
        ),
        (
            op::LOAD_FILE,
            vec![1, 0, 99, 0, CHUNK_SIZE],
            status::BAD_FILE,
        ),
    ] {
        let mut g = FakeGuest::new(1);
        assert_eq!(g.run(op::ALLOC, &[1, CHUNK_SIZE]), status::OK);
        assert_eq!(g.upload(1, &values(16, 3)), status::OK);
        g.accel.start_dirty_tracking();
        g.accel
            .replayer()
            .start_capture(CaptureLimits::default(), None);
        assert_eq!(g.run(opcode, &args), refused, "opcode {opcode}");
        let report = g.accel.replayer().stop_capture().unwrap();
        assert_eq!(report.chunks_preserved, 0, "opcode {opcode}");
        assert_eq!(report.commands_logged, 1, "opcode {opcode}");
    }
}

#[test]
fn a_failed_capture_gives_back_the_zero_chunks_it_never_read_as_dirty() {
    use ferry_accel::replay::CaptureLimits;
    let chunk = ChunkId::new;
    let mut g = FakeGuest::new(1);
    assert_eq!(g.run(op::ALLOC, &[1, 2 * CHUNK_SIZE]), status::OK);
    assert_eq!(g.upload(1, &values(16, 3)), status::OK);
    g.accel.start_dirty_tracking();
    // Pre-copy sent buffer 1 (its written chunk 0 reaches the destination)...
    g.accel.take_dirty_chunks();
    // ... which the guest frees and makes again with the same id and size, unwritten:
    // zeros here, the old bytes there.
    assert_eq!(g.run(op::FREE, &[1]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[1, 2 * CHUNK_SIZE]), status::OK);
    // Replay starts after pre-copy; its log fills with the first command.
    let limits = CaptureLimits {
        log_bytes: 1,
        ..CaptureLimits::default()
    };
    let (_, base) = g.accel.replayer().start_capture(limits, Some(&[]));
    assert_eq!(base, vec![chunk(1, 0), chunk(1, 1)]);
    assert_eq!(g.run(op::ALLOC, &[2, CHUNK_SIZE]), status::OK);
    let mut out = Vec::new();
    assert!(g
        .accel
        .replayer()
        .read_base_chunk(chunk(1, 0), &mut out)
        .is_err());
    g.accel.replayer().stop_capture();
    // Pre-copy takes over: it must send both zero chunks, or the destination keeps the
    // earlier buffer's bytes in them.
    let mut again = g.accel.written_chunks();
    again.extend(g.accel.take_dirty_chunks());
    for c in [chunk(1, 0), chunk(1, 1)] {
        assert!(again.contains(&c), "{c:?} is not sent again: {again:?}");
    }
}

/// Faults a [`Faulty`] backend injects, armed by the test while the device runs.
#[derive(Clone, Default)]
struct Faults {
    /// Every launch panics (as the cuda backend does when a GPU copy fails).
    panic_launch: Arc<AtomicBool>,
    /// The next alloc fails (the host's memory ran out).
    fail_alloc: Arc<AtomicBool>,
    /// The next CRC of a buffer fails (a GPU copy failed).
    fail_crc: Arc<AtomicBool>,
    /// How many launches the device has begun: a test that acts while a kernel runs
    /// waits for this, not for time to pass (see [`Faults::wait_launched`]).
    launched: Arc<AtomicU64>,
    /// Milliseconds each MiB (or part of one) copied into or out of a buffer takes at
    /// least: a slow bus, over which a copy of megabytes takes as long as one of
    /// gigabytes.
    copy_delay_ms: Arc<AtomicU64>,
    /// How many copies into or out of a buffer the device has begun.
    copied: Arc<AtomicU64>,
    /// Of those, how many began with the backend's abort switch stopping kernels.
    copied_once_stopped: Arc<AtomicU64>,
}

impl Faults {
    /// Waits until the device has begun `n` launches (its thread is in the kernel, or
    /// past it): however loaded the machine, one asked to stop now finds it taken.
    fn wait_launched(&self, n: u64) {
        Self::wait_for(&self.launched, n, "launch");
    }

    /// Waits until the device has begun `n` copies into or out of a buffer (pieces of
    /// an upload, a download or a file load), as [`Self::wait_launched`].
    fn wait_copied(&self, n: u64) {
        Self::wait_for(&self.copied, n, "copy");
    }

    fn wait_for(count: &AtomicU64, n: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the device has not begun {what} {n} in a minute"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Counts a copy of `bytes` the device begins, and makes it take
    /// [`Self::copy_delay_ms`] a MiB.
    fn copy(&self, bytes: usize) {
        self.copied.fetch_add(1, Ordering::SeqCst);
        let per_mib = self.copy_delay_ms.load(Ordering::SeqCst);
        let mib = bytes.div_ceil(1 << 20) as u64;
        std::thread::sleep(Duration::from_millis(per_mib * mib));
    }
}

/// The cpu backend (one thread) with [`Faults`]; its device loop runs on a thread of its
/// own (as the cuda backend's does) or on the cpu backend's pool.
struct Faulty {
    inner: Box<dyn Backend>,
    faults: Faults,
    own_thread: bool,
    /// Keeps the cpu backend's abort switch (without it, its kernels run to their end
    /// when the device is ended, as a GPU's do).
    abortable: bool,
}

impl Faulty {
    /// Counts a copy begun though the abort switch stops kernels.
    fn count_if_stopped(&self) {
        if self.abort_switch().is_some_and(|s| s.stops_kernels()) {
            self.faults
                .copied_once_stopped
                .fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Without an abort switch, as a GPU's backend.
    fn boxed(faults: &Faults, own_thread: bool) -> Box<dyn Backend> {
        Box::new(Self {
            inner: backend::create(backend::CPU, 1, &DeviceMemory::default()).unwrap(),
            faults: faults.clone(),
            own_thread,
            abortable: false,
        })
    }

    /// The cpu backend as it is (its abort switch, its device loop on its pool), with
    /// `faults` to count its launches.
    fn watched(faults: &Faults) -> Box<dyn Backend> {
        Box::new(Self {
            inner: backend::create(backend::CPU, 1, &DeviceMemory::default()).unwrap(),
            faults: faults.clone(),
            own_thread: false,
            abortable: true,
        })
    }
}

struct FaultyReader {
    inner: Arc<dyn BufferReader>,
    faults: Faults,
}

impl BufferReader for FaultyReader {
    fn with_buffer(&self, id: u32, f: &mut dyn FnMut(&[u8])) -> bool {
        self.inner.with_buffer(id, f)
    }

    fn read_range(&self, id: u32, range: std::ops::Range<u64>, out: &mut Vec<u8>) -> Option<u64> {
        self.inner.read_range(id, range, out)
    }

    fn crc32(&self, id: u32) -> Option<u32> {
        if self.faults.fail_crc.swap(false, Ordering::SeqCst) {
            return None;
        }
        self.inner.crc32(id)
    }
}

impl Backend for Faulty {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn kernel_version(&self) -> u32 {
        self.inner.kernel_version()
    }

    fn alloc(&mut self, id: u32, bytes: u64) -> Result<(), BackendError> {
        if self.faults.fail_alloc.swap(false, Ordering::SeqCst) {
            return Err(BackendError::Alloc { bytes });
        }
        self.inner.alloc(id, bytes)
    }

    fn free(&mut self, id: u32) {
        self.inner.free(id);
    }

    fn write(&mut self, id: u32, offset: u64, data: &[u8]) {
        self.count_if_stopped();
        self.faults.copy(data.len());
        self.inner.write(id, offset, data);
    }

    fn read(&self, id: u32, offset: u64, out: &mut [u8]) {
        self.count_if_stopped();
        self.faults.copy(out.len());
        self.inner.read(id, offset, out);
    }

    fn launch(&mut self, kernel: &Kernel) -> Result<(), BackendError> {
        self.faults.launched.fetch_add(1, Ordering::SeqCst);
        if self.faults.panic_launch.load(Ordering::SeqCst) {
            panic!("injected: the GPU failed mid-kernel");
        }
        self.inner.launch(kernel)
    }

    fn reader(&self) -> Arc<dyn BufferReader> {
        Arc::new(FaultyReader {
            inner: self.inner.reader(),
            faults: self.faults.clone(),
        })
    }

    fn host_threads(&self) -> HostThreads {
        self.inner.host_threads()
    }

    fn abort_switch(&self) -> Option<backend::AbortSwitch> {
        self.inner.abort_switch().filter(|_| self.abortable)
    }

    fn spawn_device_loop(&self, run: Box<dyn FnOnce() + Send>) -> std::io::Result<DeviceLoop> {
        if !self.own_thread {
            return self.inner.spawn_device_loop(run);
        }
        let (done, ended) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _done = done;
            run();
        });
        Ok(DeviceLoop::new(ended))
    }
}

/// Runs `f` on a thread of its own and returns what it returns, or `None` if it has not
/// returned within `limit` (the thread is left behind: it may never end).
fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_device_whose_thread_panicked_lets_its_pause_and_replays_go() {
    use ferry_accel::replay::{CaptureError, CaptureLimits, DigestError};
    for own_thread in [false, true] {
        let faults = Faults::default();
        let mut g = FakeGuest::on(Faulty::boxed(&faults, own_thread), no_files());
        for id in 1..=3 {
            assert_eq!(g.run(op::ALLOC, &[id, 16]), status::OK);
        }
        let replayer = g.accel.replayer();
        replayer.start_capture(CaptureLimits::default(), None);
        faults.panic_launch.store(true, Ordering::SeqCst);
        let launch = g.submit(op::LAUNCH, &[kernel::ADD, 1, 2, 3, 4]);
        let g = Arc::new(g);
        // The vCPU's wait ends at once, not at its timeout.
        let waiting = g.clone();
        let waited = within(Duration::from_secs(30), move || {
            let started = Instant::now();
            waiting.accel.wait_idle(Duration::from_secs(60));
            started.elapsed()
        });
        assert!(waited.is_some_and(|w| w < Duration::from_secs(30)));
        let pausing = g.clone();
        assert!(
            within(Duration::from_secs(30), move || pausing.accel.pause()).is_some(),
            "pause hangs on a dead device (own thread: {own_thread})"
        );
        assert!(g.accel.is_dead());
        assert!(
            g.tail() <= launch,
            "the command that panicked did not complete"
        );
        let replaying = g.clone();
        let replayed = within(Duration::from_secs(30), move || {
            replaying.accel.replay(Vec::new(), far())
        });
        assert_eq!(replayed, Some(Err(ReplayError::DeviceGone)));
        // A migration learns it from the capture and the digest, without a panic.
        assert_eq!(replayer.take_log(), Err(CaptureError::DeviceGone));
        assert_eq!(g.accel.digest(), Err(DigestError::DeviceGone));
        replayer.stop_capture();
        replayer.start_capture(CaptureLimits::default(), None);
        assert_eq!(replayer.take_log(), Err(CaptureError::DeviceGone));
        // Every buffer is to be sent again: the kernel may have written part unmarked.
        assert_eq!(g.accel.written_chunks().len(), 3);
        let state = g.accel.save_state().expect("a live device saves");
        assert_eq!((state.tail, state.buffers.len()), (launch, 3));
    }
}

#[test]
fn a_command_the_host_failed_fails_the_capture_instead_of_diverging_in_replay() {
    use ferry_accel::replay::{CaptureError, CaptureLimits};
    let faults = Faults::default();
    let mut g = FakeGuest::on(Faulty::boxed(&faults, false), no_files());
    assert_eq!(g.run(op::ALLOC, &[1, 16]), status::OK);
    let replayer = g.accel.replayer();
    replayer.start_capture(CaptureLimits::default(), None);
    faults.fail_alloc.store(true, Ordering::SeqCst);
    assert_eq!(g.run(op::ALLOC, &[2, 16]), status::DEVICE_ERROR);
    assert_eq!(
        replayer.take_log(),
        Err(CaptureError::Unreplayable { opcode: op::ALLOC })
    );
    replayer.stop_capture();
    assert_eq!(g.run(op::ALLOC, &[2, 16]), status::OK, "the device runs on");

    // A failed alloc or free changed nothing: a log that has one (from a source that
    // logged them) replays without it, where it would succeed.
    g.accel.pause();
    let source = g.accel.digest().unwrap();
    let table = g.accel.buffer_table();
    let dest = destination(&table, &Default::default());
    let failed = |opcode, args: Vec<u64>, status| LoggedCommand {
        opcode,
        args,
        payload: Vec::new(),
        status,
    };
    let log = vec![
        failed(op::ALLOC, vec![3, 16], status::DEVICE_ERROR),
        failed(op::FREE, vec![1], status::BAD_BUFFER),
    ];
    assert_eq!(dest.accel.replay(log, far()), Ok(()));
    assert_eq!(dest.accel.digest().unwrap(), source);
}

#[test]
fn a_digest_that_could_not_read_a_buffer_is_not_kept() {
    use ferry_accel::replay::DigestError;
    let faults = Faults::default();
    let mut g = FakeGuest::on(Faulty::boxed(&faults, false), no_files());
    assert_eq!(g.run(op::ALLOC, &[1, 16]), status::OK);
    assert_eq!(g.upload(1, &[1.0, 2.0, 3.0, 4.0]), status::OK);
    g.accel.pause();
    let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let truth = (1, 16, crc32fast::hash(&bytes));
    faults.fail_crc.store(true, Ordering::SeqCst);
    assert_eq!(
        g.accel.digest(),
        Err(DigestError::Unreadable { buffer: 1 }),
        "the failure shows"
    );
    assert_eq!(
        g.accel.digest().map(|d| d.0),
        Ok(vec![truth]),
        "hashed again, not kept"
    );
}

#[test]
fn a_base_chunk_read_waiting_for_a_kernel_does_not_hold_up_other_base_reads() {
    use ferry_accel::replay::CaptureLimits;
    let faults = Faults::default();
    let mut g = FakeGuest::on(Faulty::watched(&faults), no_files());
    // A matmul as long as `alloc_long_matmul`'s, whose output buffer 3 has a chunk more,
    // which it does not write (but the cpu backend locks all of buffer 3 while the
    // kernel runs).
    let n: u64 = 2048;
    let out = n * n * 4;
    for (id, bytes) in [(1, out), (2, out), (3, out + CHUNK_SIZE)] {
        assert_eq!(g.run(op::ALLOC, &[id, bytes]), status::OK);
    }
    g.mem.write_slice(&[7; 64], GuestAddress(DATA)).unwrap();
    assert_eq!(g.run(op::UPLOAD, &[3, out, DATA, 64]), status::OK);
    assert_eq!(g.run(op::UPLOAD, &[1, 0, DATA, 64]), status::OK);
    let (_, base) = g
        .accel
        .replayer()
        .start_capture(CaptureLimits::default(), None);
    let last = ChunkId::new(3, out / CHUNK_SIZE);
    assert_eq!(base, vec![ChunkId::new(1, 0), last]);
    let launch = g.submit(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]);
    // Then the chunk read live below is overwritten, maybe while it is read: the read
    // still gives it as it was at the boundary.
    g.mem
        .write_slice(&[9; 64], GuestAddress(DATA + 4096))
        .unwrap();
    g.submit(op::UPLOAD, &[3, out, DATA + 4096, 64]);
    // In the kernel (which then takes buffer 3's lock), whatever the load: a time alone
    // could pass before the device thread ran, and the read below would not wait.
    faults.wait_launched(1);
    std::thread::sleep(Duration::from_millis(20));
    let g = Arc::new(g);
    let (reader, read) = (g.clone(), Arc::new(AtomicBool::new(false)));
    let done = read.clone();
    let waiting = std::thread::spawn(move || {
        let mut chunk = Vec::new();
        assert!(reader
            .accel
            .replayer()
            .read_base_chunk(last, &mut chunk)
            .unwrap());
        done.store(true, Ordering::SeqCst);
        chunk
    });
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.tail() <= launch, "the matmul still runs");
    let mut chunk = Vec::new();
    assert!(g
        .accel
        .replayer()
        .read_base_chunk(ChunkId::new(1, 0), &mut chunk)
        .unwrap());
    assert!(
        !read.load(Ordering::SeqCst),
        "a base read of buffer 1 waited for one of buffer 3, which waits for the kernel"
    );
    assert_eq!(&chunk[..64], &[7; 64]);
    let chunk = waiting.join().unwrap();
    assert_eq!(&chunk[..64], &[7; 64]);
    g.wait_tail(launch + 2);
    let mut now = Vec::new();
    assert!(g.accel.read_chunk(last, &mut now).is_some());
    assert_eq!(&now[..64], &[9; 64]);
    g.accel.replayer().stop_capture();
}

/// Buffers 1 to 3 for [`long_attention`]: queries and output of 2040 heads of 64, and a
/// cache of 2^17 positions (keys and values both), 33 MiB in all.
fn alloc_long_attention(g: &mut FakeGuest) {
    for (id, bytes) in [
        (1, 2040 * 64 * 4),
        (2, (1 << 17) * 64 * 4),
        (3, 2040 * 64 * 4),
    ] {
        assert_eq!(g.run(op::ALLOC, &[id, bytes]), status::OK);
    }
}

/// An ATTENTION just under `MAX_LAUNCH_WORK` (64² a score): one query row of 2040 heads
/// over 2^17 positions, 2.7·10^8 scores, on [`alloc_long_attention`]'s buffers. On one
/// thread it takes about 26 s (10 M scores/s); each head, a task, about 13 ms.
fn long_attention() -> [u64; 10] {
    [kernel::ATTENTION, 1, 2, 2, 3, 1, 2040, 1, 64, (1 << 17) - 1]
}

#[test]
fn an_abort_ends_the_device_without_waiting_for_a_kernel_of_minutes() {
    use ferry_accel::replay::{CaptureError, CaptureLimits, DigestError};
    for how in ["abort", "drop"] {
        let faults = Faults::default();
        let mut g = FakeGuest::on(Faulty::watched(&faults), no_files());
        alloc_long_attention(&mut g);
        g.accel.start_dirty_tracking();
        let replayer = g.accel.replayer();
        replayer.start_capture(CaptureLimits::default(), None);
        let launch = g.submit(op::LAUNCH, &long_attention());
        // Queued behind it: never runs, the device being ended.
        g.submit(op::FENCE, &[7]);
        // Ended once its thread is in the kernel (ended before, it would not run it).
        faults.wait_launched(1);
        assert!(g.tail() <= launch, "the kernel is still running");
        let g = Arc::new(Mutex::new(Some(g)));
        let ending = g.clone();
        let started = Instant::now();
        let took = within(Duration::from_secs(20), move || {
            let mut g = ending.lock().unwrap();
            match how {
                "abort" => g.as_ref().unwrap().accel.abort(),
                _ => drop(g.take()),
            }
            started.elapsed()
        });
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(2)),
            "{how}: the device ended after {took:?} (the kernel alone takes about 26 s)"
        );
        eprintln!(
            "{how}: the device ended {:?} after it was asked to",
            took.unwrap_or_default()
        );
        let Some(g) = g.lock().unwrap().take() else {
            continue;
        };
        assert!(g.accel.is_dead());
        // The command cut short failed, its output marked written (a migration of the
        // dead device would send it); the one queued behind it did not run.
        assert_eq!(g.tail(), launch + 1);
        assert_eq!(g.status(launch), status::DEVICE_ERROR);
        let dirty = g.accel.take_dirty_chunks();
        assert!(dirty.iter().any(|c| c.buffer == 3), "{dirty:?}");
        assert!(dirty.iter().all(|c| c.buffer == 3), "{dirty:?}");
        // A migration learns it from the capture and the digest.
        assert_eq!(
            replayer.take_log(),
            Err(CaptureError::Unreplayable { opcode: op::LAUNCH })
        );
        assert_eq!(g.accel.digest(), Err(DigestError::DeviceGone));
        // A pause and a vCPU's wait return at once.
        g.accel.pause();
        let waited = Instant::now();
        g.accel.wait_idle(Duration::from_secs(10));
        assert!(waited.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn a_pause_still_waits_for_the_kernel_and_a_backend_that_cannot_abort_finishes_it() {
    // A pause (a migration's, a snapshot's) waits for the kernel: its result is the VM's.
    let faults = Faults::default();
    let mut g = FakeGuest::on(Faulty::watched(&faults), no_files());
    let n = g.alloc_long_matmul();
    let launch = g.submit(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]);
    // Paused once its thread is in the kernel (paused before, it would not run it).
    faults.wait_launched(1);
    assert!(g.tail() <= launch, "the matmul is still running");
    g.accel.pause();
    assert_eq!(g.tail(), launch + 1);
    assert_eq!(g.status(launch), status::OK);
    // A backend without a switch (a GPU's) is ended once its kernel is done.
    let faults = Faults::default();
    let mut g = FakeGuest::on(Faulty::boxed(&faults, true), no_files());
    let n = g.alloc_long_matmul();
    let launch = g.submit(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]);
    faults.wait_launched(1);
    assert!(g.tail() <= launch, "the matmul is still running");
    g.accel.abort();
    assert!(g.accel.is_dead());
    assert_eq!(g.tail(), launch + 1);
    assert_eq!(g.status(launch), status::OK);
}

/// n of the n×n×n MATMULs [`keep_ring_full`] runs: each takes tens of milliseconds on
/// one thread.
const FEED_N: u64 = 768;

/// A guest that keeps its ring full of MATMULs writing buffer 3 back to back (buffers 1
/// to 3, allocated here), on a thread of its own until `stop` is set; the thread
/// returns the guest and how many it submitted. A hostile guest does this to hold up
/// whoever waits for the device between two commands.
fn keep_ring_full(
    mut g: FakeGuest,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(FakeGuest, u64)> {
    let n = FEED_N;
    for id in 1..=3 {
        assert_eq!(g.run(op::ALLOC, &[id, n * n * 4]), status::OK);
    }
    std::thread::spawn(move || {
        let mut fed = 0;
        while !stop.load(Ordering::SeqCst) {
            // Refilled by halves: its doorbells, rare, leave the device's locks alone.
            if g.head - g.tail() < RING_SLOTS / 2 {
                while g.head - g.tail() < RING_SLOTS - 1 {
                    g.submit(op::LAUNCH, &[kernel::MATMUL, 1, 2, 3, n, n, n, 0]);
                    fed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (g, fed)
    })
}

/// How many commands the device completed (its ring's tail in `mem`, read before and
/// after) while `f` ran on a thread of its own, and how long `f` took; `None` if it had
/// not returned within a minute: a watchdog, so that a test fails instead of hanging
/// (see [`within`]). A count, unlike a time, does not grow with the machine's load.
fn completed_during(mem: &GuestRam, f: impl FnOnce() + Send + 'static) -> Option<(u64, Duration)> {
    let mem = mem.clone();
    within(Duration::from_secs(60), move || {
        let before = tail_in(&mem);
        let started = Instant::now();
        f();
        let took = started.elapsed();
        (tail_in(&mem) - before, took)
    })
}

/// The most commands one wait between two commands sees completed: the one in flight
/// when it asks, and the next if it asks just as that one ends (after the tail was read).
const ONE_COMMAND: u64 = 2;

/// Stops the guest's `feeder`, then checks that each of `waits` (the commands that ended
/// during each of `what`, and how long it took) is at most [`ONE_COMMAND`].
fn each_waited_one_command(
    what: &str,
    waits: &[Option<(u64, Duration)>],
    stop: &AtomicBool,
    feeder: std::thread::JoinHandle<(FakeGuest, u64)>,
) {
    stop.store(true, Ordering::SeqCst);
    let (g, fed) = feeder.join().unwrap();
    eprintln!(
        "{what} waited for (commands, time) {waits:?}; {} of {fed} commands ran",
        g.tail()
    );
    assert!(
        waits
            .iter()
            .all(|w| w.is_some_and(|(n, _)| n <= ONE_COMMAND)),
        "{what} waited for (commands, time) {waits:?}: one waited for many"
    );
}

#[test]
fn a_capture_starts_and_stops_within_a_command_while_the_guest_keeps_its_ring_full() {
    use ferry_accel::replay::CaptureLimits;
    let g = FakeGuest::new(1);
    let mem = g.mem.clone();
    let replayer = g.accel.replayer();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = keep_ring_full(g, stop.clone());
    std::thread::sleep(Duration::from_millis(100));
    // Each start and stop waits for one command; waiting until this thread wins a race
    // for the core lock against the device thread, several waited for many. A start and
    // stop of which one saw more is measured again, up to twice, as chunk reads are
    // below: on a loaded machine this thread can be held off the core between reading
    // the ring's tail and asking for the lock.
    let mut waits = Vec::new();
    let mut logged = 0;
    for _ in 0..5 {
        let mut pair = [None, None];
        for _ in 0..3 {
            let starting = replayer.clone();
            pair = [
                completed_during(&mem, move || {
                    starting.start_capture(CaptureLimits::default(), None);
                }),
                None,
            ];
            if pair[0].is_none() {
                break;
            }
            // Logged: a command completed after the capture started (it is logged before
            // its completion is published), however long commands take on this machine.
            let since = tail_in(&mem);
            let deadline = Instant::now() + Duration::from_secs(60);
            while tail_in(&mem) <= since {
                assert!(
                    Instant::now() < deadline,
                    "the device ran no command in a minute"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            logged += replayer.take_log().map_or(0, |log| log.len());
            let stopping = replayer.clone();
            pair[1] = completed_during(&mem, move || {
                stopping.stop_capture();
            });
            if pair.iter().all(|w| w.is_none_or(|(n, _)| n <= ONE_COMMAND)) {
                break;
            }
            eprintln!(
                "a capture's start and stop waited for (commands, time) {pair:?}: measured again"
            );
        }
        waits.extend(pair);
        if waits.iter().any(Option::is_none) {
            break;
        }
    }
    each_waited_one_command("capture starts and stops", &waits, &stop, feeder);
    assert!(logged > 0, "the captures logged the guest's commands");
}

#[test]
fn a_chunk_read_waits_for_one_kernel_while_the_guest_writes_its_buffer_back_to_back() {
    let g = FakeGuest::new(1);
    let mem = g.mem.clone();
    let tracker = g.accel.tracker();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = keep_ring_full(g, stop.clone());
    std::thread::sleep(Duration::from_millis(100));
    // Each read waits for the kernel writing buffer 3 at most (and one more, asked just
    // as it ended); waiting until this thread wins a race for the buffer's lock against
    // the device thread, several waited for many, read after read. A read that saw more
    // is measured again, up to twice: on a loaded machine the reading thread can be held
    // off the core between reading the ring's tail and asking for the lock (once, while
    // a build ran alongside, a read saw three).
    let mut waits = Vec::new();
    for _ in 0..20 {
        let mut read = None;
        for _ in 0..3 {
            let reader = tracker.clone();
            read = completed_during(&mem, move || {
                assert!(reader
                    .read_chunk(ChunkId::new(3, 0), &mut Vec::new())
                    .is_some());
            });
            if read.is_none_or(|(n, _)| n <= ONE_COMMAND) {
                break;
            }
            eprintln!("a chunk read waited for (commands, time) {read:?}: measured again");
        }
        waits.push(read);
        if read.is_none() {
            break;
        }
    }
    each_waited_one_command("chunk reads", &waits, &stop, feeder);
}

/// Depth of [`deep_matmul`]: one operand of 4 GiB that the test never writes, so the
/// kernel reads the host's zero pages and takes no memory.
const DEEP_K: u64 = 1 << 30;

/// A MATMUL of one row by one column (buffer 1 by itself), [`DEEP_K`] deep, into buffer
/// 2: one tile, one task. On one thread it took 28 s where this was written.
fn deep_matmul() -> [u64; 8] {
    [kernel::MATMUL, 1, 1, 2, 1, 1, DEEP_K, 0]
}

#[test]
fn an_abort_ends_a_matmul_of_one_element_billions_deep_within_its_one_tile() {
    let faults = Faults::default();
    let mut g = FakeGuest::sized(
        Faulty::watched(&faults),
        no_files(),
        DEEP_K * 4 + CHUNK_SIZE,
    );
    assert_eq!(g.run(op::ALLOC, &[1, DEEP_K * 4]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, 4]), status::OK);
    g.accel.start_dirty_tracking();
    let launch = g.submit(op::LAUNCH, &deep_matmul());
    faults.wait_launched(1);
    // Into its tile: a launch checks the switch before it begins, which would end it
    // whatever its tiles do.
    std::thread::sleep(Duration::from_millis(300));
    assert!(g.tail() <= launch, "the kernel is still running");
    let g = Arc::new(g);
    let ending = g.clone();
    let started = Instant::now();
    let took = within(Duration::from_secs(20), move || {
        ending.accel.abort();
        started.elapsed()
    });
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(2)),
        "the device ended after {took:?} (the kernel alone takes about 28 s)"
    );
    eprintln!(
        "the device ended {:?} after it was asked to",
        took.unwrap_or_default()
    );
    assert!(g.accel.is_dead());
    assert_eq!(g.tail(), launch + 1);
    assert_eq!(g.status(launch), status::DEVICE_ERROR);
    assert_eq!(g.accel.take_dirty_chunks(), vec![ChunkId::new(2, 0)]);
}

/// Elements of the operand of [`replayed_matmul`].
const REPLAYED_K: u64 = 1 << 26;

/// A guest of a one-thread device with buffer 1 of [`REPLAYED_K`] random values and
/// buffer 2 of one, for [`replayed_matmul`].
fn replayed_matmul_guest() -> FakeGuest {
    let backend = backend::create(backend::CPU, 1, &DeviceMemory::default()).unwrap();
    let mut g = FakeGuest::sized(backend, no_files(), REPLAYED_K * 4 + CHUNK_SIZE);
    assert_eq!(g.run(op::ALLOC, &[1, REPLAYED_K * 4]), status::OK);
    assert_eq!(g.run(op::ALLOC, &[2, 4]), status::OK);
    let fill = backend::uniform_fill(1, REPLAYED_K as usize, 5).encode();
    assert_eq!(g.run(op::LAUNCH, &fill), status::OK);
    g
}

/// Buffer 1 (one row) by itself (one column) into buffer 2: one tile of seconds.
fn replayed_matmul() -> [u64; 8] {
    [kernel::MATMUL, 1, 1, 2, 1, 1, REPLAYED_K, 0]
}

#[test]
fn a_replayed_kernel_still_running_at_the_deadline_is_cut_short_and_in_time_gives_the_same_bits() {
    let mut source = replayed_matmul_guest();
    let ran = Instant::now();
    assert_eq!(source.run(op::LAUNCH, &replayed_matmul()), status::OK);
    let whole = ran.elapsed();
    source.accel.pause();
    let want = source.accel.digest().unwrap();

    let dest = replayed_matmul_guest();
    dest.accel.pause();
    dest.accel.start_dirty_tracking();
    let log = vec![LoggedCommand {
        opcode: op::LAUNCH,
        args: replayed_matmul().to_vec(),
        payload: Vec::new(),
        status: status::OK,
    }];
    // A deadline an eighth into the kernel, whatever the backend's speed (an H200 runs it
    // in 0.2 s, a CPU in seconds).
    let started = Instant::now();
    let cut = dest.accel.replay(log.clone(), started + whole / 8);
    let took = started.elapsed();
    eprintln!("the kernel took {whole:?} run whole; its replay was cut after {took:?}");
    assert_eq!(
        cut,
        Err(ReplayError::DeadlinePassed {
            index: 0,
            opcode: op::LAUNCH
        })
    );
    assert!(
        took < whole / 2,
        "cut after {took:?}; run whole, the kernel takes {whole:?}"
    );
    // Its output is marked written, as an aborted kernel's is.
    assert_eq!(dest.accel.take_dirty_chunks(), vec![ChunkId::new(2, 0)]);
    refuses_torn_memory(
        &dest,
        TornMemory {
            index: 0,
            opcode: op::LAUNCH,
        },
    );

    // With time enough, a destination runs the kernel whole, and gives the source's bits.
    let mut dest = replayed_matmul_guest();
    dest.accel.pause();
    assert_eq!(dest.accel.replay(log, far()), Ok(()));
    assert_eq!(dest.accel.digest().unwrap(), want);
    // A replay whose deadline passed before its first command runs none, and leaves the
    // memory as it was (not torn: it is at a boundary of the source's commands). Its
    // deadline went with it: the guest's own kernels after it are not cut short.
    let short = [kernel::MATMUL, 1, 1, 2, 1, 1, 4096, 0];
    let late = vec![LoggedCommand {
        opcode: op::LAUNCH,
        args: short.to_vec(),
        payload: Vec::new(),
        status: status::OK,
    }];
    let ran_out = ReplayError::OutOfTime { index: 0, total: 1 };
    assert_eq!(dest.accel.replay(late, Instant::now()), Err(ran_out));
    assert_eq!(dest.accel.digest().unwrap(), want);
    dest.accel.resume().unwrap();
    assert_eq!(dest.run(op::LAUNCH, &short), status::OK);
}

/// Checks that `g`'s device, whose memory a replay left `torn`, refuses whatever would
/// take that memory for the source's: a digest, more replay, a capture, a saved state,
/// running the guest.
fn refuses_torn_memory(g: &FakeGuest, torn: TornMemory) {
    use ferry_accel::replay::{CaptureError, CaptureLimits, DigestError};
    assert_eq!(g.accel.digest(), Err(DigestError::Torn(torn)));
    assert_eq!(
        g.accel.replay(Vec::new(), far()),
        Err(ReplayError::Torn(torn))
    );
    let replayer = g.accel.replayer();
    replayer.start_capture(CaptureLimits::default(), None);
    assert_eq!(replayer.take_log(), Err(CaptureError::Torn(torn)));
    replayer.stop_capture();
    assert_eq!(g.accel.save_state(), Err(torn));
    assert_eq!(g.accel.resume(), Err(torn));
    // Not dead: it is ended as any device is.
    assert!(!g.accel.is_dead());
    g.accel.abort();
    assert!(g.accel.is_dead());
}

#[test]
fn a_replayed_file_load_that_fails_midway_here_leaves_the_device_torn() {
    let files = MemFiles {
        files: vec![Vec::new(), Vec::new(), vec![5; 3 << 20]],
    };
    let mut dest = FakeGuest::with_files(2, Arc::new(files));
    assert_eq!(dest.run(op::ALLOC, &[1, 2 << 20]), status::OK);
    dest.accel.pause();
    // The source loaded 2 MiB of file 2; here its first MiB loads, then the read fails.
    let log = vec![LoggedCommand {
        opcode: op::LOAD_FILE,
        args: vec![1, 0, 2, 0, 2 << 20],
        payload: Vec::new(),
        status: status::OK,
    }];
    assert_eq!(
        dest.accel.replay(log, far()),
        Err(ReplayError::FailedMidway {
            index: 0,
            opcode: op::LOAD_FILE,
            expected: status::OK,
            got: status::DEVICE_ERROR,
        })
    );
    refuses_torn_memory(
        &dest,
        TornMemory {
            index: 0,
            opcode: op::LOAD_FILE,
        },
    );
}

/// Bytes of the slow copies: 32 MiB.
const SLOW_COPY: u64 = 32 << 20;

/// Milliseconds a MiB of a slow copy takes: the whole takes at least 1.6 s.
const SLOW_MIB_MS: u64 = 50;

/// How long a whole slow copy takes at least.
fn slow_copy_time() -> Duration {
    Duration::from_millis(SLOW_MIB_MS * (SLOW_COPY >> 20))
}

/// A guest of a one-thread cpu device whose copies are slow ([`SLOW_MIB_MS`]), with
/// buffer 1 of [`SLOW_COPY`] bytes and, attached, file 0 of as many, and dirty tracking
/// on.
fn slow_copy_guest(faults: &Faults) -> FakeGuest {
    let file: Vec<u8> = (0..SLOW_COPY).map(|i| (i * 7 + i / 4099) as u8).collect();
    let files = Arc::new(MemFiles { files: vec![file] });
    let mut g = FakeGuest::on(Faulty::watched(faults), files);
    assert_eq!(g.run(op::ALLOC, &[1, SLOW_COPY]), status::OK);
    g.accel.start_dirty_tracking();
    faults.copy_delay_ms.store(SLOW_MIB_MS, Ordering::SeqCst);
    g
}

/// Every chunk of the first `bytes` bytes of buffer `id`.
fn chunks_of(id: u32, bytes: u64) -> Vec<ChunkId> {
    (0..bytes.div_ceil(CHUNK_SIZE))
        .map(|index| ChunkId::new(id, index))
        .collect()
}

#[test]
fn an_abort_ends_an_upload_a_download_or_a_file_load_between_two_pieces() {
    for (opcode, args) in [
        (op::UPLOAD, [1, 0, DATA, SLOW_COPY, 0]),
        (op::DOWNLOAD, [1, 0, DATA, SLOW_COPY, 0]),
        (op::LOAD_FILE, [1, 0, 0, 0, SLOW_COPY]),
    ] {
        let faults = Faults::default();
        let mut g = slow_copy_guest(&faults);
        let copy = g.submit(opcode, &args);
        // Ended once its thread is in the copy (ended before, it would not run it).
        faults.wait_copied(1);
        assert!(g.tail() <= copy, "the copy is still running");
        let g = Arc::new(g);
        let ending = g.clone();
        let started = Instant::now();
        let took = within(Duration::from_secs(20), move || {
            ending.accel.abort();
            started.elapsed()
        });
        let whole = slow_copy_time();
        eprintln!("opcode {opcode}: the device ended {took:?} after it was asked to (the copy alone takes {whole:?})");
        assert!(
            took.is_some_and(|t| t < whole / 4),
            "opcode {opcode}: the device ended after {took:?}; the copy alone takes {whole:?}"
        );
        // The rest of the copy was not made.
        let pieces = faults.copied.load(Ordering::SeqCst);
        assert!(
            pieces < SLOW_COPY >> 22,
            "opcode {opcode}: {pieces} pieces copied"
        );
        assert!(g.accel.is_dead());
        assert_eq!(g.tail(), copy + 1);
        assert_eq!(g.status(copy), status::DEVICE_ERROR);
        // What the copy into the buffer may have written is marked, as for a kernel: an
        // upload's range, a file load's pieces.
        let written = match opcode {
            op::UPLOAD => chunks_of(1, SLOW_COPY),
            op::LOAD_FILE => chunks_of(1, pieces << 20),
            _ => Vec::new(),
        };
        assert!(g.accel.take_dirty_chunks() == written, "opcode {opcode}");
    }
}

#[test]
fn an_abort_ends_an_upload_of_gigabytes_within_a_few_pieces() {
    // Guest RAM the test never writes: the upload reads the host's zero pages, and the
    // device's buffer takes memory only as far as the upload gets.
    const BIG: u64 = 4 << 30;
    let faults = Faults::default();
    let mut g = FakeGuest::with_ram(
        Faulty::watched(&faults),
        no_files(),
        BIG + CHUNK_SIZE,
        DATA + BIG,
    );
    assert_eq!(g.run(op::ALLOC, &[1, BIG]), status::OK);
    let upload = g.submit(op::UPLOAD, &[1, 0, DATA, BIG]);
    faults.wait_copied(1);
    let g = Arc::new(g);
    let ending = g.clone();
    let (copying, started) = (faults.copied.clone(), Instant::now());
    let ended = within(Duration::from_secs(60), move || {
        let before = copying.load(Ordering::SeqCst);
        ending.accel.abort();
        (started.elapsed(), copying.load(Ordering::SeqCst) - before)
    });
    let (took, pieces) = ended.expect("the device ended within a minute");
    eprintln!("the device ended {took:?} after it was asked to, {pieces} MiB pieces later");
    // Counted from the pull, not from a time or from when this thread last ran (both
    // grow with the machine's load): at most the piece whose check just preceded it.
    // Uncut, the upload copies all 4096.
    let after_pull = faults.copied_once_stopped.load(Ordering::SeqCst);
    assert!(after_pull <= 1, "{after_pull} pieces begun after the abort");
    assert!(pieces < 4096, "the upload ran to its end");
    assert_eq!(g.status(upload), status::DEVICE_ERROR);
}

#[test]
fn a_replayed_upload_still_running_at_the_deadline_is_cut_short_and_an_abort_ends_one() {
    let payload: Vec<u8> = (0..SLOW_COPY).map(|i| (i / 3) as u8).collect();
    let log = vec![LoggedCommand {
        opcode: op::UPLOAD,
        args: vec![1, 0, DATA, SLOW_COPY],
        payload,
        status: status::OK,
    }];
    let whole = slow_copy_time();
    // Past its deadline.
    let faults = Faults::default();
    let dest = slow_copy_guest(&faults);
    dest.accel.pause();
    // Room for a loaded machine to start the replay before its deadline (one past it
    // before the upload begins tears nothing), well short of the 1.6 s the upload takes.
    let copy = log.clone();
    let started = Instant::now();
    let cut = dest
        .accel
        .replay(copy, started + Duration::from_millis(300));
    let took = started.elapsed();
    eprintln!("the upload takes {whole:?} whole; its replay was cut after {took:?}");
    assert_eq!(
        cut,
        Err(ReplayError::DeadlinePassed {
            index: 0,
            opcode: op::UPLOAD
        })
    );
    assert!(
        took < whole / 2,
        "cut after {took:?}; whole, it takes {whole:?}"
    );
    // Its range is marked written, as a cut kernel's outputs are.
    assert_eq!(dest.accel.take_dirty_chunks(), chunks_of(1, SLOW_COPY));
    refuses_torn_memory(
        &dest,
        TornMemory {
            index: 0,
            opcode: op::UPLOAD,
        },
    );

    // Ended meanwhile: the replay stops as the device goes.
    let faults = Faults::default();
    let dest = Arc::new(slow_copy_guest(&faults));
    dest.accel.pause();
    let replaying = dest.clone();
    let replay = std::thread::spawn(move || {
        let started = Instant::now();
        (replaying.accel.replay(log, far()), started.elapsed())
    });
    faults.wait_copied(1);
    dest.accel.abort();
    let (ended, took) = replay.join().unwrap();
    eprintln!("the replayed upload ended {took:?} after it began, ended by an abort");
    assert_eq!(ended, Err(ReplayError::DeviceGone));
    assert!(
        took < whole / 2,
        "ended after {took:?}; whole, it takes {whole:?}"
    );
}

#[test]
fn uploads_downloads_and_replayed_uploads_of_many_pieces_keep_every_byte() {
    // 2.5 MiB and 12 bytes, at byte 12 of the buffer: pieces that straddle chunks.
    let (offset, len) = (12u64, (5u64 << 19) + 12);
    let data: Vec<u8> = (0..len).map(|i| (i * 13 + i / 1021) as u8).collect();
    let mut g = FakeGuest::new(1);
    assert_eq!(g.run(op::ALLOC, &[1, 3 << 20]), status::OK);
    g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let upload = [1, offset, DATA, len];
    assert_eq!(g.run(op::UPLOAD, &upload), status::OK);
    let back = DATA + (4 << 20);
    assert_eq!(g.run(op::DOWNLOAD, &[1, offset, back, len]), status::OK);
    let mut got = vec![0u8; len as usize];
    g.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert!(got == data, "a download gives back what was uploaded");
    g.accel.pause();
    let want = g.accel.digest().unwrap();
    // Replayed whole, the upload gives the same device memory.
    let dest = FakeGuest::new(1);
    dest.accel.pause();
    dest.accel.sync_buffers(&g.accel.buffer_table()).unwrap();
    let log = vec![LoggedCommand {
        opcode: op::UPLOAD,
        args: upload.to_vec(),
        payload: data,
        status: status::OK,
    }];
    assert_eq!(dest.accel.replay(log, far()), Ok(()));
    assert_eq!(dest.accel.digest().unwrap(), want);
}

#[test]
fn a_replay_queued_behind_one_cut_short_is_refused_not_left_waiting() {
    let faults = Faults::default();
    let dest = Arc::new(slow_copy_guest(&faults));
    dest.accel.pause();
    let log = vec![LoggedCommand {
        opcode: op::UPLOAD,
        args: vec![1, 0, DATA, SLOW_COPY],
        payload: vec![7; SLOW_COPY as usize],
        status: status::OK,
    }];
    let first = dest.clone();
    // Room for a loaded machine to start it: the upload takes 1.6 s whole.
    let deadline = Instant::now() + Duration::from_millis(500);
    let cut = std::thread::spawn(move || first.accel.replay(log, deadline));
    // Queued while the first runs (it waits for the device thread, which is in the copy).
    faults.wait_copied(1);
    let second = dest.clone();
    let queued = within(Duration::from_secs(20), move || {
        second.accel.replay(Vec::new(), far())
    });
    let torn = TornMemory {
        index: 0,
        opcode: op::UPLOAD,
    };
    assert_eq!(
        cut.join().unwrap(),
        Err(ReplayError::DeadlinePassed {
            index: 0,
            opcode: op::UPLOAD
        })
    );
    assert_eq!(queued, Some(Err(ReplayError::Torn(torn))));
}
