//! KV codecs: how the tokens that survive are stored.
//!
//! A codec holds one layer's cache for every KV head and answers the two questions attention
//! asks, block by block, without rebuilding the cache in f32: the scores `q . k_j` of a query
//! against the stored keys, and the weighted sum `sum_j p_j v_j` of the stored values. Each KV
//! head keeps its own tokens in arrival order (eviction can differ per head, as H2O's does);
//! `evict` removes tokens of one head by their index in that order.

use anyhow::Result;

/// Bytes a codec holds, by component. Every figure is what is resident, not a simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvBytes {
    /// Bit-packed quantization codes.
    pub codes: usize,
    /// Quantization scales and zero points.
    pub scales: usize,
    /// Low-rank factors (fp16).
    pub lowrank: usize,
    /// Sparse outliers: (index, value) pairs.
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

    pub fn add(&mut self, o: &KvBytes) {
        self.codes += o.codes;
        self.scales += o.scales;
        self.lowrank += o.lowrank;
        self.outliers += o.outliers;
        self.fp16 += o.fp16;
        self.policy += o.policy;
    }
}

/// One layer's stored K and V for `n_kv_heads` heads of `head_dim`.
pub trait Codec: Send + Sync {
    /// A short name with parameters, for reports (`gear(bits=4,group=32,rank=4,...)`).
    fn describe(&self) -> String;
    /// Appends tokens: `k` and `v` are `[n_tokens, n_kv_heads, head_dim]` f32 (keys after RoPE).
    fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()>;
    /// Tokens head `g` holds.
    fn len(&self, g: usize) -> usize;
    /// `out[j] = q . k_j` for KV head `g` and the first `out.len()` tokens held.
    fn scores(&self, g: usize, q: &[f32], out: &mut [f32]);
    /// `out += sum_j p[j] * v_j` for KV head `g` over the first `p.len()` tokens held.
    fn weighted_values(&self, g: usize, p: &[f32], out: &mut [f32]);
    /// Removes head `g`'s tokens at these indices (ascending, distinct, each < len(g)). The
    /// memory of evicted tokens is freed (or reused), and `bytes` drops accordingly.
    fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()>;
    /// Bytes held now, by component.
    fn bytes(&self) -> KvBytes;
    /// Key and value of token `j` for head `g`, decoded (tests and diagnostics only).
    fn decode_token(&self, g: usize, j: usize, k: &mut [f32], v: &mut [f32]);
}
