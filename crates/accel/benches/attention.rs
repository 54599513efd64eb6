//! ATTENTION of one decoded token, in million (position, head) pairs a second, at
//! SmolLM2-135M's shape (9 query heads over 3 KV heads of 64) and several context lengths:
//! one head at a time on one thread with the caches warm, the AVX2 code against the
//! portable code (the same bits; the tests check that); then the whole kernel on the
//! machine's cores over 30 layers' caches, gone from the cores' caches as they are
//! between two tokens.
//!
//! `cargo bench -p ferry-accel --bench attention [-- LEN...]` (default 64 256 1024).

use ferry_accel::backend::cpu::{bench_attention, bench_attention_cold};

fn main() {
    let mut lens: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .filter(|&n| n > 0)
        .collect();
    if lens.is_empty() {
        lens = vec![64, 256, 1024];
    }
    let shape = (9, 3, 64);
    println!("9 heads over 3 KV heads of 64, one query row, one thread");
    println!(
        "{:>6} {:>18} {:>18} {:>7}",
        "len", "portable M/s", "AVX2 M/s", "ratio"
    );
    for &len in &lens {
        let portable = bench_attention(shape, len, false);
        let avx2 = bench_attention(shape, len, true);
        println!(
            "{len:>6} {portable:>18.2} {avx2:>18.2} {:>7.2}",
            avx2 / portable
        );
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nthe whole kernel on {threads} threads, 30 layers' caches in turn (cold in the cores' caches)");
    println!("{:>6} {:>18}", "len", "M/s");
    for &len in &lens {
        let decode = bench_attention_cold(shape, len, threads, 30);
        println!("{len:>6} {decode:>18.2}");
    }
}
