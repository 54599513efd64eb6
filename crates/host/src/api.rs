//! The HTTP/JSON API of `ferry host serve`. Every request needs
//! `Authorization: Bearer <token>`: the cluster's host-API key (derived from the shared
//! secret; the center and `ferry` with the secret use it) or an operator's token from
//! `--api-tokens FILE` (read-only ones may only GET); errors are `{"error", "code"}` with a status
//! that says what kind they are. An order (not a GET) with the `x-ferry-leader-term`
//! header of a center leader older than the newest this host heard of is refused.
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
//! | `POST /v1/vms/{id}/streams` | queue a request on its message channel: `{"stream", "kind", "payload"}` (base64), opening that stream; 503 + `Retry-After` while the guest starts or the VM pauses, 429 when its queue is full, 409 `migrated` once it runs elsewhere |
//! | `GET /v1/vms/{id}/streams/{stream}?from=K&wait_ms=W` | the stream's responses from index K on, waiting up to W ms (10 s at most; 50 ms while 256 reads wait) for one: `{"from", "events", "end"}`; a full token's read lets go of those before K (409 for a read from before them), a read-only token's changes nothing; 400 for a K beyond the next response to come |
//! | `POST /v1/vms/{id}/streams/{stream}/signal` | a control message (a cancel) for an open stream, or one that overflowed (its guest may still be answering) |
//! | `DELETE /v1/vms/{id}/streams/{stream}` | forget a stream whose responses were all read (or that is given up on: if it was open and not cancelled, its guest is told, and stops); 503 + `Retry-After` while the VM pauses (its state may be moving), 409 `migrated` once it runs elsewhere |
//! | `POST /v1/settle/{session}` | whether a VM received here in migration `session` runs here (fencing it if it was not yet told to); the center relays a source's question with it |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use ferry_migrate::Purpose;
use ferry_vmm::devices::channel::Reading;

use ferry_api::{ChannelMessage, CreateVm, LeaderTerm, MigrateRequest, LEADER_TERM_HEADER};
use ferry_http::tokens::{bearer, bears, require_token, Access, Scope, TokenFileError, Tokens};
use ferry_http::{answer, error, error_with_code, Body};

use crate::{Host, HostError};

#[derive(Clone)]
struct Api {
    host: Arc<Host>,
    migration_addr: String,
    tokens: Arc<Tokens>,
    /// Stream reads that may wait: each holds one of the runtime's blocking threads.
    waiting_reads: Arc<tokio::sync::Semaphore>,
    /// Reads of read-only tokens that may wait, apart: a dashboard's peeks never take
    /// the places of the reader (the gateway) a client's tokens wait on.
    waiting_peeks: Arc<tokio::sync::Semaphore>,
}

/// Stream reads of full tokens waiting at once, with [`MAX_WAITING_PEEKS`] well under the
/// runtime's 512 blocking threads, so that long polls never starve the rest of the API.
/// A read beyond them is answered after a short wait without holding a thread.
const MAX_WAITING_READS: usize = 256;
/// Stream reads of read-only tokens waiting at once.
const MAX_WAITING_PEEKS: usize = 64;
/// How long a read beyond its waiting places waits before it looks once.
const BUSY_READ_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = match self {
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HostError::Conflict(_) => StatusCode::CONFLICT,
            HostError::NoRoom(_) => StatusCode::INSUFFICIENT_STORAGE,
            HostError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            HostError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HostError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            HostError::Moved(_) => StatusCode::CONFLICT,
            HostError::StreamNotFound(_) => StatusCode::NOT_FOUND,
            HostError::StreamExists(_) => StatusCode::CONFLICT,
            HostError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HostError::StaleLeader(_) => StatusCode::CONFLICT,
        };
        let retry = matches!(self, HostError::Unavailable(_) | HostError::Busy(_));
        let mut response = error_with_code(status, self.code(), &self.to_string());
        if retry {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Refuses an order (a request that changes something) of a center leader older than
/// the newest this host has heard from ([`LEADER_TERM_HEADER`]); requests without the
/// header (operators, a center of one) pass. Only the cluster's host-API key may send the
/// header: an operator's token could otherwise name a term so high that the real center
/// is refused until the host restarts.
async fn fence_leader_term(
    State((host, cluster_key)): State<(Arc<Host>, Arc<[u8]>)>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if let Some(value) = request.headers().get(LEADER_TERM_HEADER).filter(|_| !reads) {
        if !bears(request.headers(), &cluster_key) {
            return error(
                StatusCode::FORBIDDEN,
                &format!(
                    "only the cluster center (with the host-API key) sends {LEADER_TERM_HEADER}"
                ),
            );
        }
        let Some(term) = value.to_str().ok().and_then(LeaderTerm::from_header) else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("{LEADER_TERM_HEADER} must be CLUSTER-REVISION (hex, decimal)"),
            );
        };
        if let Err(e) = host.follow_leader_term(term) {
            return e.into_response();
        }
    }
    next.run(request).await
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

async fn create_vm(State(api): State<Api>, Body(req): Body<CreateVm>) -> Response {
    answer(StatusCode::CREATED, move || api.host.create_vm(&req)).await
}

async fn show_vm(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || {
        api.host.get(&id).map(|vm| vm.info())
    })
    .await
}

async fn console(State(api): State<Api>, Path(id): Path<String>) -> Response {
    // Text, not JSON, on success: `answer` would quote it. A failed handler is answered
    // as by `answer` (a JSON 500), never by a panic of this task.
    match tokio::task::spawn_blocking(move || api.host.get(&id).map(|vm| vm.console())).await {
        Ok(Ok(text)) => text.into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ferry_http::internal_error(&e),
    }
}

async fn stop_vm(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || api.host.stop(&id)).await
}

async fn migrate_vm(
    State(api): State<Api>,
    Path(id): Path<String>,
    Body(req): Body<MigrateRequest>,
) -> Response {
    answer(StatusCode::ACCEPTED, move || {
        api.host.start_migration(&id, req)
    })
    .await
}

async fn migration(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::OK, move || api.host.migration(&id)).await
}

async fn cancel_migration(State(api): State<Api>, Path(id): Path<String>) -> Response {
    answer(StatusCode::ACCEPTED, move || api.host.cancel_migration(&id)).await
}

/// `POST /v1/vms/{id}/resolve`. A field it does not know is refused, not ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resolve {
    /// "resume" (it does not run on the destination) or "release" (it does).
    action: String,
}

async fn resolve(
    State(api): State<Api>,
    Path(id): Path<String>,
    Body(req): Body<Resolve>,
) -> Response {
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

async fn submit(
    State(api): State<Api>,
    Path(id): Path<String>,
    Body(m): Body<ChannelMessage>,
) -> Response {
    done(StatusCode::ACCEPTED, move || {
        api.host.channel_submit(&id, m)
    })
    .await
}

async fn signal(
    State(api): State<Api>,
    Path((id, stream)): Path<(String, u64)>,
    Body(m): Body<ChannelMessage>,
) -> Response {
    if m.stream != stream {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "the message is for stream {}, the path says {stream}",
                m.stream
            ),
        );
    }
    done(StatusCode::ACCEPTED, move || {
        api.host.channel_signal(&id, m)
    })
    .await
}

/// [`answer`] for an operation with nothing to return: `{}` with `status` once it is done.
async fn done(
    status: StatusCode,
    op: impl FnOnce() -> Result<(), HostError> + Send + 'static,
) -> Response {
    answer(status, move || op().map(|()| serde_json::json!({}))).await
}

/// `GET /v1/vms/{id}/streams/{stream}`'s query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    /// First event wanted.
    #[serde(default)]
    from: usize,
    /// Longest wait for one, ms.
    #[serde(default)]
    wait_ms: u64,
}

async fn read_stream(
    State(api): State<Api>,
    Path((id, stream)): Path<(String, u64)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Response {
    // Only the stream's reader (the center's gateway, or an operator, with a full
    // token) lets go of what it read: a read-only token (any GET passes the token check)
    // could otherwise drop every response before the reader has them.
    let access = bearer(&headers).and_then(|t| api.tokens.access(t.as_bytes()));
    let (reading, places) = match access {
        Some(Access::Full) => (Reading::Consume, &api.waiting_reads),
        _ => (Reading::Peek, &api.waiting_peeks),
    };
    let waiting = match places.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) if q.wait_ms == 0 => None,
        Err(_) => {
            tokio::time::sleep(BUSY_READ_WAIT.min(std::time::Duration::from_millis(q.wait_ms)))
                .await;
            None
        }
    };
    answer(StatusCode::OK, move || {
        let wait = match waiting {
            Some(_) => std::time::Duration::from_millis(q.wait_ms),
            None => std::time::Duration::ZERO,
        };
        let read = api.host.channel_read(&id, stream, q.from, wait, reading);
        drop(waiting);
        read
    })
    .await
}

async fn release_stream(
    State(api): State<Api>,
    Path((id, stream)): Path<(String, u64)>,
) -> Response {
    done(StatusCode::OK, move || {
        api.host.channel_release(&id, stream)
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
    let cluster_key: Arc<[u8]> = cluster.clone().into();
    let tokens = Tokens::new(
        vec![(cluster, Access::Full)],
        host.config().api_tokens.as_deref(),
    )?;
    let api = Api {
        host,
        migration_addr,
        tokens: Arc::new(tokens),
        waiting_reads: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING_READS)),
        waiting_peeks: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING_PEEKS)),
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
        .route("/v1/vms/{id}/streams", post(submit))
        .route(
            "/v1/vms/{id}/streams/{stream}",
            get(read_stream).delete(release_stream),
        )
        .route("/v1/vms/{id}/streams/{stream}/signal", post(signal))
        // Inside the token check: only an authenticated order moves the term on.
        .route_layer(middleware::from_fn_with_state(
            (api.host.clone(), cluster_key),
            fence_leader_term,
        ))
        .route_layer(middleware::from_fn_with_state(
            (api.tokens.clone(), Scope::Operators),
            require_token,
        ))
        .fallback(not_found)
        .layer(middleware::from_fn(ferry_http::json_errors))
        .layer(middleware::from_fn(ferry_http::no_sniffing))
        .with_state(api))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_with_fields_the_host_does_not_know_are_refused_by_name() {
        let host = crate::tests::test_host();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = router(host.clone(), "127.0.0.1:1".into()).unwrap();
        let _serving = ferry_http::spawn(runtime.handle(), listener, router, None, "host API");
        let key = host.config().secret.token(Purpose::HostApi);
        let client = ferry_client::ApiClient::new(&url, key.as_bytes()).unwrap();
        // Every answer here is a refusal: the status, code and message.
        let refusal = |path: &str, body: serde_json::Value| {
            let e = client
                .post::<_, serde_json::Value>(path, &body)
                .unwrap_err();
            let e = e.api().cloned().unwrap();
            (e.status, e.code.unwrap_or_default(), e.message)
        };
        let misspelled = |path: &str, body: serde_json::Value, field: &str| {
            let (status, code, message) = refusal(path, body);
            assert_eq!((status, code.as_str()), (422, "bad_request"), "{message}");
            assert!(
                message.contains(&format!("unknown field `{field}`")),
                "{message}"
            );
        };
        use serde_json::json;
        misspelled(
            "/v1/vms",
            json!({"workload": "hello", "idempotency-key": "job-1"}),
            "idempotency-key",
        );
        misspelled(
            "/v1/vms/h-vm1/migrate",
            json!({"to": "b.example:7070", "max_rate": 100}),
            "max_rate",
        );
        misspelled(
            "/v1/vms/h-vm1/resolve",
            json!({"action": "release", "force": true}),
            "force",
        );
        // Spelled right, each is read and reaches the host (which refuses them for what
        // they ask).
        let (status, _, message) = refusal(
            "/v1/vms",
            json!({"workload": "hello", "name": "not a name", "idempotency_key": "job-1"}),
        );
        assert_eq!(status, 400, "{message}");
        assert!(message.contains("is not a VM name"), "{message}");
        let migrate = json!({"to": "b.example:7070", "max_rate_mib_s": 100});
        assert_eq!(refusal("/v1/vms/h-vm1/migrate", migrate).0, 404);
        let resolve = json!({"action": "release"});
        assert_eq!(refusal("/v1/vms/h-vm1/resolve", resolve).0, 404);
        host.shutdown();
    }
}
