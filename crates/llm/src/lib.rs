//! Running a GGUF language model, the parts that need no accelerator: the GGUF file
//! format ([`gguf`]), the llama architecture and its tensor table ([`llama`]), the
//! byte-level BPE and SentencePiece tokenizers ([`tokenizer`]), chat templates ([`chat`]) and a
//! seeded sampler ([`sample`]).
//!
//! `no_std` with `alloc`: the same code runs inside bare-metal guests and on the host.
//! Model files are treated as hostile input: every length, count and offset is checked,
//! and no input makes these functions panic.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod chat;
pub mod gguf;
pub mod llama;
pub mod sample;
pub mod serve;
pub mod tokenizer;

mod unicode;
mod unicode_tables;

pub use chat::{ChatError, ChatTemplate, Message, RenderedPrompt};
pub use gguf::{Gguf, GgufError, TensorInfo, Value, ValueType};
pub use llama::{Layer, LlamaConfig, LlamaError, LlamaModel, RopeStyle, Weight};
pub use sample::{DrawScratch, Sampler, SamplerConfig, SamplerError};
pub use tokenizer::{
    PreTokenizer, TokenType, Tokenizer, TokenizerError, TokenizerModel, Utf8Stream,
};
