//! The priority of a VM's host threads. A host runs them below its own (its
//! `guest_nice`), so that busy guests cannot starve its API and migrations. When it must
//! wait on them (a pause waits for the kernel in flight), it lifts them to its own
//! priority meanwhile: otherwise whatever else runs would stretch the pause. Work that
//! no VM and no client waits for (freeing a VM that left) runs below them all. The vCPUs
//! of a VM with an accelerator are SCHED_BATCH, so that the device thread waking one
//! does not give it its core ([`woken_without_preempting`]), and back in the default
//! class while the host waits on them ([`Preempting`]).

use std::path::Path;
use std::sync::{Mutex, Once, PoisonError};

/// The nice value of work that nothing waits for: the lowest there is.
pub const BACKGROUND_NICE: i32 = 19;

/// The calling thread's nice value.
fn own_nice() -> i32 {
    // SAFETY: getpriority on the calling thread only reads its nice value.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Sets thread `tid`'s nice value (`tid` 0: the calling thread).
fn set_nice(tid: libc::pid_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority changes one thread's nice value; it touches no memory of ours.
    // PRIO_PROCESS with a thread id applies to that thread alone on Linux.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets thread `tid`'s scheduling policy, one of the non-real-time ones (at its nice
/// value).
fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with a valid sched_param only changes one thread's
    // scheduling policy; it keeps no pointer.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Thread `tid`'s scheduling policy, if it has one (it exists).
fn policy_of(tid: libc::pid_t) -> Option<libc::c_int> {
    // SAFETY: sched_getscheduler only reads a thread's policy.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    (policy >= 0).then_some(policy)
}

/// Whether `tid` is a thread of this process: a thread id outlives its thread as a
/// number that another process's thread may take.
fn is_ours(tid: libc::pid_t) -> bool {
    Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// Schedules vCPU thread `tid` of a VM with an accelerator as SCHED_BATCH, at its nice
/// value: woken, it waits for a free core or the next tick rather than preempting the
/// thread that woke it. A vCPU sleeps in the accelerator's waits, and the device thread
/// wakes it, three times a decoded token: on a host whose other cores were busy (the
/// device's other kernel thread), the vCPU took that thread's core for the 100 to 150 µs
/// the guest then ran, while the device had the next token's commands queued (a wake-up
/// took 133 µs of the device thread, 4.5 µs now). Where it cannot be set, the thread
/// stays as it is. A host waiting on the vCPU puts it back meanwhile ([`Preempting`]).
pub(crate) fn woken_without_preempting(tid: libc::pid_t) {
    if let Err(error) = set_policy(tid, libc::SCHED_BATCH) {
        tracing::debug!(%error, "a vCPU thread stays in the default scheduling class");
    }
}

/// vCPU threads of [`woken_without_preempting`] back in the default class while the
/// host waits on them (a pause kicks each, which must then run at once, not at the next
/// tick); SCHED_BATCH again when dropped.
pub(crate) struct Preempting(Vec<libc::pid_t>);

impl Preempting {
    /// Puts those of `tids` that are SCHED_BATCH threads of this process back in the
    /// default class.
    pub(crate) fn vcpus(tids: impl IntoIterator<Item = libc::pid_t>) -> Self {
        let batch = |&tid: &libc::pid_t| is_ours(tid) && policy_of(tid) == Some(libc::SCHED_BATCH);
        let tids = tids
            .into_iter()
            .filter(batch)
            .filter(|&tid| set_policy(tid, libc::SCHED_OTHER).is_ok())
            .collect();
        Self(tids)
    }
}

impl Drop for Preempting {
    fn drop(&mut self) {
        for &tid in &self.0 {
            // A thread that ended meanwhile is gone; one whose id was taken is not ours.
            if is_ours(tid) {
                let _ = set_policy(tid, libc::SCHED_BATCH);
            }
        }
    }
}

/// Runs `f` on a short-lived thread at nice value `nice`. A Linux thread starts at its
/// creator's nice value, so every thread `f` starts (vCPUs, an accelerator's device and
/// compute threads) runs at `nice` for its whole life, whoever creates the VM. Where the
/// value cannot be set, or no thread can be started, they run at the host's.
pub(crate) fn at_guest_priority<T: Send>(nice: i32, f: impl FnOnce() -> T + Send) -> T {
    if nice == 0 {
        return f();
    }
    on_thread_at(nice, f, |error| {
        tracing::warn!(
            nice,
            %error,
            "cannot lower the VM's thread priority; its threads run at the host's"
        );
    })
}

/// Runs `f` at [`BACKGROUND_NICE`] on a short-lived thread, and returns what it returns:
/// it then takes only the time the VMs leave, and a step of a VM that just arrived from
/// this host is not slowed by the freeing of the one that left. Where no thread can be
/// started, `f` runs here, at the caller's priority.
pub fn at_background_priority<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    on_thread_at(BACKGROUND_NICE, f, |error| {
        tracing::debug!(%error, "background work runs at the host's priority");
    })
}

/// Runs `f` on a short-lived thread whose nice value is set to `nice` first (`failed`
/// says why it could not be); where no thread can be started (out of threads or
/// memory), `f` runs here, at the caller's priority, rather than fail.
fn on_thread_at<T: Send>(
    nice: i32,
    f: impl FnOnce() -> T + Send,
    failed: impl FnOnce(std::io::Error) + Send,
) -> T {
    // Shared with the thread, so that `f` is still here if the thread never starts.
    let job = Mutex::new(Some(f));
    let take = || {
        job.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .expect("the job runs once")
    };
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new().spawn_scoped(scope, || {
            if let Err(error) = set_nice(0, nice) {
                failed(error);
            }
            take()()
        });
        match spawned {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(error) => {
                tracing::warn!(%error, nice, "cannot start a thread at a lower priority: the work runs here");
                take()()
            }
        }
    })
}

/// A VM's threads lifted to the priority of the thread that waits on them; put back at
/// the guest's when dropped.
pub(crate) struct Lifted {
    tids: Vec<libc::pid_t>,
    guest_nice: i32,
}

impl Lifted {
    /// Lifts `tids` (threads of this process, run at `guest_nice`) to the calling
    /// thread's priority. Raising a priority needs CAP_SYS_NICE: without it this says so
    /// once and lifts nothing.
    pub(crate) fn to_callers(tids: impl IntoIterator<Item = libc::pid_t>, guest_nice: i32) -> Self {
        let ours = own_nice();
        let mut lifted = Vec::new();
        if ours < guest_nice {
            for tid in tids {
                // Only threads this process still has.
                if !is_ours(tid) {
                    continue;
                }
                if let Err(error) = set_nice(tid, ours) {
                    static SAID: Once = Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(
                            %error,
                            "cannot lift a VM's threads to the host's priority while pausing it (that needs CAP_SYS_NICE): under CPU contention a pause waits longer for the kernel in flight"
                        );
                    });
                    break;
                }
                lifted.push(tid);
            }
        }
        Self {
            tids: lifted,
            guest_nice,
        }
    }
}

impl Drop for Lifted {
    fn drop(&mut self) {
        for &tid in &self.tids {
            // Lowering a priority needs no right; a thread that ended meanwhile is gone.
            let _ = set_nice(tid, self.guest_nice);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn nice_of(tid: libc::pid_t) -> i32 {
        // SAFETY: getpriority only reads a thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    #[test]
    fn threads_started_at_guest_priority_keep_it_and_the_caller_does_not() {
        let before = own_nice();
        let nice = (before + 5).min(19);
        let (builder, started) = at_guest_priority(nice, || {
            let builder = own_nice();
            let started = std::thread::spawn(own_nice).join().unwrap();
            (builder, started)
        });
        assert_eq!((builder, started), (nice, nice));
        assert_eq!(own_nice(), before, "the caller's priority is unchanged");
        assert_eq!(at_guest_priority(0, own_nice), before, "0: run in place");
    }

    #[test]
    fn background_work_runs_at_the_lowest_priority_and_the_caller_keeps_its_own() {
        let before = own_nice();
        let (nice, result) = at_background_priority(|| (own_nice(), 6 * 7));
        assert_eq!((nice, result), (BACKGROUND_NICE, 42));
        assert_eq!(own_nice(), before, "the caller's priority is unchanged");
        let panicked = std::panic::catch_unwind(|| at_background_priority(|| panic!("boom")));
        assert!(panicked.is_err(), "a panic reaches the caller");
    }

    #[test]
    fn batch_vcpus_preempt_while_waited_on_and_are_batch_again_after() {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let other = std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() }
        });
        let ended = other.join().unwrap();
        woken_without_preempting(tid);
        assert_eq!(policy_of(tid), Some(libc::SCHED_BATCH));
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        // A thread of the default class, an ended one and one not ours are left alone.
        let preempting = Preempting::vcpus([tid, me, ended, libc::pid_t::MAX]);
        assert_eq!(preempting.0, [tid]);
        assert_eq!(policy_of(tid), Some(libc::SCHED_OTHER));
        drop(preempting);
        assert_eq!(policy_of(tid), Some(libc::SCHED_BATCH));
        assert_eq!(
            policy_of(me),
            Some(libc::SCHED_OTHER),
            "the caller's class is unchanged"
        );
        drop(stop_tx);
        thread.join().unwrap();
    }

    #[test]
    fn lifted_threads_run_at_their_waiters_priority_until_dropped() {
        let ours = own_nice();
        let guest = (ours + 5).min(19);
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = at_guest_priority(guest, || {
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
            })
        });
        let tid = tid_rx.recv().unwrap();
        assert_eq!(nice_of(tid), guest);
        // An id this process has no thread of is left alone.
        let lifted = Lifted::to_callers([tid, libc::pid_t::MAX], guest);
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(nice_of(tid), ours, "root may raise a priority");
            assert_eq!(lifted.tids, [tid]);
        } else {
            eprintln!("not root: checking only that nothing is lifted without CAP_SYS_NICE");
            assert_eq!(nice_of(tid), guest);
        }
        drop(lifted);
        assert_eq!(nice_of(tid), guest, "put back at the guest's priority");
        drop(stop_tx);
        thread.join().unwrap();
    }
}
