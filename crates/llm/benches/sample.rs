//! The sampler's draws over a vocabulary the size of SmolLM2's (49,152), one thread: the
//! guest makes one per sequence per step while the device waits, so a draw's time adds
//! to every inter-token latency of a batch.
//!
//! `cargo bench -p ferry-llm --bench sample [-- VOCAB]`

use std::time::Instant;

use ferry_llm::{DrawScratch, Sampler, SamplerConfig};

/// Draws timed per configuration.
const DRAWS: u32 = 300;

fn main() {
    let vocab = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(49_152usize)
        .max(1);
    // Logits spread over about 20 units with a few standing out, as a model's are.
    let mut x = 12_345u64;
    let mut logits: Vec<f32> = (0..vocab)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            (u * 20.0 - 5.0) as f32 + if x >> 60 == 0 { 5.0 } else { 0.0 }
        })
        .collect();
    println!("vocabulary {vocab}, {DRAWS} draws each, one thread");
    println!(
        "{:>11} {:>5} {:>5} {:>9}",
        "temperature", "top_k", "top_p", "ms/draw"
    );
    for (temperature, top_k, top_p) in [(0.8, 0, 1.0), (0.8, 0, 0.95), (0.8, 40, 0.95)] {
        let config = SamplerConfig {
            temperature,
            top_k,
            top_p,
            seed: 7,
        };
        let mut sampler = Sampler::new(config).expect("a valid configuration");
        let mut scratch = DrawScratch::default();
        let mut picked = 0u64;
        let start = Instant::now();
        for i in 0..DRAWS as usize {
            // A new step's logits differ a little from the last's.
            logits[i % vocab] += 0.001;
            picked += u64::from(sampler.sample(&logits, &mut scratch));
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(DRAWS);
        println!("{temperature:>11} {top_k:>5} {top_p:>5} {ms:>9.3}");
        std::hint::black_box(picked);
    }
}
