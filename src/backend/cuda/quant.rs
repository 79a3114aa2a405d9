//! Weights on the device in their GGUF block format, and the launches of `cuda/quant.cu`:
//! integer GEMV (decode), tensor-core GEMMs (prefill: int8 or f16), the naive GEMV baseline and the
//! embedding lookup. Each matches `backend::cpu::reference::matmul` / `Tensor::dequantize_row`.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::ffi::{
    KvEmbedParams, KvMatmulParams, KV_EMBED_THREADS, KV_GEMM_THREADS, KV_GEMM_TILE_ROWS, KV_GEMM_TILE_TOKENS,
    KV_GEMV_MAX_TOKENS, KV_GEMV_NAIVE_THREADS, KV_GEMV_Q8_ROWS_PER_WARP, KV_GEMV_Q8_WARPS, KV_GEMV_ROWS_PER_WARP,
    KV_GEMV_WARPS, KV_QUANTIZE_THREADS, KV_UNIT_ELEMS, KV_WEIGHT_PAD, KvQ8Sum,
};
use super::layers::{check_len, launch_error, to_u32};
use super::CudaRuntime;
use crate::backend::cpu::fast::{quantize_q8, Q8Row};
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

/// Whether the GEMV of `ty` is the integer one (x quantized to 8 bits in shared memory, dp4a), as
/// opposed to the staged f32 one of the float types.
pub(super) fn gemv_is_integer(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Whether the prefill GEMM of `ty` is the integer one (`kv_gemm_q8_*`: codes times 8-bit
/// activations on int8 tensor cores, as the integer GEMV computes them), as opposed to the f16 one
/// over dequantized tiles that the float types and q6_K use (q6_K's two scales per 32 columns do
/// not fit one int8 product).
pub(super) fn gemm_is_integer(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K)
}

/// 32-bit words of the runtime scratch that holds `n_tokens` rows of `n_cols` values quantized for
/// the integer GEMM (`kv_quantize_q8`): the int8 codes, then one `KvQ8Sum` per 32 values.
pub fn q8_scratch_words(n_cols: usize, n_tokens: usize) -> usize {
    n_tokens * (n_cols + n_cols / KV_UNIT_ELEMS as usize * std::mem::size_of::<KvQ8Sum>()) / 4
}

/// Dynamic shared memory of one integer-GEMV block for `n_tokens` tokens of `n_cols` columns:
/// the int8 codes, then one `KvQ8Sum` per 32 columns (ffi/quant.h).
pub(super) fn gemv_q8_smem_bytes(n_cols: usize, n_tokens: usize) -> usize {
    n_tokens * (n_cols + n_cols / KV_UNIT_ELEMS as usize * std::mem::size_of::<KvQ8Sum>())
}

/// The activation as the integer GEMV quantizes it, back in f32: per 32-value block,
/// `q = rint(x * (127 / amax))` and `d = f16(amax / 127)` (the CPU fast backend's `quantize_q8`),
/// and each value becomes `d * q`. The GEMV computes `W . q8(x)` exactly up to f32 summation, so
/// `reference::matmul` on this is its oracle. `x.len()` must be a multiple of 32.
pub fn q8_roundtrip(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(KV_UNIT_ELEMS as usize) {
        let amax = b.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let d = half::f16::from_f32(amax / 127.0).to_f32();
        out.extend(b.iter().map(|&v| d * (v * id).round_ties_even()));
    }
    out
}

/// What the integer kernels add to `reference::matmul(w, q8_roundtrip(x))` for q4_1 and q5_1,
/// `[n_tokens, n_rows]` in f64 (zeros for the other types). x's 32-block (quantized by the CPU
/// fast backend's `quantize_q8`) meets the weight block's minimum m as `f16(d * sum)`, where the
/// round trip holds `d * sum` exactly: each output moves by the sum over its blocks of
/// `m (f16(d * sum) - d * sum)`. d is the f16-rounded scale (`Q8Row::d`); `Q8Row::s`, llama.cpp's
/// `block_q8_1` value, rounds the product of the unrounded scale instead, one rounding apart.
pub fn q8_1_min_correction(w: &Tensor, x: &[f32], n_tokens: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; n_tokens * w.n_rows];
    if !matches!(w.ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        return out;
    }
    let (data, rb, bb) = (w.data(), w.row_bytes(), w.ty.block_bytes());
    let mut q = Q8Row::default();
    for (t, xt) in x.chunks(w.n_cols).take(n_tokens).enumerate() {
        quantize_q8(xt, &mut q);
        for (b, (&d, &sum)) in q.d.iter().zip(&q.sum).enumerate() {
            let err = f64::from(half::f16::from_f32(d * sum as f32).to_f32()) - f64::from(d) * f64::from(sum);
            for r in 0..w.n_rows {
                let at = r * rb + b * bb + 2;
                let m = half::f16::from_le_bytes([data[at], data[at + 1]]).to_f32();
                out[t * w.n_rows + r] += f64::from(m) * err;
            }
        }
    }
    out
}

/// Which matrix kernel a product uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// The tensor-core GEMM for more than KV_GEMV_MAX_TOKENS tokens, else the GEMV.
    Auto,
    /// The GEMV, in groups of up to KV_GEMV_MAX_TOKENS tokens.
    Gemv,
    /// The prefill's tensor-core GEMM whatever the token count: the integer one where the type
    /// has it (`gemm_is_integer`), else the f16 one.
    Gemm,
    /// The f16 tensor-core GEMM over dequantized tiles whatever the type and token count: the
    /// baseline the integer GEMM is measured against.
    GemmF16,
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
            MatmulKernel::Gemm if gemm_is_integer(w.ty) => "kv_gemm_q8",
            MatmulKernel::Gemm | MatmulKernel::GemmF16 => "kv_gemm",
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
        let (t1, t4, gemm_f16, gemm_q8) = self.model.matmul.get(&w.ty.id()).with_context(|| format!("{k}: no kernel for type {}", w.ty))?;
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
            MatmulKernel::Gemm | MatmulKernel::GemmF16 => true,
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
            match gemm_q8 {
                Some(gemm) if kernel != MatmulKernel::GemmF16 => {
                    // x quantized once into the scratch (codes, then the 32-block sums), then the
                    // integer GEMM over the codes.
                    let n_codes = n_tokens * w.n_cols;
                    self.with_scratch_q8(q8_scratch_words(w.n_cols, n_tokens), |buf| {
                        let (bp, _bg) = buf.device_ptr(stream);
                        let (xq, xs) = (bp, bp + n_codes as u64);
                        let qcfg = LaunchConfig {
                            grid_dim: (to_u32(k, "quantize blocks", (n_codes / KV_UNIT_ELEMS as usize).div_ceil(KV_QUANTIZE_THREADS as usize))?, 1, 1),
                            block_dim: (KV_QUANTIZE_THREADS, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        let mut launch = stream.launch_builder(&self.model.quantize_q8);
                        launch.arg(&xp).arg(&xq).arg(&xs).arg(&p);
                        // SAFETY: (const float *x, int8_t *xq, KvQ8Sum *xs, params): x holds
                        // n_tokens * n_cols values (checked above), the scratch q8_scratch_words
                        // of them quantized; n_codes is a multiple of 32, so xs is 16-byte aligned.
                        unsafe { launch.launch(qcfg) }.map_err(|e| launch_error("kv_quantize_q8", &qcfg, e))?;
                        let mut launch = stream.launch_builder(gemm);
                        launch.arg(&wp).arg(&xq).arg(&xs).arg(&op).arg(&p);
                        // SAFETY: (const uint8_t *w, const int8_t *xq, const KvQ8Sum *xs, float *y,
                        // params), the codes and sums just written; out's length checked above.
                        unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))
                    })?;
                }
                _ => {
                    let mut launch = stream.launch_builder(gemm_f16);
                    launch.arg(&wp).arg(&xp).arg(&op).arg(&p);
                    // SAFETY: as above.
                    unsafe { launch.launch(cfg) }.map_err(|e| launch_error(k, &cfg, e))?;
                }
            }
        } else {
            let integer = gemv_is_integer(w.ty);
            let (warps, rows_per_warp) = if integer {
                (KV_GEMV_Q8_WARPS, KV_GEMV_Q8_ROWS_PER_WARP)
            } else {
                (KV_GEMV_WARPS, KV_GEMV_ROWS_PER_WARP)
            };
            let rows_per_block = (warps * rows_per_warp) as usize;
            // The integer GEMV holds the tokens' quantized x in shared memory: as many tokens per
            // launch as fit the device's limit (at least one for any n_cols up to ~130k on sm_80).
            let group = if integer {
                let fit = self.gemv_smem_max_bytes / gemv_q8_smem_bytes(w.n_cols, 1);
                if fit == 0 {
                    bail!("{k} ({}): rows of {} columns need more shared memory than the device has", w.name, w.n_cols);
                }
                max_gemv.min(fit)
            } else {
                max_gemv
            };
            let mut t0 = 0;
            while t0 < n_tokens {
                let n = (n_tokens - t0).min(group);
                let p = params(n)?;
                let func = if n == 1 { t1 } else { t4 };
                let groups = w.n_rows.div_ceil(rows_per_block);
                let (blocks, smem) = if integer {
                    // The integer GEMV's blocks loop over row groups: no more blocks than the
                    // device holds at once, so each quantizes x once.
                    let smem = gemv_q8_smem_bytes(w.n_cols, n);
                    (groups.min(self.resident_blocks((w.ty.id(), n > 1, smem), func, warps * 32, smem)?), smem)
                } else {
                    (groups, 0)
                };
                let cfg = LaunchConfig {
                    grid_dim: (to_u32(k, "blocks", blocks)?, 1, 1),
                    block_dim: (warps * 32, 1, 1),
                    shared_mem_bytes: to_u32(k, "shared memory", smem)?,
                };
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

/// A host-side emulation of the integer GEMV's per-lane work (`cuda/quant.cu`, `Q8Gemv<TYPE>`):
/// the same lane-unit split of a row, the same byte offsets, aligned word loads with funnel
/// shifts, nibble and bit unpacking, byte-wise dot products and scale arithmetic, written again
/// in Rust, and checked against `format::quant::dequantize` dotted with `q8_roundtrip(x)` in f64.
/// It pins down the index mapping the kernel relies on without a GPU.
#[cfg(test)]
mod emulation {
    use super::{q8_1_min_correction, q8_roundtrip};
    use crate::format::quant::{dequantize, quantize, GgmlType};
    use crate::model::weights::Tensor;
    use crate::rng::Rng;

    /// The quantized activation of one row: codes and, per 32-block, (d, sum), as the kernel's
    /// shared memory holds them.
    struct Q8 {
        q: Vec<i8>,
        d: Vec<f32>,
        sum: Vec<i32>,
    }

    fn quantize_x(x: &[f32]) -> Q8 {
        let mut o = Q8 { q: vec![], d: vec![], sum: vec![] };
        for b in x.chunks(32) {
            let amax = b.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut s = 0;
            for &v in b {
                let q = (v * id).round_ties_even() as i32;
                s += q;
                o.q.push(q as i8);
            }
            o.d.push(half::f16::from_f32(amax / 127.0).to_f32());
            o.sum.push(s);
        }
        o
    }

    /// The matrix bytes as the device holds them (a 16-byte aligned allocation with padding);
    /// offsets below are from the allocation's start, so `off % 4` is the device alignment.
    struct Mem(Vec<u8>);
    impl Mem {
        fn u32_at(&self, off: usize) -> u32 {
            assert_eq!(off % 4, 0, "unaligned 32-bit load at {off}");
            u32::from_le_bytes(self.0[off..off + 4].try_into().unwrap())
        }
        fn u16_at(&self, off: usize) -> u32 {
            assert_eq!(off % 2, 0, "unaligned 16-bit load at {off}");
            u32::from(u16::from_le_bytes([self.0[off], self.0[off + 1]]))
        }
        /// ld_words_2<N>: N words of the bytes at the 2-byte aligned `off`.
        fn words_2(&self, off: usize, n: usize) -> Vec<u32> {
            assert_eq!(off % 2, 0);
            let base = off & !3;
            let sh = ((off & 2) * 8) as u32;
            let v: Vec<u32> = (0..=n).map(|i| self.u32_at(base + 4 * i)).collect();
            (0..n).map(|i| (((u64::from(v[i + 1]) << 32) | u64::from(v[i])) >> sh) as u32).collect()
        }
        /// ld_words_4 / ld_words_16: N words at an aligned `off`.
        fn words_a(&self, off: usize, n: usize, align: usize) -> Vec<u32> {
            assert_eq!(off % align, 0, "unaligned {align}-byte load at {off}");
            (0..n).map(|i| self.u32_at(off + 4 * i)).collect()
        }
    }

    fn q8_1_s(d: f32, sum: i32) -> f32 {
        half::f16::from_f32(d * sum as f32).to_f32()
    }
    fn f16_bits(h: u32) -> f32 {
        half::f16::from_bits((h & 0xFFFF) as u16).to_f32()
    }
    fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        (0..4).fold(c, |s, i| s + i32::from((a >> (8 * i)) as u8 as i8) * i32::from((b >> (8 * i)) as u8 as i8))
    }
    fn vsub4(a: u32, b: u32) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| ((a >> (8 * i)) as u8).wrapping_sub((b >> (8 * i)) as u8)))
    }
    fn spread4(h: u32) -> u32 {
        ((h << 4) & 0x10) | ((h << 11) & 0x1000) | ((h << 18) & 0x10_0000) | ((h << 25) & 0x1000_0000)
    }
    fn x_words(x: &Q8, b: usize) -> [u32; 8] {
        std::array::from_fn(|k| u32::from_le_bytes(std::array::from_fn(|e| x.q[32 * b + 4 * k + e] as u8)))
    }
    fn scale_min(j: usize, s: &[u32]) -> (i32, i32) {
        let byte = |i: usize| (s[i / 4] >> (8 * (i % 4))) & 0xFF;
        if j < 4 {
            ((byte(j) & 63) as i32, (byte(j + 4) & 63) as i32)
        } else {
            (((byte(j + 4) & 0x0F) | ((byte(j - 4) >> 6) << 4)) as i32, ((byte(j + 4) >> 4) | ((byte(j) >> 6) << 4)) as i32)
        }
    }
    fn dot_q5(qs: &[u32], qh: u32, xi: &[u32; 8]) -> i32 {
        let mut s = 0;
        for k in 0..4 {
            s = dp4a((qs[k] & 0x0F0F_0F0F) | spread4(qh >> (4 * k)), xi[k], s);
            s = dp4a(((qs[k] >> 4) & 0x0F0F_0F0F) | spread4(qh >> (4 * k + 16)), xi[k + 4], s);
        }
        s
    }

    /// `n_rows` random rows of `ty` (uniform in [-1, 1]) as the device holds them, and the bytes
    /// of one row.
    fn random_rows(rng: &mut Rng, ty: GgmlType, n_rows: usize, n_cols: usize) -> (Mem, usize) {
        let rb = ty.row_bytes(n_cols).unwrap();
        let mut mem = vec![0u8; (rb * n_rows).div_ceil(16) * 16 + 16];
        let w = rng.vec_uniform(n_rows * n_cols, -1.0, 1.0);
        for r in 0..n_rows {
            quantize(ty, &w[r * n_cols..(r + 1) * n_cols], &mut mem[r * rb..(r + 1) * rb]).unwrap();
        }
        (Mem(mem), rb)
    }

    /// Q8Gemv<TYPE>::load + dot for lane unit `lu` of the row starting at `row`.
    fn lane_unit(ty: GgmlType, m: &Mem, row: usize, lu: usize, x: &Q8) -> f32 {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                let xi = x_words(x, lu);
                let (xd, xsum) = (x.d[lu], x.sum[lu]);
                match ty {
                    GgmlType::Q4_0 => {
                        let b = row + 18 * lu;
                        let (d, qs) = (m.u16_at(b), m.words_2(b + 2, 4));
                        let mut s = 0;
                        for k in 0..4 {
                            s = dp4a(qs[k] & 0x0F0F_0F0F, xi[k], s);
                            s = dp4a((qs[k] >> 4) & 0x0F0F_0F0F, xi[k + 4], s);
                        }
                        (f16_bits(d) * xd) * (s - 8 * xsum) as f32
                    }
                    GgmlType::Q4_1 => {
                        let v = m.words_a(row + 20 * lu, 5, 4);
                        let mut s = 0;
                        for k in 0..4 {
                            s = dp4a(v[k + 1] & 0x0F0F_0F0F, xi[k], s);
                            s = dp4a((v[k + 1] >> 4) & 0x0F0F_0F0F, xi[k + 4], s);
                        }
                        (f16_bits(v[0]) * xd) * s as f32 + f16_bits(v[0] >> 16) * q8_1_s(xd, xsum)
                    }
                    GgmlType::Q5_0 => {
                        let b = row + 22 * lu;
                        let (d, v) = (m.u16_at(b), m.words_2(b + 2, 5));
                        let s = dot_q5(&v[1..], v[0], &xi);
                        (f16_bits(d) * xd) * (s - 16 * xsum) as f32
                    }
                    GgmlType::Q5_1 => {
                        let v = m.words_a(row + 24 * lu, 6, 8);
                        let s = dot_q5(&v[2..], v[1], &xi);
                        (f16_bits(v[0]) * xd) * s as f32 + f16_bits(v[0] >> 16) * q8_1_s(xd, xsum)
                    }
                    _ => {
                        let b = row + 34 * lu;
                        let (d, qs) = (m.u16_at(b), m.words_2(b + 2, 8));
                        let s = (0..8).fold(0, |s, k| dp4a(qs[k], xi[k], s));
                        (f16_bits(d) * xd) * s as f32
                    }
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let five = ty == GgmlType::Q5K;
                let bb = if five { 176 } else { 144 };
                let b = row + bb * (lu / 4);
                let c = lu % 4;
                let head = m.words_a(b, 4, 16);
                let qh = if five { m.words_a(b + 16, 8, 16) } else { vec![0; 8] };
                let qs = m.words_a(b + if five { 48 } else { 16 } + 32 * c, 8, 16);
                let b0 = 8 * (lu / 4) + 2 * c;
                let (sc0, m0) = scale_min(2 * c, &head[1..]);
                let (sc1, m1) = scale_min(2 * c + 1, &head[1..]);
                let (x0, x1) = (x_words(x, b0), x_words(x, b0 + 1));
                let (mut s0, mut s1) = (0, 0);
                for k in 0..8 {
                    let lo = (qs[k] & 0x0F0F_0F0F) | (((qh[k] >> (2 * c)) & 0x0101_0101) << 4);
                    let hi = ((qs[k] >> 4) & 0x0F0F_0F0F) | (((qh[k] >> (2 * c + 1)) & 0x0101_0101) << 4);
                    s0 = dp4a(lo, x0[k], s0);
                    s1 = dp4a(hi, x1[k], s1);
                }
                let dot_sc = x.d[b0] * (sc0 * s0) as f32 + x.d[b0 + 1] * (sc1 * s1) as f32;
                let dot_m = x.d[b0] * (m0 * x.sum[b0]) as f32 + x.d[b0 + 1] * (m1 * x.sum[b0 + 1]) as f32;
                f16_bits(head[0]) * dot_sc - f16_bits(head[0] >> 16) * dot_m
            }
            GgmlType::Q6K => {
                let b = row + 210 * (lu / 4);
                let j = lu % 4;
                let (h, kk) = (j / 2, j % 2);
                let ql = m.words_2(b + 64 * h + 32 * kk, 8);
                let qh = m.words_2(b + 128 + 32 * h, 8);
                let sc = m.words_2(b + 192 + 8 * h, 2);
                let d = m.u16_at(b + 208);
                let b0 = 8 * (lu / 4) + 4 * h + kk;
                let byte = |w: u32, sh: usize| i32::from((w >> sh) as u8 as i8);
                let (sa0, sa1) = (byte(sc[0], 16 * kk), byte(sc[0], 16 * kk + 8));
                let (sb0, sb1) = (byte(sc[1], 16 * kk), byte(sc[1], 16 * kk + 8));
                let (xa, xb) = (x_words(x, b0), x_words(x, b0 + 2));
                let (mut a0, mut a1, mut c0, mut c1) = (0, 0, 0, 0);
                for k in 0..8 {
                    let qa = (ql[k] & 0x0F0F_0F0F) | (((qh[k] >> (2 * kk)) & 0x0303_0303) << 4);
                    let qb = ((ql[k] >> 4) & 0x0F0F_0F0F) | (((qh[k] >> (2 * kk + 4)) & 0x0303_0303) << 4);
                    let (va, vb) = (vsub4(qa, 0x2020_2020), vsub4(qb, 0x2020_2020));
                    if k < 4 {
                        a0 = dp4a(va, xa[k], a0);
                        c0 = dp4a(vb, xb[k], c0);
                    } else {
                        a1 = dp4a(va, xa[k], a1);
                        c1 = dp4a(vb, xb[k], c1);
                    }
                }
                f16_bits(d) * (x.d[b0] * (sa0 * a0 + sa1 * a1) as f32 + x.d[b0 + 2] * (sb0 * c0 + sb1 * c1) as f32)
            }
            _ => unreachable!("no integer GEMV for {ty}"),
        }
    }

    #[test]
    fn lane_units_reproduce_the_dequantized_dot_product() {
        let mut rng = Rng::new(0x9e3779b97f4a7c15);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let lu_units = if ty.block_elems() == 256 { 2 } else { 1 };
            // 576 columns (SmolLM2: rows not a multiple of 16 bytes for the legacy types) and 512;
            // three rows so later rows start at every alignment the type allows.
            for n_cols in [576usize, 512, 768] {
                if n_cols % ty.block_elems() != 0 {
                    continue;
                }
                let n_rows = 3;
                let (mem, rb) = random_rows(&mut rng, ty, n_rows, n_cols);
                let mut x = rng.vec_uniform(n_cols, -2.0, 2.0);
                x[..32].iter_mut().for_each(|v| *v = 0.0);
                let xq = quantize_x(&x);
                let xt = q8_roundtrip(&x);
                let tensor = Tensor::from_bytes("emulated", ty, n_cols, n_rows, mem.0[..rb * n_rows].to_vec()).unwrap();
                let correction = q8_1_min_correction(&tensor, &x, 1);
                for (r, corr) in correction.iter().enumerate() {
                    let mut row = vec![0.0f32; n_cols];
                    dequantize(ty, &mem.0[r * rb..(r + 1) * rb], &mut row).unwrap();
                    let want: f64 = row.iter().zip(&xt).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + corr;
                    let scale: f64 = row.iter().zip(&xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let n_lu = n_cols / 32 / lu_units;
                    let got: f64 = (0..n_lu).map(|lu| lane_unit(ty, &mem, r * rb, lu, &xq) as f64).sum();
                    assert!((got - want).abs() <= 1e-5 * scale, "{ty} {n_cols} cols row {r}: emulated {got}, want {want} (sum |w x| {scale})");
                }
            }
        }
    }

    /// Q8Unit<TYPE>::load for 32-column unit `u` of the row starting at `row`: the codes (element
    /// i in byte i % 4 of word i / 4) and the factors a, b with w = a c + b.
    fn gemm_unit(ty: GgmlType, m: &Mem, row: usize, u: usize) -> ([u32; 8], f32, f32) {
        let mut c = [0u32; 8];
        let (a, b) = match ty {
            GgmlType::Q8_0 => {
                let blk = row + 34 * u;
                c.copy_from_slice(&m.words_2(blk + 2, 8));
                (f16_bits(m.u16_at(blk)), 0.0)
            }
            GgmlType::Q4_0 => {
                let blk = row + 18 * u;
                let qs = m.words_2(blk + 2, 4);
                for k in 0..4 {
                    c[k] = vsub4(qs[k] & 0x0F0F_0F0F, 0x0808_0808);
                    c[k + 4] = vsub4((qs[k] >> 4) & 0x0F0F_0F0F, 0x0808_0808);
                }
                (f16_bits(m.u16_at(blk)), 0.0)
            }
            GgmlType::Q4_1 => {
                let v = m.words_a(row + 20 * u, 5, 4);
                for k in 0..4 {
                    c[k] = v[k + 1] & 0x0F0F_0F0F;
                    c[k + 4] = (v[k + 1] >> 4) & 0x0F0F_0F0F;
                }
                (f16_bits(v[0]), f16_bits(v[0] >> 16))
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (a, b, qh, qs) = if ty == GgmlType::Q5_0 {
                    let blk = row + 22 * u;
                    let v = m.words_2(blk + 2, 5);
                    (f16_bits(m.u16_at(blk)), 0.0, v[0], v[1..].to_vec())
                } else {
                    let v = m.words_a(row + 24 * u, 6, 8);
                    (f16_bits(v[0]), f16_bits(v[0] >> 16), v[1], v[2..].to_vec())
                };
                for k in 0..4 {
                    c[k] = (qs[k] & 0x0F0F_0F0F) | spread4(qh >> (4 * k));
                    c[k + 4] = ((qs[k] >> 4) & 0x0F0F_0F0F) | spread4(qh >> (4 * k + 16));
                }
                if ty == GgmlType::Q5_0 {
                    c.iter_mut().for_each(|w| *w = vsub4(*w, 0x1010_1010));
                }
                (a, b)
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let five = ty == GgmlType::Q5K;
                let blk = row + if five { 176 } else { 144 } * (u / 8);
                let s = u % 8;
                let head = m.words_a(blk, 4, 16);
                let qh = if five { m.words_a(blk + 16, 8, 16) } else { vec![0; 8] };
                let qs = m.words_a(blk + if five { 48 } else { 16 } + 32 * (s / 2), 8, 16);
                let (sc, mn) = scale_min(s, &head[1..]);
                for k in 0..8 {
                    c[k] = ((qs[k] >> (4 * (s & 1))) & 0x0F0F_0F0F) | (((qh[k] >> s) & 0x0101_0101) << 4);
                }
                (f16_bits(head[0]) * sc as f32, -(f16_bits(head[0] >> 16) * mn as f32))
            }
            _ => unreachable!("no integer GEMM for {ty}"),
        };
        (c, a, b)
    }

    /// The integer GEMM's units give back the dequantized weights exactly: a c + b, with one
    /// product and one sum rounded as `dequantize` rounds them.
    #[test]
    fn gemm_units_reproduce_the_dequantized_weights() {
        let mut rng = Rng::new(0x51ed270b27a2d1f3);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K] {
            assert!(super::gemm_is_integer(ty), "{ty}");
            for n_cols in [576usize, 512, 768] {
                if n_cols % ty.block_elems() != 0 {
                    continue;
                }
                let n_rows = 3;
                let (mem, rb) = random_rows(&mut rng, ty, n_rows, n_cols);
                for r in 0..n_rows {
                    let mut row = vec![0.0f32; n_cols];
                    dequantize(ty, &mem.0[r * rb..(r + 1) * rb], &mut row).unwrap();
                    for u in 0..n_cols / 32 {
                        let (c, a, b) = gemm_unit(ty, &mem, r * rb, u);
                        for i in 0..32 {
                            let code = f32::from((c[i / 4] >> (8 * (i % 4))) as u8 as i8);
                            let got = code * a + b;
                            assert_eq!(got, row[32 * u + i], "{ty} {n_cols} cols row {r} unit {u} element {i}");
                        }
                    }
                }
            }
        }
        assert!(!super::gemm_is_integer(GgmlType::Q6K) && !super::gemm_is_integer(GgmlType::F16));
    }

    #[test]
    fn roundtrip_matches_the_emulated_codes() {
        let mut rng = Rng::new(5);
        let x = rng.vec_uniform(96, -3.0, 3.0);
        let q = quantize_x(&x);
        let t = q8_roundtrip(&x);
        for i in 0..96 {
            assert_eq!(t[i], q.d[i / 32] * f32::from(q.q[i]));
        }
        assert!(q8_roundtrip(&[0.0; 32]).iter().all(|&v| v == 0.0));
    }
}
