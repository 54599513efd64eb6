//! MATMUL throughput: the cpu backend (fixed tiles, deterministic) against calling the
//! GEMM crate directly with the same thread count.
//!
//! `cargo bench -p ferry-accel --bench gemm [-- SIZE...]` (default sizes 512 1024 2048).

use ferry_accel::backend::cpu::bench_gemm;

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![512, 1024, 2048];
    }
    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    println!(
        "{:>6} {:>8} {:>16} {:>16} {:>7}",
        "n", "threads", "backend GFLOP/s", "direct GFLOP/s", "ratio"
    );
    for &n in &sizes {
        for &t in &threads {
            let (backend, direct) = bench_gemm(n, t);
            println!(
                "{n:>6} {t:>8} {backend:>16.1} {direct:>16.1} {:>7.3}",
                backend / direct
            );
        }
    }
}
