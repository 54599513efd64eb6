//! A GGUF language model serving requests from the VM's message channel: several
//! sequences at once, one token of each in turn, every token streamed back as it is
//! produced. A request's answer depends only on the request (its prompt, parameters and
//! seed), not on what else is being served, nor on a migration.
#![no_std]
#![no_main]

extern crate alloc;

#[path = "../llama/model.rs"]
mod model;

use alloc::collections::VecDeque;
use ferry_llm::serve::{
    kind, Event, FinishReason, PromptKind, RefusalCode, Request, StopFilter, NO_TOKEN,
};
use ferry_llm::{
    ChatError, ChatTemplate, DrawScratch, Message, RenderedPrompt, Sampler, SamplerConfig,
    Tokenizer, Utf8Stream,
};
use ferry_sdk::channel::{Channel, Geometry};
use ferry_sdk::files;
use ferry_sdk::prelude::*;
use model::{describe, read_model, Device, Failure};

ferry_sdk::entry!(main);

/// Most requests waiting for a slot: as many streams as the host keeps open. More are
/// refused as busy.
const MAX_QUEUED: usize = 64;

const HELP: &str = "\
llm-serve: serves a GGUF language model (attached as 'model') to the host's clients
through the VM's message channel; the host's gateway speaks OpenAI's API.
  --slots N      sequences generated at once, each with its KV cache (default 4); more
                 requests wait in a queue (at most 64; beyond, they are refused as busy)
  --context N    positions of each sequence's KV cache: prompt plus answer (default 512)
  --batch N      prompt tokens read per step, and sequences decoded in one pass (default
                 8, at most --context): larger reads prompts faster, smaller delays the
                 other sequences' tokens less
  --file NAME    name of the attached model file (default model)
Prints `llm-serve: ready` once the model is in device memory, and a line per request.";

struct Options {
    file: &'static str,
    slots: usize,
    context: usize,
    batch: usize,
}

fn main(args: Args) -> i32 {
    ferry_sdk::workload::main(&args, "llm-serve", HELP, parse, serve)
}

fn parse(args: &Args) -> Result<Options, ArgError> {
    args.check(&["slots", "context", "batch", "file"], &[])?;
    let o = Options {
        file: args.value("file")?.unwrap_or("model"),
        slots: args.parse_or("slots", 4usize)?,
        context: args.parse_or("context", 512usize)?,
        batch: args.parse_or("batch", 8usize)?,
    };
    // A piece of a prompt is never longer than the context.
    if !(1..=64).contains(&o.slots) || o.context < 2 || !(1..=o.context).contains(&o.batch) {
        return Err(ArgError::new(
            "--slots must be 1 to 64, --context at least 2, --batch 1 to --context",
        ));
    }
    Ok(o)
}

/// The model's text side.
struct Text {
    tokenizer: Tokenizer,
    /// The chat template, or why chat requests are refused.
    template: Result<ChatTemplate, ChatError>,
    context: usize,
}

/// A request being answered.
struct Sequence {
    stream: u64,
    /// Its prompt; positions below its length are the prompt being read.
    prompt: Vec<u32>,
    /// Positions in its KV cache so far.
    pos: usize,
    /// The token to feed next (the last one generated).
    last: u32,
    generated: usize,
    max_tokens: usize,
    sampler: Option<Sampler>,
    stops: Vec<u32>,
    utf8: Utf8Stream,
    filter: StopFilter,
}

/// What a slot (one KV cache) holds.
enum Slot {
    /// Nothing: its cache is empty.
    Free,
    /// A request being answered.
    Serving(Box<Sequence>),
    /// The cache of an answer that has ended, to be emptied before the slot is used
    /// again (so that a migration does not send it).
    Ended,
}

/// What a sequence's next token is drawn from, taken off the device.
#[derive(Clone, Copy)]
enum Drawn {
    /// The token itself (greedy: the device's argmax).
    Token(u32),
    /// The logits, in [`Server::logits`], for the sequence's sampler.
    Logits,
}

/// The server's state: queued requests and the sequences in the slots.
struct Server {
    dev: Device,
    text: Text,
    batch: usize,
    /// Requests checked and tokenized when they arrived, waiting for a slot.
    queue: VecDeque<Box<Sequence>>,
    slots: Vec<Slot>,
    /// The logits of the last sequence whose token is drawn by a sampler.
    logits: Vec<f32>,
    /// Where the samplers draw, one after another.
    scratch: DrawScratch,
    served: u64,
}

fn serve(o: &Options) -> Result<(), Failure> {
    let file = files::open(o.file)?;
    let (model, tokenizer, template) = read_model(&file)?;
    let context = o.context.min(model.config.context_len);
    // Nor than the model's context, which may be shorter than --context.
    let batch = o.batch.min(context);
    println!("llm-serve: model '{}': {}", file.name(), describe(&model));
    let dev = Device::load(&file, &model, context, batch, o.slots)?;
    let mut ch =
        Channel::open(Geometry::default()).map_err(|e| Failure(format!("message channel: {e}")))?;
    let mut server = Server {
        dev,
        text: Text {
            tokenizer,
            template,
            context,
        },
        batch,
        queue: VecDeque::new(),
        slots: (0..o.slots).map(|_| Slot::Free).collect(),
        logits: vec![0f32; model.config.vocab],
        scratch: DrawScratch::default(),
        served: 0,
    };
    println!("llm-serve: ready: {} slots of {context} positions", o.slots);
    loop {
        // Before waiting for work: an idle server holds no ended answer's cache.
        server.empty_ended()?;
        let serving = server.slots.iter().any(|s| matches!(s, Slot::Serving(_)));
        let idle = server.queue.is_empty() && !serving;
        ch.kick(if idle { 1000 } else { 0 });
        while let Some(m) = ch.receive() {
            server.take(&mut ch, m);
        }
        // Cancels just taken.
        server.empty_ended()?;
        server.start_queued();
        server.step(&mut ch)?;
    }
}

/// Sends `event`, split into as many events as a long token's text needs: the channel
/// refuses a payload larger than a response slot.
fn send(ch: &mut Channel, stream: u64, event: &Event) {
    let max = ch.max_response();
    let mut send_one = |e: &Event, bytes: &[u8]| {
        if let Err(e) = ch.send(stream, kind::EVENT, e.is_final(), bytes) {
            // Not with the default geometry: a response slot has room for any character.
            println!("llm-serve: request {stream}: {e}");
        }
    };
    // Nearly every event fits whole: split (and copy) only the one that does not.
    let bytes = event.encode();
    if bytes.len() <= max {
        return send_one(event, &bytes);
    }
    for e in event.split(max) {
        send_one(&e, &e.encode());
    }
}

fn refuse(ch: &mut Channel, stream: u64, code: RefusalCode, message: String) {
    send(ch, stream, &Event::Error { code, message });
}

impl Server {
    /// A message from the host.
    fn take(&mut self, ch: &mut Channel, m: ferry_sdk::channel::Request) {
        match m.kind {
            // Bounded, though the host keeps at most 64 streams open and tells of one
            // it lets go of (below): the host is not trusted to.
            kind::REQUEST if m.opens && self.queue.len() >= MAX_QUEUED => refuse(
                ch,
                m.stream,
                RefusalCode::Busy,
                format!("{MAX_QUEUED} requests are waiting already"),
            ),
            // Checked as it arrives, not when a slot frees: a request that cannot be
            // served is refused at once, not after the answers ahead of it (minutes, when
            // the gateway has already begun a streaming answer), nor holds a place.
            kind::REQUEST if m.opens => match Request::decode(&m.payload) {
                Ok(r) => match self.text.sequence(m.stream, &r) {
                    Ok(seq) => self.queue.push_back(seq),
                    Err((code, message)) => refuse(ch, m.stream, code, message),
                },
                Err(e) => refuse(ch, m.stream, RefusalCode::InvalidRequest, format!("{e}")),
            },
            // Anything else that opens a stream would hold it open for ever, unanswered.
            other if m.opens => refuse(
                ch,
                m.stream,
                RefusalCode::InvalidRequest,
                format!("a stream opened by a message of kind {other}, not a request"),
            ),
            // Nobody reads the answer any more: as a cancel (its last event is dropped).
            _ if m.released => self.cancel(ch, m.stream),
            kind::CANCEL => self.cancel(ch, m.stream),
            _ => {}
        }
    }

    /// Stops answering `stream`: a request waiting is dropped, a sequence being served
    /// ends; either's last event says it was cancelled.
    fn cancel(&mut self, ch: &mut Channel, stream: u64) {
        if let Some(i) = self.queue.iter().position(|s| s.stream == stream) {
            // Its prompt was read (and counts in the usage), if not yet run.
            let prompt = self.queue.remove(i).map_or(0, |seq| seq.prompt.len());
            send(ch, stream, &done(FinishReason::Cancelled, prompt, 0));
        }
        let active = self
            .slots
            .iter_mut()
            .find(|slot| matches!(slot, Slot::Serving(s) if s.stream == stream));
        if let Some(slot) = active {
            if let Slot::Serving(seq) = core::mem::replace(slot, Slot::Ended) {
                self.finish(ch, *seq, FinishReason::Cancelled);
            }
        }
    }

    /// Empties the caches of the answers that have ended.
    fn empty_ended(&mut self) -> Result<(), Failure> {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if matches!(slot, Slot::Ended) {
                self.dev.clear_cache(i)?;
                *slot = Slot::Free;
            }
        }
        Ok(())
    }

    /// Starts queued requests in free slots (their prompts are read by [`Self::step`]).
    fn start_queued(&mut self) {
        while let Some(free) = self.slots.iter().position(|s| matches!(s, Slot::Free)) {
            let Some(seq) = self.queue.pop_front() else {
                return;
            };
            self.slots[free] = Slot::Serving(seq);
        }
    }

    /// One token for every sequence in a slot, or the next piece of its prompt for a
    /// sequence still reading its prompt: a long prompt arriving delays the others'
    /// next tokens by one piece, not by the whole prompt. The sequences past their
    /// prompts are decoded together (each token's logits are those it gets alone).
    fn step(&mut self, ch: &mut Channel) -> Result<(), Failure> {
        let decoding: Vec<usize> = (0..self.slots.len())
            .filter(|&i| matches!(&self.slots[i], Slot::Serving(s) if s.pos >= s.prompt.len()))
            .collect();
        for group in decoding.chunks(self.dev.decode_rows()) {
            self.decode(ch, group)?;
        }
        self.read_prompts(ch)
    }

    /// The next token of each sequence of `slots` (all past their prompts), decoded at once.
    fn decode(&mut self, ch: &mut Channel, slots: &[usize]) -> Result<(), Failure> {
        let mut tokens = Vec::with_capacity(slots.len());
        let mut greedy = false;
        for &i in slots {
            if let Slot::Serving(seq) = &mut self.slots[i] {
                tokens.push((seq.last, seq.pos, i));
                seq.pos += 1;
                greedy |= seq.sampler.is_none();
            }
        }
        if tokens.is_empty() {
            // Every sequence of the group was cancelled while an earlier group's tokens
            // were sent.
            return Ok(());
        }
        if let [(token, pos, slot)] = tokens[..] {
            // Alone: the one-token pass, without the copies that decoding together needs.
            self.dev.forward(&[token], pos, slot)?;
            let drawn = self.draw(slot)?;
            self.send_token(ch, slot, drawn);
            return Ok(());
        }
        self.dev.decode(&tokens)?;
        let mut best = vec![0u32; tokens.len()];
        if greedy {
            self.dev.argmax_each(&mut best)?;
        }
        for (r, &(_, _, i)) in tokens.iter().enumerate() {
            let drawn = match &self.slots[i] {
                Slot::Serving(seq) if seq.sampler.is_some() => {
                    self.dev.logits_of(r, &mut self.logits)?;
                    Drawn::Logits
                }
                _ => Drawn::Token(best[r]),
            };
            self.send_token(ch, i, drawn);
        }
        Ok(())
    }

    /// The next piece of the prompt of each sequence still reading one, and the first
    /// token of each that finishes. Each sequence's piece is queued before the token of
    /// the one before it is drawn and sent, so the device computes while the guest
    /// samples.
    fn read_prompts(&mut self, ch: &mut Channel) -> Result<(), Failure> {
        let mut drawn: Option<(usize, Drawn)> = None;
        for i in 0..self.slots.len() {
            let Slot::Serving(seq) = &mut self.slots[i] else {
                continue;
            };
            if seq.pos >= seq.prompt.len() {
                continue;
            }
            let end = (seq.pos + self.batch).min(seq.prompt.len());
            self.dev.forward(&seq.prompt[seq.pos..end], seq.pos, i)?;
            seq.pos = end;
            let read = seq.pos == seq.prompt.len();
            if let Some((slot, d)) = drawn.take() {
                self.send_token(ch, slot, d);
            }
            if read {
                drawn = Some((i, self.draw(i)?));
            }
        }
        if let Some((slot, d)) = drawn {
            self.send_token(ch, slot, d);
        }
        Ok(())
    }

    /// Takes what sequence `slot`'s next token is drawn from off the device, once its
    /// forward pass is done.
    fn draw(&mut self, slot: usize) -> Result<Drawn, Failure> {
        Ok(match &self.slots[slot] {
            Slot::Serving(seq) if seq.sampler.is_some() => {
                self.dev.logits(&mut self.logits)?;
                Drawn::Logits
            }
            _ => Drawn::Token(self.dev.argmax()?),
        })
    }

    /// Picks sequence `slot`'s next token from `drawn` and streams it, unless the
    /// sequence was cancelled since its pass was queued; then takes cancels and new
    /// requests (between tokens, not only between rounds).
    fn send_token(&mut self, ch: &mut Channel, slot: usize, drawn: Drawn) {
        self.slots[slot] = match core::mem::replace(&mut self.slots[slot], Slot::Free) {
            Slot::Serving(mut seq) => {
                let token = match (drawn, &mut seq.sampler) {
                    (Drawn::Token(token), _) => token,
                    (Drawn::Logits, Some(sampler)) => {
                        sampler.sample(&self.logits, &mut self.scratch)
                    }
                    (Drawn::Logits, None) => unreachable!("logits are taken only for a sampler"),
                };
                self.emit(ch, *seq, token)
            }
            other => other,
        };
        ch.kick(0);
        while let Some(m) = ch.receive() {
            self.take(ch, m);
        }
    }

    /// Streams `token` of `seq`; returns what its slot holds next.
    fn emit(&mut self, ch: &mut Channel, mut seq: Sequence, token: u32) -> Slot {
        seq.last = token;
        seq.generated += 1;
        if seq.stops.contains(&token) {
            self.finish(ch, seq, FinishReason::Stop);
            return Slot::Ended;
        }
        let mut piece = String::new();
        if self.text.tokenizer.is_shown(token) {
            seq.utf8
                .push(self.text.tokenizer.decode_token(token), &mut piece);
        }
        let (text, stopped) = seq.filter.push(&piece);
        send(ch, seq.stream, &Event::Token { id: token, text });
        if stopped {
            self.finish_quietly(ch, &seq, FinishReason::Stop);
            return Slot::Ended;
        }
        if seq.generated >= seq.max_tokens || seq.pos + 1 >= self.text.context {
            self.finish(ch, seq, FinishReason::Length);
            return Slot::Ended;
        }
        Slot::Serving(Box::new(seq))
    }

    /// Ends `seq`: the text still held back, then the final event.
    fn finish(&mut self, ch: &mut Channel, mut seq: Sequence, reason: FinishReason) {
        let mut tail = String::new();
        seq.utf8.finish(&mut tail);
        let (mut text, stopped) = seq.filter.push(&tail);
        if !stopped {
            text.push_str(&seq.filter.finish());
        }
        if !text.is_empty() {
            send(ch, seq.stream, &Event::Token { id: NO_TOKEN, text });
        }
        self.finish_quietly(ch, &seq, reason);
    }

    fn finish_quietly(&mut self, ch: &mut Channel, seq: &Sequence, reason: FinishReason) {
        // A token that ended the answer (end of turn) is not part of it.
        let completion = if reason == FinishReason::Stop && seq.stops.contains(&seq.last) {
            seq.generated - 1
        } else {
            seq.generated
        };
        send(ch, seq.stream, &done(reason, seq.prompt.len(), completion));
        self.served += 1;
        println!(
            "llm-serve: request {} ended ({}): {} prompt tokens, {completion} generated ({} served)",
            seq.stream,
            reason.name(),
            seq.prompt.len(),
            self.served
        );
    }
}

fn done(reason: FinishReason, prompt: usize, completion: usize) -> Event {
    Event::Done {
        reason,
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
    }
}

impl Text {
    /// The sequence that answers request `r` of `stream`, or why it cannot be served.
    fn sequence(&self, stream: u64, r: &Request) -> Result<Box<Sequence>, (RefusalCode, String)> {
        let (prompt, stops) = self.prompt(r)?;
        let config = SamplerConfig {
            temperature: r.temperature,
            top_k: 0,
            top_p: r.top_p,
            seed: r.seed,
        };
        // Checked whatever the temperature: a request with a value out of range (a
        // negative or NaN temperature too) is refused, not answered greedily.
        let sampler = match Sampler::new(config) {
            Ok(s) => (r.temperature > 0.0).then_some(s),
            Err(e) => return Err((RefusalCode::InvalidRequest, format!("{e}"))),
        };
        Ok(Box::new(Sequence {
            stream,
            pos: 0,
            last: 0,
            generated: 0,
            max_tokens: (r.max_tokens as usize).min(self.context - prompt.len()),
            sampler,
            stops,
            utf8: Utf8Stream::new(),
            filter: StopFilter::new(&r.stop),
            prompt,
        }))
    }

    /// The request's prompt tokens and stop tokens, or why it cannot be served.
    fn prompt(&self, r: &Request) -> Result<(Vec<u32>, Vec<u32>), (RefusalCode, String)> {
        // A raw prompt is the client's own markup; a chat's contents are text only.
        let (rendered, stops) = match r.prompt {
            PromptKind::Raw => {
                let [(_, raw)] = &r.messages[..] else {
                    return Err((
                        RefusalCode::InvalidRequest,
                        format!(
                            "a raw prompt is one text, not {} messages",
                            r.messages.len()
                        ),
                    ));
                };
                let rendered = RenderedPrompt {
                    text: raw.clone(),
                    contents: Vec::new(),
                };
                // What ends a chat's turn ends a raw prompt's too: the client may
                // write the template's markup itself.
                let stops = match &self.template {
                    Ok(template) => template.stop_tokens(&self.tokenizer),
                    Err(_) => self.tokenizer.end_of_generation(),
                };
                (rendered, stops)
            }
            PromptKind::Chat => {
                let template = match &self.template {
                    Ok(template) => template,
                    Err(why) => {
                        return Err((
                            RefusalCode::InvalidRequest,
                            format!("{why}; use the completions endpoint"),
                        ))
                    }
                };
                let messages: Vec<Message> = r
                    .messages
                    .iter()
                    .map(|(role, content)| Message {
                        role: role.as_str(),
                        content: content.as_str(),
                    })
                    .collect();
                (
                    template.render_marked(&messages, true),
                    template.stop_tokens(&self.tokenizer),
                )
            }
        };
        let mut prompt = Vec::new();
        if self.tokenizer.add_bos() {
            prompt.extend(self.tokenizer.bos());
        }
        prompt.extend(
            self.tokenizer
                .encode_marked(&rendered.text, true, &rendered.contents),
        );
        if prompt.is_empty() {
            return Err((RefusalCode::InvalidRequest, "the prompt is empty".into()));
        }
        if prompt.len() + 1 > self.context {
            return Err((
                RefusalCode::ContextLength,
                // OpenAI's words, which clients' wrappers look for to tell a context
                // overflow (LiteLLM: "maximum context length").
                format!(
                    "This model's maximum context length is {} tokens. However, your \
                     prompt has {} tokens, which leaves no room for an answer. Please \
                     reduce the length of the messages.",
                    self.context,
                    prompt.len()
                ),
            ));
        }
        if r.max_tokens == 0 {
            return Err((
                RefusalCode::InvalidRequest,
                "max_tokens must be at least 1".into(),
            ));
        }
        if r.max_tokens_asked && prompt.len() + r.max_tokens as usize > self.context {
            return Err((
                RefusalCode::ContextLength,
                format!(
                    "This model's maximum context length is {} tokens. However, you \
                     requested {} tokens ({} in the messages, {} in the completion). \
                     Please reduce the length of the messages or completion.",
                    self.context,
                    prompt.len() + r.max_tokens as usize,
                    prompt.len(),
                    r.max_tokens
                ),
            ));
        }
        Ok((prompt, stops))
    }
}
