//! Test helpers: a tiny GGUF writer, a tiny llama model with a byte-level vocabulary,
//! the SentencePiece vocabulary the sentencepiece library trained, and the location of
//! the real model file.

#![allow(dead_code)]

use std::path::PathBuf;

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    U32s(Vec<u32>),
    F32s(Vec<f32>),
    /// A value type code and its raw bytes, for malformed values.
    Raw(u32, Vec<u8>),
}

pub fn s(x: &str) -> V {
    V::Str(x.into())
}

/// A tensor to write: name, dims (ne[0] first), GGML type code, and an offset to write
/// instead of the computed one.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub code: u32,
    pub offset: Option<u64>,
}

/// A GGUF file under construction.
#[derive(Clone, Debug)]
pub struct Writer {
    pub version: u32,
    pub kvs: Vec<(String, V)>,
    pub tensors: Vec<T>,
    /// Alignment used for the layout (write `general.alignment` yourself to change the
    /// file's).
    pub alignment: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_code(v: &V) -> u32 {
    match v {
        V::U8(_) => 0,
        V::I8(_) => 1,
        V::U16(_) => 2,
        V::I16(_) => 3,
        V::U32(_) => 4,
        V::I32(_) => 5,
        V::F32(_) => 6,
        V::Bool(_) => 7,
        V::Str(_) => 8,
        V::Strs(_) | V::I32s(_) | V::U32s(_) | V::F32s(_) => 9,
        V::U64(_) => 10,
        V::I64(_) => 11,
        V::F64(_) => 12,
        V::Raw(c, _) => *c,
    }
}

fn put_value(out: &mut Vec<u8>, v: &V) {
    match v {
        V::U8(x) => out.push(*x),
        V::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => out.push(*x as u8),
        V::Str(x) => put_str(out, x),
        V::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::Strs(xs) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                put_str(out, x);
            }
        }
        V::I32s(xs) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        V::U32s(xs) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        V::F32s(xs) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        V::Raw(_, bytes) => out.extend_from_slice(bytes),
    }
}

/// Bytes of a tensor of GGML type `code` (0 for types we do not know).
pub fn tensor_bytes(code: u32, dims: &[u64]) -> u64 {
    let (block, bytes) = match code {
        0 => (1, 4),
        1 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        _ => return 0,
    };
    let n = dims.iter().fold(1u64, |a, &d| a.saturating_mul(d));
    (n / block).saturating_mul(bytes)
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    pub fn kv(mut self, key: &str, v: V) -> Writer {
        self.kvs.push((key.into(), v));
        self
    }

    /// Replaces (or adds) metadata `key`.
    pub fn set(&mut self, key: &str, v: V) {
        match self.kvs.iter_mut().find(|kv| kv.0 == key) {
            Some(kv) => kv.1 = v,
            None => self.kvs.push((key.into(), v)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.kvs.retain(|kv| kv.0 != key);
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], code: u32) -> Writer {
        self.tensors.push(T {
            name: name.into(),
            dims: dims.into(),
            code,
            offset: None,
        });
        self
    }

    pub fn find_tensor(&mut self, name: &str) -> &mut T {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn remove_tensor(&mut self, name: &str) {
        self.tensors.retain(|t| t.name != name);
    }

    /// The file bytes, with each tensor's data filled with a byte pattern, and
    /// the (relative) data offset of each tensor.
    pub fn build_with_offsets(&self) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend_from_slice(&type_code(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offsets = Vec::new();
        let mut next = 0u64;
        for t in &self.tensors {
            let size = tensor_bytes(t.code, &t.dims);
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            next = off
                .saturating_add(size)
                .checked_next_multiple_of(self.alignment)
                .unwrap_or(u64::MAX);
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.code.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        let data = (out.len() as u64).next_multiple_of(self.alignment);
        out.resize(data as usize, 0);
        let end = self
            .tensors
            .iter()
            .zip(&offsets)
            .map(|(t, o)| o.saturating_add(tensor_bytes(t.code, &t.dims)))
            .filter(|&end| end < 1 << 30) // an absurd offset gets no data
            .max()
            .unwrap_or(0);
        out.extend((0..end).map(|i| (i % 251) as u8));
        (out, offsets)
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_offsets().0
    }
}

/// `file` (a whole GGUF file) with one more tensor, `name` of `dims` in type `code`
/// holding `data`, placed after all the others: the header grows by its info, the data
/// section moves with it (to the file's alignment) and every other offset, relative to
/// that section, stays right.
pub fn with_tensor(file: &[u8], name: &str, dims: &[u64], code: u32, data: &[u8]) -> Vec<u8> {
    let g = ferry_llm::gguf::Gguf::parse(file, file.len() as u64).expect("a valid GGUF file");
    let (header, old_data) = (g.header_len() as usize, &file[g.data_offset() as usize..]);
    let align = g.alignment() as usize;
    let at = old_data.len().next_multiple_of(align);
    let mut out = file[..header].to_vec();
    let tensors = u64::from_le_bytes(out[8..16].try_into().unwrap());
    out[8..16].copy_from_slice(&(tensors + 1).to_le_bytes());
    put_str(&mut out, name);
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(at as u64).to_le_bytes());
    out.resize(out.len().next_multiple_of(align), 0);
    out.extend_from_slice(old_data);
    out.resize(out.len() + at - old_data.len(), 0);
    out.extend_from_slice(data);
    out
}

/// Llama 3.1's rope frequency factors (its converter's formula: `factor` for pairs whose
/// wavelength exceeds `context / low`, 1 below `context / high`, a blend between) for
/// heads of `head_dim` and rope base `base`, as little-endian f32.
pub fn llama31_rope_factors(head_dim: usize, base: f64, context: f64) -> Vec<u8> {
    let (factor, low, high) = (8.0, 1.0, 4.0);
    (0..head_dim / 2)
        .map(|i| {
            let wavelength =
                2.0 * std::f64::consts::PI * base.powf(2.0 * i as f64 / head_dim as f64);
            if wavelength < context / high {
                1.0
            } else if wavelength > context / low {
                factor
            } else {
                let smooth = (context / wavelength - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .flat_map(|f| (f as f32).to_le_bytes())
        .collect()
}

/// GPT-2's printable stand-in for each byte.
pub fn byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + n).unwrap()
}

/// Byte-level spelling of `text`.
pub fn spell(text: &str) -> String {
    text.bytes().map(byte_char).collect()
}

/// The tiny vocabulary: 4 special tokens, the 256 bytes, then the merge results.
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<String>,
}

pub fn tiny_vocab() -> Vocab {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
        "<tool>".into(),
    ];
    let mut types = vec![3, 3, 3, 4];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(1);
    }
    let merges: Vec<(&str, &str)> = vec![
        ("h", "e"),
        ("l", "l"),
        ("Ġ", "t"),
        ("Ġt", "he"),
        ("he", "ll"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("Ġwor", "ld"), // "ld" is not a token: this merge can never apply
        ("Ġ", "Ġ"),
        ("a", "a"),
    ];
    let mut merge_strs = Vec::new();
    for (a, b) in merges {
        let joined = format!("{a}{b}");
        if a != "Ġwor" && !tokens.contains(&joined) {
            tokens.push(joined);
            types.push(1);
        }
        merge_strs.push(format!("{a} {b}"));
    }
    Vocab {
        tokens,
        types,
        merges: merge_strs,
    }
}

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Hyper-parameters of the tiny llama model.
pub const DIM: u64 = 8;
pub const HEADS: u32 = 2;
pub const KV_HEADS: u32 = 1;
pub const FFN: u64 = 16;
pub const LAYERS: u32 = 2;

/// A tiny, valid llama model with a byte-level tokenizer; f32 weights (one f16).
pub fn tiny_llama() -> Writer {
    let v = tiny_vocab();
    let rows = v.tokens.len() as u64 + 3; // padded embedding
    let head_dim = DIM / HEADS as u64;
    let kv = head_dim * KV_HEADS as u64;
    let mut w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("general.name", s("tiny"))
        .kv("llama.block_count", V::U32(LAYERS))
        .kv("llama.context_length", V::U32(128))
        .kv("llama.embedding_length", V::U32(DIM as u32))
        .kv("llama.feed_forward_length", V::U32(FFN as u32))
        .kv("llama.attention.head_count", V::U32(HEADS))
        .kv("llama.attention.head_count_kv", V::U32(KV_HEADS))
        .kv("llama.rope.freq_base", V::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv("tokenizer.ggml.tokens", V::Strs(v.tokens))
        .kv("tokenizer.ggml.token_type", V::I32s(v.types))
        .kv("tokenizer.ggml.merges", V::Strs(v.merges))
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.chat_template", s(CHATML_TEMPLATE))
        .tensor("token_embd.weight", &[DIM, rows], 0);
    for l in 0..LAYERS {
        let n = |p: &str| format!("blk.{l}.{p}.weight");
        w = w
            .tensor(&n("attn_norm"), &[DIM], 0)
            .tensor(&n("attn_q"), &[DIM, DIM], 0)
            .tensor(&n("attn_k"), &[DIM, kv], 0)
            .tensor(&n("attn_v"), &[DIM, kv], 1)
            .tensor(&n("attn_output"), &[DIM, DIM], 0)
            .tensor(&n("ffn_norm"), &[DIM], 0)
            .tensor(&n("ffn_gate"), &[DIM, FFN], 0)
            .tensor(&n("ffn_up"), &[DIM, FFN], 0)
            .tensor(&n("ffn_down"), &[FFN, DIM], 0);
    }
    w.tensor("output_norm.weight", &[DIM], 0)
}

/// Where the real model file is, if present (see `ferry_testdata::smollm2`).
pub fn real_model(test: &str) -> Option<PathBuf> {
    ferry_testdata::smollm2(test)
}

/// Sets on `w` the tokenizer of `tests/data/spm_bpe.json` (a SentencePiece vocabulary
/// the sentencepiece library trained, written by `tools/reference/spm_fixture.py`: its
/// tokens, scores and types, `tokenizer.ggml.model` "llama"); returns the fixture's cases,
/// each text with the ids the library gives it.
pub fn set_spm_vocabulary(w: &mut Writer) -> Vec<(String, Vec<u32>)> {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("../data/spm_bpe.json")).expect("JSON");
    let pieces = json["pieces"].as_array().expect("pieces");
    let field = |key: &'static str| pieces.iter().map(move |p| &p[key]);
    w.set("tokenizer.ggml.model", s("llama"));
    w.remove("tokenizer.ggml.pre");
    w.remove("tokenizer.ggml.merges");
    let tokens = field("piece").map(|t| t.as_str().expect("piece").into());
    w.set("tokenizer.ggml.tokens", V::Strs(tokens.collect()));
    let scores = field("score").map(|v| v.as_f64().expect("score") as f32);
    w.set("tokenizer.ggml.scores", V::F32s(scores.collect()));
    let types = field("type").map(|v| v.as_i64().expect("type") as i32);
    w.set("tokenizer.ggml.token_type", V::I32s(types.collect()));
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().expect("ids");
            let ids = ids.iter().map(|i| i.as_u64().expect("id") as u32);
            (c["text"].as_str().expect("text").into(), ids.collect())
        })
        .collect()
}
