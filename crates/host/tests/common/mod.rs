//! What the host's integration tests share: a test host's configuration, and its API
//! served on loopback.

#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::sync::Arc;

use ferry_api::{Attachment, CreateVm};
use ferry_host::{AttachPolicy, Host, HostConfig};
use ferry_migrate::Secret;

/// A test host `name` with the cluster `secret`: 1 GiB of VM memory, `accel` bytes of it
/// for accelerators (cpu backend, `accel_threads` each), its file store at `store`, the
/// operators' tokens of `api_tokens`, and no files attached by path.
pub fn config(
    name: &str,
    secret: &[u8],
    store: PathBuf,
    (accel, accel_threads): (u64, usize),
    api_tokens: Option<PathBuf>,
) -> HostConfig {
    HostConfig {
        name: name.into(),
        secret: Secret::new(secret.to_vec()).unwrap(),
        memory_capacity: 1 << 30,
        accel_capacity: accel,
        accel_threads,
        guest_nice: 0,
        tls: None,
        file_store: store,
        api_tokens,
        backend: ferry_accel::backend::CPU,
        attach: AttachPolicy::Under(Vec::new()),
    }
}

/// `host`'s API, served on a loopback port until the returned runtime and handle drop;
/// and its URL.
pub fn serve_api(host: &Arc<Host>) -> (tokio::runtime::Runtime, ferry_http::Serving, String) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = ferry_host::api::router(host.clone(), "127.0.0.1:1".into()).unwrap();
    let serving = ferry_http::spawn(runtime.handle(), listener, router, None, "host API");
    (runtime, serving, url)
}

/// A memtouch VM of 32 MiB that runs for minutes (4 MiB rewritten a million times), with
/// the files of `attach`.
pub fn long_memtouch(attach: Vec<Attachment>) -> CreateVm {
    CreateVm {
        name: None,
        workload: "memtouch".into(),
        args: ["--mib", "4", "--passes", "1000000"]
            .map(String::from)
            .to_vec(),
        memory: 32 << 20,
        accel_memory: 0,
        attach,
        backend: None,
        idempotency_key: None,
    }
}
