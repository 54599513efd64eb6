//! `ferry center ...` (the cluster manager and its clients) and
//! `ferry host maintenance ...`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_api::MigrationState;
use ferry_center::balance::BalancePlan;
use ferry_center::inventory::MigrationRecord;
use ferry_center::operations::{BalanceOutcome, Operation, OperationState};
use ferry_center::{Center, CenterConfig, ClusterView, StoreConfig};
use ferry_client::ApiClient;

use crate::cmd::host::SecretArgs;
use crate::cmd::migrate::spinner;
use crate::cmd::poll_every;
use crate::cmd::say;

/// Default address of the center's API.
pub const DEFAULT_CENTER: &str = "http://127.0.0.1:7000";

/// Which center to talk to, and the operator token.
#[derive(Args, Clone)]
pub struct CenterAddr {
    /// The center's API.
    #[arg(long = "center", value_name = "URL", env = "FERRY_CENTER", default_value = DEFAULT_CENTER, global = true)]
    pub url: String,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub roots: RootsArgs,
}

impl CenterAddr {
    /// A client for it.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::with_roots(
            &self.url,
            &self.token.token()?,
            &self.roots.roots()?,
        )?)
    }
}

/// Which certificate authority an `https://` API must be signed by.
#[derive(Args, Clone)]
pub struct RootsArgs {
    /// The cluster CA (PEM) an `https://` API's certificate must chain to. Default: the
    /// FERRY_TLS_CA environment variable; without either, the web's public roots.
    #[arg(long = "tls-ca", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
}

impl RootsArgs {
    /// The roots to trust.
    pub fn roots(&self) -> anyhow::Result<ferry_client::Roots> {
        let path = self
            .tls_ca
            .clone()
            .or_else(|| std::env::var_os("FERRY_TLS_CA").map(PathBuf::from));
        let Some(path) = path else {
            return Ok(ferry_client::Roots::Web);
        };
        let pem = std::fs::read(&path)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?;
        ferry_client::Roots::from_pem(&pem).with_context(|| format!("{}", path.display()))
    }
}

/// How commands find the operator token of the center.
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// File holding the center's operator token. Default: the FERRY_CENTER_TOKEN
    /// environment variable.
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token from --token-file or FERRY_CENTER_TOKEN.
    pub fn token(&self) -> anyhow::Result<Vec<u8>> {
        let text = match &self.token_file {
            Some(path) => super::read_token_file(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?,
            None => std::env::var("FERRY_CENTER_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "no center token: pass --token-file FILE or set FERRY_CENTER_TOKEN to the token the center was started with (for a new center, make one: export FERRY_CENTER_TOKEN={})",
                    crate::cmd::MAKE_SECRET
                )
            })?,
        };
        let token = text.trim();
        if token.len() < 16 {
            bail!("the center token must be at least 16 characters");
        }
        if !ferry_http::tokens::is_header_token(token) {
            let from = match &self.token_file {
                Some(path) => path.display().to_string(),
                None => "FERRY_CENTER_TOKEN".to_string(),
            };
            bail!(
                "the center token of {from}: {}",
                ferry_http::tokens::NOT_A_HEADER_TOKEN
            );
        }
        Ok(token.as_bytes().to_vec())
    }
}

/// `ferry center`.
#[derive(Args)]
pub struct CenterArgs {
    #[command(subcommand)]
    command: CenterCommand,
}

impl CenterArgs {
    /// Whether it runs the center daemon (not a client command).
    pub fn serves(&self) -> bool {
        matches!(self.command, CenterCommand::Serve(_))
    }
}

#[derive(Subcommand)]
enum CenterCommand {
    /// Run the cluster manager: inventory, placement, maintenance, balancing, dashboard.
    #[command(after_help = API_HELP)]
    Serve(Box<ServeArgs>),
    /// Show hosts, VMs and recent migrations.
    Status {
        #[command(flatten)]
        center: CenterAddr,
        /// Print the cluster view as JSON: hosts, migrations, operations, and the first
        /// 1,000 VMs (`vms_total` counts them all; `ferry vm list --host URL` lists a
        /// host's own).
        #[arg(long)]
        json: bool,
    },
    /// Even out accelerator load and memory across hosts with live migrations.
    #[command(after_help = BALANCE_HELP)]
    Balance {
        #[command(flatten)]
        center: CenterAddr,
        /// Show the plan; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON: the plan (dry run), or the finished operation.
        #[arg(long)]
        json: bool,
    },
}

const BALANCE_HELP: &str = "\
The rule: each host in service has a pressure, the larger of its accelerator memory use
(used / capacity) and its accelerator load (busy devices / devices it runs at full speed).
When the most and least pressured hosts differ by more than the threshold (ferry center
serve --balance-threshold, default 0.2), the planner takes the busiest host and makes the
one move of one of its VMs, to a host with room, that narrows the spread most; it repeats
until the spread is within the threshold or no move narrows it. Every move is a live
migration, verified on the destination.";

const API_HELP: &str = "\
API (operators send 'Authorization: Bearer <center token>'; errors are
{\"error\": \"...\", \"code\": \"...\"}, on the OpenAI routes in OpenAI's shape):
  GET    /                             the dashboard (asks for the token)
  GET    /v1/cluster?vms=N             hosts, VMs (at most N, default 1000, those needing
                                       attention first), migrations, operations, events,
                                       this replica and the leader
  GET    /v1/hosts, /v1/hosts/NAME     status (up/down), mode, capacity, load, pressure
  DELETE /v1/hosts/NAME[?with_vms=true]  forget a silent host (and its VMs' records)
  POST   /v1/hosts/NAME/maintenance    move its VMs off live, then hold it in maintenance
  DELETE /v1/hosts/NAME/maintenance    return it to service
  GET    /v1/vms                       VMs and where they run
  POST   /v1/vms                       create where there is room: {\"workload\", \"args\",
                                       \"memory\", \"accel_memory\", \"name\", \"attach\",
                                       \"backend\", \"host\"}: only \"workload\" is
                                       required (fields as in `ferry host serve --help`)
  GET    /v1/migrations                the last 1,000 migrations the center ordered, with pauses
  GET    /v1/operations/ID             a maintenance or balance operation
  GET    /v1/balance                   the balance plan now
  POST   /v1/balance                   {\"dry_run\": false} carries it out
  GET    /v1/events?n=100              recent events
  GET    /metrics                      Prometheus metrics (same token)
  GET    /v1/models, /v1/models/MODEL  the serving VMs, as OpenAI's API lists models
  POST   /v1/chat/completions          OpenAI's chat completions, relayed to the VM
                                       serving \"model\" wherever it runs (\"stream\": true: SSE)
  POST   /v1/completions               OpenAI's completions, likewise
  POST   /v1/heartbeat                 hosts only, with the heartbeat key derived from the secret
  POST   /v1/settle                    hosts only (same key): relays an in-doubt question

Example:
  export FERRY_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')
  export FERRY_CENTER_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')
  ferry center serve --listen 127.0.0.1:7000 &
  ferry host serve --name a --listen 127.0.0.1:7070 --migration-listen 127.0.0.1:7071 \\
      --center http://127.0.0.1:7000 &
  ferry host serve --name b --listen 127.0.0.1:7080 --migration-listen 127.0.0.1:7081 \\
      --center http://127.0.0.1:7000 &
  ferry vm create --center http://127.0.0.1:7000 --accel-memory 256M mlp-train
  ferry host maintenance enter a --center http://127.0.0.1:7000

Replicas: with --etcd URLS every replica shares the state in etcd; one is elected leader
(it writes and runs operations), the others serve reads and forward writes to it. Give
hosts and commands every replica: --center http://c1:7000,http://c2:7000,http://c3:7000.
Without etcd's quorum writes are refused (503 store_unavailable) and reads still answer.";

/// `ferry center serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address of the API and dashboard.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7000")]
    pub listen: String,
    /// SQLite database with the inventory and history (created if missing), for a
    /// single center.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "ferry-center.db",
        conflicts_with = "etcd"
    )]
    pub db: PathBuf,
    /// Keep the state in etcd at these client URLs (comma-separated) instead, shared by
    /// several center replicas: one is elected leader (it writes and runs operations);
    /// the others serve reads and forward writes to it.
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// The prefix of the center's keys in etcd (several clusters may share one etcd).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/ferry/",
        requires = "etcd"
    )]
    pub etcd_prefix: String,
    /// This replica's name among the replicas (default: the listen address).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the other replicas reach this one's API, to forward writes to it while it
    /// leads (default: http(s)://the listen address; needed with --etcd when listening on
    /// 0.0.0.0).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// A host whose heartbeats stop for this long is marked down.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    pub down_after_ms: u64,
    /// Migrations run at once when emptying a host or balancing.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub parallel: u64,
    /// Pressure spread (0 to 10) above which the cluster counts as imbalanced; a host's
    /// pressure is a fraction of its capacity (1: full; its load may go beyond).
    #[arg(long, value_name = "X", default_value_t = 0.2, value_parser = parse_balance_threshold)]
    pub balance_threshold: f64,
    /// Also balance on its own every this many seconds.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub balance_every_s: Option<u64>,
    /// More operators' tokens, one per line: `TOKEN`, `TOKEN read-only` (enough for the
    /// dashboard and /metrics) or `TOKEN serving` (the OpenAI API only, for applications
    /// that ask the models); read again when the file changes, to rotate them.
    #[arg(long, value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    #[command(flatten)]
    pub tls: crate::cmd::tls::TlsArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// Checks `--balance-threshold` when it is parsed, so that one out of range is a usage
/// error (exit 2) like any other bad flag.
fn parse_balance_threshold(text: &str) -> Result<f64, String> {
    let x: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if !(0.0..=10.0).contains(&x) {
        return Err(format!("'{text}': the threshold must be between 0 and 10"));
    }
    Ok(x)
}

/// A running center: where it listens. Dropping it stops its API (the port closes) and
/// its monitor.
pub struct RunningCenter {
    /// API address actually bound.
    pub addr: std::net::SocketAddr,
    /// Where its state is kept, in words.
    pub store: String,
    center: std::sync::Arc<Center>,
    /// The API server, stopped with the center.
    _api: ferry_http::Serving,
}

impl Drop for RunningCenter {
    fn drop(&mut self) {
        self.center.shutdown();
    }
}

/// Starts the center's API on `runtime` and its monitor thread.
pub fn start(
    runtime: &tokio::runtime::Runtime,
    mut config: CenterConfig,
    listen: &str,
) -> anyhow::Result<RunningCenter> {
    let listener = runtime
        .block_on(ferry_http::bind(listen))
        .with_context(|| format!("cannot listen for the center's API on {listen}"))?;
    let addr = listener.local_addr()?;
    if config.name.is_empty() {
        config.name = addr.to_string();
    }
    if config.advertise_url.is_empty() {
        // Replicas forward writes to the leader at the URL it advertises: one bound to
        // every interface would be each follower itself.
        if addr.ip().is_unspecified() && matches!(config.store, StoreConfig::Etcd { .. }) {
            bail!(
                "the center listens on {addr} (every address), which the other replicas cannot be told to reach it at: give --advertise URL"
            );
        }
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        config.advertise_url = format!("{scheme}://{addr}");
    }
    let center = Center::open(config)?;
    let store = center.store_description();
    center
        .start_monitor()
        .context("cannot start the center's monitor thread")?;
    let https = center.config().tls.as_ref().map(|t| t.https_server());
    let router = ferry_center::api::router(center.clone())?;
    let api = ferry_http::spawn(
        runtime.handle(),
        listener,
        router,
        https,
        "the center's API",
    );
    Ok(RunningCenter {
        addr,
        store,
        center,
        _api: api,
    })
}

/// `ferry center ...`.
pub fn center(args: &CenterArgs) -> anyhow::Result<()> {
    match &args.command {
        CenterCommand::Serve(serve) => {
            let store = match &serve.etcd {
                Some(urls) => StoreConfig::Etcd {
                    endpoints: vec![urls.clone()],
                    prefix: serve.etcd_prefix.clone(),
                },
                None => StoreConfig::Sqlite(serve.db.clone()),
            };
            let config = CenterConfig {
                store,
                name: serve.name.clone().unwrap_or_default(),
                advertise_url: serve.advertise.clone().unwrap_or_default(),
                token: serve.token.token()?,
                secret: serve.secret.secret()?,
                api_tokens: serve.api_tokens.clone(),
                tls: serve.tls.config()?,
                down_after: Duration::from_millis(serve.down_after_ms),
                parallel: serve.parallel as usize,
                balance_threshold: serve.balance_threshold,
                balance_every: serve.balance_every_s.map(Duration::from_secs),
            };
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let running = start(&runtime, config, &serve.listen)?;
            if scheme == "http" {
                crate::cmd::host::warn_plain_http(running.addr, "the center's API and dashboard");
            }
            say!(
                "ferry center: API and dashboard on {scheme}://{} ({})",
                running.addr,
                running.store
            );
            runtime.block_on(super::shutdown_signal());
            Ok(())
        }
        CenterCommand::Status { center, json } => {
            let view: ClusterView = center.client()?.get("/v1/cluster")?;
            if *json {
                println!("{}", serde_json::to_string(&view)?);
            } else {
                print_status(&view);
            }
            Ok(())
        }
        CenterCommand::Balance {
            center,
            dry_run,
            json,
        } => {
            let client = center.client()?;
            let outcome: BalanceOutcome =
                client.post("/v1/balance", &serde_json::json!({ "dry_run": dry_run }))?;
            if !*json || outcome.operation.is_none() {
                if *json {
                    println!("{}", serde_json::to_string(&outcome.plan)?);
                } else {
                    print_plan(&outcome.plan, *dry_run);
                }
            }
            match outcome.operation {
                Some(op) => follow_operation(&client, op.id, *json),
                None => Ok(()),
            }
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

fn print_status(view: &ClusterView) {
    if let Some(leader) = &view.leader {
        if leader.name != view.replica {
            say!(
                "(answered by replica {}; the leader is {} at {})",
                view.replica,
                leader.name,
                leader.url
            );
        }
    }
    if let Some(why) = &view.store_error {
        say!("!!! the store cannot be read: {why}");
    }
    say!(
        "{:<10} {:<5} {:<22} {:>5} {:>16} {:>16} {:>6} {:>5}",
        "HOST",
        "UP",
        "MODE",
        "VMS",
        "ACCEL MiB",
        "MEMORY MiB",
        "LOAD",
        "PRES"
    );
    for h in &view.hosts {
        say!(
            "{:<10} {:<5} {:<22} {:>5} {:>16} {:>16} {:>6.2} {:>4.0}%",
            h.name,
            h.status,
            h.mode,
            h.vms,
            format!("{}/{}", mib(h.info.accel_used), mib(h.info.accel_capacity)),
            format!(
                "{}/{}",
                mib(h.info.memory_used),
                mib(h.info.memory_capacity)
            ),
            h.info.accel_load,
            h.pressure * 100.0
        );
        if let Some(reason) = &h.mode_reason {
            say!("           not ready: {reason}");
        }
    }
    println!();
    say!(
        "{:<14} {:<12} {:<10} {:<14} {:>10} {:>6}",
        "VM",
        "WORKLOAD",
        "HOST",
        "STATE",
        "ACCEL MiB",
        "LOAD"
    );
    for vm in &view.vms {
        say!(
            "{:<14} {:<12} {:<10} {:<14} {:>10} {:>6.2}",
            vm.id,
            vm.workload,
            vm.host,
            vm.state,
            mib(vm.accel_memory),
            vm.accel_load
        );
    }
    if view.vms.len() < view.vms_total {
        say!(
            "({} of {} VMs shown: those not simply running first; GET /v1/vms lists them all)",
            view.vms.len(),
            view.vms_total
        );
    }
    if !view.migrations.is_empty() {
        println!();
        for m in view.migrations.iter().take(10) {
            say!("{}", migration_line(m));
        }
    }
}

/// One line for a migration.
fn migration_line(m: &MigrationRecord) -> String {
    match (m.state, m.downtime_ms) {
        (MigrationState::Succeeded, Some(pause)) => format!(
            "{} {} -> {}: moved, pause {pause:.1} ms, total {:.0} ms, {} MiB, {} round(s) [{}]",
            m.vm,
            m.from,
            m.to,
            m.total_ms.unwrap_or(0.0),
            mib(m.bytes_sent),
            m.rounds,
            m.reason
        ),
        (MigrationState::Running, _) => format!(
            "{} {} -> {}: moving{} [{}]",
            m.vm,
            m.from,
            m.to,
            m.progress
                .as_ref()
                .map(|p| format!(
                    " ({} round {}, {} MiB sent)",
                    p.phase,
                    p.round,
                    mib(p.bytes_sent)
                ))
                .unwrap_or_default(),
            m.reason
        ),
        _ => format!(
            "{} {} -> {}: FAILED, it stays on {}: {} [{}]",
            m.vm,
            m.from,
            m.to,
            m.from,
            m.error.as_deref().unwrap_or("unknown"),
            m.reason
        ),
    }
}

fn print_plan(plan: &BalancePlan, dry_run: bool) {
    say!("{}", plan.summary);
    for h in &plan.hosts {
        say!(
            "  {:<10} pressure {:>4.0}% -> {:>4.0}%",
            h.host,
            h.before * 100.0,
            h.after * 100.0
        );
    }
    for m in &plan.moves {
        say!(
            "  move {} {} -> {} ({} MiB accelerator memory, load {:.2})",
            m.vm,
            m.from,
            m.to,
            mib(m.accel_memory),
            m.load
        );
    }
    if dry_run && !plan.moves.is_empty() {
        say!("dry run: nothing was moved");
    }
}

/// How long a followed operation may go unanswered (a center restarting, replicas
/// electing a leader) before the command stops following it.
const LOST_CONTACT: Duration = Duration::from_secs(60);

/// Whether an error asking the center is one a restart or an election makes, and passes:
/// no answer at all, or 503 (no leader yet).
fn passing(e: &ferry_client::ClientError) -> bool {
    e.unreachable().is_some() || e.api().is_some_and(|e| e.status == 503)
}

/// Follows operation `id` to its end, printing each migration as it ends; fails if the
/// operation ends incomplete. `json`: print the operation and its migrations as the
/// last line instead.
fn follow_operation(client: &ApiClient, id: u64, json: bool) -> anyhow::Result<()> {
    let bar = spinner(json);
    let mut printed = std::collections::BTreeSet::new();
    let what =
        format!("operation {id} to end; it may still be running (GET /v1/operations/{id} tells)");
    let limit = Duration::from_secs(3600);
    let mut last_contact = Instant::now();
    let (op, migrations) = poll_every(&what, limit, Duration::from_millis(200), || {
        let asked = client
            .get::<Operation>(&format!("/v1/operations/{id}"))
            .and_then(|op| Ok((op, client.get::<Vec<MigrationRecord>>("/v1/migrations")?)));
        let (op, all) = match asked {
            Ok(answer) => answer,
            // A center restarting, or replicas electing a leader, carries the operation
            // on: an answer missed for a while is no end of it.
            Err(e) if passing(&e) && last_contact.elapsed() < LOST_CONTACT => {
                return Ok(None)
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "lost track of operation {id}; it may still be running (GET /v1/operations/{id} tells)"
                )))
            }
        };
        last_contact = Instant::now();
        let mine: Vec<MigrationRecord> = all
            .into_iter()
            .filter(|m| op.migrations.contains(&m.id))
            .collect();
        let running: Vec<String> = mine
            .iter()
            .filter(|m| !m.state.has_ended())
            .map(migration_line)
            .collect();
        for m in mine.iter().filter(|m| m.state.has_ended()) {
            if printed.insert(m.id) && !json {
                // On stdout, terminal or not (the bar's own println writes to a terminal
                // only, and on stderr).
                bar.suspend(|| say!("{}", migration_line(m)));
            }
        }
        bar.set_message(super::error_text(&running.join(" | ")).into_owned());
        Ok((op.state != OperationState::Running).then_some((op, mine)))
    })?;
    bar.finish_and_clear();
    if json {
        say!(
            "{}",
            serde_json::json!({ "operation": op, "migrations": migrations })
        );
    } else {
        say!("{}", op.summary);
        for p in &op.problems {
            say!("  problem: {p}");
        }
    }
    if op.state != OperationState::Done {
        bail!("{}", op.summary);
    }
    Ok(())
}

/// `ferry host maintenance`.
#[derive(Args)]
pub struct MaintenanceArgs {
    #[command(subcommand)]
    command: MaintenanceCommand,
    #[command(flatten)]
    center: CenterAddr,
    /// Print JSON: the operation and its migrations (enter), the host (exit).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum MaintenanceCommand {
    /// Move every VM off HOST live (each to a host with room), then hold it in
    /// maintenance: nothing new lands there. Refuses, moving nothing, if some VM has
    /// nowhere to go; exits non-zero if some VM could not move (it keeps running where
    /// it is).
    Enter {
        /// Host name.
        #[arg(value_parser = crate::cmd::host::parse_host_name)]
        host: String,
    },
    /// Return HOST to service.
    Exit {
        /// Host name.
        #[arg(value_parser = crate::cmd::host::parse_host_name)]
        host: String,
    },
}

/// `ferry host forget`.
#[derive(Args)]
pub struct ForgetArgs {
    /// Host name.
    #[arg(value_parser = crate::cmd::host::parse_host_name)]
    host: String,
    /// Forget the VMs recorded on the host too (only if they no longer run there).
    #[arg(long)]
    with_vms: bool,
    #[command(flatten)]
    center: CenterAddr,
    /// Print JSON: the host and the VMs forgotten with it.
    #[arg(long)]
    json: bool,
}

/// `ferry host forget HOST`.
pub fn forget(args: &ForgetArgs) -> anyhow::Result<()> {
    let client = args.center.client()?;
    let host = &args.host;
    let path = format!("/v1/hosts/{host}?with_vms={}", args.with_vms);
    let forgotten: ferry_center::ForgottenHost = client.delete(&path)?;
    if args.json {
        println!("{}", serde_json::to_string(&forgotten)?);
    } else {
        say!(
            "host {host} forgotten, with {} VM record(s){}",
            forgotten.vms.len(),
            if forgotten.vms.is_empty() {
                String::new()
            } else {
                format!(": {}", forgotten.vms.join(", "))
            }
        );
    }
    Ok(())
}

/// `ferry host maintenance ...`.
pub fn maintenance(args: &MaintenanceArgs) -> anyhow::Result<()> {
    let client = args.center.client()?;
    match &args.command {
        MaintenanceCommand::Enter { host } => {
            let op: Operation = client.post(
                &format!("/v1/hosts/{host}/maintenance"),
                &serde_json::json!({}),
            )?;
            if !args.json {
                say!(
                    "host {host} entering maintenance: {} VM(s) to move",
                    op.planned.len()
                );
                for (vm, from, to) in &op.planned {
                    say!("  {vm}: {from} -> {to}");
                }
            }
            follow_operation(&client, op.id, args.json)
        }
        MaintenanceCommand::Exit { host } => {
            let view: ferry_center::HostView =
                client.delete(&format!("/v1/hosts/{host}/maintenance"))?;
            if args.json {
                println!("{}", serde_json::to_string(&view)?);
            } else {
                say!("host {host} is back in service ({})", view.mode);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_center_token_that_no_header_can_carry_is_refused() {
        let dir = ferry_testdata::scratch_dir("center-token");
        let path = dir.join("token");
        let from = |text: &str| {
            std::fs::write(&path, text).unwrap();
            TokenArgs {
                token_file: Some(path.clone()),
            }
            .token()
        };
        assert_eq!(
            from("operator-0123456789abcdef\n").unwrap(),
            b"operator-0123456789abcdef"
        );
        let e = from("schlüssel-0123456789abcdef\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only ASCII") && e.contains("token"), "{e}");
    }
}
