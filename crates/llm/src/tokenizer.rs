//! The tokenizers of GGUF files, as llama.cpp implements them: GPT-2-style byte-level
//! BPE (`tokenizer.ggml.model` `"gpt2"`: SmolLM2, Llama 3) and SentencePiece BPE
//! (`"llama"`: TinyLlama, Llama 2).
//!
//! Byte-level BPE token strings are spelled in GPT-2's byte-to-unicode alphabet (each
//! byte of the UTF-8 text is one printable character: `Ġ` is a space). Encoding splits
//! off special tokens, pre-tokenizes the rest with the regex of `tokenizer.ggml.pre` (a
//! hand-written scanner here, no regex engine), and merges each piece's bytes by merge
//! rank.
//!
//! SentencePiece token strings are UTF-8 with `▁` for a space, and bytes as `<0xHH>`
//! tokens. Encoding splits off special tokens, writes each space of the rest as `▁` (and
//! one before a text that starts the prompt or follows a special token, when
//! `tokenizer.ggml.add_space_prefix`, the default), and merges its characters, the pair
//! whose token scores highest first (`tokenizer.ggml.scores`); a character no token
//! covers becomes its bytes' tokens. Control, unknown and byte tokens are never the
//! result of a merge, so text cannot spell them (the sentencepiece library does the same).
//!
//! Pre-tokenizers: `"smollm"` (each `\p{N}` is its own piece, then the GPT-2 pattern),
//! `"llama-bpe"` (Llama 3's pattern), `"gpt2"`/`"gpt-2"` (the GPT-2 pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`) and
//! `"default"`/absent (llama.cpp's default: runs of punctuation, then the GPT-2 pattern,
//! then numbers, then ASCII digits in threes, each splitting the pieces of the one
//! before). Any other value is refused ([`TokenizerError::UnsupportedPre`]) rather than
//! tokenized with a pattern the model was not trained with.

use alloc::collections::BinaryHeap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Reverse;
use core::fmt;

use crate::gguf::{shown, Gguf, StrArray};
use crate::unicode::{is_letter, is_number, is_punctuation, is_space};

/// What kind of token an id is (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Code 0: no type given; treated as normal.
    Undefined,
    /// Code 1: an ordinary vocabulary entry.
    Normal,
    /// Code 2: the unknown token.
    Unknown,
    /// Code 3: a control token such as `<|im_start|>`.
    Control,
    /// Code 4: a user-defined token, matched in text like llama.cpp does.
    UserDefined,
    /// Code 5: an unused slot.
    Unused,
    /// Code 6: a raw byte.
    Byte,
}

impl TokenType {
    /// The type with GGUF code `code`.
    pub const fn from_code(code: i64) -> Option<TokenType> {
        Some(match code {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// How a vocabulary's tokens are made from text (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerModel {
    /// `"gpt2"`: byte-level BPE of pre-tokenized pieces, by merge rank.
    BytePairs(PreTokenizer),
    /// `"llama"`: SentencePiece BPE of the whole text, by token score.
    SentencePiece {
        /// Whether a `▁` goes before a text that starts the prompt or follows a special
        /// token (`tokenizer.ggml.add_space_prefix`, default true).
        add_space_prefix: bool,
    },
}

/// The pre-tokenizer regex family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 pattern (`tokenizer.ggml.pre` `"gpt-2"` or `"gpt2"`).
    Gpt2,
    /// llama.cpp's default (`"default"`, or no `tokenizer.ggml.pre`): runs of
    /// punctuation (`\p{P}` and `$+<=>^~|`), then the GPT-2 pattern, then runs of
    /// numbers, then ASCII digits in threes, each splitting the pieces of the one before.
    Default,
    /// Every `\p{N}` alone, then the GPT-2 pattern (`"smollm"`).
    SmolLm,
    /// Llama 3's pattern (`"llama-bpe"`): contractions, letters after at most one other
    /// character, numbers in threes, punctuation with the newlines after it, then spaces.
    Llama3,
}

/// Why a tokenizer could not be built from a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerError {
    /// A required key is missing or has the wrong type.
    Missing {
        /// The key.
        key: &'static str,
        /// The type it should have.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` is neither `"gpt2"` nor `"llama"`.
    UnsupportedModel {
        /// Its value.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not implement.
    UnsupportedPre {
        /// Its value.
        pre: String,
    },
    /// An empty vocabulary, or one of more than [`MAX_VOCAB`] tokens.
    BadVocabularySize {
        /// Its size.
        tokens: usize,
    },
    /// A token string that is not UTF-8.
    InvalidToken {
        /// The token id.
        id: u32,
    },
    /// `tokenizer.ggml.token_type` does not have one entry per token.
    TokenTypeCount {
        /// Tokens.
        tokens: usize,
        /// Token types.
        types: usize,
    },
    /// A token type code that is not one of [`TokenType`].
    BadTokenType {
        /// The token id.
        id: u32,
        /// The code (`None` if it does not fit an i64).
        code: Option<i64>,
    },
    /// A merge that is not UTF-8 or not two strings separated by a space.
    BadMerge {
        /// Its index (rank).
        index: usize,
    },
    /// A special token id (bos, eos, ...) outside the vocabulary.
    BadSpecialId {
        /// The key.
        key: &'static str,
        /// Its value.
        id: u64,
    },
    /// More special tokens (control, user-defined, unknown) than [`MAX_SPECIALS`].
    TooManySpecials {
        /// How many.
        count: usize,
    },
    /// More merge rules than [`MAX_MERGES`].
    TooManyMerges {
        /// How many.
        count: usize,
    },
    /// The token texts (copied, then decoded) do not fit in memory.
    TooLarge {
        /// Bytes of token text.
        bytes: usize,
    },
    /// `tokenizer.ggml.scores` does not have one number per token.
    ScoreCount {
        /// Tokens.
        tokens: usize,
        /// Scores.
        scores: usize,
    },
}

/// Most special tokens a vocabulary may have: every prompt is searched for each of them
/// (real vocabularies have tens, Llama 3's 256).
pub const MAX_SPECIALS: usize = 4096;

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::Missing { key, expected } => {
                write!(f, "GGUF metadata {key} is missing or not {expected}")
            }
            TokenizerError::UnsupportedModel { model } => write!(
                f,
                "tokenizer model {model:?} is not supported (\"gpt2\" byte-level BPE and \"llama\" SentencePiece are)"
            ),
            TokenizerError::UnsupportedPre { pre } => write!(
                f,
                "pre-tokenizer {pre:?} is not supported (\"smollm\", \"llama-bpe\", \"gpt2\" and \"default\" are)"
            ),
            TokenizerError::BadVocabularySize { tokens } => {
                write!(f, "vocabulary of {tokens} tokens (1 to {MAX_VOCAB} are allowed)")
            }
            TokenizerError::InvalidToken { id } => write!(f, "token {id} is not valid UTF-8"),
            TokenizerError::TokenTypeCount { tokens, types } => write!(
                f,
                "tokenizer.ggml.token_type has {types} entries for {tokens} tokens"
            ),
            TokenizerError::BadTokenType { id, code } => match code {
                Some(code) => write!(f, "token {id} has unknown token type {code}"),
                None => write!(f, "token {id} has an unknown token type"),
            },
            TokenizerError::BadMerge { index } => write!(
                f,
                "merge {index} is not two UTF-8 strings separated by a space"
            ),
            TokenizerError::BadSpecialId { key, id } => {
                write!(f, "{key} is {id}, outside the vocabulary")
            }
            TokenizerError::TooManySpecials { count } => write!(
                f,
                "the vocabulary has {count} special tokens, more than the {MAX_SPECIALS} supported (each is looked for in every prompt)"
            ),
            TokenizerError::TooManyMerges { count } => write!(
                f,
                "{count} merge rules (at most {MAX_MERGES} are allowed)"
            ),
            TokenizerError::TooLarge { bytes } => write!(
                f,
                "the vocabulary's tokens hold {bytes} bytes of text: memory has no room for the tokenizer's two copies of it"
            ),
            TokenizerError::ScoreCount { tokens, scores } => write!(
                f,
                "tokenizer.ggml.scores has {scores} numbers for {tokens} tokens"
            ),
        }
    }
}

/// A merge rule: the pair `(left, right)` becomes `result`; lower rank merges first.
#[derive(Clone, Copy, Debug)]
struct Merge {
    left: u32,
    right: u32,
    rank: u32,
    result: u32,
}

/// No token.
const NONE: u32 = u32::MAX;

/// Texts of the chat templates' markup tokens other than those that end a turn (the
/// templates of [`crate::chat`], and the common others').
const CHAT_MARKUP_TEXTS: [&str; 9] = [
    "<|im_start|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<start_of_turn>",
    "<s>",
];

/// Texts of the control tokens that end a turn or a text in the common vocabularies
/// (ChatML, Llama 2 and 3, Zephyr, Gemma, Phi), the list llama.cpp ends generation on.
const END_OF_GENERATION_TEXTS: [&str; 9] = [
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
];

/// A tokenizer built from a GGUF file (byte-level BPE or SentencePiece); owns its tables.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Token strings back to back, as in the file; token `i` is `text[text_at[i]..text_at[i+1]]`.
    text: Vec<u8>,
    text_at: Vec<usize>,
    /// Decoded bytes of each token, laid out the same way.
    bytes: Vec<u8>,
    bytes_at: Vec<usize>,
    types: Vec<TokenType>,
    /// Ids by text; for a string given twice the last id wins (as in llama.cpp).
    by_text: TextIndex,
    /// Sorted by `(left, right)` (byte-level BPE).
    merges: Vec<Merge>,
    /// Each token's score (SentencePiece; empty for byte-level BPE).
    scores: Vec<f32>,
    /// The token of each single byte, or `NONE`.
    byte_token: [u32; 256],
    /// Special tokens matched in text: longest text first, then lowest id.
    specials: Vec<u32>,
    model: TokenizerModel,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
}

/// Bytes GPT-2's alphabet spells as themselves.
const fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character of each byte: itself if printable, else U+0100 onwards in byte order.
const BYTE_CHAR: [u32; 256] = {
    let mut t = [0; 256];
    let (mut b, mut n) = (0, 0);
    while b < 256 {
        if printable(b as u8) {
            t[b] = b as u32;
        } else {
            t[b] = 0x100 + n;
            n += 1;
        }
        b += 1;
    }
    t
};

/// The bytes that are not printable, in order: U+0100 + i stands for `HIGH_BYTE[i]`.
const HIGH_BYTE: [u8; 68] = {
    let mut t = [0; 68];
    let (mut b, mut n) = (0, 0);
    while b < 256 {
        if !printable(b as u8) {
            t[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    t
};

/// GPT-2's printable stand-in for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    char::from_u32(BYTE_CHAR[b as usize]).unwrap_or('\u{FFFD}')
}

/// The byte GPT-2's alphabet spells with `c`, if any.
pub fn char_to_byte(c: char) -> Option<u8> {
    let u = c as u32;
    if let Ok(b) = u8::try_from(u) {
        return printable(b).then_some(b);
    }
    HIGH_BYTE
        .get(usize::try_from(u.checked_sub(0x100)?).ok()?)
        .copied()
}

/// Most tokens a vocabulary may have: the largest models' have a quarter of this; each
/// token takes tens of bytes of the guest's memory, so a file claiming millions of empty
/// ones is refused rather than run out of it.
pub const MAX_VOCAB: usize = 1 << 20;

/// Most merge rules a tokenizer may have (Llama 3's has 280,000), for the same reason.
pub const MAX_MERGES: usize = 1 << 21;

/// Metadata `key`, which must be an array of strings.
fn strings<'a>(gguf: &Gguf<'a>, key: &'static str) -> Result<StrArray<'a>, TokenizerError> {
    gguf.get_str_array(key).ok_or(TokenizerError::Missing {
        key,
        expected: "an array of strings",
    })
}

/// Byte-level decoding of a token string: each character of the alphabet becomes its
/// byte; a character outside it (not in a well-formed vocabulary) is kept as UTF-8.
fn decode_byte_level(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// SentencePiece decoding of a token string: `▁` is a space.
fn decode_spaces(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        let mut buf = [0; 4];
        let c = if c == SPACE_MARK { ' ' } else { c };
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
}

/// How SentencePiece spells a space.
const SPACE_MARK: char = '\u{2581}';

/// The byte of a `<0xHH>` token.
fn hex_byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The merge rules of `tokenizer.ggml.merges` whose parts and result are tokens
/// (`find` gives a text's id), sorted by `(left, right)`, the lowest rank of a pair kept.
fn merge_rules(
    gguf: &Gguf<'_>,
    find: &dyn Fn(&[u8]) -> Option<u32>,
) -> Result<Vec<Merge>, TokenizerError> {
    let merges = strings(gguf, "tokenizer.ggml.merges")?;

    if merges.len() > MAX_MERGES {
        return Err(TokenizerError::TooManyMerges {
            count: merges.len(),
        });
    }
    let mut joined = Vec::new();
    let mut rules = Vec::new();
    for (index, m) in merges.iter().enumerate() {
        // Split at the first space after the first byte, like llama.cpp.
        let parts = m.iter().skip(1).position(|&b| b == b' ').and_then(|sp| {
            let l = m.get(..sp + 1)?;
            let r = m.get(sp + 2..)?;
            core::str::from_utf8(l).ok()?;
            core::str::from_utf8(r).ok()?;
            Some((l, r))
        });
        let Some((l, r)) = parts else {
            return Err(TokenizerError::BadMerge { index });
        };
        joined.clear();
        joined.extend_from_slice(l);
        joined.extend_from_slice(r);
        // A merge whose parts or result are not tokens can never apply to token ids.
        let (Some(left), Some(right), Some(result)) = (find(l), find(r), find(&joined)) else {
            continue;
        };
        let Ok(rank) = u32::try_from(index) else {
            break;
        };
        rules.push(Merge {
            left,
            right,
            rank,
            result,
        });
    }
    // For a pair given twice, the first (lowest) rank wins.
    rules.sort_unstable_by_key(|m| (m.left, m.right, m.rank));
    rules.dedup_by_key(|m| (m.left, m.right));
    Ok(rules)
}

/// `tokenizer.ggml.scores`: one number per token of the `n`.
fn scores(gguf: &Gguf<'_>, n: usize) -> Result<Vec<f32>, TokenizerError> {
    let missing = TokenizerError::Missing {
        key: "tokenizer.ggml.scores",
        expected: "an array of numbers",
    };
    let array = gguf
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.as_array())
        .ok_or(missing.clone())?;
    if array.len() != n {
        return Err(TokenizerError::ScoreCount {
            tokens: n,
            scores: array.len(),
        });
    }
    (0..n)
        .map(|i| array.f32_at(i).ok_or(missing.clone()))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer described by the GGUF metadata `tokenizer.ggml.*`.
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<Tokenizer, TokenizerError> {
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing {
                key: "tokenizer.ggml.model",
                expected: "a string",
            })?;
        let model = match model {
            "gpt2" => TokenizerModel::BytePairs(match gguf.get("tokenizer.ggml.pre") {
                // As llama.cpp takes a file without one.
                None => PreTokenizer::Default,
                Some(v) => match v.as_str() {
                    // llama.cpp writes "gpt-2".
                    Some("gpt-2" | "gpt2") => PreTokenizer::Gpt2,
                    Some("default") => PreTokenizer::Default,
                    Some("smollm") => PreTokenizer::SmolLm,
                    Some("llama-bpe") => PreTokenizer::Llama3,
                    Some(other) => {
                        return Err(TokenizerError::UnsupportedPre { pre: shown(other) })
                    }
                    None => {
                        return Err(TokenizerError::Missing {
                            key: "tokenizer.ggml.pre",
                            expected: "a string",
                        })
                    }
                },
            }),
            "llama" => TokenizerModel::SentencePiece {
                add_space_prefix: match gguf.get("tokenizer.ggml.add_space_prefix") {
                    None => true,
                    Some(_) => gguf.get_bool("tokenizer.ggml.add_space_prefix").ok_or(
                        TokenizerError::Missing {
                            key: "tokenizer.ggml.add_space_prefix",
                            expected: "a boolean",
                        },
                    )?,
                },
            },
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    model: shown(other),
                })
            }
        };
        let spm = matches!(model, TokenizerModel::SentencePiece { .. });
        let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 || n > MAX_VOCAB {
            return Err(TokenizerError::BadVocabularySize { tokens: n });
        }
        let mut types: Vec<TokenType> = match gguf.get("tokenizer.ggml.token_type") {
            None => alloc::vec![TokenType::Normal; n],
            Some(v) => {
                let ints = v
                    .as_array()
                    .and_then(|a| a.ints())
                    .ok_or(TokenizerError::Missing {
                        key: "tokenizer.ggml.token_type",
                        expected: "an array of integers",
                    })?;
                if ints.len() != n {
                    return Err(TokenizerError::TokenTypeCount {
                        tokens: n,
                        types: ints.len(),
                    });
                }
                ints.iter()
                    .enumerate()
                    .map(|(id, code)| {
                        code.and_then(TokenType::from_code)
                            .ok_or(TokenizerError::BadTokenType {
                                id: id as u32,
                                code,
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
        };

        // Chat markup typed user-defined (older conversions did) is control, as
        // llama.cpp retypes it: user-defined tokens are parsed out of any text, so a
        // message's content could otherwise write the template's turns, and the markup
        // a model writes would be printed.
        for (ty, t) in types.iter_mut().zip(tokens.iter()) {
            if *ty == TokenType::UserDefined
                && CHAT_MARKUP_TEXTS
                    .iter()
                    .chain(&END_OF_GENERATION_TEXTS)
                    .any(|m| m.as_bytes() == t)
            {
                *ty = TokenType::Control;
            }
        }

        // Sized up front, and given up if memory is short: a crafted file's tokens can
        // hold as much text as the header read into memory, and this copies it twice
        // (decoded, a token's text is never longer).
        let total = tokens.iter().map(|t| t.len()).sum::<usize>();
        let (mut text, mut bytes) = (Vec::new(), Vec::new());
        if text.try_reserve_exact(total).is_err() || bytes.try_reserve_exact(total).is_err() {
            return Err(TokenizerError::TooLarge { bytes: total });
        }
        let mut text_at = Vec::with_capacity(n + 1);
        let mut bytes_at = Vec::with_capacity(n + 1);
        text_at.push(0);
        bytes_at.push(0);
        for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            let s = core::str::from_utf8(t)
                .map_err(|_| TokenizerError::InvalidToken { id: id as u32 })?;
            text.extend_from_slice(t);
            text_at.push(text.len());
            match ty {
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
                    bytes.extend_from_slice(t)
                }
                TokenType::Byte => match hex_byte_token(s) {
                    Some(b) => bytes.push(b),
                    None if spm => decode_spaces(s, &mut bytes),
                    None => decode_byte_level(s, &mut bytes),
                },
                // An unused SentencePiece slot says nothing, as in llama.cpp.
                TokenType::Unused if spm => {}
                _ if spm => decode_spaces(s, &mut bytes),
                _ => decode_byte_level(s, &mut bytes),
            }
            bytes_at.push(bytes.len());
        }
        if text_at.len() != n + 1 {
            // The iterator ended early: cannot happen for a parsed file.
            return Err(TokenizerError::BadVocabularySize {
                tokens: text_at.len() - 1,
            });
        }

        let mut tok = Tokenizer {
            text,
            text_at,
            bytes,
            bytes_at,
            types,
            by_text: TextIndex::default(),
            merges: Vec::new(),
            scores: Vec::new(),
            byte_token: [NONE; 256],
            specials: Vec::new(),
            model,
            bos: None,
            eos: None,
            eot: None,
            unk: None,
            // Without the key, llama.cpp starts SentencePiece and Llama 3 prompts with
            // BOS, and SmolLM2's kind without.
            add_bos: gguf
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(matches!(
                    model,
                    TokenizerModel::SentencePiece { .. }
                        | TokenizerModel::BytePairs(PreTokenizer::Llama3)
                )),
        };

        // Lookup by text; while building, over the strings borrowed from the file.
        let strs: Vec<&[u8]> = tokens.iter().collect();
        let str_of = |id: u32| strs.get(id as usize).copied().unwrap_or(&[]);
        let index = TextIndex::new(n, str_of);
        let find = |text: &[u8]| index.find(text, str_of);

        for b in 0..=255u8 {
            tok.byte_token[b as usize] = if spm {
                find(alloc::format!("<0x{b:02X}>").as_bytes()).unwrap_or(NONE)
            } else {
                let mut buf = [0; 4];
                find(byte_to_char(b).encode_utf8(&mut buf).as_bytes()).unwrap_or(NONE)
            };
        }

        if spm {
            tok.scores = scores(gguf, n)?;
        } else {
            tok.merges = merge_rules(gguf, &find)?;
        }
        tok.by_text = index;
        tok.finish(gguf, n)
    }

    /// The rest of [`Self::from_gguf`]: the special tokens.
    fn finish(mut self, gguf: &Gguf<'_>, n: usize) -> Result<Tokenizer, TokenizerError> {
        let tok = &mut self;
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    tok.token_type(id),
                    Some(TokenType::Control | TokenType::UserDefined | TokenType::Unknown)
                ) && !tok.text_of(id).is_empty()
            })
            .collect();
        if specials.len() > MAX_SPECIALS {
            return Err(TokenizerError::TooManySpecials {
                count: specials.len(),
            });
        }
        specials.sort_by(|&a, &b| {
            (tok.text_of(b).len())
                .cmp(&tok.text_of(a).len())
                .then(a.cmp(&b))
        });
        tok.specials = specials;

        let special = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            match gguf.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(id) if id < n as u64 => Ok(Some(id as u32)),
                    Some(id) => Err(TokenizerError::BadSpecialId { key, id }),
                    None => Err(TokenizerError::Missing {
                        key,
                        expected: "a token id",
                    }),
                },
            }
        };
        tok.bos = special("tokenizer.ggml.bos_token_id")?;
        tok.eos = special("tokenizer.ggml.eos_token_id")?;
        tok.eot = special("tokenizer.ggml.eot_token_id")?;
        tok.unk = special("tokenizer.ggml.unknown_token_id")?;
        if matches!(tok.model, TokenizerModel::SentencePiece { .. }) {
            // llama.cpp's defaults for a SentencePiece vocabulary that names none; with
            // an unknown token, what neither a piece nor a byte token covers is said.
            let default = |id: u32| (n > id as usize).then_some(id);
            tok.bos = tok.bos.or(default(1));
            tok.eos = tok.eos.or(default(2));
            tok.unk = tok.unk.or(default(0));
        }
        Ok(self)
    }

    /// Number of tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// True if the vocabulary is empty (never, for a built tokenizer).
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// How its tokens are made from text.
    pub fn model(&self) -> TokenizerModel {
        self.model
    }

    /// The pre-tokenizer in use (byte-level BPE only).
    pub fn pre_tokenizer(&self) -> Option<PreTokenizer> {
        match self.model {
            TokenizerModel::BytePairs(pre) => Some(pre),
            TokenizerModel::SentencePiece { .. } => None,
        }
    }

    /// Beginning-of-sequence token (`tokenizer.ggml.bos_token_id`).
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token (`tokenizer.ggml.eos_token_id`).
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`tokenizer.ggml.eot_token_id`).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Tokens that end generation whatever the prompt: the end-of-sequence and
    /// end-of-turn tokens, and the control tokens that end a turn or a text in the
    /// common vocabularies (as llama.cpp ends on them: a model may write
    /// `<|endoftext|>` where its metadata names `<|im_end|>`, and a raw prompt of chat
    /// markup ends its turns with the template's token). Sorted, without duplicates.
    pub fn end_of_generation(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = END_OF_GENERATION_TEXTS
            .iter()
            .filter_map(|t| self.token_id(t))
            .filter(|&id| self.is_control(id))
            .chain(self.eot)
            .chain(self.eos)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Unknown token (`tokenizer.ggml.unknown_token_id`).
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether a prompt should start with [`Tokenizer::bos`]
    /// (`tokenizer.ggml.add_bos_token`, default false); [`Tokenizer::encode`] never adds it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Token `id`'s type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// True for control tokens.
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Whether an answer shows token `id`'s text: not for control and unknown tokens
    /// (markup, and `<unk>`), as llama.cpp prints them only when asked for specials.
    pub fn is_shown(&self, id: u32) -> bool {
        !matches!(
            self.token_type(id),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }

    fn text_of(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.text_at.get(i), self.text_at.get(i + 1)) {
            (Some(&a), Some(&b)) => self.text.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Token `id`'s string as the file spells it (GPT-2 alphabet for normal tokens).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        if id as usize >= self.len() {
            return None;
        }
        core::str::from_utf8(self.text_of(id)).ok()
    }

    fn id_of_bytes(&self, text: &[u8]) -> Option<u32> {
        self.by_text.find(text, |id| self.text_of(id))
    }

    /// The token whose string (as the file spells it) is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.id_of_bytes(text.as_bytes())
    }

    /// The bytes token `id` stands for: byte-level decoded for normal tokens, the text
    /// itself for control, user-defined and unknown tokens (so a rendered chat prompt
    /// decodes back to itself; skip [`Tokenizer::is_control`] tokens when printing).
    /// Empty for an id outside the vocabulary.
    pub fn decode_token(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.bytes_at.get(i), self.bytes_at.get(i + 1)) {
            (Some(&a), Some(&b)) => self.bytes.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The bytes of `ids`, concatenated (see [`Tokenizer::decode_token`]).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.decode_token(id));
        }
        out
    }

    /// The text of `ids`; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Token ids of `text` (no BOS is added: see [`Tokenizer::add_bos`]).
    ///
    /// As in llama.cpp, user-defined tokens are always matched in the text, and control
    /// and unknown tokens (e.g. `<|im_start|>`) only when `parse_special`; where special
    /// tokens overlap, the longer one wins. The rest is pre-tokenized and BPE-merged, or
    /// (SentencePiece) merged by score.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.encode_marked(text, parse_special, &[])
    }

    /// [`Tokenizer::encode`], where no control or unknown token is matched that overlaps
    /// one of the byte ranges `as_text` (the contents of a rendered chat: a message
    /// writing `<|im_end|>` writes those characters). Outside them, and for the rest of
    /// the tokenization, it is the same as encoding the whole text.
    pub fn encode_marked(
        &self,
        text: &str,
        parse_special: bool,
        as_text: &[core::ops::Range<usize>],
    ) -> Vec<u32> {
        // Fragments: (start, end, Some(special id)) or raw text (None).
        let mut frags: Vec<(usize, usize, Option<u32>)> = alloc::vec![(0, text.len(), None)];
        let mut next = Vec::new();
        for &sid in &self.specials {
            let ty = self.token_type(sid);
            if !parse_special && ty != Some(TokenType::UserDefined) {
                continue;
            }
            let Some(pat) = self.token_text(sid) else {
                continue;
            };
            if pat.is_empty() || !text.contains(pat) {
                continue;
            }
            next.clear();
            for &(start, end, id) in &frags {
                let (Some(s), None) = (text.get(start..end), id) else {
                    next.push((start, end, id));
                    continue;
                };
                // `at`: where the text not yet split off starts; `from`: where to look.
                let (mut at, mut from) = (0, 0);
                while let Some(found) = s.get(from..).and_then(|rest| rest.find(pat)) {
                    let m = from + found;
                    let (a, b) = (start + m, start + m + pat.len());
                    if ty != Some(TokenType::UserDefined)
                        && as_text.iter().any(|r| r.start < b && a < r.end)
                    {
                        // Past the pattern's first character: still a char boundary.
                        from = m + pat.chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if m > at {
                        next.push((start + at, start + m, None));
                    }
                    next.push((a, b, Some(sid)));
                    at = m + pat.len();
                    from = at;
                }
                if at < s.len() {
                    next.push((start + at, end, None));
                }
            }
            core::mem::swap(&mut frags, &mut next);
        }

        let mut out = Vec::new();
        let mut words = Vec::new();
        let mut heap = BinaryHeap::new();
        let mut syms = Vec::new();
        let mut spelled = String::new();
        // SentencePiece: a text that starts the prompt or follows a special token is
        // prefixed with a space.
        let mut after_special = true;
        for (start, end, id) in frags {
            if let Some(id) = id {
                out.push(id);
                after_special = true;
                continue;
            }
            let Some(s) = text.get(start..end).filter(|s| !s.is_empty()) else {
                continue;
            };
            match self.model {
                TokenizerModel::BytePairs(pre) => {
                    words.clear();
                    pre_tokenize(pre, s, &mut words);
                    for &(a, b) in &words {
                        let Some(w) = s.get(a..b) else { continue };
                        // Llama 3's vocabulary has whole words that no chain of its
                        // merges reaches: a piece that is a token is that token (as
                        // llama.cpp's `ignore_merges`).
                        if pre == PreTokenizer::Llama3 {
                            spelled.clear();
                            spelled.extend(w.bytes().map(byte_to_char));
                            if let Some(id) = self.piece_token(spelled.as_bytes()) {
                                out.push(id);
                                continue;
                            }
                        }
                        self.bpe(w.as_bytes(), &mut out, &mut heap, &mut syms);
                    }
                }
                TokenizerModel::SentencePiece { add_space_prefix } => {
                    self.sentence_piece(s, add_space_prefix && after_special, &mut out);
                }
            }
            after_special = false;
        }
        out
    }

    /// The token a SentencePiece merge (or a whole Llama 3 piece) may make of `text`:
    /// never a control, unknown or byte token, which text must not spell.
    fn piece_token(&self, text: &[u8]) -> Option<u32> {
        self.id_of_bytes(text).filter(|&id| {
            !matches!(
                self.token_type(id),
                Some(TokenType::Control | TokenType::Unknown | TokenType::Byte)
            )
        })
    }

    /// SentencePiece BPE of `text` (a space before it if `prefix`), appending the ids to
    /// `out`: spaces become `▁`, each character is a symbol, and the adjacent pair whose
    /// joined text is the token of highest score merges first (the leftmost among
    /// equals), until none is a token. A symbol that is no token becomes the tokens of
    /// its bytes (`<0xHH>`), or the unknown token for a byte without one.
    fn sentence_piece(&self, text: &str, prefix: bool, out: &mut Vec<u32>) {
        let mut escaped = String::with_capacity(text.len() + 3);
        if prefix {
            escaped.push(SPACE_MARK);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));
        let bytes = escaped.as_bytes();
        // Symbols: byte ranges of `escaped` in a linked list; a merged one is emptied.
        let mut syms: Vec<Piece> = escaped
            .char_indices()
            .enumerate()
            .map(|(i, (at, c))| Piece {
                start: at,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (at + c.len_utf8() < bytes.len()).then_some(i + 1),
            })
            .collect();
        // Highest score first; among equal scores the leftmost pair.
        let mut heap: BinaryHeap<(Score, Reverse<usize>, usize, usize)> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Piece], left: usize| {
            let Some(l) = syms.get(left) else { return };
            let Some((right, r)) = l.next.and_then(|r| Some((r, syms.get(r)?))) else {
                return;
            };
            let size = l.len + r.len;
            let joined = bytes.get(l.start..l.start + size);
            if let Some(id) = joined.and_then(|t| self.piece_token(t)) {
                let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                heap.push((Score(score), Reverse(left), right, size));
            }
        };
        for i in 0..syms.len() {
            push(&mut heap, &syms, i);
        }
        while let Some((_, Reverse(left), right, size)) = heap.pop() {
            let (Some(l), Some(r)) = (syms.get(left).copied(), syms.get(right).copied()) else {
                continue;
            };
            // Stale: one side has merged since.
            if l.len == 0 || r.len == 0 || l.next != Some(right) || l.len + r.len != size {
                continue;
            }
            if let Some(s) = syms.get_mut(left) {
                s.len = size;
                s.next = r.next;
            }
            if let Some(s) = syms.get_mut(right) {
                s.len = 0;
            }
            if let Some(s) = r.next.and_then(|n| syms.get_mut(n)) {
                s.prev = Some(left);
            }
            if let Some(p) = l.prev {
                push(&mut heap, &syms, p);
            }
            push(&mut heap, &syms, left);
        }
        let mut at = if syms.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let Some(p) = syms.get(i) else { break };
            let piece = bytes.get(p.start..p.start + p.len).unwrap_or(&[]);
            match self.piece_token(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.iter().filter_map(|&b| {
                    Some(self.byte_token[b as usize])
                        .filter(|&id| id != NONE)
                        .or(self.unk)
                })),
            }
            at = p.next;
        }
    }

    /// The merge rule for the pair `(left, right)`.
    fn merge(&self, left: u32, right: u32) -> Option<Merge> {
        let i = self
            .merges
            .binary_search_by(|m| (m.left, m.right).cmp(&(left, right)))
            .ok()?;
        self.merges.get(i).copied()
    }

    /// Byte-level BPE of one pre-tokenized piece: repeatedly merges the adjacent pair of
    /// lowest rank (the leftmost among equals), appending the resulting ids to `out`.
    fn bpe(
        &self,
        word: &[u8],
        out: &mut Vec<u32>,
        heap: &mut BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
        syms: &mut Vec<Sym>,
    ) {
        syms.clear();
        heap.clear();
        for (i, &b) in word.iter().enumerate() {
            syms.push(Sym {
                id: self.byte_token[b as usize],
                prev: i.checked_sub(1),
                next: (i + 1 < word.len()).then_some(i + 1),
                alive: true,
            });
        }
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], left: usize| {
            let Some(l) = syms.get(left) else { return };
            let Some(r) = l.next.and_then(|r| syms.get(r)) else {
                return;
            };
            if l.id == NONE || r.id == NONE {
                return;
            }
            if let Some(m) = self.merge(l.id, r.id) {
                heap.push(Reverse((m.rank, left, l.id, r.id)));
            }
        };
        for i in 0..syms.len() {
            push(heap, syms, i);
        }
        while let Some(Reverse((_, left, lid, rid))) = heap.pop() {
            let Some(l) = syms.get(left).copied() else {
                continue;
            };
            let Some(r_at) = l.next else { continue };
            let Some(r) = syms.get(r_at).copied() else {
                continue;
            };
            if !l.alive || l.id != lid || r.id != rid {
                continue; // stale: one side has merged since
            }
            let Some(m) = self.merge(lid, rid) else {
                continue;
            };
            if let Some(s) = syms.get_mut(left) {
                s.id = m.result;
                s.next = r.next;
            }
            if let Some(s) = syms.get_mut(r_at) {
                s.alive = false;
            }
            if let Some(s) = r.next.and_then(|n| syms.get_mut(n)) {
                s.prev = Some(left);
            }
            if let Some(p) = l.prev {
                push(heap, syms, p);
            }
            push(heap, syms, left);
        }
        let mut at = if syms.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let Some(s) = syms.get(i) else { break };
            if s.id != NONE {
                out.push(s.id);
            } else if let Some(unk) = self.unk {
                // A byte the vocabulary lacks (not in a well-formed GPT-2 vocabulary).
                out.push(unk);
            }
            at = s.next;
        }
    }
}

/// Token ids by text: the ids sorted by their texts, found by binary search; the texts
/// stay wherever the caller keeps them. (Not a hash table: a vocabulary built to collide
/// would make its build quadratic; this costs n log n comparisons whatever the texts.)
#[derive(Clone, Debug, Default)]
struct TextIndex {
    /// Token ids in the order of their texts, one per text.
    sorted: Vec<u32>,
}

impl TextIndex {
    /// Indexes ids `0..n` (n < `NONE`); for equal texts the last id wins.
    fn new<'t>(n: usize, text_of: impl Fn(u32) -> &'t [u8]) -> TextIndex {
        let mut sorted: Vec<u32> = (0..n as u32).collect();
        // Stable: equal texts stay in id order, and the last of each run is kept.
        sorted.sort_by(|&a, &b| text_of(a).cmp(text_of(b)));
        sorted.dedup_by(|later, kept| {
            let same = text_of(*later) == text_of(*kept);
            if same {
                *kept = *later;
            }
            same
        });
        TextIndex { sorted }
    }

    fn find<'t>(&self, text: &[u8], text_of: impl Fn(u32) -> &'t [u8]) -> Option<u32> {
        let at = self
            .sorted
            .binary_search_by(|&id| text_of(id).cmp(text))
            .ok()?;
        self.sorted.get(at).copied()
    }
}

/// A symbol during SentencePiece BPE: a byte range of the text in a doubly linked list;
/// empty once merged into the symbol before it.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A token score, ordered totally (a file's NaN sorts too, the same way every time);
/// -0 and 0 are equal, as the sentencepiece library and llama.cpp compare them.
#[derive(Clone, Copy, Debug)]
struct Score(f32);

impl Score {
    fn key(self) -> f32 {
        if self.0 == 0.0 {
            0.0
        } else {
            self.0
        }
    }
}

impl PartialEq for Score {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.key().total_cmp(&other.key())
    }
}

/// A symbol during BPE: a token id in a doubly linked list.
#[derive(Clone, Copy, Debug)]
struct Sym {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

/// Splits `s` into pieces (byte ranges of `s`) with the pre-tokenizer `pre`.
pub(crate) fn pre_tokenize(pre: PreTokenizer, s: &str, out: &mut Vec<(usize, usize)>) {
    match pre {
        PreTokenizer::Gpt2 => gpt2_split(s, 0, out),
        PreTokenizer::Llama3 => llama3_split(s, out),
        PreTokenizer::Default => {
            // Each of llama.cpp's patterns splits every piece of the one before, the text
            // between its matches kept as pieces too.
            let mut punctuation = Vec::new();
            split_runs(
                s,
                0,
                &|c| is_punctuation(c) || "$+<=>^~|".contains(c),
                &mut punctuation,
            );
            let mut gpt2 = Vec::new();
            for &(a, b) in &punctuation {
                if let Some(piece) = s.get(a..b) {
                    gpt2_split(piece, a, &mut gpt2);
                }
            }
            let mut numbers = Vec::new();
            for &(a, b) in &gpt2 {
                if let Some(piece) = s.get(a..b) {
                    split_runs(piece, a, &is_number, &mut numbers);
                }
            }
            for &(a, b) in &numbers {
                if let Some(piece) = s.get(a..b) {
                    split_digit_threes(piece, a, out);
                }
            }
        }
        PreTokenizer::SmolLm => {
            // `\p{N}`: each number character is a piece, and so is each run between.
            let mut run = 0;
            for (i, c) in s.char_indices() {
                if is_number(c) {
                    if let Some(piece) = s.get(run..i) {
                        gpt2_split(piece, run, out);
                    }
                    out.push((i, i + c.len_utf8()));
                    run = i + c.len_utf8();
                }
            }
            if let Some(piece) = s.get(run..) {
                gpt2_split(piece, run, out);
            }
        }
    }
}

/// `[class]+` over `s` as llama.cpp splits with it (pieces pushed offset by `base`): the
/// runs of characters in the class, and the runs between them.
fn split_runs(s: &str, base: usize, class: &dyn Fn(char) -> bool, out: &mut Vec<(usize, usize)>) {
    let mut start = 0;
    let mut inside = None;
    for (i, c) in s.char_indices() {
        let now = class(c);
        if inside.is_some_and(|was| was != now) {
            out.push((base + start, base + i));
            start = i;
        }
        inside = Some(now);
    }
    if start < s.len() {
        out.push((base + start, base + s.len()));
    }
}

/// `[0-9][0-9][0-9]` over `s` as llama.cpp splits with it (pieces pushed offset by
/// `base`): each three ASCII digits from the left, and the text between.
fn split_digit_threes(s: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let bytes = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    // Byte by byte: a digit is one byte, and no byte of a longer character is a digit,
    // so every cut is at a character's boundary.
    while i < bytes.len() {
        let three = bytes
            .get(i..i + 3)
            .is_some_and(|t| t.iter().all(u8::is_ascii_digit));
        if !three {
            i += 1;
            continue;
        }
        if i > start {
            out.push((base + start, base + i));
        }
        out.push((base + i, base + i + 3));
        i += 3;
        start = i;
    }
    if start < bytes.len() {
        out.push((base + start, base + bytes.len()));
    }
}

/// The GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// over `s` (whose pieces are pushed offset by `base`), with regex semantics: at each
/// position the first alternative that matches, greedily. The lookahead sees only `s`.
fn gpt2_split(s: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let at = |i: usize| s.get(i..).and_then(|r| r.chars().next());
    let is_other = |c: char| !(is_space(c) || is_letter(c) || is_number(c));
    let mut i = 0;
    while let Some(c) = at(i) {
        let start = i;
        // Consumes characters satisfying `f` from byte `j`, returning the end.
        let run = |mut j: usize, f: &dyn Fn(char) -> bool| {
            while let Some(c) = at(j).filter(|&c| f(c)) {
                j += c.len_utf8();
            }
            j
        };
        let end = 'm: {
            if c == '\'' {
                let rest = s.get(i + 1..).unwrap_or("");
                for suffix in ["s", "t", "re", "ve", "m", "ll", "d"] {
                    if rest.starts_with(suffix) {
                        break 'm i + 1 + suffix.len();
                    }
                }
            }
            let (j, c2) = if c == ' ' {
                (i + 1, at(i + 1))
            } else {
                (i, Some(c))
            };
            if let Some(c2) = c2 {
                if is_letter(c2) {
                    break 'm run(j, &is_letter);
                }
                if is_number(c2) {
                    break 'm run(j, &is_number);
                }
                if is_other(c2) {
                    break 'm run(j, &is_other);
                }
            }
            // Whitespace: `\s+(?!\S)` leaves the last space before a non-space to the
            // next piece (if the run has more than one); otherwise `\s+`.
            let end = run(i, &is_space);
            match at(end) {
                Some(_) if end > i => {
                    let last = s.get(i..end).and_then(|w| w.chars().next_back());
                    let cut = end - last.map_or(0, char::len_utf8);
                    if cut > i {
                        cut
                    } else {
                        end
                    }
                }
                // Not whitespace after all (cannot happen: every class is covered).
                _ if end == i => i + c.len_utf8(),
                _ => end,
            }
        };
        out.push((base + start, base + end));
        i = end;
    }
}

/// Llama 3's pattern over `s`, with regex semantics (at each position the first
/// alternative that matches, greedily, backtracking as a regex engine would):
///
/// ```text
/// (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+
/// |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
/// ```
fn llama3_split(s: &str, out: &mut Vec<(usize, usize)>) {
    let at = |i: usize| s.get(i..).and_then(|r| r.chars().next());
    let is_other = |c: char| !(is_space(c) || is_letter(c) || is_number(c));
    let is_newline = |c: char| c == '\r' || c == '\n';
    // Consumes up to `most` characters satisfying `f` from byte `j`, returning the end.
    let run = |mut j: usize, most: usize, f: &dyn Fn(char) -> bool| {
        let mut n = 0;
        while let Some(c) = at(j).filter(|&c| n < most && f(c)) {
            j += c.len_utf8();
            n += 1;
        }
        j
    };
    let mut i = 0;
    while let Some(c) = at(i) {
        let next = at(i + c.len_utf8());
        let end = 'm: {
            if c == '\'' {
                let rest = s.get(i + 1..).unwrap_or("").as_bytes();
                for suffix in ["s", "t", "re", "ve", "m", "ll", "d"] {
                    if rest
                        .get(..suffix.len())
                        .is_some_and(|r| r.eq_ignore_ascii_case(suffix.as_bytes()))
                    {
                        break 'm i + 1 + suffix.len();
                    }
                }
            }
            // `[^\r\n\p{L}\p{N}]?\p{L}+`
            if is_letter(c) {
                break 'm run(i, usize::MAX, &is_letter);
            }
            if !is_newline(c) && !is_number(c) && next.is_some_and(is_letter) {
                break 'm run(i + c.len_utf8(), usize::MAX, &is_letter);
            }
            // `\p{N}{1,3}`
            if is_number(c) {
                break 'm run(i, 3, &is_number);
            }
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            let others = if c == ' ' && next.is_some_and(is_other) {
                Some(i + 1)
            } else {
                is_other(c).then_some(i)
            };
            if let Some(j) = others {
                let j = run(j, usize::MAX, &is_other);
                break 'm run(j, usize::MAX, &is_newline);
            }
            // Whitespace from here on. `\s*[\r\n]+`: through the run's last newline.
            let end = run(i, usize::MAX, &is_space);
            let run_text = s.get(i..end).unwrap_or("");
            if let Some(last) = run_text.rfind(is_newline) {
                break 'm i + last + 1;
            }
            // `\s+(?!\S)` leaves the last space before a non-space to the next piece
            // (if the run has more than one); otherwise `\s+`.
            match (at(end), run_text.chars().next_back()) {
                (Some(_), Some(last)) if end - last.len_utf8() > i => end - last.len_utf8(),
                // Not whitespace after all (cannot happen: every class is covered).
                _ if end == i => i + c.len_utf8(),
                _ => end,
            }
        };
        out.push((i, end));
        i = end;
    }
}

/// Reassembles UTF-8 text from token bytes arriving one token at a time: a character
/// split across tokens is held back until it is complete; invalid bytes become U+FFFD.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Stream {
    pending: [u8; 4],
    len: usize,
}

impl Utf8Stream {
    /// An empty stream.
    pub fn new() -> Utf8Stream {
        Utf8Stream::default()
    }

    /// Appends the complete characters of the bytes so far to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        if self.len == 0 {
            self.feed(bytes, out);
        } else {
            let mut v = Vec::with_capacity(self.len + bytes.len());
            v.extend_from_slice(self.pending.get(..self.len).unwrap_or(&[]));
            v.extend_from_slice(bytes);
            self.len = 0;
            self.feed(&v, out);
        }
    }

    /// Flushes an incomplete trailing character as U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if self.len > 0 {
            out.push('\u{FFFD}');
            self.len = 0;
        }
    }

    /// True if an incomplete character is held back.
    pub fn has_pending(&self) -> bool {
        self.len > 0
    }

    fn feed(&mut self, mut b: &[u8], out: &mut String) {
        loop {
            match core::str::from_utf8(b) {
                Ok(s) => {
                    out.push_str(s);
                    return;
                }
                Err(e) => {
                    let (good, rest) = b.split_at(e.valid_up_to());
                    out.push_str(core::str::from_utf8(good).unwrap_or(""));
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            b = rest.get(n..).unwrap_or(&[]);
                        }
                        None => {
                            // An incomplete character at the end: at most 3 bytes.
                            for (d, s) in self.pending.iter_mut().zip(rest) {
                                *d = *s;
                            }
                            self.len = rest.len().min(4);
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn a_megabyte_model_or_pre_tokenizer_name_makes_a_short_message() {
        use crate::gguf::tests::{file, string};
        let long: String = core::iter::repeat_n('\u{1}', 1 << 20).collect();
        let (long, gpt2) = (string(&long), string("gpt2"));
        for kvs in [
            vec![("tokenizer.ggml.model", 8, &long[..])],
            vec![
                ("tokenizer.ggml.model", 8, &gpt2[..]),
                ("tokenizer.ggml.pre", 8, &long[..]),
            ],
        ] {
            let bytes = file(&kvs, &[]);
            let gguf = Gguf::parse(&bytes, bytes.len() as u64).expect("a valid header");
            let m = alloc::format!("{}", Tokenizer::from_gguf(&gguf).unwrap_err());
            assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
            assert!(m.contains("…\" is not supported"), "{m}");
        }
    }

    /// Checks `pre` on every case of a fixture of `tools/reference/pretokenizer_fixture.py`.
    fn splits_as_the_fixture(pre: PreTokenizer, fixture: &str) {
        let json: serde_json::Value = serde_json::from_str(fixture).unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() > 600);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<&str> = case["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap())
                .collect();
            assert_eq!(split(pre, text), want, "{text:?}");
        }
    }

    #[test]
    fn llama3_splits_as_the_regex_module_does() {
        let fixture = include_str!("../tests/data/llama3_pre.json");
        splits_as_the_fixture(PreTokenizer::Llama3, fixture);
    }

    #[test]
    fn the_default_splits_as_llama_cpps_patterns_do_with_the_regex_module() {
        let fixture = include_str!("../tests/data/default_pre.json");
        splits_as_the_fixture(PreTokenizer::Default, fixture);
    }

    fn split(pre: PreTokenizer, s: &str) -> Vec<&str> {
        let mut v = Vec::new();
        pre_tokenize(pre, s, &mut v);
        v.iter().map(|&(a, b)| &s[a..b]).collect()
    }

    #[test]
    fn a_vocabulary_built_to_collide_is_indexed_in_n_log_n() {
        // FNV-1a's low 16 bits depend only on its state's low 16 bits: 3-byte blocks that
        // take the start state back to itself make every chain of them collide there.
        let step = |s: u16, b: u8| (s ^ u16::from(b)).wrapping_mul(0x01b3);
        let start = 0x2325u16;
        let blocks: Vec<[u8; 3]> = (0..1u32 << 24)
            .map(|i| [(i >> 16) as u8, (i >> 8) as u8, i as u8])
            .filter(|b| b.iter().fold(start, |s, &x| step(s, x)) == start)
            .take(64)
            .collect();
        assert_eq!(blocks.len(), 64);
        let texts: Vec<Vec<u8>> = blocks
            .iter()
            .flat_map(|a| blocks.iter().map(move |b| [&a[..], &b[..]].concat()))
            .collect();
        let n = texts.len();
        let looks = core::cell::Cell::new(0usize);
        let text_of = |id: u32| {
            looks.set(looks.get() + 1);
            &texts[id as usize][..]
        };
        let index = TextIndex::new(n, text_of);
        // About 2 n log2 n (24 n here); linear probing through one cluster took n²/2.
        assert!(
            looks.get() < 64 * n,
            "{} text looks for {n} tokens",
            looks.get()
        );
        for (id, text) in texts.iter().enumerate() {
            assert_eq!(index.find(text, text_of), Some(id as u32));
        }
        assert_eq!(index.find(b"absent", text_of), None);
        // Equal texts: the last id wins.
        let dup = [&b"a"[..], b"b", b"a"];
        let index = TextIndex::new(3, |id| dup[id as usize]);
        assert_eq!(index.find(b"a", |id| dup[id as usize]), Some(2));
        assert_eq!(index.find(b"b", |id| dup[id as usize]), Some(1));
    }

    #[test]
    fn gpt2_pattern() {
        let g = PreTokenizer::Gpt2;
        assert_eq!(split(g, "Hello world"), vec!["Hello", " world"]);
        assert_eq!(split(g, "it's  x"), vec!["it", "'s", " ", " x"]);
        assert_eq!(split(g, "a \n\n b"), vec!["a", " \n\n", " b"]);
        assert_eq!(split(g, "a\nb"), vec!["a", "\n", "b"]);
        assert_eq!(split(g, "x   "), vec!["x", "   "]);
        assert_eq!(split(g, "12 345?!"), vec!["12", " 345", "?!"]);
        assert_eq!(split(g, "''s 'S"), vec!["''", "s", " '", "S"]);
        assert_eq!(
            split(g, "héllo wörld 中文"),
            vec!["héllo", " wörld", " 中文"]
        );
        assert_eq!(split(g, ""), Vec::<&str>::new());
        assert_eq!(split(g, " "), vec![" "]);
        assert_eq!(split(g, "a  !"), vec!["a", " ", " !"]);
    }

    #[test]
    fn smollm_splits_digits() {
        let s = PreTokenizer::SmolLm;
        assert_eq!(
            split(s, "In 2024, x"),
            vec!["In", " ", "2", "0", "2", "4", ",", " x"]
        );
        assert_eq!(split(s, "a1b"), vec!["a", "1", "b"]);
    }

    #[test]
    fn byte_alphabet_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('\u{200}'), None);
    }

    #[test]
    fn utf8_stream() {
        let mut st = Utf8Stream::new();
        let mut out = String::new();
        let e = "é€😀".as_bytes();
        for b in e {
            st.push(core::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, "é€😀");
        assert!(!st.has_pending());
        st.push(&[0xF0, 0x9F], &mut out);
        st.push(&[0xFF, b'a'], &mut out);
        st.push(&[0xE2], &mut out);
        st.finish(&mut out);
        assert_eq!(out, "é€😀\u{FFFD}\u{FFFD}a\u{FFFD}");
    }
}
