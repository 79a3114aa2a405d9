//! StreamingLLM's window with attention sinks (arXiv 2309.17453): the first `sinks` tokens by
//! position and the most recent ones survive.

use super::{Arrivals, Budget, Policy};
use anyhow::Result;

/// StreamingLLM uses four sink tokens.
pub(super) const DEFAULT_SINKS: usize = 4;

/// Keeps the tokens at positions `< sinks` and the `budget - sinks` most recent tokens; every
/// head evicts the same tokens. Needs no attention mass and holds no per-token state.
#[derive(Clone, Debug)]
pub struct Window {
    n_heads: usize,
    budget: Budget,
    sinks: usize,
    budget_tokens: Option<usize>,
    n_tokens: usize,
    arrivals: Arrivals,
}

impl Window {
    /// A window of `budget` tokens in all, `sinks` of them the first positions.
    pub fn new(n_kv_heads: usize, budget: Budget, sinks: usize) -> Result<Window> {
        budget.check_sinks(sinks)?;
        Ok(Window { n_heads: n_kv_heads, budget, sinks, budget_tokens: None, n_tokens: 0, arrivals: Arrivals::new(sinks) })
    }

    /// `sinks` first tokens and `recent` most recent ones (`recent >= 1`).
    pub fn with_recent(n_kv_heads: usize, sinks: usize, recent: usize) -> Result<Window> {
        if recent == 0 {
            anyhow::bail!("a window needs at least one recent token");
        }
        Window::new(n_kv_heads, Budget::Tokens(sinks.saturating_add(recent)), sinks)
    }
}

impl Policy for Window {
    fn describe(&self) -> String {
        format!("window(budget={},sinks={})", self.budget, self.sinks)
    }

    fn wants_mass(&self) -> bool {
        false
    }

    /// Counts the new tokens; a mass, if given, is ignored.
    fn observe(&mut self, n_new: usize, pos0: usize, _mass: Option<&[Vec<f32>]>, prompt_len: usize) -> Result<()> {
        self.arrivals.check(n_new, pos0)?;
        let budget_tokens = self.budget.resolve(prompt_len, self.sinks)?;
        self.arrivals.commit(n_new, pos0);
        self.n_tokens += n_new;
        self.budget_tokens = Some(budget_tokens);
        Ok(())
    }

    /// Evicts, on every head, the tokens between the sinks held and the `budget - sinks` most
    /// recent.
    fn evictions(&mut self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.n_heads];
        let Some(budget_tokens) = self.budget_tokens else { return out };
        let recent = budget_tokens - self.sinks;
        let lo = self.arrivals.n_sinks_held;
        let hi = self.n_tokens.saturating_sub(recent);
        if hi > lo {
            let idx: Vec<usize> = (lo..hi).collect();
            for o in out.iter_mut() {
                o.clone_from(&idx);
            }
            self.n_tokens -= hi - lo;
        }
        out
    }

    fn len(&self, g: usize) -> usize {
        if g < self.n_heads {
            self.n_tokens
        } else {
            0
        }
    }

    /// No per-token state.
    fn bytes(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sinks_and_recent() {
        let mut p = Window::with_recent(2, 2, 3).unwrap();
        p.observe(8, 0, None, 8).unwrap();
        assert_eq!(p.evictions(), vec![vec![2, 3, 4], vec![2, 3, 4]]);
        assert_eq!(p.len(0), 5);
        p.observe(1, 8, None, 8).unwrap();
        assert_eq!(p.evictions()[1], vec![2]);
        assert!(p.evictions()[0].is_empty());
        assert!(Window::with_recent(1, 2, 0).is_err());
        assert!(Window::new(1, Budget::Tokens(4), 4).is_err());
    }
}
