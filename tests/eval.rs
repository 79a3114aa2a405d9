//! The evaluation harness: loaders on the shared data and on malformed files, the prompt split's
//! tokenization, prefix reuse against recomputing the prefix for every kind of strategy, and a
//! run's JSONL, resume, agreement and CSV row.

mod common;

use std::path::{Path, PathBuf};

use kvgear::backend::cpu::Cpu;
use kvgear::eval::data::{self, BBH_TASKS};
use kvgear::eval::prompt::{self, Example, TaskSet};
use kvgear::eval::{EvalArgs, Evaluator, Outcome, RunSettings};
use kvgear::kv::strategy::StrategySpec;
use kvgear::model::llama::{DeviceWeights, Logits, Session};
use kvgear::model::Model;
use kvgear::sample::{greedy, SamplerConfig};

fn data_dir() -> Option<PathBuf> {
    common::shared("data/gsm8k/train.jsonl").map(|p| p.parent().unwrap().parent().unwrap().to_path_buf())
}

/// The BBH tasks whose files are in the data directory.
fn bbh_present(dir: &Path) -> Vec<&'static str> {
    BBH_TASKS.iter().copied().filter(|t| dir.join("bbh").join(format!("{t}.json")).exists()).collect()
}

#[test]
fn shared_data_loads() {
    let Some(dir) = data_dir() else { return };
    let train = data::load_gsm8k(&dir.join("gsm8k/train.jsonl")).unwrap();
    assert_eq!(train.len(), 7473);
    assert_eq!(train[0].gold, "72");
    assert_eq!(data::load_gsm8k_exemplars(&dir.join("gsm8k/cot_8shot.txt")).unwrap().len(), 8);
    let tasks = bbh_present(&dir);
    assert!(!tasks.is_empty());
    for t in &tasks {
        let items = data::load_bbh(&dir.join(format!("bbh/{t}.json"))).unwrap();
        assert!(items.len() >= 187, "{t}: {}", items.len());
        let p = data::load_bbh_prompt(&dir.join(format!("bbh/cot-prompts/{t}.txt"))).unwrap();
        assert!(!p.contains("canary") && !p.starts_with("-----"), "{t}: the canary header is removed");
        assert_eq!(p.matches("\nA: Let's think step by step.").count(), 3, "{t}: 3 exemplars");
    }
    // Every gold target normalizes under its task's answer kind.
    let spec = format!("bbh:{}", tasks.join(","));
    let set = prompt::load_task(&spec, &dir, None).unwrap();
    assert_eq!(set.prefixes.len(), tasks.len());
    assert!(set.examples.iter().all(|e| !e.gold.is_empty()));
    let set = prompt::load_task("gsm8k:train", &dir, Some(50)).unwrap();
    assert_eq!((set.examples.len(), set.shots, set.prefixes.len()), (50, 8, 1));
    assert_eq!(set.examples[0].id, "train-1");
    assert!(set.examples[0].text.starts_with("\n\nQ: Natalia sold clips") && set.examples[0].text.ends_with("\nA:"));
}

fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn malformed_files_name_the_file_and_line() {
    let dir = common::temp_path("eval-malformed");
    let good = r#"{"question": "q", "answer": "a #### 3"}"#;
    let p = write(&dir, "gsm8k/train.jsonl", &format!("{good}\n{good}\n{{\"question\": \"q\"\n"));
    let e = err_of(data::load_gsm8k(&p));
    assert!(e.contains("train.jsonl:3") && e.contains("JSON"), "{e}");
    let p = write(&dir, "gsm8k/train.jsonl", &format!("{good}\n{{\"question\": \"q\"}}\n"));
    let e = err_of(data::load_gsm8k(&p));
    assert!(e.contains("train.jsonl:2") && e.contains("answer"), "{e}");
    let p = write(&dir, "gsm8k/train.jsonl", &format!("{good}\n{{\"question\": \"q\", \"answer\": \"no hashes\"}}\n"));
    let e = err_of(data::load_gsm8k(&p));
    assert!(e.contains("train.jsonl:2") && e.contains("####"), "{e}");
    let p = write(&dir, "gsm8k/train.jsonl", &format!("{good}\n{{\"question\": 5, \"answer\": \"#### 1\"}}\n"));
    assert!(err_of(data::load_gsm8k(&p)).contains("train.jsonl:2"));

    let p = write(&dir, "gsm8k/cot_8shot.txt", "Q: a\nA: b The answer is 1.\n\nQ: c\nno answer line\n");
    let e = err_of(data::load_gsm8k_exemplars(&p));
    assert!(e.contains("cot_8shot.txt:4") && e.contains("A: "), "{e}");

    let p = write(&dir, "bbh/t.json", r#"{"examples": [{"input": "x", "target": "Yes"}, {"input": "y"}]}"#);
    let e = err_of(data::load_bbh(&p));
    assert!(e.contains("t.json") && e.contains("example 1") && e.contains("target"), "{e}");
    let p = write(&dir, "bbh/t.json", "{\"examples\": [\n{\"input\": \"x\",\n");
    let e = err_of(data::load_bbh(&p));
    assert!(e.contains("t.json") && e.contains("line"), "serde names the line: {e}");
    let p = write(&dir, "bbh/u.json", r#"{"canary": "c"}"#);
    assert!(err_of(data::load_bbh(&p)).contains("examples"));
    let p = write(&dir, "bbh/cot-prompts/t.txt", "BENCHMARK DATA canary GUID x\nTask.\n\nQ: a\nA: b\n");
    let e = err_of(data::load_bbh_prompt(&p));
    assert!(e.contains("t.txt:2") && e.contains("-----"), "{e}");
    let p = write(&dir, "bbh/cot-prompts/t.txt", "canary\n-----\nNo exemplars here.\n");
    assert!(err_of(data::load_bbh_prompt(&p)).contains("exemplar"));

    let row = |q: &str, c: &str| {
        format!(r#"{{"question": "{q}", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4", "correct_answer": "{c}", "topic": "t"}}"#)
    };
    let header = r#"{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer", "topic": "t"}"#;
    let p = write(&dir, "mmlu/mmlu.jsonl", &format!("{}\n{header}\n{}\n", row("a", "B"), row("b", "C")));
    let (items, skipped) = data::load_mmlu(&p).unwrap();
    assert_eq!((items.len(), skipped, items[1].answer, items[1].line), (2, 1, 'C', 3));
    let p = write(&dir, "mmlu/mmlu.jsonl", &format!("{}\n{}\n", row("a", "B"), row("b", "E")));
    let e = err_of(data::load_mmlu(&p));
    assert!(e.contains("mmlu.jsonl:2") && e.contains("correct_answer"), "{e}");

    // A missing file names itself and the command that fetches it.
    let e = err_of(prompt::load_task("gsm8k:test", &dir.join("nowhere"), None));
    assert!(e.contains("gsm8k/cot_8shot.txt") && e.contains("kvgear fetch --dataset gsm8k"), "{e}");
    let e = err_of(prompt::load_task("mmlu", &dir.join("nowhere"), None));
    assert!(e.contains("mmlu/mmlu.jsonl") && e.contains("kvgear fetch --dataset mmlu"), "{e}");
    assert!(err_of(prompt::load_task("squad", &dir, None)).contains("unknown task"));
    assert!(err_of(prompt::load_task("gsm8k:dev", &dir, None)).contains("split"));
}

#[test]
fn mmlu_limit_is_round_robin_over_subjects_and_skips_exemplars() {
    let dir = common::temp_path("eval-mmlu");
    let mut text = String::new();
    for (subject, n) in [("algebra", 8), ("law", 6), ("zoology", 9)] {
        for i in 0..n {
            text.push_str(&format!(
                r#"{{"question": "{subject} {i}", "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z", "correct_answer": "{}", "topic": "{subject}"}}"#,
                ["A", "B", "C", "D"][i % 4]
            ));
            text.push('\n');
        }
    }
    write(&dir, "mmlu/mmlu.jsonl", &text);
    let set = prompt::load_task("mmlu", &dir, Some(5)).unwrap();
    let ids: Vec<&str> = set.examples.iter().map(|e| e.id.as_str()).collect();
    // Subjects in name order; the first five questions of each are exemplars.
    assert_eq!(ids, ["line-6", "line-7", "line-14", "line-20", "line-21"]);
    assert_eq!(set.prefixes.len(), 3);
    assert!(set.prefixes[0].starts_with("The following are multiple choice questions (with answers) about algebra.\n\nalgebra 0\nA. w"));
    assert!(set.prefixes[0].ends_with("algebra 4\nA. w\nB. x\nC. y\nD. z\nAnswer: A"));
    assert_eq!(set.examples[0].text, "\n\nalgebra 5\nA. w\nB. x\nC. y\nD. z\nAnswer:");
    assert_eq!(set.examples[0].gold, "B");
    assert_eq!(prompt::load_task("mmlu:zoology", &dir, None).unwrap().examples.len(), 4);
    let cot = prompt::load_task("mmlu-cot:law", &dir, None).unwrap();
    assert!(cot.examples[0].text.ends_with("Answer choices: (A) w (B) x (C) y (D) z\nA: Let's think step by step."));
    assert!(prompt::load_task("mmlu:botany", &dir, None).is_err());
}

#[test]
fn split_prompts_tokenize_as_whole_prompts() {
    let (Some(dir), Some(mp)) = (data_dir(), common::default_model()) else { return };
    let model = Model::load(&mp).unwrap();
    let tk = &model.tokenizer;
    let mut specs = vec!["gsm8k:train".to_string()];
    let tasks = bbh_present(&dir);
    specs.push(format!("bbh:{}", tasks.join(",")));
    for spec in specs {
        let set = prompt::load_task(&spec, &dir, Some(20)).unwrap();
        for e in &set.examples {
            let p = &set.prefixes[e.prefix];
            let mut split = tk.encode(p, true).unwrap();
            split.extend(tk.encode(&e.text, false).unwrap());
            assert_eq!(split, tk.encode(&format!("{p}{}", e.text), true).unwrap(), "{} {}", e.task, e.id);
        }
    }
}

/// A short GSM8K-style task: two exemplars, three questions.
fn small_task(dir: &Path) -> TaskSet {
    let full = prompt::load_task("gsm8k:train", dir, Some(3)).unwrap();
    let prefix: String = full.prefixes[0].split("\n\nQ: ").take(2).collect::<Vec<_>>().join("\n\nQ: ");
    TaskSet { prefixes: vec![prefix], ..full }
}

fn run(model: &Model, b: &Cpu, dw: &DeviceWeights<Cpu>, spec: &StrategySpec, set: &TaskSet, reuse: bool, batch: usize) -> Vec<Outcome> {
    let ev = Evaluator {
        model,
        backend: b,
        weights: dw,
        spec: spec.clone(),
        settings: RunSettings { max_new_tokens: 6, n_batch: batch, sampler: SamplerConfig::greedy(), stops: vec!["Q:".into()] },
        prefix_reuse: reuse,
    };
    let mut out = Vec::new();
    let todo: Vec<usize> = (0..set.examples.len()).collect();
    ev.evaluate(set, &todo, |_, o| {
        out.push(o.clone());
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn reusing_the_prefix_equals_recomputing_it() {
    let (Some(dir), Some(mp)) = (data_dir(), common::default_model()) else { return };
    let model = Model::load(&mp).unwrap();
    let b = Cpu::fast();
    let dw = DeviceWeights::new(&b, &model.weights).unwrap();
    let set = small_task(&dir);
    // Batches of 16 cut the prefix in several and leave GEAR's 64-token buffer partly full at
    // the prefix's end, the case where a snapshot could go wrong.
    let batch = 16;
    let cases: [(&str, &[&str], bool); 5] = [
        ("fp16", &[], true),
        ("gear", &[], true),
        ("group", &["bits=2"], true),
        ("h2o", &["budget=90"], true),
        ("gear-h2o", &["budget=0.5"], false),
    ];
    for (name, kv, reusable) in cases {
        let kv: Vec<String> = kv.iter().map(|s| s.to_string()).collect();
        let spec = StrategySpec::parse(name, &kv, 7).unwrap();
        assert_eq!(kvgear::eval::prefix_reusable(&spec), reusable, "{name}");
        let fresh = run(&model, &b, &dw, &spec, &set, false, batch);
        let reused = run(&model, &b, &dw, &spec, &set, true, batch);
        assert!(fresh.iter().all(|o| !o.prefix_reused));
        assert_eq!(reused.iter().map(|o| o.prefix_reused).collect::<Vec<_>>(), [false, reusable, reusable], "{name}");
        for (f, r) in fresh.iter().zip(&reused) {
            assert_eq!(f.gen_ids, r.gen_ids, "{name}");
            assert_eq!((f.kv_bytes_end, f.kv_bytes_peak, f.prompt_tokens), (r.kv_bytes_end, r.kv_bytes_peak, r.prompt_tokens), "{name}");
        }
        // The evaluator follows the documented protocol: a fresh session, the prefix in one
        // call, the example in another, then greedy decoding.
        let e: &Example = &set.examples[2];
        let pre = model.tokenizer.encode(&set.prefixes[0], true).unwrap();
        let ex = model.tokenizer.encode(&e.text, false).unwrap();
        let mut s = Session::with_strategy(&b, &model.config, &dw, pre.len() + ex.len() + 8, batch, &spec).unwrap();
        s.set_prompt_len(pre.len() + ex.len());
        s.forward(&pre, Logits::None).unwrap();
        let mut next = greedy(s.forward(&ex, Logits::Last).unwrap());
        let mut ids = vec![next];
        while ids.len() < reused[2].gen_ids.len() {
            next = greedy(s.forward(&[next], Logits::Last).unwrap());
            ids.push(next);
        }
        assert_eq!(ids, reused[2].gen_ids, "{name}");
        assert_eq!(s.kv_bytes().total(), reused[2].kv_bytes_end, "{name}");
    }
}

#[test]
fn fraction_budgets_are_fractions_of_the_whole_prompt() {
    let (Some(dir), Some(mp)) = (data_dir(), common::default_model()) else { return };
    let model = Model::load(&mp).unwrap();
    let b = Cpu::fast();
    let dw = DeviceWeights::new(&b, &model.weights).unwrap();
    let set = small_task(&dir);
    let spec = StrategySpec::parse("h2o", &["budget=0.5".into()], 0).unwrap();
    let out = run(&model, &b, &dw, &spec, &set, true, 64);
    let per_token = model.config.kv_bytes_per_token_fp16();
    for o in &out {
        // fp16 storage: the tokens held are the budget, round(0.5 * prompt), plus H2O's f32
        // score per token and KV head.
        let held = (0.5 * o.prompt_tokens as f64).round() as usize;
        let policy = model.config.n_layers * model.config.n_kv_heads * held * 4;
        assert_eq!(o.kv_bytes_end, held * per_token + policy, "prompt of {}", o.prompt_tokens);
    }
}

fn args(dir: &Path, out: &Path, strategy: &str, limit: usize) -> EvalArgs {
    EvalArgs {
        task: "gsm8k:train".into(),
        strategy: strategy.into(),
        kv: Vec::new(),
        limit: Some(limit),
        seed: 0,
        data: Some(dir.to_path_buf()),
        max_new_tokens: 5,
        temp: None,
        top_k: 40,
        top_p: 0.95,
        baseline: None,
        vs: None,
        model: None,
        quantize: None,
        device: "cpu".into(),
        threads: None,
        batch: 64,
        out: out.to_path_buf(),
        jsonl: None,
        csv: out.join("eval.csv"),
        no_csv: false,
        no_prefix_reuse: false,
        json: false,
        quiet: false,
    }
}

#[test]
fn runs_resume_and_report_agreement() {
    let (Some(shared), Some(_)) = (data_dir(), common::default_model()) else { return };
    // A small data directory: two exemplars and four problems.
    let dir = common::temp_path("eval-run-data");
    let cot = std::fs::read_to_string(shared.join("gsm8k/cot_8shot.txt")).unwrap();
    write(&dir, "gsm8k/cot_8shot.txt", &cot.split("\n\n").take(2).collect::<Vec<_>>().join("\n\n"));
    let train = std::fs::read_to_string(shared.join("gsm8k/train.jsonl")).unwrap();
    write(&dir, "gsm8k/train.jsonl", &train.lines().take(4).map(|l| format!("{l}\n")).collect::<String>());
    let out = common::temp_path("eval-run-out");
    let _ = std::fs::remove_dir_all(&out);

    kvgear::eval::command(&args(&dir, &out, "fp16", 2)).unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect();
    assert_eq!(files.len(), 1);
    let base = files[0].clone();
    let first = kvgear::eval::read_records(&base, false).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|r| r.gen_tokens <= 5 && r.prompt_tokens > r.prefix_tokens && r.kv_bytes_peak >= r.kv_bytes_end));

    // An interrupted write leaves half a line: the next run drops it and goes on from there.
    let mut bytes = std::fs::read(&base).unwrap();
    bytes.extend_from_slice(b"{\"run_key\": \"trunc");
    std::fs::write(&base, bytes).unwrap();
    kvgear::eval::command(&args(&dir, &out, "fp16", 3)).unwrap();
    let second = kvgear::eval::read_records(&base, false).unwrap();
    assert_eq!(second.len(), 3);
    assert_eq!(second[..2], first[..], "finished examples are not redone");

    // Another strategy into the same file is refused.
    let mut a = args(&dir, &out, "gear", 3);
    a.jsonl = Some(base.clone());
    assert!(format!("{:#}", kvgear::eval::command(&a).unwrap_err()).contains("another run"));

    // Against the fp16 run: each record carries the baseline's answer and the agreement.
    let mut a = args(&dir, &out, "gear", 3);
    a.vs = Some("fp16".into());
    kvgear::eval::command(&a).unwrap();
    let gear: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".gear."))
        .collect();
    assert_eq!(gear.len(), 1, "{gear:?}");
    let recs = kvgear::eval::read_records(&gear[0], false).unwrap();
    assert_eq!(recs.len(), 3);
    for (r, b) in recs.iter().zip(&second) {
        assert_eq!(r.baseline_extracted, b.extracted);
        assert_eq!(r.agree, Some(r.extracted == b.extracted));
    }
    let csv = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    let mut rd = csv::Reader::from_reader(csv.as_bytes());
    let header = rd.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    let col = |r: &csv::StringRecord, name: &str| r[header.iter().position(|h| h == name).unwrap()].to_string();
    assert_eq!(rows.len(), 3, "fp16 twice (2 then 3 examples), gear once");
    assert_eq!(col(&rows[2], "strategy"), "gear");
    assert_eq!(col(&rows[2], "n_examples"), "3");
    assert_eq!(col(&rows[2], "n_compared"), "3");
    let agreement: f64 = col(&rows[2], "agreement").parse().unwrap();
    let expect = recs.iter().filter(|r| r.agree == Some(true)).count() as f64 / 3.0;
    assert!((agreement - expect).abs() < 1e-12);
    assert_eq!(col(&rows[0], "agreement"), "", "no baseline, no agreement");

    // Run again with nothing left to do: the summary is printed, no row is appended.
    kvgear::eval::command(&a).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("eval.csv")).unwrap(), csv, "a finished run appends no row");

    // For scripts: --json prints the summary row as one JSON object, --quiet prints nothing.
    let cli = |flag: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kvgear"))
            .args(["eval", "--task", "gsm8k:train", "--limit", "3", "--max-new-tokens", "5", "--no-csv", flag])
            .arg("--data")
            .arg(&dir)
            .arg("--out")
            .arg(&out)
            .arg("-m")
            .arg(common::default_model().unwrap())
            .env("KVGEAR_HOME", common::temp_path("eval-cli-home"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
    };
    let (json, _) = cli("--json");
    let lines: Vec<&str> = json.lines().collect();
    assert_eq!(lines.len(), 1, "{json}");
    let row: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(row["strategy"], "fp16");
    assert_eq!(row["n_examples"], 3);
    assert_eq!(row["n_correct"].as_u64().unwrap() as usize, second.iter().filter(|r| r.correct).count());
    let (stdout, stderr) = cli("--quiet");
    assert_eq!((stdout.as_str(), stderr.as_str()), ("", ""));
}
