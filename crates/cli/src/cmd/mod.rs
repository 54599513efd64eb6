//! The subcommands.

pub mod backend;
pub mod bench;
pub mod bench_center;
pub mod bench_evacuate;
pub mod bench_gpu;
pub mod bench_llm;
pub mod bench_migrate;
pub mod bench_serve;
pub mod bench_soak;
pub mod center;
pub mod demo;
pub mod host;
pub mod loopback;
pub mod migrate;
pub mod run;
pub mod shaped_link;
pub mod tls;
pub mod vm;

pub use ferry_vmm::devices::console::last_field;

/// Waits for Ctrl-C or SIGTERM (what a service manager sends to stop a daemon).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
