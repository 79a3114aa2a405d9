//! `kvgear fetch --dataset` against a local HTTP server that serves the files of
//! `../shared/data` (and corrupted or missing ones), so the download, the sha256 checks and the
//! conversion of lm-evaluation-harness's YAML exemplars are tested without the internet.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use kvgear::fetch::{fetch_dataset, gsm8k_exemplars_from_yaml, DatasetSources};

/// Writes `key: text` as a YAML plain scalar folded at about 80 columns, as the harness's file is.
fn fold(out: &mut String, first: &str, cont_indent: usize, text: &str) {
    let mut line = first.to_string();
    for w in text.split(' ') {
        if line.len() + 1 + w.len() > 80 && !line.ends_with(": ") {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(cont_indent);
        } else if !line.ends_with(": ") && !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    out.push_str(&line);
    out.push('\n');
}

/// A `gsm8k-cot.yaml` in the harness's layout whose samples are the exemplars of `cot_8shot.txt`.
fn yaml_from_cot(cot: &str) -> String {
    let mut y = String::from("dataset_name: main\nfewshot_config:\n  sampler: first_n\n  samples:\n");
    for block in cot.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (q, a) = block.strip_prefix("Q: ").unwrap().split_once("\nA: ").unwrap();
        fold(&mut y, "  - question: ", 6, q);
        fold(&mut y, "    target: ", 6, a);
    }
    y.push_str("filter_list:\n- filter:\n  - function: regex\nnum_fewshot: 8\n");
    y
}

/// Serves `routes` (URL path -> body) on 127.0.0.1 until the test process ends; 404 elsewhere.
fn serve(routes: Vec<(String, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" || h == "\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, b)) => ("200 OK", b.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn shared_dir() -> Option<PathBuf> {
    common::shared("data/SHA256SUMS").map(|p| p.parent().unwrap().to_path_buf())
}

fn sources(base: &str) -> DatasetSources {
    DatasetSources { gsm8k: format!("{base}/gsm8k"), bbh: format!("{base}/bbh"), lm_eval: format!("{base}/lm") }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn gsm8k_downloads_check_sums_and_convert_the_exemplars() {
    let Some(data) = shared_dir() else { return };
    let train = read(&data.join("gsm8k/train.jsonl"));
    let test: Vec<u8> = String::from_utf8(train.clone()).unwrap().lines().take(3).map(|l| format!("{l}\n")).collect::<String>().into_bytes();
    let cot = String::from_utf8(read(&data.join("gsm8k/cot_8shot.txt"))).unwrap();
    let base = serve(vec![
        ("/gsm8k/grade_school_math/data/train.jsonl".into(), train.clone()),
        ("/gsm8k/grade_school_math/data/test.jsonl".into(), test.clone()),
        ("/lm/lm_eval/tasks/gsm8k/gsm8k-cot.yaml".into(), yaml_from_cot(&cot).into_bytes()),
    ]);
    let dir = common::temp_path("fetch-gsm8k");
    let _ = std::fs::remove_dir_all(&dir);

    // test.jsonl has no pinned sum: refused without --allow-unpinned, naming the way out.
    let err = format!("{:#}", fetch_dataset("gsm8k", &dir, &sources(&base), false).unwrap_err());
    assert!(err.contains("gsm8k/test.jsonl") && err.contains("--allow-unpinned"), "{err}");
    assert_eq!(read(&dir.join("gsm8k/train.jsonl")), train, "the pinned file was stored before");

    let files = fetch_dataset("gsm8k", &dir, &sources(&base), true).unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(read(&dir.join("gsm8k/test.jsonl")), test);
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    assert!(sums.contains("  gsm8k/test.jsonl"), "{sums}");
    // The exemplars rebuilt from the YAML are byte for byte the pinned cot_8shot.txt.
    assert_eq!(std::fs::read_to_string(dir.join("gsm8k/cot_8shot.txt")).unwrap(), cot);

    // The fetched directory loads, and a second fetch keeps the checked files.
    let set = kvgear::eval::prompt::load_task("gsm8k:test", &dir, None).unwrap();
    assert_eq!(set.examples.len(), 3);
    fetch_dataset("gsm8k", &dir, &sources("http://127.0.0.1:9"), false).unwrap();
}

#[test]
fn bbh_files_are_checked_and_a_corrupt_one_is_refused() {
    let Some(data) = shared_dir() else { return };
    let mut routes = Vec::new();
    for t in ["navigate", "word_sorting"] {
        routes.push((format!("/bbh/bbh/{t}.json"), read(&data.join(format!("bbh/{t}.json")))));
        routes.push((format!("/bbh/cot-prompts/{t}.txt"), read(&data.join(format!("bbh/cot-prompts/{t}.txt")))));
    }
    let mut bad = read(&data.join("bbh/hyperbaton.json"));
    let last = bad.len() - 3;
    bad[last] ^= 1;
    routes.push(("/bbh/bbh/hyperbaton.json".into(), bad));
    let base = serve(routes);
    let dir = common::temp_path("fetch-bbh");
    let _ = std::fs::remove_dir_all(&dir);
    fetch_dataset("bbh:navigate,word_sorting", &dir, &sources(&base), false).unwrap();
    for rel in ["bbh/navigate.json", "bbh/cot-prompts/word_sorting.txt"] {
        assert_eq!(read(&dir.join(rel)), read(&data.join(rel)), "{rel}");
    }
    let err = format!("{:#}", fetch_dataset("bbh:hyperbaton", &dir, &sources(&base), true).unwrap_err());
    assert!(err.contains("sha256") && err.contains("refusing"), "{err}");
    assert!(!dir.join("bbh/hyperbaton.json").exists(), "a file that fails its check is not stored");
    let err = format!("{:#}", fetch_dataset("bbh:snarks", &dir, &sources(&base), true).unwrap_err());
    assert!(err.contains("/bbh/bbh/snarks.json"), "a missing file names its URL: {err}");
    assert!(fetch_dataset("bbh:not_a_task", &dir, &sources(&base), true).is_err());
    assert!(fetch_dataset("squad", &dir, &sources(&base), true).is_err());
}

#[test]
fn yaml_exemplars_refuse_what_they_cannot_read() {
    let ok = "fewshot_config:\n  samples:\n  - question: A b\n      c?\n    target: D e. The answer\n      is 5.\nnum_fewshot: 1\n";
    assert_eq!(gsm8k_exemplars_from_yaml(ok).unwrap(), "Q: A b c?\nA: D e. The answer is 5.\n\n");
    assert!(gsm8k_exemplars_from_yaml("fewshot_config:\n  samples:\n  - question: 'quoted'\n    target: x\n").is_err());
    assert!(gsm8k_exemplars_from_yaml("fewshot_config:\n  samples:\n  - question: no target\n").is_err());
    assert!(gsm8k_exemplars_from_yaml("nothing: here\n").is_err());
}
