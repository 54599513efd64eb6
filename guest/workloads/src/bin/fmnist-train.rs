//! Trains a multi-layer perceptron on Fashion-MNIST, read from the VM's attached files,
//! on the virtual accelerator, and reports the test accuracy after every epoch.
//!
//! The four IDX files (gzipped or not) are read, decompressed and validated in the guest;
//! the images are uploaded once as f32 tables in accelerator memory, and every minibatch
//! is gathered on the device (EMBEDDING of the image table by the batch's row ids, which
//! come from a permutation uploaded once per epoch). The shuffle and the initial weights
//! depend only on `--seed`, and the device kernels are deterministic, so the same
//! arguments give the same losses, accuracies and final checksum, migrated or not.
#![no_std]
#![no_main]

extern crate alloc;

#[path = "../fmnist/data.rs"]
mod data;
#[path = "../mlp/net.rs"]
mod net;

use data::{CLASSES, IMAGES_HEADER, LABELS_HEADER, PIXELS};
use ferry_sdk::accel::{Accel, AccelError, Tensor};
use ferry_sdk::clock::now_ns;
use ferry_sdk::math::{mib, mix, sqrt, stream};
use ferry_sdk::prelude::*;
use ferry_sdk::workload::Failure;
use net::{alloc_widths, backward, checksum, forward, update, Activations, Linear};

ferry_sdk::entry!(main);

const HELP: &str = "\
fmnist-train: trains an MLP on Fashion-MNIST attached as files, on the accelerator.
  --epochs N       passes over the training set (default 5)
  --batch N        images per step (default 64); each epoch takes the first
                   train/batch whole batches of a fresh shuffle (the rest waits for
                   the next epoch's shuffle)
  --hidden LIST    widths of the hidden layers, comma separated (default 256,128:
                   784-256-128-10 with ReLU)
  --lr F           Adam learning rate (default 0.001)
  --schedule S     linear: the learning rate falls from --lr at the first step to 0
                   after the last (default); constant: --lr throughout
  --seed N         seed of the initial weights and of the shuffles (default 1)
  --limit N        train on the first N training images only (default: all; at
                   least --batch); the test set is always used whole
  --log-every N    print the loss every N steps (default 200; 0 = only per epoch)
Files (gzipped or raw IDX, attached with ferry run --attach NAME=PATH):
  train-images, train-labels, test-images, test-labels
  (e.g. /usr/share/datasets/fashion-mnist/*-ubyte.gz from dataset-fashion-mnist)
Prints `step=<n> epoch=<e> loss=<mean since the last line> steps/s=<rate>` every N
steps, `epoch <e>/<epochs> loss=<mean training loss> test_acc=<accuracy on the whole
test set> (took <s> s)` after every epoch, then `test_acc=<final accuracy>`,
`checksum=<16 hex digits>` (FNV-1a of all weights and biases) and `done`. Losses,
accuracies and the checksum depend only on the arguments and the data.
Needs about 80 MiB of guest RAM (the files are decompressed there: the default
--memory 256M is enough) and an accelerator: --accel-memory 256M holds the whole
dataset (the images take 209 MiB as f32) and the network.
Exit codes: 0 done, 1 bad data or an accelerator error, 2 bad arguments.";

/// Pixels are scaled to [0, 1] and then standardized with Fashion-MNIST's training-set
/// mean and standard deviation (of the [0, 1] values).
const PIXEL_MEAN: f32 = 0.2860;
const PIXEL_STD: f32 = 0.3530;

/// Rows per upload of pixels (converted to f32 in guest memory piece by piece).
const UPLOAD_ROWS: usize = 2048;

fn main(args: Args) -> i32 {
    ferry_sdk::workload::main(&args, "fmnist-train", HELP, Config::parse, run)
}

struct Config {
    epochs: u32,
    batch: usize,
    hidden: Vec<usize>,
    lr: f32,
    schedule: Schedule,
    seed: u64,
    limit: Option<usize>,
    log_every: u64,
}

impl Config {
    fn parse(args: &Args) -> Result<Config, ArgError> {
        args.check(
            &[
                "epochs",
                "batch",
                "hidden",
                "lr",
                "schedule",
                "seed",
                "limit",
                "log-every",
            ],
            &[],
        )?;
        let hidden = match args.value("hidden")? {
            None => vec![256, 128],
            Some(list) => parse_hidden(list)?,
        };
        let c = Config {
            epochs: args.parse_or("epochs", 5)?,
            batch: args.parse_or("batch", 64)?,
            hidden,
            lr: args.parse_or("lr", 0.001)?,
            schedule: match args.value("schedule")?.unwrap_or("linear") {
                "linear" => Schedule::Linear,
                "constant" => Schedule::Constant,
                other => {
                    return Err(ArgError::new(format!(
                        "--schedule: {other:?} is not linear or constant"
                    )))
                }
            },
            seed: args.parse_or("seed", 1)?,
            limit: args.parse("limit")?,
            log_every: args.parse_or("log-every", 200)?,
        };
        if c.epochs == 0 || c.epochs > 100_000 {
            return Err(ArgError::new("--epochs: must be 1 to 100000"));
        }
        if c.batch == 0 || c.batch > 1 << 16 {
            return Err(ArgError::new("--batch: must be 1 to 65536"));
        }
        if !(c.lr.is_finite() && c.lr > 0.0) {
            return Err(ArgError::new("--lr: must be a positive number"));
        }
        if let Some(limit) = c.limit {
            if limit < c.batch {
                return Err(ArgError::new(format!(
                    "--limit: {limit} images do not make one batch of {}",
                    c.batch
                )));
            }
        }
        Ok(c)
    }
}

/// How the learning rate changes over the run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// From `--lr` at the first step down to zero after the last.
    Linear,
    Constant,
}

impl Schedule {
    /// The learning rate of `step` (counting from 1) of `total`.
    fn lr(self, lr: f32, step: u64, total: u64) -> f32 {
        match self {
            Schedule::Constant => lr,
            Schedule::Linear => lr * ((total - step + 1) as f64 / total as f64) as f32,
        }
    }
}

/// `256` or `256,128`: each width 1 to 16384, at most 16 layers.
fn parse_hidden(list: &str) -> Result<Vec<usize>, ArgError> {
    let mut widths = Vec::new();
    for item in list.split(',') {
        let w: usize = item.trim().parse().map_err(|_| {
            ArgError::new(format!(
                "--hidden: {item:?} is not a width (give e.g. 256 or 256,128)"
            ))
        })?;
        if w == 0 || w > 16384 {
            return Err(ArgError::new(format!(
                "--hidden: width {w} is not 1 to 16384"
            )));
        }
        widths.push(w);
    }
    if widths.len() > 16 {
        return Err(ArgError::new("--hidden: at most 16 layers"));
    }
    Ok(widths)
}

/// One split of the dataset as decoded from its two files.
struct Split {
    /// The decompressed image file (pixels from [`IMAGES_HEADER`]).
    images: Vec<u8>,
    /// The decompressed label file (labels from [`LABELS_HEADER`]).
    labels: Vec<u8>,
    count: usize,
}

impl Split {
    fn pixels(&self) -> &[u8] {
        &self.images[IMAGES_HEADER..]
    }

    fn labels(&self) -> &[u8] {
        &self.labels[LABELS_HEADER..]
    }
}

/// Reads the attached file `name`, decompressed if it is gzipped.
fn read(name: &str) -> Result<Vec<u8>, Failure> {
    let file = ferry_sdk::files::open(name).map_err(|e| Failure::Other(format!("{e}")))?;
    let raw = file
        .read_all()
        .map_err(|e| Failure::Other(format!("{e}")))?;
    if !data::is_gzip(&raw) {
        return Ok(raw);
    }
    data::gunzip(&raw).map_err(|e| Failure::Other(format!("{name}: {e}")))
}

/// Reads and validates the images and labels files of one split.
fn load(images: &str, labels: &str) -> Result<Split, Failure> {
    let data_error = |name: &str, e: String| Failure::Other(format!("{name}: {e}"));
    let image_bytes = read(images)?;
    let count = data::check_images(&image_bytes).map_err(|e| data_error(images, e))?;
    let label_bytes = read(labels)?;
    let label_count = data::check_labels(&label_bytes).map_err(|e| data_error(labels, e))?;
    if label_count != count {
        return Err(Failure::Other(format!(
            "{images} has {count} images but {labels} has {label_count} labels"
        )));
    }
    Ok(Split {
        images: image_bytes,
        labels: label_bytes,
        count,
    })
}

/// Uploads the first `t.rows()` images of `pixels` into `t`, standardized.
fn upload_images(acc: &mut Accel, t: &mut Tensor, pixels: &[u8]) -> Result<(), AccelError> {
    let pixels = &pixels[..t.len()];
    let mut buf = vec![0.0f32; UPLOAD_ROWS * PIXELS];
    let scale = 1.0 / (255.0 * PIXEL_STD);
    let shift = PIXEL_MEAN / PIXEL_STD;
    for (i, piece) in pixels.chunks(UPLOAD_ROWS * PIXELS).enumerate() {
        for (x, &p) in buf.iter_mut().zip(piece) {
            *x = f32::from(p) * scale - shift;
        }
        acc.upload_at(t, i * UPLOAD_ROWS * PIXELS, &buf[..piece.len()])?;
    }
    Ok(())
}

fn run(c: &Config) -> Result<(), Failure> {
    let started = now_ns();
    // Opened first: a VM without an accelerator fails before the data is read.
    let mut acc = Accel::open()?;
    let train = load("train-images", "train-labels")?;
    let test = load("test-images", "test-labels")?;
    let test_count = test.count;
    let n = c.limit.unwrap_or(train.count).min(train.count);
    if n < c.batch {
        return Err(Failure::Usage(ArgError::new(format!(
            "the training set has {n} images, less than one batch of {}",
            c.batch
        ))));
    }
    let b = c.batch;
    let steps_per_epoch = n / b;
    let hidden = c.hidden.as_slice();
    let widths: Vec<String> = hidden.iter().map(|w| format!("{w}")).collect();
    let widths = widths.join(",");
    println!(
        "fmnist-train: train={n} test={} epochs={} batch={b} steps/epoch={steps_per_epoch} \
         hidden={widths} lr={} seed={}",
        test_count, c.epochs, c.lr, c.seed
    );

    // The datasets: images standardized, f32, one row each.
    let mut train_x = acc.alloc::<f32>(n, PIXELS)?;
    let mut test_x = acc.alloc::<f32>(test_count, PIXELS)?;
    let dataset_bytes = acc.allocated();
    upload_images(&mut acc, &mut train_x, train.pixels())?;
    upload_images(&mut acc, &mut test_x, test.pixels())?;
    let train_labels: Vec<u8> = train.labels()[..n].to_vec();
    let test_labels: Vec<u8> = test.labels().to_vec();
    drop(train);
    drop(test);

    // Each epoch's order: row ids, and their labels, for all its batches.
    let mut order = acc.alloc::<u32>(n, 1)?;
    let mut order_labels = acc.alloc::<u32>(n, 1)?;

    // The network: widths 784, hidden..., 10. He initialization for the ReLU layers,
    // 1/sqrt(fan_in) for the output layer; biases start at zero (buffers are zeroed).
    let width = |i: usize| match i {
        0 => PIXELS,
        i if i <= hidden.len() => hidden[i - 1],
        _ => CLASSES,
    };
    let l = hidden.len();
    let mut net: Vec<Linear> = Vec::with_capacity(l + 1);
    for i in 0..=l {
        let fans = (width(i), width(i + 1));
        let gain = if i < l { 2.0 } else { 1.0 };
        let scale = sqrt(gain / fans.0 as f64) as f32;
        let seed = stream(c.seed, 100 + i as u64);
        net.push(Linear::new(&mut acc, fans, true, seed, scale)?);
    }

    // One batch: its row ids and labels, the gathered images, activations, gradients.
    let mut ids = acc.alloc::<u32>(b, 1)?;
    let mut yb = acc.alloc::<u32>(b, 1)?;
    let mut xb = acc.alloc::<f32>(b, PIXELS)?;
    let mut act = Activations::new(&mut acc, b, hidden, CLASSES)?;
    let mut dh = alloc_widths(&mut acc, b, hidden)?;
    let mut dz = alloc_widths(&mut acc, b, hidden)?;
    let mut dlogits = acc.alloc::<f32>(b, CLASSES)?;
    let mut loss = acc.alloc::<f32>(1, 1)?;
    // The sum of the batch losses since the last download, and a zero to reset it.
    let mut loss_sum = acc.alloc::<f32>(1, 1)?;
    let zero = acc.alloc::<f32>(1, 1)?;
    // The whole test set in one pass.
    let mut test_act = Activations::new(&mut acc, test_count, hidden, CLASSES)?;
    let mut predictions = acc.alloc::<u32>(test_count, 1)?;
    println!(
        "fmnist-train: data ready in {:.1} s; accelerator memory {:.1} MiB (images {:.1} \
         MiB) of {:.1} MiB",
        secs(started, now_ns()),
        mib(acc.allocated()),
        mib(dataset_bytes),
        mib(acc.capacity()),
    );

    let total_steps = steps_per_epoch as u64 * u64::from(c.epochs);
    let mut host_order: Vec<u32> = (0..n as u32).collect();
    let mut host_order_labels = vec![0u32; n];
    let mut host_predictions = vec![0u32; test_count];
    let mut downloaded = [0.0f32];
    let mut step = 0u64;
    let mut accuracy = 0.0;
    for epoch in 1..=c.epochs {
        let epoch_start = now_ns();
        // A fresh Fisher-Yates shuffle of 0..n from this epoch's seed.
        for (i, id) in host_order.iter_mut().enumerate() {
            *id = i as u32;
        }
        let mut rng = SplitMix(stream(c.seed, 1000 + u64::from(epoch)));
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            host_order.swap(i, j);
        }
        for (label, &id) in host_order_labels.iter_mut().zip(&host_order) {
            *label = u32::from(train_labels[id as usize]);
        }
        acc.upload(&mut order, &host_order)?;
        acc.upload(&mut order_labels, &host_order_labels)?;

        let mut epoch_loss = 0.0f64;
        let mut pending = 0u64; // batch losses in loss_sum
        let mut last_print = (step, now_ns());
        for batch in 0..steps_per_epoch {
            step += 1;
            // Gather the batch on the device.
            acc.copy(&order, batch * b, &mut ids, 0, b);
            acc.copy(&order_labels, batch * b, &mut yb, 0, b);
            acc.embedding(&train_x, &ids, &mut xb);

            forward(&mut acc, &net, &xb, &mut act);
            acc.cross_entropy(&act.logits, &yb, &mut dlogits, &mut loss);
            acc.axpy(1.0, &loss, &mut loss_sum);
            pending += 1;

            backward(&mut acc, &mut net, &xb, &act, &dlogits, &mut dh, &mut dz);
            let lr = c.schedule.lr(c.lr, step, total_steps);
            update(&mut acc, &mut net, lr, step);

            if c.log_every > 0 && step % c.log_every == 0 && batch + 1 < steps_per_epoch {
                acc.download(&loss_sum, &mut downloaded)?;
                acc.copy(&zero, 0, &mut loss_sum, 0, 1);
                epoch_loss += f64::from(downloaded[0]);
                let now = now_ns();
                let rate = (step - last_print.0) as f64 / secs(last_print.1, now).max(1e-9);
                println!(
                    "step={step} epoch={epoch} loss={:.4} steps/s={rate:.1}",
                    downloaded[0] / pending as f32
                );
                last_print = (step, now);
                pending = 0;
            }
        }
        acc.download(&loss_sum, &mut downloaded)?;
        acc.copy(&zero, 0, &mut loss_sum, 0, 1);
        epoch_loss += f64::from(downloaded[0]);

        // Test accuracy: the argmax of the logits of every test image.
        forward(&mut acc, &net, &test_x, &mut test_act);
        acc.argmax(&test_act.logits, &mut predictions);
        acc.download(&predictions, &mut host_predictions)?;
        let correct = host_predictions
            .iter()
            .zip(&test_labels)
            .filter(|(&p, &y)| p == u32::from(y))
            .count();
        accuracy = correct as f64 / test_labels.len() as f64;
        println!(
            "epoch {epoch}/{} loss={:.4} test_acc={accuracy:.4} (took {:.1} s)",
            c.epochs,
            epoch_loss / steps_per_epoch as f64,
            secs(epoch_start, now_ns())
        );
    }

    let checksum = checksum(&mut acc, &net)?;
    println!("test_acc={accuracy:.4}");
    println!("checksum={checksum:016x}");
    println!("done");
    Ok(())
}

/// Seconds from `from` to `to` (nanosecond clock readings).
fn secs(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e9
}

/// The splitmix64 generator: the guest's only source of randomness (the shuffles).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..bound` (`bound` > 0), without modulo bias (Lemire's method).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let wide = u128::from(self.next()) * u128::from(bound);
            if (wide as u64) >= threshold {
                return (wide >> 64) as u64;
            }
        }
    }
}
