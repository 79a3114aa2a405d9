//! `kvgear selftest` for the compressed KV codecs on the device, and their `--bench` timings.
//!
//! Every case feeds the same K/V (seeded from the run seed) to the device codec and to a CPU
//! `StrategyLayer` over the CPU codec with the same parameters and seed, step by step as a
//! forward pass runs them (append, attention, evictions, compress_due): a prompt, decode steps
//! across several compressions, evictions that leave each head at its own budget, more
//! decoding and a multi-token step; then compares
//! - the storage: every token decoded on the device (`kv_quant_decode_tokens`, which reads codes,
//!   scales, factors and outliers as attention does) against the CPU codec's `decode_token`, and
//!   `bytes()` against the CPU's, exactly;
//! - attention: the output and the attention mass of the device kernels against
//!   `StrategyLayer::attention` (prefill for the prompt, decode for single tokens, with and
//!   without the mass output).
//!
//! A case whose device work fails becomes a failing line and the others still run.

use std::time::Instant;

use anyhow::{anyhow, Result};
use cudarc::driver::CudaSlice;

use super::super::kv::DeviceCodec;
use super::super::selftest::{bench_line, compare, time, BenchLine, Outcome, SelftestLine, Tolerance};
use super::super::CudaRuntime;
use super::new_quant_codec;
use crate::kv::codec::{Backbone, CodecParams};
use crate::kv::policy::PolicyParams;
use crate::kv::strategy::{StrategyLayer, StrategySpec};
use crate::rng::Rng;

/// Decoded tokens of uniform, group and GEAR without a low-rank term: the device reproduces
/// the CPU's arithmetic operation for operation (f16 rounding, directed f16 scale rounding,
/// IEEE division, round-half-away codes, separately rounded dequantization, the same outlier
/// selection with its ties, the same outlier corrections), so every value is identical.
pub const KV_STORAGE_EXACT: Tolerance = Tolerance { atol: 0.0, rtol: 0.0 };

/// GEAR with a low-rank term: the power iteration's products are summed in the CPU's order, but
/// its Gram-Schmidt sums (f64) are reduced in another order, so A and B can differ in their last
/// f32 bits and, rarely, round to the neighbouring f16. One f16 ulp (2^-11 relative) of a factor
/// moves an entry of A B^T by at most 2^-11 * sum_k |A_jk B_ck|, and those entries are at most
/// a few quantization steps of the residual (~0.1 here for inputs in [-6, 6]): ~1e-4. 2e-3 leaves
/// room for a few such flips in one entry while still failing a missing or wrong low-rank term
/// (which moves entries by ~0.05).
pub const KV_STORAGE_LOWRANK: Tolerance = Tolerance { atol: 2e-3, rtol: 0.0 };

/// Attention output: the same decoded values (or the factored form of the same sums) summed in
/// another order in f32, softmax in f32 instead of f64: scores within ~1e-6 relative, outputs
/// (convex combinations of values up to 6) within ~1e-5. 2e-4 + 1e-3 relative is a 10x margin.
pub const KV_ATTN_TOL: Tolerance = Tolerance { atol: 2e-4, rtol: 1e-3 };

/// Attention output over GEAR with a low-rank term: KV_ATTN_TOL plus what KV_STORAGE_LOWRANK
/// allows per decoded value.
pub const KV_ATTN_LOWRANK_TOL: Tolerance = Tolerance { atol: 2e-3, rtol: 1e-3 };

/// Attention mass: sums of softmax weights (each in [0, 1]) over queries and query heads, from
/// the same scores as the output: relative error ~1e-5 of each weight.
pub const KV_MASS_TOL: Tolerance = Tolerance { atol: 2e-5, rtol: 1e-3 };

/// One selftest scenario.
struct Scenario {
    codec: &'static str,
    params: CodecParams,
    heads: usize,
    n_heads: usize,
    head_dim: usize,
    prompt: usize,
    decode: usize,
    /// Evict every head down to budget - g tokens (random indices), then decode as many again.
    budget: Option<usize>,
}

impl Scenario {
    fn describe(&self) -> String {
        let p = &self.params;
        let mut kv = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                kv.push(format!("{k}={v}"));
            }
        };
        add("bits", p.bits.map(|v| v.to_string()));
        add("group", p.group.map(|v| v.to_string()));
        add("residual", p.residual.map(|v| v.to_string()));
        add("rank", p.rank.map(|v| v.to_string()));
        add("rank_decode", p.rank_decode.map(|v| v.to_string()));
        add("outliers", p.outliers.map(|v| v.to_string()));
        add("buffer", p.buffer.map(|v| v.to_string()));
        add("backbone", p.backbone.map(|v| v.to_string()));
        format!(
            "{}({}) {}/{}x{} prompt {} decode {}{}",
            self.codec,
            kv.join(","),
            self.n_heads,
            self.heads,
            self.head_dim,
            self.prompt,
            self.decode,
            self.budget.map_or(String::new(), |b| format!(" budget {b}"))
        )
    }

    fn low_rank(&self) -> bool {
        self.codec == "gear" && (self.params.rank != Some(0) || self.params.rank_decode != Some(0))
    }
}

fn params(bits: u32, f: impl FnOnce(&mut CodecParams)) -> CodecParams {
    let mut p = CodecParams { bits: Some(bits), ..CodecParams::default() };
    f(&mut p);
    p
}

fn scenarios() -> Vec<Scenario> {
    let sc = |codec, params, (heads, n_heads, head_dim), prompt, decode, budget| Scenario { codec, params, heads, n_heads, head_dim, prompt, decode, budget };
    let gear_default = || params(4, |_| {});
    let gear_rank0 = || {
        params(4, |p| {
            p.rank = Some(0);
            p.rank_decode = Some(0);
        })
    };
    let gear_uniform = || {
        params(3, |p| {
            p.backbone = Some(Backbone::Uniform);
            p.rank = Some(3);
        })
    };
    let smol = (3, 9, 64);
    let mha = (4, 4, 128);
    let gqa8 = (2, 16, 128);
    vec![
        // One token: nothing compressed, the fp16 buffer only.
        sc("uniform", params(4, |_| {}), smol, 1, 3, None),
        sc("gear", gear_default(), mha, 1, 2, None),
        // Block edges: a prompt of exactly one buffer, one less, one more.
        sc("uniform", params(4, |_| {}), smol, 20, 19, None),
        sc("uniform", params(3, |_| {}), mha, 19, 2, None),
        sc("group", params(2, |p| p.group = Some(32)), mha, 33, 31, None),
        sc("group", params(4, |p| p.group = Some(32)), gqa8, 32, 33, None),
        sc("gear", gear_default(), smol, 64, 65, None),
        sc("gear", gear_rank0(), mha, 63, 66, None),
        sc("gear", gear_uniform(), gqa8, 41, 20, None),
        // Longer prompts, several decode compressions, then a cache at its budget.
        sc("uniform", params(8, |_| {}), smol, 300, 45, Some(150)),
        sc("group", params(4, |p| p.group = Some(32)), smol, 257, 70, Some(120)),
        sc("gear", gear_default(), smol, 300, 130, Some(200)),
        sc("gear", gear_rank0(), gqa8, 200, 64, Some(100)),
        sc("gear", gear_uniform(), mha, 150, 40, Some(90)),
        sc("gear", params(2, |p| p.outliers = Some(0.05)), mha, 520, 70, Some(300)),
    ]
}

/// Merges the outcome of another comparison into `o`.
fn merge(o: &mut Option<Outcome>, n: Outcome, what: &str) {
    match o {
        None => {
            let mut n = n;
            n.problem = n.problem.map(|p| format!("{what}: {p}"));
            *o = Some(n);
        }
        Some(o) => {
            o.max_abs_err = o.max_abs_err.max(n.max_abs_err);
            o.max_rel_err = o.max_rel_err.max(n.max_rel_err);
            o.mismatches += n.mismatches;
            if o.problem.is_none() {
                o.problem = n.problem.map(|p| format!("{what}: {p}"));
            }
        }
    }
}

fn line(kernel: &'static str, shape: String, seed: u64, r: Result<Outcome>) -> SelftestLine {
    match r {
        Ok(o) => SelftestLine {
            kernel,
            shape,
            max_abs_err: o.max_abs_err,
            max_rel_err: o.max_rel_err,
            tol: o.tol,
            mismatches: o.mismatches,
            pass: o.problem.is_none(),
            detail: o.problem.map(|p| format!("seed {seed}: {p}")).unwrap_or_default(),
        },
        Err(e) => SelftestLine {
            kernel,
            shape,
            max_abs_err: f64::NAN,
            max_rel_err: f64::NAN,
            tol: Tolerance { atol: 0.0, rtol: 0.0 },
            mismatches: 0,
            pass: false,
            detail: format!("seed {seed}: {e:#}"),
        },
    }
}

/// Uniform in [-1, 1), one entry in 50 scaled by 6 (outliers worth the name).
fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(-1.0, 1.0) * if rng.below(50) == 0 { 6.0 } else { 1.0 }).collect()
}

struct Run<'a> {
    rt: &'a CudaRuntime,
    sc: &'a Scenario,
    rng: Rng,
    layer: StrategyLayer,
    dev: super::QuantDeviceCodec,
}

impl Run<'_> {
    fn append(&mut self, n_tokens: usize) -> Result<()> {
        let n = n_tokens * self.sc.heads * self.sc.head_dim;
        let (k, v) = (values(&mut self.rng, n), values(&mut self.rng, n));
        self.layer.append(&k, &v, n_tokens)?;
        let (dk, dv) = (self.rt.upload(&k)?, self.rt.upload(&v)?);
        self.dev.append(self.rt, &dk, &dv, n_tokens)
    }

    /// The end of a step: compress_due on both sides.
    fn compress(&mut self, prompt: bool) -> Result<()> {
        self.layer.codec.compress_due(prompt)?;
        self.dev.compress_due(self.rt, prompt)
    }

    /// Decode steps (append, compress_due) with no checks.
    fn decode(&mut self, n_steps: usize) -> Result<()> {
        for _ in 0..n_steps {
            self.append(1)?;
            self.compress(false)?;
        }
        Ok(())
    }

    fn storage(&mut self) -> Result<Outcome> {
        let (heads, d) = (self.sc.heads, self.sc.head_dim);
        let tol = if self.sc.low_rank() { KV_STORAGE_LOWRANK } else { KV_STORAGE_EXACT };
        let mut o = None;
        for g in 0..heads {
            let len = self.layer.codec.len(g);
            if self.dev.len(g) != len {
                return Err(anyhow!("head {g} holds {} tokens on the device, {len} on the CPU", self.dev.len(g)));
            }
            let all: Vec<usize> = (0..len).collect();
            let got = self.dev.decode_tokens(self.rt, g, &all)?;
            let mut want = vec![0f32; len * 2 * d];
            for (j, kv) in want.chunks_exact_mut(2 * d).enumerate() {
                let (k, v) = kv.split_at_mut(d);
                self.layer.codec.decode_token(g, j, k, v);
            }
            merge(&mut o, compare(&got, &want, tol), &format!("head {g} [token, K/V, channel]"));
        }
        let mut o = o.expect("at least one head");
        let (db, cb) = (self.dev.bytes(), self.layer.codec.bytes());
        if db != cb && o.problem.is_none() {
            o.problem = Some(format!("bytes {db:?} on the device, {cb:?} on the CPU"));
        }
        Ok(o)
    }

    /// Attention of `n_tokens` new queries (the last n_tokens tokens are theirs) on both sides.
    fn attention(&mut self, n_tokens: usize, with_mass: bool) -> Result<Outcome> {
        let (heads, n_heads, d) = (self.sc.heads, self.sc.n_heads, self.sc.head_dim);
        let q = values(&mut self.rng, n_tokens * n_heads * d);
        for g in 0..heads {
            self.layer.mass[g] = vec![0.0; self.layer.codec.len(g)];
        }
        let mut want = vec![0f32; q.len()];
        self.layer.attention(&q, n_tokens, n_heads, &mut want);
        let stride = (0..heads).map(|g| self.layer.codec.len(g)).max().unwrap_or(0) + 1;
        let dq = self.rt.upload(&q)?;
        let mut out: CudaSlice<f32> = self.rt.zeros(q.len())?;
        let mut mass: CudaSlice<f32> = self.rt.zeros(heads * stride)?;
        self.dev.attention(self.rt, &dq, n_tokens, n_heads, &mut out, with_mass.then_some((&mut mass, stride)))?;
        let got = self.rt.download(&out)?;
        let tol = if self.sc.low_rank() { KV_ATTN_LOWRANK_TOL } else { KV_ATTN_TOL };
        let mut o = None;
        merge(&mut o, compare(&got, &want, tol), "output");
        if with_mass {
            let m = self.rt.download(&mass)?;
            let mut want_m = vec![0f32; heads * stride];
            for g in 0..heads {
                want_m[g * stride..g * stride + self.layer.mass[g].len()].copy_from_slice(&self.layer.mass[g]);
            }
            merge(&mut o, compare(&m, &want_m, KV_MASS_TOL), "mass");
        }
        Ok(o.expect("compared"))
    }
}

/// The compressed-KV checks, one line per kernel and scenario.
pub fn checks(rt: &CudaRuntime, seed: u64) -> Vec<SelftestLine> {
    let mut lines = Vec::new();
    for (i, sc) in scenarios().iter().enumerate() {
        let name = sc.describe();
        let case_seed = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let spec = StrategySpec {
            name: format!("{}-h2o", sc.codec),
            codec: sc.codec.into(),
            policy: "h2o".into(),
            codec_params: sc.params.clone(),
            policy_params: PolicyParams { budget: Some(1e6), ..PolicyParams::default() },
            given: Vec::new(),
            seed: case_seed,
        };
        let capacity = sc.prompt + 2 * sc.decode + 8;
        let setup = StrategyLayer::new(&spec, sc.heads, sc.head_dim, capacity, 0)
            .and_then(|layer| Ok((layer, new_quant_codec(rt, sc.codec, &sc.params, sc.heads, sc.head_dim, capacity, case_seed)?)));
        let (layer, dev) = match setup {
            Ok(x) => x,
            Err(e) => {
                lines.push(line("kv_quant_compress", name, seed, Err(e)));
                continue;
            }
        };
        let mut run = Run { rt, sc, rng: Rng::new(case_seed), layer, dev };
        let shape = |phase: &str| format!("{name}: {phase}");
        // A failed append, eviction or compression leaves the two sides out of step: the rest of
        // the case is skipped.
        macro_rules! or_skip {
            ($e:expr, $kernel:expr, $phase:expr) => {
                if let Err(e) = $e {
                    lines.push(line($kernel, shape($phase), seed, Err(e)));
                    continue;
                }
            };
        }
        // The prompt step: attention over the fp16 buffer, then its compression.
        or_skip!(run.append(sc.prompt), "kv_quant_buffer_append", "prompt");
        if sc.prompt > 1 {
            lines.push(line("kv_attn_quant_prefill", shape("prompt, with mass"), seed, run.attention(sc.prompt, true)));
            lines.push(line("kv_attn_quant_prefill", shape("prompt"), seed, run.attention(sc.prompt, false)));
        } else {
            lines.push(line("kv_attn_quant_decode_mass", shape("prompt, with mass"), seed, run.attention(1, true)));
        }
        or_skip!(run.compress(true), "kv_quant_compress", "prompt compression");
        lines.push(line("kv_quant_compress", shape("prompt storage"), seed, run.storage()));
        // Decoding across compressions; attention checked in the last step, before its compression.
        or_skip!(run.decode(sc.decode - 1), "kv_quant_compress", "decode");
        or_skip!(run.append(1), "kv_quant_buffer_append", "decode");
        lines.push(line("kv_attn_quant_decode", shape("decode"), seed, run.attention(1, false)));
        lines.push(line("kv_attn_quant_decode_mass", shape("decode, with mass"), seed, run.attention(1, true)));
        or_skip!(run.compress(false), "kv_quant_compress", "decode");
        lines.push(line("kv_quant_compress", shape("decoded storage"), seed, run.storage()));
        if let Some(budget) = sc.budget {
            // An evicting step: every head down to budget - g tokens (random indices, blocks and
            // buffer alike), checked before and after the step's compression.
            or_skip!(run.append(1), "kv_quant_buffer_append", "evicting step");
            let mut evicted = Ok(());
            for g in 0..sc.heads {
                let len = run.layer.codec.len(g);
                let keep = budget.saturating_sub(g).clamp(1, len);
                let mut idx: Vec<usize> = (0..len).collect();
                // Partial Fisher-Yates: the first len - keep entries are a random set to evict.
                for i in 0..len - keep {
                    let j = i + run.rng.below((len - i) as u64) as usize;
                    idx.swap(i, j);
                }
                idx.truncate(len - keep);
                idx.sort_unstable();
                evicted = run.layer.codec.evict(g, &idx).and_then(|_| run.dev.evict(rt, g, &idx));
                if evicted.is_err() {
                    break;
                }
            }
            or_skip!(evicted, "kv_quant_gather", "eviction");
            lines.push(line("kv_quant_gather", shape("storage at budget"), seed, run.storage()));
            lines.push(line("kv_attn_quant_decode_mass", shape("at budget, with mass"), seed, run.attention(1, true)));
            or_skip!(run.compress(false), "kv_quant_compress", "evicting step");
            lines.push(line("kv_quant_gather", shape("storage at budget, compressed"), seed, run.storage()));
            or_skip!(run.decode(sc.decode), "kv_quant_compress", "decode after eviction");
            lines.push(line("kv_quant_gather", shape("storage after eviction and decoding"), seed, run.storage()));
        }
        // A step of 4 tokens: prefill over compressed blocks and the buffer.
        or_skip!(run.append(4), "kv_quant_buffer_append", "4-token step");
        lines.push(line("kv_attn_quant_prefill", shape("4-token step, with mass"), seed, run.attention(4, true)));
        or_skip!(run.compress(true), "kv_quant_compress", "4-token step");
        lines.push(line("kv_attn_quant_decode", shape("after the 4-token step"), seed, run.attention(1, false)));
        lines.push(line("kv_quant_compress", shape("final storage"), seed, run.storage()));
    }
    lines
}

/// Random K/V rows for `n_tokens` tokens of `heads` heads, uploaded.
fn upload_kv(rt: &CudaRuntime, rng: &mut Rng, n_tokens: usize, heads: usize, d: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let n = n_tokens * heads * d;
    Ok((rt.upload(&values(rng, n))?, rt.upload(&values(rng, n))?))
}

/// Timings on Llama2-7B's attention shape (32 heads of 128, no GQA) with GEAR's defaults:
/// decode attention over a prompt of 512 and 4096 tokens with and without the mass output
/// (target: mass costs at most 10%), prefill attention of a 512-token prompt step (over its fp16
/// buffer, before the step's compression, as a forward pass runs it), and the compress_due that
/// compresses a GEAR block of `buffer` tokens (all 32 heads, one layer) against the decode
/// attention, raw and per decode step (it happens once every `buffer` steps).
pub fn bench(rt: &CudaRuntime, iters: usize, seed: u64) -> Result<Vec<BenchLine>> {
    let (heads, d) = (32usize, 128usize);
    let params = CodecParams::default();
    let mut rng = Rng::new(seed ^ 0x6b76_7175_616e_74);
    let mut lines = Vec::new();
    let mut decode_ms = Vec::new();
    for ctx in [512usize, 4096] {
        let mut dev = new_quant_codec(rt, "gear", &params, heads, d, ctx + 64, seed)?;
        let (k, v) = upload_kv(rt, &mut rng, ctx, heads, d)?;
        dev.append(rt, &k, &v, ctx)?;
        dev.compress_due(rt, true)?;
        let (k1, v1) = upload_kv(rt, &mut rng, 1, heads, d)?;
        dev.append(rt, &k1, &v1, 1)?;
        let q = rt.upload(&values(&mut rng, heads * d))?;
        let mut out: CudaSlice<f32> = rt.zeros(heads * d)?;
        let stride = ctx + 64;
        let mut mass: CudaSlice<f32> = rt.zeros(heads * stride)?;
        let kv_bytes = dev.bytes().total() as u64;
        let io = (2 * heads * d * 4) as u64;
        let plain = time(rt, iters, || dev.attention(rt, &q, 1, heads, &mut out, None))?;
        let with_mass = time(rt, iters, || dev.attention(rt, &q, 1, heads, &mut out, Some((&mut mass, stride))))?;
        let label = format!("llama2-7b 32x128 gear ctx {}", ctx + 1);
        lines.push(bench_line("kv_attn_quant_decode", label.clone(), kv_bytes + io, iters, plain, None));
        let cost = (with_mass.0 / plain.0 - 1.0) * 100.0;
        lines.push(bench_line(
            "kv_attn_quant_decode_mass",
            format!("{label}: mass {cost:+.1}% of plain (target <= 10%)"),
            kv_bytes + io + (heads * (ctx + 1) * 2 * 4) as u64,
            iters,
            with_mass,
            None,
        ));
        decode_ms.push((ctx, plain.0));
    }

    let ctx = 512usize;
    let mut dev = new_quant_codec(rt, "gear", &params, heads, d, ctx + 8, seed)?;
    let (k, v) = upload_kv(rt, &mut rng, ctx, heads, d)?;
    dev.append(rt, &k, &v, ctx)?;
    let q = rt.upload(&values(&mut rng, ctx * heads * d))?;
    let mut out: CudaSlice<f32> = rt.zeros(ctx * heads * d)?;
    let mut mass: CudaSlice<f32> = rt.zeros(heads * ctx)?;
    let prefill_iters = iters.div_ceil(5).max(1);
    let plain = time(rt, prefill_iters, || dev.attention(rt, &q, ctx, heads, &mut out, None))?;
    let with_mass = time(rt, prefill_iters, || dev.attention(rt, &q, ctx, heads, &mut out, Some((&mut mass, ctx))))?;
    let bytes = dev.bytes().total() as u64 + 2 * (ctx * heads * d * 4) as u64;
    lines.push(bench_line("kv_attn_quant_prefill", format!("llama2-7b 32x128 gear prompt step {ctx} (its fp16 buffer)"), bytes, prefill_iters, plain, None));
    lines.push(bench_line(
        "kv_attn_quant_prefill_mass",
        format!("llama2-7b 32x128 gear prompt step {ctx}: prefill + mass pass, {:+.1}% of plain", (with_mass.0 / plain.0 - 1.0) * 100.0),
        bytes,
        prefill_iters,
        with_mass,
        None,
    ));

    // The compress_due that compresses one decode block (buffer tokens, rank_decode) for every
    // head: fresh codecs whose buffers a decode step has just filled, timed end to end (host
    // planning, uploads, kernels, the buffers' resize, the outlier counts' copy).
    let nb = crate::kv::codec::GearConfig::from_params(&params)?.buffer;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let mut dev = new_quant_codec(rt, "gear", &params, heads, d, nb + 1, seed)?;
        let (k, v) = upload_kv(rt, &mut rng, nb - 1, heads, d)?;
        dev.append(rt, &k, &v, nb - 1)?;
        dev.compress_due(rt, true)?;
        let (k1, v1) = upload_kv(rt, &mut rng, 1, heads, d)?;
        dev.append(rt, &k1, &v1, 1)?;
        rt.synchronize()?;
        let t0 = Instant::now();
        dev.compress_due(rt, false)?;
        rt.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if dev.split_len(0) != (nb, 0) {
            return Err(anyhow!("bench: compress_due did not compress a block ({:?})", dev.split_len(0)));
        }
    }
    ms.sort_by(f64::total_cmp);
    let compress = (ms[ms.len() / 2], ms[0]);
    let block_bytes = (2 * nb * heads * d * 2) as u64;
    let ratios: Vec<String> = decode_ms
        .iter()
        .map(|&(c, a)| format!("{:.0}% of decode attention at ctx {} ({:.1}% per step over {nb} steps)", 100.0 * compress.0 / a, c + 1, 100.0 * compress.0 / a / nb as f64))
        .collect();
    lines.push(bench_line("kv_quant_compress", format!("gear block of {nb} tokens x {heads} heads x {d}: {}", ratios.join("; ")), block_bytes, iters.max(1), compress, None));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::super::scheme_of;
    use super::*;
    use crate::kv::codec::make_codec;

    /// Every scenario is one the CPU codec and the device codec accept, within the kernels'
    /// limits, so a GPU run never fails on a configuration mistake.
    #[test]
    fn scenarios_are_valid_configurations() {
        let all = scenarios();
        assert!(all.iter().any(|s| s.prompt == 1) && all.iter().any(|s| s.head_dim == 64) && all.iter().any(|s| s.head_dim == 128));
        assert!(all.iter().any(|s| s.n_heads > s.heads) && all.iter().any(|s| s.budget.is_some()));
        for sc in &all {
            let what = sc.describe();
            make_codec(sc.codec, &sc.params, sc.heads, sc.head_dim, 1).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let capacity = sc.prompt + 2 * sc.decode + 8;
            scheme_of(sc.codec, &sc.params, sc.heads, sc.head_dim, capacity, 1).and_then(|s| s.check()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert!(sc.n_heads % sc.heads == 0 && sc.n_heads / sc.heads <= 8, "{what}");
            if let Some(b) = sc.budget {
                assert!(b > sc.heads && b < sc.prompt + sc.decode, "{what}: budget {b} evicts nothing or everything");
            }
        }
    }
}
