//! CPU backends: `reference` (plain loops, the oracle) and `fast` (SIMD and threads), behind one
//! [`Cpu`] type that implements [`Backend`] with the kernels its [`CpuKind`] names.

pub mod fast;
pub mod packed;
pub mod pool;
pub mod reference;

use anyhow::{bail, Result};
use half::f16;

use crate::backend::cpu::reference::RopeParams;
use crate::backend::Backend;
use crate::kv::codec::KvBytes;
use crate::kv::strategy::{StrategyLayer, StrategySpec};
use crate::kv::Fp16Layer;
use crate::model::weights::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKind {
    Reference,
    Fast,
}

pub struct Cpu {
    pub kind: CpuKind,
}

impl Cpu {
    pub fn reference() -> Cpu {
        Cpu { kind: CpuKind::Reference }
    }

    pub fn fast() -> Cpu {
        Cpu { kind: CpuKind::Fast }
    }
}

/// A weight matrix as the CPU backend holds it: the tensor as stored and, for a Q4_0 matrix the
/// fast backend multiplies with AVX-512 VNNI, the same blocks repacked 16 rows at a time
/// ([`packed`]). Only memory-mapped tensors are repacked, and their mapped pages are then
/// released: the matmul reads only the repacked copy, so the weights stay resident once.
pub struct CpuWeight {
    pub tensor: Tensor,
    pub packed: Option<packed::PackedQ4_0>,
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        bail!("{what}: buffer of {have} values, the op needs {need}");
    }
    Ok(())
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type KvLayer = CpuKv;

    fn describe(&self) -> String {
        match self.kind {
            CpuKind::Reference => "cpu-reference".to_string(),
            CpuKind::Fast => format!("cpu-fast ({} threads, {})", pool::n_threads(), fast::simd_level()),
        }
    }

    fn alloc(&self, n: usize) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        if v.try_reserve_exact(n).is_err() {
            bail!("cannot allocate {n} f32 values");
        }
        v.resize(n, 0.0);
        Ok(v)
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, buf: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        check_len("download", buf.len(), out.len())?;
        out.copy_from_slice(&buf[..out.len()]);
        Ok(())
    }

    fn weight(&self, t: &Tensor) -> Result<CpuWeight> {
        // Only a mapped tensor is repacked: its pages can be released, while owned bytes (a
        // model quantized in memory) stay held by the model and would be counted twice.
        let repack = self.kind == CpuKind::Fast
            && fast::detected_simd() != fast::Simd::Scalar
            && t.is_mapped()
            && packed::PackedQ4_0::fits(t);
        if !repack {
            return Ok(CpuWeight { tensor: t.clone(), packed: None });
        }
        let p = packed::PackedQ4_0::new(t)?;
        t.release_pages();
        Ok(CpuWeight { tensor: t.clone(), packed: Some(p) })
    }

    fn table(&self, t: &Tensor) -> Result<CpuWeight> {
        Ok(CpuWeight { tensor: t.clone(), packed: None })
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let table = &table.tensor;
        let d = table.n_cols;
        check_len("embed", out.len(), tokens.len() * d)?;
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= table.n_rows {
                bail!("token id {id} is outside the vocabulary of {}", table.n_rows);
            }
            table.dequantize_row(id as usize, &mut out[t * d..(t + 1) * d])?;
        }
        Ok(())
    }

    fn copy_rows(&self, src: &Vec<f32>, row0: usize, n_rows: usize, row_len: usize, dst: &mut Vec<f32>) -> Result<()> {
        let n = n_rows * row_len;
        check_len("copy_rows src", src.len(), (row0 + n_rows) * row_len)?;
        check_len("copy_rows dst", dst.len(), n)?;
        dst[..n].copy_from_slice(&src[row0 * row_len..row0 * row_len + n]);
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32, n_rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let n = n_rows * dim;
        check_len("rmsnorm", x.len().min(out.len()), n)?;
        match self.kind {
            CpuKind::Reference => reference::rmsnorm(&x[..n], &w[..dim], eps, &mut out[..n]),
            CpuKind::Fast => fast::rmsnorm(&x[..n], &w[..dim], eps, &mut out[..n]),
        }
        Ok(())
    }

    fn matmul(&self, w: &CpuWeight, x: &Vec<f32>, n_tokens: usize, out: &mut Vec<f32>) -> Result<()> {
        let (p, w) = (&w.packed, &w.tensor);
        check_len("matmul x", x.len(), n_tokens * w.n_cols)?;
        check_len("matmul out", out.len(), n_tokens * w.n_rows)?;
        match (self.kind, p) {
            (CpuKind::Reference, _) => reference::matmul(w, &x[..n_tokens * w.n_cols], n_tokens, out),
            (CpuKind::Fast, Some(p)) => packed::matmul(p, &x[..n_tokens * w.n_cols], n_tokens, out),
            (CpuKind::Fast, None) => fast::matmul(w, &x[..n_tokens * w.n_cols], n_tokens, out),
        }
    }

    fn add_bias(&self, x: &mut Vec<f32>, b: &Vec<f32>, width: usize, n_tokens: usize) -> Result<()> {
        check_len("add_bias", x.len(), width * n_tokens)?;
        for row in x[..width * n_tokens].chunks_exact_mut(width) {
            reference::add(row, &b[..width]);
        }
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, n_tokens: usize, pos0: usize, p: &RopeParams) -> Result<()> {
        let n = n_tokens * p.n_heads * p.head_dim;
        check_len("rope", x.len(), n)?;
        match self.kind {
            CpuKind::Reference => reference::rope(&mut x[..n], pos0, p),
            CpuKind::Fast => fast::rope(&mut x[..n], pos0, p),
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, n: usize) -> Result<()> {
        check_len("silu_mul", gate.len().min(up.len()), n)?;
        match self.kind {
            CpuKind::Reference => reference::silu_mul(&mut gate[..n], &up[..n]),
            CpuKind::Fast => fast::silu_mul(&mut gate[..n], &up[..n]),
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) -> Result<()> {
        check_len("add", x.len().min(y.len()), n)?;
        reference::add(&mut x[..n], &y[..n]);
        Ok(())
    }

    fn kv_layer(&self, spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, capacity: usize, layer: usize) -> Result<CpuKv> {
        if spec.is_plain() {
            Ok(CpuKv::Plain(Fp16Layer::new(n_kv_heads, head_dim, capacity)?))
        } else {
            Ok(CpuKv::Strategy(Box::new(StrategyLayer::new(spec, n_kv_heads, head_dim, capacity, layer)?)))
        }
    }

    fn kv_append(&self, layer: &mut CpuKv, k: &Vec<f32>, v: &Vec<f32>, n_tokens: usize) -> Result<()> {
        let (heads, hd) = match layer {
            CpuKv::Plain(l) => (l.n_kv_heads, l.head_dim),
            CpuKv::Strategy(l) => (l.n_kv_heads, l.head_dim),
        };
        let n = n_tokens * heads * hd;
        check_len("kv_append", k.len().min(v.len()), n)?;
        match layer {
            CpuKv::Plain(l) => l.append(&k[..n], &v[..n], n_tokens),
            CpuKv::Strategy(l) => l.append(&k[..n], &v[..n], n_tokens),
        }
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        layer: &mut CpuKv,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let n = n_tokens * n_heads * head_dim;
        check_len("attention", q.len().min(out.len()), n)?;
        match layer {
            CpuKv::Plain(l) => {
                if n_tokens > l.n_tokens || head_dim != l.head_dim || n_heads % l.n_kv_heads != 0 {
                    bail!(
                        "attention: {n_tokens} queries x {n_heads} heads of {head_dim} against a cache of {} tokens x {} heads of {}",
                        l.n_tokens,
                        l.n_kv_heads,
                        l.head_dim
                    );
                }
                match self.kind {
                    CpuKind::Reference => reference::attention(&q[..n], l, n_tokens, n_heads, head_dim, &mut out[..n], None),
                    CpuKind::Fast => fast::attention(&q[..n], l, n_tokens, n_heads, head_dim, &mut out[..n], None),
                }
            }
            CpuKv::Strategy(l) => {
                if head_dim != l.head_dim || n_heads % l.n_kv_heads != 0 {
                    bail!("attention: {n_heads} heads of {head_dim} against {} KV heads of {}", l.n_kv_heads, l.head_dim);
                }
                l.attention(&q[..n], n_tokens, n_heads, &mut out[..n]);
            }
        }
        Ok(())
    }

    fn kv_finish_step(&self, layer: &mut CpuKv, n_new: usize, pos0: usize, prompt_len: usize) -> Result<()> {
        match layer {
            CpuKv::Plain(_) => Ok(()),
            CpuKv::Strategy(l) => {
                l.prompt_len = prompt_len;
                l.finish_step(n_new, pos0)
            }
        }
    }

    fn kv_bytes(&self, layer: &CpuKv) -> KvBytes {
        match layer {
            CpuKv::Plain(l) => KvBytes { fp16: l.bytes(), ..KvBytes::default() },
            CpuKv::Strategy(l) => l.bytes(),
        }
    }

    fn kv_len(&self, layer: &CpuKv) -> usize {
        match layer {
            CpuKv::Plain(l) => l.n_tokens,
            CpuKv::Strategy(l) => l.n_seen,
        }
    }

    fn kv_truncate(&self, layer: &mut CpuKv, n_tokens: usize) -> Result<()> {
        match layer {
            CpuKv::Plain(l) => {
                l.truncate(n_tokens);
                Ok(())
            }
            CpuKv::Strategy(l) if n_tokens == 0 => l.reset(),
            CpuKv::Strategy(l) if n_tokens >= l.n_seen => Ok(()),
            CpuKv::Strategy(..) => bail!("a compressed or evicting cache can only be emptied, not cut at position {n_tokens}"),
        }
    }

    fn kv_clone(&self, layer: &CpuKv) -> Result<CpuKv> {
        Ok(layer.clone())
    }

    /// Host memory copy bandwidth on the backend's thread pool: 256 MiB copied between two buffers, best of
    /// 5, as (bytes read + bytes written) / time, the convention of the CUDA figure.
    fn copy_bandwidth_gb_s(&self) -> Result<Option<f64>> {
        Ok(Some(host_copy_bandwidth_gb_s(256 << 20, 5)))
    }
}

/// A CPU layer cache: the plain fp16 cache (the `fp16` strategy, with llama.cpp's attention
/// arithmetic), or a policy over a codec.
#[derive(Clone)]
pub enum CpuKv {
    Plain(Fp16Layer),
    Strategy(Box<StrategyLayer>),
}

/// f16 to f32 for a slice (used by the fast attention).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Copies `bytes` between two buffers `reps` times in parallel chunks and returns the best
/// (read + written) bytes per second / 1e9.
pub fn host_copy_bandwidth_gb_s(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).collect();
    let mut dst = vec![0u64; n];
    let chunk = n.div_ceil(pool::n_threads() * 4).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        pool::for_each_chunk_mut(&mut dst, chunk, |i, d| d.copy_from_slice(&src[i * chunk..][..d.len()]));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * (n * 8) as f64 / best / 1e9
}
