//! `cargo bench --bench policy`: the per-step bookkeeping of the eviction policies (H2O, SIEVE,
//! the window) for one layer of 32 KV heads holding a full budget: `observe` one decoded token's
//! attention mass, then `evictions` (one token per head). Throughput: tracked tokens (all heads)
//! per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use kvgear::kv::policy::{make_policy, PolicyParams};
use kvgear::rng::Rng;

const N_KV_HEADS: usize = 32;

fn policy(c: &mut Criterion) {
    let mut rng = Rng::new(7);
    for budget in [1024usize, 4096] {
        let mut g = c.benchmark_group(format!("policy_step_budget{budget}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements((budget * N_KV_HEADS) as u64));
        for name in ["h2o", "sieve", "window"] {
            let params = PolicyParams { budget: Some(budget as f64), ..Default::default() };
            let mut p = make_policy(name, &params, N_KV_HEADS).expect("policy");
            // Fill to the budget with one prompt step.
            let mass: Vec<Vec<f32>> = (0..N_KV_HEADS).map(|_| (0..budget).map(|_| rng.uniform(0.0, 1.0)).collect()).collect();
            let wants = p.wants_mass();
            p.observe(budget, 0, wants.then_some(&mass[..]), budget).expect("observe");
            p.evictions();
            // Each step: one new token per head, so each head holds budget + 1 before eviction.
            let step: Vec<Vec<f32>> = (0..N_KV_HEADS).map(|_| (0..budget + 1).map(|_| rng.uniform(0.0, 1.0) / budget as f32).collect()).collect();
            let mut pos = budget;
            g.bench_function(BenchmarkId::new(name, budget), |b| {
                b.iter(|| {
                    p.observe(1, pos, wants.then_some(&step[..]), budget).expect("observe");
                    pos += 1;
                    p.evictions()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, policy);
criterion_main!(benches);
