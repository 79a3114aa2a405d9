//! `cargo bench --bench cuda`: the CUDA kernels' microbenchmarks (what `kvgear selftest --bench`
//! prints): every GEMV type at Llama2-7B sizes next to the device's copy bandwidth measured in the
//! same run, the tensor-core GEMM's TFLOP/s, fp16 attention with and without the mass output, the
//! compressed-codec attention and GEAR compression, and the elementwise kernels, each in GB/s with
//! its speedup over the `_naive` baseline. Timed with CUDA events (median of `KVGEAR_BENCH_ITERS`
//! launches, default 50, after a warm-up). On a machine without a CUDA device or without embedded
//! kernels it says so and exits successfully.

use kvgear::backend::cuda::{selftest, CudaRuntime};

fn main() {
    let iters = std::env::var("KVGEAR_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let rt = match CudaRuntime::new(0) {
        Ok(rt) => rt,
        Err(e) => {
            println!("skipped: no CUDA device ({e:#})");
            return;
        }
    };
    match selftest::microbench(&rt, iters, 1) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
