//! A peer that opens connection after connection to the migration port and sends garbage
//! (staying under the limit of connections authenticating at once) gets a log line every
//! few seconds, not one per connection. Counted with this test binary's own subscriber.

mod hostile;
mod memory_vm;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hostile::{Destination, PATIENCE};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata};

/// Warnings (and errors) the engine logged.
static WARNINGS: AtomicUsize = AtomicUsize::new(0);

/// Counts the engine's warnings and errors, and records nothing else.
struct CountWarnings;

impl tracing::Subscriber for CountWarnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target().starts_with("ferry_migrate") {
            WARNINGS.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn connections_failing_before_they_authenticate_are_logged_once_a_while_per_peer() {
    tracing::subscriber::set_global_default(CountWarnings).unwrap();
    let dest = Destination::start();
    for _ in 0..200 {
        let mut s = TcpStream::connect(&dest.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // Until the destination hangs up: it has read the garbage and failed.
        let _ = s.read_to_end(&mut Vec::new());
    }
    // A failure is logged (or not) just after its connection closes.
    std::thread::sleep(Duration::from_millis(300));
    let lines = WARNINGS.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&lines),
        "{lines} warnings for 200 connections from one peer that failed alike"
    );
}
