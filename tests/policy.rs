//! Eviction policies on seeded random traces, against plain reference models written here:
//! H2O against a brute-force model that recomputes every score from the full mass history,
//! SIEVE against a Vec-based queue with a hand index, Window against the set it must keep.
//! Each test draws a fresh seed (printed, and named in every failure message); set
//! `KVGEAR_TEST_SEED` to replay one.

use kvgear::kv::policy::{make_policy, Budget, Policy, PolicyParams, Sieve, H2O};
use kvgear::rng::Rng;

/// Random traces per test.
const N_TRACES: u64 = 300;

fn base_seed() -> u64 {
    let s = std::env::var("KVGEAR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(Rng::seed_from_time);
    eprintln!("seed {s}");
    s
}

/// One forward step: `n_new` tokens at `pos0`.
#[derive(Clone, Copy, Debug)]
struct Step {
    n_new: usize,
    pos0: usize,
}

/// A prompt (sometimes fed in two chunks) and then decode steps of one token.
#[derive(Clone, Debug)]
struct Trace {
    steps: Vec<Step>,
    prompt_len: usize,
    /// Whether masses come from a small set of values (many exact ties) instead of softmax rows.
    ties: bool,
}

fn random_trace(r: &mut Rng) -> Trace {
    let prompt_len = 1 + r.below(60) as usize;
    let pos_start = if r.below(5) == 0 { r.below(10) as usize } else { 0 };
    let mut steps = Vec::new();
    if prompt_len > 1 && r.below(4) == 0 {
        let first = 1 + r.below(prompt_len as u64 - 1) as usize;
        steps.push(Step { n_new: first, pos0: pos_start });
        steps.push(Step { n_new: prompt_len - first, pos0: pos_start + first });
    } else {
        steps.push(Step { n_new: prompt_len, pos0: pos_start });
    }
    let n_decode = r.below(80) as usize;
    for i in 0..n_decode {
        steps.push(Step { n_new: 1, pos0: pos_start + prompt_len + i });
    }
    Trace { steps, prompt_len, ties: r.below(3) == 0 }
}

/// The mass each KV head's held tokens receive in a step, per query head: `lens[g]` tokens held
/// before the step, `n_new` appended; query `i` of the step sees the old tokens and new tokens
/// `0..=i` (causal). Softmax rows (each sums to one) or, with `ties`, values from {0, 0.5, 1}.
/// Returns `[n_kv_heads][group][lens[g] + n_new]`.
fn query_head_mass(r: &mut Rng, lens: &[usize], n_new: usize, group: usize, ties: bool) -> Vec<Vec<Vec<f32>>> {
    lens.iter()
        .map(|&old| {
            (0..group)
                .map(|_| {
                    let n = old + n_new;
                    let mut m = vec![0.0f32; n];
                    if ties {
                        for x in m.iter_mut() {
                            *x = r.below(3) as f32 * 0.5;
                        }
                        return m;
                    }
                    for i in 0..n_new {
                        let seen = old + i + 1;
                        let logits: Vec<f32> =
                            (0..seen).map(|_| if r.below(8) == 0 { 4.0 + r.normal() } else { r.normal() }).collect();
                        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f32> = logits.iter().map(|&l| (l - mx).exp()).collect();
                        let s: f32 = e.iter().sum();
                        for (x, y) in m.iter_mut().zip(&e) {
                            *x += y / s;
                        }
                    }
                    m
                })
                .collect()
        })
        .collect()
}

/// GQA: the mass of a KV head is the sum over its query heads.
fn sum_groups(per_q: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    per_q
        .iter()
        .map(|heads| {
            let mut s = vec![0.0f32; heads[0].len()];
            for h in heads {
                for (a, b) in s.iter_mut().zip(h) {
                    *a += b;
                }
            }
            s
        })
        .collect()
}

/// Evicted indices (ascending) of the tokens whose positions are in `gone`.
fn indices_of(held: &[usize], gone: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = gone.iter().map(|p| held.iter().position(|q| q == p).expect("held")).collect();
    v.sort_unstable();
    v
}

/// The budget in tokens, computed independently of `Budget::resolve`.
fn budget_tokens(budget: f64, prompt_len: usize, sinks: usize) -> usize {
    if budget < 1.0 {
        ((budget * prompt_len as f64).round() as usize).max(sinks + 1)
    } else {
        budget as usize
    }
}

/// Random parameters: a budget (fraction or count) with room for the sinks.
fn random_budget(r: &mut Rng, sinks: usize) -> f64 {
    if r.below(2) == 0 {
        0.05 + 0.9 * r.next_f64()
    } else {
        (sinks + 1 + r.below(40) as usize) as f64
    }
}

/// Brute-force H2O: every token keeps its full mass history; each step recomputes the scores
/// from it and decides which set survives.
struct H2oModel {
    budget: f64,
    recent: f64,
    sinks: usize,
    /// Per head: (position, masses received, one per step since arrival).
    heads: Vec<Vec<(usize, Vec<f32>)>>,
}

impl H2oModel {
    fn step(&mut self, s: Step, mass: &[Vec<f32>], prompt_len: usize) -> Vec<Vec<usize>> {
        let b = budget_tokens(self.budget, prompt_len, self.sinks);
        let recent = ((self.recent * b as f64).floor() as usize).min(b - self.sinks);
        let mut out = Vec::new();
        for (toks, m) in self.heads.iter_mut().zip(mass) {
            toks.extend((0..s.n_new).map(|i| (s.pos0 + i, Vec::new())));
            for (t, &x) in toks.iter_mut().zip(m) {
                t.1.push(x);
            }
            let n = toks.len();
            if n <= b {
                out.push(Vec::new());
                continue;
            }
            let mut cand: Vec<(f32, usize, usize)> = toks[..n - recent]
                .iter()
                .enumerate()
                .filter(|(_, t)| t.0 >= self.sinks)
                .map(|(j, t)| (t.1.iter().fold(0.0f32, |a, &x| a + x), t.0, j))
                .collect();
            cand.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut gone: Vec<usize> = cand[..n - b].iter().map(|c| c.2).collect();
            gone.sort_unstable();
            for &j in gone.iter().rev() {
                toks.remove(j);
            }
            out.push(gone);
        }
        out
    }

    fn scores(&self, g: usize) -> Vec<f32> {
        self.heads[g].iter().map(|t| t.1.iter().fold(0.0f32, |a, &x| a + x)).collect()
    }
}

#[test]
fn h2o_matches_brute_force_on_random_traces() {
    let base = base_seed();
    let mut n_evicted = 0;
    for k in 0..N_TRACES {
        let seed = base.wrapping_add(k);
        let mut r = Rng::new(seed);
        let trace = random_trace(&mut r);
        let n_kv = 1 + r.below(3) as usize;
        let group = 1 + r.below(3) as usize;
        let sinks = r.below(4) as usize;
        let budget = random_budget(&mut r, sinks);
        let recent = [0.0, 0.25, 0.5, 0.75, 1.0, r.next_f64()][r.below(6) as usize];
        let params = PolicyParams { budget: Some(budget), recent: Some(recent), sinks: Some(sinks), threshold: None };
        let mut p = make_policy("h2o", &params, n_kv).unwrap();
        let mut h = H2O::new(n_kv, Budget::from_f64(budget).unwrap(), recent, sinks).unwrap();
        let mut model = H2oModel { budget, recent, sinks, heads: vec![Vec::new(); n_kv] };
        let ctx = format!("seed {seed} ({trace:?}, n_kv {n_kv}, group {group}, {})", p.describe());
        for (i, &s) in trace.steps.iter().enumerate() {
            let lens: Vec<usize> = (0..n_kv).map(|g| p.len(g)).collect();
            let mass = sum_groups(&query_head_mass(&mut r, &lens, s.n_new, group, trace.ties));
            p.observe(s.n_new, s.pos0, Some(&mass), trace.prompt_len).unwrap();
            h.observe(s.n_new, s.pos0, Some(&mass), trace.prompt_len).unwrap();
            let got = p.evictions();
            let want = model.step(s, &mass, trace.prompt_len);
            assert_eq!(got, want, "step {i}: {ctx}");
            assert_eq!(h.evictions(), want, "step {i}: {ctx}");
            let b = budget_tokens(budget, trace.prompt_len, sinks);
            for (g, ev) in got.iter().enumerate() {
                assert_eq!(p.len(g), model.heads[g].len(), "step {i} head {g}: {ctx}");
                assert!(p.len(g) <= b, "step {i} head {g}: {ctx}");
                assert_eq!(h.scores(g), model.scores(g), "step {i} head {g}: {ctx}");
                n_evicted += ev.len();
            }
            assert_eq!(p.bytes(), 4 * (0..n_kv).map(|g| p.len(g)).sum::<usize>(), "{ctx}");
        }
    }
    assert!(n_evicted > 0, "seed {base}: the traces never evicted anything");
}

/// Feeding each head's mass to a one-head H2O gives the same evictions as the multi-head policy:
/// heads evolve independently, and (with random masses) they do diverge.
#[test]
fn h2o_heads_evolve_independently_under_gqa() {
    let base = base_seed();
    let mut diverged = 0;
    for k in 0..N_TRACES {
        let seed = base.wrapping_add(k);
        let mut r = Rng::new(seed);
        let trace = random_trace(&mut r);
        let n_kv = 2 + r.below(3) as usize;
        let group = 2 + r.below(3) as usize;
        let budget = random_budget(&mut r, 0);
        let params = PolicyParams { budget: Some(budget), ..Default::default() };
        let mut p = make_policy("h2o", &params, n_kv).unwrap();
        let mut single: Vec<Box<dyn Policy>> = (0..n_kv).map(|_| make_policy("h2o", &params, 1).unwrap()).collect();
        for (i, &s) in trace.steps.iter().enumerate() {
            let lens: Vec<usize> = (0..n_kv).map(|g| p.len(g)).collect();
            let per_q = query_head_mass(&mut r, &lens, s.n_new, group, trace.ties);
            let mass = sum_groups(&per_q);
            for (g, m) in mass.iter().enumerate() {
                let total: f32 = m.iter().sum();
                if !trace.ties {
                    let want = (s.n_new * group) as f32;
                    assert!((total - want).abs() <= 1e-3 * want, "seed {seed}: head {g} mass {total}, want {want}");
                }
            }
            p.observe(s.n_new, s.pos0, Some(&mass), trace.prompt_len).unwrap();
            let got = p.evictions();
            for (g, one) in single.iter_mut().enumerate() {
                one.observe(s.n_new, s.pos0, Some(&mass[g..g + 1]), trace.prompt_len).unwrap();
                assert_eq!(one.evictions()[0], got[g], "seed {seed} step {i} head {g}");
            }
            if got.iter().any(|e| *e != got[0]) {
                diverged += 1;
            }
        }
    }
    assert!(diverged > 0, "seed {base}: heads never evicted differently");
}

/// One head of the reference: the queue of (position, visited), and the hand (`None`: start at
/// the oldest non-sink token).
type RefHead = (Vec<(usize, bool)>, Option<usize>);

/// SIEVE written plainly: a Vec queue (index 0 the oldest), a hand index, `Vec::remove`.
struct SieveRef {
    budget: f64,
    threshold: f64,
    sinks: usize,
    heads: Vec<RefHead>,
}

impl SieveRef {
    fn step(&mut self, s: Step, mass: &[Vec<f32>], prompt_len: usize) -> Vec<Vec<usize>> {
        let b = budget_tokens(self.budget, prompt_len, self.sinks);
        let mut out = Vec::new();
        for ((q, hand), m) in self.heads.iter_mut().zip(mass) {
            for i in 0..s.n_new {
                q.push((s.pos0 + i, false));
            }
            let mut total = 0.0f64;
            for &x in m {
                total += x as f64;
            }
            let bar = self.threshold * total / q.len() as f64;
            for (t, &x) in q.iter_mut().zip(m) {
                if t.0 >= self.sinks && x as f64 > bar {
                    t.1 = true;
                }
            }
            let before: Vec<usize> = q.iter().map(|t| t.0).collect();
            let mut gone = Vec::new();
            while q.len() > b {
                let n_sinks = q.iter().filter(|t| t.0 < self.sinks).count();
                let mut i = hand.unwrap_or(n_sinks);
                while q[i].1 {
                    q[i].1 = false;
                    i += 1;
                    if i == q.len() {
                        i = n_sinks;
                    }
                }
                gone.push(q.remove(i).0);
                *hand = if i < q.len() { Some(i) } else { None };
            }
            out.push(indices_of(&before, &gone));
        }
        out
    }
}

#[test]
fn sieve_matches_reference_on_random_traces() {
    let base = base_seed();
    let mut n_evicted = 0;
    for k in 0..N_TRACES {
        let seed = base.wrapping_add(k);
        let mut r = Rng::new(seed);
        let trace = random_trace(&mut r);
        let n_kv = 1 + r.below(3) as usize;
        let group = 1 + r.below(3) as usize;
        let sinks = r.below(4) as usize;
        let budget = random_budget(&mut r, sinks);
        let threshold = [0.0, 0.5, 1.0, 2.0][r.below(4) as usize];
        let params = PolicyParams { budget: Some(budget), sinks: Some(sinks), threshold: Some(threshold), recent: None };
        let mut p = make_policy("sieve", &params, n_kv).unwrap();
        let mut sv = Sieve::new(n_kv, Budget::from_f64(budget).unwrap(), threshold, sinks).unwrap();
        let mut reference = SieveRef { budget, threshold, sinks, heads: vec![(Vec::new(), None); n_kv] };
        let ctx = format!("seed {seed} ({trace:?}, n_kv {n_kv}, group {group}, {})", p.describe());
        for (i, &s) in trace.steps.iter().enumerate() {
            let lens: Vec<usize> = (0..n_kv).map(|g| p.len(g)).collect();
            let mass = sum_groups(&query_head_mass(&mut r, &lens, s.n_new, group, trace.ties));
            p.observe(s.n_new, s.pos0, Some(&mass), trace.prompt_len).unwrap();
            sv.observe(s.n_new, s.pos0, Some(&mass), trace.prompt_len).unwrap();
            let got = p.evictions();
            let want = reference.step(s, &mass, trace.prompt_len);
            assert_eq!(got, want, "step {i}: {ctx}");
            assert_eq!(sv.evictions(), want, "step {i}: {ctx}");
            for (g, ev) in got.iter().enumerate() {
                let (q, hand) = &reference.heads[g];
                assert_eq!(p.len(g), q.len(), "step {i} head {g}: {ctx}");
                assert_eq!(sv.visited(g), q.iter().map(|t| t.1).collect::<Vec<_>>(), "step {i} head {g}: {ctx}");
                let n_sinks = q.iter().filter(|t| t.0 < sinks).count();
                assert_eq!(sv.hand(g), hand.unwrap_or(n_sinks), "step {i} head {g}: {ctx}");
                n_evicted += ev.len();
            }
            let bits: usize = (0..n_kv).map(|g| 8 * p.len(g).div_ceil(64)).sum();
            assert_eq!(p.bytes(), bits, "{ctx}");
        }
    }
    assert!(n_evicted > 0, "seed {base}: the traces never evicted anything");
}

#[test]
fn window_keeps_exactly_sinks_and_recent() {
    let base = base_seed();
    for k in 0..N_TRACES {
        let seed = base.wrapping_add(k);
        let mut r = Rng::new(seed);
        let trace = random_trace(&mut r);
        let n_kv = 1 + r.below(3) as usize;
        let sinks = r.below(5) as usize;
        let budget = random_budget(&mut r, sinks);
        let params = PolicyParams { budget: Some(budget), sinks: Some(sinks), ..Default::default() };
        let mut p = make_policy("window", &params, n_kv).unwrap();
        assert!(!p.wants_mass());
        let recent = budget_tokens(budget, trace.prompt_len, sinks) - sinks;
        let mut held: Vec<Vec<usize>> = vec![Vec::new(); n_kv];
        let mut seen = Vec::new();
        for (i, &s) in trace.steps.iter().enumerate() {
            p.observe(s.n_new, s.pos0, None, trace.prompt_len).unwrap();
            seen.extend(s.pos0..s.pos0 + s.n_new);
            let ev = p.evictions();
            let first_recent = seen.len().saturating_sub(recent);
            let want: Vec<usize> =
                seen.iter().enumerate().filter(|&(j, &q)| q < sinks || j >= first_recent).map(|(_, &q)| q).collect();
            for g in 0..n_kv {
                held[g].extend(s.pos0..s.pos0 + s.n_new);
                for &j in ev[g].iter().rev() {
                    held[g].remove(j);
                }
                assert_eq!(held[g], want, "seed {seed} step {i} head {g} ({trace:?}, {})", p.describe());
                assert_eq!(p.len(g), want.len(), "seed {seed}");
            }
            assert_eq!(p.bytes(), 0);
        }
    }
}

/// Runs a trace through a policy; returns every step's evictions.
fn eviction_log(name: &str, params: &PolicyParams, seed: u64) -> Vec<Vec<Vec<usize>>> {
    let mut r = Rng::new(seed);
    let trace = random_trace(&mut r);
    let n_kv = 3;
    let mut p = make_policy(name, params, n_kv).unwrap();
    let mut log = Vec::new();
    for &s in &trace.steps {
        let lens: Vec<usize> = (0..n_kv).map(|g| p.len(g)).collect();
        let mass = sum_groups(&query_head_mass(&mut r, &lens, s.n_new, 2, trace.ties));
        let m = if p.wants_mass() { Some(mass.as_slice()) } else { None };
        p.observe(s.n_new, s.pos0, m, trace.prompt_len).unwrap();
        log.push(p.evictions());
    }
    log
}

#[test]
fn runs_are_deterministic() {
    let base = base_seed();
    for name in ["keep_all", "window", "h2o", "sieve"] {
        let params = match name {
            "keep_all" => PolicyParams::default(),
            "window" => PolicyParams { budget: Some(12.0), sinks: Some(2), ..Default::default() },
            _ => PolicyParams { budget: Some(0.3), ..Default::default() },
        };
        for k in 0..50 {
            let seed = base.wrapping_add(k);
            assert_eq!(eviction_log(name, &params, seed), eviction_log(name, &params, seed), "seed {seed} {name}");
        }
    }
}

/// A fraction of the prompt evicts exactly as the token count it resolves to.
#[test]
fn fraction_budget_equals_its_token_count() {
    let base = base_seed();
    for name in ["window", "h2o", "sieve"] {
        for k in 0..100 {
            let seed = base.wrapping_add(k);
            let prompt_len = random_trace(&mut Rng::new(seed)).prompt_len;
            let mut r = Rng::new(seed ^ 0x5eed);
            let sinks = r.below(3) as usize;
            let fraction = 0.05 + 0.9 * r.next_f64();
            let tokens = ((fraction * prompt_len as f64).round() as usize).max(sinks + 1);
            let frac = PolicyParams { budget: Some(fraction), sinks: Some(sinks), ..Default::default() };
            let abs = PolicyParams { budget: Some(tokens as f64), ..frac };
            assert_eq!(eviction_log(name, &frac, seed), eviction_log(name, &abs, seed), "seed {seed} {name} {fraction}");
        }
    }
    let p = make_policy("h2o", &PolicyParams { budget: Some(0.25), ..Default::default() }, 1).unwrap();
    assert_eq!(p.describe(), "h2o(budget=0.25,recent=0.5,sinks=0)");
}

#[test]
fn bad_params_are_errors() {
    let bp = |budget: Option<f64>, recent: Option<f64>, sinks: Option<usize>, threshold: Option<f64>| PolicyParams {
        budget,
        recent,
        sinks,
        threshold,
    };
    let bad = [
        ("h2o", bp(None, None, None, None)),
        ("h2o", bp(Some(0.0), None, None, None)),
        ("h2o", bp(Some(-3.0), None, None, None)),
        ("h2o", bp(Some(f64::NAN), None, None, None)),
        ("h2o", bp(Some(10.5), None, None, None)),
        ("h2o", bp(Some(10.0), Some(-0.1), None, None)),
        ("h2o", bp(Some(10.0), Some(1.5), None, None)),
        ("h2o", bp(Some(10.0), Some(f64::NAN), None, None)),
        ("h2o", bp(Some(4.0), None, Some(4), None)),
        ("h2o", bp(Some(10.0), None, None, Some(1.0))),
        ("sieve", bp(Some(4.0), None, Some(4), None)),
        ("sieve", bp(Some(10.0), None, None, Some(-1.0))),
        ("sieve", bp(Some(10.0), None, None, Some(f64::INFINITY))),
        ("sieve", bp(Some(10.0), Some(0.5), None, None)),
        ("sieve", bp(None, None, None, None)),
        ("window", bp(Some(4.0), None, None, None)),
        ("window", bp(Some(10.0), Some(0.5), None, None)),
        ("window", bp(None, None, Some(2), None)),
        ("keep_all", bp(Some(10.0), None, None, None)),
        ("keep_all", bp(None, None, Some(1), None)),
        ("lru", bp(Some(10.0), None, None, None)),
    ];
    for (name, params) in bad {
        assert!(make_policy(name, &params, 2).is_err(), "{name} {params:?} should be an error");
    }
    assert!(make_policy("keep_all", &PolicyParams::default(), 0).is_err());
    let err = make_policy("lru", &PolicyParams::default(), 1).err().unwrap().to_string();
    assert!(err.contains("h2o") && err.contains("sieve"), "{err}");

    for name in ["h2o", "sieve"] {
        let mut p = make_policy(name, &PolicyParams { budget: Some(0.5), ..Default::default() }, 2).unwrap();
        assert!(p.observe(2, 0, Some(&[vec![1.0, 1.0], vec![1.0, 1.0]]), 0).is_err(), "{name}: fraction without a prompt");
        assert!(p.observe(2, 0, None, 2).is_err(), "{name}: no mass");
        assert!(p.observe(2, 0, Some(&[vec![1.0, 1.0]]), 2).is_err(), "{name}: one head of two");
        assert!(p.observe(2, 0, Some(&[vec![1.0, 1.0], vec![1.0]]), 2).is_err(), "{name}: short head");
        assert!(p.observe(2, 0, Some(&[vec![1.0, 1.0], vec![1.0, -1.0]]), 2).is_err(), "{name}: negative");
        assert!(p.observe(2, 0, Some(&[vec![1.0, f32::INFINITY], vec![1.0, 1.0]]), 2).is_err(), "{name}: inf");
        assert_eq!((p.len(0), p.len(1)), (0, 0), "{name}: a failed observe changes nothing");
        p.observe(2, 0, Some(&[vec![1.0, 1.0], vec![1.0, 1.0]]), 2).unwrap();
        assert!(p.observe(1, 1, Some(&[vec![1.0; 3], vec![1.0; 3]]), 2).is_err(), "{name}: positions backwards");
        assert_eq!(p.len(5), 0);
    }
    let mut w = make_policy("window", &PolicyParams { budget: Some(0.5), sinks: Some(0), ..Default::default() }, 1).unwrap();
    assert!(w.observe(3, 0, None, 0).is_err());
}

#[test]
fn exactly_at_budget_nothing_is_evicted() {
    for name in ["window", "h2o", "sieve"] {
        let params = PolicyParams { budget: Some(5.0), sinks: Some(1), ..Default::default() };
        let mut p = make_policy(name, &params, 2).unwrap();
        let m = vec![vec![0.2f32; 5]; 2];
        p.observe(5, 0, Some(&m), 5).unwrap();
        assert_eq!(p.evictions(), vec![Vec::<usize>::new(); 2], "{name}");
        let m = vec![vec![0.2f32; 6]; 2];
        p.observe(1, 5, Some(&m), 5).unwrap();
        let ev = p.evictions();
        assert!(ev.iter().all(|e| e.len() == 1 && e[0] >= 1), "{name}: {ev:?}");
        assert_eq!(p.evictions(), vec![Vec::<usize>::new(); 2], "{name}: a second call evicts nothing");
    }
}
