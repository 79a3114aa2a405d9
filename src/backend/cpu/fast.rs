//! The fast CPU backend: quantized-activation integer dot products (AVX2 / AVX-512 VNNI, chosen
//! at run time, with a portable fallback), row-parallel matmuls on a spinning thread pool that
//! lives for the whole run (`pool`), weights read once per block of tokens during prefill, and head-parallel
//! attention. Every path is checked against `reference` (tests/backend.rs).
//!
//! The numerics reproduce llama.cpp's x86 CPU path (ggml at 0c1e570, built with GCC `-O3
//! -march=native`, which contracts `a*b + c` into FMAs) bit for bit, so greedy text matches it
//! token for token; every deviation flips int8 roundings downstream and shows up in the text.
//! - Matmul, 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): each 32-value activation block
//!   is quantized as `quantize_row_q8_0/q8_1` do (`x * (127/amax)` rounded half to even, an f16
//!   scale, and for Q8_1 the f16 `d * sum`); a weight block contributes `fma(d_w*d_x,
//!   isum, acc)` across 8 lanes, its minimum `fma(m_w, s_x, summs)`; lanes are folded as
//!   `hsum_float_8`. With AVX2 or AVX-512 VNNI (the same results), Q4_K and Q6_K dot their codes
//!   with the same int8 activations (llama.cpp uses Q8_K, so these differ from it); the other
//!   k-quants and the float types, and every k-quant on the portable path, are dequantized block
//!   by block and dotted in f32.
//! - RMSNorm: squares in f32 summed in f64, mean and scale in f32, `(x * scale) * w`.
//! - RoPE: angles `pos * theta_scale^i` by repeated f32 multiplication, `sinf`/`cosf`, and the
//!   rotation `fma(x0, cos, -(x1*sin))`, `fma(x0, sin, x1*cos)`.
//! - SwiGLU: SiLU through ggml's vectorised `expf` polynomial in its AVX-512 form, on every SIMD
//!   path (the AVX2 and portable paths compute the same bits; ggml's own 256-bit form is a
//!   variant that can round differently).
//! - Attention: ggml's single-chunk CPU flash attention (Q in f16, `vec_dot_f16`'s reduction order,
//!   online softmax with an f16 value accumulator).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Result;
use half::f16;
use crate::backend::cpu::pool;
use crate::backend::cpu::reference::{RopeParams, RopeStyle};
use crate::format::quant::{dequantize, GgmlType};
use crate::kv::Fp16Layer;
use crate::model::weights::Tensor;

/// Which SIMD path the integer dot products take on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Scalar,
    Avx2,
    Avx512Vnni,
}

/// 0 until detected; then 1 + the `Simd` discriminant.
static SIMD: AtomicU8 = AtomicU8::new(0);

fn encode(level: Simd) -> u8 {
    match level {
        Simd::Scalar => 1,
        Simd::Avx2 => 2,
        Simd::Avx512Vnni => 3,
    }
}

/// Every SIMD level this machine can run, slowest first.
pub fn supported_simd() -> Vec<Simd> {
    let best = detected_simd();
    [Simd::Scalar, Simd::Avx2, Simd::Avx512Vnni].into_iter().filter(|&l| encode(l) <= encode(best)).collect()
}

/// Selects the SIMD path (tests run every path the machine supports). Every path computes the
/// same function, so switching while other threads compute is harmless.
pub fn set_simd(level: Simd) -> Result<()> {
    if !supported_simd().contains(&level) {
        anyhow::bail!("this CPU cannot run the {level:?} path");
    }
    SIMD.store(encode(level), Ordering::Relaxed);
    Ok(())
}

/// The best SIMD level this machine supports.
pub fn detected_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Simd::Avx512Vnni;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Simd::Avx2;
        }
    }
    Simd::Scalar
}

pub fn simd() -> Simd {
    match SIMD.load(Ordering::Relaxed) {
        1 => Simd::Scalar,
        2 => Simd::Avx2,
        3 => Simd::Avx512Vnni,
        _ => {
            let l = detected_simd();
            SIMD.store(encode(l), Ordering::Relaxed);
            l
        }
    }
}

pub fn simd_level() -> &'static str {
    match simd() {
        Simd::Scalar => "scalar",
        Simd::Avx2 => "avx2",
        Simd::Avx512Vnni => "avx512-vnni",
    }
}

/// An activation row quantized in 32-value blocks: int8 codes, the f16-rounded scale of each
/// block, and the integer sum of each block's codes.
#[derive(Default)]
pub(crate) struct Q8Row {
    pub(crate) qs: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) sum: Vec<i32>,
    /// `d * sum` rounded to f16, as `block_q8_1` stores it: the types with a minimum use it.
    pub(crate) s: Vec<f32>,
}

/// Quantizes `x` (a multiple of 32 long) to int8 blocks as llama.cpp's x86 `quantize_row_q8_0`
/// and `quantize_row_q8_1` do: `x * (127 / amax)` rounded half to even.
pub(crate) fn quantize_q8(x: &[f32], out: &mut Q8Row) {
    let nb = x.len() / 32;
    out.qs.resize(x.len(), 0);
    out.d.resize(nb, 0.0);
    out.sum.resize(nb, 0);
    out.s.resize(nb, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        // SAFETY: the level was detected on this CPU.
        unsafe { x86::quantize_q8(x, out) };
        return;
    }
    for b in 0..nb {
        let xb = &x[b * 32..(b + 1) * 32];
        let amax = xb.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut s = 0i32;
        for (q, &v) in out.qs[b * 32..(b + 1) * 32].iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            s += r;
        }
        out.d[b] = f16::from_f32(d).to_f32();
        out.sum[b] = s;
        out.s[b] = f16::from_f32(d * s as f32).to_f32();
    }
}

/// Four consecutive activation blocks laid out for [`x86::dot_q4_0`]: the int8 codes of
/// elements 0..16 and 16..32 of each block (dotted with a Q4_0 block's low and high nibbles), for
/// each of the 4 lanes a block's dot products fill `-8 * (x[4j..4j+4] + x[16+4j..16+4j+4])` (Q4_0's
/// offset folded into the integer sum), and the blocks' scales.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct XGroup {
    lo: [i8; 64],
    hi: [i8; 64],
    corr: [i32; 16],
    d: [f32; 4],
}

/// The activation row `x` (a multiple of 4 blocks) as groups of 4 blocks.
fn xgroups(x: &Q8Row, out: &mut Vec<XGroup>) {
    out.clear();
    for (q, d) in x.qs.chunks_exact(128).zip(x.d.chunks_exact(4)) {
        let mut g = XGroup { lo: [0; 64], hi: [0; 64], corr: [0; 16], d: [0.0; 4] };
        for (i, qb) in q.chunks_exact(32).enumerate() {
            g.lo[16 * i..16 * i + 16].copy_from_slice(&qb[..16]);
            g.hi[16 * i..16 * i + 16].copy_from_slice(&qb[16..]);
            for j in 0..4 {
                let s: i32 = (0..4).map(|k| qb[4 * j + k] as i32 + qb[16 + 4 * j + k] as i32).sum();
                g.corr[4 * i + j] = -8 * s;
            }
            g.d[i] = d[i];
        }
        out.push(g);
    }
}

/// How a 32-element block type stores its codes.
#[derive(Clone, Copy)]
struct BlockKind {
    /// Bytes per block.
    bytes: usize,
    /// Offset subtracted from the unsigned code (8 for Q4_0, 16 for Q5_0, 0 otherwise).
    offset: i32,
    /// Whether the block carries a minimum after its scale (Q4_1, Q5_1).
    has_min: bool,
    /// Whether the codes have a fifth bit in a 32-bit word (Q5_0, Q5_1).
    five_bit: bool,
    /// Plain signed 8-bit codes (Q8_0).
    int8: bool,
}

fn block_kind(ty: GgmlType) -> Option<BlockKind> {
    let k = |bytes, offset, has_min, five_bit, int8| Some(BlockKind { bytes, offset, has_min, five_bit, int8 });
    match ty {
        GgmlType::Q4_0 => k(18, 8, false, false, false),
        GgmlType::Q4_1 => k(20, 0, true, false, false),
        GgmlType::Q5_0 => k(22, 16, false, true, false),
        GgmlType::Q5_1 => k(24, 0, true, true, false),
        GgmlType::Q8_0 => k(34, 0, false, false, true),
        _ => None,
    }
}

#[inline]
fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The unsigned codes of one 32-element block (0..15 or 0..31; for Q8_0 the signed codes as i8
/// reinterpreted) and its scale and minimum.
#[inline]
fn unpack_block(k: BlockKind, blk: &[u8], codes: &mut [u8; 32]) -> (f32, f32) {
    let d = rd_f16(blk, 0);
    if k.int8 {
        codes.copy_from_slice(&blk[2..34]);
        return (d, 0.0);
    }
    let (m, qh_at) = if k.has_min { (rd_f16(blk, 2), 4) } else { (0.0, 2) };
    let qs_at = if k.five_bit { qh_at + 4 } else { qh_at };
    let qh = if k.five_bit { u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]) } else { 0 };
    for j in 0..16 {
        let b = blk[qs_at + j];
        codes[j] = (b & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        codes[j + 16] = (b >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    (d, m)
}

/// Dot products of one weight row (32-element blocks) with `xs.len()` quantized activation rows,
/// portable code.
fn dot_row_scalar(k: BlockKind, row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
    let mut codes = [0u8; 32];
    for o in out.iter_mut() {
        *o = 0.0;
    }
    for (b, blk) in row.chunks_exact(k.bytes).enumerate() {
        let (d, m) = unpack_block(k, blk, &mut codes);
        for (x, o) in xs.iter().zip(out.iter_mut()) {
            let xq = &x.qs[b * 32..(b + 1) * 32];
            let isum: i32 = if k.int8 {
                codes.iter().zip(xq).map(|(&c, &q)| (c as i8) as i32 * q as i32).sum()
            } else {
                codes.iter().zip(xq).map(|(&c, &q)| c as i32 * q as i32).sum()
            };
            let dx = x.d[b];
            *o += d * dx * (isum - k.offset * x.sum[b]) as f32 + m * x.s[b];
        }
    }
}

/// `$f::<N>(args)` with the token count `N` (1 to 4) a constant, so kernels keep one
/// accumulator per token in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! with_tokens {
    ($n:expr, $($f:ident)::+ ($($a:expr),*)) => {
        match $n {
            1 => $($f)::+::<1>($($a),*),
            2 => $($f)::+::<2>($($a),*),
            3 => $($f)::+::<3>($($a),*),
            _ => $($f)::+::<4>($($a),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockKind, Q8Row};
    use std::arch::x86_64::*;


    /// 32 unsigned codes of a 4/5-bit block, in element order, in one register.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes_u8(k: BlockKind, blk: *const u8) -> __m256i {
        let (qh_at, qs_at) = match (k.has_min, k.five_bit) {
            (false, false) => (0, 2),
            (true, false) => (0, 4),
            (false, true) => (2, 6),
            (true, true) => (4, 8),
        };
        let raw = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        let mut v = _mm256_set_m128i(hi, lo);
        if k.five_bit {
            let qh = (blk.add(qh_at) as *const u32).read_unaligned();
            // Spread bit j of qh to byte j: byte j takes byte j/8 of qh, then tests bit j%8.
            let bcast = _mm256_set1_epi32(qh as i32);
            let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
            let bytes = _mm256_shuffle_epi8(bcast, shuf);
            let bits = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bits), bits);
            v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        }
        v
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Integer dot of 32 unsigned weight codes with 32 int8 activations: 8 partial i32 sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn idot_avx2(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl,avx512bw")]
    unsafe fn idot_vnni(w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
    }

    /// An f16 value at `p` (unaligned), converted with F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// `quantize_q8` with AVX2: the same `x * (127 / amax)` products, rounded half to even by
    /// `cvtps2dq` under the default rounding mode, as llama.cpp's AVX2 `quantize_row_q8_1` does.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8(x: &[f32], out: &mut Q8Row) {
        let nb = x.len() / 32;
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..nb {
            let p = x.as_ptr().add(b * 32);
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = [0, 1, 2, 3].map(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
            let s = _mm_cvtsi128_si32(s4);
            // Pack i32 -> i16 -> i8 (values are within [-127, 127]) and undo the lane interleave.
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(w01, w23);
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(out.qs.as_mut_ptr().add(b * 32) as *mut __m256i, bytes);
            *out.d.get_unchecked_mut(b) = half::f16::from_f32(d).to_f32();
            *out.sum.get_unchecked_mut(b) = s;
            *out.s.get_unchecked_mut(b) = half::f16::from_f32(d * s as f32).to_f32();
        }
    }

    /// SwiGLU's gate with AVX-512 as ggml's `ggml_vec_swiglu_f32` computes it on this CPU: 16
    /// lanes of `x / (1 + ggml_v_expf(-x)) * g` (the polynomial of `super::ggml_expf`, scaled by
    /// `scalef`), the tail through the scalar twin.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let nx = _mm512_sub_ps(_mm512_setzero_ps(), x);
            let r = c(0x4b40_0000);
            let z = _mm512_fmadd_ps(nx, c(0x3fb8_aa3b), r);
            let nn = _mm512_sub_ps(z, r);
            let b = _mm512_fnmadd_ps(nn, c(0x35bf_be8e), _mm512_fnmadd_ps(nn, c(0x3f31_7200), nx));
            let big = _mm512_cmp_ps_mask(_mm512_abs_ps(nn), _mm512_set1_ps(192.0), _CMP_GT_OQ);
            let u = _mm512_mul_ps(b, b);
            let j = _mm512_fmadd_ps(
                _mm512_fmadd_ps(_mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)), u, _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb))),
                u,
                _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
            );
            let mut e = _mm512_scalef_ps(j, nn);
            if big != 0 {
                let le = _mm512_cmp_ps_mask(nn, _mm512_setzero_ps(), _CMP_LE_OQ);
                let alt = _mm512_mask_blend_ps(le, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
                e = _mm512_mask_blend_ps(big, e, alt);
            }
            let y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(y, _mm512_loadu_ps(up.as_ptr().add(i))));
            i += 16;
        }
        super::silu_mul_scalar(&mut gate[i..n], &up[i..n]);
    }

    /// [`super::silu_mul_scalar`] in 8 lanes with AVX2 and FMA, the same operations in the same
    /// order (`2^n` as the product of two powers of two built from exponent bits), so it equals
    /// the scalar path bit for bit; the tail through the scalar twin.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let c = |b: u32| _mm256_set1_ps(f32::from_bits(b));
        let bias = _mm256_set1_epi32(127);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let nx = _mm256_sub_ps(_mm256_setzero_ps(), x);
            let r = c(0x4b40_0000);
            let z = _mm256_fmadd_ps(nx, c(0x3fb8_aa3b), r);
            let nn = _mm256_sub_ps(z, r);
            let b = _mm256_fnmadd_ps(nn, c(0x35bf_be8e), _mm256_fnmadd_ps(nn, c(0x3f31_7200), nx));
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_andnot_ps(_mm256_set1_ps(-0.0), nn), _mm256_set1_ps(192.0));
            let u = _mm256_mul_ps(b, b);
            let j = _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)), u, _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb))),
                u,
                _mm256_fmadd_ps(c(0x3f7f_fff6), b, _mm256_set1_ps(1.0)),
            );
            // k1 = k / 2 rounded toward zero, k2 = k - k1, as the scalar code splits k.
            let k = _mm256_cvtps_epi32(nn);
            let k1 = _mm256_srai_epi32::<1>(_mm256_add_epi32(k, _mm256_srli_epi32::<31>(k)));
            let k2 = _mm256_sub_epi32(k, k1);
            let p1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k1, bias)));
            let p2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k2, bias)));
            let mut e = _mm256_mul_ps(_mm256_mul_ps(j, p1), p2);
            if _mm256_movemask_ps(big) != 0 {
                let le = _mm256_cmp_ps::<_CMP_LE_OQ>(nn, _mm256_setzero_ps());
                let alt = _mm256_blendv_ps(_mm256_set1_ps(f32::INFINITY), _mm256_setzero_ps(), le);
                e = _mm256_blendv_ps(e, alt, big);
            }
            let y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(y, _mm256_loadu_ps(up.as_ptr().add(i))));
            i += 8;
        }
        super::silu_mul_scalar(&mut gate[i..n], &up[i..n]);
    }

    /// `super::online_softmax` compiled with FMA, so its `mul_add` is an instruction, not a call.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn online_softmax(keys: &super::Keys, acc: &mut [half::f16], scores: Option<&mut Vec<f32>>) -> (f32, f32) {
        super::online_softmax(keys, acc, scores)
    }

    /// `super::rope_rows` compiled with FMA, so its `mul_add`s are instructions, not calls.
    #[target_feature(enable = "fma")]
    pub unsafe fn rope_rows(x: &mut [f32], pos0: usize, p: &super::RopeParams) {
        super::rope_rows(x, pos0, p)
    }

    macro_rules! dot_rows {
        ($name:ident, $name_n:ident, $inner:ident, $feat:literal, $idot:ident) => {
            /// Dot products of one weight row with N quantized activation rows; the block
            /// layout is a compile-time choice so the inner loop has no branches.
            #[target_feature(enable = $feat)]
            unsafe fn $inner<const INT8: bool, const MIN: bool, const FIVE: bool, const N: usize>(
                k: BlockKind,
                row: &[u8],
                xs: &[&Q8Row],
                out: &mut [f32],
            ) {
                debug_assert!(xs.len() >= N && out.len() >= N);
                let nb = row.len() / k.bytes;
                // N is a constant so the token loops unroll and the accumulators stay in registers.
                let mut acc = [_mm256_setzero_ps(); N];
                let mut tail = [0.0f32; N];
                let xq: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
                let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
                let xsm: [*const f32; N] = std::array::from_fn(|t| xs[t].s.as_ptr());
                let xsum: [*const i32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
                let p = row.as_ptr();
                let offset = k.offset;
                for b in 0..nb {
                    let blk = p.add(b * k.bytes);
                    let d = f16_at(blk);
                    if INT8 {
                        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                        let aw = _mm256_sign_epi8(w, w);
                        for t in 0..N {
                            let x = _mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i);
                            let sx = _mm256_sign_epi8(x, w);
                            let s = _mm256_cvtepi32_ps($idot(aw, sx));
                            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * *xd[t].add(b)), s, acc[t]);
                        }
                    } else {
                        let w = codes_u8(k, blk);
                        let m = if MIN { f16_at(blk.add(2)) } else { 0.0 };
                        for t in 0..N {
                            let x = _mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i);
                            let s = _mm256_cvtepi32_ps($idot(w, x));
                            let dx = *xd[t].add(b);
                            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), s, acc[t]);
                            if MIN {
                                // llama.cpp's `summs += m * s`, which GCC contracts to an FMA.
                                tail[t] = m.mul_add(*xsm[t].add(b), tail[t]);
                            } else {
                                tail[t] -= d * dx * (offset * *xsum[t].add(b)) as f32;
                            }
                        }
                    }
                }
                for t in 0..N {
                    out[t] = hsum(acc[t]) + tail[t];
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn $name_n<const N: usize>(k: BlockKind, row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                match (k.int8, k.has_min, k.five_bit) {
                    (true, _, _) => $inner::<true, false, false, N>(k, row, xs, out),
                    (false, false, false) => $inner::<false, false, false, N>(k, row, xs, out),
                    (false, true, false) => $inner::<false, true, false, N>(k, row, xs, out),
                    (false, false, true) => $inner::<false, false, true, N>(k, row, xs, out),
                    (false, true, true) => $inner::<false, true, true, N>(k, row, xs, out),
                }
            }

            /// Dot products of one weight row with 1 to 4 quantized activation rows.
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(k: BlockKind, row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                with_tokens!(xs.len(), $name_n(k, row, xs, out))
            }
        };
    }

    /// Dot products of one Q4_0 row (`ng` groups of 4 blocks at `p`) with N activation rows,
    /// 4 blocks at a time in 512-bit registers: each block's 16 code bytes go to one 128-bit lane,
    /// the low and high nibbles are dotted with the block's first and second 16 activations by
    /// two `vpdpbusd`s that start from the offset correction, and each lane's 4 partial sums are
    /// scaled by its block's `d_w * d_x` into the accumulator. The row is read front to back, one
    /// stream for the prefetchers; its codes and scales are unpacked once for all N rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_q4_0<const N: usize>(p: *const u8, ng: usize, xs: &[&[super::XGroup]], out: &mut [f32]) {
        let m4 = _mm512_set1_epi8(0x0F);
        let expand = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut acc = [_mm512_setzero_ps(); N];
        let xp: [*const super::XGroup; N] = std::array::from_fn(|t| xs[t].as_ptr());
        for g in 0..ng {
            let b = p.add(g * 72);
            let q01 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(b.add(2) as *const __m128i)),
                _mm_loadu_si128(b.add(20) as *const __m128i),
            );
            let q23 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(b.add(38) as *const __m128i)),
                _mm_loadu_si128(b.add(56) as *const __m128i),
            );
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q01), q23);
            let lo = _mm512_and_si512(q, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
            let rd = |i: usize| (b.add(18 * i) as *const u16).read_unaligned() as i16;
            let dw = _mm_cvtph_ps(_mm_setr_epi16(rd(0), rd(1), rd(2), rd(3), 0, 0, 0, 0));
            for t in 0..N {
                let xg = &*xp[t].add(g);
                let corr = _mm512_load_si512(xg.corr.as_ptr() as *const __m512i);
                let xlo = _mm512_load_si512(xg.lo.as_ptr() as *const __m512i);
                let xhi = _mm512_load_si512(xg.hi.as_ptr() as *const __m512i);
                let isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo, xlo), hi, xhi);
                let sc = _mm_mul_ps(dw, _mm_load_ps(xg.d.as_ptr()));
                let sc = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(sc));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[t]);
            }
        }
        for t in 0..N {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
    }

    /// Dot products of 4 consecutive Q4_0 rows (the first at `p`, `row_bytes` apart, `4 * ng`
    /// blocks each) with N activation rows, for prefill: each row's block takes one 128-bit lane,
    /// so an activation block, loaded once, serves 4 rows. Four streams per thread slow decoding
    /// (`dot_q4_0` reads one), but prefill reads each row from cache for many tokens.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot4_q4_0<const N: usize>(p: *const u8, row_bytes: usize, ng: usize, xs: &[&[super::XGroup]], out: &mut [[f32; 4]]) {
        let m4 = _mm512_set1_epi8(0x0F);
        let expand = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut acc = [_mm512_setzero_ps(); N];
        let xp: [*const super::XGroup; N] = std::array::from_fn(|t| xs[t].as_ptr());
        let rows = [p, p.add(row_bytes), p.add(2 * row_bytes), p.add(3 * row_bytes)];
        for b in 0..4 * ng {
            let o = b * 18;
            let q01 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(rows[0].add(o + 2) as *const __m128i)),
                _mm_loadu_si128(rows[1].add(o + 2) as *const __m128i),
            );
            let q23 = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(rows[2].add(o + 2) as *const __m128i)),
                _mm_loadu_si128(rows[3].add(o + 2) as *const __m128i),
            );
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q01), q23);
            let lo = _mm512_and_si512(q, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
            let rd = |r: usize| (rows[r].add(o) as *const u16).read_unaligned() as i16;
            let dw = _mm_cvtph_ps(_mm_setr_epi16(rd(0), rd(1), rd(2), rd(3), 0, 0, 0, 0));
            let dw = _mm512_permutexvar_ps(expand, _mm512_castps128_ps512(dw));
            let (g, i) = (b / 4, b % 4);
            for t in 0..N {
                let xg = &*xp[t].add(g);
                let xlo = _mm512_broadcast_i32x4(_mm_load_si128(xg.lo.as_ptr().add(16 * i) as *const __m128i));
                let xhi = _mm512_broadcast_i32x4(_mm_load_si128(xg.hi.as_ptr().add(16 * i) as *const __m128i));
                let corr = _mm512_broadcast_i32x4(_mm_load_si128(xg.corr.as_ptr().add(4 * i) as *const __m128i));
                let isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo, xlo), hi, xhi);
                let sc = _mm512_mul_ps(dw, _mm512_set1_ps(xg.d[i]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[t]);
            }
        }
        for t in 0..N {
            let lanes: [__m128; 4] = [
                _mm512_extractf32x4_ps::<0>(acc[t]),
                _mm512_extractf32x4_ps::<1>(acc[t]),
                _mm512_extractf32x4_ps::<2>(acc[t]),
                _mm512_extractf32x4_ps::<3>(acc[t]),
            ];
            for (r, v) in lanes.into_iter().enumerate() {
                let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                out[t][r] = _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps::<1>(v, v)));
            }
        }
    }

    /// The k-quant kernels, once per integer dot product: `idot_vnni` (`vpdpbusd`) and
    /// `idot_avx2` (`vpmaddubsw` then `vpmaddwd`). Neither product saturates: a pair of Q4_K codes
    /// times activations is at most `2 * 15 * 127`, of Q6_K codes `2 * 63 * 127`, of the offset 32
    /// `2 * 32 * 127`, all inside i16, so both give the same exact sums and the same results.
    macro_rules! kquant_dots {
        ($q4k:ident, $q4k_n:ident, $q6k:ident, $q6k_n:ident, $feat:literal, $idot:ident) => {
            /// Dot products of one Q4_K row with 1 to 4 activation rows quantized in 32-value blocks,
            /// which are Q4_K's sub-blocks: the 32 codes of a sub-block (low or high nibbles of 32
            /// code bytes) are dotted with the activation block by the integer dot product and
            /// scaled by `d * sc * d_x` into the accumulator; the minimum contributes
            /// `dmin * m * d_x * sum(x)`.
            #[target_feature(enable = $feat)]
            pub unsafe fn $q4k(row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                with_tokens!(xs.len(), $q4k_n(row, xs, out))
            }

            #[target_feature(enable = $feat)]
            unsafe fn $q4k_n<const N: usize>(row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                let nsb = row.len() / 144;
                let m4 = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); N];
                let mut mins = [0.0f32; N];
                let xq: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
                let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
                let xsum: [*const i32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
                for sb in 0..nsb {
                    let blk = &row[sb * 144..(sb + 1) * 144];
                    let (d, dmin) = (f16_at(blk.as_ptr()), f16_at(blk.as_ptr().add(2)));
                    let scales = &blk[4..16];
                    for c in 0..4 {
                        let q = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c) as *const __m256i);
                        let codes = [_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4)];
                        for (h, &w) in codes.iter().enumerate() {
                            let j = 2 * c + h;
                            let (sc, m) = crate::format::quant::scale_min_k4(j, scales);
                            let (ds, dm) = (d * f32::from(sc), dmin * f32::from(m));
                            let b = sb * 8 + j;
                            for t in 0..N {
                                let x = _mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i);
                                let s = _mm256_cvtepi32_ps($idot(w, x));
                                let dx = *xd[t].add(b);
                                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(ds * dx), s, acc[t]);
                                mins[t] += dm * dx * *xsum[t].add(b) as f32;
                            }
                        }
                    }
                }
                for t in 0..N {
                    out[t] = hsum(acc[t]) - mins[t];
                }
            }

            /// Dot products of one Q6_K row with 1 to 4 activation rows quantized in 32-value blocks.
            /// Each 32 codes of a superblock are assembled in element order (4 low bits from `ql`, 2
            /// high from `qh`) and dotted with the activation block by the integer dot product; lanes
            /// 0..4 and 4..8 are the block's two 16-value sub-blocks, so `(sum q*x - 32 sum x)` times
            /// their scales is exact in i32, and `d_w * d_x` scales it into the accumulator.
            #[target_feature(enable = $feat)]
            pub unsafe fn $q6k(row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                with_tokens!(xs.len(), $q6k_n(row, xs, out))
            }

            #[target_feature(enable = $feat)]
            unsafe fn $q6k_n<const N: usize>(row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
                let nsb = row.len() / 210;
                let m4 = _mm256_set1_epi8(0x0F);
                let m2 = _mm256_set1_epi8(0x03);
                let k32 = _mm256_set1_epi8(32);
                let mut acc = [_mm256_setzero_ps(); N];
                let xq: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
                let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
                for sb in 0..nsb {
                    let blk = row.as_ptr().add(sb * 210);
                    let d = f16_at(blk.add(208));
                    for n in 0..2 {
                        let ql = blk.add(64 * n);
                        let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                        let sc = blk.add(192 + 8 * n) as *const i8;
                        let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                        let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                        let codes = [
                            _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2))),
                            _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2))),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2))),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2))),
                        ];
                        for (m, &q) in codes.iter().enumerate() {
                            let scale = _mm256_set_m128i(_mm_set1_epi32(*sc.add(2 * m + 1) as i32), _mm_set1_epi32(*sc.add(2 * m) as i32));
                            let b = sb * 8 + n * 4 + m;
                            for t in 0..N {
                                let x = _mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i);
                                let qx = $idot(q, x);
                                let sx = $idot(k32, x);
                                let s = _mm256_mullo_epi32(_mm256_sub_epi32(qx, sx), scale);
                                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * *xd[t].add(b)), acc[t]);
                            }
                        }
                    }
                }
                for t in 0..N {
                    out[t] = hsum(acc[t]);
                }
            }
        };
    }

    kquant_dots!(dot_q4_k, dot_q4_k_n, dot_q6_k, dot_q6_k_n, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", idot_vnni);
    kquant_dots!(dot_q4_k_avx2, dot_q4_k_n_avx2, dot_q6_k_avx2, dot_q6_k_n_avx2, "avx2,fma,f16c", idot_avx2);

    /// `dot_rows_vnni` for two rows at once, for the 4- and 5-bit types: each row's block fills
    /// one 256-bit half of a 512-bit register, so every lane computes exactly what the one-row
    /// kernel's lane computes (the same products, the same fused multiply-adds in the same order,
    /// the same final folding), with half the instructions per row.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot2_rows_vnni(k: BlockKind, rows: [&[u8]; 2], xs: &[&Q8Row], out: [&mut [f32]; 2]) {
        match (k.has_min, k.five_bit, xs.len()) {
            (false, false, 1) => dot2_impl::<false, false, 1>(k, rows, xs, out),
            (false, false, 2) => dot2_impl::<false, false, 2>(k, rows, xs, out),
            (false, false, 3) => dot2_impl::<false, false, 3>(k, rows, xs, out),
            (false, false, _) => dot2_impl::<false, false, 4>(k, rows, xs, out),
            (true, false, 1) => dot2_impl::<true, false, 1>(k, rows, xs, out),
            (true, false, 2) => dot2_impl::<true, false, 2>(k, rows, xs, out),
            (true, false, 3) => dot2_impl::<true, false, 3>(k, rows, xs, out),
            (true, false, _) => dot2_impl::<true, false, 4>(k, rows, xs, out),
            (false, true, 1) => dot2_impl::<false, true, 1>(k, rows, xs, out),
            (false, true, 2) => dot2_impl::<false, true, 2>(k, rows, xs, out),
            (false, true, 3) => dot2_impl::<false, true, 3>(k, rows, xs, out),
            (false, true, _) => dot2_impl::<false, true, 4>(k, rows, xs, out),
            (true, true, 1) => dot2_impl::<true, true, 1>(k, rows, xs, out),
            (true, true, 2) => dot2_impl::<true, true, 2>(k, rows, xs, out),
            (true, true, 3) => dot2_impl::<true, true, 3>(k, rows, xs, out),
            (true, true, _) => dot2_impl::<true, true, 4>(k, rows, xs, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot2_impl<const MIN: bool, const FIVE: bool, const N: usize>(k: BlockKind, rows: [&[u8]; 2], xs: &[&Q8Row], out: [&mut [f32]; 2]) {
        debug_assert!(!k.int8 && k.has_min == MIN && k.five_bit == FIVE && xs.len() >= N);
        let nb = rows[0].len() / k.bytes;
        let mut acc = [_mm512_setzero_ps(); N];
        let mut tail = [[0.0f32; N]; 2];
        let xq: [*const i8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr());
        let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
        let xsm: [*const f32; N] = std::array::from_fn(|t| xs[t].s.as_ptr());
        let xsum: [*const i32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
        let p = [rows[0].as_ptr(), rows[1].as_ptr()];
        let offset = k.offset;
        for b in 0..nb {
            let blk = [p[0].add(b * k.bytes), p[1].add(b * k.bytes)];
            let d = [f16_at(blk[0]), f16_at(blk[1])];
            let m = if MIN { [f16_at(blk[0].add(2)), f16_at(blk[1].add(2))] } else { [0.0; 2] };
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(codes_u8(k, blk[0])), codes_u8(k, blk[1]));
            let dw = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_set1_ps(d[0])),
                _mm256_castps_pd(_mm256_set1_ps(d[1])),
            ));
            for t in 0..N {
                let x = _mm512_broadcast_i64x4(_mm256_loadu_si256(xq[t].add(b * 32) as *const __m256i));
                let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x));
                let dx = *xd[t].add(b);
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(dx)), s, acc[t]);
                for r in 0..2 {
                    if MIN {
                        tail[r][t] = m[r].mul_add(*xsm[t].add(b), tail[r][t]);
                    } else {
                        tail[r][t] -= d[r] * dx * (offset * *xsum[t].add(b)) as f32;
                    }
                }
            }
        }
        let [o0, o1] = out;
        for t in 0..N {
            let lo = _mm512_castps512_ps256(acc[t]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[t])));
            o0[t] = hsum(lo) + tail[0][t];
            o1[t] = hsum(hi) + tail[1][t];
        }
    }

    dot_rows!(dot_rows_avx2, dot_rows_avx2_n, dot_rows_avx2_impl, "avx2,fma,f16c", idot_avx2);
    dot_rows!(dot_rows_vnni, dot_rows_vnni_n, dot_rows_vnni_impl, "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw", idot_vnni);

    /// f32 dot product of two equal-length slices.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for j in 0..4 {
                let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * j));
                acc[j] = _mm256_fmadd_ps(x, y, acc[j]);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            let y = _mm256_loadu_ps(b.as_ptr().add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// Dot product of two f16 vectors as ggml_vec_dot_f16 computes it with 512-bit vectors: four
    /// accumulators of 16 lanes over each 64-element step (fused multiply-adds), folded as
    /// `(a0 + a2) + (a1 + a3)`, the 16 lanes reduced as `_mm512_reduce_add_ps` does (halves,
    /// then quarters, then pairs), and a tail past the last whole step added in f64.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_f16(a: &[half::f16], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr() as *const u16);
        let mut acc = [_mm256_setzero_ps(); 8];
        let np = n - n % 64;
        let mut i = 0;
        while i < np {
            for (k, r) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i + 8 * k) as *const __m128i));
                let y = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i + 8 * k) as *const __m128i));
                *r = _mm256_fmadd_ps(x, y, *r);
            }
            i += 64;
        }
        // acc[2j + h] holds lanes 8h..8h+8 of accumulator j.
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        let mut s = hsum(_mm256_add_ps(hi, lo)) as f64;
        while i < n {
            s += (a[i].to_f32() * b[i].to_f32()) as f64;
            i += 1;
        }
        s as f32
    }

    /// `y = f16(y + x * v)` element-wise, f16 accumulator (as ggml_vec_mad_f16).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad_f16(y: &mut [half::f16], x: &[half::f16], v: f32) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr() as *mut u16, x.as_ptr() as *const u16);
        let vv = _mm256_set1_ps(v);
        let mut i = 0;
        while i + 8 <= n {
            let yy = _mm256_cvtph_ps(_mm_loadu_si128(py.add(i) as *const __m128i));
            let xx = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
            let r = _mm256_fmadd_ps(xx, vv, yy);
            _mm_storeu_si128(py.add(i) as *mut __m128i, _mm256_cvtps_ph::<0>(r));
            i += 8;
        }
        while i < n {
            y[i] = half::f16::from_f32(x[i].to_f32().mul_add(v, y[i].to_f32()));
            i += 1;
        }
    }

    /// `y = f16(y * v)` element-wise.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_f16(y: &mut [half::f16], v: f32) {
        let n = y.len();
        let py = y.as_mut_ptr() as *mut u16;
        let vv = _mm256_set1_ps(v);
        let mut i = 0;
        while i + 8 <= n {
            let yy = _mm256_cvtph_ps(_mm_loadu_si128(py.add(i) as *const __m128i));
            _mm_storeu_si128(py.add(i) as *mut __m128i, _mm256_cvtps_ph::<0>(_mm256_mul_ps(yy, vv)));
            i += 8;
        }
        while i < n {
            y[i] = half::f16::from_f32(y[i].to_f32() * v);
            i += 1;
        }
    }

}

fn dot_rows(k: BlockKind, row: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
    match simd() {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { x86::dot_rows_vnni(k, row, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { x86::dot_rows_avx2(k, row, xs, out) },
        _ => dot_row_scalar(k, row, xs, out),
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        return unsafe { x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    static ROW_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Tokens processed together per weight row: the row's codes are unpacked once for all of them.
const TOKEN_TILE: usize = 4;
/// Rows per parallel task in prefill: large enough to amortise scheduling, small enough to
/// balance 2..16 threads.
const ROWS_PER_TASK: usize = 16;
/// From this many tokens on, activations are quantized in parallel (one row takes well under a
/// microsecond, less than starting a parallel loop).
const PARALLEL_QUANTIZE_TOKENS: usize = 8;

thread_local! {
    pub(crate) static Q8_SCRATCH: RefCell<Vec<Q8Row>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    static XGROUP_SCRATCH: RefCell<Vec<Vec<XGroup>>> = const { RefCell::new(Vec::new()) };
}

/// Q4_0 rows of a multiple of 4 blocks with AVX-512: a row at a time when decoding
/// ([`x86::dot_q4_0`]), 4 rows at a time in prefill ([`x86::dot4_q4_0`]). The sums are associated
/// differently from `dot_rows` (16 lanes over 4 blocks rather than 8 over one), which llama.cpp
/// does not reproduce either: it repacks Q4_0 for its own 8-row kernel.
#[cfg(target_arch = "x86_64")]
fn matmul_q4_0(w: &Tensor, x: &[f32], n_tokens: usize, rows_per_task: usize, outp: OutPtr) {
    let (n_cols, n_rows) = (w.n_cols, w.n_rows);
    let ng = n_cols / 128;
    XGROUP_SCRATCH.with(|cell| {
        let mut xgs = cell.borrow_mut();
        if xgs.len() < n_tokens {
            xgs.resize_with(n_tokens, Vec::new);
        }
        let prepare = |t: usize, xg: &mut Vec<XGroup>| {
            Q8_SCRATCH.with(|q| {
                let mut q = q.borrow_mut();
                if q.is_empty() {
                    q.push(Q8Row::default());
                }
                quantize_q8(&x[t * n_cols..(t + 1) * n_cols], &mut q[0]);
                xgroups(&q[0], xg);
            })
        };
        if n_tokens < PARALLEL_QUANTIZE_TOKENS {
            for (t, xg) in xgs[..n_tokens].iter_mut().enumerate() {
                prepare(t, xg);
            }
        } else {
            pool::for_each_mut(&mut xgs[..n_tokens], prepare);
        }
        let xgs = &xgs[..n_tokens];
        if n_tokens > TOKEN_TILE && n_rows.is_multiple_of(4) && rows_per_task.is_multiple_of(4) {
            let rb = w.row_bytes();
            pool::for_each(n_rows.div_ceil(rows_per_task), |task| {
                let outp = outp;
                let r1 = ((task + 1) * rows_per_task).min(n_rows);
                let mut res = [[0.0f32; 4]; TOKEN_TILE];
                // Token tiles outside, the task's 16 rows inside (see `matmul`).
                for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                    let nt = (n_tokens - t0).min(TOKEN_TILE);
                    let xs: [&[XGroup]; TOKEN_TILE] = std::array::from_fn(|i| &xgs[t0 + i.min(nt - 1)][..ng]);
                    for r in (task * rows_per_task..r1).step_by(4) {
                        let p = w.row(r).as_ptr();
                        // SAFETY: AVX-512 VNNI was detected; rows r..r+4 are whole rows of the
                        // tensor (n_rows and the task's first row are multiples of 4), each of
                        // `ng` groups of 4 blocks, as is every activation row.
                        unsafe { with_tokens!(nt, x86::dot4_q4_0(p, rb, ng, &xs, &mut res)) }
                        for (i, rs) in res[..nt].iter().enumerate() {
                            for (j, &v) in rs.iter().enumerate() {
                                // SAFETY: each (token, row) pair is written by exactly one task.
                                unsafe { *outp.0.add((t0 + i) * n_rows + r + j) = v };
                            }
                        }
                    }
                }
            });
            return;
        }
        pool::for_each(n_rows.div_ceil(rows_per_task), |task| {
            let outp = outp;
            let r1 = ((task + 1) * rows_per_task).min(n_rows);
            let mut res = [0.0f32; TOKEN_TILE];
            for r in task * rows_per_task..r1 {
                let p = w.row(r).as_ptr();
                for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                    let nt = (n_tokens - t0).min(TOKEN_TILE);
                    let xs: [&[XGroup]; TOKEN_TILE] = std::array::from_fn(|i| &xgs[t0 + i.min(nt - 1)][..ng]);
                    // SAFETY: AVX-512 VNNI was detected; the row holds `ng` groups of 4 blocks and
                    // every activation row `ng` groups.
                    unsafe { with_tokens!(nt, x86::dot_q4_0(p, ng, &xs, &mut res)) }
                    for (i, &v) in res[..nt].iter().enumerate() {
                        // SAFETY: each (token, row) pair is written by exactly one task.
                        unsafe { *outp.0.add((t0 + i) * n_rows + r) = v };
                    }
                }
            }
        });
    });
}

/// Quantizes the `n_tokens` activation rows of `x` (`n_cols` wide) into the first `n_tokens` of
/// `q` (grown as needed), in parallel from `PARALLEL_QUANTIZE_TOKENS` tokens on.
pub(crate) fn quantize_tokens<'a>(x: &[f32], n_tokens: usize, n_cols: usize, q: &'a mut Vec<Q8Row>) -> &'a [Q8Row] {
    if q.len() < n_tokens {
        q.resize_with(n_tokens, Q8Row::default);
    }
    if n_tokens < PARALLEL_QUANTIZE_TOKENS {
        for (t, r) in q[..n_tokens].iter_mut().enumerate() {
            quantize_q8(&x[t * n_cols..(t + 1) * n_cols], r);
        }
    } else {
        pool::for_each_mut(&mut q[..n_tokens], |t, r| quantize_q8(&x[t * n_cols..(t + 1) * n_cols], r));
    }
    &q[..n_tokens]
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` (see the module comment for the numerics).
pub fn matmul(w: &Tensor, x: &[f32], n_tokens: usize, out: &mut [f32]) -> Result<()> {
    let (n_cols, n_rows) = (w.n_cols, w.n_rows);
    let outp = OutPtr(out.as_mut_ptr());
    // With a few tokens the weights stream from memory once: each thread takes one contiguous
    // share of the rows, which the hardware prefetchers follow as one stream (16-row tasks dealt
    // out in turn decoded the default model 30% slower). Prefill reuses each row from cache for
    // many tokens, and small tasks balance it better.
    let rows_per_task = if n_tokens <= TOKEN_TILE { n_rows.div_ceil(pool::n_threads()).max(ROWS_PER_TASK) } else { ROWS_PER_TASK };
    let n_tasks = n_rows.div_ceil(rows_per_task);
    #[cfg(target_arch = "x86_64")]
    if w.ty == GgmlType::Q4_0 && simd() == Simd::Avx512Vnni && n_cols % 128 == 0 {
        matmul_q4_0(w, x, n_tokens, rows_per_task, outp);
        return Ok(());
    }
    // The k-quants with an integer kernel (AVX2 or AVX-512 VNNI; on the portable path they are
    // dequantized to f32 row by row).
    #[cfg(target_arch = "x86_64")]
    let k_int = matches!(w.ty, GgmlType::Q4K | GgmlType::Q6K) && simd() != Simd::Scalar;
    #[cfg(not(target_arch = "x86_64"))]
    let k_int = false;
    let kind = block_kind(w.ty);
    if kind.is_some() || k_int {
        #[cfg(target_arch = "x86_64")]
        // Prefill only: with one token a row pair reads two streams, and decoding the default
        // model went from 128 to 110 tok/s (prefill from 320 to 400).
        let pairs = n_tokens > TOKEN_TILE && simd() == Simd::Avx512Vnni && kind.is_some_and(|k| !k.int8);
        #[cfg(not(target_arch = "x86_64"))]
        let pairs = false;
        let dot = |row: &[u8], xs: &[&Q8Row], res: &mut [f32]| match kind {
            Some(k) => dot_rows(k, row, xs, res),
            // SAFETY: `k_int` holds only where AVX2 (with FMA and F16C) was detected, and the
            // VNNI kernels run only where AVX-512 VNNI was.
            #[cfg(target_arch = "x86_64")]
            None => unsafe {
                match (w.ty == GgmlType::Q4K, simd() == Simd::Avx512Vnni) {
                    (true, true) => x86::dot_q4_k(row, xs, res),
                    (true, false) => x86::dot_q4_k_avx2(row, xs, res),
                    (false, true) => x86::dot_q6_k(row, xs, res),
                    (false, false) => x86::dot_q6_k_avx2(row, xs, res),
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            None => unreachable!(),
        };
        Q8_SCRATCH.with(|cell| {
            let mut qrows = cell.borrow_mut();
            let qrows = quantize_tokens(x, n_tokens, n_cols, &mut qrows);
            pool::for_each(n_tasks, |task| {
                let outp = outp;
                let r1 = ((task + 1) * rows_per_task).min(n_rows);
                let mut res = [[0.0f32; TOKEN_TILE]; 2];
                // Token tiles outside, the task's rows inside: the tile's activations and the
                // rows (16 in prefill) stay in L1 while every pair is computed.
                for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                    let nt = (n_tokens - t0).min(TOKEN_TILE);
                    let xs: [&Q8Row; TOKEN_TILE] = std::array::from_fn(|i| &qrows[t0 + i.min(nt - 1)]);
                    let mut r = task * rows_per_task;
                    while r < r1 {
                        let n_pair = if pairs && r + 1 < r1 { 2 } else { 1 };
                        if n_pair == 2 {
                            let [a, b] = &mut res;
                            // SAFETY: `pairs` holds only where AVX-512 VNNI was detected and the
                            // type is a 4- or 5-bit one (`kind` is Some and not int8).
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                x86::dot2_rows_vnni(kind.expect("pairs need a block kind"), [w.row(r), w.row(r + 1)], &xs[..nt], [&mut a[..nt], &mut b[..nt]])
                            };
                        } else {
                            dot(w.row(r), &xs[..nt], &mut res[0][..nt]);
                        }
                        for (j, rs) in res[..n_pair].iter().enumerate() {
                            for (i, &v) in rs[..nt].iter().enumerate() {
                                // SAFETY: each (token, row) pair is written by exactly one task.
                                unsafe { *outp.0.add((t0 + i) * n_rows + r + j) = v };
                            }
                        }
                        r += n_pair;
                    }
                }
            });
        });
        return Ok(());
    }
    let ty = w.ty;
    let failure = std::sync::Mutex::new(None);
    pool::for_each(n_tasks, |task| {
        let outp = outp;
        let r1 = ((task + 1) * rows_per_task).min(n_rows);
        let result = ROW_SCRATCH.with(|cell| -> Result<()> {
            let mut buf = cell.borrow_mut();
            buf.resize(n_cols, 0.0);
            for r in task * rows_per_task..r1 {
                let row: &[f32] = if ty == GgmlType::F32 {
                    bytemuck::try_cast_slice(w.row(r)).unwrap_or_else(|_| {
                        for (d, c) in buf.iter_mut().zip(w.row(r).chunks_exact(4)) {
                            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                        &buf[..]
                    })
                } else {
                    dequantize(ty, w.row(r), &mut buf)?;
                    &buf[..]
                };
                for t in 0..n_tokens {
                    let v = dot_f32(row, &x[t * n_cols..(t + 1) * n_cols]);
                    // SAFETY: each (token, row) pair is written by exactly one task.
                    unsafe { *outp.0.add(t * n_rows + r) = v };
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn dot_f16_f16(a: &[f16], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        return unsafe { x86::dot_f16_f16(a, b) };
    }
    dot_f16_f16_portable(a, b)
}

/// The same arithmetic as `x86::dot_f16_f16`, lane by lane.
fn dot_f16_f16_portable(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let np = n - n % 64;
    let mut acc = [[0.0f32; 16]; 4];
    for step in (0..np).step_by(64) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, r) in lanes.iter_mut().enumerate() {
                let k = step + 16 * j + l;
                *r = a[k].to_f32().mul_add(b[k].to_f32(), *r);
            }
        }
    }
    let v: [f32; 16] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let t3: [f32; 8] = std::array::from_fn(|l| v[l + 8] + v[l]);
    let t6: [f32; 4] = std::array::from_fn(|l| t3[l + 4] + t3[l]);
    let mut s = ((t6[0] + t6[2]) + (t6[1] + t6[3])) as f64;
    for k in np..n {
        s += (a[k].to_f32() * b[k].to_f32()) as f64;
    }
    s as f32
}

fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        unsafe { x86::mad_f16(y, x, v) };
        return;
    }
    for (a, b) in y.iter_mut().zip(x) {
        *a = f16::from_f32(b.to_f32().mul_add(v, a.to_f32()));
    }
}

fn scale_f16(y: &mut [f16], v: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        unsafe { x86::scale_f16(y, v) };
        return;
    }
    for a in y.iter_mut() {
        *a = f16::from_f32(a.to_f32() * v);
    }
}

/// ggml's vectorised `expf` (`ggml_v_expf`, its AVX-512 form): a degree-5 polynomial on the reduced argument with
/// fused multiply-adds, scaled by `2^n`; within a few ulps of `expf`, and what llama.cpp's SiLU uses
/// on x86, so SwiGLU here rounds as it does there.
#[inline(always)]
pub fn ggml_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let k = n as i32;
    let (k1, k2) = (k / 2, k - k / 2);
    j * pow2(k1) * pow2(k2)
}

/// `2^k` for `|k| <= 126`, from its exponent bits (exact; `powi` is a library call).
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// SwiGLU's gate in place as ggml computes it: `gate = gate / (1 + ggml_expf(-gate)) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512Vnni {
        // SAFETY: AVX-512 VNNI implies AVX-512F; FMA was detected with it.
        unsafe { x86::silu_mul(gate, up) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx2 {
        // SAFETY: AVX2 and FMA were detected with the level.
        unsafe { x86::silu_mul_avx2(gate, up) };
        return;
    }
    silu_mul_scalar(gate, up);
}

#[inline(always)]
fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = (*g / (1.0 + ggml_expf(0.0 - *g))) * u;
    }
}

/// RMSNorm as ggml computes it: squares in f32 summed in f64, the mean and the scale in f32,
/// then `(x * scale) * w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for i in 0..dim {
            or[i] = (xr[i] * scale) * w[i];
        }
    }
}

/// RoPE as ggml computes it: per position, the angle of pair 0 is the position, each next
/// pair's angle is the previous one times `freq_base^(-2/n_rot)` (in f32), then divided by the
/// pair's frequency factor; sines, cosines and the rotation in f32.
pub fn rope(x: &mut [f32], pos0: usize, p: &RopeParams) {
    #[cfg(target_arch = "x86_64")]
    if simd() != Simd::Scalar {
        // SAFETY: FMA was detected with the level.
        unsafe { x86::rope_rows(x, pos0, p) };
        return;
    }
    rope_rows(x, pos0, p)
}

#[inline(always)]
fn rope_rows(x: &mut [f32], pos0: usize, p: &RopeParams) {
    let row = p.n_heads * p.head_dim;
    let half = p.n_rot / 2;
    let theta_scale = p.freq_base.powf(-2.0f32 / p.n_rot as f32);
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (t, tok) in x.chunks_exact_mut(row).enumerate() {
        let mut theta = (pos0 + t) as f32;
        for (i, c) in cs.iter_mut().enumerate() {
            let ff = p.freq_factors.map_or(1.0, |f| f[i]);
            let (s, co) = (theta / ff).sin_cos();
            *c = (s, co);
            theta *= theta_scale;
        }
        for head in tok.chunks_exact_mut(p.head_dim) {
            for (i, &(sin, cos)) in cs.iter().enumerate() {
                let (a, b) = match p.style {
                    RopeStyle::Norm => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                // ggml's `x0*cos - x1*sin` and `x0*sin + x1*cos` as GCC contracts them.
                head[a] = x0.mul_add(cos, -(x1 * sin));
                head[b] = x0.mul_add(sin, x1 * cos);
            }
        }
    }
}

/// One (query, head) pair's keys and values for [`online_softmax`]: `k` and `v` hold the rows
/// it attends to, `head_dim` values each; `q16` is the query rounded to f16.
struct Keys<'a> {
    k: &'a [f16],
    v: &'a [f16],
    q16: &'a [f16],
    head_dim: usize,
    scale: f32,
}

/// The pass over the keys of [`attention`]: accumulates the weighted values into `acc` (f16,
/// zeroed by the caller), pushes each scaled score to `scores` if given, and returns the final
/// running maximum and softmax denominator.
#[inline(always)]
fn online_softmax(keys: &Keys, acc: &mut [f16], mut scores: Option<&mut Vec<f32>>) -> (f32, f32) {
    let hd = keys.head_dim;
    let (mut m, mut total) = (f32::NEG_INFINITY, 0.0f32);
    for (kj, vj) in keys.k.chunks_exact(hd).zip(keys.v.chunks_exact(hd)) {
        let s = dot_f16_f16(kj, keys.q16) * keys.scale;
        if let Some(sc) = scores.as_mut() {
            sc.push(s);
        }
        let (ms, vs) = if s > m {
            let ms = (m - s).exp();
            m = s;
            scale_f16(acc, ms);
            (ms, 1.0)
        } else {
            (1.0, (s - m).exp())
        };
        mad_f16(acc, vj, vs);
        total = total.mul_add(ms, vs);
    }
    (m, total)
}

thread_local! {
    static ATTN_SCRATCH: RefCell<(Vec<f16>, Vec<f16>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Causal attention over the fp16 cache, one pass over the keys with an online softmax, as
/// llama.cpp's CPU flash attention computes it: the query rounded to f16, `q . k` in f32, the
/// weighted sum of values accumulated in f16 and rescaled whenever the running maximum grows,
/// divided by the softmax denominator at the end. Parallel over (query, head) pairs. Same
/// contract as `reference::attention`; with `mass`, each token's final softmax weight is
/// recomputed from its stored score.
pub fn attention(
    q: &[f32],
    layer: &Fp16Layer,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    out: &mut [f32],
    mass: Option<&mut [f32]>,
) {
    let n_ctx = layer.n_tokens;
    let group = n_heads / layer.n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let want_mass = mass.is_some();
    let work = |(t, h): (usize, usize), oh: &mut [f32]| -> Vec<f32> {
        let pos = n_ctx - n_tokens + t;
        let g = h / group;
        let qh = &q[(t * n_heads + h) * head_dim..][..head_dim];
        let (kh, vh) = (&layer.k[g], &layer.v[g]);
        ATTN_SCRATCH.with(|cell| {
            let (q16, acc, scores) = &mut *cell.borrow_mut();
            q16.clear();
            q16.extend(qh.iter().map(|&v| f16::from_f32(v)));
            acc.clear();
            acc.resize(head_dim, f16::ZERO);
            scores.clear();
            let keys = Keys { k: &kh[..(pos + 1) * head_dim], v: &vh[..(pos + 1) * head_dim], q16, head_dim, scale };
            let sc = want_mass.then_some(&mut *scores);
            #[cfg(target_arch = "x86_64")]
            let (m, total) = if simd() != Simd::Scalar {
                // SAFETY: FMA was detected with the level.
                unsafe { x86::online_softmax(&keys, acc, sc) }
            } else {
                online_softmax(&keys, acc, sc)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (m, total) = online_softmax(&keys, acc, sc);
            let inv = 1.0 / total;
            for (o, a) in oh.iter_mut().zip(acc.iter()) {
                *o = a.to_f32() * inv;
            }
            if want_mass {
                scores.iter().map(|&s| (s - m).exp() * inv).collect()
            } else {
                Vec::new()
            }
        })
    };
    let n_pairs = if want_mass { n_tokens * n_heads } else { 0 };
    let per: Vec<std::sync::Mutex<Vec<f32>>> = (0..n_pairs).map(|_| Default::default()).collect();
    pool::for_each_chunk_mut(&mut out[..n_tokens * n_heads * head_dim], head_dim, |i, oh| {
        let m = work((i / n_heads, i % n_heads), oh);
        if want_mass {
            *per[i].lock().unwrap_or_else(|p| p.into_inner()) = m;
        }
    });
    if let Some(m) = mass {
        for (i, s) in per.into_iter().enumerate() {
            let s = s.into_inner().unwrap_or_else(|p| p.into_inner());
            let g = (i % n_heads) / group;
            for (j, &p) in s.iter().enumerate() {
                m[g * n_ctx + j] += p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Inputs with every magnitude the SIMD paths treat differently: zeros, tiny, large enough
    /// to overflow `expf`, and ordinary values.
    fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => rng.normal() * 1e-30,
                2 => rng.normal() * 200.0,
                _ => rng.normal() * 4.0,
            })
            .collect()
    }

    #[test]
    fn simd_activation_quantization_equals_the_scalar_one_bit_for_bit() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        for n_blocks in [1, 3, 18] {
            let mut x = inputs(&mut rng, 32 * n_blocks);
            x[..32].fill(0.0);
            let mut want = Q8Row::default();
            set_simd(Simd::Scalar).unwrap();
            quantize_q8(&x, &mut want);
            for level in supported_simd() {
                set_simd(level).unwrap();
                let mut got = Q8Row::default();
                quantize_q8(&x, &mut got);
                assert_eq!(got.qs, want.qs, "{level:?} seed {seed}");
                assert_eq!(got.sum, want.sum, "{level:?} seed {seed}");
                assert_eq!(got.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                assert_eq!(got.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
        set_simd(detected_simd()).unwrap();
    }

    #[test]
    fn simd_swiglu_equals_the_scalar_one_bit_for_bit() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        for n in [1, 7, 8, 9, 15, 16, 17, 1536 + 5] {
            let g = inputs(&mut rng, n);
            let u = inputs(&mut rng, n);
            let mut want = g.clone();
            silu_mul_scalar(&mut want, &u);
            for level in supported_simd() {
                set_simd(level).unwrap();
                let mut got = g.clone();
                silu_mul(&mut got, &u);
                for i in 0..n {
                    assert!(got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan()), "{level:?} n {n} [{i}]: {} vs {} (x {}, seed {seed})", got[i], want[i], g[i]);
                }
            }
        }
        set_simd(detected_simd()).unwrap();
    }

    #[test]
    fn ggml_expf_scales_by_exact_powers_of_two() {
        for k in -126..=126 {
            assert_eq!(pow2(k), 2.0f32.powi(k), "2^{k}");
        }
    }
}
