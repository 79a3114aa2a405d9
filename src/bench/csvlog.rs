//! Appending rows to CSV files: the header is written once; a file whose header differs from the
//! row's columns is never appended to (its rows would be misread), the user is told instead.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The column names of a serializable row, in order.
pub fn columns<T: Serialize>(row: &T) -> Result<Vec<String>> {
    let v = serde_json::to_value(row)?;
    let obj = v.as_object().context("a CSV row must serialize as a struct")?;
    Ok(obj.keys().cloned().collect())
}

pub fn append<T: Serialize>(path: &Path, row: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut want_header = true;
    if let Ok(f) = std::fs::File::open(path) {
        let mut first = String::new();
        BufReader::new(f).read_line(&mut first)?;
        if !first.trim().is_empty() {
            want_header = false;
            let mut w = csv::WriterBuilder::new().has_headers(true).from_writer(vec![]);
            w.serialize(row)?;
            let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = String::from_utf8_lossy(&bytes);
            let header = text.lines().next().unwrap_or("");
            if header.trim() != first.trim() {
                bail!(
                    "{} has other columns than this row ({}): write to another file with --csv",
                    path.display(),
                    header
                );
            }
        }
    }
    let f = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut w = csv::WriterBuilder::new().has_headers(want_header).from_writer(f);
    w.serialize(row)?;
    w.flush()?;
    Ok(())
}
