//! `kvgear sweep` as users run it: killed with SIGKILL in the middle and restarted, every point
//! of the grid ends up in the CSV exactly once; shards partition the grid and concatenate.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvgear::format::quant::GgmlType;
use kvgear::model::config::Config;

fn kvgear() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvgear"));
    // Model hashes are cached under the cache directory: keep the test's own.
    c.env("KVGEAR_HOME", common::temp_path("home"));
    c
}

/// Data rows of a CSV (the header excluded); 0 when it does not exist yet.
fn data_rows(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count().saturating_sub(1)).unwrap_or(0)
}

/// The `point` column of every row, with how many times each occurs.
fn point_counts(p: &Path) -> HashMap<String, usize> {
    let mut r = csv::Reader::from_path(p).unwrap();
    let col = r.headers().unwrap().iter().position(|h| h == "point").expect("a point column");
    let mut m = HashMap::new();
    for rec in r.records() {
        *m.entry(rec.unwrap()[col].to_string()).or_insert(0) += 1;
    }
    m
}

fn all_points(grid: &Path) -> Vec<String> {
    kvgear::bench::sweep::load_grid(grid).unwrap().points.iter().map(|p| p.key()).collect()
}

/// Starts the sweep, waits until the CSV has `kill_after` rows, kills it with SIGKILL.
fn run_and_kill(grid: &Path, csv: &Path, kill_after: usize) {
    let mut child = kvgear().args(["sweep", "--quiet", "--threads", "1", "--grid"]).arg(grid).stdout(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while data_rows(csv) < kill_after {
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended before it could be killed (grid too small or a point failed)");
        assert!(t0.elapsed() < Duration::from_secs(300), "the sweep made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the sweep was not killed by SIGKILL: {status:?}");
}

#[test]
fn a_sweep_killed_with_sigkill_resumes_and_runs_every_point_exactly_once() {
    let model = common::temp_path("sweep-tiny.gguf");
    kvgear::synth::write(&Config::named("tiny").unwrap(), "tiny", GgmlType::Q8_0, GgmlType::Q8_0, false, 7, &model).unwrap();
    let grid = common::temp_path("kill.toml");
    let csv: PathBuf = grid.with_extension("csv");
    std::fs::write(
        &grid,
        format!(
            r#"workload = "bench"
[options]
model = "{}"
prompt_tokens = 96
gen_tokens = 24
batch = 32
[[grid]]
strategy = ["fp16", "uniform", "group", "gear", "h2o", "sieve", "window", "gear-h2o", "gear-sieve", "group-h2o"]
bits = [2, 4]
budget = [0.25, 0.5]
"#,
            model.display()
        ),
    )
    .unwrap();
    let points = all_points(&grid);
    assert_eq!(points.len(), 1 + 3 * 2 + 3 * 2 + 3 * 4, "fp16; uniform, group, gear x bits; h2o, sieve, window x budgets; the pairs x both");
    run_and_kill(&grid, &csv, 3);
    let first = data_rows(&csv);
    assert!(first >= 3 && first < points.len(), "{first} rows after the first kill");
    run_and_kill(&grid, &csv, first + 4);
    let second = data_rows(&csv);
    assert!(second > first && second < points.len(), "{second} rows after the second kill");
    let out = kvgear().args(["sweep", "--quiet", "--threads", "1", "--grid"]).arg(&grid).output().unwrap();
    assert!(out.status.success(), "resumed sweep failed: {}", String::from_utf8_lossy(&out.stderr));
    let counts = point_counts(&csv);
    for p in &points {
        assert_eq!(counts.get(p), Some(&1), "point {p} appears {:?} times", counts.get(p));
    }
    assert_eq!(counts.len(), points.len(), "rows for points outside the grid");
    // A finished sweep run again has nothing to do and appends nothing.
    let out = kvgear().args(["sweep", "--quiet", "--grid"]).arg(&grid).output().unwrap();
    assert!(out.status.success());
    assert_eq!(data_rows(&csv), points.len());
}

#[test]
fn shards_partition_the_grid_and_their_csvs_concatenate() {
    let grid = common::temp_path("shards.toml");
    std::fs::write(
        &grid,
        r#"workload = "memory"
[options]
config = "llama2-7b"
[[grid]]
strategy = ["fp16", "gear", "gear-h2o"]
ctx = [1024, 4096]
batch = [1, 8]
"#,
    )
    .unwrap();
    let points = all_points(&grid);
    assert_eq!(points.len(), 12);
    let mut merged = HashMap::new();
    for k in 0..3 {
        let out = kvgear().args(["sweep", "--quiet", "--shard", &format!("{k}/3"), "--grid"]).arg(&grid).output().unwrap();
        assert!(out.status.success(), "shard {k}: {}", String::from_utf8_lossy(&out.stderr));
        let csv = grid.with_file_name(format!("shards.shard-{k}-of-3.csv"));
        assert_eq!(data_rows(&csv), 4, "shard {k} runs every third point");
        for (p, n) in point_counts(&csv) {
            *merged.entry(p).or_insert(0) += n;
        }
    }
    assert_eq!(merged.len(), points.len());
    assert!(merged.values().all(|&n| n == 1));
    let bad = kvgear().args(["sweep", "--shard", "3/3", "--grid"]).arg(&grid).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("0 <= K < N"));
}

#[test]
fn an_eval_grid_runs_each_strategy_against_fp16_and_resumes() {
    let (Some(cot), Some(train), Some(model)) = (common::shared("data/gsm8k/cot_8shot.txt"), common::shared("data/gsm8k/train.jsonl"), common::default_model()) else {
        return;
    };
    // Two exemplars and two problems, four new tokens each: a small eval per point.
    let data = common::temp_path("sweep-eval-data");
    std::fs::create_dir_all(data.join("gsm8k")).unwrap();
    let cot = std::fs::read_to_string(cot).unwrap();
    std::fs::write(data.join("gsm8k/cot_8shot.txt"), cot.split("\n\n").take(2).collect::<Vec<_>>().join("\n\n")).unwrap();
    let train = std::fs::read_to_string(train).unwrap();
    std::fs::write(data.join("gsm8k/train.jsonl"), train.lines().take(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let out = common::temp_path("sweep-eval-out");
    let _ = std::fs::remove_dir_all(&out);
    let grid = common::temp_path("sweep-eval.toml");
    let csv = common::temp_path("sweep-eval.csv");
    let _ = std::fs::remove_file(&csv);
    std::fs::write(
        &grid,
        format!(
            "workload = \"eval\"\n[options]\nmodel = \"{}\"\ntask = \"gsm8k:train\"\ndata = \"{}\"\nout = \"{}\"\nlimit = 2\nmax_new_tokens = 4\nvs = \"fp16\"\n[[grid]]\nstrategy = [\"fp16\", \"gear\"]\n",
            model.display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    for _ in 0..2 {
        let st = kvgear().args(["sweep", "--quiet", "--threads", "2", "--grid"]).arg(&grid).arg("--csv").arg(&csv).stdout(Stdio::null()).status().unwrap();
        assert!(st.success(), "sweep failed: {st:?}");
    }
    let mut r = csv::Reader::from_path(&csv).unwrap();
    let h = r.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
    let col = |row: &csv::StringRecord, name: &str| row[h.iter().position(|c| c == name).unwrap_or_else(|| panic!("no column {name}"))].to_string();
    assert_eq!(rows.len(), 2, "one row per point, the second sweep ran nothing");
    assert_eq!(col(&rows[0], "strategy"), "fp16");
    assert_eq!(col(&rows[0], "agreement"), "", "fp16 is its own baseline");
    assert_eq!(col(&rows[1], "strategy"), "gear");
    assert_eq!(col(&rows[1], "n_examples"), "2");
    assert_eq!(col(&rows[1], "n_compared"), "2");
    let agreement: f64 = col(&rows[1], "agreement").parse().unwrap();
    assert!((0.0..=1.0).contains(&agreement));
    // Each point's examples are in its run's JSONL, which a rerun of the point would resume.
    let jsonls = std::fs::read_dir(&out).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "jsonl")).count();
    assert_eq!(jsonls, 2);
}
