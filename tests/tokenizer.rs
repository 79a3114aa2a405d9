//! Tokenizer and chat-template tests.
//!
//! Expected ids come from llama.cpp's tokenizer (commit 0c1e5709): for SmolLM2 they were computed
//! by a line-by-line Python port of `llama-vocab.cpp` and agree with the Hugging Face `tokenizers`
//! library built from the same vocabulary, and "The capital of France is" is the id list
//! `shared/reference/README.md` gives from llama.cpp itself. The SentencePiece fixture's ids come
//! from the same port and agree with the `sentencepiece` library except where llama.cpp differs
//! on purpose (a space after special tokens). Expected chat renderings come from Python's Jinja2
//! set up as transformers sets it up. See `tests/fixtures/tokenizer/README.md`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvgear::format::gguf::{GgufFile, Value};
use kvgear::model::chat::{apply_chat_template, template_or_default, ChatMessage, CHATML_TEMPLATE};
use kvgear::model::tokenizer::{synthetic_gpt2_metadata, StreamDecoder, TokenType, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

/// Texts every tokenizer must give back unchanged after encode and decode.
const ROUND_TRIP: &[&str] = &[
    "The capital of France is",
    "Hello, World! How are you today?",
    "emoji 😀👍🏽 and flags 🇫🇷, a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "Ελληνικά и русский текст, naïve façade",
    "digits 0123456789, 3.14159 and 1,000,000",
    "whitespace  runs   \t\t tabs\n\n\nnewlines \r\n and trailing   ",
    "   leading spaces",
    "x = [i**2 for i in range(10)]  # squares\n",
    "",
    " ",
];

/// Metadata in the fixture's JSON form: `[[key, {"TYPE": value}], ...]`, arrays as
/// `{"ARRAY": [element type, [values]]}` (GGUF's type names, as Python's `gguf` package prints them).
fn metadata_from_json(json: &serde_json::Value) -> Vec<(String, Value)> {
    fn scalar(ty: &str, x: &serde_json::Value) -> Value {
        match ty {
            "STRING" => Value::String(x.as_str().expect("string").to_owned()),
            "BOOL" => Value::Bool(x.as_bool().expect("bool")),
            "UINT32" => Value::U32(x.as_u64().expect("u32") as u32),
            "INT32" => Value::I32(x.as_i64().expect("i32") as i32),
            "FLOAT32" => Value::F32(x.as_f64().expect("f32") as f32),
            other => panic!("fixture type {other}"),
        }
    }
    json.as_array()
        .expect("metadata list")
        .iter()
        .map(|kv| {
            let key = kv[0].as_str().expect("key").to_owned();
            let (ty, x) = kv[1]
                .as_object()
                .expect("typed value")
                .iter()
                .next()
                .expect("one entry");
            let value = if ty == "ARRAY" {
                let element = x[0].as_str().expect("element type");
                Value::Array(
                    x[1].as_array()
                        .expect("values")
                        .iter()
                        .map(|e| scalar(element, e))
                        .collect(),
                )
            } else {
                scalar(ty, x)
            };
            (key, value)
        })
        .collect()
}

struct SpmFixture {
    tokenizer: Tokenizer,
    /// (text, ids without BOS, ids with BOS) as llama.cpp tokenizes them.
    cases: Vec<(String, Vec<u32>, Vec<u32>)>,
}

fn spm_fixture() -> &'static SpmFixture {
    static FIXTURE: OnceLock<SpmFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("spm_tiny.json")).expect("spm fixture");
        let json: serde_json::Value = serde_json::from_str(&text).expect("spm fixture json");
        let metadata = metadata_from_json(&json["metadata"]);
        let tokenizer = Tokenizer::from_gguf_metadata(&metadata).expect("spm fixture loads");
        let cases = serde_json::from_value(json["cases"].clone()).expect("spm cases");
        SpmFixture { tokenizer, cases }
    })
}

fn synthetic(n_vocab: usize) -> Tokenizer {
    let metadata = synthetic_gpt2_metadata(n_vocab).expect("synthetic metadata");
    Tokenizer::from_gguf_metadata(&metadata).expect("synthetic vocabulary loads")
}

fn synthetic_32k() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| synthetic(32000))
}

/// SmolLM2's tokenizer from the default model file, or `None` (with a printed reason) when the
/// file is absent or the GGUF reader cannot read it yet.
fn smollm() -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            let path = home.join(".cache/kvgear/models/SmolLM2-135M-Instruct.Q4_1.gguf");
            if !path.is_file() {
                println!(
                    "skipped: {} not found (kvgear fetch obtains it)",
                    path.display()
                );
                return None;
            }
            match GgufFile::open(&path) {
                Ok(file) => {
                    Some(Tokenizer::from_gguf_metadata(&file.metadata).expect("SmolLM2 tokenizer"))
                }
                Err(e) if e.to_string().contains("not written yet") => {
                    println!("skipped: {e}");
                    None
                }
                Err(e) => panic!("{}: {e:#}", path.display()),
            }
        })
        .as_ref()
}

fn stream_all(decoder: &mut StreamDecoder<'_>, ids: &[u32]) -> String {
    let mut out = String::new();
    for &id in ids {
        let piece = decoder.step(id).expect("step");
        assert!(
            !piece.contains(char::REPLACEMENT_CHARACTER),
            "partial character streamed: {piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&decoder.finish().expect("finish"));
    out
}

fn check_round_trips(tokenizer: &Tokenizer, name: &str) {
    for text in ROUND_TRIP {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(
            &tokenizer.decode(&ids).unwrap(),
            text,
            "{name}: decode(encode({text:?})) = ids {ids:?}"
        );
        let streamed = stream_all(&mut tokenizer.stream_decoder(), &ids);
        assert_eq!(&streamed, text, "{name}: streamed decode of {text:?}");
    }
}

// SmolLM2 (the default model): ids as llama.cpp gives them.

const SMOLLM_CASES: &[(&str, &[u32])] = &[
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:", &[17872, 42, 36366, 542, 3459, 23026, 288, 216, 36, 40, 282, 874, 2428, 281, 4124, 28, 284, 965, 1041, 3459, 2745, 347, 800, 23026, 281, 2405, 30, 1073, 800, 23026, 1250, 36366, 542, 5948, 13587, 281, 4124, 284, 2405, 47, 198, 21350, 42]),
    ("def fibonacci(n):\n", &[1604, 3987, 46477, 24, 94, 727, 198]),
    ("Once upon a time, in a small village by the sea,", &[6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28]),
    ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
    ("Café déjà vu.", &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]),
    ("  multiple   spaces", &[216, 2701, 256, 5600]),
    ("emoji 😀👍🏽, 中文 and Ελληνικά", &[391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 28, 216, 28589, 29184, 284, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112]),
    ("x = [i**2 for i in range(10)]\n\n\tprint(x)  \n", &[104, 446, 933, 89, 828, 34, 327, 2056, 281, 1845, 24, 33, 32, 8307, 1116, 197, 3272, 24, 104, 25, 32057]),
    ("I'm sure they've done it, haven't they?", &[57, 5248, 2090, 502, 3543, 2294, 357, 28, 8540, 982, 502, 47]),
    ("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", &[1, 9690, 198, 2683, 359, 253, 19484, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]),
];

#[test]
fn smollm_tokenizes_as_llama_cpp() {
    let Some(tok) = smollm() else { return };
    assert_eq!(tok.n_vocab(), 49152);
    for (text, expected) in SMOLLM_CASES {
        assert_eq!(
            &tok.encode(text, false).unwrap(),
            expected,
            "encode({text:?})"
        );
        // The file sets add_bos_token false: add_special adds nothing.
        assert_eq!(
            &tok.encode(text, true).unwrap(),
            expected,
            "encode({text:?}, add_special)"
        );
    }
}

#[test]
fn smollm_special_tokens() {
    let Some(tok) = smollm() else { return };
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert!(!tok.add_bos());
    // <|endoftext|>, <|im_end|> and <reponame> (FIM repo), as llama.cpp's end-of-generation set.
    assert_eq!(tok.eos_ids(), &[0, 2, 4]);
    assert!(tok.is_eos(2) && tok.is_eos(0) && !tok.is_eos(1) && !tok.is_eos(504));
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
    assert_eq!(tok.token_text(504), Some("The"));
    assert_eq!(tok.token_text(3575), Some("\u{120}capital"));
    assert_eq!(tok.token_text(49152), None);
    assert_eq!(tok.token_type(1), Some(TokenType::Control));
    assert_eq!(
        tok.decode(&[1, 4093, 198, 19556, 2]).unwrap(),
        "<|im_start|>user\nHello<|im_end|>"
    );
    assert!(tok
        .chat_template()
        .is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn smollm_perplexity_text() {
    let Some(tok) = smollm() else { return };
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/gsm8k_train_250.txt");
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("skipped: {} not found", path.display());
        return;
    };
    let ids = tok.encode(&text, false).unwrap();
    // llama-perplexity cuts these tokens into 96 chunks of 512.
    assert_eq!(ids.len(), 49542);
    assert_eq!(
        ids.iter().map(|&id| u64::from(id)).sum::<u64>(),
        148_781_866
    );
    assert_eq!(&ids[..8], &[17872, 42, 36366, 542, 3459, 23026, 288, 216]);
    assert_eq!(
        &ids[ids.len() - 8..],
        &[285, 273, 24482, 198, 1229, 216, 41, 1116]
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn smollm_round_trips_and_streams() {
    let Some(tok) = smollm() else { return };
    check_round_trips(tok, "SmolLM2");
    let chat = SMOLLM_CASES[SMOLLM_CASES.len() - 1].0;
    assert_eq!(tok.decode(&tok.encode(chat, false).unwrap()).unwrap(), chat);
}

#[test]
fn smollm_chat_prompt_tokenizes() {
    let Some(tok) = smollm() else { return };
    let template = tok.chat_template().expect("SmolLM2 has a chat template");
    let messages = [
        ChatMessage::system("You are a concise assistant."),
        ChatMessage::user("What is the capital of France?"),
    ];
    let bos = tok.token_text(tok.bos().unwrap()).unwrap();
    let eos = tok.token_text(tok.eos().unwrap()).unwrap();
    let prompt = apply_chat_template(template, &messages, true, bos, eos).unwrap();
    assert_eq!(prompt, SMOLLM_CHAT_EXPECTED);
    assert_eq!(tok.render_chat(&messages, true).unwrap(), prompt);
    let (text, ids) = SMOLLM_CASES[SMOLLM_CASES.len() - 1];
    assert_eq!(prompt, text);
    assert_eq!(tok.encode(&prompt, true).unwrap(), ids);
}

// A SentencePiece (llama) vocabulary: a small BPE model trained with sentencepiece.

#[test]
fn spm_tokenizes_as_llama_cpp() {
    let fixture = spm_fixture();
    let tok = &fixture.tokenizer;
    assert_eq!(tok.n_vocab(), 1200);
    assert!(tok.add_bos());
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert!(fixture.cases.len() >= 40);
    for (text, ids, ids_with_bos) in &fixture.cases {
        assert_eq!(&tok.encode(text, false).unwrap(), ids, "encode({text:?})");
        assert_eq!(
            &tok.encode(text, true).unwrap(),
            ids_with_bos,
            "encode({text:?}, add_special)"
        );
    }
}

#[test]
fn spm_byte_fallback_and_spaces() {
    let tok = &spm_fixture().tokenizer;
    // The snowman is not in the vocabulary: three byte tokens.
    let ids = tok.encode("\u{2603}", false).unwrap();
    let texts: Vec<&str> = ids.iter().map(|&id| tok.token_text(id).unwrap()).collect();
    assert_eq!(texts, ["\u{2581}", "<0xE2>", "<0x98>", "<0x83>"]);
    assert!(ids[1..]
        .iter()
        .all(|&id| tok.token_type(id) == Some(TokenType::Byte)));
    // A space is added in front of the text and taken off again by decode.
    let ids = tok.encode("the", false).unwrap();
    assert!(tok.token_text(ids[0]).unwrap().starts_with('\u{2581}'));
    assert_eq!(tok.decode(&ids).unwrap(), "the");
    // BOS renders as its text; the space of the word after it stays.
    let ids = tok.encode("the", true).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "<s> the");
}

#[test]
fn spm_round_trips_and_streams() {
    let tok = &spm_fixture().tokenizer;
    check_round_trips(tok, "SentencePiece fixture");
    for (text, _, _) in &spm_fixture().cases {
        if text.contains("<tool>") || text.contains("<s>") {
            continue;
        }
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text);
        assert_eq!(&stream_all(&mut tok.stream_decoder(), &ids), text);
    }
}

#[test]
fn spm_stream_continues_a_prompt() {
    let tok = &spm_fixture().tokenizer;
    let text = "Natalia sold 48 clips in April, café \u{2603} and then half as many.";
    let ids = tok.encode(text, true).unwrap();
    for split in 1..ids.len() {
        let (prompt, generated) = ids.split_at(split);
        let mut decoder = StreamDecoder::with_context(tok, prompt).unwrap();
        let mut streamed = tok
            .decode(prompt)
            .unwrap()
            .trim_end_matches(char::REPLACEMENT_CHARACTER)
            .to_owned();
        for &id in generated {
            streamed.push_str(&decoder.step(id).unwrap());
        }
        streamed.push_str(&decoder.finish().unwrap());
        assert_eq!(streamed, tok.decode(&ids).unwrap(), "split at {split}");
    }
}

// The synthetic byte-level vocabulary of `kvgear synth`.

#[test]
fn synthetic_vocabulary_is_valid() {
    for n_vocab in [259, 260, 1000, 32000, 128_256] {
        let metadata = synthetic_gpt2_metadata(n_vocab).unwrap();
        let get = |key: &str| {
            &metadata
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("{key}"))
                .1
        };
        let strings = |key: &str| -> Vec<String> {
            match get(key) {
                Value::Array(a) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => panic!("{key}: {other:?}"),
                    })
                    .collect(),
                other => panic!("{key}: {other:?}"),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens");
        let merges = strings("tokenizer.ggml.merges");
        assert_eq!(tokens.len(), n_vocab);
        assert!(merges.len() >= n_vocab - 259);
        assert_eq!(get("tokenizer.ggml.model"), &Value::String("gpt2".into()));
        let Value::Array(types) = get("tokenizer.ggml.token_type") else {
            panic!("token_type")
        };
        assert_eq!(types.len(), n_vocab);
        assert!(types[..3].iter().all(|t| *t == Value::I32(3)));
        assert!(types[3..].iter().all(|t| *t == Value::I32(1)));
        let set: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        assert_eq!(set.len(), n_vocab, "token texts are distinct");
        for merge in &merges {
            let (left, right) = merge.split_once(' ').expect("a merge is two tokens");
            assert!(set.contains(left) && set.contains(right), "merge {merge:?}");
            assert!(
                set.contains(format!("{left}{right}").as_str()),
                "merge {merge:?} makes a token"
            );
        }
        let tok = Tokenizer::from_gguf_metadata(&metadata).unwrap();
        assert_eq!(tok.n_vocab(), n_vocab);
        assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
        assert_eq!(tok.eos_ids(), &[0, 2]);
        let text = "The quick brown fox jumps over the lazy dog, 42 times!";
        assert_eq!(tok.decode(&tok.encode(text, true).unwrap()).unwrap(), text);
    }
    assert!(synthetic_gpt2_metadata(258).is_err());
    assert!(synthetic_gpt2_metadata(usize::MAX).is_err());
}

#[test]
fn synthetic_vocabulary_compresses_english() {
    let tok = synthetic_32k();
    let text = "The capital of France is Paris. There were many people in the city that year, \
                and they said it would never be the same.";
    let ids = tok.encode(text, false).unwrap();
    assert!(
        ids.len() * 3 < text.len(),
        "{} tokens for {} bytes",
        ids.len(),
        text.len()
    );
    assert_eq!(tok.encode(" the", false).unwrap().len(), 1);
}

#[test]
fn synthetic_round_trips_and_streams() {
    let tok = synthetic_32k();
    check_round_trips(tok, "synthetic");
    let chat = tok.render_chat(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.encode(&chat, false).unwrap()[0], 1);
    let text = "<|im_start|>user\nHi<|im_end|>\ntext<|endoftext|>more";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.contains(&2) && ids.contains(&0));
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Not special: close but not equal to a special token's text.
    let ids = tok.encode("<|im_start |>", false).unwrap();
    assert!(!ids.contains(&1));
}

#[test]
fn stream_waits_for_whole_characters() {
    let tok = synthetic_32k();
    // Each of these characters is several byte tokens in the synthetic vocabulary.
    let ids = tok.encode("😀中", false).unwrap();
    assert!(ids.len() >= 7);
    let mut decoder = tok.stream_decoder();
    let pieces: Vec<String> = ids.iter().map(|&id| decoder.step(id).unwrap()).collect();
    assert_eq!(pieces.concat(), "😀中");
    assert_eq!(pieces.iter().filter(|p| !p.is_empty()).count(), 2);
    // An incomplete character at the end comes out as U+FFFD on finish.
    let mut decoder = tok.stream_decoder();
    assert_eq!(decoder.step(ids[0]).unwrap(), "");
    assert_eq!(decoder.finish().unwrap(), "\u{FFFD}");
    // Bytes that never form a character are let out after a while, still adding up to decode.
    let stray = vec![3 + 0x80; 40];
    let mut decoder = tok.stream_decoder();
    let mut streamed = String::new();
    let mut n_nonempty = 0;
    for &id in &stray {
        let piece = decoder.step(id).unwrap();
        n_nonempty += usize::from(!piece.is_empty());
        streamed.push_str(&piece);
    }
    streamed.push_str(&decoder.finish().unwrap());
    assert!(n_nonempty >= 2);
    assert_eq!(streamed, tok.decode(&stray).unwrap());
    assert_eq!(streamed, "\u{FFFD}".repeat(40));
}

// The Hugging Face layout.

#[test]
fn hf_files_load() {
    let dir = fixtures().join("hf_bpe");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tok.n_vocab(), 600);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.eos_ids(), &[0, 2]);
    assert!(tok.add_bos());
    assert_eq!(tok.chat_template(), Some(CHATML_TEMPLATE));
    let text = "Natalia sold 48 clips in April.";
    let ids = [
        48, 293, 287, 75, 67, 373, 376, 318, 26, 570, 563, 85, 304, 461, 82, 84, 331, 16,
    ];
    assert_eq!(tok.encode(text, false).unwrap(), ids);
    let mut with_bos = vec![1];
    with_bos.extend(ids);
    assert_eq!(tok.encode(text, true).unwrap(), with_bos);
    let text = "Café 😀 <|im_end|> done";
    assert_eq!(
        tok.encode(text, false).unwrap(),
        [37, 67, 72, 130, 105, 223, 175, 256, 249, 225, 223, 2, 289, 297, 71]
    );
    check_round_trips(&tok, "Hugging Face fixture");
    assert!(tok.decode(&[600]).is_err());

    let only_json = Tokenizer::from_files(&dir.join("tokenizer.json"), None, None).unwrap();
    assert_eq!((only_json.bos(), only_json.eos_ids()), (None, &[][..]));
    assert!(Tokenizer::from_files(&dir.join("missing.json"), None, None).is_err());
}

// Bad input is an error, never a panic.

fn replace(metadata: &mut [(String, Value)], key: &str, value: Value) {
    metadata
        .iter_mut()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key}"))
        .1 = value;
}

#[test]
fn bad_metadata_is_an_error() {
    let base = synthetic_gpt2_metadata(300).unwrap();
    let error = |metadata: &[(String, Value)]| {
        Tokenizer::from_gguf_metadata(metadata)
            .unwrap_err()
            .to_string()
    };

    let mut md = base.clone();
    replace(
        &mut md,
        "tokenizer.ggml.pre",
        Value::String("nonsense".into()),
    );
    let message = error(&md);
    assert!(
        message.contains("'nonsense'")
            && message.contains("smollm")
            && message.contains("llama-bpe"),
        "{message}"
    );

    let mut md = base.clone();
    replace(
        &mut md,
        "tokenizer.ggml.model",
        Value::String("bert".into()),
    );
    assert!(error(&md).contains("bert"));

    let mut md = base.clone();
    replace(
        &mut md,
        "tokenizer.ggml.token_type",
        Value::Array(vec![Value::I32(1); 3]),
    );
    assert!(error(&md).contains("token_type"));

    let mut md = base.clone();
    replace(&mut md, "tokenizer.ggml.bos_token_id", Value::U32(300));
    assert!(error(&md).contains("bos_token_id"));

    let mut md = base.clone();
    replace(&mut md, "tokenizer.ggml.merges", Value::U32(7));
    assert!(error(&md).contains("merges"));

    let mut md = base.clone();
    replace(&mut md, "tokenizer.ggml.tokens", Value::Array(vec![]));
    assert!(error(&md).contains("empty"));

    let md: Vec<_> = base
        .iter()
        .filter(|(k, _)| k != "tokenizer.ggml.tokens")
        .cloned()
        .collect();
    assert!(error(&md).contains("tokenizer.ggml.tokens"));

    // Merges that cannot apply are skipped, as llama.cpp tolerates them.
    let mut md = base.clone();
    replace(
        &mut md,
        "tokenizer.ggml.merges",
        Value::Array(vec![
            Value::String("nospace".into()),
            Value::String(String::new()),
            Value::String("x y".into()),
            Value::String("\u{120} t".into()),
        ]),
    );
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(
        tok.decode(&tok.encode(" the xy", false).unwrap()).unwrap(),
        " the xy"
    );

    let tok = synthetic_32k();
    assert!(tok.decode(&[32000]).is_err());
    assert!(tok.stream_decoder().step(u32::MAX).is_err());
    assert!(StreamDecoder::with_context(tok, &[40000]).is_err());
}

// Chat templates.

/// SmolLM2-135M-Instruct's template, as its GGUF stores it.
const SMOLLM_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const SMOLLM_CHAT_EXPECTED: &str = "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn smollm_template_renders_as_jinja2() {
    let messages = [
        ChatMessage::system("You are a concise assistant."),
        ChatMessage::user("What is the capital of France?"),
    ];
    let rendered = apply_chat_template(
        SMOLLM_TEMPLATE,
        &messages,
        true,
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    assert_eq!(rendered, SMOLLM_CHAT_EXPECTED);
    let rendered = apply_chat_template(
        SMOLLM_TEMPLATE,
        &messages[1..],
        false,
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    );
}

#[test]
fn chatml_default() {
    assert_eq!(template_or_default(None), CHATML_TEMPLATE);
    assert_eq!(template_or_default(Some("x")), "x");
    let messages = [
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    let rendered = apply_chat_template(CHATML_TEMPLATE, &messages, true, "", "").unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Exercises what transformers' Jinja2 setup provides: trim_blocks, lstrip_blocks, Python string
/// and dict methods, `namespace`, `tojson`, `raise_exception`, Python's printing of booleans.
const PYCOMPAT_TEMPLATE: &str = r#"{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'].strip() -%}{%- endif -%}
{%- endfor %}
{% if ns.system %}
[SYS] {{ ns.system | upper }} {{ ns.system.lower().replace('be', 'BE') }} {{ ns.system.endswith(('x', '.')) }}
{% endif %}
{% for m in messages if m.role != 'system' %}
    {% if m.content.startswith('!') %}
{{ raise_exception('no bangs: ' + m.content) }}
    {% endif %}
<{{ m.role }}>{{ m.content.rstrip() }}|{{ m.content.split() | length }}|{{ m.content.lstrip('Hi') }}|{{ {'a': m.role, 'n': loop.index, 'x': [1, 2.5, none, true, 'q"\n']} | tojson }}
{% endfor %}
{% for k, v in {'k1': 1, 'k2': 'two'}.items() %}{{ k }}={{ v }};{% endfor %}
{{ {'a': [1, 2], 'b': {}} | tojson(indent=2) }}
{% if tools is not none %}tools!{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}
{{ eos_token }}
"#;

/// Python Jinja2's output for `PYCOMPAT_TEMPLATE` with the messages of the test.
const PYCOMPAT_EXPECTED: &str = "<s>[SYS] BE BRIEF. BE brief. True\n<user>Hi there, \u{fc}n\u{ef}code \u{2603}|4| there, \u{fc}n\u{ef}code \u{2603} |{\"a\": \"user\", \"n\": 1, \"x\": [1, 2.5, null, true, \"q\\\"\\n\"]}\n<assistant>Hello!|1|ello!\n|{\"a\": \"assistant\", \"n\": 2, \"x\": [1, 2.5, null, true, \"q\\\"\\n\"]}\nk1=1;k2=two;{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}\n<assistant></s>";

#[test]
fn template_python_compatibility() {
    let messages = [
        ChatMessage::system("  Be brief.  "),
        ChatMessage::user("Hi there, \u{fc}n\u{ef}code \u{2603} "),
        ChatMessage::assistant("Hello!\n"),
    ];
    let rendered = apply_chat_template(PYCOMPAT_TEMPLATE, &messages, true, "<s>", "</s>").unwrap();
    assert_eq!(rendered, PYCOMPAT_EXPECTED);
}

#[test]
fn template_errors() {
    let message = apply_chat_template(
        PYCOMPAT_TEMPLATE,
        &[ChatMessage::user("!bang")],
        false,
        "<s>",
        "</s>",
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("no bangs: !bang"), "{message}");
    assert!(apply_chat_template("{% for %}", &[], false, "", "").is_err());
    assert!(apply_chat_template(
        "{{ messages[0].content.nosuchmethod() }}",
        &[ChatMessage::user("x")],
        false,
        "",
        ""
    )
    .is_err());
    assert!(apply_chat_template("{{ 'a'.split('') }}", &[], false, "", "").is_err());
}

#[test]
fn template_string_methods() {
    let render = |template: &str| apply_chat_template(template, &[], false, "", "").unwrap();
    assert_eq!(render("{{ '  a b  c '.split() | join('|') }}"), "a|b|c");
    assert_eq!(render("{{ 'a,b,,c'.split(',') | join('|') }}"), "a|b||c");
    assert_eq!(render("{{ 'a,b,,c'.split(',', 1) | join('|') }}"), "a|b,,c");
    assert_eq!(render("{{ 'a,b,c'.rsplit(',', 1) | join('|') }}"), "a,b|c");
    assert_eq!(
        render("{{ ' a  b  c '.split(none, 1) | join('|') }}"),
        "a|b  c "
    );
    assert_eq!(
        render("{{ ' a  b  c '.rsplit(none, 1) | join('|') }}"),
        " a  b|c"
    );
    assert_eq!(
        render("{{ 'xxhixx'.strip('x') }}|{{ 'hello world'.title() }}|{{ 'hELLO'.capitalize() }}"),
        "hi|Hello World|Hello"
    );
    assert_eq!(render("{{ 'abcabc'.find('c') }} {{ 'abcabc'.rfind('c') }} {{ 'abc'.find('z') }} {{ 'abcabc'.count('bc') }}"), "2 5 -1 2");
    assert_eq!(render("{{ '-'.join(['a', 'b']) }} {{ '12'.isdigit() }} {{ ''.isdigit() }} {{ 'aXb'.replace('X', 'y') }}"), "a-b True False ayb");
    assert_eq!(render("{{ {'k': 1}.get('k') }} {{ {'k': 1}.get('z', 'd') }} {{ {'k': 1}.get('z') }} {{ {'b': 1, 'a': 2}.keys() | list | length }}"), "1 d None 2");
    assert_eq!(
        render("{{ 'caf\u{e9}' | tojson }} {{ 'caf\u{e9}' | tojson(ensure_ascii=true) }}"),
        "\"caf\u{e9}\" \"caf\\u00e9\""
    );
    assert!(render("{{ strftime_now('%Y-%m-%d') }}").len() == 10);
}
