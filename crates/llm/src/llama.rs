//! The llama architecture: hyper-parameters from GGUF metadata (`llama.*`) and the tensor
//! table, every shape checked against them.
//!
//! Tensors (`ne[0]`, the contiguous row length, first): `token_embd.weight` `[dim, rows]`
//! with `rows` >= the vocabulary (only the first `vocab` rows are used),
//! `output_norm.weight` `[dim]` (f32), `output.weight` `[dim, rows]` (absent: tied to
//! `token_embd`), and per layer `blk.N.` `attn_norm` `[dim]`,
//! `attn_q` `[dim, dim]`, `attn_k` and `attn_v` `[dim, kv_heads·head_dim]`, `attn_output`
//! `[dim, dim]`, `ffn_norm` `[dim]`, `ffn_gate` and `ffn_up` `[dim, ffn_dim]`, `ffn_down`
//! `[ffn_dim, dim]` (`.weight` each), and optionally `rope_freqs.weight` `[head_dim / 2]`
//! (f32, Llama 3.1 and later: a divisor of each rope pair's frequency). Any other tensor
//! is refused, as is metadata asking for features the llama layout lacks (rope scaling,
//! a head size other than dim/heads).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ferry_abi::accel::dtype::DType;
/// How rotary position embedding pairs up the dimensions of a head: GGUF llama models
/// use [`RopeStyle::Adjacent`] (llama.cpp's converter permutes the Q and K weights to
/// match). The accelerator's ROPE kernel takes the same value.
pub use ferry_abi::accel::kernel::RopeStyle;

use crate::gguf::{shown, Gguf, TensorInfo, Value, MAX_DIMS};

/// The tensor of rope frequency factors (Llama 3.1 and later).
const ROPE_FACTORS: &str = "rope_freqs.weight";

/// The hyper-parameters of a llama-family model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks (`block_count`).
    pub layers: usize,
    /// Embedding width (`embedding_length`).
    pub dim: usize,
    /// Hidden width of the feed-forward network (`feed_forward_length`).
    pub ffn_dim: usize,
    /// Query heads (`attention.head_count`).
    pub heads: usize,
    /// Key/value heads (`attention.head_count_kv`, default `heads`).
    pub kv_heads: usize,
    /// Width of a head: `dim / heads`.
    pub head_dim: usize,
    /// Vocabulary size: the tokenizer's token count (else `vocab_size`, else the
    /// embedding rows); at most the embedding rows.
    pub vocab: usize,
    /// Training context length (`context_length`).
    pub context_len: usize,
    /// Rope frequency base (`rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// Dimensions of a head that rope rotates (`rope.dimension_count`, default
    /// `head_dim`): all of them, as the ROPE kernel does (others are refused).
    pub rope_dim: usize,
    /// RMS norm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// Rope pairing, from the architecture.
    pub rope_style: RopeStyle,
}

/// Where a weight tensor is in the file and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight {
    /// Absolute file offset of its data.
    pub offset: u64,
    /// Bytes of its data.
    pub size: u64,
    /// Element format.
    pub dtype: DType,
    /// Rows (`ne[1]`; 1 for a vector).
    pub rows: u64,
    /// Row length (`ne[0]`).
    pub cols: u64,
}

impl Weight {
    fn of(t: &TensorInfo<'_>) -> Weight {
        Weight {
            offset: t.offset,
            size: t.size,
            dtype: t.dtype,
            rows: t.rows(),
            cols: t.cols(),
        }
    }

    /// Its first `rows` rows (at most all of them): rows are contiguous, `size / rows`
    /// bytes each.
    fn first_rows(self, rows: u64) -> Weight {
        if rows == 0 || rows >= self.rows {
            return self;
        }
        Weight {
            size: self.size / self.rows * rows,
            rows,
            ..self
        }
    }
}

/// The weights of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    /// `attn_norm.weight`: `[dim]`, f32.
    pub attn_norm: Weight,
    /// `attn_q.weight`: dim rows of dim.
    pub attn_q: Weight,
    /// `attn_k.weight`: kv_heads·head_dim rows of dim.
    pub attn_k: Weight,
    /// `attn_v.weight`: kv_heads·head_dim rows of dim.
    pub attn_v: Weight,
    /// `attn_output.weight`: dim rows of dim.
    pub attn_output: Weight,
    /// `ffn_norm.weight`: `[dim]`, f32.
    pub ffn_norm: Weight,
    /// `ffn_gate.weight`: ffn_dim rows of dim.
    pub ffn_gate: Weight,
    /// `ffn_up.weight`: ffn_dim rows of dim.
    pub ffn_up: Weight,
    /// `ffn_down.weight`: dim rows of ffn_dim.
    pub ffn_down: Weight,
}

impl Layer {
    /// Its weights, in the order of the fields.
    pub fn weights(&self) -> [Weight; 9] {
        [
            self.attn_norm,
            self.attn_q,
            self.attn_k,
            self.attn_v,
            self.attn_output,
            self.ffn_norm,
            self.ffn_gate,
            self.ffn_up,
            self.ffn_down,
        ]
    }
}

/// Names of a layer's tensors, without `blk.N.` and `.weight`, in [`Layer`] field order.
pub const LAYER_TENSORS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// A llama model's configuration and tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaModel {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// `token_embd.weight`: one row of dim per token.
    pub token_embd: Weight,
    /// `output_norm.weight`: `[dim]`, f32.
    pub output_norm: Weight,
    /// `output.weight`, or `None` when the output projection is tied to `token_embd`.
    pub output: Option<Weight>,
    /// The transformer blocks.
    pub layers: Vec<Layer>,
    /// `rope_freqs.weight`: `[head_dim / 2]`, f32, the divisors of the rope pairs'
    /// frequencies (Llama 3.1 and later); `None`: rope as in the original, all 1.
    pub rope_factors: Option<Weight>,
}

/// Why a GGUF file is not a llama model we can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LlamaError {
    /// `general.architecture` is missing or not `llama`.
    UnsupportedArchitecture {
        /// Its value, if it is a string.
        arch: Option<String>,
    },
    /// A required key is missing or has the wrong type.
    Missing {
        /// The key.
        key: String,
        /// The type it should have.
        expected: &'static str,
    },
    /// A hyper-parameter out of range or inconsistent with another.
    BadValue {
        /// The key.
        key: String,
        /// What is wrong, with the values.
        why: String,
    },
    /// Metadata asking for something this layout does not do.
    Unsupported {
        /// What, with the key.
        what: String,
    },
    /// A required tensor is not in the file.
    MissingTensor {
        /// Its name.
        tensor: String,
    },
    /// A tensor the llama layout does not have.
    UnexpectedTensor {
        /// Its name.
        tensor: String,
    },
    /// A tensor whose shape does not match the configuration.
    Shape {
        /// Its name.
        tensor: String,
        /// The shape it should have, `ne[0]` first.
        expected: Vec<u64>,
        /// Its shape.
        found: Vec<u64>,
    },
    /// A tensor whose element type is not allowed for it.
    Type {
        /// Its name.
        tensor: String,
        /// The type it should have.
        expected: DType,
        /// Its type.
        found: DType,
    },
    /// More tokens in the vocabulary than rows in the embedding (or output) matrix.
    VocabTooLarge {
        /// The matrix.
        tensor: String,
        /// Tokens.
        vocab: u64,
        /// Its rows.
        rows: u64,
    },
    /// A tensor whose values cannot be what it stands for.
    BadTensorData {
        /// Its name.
        tensor: String,
        /// What is wrong, with the value.
        why: String,
    },
}

impl fmt::Display for LlamaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LlamaError::UnsupportedArchitecture { arch: Some(a) } => write!(
                f,
                "model architecture {a:?} is not supported (only \"llama\" is)"
            ),
            LlamaError::UnsupportedArchitecture { arch: None } => {
                write!(f, "general.architecture is missing or not a string")
            }
            LlamaError::Missing { key, expected } => {
                write!(f, "GGUF metadata {key} is missing or not {expected}")
            }
            LlamaError::BadValue { key, why } => write!(f, "bad {key}: {why}"),
            LlamaError::Unsupported { what } => write!(f, "unsupported: {what}"),
            LlamaError::MissingTensor { tensor } => write!(f, "tensor {tensor:?} is missing"),
            LlamaError::UnexpectedTensor { tensor } => {
                write!(f, "tensor {tensor:?} is not part of the llama layout")
            }
            LlamaError::Shape {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor:?} has shape {found:?}, expected {expected:?} (ne[0] first)"
            ),
            LlamaError::Type {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor:?} has type {}, expected {}",
                found.name(),
                expected.name()
            ),
            LlamaError::VocabTooLarge {
                tensor,
                vocab,
                rows,
            } => write!(
                f,
                "vocabulary of {vocab} tokens is larger than the {rows} rows of {tensor:?}"
            ),
            LlamaError::BadTensorData { tensor, why } => write!(f, "tensor {tensor:?}: {why}"),
        }
    }
}

/// Reads the hyper-parameters of architecture `arch`.
struct Meta<'g, 'a> {
    gguf: &'g Gguf<'a>,
    arch: &'a str,
}

impl Meta<'_, '_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// Key `k` converted by `convert` (`None`: not `expected`, `Err`: out of range,
    /// why); `default` when absent.
    fn value<T>(
        &self,
        k: &str,
        default: Option<T>,
        expected: &'static str,
        convert: impl FnOnce(Value<'_>) -> Option<Result<T, String>>,
    ) -> Result<T, LlamaError> {
        let key = self.key(k);
        match self.gguf.get(&key).map(convert) {
            None => default.ok_or(LlamaError::Missing { key, expected }),
            Some(None) => Err(LlamaError::Missing { key, expected }),
            Some(Some(Ok(x))) => Ok(x),
            Some(Some(Err(why))) => Err(LlamaError::BadValue { key, why }),
        }
    }

    /// A positive integer that fits a usize; `default` when absent.
    fn count(&self, k: &str, default: Option<usize>) -> Result<usize, LlamaError> {
        self.value(k, default, "a non-negative integer", |v| {
            let n = v.as_u64()?;
            Some(match usize::try_from(n) {
                Ok(n) if n > 0 && n <= u32::MAX as usize => Ok(n),
                _ => Err(format!("{n} is not in 1..=2^32-1")),
            })
        })
    }

    /// A positive finite float; `default` when absent.
    fn positive(&self, k: &str, default: Option<f32>) -> Result<f32, LlamaError> {
        self.value(k, default, "a float", |v| {
            let x = v.as_f32()?;
            Some(if x.is_finite() && x > 0.0 {
                Ok(x)
            } else {
                Err(format!("{x} is not a positive finite number"))
            })
        })
    }
}

fn bad(key: String, why: String) -> LlamaError {
    LlamaError::BadValue { key, why }
}

impl LlamaConfig {
    /// Reads and checks the hyper-parameters (without the tensor table).
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<LlamaConfig, LlamaError> {
        let arch = match gguf.get_str("general.architecture") {
            Some("llama") => "llama",
            other => {
                return Err(LlamaError::UnsupportedArchitecture {
                    arch: other.map(shown),
                })
            }
        };
        let rope_style = RopeStyle::Adjacent;
        let m = Meta { gguf, arch };
        let layers = m.count("block_count", None)?;
        let dim = m.count("embedding_length", None)?;
        let ffn_dim = m.count("feed_forward_length", None)?;
        let heads = m.count("attention.head_count", None)?;
        let kv_heads = m.count("attention.head_count_kv", Some(heads))?;
        let context_len = m.count("context_length", None)?;
        if dim % heads != 0 {
            return Err(bad(
                m.key("attention.head_count"),
                format!("{heads} heads do not divide the embedding length {dim}"),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(bad(
                m.key("attention.head_count_kv"),
                format!("{kv_heads} key/value heads do not divide the {heads} heads"),
            ));
        }
        let head_dim = dim / heads;
        if head_dim % 2 != 0 {
            return Err(bad(
                m.key("attention.head_count"),
                format!("head size {dim}/{heads} = {head_dim} is odd"),
            ));
        }
        for k in ["attention.key_length", "attention.value_length"] {
            if let Some(v) = gguf.get(&m.key(k)) {
                if v.as_u64() != Some(head_dim as u64) {
                    return Err(LlamaError::Unsupported {
                        what: format!("{} {v} differs from dim/heads = {head_dim}", m.key(k)),
                    });
                }
            }
        }
        let rope_dim = m.count("rope.dimension_count", Some(head_dim))?;
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                m.key("rope.dimension_count"),
                format!("{rope_dim} is odd or larger than the head size {head_dim}"),
            ));
        }
        // The ROPE kernel rotates whole heads: a partial rotation would give wrong logits.
        if rope_dim != head_dim {
            return Err(LlamaError::Unsupported {
                what: format!(
                    "{} {rope_dim}: rope on part of a head (the head size is {head_dim})",
                    m.key("rope.dimension_count")
                ),
            });
        }
        let rope_base = m.positive("rope.freq_base", Some(10000.0))?;
        // The ROPE kernel refuses a base of 1 or less (no rotation, or one that grows
        // with the dimension): refused here by name, not at the first forward pass.
        if rope_base <= 1.0 {
            return Err(bad(
                m.key("rope.freq_base"),
                format!("{rope_base} is not above 1"),
            ));
        }
        let rms_eps = m.positive("attention.layer_norm_rms_epsilon", None)?;
        match gguf.get(&m.key("rope.scaling.type")) {
            None => {}
            Some(v) if v.as_str() == Some("none") => {}
            Some(v) => {
                return Err(LlamaError::Unsupported {
                    what: format!("{} {v} (rope scaling)", m.key("rope.scaling.type")),
                })
            }
        }
        if let Some(factor) = gguf.get_f32(&m.key("rope.scaling.factor")) {
            if factor != 0.0 && factor != 1.0 {
                return Err(LlamaError::Unsupported {
                    what: format!("{} {factor} (rope scaling)", m.key("rope.scaling.factor")),
                });
            }
        }
        let vocab = match gguf.get_str_array("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.len(),
            None => match gguf.get(&m.key("vocab_size")) {
                Some(_) => m.count("vocab_size", None)?,
                // Without either, the embedding decides (filled in by LlamaModel).
                None => 0,
            },
        };
        Ok(LlamaConfig {
            layers,
            dim,
            ffn_dim,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context_len,
            rope_base,
            rope_dim,
            rms_eps,
            rope_style,
        })
    }
}

/// Looks up tensor `name` and checks its shape (`ne[0]` first; unlisted dimensions 1)
/// and, if given, its type.
fn tensor(
    gguf: &Gguf<'_>,
    name: &str,
    shape: &[u64],
    dtype: Option<DType>,
) -> Result<Weight, LlamaError> {
    let t = gguf.tensor(name).ok_or_else(|| LlamaError::MissingTensor {
        tensor: name.into(),
    })?;
    let mut want = [1u64; MAX_DIMS];
    for (w, &s) in want.iter_mut().zip(shape) {
        *w = s;
    }
    if t.ne != want {
        return Err(LlamaError::Shape {
            tensor: name.into(),
            expected: shape.into(),
            found: t.dims().into(),
        });
    }
    if let Some(expected) = dtype {
        if t.dtype != expected {
            return Err(LlamaError::Type {
                tensor: name.into(),
                expected,
                found: t.dtype,
            });
        }
    }
    Ok(Weight::of(t))
}

/// A `[dim, rows]` matrix whose rows are at least the vocabulary, as its first `vocab`
/// rows (all of them if `vocab` is 0): the logits have a column per token, no more (a
/// padded table's extra rows are no token's).
fn vocab_matrix(gguf: &Gguf<'_>, name: &str, dim: u64, vocab: u64) -> Result<Weight, LlamaError> {
    let rows = match gguf.tensor(name) {
        Some(t) if t.n_dims == 2 => t.ne[1],
        _ => vocab.max(1),
    };
    let w = tensor(gguf, name, &[dim, rows], None)?;
    if vocab > w.rows {
        return Err(LlamaError::VocabTooLarge {
            tensor: name.into(),
            vocab,
            rows: w.rows,
        });
    }
    Ok(w.first_rows(vocab))
}

/// True for the tensor names of the llama layout with `layers` blocks.
fn expected_tensor(name: &str, layers: usize) -> bool {
    if matches!(
        name,
        "token_embd.weight" | "output_norm.weight" | "output.weight" | ROPE_FACTORS
    ) {
        return true;
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return false;
    };
    let Some((n, part)) = rest.split_once('.') else {
        return false;
    };
    let layer_ok = n
        .parse::<usize>()
        .is_ok_and(|l| l < layers && format!("{l}") == n);
    layer_ok
        && part
            .strip_suffix(".weight")
            .is_some_and(|p| LAYER_TENSORS.contains(&p))
}

impl LlamaModel {
    /// Reads the configuration and the tensor table, checking every shape.
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<LlamaModel, LlamaError> {
        let mut config = LlamaConfig::from_gguf(gguf)?;
        let c = config;
        let (dim, ffn, kv) = (
            c.dim as u64,
            c.ffn_dim as u64,
            (c.kv_heads * c.head_dim) as u64,
        );
        let token_embd = vocab_matrix(gguf, "token_embd.weight", dim, c.vocab as u64)?;
        if config.vocab == 0 {
            config.vocab = usize::try_from(token_embd.rows).unwrap_or(usize::MAX);
        }
        let vocab = config.vocab as u64;
        let output_norm = tensor(gguf, "output_norm.weight", &[dim], Some(DType::F32))?;
        let output = match gguf.tensor("output.weight") {
            None => None,
            Some(_) => Some(vocab_matrix(gguf, "output.weight", dim, vocab)?),
        };
        let mut layers = Vec::new();
        for l in 0..c.layers {
            let t = |part: &str, shape: &[u64], dtype| {
                tensor(gguf, &format!("blk.{l}.{part}.weight"), shape, dtype)
            };
            layers.push(Layer {
                attn_norm: t("attn_norm", &[dim], Some(DType::F32))?,
                attn_q: t("attn_q", &[dim, dim], None)?,
                attn_k: t("attn_k", &[dim, kv], None)?,
                attn_v: t("attn_v", &[dim, kv], None)?,
                attn_output: t("attn_output", &[dim, dim], None)?,
                ffn_norm: t("ffn_norm", &[dim], Some(DType::F32))?,
                ffn_gate: t("ffn_gate", &[dim, ffn], None)?,
                ffn_up: t("ffn_up", &[dim, ffn], None)?,
                ffn_down: t("ffn_down", &[ffn, dim], None)?,
            });
        }
        let rope_factors = match gguf.tensor(ROPE_FACTORS) {
            None => None,
            Some(_) => {
                let pairs = (c.rope_dim / 2) as u64;
                Some(tensor(gguf, ROPE_FACTORS, &[pairs], Some(DType::F32))?)
            }
        };
        if let Some(t) = gguf
            .tensors()
            .iter()
            .find(|t| !expected_tensor(t.name, c.layers))
        {
            return Err(LlamaError::UnexpectedTensor {
                tensor: shown(t.name),
            });
        }
        Ok(LlamaModel {
            config,
            token_embd,
            output_norm,
            output,
            layers,
            rope_factors,
        })
    }

    /// The rope frequency factors, half a head of them: read from `data`, the bytes of
    /// [`Self::rope_factors`] (little-endian f32), each checked to be a positive finite
    /// number; all 1 for a model without them (`data` is then not read).
    pub fn rope_factor_values(&self, data: &[u8]) -> Result<Vec<f32>, LlamaError> {
        let pairs = self.config.rope_dim / 2;
        if self.rope_factors.is_none() {
            return Ok(alloc::vec![1.0; pairs]);
        }
        let bad = |why: String| LlamaError::BadTensorData {
            tensor: ROPE_FACTORS.into(),
            why,
        };
        if data.len() != pairs * 4 {
            return Err(bad(format!(
                "{} bytes of data, expected {}",
                data.len(),
                pairs * 4
            )));
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        match values.iter().position(|x| !(x.is_finite() && *x > 0.0)) {
            Some(i) => Err(bad(format!(
                "factor {i} is {}, not a positive finite number",
                values[i]
            ))),
            None => Ok(values),
        }
    }

    /// The output projection: `output.weight`, or `token_embd.weight` when tied.
    pub fn output_weight(&self) -> Weight {
        self.output.unwrap_or(self.token_embd)
    }

    /// Every weight tensor: embedding, each layer's, final norm, output if not tied,
    /// rope factors if any.
    pub fn weights(&self) -> impl Iterator<Item = Weight> + '_ {
        core::iter::once(self.token_embd)
            .chain(self.layers.iter().flat_map(|l| l.weights()))
            .chain(core::iter::once(self.output_norm))
            .chain(self.output)
            .chain(self.rope_factors)
    }

    /// Bytes of all weights.
    pub fn weight_bytes(&self) -> u64 {
        self.weights().map(|w| w.size).fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tests::{file, string};

    /// The message of the error [`LlamaConfig::from_gguf`] gives for a llama header with
    /// `extra` metadata (key, type code, value bytes) after its required keys.
    fn config_error(extra: &[(&str, u32, &[u8])]) -> String {
        let arch = string("llama");
        let (u32_code, f32_code, str_code) = (4, 6, 8);
        let mut kvs: Vec<(&str, u32, &[u8])> = Vec::new();
        let (one, eight, eps) = (
            1u32.to_le_bytes(),
            8u32.to_le_bytes(),
            1e-5f32.to_le_bytes(),
        );
        kvs.push(("general.architecture", str_code, &arch));
        kvs.push(("llama.block_count", u32_code, &one));
        kvs.push(("llama.embedding_length", u32_code, &eight));
        kvs.push(("llama.feed_forward_length", u32_code, &eight));
        kvs.push(("llama.attention.head_count", u32_code, &one));
        kvs.push(("llama.context_length", u32_code, &eight));
        kvs.push(("llama.attention.layer_norm_rms_epsilon", f32_code, &eps));
        kvs.extend_from_slice(extra);
        let bytes = file(&kvs, &[]);
        let gguf = Gguf::parse(&bytes, bytes.len() as u64).expect("a valid header");
        match LlamaConfig::from_gguf(&gguf) {
            Ok(_) => panic!("a bad configuration was taken"),
            Err(e) => format!("{e}"),
        }
    }

    #[test]
    fn a_megabyte_value_makes_a_short_message() {
        let long: String = core::iter::repeat_n('\u{1}', 1 << 20).collect();
        let long = string(&long);
        for key in ["llama.attention.key_length", "llama.rope.scaling.type"] {
            let m = config_error(&[(key, 8, &long)]);
            assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
            assert!(
                m.starts_with(&format!("unsupported: {key} \"\\u{{1}}")),
                "{m}"
            );
            assert!(m.contains("…\""), "{m}");
        }
        // An array is its length and type.
        let array = [&8u32.to_le_bytes()[..], &1u64.to_le_bytes(), &string("x")].concat();
        let m = config_error(&[("llama.rope.scaling.type", 9, &array)]);
        assert_eq!(
            m,
            "unsupported: llama.rope.scaling.type an array of 1 Str (rope scaling)"
        );
    }

    #[test]
    fn a_megabyte_architecture_makes_a_short_message() {
        let long: String = core::iter::repeat_n('\u{1}', 1 << 20).collect();
        let bytes = file(&[("general.architecture", 8, &string(&long))], &[]);
        let gguf = Gguf::parse(&bytes, bytes.len() as u64).expect("a valid header");
        let m = format!("{}", LlamaConfig::from_gguf(&gguf).unwrap_err());
        assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
        assert!(
            m.ends_with("…\" is not supported (only \"llama\" is)"),
            "{m}"
        );
    }
}
