//! KIVI-style group quantization (Liu et al., 2024): keys per channel, values per token.
//!
//! Keys: the tokens in groups of `group` (G) consecutive tokens; each channel of a group gets its
//! own (step, zero) over those G tokens (keys have outlier channels, so per-channel ranges fit
//! them). Values: each token's `head_dim` channels in groups of G channels, one (step, zero) per
//! token and channel group. `bits` bits, `2^bits - 1` steps, codes bit-packed, (step, zero) f16.
//!
//! The most recent tokens stay in fp16: after each append, when the buffer holds `residual`
//! (R, a multiple of G) tokens or more, its oldest `floor(len / R) * R` tokens are quantized, in
//! whole key groups. Without eviction `n_tokens mod R` tokens are in fp16. (KIVI itself slides the
//! value residual one token at a time; quantizing K and V together keeps every token's K and V
//! in the same block, which eviction needs.)
//!
//! Eviction inside a key group keeps the group's per-channel (step, zero); the group just has
//! fewer rows, and its scales are freed with its last row.

use anyhow::{bail, Result};

use super::blocked::{Blocked, Scheme};
use super::pack::row_bytes;
use super::quant::{scale_bytes_for, shared_scale_bytes_per_row, Layout};
use super::{check_bits, check_shape, Codec, CodecParams, KvBytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    pub bits: u32,
    /// G: tokens per key group and channels per value group.
    pub group: usize,
    /// R: fp16 tokens kept until whole groups fill (a multiple of G).
    pub residual: usize,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig { bits: 4, group: 32, residual: 32 }
    }
}

impl GroupConfig {
    pub fn from_params(p: &CodecParams) -> Result<GroupConfig> {
        p.only("group", &["bits", "group", "residual"])?;
        let d = GroupConfig::default();
        let group = p.group.unwrap_or(d.group);
        let c = GroupConfig { bits: p.bits.unwrap_or(d.bits), group, residual: p.residual.unwrap_or(group) };
        c.validate_bits_and_residual()?;
        Ok(c)
    }

    fn validate_bits_and_residual(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.group == 0 {
            bail!("group: group size must be at least 1");
        }
        if self.residual == 0 || self.residual % self.group != 0 {
            bail!("group: residual {} must be a positive multiple of the group size {}", self.residual, self.group);
        }
        Ok(())
    }

    pub fn validate(&self, head_dim: usize) -> Result<()> {
        self.validate_bits_and_residual()?;
        if head_dim % self.group != 0 {
            bail!("group: group size {} does not divide head_dim {head_dim} (values are grouped by channel)", self.group);
        }
        Ok(())
    }

    /// Bytes after appending `n_tokens` tokens to every head with no eviction: `n_c = n_tokens -
    /// n_tokens mod R` tokens quantized (`n_c / G` key groups of `head_dim` (step, zero) pairs,
    /// `n_c head_dim / G` value pairs, `2 ceil(head_dim bits / 8)` code bytes a token), the rest
    /// in fp16.
    pub fn formula_bytes(&self, n_kv_heads: usize, head_dim: usize, n_tokens: usize) -> KvBytes {
        let nb = n_tokens % self.residual;
        let block = self.block_bytes(head_dim, n_tokens - nb);
        KvBytes {
            codes: n_kv_heads * block.codes,
            scales: n_kv_heads * block.scales,
            fp16: n_kv_heads * 2 * nb * head_dim * 2,
            ..KvBytes::default()
        }
    }

    /// Scale bytes per token, K and V, that a token shares with the rest of its key group (the
    /// per-channel key scales, freed with the group's last token).
    pub fn shared_scale_bytes_per_row(&self, head_dim: usize) -> usize {
        shared_scale_bytes_per_row(Layout::Channel { group: self.group }, head_dim)
    }

    /// Bytes of one head's `m` quantized tokens, K and V.
    pub fn block_bytes(&self, head_dim: usize, m: usize) -> KvBytes {
        KvBytes {
            codes: 2 * m * row_bytes(head_dim, self.bits),
            scales: scale_bytes_for(Layout::Channel { group: self.group }, m, head_dim) + scale_bytes_for(Layout::Token { group: self.group }, m, head_dim),
            ..KvBytes::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct GroupCodec {
    config: GroupConfig,
    inner: Blocked,
}

impl GroupCodec {
    pub fn new(n_kv_heads: usize, head_dim: usize, config: GroupConfig) -> Result<GroupCodec> {
        check_shape(n_kv_heads, head_dim)?;
        config.validate(head_dim)?;
        let scheme = Scheme {
            bits: config.bits,
            k_layout: Layout::Channel { group: config.group },
            v_layout: Layout::Token { group: config.group },
            flush: config.residual,
            gear: None,
        };
        Ok(GroupCodec { config, inner: Blocked::new(n_kv_heads, head_dim, scheme) })
    }

    pub fn config(&self) -> GroupConfig {
        self.config
    }

    /// Tokens of head `g` held quantized and in the fp16 buffer.
    pub fn split_len(&self, g: usize) -> (usize, usize) {
        self.inner.split_len(g)
    }
}

impl Codec for GroupCodec {
    fn describe(&self) -> String {
        format!("group(bits={},group={},residual={})", self.config.bits, self.config.group, self.config.residual)
    }
    forward_codec_to_inner!();
}
