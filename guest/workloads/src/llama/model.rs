//! A llama-family GGUF model on the virtual accelerator, shared by the guests that run
//! one (`llm-chat`, `llm-serve`): the weights go straight from the attached file into
//! device memory and are only read from then on; each sequence has its KV cache.

use ferry_llm::{
    ChatError, ChatTemplate, Gguf, GgufError, LlamaConfig, LlamaModel, Tokenizer, Weight,
};
use ferry_sdk::abi::accel::dtype::DType;
use ferry_sdk::abi::accel::kernel::attention_within_work;
use ferry_sdk::accel::{Accel, AccelError, Pending, Tensor, U32Tensor, Weights};
use ferry_sdk::files::{self, File};
use ferry_sdk::prelude::*;
use ferry_sdk::workload;

/// Most bytes of metadata read before giving up on a file.
const MAX_HEADER: u64 = 256 << 20;

/// Any failure of a run, as one message.
pub struct Failure(pub String);

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

impl From<Failure> for workload::Failure {
    fn from(e: Failure) -> Self {
        workload::Failure::Other(e.0)
    }
}

/// The model file's description (metadata, tensors, tokenizer, chat template or why it
/// has none usable), read from its header: more of it is read until the parser has all
/// it needs.
pub fn read_model(
    file: &File,
) -> Result<(LlamaModel, Tokenizer, Result<ChatTemplate, ChatError>), Failure> {
    let bad = |what: &str, e: &dyn core::fmt::Display| {
        Failure(format!("model file '{}': {what}: {e}", file.name()))
    };
    let most = file.size().min(MAX_HEADER);
    let mut want = most.min(4 << 20);
    loop {
        let prefix = file.read_vec(0, want as usize)?;
        match Gguf::parse(&prefix, file.size()) {
            Ok(gguf) => {
                let model = LlamaModel::from_gguf(&gguf).map_err(|e| bad("model", &e))?;
                let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| bad("tokenizer", &e))?;
                // Kept with why, for the chat requests it refuses: a model may have no
                // template or one of a family we do not render.
                let template = ChatTemplate::from_gguf(&gguf);
                return Ok((model, tokenizer, template));
            }
            // The parser's guess may be larger than needed: up to the bound, read it.
            Err(GgufError::NeedMore { bytes }) if bytes > want && want < most => {
                want = bytes.min(most);
            }
            Err(GgufError::NeedMore { .. }) if want == MAX_HEADER => {
                return Err(Failure(format!(
                    "model file '{}': its metadata takes more than {} MiB, the most this \
                     guest reads",
                    file.name(),
                    MAX_HEADER >> 20
                )));
            }
            Err(e) => return Err(bad("not a usable GGUF file", &e)),
        }
    }
}

/// One transformer block's weights on the device.
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
}

impl Block {
    /// The block up to attention: `x` normed into `xn`, then projected into `q`, `k`, `v`.
    fn project_qkv(&self, acc: &mut Accel, a: &mut Activations, eps: f32) {
        acc.rms_norm(&a.x, &self.attn_norm, &mut a.xn, eps);
        acc.qmatmul(&self.q, &a.xn, &mut a.q);
        acc.qmatmul(&self.k, &a.xn, &mut a.k);
        acc.qmatmul(&self.v, &a.xn, &mut a.v);
    }

    /// The block after attention: `att` projected and added into `x`, then the
    /// feed-forward network of `x` normed, added too.
    fn add_output_and_ffn(&self, acc: &mut Accel, a: &mut Activations, eps: f32) {
        acc.qmatmul(&self.o, &a.att, &mut a.proj);
        acc.axpy(1.0, &a.proj, &mut a.x);
        acc.rms_norm(&a.x, &self.ffn_norm, &mut a.xn, eps);
        acc.qmatmul(&self.gate, &a.xn, &mut a.gate);
        acc.qmatmul(&self.up, &a.xn, &mut a.up);
        acc.swiglu(&a.gate, &a.up, &mut a.hidden);
        acc.qmatmul(&self.down, &a.hidden, &mut a.proj);
        acc.axpy(1.0, &a.proj, &mut a.x);
    }
}

/// One sequence's KV cache: keys and values per layer.
struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl KvCache {
    /// Attends `q` (its tokens at positions from `pos`) over layer `l`'s keys and values
    /// up to them, into `att`.
    fn attend(
        &self,
        acc: &mut Accel,
        l: usize,
        q: &Tensor,
        att: &mut Tensor,
        heads: (usize, usize),
        pos: usize,
    ) {
        acc.attention(q, &self.k[l], &self.v[l], att, heads, pos);
    }
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
    /// One token's query, key and attention output, for [`Device::decode`]'s tokens of
    /// different sequences, each at its own position.
    one_q: Tensor,
    one_k: Tensor,
    one_att: Tensor,
    /// The logits and next token of each of [`Device::decode`]'s tokens.
    each_logits: Tensor,
    each_next: U32Tensor,
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

/// The model on the device, with KV caches for `slots` sequences.
pub struct Device {
    acc: Accel,
    config: LlamaConfig,
    embedding: Weights,
    output_norm: Tensor,
    /// The output projection; `None`: tied to the token embedding.
    output: Option<Weights>,
    /// Divisors of the rope pairs' frequencies (the file's, else ones).
    rope_factors: Tensor,
    blocks: Vec<Block>,
    caches: Vec<KvCache>,
    act: Activations,
    /// Tokens [`Device::decode`] takes at once (the rows of `act.each_logits` as
    /// allocated: a decode of fewer shrinks them, not this).
    decode_rows: usize,
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

/// The model's rope frequency factors (ones without `rope_freqs.weight`), checked, into
/// device memory.
fn load_rope_factors(acc: &mut Accel, file: &File, model: &LlamaModel) -> Result<Tensor, Failure> {
    let data = match &model.rope_factors {
        Some(w) => file.read_vec(w.offset, w.size as usize)?,
        None => Vec::new(),
    };
    let factors = model
        .rope_factor_values(&data)
        .map_err(|e| Failure(format!("model file '{}': model: {e}", file.name())))?;
    let mut t = acc.alloc(1, factors.len())?;
    acc.upload(&mut t, &factors)?;
    Ok(t)
}

/// Tokens [`Device::decode`] takes at once: one per sequence, as many as the activations
/// hold.
fn decode_rows(batch: usize, slots: usize) -> usize {
    batch.min(slots)
}

/// Device bytes the run needs: weights (rounded to words), caches, activations.
/// Saturating where the caller's numbers come in: a `context` or `batch` too large to
/// count needs more than any device has. (The model's own sizes are those of tensors in
/// the file.)
fn device_bytes(model: &LlamaModel, context: usize, batch: usize, slots: usize) -> u64 {
    let c = &model.config;
    let weights: u64 = model.weights().map(|w| w.size.next_multiple_of(4)).sum();
    let kv = (c.kv_heads * c.head_dim) as u64;
    let caches = [c.layers as u64, context as u64, kv, 4, slots as u64]
        .iter()
        .fold(2u64, |product, &f| product.saturating_mul(f));
    let per_token = (3 * c.dim + 2 * kv as usize + 2 * c.dim + 3 * c.ffn_dim + 1) as u64 * 4;
    // Rope factors of ones when the file has none (else they are a weight).
    let ones = if model.rope_factors.is_none() {
        c.rope_dim / 2
    } else {
        0
    };
    let fixed = (4 * c.dim + kv as usize + c.vocab + 1 + ones) as u64 * 4;
    let each = decode_rows(batch, slots) as u64 * (c.vocab + 1) as u64 * 4;
    (weights + fixed + each)
        .saturating_add(caches)
        .saturating_add(per_token.saturating_mul(batch as u64))
}

impl Device {
    /// Loads the weights from `file` and allocates `slots` KV caches of `context`
    /// positions and activations for `batch` tokens at once.
    pub fn load(
        file: &File,
        model: &LlamaModel,
        context: usize,
        batch: usize,
        slots: usize,
    ) -> Result<Device, Failure> {
        let mut acc = Accel::open()?;
        let needed = device_bytes(model, context, batch, slots);
        if needed > acc.capacity() {
            return Err(Failure(format!(
                "the model needs {} MiB of accelerator memory ({} MiB of weights, a KV cache of \
                 {context} positions for each of {slots} sequences); this VM has {} MiB: raise \
                 --accel-memory or lower --context",
                needed.div_ceil(1 << 20),
                model.weight_bytes() >> 20,
                acc.capacity() >> 20
            )));
        }
        let c = model.config;
        // Each position's query attends once: the last one's alone must be one launch.
        if !attention_within_work(1, c.heads as u64, context as u64, c.head_dim as u64) {
            return Err(Failure(format!(
                "a context of {context} positions is more attention than one accelerator launch \
                 may do for this model ({} heads of {}): lower --context",
                c.heads, c.head_dim
            )));
        }
        let kv = c.kv_heads * c.head_dim;
        let embedding = load_weights(&mut acc, file, &model.token_embd)?;
        let output_norm = load_vector(&mut acc, file, &model.output_norm)?;
        let output = match &model.output {
            Some(w) => Some(load_weights(&mut acc, file, w)?),
            None => None,
        };
        let rope_factors = load_rope_factors(&mut acc, file, model)?;
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
            });
        }
        let mut caches = Vec::with_capacity(slots);
        for _ in 0..slots {
            let mut cache = KvCache {
                k: Vec::with_capacity(c.layers),
                v: Vec::with_capacity(c.layers),
            };
            for _ in 0..c.layers {
                cache.k.push(acc.alloc(context, kv)?);
                cache.v.push(acc.alloc(context, kv)?);
            }
            caches.push(cache);
        }
        let rows = decode_rows(batch, slots);
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
            one_q: acc.alloc(1, c.dim)?,
            one_k: acc.alloc(1, kv)?,
            one_att: acc.alloc(1, c.dim)?,
            each_logits: acc.alloc(rows, c.vocab)?,
            each_next: acc.alloc(rows, 1)?,
        };
        // Waits for the loads, and reports a file the device could not read.
        acc.sync()?;
        Ok(Device {
            acc,
            config: c,
            embedding,
            output_norm,
            output,
            rope_factors,
            blocks,
            caches,
            act,
            decode_rows: rows,
        })
    }

    /// Runs `tokens` (at positions `pos..` of sequence `slot`) through the model and
    /// queues the logits of the last one (in `act.logits`). Tokens more than one
    /// attention launch takes (a long prompt, a large `--batch`) go in parts, each over
    /// the cache the parts before it filled: the same logits, row for row.
    pub fn forward(&mut self, tokens: &[u32], pos: usize, slot: usize) -> Result<(), AccelError> {
        let mut done = 0;
        while done < tokens.len() {
            let n = self.rows_within_work(pos + done, tokens.len() - done);
            self.forward_part(&tokens[done..done + n], pos + done, slot)?;
            done += n;
        }
        Ok(())
    }

    /// How many of `left` tokens from position `pos` one attention launch takes (at least
    /// one: [`Self::load`] checked that one at the context's end is within the bound).
    fn rows_within_work(&self, pos: usize, left: usize) -> usize {
        let c = self.config;
        let fits = |rows: usize| {
            attention_within_work(
                rows as u64,
                c.heads as u64,
                (pos + rows) as u64,
                c.head_dim as u64,
            )
        };
        let mut rows = left;
        while rows > 1 && !fits(rows) {
            rows = rows.div_ceil(2);
        }
        rows
    }

    fn forward_part(&mut self, tokens: &[u32], pos: usize, slot: usize) -> Result<(), AccelError> {
        self.act.set_rows(tokens.len());
        self.acc.upload(&mut self.act.ids, tokens)?;
        self.forward_ids(tokens.len(), pos, slot);
        Ok(())
    }

    /// The most likely next token of the last forward pass (the first on ties), left in
    /// the device's token ids for [`Self::forward_queued`], and a download of it queued:
    /// the pass after it can be queued before the guest looks at it.
    #[allow(dead_code)] // llm-serve looks at each token before the next pass.
    pub fn argmax_queued(&mut self) -> Pending<u32> {
        let a = &mut self.act;
        a.ids.set_rows(1);
        self.acc.argmax(&a.logits, &mut a.ids);
        self.acc.download_later(&a.ids)
    }

    /// [`Self::forward`] of the token the last [`Self::argmax_queued`] left on the
    /// device, at position `pos` of sequence `slot`: queued, not waited for.
    #[allow(dead_code)] // llm-serve looks at each token before the next pass.
    pub fn forward_queued(&mut self, pos: usize, slot: usize) {
        self.act.set_rows(1);
        self.forward_ids(1, pos, slot);
    }

    /// The token to collect of an [`Self::argmax_queued`].
    #[allow(dead_code)] // llm-serve looks at each token before the next pass.
    pub fn collect(&mut self, pending: Pending<u32>) -> Result<u32, AccelError> {
        Ok(self.acc.collect(pending)?[0])
    }

    /// [`Self::forward`] of the `n` tokens in the device's token ids.
    fn forward_ids(&mut self, n: usize, pos: usize, slot: usize) {
        let c = self.config;
        let a = &mut self.act;
        let acc = &mut self.acc;
        acc.qembedding(&self.embedding, &a.ids, &mut a.x);
        let kv = c.kv_heads * c.head_dim;
        let cache = &mut self.caches[slot];
        for (l, b) in self.blocks.iter().enumerate() {
            b.project_qkv(acc, a, c.rms_eps);
            let f = &self.rope_factors;
            acc.rope(&mut a.q, f, c.heads, pos, c.rope_base, c.rope_style);
            acc.rope(&mut a.k, f, c.kv_heads, pos, c.rope_base, c.rope_style);
            acc.copy(&a.k, 0, &mut cache.k[l], pos * kv, n * kv);
            acc.copy(&a.v, 0, &mut cache.v[l], pos * kv, n * kv);
            cache.attend(acc, l, &a.q, &mut a.att, (c.heads, c.kv_heads), pos);
            b.add_output_and_ffn(acc, a, c.rms_eps);
        }
        acc.copy(&a.x, (n - 1) * c.dim, &mut a.last, 0, c.dim);
        acc.rms_norm(&a.last, &self.output_norm, &mut a.last_norm, c.rms_eps);
        let output = self.output.as_ref().unwrap_or(&self.embedding);
        acc.qmatmul(output, &a.last_norm, &mut a.logits);
        // The whole pass starts now, not when its result is asked for: the caller may
        // have other work meanwhile.
        acc.flush();
    }

    /// Tokens [`Self::decode`] takes at once.
    #[allow(dead_code)] // llm-chat decodes one sequence.
    pub fn decode_rows(&self) -> usize {
        self.decode_rows
    }

    /// Runs one token of each of several sequences through the model, `(token, position,
    /// slot)` each (at most [`Self::decode_rows`], of different slots), and queues each
    /// one's logits. The matrix products take the tokens together; each token's rotary
    /// embedding and attention run alone, at its own position over its own cache. So each
    /// gets the very logits [`Self::forward`] gives it alone, whatever else is decoded.
    #[allow(dead_code)] // llm-chat decodes one sequence.
    pub fn decode(&mut self, tokens: &[(u32, usize, usize)]) -> Result<(), AccelError> {
        let c = self.config;
        let n = tokens.len();
        let a = &mut self.act;
        let acc = &mut self.acc;
        a.set_rows(n);
        let ids: Vec<u32> = tokens.iter().map(|t| t.0).collect();
        acc.upload(&mut a.ids, &ids)?;
        acc.qembedding(&self.embedding, &a.ids, &mut a.x);
        let kv = c.kv_heads * c.head_dim;
        for (l, b) in self.blocks.iter().enumerate() {
            b.project_qkv(acc, a, c.rms_eps);
            for (r, &(_, pos, slot)) in tokens.iter().enumerate() {
                let cache = &mut self.caches[slot];
                acc.copy(&a.q, r * c.dim, &mut a.one_q, 0, c.dim);
                acc.copy(&a.k, r * kv, &mut a.one_k, 0, kv);
                let f = &self.rope_factors;
                acc.rope(&mut a.one_q, f, c.heads, pos, c.rope_base, c.rope_style);
                acc.rope(&mut a.one_k, f, c.kv_heads, pos, c.rope_base, c.rope_style);
                acc.copy(&a.one_k, 0, &mut cache.k[l], pos * kv, kv);
                acc.copy(&a.v, r * kv, &mut cache.v[l], pos * kv, kv);
                let heads = (c.heads, c.kv_heads);
                cache.attend(acc, l, &a.one_q, &mut a.one_att, heads, pos);
                acc.copy(&a.one_att, 0, &mut a.att, r * c.dim, c.dim);
            }
            b.add_output_and_ffn(acc, a, c.rms_eps);
        }
        acc.rms_norm(&a.x, &self.output_norm, &mut a.xn, c.rms_eps);
        let output = self.output.as_ref().unwrap_or(&self.embedding);
        a.each_logits.set_rows(n);
        acc.qmatmul(output, &a.xn, &mut a.each_logits);
        acc.flush();
        Ok(())
    }

    /// The most likely next token of each of the last [`Self::decode`]'s tokens.
    #[allow(dead_code)] // llm-chat decodes one sequence.
    pub fn argmax_each(&mut self, out: &mut [u32]) -> Result<(), AccelError> {
        let a = &mut self.act;
        a.each_next.set_rows(a.each_logits.rows());
        self.acc.argmax(&a.each_logits, &mut a.each_next);
        self.acc.download(&a.each_next, out)
    }

    /// The logits of token `r` of the last [`Self::decode`].
    #[allow(dead_code)] // llm-chat decodes one sequence.
    pub fn logits_of(&mut self, r: usize, out: &mut [f32]) -> Result<(), AccelError> {
        let vocab = self.config.vocab;
        self.acc.download_at(&self.act.each_logits, r * vocab, out)
    }

    /// Empties sequence `slot`'s KV cache: its buffers are made afresh (zero), so the
    /// device no longer counts them as written and a migration sends the caches of the
    /// sequences being served, not those of answers that have ended.
    #[allow(dead_code)] // llm-chat answers one prompt and never needs it.
    pub fn clear_cache(&mut self, slot: usize) -> Result<(), AccelError> {
        let cache = &mut self.caches[slot];
        for layers in [&mut cache.k, &mut cache.v] {
            let shapes: Vec<(usize, usize)> = layers.iter().map(|t| (t.rows(), t.cols())).collect();
            // Freed first, so the new buffers fit in the memory the old ones held.
            for t in layers.drain(..) {
                self.acc.free(t);
            }
            for (rows, cols) in shapes {
                layers.push(self.acc.alloc(rows, cols)?);
            }
        }
        Ok(())
    }

    /// The most likely next token (the first on ties), computed on the device.
    pub fn argmax(&mut self) -> Result<u32, AccelError> {
        let a = &mut self.act;
        self.acc.argmax(&a.logits, &mut a.next);
        let mut id = [0u32];
        self.acc.download(&a.next, &mut id)?;
        Ok(id[0])
    }

    /// The logits of the last forward pass.
    pub fn logits(&mut self, out: &mut [f32]) -> Result<(), AccelError> {
        self.acc.download(&self.act.logits, out)
    }
}

/// One line describing the model.
pub fn describe(model: &LlamaModel) -> String {
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
