//! Chat prompts from `tokenizer.chat_template`, without a Jinja engine: the template's
//! family is recognised by its markers and rendered the way llama.cpp's built-in
//! templates do.
//!
//! - ChatML (`<|im_start|>`): `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
//!   If the template carries a default system message as a literal (SmolLM2:
//!   `'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by
//!   Hugging Face<|im_end|>\n'`), it is prepended when the first message is not a
//!   system message.
//! - Llama 3 (`<|start_header_id|>`): `<|start_header_id|>{role}<|end_header_id|>\n\n`
//!   `{content, trimmed}<|eot_id|>` per message. The BOS token is not part of the text:
//!   prepend [`crate::Tokenizer::bos`] when [`crate::Tokenizer::add_bos`] says so.
//! - Zephyr (`<|user|>` and `<|assistant|>`): `<|{role}|>\n{content}{end}\n` per
//!   message, where `end` is `</s>` or `<|endoftext|>`, whichever the template uses.
//!
//! Anything else is [`ChatError::UnknownTemplate`] (a caller can fall back to raw
//! prompts).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::gguf::Gguf;
use crate::tokenizer::Tokenizer;

/// The metadata key of the chat template.
pub const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One message of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// `system`, `user` or `assistant`.
    pub role: &'a str,
    /// Its text.
    pub content: &'a str,
}

/// A chat template family that we can render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatTemplate {
    /// ChatML, with the default system message the template injects, if any.
    ChatMl {
        /// Prepended as a system message when the first message is not one.
        default_system: Option<String>,
    },
    /// Llama 3.
    Llama3,
    /// Zephyr.
    Zephyr {
        /// What ends each message: `</s>` or `<|endoftext|>`.
        end: &'static str,
    },
}

/// Why no chat template could be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatError {
    /// The file has no `tokenizer.chat_template` string.
    NoTemplate,
    /// The template is not of a family we recognise.
    UnknownTemplate {
        /// Its first characters.
        start: String,
    },
}

impl fmt::Display for ChatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChatError::NoTemplate => write!(f, "the model has no chat template ({TEMPLATE_KEY})"),
            ChatError::UnknownTemplate { start } => write!(
                f,
                "unrecognised chat template (not ChatML, Llama 3 or Zephyr): {start:?}..."
            ),
        }
    }
}

impl ChatTemplate {
    /// The template of the model's `tokenizer.chat_template`.
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<ChatTemplate, ChatError> {
        let template = gguf.get_str(TEMPLATE_KEY).ok_or(ChatError::NoTemplate)?;
        let eos = (gguf.get_u32("tokenizer.ggml.eos_token_id"))
            .and_then(|id| {
                gguf.get("tokenizer.ggml.tokens")?
                    .as_array()?
                    .strings()?
                    .get(id as usize)
            })
            .and_then(|text| core::str::from_utf8(text).ok());
        ChatTemplate::recognise_with_eos(template, eos)
    }

    /// The family of the Jinja template text `template`.
    pub fn recognise(template: &str) -> Result<ChatTemplate, ChatError> {
        ChatTemplate::recognise_with_eos(template, None)
    }

    /// [`ChatTemplate::recognise`], for a model whose end-of-sequence token is `eos`: a
    /// Zephyr template may end its messages with `eos_token` (TinyLlama's does) rather
    /// than write the marker itself.
    pub fn recognise_with_eos(
        template: &str,
        eos: Option<&str>,
    ) -> Result<ChatTemplate, ChatError> {
        if template.contains("<|im_start|>") {
            return Ok(ChatTemplate::ChatMl {
                default_system: default_system(template),
            });
        }
        if template.contains("<|start_header_id|>") {
            return Ok(ChatTemplate::Llama3);
        }
        if template.contains("<|user|>") && template.contains("<|assistant|>") {
            if template.contains("</s>") {
                return Ok(ChatTemplate::Zephyr { end: "</s>" });
            }
            if template.contains("<|endoftext|>") {
                return Ok(ChatTemplate::Zephyr {
                    end: "<|endoftext|>",
                });
            }
            if template.contains("eos_token") {
                match eos {
                    Some("</s>") => return Ok(ChatTemplate::Zephyr { end: "</s>" }),
                    Some("<|endoftext|>") => {
                        return Ok(ChatTemplate::Zephyr {
                            end: "<|endoftext|>",
                        })
                    }
                    _ => {}
                }
            }
        }
        Err(ChatError::UnknownTemplate {
            start: template.chars().take(80).collect(),
        })
    }

    /// The prompt text of `messages`, ending with the assistant's header when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message<'_>], add_generation_prompt: bool) -> String {
        self.render_marked(messages, add_generation_prompt).text
    }

    /// [`ChatTemplate::render`], with where the messages' contents lie in the text: a
    /// server tokenizes them as text only ([`Tokenizer::encode_marked`]), so that a
    /// message cannot close its turn or open another with the template's markup.
    ///
    /// [`Tokenizer::encode_marked`]: crate::Tokenizer::encode_marked
    pub fn render_marked(
        &self,
        messages: &[Message<'_>],
        add_generation_prompt: bool,
    ) -> RenderedPrompt {
        let mut r = RenderedPrompt::default();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let (Some(first), Some(sys)) = (messages.first(), default_system) {
                    if first.role != "system" {
                        r.markup(&["<|im_start|>system\n", sys, "<|im_end|>\n"]);
                    }
                }
                for m in messages {
                    r.markup(&["<|im_start|>", m.role, "\n"]);
                    r.content(m.content);
                    r.markup(&["<|im_end|>\n"]);
                }
                if add_generation_prompt {
                    r.markup(&["<|im_start|>assistant\n"]);
                }
            }
            ChatTemplate::Llama3 => {
                for m in messages {
                    r.markup(&["<|start_header_id|>", m.role, "<|end_header_id|>\n\n"]);
                    r.content(m.content.trim());
                    r.markup(&["<|eot_id|>"]);
                }
                if add_generation_prompt {
                    r.markup(&["<|start_header_id|>assistant<|end_header_id|>\n\n"]);
                }
            }
            ChatTemplate::Zephyr { end } => {
                for m in messages {
                    r.markup(&["<|", m.role, "|>\n"]);
                    r.content(m.content);
                    r.markup(&[end, "\n"]);
                }
                if add_generation_prompt {
                    r.markup(&["<|assistant|>\n"]);
                }
            }
        }
        r
    }

    /// The texts of the tokens that end an assistant turn.
    pub fn end_of_turn_texts(&self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl { .. } => &["<|im_end|>"],
            ChatTemplate::Llama3 => &["<|eot_id|>", "<|end_of_text|>"],
            ChatTemplate::Zephyr { end } => {
                if *end == "</s>" {
                    &["</s>"]
                } else {
                    &["<|endoftext|>"]
                }
            }
        }
    }

    /// Token ids that end generation: the end-of-turn tokens that `tokenizer` has, and
    /// its [`Tokenizer::end_of_generation`]; sorted, without duplicates.
    pub fn stop_tokens(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .end_of_turn_texts()
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .chain(tokenizer.end_of_generation())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A rendered prompt and the byte ranges of it that are messages' contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderedPrompt {
    /// The whole prompt.
    pub text: String,
    /// Where the contents are, in order.
    pub contents: Vec<core::ops::Range<usize>>,
}

impl RenderedPrompt {
    /// Appends the template's own text.
    fn markup(&mut self, parts: &[&str]) {
        for p in parts {
            self.text.push_str(p);
        }
    }

    /// Appends a message's content.
    fn content(&mut self, content: &str) {
        let start = self.text.len();
        self.text.push_str(content);
        self.contents.push(start..self.text.len());
    }
}

/// The most `<|im_start|>system` markers [`default_system`] looks at: a real template has
/// one or two, and each look may read the whole template (a model file's template,
/// repeating the marker, would otherwise take time quadratic in its length).
const MAX_SYSTEM_MARKERS: usize = 8;

/// The default system message of a ChatML template: the text between
/// `<|im_start|>system` + newline and `<|im_end|>` when it is all inside one string
/// literal of the template (not a `message['content']` expression), among its first
/// [`MAX_SYSTEM_MARKERS`] markers.
fn default_system(template: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    let mut from = 0;
    for _ in 0..MAX_SYSTEM_MARKERS {
        let found = template.get(from..)?.find(START)?;
        let at = from + found;
        from = at + START.len();
        // The literal's opening quote: the nearest quote before the marker.
        let before = template.get(..at)?;
        let Some(quote) = before.chars().rev().find(|&c| c == '\'' || c == '"') else {
            continue;
        };
        let after = template.get(from..)?;
        let body = if let Some(b) = after.strip_prefix("\\n") {
            b
        } else if let Some(b) = after.strip_prefix('\n') {
            b
        } else {
            continue;
        };
        let Some(end) = body.find("<|im_end|>") else {
            continue;
        };
        let raw = body.get(..end)?;
        if let Some(text) = unescape(raw, quote) {
            if !text.is_empty() {
                return Some(text);
            }
        }
    }
    None
}

/// The value of the inside of a Jinja string literal delimited by `quote`, or `None` if
/// the literal ends inside `raw`.
fn unescape(raw: &str, quote: char) -> Option<String> {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                other => out.push(other),
            },
            c if c == quote => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template() {
        let t = ChatTemplate::recognise(SMOLLM2).unwrap();
        let user = Message {
            role: "user",
            content: "What is the capital of France?",
        };
        assert_eq!(
            t.render(&[user], true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = Message {
            role: "system",
            content: "Be brief.",
        };
        assert_eq!(
            t.render(&[sys, user], false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        );
        assert_eq!(t.render(&[], true), "<|im_start|>assistant\n");
        // The same template with escaped newlines (as in tokenizer_config.json).
        let escaped = SMOLLM2.replace('\n', "\\n");
        assert_eq!(ChatTemplate::recognise(&escaped).unwrap(), t);
    }

    #[test]
    fn chatml_without_default_system() {
        let t = ChatTemplate::recognise(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        let t = ChatTemplate::recognise(
            "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>' }}",
        )
        .unwrap();
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
    }

    #[test]
    fn a_template_repeating_the_system_marker_is_read_in_time_linear_in_its_length() {
        // Each marker's literal runs to the last quote: read whole for every marker, the
        // 2 MB template would take about 10^11 steps.
        let marker = "<|im_start|>system\\n";
        let hostile = alloc::format!("\"{}\"<|im_end|>", marker.repeat(100_000));
        assert_eq!(
            ChatTemplate::recognise(&hostile).unwrap(),
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        // A default system message after a few markers that are not one is still found.
        let late = alloc::format!(
            "{}{{{{ '<|im_start|>system\\nBe kind.<|im_end|>' }}}}",
            "{{ '<|im_start|>system' + messages[0]['content'] }} ".repeat(3)
        );
        assert_eq!(
            ChatTemplate::recognise(&late).unwrap(),
            ChatTemplate::ChatMl {
                default_system: Some("Be kind.".into())
            }
        );
    }

    #[test]
    fn llama3_and_zephyr_and_unknown() {
        let t = ChatTemplate::recognise("{{ '<|start_header_id|>' }}").unwrap();
        let m = [Message {
            role: "user",
            content: " Hi ",
        }];
        assert_eq!(
            t.render(&m, true),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let t = ChatTemplate::recognise("<|user|> <|assistant|> </s>").unwrap();
        assert_eq!(t.render(&m, true), "<|user|>\n Hi </s>\n<|assistant|>\n");
        // TinyLlama's ends each message with the model's end-of-sequence token.
        let tiny = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% endfor %}";
        assert_eq!(
            ChatTemplate::recognise_with_eos(tiny, Some("</s>")).unwrap(),
            t
        );
        for eos in [None, Some("<eos>")] {
            assert!(matches!(
                ChatTemplate::recognise_with_eos(tiny, eos),
                Err(ChatError::UnknownTemplate { .. })
            ));
        }
        assert!(matches!(
            ChatTemplate::recognise("[INST] {{ x }} [/INST]"),
            Err(ChatError::UnknownTemplate { .. })
        ));
    }
}
