//! The engine's own cost, without a VM: a paused in-memory VM of 256 MiB of device
//! memory (and a little RAM) sent stop-and-copy over loopback to an in-memory target,
//! with 1, 2 and 4 data streams, against the loopback's raw TCP rate measured in the
//! same run. `cargo bench -p ferry-migrate --bench transfer` prints each figure as the
//! median of five runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_migrate::vm::{MAX_CHUNK_BYTES, PAGE_SIZE};
use ferry_migrate::{
    migrate_vm, serve, ChunkKey, DeviceBuffer, MigrationOptions, MigrationSource, MigrationTarget,
    Mode, PageSet, ReceiveReport, Secret, TargetFactory, VmDescription, VmError,
};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const BUFFER: u64 = 16 * MIB;
const BUFFERS: u32 = 16;
const RUNS: usize = 5;

/// A paused VM whose device memory is `BUFFERS` buffers of non-zero bytes.
struct StillVm {
    ram: Vec<u8>,
    buffers: Vec<Vec<u8>>,
}

impl StillVm {
    fn new() -> Self {
        let mut ram = vec![0u8; RAM as usize];
        ram[..MIB as usize].fill(7);
        let buffers = (0..BUFFERS)
            .map(|b| (0..BUFFER).map(|i| (i as u8) ^ (b as u8) | 1).collect())
            .collect();
        Self { ram, buffers }
    }
}

fn description() -> VmDescription {
    VmDescription {
        name: "bench".into(),
        ram_size: RAM,
        vcpus: 1,
        accel_memory: u64::from(BUFFERS) * BUFFER,
        abi_version: 1,
        state_version: 1,
        backend_kind: "cpu".into(),
        kernel_version: 1,
        microkernel: String::new(),
        extra: Vec::new(),
        files: Vec::new(),
    }
}

impl MigrationSource for StillVm {
    fn describe(&self) -> VmDescription {
        description()
    }
    fn start_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        Ok(PageSet::from_words(
            vec![0; (RAM / PAGE_SIZE).div_ceil(64) as usize],
            RAM / PAGE_SIZE,
        ))
    }
    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }
    fn populated_chunks(&self) -> Vec<ChunkKey> {
        (1..=BUFFERS)
            .flat_map(|buffer| {
                (0..BUFFER / MAX_CHUNK_BYTES).map(move |index| ChunkKey { buffer, index })
            })
            .collect()
    }
    fn device_buffers(&self) -> Vec<DeviceBuffer> {
        (1..=BUFFERS)
            .map(|id| DeviceBuffer { id, bytes: BUFFER })
            .collect()
    }
    fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        out.copy_from_slice(&self.ram[gpa as usize..][..out.len()]);
        Ok(())
    }
    fn read_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Option<u64> {
        let buffer = &self.buffers[chunk.buffer as usize - 1];
        out.clear();
        out.extend_from_slice(
            &buffer[(chunk.index * MAX_CHUNK_BYTES) as usize..][..MAX_CHUNK_BYTES as usize],
        );
        Some(buffer.len() as u64)
    }
    fn set_throttle(&self, _: u8) {}
    fn pause(&self) -> Result<std::time::Instant, VmError> {
        Ok(std::time::Instant::now())
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(vec![0; 4096])
    }
}

/// Memory received into, backed before the run as a host with prefaulted device memory
/// has it.
struct Storage {
    ram: Mutex<Vec<u8>>,
    buffers: Vec<Mutex<Vec<u8>>>,
}

/// The VM received: writes into its storage, which goes back to the factory after.
struct Sink(Arc<Storage>);

impl MigrationTarget for Sink {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.0.ram.lock().unwrap()[gpa as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn sync_buffers(&self, _: &[DeviceBuffer]) -> Result<(), VmError> {
        Ok(())
    }
    fn write_chunk(&self, chunk: ChunkKey, data: &[u8]) -> Result<(), VmError> {
        let mut buffer = self.0.buffers[chunk.buffer as usize - 1].lock().unwrap();
        buffer[(chunk.index * MAX_CHUNK_BYTES) as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn restore(&self, _: &[u8]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
}

/// Hands out the same backed storage to every run.
struct SinkFactory {
    storage: Arc<Storage>,
    done: Mutex<Sender<ReceiveReport>>,
}

impl TargetFactory for SinkFactory {
    type Target = Sink;
    fn prepare(&self, _: &VmDescription) -> Result<Sink, VmError> {
        Ok(Sink(self.storage.clone()))
    }
    fn adopt(&self, _: Sink, report: ReceiveReport) {
        let _ = self.done.lock().unwrap().send(report);
    }
}

/// Raw TCP over loopback, 1 MiB writes, bytes/s.
fn loopback(bytes: u64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; MIB as usize];
        while s.read(&mut buf).unwrap() > 0 {}
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![0x5au8; MIB as usize];
    let started = Instant::now();
    for _ in 0..bytes / MIB {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    reader.join().unwrap();
    bytes as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secret = Secret::new(b"bench secret, not for use".to_vec()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (done, reports) = channel();
    let factory = Arc::new(SinkFactory {
        storage: Arc::new(Storage {
            ram: Mutex::new(vec![1; RAM as usize]),
            buffers: (0..BUFFERS)
                .map(|_| Mutex::new(vec![1; BUFFER as usize]))
                .collect(),
        }),
        done: Mutex::new(done),
    });
    let serve_secret = secret.clone();
    std::thread::spawn(move || serve(listener, serve_secret, factory));
    let vm = StillVm::new();
    let link = median((0..RUNS).map(|_| loopback(1 << 30)).collect());
    println!(
        "loopback TCP (one stream, 1 MiB writes, median of {RUNS}): {:.0} MiB/s",
        link / MIB as f64
    );
    for streams in [1u8, 2, 4] {
        let options = MigrationOptions {
            mode: Mode::StopAndCopy,
            streams,
            ..MigrationOptions::default()
        };
        let mut rates = Vec::new();
        for run in 0..=RUNS {
            let report = migrate_vm(&vm, &addr, &secret, &options, &mut |_| {}).unwrap();
            reports.recv().unwrap();
            // The first run warms up (connections, caches).
            if run > 0 {
                rates.push(report.bytes_sent as f64 / (report.total_ms / 1e3));
            }
        }
        let rate = median(rates);
        println!(
            "stop-and-copy of 256 MiB, {streams} stream(s): {:.0} MiB/s, total/link {:.2}",
            rate / MIB as f64,
            link / rate
        );
    }
}
