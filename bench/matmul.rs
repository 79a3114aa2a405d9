//! `cargo bench --bench matmul`: the CPU matmul per quant type, reference vs fast, decode (one
//! token) and prefill (a block of tokens), reported as weight bytes read per second; Q4_0 also in
//! the 16-row layout the CPU backend repacks it to (`packed`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use kvgear::backend::cpu::{fast, packed, reference};
use kvgear::format::quant::{quantize, GgmlType};
use kvgear::model::weights::Tensor;
use kvgear::rng::Rng;

fn tensor(ty: GgmlType, n_cols: usize, n_rows: usize, rng: &mut Rng) -> Tensor {
    let rb = ty.row_bytes(n_cols).expect("shape fits the type");
    let mut bytes = vec![0u8; rb * n_rows];
    let mut row = vec![0.0f32; n_cols];
    for dst in bytes.chunks_mut(rb) {
        row.iter_mut().for_each(|v| *v = rng.normal() * 0.02);
        quantize(ty, &row, dst).expect("quantize");
    }
    Tensor::from_bytes("w", ty, n_cols, n_rows, bytes).expect("tensor")
}

fn matmul(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    // Llama2-7B's attention projection width, and the default model's FFN shape.
    let shapes = [(4096usize, 4096usize), (576, 1536)];
    for (n_cols, n_rows) in shapes {
        let mut g = c.benchmark_group(format!("matmul_{n_cols}x{n_rows}"));
        g.sample_size(10);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::F16] {
            let w = tensor(ty, n_cols, n_rows, &mut rng);
            for n_tokens in [1usize, 64] {
                let x: Vec<f32> = (0..n_cols * n_tokens).map(|_| rng.normal()).collect();
                let mut out = vec![0.0f32; n_rows * n_tokens];
                g.throughput(Throughput::Bytes((w.n_bytes() * n_tokens) as u64));
                g.bench_with_input(BenchmarkId::new(format!("fast/{ty}"), n_tokens), &n_tokens, |b, &n| {
                    b.iter(|| fast::matmul(&w, &x, n, &mut out).expect("matmul"))
                });
                if packed::PackedQ4_0::fits(&w) {
                    let p = packed::PackedQ4_0::new(&w).expect("repack");
                    g.bench_with_input(BenchmarkId::new(format!("fast/{ty}-packed16"), n_tokens), &n_tokens, |b, &n| {
                        b.iter(|| packed::matmul(&p, &x, n, &mut out).expect("matmul"))
                    });
                }
                if n_tokens == 1 && n_cols <= 576 {
                    g.bench_with_input(BenchmarkId::new(format!("reference/{ty}"), n_tokens), &n_tokens, |b, &n| {
                        b.iter(|| reference::matmul(&w, &x, n, &mut out).expect("matmul"))
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, matmul);
criterion_main!(benches);
