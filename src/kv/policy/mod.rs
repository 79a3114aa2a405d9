//! Eviction policies: which tokens survive.
//!
//! A policy is plain, deterministic CPU logic over small per-token arrays; it is identical for
//! every backend. It tracks the tokens a layer's codec holds, in the same arrival order, and
//! after each forward step says which of them to evict. Positions are absolute token positions.
//!
//! Conventions shared by every policy here:
//! - Positions must not go backwards: a step's `pos0` is at least the end of the previous step.
//! - Sinks are the tokens at positions `< sinks`. They are never evicted, so (positions being
//!   increasing) they are a prefix of every head's list.
//! - A budget is the most tokens a head holds after `evictions()`, sinks included. It is a token
//!   count (a whole number `>= 1`) or a fraction of the prompt length (`0 < budget < 1`),
//!   resolved at every `observe` as `max(round(budget * prompt_len), sinks + 1)`; a fraction
//!   with `prompt_len == 0` is an error.
//! - `evictions()` is meant to be called after every `observe`; the budget is applied when it is
//!   called, so calling it less often evicts everything over budget at that point.
//! - A failed `observe` leaves the policy unchanged.
//! - `bytes()` counts the per-token state (what grows with the context). Per-layer and per-head
//!   scalars (a token count, the SIEVE hand) are a few bytes each and are not counted.

mod h2o;
mod keep_all;
mod sieve;
mod window;

pub use h2o::{recent_tokens, H2O};
pub use keep_all::KeepAll;
pub use sieve::Sieve;
pub use window::Window;

use anyhow::{bail, Result};

/// A boxed copy of a policy (a saved prompt prefix restores one, see `Session::snapshot`).
pub trait PolicyClone {
    fn clone_box(&self) -> Box<dyn Policy>;
}

impl<T: Policy + Clone + 'static> PolicyClone for T {
    fn clone_box(&self) -> Box<dyn Policy> {
        Box::new(self.clone())
    }
}

/// One layer's eviction policy.
pub trait Policy: PolicyClone + Send + Sync {
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

/// The largest budget given as a token count.
const MAX_BUDGET_TOKENS: f64 = u32::MAX as f64;

/// How many tokens a head may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// A fraction of the prompt length, in (0, 1).
    Fraction(f64),
    /// A number of tokens, at least 1.
    Tokens(usize),
}

impl Budget {
    /// Reads a budget: below 1 a fraction of the prompt length, from 1 up a whole token count.
    pub fn from_f64(x: f64) -> Result<Budget> {
        if !x.is_finite() || x <= 0.0 {
            bail!("budget must be a fraction in (0, 1) or a token count >= 1, got {x}");
        }
        if x < 1.0 {
            return Ok(Budget::Fraction(x));
        }
        if x.fract() != 0.0 || x > MAX_BUDGET_TOKENS {
            bail!("a budget >= 1 is a token count and must be a whole number up to {MAX_BUDGET_TOKENS}, got {x}");
        }
        Ok(Budget::Tokens(x as usize))
    }

    /// Checks the budget leaves room for one token besides `sinks` (always true of a fraction,
    /// which is raised to `sinks + 1` when resolved).
    fn check_sinks(self, sinks: usize) -> Result<()> {
        if let Budget::Tokens(n) = self {
            if n < sinks.saturating_add(1) {
                bail!("budget of {n} tokens must be at least sinks + 1 = {}", sinks.saturating_add(1));
            }
        }
        Ok(())
    }

    /// The budget in tokens: `max(round(fraction * prompt_len), sinks + 1)` for a fraction.
    pub fn resolve(self, prompt_len: usize, sinks: usize) -> Result<usize> {
        match self {
            Budget::Tokens(n) => Ok(n),
            Budget::Fraction(f) => {
                if prompt_len == 0 {
                    bail!("budget {f} is a fraction of the prompt length, which is not known (prompt_len = 0)");
                }
                let n = (f * prompt_len as f64).round() as usize;
                Ok(n.max(sinks.saturating_add(1)))
            }
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Fraction(x) => write!(f, "{x}"),
            Budget::Tokens(n) => write!(f, "{n}"),
        }
    }
}

/// A policy's parameters as a typed config gives them; which ones apply depends on the policy,
/// and giving one that does not apply is an error (so a report never shows a parameter that had
/// no effect).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PolicyParams {
    /// window, h2o, sieve: tokens held per head, sinks included; a fraction (< 1) of the prompt
    /// length or a token count (>= 1). Required.
    pub budget: Option<f64>,
    /// h2o: the fraction of the budget kept for the most recent tokens, in [0, 1]; default 0.5.
    pub recent: Option<f64>,
    /// window (default 4), h2o and sieve (default 0): first tokens (by position) never evicted.
    pub sinks: Option<usize>,
    /// sieve: a token is visited in a step when its mass exceeds `threshold` times the step's
    /// uniform share (total mass / tokens held); finite, >= 0; default 1.
    pub threshold: Option<f64>,
}

impl PolicyParams {
    /// `sinks` as policy `name` applies it: the given count, else the policy's default.
    pub fn sinks_or_default(&self, name: &str) -> usize {
        self.sinks.unwrap_or(if name == "window" { window::DEFAULT_SINKS } else { 0 })
    }

    /// h2o's `recent` as it applies it: the given fraction, else the paper's split.
    pub fn recent_or_default(&self) -> f64 {
        self.recent.unwrap_or(h2o::DEFAULT_RECENT)
    }
}

/// The policy names `make_policy` knows.
pub const POLICY_NAMES: [&str; 4] = ["keep_all", "window", "h2o", "sieve"];

/// Builds a policy by name for a layer of `n_kv_heads` KV heads.
pub fn make_policy(name: &str, params: &PolicyParams, n_kv_heads: usize) -> Result<Box<dyn Policy>> {
    if n_kv_heads == 0 {
        bail!("a policy needs at least one KV head");
    }
    let reject = |what: &str, given: bool| -> Result<()> {
        if given {
            bail!("policy {name} takes no `{what}` parameter");
        }
        Ok(())
    };
    let budget = || -> Result<Budget> {
        match params.budget {
            Some(b) => Budget::from_f64(b),
            None => bail!("policy {name} needs a budget"),
        }
    };
    match name {
        "keep_all" => {
            reject("budget", params.budget.is_some())?;
            reject("recent", params.recent.is_some())?;
            reject("sinks", params.sinks.is_some())?;
            reject("threshold", params.threshold.is_some())?;
            Ok(Box::new(KeepAll::new(n_kv_heads)))
        }
        "window" => {
            reject("recent", params.recent.is_some())?;
            reject("threshold", params.threshold.is_some())?;
            Ok(Box::new(Window::new(n_kv_heads, budget()?, params.sinks_or_default(name))?))
        }
        "h2o" => {
            reject("threshold", params.threshold.is_some())?;
            Ok(Box::new(H2O::new(n_kv_heads, budget()?, params.recent_or_default(), params.sinks_or_default(name))?))
        }
        "sieve" => {
            reject("recent", params.recent.is_some())?;
            let threshold = params.threshold.unwrap_or(sieve::DEFAULT_THRESHOLD);
            Ok(Box::new(Sieve::new(n_kv_heads, budget()?, threshold, params.sinks_or_default(name))?))
        }
        _ => bail!("unknown policy {name:?}; known: {}", POLICY_NAMES.join(", ")),
    }
}

/// The arrival bookkeeping every policy shares: positions only go forward, and how many sinks
/// (tokens at positions `< sinks`) have arrived, which is the length of every head's never-evicted
/// prefix.
#[derive(Clone, Debug)]
struct Arrivals {
    sinks: usize,
    next_pos: usize,
    n_sinks_held: usize,
}

impl Arrivals {
    fn new(sinks: usize) -> Arrivals {
        Arrivals { sinks, next_pos: 0, n_sinks_held: 0 }
    }

    /// Checks a step's positions without recording them.
    fn check(&self, n_new: usize, pos0: usize) -> Result<()> {
        if n_new == 0 {
            return Ok(());
        }
        if pos0 < self.next_pos {
            bail!("positions go backwards: a step starts at {pos0}, the previous one ended at {}", self.next_pos);
        }
        match pos0.checked_add(n_new) {
            Some(end) if end <= u32::MAX as usize => Ok(()),
            _ => bail!("positions {pos0} + {n_new} overflow"),
        }
    }

    /// Records a checked step.
    fn commit(&mut self, n_new: usize, pos0: usize) {
        if n_new == 0 {
            return;
        }
        let end = pos0 + n_new;
        self.n_sinks_held += end.min(self.sinks).saturating_sub(pos0.min(self.sinks));
        self.next_pos = end;
    }
}

/// Checks that a step's mass is present and shaped like the heads after appending `n_new`:
/// `mass[g].len() == len(g) + n_new`, every value finite and >= 0.
fn check_mass(
    mass: Option<&[Vec<f32>]>,
    n_heads: usize,
    len: impl Fn(usize) -> usize,
    n_new: usize,
) -> Result<&[Vec<f32>]> {
    let Some(mass) = mass else { bail!("this policy needs the attention mass of every step") };
    if mass.len() != n_heads {
        bail!("attention mass for {} heads, the layer has {n_heads} KV heads", mass.len());
    }
    for (g, m) in mass.iter().enumerate() {
        let want = len(g) + n_new;
        if m.len() != want {
            bail!("attention mass of head {g} has {} entries, the head holds {want} tokens", m.len());
        }
        if let Some(j) = m.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            bail!("attention mass of head {g}, token {j} is {} (must be finite and >= 0)", m[j]);
        }
    }
    Ok(mass)
}

/// Removes the entries of `v` at the ascending indices `idx`.
fn remove_sorted<T>(v: &mut Vec<T>, idx: &[usize]) {
    let mut k = 0;
    let mut i = 0;
    v.retain(|_| {
        let drop = k < idx.len() && idx[k] == i;
        if drop {
            k += 1;
        }
        i += 1;
        !drop
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_resolve() {
        assert_eq!(Budget::from_f64(0.25).unwrap(), Budget::Fraction(0.25));
        assert_eq!(Budget::from_f64(1.0).unwrap(), Budget::Tokens(1));
        assert_eq!(Budget::from_f64(64.0).unwrap(), Budget::Tokens(64));
        for bad in [0.0, -1.0, 2.5, f64::NAN, f64::INFINITY, 1e12] {
            assert!(Budget::from_f64(bad).is_err(), "{bad}");
        }
        assert_eq!(Budget::Fraction(0.25).resolve(40, 0).unwrap(), 10);
        assert_eq!(Budget::Fraction(0.1).resolve(30, 0).unwrap(), 3);
        assert_eq!(Budget::Fraction(0.01).resolve(30, 2).unwrap(), 3);
        assert!(Budget::Fraction(0.5).resolve(0, 0).is_err());
        assert_eq!(Budget::Tokens(7).resolve(0, 3).unwrap(), 7);
    }

    #[test]
    fn arrivals_count_sinks_and_reject_backward_positions() {
        let mut a = Arrivals::new(4);
        a.check(2, 0).unwrap();
        a.commit(2, 0);
        assert_eq!(a.n_sinks_held, 2);
        assert!(a.check(1, 1).is_err());
        a.commit(5, 2);
        assert_eq!(a.n_sinks_held, 4);
        a.commit(1, 7);
        assert_eq!(a.n_sinks_held, 4);
        assert!(a.check(1, usize::MAX).is_err());
    }

    #[test]
    fn remove_sorted_drops_exactly_those() {
        let mut v: Vec<u32> = (0..8).collect();
        remove_sorted(&mut v, &[0, 3, 7]);
        assert_eq!(v, vec![1, 2, 4, 5, 6]);
    }
}
