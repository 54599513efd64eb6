//! The subcommands.

pub mod backend;
pub mod bench;
pub mod bench_center;
pub mod bench_evacuate;
pub mod bench_gpu;
pub mod bench_llm;
pub mod bench_migrate;
pub mod bench_serve;
pub mod bench_soak;
pub mod center;
pub mod child;
pub mod demo;
pub mod host;
pub mod loopback;
pub mod migrate;
pub mod run;
pub mod shaped_link;
pub mod tls;
pub mod vm;

use std::borrow::Cow;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ferry_vmm::devices::console::for_terminal;
pub use ferry_vmm::devices::console::last_field;

/// Text a guest made (its console, a model's answer), as stdout should be given it: on a
/// terminal its control characters are shown, not obeyed.
pub(crate) fn guest_text(text: &str) -> Cow<'_, str> {
    for_terminal(text, std::io::stdout().is_terminal())
}

/// `println!` of a line quoting what a server said (names, reasons, errors): on a
/// terminal its control characters are shown, not obeyed, as a guest's are
/// ([`guest_text`]): a hostile host or center cannot drive the operator's terminal.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::cmd::guest_text(&format!($($arg)*)))
    };
}
pub(crate) use say;

/// Stdout's reader went away (`ferry bench vm | head -3`): the command ends quietly, as
/// a Unix tool does.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub(crate) struct StdoutClosed;

/// Writes `line` and a newline to stdout. Commands that run daemons in the process keep
/// SIGPIPE ignored (a client hanging up is an error on its socket), so a closed stdout
/// is [`StdoutClosed`] here, not `println!`'s panic.
pub(crate) fn print_line(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        written => Ok(written?),
    }
}

/// An error's text as stderr should be given it (it may quote a guest's output).
pub(crate) fn error_text(text: &str) -> Cow<'_, str> {
    for_terminal(text, std::io::stderr().is_terminal())
}

/// What to check after an error whose message alone does not say where to look, if `e`
/// is one: an API's 401 says only that the token was wrong, not which of the ways to
/// give one (a host's or the center's), nor that the address may be another kind of
/// server; an answer without Ferry's error code may say nothing at all (`GET /v1/vms:
/// (HTTP 404)` from a web server).
pub(crate) fn hint(e: &anyhow::Error) -> Option<&'static str> {
    let refused = ferry_client::ClientError::of(e)?.api()?;
    if refused.status == 401 {
        return Some(
            "the token is not one this API takes (a host's: --api-token-file or \
             FERRY_API_TOKEN, else the key derived from the secret, --secret-file or \
             FERRY_SECRET; the center's: --token-file or FERRY_CENTER_TOKEN), or the \
             address is another kind of server (a host's API where the center's was meant, \
             or the other way round)",
        );
    }
    // Ferry's APIs answer every error with a code; the OpenAI routes' errors are JSON too.
    let foreign = refused.code.is_none() && !refused.message.trim_start().starts_with('{');
    foreign.then_some(
        "the answer is not a Ferry API's (it has no Ferry error code): check the address \
         (--host: a host's --listen; --center: the center's --listen)",
    )
}

/// The shell that makes a fresh secret or token, for the hints of errors that lack one:
/// the hint shows how, never a secret itself (an error's text ends up in logs).
pub(crate) const MAKE_SECRET: &str = "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')";

/// The text of a token file the CLI is given, up to the bound of the daemons' token
/// files; a pipe (`--token-file <(pass show ferry)`) is read too.
pub(crate) fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let bytes =
        ferry_migrate::auth::read_credential_file(path, ferry_http::tokens::MAX_TOKEN_FILE_BYTES)?;
    ferry_migrate::auth::warn_if_everyone_reads(path, "use its token");
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Calls `step` every 20 ms until it gives `Some` or an error; fails once `limit` has
/// passed.
pub(crate) fn poll_until<T>(
    what: &str,
    limit: Duration,
    step: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    poll_every(what, limit, Duration::from_millis(20), step)
}

/// [`poll_until`], calling `step` every `every` (a server's answer, not a local check).
pub(crate) fn poll_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut step: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(done) = step()? {
            return Ok(done);
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "timed out after {} s waiting for {what}",
                limit.as_secs_f64()
            );
        }
        std::thread::sleep(every);
    }
}

/// Waits for Ctrl-C or SIGTERM (what a service manager sends to stop a daemon).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
