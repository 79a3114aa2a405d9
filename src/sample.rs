//! Token sampling: greedy, or temperature with optional top-k and top-p, seeded.

use anyhow::{bail, Result};

use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplerConfig {
    pub fn greedy() -> SamplerConfig {
        SamplerConfig { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Sampler> {
        cfg.validate()?;
        let rng = Rng::new(cfg.seed);
        Ok(Sampler { cfg, rng, scratch: Vec::new() })
    }

    /// Picks the next token from a row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return greedy(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.cfg.top_k > 0 && self.cfg.top_k < c.len() {
            c.select_nth_unstable_by(self.cfg.top_k - 1, desc);
            c.truncate(self.cfg.top_k);
        }
        c.sort_unstable_by(desc);
        let max = c[0].0;
        let inv_t = 1.0 / self.cfg.temperature;
        let mut total = 0.0f64;
        for e in c.iter_mut() {
            e.0 = ((e.0 - max) * inv_t).exp();
            total += e.0 as f64;
        }
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 as f64 / total;
                if acc >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.0 as f64).sum();
        }
        let r = self.rng.next_f64() * total;
        let mut acc = 0.0f64;
        for e in c.iter() {
            acc += e.0 as f64;
            if r < acc {
                return e.1;
            }
        }
        c[c.len() - 1].1
    }
}

/// Index of the largest logit, the lowest index on ties (as llama.cpp's greedy sampler).
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of a whole row, computed in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p || q) in nats between the next-token distributions of two rows of logits.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (p, q) = (log_softmax(p_logits), log_softmax(q_logits));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// log-softmax of `logits` at `target`, computed in f64.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(greedy(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 }).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 2.0, 1.9, -1.0]), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        let logits = [10.0, 9.0, -10.0, -10.0];
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 5 }).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_repeats_with_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()];
        let cfg = SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 11 };
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(Sampler::new(SamplerConfig { temperature: -1.0, top_k: 0, top_p: 1.0, seed: 0 }).is_err());
        assert!(Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 }).is_err());
    }

    #[test]
    fn log_prob_normalises() {
        let l = [1.0f32, 2.0, 3.0];
        let s: f64 = (0..3).map(|i| log_prob(&l, i).exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
    }
}
