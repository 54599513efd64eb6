//! Greedy decoding with a small transformer on the virtual accelerator: the weights are
//! filled once on the device and then only read; the KV cache grows in accelerator memory
//! by one position per token (the common inference case for live migration).
//!
//! Nothing depends on the clock: the same arguments give the same token sequence and the
//! same checksum, migrated or not.
#![no_std]
#![no_main]

use ferry_sdk::accel::{Accel, AccelError, Distribution, Tensor, Transpose};
use ferry_sdk::checksum::Fnv1a;
use ferry_sdk::clock::now_ns;
use ferry_sdk::math::{mib, mix, sqrt, stream};
use ferry_sdk::prelude::*;

ferry_sdk::entry!(main);

const HELP: &str = "\
llm-decode: greedy decoding with a small transformer held in accelerator memory.
  --seed N         seed of the weights and of the first token (default 1)
  --weights-mib N  size of the weights in MiB (default 16): the model width grows from
                   256 (with 16 layers or more at each width) and the layers fill the rest
  --tokens N       tokens to generate; also the KV cache length (default 64)
  --heads N        attention heads (default 4)
  --print-every N  print progress every N tokens (default 16)
Prints `token=<n> id=<id> tokens/s=<value>` every N tokens, then `tokens=<n>`,
`tokens/s=<value>` and `checksum=<16 hex digits>` (FNV-1a of the generated ids), which
depends only on the arguments. Needs an accelerator (ferry run --accel-memory ...).";

/// Vocabulary size.
const VOCAB: usize = 1024;
/// Layer-norm epsilon.
const EPS: f32 = 1e-5;

fn main(args: Args) -> i32 {
    ferry_sdk::workload::main(&args, "llm-decode", HELP, Config::parse, decode)
}

struct Config {
    seed: u64,
    tokens: usize,
    heads: usize,
    print_every: usize,
    /// Model width.
    dim: usize,
    /// Transformer blocks.
    layers: usize,
}

/// Bytes of the weights that do not depend on the depth: token embedding and output
/// projection (`VOCAB × dim` each), final layer norm.
fn fixed_bytes(dim: u64) -> u64 {
    (2 * VOCAB as u64 * dim + 2 * dim) * 4
}

/// Bytes of one block: q, k, v, o (`dim × dim`), the MLP (`dim × 4dim`, `4dim × dim`),
/// two layer norms.
fn layer_bytes(dim: u64) -> u64 {
    (12 * dim * dim + 4 * dim) * 4
}

impl Config {
    fn parse(args: &Args) -> Result<Config, ArgError> {
        args.check(
            &["seed", "weights-mib", "tokens", "heads", "print-every"],
            &[],
        )?;
        let seed = args.parse_or("seed", 1)?;
        let weights_mib: u64 = args.parse_or("weights-mib", 16)?;
        let tokens: usize = args.parse_or("tokens", 64)?;
        let heads: usize = args.parse_or("heads", 4)?;
        let print_every: usize = args.parse_or("print-every", 16)?;
        if tokens == 0 || tokens > 1 << 20 {
            return Err(ArgError::new("--tokens: must be 1 to 1048576"));
        }
        if print_every == 0 {
            return Err(ArgError::new("--print-every: must be at least 1"));
        }
        let budget = weights_mib
            .checked_mul(1 << 20)
            .filter(|&b| b <= 1 << 40)
            .ok_or_else(|| ArgError::new("--weights-mib: too large"))?;
        // The widest model (up to 4096) that still has 16 blocks; at least width 256.
        let layers_at = |dim: u64| budget.saturating_sub(fixed_bytes(dim)) / layer_bytes(dim);
        let mut dim = 256u64;
        while dim < 4096 && layers_at(dim * 2) >= 16 {
            dim *= 2;
        }
        let layers = layers_at(dim) as usize;
        if layers == 0 {
            let least = (fixed_bytes(256) + layer_bytes(256)).div_ceil(1 << 20);
            return Err(ArgError::new(format!(
                "--weights-mib: at least {least} (one block of width 256)"
            )));
        }
        if heads == 0 || dim as usize % heads != 0 {
            return Err(ArgError::new(format!(
                "--heads: must divide the model width {dim}"
            )));
        }
        Ok(Config {
            seed,
            tokens,
            heads,
            print_every,
            dim: dim as usize,
            layers,
        })
    }
}

/// The read-only weights of one transformer block.
struct Block {
    ln1_gamma: Tensor,
    ln1_beta: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ln2_gamma: Tensor,
    ln2_beta: Tensor,
    w1: Tensor,
    w2: Tensor,
    /// `[positions × dim]` (heads × head_dim per position).
    k_cache: Tensor,
    v_cache: Tensor,
}

/// Hands out RNG streams for the weights, one per tensor, and fills them.
struct Init {
    seed: u64,
    next: u64,
}

impl Init {
    /// A `rows × cols` tensor of normal values with standard deviation `std`.
    fn normal(
        &mut self,
        acc: &mut Accel,
        rows: usize,
        cols: usize,
        std: f64,
    ) -> Result<Tensor, AccelError> {
        let mut t = acc.alloc(rows, cols)?;
        self.next += 1;
        let stream = stream(self.seed, self.next);
        acc.rng_fill(&mut t, stream, 0, Distribution::Normal(std as f32));
        Ok(t)
    }
}

fn decode(c: &Config) -> Result<(), AccelError> {
    let mut acc = Accel::open()?;
    let (d, ffn, positions) = (c.dim, 4 * c.dim, c.tokens);
    println!(
        "llm-decode: seed={} dim={d} heads={} layers={} vocab={VOCAB} tokens={}",
        c.seed, c.heads, c.layers, c.tokens
    );

    // Weights: random normal (std 1/sqrt(fan_in) for projections), layer-norm gains 1
    // (copied from one uploaded row of ones), biases 0 (buffers are zero-filled).
    let mut init = Init {
        seed: c.seed,
        next: 0,
    };
    let scale_d = 1.0 / sqrt(d as f64);
    let tok_emb = init.normal(&mut acc, VOCAB, d, 1.0)?;
    let pos_emb = init.normal(&mut acc, positions, d, 0.5)?;
    let w_out = init.normal(&mut acc, d, VOCAB, scale_d)?;
    let mut ones = acc.alloc::<f32>(1, d)?;
    acc.upload(&mut ones, &vec![1.0f32; d])?;
    let gain = |acc: &mut Accel| -> Result<Tensor, AccelError> {
        let mut g = acc.alloc(1, d)?;
        acc.copy(&ones, 0, &mut g, 0, d);
        Ok(g)
    };
    let lnf_gamma = gain(&mut acc)?;
    let lnf_beta = acc.alloc::<f32>(1, d)?;
    let mut blocks = Vec::with_capacity(c.layers);
    let mut cache_bytes = 0;
    for _ in 0..c.layers {
        let block = Block {
            ln1_gamma: gain(&mut acc)?,
            ln1_beta: acc.alloc(1, d)?,
            wq: init.normal(&mut acc, d, d, scale_d)?,
            wk: init.normal(&mut acc, d, d, scale_d)?,
            wv: init.normal(&mut acc, d, d, scale_d)?,
            wo: init.normal(&mut acc, d, d, scale_d)?,
            ln2_gamma: gain(&mut acc)?,
            ln2_beta: acc.alloc(1, d)?,
            w1: init.normal(&mut acc, d, ffn, scale_d)?,
            w2: init.normal(&mut acc, ffn, d, 1.0 / sqrt(ffn as f64))?,
            k_cache: acc.alloc(positions, d)?,
            v_cache: acc.alloc(positions, d)?,
        };
        cache_bytes += block.k_cache.bytes() + block.v_cache.bytes();
        blocks.push(block);
    }
    let weight_bytes = acc.allocated() - cache_bytes;

    // Activations of one token, reused by every block.
    let mut tok = acc.alloc::<u32>(1, 1)?;
    let mut pos_ids = acc.alloc::<u32>(1, positions)?;
    let mut pos_id = acc.alloc::<u32>(1, 1)?;
    let [mut x, mut x_next, mut e_tok, mut e_pos, mut ln, mut q, mut k, mut v, mut att, mut proj] =
        rows(&mut acc, d)?;
    let [mut hidden, mut act] = rows(&mut acc, ffn)?;
    let [mut logits] = rows(&mut acc, VOCAB)?;
    println!(
        "llm-decode: accelerator memory {:.1} MiB (weights {:.1} MiB, KV cache {:.1} MiB) \
         of {:.1} MiB",
        mib(acc.allocated()),
        mib(weight_bytes),
        mib(cache_bytes),
        mib(acc.capacity()),
    );

    // The first token comes from the seed; the position ids 0.. are uploaded once.
    let first = (mix(c.seed) % VOCAB as u64) as u32;
    acc.upload(&mut tok, &[first])?;
    let ids: Vec<u32> = (0..positions as u32).collect();
    acc.upload(&mut pos_ids, &ids)?;
    println!("llm-decode: first token id={first}");

    let mut hash = Fnv1a::new();
    let start = now_ns();
    let mut last_print = (0usize, start);
    let mut next = [0u32];
    for p in 0..c.tokens {
        // x = token embedding + position embedding. `tok` holds the previous argmax.
        acc.copy(&pos_ids, p, &mut pos_id, 0, 1);
        acc.embedding(&tok_emb, &tok, &mut e_tok);
        acc.embedding(&pos_emb, &pos_id, &mut e_pos);
        acc.add(&e_tok, &e_pos, &mut x);
        for b in &mut blocks {
            // Attention: project, append k and v at position p, attend over 0..=p.
            acc.layer_norm(&x, &b.ln1_gamma, &b.ln1_beta, &mut ln, EPS);
            acc.matmul(&ln, &b.wq, &mut q, Transpose::None);
            acc.matmul(&ln, &b.wk, &mut k, Transpose::None);
            acc.matmul(&ln, &b.wv, &mut v, Transpose::None);
            acc.copy(&k, 0, &mut b.k_cache, p * d, d);
            acc.copy(&v, 0, &mut b.v_cache, p * d, d);
            acc.attention_decode(&q, &b.k_cache, &b.v_cache, &mut att, c.heads, p + 1);
            acc.matmul(&att, &b.wo, &mut proj, Transpose::None);
            acc.add(&x, &proj, &mut x_next);
            core::mem::swap(&mut x, &mut x_next);
            // MLP.
            acc.layer_norm(&x, &b.ln2_gamma, &b.ln2_beta, &mut ln, EPS);
            acc.matmul(&ln, &b.w1, &mut hidden, Transpose::None);
            acc.gelu(&hidden, &mut act);
            acc.matmul(&act, &b.w2, &mut proj, Transpose::None);
            acc.add(&x, &proj, &mut x_next);
            core::mem::swap(&mut x, &mut x_next);
        }
        acc.layer_norm(&x, &lnf_gamma, &lnf_beta, &mut ln, EPS);
        acc.matmul(&ln, &w_out, &mut logits, Transpose::None);
        acc.argmax(&logits, &mut tok);
        acc.download(&tok, &mut next)?;
        hash.write(&next[0].to_le_bytes());

        let n = p + 1;
        if n % c.print_every == 0 || n == c.tokens {
            let now = now_ns();
            let rate = rate(n - last_print.0, now - last_print.1);
            println!("token={n} id={} tokens/s={rate:.1}", next[0]);
            last_print = (n, now);
        }
    }
    println!("tokens={}", c.tokens);
    println!("tokens/s={:.1}", rate(c.tokens, now_ns() - start));
    println!("checksum={:016x}", hash.value());
    Ok(())
}

/// `N` new rows of `width` floats: one token's activations.
fn rows<const N: usize>(acc: &mut Accel, width: usize) -> Result<[Tensor; N], AccelError> {
    let mut all = Vec::with_capacity(N);
    for _ in 0..N {
        all.push(acc.alloc(1, width)?);
    }
    Ok(all
        .try_into()
        .unwrap_or_else(|_| unreachable!("exactly N rows")))
}

/// Tokens per second.
fn rate(tokens: usize, ns: u64) -> f64 {
    tokens as f64 * 1e9 / ns.max(1) as f64
}
