//! `ferry bench llm`: a GGUF language model on the accelerator; on the cpu backend,
//! against the bound the host's memory bandwidth sets (generating a token reads every weight once, so no
//! implementation can beat bandwidth ÷ weight bytes per token), both measured in one
//! run; and the cost of moving the VM with its model file sent or found on the
//! destination.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_api::{Attachment, CreateVm, MigrateRequest};
use ferry_llm::{Gguf, GgufError, LlamaModel};
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig, VmExit};
use indicatif::ProgressBar;
use serde_json::Value;

use crate::cmd::bench::{figure, last_value, median, Emit};
use crate::cmd::host::LoopbackPair;
use crate::cmd::migrate::follow;
use crate::cmd::poll_until;

/// Runs of the model per speed figure (the median is reported).
const RUNS: usize = 3;
/// Tokens generated per run.
const GENERATE: &str = "128";
/// The prompt: plain text of about 130 tokens, without a chat template.
const PROMPT_SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";

/// The model's description from its header.
fn describe(path: &Path) -> anyhow::Result<LlamaModel> {
    let size = std::fs::metadata(path)
        .with_context(|| {
            format!(
                "no model at {} (run scripts/fetch-model, or pass --model FILE.gguf)",
                path.display()
            )
        })?
        .len();
    let mut want = size.min(4 << 20);
    loop {
        let mut prefix = vec![0u8; want as usize];
        let file = std::fs::File::open(path)?;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut prefix, 0)?;
        match Gguf::parse(&prefix, size) {
            Ok(gguf) => {
                return LlamaModel::from_gguf(&gguf)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            }
            Err(GgufError::NeedMore { bytes }) if bytes > want && bytes <= size => want = bytes,
            Err(e) => bail!("{}: {e}", path.display()),
        }
    }
}

/// Weight bytes one generated token reads: every block's weights, the final norm and the
/// output projection (the token embedding when tied) whole, one embedding row.
fn bytes_per_token(model: &LlamaModel) -> u64 {
    let layers: u64 = model
        .layers
        .iter()
        .flat_map(|l| l.weights())
        .map(|w| w.size)
        .sum();
    let embd = model.token_embd;
    layers + model.output_norm.size + model.output_weight().size + embd.size / embd.rows.max(1)
}

/// Runs llm-chat with `model` attached; returns its console.
fn chat(model: &Path, backend: &'static str, args: &[&str]) -> anyhow::Result<String> {
    let host = HostOptions {
        files: AttachedFiles::open(&[("model".into(), model.to_path_buf())])?,
        backend,
        ..HostOptions::quiet()
    };
    let image = ferry_guest_images::find("llm-chat").context("no llm-chat guest")?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let config = VmConfig::new(256 << 20).with_accel(1 << 30);
    let mut vm = Microvm::boot(config, image.elf, &args, host)?;
    vm.resume()?;
    match vm.wait(Some(Duration::from_secs(600))) {
        Some(VmExit::Exited(0)) => Ok(vm.console_tail()),
        Some(VmExit::Exited(code)) => bail!("llm-chat exited with {code}: {}", vm.console_tail()),
        Some(VmExit::Failed(e)) => Err(e).context("llm-chat failed"),
        None => bail!("llm-chat did not finish in 600 s"),
    }
}

/// `ferry bench llm`.
pub fn bench_llm(model_path: &Path, backend: &'static str, emit: &mut Emit) -> anyhow::Result<()> {
    let model = describe(model_path)?;
    let threads = ferry_vmm::vm::default_accel_threads();
    let on_cpu = backend == ferry_accel::backend::CPU;
    let prompt = PROMPT_SENTENCE.repeat(10);
    let args = ["--raw", prompt.as_str(), "--max-tokens", GENERATE];
    let per_token = bytes_per_token(&model) as f64;
    let (mut prompt_rates, mut gen_rates) = (Vec::new(), Vec::new());
    // Each run's generation against the bandwidth measured right after it: on a host
    // whose neighbours come and go, one bandwidth for all runs would pair figures of
    // different moments (ratios from 0.19 to 0.34 were seen so).
    let (mut bandwidths, mut ratios) = (Vec::new(), Vec::new());
    let mut prompt_tokens = 0.0;
    for _ in 0..RUNS {
        let console = chat(model_path, backend, &args)?;
        prompt_rates.push(last_value(&console, "prompt_tokens_s")?);
        let gen = last_value(&console, "tokens_s")?;
        gen_rates.push(gen);
        if on_cpu {
            let bandwidth = ferry_accel::backend::cpu::bench_memory_read(threads);
            bandwidths.push(bandwidth);
            ratios.push(gen / (bandwidth / per_token));
        }
        prompt_tokens = console
            .lines()
            .find_map(|l| l.strip_prefix("llm-chat: prompt of "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
    }
    let name = model_path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let gen = median(&mut gen_rates);
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    emit(figure(
        "llm_prompt_tokens_s",
        median(&mut prompt_rates),
        "tokens/s",
        format!("{name}: a {prompt_tokens:.0}-token prompt in batches of 32, median of {RUNS}, {backend} backend{}", if on_cpu { format!(" on {threads} threads") } else { String::new() }),
    ))?;
    emit(figure(
        "llm_generate_tokens_s",
        gen,
        "tokens/s",
        format!("{name}: {GENERATE} tokens greedily after it, median of {RUNS}"),
    ))?;
    emit(figure(
        "llm_weight_mb_per_token",
        per_token / 1e6,
        "MB",
        format!(
            "weights read per generated token ({} layers, output projection {})",
            model.config.layers,
            if model.output.is_some() {
                "own"
            } else {
                "tied to the embedding"
            }
        ),
    ))?;
    if !on_cpu {
        // The host's memory bounds the cpu backend only; a GPU reads its own.
        return migrate_with_file(model_path, backend, emit);
    }
    let bandwidth = median(&mut bandwidths);
    emit(figure(
        "llm_host_memory_read",
        bandwidth / 1e9,
        "GB/s",
        format!("best pass summing 1 GiB on {threads} threads, after each run, median of {RUNS}"),
    ))?;
    let bound = bandwidth / per_token;
    emit(figure(
        "llm_bandwidth_bound",
        bound,
        "tokens/s",
        "memory bandwidth ÷ weight bytes per token".into(),
    ))?;
    emit(figure(
        "llm_generate_vs_bound",
        median(&mut ratios),
        "x bound",
        format!(
            "each run's generation ÷ the bound from the bandwidth measured after it, median \
             of {RUNS} ({}); medians: {gen:.1} ÷ {bound:.1} tokens/s",
            each.join(", ")
        ),
    ))?;
    migrate_with_file(model_path, backend, emit)
}

/// Moves an answering llm-chat VM from a to b (b's memory backed by it), back with its
/// file sent (a has a copy of it at the same path, so `send` forces it), then to b again
/// with the file found there: what the file costs a migration.
fn migrate_with_file(model: &Path, backend: &'static str, emit: &mut Emit) -> anyhow::Result<()> {
    let model = std::fs::canonicalize(model)?;
    let size = std::fs::metadata(&model)?.len();
    let pair = LoopbackPair::start(4 << 30, backend)?;
    let (ca, cb) = (&pair.client_a, &pair.client_b);
    let request = CreateVm {
        name: None,
        workload: "llm-chat".into(),
        args: [
            "--raw",
            PROMPT_SENTENCE,
            "--max-tokens",
            "100000",
            "--context",
            "4096",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        memory: 256 << 20,
        accel_memory: 1 << 30,
        attach: vec![Attachment {
            name: "model".into(),
            path: model.clone(),
        }],
        backend: None,
        idempotency_key: None,
    };
    let vm: ferry_api::VmInfo = ca.post("/v1/vms", &request)?;
    let id = vm.id;
    // Migrate once it is generating.
    poll_until(
        "llm-chat to start generating",
        Duration::from_secs(60),
        || {
            let console = ca.get_text(&format!("/v1/vms/{id}/console"))?;
            Ok(console.contains("llm-chat: prompt of").then_some(()))
        },
    )?;
    // The first move to b also backs b's memory (the kernel zeroes each page first
    // touched: most of that move's time on this machine); the two compared after it land
    // on hosts whose memory is backed, as a GPU's is.
    for (name, files, from, to) in [
        (
            "llm_migrate_to_a_fresh_host",
            "reuse",
            ca,
            pair.b.migration_addr,
        ),
        ("llm_migrate_file_sent", "send", cb, pair.a.migration_addr),
        (
            "llm_migrate_file_reused",
            "reuse",
            ca,
            pair.b.migration_addr,
        ),
    ] {
        std::thread::sleep(Duration::from_millis(300));
        let request = MigrateRequest {
            files: files.into(),
            ..MigrateRequest::to(&to.to_string())
        };
        let r = follow(from, &id, &request, &ProgressBar::hidden())?;
        emit(figure(
            name,
            r.total_ms,
            "ms total",
            format!(
                "--files {files}: pause {:.1} ms, {:.0} MiB sent ({:.0} MiB of the {:.0} MiB model), {} rounds",
                r.downtime_ms,
                r.bytes_sent as f64 / f64::from(1 << 20),
                r.file_bytes as f64 / f64::from(1 << 20),
                size as f64 / f64::from(1 << 20),
                r.rounds
            ),
        ))?;
    }
    let _: Value = cb.delete(&format!("/v1/vms/{id}"))?;
    Ok(())
}
