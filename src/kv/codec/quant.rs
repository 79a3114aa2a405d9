//! A bit-packed, asymmetrically quantized `[n, d]` matrix (one KV head's keys or values for a
//! block of tokens).
//!
//! A set of values with minimum `lo` and maximum `hi` is quantized to `b` bits with `2^b - 1`
//! steps: zero point `z` = the largest f16 `<= lo`, step `s` = the smallest f16
//! `>= (hi - z) / (2^b - 1)`, code `round((x - z) / s)` clamped to `0 ..= 2^b - 1`, value
//! `z + s * code`. Rounding `z` down and `s` up means `[z, z + s (2^b - 1)]` covers `[lo, hi]`, so
//! every element is within half a step of its value (with the f16 parameters actually stored).
//!
//! Two layouts:
//! - `Token { group }`: each row's `d` channels in groups of `group` channels, one (step, zero)
//!   pair per row and group (uniform quantization: `group = d`; KIVI values: `group = G`).
//! - `Channel { group }`: the rows in groups of `group` consecutive tokens, one (step, zero) pair
//!   per channel and row group (KIVI keys).
//!
//! Storage: `codes` `[n, row_bytes]` (see `pack`), `scales` f16 (step, zero) pairs: `[n, d/group]`
//! for `Token`, `[n_row_groups, d]` for `Channel`. Dropping a row drops its codes (and its scales
//! in `Token`); in `Channel` its row group keeps its scales and just has one row fewer, and a row
//! group with no rows left frees its scales.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::direct::{self, Kernel};
use super::pack::{code_at, f16_down, f16_up, pack_row, row_bytes, set_code_at, unpack_row};
use super::sparse::RowSplit;
use super::{MAX_DIRECT_QUERIES, MAX_HEAD_DIM, MAX_RANK};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Token { group: usize },
    Channel { group: usize },
}

#[derive(Clone, Debug)]
pub(crate) struct QuantMatrix {
    layout: Layout,
    bits: u32,
    d: usize,
    n: usize,
    row_bytes: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    /// `Channel` only: rows in each row group, in order.
    group_rows: Vec<u32>,
}

/// f16 (step, zero) for values in `[lo, hi]` at `levels = 2^b - 1`.
#[inline]
fn params(lo: f32, hi: f32, levels: f32) -> (f16, f16) {
    let z = f16_down(lo);
    let zf = z.to_f32();
    let s = if hi > zf { f16_up((hi - zf) / levels) } else { f16::ZERO };
    (s, z)
}

#[inline]
fn encode(x: f32, inv_s: f32, z: f32, levels: f32) -> u8 {
    ((x - z) * inv_s).round().clamp(0.0, levels) as u8
}

#[inline]
fn inv(s: f32) -> f32 {
    if s > 0.0 {
        1.0 / s
    } else {
        0.0
    }
}

/// Scale bytes of an `[n, d]` matrix in `layout`: one f16 (step, zero) pair per group.
pub(crate) fn scale_bytes_for(layout: Layout, n: usize, d: usize) -> usize {
    match layout {
        Layout::Token { group } => n * (d / group) * 4,
        Layout::Channel { group } => n.div_ceil(group) * d * 4,
    }
}

/// The part of `scale_bytes_for` per row that rows share, and that evicting a row therefore
/// does not free: a `Channel` row group's per-channel pairs, spread over its rows.
pub(crate) fn shared_scale_bytes_per_row(layout: Layout, d: usize) -> usize {
    match layout {
        Layout::Token { .. } => 0,
        Layout::Channel { group } => d * 4 / group,
    }
}

/// What the direct scores add to each row's dot product with the backbone: GEAR's low-rank
/// term `a_j . bq_i` (`a`: `[n, rank]`, `rank` 0 for none) and its outliers' corrections,
/// `q_i[c] * v` for a correction `v` at flat position `j * d + c` (`pos` ascending, every one in
/// the rows scored).
pub(crate) struct RowTerms<'a, P> {
    pub(crate) a: &'a [f16],
    pub(crate) rank: usize,
    pub(crate) bq: &'a [[f32; MAX_RANK]; MAX_DIRECT_QUERIES],
    pub(crate) pos: &'a [P],
    pub(crate) vals: &'a [f16],
}

/// Where `RowTerms::add` is in the corrections, and how a position splits into row and channel.
pub(crate) struct Cursor {
    next: usize,
    rows: RowSplit,
    d: usize,
}

#[cfg(test)]
impl RowTerms<'_, u16> {
    /// No terms.
    pub(crate) fn none() -> RowTerms<'static, u16> {
        const BQ: [[f32; MAX_RANK]; MAX_DIRECT_QUERIES] = [[0.0; MAX_RANK]; MAX_DIRECT_QUERIES];
        RowTerms { a: &[], rank: 0, bq: &BQ, pos: &[], vals: &[] }
    }
}

impl<P: Copy + Into<u64>> RowTerms<'_, P> {
    pub(crate) fn cursor(&self, d: usize) -> Cursor {
        Cursor { next: 0, rows: RowSplit::new(d), d }
    }

    /// Adds row `j`'s terms to its scores `s` (one per query of `qs`, `[n_q, d]`): the low-rank
    /// term, then its corrections in order. Rows come in ascending order.
    ///
    /// # Safety
    /// The caller runs `K` where the CPU has its instructions.
    #[inline(always)]
    pub(crate) unsafe fn add<K: Kernel, const N: usize>(&self, cur: &mut Cursor, j: usize, qs: &[f32], s: &mut [f32; N]) {
        let (r, d) = (self.rank, cur.d);
        let n_q = qs.len() / d;
        if r > 0 {
            let a = &self.a[j * r..(j + 1) * r];
            for (x, b) in s.iter_mut().zip(self.bq).take(n_q) {
                *x += K::dot_f16(a, &b[..r]);
            }
        }
        while let Some(&p) = self.pos.get(cur.next) {
            let (row, c) = cur.rows.split(p.into() as usize);
            if row != j {
                break;
            }
            let v = K::h2f(self.vals[cur.next]);
            for (i, x) in s.iter_mut().enumerate().take(n_q) {
                *x += qs[i * d + c] * v;
            }
            cur.next += 1;
        }
    }
}

impl QuantMatrix {
    /// Quantizes `x` (`[n, d]` row-major). The layout's group divides `d` (`Token`); `n` need not
    /// be a multiple of a `Channel` group (the last row group is shorter).
    pub(crate) fn quantize(x: &[f32], n: usize, d: usize, bits: u32, layout: Layout) -> QuantMatrix {
        let levels = ((1u32 << bits) - 1) as f32;
        let rb = row_bytes(d, bits);
        let mut codes = vec![0u8; n * rb];
        let mut scales = Vec::new();
        let mut group_rows = Vec::new();
        let mut row_codes = [0u8; MAX_HEAD_DIM];
        match layout {
            Layout::Token { group } => {
                scales.reserve_exact(n * (d / group) * 2);
                for j in 0..n {
                    let row = &x[j * d..(j + 1) * d];
                    for (gi, chunk) in row.chunks_exact(group).enumerate() {
                        let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
                        let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let (s, z) = params(lo, hi, levels);
                        let (is, zf) = (inv(s.to_f32()), z.to_f32());
                        for (c, &v) in chunk.iter().enumerate() {
                            row_codes[gi * group + c] = encode(v, is, zf, levels);
                        }
                        scales.push(s);
                        scales.push(z);
                    }
                    pack_row(&row_codes[..d], bits, &mut codes[j * rb..(j + 1) * rb]);
                }
            }
            Layout::Channel { group } => {
                let n_groups = n.div_ceil(group);
                scales.reserve_exact(n_groups * d * 2);
                group_rows.reserve_exact(n_groups);
                let mut inv_s = [0f32; MAX_HEAD_DIM];
                let mut zf = [0f32; MAX_HEAD_DIM];
                for g0 in (0..n).step_by(group) {
                    let g1 = (g0 + group).min(n);
                    for c in 0..d {
                        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                        for j in g0..g1 {
                            lo = lo.min(x[j * d + c]);
                            hi = hi.max(x[j * d + c]);
                        }
                        let (s, z) = params(lo, hi, levels);
                        inv_s[c] = inv(s.to_f32());
                        zf[c] = z.to_f32();
                        scales.push(s);
                        scales.push(z);
                    }
                    for j in g0..g1 {
                        for c in 0..d {
                            row_codes[c] = encode(x[j * d + c], inv_s[c], zf[c], levels);
                        }
                        pack_row(&row_codes[..d], bits, &mut codes[j * rb..(j + 1) * rb]);
                    }
                    group_rows.push((g1 - g0) as u32);
                }
            }
        }
        QuantMatrix { layout, bits, d, n, row_bytes: rb, codes, scales, group_rows }
    }

    pub(crate) fn n_rows(&self) -> usize {
        self.n
    }

    pub(crate) fn code_bytes(&self) -> usize {
        self.codes.len()
    }

    pub(crate) fn scale_bytes(&self) -> usize {
        self.scales.len() * 2
    }

    /// Calls `f(j, row)` with row `j` dequantized, for rows `0 .. n_rows` (at most `self.n`).
    #[inline]
    pub(crate) fn for_rows(&self, n_rows: usize, f: impl FnMut(usize, &[f32])) {
        self.for_rows_in(0..n_rows, f)
    }

    /// Calls `f(j, row)` with row `j` dequantized, for the rows of `rows` (cut at `self.n`), in
    /// order.
    #[inline(always)]
    pub(crate) fn for_rows_in(&self, rows: std::ops::Range<usize>, mut f: impl FnMut(usize, &[f32])) {
        let d = self.d;
        let (lo, hi) = (rows.start, rows.end.min(self.n));
        let mut buf = [0f32; MAX_HEAD_DIM];
        let row = &mut buf[..d];
        match self.layout {
            Layout::Token { group } => {
                let n_g = d / group;
                for j in lo..hi {
                    unpack_row(&self.codes[j * self.row_bytes..(j + 1) * self.row_bytes], self.bits, row);
                    let sc = &self.scales[j * n_g * 2..(j + 1) * n_g * 2];
                    for (chunk, sz) in row.chunks_exact_mut(group).zip(sc.chunks_exact(2)) {
                        let (s, z) = (sz[0].to_f32(), sz[1].to_f32());
                        for v in chunk {
                            *v = *v * s + z;
                        }
                    }
                    f(j, row);
                }
            }
            Layout::Channel { .. } => {
                let mut s = [0f32; MAX_HEAD_DIM];
                let mut z = [0f32; MAX_HEAD_DIM];
                let mut sz = [0f32; 2 * MAX_HEAD_DIM];
                for (gi, grows) in self.row_groups(lo, hi) {
                    self.scales[gi * d * 2..(gi + 1) * d * 2].convert_to_f32_slice(&mut sz[..2 * d]);
                    for (c, p) in sz[..2 * d].chunks_exact(2).enumerate() {
                        s[c] = p[0];
                        z[c] = p[1];
                    }
                    for j in grows {
                        unpack_row(&self.codes[j * self.row_bytes..(j + 1) * self.row_bytes], self.bits, row);
                        for ((v, &s), &z) in row.iter_mut().zip(&s[..d]).zip(&z[..d]) {
                            *v = *v * s + z;
                        }
                        f(j, row);
                    }
                }
            }
        }
    }

    /// Whether the direct paths (`scores_direct`, `weighted_direct`) take this matrix: 2, 4 or
    /// 8 bits, rows of whole 8-byte chunks and, with per-row scales, groups of whole chunks.
    pub(crate) fn direct_ok(&self) -> bool {
        if !direct::bits_ok(self.bits) {
            return false;
        }
        let c = direct::chunk_codes(self.bits);
        self.d.is_multiple_of(c)
            && match self.layout {
                Layout::Token { group } => group.is_multiple_of(c),
                Layout::Channel { .. } => true,
            }
    }

    /// `Channel`: the row groups holding some of the rows `lo..hi`, as (group index, its rows
    /// among them).
    #[inline(always)]
    fn row_groups(&self, lo: usize, hi: usize) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        let mut start = 0;
        self.group_rows
            .iter()
            .enumerate()
            .map_while(move |(gi, &cnt)| {
                let first = start;
                start += cnt as usize;
                (first < hi).then(|| (gi, first.max(lo)..start.min(hi)))
            })
            .filter(|(_, rows)| !rows.is_empty())
    }

    /// Scores straight from the codes (`direct_ok` must hold): for each row `j` of `rows` (cut
    /// at `n`) and query `i` of `qs` (`[n_q, d]`, `n_q <= MAX_DIRECT_QUERIES`),
    /// `out[i * stride + j - rows.start] = q_i . deq(x_j)` plus what `terms` adds to row `j`.
    #[inline(always)]
    pub(crate) fn scores_direct<K: Kernel, P: Copy + Into<u64>>(&self, rows: std::ops::Range<usize>, qs: &[f32], out: &mut [f32], stride: usize, terms: &RowTerms<P>) {
        match qs.len() / self.d {
            1 => self.scores_n::<K, P, 1>(rows, qs, out, stride, terms),
            2 => self.scores_n::<K, P, 2>(rows, qs, out, stride, terms),
            3 => self.scores_n::<K, P, 3>(rows, qs, out, stride, terms),
            4 => self.scores_n::<K, P, 4>(rows, qs, out, stride, terms),
            _ => self.scores_n::<K, P, MAX_DIRECT_QUERIES>(rows, qs, out, stride, terms),
        }
    }

    /// `scores_direct` with the queries padded with zeros to `N`.
    #[inline(always)]
    fn scores_n<K: Kernel, P: Copy + Into<u64>, const N: usize>(&self, rows: std::ops::Range<usize>, qs: &[f32], out: &mut [f32], stride: usize, terms: &RowTerms<P>) {
        let (d, bits, rb) = (self.d, self.bits, self.row_bytes);
        let n_q = qs.len() / d;
        let (lo, hi, j0) = (rows.start, rows.end.min(self.n), rows.start);
        let mut qp = [0f32; MAX_DIRECT_QUERIES * MAX_HEAD_DIM];
        let mut sz = [0f32; 2 * MAX_HEAD_DIM];
        let mut s = [0f32; N];
        let mut cursor = terms.cursor(d);
        match self.layout {
            Layout::Token { group } => {
                let n_g = d / group;
                // Each query in lane order, and its sum over each group (for the zero points).
                let mut qsum = [0f32; MAX_DIRECT_QUERIES * MAX_HEAD_DIM / 8];
                let order = direct::LaneOrder::new(bits, d);
                for (i, q) in qs.chunks_exact(d).enumerate() {
                    for (x, &c) in qp[i * d..(i + 1) * d].iter_mut().zip(&order.perm) {
                        *x = q[c as usize];
                    }
                    for (g, qg) in q.chunks_exact(group).enumerate() {
                        let mut t = 0f32;
                        for &x in qg {
                            t += x;
                        }
                        qsum[i * n_g + g] = t;
                    }
                }
                for j in lo..hi {
                    let codes = &self.codes[j * rb..(j + 1) * rb];
                    // SAFETY: the caller runs `K` where the CPU has its instructions.
                    unsafe {
                        K::f16s(&self.scales[j * n_g * 2..(j + 1) * n_g * 2], &mut sz[..2 * n_g]);
                        K::dot::<N>(bits, codes, &qp[..N * d], d, group, &sz[..2 * n_g], &mut s);
                    }
                    for (i, x) in s.iter_mut().enumerate().take(n_q) {
                        let mut z = 0f32;
                        for g in 0..n_g {
                            z += sz[2 * g + 1] * qsum[i * n_g + g];
                        }
                        *x += z;
                    }
                    // SAFETY: as above.
                    unsafe { terms.add::<K, N>(&mut cursor, j, qs, &mut s) };
                    for i in 0..n_q {
                        out[i * stride + j - j0] = s[i];
                    }
                }
            }
            Layout::Channel { .. } => {
                // Per row group: each query times the steps, in lane order, and its dot with
                // the zero points.
                let one = [1f32, 0.0];
                let order = direct::LaneOrder::new(bits, d);
                let mut base = [0f32; N];
                for (gi, grows) in self.row_groups(lo, hi) {
                    // SAFETY: as above.
                    unsafe { K::channel_queries::<N>(bits, qs, &self.scales[gi * d * 2..(gi + 1) * d * 2], &order, d, &mut qp[..N * d], &mut base) };
                    for j in grows {
                        let codes = &self.codes[j * rb..(j + 1) * rb];
                        // SAFETY: as above.
                        unsafe { K::dot::<N>(bits, codes, &qp[..N * d], d, d, &one, &mut s) };
                        for (x, &b) in s.iter_mut().zip(&base) {
                            *x += b;
                        }
                        // SAFETY: as above.
                        unsafe { terms.add::<K, N>(&mut cursor, j, qs, &mut s) };
                        for i in 0..n_q {
                            out[i * stride + j - j0] = s[i];
                        }
                    }
                }
            }
        }
    }

    /// Weighted values straight from the codes (`direct_ok` must hold): for each query `i` of
    /// `out` (`[n_q, d]`, `n_q <= MAX_DIRECT_QUERIES`), `out_i += sum_j p[i * stride + j -
    /// rows.start] deq(x_j)` over the rows of `rows` (cut at `n`). Rows whose weights are all
    /// zero are skipped.
    #[inline(always)]
    pub(crate) fn weighted_direct<K: Kernel>(&self, rows: std::ops::Range<usize>, p: &[f32], stride: usize, out: &mut [f32]) {
        match out.len() / self.d {
            1 => self.weighted_n::<K, 1>(rows, p, stride, out),
            2 => self.weighted_n::<K, 2>(rows, p, stride, out),
            3 => self.weighted_n::<K, 3>(rows, p, stride, out),
            4 => self.weighted_n::<K, 4>(rows, p, stride, out),
            _ => self.weighted_n::<K, MAX_DIRECT_QUERIES>(rows, p, stride, out),
        }
    }

    /// `weighted_direct` with the queries padded with zero weights to `N`.
    #[inline(always)]
    fn weighted_n<K: Kernel, const N: usize>(&self, rows: std::ops::Range<usize>, p: &[f32], stride: usize, out: &mut [f32]) {
        let (d, bits, rb) = (self.d, self.bits, self.row_bytes);
        let n_q = out.len() / d;
        let (lo, hi, j0) = (rows.start, rows.end.min(self.n), rows.start);
        // The codes' weighted sums, per query in lane order.
        let mut acc = [0f32; MAX_DIRECT_QUERIES * MAX_HEAD_DIM];
        let mut sz = [0f32; 2 * MAX_HEAD_DIM];
        let mut pj = [0f32; N];
        let order = direct::LaneOrder::new(bits, d);
        match self.layout {
            Layout::Token { group } => {
                let n_g = d / group;
                // Per query, the row's weight times its steps and zero points (interleaved as
                // stored: the steps are the kernel's weights, 2 apart), and those products summed
                // over the rows (the zero points' part).
                let w2 = 2 * n_g;
                let mut w = [0f32; MAX_DIRECT_QUERIES * MAX_HEAD_DIM / 4];
                let mut zacc = [0f32; MAX_DIRECT_QUERIES * MAX_HEAD_DIM / 4];
                for j in lo..hi {
                    let mut any = false;
                    for i in 0..n_q {
                        pj[i] = p[i * stride + j - j0];
                        any |= pj[i] != 0.0;
                    }
                    if !any {
                        continue;
                    }
                    let codes = &self.codes[j * rb..(j + 1) * rb];
                    // SAFETY: the caller runs `K` where the CPU has its instructions.
                    unsafe { K::f16s(&self.scales[j * w2..(j + 1) * w2], &mut sz[..w2]) };
                    for (i, &x) in pj.iter().enumerate() {
                        for ((w, z), &s) in w[i * w2..(i + 1) * w2].iter_mut().zip(&mut zacc[i * w2..(i + 1) * w2]).zip(&sz[..w2]) {
                            *w = x * s;
                            *z += *w;
                        }
                    }
                    // SAFETY: as above.
                    unsafe { K::axpy::<N>(bits, codes, &w[..N * w2], 2, d, group, &mut acc[..N * d]) };
                }
                // Every code of a chunk is in the same group.
                let cc = direct::chunk_codes(bits);
                for (i, o) in out.chunks_exact_mut(d).enumerate() {
                    for (ch, (a, p)) in acc[i * d..(i + 1) * d].chunks_exact(cc).zip(order.perm[..d].chunks_exact(cc)).enumerate() {
                        let z = zacc[(i * n_g + ch * cc / group) * 2 + 1];
                        for (&a, &c) in a.iter().zip(p) {
                            o[c as usize] += a + z;
                        }
                    }
                }
            }
            Layout::Channel { .. } => {
                for (gi, grows) in self.row_groups(lo, hi) {
                    // SAFETY: as above.
                    unsafe { K::f16s(&self.scales[gi * d * 2..(gi + 1) * d * 2], &mut sz[..2 * d]) };
                    acc[..N * d].fill(0.0);
                    let mut psum = [0f32; N];
                    for j in grows {
                        let mut any = false;
                        for i in 0..n_q {
                            pj[i] = p[i * stride + j - j0];
                            psum[i] += pj[i];
                            any |= pj[i] != 0.0;
                        }
                        if any {
                            // SAFETY: as above.
                            unsafe { K::axpy::<N>(bits, &self.codes[j * rb..(j + 1) * rb], &pj, 1, d, d, &mut acc[..N * d]) };
                        }
                    }
                    for (i, o) in out.chunks_exact_mut(d).enumerate() {
                        for (&a, &c) in acc[i * d..(i + 1) * d].iter().zip(&order.perm) {
                            let c = c as usize;
                            o[c] += sz[2 * c] * a + sz[2 * c + 1] * psum[i];
                        }
                    }
                }
            }
        }
    }

    /// The (step, zero) of row `j`, channel `c`.
    pub(crate) fn scale_of(&self, j: usize, c: usize) -> (f32, f32) {
        let at = match self.layout {
            Layout::Token { group } => (j * (self.d / group) + c / group) * 2,
            Layout::Channel { .. } => {
                let mut start = 0usize;
                let mut gi = 0;
                for (i, &cnt) in self.group_rows.iter().enumerate() {
                    if j < start + cnt as usize {
                        gi = i;
                        break;
                    }
                    start += cnt as usize;
                }
                (gi * self.d + c) * 2
            }
        };
        (self.scales[at].to_f32(), self.scales[at + 1].to_f32())
    }

    /// Sets the code of row `j`, channel `c` (at most `2^bits - 1`).
    pub(crate) fn set_code(&mut self, j: usize, c: usize, code: u32) {
        set_code_at(&mut self.codes[j * self.row_bytes..(j + 1) * self.row_bytes], self.bits, c, code);
    }

    /// Row `j` dequantized into `dst` (`d` values).
    pub(crate) fn decode_row(&self, j: usize, dst: &mut [f32]) {
        let row = &self.codes[j * self.row_bytes..(j + 1) * self.row_bytes];
        for (c, v) in dst.iter_mut().enumerate().take(self.d) {
            let (s, z) = self.scale_of(j, c);
            *v = code_at(row, self.bits, c) as f32 * s + z;
        }
    }

    /// Drops rows `rows` (ascending, distinct, `< n`) and frees their storage.
    pub(crate) fn remove_rows(&mut self, rows: &[usize]) {
        if rows.is_empty() {
            return;
        }
        let rb = self.row_bytes;
        let mut keep = 0;
        let mut r = 0;
        let per_row_scales = match self.layout {
            Layout::Token { group } => (self.d / group) * 2,
            Layout::Channel { .. } => 0,
        };
        for j in 0..self.n {
            if r < rows.len() && rows[r] == j {
                r += 1;
                continue;
            }
            if keep != j {
                self.codes.copy_within(j * rb..(j + 1) * rb, keep * rb);
                if per_row_scales > 0 {
                    self.scales.copy_within(j * per_row_scales..(j + 1) * per_row_scales, keep * per_row_scales);
                }
            }
            keep += 1;
        }
        self.codes.truncate(keep * rb);
        if per_row_scales > 0 {
            self.scales.truncate(keep * per_row_scales);
        } else {
            let d2 = self.d * 2;
            let mut start = 0usize;
            let mut r = 0;
            let mut kept_groups = 0;
            for gi in 0..self.group_rows.len() {
                let cnt = self.group_rows[gi] as usize;
                let mut dropped = 0;
                while r < rows.len() && rows[r] < start + cnt {
                    dropped += 1;
                    r += 1;
                }
                start += cnt;
                let left = cnt - dropped;
                if left > 0 {
                    if kept_groups != gi {
                        self.scales.copy_within(gi * d2..(gi + 1) * d2, kept_groups * d2);
                    }
                    self.group_rows[kept_groups] = left as u32;
                    kept_groups += 1;
                }
            }
            self.group_rows.truncate(kept_groups);
            self.scales.truncate(kept_groups * d2);
            self.group_rows.shrink_to_fit();
        }
        self.codes.shrink_to_fit();
        self.scales.shrink_to_fit();
        self.n = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Slack on top of half a step for the f32 arithmetic of encoding and decoding.
    const ARITH_SLACK: f32 = 1e-5;

    fn check_half_step(bits: u32, layout: Layout, n: usize, d: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..n * d).map(|_| f16::from_f32(rng.normal() * 3.0).to_f32()).collect();
        let q = QuantMatrix::quantize(&x, n, d, bits, layout);
        let mut seen = 0;
        q.for_rows(n, |j, row| {
            let mut single = vec![0f32; d];
            q.decode_row(j, &mut single);
            for c in 0..d {
                let (s, _) = q.scale_of(j, c);
                let err = (row[c] - x[j * d + c]).abs();
                assert!(err <= s * 0.5 + ARITH_SLACK * (1.0 + x[j * d + c].abs()), "seed {seed} bits {bits} {layout:?} ({j},{c}): err {err} step {s}");
                assert_eq!(single[c], row[c], "seed {seed}");
            }
            seen += 1;
        });
        assert_eq!(seen, n);
    }

    #[test]
    fn error_within_half_a_step() {
        let seed = Rng::seed_from_time();
        for bits in [2, 3, 4, 8] {
            check_half_step(bits, Layout::Token { group: 16 }, 9, 32, seed);
            check_half_step(bits, Layout::Token { group: 32 }, 9, 32, seed ^ 1);
            check_half_step(bits, Layout::Channel { group: 4 }, 10, 32, seed ^ 2);
        }
    }

    /// `scores_direct` and `weighted_direct` by kernel `K` against the rows `for_rows_in`
    /// dequantizes, for every query count, over ranges of rows that cut row groups.
    fn check_direct<K: Kernel>(seed: u64) {
        let mut rng = Rng::new(seed);
        let (n, d) = (23, 64);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        for bits in [2, 4, 8] {
            let c = direct::chunk_codes(bits);
            for layout in [Layout::Token { group: d }, Layout::Token { group: c }, Layout::Channel { group: 5 }] {
                let q = QuantMatrix::quantize(&x, n, d, bits, layout);
                assert!(q.direct_ok());
                let mut deq = vec![0f32; n * d];
                q.for_rows(n, |j, row| deq[j * d..(j + 1) * d].copy_from_slice(row));
                for n_q in 1..=MAX_DIRECT_QUERIES {
                    let qs: Vec<f32> = (0..n_q * d).map(|_| rng.normal()).collect();
                    for (lo, hi) in [(0, n), (3, 17), (6, n + 4)] {
                        let m = hi - lo;
                        let what = format!("seed {seed} bits {bits} {layout:?} queries {n_q} rows {lo}..{hi}");
                        let mut sc = vec![f32::NAN; n_q * m];
                        q.scores_direct::<K, u16>(lo..hi, &qs, &mut sc, m, &RowTerms::none());
                        for i in 0..n_q {
                            for j in lo..hi.min(n) {
                                let terms = || (0..d).map(|c| qs[i * d + c] as f64 * deq[j * d + c] as f64);
                                let (want, mag) = (terms().sum::<f64>(), terms().map(f64::abs).sum::<f64>());
                                let got = sc[i * m + j - lo] as f64;
                                assert!((got - want).abs() <= 1e-5 * mag + 1e-9, "{what} query {i} row {j}: score {got} vs {want}");
                            }
                        }
                        let p: Vec<f32> = (0..n_q * m).map(|k| if k % 5 == 1 { 0.0 } else { rng.next_f32() }).collect();
                        let mut out = vec![0.25f32; n_q * d];
                        q.weighted_direct::<K>(lo..hi, &p, m, &mut out);
                        for i in 0..n_q {
                            for c in 0..d {
                                let terms = || (lo..hi.min(n)).map(|j| p[i * m + j - lo] as f64 * deq[j * d + c] as f64);
                                let (want, mag) = (0.25 + terms().sum::<f64>(), 0.25 + terms().map(f64::abs).sum::<f64>());
                                let got = out[i * d + c] as f64;
                                assert!((got - want).abs() <= 1e-5 * mag, "{what} query {i} channel {c}: value {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
        // What the kernels do not take.
        assert!(!QuantMatrix::quantize(&x, n, d, 3, Layout::Token { group: d }).direct_ok());
        assert!(!QuantMatrix::quantize(&x, n, d, 4, Layout::Token { group: 8 }).direct_ok());
    }

    #[test]
    fn direct_paths_match_the_dequantized_rows() {
        check_direct::<direct::Portable>(Rng::seed_from_time());
        #[cfg(target_arch = "x86_64")]
        if direct::avx2_fma_f16c() {
            // SAFETY: the CPU has the instructions (checked just above).
            unsafe { check_direct_avx2(Rng::seed_from_time()) };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn check_direct_avx2(seed: u64) {
        check_direct::<direct::Avx2>(seed)
    }

    #[test]
    fn constant_rows_are_exact() {
        let x = vec![1.5f32; 4 * 8];
        for layout in [Layout::Token { group: 8 }, Layout::Channel { group: 2 }] {
            let q = QuantMatrix::quantize(&x, 4, 8, 3, layout);
            q.for_rows(4, |_, row| assert!(row.iter().all(|&v| v == 1.5)));
        }
    }

    #[test]
    fn set_code_changes_that_code_alone() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let (n, d) = (5, 40);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        for bits in 1..=8 {
            let mut q = QuantMatrix::quantize(&x, n, d, bits, Layout::Token { group: 8 });
            let codes_of = |q: &QuantMatrix| -> Vec<u32> { (0..n * d).map(|e| code_at(&q.codes[e / d * q.row_bytes..(e / d + 1) * q.row_bytes], bits, e % d)).collect() };
            let mut want = codes_of(&q);
            for _ in 0..200 {
                let (j, c, code) = (rng.below(n as u64) as usize, rng.below(d as u64) as usize, rng.below(1 << bits) as u32);
                q.set_code(j, c, code);
                want[j * d + c] = code;
                assert_eq!(codes_of(&q), want, "seed {seed} bits {bits}: set ({j},{c}) to {code}");
            }
        }
    }

    #[test]
    fn removing_rows_keeps_survivors_bit_identical() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let (n, d) = (12, 16);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
        for layout in [Layout::Token { group: 8 }, Layout::Channel { group: 4 }] {
            let mut q = QuantMatrix::quantize(&x, n, d, 3, layout);
            let mut before = vec![];
            q.for_rows(n, |_, r| before.push(r.to_vec()));
            let drop = [0usize, 4, 5, 6, 7, 11];
            q.remove_rows(&drop);
            let survivors: Vec<usize> = (0..n).filter(|j| !drop.contains(j)).collect();
            assert_eq!(q.n_rows(), survivors.len());
            let mut after = vec![];
            q.for_rows(n, |_, r| after.push(r.to_vec()));
            for (k, &j) in survivors.iter().enumerate() {
                assert_eq!(after[k], before[j], "seed {seed} {layout:?}");
            }
            if let Layout::Channel { .. } = layout {
                assert_eq!(q.group_rows, vec![3, 3]);
                assert_eq!(q.scale_bytes(), 2 * d * 2 * 2);
            }
        }
    }
}
