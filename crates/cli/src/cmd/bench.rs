//! `ferry bench`: measurements that print figures.

use clap::Args;

/// `ferry bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// What to measure: `vm` (guest speed, start-up, pause latency, snapshot throughput).
    pub what: String,
    /// Print one JSON object per figure instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs a benchmark.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("unknown benchmark '{}' (available: vm)", args.what)
}
