//! The direct (decode) attention kernels over packed codes: one row's scores against a few
//! queries, and one row's weighted addition into a few accumulators, read straight from the
//! code bytes with no dequantized row in memory, for 2-, 4- and 8-bit codes.
//!
//! Lane order. A row's codes are read 8 bytes at a time (a chunk of `64 / bits` codes): byte `l`
//! of the chunk goes to lane `l` and its `8 / bits` codes to as many vectors ("parts"), part `k`
//! holding code `l * (8 / bits) + k` of the chunk (`LaneOrder`). Separating the codes of a
//! byte is then a shift and a mask per part, with no shuffle. The kernels work in that order:
//! the queries are put in it once per call, the accumulated values put back once at the end.
//!
//! Dequantization is folded around the integer codes, so the kernels only multiply codes by
//! floats: with per-channel scales `q . (s u + z) = (q s) . u + q . z` (`q s` once per row
//! group of the stored matrix), with per-row group scales `sum_g s_g (q_g . u_g) + sum_g z_g
//! sum(q_g)` (the kernel applies the `s_g`, the caller adds the zero points).
//!
//! `Kernel` has two implementations: `Portable`, plain scalar code, and on x86-64 `Avx2`
//! (AVX2, FMA and F16C intrinsics), which its caller may only run where `avx2_fma_f16c()` holds.
//! Both compute the same sums in different orders; tests check each against the dequantized
//! rows.

use half::f16;

use super::MAX_HEAD_DIM;

/// Codes of one 8-byte chunk.
#[inline(always)]
pub(crate) fn chunk_codes(bits: u32) -> usize {
    64 / bits as usize
}

/// Whether the kernels take `bits`-bit codes.
pub(crate) fn bits_ok(bits: u32) -> bool {
    matches!(bits, 2 | 4 | 8)
}

/// The channel at position `pos` of a row in lane order (the definition `LaneOrder` tabulates).
#[cfg(test)]
fn channel_of(bits: u32, pos: usize) -> usize {
    let c = chunk_codes(bits);
    let per = 8 / bits as usize;
    let (ch, i) = (pos / c, pos % c);
    ch * c + (i % 8) * per + i / 8
}

/// The lane order of a row of `d` codes as a table: `perm[pos]` is the channel at position `pos`
/// (built without a division per position, once per call of a direct path).
pub(crate) struct LaneOrder {
    pub(crate) perm: [u16; MAX_HEAD_DIM],
}

impl LaneOrder {
    /// `d` a multiple of `chunk_codes(bits)`, at most `MAX_HEAD_DIM`.
    #[inline(always)]
    pub(crate) fn new(bits: u32, d: usize) -> LaneOrder {
        let (c, per) = (chunk_codes(bits), 8 / bits as usize);
        let mut perm = [0u16; MAX_HEAD_DIM];
        for ch in (0..d).step_by(c) {
            for k in 0..per {
                for l in 0..8 {
                    perm[ch + k * 8 + l] = (ch + l * per + k) as u16;
                }
            }
        }
        LaneOrder { perm }
    }
}

/// `dst[pos] = f(channel_of(pos))` for the `dst.len()` positions of a row.
#[cfg(test)]
fn permute(bits: u32, dst: &mut [f32], mut f: impl FnMut(usize) -> f32) {
    for (pos, x) in dst.iter_mut().enumerate() {
        *x = f(channel_of(bits, pos));
    }
}

/// The kernels. For a row of `d` codes (`codes`: `d * bits / 8` bytes) in groups of `group`
/// channels (a multiple of `chunk_codes(bits)` dividing `d`; `group = d` for one group), and `N`
/// queries or accumulators of `d` values each in lane order:
pub(crate) trait Kernel {
    /// `out[i] = sum_g sz[2 g] * (qp_i,g . u_g)`, `u_g` the codes of group `g`.
    ///
    /// # Safety
    /// The CPU runs the kernel's instructions (see the implementation).
    unsafe fn dot<const N: usize>(bits: u32, codes: &[u8], qp: &[f32], d: usize, group: usize, sz: &[f32], out: &mut [f32; N]);

    /// `acc_i,g += w[(i * (d / group) + g) * ws] * u_g` for every query `i` and group `g`.
    ///
    /// # Safety
    /// As for `dot`.
    unsafe fn axpy<const N: usize>(bits: u32, codes: &[u8], w: &[f32], ws: usize, d: usize, group: usize, acc: &mut [f32]);

    /// Per-channel scales: for each query `i` of `qs` (`[n_q, d]`, `n_q <= N`) with the steps and
    /// zero points `sz` (`d` pairs, f16), `qp_i = q_i s` in lane order (`order`'s, the table of
    /// `LaneOrder::new(bits, d)`) and `base[i] = q_i . z`. `d` is a multiple of
    /// `chunk_codes(bits)`. `qp` and `base` past the `n_q` queries are left as they are.
    ///
    /// # Safety
    /// As for `dot`.
    unsafe fn channel_queries<const N: usize>(bits: u32, qs: &[f32], sz: &[f16], order: &LaneOrder, d: usize, qp: &mut [f32], base: &mut [f32; N]);

    /// `dst[i] = src[i]` in f32 (exact).
    ///
    /// # Safety
    /// As for `dot`.
    unsafe fn f16s(src: &[f16], dst: &mut [f32]);

    /// One f16 in f32 (exact).
    ///
    /// # Safety
    /// As for `dot`.
    unsafe fn h2f(x: f16) -> f32;

    /// `sum_k a[k] * b[k]` (`a` in f16), over `a.len()` terms.
    ///
    /// # Safety
    /// As for `dot`.
    unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32;
}

/// Scalar code for any CPU.
pub(crate) struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    unsafe fn dot<const N: usize>(bits: u32, codes: &[u8], qp: &[f32], d: usize, group: usize, sz: &[f32], out: &mut [f32; N]) {
        let (c, per, mask) = (chunk_codes(bits), 8 / bits as usize, (1u32 << bits) - 1);
        for (i, o) in out.iter_mut().enumerate() {
            let q = &qp[i * d..(i + 1) * d];
            let mut tot = 0f32;
            for g in 0..d / group {
                let mut a = 0f32;
                for ch in g * group / c..(g + 1) * group / c {
                    for (l, &b) in codes[ch * 8..ch * 8 + 8].iter().enumerate() {
                        for k in 0..per {
                            a += q[ch * c + k * 8 + l] * ((b as u32 >> (k as u32 * bits)) & mask) as f32;
                        }
                    }
                }
                tot += a * sz[2 * g];
            }
            *o = tot;
        }
    }

    #[inline(always)]
    unsafe fn axpy<const N: usize>(bits: u32, codes: &[u8], w: &[f32], ws: usize, d: usize, group: usize, acc: &mut [f32]) {
        let (c, per, mask) = (chunk_codes(bits), 8 / bits as usize, (1u32 << bits) - 1);
        let n_g = d / group;
        for i in 0..N {
            let a = &mut acc[i * d..(i + 1) * d];
            for g in 0..n_g {
                let wg = w[(i * n_g + g) * ws];
                for ch in g * group / c..(g + 1) * group / c {
                    for (l, &b) in codes[ch * 8..ch * 8 + 8].iter().enumerate() {
                        for k in 0..per {
                            a[ch * c + k * 8 + l] += wg * ((b as u32 >> (k as u32 * bits)) & mask) as f32;
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn channel_queries<const N: usize>(_bits: u32, qs: &[f32], sz: &[f16], order: &LaneOrder, d: usize, qp: &mut [f32], base: &mut [f32; N]) {
        for (i, q) in qs.chunks_exact(d).enumerate().take(N) {
            for (x, &c) in qp[i * d..(i + 1) * d].iter_mut().zip(&order.perm) {
                *x = q[c as usize] * sz[2 * c as usize].to_f32();
            }
            let mut t = 0f32;
            for (c, &x) in q.iter().enumerate() {
                t += x * sz[2 * c + 1].to_f32();
            }
            base[i] = t;
        }
    }

    #[inline(always)]
    unsafe fn f16s(src: &[f16], dst: &mut [f32]) {
        for (o, x) in dst.iter_mut().zip(src) {
            *o = x.to_f32();
        }
    }

    #[inline(always)]
    unsafe fn h2f(x: f16) -> f32 {
        x.to_f32()
    }

    #[inline(always)]
    unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
        let mut t = 0f32;
        for (x, &y) in a.iter().zip(b) {
            t += x.to_f32() * y;
        }
        t
    }
}

/// Whether this CPU runs `Avx2`'s instructions (AVX2, FMA, F16C; detected once by std).
#[inline]
pub(crate) fn avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX2 + FMA + F16C intrinsics, 8 lanes. Its methods must run inside a function compiled with
/// `#[target_feature(enable = "avx2,fma,f16c")]` on a CPU where `avx2_fma_f16c()` holds (they
/// are inlined there).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2 {
    #[inline(always)]
    unsafe fn dot<const N: usize>(bits: u32, codes: &[u8], qp: &[f32], d: usize, group: usize, sz: &[f32], out: &mut [f32; N]) {
        let (codes, qp, sz) = (&codes[..d * bits as usize / 8], &qp[..N * d], &sz[..2 * (d / group)]);
        match bits {
            8 => x86::dot::<8, N>(codes.as_ptr(), qp.as_ptr(), d, group, sz.as_ptr(), out),
            4 => x86::dot::<4, N>(codes.as_ptr(), qp.as_ptr(), d, group, sz.as_ptr(), out),
            _ => x86::dot::<2, N>(codes.as_ptr(), qp.as_ptr(), d, group, sz.as_ptr(), out),
        }
    }

    #[inline(always)]
    unsafe fn axpy<const N: usize>(bits: u32, codes: &[u8], w: &[f32], ws: usize, d: usize, group: usize, acc: &mut [f32]) {
        let (codes, w, acc) = (&codes[..d * bits as usize / 8], &w[..(N * (d / group) - 1) * ws + 1], &mut acc[..N * d]);
        match bits {
            8 => x86::axpy::<8, N>(codes.as_ptr(), w.as_ptr(), ws, d, group, acc.as_mut_ptr()),
            4 => x86::axpy::<4, N>(codes.as_ptr(), w.as_ptr(), ws, d, group, acc.as_mut_ptr()),
            _ => x86::axpy::<2, N>(codes.as_ptr(), w.as_ptr(), ws, d, group, acc.as_mut_ptr()),
        }
    }

    #[inline(always)]
    unsafe fn channel_queries<const N: usize>(bits: u32, qs: &[f32], sz: &[f16], _order: &LaneOrder, d: usize, qp: &mut [f32], base: &mut [f32; N]) {
        let n_q = (qs.len() / d).min(N);
        // `d` is a multiple of the chunk (at least 8 codes): whole vectors of 8 channels, whole
        // chunks per permutation.
        let (qs, sz, qp) = (&qs[..n_q * d], &sz[..2 * d], &mut qp[..n_q * d]);
        let sz = sz.as_ptr() as *const u16;
        for (i, b) in base.iter_mut().enumerate().take(n_q) {
            let (q, p) = (qs.as_ptr().add(i * d), qp.as_mut_ptr().add(i * d));
            *b = match bits {
                8 => x86::channel_query::<8>(q, sz, d, p),
                4 => x86::channel_query::<4>(q, sz, d, p),
                _ => x86::channel_query::<2>(q, sz, d, p),
            };
        }
    }

    #[inline(always)]
    unsafe fn f16s(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        x86::f16s(src.as_ptr() as *const u16, n, dst.as_mut_ptr())
    }

    #[inline(always)]
    unsafe fn h2f(x: f16) -> f32 {
        x86::h2f(x.to_bits())
    }

    #[inline(always)]
    unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
        let b = &b[..a.len()];
        x86::dot_f16(a.as_ptr() as *const u16, b.as_ptr(), a.len())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The parts of the chunk at `p` (8 bytes): part `k`, lane `l` = code `l * (8 / BITS) + k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn parts<const BITS: u32>(p: *const u8) -> [__m256; 4] {
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let zero = _mm256_setzero_ps();
        match BITS {
            8 => [_mm256_cvtepi32_ps(b), zero, zero, zero],
            4 => {
                let m = _mm256_set1_epi32(15);
                [_mm256_cvtepi32_ps(_mm256_and_si256(b, m)), _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b)), zero, zero]
            }
            // 2 bits.
            _ => {
                let m = _mm256_set1_epi32(3);
                [
                    _mm256_cvtepi32_ps(_mm256_and_si256(b, m)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<2>(b), m)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<4>(b), m)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<6>(b)),
                ]
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// See `Kernel::dot`; pointers to slices of the lengths it documents. One accumulator per
    /// part and query within a group, so the chains of dependent FMAs are `8 / BITS` apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dot<const BITS: u32, const N: usize>(codes: *const u8, qp: *const f32, d: usize, group: usize, sz: *const f32, out: &mut [f32; N]) {
        let c = (64 / BITS) as usize;
        let per = (8 / BITS) as usize;
        let mut tot = [_mm256_setzero_ps(); N];
        for g in 0..d / group {
            let mut acc = [[_mm256_setzero_ps(); 4]; N];
            for ch in g * group / c..(g + 1) * group / c {
                let u = parts::<BITS>(codes.add(ch * 8));
                for k in 0..per {
                    for (i, a) in acc.iter_mut().enumerate() {
                        a[k] = _mm256_fmadd_ps(u[k], _mm256_loadu_ps(qp.add(i * d + ch * c + k * 8)), a[k]);
                    }
                }
            }
            let s = _mm256_set1_ps(*sz.add(2 * g));
            for (t, a) in tot.iter_mut().zip(&acc) {
                let sum = match per {
                    1 => a[0],
                    2 => _mm256_add_ps(a[0], a[1]),
                    _ => _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                };
                *t = _mm256_fmadd_ps(sum, s, *t);
            }
        }
        for (o, t) in out.iter_mut().zip(tot) {
            *o = hsum(t);
        }
    }

    /// The even and the odd elements of `a` then `b`: (`a0 a2 a4 a6 b0 b2 b4 b6`, `a1 a3 a5 a7 b1
    /// b3 b5 b7`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
        let even = _mm256_shuffle_ps::<0x88>(a, b);
        let odd = _mm256_shuffle_ps::<0xdd>(a, b);
        (_mm256_castpd_ps(_mm256_permute4x64_pd::<0xd8>(_mm256_castps_pd(even))), _mm256_castpd_ps(_mm256_permute4x64_pd::<0xd8>(_mm256_castps_pd(odd))))
    }

    /// `q s` for the 8 channels at `c` (`sz`: f16 pairs of step and zero point), adding `q z` to
    /// `zacc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scaled_query(q: *const f32, sz: *const u16, c: usize, zacc: &mut __m256) -> __m256 {
        let a = _mm256_cvtph_ps(_mm_loadu_si128(sz.add(2 * c) as *const __m128i));
        let b = _mm256_cvtph_ps(_mm_loadu_si128(sz.add(2 * c + 8) as *const __m128i));
        let (s, z) = deinterleave(a, b);
        let qv = _mm256_loadu_ps(q.add(c));
        *zacc = _mm256_fmadd_ps(qv, z, *zacc);
        _mm256_mul_ps(qv, s)
    }

    /// One query of `Kernel::channel_queries`: `qp = q s` in lane order (`d` a multiple of
    /// `64 / BITS` and of 8), and the return value `q . z`. `sz`: `d` pairs of f16 bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn channel_query<const BITS: u32>(q: *const f32, sz: *const u16, d: usize, qp: *mut f32) -> f32 {
        let mut zacc = _mm256_setzero_ps();
        match BITS {
            8 => {
                for c in (0..d).step_by(8) {
                    _mm256_storeu_ps(qp.add(c), scaled_query(q, sz, c, &mut zacc));
                }
            }
            // A chunk of 16: the even channels, then the odd ones.
            4 => {
                for c in (0..d).step_by(16) {
                    let (x0, x1) = (scaled_query(q, sz, c, &mut zacc), scaled_query(q, sz, c + 8, &mut zacc));
                    let (e, o) = deinterleave(x0, x1);
                    _mm256_storeu_ps(qp.add(c), e);
                    _mm256_storeu_ps(qp.add(c + 8), o);
                }
            }
            // A chunk of 32: part k holds channels 4 l + k.
            _ => {
                for c in (0..d).step_by(32) {
                    let (x0, x1, x2, x3) = (scaled_query(q, sz, c, &mut zacc), scaled_query(q, sz, c + 8, &mut zacc), scaled_query(q, sz, c + 16, &mut zacc), scaled_query(q, sz, c + 24, &mut zacc));
                    let (e01, o01) = deinterleave(x0, x1);
                    let (e23, o23) = deinterleave(x2, x3);
                    let (p0, p2) = deinterleave(e01, e23);
                    let (p1, p3) = deinterleave(o01, o23);
                    for (k, v) in [p0, p1, p2, p3].into_iter().enumerate() {
                        _mm256_storeu_ps(qp.add(c + 8 * k), v);
                    }
                }
            }
        }
        hsum(zacc)
    }

    /// See `Kernel::axpy`; pointers to slices of the lengths it documents.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn axpy<const BITS: u32, const N: usize>(codes: *const u8, w: *const f32, ws: usize, d: usize, group: usize, acc: *mut f32) {
        let c = (64 / BITS) as usize;
        let per = (8 / BITS) as usize;
        let n_g = d / group;
        for g in 0..n_g {
            let mut wv = [_mm256_setzero_ps(); N];
            for (i, x) in wv.iter_mut().enumerate() {
                *x = _mm256_set1_ps(*w.add((i * n_g + g) * ws));
            }
            for ch in g * group / c..(g + 1) * group / c {
                let u = parts::<BITS>(codes.add(ch * 8));
                for (k, &uk) in u.iter().enumerate().take(per) {
                    for (i, &x) in wv.iter().enumerate() {
                        let p = acc.add(i * d + ch * c + k * 8);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(uk, x, _mm256_loadu_ps(p)));
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn h2f(x: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x as i32)))
    }

    /// `sum_k a[k] * b[k]` for `k < n`, `a` f16 bits: 4 lanes at a time (ranks are small).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dot_f16(a: *const u16, b: *const f32, n: usize) -> f32 {
        let mut acc = _mm_setzero_ps();
        let mut k = 0;
        while k + 4 <= n {
            acc = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64(a.add(k) as *const __m128i)), _mm_loadu_ps(b.add(k)), acc);
            k += 4;
        }
        let acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        let mut t = _mm_cvtss_f32(_mm_add_ss(acc, _mm_shuffle_ps::<1>(acc, acc)));
        while k < n {
            t += h2f(*a.add(k)) * *b.add(k);
            k += 1;
        }
        t
    }

    /// `dst[i] = src[i]` for `i < n`, f16 bits to f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn f16s(src: *const u16, n: usize, dst: *mut f32) {
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.add(i) as *const __m128i)));
            i += 8;
        }
        while i + 4 <= n {
            _mm_storeu_ps(dst.add(i), _mm_cvtph_ps(_mm_loadl_epi64(src.add(i) as *const __m128i)));
            i += 4;
        }
        while i < n {
            *dst.add(i) = h2f(*src.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn check_kernel<K: Kernel, const N: usize>(seed: u64, rng: &mut Rng, bits: u32, d: usize, group: usize) {
        let n_g = d / group;
        let codes: Vec<u8> = (0..d * bits as usize / 8).map(|_| rng.below(256) as u8).collect();
        let code = |c: usize| super::super::pack::code_at(&codes, bits, c) as f64;
        let q: Vec<f32> = (0..N * d).map(|_| rng.normal()).collect();
        let mut qp = vec![0f32; N * d];
        for i in 0..N {
            permute(bits, &mut qp[i * d..(i + 1) * d], |c| q[i * d + c]);
        }
        let sz: Vec<f32> = (0..2 * n_g).map(|_| rng.normal()).collect();
        let mut out = [0f32; N];
        // SAFETY: the caller runs `K` only where the CPU has its instructions.
        unsafe { K::dot::<N>(bits, &codes, &qp, d, group, &sz, &mut out) };
        for i in 0..N {
            let want: f64 = (0..d).map(|c| sz[2 * (c / group)] as f64 * q[i * d + c] as f64 * code(c)).sum();
            let mag: f64 = (0..d).map(|c| (sz[2 * (c / group)] as f64 * q[i * d + c] as f64 * code(c)).abs()).sum();
            assert!((out[i] as f64 - want).abs() <= 1e-5 * mag + 1e-9, "seed {seed}: dot bits {bits} d {d} group {group} N {N} query {i}: {} vs {want}", out[i]);
        }
        // Weights 1 or 2 apart (the second: steps interleaved with zero points).
        let ws = 1 + (N + group) % 2;
        let w: Vec<f32> = (0..N * n_g * ws).map(|_| rng.normal()).collect();
        let start: Vec<f32> = (0..N * d).map(|_| rng.normal()).collect();
        let mut acc = start.clone();
        // SAFETY: as above.
        unsafe { K::axpy::<N>(bits, &codes, &w, ws, d, group, &mut acc) };
        for i in 0..N {
            for pos in 0..d {
                let c = channel_of(bits, pos);
                let want = start[i * d + pos] as f64 + w[(i * n_g + c / group) * ws] as f64 * code(c);
                assert!((acc[i * d + pos] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "seed {seed}: axpy bits {bits} d {d} group {group} N {N} query {i} channel {c}");
            }
        }
    }

    /// `channel_queries` for 2 queries padded to `N`: each product exactly, in lane order, and
    /// the zero-point dot products; the padding is left alone.
    fn check_channel_queries<K: Kernel, const N: usize>(seed: u64, rng: &mut Rng, bits: u32, d: usize) {
        let q: Vec<f32> = (0..2 * d).map(|_| rng.normal()).collect();
        let sz: Vec<f16> = (0..2 * d).map(|_| f16::from_f32(rng.normal())).collect();
        let mut qp = vec![f32::NAN; N * d];
        let mut base = [7f32; N];
        // SAFETY: the caller runs `K` only where the CPU has its instructions.
        unsafe { K::channel_queries::<N>(bits, &q, &sz, &LaneOrder::new(bits, d), d, &mut qp, &mut base) };
        for i in 0..2 {
            for pos in 0..d {
                let c = channel_of(bits, pos);
                assert_eq!(qp[i * d + pos].to_bits(), (q[i * d + c] * sz[2 * c].to_f32()).to_bits(), "seed {seed}: bits {bits} d {d} query {i} position {pos}");
            }
            let want: f64 = (0..d).map(|c| q[i * d + c] as f64 * sz[2 * c + 1].to_f64()).sum();
            let mag: f64 = (0..d).map(|c| (q[i * d + c] as f64 * sz[2 * c + 1].to_f64()).abs()).sum();
            assert!((base[i] as f64 - want).abs() <= 1e-6 * mag, "seed {seed}: bits {bits} d {d} query {i}: zero points {} vs {want}", base[i]);
        }
        assert!(qp[2 * d..].iter().all(|x| x.is_nan()) && base[2..].iter().all(|&b| b == 7.0), "seed {seed}: padding written");
    }

    fn check_all<K: Kernel>(seed: u64) {
        let mut rng = Rng::new(seed);
        for bits in [2, 4, 8] {
            let c = chunk_codes(bits);
            for (d, group) in [(c, c), (4 * c, c), (4 * c, 2 * c), (4 * c, 4 * c)] {
                check_kernel::<K, 1>(seed, &mut rng, bits, d, group);
                check_kernel::<K, 2>(seed, &mut rng, bits, d, group);
                check_kernel::<K, 3>(seed, &mut rng, bits, d, group);
                check_kernel::<K, 4>(seed, &mut rng, bits, d, group);
                check_kernel::<K, 8>(seed, &mut rng, bits, d, group);
            }
        }
        for bits in [2, 4, 8] {
            for d in [chunk_codes(bits), 4 * chunk_codes(bits)] {
                check_channel_queries::<K, 3>(seed, &mut rng, bits, d);
                check_channel_queries::<K, 8>(seed, &mut rng, bits, d);
            }
        }
        for n in [1, 2, 4, 7, 16] {
            let a: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.normal())).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, &y)| x.to_f32() as f64 * y as f64).sum();
            let mag: f64 = a.iter().zip(&b).map(|(x, &y)| (x.to_f32() as f64 * y as f64).abs()).sum();
            // SAFETY: as above.
            let got = unsafe { K::dot_f16(&a, &b) } as f64;
            assert!((got - want).abs() <= 1e-6 * mag, "seed {seed}: dot_f16 of {n}: {got} vs {want}");
        }
        let h: Vec<f16> = (0..19).map(|_| f16::from_f32(rng.normal() * 100.0)).chain([f16::from_bits(1), f16::NEG_ZERO, f16::INFINITY]).collect();
        let mut f = vec![0f32; h.len()];
        // SAFETY: as above.
        unsafe { K::f16s(&h, &mut f) };
        for (x, y) in h.iter().zip(&f) {
            assert_eq!(x.to_f32().to_bits(), y.to_bits(), "seed {seed}");
            // SAFETY: as above.
            assert_eq!(unsafe { K::h2f(*x) }.to_bits(), y.to_bits());
        }
    }

    #[test]
    fn lane_order_is_a_permutation() {
        for bits in [2, 4, 8] {
            let d = 4 * chunk_codes(bits);
            let table = LaneOrder::new(bits, d);
            assert!((0..d).all(|p| table.perm[p] as usize == channel_of(bits, p)), "bits {bits}");
            let mut seen: Vec<usize> = (0..d).map(|p| channel_of(bits, p)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..d).collect::<Vec<_>>(), "bits {bits}");
        }
        assert_eq!((0..16).map(|p| channel_of(4, p)).collect::<Vec<_>>(), vec![0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]);
    }

    #[test]
    fn portable_kernels_match_the_codes() {
        check_all::<Portable>(Rng::seed_from_time());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_codes() {
        if !avx2_fma_f16c() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        // SAFETY: the CPU has the instructions (checked above).
        unsafe { check_all_avx2(Rng::seed_from_time()) };
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn check_all_avx2(seed: u64) {
        check_all::<Avx2>(seed)
    }
}
