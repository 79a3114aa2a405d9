//! Accuracy and agreement with 95% intervals.

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A proportion `k / n` with its Wilson score 95% interval (sound near 0 and 1 and for small n,
/// where the normal approximation gives intervals outside [0, 1]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Proportion {
    pub k: usize,
    pub n: usize,
    pub value: f64,
    pub lo95: f64,
    pub hi95: f64,
}

impl Proportion {
    /// `None` when `n == 0` (no proportion to report).
    pub fn new(k: usize, n: usize) -> Option<Proportion> {
        if n == 0 || k > n {
            return None;
        }
        let (kf, nf) = (k as f64, n as f64);
        let p = kf / nf;
        let z2 = Z95 * Z95;
        let denom = 1.0 + z2 / nf;
        let centre = (p + z2 / (2.0 * nf)) / denom;
        let half = Z95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
        // At k = 0 and k = n the bound is exactly 0 or 1 (the formula gives it up to rounding).
        let lo95 = if k == 0 { 0.0 } else { (centre - half).max(0.0) };
        let hi95 = if k == n { 1.0 } else { (centre + half).min(1.0) };
        Some(Proportion { k, n, value: p, lo95, hi95 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_values() {
        // 81 of 263 (Wilson 1927 worked example, as in Newcombe 1998, table I): 0.2553 to 0.3662.
        let p = Proportion::new(81, 263).unwrap();
        assert!((p.lo95 - 0.2553).abs() < 5e-4 && (p.hi95 - 0.3662).abs() < 5e-4, "{p:?}");
        // 0 of 10: 0 to 0.2775.
        let p = Proportion::new(0, 10).unwrap();
        assert_eq!(p.lo95, 0.0);
        assert!((p.hi95 - 0.2775).abs() < 5e-4, "{p:?}");
        let p = Proportion::new(10, 10).unwrap();
        assert!((p.lo95 - 0.7225).abs() < 5e-4 && p.hi95 == 1.0, "{p:?}");
        assert!(Proportion::new(0, 0).is_none());
        assert!(Proportion::new(3, 2).is_none());
    }
}
