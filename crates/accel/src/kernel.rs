//! Typed, validated kernel launches.
//!
//! [`Kernel::decode`] turns the arguments of a LAUNCH command (see
//! [`ferry_abi::accel::kernel`]) into a [`Kernel`] whose buffers exist and are large
//! enough for every element the kernel touches, whose dimensions are non-zero and whose
//! byte sizes fit in a `u64` and a `usize`. The guest is hostile: every product is checked,
//! nothing here panics, and a backend may index buffers with the decoded counts without
//! further checks. Data-dependent conditions (an embedding id beyond the vocabulary, a
//! label beyond the classes) can only be found while running and are the backend's.
//!
//! Checks are made in this order, and the first failing one gives the status:
//! the kernel id ([`status::BAD_KERNEL`]), buffer ids ([`status::BAD_BUFFER`]),
//! dimensions ([`status::BAD_SHAPE`]), flags and scalars ([`status::BAD_ARGUMENT`]),
//! buffer sizes ([`status::OUT_OF_BOUNDS`]), and last aliasing of an output with another
//! buffer the kernel does not document as in place ([`status::BAD_ARGUMENT`]).
//! Arguments a kernel does not use are ignored.

use core::ops::Range;

use ferry_abi::accel::{kernel as k, status};

use crate::backend::BufferId;

/// Bytes of one element (f32 or u32).
const ELEM: u64 = 4;

/// A validated kernel launch. Counts are elements; buffers hold at least what the
/// kernel reads or writes (see [`ferry_abi::accel::kernel`] for each kernel's meaning).
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// `c[m×n] = op(a)·op(b)`, or `+=` with `accumulate`.
    Matmul {
        /// Left operand, `m×k` (stored `k×m` when `transpose_a`).
        a: BufferId,
        /// Right operand, `k×n` (stored `n×k` when `transpose_b`).
        b: BufferId,
        /// Result, `m×n`.
        c: BufferId,
        /// Rows of the result.
        m: usize,
        /// Columns of the result.
        n: usize,
        /// Inner dimension.
        k: usize,
        /// `a` is stored transposed.
        transpose_a: bool,
        /// `b` is stored transposed.
        transpose_b: bool,
        /// Add to `c` instead of overwriting it.
        accumulate: bool,
    },
    /// In place `x[r][c] += bias[c]`.
    AddBias {
        /// Matrix `rows×cols`, updated in place.
        x: BufferId,
        /// Row vector of `cols`.
        bias: BufferId,
        /// Rows of `x`.
        rows: usize,
        /// Columns of `x`.
        cols: usize,
    },
    /// `out = a + b`.
    Add {
        /// First input.
        a: BufferId,
        /// Second input.
        b: BufferId,
        /// Output.
        out: BufferId,
        /// Elements.
        n: usize,
    },
    /// `out = a * b`, elementwise.
    Mul {
        /// First input.
        a: BufferId,
        /// Second input.
        b: BufferId,
        /// Output.
        out: BufferId,
        /// Elements.
        n: usize,
    },
    /// In place `x *= alpha`.
    Scale {
        /// Updated in place.
        x: BufferId,
        /// Elements.
        n: usize,
        /// Factor (finite).
        alpha: f32,
    },
    /// In place `y += alpha * x`.
    Axpy {
        /// Input.
        x: BufferId,
        /// Updated in place.
        y: BufferId,
        /// Elements.
        n: usize,
        /// Factor (finite).
        alpha: f32,
    },
    /// `out = max(x, 0)`.
    Relu {
        /// Input.
        x: BufferId,
        /// Output.
        out: BufferId,
        /// Elements.
        n: usize,
    },
    /// `grad_in = grad_out * (x > 0)`.
    ReluBackward {
        /// Forward input.
        x: BufferId,
        /// Gradient of the output.
        grad_out: BufferId,
        /// Gradient of the input (output).
        grad_in: BufferId,
        /// Elements.
        n: usize,
    },
    /// `out = gelu(x)` (tanh approximation).
    Gelu {
        /// Input.
        x: BufferId,
        /// Output.
        out: BufferId,
        /// Elements.
        n: usize,
    },
    /// `grad_in = grad_out * gelu'(x)`.
    GeluBackward {
        /// Forward input.
        x: BufferId,
        /// Gradient of the output.
        grad_out: BufferId,
        /// Gradient of the input (output).
        grad_in: BufferId,
        /// Elements.
        n: usize,
    },
    /// Row-wise softmax.
    Softmax {
        /// Input `rows×cols`.
        x: BufferId,
        /// Output `rows×cols`.
        out: BufferId,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// Mean cross-entropy of row-wise softmax, and its gradient.
    CrossEntropy {
        /// Input `rows×cols`.
        logits: BufferId,
        /// `rows` u32 class indices.
        labels: BufferId,
        /// Output `rows×cols`: `(softmax - onehot) / rows`.
        grad: BufferId,
        /// Output: one element, the mean loss.
        loss: BufferId,
        /// Rows (samples).
        rows: usize,
        /// Columns (classes).
        cols: usize,
    },
    /// `out[r] = Σ_c x[r][c]`.
    SumRows {
        /// Input `rows×cols`.
        x: BufferId,
        /// Output of `rows`.
        out: BufferId,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// `out[c] = Σ_r x[r][c]`.
    SumCols {
        /// Input `rows×cols`.
        x: BufferId,
        /// Output of `cols`.
        out: BufferId,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// In place `param -= lr * grad`.
    Sgd {
        /// Updated in place.
        param: BufferId,
        /// Gradient.
        grad: BufferId,
        /// Elements.
        n: usize,
        /// Learning rate (finite).
        lr: f32,
    },
    /// Adam update of `param`, `m` and `v` in place.
    Adam {
        /// Updated in place.
        param: BufferId,
        /// Gradient.
        grad: BufferId,
        /// First moment, updated in place.
        m: BufferId,
        /// Second moment, updated in place.
        v: BufferId,
        /// Elements.
        n: usize,
        /// Learning rate (finite).
        lr: f32,
        /// First moment decay, in `[0, 1)`.
        beta1: f32,
        /// Second moment decay, in `[0, 1)`.
        beta2: f32,
        /// Denominator term (finite, > 0).
        eps: f32,
        /// Step number, from 1.
        step: u64,
    },
    /// `out[i] = table[ids[i]]`, `dim` wide.
    Embedding {
        /// `vocab×dim` table.
        table: BufferId,
        /// `count` u32 ids.
        ids: BufferId,
        /// Output `count×dim`.
        out: BufferId,
        /// Ids to look up.
        count: usize,
        /// Row width.
        dim: usize,
        /// Rows of the table.
        vocab: usize,
    },
    /// Row-wise layer norm: `(x - mean) / sqrt(var + eps) * gamma + beta`.
    LayerNorm {
        /// Input `rows×cols`.
        x: BufferId,
        /// Scale, `cols`.
        gamma: BufferId,
        /// Shift, `cols`.
        beta: BufferId,
        /// Output `rows×cols`.
        out: BufferId,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Variance term (finite, > 0).
        eps: f32,
    },
    /// Copies `n` elements.
    Copy {
        /// Source.
        src: BufferId,
        /// First source element.
        src_offset: usize,
        /// Destination (another buffer).
        dst: BufferId,
        /// First destination element.
        dst_offset: usize,
        /// Elements.
        n: usize,
    },
    /// Counter-based random fill: element `i` depends only on `(seed, counter + i)`.
    RngFill {
        /// Output.
        out: BufferId,
        /// Elements.
        n: usize,
        /// Stream seed.
        seed: u64,
        /// Counter of element 0 (wraps).
        counter: u64,
        /// Distribution.
        distribution: Distribution,
        /// Half-width (uniform) or standard deviation (normal); finite, >= 0.
        scale: f32,
    },
    /// One decode step of attention over the first `len` cached positions.
    AttentionDecode {
        /// Queries `heads×head_dim`.
        q: BufferId,
        /// Keys `[positions × heads × head_dim]`.
        k_cache: BufferId,
        /// Values `[positions × heads × head_dim]`.
        v_cache: BufferId,
        /// Output `heads×head_dim`.
        out: BufferId,
        /// Heads.
        heads: usize,
        /// Width of one head.
        head_dim: usize,
        /// Cached positions attended to.
        len: usize,
    },
    /// `out[r] = argmax_c x[r][c]` as u32 (first maximum; a NaN counts as the maximum).
    Argmax {
        /// Input `rows×cols`.
        x: BufferId,
        /// Output: `rows` u32.
        out: BufferId,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
}

/// Distribution of [`Kernel::RngFill`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Uniform in `[-scale, scale)`.
    Uniform,
    /// Normal with mean 0 and standard deviation `scale`.
    Normal,
}

/// Byte range of the first `elems` elements. (Decode checked that the sizes of its
/// kernels fit; saturation only keeps a hand-built [`Kernel`] from panicking here.)
fn bytes(elems: usize) -> Range<u64> {
    0..(elems as u64).saturating_mul(ELEM)
}

/// Byte range of `n` elements from element `offset`.
fn bytes_at(offset: usize, n: usize) -> Range<u64> {
    let start = offset as u64;
    start.saturating_mul(ELEM)..start.saturating_add(n as u64).saturating_mul(ELEM)
}

/// Reads the arguments of one launch, remembering the buffers' sizes.
struct Args<'a, F> {
    args: &'a [u64],
    buffer_len: F,
}

impl<F: Fn(BufferId) -> Option<u64>> Args<'_, F> {
    /// Argument `i` of the kernel (0 = the first after the kernel id); missing ones read 0.
    fn raw(&self, i: usize) -> u64 {
        self.args.get(i + 1).copied().unwrap_or(0)
    }

    /// A buffer id that names an allocated buffer.
    fn buffer(&self, i: usize) -> Result<BufferId, u32> {
        let raw = self.raw(i);
        let id = BufferId::try_from(raw).map_err(|_| status::BAD_BUFFER)?;
        if id == 0 || (self.buffer_len)(id).is_none() {
            return Err(status::BAD_BUFFER);
        }
        Ok(id)
    }

    /// A non-zero dimension.
    fn dim(&self, i: usize) -> Result<usize, u32> {
        match usize::try_from(self.raw(i)) {
            Ok(0) | Err(_) => Err(status::BAD_SHAPE),
            Ok(d) => Ok(d),
        }
    }

    /// An element offset (may be 0).
    fn offset(&self, i: usize) -> Result<usize, u32> {
        usize::try_from(self.raw(i)).map_err(|_| status::OUT_OF_BOUNDS)
    }

    /// An f32 scalar: its bits in the low 32 bits, the high ones zero, a finite value.
    fn scalar(&self, i: usize) -> Result<f32, u32> {
        let bits = u32::try_from(self.raw(i)).map_err(|_| status::BAD_ARGUMENT)?;
        let value = f32::from_bits(bits);
        if value.is_finite() {
            Ok(value)
        } else {
            Err(status::BAD_ARGUMENT)
        }
    }

    /// Checks that buffer `id` holds `elems` elements from element `offset`.
    fn fits(&self, id: BufferId, offset: usize, elems: usize) -> Result<(), u32> {
        let end = (offset as u64)
            .checked_add(elems as u64)
            .and_then(|e| e.checked_mul(ELEM))
            .ok_or(status::OUT_OF_BOUNDS)?;
        // `buffer` checked existence; a buffer freed in between reads as empty.
        let len = (self.buffer_len)(id).unwrap_or(0);
        if end <= len {
            Ok(())
        } else {
            Err(status::OUT_OF_BOUNDS)
        }
    }
}

/// `a * b` as an element count whose byte size fits in a u64 (and so in memory maps).
fn product(a: usize, b: usize) -> Result<usize, u32> {
    let elems = a.checked_mul(b).ok_or(status::BAD_SHAPE)?;
    (elems as u64).checked_mul(ELEM).ok_or(status::BAD_SHAPE)?;
    Ok(elems)
}

/// `a * b * c` as an element count, as [`product`].
fn product3(a: usize, b: usize, c: usize) -> Result<usize, u32> {
    product(product(a, b)?, c)
}

/// A count on its own, as [`product`].
fn count(n: usize) -> Result<usize, u32> {
    product(n, 1)
}

/// Fails when an output buffer is also another argument of the kernel.
fn distinct(outputs: &[BufferId], others: &[BufferId]) -> Result<(), u32> {
    for (i, out) in outputs.iter().enumerate() {
        if outputs[i + 1..].contains(out) || others.contains(out) {
            return Err(status::BAD_ARGUMENT);
        }
    }
    Ok(())
}

impl Kernel {
    /// Validates a LAUNCH command: `args[0]` is the kernel id, the rest its arguments
    /// (missing trailing arguments read as 0). `buffer_len` gives the byte length of an
    /// allocated buffer, `None` for an id that is not allocated. Errors are
    /// [`ferry_abi::accel::status`] codes.
    pub fn decode(
        args: &[u64],
        buffer_len: impl Fn(BufferId) -> Option<u64>,
    ) -> Result<Kernel, u32> {
        let id = args.first().copied().ok_or(status::BAD_KERNEL)?;
        let a = Args { args, buffer_len };
        let kernel = match id {
            k::MATMUL => {
                let (ba, bb, bc) = (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?);
                let (m, n, kd) = (a.dim(3)?, a.dim(4)?, a.dim(5)?);
                let (mk, kn, mn) = (product(m, kd)?, product(kd, n)?, product(m, n)?);
                let flags = a.raw(6);
                if flags & !(k::TRANSPOSE_A | k::TRANSPOSE_B | k::ACCUMULATE) != 0 {
                    return Err(status::BAD_ARGUMENT);
                }
                a.fits(ba, 0, mk)?;
                a.fits(bb, 0, kn)?;
                a.fits(bc, 0, mn)?;
                distinct(&[bc], &[ba, bb])?;
                Kernel::Matmul {
                    a: ba,
                    b: bb,
                    c: bc,
                    m,
                    n,
                    k: kd,
                    transpose_a: flags & k::TRANSPOSE_A != 0,
                    transpose_b: flags & k::TRANSPOSE_B != 0,
                    accumulate: flags & k::ACCUMULATE != 0,
                }
            }
            k::ADD_BIAS => {
                let (x, bias) = (a.buffer(0)?, a.buffer(1)?);
                let (rows, cols) = (a.dim(2)?, a.dim(3)?);
                let elems = product(rows, cols)?;
                a.fits(x, 0, elems)?;
                a.fits(bias, 0, cols)?;
                distinct(&[x], &[bias])?;
                Kernel::AddBias {
                    x,
                    bias,
                    rows,
                    cols,
                }
            }
            k::ADD | k::MUL => {
                let (ba, bb, out) = (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?);
                let n = count(a.dim(3)?)?;
                for buf in [ba, bb, out] {
                    a.fits(buf, 0, n)?;
                }
                distinct(&[out], &[ba, bb])?;
                if id == k::ADD {
                    Kernel::Add {
                        a: ba,
                        b: bb,
                        out,
                        n,
                    }
                } else {
                    Kernel::Mul {
                        a: ba,
                        b: bb,
                        out,
                        n,
                    }
                }
            }
            k::SCALE => {
                let x = a.buffer(0)?;
                let n = count(a.dim(1)?)?;
                let alpha = a.scalar(2)?;
                a.fits(x, 0, n)?;
                Kernel::Scale { x, n, alpha }
            }
            k::AXPY => {
                let (x, y) = (a.buffer(0)?, a.buffer(1)?);
                let n = count(a.dim(2)?)?;
                let alpha = a.scalar(3)?;
                a.fits(x, 0, n)?;
                a.fits(y, 0, n)?;
                distinct(&[y], &[x])?;
                Kernel::Axpy { x, y, n, alpha }
            }
            k::RELU | k::GELU => {
                let (x, out) = (a.buffer(0)?, a.buffer(1)?);
                let n = count(a.dim(2)?)?;
                a.fits(x, 0, n)?;
                a.fits(out, 0, n)?;
                distinct(&[out], &[x])?;
                if id == k::RELU {
                    Kernel::Relu { x, out, n }
                } else {
                    Kernel::Gelu { x, out, n }
                }
            }
            k::RELU_BACKWARD | k::GELU_BACKWARD => {
                let (x, grad_out, grad_in) = (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?);
                let n = count(a.dim(3)?)?;
                for buf in [x, grad_out, grad_in] {
                    a.fits(buf, 0, n)?;
                }
                distinct(&[grad_in], &[x, grad_out])?;
                if id == k::RELU_BACKWARD {
                    Kernel::ReluBackward {
                        x,
                        grad_out,
                        grad_in,
                        n,
                    }
                } else {
                    Kernel::GeluBackward {
                        x,
                        grad_out,
                        grad_in,
                        n,
                    }
                }
            }
            k::SOFTMAX | k::SUM_ROWS | k::SUM_COLS | k::ARGMAX => {
                let (x, out) = (a.buffer(0)?, a.buffer(1)?);
                let (rows, cols) = (a.dim(2)?, a.dim(3)?);
                let elems = product(rows, cols)?;
                if id == k::ARGMAX && u32::try_from(cols - 1).is_err() {
                    // Indices are u32.
                    return Err(status::BAD_SHAPE);
                }
                a.fits(x, 0, elems)?;
                let out_elems = match id {
                    k::SOFTMAX => elems,
                    k::SUM_COLS => cols,
                    _ => rows,
                };
                a.fits(out, 0, out_elems)?;
                distinct(&[out], &[x])?;
                match id {
                    k::SOFTMAX => Kernel::Softmax { x, out, rows, cols },
                    k::SUM_ROWS => Kernel::SumRows { x, out, rows, cols },
                    k::SUM_COLS => Kernel::SumCols { x, out, rows, cols },
                    _ => Kernel::Argmax { x, out, rows, cols },
                }
            }
            k::CROSS_ENTROPY => {
                let (logits, labels) = (a.buffer(0)?, a.buffer(1)?);
                let (grad, loss) = (a.buffer(2)?, a.buffer(3)?);
                let (rows, cols) = (a.dim(4)?, a.dim(5)?);
                let elems = product(rows, cols)?;
                if u32::try_from(cols).is_err() {
                    // Labels are u32: more classes could never be named.
                    return Err(status::BAD_SHAPE);
                }
                a.fits(logits, 0, elems)?;
                a.fits(labels, 0, rows)?;
                a.fits(grad, 0, elems)?;
                a.fits(loss, 0, 1)?;
                distinct(&[grad, loss], &[logits, labels])?;
                Kernel::CrossEntropy {
                    logits,
                    labels,
                    grad,
                    loss,
                    rows,
                    cols,
                }
            }
            k::SGD => {
                let (param, grad) = (a.buffer(0)?, a.buffer(1)?);
                let n = count(a.dim(2)?)?;
                let lr = a.scalar(3)?;
                a.fits(param, 0, n)?;
                a.fits(grad, 0, n)?;
                distinct(&[param], &[grad])?;
                Kernel::Sgd { param, grad, n, lr }
            }
            k::ADAM => {
                let (param, grad, m, v) = (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?, a.buffer(3)?);
                let n = count(a.dim(4)?)?;
                let (lr, beta1, beta2, eps) =
                    (a.scalar(5)?, a.scalar(6)?, a.scalar(7)?, a.scalar(8)?);
                let step = a.raw(9);
                let decay = 0.0..1.0;
                if !decay.contains(&beta1) || !decay.contains(&beta2) || eps <= 0.0 || step == 0 {
                    return Err(status::BAD_ARGUMENT);
                }
                for buf in [param, grad, m, v] {
                    a.fits(buf, 0, n)?;
                }
                distinct(&[param, m, v], &[grad])?;
                Kernel::Adam {
                    param,
                    grad,
                    m,
                    v,
                    n,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    step,
                }
            }
            k::EMBEDDING => {
                let (table, ids, out) = (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?);
                let (count, dim, vocab) = (a.dim(3)?, a.dim(4)?, a.dim(5)?);
                let (out_elems, table_elems) = (product(count, dim)?, product(vocab, dim)?);
                a.fits(table, 0, table_elems)?;
                a.fits(ids, 0, count)?;
                a.fits(out, 0, out_elems)?;
                distinct(&[out], &[table, ids])?;
                Kernel::Embedding {
                    table,
                    ids,
                    out,
                    count,
                    dim,
                    vocab,
                }
            }
            k::LAYER_NORM => {
                let (x, gamma, beta, out) =
                    (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?, a.buffer(3)?);
                let (rows, cols) = (a.dim(4)?, a.dim(5)?);
                let elems = product(rows, cols)?;
                let eps = a.scalar(6)?;
                if eps <= 0.0 {
                    return Err(status::BAD_ARGUMENT);
                }
                a.fits(x, 0, elems)?;
                a.fits(gamma, 0, cols)?;
                a.fits(beta, 0, cols)?;
                a.fits(out, 0, elems)?;
                distinct(&[out], &[x, gamma, beta])?;
                Kernel::LayerNorm {
                    x,
                    gamma,
                    beta,
                    out,
                    rows,
                    cols,
                    eps,
                }
            }
            k::COPY => {
                let (src, dst) = (a.buffer(0)?, a.buffer(2)?);
                let n = count(a.dim(4)?)?;
                let (src_offset, dst_offset) = (a.offset(1)?, a.offset(3)?);
                a.fits(src, src_offset, n)?;
                a.fits(dst, dst_offset, n)?;
                distinct(&[dst], &[src])?;
                Kernel::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    n,
                }
            }
            k::RNG_FILL => {
                let out = a.buffer(0)?;
                let n = count(a.dim(1)?)?;
                let (seed, counter) = (a.raw(2), a.raw(3));
                let distribution = match a.raw(4) {
                    0 => Distribution::Uniform,
                    1 => Distribution::Normal,
                    _ => return Err(status::BAD_ARGUMENT),
                };
                let scale = a.scalar(5)?;
                if scale < 0.0 {
                    return Err(status::BAD_ARGUMENT);
                }
                a.fits(out, 0, n)?;
                Kernel::RngFill {
                    out,
                    n,
                    seed,
                    counter,
                    distribution,
                    scale,
                }
            }
            k::ATTENTION_DECODE => {
                let (q, k_cache, v_cache, out) =
                    (a.buffer(0)?, a.buffer(1)?, a.buffer(2)?, a.buffer(3)?);
                let (heads, head_dim, len) = (a.dim(4)?, a.dim(5)?, a.dim(6)?);
                let (row, cache) = (product(heads, head_dim)?, product3(len, heads, head_dim)?);
                a.fits(q, 0, row)?;
                a.fits(k_cache, 0, cache)?;
                a.fits(v_cache, 0, cache)?;
                a.fits(out, 0, row)?;
                distinct(&[out], &[q, k_cache, v_cache])?;
                Kernel::AttentionDecode {
                    q,
                    k_cache,
                    v_cache,
                    out,
                    heads,
                    head_dim,
                    len,
                }
            }
            _ => return Err(status::BAD_KERNEL),
        };
        Ok(kernel)
    }

    /// The exact byte ranges the kernel writes, per buffer.
    pub fn writes(&self) -> Vec<(BufferId, Range<u64>)> {
        match *self {
            Kernel::Matmul { c, m, n, .. } => vec![(c, bytes(m.saturating_mul(n)))],
            Kernel::AddBias { x, rows, cols, .. } => vec![(x, bytes(rows.saturating_mul(cols)))],
            Kernel::Add { out, n, .. }
            | Kernel::Mul { out, n, .. }
            | Kernel::Scale { x: out, n, .. }
            | Kernel::Axpy { y: out, n, .. }
            | Kernel::Relu { out, n, .. }
            | Kernel::Gelu { out, n, .. }
            | Kernel::ReluBackward {
                grad_in: out, n, ..
            }
            | Kernel::GeluBackward {
                grad_in: out, n, ..
            }
            | Kernel::Sgd { param: out, n, .. }
            | Kernel::RngFill { out, n, .. } => vec![(out, bytes(n))],
            Kernel::Softmax {
                out, rows, cols, ..
            } => vec![(out, bytes(rows.saturating_mul(cols)))],
            Kernel::CrossEntropy {
                grad,
                loss,
                rows,
                cols,
                ..
            } => {
                vec![(grad, bytes(rows.saturating_mul(cols))), (loss, bytes(1))]
            }
            Kernel::SumRows { out, rows, .. } | Kernel::Argmax { out, rows, .. } => {
                vec![(out, bytes(rows))]
            }
            Kernel::SumCols { out, cols, .. } => vec![(out, bytes(cols))],
            Kernel::Adam { param, m, v, n, .. } => {
                vec![(param, bytes(n)), (m, bytes(n)), (v, bytes(n))]
            }
            Kernel::Embedding {
                out, count, dim, ..
            } => vec![(out, bytes(count.saturating_mul(dim)))],
            Kernel::LayerNorm {
                out, rows, cols, ..
            } => vec![(out, bytes(rows.saturating_mul(cols)))],
            Kernel::Copy {
                dst, dst_offset, n, ..
            } => vec![(dst, bytes_at(dst_offset, n))],
            Kernel::AttentionDecode {
                out,
                heads,
                head_dim,
                ..
            } => {
                vec![(out, bytes(heads.saturating_mul(head_dim)))]
            }
        }
    }

    /// The buffers the kernel reads (in-place outputs included), without repeats.
    pub fn reads(&self) -> Vec<BufferId> {
        let mut ids = match *self {
            Kernel::Matmul {
                a,
                b,
                c,
                accumulate,
                ..
            } => {
                if accumulate {
                    vec![a, b, c]
                } else {
                    vec![a, b]
                }
            }
            Kernel::AddBias { x, bias, .. } => vec![x, bias],
            Kernel::Add { a, b, .. } | Kernel::Mul { a, b, .. } => vec![a, b],
            Kernel::Scale { x, .. }
            | Kernel::Relu { x, .. }
            | Kernel::Gelu { x, .. }
            | Kernel::Softmax { x, .. }
            | Kernel::SumRows { x, .. }
            | Kernel::SumCols { x, .. }
            | Kernel::Argmax { x, .. } => vec![x],
            Kernel::Axpy { x, y, .. } => vec![x, y],
            Kernel::ReluBackward { x, grad_out, .. } | Kernel::GeluBackward { x, grad_out, .. } => {
                vec![x, grad_out]
            }
            Kernel::CrossEntropy { logits, labels, .. } => vec![logits, labels],
            Kernel::Sgd { param, grad, .. } => vec![param, grad],
            Kernel::Adam {
                param, grad, m, v, ..
            } => vec![param, grad, m, v],
            Kernel::Embedding { table, ids, .. } => vec![table, ids],
            Kernel::LayerNorm { x, gamma, beta, .. } => vec![x, gamma, beta],
            Kernel::Copy { src, .. } => vec![src],
            Kernel::RngFill { .. } => vec![],
            Kernel::AttentionDecode {
                q,
                k_cache,
                v_cache,
                ..
            } => vec![q, k_cache, v_cache],
        };
        let mut seen = Vec::with_capacity(ids.len());
        ids.retain(|id| {
            let new = !seen.contains(id);
            seen.push(*id);
            new
        });
        ids
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ferry_abi::accel::COMMAND_ARGS;

    use super::*;

    /// Buffers 1..=8 of 4096 bytes, 9 of 4 bytes, 10 of 64 KiB.
    fn lens() -> HashMap<BufferId, u64> {
        let mut m: HashMap<BufferId, u64> = (1..=8).map(|id| (id, 4096)).collect();
        m.insert(9, 4);
        m.insert(10, 65536);
        m
    }

    fn dec(args: &[u64]) -> Result<Kernel, u32> {
        let lens = lens();
        let mut full = [0u64; COMMAND_ARGS];
        full[..args.len()].copy_from_slice(args);
        Kernel::decode(&full, |id| lens.get(&id).copied())
    }

    fn f(x: f32) -> u64 {
        u64::from(x.to_bits())
    }

    #[test]
    fn unknown_kernels() {
        assert_eq!(dec(&[0]), Err(status::BAD_KERNEL));
        assert_eq!(dec(&[23, 1, 2, 3, 4]), Err(status::BAD_KERNEL));
        assert_eq!(dec(&[u64::MAX]), Err(status::BAD_KERNEL));
        assert_eq!(Kernel::decode(&[], |_| Some(4096)), Err(status::BAD_KERNEL));
    }

    #[test]
    fn accepts_good_launches() {
        let mm = dec(&[k::MATMUL, 1, 2, 3, 4, 5, 6, k::TRANSPOSE_B | k::ACCUMULATE]).unwrap();
        assert_eq!(
            mm,
            Kernel::Matmul {
                a: 1,
                b: 2,
                c: 3,
                m: 4,
                n: 5,
                k: 6,
                transpose_a: false,
                transpose_b: true,
                accumulate: true
            }
        );
        assert_eq!(mm.writes(), vec![(3, 0..80)]);
        assert_eq!(mm.reads(), vec![1, 2, 3]);
        // Both operands may be the same buffer.
        assert!(dec(&[k::MATMUL, 1, 1, 3, 32, 32, 32, 0]).is_ok());
        // Exactly full buffers.
        assert!(dec(&[k::MATMUL, 1, 2, 3, 32, 32, 32, 0]).is_ok());
        let copy = dec(&[k::COPY, 1, 3, 2, 5, 7]).unwrap();
        assert_eq!(copy.writes(), vec![(2, 20..48)]);
        assert_eq!(copy.reads(), vec![1]);
        let ce = dec(&[k::CROSS_ENTROPY, 1, 2, 3, 9, 4, 10]).unwrap();
        assert_eq!(ce.writes(), vec![(3, 0..160), (9, 0..4)]);
        let adam = dec(&[
            k::ADAM,
            1,
            2,
            3,
            4,
            100,
            f(1e-3),
            f(0.9),
            f(0.999),
            f(1e-8),
            1,
        ])
        .unwrap();
        assert_eq!(adam.writes(), vec![(1, 0..400), (3, 0..400), (4, 0..400)]);
        assert_eq!(adam.reads(), vec![1, 2, 3, 4]);
        let rng = dec(&[k::RNG_FILL, 5, 1024, u64::MAX, u64::MAX, 1, f(0.02)]).unwrap();
        assert_eq!(rng.writes(), vec![(5, 0..4096)]);
        assert!(rng.reads().is_empty());
        let att = dec(&[k::ATTENTION_DECODE, 1, 10, 10, 2, 4, 16, 256]).unwrap();
        assert_eq!(att.writes(), vec![(2, 0..256)]);
        assert_eq!(att.reads(), vec![1, 10]);
        let emb = dec(&[k::EMBEDDING, 10, 1, 2, 8, 16, 1024]).unwrap();
        assert_eq!(emb.writes(), vec![(2, 0..512)]);
        let ln = dec(&[k::LAYER_NORM, 1, 2, 3, 4, 8, 128, f(1e-5)]).unwrap();
        assert_eq!(ln.writes(), vec![(4, 0..4096)]);
        assert_eq!(
            dec(&[k::SUM_COLS, 1, 9, 1000, 1]).unwrap().writes(),
            vec![(9, 0..4)]
        );
        assert_eq!(
            dec(&[k::ARGMAX, 1, 2, 4, 256]).unwrap().writes(),
            vec![(2, 0..16)]
        );
        assert_eq!(
            dec(&[k::SCALE, 1, 1024, f(-2.0)]).unwrap().writes(),
            vec![(1, 0..4096)]
        );
        assert_eq!(
            dec(&[k::AXPY, 1, 2, 3, f(0.5)]).unwrap().writes(),
            vec![(2, 0..12)]
        );
        assert!(dec(&[k::SGD, 1, 2, 1024, f(0.1)]).is_ok());
        for id in [k::ADD, k::MUL] {
            assert!(dec(&[id, 1, 1, 2, 1024]).is_ok());
        }
        for id in [k::RELU, k::GELU] {
            assert_eq!(dec(&[id, 1, 2, 7]).unwrap().writes(), vec![(2, 0..28)]);
        }
        for id in [k::RELU_BACKWARD, k::GELU_BACKWARD] {
            assert_eq!(dec(&[id, 1, 2, 3, 7]).unwrap().writes(), vec![(3, 0..28)]);
        }
        assert!(dec(&[k::ADD_BIAS, 1, 2, 4, 256]).is_ok());
        assert!(dec(&[k::SOFTMAX, 1, 2, 4, 256]).is_ok());
        assert!(dec(&[k::SUM_ROWS, 1, 2, 4, 256]).is_ok());
    }

    #[test]
    fn rejects_bad_buffers() {
        for bad in [
            0,
            11,
            4096,
            4097,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            assert_eq!(
                dec(&[k::MATMUL, bad, 2, 3, 4, 4, 4, 0]),
                Err(status::BAD_BUFFER)
            );
            assert_eq!(
                dec(&[k::MATMUL, 1, 2, bad, 4, 4, 4, 0]),
                Err(status::BAD_BUFFER)
            );
            assert_eq!(dec(&[k::COPY, 1, 0, bad, 0, 4]), Err(status::BAD_BUFFER));
            assert_eq!(
                dec(&[k::RNG_FILL, bad, 4, 0, 0, 0, 0]),
                Err(status::BAD_BUFFER)
            );
            assert_eq!(
                dec(&[k::ATTENTION_DECODE, 1, 2, 3, bad, 1, 1, 1]),
                Err(status::BAD_BUFFER)
            );
        }
    }

    #[test]
    fn rejects_hostile_shapes() {
        let max = u64::MAX;
        // Zero dimensions.
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 0, 4, 4, 0]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(dec(&[k::ADD, 1, 2, 3, 0]), Err(status::BAD_SHAPE));
        assert_eq!(dec(&[k::COPY, 1, 0, 2, 0, 0]), Err(status::BAD_SHAPE));
        // u64::MAX everywhere.
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, max, max, max, 0]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(dec(&[k::ADD, 1, 2, 3, max]), Err(status::BAD_SHAPE));
        assert_eq!(dec(&[k::SCALE, 1, max, 0]), Err(status::BAD_SHAPE));
        // n * 4 overflows though n fits.
        assert_eq!(dec(&[k::RELU, 1, 2, 1 << 62]), Err(status::BAD_SHAPE));
        assert_eq!(
            dec(&[k::RNG_FILL, 1, max / 4 + 1, 0, 0, 0, 0]),
            Err(status::BAD_SHAPE)
        );
        // m * n * 4 overflows while each of m, n is small enough.
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 1 << 31, 1 << 31, 1, 0]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 1 << 32, 1 << 32, 1, 0]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(
            dec(&[k::SOFTMAX, 1, 2, 1 << 40, 1 << 30]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(
            dec(&[k::SUM_COLS, 1, 2, 1 << 40, 1 << 30]),
            Err(status::BAD_SHAPE)
        );
        // Three-way products.
        assert_eq!(
            dec(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 1 << 21, 1 << 21, 1 << 21]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(
            dec(&[k::EMBEDDING, 1, 2, 3, 1, 1 << 62, 1]),
            Err(status::BAD_SHAPE)
        );
        assert_eq!(
            dec(&[k::CROSS_ENTROPY, 1, 2, 3, 4, 1, 1 << 32]),
            Err(status::BAD_SHAPE)
        );
    }

    #[test]
    fn rejects_out_of_bounds() {
        // 4096-byte buffers hold 1024 elements.
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 32, 33, 32, 0]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::MATMUL, 10, 10, 3, 16, 128, 16, 0]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(dec(&[k::ADD, 1, 2, 3, 1025]), Err(status::OUT_OF_BOUNDS));
        assert_eq!(dec(&[k::ADD, 10, 10, 3, 2048]), Err(status::OUT_OF_BOUNDS));
        assert_eq!(
            dec(&[k::COPY, 1, 1, 2, 0, 1024]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::COPY, 1, 0, 2, 1, 1024]),
            Err(status::OUT_OF_BOUNDS)
        );
        // Offsets that overflow when added or scaled.
        assert_eq!(
            dec(&[k::COPY, 1, u64::MAX, 2, 0, 1]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::COPY, 1, 0, 2, u64::MAX - 1, 2]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::COPY, 1, 1 << 62, 2, 0, 1]),
            Err(status::OUT_OF_BOUNDS)
        );
        // The loss needs one element; the labels `rows`.
        assert_eq!(
            dec(&[k::CROSS_ENTROPY, 1, 2, 3, 9, 2, 16]),
            Ok(Kernel::CrossEntropy {
                logits: 1,
                labels: 2,
                grad: 3,
                loss: 9,
                rows: 2,
                cols: 16,
            })
        );
        assert_eq!(
            dec(&[k::CROSS_ENTROPY, 1, 9, 3, 4, 2, 16]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::EMBEDDING, 1, 2, 3, 4, 16, 65]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::LAYER_NORM, 1, 9, 2, 3, 4, 16, f(1e-5)]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::ATTENTION_DECODE, 1, 2, 3, 4, 4, 16, 17]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::SUM_ROWS, 1, 9, 2, 512]),
            Err(status::OUT_OF_BOUNDS)
        );
        assert_eq!(
            dec(&[k::ADD_BIAS, 1, 9, 2, 512]),
            Err(status::OUT_OF_BOUNDS)
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        // Unknown MATMUL flags.
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 4, 4, 4, 8]),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(
            dec(&[k::MATMUL, 1, 2, 3, 4, 4, 4, u64::MAX]),
            Err(status::BAD_ARGUMENT)
        );
        // Non-finite scalars, and bits above the low 32.
        for bad in [
            f(f32::NAN),
            f(f32::INFINITY),
            f(f32::NEG_INFINITY),
            1 << 32,
            u64::MAX,
        ] {
            assert_eq!(dec(&[k::SCALE, 1, 4, bad]), Err(status::BAD_ARGUMENT));
            assert_eq!(dec(&[k::SGD, 1, 2, 4, bad]), Err(status::BAD_ARGUMENT));
            assert_eq!(
                dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, bad]),
                Err(status::BAD_ARGUMENT)
            );
        }
        // eps must be > 0.
        assert_eq!(
            dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, 0]),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(
            dec(&[k::LAYER_NORM, 1, 2, 3, 4, 4, 4, f(-1e-5)]),
            Err(status::BAD_ARGUMENT)
        );
        // Adam: step 0, betas outside [0, 1), eps <= 0.
        let adam = |lr: f32, b1: f32, b2: f32, eps: f32, step: u64| {
            dec(&[k::ADAM, 1, 2, 3, 4, 16, f(lr), f(b1), f(b2), f(eps), step])
        };
        assert!(adam(1e-3, 0.9, 0.999, 1e-8, 1).is_ok());
        assert!(adam(1e-3, 0.0, 0.0, 1e-8, u64::MAX).is_ok());
        assert_eq!(adam(1e-3, 0.9, 0.999, 1e-8, 0), Err(status::BAD_ARGUMENT));
        assert_eq!(adam(1e-3, 1.0, 0.999, 1e-8, 1), Err(status::BAD_ARGUMENT));
        assert_eq!(adam(1e-3, 0.9, -0.1, 1e-8, 1), Err(status::BAD_ARGUMENT));
        assert_eq!(adam(1e-3, 0.9, 0.999, 0.0, 1), Err(status::BAD_ARGUMENT));
        assert_eq!(
            adam(f32::NAN, 0.9, 0.999, 1e-8, 1),
            Err(status::BAD_ARGUMENT)
        );
        // RNG: unknown distribution, negative scale.
        assert_eq!(
            dec(&[k::RNG_FILL, 1, 4, 0, 0, 2, f(1.0)]),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(
            dec(&[k::RNG_FILL, 1, 4, 0, 0, u64::MAX, f(1.0)]),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(
            dec(&[k::RNG_FILL, 1, 4, 0, 0, 0, f(-1.0)]),
            Err(status::BAD_ARGUMENT)
        );
    }

    #[test]
    fn rejects_aliasing() {
        let bad = Err(status::BAD_ARGUMENT);
        assert_eq!(dec(&[k::MATMUL, 1, 2, 1, 4, 4, 4, 0]), bad);
        assert_eq!(dec(&[k::MATMUL, 1, 2, 2, 4, 4, 4, k::ACCUMULATE]), bad);
        assert_eq!(dec(&[k::ADD_BIAS, 1, 1, 4, 4]), bad);
        assert_eq!(dec(&[k::ADD, 1, 2, 1, 4]), bad);
        assert_eq!(dec(&[k::MUL, 1, 2, 2, 4]), bad);
        assert_eq!(dec(&[k::AXPY, 1, 1, 4, f(1.0)]), bad);
        assert_eq!(dec(&[k::RELU, 1, 1, 4]), bad);
        assert_eq!(dec(&[k::GELU_BACKWARD, 1, 2, 2, 4]), bad);
        assert_eq!(dec(&[k::RELU_BACKWARD, 1, 2, 1, 4]), bad);
        assert_eq!(dec(&[k::SOFTMAX, 1, 1, 4, 4]), bad);
        assert_eq!(dec(&[k::CROSS_ENTROPY, 1, 2, 3, 3, 2, 2]), bad);
        assert_eq!(dec(&[k::CROSS_ENTROPY, 1, 2, 1, 4, 2, 2]), bad);
        assert_eq!(dec(&[k::CROSS_ENTROPY, 1, 2, 3, 2, 2, 2]), bad);
        assert_eq!(dec(&[k::SGD, 1, 1, 4, f(0.1)]), bad);
        assert_eq!(
            dec(&[
                k::ADAM,
                1,
                2,
                3,
                3,
                16,
                f(1e-3),
                f(0.9),
                f(0.999),
                f(1e-8),
                1
            ]),
            bad
        );
        assert_eq!(
            dec(&[
                k::ADAM,
                1,
                2,
                2,
                4,
                16,
                f(1e-3),
                f(0.9),
                f(0.999),
                f(1e-8),
                1
            ]),
            bad
        );
        assert_eq!(dec(&[k::EMBEDDING, 1, 2, 2, 4, 4, 4]), bad);
        assert_eq!(dec(&[k::LAYER_NORM, 1, 2, 3, 3, 4, 4, f(1e-5)]), bad);
        assert_eq!(dec(&[k::COPY, 1, 0, 1, 8, 4]), bad);
        assert_eq!(dec(&[k::ATTENTION_DECODE, 1, 2, 3, 2, 1, 4, 4]), bad);
        assert_eq!(dec(&[k::ARGMAX, 1, 1, 4, 4]), bad);
        // Inputs may be shared.
        assert!(dec(&[k::ADD, 1, 1, 2, 4]).is_ok());
        assert!(dec(&[k::ATTENTION_DECODE, 1, 2, 2, 3, 1, 4, 4]).is_ok());
    }

    #[test]
    fn never_panics_on_garbage() {
        // A deterministic sweep of hostile argument patterns through every kernel id.
        let values = [
            0,
            1,
            2,
            3,
            4,
            9,
            10,
            11,
            1023,
            1024,
            1025,
            1 << 31,
            1 << 32,
            1 << 62,
            u64::MAX,
        ];
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut args = [0u64; COMMAND_ARGS];
            for slot in &mut args {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *slot = values[(state >> 33) as usize % values.len()];
            }
            args[0] = (state >> 20) % 24;
            if let Ok(kernel) = dec(&args) {
                let lens = lens();
                for (id, range) in kernel.writes() {
                    assert!(
                        range.start < range.end && range.end <= lens[&id],
                        "{kernel:?}"
                    );
                }
                for id in kernel.reads() {
                    assert!(lens.contains_key(&id));
                }
            }
        }
    }
}
