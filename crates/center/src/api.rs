//! The center's HTTP/JSON API, dashboard and metrics. Operators send
//! `Authorization: Bearer <center token>`; hosts send the cluster's shared secret with
//! their heartbeats. Errors are `{"error": "..."}` with a status that says what kind.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /` | the dashboard (the page asks for the token; data needs it) |
//! | `GET /v1/cluster?vms=N` | hosts, VMs (at most N, default 1,000, those needing attention first), migrations, operations and events at a glance |
//! | `GET /v1/hosts`, `GET /v1/hosts/{name}` | hosts: status, mode, capacity, load |
//! | `DELETE /v1/hosts/{name}?with_vms=B` | forget a silent host for good (with its VMs' records if B) |
//! | `POST /v1/hosts/{name}/maintenance` | empty the host live and put it in maintenance |
//! | `DELETE /v1/hosts/{name}/maintenance` | return it to service |
//! | `GET /v1/vms`, `POST /v1/vms` | VMs; create one where there is room |
//! | `GET /v1/migrations` | the last 1,000 migrations the center ordered |
//! | `GET /v1/operations/{id}` | a maintenance or balance operation's progress |
//! | `GET /v1/balance`, `POST /v1/balance` | the balance plan; carry it out (`{"dry_run": true}` only shows it) |
//! | `GET /v1/events` | recent events |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /v1/models` | OpenAI's API: the serving (`llm-serve`) VMs, each a model named by its name (where that names it alone) or its VM id |
//! | `GET /v1/models/{model}` | OpenAI's API: one of them, by name or id |
//! | `POST /v1/chat/completions`, `POST /v1/completions` | OpenAI's API: an answer from that VM (`stream: true` for server-sent events), routed to the host that runs it now, following it across migrations |
//! | `POST /v1/heartbeat` | hosts only (shared secret) |
//! | `POST /v1/settle` | hosts only: relays a settle question about an in-doubt switchover to the destination's API |
//!
//! The OpenAI endpoints answer CORS requests from any origin; the rest of the API none.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferry_api::Heartbeat;
use ferry_http::tokens::{require_token, Access, Scope, TokenFileError, Tokens};
use ferry_http::{answer, error, error_with_code, Body};
use serde::Deserialize;

use crate::store::StoreError;
use crate::{gateway, Center, CenterError, PlaceVm};

/// The dashboard page: static; it fetches `/v1/cluster` with the token the operator
/// gives it.
const DASHBOARD: &str = include_str!("dashboard.html");

impl IntoResponse for CenterError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            CenterError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CenterError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            CenterError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            CenterError::NoRoom(_) => (StatusCode::INSUFFICIENT_STORAGE, "no_room"),
            CenterError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            CenterError::HostRefused(_) => (StatusCode::SERVICE_UNAVAILABLE, "host_refused"),
            // As the host answered: not a failure to retry.
            CenterError::HostRejected { answer, .. } => (
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST),
                answer.code.as_deref().unwrap_or("bad_request"),
            ),
            CenterError::Heartbeat(_) => (StatusCode::BAD_REQUEST, "bad_heartbeat"),
            CenterError::Store(StoreError::NotLeader) => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_leader")
            }
            // etcd without a quorum refuses writes: the same request succeeds later.
            CenterError::Store(StoreError::Etcd(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            CenterError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_failed"),
        };
        error_with_code(status, code, &ferry_migrate::error_chain(&self))
    }
}

/// The tokens each part of the API takes.
struct Gates {
    /// The operator token and the token file's.
    operators: Arc<Tokens>,
    /// The heartbeat key hosts derive from the cluster secret.
    hosts: Arc<Tokens>,
}

/// Largest request body taken (axum's default, set for every route so that a follower
/// forwards to the leader what the leader itself would take).
const MAX_BODY_BYTES: usize = 2 << 20;

/// Writes reach the leader: a follower replica forwards them there, with the caller's
/// own token, and answers with the leader's answer. Reads are served where they arrive.
async fn leader_writes(
    State(center): State<Arc<Center>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let read = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if read || center.is_leader() {
        return next.run(request).await;
    }
    // Forwarded once already: the replica it went to does not lead (any more).
    if request.headers().contains_key(ferry_client::FORWARDED) {
        return error_with_code(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "the replica this was forwarded to does not lead; try again",
        );
    }
    let Some(leader) = center.leader().filter(|l| l.name != center.config().name) else {
        return error_with_code(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no center replica leads now (an election takes a few seconds); try again",
        );
    };
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Read as the leader's handlers read it: within the same limit (413 beyond it).
    let body =
        match <axum::body::Bytes as axum::extract::FromRequest<()>>::from_request(request, &())
            .await
        {
            Ok(body) => body.to_vec(),
            Err(e) => {
                let message = format!("bad request body: {}", e.body_text());
                return error(e.status(), &message);
            }
        };
    let relayed = tokio::task::spawn_blocking(move || {
        center
            .client_of(&leader.url)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .relay(&method, &path, &authorization, body)
            .map_err(|e| anyhow::anyhow!("leader {} ({}): {e:#}", leader.name, leader.url))
    })
    .await;
    match relayed {
        Ok(Ok((status, content_type, body))) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Ok(Err(e)) => error_with_code(
            StatusCode::SERVICE_UNAVAILABLE,
            "leader_unreachable",
            &format!("this replica follows; forwarding to the leader failed: {e}"),
        ),
        Err(e) => ferry_http::internal_error(&e),
    }
}

async fn heartbeat(State(center): State<Arc<Center>>, Body(beat): Body<Heartbeat>) -> Response {
    answer(StatusCode::OK, move || center.heartbeat(beat)).await
}

async fn settle(
    State(center): State<Arc<Center>>,
    Body(req): Body<ferry_api::SettleRequest>,
) -> Response {
    answer(StatusCode::OK, move || center.settle(&req)).await
}

/// `GET /v1/cluster?vms=N`: at most N VM rows (default [`CLUSTER_VMS`]).
#[derive(Debug, Deserialize)]
struct ClusterQuery {
    #[serde(default = "default_cluster_vms")]
    vms: usize,
}

/// VM rows in the cluster view unless asked otherwise: a datacenter's 40,000 would be
/// 10 MB a poll; `GET /v1/vms` lists them all.
pub const CLUSTER_VMS: usize = 1_000;

fn default_cluster_vms() -> usize {
    CLUSTER_VMS
}

async fn cluster(State(center): State<Arc<Center>>, Query(q): Query<ClusterQuery>) -> Response {
    answer(StatusCode::OK, move || center.cluster(q.vms)).await
}

async fn hosts(State(center): State<Arc<Center>>) -> Response {
    answer(StatusCode::OK, move || Ok::<_, CenterError>(center.hosts())).await
}

async fn host(State(center): State<Arc<Center>>, Path(name): Path<String>) -> Response {
    answer(StatusCode::OK, move || center.host(&name)).await
}

async fn enter_maintenance(
    State(center): State<Arc<Center>>,
    Path(name): Path<String>,
) -> Response {
    answer(StatusCode::ACCEPTED, move || {
        center.enter_maintenance(&name)
    })
    .await
}

async fn exit_maintenance(State(center): State<Arc<Center>>, Path(name): Path<String>) -> Response {
    answer(StatusCode::OK, move || center.exit_maintenance(&name)).await
}

/// `DELETE /v1/hosts/{name}`'s query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetQuery {
    /// Forget the VMs recorded on the host too.
    #[serde(default)]
    with_vms: bool,
}

async fn forget_host(
    State(center): State<Arc<Center>>,
    Path(name): Path<String>,
    Query(q): Query<ForgetQuery>,
) -> Response {
    answer(StatusCode::OK, move || {
        center.forget_host(&name, q.with_vms)
    })
    .await
}

async fn vms(State(center): State<Arc<Center>>) -> Response {
    answer(StatusCode::OK, move || Ok::<_, CenterError>(center.vms())).await
}

async fn create_vm(State(center): State<Arc<Center>>, Body(req): Body<PlaceVm>) -> Response {
    answer(StatusCode::CREATED, move || center.create_vm(&req)).await
}

async fn migrations(State(center): State<Arc<Center>>) -> Response {
    answer(StatusCode::OK, move || {
        Ok::<_, CenterError>(center.migrations())
    })
    .await
}

async fn operation(State(center): State<Arc<Center>>, Path(id): Path<u64>) -> Response {
    answer(StatusCode::OK, move || center.operation(id)).await
}

async fn balance_plan(State(center): State<Arc<Center>>) -> Response {
    answer(StatusCode::OK, move || {
        Ok::<_, CenterError>(center.balance_plan())
    })
    .await
}

/// Body of `POST /v1/balance`.
#[derive(Debug, Default, Deserialize)]
struct BalanceRequest {
    #[serde(default)]
    dry_run: bool,
}

async fn balance(State(center): State<Arc<Center>>, Body(req): Body<BalanceRequest>) -> Response {
    answer(StatusCode::OK, move || center.balance(req.dry_run)).await
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default = "default_events")]
    n: usize,
}

fn default_events() -> usize {
    100
}

async fn events(State(center): State<Arc<Center>>, Query(q): Query<EventsQuery>) -> Response {
    answer(StatusCode::OK, move || center.events(q.n.min(10_000))).await
}

async fn metrics(State(center): State<Arc<Center>>) -> Response {
    let text = tokio::task::spawn_blocking(move || center.metrics_text()).await;
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => ferry_http::internal_error(&e),
    }
}

/// The dashboard, which no other site may frame (clickjacking its buttons) or learn the
/// address of (its URL may carry the token).
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(DASHBOARD),
    )
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint (see `ferry center serve --help` for the API)",
    )
}

/// The API router over `center`.
pub fn router(center: Arc<Center>) -> Result<Router, TokenFileError> {
    let config = center.config();
    let gates = Gates {
        operators: Arc::new(Tokens::new(
            vec![(config.token.clone(), Access::Full)],
            config.api_tokens.as_deref(),
        )?),
        hosts: Arc::new(Tokens::new(
            vec![(
                config
                    .secret
                    .token(ferry_migrate::Purpose::Heartbeat)
                    .into_bytes(),
                Access::Full,
            )],
            None,
        )?),
    };
    let operators = Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{name}", get(host).delete(forget_host))
        .route(
            "/v1/hosts/{name}/maintenance",
            post(enter_maintenance).delete(exit_maintenance),
        )
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/migrations", get(migrations))
        .route("/v1/operations/{id}", get(operation))
        .route("/v1/balance", get(balance_plan).post(balance))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            center.clone(),
            leader_writes,
        ))
        .route_layer(middleware::from_fn_with_state(
            (gates.operators.clone(), Scope::Operators),
            require_token,
        ));
    // OpenAI's API for clients of the serving VMs, with the operators' (and services')
    // tokens, its errors in OpenAI's shape.
    let serving = Router::new()
        .route("/v1/models", get(gateway::models))
        .route("/v1/models/{model}", get(gateway::model))
        .route("/v1/chat/completions", post(gateway::chat_completions))
        .route("/v1/completions", post(gateway::completions))
        .route_layer(middleware::from_fn_with_state(
            (gates.operators.clone(), Scope::Serving),
            require_token,
        ))
        .route_layer(middleware::from_fn(gateway::openai_errors))
        .layer(gateway::cors());
    let hosts = Router::new()
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/settle", post(settle))
        .route_layer(middleware::from_fn_with_state(
            (gates.hosts, Scope::Operators),
            require_token,
        ));
    Ok(Router::new()
        .route("/", get(dashboard))
        .merge(operators)
        .merge(serving)
        .merge(hosts)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(ferry_http::json_errors))
        .with_state(center))
}

#[cfg(test)]
mod tests {
    use crate::tests::ScratchCenter;

    /// `method path` to `url` with `headers`: the status and the headers of the answer.
    fn call(
        url: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, axum::http::HeaderMap) {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{url}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = agent.run(request.body(()).unwrap()).unwrap();
        (answer.status().as_u16(), answer.headers().clone())
    }

    /// The status `center`'s API gives a `POST path` with the operator's token and a JSON
    /// body of `len` bytes, asked in-process (over a socket, the refusal of a body too
    /// large races the sending of its rest, and the close may come first).
    fn post_in_process(
        runtime: &tokio::runtime::Runtime,
        center: &ScratchCenter,
        path: &str,
        len: usize,
    ) -> u16 {
        use tower::ServiceExt;
        let request = axum::http::Request::post(path)
            .header("Authorization", "Bearer operator")
            .header("Content-Type", "application/json")
            .body(axum::body::Body::from(vec![b' '; len]))
            .unwrap();
        let router = super::router(center.center.clone()).unwrap();
        runtime
            .block_on(router.oneshot(request))
            .unwrap()
            .status()
            .as_u16()
    }

    /// `POST path` to `url` with the operator's token and `body`: the status.
    fn post(url: &str, path: &str, body: &[u8]) -> u16 {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let request = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("{url}{path}"))
            .header("Authorization", "Bearer operator")
            .header("Content-Type", "application/json")
            .body(body)
            .unwrap();
        agent.run(request).unwrap().status().as_u16()
    }

    /// Serves `scratch`'s API on `runtime`: its URL, and the server (stopped on drop).
    fn serve(
        runtime: &tokio::runtime::Runtime,
        scratch: &ScratchCenter,
    ) -> (String, ferry_http::Serving) {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = super::router(scratch.center.clone()).unwrap();
        let serving = ferry_http::spawn(runtime.handle(), listener, router, None, "center API");
        (url, serving)
    }

    #[test]
    fn a_follower_forwards_what_the_leader_takes_refuses_more_with_413_and_reads_itself() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let leader = ScratchCenter::open("forward-leader");
        let follower = ScratchCenter::open("forward-follower");
        let (leader_url, _leader) = serve(&runtime, &leader);
        let (url, _follower) = serve(&runtime, &follower);
        let follow = |leader: Option<crate::leader::LeaderInfo>| {
            *follower.center.role.lock().unwrap() = crate::leader::Role::Follower { leader };
        };
        follow(Some(crate::leader::LeaderInfo {
            name: "leader".into(),
            url: leader_url.clone(),
        }));
        let padded = |bytes: usize| {
            format!(r#"{{"dry_run": true, "pad": "{}"}}"#, "x".repeat(bytes)).into_bytes()
        };
        // Over 1 MiB and within what the leader takes: forwarded, and taken.
        let body = padded(3 << 19);
        assert_eq!(post(&leader_url, "/v1/balance", &body), 200);
        assert_eq!(post(&url, "/v1/balance", &body), 200);
        // Over it: refused by either, as too large.
        assert_eq!(
            post_in_process(&runtime, &leader, "/v1/balance", 3 << 20),
            413
        );
        assert_eq!(
            post_in_process(&runtime, &follower, "/v1/balance", 3 << 20),
            413
        );
        // With no leader known, reads (HEAD as GET) are still served here.
        follow(None);
        let auth = ("Authorization", "Bearer operator");
        assert_eq!(call(&url, "GET", "/v1/hosts", &[auth]).0, 200);
        assert_eq!(call(&url, "HEAD", "/v1/hosts", &[auth]).0, 200);
        assert_eq!(post(&url, "/v1/balance", &padded(1)), 503);
    }

    #[test]
    fn the_dashboard_may_not_be_framed_or_leak_its_address() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let scratch = ScratchCenter::open("dashboard-headers");
        let (url, _serving) = serve(&runtime, &scratch);
        let (status, headers) = call(&url, "GET", "/", &[]);
        assert_eq!(status, 200);
        assert_eq!(headers["content-security-policy"], "frame-ancestors 'none'");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["referrer-policy"], "no-referrer");
    }

    #[test]
    fn a_browser_may_call_the_openai_api_but_not_the_operators_api() {
        let scratch = ScratchCenter::open("cors");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (url, _serving) = serve(&runtime, &scratch);
        let origin = ("Origin", "https://app.example");
        let preflight = |path| {
            call(
                &url,
                "OPTIONS",
                path,
                &[
                    origin,
                    ("Access-Control-Request-Method", "POST"),
                    (
                        "Access-Control-Request-Headers",
                        "authorization, content-type, x-stainless-os",
                    ),
                ],
            )
        };
        // The preflight needs no token; the answer allows the bearer token to be sent.
        let (status, headers) = preflight("/v1/chat/completions");
        assert!((200..300).contains(&status), "{status}");
        assert_eq!(headers["access-control-allow-origin"], "*");
        // Named: a wildcard (`*`) does not cover `Authorization` in a browser. And as
        // OpenAI's JavaScript SDK asks: its own headers too.
        let allowed = headers["access-control-allow-headers"].to_str().unwrap();
        let allowed: Vec<String> = allowed
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        for asked in ["authorization", "content-type", "x-stainless-os"] {
            assert!(allowed.iter().any(|h| h == asked), "{asked}: {allowed:?}");
        }
        // A page without its user's token is refused, and may read why.
        let (status, headers) = call(&url, "GET", "/v1/models", &[origin]);
        assert_eq!(status, 401);
        assert_eq!(headers["access-control-allow-origin"], "*");
        let (status, headers) = call(
            &url,
            "GET",
            "/v1/models",
            &[origin, ("Authorization", "Bearer operator")],
        );
        assert_eq!(status, 200);
        assert_eq!(headers["access-control-allow-origin"], "*");
        // The operators' API gives a page nothing: no CORS headers, so it cannot read it.
        let (_, headers) = preflight("/v1/hosts/a/maintenance");
        assert!(!headers.contains_key("access-control-allow-origin"));
        let (_, headers) = call(&url, "GET", "/v1/cluster", &[origin]);
        assert!(!headers.contains_key("access-control-allow-origin"));
    }
}
