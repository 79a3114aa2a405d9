//! KV codecs: how the tokens that survive are stored.
//!
//! A codec holds one layer's cache for every KV head and answers the two questions attention
//! asks, block by block, without rebuilding the cache in f32: the scores `q . k_j` of a query
//! against the stored keys, and the weighted sum `sum_j p_j v_j` of the stored values. Each KV
//! head keeps its own tokens in arrival order (eviction can differ per head, as H2O's does);
//! `evict` removes tokens of one head by their index in that order.
//!
//! Codecs: `fp16` (the baseline), `uniform` (per-token min/max quantization), `group` (KIVI:
//! keys per channel, values per token, in groups), `gear` (GEAR: a quantized backbone, exact
//! sparse outliers and a low-rank residual). `make_codec` builds one from a name and
//! `CodecParams`; each codec's config has a `formula_bytes` that `bytes()` must equal.
//!
//! Bytes count the payload arrays (codes, scales, factors, outliers, fp16 rows); per-block
//! bookkeeping (a block's row count, the row counts of its key groups) is not counted: it is a
//! few words per block, not per token.

pub(crate) mod blocked;
/// Implements every `Codec` method but `describe` by forwarding to the field `inner` (the
/// compressed codecs share one block store and differ in how a block is encoded).
macro_rules! forward_codec_to_inner {
    () => {
        fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
            self.inner.append(k, v, n_tokens)
        }
        fn compress_due(&mut self, prompt: bool) -> Result<()> {
            self.inner.compress_due(prompt)
        }
        fn len(&self, g: usize) -> usize {
            self.inner.len(g)
        }
        fn scores(&self, g: usize, q: &[f32], out: &mut [f32]) {
            self.inner.scores(g, q, out)
        }
        fn weighted_values(&self, g: usize, p: &[f32], out: &mut [f32]) {
            self.inner.weighted_values(g, p, out)
        }
        fn for_each_decoded(&self, g: usize, value: bool, rows: std::ops::Range<usize>, f: &mut dyn FnMut(usize, &[f32])) {
            self.inner.for_each_decoded(g, value, rows, f)
        }
        fn decode_rows(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]) {
            self.inner.decode_rows(g, value, rows, out)
        }
        fn scores_direct(&self, g: usize, qs: &[f32], rows: std::ops::Range<usize>, out: &mut [f32], stride: usize) -> bool {
            self.inner.scores_direct(g, qs, rows, out, stride)
        }
        fn weighted_direct(&self, g: usize, p: &[f32], stride: usize, rows: std::ops::Range<usize>, out: &mut [f32]) -> bool {
            self.inner.weighted_direct(g, p, stride, rows, out)
        }

        fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()> {
            self.inner.evict(g, idx)
        }
        fn bytes(&self) -> KvBytes {
            self.inner.bytes()
        }
        fn decode_token(&self, g: usize, j: usize, k: &mut [f32], v: &mut [f32]) {
            self.inner.decode_token(g, j, k, v)
        }
    };
}

mod direct;
pub mod fp16;
pub mod gear;
pub mod group;
mod lowrank;
mod pack;
mod quant;
mod sparse;
pub mod uniform;

// The device twin (backend::cuda::kvcodec) mirrors this storage and these choices.
pub(crate) use blocked::block_seed;
#[cfg(test)]
pub(crate) use pack::{f16_down, f16_up};
pub(crate) use pack::row_bytes;
#[cfg(test)]
pub(crate) use sparse::best_code;
pub(crate) use sparse::{index_bytes, outlier_count};

pub use fp16::Fp16Codec;
pub use gear::{GearCodec, GearConfig};
pub use group::{GroupCodec, GroupConfig};
pub use uniform::{UniformCodec, UniformConfig};

use anyhow::{bail, Result};
use half::f16;

/// Largest head size a codec accepts (rows are decoded into stack buffers of this size).
pub const MAX_HEAD_DIM: usize = 512;
/// Queries the direct (decode) attention paths take at once: a KV head's query heads when one
/// token is decoded.
pub const MAX_DIRECT_QUERIES: usize = 8;
/// Largest low-rank rank GEAR accepts.
pub const MAX_RANK: usize = 64;

/// Bytes a codec holds, by component. Every figure is what is resident, not a simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvBytes {
    /// Bit-packed quantization codes.
    pub codes: usize,
    /// Quantization scales and zero points.
    pub scales: usize,
    /// Low-rank factors (fp16).
    pub lowrank: usize,
    /// Sparse outliers: (index, f16 correction) pairs.
    pub outliers: usize,
    /// Full-precision (fp16) tokens: the whole cache for `fp16`, the recent buffer otherwise.
    pub fp16: usize,
    /// Eviction policy state (scores, visited bits, positions).
    pub policy: usize,
}

impl KvBytes {
    pub fn total(&self) -> usize {
        self.codes + self.scales + self.lowrank + self.outliers + self.fp16 + self.policy
    }

    /// Every component times `n` (`n` equal layers, heads or blocks).
    pub fn times(&self, n: usize) -> KvBytes {
        KvBytes {
            codes: self.codes * n,
            scales: self.scales * n,
            lowrank: self.lowrank * n,
            outliers: self.outliers * n,
            fp16: self.fp16 * n,
            policy: self.policy * n,
        }
    }

    pub fn add(&mut self, o: &KvBytes) {
        self.codes += o.codes;
        self.scales += o.scales;
        self.lowrank += o.lowrank;
        self.outliers += o.outliers;
        self.fp16 += o.fp16;
        self.policy += o.policy;
    }
}

/// A boxed copy of a codec (every codec is a plain CPU struct; a copy is what a saved prompt
/// prefix restores, see `Session::snapshot`).
pub trait CodecClone {
    fn clone_box(&self) -> Box<dyn Codec>;
}

impl<T: Codec + Clone + 'static> CodecClone for T {
    fn clone_box(&self) -> Box<dyn Codec> {
        Box::new(self.clone())
    }
}

/// One layer's stored K and V for `n_kv_heads` heads of `head_dim`.
pub trait Codec: CodecClone + Send + Sync {
    /// A short name with parameters, for reports (`gear(bits=4,group=32,rank=4,...)`).
    fn describe(&self) -> String;
    /// Appends tokens: `k` and `v` are `[n_tokens, n_kv_heads, head_dim]` f32 (keys after RoPE).
    /// They are held in full precision (f16) until `compress_due`.
    fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()>;
    /// Compresses what is due at the end of a step (after the step's attention and evictions).
    /// `prompt`: the block is the prompt's (GEAR uses its prefill rank), not one decoding filled.
    fn compress_due(&mut self, _prompt: bool) -> Result<()> {
        Ok(())
    }
    /// Tokens head `g` holds.
    fn len(&self, g: usize) -> usize;
    /// `out[j] = q . k_j` for KV head `g` and the first `out.len()` tokens held.
    fn scores(&self, g: usize, q: &[f32], out: &mut [f32]);
    /// `out += sum_j p[j] * v_j` for KV head `g` over the first `p.len()` tokens held.
    fn weighted_values(&self, g: usize, p: &[f32], out: &mut [f32]);
    /// Calls `f(j, x_j)` for the tokens `j` of `rows` held by KV head `g`, in order, `x_j` the
    /// token's key (`value = false`) or value, decoded one row at a time from the stored form
    /// (never a copy of the whole cache): attention over several queries decodes each row once
    /// for all of them, and disjoint ranges of one head can be decoded in parallel.
    fn for_each_decoded(&self, g: usize, value: bool, rows: std::ops::Range<usize>, f: &mut dyn FnMut(usize, &[f32]));
    /// The tokens of `rows` held by KV head `g` (all of them must be), decoded as
    /// `for_each_decoded` decodes them, into `out`: `rows.len()` rows of `head_dim` values, a tile
    /// that attention's products then read as a matrix.
    fn decode_rows(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]);
    /// For each query `i` of `qs` (`[n_q, head_dim]`) and token `j` of `rows` held by KV head
    /// `g`: `out[i * stride + j - rows.start] = q_i . k_j`, computed from the stored form without
    /// decoding the keys whole (for decoding's few queries per KV head). Returns false, writing
    /// nothing, where the codec has no such path or `n_q` exceeds [`MAX_DIRECT_QUERIES`]: the
    /// caller then decodes rows with `decode_rows`.
    fn scores_direct(&self, _g: usize, _qs: &[f32], _rows: std::ops::Range<usize>, _out: &mut [f32], _stride: usize) -> bool {
        false
    }
    /// For each query `i` (`out`: `[n_q, head_dim]`): `out_i += sum_j p[i * stride + j -
    /// rows.start] v_j` over the tokens of `rows`, from the stored form without decoding the
    /// values whole. Returns false, writing nothing, where the codec has no such path.
    fn weighted_direct(&self, _g: usize, _p: &[f32], _stride: usize, _rows: std::ops::Range<usize>, _out: &mut [f32]) -> bool {
        false
    }
    /// Removes head `g`'s tokens at these indices (ascending, distinct, each < len(g)). The
    /// memory of evicted tokens is freed (or reused), and `bytes` drops accordingly.
    fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()>;
    /// Bytes held now, by component.
    fn bytes(&self) -> KvBytes;
    /// Key and value of token `j` for head `g`, decoded (tests and diagnostics only).
    fn decode_token(&self, g: usize, j: usize, k: &mut [f32], v: &mut [f32]);
}

/// GEAR's backbone quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backbone {
    /// KIVI layout: keys per channel over groups of `group` tokens, values per token over
    /// groups of `group` channels.
    Group,
    /// Per token (and head), over all `head_dim` channels, for K and V.
    Uniform,
}

impl std::str::FromStr for Backbone {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Backbone> {
        match s {
            "group" => Ok(Backbone::Group),
            "uniform" => Ok(Backbone::Uniform),
            _ => bail!("unknown GEAR backbone {s:?} (expected group or uniform)"),
        }
    }
}

impl std::fmt::Display for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backbone::Group => "group",
            Backbone::Uniform => "uniform",
        })
    }
}

/// Codec parameters as configured; `None` takes the codec's default. A parameter a codec does
/// not use is an error, so a typo in a sweep does not silently run the default.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CodecParams {
    /// Quantization bits: 2, 3, 4 or 8 (default 4).
    pub bits: Option<u32>,
    /// KIVI group size G (tokens per key group, channels per value group; default 32).
    pub group: Option<usize>,
    /// `group`: fp16 tokens kept until they fill whole groups (a multiple of G; default G).
    pub residual: Option<usize>,
    /// `gear`: rank of the prompt's low-rank term (default 4).
    pub rank: Option<usize>,
    /// `gear`: rank of blocks compressed while decoding (default 2).
    pub rank_decode: Option<usize>,
    /// `gear`: power-iteration steps (default 3).
    pub iters: Option<usize>,
    /// `gear`: fraction of entries kept as sparse outliers, in [0, 1) (default 0.02).
    pub outliers: Option<f64>,
    /// `uniform`, `gear`: fp16 buffer of recent tokens, compressed when it fills (default 20;
    /// `gear` with the group backbone 64).
    pub buffer: Option<usize>,
    /// `gear`: backbone quantization (default group).
    pub backbone: Option<Backbone>,
}

impl CodecParams {
    /// Names of the parameters that are set.
    fn set_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, name| {
            if set {
                v.push(name)
            }
        };
        add(self.bits.is_some(), "bits");
        add(self.group.is_some(), "group");
        add(self.residual.is_some(), "residual");
        add(self.rank.is_some(), "rank");
        add(self.rank_decode.is_some(), "rank_decode");
        add(self.iters.is_some(), "iters");
        add(self.outliers.is_some(), "outliers");
        add(self.buffer.is_some(), "buffer");
        add(self.backbone.is_some(), "backbone");
        v
    }

    /// Fails when a parameter outside `allowed` is set for codec `codec`.
    fn only(&self, codec: &str, allowed: &[&str]) -> Result<()> {
        for name in self.set_names() {
            if !allowed.contains(&name) {
                bail!("parameter {name} does not apply to codec {codec} (it takes: {})", if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") });
            }
        }
        Ok(())
    }
}

/// Builds codec `name` (fp16, uniform, group, gear) for `n_kv_heads` heads of `head_dim`;
/// `seed` seeds GEAR's power iteration.
pub fn make_codec(name: &str, params: &CodecParams, n_kv_heads: usize, head_dim: usize, seed: u64) -> Result<Box<dyn Codec>> {
    Ok(match name {
        "fp16" => {
            params.only("fp16", &[])?;
            Box::new(Fp16Codec::new(n_kv_heads, head_dim)?)
        }
        "uniform" => Box::new(UniformCodec::new(n_kv_heads, head_dim, UniformConfig::from_params(params)?)?),
        "group" => Box::new(GroupCodec::new(n_kv_heads, head_dim, GroupConfig::from_params(params)?)?),
        "gear" => Box::new(GearCodec::new(n_kv_heads, head_dim, GearConfig::from_params(params)?, seed)?),
        _ => bail!("unknown KV codec {name:?} (expected fp16, uniform, group or gear)"),
    })
}

pub(crate) fn check_shape(n_kv_heads: usize, head_dim: usize) -> Result<()> {
    if n_kv_heads == 0 {
        bail!("a KV codec needs at least one KV head");
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        bail!("head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}");
    }
    Ok(())
}

pub(crate) fn check_bits(bits: u32) -> Result<()> {
    if ![2, 3, 4, 8].contains(&bits) {
        bail!("bits = {bits}: quantization supports 2, 3, 4 or 8 bits");
    }
    Ok(())
}

/// Checks eviction indices: ascending, distinct, each `< len`.
pub(crate) fn check_evict(idx: &[usize], len: usize) -> Result<()> {
    for w in idx.windows(2) {
        if w[0] >= w[1] {
            bail!("evict: indices must be ascending and distinct ({} then {})", w[0], w[1]);
        }
    }
    if let Some(&last) = idx.last() {
        if last >= len {
            bail!("evict: index {last} out of range (the head holds {len} tokens)");
        }
    }
    Ok(())
}

/// Removes rows `rows` (ascending, in range) of a `[n, d]` f16 matrix, in place.
pub(crate) fn remove_f16_rows(m: &mut Vec<f16>, d: usize, rows: &[usize]) {
    let n = m.len() / d;
    let mut keep = 0;
    let mut r = 0;
    for j in 0..n {
        if r < rows.len() && rows[r] == j {
            r += 1;
            continue;
        }
        if keep != j {
            m.copy_within(j * d..(j + 1) * d, keep * d);
        }
        keep += 1;
    }
    m.truncate(keep * d);
}
