//! Launch wrappers for the kernels of `cuda/layers.cu`; each matches a function of
//! `backend::cpu::reference` (see that file's header comment for shapes and semantics).
//!
//! Buffers may be [`CudaSlice`](cudarc::driver::CudaSlice)s or views of them and may be longer
//! than the shape needs (only the leading elements are touched). Shapes are explicit arguments;
//! an empty shape is a no-op.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::ffi::{
    KvArgmaxParams, KvBiasParams, KvElementwiseParams, KvRmsnormParams, KvRopeParams, KvRowsParams,
    KV_ELEMENTWISE_THREADS, KV_ELEMENTWISE_VEC, KV_ROPE_NEOX, KV_ROPE_NORM, KV_ROWS_THREADS, KV_ROW_MAX_THREADS,
};
use super::CudaRuntime;
use crate::backend::cpu::reference::{RopeParams, RopeStyle};

/// Shared memory a block may use without opting in, on every supported architecture.
const MAX_STATIC_SHARED_BYTES: usize = 48 * 1024;

/// The scalar part of a rotary embedding; the optional frequency factors are a device buffer
/// passed to [`CudaRuntime::rope`] separately.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeShape {
    pub n_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that rotate; even, at most `head_dim`.
    pub n_rot: usize,
    pub freq_base: f32,
    pub style: RopeStyle,
}

impl RopeShape {
    /// The shape of a CPU [`RopeParams`] (its `freq_factors` must be uploaded separately).
    pub fn of(p: &RopeParams) -> RopeShape {
        RopeShape {
            n_heads: p.n_heads,
            head_dim: p.head_dim,
            n_rot: p.n_rot,
            freq_base: p.freq_base,
            style: p.style,
        }
    }
}

pub(super) fn to_u32(kernel: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| anyhow!("{kernel}: {what} = {v} does not fit the kernel's 32-bit counts"))
}

pub(super) fn elements(kernel: &str, dims: &[(&str, usize)]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &(_, d)| acc.checked_mul(d))
        .ok_or_else(|| {
            let shape: Vec<String> = dims.iter().map(|(n, d)| format!("{n} = {d}")).collect();
            anyhow!("{kernel}: shape {} overflows", shape.join(", "))
        })
}

pub(super) fn check_len(kernel: &str, buffer: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        bail!("{kernel}: buffer `{buffer}` holds {len} elements, the shape needs {needed}");
    }
    Ok(())
}

/// Block size of the row kernels: one thread per work unit of a row, rounded up to whole warps,
/// at most KV_ROW_MAX_THREADS (threads then stride over the row).
fn row_threads(units: usize) -> u32 {
    let max = KV_ROW_MAX_THREADS as usize;
    (units.div_ceil(32) * 32).clamp(32, max) as u32
}

pub(super) fn launch_error(kernel: &str, cfg: &LaunchConfig, e: cudarc::driver::DriverError) -> anyhow::Error {
    anyhow!(
        "launching {kernel} (grid {:?}, block {:?}, {} bytes shared): {e}",
        cfg.grid_dim,
        cfg.block_dim,
        cfg.shared_mem_bytes
    )
}

impl CudaRuntime {
    /// RMSNorm over rows (`reference::rmsnorm`): `x`, `out` are `[n_rows, dim]`, `w` is `[dim]`.
    pub fn rmsnorm<X, W, O>(
        &self,
        x: &X,
        w: &W,
        eps: f32,
        out: &mut O,
        n_rows: usize,
        dim: usize,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        self.rmsnorm_with(
            &self.layers.rmsnorm,
            "kv_rmsnorm_f32",
            x,
            w,
            eps,
            out,
            n_rows,
            dim,
        )
    }

    /// The benchmark baseline of [`CudaRuntime::rmsnorm`]: same result, scalar loads only.
    pub fn rmsnorm_naive<X, W, O>(
        &self,
        x: &X,
        w: &W,
        eps: f32,
        out: &mut O,
        n_rows: usize,
        dim: usize,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        self.rmsnorm_with(
            &self.layers.rmsnorm_naive,
            "kv_rmsnorm_naive_f32",
            x,
            w,
            eps,
            out,
            n_rows,
            dim,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_with<X, W, O>(
        &self,
        func: &CudaFunction,
        k: &str,
        x: &X,
        w: &W,
        eps: f32,
        out: &mut O,
        n_rows: usize,
        dim: usize,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        if dim == 0 {
            bail!("{k}: dim must be at least 1");
        }
        let n = elements(k, &[("n_rows", n_rows), ("dim", dim)])?;
        check_len(k, "x", x.len(), n)?;
        check_len(k, "w", w.len(), dim)?;
        check_len(k, "out", out.len(), n)?;
        if n_rows == 0 {
            return Ok(());
        }
        let p = KvRmsnormParams {
            n_rows: to_u32(k, "n_rows", n_rows)?,
            dim: to_u32(k, "dim", dim)?,
            eps,
        };
        let units = if dim % 4 == 0 { dim / 4 } else { dim };
        let cfg = LaunchConfig {
            grid_dim: (p.n_rows, 1, 1),
            block_dim: (row_threads(units), 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = &*self.stream;
        let (xp, _xg) = x.device_ptr(stream);
        let (wp, _wg) = w.device_ptr(stream);
        let (op, _og) = out.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(func);
        launch.arg(&xp).arg(&wp).arg(&op).arg(&p);
        // SAFETY: argument types and order match the kernel; lengths were checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }

    /// RoPE in place (`reference::rope`): `x` is `[n_tokens, n_heads, head_dim]`, token `t` at
    /// position `pos0 + t`; `freq_factors`, when given, is `[n_rot / 2]`.
    pub fn rope<X>(
        &self,
        x: &mut X,
        n_tokens: usize,
        pos0: usize,
        shape: &RopeShape,
        freq_factors: Option<&CudaSlice<f32>>,
    ) -> Result<()>
    where
        X: DevicePtrMut<f32>,
    {
        let k = "kv_rope_f32";
        let s = shape;
        if s.n_heads == 0 || s.head_dim == 0 {
            bail!(
                "{k}: n_heads ({}) and head_dim ({}) must be at least 1",
                s.n_heads,
                s.head_dim
            );
        }
        if s.n_rot == 0 || s.n_rot % 2 != 0 || s.n_rot > s.head_dim {
            bail!(
                "{k}: n_rot = {} must be even, at least 2 and at most head_dim = {}",
                s.n_rot,
                s.head_dim
            );
        }
        let shared_bytes = s.n_rot * std::mem::size_of::<f32>();
        if shared_bytes > MAX_STATIC_SHARED_BYTES {
            bail!("{k}: n_rot = {} needs {shared_bytes} bytes of shared memory, over {MAX_STATIC_SHARED_BYTES}", s.n_rot);
        }
        if !(s.freq_base.is_finite() && s.freq_base > 0.0) {
            bail!(
                "{k}: freq_base = {} must be finite and positive",
                s.freq_base
            );
        }
        let row = elements(k, &[("n_heads", s.n_heads), ("head_dim", s.head_dim)])?;
        to_u32(k, "n_heads * head_dim", row)?;
        let n = elements(k, &[("n_tokens", n_tokens), ("n_heads * head_dim", row)])?;
        check_len(k, "x", x.len(), n)?;
        if let Some(f) = freq_factors {
            check_len(k, "freq_factors", f.len(), s.n_rot / 2)?;
        }
        let last_pos = pos0.checked_add(n_tokens.saturating_sub(1));
        if last_pos.is_none_or(|p| p > u32::MAX as usize) {
            bail!("{k}: positions {pos0}..{pos0}+{n_tokens} exceed the kernel's 32-bit positions");
        }
        if n_tokens == 0 {
            return Ok(());
        }
        let p = KvRopeParams {
            n_tokens: to_u32(k, "n_tokens", n_tokens)?,
            n_heads: to_u32(k, "n_heads", s.n_heads)?,
            head_dim: to_u32(k, "head_dim", s.head_dim)?,
            n_rot: to_u32(k, "n_rot", s.n_rot)?,
            pos0: to_u32(k, "pos0", pos0)?,
            style: match s.style {
                RopeStyle::Norm => KV_ROPE_NORM,
                RopeStyle::Neox => KV_ROPE_NEOX,
            },
            has_freq_factors: u32::from(freq_factors.is_some()),
            freq_base: s.freq_base,
        };
        let cfg = LaunchConfig {
            grid_dim: (p.n_tokens, 1, 1),
            block_dim: (row_threads(s.n_heads * (s.n_rot / 2)), 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        let stream = &*self.stream;
        let (xp, _xg) = x.device_ptr_mut(stream);
        let factors = freq_factors.map(|f| f.device_ptr(stream));
        let fp: u64 = factors.as_ref().map_or(0, |(ptr, _)| *ptr);
        let mut launch = stream.launch_builder(&self.layers.rope);
        launch.arg(&xp).arg(&fp).arg(&p);
        // SAFETY: argument types and order match the kernel; lengths were checked above; the
        // kernel reads freq_factors only when has_freq_factors is set.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }

    /// SwiGLU's gate in place (`reference::silu_mul`): `gate = silu(gate) * up`, both `[n]`.
    pub fn silu_mul<G, U>(&self, gate: &mut G, up: &U, n: usize) -> Result<()>
    where
        G: DevicePtrMut<f32>,
        U: DevicePtr<f32>,
    {
        self.launch_in_place("kv_silu_mul_f32", &self.layers.silu_mul, ("gate", gate), ("up", up), n)
    }

    /// Residual add in place (`reference::add`): `x += y`, both `[n]`.
    pub fn add<X, Y>(&self, x: &mut X, y: &Y, n: usize) -> Result<()>
    where
        X: DevicePtrMut<f32>,
        Y: DevicePtr<f32>,
    {
        self.launch_in_place("kv_add_f32", &self.layers.add, ("x", x), ("y", y), n)
    }

    /// Launches an elementwise kernel `(a, b, params)` that updates `a[..n]` from `b[..n]`.
    fn launch_in_place<A, B>(
        &self,
        k: &str,
        func: &CudaFunction,
        (a_name, a): (&str, &mut A),
        (b_name, b): (&str, &B),
        n: usize,
    ) -> Result<()>
    where
        A: DevicePtrMut<f32>,
        B: DevicePtr<f32>,
    {
        check_len(k, a_name, a.len(), n)?;
        check_len(k, b_name, b.len(), n)?;
        let p = KvElementwiseParams {
            n: to_u32(k, "n", n)?,
        };
        if n == 0 {
            return Ok(());
        }
        let stream = &*self.stream;
        let cfg = elementwise_config(n);
        let (ap, _ag) = a.device_ptr_mut(stream);
        let (bp, _bg) = b.device_ptr(stream);
        let mut launch = stream.launch_builder(func);
        launch.arg(&ap).arg(&bp).arg(&p);
        // SAFETY: both elementwise kernels take (float *a, const float *b, params) in this order;
        // lengths were checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }

    /// Index of the largest value of each row, the first on ties (`reference::argmax` per row):
    /// `x` is `[n_rows, n_cols]`, `out` is `[n_rows]`.
    pub fn argmax<X, O>(&self, x: &X, out: &mut O, n_rows: usize, n_cols: usize) -> Result<()>
    where
        X: DevicePtr<f32>,
        O: DevicePtrMut<u32>,
    {
        let k = "kv_argmax_f32";
        if n_cols == 0 {
            bail!("{k}: rows must hold at least one value");
        }
        let n = elements(k, &[("n_rows", n_rows), ("n_cols", n_cols)])?;
        check_len(k, "x", x.len(), n)?;
        check_len(k, "out", out.len(), n_rows)?;
        if n_rows == 0 {
            return Ok(());
        }
        let p = KvArgmaxParams {
            n_rows: to_u32(k, "n_rows", n_rows)?,
            n_cols: to_u32(k, "n_cols", n_cols)?,
        };
        let units = if n_cols % 4 == 0 { n_cols / 4 } else { n_cols };
        let cfg = LaunchConfig {
            grid_dim: (p.n_rows, 1, 1),
            block_dim: (row_threads(units), 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = &*self.stream;
        let (xp, _xg) = x.device_ptr(stream);
        let (op, _og) = out.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(&self.layers.argmax);
        launch.arg(&xp).arg(&op).arg(&p);
        // SAFETY: argument types and order match the kernel; lengths were checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }
}

impl CudaRuntime {
    /// `x[r, :] += b` for `n_rows` rows of `width` values (`Cpu::add_bias`).
    pub fn add_bias<X, B>(&self, x: &mut X, b: &B, width: usize, n_rows: usize) -> Result<()>
    where
        X: DevicePtrMut<f32>,
        B: DevicePtr<f32>,
    {
        let k = "kv_add_bias_f32";
        let n = elements(k, &[("n_rows", n_rows), ("width", width)])?;
        check_len(k, "x", x.len(), n)?;
        check_len(k, "b", b.len(), width)?;
        if n == 0 {
            return Ok(());
        }
        let p = KvBiasParams { n_rows: to_u32(k, "n_rows", n_rows)?, width: to_u32(k, "width", width)? };
        // Grid-stride: enough blocks to fill the device, no more than the elements need.
        let blocks = n.div_ceil(KV_ELEMENTWISE_THREADS as usize).min(65_535) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (KV_ELEMENTWISE_THREADS, 1, 1), shared_mem_bytes: 0 };
        let stream = &*self.stream;
        let (xp, _xg) = x.device_ptr_mut(stream);
        let (bp, _bg) = b.device_ptr(stream);
        let mut launch = stream.launch_builder(&self.model.add_bias);
        launch.arg(&xp).arg(&bp).arg(&p);
        // SAFETY: (float *x, const float *b, params); lengths checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }

    /// `dst` row `i` = `src` row `idx[i]` for each of `idx`'s `n_rows` entries, rows of
    /// `row_words` 32-bit words. Row indices are checked on the host against `src_rows`.
    pub(crate) fn gather_rows(&self, src: u64, src_rows: usize, dst: u64, dst_rows: usize, idx: &[u32], row_words: usize) -> Result<()> {
        self.move_rows("kv_gather_rows_u32", &self.model.gather_rows, src, src_rows, dst, dst_rows, idx, row_words, true)
    }

    /// `dst` row `idx[i]` = `src` row `i` (the inverse of [`CudaRuntime::gather_rows`]).
    pub(crate) fn scatter_rows(&self, src: u64, src_rows: usize, dst: u64, dst_rows: usize, idx: &[u32], row_words: usize) -> Result<()> {
        self.move_rows("kv_scatter_rows_u32", &self.model.scatter_rows, src, src_rows, dst, dst_rows, idx, row_words, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn move_rows(
        &self,
        k: &str,
        func: &CudaFunction,
        src: u64,
        src_rows: usize,
        dst: u64,
        dst_rows: usize,
        idx: &[u32],
        row_words: usize,
        gather: bool,
    ) -> Result<()> {
        if idx.is_empty() || row_words == 0 {
            return Ok(());
        }
        let (indexed, plain) = if gather { (src_rows, dst_rows) } else { (dst_rows, src_rows) };
        if idx.len() > plain {
            bail!("{k}: {} rows moved, the buffer holds {plain}", idx.len());
        }
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= indexed) {
            bail!("{k}: row index {bad} outside the {indexed} rows of the buffer");
        }
        let p = KvRowsParams { n_rows: to_u32(k, "n_rows", idx.len())?, row_words: to_u32(k, "row_words", row_words)? };
        let d_idx = self.upload(idx)?;
        let cfg = LaunchConfig { grid_dim: (p.n_rows, 1, 1), block_dim: (KV_ROWS_THREADS, 1, 1), shared_mem_bytes: 0 };
        let stream = &*self.stream;
        let (ip, _ig) = d_idx.device_ptr(stream);
        let mut launch = stream.launch_builder(func);
        launch.arg(&src).arg(&dst).arg(&ip).arg(&p);
        // SAFETY: (const uint32_t *src, uint32_t *dst, const uint32_t *idx, params); the caller
        // passes live device buffers of src_rows and dst_rows rows; indices checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }
}

/// One thread per KV_ELEMENTWISE_VEC elements, KV_ELEMENTWISE_THREADS per block.
fn elementwise_config(n: usize) -> LaunchConfig {
    let per_block = (KV_ELEMENTWISE_THREADS * KV_ELEMENTWISE_VEC) as usize;
    LaunchConfig {
        grid_dim: (n.div_ceil(per_block) as u32, 1, 1),
        block_dim: (KV_ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_threads_are_whole_warps_within_bounds() {
        assert_eq!(row_threads(1), 32);
        assert_eq!(row_threads(33), 64);
        assert_eq!(row_threads(1024), 1024);
        assert_eq!(row_threads(100_000), KV_ROW_MAX_THREADS);
    }

    #[test]
    fn elementwise_grid_covers_every_element() {
        for n in [1usize, 4, 1023, 1024, 1025, 11008, 45_088_768] {
            let cfg = elementwise_config(n);
            let covered =
                cfg.grid_dim.0 as usize * cfg.block_dim.0 as usize * KV_ELEMENTWISE_VEC as usize;
            assert!(
                covered >= n
                    && covered - n < (KV_ELEMENTWISE_THREADS * KV_ELEMENTWISE_VEC) as usize
            );
        }
    }

    #[test]
    fn ptxas_report_covers_every_kernel_without_spills() {
        if !super::super::kernels_embedded() {
            return;
        }
        let report = super::super::RESOURCE_USAGE;
        for k in [
            "kv_rmsnorm_f32",
            "kv_rmsnorm_naive_f32",
            "kv_rope_f32",
            "kv_silu_mul_f32",
            "kv_add_f32",
            "kv_argmax_f32",
            "kv_add_bias_f32",
            "kv_gather_rows_u32",
            "kv_gemv_q4_0_t1",
            "kv_gemv_q4_k_t4",
            "kv_gemm_q6_k",
            "kv_gemm_q8_q4_0",
            "kv_gemm_q8_q5_k",
            "kv_embed",
            "kv_attn_decode_d128",
            "kv_attn_decode_d128_mass",
            "kv_attn_prefill_d64_mass",
            "kv_attn_combine",
            "kv_attn_mass",
            "kv_cache_append",
        ] {
            assert!(report.contains(k), "{k} missing from the ptxas report");
        }
        for line in report.lines().filter(|l| l.contains("spill")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            for w in words
                .windows(3)
                .filter(|w| w[1] == "bytes" && w[2].starts_with("spill"))
            {
                assert_eq!(w[0], "0", "register spill: {line}");
            }
        }
    }
}
