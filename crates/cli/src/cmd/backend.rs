//! `--backend cpu|cuda|auto`: the accelerator backend of the VMs a command creates.

use clap::{Args, ValueEnum};
use ferry_accel::backend::{self, BackendChoice};

/// The `--backend` flag.
#[derive(Args, Clone, Copy, Debug)]
pub struct BackendArgs {
    /// Accelerator backend of new VMs: `cpu` (kernels on this host's cores), `cuda`
    /// (on its NVIDIA GPU; an error without one) or `auto` (cuda when a GPU is present,
    /// else cpu; says which). Results are bit-identical between cpu and cuda for every
    /// kernel but MATMUL; a VM migrates only to a host with its backend.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
}

/// A `--backend` value.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The host's CPU cores.
    Cpu,
    /// The host's NVIDIA GPU.
    Cuda,
    /// CUDA if the host has a GPU, else the CPU.
    Auto,
}

/// The `--backend` value that gives backend kind `kind` (for child processes).
pub fn flag(kind: &str) -> &'static str {
    if kind == backend::CPU {
        "cpu"
    } else {
        "cuda"
    }
}

impl BackendArgs {
    /// The backend kind asked for on this host, said on stderr unless it is the default;
    /// an error for `cuda` on a host without a usable GPU.
    pub fn resolve(&self) -> anyhow::Result<&'static str> {
        let choice = match self.backend {
            Backend::Cpu => BackendChoice::Cpu,
            Backend::Cuda => BackendChoice::Cuda,
            Backend::Auto => BackendChoice::Auto,
        };
        let (kind, why) = backend::resolve(choice)?;
        if self.backend != Backend::Cpu {
            eprintln!("ferry: accelerator backend {kind} ({why})");
        }
        Ok(kind)
    }
}
