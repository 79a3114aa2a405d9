//! Appending rows to CSV files: the header is written once; a file whose header differs from the
//! row's columns is never appended to (its rows would be misread), the user is told instead.
//!
//! A row is written with one `write` on a file opened for appending, then synced, so a process
//! killed at any point leaves either the whole row or none of it (a torn last line, which only a
//! crash of the machine itself could leave, is detected and set aside by `repair_tail`).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use csv::StringRecord;
use serde::Serialize;

/// The column names of a serializable row, in order.
pub fn columns<T: Serialize>(row: &T) -> Result<Vec<String>> {
    Ok(record_of(row)?.0.iter().map(str::to_string).collect())
}

/// A serializable row as CSV (header, values).
pub fn record_of<T: Serialize>(row: &T) -> Result<(StringRecord, StringRecord)> {
    let mut w = csv::WriterBuilder::new().has_headers(true).from_writer(vec![]);
    w.serialize(row)?;
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut r = csv::ReaderBuilder::new().has_headers(true).from_reader(&bytes[..]);
    let header = r.headers()?.clone();
    let values = r.records().next().context("a row serialized to no record")??;
    Ok((header, values))
}

pub fn append<T: Serialize>(path: &Path, row: &T) -> Result<()> {
    let (header, values) = record_of(row)?;
    append_record(path, &header, &values)
}

fn line_of(rec: &StringRecord) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(vec![]);
    w.write_record(rec)?;
    w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The header of an existing, non-empty CSV file (`None` for a missing or empty file).
pub fn read_header(path: &Path) -> Result<Option<StringRecord>> {
    let Ok(f) = std::fs::File::open(path) else { return Ok(None) };
    let mut first = String::new();
    BufReader::new(f).read_line(&mut first).with_context(|| format!("cannot read {}", path.display()))?;
    if first.trim().is_empty() {
        return Ok(None);
    }
    let mut r = csv::ReaderBuilder::new().has_headers(false).from_reader(first.as_bytes());
    Ok(r.records().next().transpose().with_context(|| format!("{}: unreadable header", path.display()))?)
}

/// Appends one record under `header`, writing the header first when the file is new or empty.
pub fn append_record(path: &Path, header: &StringRecord, values: &StringRecord) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut bytes = Vec::new();
    match read_header(path)? {
        Some(have) if have != *header => bail!(
            "{} has other columns than this row ({}): write to another file with --csv",
            path.display(),
            header.iter().collect::<Vec<_>>().join(",")
        ),
        Some(_) => {}
        None => bytes.extend(line_of(header)?),
    }
    bytes.extend(line_of(values)?);
    let mut f = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(&bytes).with_context(|| format!("cannot append to {}", path.display()))?;
    f.sync_data().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Cuts an unfinished last line (no final newline) off a CSV file and returns its text, so that
/// what follows is appended after whole rows. `None` when the file is missing or ends cleanly.
pub fn repair_tail(path: &Path) -> Result<Option<String>> {
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(path) else { return Ok(None) };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(None);
    }
    let mut all = Vec::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_end(&mut all)?;
    let keep = all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = String::from_utf8_lossy(&all[keep..]).to_string();
    f.set_len(keep as u64).with_context(|| format!("cannot truncate {}", path.display()))?;
    f.sync_data()?;
    Ok(Some(torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        name: String,
        bytes: usize,
    }

    #[test]
    fn appends_refuses_other_columns_and_repairs_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("kvgear-csvlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.csv");
        let _ = std::fs::remove_file(&p);
        append(&p, &Row { name: "a,b".into(), bytes: 1 }).unwrap();
        append(&p, &Row { name: "c".into(), bytes: 2 }).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "name,bytes\n\"a,b\",1\nc,2\n");
        #[derive(Serialize)]
        struct Other {
            name: String,
        }
        assert!(append(&p, &Other { name: "x".into() }).is_err());
        assert_eq!(repair_tail(&p).unwrap(), None);
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"d,3").unwrap();
        assert_eq!(repair_tail(&p).unwrap().as_deref(), Some("d,3"));
        append(&p, &Row { name: "e".into(), bytes: 4 }).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "name,bytes\n\"a,b\",1\nc,2\ne,4\n");
        assert_eq!(columns(&Row { name: "q".into(), bytes: 0 }).unwrap(), ["name", "bytes"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
