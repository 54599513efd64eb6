//! What a destination spends on a peer before it has proven who it is: a bounded number
//! of connections per host and per peer address (an IPv6 /64), each with a few seconds to
//! authenticate (TLS included) and frames of a few KiB meanwhile. A connection over the
//! limits is closed at once, with a log line naming the peer; one that takes too long is
//! shut by a single reaper thread. Refusals, and connections that fail before they
//! authenticate, are logged at most every few seconds per peer, with a count: anyone can
//! cause them as fast as connections open.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Connections authenticating at once, per host.
pub const MAX_HANDSHAKES: usize = 64;
/// Connections authenticating at once, per peer address (an IPv6 /64).
pub const MAX_HANDSHAKES_PER_PEER: usize = 16;
/// Time a connection has to authenticate, from its acceptance.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(5);
/// How often the reaper looks for connections past their time.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// A peer's refusals (and, apart, its failures before authenticating) are logged at most
/// this often (with how many there were).
const LOG_REFUSALS_EVERY: Duration = Duration::from_secs(5);
/// Peers whose refusals (or failures) are counted each on its own; beyond them, together.
const MAX_LOGGED_PEERS: usize = 4 * MAX_HANDSHAKES;

/// One connection authenticating: when its time is up, and its socket.
struct Pending {
    deadline: Instant,
    socket: TcpStream,
    peer: IpAddr,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    per_peer: HashMap<IpAddr, usize>,
    next: u64,
    /// Connections refused.
    refused: PeerLog,
    /// Connections admitted that failed before they authenticated.
    failed: PeerLog,
}

/// Per peer: events since the last log line about it, and when that was.
#[derive(Default)]
struct PeerLog {
    peers: HashMap<IpAddr, Unlogged>,
    /// The same for the peers beyond [`MAX_LOGGED_PEERS`] at once, together.
    others: Unlogged,
}

/// Events not logged yet, and when the last line was (`None`: never).
type Unlogged = (u64, Option<Instant>);

/// The admission of unauthenticated connections to a listener.
#[derive(Clone, Default)]
pub(crate) struct Gate(Arc<Mutex<State>>);

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The host's limit.
    Host,
    /// The peer's limit.
    Peer,
}

/// A connection's place among those authenticating; dropping it gives the place back.
pub(crate) struct Ticket {
    gate: Gate,
    id: u64,
}

impl Gate {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits `socket` from `peer` if both limits allow; it must authenticate within
    /// [`HANDSHAKE_TIME`] or [`Gate::reap`] shuts it.
    pub(crate) fn admit(&self, socket: &TcpStream, peer: IpAddr) -> Result<Ticket, Refusal> {
        let peer = peer_key(peer);
        let mut s = self.state();
        if s.pending.len() >= MAX_HANDSHAKES {
            return Err(Refusal::Host);
        }
        if s.per_peer.get(&peer).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_PEER {
            return Err(Refusal::Peer);
        }
        // Without a handle to shut it, the deadline could not be kept: refuse (counting
        // nothing for the peer, whose entry no ticket would remove).
        let Ok(handle) = socket.try_clone() else {
            return Err(Refusal::Host);
        };
        *s.per_peer.entry(peer).or_insert(0) += 1;
        let id = s.next;
        s.next += 1;
        s.pending.insert(
            id,
            Pending {
                deadline: Instant::now() + HANDSHAKE_TIME,
                socket: handle,
                peer,
            },
        );
        Ok(Ticket {
            gate: self.clone(),
            id,
        })
    }

    /// Whether a refusal of `peer` should be logged now; returns how many refusals the
    /// line covers (for a peer beyond the [`MAX_LOGGED_PEERS`] counted on their own,
    /// those of all such peers). Peers cost no memory past that bound, however many
    /// addresses refused connections come from.
    pub(crate) fn log_refusal(&self, peer: IpAddr) -> Option<u64> {
        self.state().refused.note(peer_key(peer))
    }

    /// Whether a connection from `peer` that failed before it authenticated should be
    /// logged now, as [`Gate::log_refusal`] (counted apart from refusals).
    pub(crate) fn log_failure(&self, peer: IpAddr) -> Option<u64> {
        self.state().failed.note(peer_key(peer))
    }

    /// Shuts every connection past its time (its thread then fails and gives its ticket
    /// back).
    pub(crate) fn reap(&self) {
        let now = Instant::now();
        let s = self.state();
        for p in s.pending.values().filter(|p| p.deadline <= now) {
            let _ = p.socket.shutdown(Shutdown::Both);
        }
    }

    /// Starts the reaper thread, which runs until `stop`'s sender is gone.
    pub(crate) fn start_reaper(
        &self,
        stop: std::sync::mpsc::Receiver<()>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let gate = self.clone();
        std::thread::Builder::new()
            .name("migrate-reaper".into())
            .spawn(move || {
                while stop.recv_timeout(REAP_EVERY) == Err(RecvTimeoutError::Timeout) {
                    gate.reap();
                }
            })
    }

    /// Connections authenticating now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.state().pending.len()
    }
}

impl PeerLog {
    /// Counts an event of `peer`; returns how many events a line logged now covers, if
    /// one is due (see [`Gate::log_refusal`]).
    fn note(&mut self, peer: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let recent = |last: &Option<Instant>| {
            last.is_some_and(|t| now.duration_since(t) < LOG_REFUSALS_EVERY)
        };
        let Self { peers, others } = self;
        if peers.len() >= MAX_LOGGED_PEERS && !peers.contains_key(&peer) {
            // Peers not logged for a while are forgotten (with at most a line's worth
            // of events unsaid).
            peers.retain(|_, (_, last)| recent(last));
        }
        let (count, last) = if peers.len() < MAX_LOGGED_PEERS {
            peers.entry(peer).or_insert((0, None))
        } else {
            peers.get_mut(&peer).unwrap_or(others)
        };
        *count += 1;
        if recent(last) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

/// What a peer's limit counts `ip` as: an IPv6 address as its /64 (one host, or one
/// attacker, commonly has a whole /64 to pick addresses from), an IPv4 one as itself.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state();
        if let Some(p) = s.pending.remove(&self.id) {
            if let Some(n) = s.per_peer.get_mut(&p.peer) {
                *n -= 1;
                if *n == 0 {
                    s.per_peer.remove(&p.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_pair as socket;
    use std::io::Read;
    use std::net::Ipv4Addr;

    #[test]
    fn a_peer_gets_its_share_and_the_host_its_limit() {
        let gate = Gate::default();
        let (_c, s) = socket();
        let peer = |n: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        let mut tickets = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_PEER {
            tickets.push(gate.admit(&s, peer(1)).unwrap());
        }
        assert_eq!(gate.admit(&s, peer(1)).err(), Some(Refusal::Peer));
        // Others still get in, up to the host's limit.
        let mut n = 2;
        while tickets.len() < MAX_HANDSHAKES {
            match gate.admit(&s, peer(n)) {
                Ok(t) => tickets.push(t),
                Err(Refusal::Peer) => n += 1,
                Err(Refusal::Host) => panic!("host limit before {MAX_HANDSHAKES}"),
            }
        }
        assert_eq!(gate.admit(&s, peer(200)).err(), Some(Refusal::Host));
        // Places come back when tickets go.
        tickets.truncate(MAX_HANDSHAKES - 1);
        assert!(gate.admit(&s, peer(200)).is_ok());
        drop(tickets);
        assert_eq!(gate.pending(), 0);
        assert!(gate.0.lock().unwrap().per_peer.is_empty());
    }

    #[test]
    fn ipv6_peers_are_counted_per_64_addresses() {
        let gate = Gate::default();
        let (_c, s) = socket();
        let in_64 = |n: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, n));
        let tickets: Vec<_> = (0..MAX_HANDSHAKES_PER_PEER as u16)
            .map(|n| gate.admit(&s, in_64(n)).unwrap())
            .collect();
        // Another address of the same /64 is the same peer; another /64 is not.
        assert_eq!(gate.admit(&s, in_64(999)).err(), Some(Refusal::Peer));
        let other = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert!(gate.admit(&s, other).is_ok());
        // An IPv4-mapped address counts as its IPv4 address.
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(peer_key(mapped), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
        drop(tickets);
    }

    #[test]
    fn a_connection_past_its_time_is_shut() {
        let gate = Gate::default();
        let (mut client, server) = socket();
        let ticket = gate
            .admit(&server, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .unwrap();
        gate.0
            .lock()
            .unwrap()
            .pending
            .get_mut(&ticket.id)
            .unwrap()
            .deadline = Instant::now();
        gate.reap();
        // The server side was shut: the client reads the end of the stream.
        assert_eq!(client.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn refusals_are_logged_at_most_every_few_seconds_with_a_count() {
        let gate = Gate::default();
        let peer = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(gate.log_refusal(peer), Some(1));
        for _ in 0..100 {
            assert_eq!(gate.log_refusal(peer), None);
        }
    }

    #[test]
    fn failures_before_authenticating_are_logged_apart_from_refusals() {
        let gate = Gate::default();
        let peer = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
        // A line about the peer's refusals does not hide its first failure.
        assert_eq!(gate.log_refusal(peer), Some(1));
        assert_eq!(gate.log_failure(peer), Some(1));
        for _ in 0..100 {
            assert_eq!(gate.log_failure(peer), None);
        }
        assert_eq!(gate.log_refusal(peer), None);
    }

    #[test]
    fn refusals_from_ever_new_peers_cost_bounded_memory_and_are_still_logged() {
        let gate = Gate::default();
        let tracked = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(gate.log_refusal(tracked), Some(1));
        // Twice each from 10,000 /64s, as fast as they come.
        let mut logged = 0;
        for i in 0..10_000u16 {
            let p = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 1));
            logged += gate.log_refusal(p).unwrap_or(0);
            logged += gate.log_refusal(p).unwrap_or(0);
        }
        assert!(gate.0.lock().unwrap().refused.peers.len() <= MAX_LOGGED_PEERS);
        // Each tracked peer's first refusal was logged, and the others' together once.
        assert!(logged >= MAX_LOGGED_PEERS as u64, "{logged}");
        // A peer counted on its own still is.
        assert_eq!(gate.log_refusal(tracked), None);
    }
}
