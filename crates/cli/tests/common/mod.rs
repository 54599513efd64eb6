//! What the CLI integration tests share: `ferry` runs, host daemons as child
//! processes, checksums of unmigrated runs.
#![allow(dead_code)] // each test binary uses its own part

pub mod chromium;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The cluster secret of every test daemon.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// The host-API key the test daemons take (derived from [`SECRET`]; the secret itself
/// is not a token).
pub fn host_token() -> String {
    ferry_migrate::Secret::new(SECRET.as_bytes())
        .unwrap()
        .token(ferry_migrate::Purpose::HostApi)
}

/// A client of `daemon`'s API with the host-API key.
pub fn host_api(daemon: &Daemon) -> ferry_client::ApiClient {
    ferry_client::ApiClient::new(&daemon.api, host_token().as_bytes()).unwrap()
}

pub fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_SECRET", SECRET)
        .output()
        .expect("run ferry")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks that the output stream `bytes` says `needle`, showing it whole if not.
#[track_caller]
pub fn assert_says(bytes: &[u8], needle: &str) {
    let said = text(bytes);
    assert!(said.contains(needle), "{said}");
}

/// The report `ferry migrate --json` printed last (the migration must have succeeded).
pub fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "migration failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

pub fn kvm_available(test: &str) -> bool {
    start_watchdog();
    ferry_testdata::kvm(test)
}

/// The SmolLM2 model, if KVM and the model are both here (each absence said loudly).
pub fn kvm_and_smollm2(test: &str) -> Option<PathBuf> {
    if !kvm_available(test) {
        return None;
    }
    ferry_testdata::smollm2(test)
}

/// How long one test binary may run before the watchdog ends it.
const WATCHDOG: Duration = Duration::from_secs(20 * 60);

/// Ends this test binary, and the daemons it started, once it has run for [`WATCHDOG`]:
/// a hung test then fails CI in minutes instead of stalling it until CI's own limit.
fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(WATCHDOG);
            eprintln!(
                "\n!!! WATCHDOG: this test binary ran for over {} minutes; a test hung. \
                 Killing its daemons and aborting. !!!\n",
                WATCHDOG.as_secs() / 60
            );
            kill_children();
            std::process::abort();
        });
    });
}

/// Kills every child process of this one (the daemons of tests that never ended).
fn kill_children() {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent's pid is the second field after the command's closing parenthesis.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent == Some(me.as_str()) {
            // SAFETY: kill with a pid and a signal number has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Starts a `ferry ... serve` command with the test secret and returns it with the
/// first line it prints (the addresses it listens on).
pub fn serve(command: &mut Command) -> (Child, String) {
    let mut child = command
        .env("FERRY_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a ferry daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// A `ferry center serve` child process, killed on drop.
pub struct CenterProcess {
    pub child: KillOnDrop,
    /// Its API's URL.
    pub url: String,
    /// Its SQLite database.
    pub db: PathBuf,
}

impl CenterProcess {
    /// Starts `ferry center serve` on `listen` with `db`, the operator `token` and
    /// `extra` flags.
    pub fn start(db: &Path, listen: &str, token: &str, extra: &[&str]) -> Self {
        let (child, line) = serve(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["center", "serve", "--listen", listen])
                .args(extra)
                .arg("--db")
                .arg(db)
                .env("FERRY_CENTER_TOKEN", token),
        );
        Self {
            child: KillOnDrop(child),
            url: center_url(&line),
            db: db.to_path_buf(),
        }
    }
}

/// An empty directory `name` in Cargo's scratch directory for integration tests (what a
/// past run left there is removed first).
pub fn empty_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The API's URL in the line `ferry center serve` starts with:
/// "ferry center: API and dashboard on http://127.0.0.1:P (SQLite ...)".
pub fn center_url(line: &str) -> String {
    line.split(" on ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or_else(|| panic!("no API address in {line:?}"))
        .to_string()
}

/// Hosts a, b and c reporting to `centers` (one URL or several, comma-separated) with
/// heartbeats every 200 ms, each with `accel_capacity` of accelerator memory and 4 GiB
/// of VM memory.
pub fn cluster_hosts(centers: &str, accel_capacity: &str) -> Vec<(String, Daemon)> {
    ["a", "b", "c"]
        .iter()
        .map(|name| {
            let daemon = Daemon::start_with(
                name,
                &[
                    "--center",
                    centers,
                    "--heartbeat-ms",
                    "200",
                    "--accel-capacity",
                    accel_capacity,
                    "--memory-capacity",
                    "4G",
                ],
            );
            (name.to_string(), daemon)
        })
        .collect()
}

/// Resident memory (bytes) and threads of process `pid`.
pub fn footprint(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:") << 10, field("Threads:"))
}

/// Calls `ready` every 20 ms until it gives a value, and returns that; fails the test,
/// saying what it waited for, after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut ready: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "waited {limit:?} for {what} in vain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop, so a failing test leaves no daemon behind (one
/// would hold the test's output open).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The RAM of a VM made by [`Daemon::create`].
const CREATE_MEMORY: &str = "64M";

/// A `ferry host serve` child process, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub api: String,
    pub migration: String,
    /// The CA its API's certificate is checked against, when it serves HTTPS.
    pub tls_ca: Option<String>,
    /// Its file store (model copies of ~100 MB), removed after the daemon is killed.
    pub store: tempfile::TempDir,
}

impl Daemon {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts one with extra `ferry host serve` flags (and a file store of its own).
    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        Self::start_env(name, extra, &[])
    }

    /// Starts one with extra flags and environment variables of its own.
    pub fn start_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let store = tempfile::Builder::new()
            .prefix(&format!("ferry-test-{name}-"))
            .tempdir()
            .expect("create the daemon's file store");
        let (child, line) = serve(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["host", "serve", "--name", name, "--listen", "127.0.0.1:0"])
                .args(["--migration-listen", "127.0.0.1:0", "--accel-threads", "2"])
                .arg("--file-store")
                .arg(store.path())
                .args(
                    ferry_testdata::attach_dirs()
                        .iter()
                        .flat_map(|dir| [std::ffi::OsStr::new("--attach-dir"), dir.as_os_str()]),
                )
                .args(extra)
                .envs(env.iter().copied()),
        );
        // "ferry host a: API on http://127.0.0.1:P, migrations on 127.0.0.1:Q"
        let api = line
            .split("API on ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_else(|| panic!("no API address in {line:?}"))
            .to_string();
        let migration = line
            .split("migrations on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no migration address in {line:?}"))
            .to_string();
        let tls_ca = extra
            .iter()
            .position(|&flag| flag == "--tls-ca")
            .and_then(|i| extra.get(i + 1))
            .map(|ca| ca.to_string());
        Self {
            child,
            api,
            migration,
            tls_ca,
            store,
        }
    }

    /// Runs `ferry` with `args`, trusting this daemon's CA (per child, never through
    /// this process's environment, which the tests running in parallel share).
    pub fn ferry(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command.args(args).env("FERRY_SECRET", SECRET);
        if let Some(ca) = &self.tls_ca {
            command.env("FERRY_TLS_CA", ca);
        }
        command.output().expect("run ferry")
    }

    pub fn vm(&self, args: &[&str]) -> Value {
        let mut all = vec!["vm", "--host", &self.api, "--json"];
        all.extend_from_slice(args);
        let out = self.ferry(&all);
        assert!(out.status.success(), "ferry {all:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Creates a VM of `workload` with [`CREATE_MEMORY`] of RAM and `accel` of
    /// accelerator memory, and `guest_args` for the guest.
    pub fn create(&self, workload: &str, accel: &str, guest_args: &str) -> String {
        let args: Vec<&str> = guest_args.split_whitespace().collect();
        self.create_with([workload, CREATE_MEMORY, accel], &[], &args)
    }

    /// Creates a VM of `shape` (workload, memory, accelerator memory) with `files`
    /// attached (`NAME=PATH`) and `args` for the guest.
    pub fn create_with(&self, shape: [&str; 3], files: &[String], guest_args: &[&str]) -> String {
        let args = workload_args("create", shape, files, &[], guest_args);
        self.vm(&args)["id"].as_str().unwrap().to_string()
    }

    /// Waits for the guest to exit with code 0; returns the VM as the API shows it then.
    pub fn exited(&self, id: &str) -> Value {
        wait_for(&format!("{id} to end"), Duration::from_secs(300), || {
            let vm = self.show(id);
            match vm["state"].as_str().unwrap() {
                "exited" => {
                    assert_eq!(vm["code"], 0, "{vm}");
                    Some(vm)
                }
                "running" | "migrating" | "switchover" => None,
                other => panic!("{id} ended as {other}: {vm}"),
            }
        })
    }

    /// Waits for the guest to exit with code 0 and returns its whole console tail.
    pub fn console_at_exit(&self, id: &str) -> String {
        self.exited(id);
        let out = self.ferry(&["vm", "console", id, "--host", &self.api]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    pub fn show(&self, id: &str) -> Value {
        self.vm(&["show", id])
    }

    /// Waits until the console shows `needle`.
    pub fn wait_console(&self, id: &str, needle: &str) {
        wait_for(
            &format!("{id} to print {needle:?}"),
            Duration::from_secs(120),
            || {
                let vm = self.show(id);
                vm["console_tail"]
                    .as_str()
                    .unwrap()
                    .contains(needle)
                    .then_some(())
            },
        )
    }

    /// Waits for the guest to exit and returns its checksum.
    pub fn checksum_at_exit(&self, id: &str) -> String {
        checksum(self.exited(id)["console_tail"].as_str().unwrap())
    }

    /// Waits for `id`, made by [`Daemon::create`] with `workload`, `accel` and
    /// `guest_args` (here or on a host it moved from), to exit, and checks that it ended
    /// with the checksum of an unmigrated run.
    #[track_caller]
    pub fn assert_unmigrated_checksum(
        &self,
        id: &str,
        workload: &str,
        accel: &str,
        guest_args: &str,
    ) {
        assert_eq!(
            self.checksum_at_exit(id),
            reference(workload, CREATE_MEMORY, accel, guest_args)
        );
    }

    pub fn migrate(&self, id: &str, to: &str, extra: &[&str]) -> Output {
        let mut args = vec!["migrate", id, "--to", to, "--host", &self.api, "--json"];
        args.extend_from_slice(extra);
        self.ferry(&args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn checksum(console: &str) -> String {
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("checksum="))
        .unwrap_or_else(|| panic!("no checksum in {console}"))
        .to_string()
}

/// The checksum of an unmigrated run (`ferry run`).
pub fn reference(workload: &str, memory: &str, accel: &str, guest_args: &str) -> String {
    let args: Vec<&str> = guest_args.split_whitespace().collect();
    checksum(&run_console([workload, memory, accel], &[], &args))
}

/// The arguments of `ferry run` or `ferry vm create` (`verb`) for `workload`, `memory`
/// and accelerator memory `accel`, with `files` attached (`NAME=PATH`), `options`, and
/// `guest_args` for the guest.
pub fn workload_args<'a>(
    verb: &'a str,
    [workload, memory, accel]: [&'a str; 3],
    files: &'a [String],
    options: &[&'a str],
    guest_args: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![verb, workload, "--memory", memory, "--accel-memory", accel];
    for f in files {
        args.extend(["--attach", f.as_str()]);
    }
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(guest_args);
    args
}

/// The console of an unmigrated run (`ferry run`) of `shape` (workload, memory,
/// accelerator memory) with `files` attached (`NAME=PATH`).
pub fn run_console(shape: [&str; 3], files: &[String], guest_args: &[&str]) -> String {
    let out = ferry(&workload_args("run", shape, files, &[], guest_args));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// `ferry migrate` arguments for a migration by device command replay, with a pause
/// target any load on this machine lets replay reach (the tests are of what moves).
pub const BY_REPLAY: [&str; 5] = [
    "--device-transfer",
    "replay",
    "--downtime-ms",
    "250",
    "--allow-longer-pause",
];

/// The number `field` of each object in the JSON array `list` (each must have it).
pub fn numbers(list: &Value, field: &str) -> Vec<f64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|item| item[field].as_f64().unwrap())
        .collect()
}

/// The text `field` of each object in the JSON array `list` (those without it left out).
pub fn texts<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter_map(|item| item[field].as_str())
        .collect()
}
