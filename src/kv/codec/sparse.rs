//! GEAR's sparse term: the entries of largest magnitude of a block's `[n, d]` matrix, kept as
//! (flat index `j * d + c`, f16 correction) pairs sorted by index. `extract` takes the values
//! (exact: the cache's values are f16); `into_corrections` then turns each into what must be
//! added to the rest of the decomposition at its place to give it back (value minus the backbone
//! and the low-rank term there, rounded to f16), so that attention adds a stored number instead
//! of recomputing the backbone's and the low-rank term's entry per outlier.
//!
//! Indices are u16 when the block has at most 65,536 entries and u32 otherwise. Dropping a row
//! drops its pairs and renumbers the later ones.

use half::f16;

/// Splits a flat index `j * d + c` into row `j` and channel `c`.
#[derive(Clone, Copy)]
pub(crate) struct RowSplit {
    d: usize,
    /// `log2 d` where `d` is a power of two (as head sizes are in practice): a shift, not a
    /// division, per index.
    shift: Option<u32>,
}

impl RowSplit {
    pub(crate) fn new(d: usize) -> RowSplit {
        RowSplit { d, shift: d.is_power_of_two().then(|| d.trailing_zeros()) }
    }

    #[inline(always)]
    pub(crate) fn split(self, p: usize) -> (usize, usize) {
        match self.shift {
            Some(sh) => (p >> sh, p & (self.d - 1)),
            None => (p / self.d, p % self.d),
        }
    }
}

/// An `Outliers`' flat indices as stored.
pub(crate) enum Positions<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Outliers {
    idx16: Vec<u16>,
    idx32: Vec<u32>,
    val: Vec<f16>,
}

/// Outliers kept for a block of `n_entries` entries at fraction `frac`: `floor(frac * n_entries)`.
pub(crate) fn outlier_count(frac: f64, n_entries: usize) -> usize {
    ((frac * n_entries as f64).floor() as usize).min(n_entries)
}

/// Bytes of one stored index for a block of `n_entries` entries.
pub(crate) fn index_bytes(n_entries: usize) -> usize {
    if n_entries <= 1 << 16 {
        2
    } else {
        4
    }
}

/// An outlier's code and f16 correction. Its place's code is free (the backbone quantized a zero
/// there and the low-rank fit skips it), so of the backbone's codes `0..=levels` this takes the
/// one for which `dense + correction` comes closest to the outlier's value `v`, `dense` being
/// `code * s + z` (step `s`, zero `z`), plus the low-rank entry `l` where there is one, and the
/// correction `f16(v - dense)`; ties go to the lower code. The f16 rounding of the correction
/// (up to half an ulp of about `v`) is then mostly cancelled: with 16 codes to choose from, the
/// decoded outlier is typically within a sixteenth of that. Every operation is a separately
/// rounded f32 one, in the order decoding runs them (`deq`, `+ l`, `+ correction`).
pub(crate) fn best_code(v: f32, s: f32, z: f32, l: Option<f32>, levels: u32) -> (u32, f16) {
    let try_code = |code: u32| {
        let mut dense = code as f32 * s + z;
        if let Some(l) = l {
            dense += l;
        }
        let corr = f16::from_f32(v - dense);
        (corr, (dense + corr.to_f32() - v).abs())
    };
    let (mut best, (mut corr, mut err)) = (0, try_code(0));
    for code in 1..=levels {
        let (c, e) = try_code(code);
        if e < err {
            (best, corr, err) = (code, c, e);
        }
    }
    (best, corr)
}

impl Outliers {
    /// Extracts the `k` entries of `x` of largest `|x|` (ties: lower index first), returns them
    /// and zeroes them in `x`. Also returns their flat indices, ascending.
    pub(crate) fn extract(x: &mut [f32], k: usize) -> (Outliers, Vec<u32>) {
        if k == 0 {
            return (Outliers::default(), Vec::new());
        }
        let mut order: Vec<u32> = (0..x.len() as u32).collect();
        let key = |i: &u32| (x[*i as usize].abs(), *i);
        order.select_nth_unstable_by(k - 1, |a, b| {
            let (ma, ia) = key(a);
            let (mb, ib) = key(b);
            mb.total_cmp(&ma).then(ia.cmp(&ib))
        });
        order.truncate(k);
        order.sort_unstable();
        let val: Vec<f16> = order.iter().map(|&i| f16::from_f32(x[i as usize])).collect();
        for &i in &order {
            x[i as usize] = 0.0;
        }
        let out = if index_bytes(x.len()) == 2 {
            Outliers { idx16: order.iter().map(|&i| i as u16).collect(), idx32: Vec::new(), val }
        } else {
            Outliers { idx16: Vec::new(), idx32: order.clone(), val }
        };
        (out, order)
    }

    pub(crate) fn len(&self) -> usize {
        self.val.len()
    }

    #[inline]
    pub(crate) fn pos(&self, i: usize) -> usize {
        if self.idx32.is_empty() {
            self.idx16[i] as usize
        } else {
            self.idx32[i] as usize
        }
    }

    /// Pair `i`'s stored number: its value after `extract`, its correction after
    /// `into_corrections`.
    #[inline]
    pub(crate) fn value(&self, i: usize) -> f32 {
        self.val[i].to_f32()
    }

    /// Replaces each stored value `x` at flat index `p` by `correct(p, x)`, called in ascending
    /// index order.
    pub(crate) fn into_corrections(&mut self, mut correct: impl FnMut(usize, f32) -> f16) {
        for i in 0..self.val.len() {
            let p = self.pos(i);
            self.val[i] = correct(p, self.val[i].to_f32());
        }
    }


    /// The stored indices, in their width.
    #[inline]
    pub(crate) fn positions(&self) -> Positions<'_> {
        if self.idx32.is_empty() {
            Positions::U16(&self.idx16)
        } else {
            Positions::U32(&self.idx32)
        }
    }

    /// The stored numbers (see `value`).
    #[inline]
    pub(crate) fn values(&self) -> &[f16] {
        &self.val
    }

    pub(crate) fn bytes(&self) -> usize {
        self.idx16.len() * 2 + self.idx32.len() * 4 + self.val.len() * 2
    }

    /// Drops the pairs of rows `rows` (ascending) of a block of row length `d` and renumbers the
    /// rest to the compacted rows.
    pub(crate) fn remove_rows(&mut self, rows: &[usize], d: usize) {
        if rows.is_empty() || self.val.is_empty() {
            return;
        }
        let mut keep = 0;
        let mut r = 0;
        for i in 0..self.val.len() {
            let p = self.pos(i);
            let j = p / d;
            while r < rows.len() && rows[r] < j {
                r += 1;
            }
            if r < rows.len() && rows[r] == j {
                continue;
            }
            let np = p - r * d;
            if self.idx32.is_empty() {
                self.idx16[keep] = np as u16;
            } else {
                self.idx32[keep] = np as u32;
            }
            self.val[keep] = self.val[i];
            keep += 1;
        }
        self.val.truncate(keep);
        self.val.shrink_to_fit();
        if self.idx32.is_empty() {
            self.idx16.truncate(keep);
            self.idx16.shrink_to_fit();
        } else {
            self.idx32.truncate(keep);
            self.idx32.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn extracts_the_largest_magnitudes_of_both_signs() {
        let mut x = vec![0.1f32, -5.0, 0.2, 3.0, -0.3, 4.0, 0.0, -4.0];
        let (o, pos) = Outliers::extract(&mut x, 3);
        assert_eq!(pos, vec![1, 5, 7]);
        assert_eq!((0..3).map(|i| o.value(i)).collect::<Vec<_>>(), vec![-5.0, 4.0, -4.0]);
        assert_eq!(x, vec![0.1, 0.0, 0.2, 3.0, -0.3, 0.0, 0.0, 0.0]);
        assert_eq!(o.bytes(), 3 * 4);
    }

    #[test]
    fn removing_rows_renumbers() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let (n, d) = (10, 8);
        let orig: Vec<f32> = (0..n * d).map(|_| f16::from_f32(rng.normal()).to_f32()).collect();
        let mut x = orig.clone();
        let (mut o, _) = Outliers::extract(&mut x, 12);
        let drop = [1usize, 2, 7];
        o.remove_rows(&drop, d);
        let survivors: Vec<usize> = (0..n).filter(|j| !drop.contains(j)).collect();
        for i in 0..o.len() {
            let p = o.pos(i);
            let (j, c) = (survivors[p / d], p % d);
            assert_eq!(o.value(i), orig[j * d + c], "seed {seed}");
        }
    }
}
