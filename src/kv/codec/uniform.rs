//! Uniform quantization: each token's K (and V) row of one head, `head_dim` values, quantized
//! asymmetrically to `bits` bits (`2^bits - 1` steps between its f16 min and max, see `quant`),
//! codes bit-packed, (step, zero) in f16 per token, head and K/V.
//!
//! The most recent tokens stay in an fp16 buffer: after each append, when the buffer holds
//! `buffer` tokens or more, its oldest `floor(len / buffer) * buffer` tokens are quantized. A
//! prompt of `n` tokens is quantized at once except its last `n mod buffer` tokens; while
//! decoding, the buffer is quantized every `buffer` steps, when it fills.

use anyhow::{bail, Result};

use super::blocked::{Blocked, Scheme};
use super::pack::row_bytes;
use super::quant::Layout;
use super::{check_bits, check_shape, Codec, CodecParams, KvBytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniformConfig {
    pub bits: u32,
    /// fp16 buffer of recent tokens, quantized when it fills.
    pub buffer: usize,
}

impl Default for UniformConfig {
    fn default() -> UniformConfig {
        UniformConfig { bits: 4, buffer: 20 }
    }
}

impl UniformConfig {
    pub fn from_params(p: &CodecParams) -> Result<UniformConfig> {
        p.only("uniform", &["bits", "buffer"])?;
        let d = UniformConfig::default();
        let c = UniformConfig { bits: p.bits.unwrap_or(d.bits), buffer: p.buffer.unwrap_or(d.buffer) };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.buffer == 0 {
            bail!("uniform: buffer must be at least 1 token");
        }
        Ok(())
    }

    /// Bytes with `n_compressed` quantized and `n_buffered` fp16 tokens in every head. Every
    /// quantized token holds `2 ceil(head_dim bits / 8)` code bytes and 2 (step, zero) pairs of
    /// f16 (K and V); every buffered one `2 head_dim` f16.
    pub fn formula_bytes_split(&self, n_kv_heads: usize, head_dim: usize, n_compressed: usize, n_buffered: usize) -> KvBytes {
        KvBytes {
            codes: n_kv_heads * 2 * n_compressed * row_bytes(head_dim, self.bits),
            scales: n_kv_heads * 2 * n_compressed * 4,
            fp16: n_kv_heads * 2 * n_buffered * head_dim * 2,
            ..KvBytes::default()
        }
    }

    /// Bytes after appending `n_tokens` tokens to every head (in any number of appends) with no
    /// eviction: `n_tokens - n_tokens mod buffer` quantized, the rest buffered.
    pub fn formula_bytes(&self, n_kv_heads: usize, head_dim: usize, n_tokens: usize) -> KvBytes {
        let nb = n_tokens % self.buffer;
        self.formula_bytes_split(n_kv_heads, head_dim, n_tokens - nb, nb)
    }
}

#[derive(Clone, Debug)]
pub struct UniformCodec {
    config: UniformConfig,
    inner: Blocked,
}

impl UniformCodec {
    pub fn new(n_kv_heads: usize, head_dim: usize, config: UniformConfig) -> Result<UniformCodec> {
        check_shape(n_kv_heads, head_dim)?;
        config.validate()?;
        let layout = Layout::Token { group: head_dim };
        let scheme = Scheme { bits: config.bits, k_layout: layout, v_layout: layout, flush: config.buffer, gear: None };
        Ok(UniformCodec { config, inner: Blocked::new(n_kv_heads, head_dim, scheme) })
    }

    pub fn config(&self) -> UniformConfig {
        self.config
    }

    /// Tokens of head `g` held quantized and in the fp16 buffer.
    pub fn split_len(&self, g: usize) -> (usize, usize) {
        self.inner.split_len(g)
    }
}

impl Codec for UniformCodec {
    fn describe(&self) -> String {
        format!("uniform(bits={},buffer={})", self.config.bits, self.config.buffer)
    }
    forward_codec_to_inner!();
}
