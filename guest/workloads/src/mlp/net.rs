//! The multi-layer perceptron of the training guests (`mlp-train`, `fmnist-train`):
//! fully connected layers with ReLU between them, trained by backpropagation, every step
//! queued on the accelerator.

use ferry_sdk::accel::{Accel, AccelError, Adam, Distribution, Tensor, Transpose};
use ferry_sdk::checksum::Fnv1a;
use ferry_sdk::prelude::*;

/// One trainable tensor with its gradient and, for Adam, its moments.
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
    moments: Option<(Tensor, Tensor)>,
}

impl Param {
    /// A zero-filled `rows × cols` parameter, with moments if it is trained by Adam
    /// rather than SGD.
    fn new(acc: &mut Accel, rows: usize, cols: usize, adam: bool) -> Result<Param, AccelError> {
        let value = acc.alloc(rows, cols)?;
        let grad = acc.alloc(rows, cols)?;
        let moments = if adam {
            Some((acc.alloc(rows, cols)?, acc.alloc(rows, cols)?))
        } else {
            None
        };
        Ok(Param {
            value,
            grad,
            moments,
        })
    }

    /// Queues one step of its optimizer with learning rate `lr` (`step` counts from 1).
    fn update(&mut self, acc: &mut Accel, lr: f32, step: u64) {
        match &mut self.moments {
            Some((m, v)) => acc.adam(&mut self.value, &self.grad, m, v, &Adam::new(lr), step),
            None => acc.sgd(&mut self.value, &self.grad, lr),
        }
    }
}

/// A fully connected layer `out = in · w + b`, `w` stored `fan_in × fan_out`.
pub struct Linear {
    pub w: Param,
    pub b: Param,
}

impl Linear {
    /// A layer with weights drawn from the normal distribution of standard deviation
    /// `std` (RNG stream `seed`) and zero biases (buffers are zero-filled).
    pub fn new(
        acc: &mut Accel,
        (fan_in, fan_out): (usize, usize),
        adam: bool,
        seed: u64,
        std: f32,
    ) -> Result<Linear, AccelError> {
        let mut layer = Linear {
            w: Param::new(acc, fan_in, fan_out, adam)?,
            b: Param::new(acc, 1, fan_out, adam)?,
        };
        acc.rng_fill(&mut layer.w.value, seed, 0, Distribution::Normal(std));
        Ok(layer)
    }
}

/// The activations of a forward pass over `rows` rows: pre-activations `z` and outputs
/// `h` of each hidden layer, and the logits.
pub struct Activations {
    pub z: Vec<Tensor>,
    pub h: Vec<Tensor>,
    pub logits: Tensor,
}

impl Activations {
    pub fn new(
        acc: &mut Accel,
        rows: usize,
        hidden: &[usize],
        classes: usize,
    ) -> Result<Self, AccelError> {
        Ok(Activations {
            z: alloc_widths(acc, rows, hidden)?,
            h: alloc_widths(acc, rows, hidden)?,
            logits: acc.alloc(rows, classes)?,
        })
    }
}

/// Queues `a = net(x)`.
pub fn forward(acc: &mut Accel, net: &[Linear], x: &Tensor, a: &mut Activations) {
    let l = net.len() - 1;
    for (i, layer) in net.iter().enumerate() {
        let input = if i == 0 { x } else { &a.h[i - 1] };
        let out = if i < l { &mut a.z[i] } else { &mut a.logits };
        acc.matmul(input, &layer.w.value, out, Transpose::None);
        acc.add_bias(out, &layer.b.value);
        if i < l {
            acc.relu(&a.z[i], &mut a.h[i]);
        }
    }
}

/// Queues the gradients of every weight and bias of `net`, given `a = net(x)` and the
/// gradient `dlogits` of the logits; `dh` and `dz` are scratch shaped as `a.h`.
pub fn backward(
    acc: &mut Accel,
    net: &mut [Linear],
    x: &Tensor,
    a: &Activations,
    dlogits: &Tensor,
    dh: &mut [Tensor],
    dz: &mut [Tensor],
) {
    // Layer i's output gradient is dlogits (last) or dz[i].
    let l = net.len() - 1;
    for i in (0..=l).rev() {
        let input = if i == 0 { x } else { &a.h[i - 1] };
        let (below, from_here) = dz.split_at_mut(i);
        let grad_out = if i == l { dlogits } else { &from_here[0] };
        let layer = &mut net[i];
        acc.matmul(input, grad_out, &mut layer.w.grad, Transpose::A);
        acc.sum_cols(grad_out, &mut layer.b.grad);
        if i > 0 {
            acc.matmul(grad_out, &layer.w.value, &mut dh[i - 1], Transpose::B);
            acc.relu_backward(&a.z[i - 1], &dh[i - 1], &mut below[i - 1]);
        }
    }
}

/// Queues an update of every weight and bias with learning rate `lr`.
pub fn update(acc: &mut Accel, net: &mut [Linear], lr: f32, step: u64) {
    for layer in net {
        layer.w.update(acc, lr, step);
        layer.b.update(acc, lr, step);
    }
}

/// FNV-1a over the bytes of every weight and bias, layer by layer (w then b).
pub fn checksum(acc: &mut Accel, net: &[Linear]) -> Result<u64, AccelError> {
    let mut hash = Fnv1a::new();
    let mut chunk = vec![0.0f32; 1 << 16];
    for layer in net {
        for t in [&layer.w.value, &layer.b.value] {
            let mut done = 0;
            while done < t.len() {
                let n = chunk.len().min(t.len() - done);
                acc.download_at(t, done, &mut chunk[..n])?;
                for x in &chunk[..n] {
                    hash.write(&x.to_bits().to_le_bytes());
                }
                done += n;
            }
        }
    }
    acc.sync()?;
    Ok(hash.value())
}

/// One zero-filled `rows × width` buffer per width.
pub fn alloc_widths(
    acc: &mut Accel,
    rows: usize,
    widths: &[usize],
) -> Result<Vec<Tensor>, AccelError> {
    widths.iter().map(|&w| acc.alloc(rows, w)).collect()
}
