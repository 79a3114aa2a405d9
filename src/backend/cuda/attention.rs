//! Launches of `cuda/attention.cu`: attention over an fp16 cache `[n_kv_heads, capacity,
//! head_dim]` (K and V, f16) with per-head lengths, the optional attention-mass output, and the
//! cache's append. `reference::attention` is the oracle.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::f16;

use super::ffi::{
    KvAppendParams, KvAttnParams, KV_ATTN_AUX_THREADS, KV_ATTN_DECODE_MAX_TOKENS, KV_ATTN_MAX_KV_HEADS,
    KV_ATTN_PREFILL_QUERIES, KV_ATTN_SPLIT_MULTIPLE, KV_ATTN_WARPS,
};
use super::layers::{check_len, launch_error, to_u32};
use super::CudaRuntime;

/// Head sizes with typed attention kernels.
pub(super) const HEAD_DIMS: [usize; 2] = [64, 128];

/// Decode blocks per multiprocessor the split count aims for.
const BLOCKS_PER_SM: usize = 4;

/// The geometry of one layer's fp16 cache and of the queries against it.
#[derive(Clone, Debug)]
pub struct AttnShape<'a> {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Tokens each KV head holds (the queries' own tokens included).
    pub len: &'a [usize],
}

/// Which attention kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Split (decode) kernel for up to KV_ATTN_DECODE_MAX_TOKENS queries, flash (prefill) above.
    Auto,
    /// The split kernel whatever the query count.
    Decode,
    /// The flash kernel whatever the query count.
    Prefill,
    /// The one-warp-per-query baseline (no mass output).
    Naive,
}

/// How a decode launch cuts the context: (n_splits, split_len).
pub fn decode_splits(n_rows: usize, max_len: usize, multiprocessors: usize) -> (usize, usize) {
    let target_blocks = BLOCKS_PER_SM * multiprocessors.max(1);
    let want_splits = target_blocks.div_ceil(n_rows.max(1)).max(1);
    let m = KV_ATTN_SPLIT_MULTIPLE as usize;
    let split_len = max_len.div_ceil(want_splits).div_ceil(m).max(1) * m;
    (max_len.div_ceil(split_len).max(1), split_len)
}

impl AttnShape<'_> {
    fn params(&self, k: &str) -> Result<KvAttnParams> {
        let s = self;
        if s.n_kv_heads == 0 || s.n_kv_heads > KV_ATTN_MAX_KV_HEADS as usize {
            bail!("{k}: {} KV heads; the kernels take 1 to {KV_ATTN_MAX_KV_HEADS}", s.n_kv_heads);
        }
        if s.len.len() != s.n_kv_heads {
            bail!("{k}: {} head lengths for {} KV heads", s.len.len(), s.n_kv_heads);
        }
        if s.n_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
            bail!("{k}: {} query heads is not a multiple of {} KV heads", s.n_heads, s.n_kv_heads);
        }
        if let Some(&l) = s.len.iter().find(|&&l| l < s.n_tokens || l > s.capacity) {
            bail!("{k}: a KV head holds {l} tokens; it must hold the {} queries' own and at most {}", s.n_tokens, s.capacity);
        }
        let mut len = [0u32; KV_ATTN_MAX_KV_HEADS as usize];
        for (d, &l) in len.iter_mut().zip(s.len) {
            *d = to_u32(k, "len", l)?;
        }
        let max_len = s.len.iter().copied().max().unwrap_or(0);
        to_u32(k, "n_tokens * n_heads", s.n_tokens * s.n_heads)?;
        Ok(KvAttnParams {
            n_tokens: to_u32(k, "n_tokens", s.n_tokens)?,
            n_heads: to_u32(k, "n_heads", s.n_heads)?,
            n_kv_heads: to_u32(k, "n_kv_heads", s.n_kv_heads)?,
            head_dim: to_u32(k, "head_dim", s.head_dim)?,
            capacity: to_u32(k, "capacity", s.capacity)?,
            n_splits: 1,
            split_len: to_u32(k, "max_len", max_len.max(1))?,
            score_stride: to_u32(k, "max_len", max_len.max(1))?,
            mass_stride: 0,
            max_len: to_u32(k, "max_len", max_len)?,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            len,
        })
    }
}

fn ptr_of<T, S: DevicePtr<T>>(s: &S, stream: &cudarc::driver::CudaStream) -> u64 {
    s.device_ptr(stream).0
}

impl CudaRuntime {
    /// Writes `n_tokens` tokens of K and V (f32 `[n_tokens, n_kv_heads, head_dim]`) as f16 at
    /// position `len[g]` of every head `g` of the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn cache_append<K: DevicePtr<f32>, V: DevicePtr<f32>>(
        &self,
        kc: &mut CudaSlice<f16>,
        vc: &mut CudaSlice<f16>,
        k: &K,
        v: &V,
        n_tokens: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        len: &[usize],
    ) -> Result<()> {
        let kn = "kv_cache_append";
        if n_kv_heads == 0 || n_kv_heads > KV_ATTN_MAX_KV_HEADS as usize || len.len() != n_kv_heads {
            bail!("{kn}: {n_kv_heads} KV heads ({} lengths); the kernel takes 1 to {KV_ATTN_MAX_KV_HEADS}", len.len());
        }
        let n = n_tokens * n_kv_heads * head_dim;
        check_len(kn, "k", k.len(), n)?;
        check_len(kn, "v", v.len(), n)?;
        check_len(kn, "k cache", kc.len(), n_kv_heads * capacity * head_dim)?;
        check_len(kn, "v cache", vc.len(), n_kv_heads * capacity * head_dim)?;
        if let Some(&l) = len.iter().find(|&&l| l + n_tokens > capacity) {
            bail!("context full: a KV head holds {l} of {capacity} tokens and {n_tokens} more were given (raise --ctx)");
        }
        if n_tokens == 0 {
            return Ok(());
        }
        let mut lens = [0u32; KV_ATTN_MAX_KV_HEADS as usize];
        for (d, &l) in lens.iter_mut().zip(len) {
            *d = to_u32(kn, "len", l)?;
        }
        let p = KvAppendParams {
            n_tokens: to_u32(kn, "n_tokens", n_tokens)?,
            n_kv_heads: n_kv_heads as u32,
            head_dim: to_u32(kn, "head_dim", head_dim)?,
            capacity: to_u32(kn, "capacity", capacity)?,
            len: lens,
        };
        let stream = &*self.stream;
        let (kp, _kg) = k.device_ptr(stream);
        let (vp, _vg) = v.device_ptr(stream);
        let (kcp, _kcg) = kc.device_ptr_mut(stream);
        let (vcp, _vcg) = vc.device_ptr_mut(stream);
        let cfg = LaunchConfig { grid_dim: (p.n_tokens, p.n_kv_heads, 1), block_dim: (KV_ATTN_AUX_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&self.model.cache_append);
        launch.arg(&kp).arg(&vp).arg(&kcp).arg(&vcp).arg(&p);
        // SAFETY: (const float *k, const float *v, half *kc, half *vc, params); lengths and
        // positions checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(kn, &cfg, e))?;
        Ok(())
    }

    /// Causal attention of `q` (`[n_tokens, n_heads, head_dim]` f32) over the fp16 cache `kc`,
    /// `vc` into `out` (same shape); with `mass = Some((m, stride))`, adds the softmax weight
    /// each token received (summed over queries and the query heads of its KV head) to
    /// `m[g * stride + j]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_f16<Q: DevicePtr<f32>, O: DevicePtrMut<f32>>(
        &self,
        kc: &CudaSlice<f16>,
        vc: &CudaSlice<f16>,
        shape: &AttnShape,
        q: &Q,
        out: &mut O,
        mass: Option<(&mut CudaSlice<f32>, usize)>,
        kernel: AttnKernel,
    ) -> Result<()> {
        let kn = "kv_attn";
        let mut p = shape.params(kn)?;
        let s = shape;
        let d = s.head_dim;
        let n_rows = s.n_tokens * s.n_heads;
        check_len(kn, "q", q.len(), n_rows * d)?;
        check_len(kn, "out", out.len(), n_rows * d)?;
        check_len(kn, "k cache", kc.len(), s.n_kv_heads * s.capacity * d)?;
        check_len(kn, "v cache", vc.len(), s.n_kv_heads * s.capacity * d)?;
        let max_len = p.max_len as usize;
        if let Some((m, stride)) = &mass {
            if *stride < max_len {
                bail!("{kn}: mass stride {stride} is below the longest head ({max_len} tokens)");
            }
            check_len(kn, "mass", m.len(), (s.n_kv_heads - 1) * stride + max_len)?;
            p.mass_stride = to_u32(kn, "mass stride", *stride)?;
        }
        if n_rows == 0 {
            return Ok(());
        }
        let stream = &*self.stream;
        let qp = ptr_of(q, stream);
        let (op, _og) = out.device_ptr_mut(stream);
        let kcp = ptr_of(kc, stream);
        let vcp = ptr_of(vc, stream);
        let warps = KV_ATTN_WARPS * 32;

        if kernel == AttnKernel::Naive {
            if mass.is_some() {
                bail!("{kn}: the naive baseline has no mass output");
            }
            if d == 0 || d > 512 {
                bail!("{kn}_naive: head_dim {d} outside 1..=512");
            }
            let cfg = LaunchConfig {
                grid_dim: (n_rows.div_ceil(KV_ATTN_WARPS as usize) as u32, 1, 1),
                block_dim: (warps, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&self.model.attn_naive);
            launch.arg(&qp).arg(&kcp).arg(&vcp).arg(&op).arg(&p);
            // SAFETY: (q, k, v, out, params); shapes checked above.
            unsafe { launch.launch(cfg) }.map_err(|e| launch_error("kv_attn_naive", &cfg, e))?;
            return Ok(());
        }

        let kernels = self
            .model
            .attention
            .get(&d)
            .with_context(|| format!("{kn}: head_dim {d} has no CUDA attention kernel (64 and 128 do)"))?;
        let decode = match kernel {
            AttnKernel::Decode => true,
            AttnKernel::Prefill => false,
            _ => s.n_tokens <= KV_ATTN_DECODE_MAX_TOKENS as usize,
        };
        let (n_splits, split_len) = if decode { decode_splits(n_rows, max_len, self.multiprocessors) } else { (1, max_len.max(1)) };
        p.n_splits = to_u32(kn, "n_splits", n_splits)?;
        p.split_len = to_u32(kn, "split_len", split_len)?;
        let want_mass = mass.is_some();
        // Scratch layout (f32 elements): part_ml [rows * splits * 2] | ml [rows * 2] |
        // part_o [rows * splits * d] | scores [rows * max_len] (mass only). The float2 arrays
        // come first, at even offsets.
        let part_ml = n_rows * n_splits * 2;
        let ml = n_rows * 2;
        let part_o = n_rows * n_splits * d;
        let scores = if want_mass { n_rows * max_len } else { 0 };
        self.with_scratch_f32(part_ml + ml + part_o + scores, |buf| {
            let (base, _bg) = buf.device_ptr_mut(stream);
            let at = |elems: usize| base + (elems * 4) as u64;
            let (pml, mlp, pop, scp) = (at(0), at(part_ml), at(part_ml + ml), at(part_ml + ml + part_o));
            let func = &kernels[usize::from(!decode) * 2 + usize::from(want_mass)];
            let cfg = if decode {
                LaunchConfig { grid_dim: (n_rows as u32, p.n_splits, 1), block_dim: (warps, 1, 1), shared_mem_bytes: 0 }
            } else {
                let tiles = s.n_tokens.div_ceil(KV_ATTN_PREFILL_QUERIES as usize);
                LaunchConfig { grid_dim: (to_u32(kn, "query tiles", tiles)?, p.n_heads, 1), block_dim: (warps, 1, 1), shared_mem_bytes: 0 }
            };
            if cfg.grid_dim.1 > 65_535 {
                bail!("{kn}: grid y of {} exceeds the limit", cfg.grid_dim.1);
            }
            let name = if decode { "kv_attn_decode" } else { "kv_attn_prefill" };
            let mut launch = stream.launch_builder(func);
            launch.arg(&qp).arg(&kcp).arg(&vcp).arg(&pml).arg(&pop).arg(&scp).arg(&p);
            // SAFETY: (q, k, v, part_ml, part_o, scores, params); the scratch holds every
            // partial and, for the mass variant, rows * max_len scores (score_stride = max_len).
            unsafe { launch.launch(cfg) }.map_err(|e| launch_error(name, &cfg, e))?;

            let cfg = LaunchConfig { grid_dim: (n_rows as u32, 1, 1), block_dim: (KV_ATTN_AUX_THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut launch = stream.launch_builder(&self.model.attn_combine);
            launch.arg(&pml).arg(&pop).arg(&op).arg(&mlp).arg(&p);
            // SAFETY: (part_ml, part_o, out, ml, params); sizes as laid out above.
            unsafe { launch.launch(cfg) }.map_err(|e| launch_error("kv_attn_combine", &cfg, e))?;

            if let Some((m, _)) = mass {
                let (mp, _mg) = m.device_ptr_mut(stream);
                let cfg = LaunchConfig {
                    grid_dim: (max_len.div_ceil(KV_ATTN_AUX_THREADS as usize) as u32, p.n_kv_heads, 1),
                    block_dim: (KV_ATTN_AUX_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut launch = stream.launch_builder(&self.model.attn_mass);
                launch.arg(&scp).arg(&mlp).arg(&mp).arg(&p);
                // SAFETY: (scores, ml, mass, params); mass holds n_kv_heads rows of mass_stride
                // (checked above).
                unsafe { launch.launch(cfg) }.map_err(|e| launch_error("kv_attn_mass", &cfg, e))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_cover_the_context() {
        for &(rows, len, sms) in &[(32usize, 4096usize, 132usize), (9, 37, 132), (1, 1, 1), (128, 100_000, 108), (32, 512, 132)] {
            let (n, l) = decode_splits(rows, len, sms);
            assert!(n * l >= len && (n - 1) * l < len.max(1), "{rows} {len}: {n} x {l}");
            assert_eq!(l % KV_ATTN_SPLIT_MULTIPLE as usize, 0);
        }
    }
}
