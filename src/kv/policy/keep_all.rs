//! The full cache: no token is ever evicted.

use super::{Arrivals, Policy};
use anyhow::Result;

/// Never evicts; needs no attention mass and holds no per-token state.
#[derive(Clone, Debug)]
pub struct KeepAll {
    n_heads: usize,
    n_tokens: usize,
    arrivals: Arrivals,
}

impl KeepAll {
    pub fn new(n_kv_heads: usize) -> KeepAll {
        KeepAll { n_heads: n_kv_heads, n_tokens: 0, arrivals: Arrivals::new(0) }
    }
}

impl Policy for KeepAll {
    fn describe(&self) -> String {
        "keep_all".to_string()
    }

    fn wants_mass(&self) -> bool {
        false
    }

    /// Counts the new tokens; a mass, if given, is ignored.
    fn observe(&mut self, n_new: usize, pos0: usize, _mass: Option<&[Vec<f32>]>, _prompt_len: usize) -> Result<()> {
        self.arrivals.check(n_new, pos0)?;
        self.arrivals.commit(n_new, pos0);
        self.n_tokens += n_new;
        Ok(())
    }

    fn evictions(&mut self) -> Vec<Vec<usize>> {
        vec![Vec::new(); self.n_heads]
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
    fn never_evicts() {
        let mut p = KeepAll::new(2);
        p.observe(10, 0, None, 10).unwrap();
        p.observe(1, 10, None, 10).unwrap();
        assert_eq!(p.evictions(), vec![Vec::<usize>::new(); 2]);
        assert_eq!((p.len(0), p.len(1), p.len(2)), (11, 11, 0));
        assert_eq!(p.bytes(), 0);
        assert!(!p.wants_mass());
    }
}
