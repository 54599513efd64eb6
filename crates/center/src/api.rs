//! The center's HTTP/JSON API, dashboard and metrics. Operators send
//! `Authorization: Bearer <center token>`; hosts send the cluster's shared secret with
//! their heartbeats. Errors are `{"error": "..."}` with a status that says what kind; an
//! operator's request body with a field it does not know is refused (422), not ignored.
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
//! | `POST /v1/heartbeat` | hosts only (shared secret); a body of up to 34 MiB (a full beat of many VMs), where the rest take 2 MiB |
//! | `POST /v1/settle` | hosts only: relays a settle question about an in-doubt switchover to the destination's API |
//!
//! The OpenAI endpoints answer CORS requests from any origin; the rest of the API none.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferry_api::{CreateVm, Heartbeat};
use ferry_http::tokens::{require_token, Access, Scope, TokenFileError, Tokens};
use ferry_http::{answer, error, error_with_code, Body};
use serde::Deserialize;

use crate::inventory::{MAX_VMS_PER_HOST, MAX_VM_REPORT_BYTES};
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
/// forwards to the leader what the leader itself would take), but heartbeats.
const MAX_BODY_BYTES: usize = 2 << 20;

/// Room for one VM's report in a heartbeat beyond what the center keeps of it (the rest
/// of its fields; the center trims a larger report itself, and the room is shared: a
/// few larger reports fit beside the many smaller ones).
const VM_REPORT_SLACK_BYTES: usize = 4 << 10;

/// Largest heartbeat taken (34 MiB): a full beat of as many VMs as a host may have, each
/// with room for what the center keeps of its report, and the host's own part (its
/// fields, the keys of its creates, a delta's removed VMs) within [`MAX_BODY_BYTES`]. A
/// host whose VMs attach many files must not have every full beat refused (the center
/// trims each VM's report, so one VM never makes its host's beats fail); only hosts,
/// with the heartbeat key, may send this much: the key is checked before the body is
/// read.
const MAX_HEARTBEAT_BYTES: usize =
    MAX_VMS_PER_HOST * (MAX_VM_REPORT_BYTES + VM_REPORT_SLACK_BYTES) + MAX_BODY_BYTES;

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
    // Not to itself, known by its URL: replicas may share a name (left to default to a
    // listen address like 0.0.0.0:7000, each advertising its own URL).
    let Some(leader) = center
        .leader()
        .filter(|l| l.url != center.config().advertise_url)
    else {
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
            .map_err(|e| e.to_string())?
            .relay(&method, &path, &authorization, body)
            .map_err(|e| format!("leader {} ({}): {e:#}", leader.name, leader.url))
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

/// `POST /v1/vms`'s body: a [`PlaceVm`] that refuses fields it does not know (a
/// misspelled `idempotency_key` would otherwise be dropped). Serde cannot deny unknown
/// fields through `PlaceVm`'s `flatten`: the center's own field is taken out, and the
/// rest read as a [`CreateVm`], which denies them.
struct CreateBody(PlaceVm);

impl<'de> Deserialize<'de> for CreateBody {
    fn deserialize<D: serde::Deserializer<'de>>(from: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(from)?;
        let host = match fields.remove("host") {
            Some(host) => Option::<String>::deserialize(host)
                .map_err(|e| D::Error::custom(format_args!("host: {e}")))?,
            None => None,
        };
        let vm =
            CreateVm::deserialize(serde_json::Value::Object(fields)).map_err(D::Error::custom)?;
        // Every field of PlaceVm named: one added there fails to build here until it is
        // taken out above.
        Ok(Self(PlaceVm { vm, host }))
    }
}

async fn create_vm(
    State(center): State<Arc<Center>>,
    Body(CreateBody(req)): Body<CreateBody>,
) -> Response {
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

/// Body of `POST /v1/balance`. A field it does not know is refused: a misspelled
/// `dry_run` would otherwise carry the plan out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
/// address of (its URL may carry the token), and which runs its own script only.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, dashboard_policy()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(DASHBOARD),
    )
}

/// The dashboard's Content-Security-Policy: its inline script and style (by their
/// hashes) and calls to this origin, nothing else. It renders every value as text, and
/// this keeps the operator's token from any script a slip there would let in.
fn dashboard_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let hash = |tag: &str| {
            let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
            let start = DASHBOARD
                .find(&open)
                .expect("the dashboard's inline element")
                + open.len();
            let end = start + DASHBOARD[start..].find(&close).expect("its end");
            let digest = sha2::Sha256::digest(&DASHBOARD.as_bytes()[start..end]);
            base64::engine::general_purpose::STANDARD.encode(digest)
        };
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash("script"),
            hash("style")
        )
    })
}

async fn not_found(uri: axum::http::Uri) -> Response {
    // An OpenAI client asking for what the gateway does not serve reads OpenAI's shape.
    if let Some(answer) = gateway::unserved(uri.path()) {
        return answer;
    }
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
    // The heartbeat's own limit is set inside the key check (which reads no body), and
    // replaces the router's for that route alone.
    let hosts = Router::new()
        .route(
            "/v1/heartbeat",
            post(heartbeat).layer(DefaultBodyLimit::max(MAX_HEARTBEAT_BYTES)),
        )
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
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(ferry_http::json_errors))
        .layer(middleware::from_fn(ferry_http::no_sniffing))
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

    /// The status and body text `center`'s API answers a `POST path` of `body` with,
    /// with `Bearer token` if any, asked in-process.
    fn post_body_in_process(
        runtime: &tokio::runtime::Runtime,
        center: &ScratchCenter,
        path: &str,
        token: Option<&str>,
        body: axum::body::Body,
    ) -> (u16, String) {
        use tower::ServiceExt;
        let mut request =
            axum::http::Request::post(path).header("Content-Type", "application/json");
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let router = super::router(center.center.clone()).unwrap();
        runtime.block_on(async {
            let answer = router.oneshot(request.body(body).unwrap()).await.unwrap();
            let status = answer.status().as_u16();
            let text = axum::body::to_bytes(answer.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&text).into_owned())
        })
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
        let padded =
            |bytes: usize| format!(r#"{{"dry_run": true}}{}"#, " ".repeat(bytes)).into_bytes();
        // Over 1 MiB and within what the leader takes: forwarded, and taken.
        let body = padded(3 << 19);
        assert_eq!(post(&leader_url, "/v1/balance", &body), 200);
        assert_eq!(post(&url, "/v1/balance", &body), 200);
        // A leader going by this replica's own name (both left to their default) is
        // another replica all the same: its URL says so.
        follow(Some(crate::leader::LeaderInfo {
            name: follower.center.config().name.clone(),
            url: leader_url.clone(),
        }));
        assert_eq!(post(&url, "/v1/balance", &padded(1)), 200);
        // One at this replica's own URL is itself (a stale view): not forwarded to.
        follow(Some(crate::leader::LeaderInfo {
            name: "leader".into(),
            url: follower.center.config().advertise_url.clone(),
        }));
        assert_eq!(post(&url, "/v1/balance", &padded(1)), 503);
        follow(Some(crate::leader::LeaderInfo {
            name: "leader".into(),
            url: leader_url.clone(),
        }));
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
    fn a_full_beat_of_many_vms_with_many_files_is_taken_and_only_hosts_may_send_one() {
        use crate::inventory::tests::{beat, vm};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let scratch = ScratchCenter::open("large-beat");
        let key = (scratch.center.config().secret).token(ferry_migrate::Purpose::Heartbeat);
        // 120 VMs, each attaching as many files as a host attaches, with long paths: the
        // center keeps their reports without the files, and takes the beat.
        let files: Vec<ferry_api::FileInfo> = (0..crate::inventory::MAX_FILES)
            .map(|i| ferry_api::FileInfo {
                name: format!("shard-{i}"),
                size: 1 << 30,
                sha256: "0".repeat(64),
                path: format!("/models/{i:03}/{}", "p".repeat(188)).into(),
            })
            .collect();
        let vms = (0..120)
            .map(|i| ferry_api::VmInfo {
                files: files.clone(),
                ..vm(&format!("a-vm{i}"), ferry_api::VmState::Running)
            })
            .collect();
        let full = serde_json::to_vec(&beat("a", vms)).unwrap();
        assert!(full.len() > super::MAX_BODY_BYTES, "{}", full.len());
        let status = post_body_in_process(
            &runtime,
            &scratch,
            "/v1/heartbeat",
            Some(&key),
            full.clone().into(),
        );
        assert_eq!(status.0, 200, "{}", status.1);
        assert_eq!(scratch.center.inventory().vms_on("a").count(), 120);
        // Without the heartbeat key (none, or the operator's), refused before any of the
        // body is read.
        for token in [None, Some("operator")] {
            let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = read.clone();
            let chunks = futures_util::stream::iter((0..64).map(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, std::io::Error>(vec![b' '; 1 << 20])
            }));
            let body = axum::body::Body::from_stream(chunks);
            let (status, _) =
                post_body_in_process(&runtime, &scratch, "/v1/heartbeat", token, body);
            assert_eq!(status, 401, "{token:?}");
            assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), 0);
        }
        // The heartbeat's limit is its own: a host's larger beat is refused, and so is
        // as large a body to its other endpoint.
        let too_large = vec![b' '; super::MAX_HEARTBEAT_BYTES + 1];
        let status = post_body_in_process(
            &runtime,
            &scratch,
            "/v1/heartbeat",
            Some(&key),
            too_large.into(),
        );
        assert_eq!(status.0, 413);
        let status =
            post_body_in_process(&runtime, &scratch, "/v1/settle", Some(&key), full.into());
        assert_eq!(status.0, 413);
    }

    #[test]
    fn operators_misspelled_fields_are_refused_by_name() {
        use crate::fake_host::{fake_host, Reply};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let scratch = ScratchCenter::open("misspelled-fields");
        let send = |path: &str, body: &str| {
            let body = axum::body::Body::from(body.to_string());
            post_body_in_process(&runtime, &scratch, path, Some("operator"), body)
        };
        let refused = |(status, text): (u16, String), field: &str| {
            assert_eq!(status, 422, "{text}");
            let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(answer["code"], "bad_request", "{text}");
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("unknown field `{field}`")),
                "{text}"
            );
        };
        // A dry run asked for in the wrong case does not carry the plan out.
        refused(send("/v1/balance", r#"{"dryRun": true}"#), "dryRun");
        assert_eq!(send("/v1/balance", r#"{"dry_run": true}"#).0, 200);
        // A create's misspelled key is not dropped; nor is a misspelling taken for the
        // center's own field.
        let mut made = crate::inventory::tests::vm("a-vm1", ferry_api::VmState::Running);
        (made.accel_memory, made.idempotency_key) = (0, Some("job-1".into()));
        let made = serde_json::to_string(&made).unwrap();
        let (addr, requests) = fake_host(vec![Reply::Json("201 Created", made)]);
        scratch.report("a", addr);
        let create = r#"{"workload": "mlp-train", "memory": 268435456, "host": "a", "#;
        refused(
            send(
                "/v1/vms",
                &format!(r#"{create} "idempotency-key": "job-1"}}"#),
            ),
            "idempotency-key",
        );
        refused(
            send("/v1/vms", &format!(r#"{create} "hosts": "a"}}"#)),
            "hosts",
        );
        let (status, text) = send(
            "/v1/vms",
            &format!(r#"{create} "idempotency_key": "job-1"}}"#),
        );
        assert_eq!(status, 201, "{text}");
        // The host got one create, which its own type (which denies fields it does not
        // know) takes, key and all.
        let requests = requests.join().unwrap();
        assert_eq!(requests.len(), 1, "{requests:?}");
        let sent = requests[0].split("\r\n\r\n").nth(1).unwrap();
        let sent: ferry_api::CreateVm = serde_json::from_str(sent).unwrap();
        assert_eq!(sent.idempotency_key.as_deref(), Some("job-1"));
    }

    #[test]
    fn the_dashboard_runs_its_own_script_only_and_may_not_be_framed_or_leak_its_address() {
        use super::DASHBOARD;
        use base64::Engine;
        use sha2::Digest;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let scratch = ScratchCenter::open("dashboard-headers");
        let (url, _serving) = serve(&runtime, &scratch);
        let (status, headers) = call(&url, "GET", "/", &[]);
        assert_eq!(status, 200);
        let policy = headers["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(part), "{policy}");
        }
        // Its own script by its hash, no other.
        let script = DASHBOARD
            .split("<script>")
            .nth(1)
            .unwrap()
            .split("</script>")
            .next();
        let digest = sha2::Sha256::digest(script.unwrap().as_bytes());
        let hash = base64::engine::general_purpose::STANDARD.encode(digest);
        assert!(
            policy.contains(&format!("script-src 'sha256-{hash}';")),
            "{policy}"
        );
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        // Every answer says its type is meant.
        let (status, headers) = call(&url, "GET", "/v1/nothing", &[]);
        assert_eq!(status, 404);
        assert_eq!(headers["x-content-type-options"], "nosniff");
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
        // A page may read how long a 429 or 503 asks it to wait.
        let exposed = headers["access-control-expose-headers"].to_str().unwrap();
        assert!(exposed.eq_ignore_ascii_case("retry-after"), "{exposed}");
        // The operators' API gives a page nothing: no CORS headers, so it cannot read it.
        let (_, headers) = preflight("/v1/hosts/a/maintenance");
        assert!(!headers.contains_key("access-control-allow-origin"));
        let (_, headers) = call(&url, "GET", "/v1/cluster", &[origin]);
        assert!(!headers.contains_key("access-control-allow-origin"));
    }
}
