//! Trains a multi-layer perceptron on the virtual accelerator, on a synthetic dataset
//! that lives in accelerator memory: every step changes every weight and every optimizer
//! moment (the hard case for live migration).
//!
//! The dataset is generated on the device: inputs drawn with RNG_FILL, labels computed by
//! a fixed random linear "teacher" (argmax of inputs · W_teacher), so the task is
//! learnable. Nothing depends on the clock: the same arguments give the same losses and
//! the same final checksum, migrated or not.
#![no_std]
#![no_main]

#[path = "../mlp/net.rs"]
mod net;

use ferry_sdk::accel::{Accel, AccelError, Distribution, Transpose};
use ferry_sdk::clock::now_ns;
use ferry_sdk::math::{mib, sqrt, stream};
use ferry_sdk::prelude::*;
use net::{alloc_widths, backward, checksum, forward, update, Activations, Linear};

ferry_sdk::entry!(main);

const HELP: &str = "\
mlp-train: trains an MLP on a synthetic dataset held in accelerator memory.
  --seed N         seed of the dataset, the teacher and the initial weights (default 1)
  --steps N        training steps (default 200)
  --batch N        rows per step (default 64)
  --inputs N       input features (default 64)
  --hidden N       width of each hidden layer (default 128)
  --layers N       hidden layers (default 2; 0 = a linear classifier)
  --classes N      output classes (default 10)
  --samples N      dataset rows (default 4096); the dataset takes --samples x --inputs
                   x 4 bytes of accelerator memory (1 MiB by default; --samples
                   1048576 makes it 256 MiB)
  --lr F           learning rate (default 0.1 with sgd, 0.003 with adam)
  --optimizer O    sgd | adam (default adam)
  --print-every N  print the loss every N steps (default 20)
Prints `step=<n> loss=<value> steps/s=<value>` every N steps, then `loss=<final loss>`
and `checksum=<16 hex digits>` (FNV-1a of all weights and biases): both depend only on
the arguments. Needs an accelerator (ferry run --accel-memory ...).";

fn main(args: Args) -> i32 {
    ferry_sdk::workload::main(&args, "mlp-train", HELP, Config::parse, train)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Optimizer {
    Sgd,
    Adam,
}

struct Config {
    seed: u64,
    steps: u64,
    batch: usize,
    inputs: usize,
    hidden: usize,
    layers: usize,
    classes: usize,
    samples: usize,
    lr: f32,
    optimizer: Optimizer,
    print_every: u64,
}

impl Config {
    fn parse(args: &Args) -> Result<Config, ArgError> {
        args.check(
            &[
                "seed",
                "steps",
                "batch",
                "inputs",
                "hidden",
                "layers",
                "classes",
                "samples",
                "lr",
                "optimizer",
                "print-every",
            ],
            &[],
        )?;
        let optimizer = match args.value("optimizer")?.unwrap_or("adam") {
            "sgd" => Optimizer::Sgd,
            "adam" => Optimizer::Adam,
            other => {
                return Err(ArgError::new(format!(
                    "--optimizer: {other:?} is not sgd or adam"
                )))
            }
        };
        let default_lr = match optimizer {
            Optimizer::Sgd => 0.1,
            Optimizer::Adam => 0.003,
        };
        let c = Config {
            seed: args.parse_or("seed", 1)?,
            steps: args.parse_or("steps", 200)?,
            batch: args.parse_or("batch", 64)?,
            inputs: args.parse_or("inputs", 64)?,
            hidden: args.parse_or("hidden", 128)?,
            layers: args.parse_or("layers", 2)?,
            classes: args.parse_or("classes", 10)?,
            samples: args.parse_or("samples", 4096)?,
            lr: args.parse_or("lr", default_lr)?,
            optimizer,
            print_every: args.parse_or("print-every", 20)?,
        };
        for (name, value) in [
            ("steps", c.steps as usize),
            ("batch", c.batch),
            ("inputs", c.inputs),
            ("hidden", c.hidden),
            ("classes", c.classes),
            ("samples", c.samples),
            ("print-every", c.print_every as usize),
        ] {
            if value == 0 {
                return Err(ArgError::new(format!("--{name}: must be at least 1")));
            }
        }
        if c.classes < 2 {
            return Err(ArgError::new("--classes: must be at least 2"));
        }
        if c.samples < c.batch {
            return Err(ArgError::new("--samples: must be at least --batch"));
        }
        if c.layers > 64 {
            return Err(ArgError::new("--layers: at most 64"));
        }
        if !(c.lr.is_finite() && c.lr > 0.0) {
            return Err(ArgError::new("--lr: must be a positive number"));
        }
        // Every matrix the run allocates, at most 2^40 elements (4 TiB): more than any
        // device holds, and a size that cannot overflow where the run computes with it.
        let hidden = if c.layers > 0 { c.hidden } else { 1 };
        for (what, rows, cols) in [
            ("--samples x --inputs", c.samples, c.inputs),
            ("--samples x --classes", c.samples, c.classes),
            ("--inputs x --classes", c.inputs, c.classes),
            ("--inputs x --hidden", c.inputs, hidden),
            ("--hidden x --hidden", hidden, hidden),
            ("--hidden x --classes", hidden, c.classes),
            ("--batch x --hidden", c.batch, hidden),
        ] {
            if rows.checked_mul(cols).is_none_or(|n| n > 1 << 40) {
                return Err(ArgError::new(format!("{what}: too large")));
            }
        }
        Ok(c)
    }
}

fn train(c: &Config) -> Result<(), AccelError> {
    let mut acc = Accel::open()?;
    let (b, l) = (c.batch, c.layers);
    println!(
        "mlp-train: seed={} steps={} batch={b} inputs={} hidden={} layers={l} classes={} \
         samples={} lr={} optimizer={}",
        c.seed,
        c.steps,
        c.inputs,
        c.hidden,
        c.classes,
        c.samples,
        c.lr,
        if c.optimizer == Optimizer::Adam {
            "adam"
        } else {
            "sgd"
        },
    );

    // Everything is allocated up front (the commands are only queued), so a run that
    // does not fit fails before any work.
    let mut data_x = acc.alloc::<f32>(c.samples, c.inputs)?;
    let mut data_y = acc.alloc::<u32>(c.samples, 1)?;
    let dataset_bytes = acc.allocated();
    let mut teacher = acc.alloc::<f32>(c.inputs, c.classes)?;
    let mut teacher_logits = acc.alloc::<f32>(c.samples, c.classes)?;
    let peak_setup = acc.allocated();
    acc.rng_fill(&mut data_x, stream(c.seed, 1), 0, Distribution::Normal(1.0));
    acc.rng_fill(
        &mut teacher,
        stream(c.seed, 2),
        0,
        Distribution::Normal(1.0),
    );
    acc.matmul(&data_x, &teacher, &mut teacher_logits, Transpose::None);
    acc.argmax(&teacher_logits, &mut data_y);
    acc.free(teacher_logits);
    acc.free(teacher);

    // Widths: inputs, hidden x layers, classes.
    let width = |i: usize| match i {
        0 => c.inputs,
        i if i <= l => c.hidden,
        _ => c.classes,
    };
    let adam = c.optimizer == Optimizer::Adam;
    let mut net: Vec<Linear> = Vec::with_capacity(l + 1);
    for i in 0..=l {
        let fans = (width(i), width(i + 1));
        let scale = (1.0 / sqrt(fans.0 as f64)) as f32;
        let seed = stream(c.seed, 100 + i as u64);
        net.push(Linear::new(&mut acc, fans, adam, seed, scale)?);
    }

    // Activations of one batch, and the gradients flowing back through them.
    let hidden = vec![c.hidden; l];
    let mut xb = acc.alloc::<f32>(b, c.inputs)?;
    let mut yb = acc.alloc::<u32>(b, 1)?;
    let mut act = Activations::new(&mut acc, b, &hidden, c.classes)?;
    let mut dh = alloc_widths(&mut acc, b, &hidden)?;
    let mut dz = alloc_widths(&mut acc, b, &hidden)?;
    let mut dlogits = acc.alloc::<f32>(b, c.classes)?;
    let mut loss = acc.alloc::<f32>(1, 1)?;
    println!(
        "mlp-train: accelerator memory {:.1} MiB (dataset {:.1} MiB, {:.1} MiB while \
         labelling) of {:.1} MiB",
        mib(acc.allocated()),
        mib(dataset_bytes),
        mib(peak_setup.max(acc.allocated())),
        mib(acc.capacity()),
    );

    // Wait for the dataset and the initial weights, so that steps/s measures steps.
    acc.sync()?;
    let batches = c.samples / b;
    let mut last_loss = [0.0f32];
    let mut last_print = (0u64, now_ns());
    for step in 1..=c.steps {
        // The next batch: a contiguous slice of the dataset, cycling.
        let row = ((step - 1) as usize % batches) * b;
        acc.copy(&data_x, row * c.inputs, &mut xb, 0, b * c.inputs);
        acc.copy(&data_y, row, &mut yb, 0, b);

        forward(&mut acc, &net, &xb, &mut act);
        acc.cross_entropy(&act.logits, &yb, &mut dlogits, &mut loss);
        backward(&mut acc, &mut net, &xb, &act, &dlogits, &mut dh, &mut dz);
        update(&mut acc, &mut net, c.lr, step);

        if step == 1 || step % c.print_every == 0 || step == c.steps {
            acc.download(&loss, &mut last_loss)?;
            let now = now_ns();
            let secs = (now - last_print.1) as f64 / 1e9;
            let rate = (step - last_print.0) as f64 / if secs > 0.0 { secs } else { 1e-9 };
            println!("step={step} loss={:.6} steps/s={rate:.1}", last_loss[0]);
            last_print = (step, now);
        }
    }

    let checksum = checksum(&mut acc, &net)?;
    println!("loss={:.6}", last_loss[0]);
    println!("checksum={checksum:016x}");
    Ok(())
}
