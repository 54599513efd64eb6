//! The messages a language-model server guest (`llm-serve`) exchanges with the host over
//! the VM's message channel ([`ferry_abi::channel`]): one [`Request`] opens a stream, a
//! cancel (or the host's notice that it let go of the stream, which `llm-serve` takes
//! as one) may follow, and the guest answers with [`Event`]s, the last one final.
//!
//! A compact little-endian binary encoding (the guest has no JSON); decoding checks every
//! length, so a hostile host or guest gets an error, never a panic.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Message kinds (the channel's `kind`).
pub mod kind {
    /// Host to guest: a [`Request`](super::Request), opening its stream.
    pub const REQUEST: u32 = 1;
    /// Host to guest: stop generating for this stream (no payload).
    pub const CANCEL: u32 = 2;
    /// Guest to host: an [`Event`](super::Event).
    pub const EVENT: u32 = 16;
}

/// Most bytes an encoded request may have: what the largest channel slot carries.
pub const MAX_REQUEST_BYTES: usize =
    (ferry_abi::channel::MAX_SLOT_SIZE - ferry_abi::channel::MESSAGE_HEADER_SIZE) as usize;

/// Most stop texts a request carries, and most bytes of each: the filter holds back up
/// to the longest, and compares each at every token.
pub const MAX_STOPS: usize = 4;
/// See [`MAX_STOPS`].
pub const MAX_STOP_BYTES: usize = 256;

/// The roles of a chat's messages (the gateway maps OpenAI's onto them): a role is
/// template markup, so an unknown one could carry the template's control tokens.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Version byte at the start of a request.
const REQUEST_VERSION: u8 = 2;

/// What the request's messages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// Chat messages, rendered with the model's chat template.
    Chat,
    /// One raw prompt (a completion), no template.
    Raw,
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Chat or raw.
    pub prompt: PromptKind,
    /// `(role, content)` pairs; a raw prompt is one pair with an empty role.
    pub messages: Vec<(String, String)>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Whether the client set `max_tokens`: a prompt that leaves fewer positions in the
    /// context is then refused, as OpenAI refuses it; a default is cut to what it leaves.
    pub max_tokens_asked: bool,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus sampling mass (1: all).
    pub top_p: f32,
    /// Sampler seed.
    pub seed: u64,
    /// Texts that end the answer (not included in it).
    pub stop: Vec<String>,
}

/// Why a generation ended (the discriminant is its byte on the channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FinishReason {
    /// The model's end of turn, or a stop text.
    Stop = 0,
    /// `max_tokens`, or the context, ran out.
    Length = 1,
    /// The host cancelled it.
    Cancelled = 2,
}

impl FinishReason {
    /// Every reason, at the index of its byte.
    const ALL: [FinishReason; 3] = [Self::Stop, Self::Length, Self::Cancelled];

    /// The name OpenAI's API uses (`stop`, `length`, `cancelled`).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Why the guest refused a request (the discriminant is its byte on the channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalCode {
    /// The prompt (with room for one token) does not fit the context.
    ContextLength = 0,
    /// The request is malformed or names something the model cannot do.
    InvalidRequest = 1,
    /// The device failed.
    Internal = 2,
    /// The server holds as many requests as it queues: try again shortly.
    Busy = 3,
}

impl RefusalCode {
    /// Every code, at the index of its byte.
    const ALL: [RefusalCode; 4] = [
        Self::ContextLength,
        Self::InvalidRequest,
        Self::Internal,
        Self::Busy,
    ];
}

/// [`Event::Token`]'s `id` for text no single token produced: released at the end of an
/// answer (held back until then in case it began a stop text), or the rest of a token's
/// text too long for one message (see [`Event::split`]).
pub const NO_TOKEN: u32 = u32::MAX;

/// Bytes of an encoded [`Event::Token`] besides its text: tag, id, text length.
const TOKEN_OVERHEAD: usize = 1 + 4 + 4;
/// Bytes of an encoded [`Event::Error`] besides its message: tag, code, message length.
const ERROR_OVERHEAD: usize = 1 + 1 + 4;

/// The longest prefix of `text` of at most `max` bytes that ends at a character
/// boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut cut = max.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// What the guest says about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The next piece of the answer: `token` decoded (possibly empty while a UTF-8
    /// character is incomplete, or while it may begin a stop text).
    Token {
        /// Token id ([`NO_TOKEN`] for text released at the end).
        id: u32,
        /// Its text.
        text: String,
    },
    /// The end (final).
    Done {
        /// Why.
        reason: FinishReason,
        /// Tokens of the prompt.
        prompt_tokens: u32,
        /// Tokens generated.
        completion_tokens: u32,
    },
    /// The request was refused or failed (final).
    Error {
        /// What kind of failure.
        code: RefusalCode,
        /// A message for the client.
        message: String,
    },
}

impl Event {
    /// Whether this event ends its stream.
    pub fn is_final(&self) -> bool {
        !matches!(self, Event::Token { .. })
    }

    /// This event as events whose payloads each take at most `max` bytes (a channel
    /// message's room): a token's text split at character boundaries over several
    /// [`Event::Token`]s, the later ones with id [`NO_TOKEN`], whose texts the host joins
    /// as it joins any tokens'; an error's message cut short. A `max` too small for a
    /// character still gets one per event.
    pub fn split(&self, max: usize) -> Vec<Event> {
        match self {
            Event::Token { id, text } => {
                let room = max.saturating_sub(TOKEN_OVERHEAD);
                let mut events = Vec::new();
                let (mut id, mut rest) = (*id, text.as_str());
                loop {
                    let mut piece = prefix(rest, room);
                    if piece.is_empty() {
                        piece = rest.chars().next().map_or("", |c| &rest[..c.len_utf8()]);
                    }
                    events.push(Event::Token {
                        id,
                        text: piece.into(),
                    });
                    rest = &rest[piece.len()..];
                    id = NO_TOKEN;
                    if rest.is_empty() {
                        return events;
                    }
                }
            }
            Event::Error { code, message } => alloc::vec![Event::Error {
                code: *code,
                message: prefix(message, max.saturating_sub(ERROR_OVERHEAD)).into(),
            }],
            Event::Done { .. } => alloc::vec![self.clone()],
        }
    }
}

/// A payload that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed serving message: {}", self.0)
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    /// The value whose index in `all` is the next byte, or `unknown`.
    fn one_of<T: Copy>(&mut self, all: &[T], unknown: &'static str) -> Result<T, DecodeError> {
        let i = self.u8()?;
        all.get(usize::from(i)).copied().ok_or(DecodeError(unknown))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8")))
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        let bytes = self.bytes(len)?;
        core::str::from_utf8(bytes)
            .map(String::from)
            .map_err(|_| DecodeError("text is not UTF-8"))
    }
    /// A count of items each at least `min` bytes long, checked against what is left.
    fn count(&mut self, min: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.0.len() {
            return Err(DecodeError("count larger than the message"));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes"))
        }
    }
}

impl Request {
    /// The payload of a [`kind::REQUEST`] message.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.u8(REQUEST_VERSION);
        w.u8(match self.prompt {
            PromptKind::Chat => 0,
            PromptKind::Raw => 1,
        });
        w.u32(self.max_tokens);
        w.u8(u8::from(self.max_tokens_asked));
        w.u32(self.temperature.to_bits());
        w.u32(self.top_p.to_bits());
        w.u64(self.seed);
        w.u32(self.stop.len() as u32);
        for s in &self.stop {
            w.text(s);
        }
        w.u32(self.messages.len() as u32);
        for (role, content) in &self.messages {
            w.text(role);
            w.text(content);
        }
        w.0
    }

    /// Decodes a [`kind::REQUEST`] payload.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader(bytes);
        if r.u8()? != REQUEST_VERSION {
            return Err(DecodeError("unknown request version"));
        }
        let prompt = match r.u8()? {
            0 => PromptKind::Chat,
            1 => PromptKind::Raw,
            _ => return Err(DecodeError("unknown prompt kind")),
        };
        let max_tokens = r.u32()?;
        let max_tokens_asked = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError("max_tokens_asked is 0 or 1")),
        };
        let temperature = f32::from_bits(r.u32()?);
        let top_p = f32::from_bits(r.u32()?);
        let seed = r.u64()?;
        let stops = r.count(4)?;
        let stop: Vec<String> = (0..stops).map(|_| r.text()).collect::<Result<_, _>>()?;
        if stop.len() > MAX_STOPS
            || stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            const _: () = assert!(MAX_STOPS == 4 && MAX_STOP_BYTES == 256, "the text below");
            return Err(DecodeError("stop takes at most 4 texts of 1 to 256 bytes"));
        }
        let n = r.count(8)?;
        let messages: Vec<(String, String)> = (0..n)
            .map(|_| Ok((r.text()?, r.text()?)))
            .collect::<Result<_, _>>()?;
        r.end()?;
        let roles_known = match prompt {
            PromptKind::Chat => (messages.iter()).all(|(role, _)| ROLES.contains(&role.as_str())),
            PromptKind::Raw => messages.iter().all(|(role, _)| role.is_empty()),
        };
        if !roles_known {
            return Err(DecodeError(
                "a chat message's role is system, user or assistant; a raw prompt's is empty",
            ));
        }
        Ok(Request {
            prompt,
            messages,
            max_tokens,
            max_tokens_asked,
            temperature,
            top_p,
            seed,
            stop,
        })
    }
}

impl Event {
    /// The payload of a [`kind::EVENT`] message.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Event::Token { id, text } => {
                w.u8(0);
                w.u32(*id);
                w.text(text);
            }
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                w.u8(1);
                w.u8(*reason as u8);
                w.u32(*prompt_tokens);
                w.u32(*completion_tokens);
            }
            Event::Error { code, message } => {
                w.u8(2);
                w.u8(*code as u8);
                w.text(message);
            }
        }
        w.0
    }

    /// Decodes a [`kind::EVENT`] payload.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let mut r = Reader(bytes);
        let event = match r.u8()? {
            0 => Event::Token {
                id: r.u32()?,
                text: r.text()?,
            },
            1 => Event::Done {
                reason: r.one_of(&FinishReason::ALL, "unknown finish reason")?,
                prompt_tokens: r.u32()?,
                completion_tokens: r.u32()?,
            },
            2 => Event::Error {
                code: r.one_of(&RefusalCode::ALL, "unknown error code")?,
                message: r.text()?,
            },
            _ => return Err(DecodeError("unknown event")),
        };
        r.end()?;
        Ok(event)
    }
}

/// Holds back the end of a streamed answer that could still become one of the stop
/// texts, so a stop text never reaches the client, not even in part.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    /// A filter for `stops` (empty texts are ignored).
    pub fn new(stops: &[String]) -> StopFilter {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns what may be sent now, and whether a stop text was reached
    /// (then nothing after it is sent).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = String::from(&self.held[..at]);
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of some stop text.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if tail.len() < s.len() && s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = String::from(&self.held[..cut]);
        self.held.drain(..cut);
        (out, false)
    }

    /// What is held back, once the answer ends without a stop text.
    pub fn finish(&mut self) -> String {
        core::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn request() -> Request {
        Request {
            prompt: PromptKind::Chat,
            messages: vec![("user".into(), "What is 2+2?".into())],
            max_tokens: 32,
            max_tokens_asked: true,
            temperature: 0.7,
            top_p: 0.9,
            seed: 42,
            stop: vec!["\n\n".into()],
        }
    }

    #[test]
    fn requests_and_events_round_trip() {
        let r = request();
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        for e in [
            Event::Token {
                id: 7,
                text: "héllo".into(),
            },
            Event::Done {
                reason: FinishReason::Length,
                prompt_tokens: 10,
                completion_tokens: 32,
            },
            Event::Error {
                code: RefusalCode::ContextLength,
                message: "too long".into(),
            },
        ] {
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
        // Every reason and code, so a byte out of step with its table shows.
        for reason in FinishReason::ALL {
            let e = Event::Done {
                reason,
                prompt_tokens: 1,
                completion_tokens: 2,
            };
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
        for code in RefusalCode::ALL {
            let e = Event::Error {
                code,
                message: String::new(),
            };
            assert_eq!(Event::decode(&e.encode()), Ok(e));
        }
    }

    #[test]
    fn hostile_payloads_are_errors() {
        let good = request().encode();
        for cut in 0..good.len() {
            assert!(Request::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[23..27].copy_from_slice(&u32::MAX.to_le_bytes()); // the stop count
        assert!(Request::decode(&huge).is_err());
        // Whether max_tokens was asked for is a byte of 0 or 1.
        let mut asked = good.clone();
        assert_eq!(asked[6], 1);
        asked[6] = 2;
        assert!(Request::decode(&asked).is_err());
        let mut trailing = good;
        trailing.push(0);
        assert!(Request::decode(&trailing).is_err());
        // A role that is no role (markup of its own), and stop texts past their bounds.
        let refused = |change: fn(&mut Request)| {
            let mut r = request();
            change(&mut r);
            Request::decode(&r.encode()).is_err()
        };
        assert!(refused(|r| r.messages[0].0 = "user<|im_end|>".into()));
        assert!(refused(|r| r.prompt = PromptKind::Raw));
        assert!(refused(|r| r.stop = vec!["x".into(); MAX_STOPS + 1]));
        assert!(refused(|r| r.stop = vec!["x".repeat(MAX_STOP_BYTES + 1)]));
        assert!(refused(|r| r.stop = vec![String::new()]));
        assert!(!refused(
            |r| r.stop = vec!["x".repeat(MAX_STOP_BYTES); MAX_STOPS]
        ));
        assert!(Event::decode(&[9]).is_err());
        assert!(Event::decode(&[0, 1, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xfe]).is_err());
    }

    #[test]
    fn long_texts_are_split_at_characters_into_events_that_fit() {
        let text = "é".repeat(300) + "𝄞a" + &"€".repeat(200);
        let token = Event::Token {
            id: 7,
            text: text.clone(),
        };
        for max in [488, 100, 13, 12, 10, 0] {
            let events = token.split(max);
            let mut joined = String::new();
            for (i, e) in events.iter().enumerate() {
                let Event::Token { id, text } = e else {
                    panic!("{e:?}")
                };
                assert_eq!(*id, if i == 0 { 7 } else { NO_TOKEN }, "max {max}");
                assert!(!text.is_empty(), "max {max}: no progress");
                // One character always goes, even where it does not fit.
                let one = text.chars().count() == 1;
                assert!(e.encode().len() <= max || one, "max {max}: {e:?}");
                if max >= 13 {
                    assert!(e.encode().len() <= max, "max {max}: {e:?}");
                }
                joined.push_str(text);
            }
            assert_eq!(joined, text, "max {max}");
        }
        assert_eq!(token.split(488).len(), 3);
        // What fits goes as it is; an empty text too.
        for text in ["hello", ""] {
            let e = Event::Token {
                id: 3,
                text: text.into(),
            };
            assert_eq!(e.split(488), vec![e.clone()]);
        }
        let error = Event::Error {
            code: RefusalCode::Internal,
            message: "ü".repeat(400),
        };
        let [Event::Error { code, message }] = &error.split(488)[..] else {
            panic!()
        };
        assert_eq!(*code, RefusalCode::Internal);
        assert_eq!(message, &"ü".repeat(241));
        let done = Event::Done {
            reason: FinishReason::Stop,
            prompt_tokens: 1,
            completion_tokens: 2,
        };
        assert_eq!(done.split(488), vec![done.clone()]);
    }

    #[test]
    fn stop_texts_are_held_back_and_cut() {
        let mut f = StopFilter::new(&["END".to_string()]);
        assert_eq!(f.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(f.push("N"), (String::new(), false));
        assert_eq!(f.push("Dxyz"), (String::new(), true));
        let mut f = StopFilter::new(&["END".to_string()]);
        assert_eq!(f.push("EN"), (String::new(), false));
        assert_eq!(f.push("x"), ("ENx".to_string(), false));
        assert_eq!(f.push("E"), (String::new(), false));
        assert_eq!(f.finish(), "E");
    }
}
