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

use super::pack::{code_at, f16_down, f16_up, pack_row, row_bytes, unpack_row};
use super::MAX_HEAD_DIM;

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

    #[cfg(test)]
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
                let mut start = 0;
                for (gi, &cnt) in self.group_rows.iter().enumerate() {
                    let end = start + cnt as usize;
                    if start >= hi {
                        break;
                    }
                    if end > lo {
                        self.scales[gi * d * 2..(gi + 1) * d * 2].convert_to_f32_slice(&mut sz[..2 * d]);
                        for (c, p) in sz[..2 * d].chunks_exact(2).enumerate() {
                            s[c] = p[0];
                            z[c] = p[1];
                        }
                        for j in start.max(lo)..end.min(hi) {
                            unpack_row(&self.codes[j * self.row_bytes..(j + 1) * self.row_bytes], self.bits, row);
                            for ((v, &s), &z) in row.iter_mut().zip(&s[..d]).zip(&z[..d]) {
                                *v = *v * s + z;
                            }
                            f(j, row);
                        }
                    }
                    start = end;
                }
            }
        }
    }

    /// The (step, zero) of row `j`, channel `c`.
    fn scale_of(&self, j: usize, c: usize) -> (f32, f32) {
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

    #[test]
    fn constant_rows_are_exact() {
        let x = vec![1.5f32; 4 * 8];
        for layout in [Layout::Token { group: 8 }, Layout::Channel { group: 2 }] {
            let q = QuantMatrix::quantize(&x, 4, 8, 3, layout);
            q.for_rows(4, |_, row| assert!(row.iter().all(|&v| v == 1.5)));
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
