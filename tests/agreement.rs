//! The whole-model agreement checks of `kvgear selftest --model` (`backend::cuda::selftest_agree`),
//! run on the CPU: a backend compared with itself must agree on every token, over llama.cpp's
//! reference prompts; a broken reference file is a clear error.

mod common;

use kvgear::backend::cpu::Cpu;
use kvgear::backend::cuda::selftest_agree::{compare, AGREE_STRATEGIES};
use kvgear::model::Model;

#[test]
fn a_backend_agrees_with_itself_on_the_reference_prompts() {
    let Some(p) = common::default_model() else { return };
    let Some(r) = common::shared("reference/greedy.json") else { return };
    let m = Model::load(&p).unwrap();
    let cpu = Cpu::fast();
    let lines = compare((&cpu, "CPU"), (&cpu, "CPU again"), &m, &p, Some(&r), 1).unwrap();
    assert_eq!(lines.len(), 2 * AGREE_STRATEGIES.len());
    for l in &lines {
        eprintln!("{l}");
        assert!(l.pass, "{}: {}", l.shape, l.detail);
        assert_eq!(l.max_abs_err, 0.0, "{}: the same backend twice gives the same logits", l.shape);
        if l.kernel == "model_greedy" {
            assert!(l.shape.contains(", 0 tie(s), 0 different"), "{}", l.shape);
        } else {
            assert!(l.shape.contains("top-1 100.00% of") && l.shape.contains("100.00% of all"), "{}", l.shape);
        }
    }
    // fp16's text is llama.cpp's on every prompt (tests/model.rs), and the summary says so.
    assert!(lines[0].shape.contains("equals llama.cpp's for 4 of 4 prompts"), "{}", lines[0].shape);
}

#[test]
fn a_broken_reference_file_is_a_clear_error() {
    let Some(p) = common::default_model() else { return };
    let m = Model::load(&p).unwrap();
    let cpu = Cpu::fast();
    let bad = common::temp_path("bad-greedy.json");
    for (text, want) in [("{\"cases\": [{\"prompt\": \"x\"}]}", "n_predict"), ("not json", "JSON"), ("{\"cases\": []}", "no cases")] {
        std::fs::write(&bad, text).unwrap();
        let e = compare((&cpu, "a"), (&cpu, "b"), &m, &p, Some(&bad), 1).expect_err("an error");
        let msg = format!("{e:#}");
        assert!(msg.contains(want) && msg.contains("bad-greedy.json"), "{text}: {msg}");
    }
}
