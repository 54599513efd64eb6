//! `ferry demo`: two host daemons on loopback, a VM migrated live between them in the
//! middle of its work, and the result compared with an unmigrated run.
//!
//! Three workloads: the embedded default (mlp-train on synthetic data: nothing to
//! download), a GGUF language model answering a question (`--model FILE.gguf`: moved in
//! the middle of its answer) and Fashion-MNIST training (`--dataset DIR`: moved in the
//! middle of an epoch).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ferry_api::{Attachment, CreateVm, MigrateRequest};
use ferry_api::{VmInfo, VmState};
use serde_json::json;

use crate::cmd::host::LoopbackPair;
use crate::cmd::migrate::{follow, spinner, summary};
use crate::cmd::{last_field, poll_until};
use ferry_client::ApiClient;

/// Training steps of the default demo VM (about 9 s on a 2-core machine).
const STEPS: u64 = 3000;
/// Migrate once this share of the steps is done.
const MIGRATE_AT: f64 = 0.4;
/// The question the model demo asks (SmolLM2-135M answers it at length).
const PROMPT: &str = "Explain why the sky is blue.";
/// Fashion-MNIST training images per epoch at batch 64 (the last partial batch waits
/// for the next epoch's shuffle).
const FMNIST_STEPS_PER_EPOCH: u64 = 60_000 / 64;

/// `ferry demo`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  ferry demo                                   # embedded MLP training, nothing to download
  scripts/fetch-model && ferry demo --model models/SmolLM2-135M-Instruct.Q4_1.gguf
  ferry demo --model my-llama.gguf --prompt 'Tell me about ships.' --files send
  ferry demo --dataset /usr/share/datasets/fashion-mnist   # apt install dataset-fashion-mnist

With --json the only line on stdout is one JSON object: workload, downtime_ms, total_ms,
rounds, bytes_sent, identical, checksum, reference_checksum, report (and
migrated_at_step, migrated_at_chars or test_acc by workload). Exit 0 when identical, 1
when not (the object says \"identical\": false) or when the demo failed before comparing
(no object; the error is on stderr).")]
pub struct DemoArgs {
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub backend: crate::cmd::backend::BackendArgs,
    /// Training steps of the default (MLP) demo: at least 100, as the VM moves after 40%
    /// of them and must still be training while it moves.
    #[arg(long, default_value_t = STEPS, value_parser = clap::value_parser!(u64).range(100..))]
    pub steps: u64,
    /// A GGUF language model (llama family): the VM answers --prompt with it and moves
    /// to host b in the middle of its answer.
    #[arg(long, value_name = "FILE.gguf", conflicts_with = "dataset")]
    pub model: Option<PathBuf>,
    /// The question for --model.
    #[arg(long, default_value = PROMPT, requires = "model")]
    pub prompt: String,
    /// Most tokens of the answer, for --model: at least 32, as the VM moves in the
    /// middle of its answer (at 120 characters, or 40% of a shorter answer's tokens).
    #[arg(long, value_name = "N", default_value_t = 160, requires = "model",
          value_parser = clap::value_parser!(u32).range(32..))]
    pub max_tokens: u32,
    /// Fashion-MNIST's folder (the four gzipped IDX files of Debian's
    /// dataset-fashion-mnist): the VM trains on it and moves to host b mid-epoch.
    #[arg(long, value_name = "DIR")]
    pub dataset: Option<PathBuf>,
    /// Epochs of the Fashion-MNIST demo.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "dataset")]
    pub epochs: u32,
    /// Attached files (the model, the dataset): `reuse` lets host b use its copy (both
    /// hosts are this machine, so it has one); `send` sends them with the VM.
    #[arg(long, default_value = "reuse", value_parser = ["reuse", "send"])]
    pub files: String,
}

/// What the demo VM does.
enum Workload {
    /// mlp-train on synthetic data, `steps` steps.
    Mlp { steps: u64 },
    /// llm-chat answering `prompt` with the model at `model`.
    Chat {
        model: PathBuf,
        prompt: String,
        max_tokens: u32,
    },
    /// fmnist-train on the dataset in `dir`.
    Fmnist { dir: PathBuf, epochs: u32 },
}

/// `(step, loss)` from `step=N ... loss=X ...` lines (mlp-train, fmnist-train).
fn losses(console: &str) -> Vec<(u64, f64)> {
    console
        .lines()
        .filter_map(|line| {
            let mut step = None;
            let mut loss = None;
            for word in line.split_whitespace() {
                if let Some(v) = word.strip_prefix("step=") {
                    step = v.parse().ok();
                } else if let Some(v) = word.strip_prefix("loss=") {
                    loss = v.parse().ok();
                }
            }
            Some((step?, loss?))
        })
        .collect()
}

/// The answer llm-chat has streamed so far: after its prompt line, up to its summary.
fn answer(console: &str) -> &str {
    let Some(start) = console
        .find("llm-chat: prompt of")
        .and_then(|at| console[at..].find('\n').map(|nl| at + nl + 1))
    else {
        return "";
    };
    let end = console[start..]
        .find("\nllm-chat: ")
        .map_or(console.len(), |at| start + at);
    &console[start..end]
}

/// fmnist-train's `epoch E/N loss=... test_acc=...` lines, without their timing.
fn epochs(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.starts_with("epoch "))
        .map(|l| l.split(" (took").next().unwrap_or(l))
        .collect()
}

impl Workload {
    fn from_args(args: &DemoArgs) -> Self {
        match (&args.model, &args.dataset) {
            (Some(model), _) => Workload::Chat {
                model: model.clone(),
                prompt: args.prompt.clone(),
                max_tokens: args.max_tokens,
            },
            (_, Some(dir)) => Workload::Fmnist {
                dir: dir.clone(),
                epochs: args.epochs,
            },
            _ => Workload::Mlp { steps: args.steps },
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Workload::Mlp { .. } => "mlp-train",
            Workload::Chat { .. } => "llm-chat",
            Workload::Fmnist { .. } => "fmnist-train",
        }
    }

    fn request(&self) -> anyhow::Result<CreateVm> {
        let attach = |name: &str, path: PathBuf| Attachment {
            name: name.into(),
            path,
        };
        let words = |s: String| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        let (args, memory, accel_memory, attach) = match self {
            Workload::Mlp { steps } => {
                let every = (steps / 30).max(1);
                let args = format!(
                    "--steps {steps} --hidden 512 --batch 128 --inputs 128 --samples 8192 --print-every {every}"
                );
                (words(args), 256 << 20, 256 << 20, Vec::new())
            }
            Workload::Chat {
                model,
                prompt,
                max_tokens,
            } => {
                if !model.is_file() {
                    bail!(
                        "no model file at {} (scripts/fetch-model fetches SmolLM2-135M-Instruct)",
                        model.display()
                    );
                }
                let args = vec![
                    "--prompt".into(),
                    prompt.clone(),
                    "--max-tokens".into(),
                    max_tokens.to_string(),
                ];
                (
                    args,
                    256 << 20,
                    512 << 20,
                    vec![attach("model", model.clone())],
                )
            }
            Workload::Fmnist { dir, epochs } => {
                let files = [
                    ("train-images", "train-images-idx3-ubyte.gz"),
                    ("train-labels", "train-labels-idx1-ubyte.gz"),
                    ("test-images", "t10k-images-idx3-ubyte.gz"),
                    ("test-labels", "t10k-labels-idx1-ubyte.gz"),
                ];
                let mut attached = Vec::new();
                for (name, file) in files {
                    let path = dir.join(file);
                    if !path.is_file() {
                        bail!(
                            "no {} (apt install dataset-fashion-mnist puts Fashion-MNIST in /usr/share/datasets/fashion-mnist)",
                            path.display()
                        );
                    }
                    attached.push(attach(name, path));
                }
                let args = format!("--epochs {epochs} --log-every 100");
                (words(args), 512 << 20, 256 << 20, attached)
            }
        };
        Ok(CreateVm {
            name: None,
            workload: self.name().into(),
            args,
            memory,
            accel_memory,
            attach,
            backend: None,
            idempotency_key: None,
        })
    }

    /// How far the run is (steps, or characters of the answer), from its console.
    fn progress(&self, console: &str) -> u64 {
        match self {
            Workload::Chat { .. } => answer(console).chars().count() as u64,
            _ => losses(console).last().map_or(0, |&(s, _)| s),
        }
    }

    /// How far the run is, in words.
    fn progress_text(&self, console: &str) -> String {
        let done = self.progress(console);
        match self {
            Workload::Mlp { steps } => format!("step {done} of {steps}"),
            Workload::Chat { .. } => format!("{done} characters of its answer"),
            Workload::Fmnist { epochs, .. } => format!(
                "step {done} of {}",
                u64::from(*epochs) * FMNIST_STEPS_PER_EPOCH
            ),
        }
    }

    /// Where to move the VM, in the units of [`Self::progress`], and what that is.
    fn migrate_at(&self) -> (u64, String) {
        match self {
            Workload::Mlp { steps } => {
                let at = (*steps as f64 * MIGRATE_AT) as u64;
                (at, format!("step {at}"))
            }
            // A few sentences in, or less of a short answer asked for (about four
            // characters a token).
            Workload::Chat { max_tokens, .. } => {
                let at = (f64::from(*max_tokens) * 4.0 * MIGRATE_AT).clamp(1.0, 120.0) as u64;
                (at, format!("{at} characters into its answer"))
            }
            Workload::Fmnist { epochs, .. } => {
                let at = (f64::from(*epochs) * FMNIST_STEPS_PER_EPOCH as f64 * MIGRATE_AT) as u64;
                let at = at.next_multiple_of(100);
                let epoch = at / FMNIST_STEPS_PER_EPOCH + 1;
                (at, format!("step {at}, in epoch {epoch}"))
            }
        }
    }

    /// Shows the run: what happened on host a, then on host b, marking the move.
    fn show(
        &self,
        console: &str,
        moved_at: u64,
        say: &dyn Fn(String) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Workload::Mlp { .. } => {
                say("loss curve (one run, two hosts):".into())?;
                let curve = losses(console);
                let every = (curve.len() / 12).max(1);
                for (i, &(step, loss)) in curve.iter().enumerate() {
                    if i % every == 0 || i + 1 == curve.len() || step == moved_at {
                        let host = if step <= moved_at { "a" } else { "b" };
                        let mark = if step == moved_at {
                            "   <- last step on host a; migrated here"
                        } else {
                            ""
                        };
                        say(format!(
                            "  step {step:>6}  loss {loss:.6}  (host {host}){mark}"
                        ))?;
                    }
                }
            }
            Workload::Chat { .. } => {
                let text = answer(console);
                let split = text
                    .char_indices()
                    .nth(moved_at as usize)
                    .map_or(text.len(), |(i, _)| i);
                say("the answer (one run, two hosts):".into())?;
                say(format!(
                    "{}\u{27e8}moved from host a to host b here\u{27e9}{}",
                    &text[..split],
                    &text[split..]
                ))?;
            }
            Workload::Fmnist { .. } => {
                say("test accuracy per epoch (one run, two hosts):".into())?;
                let moved_epoch = moved_at / FMNIST_STEPS_PER_EPOCH + 1;
                for line in epochs(console) {
                    let n: u64 = line
                        .strip_prefix("epoch ")
                        .and_then(|r| r.split('/').next())
                        .and_then(|e| e.parse().ok())
                        .unwrap_or(0);
                    let host = match n.cmp(&moved_epoch) {
                        std::cmp::Ordering::Less => "host a",
                        std::cmp::Ordering::Equal => "host a, then b",
                        std::cmp::Ordering::Greater => "host b",
                    };
                    say(format!("  {line}  ({host})"))?;
                }
            }
        }
        Ok(())
    }

    /// What must be equal between the migrated and the unmigrated runs.
    fn result(&self, console: &str) -> anyhow::Result<String> {
        let checksum = last_field(console, "checksum")
            .context("the run printed no checksum")?
            .to_string();
        Ok(match self {
            Workload::Chat { .. } => format!("{checksum} {}", answer(console)),
            Workload::Fmnist { .. } => format!("{checksum} {}", epochs(console).join("\n")),
            Workload::Mlp { .. } => checksum,
        })
    }
}

/// Waits for VM `id` on `client` to end, showing on a spinner (unless `quiet`) how far
/// its `workload` is; returns its console.
fn wait_end(
    client: &ApiClient,
    id: &str,
    (workload, quiet): (&Workload, bool),
    timeout: Duration,
) -> anyhow::Result<String> {
    let what = format!("VM {id} to end");
    let bar = spinner(quiet);
    let ended = poll_until(&what, timeout, || {
        let vm: VmInfo = client.get(&format!("/v1/vms/{id}"))?;
        match &vm.state {
            VmState::Exited { .. } => client_console(client, id).map(Some),
            state if state.is_running() => {
                if !bar.is_hidden() {
                    let console = client_console(client, id)?;
                    bar.set_message(format!("{id}: {}", workload.progress_text(&console)));
                }
                Ok(None)
            }
            other => bail!("VM {id} ended: it is {other}"),
        }
    });
    bar.finish_and_clear();
    ended
}

/// VM `id`'s whole console tail (64 KiB).
fn client_console(client: &ApiClient, id: &str) -> anyhow::Result<String> {
    Ok(client.get_text(&format!("/v1/vms/{id}/console"))?)
}

/// `ferry demo`.
pub fn demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let say = |line: String| {
        if !args.json {
            // Lines quote the guest's console (a model's answer).
            super::print_line(format_args!("{}", super::guest_text(&line)))?;
        }
        Ok(())
    };
    ferry_vmm::check_kvm().map_err(|e| anyhow::anyhow!("the demo runs VMs on KVM: {e}"))?;
    let workload = Workload::from_args(args);
    let request = workload.request()?;
    let pair = LoopbackPair::start(4 << 30, args.backend.resolve()?)?;
    let (a, b, ca, cb) = (&pair.a, &pair.b, &pair.client_a, &pair.client_b);
    say(format!(
        "host a: API http://{}, migrations {}\nhost b: API http://{}, migrations {}",
        a.api_addr, a.migration_addr, b.api_addr, b.migration_addr
    ))?;

    let vm: VmInfo = ca.post("/v1/vms", &request)?;
    let id = vm.id;
    let files: Vec<String> = request
        .attach
        .iter()
        .map(|f| format!(" --attach {}={}", f.name, f.path.display()))
        .collect();
    // Quoted as a shell would need them, so the line can be copied (a prompt has spaces).
    let args_shown = shlex::try_join(request.args.iter().map(String::as_str))
        .unwrap_or_else(|_| request.args.join(" "));
    say(format!(
        "started {id} on host a: {}{} -- {args_shown} ({} MiB RAM, {} MiB accelerator memory)",
        request.workload,
        files.concat(),
        request.memory >> 20,
        request.accel_memory >> 20
    ))?;

    // Let it work for a while, then move it.
    let (migrate_at, where_) = workload.migrate_at();
    let what = format!("the VM to reach {where_}");
    poll_until(&what, Duration::from_secs(120), || {
        let progress = workload.progress(&client_console(ca, &id)?);
        if progress >= migrate_at {
            return Ok(Some(()));
        }
        let vm: VmInfo = ca.get(&format!("/v1/vms/{id}"))?;
        if vm.state != VmState::Running {
            let why = match (&vm.state, &workload) {
                (VmState::Exited { code: 0 }, Workload::Chat { .. }) => format!(
                    ": the answer ended after {progress} characters; ask for a longer one \
                     (a --prompt that needs one, or a larger --max-tokens)"
                ),
                (VmState::Exited { code: 0 }, _) => ": it finished first".into(),
                // The guest said why (a file it cannot use, say): its last lines.
                _ => {
                    let console = client_console(ca, &id).unwrap_or_default();
                    let lines: Vec<&str> =
                        console.lines().filter(|l| !l.trim().is_empty()).collect();
                    let last = lines[lines.len().saturating_sub(3)..].join("\n  ");
                    format!("; its console ends:\n  {last}")
                }
            };
            bail!(
                "the VM {} before the migration point ({where_}){why}",
                vm.state
            );
        }
        Ok(None)
    })?;
    say(format!(
        "{id} reached {where_}: migrating it live to host b ..."
    ))?;
    let bar = spinner(args.json);
    let migrate = MigrateRequest {
        files: args.files.clone(),
        ..MigrateRequest::to(&b.migration_addr.to_string())
    };
    let report = follow(ca, &id, &migrate, &bar);
    bar.finish_and_clear();
    let report = report?;
    let moved_at = workload.progress(&client_console(ca, &id)?);
    say(format!("  {}", summary(&report)))?;
    let on_a: VmInfo = ca.get(&format!("/v1/vms/{id}"))?;
    say(format!(
        "  host a now shows {id} as {}; host b runs it",
        on_a.state.name()
    ))?;

    let console = wait_end(cb, &id, (&workload, args.json), Duration::from_secs(300))?;
    workload.show(&console, moved_at, &say)?;
    let result = workload.result(&console)?;

    say("reference: the same workload without migration, on host a ...".into())?;
    let reference: VmInfo = ca.post("/v1/vms", &request)?;
    let ref_id = reference.id;
    let ref_console = wait_end(
        ca,
        &ref_id,
        (&workload, args.json),
        Duration::from_secs(300),
    )?;
    let ref_result = workload.result(&ref_console)?;
    let checksum = last_field(&console, "checksum").unwrap_or_default();
    let ref_checksum = last_field(&ref_console, "checksum").unwrap_or_default();
    let identical = result == ref_result;
    let compared = match workload {
        Workload::Mlp { .. } => "final checksum",
        Workload::Chat { .. } => "answer text and token checksum",
        Workload::Fmnist { .. } => "accuracy per epoch and weights checksum",
    };
    say(format!(
        "{compared}: migrated {checksum} vs unmigrated {ref_checksum}: {}",
        if identical {
            "IDENTICAL — the workload did not notice the move"
        } else {
            "DIFFERENT"
        }
    ))?;
    if args.json {
        let mut out = json!({
            "workload": workload.name(),
            "downtime_ms": report.downtime_ms,
            "total_ms": report.total_ms,
            "rounds": report.rounds,
            "bytes_sent": report.bytes_sent,
            "identical": identical,
            "checksum": checksum,
            "reference_checksum": ref_checksum,
            "report": report,
        });
        match workload {
            Workload::Mlp { .. } => out["migrated_at_step"] = json!(moved_at),
            Workload::Chat { .. } => out["migrated_at_chars"] = json!(moved_at),
            Workload::Fmnist { .. } => {
                out["migrated_at_step"] = json!(moved_at);
                out["test_acc"] = json!(last_field(&console, "test_acc"));
            }
        }
        super::print_line(format_args!("{out}"))?;
    }
    if !identical {
        // On stderr too, where a script (or --json's reader) looks for what went wrong.
        eprintln!("ferry: error: the migrated run's {compared} differs from the unmigrated run's");
    }
    Ok(if identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
