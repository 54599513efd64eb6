//! Against the real SmolLM2-135M-Instruct Q4_1 file, when it is present (FERRY_MODEL, or
//! models/SmolLM2-135M-Instruct.Q4_1.gguf at the repository root). Without it each test
//! prints a SKIPPED line; FERRY_REQUIRE_MODEL=1 turns that into a failure.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use ferry_abi::accel::dtype::DType;
use ferry_llm::gguf::{Gguf, GgufError};
use ferry_llm::{ChatTemplate, LlamaModel, Message, RopeStyle, Tokenizer};

/// The first bytes of the file (as many as the header needs) and its size, read the
/// way a guest would: start small, read what NeedMore asks for.
fn read_header(path: &Path) -> (Vec<u8>, u64) {
    let mut f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut buf = Vec::new();
    let mut want = 64 * 1024u64;
    loop {
        let have = buf.len() as u64;
        (&mut f).take(want - have).read_to_end(&mut buf).unwrap();
        match Gguf::parse(&buf, size) {
            Ok(_) => return (buf, size),
            Err(GgufError::NeedMore { bytes }) => {
                assert!(bytes > want && bytes <= size);
                want = bytes;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

const PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

// Expected token ids, from an independent Python tokenizer written for this purpose:
// the vocabulary and merges read from this GGUF file with the `gguf` pip package, the
// "smollm" pre-tokenizer done with the `regex` module (`\p{N}` split, then the GPT-2
// pattern), GPT-2's bytes_to_unicode and encoder.py-style BPE by merge rank, and
// control tokens split off first (longest first).
const CAPITAL_IDS: [u32; 7] = [1780, 314, 260, 3575, 282, 4649, 47];
const PROMPT_IDS: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];
const MIXED: &str = "Hello, world! It's 2024... I'll pay $3.50 for 12 apples; they're   great.\n\n\tTabs\tand  double  spaces  ";
const MIXED_IDS: [u32; 42] = [
    19556, 28, 905, 17, 657, 506, 216, 34, 32, 34, 36, 2026, 339, 3060, 2290, 1885, 35, 30, 37, 32,
    327, 216, 33, 34, 13855, 43, 502, 2316, 256, 1109, 30, 1116, 197, 68, 7366, 197, 397, 216,
    5561, 216, 5600, 256,
];
const UNICODE: &str = "naïve café — Straße, 東京は日本の首都です。😀👍🏽 ½ Ⅻ ٣٤";
const UNICODE_IDS: [u32; 48] = [
    3546, 46494, 37366, 1841, 19144, 34878, 85, 28, 17097, 247, 126, 16736, 122, 7365, 124, 23274,
    115, 40993, 26453, 180, 116, 240, 180, 38466, 7365, 117, 39958, 19076, 10813, 242, 218, 10813,
    235, 231, 10813, 233, 138, 216, 16738, 216, 173, 223, 121, 216, 164, 113, 164, 114,
];
const CODE: &str = "def f(x):\n    return x**2  # comment\n";
const CODE_IDS: [u32; 14] = [
    1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5189, 198,
];

#[test]
fn real_model_header_and_config() {
    let Some(path) = common::real_model("real_model_header_and_config") else {
        return;
    };
    let (buf, size) = read_header(&path);
    assert!(buf.len() < 4 << 20, "{}", buf.len());
    let g = Gguf::parse(&buf, size).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(g.data_offset(), 1_785_664);
    let m = LlamaModel::from_gguf(&g).unwrap();
    let c = m.config;
    assert_eq!(
        (c.layers, c.dim, c.heads, c.kv_heads, c.head_dim, c.ffn_dim, c.vocab),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    assert_eq!(
        (c.rope_base, c.rope_dim, c.rms_eps, c.context_len),
        (100000.0, 64, 1e-5, 8192)
    );
    assert_eq!(c.rope_style, RopeStyle::Adjacent);
    assert_eq!(m.output, None);
    let e = m.token_embd;
    assert_eq!(
        (e.dtype, e.rows, e.cols, e.offset, e.size),
        (DType::Q8_0, 49152, 576, 1_785_664, 30_081_024)
    );
    for l in &m.layers {
        assert_eq!(
            (l.attn_norm.dtype, l.ffn_norm.dtype),
            (DType::F32, DType::F32)
        );
        for w in [
            l.attn_q,
            l.attn_k,
            l.attn_v,
            l.attn_output,
            l.ffn_gate,
            l.ffn_up,
            l.ffn_down,
        ] {
            assert_eq!(w.dtype, DType::Q4_1);
        }
    }
    assert_eq!(
        (m.layers[0].attn_k.rows, m.layers[0].ffn_down.cols),
        (192, 1536)
    );
    let end = m.weights().map(|w| w.offset + w.size).max().unwrap();
    assert!(end <= size);
    // The whole file, cut short by one byte, is a truncated file.
    assert!(matches!(
        Gguf::parse(&buf, end - 1),
        Err(GgufError::DataPastEnd { .. })
    ));
}

#[test]
fn real_model_tokenizer_and_chat() {
    let Some(path) = common::real_model("real_model_tokenizer_and_chat") else {
        return;
    };
    let (buf, size) = read_header(&path);
    let g = Gguf::parse(&buf, size).unwrap();
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    eprintln!("tokenizer tables built in {:?}", t0.elapsed());
    assert_eq!((tok.len(), tok.bos(), tok.eos()), (49152, Some(1), Some(2)));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.is_control(1) && tok.is_control(2));

    let chat = ChatTemplate::from_gguf(&g).unwrap();
    let msg = Message {
        role: "user",
        content: "What is the capital of France?",
    };
    let prompt = chat.render(&[msg], true);
    assert_eq!(prompt, PROMPT);
    // <|im_end|> ends a turn; <|endoftext|> (a control token too) ends a text.
    assert_eq!(chat.stop_tokens(&tok), [0, 2]);
    assert_eq!(tok.end_of_generation(), [0, 2]);

    let t0 = Instant::now();
    let ids = tok.encode(&prompt, true);
    eprintln!("prompt encoded in {:?}", t0.elapsed());
    assert_eq!(ids[0], 1);
    assert_eq!(ids, PROMPT_IDS);
    assert_eq!(tok.decode(&ids), PROMPT);
    assert_eq!(
        tok.encode("What is the capital of France?", true),
        CAPITAL_IDS
    );
    for (text, want) in [
        (MIXED, &MIXED_IDS[..]),
        (UNICODE, &UNICODE_IDS),
        (CODE, &CODE_IDS),
    ] {
        let ids = tok.encode(text, true);
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids), text);
    }
    // Without parse_special the markers are plain text.
    let plain = tok.encode(PROMPT, false);
    assert!(!plain.contains(&1) && !plain.contains(&2));
    assert_eq!(tok.decode(&plain), PROMPT);
}
