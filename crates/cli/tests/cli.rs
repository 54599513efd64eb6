//! The `ferry` binary as a user runs it: exit codes, messages, snapshot and restore.

use std::process::{Command, Output};

mod common;

use common::{assert_says, text};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn kvm_available(test: &str) -> bool {
    ferry_testdata::kvm(test)
}

#[test]
fn usage_errors_are_clear_without_kvm() {
    let out = ferry(&["run", "no-such-workload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no workload named 'no-such-workload'") && err.contains("memtouch"),
        "{err}"
    );

    // Sizes the VMM cannot take are usage errors, found before any file is hashed.
    let out = ferry(&["run", "hello", "--memory", "3M"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "multiple of 2 MiB");
    for args in [
        &["run", "hello", "--memory", "0"][..],
        &["run", "hello", "--memory", "256BB"],
        &["run", "hello", "--accel-memory", "1000"],
    ] {
        assert_eq!(ferry(args).status.code(), Some(2), "{args:?}");
    }
    let out = ferry(&["run", "hello", "--memory", "1.5G"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "no decimals");

    // What a host would refuse is a usage error here, before any host is asked.
    for (args, says) in [
        (&["--streams", "0"][..], "1..=16"),
        (&["--streams", "17"], "1..=16"),
        (&["--downtime-ms", "0"], "1..=600000"),
        (&["--downtime-ms", "600001"], "1..=600000"),
        (&["--max-rounds", "0"], "1..=1000"),
    ] {
        let out = ferry(&[&["migrate", "v", "--to", "127.0.0.1:1"], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_says(&out.stderr, says);
    }
    let out = ferry(&["migrate", "v", "--to", "127.0.0.1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "is not a migration address HOST:PORT");
    let out = ferry(&["vm", "create", "hello", "--name", "a b"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "is not a VM name");

    // A center's balance threshold out of range is a usage error, as any bad flag.
    for threshold in ["11", "-1", "NaN"] {
        let flag = format!("--balance-threshold={threshold}");
        let out = ferry(&["center", "serve", &flag]);
        assert_eq!(out.status.code(), Some(2), "{threshold}");
        assert_says(&out.stderr, "between 0 and 10");
    }

    // No simulated hosts is no center benchmark (its simulator would spin, idle).
    let out = ferry(&["bench", "center", "--hosts", "100,0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "1..=10000");

    // A model demo's answer too short to move in its middle is refused before any VM.
    let out = ferry(&["demo", "--model", "m.gguf", "--max-tokens", "8"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "32..");
    // Likewise a training demo that would end before its move.
    let out = ferry(&["demo", "--steps", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "100..");
    // A folder without a snapshot is named as such, not as a file that could not be read.
    let empty = tempfile::tempdir().unwrap();
    let out = ferry(&["restore", empty.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "is not a snapshot folder: it has no vm.snap");
    // Kernel threads for a VM without an accelerator were ignored without a word.
    let out = ferry(&["run", "hello", "--accel-threads", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "--accel-memory");

    // A snapshot folder that cannot be made is refused before the VM runs, not at the
    // snapshot point, which would end the VM for nothing.
    let out = ferry(&[
        "run",
        "hello",
        "--snapshot-at-ms",
        "60000",
        "--snapshot-dir",
        "/proc/ferry-no-such-folder",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "cannot create /proc/ferry-no-such-folder");
    assert!(out.stdout.is_empty(), "the VM ran: {}", text(&out.stdout));

    // A host name is checked before it goes into a URL (it could have named another
    // resource: 'a/maintenance', 'a?with_vms=true#').
    for args in [
        &["host", "forget", "a/maintenance"][..],
        &["host", "forget", "a?with_vms=true#"],
        &["host", "maintenance", "enter", "a/b"],
        &["host", "maintenance", "exit", "../a"],
    ] {
        let out = ferry(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_says(&out.stderr, "is not a host name");
    }

    let out = ferry(&["run", "hello", "--snapshot-at-ms", "5"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--snapshot-at-ms needs --snapshot-dir"
    );

    let out = ferry(&["restore", "/nonexistent/ferry-snapshot"]);
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "No such file");

    let out = ferry(&["run", "--help"]);
    assert!(text(&out.stdout).contains("--snapshot-at-ms"));

    // Unknown benchmarks and ids no URL path may hold are usage errors, named as such.
    let out = ferry(&["bench", "no-such-bench"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "possible values: vm, accel");
    for args in [
        &["vm", "show", "a b"][..],
        &["migrate", "x/../y", "--cancel"],
    ] {
        let out = ferry(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_says(&out.stderr, "is not a VM id");
    }
}

/// `ferry ARGS` with `env` set and FERRY_SECRET and FERRY_API_TOKEN unset.
fn ferry_with(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_SECRET")
        .env_remove("FERRY_API_TOKEN")
        // Warnings (the default level) are part of what some tests check.
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run ferry")
}

#[test]
fn client_commands_say_what_is_missing() {
    let refused = "http://127.0.0.1:1";
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &["vm", "list", "--host", "127.0.0.1:7070"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("needs its scheme: http://127.0.0.1:7070"),
        "{err}"
    );
    // Another scheme is not mended by prefixing one.
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &["vm", "list", "--host", "ftp://x"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("only http:// and https:// are supported") && !err.contains("http://ftp"),
        "{err}"
    );
    // No credentials at all: every way to give them is named.
    let err = text(&ferry_with(&[], &["vm", "list", "--host", refused]).stderr);
    for way in [
        "--api-token-file",
        "FERRY_API_TOKEN",
        "--secret-file",
        "FERRY_SECRET",
    ] {
        assert!(err.contains(way), "{way}: {err}");
    }
    // A flag wins over the environment.
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &[
            "vm",
            "list",
            "--secret-file",
            "/nonexistent/secret",
            "--host",
            refused,
        ],
    );
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/secret"), "{err}");
}

#[test]
fn a_secret_file_every_user_may_read_is_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
    let list = || {
        let args = [
            "vm",
            "list",
            "--host",
            "http://127.0.0.1:1",
            "--secret-file",
        ];
        let path = secret.to_str().unwrap();
        text(&ferry_with(&[], &[&args[..], &[path]].concat()).stderr)
    };
    let chmod = |mode| std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode));
    chmod(0o644).unwrap();
    let err = list();
    assert!(
        err.contains(&format!(
            "every user of this machine may read {} (mode 0644)",
            secret.display()
        )) && err.contains("chmod o-r"),
        "{err}"
    );
    chmod(0o600).unwrap();
    let err = list();
    assert!(!err.contains("every user"), "{err}");
    // The secret was used either way: the API was asked (and is not there).
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn a_credential_given_but_unusable_is_named_not_called_missing() {
    let refused = "http://127.0.0.1:1";
    // A secret too short is the variable's or the file's fault, not a lack of credentials.
    let out = ferry_with(
        &[("FERRY_SECRET", "short")],
        &["vm", "list", "--host", refused],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("FERRY_SECRET: the shared secret must be at least 16 bytes")
            && !err.contains("no credentials"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("secret");
    std::fs::write(&short, "short\n").unwrap();
    let out = ferry_with(
        &[],
        &[
            "vm",
            "list",
            "--host",
            refused,
            "--secret-file",
            short.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(
        &out.stderr,
        &format!("the secret file {}: the shared secret", short.display()),
    );
    // An operator's token that would be sent as none, or that no header can carry, is
    // refused before any API is asked (it was "cannot reach the API", or a 401 for a
    // token that was never sent).
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let out = ferry_with(
        &[],
        &[
            "vm",
            "list",
            "--host",
            refused,
            "--api-token-file",
            empty.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(
        &out.stderr,
        &format!("the API token file {} is empty", empty.display()),
    );
    for token in ["two words", "schlüssel"] {
        let out = ferry_with(
            &[("FERRY_API_TOKEN", token)],
            &["vm", "list", "--host", refused],
        );
        assert_eq!(out.status.code(), Some(1), "{token}");
        let err = text(&out.stderr);
        assert!(
            err.contains("FERRY_API_TOKEN: a token may hold only ASCII")
                && !err.contains("cannot reach"),
            "{token}: {err}"
        );
    }
}

/// Runs `ferry ARGS` (with an API token) and reads the first line it prints, then goes,
/// as `| head -1` does: that line, and how ferry ended.
fn first_line_then_hang_up(args: &[&str]) -> (String, Output) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_API_TOKEN", "t")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (first, child.wait_with_output().unwrap())
}

#[test]
fn a_client_command_whose_reader_goes_ends_quietly() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::ExitStatusExt;
    // A host API that answers one console read with 4 MiB of text.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let body = "console line\n".repeat(4 << 20 >> 4);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body.as_bytes());
    });
    let (first, out) = first_line_then_hang_up(&["vm", "console", "v", "--host", &url]);
    assert_eq!(first, "console line\n");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}

#[test]
fn a_create_left_in_doubt_names_the_key_to_send_it_again_with() {
    // A host API that answers every create "still under way" (its first try may be
    // making the VM), as after a lost answer.
    let url = api_answering(
        "503 Service Unavailable",
        r#"{"error":"a create with this key is under way","code":"unavailable"}"#,
    );
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &["vm", "create", "hello", "--host", &url],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "send it again with --idempotency-key cli-");
}

#[test]
fn a_benchmark_whose_reader_goes_ends_quietly() {
    if !kvm_available("a_benchmark_whose_reader_goes_ends_quietly") {
        return;
    }
    // `bench` runs daemons in its process, so it keeps SIGPIPE ignored: a closed stdout
    // reaches it as an error on the next line it prints.
    let (first, out) = first_line_then_hang_up(&["bench", "vm"]);
    assert!(first.starts_with("figure"), "{first}");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn guest_exit_code_and_faults_reach_the_shell() {
    ferry_testdata::require_kvm!(kvm_available);
    let out = ferry(&["run", "hello", "--", "first", "--exit-code", "3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_says(&out.stdout, "arg[0]=first");

    let out = ferry(&["run", "faults", "--", "invalid-opcode"]);
    assert_eq!(out.status.code(), Some(125));
    assert_says(&out.stderr, "#UD invalid opcode (vector 6");
}

#[test]
fn a_demo_whose_guest_refuses_its_model_says_why() {
    ferry_testdata::require_kvm!(kvm_available);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("notes.gguf");
    std::fs::write(&model, "not a model at all\n".repeat(100)).unwrap();
    let out = ferry(&["demo", "--model", model.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    // The guest's own words, not advice to ask for a longer answer.
    assert!(err.contains("not a GGUF file"), "{err}");
    assert!(!err.contains("longer one"), "{err}");
}

#[test]
fn resolving_a_vm_that_never_migrated_is_a_conflict_not_a_missing_vm() {
    ferry_testdata::require_kvm!(kvm_available);
    let host = common::Daemon::start("a");
    let id = host.create("hello", "0", "");
    for resolve in [
        &["vm", "resolve", &id][..],
        &["vm", "resolve", &id, "--release"],
    ] {
        let out = host.ferry(&[resolve, &["--host", &host.api]].concat());
        assert_eq!(out.status.code(), Some(1), "{resolve:?}");
        let err = text(&out.stderr);
        assert!(!err.contains("no VM with id"), "{resolve:?}: {err}");
        assert!(err.contains("(HTTP 409)"), "{resolve:?}: {err}");
    }
    let out = host.ferry(&["vm", "resolve", &id, "--host", &host.api]);
    assert_says(
        &out.stderr,
        &format!("VM {id} has no migration from this host to show or resolve"),
    );
}

fn checksum(out: &Output) -> String {
    let stdout = text(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("checksum="))
        .unwrap_or_else(|| panic!("no checksum in {stdout}\nstderr: {}", text(&out.stderr)))
        .to_string()
}

#[test]
fn run_snapshot_then_restore_prints_the_same_checksum() {
    ferry_testdata::require_kvm!(kvm_available);
    let guest = ["--", "--mib", "16", "--passes", "150", "--seed", "9"];
    let straight = ferry(&[&["run", "memtouch"][..], &guest].concat());
    assert_eq!(straight.status.code(), Some(0));

    let dir = std::env::temp_dir().join(format!("ferry-cli-snap-{}", std::process::id()));
    let dir_arg = dir.to_str().unwrap();
    let snap = ferry(
        &[
            &[
                "run",
                "memtouch",
                "--snapshot-at-ms",
                "60",
                "--snapshot-dir",
                dir_arg,
            ][..],
            &guest,
        ]
        .concat(),
    );
    assert_eq!(snap.status.code(), Some(0), "{}", text(&snap.stderr));
    assert!(
        !text(&snap.stdout).contains("checksum="),
        "snapshot came after the end"
    );
    assert_says(&snap.stderr, "ferry restore");

    let restored = ferry(&["restore", dir_arg]);
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    assert_eq!(checksum(&restored), checksum(&straight));

    // A damaged snapshot is refused with the reason and a non-zero exit.
    let file = dir.join("vm.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let bad = ferry(&["restore", dir_arg]);
    assert_eq!(bad.status.code(), Some(1));
    assert_says(&bad.stderr, "checksum mismatch");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failing_kvm_ioctl_reaches_the_operator_with_its_errno() {
    let test = "a_failing_kvm_ioctl_reaches_the_operator_with_its_errno";
    if !kvm_available(test) {
        return;
    }
    use ferry_vmm::{HostOptions, Microvm, VmConfig};
    let image = ferry_guest_images::find("memtouch").unwrap().elf;
    let args = [
        "--mib".to_string(),
        "4".into(),
        "--passes".into(),
        "100000".into(),
    ];
    // Booted paused, before its vCPU first runs.
    let vm = Microvm::boot(VmConfig::new(32 << 20), image, &args, HostOptions::quiet()).unwrap();
    let mut paused = ferry_vmm::migration::PausedVm::new(&vm).unwrap();
    // A DR7 with its upper half set: KVM_SET_DEBUGREGS refuses it with EINVAL. (State
    // the VMM owns, such as CR0, is refused by the VMM itself before any ioctl.)
    paused.state.vcpus[0].debug_regs.dr7 = 1 << 32;
    let path = std::env::temp_dir().join(format!("ferry-{test}-{}.snap", std::process::id()));
    ferry_vmm::snapshot::save_paused(&paused, &path).unwrap();
    let out = ferry(&["restore", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("KVM_SET_DEBUGREGS") && err.contains("os error 22"),
        "the ioctl and its errno are lost: {err}"
    );
}

#[test]
fn a_host_bound_to_every_address_must_say_where_the_center_reaches_it() {
    let store = tempfile::tempdir().unwrap();
    let store = store.path().to_str().unwrap();
    let out = ferry_with(
        &[("FERRY_SECRET", "cli-test-secret-0123456789abcdef")],
        &[
            "host",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--migration-listen",
            "127.0.0.1:0",
            "--center",
            "http://127.0.0.1:1",
            "--file-store",
            store,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "give --advertise IP_OR_NAME");
}

#[test]
fn a_center_address_the_host_cannot_use_names_its_flag() {
    let store = tempfile::tempdir().unwrap();
    let out = ferry_with(
        &[("FERRY_SECRET", "cli-test-secret-0123456789abcdef")],
        &[
            "host",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--migration-listen",
            "127.0.0.1:0",
            "--center",
            "127.0.0.1:1",
            "--file-store",
            store.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    // Not "cannot start the heartbeat thread": no thread failed, the address did.
    assert!(
        err.contains("cannot report to the center (--center 127.0.0.1:1)")
            && err.contains("needs its scheme"),
        "{err}"
    );
}

#[test]
fn a_typed_host_and_a_center_from_the_environment_are_not_both_taken() {
    let out = ferry_with(
        &[
            ("FERRY_CENTER", "http://127.0.0.1:1"),
            ("FERRY_API_TOKEN", "center-token-0123456789"),
        ],
        &["vm", "create", "--host", "http://127.0.0.1:1", "hello"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "both --host and a center");
    // Words after `--` are the guest's: a guest's --host is no flag of ferry's.
    let out = ferry_with(
        &[
            ("FERRY_CENTER", "http://127.0.0.1:1"),
            ("FERRY_API_TOKEN", "center-token-0123456789"),
        ],
        &["vm", "create", "hello", "--", "--host=x"],
    );
    assert!(
        !text(&out.stderr).contains("both --host"),
        "{}",
        text(&out.stderr)
    );
}

/// The URL of an API that answers every request with `status` (its line, e.g. `401
/// Unauthorized`) and the JSON `body`.
fn api_answering(status: &'static str, body: &'static str) -> String {
    use std::io::{BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = ferry_testdata::read_http_request(&mut BufReader::new(&conn));
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn a_refused_token_names_what_to_check() {
    let url = api_answering("401 Unauthorized", r#"{"error":"wrong API token"}"#);
    let out = ferry_with(&[("FERRY_API_TOKEN", "t")], &["vm", "list", "--host", &url]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    // The API's own words, then where to look.
    assert!(err.contains("wrong API token (HTTP 401)"), "{err}");
    for check in ["hint:", "FERRY_SECRET", "another kind of server"] {
        assert!(err.contains(check), "{check}: {err}");
    }
    // The center's token is named where a center refuses it.
    let out = ferry_with(
        &[("FERRY_CENTER_TOKEN", "center-token-0123456789")],
        &["center", "status", "--center", &url],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for check in ["hint:", "--token-file", "FERRY_CENTER_TOKEN"] {
        assert!(err.contains(check), "{check}: {err}");
    }
    // Other errors of Ferry's APIs have none.
    let url = api_answering(
        "404 Not Found",
        r#"{"error":"no VM with id v","code":"vm_not_found"}"#,
    );
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &["vm", "show", "v", "--host", &url],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !text(&out.stderr).contains("hint:"),
        "{}",
        text(&out.stderr)
    );
    // Another server's answer, with no error of Ferry's ("GET /v1/vms:  (HTTP 404)"),
    // names the address to check.
    let url = api_answering("404 Not Found", "");
    let out = ferry_with(&[("FERRY_API_TOKEN", "t")], &["vm", "list", "--host", &url]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("hint: the answer is not a Ferry API's") && err.contains("--host"),
        "{err}"
    );
}

#[test]
fn a_cancel_that_came_too_late_still_prints_how_it_ended_as_json() {
    // A host whose VM's migration is in doubt (the switchover broke): the cancel is too
    // late, and a script reading --json finds the status where it reads one.
    let url = api_answering(
        "200 OK",
        r#"{"vm":"v","to":"127.0.0.1:1","state":"in-doubt","progress":null,"report":null,"error":"the connection broke after the go","settlement":["asked 127.0.0.1:1: no answer"]}"#,
    );
    let out = ferry_with(
        &[("FERRY_API_TOKEN", "t")],
        &["migrate", "v", "--cancel", "--json", "--host", &url],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "too late");
    let stdout = text(&out.stdout);
    let status: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    assert_eq!(status["state"], "in-doubt", "{status}");
    assert_eq!(status["settlement"][0], "asked 127.0.0.1:1: no answer");
}

#[test]
fn a_host_refuses_one_address_for_its_api_and_its_migrations() {
    let store = tempfile::tempdir().unwrap();
    // Held, so that without the check the daemon fails at once rather than serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ferry_with(
        &[("FERRY_SECRET", "cli-test-secret-0123456789abcdef")],
        &[
            "host",
            "serve",
            "--listen",
            &addr,
            "--migration-listen",
            &addr,
            "--file-store",
            store.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_says(&out.stderr, "need different addresses");
}

#[test]
fn a_host_refuses_capacities_it_could_not_use() {
    let store = tempfile::tempdir().unwrap();
    // Held, so that without the check the daemon fails at once rather than serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ferry_with(
        &[("FERRY_SECRET", "cli-test-secret-0123456789abcdef")],
        &[
            "host",
            "serve",
            "--listen",
            &addr,
            "--migration-listen",
            "127.0.0.1:0",
            "--memory-capacity",
            "1G",
            "--accel-capacity",
            "2G",
            "--file-store",
            store.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_says(
        &out.stderr,
        "--accel-capacity (2048 MiB) is more than --memory-capacity (1024 MiB)",
    );
    // No accelerator threads is no usable count either (it quietly ran one per VM).
    let out = ferry_with(
        &[("FERRY_SECRET", "cli-test-secret-0123456789abcdef")],
        &[
            "host",
            "serve",
            "--listen",
            &addr,
            "--accel-threads",
            "0",
            "--file-store",
            store.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_says(&out.stderr, "'--accel-threads <N>'");
}

/// `ferry ARGS --help`'s text, its lines joined (clap wraps it to the terminal).
fn help(args: &[&str]) -> String {
    let out = ferry(&[args, &["--help"]].concat());
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn vm_help_says_what_goes_through_the_center_and_what_a_stop_forgets() {
    // Only a create takes --center.
    let vm = help(&["vm"]);
    assert!(
        vm.contains("only `create` can go through the cluster center"),
        "{vm}"
    );
    assert!(!help(&["vm", "list"]).contains("--center"));
    assert!(help(&["vm", "create"]).contains("--center"));
    // A stop drops the VM's record and console (the host's `stop` unlists it).
    let stop = help(&["vm", "stop"]);
    assert!(
        stop.contains("forget it: its record and console go"),
        "{stop}"
    );
}

#[test]
fn a_migration_sent_to_an_api_names_the_migration_address() {
    ferry_testdata::require_kvm!(kvm_available);
    let host = common::Daemon::start("a");
    let id = host.create("memtouch", "0", "--passes 100000");
    let api_port = host.api.trim_start_matches("http://");
    let out = host.ferry(&["migrate", &id, "--to", api_port, "--host", &host.api]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("answered in HTTP") && err.contains("--migration-listen"),
        "{err}"
    );
    let stopped = host.ferry(&["vm", "stop", &id, "--host", &host.api]);
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
}

#[test]
fn bench_migrate_refuses_a_run_with_no_row_before_starting_hosts() {
    ferry_testdata::require_kvm!(kvm_available);
    let out = ferry(&["bench", "migrate", "--workloads", "mlp-train-large"]);
    assert_eq!(out.status.code(), Some(1));
    assert_says(&out.stderr, "runs only across a shaped link (--link RATE)");
}

#[test]
fn a_serving_process_raises_its_open_files_limit_to_the_hard_one() {
    use std::io::{BufRead, BufReader};
    // Started with a soft limit of 256 (systemd's default is 1024), below the hard one.
    let dir = common::empty_dir("raised-files-limit");
    let mut child = common::KillOnDrop(
        Command::new("sh")
            .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(["center", "serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(dir.join("center.db"))
            .env("FERRY_CENTER_TOKEN", "operator-token-0123456789")
            .env("FERRY_SECRET", common::SECRET)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut started = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut started)
        .unwrap();
    assert!(started.contains("ferry center"), "{started:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let line = (limits.lines())
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised: {line}");
}
