//! The storage shared by the compressed codecs (uniform, group, GEAR): per KV head, a list of
//! compressed blocks followed by a recent fp16 buffer, tokens in arrival order.
//!
//! Buffering: appended tokens (rounded to f16, as the fp16 cache stores them) go to the head's
//! buffer, and stay there through the attention of the step that brought them. At the end of a
//! step (`compress_due`, called by the strategy layer once the policy has evicted), when the
//! buffer holds at least `flush` tokens, its oldest `floor(len / flush) * flush` tokens are
//! compressed into one new block and the rest stay in fp16. Without eviction the buffer
//! therefore holds `n_tokens mod flush` tokens: a prompt of `n` tokens is compressed at once
//! except its last `n mod flush`, and decoding compresses one block of `flush` tokens every
//! `flush` steps.
//!
//! A block stores K and V as `Part`s: the backbone quantization of `X - S` (`QuantMatrix`), and
//! for GEAR the sparse outliers `S` and the low-rank factors of the residual. A token's decoded
//! value is `deq(Q) + A Bᵀ`, plus on an outlier's position its stored correction (its value
//! minus `deq(Q) + A Bᵀ` there, computed at compression and rounded to f16), which gives the
//! outlier back to within an f16 rounding of the correction.
//!
//! Eviction drops a token's row everywhere it has one (codes, per-token scales, its row of `A`,
//! its outliers) and compacts the arrays; what is shared by rows (per-channel key scales of a row
//! group, `B`) stays, so the surviving tokens decode bit-identically. A block left with no rows is
//! freed whole.
//!
//! `scores` and `weighted_values` work block by block on the packed data: each row's codes are
//! unpacked into a stack buffer, never the whole cache, and nothing is allocated per call.
//! Decoding's direct paths (`scores_direct`, `weighted_direct`) go further where the backbone
//! allows (2, 4 or 8 bits, groups of whole 8-byte chunks): the kernels of `direct` multiply the
//! codes themselves, with no dequantized row in between, and GEAR's terms follow per block.

use anyhow::{bail, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::direct::{self, Kernel, Portable};
use super::lowrank::LowRank;
use super::quant::{Layout, QuantMatrix, RowTerms};
use super::sparse::{best_code, outlier_count, Outliers, Positions, RowSplit};
use super::{KvBytes, MAX_DIRECT_QUERIES, MAX_HEAD_DIM, MAX_RANK};
use crate::rng::Rng;

/// GEAR's extra terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GearScheme {
    /// Rank of blocks compressed by an append of more than one token (the prompt).
    pub rank: usize,
    /// Rank of blocks compressed by a one-token append (decoding).
    pub rank_decode: usize,
    pub iters: usize,
    /// Fraction of each block's K (and V) entries kept as exact outliers.
    pub outliers: f64,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scheme {
    pub bits: u32,
    pub k_layout: Layout,
    pub v_layout: Layout,
    pub flush: usize,
    pub gear: Option<GearScheme>,
}

#[derive(Clone, Debug)]
struct Part {
    q: QuantMatrix,
    out: Outliers,
    lr: LowRank,
}

/// Whether this CPU runs AVX2 (detected once by std); the f32 loops below then run compiled for
/// it. The same operations in the same order at a wider vector width: results are bit-identical.
#[inline]
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `sum_i a[i] * b[i]`, 8 lanes then the tail.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `out[i] += p * x[i]`.
#[inline]
pub(crate) fn axpy(out: &mut [f32], p: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { axpy_avx2(out, p, x) };
    }
    axpy_lanes(out, p, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2(out: &mut [f32], p: f32, x: &[f32]) {
    axpy_lanes(out, p, x)
}

#[inline(always)]
pub(crate) fn axpy_lanes(out: &mut [f32], p: f32, x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += p * v;
    }
}

impl Part {
    /// Compresses `x` (`[n, d]`, used as scratch) with rank `rank` (GEAR) or as a plain quantized
    /// matrix (`gear` is `None`).
    fn compress(x: &mut [f32], n: usize, d: usize, bits: u32, layout: Layout, gear: Option<(&GearScheme, usize)>, rng: &mut Rng) -> Part {
        let (mut out, skip) = match gear {
            Some((g, _)) => Outliers::extract(x, outlier_count(g.outliers, n * d)),
            None => (Outliers::default(), Vec::new()),
        };
        let mut q = QuantMatrix::quantize(x, n, d, bits, layout);
        let lr = match gear {
            Some((g, rank)) if rank > 0 => {
                q.for_rows(n, |j, row| {
                    for (v, &dq) in x[j * d..(j + 1) * d].iter_mut().zip(row) {
                        *v -= dq;
                    }
                });
                for &p in &skip {
                    x[p as usize] = 0.0;
                }
                LowRank::fit(x, n, d, rank, g.iters, rng, &skip)
            }
            _ => LowRank::default(),
        };
        // Each outlier becomes its correction to what `decode_row` gives at its place, with the
        // code there chosen to cancel most of the correction's rounding.
        let levels = (1u32 << bits) - 1;
        out.into_corrections(|p, v| {
            let (j, c) = (p / d, p % d);
            let (s, z) = q.scale_of(j, c);
            let (code, corr) = best_code(v, s, z, (lr.rank > 0).then(|| lr.entry(j, c)), levels);
            q.set_code(j, c, code);
            corr
        });
        Part { q, out, lr }
    }

    fn add_bytes(&self, b: &mut KvBytes) {
        b.codes += self.q.code_bytes();
        b.scales += self.q.scale_bytes();
        b.lowrank += self.lr.bytes();
        b.outliers += self.out.bytes();
    }

    /// `out[j] = q . x_j` for the first `out.len()` rows.
    #[inline]
    fn scores(&self, q: &[f32], out: &mut [f32]) {
        let d = q.len();
        let r = self.lr.rank;
        let mut bq = [0f32; MAX_RANK];
        if r > 0 {
            self.lr.bt_times(q, &mut bq);
        }
        let n_out = self.out.len();
        let mut oi = 0;
        let mut aj = [0f32; MAX_RANK];
        self.q.for_rows(out.len(), |j, row| {
            let mut s = dot(q, row);
            if r > 0 {
                self.lr.a_row(j, &mut aj[..r]);
                s += dot(&aj[..r], &bq[..r]);
            }
            while oi < n_out && self.out.pos(oi) < (j + 1) * d {
                s += q[self.out.pos(oi) - j * d] * self.out.value(oi);
                oi += 1;
            }
            out[j] = s;
        });
    }

    /// `out += sum_j p[j] x_j` over the first `p.len()` rows.
    #[inline]
    fn weighted(&self, p: &[f32], out: &mut [f32]) {
        let d = out.len();
        let r = self.lr.rank;
        let mut pa = [0f32; MAX_RANK];
        let n_out = self.out.len();
        let mut oi = 0;
        let mut aj = [0f32; MAX_RANK];
        self.q.for_rows(p.len(), |j, row| {
            let pj = p[j];
            axpy(out, pj, row);
            if r > 0 {
                self.lr.a_row(j, &mut aj[..r]);
                axpy(&mut pa[..r], pj, &aj[..r]);
            }
            while oi < n_out && self.out.pos(oi) < (j + 1) * d {
                out[self.out.pos(oi) - j * d] += pj * self.out.value(oi);
                oi += 1;
            }
        });
        if r > 0 {
            self.lr.add_b_times(&pa[..r], out);
        }
    }

    /// For each query `i` of `qs` (`[n_q, d]`, at most [`MAX_DIRECT_QUERIES`]) and row `j` of
    /// `rows`: `out[i * stride + j - rows.start] = q_i . x_j`, without decoding `x_j` whole: the
    /// dequantized row is dotted with each query, the low-rank term is `a_j . (Bᵀ q_i)` (rank
    /// products, not `rank * d`), and each outlier corrects its position.
    #[inline]
    fn scores_in(&self, rows: std::ops::Range<usize>, qs: &[f32], d: usize, out: &mut [f32], stride: usize) {
        let r = self.lr.rank;
        let n_q = qs.len() / d;
        let mut bq = [[0f32; MAX_RANK]; MAX_DIRECT_QUERIES];
        if r > 0 {
            for (b, q) in bq.iter_mut().zip(qs.chunks_exact(d)) {
                self.lr.bt_times(q, b);
            }
        }
        let n_out = self.out.len();
        let mut oi = partition_point(n_out, |i| self.out.pos(i) < rows.start * d);
        let mut aj = [0f32; MAX_RANK];
        let j0 = rows.start;
        self.q.for_rows_in(rows, |j, row| {
            if r > 0 {
                self.lr.a_row(j, &mut aj[..r]);
            }
            for (i, q) in qs.chunks_exact(d).enumerate() {
                let mut s = dot(q, row);
                if r > 0 {
                    s += dot(&aj[..r], &bq[i][..r]);
                }
                out[i * stride + j - j0] = s;
            }
            while oi < n_out && self.out.pos(oi) < (j + 1) * d {
                let (c, delta) = (self.out.pos(oi) - j * d, self.out.value(oi));
                for i in 0..n_q {
                    out[i * stride + j - j0] += qs[i * d + c] * delta;
                }
                oi += 1;
            }
        });
    }

    /// For each query `i`: `out_i += sum_j p[i * stride + j - rows.start] x_j` over the rows of
    /// `rows` (`out`: `[n_q, d]`), without decoding `x_j` whole: each dequantized row is added
    /// once per query, the low-rank term once per query and block as `B (sum_j p_j a_j)`, and
    /// each outlier corrects its position.
    #[inline]
    fn weighted_in(&self, rows: std::ops::Range<usize>, p: &[f32], stride: usize, d: usize, out: &mut [f32]) {
        let r = self.lr.rank;
        let n_q = out.len() / d;
        let mut pa = [[0f32; MAX_RANK]; MAX_DIRECT_QUERIES];
        let n_out = self.out.len();
        let mut oi = partition_point(n_out, |i| self.out.pos(i) < rows.start * d);
        let mut aj = [0f32; MAX_RANK];
        let j0 = rows.start;
        self.q.for_rows_in(rows, |j, row| {
            if r > 0 {
                self.lr.a_row(j, &mut aj[..r]);
            }
            for (i, o) in out.chunks_exact_mut(d).enumerate() {
                let pj = p[i * stride + j - j0];
                if pj != 0.0 {
                    axpy(o, pj, row);
                    if r > 0 {
                        axpy(&mut pa[i][..r], pj, &aj[..r]);
                    }
                }
            }
            while oi < n_out && self.out.pos(oi) < (j + 1) * d {
                let (c, delta) = (self.out.pos(oi) - j * d, self.out.value(oi));
                for i in 0..n_q {
                    out[i * d + c] += p[i * stride + j - j0] * delta;
                }
                oi += 1;
            }
        });
        if r > 0 {
            for (o, a) in out.chunks_exact_mut(d).zip(&pa) {
                self.lr.add_b_times(&a[..r], o);
            }
        }
    }

    /// `B` (`[d, rank]`) in f32 into `bf`.
    #[inline(always)]
    fn b_f32<K: Kernel>(&self, d: usize, bf: &mut Vec<f32>) {
        bf.clear();
        bf.resize(d * self.lr.rank, 0.0);
        // SAFETY: the caller runs `K` where the CPU has its instructions.
        unsafe { K::f16s(&self.lr.b, bf) };
    }

    /// The outliers in the rows `lo..hi`: indices `first..last`.
    #[inline(always)]
    fn outliers_in(&self, lo: usize, hi: usize, d: usize) -> (usize, usize) {
        let n_out = self.out.len();
        (partition_point(n_out, |i| self.out.pos(i) < lo * d), partition_point(n_out, |i| self.out.pos(i) < hi * d))
    }

    /// `f(j, c, correction)` for each outlier in the rows `lo..hi`: what the direct paths add
    /// at its place to the backbone and low-rank terms they have counted.
    #[inline(always)]
    fn outlier_deltas<K: Kernel>(&self, lo: usize, hi: usize, d: usize, f: impl FnMut(usize, usize, f32)) {
        if self.out.len() == 0 || lo >= hi {
            return;
        }
        let (first, last) = self.outliers_in(lo, hi, d);
        let vals = &self.out.values()[first..last];
        match self.out.positions() {
            Positions::U16(p) => deltas_of::<K, u16>(&p[first..last], vals, d, f),
            Positions::U32(p) => deltas_of::<K, u32>(&p[first..last], vals, d, f),
        }
    }

    /// `scores_in` by the packed-code kernels, where the backbone allows it
    /// (`QuantMatrix::direct_ok`; false otherwise, and nothing is written): per row, the
    /// backbone's dot products from the codes, the low-rank term `a_j . (Bᵀ q_i)` and the row's
    /// outlier corrections, summed before the score is stored. `B` goes to f32 in `bf`
    /// (scratch). No closure stands between the caller and the kernels, so that all of it
    /// compiles into the caller (and gets its target features).
    #[inline(always)]
    fn scores_packed<K: Kernel>(&self, rows: std::ops::Range<usize>, qs: &[f32], d: usize, out: &mut [f32], stride: usize, bf: &mut Vec<f32>) -> bool {
        if !self.q.direct_ok() {
            return false;
        }
        let r = self.lr.rank;
        let (lo, hi) = (rows.start, rows.end.min(self.q.n_rows()).max(rows.start));
        let mut bq = [[0f32; MAX_RANK]; MAX_DIRECT_QUERIES];
        if r > 0 {
            self.b_f32::<K>(d, bf);
            for (b, q) in bq.iter_mut().zip(qs.chunks_exact(d)) {
                for (bc, &qc) in bf.chunks_exact(r).zip(q) {
                    for k in 0..r {
                        b[k] += bc[k] * qc;
                    }
                }
            }
        }
        let (first, last) = self.outliers_in(lo, hi, d);
        let vals = &self.out.values()[first..last];
        match self.out.positions() {
            Positions::U16(p) => self.q.scores_direct::<K, u16>(rows, qs, out, stride, &RowTerms { a: &self.lr.a, rank: r, bq: &bq, pos: &p[first..last], vals }),
            Positions::U32(p) => self.q.scores_direct::<K, u32>(rows, qs, out, stride, &RowTerms { a: &self.lr.a, rank: r, bq: &bq, pos: &p[first..last], vals }),
        }
        true
    }

    /// `weighted_in` by the packed-code kernels, where the backbone allows it (false otherwise,
    /// and nothing is added): the backbone's weighted sums from the codes, then the low-rank
    /// term once per query as `B (sum_j p_j a_j)` and each outlier's correction, with `B` in f32
    /// (`bf`: scratch).
    #[inline(always)]
    fn weighted_packed<K: Kernel>(&self, rows: std::ops::Range<usize>, p: &[f32], stride: usize, d: usize, out: &mut [f32], bf: &mut Vec<f32>) -> bool {
        if !self.q.direct_ok() {
            return false;
        }
        self.q.weighted_direct::<K>(rows.clone(), p, stride, out);
        let (r, n_q) = (self.lr.rank, out.len() / d);
        let (lo, hi, j0) = (rows.start, rows.end.min(self.q.n_rows()), rows.start);
        let mut aj = [0f32; MAX_RANK];
        if r > 0 {
            self.b_f32::<K>(d, bf);
            let mut pa = [[0f32; MAX_RANK]; MAX_DIRECT_QUERIES];
            for j in lo..hi {
                // SAFETY: the caller runs `K` where the CPU has its instructions.
                unsafe { K::f16s(&self.lr.a[j * r..(j + 1) * r], &mut aj[..r]) };
                for (i, a) in pa.iter_mut().enumerate().take(n_q) {
                    let x = p[i * stride + j - j0];
                    for k in 0..r {
                        a[k] += x * aj[k];
                    }
                }
            }
            for (o, a) in out.chunks_exact_mut(d).zip(&pa) {
                for (oc, bc) in o.iter_mut().zip(bf.chunks_exact(r)) {
                    let mut t = 0f32;
                    for k in 0..r {
                        t += bc[k] * a[k];
                    }
                    *oc += t;
                }
            }
        }
        self.outlier_deltas::<K>(lo, hi, d, |j, c, delta| {
            for i in 0..n_q {
                out[i * d + c] += p[i * stride + j - j0] * delta;
            }
        });
        true
    }

    /// Calls `f(j, x_j)` for the rows of `rows`, each decoded whole: `deq(Q) + A Bᵀ`, the
    /// outliers' exact values on their positions. `bf` is scratch for `B` in f32.
    #[inline(always)]
    fn for_decoded_rows(&self, rows: std::ops::Range<usize>, d: usize, bf: &mut Vec<f32>, mut f: impl FnMut(usize, &[f32])) {
        let r = self.lr.rank;
        if r > 0 {
            // B (`[d, r]`) transposed to `[r, d]`: a row's low-rank term is then r vector
            // multiply-adds, summed over k in the order `LowRank::entry` sums them.
            // Converted as one slice (8 values per instruction), then transposed.
            bf.clear();
            bf.resize(2 * r * d, 0.0);
            let (bt, raw) = bf.split_at_mut(r * d);
            self.lr.b.convert_to_f32_slice(raw);
            for (c, bc) in raw.chunks_exact(r).enumerate() {
                for (k, &b) in bc.iter().enumerate() {
                    bt[k * d + c] = b;
                }
            }
        }
        let n_out = self.out.len();
        // Outlier positions ascend: the first one at or after the range's first row.
        let mut oi = partition_point(n_out, |i| self.out.pos(i) < rows.start * d);
        let mut aj = [0f32; MAX_RANK];
        let mut buf = [0f32; MAX_HEAD_DIM];
        let mut lbuf = [0f32; MAX_HEAD_DIM];
        let row = &mut buf[..d];
        let lrow = &mut lbuf[..d];
        self.q.for_rows_in(rows, |j, deq| {
            row.copy_from_slice(deq);
            if r > 0 {
                self.lr.a_row(j, &mut aj[..r]);
                lrow.fill(0.0);
                for (k, &a) in aj[..r].iter().enumerate() {
                    axpy(lrow, a, &bf[k * d..(k + 1) * d]);
                }
                for (x, &l) in row.iter_mut().zip(lrow.iter()) {
                    *x += l;
                }
            }
            while oi < n_out && self.out.pos(oi) < (j + 1) * d {
                row[self.out.pos(oi) - j * d] += self.out.value(oi);
                oi += 1;
            }
            f(j, row);
        });
    }

    fn decode_row(&self, j: usize, dst: &mut [f32]) {
        let d = dst.len();
        self.q.decode_row(j, dst);
        if self.lr.rank > 0 {
            for (c, v) in dst.iter_mut().enumerate() {
                *v += self.lr.entry(j, c);
            }
        }
        for i in 0..self.out.len() {
            let p = self.out.pos(i);
            if p / d == j {
                dst[p % d] += self.out.value(i);
            }
        }
    }

    fn remove_rows(&mut self, rows: &[usize], d: usize) {
        self.q.remove_rows(rows);
        self.lr.remove_rows(rows);
        self.out.remove_rows(rows, d);
    }
}

/// `Part::outlier_deltas` over the outliers at `pos` (flat indices, ascending) with corrections
/// `vals`.
#[inline(always)]
fn deltas_of<K: Kernel, P: Copy + Into<u64>>(pos: &[P], vals: &[f16], d: usize, mut f: impl FnMut(usize, usize, f32)) {
    let rows = RowSplit::new(d);
    for (&p, &v) in pos.iter().zip(vals) {
        let (j, c) = rows.split(p.into() as usize);
        // SAFETY: the caller runs `K` where the CPU has its instructions.
        f(j, c, unsafe { K::h2f(v) });
    }
}

#[derive(Clone, Debug)]
struct Block {
    n: usize,
    k: Part,
    v: Part,
}

#[derive(Clone, Debug, Default)]
struct Head {
    blocks: Vec<Block>,
    n_compressed: usize,
    buf_k: Vec<f16>,
    buf_v: Vec<f16>,
    /// Blocks compressed so far (seeds the power iteration; eviction does not change it).
    made: u64,
}

/// One layer's compressed K/V: the state behind `UniformCodec`, `GroupCodec` and `GearCodec`.
#[derive(Clone, Debug)]
pub(crate) struct Blocked {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scheme: Scheme,
    heads: Vec<Head>,
}

/// The first `i < n` for which `pred(i)` is false, `pred` being true then false over `0..n`.
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The compressed blocks of a head holding some of the rows `lo..hi`, for the direct paths: each
/// as (its keys' part, or its values' when `value`; the rows within the block; the position of
/// the first of them in `lo..hi`). Then `buffered` gives those rows held in the f16 buffer.
struct Segments<'a> {
    blocks: std::slice::Iter<'a, Block>,
    /// Rows of the blocks walked so far.
    off: usize,
    lo: usize,
    hi: usize,
    value: bool,
    d: usize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = (&'a Part, std::ops::Range<usize>, usize);

    fn next(&mut self) -> Option<Self::Item> {
        for b in self.blocks.by_ref() {
            let off = self.off;
            self.off += b.n;
            if off < self.hi && off + b.n > self.lo {
                let local = self.lo.saturating_sub(off)..(self.hi - off).min(b.n);
                let at = off + local.start - self.lo;
                return Some((if self.value { &b.v } else { &b.k }, local, at));
            }
        }
        None
    }
}

impl<'a> Segments<'a> {
    /// After every block: `(j, x_j)` for the rows of `lo..hi` in `head`'s f16 buffer.
    fn buffered(self, head: &'a Head) -> impl Iterator<Item = (usize, &'a [f16])> {
        let buf = if self.value { &head.buf_v } else { &head.buf_k };
        let (off, d) = (self.off, self.d);
        let first = self.lo.max(off);
        let last = self.hi.min(off + buf.len() / d).max(first);
        buf[(first - off) * d..(last - off) * d].chunks_exact(d).enumerate().map(move |(i, x)| (first + i, x))
    }
}

thread_local! {
    /// A block's low-rank `B` in f32 while its rows are decoded (reused, so decoding allocates
    /// nothing per step).
    static B_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The power-iteration seed of block `blk` of head `g`.
pub(crate) fn block_seed(seed: u64, g: usize, blk: u64) -> u64 {
    seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ blk.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

impl Blocked {
    pub(crate) fn new(n_kv_heads: usize, head_dim: usize, scheme: Scheme) -> Blocked {
        Blocked { n_kv_heads, head_dim, scheme, heads: vec![Head::default(); n_kv_heads] }
    }

    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        let (h_n, d) = (self.n_kv_heads, self.head_dim);
        let want = n_tokens.checked_mul(h_n * d);
        if want != Some(k.len()) || want != Some(v.len()) {
            bail!("append of {n_tokens} tokens needs {n_tokens} x {h_n} x {d} values for K and V, got {} and {}", k.len(), v.len());
        }
        for (g, head) in self.heads.iter_mut().enumerate() {
            head.buf_k.reserve(n_tokens * d);
            head.buf_v.reserve(n_tokens * d);
            for t in 0..n_tokens {
                let src = t * h_n * d + g * d;
                head.buf_k.extend(k[src..src + d].iter().map(|&x| f16::from_f32(x)));
                head.buf_v.extend(v[src..src + d].iter().map(|&x| f16::from_f32(x)));
            }
        }
        Ok(())
    }

    /// Compresses, in every head whose buffer holds at least `flush` tokens, its oldest
    /// `floor(n_buf / flush) * flush` tokens into one new block (GEAR rank `rank` for the prompt,
    /// `rank_decode` for a block that decoding filled).
    pub(crate) fn compress_due(&mut self, prompt: bool) -> Result<()> {
        let (d, scheme) = (self.head_dim, self.scheme);
        for (g, head) in self.heads.iter_mut().enumerate() {
            let n_buf = head.buf_k.len() / d;
            if n_buf < scheme.flush {
                continue;
            }
            let m = n_buf / scheme.flush * scheme.flush;
            let mut xk = vec![0f32; m * d];
            let mut xv = vec![0f32; m * d];
            head.buf_k[..m * d].convert_to_f32_slice(&mut xk);
            head.buf_v[..m * d].convert_to_f32_slice(&mut xv);
            let gear = scheme.gear.as_ref().map(|gs| (gs, if prompt { gs.rank } else { gs.rank_decode }));
            let mut rng = Rng::new(block_seed(scheme.gear.map_or(0, |gs| gs.seed), g, head.made));
            let kp = Part::compress(&mut xk, m, d, scheme.bits, scheme.k_layout, gear, &mut rng);
            let vp = Part::compress(&mut xv, m, d, scheme.bits, scheme.v_layout, gear, &mut rng);
            head.blocks.push(Block { n: m, k: kp, v: vp });
            head.n_compressed += m;
            head.made += 1;
            head.buf_k.drain(..m * d);
            head.buf_v.drain(..m * d);
        }
        Ok(())
    }

    pub(crate) fn len(&self, g: usize) -> usize {
        self.heads.get(g).map_or(0, |h| h.n_compressed + h.buf_k.len() / self.head_dim)
    }

    /// Tokens of head `g` held compressed and in the fp16 buffer.
    pub(crate) fn split_len(&self, g: usize) -> (usize, usize) {
        self.heads.get(g).map_or((0, 0), |h| (h.n_compressed, h.buf_k.len() / self.head_dim))
    }

    pub(crate) fn scores(&self, g: usize, q: &[f32], out: &mut [f32]) {
        let d = self.head_dim;
        let Some(head) = self.heads.get(g).filter(|_| q.len() == d) else {
            out.fill(f32::NAN);
            return;
        };
        let mut off = 0;
        for b in &head.blocks {
            if off >= out.len() {
                return;
            }
            let m = (out.len() - off).min(b.n);
            b.k.scores(q, &mut out[off..off + m]);
            off += m;
        }
        let mut row = [0f32; MAX_HEAD_DIM];
        for (o, kr) in out[off..].iter_mut().zip(head.buf_k.chunks_exact(d)) {
            kr.convert_to_f32_slice(&mut row[..d]);
            *o = dot(q, &row[..d]);
            off += 1;
        }
        out[off..].fill(f32::NEG_INFINITY);
    }

    pub(crate) fn weighted_values(&self, g: usize, p: &[f32], out: &mut [f32]) {
        let d = self.head_dim;
        let Some(head) = self.heads.get(g).filter(|_| out.len() == d) else { return };
        let mut off = 0;
        for b in &head.blocks {
            if off >= p.len() {
                return;
            }
            let m = (p.len() - off).min(b.n);
            b.v.weighted(&p[off..off + m], out);
            off += m;
        }
        let mut row = [0f32; MAX_HEAD_DIM];
        for (&pj, vr) in p[off..].iter().zip(head.buf_v.chunks_exact(d)) {
            vr.convert_to_f32_slice(&mut row[..d]);
            axpy(out, pj, &row[..d]);
        }
    }

    /// Head `g` for a direct path over `rows` with `n_values` query values (`n_q` rows of
    /// `head_dim`); `None` where the head does not exist or `n_q` is not a direct path's (0, over
    /// [`MAX_DIRECT_QUERIES`], or not whole rows).
    fn direct_head(&self, g: usize, n_values: usize, rows: &std::ops::Range<usize>) -> Option<&Head> {
        let d = self.head_dim;
        let n_q = n_values / d;
        let ok = n_values.is_multiple_of(d) && n_q > 0 && n_q <= MAX_DIRECT_QUERIES && rows.start <= rows.end;
        self.heads.get(g).filter(|_| ok)
    }

    /// See `Codec::scores_direct`.
    pub(crate) fn scores_direct(&self, g: usize, qs: &[f32], rows: std::ops::Range<usize>, out: &mut [f32], stride: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if direct::avx2_fma_f16c() {
            // SAFETY: the CPU has the instructions (checked just above).
            return unsafe { self.scores_direct_avx2(g, qs, rows, out, stride) };
        }
        self.scores_direct_body::<Portable>(g, qs, rows, out, stride)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_direct_avx2(&self, g: usize, qs: &[f32], rows: std::ops::Range<usize>, out: &mut [f32], stride: usize) -> bool {
        self.scores_direct_body::<direct::Avx2>(g, qs, rows, out, stride)
    }

    /// Blocks by the packed-code kernels `K` where their backbone allows, by `Part::scores_in`
    /// otherwise (3-bit codes, groups that are not whole chunks).
    #[inline(always)]
    fn scores_direct_body<K: Kernel>(&self, g: usize, qs: &[f32], rows: std::ops::Range<usize>, out: &mut [f32], stride: usize) -> bool {
        let d = self.head_dim;
        let Some(head) = self.direct_head(g, qs.len(), &rows) else { return false };
        let mut bf = B_F32.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        let mut segs = Segments { blocks: head.blocks.iter(), off: 0, lo: rows.start, hi: rows.end, value: false, d };
        for (part, local, at) in &mut segs {
            if !part.scores_packed::<K>(local.clone(), qs, d, &mut out[at..], stride, &mut bf) {
                part.scores_in(local, qs, d, &mut out[at..], stride);
            }
        }
        B_F32.with(|cell| *cell.borrow_mut() = bf);
        let mut row = [0f32; MAX_HEAD_DIM];
        for (j, x) in segs.buffered(head) {
            x.convert_to_f32_slice(&mut row[..d]);
            for (i, q) in qs.chunks_exact(d).enumerate() {
                out[i * stride + j - rows.start] = dot(q, &row[..d]);
            }
        }
        true
    }

    /// See `Codec::weighted_direct`.
    pub(crate) fn weighted_direct(&self, g: usize, p: &[f32], stride: usize, rows: std::ops::Range<usize>, out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if direct::avx2_fma_f16c() {
            // SAFETY: the CPU has the instructions (checked just above).
            return unsafe { self.weighted_direct_avx2(g, p, stride, rows, out) };
        }
        self.weighted_direct_body::<Portable>(g, p, stride, rows, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_direct_avx2(&self, g: usize, p: &[f32], stride: usize, rows: std::ops::Range<usize>, out: &mut [f32]) -> bool {
        self.weighted_direct_body::<direct::Avx2>(g, p, stride, rows, out)
    }

    /// As `scores_direct_body`, for the values.
    #[inline(always)]
    fn weighted_direct_body<K: Kernel>(&self, g: usize, p: &[f32], stride: usize, rows: std::ops::Range<usize>, out: &mut [f32]) -> bool {
        let d = self.head_dim;
        let Some(head) = self.direct_head(g, out.len(), &rows) else { return false };
        let mut bf = B_F32.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        let mut segs = Segments { blocks: head.blocks.iter(), off: 0, lo: rows.start, hi: rows.end, value: true, d };
        for (part, local, at) in &mut segs {
            if !part.weighted_packed::<K>(local.clone(), &p[at..], stride, d, out, &mut bf) {
                part.weighted_in(local, &p[at..], stride, d, out);
            }
        }
        B_F32.with(|cell| *cell.borrow_mut() = bf);
        let mut row = [0f32; MAX_HEAD_DIM];
        for (j, x) in segs.buffered(head) {
            x.convert_to_f32_slice(&mut row[..d]);
            for (i, o) in out.chunks_exact_mut(d).enumerate() {
                let pj = p[i * stride + j - rows.start];
                if pj != 0.0 {
                    axpy(o, pj, &row[..d]);
                }
            }
        }
        true
    }

    pub(crate) fn for_each_decoded(&self, g: usize, value: bool, rows: std::ops::Range<usize>, f: &mut dyn FnMut(usize, &[f32])) {
        let d = self.head_dim;
        let Some(head) = self.heads.get(g) else { return };
        let (lo, hi) = (rows.start, rows.end);
        let off = self.decode_block_rows(head, value, lo, hi, |j, x| f(j, x));
        let buf = if value { &head.buf_v } else { &head.buf_k };
        let mut row = [0f32; MAX_HEAD_DIM];
        let first = lo.max(off);
        for (i, xr) in buf.chunks_exact(d).enumerate().skip(first - off).take(hi.saturating_sub(first)) {
            xr.convert_to_f32_slice(&mut row[..d]);
            f(off + i, &row[..d]);
        }
    }

    /// Calls `f(j, x_j)` for the rows `lo..hi` of `head` held in compressed blocks, in order;
    /// returns the number of rows the blocks hold (the index of the f16 buffer's first row).
    #[inline(always)]
    fn decode_block_rows(&self, head: &Head, value: bool, lo: usize, hi: usize, mut f: impl FnMut(usize, &[f32])) -> usize {
        let mut off = 0;
        // The scratch is taken out of its cell, so that the loop runs in the calling function
        // (compiled for AVX2 when `decode_rows` calls it).
        let mut bf = B_F32.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        for b in &head.blocks {
            if off < hi && off + b.n > lo {
                let part = if value { &b.v } else { &b.k };
                let local = lo.saturating_sub(off)..(hi - off).min(b.n);
                part.for_decoded_rows(local, self.head_dim, &mut bf, |j, x| f(off + j, x));
            }
            off += b.n;
        }
        B_F32.with(|cell| *cell.borrow_mut() = bf);
        off
    }

    /// See `Codec::decode_rows`.
    pub(crate) fn decode_rows(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: AVX2 was detected.
            return unsafe { self.decode_rows_avx2(g, value, rows, out) };
        }
        self.decode_rows_body(g, value, rows, out)
    }

    /// `decode_rows` compiled for AVX2: the unpacking, scaling and low-rank term inlined into it
    /// run 8 lanes wide, with the same operations in the same order (the same values).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_rows_avx2(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]) {
        self.decode_rows_body(g, value, rows, out)
    }

    #[inline(always)]
    fn decode_rows_body(&self, g: usize, value: bool, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let d = self.head_dim;
        let Some(head) = self.heads.get(g) else { return };
        let (lo, hi) = (rows.start, rows.end);
        let off = self.decode_block_rows(head, value, lo, hi, |j, x| out[(j - lo) * d..][..d].copy_from_slice(x));
        let buf = if value { &head.buf_v } else { &head.buf_k };
        let first = lo.max(off);
        let last = hi.min(off + buf.len() / d);
        if first < last {
            buf[(first - off) * d..(last - off) * d].convert_to_f32_slice(&mut out[(first - lo) * d..(last - lo) * d]);
        }
    }

    pub(crate) fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()> {
        let d = self.head_dim;
        let len = self.len(g);
        let Some(head) = self.heads.get_mut(g) else { bail!("evict: KV head {g} of {}", self.n_kv_heads) };
        super::check_evict(idx, len)?;
        let mut i = 0;
        let mut off = 0;
        let mut local = Vec::new();
        for b in head.blocks.iter_mut() {
            local.clear();
            while i < idx.len() && idx[i] < off + b.n {
                local.push(idx[i] - off);
                i += 1;
            }
            off += b.n;
            if !local.is_empty() {
                b.k.remove_rows(&local, d);
                b.v.remove_rows(&local, d);
                b.n -= local.len();
                head.n_compressed -= local.len();
            }
        }
        head.blocks.retain(|b| b.n > 0);
        if i < idx.len() {
            let rows: Vec<usize> = idx[i..].iter().map(|&j| j - off).collect();
            super::remove_f16_rows(&mut head.buf_k, d, &rows);
            super::remove_f16_rows(&mut head.buf_v, d, &rows);
        }
        Ok(())
    }

    pub(crate) fn bytes(&self) -> KvBytes {
        let mut b = KvBytes::default();
        for h in &self.heads {
            for blk in &h.blocks {
                blk.k.add_bytes(&mut b);
                blk.v.add_bytes(&mut b);
            }
            b.fp16 += (h.buf_k.len() + h.buf_v.len()) * 2;
        }
        b
    }

    pub(crate) fn decode_token(&self, g: usize, j: usize, k: &mut [f32], v: &mut [f32]) {
        let d = self.head_dim;
        let ok = k.len() == d && v.len() == d && j < self.len(g);
        let Some(head) = self.heads.get(g).filter(|_| ok) else {
            k.fill(f32::NAN);
            v.fill(f32::NAN);
            return;
        };
        let mut off = 0;
        for b in &head.blocks {
            if j < off + b.n {
                b.k.decode_row(j - off, k);
                b.v.decode_row(j - off, v);
                return;
            }
            off += b.n;
        }
        let r = j - off;
        head.buf_k[r * d..(r + 1) * d].convert_to_f32_slice(k);
        head.buf_v[r * d..(r + 1) * d].convert_to_f32_slice(v);
    }

    /// Outliers of head `g`'s K (`key = true`) or V, as (token index, channel, value), for tests.
    #[cfg(test)]
    pub(crate) fn outliers(&self, g: usize, key: bool) -> Vec<(usize, usize, f32)> {
        let d = self.head_dim;
        let mut res = Vec::new();
        let mut off = 0;
        for b in &self.heads[g].blocks {
            let part = if key { &b.k } else { &b.v };
            for i in 0..part.out.len() {
                let p = part.out.pos(i);
                res.push((off + p / d, p % d, part.out.value(i)));
            }
            off += b.n;
        }
        res
    }
}
