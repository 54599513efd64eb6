//! Settling an in-doubt switchover. When the connection breaks after the source told the
//! destination to run the VM (Go) and before it confirmed, the source cannot know
//! whether the VM runs there; it keeps its copy paused and asks the destination about the
//! migration's session ([`settle`]). The destination answers from its [`Outcomes`], and
//! the question itself decides the undecided case: a session not yet told to run its VM
//! is *fenced*, so a Go that arrives late is refused. The answer is therefore final:
//!
//! - [`Settlement::Running`]: the destination runs (or ran) the VM: the source releases
//!   its copy;
//! - [`Settlement::NotRunning`]: it does not and never will: the source resumes its copy;
//! - [`Settlement::Undecided`]: it is resuming right now: ask again shortly.
//!
//! A destination that restarted knows no session: its VMs ended with its process, so
//! the answer is `NotRunning`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::send::{open_control, MigrationOptions};
use crate::wire::Message;
use crate::MigrationError;

/// Sessions of each end remembered after they ended, for late questions (far more than
/// a host can receive while a source still asks: it gives up after minutes). Failed
/// sessions, which any authenticated peer can make by the thousand, are counted apart, so
/// they never push out a session whose VM ran: its source may be asking still, and
/// "not running" would make it run the VM a second time.
const REMEMBERED: usize = 1 << 16;

/// Whether a destination runs the VM of a session (the answer to a settle question).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settlement {
    /// It runs the VM (or did, and it ended or moved on since).
    Running,
    /// It does not, and never will: the session failed, or was fenced by the question.
    NotRunning,
    /// It is resuming the VM right now: ask again.
    Undecided,
}

/// Where an incoming session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Being received; not yet told to run.
    Receiving,
    /// A settle question came first: it must never run.
    Fenced,
    /// Told to run; resuming.
    Resuming,
    /// It ran.
    Resumed,
    /// It failed or was refused: it never ran.
    Discarded,
}

#[derive(Default)]
struct Book {
    sessions: HashMap<u64, Outcome>,
    /// Sessions whose VM ran, oldest first (forgotten beyond [`REMEMBERED`]).
    resumed: VecDeque<u64>,
    /// Sessions that ended without their VM running, oldest first (likewise).
    discarded: VecDeque<u64>,
    /// The host is shutting down: no session begins, none not yet told to run will.
    closed: bool,
}

impl Book {
    /// Records `session`'s end (`outcome`).
    fn end(&mut self, session: u64, outcome: Outcome) {
        // Not begun here (or forgotten): nothing to record, nor to remember for ever.
        let Some(was) = self.sessions.get_mut(&session) else {
            return;
        };
        match std::mem::replace(was, outcome) {
            // Ended already: in the queue of ended ones once at most.
            Outcome::Resumed | Outcome::Discarded => return,
            Outcome::Receiving | Outcome::Fenced | Outcome::Resuming => {}
        }
        let ended = match outcome {
            Outcome::Resumed => &mut self.resumed,
            _ => &mut self.discarded,
        };
        ended.push_back(session);
        while ended.len() > REMEMBERED {
            if let Some(old) = ended.pop_front() {
                self.sessions.remove(&old);
            }
        }
    }
}

/// A destination's record of its incoming sessions, shared by the listener and whoever
/// else answers settle questions (the host's API, for a center relaying one).
#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<Book>>);

impl Outcomes {
    fn book(&self) -> MutexGuard<'_, Book> {
        // Each update is one insert: whole after a panic.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A session began: `false` if none may (the host is shutting down).
    pub(crate) fn receiving(&self, session: u64) -> bool {
        let mut book = self.book();
        if book.closed {
            return false;
        }
        book.sessions.insert(session, Outcome::Receiving);
        true
    }

    /// The host is shutting down: sessions not yet told to run their VM are fenced (a
    /// late Go is refused, and the source resumes its copy) and no new one begins.
    /// Answers to settle questions go on.
    pub fn close(&self) {
        let mut book = self.book();
        book.closed = true;
        for outcome in book.sessions.values_mut() {
            if *outcome == Outcome::Receiving {
                *outcome = Outcome::Fenced;
            }
        }
    }

    /// Whether [`Outcomes::close`] was called: the host is shutting down.
    pub fn is_closed(&self) -> bool {
        self.book().closed
    }

    /// Sessions resuming their VM right now (told to run, not yet confirmed).
    pub fn resuming(&self) -> usize {
        self.book()
            .sessions
            .values()
            .filter(|o| **o == Outcome::Resuming)
            .count()
    }

    /// The source said Go: `true` if the VM may run (the session was not fenced).
    pub(crate) fn begin_resume(&self, session: u64) -> bool {
        let mut book = self.book();
        match book.sessions.get(&session) {
            Some(Outcome::Receiving) => {
                book.sessions.insert(session, Outcome::Resuming);
                true
            }
            _ => false,
        }
    }

    /// The session ended: its VM ran (`ran`), or it never will.
    pub(crate) fn ended(&self, session: u64, ran: bool) {
        let outcome = if ran {
            Outcome::Resumed
        } else {
            Outcome::Discarded
        };
        self.book().end(session, outcome);
    }

    /// The session's VM was dropped without the host adopting it, so it no longer runs
    /// here: the session ended without it, unless it had run (a VM that ran is answered
    /// for as [`Settlement::Running`] for good, as a source may have released its copy).
    pub(crate) fn unadopted(&self, session: u64) {
        let mut book = self.book();
        if book.sessions.get(&session) != Some(&Outcome::Resumed) {
            book.end(session, Outcome::Discarded);
        }
    }

    /// Answers a settle question about `session`, fencing it if it was not yet told to
    /// run its VM.
    pub fn settle(&self, session: u64) -> Settlement {
        let mut book = self.book();
        match book.sessions.get(&session).copied() {
            Some(Outcome::Receiving) => {
                book.sessions.insert(session, Outcome::Fenced);
                Settlement::NotRunning
            }
            Some(Outcome::Fenced | Outcome::Discarded) | None => Settlement::NotRunning,
            Some(Outcome::Resuming) => Settlement::Undecided,
            Some(Outcome::Resumed) => Settlement::Running,
        }
    }
}

/// Asks the destination at `addr` whether it runs the VM of migration `session` (see the
/// module docs), over an authenticated control connection (with `options`' TLS and
/// timeouts).
pub fn settle(
    addr: &str,
    secret: &Secret,
    options: &MigrationOptions,
    session: u64,
) -> Result<Settlement, MigrationError> {
    let mut control = open_control(addr, secret, options)?;
    control.send(&Message::Settle { session })?;
    match control.expect_control("the destination's settlement")? {
        Message::Settled { settlement } => Ok(settlement),
        other => Err(MigrationError::unexpected("a settlement", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes in which `session` was received and is resuming (its Go accepted).
    fn resuming(session: u64) -> Outcomes {
        let outcomes = Outcomes::default();
        assert!(outcomes.receiving(session));
        assert!(outcomes.begin_resume(session));
        outcomes
    }

    #[test]
    fn closing_fences_sessions_not_yet_told_to_run_and_refuses_new_ones() {
        let outcomes = Outcomes::default();
        assert!(outcomes.receiving(1));
        assert!(outcomes.receiving(2));
        assert!(outcomes.begin_resume(2));
        assert!(!outcomes.is_closed());
        outcomes.close();
        assert!(outcomes.is_closed());
        assert!(!outcomes.receiving(3), "no session begins once closed");
        assert!(!outcomes.begin_resume(1), "a late Go is refused");
        assert_eq!(outcomes.settle(1), Settlement::NotRunning);
        // The one already resuming finishes, and is answered for.
        assert_eq!(outcomes.resuming(), 1);
        outcomes.ended(2, true);
        assert_eq!(outcomes.resuming(), 0);
        assert_eq!(outcomes.settle(2), Settlement::Running);
    }

    #[test]
    fn a_question_before_go_fences_the_session_for_good() {
        let outcomes = Outcomes::default();
        assert!(outcomes.receiving(1));
        assert_eq!(outcomes.settle(1), Settlement::NotRunning);
        // The Go that arrives after the question is refused.
        assert!(!outcomes.begin_resume(1));
        assert_eq!(outcomes.settle(1), Settlement::NotRunning);
    }

    #[test]
    fn a_question_during_and_after_the_resume_gets_undecided_then_running() {
        let outcomes = resuming(2);
        assert_eq!(outcomes.settle(2), Settlement::Undecided);
        outcomes.ended(2, true);
        assert_eq!(outcomes.settle(2), Settlement::Running);
    }

    #[test]
    fn failed_and_unknown_sessions_are_not_running() {
        let outcomes = resuming(3);
        outcomes.ended(3, false);
        assert_eq!(outcomes.settle(3), Settlement::NotRunning);
        assert_eq!(outcomes.settle(99), Settlement::NotRunning);
        // An end for a session never begun here records nothing, and keeps nothing.
        outcomes.ended(100, true);
        outcomes.unadopted(101);
        assert_eq!(outcomes.settle(100), Settlement::NotRunning);
        assert_eq!(outcomes.book().sessions.len(), 1);
        let book = outcomes.book();
        assert_eq!((book.resumed.len(), book.discarded.len()), (0, 1));
    }

    #[test]
    fn a_vm_dropped_unadopted_did_not_run_unless_it_had() {
        let outcomes = resuming(1);
        assert_eq!(outcomes.settle(1), Settlement::Undecided);
        outcomes.unadopted(1);
        assert_eq!(outcomes.settle(1), Settlement::NotRunning);
        // Before its Go, and once fenced.
        assert!(outcomes.receiving(2));
        outcomes.unadopted(2);
        assert!(!outcomes.begin_resume(2));
        assert!(outcomes.receiving(3));
        assert_eq!(outcomes.settle(3), Settlement::NotRunning);
        outcomes.unadopted(3);
        assert_eq!(outcomes.settle(3), Settlement::NotRunning);
        // One that ran stays answered for as running.
        let outcomes = resuming(4);
        outcomes.ended(4, true);
        outcomes.unadopted(4);
        assert_eq!(outcomes.settle(4), Settlement::Running);
        let book = outcomes.book();
        assert_eq!((book.resumed.len(), book.discarded.len()), (1, 0));
    }

    #[test]
    fn ended_sessions_are_forgotten_oldest_first_beyond_the_bound() {
        let outcomes = Outcomes::default();
        for s in 0..REMEMBERED as u64 + 10 {
            assert!(outcomes.receiving(s));
            assert!(outcomes.begin_resume(s));
            outcomes.ended(s, true);
        }
        assert_eq!(outcomes.book().sessions.len(), REMEMBERED);
        assert_eq!(outcomes.settle(0), Settlement::NotRunning);
        assert_eq!(outcomes.settle(REMEMBERED as u64 + 9), Settlement::Running);
    }

    #[test]
    fn failed_sessions_however_many_never_push_out_one_whose_vm_ran() {
        let outcomes = resuming(u64::MAX);
        outcomes.ended(u64::MAX, true);
        // A peer that knows the secret opens and abandons sessions by the thousand.
        for s in 0..REMEMBERED as u64 + 10 {
            assert!(outcomes.receiving(s));
            outcomes.ended(s, false);
        }
        assert_eq!(outcomes.settle(u64::MAX), Settlement::Running);
        assert_eq!(outcomes.book().sessions.len(), REMEMBERED + 1);
    }
}
