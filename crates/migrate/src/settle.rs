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
//! A destination that restarted remembers the sessions whose VM ran there, from a record
//! it appends to ([`Outcomes::recorded`]): it may have moved such a VM on to a third host
//! before the restart, so "not running" would make the source run it a second time. Any
//! other session it does not know: that VM ended with its process (or never ran), so the
//! answer is `NotRunning`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
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
    /// Records `session`'s end (`outcome`): `true` if it was not ended before.
    fn end(&mut self, session: u64, outcome: Outcome) -> bool {
        // Not begun here (or forgotten): nothing to record, nor to remember for ever.
        let Some(was) = self.sessions.get_mut(&session) else {
            return false;
        };
        match std::mem::replace(was, outcome) {
            // Ended already: in the queue of ended ones once at most.
            Outcome::Resumed | Outcome::Discarded => return false,
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
        true
    }
}

/// Why the record of sessions whose VM ran here could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} the record of migrations received, {}", path.display())]
pub struct RecordError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The file that lists the sessions whose VM ran here, oldest first: 8 bytes (little
/// endian) each, appended as each VM resumes.
struct ResumedRecord {
    path: PathBuf,
    /// Opened to append: each record is one write, whole or (after a crash) torn at the
    /// end, where it is cut off at the next open.
    file: File,
    /// Sessions whose append failed (or came after one that failed), written by the
    /// next [`Outcomes::sync`]; held while the file is written, so that a repair and an
    /// append do not interleave.
    unwritten: Mutex<Vec<u64>>,
}

impl ResumedRecord {
    /// Opens (or creates) the record at `path` and reads the [`REMEMBERED`] newest
    /// sessions it lists, oldest first; rewrites it with only those when it holds more,
    /// so that it does not grow for ever.
    fn open(path: &Path) -> Result<(Self, Vec<u64>), RecordError> {
        let failed = |what| {
            let path = path.to_path_buf();
            move |source| RecordError { what, path, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(failed("open"))?;
        // Created here perhaps: its entry in the folder must outlast a power cut as much
        // as the sessions synced into it (a record gone after one answers "never ran"
        // for a VM that did, and its source resumes it too).
        crate::durable::sync_folder_of(path).map_err(failed("sync the folder of"))?;
        let len = file.metadata().map_err(failed("read"))?.len();
        let listed = len / 8;
        let kept = listed.min(REMEMBERED as u64);
        file.seek(SeekFrom::Start((listed - kept) * 8))
            .map_err(failed("read"))?;
        let mut bytes = vec![0u8; (kept * 8) as usize];
        file.read_exact(&mut bytes).map_err(failed("read"))?;
        let sessions: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if kept < listed {
            crate::durable::replace(path, &bytes).map_err(failed("rewrite"))?;
            return Self::open(path);
        }
        if len % 8 != 0 {
            // A record torn by a crash: the VM it names never got as far as its source
            // hearing it ran (the append comes before that), so it is not needed.
            file.set_len(listed * 8).map_err(failed("repair"))?;
        }
        let record = Self {
            path: path.to_path_buf(),
            file,
            unwritten: Mutex::default(),
        };
        Ok((record, sessions))
    }

    fn unwritten(&self) -> MutexGuard<'_, Vec<u64>> {
        self.unwritten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `session`; after a failed append, it waits with that one for
    /// [`Self::sync`], which puts the file back on its 8-byte grid first.
    fn append(&self, session: u64) {
        let mut unwritten = self.unwritten();
        if unwritten.is_empty() {
            let Err(source) = (&self.file).write_all(&session.to_le_bytes()) else {
                return;
            };
            let e = RecordError {
                what: "append to",
                path: self.path.clone(),
                source,
            };
            // Not fatal to the VM, which runs here now; but no VM leaves this host until
            // the record holds it ([`Outcomes::sync`] writes it first).
            tracing::error!("{}", crate::error_chain(&e));
        }
        if unwritten.len() < REMEMBERED {
            unwritten.push(session);
        }
    }

    /// Writes the sessions whose append failed (a partly written one cut off first),
    /// then syncs the file.
    fn sync(&self) -> Result<(), RecordError> {
        let failed = |what| {
            let path = self.path.clone();
            move |source| RecordError { what, path, source }
        };
        let mut unwritten = self.unwritten();
        if !unwritten.is_empty() {
            let len = self.file.metadata().map_err(failed("repair"))?.len();
            self.file.set_len(len / 8 * 8).map_err(failed("repair"))?;
            let bytes: Vec<u8> = unwritten.iter().flat_map(|s| s.to_le_bytes()).collect();
            (&self.file)
                .write_all(&bytes)
                .map_err(failed("append to"))?;
            unwritten.clear();
        }
        drop(unwritten);
        self.file.sync_data().map_err(failed("sync"))
    }
}

/// A destination's record of its incoming sessions, shared by the listener and whoever
/// else answers settle questions (the host's API, for a center relaying one).
#[derive(Clone, Default)]
pub struct Outcomes {
    book: Arc<Mutex<Book>>,
    /// Where the sessions whose VM ran are kept across restarts; none: in memory only.
    record: Option<Arc<ResumedRecord>>,
}

impl Outcomes {
    /// Outcomes that keep the sessions whose VM ran here in the file at `path` (created
    /// if missing), and know those it lists already: a host's, across its restarts.
    pub fn recorded(path: &Path) -> Result<Self, RecordError> {
        let (record, sessions) = ResumedRecord::open(path)?;
        let outcomes = Self {
            book: Arc::default(),
            record: Some(Arc::new(record)),
        };
        {
            let mut book = outcomes.book();
            for session in sessions {
                if book.sessions.insert(session, Outcome::Resumed).is_none() {
                    book.resumed.push_back(session);
                }
            }
        }
        Ok(outcomes)
    }

    /// Makes the record of the sessions whose VM ran here durable: before a VM leaves
    /// this host, the record that it ran here must survive a power loss (a restart
    /// that forgot it would let its earlier source run it again).
    pub fn sync(&self) -> Result<(), RecordError> {
        match &self.record {
            Some(record) => record.sync(),
            None => Ok(()),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // Each update is one insert: whole after a panic.
        self.book
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
        let newly = self.book().end(session, outcome);
        if let (true, true, Some(record)) = (ran, newly, &self.record) {
            record.append(session);
        }
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
    fn a_restarted_destination_still_answers_running_for_the_vms_that_ran_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resumed");
        let outcomes = Outcomes::recorded(&path).unwrap();
        for (session, ran) in [(7, true), (8, false), (9, true)] {
            assert!(outcomes.receiving(session));
            assert!(outcomes.begin_resume(session));
            outcomes.ended(session, ran);
        }
        // Ended twice, recorded once.
        outcomes.ended(7, true);
        outcomes.sync().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16);
        drop(outcomes);
        // A crash tore the next append.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[1, 2, 3]).unwrap();
        drop(file);
        let restarted = Outcomes::recorded(&path).unwrap();
        assert_eq!(restarted.settle(7), Settlement::Running);
        assert_eq!(restarted.settle(9), Settlement::Running);
        assert_eq!(restarted.settle(8), Settlement::NotRunning);
        // Appends go on whole after the torn one was cut off.
        assert!(restarted.receiving(10));
        assert!(restarted.begin_resume(10));
        restarted.ended(10, true);
        drop(restarted);
        let again = Outcomes::recorded(&path).unwrap();
        for s in [7, 9, 10] {
            assert_eq!(again.settle(s), Settlement::Running, "session {s}");
        }
        assert_eq!(again.book().resumed.len(), 3);
    }

    #[test]
    fn a_session_whose_append_failed_is_written_by_the_next_sync_on_the_grid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resumed");
        let outcomes = Outcomes::recorded(&path).unwrap();
        let record = outcomes.record.as_ref().unwrap();
        record.append(1);
        // An append of session 2 failed after 3 of its bytes (a disk full, say): it
        // waits for the sync, and so does the next one.
        (&record.file).write_all(&[2, 0, 0]).unwrap();
        record.unwritten().push(2);
        record.append(3);
        assert_eq!(record.unwritten().len(), 2);
        outcomes.sync().unwrap();
        assert!(record.unwritten().is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
        let restarted = Outcomes::recorded(&path).unwrap();
        for s in [1, 2, 3] {
            assert_eq!(restarted.settle(s), Settlement::Running, "session {s}");
        }
    }

    #[test]
    fn a_record_longer_than_what_is_remembered_is_rewritten_with_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resumed");
        let listed = REMEMBERED as u64 + 5;
        let bytes: Vec<u8> = (0..listed).flat_map(|s| s.to_le_bytes()).collect();
        std::fs::write(&path, bytes).unwrap();
        let outcomes = Outcomes::recorded(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            REMEMBERED as u64 * 8
        );
        assert_eq!(outcomes.settle(4), Settlement::NotRunning);
        assert_eq!(outcomes.settle(5), Settlement::Running);
        assert_eq!(outcomes.settle(listed - 1), Settlement::Running);
        let temporaries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(temporaries, 1, "only the record is left");
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
