//! GEAR's low-rank term: a rank-`r` approximation `A Bᵀ` of a block's quantization residual,
//! found by power (subspace) iteration, and its f16 storage.
//!
//! Power iteration on the residual `R` (`[n, d]`): start from `B0` (`[d, r]`, standard normal
//! entries from the seeded generator), then `iters` times: `A = orth(R B)`, `B = Rᵀ A`. `A` has
//! orthonormal columns, so `A Bᵀ = A Aᵀ R` is the projection of `R` onto a rank-`r` subspace and
//! `|R - A Bᵀ|_F <= |R|_F`: the term never increases the error before its factors are rounded to
//! f16. After rounding, `fit` checks the error again and stores zero factors in the rare case
//! (a residual with no structure at all) where rounding made it worse.
//!
//! Storage: `a` `[n, r]` (one row per token, dropped with the token), `b` `[d, r]`, both f16.

use half::f16;

use crate::rng::Rng;

use super::MAX_RANK;

#[derive(Clone, Debug, Default)]
pub(crate) struct LowRank {
    pub(crate) rank: usize,
    pub(crate) a: Vec<f16>,
    pub(crate) b: Vec<f16>,
}

/// Orthonormalizes the `r` columns of `a` (`[n, r]` row-major) by modified Gram-Schmidt, run
/// twice for stability; a column that is (numerically) in the span of the previous ones is zeroed.
fn orthonormalize(a: &mut [f32], n: usize, r: usize) {
    for k in 0..r {
        let norm0 = (0..n).map(|j| (a[j * r + k] as f64).powi(2)).sum::<f64>().sqrt();
        for _ in 0..2 {
            for i in 0..k {
                let proj: f64 = (0..n).map(|j| a[j * r + k] as f64 * a[j * r + i] as f64).sum();
                for j in 0..n {
                    a[j * r + k] -= (proj * a[j * r + i] as f64) as f32;
                }
            }
        }
        let norm = (0..n).map(|j| (a[j * r + k] as f64).powi(2)).sum::<f64>().sqrt();
        let scale = if norm > 1e-6 * norm0 && norm > 1e-30 { (1.0 / norm) as f32 } else { 0.0 };
        for j in 0..n {
            a[j * r + k] *= scale;
        }
    }
}

/// Rank-`rank` factors `(A [n, rank], B [d, rank])` of `x` (`[n, d]`) with `x ≈ A Bᵀ`.
pub(crate) fn power_iteration(x: &[f32], n: usize, d: usize, rank: usize, iters: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let r = rank;
    let mut b: Vec<f32> = (0..d * r).map(|_| rng.normal()).collect();
    let mut a = vec![0f32; n * r];
    for _ in 0..iters.max(1) {
        for j in 0..n {
            let row = &x[j * d..(j + 1) * d];
            let mut acc = [0f32; MAX_RANK];
            for (c, &v) in row.iter().enumerate() {
                for k in 0..r {
                    acc[k] += v * b[c * r + k];
                }
            }
            a[j * r..(j + 1) * r].copy_from_slice(&acc[..r]);
        }
        orthonormalize(&mut a, n, r);
        b.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..n {
            let row = &x[j * d..(j + 1) * d];
            let aj = &a[j * r..(j + 1) * r];
            for (c, &v) in row.iter().enumerate() {
                for k in 0..r {
                    b[c * r + k] += v * aj[k];
                }
            }
        }
    }
    (a, b)
}

/// Sum of squared entries of `x - A Bᵀ` (`a`, `b` f32 views of the factors), skipping the
/// positions in `skip` (ascending flat indices).
fn masked_error(x: &[f32], d: usize, r: usize, a: &[f32], b: &[f32], skip: &[u32]) -> f64 {
    let mut err = 0f64;
    let mut s = 0;
    for (p, &v) in x.iter().enumerate() {
        if s < skip.len() && skip[s] as usize == p {
            s += 1;
            continue;
        }
        let (j, c) = (p / d, p % d);
        let l: f32 = (0..r).map(|k| a[j * r + k] * b[c * r + k]).sum();
        err += ((v - l) as f64).powi(2);
    }
    err
}

impl LowRank {
    /// Fits rank-`rank` f16 factors to `x` (`[n, d]`); the error is measured off the `skip`
    /// positions (outliers, which the sparse term corrects).
    pub(crate) fn fit(x: &[f32], n: usize, d: usize, rank: usize, iters: usize, rng: &mut Rng, skip: &[u32]) -> LowRank {
        if rank == 0 {
            return LowRank::default();
        }
        let (a, b) = power_iteration(x, n, d, rank, iters, rng);
        let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
        let af: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
        let bf: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
        let without = masked_error(x, d, 0, &[], &[], skip);
        let with = masked_error(x, d, rank, &af, &bf, skip);
        if with <= without {
            LowRank { rank, a: a16, b: b16 }
        } else {
            LowRank { rank, a: vec![f16::ZERO; n * rank], b: vec![f16::ZERO; d * rank] }
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        (self.a.len() + self.b.len()) * 2
    }

    /// `out[k] = (Bᵀ q)_k`.
    #[inline]
    pub(crate) fn bt_times(&self, q: &[f32], out: &mut [f32; MAX_RANK]) {
        let r = self.rank;
        out[..r].iter_mut().for_each(|v| *v = 0.0);
        for (row, &qc) in self.b.chunks_exact(r.max(1)).zip(q) {
            for k in 0..r {
                out[k] += row[k].to_f32() * qc;
            }
        }
    }

    /// Row `j` of `A` into `out` (`rank` values).
    #[inline]
    pub(crate) fn a_row(&self, j: usize, out: &mut [f32]) {
        let r = self.rank;
        for (o, a) in out.iter_mut().zip(&self.a[j * r..(j + 1) * r]) {
            *o = a.to_f32();
        }
    }

    /// Entry `(j, c)` of `A Bᵀ`.
    #[inline]
    pub(crate) fn entry(&self, j: usize, c: usize) -> f32 {
        let r = self.rank;
        self.a[j * r..(j + 1) * r].iter().zip(&self.b[c * r..(c + 1) * r]).map(|(a, b)| a.to_f32() * b.to_f32()).sum()
    }

    /// `out[c] += (B acc)_c`.
    #[inline]
    pub(crate) fn add_b_times(&self, acc: &[f32], out: &mut [f32]) {
        let r = self.rank;
        if r == 0 {
            return;
        }
        for (o, row) in out.iter_mut().zip(self.b.chunks_exact(r)) {
            *o += row.iter().zip(acc).map(|(b, &s)| b.to_f32() * s).sum::<f32>();
        }
    }

    /// Drops the rows `rows` (ascending) of `A`.
    pub(crate) fn remove_rows(&mut self, rows: &[usize]) {
        let r = self.rank;
        if r == 0 || rows.is_empty() {
            return;
        }
        let n = self.a.len() / r;
        let mut keep = 0;
        let mut i = 0;
        for j in 0..n {
            if i < rows.len() && rows[i] == j {
                i += 1;
                continue;
            }
            self.a.copy_within(j * r..(j + 1) * r, keep * r);
            keep += 1;
        }
        self.a.truncate(keep * r);
        self.a.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eigen-decomposition of a symmetric `[m, m]` matrix by cyclic Jacobi rotations, in f64, to
    /// convergence: the eigenvalues.
    fn jacobi_eigenvalues(mut s: Vec<f64>, m: usize) -> Vec<f64> {
        for _ in 0..100 {
            let off: f64 = (0..m).flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| s[i * m + j].powi(2)).sum();
            if off < 1e-24 {
                break;
            }
            for p in 0..m {
                for q in p + 1..m {
                    if s[p * m + q].abs() < 1e-300 {
                        continue;
                    }
                    let theta = (s[q * m + q] - s[p * m + p]) / (2.0 * s[p * m + q]);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let sn = t * c;
                    for k in 0..m {
                        let (skp, skq) = (s[k * m + p], s[k * m + q]);
                        s[k * m + p] = c * skp - sn * skq;
                        s[k * m + q] = sn * skp + c * skq;
                    }
                    for k in 0..m {
                        let (spk, sqk) = (s[p * m + k], s[q * m + k]);
                        s[p * m + k] = c * spk - sn * sqk;
                        s[q * m + k] = sn * spk + c * sqk;
                    }
                }
            }
        }
        let mut ev: Vec<f64> = (0..m).map(|i| s[i * m + i]).collect();
        ev.sort_by(|a, b| b.total_cmp(a));
        ev
    }

    /// `|X - X_r|_F` of the best rank-`r` approximation (Eckart–Young: the tail of the spectrum
    /// of `XᵀX`), in f64.
    fn svd_truncation_error(x: &[f32], n: usize, d: usize, r: usize) -> f64 {
        let mut g = vec![0f64; d * d];
        for j in 0..n {
            for a in 0..d {
                for b in 0..d {
                    g[a * d + b] += x[j * d + a] as f64 * x[j * d + b] as f64;
                }
            }
        }
        jacobi_eigenvalues(g, d)[r..].iter().map(|&e| e.max(0.0)).sum::<f64>().sqrt()
    }

    /// A random `[n, d]` matrix with singular values `sv` (and orthonormal factors from QR of
    /// normal matrices).
    fn with_spectrum(n: usize, d: usize, sv: &[f32], rng: &mut Rng) -> Vec<f32> {
        let m = sv.len();
        let mut u: Vec<f32> = (0..n * m).map(|_| rng.normal()).collect();
        let mut v: Vec<f32> = (0..d * m).map(|_| rng.normal()).collect();
        orthonormalize(&mut u, n, m);
        orthonormalize(&mut v, d, m);
        let mut x = vec![0f32; n * d];
        for j in 0..n {
            for c in 0..d {
                x[j * d + c] = (0..m).map(|k| u[j * m + k] * sv[k] * v[c * m + k]).sum();
            }
        }
        x
    }

    fn frob_err(x: &[f32], d: usize, lr: &LowRank) -> f64 {
        let n = x.len() / d;
        (0..n).flat_map(|j| (0..d).map(move |c| (j, c))).map(|(j, c)| ((x[j * d + c] - lr.entry(j, c)) as f64).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn power_iteration_is_within_5_percent_of_the_truncated_svd() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        for (n, d, r) in [(64usize, 32usize, 4usize), (40, 64, 2), (128, 64, 4)] {
            let mut sv: Vec<f32> = (0..r).map(|k| 10.0 - k as f32).collect();
            sv.extend((0..d.min(n) - r).map(|k| 1.0 / (1.0 + k as f32)));
            let x = with_spectrum(n, d, &sv, &mut rng);
            let lr = LowRank::fit(&x, n, d, r, 3, &mut Rng::new(seed ^ 7), &[]);
            let best = svd_truncation_error(&x, n, d, r);
            let got = frob_err(&x, d, &lr);
            assert!(got <= best * 1.05, "seed {seed} ({n},{d},{r}): power iteration {got}, svd {best}");
        }
    }

    #[test]
    fn low_rank_term_never_increases_the_error() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        for trial in 0..20 {
            let (n, d) = (1 + rng.below(80) as usize, 8 * (1 + rng.below(8) as usize));
            let r = 1 + rng.below(d.min(n).min(6) as u64) as usize;
            let x: Vec<f32> = (0..n * d).map(|_| rng.normal() * if trial % 2 == 0 { 1.0 } else { 1e-4 }).collect();
            let lr = LowRank::fit(&x, n, d, r, 1 + trial % 3, &mut rng, &[]);
            let plain: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(frob_err(&x, d, &lr) <= plain, "seed {seed} trial {trial}");
        }
        let zero = vec![0f32; 16 * 8];
        let lr = LowRank::fit(&zero, 16, 8, 3, 3, &mut rng, &[]);
        assert!(lr.a.iter().chain(&lr.b).all(|v| v.to_f32() == 0.0));
    }
}
