//! The HTTP plumbing the host daemon's and the cluster center's APIs share: bearer
//! tokens ([`tokens`]), JSON answers and errors with stable codes, blocking work off the
//! async runtime, and an HTTPS listener whose handshakes cannot hold up other clients.

pub mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

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
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("internal error: {e}"),
        ),
    }
}

/// A JSON request body. One that is not the expected JSON is answered 400 with the
/// API's error body (`bad request body: ...`) before the handler runs.
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
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                &format!("bad request body: {e}"),
            )),
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

/// Serves the API on `listener` until `shutdown` completes (then the port closes and
/// requests in flight finish): over HTTPS with `tls` (the server identity of
/// [`ferry_migrate::TlsConfig::https_server`]), else plain HTTP.
async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            axum::serve(TlsListener::new(listener, config)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// TLS handshakes in progress at once (each a small task, bounded in time); more
/// connections wait in the kernel's backlog. Large enough that idle connections cannot
/// starve real clients for long.
const MAX_TLS_HANDSHAKES: usize = 1024;
/// Time a connection has to finish its TLS handshake.
const TLS_HANDSHAKE_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// An HTTPS listener: TCP connections whose TLS handshakes run on their own tasks (at
/// most [`MAX_TLS_HANDSHAKES`] at once, each bounded in time), so that a slow or silent
/// client holds up nobody else.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (done, ready) = tokio::sync::mpsc::channel(MAX_TLS_HANDSHAKES);
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
        tokio::spawn(async move {
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
                        tracing::warn!("accepting an API connection failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIME, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            drop(slot);
                            let _ = done.send((stream, peer)).await;
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
