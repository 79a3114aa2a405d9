//! Measured runs: `bench`, `compare`, `perplexity`, `info`, the `sweep` over them, `plot`, and the
//! CSV rows they append.

pub mod csvlog;
pub mod memory;
pub mod plot;
pub mod sweep;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::backend::{with_backend, Backend, WithBackend};
use crate::kv::strategy::StrategySpec;
use crate::model::llama::{DeviceWeights, Logits, Session};
use crate::model::Model;
use crate::sample::{greedy, log_prob, log_softmax};

/// The built-in workload's text: a chain-of-thought style passage (written for kvgear), repeated
/// as needed to reach the requested prompt length.
pub const WORKLOAD_TEXT: &str = include_str!("workload.txt");

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// KV-cache strategy: fp16, uniform, group, gear, h2o, sieve, window, gear-h2o, gear-sieve, group-h2o.
    #[arg(long, default_value = "fp16")]
    pub strategy: String,
    /// Strategy parameters, key=value (bits, group, residual, rank, rank_decode, iters, outliers,
    /// buffer, backbone, budget, recent, sinks, threshold); repeat or separate with commas.
    #[arg(long = "kv")]
    pub kv: Vec<String>,
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Quantize the matrices in memory at load time (q4_0, q8_0, q4_k_m, ...).
    #[arg(long)]
    pub quantize: Option<String>,
    /// `cpu` (fast), `cpu-ref` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Prompt tokens prefilled.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated after the prompt (greedy with the fp16 cache; the strategy is fed the same
    /// tokens).
    #[arg(long, default_value_t = 256)]
    pub gen_tokens: usize,
    /// Prompt tokens per forward batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// CSV the row is appended to.
    #[arg(long, default_value = "results/bench.csv")]
    pub csv: PathBuf,
    /// Do not append to the CSV.
    #[arg(long)]
    pub no_csv: bool,
    /// Print the row as one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no table (the row still goes to the CSV).
    #[arg(long)]
    pub quiet: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct BenchRow {
    pub timestamp: String,
    pub commit: String,
    pub dirty: bool,
    pub machine: String,
    pub device: String,
    pub threads: usize,
    pub model: String,
    pub model_sha256: String,
    pub synthetic: bool,
    pub strategy: String,
    pub params: String,
    pub seed: u64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub reps: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub ttft_ms: f64,
    pub weight_bytes: usize,
    pub kv_bytes: usize,
    pub kv_codes: usize,
    pub kv_scales: usize,
    pub kv_lowrank: usize,
    pub kv_outliers: usize,
    pub kv_fp16: usize,
    pub kv_policy: usize,
    pub kv_bytes_fp16: usize,
    pub compression: f64,
    pub peak_rss_bytes: u64,
    pub fp16_prefill_tok_s: f64,
    pub fp16_decode_tok_s: f64,
    pub fp16_ttft_ms: f64,
    pub fp16_peak_rss_bytes: u64,
    pub compared_tokens: usize,
    pub top1: f64,
    pub kl: f64,
    /// Device memory in use at the peak of the strategy's run (0 on the CPU).
    pub peak_device_bytes: u64,
    /// Copy bandwidth measured in the same run (device to device on a GPU, host memory on the
    /// CPU), (read + written) / time, GB/s.
    pub copy_gb_s: f64,
    /// The decode bandwidth floor: copy bandwidth over the bytes a decode step must read
    /// (weight matrices but the embedding table, plus the KV cache held at the end), tokens/s.
    pub floor_decode_tok_s: f64,
    /// The bandwidth decoding reached: those bytes times the strategy's decode tokens/s, GB/s.
    pub decode_gb_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prompt tokens for the workload: the built-in text, repeated to `n` tokens.
pub fn workload_tokens(model: &Model, n: usize) -> Result<Vec<u32>> {
    let base = model.tokenizer.encode(WORKLOAD_TEXT, true)?;
    if base.is_empty() {
        bail!("the workload text tokenizes to nothing");
    }
    let body = model.tokenizer.encode(WORKLOAD_TEXT, false)?;
    let mut t = base;
    while t.len() < n {
        t.extend_from_slice(&body);
    }
    t.truncate(n);
    Ok(t)
}

/// A progress bar over `n` steps with rate and ETA, drawn on stderr unless `hidden`.
pub fn progress_bar(n: u64, unit: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(&format!("{{msg}} {{bar:30}} {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(n).with_style(style)
}

/// Sets the global thread pool's size (once per process).
pub fn setup_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start the thread pool")?;
    }
    Ok(())
}

/// `kvgear bench`: loads the model, measures, prints the table (or JSON) and appends the row.
pub fn run(a: &BenchArgs) -> Result<()> {
    setup_threads(a.threads)?;
    let path = crate::fetch::resolve_model(a.model.as_deref())?;
    let model = crate::quantize::load_model(&path, a.quantize.as_deref())?;
    let bar = progress_bar(0, "tokens", a.quiet || a.json);
    let row = bench_row(a, &model, &path, &bar)?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&row)?);
    } else if !a.quiet {
        print_bench_table(&row);
    }
    if !a.no_csv {
        csvlog::append(&a.csv, &row)?;
        if !a.quiet {
            eprintln!("appended to {}", a.csv.display());
        }
    }
    Ok(())
}

/// Sets the peak resident set (VmHWM) back to the current resident set (Linux `clear_refs` 5),
/// after handing freed heap memory back to the system, so the next phase's peak is its own.
/// Returns false where this is not possible (the peak then covers the whole process).
fn reset_peak_rss() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Next-token logits of the fp16 run, kept in an unlinked temporary file rather than in memory,
/// so they do not count in either run's resident set.
struct LogitSpill {
    file: std::fs::File,
    n_vocab: usize,
    n_rows: usize,
}

impl LogitSpill {
    fn new(n_vocab: usize) -> Result<LogitSpill> {
        let path = std::env::temp_dir().join(format!("kvgear-logits-{}-{}", std::process::id(), now_nanos()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Ok(LogitSpill { file, n_vocab, n_rows: 0 })
    }

    fn push(&mut self, row: &[f32]) -> Result<()> {
        use std::io::Write;
        self.file.write_all(bytemuck::cast_slice(&row[..self.n_vocab])).context("cannot write the fp16 run's logits")?;
        self.n_rows += 1;
        Ok(())
    }

    fn read(&self, i: usize, out: &mut [f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let off = (i * self.n_vocab * 4) as u64;
        self.file.read_exact_at(bytemuck::cast_slice_mut(&mut out[..self.n_vocab]), off).context("cannot read the fp16 run's logits")?;
        Ok(())
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// One timed run over the workload: prefill, then `tokens.len()` decode steps.
struct Phase {
    prefill_tok_s: Vec<f64>,
    decode_tok_s: Vec<f64>,
    ttft_ms: Vec<f64>,
    peak_rss_bytes: u64,
    peak_device_bytes: u64,
    kv: crate::kv::codec::KvBytes,
    n_past: usize,
}

/// Runs the workload `reps` times on a fresh session under `spec`. Without `forced`, it decodes
/// greedily and records the sampled tokens in `generated` and every next-token distribution in
/// `spill` (first repetition only). With `forced`, the strategy is fed those tokens (teacher
/// forcing: the same sequence, so the same workload) and each of its next-token distributions
/// is compared with the fp16 one at the same position: `(compared, top-1 agreements, KL sum)`.
/// Only the forward calls (and the argmax of the first token for TTFT) are timed.
#[allow(clippy::too_many_arguments)]
fn run_phase<B: Backend>(
    backend: &B,
    model: &Model,
    dw: &DeviceWeights<B>,
    a: &BenchArgs,
    spec: &crate::kv::strategy::StrategySpec,
    prompt: &[u32],
    generated: &mut Vec<u32>,
    spill: &mut LogitSpill,
    forced: bool,
    fidelity: &mut (usize, usize, f64),
    bar: &ProgressBar,
) -> Result<Phase> {
    let n_ctx = a.prompt_tokens + a.gen_tokens;
    let rss_reset = reset_peak_rss();
    check_fits(backend, model, spec, n_ctx, a.batch)?;
    let mut sess = Session::with_strategy(backend, &model.config, dw, n_ctx, a.batch, spec)?;
    let mut ph = Phase {
        prefill_tok_s: Vec::new(),
        decode_tok_s: Vec::new(),
        ttft_ms: Vec::new(),
        peak_rss_bytes: 0,
        peak_device_bytes: 0,
        kv: Default::default(),
        n_past: 0,
    };
    let mut base = vec![0f32; model.config.n_vocab];
    for rep in 0..a.reps {
        let record = rep == 0;
        sess.truncate(0)?;
        let t0 = Instant::now();
        let logits = sess.forward(prompt, Logits::Last)?;
        let mut next = greedy(logits);
        let dt = t0.elapsed().as_secs_f64();
        ph.prefill_tok_s.push(prompt.len() as f64 / dt);
        ph.ttft_ms.push(dt * 1e3);
        bar.inc(prompt.len() as u64);
        if record {
            if forced {
                compare_step(spill, &mut base, logits, 0, fidelity)?;
            } else {
                generated.clear();
                generated.push(next);
                spill.push(logits)?;
            }
        }
        let mut decode_s = 0.0;
        for i in 1..a.gen_tokens {
            let input = if forced { generated[i - 1] } else { next };
            let t = Instant::now();
            let logits = sess.forward(&[input], Logits::Last)?;
            decode_s += t.elapsed().as_secs_f64();
            next = greedy(logits);
            if record {
                if forced {
                    compare_step(spill, &mut base, logits, i, fidelity)?;
                } else {
                    generated.push(next);
                    spill.push(logits)?;
                }
            }
            bar.inc(1);
        }
        ph.decode_tok_s.push((a.gen_tokens - 1).max(1) as f64 / decode_s.max(1e-9));
        ph.kv = sess.kv_bytes();
        ph.n_past = sess.n_past();
    }
    ph.peak_rss_bytes = if rss_reset { peak_rss_bytes() } else { 0 };
    ph.peak_device_bytes = backend.device_memory_peak().unwrap_or(0) as u64;
    Ok(ph)
}

/// Adds the comparison of the strategy's next-token logits `ls` at step `i` with the fp16 run's.
fn compare_step(spill: &LogitSpill, base: &mut [f32], ls: &[f32], i: usize, fid: &mut (usize, usize, f64)) -> Result<()> {
    spill.read(i, base)?;
    let (pb, ps) = (log_softmax(base), log_softmax(ls));
    fid.2 += pb.iter().zip(&ps).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
    fid.1 += usize::from(greedy(base) == greedy(ls));
    fid.0 += 1;
    Ok(())
}

/// `bench`'s measurement on a loaded model: the fp16 cache and then the strategy on the same
/// workload (the built-in chain-of-thought text to `prompt_tokens`, then `gen_tokens` tokens
/// decoded greedily by the fp16 cache and fed to the strategy), each from a fresh session with
/// its own peak resident set. For `--strategy fp16` the one run is both.
pub fn bench_row(a: &BenchArgs, model: &Model, path: &Path, bar: &ProgressBar) -> Result<BenchRow> {
    let spec = StrategySpec::parse(&a.strategy, &a.kv, a.seed)?;
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.reps == 0 || a.batch == 0 {
        bail!("--prompt-tokens, --gen-tokens, --batch and --reps must be positive");
    }
    with_backend(&a.device, BenchJob { a, spec: &spec, model, path, bar })
}

/// Checks that a session of `n_ctx` tokens in batches of `n_batch` under `spec` fits in the
/// backend's memory before anything is allocated.
pub fn check_fits<B: Backend>(b: &B, model: &Model, spec: &StrategySpec, n_ctx: usize, n_batch: usize) -> Result<()> {
    b.check_memory(&memory::device_plan(&model.config, &model.weights, spec, n_ctx, n_batch)?)
}

struct BenchJob<'a> {
    a: &'a BenchArgs,
    spec: &'a StrategySpec,
    model: &'a Model,
    path: &'a Path,
    bar: &'a ProgressBar,
}

impl WithBackend for BenchJob<'_> {
    type Output = BenchRow;
    fn run<B: Backend>(self, backend: &B) -> Result<BenchRow> {
        bench_on(backend, self)
    }
}

fn bench_on<B: Backend>(backend: &B, job: BenchJob) -> Result<BenchRow> {
    let BenchJob { a, spec, model, path, bar } = job;
    let spec = spec.clone();
    let tokens = workload_tokens(model, a.prompt_tokens)?;
    let dw = DeviceWeights::new(backend, &model.weights)?;
    let phases = if spec.is_plain() { 1 } else { 2 };
    bar.set_length((phases * a.reps * (a.prompt_tokens + a.gen_tokens - 1)) as u64);
    bar.set_message(format!("bench {}", a.strategy));
    let mut generated = Vec::with_capacity(a.gen_tokens);
    let mut spill = LogitSpill::new(model.config.n_vocab)?;
    let mut fid = (0usize, 0usize, 0.0f64);
    let fp16_spec = crate::kv::strategy::StrategySpec::fp16();
    let base = run_phase(backend, model, &dw, a, &fp16_spec, &tokens, &mut generated, &mut spill, false, &mut fid, bar)?;
    let strat = if spec.is_plain() {
        fid = (spill.n_rows, spill.n_rows, 0.0);
        None
    } else {
        Some(run_phase(backend, model, &dw, a, &spec, &tokens, &mut generated, &mut spill, true, &mut fid, bar)?)
    };
    let s = strat.as_ref().unwrap_or(&base);
    let kv_bytes = s.kv;
    drop(dw);
    let copy_gb_s = backend.copy_bandwidth_gb_s()?.unwrap_or(0.0);
    let w = &model.weights;
    let step_bytes = w.matrices().iter().filter(|t| !t.same_data(&w.token_embd) || w.tied_output).map(|t| t.n_bytes()).sum::<usize>()
        + kv_bytes.total();
    let fp16 = model.config.kv_bytes_per_token_fp16() * s.n_past;
    let (commit, dirty) = git_state();
    Ok(BenchRow {
        timestamp: now_rfc3339(),
        commit,
        dirty,
        machine: machine_description(),
        device: backend.describe(),
        threads: rayon::current_num_threads(),
        model: model.name.clone(),
        model_sha256: model_hash(path)?,
        synthetic: model.gguf.as_ref().and_then(|g| g.opt_bool("kvgear.synthetic").ok().flatten()).unwrap_or(false),
        strategy: a.strategy.clone(),
        params: spec.params_string(),
        seed: a.seed,
        prompt_tokens: tokens.len(),
        gen_tokens: a.gen_tokens,
        reps: a.reps,
        prefill_tok_s: median(s.prefill_tok_s.clone()),
        decode_tok_s: median(s.decode_tok_s.clone()),
        ttft_ms: median(s.ttft_ms.clone()),
        weight_bytes: model.weights.bytes(),
        kv_bytes: kv_bytes.total(),
        kv_codes: kv_bytes.codes,
        kv_scales: kv_bytes.scales,
        kv_lowrank: kv_bytes.lowrank,
        kv_outliers: kv_bytes.outliers,
        kv_fp16: kv_bytes.fp16,
        kv_policy: kv_bytes.policy,
        kv_bytes_fp16: fp16,
        compression: fp16 as f64 / kv_bytes.total().max(1) as f64,
        peak_rss_bytes: s.peak_rss_bytes,
        fp16_prefill_tok_s: median(base.prefill_tok_s.clone()),
        fp16_decode_tok_s: median(base.decode_tok_s.clone()),
        fp16_ttft_ms: median(base.ttft_ms.clone()),
        fp16_peak_rss_bytes: base.peak_rss_bytes,
        compared_tokens: fid.0,
        top1: fid.1 as f64 / fid.0.max(1) as f64,
        kl: fid.2 / fid.0.max(1) as f64,
        peak_device_bytes: s.peak_device_bytes,
        copy_gb_s,
        floor_decode_tok_s: if copy_gb_s > 0.0 { copy_gb_s * 1e9 / step_bytes.max(1) as f64 } else { 0.0 },
        decode_gb_s: step_bytes as f64 * median(s.decode_tok_s.clone()) / 1e9,
    })
}

fn print_bench_table(r: &BenchRow) {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!("model      {}{}", r.model, if r.synthetic { " (synthetic weights)" } else { "" });
    println!("device     {} on {}", r.device, r.machine);
    println!(
        "workload   {} prompt tokens (built-in chain-of-thought text), {} generated (greedy with the fp16 cache, fed to both)",
        r.prompt_tokens, r.gen_tokens
    );
    let name = if r.params.is_empty() { r.strategy.clone() } else { format!("{} {}", r.strategy, r.params) };
    let w = name.len().max(8);
    println!("{:<22} {:>w$} {:>w$}", "", "fp16", name);
    let line = |what: &str, base: String, strat: String| println!("{what:<22} {base:>w$} {strat:>w$}");
    line("prefill tok/s", format!("{:.1}", r.fp16_prefill_tok_s), format!("{:.1}", r.prefill_tok_s));
    line("decode tok/s", format!("{:.1}", r.fp16_decode_tok_s), format!("{:.1}", r.decode_tok_s));
    line("time to first token ms", format!("{:.1}", r.fp16_ttft_ms), format!("{:.1}", r.ttft_ms));
    line("weights MiB", format!("{:.1}", mib(r.weight_bytes as f64)), format!("{:.1}", mib(r.weight_bytes as f64)));
    line("KV cache MiB", format!("{:.3}", mib(r.kv_bytes_fp16 as f64)), format!("{:.3}", mib(r.kv_bytes as f64)));
    let parts = [
        ("  codes", r.kv_codes),
        ("  scales", r.kv_scales),
        ("  low-rank", r.kv_lowrank),
        ("  outliers", r.kv_outliers),
        ("  fp16 tokens", r.kv_fp16),
        ("  policy state", r.kv_policy),
    ];
    for (what, b) in parts {
        let base = if what == "  fp16 tokens" { r.kv_bytes_fp16 } else { 0 };
        line(what, format!("{:.3}", mib(base as f64)), format!("{:.3}", mib(b as f64)));
    }
    line("KV compression", "1.00x".into(), format!("{:.2}x", r.compression));
    let rss = |b: u64| if b == 0 { "n/a".to_string() } else { format!("{:.1}", mib(b as f64)) };
    line("peak RSS MiB", rss(r.fp16_peak_rss_bytes), rss(r.peak_rss_bytes));
    line("top-1 vs fp16", "100.00%".into(), format!("{:.2}%", r.top1 * 100.0));
    line("KL vs fp16 nats/token", "0".into(), format!("{:.5}", r.kl));
    if r.copy_gb_s > 0.0 {
        if r.peak_device_bytes > 0 {
            println!("device     peak {:.1} MiB in use", mib(r.peak_device_bytes as f64));
        }
        println!("bandwidth  copy {:.1} GB/s measured in this run; decoding read {:.1} GB/s", r.copy_gb_s, r.decode_gb_s);
        println!(
            "floor      decode {:.1} tok/s at that bandwidth: measured {:.1} tok/s is {:.2}x the floor's time",
            r.floor_decode_tok_s,
            r.decode_tok_s,
            r.floor_decode_tok_s / r.decode_tok_s.max(1e-9)
        );
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct PerplexityResult {
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub n_chunks: usize,
    pub ctx: usize,
    pub n_scored: usize,
    pub tokens_per_s: f64,
}

/// Perplexity with llama.cpp's protocol: tokenize the whole text, cut it into chunks of `ctx`
/// tokens (a BOS first in each chunk when the model adds one), run each chunk from an empty
/// cache, and score tokens `ctx/2 + 1 .. ctx` from the logits of the token before each.
pub fn perplexity<B: Backend>(
    model: &Model,
    backend: &B,
    text: &str,
    ctx: usize,
    batch: usize,
    max_chunks: Option<usize>,
) -> Result<PerplexityResult> {
    if ctx < 4 {
        bail!("--ctx must be at least 4 for perplexity");
    }
    let tokens = model.tokenizer.encode(text, false)?;
    let mut n_chunks = tokens.len() / ctx;
    if let Some(m) = max_chunks {
        n_chunks = n_chunks.min(m);
    }
    if n_chunks == 0 {
        bail!("the text has {} tokens, fewer than one chunk of {ctx}", tokens.len());
    }
    let dw = DeviceWeights::new(backend, &model.weights)?;
    let mut sess = Session::new(backend, &model.config, &dw, ctx, batch)?;
    let first = ctx / 2;
    let n_vocab = model.config.n_vocab;
    let (mut sum, mut sum2, mut count) = (0.0f64, 0.0f64, 0usize);
    let t0 = Instant::now();
    for c in 0..n_chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if model.tokenizer.add_bos() {
            if let Some(bos) = model.tokenizer.bos() {
                chunk[0] = bos;
            }
        }
        sess.truncate(0)?;
        let logits = sess.forward(&chunk, Logits::From(first))?;
        for j in first..ctx - 1 {
            let row = &logits[(j - first) * n_vocab..(j - first + 1) * n_vocab];
            let nll = -log_prob(row, chunk[j + 1] as usize);
            sum += nll;
            sum2 += nll * nll;
            count += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mean = sum / count as f64;
    let var = (sum2 / count as f64 - mean * mean).max(0.0);
    let stderr_nll = (var / (count as f64 - 1.0).max(1.0)).sqrt();
    let ppl = mean.exp();
    Ok(PerplexityResult {
        ppl,
        ppl_stderr: ppl * stderr_nll,
        n_chunks,
        ctx,
        n_scored: count,
        tokens_per_s: (n_chunks * ctx) as f64 / secs,
    })
}

#[derive(Serialize)]
struct InfoJson {
    name: String,
    path: String,
    architecture: String,
    n_params: u64,
    n_layers: usize,
    n_embd: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_ff: usize,
    n_vocab: usize,
    n_ctx_train: usize,
    rope_base: f32,
    tied_output: bool,
    weight_bytes: usize,
    weight_types: Vec<(String, usize, usize)>,
    kv_bytes_per_token_fp16: usize,
}

pub fn print_info(model: &Model, json: bool) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    let info = InfoJson {
        name: model.name.clone(),
        path: model.path.display().to_string(),
        architecture: c.arch.name().to_string(),
        n_params: c.n_params(w.tied_output),
        n_layers: c.n_layers,
        n_embd: c.n_embd,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        n_ff: c.n_ff,
        n_vocab: c.n_vocab,
        n_ctx_train: c.n_ctx_train,
        rope_base: c.rope_base,
        tied_output: w.tied_output,
        weight_bytes: w.bytes(),
        weight_types: w.bytes_by_type().into_iter().map(|(k, (n, b))| (k.to_string(), n, b)).collect(),
        kv_bytes_per_token_fp16: c.kv_bytes_per_token_fp16(),
    };
    if json {
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    println!("model          {} ({})", info.name, info.path);
    println!("architecture   {}", info.architecture);
    println!("parameters     {} ({:.1} M)", info.n_params, info.n_params as f64 / 1e6);
    println!(
        "shape          {} layers, width {}, {} heads / {} KV heads of {}, ffn {}, vocab {}",
        c.n_layers, c.n_embd, c.n_heads, c.n_kv_heads, c.head_dim, c.n_ff, c.n_vocab
    );
    println!("context        {} (trained), rope base {}", c.n_ctx_train, c.rope_base);
    println!("output         {}", if w.tied_output { "tied to the token embedding" } else { "separate matrix" });
    println!("weights        {} bytes ({:.1} MiB)", info.weight_bytes, info.weight_bytes as f64 / 1048576.0);
    for (ty, n, b) in &info.weight_types {
        println!("  {ty:<6} {n:>4} matrices {b:>12} bytes");
    }
    println!("KV per token   {} bytes (fp16 cache)", info.kv_bytes_per_token_fp16);
    Ok(())
}

/// Peak resident set of this process (VmHWM), bytes; 0 where /proc is absent.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The commit the binary was built from, and whether the code that ran may differ from it
/// (uncommitted changes in the working tree, or a tree since moved to another commit).
pub fn git_state() -> (String, bool) {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let built = env!("KVGEAR_BUILD_COMMIT").to_string();
    // Dirty: the working tree has uncommitted changes, or it is no longer at the commit the
    // binary was built from (a binary kept from an older build), so the row's code is uncertain.
    let dirty = match run(&["rev-parse", "HEAD"]) {
        Some(head) => head != built || run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()),
        None => false,
    };
    (built, dirty)
}

/// CPU model and core count.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// sha256 of a model file, cached in the cache directory by path, size and modification time.
pub fn model_hash(path: &Path) -> Result<String> {
    if path.is_dir() {
        return Ok("directory".to_string());
    }
    let meta = std::fs::metadata(path)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let key = format!("{}|{}|{}", std::fs::canonicalize(path)?.display(), meta.len(), mtime);
    let cache = crate::fetch::cache_dir()?.join("hashes.tsv");
    if let Ok(s) = std::fs::read_to_string(&cache) {
        if let Some(h) = s.lines().find_map(|l| l.strip_prefix(&format!("{key}\t"))) {
            return Ok(h.to_string());
        }
    }
    let h = crate::fetch::sha256_file(path, true)?;
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&cache) {
        let _ = writeln!(f, "{key}\t{h}");
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct CompareArgs {
    /// KV-cache strategy to compare with the fp16 cache.
    #[arg(long)]
    pub strategy: String,
    /// Strategy parameters, key=value.
    #[arg(long = "kv")]
    pub kv: Vec<String>,
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Quantize the matrices in memory at load time (q4_0, q8_0, q4_k_m, ...).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Text file to teacher-force (default: the built-in workload text).
    #[arg(long, short = 'f', conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// Text to teacher-force instead of a file.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Tokens of the text used.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Tokens prefilled as the prompt before teacher forcing (default: half of the tokens).
    #[arg(long)]
    pub prefix: Option<usize>,
    /// Tokens generated freely (greedy) after the prompt to find the first difference.
    #[arg(long, default_value_t = 64)]
    pub gen: usize,
    /// `auto` (CUDA when there is a device, else CPU), `cpu` (fast), `cpu-ref`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CSV the row is appended to.
    #[arg(long, default_value = "results/compare.csv")]
    pub csv: PathBuf,
    #[arg(long)]
    pub no_csv: bool,
    /// Print the row as one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no summary (the row still goes to the CSV).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct CompareRow {
    pub timestamp: String,
    pub commit: String,
    pub dirty: bool,
    pub machine: String,
    pub model: String,
    pub model_sha256: String,
    pub text: String,
    pub strategy: String,
    pub params: String,
    pub seed: u64,
    pub prompt_tokens: usize,
    pub scored_tokens: usize,
    pub kl: f64,
    pub top1: f64,
    pub ppl: f64,
    pub ppl_fp16: f64,
    pub tokens_to_first_difference: usize,
    pub gen_tokens: usize,
    pub kv_bytes: usize,
    pub kv_bytes_fp16: usize,
    pub compression: f64,
}

/// `kvgear compare`: the strategy against the fp16 cache on the same tokens. The first `prefix`
/// tokens are the prompt; each later token is fed one at a time to both caches (teacher forcing),
/// and every next-token distribution from the end of the prompt on is compared: KL(fp16 ||
/// strategy), top-1 agreement, and each cache's perplexity of the actual next tokens. Then both
/// generate greedily from the prompt, and the tokens before their first difference are counted.
pub fn compare(a: &CompareArgs) -> Result<()> {
    setup_threads(a.threads)?;
    let path = crate::fetch::resolve_model(a.model.as_deref())?;
    let model = crate::quantize::load_model(&path, a.quantize.as_deref())?;
    let bar = progress_bar(0, "tokens", a.quiet || a.json);
    let row = compare_row(a, &model, &path, &bar)?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&row)?);
    } else if !a.quiet {
        println!("strategy   {} {}", row.strategy, row.params);
        println!("text       {} ({} prompt tokens, {} scored)", row.text, row.prompt_tokens, row.scored_tokens);
        println!("KL         {:.5} nats/token (from the fp16 cache's distribution)", row.kl);
        println!("top-1      {:.2}% agreement", row.top1 * 100.0);
        println!("perplexity {:.4} (fp16 cache {:.4})", row.ppl, row.ppl_fp16);
        println!("greedy     {} of {} tokens before the first difference", row.tokens_to_first_difference, row.gen_tokens);
        println!("KV bytes   {} (fp16 {}; compression {:.2}x)", row.kv_bytes, row.kv_bytes_fp16, row.compression);
    }
    if !a.no_csv {
        csvlog::append(&a.csv, &row)?;
        if !a.quiet {
            eprintln!("appended to {}", a.csv.display());
        }
    }
    Ok(())
}

/// `compare`'s measurement on a loaded model (see [`compare`]).
pub fn compare_row(a: &CompareArgs, model: &Model, path: &Path, bar: &ProgressBar) -> Result<CompareRow> {
    let spec = crate::kv::strategy::StrategySpec::parse(&a.strategy, &a.kv, a.seed)?;
    let (text, text_name) = match (&a.file, &a.prompt) {
        (Some(f), _) => (std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?, f.display().to_string()),
        (None, Some(p)) => (p.clone(), "prompt".to_string()),
        (None, None) => (WORKLOAD_TEXT.to_string(), "built-in workload".to_string()),
    };
    let mut tokens = model.tokenizer.encode(&text, true)?;
    tokens.truncate(a.max_tokens);
    let prefix = a.prefix.unwrap_or(tokens.len() / 2);
    if prefix == 0 || prefix >= tokens.len() {
        bail!("the text has {} tokens: the prefix ({prefix}) must leave at least one to score", tokens.len());
    }
    let text_name = text_name.as_str();
    with_backend(&a.device, CompareJob { a, spec: &spec, model, path, tokens: &tokens, prefix, text_name, bar })
}

struct CompareJob<'a> {
    a: &'a CompareArgs,
    spec: &'a StrategySpec,
    model: &'a Model,
    path: &'a Path,
    tokens: &'a [u32],
    prefix: usize,
    text_name: &'a str,
    bar: &'a ProgressBar,
}

impl WithBackend for CompareJob<'_> {
    type Output = CompareRow;
    fn run<B: Backend>(self, backend: &B) -> Result<CompareRow> {
        compare_on(backend, self)
    }
}

fn compare_on<B: Backend>(backend: &B, job: CompareJob) -> Result<CompareRow> {
    let CompareJob { a, spec, model, path, tokens, prefix, text_name, bar } = job;
    let n_ctx = tokens.len().max(prefix + a.gen) + 1;
    let base_spec = StrategySpec::fp16();
    // The prefix is prefilled as one batch, as the GEAR and H2O reference code runs a prompt:
    // its attention is exact, H2O ranks it whole, and GEAR compresses it as one block.
    check_fits(backend, model, &base_spec, n_ctx, prefix)?;
    check_fits(backend, model, spec, n_ctx, prefix)?;
    let dw = DeviceWeights::new(backend, &model.weights)?;
    let mut base = Session::with_strategy(backend, &model.config, &dw, n_ctx, prefix, &base_spec)?;
    let mut strat = Session::with_strategy(backend, &model.config, &dw, n_ctx, prefix, spec)?;
    bar.set_length((2 * (tokens.len() - 1) + 2 * prefix + 2 * a.gen) as u64);
    bar.set_message(format!("compare {}", a.strategy));
    let (mut kl, mut agree, mut nll_b, mut nll_s, mut n) = (0.0f64, 0usize, 0.0f64, 0.0f64, 0usize);
    let mut step = |lb: &[f32], ls: &[f32], next: Option<u32>| {
        let (pb, ps) = (log_softmax(lb), log_softmax(ls));
        kl += pb.iter().zip(&ps).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
        agree += usize::from(greedy(lb) == greedy(ls));
        if let Some(t) = next {
            nll_b -= pb[t as usize];
            nll_s -= ps[t as usize];
        }
        n += 1;
    };
    let lb = base.forward(&tokens[..prefix], Logits::Last)?.to_vec();
    let ls = strat.forward(&tokens[..prefix], Logits::Last)?.to_vec();
    step(&lb, &ls, Some(tokens[prefix]));
    bar.inc(2 * prefix as u64);
    for i in prefix..tokens.len() - 1 {
        let lb = base.forward(&tokens[i..i + 1], Logits::Last)?.to_vec();
        let ls = strat.forward(&tokens[i..i + 1], Logits::Last)?.to_vec();
        step(&lb, &ls, Some(tokens[i + 1]));
        bar.inc(2);
    }
    let kv_bytes = strat.kv_bytes().total();
    let kv_bytes_fp16 = model.config.kv_bytes_per_token_fp16() * strat.n_past();
    base.truncate(0)?;
    strat.truncate(0)?;
    let mut nb = greedy(base.forward(&tokens[..prefix], Logits::Last)?);
    let mut ns = greedy(strat.forward(&tokens[..prefix], Logits::Last)?);
    bar.inc(2 * prefix as u64);
    let mut same = 0;
    while same < a.gen && nb == ns {
        same += 1;
        if same == a.gen {
            break;
        }
        nb = greedy(base.forward(&[nb], Logits::Last)?);
        ns = greedy(strat.forward(&[ns], Logits::Last)?);
        bar.inc(2);
    }
    let scored = n;
    let (commit, dirty) = git_state();
    Ok(CompareRow {
        timestamp: now_rfc3339(),
        commit,
        dirty,
        machine: machine_description(),
        model: model.name.clone(),
        model_sha256: model_hash(path)?,
        text: text_name.to_string(),
        strategy: spec.name.clone(),
        params: spec.params_string(),
        seed: a.seed,
        prompt_tokens: prefix,
        scored_tokens: scored,
        kl: kl / scored as f64,
        top1: agree as f64 / scored as f64,
        ppl: (nll_s / scored as f64).exp(),
        ppl_fp16: (nll_b / scored as f64).exp(),
        tokens_to_first_difference: same,
        gen_tokens: a.gen,
        kv_bytes,
        kv_bytes_fp16,
        compression: kv_bytes_fp16 as f64 / kv_bytes.max(1) as f64,
    })
}
