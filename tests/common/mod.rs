//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model if it is in the cache; `None` (with a message) otherwise.
pub fn default_model() -> Option<PathBuf> {
    let p = kvgear::fetch::default_model_path().ok()?;
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: the default model is not at {} (run `kvgear fetch`)", p.display());
        None
    }
}

/// A file under `../shared/` (the project's shared data); `None` with a message when absent.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

/// A fresh path in the temp directory for this test.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvgear-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}
