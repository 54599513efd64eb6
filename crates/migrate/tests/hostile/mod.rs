//! A destination on loopback, and a hostile source that speaks the wire protocol by hand:
//! for the tests of what a destination refuses.

#![allow(dead_code)] // each test binary uses its own part

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use ferry_migrate::auth::authenticate_stream_connector;
use ferry_migrate::wire::{FrameStream, Message, StreamRole, Transfer};
use ferry_migrate::{
    spawn_receiver, ChunkKey, ChunkWrite, DeviceBuffer, DeviceTransfer, FileTransfer,
    MigrationError, MigrationTarget, Outcomes, ReceiveReport, Receiving, Secret, TargetFactory,
    VmDescription, VmError,
};

use crate::memory_vm::MemoryVm;

pub const MIB: u64 = 1 << 20;
/// How long a test waits for something that should happen (generous: loaded CI hosts).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn secret() -> Secret {
    Secret::new("correct horse battery staple").unwrap()
}

/// A VM being received whose RAM writes take `delay` each.
pub struct SlowVm {
    pub vm: MemoryVm,
    pub delay: Duration,
    pub ram_writes: AtomicUsize,
    /// RAM writes begun, of all the factory's VMs.
    pub ram_writes_begun: Arc<AtomicUsize>,
}

impl MigrationTarget for SlowVm {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.ram_writes_begun.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.ram_writes.fetch_add(1, Ordering::SeqCst);
        self.vm.write_ram(gpa, data)
    }
    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        self.vm.sync_buffers(table)
    }
    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        self.vm.write_chunk(chunk, write)
    }
    fn receive_files(&self, files: &[u32]) -> Result<(), VmError> {
        self.vm.receive_files(files)
    }
    fn write_file(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), VmError> {
        self.vm.write_file(file, offset, data)
    }
    fn read_local_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        self.vm.read_local_file(file, offset, out)
    }
    fn restore(&self, state: &[u8]) -> Result<(), VmError> {
        self.vm.restore(state)
    }
    fn resume(&self) -> Result<(), VmError> {
        self.vm.resume()
    }
    /// Agreed to, for the tests of which offers may replay; none of them sends commands
    /// (a replay here fails as the trait's default does).
    fn can_replay(&self) -> bool {
        true
    }
}

pub struct Factory {
    /// How long each RAM write of the VMs it makes takes.
    pub ram_delay: Mutex<Duration>,
    /// RAM writes begun in the VMs it made.
    pub ram_writes_begun: Arc<AtomicUsize>,
    pub prepared: AtomicUsize,
    adopted: Mutex<Sender<SlowVm>>,
}

impl TargetFactory for Factory {
    type Target = SlowVm;
    fn prepare(&self, vm: &VmDescription) -> Result<SlowVm, VmError> {
        self.prepared.fetch_add(1, Ordering::SeqCst);
        Ok(SlowVm {
            vm: MemoryVm::new(vm.ram_size),
            delay: *self.ram_delay.lock().unwrap(),
            ram_writes: AtomicUsize::new(0),
            ram_writes_begun: self.ram_writes_begun.clone(),
        })
    }
    fn adopt(&self, target: SlowVm, _: ReceiveReport) {
        let _ = self.adopted.lock().unwrap().send(target);
    }
}

/// A destination host listening on loopback until dropped.
pub struct Destination {
    pub addr: String,
    pub factory: Arc<Factory>,
    adopted: Receiver<SlowVm>,
    _receiving: Receiving,
}

impl Destination {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, adopted) = channel();
        let factory = Arc::new(Factory {
            ram_delay: Mutex::new(Duration::ZERO),
            ram_writes_begun: Arc::default(),
            prepared: AtomicUsize::new(0),
            adopted: Mutex::new(tx),
        });
        let receiving = spawn_receiver(
            listener,
            secret(),
            None,
            factory.clone(),
            Outcomes::default(),
        )
        .unwrap();
        Self {
            addr,
            factory,
            adopted,
            _receiving: receiving,
        }
    }

    /// The VM adopted next.
    pub fn adopted(&self) -> SlowVm {
        self.adopted
            .recv_timeout(PATIENCE)
            .expect("the destination adopted no VM")
    }

    /// Waits until `n` RAM writes have begun in the VMs received.
    pub fn wait_for_ram_writes(&self, n: usize) {
        let started = std::time::Instant::now();
        while self.factory.ram_writes_begun.load(Ordering::SeqCst) < n {
            assert!(started.elapsed() < PATIENCE, "no RAM write began");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Nothing is adopted within a short while.
    pub fn assert_nothing_adopted(&self) {
        assert!(
            self.adopted
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "the destination adopted a VM"
        );
    }

    /// An authenticated connection as `role`.
    pub fn connect(&self, role: StreamRole) -> FrameStream<TcpStream> {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = FrameStream::new(s, false);
        authenticate_stream_connector(&mut c, &secret(), role).expect("authentication");
        c
    }

    /// Offers `vm` over `streams` data streams and opens them once accepted: the control
    /// connection and the data connections.
    pub fn session(
        &self,
        vm: VmDescription,
        streams: u8,
    ) -> (FrameStream<TcpStream>, Vec<FrameStream<TcpStream>>) {
        self.session_moving_device(vm, streams, DeviceTransfer::Precopy)
    }

    /// [`Self::session`], asking to move device memory by `device`.
    pub fn session_moving_device(
        &self,
        vm: VmDescription,
        streams: u8,
        device: DeviceTransfer,
    ) -> (FrameStream<TcpStream>, Vec<FrameStream<TcpStream>>) {
        let mut c = self.connect(StreamRole::Control);
        c.send(&offer_moving_device(vm, streams, device)).unwrap();
        let session = match c.expect_control("accept") {
            Ok(Message::Accept { session, .. }) => session,
            other => panic!("expected accept, got {other:?}"),
        };
        let data = (0..streams)
            .map(|index| self.connect(StreamRole::Data { session, index }))
            .collect();
        (c, data)
    }
}

/// An offer to send `vm` live over `streams` data streams.
pub fn offer(vm: VmDescription, streams: u8) -> Message {
    offer_moving_device(vm, streams, DeviceTransfer::Precopy)
}

/// An offer as [`offer`]'s, asking to move device memory by `device`.
pub fn offer_moving_device(vm: VmDescription, streams: u8, device: DeviceTransfer) -> Message {
    Message::Offer {
        vm,
        streams,
        transfer: Transfer::Live,
        files: FileTransfer::Reuse,
        device,
    }
}

/// The destination's next message on `control` after its keepalives (it says it is still
/// at work while a round's frames are applied after its end), and how many came first.
pub fn answer(control: &mut FrameStream<TcpStream>) -> (Result<Message, MigrationError>, u32) {
    let mut keepalives = 0;
    loop {
        match control.expect_control("an answer") {
            Ok(Message::Keepalive) => keepalives += 1,
            other => return (other, keepalives),
        }
    }
}

/// The reason the destination aborted with, as its next message on `control` (after its
/// keepalives).
pub fn abort_reason(control: &mut FrameStream<TcpStream>) -> String {
    match answer(control).0 {
        Err(MigrationError::PeerAborted(reason)) => reason,
        other => panic!("expected the destination to abort, got {other:?}"),
    }
}

/// Asserts that the destination's answer on `control` (after its keepalives) is that it
/// applied `round`; returns how many keepalives came first.
pub fn assert_applied(control: &mut FrameStream<TcpStream>, round: u32) -> u32 {
    let (answer, keepalives) = answer(control);
    assert_eq!(answer.unwrap(), Message::RoundApplied { round });
    keepalives
}
