//! The `kvgear` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use kvgear::backend::{with_backend, Backend, DeviceChoice, WithBackend};
use kvgear::kv::strategy::StrategySpec;
use kvgear::model::llama::{DeviceWeights, Logits, Session};
use kvgear::model::Model;
use kvgear::sample::{Sampler, SamplerConfig};

#[derive(Parser)]
#[command(name = "kvgear", version, about = "Llama-family inference in little memory: 4-bit weights, GEAR/H2O KV-cache compression")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF file or Hugging Face safetensors directory (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Where to run: `auto` (CUDA device 0 when there is one, else CPU), `cpu` (fast SIMD
    /// backend), `cpu-ref` (the plain reference backend), `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Context length the KV cache can hold (default: the model's, capped at 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// Prompt tokens processed per forward batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Quantize the matrices in memory at load time (q4_0, q8_0, q4_k_m, ...), as `kvgear quantize` would.
    #[arg(long)]
    quantize: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming it to stdout.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, short = 'p')]
        prompt: String,
        /// Tokens to generate.
        #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
        n_predict: usize,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// System message for --chat.
        #[arg(long)]
        system: Option<String>,
        /// Greedy decoding (the default unless --temp is given).
        #[arg(long, conflicts_with = "temp")]
        greedy: bool,
        /// Sampling temperature.
        #[arg(long)]
        temp: Option<f32>,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        /// Sampling seed (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Print the generated token ids instead of text (one line).
        #[arg(long)]
        ids: bool,
    },
    /// Describe a model: architecture, parameters, quant types, weight bytes, KV bytes per token.
    Info {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a text file with llama.cpp's protocol (chunks of --ctx tokens, second half scored).
    Perplexity {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Score at most this many chunks.
        #[arg(long)]
        chunks: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Download the default model into the cache directory, or with --dataset an evaluation dataset.
    Fetch {
        /// gsm8k, bbh, bbh:TASK,..., or mmlu (several separated by spaces in one quoted argument
        /// are not accepted: repeat --dataset).
        #[arg(long)]
        dataset: Vec<String>,
        /// Data directory (default: $KVGEAR_DATA, else data/ in the cache directory).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Fetch files that kvgear has no pinned sha256 for, recording their sums in DATA/SHA256SUMS.
        #[arg(long)]
        allow_unpinned: bool,
    },
    /// Write a synthetic GGUF with a named config and seeded random weights.
    Synth(kvgear::synth::SynthArgs),
    /// Measure prefill and decode speed and memory; append a row to results/bench.csv.
    Bench(kvgear::bench::BenchArgs),
    /// Memory of weights, KV cache (by component) and scratch for a config, context, batch and
    /// strategy, from formulas; with --budget, the longest context and largest batch that fit.
    Memory(kvgear::bench::memory::MemoryArgs),
    /// Compare a KV strategy with the fp16 cache: KL, top-1 agreement, perplexity, first difference.
    Compare(kvgear::bench::CompareArgs),
    /// Run a grid (TOML) of bench, compare or memory points, one CSV row per point; resumable.
    Sweep(kvgear::bench::sweep::SweepArgs),
    /// Chart a results CSV as SVG and PNG: scatter (with the Pareto front), line or stacked bars.
    Plot(kvgear::bench::plot::PlotArgs),
    /// Accuracy on GSM8K, BBH or MMLU with a KV strategy, and agreement with a baseline run.
    Eval(kvgear::eval::EvalArgs),
    /// Quantize a GGUF file or a safetensors directory to a GGUF file (q4_0, q8_0, q4_k_m, ...).
    Quantize(kvgear::quantize::QuantizeArgs),
    /// Run every CUDA kernel against the CPU reference on random inputs.
    Selftest {
        /// Seed of the random inputs (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Time each kernel (GB/s) instead of checking it.
        #[arg(long)]
        bench: bool,
        /// Append the results to this CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Timed launches per kernel with --bench.
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Instead of the kernel checks, check that CUDA agrees with the CPU on this model
        /// (greedy tokens, teacher-forced top-1) for each KV strategy with a CUDA codec.
        #[arg(long)]
        model: Option<PathBuf>,
        /// With --model: take the prompts from this reference file (llama.cpp's greedy outputs,
        /// `shared/reference/greedy.json`) instead of random tokens: greedy over each prompt for
        /// its `n_predict` tokens, teacher forcing over the prompts and continuations.
        #[arg(long, requires = "model")]
        reference: Option<PathBuf>,
        /// With --model: run the agreement checks with the CPU reference backend in CUDA's
        /// place (no GPU needed): how far two correct implementations part, the yardstick for
        /// CUDA's figures. Always exits 0.
        #[arg(long, requires = "model")]
        cpu_baseline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn setup_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start the thread pool")?;
    }
    Ok(())
}

fn load(m: &ModelArgs) -> Result<Model> {
    setup_threads(m.threads)?;
    DeviceChoice::parse(&m.device)?;
    let path = kvgear::fetch::resolve_model(m.model.as_deref())?;
    kvgear::quantize::load_model(&path, m.quantize.as_deref())
}

fn ctx_of(m: &ModelArgs, model: &Model) -> usize {
    m.ctx.unwrap_or(model.config.n_ctx_train.min(4096))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let done: Result<()> = match cli.cmd {
        Cmd::Generate { m, prompt, n_predict, chat, system, greedy, temp, top_k, top_p, seed, ids } => {
            let model = load(&m)?;
            let seed = seed.unwrap_or_else(kvgear::rng::Rng::seed_from_time);
            let scfg = match (greedy, temp) {
                (_, Some(t)) if t > 0.0 => SamplerConfig { temperature: t, top_k, top_p, seed },
                _ => SamplerConfig::greedy(),
            };
            let text = if chat {
                let mut msgs = Vec::new();
                if let Some(s) = system {
                    msgs.push(kvgear::model::chat::ChatMessage { role: "system".into(), content: s });
                }
                msgs.push(kvgear::model::chat::ChatMessage { role: "user".into(), content: prompt });
                let tk = &model.tokenizer;
                let piece = |id: Option<u32>| id.and_then(|i| tk.token_text(i)).unwrap_or("").to_string();
                kvgear::model::chat::apply_chat_template(
                    kvgear::model::chat::template_or_default(tk.chat_template()),
                    &msgs,
                    true,
                    &piece(tk.bos()),
                    &piece(tk.eos()),
                )?
            } else {
                prompt
            };
            let tokens = model.tokenizer.encode(&text, true)?;
            if tokens.is_empty() {
                bail!("the prompt is empty after tokenization");
            }
            let n_ctx = ctx_of(&m, &model).max(tokens.len() + n_predict);
            let job = GenerateJob { model: &model, tokens: &tokens, n_ctx, batch: m.batch, n_predict, scfg, ids };
            with_backend(&m.device, job)
        }
        Cmd::Info { m, json } => {
            let model = load(&m)?;
            kvgear::bench::print_info(&model, json)
        }
        Cmd::Perplexity { m, file, chunks, json } => {
            let model = load(&m)?;
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let ctx = m.ctx.unwrap_or(512);
            let r = with_backend(&m.device, PerplexityJob { model: &model, text: &text, ctx, batch: m.batch, chunks })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "perplexity: {:.4} +/- {:.4} over {} chunks of {} tokens ({} scored), {:.1} tok/s",
                    r.ppl, r.ppl_stderr, r.n_chunks, r.ctx, r.n_scored, r.tokens_per_s
                );
            }
            Ok(())
        }
        Cmd::Fetch { dataset, data, allow_unpinned } if !dataset.is_empty() => {
            let dir = kvgear::eval::data::data_dir(data.as_deref())?;
            let sources = kvgear::fetch::DatasetSources::default();
            for d in &dataset {
                for p in kvgear::fetch::fetch_dataset(d, &dir, &sources, allow_unpinned)? {
                    println!("{}", p.display());
                }
            }
            Ok(())
        }
        Cmd::Fetch { data, allow_unpinned, .. } => {
            if data.is_some() || allow_unpinned {
                bail!("--data and --allow-unpinned go with --dataset");
            }
            let p = kvgear::fetch::fetch_default_model()?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Synth(a) => kvgear::synth::run(&a),
        Cmd::Bench(a) => kvgear::bench::run(&a),
        Cmd::Compare(a) => kvgear::bench::compare(&a),
        Cmd::Eval(a) => kvgear::eval::command(&a),
        Cmd::Memory(a) => kvgear::bench::memory::run(&a),
        Cmd::Quantize(a) => kvgear::quantize::run(&a),
        Cmd::Sweep(a) => kvgear::bench::sweep::run(&a),
        Cmd::Plot(a) => kvgear::bench::plot::run(&a).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
        Cmd::Selftest { seed, bench, csv, iters, model, reference, cpu_baseline } => {
            let opts = kvgear::backend::cuda::selftest::Options { seed, bench, csv, iters, model, reference, cpu_baseline };
            return kvgear::backend::cuda::selftest::command(&opts);
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

struct PerplexityJob<'a> {
    model: &'a Model,
    text: &'a str,
    ctx: usize,
    batch: usize,
    chunks: Option<usize>,
}

impl WithBackend for PerplexityJob<'_> {
    type Output = kvgear::bench::PerplexityResult;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output> {
        kvgear::bench::perplexity(self.model, backend, self.text, self.ctx, self.batch, self.chunks)
    }
}

struct GenerateJob<'a> {
    model: &'a Model,
    tokens: &'a [u32],
    n_ctx: usize,
    batch: usize,
    n_predict: usize,
    scfg: SamplerConfig,
    ids: bool,
}

impl WithBackend for GenerateJob<'_> {
    type Output = ();
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let GenerateJob { model, tokens, n_ctx, batch, n_predict, scfg, ids } = self;
        let mut sampler = Sampler::new(scfg.clone())?;
        kvgear::bench::check_fits(backend, model, &StrategySpec::fp16(), n_ctx, batch)?;
        let dw = DeviceWeights::new(backend, &model.weights)?;
        let mut sess = Session::new(backend, &model.config, &dw, n_ctx, batch)?;
        let t0 = Instant::now();
        let mut next = sampler.sample(sess.forward(tokens, Logits::Last)?);
        let t_prefill = t0.elapsed().as_secs_f64();
        let mut out = std::io::stdout().lock();
        let mut dec = kvgear::model::tokenizer::StreamDecoder::with_context(&model.tokenizer, tokens)?;
        let mut generated = Vec::new();
        let t1 = Instant::now();
        for i in 0..n_predict {
            if model.tokenizer.is_eos(next) {
                break;
            }
            generated.push(next);
            if !ids {
                let piece = dec.step(next)?;
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            if i + 1 == n_predict {
                break;
            }
            next = sampler.sample(sess.forward(&[next], Logits::Last)?);
        }
        if ids {
            let s: Vec<String> = generated.iter().map(|t| t.to_string()).collect();
            writeln!(out, "{}", s.join(" "))?;
        } else {
            out.write_all(dec.finish()?.as_bytes())?;
            writeln!(out)?;
        }
        let t_decode = t1.elapsed().as_secs_f64();
        eprintln!(
            "[{} prompt tokens in {:.2}s ({:.1} tok/s); {} generated in {:.2}s ({:.1} tok/s); {}; seed {}]",
            tokens.len(),
            t_prefill,
            tokens.len() as f64 / t_prefill,
            generated.len(),
            t_decode,
            generated.len().saturating_sub(1) as f64 / t_decode.max(1e-9),
            backend.describe(),
            scfg.seed
        );
        Ok(())
    }
}
