//! Eviction policies: which tokens survive.
//!
//! A policy is plain, deterministic CPU logic over small per-token arrays; it is identical for
//! every backend. It tracks the tokens a layer's codec holds, in the same arrival order, and
//! after each forward step says which of them to evict. Positions are absolute token positions.

use anyhow::Result;

/// One layer's eviction policy.
pub trait Policy: Send + Sync {
    /// A short name with parameters, for reports (`h2o(budget=0.2,recent=0.5)`).
    fn describe(&self) -> String;
    /// Whether the policy needs each step's attention mass (H2O, SIEVE); the attention op only
    /// computes it when asked.
    fn wants_mass(&self) -> bool;
    /// Records `n_new` tokens appended at the end of every head (positions `pos0 ..`), and the
    /// attention mass every held token received in this step: `mass[g]` has `len(g)` entries (the
    /// new tokens included),
    /// summed over the step's queries and the query heads of each KV head; `None` when
    /// `wants_mass` is false. `prompt_len` is the prompt's length once known (budgets given as a
    /// fraction are fractions of it).
    fn observe(&mut self, n_new: usize, pos0: usize, mass: Option<&[Vec<f32>]>, prompt_len: usize) -> Result<()>;
    /// Per KV head, the indices (ascending, in arrival order) of the tokens to evict now.
    /// Returned lists have the same length for every head when the policy evicts per layer;
    /// they may differ per head.
    fn evictions(&mut self) -> Vec<Vec<usize>>;
    /// Tokens head `g` holds.
    fn len(&self, g: usize) -> usize;
    /// Bytes of the policy's own state.
    fn bytes(&self) -> usize;
}
