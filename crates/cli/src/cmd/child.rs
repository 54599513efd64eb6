//! Child `ferry` processes a benchmark starts (a center, hosts, a simulator): killed when
//! dropped, and asked where they listen with a deadline.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// How long a child has to print its first line: a server says where it listens within
/// a second; one stuck before that must not hang the benchmark.
const FIRST_LINE_WITHIN: Duration = Duration::from_secs(60);

/// A child process, killed and waited for when dropped: it never outlives the benchmark,
/// whatever error ends it.
pub struct Killed(pub Child);

impl Killed {
    /// Starts `command` (`what` names it in errors) with its stdout piped. Killed by the
    /// kernel too when the benchmark is (a `kill`, which runs no drop): it gets SIGKILL
    /// when the thread that started it ends, and the benchmarks start theirs on their
    /// main thread.
    pub fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid only reads this process's id.
        let parent = unsafe { libc::getpid() };
        // SAFETY: between fork and exec the closure makes three system calls and reads a
        // value copied before the fork; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent ended before the request was made: nothing would send it.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = (command.stdout(Stdio::piped()).spawn())
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self(child))
    }

    /// The first line the child prints on its stdout (taken: the rest is left unread),
    /// within [`FIRST_LINE_WITHIN`]; an error names `what` where it exits or says
    /// nothing by then.
    pub fn first_line(&mut self, what: &str) -> anyhow::Result<String> {
        let stdout = (self.0.stdout.take()).with_context(|| format!("{what}'s stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // The reader ends when the child does: the kill on drop closes the pipe.
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
        });
        match rx.recv_timeout(FIRST_LINE_WITHIN) {
            Ok(Ok(line)) if !line.is_empty() => Ok(line),
            Ok(Ok(_)) => {
                bail!("{what} ended before saying where it listens")
            }
            Ok(Err(e)) => Err(e).with_context(|| format!("reading {what}'s first line")),
            Err(_) => bail!(
                "{what} said nothing within {} s",
                FIRST_LINE_WITHIN.as_secs()
            ),
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
    fn ended(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command's closing parenthesis.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    #[test]
    fn a_child_is_killed_when_what_started_it_is_gone_without_a_drop() {
        // Started on a thread that ends without dropping it, as a benchmark killed by a
        // signal ends without dropping its children.
        let pid = std::thread::spawn(|| {
            let child = Killed::spawn(Command::new("sleep").arg("60"), "sleep").unwrap();
            let pid = child.0.id();
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ended(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} outlived its starter"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Reaped, not left a zombie.
        let mut status = 0;
        // SAFETY: waits for our own child by its id; the status is written to a local.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(reaped, pid as libc::pid_t);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }
}
