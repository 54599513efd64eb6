//! The llama configuration and tensor table on synthetic files.

mod common;

use common::*;
use ferry_abi::accel::dtype::DType;
use ferry_llm::gguf::Gguf;
use ferry_llm::{LlamaConfig, LlamaError, LlamaModel, RopeStyle};

fn model(w: &Writer) -> Result<LlamaModel, LlamaError> {
    let bytes = w.build();
    let g = Gguf::parse(&bytes, bytes.len() as u64).expect("valid GGUF");
    LlamaModel::from_gguf(&g)
}

#[test]
fn reads_the_tiny_model() {
    let w = tiny_llama();
    let bytes = w.build();
    let g = Gguf::parse(&bytes, bytes.len() as u64).unwrap();
    let m = LlamaModel::from_gguf(&g).unwrap();
    let vocab = tiny_vocab().tokens.len();
    assert_eq!(
        m.config,
        LlamaConfig {
            layers: 2,
            dim: 8,
            ffn_dim: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            vocab,
            context_len: 128,
            rope_base: 100000.0,
            rope_dim: 4,
            rms_eps: 1e-5,
            rope_style: RopeStyle::Adjacent,
        }
    );
    assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), m.config);
    assert_eq!(m.layers.len(), 2);
    assert_eq!(m.output, None);
    assert_eq!(m.output_weight(), m.token_embd);
    let e = m.token_embd;
    let t = g.tensor("token_embd.weight").unwrap();
    // Its first `vocab` rows: the guest's logits have a column per token, and its
    // product checks that the weights have as many rows.
    let row = t.size / (vocab as u64 + 3);
    assert_eq!(
        (e.offset, e.size, e.dtype),
        (t.offset, row * vocab as u64, DType::F32)
    );
    assert_eq!((e.cols, e.rows), (8, vocab as u64));
    let k = m.layers[1].attn_k;
    assert_eq!((k.cols, k.rows), (8, 4));
    let v = m.layers[1].attn_v;
    assert_eq!((v.dtype, v.size), (DType::F16, 64));
    let d = m.layers[0].ffn_down;
    assert_eq!((d.cols, d.rows), (16, 8));
    assert_eq!(m.layers[0].attn_norm.rows, 1);
    assert_eq!(m.weights().count(), 1 + 2 * 9 + 1);
    let total: u64 = g.tensors().iter().map(|t| t.size).sum();
    assert_eq!(m.weight_bytes(), total - 3 * row);
}

#[test]
fn untied_output_and_defaults() {
    let mut w = tiny_llama();
    let rows = tiny_vocab().tokens.len() as u64;
    w = w.tensor("output.weight", &[DIM, rows], 0);
    w.remove("llama.attention.head_count_kv");
    w.remove("llama.rope.freq_base");
    w.remove("llama.rope.dimension_count");
    w.set("llama.block_count", V::I32(2));
    for l in 0..2 {
        for p in ["attn_k", "attn_v"] {
            w.find_tensor(&format!("blk.{l}.{p}.weight")).dims = vec![DIM, DIM];
        }
    }
    let m = model(&w).unwrap();
    assert_eq!(m.output.unwrap().rows, rows);
    assert_ne!(m.output_weight(), m.token_embd);
    assert_eq!(
        (m.config.kv_heads, m.config.rope_base, m.config.rope_dim),
        (2, 10000.0, 4)
    );
    // Without a tokenizer the vocabulary is the embedding's rows (or vocab_size).
    let mut w = tiny_llama();
    w.remove("tokenizer.ggml.tokens");
    assert_eq!(
        model(&w).unwrap().config.vocab,
        tiny_vocab().tokens.len() + 3
    );
    w.set("llama.vocab_size", V::U32(100));
    assert_eq!(model(&w).unwrap().config.vocab, 100);
}

fn err(f: impl FnOnce(&mut Writer)) -> LlamaError {
    let mut w = tiny_llama();
    f(&mut w);
    model(&w).unwrap_err()
}

#[test]
fn refuses_bad_configurations() {
    let e = err(|w| w.set("general.architecture", s("gpt2")));
    assert_eq!(
        e,
        LlamaError::UnsupportedArchitecture {
            arch: Some("gpt2".into())
        }
    );
    assert!(e.to_string().contains("gpt2"));
    let e = err(|w| w.remove("general.architecture"));
    assert_eq!(e, LlamaError::UnsupportedArchitecture { arch: None });
    let e = err(|w| w.remove("llama.embedding_length"));
    assert!(
        matches!(&e, LlamaError::Missing { key, .. } if key == "llama.embedding_length"),
        "{e}"
    );
    let e = err(|w| w.set("llama.block_count", s("2")));
    assert!(matches!(e, LlamaError::Missing { .. }), "{e}");
    let e = err(|w| w.set("llama.feed_forward_length", V::U32(0)));
    assert!(matches!(e, LlamaError::BadValue { .. }), "{e}");
    let e = err(|w| w.set("llama.attention.head_count", V::U32(3)));
    assert!(
        e.to_string()
            .contains("do not divide the embedding length 8"),
        "{e}"
    );
    let e = err(|w| w.set("llama.attention.head_count_kv", V::U32(3)));
    assert!(e.to_string().contains("do not divide the 2 heads"), "{e}");
    let e = err(|w| {
        w.set("llama.attention.head_count", V::U32(8));
        w.set("llama.attention.head_count_kv", V::U32(8));
    });
    assert!(e.to_string().contains("odd"), "{e}");
    let e = err(|w| w.set("llama.rope.dimension_count", V::U32(6)));
    assert!(matches!(&e, LlamaError::BadValue { key, .. } if key == "llama.rope.dimension_count"));
    // Rope on part of a head: the guest rotates whole heads.
    let e = err(|w| w.set("llama.rope.dimension_count", V::U64(2)));
    assert!(
        matches!(&e, LlamaError::Unsupported { what } if what.contains("llama.rope.dimension_count 2")),
        "{e}"
    );
    for base in [1.0, 0.5] {
        let e = err(|w| w.set("llama.rope.freq_base", V::F32(base)));
        assert!(
            matches!(&e, LlamaError::BadValue { key, .. } if key == "llama.rope.freq_base"),
            "{e}"
        );
    }
    let e = err(|w| w.set("llama.attention.layer_norm_rms_epsilon", V::F32(f32::NAN)));
    assert!(matches!(e, LlamaError::BadValue { .. }), "{e}");
    let e = err(|w| w.remove("llama.attention.layer_norm_rms_epsilon"));
    assert!(matches!(e, LlamaError::Missing { .. }), "{e}");
    let e = err(|w| w.set("llama.rope.scaling.type", s("yarn")));
    assert!(matches!(e, LlamaError::Unsupported { .. }), "{e}");
    let e = err(|w| w.set("llama.attention.key_length", V::U32(8)));
    assert!(matches!(e, LlamaError::Unsupported { .. }), "{e}");
    // Harmless versions of those are fine.
    let mut w = tiny_llama();
    w.set("llama.rope.scaling.type", s("none"));
    w.set("llama.attention.key_length", V::U32(4));
    model(&w).unwrap();
}

#[test]
fn refuses_bad_tensor_tables() {
    let e = err(|w| w.find_tensor("blk.1.attn_k.weight").dims = vec![DIM, 8]);
    assert_eq!(
        e,
        LlamaError::Shape {
            tensor: "blk.1.attn_k.weight".into(),
            expected: vec![8, 4],
            found: vec![8, 8]
        }
    );
    assert!(e.to_string().contains("blk.1.attn_k.weight") && e.to_string().contains("[8, 4]"));
    // Transposed ffn_down.
    let e = err(|w| w.find_tensor("blk.0.ffn_down.weight").dims = vec![DIM, FFN]);
    assert!(matches!(&e, LlamaError::Shape { tensor, .. } if tensor == "blk.0.ffn_down.weight"));
    // Extra dimensions must be 1.
    let e = err(|w| w.find_tensor("blk.0.attn_q.weight").dims = vec![DIM, DIM, 2]);
    assert!(matches!(e, LlamaError::Shape { .. }), "{e}");
    let mut w = tiny_llama();
    w.find_tensor("blk.0.attn_q.weight").dims = vec![DIM, DIM, 1, 1];
    model(&w).unwrap();
    // Norms are f32 vectors.
    let e = err(|w| w.find_tensor("blk.1.ffn_norm.weight").code = 1);
    assert_eq!(
        e,
        LlamaError::Type {
            tensor: "blk.1.ffn_norm.weight".into(),
            expected: DType::F32,
            found: DType::F16
        }
    );
    let e = err(|w| w.find_tensor("output_norm.weight").dims = vec![DIM, 1, 2]);
    assert!(matches!(e, LlamaError::Shape { .. }), "{e}");
    // A vocabulary larger than the embedding.
    let vocab = tiny_vocab().tokens.len() as u64;
    let e = err(|w| w.find_tensor("token_embd.weight").dims = vec![DIM, vocab - 1]);
    assert_eq!(
        e,
        LlamaError::VocabTooLarge {
            tensor: "token_embd.weight".into(),
            vocab,
            rows: vocab - 1
        }
    );
    let e = err(|w| {
        w.tensors.push(T {
            name: "output.weight".into(),
            dims: vec![DIM, vocab - 2],
            code: 0,
            offset: None,
        })
    });
    assert!(matches!(&e, LlamaError::VocabTooLarge { tensor, .. } if tensor == "output.weight"));
    let e = err(|w| w.find_tensor("token_embd.weight").dims = vec![DIM + 1, vocab]);
    assert!(matches!(e, LlamaError::Shape { .. }), "{e}");
    // Missing and unexpected tensors.
    let e = err(|w| w.remove_tensor("blk.1.ffn_up.weight"));
    assert_eq!(
        e,
        LlamaError::MissingTensor {
            tensor: "blk.1.ffn_up.weight".into()
        }
    );
    assert!(e.to_string().contains("blk.1.ffn_up.weight"));
    let e = err(|w| w.remove_tensor("token_embd.weight"));
    assert_eq!(
        e,
        LlamaError::MissingTensor {
            tensor: "token_embd.weight".into()
        }
    );
    let e = err(|w| w.set("llama.block_count", V::U32(3)));
    assert_eq!(
        e,
        LlamaError::MissingTensor {
            tensor: "blk.2.attn_norm.weight".into()
        }
    );
    let e = err(|w| w.set("llama.block_count", V::U32(1)));
    assert!(matches!(&e, LlamaError::UnexpectedTensor { tensor } if tensor.starts_with("blk.1.")));
}

#[test]
fn rope_frequency_factors_are_read_and_checked() {
    // Llama 3.1's `rope_freqs.weight`: f32, one factor per pair of a head (4 wide here).
    let plain = model(&tiny_llama()).unwrap();
    assert_eq!(plain.rope_factors, None);
    assert_eq!(plain.rope_factor_values(&[]).unwrap(), [1.0, 1.0]);
    let with = |dims: &[u64], code: u32| {
        let w = tiny_llama().tensor("rope_freqs.weight", dims, code);
        let bytes = w.build();
        let g = Gguf::parse(&bytes, bytes.len() as u64).unwrap();
        let t = g.tensor("rope_freqs.weight").map(|t| (t.offset, t.size));
        (LlamaModel::from_gguf(&g), t)
    };
    let (m, t) = with(&[2], 0);
    let m = m.unwrap();
    let f = m.rope_factors.expect("the factors");
    assert_eq!((f.offset, f.size, f.dtype), (t.unwrap().0, 8, DType::F32));
    assert_eq!(m.weights().count(), plain.weights().count() + 1);
    assert_eq!(m.weight_bytes(), plain.weight_bytes() + 8);
    let e = with(&[4], 0).0.unwrap_err();
    assert!(
        matches!(&e, LlamaError::Shape { tensor, expected, .. }
            if tensor == "rope_freqs.weight" && *expected == [2]),
        "{e}"
    );
    let e = with(&[2], 1).0.unwrap_err();
    assert!(
        matches!(
            &e,
            LlamaError::Type {
                found: DType::F16,
                ..
            }
        ),
        "{e}"
    );
    // Added to a whole file (as the guest tests add it to SmolLM2): every other tensor
    // keeps its data, the factors are where the table says.
    let plain_file = tiny_llama().build();
    let factors = llama31_rope_factors(4, 100_000.0, 256.0);
    let file = with_tensor(&plain_file, "rope_freqs.weight", &[2], 0, &factors);
    let (g0, g) = (
        Gguf::parse(&plain_file, plain_file.len() as u64).unwrap(),
        Gguf::parse(&file, file.len() as u64).unwrap(),
    );
    let m = LlamaModel::from_gguf(&g).unwrap();
    let at = |g: &Gguf<'_>, bytes: &[u8], offset: u64, size: u64| {
        assert!(offset >= g.data_offset());
        bytes[offset as usize..][..size as usize].to_vec()
    };
    for (w0, w) in plain.weights().zip(m.weights()) {
        assert_eq!(
            at(&g0, &plain_file, w0.offset, w0.size),
            at(&g, &file, w.offset, w.size)
        );
    }
    let f = m.rope_factors.unwrap();
    assert_eq!(at(&g, &file, f.offset, f.size), factors);
    // The fast pair turns as before, the slow one 8 times slower.
    assert_eq!(m.rope_factor_values(&factors).unwrap(), [1.0, 8.0]);

    // The values: each a positive finite divisor, exactly as many as pairs.
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    assert_eq!(
        m.rope_factor_values(&bytes(&[1.0, 8.0])).unwrap(),
        [1.0, 8.0]
    );
    for (values, says) in [
        (&[1.0, 0.0][..], "factor 1 is 0,"),
        (&[-2.0, 1.0], "factor 0 is -2,"),
        (&[f32::NAN, 1.0], "factor 0 is NaN,"),
        (&[1.0, f32::INFINITY], "factor 1 is inf,"),
        (&[1.0], "4 bytes of data, expected 8"),
    ] {
        let e = m.rope_factor_values(&bytes(values)).unwrap_err();
        assert!(
            matches!(&e, LlamaError::BadTensorData { tensor, .. } if tensor == "rope_freqs.weight"),
            "{e}"
        );
        assert!(e.to_string().contains(says), "{e}");
    }
}
