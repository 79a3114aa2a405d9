//! Weights on the device in their GGUF block format, and the launches of `cuda/quant.cu`:
//! dequantizing GEMV (decode), tensor-core GEMM (prefill), the naive GEMV baseline and the
//! embedding lookup. Each matches `backend::cpu::reference::matmul` / `Tensor::dequantize_row`.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::ffi::{
    KvEmbedParams, KvMatmulParams, KV_EMBED_THREADS, KV_GEMM_THREADS, KV_GEMM_TILE_ROWS, KV_GEMM_TILE_TOKENS,
    KV_GEMV_MAX_TOKENS, KV_GEMV_NAIVE_THREADS, KV_GEMV_ROWS_PER_WARP, KV_GEMV_WARPS, KV_UNIT_ELEMS, KV_WEIGHT_PAD,
};
use super::layers::{check_len, launch_error, to_u32};
use super::CudaRuntime;
use crate::format::quant::GgmlType;
use crate::model::weights::Tensor;

/// The types with typed kernels, by the suffix of their kernel names.
pub(super) const KERNEL_TYPES: [(&str, GgmlType); 11] = [
    ("f32", GgmlType::F32),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("q8_0", GgmlType::Q8_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q5_0", GgmlType::Q5_0),
    ("q5_1", GgmlType::Q5_1),
    ("q4_k", GgmlType::Q4K),
    ("q5_k", GgmlType::Q5K),
    ("q6_k", GgmlType::Q6K),
];

/// Which matrix kernel a product uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// The tensor-core GEMM for more than KV_GEMV_MAX_TOKENS tokens, else the GEMV.
    Auto,
    /// The GEMV, in groups of up to KV_GEMV_MAX_TOKENS tokens.
    Gemv,
    /// The tensor-core GEMM whatever the token count.
    Gemm,
    /// The one-thread-per-row baseline.
    Naive,
}

/// A weight matrix on the device, its bytes exactly as in the GGUF file.
pub struct DeviceWeight {
    pub name: String,
    pub ty: GgmlType,
    pub n_cols: usize,
    pub n_rows: usize,
    pub row_bytes: usize,
    /// `n_rows * row_bytes` bytes, padded (ffi/quant.h KV_WEIGHT_PAD).
    pub data: CudaSlice<u8>,
}

impl DeviceWeight {
    /// Bytes allocated for a matrix of `n_bytes` bytes (padding included).
    pub fn padded_bytes(n_bytes: usize) -> usize {
        let pad = KV_WEIGHT_PAD as usize;
        n_bytes.div_ceil(pad) * pad + pad
    }

    /// Checks that the kernels can read `t` (its type and row length), with an error naming it.
    pub fn check_shape(name: &str, ty: GgmlType, n_cols: usize) -> Result<()> {
        if !KERNEL_TYPES.iter().any(|(_, t)| *t == ty) {
            bail!("tensor {name}: type {ty} has no CUDA kernel");
        }
        if n_cols == 0 || n_cols % KV_UNIT_ELEMS as usize != 0 || n_cols % ty.block_elems() != 0 {
            bail!(
                "tensor {name}: rows of {n_cols} values; the CUDA kernels need a multiple of {} for {ty}",
                (KV_UNIT_ELEMS as usize).max(ty.block_elems())
            );
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

impl CudaRuntime {
    /// Uploads a matrix as stored (no conversion).
    pub fn upload_weight(&self, t: &Tensor) -> Result<DeviceWeight> {
        DeviceWeight::check_shape(&t.name, t.ty, t.n_cols)?;
        let bytes = t.data();
        let mut data = self
            .zeros::<u8>(DeviceWeight::padded_bytes(bytes.len()))
            .with_context(|| format!("uploading tensor {} ({} bytes)", t.name, bytes.len()))?;
        self.stream
            .memcpy_htod(bytes, &mut data.slice_mut(..bytes.len()))
            .with_context(|| format!("copying tensor {} to the device", t.name))?;
        Ok(DeviceWeight { name: t.name.clone(), ty: t.ty, n_cols: t.n_cols, n_rows: t.n_rows, row_bytes: t.row_bytes(), data })
    }

    /// `out[t, r] = sum_c w[r, c] * x[t, c]` for `n_tokens` rows of x (`reference::matmul`).
    pub fn matmul<X, O>(&self, w: &DeviceWeight, x: &X, n_tokens: usize, out: &mut O, kernel: MatmulKernel) -> Result<()>
    where
        X: DevicePtr<f32>,
        O: DevicePtrMut<f32>,
    {
        let k = match kernel {
            MatmulKernel::Naive => "kv_gemv_naive",
            MatmulKernel::Gemm => "kv_gemm",
            _ => "kv_gemv",
        };
        check_len(k, "x", x.len(), n_tokens * w.n_cols)?;
        check_len(k, "out", out.len(), n_tokens * w.n_rows)?;
        if n_tokens == 0 || w.n_rows == 0 {
            return Ok(());
        }
        let stream = &*self.stream;
        let (xp, _xg) = x.device_ptr(stream);
        let (op, _og) = out.device_ptr_mut(stream);
        let (wp, _wg) = w.data.device_ptr(stream);
        if xp % 16 != 0 || op % 16 != 0 || wp % 16 != 0 {
            bail!("{k} ({}): x, out and the weights must be 16-byte aligned", w.name);
        }
        let (t1, t4, gemm) = self.model.matmul.get(&w.ty.id()).with_context(|| format!("{k}: no kernel for type {}", w.ty))?;
        let params = |n: usize| -> Result<KvMatmulParams> {
            Ok(KvMatmulParams {
                n_rows: to_u32(k, "n_rows", w.n_rows)?,
                n_cols: to_u32(k, "n_cols", w.n_cols)?,
                n_tokens: to_u32(k, "n_tokens", n)?,
                row_bytes: to_u32(k, "row_bytes", w.row_bytes)?,
                type_: w.ty.id(),
            })
        };
        let max_gemv = KV_GEMV_MAX_TOKENS as usize;
        let use_gemm = match kernel {
            MatmulKernel::Auto => n_tokens > max_gemv,
            MatmulKernel::Gemm => true,
            _ => false,
        };
        if kernel == MatmulKernel::Naive {
            let p = params(n_tokens)?;
            let cfg = LaunchConfig {
                grid_dim: (w.n_rows.div_ceil(KV_GEMV_NAIVE_THREADS as usize) as u32, 1, 1),
                block_dim: (KV_GEMV_NAIVE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&self.model.gemv_naive);
            launch.arg(&wp).arg(&xp).arg(&op).arg(&p);
            // SAFETY: (const uint8_t *w, const float *x, float *y, params); lengths checked above.
            unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        } else if use_gemm {
            let p = params(n_tokens)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    w.n_rows.div_ceil(KV_GEMM_TILE_ROWS as usize) as u32,
                    to_u32(k, "token tiles", n_tokens.div_ceil(KV_GEMM_TILE_TOKENS as usize))?,
                    1,
                ),
                block_dim: (KV_GEMM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            if cfg.grid_dim.1 > 65_535 {
                bail!("{k}: {n_tokens} tokens exceed the grid's y limit");
            }
            let mut launch = stream.launch_builder(gemm);
            launch.arg(&wp).arg(&xp).arg(&op).arg(&p);
            // SAFETY: as above.
            unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        } else {
            let rows_per_block = (KV_GEMV_WARPS * KV_GEMV_ROWS_PER_WARP) as usize;
            let cfg = LaunchConfig {
                grid_dim: (w.n_rows.div_ceil(rows_per_block) as u32, 1, 1),
                block_dim: (KV_GEMV_WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut t0 = 0;
            while t0 < n_tokens {
                let n = (n_tokens - t0).min(max_gemv);
                let p = params(n)?;
                let func = if n == 1 { t1 } else { t4 };
                let xt = xp + (t0 * w.n_cols * 4) as u64;
                let ot = op + (t0 * w.n_rows * 4) as u64;
                let mut launch = stream.launch_builder(func);
                launch.arg(&wp).arg(&xt).arg(&ot).arg(&p);
                // SAFETY: as above; x and out advance by whole rows (16-byte multiples since
                // n_cols is a multiple of 32, and out only needs 4-byte alignment).
                unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
                t0 += n;
            }
        }
        Ok(())
    }

    /// `out[t, :] = table[tokens[t], :]`, dequantized (`Tensor::dequantize_row`).
    pub fn embed<O>(&self, table: &DeviceWeight, tokens: &[u32], out: &mut O) -> Result<()>
    where
        O: DevicePtrMut<f32>,
    {
        let k = "kv_embed";
        check_len(k, "out", out.len(), tokens.len() * table.n_cols)?;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= table.n_rows) {
            bail!("{k}: token id {bad} is outside the vocabulary of {}", table.n_rows);
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let p = KvEmbedParams {
            n_tokens: to_u32(k, "n_tokens", tokens.len())?,
            n_cols: to_u32(k, "n_cols", table.n_cols)?,
            row_bytes: to_u32(k, "row_bytes", table.row_bytes)?,
            type_: table.ty.id(),
        };
        let d_tokens = self.upload(tokens)?;
        let stream = &*self.stream;
        let (op, _og) = out.device_ptr_mut(stream);
        if op % 16 != 0 {
            bail!("{k}: out must be 16-byte aligned");
        }
        let (wp, _wg) = table.data.device_ptr(stream);
        let (tp, _tg) = d_tokens.device_ptr(stream);
        let cfg = LaunchConfig { grid_dim: (p.n_tokens, 1, 1), block_dim: (KV_EMBED_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&self.model.embed);
        launch.arg(&wp).arg(&tp).arg(&op).arg(&p);
        // SAFETY: (const uint8_t *table, const uint32_t *tokens, float *out, params); token ids
        // and lengths checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
        Ok(())
    }
}
