//! A GGUF language model (llama family: SmolLM2, TinyLlama, Llama 3.x) answering a
//! prompt on the virtual accelerator. The model is a file attached to the VM; its
//! weights go straight from the file into device memory and are only read from then on,
//! and the KV cache grows in device memory one position per token (the common case of
//! inference for live migration).
//!
//! Nothing depends on the clock: the same model, prompt and sampling arguments give the
//! same tokens and the same checksum, migrated or not, whatever the host's thread count.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use ferry_llm::{
    ChatTemplate, Gguf, GgufError, LlamaConfig, LlamaModel, Message, Sampler, SamplerConfig,
    Tokenizer, Utf8Stream, Weight,
};
use ferry_sdk::abi::accel::dtype::DType;
use ferry_sdk::accel::{Accel, AccelError, Tensor, U32Tensor, Weights};
use ferry_sdk::checksum::Fnv1a;
use ferry_sdk::clock::now_ns;
use ferry_sdk::files::{self, File};
use ferry_sdk::{console, print, println, ArgError, Args, EXIT_USAGE};

ferry_sdk::entry!(main);

const HELP: &str = "\
llm-chat: answers a prompt with a GGUF language model on the virtual accelerator.
The model is a file attached to the VM (ferry run --attach model=FILE.gguf ...); llama
architecture (SmolLM2, TinyLlama, Llama 3.x), weights in f32, f16, q8_0, q4_0, q4_1,
q4_k or q6_k.
  --prompt TEXT       the user's message, rendered with the model's chat template
  --system TEXT       a system message (default: the template's own, if it has one)
  --raw TEXT          a raw prompt instead (no template; special tokens are parsed)
  --max-tokens N      most tokens to generate (default 128); generation also ends at
                      the model's end-of-turn or end-of-text token
  --temperature T     0 (default) is greedy decoding; above 0 samples
  --top-k K           sample from the K most likely tokens (default 40; 0: all)
  --top-p P           ... within the smallest set of probability P (default 0.95)
  --seed N            seed of the sampler (default 1): the same seed, the same text
  --context N         positions of the KV cache (default: prompt + max-tokens)
  --batch N           prompt tokens processed per step (default 32)
  --file NAME         name of the attached model file (default model)
  --print-tokens      print the prompt's and the answer's token ids, and the answer
                      as one quoted line
  --print-logits K    after each step print the K largest logits (for tests)
Streams the answer as it is generated, then prints `tokens=<n>`, `prompt_tokens_s=`,
`tokens_s=` and `checksum=<16 hex digits>` (FNV-1a of the generated token ids).
A bad or unsupported model file is refused with a message and exit code 1.";

/// Exit code for a bad model file or a device failure.
const EXIT_FAILED: i32 = 1;
/// Most bytes of metadata read before giving up on a file.
const MAX_HEADER: u64 = 256 << 20;

/// What to run.
struct Options {
    file: &'static str,
    prompt: Prompt,
    max_tokens: usize,
    sampler: SamplerConfig,
    context: Option<usize>,
    batch: usize,
    print_tokens: bool,
    print_logits: usize,
}

enum Prompt {
    Chat {
        system: Option<&'static str>,
        user: &'static str,
    },
    Raw(&'static str),
}

fn main(args: Args) -> i32 {
    if args.wants_help() {
        println!("{HELP}");
        return 0;
    }
    let options = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            println!("llm-chat: error: {e} (see --help)");
            return EXIT_USAGE;
        }
    };
    match run(&options) {
        Ok(()) => {
            println!("done");
            0
        }
        Err(e) => {
            println!("\nllm-chat: error: {e}");
            EXIT_FAILED
        }
    }
}

impl Options {
    fn parse(args: &Args) -> Result<Self, ArgError> {
        args.check(
            &[
                "prompt",
                "system",
                "raw",
                "max-tokens",
                "temperature",
                "top-k",
                "top-p",
                "seed",
                "context",
                "batch",
                "file",
                "print-logits",
            ],
            &["print-tokens"],
        )?;
        let prompt = match (args.value("prompt")?, args.value("raw")?) {
            (Some(user), None) => Prompt::Chat {
                system: args.value("system")?,
                user,
            },
            (None, Some(raw)) => {
                if args.value("system")?.is_some() {
                    return Err(ArgError::new("--system goes with --prompt, not --raw"));
                }
                Prompt::Raw(raw)
            }
            (None, None) => return Err(ArgError::new("give --prompt TEXT or --raw TEXT")),
            (Some(_), Some(_)) => return Err(ArgError::new("give --prompt or --raw, not both")),
        };
        let max_tokens = args.parse_or("max-tokens", 128usize)?;
        let batch = args.parse_or("batch", 32usize)?;
        if max_tokens == 0 || batch == 0 {
            return Err(ArgError::new("--max-tokens and --batch must be at least 1"));
        }
        let sampler = SamplerConfig {
            temperature: args.parse_or("temperature", 0.0f32)?,
            top_k: args.parse_or("top-k", 40usize)?,
            top_p: args.parse_or("top-p", 0.95f32)?,
            seed: args.parse_or("seed", 1u64)?,
        };
        Sampler::new(sampler).map_err(|e| ArgError::new(format!("{e}")))?;
        Ok(Self {
            file: args.value("file")?.unwrap_or("model"),
            prompt,
            max_tokens,
            sampler,
            context: args.parse("context")?,
            batch,
            print_tokens: args.switch("print-tokens"),
            print_logits: args.parse_or("print-logits", 0usize)?,
        })
    }
}

/// Any failure of a run, as one message.
struct Failure(String);

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<AccelError> for Failure {
    fn from(e: AccelError) -> Self {
        Failure(format!("accelerator: {e}"))
    }
}

impl From<files::FileError> for Failure {
    fn from(e: files::FileError) -> Self {
        Failure(format!("{e}"))
    }
}

/// The model file's description (metadata, tensors, tokenizer, chat template), read
/// from its header: more of it is read until the parser has all it needs.
fn read_model(file: &File) -> Result<(LlamaModel, Tokenizer, Option<ChatTemplate>), Failure> {
    let bad = |what: &str, e: &dyn core::fmt::Display| {
        Failure(format!("model file '{}': {what}: {e}", file.name()))
    };
    let mut want = file.size().min(4 << 20);
    loop {
        let prefix = file.read_vec(0, want as usize)?;
        match Gguf::parse(&prefix, file.size()) {
            Ok(gguf) => {
                let model = LlamaModel::from_gguf(&gguf).map_err(|e| bad("model", &e))?;
                let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| bad("tokenizer", &e))?;
                let template = ChatTemplate::from_gguf(&gguf).ok();
                return Ok((model, tokenizer, template));
            }
            Err(GgufError::NeedMore { bytes }) if bytes > want && bytes <= MAX_HEADER => {
                want = bytes.min(file.size());
            }
            Err(e) => return Err(bad("not a usable GGUF file", &e)),
        }
    }
}

/// One transformer block on the device.
struct Block {
    attn_norm: Tensor,
    q: Weights,
    k: Weights,
    v: Weights,
    o: Weights,
    ffn_norm: Tensor,
    gate: Weights,
    up: Weights,
    down: Weights,
    k_cache: Tensor,
    v_cache: Tensor,
}

/// Activations for up to `batch` tokens at once.
struct Activations {
    ids: U32Tensor,
    x: Tensor,
    xn: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    proj: Tensor,
    gate: Tensor,
    up: Tensor,
    hidden: Tensor,
    last: Tensor,
    last_norm: Tensor,
    logits: Tensor,
    next: U32Tensor,
}

impl Activations {
    fn set_rows(&mut self, rows: usize) {
        self.ids.set_rows(rows);
        for t in [
            &mut self.x,
            &mut self.xn,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.att,
            &mut self.proj,
            &mut self.gate,
            &mut self.up,
            &mut self.hidden,
        ] {
            t.set_rows(rows);
        }
    }
}

/// The model on the device.
struct Device {
    acc: Accel,
    config: LlamaConfig,
    embedding: Weights,
    output_norm: Tensor,
    /// The output projection; `None`: tied to the token embedding.
    output: Option<Weights>,
    blocks: Vec<Block>,
    act: Activations,
}

/// A weight matrix from the file into device memory.
fn load_weights(acc: &mut Accel, file: &File, w: &Weight) -> Result<Weights, AccelError> {
    let mut t = acc.alloc_weights(w.rows as usize, w.cols as usize, w.dtype)?;
    acc.load_weights(&mut t, file, w.offset);
    Ok(t)
}

/// An f32 vector (a norm's scale) from the file into device memory.
fn load_vector(acc: &mut Accel, file: &File, w: &Weight) -> Result<Tensor, AccelError> {
    let mut t = acc.alloc(1, w.cols as usize)?;
    acc.load_file(&mut t, file, w.offset);
    Ok(t)
}

/// Device bytes the run needs: weights (rounded to words), caches, activations.
fn device_bytes(model: &LlamaModel, context: usize, batch: usize) -> u64 {
    let c = &model.config;
    let weights: u64 = model.weights().map(|w| w.size.next_multiple_of(4)).sum();
    let kv = (c.kv_heads * c.head_dim) as u64;
    let caches = 2 * c.layers as u64 * context as u64 * kv * 4;
    let per_token = (3 * c.dim + 2 * kv as usize + 2 * c.dim + 3 * c.ffn_dim + 1) as u64 * 4;
    let fixed = (2 * c.dim + c.vocab + 1) as u64 * 4;
    weights + caches + per_token * batch as u64 + fixed
}

impl Device {
    fn load(
        file: &File,
        model: &LlamaModel,
        context: usize,
        batch: usize,
    ) -> Result<Device, Failure> {
        let mut acc = Accel::open()?;
        let needed = device_bytes(model, context, batch);
        if needed > acc.capacity() {
            return Err(Failure(format!(
                "the model needs {} MiB of accelerator memory ({} MiB of weights, a KV cache of \
                 {context} positions); this VM has {} MiB: raise --accel-memory or lower --context",
                needed.div_ceil(1 << 20),
                model.weight_bytes() >> 20,
                acc.capacity() >> 20
            )));
        }
        let c = model.config;
        let kv = c.kv_heads * c.head_dim;
        let embedding = load_weights(&mut acc, file, &model.token_embd)?;
        let output_norm = load_vector(&mut acc, file, &model.output_norm)?;
        let output = match &model.output {
            Some(w) => Some(load_weights(&mut acc, file, w)?),
            None => None,
        };
        let mut blocks = Vec::with_capacity(c.layers);
        for l in &model.layers {
            blocks.push(Block {
                attn_norm: load_vector(&mut acc, file, &l.attn_norm)?,
                q: load_weights(&mut acc, file, &l.attn_q)?,
                k: load_weights(&mut acc, file, &l.attn_k)?,
                v: load_weights(&mut acc, file, &l.attn_v)?,
                o: load_weights(&mut acc, file, &l.attn_output)?,
                ffn_norm: load_vector(&mut acc, file, &l.ffn_norm)?,
                gate: load_weights(&mut acc, file, &l.ffn_gate)?,
                up: load_weights(&mut acc, file, &l.ffn_up)?,
                down: load_weights(&mut acc, file, &l.ffn_down)?,
                k_cache: acc.alloc(context, kv)?,
                v_cache: acc.alloc(context, kv)?,
            });
        }
        let act = Activations {
            ids: acc.alloc(batch, 1)?,
            x: acc.alloc(batch, c.dim)?,
            xn: acc.alloc(batch, c.dim)?,
            q: acc.alloc(batch, c.dim)?,
            k: acc.alloc(batch, kv)?,
            v: acc.alloc(batch, kv)?,
            att: acc.alloc(batch, c.dim)?,
            proj: acc.alloc(batch, c.dim)?,
            gate: acc.alloc(batch, c.ffn_dim)?,
            up: acc.alloc(batch, c.ffn_dim)?,
            hidden: acc.alloc(batch, c.ffn_dim)?,
            last: acc.alloc(1, c.dim)?,
            last_norm: acc.alloc(1, c.dim)?,
            logits: acc.alloc(1, c.vocab)?,
            next: acc.alloc(1, 1)?,
        };
        // Waits for the loads, and reports a file the device could not read.
        acc.sync()?;
        Ok(Device {
            acc,
            config: c,
            embedding,
            output_norm,
            output,
            blocks,
            act,
        })
    }

    /// Runs `tokens` (at positions `pos..`) through the model and queues the logits of
    /// the last one (in `act.logits`).
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<(), AccelError> {
        let c = self.config;
        let n = tokens.len();
        let a = &mut self.act;
        let acc = &mut self.acc;
        a.set_rows(n);
        acc.upload(&mut a.ids, tokens)?;
        acc.qembedding(&self.embedding, &a.ids, &mut a.x);
        let kv = c.kv_heads * c.head_dim;
        for b in &mut self.blocks {
            acc.rms_norm(&a.x, &b.attn_norm, &mut a.xn, c.rms_eps);
            acc.qmatmul(&b.q, &a.xn, &mut a.q);
            acc.qmatmul(&b.k, &a.xn, &mut a.k);
            acc.qmatmul(&b.v, &a.xn, &mut a.v);
            acc.rope(&mut a.q, c.heads, pos, c.rope_base, c.rope_style);
            acc.rope(&mut a.k, c.kv_heads, pos, c.rope_base, c.rope_style);
            acc.copy(&a.k, 0, &mut b.k_cache, pos * kv, n * kv);
            acc.copy(&a.v, 0, &mut b.v_cache, pos * kv, n * kv);
            acc.attention(
                &a.q,
                &b.k_cache,
                &b.v_cache,
                &mut a.att,
                (c.heads, c.kv_heads),
                pos,
            );
            acc.qmatmul(&b.o, &a.att, &mut a.proj);
            acc.axpy(1.0, &a.proj, &mut a.x);
            acc.rms_norm(&a.x, &b.ffn_norm, &mut a.xn, c.rms_eps);
            acc.qmatmul(&b.gate, &a.xn, &mut a.gate);
            acc.qmatmul(&b.up, &a.xn, &mut a.up);
            acc.swiglu(&a.gate, &a.up, &mut a.hidden);
            acc.qmatmul(&b.down, &a.hidden, &mut a.proj);
            acc.axpy(1.0, &a.proj, &mut a.x);
        }
        acc.copy(&a.x, (n - 1) * c.dim, &mut a.last, 0, c.dim);
        acc.rms_norm(&a.last, &self.output_norm, &mut a.last_norm, c.rms_eps);
        let output = self.output.as_ref().unwrap_or(&self.embedding);
        acc.qmatmul(output, &a.last_norm, &mut a.logits);
        Ok(())
    }

    /// The most likely next token (the first on ties), computed on the device.
    fn argmax(&mut self) -> Result<u32, AccelError> {
        let a = &mut self.act;
        self.acc.argmax(&a.logits, &mut a.next);
        let mut id = [0u32];
        self.acc.download(&a.next, &mut id)?;
        Ok(id[0])
    }

    /// The logits of the last forward pass.
    fn logits(&mut self, out: &mut [f32]) -> Result<(), AccelError> {
        self.acc.download(&self.act.logits, out)
    }
}

fn describe(model: &LlamaModel) -> String {
    let c = &model.config;
    let mut types: Vec<DType> = Vec::new();
    for w in model.weights() {
        if !types.contains(&w.dtype) {
            types.push(w.dtype);
        }
    }
    let names: Vec<&str> = types.iter().map(|d| d.name()).collect();
    format!(
        "llama, {} layers, dim {}, {}/{} heads, ffn {}, vocab {}, {:.1} MiB of weights ({})",
        c.layers,
        c.dim,
        c.heads,
        c.kv_heads,
        c.ffn_dim,
        c.vocab,
        model.weight_bytes() as f64 / f64::from(1 << 20),
        names.join(", ")
    )
}

/// Prints the `k` largest logits, largest first (ties by id).
fn print_top(step: usize, pos: usize, logits: &[f32], k: usize) {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let top: Vec<String> = order
        .iter()
        .take(k)
        .map(|&i| format!("{i}:{}", logits[i as usize]))
        .collect();
    println!("logits step={step} pos={pos} top={}", top.join(","));
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn rate(tokens: usize, ns: u64) -> f64 {
    tokens as f64 / (ns.max(1) as f64 / 1e9)
}

fn run(o: &Options) -> Result<(), Failure> {
    let file = files::open(o.file)?;
    let (model, tokenizer, template) = read_model(&file)?;
    let (text, stops) = match &o.prompt {
        Prompt::Raw(raw) => (String::from(*raw), tokenizer.eos().into_iter().collect()),
        Prompt::Chat { system, user } => {
            let template = template.ok_or_else(|| {
                Failure(format!(
                    "model file '{}' has no chat template this guest knows; use --raw",
                    file.name()
                ))
            })?;
            let mut messages = Vec::new();
            if let Some(system) = system {
                messages.push(Message {
                    role: "system",
                    content: system,
                });
            }
            messages.push(Message {
                role: "user",
                content: user,
            });
            (
                template.render(&messages, true),
                template.stop_tokens(&tokenizer),
            )
        }
    };
    let mut prompt = Vec::new();
    if tokenizer.add_bos() {
        prompt.extend(tokenizer.bos());
    }
    prompt.extend(tokenizer.encode(&text, true));
    if prompt.is_empty() {
        return Err(Failure("the prompt is empty".into()));
    }
    let c = model.config;
    let context = o.context.unwrap_or(prompt.len() + o.max_tokens);
    if context > c.context_len || prompt.len() >= context {
        return Err(Failure(format!(
            "a context of {context} positions for a prompt of {} tokens: the model takes at \
             most {} positions",
            prompt.len(),
            c.context_len
        )));
    }
    let max_tokens = o.max_tokens.min(context - prompt.len());
    println!("llm-chat: model '{}': {}", file.name(), describe(&model));
    let started = now_ns();
    let batch = o.batch.min(prompt.len());
    let mut dev = Device::load(&file, &model, context, batch)?;
    println!(
        "llm-chat: weights loaded into device memory in {:.0} ms",
        ms(now_ns() - started)
    );
    if o.print_tokens {
        println!("prompt_ids={prompt:?}");
    }

    let started = now_ns();
    let mut pos = 0;
    for chunk in prompt.chunks(batch) {
        dev.forward(chunk, pos)?;
        pos += chunk.len();
    }
    let mut sampler = Sampler::new(o.sampler).map_err(|e| Failure(format!("{e}")))?;
    let mut logits = vec![
        0f32;
        if o.sampler.temperature > 0.0 || o.print_logits > 0 {
            c.vocab
        } else {
            0
        }
    ];
    let next = |dev: &mut Device, sampler: &mut Sampler, logits: &mut Vec<f32>, step, pos| {
        if logits.is_empty() {
            return dev.argmax();
        }
        dev.logits(logits)?;
        if o.print_logits > 0 {
            print_top(step, pos, logits, o.print_logits);
        }
        Ok(if o.sampler.temperature > 0.0 {
            sampler.sample(logits)
        } else {
            dev.argmax()?
        })
    };
    let mut token = next(&mut dev, &mut sampler, &mut logits, 0, pos - 1)?;
    let prompt_ns = now_ns() - started;
    println!(
        "llm-chat: prompt of {} tokens in {:.0} ms ({:.1} tokens/s)",
        prompt.len(),
        ms(prompt_ns),
        rate(prompt.len(), prompt_ns)
    );

    let started = now_ns();
    let mut generated = Vec::new();
    let mut utf8 = Utf8Stream::new();
    let mut piece = String::new();
    let mut hash = Fnv1a::new();
    let stopped = loop {
        generated.push(token);
        hash.write(&token.to_le_bytes());
        if stops.contains(&token) {
            break "end of turn";
        }
        if !tokenizer.is_control(token) {
            piece.clear();
            utf8.push(tokenizer.decode_token(token), &mut piece);
            print!("{piece}");
            console::flush();
        }
        if generated.len() == max_tokens {
            break "token limit";
        }
        dev.forward(&[token], pos)?;
        pos += 1;
        token = next(
            &mut dev,
            &mut sampler,
            &mut logits,
            generated.len(),
            pos - 1,
        )?;
    };
    piece.clear();
    utf8.finish(&mut piece);
    println!("{piece}");
    let gen_ns = now_ns() - started;
    // The first token came with the prompt; the rest took a forward pass each.
    let decoded = generated.len().saturating_sub(1);
    println!(
        "llm-chat: {} tokens in {:.0} ms ({:.1} tokens/s), stopped at the {stopped}",
        generated.len(),
        ms(gen_ns),
        rate(decoded, gen_ns)
    );
    if o.print_tokens {
        println!("generated_ids={generated:?}");
        let answer: Vec<u32> = generated
            .iter()
            .copied()
            .filter(|&t| !tokenizer.is_control(t))
            .collect();
        println!("answer={:?}", tokenizer.decode(&answer));
    }
    println!("tokens={}", generated.len());
    println!("prompt_tokens_s={:.1}", rate(prompt.len(), prompt_ns));
    println!("tokens_s={:.1}", rate(decoded, gen_ns));
    println!("checksum={:016x}", hash.value());
    Ok(())
}
