//! `ferry bench gpu`: the cuda backend at device level, no VM (so it runs on a GPU host
//! without KVM): every kernel against the cpu backend, MATMUL's speed against cuBLAS
//! called directly, and a migration's chunk reads while kernels keep the GPU busy (long
//! ones, and a flood of small ones) against the same reads on an idle GPU and one plain
//! copy of the buffer.
//!
//! With `FERRY_CUDA_EMULATOR=1` it runs on the emulated kernels (small sizes, no cuBLAS):
//! that checks the benchmark, not a GPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::ensure;
use ferry_accel::backend::{self, Backend, BufferReader, DeviceMemory};
use ferry_accel::dirty::CHUNK_SIZE;

use crate::cmd::bench::{figure, Emit};

/// The cuda backend of this host, or the reason there is none.
fn cuda_backend() -> anyhow::Result<Box<dyn Backend>> {
    backend::create("cuda", 1, &DeviceMemory::default()).map_err(anyhow::Error::msg)
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
fn read_chunks(reader: &dyn BufferReader, id: u32, bytes: u64) -> anyhow::Result<f64> {
    let mut out = Vec::with_capacity(CHUNK_SIZE as usize);
    let started = Instant::now();
    let mut start = 0;
    while start < bytes {
        let end = (start + CHUNK_SIZE).min(bytes);
        let size = reader.read_range(id, start..end, &mut out);
        ensure!(size == Some(bytes), "chunk at {start} not read");
        start = end;
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64().max(1e-9))
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
    let done = AtomicBool::new(false);
    let mut kernels = 0u64;
    let rate = std::thread::scope(|scope| -> anyhow::Result<f64> {
        let reads = scope.spawn(|| {
            let rate = read_chunks(reader, 1, bytes);
            done.store(true, Ordering::Relaxed);
            rate
        });
        let mut launcher = cuda_backend()?;
        for id in 1..=3 {
            launcher.alloc(id, (n * n * 4) as u64)?;
        }
        fill(launcher.as_mut(), 1, n * n, 6)?;
        fill(launcher.as_mut(), 2, n * n, 7)?;
        while !done.load(Ordering::Relaxed) {
            launcher.launch(&backend::square_matmul(n))?;
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

/// `ferry bench gpu`.
pub fn bench_gpu(emit: &mut Emit) -> anyhow::Result<()> {
    let mut b = cuda_backend()?;
    let kind = b.kind();
    let emulated = kind == "cuda-emulated";
    eprintln!("ferry bench gpu: on {kind}");

    let make = || cuda_backend().expect("made once already");
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
            "{} MiB in {} KiB chunks: {:.1} GB/s; one plain copy of the buffer {:.1} GB/s",
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
