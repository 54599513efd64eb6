//! The console: bytes the guest writes to `port::CONSOLE`, echoed to a sink (stdout for
//! `ferry run`) and kept in a bounded tail for daemons and tests.
//!
//! The echo is written by a thread of its own, from a bounded queue: a reader that stops
//! reading (a paused pager) must not block the vCPU, and with it a pause of the VM; nor,
//! for longer than [`ECHO_DRAIN_WAIT`], the console's end (a terminal stopped by Ctrl-S
//! would hold it for ever). On a terminal the guest's bytes are shown, not obeyed: escape
//! sequences and other control characters could otherwise rewrite the operator's screen
//! or set its title.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

/// Bytes of console output kept in memory.
pub const CONSOLE_TAIL_CAPACITY: usize = 64 * 1024;

/// Bytes of echo waiting for a slow reader; what comes beyond is dropped (and counted).
pub const ECHO_QUEUE_CAPACITY: usize = 4 << 20;

/// How long a console's end waits for its echo to write out what is queued; a writer
/// still blocked then (a reader that stopped reading) is left to end on its own, its
/// queue emptied, writing nothing more.
pub const ECHO_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    echo: Option<Echo>,
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
        let echo = match sink {
            ConsoleSink::None => None,
            ConsoleSink::Stdout => {
                let terminal = std::io::stdout().is_terminal();
                Some(Echo::start(Box::new(std::io::stdout()), terminal))
            }
        };
        Self::with_echo(echo)
    }

    fn with_echo(echo: Option<Echo>) -> Self {
        Self {
            echo,
            tail: Arc::new(Mutex::new(VecDeque::with_capacity(CONSOLE_TAIL_CAPACITY))),
        }
    }

    /// Handles guest output.
    pub fn write(&self, bytes: &[u8]) {
        if let Some(echo) = &self.echo {
            echo.queue(bytes);
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

/// The echo of a console to a writer, by a thread of its own.
struct Echo {
    queue: Arc<EchoQueue>,
    writer: Option<JoinHandle<()>>,
}

/// Bytes on their way to the echo's writer.
#[derive(Default)]
struct EchoQueue {
    state: Mutex<EchoState>,
    /// Something to write, or the console's end: for the writer.
    ready: Condvar,
    /// The writer ended: for the console's end.
    ended: Condvar,
}

#[derive(Default)]
struct EchoState {
    bytes: Vec<u8>,
    /// Bytes dropped since the writer last took the queue (it was full).
    dropped: u64,
    phase: EchoPhase,
}

/// Where an echo is in its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EchoPhase {
    /// The console is there: what it queues is written.
    #[default]
    Open,
    /// The console is gone: the writer writes what is queued, then ends.
    Closing,
    /// The console is gone and waited [`ECHO_DRAIN_WAIT`] for a writer blocked writing:
    /// the queue is emptied, and the writer ends as soon as its write returns.
    Abandoned,
    /// The writer ended: its work done, or its reader gone.
    Ended,
}

impl Echo {
    /// Starts the writer thread; `terminal` shows control characters instead of writing
    /// them (see [`TerminalText`]).
    fn start(out: Box<dyn Write + Send>, terminal: bool) -> Self {
        let queue = Arc::new(EchoQueue::default());
        let writing = queue.clone();
        let writer = std::thread::Builder::new()
            .name("console-echo".into())
            .spawn(move || write_echo(&writing, out, terminal.then(TerminalText::default)))
            // Without a thread the echo is lost, not the VM: the tail keeps the output.
            .map_err(|e| tracing::warn!("no console echo: cannot start its thread: {e}"))
            .ok();
        Self { queue, writer }
    }

    /// Queues guest output; drops what does not fit, without waiting for the writer.
    fn queue(&self, bytes: &[u8]) {
        if self.writer.is_none() {
            return;
        }
        let mut state = self.queue.lock();
        // Its reader is gone: the output is in the tail.
        if state.phase == EchoPhase::Ended {
            return;
        }
        let room = ECHO_QUEUE_CAPACITY - state.bytes.len().min(ECHO_QUEUE_CAPACITY);
        let taken = bytes.len().min(room);
        state.bytes.extend_from_slice(&bytes[..taken]);
        state.dropped += (bytes.len() - taken) as u64;
        drop(state);
        self.queue.ready.notify_one();
    }
}

impl Drop for Echo {
    /// Writes out what is queued, so the guest's last words reach the reader; waits for
    /// that at most [`ECHO_DRAIN_WAIT`], then leaves the writer to end on its own.
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let mut state = self.queue.lock();
        if state.phase == EchoPhase::Open {
            state.phase = EchoPhase::Closing;
        }
        self.queue.ready.notify_one();
        let (mut state, _) = self
            .queue
            .ended
            .wait_timeout_while(state, ECHO_DRAIN_WAIT, |s| s.phase != EchoPhase::Ended)
            .unwrap_or_else(PoisonError::into_inner);
        if state.phase == EchoPhase::Ended {
            drop(state);
            let _ = writer.join();
            return;
        }
        // Blocked in a write (a terminal stopped by Ctrl-S, a pipe nobody reads): what
        // is queued is let go, so a thread left behind holds no more than its batch.
        state.phase = EchoPhase::Abandoned;
        state.bytes = Vec::new();
        drop(state);
        tracing::warn!(
            "the console's echo was not written out within {ECHO_DRAIN_WAIT:?}: its reader \
             stopped reading; the rest is dropped (the console's tail keeps its end)"
        );
        // Detached: it ends once its write returns.
        drop(writer);
    }
}

impl EchoQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, EchoState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The echo's writer thread: writes what is queued until the console is gone or the
/// reader is (a closed pipe: the output is in the tail); says it ended however it does.
fn write_echo(queue: &EchoQueue, out: Box<dyn Write + Send>, terminal: Option<TerminalText>) {
    /// Marks the echo ended when the writer returns, or unwinds.
    struct Ends<'a>(&'a EchoQueue);
    impl Drop for Ends<'_> {
        fn drop(&mut self) {
            self.0.lock().phase = EchoPhase::Ended;
            self.0.ended.notify_all();
        }
    }
    let _ends = Ends(queue);
    write_queued(queue, out, terminal);
}

/// [`write_echo`]'s work: returns once the console's end is written out, the console
/// stopped waiting for it, or the reader is gone.
fn write_queued(
    queue: &EchoQueue,
    mut out: Box<dyn Write + Send>,
    mut terminal: Option<TerminalText>,
) {
    // Swapped with the queue's: both keep their room, so queueing allocates nothing
    // once output has flowed a while.
    let (mut bytes, mut shown) = (Vec::new(), Vec::new());
    loop {
        let mut state = queue
            .ready
            .wait_while(queue.lock(), |s| {
                s.bytes.is_empty() && s.dropped == 0 && s.phase == EchoPhase::Open
            })
            .unwrap_or_else(PoisonError::into_inner);
        let closed = match state.phase {
            EchoPhase::Open => false,
            EchoPhase::Closing => true,
            // Nobody waits for the rest any more.
            EchoPhase::Abandoned | EchoPhase::Ended => return,
        };
        bytes.clear();
        std::mem::swap(&mut bytes, &mut state.bytes);
        let dropped = std::mem::take(&mut state.dropped);
        drop(state);
        let text = match terminal.as_mut() {
            Some(terminal) => {
                shown.clear();
                terminal.show(&bytes, &mut shown);
                if closed {
                    terminal.finish(&mut shown);
                }
                &shown
            }
            None => &bytes,
        };
        let mut written = out.write_all(text);
        if dropped > 0 {
            written = written.and_then(|()| {
                writeln!(
                    out,
                    "\n[ferry: {dropped} bytes of the guest's console output were dropped here: this output was not read fast enough]"
                )
            });
        }
        if written.and_then(|()| out.flush()).is_err() || closed {
            return;
        }
    }
}

/// `text` (from a guest) as a terminal should be given it when `terminal`: its control
/// characters shown, not obeyed (escape as `^[`, a carriage return not ending a line as
/// `^M`, bidirectional overrides as U+FFFD); as it is otherwise (a pipe, a file: the
/// bytes are the guest's).
pub fn for_terminal(text: &str, terminal: bool) -> std::borrow::Cow<'_, str> {
    if !terminal {
        return text.into();
    }
    let mut shown = Vec::with_capacity(text.len());
    let mut filter = TerminalText {
        show_carriage_returns: true,
        ..TerminalText::default()
    };
    filter.show(text.as_bytes(), &mut shown);
    filter.finish(&mut shown);
    String::from_utf8(shown)
        .expect("shown text is whole characters")
        .into()
}

/// Guest text made safe for a terminal: control characters other than newline, tab and
/// (in a console's echo) carriage return are shown in caret notation (`^[` for escape);
/// C1 controls, the bidirectional overrides and isolates (which reorder what a line
/// shows) and invalid UTF-8 as U+FFFD. A character split between two writes is kept
/// whole.
#[derive(Default)]
struct TerminalText {
    /// The start of a character whose other bytes have not come yet.
    partial: Vec<u8>,
    /// Whether a carriage return not ending a line is shown (`^M`), not obeyed: in text
    /// quoted among other lines (an error), where it would write over them; a console's
    /// echo keeps it, for the guest's progress lines.
    show_carriage_returns: bool,
}

impl TerminalText {
    /// Appends `bytes`, as shown, to `out`.
    fn show(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        // Joined with the start of a split character only when there is one.
        let joined;
        let input = if self.partial.is_empty() {
            bytes
        } else {
            joined = [std::mem::take(&mut self.partial).as_slice(), bytes].concat();
            &joined
        };
        let mut chunks = input.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            let mut chars = chunk.valid().chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\r' if self.show_carriage_returns && chars.peek() != Some(&'\n') => {
                        out.extend_from_slice(b"^M")
                    }
                    '\n' | '\t' | '\r' => out.push(c as u8),
                    '\0'..='\x1f' => out.extend_from_slice(&[b'^', c as u8 + 0x40]),
                    '\x7f' => out.extend_from_slice(b"^?"),
                    '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                        out.extend_from_slice("\u{FFFD}".as_bytes())
                    }
                    c if c.is_control() => out.extend_from_slice("\u{FFFD}".as_bytes()),
                    c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            let invalid = chunk.invalid();
            let unfinished = chunks.peek().is_none()
                && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
            if unfinished {
                self.partial = invalid.to_vec();
            } else if !invalid.is_empty() {
                out.extend_from_slice("\u{FFFD}".as_bytes());
            }
        }
    }

    /// Appends what is left of a character that never finished.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if !std::mem::take(&mut self.partial).is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    fn shown(pieces: &[&[u8]]) -> String {
        let mut terminal = TerminalText::default();
        let mut out = Vec::new();
        for piece in pieces {
            terminal.show(piece, &mut out);
        }
        terminal.finish(&mut out);
        String::from_utf8(out).expect("shown text is UTF-8")
    }

    #[test]
    fn a_terminal_is_shown_control_characters_not_given_them() {
        // A title change, a clear screen and a C1 CSI (U+009B), among kept text.
        let guest = "ok\t1\r\n\x1b]0;pwned\x07\x1b[2J\u{9b}31m\x7f \u{e9}\u{1F600}\n";
        assert_eq!(
            shown(&[guest.as_bytes()]),
            "ok\t1\r\n^[]0;pwned^G^[[2J\u{FFFD}31m^? \u{e9}\u{1F600}\n"
        );
        // Invalid UTF-8 is replaced, and an unfinished character at the end too.
        assert_eq!(shown(&[b"a\xffb\xe2\x82"]), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(for_terminal(guest, false), guest);
        // Quoted text (an error) is not written over by a carriage return, nor reordered
        // by a right-to-left override; the echo keeps progress lines' returns.
        let quoted = "50%\rferry: ok\r\n\u{202e}dlrow";
        assert_eq!(
            for_terminal(quoted, true),
            "50%^Mferry: ok\r\n\u{FFFD}dlrow"
        );
        assert_eq!(
            shown(&[quoted.as_bytes()]),
            "50%\rferry: ok\r\n\u{FFFD}dlrow"
        );
    }

    #[test]
    fn a_character_split_between_writes_is_shown_whole() {
        let euro = "\u{20ac}".as_bytes();
        assert_eq!(shown(&[&euro[..1], &euro[1..2], &euro[2..]]), "\u{20ac}");
        // The same split, for C1 controls: hidden even when split.
        let csi = "\u{9b}".as_bytes();
        assert_eq!(shown(&[&csi[..1], &csi[1..]]), "\u{FFFD}");
    }

    /// A reader that reads nothing until let go, then everything; says when a write
    /// first reaches it.
    struct StalledReader {
        go: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
        reached: Option<std::sync::mpsc::Sender<()>>,
    }

    impl Write for StalledReader {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(reached) = self.reached.take() {
                let _ = reached.send(());
            }
            let (go, cv) = &*self.go;
            drop(cv.wait_while(go.lock().unwrap(), |go| !*go).unwrap());
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_stops_reading_does_not_stop_the_guest() {
        let go = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (reached, writer_stalled) = std::sync::mpsc::channel();
        let reader = StalledReader {
            go: go.clone(),
            got: got.clone(),
            reached: Some(reached),
        };
        let console = Console::with_echo(Some(Echo::start(Box::new(reader), false)));
        let line = [b'x'; 4096];
        let (done, writes_returned) = std::sync::mpsc::channel();
        let guest = std::thread::spawn(move || {
            // One line, taken by the writer, which then stalls in the reader; so the
            // writer holds exactly that line whatever the scheduling.
            console.write(&line);
            let stalled = writer_stalled.recv_timeout(std::time::Duration::from_secs(30));
            // Then twice what the queue holds, while nothing is read: every write returns.
            for _ in 0..2 * ECHO_QUEUE_CAPACITY / line.len() {
                console.write(&line);
            }
            console.write(b"last\n");
            let _ = done.send(());
            (console, stalled)
        });
        let returned = writes_returned.recv_timeout(std::time::Duration::from_secs(30));
        *go.0.lock().unwrap() = true;
        go.1.notify_all();
        assert!(returned.is_ok(), "the guest's writes waited for the reader");
        // Dropping the console writes out what is queued.
        let (console, stalled) = guest.join().unwrap();
        assert!(
            stalled.is_ok(),
            "the echo's writer never wrote the first line"
        );
        drop(console);
        let got = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let xs = got.bytes().take_while(|&b| b == b'x').count();
        // The line the writer held when it stalled, then a full queue; the rest dropped.
        assert_eq!(
            xs,
            line.len() + ECHO_QUEUE_CAPACITY,
            "bytes echoed before the drop"
        );
        let dropped = ECHO_QUEUE_CAPACITY + b"last\n".len();
        assert_eq!(
            &got[xs..],
            format!(
                "\n[ferry: {dropped} bytes of the guest's console output were dropped here: this output was not read fast enough]\n"
            ),
        );
    }

    #[test]
    fn a_console_ends_soon_though_its_echo_goes_to_a_pipe_nobody_reads() {
        let (reader, writer) = std::io::pipe().unwrap();
        let echo = Echo::start(Box::new(writer), false);
        let queue = echo.queue.clone();
        let console = Console::with_echo(Some(echo));
        // More than a pipe holds: the writer blocks, with more queued behind it.
        let line = [b'x'; 64 << 10];
        for _ in 0..16 {
            console.write(&line);
        }
        // Dropped on a thread of its own, so that a drop that waits for ever fails this.
        let (dropped, drop_returned) = std::sync::mpsc::channel();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            drop(console);
            let _ = dropped.send(());
        });
        let returned = drop_returned.recv_timeout(ECHO_DRAIN_WAIT + Duration::from_secs(5));
        assert!(returned.is_ok(), "the console's end waits for its reader");
        assert!(
            started.elapsed() >= ECHO_DRAIN_WAIT,
            "{:?}",
            started.elapsed()
        );
        // What was queued is let go; the writer, left blocked, holds only its batch.
        {
            let state = queue.lock();
            assert_eq!(state.phase, EchoPhase::Abandoned);
            assert_eq!(state.bytes.capacity(), 0);
        }
        // Its reader gone, its write fails and it ends, letting go of the queue.
        drop(reader);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&queue) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            Arc::strong_count(&queue),
            1,
            "the writer thread did not end"
        );
        assert_eq!(queue.lock().phase, EchoPhase::Ended);
    }

    #[test]
    fn save_restore_round_trip() {
        let console = Console::new(ConsoleSink::None);
        console.write(b"hello\n");
        let restored = Console::restore(ConsoleSink::None, &console.save());
        assert_eq!(restored.tail_text(), "hello\n");
    }
}
