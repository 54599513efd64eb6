//! QMATMUL's dot products per block format, one thread: the AVX2 code against the
//! portable code (the same bits; the tests check that), the AVX-512 code (two rows at a
//! time for Q4_0, Q4_1 and Q8_0; the AVX2 code for the others) where the CPU has it,
//! and the fastest code taking four inputs per weight row (GMAC/s of all four; where a
//! format unpacks a row once for them).
//!
//! `cargo bench -p ferry-accel --bench qdot [-- ROWS COLS]` (default 1536 1536; COLS is
//! rounded up to whole blocks of 256, which every format takes).

use ferry_accel::backend::cpu::{bench_qdot, has_avx512, QdotCode};
use ferry_accel::kernel::DType;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = match args[..] {
        [rows, cols, ..] => (rows.max(1), cols.max(1).div_ceil(256) * 256),
        _ => (1536, 1536),
    };
    println!("rows {rows}, cols {cols}, one thread");
    let avx512 = has_avx512();
    if !avx512 {
        println!("no AVX-512 here: its column is the AVX2 code again");
    }
    println!(
        "{:>6} {:>16} {:>16} {:>7} {:>16} {:>14}",
        "format", "portable GMAC/s", "AVX2 GMAC/s", "ratio", "AVX-512 GMAC/s", "x4 GMAC/s"
    );
    for dtype in DType::ALL {
        let portable = bench_qdot(dtype, rows, cols, QdotCode::Portable);
        let avx2 = bench_qdot(dtype, rows, cols, QdotCode::Avx2);
        let wide = bench_qdot(dtype, rows, cols, QdotCode::Avx512);
        let grouped = bench_qdot(dtype, rows, cols, QdotCode::Grouped);
        println!(
            "{:>6} {portable:>16.2} {avx2:>16.2} {:>7.2} {wide:>16.2} {grouped:>14.2}",
            dtype.name(),
            avx2 / portable
        );
    }
}
