//! Hugging Face safetensors models: sharded and single-file layouts, bad files, name mapping.

use std::path::{Path, PathBuf};

use kvgear::format::quant::GgmlType;
use kvgear::format::safetensors::{gguf_tensor_name, SafetensorsModel};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A fresh empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("kvgear-test-{}-{nanos}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), bytes).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone)]
struct Tensor {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn tensor(name: &'static str, dtype: Dtype, shape: &[usize], seed: u8) -> Tensor {
    let n: usize = shape.iter().product();
    let bytes = n * dtype.bitsize() / 8;
    let data = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    Tensor {
        name,
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn serialize(tensors: &[Tensor]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        (
            t.name,
            TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

const CONFIG: &str =
    r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1}"#;

fn shard_a() -> Vec<Tensor> {
    vec![
        tensor("model.embed_tokens.weight", Dtype::BF16, &[5, 8], 1),
        tensor("model.layers.0.input_layernorm.weight", Dtype::F32, &[8], 2),
        tensor(
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            &[8, 8],
            3,
        ),
    ]
}

fn shard_b() -> Vec<Tensor> {
    vec![
        tensor("model.layers.0.self_attn.q_proj.bias", Dtype::F32, &[8], 4),
        tensor("model.norm.weight", Dtype::F32, &[8], 5),
        tensor("lm_head.weight", Dtype::F16, &[5, 8], 6),
        tensor("scalar", Dtype::F32, &[], 7),
    ]
}

const SHARD_A: &str = "model-00001-of-00002.safetensors";
const SHARD_B: &str = "model-00002-of-00002.safetensors";

fn index_json(entries: &[(&str, &str)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(name, file)| {
            (
                name.to_string(),
                serde_json::Value::String(file.to_string()),
            )
        })
        .collect();
    serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string()
}

fn full_index() -> Vec<(&'static str, &'static str)> {
    let a = shard_a().into_iter().map(|t| (t.name, SHARD_A));
    let b = shard_b().into_iter().map(|t| (t.name, SHARD_B));
    a.chain(b).collect()
}

fn sharded_model(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    dir.write("config.json", CONFIG);
    dir.write("tokenizer.json", "{}");
    dir.write(SHARD_A, serialize(&shard_a()));
    dir.write(SHARD_B, serialize(&shard_b()));
    dir.write("model.safetensors.index.json", index_json(&full_index()));
    dir
}

fn open_err(dir: &Path) -> String {
    match SafetensorsModel::open(dir) {
        Ok(_) => panic!("opened a bad model in {}", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_open_err(dir: &Path, needle: &str) {
    let msg = open_err(dir);
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
}

#[test]
fn sharded_model_round_trips() {
    let dir = sharded_model("sharded");
    let m = SafetensorsModel::open(&dir.0).unwrap();
    assert_eq!(m.config["hidden_size"], 8);
    assert_eq!(
        m.tokenizer_path.as_deref(),
        Some(dir.0.join("tokenizer.json").as_path())
    );
    assert_eq!(m.shards.len(), 2);
    assert_eq!(m.tensors.len(), 7);
    for (shard, tensors) in [shard_a(), shard_b()].into_iter().enumerate() {
        for t in tensors {
            let info = m
                .tensor(t.name)
                .unwrap_or_else(|| panic!("{} missing", t.name));
            let mut dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
            if dims.is_empty() {
                dims.push(1);
            }
            assert_eq!(info.dims, dims, "{}", t.name);
            let ty = match t.dtype {
                Dtype::F32 => GgmlType::F32,
                Dtype::F16 => GgmlType::F16,
                _ => GgmlType::BF16,
            };
            assert_eq!(info.ty, ty, "{}", t.name);
            assert_eq!(info.shard, shard, "{}", t.name);
            assert_eq!(info.n_elements(), t.shape.iter().product::<usize>() as u64);
            assert_eq!(m.tensor_data(info), &t.data[..], "{}", t.name);
        }
    }
    assert_eq!(
        m.tensor("model.embed_tokens.weight").unwrap().dims,
        vec![8, 5]
    );
    assert!(m.tensor("absent").is_none());
    assert!(m
        .require_tensor("absent")
        .unwrap_err()
        .to_string()
        .contains("absent"));
}

#[test]
fn single_file_model_without_tokenizer() {
    let dir = TempDir::new("single");
    dir.write("config.json", CONFIG);
    let tensors = shard_a();
    dir.write("model.safetensors", serialize(&tensors));
    let m = SafetensorsModel::open(&dir.0).unwrap();
    assert!(m.tokenizer_path.is_none());
    assert_eq!(m.shards.len(), 1);
    for t in &tensors {
        assert_eq!(
            m.tensor_data(m.require_tensor(t.name).unwrap()),
            &t.data[..]
        );
    }
}

#[test]
fn missing_pieces() {
    let dir = TempDir::new("missing");
    assert_open_err(&dir.0, "config.json");
    dir.write("config.json", "{not json");
    assert_open_err(&dir.0, "config.json as JSON");
    dir.write("config.json", "[1]");
    assert_open_err(&dir.0, "expected a JSON object");
    dir.write("config.json", CONFIG);
    assert_open_err(
        &dir.0,
        "neither model.safetensors nor model.safetensors.index.json",
    );
    dir.write("model.safetensors.index.json", index_json(&full_index()));
    assert_open_err(&dir.0, SHARD_A);
}

#[test]
fn bad_headers_are_errors() {
    let dir = TempDir::new("bad-header");
    dir.write("config.json", CONFIG);
    let good = serialize(&shard_a());

    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short", vec![1, 2, 3]),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        (
            "huge header length",
            u64::MAX.to_le_bytes().into_iter().chain(*b"{}").collect(),
        ),
        (
            "header past end",
            1000u64.to_le_bytes().into_iter().chain(*b"{}").collect(),
        ),
        (
            "bad json",
            4u64.to_le_bytes().into_iter().chain(*b"{{{{").collect(),
        ),
        ("data cut", good[..good.len() - 1].to_vec()),
        ("data extra", good.iter().copied().chain([0]).collect()),
    ];
    let mut bad_offsets = good.clone();
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let patched = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[1000000,", 1);
    assert_ne!(patched, header);
    bad_offsets.splice(
        8..8 + header_len,
        patched
            .bytes()
            .chain(std::iter::repeat_n(b' ', header_len))
            .take(header_len),
    );
    cases.push(("offsets past end", bad_offsets));
    for (what, bytes) in cases {
        dir.write("model.safetensors", &bytes);
        let msg = open_err(&dir.0);
        assert!(msg.contains("model.safetensors"), "{what}: {msg}");
    }
}

#[test]
fn truncated_shard_at_every_byte_is_an_error() {
    let dir = TempDir::new("truncated");
    dir.write("config.json", CONFIG);
    let good = serialize(&shard_b());
    for n in 0..good.len() {
        dir.write("model.safetensors", &good[..n]);
        assert!(
            SafetensorsModel::open(&dir.0).is_err(),
            "a shard cut to {n} of {} bytes opened",
            good.len()
        );
    }
}

#[test]
fn unsupported_dtype() {
    let dir = TempDir::new("dtype");
    dir.write("config.json", CONFIG);
    dir.write(
        "model.safetensors",
        serialize(&[tensor("model.layers.0.ids", Dtype::I64, &[3], 0)]),
    );
    assert_open_err(&dir.0, "tensor model.layers.0.ids has dtype I64");
}

#[test]
fn index_disagreements() {
    let dir = sharded_model("index");
    let mut wrong_shard = full_index();
    wrong_shard[0].1 = SHARD_B;
    dir.write("model.safetensors.index.json", index_json(&wrong_shard));
    assert_open_err(&dir.0, "but model.safetensors.index.json puts it in");

    let mut unlisted = full_index();
    unlisted.retain(|(name, _)| *name != "model.norm.weight");
    dir.write("model.safetensors.index.json", index_json(&unlisted));
    assert_open_err(&dir.0, "tensor model.norm.weight is in");

    let mut phantom = full_index();
    phantom.push(("model.layers.9.mlp.up_proj.weight", SHARD_A));
    dir.write("model.safetensors.index.json", index_json(&phantom));
    assert_open_err(&dir.0, "first model.layers.9.mlp.up_proj.weight");

    for bad in [
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
        "",
    ] {
        let mut escape = full_index();
        escape[0].1 = bad;
        dir.write("model.safetensors.index.json", index_json(&escape));
        assert_open_err(&dir.0, "not a file in the model directory");
    }

    dir.write("model.safetensors.index.json", r#"{"weight_map": {}}"#);
    assert_open_err(&dir.0, "weight_map is empty");
    dir.write("model.safetensors.index.json", r#"{"metadata": {}}"#);
    assert_open_err(&dir.0, "no \"weight_map\" object");
    dir.write(
        "model.safetensors.index.json",
        r#"{"weight_map": {"a": 3}}"#,
    );
    assert_open_err(&dir.0, "weight_map entry a is not a file name");

    let mut duplicated = full_index();
    duplicated.retain(|(name, _)| *name != "model.norm.weight");
    dir.write("model.safetensors.index.json", index_json(&duplicated));
    dir.write(
        SHARD_A,
        serialize(
            &[
                shard_a(),
                vec![tensor("model.norm.weight", Dtype::F32, &[8], 5)],
            ]
            .concat(),
        ),
    );
    duplicated.push(("model.norm.weight", SHARD_A));
    dir.write("model.safetensors.index.json", index_json(&duplicated));
    assert_open_err(
        &dir.0,
        "tensor model.norm.weight is in model-00002-of-00002.safetensors",
    );
}

#[test]
fn hf_to_gguf_names() {
    let cases = [
        ("model.embed_tokens.weight", Some("token_embd.weight")),
        ("model.norm.weight", Some("output_norm.weight")),
        ("lm_head.weight", Some("output.weight")),
        (
            "model.layers.0.self_attn.q_proj.weight",
            Some("blk.0.attn_q.weight"),
        ),
        (
            "model.layers.12.self_attn.k_proj.bias",
            Some("blk.12.attn_k.bias"),
        ),
        (
            "model.layers.3.self_attn.v_proj.bias",
            Some("blk.3.attn_v.bias"),
        ),
        (
            "model.layers.29.self_attn.o_proj.weight",
            Some("blk.29.attn_output.weight"),
        ),
        (
            "model.layers.1.mlp.gate_proj.weight",
            Some("blk.1.ffn_gate.weight"),
        ),
        (
            "model.layers.1.mlp.up_proj.weight",
            Some("blk.1.ffn_up.weight"),
        ),
        (
            "model.layers.1.mlp.down_proj.weight",
            Some("blk.1.ffn_down.weight"),
        ),
        (
            "model.layers.7.input_layernorm.weight",
            Some("blk.7.attn_norm.weight"),
        ),
        (
            "model.layers.7.post_attention_layernorm.weight",
            Some("blk.7.ffn_norm.weight"),
        ),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", None),
        ("model.layers.x.mlp.up_proj.weight", None),
        ("model.layers.01.mlp.up_proj.weight", None),
        ("model.layers..mlp.up_proj.weight", None),
        ("model.layers.0.mlp.up_proj.scales", None),
        ("model.layers.0.mlp.up_proj", None),
        ("model.layers.0", None),
        ("model.embed_tokens.bias", None),
        ("", None),
    ];
    for (hf, gguf) in cases {
        assert_eq!(gguf_tensor_name(hf).as_deref(), gguf, "{hf}");
    }
}
