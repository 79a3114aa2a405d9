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
//! and outliers (see `codec::gear`), leaving the survivors' decoded values unchanged.

use anyhow::{bail, Context, Result};

use crate::kv::codec::{make_codec, Backbone, Codec, CodecParams, KvBytes};
use crate::kv::policy::{make_policy, Policy, PolicyParams};

/// The strategies `--strategy` accepts.
pub const STRATEGIES: [&str; 10] =
    ["fp16", "uniform", "group", "gear", "h2o", "sieve", "window", "gear-h2o", "gear-sieve", "group-h2o"];

/// Budget of the evicting strategies when `--kv budget=` is not given: half the prompt.
pub const DEFAULT_BUDGET: f64 = 0.5;

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

    /// Tells the policy about the step just run (`n_new` tokens from position `pos0`) and
    /// evicts what it says.
    pub fn finish_step(&mut self, n_new: usize, pos0: usize) -> Result<()> {
        let mass = self.policy.wants_mass().then_some(&self.mass[..]);
        self.policy.observe(n_new, pos0, mass, self.prompt_len)?;
        for (g, idx) in self.policy.evictions().into_iter().enumerate() {
            if !idx.is_empty() {
                self.codec.evict(g, &idx)?;
            }
        }
        self.n_seen = pos0 + n_new;
        Ok(())
    }

    /// Bytes held by component, the policy's state included.
    pub fn bytes(&self) -> KvBytes {
        let mut b = self.codec.bytes();
        b.policy += self.policy.bytes();
        b
    }

    /// Causal attention of `n_tokens` queries over the codec, block by block through
    /// `Codec::scores` and `Codec::weighted_values`; the softmax weights each token received are
    /// added to `self.mass` when the policy wants them. `q`, `out`: `[n_tokens, n_heads,
    /// head_dim]`; the last `n_tokens` tokens of every head are the queries' own.
    pub fn attention(&mut self, q: &[f32], n_tokens: usize, n_heads: usize, out: &mut [f32], scores: &mut Vec<f32>) {
        let hd = self.head_dim;
        let group = n_heads / self.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let want = self.policy.wants_mass();
        for t in 0..n_tokens {
            for h in 0..n_heads {
                let g = h / group;
                let n_vis = self.codec.len(g) + t + 1 - n_tokens;
                scores.clear();
                scores.resize(n_vis, 0.0);
                let qh = &q[(t * n_heads + h) * hd..][..hd];
                self.codec.scores(g, qh, scores);
                let mut max = f32::NEG_INFINITY;
                for s in scores.iter_mut() {
                    *s *= scale;
                    max = max.max(*s);
                }
                let mut total = 0.0f64;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s as f64;
                }
                let inv = (1.0 / total) as f32;
                for s in scores.iter_mut() {
                    *s *= inv;
                }
                let oh = &mut out[(t * n_heads + h) * hd..][..hd];
                oh.fill(0.0);
                self.codec.weighted_values(g, scores, oh);
                if want {
                    for (m, &p) in self.mass[g].iter_mut().zip(scores.iter()) {
                        *m += p;
                    }
                }
            }
        }
    }
}

/// Bytes one layer's cache holds under `spec` after a prompt of `n_prompt` tokens and `n_decode`
/// decoded ones, by the codecs' and policies' formulas, without running anything. Exact (equal
/// to `bytes()`) for every codec without eviction and for the evicting policies over fp16
/// storage. For eviction over a compressed codec (gear-h2o, gear-sieve, group-h2o) the survivors
/// are counted as if they had been compressed as one fresh prompt: an estimate, since evicting
/// rows from compressed blocks keeps each block's shared scales and factors.
pub fn formula_bytes(spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, n_prompt: usize, n_decode: usize) -> Result<KvBytes> {
    use crate::kv::codec::{Fp16Codec, GearConfig, GroupConfig, UniformConfig};
    use crate::kv::policy::Budget;
    let n_total = n_prompt + n_decode;
    let held = if spec.policy == "keep_all" {
        n_total
    } else {
        let budget = spec.policy_params.budget.context("an evicting strategy needs a budget")?;
        let sinks = spec.policy_params.sinks.unwrap_or(if spec.policy == "window" { 4 } else { 0 });
        Budget::from_f64(budget)?.resolve(n_prompt, sinks)?.min(n_total)
    };
    let (p, d) = if held == n_total { (n_prompt, n_decode) } else { (held.min(n_prompt), held - held.min(n_prompt)) };
    let c = &spec.codec_params;
    let mut b = match spec.codec.as_str() {
        "fp16" => Fp16Codec::formula_bytes(n_kv_heads, head_dim, held),
        "uniform" => UniformConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, held),
        "group" => GroupConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, held),
        "gear" => GearConfig::from_params(c)?.formula_bytes(n_kv_heads, head_dim, p, d),
        other => bail!("unknown codec {other}"),
    };
    b.policy = match spec.policy.as_str() {
        "h2o" => n_kv_heads * held * 4,
        "sieve" => n_kv_heads * 8 * held.div_ceil(64),
        _ => 0,
    };
    Ok(b)
}

/// Whether `formula_bytes` is exact for this strategy (see there).
pub fn formula_is_exact(spec: &StrategySpec) -> bool {
    spec.policy == "keep_all" || spec.codec == "fp16"
}
