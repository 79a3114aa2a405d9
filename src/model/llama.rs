//! The Llama forward pass (llama and qwen2), written once, generic over the backend.
//!
//! Per layer: `h = x + Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x))`, then
//! `x' = h + Wdown·(silu(Wgate·n(h)) * Wup·n(h))`, with `n` the RMSNorm of that sub-block.
//! Prompts are processed in batches of up to `n_batch` tokens.

use anyhow::{bail, Result};

use crate::backend::cpu::reference::RopeParams;
use crate::backend::Backend;
use crate::kv::codec::KvBytes;
use crate::kv::strategy::StrategySpec;
use crate::model::config::Config;
use crate::model::weights::Weights;

struct LayerW<B: Backend> {
    attn_norm: B::Buf,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    bq: Option<B::Buf>,
    bk: Option<B::Buf>,
    bv: Option<B::Buf>,
    ffn_norm: B::Buf,
    w_gate: B::Weight,
    w_up: B::Weight,
    w_down: B::Weight,
}

/// The model's weights as a backend holds them.
pub struct DeviceWeights<B: Backend> {
    token_embd: B::Weight,
    layers: Vec<LayerW<B>>,
    output_norm: B::Buf,
    output: B::Weight,
    rope_freqs: Option<Vec<f32>>,
}

impl<B: Backend> DeviceWeights<B> {
    pub fn new(b: &B, w: &Weights) -> Result<DeviceWeights<B>> {
        let opt = |v: &Option<Vec<f32>>| -> Result<Option<B::Buf>> { v.as_ref().map(|v| b.upload(v)).transpose() };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(LayerW {
                    attn_norm: b.upload(&l.attn_norm)?,
                    wq: b.weight(&l.wq)?,
                    wk: b.weight(&l.wk)?,
                    wv: b.weight(&l.wv)?,
                    wo: b.weight(&l.wo)?,
                    bq: opt(&l.bq)?,
                    bk: opt(&l.bk)?,
                    bv: opt(&l.bv)?,
                    ffn_norm: b.upload(&l.ffn_norm)?,
                    w_gate: b.weight(&l.w_gate)?,
                    w_up: b.weight(&l.w_up)?,
                    w_down: b.weight(&l.w_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceWeights {
            token_embd: b.table(&w.token_embd)?,
            layers,
            output_norm: b.upload(&w.output_norm)?,
            output: b.weight(&w.output)?,
            rope_freqs: w.rope_freqs.clone(),
        })
    }
}

/// Which rows of logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row (generation).
    Last,
    /// Rows for every token from this index of the call's tokens on (perplexity, scoring).
    From(usize),
    /// None (prefill of a prefix).
    None,
}

struct Scratch<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    proj: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    logits: B::Buf,
}

/// One sequence being run: the weights, its KV cache and scratch buffers.
pub struct Session<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: Config,
    w: &'a DeviceWeights<B>,
    pub kv: Vec<B::KvLayer>,
    n_batch: usize,
    n_ctx: usize,
    s: Scratch<B>,
    host_logits: Vec<f32>,
    /// Length of the first forward call after an empty cache: the prompt (unless set).
    prompt_len: usize,
    /// `prompt_len` was given by `set_prompt_len`, not taken from the first call.
    prompt_len_set: bool,
}

/// A copy of a session's KV cache (every layer, codec and policy state included) and its prompt
/// length, taken by `Session::snapshot` and put back by `Session::restore`.
pub struct KvSnapshot<B: Backend> {
    kv: Vec<B::KvLayer>,
    prompt_len: usize,
    prompt_len_set: bool,
}

impl<B: Backend> KvSnapshot<B> {
    /// Positions the saved cache had processed.
    pub fn n_past(&self, backend: &B) -> usize {
        self.kv.first().map_or(0, |l| backend.kv_len(l))
    }
}

impl<'a, B: Backend> Session<'a, B> {
    /// A session with the plain fp16 cache that can hold `n_ctx` tokens, processing prompts
    /// `n_batch` tokens at a time.
    pub fn new(backend: &'a B, cfg: &Config, w: &'a DeviceWeights<B>, n_ctx: usize, n_batch: usize) -> Result<Self> {
        Session::with_strategy(backend, cfg, w, n_ctx, n_batch, &StrategySpec::fp16())
    }

    /// A session whose KV cache follows `spec`.
    pub fn with_strategy(
        backend: &'a B,
        cfg: &Config,
        w: &'a DeviceWeights<B>,
        n_ctx: usize,
        n_batch: usize,
        spec: &StrategySpec,
    ) -> Result<Self> {
        if n_ctx == 0 || n_batch == 0 {
            bail!("context and batch sizes must be positive");
        }
        let nb = n_batch.min(n_ctx);
        let c = cfg;
        let s = Scratch {
            x: backend.alloc(nb * c.n_embd)?,
            xn: backend.alloc(nb * c.n_embd)?,
            q: backend.alloc(nb * c.q_dim())?,
            k: backend.alloc(nb * c.kv_dim())?,
            v: backend.alloc(nb * c.kv_dim())?,
            att: backend.alloc(nb * c.q_dim())?,
            proj: backend.alloc(nb * c.n_embd)?,
            gate: backend.alloc(nb * c.n_ff)?,
            up: backend.alloc(nb * c.n_ff)?,
            logits: backend.alloc(nb * c.n_vocab)?,
        };
        let kv = (0..c.n_layers)
            .map(|l| backend.kv_layer(spec, c.n_kv_heads, c.head_dim, n_ctx, l))
            .collect::<Result<Vec<_>>>()?;
        Ok(Session {
            backend,
            cfg: cfg.clone(),
            w,
            kv,
            n_batch: nb,
            n_ctx,
            s,
            host_logits: Vec::new(),
            prompt_len: 0,
            prompt_len_set: false,
        })
    }

    /// Sets the prompt length that budgets given as fractions refer to, for a prompt run in
    /// several forward calls (a shared few-shot prefix, then the rest). Without it, the first
    /// call after an empty cache is taken as the whole prompt. `truncate(0)` forgets it.
    pub fn set_prompt_len(&mut self, n_tokens: usize) {
        self.prompt_len = n_tokens;
        self.prompt_len_set = true;
    }

    /// A copy of the KV cache as it is now.
    pub fn snapshot(&self) -> Result<KvSnapshot<B>> {
        let kv = self.kv.iter().map(|l| self.backend.kv_clone(l)).collect::<Result<Vec<_>>>()?;
        Ok(KvSnapshot { kv, prompt_len: self.prompt_len, prompt_len_set: self.prompt_len_set })
    }

    /// Puts back a snapshot of this session's cache: the session continues exactly as it would
    /// have from the moment the snapshot was taken.
    pub fn restore(&mut self, snap: &KvSnapshot<B>) -> Result<()> {
        if snap.kv.len() != self.kv.len() {
            bail!("snapshot of {} layers restored into a session of {}", snap.kv.len(), self.kv.len());
        }
        for (l, s) in self.kv.iter_mut().zip(&snap.kv) {
            *l = self.backend.kv_clone(s)?;
        }
        self.prompt_len = snap.prompt_len;
        self.prompt_len_set = snap.prompt_len_set;
        Ok(())
    }

    /// Positions processed so far (the next token's position).
    pub fn n_past(&self) -> usize {
        self.kv.first().map_or(0, |l| self.backend.kv_len(l))
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Bytes the KV cache holds now, all layers, by component.
    pub fn kv_bytes(&self) -> KvBytes {
        let mut b = KvBytes::default();
        for l in &self.kv {
            b.add(&self.backend.kv_bytes(l));
        }
        b
    }

    /// Forgets every token from position `n` on.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        for l in &mut self.kv {
            self.backend.kv_truncate(l, n)?;
        }
        if n == 0 {
            self.prompt_len_set = false;
        }
        Ok(())
    }

    /// Runs `tokens` after what the cache holds and returns the requested logits rows
    /// (`[rows, n_vocab]`, row-major).
    pub fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<&[f32]> {
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        if self.n_past() + tokens.len() > self.n_ctx {
            bail!(
                "context full: {} cached + {} new tokens exceed the context of {} (raise --ctx)",
                self.n_past(),
                tokens.len(),
                self.n_ctx
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            bail!("token id {bad} is outside the vocabulary of {}", self.cfg.n_vocab);
        }
        let n_vocab = self.cfg.n_vocab;
        if self.n_past() == 0 && !self.prompt_len_set {
            self.prompt_len = tokens.len();
        }
        let from = match want {
            Logits::Last => tokens.len() - 1,
            Logits::From(i) => i.min(tokens.len()),
            Logits::None => tokens.len(),
        };
        self.host_logits.clear();
        let mut start = 0;
        while start < tokens.len() {
            let end = (start + self.n_batch).min(tokens.len());
            self.batch(&tokens[start..end])?;
            // Logit rows this batch contributes: tokens [max(from, start), end).
            let r0 = from.max(start);
            if r0 < end {
                let n = end - r0;
                let c = &self.cfg;
                let b = self.backend;
                b.copy_rows(&self.s.x, r0 - start, n, c.n_embd, &mut self.s.proj)?;
                b.rmsnorm(&self.s.proj, &self.w.output_norm, c.n_embd, c.norm_eps, n, &mut self.s.xn)?;
                b.matmul(&self.w.output, &self.s.xn, n, &mut self.s.logits)?;
                let old = self.host_logits.len();
                self.host_logits.resize(old + n * n_vocab, 0.0);
                b.download(&self.s.logits, &mut self.host_logits[old..])?;
            }
            start = end;
        }
        Ok(&self.host_logits)
    }

    fn batch(&mut self, tokens: &[u32]) -> Result<()> {
        let b = self.backend;
        let c = &self.cfg;
        let n = tokens.len();
        let pos0 = self.n_past();
        let (d, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let s = &mut self.s;
        b.embed(&self.w.token_embd, tokens, &mut s.x)?;
        let freq_factors = self.w.rope_freqs.as_deref().or(c.rope_freq_factors.as_deref());
        let rope_q = RopeParams {
            n_heads: c.n_heads,
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            freq_base: c.rope_base,
            style: c.rope_style,
            freq_factors,
        };
        let rope_k = RopeParams { n_heads: c.n_kv_heads, ..rope_q };
        for (l, kv) in self.w.layers.iter().zip(self.kv.iter_mut()) {
            b.rmsnorm(&s.x, &l.attn_norm, d, c.norm_eps, n, &mut s.xn)?;
            b.matmul(&l.wq, &s.xn, n, &mut s.q)?;
            b.matmul(&l.wk, &s.xn, n, &mut s.k)?;
            b.matmul(&l.wv, &s.xn, n, &mut s.v)?;
            if let Some(bias) = &l.bq {
                b.add_bias(&mut s.q, bias, qd, n)?;
            }
            if let Some(bias) = &l.bk {
                b.add_bias(&mut s.k, bias, kvd, n)?;
            }
            if let Some(bias) = &l.bv {
                b.add_bias(&mut s.v, bias, kvd, n)?;
            }
            b.rope(&mut s.q, n, pos0, &rope_q)?;
            b.rope(&mut s.k, n, pos0, &rope_k)?;
            b.kv_append(kv, &s.k, &s.v, n)?;
            b.attention(&s.q, kv, n, c.n_heads, c.head_dim, &mut s.att)?;
            b.kv_finish_step(kv, n, pos0, self.prompt_len)?;
            b.matmul(&l.wo, &s.att, n, &mut s.proj)?;
            b.add(&mut s.x, &s.proj, n * d)?;
            b.rmsnorm(&s.x, &l.ffn_norm, d, c.norm_eps, n, &mut s.xn)?;
            b.matmul(&l.w_gate, &s.xn, n, &mut s.gate)?;
            b.matmul(&l.w_up, &s.xn, n, &mut s.up)?;
            b.silu_mul(&mut s.gate, &s.up, n * ff)?;
            b.matmul(&l.w_down, &s.gate, n, &mut s.proj)?;
            b.add(&mut s.x, &s.proj, n * d)?;
        }
        Ok(())
    }
}
