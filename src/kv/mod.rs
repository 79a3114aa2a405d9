//! KV cache storage.
//!
//! `Fp16Layer` is the plain fp16 cache, the baseline every strategy is measured against (and the
//! one whose arithmetic matches llama.cpp's). `strategy` composes an eviction `policy` with a
//! storage `codec` for everything else. Keys are stored after RoPE, so a token's entries never
//! change once written.

pub mod codec;
pub mod policy;
pub mod strategy;

use anyhow::{bail, Result};
use half::f16;

/// One layer's fp16 cache: per KV head, K and V as `[seq, head_dim]`, contiguous.
#[derive(Clone, Debug)]
pub struct Fp16Layer {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
    pub n_tokens: usize,
}

impl Fp16Layer {
    /// Reserves room for `capacity` tokens up front, so decoding never reallocates.
    pub fn new(n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Fp16Layer> {
        let per_head = capacity.checked_mul(head_dim).filter(|&n| n <= isize::MAX as usize / 4);
        let Some(per_head) = per_head else { bail!("KV cache of {capacity} tokens overflows") };
        let mk = || {
            (0..n_kv_heads)
                .map(|_| {
                    let mut v = Vec::new();
                    v.try_reserve_exact(per_head).map(|_| v)
                })
                .collect::<Result<Vec<Vec<f16>>, _>>()
        };
        let (k, v) = match (mk(), mk()) {
            (Ok(k), Ok(v)) => (k, v),
            _ => bail!("cannot allocate a KV cache of {capacity} tokens ({} bytes)", Self::formula_bytes(n_kv_heads, head_dim, capacity)),
        };
        Ok(Fp16Layer { n_kv_heads, head_dim, capacity, k, v, n_tokens: 0 })
    }

    /// Bytes of `n_tokens` tokens: K and V, 2 bytes each.
    pub fn formula_bytes(n_kv_heads: usize, head_dim: usize, n_tokens: usize) -> usize {
        2 * n_kv_heads * head_dim * n_tokens * 2
    }

    /// Bytes of the tokens held.
    pub fn bytes(&self) -> usize {
        let held: usize = self.k.iter().chain(&self.v).map(|h| h.len() * 2).sum();
        debug_assert_eq!(held, Self::formula_bytes(self.n_kv_heads, self.head_dim, self.n_tokens));
        held
    }

    /// Bytes reserved (the capacity allocated up front).
    pub fn reserved_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|h| h.capacity() * 2).sum()
    }

    /// Appends `n_tokens` tokens given as `[n_tokens, n_kv_heads, head_dim]` f32 rows.
    pub fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        if self.n_tokens + n_tokens > self.capacity {
            bail!(
                "context full: the KV cache holds {} of {} tokens and {} more were given (raise --ctx)",
                self.n_tokens,
                self.capacity,
                n_tokens
            );
        }
        let row = self.n_kv_heads * self.head_dim;
        for t in 0..n_tokens {
            for h in 0..self.n_kv_heads {
                let src = t * row + h * self.head_dim;
                self.k[h].extend(k[src..src + self.head_dim].iter().map(|&x| f16::from_f32(x)));
                self.v[h].extend(v[src..src + self.head_dim].iter().map(|&x| f16::from_f32(x)));
            }
        }
        self.n_tokens += n_tokens;
        Ok(())
    }

    pub fn truncate(&mut self, n_tokens: usize) {
        let n = n_tokens.min(self.n_tokens);
        for h in self.k.iter_mut().chain(self.v.iter_mut()) {
            h.truncate(n * self.head_dim);
        }
        self.n_tokens = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_the_formula_and_capacity_is_enforced() {
        let mut l = Fp16Layer::new(3, 8, 4).unwrap();
        let row: Vec<f32> = (0..24).map(|i| i as f32).collect();
        l.append(&row, &row, 1).unwrap();
        assert_eq!(l.bytes(), Fp16Layer::formula_bytes(3, 8, 1));
        assert_eq!(l.k[2][..8], row[16..24].iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()[..]);
        let three: Vec<f32> = row.iter().cycle().take(72).copied().collect();
        l.append(&three, &three, 3).unwrap();
        assert!(l.append(&row, &row, 1).is_err());
        assert_eq!(l.reserved_bytes(), Fp16Layer::formula_bytes(3, 8, 4));
        l.truncate(2);
        assert_eq!(l.n_tokens, 2);
        assert_eq!(l.bytes(), Fp16Layer::formula_bytes(3, 8, 2));
    }
}
