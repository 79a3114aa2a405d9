//! Build script: Rust bindings for the kernel parameter structs, and the CUDA kernels.
//!
//! 1. bindgen reads every `ffi/*.h` and writes `$OUT_DIR/ffi.rs` (included by
//!    `src/backend/cuda/ffi.rs`). It needs libclang.
//! 2. nvcc compiles every `cuda/*.cu`, as one translation unit, into one fatbin
//!    (`$OUT_DIR/kernels.fatbin`, embedded with `include_bytes!`): SASS for sm_80, sm_86, sm_89
//!    and sm_90 plus compute_80 PTX that newer GPUs JIT. ptxas' register, shared-memory and
//!    spill report goes to `$OUT_DIR/resource-usage.txt`; any spill is a cargo warning.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `nvcc` on `PATH`,
//! `/usr/local/cuda/bin/nvcc`. Without it the build still succeeds with an empty fatbin (the
//! binary runs on the CPU only and says so), unless the `cuda` feature asks for the kernels.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Real GPU architectures that get SASS; compute_80 PTX is added for anything newer.
const SASS_ARCHS: [&str; 4] = ["80", "86", "89", "90"];
const PTX_ARCH: &str = "80";

/// Environment variables that change how nvcc is found (PATH is added only when it is used).
const NVCC_ENV: [&str; 2] = ["NVCC", "CUDA_HOME"];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let ffi_dir = manifest_dir.join("ffi");
    let cuda_dir = manifest_dir.join("cuda");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=ffi");
    println!("cargo:rerun-if-changed=cuda");
    for var in NVCC_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }

    embed_git_commit(&manifest_dir);
    generate_bindings(&ffi_dir, &out_dir)?;

    // The `cuda` feature, or KVGEAR_REQUIRE_NVCC=1 (CI sets it), makes a missing nvcc an error.
    println!("cargo:rerun-if-env-changed=KVGEAR_REQUIRE_NVCC");
    let require = env::var_os("CARGO_FEATURE_CUDA").is_some()
        || env::var("KVGEAR_REQUIRE_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let fatbin = out_dir.join("kernels.fatbin");
    match find_nvcc()? {
        Some(nvcc) => {
            let version = nvcc_version(&nvcc)?;
            compile_kernels(&nvcc, &ffi_dir, &cuda_dir, &out_dir, &fatbin)?;
            println!("cargo:rustc-env=KVGEAR_NVCC={}", nvcc.display());
            println!("cargo:rustc-env=KVGEAR_NVCC_VERSION={version}");
        }
        None if require => {
            return Err(
                "feature `cuda` requires nvcc, which was not found: set NVCC to its path or \
                 CUDA_HOME to the toolkit (nvcc is $CUDA_HOME/bin/nvcc), or put it on PATH"
                    .into(),
            );
        }
        None => {
            println!(
                "cargo:warning=nvcc not found (NVCC, CUDA_HOME, PATH, /usr/local/cuda): building \
                 without CUDA kernels, the binary runs on the CPU only"
            );
            fs::write(&fatbin, []).map_err(|e| format!("writing {}: {e}", fatbin.display()))?;
            fs::write(
                out_dir.join("resource-usage.txt"),
                "built without CUDA kernels\n",
            )
            .map_err(|e| format!("writing resource-usage.txt: {e}"))?;
            println!("cargo:rustc-env=KVGEAR_NVCC=");
            println!("cargo:rustc-env=KVGEAR_NVCC_VERSION=");
        }
    }
    Ok(())
}

/// Files in `dir` with extension `ext`, sorted so the build is reproducible.
fn sources(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|x| x == ext) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The commit the binary is built from, as `KVGEAR_BUILD_COMMIT` ("unknown" outside a git
/// checkout), so that result rows name the code that computed them rather than whatever the
/// working tree holds when the binary runs. Rebuilt when HEAD or the branch it names moves.
fn embed_git_commit(manifest_dir: &Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(manifest_dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", dir.join("packed-refs").display());
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(r).display());
        }
    }
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=KVGEAR_BUILD_COMMIT={commit}");
}

fn generate_bindings(ffi_dir: &Path, out_dir: &Path) -> Result<(), String> {
    let headers = sources(ffi_dir, "h")?;
    let mut builder = bindgen::Builder::default()
        .use_core()
        .allowlist_type("Kv.*")
        .allowlist_var("KV_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .clang_arg(format!("-I{}", ffi_dir.display()));
    for header in &headers {
        builder = builder.header(header.to_string_lossy());
    }
    // bindgen panics when it cannot load libclang; turn that into an error that says what to
    // install, without the panic's own backtrace noise.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // AssertUnwindSafe: the builder is consumed by the call and never seen again after a panic.
    let generated =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    std::panic::set_hook(previous_hook);
    let bindings = match generated {
        Ok(Ok(bindings)) => bindings,
        Ok(Err(e)) => {
            return Err(format!(
                "bindgen failed on ffi/*.h: {e}\n(if a standard header such as <stdint.h> or \
                 <stddef.h> is missing: apt-get install libclang-common-14-dev libc6-dev)"
            ))
        }
        Err(_) => {
            return Err(
                "bindgen could not load libclang, which it needs to read ffi/*.h: \
                 apt-get install libclang1-14 libclang-common-14-dev (or libclang-dev), or set \
                 LIBCLANG_PATH to the folder holding libclang.so"
                    .into(),
            )
        }
    };
    let out = out_dir.join("ffi.rs");
    bindings
        .write_to_file(&out)
        .map_err(|e| format!("writing {}: {e}", out.display()))
}

fn find_nvcc() -> Result<Option<PathBuf>, String> {
    if let Some(path) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(Some(path))
        } else {
            Err(format!(
                "NVCC is set to {}, which is not a file",
                path.display()
            ))
        };
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(home).join("bin").join("nvcc");
        if path.is_file() {
            return Ok(Some(path));
        }
        println!(
            "cargo:warning=CUDA_HOME is set but {} does not exist; looking further",
            path.display()
        );
    }
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let path = dir.join("nvcc");
            if path.is_file() {
                return Ok(Some(path));
            }
        }
    }
    let path = PathBuf::from("/usr/local/cuda/bin/nvcc");
    Ok(path.is_file().then_some(path))
}

/// nvcc's release line, e.g. "Cuda compilation tools, release 13.0, V13.0.88".
fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {} --version: {e}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .or_else(|| text.lines().last())
        .unwrap_or("")
        .trim()
        .to_string())
}

fn compile_kernels(
    nvcc: &Path,
    ffi_dir: &Path,
    cuda_dir: &Path,
    out_dir: &Path,
    fatbin: &Path,
) -> Result<(), String> {
    // One translation unit holding every kernel file: a fatbin carries one module per
    // architecture, so this is how several .cu files end up in one loadable fatbin without
    // relocatable device code.
    let mut unity =
        String::from("// Generated by build.rs: every cuda/*.cu in one translation unit.\n");
    for file in sources(cuda_dir, "cu")? {
        writeln!(unity, "#include \"{}\"", file.display()).map_err(|e| e.to_string())?;
    }
    let unity_path = out_dir.join("kernels.cu");
    fs::write(&unity_path, unity).map_err(|e| format!("writing {}: {e}", unity_path.display()))?;

    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args([
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "--resource-usage",
            "--threads",
            "0",
        ])
        .arg(format!("-I{}", ffi_dir.display()))
        .arg(format!("-I{}", cuda_dir.display()));
    for arch in SASS_ARCHS {
        cmd.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    cmd.arg(format!(
        "-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"
    ));
    cmd.arg("-o").arg(fatbin).arg(&unity_path);

    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("nvcc failed ({}):\n{cmd:?}\n{report}", out.status));
    }
    let usage = out_dir.join("resource-usage.txt");
    fs::write(&usage, &report).map_err(|e| format!("writing {}: {e}", usage.display()))?;

    for line in report.lines() {
        let lower = line.to_ascii_lowercase();
        if lower.contains("warning") {
            println!("cargo:warning=nvcc: {}", line.trim());
        }
        if spills(line) {
            println!(
                "cargo:warning=register spill in the CUDA kernels ({}): {}",
                usage.display(),
                line.trim()
            );
        }
    }
    Ok(())
}

/// True for a ptxas line such as "8 bytes stack frame, 4 bytes spill stores, 4 bytes spill
/// loads" with a non-zero spill count.
fn spills(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(3).any(|w| {
        w[1] == "bytes" && w[2].starts_with("spill") && w[0].parse::<u64>().is_ok_and(|n| n > 0)
    })
}
