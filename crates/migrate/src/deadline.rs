//! Time limits on a migration, so that a peer that stops answering (frozen, gone, or
//! behind a link that silently drops packets) fails the migration within seconds, with
//! an error that names the phase and the limit:
//!
//! - every connection has TCP keepalive and a TCP user timeout, so a dead link is
//!   noticed by the kernel even while nothing is being written;
//! - every blocking read and write has a timeout ([`crate::MigrationOptions::io_timeout`]
//!   on the source);
//! - the switchover has a [`Watchdog`]: if the destination has not said Ready within the
//!   pause target plus a margin, the connections are shut and the VM resumes on the
//!   source before it was ever told to run elsewhere.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};

/// Idle time before the first keepalive probe, and between probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(2);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered probes before the kernel gives up on the connection.
const KEEPALIVE_PROBES: u32 = 3;

/// How long a destination waits for the next frame on a connection before it takes the
/// source for gone (a source at work on a long round says so every
/// [`DEFAULT_KEEPALIVE_EVERY`]).
pub(crate) const DEFAULT_IDLE_LIMIT: Duration = Duration::from_secs(120);
/// How often a long round tells the destination it is at work (`Message::Keepalive`),
/// well within [`DEFAULT_IDLE_LIMIT`].
pub(crate) const DEFAULT_KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
const _: () = assert!(DEFAULT_KEEPALIVE_EVERY.as_secs() * 3 < DEFAULT_IDLE_LIMIT.as_secs());

/// This process's idle limit and keepalive period, ms ([`shorten_idle_limits`]).
static IDLE_LIMIT_MS: AtomicU64 = AtomicU64::new(DEFAULT_IDLE_LIMIT.as_millis() as u64);
static KEEPALIVE_EVERY_MS: AtomicU64 = AtomicU64::new(DEFAULT_KEEPALIVE_EVERY.as_millis() as u64);

/// The destination's idle limit on a connection.
pub(crate) fn idle_limit() -> Duration {
    Duration::from_millis(IDLE_LIMIT_MS.load(Ordering::Relaxed))
}

/// How often a long round says it is at work.
pub(crate) fn keepalive_every() -> Duration {
    Duration::from_millis(KEEPALIVE_EVERY_MS.load(Ordering::Relaxed))
}

/// Sets this process's idle limit and keepalive period, for tests of long rounds that
/// would otherwise take minutes.
#[doc(hidden)]
pub fn shorten_idle_limits(keepalive_every: Duration, idle_limit: Duration) {
    KEEPALIVE_EVERY_MS.store(keepalive_every.as_millis() as u64, Ordering::Relaxed);
    IDLE_LIMIT_MS.store(idle_limit.as_millis() as u64, Ordering::Relaxed);
}

/// Sets keepalive and a user timeout of `limit` (how long sent data may stay
/// unacknowledged) on a migration connection.
pub(crate) fn tune(stream: &TcpStream, limit: Duration) -> std::io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(limit))
}

/// Whether an I/O error is a timeout (a read or write that waited its limit out, or a
/// connection the kernel gave up on).
pub(crate) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    Armed,
    Disarmed,
    Expired,
}

/// Shuts a migration's connections down if it is not disarmed by a deadline: every
/// blocked read or write on them then fails at once.
pub(crate) struct Watchdog {
    state: Arc<(Mutex<Watch>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a watchdog over `sockets` that fires at `deadline`.
    pub(crate) fn arm(deadline: Instant, sockets: Vec<TcpStream>) -> std::io::Result<Self> {
        let state = Arc::new((Mutex::new(Watch::Armed), Condvar::new()));
        let watched = state.clone();
        let thread = std::thread::Builder::new()
            .name("migrate-watchdog".into())
            .spawn(move || {
                let (lock, changed) = &*watched;
                let mut watch = lock.lock().unwrap_or_else(|e| e.into_inner());
                while *watch == Watch::Armed {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        *watch = Watch::Expired;
                        for socket in &sockets {
                            let _ = socket.shutdown(Shutdown::Both);
                        }
                        break;
                    }
                    watch = changed
                        .wait_timeout(watch, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    /// Disarms it; `false` if it had fired already (the connections are shut).
    pub(crate) fn disarm(&self) -> bool {
        let (lock, changed) = &*self.state;
        let mut watch = lock.lock().unwrap_or_else(|e| e.into_inner());
        if *watch == Watch::Armed {
            *watch = Watch::Disarmed;
            changed.notify_all();
        }
        *watch == Watch::Disarmed
    }

    /// Whether it fired.
    pub(crate) fn fired(&self) -> bool {
        *self.state.0.lock().unwrap_or_else(|e| e.into_inner()) == Watch::Expired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_pair as pair;
    use std::io::Read;

    #[test]
    fn a_watchdog_that_fires_unblocks_a_read_and_says_so() {
        let (mut client, _server) = pair();
        tune(&client, Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        let dog = Watchdog::arm(
            Instant::now() + Duration::from_millis(100),
            vec![client.try_clone().unwrap()],
        )
        .unwrap();
        // Nothing will ever arrive: only the watchdog ends this read.
        let n = client.read(&mut [0u8; 16]).unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(dog.fired());
        assert!(!dog.disarm(), "too late to disarm");
    }

    #[test]
    fn a_disarmed_watchdog_leaves_the_connection_alone() {
        let (client, mut server) = pair();
        let dog = Watchdog::arm(
            Instant::now() + Duration::from_millis(50),
            vec![client.try_clone().unwrap()],
        )
        .unwrap();
        assert!(dog.disarm());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!dog.fired());
        drop(dog);
        use std::io::Write;
        (&client).write_all(b"still open").unwrap();
        let mut got = [0u8; 10];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still open");
    }
}
