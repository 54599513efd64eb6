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
    /// Starts `command` (`what` names it in errors) with its stdout piped.
    pub fn spawn(command: &mut Command, what: &str) -> anyhow::Result<Self> {
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
