//! MATMUL on `matrixmultiply::sgemm`, parallel over fixed output tiles.
//!
//! # Determinism
//!
//! The result is split into a grid of tiles that depends only on the shape (see
//! [`tile_shape`]); each tile is one single-threaded `sgemm` call, run on any thread of
//! the pool. Every output element is therefore computed by one call with the full depth
//! `k`, in an order fixed by `matrixmultiply`: the depth is cut in blocks of 256 (`KC`, a
//! compile-time constant), each block is accumulated sequentially into a register, and
//! blocks are added to `c` in order. The thread count changes which thread runs a tile,
//! never the arithmetic. (By our reading of `matrixmultiply` 0.3 the tiling does not
//! change the bits either: accumulators start at +0 so a product block is never -0, and
//! with α = 1 its edge and interior micro-tiles round alike; a test checks tiled results
//! against one whole call. The grid is fixed by the shape all the same.)
//!
//! A tile is computed in segments of its depth, each one `sgemm` call, checking between
//! two whether the kernel is to stop (one tile of a hostile shape, one row by one column
//! billions deep, is seconds of work). Each segment starts at a multiple of `KC` and adds
//! to what the ones before wrote (β = 1): exactly what `matrixmultiply` does from one
//! depth block to the next within one call, so the bits are those of one call.
//!
//! Across hosts, `matrixmultiply` picks its microkernel at run time: every x86-64 CPU
//! with AVX2 and FMA runs the same FMA kernel and gets the same bits; a CPU without FMA
//! (or another architecture) runs an unfused kernel whose results differ in the last
//! bits. Its AVX-512 kernel is left disabled (default features off) for that reason.

use rayon::prelude::*;
use rayon::ThreadPool;

use super::Workers;

/// Largest tile: up to 512 rows share each packed panel of `b` and 1024 columns
/// (`matrixmultiply`'s `NC`) each packed block of `a`; smaller tiles repack more.
const MAX_TILE: (usize, usize) = (512, 1024);
/// Smallest tile.
const MIN_TILE: (usize, usize) = (128, 256);
/// Tiles are shrunk until there are at least this many (or they reach [`MIN_TILE`]), to
/// keep up to this many threads busy.
const TARGET_TILES: usize = 16;
/// `matrixmultiply`'s depth block for f32 (its `S_KC`, a constant of the crate): one call
/// accumulates each block in registers and adds the blocks to `c` in order. (Were it to
/// change, the test of kernels cut in parts would show other bits.)
const KC: usize = 256;
/// Multiply-adds of a tile between two checks of its kernel's switch (a millisecond or
/// a few).
const SEGMENT_WORK: usize = 1 << 24;

/// The depth of the segments of a `rows×cols` tile: a whole number of [`KC`] blocks of
/// about [`SEGMENT_WORK`] in all (`matrixmultiply` computes whole micro-tiles of 8×8, so
/// fewer rows or columns cost as much).
fn segment_depth(rows: usize, cols: usize) -> usize {
    let step = rows.next_multiple_of(8) * cols.next_multiple_of(8);
    (SEGMENT_WORK / step).max(1).next_multiple_of(KC)
}

/// The tile (rows, columns) for an `m×n` result: a function of the shape alone.
pub fn tile_shape(m: usize, n: usize) -> (usize, usize) {
    let round = |x: usize| x.next_multiple_of(8);
    let mut tm = MAX_TILE.0.min(round(m));
    let mut tn = MAX_TILE.1.min(round(n));
    while m.div_ceil(tm) * n.div_ceil(tn) < TARGET_TILES {
        if tn > 256 {
            tn = round(tn / 2);
        } else if tm > MIN_TILE.0 {
            tm = round(tm / 2);
        } else if tn > MIN_TILE.1 {
            tn = round(tn / 2);
        } else {
            break;
        }
    }
    (tm, tn)
}

/// The `matrixmultiply` microkernel this host runs for f32 (the same detection as the
/// crate's): hosts give bit-identical MATMUL results only when this matches.
pub fn microkernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            return "x86_64-fma";
        }
        if std::arch::is_x86_feature_detected!("avx") {
            return "x86_64-avx";
        }
        "x86_64-sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "aarch64-neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "generic"
    }
}

/// The shape and layout of one MATMUL.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// Rows of `c`.
    pub m: usize,
    /// Columns of `c`.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// `a` is stored `k×m`.
    pub transpose_a: bool,
    /// `b` is stored `n×k`.
    pub transpose_b: bool,
    /// `c += a·b` instead of `c = a·b`.
    pub accumulate: bool,
}

/// A pointer to `c` shared by the tile tasks, each writing its own tile.
#[derive(Clone, Copy)]
struct TilePtr(*mut f32);

// SAFETY: the pointer is only used to write disjoint tiles of one `&mut [f32]` that
// outlives the parallel loop (see `run`); sending it between threads is then sound.
unsafe impl Send for TilePtr {}
// SAFETY: as above: shared use never writes the same element from two threads.
unsafe impl Sync for TilePtr {}

impl Gemm {
    /// `c = op(a)·op(b)` (or `+=`), on `pool`; tiles are skipped once its switch is pulled.
    ///
    /// # Panics
    ///
    /// If a buffer is smaller than the shape needs (the device validated it before).
    pub fn run(&self, pool: &Workers, a: &[f32], b: &[f32], c: &mut [f32]) {
        let Gemm { m, n, k, .. } = *self;
        let (mk, kn, mn) = (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n));
        assert!(
            mk.is_some_and(|e| e <= a.len())
                && kn.is_some_and(|e| e <= b.len())
                && mn.is_some_and(|e| e <= c.len()),
            "MATMUL operands smaller than their shape"
        );
        if m == 0 || n == 0 {
            return;
        }
        let size = tile_shape(m, n);
        let tn = n.div_ceil(size.1);
        let tiles = m.div_ceil(size.0) * tn;
        let c = TilePtr(c.as_mut_ptr());
        let tile = |t: usize| self.tile(pool, a, b, c, size, (t / tn, t % tn));
        if tiles == 1 {
            tile(0);
        } else {
            // Each tile an item (see `Workers::share`), which checks between its segments
            // too.
            pool.share(0..tiles, |_, t| tile(t));
        }
    }

    /// Computes output tile (`ti`, `tj`) of tiles of `size`, in segments of its depth;
    /// stops between two once the kernel is to stop.
    fn tile(
        &self,
        pool: &Workers,
        a: &[f32],
        b: &[f32],
        c: TilePtr,
        size: (usize, usize),
        (ti, tj): (usize, usize),
    ) {
        let Gemm { m, n, k, .. } = *self;
        let (i0, j0) = (ti * size.0, tj * size.1);
        let (rows, cols) = (size.0.min(m - i0), size.1.min(n - j0));
        // op(a)[i][p] and op(b)[p][j] as offset + row stride + column stride.
        let (a_off, rsa, csa) = if self.transpose_a {
            (i0, 1, m)
        } else {
            (i0 * k, k, 1)
        };
        let (b_off, rsb, csb) = if self.transpose_b {
            (j0 * k, 1, k)
        } else {
            (j0, n, 1)
        };
        let depth = segment_depth(rows, cols);
        let mut p0 = 0;
        loop {
            let kk = depth.min(k - p0);
            // The first segment writes `c` as asked (β = 0 replaces it), the others add
            // to it, as `matrixmultiply`'s own depth blocks do.
            let beta = if self.accumulate || p0 > 0 { 1.0 } else { 0.0 };
            // SAFETY: `run` checked that `a` holds m·k, `b` k·n and `c` m·n elements, so
            // every element of the segment's operands (a: rows i0..i0+rows of op(a),
            // b: columns j0..j0+cols of op(b), depths p0..p0+kk, all below k) and of its
            // result (rows i0.., columns j0.. of the row-major m×n `c`) is in bounds;
            // strides and offsets are below the slice lengths, which fit in isize. `a`
            // and `b` are only read (they may be the same slice); `c` is a distinct `&mut`
            // slice borrowed for the whole of `run`, and tiles are disjoint, so no element
            // is written by two calls at once or read while written. With beta = 0
            // `sgemm` does not read `c`.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    kk,
                    cols,
                    1.0,
                    a.as_ptr().add(a_off + p0 * csa),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr().add(b_off + p0 * rsb),
                    rsb as isize,
                    csb as isize,
                    beta,
                    c.0.add(i0 * n + j0),
                    n as isize,
                    1,
                );
            }
            p0 += kk;
            if p0 >= k || pool.stops() {
                return;
            }
        }
    }
}

/// Calls `sgemm` directly on row-major `c = a·b` (`m×k` times `k×n`, shape `(m, n, k)`), split into
/// `threads` equal row blocks run on `pool`: the fastest use of the crate for that
/// thread count, and not deterministic across thread counts. For benchmarks.
pub fn direct(
    pool: &ThreadPool,
    threads: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let rows = m.div_ceil(threads.max(1)).max(1);
    let blocks = c[..m * n].par_chunks_mut(rows * n).enumerate();
    pool.install(|| {
        blocks.for_each(|(i, block)| {
            let r = block.len() / n;
            let a = &a[i * rows * k..];
            // SAFETY: `a` holds the block's r rows of k, `b` all k×n, `block` r rows of n
            // (checked above); `block` is a distinct `&mut` slice and a, b are only read.
            unsafe {
                matrixmultiply::sgemm(
                    r,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    block.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        })
    });
}
