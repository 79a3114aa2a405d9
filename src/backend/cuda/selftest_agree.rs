//! `kvgear selftest --model FILE`: whole-model agreement of the CUDA backend with the CPU fast
//! backend on one model file, for each KV strategy in [`AGREE_STRATEGIES`].
//!
//! - Greedy: from a few random prompts, both backends decode greedily; the token sequences must
//!   be equal. At the first step where they differ the run stops comparing that prompt (the
//!   contexts differ from there on); the difference is a failure unless the CPU's margin between
//!   its two best logits is within [`TIE_MARGIN_REL`] of the row's scale, in which case it is a
//!   tie that either backend may break either way, reported as such.
//! - Teacher-forced: both backends are fed the same prompt and then the same tokens one at a
//!   time (the decode path: GEMV, decode attention, and for evicting strategies the eviction
//!   each step); top-1 agreement over the steps whose CPU margin exceeds the tie tolerance must
//!   be at least [`TOP1_AGREEMENT_MIN`]. The raw agreement over all steps and the smallest
//!   margin are reported next to it.
//!
//! Synthetic models (random weights) have nearly flat logits, so ties are common there: that is
//! why margins are reported and ties excluded, not tolerated silently.
//!
//! With a reference file (`--reference shared/reference/greedy.json`, llama.cpp's greedy
//! continuations of the default model), the prompts are its prompts instead of random tokens:
//! greedy decoding runs each for its `n_predict` tokens, and also reports whether CUDA's text is
//! llama.cpp's; teacher forcing runs over the text of the prompts and their continuations.

use std::path::Path;

use anyhow::{Context, Result};

use super::backend::Cuda;
use super::selftest::{SelftestLine, SplitMix64, Tolerance};
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::kv::strategy::StrategySpec;
use crate::model::llama::{DeviceWeights, Logits, Session};
use crate::model::Model;

/// The strategies checked, with their `--kv` parameters; adding one (once its CUDA codec exists)
/// is one entry here. The evicting ones keep 48 tokens, and gear-h2o compresses its buffer every
/// 32 (the smallest buffer its 32-token key groups allow): within the checks' 56 to a few
/// hundred tokens, eviction, compression and eviction from compressed blocks all happen. At the
/// defaults (half the prompt, a 64-token buffer) gear-h2o would hold 16 tokens of a 32-token
/// prompt and never compress.
pub const AGREE_STRATEGIES: &[(&str, &[&str])] =
    &[("fp16", &[]), ("h2o", &["budget=48"]), ("gear", &[]), ("gear-h2o", &["budget=48", "buffer=32"])];
/// A step is a tie, where the backends may pick different tokens, when the CPU's top-2 margin is
/// at most this fraction of the row's largest |logit|. Both backends quantize activations to 8
/// bits per 32 values, and a code that rounds the other way moves the logits; measured between
/// the CPU fast and reference backends on the synthetic SmolLM2-135M Q4_1 (32 prompt + 24
/// forced tokens, fp16): the largest logit difference is 1.2e-2 to 1.6e-2 of the row scale per
/// step, and the one top-1 flip in 25 steps had a margin of 5.3e-3. The top logits move by less
/// than the largest difference, so 1e-2 separates ties from real disagreements; about 70% of
/// the steps of that run have a larger margin and are counted.
pub const TIE_MARGIN_REL: f64 = 1e-2;
/// Required teacher-forced top-1 agreement over non-tie steps (the target).
pub const TOP1_AGREEMENT_MIN: f64 = 0.99;
/// Greedy: prompts, prompt tokens, decoded tokens per prompt.
const GREEDY_PROMPTS: usize = 3;
const GREEDY_PROMPT_TOKENS: usize = 32;
const GREEDY_TOKENS: usize = 24;
/// Teacher-forced: prompt tokens (one batch), then forced tokens fed one at a time.
const FORCED_PROMPT_TOKENS: usize = 32;
const FORCED_TOKENS: usize = 256;

/// Margin between the best and second-best logit, and the row's largest |logit|.
fn margin_and_scale(logits: &[f32]) -> (f64, f64) {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let mut scale = 0.0f64;
    for &v in logits {
        scale = scale.max((v as f64).abs());
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    ((a - b) as f64, scale)
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
}

struct Runner<'a, B: Backend> {
    b: &'a B,
    model: &'a Model,
    dw: DeviceWeights<B>,
}

impl<'a, B: Backend> Runner<'a, B> {
    fn new(b: &'a B, model: &'a Model) -> Result<Self> {
        Ok(Runner { b, model, dw: DeviceWeights::new(b, &model.weights)? })
    }

    fn session(&self, spec: &StrategySpec, n_ctx: usize) -> Result<Session<'_, B>> {
        Session::with_strategy(self.b, &self.model.config, &self.dw, n_ctx, 64, spec)
    }

    /// Greedy decoding of `n` tokens: the logits of the prompt's last token and of each decoded
    /// token.
    fn greedy(&self, spec: &StrategySpec, prompt: &[u32], n: usize) -> Result<Vec<Vec<f32>>> {
        let mut s = self.session(spec, prompt.len() + n + 1)?;
        let mut rows = vec![s.forward(prompt, Logits::Last)?.to_vec()];
        for _ in 0..n {
            let next = crate::sample::greedy(rows.last().expect("one row at least"));
            rows.push(s.forward(&[next], Logits::Last)?.to_vec());
        }
        Ok(rows)
    }

    /// Teacher forcing: the logits after the prompt and after each forced token.
    fn forced(&self, spec: &StrategySpec, prompt: &[u32], forced: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut s = self.session(spec, prompt.len() + forced.len() + 1)?;
        let mut rows = vec![s.forward(prompt, Logits::Last)?.to_vec()];
        for &t in forced {
            rows.push(s.forward(&[t], Logits::Last)?.to_vec());
        }
        Ok(rows)
    }
}

fn line(kernel: &'static str, shape: String, max_abs: f64, max_rel: f64, mismatches: usize, problem: Option<String>, seed: u64) -> SelftestLine {
    SelftestLine {
        kernel,
        shape,
        max_abs_err: max_abs,
        max_rel_err: max_rel,
        tol: Tolerance { atol: 0.0, rtol: TIE_MARGIN_REL },
        mismatches,
        pass: problem.is_none(),
        detail: problem.map(|p| format!("seed {seed}: {p}")).unwrap_or_default(),
    }
}

fn error_line(kernel: &'static str, shape: String, e: anyhow::Error, seed: u64) -> SelftestLine {
    line(kernel, shape, f64::NAN, f64::NAN, 0, Some(format!("{e:#}")), seed)
}

/// The reference prompts: (prompt, tokens to decode, llama.cpp's continuation).
fn reference_cases(path: &Path) -> Result<Vec<(String, usize, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))?;
    let cases = v["cases"].as_array().with_context(|| format!("{}: no \"cases\" array", path.display()))?;
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let field = |k: &str| c[k].as_str().map(str::to_owned).with_context(|| format!("{}: case {i} has no string {k:?}", path.display()));
        let n = c["n_predict"].as_u64().with_context(|| format!("{}: case {i} has no n_predict", path.display()))?;
        out.push((field("prompt")?, n as usize, field("continuation")?));
    }
    if out.is_empty() {
        anyhow::bail!("{}: no cases", path.display());
    }
    Ok(out)
}

/// What the checks run over: greedy prompts with their token counts (and llama.cpp's text when
/// they come from a reference file), and the teacher-forced prompt and tokens.
struct Inputs {
    greedy: Vec<(Vec<u32>, usize, Option<String>)>,
    forced_prompt: Vec<u32>,
    forced: Vec<u32>,
}

fn inputs(model: &Model, reference: Option<&Path>, seed: u64) -> Result<Inputs> {
    let Some(path) = reference else {
        let n_vocab = model.config.n_vocab as u64;
        let mut rng = SplitMix64(seed ^ 0xa9ee);
        let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % n_vocab) as u32).collect() };
        let greedy = (0..GREEDY_PROMPTS).map(|_| (tokens(GREEDY_PROMPT_TOKENS), GREEDY_TOKENS, None)).collect();
        let forced_prompt = tokens(FORCED_PROMPT_TOKENS);
        return Ok(Inputs { greedy, forced_prompt, forced: tokens(FORCED_TOKENS) });
    };
    let cases = reference_cases(path)?;
    let mut greedy = Vec::new();
    let mut text = String::new();
    for (prompt, n, continuation) in cases {
        greedy.push((model.tokenizer.encode(&prompt, true)?, n, Some(continuation.clone())));
        text.push_str(&prompt);
        text.push_str(&continuation);
        text.push_str("\n\n");
    }
    let all = model.tokenizer.encode(&text, true)?;
    if all.len() <= FORCED_PROMPT_TOKENS {
        anyhow::bail!("{}: {} tokens of text, too few for teacher forcing", path.display(), all.len());
    }
    let end = all.len().min(FORCED_PROMPT_TOKENS + FORCED_TOKENS);
    Ok(Inputs { forced_prompt: all[..FORCED_PROMPT_TOKENS].to_vec(), forced: all[FORCED_PROMPT_TOKENS..end].to_vec(), greedy })
}

/// Runs the greedy and teacher-forced checks of `path` for every strategy, CUDA against the CPU
/// fast backend; one line each.
pub fn run(ordinal: usize, path: &Path, reference: Option<&Path>, seed: u64) -> Result<Vec<SelftestLine>> {
    let model = Model::load(path).with_context(|| format!("loading {}", path.display()))?;
    compare((&Cpu::fast(), "CPU"), (&Cuda::new(ordinal)?, "CUDA"), &model, path, reference, seed)
}

/// The same checks with the CPU reference backend in CUDA's place: how far two correct
/// implementations of the model part (the reference computes in f32/f64 without 8-bit
/// activations or f16 attention), the yardstick for CUDA's figures. Needs no GPU.
pub fn run_cpu_baseline(path: &Path, reference: Option<&Path>, seed: u64) -> Result<Vec<SelftestLine>> {
    let model = Model::load(path).with_context(|| format!("loading {}", path.display()))?;
    compare((&Cpu::fast(), "CPU fast"), (&Cpu::reference(), "CPU reference"), &model, path, reference, seed)
}

/// The greedy and teacher-forced checks of backend `b` against `a` (the oracle), each with the
/// name its messages use, for every strategy in [`AGREE_STRATEGIES`].
pub fn compare<A: Backend, B: Backend>(
    (a, a_name): (&A, &str),
    (b, b_name): (&B, &str),
    model: &Model,
    path: &Path,
    reference: Option<&Path>,
    seed: u64,
) -> Result<Vec<SelftestLine>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let inp = inputs(model, reference, seed)?;
    let (n_prompts, n_forced) = (inp.greedy.len(), inp.forced.len());
    let n_greedy = inp.greedy.iter().map(|g| g.1).max().unwrap_or(0);
    let what = if reference.is_some() { "reference" } else { "random" };
    let on_a = Runner::new(a, model)?;
    let on_b = Runner::new(b, model)?;
    let mut lines = Vec::new();
    for &(strat, params) in AGREE_STRATEGIES {
        let kv: Vec<String> = params.iter().map(|p| p.to_string()).collect();
        let spec = StrategySpec::parse(strat, &kv, seed)?;
        let strategy = if kv.is_empty() { strat.to_string() } else { format!("{strat}({})", kv.join(",")) };
        let shape = format!("{name} {strategy}, greedy {n_prompts} {what} prompts x {n_greedy} tokens");
        lines.push(match greedy_case((&on_a, a_name), (&on_b, b_name), &spec, &inp.greedy, model) {
            Ok((summary, max_abs, max_rel, bad, problem)) => line("model_greedy", format!("{shape}: {summary}"), max_abs, max_rel, bad, problem, seed),
            Err(e) => error_line("model_greedy", shape, e, seed),
        });
        let shape = format!("{name} {strategy}, {FORCED_PROMPT_TOKENS} prompt + {n_forced} forced {what} tokens");
        lines.push(match forced_case(&on_a, &on_b, &spec, &inp.forced_prompt, &inp.forced) {
            Ok((summary, max_abs, max_rel, bad, problem)) => line("model_top1", format!("{shape}: {summary}"), max_abs, max_rel, bad, problem, seed),
            Err(e) => error_line("model_top1", shape, e, seed),
        });
    }
    Ok(lines)
}

type CaseResult = (String, f64, f64, usize, Option<String>);

/// Greedy decoding on both backends from each prompt. With llama.cpp's text beside a prompt
/// (fp16 only: the other strategies change the output), the summary also counts the prompts whose
/// text from the backend under test is llama.cpp's; that count is information, the pass
/// criterion is the backend under test against the oracle.
fn greedy_case<A: Backend, B: Backend>(
    (oracle, a_name): (&Runner<A>, &str),
    (tested, b_name): (&Runner<B>, &str),
    spec: &StrategySpec,
    prompts: &[(Vec<u32>, usize, Option<String>)],
    model: &Model,
) -> Result<CaseResult> {
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    let (mut equal, mut ties, mut bad) = (0usize, 0usize, 0usize);
    let (mut llama_same, mut llama_total) = (0usize, 0usize);
    let mut min_margin = f64::INFINITY;
    let mut problem = None;
    for (p, (prompt, n, llama)) in prompts.iter().enumerate() {
        let want = oracle.greedy(spec, prompt, *n)?;
        let got = tested.greedy(spec, prompt, *n)?;
        if let (Some(llama), true) = (llama, spec.is_plain()) {
            let ids: Vec<u32> = got[..*n].iter().map(|r| crate::sample::greedy(r)).collect();
            llama_total += 1;
            llama_same += usize::from(model.tokenizer.decode(&ids)? == *llama);
        }
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let (margin, scale) = margin_and_scale(w);
            let err = max_diff(w, g);
            max_abs = max_abs.max(err);
            max_rel = max_rel.max(err / scale.max(f64::MIN_POSITIVE));
            min_margin = min_margin.min(margin / scale.max(f64::MIN_POSITIVE));
            let (tw, tg) = (crate::sample::greedy(w), crate::sample::greedy(g));
            if tw == tg {
                equal += 1;
                continue;
            }
            if margin <= TIE_MARGIN_REL * scale {
                ties += 1;
            } else {
                bad += 1;
                problem.get_or_insert_with(|| format!("prompt {p} step {i}: {b_name} picks {tg}, {a_name} {tw} with a margin of {margin:.3e} (row scale {scale:.3e})"));
            }
            // The sequences differ from here on: the rest of this prompt is not comparable.
            break;
        }
    }
    let mut summary = format!("{equal} equal tokens, {ties} tie(s), {bad} different; smallest CPU margin {min_margin:.1e} of scale");
    if llama_total > 0 {
        summary.push_str(&format!("; {b_name}'s text equals llama.cpp's for {llama_same} of {llama_total} prompts"));
    }
    Ok((summary, max_abs, max_rel, bad, problem))
}

fn forced_case<A: Backend, B: Backend>(oracle: &Runner<A>, tested: &Runner<B>, spec: &StrategySpec, prompt: &[u32], forced: &[u32]) -> Result<CaseResult> {
    let want = oracle.forced(spec, prompt, forced)?;
    let got = tested.forced(spec, prompt, forced)?;
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    let (mut same_all, mut counted, mut same_counted) = (0usize, 0usize, 0usize);
    let mut min_margin = f64::INFINITY;
    let mut first_bad = None;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let (margin, scale) = margin_and_scale(w);
        let err = max_diff(w, g);
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / scale.max(f64::MIN_POSITIVE));
        min_margin = min_margin.min(margin / scale.max(f64::MIN_POSITIVE));
        let same = crate::sample::greedy(w) == crate::sample::greedy(g);
        same_all += usize::from(same);
        if margin > TIE_MARGIN_REL * scale {
            counted += 1;
            same_counted += usize::from(same);
            if !same && first_bad.is_none() {
                first_bad = Some(i);
            }
        }
    }
    let n = want.len();
    let agreement = if counted == 0 { 1.0 } else { same_counted as f64 / counted as f64 };
    let summary = format!(
        "top-1 {:.2}% of {counted} non-tie steps, {:.2}% of all {n}; smallest CPU margin {min_margin:.1e} of scale",
        100.0 * agreement,
        100.0 * same_all as f64 / n as f64
    );
    let mut problem = None;
    if counted == 0 {
        problem = Some(format!("every one of the {n} steps is a tie: the check says nothing"));
    } else if agreement < TOP1_AGREEMENT_MIN {
        problem = Some(format!(
            "top-1 agreement {:.2}% < {:.0}% (first disagreement at step {})",
            100.0 * agreement,
            100.0 * TOP1_AGREEMENT_MIN,
            first_bad.unwrap_or(0)
        ));
    }
    Ok((summary, max_abs, max_rel, counted - same_counted, problem))
}
