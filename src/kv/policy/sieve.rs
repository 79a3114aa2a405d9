//! SIEVE (Zhang et al., NSDI'24) applied to cached tokens.
//!
//! Exactly, per KV head, with `B` the budget resolved for the step (see the module conventions):
//! - The held tokens form SIEVE's FIFO queue in arrival order (index 0 the oldest); each has one
//!   visited bit. Sinks (a prefix) are outside the queue: never visited, never evicted.
//! - A step marks a held non-sink token visited when the mass it received in that step is greater
//!   than `threshold * total / n`, where `total` is the step's mass summed over all `n` tokens the
//!   head holds (sinks and new tokens included), i.e. above `threshold` times the uniform share.
//!   Computed in f64: `(m as f64) > threshold * total / n as f64`, `total` summed in order.
//! - New tokens enter unvisited at the newest end, then the mass of the step that inserted them
//!   counts like any other's: a new token that drew more than the threshold is visited at once.
//! - When `evictions()` finds `len > B`, it evicts `len - B` tokens, one at a time: the hand starts
//!   where it was left (at the oldest non-sink token initially, or after evicting the newest),
//!   and moves toward newer tokens, wrapping from the newest to the oldest non-sink, clearing the
//!   visited bits it passes, until it meets an unvisited token, which it evicts. The hand then
//!   rests on the slot of the evicted token, that is, on the next newer token (or wraps to the
//!   oldest if the newest was evicted). Tokens appended later do not move it.
//! - Heads evict independently.

use super::{check_mass, Arrivals, Budget, Policy};
use anyhow::{bail, Result};

/// Visited means above the uniform share.
pub(super) const DEFAULT_THRESHOLD: f64 = 1.0;

/// A packed bit per token, in arrival order.
#[derive(Clone, Debug, Default)]
struct Bits {
    words: Vec<u64>,
    len: usize,
}

impl Bits {
    fn get(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 == 1
    }

    fn set(&mut self, i: usize, v: bool) {
        let w = &mut self.words[i / 64];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Appends `n` cleared bits.
    fn grow(&mut self, n: usize) {
        self.len += n;
        self.words.resize(self.len.div_ceil(64), 0);
    }

    /// Keeps the bits whose `dead` flag is false, in order.
    fn compact(&mut self, dead: &[bool]) {
        let mut k = 0;
        for (i, &d) in dead.iter().enumerate().take(self.len) {
            if !d {
                let v = self.get(i);
                self.set(k, v);
                k += 1;
            }
        }
        self.len = k;
        self.words.truncate(k.div_ceil(64));
        if let Some(w) = self.words.last_mut() {
            if k % 64 != 0 {
                *w &= (1u64 << (k % 64)) - 1;
            }
        }
    }
}

/// One head's queue: visited bits and the hand (an index in arrival order).
#[derive(Clone, Debug, Default)]
struct Queue {
    visited: Bits,
    hand: usize,
}

/// SIEVE over per-head visited bits.
#[derive(Clone, Debug)]
pub struct Sieve {
    budget: Budget,
    threshold: f64,
    sinks: usize,
    budget_tokens: Option<usize>,
    heads: Vec<Queue>,
    arrivals: Arrivals,
}

impl Sieve {
    /// `threshold` scales the uniform share a token's mass must exceed to be visited (finite,
    /// >= 0).
    pub fn new(n_kv_heads: usize, budget: Budget, threshold: f64, sinks: usize) -> Result<Sieve> {
        if !threshold.is_finite() || threshold < 0.0 {
            bail!("sieve threshold must be finite and >= 0, got {threshold}");
        }
        budget.check_sinks(sinks)?;
        Ok(Sieve {
            budget,
            threshold,
            sinks,
            budget_tokens: None,
            heads: vec![Queue::default(); n_kv_heads],
            arrivals: Arrivals::new(sinks),
        })
    }

    /// Head `g`'s visited bits, in arrival order (empty for a head that does not exist).
    pub fn visited(&self, g: usize) -> Vec<bool> {
        self.heads.get(g).map_or(Vec::new(), |q| (0..q.visited.len).map(|i| q.visited.get(i)).collect())
    }

    /// Head `g`'s hand: the index the next eviction starts from.
    pub fn hand(&self, g: usize) -> usize {
        let lo = self.arrivals.n_sinks_held;
        self.heads.get(g).map_or(lo, |q| if q.hand < lo || q.hand >= q.visited.len { lo } else { q.hand })
    }
}

impl Policy for Sieve {
    fn describe(&self) -> String {
        format!("sieve(budget={},threshold={},sinks={})", self.budget, self.threshold, self.sinks)
    }

    fn wants_mass(&self) -> bool {
        true
    }

    fn observe(&mut self, n_new: usize, pos0: usize, mass: Option<&[Vec<f32>]>, prompt_len: usize) -> Result<()> {
        self.arrivals.check(n_new, pos0)?;
        let mass = check_mass(mass, self.heads.len(), |g| self.heads[g].visited.len, n_new)?;
        let budget_tokens = self.budget.resolve(prompt_len, self.sinks)?;
        self.arrivals.commit(n_new, pos0);
        self.budget_tokens = Some(budget_tokens);
        let lo = self.arrivals.n_sinks_held;
        for (q, m) in self.heads.iter_mut().zip(mass) {
            q.visited.grow(n_new);
            if m.is_empty() {
                continue;
            }
            let total: f64 = m.iter().map(|&x| x as f64).sum();
            let bar = self.threshold * total / m.len() as f64;
            for (j, &x) in m.iter().enumerate().skip(lo) {
                if x as f64 > bar {
                    q.visited.set(j, true);
                }
            }
        }
        Ok(())
    }

    fn evictions(&mut self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.heads.len()];
        let Some(budget_tokens) = self.budget_tokens else { return out };
        let lo = self.arrivals.n_sinks_held;
        for (q, o) in self.heads.iter_mut().zip(out.iter_mut()) {
            let n = q.visited.len;
            if n <= budget_tokens {
                continue;
            }
            // n > budget >= sinks + 1 >= lo + 1, and the candidates lo..n outnumber `need`
            // (n - lo > n - budget), so every sweep below finds a live unvisited token within two
            // rounds.
            let need = n - budget_tokens;
            let mut dead = vec![false; n];
            let mut h = if q.hand < lo || q.hand >= n { lo } else { q.hand };
            let advance = |h: usize| if h + 1 == n { lo } else { h + 1 };
            while o.len() < need {
                if dead[h] {
                    h = advance(h);
                } else if q.visited.get(h) {
                    q.visited.set(h, false);
                    h = advance(h);
                } else {
                    dead[h] = true;
                    o.push(h);
                    h = advance(h);
                }
            }
            let hand = h - dead[..h].iter().filter(|&&d| d).count();
            q.visited.compact(&dead);
            q.hand = if hand >= q.visited.len { lo } else { hand };
            o.sort_unstable();
        }
        out
    }

    fn len(&self, g: usize) -> usize {
        self.heads.get(g).map_or(0, |q| q.visited.len)
    }

    /// One visited bit per held token, packed in 64-bit words per head.
    fn bytes(&self) -> usize {
        self.heads.iter().map(|q| q.visited.words.len() * std::mem::size_of::<u64>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_clears_visited_and_evicts_first_unvisited() {
        let mut p = Sieve::new(1, Budget::Tokens(3), 1.0, 0).unwrap();
        p.observe(4, 0, Some(&[vec![2.0, 0.0, 2.0, 0.0]]), 4).unwrap();
        assert_eq!(p.visited(0), vec![true, false, true, false]);
        assert_eq!(p.evictions(), vec![vec![1]]);
        assert_eq!(p.visited(0), vec![false, true, false]);
        assert_eq!(p.hand(0), 1);
        p.observe(1, 4, Some(&[vec![0.0, 0.0, 0.0, 1.0]]), 4).unwrap();
        assert_eq!(p.evictions(), vec![vec![2]]);
        assert_eq!(p.hand(0), 2);
        assert_eq!(p.bytes(), 8);
    }

    #[test]
    fn bits_compact_keeps_order() {
        let mut b = Bits::default();
        b.grow(130);
        for i in (0..130).step_by(3) {
            b.set(i, true);
        }
        let dead: Vec<bool> = (0..130).map(|i| i % 2 == 1).collect();
        b.compact(&dead);
        assert_eq!(b.len, 65);
        for k in 0..65 {
            assert_eq!(b.get(k), (2 * k) % 3 == 0, "{k}");
        }
        assert_eq!(b.words.len(), 2);
        assert_eq!(b.words[1] >> 1, 0);
    }
}
