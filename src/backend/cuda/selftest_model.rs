//! The selftest's checks and benchmarks of the whole-model kernels (`quant.cu`, `attention.cu`,
//! bias and row moves of `layers.cu`) and of the CUDA backend on a small synthetic model, each
//! against the CPU reference (`reference::matmul`, `Tensor::dequantize_row`,
//! `reference::attention`, the `Cpu::reference()` backend).

use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaSlice;

use super::attention::AttnKernel;
use super::backend::Cuda;
use super::kv::DeviceCodec;
use super::kv_fp16::Fp16DeviceCodec;
use super::quant::{gemm_is_integer, gemv_is_integer, q8_1_min_correction, q8_roundtrip, MatmulKernel};
use super::selftest::{bench_line, compare, time, time_stream, BenchLine, Outcome, SplitMix64, Tester, Tolerance};
use super::CudaRuntime;
use crate::backend::cpu::{reference, Cpu};
use crate::backend::Backend;
use crate::format::quant::{quantize, GgmlType};
use crate::kv::strategy::StrategySpec;
use crate::kv::Fp16Layer;
use crate::model::llama::{DeviceWeights, Logits, Session};
use crate::model::weights::Tensor;

/// GEMV: dequantized values are bit-identical to the reference's; the dot product is summed in
/// f32 (per-lane partial sums over n_cols / 32 / 32 units, then a 5-level shuffle tree) against
/// the reference's f64. The error is bounded by ~(n_cols / 1024 + 5) * 2^-24 of sum |w x|:
/// 1.8e-6 at n_cols 11008. The tolerance is relative to that sum (not to |y|, which cancels):
/// 1e-5, a 5x margin.
pub const GEMV_TOL: f64 = 1e-5;
/// The integer GEMV of the quantized types computes `W . q8(x)`: x quantized per 32 values to
/// `d * q` (`quant::q8_roundtrip`), the 32-term dot products exact in integers, scaled and summed
/// in f32. It is checked with GEMV_TOL against `reference::matmul` on q8(x) (the same argument
/// as above: ~3 roundings per block instead of 32, then the f32 sums). Against the unquantized
/// x it is off by the quantization itself, which is not noise to tolerate but a bound to verify:
/// |x - d q| <= d / 2 from rounding plus |q| d 2^-11 from the f16 scale, d = amax / 127, so each
/// output is within `Q8_X_BOUND * sum_blocks amax_b * sum_i |w_i|` of the exact product
/// (1/254 + 2^-11 = 0.0044; 0.0045 covers the f32 arithmetic), plus GEMV_TOL. For q4_1 / q5_1
/// the oracle adds `quant::q8_1_min_correction` (the minimum meets `d * sum` rounded to f16),
/// and the bound its magnitude.
pub const Q8_X_BOUND: f64 = 0.0045;
/// Integer GEMM (prefill of the types of `gemm_is_integer`): `W . q8(x)` like the integer GEMV,
/// checked against `reference::matmul` on q8(x), but each output sums its n_cols / 32 scaled
/// block products one after another in f32 (no tree): up to (n_cols / 32 + 3) 2^-24 of sum |w x|,
/// 2.1e-5 at n_cols 11008. 3e-5 covers that worst case. The Q8_X_BOUND check applies as for the
/// GEMV.
pub const GEMM_Q8_TOL: f64 = 3e-5;
/// f16 GEMM (the float types and q6_K, and `MatmulKernel::GemmF16`): W and x are rounded to f16
/// (2^-11 relative each) before the tensor-core products; accumulation is f32. Two roundings per product: <= 2^-10 = 9.8e-4 of sum |w x| in the worst
/// case (all errors aligned); 2e-3 leaves a 2x margin.
pub const GEMM_TOL: f64 = 2e-3;
/// embed: the same dequantization arithmetic on both sides: exact.
pub const EMBED_TOL: Tolerance = Tolerance { atol: 0.0, rtol: 0.0 };
/// add_bias: one IEEE addition per element on both sides: exact.
pub const BIAS_TOL: Tolerance = Tolerance { atol: 0.0, rtol: 0.0 };
/// Attention output: scores in f32 (head_dim products, ~1e-6 relative) and an f32 online softmax
/// against the reference's f64; outputs are averages of values in [-1, 1], so the error is
/// absolute: a few 1e-6. 2e-5 is a 4x margin.
pub const ATTN_TOL: Tolerance = Tolerance { atol: 2e-5, rtol: 0.0 };
/// Attention mass: sums of up to n_tokens * group softmax weights, each within ~1e-6 of the
/// reference's (f32 exp and division): atol 1e-5 plus 1e-5 relative for large sums.
pub const MASS_TOL: Tolerance = Tolerance { atol: 1e-5, rtol: 1e-5 };
/// Whole model (synthetic, 2 layers): CUDA logits against the reference backend's, relative to
/// the largest |logit| of the row. Prefill goes through the integer GEMM (the q6_K output
/// through the f16 one, ~1e-3 of sum |w x| per product), and decode through the integer GEMV;
/// their 8-bit activations move each value by up to amax/254 (Q8_X_BOUND) before every matrix.
/// The CPU fast backend quantizes activations the same way: on this model (q4_0, q6_K output,
/// 40 prompt and 12 decoded tokens, fp16 and h2o, seeds 0..6) it is 1.0e-2 to 1.6e-2 of the row
/// scale from the reference, so 3e-2 (2x the largest seen). The top-1 token must also agree wherever the
/// reference's margin between its two best tokens exceeds twice the observed error.
pub const MODEL_TOL: f64 = 3e-2;

/// Random weights of `ty` (uniform in [-1, 1], quantized by the reference quantizer).
fn random_weight(rng: &mut SplitMix64, ty: GgmlType, n_rows: usize, n_cols: usize) -> Result<Tensor> {
    let values = rng.vec(n_rows * n_cols, -1.0, 1.0);
    let rb = ty.row_bytes(n_cols).ok_or_else(|| anyhow!("{n_cols} columns do not fit {ty} blocks"))?;
    let mut bytes = vec![0u8; rb * n_rows];
    for (src, dst) in values.chunks_exact(n_cols).zip(bytes.chunks_exact_mut(rb)) {
        quantize(ty, src, dst)?;
    }
    Tensor::from_bytes(&format!("random {ty}"), ty, n_cols, n_rows, bytes)
}

/// Compares `got` with `want` relative to `scale[i]` (sum |w x| of each output).
fn compare_scaled(got: &[f32], want: &[f32], scale: &[f64], tol: f64) -> Outcome {
    let mut o = Outcome { tol: Tolerance { atol: 0.0, rtol: tol }, max_abs_err: 0.0, max_rel_err: 0.0, mismatches: 0, problem: None };
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = if g.is_nan() { f64::INFINITY } else { (g as f64 - w as f64).abs() };
        let rel = err / s.max(f64::MIN_POSITIVE);
        o.max_abs_err = o.max_abs_err.max(err);
        o.max_rel_err = o.max_rel_err.max(rel);
        if !(rel <= tol) {
            o.mismatches += 1;
            if o.problem.is_none() {
                o.problem = Some(format!("element {i}: got {g:e}, want {w:e} (sum |w x| {s:e})"));
            }
        }
    }
    o
}

impl Tester<'_> {
    fn matmul_case(&mut self, ty: GgmlType, n_rows: usize, n_cols: usize, n_tokens: usize, kernel: MatmulKernel) -> Result<Outcome> {
        let w = random_weight(&mut self.rng, ty, n_rows, n_cols)?;
        let x = self.rng.vec(n_tokens * n_cols, -1.0, 1.0);
        let gemm = matches!(kernel, MatmulKernel::Gemm | MatmulKernel::GemmF16) || (kernel == MatmulKernel::Auto && n_tokens > 4);
        // The integer kernels' oracle is the product with x as they quantize it (see Q8_X_BOUND).
        let integer = if gemm {
            kernel != MatmulKernel::GemmF16 && gemm_is_integer(ty)
        } else {
            kernel != MatmulKernel::Naive && gemv_is_integer(ty)
        };
        let x_ref = if integer { q8_roundtrip(&x) } else { x.clone() };
        let mut want = vec![0.0f32; n_tokens * n_rows];
        reference::matmul(&w, &x_ref, n_tokens, &mut want)?;
        // q4_1 / q5_1: the minimum meets the f16 d * sum (zeros otherwise).
        let correction = if integer { q8_1_min_correction(&w, &x, n_tokens) } else { vec![0.0; n_tokens * n_rows] };
        for (v, c) in want.iter_mut().zip(&correction) {
            *v = (f64::from(*v) + c) as f32;
        }
        let mut exact = vec![0.0f32; n_tokens * n_rows];
        reference::matmul(&w, &x, n_tokens, &mut exact)?;
        let mut scale = vec![0.0f64; n_tokens * n_rows];
        let mut bound = vec![0.0f64; n_tokens * n_rows];
        let mut row = vec![0.0f32; n_cols];
        for r in 0..n_rows {
            w.dequantize_row(r, &mut row)?;
            for t in 0..n_tokens {
                let xt = &x_ref[t * n_cols..(t + 1) * n_cols];
                scale[t * n_rows + r] = row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                bound[t * n_rows + r] = row
                    .chunks(32)
                    .zip(x[t * n_cols..(t + 1) * n_cols].chunks(32))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
                        Q8_X_BOUND * amax * wb.iter().map(|&v| (v as f64).abs()).sum::<f64>()
                    })
                    .sum::<f64>()
                    + correction[t * n_rows + r].abs();
            }
        }
        let dw = self.rt.upload_weight(&w)?;
        let dx = self.rt.upload(&x)?;
        let mut out = self.rt.upload(&vec![f32::NAN; n_tokens * n_rows + 64])?;
        self.rt.matmul(&dw, &dx, n_tokens, &mut out, kernel)?;
        let got = self.rt.download(&out)?;
        let tol = match (gemm, integer) {
            (true, true) => GEMM_Q8_TOL,
            (true, false) => GEMM_TOL,
            _ => GEMV_TOL,
        };
        let mut o = compare_scaled(&got[..n_tokens * n_rows], &want, &scale, tol);
        if o.problem.is_none() && got[n_tokens * n_rows..].iter().any(|v| !v.is_nan()) {
            o.problem = Some("write past the end of out".into());
        }
        if integer && o.problem.is_none() {
            let far = (0..n_tokens * n_rows).find(|&i| !((got[i] as f64 - exact[i] as f64).abs() <= bound[i] + GEMV_TOL * scale[i]));
            if let Some(i) = far {
                o.mismatches += 1;
                o.problem = Some(format!(
                    "element {i}: got {:e}, the unquantized product is {:e}, beyond the q8(x) bound {:e}",
                    got[i], exact[i], bound[i]
                ));
            }
        }
        Ok(o)
    }

    fn embed_case(&mut self, ty: GgmlType, n_rows: usize, n_cols: usize, n_tokens: usize) -> Result<Outcome> {
        let w = random_weight(&mut self.rng, ty, n_rows, n_cols)?;
        let tokens: Vec<u32> = (0..n_tokens).map(|i| if i == 0 { n_rows as u32 - 1 } else { (self.rng.next_u64() % n_rows as u64) as u32 }).collect();
        let mut want = vec![0.0f32; n_tokens * n_cols];
        for (t, &id) in tokens.iter().enumerate() {
            w.dequantize_row(id as usize, &mut want[t * n_cols..(t + 1) * n_cols])?;
        }
        let dw = self.rt.upload_weight(&w)?;
        let mut out = self.rt.upload(&vec![f32::NAN; n_tokens * n_cols])?;
        self.rt.embed(&dw, &tokens, &mut out)?;
        Ok(compare(&self.rt.download(&out)?, &want, EMBED_TOL))
    }

    fn bias_case(&mut self, n_rows: usize, width: usize) -> Result<Outcome> {
        let x = self.rng.vec(n_rows * width, -10.0, 10.0);
        let b = self.rng.vec(width, -1.0, 1.0);
        let mut want = x.clone();
        for row in want.chunks_exact_mut(width) {
            reference::add(row, &b);
        }
        let mut dx = self.rt.upload(&x)?;
        let db = self.rt.upload(&b)?;
        self.rt.add_bias(&mut dx, &db, width, n_rows)?;
        Ok(compare(&self.rt.download(&dx)?, &want, BIAS_TOL))
    }

    /// Attention over a cache of `len` tokens (the last `n_tokens` are the queries' own), with
    /// `evict` indices (ascending) removed from every head first on both sides.
    #[allow(clippy::too_many_arguments)]
    fn attention_case(
        &mut self,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        len: usize,
        evict: &[usize],
        mass: bool,
        kernel: AttnKernel,
    ) -> Result<(Outcome, Option<Outcome>)> {
        let row = n_kv_heads * head_dim;
        let k = self.rng.vec(len * row, -1.0, 1.0);
        let v = self.rng.vec(len * row, -1.0, 1.0);
        let q = self.rng.vec(n_tokens * n_heads * head_dim, -1.0, 1.0);
        // Reference cache: the surviving tokens, in order.
        let kept: Vec<usize> = (0..len).filter(|j| !evict.contains(j)).collect();
        if kept.len() < n_tokens {
            bail!("the case evicts the queries' own tokens");
        }
        let pick = |src: &[f32]| -> Vec<f32> { kept.iter().flat_map(|&j| src[j * row..(j + 1) * row].iter().copied()).collect() };
        let mut layer = Fp16Layer::new(n_kv_heads, head_dim, kept.len())?;
        layer.append(&pick(&k), &pick(&v), kept.len())?;
        let n_q = n_tokens * n_heads * head_dim;
        let mut want = vec![0.0f32; n_q];
        let mut want_mass = vec![0.0f32; n_kv_heads * kept.len()];
        reference::attention(&q, &layer, n_tokens, n_heads, head_dim, &mut want, mass.then_some(&mut want_mass[..]));

        let mut codec = Fp16DeviceCodec::new(self.rt, n_kv_heads, head_dim, len + 3)?;
        codec.kernel = kernel;
        // Append in two pieces, evict, then attend: the eviction's compaction runs first.
        let split = len / 2;
        let (dk1, dv1) = (self.rt.upload(&k[..split * row])?, self.rt.upload(&v[..split * row])?);
        let (dk2, dv2) = (self.rt.upload(&k[split * row..])?, self.rt.upload(&v[split * row..])?);
        if split > 0 {
            codec.append(self.rt, &dk1, &dv1, split)?;
        }
        let early: Vec<usize> = evict.iter().copied().filter(|&j| j < split).collect();
        for g in 0..n_kv_heads {
            codec.evict(self.rt, g, &early)?;
        }
        codec.append(self.rt, &dk2, &dv2, len - split)?;
        let late: Vec<usize> = evict.iter().filter(|&&j| j >= split).map(|&j| j - early.len()).collect();
        for g in 0..n_kv_heads {
            codec.evict(self.rt, g, &late)?;
        }
        let dq = self.rt.upload(&q)?;
        let mut out = self.rt.upload(&vec![f32::NAN; n_q])?;
        let stride = kept.len() + 5;
        let mut dmass: CudaSlice<f32> = self.rt.zeros(n_kv_heads * stride)?;
        codec.attention(self.rt, &dq, n_tokens, n_heads, &mut out, mass.then_some((&mut dmass, stride)))?;
        let o = compare(&self.rt.download(&out)?, &want, ATTN_TOL);
        let m = if mass {
            let all = self.rt.download(&dmass)?;
            let got: Vec<f32> = (0..n_kv_heads).flat_map(|g| all[g * stride..g * stride + kept.len()].iter().copied()).collect();
            let mut mo = compare(&got, &want_mass, MASS_TOL);
            if mo.problem.is_none() && (0..n_kv_heads).any(|g| all[g * stride + kept.len()..(g + 1) * stride].iter().any(|&x| x != 0.0)) {
                mo.problem = Some("mass written past a head's tokens".into());
            }
            // Invariant: each query row's softmax sums to one, so a head's mass totals
            // n_tokens * group.
            let group = (n_heads / n_kv_heads) as f64;
            for g in 0..n_kv_heads {
                let total: f64 = got[g * kept.len()..(g + 1) * kept.len()].iter().map(|&x| x as f64).sum();
                if (total - n_tokens as f64 * group).abs() > 1e-3 * n_tokens as f64 * group && mo.problem.is_none() {
                    mo.problem = Some(format!("head {g}: mass totals {total}, want {}", n_tokens as f64 * group));
                }
            }
            Some(mo)
        } else {
            None
        };
        Ok((o, m))
    }
}

/// Runs the whole-model kernel checks; each case becomes a line.
pub(super) fn run_model_checks(t: &mut Tester) {
    use GgmlType::*;
    use MatmulKernel::{Auto, Gemm, GemmF16, Gemv, Naive};
    let all = [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K];
    for ty in all {
        for &(rows, cols, tokens, kernel) in &[(1, 256, 1, Gemv), (37, 512, 3, Gemv), (65, 768, 4, Gemv), (70, 512, 9, Gemm), (8, 256, 2, Naive)] {
            t.record("matmul", format!("{ty} {rows}x{cols}, {tokens} tokens, {kernel:?}"), |t| t.matmul_case(ty, rows, cols, tokens, kernel));
        }
    }
    // Legacy types on rows that are not a multiple of 256 (SmolLM2's 576), GQA-sized outputs.
    for ty in [Q4_0, Q4_1, Q8_0, F16] {
        t.record("matmul", format!("{ty} 192x576, 1 token, Gemv"), |t| t.matmul_case(ty, 192, 576, 1, Gemv));
        t.record("matmul", format!("{ty} 1536x576, 64 tokens, Gemm"), |t| t.matmul_case(ty, 1536, 576, 64, Gemm));
    }
    // The f16 GEMM of the quantized types (the integer GEMM's baseline in --bench), and the
    // integer GEMM on tiles cut at every edge: rows, tokens and the K step (576 = 4.5 steps).
    for ty in [Q4_0, Q4_1, Q4K] {
        t.record("matmul", format!("{ty} 70x512, 9 tokens, GemmF16"), |t| t.matmul_case(ty, 70, 512, 9, GemmF16));
    }
    for ty in [Q4_0, Q4_1, Q8_0, Q5_0, Q5_1] {
        t.record("matmul", format!("{ty} 130x576, 67 tokens, Gemm"), |t| t.matmul_case(ty, 130, 576, 67, Gemm));
    }
    t.record("matmul", "q4_K 100x768, 5 tokens, Gemm".into(), |t| t.matmul_case(Q4K, 100, 768, 5, Gemm));
    // Rows of an odd number of blocks (rows start 2 bytes past a 4-byte boundary for the 2-byte
    // aligned block types), and rows so long that a launch holds fewer than 4 tokens' quantized x
    // in shared memory on every current GPU (the wrapper splits the tokens).
    for ty in [Q4_0, Q5_0, Q8_0, Q4_1] {
        t.record("matmul", format!("{ty} 33x96, 2 tokens, Gemv"), |t| t.matmul_case(ty, 33, 96, 2, Gemv));
    }
    t.record("matmul", "q4_0 64x49152, 4 tokens, Gemv".into(), |t| t.matmul_case(Q4_0, 64, 49152, 4, Gemv));
    // Llama2-7B shapes: q/k/v/o (4096x4096), gate/up (11008x4096), down (4096x11008), output.
    for &(ty, rows, cols, tokens, kernel) in &[
        (Q4_0, 4096, 4096, 1, Gemv),
        (Q4_0, 11008, 4096, 1, Gemv),
        (Q4_0, 4096, 11008, 1, Gemv),
        (Q4_0, 4096, 4096, 4, Gemv),
        (Q4_0, 4096, 4096, 65, Auto),
        (Q4_0, 4096, 11008, 64, Gemm),
        (Q4K, 4096, 4096, 1, Gemv),
        (Q4K, 11008, 4096, 1, Gemv),
        (Q4_1, 4096, 4096, 1, Gemv),
        (Q6K, 32000, 4096, 1, Gemv),
        (Q8_0, 4096, 4096, 1, Gemv),
    ] {
        t.record("matmul", format!("{ty} {rows}x{cols}, {tokens} tokens, {kernel:?}"), |t| t.matmul_case(ty, rows, cols, tokens, kernel));
    }
    for ty in all {
        t.record("embed", format!("{ty} 300x256, 5 tokens"), |t| t.embed_case(ty, 300, 256, 5));
    }
    t.record("embed", "q4_1 4000x576, 3 tokens".into(), |t| t.embed_case(Q4_1, 4000, 576, 3));
    for &(rows, width) in &[(1, 1), (3, 576), (64, 4096), (5, 33)] {
        t.record("add_bias", format!("{rows}x{width}"), |t| t.bias_case(rows, width));
    }
    type Case = (usize, usize, usize, usize, usize, &'static [usize]);
    let cases: &[Case] = &[
        // (n_tokens, n_heads, n_kv_heads, head_dim, len, evicted)
        (1, 32, 32, 128, 1, &[]),
        (1, 32, 32, 128, 4096, &[]),
        (1, 32, 32, 128, 65, &[]),
        (1, 9, 3, 64, 200, &[]),
        (1, 32, 8, 128, 1000, &[3, 4, 500, 998]),
        (3, 32, 8, 128, 777, &[0, 10]),
        (4, 4, 2, 64, 4, &[]),
        (5, 9, 3, 64, 5, &[]),
        (16, 32, 32, 128, 16, &[]),
        (17, 32, 8, 128, 300, &[1, 2, 280]),
        (64, 9, 3, 64, 512, &[]),
        (33, 32, 32, 128, 2048, &[]),
    ];
    for &(n_tokens, n_heads, n_kv, hd, len, evict) in cases {
        for mass in [false, true] {
            let shape = format!(
                "{n_tokens} q x {n_heads}/{n_kv} heads x {hd}, {len} cached{}{}",
                if evict.is_empty() { String::new() } else { format!(", {} evicted", evict.len()) },
                if mass { ", mass" } else { "" }
            );
            let mut mass_line = None;
            t.record("attention", shape.clone(), |t| {
                let (o, m) = t.attention_case(n_tokens, n_heads, n_kv, hd, len, evict, mass, AttnKernel::Auto)?;
                mass_line = m;
                Ok(o)
            });
            if let Some(m) = mass_line {
                t.record("attention_mass", shape, |_| Ok(m));
            }
        }
    }
    for &(n_tokens, kernel) in &[(2, AttnKernel::Prefill), (20, AttnKernel::Decode), (3, AttnKernel::Naive)] {
        t.record("attention", format!("{n_tokens} q x 32/8 heads x 128, 300 cached, {kernel:?}"), |t| {
            Ok(t.attention_case(n_tokens, 32, 8, 128, 300, &[], false, kernel)?.0)
        });
    }
    for strategy in ["fp16", "h2o"] {
        t.record("model", format!("synthetic tiny q4_0, 40 prompt + 12 decoded tokens, {strategy}"), |t| model_case(t, strategy));
    }
}

/// The CUDA backend against the CPU reference backend on a 2-layer synthetic model.
fn model_case(t: &mut Tester, strategy: &str) -> Result<Outcome> {
    let dir = std::env::temp_dir().join(format!("kvgear-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tiny-q4_0.gguf");
    let cfg = crate::model::config::Config::named("tiny")?;
    crate::synth::write(&cfg, "tiny", GgmlType::Q4_0, GgmlType::Q6K, false, t.seed, &path)?;
    let model = crate::model::Model::load(&path)?;
    let _ = std::fs::remove_file(&path);
    let spec = StrategySpec::parse(strategy, &[], t.seed)?;
    let prompt: Vec<u32> = (0..40).map(|_| (t.rng.next_u64() % cfg.n_vocab as u64) as u32).collect();
    // Teacher-forced: the reference picks each next token greedily and CUDA is fed the same
    // tokens, so a near-tie that flips the argmax (random weights make logits flat) does not
    // send the two runs down different sequences.
    fn run<B: Backend>(b: &B, model: &crate::model::Model, spec: &StrategySpec, prompt: &[u32], forced: Option<&[u32]>) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
        let dw = DeviceWeights::new(b, &model.weights)?;
        let mut s = Session::with_strategy(b, &model.config, &dw, 64, 16, spec)?;
        let mut rows = vec![s.forward(prompt, Logits::Last)?.to_vec()];
        let mut fed = Vec::new();
        for i in 0..12 {
            let next = match forced {
                Some(f) => f[i],
                None => crate::sample::greedy(&rows[i]),
            };
            fed.push(next);
            rows.push(s.forward(&[next], Logits::Last)?.to_vec());
        }
        Ok((rows, fed))
    }
    let (want, tokens) = run(&Cpu::reference(), &model, &spec, &prompt, None)?;
    let cuda = Cuda::new(t.rt.context().ordinal())?;
    let (got, _) = run(&cuda, &model, &spec, &prompt, Some(&tokens))?;
    let mut o = Outcome { tol: Tolerance { atol: 0.0, rtol: MODEL_TOL }, max_abs_err: 0.0, max_rel_err: 0.0, mismatches: 0, problem: None };
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let scale = w.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        let err = g.iter().zip(w).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        o.max_abs_err = o.max_abs_err.max(err);
        o.max_rel_err = o.max_rel_err.max(err / scale);
        let (top_w, top_g) = (crate::sample::greedy(w), crate::sample::greedy(g));
        let mut sorted: Vec<f32> = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = (sorted[0] - sorted[1]) as f64;
        let bad_top = top_w != top_g && margin > 2.0 * err;
        if err > MODEL_TOL * scale || bad_top {
            o.mismatches += 1;
            if o.problem.is_none() {
                o.problem = Some(format!("step {i}: max |logit error| {err:e} (row scale {scale:e}); top-1 {top_g} vs {top_w} (margin {margin:e})"));
            }
        }
    }
    Ok(o)
}

/// Bytes of weight copies a streamed GEMV benchmark rotates through: about 5x the 50 MB L2 cache
/// of an H100.
const GEMV_ROTATE_BYTES: usize = 256 << 20;

/// Microbenchmarks: device copy bandwidth, each GEMV at Llama2-7B sizes next to the naive
/// baseline (streamed back to back over rotating copies, and one launch alone), the GEMM's
/// TFLOP/s, attention with and without mass at 4096 tokens.
pub(super) fn microbench_model(rt: &CudaRuntime, iters: usize, seed: u64, lines: &mut Vec<BenchLine>) -> Result<()> {
    let mut rng = SplitMix64(seed ^ 0x5eed);
    let bytes = 512usize << 20;
    let copy = super::selftest::copy_bandwidth_gb_s(rt, bytes / 2, iters)?;
    let copy_ms = bytes as f64 / (copy * 1e9) * 1e3;
    lines.push(bench_line("device_copy", format!("{} MiB dtod", bytes >> 21), bytes as u64, iters, (copy_ms, copy_ms), None));
    for &(ty, rows, cols) in &[
        (GgmlType::Q4_0, 4096, 4096),
        (GgmlType::Q4_0, 11008, 4096),
        (GgmlType::Q4_0, 4096, 11008),
        (GgmlType::Q4K, 4096, 4096),
        (GgmlType::Q4K, 11008, 4096),
        (GgmlType::Q6K, 32000, 4096),
        (GgmlType::Q8_0, 4096, 4096),
        (GgmlType::F16, 4096, 4096),
    ] {
        let host = random_weight(&mut rng, ty, rows, cols)?;
        let w = rt.upload_weight(&host)?;
        let x = rt.upload(&rng.vec(cols, -1.0, 1.0))?;
        let mut y = rt.zeros::<f32>(rows)?;
        let moved = (w.n_rows * w.row_bytes + 4 * (cols + rows)) as u64;
        // Copies of the matrix that together exceed the L2 cache several times over, launched in
        // turn, so the streamed figure reads every byte from device memory.
        let w_bytes = w.n_rows * w.row_bytes;
        let n_copies = (GEMV_ROTATE_BYTES / w_bytes).clamp(1, 16);
        let mut ws = vec![w];
        for _ in 1..n_copies {
            ws.push(rt.upload_weight(&host)?);
        }
        let naive = time(rt, iters.min(10), || rt.matmul(&ws[0], &x, 1, &mut y, MatmulKernel::Naive))?;
        let single = time(rt, iters, || rt.matmul(&ws[0], &x, 1, &mut y, MatmulKernel::Gemv))?;
        let fast = time_stream(rt, iters, 4 * n_copies, |i| rt.matmul(&ws[i % n_copies], &x, 1, &mut y, MatmulKernel::Gemv))?;
        // A device copy that reads and writes as many bytes in all (half the matrix each way),
        // from the same rotating copies: the rate one launch of this size can reach.
        let half = w_bytes / 2;
        let mut dst = rt.zeros::<u8>(half.max(1))?;
        let same_size = time_stream(rt, iters, 4 * n_copies, |i| {
            rt.stream()
                .memcpy_dtod(&ws[i % n_copies].data.slice(..half), &mut dst)
                .map_err(|e| anyhow!("device copy of {half} bytes: {e}"))
        })?;
        let pct = |t: f64| moved as f64 / (t * 1e-3) / 1e9 / copy * 100.0;
        let same_pct = same_size.0 / fast.0 * 100.0;
        lines.push(bench_line(
            "gemv",
            format!("{ty} {rows}x{cols}, {n_copies} copies back to back ({:.0}% of copy, {same_pct:.0}% of a same-size copy)", pct(fast.0)),
            moved,
            iters,
            fast,
            Some(naive.0 / fast.0),
        ));
        lines.push(bench_line("copy_same_size", format!("{} bytes read + written, as gemv {ty} {rows}x{cols}", 2 * half), 2 * half as u64, iters, same_size, None));
        lines.push(bench_line("gemv_single", format!("{ty} {rows}x{cols}, one launch alone ({:.0}% of copy)", pct(single.0)), moved, iters, single, None));
        lines.push(bench_line("gemv_naive", format!("{ty} {rows}x{cols}"), moved, iters.min(10), naive, None));
    }
    for &(ty, rows, cols, tokens) in &[(GgmlType::Q4_0, 4096, 4096, 512), (GgmlType::Q4_0, 11008, 4096, 512)] {
        let w = rt.upload_weight(&random_weight(&mut rng, ty, rows, cols)?)?;
        let x = rt.upload(&rng.vec(cols * tokens, -1.0, 1.0))?;
        let mut y = rt.zeros::<f32>(rows * tokens)?;
        let moved = (w.n_rows * w.row_bytes + 4 * tokens * (cols + rows)) as u64;
        let gemm = time(rt, iters.min(20), || rt.matmul(&w, &x, tokens, &mut y, MatmulKernel::Gemm))?;
        let gemm_f16 = time(rt, iters.min(20), || rt.matmul(&w, &x, tokens, &mut y, MatmulKernel::GemmF16))?;
        let gemv = time(rt, 3, || rt.matmul(&w, &x, tokens, &mut y, MatmulKernel::Gemv))?;
        let tflops = |t: f64| 2.0 * (rows * cols * tokens) as f64 / (t * 1e-3) / 1e12;
        lines.push(bench_line(
            "gemm",
            format!("{ty} {rows}x{cols} x {tokens} tok, int8 ({:.1} TOP/s, {:.2}x the f16 GEMM's time)", tflops(gemm.0), gemm.0 / gemm_f16.0),
            moved,
            iters.min(20),
            gemm,
            None,
        ));
        lines.push(bench_line("gemm_f16", format!("{ty} {rows}x{cols} x {tokens} tok ({:.1} TFLOP/s)", tflops(gemm_f16.0)), moved, iters.min(20), gemm_f16, None));
        lines.push(bench_line("gemm_via_gemv", format!("{ty} {rows}x{cols} x {tokens} tok"), moved, 3, gemv, None));
    }
    let (n_heads, n_kv, hd, len) = (32usize, 32usize, 128usize, 4096usize);
    let mut codec = Fp16DeviceCodec::new(rt, n_kv, hd, len)?;
    for _ in 0..len / 512 {
        let k = rt.upload(&rng.vec(512 * n_kv * hd, -1.0, 1.0))?;
        let v = rt.upload(&rng.vec(512 * n_kv * hd, -1.0, 1.0))?;
        codec.append(rt, &k, &v, 512)?;
    }
    let q = rt.upload(&rng.vec(n_heads * hd, -1.0, 1.0))?;
    let mut out = rt.zeros::<f32>(n_heads * hd)?;
    let mut mass = rt.zeros::<f32>(n_kv * len)?;
    let moved = (codec.bytes().total() + 8 * n_heads * hd) as u64;
    let shape = format!("decode 1 q x {n_heads} heads x {hd}, {len} cached");
    codec.kernel = AttnKernel::Naive;
    let naive = time(rt, iters.min(10), || codec.attention(rt, &q, 1, n_heads, &mut out, None))?;
    codec.kernel = AttnKernel::Auto;
    let plain = time(rt, iters, || codec.attention(rt, &q, 1, n_heads, &mut out, None))?;
    let with_mass = time(rt, iters, || codec.attention(rt, &q, 1, n_heads, &mut out, Some((&mut mass, len))))?;
    lines.push(bench_line("attention", shape.clone(), moved, iters, plain, Some(naive.0 / plain.0)));
    let extra = (with_mass.0 / plain.0 - 1.0) * 100.0;
    lines.push(bench_line("attention_mass", format!("{shape} (+{extra:.1}% for mass)"), moved, iters, with_mass, None));
    lines.push(bench_line("attention_naive", shape, moved, iters.min(10), naive, None));
    Ok(())
}
