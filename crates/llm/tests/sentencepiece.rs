//! The SentencePiece tokenizer (`tokenizer.ggml.model` "llama": TinyLlama, Llama 2)
//! against the sentencepiece library itself: `tests/data/spm_bpe.json` holds a small BPE
//! vocabulary it trained and the ids it gives a set of texts
//! (`tools/reference/spm_fixture.py` writes it).

mod common;

use common::*;
use ferry_llm::gguf::Gguf;
use ferry_llm::{TokenType, Tokenizer, TokenizerModel};

/// The fixture: the GGUF tokenizer metadata of its vocabulary, and its cases.
fn fixture(add_space_prefix: Option<bool>) -> (Writer, Vec<(String, Vec<u32>)>) {
    let mut w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("tokenizer.ggml.unknown_token_id", V::U32(0))
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(true));
    let cases = set_spm_vocabulary(&mut w);
    if let Some(prefix) = add_space_prefix {
        w.set("tokenizer.ggml.add_space_prefix", V::Bool(prefix));
    }
    (w, cases)
}

fn tokenizer(w: &Writer) -> Tokenizer {
    let bytes = w.build();
    let g = Gguf::parse(&bytes, bytes.len() as u64).expect("valid GGUF");
    Tokenizer::from_gguf(&g).expect("a SentencePiece tokenizer")
}

#[test]
fn encodes_as_the_sentencepiece_library_does() {
    let (w, cases) = fixture(None);
    let tok = tokenizer(&w);
    assert_eq!(
        tok.model(),
        TokenizerModel::SentencePiece {
            add_space_prefix: true
        }
    );
    assert_eq!(tok.pre_tokenizer(), None);
    assert_eq!(
        (tok.unk(), tok.bos(), tok.eos()),
        (Some(0), Some(1), Some(2))
    );
    assert!(tok.add_bos());
    assert!(cases.len() >= 20);
    let mut bytes_fell_back = false;
    for (text, want) in &cases {
        let got = tok.encode(text, false);
        assert_eq!(&got, want, "{text:?}");
        bytes_fell_back |= got
            .iter()
            .any(|&id| tok.token_type(id) == Some(TokenType::Byte));
        // Decoding gives the text back, after the space the prefix put before it; a `▁`
        // of the text itself comes back a space, as SentencePiece spells spaces so.
        assert_eq!(
            tok.decode(&got),
            format!(" {}", text.replace('\u{2581}', " ")),
            "{text:?}"
        );
    }
    assert!(bytes_fell_back, "some case falls back to byte tokens");
}

#[test]
fn a_special_token_is_matched_only_when_asked_and_text_after_it_gets_a_space() {
    let (w, _) = fixture(None);
    let tok = tokenizer(&w);
    let alone = tok.encode("Hello", false);
    // Parsed: </s> is its own token, and "Hello" after it is prefixed as at the start.
    let parsed = tok.encode("</s>Hello", true);
    assert_eq!(parsed[0], 2);
    assert_eq!(&parsed[1..], &alone[..]);
    // Not parsed: the characters are text, and no merge makes them the control token.
    let plain = tok.encode("</s>Hello", false);
    assert!(
        !plain.contains(&2) && !plain.contains(&1) && !plain.contains(&0),
        "{plain:?}"
    );
    assert_eq!(tok.decode(&plain), " </s>Hello");
    // Nothing to encode, nothing encoded (no lone prefix).
    assert_eq!(tok.encode("", false), Vec::<u32>::new());
}

#[test]
fn without_the_space_prefix_a_text_is_marked_only_where_it_has_spaces() {
    let (w, cases) = fixture(Some(false));
    let tok = tokenizer(&w);
    for (text, want) in &cases {
        // The library put "▁" before each text: ours, without the prefix, must give its
        // ids for the text after one space, and decode without adding one.
        let spaced = format!(" {text}");
        let got = tok.encode(&spaced, false);
        assert_eq!(&got, want, "{spaced:?}");
        assert_eq!(tok.decode(&got), spaced.replace('\u{2581}', " "));
    }
    assert_ne!(
        tok.encode("Hello", false),
        cases[0].1,
        "no prefix: \"Hello\" is not \" Hello\""
    );
}

#[test]
fn a_vocabulary_that_names_no_special_tokens_gets_llama_cpp_s() {
    let (mut w, cases) = fixture(None);
    for key in [
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
    ] {
        w.remove(key);
    }
    let tok = tokenizer(&w);
    assert_eq!(
        (tok.unk(), tok.bos(), tok.eos()),
        (Some(0), Some(1), Some(2))
    );
    assert!(
        tok.add_bos(),
        "SentencePiece prompts start with BOS by default"
    );
    assert_eq!(tok.encode(&cases[0].0, false), cases[0].1);
}

#[test]
fn no_merge_spells_a_control_or_byte_token_and_ties_of_zero_scores_go_leftmost() {
    // "<s" is a piece, so "<s" + ">" would make "<s>" (control) and "<0x" + "41>" the
    // byte token of 'A', were those allowed as merges.
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x41>",
        "<",
        "s",
        ">",
        "<s",
        "\u{2581}",
        "0",
        "x",
        "4",
        "1",
        "<0",
        "<0x",
        "41",
        "41>",
        "ab",
        "bc",
        "a",
        "b",
        "c",
        "<unused0>",
    ];
    let types = [
        2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5,
    ];
    // "ab" and "bc" score -0 and 0: equal, so "abc" merges its leftmost pair first.
    let scores = [
        0.0, 0.0, 0.0, 0.0, -9.0, -9.0, -9.0, -1.0, -9.0, -9.0, -9.0, -9.0, -9.0, -2.0, -3.0, -4.0,
        -5.0, -0.0, 0.0, -9.0, -9.0, -9.0, 0.0,
    ];
    let w = Writer::new()
        .kv("tokenizer.ggml.model", s("llama"))
        .kv("tokenizer.ggml.add_space_prefix", V::Bool(false))
        .kv(
            "tokenizer.ggml.tokens",
            V::Strs(tokens.iter().map(|t| t.to_string()).collect()),
        )
        .kv("tokenizer.ggml.token_type", V::I32s(types.to_vec()))
        .kv("tokenizer.ggml.scores", V::F32s(scores.to_vec()))
        .kv("tokenizer.ggml.unknown_token_id", V::U32(0));
    let tok = tokenizer(&w);
    let id = |t: &str| tokens.iter().position(|x| *x == t).unwrap() as u32;
    assert_eq!(tok.encode("<s>", false), [id("<s"), id(">")]);
    assert_eq!(tok.encode("<0x41>", false), [id("<0x"), id("41>")]);
    assert_eq!(tok.encode("abc", false), [id("ab"), id("c")]);
    // A character without a piece or a byte token is the unknown token, one per byte.
    assert_eq!(tok.encode("d", false), [0]);
    assert_eq!(tok.encode("A", false), [id("<0x41>")]);
    // An unused slot decodes to nothing, as in llama.cpp.
    assert_eq!(tok.decode(&[id("<unused0>"), id("ab")]), "ab");
    // Without the key, the unknown token is 0 (llama.cpp's default), so such text is
    // still said.
    let mut w = w;
    w.remove("tokenizer.ggml.unknown_token_id");
    assert_eq!(tokenizer(&w).encode("d", false), [0]);
}
