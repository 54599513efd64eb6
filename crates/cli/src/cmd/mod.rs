//! The subcommands.

pub mod bench;
pub mod bench_evacuate;
pub mod bench_migrate;
pub mod center;
pub mod demo;
pub mod host;
pub mod migrate;
pub mod run;
pub mod vm;
