//! `cargo bench --bench gear`: compressing one block of a prompt's K and V (512 tokens, one layer
//! of Llama2-7B's shape: 32 KV heads of 128) with GEAR (backbone quantization, outliers, power
//! iteration for the low-rank residual) and, for scale, with the plain group (KIVI) and uniform
//! codecs. Throughput: bytes of fp16 K and V compressed per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use kvgear::kv::codec::{make_codec, CodecParams};
use kvgear::rng::Rng;

const N_KV_HEADS: usize = 32;
const HEAD_DIM: usize = 128;
const BLOCK_TOKENS: usize = 512;

fn gear(c: &mut Criterion) {
    let mut rng = Rng::new(5);
    let n = BLOCK_TOKENS * N_KV_HEADS * HEAD_DIM;
    let k: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    let mut g = c.benchmark_group(format!("compress_block_{BLOCK_TOKENS}x{N_KV_HEADS}x{HEAD_DIM}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes((2 * n * 2) as u64));
    let cases: [(&str, CodecParams); 6] = [
        ("gear", CodecParams { bits: Some(4), ..Default::default() }),
        ("gear", CodecParams { bits: Some(2), ..Default::default() }),
        ("gear", CodecParams { bits: Some(4), rank: Some(0), rank_decode: Some(0), ..Default::default() }),
        ("gear", CodecParams { bits: Some(4), outliers: Some(0.0), ..Default::default() }),
        ("group", CodecParams { bits: Some(4), ..Default::default() }),
        ("uniform", CodecParams { bits: Some(4), ..Default::default() }),
    ];
    for (name, p) in cases {
        let id = format!(
            "{name}-bits{}{}{}",
            p.bits.unwrap_or(4),
            if p.rank == Some(0) { "-no-lowrank" } else { "" },
            if p.outliers == Some(0.0) { "-no-outliers" } else { "" }
        );
        g.bench_with_input(BenchmarkId::new(id, BLOCK_TOKENS), &p, |b, p| {
            b.iter(|| {
                let mut codec = make_codec(name, p, N_KV_HEADS, HEAD_DIM, 9).expect("codec");
                codec.append(&k, &v, BLOCK_TOKENS).expect("append");
                codec.bytes()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, gear);
criterion_main!(benches);
