//! The fp16 codec: per KV head, K and V as f16 `[tokens, head_dim]`, contiguous. The baseline
//! every compressed codec is measured against; all its bytes are `fp16`.

use anyhow::{bail, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::blocked::dot;
use super::{check_evict, check_shape, remove_f16_rows, Codec, KvBytes, MAX_HEAD_DIM};

#[derive(Clone, Debug)]
pub struct Fp16Codec {
    n_kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl Fp16Codec {
    pub fn new(n_kv_heads: usize, head_dim: usize) -> Result<Fp16Codec> {
        check_shape(n_kv_heads, head_dim)?;
        Ok(Fp16Codec { n_kv_heads, head_dim, k: vec![Vec::new(); n_kv_heads], v: vec![Vec::new(); n_kv_heads] })
    }

    /// Bytes of `n_tokens` tokens in every head: K and V, 2 bytes an entry.
    pub fn formula_bytes(n_kv_heads: usize, head_dim: usize, n_tokens: usize) -> KvBytes {
        KvBytes { fp16: 2 * n_kv_heads * n_tokens * head_dim * 2, ..KvBytes::default() }
    }
}

impl Codec for Fp16Codec {
    fn describe(&self) -> String {
        "fp16".to_string()
    }

    fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        let (h_n, d) = (self.n_kv_heads, self.head_dim);
        let want = n_tokens.checked_mul(h_n * d);
        if want != Some(k.len()) || want != Some(v.len()) {
            bail!("append of {n_tokens} tokens needs {n_tokens} x {h_n} x {d} values for K and V, got {} and {}", k.len(), v.len());
        }
        for g in 0..h_n {
            self.k[g].reserve(n_tokens * d);
            self.v[g].reserve(n_tokens * d);
            for t in 0..n_tokens {
                let src = t * h_n * d + g * d;
                self.k[g].extend(k[src..src + d].iter().map(|&x| f16::from_f32(x)));
                self.v[g].extend(v[src..src + d].iter().map(|&x| f16::from_f32(x)));
            }
        }
        Ok(())
    }

    fn len(&self, g: usize) -> usize {
        self.k.get(g).map_or(0, |k| k.len() / self.head_dim)
    }

    fn scores(&self, g: usize, q: &[f32], out: &mut [f32]) {
        let d = self.head_dim;
        let Some(k) = self.k.get(g).filter(|_| q.len() == d) else {
            out.fill(f32::NAN);
            return;
        };
        let mut row = [0f32; MAX_HEAD_DIM];
        let mut n = 0;
        for (o, kr) in out.iter_mut().zip(k.chunks_exact(d)) {
            kr.convert_to_f32_slice(&mut row[..d]);
            *o = dot(q, &row[..d]);
            n += 1;
        }
        out[n..].fill(f32::NEG_INFINITY);
    }

    fn weighted_values(&self, g: usize, p: &[f32], out: &mut [f32]) {
        let d = self.head_dim;
        let Some(v) = self.v.get(g).filter(|_| out.len() == d) else { return };
        let mut row = [0f32; MAX_HEAD_DIM];
        for (&pj, vr) in p.iter().zip(v.chunks_exact(d)) {
            vr.convert_to_f32_slice(&mut row[..d]);
            for (o, &x) in out.iter_mut().zip(&row[..d]) {
                *o += pj * x;
            }
        }
    }

    fn for_each_decoded(&self, g: usize, value: bool, rows: std::ops::Range<usize>, f: &mut dyn FnMut(usize, &[f32])) {
        let d = self.head_dim;
        let Some(x) = (if value { self.v.get(g) } else { self.k.get(g) }) else { return };
        let mut row = [0f32; MAX_HEAD_DIM];
        for (j, xr) in x.chunks_exact(d).enumerate().skip(rows.start).take(rows.len()) {
            xr.convert_to_f32_slice(&mut row[..d]);
            f(j, &row[..d]);
        }
    }

    fn decode_rows(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let d = self.head_dim;
        if let Some(x) = (if value { self.v.get(g) } else { self.k.get(g) }).and_then(|x| x.get(rows.start * d..rows.end * d)) {
            x.convert_to_f32_slice(&mut out[..rows.len() * d]);
        }
    }

    fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()> {
        if g >= self.n_kv_heads {
            bail!("evict: KV head {g} of {}", self.n_kv_heads);
        }
        check_evict(idx, self.len(g))?;
        remove_f16_rows(&mut self.k[g], self.head_dim, idx);
        remove_f16_rows(&mut self.v[g], self.head_dim, idx);
        Ok(())
    }

    fn bytes(&self) -> KvBytes {
        let fp16 = self.k.iter().chain(&self.v).map(|h| h.len() * 2).sum();
        KvBytes { fp16, ..KvBytes::default() }
    }

    fn decode_token(&self, g: usize, j: usize, k: &mut [f32], v: &mut [f32]) {
        let d = self.head_dim;
        if g >= self.n_kv_heads || j >= self.len(g) || k.len() != d || v.len() != d {
            k.fill(f32::NAN);
            v.fill(f32::NAN);
            return;
        }
        self.k[g][j * d..(j + 1) * d].convert_to_f32_slice(k);
        self.v[g][j * d..(j + 1) * d].convert_to_f32_slice(v);
    }
}
