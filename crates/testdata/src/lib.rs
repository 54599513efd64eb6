//! Where tests find what they need beyond Rust (KVM, Chromium, the real model and dataset
//! fetched from the package registries, never committed), and how they skip when it is
//! absent: loudly, on stderr past the test harness's capture, and not at all where CI
//! requires it (`FERRY_REQUIRE_KVM=1`, `FERRY_REQUIRE_CHROMIUM=1`,
//! `FERRY_REQUIRE_MODEL=1`, `FERRY_REQUIRE_DATASET=1`, `FERRY_REQUIRE_NVRTC=1`,
//! `FERRY_REQUIRE_GPU=1`: the test fails instead); and local addresses that refuse or
//! drop connections, for tests of what a client does then.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// File name of the model `scripts/fetch-model` fetches.
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where Debian's `dataset-fashion-mnist` installs Fashion-MNIST.
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testdata lies two levels below the root")
        .to_path_buf()
}

/// Makes a FIFO at `path` (mode 0600): what a test names where a regular file is wanted,
/// since opening it to read waits for a writer.
pub fn make_fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .unwrap_or_else(|_| panic!("{} holds a NUL", path.display()));
    // SAFETY: `c_path` is a NUL-terminated path; mkfifo reads only it.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        panic!(
            "cannot make a FIFO at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// A directory of this test process for `label`'s files, under the system's temporary
/// directory (created if missing; tests running at once may share it, so each names its
/// own files). It is removed when the process exits, unless `FERRY_KEEP_SCRATCH=1`: a
/// center test alone leaves 15 MB of databases.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let mut made = SCRATCH_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
    if made.is_empty() && std::env::var("FERRY_KEEP_SCRATCH").map_or(true, |v| v != "1") {
        // SAFETY: registers a plain function, which takes no argument.
        unsafe { libc::atexit(remove_scratch_dirs) };
    }
    if !made.contains(&dir) {
        made.push(dir.clone());
    }
    dir
}

/// The directories [`scratch_dir`] made in this process.
static SCRATCH_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the directories [`scratch_dir`] made, as the process exits (the test harness
/// returns from `main`, or calls `exit` when a test failed).
extern "C" fn remove_scratch_dirs() {
    // A thread still making one holds the lock: those are left rather than waited for.
    let Ok(made) = SCRATCH_DIRS.try_lock() else {
        return;
    };
    for dir in made.iter() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Reads one HTTP/1.1 request from `reader`: its body (of its `content-length`), once its
/// head and body are read whole; `None` when the connection ends (or fails) first. For the
/// tests' small stand-in servers.
pub fn read_http_request(reader: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

/// A local address where nothing listens, so a connection is refused: port 1 of a
/// loopback address of its own (127.255.X.Y, another on each call), where no test binds.
/// (A port of 127.0.0.1 let go of could be taken meanwhile by a test running beside.)
pub fn refusing_addr() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let [x, y] = NEXT
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_be_bytes();
    std::net::SocketAddr::from(([127, 255, x, y], 1))
}

/// A local address whose listener takes `n` connections and drops each unanswered (a
/// peer that goes away mid-request).
pub fn dropping_addr(n: usize) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free local port");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            drop(stream);
        }
    });
    addr
}

/// Reports that `test` does not run because of `why`: fails it when `require_var` is set
/// to 1, else writes a loud SKIPPED line straight to stderr.
fn missing(test: &str, why: &str, require_var: &str) {
    if std::env::var(require_var).is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, and {require_var}=1 requires it");
    }
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// Reports loudly that `test` cannot run on this machine because of `why` (its CPU, its
/// kernel's limits, root): straight to stderr, which the test harness does not capture
/// as it captures `eprintln!`, so a passing test's skip is seen.
pub fn cannot_run_here(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// Returns from the enclosing test (a function returning `()`) when KVM is not usable
/// here, after `check` (default [`kvm`]) reported it under the test's own name.
#[macro_export]
macro_rules! require_kvm {
    () => {
        $crate::require_kvm!($crate::kvm)
    };
    ($check:path) => {{
        fn here() {}
        if !$check($crate::function_name(::std::any::type_name_of_val(&here))) {
            return;
        }
    }};
}

/// The name of the function whose nested `here` has the type name `here_path`
/// (`crate::module::function::here`), for [`require_kvm!`].
pub fn function_name(here_path: &'static str) -> &'static str {
    let function = here_path.strip_suffix("::here").unwrap_or(here_path);
    function.rsplit("::").next().unwrap_or(function)
}

/// `true` if KVM is usable here; otherwise reports that `test` does not run (a failure
/// under `FERRY_REQUIRE_KVM=1`) and returns `false`.
pub fn kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            missing(
                test,
                &format!("KVM is not usable here (/dev/kvm: {e})"),
                "FERRY_REQUIRE_KVM",
            );
            false
        }
    }
}

/// Reports that a browser test cannot run because `why` (no Chromium): a failure under
/// `FERRY_REQUIRE_CHROMIUM=1`.
pub fn missing_chromium(test: &str, why: &str) {
    missing(test, why, "FERRY_REQUIRE_CHROMIUM");
}

/// Reports that a test cannot compile the CUDA kernels because `why` (no NVRTC): a
/// failure under `FERRY_REQUIRE_NVRTC=1`.
pub fn missing_nvrtc(test: &str, why: &str) {
    missing(test, why, "FERRY_REQUIRE_NVRTC");
}

/// Reports that a test cannot run on a GPU because `why`: a failure under
/// `FERRY_REQUIRE_GPU=1` (which `scripts/gpu-check.sh` sets; CI has no GPU).
pub fn missing_gpu(test: &str, why: &str) {
    missing(test, why, "FERRY_REQUIRE_GPU");
}

/// Reports that a model test cannot run because a tool it checks against is missing
/// (python3 with numpy for the reference): as a missing model.
pub fn missing_tool(test: &str, why: &str) {
    missing(test, why, "FERRY_REQUIRE_MODEL");
}

/// The `etcd` server binary (`$FERRY_ETCD`, else on the PATH; Debian's `etcd-server`);
/// `None` (after saying so, a failure under `FERRY_REQUIRE_ETCD=1`) when absent.
pub fn etcd(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_ETCD") {
        return Some(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(
            test,
            "etcd is not installed (sudo apt install etcd-server)",
            "FERRY_REQUIRE_ETCD",
        );
    }
    found
}

/// The size of [`SMOLLM2`] as scripts/fetch-model checks it (with its SHA-256).
const SMOLLM2_BYTES: u64 = 98_362_432;

/// SmolLM2-135M-Instruct Q4_1: `$FERRY_MODEL`, else `models/` of the repository; `None`
/// (after saying so) when absent. A file of another size (a download cut short, another
/// model) fails the test with a message: the tests check this model's answers.
pub fn smollm2(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("FERRY_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models").join(SMOLLM2));
    if let Some(meta) = std::fs::metadata(&path).ok().filter(|m| m.is_file()) {
        assert_eq!(
            meta.len(),
            SMOLLM2_BYTES,
            "{}: not {SMOLLM2} ({SMOLLM2_BYTES} bytes); run scripts/fetch-model",
            path.display()
        );
        return Some(path);
    }
    missing(
        test,
        &format!(
            "no model file at {} (run scripts/fetch-model)",
            path.display()
        ),
        "FERRY_REQUIRE_MODEL",
    );
    None
}

/// Fashion-MNIST's folder (`$FERRY_DATASET`, else Debian's); `None` (after saying so)
/// when absent.
pub fn fashion_mnist(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("FERRY_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FASHION_MNIST));
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        return Some(dir);
    }
    missing(
        test,
        &format!(
            "no Fashion-MNIST at {} (apt install dataset-fashion-mnist)",
            dir.display()
        ),
        "FERRY_REQUIRE_DATASET",
    );
    None
}

/// The folders a test's host daemons may attach files from (`--attach-dir`): the
/// model's and the dataset's, those that exist.
pub fn attach_dirs() -> Vec<PathBuf> {
    let model = std::env::var_os("FERRY_MODEL")
        .map(PathBuf::from)
        .and_then(|m| m.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| repo_root().join("models"));
    let dataset = std::env::var_os("FERRY_DATASET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FASHION_MNIST));
    [model, dataset]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect()
}

/// The four Fashion-MNIST files as the `fmnist-train` guest names them.
pub fn fashion_mnist_files(dir: &Path) -> Vec<(String, PathBuf)> {
    [
        ("train-images", "train-images-idx3-ubyte.gz"),
        ("train-labels", "train-labels-idx1-ubyte.gz"),
        ("test-images", "t10k-images-idx3-ubyte.gz"),
        ("test-labels", "t10k-labels-idx1-ubyte.gz"),
    ]
    .into_iter()
    .map(|(name, file)| (name.to_string(), dir.join(file)))
    .collect()
}

/// Lets this process open as many files as its hard limit allows; returns that number.
pub fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit pointer only read or write it.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    static ASKED_FOR: Mutex<Option<String>> = Mutex::new(None);

    fn no_kvm(test: &str) -> bool {
        *ASKED_FOR.lock().unwrap() = Some(test.to_string());
        false
    }

    fn a_test_on_a_host_without_kvm() {
        require_kvm!(no_kvm);
        panic!("ran on without KVM");
    }

    /// Run as a child by the test below (with `FERRY_SCRATCH_CHILD` set): makes a scratch
    /// directory with a file in it and prints its path.
    #[test]
    fn scratch_child() {
        if std::env::var_os("FERRY_SCRATCH_CHILD").is_none() {
            return;
        }
        let dir = super::scratch_dir("scratch-child");
        std::fs::write(dir.join("f"), b"x").unwrap();
        println!("SCRATCH={}", dir.display());
    }

    #[test]
    fn scratch_dirs_are_removed_when_the_process_exits() {
        let run = |keep: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "tests::scratch_child", "--nocapture"])
                .env("FERRY_SCRATCH_CHILD", "1")
                .env("FERRY_KEEP_SCRATCH", keep)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let out = String::from_utf8(out.stdout).unwrap();
            let dir = out
                .lines()
                .find_map(|l| l.strip_prefix("SCRATCH="))
                .unwrap_or_else(|| panic!("the child printed no directory: {out}"));
            std::path::PathBuf::from(dir)
        };
        let dir = run("0");
        assert!(!dir.exists(), "{} is left", dir.display());
        // Kept on request, to look into after a failure.
        let dir = run("1");
        assert!(dir.join("f").exists(), "{} was removed", dir.display());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn require_kvm_names_the_test_and_returns_from_it() {
        a_test_on_a_host_without_kvm();
        assert_eq!(
            ASKED_FOR.lock().unwrap().as_deref(),
            Some("a_test_on_a_host_without_kvm")
        );
    }
}
