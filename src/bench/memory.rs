//! `kvgear memory`: the bytes a model, its KV cache (by component) and its scratch buffers take
//! for a config, context length, batch size and strategy, from formulas alone; and the inverse
//! questions: the longest context and the largest batch that fit in a memory budget.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::kv::codec::KvBytes;
use crate::kv::strategy::{formula_bytes, formula_is_exact, StrategySpec};
use crate::model::config::Config;

#[derive(clap::Args, Clone, Debug)]
pub struct MemoryArgs {
    /// A named config (llama2-7b, llama3-8b, smollm2-135m, ...) or a GGUF file.
    #[arg(long, default_value = "llama2-7b")]
    pub config: String,
    /// Weights of a named config: a type or mix as `kvgear quantize --to` takes it (q4_0, q8_0, f16, q4_k_m, ...).
    #[arg(long, default_value = "q4_0")]
    pub weights: String,
    /// Context length (prompt tokens).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 0)]
    pub decode: usize,
    /// Sequences in the batch, each with its own cache.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt tokens per forward batch, as bench's and the session's `--batch` (0: the whole prompt
    /// in one batch). A compressed or evicting cache treats each batch as a step (see
    /// `kv::strategy`), which sets its block layout and its transient f16 bytes.
    #[arg(long, default_value_t = 64)]
    pub prompt_batch: usize,
    #[arg(long, default_value = "fp16")]
    pub strategy: String,
    #[arg(long = "kv")]
    pub kv: Vec<String>,
    /// A memory budget (`8GiB`, `24GiB`, `80GiB`, `512MiB`): also print the longest context at
    /// this batch and the largest batch at this context that fit.
    #[arg(long)]
    pub budget: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Also append the figures as a row to this CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

#[derive(Serialize, Clone, Debug)]
pub struct MemoryReport {
    pub config: String,
    pub weights: String,
    pub strategy: String,
    pub params: String,
    pub ctx: usize,
    pub decode: usize,
    pub batch: usize,
    pub prompt_batch: usize,
    pub weight_bytes: u64,
    /// Per stored type: (type, tensors, bytes), vectors included for a named config.
    pub weight_types: Vec<(String, usize, u64)>,
    pub kv: KvBytes,
    pub kv_bytes: u64,
    pub kv_bytes_fp16: u64,
    pub kv_exact: bool,
    /// KV bytes at the worst moment: the end state plus one layer's step held in f16 before
    /// its eviction and compression (a bound).
    pub kv_peak_bytes: u64,
    pub scratch_bytes: u64,
    pub total_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub max_ctx: Option<usize>,
    pub max_batch: Option<usize>,
}

/// Parses `8GiB`, `512MiB`, `1.5GB`, or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().with_context(|| format!("'{s}' is not a size like 8GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        u => bail!("unknown size unit '{u}' in '{s}' (B, KiB, MiB, GiB, KB, MB, GB)"),
    };
    if !(v >= 0.0 && v.is_finite()) {
        bail!("size '{s}' must be a non-negative number");
    }
    Ok((v * mult) as u64)
}

/// KV bytes of the whole model (all layers, all sequences).
fn kv_total(spec: &StrategySpec, cfg: &Config, ctx: usize, decode: usize, batch: usize, prompt_batch: usize) -> Result<KvBytes> {
    Ok(formula_bytes(spec, cfg.n_kv_heads, cfg.head_dim, ctx, decode, prompt_batch)?.times(cfg.n_layers * batch))
}

/// The memory a run takes on its backend, by part, computed before anything is allocated
/// (`Backend::check_memory` compares it with what the device has free).
#[derive(Serialize, Clone, Debug, Default)]
pub struct MemoryPlan {
    /// Weight matrices as stored (device padding included) plus f32 vectors.
    pub weight_bytes: u64,
    /// What the caches hold at the end of the context, by component (formulas).
    pub kv: KvBytes,
    /// What the caches reserve up front (the device allocates whole capacities).
    pub kv_reserved_bytes: u64,
    /// Activation buffers, attention partials and scores, eviction scratch.
    pub scratch_bytes: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.kv_reserved_bytes + self.scratch_bytes
    }
}

/// Streaming multiprocessors assumed when sizing the decode attention's split partials (more
/// than any current GPU has).
const MAX_MULTIPROCESSORS: u64 = 256;

/// The device memory plan of a session of `n_ctx` tokens in batches of `n_batch` under `spec`:
/// weights as uploaded (each matrix once, padded), every layer's reserved cache, activations,
/// attention scratch (partials; scores when the policy wants mass), eviction scratch and the
/// quantized activations of the integer GEMM.
pub fn device_plan(cfg: &Config, w: &crate::model::weights::Weights, spec: &StrategySpec, n_ctx: usize, n_batch: usize) -> Result<MemoryPlan> {
    use crate::backend::cuda::{backend::layer_reserved_bytes, DeviceWeight};
    let mats: u64 = w.matrices().iter().map(|t| DeviceWeight::padded_bytes(t.n_bytes()) as u64).sum();
    let vectors = (w.bytes() - w.matrices().iter().map(|t| t.n_bytes()).sum::<usize>()) as u64;
    let layer = layer_reserved_bytes(spec, cfg.n_kv_heads, cfg.head_dim, n_ctx)? as u64;
    let nb = n_batch.min(n_ctx).max(1) as u64;
    let rows = nb * cfg.n_heads as u64;
    let hd = cfg.head_dim as u64;
    let wants_mass = spec.policy == "h2o" || spec.policy == "sieve";
    let attention = 4 * (rows * (4 + hd) + MAX_MULTIPROCESSORS * 4 * (2 + hd) + if wants_mass { rows * n_ctx as u64 } else { 0 });
    let eviction = if spec.policy == "keep_all" { 0 } else { (cfg.n_kv_heads * n_ctx * cfg.head_dim * 2) as u64 };
    // A batch's activations quantized for the integer GEMM, at the widest matrix input.
    let q8 = 4 * crate::backend::cuda::quant::q8_scratch_words(cfg.n_embd.max(cfg.q_dim()).max(cfg.n_ff), nb as usize) as u64;
    Ok(MemoryPlan {
        weight_bytes: mats + vectors,
        kv: kv_total(spec, cfg, n_ctx, 0, 1, nb as usize)?,
        kv_reserved_bytes: layer * cfg.n_layers as u64,
        scratch_bytes: scratch_bytes(cfg, nb as usize, 1) + attention + eviction + q8,
    })
}

/// Scratch activations of one forward batch of `n_batch` tokens (the session's buffers).
fn scratch_bytes(cfg: &Config, n_batch: usize, batch: usize) -> u64 {
    let per_token = 3 * cfg.n_embd + 2 * cfg.q_dim() + 2 * cfg.kv_dim() + 2 * cfg.n_ff + cfg.n_vocab;
    (per_token * n_batch * 4 * batch) as u64
}

pub fn report(a: &MemoryArgs) -> Result<MemoryReport> {
    let spec = StrategySpec::parse(&a.strategy, &a.kv, 0)?;
    if a.ctx == 0 || a.batch == 0 {
        bail!("--ctx and --batch must be positive");
    }
    let (cfg, weight_bytes, weights, weight_types) = if std::path::Path::new(&a.config).is_file() {
        let m = crate::model::Model::load(&PathBuf::from(&a.config))?;
        let by_type = m.weights.bytes_by_type();
        let types: Vec<String> = by_type.keys().map(|s| s.to_string()).collect();
        let listed = by_type.into_iter().map(|(t, (n, b))| (t.to_string(), n, b as u64)).collect();
        (m.config.clone(), m.weights.bytes() as u64, types.join("+"), listed)
    } else {
        // The types `kvgear quantize --to WEIGHTS` gives each tensor of an f16 model of this
        // config (llama.cpp's choice: q6_k output for 4- and 5-bit types, the mixes' q6_k layers).
        let cfg = Config::named(&a.config)?;
        let scheme = crate::quantize::Scheme::parse(&a.weights)?;
        let tied = a.config == "smollm2-135m";
        let by_type = crate::quantize::plan_bytes_by_type(&cfg, tied, scheme)?;
        let total = by_type.values().map(|&(_, b)| b).sum();
        let listed = by_type.into_iter().map(|(t, (n, b))| (t.to_string(), n, b)).collect();
        (cfg.clone(), total, scheme.name().to_string(), listed)
    };
    let step = |ctx: usize| if a.prompt_batch == 0 { ctx } else { a.prompt_batch.min(ctx) };
    // One layer's step in f16 before its eviction and compression (nothing for the plain cache).
    let transient = |ctx: usize, batch: usize| -> u64 {
        if spec.is_plain() {
            0
        } else {
            (cfg.kv_bytes_per_token_fp16() / cfg.n_layers * step(ctx) * batch) as u64
        }
    };
    let kv = kv_total(&spec, &cfg, a.ctx, a.decode, a.batch, a.prompt_batch)?;
    let kv_peak = kv.total() as u64 + transient(a.ctx, a.batch);
    let kv_fp16 = (cfg.kv_bytes_per_token_fp16() * (a.ctx + a.decode) * a.batch) as u64;
    let scratch = scratch_bytes(&cfg, step(a.ctx), a.batch);
    let total = weight_bytes + kv_peak + scratch;
    let budget = a.budget.as_deref().map(parse_bytes).transpose()?;
    let fits = |ctx: usize, batch: usize| -> Result<bool> {
        let kv = kv_total(&spec, &cfg, ctx, a.decode, batch, a.prompt_batch)?.total() as u64 + transient(ctx, batch);
        Ok(weight_bytes + kv + scratch_bytes(&cfg, step(ctx), batch) <= budget.unwrap_or(0))
    };
    let (max_ctx, max_batch) = match budget {
        None => (None, None),
        Some(_) => {
            let largest = |f: &dyn Fn(usize) -> Result<bool>| -> Result<usize> {
                if !f(1)? {
                    return Ok(0);
                }
                let (mut lo, mut hi) = (1usize, 2usize);
                while hi < (1 << 30) && f(hi)? {
                    lo = hi;
                    hi *= 2;
                }
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if f(mid)? {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                Ok(lo)
            };
            (Some(largest(&|c| fits(c, a.batch))?), Some(largest(&|b| fits(a.ctx, b))?))
        }
    };
    Ok(MemoryReport {
        config: a.config.clone(),
        weights,
        strategy: spec.name.clone(),
        params: spec.params_string(),
        ctx: a.ctx,
        decode: a.decode,
        batch: a.batch,
        prompt_batch: step(a.ctx),
        weight_bytes,
        weight_types,
        kv_bytes: kv.total() as u64,
        kv,
        kv_bytes_fp16: kv_fp16,
        kv_exact: formula_is_exact(&spec, a.ctx, a.decode, a.prompt_batch),
        kv_peak_bytes: kv_peak,
        scratch_bytes: scratch,
        total_bytes: total,
        budget_bytes: budget,
        max_ctx,
        max_batch,
    })
}

/// A `MemoryReport` as one flat CSV row (the columns results/README.md documents).
#[derive(Serialize, Clone, Debug)]
pub struct MemoryRow {
    pub config: String,
    pub weights: String,
    pub strategy: String,
    pub params: String,
    pub ctx: usize,
    pub decode: usize,
    pub batch: usize,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub kv_codes: usize,
    pub kv_scales: usize,
    pub kv_lowrank: usize,
    pub kv_outliers: usize,
    pub kv_fp16: usize,
    pub kv_policy: usize,
    pub kv_bytes_fp16: u64,
    pub compression: f64,
    pub kv_exact: bool,
    pub scratch_bytes: u64,
    pub total_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub max_ctx: Option<usize>,
    pub max_batch: Option<usize>,
}

impl From<MemoryReport> for MemoryRow {
    fn from(r: MemoryReport) -> MemoryRow {
        MemoryRow {
            config: r.config,
            weights: r.weights,
            strategy: r.strategy,
            params: r.params,
            ctx: r.ctx,
            decode: r.decode,
            batch: r.batch,
            weight_bytes: r.weight_bytes,
            kv_bytes: r.kv_bytes,
            kv_codes: r.kv.codes,
            kv_scales: r.kv.scales,
            kv_lowrank: r.kv.lowrank,
            kv_outliers: r.kv.outliers,
            kv_fp16: r.kv.fp16,
            kv_policy: r.kv.policy,
            kv_bytes_fp16: r.kv_bytes_fp16,
            compression: r.kv_bytes_fp16 as f64 / r.kv_bytes.max(1) as f64,
            kv_exact: r.kv_exact,
            scratch_bytes: r.scratch_bytes,
            total_bytes: r.total_bytes,
            budget_bytes: r.budget_bytes,
            max_ctx: r.max_ctx,
            max_batch: r.max_batch,
        }
    }
}

pub fn run(a: &MemoryArgs) -> Result<()> {
    let r = report(a)?;
    if let Some(csv) = &a.csv {
        super::csvlog::append(csv, &MemoryRow::from(r.clone()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!("model      {} with {} weights: {:.3} GiB ({} bytes)", r.config, r.weights, gib(r.weight_bytes), r.weight_bytes);
    for (ty, n, b) in &r.weight_types {
        println!("  {ty:<6} {n:>4} tensors {b:>14} bytes ({:.3} GiB)", gib(*b));
    }
    println!("workload   {} prompt + {} decoded tokens, batch {}", r.ctx, r.decode, r.batch);
    println!(
        "KV cache   {} {}: {:.3} GiB{} (fp16 {:.3} GiB, {:.2}x)",
        r.strategy,
        r.params,
        gib(r.kv_bytes),
        if r.kv_exact { "" } else { " (estimate: eviction inside compressed blocks)" },
        gib(r.kv_bytes_fp16),
        r.kv_bytes_fp16 as f64 / r.kv_bytes.max(1) as f64
    );
    println!(
        "  by part  codes {:.1}, scales {:.1}, low-rank {:.1}, outliers {:.1}, fp16 {:.1}, policy {:.1} MiB",
        mib(r.kv.codes),
        mib(r.kv.scales),
        mib(r.kv.lowrank),
        mib(r.kv.outliers),
        mib(r.kv.fp16),
        mib(r.kv.policy)
    );
    println!("KV peak    {:.3} GiB (with one layer's step in f16 before compression and eviction)", gib(r.kv_peak_bytes));
    println!("scratch    {:.3} GiB (one {}-token batch of activations)", gib(r.scratch_bytes), r.prompt_batch);
    println!("total      {:.3} GiB", gib(r.total_bytes));
    if let (Some(b), Some(c), Some(n)) = (r.budget_bytes, r.max_ctx, r.max_batch) {
        println!("in {:.2} GiB: longest context {c} at batch {}; largest batch {n} at context {}", gib(b), r.batch, r.ctx);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("8 parsecs").is_err());
        assert!(parse_bytes("-1GiB").is_err());
    }
}
