//! KV strategies: one eviction policy composed with one codec, named as users name them.
//!
//! | strategy | codec | policy |
//! | --- | --- | --- |
//! | fp16 | fp16 (the plain cache) | keep all |
//! | uniform, group, gear | that codec | keep all |
//! | h2o, sieve, window | fp16 | that policy |
//! | gear-h2o, gear-sieve | gear | h2o, sieve |
//!
//! GEAR+H2O is H2O deciding which tokens survive and GEAR storing them: the policy returns the
//! indices to evict after each step and the codec drops those tokens' codes, scales, low-rank rows
//! and outliers (see `codec::blocked`), leaving the survivors' decoded values unchanged.
//!
//! A step (one forward batch: a batch of prompt tokens, or one decoded token) runs: append the
//! step's K and V, held in full precision; attention, where the step's queries see the cache and
//! their own step's tokens exactly; then `finish_step`: the policy sees the step's attention
//! mass and evicts, and the codec compresses what is due. A prompt run as one batch (`--batch`
//! at least its length) is therefore handled as in the GEAR, KIVI and H2O reference code, which
//! run the prompt in one pass: its attention is exact, H2O ranks its tokens by their mass over the
//! whole prompt, and its survivors are compressed as one block, with at most one layer's prompt
//! held in f16 at any time. A prompt run in smaller batches streams: each batch is attended
//! exactly, then evicted from and compressed, so only one batch per layer is ever held in f16.

use anyhow::{bail, Context, Result};

use crate::backend::cpu::pool;
use crate::kv::codec::blocked::{avx2, axpy_lanes, dot_lanes};
use crate::kv::codec::{make_codec, Backbone, Codec, CodecParams, KvBytes};
use crate::kv::policy::{make_policy, Policy, PolicyParams};

/// The strategies `--strategy` accepts.
pub const STRATEGIES: [&str; 10] =
    ["fp16", "uniform", "group", "gear", "h2o", "sieve", "window", "gear-h2o", "gear-sieve", "group-h2o"];

/// Budget of the evicting strategies when `--kv budget=` is not given: half the prompt.
pub const DEFAULT_BUDGET: f64 = 0.5;

/// Every `--kv` parameter name.
pub const PARAMS: [&str; 13] =
    ["bits", "group", "residual", "rank", "rank_decode", "iters", "outliers", "buffer", "backbone", "budget", "recent", "sinks", "threshold"];

/// Whether strategy `name` takes the `--kv` parameter `key` (through its codec or its policy).
/// `group` is a GEAR parameter with the group backbone (its default) only.
pub fn takes(name: &str, key: &str) -> Result<bool> {
    if !PARAMS.contains(&key) {
        bail!("unknown --kv parameter '{key}' ({})", PARAMS.join(", "));
    }
    let spec = StrategySpec::parse(name, &[], 0)?;
    let codec: &[&str] = match spec.codec.as_str() {
        "uniform" => &["bits", "buffer"],
        "group" => &["bits", "group", "residual"],
        "gear" => &["bits", "backbone", "group", "rank", "rank_decode", "iters", "outliers", "buffer"],
        _ => &[],
    };
    let policy: &[&str] = match spec.policy.as_str() {
        "window" => &["budget", "sinks"],
        "h2o" => &["budget", "recent", "sinks"],
        "sieve" => &["budget", "threshold", "sinks"],
        _ => &[],
    };
    Ok(codec.contains(&key) || policy.contains(&key))
}

/// A strategy with its parameters, as `--strategy NAME --kv key=value ...` gives it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StrategySpec {
    pub name: String,
    pub codec: String,
    pub policy: String,
    pub codec_params: CodecParams,
    pub policy_params: PolicyParams,
    /// `key=value` pairs as given, in order (for reports and CSV rows).
    pub given: Vec<(String, String)>,
    pub seed: u64,
}

impl StrategySpec {
    pub fn fp16() -> StrategySpec {
        StrategySpec { name: "fp16".into(), codec: "fp16".into(), policy: "keep_all".into(), ..Default::default() }
    }

    /// Parses a strategy name and its `key=value` parameters.
    pub fn parse(name: &str, kv: &[String], seed: u64) -> Result<StrategySpec> {
        let (codec, policy) = match name {
            "fp16" => ("fp16", "keep_all"),
            "uniform" | "group" | "gear" => (name, "keep_all"),
            "h2o" | "sieve" | "window" => ("fp16", name),
            "gear-h2o" => ("gear", "h2o"),
            "gear-sieve" => ("gear", "sieve"),
            "group-h2o" => ("group", "h2o"),
            _ => bail!("unknown strategy '{name}' (known: {})", STRATEGIES.join(", ")),
        };
        let mut s = StrategySpec { name: name.into(), codec: codec.into(), policy: policy.into(), seed, ..Default::default() };
        for item in kv {
            for pair in item.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').with_context(|| format!("--kv expects key=value, got '{pair}'"))?;
                let (k, v) = (k.trim(), v.trim());
                let num = || v.parse::<f64>().with_context(|| format!("--kv {k}: '{v}' is not a number"));
                let int = || v.parse::<usize>().with_context(|| format!("--kv {k}: '{v}' is not a whole number"));
                match k {
                    "bits" => s.codec_params.bits = Some(int()? as u32),
                    "group" => s.codec_params.group = Some(int()?),
                    "residual" => s.codec_params.residual = Some(int()?),
                    "rank" => s.codec_params.rank = Some(int()?),
                    "rank_decode" => s.codec_params.rank_decode = Some(int()?),
                    "iters" => s.codec_params.iters = Some(int()?),
                    "outliers" => s.codec_params.outliers = Some(num()?),
                    "buffer" => s.codec_params.buffer = Some(int()?),
                    "backbone" => s.codec_params.backbone = Some(v.parse::<Backbone>()?),
                    "budget" => s.policy_params.budget = Some(num()?),
                    "recent" => s.policy_params.recent = Some(num()?),
                    "sinks" => s.policy_params.sinks = Some(int()?),
                    "threshold" => s.policy_params.threshold = Some(num()?),
                    _ => bail!(
                        "unknown --kv parameter '{k}' (bits, group, residual, rank, rank_decode, iters, outliers, buffer, backbone, budget, recent, sinks, threshold)"
                    ),
                }
                s.given.push((k.to_string(), v.to_string()));
            }
        }
        // An evicting strategy without a budget keeps half the prompt (recorded like a given
        // parameter, so reports show it).
        if s.policy != "keep_all" && s.policy_params.budget.is_none() {
            s.policy_params.budget = Some(DEFAULT_BUDGET);
            s.given.push(("budget".into(), DEFAULT_BUDGET.to_string()));
        }
        // Build once to validate every parameter against the codec and policy before any run.
        make_codec(&s.codec, &s.codec_params, 1, 64, seed)?;
        if s.policy != "keep_all" {
            make_policy(&s.policy, &s.policy_params, 1)?;
        } else if s.policy_params != PolicyParams::default() {
            bail!("strategy {name} evicts nothing: budget, recent, sinks and threshold do not apply");
        }
        Ok(s)
    }

    /// Whether this is the plain fp16 cache (no compression, no eviction).
    pub fn is_plain(&self) -> bool {
        self.codec == "fp16" && self.policy == "keep_all"
    }

    /// The parameters as `key=value;...` for CSV rows.
    pub fn params_string(&self) -> String {
        self.given.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
    }
}

/// One layer's cache under a strategy: the codec holding the survivors and the policy choosing
/// them. Each KV head keeps its own token list.
pub struct StrategyLayer {
    pub codec: Box<dyn Codec>,
    pub policy: Box<dyn Policy>,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Attention mass of the current step per head, `[head][token]`, filled by attention.
    pub mass: Vec<Vec<f32>>,
    /// Prompt length once known (budgets given as fractions are fractions of it).
    pub prompt_len: usize,
    /// Tokens appended so far (the next token's position).
    pub n_seen: usize,
    capacity: usize,
    spec: StrategySpec,
    layer: usize,
}

impl Clone for StrategyLayer {
    fn clone(&self) -> StrategyLayer {
        StrategyLayer {
            codec: self.codec.clone_box(),
            policy: self.policy.clone_box(),
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            mass: self.mass.clone(),
            prompt_len: self.prompt_len,
            n_seen: self.n_seen,
            capacity: self.capacity,
            spec: self.spec.clone(),
            layer: self.layer,
        }
    }
}

impl StrategyLayer {
    pub fn new(spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, capacity: usize, layer: usize) -> Result<Self> {
        let seed = spec.seed ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(StrategyLayer {
            codec: make_codec(&spec.codec, &spec.codec_params, n_kv_heads, head_dim, seed)?,
            policy: make_policy(&spec.policy, &spec.policy_params, n_kv_heads)?,
            n_kv_heads,
            head_dim,
            mass: vec![Vec::new(); n_kv_heads],
            prompt_len: 0,
            n_seen: 0,
            capacity,
            spec: spec.clone(),
            layer,
        })
    }

    /// Empties the layer (a fresh codec and policy with the same parameters and seed).
    pub fn reset(&mut self) -> Result<()> {
        *self = StrategyLayer::new(&self.spec.clone(), self.n_kv_heads, self.head_dim, self.capacity, self.layer)?;
        Ok(())
    }

    /// Appends `n_tokens` rows of K and V (`[n_tokens, n_kv_heads, head_dim]`).
    pub fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        if self.n_seen + n_tokens > self.capacity {
            bail!("context full: {} tokens seen and {} more exceed the context of {} (raise --ctx)", self.n_seen, n_tokens, self.capacity);
        }
        self.codec.append(k, v, n_tokens)?;
        if self.policy.wants_mass() {
            for (g, m) in self.mass.iter_mut().enumerate() {
                m.clear();
                m.resize(self.codec.len(g), 0.0);
            }
        }
        Ok(())
    }

    /// Tells the policy about the step just run (`n_new` tokens from position `pos0`), evicts
    /// what it says and compresses what is due (a block made by a step of the prompt, or of
    /// several tokens, is a prompt block for GEAR's rank).
    pub fn finish_step(&mut self, n_new: usize, pos0: usize) -> Result<()> {
        let mass = self.policy.wants_mass().then_some(&self.mass[..]);
        self.policy.observe(n_new, pos0, mass, self.prompt_len)?;
        self.n_seen = pos0 + n_new;
        for (g, idx) in self.policy.evictions().into_iter().enumerate() {
            if !idx.is_empty() {
                self.codec.evict(g, &idx)?;
            }
        }
        self.codec.compress_due(pos0 < self.prompt_len || n_new > 1)
    }

    /// Bytes held by component, the policy's state included.
    pub fn bytes(&self) -> KvBytes {
        let mut b = self.codec.bytes();
        b.policy += self.policy.bytes();
        b
    }

    /// Causal attention of `n_tokens` queries over the codec; the softmax weights each token
    /// received are added to `self.mass` when the policy wants them. `q`, `out`: `[n_tokens,
    /// n_heads, head_dim]`; the last `n_tokens` tokens of every head are the queries' own.
    ///
    /// Work is split into tasks of one KV head (with the query heads that share it), one chunk
    /// of queries and one segment of `SEGMENT_ROWS` held tokens, run in parallel, so that even
    /// one decoded token over a few KV heads keeps every thread busy. A task with few queries (a
    /// decoded token's query heads of one KV head) takes its scores and then its weighted values
    /// straight from the stored form (`Codec::scores_direct`, `Codec::weighted_direct`); a task
    /// of a prompt batch, or over a codec without those paths, decodes its segment's keys and
    /// then its values in tiles of `TILE_ROWS` rows (`Codec::decode_rows`), each decoded row
    /// serving every query of the task (the query heads of a GQA group, the chunk's positions).
    /// Between the two the softmax runs over each query's whole row of scores, segment after
    /// segment; afterwards the segments' partial outputs and masses are summed in task order.
    /// Tasks are cut by fixed sizes, so the result does not depend on the number of threads.
    pub fn attention(&mut self, q: &[f32], n_tokens: usize, n_heads: usize, out: &mut [f32]) {
        let (hd, n_kv) = (self.head_dim, self.n_kv_heads);
        let group = n_heads / n_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let want = self.policy.wants_mass();
        let n_chunks = n_tokens.div_ceil(QUERY_CHUNK);
        let codec = &*self.codec;
        let n_seg = (0..n_kv).map(|g| codec.len(g).div_ceil(SEGMENT_ROWS)).max().unwrap_or(0).max(1);
        let n_tasks = n_kv * n_chunks * n_seg;
        // One scratch for every layer (taken from the calling thread, put back at the end): a
        // prompt batch's scores are large, and a layer's own would be held by every layer.
        let mut work = ATTN_WORK.with(|c| std::mem::take(&mut *c.borrow_mut()));
        work.resize_with(n_tasks, AttnWork::default);
        // Task `(g, c, s)`: its queries (the `i`-th is position `t0 + i / group`, query head
        // `g * group + i % group`), the tokens the last of them sees, and its segment of those.
        let layout = |task: usize| {
            let (g, c, s) = (task / (n_chunks * n_seg), task / n_seg % n_chunks, task % n_seg);
            let t0 = c * QUERY_CHUNK;
            let t1 = (t0 + QUERY_CHUNK).min(n_tokens);
            let n_len = codec.len(g);
            let n_max = n_len + t1 - n_tokens;
            let rows = (s * SEGMENT_ROWS).min(n_max)..((s + 1) * SEGMENT_ROWS).min(n_max);
            (g, t0, t1, n_len, rows)
        };
        pool::for_each_mut(&mut work[..n_tasks], |task, w| {
            let (g, t0, t1, _, rows) = layout(task);
            let n_q = (t1 - t0) * group;
            w.q.clear();
            for t in t0..t1 {
                w.q.extend_from_slice(&q[(t * n_heads + g * group) * hd..][..group * hd]);
            }
            let n_r = rows.len();
            w.scores.clear();
            w.scores.resize(n_q * n_r, 0.0);
            // Decoding's few queries per KV head: scores straight from the stored form where the
            // codec can; otherwise (and for a prompt batch's many queries) decode tiles of rows
            // once for all the queries.
            if codec.scores_direct(g, &w.q, rows.clone(), &mut w.scores, n_r) {
                return;
            }
            TILE.with_borrow_mut(|tile| {
                tile.resize(TILE_ROWS * hd, 0.0);
                for t in rows.clone().step_by(TILE_ROWS) {
                    let n = TILE_ROWS.min(rows.end - t);
                    codec.decode_rows(g, false, t..t + n, &mut tile[..n * hd]);
                    scores_tile(&w.q, &tile[..n * hd], hd, &mut w.scores, n_r, t - rows.start);
                }
            });
        });
        // Softmax of each query over its segments, in token order.
        pool::for_each_chunk_mut(&mut work[..n_tasks], n_seg, |gc, segs| {
            let (_, t0, t1, n_len, _) = layout(gc * n_seg);
            let n_q = (t1 - t0) * group;
            for i in 0..n_q {
                let n_vis = n_len - n_tokens + t0 + i / group + 1;
                for x in hidden_rows(segs, i, n_q, n_vis) {
                    x.fill(0.0);
                }
                let mut max = f32::NEG_INFINITY;
                for vis in visible_rows(segs, i, n_q, n_vis) {
                    for x in vis {
                        *x *= scale;
                        max = max.max(*x);
                    }
                }
                let mut total = 0.0f64;
                for vis in visible_rows(segs, i, n_q, n_vis) {
                    for x in vis {
                        *x = (*x - max).exp();
                        total += *x as f64;
                    }
                }
                let inv = (1.0 / total) as f32;
                for vis in visible_rows(segs, i, n_q, n_vis) {
                    for x in vis {
                        *x *= inv;
                    }
                }
            }
        });
        pool::for_each_mut(&mut work[..n_tasks], |task, w| {
            let (g, t0, t1, n_len, rows) = layout(task);
            let n_q = (t1 - t0) * group;
            let (r0, n_r) = (rows.start, rows.len());
            w.out.clear();
            w.out.resize(n_q * hd, 0.0);
            if !codec.weighted_direct(g, &w.scores, n_r, rows.clone(), &mut w.out) {
                TILE.with_borrow_mut(|tile| {
                    tile.resize(TILE_ROWS * hd, 0.0);
                    for t in rows.clone().step_by(TILE_ROWS) {
                        let n = TILE_ROWS.min(rows.end - t);
                        codec.decode_rows(g, true, t..t + n, &mut tile[..n * hd]);
                        weighted_tile(&w.scores, n_r, t - r0, &tile[..n * hd], hd, &mut w.out);
                    }
                });
            }
            w.mass.clear();
            if want {
                // The queries' own tokens (past `n_len`) are not held yet: no mass for them.
                w.mass.resize(n_r.min(n_len.saturating_sub(r0)), 0.0);
                for p in w.scores.chunks_exact(n_r.max(1)).take(n_q) {
                    for (m, &x) in w.mass.iter_mut().zip(p) {
                        *m += x;
                    }
                }
            }
        });
        for (task, w) in work[..n_tasks].iter().enumerate() {
            let (g, t0, _, _, rows) = layout(task);
            let first = task % n_seg == 0;
            for (i, part) in w.out.chunks_exact(group * hd).enumerate() {
                let dst = &mut out[((t0 + i) * n_heads + g * group) * hd..][..group * hd];
                if first {
                    dst.copy_from_slice(part);
                } else {
                    for (d, &x) in dst.iter_mut().zip(part) {
                        *d += x;
                    }
                }
            }
            if let Some(mass) = self.mass[g].get_mut(rows.start..).filter(|_| want) {
                for (m, &x) in mass.iter_mut().zip(&w.mass) {
                    *m += x;
                }
            }
        }
        ATTN_WORK.with(|c| *c.borrow_mut() = work);
    }
}

/// Tokens decoded at a time into a task's tile.
const TILE_ROWS: usize = 32;

/// `sc[i * n_r + at + j] = q_i . x_j` for the queries `qs` (`[n_q, hd]`) and the rows `x_j` of
/// a tile (`[n, hd]`).
fn scores_tile(qs: &[f32], tile: &[f32], hd: usize, sc: &mut [f32], n_r: usize, at: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { scores_tile_avx2(qs, tile, hd, sc, n_r, at) };
    }
    scores_tile_body(qs, tile, hd, sc, n_r, at)
}

/// `scores_tile` with its dot products inlined 8 lanes wide (the same operations in the same
/// order as `blocked::dot`: the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scores_tile_avx2(qs: &[f32], tile: &[f32], hd: usize, sc: &mut [f32], n_r: usize, at: usize) {
    scores_tile_body(qs, tile, hd, sc, n_r, at)
}

#[inline(always)]
fn scores_tile_body(qs: &[f32], tile: &[f32], hd: usize, sc: &mut [f32], n_r: usize, at: usize) {
    for (i, qi) in qs.chunks_exact(hd).enumerate() {
        for (s, x) in sc[i * n_r + at..].iter_mut().zip(tile.chunks_exact(hd)) {
            *s = dot_lanes(qi, x);
        }
    }
}

/// `out_i += sum_j p[i * n_r + at + j] x_j` for each query `i` (`out`: `[n_q, hd]`) over the rows
/// of a tile (`[n, hd]`), row after row.
fn weighted_tile(p: &[f32], n_r: usize, at: usize, tile: &[f32], hd: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { weighted_tile_avx2(p, n_r, at, tile, hd, out) };
    }
    weighted_tile_body(p, n_r, at, tile, hd, out)
}

/// `weighted_tile` with its multiply-adds inlined 8 lanes wide (the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_tile_avx2(p: &[f32], n_r: usize, at: usize, tile: &[f32], hd: usize, out: &mut [f32]) {
    weighted_tile_body(p, n_r, at, tile, hd, out)
}

#[inline(always)]
fn weighted_tile_body(p: &[f32], n_r: usize, at: usize, tile: &[f32], hd: usize, out: &mut [f32]) {
    for (j, x) in tile.chunks_exact(hd).enumerate() {
        for (i, oi) in out.chunks_exact_mut(hd).enumerate() {
            let pj = p[i * n_r + at + j];
            if pj != 0.0 {
                axpy_lanes(oi, pj, x);
            }
        }
    }
}

/// Query `i`'s scores in each segment's scratch (`n_q` queries by the segment's rows), cut to
/// the first `n_vis` tokens of the head.
fn visible_rows(segs: &mut [AttnWork], i: usize, n_q: usize, n_vis: usize) -> impl Iterator<Item = &mut [f32]> {
    segment_rows(segs, i, n_q).map(move |(j0, x)| {
        let n = n_vis.saturating_sub(j0).min(x.len());
        &mut x[..n]
    })
}

/// Query `i`'s scores past the first `n_vis` tokens (the tokens after its own position).
fn hidden_rows(segs: &mut [AttnWork], i: usize, n_q: usize, n_vis: usize) -> impl Iterator<Item = &mut [f32]> {
    segment_rows(segs, i, n_q).map(move |(j0, x)| {
        let n = n_vis.saturating_sub(j0).min(x.len());
        &mut x[n..]
    })
}

/// Each segment's first token and query `i`'s scores there.
fn segment_rows(segs: &mut [AttnWork], i: usize, n_q: usize) -> impl Iterator<Item = (usize, &mut [f32])> {
    segs.iter_mut().scan(0usize, move |j0, w| {
        let n_r = w.scores.len() / n_q;
        let at = *j0;
        *j0 += n_r;
        Some((at, &mut w.scores[i * n_r..(i + 1) * n_r]))
    })
}

/// Queries per attention task: small enough to spread a prompt batch over the threads, large
/// enough that a task outweighs its scheduling.
const QUERY_CHUNK: usize = 16;

/// Held tokens per attention task: a decoding step over a few KV heads and a long context still
/// makes several tasks per thread.
const SEGMENT_ROWS: usize = 256;

/// One attention task's scratch (KV head x query chunk x segment of held tokens): its queries,
/// scores, partial outputs and mass. Kept between calls so decoding allocates nothing.
#[derive(Default)]
struct AttnWork {
    q: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
    mass: Vec<f32>,
}

thread_local! {
    /// The attention tasks' scratch, shared by every layer called from this thread.
    static ATTN_WORK: std::cell::RefCell<Vec<AttnWork>> = const { std::cell::RefCell::new(Vec::new()) };
    /// `TILE_ROWS` decoded keys or values, per thread.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes one layer's cache holds under `spec` after a prompt of `n_prompt` tokens, run in
/// forward batches of `n_batch` tokens (`0`: one batch), and `n_decode` decoded ones, by the
/// codecs' and policies' formulas, without running anything. Exact (equal to `bytes()`, see
/// [`formula_is_exact`]) for every codec without eviction, for the evicting policies over fp16
/// storage, and for eviction over a compressed codec after a prompt run as one batch. When a
/// compressed codec evicts after its blocks are made (decoding, or a prompt in several
/// batches), what the survivors hold depends on which rows the policy picked, which depends on
/// the attention: the figure is then an estimate (`evicting_estimate`).
pub fn formula_bytes(spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, n_prompt: usize, n_decode: usize, n_batch: usize) -> Result<KvBytes> {
    use crate::kv::codec::{Fp16Codec, GearConfig, GroupConfig, UniformConfig};
    use crate::kv::policy::Budget;
    let n_total = n_prompt + n_decode;
    let held = if spec.policy == "keep_all" {
        n_total
    } else {
        let budget = spec.policy_params.budget.context("an evicting strategy needs a budget")?;
        let sinks = spec.policy_params.sinks_or_default(&spec.policy);
        Budget::from_f64(budget)?.resolve(n_prompt, sinks)?.min(n_total)
    };
    let c = &spec.codec_params;
    let mut b = if spec.policy == "keep_all" || spec.codec == "fp16" {
        match spec.codec.as_str() {
            "fp16" => Fp16Codec::formula_bytes(n_kv_heads, head_dim, held),
            "uniform" => UniformConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, held),
            "group" => GroupConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, held),
            "gear" => GearConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, n_prompt, n_decode, n_batch),
            other => bail!("unknown codec {other}"),
        }
    } else {
        // Uniform quantization's scales are all per token: none shared.
        let (nb, shared_scales, block): (usize, usize, Box<dyn Fn(usize, bool) -> KvBytes>) = match spec.codec.as_str() {
            "uniform" => {
                let u = UniformConfig::from_params(c)?;
                (u.buffer, 0, Box::new(move |m, _| u.formula_bytes_split(1, head_dim, m, 0)))
            }
            "group" => {
                let g = GroupConfig::from_params(c)?;
                (g.residual, g.shared_scale_bytes_per_row(head_dim), Box::new(move |m, _| g.block_bytes(head_dim, m)))
            }
            "gear" => {
                let g = GearConfig::from_params(c)?;
                let shared = g.shared_scale_bytes_per_row(head_dim);
                (g.buffer, shared, Box::new(move |m, prompt| g.block_bytes(head_dim, m, if prompt { g.rank } else { g.rank_decode })))
            }
            other => bail!("unknown codec {other}"),
        };
        // H2O never evicts its recent window; the youngest tokens older than it have had the
        // least time to gather attention, so the estimate takes them first.
        let p = &spec.policy_params;
        let recent = (spec.policy == "h2o").then(|| crate::kv::policy::recent_tokens(p.recent_or_default(), p.sinks_or_default("h2o"), held));
        let per_head = evicting_estimate(&*block, nb, shared_scales, recent, head_dim, n_prompt, n_batch, n_decode, held);
        let mut all = KvBytes::default();
        for _ in 0..n_kv_heads {
            all.add(&per_head);
        }
        all
    };
    b.policy = match spec.policy.as_str() {
        "h2o" => n_kv_heads * held * 4,
        "sieve" => n_kv_heads * 8 * held.div_ceil(64),
        _ => 0,
    };
    Ok(b)
}

/// One head's bytes when a policy evicts over compressed storage. The run is simulated step by
/// step: the prompt in batches of `n_batch` (`0`: one batch), then `n_decode` one-token steps.
/// Each step's tokens join the f16 buffer; the policy evicts down to `held`. With H2O's recent
/// window (`recent` tokens), the youngest rows older than the window go first: the buffer's,
/// then those of blocks made while decoding. Then rows of compressed blocks while there are any
/// (the prompt's first), then buffer rows. Then the buffer's whole multiples of `nb` become a
/// block. A block's shared parts stay as long as one of their rows does: its low-rank `B`, and
/// each row group's per-channel key scales (`shared_scales` bytes per row). H2O keeps heavy
/// hitters from across the context, so every block made is counted with all its shared parts.
/// An evicted row frees its codes, its per-token scales, its row of `A`, and its share of the
/// block's outliers (a row holds as many as its values made it). Exact while nothing has been
/// evicted from a block (a prompt in one batch, before decoding); otherwise the bytes depend on
/// which rows attention keeps, and the figure is an estimate (`results/memory-llama2-7b.md`
/// gives its measured error).
#[allow(clippy::too_many_arguments)]
fn evicting_estimate(
    block: &dyn Fn(usize, bool) -> KvBytes,
    nb: usize,
    shared_scales: usize,
    recent: Option<usize>,
    head_dim: usize,
    n_prompt: usize,
    n_batch: usize,
    n_decode: usize,
    held: usize,
) -> KvBytes {
    let chunk = if n_batch == 0 { n_prompt.max(1) } else { n_batch };
    let steps = std::iter::repeat_n((chunk, true), n_prompt / chunk)
        .chain((n_prompt % chunk > 0).then_some((n_prompt % chunk, true)))
        .chain(std::iter::repeat_n((1, false), n_decode));
    let mut out = KvBytes::default();
    let (mut n_buf, mut n_held) = (0usize, 0usize);
    // Rows held in blocks made by prompt steps and by decoding, and rows evicted from each.
    let (mut rows, mut gone) = ([0usize; 2], [0usize; 2]);
    for (n, prompt) in steps {
        n_buf += n;
        n_held += n;
        if n_held > held {
            let mut e = n_held - held;
            if let Some(r) = recent {
                let old = e.min(n_buf.saturating_sub(r));
                n_buf -= old;
                e -= old;
                // Then decoded rows in blocks that have left the recent window.
                let take = e.min(rows[1].saturating_sub(r.saturating_sub(n_buf)));
                rows[1] -= take;
                gone[1] += take;
                e -= take;
            }
            for kind in 0..2 {
                let take = e.min(rows[kind]);
                rows[kind] -= take;
                gone[kind] += take;
                e -= take;
            }
            n_buf -= e;
            n_held = held;
        }
        if n_buf >= nb {
            let m = n_buf / nb * nb;
            out.add(&block(m, prompt));
            rows[usize::from(!prompt)] += m;
            n_buf -= m;
        }
    }
    for (kind, &g) in gone.iter().enumerate() {
        if g > 0 {
            // What one more row adds to a block of this kind, shared parts excluded.
            let (big, small) = (block(2 * nb, kind == 0), block(nb, kind == 0));
            let per = |x: usize, y: usize| (x - y) / nb;
            out.codes -= (per(big.codes, small.codes) * g).min(out.codes);
            out.scales -= ((per(big.scales, small.scales) - shared_scales) * g).min(out.scales);
            out.lowrank -= (per(big.lowrank, small.lowrank) * g).min(out.lowrank);
            out.outliers -= (per(big.outliers, small.outliers) * g).min(out.outliers);
        }
    }
    out.fp16 += 2 * n_buf * head_dim * 2;
    out
}

/// Whether `formula_bytes` is exact for this strategy and run: always without eviction or
/// over fp16 storage; for eviction over a compressed codec, only while nothing has been evicted
/// from a compressed block (a prompt run as one batch, nothing decoded yet).
pub fn formula_is_exact(spec: &StrategySpec, n_prompt: usize, n_decode: usize, n_batch: usize) -> bool {
    spec.policy == "keep_all" || spec.codec == "fp16" || (n_decode == 0 && (n_batch == 0 || n_batch >= n_prompt))
}
