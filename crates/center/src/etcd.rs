//! A small client of etcd's v3 API through its JSON gateway (`POST /v3/kv/range`, ...),
//! the calls the center's store and leader election make: range, put, delete,
//! transactions, and leases.
//!
//! The gateway is etcd's own documented HTTP face of the same v3 API. The `etcd-client`
//! crate speaks gRPC instead, and its build compiles etcd's protobuf files, which needs
//! `protoc` on every machine that builds Ferry; this needs nothing beyond the HTTP client
//! the center already has. Several endpoints may be given: a call that cannot reach one
//! tries the next.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Errors of etcd calls.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("no etcd endpoint answered ({endpoints}): {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last endpoint's failure.
        last: String,
    },
    /// etcd answered with an error (no quorum, a lease not found, ...).
    #[error("etcd refused {call}: {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// etcd's message.
        message: String,
    },
    /// A write may or may not have taken effect (its answer was lost).
    #[error("etcd {call}: the answer was lost; it may or may not have taken effect ({detail})")]
    Ambiguous {
        /// The call.
        call: &'static str,
        /// What was seen.
        detail: String,
    },
    /// etcd's answer was not what the v3 API describes.
    #[error("unexpected answer from etcd to {call}: {detail}")]
    Malformed {
        /// The call.
        call: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// Most bytes of keys and values a range read in pages holds: far past any cluster's
/// records, but a bound on what a broken or hostile server can make the center hold.
const MAX_RANGE_BYTES: usize = 4 << 30;

/// One key and its value.
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision that last changed it.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key was created at this revision (0: it does not exist).
    CreateRevision(String, i64),
    /// The key was last changed at this revision.
    ModRevision(String, i64),
}

/// A write in a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets a key, under a lease if given.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease the key dies with.
        lease: Option<i64>,
    },
    /// Deletes a key.
    Delete(String),
    /// Deletes every key from the first to just before the second.
    DeleteRange(String, String),
    /// Reads a key.
    Get(String),
}

/// What a transaction did.
#[derive(Debug)]
pub struct TxnOutcome {
    /// Whether every condition held (the success branch ran).
    pub succeeded: bool,
    /// Keys read by `Op::Get`s in the branch that ran.
    pub read: Vec<KeyValue>,
    /// The id of the etcd cluster that ran it (0 if the answer did not say).
    pub cluster: u64,
}

/// How a range is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeOptions {
    /// At most this many keys (0: all).
    pub limit: i64,
    /// Newest keys (by name) first.
    pub descending: bool,
    /// Keys only, their values left out.
    pub keys_only: bool,
    /// Only how many keys there are (what [`Etcd::count`] asks).
    pub count_only: bool,
}

/// An etcd cluster, by its client endpoints.
pub struct Etcd {
    endpoints: Vec<String>,
    /// The endpoint that answered last: tried first.
    current: AtomicUsize,
    agent: ureq::Agent,
    /// Tests: the answers of this many next transactions are lost on the way back, after
    /// etcd applied them.
    #[cfg(test)]
    pub(crate) lose_txn_answers: AtomicUsize,
}

#[derive(Deserialize)]
struct RawKv {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    create_revision: Option<String>,
    #[serde(default)]
    mod_revision: Option<String>,
    #[serde(default)]
    lease: Option<String>,
}

#[derive(Serialize)]
struct RangeRequest<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_end: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    limit: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sort_order: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sort_target: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keys_only: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    count_only: bool,
    /// As of this revision (0: the newest).
    #[serde(skip_serializing_if = "is_zero")]
    revision: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The key just past every key that starts with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn number(value: Option<&Value>) -> i64 {
    // The gateway writes 64-bit integers as strings.
    match value {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl KeyValue {
    fn decode(raw: RawKv, call: &'static str) -> Result<Self, EtcdError> {
        let malformed = |detail: String| EtcdError::Malformed { call, detail };
        let key = B64
            .decode(&raw.key)
            .map_err(|e| malformed(format!("key not base64: {e}")))?;
        let value = match raw.value {
            Some(v) => B64
                .decode(v)
                .map_err(|e| malformed(format!("value not base64: {e}")))?,
            None => Vec::new(),
        };
        let revision = |r: Option<String>| r.and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(Self {
            key: String::from_utf8(key).map_err(|_| malformed("key not UTF-8".into()))?,
            value,
            create_revision: revision(raw.create_revision),
            mod_revision: revision(raw.mod_revision),
            lease: revision(raw.lease),
        })
    }
}

fn kvs(answer: &Value, call: &'static str) -> Result<Vec<KeyValue>, EtcdError> {
    match answer.get("kvs") {
        None => Ok(Vec::new()),
        Some(list) => {
            let raw: Vec<RawKv> =
                serde_json::from_value(list.clone()).map_err(|e| EtcdError::Malformed {
                    call,
                    detail: e.to_string(),
                })?;
            raw.into_iter()
                .map(|kv| KeyValue::decode(kv, call))
                .collect()
        }
    }
}

impl Etcd {
    /// A client of the etcd cluster at `endpoints` (`http://HOST:PORT`, comma-separated
    /// or given one by one). Each call gives up on an endpoint after `timeout`.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, EtcdError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(EtcdError::Unreachable {
                endpoints: String::new(),
                last: "no endpoint given".into(),
            });
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(1))))
            .build()
            .new_agent();
        Ok(Self {
            endpoints,
            current: AtomicUsize::new(0),
            #[cfg(test)]
            lose_txn_answers: AtomicUsize::new(0),
            agent,
        })
    }

    /// The endpoints, comma-separated.
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// One gateway call: the endpoint that answered last, then the others in turn. A
    /// call that may have taken effect (`idempotent` false: a transaction, a put, a
    /// lease grant) moves on only when it could not be sent at all; otherwise its fate is
    /// unknown, and it fails as [`EtcdError::Ambiguous`] rather than run twice.
    fn call(
        &self,
        call: &'static str,
        path: &str,
        body: &Value,
        idempotent: bool,
    ) -> Result<Value, EtcdError> {
        let first = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..self.endpoints.len() {
            let i = (first + k) % self.endpoints.len();
            let url = format!("{}{path}", self.endpoints[i]);
            let mut response = match self.agent.post(&url).send_json(body) {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{}: {e}", self.endpoints[i]);
                    let unsent = matches!(
                        e,
                        ureq::Error::ConnectionFailed
                            | ureq::Error::HostNotFound
                            | ureq::Error::Timeout(ureq::Timeout::Connect)
                    ) || matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                    if unsent || idempotent {
                        continue;
                    }
                    return Err(EtcdError::Ambiguous { call, detail: last });
                }
            };
            let status = response.status();
            let text = match response
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
            {
                Ok(t) => t,
                Err(e) => {
                    last = format!("{}: {e}", self.endpoints[i]);
                    if idempotent {
                        continue;
                    }
                    return Err(EtcdError::Ambiguous { call, detail: last });
                }
            };
            let answer: Value = serde_json::from_str(&text).map_err(|e| EtcdError::Malformed {
                call,
                detail: format!("{e}: {}", text.chars().take(200).collect::<String>()),
            })?;
            if !status.is_success() || answer.get("error").is_some() {
                let message = answer
                    .get("message")
                    .or_else(|| answer.get("error"))
                    .and_then(Value::as_str)
                    .unwrap_or(&text)
                    .to_string();
                // A member cut off from the others cannot serve; another may (a write
                // that timed out there may still commit: not retried).
                if message.contains("no leader") || (idempotent && message.contains("timed out")) {
                    last = format!("{}: {message}", self.endpoints[i]);
                    continue;
                }
                return Err(EtcdError::Refused { call, message });
            }
            self.current.store(i, Ordering::Relaxed);
            return Ok(answer);
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            last,
        })
    }

    /// Keys from `key` (or every key starting with it, with `prefix`).
    pub fn range(
        &self,
        key: &str,
        prefix: bool,
        options: RangeOptions,
    ) -> Result<Vec<KeyValue>, EtcdError> {
        let answer = self.range_call(key, prefix, options)?;
        kvs(&answer, "range")
    }

    /// Every key that starts with `prefix`, in key order, `page` keys a request (at least
    /// 1), each after the first as of the first's revision: one view of them, however
    /// many there are, in answers that each stay within what a call reads.
    pub fn range_all(&self, prefix: &str, page: i64) -> Result<Vec<KeyValue>, EtcdError> {
        self.range_pages(prefix, false, 0, page)
    }

    /// The `most` last keys (by name) that start with `prefix`, the last first, read as
    /// [`Etcd::range_all`] reads.
    pub fn range_newest(
        &self,
        prefix: &str,
        most: usize,
        page: i64,
    ) -> Result<Vec<KeyValue>, EtcdError> {
        self.range_pages(prefix, true, most, page)
    }

    /// [`Etcd::range_all`] (`descending`: from the last key back), at most `most` keys
    /// (0: all, up to [`MAX_RANGE_BYTES`]).
    fn range_pages(
        &self,
        prefix: &str,
        descending: bool,
        most: usize,
        page: i64,
    ) -> Result<Vec<KeyValue>, EtcdError> {
        // Ascending, each page starts just past the last one's last key; descending, it
        // ends just before it (a range's end is not in it).
        let (mut from, mut end) = (prefix.to_string(), prefix_end(prefix.as_bytes()));
        let mut revision = 0;
        let (mut all, mut bytes) = (Vec::new(), 0usize);
        loop {
            let left = if most == 0 {
                i64::MAX
            } else {
                (most - all.len()) as i64
            };
            let request = RangeRequest {
                key: &b64(from.as_bytes()),
                range_end: Some(b64(&end)),
                limit: page.max(1).min(left),
                sort_order: descending.then_some("DESCEND"),
                sort_target: descending.then_some("KEY"),
                keys_only: false,
                count_only: false,
                revision,
            };
            let answer = self.send_range(&request)?;
            if revision == 0 {
                revision = number(answer["header"].get("revision"));
            }
            let more = answer.get("more").and_then(Value::as_bool) == Some(true);
            let kvs = kvs(&answer, "range")?;
            let Some(last) = kvs.last() else { break };
            // Each page is asked for past the last: one that is not (a broken or hostile
            // server) would be asked again for ever.
            let advanced = if descending {
                last.key.as_bytes() < &end[..]
            } else {
                last.key >= from
            };
            if !advanced {
                return Err(EtcdError::Malformed {
                    call: "range",
                    detail: format!("a page of {prefix} ending at a key before the one asked from"),
                });
            }
            if descending {
                end = last.key.as_bytes().to_vec();
            } else {
                from = format!("{}\0", last.key);
            }
            bytes += kvs
                .iter()
                .map(|kv| kv.key.len() + kv.value.len())
                .sum::<usize>();
            if bytes > MAX_RANGE_BYTES {
                return Err(EtcdError::Malformed {
                    call: "range",
                    detail: format!(
                        "the keys under {prefix} hold more than {} GiB",
                        MAX_RANGE_BYTES >> 30
                    ),
                });
            }
            all.extend(kvs);
            if !more || (most != 0 && all.len() >= most) {
                break;
            }
        }
        Ok(all)
    }

    /// How many keys start with `prefix`.
    pub fn count(&self, prefix: &str) -> Result<i64, EtcdError> {
        let count_only = RangeOptions {
            count_only: true,
            ..RangeOptions::default()
        };
        let answer = self.range_call(prefix, true, count_only)?;
        Ok(number(answer.get("count")))
    }

    /// The answer to a range request ([`Etcd::range`], [`Etcd::count`]).
    fn range_call(
        &self,
        key: &str,
        prefix: bool,
        options: RangeOptions,
    ) -> Result<Value, EtcdError> {
        let request = RangeRequest {
            key: &b64(key.as_bytes()),
            range_end: prefix.then(|| b64(&prefix_end(key.as_bytes()))),
            limit: options.limit,
            sort_order: options.descending.then_some("DESCEND"),
            sort_target: options.descending.then_some("KEY"),
            keys_only: options.keys_only,
            count_only: options.count_only,
            revision: 0,
        };
        self.send_range(&request)
    }

    /// The answer to `request` (a range request is always safe to send again).
    fn send_range(&self, request: &RangeRequest<'_>) -> Result<Value, EtcdError> {
        let body = serde_json::to_value(request).map_err(|e| EtcdError::Malformed {
            call: "range",
            detail: e.to_string(),
        })?;
        self.call("range", "/v3/kv/range", &body, true)
    }

    /// One key, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        Ok(self
            .range(key, false, RangeOptions::default())?
            .into_iter()
            .next())
    }

    /// A transaction: `then` if every condition in `when` holds, else `otherwise`. Not
    /// sent again when its answer is lost (it may have taken effect).
    pub fn txn(
        &self,
        when: &[Compare],
        then: &[Op],
        otherwise: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        self.transaction(when, then, otherwise, false)
    }

    /// [`Etcd::txn`] for a transaction that does the same if it runs twice (puts of
    /// fixed values, deletes, reads): sent again, to another member if need be, when its
    /// answer is lost, as while etcd elects a new leader.
    pub fn txn_repeatable(
        &self,
        when: &[Compare],
        then: &[Op],
        otherwise: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        self.transaction(when, then, otherwise, true)
    }

    fn transaction(
        &self,
        when: &[Compare],
        then: &[Op],
        otherwise: &[Op],
        repeatable: bool,
    ) -> Result<TxnOutcome, EtcdError> {
        let compare: Vec<Value> = when
            .iter()
            .map(|c| match c {
                Compare::CreateRevision(key, rev) => json!({
                    "key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL",
                    "create_revision": rev.to_string(),
                }),
                Compare::ModRevision(key, rev) => json!({
                    "key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL",
                    "mod_revision": rev.to_string(),
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        let mut put = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
                        if let Some(lease) = lease {
                            put["lease"] = json!(lease.to_string());
                        }
                        json!({ "request_put": put })
                    }
                    Op::Delete(key) => {
                        json!({ "request_delete_range": { "key": b64(key.as_bytes()) } })
                    }
                    Op::DeleteRange(from, to) => json!({ "request_delete_range": {
                        "key": b64(from.as_bytes()), "range_end": b64(to.as_bytes()),
                    } }),
                    Op::Get(key) => json!({ "request_range": { "key": b64(key.as_bytes()) } }),
                })
                .collect()
        };
        let body = json!({ "compare": compare, "success": ops(then), "failure": ops(otherwise) });
        let answer = self.call("txn", "/v3/kv/txn", &body, repeatable)?;
        #[cfg(test)]
        if (self.lose_txn_answers)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(EtcdError::Ambiguous {
                call: "txn",
                detail: "the answer was lost (a test's)".into(),
            });
        }
        let succeeded = answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut read = Vec::new();
        for response in answer
            .get("responses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(range) = response.get("response_range") {
                read.extend(kvs(range, "txn")?);
            }
        }
        // The gateway writes 64-bit numbers as strings.
        let cluster = match &answer["header"]["cluster_id"] {
            Value::String(id) => id.parse().unwrap_or(0),
            other => other.as_u64().unwrap_or(0),
        };
        Ok(TxnOutcome {
            succeeded,
            read,
            cluster,
        })
    }

    /// Sets `key` (unconditionally).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        let body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        self.call("put", "/v3/kv/put", &body, false).map(drop)
    }

    /// A lease of `ttl` seconds; returns its id.
    pub fn grant_lease(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let answer = self.call(
            "lease grant",
            "/v3/lease/grant",
            &json!({ "TTL": ttl.as_secs().max(1).to_string() }),
            false,
        )?;
        match number(answer.get("ID")) {
            0 => Err(EtcdError::Malformed {
                call: "lease grant",
                detail: "no lease id".into(),
            }),
            id => Ok(id),
        }
    }

    /// Renews lease `id`; `false` if it has expired (or never existed).
    pub fn keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let answer = self.call(
            "lease keep-alive",
            "/v3/lease/keepalive",
            &json!({ "ID": id.to_string() }),
            true,
        )?;
        Ok(number(answer.get("result").and_then(|r| r.get("TTL"))) > 0)
    }

    /// Ends lease `id` now, deleting its keys.
    pub fn revoke_lease(&self, id: i64) -> Result<(), EtcdError> {
        self.call(
            "lease revoke",
            "/v3/lease/revoke",
            &json!({ "ID": id.to_string() }),
            true,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_just_past_its_last_key() {
        assert_eq!(prefix_end(b"/ferry/vms/"), b"/ferry/vms0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn a_server_answering_every_page_alike_is_refused_not_read_for_ever() {
        // Every range answered with the same page, and "more" to come.
        let page = json!({
            "header": { "revision": "5" },
            "kvs": [{ "key": b64(b"/p/a"), "value": b64(b"x"), "create_revision": "1", "mod_revision": "1" }],
            "more": true,
            "count": "2",
        })
        .to_string();
        let (addr, _) = crate::fake_host::fake_host(vec![("200 OK", page); 3]);
        let etcd = Etcd::new(&[format!("http://{addr}")], Duration::from_secs(5)).unwrap();
        let e = etcd.range_all("/p/", 1).expect_err("refused").to_string();
        assert!(
            e.contains("a page of /p/ ending at a key before the one asked from"),
            "{e}"
        );
    }

    #[test]
    fn no_endpoint_is_an_error_not_a_panic() {
        assert!(Etcd::new(&[" , ".into()], Duration::from_secs(1)).is_err());
    }
}
