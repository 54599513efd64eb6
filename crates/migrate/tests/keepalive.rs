//! A round longer than the destination's idle limit on a connection (pre-copy under a
//! low rate ceiling; a large stop-and-copy) keeps its connections: the source says it is
//! at work. The limits are shortened for this test binary's process, so the round takes
//! seconds rather than minutes.

mod memory_vm;

use std::net::TcpListener;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_migrate::{
    migrate_vm, serve, MigrationOptions, ReceiveReport, Secret, TargetFactory, VmDescription,
    VmError,
};
use memory_vm::{description, MemoryVm, StillVm};

const RAM: u64 = 12 << 20;
const PAGE: usize = 4096;

/// Hands each adopted VM to the test.
struct Factory(Mutex<Sender<MemoryVm>>);

impl TargetFactory for Factory {
    type Target = MemoryVm;
    fn prepare(&self, vm: &VmDescription) -> Result<MemoryVm, VmError> {
        Ok(MemoryVm::new(vm.ram_size))
    }
    fn adopt(&self, target: MemoryVm, _: ReceiveReport) {
        let _ = self.0.lock().unwrap().send(target);
    }
}

#[test]
fn a_round_longer_than_the_idle_limit_keeps_its_connections() {
    let idle_limit = Duration::from_secs(1);
    ferry_migrate::shorten_idle_limits(Duration::from_millis(200), idle_limit);
    let secret = || Secret::new("correct horse battery staple").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (adopted, arrived) = channel();
    let factory = Arc::new(Factory(Mutex::new(adopted)));
    std::thread::spawn(move || serve(listener, secret(), factory));
    // Every other page written: runs of one page, so each data stream sends a frame every
    // few milliseconds and only the control stream waits out the round.
    let mut ram = vec![0u8; RAM as usize];
    for (i, page) in ram.chunks_mut(PAGE).enumerate().filter(|(i, _)| i % 2 == 0) {
        page.fill(i as u8 | 1);
    }
    let source = StillVm::new(description("keepalive", RAM, 0), ram);
    let options = MigrationOptions {
        streams: 2,
        // 6 MiB to send at 2 MiB/s: a round 0 of about 3 s, three idle limits.
        max_rate: Some(2 << 20),
        io_timeout: Duration::from_secs(10),
        ..MigrationOptions::default()
    };
    let report = migrate_vm(&source, &addr, &secret(), &options, &mut |_| {})
        .expect("a long round keeps its connections");
    let round_0 = Duration::from_secs_f64(report.round_log[0].ms / 1e3);
    assert!(round_0 > idle_limit * 2, "round 0 took only {round_0:?}");
    let target = arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(*target.ram.lock().unwrap() == source.ram, "RAM differs");
}
