//! `cargo bench --bench attention`: one decode step's attention (one query token, every head)
//! over a cache of each codec, on one layer of Llama2-7B's shape (32 heads of 128), at several
//! context lengths, through the CPU backend the forward pass uses (`Backend::attention`: the
//! llama.cpp-matching fp16 path for the plain cache, block-by-block over the packed data for the
//! codecs). Throughput: cached tokens attended per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use kvgear::backend::cpu::{Cpu, CpuKv};
use kvgear::backend::Backend;
use kvgear::kv::strategy::StrategySpec;
use kvgear::rng::Rng;

const N_HEADS: usize = 32;
const HEAD_DIM: usize = 128;
/// Tokens appended per call while filling the cache (a prompt batch).
const FILL_CHUNK: usize = 256;

/// A layer of `spec` holding `n_ctx + 1` random tokens (the last one the query's own), and the
/// query. Each (context, strategy) pair draws from its own seed, so what a filtered run measures
/// does not depend on which other benchmarks the filter left out.
fn filled_layer(b: &Cpu, spec: &StrategySpec, n_ctx: usize, seed: u64) -> (CpuKv, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let width = N_HEADS * HEAD_DIM;
    let mut layer = b.kv_layer(spec, N_HEADS, HEAD_DIM, n_ctx + 1, 0).expect("layer");
    let mut filled = 0;
    while filled < n_ctx {
        let n = FILL_CHUNK.min(n_ctx - filled);
        let k: Vec<f32> = (0..n * width).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..n * width).map(|_| rng.normal()).collect();
        b.kv_append(&mut layer, &k, &v, n).expect("append");
        // A prompt step ends as in the forward pass: the codec compresses what is due (without
        // this every token would stay in the codecs' f16 buffers).
        b.kv_finish_step(&mut layer, n, filled, n_ctx + 1).expect("finish step");
        filled += n;
    }
    // The query's own token, appended once: every iteration attends over n_ctx + 1 tokens.
    let kv1: Vec<f32> = (0..width).map(|_| rng.normal()).collect();
    b.kv_append(&mut layer, &kv1, &kv1, 1).expect("append");
    let held = b.kv_bytes(&layer);
    assert!(spec.codec == "fp16" || held.codes > 0, "{}: the cache holds no compressed tokens", spec.codec);
    let q: Vec<f32> = (0..width).map(|_| rng.normal()).collect();
    (layer, q)
}

fn attention(c: &mut Criterion) {
    let b = Cpu::fast();
    let width = N_HEADS * HEAD_DIM;
    let strategies: [(&str, &[&str]); 5] =
        [("fp16", &[]), ("uniform", &["bits=4"]), ("group", &["bits=4"]), ("gear", &["bits=4"]), ("gear", &["bits=2"])];
    for (ci, n_ctx) in [512usize, 2048, 8192].into_iter().enumerate() {
        let mut g = c.benchmark_group(format!("attention_decode_ctx{n_ctx}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(n_ctx as u64));
        for (si, (name, kv)) in strategies.into_iter().enumerate() {
            let kv: Vec<String> = kv.iter().map(|s| s.to_string()).collect();
            let spec = StrategySpec::parse(name, &kv, 1).expect("strategy");
            let id = format!("{name}{}", if kv.is_empty() { String::new() } else { format!("-{}", kv.join(",")) });
            let seed = 3 + (ci * strategies.len() + si) as u64;
            // Filled on the first call of the routine, which criterion makes only for the
            // benchmarks its filter selects.
            let mut state = None;
            let mut out = vec![0f32; width];
            g.bench_with_input(BenchmarkId::new(id, n_ctx), &n_ctx, |bch, &n_ctx| {
                let (layer, q) = state.get_or_insert_with(|| filled_layer(&b, &spec, n_ctx, seed));
                bch.iter(|| b.attention(q, layer, 1, N_HEADS, HEAD_DIM, &mut out).expect("attention"))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
