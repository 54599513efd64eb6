//! `ferry vm ...`: VMs on a host daemon, through its API.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_api::{MigrationStatus, VmInfo, VmState};
use ferry_migrate::Purpose;

use crate::cmd::host::SecretArgs;
use crate::cmd::say;
use ferry_client::{ApiClient, DEFAULT_HOST};

/// Which daemon to talk to, and with which credential.
#[derive(Args, Clone)]
pub struct HostAddr {
    /// The host daemon's API.
    #[arg(long = "host", value_name = "URL", env = "FERRY_HOST", default_value = DEFAULT_HOST, global = true)]
    pub url: String,
    /// File holding an operator's API token of the host (its --api-tokens). Default: the
    /// FERRY_API_TOKEN environment variable; without either, the host-API key derived
    /// from the cluster secret (--secret-file or FERRY_SECRET), which is never sent.
    #[arg(long, value_name = "FILE", global = true)]
    pub api_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub roots: crate::cmd::center::RootsArgs,
}

impl HostAddr {
    /// A client for it.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        // A flag wins over the environment; an empty variable counts as unset.
        let from_env = std::env::var("FERRY_API_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let token = match (&self.api_token_file, &self.secret.secret_file, from_env) {
            (Some(path), _, _) => {
                let text = super::read_token_file(path).with_context(|| {
                    format!("cannot read the API token file {}", path.display())
                })?;
                operator_token(&text, &format!("the API token file {}", path.display()))?
            }
            (None, None, Some(token)) => operator_token(&token, "FERRY_API_TOKEN")?,
            // A secret that was given but is wrong is that, not a lack of credentials.
            (None, None, None) if std::env::var_os("FERRY_SECRET").is_none() => self
                .secret
                .secret()
                .context("no credentials for the host API: give an operator's token (--api-token-file FILE or FERRY_API_TOKEN) or the cluster's secret")?
                .token(Purpose::HostApi),
            (None, _, _) => self.secret.secret()?.token(Purpose::HostApi),
        };
        Ok(ApiClient::with_roots(
            &self.url,
            token.as_bytes(),
            &self.roots.roots()?,
        )?)
    }
}

/// An operator's token as `from` (a file, a variable) gives it, checked here: an empty
/// one would be sent as no token at all, and one no header can carry would fail as if
/// the API could not be reached.
fn operator_token(text: &str, from: &str) -> anyhow::Result<String> {
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("{from} is empty: it should hold an API token from the host's --api-tokens");
    }
    if !ferry_http::tokens::is_header_token(token) {
        anyhow::bail!("{from}: {}", ferry_http::tokens::NOT_A_HEADER_TOKEN);
    }
    Ok(token.to_string())
}

/// `ferry vm`.
#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
    #[command(flatten)]
    host: HostAddr,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// Parses a VM id as the APIs take it (checked here, since it goes into a URL path).
pub fn parse_vm_id(id: &str) -> Result<String, String> {
    if ferry_api::valid_vm_id(id) {
        Ok(id.to_string())
    } else {
        Err(format!(
            "'{id}' is not a VM id: ids are {} (`ferry vm list` shows them)",
            ferry_api::ID_RULE
        ))
    }
}

/// Checks `--name` as the host and the center do, so that a bad one is a usage error.
fn parse_vm_name(name: &str) -> Result<String, String> {
    if ferry_api::valid_vm_name(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "'{name}' is not a VM name: {}",
            ferry_api::NAME_RULE
        ))
    }
}

/// `ferry vm create`'s arguments.
#[derive(Args)]
struct CreateArgs {
    /// Let the cluster center at URL place the VM (instead of --host).
    #[arg(long, value_name = "URL", env = "FERRY_CENTER")]
    center: Option<String>,
    /// With --center: put it on this host rather than let the center choose.
    #[arg(long, value_name = "HOST", requires = "center")]
    on: Option<String>,
    #[command(flatten)]
    token: crate::cmd::center::TokenArgs,
    /// Built-in workload (see `ferry workloads`) or a guest ELF path on the host, under
    /// one of its `--attach-dir` folders.
    workload: String,
    /// A name for the VM; clients of the center's OpenAI API name a serving VM by it
    /// (or by its id) as `model`.
    #[arg(long, value_name = "NAME", value_parser = parse_vm_name)]
    name: Option<String>,
    /// Guest RAM: a multiple of 2 MiB, 16M to 64G.
    #[arg(short, long, value_name = "SIZE", default_value = "256M", value_parser = crate::size::parse_ram)]
    memory: u64,
    /// Accelerator memory: whole 4 KiB pages, at most 64 GiB; 0 (the default) gives the
    /// VM no accelerator.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = crate::size::parse_accel_memory)]
    accel_memory: u64,
    /// Attach a read-only file on the host, found by the guest as NAME (repeatable):
    /// `--attach model=/models/SmolLM2-135M-Instruct.Q4_1.gguf`. It moves with the VM.
    #[arg(long, value_name = "NAME=PATH", value_parser = crate::attach::parse_attach)]
    attach: Vec<(String, std::path::PathBuf)>,
    /// Its accelerator's backend: `cpu`, `cuda` (a GPU, whatever its kind) or an exact
    /// kind such as `cuda-sm_90-d13` (default: the host's `--backend`). With --center,
    /// only hosts that run it are chosen.
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// A key for this create (1 to 63 letters, digits, '.', '_', '-'; default: a fresh
    /// one). A create whose answer is lost is sent again with it, and the host or
    /// center answers with the VM the first made instead of making another; a script
    /// that runs `ferry vm create` again after a failure passes the same key.
    #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
    idempotency_key: Option<String>,
    /// Guest arguments (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Create and start a VM on the host, or, with --center, on the host the cluster
    /// center chooses (the one with the most free accelerator memory that fits it).
    Create(Box<CreateArgs>),
    /// List the host's VMs.
    List,
    /// Show one VM, with its console tail.
    Show {
        /// VM id.
        #[arg(value_parser = parse_vm_id)]
        id: String,
    },
    /// Print a VM's console output (its last 64 KiB).
    Console {
        /// VM id.
        #[arg(value_parser = parse_vm_id)]
        id: String,
    },
    /// Stop a VM and forget it: its record and console go (read `ferry vm console ID`
    /// first to keep its output); an ended VM's record is forgotten. A VM being migrated
    /// is not stopped (cancel the migration first with `ferry migrate ID --cancel`), nor
    /// one in doubt, nor one that migrated away (the answer says where it runs).
    Stop {
        /// VM id.
        #[arg(value_parser = parse_vm_id)]
        id: String,
    },
    /// Settle a VM left in doubt by a broken switchover (paused here; the destination
    /// may or may not run it). The host settles it by itself when it can ask the
    /// destination (or the center); without a flag this shows what it found so far.
    #[command(after_help = "Examples:\n  ferry vm resolve a-vm1\n  \
        ferry vm resolve a-vm1 --release   # it runs on the destination: drop the copy here\n  \
        ferry vm resolve a-vm1 --resume    # the destination does not run it: run it here\n\n\
        The host asks the destination (or the center) first and refuses a settlement its\n\
        answer contradicts. Only when nobody answers does it act on the flag alone; then\n\
        resuming a VM that does run on the destination runs it twice: check the destination\n\
        (`ferry vm show ID --host ITS_API`) first.")]
    Resolve {
        /// VM id.
        #[arg(value_parser = parse_vm_id)]
        id: String,
        /// Run it here: the destination does not run it.
        #[arg(long, conflicts_with = "release")]
        resume: bool,
        /// Release it here: it runs on the destination.
        #[arg(long)]
        release: bool,
    },
}

fn print_vm(vm: &VmInfo) {
    say!(
        "{:<14} {:<12} {:<14} ram {:>6} MiB  accel {:>6} MiB  up {:>8.1} s",
        vm.id,
        vm.workload,
        vm.state.name(),
        vm.memory >> 20,
        vm.accel_memory >> 20,
        vm.uptime_ms as f64 / 1e3
    );
}

/// The lines of `ferry vm list`: a header row, then a VM a row.
fn vm_table(vms: &[VmInfo]) -> Vec<String> {
    let row = |cells: [&str; 7]| {
        format!(
            "{:<14} {:<12} {:<12} {:<14} {:>10} {:>10} {:>10}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6]
        )
    };
    let mut lines = vec![row([
        "VM",
        "NAME",
        "WORKLOAD",
        "STATE",
        "MEMORY MiB",
        "ACCEL MiB",
        "UP s",
    ])];
    lines.extend(vms.iter().map(|vm| {
        row([
            &vm.id,
            vm.name.as_deref().unwrap_or("-"),
            &vm.workload,
            vm.state.name(),
            &(vm.memory >> 20).to_string(),
            &(vm.accel_memory >> 20).to_string(),
            &format!("{:.1}", vm.uptime_ms as f64 / 1e3),
        ])
    }));
    lines
}

/// How many times a create whose answer was lost, or that found its first try still
/// under way, is sent again (after 1, 2, 4 and 8 s).
const CREATE_RETRIES: u32 = 4;
/// After how long a create is not sent again: an API that takes requests and answers
/// none costs a minute a try, and five tries were five minutes of silence.
const CREATE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(90);

/// `POST /v1/vms` of `create` (which carries an idempotency key), sent again up to
/// [`CREATE_RETRIES`] times, within [`CREATE_PATIENCE`], while its answer is lost on the
/// way or the API answers 503 (the first try is still under way, or the host is briefly
/// unavailable): the key makes the API answer a repeat with the VM the first made.
fn send_create<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    client: &ApiClient,
    create: &B,
    key: &str,
) -> anyhow::Result<T> {
    send_create_within(client, create, key, CREATE_PATIENCE)
}

/// [`send_create`], not sending again once `patience` has passed since the first try.
fn send_create_within<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    client: &ApiClient,
    create: &B,
    key: &str,
    patience: std::time::Duration,
) -> anyhow::Result<T> {
    let started = std::time::Instant::now();
    let mut tries = 0;
    loop {
        match client.post("/v1/vms", create) {
            Err(e)
                if tries < CREATE_RETRIES
                    && started.elapsed() < patience
                    && worth_sending_again(&e) =>
            {
                let e = super::error_text(&format!("{e:#}")).into_owned();
                eprintln!("ferry: {e}; sending the create again with the same idempotency key");
                std::thread::sleep(std::time::Duration::from_secs(1 << tries));
                tries += 1;
            }
            // The VM may have been made (or be under way): the same command without the
            // key would make a second one.
            Err(e) if worth_sending_again(&e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the create may have been made: send it again with --idempotency-key {key} to get its VM, not a second one"
                )))
            }
            answered => return Ok(answered?),
        }
    }
}

/// Whether a create that failed with `e` may find its VM made, or be made, if sent again.
fn worth_sending_again(e: &ferry_client::ClientError) -> bool {
    e.unanswered() || e.api().is_some_and(|a| a.status == 503)
}

/// Checks `--idempotency-key`.
fn parse_idempotency_key(key: &str) -> Result<String, String> {
    ferry_api::check_idempotency_key(key).map(|()| key.to_string())
}

/// What a host answered to a `ferry vm` command.
enum Answer {
    /// One VM (create, show, stop).
    One(Box<VmInfo>),
    /// Its VMs (list).
    Many(Vec<VmInfo>),
}

/// Whether `flag` was typed on this process's command line (before any `--`, after which
/// the words are a guest's), as `--flag VALUE` or `--flag=VALUE`: clap tells a value
/// from the environment apart from a typed one only through its matches.
fn typed_flag(flag: &str) -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|v| v.starts_with('=')))
}

/// `ferry vm ...`.
pub fn vm(args: &VmArgs) -> anyhow::Result<()> {
    // Made only when needed: creating through the center needs no host secret.
    let host = || args.host.client();
    let out = match &args.command {
        VmCommand::Create(create) => {
            let CreateArgs {
                center,
                on,
                token,
                workload,
                name,
                memory,
                accel_memory,
                attach,
                backend,
                idempotency_key,
                args: guest_args,
            } = create.as_ref();
            let vm = ferry_api::CreateVm {
                workload: workload.clone(),
                name: name.clone(),
                args: guest_args.clone(),
                memory: *memory,
                accel_memory: *accel_memory,
                attach: attach
                    .iter()
                    .map(|(name, path)| ferry_api::Attachment {
                        name: name.clone(),
                        path: path.clone(),
                    })
                    .collect(),
                backend: backend.clone(),
                idempotency_key: Some(
                    (idempotency_key.clone())
                        .unwrap_or_else(|| ferry_api::fresh_idempotency_key("cli")),
                ),
            };
            let key = vm.idempotency_key.clone().unwrap_or_default();
            let Some(center) = center else {
                let created = send_create(&host()?, &vm, &key)?;
                return finish(args, Answer::One(Box::new(created)));
            };
            // A center from FERRY_CENTER must not quietly overrule a --host typed here.
            if typed_flag("--host") {
                anyhow::bail!(
                    "both --host and a center (--center or FERRY_CENTER) say where to create the VM: give one (with a center, --on HOST picks the host)"
                );
            }
            let roots = args.host.roots.roots()?;
            let client = ApiClient::with_roots(center, &token.token()?, &roots)?;
            let placed: ferry_center::Placed = send_create(
                &client,
                &ferry_center::PlaceVm {
                    vm,
                    host: on.clone(),
                },
                &key,
            )?;
            if args.json {
                println!("{}", serde_json::to_string(&placed)?);
            } else {
                print_vm(&placed.vm);
                say!("placed on host {}", placed.host);
            }
            return Ok(());
        }
        VmCommand::List => Answer::Many(host()?.get("/v1/vms")?),
        VmCommand::Show { id } => Answer::One(Box::new(host()?.get(&format!("/v1/vms/{id}"))?)),
        VmCommand::Console { id } => {
            let text = host()?.get_text(&format!("/v1/vms/{id}/console"))?;
            if args.json {
                println!("{}", serde_json::to_string(&text)?);
            } else {
                print!("{}", super::guest_text(&text));
            }
            return Ok(());
        }
        VmCommand::Stop { id } => Answer::One(Box::new(host()?.delete(&format!("/v1/vms/{id}"))?)),
        VmCommand::Resolve {
            id,
            resume,
            release,
        } => {
            let client = host()?;
            let status: MigrationStatus = if *resume || *release {
                let action = if *resume { "resume" } else { "release" };
                client.post(
                    &format!("/v1/vms/{id}/resolve"),
                    &serde_json::json!({ "action": action }),
                )?
            } else {
                client.get(&format!("/v1/vms/{id}/migration"))?
            };
            if args.json {
                println!("{}", serde_json::to_string(&status)?);
                return Ok(());
            }
            let vm: VmInfo = client.get(&format!("/v1/vms/{id}"))?;
            print_vm(&vm);
            if let Some(error) = &status.error {
                say!("migration: {error}");
            }
            for line in &status.settlement {
                say!("  {line}");
            }
            return Ok(());
        }
    };
    finish(args, out)
}

/// Prints a host's answer to a `ferry vm` command.
fn finish(args: &VmArgs, out: Answer) -> anyhow::Result<()> {
    if args.json {
        let text = match &out {
            Answer::One(vm) => serde_json::to_string(vm)?,
            Answer::Many(vms) => serde_json::to_string(vms)?,
        };
        say!("{text}");
        return Ok(());
    }
    match (&args.command, &out) {
        (VmCommand::List, Answer::Many(vms)) => {
            if vms.is_empty() {
                say!("no VMs");
            } else {
                vm_table(vms).iter().for_each(|line| say!("{line}"));
            }
        }
        (VmCommand::Show { .. }, Answer::One(vm)) => {
            print_vm(vm);
            // Where it went, why it failed, what to do when in doubt: more than its name.
            if !matches!(
                vm.state,
                VmState::Creating | VmState::Running | VmState::Stopping | VmState::Stopped
            ) {
                say!("state: {}", vm.state);
            }
            say!(
                "--- console (last lines) ---\n{}",
                super::guest_text(&vm.console_tail)
            );
        }
        (_, Answer::One(vm)) => print_vm(vm),
        (_, Answer::Many(vms)) => vms.iter().for_each(print_vm),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_list_puts_each_value_under_its_header() {
        let vm: VmInfo = serde_json::from_value(serde_json::json!({
            "id": "vm-1a2b3c4d", "workload": "llm-serve", "name": "chat", "args": [],
            "state": "running", "memory": 256u64 << 20, "accel_memory": 1u64 << 30,
            "uptime_ms": 61_300, "since_unix_ms": 0, "migrated_from": null,
            "console_tail": ""
        }))
        .unwrap();
        let lines = vm_table(&[vm]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (column, value) in [
            ("VM", "vm-1a2b3c4d"),
            ("NAME", "chat"),
            ("WORKLOAD", "llm-serve"),
            ("STATE", "running"),
        ] {
            assert_eq!(lines[0].find(column), lines[1].find(value), "{lines:?}");
        }
        // Numbers are right-aligned: each ends where its header does.
        for (column, value) in [
            ("MEMORY MiB", "256"),
            ("ACCEL MiB", "1024"),
            ("UP s", "61.3"),
        ] {
            let end = |line: &str, word: &str| line.find(word).map(|at| at + word.len());
            assert_eq!(end(&lines[0], column), end(&lines[1], value), "{lines:?}");
        }
    }

    /// An API at which every request arrives and its connection is then cut; it counts
    /// them.
    fn cutting_api() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let _ = stream.read(&mut [0u8; 4096]);
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        (base, seen)
    }

    #[test]
    fn a_create_whose_answers_are_lost_is_not_sent_again_past_its_patience() {
        let (base, seen) = cutting_api();
        let client = ApiClient::new(&base, b"token").unwrap();
        let e = send_create_within::<_, serde_json::Value>(
            &client,
            &1,
            "k",
            std::time::Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("--idempotency-key k"), "{e:#}");
        // The first try, and one more a second later: not the four more of 15 s.
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
