//! The compressed KV codecs on the device (uniform, group, gear: cuda/gear.cu and
//! cuda/attention_quant.cu) against the CPU codec and StrategyLayer's attention, the same checks
//! `kvgear selftest` runs, when there is a GPU; and the build's resource report everywhere.

use kvgear::backend::cuda::{self, kvcodec, selftest, Unavailable};

/// The seed comes from KVGEAR_SEED when set (to reproduce a failure), else from the clock; it is
/// printed either way.
fn seed() -> u64 {
    match std::env::var("KVGEAR_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("KVGEAR_SEED={s} is not an unsigned integer")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0),
    }
}

#[test]
fn device_kv_codecs_match_the_cpu_codec() {
    let seed = seed();
    let rt = match selftest::open(0) {
        Ok(rt) => rt,
        Err(e) if e.downcast_ref::<selftest::Skipped>().is_some() => {
            println!("{e}");
            return;
        }
        Err(e) if matches!(e.downcast_ref::<Unavailable>(), Some(Unavailable::NoKernels)) && !cfg!(feature = "cuda") => {
            println!("skipped: built without CUDA kernels");
            return;
        }
        Err(e) => panic!("could not open the CUDA device (seed {seed}): {e:#}"),
    };
    let lines = kvcodec::check::checks(&rt, seed);
    for l in &lines {
        println!("{l}");
    }
    let failed: Vec<String> = lines.iter().filter(|l| !l.pass).map(|l| l.to_string()).collect();
    assert!(lines.len() > 40, "only {} checks ran", lines.len());
    assert!(failed.is_empty(), "{} of {} checks failed (seed {seed}):\n{}", failed.len(), lines.len(), failed.join("\n"));
}

/// Per kernel name, the (registers, stack bytes, spill bytes) of every architecture ptxas
/// reported.
fn report() -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in cuda::RESOURCE_USAGE.lines() {
        if let Some(at) = line.find("Function properties for ") {
            current = Some(line[at + "Function properties for ".len()..].trim().to_string());
            continue;
        }
        let Some(name) = current.as_ref() else { continue };
        if line.contains("bytes stack frame") {
            let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
            if let [stack, stores, loads, ..] = nums[..] {
                out.push((name.clone(), stack, stores + loads));
            }
        }
    }
    out
}

#[test]
fn kernels_are_built_and_the_decode_path_does_not_spill() {
    if !cuda::kernels_embedded() {
        assert!(!cfg!(feature = "cuda"), "feature `cuda` is on but no kernels are embedded");
        println!("built without CUDA kernels (nvcc not found at build time)");
        return;
    }
    let rep = report();
    for k in kvcodec::KERNELS {
        assert!(rep.iter().any(|(n, ..)| n == k), "{k} is missing from the ptxas report");
    }
    for k in kvcodec::DECODE_PATH_KERNELS {
        for (n, stack, spill) in rep.iter().filter(|(n, ..)| n == k) {
            assert_eq!((*stack, *spill), (0, 0), "{n} uses local memory on the decode path ({stack} bytes stack, {spill} bytes spilled)");
        }
    }
}
