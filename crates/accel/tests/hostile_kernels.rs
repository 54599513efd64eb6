//! Random launches of every kernel on buffers of random bytes: no launch hurts the host
//! (the device thread lives on), and the results are the same bits whatever the
//! number of threads the backend runs on.

use ferry_abi::accel::op;
use ferry_accel::backend::{self, DeviceMemory};
use ferry_accel::files::no_files;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{FakeGuest, Rng, DATA};

const BUFFER: u64 = 256 << 10;

/// A guest of 16 MiB and a device of 8 MiB on the cpu backend with `threads` threads.
fn guest(threads: usize) -> FakeGuest {
    let cpu = backend::create(backend::CPU, threads, &DeviceMemory::default()).unwrap();
    FakeGuest::with_ram(cpu, no_files(), 8 << 20, 16 << 20)
}

/// A guest that ran `launches` random launches from `seed`, and their statuses.
fn session(threads: usize, seed: u64, launches: usize) -> (FakeGuest, Vec<u32>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut g = guest(threads);
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
            let len = |id: u32| (1..=8).contains(&id).then_some(BUFFER);
            if rng.below(10) == 0 || ferry_accel::kernel::Kernel::decode(&args, len).is_ok() {
                break;
            }
        }
        statuses.push(g.run(op::LAUNCH, &args));
    }
    (g, statuses)
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
        let (one, s1) = session(1, seed, 300);
        let (four, s4) = session(4, seed, 300);
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
