//! The console: bytes the guest writes to `port::CONSOLE`, echoed to a sink (stdout for
//! `ferry run`) and kept in a bounded tail for daemons and tests.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Bytes of console output kept in memory.
pub const CONSOLE_TAIL_CAPACITY: usize = 64 * 1024;

/// The value of the last `key=value` word in console text (workloads print their
/// progress and results that way).
pub fn last_field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console.lines().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    })
}

/// Where console output goes besides the tail.
pub enum ConsoleSink {
    /// Only the tail.
    None,
    /// Also the host's stdout, as it arrives.
    Stdout,
}

/// Saved console state: the tail, so a restored VM's history is whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Last bytes written, at most [`CONSOLE_TAIL_CAPACITY`].
    pub tail: Vec<u8>,
}

/// The console device.
pub struct Console {
    sink: ConsoleSink,
    tail: Arc<Mutex<VecDeque<u8>>>,
}

/// The console's tail as other threads read it, without the VM (kept after it ends).
#[derive(Clone)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// The tail as (lossy) text.
    pub fn text(&self) -> String {
        let tail = self.0.lock().expect("console lock");
        let (a, b) = tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

impl Console {
    /// A console with an empty tail.
    pub fn new(sink: ConsoleSink) -> Self {
        Self {
            sink,
            tail: Arc::new(Mutex::new(VecDeque::with_capacity(CONSOLE_TAIL_CAPACITY))),
        }
    }

    /// Handles guest output.
    pub fn write(&self, bytes: &[u8]) {
        if let ConsoleSink::Stdout = self.sink {
            let mut out = std::io::stdout().lock();
            // The guest must not be stopped by a closed stdout; its output is in the tail.
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
        let mut tail = self.tail.lock().expect("console lock");
        let keep = bytes.len().min(CONSOLE_TAIL_CAPACITY);
        let overflow = (tail.len() + keep).saturating_sub(CONSOLE_TAIL_CAPACITY);
        tail.drain(..overflow);
        tail.extend(&bytes[bytes.len() - keep..]);
    }

    /// The tail as (lossy) text.
    pub fn tail_text(&self) -> String {
        self.tail_handle().text()
    }

    /// The tail, readable from other threads.
    pub fn tail_handle(&self) -> ConsoleTail {
        ConsoleTail(self.tail.clone())
    }

    /// Saves the tail.
    pub fn save(&self) -> ConsoleState {
        ConsoleState {
            tail: self
                .tail
                .lock()
                .expect("console lock")
                .iter()
                .copied()
                .collect(),
        }
    }

    /// A console holding a saved tail (cut to capacity: the state came from a file).
    pub fn restore(sink: ConsoleSink, state: &ConsoleState) -> Self {
        let console = Self::new(sink);
        let start = state.tail.len().saturating_sub(CONSOLE_TAIL_CAPACITY);
        console
            .tail
            .lock()
            .expect("console lock")
            .extend(&state.tail[start..]);
        console
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_is_bounded_and_keeps_the_newest_bytes() {
        let console = Console::new(ConsoleSink::None);
        console.write(&vec![b'a'; CONSOLE_TAIL_CAPACITY - 2]);
        console.write(b"xyz");
        let text = console.tail_text();
        assert_eq!(text.len(), CONSOLE_TAIL_CAPACITY);
        assert!(text.ends_with("axyz") && text.starts_with('a'));
        console.write(&vec![b'b'; CONSOLE_TAIL_CAPACITY + 5]);
        assert!(console.tail_text().bytes().all(|b| b == b'b'));
    }

    #[test]
    fn save_restore_round_trip() {
        let console = Console::new(ConsoleSink::None);
        console.write(b"hello\n");
        let restored = Console::restore(ConsoleSink::None, &console.save());
        assert_eq!(restored.tail_text(), "hello\n");
    }
}
