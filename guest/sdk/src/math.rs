//! Small numeric helpers the workloads share (`core` has no `sqrt`, and seeds must be
//! derived the same way in every workload run for results to be reproducible).

/// The splitmix64 finaliser: a well-mixed 64-bit value from any input.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The RNG seed of stream `tag` (dataset, teacher, a layer's weights) under `seed`.
pub fn stream(seed: u64, tag: u64) -> u64 {
    mix(seed ^ mix(tag.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Square root by Newton's method; exact enough for initialisation scales.
pub fn sqrt(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut r = if x > 1.0 { x } else { 1.0 };
    for _ in 0..80 {
        r = 0.5 * (r + x / r);
    }
    r
}

/// Bytes as MiB, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
