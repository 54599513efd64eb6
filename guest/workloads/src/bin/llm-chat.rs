//! A GGUF language model (the llama architecture with a byte-level BPE tokenizer, as
//! SmolLM2's, or a SentencePiece one, as TinyLlama's) answering a prompt on the virtual
//! accelerator. The model is a file attached to the VM; its weights go straight from the
//! file into device memory and are only read from then on, and the KV cache grows in
//! device memory one position per token (the common case of inference for live
//! migration).
//!
//! Nothing depends on the clock: the same model, prompt and sampling arguments give the
//! same tokens and the same checksum, migrated or not, whatever the host's thread count.
#![no_std]
#![no_main]

#[path = "../llama/model.rs"]
mod model;

use ferry_llm::{DrawScratch, Message, RenderedPrompt, Sampler, SamplerConfig, Utf8Stream};
use ferry_sdk::accel::Pending;
use ferry_sdk::checksum::Fnv1a;
use ferry_sdk::clock::now_ns;
use ferry_sdk::files;
use ferry_sdk::prelude::*;
use ferry_sdk::{console, workload};
use model::{describe, read_model, Device, Failure};

ferry_sdk::entry!(main);

const HELP: &str = "\
llm-chat: answers a prompt with a GGUF language model on the virtual accelerator.
The model is a file attached to the VM (ferry run --attach model=FILE.gguf ...): the
llama architecture with a byte-level BPE tokenizer (SmolLM2's, Llama 3's) or a
SentencePiece one (TinyLlama's), rope frequency factors if it has them (Llama 3.1 and
later), weights in f32, f16, q8_0, q4_0, q4_1, q4_k or q6_k.
  --prompt TEXT       the user's message, rendered with the model's chat template
  --system TEXT       a system message (default: the template's own, if it has one);
                      both are text only: a special token's text in them (<|im_end|>)
                      stays text, it does not end the turn
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
    let options = match workload::options(&args, "llm-chat", HELP, Options::parse) {
        Ok(o) => o,
        Err(code) => return code,
    };
    match run(&options) {
        Ok(()) => {
            println!("done");
            0
        }
        Err(e) => {
            // The answer streamed so far may end mid-line.
            println!("\nllm-chat: error: {e}");
            workload::EXIT_FAILURE
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

/// Queues the pass of the token the last argmax left on the device, at `pos` (then one
/// further), and the argmax after it.
fn queue_next(dev: &mut Device, pos: &mut usize) -> Pending<u32> {
    dev.forward_queued(*pos, 0);
    *pos += 1;
    dev.argmax_queued()
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
    // A raw prompt is the caller's own markup; a chat's messages are text only, so that
    // `--prompt` cannot close its turn or open another with the template's markup.
    let (rendered, stops) = match &o.prompt {
        // What ends a chat's turn ends a raw prompt's too (as llm-serve has it).
        Prompt::Raw(raw) => (
            RenderedPrompt {
                text: String::from(*raw),
                contents: Vec::new(),
            },
            match &template {
                Ok(template) => template.stop_tokens(&tokenizer),
                Err(_) => tokenizer.end_of_generation(),
            },
        ),
        Prompt::Chat { system, user } => {
            let template = template.map_err(|why| {
                Failure(format!("model file '{}': {why}; use --raw", file.name()))
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
                template.render_marked(&messages, true),
                template.stop_tokens(&tokenizer),
            )
        }
    };
    let mut prompt = Vec::new();
    if tokenizer.add_bos() {
        prompt.extend(tokenizer.bos());
    }
    prompt.extend(tokenizer.encode_marked(&rendered.text, true, &rendered.contents));
    if prompt.is_empty() {
        return Err(Failure("the prompt is empty".into()));
    }
    let c = model.config;
    // Saturating: a --max-tokens too large to count is refused below like any too large.
    let (context, asked) = match o.context {
        Some(context) => (context, "--context"),
        None => (
            prompt.len().saturating_add(o.max_tokens),
            "prompt and --max-tokens",
        ),
    };
    if context > c.context_len || prompt.len() >= context {
        return Err(Failure(format!(
            "a context of {context} positions ({asked}) for a prompt of {} tokens: the model \
             takes at most {} positions",
            prompt.len(),
            c.context_len
        )));
    }
    let max_tokens = o.max_tokens.min(context - prompt.len());
    println!("llm-chat: model '{}': {}", file.name(), describe(&model));
    let started = now_ns();
    let batch = o.batch.min(prompt.len());
    let mut dev = Device::load(&file, &model, context, batch, 1)?;
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
        dev.forward(chunk, pos, 0)?;
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
    let mut scratch = DrawScratch::default();
    let mut next = |dev: &mut Device, sampler: &mut Sampler, logits: &mut Vec<f32>, step, pos| {
        if logits.is_empty() {
            return dev.argmax();
        }
        dev.logits(logits)?;
        if o.print_logits > 0 {
            print_top(step, pos, logits, o.print_logits);
        }
        Ok(if o.sampler.temperature > 0.0 {
            sampler.sample(logits, &mut scratch)
        } else {
            dev.argmax()?
        })
    };
    // Greedy without the logits: each token's argmax stays on the device and the next
    // pass is queued before the guest looks at it (the device never waits for it).
    let pipelined = logits.is_empty();
    let mut pending = pipelined.then(|| dev.argmax_queued());
    let mut token = match pending.take() {
        Some(p) => dev.collect(p)?,
        None => next(&mut dev, &mut sampler, &mut logits, 0, pos - 1)?,
    };
    let prompt_ns = now_ns() - started;
    println!(
        "llm-chat: prompt of {} tokens in {:.0} ms ({:.1} tokens/s)",
        prompt.len(),
        ms(prompt_ns),
        rate(prompt.len(), prompt_ns)
    );

    let started = now_ns();
    if pipelined && max_tokens > 1 {
        // The prompt's token is known: its pass is queued before it is printed.
        pending = Some(queue_next(&mut dev, &mut pos));
    }
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
        if tokenizer.is_shown(token) {
            piece.clear();
            utf8.push(tokenizer.decode_token(token), &mut piece);
            print!("{piece}");
            console::flush();
        }
        if generated.len() == max_tokens {
            break "token limit";
        }
        if let Some(p) = pending.take() {
            token = dev.collect(p)?;
            // The pass after it, unless the limit ends the answer first (one after a
            // token that ends it is run for nothing, and never seen).
            if generated.len() + 1 < max_tokens {
                pending = Some(queue_next(&mut dev, &mut pos));
            }
            continue;
        }
        dev.forward(&[token], pos, 0)?;
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
            .filter(|&t| tokenizer.is_shown(t))
            .collect();
        println!("answer={:?}", tokenizer.decode(&answer));
    }
    println!("tokens={}", generated.len());
    println!("prompt_tokens_s={:.1}", rate(prompt.len(), prompt_ns));
    println!("tokens_s={:.1}", rate(decoded, gen_ns));
    println!("checksum={:016x}", hash.value());
    Ok(())
}
