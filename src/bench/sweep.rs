//! `kvgear sweep --grid GRID.toml`: a grid of strategies, parameters, models and workloads, run as
//! cartesian products, one CSV row per point, appended as each point finishes.
//!
//! A grid file names one workload (`compare`, `bench`, `memory` or `eval`),
//! fixed `[options]` and one or more `[[grid]]` blocks. Every key is the workload command's own
//! flag without its dashes (`max_tokens` is `--max-tokens`), a `--kv` parameter (`bits`,
//! `budget`, ...), `strategy`, or `model` (`"default"` for the default model); in a block, a list
//! is an axis. Each block is the cartesian product of its axes; the grid is the blocks in order.
//!
//! ```toml
//! workload = "compare"
//! [options]
//! file = "../shared/reference/gsm8k_train_250.txt"
//! max_tokens = 1024
//! [[grid]]
//! strategy = ["fp16", "gear", "h2o", "gear-h2o"]
//! bits = [2, 4]
//! budget = [0.2, 0.5]
//! ```
//!
//! A `--kv` parameter a strategy does not take is left out of that strategy's points (fp16 has no
//! bits, h2o no bits, gear no budget), and points made identical by that are run once: the block
//! above is 1 + 2 + 2 + 4 = 9 points. Every point is checked (flags parsed, strategy built) before
//! the first one runs.
//!
//! Resuming: each row carries its point's canonical key (`point`: every setting, sorted). On
//! start the CSV's keys are read and finished points are skipped, so a sweep killed at any moment
//! and restarted runs every point exactly once (rows are written whole, see `csvlog`). A lock on
//! the CSV keeps two processes from running the same file. `--shard K/N` runs the points whose
//! index is K mod N (K from 0), into its own CSV by default; shards' CSVs share the header and
//! concatenate.
//!
//! An `eval` point is `kvgear eval` with the point's flags: its examples go to the run's own JSONL
//! in `out` (so a killed sweep also resumes inside a point), and its row is the run's summary
//! (over all its tasks when it names several), agreement included with `vs = "fp16"`.
//!
//! Adding a workload: a `PointArgs` variant holding the command's clap args, one arm in
//! `PointArgs::parse` and one in `PointArgs::run` returning its row.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use csv::StringRecord;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::memory::{MemoryArgs, MemoryRow};
use super::{csvlog, BenchArgs, CompareArgs};
use crate::eval::EvalArgs;
use crate::kv::strategy::{takes, StrategySpec, PARAMS};
use crate::model::Model;

/// Workloads a grid can name.
pub const WORKLOADS: [&str; 4] = ["compare", "bench", "memory", "eval"];

/// Keys the sweep itself owns: a grid may not set them per point.
const RESERVED: [&str; 6] = ["csv", "no_csv", "json", "quiet", "threads", "kv"];

#[derive(clap::Args, Clone, Debug)]
pub struct SweepArgs {
    /// The grid file (TOML).
    #[arg(long)]
    pub grid: PathBuf,
    /// Run only the points whose index is K mod N (K from 0 to N-1), e.g. `--shard 3/8`.
    #[arg(long)]
    pub shard: Option<String>,
    /// CSV the rows go to (default: the grid's `csv`, else the grid file with `.csv`; with
    /// `--shard K/N`, `.shard-K-of-N` before the extension).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// List the points (done or to run) and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bars and no per-point lines.
    #[arg(long)]
    pub quiet: bool,
    /// Print each finished point as one JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    workload: String,
    csv: Option<PathBuf>,
    #[serde(default)]
    options: toml::Table,
    grid: Vec<toml::Table>,
}

/// One setting of a point.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Val::Str(s) => f.write_str(s),
            Val::Int(i) => write!(f, "{i}"),
            Val::Float(x) => write!(f, "{x}"),
            Val::Bool(b) => write!(f, "{b}"),
        }
    }
}

fn scalar(v: &toml::Value, what: &str) -> Result<Val> {
    Ok(match v {
        toml::Value::String(s) => Val::Str(s.clone()),
        toml::Value::Integer(i) => Val::Int(*i),
        toml::Value::Float(x) => Val::Float(*x),
        toml::Value::Boolean(b) => Val::Bool(*b),
        _ => bail!("{what}: expected a string, number or boolean, got {v}"),
    })
}

/// One point of a grid: its workload and settings, sorted by key.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub workload: String,
    pub settings: Vec<(String, Val)>,
}

impl Point {
    /// The canonical key written in the `point` column: `workload=...;key=value;...`, sorted.
    pub fn key(&self) -> String {
        let mut parts = vec![format!("workload={}", self.workload)];
        parts.extend(self.settings.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(";")
    }

    /// The workload command's arguments for this point.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = Vec::new();
        let kv: Vec<String> =
            self.settings.iter().filter(|(k, _)| PARAMS.contains(&k.as_str())).map(|(k, v)| format!("{k}={v}")).collect();
        if !kv.is_empty() {
            argv.push("--kv".to_string());
            argv.push(kv.join(","));
        }
        for (k, v) in &self.settings {
            if PARAMS.contains(&k.as_str()) || (k == "model" && *v == Val::Str("default".into())) {
                continue;
            }
            let flag = format!("--{}", k.replace('_', "-"));
            match v {
                Val::Bool(true) => argv.push(flag),
                Val::Bool(false) => {}
                v => {
                    argv.push(flag);
                    argv.push(v.to_string());
                }
            }
        }
        argv
    }
}

/// A loaded grid: its points in run order (duplicates removed).
pub struct Grid {
    pub path: PathBuf,
    pub workload: String,
    pub csv: Option<PathBuf>,
    pub points: Vec<Point>,
}

/// Reads and expands a grid file.
pub fn load_grid(path: &Path) -> Result<Grid> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read grid {}", path.display()))?;
    let g: GridFile = toml::from_str(&text).with_context(|| format!("grid {}", path.display()))?;
    let points = expand(&g.workload, &g.options, &g.grid).with_context(|| format!("grid {}", path.display()))?;
    Ok(Grid { path: path.to_path_buf(), workload: g.workload, csv: g.csv, points })
}

/// The points of a grid: each block's cartesian product (first axis outermost: `model`, then
/// `strategy`, then the other keys by name), in block order, with the `--kv` parameters a
/// strategy does not take left out and repeated points dropped.
pub fn expand(workload: &str, options: &toml::Table, blocks: &[toml::Table]) -> Result<Vec<Point>> {
    if !WORKLOADS.contains(&workload) {
        bail!("unknown workload '{workload}' ({})", WORKLOADS.join(", "));
    }
    if blocks.is_empty() {
        bail!("no [[grid]] block");
    }
    let check_key = |k: &str| -> Result<()> {
        if RESERVED.contains(&k) {
            bail!("'{k}' is set by `kvgear sweep` itself, not per point (kv parameters are keys of their own: bits = [2, 4])");
        }
        if k == "workload" {
            bail!("'workload' belongs at the top of the grid file");
        }
        Ok(())
    };
    let mut fixed = Vec::new();
    for (k, v) in options {
        check_key(k)?;
        if v.is_array() {
            bail!("[options] {k}: a list is an axis and belongs in a [[grid]] block");
        }
        fixed.push((k.clone(), scalar(v, &format!("[options] {k}"))?));
    }
    let mut points = Vec::new();
    let mut seen = HashSet::new();
    for (bi, block) in blocks.iter().enumerate() {
        let mut axes: Vec<(String, Vec<Val>)> = fixed.iter().filter(|(k, _)| !block.contains_key(k)).map(|(k, v)| (k.clone(), vec![v.clone()])).collect();
        for (k, v) in block {
            check_key(k)?;
            let what = format!("[[grid]] block {} key {k}", bi + 1);
            let vals = match v {
                toml::Value::Array(a) if a.is_empty() => bail!("{what}: an empty list makes no points"),
                toml::Value::Array(a) => a.iter().map(|x| scalar(x, &what)).collect::<Result<Vec<_>>>()?,
                v => vec![scalar(v, &what)?],
            };
            axes.push((k.clone(), vals));
        }
        let rank = |k: &str| match k {
            "model" => 0,
            "strategy" => 1,
            _ => 2,
        };
        axes.sort_by(|a, b| (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0)));
        if !axes.iter().any(|(k, _)| k == "strategy") {
            bail!("[[grid]] block {} has no strategy", bi + 1);
        }
        let mut combos: Vec<Vec<(String, Val)>> = vec![Vec::new()];
        for (k, vals) in &axes {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    vals.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        for combo in combos {
            let strategy = match combo.iter().find(|(k, _)| k == "strategy") {
                Some((_, Val::Str(s))) => s.clone(),
                _ => bail!("[[grid]] block {}: strategy must be a name", bi + 1),
            };
            let mut settings = Vec::new();
            for (k, v) in combo {
                if PARAMS.contains(&k.as_str()) && !takes(&strategy, &k)? {
                    continue;
                }
                settings.push((k, v));
            }
            settings.sort_by(|a, b| a.0.cmp(&b.0));
            let p = Point { workload: workload.to_string(), settings };
            if seen.insert(p.key()) {
                points.push(p);
            }
        }
    }
    Ok(points)
}

/// `K/N` with `0 <= K < N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (k, n) = s.split_once('/').with_context(|| format!("--shard {s}: expected K/N, e.g. 0/8"))?;
    let k: usize = k.trim().parse().with_context(|| format!("--shard {s}: K is not a whole number"))?;
    let n: usize = n.trim().parse().with_context(|| format!("--shard {s}: N is not a whole number"))?;
    if n == 0 || k >= n {
        bail!("--shard {s}: needs N >= 1 and 0 <= K < N");
    }
    Ok((k, n))
}

/// The points of shard `k` of `n`: every point whose index is `k` mod `n`.
pub fn shard_points(points: &[Point], k: usize, n: usize) -> Vec<(usize, &Point)> {
    points.iter().enumerate().filter(|(i, _)| i % n == k).collect()
}

/// A point's parsed command arguments.
pub enum PointArgs {
    Compare(CompareArgs),
    Bench(BenchArgs),
    Memory(MemoryArgs),
    Eval(EvalArgs),
}

fn parse_as<T: clap::Args + clap::FromArgMatches>(name: &'static str, argv: &[String]) -> Result<T> {
    let cmd = T::augment_args(clap::Command::new(name).no_binary_name(true));
    let m = cmd.try_get_matches_from(argv).map_err(|e| anyhow!("{}", e.render().to_string().trim_end()))?;
    Ok(T::from_arg_matches(&m)?)
}

impl PointArgs {
    /// Parses a point's settings as its workload's flags and checks its strategy.
    pub fn parse(p: &Point) -> Result<PointArgs> {
        let argv = p.argv();
        let args = match p.workload.as_str() {
            "compare" => PointArgs::Compare(parse_as("compare", &argv)?),
            "bench" => PointArgs::Bench(parse_as("bench", &argv)?),
            "memory" => PointArgs::Memory(parse_as("memory", &argv)?),
            "eval" => PointArgs::Eval(parse_as("eval", &argv)?),
            w => bail!("unknown workload '{w}'"),
        };
        match &args {
            PointArgs::Compare(a) => StrategySpec::parse(&a.strategy, &a.kv, a.seed).map(|_| ()),
            PointArgs::Bench(a) => StrategySpec::parse(&a.strategy, &a.kv, a.seed).map(|_| ()),
            PointArgs::Memory(a) => super::memory::report(a).map(|_| ()),
            PointArgs::Eval(a) => StrategySpec::parse(&a.strategy, &a.kv, a.seed).map(|_| ()),
        }?;
        Ok(args)
    }

    fn model(&self) -> Option<&Path> {
        match self {
            PointArgs::Compare(a) => a.model.as_deref(),
            PointArgs::Bench(a) => a.model.as_deref(),
            PointArgs::Memory(_) => None,
            PointArgs::Eval(a) => a.model.as_deref(),
        }
    }

    /// The in-memory quantization the point asks for (`quantize`).
    fn quantize(&self) -> Option<&str> {
        match self {
            PointArgs::Compare(a) => a.quantize.as_deref(),
            PointArgs::Bench(a) => a.quantize.as_deref(),
            PointArgs::Memory(_) => None,
            PointArgs::Eval(a) => a.quantize.as_deref(),
        }
    }

    /// Runs the point; returns its row as (header, values) and as JSON.
    fn run(&self, models: &mut ModelCache, bar: &ProgressBar) -> Result<(StringRecord, StringRecord, serde_json::Value)> {
        fn out<T: serde::Serialize>(row: &T) -> Result<(StringRecord, StringRecord, serde_json::Value)> {
            let (h, v) = csvlog::record_of(row)?;
            Ok((h, v, serde_json::to_value(row)?))
        }
        match self {
            PointArgs::Compare(a) => {
                let (path, model) = models.get(self.model(), self.quantize())?;
                out(&super::compare_row(a, model, path, bar)?)
            }
            PointArgs::Bench(a) => {
                let (path, model) = models.get(self.model(), self.quantize())?;
                out(&super::bench_row(a, model, path, bar)?)
            }
            PointArgs::Memory(a) => out(&MemoryRow::from(super::memory::report(a)?)),
            PointArgs::Eval(a) => {
                let (path, model) = models.get(self.model(), self.quantize())?;
                out(&crate::eval::sweep_row(a, model, path)?)
            }
        }
    }
}

/// The last model loaded, with its in-memory quantization (points are ordered with the model
/// outermost, so each loads once).
#[derive(Default)]
struct ModelCache {
    arg: Option<(Option<PathBuf>, Option<String>)>,
    loaded: Option<(PathBuf, Model)>,
}

impl ModelCache {
    fn get(&mut self, arg: Option<&Path>, quantize: Option<&str>) -> Result<(&Path, &Model)> {
        let want = (arg.map(Path::to_path_buf), quantize.map(str::to_string));
        if self.arg.as_ref() != Some(&want) || self.loaded.is_none() {
            self.loaded = None;
            let path = crate::fetch::resolve_model(arg)?;
            let model = crate::quantize::load_model(&path, quantize)?;
            self.loaded = Some((path, model));
            self.arg = Some(want);
        }
        let (p, m) = self.loaded.as_ref().expect("loaded above");
        Ok((p.as_path(), m))
    }
}

/// An exclusive advisory lock on a file, released when dropped (or when the process dies).
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    fn take(path: &Path) -> Result<FileLock> {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            bail!("another kvgear sweep is writing {} (it holds the file's lock)", path.display());
        }
        Ok(FileLock { _file: f })
    }
}

/// The `point` keys of the rows already in a sweep CSV.
pub fn done_points(csv_path: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    let Some(header) = csvlog::read_header(csv_path)? else { return Ok(done) };
    let col = header.iter().position(|h| h == "point").with_context(|| format!("{} has no `point` column: not a sweep CSV", csv_path.display()))?;
    let mut r = csv::ReaderBuilder::new().has_headers(true).from_path(csv_path)?;
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", csv_path.display(), i + 2))?;
        if let Some(k) = rec.get(col) {
            done.insert(k.to_string());
        }
    }
    Ok(done)
}

/// The CSV a sweep writes: `--csv`, else the grid's `csv` (relative to the current directory),
/// else the grid file with `.csv`; a shard's gets `.shard-K-of-N` before the extension.
pub fn csv_path(args: &SweepArgs, grid: &Grid, shard: Option<(usize, usize)>) -> PathBuf {
    if let Some(p) = &args.csv {
        return p.clone();
    }
    let base = grid.csv.clone().unwrap_or_else(|| grid.path.with_extension("csv"));
    match shard {
        Some((k, n)) if n > 1 => {
            let stem = base.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            base.with_file_name(format!("{stem}.shard-{k}-of-{n}.csv"))
        }
        _ => base,
    }
}

pub fn run(a: &SweepArgs) -> Result<()> {
    let grid = load_grid(&a.grid)?;
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    let (k, n) = shard.unwrap_or((0, 1));
    let mine = shard_points(&grid.points, k, n);
    let mut parsed = Vec::with_capacity(mine.len());
    for &(i, p) in &mine {
        let args = PointArgs::parse(p).with_context(|| format!("grid {}, point {} ({})", grid.path.display(), i + 1, p.key()))?;
        parsed.push((i, p, args));
    }
    let csv = csv_path(a, &grid, shard);
    if let Some(torn) = csvlog::repair_tail(&csv)? {
        eprintln!("{}: set aside an unfinished last line ({} bytes): its point runs again", csv.display(), torn.len());
    }
    let done = done_points(&csv)?;
    let todo: Vec<_> = parsed.into_iter().filter(|(_, p, _)| !done.contains(&p.key())).collect();
    let n_done = mine.len() - todo.len();
    if a.dry_run {
        for &(i, p) in &mine {
            let state = if done.contains(&p.key()) { "done" } else { "to run" };
            println!("{:>4} {state:<6} {}", i + 1, p.key());
        }
        println!("{} points in the grid; shard {k}/{n} has {}: {n_done} done, {} to run ({})", grid.points.len(), mine.len(), todo.len(), csv.display());
        return Ok(());
    }
    super::setup_threads(a.threads)?;
    let _lock = FileLock::take(&csv)?;
    let mp = MultiProgress::new();
    let hidden = a.quiet;
    let points_bar = if hidden {
        ProgressBar::hidden()
    } else {
        let style = ProgressStyle::with_template("sweep {bar:30} {pos}/{len} points {per_sec} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
        mp.add(ProgressBar::new(todo.len() as u64).with_style(style))
    };
    if !a.quiet && n_done > 0 {
        let _ = mp.println(format!("{}: {n_done} of this shard's {} points already done", csv.display(), mine.len()));
    }
    let mut models = ModelCache::default();
    let t_all = Instant::now();
    for (i, p, args) in &todo {
        let key = p.key();
        let bar = if hidden { ProgressBar::hidden() } else { mp.add(super::progress_bar(0, "tokens", false)) };
        let t0 = Instant::now();
        let (mut header, mut values, row) = args.run(&mut models, &bar).with_context(|| format!("point {} ({key})", i + 1))?;
        bar.finish_and_clear();
        mp.remove(&bar);
        let mut h = StringRecord::from(vec!["point", "grid"]);
        h.extend(header.iter());
        header = h;
        let mut v = StringRecord::from(vec![key.clone(), grid.path.display().to_string()]);
        v.extend(values.iter());
        values = v;
        csvlog::append_record(&csv, &header, &values)?;
        points_bar.inc(1);
        if a.json {
            println!("{}", serde_json::json!({ "point": key, "grid": grid.path.display().to_string(), "row": row }));
        } else if !a.quiet {
            let _ = mp.println(format!("[{}] {key} ({:.1} s)", i + 1, t0.elapsed().as_secs_f64()));
        }
    }
    points_bar.finish_and_clear();
    if !a.quiet {
        eprintln!(
            "sweep {}: {} points run in {:.1} s, {n_done} were already done; rows in {}",
            grid.path.display(),
            todo.len(),
            t_all.elapsed().as_secs_f64(),
            csv.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(text: &str) -> Result<Vec<Point>> {
        let g: GridFile = toml::from_str(text)?;
        expand(&g.workload, &g.options, &g.grid)
    }

    #[test]
    fn inapplicable_parameters_drop_and_duplicates_merge() {
        let pts = grid(
            r#"
            workload = "compare"
            [options]
            max_tokens = 64
            [[grid]]
            strategy = ["fp16", "gear", "h2o", "gear-h2o"]
            bits = [2, 4]
            budget = [0.2, 0.5]
            "#,
        )
        .unwrap();
        let keys: Vec<String> = pts.iter().map(Point::key).collect();
        assert_eq!(
            keys,
            [
                "workload=compare;max_tokens=64;strategy=fp16",
                "workload=compare;bits=2;max_tokens=64;strategy=gear",
                "workload=compare;bits=4;max_tokens=64;strategy=gear",
                "workload=compare;budget=0.2;max_tokens=64;strategy=h2o",
                "workload=compare;budget=0.5;max_tokens=64;strategy=h2o",
                "workload=compare;bits=2;budget=0.2;max_tokens=64;strategy=gear-h2o",
                "workload=compare;bits=2;budget=0.5;max_tokens=64;strategy=gear-h2o",
                "workload=compare;bits=4;budget=0.2;max_tokens=64;strategy=gear-h2o",
                "workload=compare;bits=4;budget=0.5;max_tokens=64;strategy=gear-h2o",
            ]
        );
        assert_eq!(pts[7].argv(), ["--kv", "bits=4,budget=0.2", "--max-tokens", "64", "--strategy", "gear-h2o"]);
        for p in &pts {
            assert!(matches!(PointArgs::parse(p).unwrap(), PointArgs::Compare(_)));
        }
    }

    #[test]
    fn blocks_concatenate_and_bad_grids_fail_clearly() {
        let pts = grid(
            r#"
            workload = "bench"
            [[grid]]
            strategy = "fp16"
            prompt_tokens = [128, 256]
            [[grid]]
            strategy = ["fp16", "gear"]
            prompt_tokens = 256
            "#,
        )
        .unwrap();
        assert_eq!(pts.len(), 3, "fp16 at 256 tokens appears in both blocks and runs once");
        let err = |t: &str| format!("{:#}", grid(t).unwrap_err());
        assert!(err("workload = \"bench\"\n[[grid]]\nbits = [2]\n").contains("no strategy"));
        assert!(err("workload = \"bnech\"\n[[grid]]\nstrategy = \"fp16\"\n").contains("unknown workload"));
        assert!(err("workload = \"bench\"\n[[grid]]\nstrategy = \"fp16\"\nthreads = 2\n").contains("set by `kvgear sweep`"));
        assert!(err("workload = \"bench\"\n[options]\nbits = [2, 4]\n[[grid]]\nstrategy = \"gear\"\n").contains("axis"));
        let typo = grid("workload = \"bench\"\n[[grid]]\nstrategy = \"gear\"\nprompt_tokenz = 2\n").unwrap();
        assert!(PointArgs::parse(&typo[0]).is_err(), "an unknown flag is an error before anything runs");
        let bad_bits = grid("workload = \"bench\"\n[[grid]]\nstrategy = \"gear\"\nbits = 5\n").unwrap();
        assert!(PointArgs::parse(&bad_bits[0]).is_err());
    }

    #[test]
    fn shards_partition_the_points() {
        let pts = grid("workload = \"memory\"\n[[grid]]\nstrategy = \"fp16\"\nctx = [1, 2, 3, 4, 5, 6, 7]\n").unwrap();
        let mut all: Vec<usize> = (0..3).flat_map(|k| shard_points(&pts, k, 3).into_iter().map(|(i, _)| i)).collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert_eq!(parse_shard("2/3").unwrap(), (2, 3));
        assert!(parse_shard("3/3").is_err());
        assert!(parse_shard("1").is_err());
    }
}
