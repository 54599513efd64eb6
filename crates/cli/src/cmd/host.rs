//! `ferry host serve`: the per-host daemon.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_host::{api, heartbeat, AttachDir, AttachPolicy, Host, HostConfig};
use ferry_migrate::Secret;

/// How commands find the shared secret.
#[derive(Args, Clone)]
pub struct SecretArgs {
    /// File holding the cluster's shared secret (at least 16 bytes). Default: the
    /// FERRY_SECRET environment variable.
    #[arg(long, value_name = "FILE", global = true)]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret from --secret-file or FERRY_SECRET.
    pub fn secret(&self) -> anyhow::Result<Secret> {
        // Errors name where the secret came from: a short one may have come from either.
        if let Some(path) = &self.secret_file {
            let secret = Secret::from_file(path)?;
            ferry_migrate::auth::warn_if_everyone_reads(path, "act as any host of the cluster");
            return Ok(secret);
        }
        match std::env::var_os("FERRY_SECRET") {
            Some(s) => {
                use std::os::unix::ffi::OsStrExt;
                Secret::new(s.as_bytes().trim_ascii().to_vec()).context("FERRY_SECRET")
            }
            None => anyhow::bail!(
                "no shared secret: pass --secret-file FILE or set FERRY_SECRET to the cluster's secret (for a new cluster, make one: export FERRY_SECRET={})",
                crate::cmd::MAKE_SECRET
            ),
        }
    }
}

/// `ferry host`.
#[derive(Args)]
pub struct HostArgs {
    #[command(subcommand)]
    command: HostCommand,
}

impl HostArgs {
    /// Whether it runs the host daemon (not a client command).
    pub fn serves(&self) -> bool {
        matches!(self.command, HostCommand::Serve(_))
    }
}

#[derive(Subcommand)]
enum HostCommand {
    /// Run the host daemon: the HTTP/JSON API and the migration listener.
    #[command(after_help = API_HELP)]
    Serve(Box<ServeArgs>),
    /// Take a host out of service (moving its VMs off live) or return it, through the
    /// cluster center.
    Maintenance(crate::cmd::center::MaintenanceArgs),
    /// Make the cluster center forget a host for good (a machine taken out of the
    /// cluster). Refused while the host beats or something involving it runs, and while
    /// VMs are recorded on it unless --with-vms.
    Forget(crate::cmd::center::ForgetArgs),
}

const API_HELP: &str = "\
API (every request needs 'Authorization: Bearer <token>': an operator's token from
--api-tokens, or the host-API key `ferry` derives from the cluster secret; the secret itself
is never accepted; errors are {\"error\": \"...\", \"code\": \"...\"}):
  GET    /v1/host                 name, migration address, memory capacity and use
  GET    /v1/vms                  every VM
  POST   /v1/vms                  create and start: {\"workload\": \"mlp-train\", \"args\": [...],
                                  \"memory\": bytes, \"accel_memory\": bytes,
                                  \"attach\": [{\"name\": \"model\", \"path\": \"/m.gguf\"}],
                                  \"name\": \"chat\", \"backend\": \"cpu\"|\"cuda\"}
                                  (attached paths must lie under an --attach-dir)
  GET    /v1/vms/ID               state, sizes, uptime, console tail
  GET    /v1/vms/ID/console       the console's last 64 KiB, as text
  DELETE /v1/vms/ID               stop the VM (409 while migrating, in doubt, or gone)
  POST   /v1/vms/ID/migrate       {\"to\": \"HOST:PORT\", \"mode\": \"live\"|\"stop-and-copy\",
                                  \"downtime_ms\": 50, \"streams\": 4, \"compress\": false,
                                  \"throttle\": true, \"allow_longer_pause\": false,
                                  \"files\": \"reuse\"|\"send\"|\"require\",
                                  \"device\": \"auto\"|\"precopy\"|\"replay\",
                                  \"max_rate_mib_s\": N, \"max_rounds\": 30,
                                  \"max_precopy_s\": 60}
  GET    /v1/vms/ID/migration     state (running, succeeded, failed, cancelled, in-doubt),
                                  progress, then the report or the error (409 if the
                                  VM never migrated from here)
  DELETE /v1/vms/ID/migration     cancel it (up to the moment the destination runs the VM)
  POST   /v1/vms/ID/resolve       settle an in-doubt VM by hand: {\"action\": \"resume\"|\"release\"}
  POST   /v1/settle/SESSION       whether the VM of a migration received here runs here
  POST   /v1/vms/ID/streams       queue a request on the VM's message channel:
                                  {\"stream\": N, \"kind\": K, \"payload\": \"base64\"}
  GET    /v1/vms/ID/streams/N?from=K&wait_ms=W  the stream's responses from index K on
  POST   /v1/vms/ID/streams/N/signal  a control message (a cancel) for an open or
                                  overflowed stream
  DELETE /v1/vms/ID/streams/N     forget a stream whose responses were read (503 while
                                  the VM pauses, 409 once it runs elsewhere)

Example:
  export FERRY_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')
  ferry host serve --listen 127.0.0.1:7070 --migration-listen 127.0.0.1:7071 &
  ferry host serve --name b --listen 127.0.0.1:7080 --migration-listen 127.0.0.1:7081 &
  ferry vm create --accel-memory 256M mlp-train -- --steps 1000000
  ferry migrate a-vm1 --to 127.0.0.1:7081";

/// `ferry host serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Host name (prefix of the VM ids created here): 1 to 63 letters, digits, '.', '_'
    /// and '-'.
    #[arg(long, default_value = "a", value_parser = parse_host_name)]
    pub name: String,
    /// Address of the HTTP/JSON API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Address that receives migrations from other hosts.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7071")]
    pub migration_listen: String,
    /// VM memory (RAM + accelerator) this host may hand out (default: 3/4 of the host's).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub memory_capacity: Option<u64>,
    /// Accelerator memory this host may hand out, within --memory-capacity (default: all
    /// of it; the CPU backend keeps device memory in host RAM).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub accel_capacity: Option<u64>,
    /// Accelerator memory to back at start, within --accel-capacity, so the first VMs
    /// created or migrated here do not pay a page fault per page while they fill it.
    /// Memory freed by VMs stays backed for the next ones either way (with what VMs use,
    /// within --accel-capacity), as a GPU's memory does.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub accel_prefault: Option<u64>,
    /// Join the cluster center at URL (e.g. http://10.0.0.1:7000), or at any of a
    /// replicated center's comma-separated URLs: send it heartbeats with this host's
    /// capacity, load and VMs, authenticated by the heartbeat key derived from the shared
    /// secret.
    #[arg(long, value_name = "URL[,URL...]")]
    pub center: Option<String>,
    /// Time between heartbeats to the center.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub heartbeat_ms: u64,
    /// Address the center and other hosts reach this host at, without a port (the ports
    /// are --listen's and --migration-listen's; default: the --listen address's IP; needed
    /// with --center when listening on 0.0.0.0).
    #[arg(long, value_name = "IP_OR_NAME", value_parser = parse_advertise)]
    pub advertise: Option<String>,
    /// Accelerator threads per VM, 1 or more (default: all cores).
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub accel_threads: Option<usize>,
    /// Nice value (0-19) of the VMs' threads: vCPUs and accelerators run below the
    /// daemon's own threads (API, heartbeats, migrations), so busy guests cannot starve a
    /// migration's copy. 0 runs them at the daemon's priority.
    #[arg(long, value_name = "N", default_value_t = ferry_host::DEFAULT_GUEST_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub guest_nice: i32,
    #[command(flatten)]
    pub tls: crate::cmd::tls::TlsArgs,
    /// Operators' API tokens, one per line: `TOKEN` (any request) or `TOKEN read-only`
    /// (GET only: dashboards, scrapers); `#` starts a comment. Read again within a second
    /// of a change, so tokens rotate without a restart. The cluster's own calls (the
    /// center, `ferry vm` with the secret) use a key derived from the secret instead.
    #[arg(long, value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// A directory whose files `vm create --attach` may give VMs, and whose guest ELFs
    /// `vm create PATH` may run (repeat for more; e.g. where the models and datasets
    /// are). Without one, no file can be attached, and no guest run, by path through the
    /// API: a guest reads what is attached, so any token could otherwise read
    /// every file this daemon can (the cluster secret included). An incoming migration
    /// looks here too (besides the file store and this host's VMs' files) for a copy of
    /// a file its VM has, at the source's path: found, it is not sent, once its hash
    /// matches.
    #[arg(long = "attach-dir", value_name = "DIR")]
    pub attach_dirs: Vec<PathBuf>,
    /// Where attached files (models, datasets) that arrive with migrated VMs are kept,
    /// as `sha256-<hash>`; a VM moving back, or another with the same file, finds them
    /// there. A cache: when a migration's files do not fit, those no VM here uses are
    /// evicted, least recently used first (default: `/var/tmp/ferry-<name>/files`). It
    /// also keeps the record of the migrations whose VM ran here (`resumed-migrations`),
    /// which a restarted daemon answers from when a source asks whether its VM ran here:
    /// keep it across restarts. It must be the daemon user's alone (made 0700; one that
    /// others may write to is refused).
    #[arg(long, value_name = "DIR")]
    pub file_store: Option<PathBuf>,
    #[command(flatten)]
    pub backend: crate::cmd::backend::BackendArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// Says loudly that an API served over plain HTTP beyond loopback carries its bearer
/// tokens in clear (the cluster secret itself never travels).
pub fn warn_plain_http(addr: std::net::SocketAddr, what: &str) {
    if !addr.ip().is_loopback() {
        eprintln!(
            "ferry: WARNING: {what} listens on {addr} over plain HTTP: API tokens travel in \
             clear on the network, and whoever sees one can use it. Serve it on loopback \
             behind a TLS-terminating proxy, or on a network only operators reach. (The \
             cluster secret never travels: hosts and the center send keys derived from it.)"
        );
    }
}

/// Says loudly that migrations received beyond loopback without TLS cross the network
/// as they are: the handshake proves both hosts hold the cluster secret, but what follows
/// (a VM's memory, its device's) is neither encrypted nor protected from being altered.
pub fn warn_plain_migrations(addr: std::net::SocketAddr) {
    if !addr.ip().is_loopback() {
        eprintln!(
            "ferry: WARNING: migrations are received on {addr} without TLS: the hosts prove \
             to each other that they hold the cluster secret, but the VMs' memory then \
             crosses the network unencrypted, and whoever sits on the path can read or alter \
             it. Give --tls-cert, --tls-key and --tls-ca (mutual TLS), or keep migrations \
             on a network only the hosts reach."
        );
    }
}

/// Three quarters of the host's memory.
fn default_capacity() -> u64 {
    use procfs::Current;
    let total = procfs::Meminfo::current().map_or(4 << 30, |m| m.mem_total);
    total / 4 * 3
}

/// A running daemon: where it listens. Dropping it shuts it down: its API and migration
/// ports close, its threads end, its VMs stop.
pub struct Daemon {
    /// API address actually bound.
    pub api_addr: std::net::SocketAddr,
    /// Migration address actually bound.
    pub migration_addr: std::net::SocketAddr,
    /// The host.
    pub host: std::sync::Arc<Host>,
    /// The API server, stopped with the daemon.
    _api: ferry_http::Serving,
    /// A loopback daemon's file store, removed once the daemon has shut down.
    scratch: Option<tempfile::TempDir>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.host.shutdown();
    }
}

/// A host's name (`--name`, and the hosts the center's commands name): the characters of
/// a VM name, as the host's name prefixes its VMs' ids (and names it in the center's
/// URLs).
pub(crate) fn parse_host_name(value: &str) -> Result<String, String> {
    if ferry_api::valid_host_name(value) {
        Ok(value.to_string())
    } else {
        Err(format!(
            "'{value}' is not a host name: {}",
            ferry_api::NAME_RULE
        ))
    }
}

/// `--advertise`: an IP address or a host name, without a port. An IPv6 address comes
/// back in brackets, ready to have `:PORT` appended.
fn parse_advertise(value: &str) -> Result<String, String> {
    let unbracketed = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if let Ok(ip) = unbracketed.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{ip}]"));
    }
    if value.contains(':') {
        return Err(format!(
            "give an IP address or host name without a port or scheme (not '{value}'): \
             the ports are those of --listen and --migration-listen"
        ));
    }
    if value.is_empty() || value.contains(['/', '[', ']']) || value.contains(char::is_whitespace) {
        return Err(format!("'{value}' is not an IP address or host name"));
    }
    Ok(value.to_string())
}

impl Daemon {
    /// `https` when its API is served over TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.host.config().tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Reports to the center at `center_url` every `interval`, advertising this host at
    /// `advertise` (default: the addresses it is bound to).
    pub fn join_center(
        &self,
        center_url: &str,
        advertise: Option<&str>,
        interval: std::time::Duration,
    ) -> anyhow::Result<()> {
        // An address bound to every interface is nowhere the center or another host
        // could reach: told to them, each would dial itself.
        if advertise.is_none() {
            if let Some(any) = [self.api_addr, self.migration_addr]
                .into_iter()
                .find(|a| a.ip().is_unspecified())
            {
                anyhow::bail!(
                    "the host listens on {any} (every address), which the center cannot be told to reach it at: give --advertise IP_OR_NAME, the address the center and the other hosts reach this one at"
                );
            }
        }
        let at = |addr: std::net::SocketAddr| match advertise {
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        };
        let link = heartbeat::CenterLink {
            center_url: center_url.trim_end_matches('/').to_string(),
            api_url: format!("{}://{}", self.scheme(), at(self.api_addr)),
            migration_addr: at(self.migration_addr),
            interval,
        };
        heartbeat::start(self.host.clone(), link)
            .with_context(|| format!("cannot report to the center (--center {center_url})"))
    }
}

/// Why the API address `listen` and the migration address `migration_listen` cannot both
/// be bound, if they name the same port on an address both would take: the second bind
/// would fail with "Address already in use", which names neither flag. Port 0 (any free
/// port) and names that do not resolve are left to the binds.
fn same_port(listen: &str, migration_listen: &str) -> Option<String> {
    use std::net::{SocketAddr, ToSocketAddrs};
    let resolve = |addr: &str| -> Vec<SocketAddr> {
        addr.to_socket_addrs()
            .map(Iterator::collect)
            .unwrap_or_default()
    };
    let migration = resolve(migration_listen);
    // An unspecified address (0.0.0.0, [::]) takes the port on every address of its family.
    let overlap = |a: &SocketAddr, b: &SocketAddr| {
        a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
    };
    let clash = resolve(listen).iter().any(|api| {
        api.port() != 0 && (migration.iter()).any(|m| m.port() == api.port() && overlap(api, m))
    });
    clash.then(|| {
        format!(
            "--listen {listen} and --migration-listen {migration_listen} take the same port: \
             the API and the migration listener need different addresses"
        )
    })
}

/// Starts a daemon's listeners on `runtime` (the API) and a thread (migrations).
pub fn start(
    runtime: &tokio::runtime::Runtime,
    config: HostConfig,
    listen: &str,
    migration_listen: &str,
) -> anyhow::Result<Daemon> {
    let migration = TcpListener::bind(migration_listen)
        .with_context(|| format!("cannot listen for migrations on {migration_listen}"))?;
    let migration_addr = migration.local_addr()?;
    let api_listener = runtime
        .block_on(ferry_http::bind(listen))
        .with_context(|| format!("cannot listen for the API on {listen}"))?;
    let api_addr = api_listener.local_addr()?;
    let host = Host::new(config)?;
    host.serve_migrations(migration)
        .context("cannot start the migration listener")?;
    let router = api::router(host.clone(), migration_addr.to_string())?;
    let https = host.config().tls.as_ref().map(|t| t.https_server());
    let api = ferry_http::spawn(
        runtime.handle(),
        api_listener,
        router,
        https,
        "the API server",
    );
    Ok(Daemon {
        api_addr,
        migration_addr,
        host,
        _api: api,
        scratch: None,
    })
}

/// Starts an in-process daemon `name` on loopback ports (the demo and benchmarks), with
/// `memory_capacity` bytes of VM memory, all of it usable as accelerator memory.
pub fn start_loopback(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    secret: &Secret,
    memory_capacity: u64,
    backend: &'static str,
) -> anyhow::Result<Daemon> {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("ferry-{name}-"))
        .tempdir()
        .context("cannot create the loopback daemon's file store")?;
    let config = HostConfig {
        name: name.into(),
        secret: secret.clone(),
        memory_capacity,
        accel_capacity: memory_capacity,
        accel_threads: ferry_vmm::vm::default_accel_threads(),
        guest_nice: ferry_host::DEFAULT_GUEST_NICE,
        tls: None,
        file_store: scratch.path().join("files"),
        api_tokens: None,
        backend,
        // Only this process holds the fresh secret its API takes.
        attach: AttachPolicy::Anywhere,
    };
    let mut daemon = start(runtime, config, "127.0.0.1:0", "127.0.0.1:0")?;
    daemon.scratch = Some(scratch);
    Ok(daemon)
}

/// Two in-process daemons, `a` and `b`, on loopback with a fresh secret (the demo and
/// the migration benchmark), and a client of each one's API.
pub struct LoopbackPair {
    /// The async runtime serving both APIs: held so they run as long as the pair.
    _runtime: tokio::runtime::Runtime,
    /// Host a.
    pub a: Daemon,
    /// Host b.
    pub b: Daemon,
    /// Client of a's API.
    pub client_a: ferry_client::ApiClient,
    /// Client of b's API.
    pub client_b: ferry_client::ApiClient,
}

impl LoopbackPair {
    /// Starts both; each may hand out `memory_capacity` bytes of VM memory, and gives
    /// new VMs accelerator backend `backend`.
    pub fn start(memory_capacity: u64, backend: &'static str) -> anyhow::Result<Self> {
        let secret_text = Secret::generate_hex();
        let secret = Secret::new(secret_text.as_bytes().to_vec())?;
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let a = start_loopback(&runtime, "a", &secret, memory_capacity, backend)?;
        let b = start_loopback(&runtime, "b", &secret, memory_capacity, backend)?;
        let token = secret.token(ferry_migrate::Purpose::HostApi);
        let client = |d: &Daemon| {
            ferry_client::ApiClient::new(&format!("http://{}", d.api_addr), token.as_bytes())
        };
        Ok(Self {
            client_a: client(&a)?,
            client_b: client(&b)?,
            _runtime: runtime,
            a,
            b,
        })
    }
}

/// `ferry host ...`.
pub fn host(args: &HostArgs) -> anyhow::Result<()> {
    match &args.command {
        HostCommand::Maintenance(m) => crate::cmd::center::maintenance(m),
        HostCommand::Forget(f) => crate::cmd::center::forget(f),
        HostCommand::Serve(serve) => {
            if let Some(why) = same_port(&serve.listen, &serve.migration_listen) {
                // A usage error (exit 2, as clap's), found before anything is read or bound.
                clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{why}\n"))
                    .exit();
            }
            let memory_capacity = serve.memory_capacity.unwrap_or_else(default_capacity);
            // Accelerator memory is VM memory too: more of it than of VM memory could never
            // be handed out, yet heartbeats and the center's balancing would count on it.
            if let Some(accel) = serve.accel_capacity.filter(|&a| a > memory_capacity) {
                let memory = match serve.memory_capacity {
                    Some(_) => format!("--memory-capacity ({} MiB)", memory_capacity >> 20),
                    None => format!(
                        "the VM memory this host may hand out ({} MiB, 3/4 of its memory; raise it with --memory-capacity)",
                        memory_capacity >> 20
                    ),
                };
                clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--accel-capacity ({} MiB) is more than {memory}: accelerator memory is given out within it\n",
                        accel >> 20
                    ),
                )
                .exit();
            }
            let config = HostConfig {
                name: serve.name.clone(),
                secret: serve.secret.secret()?,
                memory_capacity,
                accel_capacity: serve.accel_capacity.unwrap_or(memory_capacity),
                accel_threads: serve
                    .accel_threads
                    .unwrap_or_else(ferry_vmm::vm::default_accel_threads),
                guest_nice: serve.guest_nice,
                tls: serve.tls.config()?,
                file_store: serve.file_store.clone().unwrap_or_else(|| {
                    PathBuf::from(format!("/var/tmp/ferry-{}", serve.name)).join("files")
                }),
                api_tokens: serve.api_tokens.clone(),
                backend: serve.backend.resolve()?,
                attach: AttachPolicy::Under(
                    serve
                        .attach_dirs
                        .iter()
                        .map(|dir| {
                            AttachDir::new(dir)
                                .with_context(|| format!("--attach-dir {}", dir.display()))
                        })
                        .collect::<anyhow::Result<_>>()?,
                ),
            };
            // Held while the daemon serves: a second daemon on it would evict this one's
            // VMs' files.
            let _store = ferry_host::files::FileStore::hold(&config.file_store)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let daemon = start(&runtime, config, &serve.listen, &serve.migration_listen)?;
            if let Some(bytes) = serve.accel_prefault {
                daemon.host.prefault_accel_memory(bytes)?;
            }
            let tls = if serve.tls.tls_cert.is_some() {
                " (mutual TLS)"
            } else {
                ""
            };
            let mut center = String::new();
            if let Some(url) = &serve.center {
                daemon.join_center(
                    url,
                    serve.advertise.as_deref(),
                    std::time::Duration::from_millis(serve.heartbeat_ms),
                )?;
                center = format!(" (reporting to the center at {url})");
            }
            if daemon.scheme() == "http" {
                warn_plain_http(daemon.api_addr, "the host's API");
                warn_plain_migrations(daemon.migration_addr);
            }
            // One line: scripts read the addresses from it.
            println!(
                "ferry host {}{center}: API on {}://{}, migrations on {}{tls}",
                serve.name,
                daemon.scheme(),
                daemon.api_addr,
                daemon.migration_addr
            );
            // `daemon` is dropped on the way out, which shuts the host down in order.
            runtime.block_on(super::shutdown_signal());
            tracing::info!("shutting down: stopping the VMs, then the migration port");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_advertise, parse_host_name, same_port};

    #[test]
    fn the_api_and_the_migration_listener_cannot_take_the_same_port() {
        for (api, migration) in [
            ("127.0.0.1:7070", "127.0.0.1:7070"),
            ("0.0.0.0:7070", "127.0.0.1:7070"),
            ("127.0.0.1:7070", "0.0.0.0:7070"),
            ("[::1]:7070", "[::]:7070"),
        ] {
            let why = same_port(api, migration).expect("a clash");
            assert!(why.contains("need different addresses"), "{why}");
        }
        // Port 0 is a free port each; other ports, or another family's address, are free.
        for (api, migration) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:7070", "127.0.0.1:7071"),
            ("127.0.0.1:7070", "127.0.0.2:7070"),
            ("127.0.0.1:7070", "[::1]:7070"),
            ("no port", "no port"),
        ] {
            assert_eq!(same_port(api, migration), None, "{api} {migration}");
        }
    }

    #[test]
    fn a_host_name_takes_the_characters_of_a_vm_id() {
        for good in ["a", "gpu-node-01", "rack1.n2_b"] {
            assert_eq!(parse_host_name(good).unwrap(), good);
        }
        // Each would break the VM ids made from it, or the URLs that name the host.
        for bad in ["", "rack1:n2", "a/b", "a b", "a?x", &"x".repeat(64)] {
            let error = parse_host_name(bad).unwrap_err();
            assert!(error.contains("not a host name"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn advertise_takes_an_address_without_a_port() {
        assert_eq!(parse_advertise("10.0.0.11").unwrap(), "10.0.0.11");
        assert_eq!(parse_advertise("host-a.example").unwrap(), "host-a.example");
        // IPv6 comes back bracketed, so that `:PORT` can follow.
        assert_eq!(parse_advertise("fd00::11").unwrap(), "[fd00::11]");
        assert_eq!(parse_advertise("[fd00::11]").unwrap(), "[fd00::11]");
        for with_port in [
            "127.0.0.1:27096",
            "[fd00::11]:7070",
            "host-a:7070",
            "http://host-a",
        ] {
            let error = parse_advertise(with_port).unwrap_err();
            assert!(error.contains("without a port"), "{with_port}: {error}");
        }
        for bad in ["", "host a", "a/b"] {
            assert!(parse_advertise(bad).is_err(), "{bad:?}");
        }
    }
}
