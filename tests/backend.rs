//! The fast CPU backend against the reference backend: every op, every quant type, every SIMD
//! path this machine has, on random inputs; and a tiny synthetic model's logits on both.

mod common;

use kvgear::backend::cpu::fast::{self, set_simd, supported_simd};
use kvgear::backend::cpu::packed;
use kvgear::backend::cpu::reference::{self, RopeParams, RopeStyle};
use kvgear::backend::cpu::Cpu;
use kvgear::format::quant::{quantize, GgmlType};
use kvgear::kv::Fp16Layer;
use kvgear::model::llama::{DeviceWeights, Logits, Session};
use kvgear::model::weights::Tensor;
use kvgear::model::Model;
use kvgear::rng::Rng;

/// The fast matmul quantizes each 32-value block of activations to int8 (as llama.cpp does) for
/// the 32-element block types: each value moves by at most amax/254, so the activation error
/// vector is about 0.006 |x| in practice (1/254 of each block's largest value per element), and the
/// dot-product error is at most |w| times that. Q4_1 and Q5_1 also use the block's `d * sum`
/// rounded to f16 (as `block_q8_1` stores it), 2^-11 of a term bounded by |w| |x|. Errors are
/// measured relative to |w_r| |x_t|; 1e-2 leaves room over the 0.006.
const QUANT_ACT_TOL: f32 = 1e-2;
/// f32 and dequantized-block paths differ from the reference only by f32 vs f64 accumulation.
const FLOAT_TOL: f32 = 1e-4;
/// The fast attention follows llama.cpp's CPU flash attention: the query is rounded to f16
/// (relative 2^-11) and the weighted sum of values is accumulated in f16, rounded at every key
/// (half an ulp of values below 1 is at most 2^-12 per key, growing like the square root of the
/// keys visited). Errors are absolute, the values being uniform in [-1, 1].
const ATTN_TOL: f32 = 1e-2;
/// The fast RoPE follows ggml: each pair's angle is the previous one times a factor, in f32, so
/// the angle of pair i at position p carries about i f32 roundings of p (p = 1000 here):
/// 32 * 1000 * 6e-8 rad, a few 1e-3 of a unit vector.
const ROPE_TOL: f32 = 1e-2;

fn seed() -> u64 {
    let s = Rng::seed_from_time();
    eprintln!("seed {s}");
    s
}

/// Max |a - b| relative to the RMS of `b`.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let rms = (b.iter().map(|x| x * x).sum::<f32>() / b.len() as f32).sqrt().max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / rms
}

fn random_tensor(rng: &mut Rng, ty: GgmlType, n_cols: usize, n_rows: usize) -> Tensor {
    let vals: Vec<f32> = (0..n_cols * n_rows).map(|_| rng.normal()).collect();
    let rb = ty.row_bytes(n_cols).unwrap();
    let mut bytes = vec![0u8; rb * n_rows];
    for (dst, src) in bytes.chunks_mut(rb).zip(vals.chunks(n_cols)) {
        quantize(ty, src, dst).unwrap();
    }
    Tensor::from_bytes("w", ty, n_cols, n_rows, bytes).unwrap()
}

/// Asserts `|got - want| < tol |w_r| |x_t|` for every output (`[n_tokens, n_rows]`): each error
/// is measured against the bound Cauchy-Schwarz puts on the dot product, so outputs near zero
/// are judged fairly.
fn assert_matmul_close(w: &Tensor, x: &[f32], n_tokens: usize, got: &[f32], want: &[f32], tol: f32, what: &str) {
    let (n_cols, n_rows) = (w.n_cols, w.n_rows);
    let mut row = vec![0.0f32; n_cols];
    for r in 0..n_rows {
        w.dequantize_row(r, &mut row).unwrap();
        let wn = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        for t in 0..n_tokens {
            let xn = x[t * n_cols..(t + 1) * n_cols].iter().map(|v| v * v).sum::<f32>().sqrt();
            let e = (got[t * n_rows + r] - want[t * n_rows + r]).abs() / (wn * xn).max(1e-20);
            assert!(e < tol, "{what}: err {e} at ({t}, {r})");
        }
    }
}

#[test]
fn matmul_matches_reference_for_every_type_and_simd_path() {
    let s = seed();
    let mut rng = Rng::new(s);
    for level in supported_simd() {
        set_simd(level).unwrap();
        for ty in GgmlType::ALL {
            // 96 columns: 3 blocks of 32; 256: a multiple of 4 blocks, which Q4_0's AVX-512
            // kernels need.
            let widths: &[usize] = if ty.block_elems() == 256 { &[512] } else { &[96, 256] };
            for (&n_cols, (n_rows, n_tokens)) in widths.iter().flat_map(|w| [(1, 1), (17, 1), (33, 3), (40, 4), (19, 5), (64, 9)].map(|s| (w, s))) {
                let w = random_tensor(&mut rng, ty, n_cols, n_rows);
                let x: Vec<f32> = (0..n_cols * n_tokens).map(|_| rng.normal()).collect();
                let mut want = vec![f32::NAN; n_rows * n_tokens];
                let mut got = vec![f32::NAN; n_rows * n_tokens];
                reference::matmul(&w, &x, n_tokens, &mut want).unwrap();
                fast::matmul(&w, &x, n_tokens, &mut got).unwrap();
                assert!(got.iter().all(|v| v.is_finite()), "{ty} {level:?}: unwritten output");
                let tol = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K) {
                    QUANT_ACT_TOL
                } else {
                    FLOAT_TOL
                };
                assert_matmul_close(&w, &x, n_tokens, &got, &want, tol, &format!("{ty} {level:?} rows {n_rows} tokens {n_tokens} (seed {s})"));
            }
        }
    }
    set_simd(fast::detected_simd()).unwrap();
}

/// The 16-row Q4_0 layout: every row comes back as stored, and its matmul matches the
/// reference on every SIMD path (the AVX-512 and AVX2 kernels, equal bit for bit to their
/// portable twin), for one token (decode) and for tiles of tokens with a partial last tile
/// (prefill), with several tasks of groups.
#[test]
fn repacked_q4_0_matmul_matches_reference_on_every_simd_path() {
    let s = seed();
    let mut rng = Rng::new(s);
    for (n_cols, n_rows) in [(32, 16), (96, 48), (256, 64), (512, 160)] {
        let w = random_tensor(&mut rng, GgmlType::Q4_0, n_cols, n_rows);
        let p = packed::PackedQ4_0::new(&w).unwrap();
        assert_eq!(p.n_bytes(), w.n_bytes());
        let mut row = vec![0u8; w.row_bytes()];
        for r in 0..n_rows {
            p.gguf_row(r, &mut row);
            assert_eq!(row, w.row(r), "row {r} of [{n_cols}, {n_rows}] after repacking");
        }
        for n_tokens in [1, 3, 4, 9, 17] {
            let x: Vec<f32> = (0..n_cols * n_tokens).map(|_| rng.normal()).collect();
            let mut want = vec![f32::NAN; n_rows * n_tokens];
            reference::matmul(&w, &x, n_tokens, &mut want).unwrap();
            let mut portable: Option<Vec<f32>> = None;
            for level in supported_simd() {
                set_simd(level).unwrap();
                let mut got = vec![f32::NAN; n_rows * n_tokens];
                let mut unpacked = vec![f32::NAN; n_rows * n_tokens];
                packed::matmul(&p, &x, n_tokens, &mut got).unwrap();
                fast::matmul(&w, &x, n_tokens, &mut unpacked).unwrap();
                let what = format!("{level:?} [{n_cols}, {n_rows}] tokens {n_tokens} (seed {s})");
                assert_matmul_close(&w, &x, n_tokens, &got, &want, QUANT_ACT_TOL, &what);
                // The same int8 activations and the same integer block sums as the unpacked
                // kernels: only the f32 rounding of the scaled sums differs.
                assert_matmul_close(&w, &x, n_tokens, &got, &unpacked, 1e-5, &format!("{what}, packed vs unpacked"));
                // Every SIMD kernel of the packed layout scales the same exact integer sums in
                // the same order as its portable twin.
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                match &portable {
                    None => portable = Some(got),
                    Some(p0) => assert_eq!(bits(&got), bits(p0), "{what}: packed kernel vs its portable twin"),
                }
            }
        }
        set_simd(fast::detected_simd()).unwrap();
    }
    let odd = random_tensor(&mut rng, GgmlType::Q4_0, 64, 17);
    assert!(!packed::PackedQ4_0::fits(&odd));
    let e = packed::PackedQ4_0::new(&odd).err().expect("17 rows are not repacked").to_string();
    assert!(e.contains("multiple of 16 rows"), "{e}");
    let mut out = vec![0.0f32; 16];
    let p = packed::PackedQ4_0::new(&random_tensor(&mut rng, GgmlType::Q4_0, 64, 16)).unwrap();
    assert!(packed::matmul(&p, &[0.0; 32], 1, &mut out).is_err(), "short input accepted");
}

#[test]
fn attention_matches_reference_with_gqa_and_mass() {
    let s = seed();
    let mut rng = Rng::new(s);
    for (n_heads, n_kv, head_dim, n_cached, n_tokens) in [(4, 4, 16, 1, 1), (9, 3, 64, 37, 1), (8, 2, 32, 20, 7), (4, 1, 128, 65, 65)] {
        let mut layer = Fp16Layer::new(n_kv, head_dim, n_cached + n_tokens).unwrap();
        let kv_row = n_kv * head_dim;
        let total = n_cached + n_tokens;
        let k = rng.vec_uniform(total * kv_row, -1.0, 1.0);
        let v = rng.vec_uniform(total * kv_row, -1.0, 1.0);
        layer.append(&k, &v, total).unwrap();
        let q = rng.vec_uniform(n_tokens * n_heads * head_dim, -2.0, 2.0);
        let mut want = vec![f32::NAN; q.len()];
        let mut got = vec![f32::NAN; q.len()];
        let mut mass_want = vec![0.0f32; n_kv * total];
        let mut mass_got = vec![0.0f32; n_kv * total];
        reference::attention(&q, &layer, n_tokens, n_heads, head_dim, &mut want, Some(&mut mass_want));
        fast::attention(&q, &layer, n_tokens, n_heads, head_dim, &mut got, Some(&mut mass_got));
        let abs_err = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(abs_err(&got, &want) < ATTN_TOL, "attention err {} (seed {s})", abs_err(&got, &want));
        // Mass: softmax weights from f16-rounded queries, summed over queries and heads.
        let max_mass = mass_want.iter().copied().fold(0.0f32, f32::max);
        assert!(abs_err(&mass_got, &mass_want) < ATTN_TOL * max_mass, "mass (seed {s})");
        // Each query's softmax row sums to one: total mass per KV head = queries * heads per group.
        for g in 0..n_kv {
            let total_mass: f32 = mass_got[g * total..(g + 1) * total].iter().sum();
            let expect = (n_tokens * n_heads / n_kv) as f32;
            assert!((total_mass - expect).abs() < 1e-3 * expect, "head {g}: mass {total_mass} vs {expect}");
        }
    }
}

#[test]
fn rope_and_rmsnorm_match_reference() {
    let s = seed();
    let mut rng = Rng::new(s);
    let factors: Vec<f32> = (0..32).map(|i| 1.0 + i as f32 * 0.25).collect();
    for style in [RopeStyle::Norm, RopeStyle::Neox] {
        for ff in [None, Some(&factors[..])] {
            let p = RopeParams { n_heads: 3, head_dim: 64, n_rot: 64, freq_base: 10000.0, style, freq_factors: ff };
            let x = rng.vec_uniform(5 * 3 * 64, -1.0, 1.0);
            let (mut a, mut b) = (x.clone(), x.clone());
            reference::rope(&mut a, 1000, &p);
            fast::rope(&mut b, 1000, &p);
            assert!(rel_err(&b, &a) < ROPE_TOL, "rope {style:?}: {} (seed {s})", rel_err(&b, &a));
            // Rotation preserves each pair's norm.
            let n0: f32 = x.iter().map(|v| v * v).sum();
            let n1: f32 = b.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3 * n0);
        }
    }
    let x = rng.vec_uniform(3 * 576, -3.0, 3.0);
    let w = rng.vec_uniform(576, 0.5, 1.5);
    let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    reference::rmsnorm(&x, &w, 1e-5, &mut a);
    fast::rmsnorm(&x, &w, 1e-5, &mut b);
    // ggml's order: the mean and the scale in f32, then (x * scale) * w.
    assert!(rel_err(&b, &a) < 1e-6, "rmsnorm {}", rel_err(&b, &a));
}

/// Relative RMS difference of two logit vectors allowed between the backends on a tiny random
/// model: activation quantization (see QUANT_ACT_TOL) and the f16 attention (ATTN_TOL) compound
/// over 2 layers.
const MODEL_LOGIT_TOL: f32 = 0.05;

#[test]
fn tiny_synthetic_model_gives_the_same_logits_on_both_backends() {
    for (name, ty) in [
        ("tiny", GgmlType::F32),
        ("tiny", GgmlType::Q4_0),
        ("tiny", GgmlType::Q8_0),
        ("tiny", GgmlType::Q4K),
        ("tiny-qwen2", GgmlType::Q4_1),
    ] {
        let cfg = kvgear::model::config::Config::named(name).unwrap();
        let path = common::temp_path(&format!("{name}-{ty}.gguf"));
        kvgear::synth::write(&cfg, name, ty, ty, false, 7, &path).unwrap();
        let m = Model::load(&path).unwrap();
        let toks: Vec<u32> = (0..23).map(|i| (i * 37 % 500) as u32).collect();
        let run = |b: &Cpu| {
            let dw = DeviceWeights::new(b, &m.weights).unwrap();
            let mut s = Session::new(b, &m.config, &dw, 64, 8).unwrap();
            let mut all = s.forward(&toks, Logits::From(0)).unwrap().to_vec();
            all.extend_from_slice(s.forward(&[5], Logits::Last).unwrap());
            all
        };
        let (r, f) = (run(&Cpu::reference()), run(&Cpu::fast()));
        assert_eq!(r.len(), 24 * cfg.n_vocab);
        let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let diff: Vec<f32> = r.iter().zip(&f).map(|(a, b)| a - b).collect();
        let e = rms(&diff) / rms(&r);
        let tol = MODEL_LOGIT_TOL;
        assert!(e < tol, "{name} {ty}: relative logit difference {e}");
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn batched_prefill_equals_token_by_token() {
    let cfg = kvgear::model::config::Config::named("tiny").unwrap();
    let path = common::temp_path("tiny-batch.gguf");
    kvgear::synth::write(&cfg, "tiny", GgmlType::F32, GgmlType::F32, false, 3, &path).unwrap();
    let m = Model::load(&path).unwrap();
    let b = Cpu::reference();
    let dw = DeviceWeights::new(&b, &m.weights).unwrap();
    let toks: Vec<u32> = (0..11).map(|i| (i * 13 % 500) as u32).collect();
    let mut s = Session::new(&b, &m.config, &dw, 32, 4).unwrap();
    let batched = s.forward(&toks, Logits::Last).unwrap().to_vec();
    let mut s2 = Session::new(&b, &m.config, &dw, 32, 1).unwrap();
    let mut last = Vec::new();
    for &t in &toks {
        last = s2.forward(&[t], Logits::Last).unwrap().to_vec();
    }
    assert!(rel_err(&batched, &last) < 1e-5);
    let _ = std::fs::remove_file(&path);
}
