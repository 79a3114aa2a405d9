//! Writes small valid GGUF files to seed the `gguf` fuzz corpus:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin write_seeds -- fuzz/corpus/gguf`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvgear::format::gguf::{GgufWriter, Value};
use kvgear::format::quant::GgmlType;

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: write_seeds DIR")?);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let seeds = [
        ("empty-v3", write(&[], &[])?),
        (
            "every-value-type",
            write(&every_value_type(), &[("t", vec![4], GgmlType::F32)])?,
        ),
        ("every-tensor-type", write(&[], &every_tensor_type())?),
        (
            "llama-like",
            write(&llama_like_metadata(), &llama_like_tensors())?,
        ),
        ("alignment-64", alignment_64()),
    ];
    for (name, bytes) in seeds {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write(metadata: &[(&str, Value)], tensors: &[(&str, Vec<u64>, GgmlType)]) -> Result<Vec<u8>> {
    let mut w = GgufWriter::new();
    for (key, value) in metadata {
        w.add_metadata(key, value.clone())?;
    }
    for (name, dims, ty) in tensors {
        w.add_tensor(name, dims, *ty)?;
    }
    let mut out = w.write_header(Vec::new())?;
    for (i, (name, dims, ty)) in tensors.iter().enumerate() {
        let n_elements: u64 = dims.iter().product();
        let n_bytes = ty.row_bytes(n_elements as usize).context("whole blocks")?;
        let data: Vec<u8> = (0..n_bytes).map(|j| (j * 7 + i * 13) as u8).collect();
        out.write_tensor(name, &data)?;
    }
    out.finish()
}

fn every_value_type() -> Vec<(&'static str, Value)> {
    vec![
        ("u8", Value::U8(1)),
        ("i8", Value::I8(-1)),
        ("u16", Value::U16(2)),
        ("i16", Value::I16(-2)),
        ("u32", Value::U32(3)),
        ("i32", Value::I32(-3)),
        ("u64", Value::U64(4)),
        ("i64", Value::I64(-4)),
        ("f32", Value::F32(0.5)),
        ("f64", Value::F64(-0.25)),
        ("bool", Value::Bool(true)),
        ("string", Value::String("héllo".into())),
        ("array", Value::Array(vec![Value::I32(1), Value::I32(2)])),
        (
            "nested",
            Value::Array(vec![
                Value::Array(vec![Value::String("a".into())]),
                Value::Array(vec![]),
            ]),
        ),
    ]
}

fn every_tensor_type() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    GgmlType::ALL
        .iter()
        .map(|&ty| (ty.name(), vec![ty.block_elems() as u64, 2], ty))
        .collect()
}

fn llama_like_metadata() -> Vec<(&'static str, Value)> {
    let strings =
        |items: &[&str]| Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect());
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny".into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(64)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            strings(&["<s>", "</s>", "a", "b", "ab"]),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array([3, 3, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ]
}

fn llama_like_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("token_embd.weight", vec![32, 5], GgmlType::Q8_0),
        ("blk.0.attn_norm.weight", vec![32], GgmlType::F32),
        ("blk.0.attn_q.weight", vec![32, 32], GgmlType::Q4_1),
        ("blk.0.ffn_down.weight", vec![64, 32], GgmlType::Q4_0),
        ("output_norm.weight", vec![32], GgmlType::F32),
    ]
}

/// A file with `general.alignment` = 64, which the writer does not produce.
fn alignment_64() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let key = "general.alignment";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&64u32.to_le_bytes());
    for (name, offset) in [("a", 0u64), ("b", 64)] {
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(64) + 64 + 16, 0x3f);
    b
}
