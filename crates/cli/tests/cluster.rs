//! The cluster manager with real processes on loopback: a `ferry center serve` and three
//! `ferry host serve --center` daemons, driven by `ferry host maintenance`, `ferry center
//! balance`, `ferry vm create --center` and `ferry center status`. Results of moved VMs
//! are compared with unmigrated runs.

mod common;

use common::chromium::{self, Browser};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{kvm_available, reference, text, CenterProcess, Daemon};
use serde_json::Value;

const TOKEN: &str = "operator-token-0123456789";
/// A host silent for 1.5 s is down (hosts beat every 200 ms).
const DOWN_AFTER_MS: &str = "1500";
/// A training run long enough to still be running when it is moved.
const MLP: &str = "--steps 1200 --print-every 20";
/// A training run that outlasts any test.
const MLP_LONG: &str = "--steps 1000000 --print-every 1000";

/// An empty scratch directory for `test`.
fn scratch_dir(test: &str) -> PathBuf {
    common::empty_dir(&format!("cluster-{test}"))
}

/// Starts a center on `listen` with `db`, the operator [`TOKEN`] and hosts down after
/// [`DOWN_AFTER_MS`].
fn start_center(db: &Path, listen: &str) -> CenterProcess {
    CenterProcess::start(db, listen, TOKEN, &["--down-after-ms", DOWN_AFTER_MS])
}

/// What these tests ask of a center.
impl CenterProcess {
    /// `ferry ARGS --center URL` (before any guest arguments) with the operator token.
    fn ferry(&self, args: &[&str]) -> Output {
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&args[..split])
            .args(["--center", &self.url])
            .args(&args[split..])
            .env("FERRY_SECRET", common::SECRET)
            .env("FERRY_CENTER_TOKEN", TOKEN)
            .output()
            .expect("run ferry")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("ferry {args:?} printed no JSON ({e}): {stdout}"))
    }

    fn status(&self) -> Value {
        self.json(&["center", "status", "--json"])
    }

    /// Places a VM on `host` through the center; returns its id.
    fn create_on(&self, host: &str, accel: &str, guest_args: &str) -> String {
        let mut args = vec![
            "vm",
            "create",
            "mlp-train",
            "--json",
            "--on",
            host,
            "--memory",
            "64M",
            "--accel-memory",
            accel,
            "--",
        ];
        args.extend(guest_args.split_whitespace());
        let placed = self.json(&args);
        assert_eq!(placed["host"], host, "{placed}");
        placed["vm"]["id"].as_str().unwrap().to_string()
    }

    /// Waits until hosts a, b and c have all joined and are up.
    fn wait_three_hosts_up(&self) -> Value {
        self.wait_for("three hosts up", |s| {
            s["hosts"].as_array().unwrap().len() == 3
                && s["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| h["status"] == "up")
        })
    }

    /// Waits until `check` holds of the status.
    fn wait_for(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        common::wait_for(what, Duration::from_secs(60), || {
            let status = self.status();
            check(&status).then_some(status)
        })
    }
}

/// The entry of the status's `list` whose `key` is `value`.
fn entry<'a>(status: &'a Value, list: &str, key: &str, value: &str) -> &'a Value {
    status[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[key] == value)
        .unwrap_or_else(|| panic!("no {key} {value} in the {list} of {status:#}"))
}

fn host<'a>(status: &'a Value, name: &str) -> &'a Value {
    entry(status, "hosts", "name", name)
}

fn vm<'a>(status: &'a Value, id: &str) -> &'a Value {
    entry(status, "vms", "id", id)
}

/// A center and hosts a, b, c reporting to it, each with `accel_capacity` of
/// accelerator memory.
struct Cluster {
    center: CenterProcess,
    hosts: Vec<(String, Daemon)>,
}

impl Cluster {
    fn start(test: &str, accel_capacity: &str) -> Self {
        let center = start_center(&scratch_dir(test).join("center.db"), "127.0.0.1:0");
        let hosts = common::cluster_hosts(&center.url, accel_capacity);
        let cluster = Self { center, hosts };
        cluster.center.wait_three_hosts_up();
        cluster
    }

    fn daemon(&self, name: &str) -> &Daemon {
        &self.hosts.iter().find(|(n, _)| n == name).unwrap().1
    }
}

#[test]
fn maintenance_moves_both_vms_off_and_they_finish_as_if_never_moved() {
    ferry_testdata::require_kvm!(kvm_available);
    let seeds = ["--seed 3", "--seed 4"];
    let expected: Vec<String> = seeds
        .iter()
        .map(|s| reference("mlp-train", "64M", "32M", &format!("{MLP} {s}")))
        .collect();
    let cluster = Cluster::start("maintenance", "1G");
    let c = &cluster.center;
    let other = c.create_on("b", "32M", MLP_LONG);
    let ids: Vec<String> = seeds
        .iter()
        .map(|s| c.create_on("a", "32M", &format!("{MLP} {s}")))
        .collect();
    for id in &ids {
        cluster.daemon("a").wait_console(id, "step=60 ");
    }

    let done = c.json(&["host", "maintenance", "enter", "a", "--json"]);
    assert_eq!(done["operation"]["state"], "done", "{done:#}");
    let moves = done["migrations"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{done:#}");
    for m in moves {
        assert_eq!(m["state"], "succeeded", "{m}");
        assert!(m["downtime_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert_ne!(m["to"], "a");
    }

    let status = c.wait_for("the VMs' new hosts to report them", |s| {
        ids.iter().all(|id| vm(s, id)["host"] != "a")
    });
    assert_eq!(host(&status, "a")["mode"], "maintenance");
    assert_eq!(host(&status, "a")["vms"], 0, "host a must end empty");
    assert_eq!(vm(&status, &other)["host"], "b", "untouched VM stays");
    for (id, want) in ids.iter().zip(&expected) {
        let now_on = vm(&status, id)["host"].as_str().unwrap().to_string();
        // The key `ferry vm create` made moved with it: a create sent again finds it.
        let key = cluster.daemon(&now_on).show(id)["idempotency_key"].clone();
        assert!(
            key.as_str().is_some_and(|k| k.starts_with("cli-")),
            "{id} on {now_on}: {key}"
        );
        assert_eq!(
            &cluster.daemon(&now_on).checksum_at_exit(id),
            want,
            "{id} moved to {now_on}"
        );
    }

    // Nothing new lands on a host in maintenance, chosen or asked for.
    let placed = c.json(&["vm", "create", "hello", "--json", "--memory", "64M"]);
    assert_ne!(placed["host"], "a", "{placed}");
    // Run again with its key (a script retrying after a lost answer), a create makes no
    // second VM.
    let keyed = [
        "vm",
        "create",
        "hello",
        "--json",
        "--memory",
        "64M",
        "--idempotency-key",
        "retried-1",
    ];
    let (first, again) = (c.json(&keyed), c.json(&keyed));
    assert_eq!(first["vm"]["id"], again["vm"]["id"], "{first} {again}");
    assert_ne!(first["vm"]["id"], placed["vm"]["id"]);
    let refused = c.ferry(&["vm", "create", "hello", "--on", "a"]);
    assert!(!refused.status.success());
    common::assert_says(
        &refused.stderr,
        "is in maintenance mode and takes no new VMs",
    );
    // Refused outright: not sent again, nor said to be maybe made.
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !said.contains("sending the create again") && !said.contains("may have been made"),
        "{said}"
    );

    let scrape = || {
        ureq::get(format!("{}/metrics", c.url))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let metrics = scrape();
    assert!(
        metrics.contains("ferry_migrations_total{result=\"succeeded\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_migration_pause_seconds_count 2"),
        "{metrics}"
    );
    // Scrapes cost the center nothing that stays: 1,000 of them keep its memory flat.
    for _ in 0..100 {
        scrape();
    }
    let (rss_before, _) = common::footprint(c.child.0.id());
    let started = std::time::Instant::now();
    for _ in 0..1_000 {
        scrape();
    }
    let (rss_after, _) = common::footprint(c.child.0.id());
    eprintln!(
        "1,000 scrapes of the center's /metrics ({:.2} ms each): RSS {} -> {} MiB",
        started.elapsed().as_secs_f64(),
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(
        rss_after < rss_before + (8 << 20),
        "RSS {} -> {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );

    let back = c.json(&["host", "maintenance", "exit", "a", "--json"]);
    assert_eq!(back["mode"], "active", "{back}");
}

#[test]
fn maintenance_moves_a_cuda_vm_only_to_a_host_that_runs_its_backend() {
    let test = "maintenance_moves_a_cuda_vm_only_to_a_host_that_runs_its_backend";
    if !kvm_available(test) {
        return;
    }
    let center = start_center(&scratch_dir(test).join("center.db"), "127.0.0.1:0");
    // a and c run the cuda backend's kernels (emulated: this machine has no GPU); b runs
    // only cpu but has the most free accelerator memory, so room alone would pick it.
    let host = |name: &str, accel: &str, cuda: bool| {
        let mut flags = vec![
            "--center",
            &center.url,
            "--heartbeat-ms",
            "200",
            "--accel-capacity",
            accel,
            "--memory-capacity",
            "4G",
        ];
        let env: &[(&str, &str)] = if cuda {
            flags.extend(["--backend", "cuda"]);
            &[("FERRY_CUDA_EMULATOR", "1")]
        } else {
            &[]
        };
        Daemon::start_env(name, &flags, env)
    };
    let a = host("a", "1G", true);
    let b = host("b", "3G", false);
    let _c = host("c", "1G", true);
    center.wait_three_hosts_up();
    let id = center.create_on(
        "a",
        "32M",
        "--steps 3000 --print-every 10 --hidden 64 --batch 32",
    );
    a.wait_console(&id, "step=30 ");
    let status = center.status();
    assert_eq!(
        vm(&status, &id)["accel_backend"],
        "cuda-emulated",
        "{status:#}"
    );

    // Asked for a GPU, the center picks a host with one (b has the most room but none);
    // asked to put it on b, the center refuses, and so does b itself.
    let asked = [
        "vm",
        "create",
        "hello",
        "--json",
        "--memory",
        "64M",
        "--accel-memory",
        "32M",
        "--backend",
        "cuda",
    ];
    let placed = center.json(&asked);
    assert_ne!(placed["host"], "b", "{placed}");
    let refused = center.ferry(&[&asked[..], &["--on", "b"]].concat());
    assert!(!refused.status.success());
    common::assert_says(
        &refused.stderr,
        "no host in service runs the VM's accelerator backend cuda (hosts: b cpu)",
    );
    let refused = b.ferry(&[
        "vm",
        "--host",
        &b.api,
        "create",
        "hello",
        "--accel-memory",
        "32M",
        "--backend",
        "cuda",
    ]);
    assert!(!refused.status.success());
    common::assert_says(
        &refused.stderr,
        "accelerator backend 'cuda' is not available here (this host has: cpu)",
    );

    let done = center.json(&["host", "maintenance", "enter", "a", "--json"]);
    assert_eq!(done["operation"]["state"], "done", "{done:#}");
    let moves = done["migrations"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{done:#}");
    assert_eq!(moves[0]["state"], "succeeded", "{done:#}");
    assert_eq!(
        moves[0]["to"], "c",
        "the cuda VM went where its backend is not: {done:#}"
    );
}

#[test]
fn maintenance_without_room_elsewhere_refuses_and_moves_nothing() {
    ferry_testdata::require_kvm!(kvm_available);
    let cluster = Cluster::start("no-room", "512M");
    let c = &cluster.center;
    let on_a = [
        c.create_on("a", "256M", MLP_LONG),
        c.create_on("a", "256M", MLP_LONG),
    ];
    c.create_on("b", "384M", MLP_LONG);
    c.create_on("c", "384M", MLP_LONG);
    c.wait_for("four VMs running", |s| {
        s["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "running")
            .count()
            == 4
    });

    let out = c.ferry(&["host", "maintenance", "enter", "a"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let why = text(&out.stderr);
    assert!(
        why.contains("nowhere to go") && why.contains("nothing was moved"),
        "{why}"
    );
    assert!(why.contains("256 MiB of accelerator memory"), "{why}");

    let status = c.status();
    assert_eq!(host(&status, "a")["mode"], "active", "{status:#}");
    for id in &on_a {
        assert_eq!(vm(&status, id)["host"], "a");
        assert_eq!(vm(&status, id)["state"], "running");
        assert_eq!(cluster.daemon("a").show(id)["state"], "running");
    }
    assert!(
        status["migrations"].as_array().unwrap().is_empty(),
        "{status:#}"
    );
}

#[test]
fn a_killed_host_is_marked_down_and_its_vms_are_reported_unreachable() {
    ferry_testdata::require_kvm!(kvm_available);
    let mut cluster = Cluster::start("host-down", "1G");
    let c = &cluster.center;
    let lost = c.create_on("c", "32M", MLP_LONG);
    c.wait_for("the VM running", |s| vm(s, &lost)["state"] == "running");

    let (_, daemon) = cluster.hosts.iter_mut().find(|(n, _)| n == "c").unwrap();
    daemon.child.kill().unwrap();
    // Down at once on reads; the event follows on the center's next check.
    let status = cluster.center.wait_for("host c down, with an event", |s| {
        host(s, "c")["status"] == "down"
            && s["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "host-down")
    });
    assert_eq!(vm(&status, &lost)["state"], "unreachable", "{status:#}");
    assert_eq!(vm(&status, &lost)["host"], "c");
    assert_eq!(vm(&status, &lost)["last_state"], "running");
    assert_eq!(host(&status, "a")["status"], "up");
    let events = status["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "host-down" && e["message"].as_str().unwrap().contains(&lost)),
        "{events:#?}"
    );
    // A down host can be neither a target nor evacuated.
    let out = cluster.center.ferry(&["host", "maintenance", "enter", "c"]);
    assert!(text(&out.stderr).contains("down"), "{}", text(&out.stderr));
    // The machine is retired: forgotten only with its VM, which is named first.
    let out = cluster.center.ferry(&["host", "forget", "c"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&lost), "{}", text(&out.stderr));
    let out = cluster
        .center
        .ferry(&["host", "forget", "c", "--with-vms", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forgotten: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(forgotten["vms"], serde_json::json!([lost]));
    let status = cluster.center.status();
    assert_eq!(
        common::texts(&status["hosts"], "name"),
        ["a", "b"],
        "{status:#}"
    );
    assert!(status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["id"] != lost));
}

#[test]
fn balance_moves_load_off_the_busiest_host_and_dry_run_changes_nothing() {
    ferry_testdata::require_kvm!(kvm_available);
    let cluster = Cluster::start("balance", "1G");
    let c = &cluster.center;
    let ids: Vec<String> = (0..3).map(|_| c.create_on("a", "256M", MLP_LONG)).collect();
    c.wait_for("three VMs running", |s| {
        ids.iter().all(|id| vm(s, id)["state"] == "running")
    });

    let plan = c.json(&["center", "balance", "--dry-run", "--json"]);
    let moves = plan["moves"].as_array().unwrap();
    assert!(!moves.is_empty(), "{plan:#}");
    assert!(moves.iter().all(|m| m["from"] == "a"), "{plan:#}");
    assert!(
        plan["spread_after"].as_f64().unwrap() < plan["spread_before"].as_f64().unwrap(),
        "{plan:#}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let status = c.status();
    assert!(
        ids.iter().all(|id| vm(&status, id)["host"] == "a"),
        "dry run moved: {status:#}"
    );
    assert!(status["migrations"].as_array().unwrap().is_empty());

    let done = c.json(&["center", "balance", "--json"]);
    assert_eq!(done["operation"]["state"], "done", "{done:#}");
    let made = done["migrations"].as_array().unwrap();
    assert_eq!(made.len(), moves.len(), "{done:#}");
    let status = c.wait_for("the moved VMs reported by their new hosts", |s| {
        s["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["host"] == "a")
            .count()
            == 3 - made.len()
    });
    for id in &ids {
        assert_eq!(vm(&status, id)["state"], "running", "{status:#}");
    }
    let pressures = common::numbers(&status["hosts"], "pressure");
    let spread = pressures.iter().cloned().fold(f64::MIN, f64::max)
        - pressures.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread < plan["spread_before"].as_f64().unwrap(),
        "{pressures:?}"
    );
}

#[test]
fn a_restarted_center_keeps_its_inventory_and_history() {
    ferry_testdata::require_kvm!(kvm_available);
    let mut cluster = Cluster::start("restart", "1G");
    let id = cluster.center.create_on("a", "32M", MLP_LONG);
    cluster.daemon("a").wait_console(&id, "step=");
    let done = cluster
        .center
        .json(&["host", "maintenance", "enter", "a", "--json"]);
    assert_eq!(done["operation"]["state"], "done", "{done:#}");
    let moved_to = done["migrations"][0]["to"].as_str().unwrap().to_string();
    let pause = done["migrations"][0]["downtime_ms"].as_f64().unwrap();

    // Kill it hard and start it again on the same database and address.
    let addr = cluster.center.url.trim_start_matches("http://").to_string();
    let db = cluster.center.db.clone();
    cluster.center.child.0.kill().unwrap();
    cluster.center.child.0.wait().unwrap();
    // The database holds no secret, no key derived from it and no token.
    let secret = ferry_migrate::Secret::new(common::SECRET.as_bytes()).unwrap();
    let stored: Vec<u8> = ["", "-wal"]
        .iter()
        .flat_map(|suffix| std::fs::read(format!("{}{suffix}", db.display())).unwrap_or_default())
        .collect();
    for needle in [
        common::SECRET.to_string(),
        TOKEN.to_string(),
        secret.token(ferry_migrate::Purpose::HostApi),
        secret.token(ferry_migrate::Purpose::Heartbeat),
        secret.token(ferry_migrate::Purpose::Migration),
    ] {
        assert!(
            !stored.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the center's database holds a credential"
        );
    }
    cluster.center = start_center(&db, &addr);
    let status = cluster.center.status();
    let names: Vec<&str> = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{status:#}");
    assert_eq!(host(&status, "a")["mode"], "maintenance");
    assert_eq!(vm(&status, &id)["host"], moved_to.as_str());
    let history = cluster.center.json(&["center", "status", "--json"])["migrations"].clone();
    let m = &history[0];
    assert_eq!(m["vm"], id.as_str(), "{history:#}");
    assert_eq!(m["state"], "succeeded");
    assert_eq!(m["downtime_ms"].as_f64().unwrap(), pause);
    // The hosts' heartbeats find the new center on their own.
    cluster.center.wait_for("hosts up again", |s| {
        s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["status"] == "up")
    });
}

#[test]
fn the_dashboard_shows_the_cluster_and_its_buttons_work_in_headless_chromium() {
    let test = "the_dashboard_shows_the_cluster_and_its_buttons_work_in_headless_chromium";
    if !kvm_available(test) {
        return;
    }
    let Some(binary) = chromium::find() else {
        ferry_testdata::missing_chromium(
            test,
            "no chromium on PATH (.ci/run installs Debian's chromium)",
        );
        return;
    };
    let cluster = Cluster::start("dashboard", "1G");
    let c = &cluster.center;
    let id = c.create_on("b", "32M", MLP_LONG);
    c.wait_for("the VM running", |s| vm(s, &id)["state"] == "running");
    let mut browser = Browser::launch(&binary, &scratch_dir("dashboard-profile"));

    // Without the token the page shows the sign-in form and no data.
    browser.navigate(&format!("{}/?fresh=1#token=not-the-token-at-all", c.url));
    browser.wait_text("#login", "the sign-in form after a wrong token", |t| {
        t.contains("wrong API token")
    });
    assert_eq!(browser.eval("document.getElementById('app').hidden"), true);

    browser.navigate(&format!("{}/#token={TOKEN}", c.url));
    let hosts = browser.wait_text("#hosts", "three hosts", |t| {
        ["a", "b", "c"].iter().all(|h| t.contains(h)) && t.matches("up").count() >= 3
    });
    assert!(hosts.contains("active"), "{hosts}");
    assert!(hosts.contains("backends: cpu"), "{hosts}");
    // Under the page's policy (its own script and style only), the script runs and the
    // bars get their widths.
    let width = browser.eval("document.querySelector('#hosts .bar span').style.width");
    assert!(width.as_str().is_some_and(|w| w.ends_with('%')), "{width}");
    let row = format!("#vms tr[data-vm=\"{id}\"]");
    let vm_row = browser.wait_text(&row, "the VM on b", |t| t.contains("running"));
    assert!(
        vm_row.contains("mlp-train") && vm_row.contains('b') && vm_row.contains("on cpu"),
        "{vm_row}"
    );
    assert_eq!(browser.text("#token-input"), "", "the token is not shown");

    // The operator empties b from the dashboard.
    browser.click("#hosts tr[data-host=\"b\"] .enter-maintenance");
    browser.wait_text("#message", "the maintenance message", |t| {
        t.contains("Maintenance of b started: 1 VM(s) to move")
    });
    browser.wait_text("#hosts tr[data-host=\"b\"]", "b in maintenance", |t| {
        t.contains("maintenance") && !t.contains("evacuating")
    });
    let done = browser.wait_text("#migrations-done", "the finished move", |t| {
        t.contains(&id) && t.contains("succeeded")
    });
    assert!(done.contains("maintenance of b"), "{done}");
    let moved = browser.wait_text(&row, "the VM on its new host", |t| {
        t.contains("running") && !t.contains("\tb\t")
    });
    let status = c.status();
    let new_host = vm(&status, &id)["host"].as_str().unwrap().to_string();
    assert_ne!(new_host, "b");
    assert!(moved.contains(&new_host), "{moved}");
    let pause = status["migrations"][0]["downtime_ms"].as_f64().unwrap();
    assert!(
        done.contains(&format!("{pause:.1}")),
        "pause {pause:.1} not shown: {done}"
    );

    // Back to service, then a dry-run plan that moves nothing.
    browser.click("#hosts tr[data-host=\"b\"] .exit-maintenance");
    browser.wait_text("#hosts tr[data-host=\"b\"]", "b active again", |t| {
        t.contains("active")
    });
    browser.click("#balance-dry-run");
    let plan = browser.wait_text("#plan", "the plan", |t| !t.trim().is_empty());
    assert!(
        plan.contains("balanced") || plan.contains("Dry run"),
        "{plan}"
    );
    assert_eq!(
        vm(&c.status(), &id)["host"],
        new_host.as_str(),
        "a dry run moves nothing"
    );
}

#[test]
fn the_evacuation_bench_empties_a_host_and_cleans_up_after_itself() {
    ferry_testdata::require_kvm!(kvm_available);
    // Each count moves that many VMs off host a, stops them where they went, and waits
    // until the center no longer lists them before the next count.
    let out = common::ferry(&["bench", "evacuate", "--vms", "1,2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, vms) in rows.iter().zip([1, 2]) {
        assert_eq!(row["vms"], vms, "{row}");
        let pauses = row["pauses_ms"].as_array().unwrap();
        assert_eq!(pauses.len(), vms, "one pause per VM moved: {row}");
        assert!(pauses.iter().all(|p| p.as_f64().unwrap() > 0.0), "{row}");
        assert!(row["bytes_sent"].as_u64().unwrap() > 0, "{row}");
    }
}
