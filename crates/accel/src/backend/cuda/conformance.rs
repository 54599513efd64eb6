//! A backend against the cpu backend, kernel by kernel, on random data: every kernel but
//! MATMUL must give the cpu backend's bits, MATMUL must agree within the cpu tests' GEMM
//! bound, and bad data must be refused the same way, before anything is written.
//!
//! The tests run it on `kernels.cu` emulated on the CPU; `ferry device check` runs it on
//! a real GPU (`scripts/gpu-check.sh`).

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{numbered, DeviceMemory, Rng};
use crate::kernel::{Distribution, MatmulFlags};

/// Makes a fresh backend of the kind checked, or says why it cannot (a GPU out of
/// memory): the cases that needed it fail with that.
pub type MakeBackend<'a> = &'a dyn Fn() -> Result<Box<dyn Backend>, String>;

/// One case of [`run`]: its name and what it found.
#[derive(Debug)]
pub struct Case {
    /// The kernel's name in the table ("matmul").
    pub kernel: &'static str,
    /// The kernel and variant checked.
    pub name: String,
    /// `Err` with the first difference.
    pub outcome: Result<(), String>,
}

impl Rng {
    fn f32s(&mut self, n: usize, scale: f32) -> Vec<u8> {
        (0..n).flat_map(|_| self.f32(scale).to_le_bytes()).collect()
    }

    fn u32s(&mut self, n: usize, below: u32) -> Vec<u8> {
        (0..n)
            .flat_map(|_| self.below(below).to_le_bytes())
            .collect()
    }

    /// `rows` rows of `cols` weights in `dtype`: random bits with finite, modest scales.
    fn weights(&mut self, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        if dtype == DType::F32 {
            return self.f32s(rows * cols, 1.0);
        }
        let bytes = dtype.bytes(rows as u64, cols as u64).unwrap() as usize;
        let mut w: Vec<u8> = (0..bytes).map(|_| self.next() as u8).collect();
        // A half in [2^-7, 2^-3): finite, so no NaN or infinity reaches a result.
        let mut scale = |b: &mut [u8], at: usize| {
            let h = 0x2000u16 | (self.next() as u16 & 0x0fff);
            b[at..at + 2].copy_from_slice(&h.to_le_bytes());
        };
        let block = dtype.block_bytes() as usize;
        for b in w.chunks_exact_mut(block) {
            match dtype {
                DType::F16 => scale(b, 0),
                DType::Q8_0 | DType::Q4_0 => scale(b, 0),
                DType::Q4_1 | DType::Q4K => {
                    scale(b, 0);
                    scale(b, 2);
                }
                DType::Q6K => scale(b, 208),
                DType::F32 => unreachable!(),
            }
        }
        w
    }

    /// The buffers of `count` lookups in a table of `vocab` rows of `dim` in `dtype`: the
    /// table, the ids, the output.
    fn lookups(&mut self, dtype: DType, vocab: usize, dim: usize, count: usize) -> Vec<Vec<u8>> {
        vec![
            self.weights(dtype, vocab, dim),
            self.u32s(count, vocab as u32),
            vec![0; 4 * count * dim],
        ]
    }
}

/// A backend's result of a launch, and every buffer after it.
type Ran = (Result<(), String>, Vec<Vec<u8>>);

/// The cpu backend and the backend checked, with buffers `1..` holding `data`.
struct Pair {
    cpu: CpuBackend,
    other: Box<dyn Backend>,
    /// Bytes of buffer `i + 1`.
    sizes: Vec<usize>,
}

impl Pair {
    fn new(make: MakeBackend<'_>, data: &[Vec<u8>]) -> Result<Self, String> {
        let mut cpu = CpuBackend::new(2, DeviceMemory::default());
        let mut other = make()?;
        for (i, d) in data.iter().enumerate() {
            let id = i as BufferId + 1;
            for b in [&mut cpu as &mut dyn Backend, other.as_mut()] {
                b.alloc(id, d.len().max(4) as u64)
                    .map_err(|e| format!("{}: {e}", b.kind()))?;
                b.write(id, 0, d);
            }
        }
        let sizes = data.iter().map(Vec::len).collect();
        Ok(Self { cpu, other, sizes })
    }

    fn buffers(&self, b: &dyn Backend) -> Vec<Vec<u8>> {
        self.sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let mut out = vec![0u8; len.max(4)];
                b.read(i as BufferId + 1, 0, &mut out);
                out
            })
            .collect()
    }

    /// Runs `kernel` on both: each one's result, and every buffer after it.
    fn run(&mut self, kernel: &Kernel) -> [Ran; 2] {
        let c = self.cpu.launch(kernel).map_err(|e| e.to_string());
        let o = self.other.launch(kernel).map_err(|e| e.to_string());
        [
            (c, self.buffers(&self.cpu)),
            (o, self.buffers(self.other.as_ref())),
        ]
    }
}

/// Every buffer of the cpu backend's and of the other's with the same bits.
fn same_bits(cpu: &[Vec<u8>], other: &[Vec<u8>]) -> Result<(), String> {
    for (i, (c, g)) in cpu.iter().zip(other).enumerate() {
        if c != g {
            let at = c.iter().zip(g).position(|(a, b)| a != b).unwrap_or(0);
            let word = |b: &[u8]| {
                let w = at / 4 * 4;
                f32::from_le_bytes([b[w], b[w + 1], b[w + 2], b[w + 3]])
            };
            return Err(format!(
                "buffer {} differs at byte {at}: cpu {} vs {}",
                i + 1,
                word(c),
                word(g)
            ));
        }
    }
    Ok(())
}

/// Every case, in order.
pub fn run(make: MakeBackend<'_>) -> Vec<Case> {
    let mut cases = Cases {
        make,
        found: Vec::new(),
    };
    elementwise(&mut cases);
    rows(&mut cases);
    attention_and_lookups(&mut cases);
    quantized_products(&mut cases);
    matmul(&mut cases);
    bad_data(&mut cases);
    cases.found
}

/// The cases found so far on the backend checked.
struct Cases<'a> {
    make: MakeBackend<'a>,
    found: Vec<Case>,
}

impl Cases<'_> {
    fn push(&mut self, kernel: &Kernel, name: impl Into<String>, outcome: Result<(), String>) {
        self.found.push(Case {
            kernel: kernel.name(),
            name: name.into(),
            outcome,
        });
    }

    /// Runs `kernel` on buffers holding `data` on both backends; both must succeed: every
    /// buffer after it, the cpu backend's first.
    fn ran(&self, data: &[Vec<u8>], kernel: &Kernel) -> Result<[Vec<Vec<u8>>; 2], String> {
        let mut pair = Pair::new(self.make, data)?;
        let [(c, cb), (o, ob)] = pair.run(kernel);
        c.map_err(|e| format!("the cpu backend failed: {e}"))?;
        o.map_err(|e| format!("failed: {e}"))?;
        Ok([cb, ob])
    }

    /// `kernel` on `data`: every buffer must end with the same bits ([`same_bits`]).
    fn same_bits(&mut self, name: impl Into<String>, data: Vec<Vec<u8>>, kernel: Kernel) {
        let outcome = self
            .ran(&data, &kernel)
            .and_then(|[c, o]| same_bits(&c, &o));
        self.push(&kernel, name, outcome);
    }

    /// MATMUL `kernel` on `data`, within the bound for depth `k` ([`within_bound`]).
    fn within_bound(&mut self, name: &str, data: Vec<Vec<u8>>, kernel: &Kernel, k: usize) {
        let outcome = self
            .ran(&data, kernel)
            .and_then(|[c, o]| within_bound(&c, &o, k));
        self.push(kernel, name, outcome);
    }

    /// `kernel` on bad `data`: the same error as the cpu backend's, and nothing written
    /// to buffer `output + 1`.
    fn refused(&mut self, name: &str, data: Vec<Vec<u8>>, kernel: &Kernel, output: usize) {
        let outcome = Pair::new(self.make, &data).and_then(|mut pair| {
            let [(c, _), (o, ob)] = pair.run(kernel);
            if c.is_ok() || c != o {
                return Err(format!("cpu backend {c:?} vs {o:?}"));
            }
            if ob[output] != data[output] {
                return Err("wrote its output before refusing".into());
            }
            Ok(())
        });
        self.push(kernel, name, outcome);
    }
}

fn elementwise(cases: &mut Cases<'_>) {
    let mut r = Rng(1);
    let n = 1000;
    let (a, b, o) = (r.f32s(n, 3.0), r.f32s(n, 3.0), vec![0u8; 4 * n]);
    let two = |k| (vec![a.clone(), b.clone(), o.clone()], k);
    for (what, (data, kernel)) in [
        ("add", two(numbered::add(n))),
        ("mul", two(numbered::mul(n))),
        ("relu_backward", two(numbered::relu_backward(n))),
        ("gelu_backward", two(numbered::gelu_backward(n))),
        ("swiglu", two(numbered::swiglu(n))),
    ] {
        cases.same_bits(what, data, kernel);
    }
    let one = |k| (vec![a.clone(), o.clone()], k);
    for (what, (data, kernel)) in [
        ("relu", one(Kernel::Relu { x: 1, out: 2, n })),
        ("gelu", one(Kernel::Gelu { x: 1, out: 2, n })),
        (
            "copy",
            one(Kernel::Copy {
                src: 1,
                src_offset: 7,
                dst: 2,
                dst_offset: 3,
                n: 900,
            }),
        ),
    ] {
        cases.same_bits(what, data, kernel);
    }
    cases.same_bits(
        "scale",
        vec![a.clone()],
        Kernel::Scale {
            x: 1,
            n: 999,
            alpha: 0.37,
        },
    );
    cases.same_bits(
        "axpy",
        vec![a.clone(), b.clone()],
        Kernel::Axpy {
            x: 1,
            y: 2,
            n,
            alpha: -1.3,
        },
    );
    cases.same_bits(
        "sgd",
        vec![a.clone(), b.clone()],
        Kernel::Sgd {
            param: 1,
            grad: 2,
            n,
            lr: 0.01,
        },
    );
    cases.same_bits(
        "add_bias",
        vec![a.clone(), r.f32s(40, 1.0)],
        Kernel::AddBias {
            x: 1,
            bias: 2,
            rows: 25,
            cols: 40,
        },
    );
    let moment = r.f32s(n, 0.1).iter().map(|b| b & 0x7f).collect::<Vec<u8>>();
    cases.same_bits(
        "adam",
        vec![a.clone(), b.clone(), r.f32s(n, 0.1), moment],
        Kernel::Adam {
            param: 1,
            grad: 2,
            m: 3,
            v: 4,
            n,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 17,
        },
    );
    for (distribution, seed) in [(Distribution::Uniform, 5), (Distribution::Normal, 6)] {
        cases.same_bits(
            "rng_fill",
            vec![o.clone()],
            Kernel::RngFill {
                out: 1,
                n,
                seed,
                counter: u64::MAX - 300,
                distribution,
                scale: 0.5,
            },
        );
    }
}

fn rows(cases: &mut Cases<'_>) {
    let mut r = Rng(2);
    let (rows, cols) = (37, 53);
    let x = r.f32s(rows * cols, 4.0);
    let out = vec![0u8; 4 * rows * cols];
    cases.same_bits(
        "softmax",
        vec![x.clone(), out.clone()],
        numbered::softmax(rows, cols),
    );
    cases.same_bits(
        "cross_entropy",
        vec![
            x.clone(),
            r.u32s(rows, cols as u32),
            out.clone(),
            vec![0; 4],
        ],
        numbered::cross_entropy(rows, cols),
    );
    cases.same_bits(
        "sum_rows",
        vec![x.clone(), out.clone()],
        numbered::sum_rows(rows, cols),
    );
    // More rows than one partial sum takes.
    let tall = r.f32s(600 * 7, 1.0);
    cases.same_bits(
        "sum_cols",
        vec![tall, vec![0; 4 * 7]],
        numbered::sum_cols(600, 7),
    );
    cases.same_bits(
        "layer_norm",
        vec![x.clone(), r.f32s(cols, 1.0), r.f32s(cols, 1.0), out.clone()],
        numbered::layer_norm(rows, cols, 1e-5),
    );
    cases.same_bits(
        "rms_norm",
        vec![x.clone(), r.f32s(cols, 1.0), out.clone()],
        numbered::rms_norm(rows, cols, 1e-6),
    );
    // Rows enough for a thread each to normalize its own (fewer take two steps).
    let many = 70;
    let tall = r.f32s(many * cols, 4.0);
    let tall_out = vec![0u8; 4 * many * cols];
    cases.same_bits(
        "layer_norm, many rows",
        vec![
            tall.clone(),
            r.f32s(cols, 1.0),
            r.f32s(cols, 1.0),
            tall_out.clone(),
        ],
        numbered::layer_norm(many, cols, 1e-5),
    );
    cases.same_bits(
        "rms_norm, many rows",
        vec![tall, r.f32s(cols, 1.0), tall_out],
        numbered::rms_norm(many, cols, 1e-6),
    );
    let mut with_nan = x.clone();
    with_nan[4 * (3 * cols + 5)..][..4].copy_from_slice(&f32::NAN.to_le_bytes());
    cases.same_bits("argmax", vec![with_nan, out], numbered::argmax(rows, cols));
    // Rows wide enough to be scanned in chunks (of 256), the last one short: a plain row,
    // its maximum again in a later chunk (the first wins), a NaN in a later chunk, NaNs in
    // two, a row all equal.
    let wide = 1000;
    let mut x: Vec<f32> = (0..5 * wide).map(|i| ((i * 7919) % 1013) as f32).collect();
    let row = |r: usize| r * wide;
    x[row(1) + 100] = 5000.0;
    x[row(1) + 700] = 5000.0;
    x[row(2) + 900] = f32::NAN;
    x[row(3) + 300] = f32::NAN;
    x[row(3) + 800] = f32::NAN;
    x[row(4)..row(5)].fill(-0.0);
    let bytes = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    cases.same_bits(
        "argmax, wide rows",
        vec![bytes, vec![0; 4 * 5]],
        numbered::argmax(5, wide),
    );
    // Plain rope (factors of 1) and Llama 3.1's kind: 1 for the fast pairs, up to 8.
    let ones: Vec<u8> = [1.0f32; 32]
        .into_iter()
        .flat_map(f32::to_le_bytes)
        .collect();
    let llama31: Vec<u8> = (0..32)
        .map(|i| 1.0 + 7.0 * (i * i) as f32 / 961.0)
        .flat_map(f32::to_le_bytes)
        .collect();
    for (name, factors) in [("rope", ones), ("rope, factors", llama31)] {
        for style in [RopeStyle::Adjacent, RopeStyle::HalfSplit] {
            cases.same_bits(
                name,
                vec![r.f32s(5 * 3 * 64, 2.0), factors.clone()],
                Kernel::Rope {
                    x: 1,
                    factors: 2,
                    rows: 5,
                    heads: 3,
                    head_dim: 64,
                    pos: 1000,
                    base: 10000.0,
                    style,
                },
            );
        }
    }
}

fn attention_and_lookups(cases: &mut Cases<'_>) {
    let mut r = Rng(3);
    let (heads, hd, len) = (4, 36, 19);
    cases.same_bits(
        "attention_decode",
        vec![
            r.f32s(heads * hd, 1.0),
            r.f32s(len * heads * hd, 1.0),
            r.f32s(len * heads * hd, 1.0),
            vec![0; 4 * heads * hd],
        ],
        numbered::attention_decode(heads, hd, len),
    );
    let (rows, kv_heads, pos) = (3, 2, 11);
    let cache = (pos + rows) * kv_heads * hd;
    cases.same_bits(
        "attention",
        vec![
            r.f32s(rows * heads * hd, 1.0),
            r.f32s(cache, 1.0),
            r.f32s(cache, 1.0),
            vec![0; 4 * rows * heads * hd],
        ],
        numbered::attention(rows, heads, kv_heads, hd, pos),
    );
    let (vocab, dim, count) = (50, 12, 9);
    cases.same_bits(
        "embedding",
        r.lookups(DType::F32, vocab, dim, count),
        numbered::embedding(count, dim, vocab),
    );
    for dtype in DType::ALL {
        let dim = 512;
        cases.same_bits(
            format!("qembedding {}", dtype.name()),
            r.lookups(dtype, vocab, dim, count),
            numbered::qembedding(count, dim, vocab, dtype),
        );
    }
}

fn quantized_products(cases: &mut Cases<'_>) {
    let mut r = Rng(4);
    let every_format = DType::ALL.map(|dtype| {
        // F32 and F16 rows with a tail after the eight lanes.
        let k = if dtype.block_elems() == 1 { 517 } else { 512 };
        (format!("qmatmul {}", dtype.name()), dtype, (9, k, 3))
    });
    // Outputs enough that their lane partials would outgrow the scratch: each output's
    // lanes are summed by its own thread instead.
    let lanes_apart = (
        "qmatmul q8_0, one thread per output".to_string(),
        DType::Q8_0,
        (32_800, 32, 64),
    );
    // More inputs than are prepared at once (4 Ki elements in tests): runs of rows, the
    // last ragged.
    let in_runs = [
        (
            "qmatmul q4_1, inputs in runs".to_string(),
            DType::Q4_1,
            (9, 512, 20),
        ),
        (
            "qmatmul f32, inputs in runs".to_string(),
            DType::F32,
            (9, 517, 20),
        ),
    ];
    for (name, dtype, (n, k, m)) in every_format.into_iter().chain([lanes_apart]).chain(in_runs) {
        let data = vec![
            r.weights(dtype, n, k),
            r.f32s(m * k, 2.0),
            vec![0; 4 * m * n],
        ];
        let kernel = Kernel::QMatmul {
            w: 1,
            x: 2,
            out: 3,
            n,
            k,
            m,
            dtype,
        };
        cases.same_bits(name, data, kernel);
    }
}

fn matmul(cases: &mut Cases<'_>) {
    let mut r = Rng(5);
    let transposed = MatmulFlags {
        transpose_a: true,
        transpose_b: true,
        accumulate: true,
    };
    for (name, (m, n, k), flags) in [
        // Tiled (4×4 per thread) from TILED_MATMUL_OUTPUTS outputs on, with ragged edges.
        ("matmul in tiles", (259, 257, 40), MatmulFlags::default()),
        // Few outputs: the depth in slices (ragged: 300 in 9 slices of 34).
        ("matmul", (13, 17, 300), MatmulFlags::default()),
        ("matmul transposed, accumulating", (13, 17, 300), transposed),
        // A decode step's matrix-vector product: one row, 64 slices of 32.
        ("matmul of one row", (1, 96, 2048), MatmulFlags::default()),
        // Too shallow to slice: one thread per output.
        ("matmul, shallow", (13, 17, 40), transposed),
    ] {
        let data = vec![r.f32s(m * k, 1.0), r.f32s(k * n, 1.0), r.f32s(m * n, 1.0)];
        let kernel = numbered::matmul(m, n, k, flags);
        cases.within_bound(name, data, &kernel, k);
    }
}

/// MATMUL's result (buffer 3) within the cpu tests' bound, 1e-5 of Σ|a·b| (at most `k`:
/// every input is below 1 in magnitude), and its inputs unchanged.
fn within_bound(cpu: &[Vec<u8>], other: &[Vec<u8>], k: usize) -> Result<(), String> {
    if cpu[..2] != other[..2] {
        return Err("changed its inputs".into());
    }
    let f = |b: &[u8]| -> Vec<f32> { bytemuck::cast_slice::<u8, f32>(b).to_vec() };
    let tol = 1e-5 * k as f32;
    for (i, (w, g)) in f(&cpu[2]).iter().zip(&f(&other[2])).enumerate() {
        // A NaN fails too.
        if (w - g).abs().partial_cmp(&tol) != Some(std::cmp::Ordering::Less) {
            return Err(format!("element {i}: cpu {w} vs {g} (bound {tol})"));
        }
    }
    Ok(())
}

fn bad_data(cases: &mut Cases<'_>) {
    let mut r = Rng(6);
    let mut labels = r.u32s(4, 10);
    labels[8..12].copy_from_slice(&10u32.to_le_bytes());
    let kernel = numbered::cross_entropy(4, 10);
    let data = vec![r.f32s(40, 1.0), labels, vec![0; 160], vec![0; 4]];
    cases.refused("cross_entropy label beyond the classes", data, &kernel, 2);
    let kernel = numbered::embedding(1, 4, 10);
    let data = vec![r.f32s(40, 1.0), 99u32.to_le_bytes().to_vec(), vec![0; 16]];
    cases.refused("embedding id beyond the vocabulary", data, &kernel, 2);
    // Ids read back in pieces: one beyond, in the last piece, is found as well.
    let count = super::CHECK_PIECE + 1;
    let mut ids = vec![0u8; 4 * count];
    ids[4 * (count - 1)..].copy_from_slice(&99u32.to_le_bytes());
    let kernel = numbered::embedding(count, 4, 10);
    let data = vec![r.f32s(40, 1.0), ids, vec![0; 16 * count]];
    cases.refused(
        "embedding id beyond the vocabulary, past a piece",
        data,
        &kernel,
        2,
    );
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::super::emulator::Emulator;
    use super::*;

    /// The emulated kernels, compiled once per test process.
    fn emulator() -> Emulator {
        static EMULATOR: OnceLock<Emulator> = OnceLock::new();
        EMULATOR
            .get_or_init(|| {
                let dir = tempfile::Builder::new()
                    .prefix("ferry-cuda-emulated-")
                    .tempdir()
                    .expect("scratch folder");
                // Loaded, the library no longer needs its file.
                Emulator::build(dir.path())
                    .unwrap_or_else(|e| panic!("{}", ferry_migrate::error_chain(&e)))
            })
            .clone()
    }

    #[test]
    fn every_kernel_of_kernels_cu_agrees_with_the_cpu_backend() {
        let make =
            || Ok(Box::new(GpuBackend::new(Arc::new(emulator()), "cuda")) as Box<dyn Backend>);
        let cases = run(&make);
        let failed: Vec<String> = cases
            .iter()
            .filter_map(|c| c.outcome.as_ref().err().map(|e| format!("{}: {e}", c.name)))
            .collect();
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        // Every kernel of the table is covered: a new one needs its cases here.
        let untried: Vec<&str> = ferry_abi::accel::kernel::KERNELS
            .iter()
            .map(|&(_, name)| name)
            .filter(|name| !cases.iter().any(|c| c.kernel == *name))
            .collect();
        assert!(untried.is_empty(), "kernels without a case: {untried:?}");
    }

    /// Device memory holding each of `inputs`.
    fn uploaded(gpu: &Emulator, inputs: &[Vec<u8>]) -> Vec<<Emulator as Gpu>::Memory> {
        let upload = |data: &Vec<u8>| {
            let memory = gpu.alloc(data.len() as u64).unwrap();
            gpu.write(&memory, 0, data).unwrap();
            memory
        };
        inputs.iter().map(upload).collect()
    }

    #[test]
    fn tiled_and_untiled_matmul_give_the_same_bits() {
        let gpu = emulator();
        let mut r = Rng(7);
        let (m, n, k) = (37, 29, 50);
        let inputs = [r.f32s(m * k, 1.0), r.f32s(k * n, 1.0), r.f32s(m * n, 1.0)];
        let mut results = Vec::new();
        for (entry, items) in [
            ("ferry_matmul", m * n),
            ("ferry_matmul_tiled", m.div_ceil(4) * n.div_ceil(4)),
        ] {
            let memory = uploaded(&gpu, &inputs);
            let at = |i: usize| gpu.address(&memory[i]);
            // Both transposed and accumulating: every index path of the kernels.
            let words = [
                at(0),
                at(1),
                at(2),
                items as u64,
                m as u64,
                n as u64,
                k as u64,
                1,
                1,
                1,
            ];
            let launch = Launch {
                entry,
                args: args(&words),
                items: items as u64,
            };
            gpu.launch(&launch, &[]).unwrap();
            let mut out = vec![0u8; inputs[2].len()];
            gpu.read(&memory[2], 0, &mut out).unwrap();
            results.push(out);
        }
        assert_ne!(results[0], inputs[2], "the product changed nothing");
        assert_eq!(results[0], results[1], "tiles change the bits");
    }

    #[test]
    fn split_and_fused_attention_give_the_same_bits() {
        let gpu = emulator();
        let mut r = Rng(11);
        let (heads, kv_heads, hd) = (6, 2, 20);
        let (rows, pos, len) = (4, 9, 23);
        let cache = (pos + rows).max(len) * heads * hd;
        let kernels = [
            numbered::attention_decode(heads, hd, len),
            numbered::attention(rows, heads, kv_heads, hd, pos),
        ];
        let inputs = [
            r.f32s(rows * heads * hd, 1.0),
            r.f32s(cache, 1.0),
            r.f32s(cache, 1.0),
            vec![0; 4 * rows * heads * hd],
        ];
        for kernel in kernels {
            let room = score_room(&kernel).expect("scores kept");
            let mut outputs = Vec::new();
            // Kept whole, kept for 3 rows at a time (in uneven parts), and fused.
            let parts = ScoreRoom { rows: 3, ..room };
            for kept in [Some(room), Some(parts), None] {
                let memory = uploaded(&gpu, &inputs);
                let scratch = gpu.alloc(room.bytes()).unwrap();
                let at = |id: BufferId| gpu.address(&memory[id as usize - 1]);
                let kept = kept.map(|room| (gpu.address(&scratch), room));
                let launches = attention_plan(&kernel, at, kept);
                assert!(!launches.is_empty());
                for launch in &launches {
                    gpu.launch(launch, &[]).unwrap();
                }
                let mut out = vec![0u8; inputs[3].len()];
                gpu.read(&memory[3], 0, &mut out).unwrap();
                outputs.push(out);
            }
            assert_ne!(outputs[0], inputs[3], "{kernel:?} wrote nothing");
            assert_eq!(outputs[0], outputs[1], "{kernel:?}: kept in parts differs");
            assert_eq!(outputs[0], outputs[2], "{kernel:?}: split and fused differ");
        }
    }

    #[test]
    fn every_kernel_has_a_plan_and_every_entry_point_is_listed() {
        // `plan` covers every Kernel (the match is exhaustive); the entry points it may
        // name are exactly those kernels.cu defines.
        let mut defined: Vec<&str> = KERNELS_CU
            .lines()
            .filter_map(|l| l.strip_prefix("KERNEL "))
            .filter_map(|l| l.split('(').next())
            .collect();
        defined.sort_unstable();
        let mut listed = ENTRY_POINTS.to_vec();
        listed.sort_unstable();
        assert_eq!(listed, defined);
    }
}
