//! A ceiling on how fast pre-copy moves a VM's state.
//!
//! Moving state costs both hosts CPU and memory bandwidth, and the link. A VM whose
//! host is busy (or which shares a link with others) can be moved more gently: pre-copy
//! then takes longer, but takes less from the VM at any moment. The pause is never
//! paced: the final round goes as fast as the link allows. Time spent waiting for the
//! pace is kept apart from time spent sending, so that the link's rate, which predicts
//! the pause, is not mistaken for the ceiling.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The least rate a ceiling may be (bytes/s): slower, one chunk would hold a stream for
/// a quarter of a second or more.
pub const MIN_RATE: u64 = 1 << 20;

/// Spaces out what data streams send so that together they move at most `bytes_per_s`:
/// each item takes its turn on one clock the streams share.
#[derive(Debug)]
pub(crate) struct Pacer {
    bytes_per_s: f64,
    /// When what was reserved so far will have gone at the rate (`None` before the
    /// first reservation).
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer at `bytes_per_s` (at least [`MIN_RATE`]).
    pub(crate) fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: bytes_per_s.max(MIN_RATE) as f64,
            next: Mutex::new(None),
        }
    }

    /// Reserves `bytes` sent at `now`; returns when the rate allows the sender its next
    /// item. Time the senders spent idle is not saved up for a burst later.
    pub(crate) fn reserve(&self, now: Instant, bytes: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next.map_or(now, |t| t.max(now));
        let due = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s);
        *next = Some(due);
        due
    }
}

/// How long none of a round's data streams was sending: all of them were waiting for
/// the pace, or had finished while the others waited.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug, Default)]
struct ActivityState {
    /// Streams sending now.
    sending: usize,
    /// Since when none has been, if none is.
    idle_since: Option<Instant>,
    /// Idle time before `idle_since`.
    idle: Duration,
}

impl Activity {
    /// `streams` start sending.
    pub(crate) fn start(&self, streams: usize) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).sending = streams;
    }

    /// A stream resumes sending at `now`.
    pub(crate) fn resume(&self, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.idle_since.take() {
            s.idle += now.saturating_duration_since(since);
        }
        s.sending += 1;
    }

    /// A stream stops sending at `now` (to wait, or because it is done).
    pub(crate) fn rest(&self, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.sending = s.sending.saturating_sub(1);
        if s.sending == 0 {
            s.idle_since = Some(now);
        }
    }

    /// The idle time up to the last stream's rest (the round's end).
    pub(crate) fn idle(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn streams_sharing_a_pacer_take_turns_at_its_rate() {
        // 64 KiB at 64 MiB/s is 0.977 ms: four streams sending at once are due one
        // after another.
        let pacer = Pacer::new(64 << 20);
        let t0 = Instant::now();
        let dues: Vec<Duration> = (0..4).map(|_| pacer.reserve(t0, 64 << 10) - t0).collect();
        for (i, due) in dues.iter().enumerate() {
            let expected =
                Duration::from_secs_f64((i + 1) as f64 * (64 << 10) as f64 / (64 << 20) as f64);
            assert!(
                due.abs_diff(expected) < Duration::from_micros(1),
                "item {i} due after {due:?}, not {expected:?}"
            );
        }
    }

    #[test]
    fn idle_time_is_not_saved_up_for_a_burst() {
        let pacer = Pacer::new(64 << 20);
        let t0 = Instant::now();
        pacer.reserve(t0, 1 << 20);
        // 60 ms later (the first MiB went by 15.6 ms), the next MiB still waits its own
        // 15.6 ms rather than going on credit.
        let later = t0 + 60 * MS;
        let due = pacer.reserve(later, 1 << 20);
        assert!(due - later > 15 * MS, "due {:?} after", due - later);
    }

    #[test]
    fn a_ceiling_under_the_least_is_raised_to_it() {
        let pacer = Pacer::new(1);
        let t0 = Instant::now();
        let due = pacer.reserve(t0, MIN_RATE);
        assert!(due - t0 <= Duration::from_secs(1));
    }

    #[test]
    fn idle_counts_only_while_no_stream_sends() {
        let a = Activity::default();
        let t0 = Instant::now();
        a.start(2);
        a.rest(t0 + 2 * MS); // one waits, the other sends on
        a.rest(t0 + 5 * MS); // both wait: idle from here
        a.resume(t0 + 9 * MS);
        a.rest(t0 + 10 * MS); // done, the other still waits
        a.resume(t0 + 12 * MS);
        a.rest(t0 + 13 * MS);
        assert_eq!(a.idle(), 4 * MS + 2 * MS);
    }
}
