//! A small blocking client of Ferry's HTTP/JSON APIs: the host daemon's (`ferry vm`,
//! `ferry migrate`, `ferry demo`) and the cluster center's (`ferry center`, heartbeats).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default address of the host API.
pub const DEFAULT_HOST: &str = "http://127.0.0.1:7070";

/// An error answer from an API: scripts match on `code`, stable across releases.
///
/// It reaches callers inside a [`ClientError`] (and is no error type of its own, so that
/// a caller cannot look for it in an `anyhow::Error` where only the `ClientError` is).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The request (`GET /v1/vms`).
    pub what: String,
    /// The HTTP status.
    pub status: u16,
    /// The API's error code (`vm_not_found`, `wrong_state`, `no_room`, ...), when it
    /// gave one.
    pub code: Option<String>,
    /// What went wrong, for people.
    pub message: String,
}

/// No address of an API could be reached: the request was not answered (inside a
/// [`ClientError`], as [`ApiError`]).
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// The request (`GET /v1/vms`).
    pub what: String,
    /// Why, an address each.
    pub failures: Vec<String>,
    /// Every address refused the connection: its host answered, and nothing listens
    /// there (as opposed to a timeout, a name that did not resolve, or a lost answer).
    pub refused: bool,
    /// No address got the request: each failed before it was sent (refused, a name that
    /// did not resolve, no connection made in time).
    pub unsent: bool,
}

/// Why a request to an API failed. `{:#}` shows its sources too, as anyhow's errors do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status.
    Api(ApiError),
    /// No address of the API answered.
    Unreachable(Unreachable),
    /// The request could not be made: no address would take it.
    Invalid {
        /// The request (`GET /v1/vms`).
        what: String,
        /// Why it could not be made.
        #[source]
        source: ureq::Error,
    },
    /// Its JSON body could not be encoded.
    Encode {
        /// The request.
        what: String,
        /// Why its body could not be encoded.
        #[source]
        source: serde_json::Error,
    },
    /// The answer could not be read whole (cut off, too long, too slow).
    Read {
        /// The request.
        what: String,
        /// The address that answered.
        server: String,
        /// Why the answer could not be read.
        #[source]
        source: ureq::Error,
    },
    /// The answer is not the JSON expected.
    Decode {
        /// The request.
        what: String,
        /// The address that answered.
        server: String,
        /// The start of the answer.
        text: String,
        /// How the answer differs from what was expected.
        #[source]
        source: serde_json::Error,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(e) => write!(f, "{}: {} (HTTP {})", e.what, e.message, e.status)?,
            Self::Unreachable(e) => write!(
                f,
                "cannot reach the API ({}): {}",
                e.what,
                e.failures.join("; ")
            )?,
            Self::Invalid { what, .. } => {
                write!(f, "cannot send {what}: it is not a valid request")?
            }
            Self::Encode { what, .. } => write!(f, "encoding {what}")?,
            Self::Read { what, server, .. } => {
                write!(f, "reading the answer to {what} from {server}")?
            }
            Self::Decode {
                what, server, text, ..
            } => write!(f, "unexpected answer to {what} from {server}: {text}")?,
        }
        if f.alternate() {
            let mut next = std::error::Error::source(self);
            while let Some(cause) = next {
                write!(f, ": {cause}")?;
                next = cause.source();
            }
        }
        Ok(())
    }
}

impl ClientError {
    /// The API's error answer, if it gave one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(e) => Some(e),
            _ => None,
        }
    }

    /// The API's error code (`vm_not_found`, ...), if it answered one.
    pub fn code(&self) -> Option<&str> {
        self.api().and_then(|e| e.code.as_deref())
    }

    /// Why no address answered, if none did.
    pub fn unreachable(&self) -> Option<&Unreachable> {
        match self {
            Self::Unreachable(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the request got no answer but may have arrived (a timeout, a connection
    /// cut): sent again, a request that is safe to repeat may find it done.
    pub fn unanswered(&self) -> bool {
        self.unreachable().is_some_and(|u| !u.unsent)
    }

    /// The client error `e` carries (through its context), if it is one.
    pub fn of(e: &anyhow::Error) -> Option<&Self> {
        e.downcast_ref()
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The token is not UTF-8.
    #[error("the token must be text to be sent as a bearer token")]
    TokenNotText,
    /// No address at all.
    #[error("no API address given")]
    NoAddress,
    /// An address of another scheme than http:// and https://.
    #[error("the API address '{address}' has the scheme '{scheme}': only http:// and https:// are supported")]
    Scheme {
        /// The address.
        address: String,
        /// Its scheme.
        scheme: String,
    },
    /// An address without a scheme.
    #[error("the API address '{0}' needs its scheme: http://{0} or https://{0}")]
    NoScheme(String),
    /// A CA file without a certificate.
    #[error("no PEM certificate in the CA file")]
    NoCertificate,
}

/// Whether `e` is TLS finding the server's first bytes are not TLS: an `https://`
/// address of a server that speaks plain HTTP.
fn plain_text_answer(e: &ureq::Error) -> bool {
    tls_error(e).is_some_and(|tls| {
        matches!(
            tls,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
        )
    })
}

/// The TLS error `e` is, if it is one.
fn tls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    let ureq::Error::Io(io) = e else {
        return None;
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Whether `e` is a TLS handshake that failed before any of the request was sent: the
/// server's certificate refused, or its first bytes not TLS. (A TLS error later, an
/// alert or a bad record, may come after the request went out.)
fn handshake_failed(e: &ureq::Error) -> bool {
    tls_error(e).is_some_and(|tls| {
        matches!(
            tls,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType
                | rustls::Error::PeerIncompatible(_)
        )
    }) || plain_text_answer(e)
}

/// One API, at one address or several (center replicas), with its bearer token.
pub struct ApiClient {
    /// Its addresses: a request that cannot reach one tries the next.
    bases: Vec<String>,
    /// The address that answered last, tried first.
    current: std::sync::atomic::AtomicUsize,
    auth: String,
    /// Headers sent with every request besides the token.
    headers: Vec<(&'static str, String)>,
    agent: ureq::Agent,
}

/// The certificate authorities an `https://` API's certificate must chain to: the
/// cluster's CA (`--tls-ca`), or the system's roots.
#[derive(Debug, Clone, Default)]
pub enum Roots {
    /// The platform's web roots (for a certificate from a public CA).
    #[default]
    Web,
    /// These CA certificates (DER) only.
    Cluster(Vec<Vec<u8>>),
}

impl Roots {
    /// The CA certificates of a PEM file (`--tls-ca`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, ConfigError> {
        let certs: Vec<Vec<u8>> = ureq::tls::parse_pem(pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.der().to_vec()),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(ConfigError::NoCertificate);
        }
        Ok(Self::Cluster(certs))
    }
}

impl Clone for ApiClient {
    fn clone(&self) -> Self {
        Self {
            bases: self.bases.clone(),
            current: std::sync::atomic::AtomicUsize::new(
                self.current.load(std::sync::atomic::Ordering::Relaxed),
            ),
            auth: self.auth.clone(),
            headers: self.headers.clone(),
            agent: self.agent.clone(),
        }
    }
}

/// Header on a request a center replica forwarded to the leader: it is never forwarded
/// again.
pub const FORWARDED: &str = "x-ferry-forwarded";

/// The largest answer read: a whole cluster's view of 40,000 VMs is about 20 MB.
const MAX_ANSWER_BYTES: u64 = 256 << 20;
/// The most of an answer's text an error carries: errors are shown and passed on, and
/// an answer may be as large as [`MAX_ANSWER_BYTES`].
const MAX_ERROR_TEXT: usize = 4 << 10;
/// The most of an error answer's body read: its JSON error, or the start of its text
/// (an error carries [`MAX_ERROR_TEXT`] of either).
const MAX_ERROR_BODY: u64 = 1 << 20;
/// The longest line of a streamed answer ([`ApiClient::post_lines`]): an event is a
/// small JSON chunk, and a server that never ends its line must not fill the memory.
const MAX_LINE_BYTES: usize = 1 << 20;

/// The error an API answered `what` with, `status` and body `text`: its JSON `error` and
/// `code` where it is Ferry's error shape, else the text itself.
fn api_error(what: &str, status: u16, text: String) -> ApiError {
    let answer = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |name: &str| answer.as_ref().and_then(|v| v.get(name)?.as_str().map(cut));
    ApiError {
        what: what.to_string(),
        status,
        code: field("code"),
        message: field("error").unwrap_or_else(|| cut(&text)),
    }
}

/// `text`, cut to [`MAX_ERROR_TEXT`] bytes (at a character's boundary) if longer: a
/// prefix copied, never the whole.
fn cut(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Connections to one address a client keeps open for reuse by default (ureq's default).
const IDLE_CONNECTIONS: usize = 3;

/// An API's answer to a request: what the request was (`GET /v1/vms`) and the address
/// that answered, for errors.
struct Answer {
    what: String,
    server: String,
    response: ureq::http::Response<ureq::Body>,
}

impl Answer {
    /// The answer's text (read up to `limit` bytes) if its status is a success, else
    /// its error: an [`ApiError`] (a redirect's, unread, says where to).
    fn text(mut self, limit: u64) -> Result<String, ClientError> {
        let (what, server) = (&self.what, &self.server);
        let status = self.response.status();
        if status.is_redirection() {
            let to = match self.response.headers().get("location") {
                Some(to) => cut(&String::from_utf8_lossy(to.as_bytes())),
                None => "nowhere".to_string(),
            };
            return Err(ClientError::Api(ApiError {
                what: what.clone(),
                status: status.as_u16(),
                code: None,
                message: format!(
                    "{server} redirected it to {to}, not followed: Ferry's APIs never redirect"
                ),
            }));
        }
        if !status.is_success() {
            // An error's body is read only as far as an error carries it, and a body that
            // cannot be read whole still leaves the status: callers act on that (a 503 is
            // worth sending again), and a server may not make each error cost `limit`.
            let mut body = Vec::new();
            let reader = self.response.body_mut().with_config().limit(MAX_ERROR_BODY);
            let _ = std::io::Read::read_to_end(&mut reader.reader(), &mut body);
            let text = String::from_utf8_lossy(&body).into_owned();
            return Err(ClientError::Api(api_error(what, status.as_u16(), text)));
        }
        (self.response.body_mut().with_config())
            .limit(limit)
            .read_to_string()
            .map_err(|source| ClientError::Read {
                what: what.clone(),
                server: server.clone(),
                source,
            })
    }
}

/// The lines of a streamed answer, as [`std::io::BufRead::lines`] gives them, but each
/// refused past [`MAX_LINE_BYTES`], and none after an error (a read that failed once,
/// a timeout, would fail each time).
struct Lines<R> {
    reader: R,
    /// Whose lines (`the answer to POST /v1/chat/completions from http://...`).
    what: String,
    ended: bool,
}

impl<R: std::io::BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::{BufRead, Read};
        if self.ended {
            return None;
        }
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        // A line of the limit and its "\r\n" fit; a byte more is refused unread.
        let most = MAX_LINE_BYTES as u64 + 2;
        let mut line = Vec::new();
        let read = (&mut self.reader).take(most).read_until(b'\n', &mut line);
        let line = match read {
            Ok(0) => None,
            Ok(n) => {
                let whole = line.last() == Some(&b'\n');
                if whole {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                if line.len() > MAX_LINE_BYTES || (!whole && n as u64 == most) {
                    Some(Err(invalid(format!(
                        "a line of {} is longer than {MAX_LINE_BYTES} bytes",
                        self.what
                    ))))
                } else {
                    Some(
                        String::from_utf8(line)
                            .map_err(|_| invalid(format!("a line of {} is not UTF-8", self.what))),
                    )
                }
            }
            Err(e) => Some(Err(e)),
        };
        self.ended = !matches!(line, Some(Ok(_)));
        line
    }
}

impl ApiClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7070`) with its bearer token
    /// (a host-API key or an operator's token for hosts, the operator token for the
    /// center), trusting the web's roots for `https://`.
    pub fn new(base: &str, token: &[u8]) -> Result<Self, ConfigError> {
        Self::with_roots(base, token, &Roots::Web)
    }

    /// [`ApiClient::new`] trusting `roots` for an `https://` API.
    pub fn with_roots(base: &str, token: &[u8], roots: &Roots) -> Result<Self, ConfigError> {
        Self::with_pool(base, token, roots, IDLE_CONNECTIONS)
    }

    /// [`ApiClient::with_roots`] keeping up to `idle` connections to each address open for
    /// reuse, for a caller with that many requests in flight at once (the gateway's
    /// relays): with fewer, most requests would open a new connection.
    pub fn with_pool(
        base: &str,
        token: &[u8],
        roots: &Roots,
        idle: usize,
    ) -> Result<Self, ConfigError> {
        let token = std::str::from_utf8(token).map_err(|_| ConfigError::TokenNotText)?;
        let tls = match roots {
            Roots::Web => ureq::tls::TlsConfig::builder().build(),
            Roots::Cluster(certs) => {
                let certs = certs
                    .iter()
                    .map(|der| ureq::tls::Certificate::from_der(der).to_owned())
                    .collect();
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
                    .build()
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Ferry's APIs never redirect. Followed, a redirect turns a write into a GET
            // elsewhere (without the token) whose answer is taken for the write's, and
            // one to an address that refuses makes a write that arrived look unsent.
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(60)))
            // A replica that drops packets is given up quickly for the next address.
            .timeout_connect(Some(Duration::from_secs(3)))
            .tls_config(tls)
            // ureq keeps 10 in all by default: at least that, over the addresses.
            .max_idle_connections(idle.max(10))
            .max_idle_connections_per_host(idle)
            .build()
            .new_agent();
        let bases: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(ConfigError::NoAddress);
        }
        if let Some(other) =
            (bases.iter()).find(|b| !b.starts_with("http://") && !b.starts_with("https://"))
        {
            // Prefixing a scheme only mends an address that has none (not `ftp://x`).
            if let Some((scheme, _)) = other.split_once("://") {
                return Err(ConfigError::Scheme {
                    address: other.clone(),
                    scheme: scheme.to_string(),
                });
            }
            return Err(ConfigError::NoScheme(other.clone()));
        }
        Ok(Self {
            bases,
            current: std::sync::atomic::AtomicUsize::new(0),
            auth: format!("Bearer {token}"),
            headers: Vec::new(),
            agent,
        })
    }

    /// This client (sharing its connections), sending `name: value` with every request.
    pub fn with_header(&self, name: &'static str, value: String) -> Self {
        let mut client = self.clone();
        client.headers.push((name, value));
        client
    }

    /// The addresses, comma-separated.
    pub fn base(&self) -> String {
        self.bases.join(",")
    }

    /// Sends a request built by `send` from a base address: the one that answered last
    /// first, then the others. A request that may have arrived is not sent twice unless
    /// it is a read (`idempotent`): only a failure to connect moves a write on. The
    /// answer, with the address that gave it.
    fn send(
        &self,
        what: &str,
        idempotent: bool,
        send: impl Fn(&str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, ClientError> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        let (mut refused, mut all_unsent) = (true, true);
        for k in 0..self.bases.len() {
            let i = (first + k) % self.bases.len();
            match send(&self.bases[i]) {
                Ok(response) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(Answer {
                        what: what.to_string(),
                        server: self.bases[i].clone(),
                        response,
                    });
                }
                // Not the network's doing: no address would take it.
                Err(source @ (ureq::Error::Http(_) | ureq::Error::BadUri(_))) => {
                    return Err(ClientError::Invalid {
                        what: what.to_string(),
                        source,
                    });
                }
                Err(e) => {
                    let was_refused = matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                    refused &= was_refused;
                    let unsent = was_refused
                        || handshake_failed(&e)
                        || matches!(
                            e,
                            ureq::Error::ConnectionFailed
                                | ureq::Error::HostNotFound
                                | ureq::Error::Timeout(ureq::Timeout::Connect)
                        );
                    all_unsent &= unsent;
                    let hint = if plain_text_answer(&e) {
                        " (it answered in plain text, not TLS: is it an http:// address?)"
                    } else {
                        ""
                    };
                    failures.push(format!("{}: {e}{hint}", self.bases[i]));
                    if !(unsent || idempotent) {
                        break;
                    }
                }
            }
        }
        // A write not sent on to the remaining addresses leaves them untried.
        refused &= failures.len() == self.bases.len();
        Err(ClientError::Unreachable(Unreachable {
            what: what.to_string(),
            failures,
            refused,
            unsent: all_unsent,
        }))
    }

    /// The answer as a `T` (read up to `limit` bytes), or its error.
    fn finish<T: DeserializeOwned>(&self, answer: Answer, limit: u64) -> Result<T, ClientError> {
        let (what, server) = (answer.what.clone(), answer.server.clone());
        let text = answer.text(limit)?;
        serde_json::from_str(&text).map_err(|source| ClientError::Decode {
            what,
            server,
            text: cut(&text),
            source,
        })
    }

    /// `method path` without a body (a GET is a read, sent again elsewhere if need be),
    /// within `time` if given, else the client's own limit.
    fn bodiless_request(
        &self,
        method: &'static str,
        path: &str,
        time: Option<Duration>,
    ) -> Result<Answer, ClientError> {
        let what = format!("{method} {path}");
        self.send(&what, method == "GET", |base| {
            let request = self
                .request(method, base, path)
                .body(())
                .map_err(ureq::Error::from)?;
            self.run_within(request, time)
        })
    }

    /// Runs `request`, given up on unless answered whole within `time` (if any).
    fn run_within<B: ureq::AsSendBody>(
        &self,
        request: ureq::http::Request<B>,
        time: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let request = match time {
            Some(time) => (self.agent.configure_request(request))
                .timeout_global(Some(time))
                .build(),
            None => request,
        };
        self.agent.run(request)
    }

    /// `method base+path` with the token and this client's headers, to be given a body.
    fn request(&self, method: &str, base: &str, path: &str) -> ureq::http::request::Builder {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("Authorization", &self.auth);
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        request
    }

    /// `GET path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get_within(path, MAX_ANSWER_BYTES)
    }

    /// `GET path`, whose answer is refused past `limit` bytes: for an answer known to be
    /// small, read often (a stream's next events), where a broken or hostile server must
    /// not make each read cost up to the usual limit (256 MiB).
    pub fn get_within<T: DeserializeOwned>(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<T, ClientError> {
        self.bodiless("GET", path, limit, None)
    }

    /// `method path` without a body, its answer refused past `limit` bytes and, with
    /// `time`, unless it came whole within that.
    fn bodiless<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        limit: u64,
        time: Option<Duration>,
    ) -> Result<T, ClientError> {
        let answer = self.bodiless_request(method, path, time)?;
        self.finish(answer, limit)
    }

    /// [`Self::get_within`], answered whole within `time` (a read that waits a known
    /// while on the server: a server that hangs is given up on soon after, not after
    /// the client's usual minute).
    pub fn get_within_time<T: DeserializeOwned>(
        &self,
        path: &str,
        limit: u64,
        time: Duration,
    ) -> Result<T, ClientError> {
        self.bodiless("GET", path, limit, Some(time))
    }

    /// `GET path` answered with text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.bodiless_request("GET", path, None)?
            .text(MAX_ANSWER_BYTES)
    }

    /// `POST path` with a JSON body (never sent twice), within `time` if given, else the
    /// client's own limit.
    fn post_json_request<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        time: Option<Duration>,
    ) -> Result<Answer, ClientError> {
        let what = format!("POST {path}");
        let json = serde_json::to_vec(body).map_err(|source| ClientError::Encode {
            what: what.clone(),
            source,
        })?;
        self.send(&what, false, |base| {
            let request = (self.request("POST", base, path))
                .header("Content-Type", "application/json; charset=utf-8")
                .body(json.as_slice())
                .map_err(ureq::Error::from)?;
            self.run_within(request, time)
        })
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let answer = self.post_json_request(path, body, None)?;
        self.finish(answer, MAX_ANSWER_BYTES)
    }

    /// [`Self::post`], whose answer is refused past `limit` bytes, answered whole within
    /// `time` (as [`Self::get_within_time`]).
    pub fn post_within_time<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        limit: u64,
        time: Duration,
    ) -> Result<T, ClientError> {
        let answer = self.post_json_request(path, body, Some(time))?;
        self.finish(answer, limit)
    }

    /// `POST path` with a JSON body, answered with a stream of lines (server-sent
    /// events): the lines as they arrive, each refused past 1 MiB (which ends the
    /// stream), the stream cut off `time` after it was asked for (a long answer must not
    /// be cut by the client's usual minute). An error status is a [`ClientError::Api`].
    pub fn post_lines<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        time: Duration,
    ) -> Result<impl Iterator<Item = std::io::Result<String>>, ClientError> {
        let answer = self.post_json_request(path, body, Some(time))?;
        if !answer.response.status().is_success() {
            return Err(answer.text(MAX_ANSWER_BYTES).expect_err("an error status"));
        }
        let what = format!("the answer to {} from {}", answer.what, answer.server);
        let reader = std::io::BufReader::new(answer.response.into_body().into_reader());
        Ok(Lines {
            reader,
            what,
            ended: false,
        })
    }

    /// `DELETE path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.bodiless("DELETE", path, MAX_ANSWER_BYTES, None)
    }

    /// [`Self::delete`], whose answer is refused past `limit` bytes, answered whole
    /// within `time` (as [`Self::get_within_time`]).
    pub fn delete_within_time<T: DeserializeOwned>(
        &self,
        path: &str,
        limit: u64,
        time: Duration,
    ) -> Result<T, ClientError> {
        self.bodiless("DELETE", path, limit, Some(time))
    }

    /// Passes a request on as it came (a center replica forwarding a write to the
    /// leader): `method path` with the caller's own `Authorization` header and JSON
    /// `body`; answers with the status, content type and body as they came back.
    pub fn relay(
        &self,
        method: &str,
        path: &str,
        authorization: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String, Vec<u8>), ClientError> {
        let what = format!("{method} {path}");
        let Answer {
            server,
            mut response,
            ..
        } = self.send(&what, method == "GET", |base| {
            let request = ureq::http::Request::builder()
                .method(method)
                .uri(format!("{base}{path}"))
                .header("Authorization", authorization)
                .header(FORWARDED, "1")
                .header("Content-Type", "application/json")
                .body(body.clone())
                .map_err(ureq::Error::from)?;
            self.agent.run(request)
        })?;
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|source| ClientError::Read {
                what: what.clone(),
                server,
                source,
            })?;
        Ok((response.status().as_u16(), content_type, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// The reason a request to `base` failed, as an [`Unreachable`].
    fn unreachable(base: &str) -> Unreachable {
        let client = ApiClient::new(base, b"token").unwrap();
        let error = client.get::<serde_json::Value>("/v1/vms").unwrap_err();
        error.unreachable().cloned().expect("an Unreachable")
    }

    #[test]
    fn an_https_address_of_a_plain_http_server_is_named_as_such() {
        // A plain HTTP server answers a TLS hello, which is no request it can read, at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.read(&mut [0u8; 4096]);
            let _ = stream.write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        });
        let failure = unreachable(&base).failures.join("; ");
        assert!(
            failure.contains("it answered in plain text, not TLS: is it an http:// address?"),
            "{failure}"
        );
        // No request went out: a write moves on to the next address.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain = format!("https://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.read(&mut [0u8; 4096]);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n");
        });
        let next = answering(1, "200 OK", "{}".into());
        let client = ApiClient::new(&format!("{plain},{next}"), b"token").unwrap();
        let answer: serde_json::Value = client.post("/v1/x", &serde_json::json!({})).unwrap();
        assert_eq!(answer, serde_json::json!({}));
        // A server that is not there gets no such hint.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        let failure = unreachable(&gone).failures.join("; ");
        assert!(!failure.contains("plain text"), "{failure}");
    }

    /// A server answering `answers` connections with `status` and `body`; its address.
    fn answering(answers: usize, status: &'static str, body: String) -> String {
        use std::io::{BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(answers) {
                let mut stream = stream.unwrap();
                // Read whole: a POST's body may come after its head, and closed with it
                // unread the connection is reset and the answer lost.
                if ferry_testdata::read_http_request(&mut BufReader::new(&stream)).is_none() {
                    continue;
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        base
    }

    /// A server answering one connection each with the raw HTTP `answers`, in turn, once
    /// it read the request whole (closed with some of it unread, the connection would be
    /// reset, and the answer lost); its address.
    fn answering_raw(answers: Vec<String>) -> String {
        use std::io::{BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (stream, answer) in listener.incoming().zip(answers) {
                let mut stream = stream.unwrap();
                ferry_testdata::read_http_request(&mut BufReader::new(&stream))
                    .expect("a whole request");
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        base
    }

    #[test]
    fn a_redirect_is_not_followed_and_its_error_says_so() {
        let redirect = |to: &str| {
            format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        };
        let listing = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"vms\": []}";
        // Followed, a create would become a GET of the list, without the token, and that
        // answer be taken for the create's.
        let base = answering_raw(vec![redirect("/v1/vms"), listing.to_string()]);
        let client = ApiClient::new(&base, b"token").unwrap();
        let error =
            (client.post::<_, serde_json::Value>("/v1/vms", &serde_json::json!({}))).unwrap_err();
        let error = error.api().cloned().expect("an ApiError");
        assert_eq!(error.status, 302, "{error:?}");
        assert!(
            error.message.contains("redirect") && error.message.contains("/v1/vms"),
            "{error:?}"
        );
        // A write redirected to an address that refuses it had arrived: it is not sent to
        // the next address.
        let refusing = ferry_testdata::refusing_addr();
        let first = answering_raw(vec![redirect(&format!("http://{refusing}/v1/vms"))]);
        let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bases = format!("{first},http://{}", next.local_addr().unwrap());
        let client = ApiClient::new(&bases, b"token").unwrap();
        let error =
            (client.post::<_, serde_json::Value>("/v1/vms", &serde_json::json!({}))).unwrap_err();
        assert!(error.api().is_some(), "{error:#}");
        next.set_nonblocking(true).unwrap();
        assert!(next.accept().is_err(), "the write was sent again");
    }

    #[test]
    fn a_stream_is_read_for_the_time_given_not_the_clients_usual_limit() {
        // Five lines 150 ms apart, on one connection each time.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Read, Write};
            for stream in listener.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut line, mut length) = (String::new(), 0);
                while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                    line.clear();
                }
                reader.read_exact(&mut vec![0u8; length]).unwrap();
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 40\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(head.as_bytes());
                for k in 0..5 {
                    std::thread::sleep(Duration::from_millis(150));
                    if stream.write_all(format!("data: {k}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            }
        });
        let client = ApiClient::new(&base, b"token").unwrap();
        let read = |time| -> Vec<std::io::Result<String>> {
            let lines = client.post_lines("/v1/completions", &1, time).unwrap();
            lines.collect()
        };
        // Given 5 s, every line; given 400 ms, two or so and then an error.
        let whole = read(Duration::from_secs(5));
        assert_eq!(whole.len(), 5, "{whole:?}");
        assert!(whole.iter().all(|line| line.is_ok()), "{whole:?}");
        let cut = read(Duration::from_millis(400));
        assert!(cut.len() < 5, "{cut:?}");
        assert!(cut.last().unwrap().is_err(), "{cut:?}");
    }

    #[test]
    fn a_streamed_line_past_the_limit_ends_the_stream_with_an_error() {
        let long = format!("data: {}", "x".repeat(MAX_LINE_BYTES * 2));
        let body = format!("data: a\n{long}\ndata: b\n");
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let client = ApiClient::new(&answering_raw(vec![answer]), b"token").unwrap();
        let mut lines =
            (client.post_lines("/v1/chat/completions", &1, Duration::from_secs(5))).unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "data: a");
        let error = match lines.next().unwrap() {
            Ok(line) => panic!("a line of {} bytes", line.len()),
            Err(e) => e,
        };
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error:?}");
        assert!(error.to_string().contains("longer than"), "{error:?}");
        // Ended: nothing of the rest is taken for lines.
        assert!(lines.next().is_none());
    }

    #[test]
    fn a_broken_answer_names_the_request_and_the_server() {
        let html = "<html>bad gateway</html>";
        let not_json = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
            html.len()
        );
        // Cut short: 100 bytes promised, 5 sent.
        let cut_short = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\nhello";
        let base = answering_raw(vec![not_json, cut_short.to_string(), cut_short.to_string()]);
        let client = ApiClient::new(&base, b"token").unwrap();
        let error = format!(
            "{:#}",
            client.get::<serde_json::Value>("/v1/vms").unwrap_err()
        );
        assert!(
            error.contains("GET /v1/vms") && error.contains(&base),
            "{error:?}"
        );
        assert!(error.contains(html), "{error:?}");
        // `{:#}` adds the cause: serde's, then the transport's.
        assert!(error.contains("expected value"), "{error:?}");
        let short = client.get_text("/metrics").unwrap_err();
        let (error, plain) = (format!("{short:#}"), short.to_string());
        assert!(
            error.contains("GET /metrics") && error.contains(&base),
            "{error:?}"
        );
        assert!(matches!(short, ClientError::Read { .. }), "{short:?}");
        assert!(
            error.len() > plain.len() && error.starts_with(&plain),
            "{error:?}"
        );
        let error = format!(
            "{:#}",
            client
                .relay("GET", "/v1/vms", "Bearer t", Vec::new())
                .unwrap_err()
        );
        assert!(
            error.contains("GET /v1/vms") && error.contains(&base),
            "{error:?}"
        );
    }

    #[test]
    fn an_answer_past_the_limit_asked_is_refused() {
        let body = serde_json::json!({ "text": "x".repeat(2 << 20) }).to_string();
        let client = ApiClient::new(&answering(2, "200 OK", body), b"token").unwrap();
        assert!(client
            .get_within::<serde_json::Value>("/big", 1 << 20)
            .is_err());
        // The same answer within the usual limit.
        let whole: serde_json::Value = client.get("/big").unwrap();
        assert_eq!(whole["text"].as_str().unwrap().len(), 2 << 20);
    }

    #[test]
    fn an_error_carries_a_bounded_part_of_a_long_error_text() {
        let long = "é".repeat(100 << 10);
        let body = serde_json::json!({ "error": long, "code": "internal" }).to_string();
        let client =
            ApiClient::new(&answering(1, "500 Internal Server Error", body), b"token").unwrap();
        let error = client.get::<serde_json::Value>("/v1/vms").unwrap_err();
        let error = error.api().cloned().expect("an ApiError");
        assert_eq!(error.status, 500);
        assert!(error.message.starts_with("éé"), "{}", error.message);
        assert!(
            error.message.len() <= MAX_ERROR_TEXT + 3,
            "{}",
            error.message.len()
        );
    }

    #[test]
    fn an_error_keeps_its_status_whatever_its_bodys_length() {
        // Longer than the limit a call asks for, and than any error's body is read: the
        // status still comes back (a 503 is worth sending again), from the start of the
        // text, and the rest is left unread.
        let body = "x".repeat(2 * MAX_ERROR_BODY as usize);
        let base = answering(2, "503 Service Unavailable", body);
        let client = ApiClient::new(&base, b"token").unwrap();
        for error in [
            client.get_within::<serde_json::Value>("/v1/vms", 1 << 10),
            client.get::<serde_json::Value>("/v1/vms"),
        ] {
            let error = error.unwrap_err().api().cloned().expect("an ApiError");
            assert_eq!(error.status, 503, "{error:?}");
            assert!(error.message.starts_with("xxx"), "{}", error.message);
        }
    }

    #[test]
    fn a_text_requests_error_is_the_apis_message_and_code_not_its_json() {
        let body = serde_json::json!({ "error": "no VM x", "code": "vm_not_found" }).to_string();
        let client = ApiClient::new(&answering(1, "404 Not Found", body), b"token").unwrap();
        let error = client.get_text("/v1/vms/x/console").unwrap_err();
        let error = error.api().cloned().expect("an ApiError");
        assert_eq!(
            (error.status, error.code.as_deref(), error.message.as_str()),
            (404, Some("vm_not_found"), "no VM x")
        );
    }

    #[test]
    fn calls_given_a_time_give_up_on_a_server_that_never_answers_by_then() {
        // Takes the connections (the backlog does) and says nothing.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let client = ApiClient::new(&base, b"token").unwrap();
        let time = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let read =
            client.get_within_time::<serde_json::Value>("/v1/vms/v/streams/1", 1 << 20, time);
        assert!(read.is_err());
        let body = serde_json::json!({ "stream": 1 });
        let post = client.post_within_time::<_, serde_json::Value>(
            "/v1/vms/v/streams",
            &body,
            1 << 16,
            time,
        );
        let post = post.unwrap_err();
        // Not a refusal: it may have arrived.
        assert!(post.api().is_none(), "{post:#}");
        let delete =
            client.delete_within_time::<serde_json::Value>("/v1/vms/v/streams/1", 1 << 16, time);
        assert!(delete.is_err());
        // Three tries of 300 ms, not of the client's usual minute.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        drop(listener);
    }

    #[test]
    fn a_write_given_a_limit_refuses_an_answer_past_it() {
        let body = serde_json::json!({ "text": "x".repeat(100 << 10) }).to_string();
        let client = ApiClient::new(&answering(3, "200 OK", body), b"token").unwrap();
        let time = Duration::from_secs(5);
        let post = client.post_within_time::<_, serde_json::Value>("/big", &1, 64 << 10, time);
        assert!(post.is_err());
        let delete = client.delete_within_time::<serde_json::Value>("/big", 64 << 10, time);
        assert!(delete.is_err());
        // The same answer within a larger limit.
        let whole: serde_json::Value = client.post_within_time("/big", &1, 1 << 20, time).unwrap();
        assert_eq!(whole["text"].as_str().unwrap().len(), 100 << 10);
    }

    #[test]
    fn a_request_no_url_can_hold_is_refused_as_such_not_as_unreachable() {
        let client = ApiClient::new(&answering(0, "200 OK", String::new()), b"token").unwrap();
        let error = client.get::<serde_json::Value>("/v1/vms/a b").unwrap_err();
        assert!(error.unreachable().is_none(), "{error:#}");
        assert!(
            error.to_string().contains("not a valid request"),
            "{error:#}"
        );
    }

    #[test]
    fn only_a_refused_connection_at_every_address_counts_as_refused() {
        let closed_addr = ferry_testdata::refusing_addr();
        let silent_addr = ferry_testdata::dropping_addr(2);

        let refused = unreachable(&format!("http://{closed_addr}"));
        assert!(refused.refused && refused.unsent, "{refused:?}");
        let said = ClientError::Unreachable(refused).to_string();
        assert!(said.contains("cannot reach the API"), "{said}");

        let dropped = unreachable(&format!("http://{silent_addr}"));
        assert!(!dropped.refused && !dropped.unsent, "{dropped:?}");
        let mixed = unreachable(&format!("http://{closed_addr},http://{silent_addr}"));
        assert!(!mixed.refused && !mixed.unsent, "{mixed:?}");
    }
    /// A keep-alive server answering requests `{}` once `together` of them are waiting
    /// (so that many are in flight at once); its address and the count of connections it
    /// accepted.
    fn keeping_alive(together: usize) -> (String, Arc<AtomicUsize>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let waiting = Arc::new(std::sync::Barrier::new(together));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let waiting = waiting.clone();
                let stream = stream.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    let mut line = String::new();
                    loop {
                        // A GET: its head ends at an empty line.
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line != "\r\n" {
                            continue;
                        }
                        waiting.wait();
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        if stream.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    #[test]
    fn a_pooled_client_keeps_a_connection_for_each_request_it_had_in_flight() {
        for (idle, connections) in [(8, 8), (IDLE_CONNECTIONS, 8 + 8 - IDLE_CONNECTIONS)] {
            let (base, accepted) = keeping_alive(8);
            let client = ApiClient::with_pool(&base, b"token", &Roots::Web, idle).unwrap();
            // Two waves of 8 requests at once: the second finds `idle` connections kept.
            for _ in 0..2 {
                std::thread::scope(|s| {
                    for _ in 0..8 {
                        s.spawn(|| client.get::<serde_json::Value>("/").unwrap());
                    }
                });
            }
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                connections,
                "keeping {idle}"
            );
        }
    }
}
