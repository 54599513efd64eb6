//! `ferry bench gpu`: the cuda backend at device level, no VM (so it runs on a GPU host
//! without KVM): every kernel against the cpu backend, MATMUL's speed against cuBLAS
//! called directly, and a migration's chunk reads while kernels keep the GPU busy (long
//! ones, and a flood of small ones) against the same reads on an idle GPU and one plain
//! copy of the buffer; and where a decode step's time goes (one llm-decode layer's kernels
//! against the cpu backend, and a launch's own cost).
//!
//! With `FERRY_CUDA_EMULATOR=1` it runs on the emulated kernels (small sizes, no cuBLAS):
//! that checks the benchmark, not a GPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::ensure;
use ferry_accel::backend::{self, Backend, BufferReader, DeviceMemory};
use ferry_accel::dirty::CHUNK_SIZE;
use ferry_accel::kernel::{DType, Kernel, MatmulFlags, RopeStyle};

use crate::cmd::bench::{figure, Emit};

/// The cuda backend of this host, or the reason there is none.
fn cuda_backend() -> anyhow::Result<Box<dyn Backend>> {
    Ok(backend::create("cuda", 1, &DeviceMemory::default())?)
}

/// Fills buffer `id` (`n` f32) with uniform values.
fn fill(b: &mut dyn Backend, id: u32, n: usize, seed: u64) -> anyhow::Result<()> {
    Ok(b.launch(&backend::uniform_fill(id, n, seed))?)
}

/// Waits for everything launched that writes buffer `id` (a read waits for its writer).
fn sync(b: &dyn Backend, id: u32) {
    let mut word = [0u8; 4];
    b.read(id, 0, &mut word);
}

/// `n×n×n` MATMUL through the backend, GFLOP/s (best of several runs after one warm-up).
fn matmul_gflops(b: &mut dyn Backend, n: usize) -> anyhow::Result<f64> {
    let bytes = (n * n * 4) as u64;
    for id in 1..=3 {
        b.alloc(id, bytes)?;
    }
    fill(b, 1, n * n, 1)?;
    fill(b, 2, n * n, 2)?;
    let kernel = backend::square_matmul(n);
    let mut best = f64::MAX;
    for _ in 0..4 {
        let started = Instant::now();
        b.launch(&kernel)?;
        sync(b, 3);
        best = best.min(started.elapsed().as_secs_f64());
    }
    for id in 1..=3 {
        b.free(id);
    }
    Ok(2.0 * (n as f64).powi(3) / best.max(1e-9) / 1e9)
}

/// Reads every chunk of buffer `id` (`bytes` long) through the backend's reader, as a
/// migration's data streams do; bytes/s.
/// Stops after [`READS_WITHIN`] (on the H200, copies behind a flood of kernels crawled at
/// 5 MiB/s): the figure is the rate over what was read.
fn read_chunks(reader: &dyn BufferReader, id: u32, bytes: u64) -> anyhow::Result<f64> {
    let mut out = Vec::with_capacity(CHUNK_SIZE as usize);
    let started = Instant::now();
    let mut start = 0;
    while start < bytes && started.elapsed() < READS_WITHIN {
        let end = (start + CHUNK_SIZE).min(bytes);
        let size = reader.read_range(id, start..end, &mut out);
        ensure!(size == Some(bytes), "chunk at {start} not read");
        start = end;
    }
    Ok(start as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Longest a pass of chunk reads runs.
const READS_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Microseconds per launch of `kernel` on `b`, launched `reps` times back to back (as a
/// guest's decode step launches them) then waited for once; its buffers `1..` hold
/// `sizes` f32 each (made, filled, and freed here).
fn micros_per_launch(
    b: &mut dyn Backend,
    kernel: &Kernel,
    sizes: &[usize],
    reps: usize,
) -> anyhow::Result<f64> {
    let ids = 1..=sizes.len() as u32;
    for (id, &n) in ids.clone().zip(sizes) {
        b.alloc(id, (n * 4) as u64)?;
        fill(b, id, n, u64::from(id))?;
    }
    let last = sizes.len() as u32;
    b.launch(kernel)?;
    sync(b, last);
    let started = Instant::now();
    for _ in 0..reps {
        b.launch(kernel)?;
    }
    sync(b, last);
    let micros = started.elapsed().as_secs_f64() * 1e6 / reps as f64;
    for id in ids {
        b.free(id);
    }
    Ok(micros)
}

/// A kernel profiled: its name, itself, the f32 counts of its buffers, and how often a
/// pass runs it.
type Profiled = (&'static str, Kernel, Vec<usize>, usize);

/// A layer's two residual ADDs of width `d`.
fn residual_add(d: usize) -> Profiled {
    let add = Kernel::Add {
        a: 1,
        b: 2,
        out: 3,
        n: d,
    };
    ("add", add, vec![d, d, d], 2)
}

/// The kernels of one llm-decode layer at model width `d` (heads of 64, `len` positions
/// cached), each with the f32 counts of its buffers and how often a layer runs it.
fn decode_layer(d: usize, len: usize) -> Vec<Profiled> {
    let matmul = |n: usize, k: usize| Kernel::Matmul {
        a: 1,
        b: 2,
        c: 3,
        m: 1,
        n,
        k,
        flags: MatmulFlags::default(),
    };
    let heads = d / 64;
    vec![
        ("matmul_d_d", matmul(d, d), vec![d, d * d, d], 4),
        (
            "matmul_d_4d",
            matmul(4 * d, d),
            vec![d, 4 * d * d, 4 * d],
            1,
        ),
        (
            "matmul_4d_d",
            matmul(d, 4 * d),
            vec![4 * d, 4 * d * d, d],
            1,
        ),
        (
            "gelu",
            Kernel::Gelu {
                x: 1,
                out: 2,
                n: 4 * d,
            },
            vec![4 * d, 4 * d],
            1,
        ),
        (
            "attention_decode",
            Kernel::AttentionDecode {
                q: 1,
                k_cache: 2,
                v_cache: 3,
                out: 4,
                heads,
                head_dim: 64,
                len,
            },
            vec![d, len * d, len * d, d],
            1,
        ),
        (
            "layer_norm",
            Kernel::LayerNorm {
                x: 1,
                gamma: 2,
                beta: 3,
                out: 4,
                rows: 1,
                cols: d,
                eps: 1e-5,
            },
            vec![d, d, d, d],
            2,
        ),
        residual_add(d),
    ]
}

/// The kernels of one SmolLM2-135M layer's decode step at position `pos` (width 576, 9
/// query and 3 KV heads of 64, feed-forward 1536, Q4_1 weights), as [`decode_layer`]'s.
fn llama_layer(pos: usize) -> Vec<Profiled> {
    let (d, heads, kv_heads, hd, ff) = (576, 9, 3, 64, 1536);
    let q4 = |name, n, k, times| qmatmul(name, DType::Q4_1, n, k, times);
    let cache = (pos + 1) * kv_heads * hd;
    vec![
        (
            "rms_norm",
            Kernel::RmsNorm {
                x: 1,
                weight: 2,
                out: 3,
                rows: 1,
                cols: d,
                eps: 1e-5,
            },
            vec![d, d, d],
            2,
        ),
        q4("qmatmul_q_o", d, d, 2),
        q4("qmatmul_k_v", kv_heads * hd, d, 2),
        q4("qmatmul_gate_up", ff, d, 2),
        q4("qmatmul_down", d, ff, 1),
        (
            "rope",
            // x last: the timing waits for the last buffer's writer.
            Kernel::Rope {
                x: 2,
                factors: 1,
                rows: 1,
                heads,
                head_dim: hd,
                pos,
                base: 10_000.0,
                style: RopeStyle::HalfSplit,
            },
            vec![hd / 2, heads * hd],
            2,
        ),
        (
            "attention",
            Kernel::Attention {
                q: 1,
                k_cache: 2,
                v_cache: 3,
                out: 4,
                rows: 1,
                heads,
                kv_heads,
                head_dim: hd,
                pos,
            },
            vec![heads * hd, cache, cache, heads * hd],
            1,
        ),
        (
            "swiglu",
            Kernel::Swiglu {
                gate: 1,
                up: 2,
                out: 3,
                n: ff,
            },
            vec![ff, ff, ff],
            1,
        ),
        residual_add(d),
    ]
}

/// What a decode step of SmolLM2 runs once after its layers: the output projection (the
/// tied embedding, Q8_0, `vocab` rows of 576) and the ARGMAX of its logits.
fn llama_head(vocab: usize) -> Vec<Profiled> {
    vec![
        qmatmul("qmatmul_output", DType::Q8_0, vocab, 576, 1),
        (
            "argmax",
            Kernel::Argmax {
                x: 1,
                out: 2,
                rows: 1,
                cols: vocab,
            },
            vec![vocab, 1],
            1,
        ),
    ]
}

/// QMATMUL of one input row by `n` rows of `k` weights in `dtype`, run `times` a pass.
fn qmatmul(name: &'static str, dtype: DType, n: usize, k: usize, times: usize) -> Profiled {
    let kernel = Kernel::QMatmul {
        w: 1,
        x: 2,
        out: 3,
        n,
        k,
        m: 1,
        dtype,
    };
    (name, kernel, vec![quantized_f32s(dtype, n, k), k, n], times)
}

/// The f32 words that hold `n` rows of `k` elements in `dtype`.
fn quantized_f32s(dtype: DType, n: usize, k: usize) -> usize {
    let bytes = dtype.row_bytes(k as u64).expect("a whole number of blocks") * n as u64;
    bytes.div_ceil(4) as usize
}

/// `kernels`, each launched `reps` times back to back on `gpu` and on `cpu`: the
/// microseconds of one pass of them (each as often as it runs) on each, and each
/// kernel's.
fn profile(
    gpu: &mut dyn Backend,
    cpu: &mut dyn Backend,
    kernels: Vec<Profiled>,
    reps: usize,
) -> anyhow::Result<(f64, f64, String)> {
    let (mut on_gpu, mut on_cpu) = (0.0, 0.0);
    let mut each = Vec::new();
    for (name, kernel, sizes, times) in kernels {
        let gpu_us = micros_per_launch(gpu, &kernel, &sizes, reps)?;
        let cpu_us = micros_per_launch(cpu, &kernel, &sizes, reps)?;
        on_gpu += gpu_us * times as f64;
        on_cpu += cpu_us * times as f64;
        each.push(format!("{name} {gpu_us:.1} us (cpu {cpu_us:.1}) x{times}"));
    }
    Ok((on_gpu, on_cpu, each.join(", ")))
}

/// One llm-decode layer's kernels, and one SmolLM2 decode step's, on the GPU against the
/// cpu backend: where a decode step's time goes.
fn decode_profile(gpu: &mut dyn Backend, emit: &mut Emit, emulated: bool) -> anyhow::Result<()> {
    // llm-decode's width with 16 or 128 MiB of weights (4 heads of 64).
    let (d, len, reps) = if emulated {
        (64, 16, 4)
    } else {
        (256, 128, 200)
    };
    let mut cpu = backend::create(
        backend::CPU,
        ferry_vmm::vm::default_accel_threads(),
        &DeviceMemory::default(),
    )?;
    let (gpu_layer, cpu_layer, each) = profile(gpu, cpu.as_mut(), decode_layer(d, len), reps)?;
    emit(figure(
        "gpu_decode_layer",
        cpu_layer / gpu_layer,
        "x cpu",
        format!(
            "one llm-decode layer (width {d}, {len} positions cached), kernels launched back \
             to back: {gpu_layer:.0} us on the GPU, {cpu_layer:.0} us on the cpu backend; {each}"
        ),
    ))?;
    // SmolLM2 (llm-chat, llm-serve) 300 tokens into a conversation: its 30 layers, then
    // the output head over its 49,152-token vocabulary (smaller emulated).
    let (pos, vocab, reps) = if emulated {
        (16, 1024, 1)
    } else {
        (300, 49_152, 50)
    };
    let (gpu_layer, cpu_layer, layer) = profile(gpu, cpu.as_mut(), llama_layer(pos), reps)?;
    let (gpu_head, cpu_head, head) = profile(gpu, cpu.as_mut(), llama_head(vocab), reps)?;
    let (gpu_step, cpu_step) = (30.0 * gpu_layer + gpu_head, 30.0 * cpu_layer + cpu_head);
    emit(figure(
        "gpu_llama_step",
        cpu_step / gpu_step,
        "x cpu",
        format!(
            "a SmolLM2-135M decode step's kernels at position {pos} (30 layers of: {layer}; \
             then {head}, over {vocab} tokens), launched back to back: {gpu_step:.0} us on \
             the GPU ({:.0} tokens/s at most), {cpu_step:.0} us on the cpu backend",
            1e6 / gpu_step
        ),
    ))?;
    // The smallest kernel there is: what a launch costs the host, or the GPU's time per
    // kernel, whichever is more.
    let tiny = Kernel::Add {
        a: 1,
        b: 2,
        out: 3,
        n: 1,
    };
    let launch = micros_per_launch(gpu, &tiny, &[1, 1, 1], reps * 10)?;
    emit(figure(
        "gpu_launch",
        launch,
        "us",
        format!(
            "per ADD of one element, {} launched back to back (the host's cost of a launch \
             or the GPU's time per kernel, whichever is more)",
            reps * 10
        ),
    ))
}

/// Reads every chunk of buffer `id` 1 (`bytes` long) through `reader` while a second
/// backend on the same GPU launches `n×n×n` MATMULs until they end, waiting for each when
/// `wait_each`; bytes/s, and the MATMULs launched.
fn reads_while_launching(
    reader: &dyn BufferReader,
    bytes: u64,
    n: usize,
    wait_each: bool,
) -> anyhow::Result<(f64, u64)> {
    let (busy, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut kernels = 0u64;
    let rate = std::thread::scope(|scope| -> anyhow::Result<f64> {
        let reads = scope.spawn(|| {
            // Timed from the first MATMUL queued: the launcher's set-up (a backend, its
            // buffers filled) keeps no GPU busy.
            while !busy.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let rate = read_chunks(reader, 1, bytes);
            done.store(true, Ordering::Relaxed);
            rate
        });
        // Set however the launcher ends, so that the reads never wait for it in vain.
        let _busy = SetOnDrop(&busy);
        let mut launcher = cuda_backend()?;
        for id in 1..=3 {
            launcher.alloc(id, (n * n * 4) as u64)?;
        }
        fill(launcher.as_mut(), 1, n * n, 6)?;
        fill(launcher.as_mut(), 2, n * n, 7)?;
        while !done.load(Ordering::Relaxed) {
            launcher.launch(&backend::square_matmul(n))?;
            busy.store(true, Ordering::Release);
            if wait_each {
                sync(launcher.as_ref(), 3);
            }
            kernels += 1;
        }
        // What is still queued ends before the launcher's buffers go.
        sync(launcher.as_ref(), 3);
        reads
            .join()
            .map_err(|_| anyhow::anyhow!("the reading thread panicked"))?
    })?;
    Ok((rate, kernels))
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// `ferry bench gpu`.
pub fn bench_gpu(emit: &mut Emit) -> anyhow::Result<()> {
    let mut b = cuda_backend()?;
    let kind = b.kind();
    let emulated = kind == "cuda-emulated";
    eprintln!("ferry bench gpu: on {kind}");

    let make = || cuda_backend().map_err(|e| format!("{e:#}"));
    let cases = ferry_accel::backend::cuda::conformance::run(&make);
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| c.outcome.as_ref().err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    emit(figure(
        "gpu_kernels_agreeing",
        (cases.len() - failed.len()) as f64,
        "cases",
        if failed.is_empty() {
            format!(
                "all {} cases give the cpu backend's bits (MATMUL: within its bound)",
                cases.len()
            )
        } else {
            format!(
                "{} of {} differ: {}",
                failed.len(),
                cases.len(),
                failed.join("; ")
            )
        },
    ))?;

    for n in if emulated {
        vec![128]
    } else {
        vec![1024, 4096]
    } {
        let ours = matmul_gflops(b.as_mut(), n)?;
        let cublas = match backend::cuda_gpu() {
            Some(gpu) => gpu.cublas_gemm_gflops(n)?,
            None => None,
        };
        let (value, unit, vs) = match cublas {
            Some(c) => (ours / c, "x cuBLAS", format!("cuBLAS {c:.0} GFLOP/s")),
            None => (
                ours,
                "GFLOP/s",
                "cuBLAS not measured (not installed, or emulated)".into(),
            ),
        };
        emit(figure(
            match n {
                4096 => "gpu_gemm_4096",
                1024 => "gpu_gemm_1024",
                _ => "gpu_gemm_small",
            },
            value,
            unit,
            format!("{n}^3 f32 MATMUL through the {kind} backend {ours:.0} GFLOP/s; {vs}"),
        ))?;
    }

    decode_profile(b.as_mut(), emit, emulated)?;

    // A migration's chunk reads: idle, while MATMULs keep the GPU busy, and one plain copy.
    let bytes: u64 = if emulated { 64 << 20 } else { 1 << 30 };
    let busy_n = if emulated { 64 } else { 4096 };
    b.alloc(1, bytes)?;
    fill(b.as_mut(), 1, (bytes / 4) as usize, 3)?;
    sync(b.as_ref(), 1);
    let reader = b.reader();
    let idle = read_chunks(reader.as_ref(), 1, bytes)?;
    let mut whole = vec![0u8; bytes as usize];
    let started = Instant::now();
    b.read(1, 0, &mut whole);
    let plain = bytes as f64 / started.elapsed().as_secs_f64().max(1e-9);
    drop(whole);
    // Long kernels, each waited for, as a training step's.
    let (busy, kernels) = reads_while_launching(reader.as_ref(), bytes, busy_n, true)?;
    // Small kernels launched without waiting, as a decode step's hundreds: they fill the
    // GPU's queue unless the driver bounds it (FERRY_CUDA_LAUNCH_WINDOW).
    let flood_n = if emulated { 8 } else { 64 };
    let (flood, small) = reads_while_launching(reader.as_ref(), bytes, flood_n, false)?;
    let gbs = |v: f64| v / 1e9;
    emit(figure(
        "gpu_chunk_reads_idle",
        idle / plain,
        "x plain copy",
        format!(
            "{} MiB in {} KiB chunks (each pass 5 s at most): {:.1} GB/s; one plain copy of the buffer {:.1} GB/s",
            bytes >> 20,
            CHUNK_SIZE >> 10,
            gbs(idle),
            gbs(plain)
        ),
    ))?;
    emit(figure(
        "gpu_chunk_reads_busy",
        busy / idle,
        "x idle",
        format!(
            "{:.1} GB/s while {kernels} MATMULs of {busy_n}^3 ran on the GPU (idle {:.1} GB/s)",
            gbs(busy),
            gbs(idle)
        ),
    ))?;

    emit(figure(
        "gpu_chunk_reads_flooded",
        flood / idle,
        "x idle",
        format!(
            "{:.3} GB/s while {small} MATMULs of {flood_n}^3 were launched without waiting \
             (launch window {}; idle {:.1} GB/s)",
            gbs(flood),
            std::env::var("FERRY_CUDA_LAUNCH_WINDOW").unwrap_or_else(|_| "default".into()),
            gbs(idle)
        ),
    ))?;

    // A destination's chunk writes.
    let chunk = vec![0x5au8; CHUNK_SIZE as usize];
    let started = Instant::now();
    let mut at = 0;
    while at < bytes {
        let len = CHUNK_SIZE.min(bytes - at) as usize;
        b.write(1, at, &chunk[..len]);
        at += len as u64;
    }
    sync(b.as_ref(), 1);
    let writes = bytes as f64 / started.elapsed().as_secs_f64().max(1e-9);
    emit(figure(
        "gpu_chunk_writes",
        writes / plain,
        "x plain copy",
        format!(
            "{} MiB in {} KiB chunks: {:.1} GB/s",
            bytes >> 20,
            CHUNK_SIZE >> 10,
            gbs(writes)
        ),
    ))?;
    // The figures are out; kernels that disagree still fail the run, as a script reads
    // it by its exit code.
    ensure!(
        failed.is_empty(),
        "{} of {} kernel cases differ from the cpu backend",
        failed.len(),
        cases.len()
    );
    Ok(())
}
