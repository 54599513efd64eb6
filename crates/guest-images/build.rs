//! Builds the guest workspace (`guest/`) with a nested `cargo build --release` and
//! generates `$OUT_DIR/images.rs`, which embeds each guest ELF with `include_bytes!`.

use std::env;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The images: binary name in guest/workloads, one-line summary, test_only.
const IMAGES: &[(&str, &str, bool)] = &[
    (
        "hello",
        "prints a greeting and its arguments; --exit-code N sets the exit code",
        false,
    ),
    (
        "memtouch",
        "rewrites a RAM working set at a set rate and prints its checksum (see --help)",
        false,
    ),
    (
        "mlp-train",
        "trains an MLP on a dataset in accelerator memory; prints losses and a weight checksum",
        false,
    ),
    (
        "llm-decode",
        "decodes tokens with a small transformer and a KV cache in accelerator memory",
        false,
    ),
    (
        "llm-chat",
        "answers a prompt with a GGUF language model attached as 'model' (SmolLM2, llama family)",
        false,
    ),
    (
        "llm-serve",
        "serves a GGUF model attached as 'model' to clients of the gateway's OpenAI API",
        false,
    ),
    (
        "fmnist-train",
        "trains an MLP on Fashion-MNIST attached as files; prints loss and test accuracy per epoch",
        false,
    ),
    (
        "calibrate",
        "times the shared compute and memory loops `ferry bench vm` compares with the host",
        true,
    ),
    (
        "faults",
        "faults on purpose: unmapped | null | invalid-opcode | divide-by-zero | panic",
        true,
    ),
    (
        "dirty-pages",
        "dirties pages before and after a flag the host sets; prints their addresses",
        true,
    ),
    (
        "files",
        "reads its attached files through the file port and the device; tries hostile reads",
        true,
    ),
    (
        "channel-abuse",
        "writes garbage over its message channel for ever (tests the host's defences)",
        true,
    ),
];

/// Must match `[build] target` in guest/.cargo/config.toml (it names the output folder).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/guest-images lies two levels below the repository root");
    let guest = root.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("target");

    // Directories are scanned recursively. Not all of guest/: its own target/ (from a
    // developer's `cargo build` in there) would retrigger this build for nothing.
    for path in [
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/.cargo/config.toml",
        "guest/sdk",
        "guest/workloads",
        "crates/abi",
        "crates/llm",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // current_dir makes guest/.cargo/config.toml (target, rustflags) apply.
    cmd.current_dir(&guest)
        .args(["build", "--release", "--bins", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        if inherited_env_breaks_guest_build(&key) {
            cmd.env_remove(&key);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo for the guest build: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stderr}");
        panic!(
            "building the guests in {} failed ({}); its output is above",
            guest.display(),
            output.status
        );
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=guest build: {line}");
    }

    let bin_dir = target_dir.join(GUEST_TARGET).join("release");
    let mut code = String::from("/// Every guest image.\npub static ALL: &[GuestImage] = &[\n");
    for &(name, summary, test_only) in IMAGES {
        let elf = bin_dir.join(name);
        assert!(
            elf.is_file(),
            "guest image {} is missing: is `{name}` a [[bin]] of guest/workloads?",
            elf.display()
        );
        let elf = path_str(&elf);
        writeln!(
            code,
            "    GuestImage {{ name: {name:?}, summary: {summary:?}, \
             elf: include_bytes!({elf:?}), test_only: {test_only} }},"
        )
        .expect("writing to a String");
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("images.rs"), code).expect("cannot write images.rs");
}

/// True for the variables through which the outer build (its flags, wrappers such as
/// clippy-driver, target dir, profile settings, per-package build-script variables)
/// would leak into, and break or pollute, the nested guest build. Registry, network,
/// jobserver and toolchain settings are kept.
fn inherited_env_breaks_guest_build(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
    ];
    if KEEP.iter().any(|k| key.starts_with(k)) {
        return false;
    }
    key.starts_with("CARGO_") || key.starts_with("__CARGO") || DROP.contains(&key)
}

fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8; include_bytes! needs it", path.display()))
}
