//! KV codecs: attention over the stored cache matches the decoded tokens, byte counts match
//! their formulas, eviction keeps survivors intact, and GEAR beats plain quantization where keys
//! have outlier channels. Random inputs use a fresh seed, printed on failure.

use half::f16;
use kvgear::kv::codec::{make_codec, Backbone, Codec, CodecParams, Fp16Codec, GearConfig, GroupConfig, KvBytes, UniformConfig};
use kvgear::rng::Rng;

/// Relative tolerance of `scores`/`weighted_values` against dot products with decoded tokens:
/// the two sum the same f32 terms in different orders (block-wise, low-rank factored).
const ATTN_REL_TOL: f64 = 1e-5;

fn seed() -> u64 {
    std::env::var("KVGEAR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(Rng::seed_from_time)
}

/// `[n, heads, d]` rows like real keys: most channels N(0, 1), a few outlier channels with a
/// large scale and offset.
fn keys(rng: &mut Rng, n: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut x = vec![0f32; n * heads * d];
    for t in 0..n {
        for h in 0..heads {
            for c in 0..d {
                let outlier = c % 16 == 3;
                let v = rng.normal();
                x[(t * heads + h) * d + c] = if outlier { 12.0 + 6.0 * v } else { v };
            }
        }
    }
    x
}

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn params(f: impl FnOnce(&mut CodecParams)) -> CodecParams {
    let mut p = CodecParams::default();
    f(&mut p);
    p
}

/// Codecs under test, by name and parameters, for `head_dim = 32`.
fn codecs() -> Vec<(&'static str, CodecParams)> {
    vec![
        ("fp16", CodecParams::default()),
        ("uniform", params(|p| p.buffer = Some(5))),
        ("uniform", params(|p| {
            p.bits = Some(3);
            p.buffer = Some(7)
        })),
        ("group", params(|p| {
            p.group = Some(8);
            p.bits = Some(2)
        })),
        ("group", params(|p| {
            p.group = Some(8);
            p.residual = Some(16)
        })),
        ("gear", params(|p| {
            p.group = Some(8);
            p.buffer = Some(16)
        })),
        // Groups of whole 8-byte chunks of codes: the packed-code kernels take these.
        ("group", params(|p| {
            p.group = Some(16);
            p.residual = Some(16)
        })),
        ("gear", params(|p| {
            p.group = Some(32);
            p.bits = Some(2);
            p.buffer = Some(32);
            p.outliers = Some(0.05)
        })),
        ("gear", params(|p| {
            p.backbone = Some(Backbone::Uniform);
            p.bits = Some(3);
            p.buffer = Some(6);
            p.outliers = Some(0.05)
        })),
        ("gear", params(|p| {
            p.group = Some(16);
            p.buffer = Some(16);
            p.bits = Some(8);
            p.rank = Some(0);
            p.rank_decode = Some(0)
        })),
    ]
}

/// Appends a prompt of `n_prompt` tokens and `n_decode` single tokens, each step ending with
/// `compress_due` as a strategy layer ends it; returns the (f16-rounded)
/// K and V of head-major `[heads][tokens][d]`.
fn fill(c: &mut dyn Codec, rng: &mut Rng, heads: usize, d: usize, n_prompt: usize, n_decode: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut kk = vec![Vec::new(); heads];
    let mut vv = vec![Vec::new(); heads];
    let mut push = |c: &mut dyn Codec, n: usize, rng: &mut Rng| {
        let k = keys(rng, n, heads, d);
        let v = normal(rng, n * heads * d);
        c.append(&k, &v, n).unwrap();
        c.compress_due(n > 1).unwrap();
        for t in 0..n {
            for h in 0..heads {
                let s = (t * heads + h) * d;
                kk[h].extend(k[s..s + d].iter().map(|&x| f16r(x)));
                vv[h].extend(v[s..s + d].iter().map(|&x| f16r(x)));
            }
        }
    };
    if n_prompt > 0 {
        push(c, n_prompt, rng);
    }
    for _ in 0..n_decode {
        push(c, 1, rng);
    }
    (kk, vv)
}

fn decoded(c: &dyn Codec, g: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let n = c.len(g);
    let (mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d]);
    for j in 0..n {
        c.decode_token(g, j, &mut k[j * d..(j + 1) * d], &mut v[j * d..(j + 1) * d]);
    }
    (k, v)
}

fn check_attention(c: &dyn Codec, rng: &mut Rng, heads: usize, d: usize, what: &str) {
    for g in 0..heads {
        let n = c.len(g);
        let (k, v) = decoded(c, g, d);
        let q = normal(rng, d);
        for n_use in [n, n / 2 + 1, 1] {
            let n_use = n_use.min(n);
            let mut s = vec![0f32; n_use];
            c.scores(g, &q, &mut s);
            for j in 0..n_use {
                let kj = &k[j * d..(j + 1) * d];
                let want: f64 = q.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = q.iter().zip(kj).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!((s[j] as f64 - want).abs() <= ATTN_REL_TOL * mag + 1e-12, "{what} head {g} token {j}/{n_use}: score {} vs {want}", s[j]);
            }
            for (value, want) in [(false, &k), (true, &v)] {
                let mut seen = 0;
                c.for_each_decoded(g, value, 0..n_use, &mut |j, x| {
                    assert_eq!(j, seen, "{what} head {g}: rows out of order");
                    for ch in 0..d {
                        let w = want[j * d + ch];
                        assert!((x[ch] - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} head {g} token {j} channel {ch} ({}): {} vs {w}", if value { "V" } else { "K" }, x[ch]);
                    }
                    seen += 1;
                });
                assert_eq!(seen, n_use, "{what} head {g}: rows visited");
                // A tile of rows decoded at once, as attention reads them.
                for (lo, hi) in [(0, n_use), (n_use / 3, 2 * n_use / 3 + 1), (n_use - 1, n_use)] {
                    let mut tile = vec![f32::NAN; (hi - lo) * d];
                    c.decode_rows(g, value, lo..hi, &mut tile);
                    // The same values, bit for bit, as the row-by-row walk.
                    let mut walked = vec![f32::NAN; (hi - lo) * d];
                    c.for_each_decoded(g, value, lo..hi, &mut |j, x| walked[(j - lo) * d..(j - lo + 1) * d].copy_from_slice(x));
                    assert!(tile.iter().zip(&walked).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} head {g}: decode_rows {lo}..{hi} differs from for_each_decoded");
                    for (j, x) in (lo..hi).zip(tile.chunks_exact(d)) {
                        assert!(x.iter().zip(&want[j * d..(j + 1) * d]).all(|(&a, &b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())), "{what} head {g}: decode_rows row {j} of {lo}..{hi}");
                    }
                }
                // Any range of rows (as attention's segments ask for them), cut at what is held.
                for (lo, hi) in [(n_use / 3, 2 * n_use / 3 + 1), (n_use - 1, n_use + 5), (n_use / 2, n_use / 2), (7, 40)] {
                    let mut rows = Vec::new();
                    c.for_each_decoded(g, value, lo..hi, &mut |j, x| {
                        rows.push(j);
                        assert!(x.iter().zip(&want[j * d..(j + 1) * d]).all(|(&a, &b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())), "{what} head {g} row {j} of {lo}..{hi}");
                    });
                    assert_eq!(rows, (lo.min(n)..hi.min(n)).collect::<Vec<_>>(), "{what} head {g}: rows of {lo}..{hi}");
                }
            }
            let p: Vec<f32> = (0..n_use).map(|_| rng.next_f32()).collect();
            let mut out = vec![0.5f32; d];
            c.weighted_values(g, &p, &mut out);
            for ch in 0..d {
                let want: f64 = 0.5 + (0..n_use).map(|j| p[j] as f64 * v[j * d + ch] as f64).sum::<f64>();
                let mag: f64 = 0.5 + (0..n_use).map(|j| (p[j] as f64 * v[j * d + ch] as f64).abs()).sum::<f64>();
                assert!((out[ch] as f64 - want).abs() <= ATTN_REL_TOL * mag, "{what} head {g} channel {ch}/{n_use}: {} vs {want}", out[ch]);
            }
            // The direct paths (decoding's few queries per KV head): several queries at once,
            // over ranges of rows, from the stored form. Every compressed codec has them.
            let n_q = 3;
            let qs = normal(rng, n_q * d);
            for (lo, hi) in [(0, n_use), (n_use / 3, 2 * n_use / 3 + 1), (n_use - 1, n_use)] {
                let m = hi - lo;
                let mut sc = vec![f32::NAN; n_q * m];
                let direct = c.scores_direct(g, &qs, lo..hi, &mut sc, m);
                assert!(direct || what.contains("fp16"), "{what}: no direct scores");
                if !direct {
                    continue;
                }
                for i in 0..n_q {
                    for j in lo..hi {
                        let qk = || qs[i * d..(i + 1) * d].iter().zip(&k[j * d..(j + 1) * d]).map(|(&a, &b)| a as f64 * b as f64);
                        let (want, mag) = (qk().sum::<f64>(), qk().map(f64::abs).sum::<f64>());
                        let got = sc[i * m + j - lo] as f64;
                        assert!((got - want).abs() <= ATTN_REL_TOL * mag + 1e-12, "{what} head {g} query {i} token {j} of {lo}..{hi}: direct score {got} vs {want}");
                    }
                }
                let pp: Vec<f32> = (0..n_q * m).map(|_| rng.next_f32()).collect();
                let mut o = vec![0.5f32; n_q * d];
                assert!(c.weighted_direct(g, &pp, m, lo..hi, &mut o), "{what}: no direct values");
                for i in 0..n_q {
                    for ch in 0..d {
                        let pv = || (lo..hi).map(|j| pp[i * m + j - lo] as f64 * v[j * d + ch] as f64);
                        let (want, mag) = (0.5 + pv().sum::<f64>(), 0.5 + pv().map(f64::abs).sum::<f64>());
                        let got = o[i * d + ch] as f64;
                        assert!((got - want).abs() <= ATTN_REL_TOL * mag, "{what} head {g} query {i} channel {ch} of {lo}..{hi}: direct value {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[test]
fn attention_matches_decoded_tokens() {
    let seed = seed();
    let (heads, d) = (2, 32);
    for (name, p) in codecs() {
        for (n_prompt, n_decode) in [(0, 9), (1, 0), (37, 0), (40, 21)] {
            let mut rng = Rng::new(seed);
            let mut c = make_codec(name, &p, heads, d, seed).unwrap();
            fill(c.as_mut(), &mut rng, heads, d, n_prompt, n_decode);
            let what = format!("seed {seed} {} prompt {n_prompt} decode {n_decode}", c.describe());
            check_attention(c.as_ref(), &mut rng, heads, d, &what);
            let n = c.len(0);
            if n > 3 {
                let idx: Vec<usize> = (0..n).filter(|j| j % 3 == 1).collect();
                c.evict(0, &idx).unwrap();
                c.evict(1, &[0, n - 1]).unwrap();
                check_attention(c.as_ref(), &mut rng, heads, d, &format!("{what} evicted"));
            }
        }
    }
}

#[test]
fn eviction_keeps_survivors_bit_identical_and_frees_bytes() {
    let seed = seed();
    let (heads, d) = (2, 32);
    for (name, p) in codecs() {
        let mut rng = Rng::new(seed);
        let mut c = make_codec(name, &p, heads, d, seed).unwrap();
        fill(c.as_mut(), &mut rng, heads, d, 45, 12);
        let what = format!("seed {seed} {}", c.describe());
        let n = c.len(0);
        let (k0, v0) = decoded(c.as_ref(), 0, d);
        let (k1, v1) = decoded(c.as_ref(), 1, d);
        let before = c.bytes();
        let idx: Vec<usize> = (0..n).filter(|j| j % 4 == 0 || *j == n - 2).collect();
        c.evict(0, &idx).unwrap();
        assert_eq!(c.len(0), n - idx.len(), "{what}");
        assert_eq!(c.len(1), n, "{what}");
        let (k, v) = decoded(c.as_ref(), 0, d);
        let survivors: Vec<usize> = (0..n).filter(|j| !idx.contains(j)).collect();
        for (i, &j) in survivors.iter().enumerate() {
            assert_eq!(k[i * d..(i + 1) * d], k0[j * d..(j + 1) * d], "{what}: key of token {j}");
            assert_eq!(v[i * d..(i + 1) * d], v0[j * d..(j + 1) * d], "{what}: value of token {j}");
        }
        assert_eq!(decoded(c.as_ref(), 1, d), (k1, v1), "{what}: the other head changed");
        let after = c.bytes();
        assert!(after.total() < before.total(), "{what}: {before:?} -> {after:?}");
        assert!(after.codes <= before.codes && after.fp16 <= before.fp16 && after.outliers <= before.outliers && after.lowrank <= before.lowrank, "{what}");
        let all: Vec<usize> = (0..c.len(0)).collect();
        c.evict(0, &all).unwrap();
        assert_eq!(c.len(0), 0);
        c.evict(1, &(0..n).collect::<Vec<_>>()).unwrap();
        assert_eq!(c.bytes(), KvBytes::default(), "{what}: an empty cache holds bytes");
        assert!(c.evict(0, &[0]).is_err());
    }
}

#[test]
fn bytes_equal_their_formulas() {
    let seed = seed();
    let (heads, d) = (3, 32);
    for (n_prompt, n_decode) in [(0usize, 0usize), (1, 0), (0, 1), (5, 0), (19, 1), (20, 0), (64, 0), (70, 30), (0, 100), (130, 66)] {
        let n = n_prompt + n_decode;
        let mut rng = Rng::new(seed);
        let what = format!("seed {seed} prompt {n_prompt} decode {n_decode}");

        let mut c = Fp16Codec::new(heads, d).unwrap();
        fill(&mut c, &mut rng, heads, d, n_prompt, n_decode);
        assert_eq!(c.bytes(), Fp16Codec::formula_bytes(heads, d, n), "fp16 {what}");

        for bits in [2, 3, 4, 8] {
            let cfg = UniformConfig { bits, buffer: 20 };
            let mut c = make_codec("uniform", &params(|p| p.bits = Some(bits)), heads, d, seed).unwrap();
            fill(c.as_mut(), &mut rng, heads, d, n_prompt, n_decode);
            assert_eq!(c.bytes(), cfg.formula_bytes(heads, d, n), "uniform {bits} {what}");

            let cfg = GroupConfig { bits, group: 8, residual: 16 };
            let mut c = make_codec("group", &params(|p| {
                p.bits = Some(bits);
                p.group = Some(8);
                p.residual = Some(16)
            }), heads, d, seed)
            .unwrap();
            fill(c.as_mut(), &mut rng, heads, d, n_prompt, n_decode);
            assert_eq!(c.bytes(), cfg.formula_bytes(heads, d, n), "group {bits} {what}");
        }

        for backbone in [Backbone::Group, Backbone::Uniform] {
            let p = params(|p| {
                p.backbone = Some(backbone);
                p.bits = Some(3);
            });
            let cfg = GearConfig::from_params(&p).unwrap();
            let mut c = make_codec("gear", &p, heads, d, seed).unwrap();
            fill(c.as_mut(), &mut rng, heads, d, n_prompt, n_decode);
            assert_eq!(c.bytes(), cfg.formula_bytes(heads, d, n_prompt, n_decode, 0), "gear {backbone} {what}");
        }
    }
}

#[test]
fn bytes_after_eviction_follow_the_per_token_formula() {
    let seed = seed();
    let (heads, d) = (2, 32);
    let mut rng = Rng::new(seed);
    let cfg = UniformConfig { bits: 3, buffer: 10 };
    let mut c = kvgear::kv::codec::UniformCodec::new(heads, d, cfg).unwrap();
    fill(&mut c, &mut rng, heads, d, 33, 4);
    for g in 0..heads {
        c.evict(g, &[0, 5, 29, 31, 35]).unwrap();
    }
    let (nc, nb) = c.split_len(0);
    assert_eq!((nc, nb), (27, 5), "seed {seed}");
    assert_eq!(c.bytes(), cfg.formula_bytes_split(heads, d, nc, nb), "seed {seed}");
    let mut f = Fp16Codec::new(heads, d).unwrap();
    fill(&mut f, &mut rng, heads, d, 12, 0);
    for g in 0..heads {
        f.evict(g, &[1, 2, 11]).unwrap();
    }
    assert_eq!(f.bytes(), Fp16Codec::formula_bytes(heads, d, 9));
}

#[test]
fn three_bit_codes_take_three_bits() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let (heads, d) = (2, 64);
    for name in ["uniform", "group"] {
        let mut c = make_codec(name, &params(|p| {
            p.bits = Some(3);
            if name == "uniform" {
                p.buffer = Some(8);
            }
        }), heads, d, seed)
        .unwrap();
        fill(c.as_mut(), &mut rng, heads, d, 64, 0);
        assert_eq!(c.bytes().codes, heads * 2 * 64 * d * 3 / 8, "{name}");
        assert_eq!(c.bytes().fp16, 0);
    }
}

/// Frobenius error of head-major decoded K and V against the originals.
fn error(c: &dyn Codec, kk: &[Vec<f32>], vv: &[Vec<f32>], d: usize) -> (f64, f64) {
    let (mut ek, mut ev) = (0f64, 0f64);
    for g in 0..kk.len() {
        let (k, v) = decoded(c, g, d);
        ek += k.iter().zip(&kk[g]).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        ev += v.iter().zip(&vv[g]).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    }
    (ek.sqrt(), ev.sqrt())
}

#[test]
fn quantization_error_is_within_half_a_step() {
    let seed = seed();
    let (heads, d) = (2, 32);
    for bits in [2u32, 3, 4, 8] {
        let mut rng = Rng::new(seed);
        let mut c = make_codec("uniform", &params(|p| p.bits = Some(bits)), heads, d, seed).unwrap();
        let (kk, vv) = fill(c.as_mut(), &mut rng, heads, d, 40, 0);
        let levels = ((1u32 << bits) - 1) as f32;
        for g in 0..heads {
            let (k, v) = decoded(c.as_ref(), g, d);
            for (orig, dec) in [(&kk[g], &k), (&vv[g], &v)] {
                for j in 0..40 {
                    let row = &orig[j * d..(j + 1) * d];
                    let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    // The stored step is the f16 at or above the range over the levels, with the
                    // zero point rounded down: at most 2^-10 (relative) and a zero ulp wider.
                    let step = (hi - lo) / levels * (1.0 + 2f32.powi(-9)) + lo.abs() * 2f32.powi(-10) / levels;
                    for c in 0..d {
                        let err = (dec[j * d + c] - row[c]).abs();
                        assert!(err <= 0.5 * step + 1e-5, "seed {seed} bits {bits} head {g} token {j} ch {c}: err {err} step {step}");
                    }
                }
            }
        }
    }
}

#[test]
fn gear_beats_plain_quantization_on_keys_with_outlier_channels() {
    let seed = seed();
    let (heads, d) = (2, 64);
    for bits in [2u32, 3, 4] {
        let run = |name: &str, p: CodecParams| {
            let mut rng = Rng::new(seed);
            let mut c = make_codec(name, &p, heads, d, seed).unwrap();
            let (kk, vv) = fill(c.as_mut(), &mut rng, heads, d, 128, 64);
            error(c.as_ref(), &kk, &vv, d)
        };
        let uniform = run("uniform", params(|p| p.bits = Some(bits)));
        let group = run("group", params(|p| p.bits = Some(bits)));
        let gear = run("gear", params(|p| p.bits = Some(bits)));
        let gear_no_lowrank = run("gear", params(|p| {
            p.bits = Some(bits);
            p.rank = Some(0);
            p.rank_decode = Some(0)
        }));
        let gear_uniform = run("gear", params(|p| {
            p.bits = Some(bits);
            p.backbone = Some(Backbone::Uniform)
        }));
        let what = format!("seed {seed} bits {bits}: uniform {uniform:?} group {group:?} gear {gear:?} gear(rank 0) {gear_no_lowrank:?} gear(uniform) {gear_uniform:?}");
        assert!(gear.0 < group.0 && gear.0 < uniform.0, "{what}");
        assert!(gear.0 + gear.1 < group.0 + group.1 && gear.0 + gear.1 < uniform.0 + uniform.1, "{what}");
        assert!(gear.0 <= gear_no_lowrank.0 && gear.1 <= gear_no_lowrank.1, "{what}");
        assert!(gear_uniform.0 < uniform.0 && gear_uniform.1 <= uniform.1, "{what}");
    }
}

#[test]
fn gear_is_deterministic_for_a_seed() {
    let seed = seed();
    let (heads, d) = (2, 32);
    let p = params(|p| {
        p.group = Some(8);
        p.buffer = Some(16);
        p.bits = Some(2)
    });
    let build = |codec_seed: u64| {
        let mut rng = Rng::new(seed);
        let mut c = make_codec("gear", &p, heads, d, codec_seed).unwrap();
        fill(c.as_mut(), &mut rng, heads, d, 40, 20);
        (decoded(c.as_ref(), 0, d), decoded(c.as_ref(), 1, d))
    };
    assert_eq!(build(seed), build(seed), "seed {seed}");
    assert_ne!(build(seed), build(seed ^ 1), "seed {seed}: the power-iteration seed has no effect");
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let ok = |name: &str, p: CodecParams, d: usize| make_codec(name, &p, 2, d, 0).map(|_| ()).map_err(|e| e.to_string());
    assert!(ok("gear", CodecParams::default(), 64).is_ok());
    assert!(ok("group", CodecParams::default(), 64).is_ok());
    let cases: Vec<(&str, CodecParams, usize, &str)> = vec![
        ("uniform", params(|p| p.bits = Some(5)), 32, "bits"),
        ("group", params(|p| p.group = Some(12)), 32, "does not divide"),
        ("group", params(|p| {
            p.group = Some(8);
            p.residual = Some(12)
        }), 32, "multiple"),
        ("gear", params(|p| p.outliers = Some(1.0)), 64, "outliers"),
        ("gear", params(|p| p.outliers = Some(-0.1)), 64, "outliers"),
        ("gear", params(|p| p.outliers = Some(f64::NAN)), 64, "outliers"),
        ("gear", params(|p| p.buffer = Some(40)), 64, "multiple"),
        ("gear", params(|p| p.rank = Some(65)), 64, "rank"),
        ("gear", params(|p| p.iters = Some(0)), 64, "iters"),
        ("gear", params(|p| {
            p.backbone = Some(Backbone::Uniform);
            p.group = Some(8)
        }), 64, "does not apply"),
        ("uniform", params(|p| p.rank = Some(2)), 32, "does not apply"),
        ("fp16", params(|p| p.bits = Some(4)), 32, "does not apply"),
        ("lz4", CodecParams::default(), 32, "unknown"),
        ("uniform", CodecParams::default(), 0, "head_dim"),
        ("uniform", CodecParams::default(), 4096, "head_dim"),
    ];
    for (name, p, d, needle) in cases {
        let e = ok(name, p.clone(), d).expect_err(&format!("{name} {p:?} accepted"));
        assert!(e.contains(needle), "{name} {p:?}: {e:?} lacks {needle:?}");
    }
    let mut c = make_codec("gear", &params(|p| p.group = Some(8)), 2, 32, 0).unwrap();
    assert!(c.append(&[0.0; 10], &[0.0; 10], 1).is_err());
    assert!(c.append(&[0.0; 64], &[0.0; 64], 1).is_ok());
    assert!(c.evict(0, &[1]).is_err());
    assert!(c.evict(2, &[0]).is_err());
    assert!(c.evict(0, &[0, 0]).is_err());
    let mut s = [0f32; 1];
    c.scores(0, &[0.0; 5], &mut s);
    assert!(s[0].is_nan());
}
