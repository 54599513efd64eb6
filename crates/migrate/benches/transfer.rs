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

use ferry_migrate::vm::MAX_CHUNK_BYTES;
use ferry_migrate::{
    migrate_vm, serve, ChunkKey, ChunkWrite, DeviceBuffer, MigrationOptions, MigrationTarget, Mode,
    ReceiveReport, Secret, TargetFactory, VmDescription, VmError,
};

#[path = "../tests/memory_vm/mod.rs"]
mod memory_vm;
use memory_vm::{description, StillVm};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const BUFFER: u64 = 16 * MIB;
const BUFFERS: u32 = 16;
const RUNS: usize = 5;

/// A paused VM whose device memory is `BUFFERS` buffers of non-zero bytes.
fn still_vm() -> StillVm {
    let mut ram = vec![0u8; RAM as usize];
    ram[..MIB as usize].fill(7);
    let mut vm = StillVm::new(description("bench", RAM, u64::from(BUFFERS) * BUFFER), ram);
    vm.state = vec![0; 4096];
    (1..=BUFFERS).fold(vm, |vm, b| {
        let chunks = (0..BUFFER / MAX_CHUNK_BYTES)
            .map(|index| {
                let start = index * MAX_CHUNK_BYTES;
                let data = (start..start + MAX_CHUNK_BYTES)
                    .map(|i| (i as u8) ^ (b as u8) | 1)
                    .collect();
                (index, data)
            })
            .collect();
        vm.with_buffer(b, BUFFER, chunks)
    })
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
    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        let data = write.whole(chunk)?;
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
    let vm = still_vm();
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
