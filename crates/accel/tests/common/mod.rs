//! A fake guest that drives the device through its ring the way the SDK does (plain
//! guest memory, no KVM), shared by the device's integration tests.
// Each test file uses part of it.
#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_abi::accel::{kernel, op, status, RingHeader, COMMAND_SIZE, RING_SLOTS};
use ferry_abi::PAGE_SIZE;
use ferry_accel::backend::cuda::emulator::Emulator;
use ferry_accel::backend::cuda::GpuBackend;
use ferry_accel::backend::{self, Backend, DeviceMemory};
use ferry_accel::device::Accelerator;
use ferry_accel::files::{no_files, FileSource};
use ferry_accel::ring::GuestRam;
use vm_memory::{Address, Bytes, GuestAddress};

pub const RAM: u64 = 64 << 20;
pub const RING: u64 = ferry_abi::IMAGE_BASE;
/// Guest scratch area for upload/download data.
pub const DATA: u64 = 0x20_0000;
pub const CAPACITY: u64 = 64 << 20;

/// A guest that submits commands the way the SDK does.
pub struct FakeGuest {
    pub mem: GuestRam,
    pub accel: Accelerator,
    pub head: u64,
}

/// A replay deadline no test reaches.
pub fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

pub fn field(offset: usize) -> GuestAddress {
    GuestAddress(RING + offset as u64)
}

/// The ring's tail in guest memory `mem` (read whole, as another thread writes it): how
/// many commands the device has completed.
pub fn tail_in(mem: &GuestRam) -> u64 {
    mem.load(
        field(std::mem::offset_of!(RingHeader, tail)),
        Ordering::Acquire,
    )
    .unwrap()
}

/// The cuda backend's kernels emulated on the CPU, compiled once per test process.
pub fn emulated() -> Box<dyn Backend> {
    static EMULATOR: OnceLock<Arc<Emulator>> = OnceLock::new();
    let emulator = EMULATOR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("scratch folder");
        Arc::new(
            Emulator::build(dir.path())
                .unwrap_or_else(|e| panic!("{}", ferry_migrate::error_chain(&e))),
        )
    });
    Box::new(GpuBackend::new(emulator.clone(), "cuda-emulated"))
}

/// Every backend the hostile-guest tests run on: the cpu backend with `threads`
/// threads, the cuda backend's kernels emulated on the CPU, and the cuda backend on a
/// GPU where this host has one (`tests/cuda.rs` says loudly when it has none).
pub fn backends(threads: usize) -> Vec<Box<dyn Backend>> {
    let mut all = vec![
        backend::create(backend::CPU, threads, &DeviceMemory::default()).unwrap(),
        emulated(),
    ];
    if backend::cuda_kind().is_ok() {
        all.extend(backend::create("cuda", threads, &DeviceMemory::default()));
    }
    all
}

/// Runs `check` on a fresh guest of a device on each of [`backends`], with the
/// backend's kind.
pub fn on_every_backend(threads: usize, check: impl Fn(&mut FakeGuest, &str)) {
    for backend in backends(threads) {
        let kind = backend.kind();
        check(&mut FakeGuest::on(backend, no_files()), kind);
    }
}

impl FakeGuest {
    pub fn new(threads: usize) -> Self {
        Self::with_files(threads, no_files())
    }

    pub fn with_files(threads: usize, files: Arc<dyn FileSource>) -> Self {
        Self::on(
            backend::create(backend::CPU, threads, &DeviceMemory::default()).unwrap(),
            files,
        )
    }

    /// A guest of a device on `backend`.
    pub fn on(backend: Box<dyn Backend>, files: Arc<dyn FileSource>) -> Self {
        Self::sized(backend, files, CAPACITY)
    }

    /// A guest of a device on `backend` with `capacity` bytes of device memory.
    pub fn sized(backend: Box<dyn Backend>, files: Arc<dyn FileSource>, capacity: u64) -> Self {
        Self::with_ram(backend, files, capacity, RAM)
    }

    /// A guest of `ram` bytes of RAM and a device on `backend` with `capacity` bytes of
    /// device memory.
    pub fn with_ram(
        backend: Box<dyn Backend>,
        files: Arc<dyn FileSource>,
        capacity: u64,
        ram: u64,
    ) -> Self {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), ram as usize)]).unwrap();
        let accel = Accelerator::boot(mem.clone(), RING, capacity, backend, files).unwrap();
        accel.resume().unwrap();
        Self {
            mem,
            accel,
            head: 0,
        }
    }

    pub fn header(&self, offset: usize) -> u64 {
        self.mem.read_obj(field(offset)).unwrap()
    }

    pub fn tail(&self) -> u64 {
        tail_in(&self.mem)
    }

    pub fn device_status(&self) -> u32 {
        self.mem
            .read_obj(field(std::mem::offset_of!(RingHeader, device_status)))
            .unwrap()
    }

    pub fn slot(index: u64) -> GuestAddress {
        GuestAddress(RING + PAGE_SIZE + (index % RING_SLOTS) * COMMAND_SIZE)
    }

    /// Submits without waiting; returns the command's index.
    pub fn submit(&mut self, opcode: u32, args: &[u64]) -> u64 {
        let index = self.publish(opcode, args);
        self.accel.doorbell();
        index
    }

    /// Writes a command and publishes it, ringing no doorbell (as the SDK does while the
    /// device is busy); returns its index.
    pub fn publish(&mut self, opcode: u32, args: &[u64]) -> u64 {
        let index = self.head;
        let mut bytes = vec![0u8; COMMAND_SIZE as usize];
        bytes[..4].copy_from_slice(&opcode.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            bytes[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        self.mem.write_slice(&bytes, Self::slot(index)).unwrap();
        self.head += 1;
        self.set_head(self.head);
        index
    }

    pub fn set_head(&self, head: u64) {
        self.mem
            .write_obj(head, field(std::mem::offset_of!(RingHeader, head)))
            .unwrap();
    }

    pub fn wait_tail(&self, tail: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tail() < tail {
            assert!(
                Instant::now() < deadline,
                "device stuck at tail {} < {tail}",
                self.tail()
            );
            self.accel.wait_idle(Duration::from_millis(1));
        }
    }

    pub fn status(&self, index: u64) -> u32 {
        self.mem
            .read_obj(Self::slot(index).unchecked_add(4))
            .unwrap()
    }

    /// Submits, waits for completion, returns the status.
    pub fn run(&mut self, opcode: u32, args: &[u64]) -> u32 {
        let index = self.submit(opcode, args);
        self.wait_tail(index + 1);
        self.status(index)
    }

    /// Queues `count` MATMULs of [`Self::alloc_long_matmul`]'s buffers (allocated
    /// first); returns the first one's index.
    pub fn queue_long_matmuls(&mut self, count: usize) -> u64 {
        let n = self.alloc_long_matmul();
        let launch = [kernel::MATMUL, 1, 2, 3, n, n, n, 0];
        let first = self.submit(op::LAUNCH, &launch);
        for _ in 1..count {
            self.submit(op::LAUNCH, &launch);
        }
        first
    }

    /// Allocates buffers 1 to 3 for an n×n×n MATMUL that takes hundreds of milliseconds
    /// (long enough to look around while it runs; the crate is optimized in every
    /// profile); returns n.
    pub fn alloc_long_matmul(&mut self) -> u64 {
        let n: u64 = 2048;
        for id in 1..=3 {
            assert_eq!(self.run(op::ALLOC, &[id, n * n * 4]), status::OK);
        }
        n
    }

    pub fn upload(&mut self, id: u64, values: &[f32]) -> u32 {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        self.run(op::UPLOAD, &[id, 0, DATA, bytes.len() as u64])
    }

    pub fn download(&mut self, id: u64, n: usize) -> Vec<f32> {
        assert_eq!(
            self.run(op::DOWNLOAD, &[id, 0, DATA, 4 * n as u64]),
            status::OK
        );
        let mut bytes = vec![0u8; 4 * n];
        self.mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
        bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// xorshift64: the tests' reproducible random numbers.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 for 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
