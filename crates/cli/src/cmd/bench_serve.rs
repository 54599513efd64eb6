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
use crate::cmd::{poll_every, poll_until};

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

/// One migration as the bench saw it.
struct Move {
    started: Instant,
    /// When the bench saw it succeed (polled every 5 ms).
    ended: Instant,
    /// The pause: from the source's pause to the resume on the destination.
    switchover: (Instant, Instant),
    pause_ms: f64,
    mib_sent: f64,
    chunks_from_files: u64,
}

/// Slack around a switchover's pause (the clocks of the bench and of the migration are
/// taken a little apart), beside the round trip of the request that started it.
const SWITCHOVER_SLACK: Duration = Duration::from_millis(2);

/// Migrates `id` from `from` to the host at `to`.
fn migrate(
    from: &ApiClient,
    id: &str,
    to: &str,
    max_rate_mib_s: Option<u64>,
) -> anyhow::Result<Move> {
    let started = Instant::now();
    let request = MigrateRequest {
        streams: STREAMS,
        max_rate_mib_s,
        ..MigrateRequest::to(to)
    };
    let _: MigrationStatus = from.post(&format!("/v1/vms/{id}/migrate"), &request)?;
    // The migration's clock started somewhere in the request's round trip.
    let round_trip = started.elapsed();
    // Asked often: the switchover's window is taken from when the end is seen.
    let what = format!("the migration of {id} to end");
    let status = poll_every(&what, MIGRATION_WITHIN, Duration::from_millis(5), || {
        let status: MigrationStatus = from.get(&format!("/v1/vms/{id}/migration"))?;
        Ok((status.state != MigrationState::Running).then_some(status))
    })?;
    match status.state {
        MigrationState::Succeeded => {
            let report = status.report.context("a success without a report")?;
            // The report's total ends at the destination's confirmation, just
            // after it resumed; the pause ends there too.
            let confirmed = started + Duration::from_secs_f64(report.total_ms / 1e3);
            let paused = confirmed
                .checked_sub(Duration::from_secs_f64(report.downtime_ms / 1e3))
                .unwrap_or(started);
            Ok(Move {
                started,
                ended: Instant::now(),
                switchover: (
                    paused.checked_sub(SWITCHOVER_SLACK).unwrap_or(paused),
                    confirmed + round_trip + SWITCHOVER_SLACK,
                ),
                pause_ms: report.downtime_ms,
                mib_sent: report.bytes_sent as f64 / f64::from(1 << 20),
                chunks_from_files: report.chunks_from_files,
            })
        }
        other => bail!(
            "migration of {id} ended {other:?}: {}",
            status.error.unwrap_or_default()
        ),
    }
}

/// The longest a migration of the served VM may take: seconds at most, even throttled.
const MIGRATION_WITHIN: Duration = Duration::from_secs(300);

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
    let info = |name: &str| -> anyhow::Result<HostInfo> { Ok(cluster.host(name).get("/v1/host")?) };
    let (a, b) = (info("a")?, info("b")?);
    let migrating_tokens = match max_rate {
        Some(_) => PACED_MIGRATING_TOKENS,
        None => MIGRATING_TOKENS,
    };
    let migrating = AtomicBool::new(true);
    let flowing = AtomicUsize::new(0);
    let (moved, flowing_at, (answers, failures)) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            load(
                gateway,
                &id,
                (MIGRATING_CLIENTS, migrating_tokens),
                1,
                (&|| migrating.load(Ordering::Relaxed), &flowing),
            )
        });
        let mut moved = Vec::new();
        // Every client's prompt read and its answer flowing, so the moves land in the
        // middle of answers, not on the longer rounds that read prompts.
        let began = Instant::now();
        while flowing.load(Ordering::Relaxed) < MIGRATING_CLIENTS
            && began.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let flowing_at = Instant::now();
        for i in 0..MIGRATIONS {
            let (from, to) = if i % 2 == 0 { ("a", &b) } else { ("b", &a) };
            let this = migrate(cluster.host(from), &id, &to.migration_addr, max_rate);
            // After a failed one the VM is not where the next would start from.
            let failed = this.is_err();
            moved.push(this.with_context(|| format!("migration {} of {MIGRATIONS}", i + 1)));
            if failed {
                break;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        migrating.store(false, Ordering::Relaxed);
        (moved, flowing_at, clients.join().expect("clients"))
    });
    let moves: Vec<Move> = moved.into_iter().collect::<Result<_, _>>()?;
    let overlaps = |(t0, t1): (Instant, Instant), (a, b): (Instant, Instant)| t0 < b && t1 > a;
    // Gaps inside a migration, and the same streams' gaps outside one (the steady state
    // of the same run): those between the first move and the last, when every client's
    // answer flows; not the start's rounds, which read prompts, nor the end's, with fewer
    // clients left. Of those inside, the ones around a switchover (the step the source
    // began and the destination ended) and the ones of the pre-copy before it, when the
    // copy shares the cores with the VM.
    let last_end = moves.last().map_or(flowing_at, |m| m.ended);
    let (mut in_migration, mut outside) = (Vec::new(), Vec::new());
    let (mut at_switchover, mut in_precopy) = (Vec::new(), Vec::new());
    for a in &answers {
        for w in a.pieces.windows(2) {
            let gap = (w[0], w[1]);
            let gap_ms = ms(w[1] - w[0]);
            if !moves.iter().any(|m| overlaps(gap, (m.started, m.ended))) {
                if gap.0 >= flowing_at && gap.1 <= last_end {
                    outside.push(gap_ms);
                }
                continue;
            }
            in_migration.push(gap_ms);
            if moves.iter().any(|m| overlaps(gap, m.switchover)) {
                at_switchover.push(gap_ms);
            } else {
                in_precopy.push(gap_ms);
            }
        }
    }
    let mut pauses: Vec<f64> = moves.iter().map(|m| m.pause_ms).collect();
    let longest = percentile(&mut in_migration.clone(), 1.0);
    let steady_p50 = percentile(&mut outside, 0.5);
    let steady_p99 = percentile(&mut outside, 0.99);
    let steady_max = percentile(&mut outside, 1.0);
    let pause_max = percentile(&mut pauses, 1.0);
    let detail = format!(
        "{MIGRATING_CLIENTS} clients, {MIGRATIONS} migrations{}, {} gaps in a migration, {} outside (between them, every answer flowing), {} requests",
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
    let (precopy_p50, switchover_p50) = (
        percentile(&mut in_precopy, 0.5),
        percentile(&mut at_switchover, 0.5),
    );
    emit(figure(
        "serve_precopy_gap_max",
        percentile(&mut in_precopy, 1.0),
        "ms",
        format!(
            "{} gaps during the pre-copy rounds (the copy shares the cores with the VM): \
             p50 {precopy_p50:.1} ms, against {steady_p50:.1} ms outside",
            in_precopy.len()
        ),
    ))?;
    emit(figure(
        "serve_switchover_gap_max",
        percentile(&mut at_switchover, 1.0),
        "ms",
        format!(
            "{} gaps around a switchover (a step begun on the source, ended on the \
             destination): p50 {switchover_p50:.1} ms, against {steady_p50:.1} ms outside \
             and pauses of at most {pause_max:.1} ms",
            at_switchover.len()
        ),
    ))?;
    emit(figure(
        "serve_pause_max",
        pause_max,
        "ms",
        format!(
            "pauses {pauses:.1?}, whole migrations {:.0?} ms, {:.0?} MiB sent each, {} device \
             chunks sent as the model file's pieces",
            moves
                .iter()
                .map(|m| ms(m.ended - m.started))
                .collect::<Vec<_>>(),
            moves.iter().map(|m| m.mib_sent).collect::<Vec<_>>(),
            moves.iter().map(|m| m.chunks_from_files).sum::<u64>()
        ),
    ))?;
    emit(figure(
        "serve_migrating_failed",
        failures.len() as f64,
        "requests",
        format!("{failures:?}"),
    ))
}
