//! The layer kernels of `cuda/layers.cu` against `backend::cpu::reference`, on the GPU when
//! there is one (the same checks `kvgear selftest` runs), and the build's fatbin everywhere.

use kvgear::backend::cuda::{self, selftest, Unavailable};

/// The seed comes from KVGEAR_SEED when set (to reproduce a failure), else from the clock; it is
/// printed either way.
fn seed() -> u64 {
    match std::env::var("KVGEAR_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("KVGEAR_SEED={s} is not an unsigned integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

#[test]
fn layer_kernels_match_the_cpu_reference() {
    let seed = seed();
    let lines = match selftest::run(seed) {
        Ok(lines) => lines,
        Err(e) if e.downcast_ref::<selftest::Skipped>().is_some() => {
            println!("{e}");
            return;
        }
        Err(e)
            if matches!(
                e.downcast_ref::<Unavailable>(),
                Some(Unavailable::NoKernels)
            ) && !cfg!(feature = "cuda") =>
        {
            println!("skipped: built without CUDA kernels");
            return;
        }
        Err(e) => panic!("selftest could not run (seed {seed}): {e:#}"),
    };
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| !l.pass)
        .map(|l| l.to_string())
        .collect();
    for line in &lines {
        println!("{line}");
    }
    assert!(!lines.is_empty());
    assert!(
        failed.is_empty(),
        "{} of {} checks failed (seed {seed}):\n{}",
        failed.len(),
        lines.len(),
        failed.join("\n")
    );
}

/// The magic number that opens a CUDA fatbin (0xBA55ED50, little-endian).
const FATBIN_MAGIC: [u8; 4] = [0x50, 0xed, 0x55, 0xba];

#[test]
fn fatbin_is_embedded_when_nvcc_was_found() {
    let nvcc_found = cuda::nvcc_version().is_some();
    if cfg!(feature = "cuda") {
        assert!(
            nvcc_found,
            "feature `cuda` is on, so build.rs must have found nvcc"
        );
    }
    let fatbin = cuda::fatbin();
    if nvcc_found {
        assert!(cuda::kernels_embedded());
        assert!(fatbin.len() > 1024, "fatbin is only {} bytes", fatbin.len());
        assert_eq!(
            fatbin[..4],
            FATBIN_MAGIC,
            "the embedded kernels do not start with the fatbin magic"
        );
        for kernel in [
            "kv_rmsnorm_f32",
            "kv_rope_f32",
            "kv_silu_mul_f32",
            "kv_add_f32",
            "kv_argmax_f32",
        ] {
            assert!(
                cuda::RESOURCE_USAGE.contains(kernel),
                "{kernel} is missing from the ptxas report"
            );
        }
    } else {
        assert!(!cuda::kernels_embedded());
        println!("built without CUDA kernels (nvcc not found at build time)");
    }
}

#[test]
fn no_device_means_a_clear_error_not_a_panic() {
    match cuda::CudaRuntime::new(usize::MAX) {
        Ok(_) => panic!("device ordinal usize::MAX cannot exist"),
        Err(e) => {
            let u = e.downcast_ref::<Unavailable>();
            assert!(
                matches!(
                    u,
                    Some(Unavailable::NoDriver | Unavailable::NoDevice { .. })
                ),
                "unexpected error: {e:#}"
            );
        }
    }
}
