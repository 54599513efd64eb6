//! Random launches of every kernel on buffers of random bytes: no launch hurts the host
//! (the device thread lives on), the results are the same bits whatever the number of
//! threads the backend runs on, and `kernels.cu` (emulated on the CPU) gives the cpu
//! backend's statuses and bits. Run with `scripts/emulator-asan`, the emulated kernels'
//! every read and write is checked to stay inside device memory.

use std::ops::Range;

use ferry_abi::accel::kernel::{self, Kernel};
use ferry_abi::accel::{op, status};
use ferry_accel::backend::{self, Backend, DeviceMemory};
use ferry_accel::files::no_files;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{FakeGuest, Rng, DATA};

const BUFFER: u64 = 256 << 10;

/// The cpu backend with `threads` threads.
fn cpu(threads: usize) -> Box<dyn Backend> {
    backend::create(backend::CPU, threads, &DeviceMemory::default()).unwrap()
}

/// What a [`session`] is to be compared with.
#[derive(Clone, Copy, PartialEq)]
enum Against {
    /// The same backend on another number of threads: every launch, every bit.
    ThreadCounts,
    /// Another backend. MATMUL is left out: it agrees with the cpu backend within a bound,
    /// not in bits (the conformance test checks it), and what reads its result would
    /// differ too. Every NaN a launch writes is made the same NaN before anything reads
    /// it: which NaN an operation on NaNs gives is not IEEE's to say (the cpu backend's
    /// code, the C++ compiler's and a GPU's give different ones), and a later kernel may
    /// read those bits as half floats or blocks.
    Backends,
}

/// A guest of 16 MiB on `backend` (a device of 8 MiB) that ran `launches` random
/// launches from `seed`, and their statuses.
fn session(
    backend: Box<dyn Backend>,
    seed: u64,
    launches: usize,
    against: Against,
) -> (FakeGuest, Vec<u32>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut g = FakeGuest::with_ram(backend, no_files(), 8 << 20, 16 << 20);
    let mut statuses = Vec::new();
    for id in 1..=8u64 {
        g.run(op::ALLOC, &[id, BUFFER]);
        let data: Vec<u8> = (0..BUFFER)
            .map(|i| match rng.below(4) {
                0 => rng.next() as u8,
                1 => (i % 7) as u8,
                _ => 0x3f - (i % 4 == 3) as u8 * 0x30,
            })
            .collect();
        g.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        g.run(op::UPLOAD, &[id, 0, DATA, BUFFER]);
    }
    for _ in 0..launches {
        // Mostly launches that pass validation: they run the kernels.
        let mut args = Vec::new();
        for _ in 0..2000 {
            args = random_args(&mut rng);
            if against == Against::Backends && args[0] == kernel::MATMUL {
                continue;
            }
            if rng.below(10) == 0 || Kernel::decode(&args, buffer_len).is_ok() {
                break;
            }
        }
        let status = g.run(op::LAUNCH, &args);
        if against == Against::Backends && status == status::OK {
            let (_, access) = Kernel::decode(&args, buffer_len).expect("it ran");
            for (id, bytes) in access.writes() {
                one_nan(&mut g, id.into(), bytes);
            }
        }
        statuses.push(status);
    }
    (g, statuses)
}

/// The size of buffer `id` of a [`session`].
fn buffer_len(id: u32) -> Option<u64> {
    (1..=8).contains(&id).then_some(BUFFER)
}

/// Makes every NaN in `bytes` of buffer `id` (f32 words, or u32 ids far below a NaN's
/// bits) the one NaN `f32::NAN`.
fn one_nan(g: &mut FakeGuest, id: u64, bytes: Range<u64>) {
    let len = bytes.end - bytes.start;
    assert_eq!(
        g.run(op::DOWNLOAD, &[id, bytes.start, DATA, len]),
        status::OK
    );
    let mut words = vec![0u8; len as usize];
    g.mem.read_slice(&mut words, GuestAddress(DATA)).unwrap();
    for w in words.chunks_exact_mut(4) {
        if f32::from_le_bytes(w.try_into().unwrap()).is_nan() {
            w.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    g.mem.write_slice(&words, GuestAddress(DATA)).unwrap();
    assert_eq!(g.run(op::UPLOAD, &[id, bytes.start, DATA, len]), status::OK);
}

/// A launch's arguments: any of the kernels, mostly small ids, sizes and usual floats.
fn random_args(rng: &mut Rng) -> Vec<u64> {
    let kernel = 1 + rng.below(28);
    let mut args = vec![kernel];
    for _ in 0..14 {
        args.push(match rng.below(8) {
            0..=2 => 1 + rng.below(8),
            3 => rng.below(4),
            4 => 1 + rng.below(64),
            5 => 1 + rng.below(512),
            6 => u64::from(f32::to_bits(
                [0.5f32, 1e-5, 0.9, 10000.0][rng.below(4) as usize],
            )),
            _ => rng.below(16),
        });
    }
    args
}

#[test]
fn random_launches_of_every_kernel_hurt_nothing_and_agree_across_thread_counts() {
    for seed in 1..=20u64 {
        let (one, s1) = session(cpu(1), seed, 300, Against::ThreadCounts);
        let (four, s4) = session(cpu(4), seed, 300, Against::ThreadCounts);
        assert_eq!(s1, s4, "seed {seed}: statuses");
        one.accel.pause();
        four.accel.pause();
        assert_eq!(
            one.accel.digest().unwrap(),
            four.accel.digest().unwrap(),
            "seed {seed}"
        );
    }
}

/// Where `a` and `b`'s buffers first differ.
fn first_difference(a: &mut FakeGuest, b: &mut FakeGuest) -> Option<String> {
    let words = (BUFFER / 4) as usize;
    for id in 1..=8u64 {
        let (x, y) = (a.download(id, words), b.download(id, words));
        if let Some(at) = (x.iter().zip(&y)).position(|(p, q)| p.to_bits() != q.to_bits()) {
            let (p, q) = (x[at].to_bits(), y[at].to_bits());
            return Some(format!(
                "buffer {id}, word {at}: {p:#010x} against {q:#010x}"
            ));
        }
    }
    None
}

#[test]
fn random_launches_give_the_emulated_kernels_the_cpu_backends_statuses_and_bits() {
    for seed in 1..=8u64 {
        let (mut cpu, on_cpu) = session(cpu(2), seed, 300, Against::Backends);
        let (mut emulated, on_emulated) = session(common::emulated(), seed, 300, Against::Backends);
        assert_eq!(on_cpu, on_emulated, "seed {seed}: statuses");
        let ran = on_cpu.iter().filter(|&&s| s == status::OK).count();
        assert!(ran > 100, "seed {seed}: only {ran} launches ran");
        if let Some(difference) = first_difference(&mut cpu, &mut emulated) {
            panic!("seed {seed}: device memory differs at {difference}");
        }
    }
}
