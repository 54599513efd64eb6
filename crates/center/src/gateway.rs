//! The serving gateway: OpenAI's API (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`) in front of the `llm-serve` VMs of the cluster, at one address
//! that follows each VM when it migrates.
//!
//! A request becomes a message on the VM's channel (a stream with a random id), sent to
//! the host that runs the VM now; the answer is read back from that stream event by
//! event, counting them. When the VM moves, the old host answers `migrated` (or
//! `unavailable` during the switchover's pause) and the relay asks it where the VM went,
//! then reads on there from the next event: the stream's events moved with the VM's
//! state, so each token reaches the client exactly once.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::{ChannelMessage, StreamChunk, StreamEnd, VmState};
use ferry_client::ClientError;
use ferry_http::TOO_MANY_CONNECTIONS;
use ferry_llm::serve::{self, Event, FinishReason, PromptKind, RefusalCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::inventory::{unix_ms, HostRecord, Inventory, VmRecord};
use crate::Center;

/// The workload whose VMs the gateway serves.
pub const SERVING_WORKLOAD: &str = "llm-serve";
/// Most requests relayed at once; more are answered 429 with `Retry-After`.
pub const MAX_RELAYS: usize = 256;
/// Most tokens one request may ask for.
pub const MAX_TOKENS: u32 = 4096;

/// Tokens a completion (not a chat) generates when its request sets no `max_tokens`:
/// OpenAI's default for that endpoint.
const COMPLETION_MAX_TOKENS: u32 = 16;
/// Longest a relay keeps trying to reach the VM (a start, a switchover, a lost host).
#[cfg(not(test))]
const PATIENCE: Duration = Duration::from_secs(30);
#[cfg(test)]
const PATIENCE: Duration = Duration::from_millis(300);
/// Longest an answer may go without a token before the relay gives up on it (the client
/// gets an error and the guest is told to stop): a queued request may wait behind others
/// for a while, but a guest that never answers must not hold a relay for ever. OpenAI's
/// clients give up after as long by default.
const SILENCE: Duration = Duration::from_secs(600);
/// Wait between tries while the VM is paused or starting: short through a switchover's
/// few milliseconds, then longer (a start, a host down), up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(2);
/// Longest wait between tries.
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(100);
/// Longest a streamed answer's headers wait for its first event (an error before then
/// still gets its own status).
const STREAM_STARTS_AFTER: Duration = Duration::from_secs(5);
/// A silent stream gets a comment line this often: proxies commonly cut a response
/// silent for 60 s.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest one read of a stream waits on the host.
const READ_WAIT_MS: u64 = 1000;
/// Longest a relay's read of a stream may take, answer included: its wait and a few
/// seconds. A host that takes the connection and never answers is asked again (and the
/// client's departure seen) this often, not once a minute.
const READ_TIME: Duration = Duration::from_millis(READ_WAIT_MS + 4000);
/// Most bytes of one answer of a host to a stream read: a stream holds at most 96 KiB
/// unread (base64 in JSON) and a short record per event, well within it. A broken host
/// must not make each of a relay's many reads cost up to the client's usual 256 MiB.
const MAX_CHUNK_ANSWER: u64 = 1 << 20;
/// Longest a relay's call to a host other than a read (a submit, a cancel, a release,
/// asking where the VM went) may take, answer included: a host that takes the
/// connection and never answers must not hold a relay (or a stream mid-migration) for
/// the client's usual minute each time.
#[cfg(not(test))]
const HOST_CALL_TIME: Duration = Duration::from_secs(5);
#[cfg(test)]
const HOST_CALL_TIME: Duration = Duration::from_secs(1);
/// Most bytes of a host's answer to a submit, a cancel or a release (a short record, or
/// an error): a broken host must not make each cost up to the client's usual 256 MiB.
const MAX_CALL_ANSWER: u64 = 64 << 10;
/// Most bytes of a host's answer about a VM (its `VmInfo`): its console tail (up to
/// 64 KiB, control characters six times that in JSON), up to 63 files' paths and 4 KiB
/// of arguments fit well within it.
const MAX_VM_ANSWER: u64 = 1 << 20;
/// Most bytes of text one answer may bring: far more than 4,096 tokens of any text, and
/// a bound on what a hostile guest can make the gateway hold or a client read.
const MAX_ANSWER_TEXT: usize = 4 << 20;
/// Most bytes of text an answer may bring per token it may have: tokenizers' longest
/// tokens are tens of bytes, so an answer that averages more is a guest's garbage. It
/// bounds what the gateway holds for short answers not streamed ([`MAX_RELAYS`] of them
/// at [`MAX_ANSWER_TEXT`] would be a GiB).
const MAX_TEXT_PER_TOKEN: usize = 1 << 10;
/// Most bytes of a request's body: an encoded request is at most 32 KiB
/// ([`serve::MAX_REQUEST_BYTES`]), and JSON's escapes take up to six bytes for one.
pub const MAX_BODY_BYTES: usize = 256 << 10;
/// Longest a streaming client may take no bytes: one that stops reading must not hold
/// its relay (one of [`MAX_RELAYS`]) for ever. Dropping its answer cancels the generation.
const CLIENT_STALL: Duration = Duration::from_secs(60);
/// Longest a streaming client may keep its answer waiting in all: one that takes a chunk
/// now and then, each within [`CLIENT_STALL`], must not hold its relay for hours either
/// (a 4,096-token answer read a chunk every 50 s). A client that keeps up never waits.
const CLIENT_BEHIND: Duration = Duration::from_secs(300);
/// Longest a cancel keeps following the VM (a switchover, a host restarting): a cancel
/// that never reaches the VM's host leaves it generating for nobody.
#[cfg(not(test))]
const CANCEL_PATIENCE: Duration = Duration::from_secs(5);
#[cfg(test)]
const CANCEL_PATIENCE: Duration = PATIENCE;

/// Most KiB of request bodies in hand at once, read and not yet parsed: as many as the
/// relays' largest bodies (64 MiB). Without it, every connection the server takes
/// could hold a body of [`MAX_BODY_BYTES`] (4,096 of them, 1 GiB).
pub const MAX_BODY_KIB_IN_HAND: usize = MAX_RELAYS * (MAX_BODY_BYTES >> 10);

/// Most KiB of whole (not streamed) answers in hand at once: their text as it comes, then
/// their JSON until the server has handed it all to the client. A hostile guest's answer
/// may be [`MAX_ANSWER_TEXT`] of control characters, six bytes each in JSON: without
/// it, 256 relays of such answers would hold GiBs, and slow readers would hold the
/// bodies on after their relays end. One such answer fits; a legitimate 4,096-token
/// answer takes tens of KiB.
const MAX_ANSWER_KIB_IN_HAND: usize = 64 << 10;

/// The gateway's shared state.
pub struct Gateway {
    relays: Arc<Semaphore>,
    /// KiB of bodies in hand ([`MAX_BODY_KIB_IN_HAND`]).
    bodies: Arc<Semaphore>,
    /// KiB of whole answers in hand ([`MAX_ANSWER_KIB_IN_HAND`]).
    answers: Arc<Semaphore>,
    streams: RandomState,
    counter: AtomicU64,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            relays: Arc::new(Semaphore::new(MAX_RELAYS)),
            bodies: Arc::new(Semaphore::new(MAX_BODY_KIB_IN_HAND)),
            answers: Arc::new(Semaphore::new(MAX_ANSWER_KIB_IN_HAND)),
            streams: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }
}

impl Gateway {
    /// A fresh random stream id (ids need not be secret, only distinct).
    fn stream_id(&self) -> u64 {
        let mut h = self.streams.build_hasher();
        h.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        h.write_u64(unix_ms());
        h.finish()
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    code: &'static str,
    /// The request's field at fault (a client's own, cut to [`MAX_PARAM_BYTES`]).
    param: Option<String>,
}

/// Longest field name an error's `param` repeats.
const MAX_PARAM_BYTES: usize = 256;

/// Longest message an error carries: messages quote what the client sent (a model name,
/// a field), which may be megabytes, and an answer longer than [`openai_errors`] reads
/// would lose its code there.
const MAX_MESSAGE_BYTES: usize = 1 << 10;

impl OpenAiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        crate::inventory::cut_text(&mut message, MAX_MESSAGE_BYTES);
        Self {
            status,
            message,
            code,
            param: None,
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_value", message).at(param)
    }

    /// The error, naming the request's field `param`.
    fn at(self, param: &str) -> Self {
        let mut param = param.to_owned();
        crate::inventory::cut_text(&mut param, MAX_PARAM_BYTES);
        Self {
            param: Some(param),
            ..self
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 | 403 => "authentication_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let retry = matches!(self.status.as_u16(), 429 | 503);
        let mut response = (self.status, Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Rewrites every error answer not already in OpenAI's shape into it: the token check's
/// (401/403), and axum's own refusals (a body too large, a wrong method, a bad path),
/// which come as plain text that OpenAI's clients cannot read.
pub async fn openai_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = match ferry_http::error_answer(next.run(request).await).await {
        Ok(error) => error,
        Err(other) => return other,
    };
    let json = serde_json::from_slice::<Value>(&body).ok();
    if json.as_ref().is_some_and(|v| v["error"].is_object()) {
        // Ours, already in shape.
        return Response::from_parts(parts, axum::body::Body::from(body));
    }
    let message = json
        .as_ref()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| ferry_http::error_text(&parts, &body));
    let code = match parts.status.as_u16() {
        401 => "invalid_api_key",
        // A valid token without the right (a read-only one asking for a completion).
        403 => "insufficient_permissions",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "request_too_large",
        _ => "invalid_request",
    };
    let answer = OpenAiError::new(parts.status, code, message).into_response();
    ferry_http::keeping_headers(answer, &parts)
}

/// The first path segments under `/v1/` (or, from a client that left `/v1` out, under `/`)
/// of OpenAI's API that the gateway does not serve.
const UNSERVED_OPENAI_APIS: [&str; 16] = [
    "assistants",
    "audio",
    "batches",
    "chatkit",
    "containers",
    "conversations",
    "embeddings",
    "evals",
    "files",
    "fine_tuning",
    "images",
    "moderations",
    "realtime",
    "responses",
    "threads",
    "vector_stores",
];

/// The answer to `path` (one no route takes) if it is one of OpenAI's endpoints: a 404 in
/// OpenAI's shape that names what the gateway serves instead, for an OpenAI client.
/// A path of OpenAI's without `/v1` (a client whose base URL lacks it) is answered so too,
/// saying so.
pub fn unserved(path: &str) -> Option<Response> {
    let (rest, prefixed) = match path.strip_prefix("/v1/") {
        Some(rest) => (rest, true),
        None => (path.strip_prefix('/')?, false),
    };
    let first = rest.split('/').next().unwrap_or_default();
    let known =
        UNSERVED_OPENAI_APIS.contains(&first) || matches!(first, "models" | "chat" | "completions");
    known.then(|| {
        let mut shown = path.to_string();
        crate::inventory::cut_text(&mut shown, 64);
        let hint = if prefixed {
            ""
        } else {
            " (a client's base URL should end with /v1)"
        };
        OpenAiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "{shown} is not served here: Ferry's gateway serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions{hint}"
            ),
        )
        .into_response()
    })
}

/// CORS for the OpenAI API: browser applications call it directly, as they call
/// OpenAI's. Any origin, and no credentials but the bearer token, which a page has only
/// if its user gave it.
pub fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::Method;
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::GET, Method::POST])
        // Any header, named back as asked: OpenAI's JavaScript SDK sends its own
        // (`x-stainless-*`), and a wildcard (`*`) never covers `Authorization` (the Fetch
        // standard), so a page could not send its bearer token.
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        // A page's client backs off as a 429 or 503 says (openai-node reads it).
        .expose_headers([RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(3600))
}

/// A chat message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    /// A text, or a list of parts (text parts only here); `null` for an assistant's
    /// message that called tools.
    #[serde(default)]
    content: Option<Content>,
    /// The speaker's name: accepted (clients send it) and not shown to the model, whose
    /// chat templates have no place for it.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    /// What an answer's message carries beside its text (openai-python's message object
    /// appended to the history as it came): accepted when it says nothing.
    #[serde(default)]
    refusal: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    annotations: Option<Value>,
}

/// A message's content: one text or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a message's content must be a text or a list of parts (each {\"type\": ..., \"text\": ...} and no field OpenAI's parts lack)"
)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content (`{"type": "text", "text": ...}`; images, audio,
/// files and refusals are refused by their type). Fields OpenAI's parts do not have
/// are refused, as everywhere else in a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// The other kinds' payloads: known, so that such a part is refused for its type
    /// (and a text part carrying one, rather than the payload dropped).
    #[serde(default)]
    image_url: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    input_audio: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    file: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    refusal: Option<serde::de::IgnoredAny>,
}

impl ContentPart {
    /// The first payload of another kind of part this part carries, by its field's name.
    fn other_payload(&self) -> Option<&'static str> {
        [
            ("image_url", self.image_url.is_some()),
            ("input_audio", self.input_audio.is_some()),
            ("file", self.file.is_some()),
            ("refusal", self.refusal.is_some()),
        ]
        .into_iter()
        .find_map(|(field, present)| present.then_some(field))
    }
}

impl ChatMessage {
    /// The (role, text) the chat template takes: OpenAI's `developer` role is this
    /// model's `system`; a role the template does not know, or a part that is not
    /// text, is refused (a role is pasted into the template: it must be one of its own).
    fn into_turn(self, i: usize) -> Result<(String, String), OpenAiError> {
        let extras = [
            ("refusal", &self.refusal),
            ("tool_calls", &self.tool_calls),
            ("function_call", &self.function_call),
            ("audio", &self.audio),
            ("annotations", &self.annotations),
        ];
        if let Some((field, _)) = extras
            .iter()
            .find(|(_, v)| v.as_ref().is_some_and(|v| !is_empty(v)))
        {
            return Err(OpenAiError::invalid(
                "messages",
                format!("messages[{i}].{field} is not supported (tool calls, audio and refusals)"),
            ));
        }
        let role = match self.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(OpenAiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].role '{other}' is not supported (system, developer, user or assistant)"
                    ),
                ))
            }
        };
        let text = match self.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    if let ("text", Some(field)) = (part.kind.as_str(), part.other_payload()) {
                        return Err(OpenAiError::invalid(
                            "messages",
                            format!(
                                "messages[{i}].content: a 'text' part carrying '{field}' is not supported (text only)"
                            ),
                        ));
                    }
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(OpenAiError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}].content: a '{kind}' part is not supported (text parts only)"
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        Ok((role.to_string(), text))
    }
}

/// `stop`: one text or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "stop must be a text or a list of texts")]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    /// Random padding against length side channels: Ferry's gateway adds none.
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

/// The fields both endpoints take.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<Seed>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

/// A request's seed as the sampler takes it. OpenAI's is a signed 64-bit integer: a
/// negative one is taken by its two's-complement bits, so each seed gives its own answer;
/// u64 seeds are taken too.
#[derive(Debug, Clone, Copy)]
struct Seed(u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WholeNumber;
        impl serde::de::Visitor<'_> for WholeNumber {
            type Value = Seed;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number for the seed")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Seed, E> {
                Ok(Seed(v as u64))
            }
        }
        d.deserialize_any(WholeNumber)
    }
}

/// A completion's prompt: a text, or a list of them (one here). Tokens' ids are
/// refused.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "prompt must be a text or a list of texts (not of tokens' ids)"
)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl Prompt {
    /// The one prompt; several are refused (`n` answers per request is 1 here too).
    fn into_text(self) -> Result<String, OpenAiError> {
        match self {
            Prompt::One(p) => Ok(p),
            Prompt::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            Prompt::Many(v) => Err(OpenAiError::invalid(
                "prompt",
                format!("one prompt per request is supported, not {}", v.len()),
            )),
        }
    }
}

/// Which endpoint, for the answer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Sampling {
    /// The guest's request, or what is wrong with the fields.
    fn request(
        &self,
        endpoint: Endpoint,
        prompt: PromptKind,
        messages: Vec<(String, String)>,
    ) -> Result<serve::Request, OpenAiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(OpenAiError::invalid("n", "only n = 1 is supported"));
        }
        if self.stream_options.is_some() && self.stream != Some(true) {
            return Err(OpenAiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        // Unset, as with OpenAI: for a chat, as many as the context leaves (the guest
        // stops there); for a completion, 16.
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(match endpoint {
                Endpoint::Chat => MAX_TOKENS,
                Endpoint::Completion => COMPLETION_MAX_TOKENS,
            });
        if !(1..=MAX_TOKENS).contains(&max_tokens) {
            // Named as the client named it.
            let field = match self.max_completion_tokens {
                Some(_) => "max_completion_tokens",
                None => "max_tokens",
            };
            return Err(OpenAiError::invalid(
                field,
                format!("{field} must be between 1 and {MAX_TOKENS}, not {max_tokens}"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(OpenAiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, not {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&top_p) {
            return Err(OpenAiError::invalid(
                "top_p",
                format!("top_p must be between 0 and 1, not {top_p}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > serve::MAX_STOPS
            || (stop.iter()).any(|s| s.is_empty() || s.len() > serve::MAX_STOP_BYTES)
        {
            return Err(OpenAiError::invalid(
                "stop",
                format!(
                    "stop takes at most {} texts of 1 to {} bytes",
                    serve::MAX_STOPS,
                    serve::MAX_STOP_BYTES
                ),
            ));
        }
        Ok(serve::Request {
            prompt,
            messages,
            max_tokens,
            max_tokens_asked: self.max_completion_tokens.or(self.max_tokens).is_some(),
            temperature,
            top_p,
            // Unseeded requests differ, as with OpenAI; the seed travels with the request,
            // so a migrated answer is still the one it would have been.
            seed: self.seed.map_or_else(random_seed, |s| s.0),
            stop,
        })
    }
}

/// What the relay passes to the HTTP side.
#[derive(Debug)]
enum Relayed {
    Text(String),
    Done {
        reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    Failed(OpenAiError),
}

impl Center {
    /// The serving VM `model` names: its id, or the name it was given at creation (an id
    /// comes first: a VM named as another's id is found by its own id).
    fn serving_vm(&self, model: &str) -> Result<String, OpenAiError> {
        let inventory = self.inventory();
        let down_after = self.down_after_ms();
        let mut serving = (inventory.vms().values()).filter(|v| serves(&inventory, v, down_after));
        if let Some(v) = serving.clone().find(|v| v.id == model) {
            return Ok(v.id.clone());
        }
        let named: Vec<&str> = serving
            .by_ref()
            .filter(|v| v.info.name.as_deref() == Some(model))
            .map(|v| v.id.as_str())
            .collect();
        match named.as_slice() {
            [id] => Ok(id.to_string()),
            [] => Err(model_not_found(model)),
            // A 400, not a 409: OpenAI's clients retry a 409, and asking again changes
            // nothing.
            ids => Err(OpenAiError::new(
                StatusCode::BAD_REQUEST,
                "model_ambiguous",
                format!(
                    "{} serving VMs are named '{model}' ({}): name one by its id",
                    ids.len(),
                    ids.join(", ")
                ),
            )),
        }
    }

    /// The serving VMs as models: each under its name where that names it alone, else
    /// under its id (either answers requests). A name that is another serving VM's id
    /// does not name it alone: that id answers for the other VM
    /// ([`Center::serving_vm`]), and the list would show one model twice.
    fn models_listed(&self) -> Vec<Value> {
        let inventory = self.inventory();
        let down_after = self.down_after_ms();
        let serving: Vec<_> = (inventory.vms().values())
            .filter(|v| serves(&inventory, v, down_after))
            .collect();
        let mut named = std::collections::HashMap::<&str, usize>::new();
        for name in serving.iter().filter_map(|v| v.info.name.as_deref()) {
            *named.entry(name).or_default() += 1;
        }
        let ids: std::collections::HashSet<&str> = serving.iter().map(|v| v.id.as_str()).collect();
        serving
            .iter()
            .map(|v| {
                let name =
                    (v.info.name.as_deref()).filter(|name| named[name] == 1 && !ids.contains(name));
                model_object(name.unwrap_or(&v.id), v)
            })
            .collect()
    }

    /// The host that runs VM `vm` now, as the center last heard.
    fn serving_host(&self, vm: &str) -> Option<HostRecord> {
        let inventory = self.inventory();
        let record = inventory.vms().get(vm)?;
        inventory.hosts.get(&record.host).cloned()
    }

    /// Where VM `vm` went from `from`: the old host says (it records the destination's
    /// migration address); failing that, the inventory, once it names another host.
    fn follow(&self, vm: &str, from: &HostRecord) -> Option<HostRecord> {
        if let Ok(info) = self
            .host_client(from)
            .ok()?
            .get_within_time::<ferry_api::VmInfo>(
                &format!("/v1/vms/{vm}"),
                MAX_VM_ANSWER,
                HOST_CALL_TIME,
            )
        {
            if let VmState::MigratedAway { to } = info.state {
                let inventory = self.inventory();
                let (now, down_after) = (unix_ms(), self.down_after_ms());
                // A record left behind (a host renamed, a machine replaced) may share the
                // address: the host up has it now.
                let mut matching = (inventory.hosts.values())
                    .filter(|h| h.info.migration_addr == to)
                    .peekable();
                let first = matching.peek().copied();
                if let Some(h) = matching
                    .find(|h| inventory.is_up(&h.name, now, down_after))
                    .or(first)
                {
                    return Some(h.clone());
                }
            } else {
                return Some(from.clone());
            }
        }
        self.serving_host(vm)
    }

    /// Relays one request (of at most `max_tokens` tokens) to VM `vm` and its answer back
    /// over `tx`, following the VM across migrations. Blocks: runs on its own thread.
    /// Cancels the generation if the client goes away (`tx` closed).
    fn relay(
        &self,
        vm: &str,
        stream: u64,
        payload: Vec<u8>,
        max_tokens: u32,
        tx: &mpsc::Sender<Relayed>,
    ) {
        // Refused here, not by the host's body limit as a 502 that clients retry.
        if payload.len() > serve::MAX_REQUEST_BYTES {
            let e = refusal(
                RefusalCode::ContextLength,
                format!(
                    "the request is {} bytes encoded; model '{vm}' takes at most {}",
                    payload.len(),
                    serve::MAX_REQUEST_BYTES
                ),
            );
            let _ = tx.blocking_send(Relayed::Failed(e));
            return;
        }
        let Some(mut host) = self.serving_host(vm) else {
            let e = OpenAiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("no model (serving VM) '{vm}'"),
            );
            let _ = tx.blocking_send(Relayed::Failed(e));
            return;
        };
        let message = ChannelMessage {
            stream,
            kind: serve::kind::REQUEST,
            payload,
        };
        let relayed = self
            .submit(vm, &mut host, &message, tx)
            .and_then(|()| self.read_back(vm, &mut host, stream, max_tokens, tx));
        if let Err(e) = relayed {
            let _ = tx.blocking_send(Relayed::Failed(e));
        }
    }

    /// Queues `message` on VM `vm`'s channel, at `host` or wherever it has moved; waits
    /// out a start or a switchover (up to [`PATIENCE`]). A client gone (`tx` closed)
    /// ends it. Whatever ends it short, the request is cancelled if a try may have queued
    /// it: its answer lost on the way back, it would be generated for nobody.
    fn submit(
        &self,
        vm: &str,
        host: &mut HostRecord,
        message: &ChannelMessage,
        tx: &mpsc::Sender<Relayed>,
    ) -> Result<(), OpenAiError> {
        let mut may_have_arrived = false;
        self.queue(vm, host, message, tx, &mut may_have_arrived)
            .map_err(|(error, why)| {
                if may_have_arrived {
                    self.cancel(vm, host, message.stream, why);
                }
                error
            })
    }

    /// [`Self::submit`]'s tries; an error comes with why the request is given up on, and
    /// `may_have_arrived` says whether a try may have queued it all the same.
    fn queue(
        &self,
        vm: &str,
        host: &mut HostRecord,
        message: &ChannelMessage,
        tx: &mpsc::Sender<Relayed>,
        may_have_arrived: &mut bool,
    ) -> Result<(), (OpenAiError, &'static str)> {
        let started = Instant::now();
        loop {
            if tx.is_closed() {
                // Nobody reads it.
                return Err((relay_lost(), "the client went away"));
            }
            let client = self
                .host_client(host)
                .map_err(|e| (unreachable(vm, &e), "the model is out of reach"))?;
            let result: Result<Value, ClientError> = client.post_within_time(
                &format!("/v1/vms/{vm}/streams"),
                message,
                MAX_CALL_ANSWER,
                HOST_CALL_TIME,
            );
            let Err(e) = result else { return Ok(()) };
            *may_have_arrived |= e.api().is_none();
            match e.code() {
                // The stream's ids are this gateway's: it is the earlier try's, queued
                // (and moved with the VM if it migrated since). Left alone, it would be
                // generated for nobody and never released.
                Some("stream_exists") if *may_have_arrived => return Ok(()),
                // An earlier try may be queued all the same (a host that checks its
                // queue's bound first).
                Some("busy") => {
                    return Err((
                        OpenAiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "rate_limit_exceeded",
                            format!("model '{vm}' has a full queue; try again shortly"),
                        ),
                        "the model's queue is full",
                    ))
                }
                Some("too_large") => {
                    return Err((
                        refusal(
                            RefusalCode::ContextLength,
                            format!("the request is too large for model '{vm}'"),
                        ),
                        "the request is too large",
                    ))
                }
                // (The host holding this center's share of its connections refused
                // before the request was read.)
                code @ Some("migrated" | "vm_not_found" | "unavailable" | TOO_MANY_CONNECTIONS) => {
                    self.reroute(vm, host, code);
                }
                // Not an answer: the host may be going down; the inventory may move.
                None if e.api().is_none() => self.reroute(vm, host, None),
                // The detail (host addresses, the transport's errors) is for the log.
                _ => {
                    tracing::warn!(vm, "the model's host refused a request: {e:#}");
                    return Err((
                        upstream(format!("the host of model '{vm}' refused the request")),
                        "its host refused the request",
                    ));
                }
            }
            if started.elapsed() > PATIENCE {
                return Err((unreachable(vm, &e), "the model is out of reach"));
            }
            std::thread::sleep(retry_pause(started.elapsed(), e.code()));
        }
    }

    /// Reads stream `stream` of VM `vm` event by event into `tx`, following the VM
    /// across migrations from the next event, until its final event; then forgets the
    /// stream. A client gone (`tx` closed) cancels the generation, and so does an answer
    /// past what `max_tokens` tokens can be ([`AnswerBound`]).
    fn read_back(
        &self,
        vm: &str,
        host: &mut HostRecord,
        stream: u64,
        max_tokens: u32,
        tx: &mpsc::Sender<Relayed>,
    ) -> Result<(), OpenAiError> {
        let mut bound = AnswerBound::new(max_tokens);
        let mut next = 0usize;
        let mut last_progress = Instant::now();
        // Since when the VM has been out of reach: a queued request's silence is not.
        let mut unreachable_since: Option<Instant> = None;
        // Whether this outage already went to another host at once, without a pause.
        let mut hopped = false;
        loop {
            if tx.is_closed() {
                self.cancel(vm, host, stream, "the client went away");
                return Ok(());
            }
            let client = self.host_client(host).map_err(|e| unreachable(vm, &e))?;
            let path = format!("/v1/vms/{vm}/streams/{stream}?from={next}&wait_ms={READ_WAIT_MS}");
            let asked = Instant::now();
            match client.get_within_time::<StreamChunk>(&path, MAX_CHUNK_ANSWER, READ_TIME) {
                Ok(chunk) => {
                    unreachable_since = None;
                    hopped = false;
                    // Events from elsewhere than asked (a broken host) would reach the
                    // client twice, or leave a gap: not the answer.
                    if chunk.from != next {
                        self.cancel(vm, host, stream, "its host answered a read out of place");
                        return Err(upstream(format!(
                            "the host of model '{vm}' answered a read from event {next} with events from {}",
                            chunk.from
                        )));
                    }
                    let empty = chunk.events.is_empty();
                    if !empty {
                        last_progress = Instant::now();
                    }
                    for e in chunk.events {
                        next += 1;
                        let relayed = match relayed(vm, &e) {
                            Ok(relayed) => relayed,
                            // A broken guest may go on answering: it is told to stop, not
                            // only forgotten.
                            Err(garbage) => {
                                self.cancel(vm, host, stream, "the model answered garbage");
                                return Err(garbage);
                            }
                        };
                        if let Relayed::Text(text) = &relayed {
                            if !bound.take(text) {
                                self.cancel(vm, host, stream, "the model answered past its bound");
                                return Err(overlong(vm, max_tokens));
                            }
                        }
                        let last = !matches!(relayed, Relayed::Text(_));
                        if tx.blocking_send(relayed).is_err() {
                            self.cancel(vm, host, stream, "the client went away");
                            return Ok(());
                        }
                        if last {
                            self.release(vm, host, stream, chunk.end != StreamEnd::Open);
                            return Ok(());
                        }
                    }
                    if chunk.end == StreamEnd::Overflow {
                        // The guest may still be answering, past what its stream holds.
                        self.cancel(vm, host, stream, "the model overflowed its stream");
                    } else if chunk.end != StreamEnd::Open {
                        self.release(vm, host, stream, true);
                    }
                    if chunk.end != StreamEnd::Open {
                        return Err(upstream(format!(
                            "model '{vm}' ended the answer early ({:?})",
                            chunk.end
                        )));
                    }
                    if last_progress.elapsed() > SILENCE {
                        self.cancel(vm, host, stream, "the model went silent");
                        return Err(stalled(vm));
                    }
                    // "Nothing yet" at once (a host whose reads do not wait: a broken one,
                    // or one overloaded with waiting reads): asked again at once, such a
                    // host would be asked in a tight loop until [`SILENCE`].
                    if empty && asked.elapsed() < Duration::from_millis(READ_WAIT_MS / 2) {
                        std::thread::sleep(retry_pause(last_progress.elapsed(), None));
                    }
                }
                Err(e) => {
                    match e.code() {
                        Some("stream_not_found") => {
                            return Err(upstream(format!("model '{vm}' lost the answer's stream")))
                        }
                        // Not an answer, or the VM moving, starting or pausing: it may
                        // answer shortly, here or where it went.
                        // (Or this center's share of the host's connections taken.)
                        code @ (None
                        | Some(
                            "migrated" | "vm_not_found" | "unavailable" | "busy"
                            | TOO_MANY_CONNECTIONS,
                        )) => {
                            let from = host.name.clone();
                            self.reroute(vm, host, code);
                            // The VM's new host, just found: it runs the VM already (its
                            // old host let go of it once it did), and the answer's next
                            // token may be waiting there. Asked at once, once an outage:
                            // two broken hosts naming each other are not asked in a loop.
                            if host.name != from && !hopped {
                                hopped = true;
                                unreachable_since.get_or_insert_with(Instant::now);
                                continue;
                            }
                        }
                        // A refusal that asking again will not change (a read from before
                        // what the host let go, or beyond what it has; its handler failing):
                        // the client hears at once, not after the patience. The detail is
                        // for the log.
                        Some(_) => {
                            tracing::warn!(vm, stream, "the model's host refused a read: {e:#}");
                            self.cancel(vm, host, stream, "its host refused a read");
                            return Err(upstream(format!(
                                "the host of model '{vm}' refused to read the answer"
                            )));
                        }
                    }
                    let out_of_reach = unreachable_since.get_or_insert_with(Instant::now).elapsed();
                    if out_of_reach > PATIENCE {
                        // If the VM comes back, it must not generate for nobody.
                        self.cancel(vm, host, stream, "the model is out of reach");
                        return Err(unreachable(vm, &e));
                    }
                    std::thread::sleep(retry_pause(out_of_reach, e.code()));
                }
            }
        }
    }

    /// Where to try next after `host` answered `code` (`None`: it did not answer): where
    /// it says the VM went, itself while the VM pauses or starts there or while it holds
    /// this center's share of its connections, or where the inventory last saw the VM.
    fn reroute(&self, vm: &str, host: &mut HostRecord, code: Option<&str>) {
        let next = match code {
            Some("migrated" | "vm_not_found") => self.follow(vm, host),
            Some("unavailable" | TOO_MANY_CONNECTIONS) => None,
            _ => self.serving_host(vm),
        };
        if let Some(next) = next {
            *host = next;
        }
    }

    /// Nobody will read the answer (`why`): stop the generation and forget the stream,
    /// following the VM (up to [`CANCEL_PATIENCE`]) if it moved or is moving: its new host
    /// would generate the answer for nobody.
    fn cancel(&self, vm: &str, host: &HostRecord, stream: u64, why: &str) {
        let cancel = ChannelMessage {
            stream,
            kind: serve::kind::CANCEL,
            payload: Vec::new(),
        };
        let mut host = host.clone();
        let started = Instant::now();
        loop {
            let client = match self.host_client(&host) {
                Ok(client) => client,
                Err(e) => {
                    tracing::warn!(vm, stream, "a cancel could not be sent ({why}): {e}");
                    break;
                }
            };
            let sent: Result<Value, ClientError> = client.post_within_time(
                &format!("/v1/vms/{vm}/streams/{stream}/signal"),
                &cancel,
                MAX_CALL_ANSWER,
                HOST_CALL_TIME,
            );
            let Err(e) = sent else {
                tracing::info!(vm, stream, "generation cancelled: {why}");
                break;
            };
            let code = e.code();
            let again = e.api().is_none()
                || matches!(
                    code,
                    Some("migrated" | "vm_not_found" | "unavailable" | TOO_MANY_CONNECTIONS)
                );
            // Anything else (the stream ended, or is gone): nothing left to stop.
            if !again {
                tracing::debug!(vm, stream, "nothing to cancel ({why}): {e:#}");
                break;
            }
            if started.elapsed() > CANCEL_PATIENCE {
                tracing::warn!(
                    vm,
                    stream,
                    "a cancel did not reach the model ({why}): {e:#}"
                );
                break;
            }
            self.reroute(vm, &mut host, code);
            std::thread::sleep(retry_pause(started.elapsed(), code));
        }
        self.release(vm, &host, stream, false);
    }

    /// Forgets a stream whose answer was read whole or given up on, following the VM
    /// (up to [`CANCEL_PATIENCE`]) if it moved or is moving: the stream moves with it and
    /// would hold one of its places there. One `read_whole` (its end read) waits out no
    /// pause: its host gives its place up first when one is needed, so a relay need not
    /// wait for a long switchover.
    fn release(&self, vm: &str, host: &HostRecord, stream: u64, read_whole: bool) {
        let mut host = host.clone();
        let started = Instant::now();
        while let Ok(client) = self.host_client(&host) {
            let released: Result<Value, ClientError> = client.delete_within_time(
                &format!("/v1/vms/{vm}/streams/{stream}"),
                MAX_CALL_ANSWER,
                HOST_CALL_TIME,
            );
            let Err(e) = released else { return };
            let code = e.code();
            let follow = match code {
                Some("migrated" | TOO_MANY_CONNECTIONS) => true,
                Some("unavailable") => !read_whole,
                _ => false,
            };
            if !follow || started.elapsed() > CANCEL_PATIENCE {
                return;
            }
            self.reroute(vm, &mut host, code);
            std::thread::sleep(retry_pause(started.elapsed(), code));
        }
    }
}

/// An answer of the VM's host or guest that makes no sense.
fn upstream(message: String) -> OpenAiError {
    OpenAiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
}

/// VM `vm` could not be reached for [`PATIENCE`], last for `why`: logged, not told the
/// client (it names the cluster's internal addresses).
fn unreachable(vm: &str, why: &dyn std::fmt::Display) -> OpenAiError {
    tracing::warn!(vm, "the model could not be reached: {why:#}");
    OpenAiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "model_unavailable",
        format!("model '{vm}' could not be reached for {PATIENCE:?}"),
    )
}

/// VM `vm` sent more than an answer of `max_tokens` tokens can be.
fn overlong(vm: &str, max_tokens: u32) -> OpenAiError {
    upstream(format!(
        "model '{vm}' sent more than an answer of {max_tokens} tokens"
    ))
}

/// The relay ended without the answer's end (it failed).
fn relay_lost() -> OpenAiError {
    OpenAiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "relay_failed",
        "the relay ended before the answer did",
    )
}

/// The least text of a middle piece of a token split over several events (a channel
/// slot holds about 480 bytes of text): such pieces are bounded by the answer's bytes.
const WHOLE_PIECE: usize = 256;

/// How much of an answer the relay takes from a guest: a hostile or broken one could send
/// text for ever, which a streaming client would wait on and the gateway would hold for
/// one not streaming.
struct AnswerBound {
    /// Text events left.
    events: u64,
    /// Bytes of text left.
    bytes: usize,
}

impl AnswerBound {
    /// For an answer of `max_tokens` tokens: twice as many text events (a token's text
    /// may come empty, the text held back for a stop text comes at the end), and a few;
    /// [`MAX_TEXT_PER_TOKEN`] bytes a token (and a few), at most [`MAX_ANSWER_TEXT`].
    fn new(max_tokens: u32) -> Self {
        let tokens = usize::try_from(max_tokens).unwrap_or(usize::MAX);
        Self {
            events: 2 * u64::from(max_tokens) + 8,
            bytes: (tokens.saturating_add(8))
                .saturating_mul(MAX_TEXT_PER_TOKEN)
                .min(MAX_ANSWER_TEXT),
        }
    }

    /// Counts `text` in; false if the answer goes past its bound with it. A text of
    /// [`WHOLE_PIECE`] bytes or more counts in bytes only: a token's text longer than a
    /// channel slot comes in pieces of a slot's room (only its last, shorter piece can
    /// count as an event).
    fn take(&mut self, text: &str) -> bool {
        let events = u64::from(text.len() < WHOLE_PIECE);
        match (
            self.events.checked_sub(events),
            self.bytes.checked_sub(text.len()),
        ) {
            (Some(events), Some(bytes)) => {
                (self.events, self.bytes) = (events, bytes);
                true
            }
            _ => false,
        }
    }
}

/// The wait before the next try, `out_of_reach` into trying, after an answer of `code`: a
/// tenth of that, from [`RETRY_PAUSE`] (a switchover's pause is over within a try or two)
/// to [`RETRY_PAUSE_MAX`] (a start or a host down is not); the longest at once for a host
/// with no room for this center's connections, which a quick try would only find full.
fn retry_pause(out_of_reach: Duration, code: Option<&str>) -> Duration {
    match code {
        Some(TOO_MANY_CONNECTIONS) => RETRY_PAUSE_MAX,
        _ => (out_of_reach / 10).clamp(RETRY_PAUSE, RETRY_PAUSE_MAX),
    }
}

/// VM `vm` answered nothing for [`SILENCE`].
fn stalled(vm: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "model_stalled",
        format!("model '{vm}' produced no token for {SILENCE:?}"),
    )
}

/// What one event of VM `vm`'s stream means for the client, or the error for one that
/// means nothing (garbage).
fn relayed(vm: &str, event: &ferry_api::StreamEvent) -> Result<Relayed, OpenAiError> {
    if event.kind != serve::kind::EVENT {
        return Err(upstream(format!(
            "model '{vm}' answered a message of kind {}, not an event",
            event.kind
        )));
    }
    Ok(match Event::decode(&event.payload) {
        Ok(Event::Token { text, .. }) => Relayed::Text(text),
        // This relay cancels only for a client gone: an answer cut short otherwise (a
        // cancel by another hand) is not a complete one.
        Ok(Event::Done {
            reason: FinishReason::Cancelled,
            ..
        }) => Relayed::Failed(upstream(format!(
            "model '{vm}' cancelled the answer before its end"
        ))),
        Ok(Event::Done {
            reason,
            prompt_tokens,
            completion_tokens,
        }) => Relayed::Done {
            reason,
            prompt_tokens,
            completion_tokens,
        },
        Ok(Event::Error { code, message }) => Relayed::Failed(refusal(code, message)),
        Err(e) => return Err(upstream(format!("model '{vm}' answered garbage: {e}"))),
    })
}

fn refusal(code: RefusalCode, message: String) -> OpenAiError {
    match code {
        RefusalCode::ContextLength => {
            OpenAiError::new(StatusCode::BAD_REQUEST, "context_length_exceeded", message)
        }
        RefusalCode::InvalidRequest => {
            OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
        RefusalCode::Internal => {
            OpenAiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_failed", message)
        }
        // A full queue, as the host's own (429, `Retry-After`).
        RefusalCode::Busy => OpenAiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            message,
        ),
    }
}

/// `GET /v1/models`: the serving VMs, one model each, under a name that answers for it.
pub async fn models(State(center): State<Arc<Center>>) -> Response {
    let data = center.models_listed();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`: the serving VM `model` names (its id or its name).
pub async fn model(State(center): State<Arc<Center>>, Path(model): Path<String>) -> Response {
    let vm = match center.serving_vm(&model) {
        Ok(vm) => vm,
        Err(e) => return e.into_response(),
    };
    let inventory = center.inventory();
    match inventory.vms().get(&vm) {
        Some(v) => Json(model_object(&model, v)).into_response(),
        // Gone since it was found.
        None => model_not_found(&model).into_response(),
    }
}

/// No serving VM has the id or name `model`.
fn model_not_found(model: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("the model '{model}' does not exist (GET /v1/models lists them)"),
    )
}

/// Whether `v` is a serving VM that answers requests: a live one, or one its last host
/// says migrated to a host that is up (until that host reports it, within a heartbeat;
/// the relay follows it there).
fn serves(inventory: &Inventory, v: &VmRecord, down_after_ms: u64) -> bool {
    // The workload first: the hosts are looked through only for a serving VM that moved.
    v.info.workload == SERVING_WORKLOAD
        && match &v.info.state {
            ferry_api::VmState::MigratedAway { to } => {
                let now = unix_ms();
                (inventory.hosts.values()).any(|h| {
                    h.info.migration_addr == *to && inventory.is_up(&h.name, now, down_after_ms)
                })
            }
            state => state.is_live(),
        }
}

/// OpenAI's model object for serving VM `v`, known as `id`.
fn model_object(id: &str, v: &VmRecord) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": v.info.since_unix_ms / 1000,
        "owned_by": "ferry",
        "vm": v.id,
    })
}

/// The fields of [`Sampling`] (serde cannot deny unknown fields through `flatten`).
const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
];

/// Fields that say something about the caller, not the answer: accepted and ignored.
const ADVISORY_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

/// Whether a field's value asks for nothing (its default).
type AsksForNothing = fn(&Value) -> bool;

/// Fields this server does not implement, each with the test of the value that asks for
/// nothing: accepted at that value (clients such as LangChain send them that way) and
/// refused at any other, so a request for penalties, log probabilities, tools or JSON
/// output is not quietly answered without them.
const UNIMPLEMENTED: &[(&str, AsksForNothing)] = &[
    ("frequency_penalty", is_zero),
    ("presence_penalty", is_zero),
    ("top_logprobs", is_zero),
    // 0 asks the completions API for the sampled token's log probability.
    ("logprobs", |v| v.is_null() || v.as_bool() == Some(false)),
    ("echo", is_zero_or_false),
    ("logit_bias", is_empty),
    ("tools", is_empty),
    ("functions", is_empty),
    ("best_of", |v| v.is_null() || v.as_u64() == Some(1)),
    ("suffix", |v| v.is_null() || v.as_str() == Some("")),
    ("response_format", |v| {
        v.is_null() || v.get("type").and_then(Value::as_str) == Some("text")
    }),
    ("tool_choice", is_none_or_auto),
    ("function_call", is_none_or_auto),
    ("modalities", |v| v.is_null() || *v == json!(["text"])),
    ("audio", Value::is_null),
    // Null only: an empty object asks for web search (and a prediction needs content).
    ("prediction", Value::is_null),
    ("web_search_options", Value::is_null),
    // For reasoning models; the null that clients of several models send asks nothing.
    ("reasoning_effort", Value::is_null),
    ("verbosity", |v| v.is_null() || v.as_str() == Some("medium")),
];

fn is_zero(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}

fn is_zero_or_false(v: &Value) -> bool {
    is_zero(v) || v.as_bool() == Some(false)
}

fn is_empty(v: &Value) -> bool {
    v.is_null()
        || v.as_object().is_some_and(|o| o.is_empty())
        || v.as_array().is_some_and(|a| a.is_empty())
}

fn is_none_or_auto(v: &Value) -> bool {
    v.is_null() || matches!(v.as_str(), Some("none" | "auto"))
}

/// A fresh seed for an unseeded request.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // Without a random source, any seed will do: the answer is still a sample.
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// The body as a `T`, refusing fields other than `own` and [`SAMPLING_FIELDS`].
fn parse<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    own: &'static str,
) -> Result<T, OpenAiError> {
    let bad = |message: String| {
        OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_request_body", message)
    };
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Some(fields) = value.as_object() else {
        return Err(bad("the body must be a JSON object".into()));
    };
    for (field, value) in fields {
        let known = field == own
            || SAMPLING_FIELDS.contains(&field.as_str())
            || ADVISORY_FIELDS.contains(&field.as_str());
        match UNIMPLEMENTED.iter().find(|(name, _)| name == field) {
            _ if known => {}
            Some((_, asks_for_nothing)) if asks_for_nothing(value) => {}
            Some((name, _)) => {
                return Err(OpenAiError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_parameter",
                    format!(
                    "'{field}' is not supported here (only at its default, {value} asks for it)"
                ),
                )
                .at(name))
            }
            None => return Err(bad(format!("unknown field '{field}'")).at(field)),
        }
    }
    let e = match T::deserialize(&value) {
        Ok(request) => return Ok(request),
        Err(e) => e.to_string(),
    };
    // serde names no field in a wrong value's error ("invalid value: integer `-1`,
    // expected u32"): the field is the first that fails alone, beside the least the other
    // required fields can be. There are few (unknown fields were refused above), each
    // tried on the error's path only.
    let alone = |field: Option<(&String, &Value)>| {
        let mut least = serde_json::Map::new();
        least.insert("model".into(), json!(""));
        least.insert(own.into(), json!([]));
        least.extend(field.map(|(k, v)| (k.clone(), v.clone())));
        T::deserialize(&Value::Object(least)).is_ok()
    };
    let culprit = (alone(None))
        .then(|| fields.iter().find(|field| !alone(Some(*field))))
        .flatten();
    let param = culprit.and_then(|(field, _)| {
        (SAMPLING_FIELDS.iter().copied().chain([own])).find(|known| known == field)
    });
    Err(match param {
        Some(field) => bad(format!("'{field}' is not valid: {e}")).at(field),
        None => bad(format!("the body is not a valid request: {e}")),
    })
}

/// The request's body, refused past [`MAX_BODY_BYTES`] (axum's 2 MiB would let each
/// request cost far more than it can be), with its share of the bodies in hand
/// ([`MAX_BODY_KIB_IN_HAND`]), taken as its bytes arrive: when they are all taken, the
/// request is refused (503, `Retry-After`) rather than read.
async fn read_body(
    bodies: &Arc<Semaphore>,
    body: Body,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), OpenAiError> {
    use futures_util::StreamExt;
    let mut data = body.into_data_stream();
    let mut got = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| {
            OpenAiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_body",
                format!("the body could not be read: {e}"),
            )
        })?;
        if got.len() + piece.len() > MAX_BODY_BYTES {
            return Err(OpenAiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            ));
        }
        hold_kib(bodies, &mut held, got.len() + piece.len()).ok_or_else(|| {
            OpenAiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "too many request bodies are being read; try again shortly",
            )
        })?;
        got.extend_from_slice(&piece);
    }
    Ok((Bytes::from(got), held))
}

/// Makes `held` a share of `budget` (in KiB) of the KiB that `bytes` bytes start, taking
/// what it lacks; `None` if the budget has not that much left.
fn hold_kib(
    budget: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
    bytes: usize,
) -> Option<()> {
    let more =
        (bytes.div_ceil(1 << 10)).saturating_sub(held.as_ref().map_or(0, |p| p.num_permits()));
    if more > 0 {
        let taken = budget
            .clone()
            .try_acquire_many_owned(u32::try_from(more).ok()?)
            .ok()?;
        match held {
            Some(permit) => permit.merge(taken),
            None => *held = Some(taken),
        }
    }
    Some(())
}

/// A whole answer's JSON body, which keeps `held` (its share of the answers in hand)
/// until the server has taken all of it, or dropped it with its connection.
fn held_body(json: Vec<u8>, held: Option<OwnedSemaphorePermit>) -> Response {
    let length = json.len();
    let chunks =
        futures_util::stream::unfold((Some(Bytes::from(json)), held), |(json, held)| async move {
            json.map(|json| (Ok::<_, std::io::Error>(json), (None, held)))
        });
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// The whole answers in hand are at their bound.
fn answers_busy() -> OpenAiError {
    OpenAiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_busy",
        "too many whole answers are waiting for their clients; try again shortly",
    )
}

/// A relay's permit, taken before a body is parsed: parsed, a body takes many times its
/// size, so the relays' bound is what bounds the memory of requests in hand.
fn relay_permit(center: &Center) -> Result<OwnedSemaphorePermit, OpenAiError> {
    center
        .gateway
        .relays
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            OpenAiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!("{MAX_RELAYS} requests are in flight; try again shortly"),
            )
        })
}

/// A request's body parsed as `T` (`own`: the field only that endpoint takes), and a
/// relay's permit for it: taken before the parse, so parses in progress are bounded too.
async fn admit<T: serde::de::DeserializeOwned>(
    center: &Center,
    body: Body,
    own: &'static str,
) -> Result<(T, OwnedSemaphorePermit), OpenAiError> {
    let (body, _in_hand) = read_body(&center.gateway.bodies, body).await?;
    let permit = relay_permit(center)?;
    Ok((parse(&body, own)?, permit))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(center): State<Arc<Center>>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let (req, permit): (ChatRequest, _) = admit(&center, body, "messages").await?;
    if req.messages.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            "messages must not be empty",
        ));
    }
    let messages = (req.messages.into_iter().enumerate())
        .map(|(i, m)| m.into_turn(i))
        .collect::<Result<Vec<_>, _>>()?;
    complete(
        center,
        permit,
        Endpoint::Chat,
        req.sampling,
        PromptKind::Chat,
        messages,
    )
    .await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(center): State<Arc<Center>>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let (req, permit): (CompletionRequest, _) = admit(&center, body, "prompt").await?;
    let messages = vec![(String::new(), req.prompt.into_text()?)];
    complete(
        center,
        permit,
        Endpoint::Completion,
        req.sampling,
        PromptKind::Raw,
        messages,
    )
    .await
}

async fn complete(
    center: Arc<Center>,
    permit: OwnedSemaphorePermit,
    endpoint: Endpoint,
    sampling: Sampling,
    prompt: PromptKind,
    messages: Vec<(String, String)>,
) -> Result<Response, OpenAiError> {
    let request = sampling.request(endpoint, prompt, messages)?;
    let model = sampling.model.clone();
    let vm = center.serving_vm(&model)?;
    let stream = center.gateway.stream_id();
    let (tx, mut rx) = mpsc::channel(64);
    let payload = request.encode();
    let max_tokens = request.max_tokens;
    let relay_center = center.clone();
    let spawned = std::thread::Builder::new()
        .name("ferry-relay".into())
        .spawn(move || {
            let _permit: OwnedSemaphorePermit = permit;
            relay_center.relay(&vm, stream, payload, max_tokens, &tx);
        });
    if spawned.is_err() {
        return Err(OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "cannot start a relay thread",
        ));
    }
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{stream:016x}"),
        Endpoint::Completion => format!("cmpl-{stream:016x}"),
    };
    let shape = Shape {
        endpoint,
        id,
        created: unix_ms() / 1000,
        model,
    };
    let streaming = sampling.stream == Some(true);
    let usage = sampling.stream_options.is_some_and(|o| o.include_usage);
    // The first event decides between an error answer and a 200; a stream whose first
    // event is slow to come (its request queued behind others) starts without it, so
    // that a proxy does not cut a response with no headers yet.
    let first = if streaming {
        match tokio::time::timeout(STREAM_STARTS_AFTER, rx.recv()).await {
            Ok(first) => first,
            Err(_) => return Ok(shape.stream(None, rx, usage)),
        }
    } else {
        rx.recv().await
    };
    let first = match first {
        Some(Relayed::Failed(e)) => return Err(e),
        Some(first) => first,
        None => {
            return Err(OpenAiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "relay_failed",
                "the relay ended without an answer",
            ))
        }
    };
    if streaming {
        return Ok(shape.stream(Some(first), rx, usage));
    }
    let answers = &center.gateway.answers;
    let mut held = None;
    let mut text = String::new();
    let mut item = Some(first);
    while let Some(relayed) = item {
        match relayed {
            // Refused, `rx` is dropped: the relay cancels the generation.
            Relayed::Text(t) => {
                hold_kib(answers, &mut held, text.len() + t.len()).ok_or_else(answers_busy)?;
                text.push_str(&t);
            }
            Relayed::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let whole = shape.whole(&text, reason, prompt_tokens, completion_tokens);
                let json = serde_json::to_vec(&whole).expect("a JSON value serializes");
                hold_kib(answers, &mut held, text.len() + json.len()).ok_or_else(answers_busy)?;
                return Ok(held_body(json, held));
            }
            Relayed::Failed(e) => return Err(e),
        }
        item = rx.recv().await;
    }
    Err(relay_lost())
}

/// A streamed answer's body, as the task writing it holds it.
struct BodyOut {
    /// Its chunks.
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// Set when the client took no bytes for [`CLIENT_STALL`], or kept the answer waiting
    /// [`CLIENT_BEHIND`] in all: the body then ends in an error (hyper aborts the
    /// connection), not as a whole answer would.
    stalled: Arc<AtomicBool>,
    /// How long the answer has waited for the client so far.
    waited: Duration,
}

/// Sends `bytes` into a streamed answer's body; false if the client left, took no bytes
/// for [`CLIENT_STALL`], or has kept the answer waiting [`CLIENT_BEHIND`] in all (then
/// the caller returns, and dropping the relay's receiver stops the generation).
async fn deliver(out: &mut BodyOut, bytes: Bytes) -> bool {
    let patience = CLIENT_STALL.min(CLIENT_BEHIND.saturating_sub(out.waited));
    let asked = tokio::time::Instant::now();
    // A send with room goes at once, even with no patience left: only waits count.
    let sent = tokio::time::timeout(patience, out.tx.send(Ok(bytes))).await;
    out.waited += asked.elapsed();
    match sent {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            out.stalled.store(true, Ordering::Release);
            false
        }
    }
}

/// The answer's JSON shapes.
struct Shape {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

fn usage(prompt: u32, completion: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        // The counts come from the guest: added in u64, so no pair of them overflows.
        "total_tokens": u64::from(prompt) + u64::from(completion),
    })
}

fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        // (A cancelled answer is relayed as an error, never finished.)
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

impl Shape {
    fn whole(&self, text: &str, reason: FinishReason, prompt: u32, completion: u32) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_name(reason),
                "logprobs": null,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_name(reason),
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt, completion),
        })
    }

    fn chunk(&self, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "delta": match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                },
                "finish_reason": finish.map(finish_name),
                "logprobs": null,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "finish_reason": finish.map(finish_name),
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// [`Self::chunk`] in a stream that ends with a usage chunk: every other chunk says
    /// `"usage": null`, as OpenAI's do.
    fn streamed_chunk(
        &self,
        text: Option<&str>,
        finish: Option<FinishReason>,
        with_usage: bool,
    ) -> Value {
        let mut chunk = self.chunk(text, finish);
        if with_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// Server-sent events: a chunk per piece of text, the finish, then `[DONE]`. An
    /// error after the 200 goes as an `error` object, then `[DONE]`.
    fn stream(
        self,
        first: Option<Relayed>,
        mut rx: mpsc::Receiver<Relayed>,
        with_usage: bool,
    ) -> Response {
        let event = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        let (tx, body) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let stalled = Arc::new(AtomicBool::new(false));
        let mut out = BodyOut {
            tx,
            stalled: stalled.clone(),
            waited: Duration::ZERO,
        };
        // A chat stream names the speaker once, first, as OpenAI's does: clients that
        // accumulate deltas join repeated strings ("assistantassistant...").
        if self.endpoint == Endpoint::Chat {
            let mut opening = self.streamed_chunk(Some(""), None, with_usage);
            opening["choices"][0]["delta"]["role"] = json!("assistant");
            let _ = out.tx.try_send(Ok(event(&opening)));
        }
        tokio::spawn(async move {
            let mut item = first;
            loop {
                let relayed = match item.take() {
                    Some(relayed) => relayed,
                    // A client that left while the model is silent is noticed now, not
                    // at the next token, which may never come; a silent stream gets a
                    // comment line now and then, which keeps proxies from cutting it
                    // (SSE clients pass over comments).
                    None => tokio::select! {
                        next = rx.recv() => match next {
                            Some(relayed) => relayed,
                            // The relay failed (it always sends an end otherwise): the
                            // client must not take the answer cut short for a whole one.
                            None => Relayed::Failed(relay_lost()),
                        },
                        () = out.tx.closed() => return,
                        () = tokio::time::sleep(KEEPALIVE) => {
                            if !deliver(&mut out, Bytes::from_static(b": waiting\n\n")).await {
                                return;
                            }
                            continue;
                        }
                    },
                };
                let (bytes, last) = match relayed {
                    Relayed::Text(t) if t.is_empty() => (None, false),
                    Relayed::Text(t) => {
                        let chunk = self.streamed_chunk(Some(&t), None, with_usage);
                        (Some(event(&chunk)), false)
                    }
                    Relayed::Done {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        let last = self.streamed_chunk(None, Some(reason), with_usage);
                        let mut b = format!("data: {last}\n\n");
                        if with_usage {
                            let mut u = self.chunk(None, None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(prompt_tokens, completion_tokens);
                            b.push_str(&format!("data: {u}\n\n"));
                        }
                        b.push_str("data: [DONE]\n\n");
                        (Some(Bytes::from(b)), true)
                    }
                    Relayed::Failed(e) => (
                        Some(Bytes::from(format!(
                            "data: {}\n\ndata: [DONE]\n\n",
                            e.body()
                        ))),
                        true,
                    ),
                };
                // A closed body means the client left: dropping `rx` tells the relay.
                if let Some(bytes) = bytes {
                    if !deliver(&mut out, bytes).await {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(Some(body), move |body| {
            let stalled = stalled.clone();
            async move {
                let mut body = body?;
                match body.recv().await {
                    Some(item) => Some((item, Some(body))),
                    // The writer gave up on a client that took nothing for a while: the
                    // body fails (hyper aborts the connection) rather than end as whole.
                    None if stalled.load(Ordering::Acquire) => {
                        let why = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client read nothing of the stream for 60 s, or kept it \
                             waiting 300 s in all",
                        );
                        Some((Err(why), None))
                    }
                    None => None,
                }
            }
        });
        let mut response = Response::new(Body::from_stream(stream));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert("cache-control", HeaderValue::from_static("no-cache"));
        // nginx in front would otherwise hold the stream's events back in its buffer.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        response
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::fake_host::{fake_host, Reply};

    fn chat_shape() -> Shape {
        Shape {
            endpoint: Endpoint::Chat,
            id: "chatcmpl-test".into(),
            created: 0,
            model: "m".into(),
        }
    }

    #[tokio::test]
    async fn a_client_leaving_a_silent_stream_releases_its_relay() {
        let (tx, rx) = mpsc::channel(4);
        let response = chat_shape().stream(Some(Relayed::Text("hi".into())), rx, false);
        // The client reads the first token and leaves; the model then says nothing.
        let mut body = response.into_body().into_data_stream();
        let opening = body.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&opening)
            .unwrap()
            .contains("\"role\":\"assistant\""));
        let first = body.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&first).unwrap().contains("\"hi\""));
        drop(body);
        // The relay (which watches `tx`) learns it, and cancels the generation.
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .expect("the relay was not told that the client left");
    }

    /// Checks that the host's requests from `at` on are a cancel of stream 9 (a signal)
    /// and its release.
    #[track_caller]
    fn assert_cancelled(seen: &[String], at: usize) {
        assert!(
            seen[at].starts_with("POST /v1/vms/v/streams/9/signal "),
            "{seen:?}"
        );
        assert!(
            seen[at + 1].starts_with("DELETE /v1/vms/v/streams/9 "),
            "{seen:?}"
        );
    }

    /// A host's answer to a read from event 0: `events` events `event`, the stream still
    /// open.
    fn chunk(event: &Event, events: usize) -> String {
        chunk_from(0, event, events)
    }

    /// A host's answer to a read from event `from`: `events` events `event`, the stream
    /// still open.
    fn chunk_from(from: usize, event: &Event, events: usize) -> String {
        let event = ferry_api::StreamEvent {
            kind: serve::kind::EVENT,
            payload: event.encode(),
        };
        serde_json::to_string(&StreamChunk {
            from,
            events: vec![event; events],
            end: StreamEnd::Open,
        })
        .unwrap()
    }

    /// Reads an answer of at most `max_tokens` tokens from a guest whose host answers
    /// reads with `reads` (then the cancel and the release): the error, the pieces of
    /// text relayed, and the requests the host got.
    fn read_endless(
        tag: &str,
        reads: Vec<String>,
        max_tokens: u32,
    ) -> (OpenAiError, usize, Vec<String>) {
        let scratch = crate::tests::ScratchCenter::open(tag);
        let mut answers: Vec<_> = reads.into_iter().map(|r| ("200 OK", r)).collect();
        answers.extend([("200 OK", "{}".to_string()), ("200 OK", "{}".to_string())]);
        let (addr, requests) = fake_host(answers);
        let mut record = scratch.report("b", addr);
        let (tx, mut rx) = mpsc::channel(64);
        let read = scratch
            .center
            .read_back("v", &mut record, 9, max_tokens, &tx);
        let mut texts = 0;
        while let Ok(Relayed::Text(_)) = rx.try_recv() {
            texts += 1;
        }
        (read.unwrap_err(), texts, requests.join().unwrap())
    }

    #[test]
    fn a_guest_sending_tokens_past_its_answer_is_cut_off_and_cancelled() {
        let token = Event::Token {
            id: 1,
            text: "la".into(),
        };
        let (e, texts, seen) = read_endless("endless-tokens", vec![chunk(&token, 20)], 2);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{}", e.body());
        assert_eq!(e.code, "upstream_error");
        // Twice the tokens asked for, and a few: then nothing more.
        assert_eq!(texts, 12);
        assert_cancelled(&seen, 1);
    }

    #[test]
    fn a_stream_that_overflowed_on_its_host_is_cancelled_not_only_released() {
        let token = Event::Token {
            id: 1,
            text: "la".into(),
        };
        let overflowed = chunk(&token, 1).replace("\"open\"", "\"overflow\"");
        let (e, texts, seen) = read_endless("overflowed", vec![overflowed], MAX_TOKENS);
        assert_eq!(e.code, "upstream_error", "{}", e.body());
        assert_eq!(texts, 1);
        // The guest may still be answering: it is told to stop.
        assert_cancelled(&seen, 1);
    }

    #[test]
    fn a_host_answering_a_read_with_events_from_elsewhere_is_not_relayed_twice() {
        let token = Event::Token {
            id: 1,
            text: "la".into(),
        };
        // The second read asks from event 3 and gets events from 0 again.
        let reads = vec![chunk(&token, 3), chunk(&token, 3)];
        let (e, texts, seen) = read_endless("read-out-of-place", reads, 16);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{}", e.body());
        assert!(e.message.contains("from event 3"), "{}", e.message);
        // Each token once: the repeated ones are not relayed.
        assert_eq!(texts, 3);
        assert_cancelled(&seen, 2);
    }

    #[test]
    fn a_guest_answering_garbage_is_told_to_stop_not_only_forgotten() {
        let garbage = |kind: u32, payload: Vec<u8>| {
            let events = vec![ferry_api::StreamEvent { kind, payload }];
            let chunk = StreamChunk {
                from: 0,
                events,
                end: StreamEnd::Open,
            };
            serde_json::to_string(&chunk).unwrap()
        };
        let token = Event::Token {
            id: 1,
            text: "la".into(),
        };
        for (tag, read) in [
            (
                "garbage-event",
                garbage(serve::kind::EVENT, vec![0xff, 1, 2]),
            ),
            (
                "garbage-kind",
                garbage(serve::kind::REQUEST, token.encode()),
            ),
        ] {
            let scratch = crate::tests::ScratchCenter::open(tag);
            let answers = [read, "{}".into(), "{}".into()].map(|a| ("200 OK", a));
            let (addr, requests) = fake_host(answers.to_vec());
            let mut record = scratch.report("b", addr);
            let (tx, mut rx) = mpsc::channel(4);
            let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
            // The client hears of it (here, or through the relay's error) and nothing else.
            let e = match read {
                Err(e) => e,
                Ok(()) => match rx.try_recv() {
                    Ok(Relayed::Failed(e)) => e,
                    other => panic!("{tag}: {other:?}"),
                },
            };
            assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{tag}: {}", e.body());
            assert!(rx.try_recv().is_err(), "{tag}");
            drop(tx);
            assert_cancelled(&requests.join().unwrap(), 1);
        }
    }

    #[test]
    fn a_long_tokens_pieces_count_in_bytes_not_in_events() {
        // A token's text of 9 KiB in 30 pieces of 300 bytes, between short tokens: the
        // pieces do not use up the events of an answer of 2 tokens (12).
        let short = Event::Token {
            id: 1,
            text: "la".into(),
        };
        let piece = Event::Token {
            id: serve::NO_TOKEN,
            text: "a".repeat(300),
        };
        let reads = vec![
            chunk(&short, 1),
            chunk_from(1, &piece, 30),
            chunk_from(31, &short, 20),
        ];
        let (e, texts, _) = read_endless("long-token", reads, 2);
        assert_eq!(e.code, "upstream_error", "{}", e.body());
        assert_eq!(texts, 1 + 30 + 11);
    }

    #[test]
    fn a_guest_sending_more_text_than_an_answer_holds_is_cut_off() {
        // Few tokens, each of 600 KiB: the seventh goes past the 4 MiB an answer holds.
        let token = Event::Token {
            id: 1,
            text: "a".repeat(600 << 10),
        };
        let reads = (0..7).map(|from| chunk_from(from, &token, 1)).collect();
        let (e, texts, seen) = read_endless("endless-text", reads, MAX_TOKENS);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{}", e.body());
        assert_eq!(texts, 6);
        assert!(
            seen[7].starts_with("POST /v1/vms/v/streams/9/signal "),
            "{seen:?}"
        );
    }

    #[test]
    fn a_short_answer_is_held_to_its_tokens_worth_of_text() {
        // 16 tokens (and 8 more) of 1 KiB: 8 texts of 3,000 bytes fit, a ninth does not;
        // without the per-token bound it would take up to 4 MiB.
        let mut bound = AnswerBound::new(16);
        let text = "a".repeat(3000);
        assert!((0..8).all(|_| bound.take(&text)));
        assert!(!bound.take(&text));
        // Many tokens keep the whole answer's bound.
        let mut bound = AnswerBound::new(MAX_TOKENS);
        let piece = "a".repeat(1 << 20);
        assert!((0..4).all(|_| bound.take(&piece)));
        assert!(!bound.take("a"));
    }

    #[test]
    fn a_read_refused_for_good_fails_at_once_not_after_the_patience() {
        let beyond = r#"{"error":"stream 9 has no response 7 yet","code":"bad_request"}"#;
        let reads = vec![("400 Bad Request", beyond.to_string()); 3];
        let scratch = crate::tests::ScratchCenter::open("read-refused");
        let (addr, requests) = fake_host(reads);
        let mut record = scratch.report("b", addr);
        let (tx, _rx) = mpsc::channel(4);
        let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
        let e = read.unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_GATEWAY, "{}", e.body());
        assert_eq!(e.code, "upstream_error");
        let seen = requests.join().unwrap();
        // One read, then the generation told to stop and the stream let go: not one read
        // after another until the patience ran out.
        assert!(seen[0].starts_with("GET /v1/vms/v/streams/9?"), "{seen:?}");
        assert_cancelled(&seen, 1);
    }

    #[test]
    fn an_answer_cancelled_by_another_hand_reaches_the_client_as_an_error() {
        let scratch = crate::tests::ScratchCenter::open("cancelled-answer");
        let token = Event::Token {
            id: 1,
            text: "la".into(),
        };
        let cancelled = Event::Done {
            reason: FinishReason::Cancelled,
            prompt_tokens: 3,
            completion_tokens: 1,
        };
        let (addr, requests) = fake_host(vec![
            ("200 OK", chunk(&token, 1)),
            ("200 OK", chunk_from(1, &cancelled, 1)),
            ("200 OK", "{}".to_string()),
        ]);
        let mut record = scratch.report("b", addr);
        let (tx, mut rx) = mpsc::channel(4);
        let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
        assert!(read.is_ok(), "{:?}", read.err().map(|e| e.body()));
        assert!(matches!(rx.try_recv(), Ok(Relayed::Text(_))));
        // Not a finished answer ("stop", 200): cut short, the client is told so.
        match rx.try_recv() {
            Ok(Relayed::Failed(e)) => assert_eq!(e.code, "upstream_error", "{}", e.body()),
            _ => panic!("a cancelled answer was not relayed as an error"),
        }
        let seen = requests.join().unwrap();
        assert!(
            seen[2].starts_with("DELETE /v1/vms/v/streams/9"),
            "{seen:?}"
        );
    }

    #[test]
    fn a_host_refusing_the_centers_connections_for_a_moment_is_asked_again() {
        let scratch = crate::tests::ScratchCenter::open("too-many-connections");
        let refused = json!({"error": "too many connections", "code": TOO_MANY_CONNECTIONS});
        let refused = ("429 Too Many Requests", refused.to_string());
        let done = Event::Done {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 0,
        };
        // The submit refused once, then queued; the read refused once, then answered;
        // the release refused once, then done.
        let (addr, requests) = fake_host(vec![
            refused.clone(),
            ("200 OK", "{}".to_string()),
            refused.clone(),
            ("200 OK", chunk(&done, 1)),
            refused,
            ("200 OK", "{}".to_string()),
        ]);
        let mut record = scratch.report("b", addr);
        let (tx, mut rx) = mpsc::channel(4);
        let started = Instant::now();
        let submitted = scratch.center.submit("v", &mut record, &request_9(), &tx);
        assert!(submitted.is_ok(), "{:?}", submitted.err().map(|e| e.body()));
        let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
        assert!(read.is_ok(), "{:?}", read.err().map(|e| e.body()));
        assert!(matches!(rx.try_recv(), Ok(Relayed::Done { .. })));
        // Each asked again after the longest pause: a quick try would find it full.
        let took = started.elapsed();
        assert!(took >= RETRY_PAUSE_MAX * 3, "{took:?}");
        let seen = requests.join().unwrap();
        let asked: Vec<_> = seen
            .iter()
            .map(|r| r.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            asked,
            [
                "POST /v1/vms/v/streams",
                "POST /v1/vms/v/streams",
                "GET /v1/vms/v/streams/9?from=0&wait_ms=1000",
                "GET /v1/vms/v/streams/9?from=0&wait_ms=1000",
                "DELETE /v1/vms/v/streams/9",
                "DELETE /v1/vms/v/streams/9",
            ],
            "{seen:?}"
        );
    }

    #[test]
    fn a_cancel_refused_for_a_moment_is_asked_again_of_the_same_host() {
        let scratch = crate::tests::ScratchCenter::open("cancel-too-many");
        let refused = json!({"error": "too many connections", "code": TOO_MANY_CONNECTIONS});
        let (b, b_requests) = fake_host(vec![
            ("429 Too Many Requests", refused.to_string()),
            ("200 OK", "{}".to_string()),
            ("200 OK", "{}".to_string()),
        ]);
        let record = scratch.report("b", b);
        // The inventory has v on host c (a heartbeat ahead of what the relay saw): the
        // refusal is b's, about its connections, not a sign that v is elsewhere.
        let c = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let running = crate::inventory::tests::vm("v", VmState::Running);
        let mut beat = crate::inventory::tests::beat("c", vec![running]);
        beat.api_url = format!("http://{}", c.local_addr().unwrap());
        beat.host.migration_addr = "c.example:7071".into();
        scratch.center.heartbeat(beat).unwrap();
        scratch
            .center
            .cancel("v", &record, 9, "the client went away");
        let seen = b_requests.join().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[0].starts_with("POST /v1/vms/v/streams/9/signal "),
            "{seen:?}"
        );
        assert_cancelled(&seen, 1);
        c.set_nonblocking(true).unwrap();
        assert!(c.accept().is_err(), "host c was asked");
    }

    #[test]
    fn a_host_answering_nothing_at_once_is_not_asked_in_a_tight_loop() {
        let scratch = crate::tests::ScratchCenter::open("instant-empty");
        let done = Event::Done {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 0,
        };
        let empty = r#"{"from":0,"events":[],"end":"open"}"#.to_string();
        let mut answers = vec![("200 OK", empty); 50];
        answers.extend([("200 OK", chunk(&done, 1)), ("200 OK", "{}".into())]);
        let (addr, requests) = fake_host(answers);
        let mut record = scratch.report("b", addr);
        let (tx, mut rx) = mpsc::channel(4);
        let started = Instant::now();
        let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
        assert!(read.is_ok(), "{:?}", read.err().map(|e| e.body()));
        assert!(matches!(rx.try_recv(), Ok(Relayed::Done { .. })));
        // The pauses between tries grow with the silence, from 2 ms: 50 instant answers
        // take most of a second (not a few milliseconds).
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert_eq!(requests.join().unwrap().len(), 52);
    }

    #[test]
    fn a_cancel_follows_the_vm_to_where_it_moved() {
        let scratch = crate::tests::ScratchCenter::open("cancel-moved");
        let away = VmState::MigratedAway {
            to: "c.example:7071".into(),
        };
        let info = serde_json::to_string(&crate::inventory::tests::vm("v", away)).unwrap();
        let migrated = r#"{"error":"VM v migrated","code":"migrated"}"#.to_string();
        let (b, b_requests) = fake_host(vec![("409 Conflict", migrated), ("200 OK", info)]);
        let (c, c_requests) = fake_host(vec![("200 OK", "{}".into()), ("200 OK", "{}".into())]);
        let record = scratch.report("b", b);
        scratch.report("c", c);
        scratch
            .center
            .cancel("v", &record, 9, "the client went away");
        let seen = c_requests.join().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_cancelled(&seen, 0);
        let seen = b_requests.join().unwrap();
        assert!(seen[1].starts_with("GET /v1/vms/v "), "{seen:?}");
    }

    #[test]
    fn a_relay_follows_a_moved_vm_to_the_host_up_at_its_address_not_a_record_left_behind() {
        let scratch = crate::tests::ScratchCenter::open("follow-up");
        // A record left by a machine replaced since: the same address, down.
        let mut old = crate::inventory::tests::beat("a-old", Vec::new());
        old.host.migration_addr = "b.example:7071".into();
        scratch.center.heartbeat(old).unwrap();
        scratch.silence("a-old");
        scratch.report("b", ferry_testdata::refusing_addr());
        let away = VmState::MigratedAway {
            to: "b.example:7071".into(),
        };
        let info = serde_json::to_string(&crate::inventory::tests::vm("v", away)).unwrap();
        let (s, _) = fake_host(vec![("200 OK", info)]);
        let source = scratch.report("s", s);
        let followed = scratch.center.follow("v", &source).unwrap();
        assert_eq!(followed.name, "b");
    }

    #[test]
    fn a_model_whose_source_reports_it_moved_before_its_destination_does_is_still_served() {
        let scratch = crate::tests::ScratchCenter::open("moved-model");
        let serving = |state: VmState| {
            let mut vm = crate::inventory::tests::vm("v", state);
            vm.workload = SERVING_WORKLOAD.into();
            vm.name = Some("chat".into());
            vm
        };
        let beat = |state: VmState| {
            let beat = crate::inventory::tests::beat("b", vec![serving(state)]);
            scratch.center.heartbeat(beat).unwrap();
        };
        beat(VmState::Running);
        assert_eq!(scratch.center.serving_vm("chat").unwrap(), "v");
        // Host b has let it go to a host no one has heard of: not served.
        beat(VmState::MigratedAway {
            to: "c.example:7071".into(),
        });
        let state = scratch.center.inventory().vms()["v"].info.state.clone();
        assert!(matches!(state, VmState::MigratedAway { .. }), "{state:?}");
        assert!(scratch.center.serving_vm("chat").is_err());
        // Host c is up, and has not said it runs it yet: served (the relay follows it).
        scratch.report("c", ferry_testdata::refusing_addr());
        assert_eq!(scratch.center.serving_vm("chat").unwrap(), "v");
        assert_eq!(scratch.center.serving_vm("v").unwrap(), "v");
        // Not a VM that ended.
        beat(VmState::Running);
        beat(VmState::Stopped);
        assert!(scratch.center.serving_vm("chat").is_err());
    }

    /// A serving VM `id` named `name`, running.
    fn serving_vm_named(id: &str, name: Option<&str>) -> ferry_api::VmInfo {
        let mut vm = crate::inventory::tests::vm(id, VmState::Running);
        vm.workload = SERVING_WORKLOAD.into();
        vm.name = name.map(str::to_string);
        vm
    }

    #[test]
    fn a_model_name_two_vms_share_is_a_bad_request_not_a_conflict_clients_retry() {
        let scratch = crate::tests::ScratchCenter::open("ambiguous-model");
        let vms = vec![
            serving_vm_named("h-vm1", Some("chat")),
            serving_vm_named("h-vm2", Some("chat")),
        ];
        let beat = crate::inventory::tests::beat("h", vms);
        scratch.center.heartbeat(beat).unwrap();
        let e = scratch.center.serving_vm("chat").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], "model_ambiguous", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("name one by its id"), "{message}");
        // Each is still served by its id.
        assert_eq!(scratch.center.serving_vm("h-vm2").unwrap(), "h-vm2");
    }

    #[test]
    fn a_vm_named_as_another_vms_id_is_listed_under_its_own_id_and_served_there() {
        let scratch = crate::tests::ScratchCenter::open("name-is-an-id");
        let vms = vec![
            serving_vm_named("h-vm1", None),
            serving_vm_named("h-vm2", Some("h-vm1")),
        ];
        let beat = crate::inventory::tests::beat("h", vms);
        scratch.center.heartbeat(beat).unwrap();
        let listed: Vec<(String, String)> = (scratch.center.models_listed().iter())
            .map(|m| {
                (
                    m["id"].as_str().unwrap().into(),
                    m["vm"].as_str().unwrap().into(),
                )
            })
            .collect();
        let mut ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 2, "one model listed twice: {listed:?}");
        for (model, vm) in &listed {
            assert_eq!(&scratch.center.serving_vm(model).unwrap(), vm, "{listed:?}");
        }
    }

    #[test]
    fn a_model_out_of_reach_is_reported_without_its_hosts_address() {
        let scratch = crate::tests::ScratchCenter::open("out-of-reach");
        let addr = ferry_testdata::refusing_addr();
        let mut record = scratch.report("b", addr);
        let message = ChannelMessage {
            stream: 9,
            kind: serve::kind::REQUEST,
            payload: b"{}".to_vec(),
        };
        let (tx, _rx) = mpsc::channel(4);
        let e = scratch
            .center
            .submit("v", &mut record, &message, &tx)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = e.body().to_string();
        assert!(!body.contains(&addr.ip().to_string()), "{body}");
        assert!(!body.contains(&addr.to_string()), "{body}");
    }

    #[tokio::test]
    async fn bodies_in_hand_are_bounded_in_bytes_and_held_until_let_go() {
        // A budget of 3 KiB: a body of 2.5 KiB takes 3, a second finds none.
        let bodies = Arc::new(Semaphore::new(3));
        let (got, held) = read_body(&bodies, Body::from(vec![b' '; 2560]))
            .await
            .unwrap();
        assert_eq!(
            (got.len(), held.as_ref().map(|p| p.num_permits())),
            (2560, Some(3))
        );
        let refused = read_body(&bodies, Body::from(vec![b' '; 10]))
            .await
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.into_response().headers().contains_key(RETRY_AFTER));
        // Let go (parsed), its KiB are free again; a body read in pieces takes them as
        // they come.
        drop(held);
        let pieces = futures_util::stream::iter(
            [vec![b' '; 1000], vec![b' '; 1000], vec![b' '; 1000]].map(Ok::<_, std::io::Error>),
        );
        let (got, held) = read_body(&bodies, Body::from_stream(pieces)).await.unwrap();
        assert_eq!((got.len(), held.map(|p| p.num_permits())), (3000, Some(3)));
        assert_eq!(bodies.available_permits(), 3);
    }

    #[test]
    fn a_body_too_large_a_wrong_method_an_unserved_endpoint_and_a_huge_model_name_are_refused_in_openais_shape(
    ) {
        let scratch = crate::tests::ScratchCenter::open("serving-refusals");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let router = crate::api::router(scratch.center.clone()).unwrap();
        let _serving = ferry_http::spawn(runtime.handle(), listener, router, None, "center API");
        // A connection of its own per request: refused ones are answered without their
        // bodies read, and their connection closed once the answer is out, which a pooled
        // connection's next request could find (a failure once in CI, under load).
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .build()
            .new_agent();
        let error = |mut answer: ureq::http::Response<ureq::Body>| {
            let v: Value =
                serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
            (answer.status().as_u16(), v["error"]["code"].clone())
        };
        // Far under axum's 2 MiB, but more than any request can be. Asked in-process:
        // over a socket, the refusal races the sending of the body's rest, and the close
        // may come first.
        let request = axum::http::Request::post("/v1/chat/completions")
            .header("Authorization", "Bearer operator")
            .body(Body::from(" ".repeat(MAX_BODY_BYTES + 1)))
            .unwrap();
        let in_process = crate::api::router(scratch.center.clone()).unwrap();
        let answer = runtime
            .block_on(tower::ServiceExt::oneshot(in_process, request))
            .unwrap();
        let status = answer.status().as_u16();
        let body = runtime
            .block_on(axum::body::to_bytes(answer.into_body(), 1 << 20))
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, &v["error"]["code"]),
            (413, &json!("request_too_large"))
        );
        let answer = agent
            .get(&url)
            .header("Authorization", "Bearer operator")
            .call()
            .unwrap();
        assert_eq!(error(answer), (405, json!("method_not_allowed")));
        // One of OpenAI's endpoints the gateway does not serve: its shape, naming what
        // is served; any other unknown path keeps the operators' API's shape.
        let base = url.trim_end_matches("/v1/chat/completions");
        let mut answer = agent
            .post(format!("{base}/v1/embeddings"))
            .header("Authorization", "Bearer operator")
            .send_json(json!({"model": "m", "input": "hi"}))
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let v: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(v["error"]["code"], json!("not_found"), "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("/v1/embeddings is not served here"),
            "{message}"
        );
        assert!(message.contains("POST /v1/chat/completions"), "{message}");
        // A client whose base URL lacks /v1 is told so.
        let mut answer = agent
            .post(format!("{base}/chat/completions"))
            .header("Authorization", "Bearer operator")
            .send_json(json!({"model": "m", "messages": []}))
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let v: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("base URL should end with /v1"),
            "{message}"
        );
        let mut answer = agent.get(format!("{base}/v1/nothing")).call().unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let v: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        assert!(v["error"].is_string(), "{v}");
        // A model's name of 100 KB, quoted in the refusal: cut short, so the answer keeps
        // its code (one longer than the error rewriting reads came as "not_found").
        let model = "m".repeat(100 << 10);
        let request = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let mut answer = agent
            .post(&url)
            .header("Authorization", "Bearer operator")
            .send_json(&request)
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let v: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(v["error"]["code"], json!("model_not_found"), "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.len() <= MAX_MESSAGE_BYTES && message.ends_with('…'),
            "{message}"
        );
    }

    #[tokio::test]
    async fn whole_answers_in_hand_are_bounded_and_held_until_their_client_has_them() {
        let answers = Arc::new(Semaphore::new(3));
        let mut held = None;
        assert!(hold_kib(&answers, &mut held, 2000).is_some());
        assert_eq!(answers.available_permits(), 1, "2 KiB started");
        assert!(hold_kib(&answers, &mut held, 3000).is_some());
        assert!(
            hold_kib(&answers, &mut held, 3073).is_none(),
            "past the bound"
        );
        assert_eq!(answers.available_permits(), 0);
        let response = held_body(br#"{"a":1}"#.to_vec(), held);
        assert_eq!(response.headers()[CONTENT_LENGTH], "7");
        assert_eq!(answers.available_permits(), 0, "held while unread");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"a":1}"#);
        assert_eq!(answers.available_permits(), 3, "let go once read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_client_that_stops_reading_lets_its_relay_go() {
        let (tx, rx) = mpsc::channel(4);
        let response = chat_shape().stream(None, rx, false);
        // The client keeps its connection, and reads nothing.
        let unread = response.into_body();
        let relay = async { while tx.send(Relayed::Text("la".into())).await.is_ok() {} };
        // The relay's sends fail once the client has taken nothing for a while (it then
        // cancels the generation), however long the answer.
        let let_go = tokio::time::timeout(CLIENT_STALL * 10, relay).await;
        assert!(let_go.is_ok(), "the relay is held for ever");
        // What was sent is there, and then the body fails: a client must not take the
        // answer cut off for a whole one (hyper aborts the connection).
        let read = axum::body::to_bytes(unread, usize::MAX).await;
        let error = read.expect_err("the body of a stalled stream ends as a whole one");
        assert!(format!("{error:?}").contains("read nothing"), "{error:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_client_that_reads_a_chunk_a_minute_lets_its_relay_go_in_minutes() {
        let (tx, rx) = mpsc::channel(4);
        let response = chat_shape().stream(None, rx, false);
        // The client takes one chunk every 50 s: never stalled for 60 s, but at that pace
        // a long answer would hold the relay for days.
        let mut body = response.into_body().into_data_stream();
        let reader = tokio::spawn(async move {
            loop {
                match body.next().await {
                    Some(Ok(_)) => tokio::time::sleep(Duration::from_secs(50)).await,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        });
        let relay = async { while tx.send(Relayed::Text("la".into())).await.is_ok() {} };
        let began = tokio::time::Instant::now();
        // Not only for ever: within minutes.
        let let_go = tokio::time::timeout(Duration::from_secs(600), relay).await;
        assert!(let_go.is_ok(), "the relay is held past ten minutes");
        // By its budget, not a stall (it never stopped reading for 60 s).
        assert!(began.elapsed() >= CLIENT_BEHIND, "{:?}", began.elapsed());
        let error = reader.await.unwrap().expect("the body ends in an error");
        assert!(format!("{error:?}").contains("300 s in all"), "{error:?}");
    }

    /// The whole body of a chat stream that starts with "hi" and goes on with what `rx`
    /// brings (`with_usage`: a usage chunk asked for), and its chunks but `[DONE]`.
    async fn streamed(rx: mpsc::Receiver<Relayed>, with_usage: bool) -> (String, Vec<Value>) {
        let response = chat_shape().stream(Some(Relayed::Text("hi".into())), rx, with_usage);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let chunks = (text.lines())
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|l| *l != "[DONE]")
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (text, chunks)
    }

    #[tokio::test]
    async fn a_stream_whose_relay_ends_without_its_end_says_so() {
        let (tx, rx) = mpsc::channel(4);
        // The relay's thread ends (a panic) with no final message.
        drop(tx);
        let (text, chunks) = streamed(rx, false).await;
        let last = chunks.last().unwrap();
        assert_eq!(last["error"]["code"], "relay_failed", "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[test]
    fn a_request_queued_whose_answer_was_lost_is_not_queued_again_nor_failed() {
        let scratch = crate::tests::ScratchCenter::open("lost-submit");
        // Host b queues the request but its answer is lost; asked again, it says the
        // stream is there.
        let exists = r#"{"error":"VM v: stream 9 exists","code":"stream_exists"}"#;
        let (addr, requests) = fake_host(vec![
            Reply::Nothing,
            Reply::Json("409 Conflict", exists.into()),
        ]);
        let mut record = scratch.report("b", addr);
        let message = ChannelMessage {
            stream: 9,
            kind: serve::kind::REQUEST,
            payload: b"{}".to_vec(),
        };
        let (tx, _rx) = mpsc::channel(4);
        let submitted = scratch.center.submit("v", &mut record, &message, &tx);
        assert!(submitted.is_ok(), "{:?}", submitted.err().map(|e| e.body()));
        let seen = requests.join().unwrap();
        assert!(
            seen.iter()
                .all(|r| r.starts_with("POST /v1/vms/v/streams ")),
            "{seen:?}"
        );
    }

    /// A request for VM `v` on stream 9.
    fn request_9() -> ChannelMessage {
        ChannelMessage {
            stream: 9,
            kind: serve::kind::REQUEST,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_request_whose_client_left_while_it_was_being_queued_is_given_up_and_cancelled() {
        let scratch = crate::tests::ScratchCenter::open("left-submit");
        // Host b may have queued it (its answer is lost), then pauses the VM: the relay
        // would try again until its patience ran out.
        let unavailable = r#"{"error":"VM v is pausing","code":"unavailable"}"#;
        let (tx, rx) = mpsc::channel(4);
        // The client leaves during the second try.
        let (addr, requests) = fake_host(vec![
            Reply::Nothing,
            Reply::After(
                Box::new(move || drop(rx)),
                "503 Service Unavailable",
                unavailable.into(),
            ),
            Reply::Json("200 OK", "{}".into()),
            Reply::Json("200 OK", "{}".into()),
        ]);
        let mut record = scratch.report("b", addr);
        let submitted = scratch.center.submit("v", &mut record, &request_9(), &tx);
        assert!(submitted.is_err());
        let seen = requests.join().unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(
            seen[..2]
                .iter()
                .all(|r| r.starts_with("POST /v1/vms/v/streams ")),
            "{seen:?}"
        );
        assert_cancelled(&seen, 2);
    }

    #[test]
    fn a_request_that_may_be_queued_and_then_is_refused_is_cancelled() {
        let scratch = crate::tests::ScratchCenter::open("refused-submit");
        // Host b may have queued it (its answer is lost); asked again, it refuses with an
        // error the relay does not follow: the first try must not generate for nobody.
        let refused = r#"{"error":"VM v: no","code":"bad_request"}"#;
        let (addr, requests) = fake_host(vec![
            Reply::Nothing,
            Reply::Json("400 Bad Request", refused.into()),
            Reply::Json("200 OK", "{}".into()),
            Reply::Json("200 OK", "{}".into()),
        ]);
        let mut record = scratch.report("b", addr);
        let (tx, _rx) = mpsc::channel(4);
        let submitted = scratch.center.submit("v", &mut record, &request_9(), &tx);
        let error = submitted.expect_err("a refused request was taken as queued");
        assert_eq!(error.body()["error"]["code"], "upstream_error");
        let seen = requests.join().unwrap();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_cancelled(&seen, 2);
    }

    #[test]
    fn a_request_refused_at_its_first_try_is_not_cancelled() {
        let scratch = crate::tests::ScratchCenter::open("refused-first");
        // Refused outright: nothing was queued, and stream 9 (if any) is not this one's.
        let refused = r#"{"error":"VM v: no","code":"bad_request"}"#;
        let (addr, requests) = fake_host(vec![Reply::Json("400 Bad Request", refused.into())]);
        let mut record = scratch.report("b", addr);
        let (tx, _rx) = mpsc::channel(4);
        assert!(scratch
            .center
            .submit("v", &mut record, &request_9(), &tx)
            .is_err());
        assert_eq!(requests.join().unwrap().len(), 1);
    }

    /// Host b, whose API takes connections (its backlog does) and says nothing: its
    /// listener and its record.
    fn silent_host_b(scratch: &crate::tests::ScratchCenter) -> (std::net::TcpListener, HostRecord) {
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let record = scratch.report("b", host.local_addr().unwrap());
        (host, record)
    }

    #[test]
    fn a_request_whose_client_left_before_it_was_queued_is_sent_to_no_host() {
        let scratch = crate::tests::ScratchCenter::open("left-before-submit");
        let (host, mut record) = silent_host_b(&scratch);
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let submitted = scratch.center.submit("v", &mut record, &request_9(), &tx);
        assert!(submitted.is_err());
        host.set_nonblocking(true).unwrap();
        let connected = host.accept();
        assert!(connected.is_err(), "the host was asked: {connected:?}");
    }

    #[test]
    fn a_host_that_takes_requests_and_never_answers_holds_a_relay_only_a_few_call_times() {
        let scratch = crate::tests::ScratchCenter::open("hanging-host");
        let (host, mut record) = silent_host_b(&scratch);
        let (tx, _rx) = mpsc::channel(4);
        let started = Instant::now();
        let submitted = scratch.center.submit("v", &mut record, &request_9(), &tx);
        let e = submitted.expect_err("a host answering nothing queued it");
        assert_eq!(e.code, "model_unavailable", "{}", e.body());
        // A submit, its cancel and its release, each given up after [`HOST_CALL_TIME`]:
        // not after the client's usual minute each.
        let took = started.elapsed();
        assert!(took >= HOST_CALL_TIME * 3, "{took:?}");
        assert!(
            took < HOST_CALL_TIME * 3 + PATIENCE + Duration::from_secs(5),
            "{took:?}"
        );
        drop(host);
    }

    #[test]
    fn a_request_larger_than_a_channel_slot_is_refused_before_any_host_is_asked() {
        let scratch = crate::tests::ScratchCenter::open("large-request");
        let (tx, mut rx) = mpsc::channel(4);
        let payload = vec![0; serve::MAX_REQUEST_BYTES + 1];
        scratch.center.relay("v", 9, payload, 16, &tx);
        let Ok(Relayed::Failed(e)) = rx.try_recv() else {
            panic!("not refused");
        };
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.body().to_string().contains("context_length_exceeded"));
    }

    #[test]
    fn a_queued_request_long_silent_rides_out_a_switchover() {
        let scratch = crate::tests::ScratchCenter::open("queued-switchover");
        let done = serve::Event::Done {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 0,
        };
        let finished = serde_json::to_string(&StreamChunk {
            from: 0,
            events: vec![ferry_api::StreamEvent {
                kind: serve::kind::EVENT,
                payload: done.encode(),
            }],
            end: StreamEnd::Final,
        })
        .unwrap();
        // Host b: the request waits in the guest's queue longer than the relay's
        // patience, then the VM pauses for a switchover once, then the answer comes.
        let (addr, requests) = fake_host(vec![
            Reply::Late(
                PATIENCE * 2,
                "200 OK",
                r#"{"from":0,"events":[],"end":"open"}"#.to_string(),
            ),
            Reply::Json(
                "503 Service Unavailable",
                r#"{"error":"VM v is pausing","code":"unavailable"}"#.into(),
            ),
            Reply::Json("200 OK", finished),
            Reply::Json("200 OK", "{}".into()),
        ]);
        let mut record = scratch.report("b", addr);
        let (tx, mut rx) = mpsc::channel(4);
        let read = scratch.center.read_back("v", &mut record, 9, 16, &tx);
        assert!(read.is_ok(), "{:?}", read.err().map(|e| e.body()));
        assert!(matches!(rx.try_recv(), Ok(Relayed::Done { .. })));
        let seen = requests.join().unwrap();
        assert!(
            seen[3].starts_with("DELETE /v1/vms/v/streams/9 "),
            "{seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_for_its_first_token_starts_and_keeps_its_connection_alive() {
        let (tx, rx) = mpsc::channel(4);
        let response = chat_shape().stream(None, rx, false);
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body().into_data_stream();
        let opening = body.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&opening)
            .unwrap()
            .contains("\"role\":\"assistant\""));
        // Nothing from the model for a while: a comment line, twice.
        for _ in 0..2 {
            let started = tokio::time::Instant::now();
            assert_eq!(&body.next().await.unwrap().unwrap()[..], b": waiting\n\n");
            assert!(started.elapsed() >= KEEPALIVE);
        }
        tx.send(Relayed::Text("hi".into())).await.unwrap();
        let first = body.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&first).unwrap().contains("\"hi\""));
    }

    #[tokio::test]
    async fn a_chat_stream_names_the_assistant_once_first() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Relayed::Text(" there".into())).await.unwrap();
        tx.send(Relayed::Done {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 2,
        })
        .await
        .unwrap();
        drop(tx);
        let (text, chunks) = streamed(rx, false).await;
        let deltas: Vec<Value> = (chunks.iter())
            .map(|c| c["choices"][0]["delta"].clone())
            .collect();
        assert_eq!(
            deltas[0],
            json!({"role": "assistant", "content": ""}),
            "{text}"
        );
        assert_eq!(deltas[1], json!({"content": "hi"}), "{text}");
        assert_eq!(deltas[2], json!({"content": " there"}), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[tokio::test]
    async fn a_stream_with_usage_ends_with_it_and_says_null_on_every_other_chunk() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Relayed::Done {
            reason: FinishReason::Length,
            prompt_tokens: 3,
            completion_tokens: 1,
        })
        .await
        .unwrap();
        drop(tx);
        let (text, chunks) = streamed(rx, true).await;
        let (usage, others) = chunks.split_last().unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 4, "{text}");
        assert_eq!(usage["choices"], json!([]), "{text}");
        assert_eq!(others.len(), 3, "{text}");
        for chunk in others {
            assert_eq!(chunk.get("usage"), Some(&Value::Null), "{text}");
        }
        assert_eq!(others[2]["choices"][0]["finish_reason"], "length", "{text}");
    }

    #[test]
    fn top_p_0_negative_seeds_and_no_max_tokens_are_taken_as_openai_takes_them() {
        let request = |extra: Value| {
            let mut body = json!({"model": "m", "prompt": "Once"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let req: CompletionRequest = parse(&Bytes::from(body.to_string()), "prompt")?;
            req.sampling
                .request(Endpoint::Completion, PromptKind::Raw, Vec::new())
        };
        assert_eq!(request(json!({"top_p": 0})).unwrap().top_p, 0.0);
        // As OpenAI's: 16 tokens unless asked for more (a chat: what the context leaves).
        assert_eq!(request(json!({})).unwrap().max_tokens, 16);
        assert_eq!(request(json!({"max_tokens": 100})).unwrap().max_tokens, 100);
        // Only a max_tokens the client set is refused past what the context leaves.
        assert!(!request(json!({})).unwrap().max_tokens_asked);
        assert!(
            request(json!({"max_completion_tokens": 9}))
                .unwrap()
                .max_tokens_asked
        );
        let options = json!({"stream_options": {"include_usage": true}});
        let err = request(options).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("stream_options"),
            "{}",
            err.message
        );
        let streamed = json!({"stream": true, "stream_options": {"include_usage": true}});
        assert!(request(streamed).is_ok());
        for field in ["max_tokens", "max_completion_tokens"] {
            for value in [0, MAX_TOKENS + 1] {
                let err = request(json!({ field: value })).unwrap_err();
                assert_eq!(err.param.as_deref(), Some(field), "{}", err.message);
                assert!(err.message.starts_with(field), "{}", err.message);
            }
        }
        let chat: ChatRequest = parse(
            &Bytes::from(json!({"model": "m", "messages": []}).to_string()),
            "messages",
        )
        .unwrap();
        let chat = chat
            .sampling
            .request(Endpoint::Chat, PromptKind::Chat, Vec::new());
        assert_eq!(chat.unwrap().max_tokens, MAX_TOKENS);
        let seed = |s: Value| request(json!({ "seed": s })).unwrap().seed;
        assert_eq!(seed(json!(-1)), u64::MAX);
        assert_eq!(seed(json!(7)), 7);
        assert_eq!(seed(json!(u64::MAX)), u64::MAX);
        assert_ne!(seed(json!(-2)), seed(json!(2)));
        for value in [json!(-0.1), json!(1.5)] {
            let err = request(json!({ "top_p": value })).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("top_p"), "{value}");
        }
        let err = request(json!({"seed": 1.5})).unwrap_err();
        let message = &err.message;
        assert!(message.contains("whole number for the seed"), "{message}");
    }

    #[test]
    fn fields_asking_for_nothing_pass_and_those_asking_for_something_unsupported_do_not() {
        // What langchain_openai's OpenAI (completions) sends, with a one-prompt list.
        let langchain = json!({
            "model": "m", "prompt": ["Once"], "max_tokens": 8, "temperature": 0.7,
            "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "n": 1,
            "logit_bias": {}, "seed": null, "logprobs": null, "stream": null,
            "user": "u", "metadata": {"k": "v"},
            "stream_options": {"include_usage": true, "include_obfuscation": false}
        });
        let req: CompletionRequest = parse(&Bytes::from(langchain.to_string()), "prompt").unwrap();
        assert_eq!(req.prompt.into_text().unwrap(), "Once");
        for (field, value) in [
            ("frequency_penalty", json!(0.5)),
            ("logprobs", json!(true)),
            ("tools", json!([{"type": "function"}])),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body[field] = value;
            let err = parse::<ChatRequest>(&Bytes::from(body.to_string()), "messages").unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{field}");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
        let err = parse::<CompletionRequest>(
            &Bytes::from(r#"{"model": "m", "prompt": "a", "logprobs": 0}"#),
            "prompt",
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("logprobs"));
        let chat = r#"{"model": "m", "messages": [], "logprobs": false}"#;
        assert!(parse::<ChatRequest>(&Bytes::from(chat), "messages").is_ok());
        let err = parse::<ChatRequest>(
            &Bytes::from(r#"{"model": "m", "messages": [], "frequency_penalty_x": 0}"#),
            "messages",
        )
        .unwrap_err();
        assert!(err.message.contains("unknown field"), "{}", err.message);
        assert_eq!(err.param.as_deref(), Some("frequency_penalty_x"));
        let long = "x".repeat(100_000);
        let body = json!({"model": "m", "messages": [], long.as_str(): 0});
        let err = parse::<ChatRequest>(&Bytes::from(body.to_string()), "messages").unwrap_err();
        assert!(err.param.is_some_and(|p| p.len() <= MAX_PARAM_BYTES));
        // OpenAI's newer fields, as clients that send every field they know send them
        // (null), ask for nothing; asking for something is refused by name.
        let nulls = json!({"model": "m", "messages": [], "reasoning_effort": null,
            "verbosity": null, "audio": null, "prediction": null, "web_search_options": null});
        assert!(parse::<ChatRequest>(&Bytes::from(nulls.to_string()), "messages").is_ok());
        for (field, value) in [
            ("reasoning_effort", json!("high")),
            ("verbosity", json!("low")),
            ("audio", json!({"voice": "alloy", "format": "wav"})),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body[field] = value;
            let err = parse::<ChatRequest>(&Bytes::from(body.to_string()), "messages").unwrap_err();
            assert_eq!(err.code, "unsupported_parameter", "{field}");
            assert_eq!(err.param.as_deref(), Some(field));
        }
        // A value of the wrong shape is named for what it is, not for a type of the code.
        for (body, field, says) in [
            (
                json!({"model": "m", "prompt": [1, 2]}),
                "prompt",
                "prompt must be",
            ),
            (
                json!({"model": "m", "prompt": "a", "stop": 3}),
                "stop",
                "stop must be",
            ),
        ] {
            let err =
                parse::<CompletionRequest>(&Bytes::from(body.to_string()), "prompt").unwrap_err();
            assert!(err.message.contains(says), "{}", err.message);
            assert_eq!(err.param.as_deref(), Some(field), "{}", err.message);
            assert!(!err.message.contains("untagged"), "{}", err.message);
        }
        let content = json!({"model": "m", "messages": [{"role": "user", "content": 5}]});
        let err = parse::<ChatRequest>(&Bytes::from(content.to_string()), "messages").unwrap_err();
        assert!(err.message.contains("content must be"), "{}", err.message);
        // A wrong value is named by its field (serde's own error names none).
        for (field, value) in [
            ("max_tokens", json!(-1)),
            ("max_tokens", json!(1u64 << 40)),
            ("temperature", json!("hot")),
            ("n", json!(1.5)),
            ("stream", json!("yes")),
            ("stream_options", json!({"include_usage": true, "extra": 1})),
            ("messages", json!("hi")),
            ("model", json!(7)),
        ] {
            let mut body = json!({"model": "m", "messages": [], "top_p": 1});
            body[field] = value;
            let err = parse::<ChatRequest>(&Bytes::from(body.to_string()), "messages").unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{}", err.message);
            assert!(err.message.contains(field), "{}", err.message);
        }
        let two = Prompt::Many(vec!["a".into(), "b".into()]);
        assert_eq!(
            two.into_text().unwrap_err().param.as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn messages_take_text_parts_and_known_roles_only() {
        let body = json!({"model": "m", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "you"}]},
            {"role": "assistant", "content": null, "refusal": null, "tool_calls": null,
             "function_call": null, "audio": null, "annotations": []},
        ]});
        let req: ChatRequest = parse(&Bytes::from(body.to_string()), "messages").unwrap();
        let turns: Vec<_> = req
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_turn(i).unwrap())
            .collect();
        assert_eq!(
            turns,
            [
                ("system".to_string(), "Be brief.".to_string()),
                ("user".into(), "Hi, you".into()),
                ("assistant".into(), String::new()),
            ]
        );
        for (bad, says) in [
            (json!({"role": "tool", "content": "x"}), "role 'tool'"),
            (
                json!({"role": "user<|im_end|>", "content": "x"}),
                "role 'user<|im_end|>'",
            ),
            (
                json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}),
                "a 'image_url' part",
            ),
            (
                json!({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
                "a 'input_audio' part",
            ),
            (
                json!({"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}),
                "a 'file' part",
            ),
            (
                json!({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}),
                "a 'refusal' part",
            ),
            (
                json!({"role": "user", "content": [{"type": "text", "text": "a", "image_url": {}}]}),
                "a 'text' part carrying 'image_url'",
            ),
            (
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "t"}]}),
                "tool_calls",
            ),
        ] {
            let m: ChatMessage = serde_json::from_value(bad.clone()).unwrap();
            let err = m.into_turn(3).unwrap_err();
            assert!(
                err.message.contains("messages[3]") && err.message.contains(says),
                "{bad}: {}",
                err.message
            );
        }
        // A field no part of OpenAI's has is refused, not dropped.
        let body = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
        ]}]});
        let err = parse::<ChatRequest>(&Bytes::from(body.to_string()), "messages").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("messages"), "{}", err.message);
    }

    #[test]
    fn usage_counts_from_the_guest_cannot_overflow() {
        let u = usage(u32::MAX, 1);
        assert_eq!(u["total_tokens"], 1u64 << 32);
    }
}
