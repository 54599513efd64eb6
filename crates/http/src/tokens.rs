//! API bearer tokens: which ones a request may carry, and what each allows. A host (and
//! the center) takes a fixed token or two (keys derived from the cluster secret, or the
//! center's operator token) and, optionally, a file of operators' tokens, one per line,
//! each full, `read-only` or `serving` (the OpenAI API only); the file is read again
//! within [`TOKEN_FILE_CHECK_EVERY`] of a change, so tokens can be added and retired
//! without a restart. A thread of its own reads it: a request's token lookup never waits
//! on the file system, however slow or hung (a lookup says once, as a warning, that the
//! file has not been read for a while). Tokens are compared in constant time, lengths
//! included (as digests).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest operator token accepted in a token file.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Largest token file read (tens of thousands of tokens): a file named by mistake (a
/// log, `/dev/zero`) is refused, not read into memory whole.
pub const MAX_TOKEN_FILE_BYTES: u64 = 1 << 20;

/// How often the token file is looked at (one `stat`) for a change.
pub const TOKEN_FILE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Checks of the token file missed before a lookup warns that its reading is stuck.
const CHECKS_MISSED_STUCK: u32 = 10;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every request.
    Full,
    /// `GET` and `HEAD` only: dashboards and metrics scrapers.
    ReadOnly,
    /// The center's OpenAI API only (models and completions): what a chat application
    /// is given, which must not create, move or stop VMs.
    Serving,
}

/// Which part of an API a router serves, for what a token may do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every API but the OpenAI one (the hosts', the center's for operators and for
    /// hosts): full tokens, and read-only ones for reads.
    Operators,
    /// The OpenAI API: full and serving tokens, and read-only ones for reads.
    Serving,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("cannot read the token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `TOKEN`, `TOKEN read-only` or `TOKEN serving`, or the token is too
    /// short.
    #[error("token file {path}, line {line}: {why}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The thread that reads the file again when it changes could not be started.
    #[error("cannot start the thread that watches the token file {path}")]
    Watch {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A set of tokens, shared whole: a lookup clones the `Arc` and compares with no lock held.
type TokenSet = Arc<[(TokenDigest, Access)]>;

/// A token's SHA-256: what a lookup compares, so that it hashes the given token once
/// however many tokens there are (an unauthenticated client's cost per request).
type TokenDigest = [u8; 32];

/// `tokens` as their digests.
fn digested(tokens: Vec<(Vec<u8>, Access)>) -> Vec<(TokenDigest, Access)> {
    tokens
        .into_iter()
        .map(|(token, access)| (Sha256::digest(token).into(), access))
        .collect()
}

/// Why a token is refused whose characters are not all [`is_header_token`]'s.
pub const NOT_A_HEADER_TOKEN: &str =
    "a token may hold only ASCII letters, digits and punctuation: an Authorization header carries no other (it could never be sent)";

/// Whether `token` can be sent in an `Authorization` header and read back: visible ASCII
/// only (a request's header is read as such, and bytes beyond ASCII are not).
pub fn is_header_token(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
}

/// `line` without its comment: from a `#` that starts it or follows a blank.
fn without_comment(line: &str) -> &str {
    let mut before = ' ';
    for (i, c) in line.char_indices() {
        if c == '#' && before.is_whitespace() {
            return &line[..i];
        }
        before = c;
    }
    line
}

/// The tokens of a token file (`#` at a line's start or after a blank starts a comment),
/// or its first line in error. A `#` inside a token is refused rather than taken as a
/// comment (which left the part before it a valid, weaker token), and so is a token listed
/// twice with different access (only the first would count).
pub fn parse_token_file(path: &Path, text: &str) -> Result<Vec<(Vec<u8>, Access)>, TokenFileError> {
    let (tokens, mut errors) = parse_token_lines(path, text);
    match errors.is_empty() {
        true => Ok(tokens),
        false => Err(errors.swap_remove(0)),
    }
}

/// The tokens of a token file's valid lines, and its lines in error. A token that a line
/// in error names (its first word) is left out wholly, wherever else it is listed: an
/// edit that retires a token and gets another line wrong still retires it, and a line
/// whose meaning is unclear grants nothing.
fn parse_token_lines(path: &Path, text: &str) -> (Vec<(Vec<u8>, Access)>, Vec<TokenFileError>) {
    let mut tokens: Vec<(&str, Access)> = Vec::new();
    let mut errors = Vec::new();
    let mut disputed = std::collections::HashSet::new();
    // Each token's access and line, for a later line that lists it again.
    let mut seen: std::collections::HashMap<&str, (Access, usize)> = Default::default();
    for (i, line) in text.lines().enumerate() {
        let line = without_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let token = words.next().unwrap_or_default();
        match token_line(token, words, &seen) {
            Ok(access) => {
                if let std::collections::hash_map::Entry::Vacant(first) = seen.entry(token) {
                    first.insert((access, i + 1));
                    tokens.push((token, access));
                }
            }
            Err(why) => {
                disputed.insert(token);
                errors.push(TokenFileError::Line {
                    path: path.to_owned(),
                    line: i + 1,
                    why,
                });
            }
        }
    }
    let tokens = (tokens.into_iter())
        .filter(|(token, _)| !disputed.contains(token))
        .map(|(token, access)| (token.as_bytes().to_vec(), access))
        .collect();
    (tokens, errors)
}

/// The access a line of `token` and its other `words` gives, or why it is in error
/// (`seen`: the tokens of the lines before, with their access and line).
fn token_line<'t>(
    token: &str,
    mut words: impl Iterator<Item = &'t str>,
    seen: &std::collections::HashMap<&str, (Access, usize)>,
) -> Result<Access, String> {
    let access = match words.next() {
        None => Access::Full,
        Some("read-only") => Access::ReadOnly,
        Some("serving") => Access::Serving,
        Some(other) => return Err(format!("'{other}' is neither 'read-only' nor 'serving'")),
    };
    if let Some(extra) = words.next() {
        return Err(format!("unexpected '{extra}'"));
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "a token must be at least {MIN_TOKEN_BYTES} characters"
        ));
    }
    if !is_header_token(token) {
        return Err(NOT_A_HEADER_TOKEN.to_string());
    }
    if token.contains('#') {
        return Err("a token cannot hold '#' (a comment needs a blank before its '#')".to_string());
    }
    match seen.get(token) {
        Some(&(before, line)) if before != access => Err(format!(
            "this token is on line {line} already, with other access"
        )),
        _ => Ok(access),
    }
}

/// The token file as its watcher last read it (owned by the watcher thread alone).
struct TokenFile {
    path: PathBuf,
    /// The file as it was read; `None` while it may still be being written (read again).
    stamp: Option<FileStamp>,
    tokens: TokenSet,
    /// Since when the file has been gone or unreadable, if it is.
    missing_since: Option<Instant>,
}

/// What tells one version of the token file from another: a file rewritten in place
/// within one tick of its modification time still differs in size or inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: SystemTime,
    len: u64,
    dev: u64,
    ino: u64,
}

/// A file modified this recently may be half-written: its reading is not kept as final.
const SETTLE_TIME: Duration = Duration::from_secs(2);

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            modified: meta.modified()?,
            len: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// This stamp, if the file has not changed for [`SETTLE_TIME`] (or carries a time
    /// ahead of this clock, as a copy from a machine ahead does: it would never settle).
    fn settled(self) -> Option<Self> {
        let age = SystemTime::now().duration_since(self.modified);
        age.map_or(true, |age| age >= SETTLE_TIME).then_some(self)
    }
}

/// The text of the token file at `path`: a regular file of at most
/// [`MAX_TOKEN_FILE_BYTES`].
fn read_token_text(path: &Path) -> std::io::Result<String> {
    #[cfg(test)]
    hang::wait(path);
    let bytes = ferry_migrate::auth::read_regular_credential_file(path, MAX_TOKEN_FILE_BYTES)?;
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

impl TokenFile {
    /// The file's tokens, and its lines in error (whose tokens it leaves out).
    fn load(path: &Path) -> Result<(Self, Vec<TokenFileError>), TokenFileError> {
        let read = |source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        };
        let stamp = FileStamp::of(path).map_err(read)?;
        let text = read_token_text(path).map_err(read)?;
        // Changed while read: not final either.
        let unchanged = FileStamp::of(path).is_ok_and(|after| after == stamp);
        let stamp = stamp.settled().filter(|_| unchanged);
        // A file still being written may end in a line cut short (`TOKEN` of `TOKEN
        // read-only` is a full token): until it settles, a last line without its newline
        // is left out, so that a cut only leaves lines out.
        let complete = match stamp {
            Some(_) => &text[..],
            None => &text[..text.rfind('\n').map_or(0, |end| end + 1)],
        };
        let (tokens, errors) = parse_token_lines(path, complete);
        let file = Self {
            path: path.to_owned(),
            stamp,
            tokens: digested(tokens).into(),
            missing_since: None,
        };
        Ok((file, errors))
    }

    /// Reads the file again if it changed, or may have been half-written when last read,
    /// and returns its tokens if they changed. Its lines in error grant nothing (said
    /// once its version is final); a file gone or unreadable for [`SETTLE_TIME`] grants
    /// nothing until it is back: a token retired by an edit that went wrong, or by
    /// deleting the file, is not left working.
    fn refresh(&mut self) -> Option<TokenSet> {
        let stamp = match FileStamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(source) => {
                let e = TokenFileError::Read {
                    path: self.path.clone(),
                    source,
                };
                return self.unreadable(false, &e);
            }
        };
        if Some(stamp) == self.stamp {
            return None;
        }
        match Self::load(&self.path) {
            Ok((fresh, errors)) => {
                if fresh.stamp.is_some() {
                    for e in errors {
                        tracing::error!("{e}; that line grants nothing");
                    }
                    ferry_migrate::auth::warn_if_everyone_reads(&self.path, "use its API tokens");
                }
                let changed = fresh.tokens != self.tokens;
                if changed {
                    tracing::info!(path = %self.path.display(), tokens = fresh.tokens.len(), "API tokens reloaded");
                }
                *self = fresh;
                changed.then(|| self.tokens.clone())
            }
            Err(e) => self.unreadable(stamp.settled().is_some(), &e),
        }
    }

    /// The file is gone or cannot be read (`why`; `settled`: a version of it that has
    /// not changed for [`SETTLE_TIME`] cannot). Its tokens stay for that time (an editor
    /// may move the file away while it writes the next version, or be writing it), then
    /// they are refused, once, until it can be read again: it is tried at every check (a
    /// `chmod` that makes it readable again changes no stamp).
    fn unreadable(&mut self, settled: bool, why: &TokenFileError) -> Option<TokenSet> {
        self.stamp = None;
        let since = *self.missing_since.get_or_insert_with(Instant::now);
        if (!settled && since.elapsed() < SETTLE_TIME) || self.tokens.is_empty() {
            return None;
        }
        tracing::error!(
            "{}; its tokens are refused until it can be read",
            ferry_migrate::vm::error_chain(why)
        );
        self.tokens = Arc::from([]);
        Some(self.tokens.clone())
    }

    /// Checks the file every `every`, and when asked (an answer is sent when done), and
    /// publishes its changes to `current`, until the asking side is dropped.
    fn watch(
        mut self,
        current: Arc<RwLock<TokenSet>>,
        every: Duration,
        asks: mpsc::Receiver<mpsc::Sender<()>>,
        progress: Arc<WatchProgress>,
    ) {
        loop {
            progress.checked();
            let asked = match asks.recv_timeout(every) {
                Ok(done) => Some(done),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // Read with no lock held; the write lock is held for the swap alone.
            if let Some(fresh) = self.refresh() {
                *current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
            }
            if let Some(done) = asked {
                let _ = done.send(());
            }
        }
    }
}

/// When the watcher of a token file last went through its loop: a file system that hangs
/// holds it in a read, unseen but for this.
struct WatchProgress {
    path: PathBuf,
    since: Instant,
    /// Milliseconds from `since` to the watcher's last pass.
    passed_ms: AtomicU64,
    /// How long without a pass is stuck.
    stuck_after: Duration,
    /// Whether the stall now going on was reported.
    reported: AtomicBool,
}

impl WatchProgress {
    fn new(path: &Path, every: Duration) -> Self {
        Self {
            path: path.to_owned(),
            since: Instant::now(),
            passed_ms: AtomicU64::new(0),
            stuck_after: every * CHECKS_MISSED_STUCK,
            reported: AtomicBool::new(false),
        }
    }

    fn ms_since_start(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The watcher went through its loop.
    fn checked(&self) {
        self.passed_ms
            .store(self.ms_since_start(), Ordering::Relaxed);
        if self.reported.swap(false, Ordering::Relaxed) {
            tracing::info!(path = %self.path.display(), "the API token file is read again");
        }
    }

    /// How long the watcher has been stuck, if it is.
    fn stuck_for(&self) -> Option<Duration> {
        let passed = self.passed_ms.load(Ordering::Relaxed);
        let idle = Duration::from_millis(self.ms_since_start().saturating_sub(passed));
        (idle > self.stuck_after).then_some(idle)
    }

    /// Warns once per stall that the file is not being read.
    fn report_if_stuck(&self) {
        if let Some(idle) = self.stuck_for() {
            if !self.reported.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = %self.path.display(),
                    "the API token file has not been read for {} s (its file system may hang): changes to it are not seen, and the tokens read before stay",
                    idle.as_secs()
                );
            }
        }
    }
}

/// A token file's current tokens, kept so by a watcher thread.
struct WatchedFile {
    /// Replaced whole by the watcher; a lookup holds the read guard only to clone it.
    current: Arc<RwLock<TokenSet>>,
    /// The watcher's last pass, for a lookup to notice it stuck.
    progress: Arc<WatchProgress>,
    /// Held for its drop, which ends the watcher (tests ask through it for a check now).
    _watcher: mpsc::Sender<mpsc::Sender<()>>,
}

/// The tokens an API accepts.
pub struct Tokens {
    fixed: Vec<(TokenDigest, Access)>,
    file: Option<WatchedFile>,
}

impl Tokens {
    /// `fixed` tokens, and those of the token file at `file`, if any (read now, and again
    /// by a thread of its own when it changes).
    pub fn new(fixed: Vec<(Vec<u8>, Access)>, file: Option<&Path>) -> Result<Self, TokenFileError> {
        Self::checking_every(fixed, file, TOKEN_FILE_CHECK_EVERY)
    }

    /// [`Tokens::new`], the file checked every `every`.
    fn checking_every(
        fixed: Vec<(Vec<u8>, Access)>,
        file: Option<&Path>,
        every: Duration,
    ) -> Result<Self, TokenFileError> {
        let file = match file {
            None => None,
            Some(path) => {
                let (read, mut errors) = TokenFile::load(path)?;
                if !errors.is_empty() {
                    return Err(errors.swap_remove(0));
                }
                ferry_migrate::auth::warn_if_everyone_reads(path, "use its API tokens");
                let current = Arc::new(RwLock::new(read.tokens.clone()));
                let (asks, asked) = mpsc::channel();
                let shared = current.clone();
                let progress = Arc::new(WatchProgress::new(path, every));
                let passes = progress.clone();
                std::thread::Builder::new()
                    .name("ferry-tokens".into())
                    .spawn(move || read.watch(shared, every, asked, passes))
                    .map_err(|source| TokenFileError::Watch {
                        path: path.to_owned(),
                        source,
                    })?;
                Some(WatchedFile {
                    current,
                    progress,
                    _watcher: asks,
                })
            }
        };
        Ok(Self {
            fixed: digested(fixed),
            file,
        })
    }

    /// What `given` allows, if it is one of the tokens. Never touches the token file.
    pub fn access(&self, given: &[u8]) -> Option<Access> {
        // Hashed once (a given token may be as long as a request head, 32 KiB), and
        // compared with the known tokens' digests in constant time.
        let given: TokenDigest = Sha256::digest(given).into();
        let matches = |(known, _): &&(TokenDigest, Access)| bool::from(known.ct_eq(&given));
        if let Some(&(_, access)) = self.fixed.iter().find(matches) {
            return Some(access);
        }
        let file = self.file.as_ref()?;
        file.progress.report_if_stuck();
        let current = file
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        current.iter().find(matches).map(|&(_, access)| access)
    }

    /// How long the watcher has been stuck in a read, if it is.
    #[cfg(test)]
    fn watcher_stuck_for(&self) -> Option<Duration> {
        self.file
            .as_ref()
            .expect("a token file")
            .progress
            .stuck_for()
    }

    /// Has the watcher check the token file now, and waits until it has (tests: no wait
    /// for the timer, and no check between a test's writes).
    #[cfg(test)]
    fn check_now(&self) {
        let (done, checked) = mpsc::channel();
        let file = self.file.as_ref().expect("a token file");
        file._watcher.send(done).expect("the watcher runs");
        checked.recv().expect("the watcher answers");
    }
}

/// The bearer token of a request's `Authorization` header, if it has one (the scheme's
/// name is case-insensitive and one or more spaces may follow it, RFC 9110).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Whether a request's bearer token is `token` (compared in constant time).
pub fn bears(headers: &axum::http::HeaderMap, token: &[u8]) -> bool {
    bearer(headers).is_some_and(|given| same_token(given.as_bytes(), token))
}

/// Whether `a` and `b` are the same token, compared as SHA-256 digests in constant time:
/// the time taken shows neither where they differ nor how long the real one is (a plain
/// comparison of byte strings ends at once when the lengths differ).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    bool::from(Sha256::digest(a).ct_eq(&Sha256::digest(b)))
}

/// Middleware (state: the tokens, and the part of the API the router serves) that runs
/// `request` if it carries `Authorization: Bearer <token>` with a token that allows it in
/// `scope`; else refuses it with 401 (no or wrong token) or 403 (a read-only token on a
/// request that changes something, a serving token outside the OpenAI API). The hosts'
/// and the cluster center's APIs use it.
pub async fn require_token(
    State((tokens, scope)): State<(Arc<Tokens>, Scope)>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(given) = bearer(request.headers()) else {
        let sent = request.headers().get(axum::http::header::AUTHORIZATION);
        if sent.is_some_and(|value| value.to_str().is_err()) {
            return unauthorized(
                "the Authorization header holds characters beyond visible ASCII, which no API token has",
            );
        }
        return unauthorized("missing 'Authorization: Bearer <token>' header");
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    match (tokens.access(given.as_bytes()), scope) {
        (Some(Access::Full), _) | (Some(Access::Serving), Scope::Serving) => {
            next.run(request).await
        }
        (Some(Access::ReadOnly), _) if reads => next.run(request).await,
        (Some(Access::ReadOnly), _) => crate::error(
            StatusCode::FORBIDDEN,
            "this token is read-only: it may only read (GET)",
        ),
        (Some(Access::Serving), Scope::Operators) => crate::error(
            StatusCode::FORBIDDEN,
            "this token is for the OpenAI API only (/v1/models, /v1/chat/completions, /v1/completions)",
        ),
        (None, _) => {
            // At most one line a second: wrong tokens cost an attacker nothing to send.
            static LAST_WARNED_S: AtomicU64 = AtomicU64::new(0);
            let now_s = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if LAST_WARNED_S.swap(now_s, Ordering::Relaxed) != now_s {
                tracing::warn!(path = %request.uri().path(), "API request with a wrong token refused");
            }
            unauthorized("wrong API token")
        }
    }
}

/// A 401 saying `why`, with the challenge that names the scheme (RFC 9110).
fn unauthorized(why: &str) -> Response {
    let mut response = crate::error(StatusCode::UNAUTHORIZED, why);
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Reads of the token files a test holds hang until it lets them go: a file system that
/// stopped answering (a pipe cannot stand in: it is refused unread).
#[cfg(test)]
mod hang {
    use std::path::{Path, PathBuf};
    use std::sync::{Condvar, Mutex};

    /// The files held, and how many reads of each hang now.
    static HELD: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());
    static LET_GO: Condvar = Condvar::new();

    pub fn hold(path: &Path) {
        HELD.lock().unwrap().push((path.to_owned(), 0));
    }

    pub fn let_go(path: &Path) {
        HELD.lock().unwrap().retain(|(held, _)| held != path);
        LET_GO.notify_all();
    }

    pub fn is_hanging(path: &Path) -> bool {
        let held = HELD.lock().unwrap();
        held.iter().any(|(held, reads)| held == path && *reads > 0)
    }

    /// Hangs while `path` is held.
    pub fn wait(path: &Path) {
        let mut held = HELD.lock().unwrap();
        let Some(at) = held.iter().position(|(held, _)| held == path) else {
            return;
        };
        held[at].1 += 1;
        while held.iter().any(|(held, _)| held == path) {
            held = LET_GO.wait(held).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_take_full_and_read_only_tokens_and_refuse_the_rest() {
        let path = Path::new("tokens");
        let tokens = parse_token_file(
            path,
            "# operators\nalice-0123456789abcdef\n  grafana-0123456789abcd read-only  # scraper\nchat-ui-0123456789abcd serving\n",
        )
        .unwrap();
        assert_eq!(
            tokens,
            vec![
                (b"alice-0123456789abcdef".to_vec(), Access::Full),
                (b"grafana-0123456789abcd".to_vec(), Access::ReadOnly),
                (b"chat-ui-0123456789abcd".to_vec(), Access::Serving)
            ]
        );
        for (text, says) in [
            ("short\n", "at least 16"),
            ("alice-0123456789abcdef admin\n", "'admin'"),
            ("alice-0123456789abcdef read-only x\n", "unexpected 'x'"),
            ("schlüssel-0123456789abcdef\n", "only ASCII"),
        ] {
            let e = parse_token_file(path, text).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("line 1"), "{e}");
        }
    }

    #[test]
    fn a_token_file_never_grants_part_of_a_token_or_the_first_of_two_accesses() {
        let path = Path::new("tokens");
        // A '#' inside a token: not a comment that leaves its first 16 characters a
        // full token.
        let e = parse_token_file(path, "0123456789abcdef#ghijklmnop\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("'#'"), "{e}");
        // A comment after a blank, or at a line's start, is one.
        let tokens = parse_token_file(
            path,
            "#alice-0123456789abcdef\nbob-0123456789abcdef #x\ncarol-0123456789abcd read-only\t# y\n",
        )
        .unwrap();
        assert_eq!(
            tokens,
            vec![
                (b"bob-0123456789abcdef".to_vec(), Access::Full),
                (b"carol-0123456789abcd".to_vec(), Access::ReadOnly),
            ]
        );
        // Made read-only by a line added below, the token stays full were the first line
        // to count: refused, naming both lines.
        let text =
            "grafana-0123456789abcd\nalice-0123456789abcdef\ngrafana-0123456789abcd read-only\n";
        let e = parse_token_file(path, text).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("line 1"), "{e}");
        assert!(!e.contains("grafana"), "the token is not told: {e}");
        // The same token twice with the same access is harmless, and listed once.
        let text = "alice-0123456789abcdef\nalice-0123456789abcdef\n";
        assert_eq!(parse_token_file(path, text).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_serving_token_opens_the_openai_api_only_and_a_read_only_one_only_reads() {
        use axum::routing::get;
        use tower::ServiceExt;
        let tokens = Arc::new(
            Tokens::new(
                vec![
                    (b"full-0123456789abcdef".to_vec(), Access::Full),
                    (b"chat-0123456789abcdef".to_vec(), Access::Serving),
                    (b"look-0123456789abcdef".to_vec(), Access::ReadOnly),
                ],
                None,
            )
            .unwrap(),
        );
        let operators = axum::Router::new()
            .route(
                "/v1/vms",
                get(|| async { "vms" }).post(|| async { "created" }),
            )
            .route_layer(axum::middleware::from_fn_with_state(
                (tokens.clone(), Scope::Operators),
                require_token,
            ));
        let serving = axum::Router::new()
            .route("/v1/models", get(|| async { "models" }))
            .route("/v1/completions", axum::routing::post(|| async { "text" }))
            .route_layer(axum::middleware::from_fn_with_state(
                (tokens, Scope::Serving),
                require_token,
            ));
        let app = operators.merge(serving);
        let status = |method: &str, path: &str, token: &str| {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("Authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let app = app.clone();
            async move { app.oneshot(request).await.unwrap().status().as_u16() }
        };
        let (full, chat, look) = (
            "full-0123456789abcdef",
            "chat-0123456789abcdef",
            "look-0123456789abcdef",
        );
        assert_eq!(status("POST", "/v1/vms", full).await, 200);
        assert_eq!(status("POST", "/v1/completions", full).await, 200);
        assert_eq!(status("POST", "/v1/completions", chat).await, 200);
        assert_eq!(status("GET", "/v1/models", chat).await, 200);
        assert_eq!(status("GET", "/v1/vms", chat).await, 403);
        assert_eq!(status("POST", "/v1/vms", chat).await, 403);
        assert_eq!(status("GET", "/v1/vms", look).await, 200);
        assert_eq!(status("POST", "/v1/vms", look).await, 403);
        assert_eq!(status("POST", "/v1/completions", look).await, 403);
        assert_eq!(
            status("GET", "/v1/vms", "wrong-0123456789abcdef").await,
            401
        );
        // The scheme in any case.
        assert_eq!(status("GET", "/v1/vms", "").await, 401);
        let request = |auth: Option<String>| {
            let builder = axum::http::Request::builder().uri("/v1/vms");
            let builder = match auth {
                Some(a) => builder.header("Authorization", a),
                None => builder,
            };
            builder.body(axum::body::Body::empty()).unwrap()
        };
        let lower = app.clone().oneshot(request(Some(format!("bearer {full}"))));
        assert_eq!(lower.await.unwrap().status(), 200);
        // RFC 9110 lets spaces (one or more) come between the scheme and the token.
        let spaced = app
            .clone()
            .oneshot(request(Some(format!("Bearer   {full}"))));
        assert_eq!(spaced.await.unwrap().status(), 200);
        let glued = app.clone().oneshot(request(Some(format!("Bearer{full}"))));
        assert_eq!(glued.await.unwrap().status(), 401);
        let refused = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(refused.status(), 401);
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        // A token beyond ASCII is none (no token file takes one): said so, not called
        // missing.
        let mut beyond = request(None);
        let value = "Bearer schlüssel-0123456789abcdef".as_bytes();
        beyond.headers_mut().insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_bytes(value).unwrap(),
        );
        let refused = app.clone().oneshot(beyond).await.unwrap();
        assert_eq!(refused.status(), 401);
        let body = axum::body::to_bytes(refused.into_body(), 64 << 10)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("beyond visible ASCII"), "{body}");
    }

    #[test]
    fn a_token_file_past_its_bound_is_refused_unread() {
        let dir = ferry_testdata::scratch_dir("tokens-large");
        let path = dir.join("tokens");
        let mut text = "alice-0123456789abcdef\n".to_string();
        while text.len() as u64 <= MAX_TOKEN_FILE_BYTES {
            text.push_str("# a comment, as in a log named by mistake\n");
        }
        std::fs::write(&path, &text).unwrap();
        let refused = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED);
        let e = refused
            .err()
            .expect("a token file past its bound is refused");
        assert!(e.to_string().contains("token file"), "{e}");
        let why = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            why.as_deref().is_some_and(|w| w.contains("larger than")),
            "{why:?}"
        );
        // Within it, read.
        text.truncate(text.len() / 2);
        std::fs::write(&path, &text).unwrap();
        let tokens = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED).unwrap();
        assert_eq!(tokens.access(b"alice-0123456789abcdef"), Some(Access::Full));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A watcher's interval that never passes in a test: it checks when asked.
    const UNPROMPTED: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_changed_token_file_is_read_again() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "old-token-0123456789abc\n").unwrap();
        let tokens = Tokens::checking_every(
            vec![(b"fixed-0123456789abcdef".to_vec(), Access::Full)],
            Some(&path),
            UNPROMPTED,
        )
        .unwrap();
        assert_eq!(tokens.access(b"fixed-0123456789abcdef"), Some(Access::Full));
        assert_eq!(
            tokens.access(b"old-token-0123456789abc"),
            Some(Access::Full)
        );
        assert_eq!(tokens.access(b"new-token-0123456789abc"), None);
        // Rotation: the new token in, the old one out, no restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "new-token-0123456789abc read-only\n").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        tokens.check_now();
        assert_eq!(
            tokens.access(b"new-token-0123456789abc"),
            Some(Access::ReadOnly)
        );
        assert_eq!(tokens.access(b"old-token-0123456789abc"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
    /// `text` written to `path` as a version of the file an hour old (final at once).
    fn write_settled(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn an_edit_with_a_line_in_error_still_retires_tokens_and_the_line_grants_nothing() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        write_settled(&path, "leaked-token-0123456789\nkept-token-0123456789ab\n");
        let tokens = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED).unwrap();
        assert_eq!(
            tokens.access(b"leaked-token-0123456789"),
            Some(Access::Full)
        );
        // The leaked token retired, a token added, and lines in error: a short token, a
        // misspelt access, a token listed twice with other access.
        write_settled(
            &path,
            "kept-token-0123456789ab\nadded-token-0123456789\nshort\n\
             grafana-0123456789abcd read-onyl\ntwice-token-0123456789\n\
             twice-token-0123456789 read-only\n",
        );
        tokens.check_now();
        assert_eq!(tokens.access(b"leaked-token-0123456789"), None);
        assert_eq!(
            tokens.access(b"kept-token-0123456789ab"),
            Some(Access::Full)
        );
        assert_eq!(tokens.access(b"added-token-0123456789"), Some(Access::Full));
        assert_eq!(tokens.access(b"grafana-0123456789abcd"), None);
        assert_eq!(tokens.access(b"twice-token-0123456789"), None);
        // At start-up, such a file is refused whole.
        let e = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("line 3"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_gone_for_good_grants_nothing_until_it_is_back() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        write_settled(&path, "old-token-0123456789abc\n");
        let tokens = Tokens::checking_every(
            vec![(b"fixed-0123456789abcdef".to_vec(), Access::Full)],
            Some(&path),
            UNPROMPTED,
        )
        .unwrap();
        // Moved away, as an editor may while it writes the next version: kept a while.
        std::fs::remove_file(&path).unwrap();
        tokens.check_now();
        assert_eq!(
            tokens.access(b"old-token-0123456789abc"),
            Some(Access::Full)
        );
        std::thread::sleep(SETTLE_TIME);
        tokens.check_now();
        assert_eq!(tokens.access(b"old-token-0123456789abc"), None);
        assert_eq!(tokens.access(b"fixed-0123456789abcdef"), Some(Access::Full));
        // Back, with another token.
        write_settled(&path, "new-token-0123456789abc\n");
        tokens.check_now();
        assert_eq!(
            tokens.access(b"new-token-0123456789abc"),
            Some(Access::Full)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_every_user_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-tokens-o+w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        write_settled(&path, "old-token-0123456789abc\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED)
            .err()
            .expect("refused");
        let said = ferry_migrate::vm::error_chain(&e);
        assert!(
            said.ends_with("every user may write it (and so add a token): chmod o-w it"),
            "{said}"
        );
        // Made so later (and then rewritten, so read again): its tokens are refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tokens = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED).unwrap();
        assert_eq!(
            tokens.access(b"old-token-0123456789abc"),
            Some(Access::Full)
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_settled(&path, "old-token-0123456789abc\n");
        tokens.check_now();
        assert_eq!(tokens.access(b"old-token-0123456789abc"), None);
        // Mended by a chmod alone, which changes no stamp: it is read again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        tokens.check_now();
        assert_eq!(
            tokens.access(b"old-token-0123456789abc"),
            Some(Access::Full)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pipe_named_as_the_token_file_is_refused_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-pipe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("tokens");
        ferry_testdata::make_fifo(&fifo);
        let (sent, got) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let made = Tokens::new(Vec::new(), Some(&path)).map(|_| ());
            sent.send(made.map_err(|e| ferry_migrate::vm::error_chain(&e)))
        });
        let made = got.recv_timeout(Duration::from_secs(5));
        let e = made.expect("answered at once").expect_err("refused");
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_rewritten_within_one_tick_of_its_time_is_read_again() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-tick-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        // Each version keeps the modification time given, as a rewrite in place within
        // one tick of the file system's clock does.
        let tokens = std::cell::OnceCell::new();
        let write = |text: &str, at: SystemTime| {
            std::fs::write(&path, text).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(at).unwrap();
            tokens.get().map(Tokens::check_now);
        };
        let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        write("first-token-0123456789\n", hour_ago);
        let tokens = tokens
            .get_or_init(|| Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED).unwrap());
        assert_eq!(tokens.access(b"first-token-0123456789"), Some(Access::Full));
        // The same time, another size.
        write("second-token-0123456789 read-only\n", hour_ago);
        assert_eq!(
            tokens.access(b"second-token-0123456789"),
            Some(Access::ReadOnly)
        );
        assert_eq!(tokens.access(b"first-token-0123456789"), None);
        // Read while fresh, then the same size and time with other content: the fresh
        // reading was not taken as final.
        let now = SystemTime::now();
        write("aaaaa-token-0123456789\n", now);
        assert_eq!(tokens.access(b"aaaaa-token-0123456789"), Some(Access::Full));
        write("bbbbb-token-0123456789\n", now);
        assert_eq!(tokens.access(b"bbbbb-token-0123456789"), Some(Access::Full));
        assert_eq!(tokens.access(b"aaaaa-token-0123456789"), None);
        // A time ahead of this clock is final at once: the same size and time with other
        // content is not read (it would be read on every request otherwise).
        let ahead = SystemTime::now() + std::time::Duration::from_secs(3600);
        write("ccccc-token-0123456789\n", ahead);
        assert_eq!(tokens.access(b"ccccc-token-0123456789"), Some(Access::Full));
        write("ddddd-token-0123456789\n", ahead);
        assert_eq!(tokens.access(b"ddddd-token-0123456789"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_file_read_while_being_written_gives_no_token_more_than_it_says() {
        let dir = std::env::temp_dir().join(format!("ferry-tokens-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let write = |text: &str, at: SystemTime| {
            std::fs::write(&path, text).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(at).unwrap();
        };
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        write("old-token-0123456789abc\n", hour_ago);
        let tokens = Tokens::checking_every(Vec::new(), Some(&path), UNPROMPTED).unwrap();
        // Rewritten in place, read between its writes: the read-only token's line is
        // cut before its access. Its complete lines apply at once.
        write(
            "alice-0123456789abcdef\ngrafana-0123456789abcd",
            SystemTime::now(),
        );
        tokens.check_now();
        assert_eq!(tokens.access(b"alice-0123456789abcdef"), Some(Access::Full));
        assert_eq!(tokens.access(b"grafana-0123456789abcd"), None);
        assert_eq!(tokens.access(b"old-token-0123456789abc"), None);
        // A file without a last newline is taken whole once it has settled.
        let text = "alice-0123456789abcdef\ngrafana-0123456789abcd read-only";
        write(text, SystemTime::now());
        tokens.check_now();
        assert_eq!(tokens.access(b"grafana-0123456789abcd"), None);
        write(text, hour_ago);
        tokens.check_now();
        assert_eq!(
            tokens.access(b"grafana-0123456789abcd"),
            Some(Access::ReadOnly)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lookup_does_not_wait_for_a_token_file_that_hangs() {
        use std::sync::mpsc::channel;
        let dir = std::env::temp_dir().join(format!("ferry-tokens-hang-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "old-token-0123456789abc\n").unwrap();
        let tokens = Arc::new(
            Tokens::checking_every(Vec::new(), Some(&path), Duration::from_millis(5)).unwrap(),
        );
        // The next version, whose read hangs, as on a file system that stopped answering.
        hang::hold(&path);
        std::fs::write(dir.join("next"), "new-token-0123456789abc\n").unwrap();
        std::fs::rename(dir.join("next"), &path).unwrap();
        // A lookup (which would read the changed file itself, were lookups to read it).
        let looked_up = |token: &'static [u8]| {
            let (sent, got) = channel();
            let tokens = tokens.clone();
            std::thread::spawn(move || sent.send(tokens.access(token)));
            got
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !hang::is_hanging(&path) {
            assert!(std::time::Instant::now() < deadline, "the file is read");
            std::thread::sleep(Duration::from_millis(5));
        }
        let answer = looked_up(b"old-token-0123456789abc").recv_timeout(Duration::from_secs(1));
        // The watcher is seen stuck (and a lookup warns) once ten checks are missed.
        let stuck = loop {
            if let Some(stuck) = tokens.watcher_stuck_for() {
                break Some(stuck);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Whatever the answer, the reader is let go before the assertion.
        hang::let_go(&path);
        assert_eq!(
            answer.expect("a lookup answers while the file's read hangs"),
            Some(Access::Full),
            "the tokens read before stay"
        );
        assert!(
            stuck.is_some_and(|s| s >= Duration::from_millis(50)),
            "{stuck:?}"
        );
        // The watcher is not stuck for good: the next version is read.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokens.access(b"new-token-0123456789abc").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the new token file is read"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(tokens.access(b"old-token-0123456789abc"), None);
        while tokens.watcher_stuck_for().is_some() {
            assert!(std::time::Instant::now() < deadline, "the watcher goes on");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
