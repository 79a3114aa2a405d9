//! The GGML block formats (`kvgear::format::quant`) against the `gguf` Python package, and the
//! quantizers' error bounds.
//!
//! The fixture under `tests/fixtures/quant/` is written by `scripts/gen_quant_fixture.py`; its
//! `manifest.json` records the gguf version it came from. Tests that draw random inputs take a
//! fresh seed (or `KVGEAR_TEST_SEED`) and print it when they fail.

mod common;

use std::path::PathBuf;

use half::f16;
use kvgear::format::quant::{dequantize, quantize, GgmlType};
use serde_json::Value;

/// llama.cpp's `test-quantize-fns` limit on its "total quantization error" (see
/// [`llama_cpp_total_error`]) for every type of 4 bits or more.
const MAX_QUANTIZATION_TOTAL_ERROR: f64 = 0.002;

/// Relative slack for f32 rounding in a bound: the quantizers and dequantizers round a few
/// products and sums of magnitude at most that of the block (each to 2^-24 relative), so a
/// computed error may exceed the exact-arithmetic bound by a few units of 2^-24 times the block's
/// magnitude. 2^-20 leaves a wide margin.
const F32_SLACK: f32 = 1.0 / (1 << 20) as f32;

/// f16 has an 11-bit significand: rounding to nearest moves a normal value by at most 2^-11 of
/// its magnitude.
const F16_REL_HALF_ULP: f32 = 1.0 / 2048.0;
/// The spacing of f16 subnormals is 2^-24; rounding there moves a value by at most half of it.
const F16_SUBNORMAL_HALF_ULP: f32 = 1.0 / (1u32 << 25) as f32;
/// bf16 has an 8-bit significand: rounding moves a value by at most 2^-8 of its magnitude.
const BF16_REL_HALF_ULP: f32 = 1.0 / 256.0;

/// Rounding `x / step` to the nearest level moves an element by at most half a step.
const HALF_STEP: f32 = 0.5;
/// q4_0 and q5_0 put the signed extreme `max` on the lowest level; an element equal to `-max`
/// would need one level above the top, is clamped to the top and lands a whole step away.
const FULL_STEP: f32 = 1.0;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant")
}

struct Fixture {
    manifest: Value,
    rows: usize,
    cols: usize,
    inputs: Vec<f32>,
}

impl Fixture {
    fn load() -> Fixture {
        let text = std::fs::read_to_string(fixture_dir().join("manifest.json")).expect(
            "read tests/fixtures/quant/manifest.json (scripts/gen_quant_fixture.py writes it)",
        );
        let manifest: Value = serde_json::from_str(&text).expect("manifest.json is JSON");
        let rows = manifest["inputs"]["rows"].as_u64().expect("inputs.rows") as usize;
        let cols = manifest["inputs"]["cols"].as_u64().expect("inputs.cols") as usize;
        let inputs = read_f32s(manifest["inputs"]["file"].as_str().expect("inputs.file"));
        assert_eq!(
            inputs.len(),
            rows * cols,
            "inputs.f32 holds rows x cols values"
        );
        Fixture {
            manifest,
            rows,
            cols,
            inputs,
        }
    }

    fn entry(&self, ty: GgmlType) -> &Value {
        let entry = &self.manifest["types"][ty.name()];
        assert!(entry.is_object(), "manifest has no entry for {ty}");
        assert_eq!(
            entry["id"].as_u64(),
            Some(u64::from(ty.id())),
            "{ty}: GGML id"
        );
        entry
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.inputs[r * self.cols..(r + 1) * self.cols]
    }
}

fn read_bytes(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_f32s(name: &str) -> Vec<f32> {
    let bytes = read_bytes(name);
    assert_eq!(bytes.len() % 4, 0, "{name}: not a whole number of f32");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A small seeded generator (SplitMix64) for test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The seed for randomized tests: `KVGEAR_TEST_SEED` when set, else fresh from the clock.
fn test_seed() -> u64 {
    if let Ok(s) = std::env::var("KVGEAR_TEST_SEED") {
        return s.parse().expect("KVGEAR_TEST_SEED is a u64");
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5EED)
}

/// `n` values of a mixture of distributions, one chosen per 32 elements, each with its own scale
/// `exp(2z)`: normal, uniform, heavy-tailed, all-positive, and normal with rare large outliers.
/// Normal draws are clipped to 4 sigma and `z` to 3, so magnitudes stay below
/// `exp(6) * 30 * 4 ≈ 48400`, inside f16's finite range.
fn random_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let normal = |rng: &mut Rng| rng.normal().clamp(-4.0, 4.0);
    let mut x = Vec::with_capacity(n);
    while x.len() < n {
        let kind = rng.next_u64() % 5;
        let scale = (2.0 * rng.normal().clamp(-3.0, 3.0)).exp();
        for _ in 0..32 {
            let v = match kind {
                0 => normal(rng),
                1 => 2.0 * rng.uniform() - 1.0,
                2 => normal(rng) / (rng.uniform() + 0.05).sqrt(),
                3 => normal(rng).abs() + 0.25,
                _ => {
                    if rng.uniform() < 0.02 {
                        30.0 * normal(rng)
                    } else {
                        normal(rng)
                    }
                }
            };
            x.push((scale * v) as f32);
        }
    }
    x.truncate(n);
    x
}

fn quantize_vec(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut q = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
    quantize(ty, x, &mut q).unwrap_or_else(|e| panic!("quantize {ty}: {e}"));
    q
}

fn dequantize_vec(ty: GgmlType, q: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n];
    dequantize(ty, q, &mut y).unwrap_or_else(|e| panic!("dequantize {ty}: {e}"));
    y
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

#[test]
fn fixture_records_its_gguf_version() {
    let fx = Fixture::load();
    let version = fx.manifest["gguf_version"].as_str().unwrap_or("");
    assert!(
        !version.is_empty(),
        "manifest.json must record the gguf version"
    );
    for ty in GgmlType::ALL {
        fx.entry(ty);
    }
}

/// Our dequantizer against gguf's on random valid blocks. The arithmetic is the same operations
/// in the same order (one f16 -> f32 widening, then products and one subtraction or addition, no
/// fused multiply-add), so every element must match bit for bit.
#[test]
fn dequantize_matches_gguf_exactly() {
    let fx = Fixture::load();
    for ty in GgmlType::ALL {
        let entry = fx.entry(ty);
        let blocks = read_bytes(entry["blocks"].as_str().expect("blocks"));
        let expected = read_f32s(
            entry["blocks_dequantized"]
                .as_str()
                .expect("blocks_dequantized"),
        );
        let n = entry["blocks_n_elems"].as_u64().expect("blocks_n_elems") as usize;
        assert_eq!(expected.len(), n, "{ty}: fixture sizes");
        let ours = dequantize_vec(ty, &blocks, n);
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{ty}: element {i} (block {}): ours {a:e}, gguf {b:e}",
                i / ty.block_elems()
            );
        }
    }
}

/// Our quantizer against gguf's, byte for byte, for every type gguf can quantize.
#[test]
fn quantize_matches_gguf_bytes() {
    let fx = Fixture::load();
    let mut n_compared = 0;
    for ty in GgmlType::ALL {
        let Some(file) = fx.entry(ty)["quantized"].as_str() else {
            continue;
        };
        let expected = read_bytes(file);
        let row_bytes = ty.row_bytes(fx.cols).expect("whole blocks");
        assert_eq!(expected.len(), fx.rows * row_bytes, "{ty}: fixture size");
        for r in 0..fx.rows {
            let ours = quantize_vec(ty, fx.row(r));
            let theirs = &expected[r * row_bytes..(r + 1) * row_bytes];
            if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
                let blk = i / ty.block_bytes();
                panic!(
                    "{ty}: row {r}, block {blk}, byte {} differs: ours {:02x?}, gguf {:02x?}",
                    i % ty.block_bytes(),
                    &ours[blk * ty.block_bytes()..(blk + 1) * ty.block_bytes()],
                    &theirs[blk * ty.block_bytes()..(blk + 1) * ty.block_bytes()],
                );
            }
        }
        n_compared += 1;
    }
    // gguf 0.19 quantizes f32, f16, bf16 and the five legacy block types; not the K-quants.
    assert!(
        n_compared >= 8,
        "expected gguf quantizations of at least 8 types, found {n_compared}"
    );
}

/// The largest error each element of `x` may have after `quantize` then `dequantize` as `ty`.
///
/// - Float types: half a unit in the last place of the stored value.
/// - Legacy block types: the quantizer picks an f32 step `d` from the block (q8_0
///   `amax / 127`, q4_0 `max / -8`, q5_0 `max / -16`, q4_1 `(max - min) / 15`, q5_1
///   `(max - min) / 31`) and rounds `x / d` to a level. Rounding costs [`HALF_STEP`] of `d`
///   ([`FULL_STEP`] for q4_0 and q5_0, whose top level is clamped); storing `d` as f16 moves level
///   `q` by `|q| * |d - f16(d)|`, at most the largest level's worth; storing the offset `min` as
///   f16 (q4_1, q5_1) moves every element by `|min - f16(min)|`.
/// - K-quants: requantization rounds every element to the nearest level of its sub-block's
///   *stored* step and offset, so an element inside the stored grid is at most half a stored step
///   away and one outside it is as far as the grid's nearer end. This checks the quantizer
///   against its own stored scales; how good those scales are is checked against a baseline in
///   `k_quants_beat_round_to_nearest_baseline` and against llama.cpp's limit in
///   `total_error_within_llama_cpp_limit`.
fn element_bounds(ty: GgmlType, x: &[f32], q: &[u8]) -> Vec<f32> {
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    let mut bounds = Vec::with_capacity(x.len());
    for (xb, qb) in x.chunks_exact(be).zip(q.chunks_exact(bb)) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let slack = F32_SLACK * amax;
        match ty {
            GgmlType::F32 => bounds.push(0.0),
            GgmlType::F16 => {
                bounds.push((xb[0].abs() * F16_REL_HALF_ULP).max(F16_SUBNORMAL_HALF_ULP))
            }
            GgmlType::BF16 => bounds.push(xb[0].abs() * BF16_REL_HALF_ULP),
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let signed_max = xb
                    .iter()
                    .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let (d, round, top) = match ty {
                    GgmlType::Q8_0 => (amax / 127.0, HALF_STEP, 127.0),
                    GgmlType::Q4_0 => (signed_max / -8.0, FULL_STEP, 8.0),
                    _ => (signed_max / -16.0, FULL_STEP, 16.0),
                };
                let b = round * d.abs() + top * (d - f16_round(d)).abs() + slack;
                bounds.extend(std::iter::repeat_n(b, be));
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let min = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = xb.iter().fold(-f32::MAX, |m, &v| m.max(v));
                let top = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
                let d = (max - min) / top;
                let b = HALF_STEP * d
                    + top * (d - f16_round(d)).abs()
                    + (min - f16_round(min)).abs()
                    + slack;
                bounds.extend(std::iter::repeat_n(b, be));
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let top = if ty == GgmlType::Q4K { 15.0 } else { 31.0 };
                let (d, dmin) = (f16_at(qb, 0), f16_at(qb, 2));
                for (j, xs) in xb.chunks_exact(32).enumerate() {
                    let (sc, m) = k4_scale_min(j, &qb[4..16]);
                    let step = d * f32::from(sc);
                    let offset = dmin * f32::from(m);
                    let (lo, hi) = (-offset, step * top - offset);
                    for &v in xs {
                        let outside = (lo - v).max(v - hi).max(0.0);
                        let s = F32_SLACK * (v.abs() + offset.abs() + hi.abs());
                        bounds.push(HALF_STEP * step + outside + s);
                    }
                }
            }
            GgmlType::Q6K => {
                let d = f16_at(qb, 208);
                for (j, xs) in xb.chunks_exact(16).enumerate() {
                    let step = d * f32::from(qb[192 + j] as i8);
                    let (a, b) = (-32.0 * step, 31.0 * step);
                    let (lo, hi) = (a.min(b), a.max(b));
                    for &v in xs {
                        let outside = (lo - v).max(v - hi).max(0.0);
                        let s = F32_SLACK * (v.abs() + hi.abs() + lo.abs());
                        bounds.push(HALF_STEP * step.abs() + outside + s);
                    }
                }
            }
        }
    }
    bounds
}

/// The 6-bit scale and min of sub-block `j` of q4_K/q5_K, decoded independently of the crate
/// from the packing described in llama.cpp's `get_scale_min_k4`.
fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3F, s[j + 4] & 0x3F)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc, m)
    }
}

fn check_round_trip(ty: GgmlType, x: &[f32], what: &str) {
    let q = quantize_vec(ty, x);
    let y = dequantize_vec(ty, &q, x.len());
    let bounds = element_bounds(ty, x, &q);
    for (i, ((&xv, &yv), &b)) in x.iter().zip(&y).zip(&bounds).enumerate() {
        let err = (xv - yv).abs();
        assert!(
            err <= b,
            "{ty} {what}: element {i} (block {}): x {xv:e} -> {yv:e}, error {err:e} > bound {b:e}",
            i / ty.block_elems()
        );
    }
}

#[test]
fn round_trip_within_bounds_on_fixture_inputs() {
    let fx = Fixture::load();
    for ty in GgmlType::ALL {
        for r in 0..fx.rows {
            check_round_trip(ty, fx.row(r), &format!("fixture row {r}"));
        }
    }
}

/// Real weights: matrices of the default model (dequantized from its Q4_1 and Q8_0 blocks),
/// each cut to whole 256-element super-blocks; every type round-trips within its bounds. The
/// relative RMS error per type is printed (what quantizing trained weights costs).
#[test]
fn round_trip_within_bounds_on_real_weights() {
    let Some(path) = common::default_model() else { return };
    let f = kvgear::format::gguf::GgufFile::open(&path).unwrap();
    let mut x = Vec::new();
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.12.ffn_down.weight", "blk.29.ffn_up.weight"] {
        let t = f.require_tensor(name).unwrap();
        let n = t.n_elements() as usize;
        let mut v = vec![0.0f32; n];
        dequantize(t.ty, f.tensor_data(t), &mut v).unwrap();
        // A slice from the middle of each matrix, 64 super-blocks.
        let start = (n / 2) / 256 * 256;
        x.extend_from_slice(&v[start..start + 64 * 256]);
    }
    for ty in GgmlType::ALL {
        check_round_trip(ty, &x, "default model weights");
        let y = dequantize_vec(ty, &quantize_vec(ty, &x), x.len());
        let rel = (squared_error(&x, &y) / squared_error(&x, &vec![0.0; x.len()])).sqrt();
        eprintln!("{ty:<5} relative RMS error on real weights {rel:.4}");
    }
}

#[test]
fn round_trip_within_bounds_on_random_inputs() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    for ty in GgmlType::ALL {
        let x = random_inputs(&mut rng, 16 * 256);
        check_round_trip(ty, &x, &format!("random inputs, seed {seed}"));
    }
}

/// llama.cpp's `test-quantize-fns` total error: the inputs `0.1 + 2 cos(i)` for 4096 elements,
/// and the error `sqrt(sum of squared differences) / n`, exactly as that test computes it.
fn llama_cpp_total_error(ty: GgmlType) -> f64 {
    let n = 32 * 128;
    let x: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    let y = dequantize_vec(ty, &quantize_vec(ty, &x), n);
    let sum: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    sum.sqrt() / n as f64
}

#[test]
fn total_error_within_llama_cpp_limit() {
    for ty in GgmlType::ALL {
        let err = llama_cpp_total_error(ty);
        assert!(
            err < MAX_QUANTIZATION_TOTAL_ERROR,
            "{ty}: total error {err} >= {MAX_QUANTIZATION_TOTAL_ERROR}"
        );
    }
}

/// A deliberately simple encoder into the same K-quant block format, for comparison: each
/// sub-block takes its plain min/max (q4_K, q5_K) or its signed absolute maximum (q6_K) as its
/// range, the sub-block scales are rounded to the format's 6 or 8 bits against the largest, and
/// every element is rounded to the nearest level of its stored scale. Same bits per weight as the
/// real quantizer, no search.
fn baseline_k_quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).expect("whole super-blocks")];
    for (xb, b) in x
        .chunks_exact(256)
        .zip(out.chunks_exact_mut(ty.block_bytes()))
    {
        match ty {
            GgmlType::Q4K | GgmlType::Q5K => baseline_q45_k(ty, xb, b),
            GgmlType::Q6K => baseline_q6_k(xb, b),
            _ => unreachable!("baseline only for K-quants"),
        }
    }
    out
}

fn baseline_q45_k(ty: GgmlType, x: &[f32], b: &mut [u8]) {
    let top: u8 = if ty == GgmlType::Q4K { 15 } else { 31 };
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for (j, xs) in x.chunks_exact(32).enumerate() {
        let lo = xs.iter().fold(0.0f32, |m, &v| m.min(v));
        let hi = xs.iter().fold(f32::MIN, |m, &v| m.max(v)).max(lo);
        scales[j] = (hi - lo) / f32::from(top);
        mins[j] = -lo;
    }
    let max_scale = scales.iter().fold(0.0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0.0f32, |m, &v| m.max(v));
    b[0..2].copy_from_slice(&f16::from_f32(max_scale / 63.0).to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(max_min / 63.0).to_le_bytes());
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let six_bit = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        sc[j] = six_bit(scales[j], d);
        m[j] = six_bit(mins[j], dmin);
    }
    let s = &mut b[4..16];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    let mut levels = [0u8; 256];
    for (j, xs) in x.chunks_exact(32).enumerate() {
        let step = d * f32::from(sc[j]);
        let offset = dmin * f32::from(m[j]);
        for (l, &v) in xs.iter().enumerate() {
            levels[32 * j + l] = if step > 0.0 {
                ((v + offset) / step).round().clamp(0.0, f32::from(top)) as u8
            } else {
                0
            };
        }
    }
    if ty == GgmlType::Q4K {
        for c in 0..4 {
            for l in 0..32 {
                b[16 + 32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
            }
        }
    } else {
        let (qh, qs) = b[16..].split_at_mut(32);
        qh.fill(0);
        for c in 0..4 {
            for l in 0..32 {
                let (lo, hi) = (levels[64 * c + l], levels[64 * c + 32 + l]);
                qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
                qs[32 * c + l] = (lo & 0x0F) | ((hi & 0x0F) << 4);
            }
        }
    }
}

fn baseline_q6_k(x: &[f32], b: &mut [u8]) {
    let mut scales = [0.0f32; 16];
    for (j, xs) in x.chunks_exact(16).enumerate() {
        let signed_max = xs
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        scales[j] = signed_max / -32.0;
    }
    let max_scale = scales
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    b.fill(0);
    if max_scale == 0.0 {
        return;
    }
    b[208..210].copy_from_slice(&f16::from_f32(max_scale / -128.0).to_le_bytes());
    let d = f16_at(b, 208);
    let mut levels = [0u8; 256];
    for (j, xs) in x.chunks_exact(16).enumerate() {
        let sc = if d != 0.0 {
            (scales[j] / d).round().clamp(-128.0, 127.0) as i8
        } else {
            0
        };
        b[192 + j] = sc as u8;
        let step = d * f32::from(sc);
        for (l, &v) in xs.iter().enumerate() {
            let q = if step != 0.0 {
                (v / step).round().clamp(-32.0, 31.0)
            } else {
                0.0
            };
            levels[16 * j + l] = (q as i32 + 32) as u8;
        }
    }
    for h in 0..2 {
        for l in 0..32 {
            let e = |k: usize| levels[128 * h + l + k];
            b[64 * h + l] = (e(0) & 0x0F) | ((e(64) & 0x0F) << 4);
            b[64 * h + l + 32] = (e(32) & 0x0F) | ((e(96) & 0x0F) << 4);
            b[128 + 32 * h + l] =
                (e(0) >> 4) | ((e(32) >> 4) << 2) | ((e(64) >> 4) << 4) | ((e(96) >> 4) << 6);
        }
    }
}

fn squared_error(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(a, b)| f64::from(a - b).powi(2)).sum()
}

/// Summed over super-blocks: each one's squared reconstruction error relative to its energy.
/// Normalising per super-block keeps the few super-blocks of largest magnitude in a random row
/// from deciding a comparison alone.
fn relative_error(x: &[f32], y: &[f32]) -> f64 {
    x.chunks_exact(256)
        .zip(y.chunks_exact(256))
        .map(|(xb, yb)| {
            squared_error(xb, yb) / squared_error(xb, &[0.0; 256]).max(f64::MIN_POSITIVE)
        })
        .sum()
}

/// The K-quant quantizers search for better sub-block scales and offsets than the plain range;
/// their reconstruction error on random super-blocks must be no worse than that of the simple
/// round-to-nearest encoder above, which spends the same bits. The error is compared per
/// super-block ([`relative_error`]) rather than as one sum over the row: llama.cpp's q6_K fit
/// weights each element by `x²` instead of minimising plain squared error, and on a row whose sum
/// is dominated by one outlier-heavy super-block that can favour the baseline while losing on
/// nearly every other super-block.
#[test]
fn k_quants_beat_round_to_nearest_baseline() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let gaussian: Vec<f32> = (0..64 * 256).map(|_| rng.normal() as f32).collect();
        let mixed = random_inputs(&mut rng, 64 * 256);
        for (what, x) in [("gaussian", &gaussian), ("mixed", &mixed)] {
            let ours = dequantize_vec(ty, &quantize_vec(ty, x), x.len());
            let base = dequantize_vec(ty, &baseline_k_quant(ty, x), x.len());
            let (e_ours, e_base) = (relative_error(x, &ours), relative_error(x, &base));
            assert!(
                e_ours <= e_base,
                "{ty} on {what} inputs (seed {seed}): relative error {e_ours:e} > baseline {e_base:e}"
            );
        }
    }
}

/// The baseline encoder writes valid blocks: a check of the test's own helper, so that the
/// comparison above compares like with like.
#[test]
fn baseline_encoder_reconstructs_its_inputs() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    let x: Vec<f32> = (0..4 * 256).map(|_| rng.normal() as f32).collect();
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let y = dequantize_vec(ty, &baseline_k_quant(ty, &x), x.len());
        let rms = (squared_error(&x, &y) / x.len() as f64).sqrt();
        assert!(rms < 0.15, "{ty} baseline (seed {seed}): rms error {rms}");
    }
}

#[test]
fn zero_blocks_quantize_to_zero() {
    let x = vec![0.0f32; 512];
    for ty in GgmlType::ALL {
        let y = dequantize_vec(ty, &quantize_vec(ty, &x), x.len());
        assert!(
            y.iter().all(|&v| v == 0.0),
            "{ty}: zeros do not round-trip to zeros"
        );
    }
    for ty in [
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
    ] {
        let q = quantize_vec(ty, &x);
        assert!(
            q.iter().all(|&b| b == 0),
            "{ty}: an all-zero block is all-zero bytes"
        );
    }
}

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let n = 2 * ty.block_elems().max(32);
        let nb = ty.row_bytes(n).expect("whole blocks");
        let x = vec![0.5f32; n];
        let q = vec![0u8; nb];

        let mut y = vec![0.0f32; n];
        assert!(
            dequantize(ty, &q[..nb - 1], &mut y).is_err(),
            "{ty}: short source"
        );
        assert!(
            dequantize(ty, &[q.clone(), vec![0]].concat(), &mut y).is_err(),
            "{ty}: long source"
        );
        let mut out = vec![0u8; nb];
        assert!(
            quantize(ty, &x[..n - 1], &mut out).is_err(),
            "{ty}: input one element short"
        );
        assert!(
            quantize(ty, &x, &mut out[..nb - 1]).is_err(),
            "{ty}: short destination"
        );
        assert!(
            quantize(ty, &x, &mut vec![0u8; nb + 1]).is_err(),
            "{ty}: long destination"
        );
        if ty.is_quantized() {
            let mut y = vec![0.0f32; n + 1];
            assert!(dequantize(ty, &q, &mut y).is_err(), "{ty}: partial block");
            let mut y = vec![0.0f32; n - 1];
            assert!(dequantize(ty, &q, &mut y).is_err(), "{ty}: partial block");
        }
        assert!(
            dequantize(ty, &[], &mut []).is_ok(),
            "{ty}: an empty row is fine"
        );
        assert!(
            quantize(ty, &[], &mut []).is_ok(),
            "{ty}: an empty row is fine"
        );
    }
}

#[test]
fn block_types_reject_non_finite_inputs() {
    for ty in GgmlType::ALL {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![1.0f32; 256];
            x[77] = bad;
            let mut q = vec![0u8; ty.row_bytes(256).expect("whole blocks")];
            let res = quantize(ty, &x, &mut q);
            assert_eq!(res.is_err(), ty.is_quantized(), "{ty} with {bad}: {res:?}");
        }
    }
}

#[test]
fn float_types_keep_special_values() {
    let x = [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 65504.0, 1e-8];
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let y = dequantize_vec(ty, &quantize_vec(ty, &x), x.len());
        assert_eq!(y[0], f32::INFINITY, "{ty}");
        assert_eq!(y[1], f32::NEG_INFINITY, "{ty}");
        assert_eq!(y[3].to_bits(), (-0.0f32).to_bits(), "{ty}: sign of zero");
        let nan = dequantize_vec(ty, &quantize_vec(ty, &[f32::NAN]), 1);
        assert!(nan[0].is_nan(), "{ty}: NaN stays NaN");
    }
}

/// The weighted squared error of `x ≈ step * l + lo` with `l` the levels given.
fn weighted_error(x: &[f32], w: &[f32], levels: &[u8], step: f64, lo: f64) -> f64 {
    x.iter()
        .zip(w)
        .zip(levels)
        .map(|((&v, &wi), &l)| f64::from(wi) * (step * f64::from(l) + lo - f64::from(v)).powi(2))
        .sum()
}

/// Brute force for the q4_K / q5_K sub-block fit `x ≈ step * l + lo`, `l` in 0..=nmax, `lo <= 0`:
/// every pair (step, lo) on a dense grid (`GRID` steps from 0.6 to 1.4 times the range over nmax,
/// `GRID` offsets within four steps of the smallest element) rounds `x` to levels, and those
/// levels get the weighted least-squares step and offset, as the quantizer refits its own. Returns
/// the smallest weighted error found.
fn brute_force_asymmetric(nmax: u8, x: &[f32], w: &[f32]) -> f64 {
    const GRID: usize = 160;
    let (min, max) = x.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let min = f64::from(min.min(0.0));
    let range = f64::from(max) - min;
    if range <= 0.0 {
        return weighted_error(x, w, &vec![0; x.len()], 0.0, min);
    }
    let base = range / f64::from(nmax);
    let mut levels = vec![0u8; x.len()];
    let mut best = f64::MAX;
    for i in 0..GRID {
        let step = base * (0.6 + 0.8 * i as f64 / (GRID - 1) as f64);
        for j in 0..GRID {
            let lo = (min + base * (8.0 * j as f64 / (GRID - 1) as f64 - 4.0)).min(0.0);
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = ((f64::from(v) - lo) / step).round().clamp(0.0, f64::from(nmax)) as u8;
            }
            let (mut sw, mut sl, mut sl2, mut sx, mut sxl) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for ((&v, &wi), &l) in x.iter().zip(w).zip(&levels) {
                let (v, wi, l) = (f64::from(v), f64::from(wi), f64::from(l));
                sw += wi;
                sl += wi * l;
                sl2 += wi * l * l;
                sx += wi * v;
                sxl += wi * v * l;
            }
            let det = sw * sl2 - sl * sl;
            let (mut s, mut o) = (step, lo);
            if det > 0.0 {
                s = (sw * sxl - sx * sl) / det;
                o = (sl2 * sx - sl * sxl) / det;
                if o > 0.0 {
                    o = 0.0;
                    s = sxl / sl2;
                }
            }
            best = best.min(weighted_error(x, w, &levels, step, lo)).min(weighted_error(x, w, &levels, s, o));
        }
    }
    best
}

/// Exhaustive search for the q6_K sub-block fit `x ≈ scale * l`, `l` in -nmax..nmax, weights
/// `x²`: the levels of `round(x * iscale)` change only where `iscale` crosses `(k + 0.5) / x_i`,
/// so one `iscale` between each pair of neighbouring crossings visits every assignment that any
/// common scale produces; each gets its weighted least-squares scale. Returns the smallest error.
fn exhaustive_symmetric(nmax: i32, x: &[f32]) -> f64 {
    let mut cuts: Vec<f64> = Vec::new();
    for &v in x {
        if v != 0.0 {
            for k in 0..=nmax + 1 {
                let c = (f64::from(k) + 0.5) / f64::from(v).abs();
                cuts.push(c);
                cuts.push(-c);
            }
        }
    }
    cuts.push(0.0);
    cuts.sort_by(f64::total_cmp);
    let mut best = f64::MAX;
    for pair in cuts.windows(2) {
        let iscale = 0.5 * (pair[0] + pair[1]);
        let (mut sxl, mut sl2) = (0.0f64, 0.0f64);
        let levels: Vec<f64> = x
            .iter()
            .map(|&v| (f64::from(v) * iscale).round().clamp(f64::from(-nmax), f64::from(nmax - 1)))
            .collect();
        for (&v, &l) in x.iter().zip(&levels) {
            let (v, w) = (f64::from(v), f64::from(v) * f64::from(v));
            sxl += w * v * l;
            sl2 += w * l * l;
        }
        let scale = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
        let err: f64 = x
            .iter()
            .zip(&levels)
            .map(|(&v, &l)| {
                let v = f64::from(v);
                v * v * (v - scale * l).powi(2)
            })
            .sum();
        best = best.min(err);
    }
    best
}

/// How close llama.cpp's sub-block searches come to a brute-force search of the same weighted
/// objective, as (bound on the ratio of the mean relative errors, bound on one sub-block's excess
/// error as a fraction of its energy), over 96 random sub-blocks (384 for q6_K). The search tries
/// 21 (q4_K), 16 (q5_K) or 19 (q6_K) scales around its starting fit; the brute force a 160 x 160
/// grid of steps and offsets (q4_K, q5_K) or every assignment a common scale can produce (q6_K).
/// Measured over seeds: ratios 1.02-1.03 (q4_K), 1.07-1.10 (q5_K, whose window `-0.5 + 0.1 * is`
/// is narrow for 31 levels), 1.21-1.22 (q6_K, 19 scales within 0.9 levels of the absmax fit);
/// excesses at most 1.5e-3, 3.7e-4 and 9.3e-5. The starting fits alone give 1.24-1.29, 1.30-1.34
/// and 1.57-1.63, so a search that stopped refining fails; a broken one fails by far more.
const Q4K_SEARCH_BOUNDS: (f64, f64) = (1.06, 5e-3);
const Q5K_SEARCH_BOUNDS: (f64, f64) = (1.15, 2e-3);
const Q6K_SEARCH_BOUNDS: (f64, f64) = (1.30, 5e-4);

#[test]
fn k_quant_searches_come_close_to_brute_force() {
    let seed = test_seed();
    let mut rng = Rng(seed);
    const N_SUB_BLOCKS: usize = 96;
    for (what, nmax, rmin, rdelta, nstep, bounds) in
        [("q4_K", 15u8, -1.0f32, 0.1f32, 20, Q4K_SEARCH_BOUNDS), ("q5_K", 31, -0.5, 0.1, 15, Q5K_SEARCH_BOUNDS)]
    {
        let x_all = random_inputs(&mut rng, 32 * N_SUB_BLOCKS);
        let mut ratios: Vec<Fit> = Vec::new();
        for x in x_all.chunks_exact(32) {
            let av = (x.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
            let w: Vec<f32> = x.iter().map(|v| av + v.abs()).collect();
            let (mut levels, mut aux) = ([0u8; 32], [0u8; 32]);
            let (scale, the_min) =
                kvgear::format::quant::make_qkx2_quants(i32::from(nmax), x, &w, &mut levels, &mut aux, rmin, rdelta, nstep);
            let e_search = weighted_error(x, &w, &levels, f64::from(scale), -f64::from(the_min));
            let e_brute = brute_force_asymmetric(nmax, x, &w).max(f64::MIN_POSITIVE);
            // nstep = -1: no candidate scales, only the min/max fit the search starts from.
            let (s0, m0) = kvgear::format::quant::make_qkx2_quants(i32::from(nmax), x, &w, &mut levels, &mut aux, rmin, rdelta, -1);
            let e_start = weighted_error(x, &w, &levels, f64::from(s0), -f64::from(m0));
            let signal = weighted_error(x, &w, &[0; 32], 0.0, 0.0).max(f64::MIN_POSITIVE);
            ratios.push(Fit { search: e_search / signal, start: e_start / signal, brute: e_brute / signal });
        }
        check_ratios(what, seed, &ratios, bounds, false);
    }
    let x_all = random_inputs(&mut rng, 16 * 4 * N_SUB_BLOCKS);
    let mut ratios: Vec<Fit> = Vec::new();
    for x in x_all.chunks_exact(16) {
        let mut levels = [0u8; 16];
        let scale = kvgear::format::quant::make_qx_quants(32, x, &mut levels);
        let e_search: f64 = x
            .iter()
            .zip(&levels)
            .map(|(&v, &l)| {
                let v = f64::from(v);
                v * v * (v - f64::from(scale) * f64::from(i32::from(l) - 32)).powi(2)
            })
            .sum();
        let e_brute = exhaustive_symmetric(32, x).max(f64::MIN_POSITIVE);
        let e_start = absmax_fit_error(32, x);
        let signal = x.iter().map(|&v| f64::from(v).powi(4)).sum::<f64>().max(f64::MIN_POSITIVE);
        ratios.push(Fit { search: e_search / signal, start: e_start / signal, brute: e_brute / signal });
    }
    check_ratios("q6_K", seed, &ratios, Q6K_SEARCH_BOUNDS, true);
}

/// The weighted error of q6_K's starting point alone: levels `round(x * -nmax / max)`, `max` the
/// signed element of largest magnitude, with their least-squares scale.
fn absmax_fit_error(nmax: i32, x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        return 0.0;
    }
    let iscale = -f64::from(nmax) / f64::from(max);
    let levels: Vec<f64> =
        x.iter().map(|&v| (f64::from(v) * iscale).round().clamp(f64::from(-nmax), f64::from(nmax - 1))).collect();
    let (mut sxl, mut sl2) = (0.0, 0.0);
    for (&v, &l) in x.iter().zip(&levels) {
        let (v, w) = (f64::from(v), f64::from(v) * f64::from(v));
        sxl += w * v * l;
        sl2 += w * l * l;
    }
    let scale = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
    x.iter().zip(&levels).map(|(&v, &l)| f64::from(v).powi(2) * (f64::from(v) - scale * l).powi(2)).sum()
}

/// One sub-block's weighted errors, each relative to the sub-block's weighted energy (the error of
/// storing zeros), so that sub-blocks of every magnitude count alike.
struct Fit {
    search: f64,
    start: f64,
    brute: f64,
}

/// Checks the searches' relative errors against the brute force's: their means' ratio within
/// `mean_max`, and no sub-block's search error above the brute force's by more than `excess_max`
/// of its energy.
fn check_ratios(what: &str, seed: u64, fits: &[Fit], (mean_max, excess_max): (f64, f64), exhaustive: bool) {
    let sum = |f: fn(&Fit) -> f64| fits.iter().map(f).sum::<f64>();
    let (search, start, brute) = (sum(|f| f.search), sum(|f| f.start), sum(|f| f.brute).max(f64::MIN_POSITIVE));
    let mean = search / brute;
    let mean_start = start / brute;
    let worst = fits.iter().map(|f| f.search - f.brute).fold(f64::MIN, f64::max);
    let best = fits.iter().map(|f| f.search - f.brute).fold(f64::MAX, f64::min);
    eprintln!(
        "{what}: relative weighted error, search / brute force {mean:.4} (starting fit alone {mean_start:.4}); \
         per sub-block excess over brute force from {best:.2e} to {worst:.2e} (seed {seed})"
    );
    assert!(mean < mean_start, "{what} (seed {seed}): the search ({mean}) does no better than its start ({mean_start})");
    assert!(mean <= mean_max, "{what} (seed {seed}): search / brute force {mean} > {mean_max}");
    assert!(worst <= excess_max, "{what} (seed {seed}): a sub-block's excess {worst} > {excess_max}");
    if exhaustive {
        // f32 sums in the search against f64 here: 1e-6 of the energy covers the rounding.
        assert!(best >= -1e-6, "{what} (seed {seed}): the search beat the exhaustive optimum by {best}");
    }
}
