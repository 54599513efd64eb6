//! What a destination lets go of once it gives up on a migration, whatever its source
//! does next: the VM it prepared (its memory, its received files, the session's place)
//! goes within moments, even while the source keeps its data connections open, idle or
//! part way through a frame.

mod hostile;
mod memory_vm;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migrate::auth::authenticate_stream_connector;
use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::wire::{FrameStream, FrameWriter, Message, StreamRole};
use ferry_migrate::{
    spawn_receiver, ChunkKey, ChunkWrite, DeviceBuffer, MigrationTarget, Outcomes, ReceiveReport,
    TargetFactory, VmDescription, VmError,
};
use hostile::{abort_reason, assert_applied, offer, MIB, PATIENCE};
use memory_vm::MemoryVm;

/// A VM being received that counts its drops (a dropped target stops its VM for good).
struct Counted {
    vm: MemoryVm,
    dropped: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl MigrationTarget for Counted {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.vm.write_ram(gpa, data)
    }
    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        self.vm.sync_buffers(table)
    }
    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        self.vm.write_chunk(chunk, write)
    }
    fn restore(&self, state: &[u8]) -> Result<(), VmError> {
        self.vm.restore(state)
    }
    fn resume(&self) -> Result<(), VmError> {
        self.vm.resume()
    }
}

struct CountingFactory {
    dropped: Arc<AtomicUsize>,
}

impl TargetFactory for CountingFactory {
    type Target = Counted;
    fn prepare(&self, vm: &VmDescription) -> Result<Counted, VmError> {
        Ok(Counted {
            vm: MemoryVm::new(vm.ram_size),
            dropped: self.dropped.clone(),
        })
    }
    fn adopt(&self, _: Counted, _: ReceiveReport) {}
}

/// An authenticated connection to `addr` as `role`.
fn connect(addr: &str, role: StreamRole) -> FrameStream<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut c = FrameStream::new(s, false);
    authenticate_stream_connector(&mut c, &hostile::secret(), role).expect("authentication");
    c
}

#[test]
fn a_failed_session_lets_go_of_its_vm_while_the_source_keeps_its_data_connections_open() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dropped = Arc::new(AtomicUsize::new(0));
    let factory = Arc::new(CountingFactory {
        dropped: dropped.clone(),
    });
    let _receiving = spawn_receiver(
        listener,
        hostile::secret(),
        None,
        factory,
        Outcomes::default(),
    )
    .unwrap();
    let mut c = connect(&addr, StreamRole::Control);
    c.send(&offer(memory_vm::description("lingering", MIB, 0), 2))
        .unwrap();
    let session = match c.expect_control("accept") {
        Ok(Message::Accept { session, .. }) => session,
        other => panic!("expected accept, got {other:?}"),
    };
    let mut data: Vec<_> = (0..2)
        .map(|index| connect(&addr, StreamRole::Data { session, index }))
        .collect();
    // Round 0: a page on stream 0, nothing on stream 1.
    c.send(&Message::BeginRound {
        round: 0,
        buffers: Some(Vec::new()),
    })
    .unwrap();
    data[0]
        .writer
        .send_ram(0, 1, Some(&[7; PAGE_SIZE as usize]))
        .unwrap();
    data[0].writer.flush().unwrap();
    c.send(&Message::EndRound {
        round: 0,
        frames: vec![1, 0],
    })
    .unwrap();
    assert_applied(&mut c, 0);
    // Stream 1 begins a frame and stops part way (a source trickling it); stream 0 stays
    // idle. Then something the destination refuses: Go without the final state.
    let mut frame = Vec::new();
    FrameWriter::new(&mut frame, false)
        .send_ram(PAGE_SIZE, 1, Some(&[9; PAGE_SIZE as usize]))
        .unwrap();
    data[1].get_mut().write_all(&frame[..100]).unwrap();
    c.send(&Message::Go).unwrap();
    let reason = abort_reason(&mut c);
    assert!(reason.contains("got Go"), "{reason}");
    // The source says nothing more and closes nothing; the VM goes all the same, long
    // before the destination's idle limit (two minutes) would end its stream threads.
    let aborted = Instant::now();
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            aborted.elapsed() < Duration::from_secs(10),
            "the VM of a failed session is still held {:?} after the abort",
            aborted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    drop((c, data));
}
