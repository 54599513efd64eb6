//! `ferry bench serve`: an `llm-serve` VM (a GGUF model) behind the center's OpenAI
//! gateway, a center and three hosts in this process on loopback. Streaming chat clients
//! measure requests/s, tokens/s, time to first token and the gaps between tokens at 1, 4
//! and 8 concurrent clients; then 4 clients keep streaming while the VM migrates back and
//! forth, and the gaps during the migrations are set against the steady ones and the
//! migrations' pauses.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use ferry_api::{Attachment, CreateVm, HostInfo, MigrateRequest, MigrationState, MigrationStatus};
use ferry_center::{PlaceVm, Placed};
use ferry_client::ApiClient;
use serde_json::{json, Value};

use crate::cmd::bench::{figure, percentile, Emit};
use crate::cmd::loopback::LoopbackCluster;
use crate::cmd::poll_until;

/// Tokens each request asks for.
const MAX_TOKENS: u32 = 48;
/// Requests each client sends per load level.
const REQUESTS_PER_CLIENT: usize = 3;
/// Migrations (alternating a -> b, b -> a) while clients stream.
const MIGRATIONS: usize = 6;
/// Concurrent clients while migrating.
const MIGRATING_CLIENTS: usize = 4;
/// Tokens each of their requests asks for: long answers, so that the migrations fall
/// in the middle of answers rather than on prompts being read.
const MIGRATING_TOKENS: u32 = 200;
/// The same with a rate ceiling, whose migrations take seconds each.
const PACED_MIGRATING_TOKENS: u32 = 400;
/// Pieces of text after which an answer is flowing: the first arrives when its own
/// prompt is read, the next two a round apart, when no other prompt of the first requests
/// is being read any longer.
const FLOWING: usize = 3;
/// The serving VM's accelerator memory.
const VM_ACCEL: u64 = 1 << 30;
/// Data connections of each migration: one, so that on a 2-core machine holding both
/// ends the copy leaves the guest a core (two stop it for most of the pre-copy).
const STREAMS: u8 = 1;

/// Longest one streamed answer may take: hundreds of tokens at 8 clients on a slow
/// machine take more than the client's usual minute.
const ANSWER_TIME: Duration = Duration::from_secs(600);

/// One streamed answer as the client saw it.
struct Answer {
    sent: Instant,
    /// When each piece of text arrived.
    pieces: Vec<Instant>,
    completion_tokens: u64,
}

/// Streams one chat completion, counting it in `flowing` once [`FLOWING`] pieces of
/// text have arrived; `Err` for any failure (a failed request).
fn stream_chat(gateway: &ApiClient, body: &Value, flowing: &AtomicUsize) -> anyhow::Result<Answer> {
    let sent = Instant::now();
    let lines = gateway.post_lines("/v1/chat/completions", body, ANSWER_TIME)?;
    let mut pieces = Vec::new();
    let mut completion_tokens = 0;
    let mut done = false;
    for line in lines {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            bail!("error in the stream: {v}");
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            pieces.push(Instant::now());
            if pieces.len() == FLOWING {
                flowing.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            completion_tokens = n;
        }
    }
    ensure!(done, "the stream ended without [DONE]");
    Ok(Answer {
        sent,
        pieces,
        completion_tokens,
    })
}

fn request(model: &str, seed: u64, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `clients` streaming clients; each sends requests until `more` says stop (after
/// at least `least` each), and counts in `flowing` the answers past their prompts.
/// Returns the answers and the failures.
fn load(
    (url, token): (&str, &str),
    model: &str,
    (clients, max_tokens): (usize, u32),
    least: usize,
    (more, flowing): (&(dyn Fn() -> bool + Sync), &AtomicUsize),
) -> (Vec<Answer>, Vec<String>) {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let gateway = ApiClient::new(url, token.as_bytes())
                        .expect("a client of the loopback gateway");
                    let (mut answers, mut failures) = (Vec::new(), Vec::new());
                    let mut i = 0;
                    while i < least || more() {
                        let body = request(model, (c * 1000 + i) as u64, max_tokens);
                        match stream_chat(&gateway, &body, flowing) {
                            Ok(a) => answers.push(a),
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                        i += 1;
                    }
                    (answers, failures)
                })
            })
            .collect();
        let mut all = (Vec::new(), Vec::new());
        for h in handles {
            let (a, f) = h.join().expect("client thread");
            all.0.extend(a);
            all.1.extend(f);
        }
        all
    })
}

/// Migrates `id` from `from` to the host at `to`; returns (started, ended, pause ms,
/// MiB sent, chunks sent as file pieces).
fn migrate(
    from: &ApiClient,
    id: &str,
    to: &str,
    max_rate_mib_s: Option<u64>,
) -> anyhow::Result<(Instant, Instant, f64, f64, u64)> {
    let started = Instant::now();
    let request = MigrateRequest {
        streams: STREAMS,
        max_rate_mib_s,
        ..MigrateRequest::to(to)
    };
    let _: MigrationStatus = from.post(&format!("/v1/vms/{id}/migrate"), &request)?;
    loop {
        let status: MigrationStatus = from.get(&format!("/v1/vms/{id}/migration"))?;
        match status.state {
            MigrationState::Running => std::thread::sleep(Duration::from_millis(5)),
            MigrationState::Succeeded => {
                let report = status.report.context("a success without a report")?;
                return Ok((
                    started,
                    Instant::now(),
                    report.downtime_ms,
                    report.bytes_sent as f64 / f64::from(1 << 20),
                    report.chunks_from_files,
                ));
            }
            other => bail!(
                "migration of {id} ended {other:?}: {}",
                status.error.unwrap_or_default()
            ),
        }
    }
}

/// `ferry bench serve`, its migrations at most `max_rate` MiB/s if given.
pub fn bench_serve(
    model: &Path,
    backend: &'static str,
    max_rate: Option<u64>,
    emit: &mut Emit,
) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(model).with_context(|| {
        format!(
            "no model at {} (scripts/fetch-model fetches SmolLM2; or give --model)",
            model.display()
        )
    })?;
    let cluster = LoopbackCluster::start(2, 4 << 30, VM_ACCEL + (64 << 20), backend)?;
    let placed: Placed = cluster.center.post(
        "/v1/vms",
        &PlaceVm {
            vm: CreateVm {
                name: Some("smollm2".into()),
                workload: "llm-serve".into(),
                args: ["--slots", "8", "--context", "512"]
                    .map(String::from)
                    .to_vec(),
                memory: 256 << 20,
                accel_memory: VM_ACCEL,
                attach: vec![Attachment {
                    name: "model".into(),
                    path: model.clone(),
                }],
                backend: None,
                idempotency_key: None,
            },
            host: Some("a".into()),
        },
    )?;
    let id = placed.vm.id;
    poll_until(
        "the serving VM to get ready",
        Duration::from_secs(120),
        || {
            let models: Value = cluster.center.get("/v1/models")?;
            let console = cluster
                .host("a")
                .get_text(&format!("/v1/vms/{id}/console"))?;
            if console.contains("llm-serve: ready") && models["data"].to_string().contains(&id) {
                return Ok(Some(()));
            }
            ensure!(
                !console.contains("llm-serve: error"),
                "the serving VM failed: {console}"
            );
            Ok(None)
        },
    )?;

    let gateway = (cluster.center_url.as_str(), cluster.token.as_str());
    for clients in [1, 4, 8] {
        let began = Instant::now();
        let (answers, failures) = load(
            gateway,
            &id,
            (clients, MAX_TOKENS),
            REQUESTS_PER_CLIENT,
            (&|| false, &AtomicUsize::new(0)),
        );
        let wall = began.elapsed().as_secs_f64();
        let tokens: u64 = answers.iter().map(|a| a.completion_tokens).sum();
        let mut ttft: Vec<f64> = answers
            .iter()
            .filter_map(|a| a.pieces.first().map(|t| ms(*t - a.sent)))
            .collect();
        let mut gaps: Vec<f64> = answers
            .iter()
            .flat_map(|a| a.pieces.windows(2).map(|w| ms(w[1] - w[0])))
            .collect();
        let detail = format!(
            "{clients} clients, {} requests, {} failed",
            answers.len(),
            failures.len()
        );
        emit(figure(
            "serve_requests_s",
            answers.len() as f64 / wall,
            "req/s",
            detail.clone(),
        ))?;
        emit(figure(
            "serve_tokens_s",
            tokens as f64 / wall,
            "tokens/s",
            detail.clone(),
        ))?;
        emit(figure(
            "serve_ttft_p50",
            percentile(&mut ttft, 0.5),
            "ms",
            detail.clone(),
        ))?;
        emit(figure(
            "serve_ttft_p99",
            percentile(&mut ttft, 0.99),
            "ms",
            detail.clone(),
        ))?;
        emit(figure(
            "serve_itl_p50",
            percentile(&mut gaps, 0.5),
            "ms",
            detail.clone(),
        ))?;
        emit(figure(
            "serve_itl_p99",
            percentile(&mut gaps, 0.99),
            "ms",
            detail,
        ))?;
        emit(figure(
            "serve_failed",
            failures.len() as f64,
            "requests",
            format!("{clients} clients: {failures:?}"),
        ))?;
    }

    // Streaming while the VM moves back and forth.
    let info = |name: &str| -> anyhow::Result<HostInfo> { cluster.host(name).get("/v1/host") };
    let (a, b) = (info("a")?, info("b")?);
    let migrating_tokens = match max_rate {
        Some(_) => PACED_MIGRATING_TOKENS,
        None => MIGRATING_TOKENS,
    };
    let migrating = AtomicBool::new(true);
    let flowing = AtomicUsize::new(0);
    let (windows, (answers, failures)) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            load(
                gateway,
                &id,
                (MIGRATING_CLIENTS, migrating_tokens),
                1,
                (&|| migrating.load(Ordering::Relaxed), &flowing),
            )
        });
        let mut windows = Vec::new();
        // Every client's prompt read and its answer flowing, so the moves land in the
        // middle of answers, not on the longer rounds that read prompts.
        let began = Instant::now();
        while flowing.load(Ordering::Relaxed) < MIGRATING_CLIENTS
            && began.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for i in 0..MIGRATIONS {
            let (from, to) = if i % 2 == 0 { ("a", &b) } else { ("b", &a) };
            windows.push(migrate(
                cluster.host(from),
                &id,
                &to.migration_addr,
                max_rate,
            ));
            std::thread::sleep(Duration::from_millis(400));
        }
        migrating.store(false, Ordering::Relaxed);
        (windows, clients.join().expect("clients"))
    });
    let windows: Vec<(Instant, Instant, f64, f64, u64)> =
        windows.into_iter().collect::<Result<_, _>>()?;
    let during = |t0: Instant, t1: Instant| windows.iter().any(|w| t0 < w.1 && t1 > w.0);
    // Gaps inside a migration, and the same streams' gaps outside one (the steady state
    // of the same run).
    let (mut in_migration, mut outside) = (Vec::new(), Vec::new());
    for a in &answers {
        for w in a.pieces.windows(2) {
            if during(w[0], w[1]) {
                in_migration.push(ms(w[1] - w[0]));
            } else {
                outside.push(ms(w[1] - w[0]));
            }
        }
    }
    let mut pauses: Vec<f64> = windows.iter().map(|w| w.2).collect();
    let longest = in_migration.iter().copied().fold(0.0, f64::max);
    let steady_p50 = percentile(&mut outside, 0.5);
    let steady_p99 = percentile(&mut outside, 0.99);
    let steady_max = percentile(&mut outside, 1.0);
    let pause_max = percentile(&mut pauses, 1.0);
    let detail = format!(
        "{MIGRATING_CLIENTS} clients, {MIGRATIONS} migrations{}, {} gaps in a migration, {} outside, {} requests",
        max_rate.map_or(String::new(), |r| format!(" at most {r} MiB/s")),
        in_migration.len(),
        outside.len(),
        answers.len()
    );
    emit(figure(
        "serve_migrating_itl_p50",
        percentile(&mut in_migration, 0.5),
        "ms",
        detail.clone(),
    ))?;
    emit(figure(
        "serve_migrating_itl_p99",
        percentile(&mut in_migration, 0.99),
        "ms",
        format!(
            "outside the migrations p99 {steady_p99:.1} ms: ratio {:.2} (target <= 2)",
            percentile(&mut in_migration, 0.99) / steady_p99
        ),
    ))?;
    emit(figure(
        "serve_longest_gap",
        longest,
        "ms",
        format!(
            "outside the migrations p50 {steady_p50:.1} ms + longest pause {pause_max:.1} ms + \
             10 ms = {:.1} ms (target); longest gap outside {steady_max:.1} ms",
            steady_p50 + pause_max + 10.0
        ),
    ))?;
    emit(figure(
        "serve_pause_max",
        pause_max,
        "ms",
        format!(
            "pauses {pauses:.1?}, whole migrations {:.0?} ms, {:.0?} MiB sent each, {} device \
             chunks sent as the model file's pieces",
            windows.iter().map(|w| ms(w.1 - w.0)).collect::<Vec<_>>(),
            windows.iter().map(|w| w.3).collect::<Vec<_>>(),
            windows.iter().map(|w| w.4).sum::<u64>()
        ),
    ))?;
    emit(figure(
        "serve_migrating_failed",
        failures.len() as f64,
        "requests",
        format!("{failures:?}"),
    ))
}
