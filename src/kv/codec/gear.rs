//! GEAR (Kang et al., 2024, arXiv 2403.05527): a quantized backbone, sparse outliers and a
//! low-rank approximation of the quantization residual, per KV head and block of tokens.
//!
//! For a block's K (and separately V), `X` (`[n, head_dim]`, the f16 values the cache holds):
//! 1. Outliers `S`: the `floor(s n head_dim)` entries of largest `|x|` (both signs; ties to the
//!    lower index), taken out and zeroed.
//! 2. Backbone `Q`: `X - S` quantized to `bits` bits with `2^bits - 1` steps, either in KIVI's
//!    layout (`Backbone::Group`: keys per channel over G-token groups, values per token over
//!    G-channel groups) or per token (`Backbone::Uniform`).
//! 3. Low rank: the residual `R = X - S - deq(Q)` (zero on the outliers' positions) approximated
//!    by `A Bᵀ`, `A` `[n, r]`, `B` `[head_dim, r]` in f16, from `iters` power-iteration steps
//!    started from normal vectors seeded by (codec seed, head, block number). `r = rank` for a
//!    block compressed by an append of more than one token (the prompt), `rank_decode` for one
//!    compressed while decoding (one-token appends).
//! 4. Streaming: a recent fp16 buffer of `buffer` (nb) tokens; after an append, when it holds nb
//!    tokens or more, its oldest `floor(len / nb) * nb` tokens become one block. The prompt is
//!    compressed at once (as one block of whole buffers; its last `n mod nb` tokens stay in
//!    fp16), and decoding compresses one block every nb steps.
//!
//! 5. Each outlier is stored as (index, f16 correction): its value minus `deq(Q) + A Bᵀ` at its
//!    place, so that attention adds a stored number per outlier instead of recomputing the
//!    backbone's and the low-rank term's entry there.
//!
//! Decoded value: `deq(Q) + A Bᵀ`, plus the correction on an outlier's position. (The paper
//! writes `X ≈ D + L + S`; `D` and `L` only approximate the zero quantized in place of an
//! outlier, so the correction absorbs them there.) An outlier comes back to within half an f16
//! ulp of its correction, which is about the outlier itself: the f16 rounding the cache applies
//! to every value, once more.
//!
//! Eviction (GEAR + H2O): an evicted token's row of codes and per-token scales, its row of `A` and
//! its outliers are dropped and the arrays compacted; `B`, per-channel key scales and the other
//! rows stay, so survivors decode bit-identically. A block left empty is freed.
//!
//! This follows the paper's definitions: the outlier count is a fraction of all the block's
//! entries and `b` bits give `2^b - 1` steps. The public reference code differs: it picks
//! outliers per channel (a per-channel count) and quantizes with `b^2 - 1` levels.

use anyhow::{bail, Result};

use super::blocked::{Blocked, GearScheme, Scheme};
use super::pack::row_bytes;
use super::quant::{scale_bytes_for, shared_scale_bytes_per_row, Layout};
use super::sparse::{index_bytes, outlier_count};
use super::{check_bits, check_shape, Backbone, Codec, CodecParams, KvBytes, MAX_RANK};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GearConfig {
    pub bits: u32,
    pub backbone: Backbone,
    /// G for the group backbone (tokens per key group, channels per value group).
    pub group: usize,
    /// Rank of the prompt's blocks.
    pub rank: usize,
    /// Rank of blocks compressed while decoding.
    pub rank_decode: usize,
    /// Power-iteration steps.
    pub iters: usize,
    /// Fraction of entries kept as sparse outliers, in [0, 1).
    pub outliers: f64,
    /// nb: fp16 buffer of recent tokens (a multiple of G for the group backbone).
    pub buffer: usize,
}

impl Default for GearConfig {
    fn default() -> GearConfig {
        GearConfig { bits: 4, backbone: Backbone::Group, group: 32, rank: 4, rank_decode: 2, iters: 3, outliers: 0.02, buffer: 64 }
    }
}

impl GearConfig {
    pub fn from_params(p: &CodecParams) -> Result<GearConfig> {
        let backbone = p.backbone.unwrap_or(Backbone::Group);
        let mut allowed = vec!["bits", "backbone", "rank", "rank_decode", "iters", "outliers", "buffer"];
        if backbone == Backbone::Group {
            allowed.push("group");
        }
        p.only(&format!("gear(backbone={backbone})"), &allowed)?;
        let d = GearConfig::default();
        let c = GearConfig {
            bits: p.bits.unwrap_or(d.bits),
            backbone,
            group: p.group.unwrap_or(d.group),
            rank: p.rank.unwrap_or(d.rank),
            rank_decode: p.rank_decode.unwrap_or(d.rank_decode),
            iters: p.iters.unwrap_or(d.iters),
            outliers: p.outliers.unwrap_or(d.outliers),
            buffer: p.buffer.unwrap_or(match backbone {
                Backbone::Group => 64,
                Backbone::Uniform => 20,
            }),
        };
        c.validate_params()?;
        Ok(c)
    }

    fn validate_params(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.rank > MAX_RANK || self.rank_decode > MAX_RANK {
            bail!("gear: rank {} / rank_decode {} above the maximum {MAX_RANK}", self.rank, self.rank_decode);
        }
        if self.iters == 0 && (self.rank > 0 || self.rank_decode > 0) {
            bail!("gear: iters must be at least 1 when a rank is non-zero");
        }
        if !(self.outliers >= 0.0 && self.outliers < 1.0) {
            bail!("gear: outliers = {} must be a fraction in [0, 1)", self.outliers);
        }
        if self.buffer == 0 {
            bail!("gear: buffer must be at least 1 token");
        }
        if self.backbone == Backbone::Group {
            if self.group == 0 {
                bail!("gear: group size must be at least 1");
            }
            if self.buffer % self.group != 0 {
                bail!("gear: buffer {} must be a multiple of the group size {} (keys are grouped by token)", self.buffer, self.group);
            }
        }
        Ok(())
    }

    pub fn validate(&self, head_dim: usize) -> Result<()> {
        self.validate_params()?;
        if self.backbone == Backbone::Group && head_dim % self.group != 0 {
            bail!("gear: group size {} does not divide head_dim {head_dim} (values are grouped by channel)", self.group);
        }
        if self.rank > head_dim || self.rank_decode > head_dim {
            bail!("gear: rank {} / rank_decode {} above head_dim {head_dim}", self.rank, self.rank_decode);
        }
        Ok(())
    }

    fn layouts(&self, head_dim: usize) -> (Layout, Layout) {
        match self.backbone {
            Backbone::Group => (Layout::Channel { group: self.group }, Layout::Token { group: self.group }),
            Backbone::Uniform => (Layout::Token { group: head_dim }, Layout::Token { group: head_dim }),
        }
    }

    /// Scale bytes per token, K and V, that a token shares with the rest of its block (the
    /// group backbone's per-channel key scales, freed with their row group's last token).
    pub fn shared_scale_bytes_per_row(&self, head_dim: usize) -> usize {
        let (kl, vl) = self.layouts(head_dim);
        shared_scale_bytes_per_row(kl, head_dim) + shared_scale_bytes_per_row(vl, head_dim)
    }

    /// Bytes of one head's block of `m` tokens at rank `r`, K and V.
    pub fn block_bytes(&self, head_dim: usize, m: usize, r: usize) -> KvBytes {
        let (kl, vl) = self.layouts(head_dim);
        let entries = m * head_dim;
        KvBytes {
            codes: 2 * m * row_bytes(head_dim, self.bits),
            scales: scale_bytes_for(kl, m, head_dim) + scale_bytes_for(vl, m, head_dim),
            lowrank: if r > 0 { 2 * (m + head_dim) * r * 2 } else { 0 },
            outliers: 2 * outlier_count(self.outliers, entries) * (index_bytes(entries) + 2),
            ..KvBytes::default()
        }
    }

    /// Bytes after a prompt of `n_prompt` tokens run in forward batches of `n_batch` tokens
    /// (`0`: one batch) and `n_decode` one-token steps, with no eviction. Each step's tokens join
    /// the fp16 buffer; at the end of a step whose buffer holds at least nb tokens, its oldest
    /// `floor(n_buf / nb) nb` become one block, at rank `rank` for a block made by a prompt step
    /// or a step of several tokens and at `rank_decode` for one made by decoding. A prompt run as
    /// one batch therefore makes one block of `n_prompt - n_prompt mod nb` tokens, and decoding a
    /// block of nb tokens every nb steps. A block of `m` tokens holds, for K and V each,
    /// `m ceil(head_dim bits / 8)` code bytes, its backbone's (step, zero) pairs,
    /// `(m + head_dim) r` f16 factors and `floor(s m head_dim)` outliers of (2- or 4-byte index,
    /// f16 value).
    pub fn formula_bytes(&self, n_kv_heads: usize, head_dim: usize, n_prompt: usize, n_decode: usize, n_batch: usize) -> KvBytes {
        let nb = self.buffer;
        let mut per_head = KvBytes::default();
        let mut buf = 0usize;
        // A prompt step's block is at `rank` (see `StrategyLayer::finish_step`).
        let step = |c: usize, buf: &mut usize, acc: &mut KvBytes| {
            *buf += c;
            if *buf >= nb {
                let m = *buf / nb * nb;
                acc.add(&self.block_bytes(head_dim, m, self.rank));
                *buf -= m;
            }
        };
        // The buffer's fill level after each full batch repeats with a period of at most nb
        // batches, so a long prompt costs one period.
        if n_prompt > 0 {
            let chunk = if n_batch == 0 { n_prompt } else { n_batch.min(n_prompt) };
            let (full, rest) = (n_prompt / chunk, n_prompt % chunk);
            let mut first_seen = vec![usize::MAX; nb];
            let mut before: Vec<KvBytes> = Vec::new();
            let mut i = 0;
            while i < full {
                let start = first_seen[buf];
                if start != usize::MAX {
                    let period = i - start;
                    let cycles = (full - i) / period;
                    let gain = sub(&per_head, &before[start]);
                    per_head.add(&gain.times(cycles));
                    for _ in 0..(full - i) % period {
                        step(chunk, &mut buf, &mut per_head);
                    }
                    break;
                }
                first_seen[buf] = i;
                before.push(per_head);
                step(chunk, &mut buf, &mut per_head);
                i += 1;
            }
            if rest > 0 {
                step(rest, &mut buf, &mut per_head);
            }
        }
        let n_decode_blocks = (buf + n_decode) / nb;
        per_head.add(&self.block_bytes(head_dim, nb, self.rank_decode).times(n_decode_blocks));
        per_head.fp16 = 2 * ((buf + n_decode) % nb) * head_dim * 2;
        per_head.times(n_kv_heads)
    }
}

fn sub(a: &KvBytes, b: &KvBytes) -> KvBytes {
    KvBytes {
        codes: a.codes - b.codes,
        scales: a.scales - b.scales,
        lowrank: a.lowrank - b.lowrank,
        outliers: a.outliers - b.outliers,
        fp16: a.fp16 - b.fp16,
        policy: a.policy - b.policy,
    }
}

#[derive(Clone, Debug)]
pub struct GearCodec {
    config: GearConfig,
    seed: u64,
    inner: Blocked,
}

impl GearCodec {
    pub fn new(n_kv_heads: usize, head_dim: usize, config: GearConfig, seed: u64) -> Result<GearCodec> {
        check_shape(n_kv_heads, head_dim)?;
        config.validate(head_dim)?;
        let (k_layout, v_layout) = config.layouts(head_dim);
        let gear = GearScheme { rank: config.rank, rank_decode: config.rank_decode, iters: config.iters, outliers: config.outliers, seed };
        let scheme = Scheme { bits: config.bits, k_layout, v_layout, flush: config.buffer, gear: Some(gear) };
        Ok(GearCodec { config, seed, inner: Blocked::new(n_kv_heads, head_dim, scheme) })
    }

    pub fn config(&self) -> GearConfig {
        self.config
    }

    /// Tokens of head `g` held compressed and in the fp16 buffer.
    pub fn split_len(&self, g: usize) -> (usize, usize) {
        self.inner.split_len(g)
    }

    /// Head `g`'s outliers of K (`key`) or V as (token index, channel, correction).
    #[cfg(test)]
    pub(crate) fn outliers(&self, g: usize, key: bool) -> Vec<(usize, usize, f32)> {
        self.inner.outliers(g, key)
    }
}

impl Codec for GearCodec {
    fn describe(&self) -> String {
        let c = &self.config;
        let group = if c.backbone == Backbone::Group { format!(",group={}", c.group) } else { String::new() };
        format!(
            "gear(bits={},backbone={}{group},rank={},rank_decode={},iters={},outliers={},buffer={},seed={})",
            c.bits, c.backbone, c.rank, c.rank_decode, c.iters, c.outliers, c.buffer, self.seed
        )
    }
    forward_codec_to_inner!();
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::rng::Rng;

    #[test]
    fn outliers_are_the_largest_magnitudes_and_come_back_within_a_rounding() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let (heads, d, n) = (2, 32, 48);
        let cfg = GearConfig { group: 8, buffer: 16, outliers: 0.05, bits: 4, ..GearConfig::default() };
        let mut c = GearCodec::new(heads, d, cfg, seed).unwrap();
        let k: Vec<f32> = (0..n * heads * d).map(|_| f16::from_f32(rng.normal() * if rng.below(10) == 0 { 20.0 } else { 1.0 }).to_f32()).collect();
        let v: Vec<f32> = (0..n * heads * d).map(|_| f16::from_f32(rng.normal()).to_f32()).collect();
        c.append(&k, &v, n).unwrap();
        c.compress_due(true).unwrap();
        let per_block = outlier_count(0.05, n * d);
        let (mut err_sum, mut bound_sum) = (0f64, 0f64);
        for g in 0..heads {
            for (key, x) in [(true, &k), (false, &v)] {
                let at = |j: usize, ch: usize| x[(j * heads + g) * d + ch];
                let out = c.outliers(g, key);
                assert_eq!(out.len(), per_block, "seed {seed}");
                let mut mags: Vec<f32> = (0..n).flat_map(|j| (0..d).map(move |ch| (j, ch))).map(|(j, ch)| at(j, ch).abs()).collect();
                mags.sort_by(|a, b| b.total_cmp(a));
                let mut got: Vec<f32> = out.iter().map(|o| at(o.0, o.1).abs()).collect();
                got.sort_by(|a, b| b.total_cmp(a));
                assert_eq!(got, mags[..per_block], "seed {seed}: outliers are not the top entries by magnitude");
                for &(j, ch, corr) in &out {
                    let (mut kd, mut vd) = (vec![0f32; d], vec![0f32; d]);
                    c.decode_token(g, j, &mut kd, &mut vd);
                    let got = if key { kd[ch] } else { vd[ch] };
                    // Decoded: dense + f16(value - dense), so within half an f16 ulp of the
                    // correction (2^-11 relative; the subnormal step near zero), plus the f32
                    // rounding of the sum.
                    let tol = corr.abs() * 0.5f32.powi(11) + at(j, ch).abs() * 0.5f32.powi(23) + 6e-8;
                    assert!((got - at(j, ch)).abs() <= tol, "seed {seed}: outlier ({j},{ch}) = {} decoded as {got} (correction {corr})", at(j, ch));
                    err_sum += (got - at(j, ch)).abs() as f64;
                    bound_sum += tol as f64;
                }
            }
        }
        // The free code at each outlier's place cancels most of the correction's rounding: with
        // 16 codes the mean error is near a seventeenth of the bound, where rounding alone would
        // leave about a half of it.
        assert!(err_sum < bound_sum / 6.0, "seed {seed}: outliers' mean error {} is not far below the rounding bound {}", err_sum, bound_sum);
        let before = c.outliers(0, true);
        c.evict(0, &[0, 1, 2, 30]).unwrap();
        let after = c.outliers(0, true);
        let kept: Vec<(usize, usize, f32)> = before
            .iter()
            .filter(|o| ![0, 1, 2, 30].contains(&o.0))
            .map(|&(j, ch, v)| (j - [0usize, 1, 2, 30].iter().filter(|&&e| e < j).count(), ch, v))
            .collect();
        assert_eq!(after, kept, "seed {seed}");
    }

    #[test]
    fn chunked_prompt_bytes_follow_the_formula() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let (heads, d) = (2, 32);
        for (n_prompt, chunk, n_decode) in [(100, 64, 30), (200, 24, 5), (65, 1, 70), (64, 64, 0), (150, 150, 17), (7, 3, 60)] {
            let cfg = GearConfig { group: 8, buffer: 16, ..GearConfig::default() };
            let mut c = GearCodec::new(heads, d, cfg, seed).unwrap();
            let mut left = n_prompt;
            while left > 0 {
                let n = left.min(chunk);
                let k: Vec<f32> = (0..n * heads * d).map(|_| rng.normal()).collect();
                c.append(&k, &k, n).unwrap();
                c.compress_due(true).unwrap();
                left -= n;
            }
            for _ in 0..n_decode {
                let k: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
                c.append(&k, &k, 1).unwrap();
                c.compress_due(false).unwrap();
            }
            assert_eq!(c.bytes(), cfg.formula_bytes(heads, d, n_prompt, n_decode, chunk), "seed {seed}: {n_prompt} in chunks of {chunk}, {n_decode} decoded");
        }
        // The period shortcut gives what stepping through every chunk gives.
        let cfg = GearConfig { group: 8, buffer: 24, outliers: 0.03, ..GearConfig::default() };
        for (n, chunk) in [(100_000, 40), (99_999, 7), (12_345, 24), (5_000, 1)] {
            let mut step_by_step = KvBytes::default();
            let mut buf = 0;
            for c in std::iter::repeat_n(chunk, n / chunk).chain((n % chunk > 0).then_some(n % chunk)) {
                buf += c;
                if buf >= 24 {
                    let m = buf / 24 * 24;
                    step_by_step.add(&cfg.block_bytes(d, m, cfg.rank));
                    buf -= m;
                }
            }
            step_by_step.fp16 = 2 * buf * d * 2;
            assert_eq!(cfg.formula_bytes(1, d, n, 0, chunk), step_by_step, "{n} in chunks of {chunk}");
        }
    }

}
