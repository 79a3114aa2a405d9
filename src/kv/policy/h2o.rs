//! The Heavy-Hitter Oracle (H2O, arXiv 2306.14048): keep the most recent tokens and the tokens
//! that have received the most attention so far.
//!
//! Exactly, per KV head `g` and with `B` the budget resolved for the step (see the module
//! conventions), `S_held` the sinks held and `R = min(floor(recent * B), B - sinks)`:
//! - Each held token's score is the sum, over every step since it arrived (the step that
//!   inserted it included), of the mass it received in that step, accumulated in f32 in step
//!   order. With GQA the caller has already summed the mass over the query heads of the group.
//! - When `evictions()` finds `n = len(g) > B`, it evicts `n - B` tokens at once: among the
//!   candidates (indices `S_held .. n - R`, i.e. neither a sink nor one of the `R` newest), those
//!   with the lowest score, ties going to the older token. After a prefill step this applies the
//!   budget to the whole prompt in one go (keeping the top-score candidates and the recent ones);
//!   during decode, one token arrives per step, so one is evicted per step.
//! - Heads evict independently: their lists, and so their indices, differ.

use super::{check_mass, remove_sorted, Arrivals, Budget, Policy};
use anyhow::{bail, Result};
use std::cmp::Ordering;

/// The paper's split: half the budget for recent tokens, half for heavy hitters.
pub(super) const DEFAULT_RECENT: f64 = 0.5;

/// `R = min(floor(recent * B), B - sinks)`: the newest tokens H2O always keeps under a budget
/// of `B = budget_tokens`.
pub fn recent_tokens(recent: f64, sinks: usize, budget_tokens: usize) -> usize {
    ((recent * budget_tokens as f64).floor() as usize).min(budget_tokens.saturating_sub(sinks))
}

/// H2O over per-head accumulated attention scores.
#[derive(Clone, Debug)]
pub struct H2O {
    budget: Budget,
    recent: f64,
    sinks: usize,
    budget_tokens: Option<usize>,
    /// Per head, one accumulated score per held token, in arrival order.
    scores: Vec<Vec<f32>>,
    arrivals: Arrivals,
}

impl H2O {
    /// `recent` is the fraction of the budget kept for the most recent tokens, in [0, 1].
    pub fn new(n_kv_heads: usize, budget: Budget, recent: f64, sinks: usize) -> Result<H2O> {
        if !(0.0..=1.0).contains(&recent) {
            bail!("h2o recent must be a fraction of the budget in [0, 1], got {recent}");
        }
        budget.check_sinks(sinks)?;
        Ok(H2O {
            budget,
            recent,
            sinks,
            budget_tokens: None,
            scores: vec![Vec::new(); n_kv_heads],
            arrivals: Arrivals::new(sinks),
        })
    }

    /// The number of most recent tokens always kept under a budget of `budget_tokens`.
    pub fn recent_tokens(&self, budget_tokens: usize) -> usize {
        recent_tokens(self.recent, self.sinks, budget_tokens)
    }

    /// Head `g`'s accumulated scores, in arrival order (empty for a head that does not exist).
    pub fn scores(&self, g: usize) -> &[f32] {
        self.scores.get(g).map_or(&[], |s| s.as_slice())
    }
}

/// Orders candidates by score, then index (the older token first).
fn by_score(scores: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b))
}

impl Policy for H2O {
    fn describe(&self) -> String {
        format!("h2o(budget={},recent={},sinks={})", self.budget, self.recent, self.sinks)
    }

    fn wants_mass(&self) -> bool {
        true
    }

    fn observe(&mut self, n_new: usize, pos0: usize, mass: Option<&[Vec<f32>]>, prompt_len: usize) -> Result<()> {
        self.arrivals.check(n_new, pos0)?;
        let mass = check_mass(mass, self.scores.len(), |g| self.scores[g].len(), n_new)?;
        let budget_tokens = self.budget.resolve(prompt_len, self.sinks)?;
        self.arrivals.commit(n_new, pos0);
        self.budget_tokens = Some(budget_tokens);
        for (s, m) in self.scores.iter_mut().zip(mass) {
            s.resize(s.len() + n_new, 0.0);
            for (x, &y) in s.iter_mut().zip(m) {
                *x += y;
            }
        }
        Ok(())
    }

    fn evictions(&mut self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.scores.len()];
        let Some(budget_tokens) = self.budget_tokens else { return out };
        let recent = self.recent_tokens(budget_tokens);
        let lo = self.arrivals.n_sinks_held;
        for (s, o) in self.scores.iter_mut().zip(out.iter_mut()) {
            let n = s.len();
            if n <= budget_tokens {
                continue;
            }
            let need = n - budget_tokens;
            let hi = n - recent;
            if need == 1 {
                if let Some(j) = (lo..hi).min_by(by_score(s)) {
                    o.push(j);
                }
            } else {
                let mut cand: Vec<usize> = (lo..hi).collect();
                if need < cand.len() {
                    cand.select_nth_unstable_by(need, by_score(s));
                    cand.truncate(need);
                }
                cand.sort_unstable();
                *o = cand;
            }
            remove_sorted(s, o);
        }
        out
    }

    fn len(&self, g: usize) -> usize {
        self.scores.get(g).map_or(0, |s| s.len())
    }

    /// One f32 score per held token, per head.
    fn bytes(&self) -> usize {
        self.scores.iter().map(|s| s.len() * std::mem::size_of::<f32>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_lowest_non_recent_older_first_on_ties() {
        let mut p = H2O::new(1, Budget::Tokens(4), 0.5, 0).unwrap();
        p.observe(6, 0, Some(&[vec![3.0, 1.0, 5.0, 1.0, 0.0, 0.0]]), 6).unwrap();
        assert_eq!(p.evictions(), vec![vec![1, 3]]);
        assert_eq!(p.scores(0), &[3.0, 5.0, 0.0, 0.0]);
        p.observe(1, 6, Some(&[vec![0.0, 0.0, 0.0, 0.5, 0.0]]), 6).unwrap();
        assert_eq!(p.evictions(), vec![vec![2]]);
        assert_eq!(p.bytes(), 16);
    }

    #[test]
    fn sinks_survive_and_bad_params_fail() {
        let mut p = H2O::new(1, Budget::Tokens(3), 0.0, 1).unwrap();
        p.observe(4, 0, Some(&[vec![0.0, 1.0, 2.0, 3.0]]), 4).unwrap();
        assert_eq!(p.evictions(), vec![vec![1]]);
        assert!(H2O::new(1, Budget::Tokens(3), 1.5, 0).is_err());
        assert!(H2O::new(1, Budget::Tokens(3), 0.5, 3).is_err());
        assert!(p.observe(1, 4, None, 4).is_err());
        assert!(p.observe(1, 4, Some(&[vec![0.0; 3]]), 4).is_err());
        assert!(p.observe(1, 4, Some(&[vec![0.0, 0.0, f32::NAN, 0.0]]), 4).is_err());
        assert_eq!(p.len(0), 3);
    }
}
