//! The HTTP/JSON API of `ferry host serve`. Every request needs
//! `Authorization: Bearer <token>`: the cluster's host-API key (derived from the shared
//! secret; the center and `ferry` with the secret use it) or an operator's token from
//! `--api-tokens FILE` (read-only ones may only GET); errors are `{"error": "..."}` with a status
//! that says what kind they are.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/host` | this host: name, migration address, capacity and load ([`crate::HostInfo`]) |
//! | `GET /v1/vms` | every VM |
//! | `POST /v1/vms` | create and start a VM: `{"workload", "args", "memory", "accel_memory"}` |
//! | `GET /v1/vms/{id}` | one VM: state, sizes, uptime, console tail |
//! | `GET /v1/vms/{id}/console` | its whole console tail (64 KiB), as text |
//! | `DELETE /v1/vms/{id}` | stop it |
//! | `POST /v1/vms/{id}/migrate` | migrate it: `{"to": "HOST:PORT", "mode", "downtime_ms", "streams", ...}` |
//! | `GET /v1/vms/{id}/migration` | its migration: progress while it runs, then the report or the error |
//! | `DELETE /v1/vms/{id}/migration` | cancel it, up to the moment the destination is told to run the VM |
//! | `POST /v1/vms/{id}/resolve` | settle an in-doubt VM by hand: `{"action": "resume" \| "release"}` |
//! | `POST /v1/settle/{session}` | whether a VM received here in migration `session` runs here (fencing it if it was not yet told to); the center relays a source's question with it |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use serde::Deserialize;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use ferry_migrate::Purpose;

use crate::tokens::{Access, TokenFileError, Tokens};
use crate::{CreateVm, Host, HostError, MigrateRequest};

#[derive(Clone)]
struct Api {
    host: Arc<Host>,
    migration_addr: String,
    tokens: Arc<Tokens>,
}

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = match self {
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HostError::Conflict(_) => StatusCode::CONFLICT,
            HostError::NoRoom(_) => StatusCode::INSUFFICIENT_STORAGE,
            HostError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_with_code(status, self.code(), &self.to_string())
    }
}

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

/// Middleware on every route: the request must carry a token of this host's.
async fn require_token(
    State(api): State<Api>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    crate::tokens::require_token(&api.tokens, request, next).await
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

/// A JSON request body, or why it could not be read.
pub type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// The answer to a request body that is not the expected JSON.
pub fn bad_body(e: &axum::extract::rejection::JsonRejection) -> Response {
    error(StatusCode::BAD_REQUEST, &format!("bad request body: {e}"))
}

async fn host_info(State(api): State<Api>) -> Response {
    answer(StatusCode::OK, move || {
        Ok::<_, HostError>(api.host.info(&api.migration_addr))
    })
    .await
}

async fn list_vms(State(api): State<Api>) -> Response {
    answer(StatusCode::OK, move || Ok::<_, HostError>(api.host.list())).await
}

async fn create_vm(State(api): State<Api>, body: JsonBody<CreateVm>) -> Response {
    match body {
        Ok(Json(req)) => answer(StatusCode::CREATED, move || api.host.create_vm(&req)).await,
        Err(e) => bad_body(&e),
    }
}

async fn show_vm(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || {
        api.host.get(&id).map(|vm| vm.info())
    })
    .await
}

async fn console(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let text = tokio::task::spawn_blocking(move || api.host.get(&id).map(|vm| vm.console()))
        .await
        .expect("API task panicked");
    match text {
        Ok(text) => text.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stop_vm(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || api.host.stop(&id)).await
}

async fn migrate_vm(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: JsonBody<MigrateRequest>,
) -> Response {
    match body {
        Ok(Json(req)) => {
            answer(StatusCode::ACCEPTED, move || {
                api.host.start_migration(&id, req)
            })
            .await
        }
        Err(e) => bad_body(&e),
    }
}

async fn migration(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || api.host.migration(&id)).await
}

async fn cancel_migration(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::ACCEPTED, move || api.host.cancel_migration(&id)).await
}

/// `POST /v1/vms/{id}/resolve`.
#[derive(Debug, Deserialize)]
struct Resolve {
    /// "resume" (it does not run on the destination) or "release" (it does).
    action: String,
}

async fn resolve(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: JsonBody<Resolve>,
) -> Response {
    let Json(req) = match body {
        Ok(body) => body,
        Err(e) => return bad_body(&e),
    };
    let resume = match req.action.as_str() {
        "resume" => true,
        "release" => false,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("action '{other}' is not resume or release"),
            )
        }
    };
    answer(StatusCode::OK, move || api.host.resolve(&id, resume)).await
}

async fn settle(State(api): State<Api>, Path(session): Path<u64>) -> Response {
    answer(StatusCode::OK, move || {
        Ok::<_, HostError>(api.host.settle_incoming(session))
    })
    .await
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint (see `ferry host serve --help` for the API)",
    )
}

/// The API router over `host`; `migration_addr` is what `GET /v1/host` reports. It takes
/// the cluster's host-API key (derived from the secret) and the operators' tokens of the
/// host's token file, if any.
pub fn router(host: Arc<Host>, migration_addr: String) -> Result<Router, TokenFileError> {
    let cluster = host.config().secret.token(Purpose::HostApi).into_bytes();
    let tokens = Tokens::new(
        vec![(cluster, Access::Full)],
        host.config().api_tokens.as_deref(),
    )?;
    let api = Api {
        host,
        migration_addr,
        tokens: Arc::new(tokens),
    };
    Ok(Router::new()
        .route("/v1/host", get(host_info))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(show_vm).delete(stop_vm))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/vms/{id}/migrate", post(migrate_vm))
        .route(
            "/v1/vms/{id}/migration",
            get(migration).delete(cancel_migration),
        )
        .route("/v1/vms/{id}/resolve", post(resolve))
        .route("/v1/settle/{session}", post(settle))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        .fallback(not_found)
        .with_state(api))
}

/// Serves the API on `listener` until the process ends: over HTTPS with `tls` (the
/// server identity of [`ferry_migrate::TlsConfig::https_server`]), else plain HTTP.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    match tls {
        None => axum::serve(listener, router).await,
        Some(config) => axum::serve(TlsListener::new(listener, config)?, router).await,
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
                let (socket, peer) = match listener.accept().await {
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
