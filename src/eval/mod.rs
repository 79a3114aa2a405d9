//! `kvgear eval`: GSM8K, BBH and MMLU with any KV strategy, per-example JSONL, summary CSV rows,
//! and agreement with a baseline run (the fp16 cache).
//!
//! **Prompt protocol.** A prompt is its few-shot prefix followed by the example (`prompt.rs`),
//! and it is always run as two forward calls: the prefix, then the example. Each call is cut
//! into batches of `--batch` tokens from its own start, so the example's tokens always start a
//! new batch and the batch boundaries are the same whether the prefix is computed afresh or
//! reused. Budgets given as fractions (`h2o`, `gear-h2o`) are fractions of the whole prompt
//! (prefix + example), set before the prefix runs.
//!
//! **Prefix reuse.** Because of that protocol, the cache after the prefix is the same for every
//! example of a task whenever the strategy's state after the prefix does not depend on what
//! follows it. That holds for every strategy that evicts nothing (`fp16`, `uniform`, `group`,
//! `gear`) and for evicting strategies whose budget is a token count. The prefix then runs
//! once per task: the plain fp16 cache is cut back to the prefix (`Session::truncate`), any
//! other cache is restored from a copy taken after the prefix (`Session::snapshot`). A budget
//! given as a fraction of the prompt depends on the example's length and the policy evicts
//! while the prefix runs, so those strategies (`h2o`, `gear-h2o` with their default budget 0.5)
//! run the prefix again for every example. Reuse is exact: tests/eval.rs checks that reused and
//! recomputed prefixes give the same tokens for every kind of strategy.
//!
//! **Files.** One JSONL line per example (`Record`), appended as each example finishes; a run
//! resumes from its JSONL, skipping examples already there (a run key in every line makes sure
//! they came from the same model, strategy and settings). One summary row per task (and one for
//! all BBH tasks together) is appended to the CSV.

pub mod data;
pub mod extract;
pub mod metrics;
pub mod prompt;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::Backend;
use crate::kv::strategy::StrategySpec;
use crate::model::llama::{DeviceWeights, KvSnapshot, Logits, Session};
use crate::model::Model;
use crate::sample::{log_softmax, Sampler, SamplerConfig};
use metrics::Proportion;
use prompt::{Example, Scoring, TaskSet};

/// Settings of a run that change its results (they go into the run key).
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    pub max_new_tokens: usize,
    /// Prompt tokens per forward batch.
    pub n_batch: usize,
    /// Greedy when `temperature` is 0; otherwise each example samples with `seed` mixed with
    /// its id, so a resumed run draws what an uninterrupted one would.
    pub sampler: SamplerConfig,
    pub stops: Vec<String>,
}

/// Whether the strategy's cache after a shared prefix is the same for every prompt that starts
/// with it (see the module documentation).
pub fn prefix_reusable(spec: &StrategySpec) -> bool {
    spec.policy == "keep_all" || spec.policy_params.budget.is_some_and(|b| b >= 1.0)
}

/// One example's outcome: a line of the JSONL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Hash of the model, strategy, seed and settings that produced the line.
    pub run_key: String,
    pub task: String,
    pub id: String,
    pub strategy: String,
    pub params: String,
    /// sha256 of the prompt text (prefix and example).
    pub prompt_sha256: String,
    /// Tokens of the prompt, prefix included.
    pub prompt_tokens: usize,
    pub prefix_tokens: usize,
    /// Tokens generated (0 when the options are scored by likelihood).
    pub gen_tokens: usize,
    /// The generated text, cut at the first stop string.
    pub generation: String,
    /// The normalized answer, `null` when none was found.
    pub extracted: Option<String>,
    pub gold: String,
    pub correct: bool,
    /// Log-probabilities of the options' first tokens (likelihood scoring only), in option order.
    pub option_logprobs: Option<Vec<f64>>,
    /// KV bytes held after the last step.
    pub kv_bytes_end: usize,
    /// Most KV bytes held after any step (the prefix, the example, each generated token).
    pub kv_bytes_peak: usize,
    /// What an fp16 cache holds for the same positions at the end.
    pub kv_bytes_fp16_end: usize,
    /// Wall time of the example, the prefix included when it ran for this example.
    pub seconds: f64,
    /// The prefix's cache came from an earlier example.
    pub prefix_reused: bool,
    /// The baseline's extracted answer; null when it found none, or without a baseline that has
    /// this example (then `agree` is null too).
    #[serde(default)]
    pub baseline_extracted: Option<String>,
    /// `extracted == baseline_extracted` (two missing answers agree).
    #[serde(default)]
    pub agree: Option<bool>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The run key: a short hash of what makes two runs' lines interchangeable.
pub fn run_key(model_sha256: &str, spec: &StrategySpec, settings: &RunSettings) -> Result<String> {
    let v = serde_json::json!({
        "model": model_sha256,
        "strategy": spec.name,
        "params": spec.params_string(),
        "seed": spec.seed,
        "max_new_tokens": settings.max_new_tokens,
        "n_batch": settings.n_batch,
        "sampler": [settings.sampler.temperature, settings.sampler.top_k as f32, settings.sampler.top_p],
        "sampler_seed": settings.sampler.seed,
        "stops": settings.stops,
        "protocol": "prefix-then-example/v1",
    });
    Ok(sha256_hex(serde_json::to_string(&v)?.as_bytes())[..16].to_string())
}

/// Reads a JSONL of records. A last line without its newline (an interrupted write) is dropped
/// from the file with a message; any other unreadable line is an error naming it.
pub fn read_records(path: &Path, repair: bool) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut end = bytes.len();
    if !bytes.is_empty() && bytes[end - 1] != b'\n' {
        end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if repair {
            eprintln!("{}: dropping an incomplete last line (an interrupted write)", path.display());
            let f = std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
            f.set_len(end as u64)?;
        }
    }
    let mut out = Vec::new();
    for (i, line) in bytes[..end].lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line).with_context(|| format!("{}:{}: not an eval record", path.display(), i + 1))?;
        out.push(r);
    }
    Ok(out)
}

/// Answers of a baseline JSONL by (task, id).
pub fn load_baseline(path: &Path) -> Result<HashMap<(String, String), Record>> {
    if !path.exists() {
        bail!("baseline {} does not exist", path.display());
    }
    Ok(read_records(path, false)?.into_iter().map(|r| ((r.task.clone(), r.id.clone()), r)).collect())
}

/// What `evaluate` needs besides the model.
pub struct Evaluator<'a, B: Backend> {
    pub model: &'a Model,
    pub backend: &'a B,
    pub weights: &'a DeviceWeights<B>,
    pub spec: StrategySpec,
    pub settings: RunSettings,
    /// Reuse the prefix's cache where the strategy allows it.
    pub prefix_reuse: bool,
}

/// The result of one example before it becomes a `Record`.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub prompt_tokens: usize,
    pub prefix_tokens: usize,
    pub gen_ids: Vec<u32>,
    pub generation: String,
    pub extracted: Option<String>,
    pub option_logprobs: Option<Vec<f64>>,
    pub kv_bytes_end: usize,
    pub kv_bytes_peak: usize,
    pub kv_bytes_fp16_end: usize,
    pub seconds: f64,
    pub prefix_reused: bool,
}

/// One token list per prefix or per example.
pub type TokenLists = Vec<Vec<u32>>;

/// Where the session's cache stands relative to the prefixes.
enum PrefixState<B: Backend> {
    /// Nothing reusable.
    None,
    /// The plain cache holds prefix `p` (and possibly an example after it).
    Plain(usize),
    /// A copy of the cache right after prefix `p`.
    Saved(usize, KvSnapshot<B>),
}

impl<'a, B: Backend> Evaluator<'a, B> {
    /// Tokens of each prefix (with BOS) and of each example (without).
    pub fn tokenize(&self, set: &TaskSet) -> Result<(TokenLists, TokenLists)> {
        let tk = &self.model.tokenizer;
        let prefixes = set.prefixes.iter().map(|p| tk.encode(p, true)).collect::<Result<Vec<_>>>()?;
        let examples = set.examples.iter().map(|e| tk.encode(&e.text, false)).collect::<Result<Vec<_>>>()?;
        Ok((prefixes, examples))
    }

    /// Runs the examples of `set` whose index `todo` lists, in order, calling `sink` after each.
    pub fn evaluate(
        &self,
        set: &TaskSet,
        todo: &[usize],
        mut sink: impl FnMut(&Example, &Outcome) -> Result<()>,
    ) -> Result<()> {
        if todo.is_empty() {
            return Ok(());
        }
        let (prefix_tokens, example_tokens) = self.tokenize(set)?;
        let cfg = &self.model.config;
        let gen_room = |e: &Example| match e.scoring {
            Scoring::Generate(_) => self.settings.max_new_tokens,
            Scoring::Choices { .. } => 0,
        };
        let mut n_ctx = 0;
        for &i in todo {
            let e = &set.examples[i];
            let need = prefix_tokens[e.prefix].len() + example_tokens[i].len() + gen_room(e);
            if need > cfg.n_ctx_train {
                bail!(
                    "{} {} needs {need} tokens (prompt and --max-new-tokens), more than the model's context of {}",
                    e.task,
                    e.id,
                    cfg.n_ctx_train
                );
            }
            n_ctx = n_ctx.max(need);
        }
        let option_ids = |e: &Example| -> Result<Vec<u32>> {
            let Scoring::Choices { options, .. } = &e.scoring else { return Ok(Vec::new()) };
            options
                .iter()
                .map(|o| {
                    let ids = self.model.tokenizer.encode(o, false)?;
                    ids.first().copied().with_context(|| format!("option {o:?} tokenizes to nothing"))
                })
                .collect()
        };
        let mut sess = Session::with_strategy(self.backend, cfg, self.weights, n_ctx, self.settings.n_batch, &self.spec)?;
        let reusable = self.prefix_reuse && prefix_reusable(&self.spec);
        let plain = self.spec.is_plain();
        let mut state: PrefixState<B> = PrefixState::None;
        let fp16_per_token = cfg.kv_bytes_per_token_fp16();
        for &i in todo {
            let e = &set.examples[i];
            let t0 = Instant::now();
            let pre = &prefix_tokens[e.prefix];
            let ex = &example_tokens[i];
            if ex.is_empty() {
                bail!("{} {}: the example tokenizes to nothing", e.task, e.id);
            }
            let prompt_len = pre.len() + ex.len();
            let mut peak = 0usize;
            let prefix_reused = match &state {
                PrefixState::Plain(p) if reusable && plain && *p == e.prefix => {
                    sess.truncate(pre.len())?;
                    true
                }
                PrefixState::Saved(p, snap) if reusable && *p == e.prefix => {
                    sess.restore(snap)?;
                    true
                }
                _ => false,
            };
            if prefix_reused {
                sess.set_prompt_len(prompt_len);
                peak = peak.max(sess.kv_bytes().total());
            } else {
                sess.truncate(0)?;
                sess.set_prompt_len(prompt_len);
                sess.forward(pre, Logits::None)?;
                peak = peak.max(sess.kv_bytes().total());
                state = if reusable && plain {
                    PrefixState::Plain(e.prefix)
                } else if reusable {
                    PrefixState::Saved(e.prefix, sess.snapshot()?)
                } else {
                    PrefixState::None
                };
            }
            let last = sess.forward(ex, Logits::Last)?.to_vec();
            peak = peak.max(sess.kv_bytes().total());
            let mut outcome = Outcome {
                prompt_tokens: prompt_len,
                prefix_tokens: pre.len(),
                gen_ids: Vec::new(),
                generation: String::new(),
                extracted: None,
                option_logprobs: None,
                kv_bytes_end: 0,
                kv_bytes_peak: 0,
                kv_bytes_fp16_end: 0,
                seconds: 0.0,
                prefix_reused,
            };
            match &e.scoring {
                Scoring::Choices { labels, .. } => {
                    let ids = option_ids(e)?;
                    let lp = log_softmax(&last);
                    let scores: Vec<f64> = ids.iter().map(|&t| lp[t as usize]).collect();
                    let best = scores.iter().enumerate().fold(0, |b, (k, &s)| if s > scores[b] { k } else { b });
                    outcome.extracted = Some(labels[best].clone());
                    outcome.option_logprobs = Some(scores);
                }
                Scoring::Generate(extractor) => {
                    let mut seeded = self.settings.sampler.clone();
                    seeded.seed ^= u64::from_le_bytes(Sha256::digest(e.id.as_bytes())[..8].try_into().expect("8 bytes"));
                    let mut sampler = Sampler::new(seeded)?;
                    let full: Vec<u32> = pre.iter().chain(ex.iter()).copied().collect();
                    let mut dec = crate::model::tokenizer::StreamDecoder::with_context(&self.model.tokenizer, &full)?;
                    let mut text = String::new();
                    let mut next = sampler.sample(&last);
                    let max_new = self.settings.max_new_tokens;
                    while outcome.gen_ids.len() < max_new && !self.model.tokenizer.is_eos(next) {
                        outcome.gen_ids.push(next);
                        text.push_str(&dec.step(next)?);
                        if first_stop(&text, &self.settings.stops).is_some() || outcome.gen_ids.len() == max_new {
                            break;
                        }
                        let logits = sess.forward(&[next], Logits::Last)?;
                        next = sampler.sample(logits);
                        peak = peak.max(sess.kv_bytes().total());
                    }
                    text.push_str(&dec.finish()?);
                    if let Some(cut) = first_stop(&text, &self.settings.stops) {
                        text.truncate(cut);
                    }
                    outcome.extracted = extractor.extract(&text);
                    outcome.generation = text;
                }
            }
            outcome.kv_bytes_end = sess.kv_bytes().total();
            outcome.kv_bytes_peak = peak.max(outcome.kv_bytes_end);
            outcome.kv_bytes_fp16_end = fp16_per_token * sess.n_past();
            outcome.seconds = t0.elapsed().as_secs_f64();
            sink(e, &outcome)?;
        }
        Ok(())
    }
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// A summary row of `results/eval.csv`.
#[derive(Serialize, Clone, Debug)]
pub struct EvalRow {
    pub timestamp: String,
    pub commit: String,
    pub dirty: bool,
    pub machine: String,
    pub device: String,
    pub threads: usize,
    pub model: String,
    pub model_sha256: String,
    pub task: String,
    pub mode: String,
    pub shots: usize,
    pub strategy: String,
    pub params: String,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub limit: String,
    pub n_examples: usize,
    pub n_correct: usize,
    pub accuracy: f64,
    pub accuracy_lo95: f64,
    pub accuracy_hi95: f64,
    pub n_no_answer: usize,
    pub baseline: String,
    pub n_compared: usize,
    pub agreement: Option<f64>,
    pub agreement_lo95: Option<f64>,
    pub agreement_hi95: Option<f64>,
    pub kv_bytes_end_mean: f64,
    pub kv_bytes_peak_max: usize,
    pub kv_bytes_fp16_end_mean: f64,
    pub compression: f64,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub seconds: f64,
    pub examples_per_s: f64,
    pub prefix_reuse: bool,
    pub jsonl: String,
}

/// Figures of a set of records (one task, or all of them).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub accuracy: Proportion,
    pub n_no_answer: usize,
    /// Agreement with the baseline over the examples it has.
    pub agreement: Option<Proportion>,
    pub kv_bytes_end_mean: f64,
    pub kv_bytes_peak_max: usize,
    pub kv_bytes_fp16_end_mean: f64,
    pub tokens_in: usize,
    pub tokens_out: usize,
    pub seconds: f64,
}

/// Accuracy, agreement with `baseline` (matched by task and example id) and totals.
pub fn summarize(records: &[&Record], baseline: Option<&HashMap<(String, String), Record>>) -> Option<Summary> {
    let n = records.len();
    let accuracy = Proportion::new(records.iter().filter(|r| r.correct).count(), n)?;
    let agreement = baseline.and_then(|b| {
        let pairs: Vec<bool> =
            records.iter().filter_map(|r| b.get(&(r.task.clone(), r.id.clone())).map(|br| br.extracted == r.extracted)).collect();
        Proportion::new(pairs.iter().filter(|&&a| a).count(), pairs.len())
    });
    let mean = |f: &dyn Fn(&Record) -> usize| records.iter().map(|r| f(r) as f64).sum::<f64>() / n as f64;
    Some(Summary {
        accuracy,
        n_no_answer: records.iter().filter(|r| r.extracted.is_none()).count(),
        agreement,
        kv_bytes_end_mean: mean(&|r| r.kv_bytes_end),
        kv_bytes_peak_max: records.iter().map(|r| r.kv_bytes_peak).max().unwrap_or(0),
        kv_bytes_fp16_end_mean: mean(&|r| r.kv_bytes_fp16_end),
        tokens_in: records.iter().map(|r| r.prompt_tokens).sum(),
        tokens_out: records.iter().map(|r| r.gen_tokens).sum(),
        seconds: records.iter().map(|r| r.seconds).sum(),
    })
}

#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// gsm8k[:test|train], bbh[:TASK,...] (all 27 tasks by default), mmlu[:SUBJECT,...] (answer
    /// by likelihood of A-D), mmlu-cot[:SUBJECT,...] (chain of thought).
    #[arg(long)]
    pub task: String,
    /// KV-cache strategy: fp16, uniform, group, gear, h2o, sieve, window, gear-h2o, gear-sieve, group-h2o.
    #[arg(long, default_value = "fp16")]
    pub strategy: String,
    /// Strategy parameters, key=value (see `kvgear bench --help`); repeat or separate with commas.
    #[arg(long = "kv")]
    pub kv: Vec<String>,
    /// Examples: per task for BBH, in total for GSM8K and MMLU (MMLU takes them round-robin over
    /// the subjects).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Run seed: the strategy's (GEAR's power iteration) and, with --temp, sampling's.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data directory (default: $KVGEAR_DATA, else data/ in the cache directory).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokens generated at most per example (chain-of-thought tasks).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature (default: greedy).
    #[arg(long)]
    pub temp: Option<f32>,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// A run's JSONL to compare answers with (agreement).
    #[arg(long, conflicts_with = "vs")]
    pub baseline: Option<PathBuf>,
    /// Run this strategy too (e.g. fp16, into its own JSONL, resumed if present) and use it as
    /// the baseline.
    #[arg(long)]
    pub vs: Option<String>,
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Quantize the model's matrices to this type at load time (as `kvgear quantize` would).
    #[arg(long)]
    pub quantize: Option<String>,
    /// `cpu` (fast), `cpu-ref` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Prompt tokens per forward batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Directory of the per-example JSONL files.
    #[arg(long, default_value = "results/eval")]
    pub out: PathBuf,
    /// The JSONL to write (and resume from) instead of the one named after the run in --out.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// CSV the summary rows are appended to.
    #[arg(long, default_value = "results/eval.csv")]
    pub csv: PathBuf,
    #[arg(long)]
    pub no_csv: bool,
    /// Run every prompt's prefix afresh even where its cache could be reused.
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// Print each summary row as one JSON object (one line) instead of the per-task lines.
    #[arg(long)]
    pub json: bool,
    /// No progress bar and no progress or summary lines (the rows still go to the CSV).
    #[arg(long)]
    pub quiet: bool,
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '=') { c } else { '_' }).collect()
}

/// The JSONL a run writes by default: `OUT/TASK.STRATEGY[.PARAMS].MODEL8.sSEED.jsonl` (a task
/// list longer than 48 characters is written as its name and a hash of the list).
pub fn default_jsonl(out: &Path, task: &str, spec: &StrategySpec, model_sha256: &str) -> PathBuf {
    let params = spec.params_string();
    let mut task_part = sanitize(task);
    if task_part.len() > 48 {
        let name = task.split(':').next().unwrap_or(task);
        task_part = format!("{}-{}", sanitize(name), &sha256_hex(task.as_bytes())[..12]);
    }
    let mut name = format!("{task_part}.{}", sanitize(&spec.name));
    if !params.is_empty() {
        name.push('.');
        name.push_str(&sanitize(&params));
    }
    name.push_str(&format!(".{}.s{}.jsonl", &model_sha256[..model_sha256.len().min(8)], spec.seed));
    out.join(name)
}

/// `kvgear eval`.
pub fn command(a: &EvalArgs) -> Result<()> {
    if let Some(n) = a.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start the thread pool")?;
    }
    let path = crate::fetch::resolve_model(a.model.as_deref())?;
    let model = crate::quantize::load_model(&path, a.quantize.as_deref())?;
    run_with_model(a, &model, &path).map(|_| ())
}

/// A sweep point's eval: the run (and its baseline's, with `--vs`) on a model already loaded,
/// resumed from its JSONL as `kvgear eval` would; returns the run's summary row (over all the
/// tasks when there are several) without appending it to `--csv` or printing (the sweep shows
/// its own progress).
pub fn sweep_row(a: &EvalArgs, model: &Model, path: &Path) -> Result<EvalRow> {
    let mut a = a.clone();
    a.no_csv = true;
    a.quiet = true;
    a.json = false;
    let rows = run_with_model(&a, model, path)?;
    rows.into_iter().last().with_context(|| format!("eval of {} gave no summary: no examples were selected", a.task))
}

/// `kvgear eval` on a loaded model (from `path`); returns the strategy run's summary rows.
fn run_with_model(a: &EvalArgs, model: &Model, path: &Path) -> Result<Vec<EvalRow>> {
    if a.batch == 0 || a.max_new_tokens == 0 {
        bail!("--batch and --max-new-tokens must be positive");
    }
    if a.limit == Some(0) {
        bail!("--limit must be positive");
    }
    let spec = StrategySpec::parse(&a.strategy, &a.kv, a.seed)?;
    let backend = match a.device.as_str() {
        "auto" | "cpu" => crate::backend::cpu::Cpu::fast(),
        "cpu-ref" => crate::backend::cpu::Cpu::reference(),
        d => bail!("device '{d}' cannot run eval yet (cpu, cpu-ref)"),
    };
    let dir = data::data_dir(a.data.as_deref())?;
    let set = prompt::load_task(&a.task, &dir, a.limit)?;
    for n in &set.notes {
        eprintln!("note: {n}");
    }
    let model_sha256 = crate::bench::model_hash(path)?;
    let weights = DeviceWeights::new(&backend, &model.weights)?;
    let sampler = match a.temp {
        Some(t) if t > 0.0 => SamplerConfig { temperature: t, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        _ => SamplerConfig::greedy(),
    };
    let settings = RunSettings { max_new_tokens: a.max_new_tokens, n_batch: a.batch, sampler, stops: set.stops.clone() };
    let ctx = RunContext { a, set: &set, model, model_sha256: &model_sha256, backend: &backend, weights: &weights };
    let baseline = match (&a.baseline, &a.vs) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(vs)) => {
            let base_spec = StrategySpec::parse(vs, &[], a.seed)?;
            if base_spec == spec {
                None
            } else {
                if !a.quiet {
                    eprintln!("baseline: {vs}");
                }
                Some(ctx.run_one(&base_spec, &settings, None, None, false)?.0)
            }
        }
        (None, None) => None,
    };
    Ok(ctx.run_one(&spec, &settings, baseline.as_deref(), a.jsonl.as_deref(), true)?.1)
}

struct RunContext<'a> {
    a: &'a EvalArgs,
    set: &'a TaskSet,
    model: &'a Model,
    model_sha256: &'a str,
    backend: &'a crate::backend::cpu::Cpu,
    weights: &'a DeviceWeights<crate::backend::cpu::Cpu>,
}

impl RunContext<'_> {
    /// Runs (or resumes) one strategy over the task, prints its summary and appends its rows to
    /// the CSV when it ran any example (a run resumed with nothing left to do appends none, so
    /// rerunning a script does not repeat rows; a baseline run that had nothing to do does not
    /// even print); returns its JSONL and the rows.
    fn run_one(
        &self,
        spec: &StrategySpec,
        settings: &RunSettings,
        baseline_path: Option<&Path>,
        jsonl: Option<&Path>,
        always_report: bool,
    ) -> Result<(PathBuf, Vec<EvalRow>)> {
        let a = self.a;
        let set = self.set;
        let jsonl = jsonl.map_or_else(|| default_jsonl(&a.out, &set.name, spec, self.model_sha256), Path::to_path_buf);
        let key = run_key(self.model_sha256, spec, settings)?;
        let baseline = baseline_path.map(load_baseline).transpose()?;
        let ev = Evaluator {
            model: self.model,
            backend: self.backend,
            weights: self.weights,
            spec: spec.clone(),
            settings: settings.clone(),
            prefix_reuse: !a.no_prefix_reuse,
        };
        // Resume: what the JSONL already holds for this run.
        let mut done: HashMap<(String, String), Record> = HashMap::new();
        if jsonl.exists() {
            for (i, r) in read_records(&jsonl, true)?.into_iter().enumerate() {
                if r.run_key != key {
                    bail!(
                        "{}: record {} was written by another run (run key {}, this run's is {key}: another model, \
                         strategy, seed or setting); pass --jsonl to write elsewhere",
                        jsonl.display(),
                        i + 1,
                        r.run_key
                    );
                }
                done.insert((r.task.clone(), r.id.clone()), r);
            }
        }
        let texts: Vec<String> = set.examples.iter().map(|e| format!("{}{}", set.prefixes[e.prefix], e.text)).collect();
        let mut todo = Vec::new();
        for (i, e) in set.examples.iter().enumerate() {
            match done.get(&(e.task.clone(), e.id.clone())) {
                Some(r) if r.prompt_sha256 != sha256_hex(texts[i].as_bytes()) => bail!(
                    "{}: {} {} was run on another prompt (the data or the prompt format changed); pass --jsonl to write elsewhere",
                    jsonl.display(),
                    e.task,
                    e.id
                ),
                Some(_) => {}
                None => todo.push(i),
            }
        }
        let n_resumed = set.examples.len() - todo.len();
        if !a.quiet {
            eprintln!(
            "{} with {} {}: {} examples{}; writing {}",
            set.name,
            spec.name,
            spec.params_string(),
            set.examples.len(),
            if n_resumed > 0 { format!(" ({n_resumed} already done)") } else { String::new() },
                jsonl.display()
            );
        }
        if let Some(dir) = jsonl.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&jsonl).with_context(|| format!("cannot open {}", jsonl.display()))?;
        let bar = crate::bench::progress_bar(todo.len() as u64, "examples", a.quiet || a.json);
        let (mut n_run, mut n_right) = (0usize, 0usize);
        let t_start = Instant::now();
        ev.evaluate(set, &todo, |e, o| {
            let correct = o.extracted.as_deref() == Some(e.gold.as_str());
            let b = baseline.as_ref().and_then(|b| b.get(&(e.task.clone(), e.id.clone())));
            let text = format!("{}{}", set.prefixes[e.prefix], e.text);
            let rec = Record {
                run_key: key.clone(),
                task: e.task.clone(),
                id: e.id.clone(),
                strategy: spec.name.clone(),
                params: spec.params_string(),
                prompt_sha256: sha256_hex(text.as_bytes()),
                prompt_tokens: o.prompt_tokens,
                prefix_tokens: o.prefix_tokens,
                gen_tokens: o.gen_ids.len(),
                generation: o.generation.clone(),
                extracted: o.extracted.clone(),
                gold: e.gold.clone(),
                correct,
                option_logprobs: o.option_logprobs.clone(),
                kv_bytes_end: o.kv_bytes_end,
                kv_bytes_peak: o.kv_bytes_peak,
                kv_bytes_fp16_end: o.kv_bytes_fp16_end,
                seconds: o.seconds,
                prefix_reused: o.prefix_reused,
                baseline_extracted: b.and_then(|b| b.extracted.clone()),
                agree: b.map(|b| b.extracted == o.extracted),
            };
            let mut line = serde_json::to_string(&rec)?;
            line.push('\n');
            file.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", jsonl.display()))?;
            file.flush()?;
            n_run += 1;
            n_right += usize::from(correct);
            let msg = format!("acc {n_right}/{n_run} ({:.1}%)", 100.0 * n_right as f64 / n_run as f64);
            bar.set_message(msg.clone());
            bar.inc(1);
            if bar.is_hidden() && !a.quiet && (n_run % 10 == 0 || n_run == todo.len()) {
                let rate = n_run as f64 / t_start.elapsed().as_secs_f64();
                eprintln!("{n_run}/{} examples, {rate:.3} examples/s, {msg}", todo.len());
            }
            done.insert((rec.task.clone(), rec.id.clone()), rec);
            Ok(())
        })?;
        bar.finish_and_clear();
        let ran = !todo.is_empty();
        let rows = if always_report || ran { self.report(spec, &jsonl, &done, baseline.as_ref(), baseline_path, ran)? } else { Vec::new() };
        Ok((jsonl, rows))
    }

    /// Prints the summary of each task, appends the CSV rows (when `append`, unless --no-csv)
    /// and returns them.
    fn report(
        &self,
        spec: &StrategySpec,
        jsonl: &Path,
        done: &HashMap<(String, String), Record>,
        baseline: Option<&HashMap<(String, String), Record>>,
        baseline_path: Option<&Path>,
        append: bool,
    ) -> Result<Vec<EvalRow>> {
        let set = self.set;
        let mut rows = Vec::new();
        let mut tasks: Vec<&str> = Vec::new();
        for e in &set.examples {
            if !tasks.contains(&e.task.as_str()) {
                tasks.push(&e.task);
            }
        }
        let selected: Vec<&Record> = set.examples.iter().filter_map(|e| done.get(&(e.task.clone(), e.id.clone()))).collect();
        let mut groups: Vec<(String, Vec<&Record>)> =
            tasks.iter().map(|t| (t.to_string(), selected.iter().copied().filter(|r| r.task == *t).collect())).collect();
        if tasks.len() > 1 {
            let all = set.name.split(':').next().unwrap_or(&set.name).to_string();
            groups.push((all, selected.clone()));
        }
        let (commit, dirty) = crate::bench::git_state();
        for (task, recs) in &groups {
            let Some(s) = summarize(recs, baseline) else { continue };
            let agree = s.agreement.map(|p| format!(", agreement with the baseline {:.1}% [{:.1}, {:.1}] of {}", 100.0 * p.value, 100.0 * p.lo95, 100.0 * p.hi95, p.n)).unwrap_or_default();
            if !self.a.quiet && !self.a.json {
                println!(
                "{task:<48} {} {:<10} accuracy {:.1}% [{:.1}, {:.1}] ({}/{}), no answer {}{agree}",
                spec.name,
                spec.params_string(),
                100.0 * s.accuracy.value,
                100.0 * s.accuracy.lo95,
                100.0 * s.accuracy.hi95,
                s.accuracy.k,
                    s.accuracy.n,
                    s.n_no_answer
                );
            }
            let row = EvalRow {
                timestamp: crate::bench::now_rfc3339(),
                commit: commit.clone(),
                dirty,
                machine: crate::bench::machine_description(),
                device: self.backend.describe(),
                threads: rayon::current_num_threads(),
                model: self.model.name.clone(),
                model_sha256: self.model_sha256.to_string(),
                task: task.clone(),
                mode: set.mode.clone(),
                shots: set.shots,
                strategy: spec.name.clone(),
                params: spec.params_string(),
                seed: spec.seed,
                max_new_tokens: self.a.max_new_tokens,
                limit: self.a.limit.map_or("all".into(), |l| l.to_string()),
                n_examples: s.accuracy.n,
                n_correct: s.accuracy.k,
                accuracy: s.accuracy.value,
                accuracy_lo95: s.accuracy.lo95,
                accuracy_hi95: s.accuracy.hi95,
                n_no_answer: s.n_no_answer,
                baseline: baseline_path.map(|p| p.display().to_string()).unwrap_or_default(),
                n_compared: s.agreement.map_or(0, |p| p.n),
                agreement: s.agreement.map(|p| p.value),
                agreement_lo95: s.agreement.map(|p| p.lo95),
                agreement_hi95: s.agreement.map(|p| p.hi95),
                kv_bytes_end_mean: s.kv_bytes_end_mean,
                kv_bytes_peak_max: s.kv_bytes_peak_max,
                kv_bytes_fp16_end_mean: s.kv_bytes_fp16_end_mean,
                compression: s.kv_bytes_fp16_end_mean / s.kv_bytes_end_mean.max(1.0),
                tokens_in: s.tokens_in,
                tokens_out: s.tokens_out,
                seconds: s.seconds,
                examples_per_s: s.accuracy.n as f64 / s.seconds.max(1e-9),
                prefix_reuse: !self.a.no_prefix_reuse && prefix_reusable(spec),
                jsonl: jsonl.display().to_string(),
            };
            if self.a.json {
                println!("{}", serde_json::to_string(&row)?);
            }
            if append && !self.a.no_csv {
                crate::bench::csvlog::append(&self.a.csv, &row)?;
            }
            rows.push(row);
        }
        if !self.a.no_csv && !self.a.quiet {
            if append {
                eprintln!("appended to {}", self.a.csv.display());
            } else {
                eprintln!("every example was already in {}: no row appended to {}", jsonl.display(), self.a.csv.display());
            }
        }
        Ok(rows)
    }
}
