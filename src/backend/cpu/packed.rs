//! Q4_0 matrices repacked 16 rows at a time for the AVX-512 VNNI and AVX2 matmuls.
//!
//! A GGUF Q4_0 block is one row's 32 weights: an f16 scale and 16 code bytes, byte `j` holding
//! weight `j` in its low nibble and weight `j + 16` in its high nibble. Dotting such blocks one
//! row at a time leaves every 32-bit lane of a `vpdpbusd` result belonging to the same row, so
//! each block's integer sum has to be reduced, converted and scaled per row.
//!
//! Here the blocks of 16 consecutive rows at the same column block are stored together (288
//! bytes, the size of the 16 blocks they replace): the 16 scales (32 bytes), then four chunks of
//! 64 bytes, chunk `k` holding code bytes `4k..4k+4` of rows 0..16 in turn. One 512-bit load of a
//! chunk gives every lane a different row's 4 code bytes (8 weights: low nibbles are columns
//! `4k..4k+4`, high nibbles `16+4k..16+4k+4`), and a `vpdpbusd` with those 4 activations broadcast
//! to every lane adds 4 products to each of the 16 rows. Eight of them sum the whole block for 16
//! rows, so the int32-to-float conversion and the scaling by `d_w * d_x` are done once per 16
//! rows and block, not once per row; the unpacked codes of a block serve every token of a tile.
//!
//! Each row's sum runs over its blocks in order, `acc += (d_w * d_x) * isum`, as the reference
//! backend sums them. With AVX2 alone, each 512-bit chunk is read as two 256-bit halves of 8
//! rows and `vpmaddubsw` with `vpmaddwd` takes the place of `vpdpbusd`. The layout needs a
//! multiple of 16 rows; the CPU backend repacks a memory-mapped Q4_0 matrix at load when AVX2
//! (with FMA and F16C) or AVX-512 VNNI is present and drops the mapped pages of the original.

use anyhow::{bail, Result};
use half::f16;

use crate::backend::cpu::fast::{self, quantize_tokens, OutPtr, Q8Row, Simd, Q8_SCRATCH};
use crate::backend::cpu::pool;
use crate::format::quant::GgmlType;
use crate::model::weights::Tensor;

/// Rows stored together.
pub const ROWS: usize = 16;
/// Bytes of 16 rows at one column block: 16 f16 scales and 16 x 16 code bytes.
const GROUP_BLOCK_BYTES: usize = 32 + ROWS * 16;
/// Tokens dotted together in prefill: each block's unpacked codes serve this many tokens.
const TOKEN_TILE: usize = 4;
/// Row groups per parallel task in prefill (64 rows).
const GROUPS_PER_TASK: usize = 4;

/// A Q4_0 matrix in the 16-row layout (see the module comment).
pub struct PackedQ4_0 {
    pub n_cols: usize,
    pub n_rows: usize,
    bytes: Vec<u8>,
}

impl PackedQ4_0 {
    /// Whether `t` can be repacked: Q4_0 with a multiple of 16 rows.
    pub fn fits(t: &Tensor) -> bool {
        t.ty == GgmlType::Q4_0 && t.n_rows > 0 && t.n_rows.is_multiple_of(ROWS)
    }

    /// Repacks `t` (see [`PackedQ4_0::fits`]).
    pub fn new(t: &Tensor) -> Result<PackedQ4_0> {
        if !Self::fits(t) {
            bail!("tensor {}: only Q4_0 matrices of a multiple of {ROWS} rows are repacked ({} [{}, {}])", t.name, t.ty, t.n_cols, t.n_rows);
        }
        let nb = t.n_cols / 32;
        let mut bytes = Vec::new();
        if bytes.try_reserve_exact(t.n_bytes()).is_err() {
            bail!("tensor {}: cannot allocate {} bytes to repack it", t.name, t.n_bytes());
        }
        bytes.resize(t.n_bytes(), 0);
        for (g, dst) in bytes.chunks_exact_mut(nb * GROUP_BLOCK_BYTES).enumerate() {
            let rows: [&[u8]; ROWS] = std::array::from_fn(|j| t.row(g * ROWS + j));
            for (b, out) in dst.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
                for (j, row) in rows.iter().enumerate() {
                    let blk = &row[b * 18..(b + 1) * 18];
                    out[2 * j..2 * j + 2].copy_from_slice(&blk[..2]);
                    for k in 0..4 {
                        let o = 32 + 64 * k + 4 * j;
                        out[o..o + 4].copy_from_slice(&blk[2 + 4 * k..6 + 4 * k]);
                    }
                }
            }
        }
        Ok(PackedQ4_0 { n_cols: t.n_cols, n_rows: t.n_rows, bytes })
    }

    /// Bytes held (the same as the GGUF layout's).
    pub fn n_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Row `r` back in the GGUF layout (`n_cols / 32` blocks of 18 bytes).
    pub fn gguf_row(&self, r: usize, out: &mut [u8]) {
        let nb = self.n_cols / 32;
        let (g, j) = (r / ROWS, r % ROWS);
        let group = &self.bytes[g * nb * GROUP_BLOCK_BYTES..(g + 1) * nb * GROUP_BLOCK_BYTES];
        for (b, blk) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
            let o = &mut out[b * 18..(b + 1) * 18];
            o[..2].copy_from_slice(&blk[2 * j..2 * j + 2]);
            for k in 0..4 {
                let s = 32 + 64 * k + 4 * j;
                o[2 + 4 * k..6 + 4 * k].copy_from_slice(&blk[s..s + 4]);
            }
        }
    }

    fn group(&self, g: usize) -> &[u8] {
        let n = self.n_cols / 32 * GROUP_BLOCK_BYTES;
        &self.bytes[g * n..(g + 1) * n]
    }
}

/// Dot products of one row group (`group`: its blocks in order) with `xs`, the 16 results of
/// token `t` in `out[t]`: the portable twin of the AVX-512 kernel, with the same sums.
fn dot16_scalar(group: &[u8], xs: &[&Q8Row], out: &mut [[f32; ROWS]]) {
    for (xq, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = [0.0f32; ROWS];
        for (b, blk) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
            let a = &xq.qs[b * 32..(b + 1) * 32];
            for (j, acc) in acc.iter_mut().enumerate() {
                let mut isum = -8 * xq.sum[b];
                for k in 0..4 {
                    for i in 0..4 {
                        let c = blk[32 + 64 * k + 4 * j + i];
                        isum += (c & 0x0F) as i32 * a[4 * k + i] as i32 + (c >> 4) as i32 * a[16 + 4 * k + i] as i32;
                    }
                }
                let dw = f16::from_le_bytes([blk[2 * j], blk[2 * j + 1]]).to_f32();
                *acc = (isum as f32).mul_add(dw * xq.d[b], *acc);
            }
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q8Row, GROUP_BLOCK_BYTES, ROWS};

    /// [`super::dot16_scalar`] with AVX-512 VNNI for `N` tokens: each block's four code chunks
    /// are loaded and split into nibbles once, then for every token two chains of four
    /// `vpdpbusd` (low nibbles from the offset correction `-8 * sum(x)`, high nibbles from zero)
    /// sum the block for all 16 rows, and one conversion and one FMA scale it into the token's
    /// accumulator.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot16<const N: usize>(group: &[u8], xs: &[&Q8Row], out: &mut [[f32; ROWS]]) {
        let nb = group.len() / GROUP_BLOCK_BYTES;
        let p = group.as_ptr();
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); N];
        let xq: [*const u8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr() as *const u8);
        let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
        let xsum: [*const i32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
        for b in 0..nb {
            let blk = p.add(b * GROUP_BLOCK_BYTES);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let q: [__m512i; 4] = std::array::from_fn(|k| _mm512_loadu_si512(blk.add(32 + 64 * k) as *const __m512i));
            let lo = q.map(|v| _mm512_and_si512(v, m4));
            let hi = q.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4));
            for t in 0..N {
                let a = xq[t].add(b * 32);
                let x4 = |o: usize| _mm512_set1_epi32((a.add(o) as *const i32).read_unaligned());
                let mut s0 = _mm512_set1_epi32(-8 * *xsum[t].add(b));
                let mut s1 = _mm512_setzero_si512();
                for k in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, lo[k], x4(4 * k));
                    s1 = _mm512_dpbusd_epi32(s1, hi[k], x4(16 + 4 * k));
                }
                let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                acc[t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, _mm512_set1_ps(*xd[t].add(b))), acc[t]);
            }
        }
        for t in 0..N {
            _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }

    /// [`super::dot16_scalar`] with AVX2 for `N` tokens, the 16 rows as two halves of 8 (one
    /// 256-bit half of each code chunk gives every lane a different row's 4 code bytes). Per
    /// block, half and token, eight `vpmaddubsw` with 4 activations broadcast add 8 products to
    /// each lane's two 16-bit halves (at most `8 * 2 * 15 * 127 = 30480`, so nothing saturates),
    /// one `vpmaddwd` joins the halves into the row's block sum, and one conversion and one FMA
    /// scale it as the scalar code does: the integer sums are exact, so the results are the
    /// same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot16_avx2<const N: usize>(group: &[u8], xs: &[&Q8Row], out: &mut [[f32; ROWS]]) {
        let nb = group.len() / GROUP_BLOCK_BYTES;
        let p = group.as_ptr();
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let xq: [*const u8; N] = std::array::from_fn(|t| xs[t].qs.as_ptr() as *const u8);
        let xd: [*const f32; N] = std::array::from_fn(|t| xs[t].d.as_ptr());
        let xsum: [*const i32; N] = std::array::from_fn(|t| xs[t].sum.as_ptr());
        for b in 0..nb {
            let blk = p.add(b * GROUP_BLOCK_BYTES);
            let dw: [__m256; 2] = std::array::from_fn(|h| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i)));
            let q: [[__m256i; 2]; 4] = std::array::from_fn(|k| std::array::from_fn(|h| _mm256_loadu_si256(blk.add(32 + 64 * k + 32 * h) as *const __m256i)));
            let lo = q.map(|v| v.map(|v| _mm256_and_si256(v, m4)));
            let hi = q.map(|v| v.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4)));
            for t in 0..N {
                let a = xq[t].add(b * 32);
                let x4 = |o: usize| _mm256_set1_epi32((a.add(o) as *const i32).read_unaligned());
                let xl: [__m256i; 4] = std::array::from_fn(|k| x4(4 * k));
                let xh: [__m256i; 4] = std::array::from_fn(|k| x4(16 + 4 * k));
                let off = _mm256_set1_epi32(-8 * *xsum[t].add(b));
                let sx = _mm256_set1_ps(*xd[t].add(b));
                for h in 0..2 {
                    let mut s = _mm256_maddubs_epi16(lo[0][h], xl[0]);
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[0][h], xh[0]));
                    for k in 1..4 {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[k][h], xl[k]));
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[k][h], xh[k]));
                    }
                    let isum = _mm256_add_epi32(_mm256_madd_epi16(s, ones), off);
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw[h], sx), acc[t][h]);
                }
            }
        }
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t][0]);
            _mm256_storeu_ps(out[t].as_mut_ptr().add(8), acc[t][1]);
        }
    }
}

/// One row group against 1 to [`TOKEN_TILE`] tokens, with the kernel the SIMD level allows.
fn dot16(group: &[u8], xs: &[&Q8Row], out: &mut [[f32; ROWS]]) {
    #[cfg(target_arch = "x86_64")]
    if fast::simd() != Simd::Scalar {
        type Kernel = unsafe fn(&[u8], &[&Q8Row], &mut [[f32; ROWS]]);
        // Indexed by the number of tokens less one.
        let kernels: [Kernel; TOKEN_TILE] = if fast::simd() == Simd::Avx512Vnni {
            [x86::dot16::<1>, x86::dot16::<2>, x86::dot16::<3>, x86::dot16::<4>]
        } else {
            [x86::dot16_avx2::<1>, x86::dot16_avx2::<2>, x86::dot16_avx2::<3>, x86::dot16_avx2::<4>]
        };
        // SAFETY: the kernel's instructions were detected with the level (a level is only set
        // if supported: AVX-512 VNNI, or AVX2 with FMA and F16C); every activation row holds
        // `n_cols` codes and `n_cols / 32` scales and sums, as many blocks as `group`.
        unsafe { kernels[xs.len().clamp(1, TOKEN_TILE) - 1](group, xs, out) };
        return;
    }
    dot16_scalar(group, xs, out);
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` over the repacked matrix, activations quantized to int8
/// blocks as [`fast::matmul`] quantizes them.
pub fn matmul(w: &PackedQ4_0, x: &[f32], n_tokens: usize, out: &mut [f32]) -> Result<()> {
    let (n_cols, n_rows) = (w.n_cols, w.n_rows);
    if x.len() < n_tokens * n_cols || out.len() < n_tokens * n_rows {
        bail!("packed matmul: {} inputs and {} outputs for {n_tokens} tokens of [{n_cols}, {n_rows}]", x.len(), out.len());
    }
    let n_groups = n_rows / ROWS;
    let outp = OutPtr(out.as_mut_ptr());
    Q8_SCRATCH.with(|cell| {
        let mut q = cell.borrow_mut();
        let q = quantize_tokens(x, n_tokens, n_cols, &mut q);
        // Decoding reads the weights once: each thread takes one contiguous share of the groups,
        // one stream for the prefetchers. Prefill reuses a task's groups from cache for every
        // token tile.
        let per_task = if n_tokens <= TOKEN_TILE { n_groups.div_ceil(pool::n_threads()) } else { GROUPS_PER_TASK };
        pool::for_each(n_groups.div_ceil(per_task), |task| {
            let outp = outp;
            let groups = task * per_task..((task + 1) * per_task).min(n_groups);
            let mut res = [[0.0f32; ROWS]; TOKEN_TILE];
            for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                let nt = (n_tokens - t0).min(TOKEN_TILE);
                let xs: [&Q8Row; TOKEN_TILE] = std::array::from_fn(|i| &q[t0 + i.min(nt - 1)]);
                for g in groups.clone() {
                    dot16(w.group(g), &xs[..nt], &mut res[..nt]);
                    for (i, r) in res[..nt].iter().enumerate() {
                        // SAFETY: rows g*16..g*16+16 of token t0+i are inside `out` (checked
                        // above) and written by this task alone.
                        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), outp.0.add((t0 + i) * n_rows + g * ROWS), ROWS) };
                    }
                }
            }
        });
    });
    Ok(())
}
