//! The kernels other than MATMUL, on slices.
//!
//! Determinism: work is split into fixed blocks (a number of elements or whole rows that
//! depends only on the shape), each output element is computed entirely inside one block
//! in a fixed sequential order, and the only cross-block reductions (SUM_COLS over row
//! chunks, the CROSS_ENTROPY mean) combine per-block results in block order. Thread count
//! and scheduling only decide which thread runs a block. Reductions accumulate in f64;
//! transcendental functions come from [`ferry_abi::accel::math`].
//!
//! Every parallel task goes through [`Workers::share`], which takes none once the kernel is
//! to stop (the device is being ended, or a replay's deadline passed): a kernel cut short
//! leaves its outputs partly written, which only a device being ended or a replay that
//! fails allows. A task whose work grows with a dimension (a row, a head, a dot product
//! of a hostile width) checks again every [`CHECK_WORK`] steps within ([`in_parts`],
//! [`Ticker`]), between steps it takes in the same order either way, so the bits are
//! those of the task run whole. Work done alone on the calling thread checks alike.

use std::ops::Range;

use ferry_abi::accel::math;

use super::{quant, Stopped, Ticker, Workers, CHECK_WORK};
use crate::kernel::{DType, Distribution, RopeStyle};

/// Elements per parallel task for elementwise kernels.
const BLOCK: usize = 1 << 14;
/// Elements per parallel task for elementwise kernels that take an exponential each
/// (tens of ns, where an add takes one): SWIGLU over SmolLM2's 1536 took 15 µs on one
/// thread, and a kernel thread idle that long falls asleep and wakes late for the next
/// kernel (decoding went from about 105 to 125 tokens/s on 2 threads).
const EXP_BLOCK: usize = 1 << 9;
/// Rows of CROSS_ENTROPY whose losses are kept (as f64) before they join the mean: the
/// rows are the guest's to choose, the host memory they take is not. (This and the other
/// run sizes below are small under test, so that the pinned bits check that runs do not
/// change them.)
const LOSS_ROWS: usize = if cfg!(test) { 1 << 4 } else { 1 << 16 };
/// Most f64 sums SUM_COLS keeps at once (8 MiB): a guest's columns are summed a run of
/// them at a time, over a window of chunks of rows at a time ([`SumColsPlan`]).
const SUM_PARTIALS: usize = if cfg!(test) { 1 << 8 } else { 1 << 20 };
/// Rows per partial sum in SUM_COLS.
const SUM_ROW_CHUNK: usize = 256;
/// Columns per task when combining SUM_COLS partial sums.
const SUM_COL_BLOCK: usize = 1024;

/// Runs `f(first_element, block)` over fixed blocks of `block` elements of `out`.
fn blocks<T: Send>(
    pool: &Workers,
    out: &mut [T],
    block: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let block = block.max(1);
    if out.len() <= block {
        f(0, out);
    } else {
        pool.share(out.chunks_mut(block), |i, b| f(i * block, b));
    }
}

/// Runs `f(row_index, row)` over the rows of width `cols` of `out`, in blocks of rows
/// of about [`BLOCK`] elements; a block stops at a row that [`Stopped`].
fn rows<T: Send>(
    pool: &Workers,
    out: &mut [T],
    cols: usize,
    f: impl Fn(usize, &mut [T]) -> Result<(), Stopped> + Sync,
) {
    let per = (BLOCK / cols.max(1)).max(1);
    blocks(pool, out, per * cols, |start, block| {
        let _ = block
            .chunks_mut(cols)
            .enumerate()
            .try_for_each(|(i, row)| f(start / cols + i, row));
    });
}

/// Runs `part` over `0..len` in consecutive ranges of [`CHECK_WORK`] steps, in order;
/// [`Stopped`] before the next range once the kernel is to stop.
fn in_parts(pool: &Workers, len: usize, part: impl FnMut(Range<usize>)) -> Result<(), Stopped> {
    in_parts_of(pool, len, 1, part)
}

/// [`in_parts`] in ranges of a whole number of `unit`s (but the last).
fn in_parts_of(
    pool: &Workers,
    len: usize,
    unit: usize,
    mut part: impl FnMut(Range<usize>),
) -> Result<(), Stopped> {
    let step = (CHECK_WORK / unit).max(1) * unit;
    let mut start = 0;
    while start < len {
        // The task checked before it began.
        if start > 0 {
            pool.check()?;
        }
        let end = len.min(start + step);
        part(start..end);
        start = end;
    }
    Ok(())
}

/// `terms(0..len).sum()`, the terms made and added in [`in_parts`]: the first range starts
/// the sum as `sum` starts it, the others add on to it, so these are that sum's adds, in
/// its order.
fn sum_in_parts<I: Iterator<Item = f64>>(
    pool: &Workers,
    len: usize,
    terms: impl Fn(Range<usize>) -> I,
) -> Result<f64, Stopped> {
    let mut sum = None;
    add_in_parts(pool, &mut sum, len, &terms)?;
    Ok(sum.unwrap_or_else(|| terms(0..0).sum()))
}

/// Adds `terms(0..len)` on to `sum` as [`sum_in_parts`] does (`None`: no term yet), so
/// that sums made a run of terms at a time are the sum of them all, in its order.
fn add_in_parts<I: Iterator<Item = f64>>(
    pool: &Workers,
    sum: &mut Option<f64>,
    len: usize,
    terms: impl Fn(Range<usize>) -> I,
) -> Result<(), Stopped> {
    in_parts(pool, len, |r| {
        *sum = Some(match *sum {
            None => terms(r).sum(),
            Some(s) => terms(r).fold(s, |s, t| s + t),
        });
    })
}

/// Runs `head(i, o)` over the `hd`-wide heads of `out`: each a task of its own if
/// `parallel` (attention's work per head is large and varies), else on this thread (one
/// head may still be long: a cache of millions of positions, so each is a task there too).
fn heads_of(
    pool: &Workers,
    out: &mut [f32],
    hd: usize,
    parallel: bool,
    head: impl Fn(usize, &mut [f32]) + Sync,
) {
    if parallel {
        pool.share(out.chunks_mut(hd), head);
    } else {
        out.chunks_mut(hd)
            .enumerate()
            .for_each(pool.task(|(i, o)| head(i, o)));
    }
}

/// `out[i] = f(i, out[i])` for the first `n` elements.
fn map(pool: &Workers, out: &mut [f32], n: usize, f: impl Fn(usize, f32) -> f32 + Sync) {
    map_in_blocks(pool, out, n, BLOCK, f);
}

/// [`map`] for an `f` that computes an exponential: tasks of [`EXP_BLOCK`] elements.
fn map_exp(pool: &Workers, out: &mut [f32], n: usize, f: impl Fn(usize, f32) -> f32 + Sync) {
    map_in_blocks(pool, out, n, EXP_BLOCK, f);
}

/// [`map`] in tasks of `block` elements.
fn map_in_blocks(
    pool: &Workers,
    out: &mut [f32],
    n: usize,
    block: usize,
    f: impl Fn(usize, f32) -> f32 + Sync,
) {
    blocks(pool, &mut out[..n], block, |start, block| {
        for (i, o) in block.iter_mut().enumerate() {
            *o = f(start + i, *o);
        }
    });
}

/// In place `x[r][c] += bias[c]`.
pub fn add_bias(pool: &Workers, x: &mut [f32], bias: &[f32], rows_: usize, cols: usize) {
    let bias = &bias[..cols];
    rows(pool, &mut x[..rows_ * cols], cols, |_, row| {
        in_parts(pool, cols, |r| {
            for (v, b) in row[r.clone()].iter_mut().zip(&bias[r]) {
                *v += b;
            }
        })
    });
}

/// `out = a + b`.
pub fn add(pool: &Workers, a: &[f32], b: &[f32], out: &mut [f32], n: usize) {
    map(pool, out, n, |i, _| a[i] + b[i]);
}

/// `out = a * b`.
pub fn mul(pool: &Workers, a: &[f32], b: &[f32], out: &mut [f32], n: usize) {
    map(pool, out, n, |i, _| a[i] * b[i]);
}

/// In place `x *= alpha`.
pub fn scale(pool: &Workers, x: &mut [f32], n: usize, alpha: f32) {
    map(pool, x, n, |_, v| v * alpha);
}

/// In place `y += alpha * x`.
pub fn axpy(pool: &Workers, x: &[f32], y: &mut [f32], n: usize, alpha: f32) {
    map(pool, y, n, |i, v| v + alpha * x[i]);
}

/// `out = max(x, 0)`; NaN stays NaN.
pub fn relu(pool: &Workers, x: &[f32], out: &mut [f32], n: usize) {
    map(pool, out, n, |i, _| if x[i] < 0.0 { 0.0 } else { x[i] });
}

/// `grad_in = grad_out * (x > 0)`.
pub fn relu_backward(pool: &Workers, x: &[f32], grad_out: &[f32], grad_in: &mut [f32], n: usize) {
    map(
        pool,
        grad_in,
        n,
        |i, _| if x[i] > 0.0 { grad_out[i] } else { 0.0 },
    );
}

/// √(2/π).
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const GELU_A: f64 = 0.044_715;

/// `0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
pub fn gelu_scalar(x: f32) -> f32 {
    let x = f64::from(x);
    let t = math::tanh(GELU_C * (x + GELU_A * x * x * x));
    (0.5 * x * (1.0 + t)) as f32
}

/// The derivative of [`gelu_scalar`].
pub fn gelu_grad_scalar(x: f32) -> f64 {
    let x = f64::from(x);
    let t = math::tanh(GELU_C * (x + GELU_A * x * x * x));
    let dinner = GELU_C * (1.0 + 3.0 * GELU_A * x * x);
    let sech2 = 1.0 - t * t;
    // Beyond |x| ~ 10 the second term is exactly 0 (t = ±1); avoid inf·0 for huge x.
    let second = if sech2 == 0.0 {
        0.0
    } else {
        0.5 * x * sech2 * dinner
    };
    0.5 * (1.0 + t) + second
}

/// `out = gelu(x)`.
pub fn gelu(pool: &Workers, x: &[f32], out: &mut [f32], n: usize) {
    map_exp(pool, out, n, |i, _| gelu_scalar(x[i]));
}

/// `grad_in = grad_out * gelu'(x)`.
pub fn gelu_backward(pool: &Workers, x: &[f32], grad_out: &[f32], grad_in: &mut [f32], n: usize) {
    map_exp(pool, grad_in, n, |i, _| {
        (f64::from(grad_out[i]) * gelu_grad_scalar(x[i])) as f32
    });
}

/// The maximum of a row, ignoring NaN (-inf for a row of NaN).
fn row_max(pool: &Workers, row: &[f32]) -> Result<f32, Stopped> {
    let mut max = f32::NEG_INFINITY;
    in_parts(pool, row.len(), |r| {
        max = row[r].iter().fold(max, |m, &v| if v > m { v } else { m });
    })?;
    Ok(max)
}

/// `e^(x - max)` for each element into `exps`, and their sum.
fn exps(pool: &Workers, row: &[f32], exps: &mut Vec<f64>) -> Result<(f64, f64), Stopped> {
    let max = f64::from(row_max(pool, row)?);
    exps.clear();
    let mut sum = 0.0;
    in_parts(pool, row.len(), |r| {
        for &v in &row[r] {
            let e = math::exp(f64::from(v) - max);
            sum += e;
            exps.push(e);
        }
    })?;
    Ok((max, sum))
}

/// Row-wise softmax.
pub fn softmax(pool: &Workers, x: &[f32], out: &mut [f32], rows_: usize, cols: usize) {
    rows(pool, &mut out[..rows_ * cols], cols, |r, o| {
        let mut e = Vec::with_capacity(cols);
        let (_, sum) = exps(pool, &x[r * cols..][..cols], &mut e)?;
        in_parts(pool, cols, |p| {
            for (o, e) in o[p.clone()].iter_mut().zip(&e[p]) {
                *o = (e / sum) as f32;
            }
        })
    });
}

/// Mean cross-entropy into `loss[0]`, `grad = (softmax - onehot) / rows`; the labels are
/// below `cols` (checked by the backend: the kernel table's [`crate::kernel::Indices`]).
pub fn cross_entropy(
    pool: &Workers,
    logits: &[f32],
    labels: &[u32],
    grad: &mut [f32],
    loss: &mut [f32],
    rows_: usize,
    cols: usize,
) {
    let inv_rows = 1.0 / rows_ as f64;
    // Losses for a run of rows at a time, added to the mean in row order after each run:
    // the same adds as over all rows at once.
    let run = LOSS_ROWS;
    let mut row_loss = vec![0.0f64; run.min(rows_)];
    let mut mean = None;
    for first in (0..rows_).step_by(run) {
        let rows_here = run.min(rows_ - first);
        let grad = &mut grad[first * cols..][..rows_here * cols];
        let row_loss = &mut row_loss[..rows_here];
        cross_entropy_rows(pool, logits, labels, grad, row_loss, first, cols, inv_rows);
        let added = add_in_parts(pool, &mut mean, rows_here, |r| row_loss[r].iter().copied());
        if added.and_then(|()| pool.check()).is_err() {
            return;
        }
    }
    if let Some(sum) = mean {
        loss[0] = (sum * inv_rows) as f32;
    }
}

/// [`cross_entropy`]'s gradient and losses of the rows from `first` on (as many as
/// `row_loss` holds).
#[allow(clippy::too_many_arguments)]
fn cross_entropy_rows(
    pool: &Workers,
    logits: &[f32],
    labels: &[u32],
    grad: &mut [f32],
    row_loss: &mut [f64],
    first: usize,
    cols: usize,
    inv_rows: f64,
) {
    let rows_ = row_loss.len();
    let per = (BLOCK / cols).max(1);
    let work = |(i, (g, l)): (usize, (&mut [f32], &mut [f64]))| {
        let mut e = Vec::with_capacity(cols);
        let mut rows = g.chunks_mut(cols).zip(l).enumerate();
        let _ = rows.try_for_each(|(j, (g, l))| {
            let r = first + i * per + j;
            let row = &logits[r * cols..][..cols];
            let (max, sum) = exps(pool, row, &mut e)?;
            let label = labels[r] as usize;
            // -log softmax[label] = max + ln(sum) - x[label].
            *l = max + math::ln(sum) - f64::from(row[label]);
            in_parts(pool, cols, |c| {
                for (c, (g, e)) in c.clone().zip(g[c.clone()].iter_mut().zip(&e[c])) {
                    let p = e / sum - if c == label { 1.0 } else { 0.0 };
                    *g = (p * inv_rows) as f32;
                }
            })
        });
    };
    if rows_ <= per {
        grad.chunks_mut(per * cols)
            .zip(row_loss.chunks_mut(per))
            .enumerate()
            .for_each(work);
    } else {
        let tasks = grad.chunks_mut(per * cols).zip(row_loss.chunks_mut(per));
        pool.share(tasks, |i, t| work((i, t)));
    }
}

/// `out[r] = Σ_c x[r][c]`.
pub fn sum_rows(pool: &Workers, x: &[f32], out: &mut [f32], rows_: usize, cols: usize) {
    let per = (BLOCK / cols).max(1);
    blocks(pool, &mut out[..rows_], per, |start, o| {
        let _ = o.iter_mut().enumerate().try_for_each(|(i, o)| {
            let row = &x[(start + i) * cols..][..cols];
            *o = sum_in_parts(pool, cols, |r| row[r].iter().map(|&v| f64::from(v)))? as f32;
            Ok::<_, Stopped>(())
        });
    });
}

/// How [`sum_cols`] splits a `rows×cols` sum so that it keeps at most [`SUM_PARTIALS`]
/// f64 sums (partial sums and running sums together), whatever the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SumColsPlan {
    /// Chunks of [`SUM_ROW_CHUNK`] rows.
    chunks: usize,
    /// Columns summed at once.
    run: usize,
    /// Chunks of rows whose partial sums are kept at once.
    window: usize,
}

impl SumColsPlan {
    /// The plan for a `rows_×cols` sum.
    fn new(rows_: usize, cols: usize) -> Self {
        let chunks = rows_.div_ceil(SUM_ROW_CHUNK).max(1);
        // A column takes a running sum and a partial sum per chunk of the window: as
        // many columns as fit with every chunk in one window, else one column over
        // windows of as many chunks as fit.
        let run = (SUM_PARTIALS / (chunks + 1)).clamp(1, cols.max(1));
        let window = (SUM_PARTIALS / run).saturating_sub(1).clamp(1, chunks);
        Self {
            chunks,
            run,
            window,
        }
    }

    /// The f64 sums it keeps at once: a running sum and a partial sum per chunk of the
    /// window, for each column of the run.
    fn sums_kept(&self) -> usize {
        self.run * (self.window + 1)
    }
}

/// `out[c] = Σ_r x[r][c]`: partial sums over fixed chunks of [`SUM_ROW_CHUNK`] rows, added
/// in chunk order to a running f64 sum per column. Runs of columns at a time, over
/// windows of chunks at a time ([`SumColsPlan`]), so that at most [`SUM_PARTIALS`] sums
/// are kept: a column's sum is its own whatever the run, and gets the same additions in
/// the same order whatever the window.
pub fn sum_cols(pool: &Workers, x: &[f32], out: &mut [f32], rows_: usize, cols: usize) {
    let plan = SumColsPlan::new(rows_, cols);
    let mut kept = vec![0.0f64; plan.sums_kept()];
    let (sums, partial) = kept.split_at_mut(plan.run);
    for first in (0..cols).step_by(plan.run) {
        let width = plan.run.min(cols - first);
        let sums = &mut sums[..width];
        sums.fill(0.0);
        for from in (0..plan.chunks).step_by(plan.window) {
            let chunks = from..plan.chunks.min(from + plan.window);
            let partial = &mut partial[..chunks.len() * width];
            partial.fill(0.0);
            sum_cols_window(pool, x, (rows_, cols), first, chunks, partial, sums);
            if pool.check().is_err() {
                return;
            }
        }
        for (o, &sum) in out[first..][..width].iter_mut().zip(&*sums) {
            *o = sum as f32;
        }
    }
}

/// [`sum_cols`] of the columns from `first` on (as many as `sums` holds) over the row
/// chunks `chunks`: their partial sums in `partial` (zeroed, a row of them per chunk),
/// then added to `sums` in chunk order.
fn sum_cols_window(
    pool: &Workers,
    x: &[f32],
    (rows_, cols): (usize, usize),
    first: usize,
    chunks: Range<usize>,
    partial: &mut [f64],
    sums: &mut [f64],
) {
    let width = sums.len();
    let fill = |(i, p): (usize, &mut [f64])| {
        let first_row = (chunks.start + i) * SUM_ROW_CHUNK;
        let mut tick = Ticker::new(pool);
        let _ = (first_row..rows_.min(first_row + SUM_ROW_CHUNK)).try_for_each(|r| {
            let row = &x[r * cols + first..][..width];
            in_parts(pool, width, |c| {
                for (acc, &v) in p[c.clone()].iter_mut().zip(&row[c]) {
                    *acc += f64::from(v);
                }
            })?;
            tick.done(width)
        });
    };
    let window_rows = rows_.min(chunks.end * SUM_ROW_CHUNK) - chunks.start * SUM_ROW_CHUNK;
    if window_rows * width <= BLOCK {
        partial.chunks_mut(width).enumerate().for_each(fill);
    } else {
        pool.share(partial.chunks_mut(width), |i, p| fill((i, p)));
    }
    let partial = &*partial;
    blocks(pool, sums, SUM_COL_BLOCK, |start, s| {
        for (i, sum) in s.iter_mut().enumerate() {
            let c = start + i;
            for ch in 0..chunks.len() {
                *sum += partial[ch * width + c];
            }
        }
    });
}

/// In place `param -= lr * grad`.
pub fn sgd(pool: &Workers, param: &mut [f32], grad: &[f32], n: usize, lr: f32) {
    map(pool, param, n, |i, p| p - lr * grad[i]);
}

/// Adam's hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f32,
    /// First moment decay.
    pub beta1: f32,
    /// Second moment decay.
    pub beta2: f32,
    /// Denominator term.
    pub eps: f32,
    /// Step, from 1.
    pub step: u64,
}

/// Adam's bias corrections `1-β1^t` and `1-β2^t`, in f64 (the cuda backend passes its
/// kernel these same bits).
pub fn adam_bias_corrections(beta1: f32, beta2: f32, step: u64) -> (f64, f64) {
    let bias_correction = |beta: f32| 1.0 - math::powu(f64::from(beta), step);
    (bias_correction(beta1), bias_correction(beta2))
}

/// One Adam step: `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²` (stored as f32), then
/// `param -= lr · m̂ / (√v̂ + eps)` with `m̂ = m / (1-β1^t)`, `v̂ = v / (1-β2^t)`; the
/// arithmetic is f64 with one rounding to f32 per stored value.
pub fn adam(
    pool: &Workers,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    n: usize,
    h: AdamParams,
) {
    let (b1, b2) = (f64::from(h.beta1), f64::from(h.beta2));
    let (lr, eps) = (f64::from(h.lr), f64::from(h.eps));
    let (bc1, bc2) = adam_bias_corrections(h.beta1, h.beta2, h.step);
    let (param, m, v) = (&mut param[..n], &mut m[..n], &mut v[..n]);
    type Task<'a> = (usize, ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]));
    let work = |(i, ((p, m), v)): Task<'_>| {
        let g = &grad[i * BLOCK..];
        for (j, ((p, m), v)) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).enumerate() {
            let g = f64::from(g[j]);
            let m1 = (b1 * f64::from(*m) + (1.0 - b1) * g) as f32;
            let v1 = (b2 * f64::from(*v) + (1.0 - b2) * g * g) as f32;
            let mhat = f64::from(m1) / bc1;
            let vhat = f64::from(v1) / bc2;
            *p = (f64::from(*p) - lr * mhat / (vhat.sqrt() + eps)) as f32;
            *m = m1;
            *v = v1;
        }
    };
    if n <= BLOCK {
        let chunks = param
            .chunks_mut(BLOCK)
            .zip(m.chunks_mut(BLOCK))
            .zip(v.chunks_mut(BLOCK));
        chunks.enumerate().for_each(work);
    } else {
        let chunks = param
            .chunks_mut(BLOCK)
            .zip(m.chunks_mut(BLOCK))
            .zip(v.chunks_mut(BLOCK));
        pool.share(chunks, |i, c| work((i, c)));
    }
}

/// Row-wise layer norm: `(x - mean) / √(var + eps) · gamma + beta`, statistics in f64
/// (two passes, population variance).
pub fn layer_norm(
    pool: &Workers,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [f32],
    (rows_, cols): (usize, usize),
    eps: f32,
) {
    let (gamma, beta, eps) = (&gamma[..cols], &beta[..cols], f64::from(eps));
    rows(pool, &mut out[..rows_ * cols], cols, |r, o| {
        let row = &x[r * cols..][..cols];
        let mean =
            sum_in_parts(pool, cols, |c| row[c].iter().map(|&v| f64::from(v)))? / cols as f64;
        let squares = |c: Range<usize>| {
            row[c]
                .iter()
                .map(move |&v| (f64::from(v) - mean) * (f64::from(v) - mean))
        };
        let var = sum_in_parts(pool, cols, squares)? / cols as f64;
        let inv = 1.0 / (var + eps).sqrt();
        in_parts(pool, cols, |c| {
            for (c, o) in c.clone().zip(&mut o[c]) {
                let norm = (f64::from(row[c]) - mean) * inv;
                *o = (norm * f64::from(gamma[c]) + f64::from(beta[c])) as f32;
            }
        })
    });
}

/// Copies `n` elements.
pub fn copy(
    pool: &Workers,
    src: &[f32],
    src_offset: usize,
    dst: &mut [f32],
    dst_offset: usize,
    n: usize,
) {
    let (src, dst) = (&src[src_offset..][..n], &mut dst[dst_offset..][..n]);
    let _ = in_parts(pool, n, |r| dst[r.clone()].copy_from_slice(&src[r]));
}

/// The splitmix64 finalizer (a bijection of u64).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Two independent 64-bit words for `(seed, counter)`. For a given seed the first word is
/// a bijection of the counter, so no two counters of a stream share it.
pub fn rng_words(seed: u64, counter: u64) -> (u64, u64) {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let key = mix64(seed ^ 0x6a09_e667_f3bc_c909);
    let h1 = mix64(mix64(counter.wrapping_mul(GOLDEN) ^ key).wrapping_add(key));
    let h2 = mix64(h1 ^ key.rotate_left(32) ^ GOLDEN);
    (h1, h2)
}

/// The value of element `counter` of stream `seed`.
pub fn rng_value(seed: u64, counter: u64, distribution: Distribution, scale: f32) -> f32 {
    let (h1, h2) = rng_words(seed, counter);
    match distribution {
        Distribution::Uniform => {
            // u in [0, 1) on a 2^-24 grid: 2u - 1 is exact, and (2u - 1)·scale < scale.
            let u = (h1 >> 40) as f32 * (1.0 / 16_777_216.0);
            (2.0 * u - 1.0) * scale
        }
        Distribution::Normal => {
            // Box-Muller: u1 in (0, 1], u2 in [0, 1), both on a 2^-53 grid.
            let u1 = ((h1 >> 11) + 1) as f64 * (1.0 / 9_007_199_254_740_992.0);
            let u2 = (h2 >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
            let z = (-2.0 * math::ln(u1)).sqrt() * math::cos_2pi(u2);
            (z * f64::from(scale)) as f32
        }
    }
}

/// Counter-based random fill: element `i` is `rng_value(seed, counter + i)`.
pub fn rng_fill(
    pool: &Workers,
    out: &mut [f32],
    n: usize,
    seed: u64,
    counter: u64,
    distribution: Distribution,
    scale: f32,
) {
    map(pool, out, n, |i, _| {
        rng_value(seed, counter.wrapping_add(i as u64), distribution, scale)
    });
}

/// The shape of an attention decode step.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Positions attended to.
    pub len: usize,
}

/// For each head, `out = softmax(q·Kᵀ/√head_dim)·V` over the first `len` positions of
/// caches laid out `[positions × heads × head_dim]`.
pub fn attention_decode(
    pool: &Workers,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    out: &mut [f32],
    s: AttentionShape,
) {
    let AttentionShape {
        heads,
        head_dim: hd,
        len,
    } = s;
    let scale = 1.0 / (hd as f64).sqrt();
    let stride = heads * hd;
    let head = |h: usize, o: &mut [f32]| -> Result<(), Stopped> {
        let q = &q[h * hd..][..hd];
        let mut tick = Ticker::new(pool);
        let mut scores = Vec::with_capacity(len);
        let mut max = f64::NEG_INFINITY;
        for p in 0..len {
            let k = &kc[p * stride + h * hd..][..hd];
            let products = |r: Range<usize>| {
                q[r.clone()]
                    .iter()
                    .zip(&k[r])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
            };
            let s = sum_in_parts(pool, hd, products)? * scale;
            if s > max {
                max = s;
            }
            scores.push(s);
            tick.done(hd)?;
        }
        let mut sum = 0.0;
        for s in &mut scores {
            *s = math::exp(*s - max);
            sum += *s;
            tick.done(1)?;
        }
        let mut acc = vec![0.0f64; hd];
        for (p, w) in scores.iter().enumerate() {
            let v = &vc[p * stride + h * hd..][..hd];
            in_parts(pool, hd, |r| {
                for (a, &v) in acc[r.clone()].iter_mut().zip(&v[r]) {
                    *a += w * f64::from(v);
                }
            })?;
            tick.done(hd)?;
        }
        in_parts(pool, hd, |r| {
            for (o, a) in o[r.clone()].iter_mut().zip(&acc[r]) {
                *o = (a / sum) as f32;
            }
        })
    };
    heads_of(
        pool,
        &mut out[..stride],
        hd,
        heads > 1 && len * stride > BLOCK,
        |h, o| {
            let _ = head(h, o);
        },
    );
}

/// `out[r] = argmax_c x[r][c]`: the first maximum, or the first NaN if the row has one.
pub fn argmax(pool: &Workers, x: &[f32], out: &mut [u32], rows_: usize, cols: usize) {
    let per = (BLOCK / cols).max(1);
    blocks(pool, &mut out[..rows_], per, |start, o| {
        let _ = o.iter_mut().enumerate().try_for_each(|(i, o)| {
            let row = &x[(start + i) * cols..][..cols];
            // The largest value and whether there is a NaN, in lanes, then the first place
            // of the NaN or of that value (the same place as a scan keeping the first
            // larger one: values equal to the largest are equal to each other, ±0 alike).
            let (mut top, mut nan) = (f32::NEG_INFINITY, false);
            in_parts(pool, cols, |r| {
                if !nan {
                    let (t, n) = max_and_nan(&row[r]);
                    (top, nan) = (if t > top { t } else { top }, n);
                }
            })?;
            let mut best = None;
            in_parts(pool, cols, |r| {
                if best.is_none() {
                    let at = |v: &f32| if nan { v.is_nan() } else { *v == top };
                    best = row[r.clone()].iter().position(at).map(|c| r.start + c);
                }
            })?;
            // Decode checked that cols - 1 fits in a u32; a row of -∞ has its first.
            *o = best.unwrap_or(0) as u32;
            Ok::<_, Stopped>(())
        });
    });
}

/// The largest of `v` (`-∞` if empty) leaving NaNs aside, and whether it has a NaN: in
/// independent lanes, which the compiler vectorizes.
fn max_and_nan(v: &[f32]) -> (f32, bool) {
    const LANES: usize = 16;
    let (mut top, mut nan) = ([f32::NEG_INFINITY; LANES], [false; LANES]);
    let (chunks, rest) = v.as_chunks::<LANES>();
    for c in chunks {
        for j in 0..LANES {
            top[j] = if c[j] > top[j] { c[j] } else { top[j] };
            nan[j] |= c[j].is_nan();
        }
    }
    let max = top
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    (max, nan.contains(&true) || rest.iter().any(|x| x.is_nan()))
}

/// Weight bytes a QMATMUL task reads between two checks of its kernel's switch, about (a
/// row at least, and [`Ticker`]'s work at least), and with several inputs at most, so
/// that a batch of tasks spreads over every thread: enough to outweigh a task's cost.
const QMATMUL_TASK_BYTES: usize = 32 << 10;
/// Tasks per kernel thread, at most, that a QMATMUL taking one input at a time makes of
/// its weights: each task's rows are one run of weights, and each run starts cold (its
/// first lines wait on memory, and the prefetchers learn the stream anew). SmolLM2's
/// products of a decoded token on two threads took 3.85 ms in 32 KiB tasks, 3.65 in two
/// per thread and 3.6 in one (three runs each, alternated); two, so that a thread held up
/// is helped.
const QMATMUL_TASKS_PER_THREAD: usize = 2;

/// `out[m×n] = x[m×k]·Wᵀ` for `w` holding `n` rows of `k` elements in `dtype` (see
/// [`super::quant`] for why the bits do not depend on the thread count: each output is
/// one row's dot product, computed whole by one task).
#[allow(clippy::too_many_arguments)]
pub fn qmatmul(
    pool: &Workers,
    dtype: DType,
    w: &[u8],
    x: &[f32],
    out: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
) {
    let row_bytes = dtype
        .row_bytes(k as u64)
        .expect("k validated by the device") as usize;
    // Inputs a run at a time: prepared, each takes about 3 bytes an element plus its own
    // (a guest may give billions of rows), and a run's results are out's own rows.
    let run = (QMATMUL_INPUTS / k.max(QMATMUL_ROW_MIN)).clamp(1, m);
    for first in (0..m).step_by(run) {
        let rows = run.min(m - first);
        let x = &x[first * k..][..rows * k];
        let out = &mut out[first * n..][..rows * n];
        if qmatmul_run(pool, dtype, w, x, out, (n, k, rows), row_bytes).is_err() {
            return;
        }
    }
}

/// Input elements QMATMUL prepares at a time (12 MiB prepared): far more than a prompt's
/// batch of rows, so weights are still unpacked once for all of it.
const QMATMUL_INPUTS: usize = if cfg!(test) { 1 << 12 } else { 1 << 22 };
/// Elements each input row counts for in [`QMATMUL_INPUTS`] at least (its prepared form
/// has a fixed part).
const QMATMUL_ROW_MIN: usize = 64;
/// Most results QMATMUL keeps by weight row before turning them around into `out` (16
/// MiB): weight rows are taken a run at a time.
const QMATMUL_BY_ROW: usize = if cfg!(test) { 1 << 8 } else { 1 << 22 };

/// [`qmatmul`] of the `m` rows of `x` into `out`.
fn qmatmul_run(
    pool: &Workers,
    dtype: DType,
    w: &[u8],
    x: &[f32],
    out: &mut [f32],
    (n, k, m): (usize, usize, usize),
    row_bytes: usize,
) -> Result<(), Stopped> {
    let per = (QMATMUL_TASK_BYTES / row_bytes.max(1)).max(1);
    // Prepared on this thread, checking as it goes: a guest may give billions of inputs.
    let mut tick = Ticker::new(pool);
    let prepared = x[..m * k]
        .chunks(k)
        .map(|x| quant::prepare_checked(x, &mut tick));
    let inputs = prepared.collect::<Result<Vec<_>, _>>()?;
    if m > 1 && quant::unpacks_once(dtype) {
        // Several inputs (a prompt's tokens): each task takes a run of weight rows for
        // all of them, into a buffer by weight row, turned around into `out` after; a
        // run of tasks at a time, so that buffer stays small (with many inputs, tasks of
        // fewer rows).
        let per = per.min((QMATMUL_BY_ROW / m).max(1));
        let tasks = (QMATMUL_BY_ROW / (per * m)).max(1);
        let mut by_row = vec![0.0f32; (tasks * per).min(n) * m];
        for first in (0..n).step_by(tasks * per) {
            let rows = (tasks * per).min(n - first);
            let by_row = &mut by_row[..rows * m];
            let task = |(c, o): (usize, &mut [f32])| {
                let mut tick = Ticker::new(pool);
                let first = first + c * per;
                let _ =
                    quant::dot_inputs_checked(dtype, w, row_bytes, first, &inputs, o, &mut tick);
            };
            if rows <= per {
                task((0, by_row));
            } else {
                pool.share(by_row.chunks_mut(per * m), |c, o| task((c, o)));
            }
            pool.check()?;
            by_row
                .chunks_exact(m)
                .enumerate()
                .try_for_each(|(i, row)| {
                    for (r, &v) in row.iter().enumerate() {
                        out[r * n + first + i] = v;
                    }
                    tick.done(m)
                })?;
        }
        return Ok(());
    }
    // One input at a time: each task takes a run of rows, `per` rows (a check of the
    // switch) at a time.
    let run = per.max(n.div_ceil(pool.threads() * QMATMUL_TASKS_PER_THREAD));
    let task = |(r, c, o): (usize, usize, &mut [f32])| {
        let mut tick = Ticker::new(pool);
        for (j, part) in o.chunks_mut(per).enumerate() {
            let (first, input) = (c * run + j * per, &inputs[r]);
            if quant::dot_rows_checked(dtype, w, row_bytes, first, input, part, &mut tick).is_err()
            {
                return;
            }
        }
    };
    let out = &mut out[..m * n];
    if n * m <= per {
        for (r, o) in out.chunks_mut(n).enumerate() {
            task((r, 0, o));
        }
    } else {
        let parts = out
            .chunks_mut(n)
            .enumerate()
            .flat_map(|(r, o)| o.chunks_mut(run).enumerate().map(move |(c, o)| (r, c, o)));
        pool.share(parts, |_, part| task(part));
    }
    Ok(())
}

/// `out[i] = table[ids[i]]` dequantized, `dim` wide, from a table in `dtype` (EMBEDDING:
/// f32); the ids are rows of the table (checked by the backend:
/// the kernel table's [`crate::kernel::Indices`]).
pub fn qembedding(
    pool: &Workers,
    dtype: DType,
    table: &[u8],
    ids: &[u32],
    out: &mut [f32],
    count: usize,
    dim: usize,
) {
    let row_bytes = dtype
        .row_bytes(dim as u64)
        .expect("dim validated by the device") as usize;
    let (unit, unit_bytes) = (dtype.block_elems() as usize, dtype.block_bytes() as usize);
    rows(pool, &mut out[..count * dim], dim, |i, row| {
        let from = &table[ids[i] as usize * row_bytes..][..row_bytes];
        // Whole blocks, each dequantized alone.
        in_parts_of(pool, dim, unit, |r| {
            let bytes = r.start / unit * unit_bytes..r.end / unit * unit_bytes;
            quant::dequant_row(dtype, &from[bytes], &mut row[r]);
        })
    });
}

/// Row-wise `out = x / √(mean(x²) + eps) · weight`, the mean in f64.
pub fn rms_norm(
    pool: &Workers,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    (rows_, cols): (usize, usize),
    eps: f32,
) {
    let (weight, eps) = (&weight[..cols], f64::from(eps));
    rows(pool, &mut out[..rows_ * cols], cols, |r, o| {
        let row = &x[r * cols..][..cols];
        let squares = |c: Range<usize>| row[c].iter().map(|&v| f64::from(v) * f64::from(v));
        let mean = sum_in_parts(pool, cols, squares)? / cols as f64;
        let inv = 1.0 / (mean + eps).sqrt();
        in_parts(pool, cols, |c| {
            let (o, row, weight) = (&mut o[c.clone()], &row[c.clone()], &weight[c]);
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
                *o = (f64::from(v) * inv * f64::from(w)) as f32;
            }
        })
    });
}

/// The shape of a ROPE launch.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    /// Rows (consecutive positions).
    pub rows: usize,
    /// Heads per row.
    pub heads: usize,
    /// Width of a head (even).
    pub head_dim: usize,
    /// Position of row 0.
    pub pos: usize,
    /// Frequency base.
    pub base: f32,
    /// Which elements pair up.
    pub style: RopeStyle,
}

/// The rotations of ROPE's last one-row launch, kept for the next of the same position,
/// base, head width and factors: a decoded token's queries and keys turn alike, and their
/// sines and cosines took most of a launch.
#[derive(Debug, Default)]
pub struct RopeAngles {
    /// Head width, base (its bits) and position of the rotations kept; `None`: none.
    key: Option<(usize, u32, usize)>,
    /// The factors they were made with (their bits).
    factors: Vec<u32>,
    /// `(cos, sin)` of each pair.
    rot: Vec<(f64, f64)>,
}

/// Most pairs of a head whose rotations [`RopeAngles`] keeps (a real model's heads have
/// at most a few hundred; a guest's may have billions).
const KEPT_PAIRS: usize = 1 << 12;

impl RopeAngles {
    /// Whether these are the rotations of a one-row `s` with `factors`.
    fn are_for(&self, s: &RopeShape, factors: &[f32]) -> bool {
        self.key == Some((s.head_dim, s.base.to_bits(), s.pos))
            && self
                .factors
                .iter()
                .copied()
                .eq(factors.iter().map(|f| f.to_bits()))
    }
}

/// In place rotary embedding: pair `i` of a head at position `p` turns by
/// `p · base^(-2i/head_dim) / factors[i]`, with sine and cosine from [`math`] in f64. A
/// one-row launch's rotations are kept in `kept` for the next like it.
pub fn rope(pool: &Workers, x: &mut [f32], factors: &[f32], s: RopeShape, kept: &mut RopeAngles) {
    let half = s.head_dim / 2;
    let factors = &factors[..half];
    let width = s.heads * s.head_dim;
    if s.rows == 1 {
        if !kept.are_for(&s, factors) {
            *kept = RopeAngles::default();
            let made = turns(pool, factors, &s).and_then(|t| rotations(pool, &t, s.pos as f64));
            let Ok(rot) = made else {
                return;
            };
            if half > KEPT_PAIRS {
                let _ = rotate(pool, &mut x[..width], &rot, &s);
                return;
            }
            *kept = RopeAngles {
                key: Some((s.head_dim, s.base.to_bits(), s.pos)),
                factors: factors.iter().map(|f| f.to_bits()).collect(),
                rot,
            };
        }
        let _ = rotate(pool, &mut x[..width], &kept.rot, &s);
        return;
    }
    let Ok(turns) = turns(pool, factors, &s) else {
        return;
    };
    rows(pool, &mut x[..s.rows * width], width, |r, row| {
        let rot = rotations(pool, &turns, (s.pos + r) as f64)?;
        rotate(pool, row, &rot, &s)
    });
}

/// Turns (angle / 2π) per position of each pair of a head of `s`; made on this thread,
/// checking as it goes (a guest may ask for a head of billions). A factor of 1 divides
/// exactly.
fn turns(pool: &Workers, factors: &[f32], s: &RopeShape) -> Result<Vec<f64>, Stopped> {
    let ln_base = math::ln(f64::from(s.base));
    let mut turns = Vec::with_capacity(factors.len());
    in_parts(pool, factors.len(), |r| {
        turns.extend(r.map(|i| {
            math::exp(-((2 * i) as f64) / s.head_dim as f64 * ln_base)
                / (2.0 * core::f64::consts::PI)
                / f64::from(factors[i])
        }));
    })?;
    Ok(turns)
}

/// `(cos, sin)` of each pair's angle at position `p`, from its [`turns`].
fn rotations(pool: &Workers, turns: &[f64], p: f64) -> Result<Vec<(f64, f64)>, Stopped> {
    let mut rot = Vec::with_capacity(turns.len());
    in_parts(pool, turns.len(), |i| {
        let angles = turns[i].iter();
        rot.extend(angles.map(|&t| (math::cos_2pi(p * t), math::cos_2pi(p * t - 0.25))));
    })?;
    Ok(rot)
}

/// Turns each head of `row` by `rot`.
fn rotate(
    pool: &Workers,
    row: &mut [f32],
    rot: &[(f64, f64)],
    s: &RopeShape,
) -> Result<(), Stopped> {
    let half = rot.len();
    let mut tick = Ticker::new(pool);
    for head in row.chunks_exact_mut(s.head_dim) {
        in_parts(pool, half, |pairs| {
            for (i, &(cos, sin)) in rot[pairs.clone()].iter().enumerate() {
                let i = pairs.start + i;
                let (a, b) = match s.style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (f64::from(head[a]), f64::from(head[b]));
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        })?;
        tick.done(s.head_dim)?;
    }
    Ok(())
}

/// `out = gate / (1 + e^-gate) · up`, in f32 (with [`math::exp_f32`]).
pub fn swiglu(pool: &Workers, gate: &[f32], up: &[f32], out: &mut [f32], n: usize) {
    let avx2 = quant::has_avx2();
    blocks(pool, &mut out[..n], EXP_BLOCK, |start, out| {
        let (gate, up) = (&gate[start..][..out.len()], &up[start..][..out.len()]);
        swiglu_part(gate, up, out, avx2);
    });
}

/// [`swiglu`] of one part: with the AVX2 code when `allow_avx2` and the CPU has it, else
/// the portable code (the same bits: the tests check it).
pub fn swiglu_part(gate: &[f32], up: &[f32], out: &mut [f32], allow_avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if allow_avx2 && quant::has_avx2() {
        // SAFETY: `has_avx2` said this CPU has AVX2.
        return unsafe { avx2::swiglu(gate, up, out) };
    }
    let _ = allow_avx2;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_times(g, u);
    }
}

/// `g / (1 + e^-g) · u`, one element of [`swiglu`].
#[inline(always)]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + math::exp_f32(-g)) * u
}

/// The shape of an ATTENTION launch.
#[derive(Clone, Copy, Debug)]
pub struct GqaShape {
    /// Query rows (consecutive positions).
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Position of query row 0.
    pub pos: usize,
}

/// Causal grouped-query attention: row `r`, head `h` attends to positions `0..=pos+r` of
/// KV head `h / (heads / kv_heads)`. Scores `q·k/√d` are f32 dot products in eight
/// lanes, their exponentials f32 ([`math::exp_f32`]) summed in f64, the weighted sum of
/// values f32 per element in position order; each (row, head) is computed whole by one
/// task.
pub fn attention(pool: &Workers, q: &[f32], kc: &[f32], vc: &[f32], out: &mut [f32], s: GqaShape) {
    let hd = s.head_dim;
    let group = s.heads / s.kv_heads;
    let kv_stride = s.kv_heads * hd;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let head = |i: usize, o: &mut [f32]| {
        let (r, h) = (i / s.heads, i % s.heads);
        let kvh = h / group;
        let one = AttendedHead {
            q: &q[i * hd..][..hd],
            kc: &kc[kvh * hd..],
            vc: &vc[kvh * hd..],
            stride: kv_stride,
            len: s.pos + r + 1,
            scale,
        };
        let _ = attend_task(pool, &one, o);
    };
    let work = s.rows * s.heads * (s.pos + s.rows) * hd;
    heads_of(
        pool,
        &mut out[..s.rows * s.heads * hd],
        hd,
        work > BLOCK,
        head,
    );
}

/// One (row, head) of [`attention`]: its query, and its KV head's keys and values
/// (position `p` at `p · stride`).
pub struct AttendedHead<'a> {
    /// The query.
    pub q: &'a [f32],
    /// The keys, from the KV head's first.
    pub kc: &'a [f32],
    /// The values, from the KV head's first.
    pub vc: &'a [f32],
    /// Elements from one position's key (or value) to the next.
    pub stride: usize,
    /// Positions attended to.
    pub len: usize,
    /// `1/√head_dim`.
    pub scale: f32,
}

/// [`attention`] of one (row, head) into `o`: with the AVX2 code when `allow_avx2` and
/// the CPU has it, else the portable code (the same bits: the tests check it).
pub fn attend(a: &AttendedHead<'_>, o: &mut [f32], allow_avx2: bool) {
    // An unchecked ticker never stops it.
    let _ = attend_ticking(a, o, allow_avx2, &mut Ticker::unchecked());
}

/// Heads wider than this are attended in parts of their width ([`attend_wide`]).
const WIDE_HEAD: usize = CHECK_WORK;

/// [`attend`] as a task of `pool`'s kernel, which checks its switch as it goes: every
/// [`CHECK_WORK`] steps of positions, and within each position for a head wider than
/// [`WIDE_HEAD`] (no model's: a hostile guest's).
fn attend_task(pool: &Workers, a: &AttendedHead<'_>, o: &mut [f32]) -> Result<(), Stopped> {
    if a.q.len() > WIDE_HEAD {
        return attend_wide(pool, a, o);
    }
    attend_ticking(a, o, true, &mut Ticker::new(pool))
}

/// [`attend`], counting its steps on `tick`.
fn attend_ticking(
    a: &AttendedHead<'_>,
    o: &mut [f32],
    allow_avx2: bool,
    tick: &mut Ticker<'_>,
) -> Result<(), Stopped> {
    #[cfg(target_arch = "x86_64")]
    if allow_avx2 && quant::has_avx2() {
        // SAFETY: `has_avx2` said this CPU has AVX2.
        return unsafe { attend_avx2(a, o, tick) };
    }
    let _ = allow_avx2;
    attend_portable(a, o, tick)
}

/// [`attend`] without AVX2: the scores of [`TOGETHER`] positions and their weighted
/// values at a time, so that their independent chains of adds overlap, while each
/// position's operations, and so its bits, are those it has alone.
#[inline(always)]
fn attend_portable(
    a: &AttendedHead<'_>,
    o: &mut [f32],
    tick: &mut Ticker<'_>,
) -> Result<(), Stopped> {
    let hd = a.q.len();
    let key = |p: usize| &a.kc[p * a.stride..][..hd];
    let value = |p: usize| &a.vc[p * a.stride..][..hd];
    let together = a.len / TOGETHER * TOGETHER;
    let mut scores = Vec::with_capacity(a.len);
    for p in (0..together).step_by(TOGETHER) {
        for ahead in 0..TOGETHER {
            prefetch_position(a.kc, (p + POSITIONS_AHEAD + ahead) * a.stride, hd);
        }
        let d = dot8_each::<TOGETHER>(a.q, std::array::from_fn(|j| key(p + j)));
        scores.extend(d.map(|d| d * a.scale));
        tick.done(TOGETHER * hd)?;
    }
    for p in together..a.len {
        scores.push(dot8(a.q, key(p)) * a.scale);
    }
    weights(&mut scores, exps_less);
    o.fill(0.0);
    for p in (0..together).step_by(TOGETHER) {
        for ahead in 0..TOGETHER {
            prefetch_position(a.vc, (p + POSITIONS_AHEAD + ahead) * a.stride, hd);
        }
        add_weighted::<TOGETHER>(
            o,
            &scores[p..p + TOGETHER],
            std::array::from_fn(|j| value(p + j)),
        );
        tick.done(TOGETHER * hd)?;
    }
    for p in together..a.len {
        add_weighted::<1>(o, &scores[p..p + 1], [value(p)]);
    }
    Ok(())
}

/// Attention's scores turned into its weights, in place: `e^(s - max)` (f32), divided by
/// their sum (f64). Positions are at most
/// [`MAX_POSITIONS`](ferry_abi::accel::kernel::MAX_POSITIONS), so this is milliseconds of
/// work at most, not checked.
#[inline(always)]
fn weights(scores: &mut [f32], exps: impl Fn(&mut [f32], f32)) {
    let max = scores
        .iter()
        .fold(f32::NEG_INFINITY, |max, &s| if s > max { s } else { max });
    exps(scores, max);
    let sum = scores.iter().fold(0.0f64, |sum, &s| sum + f64::from(s));
    for w in scores.iter_mut() {
        *w = (f64::from(*w) / sum) as f32;
    }
}

/// `v[i] = e^(v[i] - max)` ([`math::exp_f32`]) for each element.
#[inline(always)]
fn exps_less(v: &mut [f32], max: f32) {
    for v in v {
        *v = math::exp_f32(*v - max);
    }
}

/// [`attend_portable`] for a head wider than [`WIDE_HEAD`], one position at a time, each
/// position's dot product and weighted values in parts of the width with checks between:
/// [`dot8`]'s lanes and [`add_weighted`]'s adds, in their order (a position's operations
/// are those it has in a group; each element of `o` takes the positions' terms in
/// order), so the same bits.
fn attend_wide(pool: &Workers, a: &AttendedHead<'_>, o: &mut [f32]) -> Result<(), Stopped> {
    let (q, hd) = (a.q, a.q.len());
    let done = hd / 8 * 8;
    let mut scores = Vec::with_capacity(a.len);
    for p in 0..a.len {
        let key = &a.kc[p * a.stride..][..hd];
        let mut acc = [0.0f32; 8];
        in_parts_of(pool, done, 8, |r| {
            for c in r.step_by(8) {
                for l in 0..8 {
                    acc[l] += q[c + l] * key[c + l];
                }
            }
        })?;
        scores.push(lanes_sum(acc, tail_dot(&q[done..], &key[done..])) * a.scale);
    }
    weights(&mut scores, exps_less);
    in_parts(pool, hd, |r| o[r].fill(0.0))?;
    for (p, w) in scores.chunks_exact(1).enumerate() {
        let value = &a.vc[p * a.stride..][..hd];
        in_parts(pool, hd, |r| {
            add_weighted::<1>(&mut o[r.clone()], w, [&value[r]]);
        })?;
    }
    Ok(())
}

/// Positions whose scores (and weighted values) attention computes at a time.
const TOGETHER: usize = 4;

/// How many positions ahead the portable attention prefetches keys and values: a KV
/// head's positions are `stride` apart, a pattern the hardware's prefetchers do not
/// follow, so each one's lines were waited for. (The AVX2 code: [`AVX2_AHEAD`].)
const POSITIONS_AHEAD: usize = 4;

/// Prefetches the `hd` f32 of a key or value at `cache[at..]`, if it is there.
#[inline(always)]
fn prefetch_position(cache: &[f32], at: usize, hd: usize) {
    if let Some(v) = cache.get(at..at + hd) {
        for line in v.chunks(16) {
            quant::prefetch(line.as_ptr().cast());
        }
    }
}

/// [`attend_portable`] with AVX2 for the dot products, the exponentials and the weighted
/// sums: the same operations in the same order (Rust never fuses a multiply and an add),
/// so the same bits, eight lanes to an instruction. Eight positions' scores are summed
/// across their lanes in registers, and the output is kept in registers, [`OUT_LANES`]
/// of it at a time, across eight positions' values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_avx2<'c>(
    a: &AttendedHead<'c>,
    o: &mut [f32],
    tick: &mut Ticker<'_>,
) -> Result<(), Stopped> {
    let hd = a.q.len();
    if !hd.is_multiple_of(8) {
        return attend_portable(a, o, tick);
    }
    // Position `p` and the `n - 1` after it, from its first element: `(n - 1) stride + hd`.
    let positions = |cache: &'c [f32], p: usize, n: usize| -> &'c [f32] {
        &cache[p * a.stride..][..(n - 1) * a.stride + hd]
    };
    let eights = a.len / 8 * 8;
    // What `dot8` adds after its lanes: the sum of no elements.
    let tail = tail_dot(&[], &[]);
    let mut scores = vec![0.0f32; a.len];
    for p in (0..eights).step_by(8) {
        for ahead in AVX2_AHEAD..AVX2_AHEAD + 8 {
            prefetch_position(a.kc, (p + ahead) * a.stride, hd);
        }
        let keys = positions(a.kc, p, 8);
        // SAFETY: this runs only where the CPU has AVX2; the width is a multiple of eight,
        // `keys` holds eight keys `stride` apart and `scores[p..]` eight scores.
        unsafe { avx2::scores8(a.q, keys, a.stride, tail, a.scale, &mut scores[p..p + 8]) };
        tick.done(8 * hd)?;
    }
    for (p, score) in scores.iter_mut().enumerate().skip(eights) {
        *score = dot8(a.q, &a.kc[p * a.stride..][..hd]) * a.scale;
    }
    // SAFETY: this runs only where the CPU has AVX2.
    weights(&mut scores, |v, max| unsafe { avx2::exps_less(v, max) });
    o.fill(0.0);
    for (c, part) in o.chunks_mut(OUT_LANES).enumerate() {
        let from = c * OUT_LANES;
        for (p, ws) in scores.chunks(8).enumerate() {
            let p = p * 8;
            for ahead in AVX2_AHEAD..AVX2_AHEAD + 8 {
                prefetch_position(a.vc, (p + ahead) * a.stride + from, part.len());
            }
            let values = &positions(a.vc, p, ws.len())[from..];
            // SAFETY: this runs only where the CPU has AVX2; `part` is a multiple of eight
            // long (as the width is), and `values` holds the `ws.len()` positions' values
            // from `from`, `stride` apart, each at least as long.
            unsafe {
                if part.len() == OUT_LANES {
                    avx2::add_weighted_in_registers::<{ OUT_LANES / 8 }>(part, ws, values, a.stride)
                } else {
                    // The rest of a width that is not a multiple of OUT_LANES (the llama
                    // models' heads are 64 or 128 wide): eight elements at a time.
                    for e in (0..part.len()).step_by(8) {
                        avx2::add_weighted_in_registers::<1>(
                            &mut part[e..],
                            ws,
                            &values[e..],
                            a.stride,
                        )
                    }
                }
            };
            tick.done(ws.len() * part.len())?;
        }
    }
    Ok(())
}

/// Output elements [`attend_avx2`] keeps in registers while it adds the weighted values.
const OUT_LANES: usize = 64;

/// How many positions ahead of a group of eight [`attend_avx2`] prefetches the keys (or
/// values) of another eight: two groups, which `cargo bench --bench attention` found
/// best with the caches cold (8: about 90 M pairs/s at 200 positions, 16: about 115, 32:
/// no better).
const AVX2_AHEAD: usize = 16;

/// `o[i] += w[j] · v[j][i]` for each `j` in order.
#[inline(always)]
fn add_weighted<const N: usize>(o: &mut [f32], w: &[f32], vs: [&[f32]; N]) {
    let vs = vs.map(|v| &v[..o.len()]);
    for (i, out) in o.iter_mut().enumerate() {
        let mut acc = *out;
        for j in 0..N {
            acc += w[j] * vs[j][i];
        }
        *out = acc;
    }
}

/// The sum of `dot8`'s eight lanes, in its fixed order, then its tail.
#[inline(always)]
fn lanes_sum(acc: [f32; 8], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// `a · b` in eight f32 lanes, summed in a fixed order (the tail after them last).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    dot8_each(a, [b])[0]
}

/// [`dot8`] of `a` with each of `bs` (as long as `a`).
#[inline(always)]
fn dot8_each<const N: usize>(a: &[f32], bs: [&[f32]; N]) -> [f32; N] {
    let n = a.len();
    let bs = bs.map(|b| &b[..n]);
    let mut acc = [[0.0f32; 8]; N];
    let done = n / 8 * 8;
    for c in (0..done).step_by(8) {
        let a = &a[c..c + 8];
        for (acc, b) in acc.iter_mut().zip(&bs) {
            let b = &b[c..c + 8];
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
    }
    std::array::from_fn(|j| lanes_sum(acc[j], tail_dot(&a[done..], &bs[j][done..])))
}

/// The dot product of the elements after the last group of eight, in order.
#[inline(always)]
fn tail_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Attention's dot products, exponentials and weighted sums, and SwiGLU, in AVX2
/// registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use ferry_abi::accel::math::{EXP_F32_LN2, EXP_F32_RANGE, EXP_F32_SERIES};

    /// [`super::math::exp_f32`] of eight lanes: its very steps lane by lane (IEEE multiplies and
    /// adds, never fused; the truncating conversion; the integer halving of `k`), with
    /// its special cases (NaN, out of range) chosen after, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn exp8(x: __m256) -> __m256 {
        let splat = _mm256_set1_ps;
        let (low, high) = EXP_F32_RANGE;
        let (ln2_hi, ln2_lo) = EXP_F32_LN2;
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, splat(core::f32::consts::LOG2_E)),
            splat(0.5),
        );
        let ti = _mm256_cvttps_epi32(t);
        // k = ti - 1 where ti > t (a compare's true is all ones: -1).
        let above = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_cvtepi32_ps(ti), t));
        let k = _mm256_add_epi32(ti, above);
        let kf = _mm256_cvtepi32_ps(k);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(kf, splat(ln2_hi))),
            _mm256_mul_ps(kf, splat(ln2_lo)),
        );
        let [first, rest @ ..] = EXP_F32_SERIES;
        let mut p = splat(first);
        for c in rest {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), splat(c));
        }
        // k / 2 rounds toward zero: add the sign bit before the arithmetic shift.
        let k1 = _mm256_srai_epi32::<1>(_mm256_add_epi32(k, _mm256_srli_epi32::<31>(k)));
        let k2 = _mm256_sub_epi32(k, k1);
        let pow2 = |k: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                k,
                _mm256_set1_epi32(127),
            )))
        };
        let e = _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(k2));
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, splat(low));
        let e = _mm256_andnot_ps(below, e);
        let e = _mm256_blendv_ps(
            e,
            splat(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, splat(high)),
        );
        _mm256_blendv_ps(e, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }

    /// [`super::exps_less`], eight elements at a time.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn exps_less(v: &mut [f32], max: f32) {
        let mut eights = v.chunks_exact_mut(8);
        for e in &mut eights {
            // SAFETY: `e` is eight f32; the loads and stores have no alignment requirement.
            unsafe {
                let x = _mm256_sub_ps(_mm256_loadu_ps(e.as_ptr()), _mm256_set1_ps(max));
                _mm256_storeu_ps(e.as_mut_ptr(), exp8(x));
            }
        }
        super::exps_less(eights.into_remainder(), max);
    }

    /// [`super::swiglu_part`], eight elements at a time: `g / (1 + e^-g) · u` with the
    /// negation a flip of the sign bit, as Rust's is.
    ///
    /// # Safety
    /// The CPU has AVX2; `gate` and `up` are at least as long as `out`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let (gate, up) = (&gate[..out.len()], &up[..out.len()]);
        let done = out.len() / 8 * 8;
        for i in (0..done).step_by(8) {
            // SAFETY: `i + 8 <= done`, within all three slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0)));
                let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                let o = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
            }
        }
        for ((o, &g), &u) in out[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
            *o = super::silu_times(g, u);
        }
    }

    /// The scores of eight positions: for each, [`super::dot8`] of `q` with its key (its
    /// lanes summed in registers in `lanes_sum`'s order, `tail` added), times `scale`.
    ///
    /// # Safety
    /// The CPU has AVX2; `q.len()` is a multiple of 8, `keys` holds eight keys as long,
    /// `stride` apart, and `out` holds eight.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn scores8(
        q: &[f32],
        keys: &[f32],
        stride: usize,
        tail: f32,
        scale: f32,
        out: &mut [f32],
    ) {
        // Checked once here, so the loads below need no check each (saturating: a stride
        // too large to count fails the check rather than wrapping past it).
        let keys = &keys[..stride.saturating_mul(7).saturating_add(q.len())];
        let out = &mut out[..8];
        let at = |j: usize, c: usize| keys.as_ptr().wrapping_add(j * stride + c);
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..q.len()).step_by(8) {
            // SAFETY: `c + 8 <= q.len()`, and key `j`'s elements `c..c + 8` are in `keys`.
            unsafe {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(qv, _mm256_loadu_ps(at(j, c))));
                }
            }
        }
        // Lanes l and l + 4 of each: two positions' halves side by side, added.
        let halves = |a, b| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let [a, b, c, d, e, f, g, h] = acc;
        let (ab, cd, ef, gh) = (halves(a, b), halves(c, d), halves(e, f), halves(g, h));
        // Then (0 + 2) and (1 + 3) of each half: [a, a, c, c | b, b, d, d].
        let quarters = |x, y| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
            )
        };
        let (abcd, efgh) = (quarters(ab, cd), quarters(ef, gh));
        // Then the two: [a, c, e, g | b, d, f, h].
        let sums = _mm256_add_ps(
            _mm256_shuffle_ps::<0b10_00_10_00>(abcd, efgh),
            _mm256_shuffle_ps::<0b11_01_11_01>(abcd, efgh),
        );
        let sums = _mm256_add_ps(sums, _mm256_set1_ps(tail));
        let scores = _mm256_mul_ps(sums, _mm256_set1_ps(scale));
        let ordered = _mm256_permutevar8x32_ps(scores, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `out` holds eight f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), ordered) };
    }

    /// [`super::add_weighted`] of the positions whose weights are `w` into `8 N` elements
    /// of the output, held in `N` registers across them.
    ///
    /// # Safety
    /// The CPU has AVX2; `o` holds `8 N` elements, and `values` the `w.len()` positions'
    /// values, `stride` apart, each of `8 N` elements at least.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn add_weighted_in_registers<const N: usize>(
        o: &mut [f32],
        w: &[f32],
        values: &[f32],
        stride: usize,
    ) {
        let o = &mut o[..8 * N];
        let Some(last) = w.len().checked_sub(1) else {
            return;
        };
        // Checked once here, so the loads below need no check each (saturating, as in
        // `scores8`).
        let values = &values[..last.saturating_mul(stride).saturating_add(8 * N)];
        let mut acc = [_mm256_setzero_ps(); N];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `8 r + 8 <= o.len()`.
            *acc = unsafe { _mm256_loadu_ps(o.as_ptr().add(8 * r)) };
        }
        for (j, &w) in w.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            let v = values.as_ptr().wrapping_add(j * stride);
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: position `j`'s elements `8 r..8 r + 8` are in `values`.
                let v = unsafe { _mm256_loadu_ps(v.add(8 * r)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, v));
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: `8 r + 8 <= o.len()`.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * r), *acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::ThreadPoolBuilder;

    use super::*;

    fn workers(threads: usize) -> Workers {
        Workers::new(
            ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn a_matrix_vector_product_stops_within_a_check_of_work_per_thread_once_pulled() {
        // Rows of 256 Q8_0 elements (272 bytes), each byte 1: small finite weights. The
        // product splits them into a run of rows per task, two tasks a thread; each run
        // must check the switch every 32 KiB of weights (120 rows), not once at its end
        // (thousands of rows: a hostile guest's product of 2^20 rows went on for a
        // quarter of a second after an abort that way).
        let (n, k) = (1 << 15, 256);
        let row_bytes = DType::Q8_0.row_bytes(k as u64).unwrap() as usize;
        let per = QMATMUL_TASK_BYTES / row_bytes;
        let w = vec![1u8; n * row_bytes];
        let x = vec![1.0f32; k];
        for threads in [1, 2, 3] {
            for pulled_at in [1, 4, 9] {
                let pool = workers(threads);
                pool.pull_at_check(pulled_at);
                let mut out = vec![f32::NAN; n];
                qmatmul(&pool, DType::Q8_0, &w, &x, &mut out, n, k, 1);
                let done = out.iter().filter(|v| !v.is_nan()).count();
                // Each part of `per` rows follows a check that passed (its task's first,
                // or the one after its part before): `pulled_at - 1` of them. One thread
                // does exactly that many parts; with more, a thread that has not yet seen
                // the pull may do one more.
                let passed = pulled_at as usize - 1;
                if threads == 1 {
                    assert_eq!(done, passed * per, "pulled at check {pulled_at}");
                } else {
                    let most = (passed + threads) * per;
                    assert!(
                        done <= most,
                        "{threads} threads, pulled at check {pulled_at}: {done} rows done, \
                         at most {most} expected"
                    );
                }
            }
        }
        // Not pulled, every row is done.
        let pool = workers(2);
        let mut out = vec![f32::NAN; n];
        qmatmul(&pool, DType::Q8_0, &w, &x, &mut out, n, k, 1);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    /// Each column summed alone: a partial sum per chunk of rows, added in chunk order.
    fn sum_cols_reference(x: &[f32], rows_: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .map(|c| {
                let mut sum = 0.0f64;
                for first_row in (0..rows_).step_by(SUM_ROW_CHUNK) {
                    let mut partial = 0.0f64;
                    for r in first_row..rows_.min(first_row + SUM_ROW_CHUNK) {
                        partial += f64::from(x[r * cols + c]);
                    }
                    sum += partial;
                }
                sum as f32
            })
            .collect()
    }

    #[test]
    fn sum_cols_keeps_at_most_sum_partials_sums_whatever_the_shape() {
        for (rows_, cols) in [
            (256 * 1024, 1),
            (256 * 1024, 7),
            (1, 1),
            (1, 1 << 20),
            (257, 20_000),
            (SUM_ROW_CHUNK * SUM_PARTIALS, 3),
        ] {
            let plan = SumColsPlan::new(rows_, cols);
            assert!(
                plan.sums_kept() <= SUM_PARTIALS,
                "{rows_}×{cols}: {plan:?} keeps {} sums",
                plan.sums_kept()
            );
            assert!(plan.run >= 1 && plan.run <= cols && plan.window >= 1);
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn eight_lane_exponential_has_the_bits_of_the_scalar_one() {
        if !quant::has_avx2() {
            let name = "eight_lane_exponential_has_the_bits_of_the_scalar_one";
            ferry_testdata::cannot_run_here(name, "no AVX2 here");
            return;
        }
        // Every 997th bit pattern (both signs, every exponent: NaNs, infinities,
        // subnormals), the neighbours of the range's ends, and the special values.
        let mut xs: Vec<f32> = (0..=u32::MAX).step_by(997).map(f32::from_bits).collect();
        let (low, high) = math::EXP_F32_RANGE;
        for edge in [low, high, 0.0] {
            xs.extend((-64..=64).map(|d| f32::from_bits(edge.to_bits().wrapping_add_signed(d))));
        }
        xs.extend([
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN,
            f32::MAX,
            f32::NAN,
        ]);
        // Where `x·log2 e + 0.5` is near an integer, so the floor's correction shows.
        for n in -150..130 {
            let x = (n as f32 - 0.5) / core::f32::consts::LOG2_E;
            xs.extend((-4..=4).map(|d| f32::from_bits(x.to_bits().wrapping_add_signed(d))));
        }
        for eight in xs.chunks(8) {
            let mut lanes = [1.0f32; 8];
            lanes[..eight.len()].copy_from_slice(eight);
            let mut got = [0.0f32; 8];
            // SAFETY: `has_avx2` said this CPU has AVX2; both arrays hold eight f32.
            unsafe {
                let x = core::arch::x86_64::_mm256_loadu_ps(lanes.as_ptr());
                core::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(x));
            }
            for (x, got) in lanes.iter().zip(got) {
                let want = math::exp_f32(*x);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "e^{x:e} ({:#x})",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn windowed_sum_cols_has_the_bits_of_one_sum_per_column_in_chunk_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        // 601 chunks of rows over windows (of 255 under test), then runs of columns
        // each in one window.
        let several = (SUM_ROW_CHUNK * 600 + 17, 3);
        let plan = SumColsPlan::new(several.0, several.1);
        assert!(plan.window < plan.chunks, "{plan:?}");
        for (rows_, cols) in [several, (700, 300), (5000, 1)] {
            let x: Vec<f32> = (0..rows_ * cols)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Of many magnitudes, so that the order of additions shows.
                    let value = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    value * 2f32.powi((state % 32) as i32 - 16)
                })
                .collect();
            let want = sum_cols_reference(&x, rows_, cols);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for threads in [1, 3] {
                let mut out = vec![0.0f32; cols];
                sum_cols(&workers(threads), &x, &mut out, rows_, cols);
                assert_eq!(bits(&out), bits(&want), "{rows_}×{cols}, {threads} threads");
            }
        }
    }
}
