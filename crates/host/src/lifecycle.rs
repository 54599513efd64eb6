//! One VM's life on a host, as one state machine: every state it can be in
//! ([`VmState`]), every move between them ([`Transition`]), and the capacity
//! [`Reservation`] it holds while it has the host's resources.
//!
//! ```text
//!  creating ──► running ──► migrating ──► switchover ──► migrated-away
//!                │  ▲          │               │  ▲            ▲
//!                │  └──────────┴── (failed or  │  │            │
//!                │     cancelled before Go) ◄──┘  │         (confirmed)
//!                │                          in-doubt ─────────┘ (released)
//!                │                              └──► running (destination has no copy)
//!                ├──► stopping ──► stopped
//!                └──► exited | failed   (the guest ended; also from migrating)
//! ```
//!
//! A switchover also goes back to migrating when the VM is resumed before the
//! destination was told to run it and its migration goes on (pre-copy after a replay's
//! tail gave way in the pause): it is throttled again, and its next switchover holds it
//! anew.
//!
//! A transition is one short critical section that checks and changes the state: it
//! never waits for the guest, the network or a pause, so readers never wait either.
//!
//! A transition that ends the VM's life here hands its reservation back to the caller
//! ([`Vacated`]), to drop once the VM's memory is freed: until then the host still holds
//! that memory, and must not promise it to another VM. The VM's memory may also be lent
//! to a reader outside the VM (a migration's source, [`Lifecycle::lend`]): while it is,
//! the reservation stays here, and is handed out when the last reader gives it back, the
//! owner counting as one until it drops what its transition handed it.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ferry_api::VmState;

use crate::capacity::Reservation;

/// A move of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Creating → running.
    Start,
    /// Running → migrating.
    Migrate,
    /// Migrating → switchover (the VM is paused for it).
    BeginSwitchover,
    /// Switchover → migrating: the VM runs again before the destination was told to run
    /// it, and its migration goes on (pre-copy after a replay's tail gave way).
    EndSwitchover,
    /// Migrating or switchover → running: the migration failed or was cancelled before
    /// the destination was told to run the VM.
    Abandon,
    /// Switchover → in-doubt.
    LoseConfirmation,
    /// Switchover → migrated-away: the destination confirmed it runs the VM.
    Leave,
    /// In-doubt → migrated-away: settled that the destination runs the VM.
    Release,
    /// In-doubt → running: the destination does not run it.
    ResumeHere,
    /// Running → stopping.
    Stop,
    /// Stopping → stopped.
    FinishStop,
    /// The guest ended (running or migrating) → exited or failed.
    End,
    /// Not a move: the VM's memory lent to a reader outside it (see [`Lifecycle::lend`]).
    Lend,
}

impl Transition {
    /// What the operation is called in messages.
    fn verb(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Migrate => "migrate",
            Self::BeginSwitchover => "switch over",
            Self::EndSwitchover => "end the switchover of",
            Self::Abandon => "abandon the migration of",
            Self::LoseConfirmation => "mark in doubt",
            Self::Leave => "complete the migration of",
            Self::Release => "release",
            Self::ResumeHere => "resume",
            Self::Stop => "stop",
            Self::FinishStop => "finish stopping",
            Self::End => "end",
            Self::Lend => "lend the memory of",
        }
    }
}

/// A transition refused in the state the VM is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} the VM: it is {state}", .transition.verb())]
pub struct TransitionError {
    /// The move asked for.
    pub transition: Transition,
    /// The state that refused it.
    pub state: VmState,
}

struct Stage {
    state: VmState,
    /// When its life here ended (the first ended state).
    ended_at: Option<Instant>,
    /// Held from creation (or a migration's acceptance) until the VM's life here ends
    /// and no reader has its memory.
    reservation: Option<Reservation>,
    /// Readers the VM's memory is lent to: they keep it mapped after the VM is released.
    lent: usize,
}

/// The capacity reservation of a VM whose life here just ended: given back when dropped,
/// which its owner does once the VM's memory is freed (freeing GiBs takes a while). When
/// the memory was lent as the life ended, the owner's is one more share of it instead,
/// given back when dropped: the last of the owner and the readers hands the room out.
#[must_use = "drop it once the VM's memory is freed"]
pub struct Vacated<'a> {
    /// Kept only to be dropped.
    _reservation: Option<Reservation>,
    /// The owner's share of lent memory, given back when dropped.
    share: Option<&'a Lifecycle>,
}

impl Drop for Vacated<'_> {
    fn drop(&mut self) {
        if let Some(life) = self.share.take() {
            drop(life.give_back());
        }
    }
}

impl std::fmt::Debug for Vacated<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vacated")
            .field("reservation", &self._reservation)
            .field("share", &self.share.is_some())
            .finish()
    }
}

/// A VM's state machine.
pub struct Lifecycle(Mutex<Stage>);

impl Lifecycle {
    /// A VM being created (or received) that holds `reservation`.
    pub fn new(reservation: Reservation) -> Self {
        Self(Mutex::new(Stage {
            state: VmState::Creating,
            ended_at: None,
            reservation: Some(reservation),
            lent: 0,
        }))
    }

    fn stage(&self) -> MutexGuard<'_, Stage> {
        // Each transition replaces the state in one assignment: whole after a panic.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state now.
    pub fn state(&self) -> VmState {
        self.stage().state.clone()
    }

    /// When the VM's life here ended, if it has.
    pub fn ended_at(&self) -> Option<Instant> {
        self.stage().ended_at
    }

    /// Makes transition `t` to the state `next` gives for the current one, or refuses it
    /// (`next` returns `None`). Ended states hand the reservation out, to the caller,
    /// unless the memory is lent: then the last reader to give it back gets it.
    fn apply(
        &self,
        t: Transition,
        next: impl FnOnce(&VmState) -> Option<VmState>,
    ) -> Result<Vacated<'_>, TransitionError> {
        let mut stage = self.stage();
        let Some(state) = next(&stage.state) else {
            return Err(TransitionError {
                transition: t,
                state: stage.state.clone(),
            });
        };
        let (vacated, share) = if state.has_ended() {
            stage.ended_at.get_or_insert_with(Instant::now);
            if stage.lent == 0 {
                (stage.reservation.take(), None)
            } else {
                // The owner still frees the VM's own mapping: a reader done before it
                // must not hand the room out meanwhile.
                stage.lent += 1;
                (None, Some(self))
            }
        } else {
            (None, None)
        };
        stage.state = state;
        Ok(Vacated {
            _reservation: vacated,
            share,
        })
    }

    /// Lends the VM's memory to a reader outside it (a migration's source), which gives
    /// it back with [`Self::give_back`]: until the last reader does, a VM whose life here
    /// ends keeps its reservation, as its memory is still mapped. Refused once its life
    /// here has ended (the memory may be freed already).
    pub fn lend(&self) -> Result<(), TransitionError> {
        let mut stage = self.stage();
        if stage.state.has_ended() {
            return Err(TransitionError {
                transition: Transition::Lend,
                state: stage.state.clone(),
            });
        }
        stage.lent += 1;
        Ok(())
    }

    /// A reader gives the VM's memory back (it no longer maps it): the reservation of a
    /// VM whose life here ended meanwhile comes out with the last one, to drop.
    pub fn give_back(&self) -> Vacated<'_> {
        let mut stage = self.stage();
        debug_assert!(stage.lent > 0, "memory given back that was not lent");
        stage.lent = stage.lent.saturating_sub(1);
        let vacated = if stage.lent == 0 && stage.state.has_ended() {
            stage.reservation.take()
        } else {
            None
        };
        Vacated {
            _reservation: vacated,
            share: None,
        }
    }

    /// Creating → running.
    pub fn start(&self) -> Result<(), TransitionError> {
        self.apply(Transition::Start, |s| {
            matches!(s, VmState::Creating).then_some(VmState::Running)
        })
        .map(drop)
    }

    /// Running → migrating to `to`. One migration at a time: a second is refused.
    pub fn migrate(&self, to: &str) -> Result<(), TransitionError> {
        self.apply(Transition::Migrate, |s| {
            matches!(s, VmState::Running).then(|| VmState::Migrating { to: to.into() })
        })
        .map(drop)
    }

    /// Migrating → switchover.
    pub fn begin_switchover(&self) -> Result<(), TransitionError> {
        self.apply(Transition::BeginSwitchover, |s| match s {
            VmState::Migrating { to } => Some(VmState::Switchover { to: to.clone() }),
            _ => None,
        })
        .map(drop)
    }

    /// Switchover → migrating: resumed before Go, the VM goes on being migrated. Only
    /// from a switchover: a VM in doubt, or no longer migrating, is not moved by it.
    pub fn end_switchover(&self) -> Result<(), TransitionError> {
        self.apply(Transition::EndSwitchover, |s| match s {
            VmState::Switchover { to } => Some(VmState::Migrating { to: to.clone() }),
            _ => None,
        })
        .map(drop)
    }

    /// Migrating or switchover → running (the migration ended before Go).
    pub fn abandon_migration(&self) -> Result<(), TransitionError> {
        self.apply(Transition::Abandon, |s| {
            matches!(s, VmState::Migrating { .. } | VmState::Switchover { .. })
                .then_some(VmState::Running)
        })
        .map(drop)
    }

    /// Switchover → in-doubt: Go was sent, the confirmation did not come.
    pub fn lose_confirmation(&self, reason: &str) -> Result<(), TransitionError> {
        self.apply(Transition::LoseConfirmation, |s| match s {
            VmState::Switchover { to } => Some(VmState::InDoubt {
                to: to.clone(),
                reason: reason.into(),
            }),
            _ => None,
        })
        .map(drop)
    }

    /// Switchover → migrated-away: the destination confirmed it runs the VM. Not from
    /// in-doubt: only a settlement of that migration ([`Self::release`]) moves it on.
    pub fn leave(&self) -> Result<Vacated<'_>, TransitionError> {
        self.apply(Transition::Leave, |s| match s {
            VmState::Switchover { to } => Some(VmState::MigratedAway { to: to.clone() }),
            _ => None,
        })
    }

    /// In-doubt → migrated-away: settled that the destination runs the VM. Not from a
    /// switchover, which may be a later migration's that is still undecided.
    pub fn release(&self) -> Result<Vacated<'_>, TransitionError> {
        self.apply(Transition::Release, |s| match s {
            VmState::InDoubt { to, .. } => Some(VmState::MigratedAway { to: to.clone() }),
            _ => None,
        })
    }

    /// In-doubt → running: the destination does not run it.
    pub fn resume_here(&self) -> Result<(), TransitionError> {
        self.apply(Transition::ResumeHere, |s| {
            matches!(s, VmState::InDoubt { .. }).then_some(VmState::Running)
        })
        .map(drop)
    }

    /// Running → stopping. A VM being migrated, or in doubt, or gone elsewhere, is not
    /// stopped here (the error says why, and where it went).
    pub fn stop(&self) -> Result<(), TransitionError> {
        self.apply(Transition::Stop, |s| {
            matches!(s, VmState::Running).then_some(VmState::Stopping)
        })
        .map(drop)
    }

    /// Stopping → stopped.
    pub fn finish_stop(&self) -> Result<Vacated<'_>, TransitionError> {
        self.apply(Transition::FinishStop, |s| {
            matches!(s, VmState::Stopping).then_some(VmState::Stopped)
        })
    }

    /// The guest ended as `ended` (exited or failed): from running or migrating (whose
    /// migration then fails), from creating (a VM that could not start), or from the
    /// switchover (a VM paused for it that could not run again after it failed).
    pub fn end(&self, ended: VmState) -> Result<Vacated<'_>, TransitionError> {
        debug_assert!(matches!(
            ended,
            VmState::Exited { .. } | VmState::Failed { .. }
        ));
        self.apply(Transition::End, |s| {
            matches!(
                s,
                VmState::Creating
                    | VmState::Running
                    | VmState::Migrating { .. }
                    | VmState::Switchover { .. }
            )
            .then_some(ended)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::{Amount, Ledger};

    fn vm() -> (Ledger, Lifecycle) {
        let ledger = Ledger::new(Amount {
            memory: 1 << 30,
            accel: 1 << 30,
        });
        let life = Lifecycle::new(ledger.reserve(Amount::for_vm(64 << 20, 0)).unwrap());
        (ledger, life)
    }

    /// A VM that started and is in its switchover to b:1.
    fn in_switchover() -> (Ledger, Lifecycle) {
        let (ledger, life) = vm();
        life.start().unwrap();
        life.migrate("b:1").unwrap();
        life.begin_switchover().unwrap();
        (ledger, life)
    }

    #[test]
    fn a_migration_runs_through_switchover_and_gives_the_capacity_back() {
        let (ledger, life) = vm();
        assert_eq!(life.state(), VmState::Creating);
        life.start().unwrap();
        life.migrate("b:1").unwrap();
        assert_eq!(life.state().name(), "migrating");
        life.begin_switchover().unwrap();
        assert!(life.state().is_running() && life.state().is_live());
        assert_eq!(ledger.held().memory, 64 << 20);
        let vacated = life.leave().unwrap();
        assert_eq!(life.state(), VmState::MigratedAway { to: "b:1".into() });
        drop(vacated);
        assert_eq!(ledger.held().memory, 0, "a VM that left holds nothing");
    }

    #[test]
    fn a_vm_that_cannot_run_again_after_a_failed_switchover_ends_and_gives_the_capacity_back() {
        let (ledger, life) = in_switchover();
        let failed = VmState::Failed {
            error: "cannot resume".into(),
        };
        drop(life.end(failed.clone()).unwrap());
        assert_eq!(life.state(), failed);
        assert_eq!(ledger.held().memory, 0);
        // Ended for good: neither resolved nor resumed.
        assert!(life.resume_here().is_err());
    }

    #[test]
    fn a_switchover_that_gives_way_before_go_goes_back_to_migrating_and_only_it_does() {
        let (ledger, life) = in_switchover();
        life.end_switchover().unwrap();
        assert_eq!(life.state(), VmState::Migrating { to: "b:1".into() });
        assert_eq!(ledger.held().memory, 64 << 20);
        // Still being migrated: the next switchover begins as the first did.
        assert!(life.stop().is_err());
        life.begin_switchover().unwrap();
        assert_eq!(life.state(), VmState::Switchover { to: "b:1".into() });
        // Refused outside a switchover: migrating, in doubt, running.
        life.end_switchover().unwrap();
        let twice = life.end_switchover().unwrap_err();
        assert_eq!(twice.transition, Transition::EndSwitchover);
        assert_eq!(twice.state, VmState::Migrating { to: "b:1".into() });
        life.begin_switchover().unwrap();
        life.lose_confirmation("timed out").unwrap();
        assert!(life.end_switchover().is_err());
        assert_eq!(life.state().name(), "in-doubt");
        life.resume_here().unwrap();
        assert!(life.end_switchover().is_err());
        assert_eq!(life.state(), VmState::Running);
    }

    #[test]
    fn a_second_migration_and_a_stop_during_one_are_refused() {
        let (_ledger, life) = vm();
        life.start().unwrap();
        life.migrate("b:1").unwrap();
        let second = life.migrate("c:1").unwrap_err();
        assert_eq!(second.transition, Transition::Migrate);
        assert!(
            second.to_string().contains("being migrated to b:1"),
            "{second}"
        );
        let stop = life.stop().unwrap_err();
        assert_eq!(stop.state, VmState::Migrating { to: "b:1".into() });
        life.begin_switchover().unwrap();
        assert!(life.stop().is_err());
        assert!(life.migrate("c:1").is_err());
        // A failure before Go resumes it here, and then both work again.
        life.abandon_migration().unwrap();
        life.migrate("c:1").unwrap();
        life.abandon_migration().unwrap();
        life.stop().unwrap();
        drop(life.finish_stop().unwrap());
        assert_eq!(life.state(), VmState::Stopped);
    }

    #[test]
    fn an_in_doubt_vm_is_not_running_holds_its_capacity_and_resolves_either_way() {
        for resolved_here in [true, false] {
            let (ledger, life) = in_switchover();
            life.lose_confirmation("connection reset").unwrap();
            let state = life.state();
            assert_eq!(state.name(), "in-doubt");
            assert!(!state.is_running() && state.is_live());
            assert!(state.to_string().contains("connection reset"), "{state}");
            assert_eq!(ledger.held().memory, 64 << 20);
            // Nothing but a resolution moves it.
            assert!(life.stop().is_err());
            assert!(life.migrate("c:1").is_err());
            assert!(life.abandon_migration().is_err());
            if resolved_here {
                life.resume_here().unwrap();
                assert_eq!(life.state(), VmState::Running);
                assert_eq!(ledger.held().memory, 64 << 20);
            } else {
                drop(life.release().unwrap());
                assert_eq!(ledger.held().memory, 0);
                assert!(life.resume_here().is_err());
            }
        }
    }

    #[test]
    fn a_vm_that_left_refuses_a_stop_and_says_where_it_went() {
        let (_ledger, life) = in_switchover();
        drop(life.leave().unwrap());
        let stop = life.stop().unwrap_err();
        assert!(stop.to_string().contains("migrating at b:1"), "{stop}");
        assert!(life.end(VmState::Exited { code: 0 }).is_err());
    }

    #[test]
    fn a_guest_that_ends_gives_the_capacity_back_once() {
        let (ledger, life) = vm();
        life.start().unwrap();
        life.migrate("b:1").unwrap();
        drop(life.end(VmState::Exited { code: 3 }).unwrap());
        assert_eq!(ledger.held().memory, 0);
        // The migration's own failure path cannot bring it back.
        assert!(life.abandon_migration().is_err());
        assert!(life.end(VmState::Exited { code: 0 }).is_err());
        assert_eq!(life.state(), VmState::Exited { code: 3 });
    }

    #[test]
    fn a_vm_whose_life_ends_holds_its_capacity_until_its_memory_is_freed() {
        // Leaving, ending and stopping: the caller frees the memory, then the room.
        type End = fn(&Lifecycle) -> Result<Vacated<'_>, TransitionError>;
        let ends: [(&str, End); 3] = [
            ("leave", |life| {
                life.migrate("b:1")?;
                life.begin_switchover()?;
                life.leave()
            }),
            ("end", |life| life.end(VmState::Exited { code: 0 })),
            ("stop", |life| {
                life.stop()?;
                life.finish_stop()
            }),
        ];
        for (how, end) in ends {
            let (ledger, life) = vm();
            life.start().unwrap();
            let vacated = end(&life).unwrap();
            assert!(life.state().has_ended(), "{how}");
            assert_eq!(
                ledger.held().memory,
                64 << 20,
                "{how}: memory not yet freed"
            );
            drop(vacated);
            assert_eq!(ledger.held().memory, 0, "{how}");
        }
    }

    #[test]
    fn a_vm_that_ends_while_its_memory_is_lent_holds_its_capacity_until_the_last_reader_is_done() {
        let (ledger, life) = vm();
        life.start().unwrap();
        life.migrate("b:1").unwrap();
        // Two readers (an earlier migration's source may still be letting go).
        life.lend().unwrap();
        life.lend().unwrap();
        drop(life.end(VmState::Exited { code: 0 }).unwrap());
        assert_eq!(life.state(), VmState::Exited { code: 0 });
        assert_eq!(
            ledger.held().memory,
            64 << 20,
            "still mapped by its readers"
        );
        // An ended VM's memory is lent to nobody else.
        let refused = life.lend().unwrap_err();
        assert_eq!(refused.transition, Transition::Lend);
        drop(life.give_back());
        assert_eq!(ledger.held().memory, 64 << 20);
        drop(life.give_back());
        assert_eq!(ledger.held().memory, 0);
        // The owner, still freeing the VM's own mapping when the last reader is done,
        // holds the room until it is.
        let (ledger, life) = vm();
        life.start().unwrap();
        life.lend().unwrap();
        let vacated = life.end(VmState::Exited { code: 0 }).unwrap();
        drop(life.give_back());
        assert_eq!(ledger.held().memory, 64 << 20, "the owner still frees it");
        drop(vacated);
        assert_eq!(ledger.held().memory, 0);
        // A reader done with a VM that lives on gives nothing back.
        let (ledger, life) = vm();
        life.start().unwrap();
        life.lend().unwrap();
        drop(life.give_back());
        assert_eq!(ledger.held().memory, 64 << 20);
    }

    #[test]
    fn only_a_settlement_releases_an_in_doubt_vm_and_only_a_confirmation_one_in_switchover() {
        let (ledger, life) = in_switchover();
        // A settlement of an earlier migration, in doubt no more, finds this one's
        // switchover: it must not release the VM.
        let refused = life.release().unwrap_err();
        assert_eq!(refused.transition, Transition::Release);
        assert_eq!(life.state(), VmState::Switchover { to: "b:1".into() });
        life.lose_confirmation("timed out").unwrap();
        // In doubt: the migration thread's confirmation path no longer applies.
        assert!(life.leave().is_err());
        drop(life.release().unwrap());
        assert_eq!(life.state(), VmState::MigratedAway { to: "b:1".into() });
        assert_eq!(ledger.held().memory, 0);
    }

    #[test]
    fn racing_migrations_and_stops_have_one_winner() {
        for _ in 0..200 {
            let (_ledger, life) = vm();
            life.start().unwrap();
            let barrier = std::sync::Barrier::new(3);
            let wins: Vec<bool> = std::thread::scope(|scope| {
                let tries = [
                    scope.spawn(|| {
                        barrier.wait();
                        life.migrate("b:1").is_ok()
                    }),
                    scope.spawn(|| {
                        barrier.wait();
                        life.migrate("c:1").is_ok()
                    }),
                    scope.spawn(|| {
                        barrier.wait();
                        life.stop().is_ok()
                    }),
                ];
                tries.map(|t| t.join().unwrap()).to_vec()
            });
            assert_eq!(wins.iter().filter(|&&w| w).count(), 1, "{wins:?}");
        }
    }

    #[test]
    fn the_api_spells_each_state_as_its_name() {
        for state in [
            VmState::Creating,
            VmState::Running,
            VmState::Migrating { to: "b".into() },
            VmState::Switchover { to: "b".into() },
            VmState::InDoubt {
                to: "b".into(),
                reason: "r".into(),
            },
            VmState::MigratedAway { to: "b".into() },
            VmState::Stopping,
            VmState::Stopped,
            VmState::Exited { code: 1 },
            VmState::Failed { error: "e".into() },
        ] {
            let json = serde_json::to_value(&state).unwrap();
            assert_eq!(json["state"], state.name());
            assert_eq!(serde_json::from_value::<VmState>(json).unwrap(), state);
        }
    }
}
