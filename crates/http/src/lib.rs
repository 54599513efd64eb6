//! The HTTP plumbing the host daemon's and the cluster center's APIs share: bearer
//! tokens ([`tokens`]), JSON answers and errors with stable codes (axum's own refusals
//! rewritten into them: [`json_errors`]), blocking work off the async runtime, and a
//! server whose connections are bounded in number and in the time a request may take to
//! arrive, over an HTTPS listener whose handshakes cannot hold up other clients.

pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// An error answer: `{"error": message, "code": code}` with `status`; `code` is stable,
/// for scripts (the message may change).
pub fn error_with_code(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": message, "code": code });
    (status, Json(body)).into_response()
}

/// An error answer taken apart for a middleware that rewrites it: its parts and its body
/// (up to 64 KiB). Any other answer comes back untouched, as `Err`.
pub async fn error_answer(
    response: Response,
) -> Result<(axum::http::response::Parts, axum::body::Bytes), Response> {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return Err(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    Ok((parts, bytes))
}

/// What an error answer's body says, as text (its status's reason when it is empty).
pub fn error_text(parts: &axum::http::response::Parts, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_string()
    } else {
        text
    }
}

/// `answer` with the headers of the error answer it replaces (`Allow`, `Retry-After`,
/// ...), but its own body's type and length.
pub fn keeping_headers(mut answer: Response, replaced: &axum::http::response::Parts) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    for (name, value) in &replaced.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// Rewrites the error answers that are not JSON into [`error_with_code`]'s shape: axum's
/// own refusals of a path, a query or a body, and of a method, come as plain text, and
/// scripts reading `code` got none.
pub async fn json_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        return response;
    }
    let (parts, body) = match error_answer(response).await {
        Ok(error) => error,
        Err(other) => return other,
    };
    let code = refusal_code(parts.status);
    let answer = error_with_code(parts.status, code, &error_text(&parts, &body));
    keeping_headers(answer, &parts)
}

/// Says `X-Content-Type-Options: nosniff` on every answer: a browser takes an answer for
/// the type it says, never for HTML it guessed (a JSON error quoting a host's text).
pub async fn no_sniffing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    response.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    response
}

/// The code of axum's own refusal with `status`: a client told 400 would send a body
/// too large again unchanged.
fn refusal_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    }
}

/// An error answer whose code follows from `status` alone.
pub fn error(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::INSUFFICIENT_STORAGE => "no_room",
        _ => "internal",
    };
    error_with_code(status, code, message)
}

/// Runs a blocking operation off the async runtime and answers with its result (`ok`
/// on success, the error's own answer otherwise). Shared with the cluster center's API.
pub async fn answer<T, E>(
    ok: StatusCode,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Response
where
    T: Serialize + Send + 'static,
    E: IntoResponse + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(value)) => (ok, Json(value)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => internal_error(&e),
    }
}

/// The answer to a request whose handler failed (`why`: it panicked): 500, with `why`
/// logged, not told (a panic's message may name this server's internals).
pub fn internal_error(why: &dyn std::fmt::Display) -> Response {
    tracing::error!("an API request's handler failed: {why}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (the server's log says more)",
    )
}

/// A JSON request body. One that is not the expected JSON is answered with the API's
/// error body (`bad request body: ...`) before the handler runs, with axum's status for
/// it: 400 (not JSON), 413 `too_large`, 415 (not sent as JSON), 422 (not the fields
/// expected).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    Json<T>: axum::extract::FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(body)) => Ok(Body(body)),
            Err(e) => {
                let status = e.status();
                Err(error_with_code(
                    status,
                    refusal_code(status),
                    &format!("bad request body: {e}"),
                ))
            }
        }
    }
}

/// The roots an API client of the cluster trusts: its CA with TLS on, else the web's.
pub fn cluster_roots(tls: Option<&ferry_migrate::TlsConfig>) -> ferry_client::Roots {
    match tls {
        Some(tls) => {
            ferry_client::Roots::Cluster(tls.ca_certificates().iter().map(|c| c.to_vec()).collect())
        }
        None => ferry_client::Roots::Web,
    }
}

/// An API served on a task of its own ([`spawn`]): dropping it stops the server (the port
/// closes, requests in flight finish).
pub struct Serving {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `router` on `listener` on a task of `runtime`, until the [`Serving`]
/// returned is dropped; a failure is logged as `name`'s.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    name: &'static str,
) -> Serving {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = serve(listener, router, tls, shutdown).await {
            tracing::error!("{name} stopped: {e}");
        }
    });
    Serving { _stop: stop }
}

/// Time a client has to send a request's headers, which is also the longest a kept-alive
/// connection idles: past it the connection is closed, so clients that connect and say
/// nothing cannot pile up connections. Longer than clients keep idle connections
/// (ureq 15 s, httpx 5 s), so none reuses one as it is being closed.
const HEADER_READ_TIME: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the kernel's backlog. Fewer where the
/// process may open too few files ([`within_open_files`]).
const MAX_CONNECTIONS: usize = 4096;

/// The share of the connections (and of the TLS handshakes) one client address may hold
/// at once: a quarter, so that one client, before any token of its is checked, cannot take
/// them all; but at least [`MIN_PER_ADDRESS`] (all, where there are fewer). An address is
/// a whole IPv4 or IPv6 address (a client with many addresses is not held back by this;
/// grouping IPv6 by /64 would lump a data centre's hosts together). Loopback is exempt:
/// the machine's own processes (the benches' and tests' many clients among them) are not
/// told apart by address.
const SHARE_PER_ADDRESS: usize = 4;

/// The fewest connections one client address is left: a center's gateway keeps up to 256
/// streams relayed to a host, on connections of their own, and calls it besides.
const MIN_PER_ADDRESS: usize = 512;

/// Connections refused for their address's share that are being told so at once; past
/// it, one is closed unanswered (an address past its share cannot hold many slots of the
/// server's with refusals).
const MAX_REFUSING: usize = 64;

/// The connections open from each client address, each address at most `limit`.
struct PeerCounts {
    limit: usize,
    exempt_loopback: bool,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// A connection counted against its client address until it is dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    address: std::net::IpAddr,
}

impl PeerCounts {
    /// Counts for a server of `most` connections: each address a [`SHARE_PER_ADDRESS`] of
    /// them, at least [`MIN_PER_ADDRESS`] (at most all), loopback exempt.
    fn new(most: usize) -> Arc<Self> {
        Self::with_limit(per_address(most), true)
    }

    fn with_limit(limit: usize, exempt_loopback: bool) -> Arc<Self> {
        Arc::new(Self {
            limit,
            exempt_loopback,
            open: Default::default(),
        })
    }

    /// Counts a connection from `peer`: `Err` if its address holds its limit already,
    /// `Ok(None)` if it is not counted (loopback).
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Option<PeerSlot>, ()> {
        let address = client_address(peer.ip());
        if self.exempt_loopback && address.is_loopback() {
            return Ok(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_default();
        if *count >= self.limit {
            return Err(());
        }
        *count += 1;
        Ok(Some(PeerSlot {
            counts: self.clone(),
            address,
        }))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = (self.counts.open.lock()).unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The connections one address may hold of a server's `most` (see [`SHARE_PER_ADDRESS`]).
fn per_address(most: usize) -> usize {
    (most / SHARE_PER_ADDRESS)
        .max(MIN_PER_ADDRESS.min(most))
        .max(1)
}

/// The client address `ip` counts against: itself, an IPv4-mapped IPv6 address as the
/// IPv4 one (a dual-stack listener's IPv4 clients).
fn client_address(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, Into::into),
        v4 => v4,
    }
}

/// The `code` of the refusal of a connection past its address's share: nothing on it
/// was read, so a client may make its call again shortly.
pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

/// What a connection past its address's share is told before it is closed: 429 with
/// `Retry-After` and [`error_with_code`]'s body, as the APIs' own refusals of a busy client.
fn too_many_from_address() -> Vec<u8> {
    let body = serde_json::json!({
        "error": "too many connections from this address at once: close some and try again",
        "code": TOO_MANY_CONNECTIONS,
    })
    .to_string();
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Tells `io` it holds too many connections, takes what it sends meanwhile (64 KiB, a
/// second at most: closed with a request unread, the connection would be reset and the
/// answer lost) and closes it.
async fn refuse_connection<Io>(mut io: Io)
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(&too_many_from_address()).await?;
        io.shutdown().await?;
        let mut unread = [0u8; 4096];
        let mut taken = 0;
        while taken < 64 << 10 {
            match io.read(&mut unread).await? {
                0 => break,
                n => taken += n,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// `max`, or less where this process may open so few files (`files`, its soft limit:
/// 1024 is systemd's default) that `max` descriptors held by clients before any token is
/// checked would leave none for VMs, migrations and files: at most `files / divisor`,
/// and at least one.
fn within_open_files(max: usize, divisor: u64, files: Option<u64>) -> usize {
    let share = files.map_or(usize::MAX, |files| {
        usize::try_from(files / divisor).unwrap_or(usize::MAX)
    });
    max.min(share).max(1)
}

/// This process's soft limit of open files (`None`: unlimited, or not known).
fn open_files_limit() -> Option<u64> {
    const NAME: &str = "Max open files";
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with(NAME))?;
    line[NAME.len()..].split_whitespace().next()?.parse().ok()
}

/// Connections the kernel holds for an API listener until they are accepted (capped by
/// `net.core.somaxconn`). Tokio's default, 1024, overflowed under a thousand clients
/// connecting at once on a busy machine: their handshakes were dropped, retried, and
/// after a minute reset.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener for an API on `listen` (`HOST:PORT`; the first of its addresses that
/// binds), with a backlog of 4096 connections (see `LISTEN_BACKLOG`).
pub async fn bind(listen: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted daemon takes its port back at once.
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{listen} names no address"),
        )
    }))
}
/// Most bytes of a request's head: Ferry's are far smaller, and hyper's own bound (its
/// read buffer's, about 400 KiB) let connections that never finish a head hold 1.6 GiB
/// before any token was checked. (Bounding the read buffer itself instead made hyper
/// reset connections under a thousand concurrent requests.)
const MAX_HEAD_BYTES: usize = 32 << 10;
/// Time a request's body has to arrive, from when it is first waited for: past it the
/// read fails, so a client that announces a large body and sends a byte a minute cannot
/// hold a connection for ever.
const BODY_READ_TIME: Duration = Duration::from_secs(30);
/// Time a write of an answer may wait for the client to take more of it: past it the
/// connection is closed, so a client that asks (pipelining requests, say) and never
/// reads cannot hold a connection, and the answers buffered for it, for ever. As long as
/// the gateway gives a streaming client that stops reading.
const WRITE_TIME: Duration = Duration::from_secs(60);

/// How long a client may take on a connection: to send a request's head (or the next
/// one's), its body, and to take each piece of an answer.
#[derive(Debug, Clone, Copy)]
struct ClientTimes {
    header: Duration,
    body: Duration,
    write: Duration,
}

/// The times every API connection is served with.
const CLIENT_TIMES: ClientTimes = ClientTimes {
    header: HEADER_READ_TIME,
    body: BODY_READ_TIME,
    write: WRITE_TIME,
};

/// A request body that fails once it has taken longer than `time` to arrive.
struct Deadline {
    inner: axum::body::Body,
    time: Duration,
    /// Set when the body is first waited for.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set once the body has been read to its end.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

/// A request body took longer than its time to arrive.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyReadTimedOut(Duration);

impl hyper::body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
                this.ended.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return Poll::Ready(frame);
        }
        let time = this.time;
        let timer = (this.timer).get_or_insert_with(|| Box::pin(tokio::time::sleep(time)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyReadTimedOut(time))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// `router` with each request's body bounded in time by [`Deadline`], and each answer
/// given before its request's body was read to the end (a refusal) saying
/// `Connection: close`. hyper may close such a connection after the answer (when the rest
/// of the body has not arrived, it cannot tell where the next request would start); a
/// client told nothing kept it for its next request and found it closed under that one.
/// Saying so closes a few connections hyper would have kept (a small body that came with
/// the head), which costs a refusal's client a new connection, no more.
fn with_body_rules(router: Router, time: Duration) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            use hyper::body::Body as _;
            use std::sync::atomic::{AtomicBool, Ordering};
            let ended = Arc::new(AtomicBool::new(request.body().is_end_stream()));
            let request = request.map(|inner| {
                axum::body::Body::new(Deadline {
                    inner,
                    time,
                    timer: None,
                    ended: ended.clone(),
                })
            });
            let mut response = next.run(request).await;
            if !ended.load(Ordering::Relaxed) {
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            response
        },
    ))
}

/// Serves the API on `listener` until `shutdown` completes (then the port closes and
/// requests in flight finish): over HTTPS with `tls` (the server identity of
/// [`ferry_migrate::TlsConfig::https_server`]), else plain HTTP.
async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => serve_on(listener, router, shutdown, CLIENT_TIMES).await,
        Some(config) => {
            // With the connections queued for the server (as many again) and those
            // served, at most half the files this process may open.
            let handshakes = within_open_files(MAX_TLS_HANDSHAKES, 8, open_files_limit());
            let peers = PeerCounts::new(handshakes);
            let listener = TlsListener::new(listener, config, handshakes, peers)?;
            serve_on(listener, router, shutdown, CLIENT_TIMES).await
        }
    }
}

/// [`serve`] on a listener of either kind: HTTP/1.1, at most [`MAX_CONNECTIONS`]
/// connections at once, each closed when a request's headers (or the next request) take
/// longer than `times.header` or a write of an answer waits longer than `times.write`, a
/// request's body failing when it takes longer than `times.body`. (`axum::serve` sets no
/// timer, so hyper applies no header timeout at all there; hyper has none for bodies or
/// writes.)
async fn serve_on<L: axum::serve::Listener<Addr = SocketAddr>>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    times: ClientTimes,
) -> std::io::Result<()> {
    let most = within_open_files(MAX_CONNECTIONS, 4, open_files_limit());
    serve_within(
        listener,
        router,
        shutdown,
        times,
        (most, PeerCounts::new(most)),
    )
    .await
}

/// [`serve_on`] with at most `most` connections at once, each client address's counted
/// by `peers`.
async fn serve_within<L: axum::serve::Listener<Addr = SocketAddr>>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    times: ClientTimes,
    (most, peers): (usize, Arc<PeerCounts>),
) -> std::io::Result<()> {
    let router = with_body_rules(router, times.body);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(most));
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Ok(counted) = peers.admit(peer) else {
            tracing::debug!(%peer, "an API connection refused: its address holds its share");
            // Told on a slot of the refusals' own, not the server's (else the address
            // would hold those with refusals); past those, closed unanswered.
            drop(slot);
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_connection(io).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut io = tokio_io_timeout::TimeoutStream::new(io);
        io.set_write_timeout(Some(times.write));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(times.header)
            .max_header_size(MAX_HEAD_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(Box::pin(io)), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("an API connection ended: {e}");
            }
            drop((slot, counted));
        });
    }
    // The port closes; requests in flight finish.
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// TLS handshakes in progress at once (each a small task, bounded in time), counting
/// connections handshaken and waiting for room in the queue to the server (which holds
/// as many again); more connections wait in the kernel's backlog. Large enough that idle
/// connections cannot starve real clients for long.
const MAX_TLS_HANDSHAKES: usize = 1024;
/// Time a connection has to finish its TLS handshake.
const TLS_HANDSHAKE_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// An HTTPS listener: TCP connections whose TLS handshakes run on their own tasks (at
/// most `handshakes` at once, each bounded in time), so that a slow or silent client
/// holds up nobody else.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Handshakes connections from `listener` with `config`, at most `handshakes` at once
    /// ([`MAX_TLS_HANDSHAKES`] in production), each client address's counted by `peers`,
    /// for [`axum::serve::Listener::accept`].
    fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        handshakes: usize,
        peers: Arc<PeerCounts>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (done, ready) = tokio::sync::mpsc::channel(handshakes);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(handshakes));
        tokio::spawn(async move {
            let mut failures = ferry_migrate::receive::AcceptFailures::new("API connections");
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                // The server stopped taking connections: so does the port.
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = done.closed() => return,
                };
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if let Some(pause) = failures.failed(&e) {
                            tokio::time::sleep(pause).await;
                        }
                        continue;
                    }
                };
                // Past its address's share of the handshakes, closed unheard (a handshake
                // refused is what a client sees of a busy listener).
                let Ok(counted) = peers.admit(peer) else {
                    tracing::debug!(%peer, "an API TLS connection refused: its address holds its share");
                    continue;
                };
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    let _counted = counted;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIME, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            // The slot is kept until the connection is queued for the
                            // server: while it takes none (all its connections busy),
                            // the handshaken ones stay bounded (a queue and the slots
                            // full) and the rest wait in the backlog, instead of tasks
                            // and descriptors piling up here.
                            let _ = done.send((stream, peer)).await;
                            drop(slot);
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "API TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The acceptor task ended (the runtime is going away): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Test certificates, shared with the migration crate's tests.
#[cfg(test)]
#[path = "../../migrate/tests/pki/mod.rs"]
mod test_pki;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn an_api_listener_holds_more_waiting_connections_than_tokios_default_backlog() {
        // More than tokio's 1024 connect at once, none accepted yet (a busy daemon).
        const CLIENTS: usize = 1200;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let files = ferry_testdata::raise_file_limit();
        if somaxconn <= CLIENTS || files as usize <= CLIENTS + 100 {
            // The machine's limits, not Ferry's: said loudly, as a test that cannot run.
            ferry_testdata::cannot_run_here(
                "an_api_listener_holds_more_waiting_connections_than_tokios_default_backlog",
                &format!(
                    "net.core.somaxconn is {somaxconn} and {files} files may be open; it needs \
                     more than {CLIENTS} and {}",
                    CLIENTS + 100
                ),
            );
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let listener = runtime.block_on(bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..CLIENTS {
            // A full backlog drops the handshake: the connect times out.
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(c) => held.push(c),
                Err(e) => panic!("connection {i} of {CLIENTS} not held: {e}"),
            }
        }
        drop(listener);
    }

    /// Serves `router` with `times`; its address.
    fn serving(
        runtime: &tokio::runtime::Runtime,
        router: Router,
        times: ClientTimes,
    ) -> SocketAddr {
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::future::pending();
        runtime.spawn(serve_on(listener, router, stop, times));
        addr
    }

    /// Checks that the server at `addr` answers `request` with 200 and `body`.
    fn answered(addr: SocketAddr, request: &[u8], body: &str) {
        let answer = exchange(addr, request);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&format!("\r\n\r\n{body}")), "{answer}");
    }

    /// What the server sends on `conn` until it closes it, within 5 s.
    fn closed_by_server(mut conn: std::net::TcpStream) -> String {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        let read = conn.read_to_end(&mut answer);
        assert!(read.is_ok(), "still open after 5 s: {read:?}");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// What the server at `addr` answers to `request`, sent on a connection of its own
    /// (the request must close it).
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(request).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn connections_held_before_a_token_is_checked_leave_most_descriptors_free() {
        // systemd's default soft limit: plain connections and TLS handshakes (and those
        // queued after them) hold at most half of it.
        let files = Some(1024);
        let served = within_open_files(MAX_CONNECTIONS, 4, files);
        let handshaking = within_open_files(MAX_TLS_HANDSHAKES, 8, files);
        assert_eq!((served, handshaking), (256, 128));
        // A generous limit, or none, keeps the usual bounds; a tiny one leaves one.
        assert_eq!(
            within_open_files(MAX_CONNECTIONS, 4, Some(1 << 20)),
            MAX_CONNECTIONS
        );
        assert_eq!(within_open_files(MAX_CONNECTIONS, 4, None), MAX_CONNECTIONS);
        assert_eq!(within_open_files(MAX_TLS_HANDSHAKES, 8, Some(3)), 1);
        // The limit read is this process's (a shell started from it inherits it; a test
        // running beside this one may raise it meanwhile).
        let before = open_files_limit();
        let shell = std::process::Command::new("sh")
            .args(["-c", "ulimit -n"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&shell.stdout).trim().parse().ok();
        let after = open_files_limit();
        assert!(
            said == before || said == after,
            "{said:?}, {before:?}, {after:?}"
        );
    }

    /// One answer read from `conn` (its head, lowercased, and body), leaving it open.
    fn one_answer(conn: &mut std::net::TcpStream) -> (String, String) {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).expect("an answer's head");
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("a length");
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).unwrap();
        (head, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn an_answer_given_before_its_body_was_read_closes_the_connection_and_says_so() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new()
            .route(
                "/refuse",
                axum::routing::post(|| async { (StatusCode::FORBIDDEN, "no") }),
            )
            .route("/echo", axum::routing::post(|body: String| async { body }))
            .route("/", axum::routing::get(|| async { "ok" }));
        let addr = serving(&runtime, router, CLIENT_TIMES);
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        // Read bodies and no body keep the connection for the next request.
        for (request, body) in [
            (
                "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                "hello",
            ),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "ok"),
        ] {
            conn.write_all(request.as_bytes()).unwrap();
            let (head, answer) = one_answer(&mut conn);
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(answer, body);
        }
        // A refusal that left the body unread says the connection closes, and closes it.
        let refused = "POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        conn.write_all(refused.as_bytes()).unwrap();
        let (head, _) = one_answer(&mut conn);
        assert!(head.starts_with("http/1.1 403"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(closed_by_server(conn), "");
    }

    #[test]
    fn refusals_of_a_path_a_query_or_a_method_come_as_json_with_a_code() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new()
            .route(
                "/n/{n}",
                axum::routing::get(
                    |axum::extract::Path(n): axum::extract::Path<u64>| async move { n.to_string() },
                ),
            )
            .layer(axum::middleware::from_fn(json_errors));
        let addr = serving(&runtime, router, CLIENT_TIMES);
        let ask = |request: &str| {
            let answer = exchange(addr, request.as_bytes());
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            (head.to_string(), body.to_string())
        };
        let (head, body) = ask("GET /n/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "7");
        for (request, status, code) in [
            ("GET /n/abc", "400", "bad_request"),
            ("POST /n/7", "405", "method_not_allowed"),
        ] {
            let (head, body) = ask(&format!(
                "{request} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ));
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
            let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
            assert_eq!(v["code"], code, "{v}");
            assert!(v["error"].as_str().unwrap().len() > 3, "{v}");
        }
    }

    #[test]
    fn one_client_address_holds_only_its_share_of_the_connections() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let serve = |exempt_loopback: bool| {
            let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
            let addr = listener.local_addr().unwrap();
            let peers = PeerCounts::with_limit(2, exempt_loopback);
            let stop = std::future::pending();
            let served = serve_within(listener, router.clone(), stop, CLIENT_TIMES, (8, peers));
            runtime.spawn(served);
            addr
        };
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let addr = serve(false);
        // Two connections that say nothing hold this address's share.
        let held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // The served count them as they are accepted: a third is refused once both are.
        let refused = (0..50).find_map(|_| {
            let answer = exchange(addr, request);
            if answer.starts_with("HTTP/1.1 429") {
                return Some(answer);
            }
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            std::thread::sleep(Duration::from_millis(20));
            None
        });
        let refused = refused.expect("a third connection refused");
        assert!(refused.contains("retry-after: 1"), "{refused}");
        let body = refused.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "too_many_connections", "{body}");
        // One closed frees its place.
        drop(held);
        let served = (0..50).any(|_| {
            let answer = exchange(addr, request);
            std::thread::sleep(Duration::from_millis(20));
            answer.starts_with("HTTP/1.1 200")
        });
        assert!(served, "the share was not given back");
        // Loopback exempt (as every server is), the same is served.
        let addr = serve(true);
        let _held: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        answered(addr, request, "ok");
    }

    #[test]
    fn a_client_address_is_its_own_and_holds_a_quarter_but_never_fewer_than_a_gateway_needs() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(client_address(ip("192.0.2.7")), ip("192.0.2.7"));
        // A dual-stack listener's IPv4 client counts as its IPv4 address.
        assert_eq!(client_address(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        // Two hosts of one IPv6 network are two clients.
        assert_ne!(
            client_address(ip("2001:db8:1:2::1")),
            client_address(ip("2001:db8:1:2::2"))
        );
        // Loopback, in either family, stays loopback (and exempt).
        assert!(client_address(ip("::1")).is_loopback());
        assert!(client_address(ip("::ffff:127.0.0.1")).is_loopback());
        // A quarter of 4,096; a center's 256 relays and more where a quarter is fewer;
        // all of a server that has fewer.
        assert_eq!(per_address(MAX_CONNECTIONS), 1024);
        assert_eq!(per_address(1024), 512);
        assert_eq!(per_address(256), 256);
        assert_eq!(per_address(1), 1);
    }

    #[test]
    fn a_request_head_past_its_bound_is_refused_at_once() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let addr = serving(&runtime, router, CLIENT_TIMES);
        // A header of twice the bound, and the head never ended: answered (431) or
        // closed now, not held until the header timeout (30 s).
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}",
            "a".repeat(2 * MAX_HEAD_BYTES)
        );
        let _ = client.write_all(head.as_bytes());
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let ended = client.read_to_end(&mut answer);
        assert!(
            !matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "still open after 10 s"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
        // A head within the bound is served.
        let within = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES / 2)
        );
        let answer = exchange(addr, within.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[test]
    fn a_client_that_sends_no_request_is_disconnected() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let addr = serving(
            &runtime,
            router,
            ClientTimes {
                header: Duration::from_millis(300),
                ..CLIENT_TIMES
            },
        );
        // One that says nothing, and one that stops halfway through its headers: closed
        // by the server (with nothing but perhaps an error answer).
        let silent = std::net::TcpStream::connect(addr).unwrap();
        closed_by_server(silent);
        let mut halfway = std::net::TcpStream::connect(addr).unwrap();
        halfway.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        closed_by_server(halfway);
        // A client that asks is answered as before.
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        answered(addr, request, "ok");
    }

    #[test]
    fn a_body_that_comes_too_slowly_is_refused_and_its_connection_closed() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let router = Router::new().route(
            "/",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
        let addr = serving(
            &runtime,
            router,
            ClientTimes {
                body: Duration::from_millis(300),
                ..CLIENT_TIMES
            },
        );
        // It announces 100 bytes, sends two, and waits.
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            .unwrap();
        let answer = closed_by_server(slow);
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
        // A body that comes whole is read as before.
        let request =
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        answered(addr, request, "3");
    }

    #[test]
    fn a_client_that_never_reads_its_answers_is_disconnected() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // More than the kernel's buffers on both ends hold.
        const ANSWER: usize = 32 << 20;
        let router = Router::new().route("/", axum::routing::get(|| async { vec![b'a'; ANSWER] }));
        let addr = serving(
            &runtime,
            router,
            ClientTimes {
                write: Duration::from_millis(300),
                ..CLIENT_TIMES
            },
        );
        // It asks, twice, and reads nothing for a while: the server's write waits, and
        // the connection is closed.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = 0;
        let mut buf = vec![0; 1 << 20];
        let end = loop {
            match idle.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        };
        assert!(
            !matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "still open after {got} bytes"
        );
        assert!(got < ANSWER, "{got} bytes: the answer came whole");
        // A client that reads is answered whole.
        let answer = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.len() > ANSWER, "{}", answer.len());
    }

    /// The status and error code `router` answers a `POST /` of `body` as `content_type`.
    async fn refusal(router: &Router, content_type: &str, body: Vec<u8>) -> (u16, String) {
        use tower::ServiceExt;
        let request = axum::http::Request::post("/")
            .header("content-type", content_type)
            .body(axum::body::Body::from(body))
            .unwrap();
        let answer = router.clone().oneshot(request).await.unwrap();
        let status = answer.status().as_u16();
        let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (status, v["code"].as_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn a_json_body_refused_keeps_the_status_axum_gives_it() {
        let echo = |Body(v): Body<serde_json::Value>| async move { v.to_string() };
        let router = Router::new().route("/", axum::routing::post(echo));
        let json = "application/json";
        let large = format!("\"{}\"", "x".repeat(3 << 20)).into_bytes();
        let too_large = (413, "too_large".to_string());
        assert_eq!(refusal(&router, json, large).await, too_large);
        let not_json = (415, "bad_request".to_string());
        assert_eq!(
            refusal(&router, "text/plain", b"{}".to_vec()).await,
            not_json
        );
        let malformed = (400, "bad_request".to_string());
        assert_eq!(refusal(&router, json, b"{".to_vec()).await, malformed);
    }

    /// A server's TLS configuration and a client's connector that trusts it.
    fn tls_pair() -> (ferry_migrate::TlsConfig, tokio_rustls::TlsConnector) {
        let ca = test_pki::Ca::new("ferry-http test CA");
        let host = ca.host();
        let tls = ferry_migrate::TlsConfig::from_pem(
            host.cert.as_bytes(),
            host.key.as_bytes(),
            ca.cert.as_bytes(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in tls.ca_certificates() {
            roots.add(cert.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (tls, tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    /// Whether a TLS handshake with `addr` completes within 3 s.
    async fn handshakes(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> bool {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ferry_migrate::TLS_SERVER_NAME.try_into().unwrap();
        let handshake = connector.connect(name, tcp);
        matches!(
            tokio::time::timeout(Duration::from_secs(3), handshake).await,
            Ok(Ok(_))
        )
    }

    #[test]
    fn one_client_address_holds_only_its_share_of_the_tls_handshakes() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (tls, connector) = tls_pair();
        for exempt_loopback in [false, true] {
            let (listener, addr) = runtime.block_on(async {
                let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = tcp.local_addr().unwrap();
                let peers = PeerCounts::with_limit(1, exempt_loopback);
                let listener = TlsListener::new(tcp, tls.https_server(), 8, peers).unwrap();
                (listener, addr)
            });
            // A connection that never says hello holds this address's one handshake.
            let silent = std::net::TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let done = runtime.block_on(handshakes(&connector, addr));
            assert_eq!(done, exempt_loopback, "exempt: {exempt_loopback}");
            drop((silent, listener));
        }
        // With the silent one gone, the address's handshake is free again.
        let (listener, addr) = runtime.block_on(async {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = tcp.local_addr().unwrap();
            let peers = PeerCounts::with_limit(1, false);
            (
                TlsListener::new(tcp, tls.https_server(), 8, peers).unwrap(),
                addr,
            )
        });
        drop(std::net::TcpStream::connect(addr).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert!(runtime.block_on(handshakes(&connector, addr)));
        drop(listener);
    }

    #[test]
    fn handshaken_connections_the_server_does_not_take_are_bounded() {
        const LIMIT: usize = 2;
        const CLIENTS: usize = 10;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (tls, connector) = tls_pair();
        // Nobody calls accept on it: the server is as busy as it gets.
        let listener = runtime.block_on(async {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peers = PeerCounts::new(LIMIT);
            TlsListener::new(tcp, tls.https_server(), LIMIT, peers).unwrap()
        });
        let addr = listener.local;
        let streams = runtime.block_on(async {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let connector = connector.clone();
                    tokio::spawn(async move {
                        let tcp = TcpStream::connect(addr).await.unwrap();
                        let name = ferry_migrate::TLS_SERVER_NAME.try_into().unwrap();
                        let handshake = connector.connect(name, tcp);
                        tokio::time::timeout(Duration::from_secs(3), handshake).await
                    })
                })
                .collect();
            let mut streams = Vec::new();
            for client in clients {
                // Kept open until all are counted, so none frees anything on the way.
                if let Ok(Ok(stream)) = client.await.unwrap() {
                    streams.push(stream);
                }
            }
            streams
        });
        // LIMIT handshaken and queued for the server, LIMIT more waiting with their
        // slots; the rest stay in the backlog, their handshakes unanswered.
        assert!(
            (1..=2 * LIMIT).contains(&streams.len()),
            "{} of {CLIENTS} handshakes completed, with a limit of {LIMIT}",
            streams.len()
        );
        drop(listener);
    }
}
