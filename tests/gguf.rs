//! GGUF reader and writer: round trips, every error class on hand-built files, the real model.

use std::path::PathBuf;
use std::sync::Arc;

use kvgear::format::gguf::{GgufFile, GgufWriter, Storage, Value, DEFAULT_ALIGNMENT};
use kvgear::format::quant::GgmlType;

fn parse(bytes: &[u8]) -> anyhow::Result<GgufFile> {
    GgufFile::parse(Arc::new(Storage::Owned(bytes.to_vec())))
}

/// The full error chain, as `{:#}` prints it.
fn parse_err(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("parse succeeded on a bad file"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_err_contains(bytes: &[u8], needle: &str) {
    let msg = parse_err(bytes);
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
}

/// Deterministic bytes, different for each `seed`.
fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

fn every_value_type() -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", Value::String("llama".into())),
        kv("t.u8", Value::U8(250)),
        kv("t.i8", Value::I8(-7)),
        kv("t.u16", Value::U16(65000)),
        kv("t.i16", Value::I16(-30000)),
        kv("t.u32", Value::U32(4_000_000_000)),
        kv("t.i32", Value::I32(-2_000_000_000)),
        kv("t.u64", Value::U64(u64::MAX)),
        kv("t.i64", Value::I64(i64::MIN)),
        kv("t.f32", Value::F32(-1.5e-6)),
        kv("t.f64", Value::F64(std::f64::consts::PI)),
        kv("t.nan", Value::F32(f32::from_bits(0x7fc0_0001))),
        kv("t.true", Value::Bool(true)),
        kv("t.false", Value::Bool(false)),
        kv("t.empty_string", Value::String(String::new())),
        kv("t.unicode", Value::String("héllo ▁wörld 🦙".into())),
        kv(
            "t.strings",
            Value::Array(vec![
                Value::String("a".into()),
                Value::String(String::new()),
                Value::String("<0x0A>".into()),
            ]),
        ),
        kv(
            "t.f32s",
            Value::Array(vec![Value::F32(0.5), Value::F32(-2.0)]),
        ),
        kv(
            "t.i32s",
            Value::Array(vec![Value::I32(1), Value::I32(-3), Value::I32(6)]),
        ),
        kv("t.u8s", Value::Array(vec![Value::U8(0), Value::U8(255)])),
        kv("t.empty", Value::Array(vec![])),
        kv(
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::U16(1), Value::U16(2)]),
                Value::Array(vec![Value::String("x".into())]),
                Value::Array(vec![]),
            ]),
        ),
    ]
}

/// (name, dims, type); the last tensor's size is a multiple of the alignment, so the file has
/// no trailing padding and cutting any byte off the end loses data.
fn small_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("token_embd.weight", vec![32, 3], GgmlType::Q8_0),
        ("blk.0.attn_q.weight", vec![256, 2], GgmlType::Q4K),
        ("blk.0.attn_norm.weight", vec![5], GgmlType::F32),
        ("blk.0.ffn_up.weight", vec![64, 1, 2, 1], GgmlType::Q4_1),
        ("blk.0.x.bf16", vec![3, 3], GgmlType::BF16),
        ("output_norm.weight", vec![8], GgmlType::F32),
    ]
}

struct Built {
    bytes: Vec<u8>,
    metadata: Vec<(String, Value)>,
    data: Vec<Vec<u8>>,
}

fn build_small() -> Built {
    let metadata = every_value_type();
    let mut w = GgufWriter::new();
    for (k, v) in &metadata {
        w.add_metadata(k, v.clone()).unwrap();
    }
    let mut data = Vec::new();
    for (i, (name, dims, ty)) in small_tensors().into_iter().enumerate() {
        w.add_tensor(name, &dims, ty).unwrap();
        let n_elems: u64 = dims.iter().product();
        let n_bytes = ty.row_bytes(n_elems as usize).unwrap();
        data.push(pseudo_random_bytes(n_bytes, i as u64));
    }
    let mut out = w.write_header(Vec::new()).unwrap();
    for ((name, _, _), bytes) in small_tensors().iter().zip(&data) {
        out.write_tensor(name, bytes).unwrap();
    }
    Built {
        bytes: out.finish().unwrap(),
        metadata,
        data,
    }
}

#[test]
fn round_trip_is_bit_exact() {
    let built = build_small();
    let f = parse(&built.bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, DEFAULT_ALIGNMENT);
    assert_eq!(f.metadata.len(), built.metadata.len());
    for ((k, v), (k2, v2)) in f.metadata.iter().zip(&built.metadata) {
        assert_eq!(k, k2);
        match (v, v2) {
            (Value::F32(a), Value::F32(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{k}"),
            _ => assert_eq!(v, v2, "{k}"),
        }
    }
    assert_eq!(f.tensors.len(), small_tensors().len());
    for ((t, (name, dims, ty)), data) in f.tensors.iter().zip(small_tensors()).zip(&built.data) {
        assert_eq!(t.name, name);
        assert_eq!(t.dims, dims);
        assert_eq!(t.ty, ty);
        assert_eq!(t.n_bytes, data.len());
        assert_eq!(t.n_elements(), dims.iter().product::<u64>());
        assert_eq!(t.offset % DEFAULT_ALIGNMENT, 0, "{name} is not aligned");
        assert_eq!(f.tensor_data(t), &data[..], "{name}");
        assert_eq!(f.tensor(name), Some(t));
    }
    assert_eq!(built.bytes.len() % DEFAULT_ALIGNMENT as usize, 0);
    assert!(f.tensor("missing").is_none());
    assert!(f
        .require_tensor("missing")
        .unwrap_err()
        .to_string()
        .contains("missing"));

    let mut again = GgufWriter::new();
    for (k, v) in &f.metadata {
        again.add_metadata(k, v.clone()).unwrap();
    }
    for t in &f.tensors {
        again.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    let mut out = again.write_header(Vec::new()).unwrap();
    for t in &f.tensors {
        out.write_tensor(&t.name, f.tensor_data(t)).unwrap();
    }
    assert_eq!(
        out.finish().unwrap(),
        built.bytes,
        "rewriting a parsed file changed its bytes"
    );
}

/// The exact bytes llama.cpp's `gguf_write_to_file` produces for one u32 pair and one F32 [3].
#[test]
fn writer_layout_matches_the_spec_byte_for_byte() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", Value::U32(7)).unwrap();
    w.add_tensor("t", &[3], GgmlType::F32).unwrap();
    let mut out = w.write_header(Vec::new()).unwrap();
    let data: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    out.write_tensor("t", &data).unwrap();
    let bytes = out.finish().unwrap();

    let mut expected = Vec::new();
    expected.extend_from_slice(b"GGUF");
    expected.extend_from_slice(&3u32.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(b"a");
    expected.extend_from_slice(&4u32.to_le_bytes());
    expected.extend_from_slice(&7u32.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(b"t");
    expected.extend_from_slice(&1u32.to_le_bytes());
    expected.extend_from_slice(&3u64.to_le_bytes());
    expected.extend_from_slice(&0u32.to_le_bytes());
    expected.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(expected.len(), 74);
    expected.resize(96, 0);
    expected.extend_from_slice(&data);
    expected.resize(128, 0);
    assert_eq!(bytes, expected);
}

#[test]
fn open_memory_maps_a_written_file() {
    let built = build_small();
    let path = temp_path("open.gguf");
    std::fs::write(&path, &built.bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert!(matches!(*f.storage, Storage::Mmap(_)));
    for (t, data) in f.tensors.iter().zip(&built.data) {
        assert_eq!(f.tensor_data(t), &data[..]);
    }
    std::fs::write(&path, &built.bytes[..100]).unwrap();
    let msg = format!("{:#}", GgufFile::open(&path).err().unwrap());
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    std::fs::write(&path, b"").unwrap();
    assert!(GgufFile::open(&path).is_err());
    std::fs::remove_file(&path).unwrap();
    assert!(GgufFile::open(&path).is_err());
}

#[test]
fn streaming_to_a_file_round_trips() {
    let path = temp_path("stream.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("llama".into()))
        .unwrap();
    let big = pseudo_random_bytes(GgmlType::Q8_0.row_bytes(1024).unwrap() * 1024 * 3, 9);
    w.add_tensor("big", &[1024, 1024, 3], GgmlType::Q8_0)
        .unwrap();
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut out = w.write_header(file).unwrap();
    assert_eq!(out.next_tensor(), Some("big"));
    out.write_tensor("big", &big).unwrap();
    assert_eq!(out.next_tensor(), None);
    drop(out.finish().unwrap());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_data(f.require_tensor("big").unwrap()), &big[..]);
    std::fs::remove_file(&path).unwrap();
}

fn temp_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("kvgear-test-{}-{nanos}-{name}", std::process::id()))
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let built = build_small();
    parse(&built.bytes).unwrap();
    for n in 0..built.bytes.len() {
        assert!(
            parse(&built.bytes[..n]).is_err(),
            "a file cut to {n} of {} bytes parsed",
            built.bytes.len()
        );
    }
}

#[test]
fn truncating_only_trailing_padding_still_parses() {
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[3], GgmlType::F32).unwrap();
    let mut out = w.write_header(Vec::new()).unwrap();
    out.write_tensor("t", &[0u8; 12]).unwrap();
    let bytes = out.finish().unwrap();
    let f = parse(&bytes[..bytes.len() - 20]).unwrap();
    assert_eq!(f.tensor_data(&f.tensors[0]), &[0u8; 12]);
    assert!(parse(&bytes[..bytes.len() - 21]).is_err());
}

#[test]
fn corrupting_every_byte_never_panics() {
    let built = build_small();
    let header_len = parse(&built.bytes).unwrap().tensors[0].offset as usize;
    for i in 0..header_len {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = built.bytes.clone();
            bytes[i] ^= flip;
            if let Ok(f) = parse(&bytes) {
                for t in &f.tensors {
                    let _ = f.tensor_data(t).len();
                }
            }
        }
    }
}

/// Hand-built GGUF bytes.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.0.extend_from_slice(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u8(&mut self, v: u8) -> &mut Raw {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Raw {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A key with a u32 value.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Raw {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad(&mut self, alignment: usize) -> &mut Raw {
        let len = self.0.len().next_multiple_of(alignment);
        self.0.resize(len, 0);
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Raw {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// One tensor `name` with the given dims/type/offset and `data_bytes` of data.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data_bytes: usize) -> Vec<u8> {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(name, dims, ty, offset).pad(32).zeros(data_bytes);
    r.0
}

#[test]
fn hand_built_minimal_file_parses() {
    let bytes = one_tensor("t", &[4], 0, 0, 16);
    let f = parse(&bytes).unwrap();
    assert_eq!(f.tensors[0].n_bytes, 16);
    let mut v2 = Raw::header(2, 0, 1);
    v2.kv_u32("k", 1);
    assert_eq!(parse(&v2.0).unwrap().version, 2);
    assert_eq!(parse(&Raw::header(3, 0, 0).0).unwrap().metadata.len(), 0);
}

#[test]
fn wrong_magic() {
    let mut bytes = one_tensor("t", &[4], 0, 0, 16);
    bytes[3] = b'X';
    assert_err_contains(&bytes, "not a GGUF file");
    assert_err_contains(b"", "not a GGUF file");
    assert_err_contains(b"GGU", "not a GGUF file");
}

#[test]
fn wrong_version() {
    assert_err_contains(&Raw::header(1, 0, 0).0, "version 1 is not supported");
    assert_err_contains(&Raw::header(0, 0, 0).0, "unsupported GGUF version 0");
    assert_err_contains(&Raw::header(4, 0, 0).0, "unsupported GGUF version 4");
    assert_err_contains(&Raw::header(3u32.swap_bytes(), 0, 0).0, "big-endian");
}

#[test]
fn huge_counts_are_clean_errors() {
    for n in [1u64 << 60, u64::MAX, 1 << 32] {
        assert_err_contains(&Raw::header(3, 0, n).0, "metadata count");
        assert_err_contains(&Raw::header(3, n, 0).0, "tensor count");
        let mut key = Raw::header(3, 0, 1);
        key.u64(n).zeros(64);
        assert_err_contains(&key.0, "metadata key length");
        let mut string = Raw::header(3, 0, 1);
        string.str("k").u32(8).u64(n).zeros(64);
        assert_err_contains(&string.0, "string value length");
        let mut strings = Raw::header(3, 0, 1);
        strings
            .str("tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(n)
            .zeros(64);
        assert_err_contains(&strings.0, "array of string count");
        let mut nested = Raw::header(3, 0, 1);
        nested.str("k").u32(9).u32(9).u64(1).u32(0).u64(n).zeros(64);
        assert_err_contains(&nested.0, "array of u8 count");
        let mut name = Raw::header(3, 1, 0);
        name.u64(n).zeros(64);
        assert_err_contains(&name.0, "tensor name length");
    }
    let mut ok_count_bad_data = Raw::header(3, 0, 1);
    ok_count_bad_data.str("k").u32(9).u32(6).u64(3).u32(0);
    assert_err_contains(&ok_count_bad_data.0, "array of f32 count 3");
}

#[test]
fn offsets_past_the_end() {
    assert_err_contains(&one_tensor("t", &[4], 0, 0, 15), "past the end of the file");
    assert_err_contains(
        &one_tensor("t", &[4], 0, 32, 16),
        "past the end of the file",
    );
    assert_err_contains(
        &one_tensor("t", &[4], 0, u64::MAX - 31, 16),
        "past the end of the file",
    );
    assert_err_contains(
        &one_tensor("t", &[4], 0, 1 << 62, 16),
        "past the end of the file",
    );
}

#[test]
fn misaligned_offsets() {
    assert_err_contains(
        &one_tensor("t", &[4], 0, 16, 32),
        "not a multiple of the alignment 32",
    );
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("t", &[4], 0, 32)
        .pad(64)
        .zeros(64);
    assert_err_contains(&r.0, "not a multiple of the alignment 64");
}

#[test]
fn custom_alignment() {
    let mut r = Raw::header(3, 2, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[2], 0, 64)
        .pad(64)
        .zeros(128);
    let f = parse(&r.0).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.tensors[0].offset % 64, 0);
    assert_eq!(f.tensors[1].offset, f.tensors[0].offset + 64);

    for bad in [0u32, 48, 3] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", bad);
        assert_err_contains(&r.0, "general.alignment");
    }
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    assert_err_contains(&r.0, "expected a power of two");
}

#[test]
fn unknown_tensor_type() {
    assert_err_contains(
        &one_tensor("blk.0.x", &[32], 23, 0, 64),
        "tensor blk.0.x has unsupported type id 23",
    );
    assert_err_contains(
        &one_tensor("blk.0.x", &[32], 99, 0, 64),
        "tensor blk.0.x has unsupported type id 99",
    );
    assert_err_contains(&one_tensor("blk.0.x", &[32], 10, 0, 64), "q2_k");
}

#[test]
fn bad_dimensions() {
    assert_err_contains(&one_tensor("t", &[1, 1, 1, 1, 1], 0, 0, 4), "5 dimensions");
    assert_err_contains(&one_tensor("t", &[], 0, 0, 4), "0 dimensions");
    assert_err_contains(&one_tensor("t", &[4, 0], 0, 0, 4), "zero dimension");
    assert_err_contains(
        &one_tensor("t", &[1 << 32, 1 << 32, 1 << 32], 0, 0, 4),
        "overflows",
    );
    assert_err_contains(&one_tensor("t", &[1 << 40, 1 << 22], 0, 0, 4), "overflows");
    assert_err_contains(
        &one_tensor("t", &[33], 2, 0, 64),
        "row length 33 is not a multiple of the q4_0 block size 32",
    );
    assert_err_contains(
        &one_tensor("t", &[32, 3], 12, 0, 64),
        "not a multiple of the q4_k block size 256",
    );
    let mut r = Raw::header(3, 1, 0);
    r.str("t").u32(u32::MAX).zeros(64);
    assert_err_contains(&r.0, "4294967295 dimensions");
}

#[test]
fn duplicates() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[8], 0, 0)
        .tensor("t", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    assert_err_contains(&r.0, "tensor t appears twice");
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    assert_err_contains(&r.0, "metadata key k appears twice");
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    assert_err_contains(&r.0, "tensors a and b overlap");
}

#[test]
fn bad_values() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    assert_err_contains(&r.0, "unknown value type 13");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(77).u64(0);
    assert_err_contains(&r.0, "unknown element type 77");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(7).u8(2);
    assert_err_contains(&r.0, "bool value");
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(0).u8(0);
    assert_err_contains(&r.0, "not UTF-8");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(1).u8(0x80);
    assert_err_contains(&r.0, "not UTF-8");
}

#[test]
fn deeply_nested_arrays() {
    let nest = |depth: usize| {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(9);
        for _ in 1..depth {
            r.u32(9).u64(1);
        }
        r.u32(0).u64(1).u8(5);
        r.0
    };
    let f = parse(&nest(8)).unwrap();
    let mut v = f.get("k").unwrap();
    for _ in 0..8 {
        v = &v.as_array().unwrap()[0];
    }
    assert_eq!(v, &Value::U8(5));
    assert_err_contains(&nest(9), "nested deeper than 8");
    assert!(parse(&nest(100_000)).is_err());
}

#[test]
fn accessors() {
    let mut w = GgufWriter::new();
    let entries = [
        ("u8", Value::U8(7)),
        ("i64", Value::I64(123)),
        ("neg", Value::I32(-1)),
        ("big", Value::U64(1 << 40)),
        ("f64", Value::F64(0.25)),
        ("f32", Value::F32(1e-5)),
        ("yes", Value::Bool(true)),
        ("name", Value::String("SmolLM2".into())),
        (
            "tokens",
            Value::Array(vec![Value::String("<s>".into()), Value::String("a".into())]),
        ),
        (
            "scores",
            Value::Array(vec![Value::F32(-1.0), Value::F32(2.0)]),
        ),
        ("scores_f64", Value::Array(vec![Value::F64(0.5)])),
        ("types", Value::Array(vec![Value::I32(1), Value::I32(3)])),
        ("types_u8", Value::Array(vec![Value::U8(1), Value::U8(3)])),
    ];
    for (k, v) in entries {
        w.add_metadata(k, v).unwrap();
    }
    let f = parse(&w.write_header(Vec::new()).unwrap().finish().unwrap()).unwrap();
    assert_eq!(f.get_u32("u8").unwrap(), 7);
    assert_eq!(f.get_u32("i64").unwrap(), 123);
    assert_eq!(f.get_u64("big").unwrap(), 1 << 40);
    assert_eq!(f.get_f32("f64").unwrap(), 0.25);
    assert_eq!(f.get_f32("f32").unwrap(), 1e-5);
    assert!(f.get_bool("yes").unwrap());
    assert_eq!(f.get_str("name").unwrap(), "SmolLM2");
    assert_eq!(f.get_str_array("tokens").unwrap(), vec!["<s>", "a"]);
    assert_eq!(f.get_f32_array("scores").unwrap(), vec![-1.0, 2.0]);
    assert_eq!(f.get_f32_array("scores_f64").unwrap(), vec![0.5]);
    assert_eq!(f.get_i32_array("types").unwrap(), vec![1, 3]);
    assert_eq!(f.get_i32_array("types_u8").unwrap(), vec![1, 3]);
    assert_eq!(f.get("u8"), Some(&Value::U8(7)));
    assert_eq!(f.opt_u32("absent").unwrap(), None);
    assert_eq!(f.opt_f32("f32").unwrap(), Some(1e-5));

    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    assert!(err(f.get_u32("absent").map(drop)).contains("metadata key absent is missing"));
    assert!(err(f.get_u32("neg").map(drop)).contains("metadata key neg is i32 -1"));
    assert!(err(f.get_u32("big").map(drop)).contains("expected an integer that fits u32"));
    assert!(err(f.get_f32("name").map(drop)).contains("metadata key name is string \"SmolLM2\""));
    assert!(err(f.get_str("u8").map(drop)).contains("expected string"));
    assert!(err(f.get_bool("u8").map(drop)).contains("expected bool"));
    assert!(err(f.opt_u32("name").map(drop)).contains("name"));
    assert!(err(f.get_str_array("scores").map(drop)).contains("element 0 is f32 -1"));
    assert!(err(f.get_i32_array("name").map(drop)).contains("expected an array"));
    assert!(err(f.get_f32_array("absent").map(drop)).contains("missing"));
}

#[test]
fn writer_checks() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", Value::U8(1)).unwrap();
    assert!(w.add_metadata("k", Value::U8(1)).is_err());
    assert!(w
        .add_metadata("mixed", Value::Array(vec![Value::U8(1), Value::I8(1)]))
        .is_err());
    assert!(w
        .add_metadata(
            "mixed_inner",
            Value::Array(vec![Value::Array(vec![Value::U8(1), Value::F32(1.0)])])
        )
        .is_err());
    let mut deep = Value::U8(0);
    for _ in 0..9 {
        deep = Value::Array(vec![deep]);
    }
    assert!(w.add_metadata("deep", deep).is_err());
    assert!(w.add_metadata("general.alignment", Value::U32(64)).is_err());
    assert!(w.add_metadata("general.alignment", Value::U64(32)).is_err());
    w.add_metadata("general.alignment", Value::U32(32)).unwrap();

    assert!(w.add_tensor("q", &[33], GgmlType::Q4_0).is_err());
    assert!(w.add_tensor("q", &[], GgmlType::F32).is_err());
    assert!(w.add_tensor("q", &[1, 1, 1, 1, 1], GgmlType::F32).is_err());
    assert!(w.add_tensor("q", &[4, 0], GgmlType::F32).is_err());
    assert!(w.add_tensor("q", &[u64::MAX, 2], GgmlType::F32).is_err());
    w.add_tensor("a", &[2], GgmlType::F16).unwrap();
    assert!(w.add_tensor("a", &[2], GgmlType::F16).is_err());
    w.add_tensor("b", &[1], GgmlType::F32).unwrap();

    let mut out = w.write_header(Vec::new()).unwrap();
    assert!(out.write_tensor("b", &[0; 4]).is_err(), "out of order");
    assert!(out.write_tensor("a", &[0; 3]).is_err(), "wrong length");
    out.write_tensor("a", &[1, 2, 3, 4]).unwrap();
    assert!(out.finish().is_err(), "finish with b unwritten");

    let mut w = GgufWriter::new();
    w.add_tensor("a", &[2], GgmlType::F16).unwrap();
    let mut out = w.write_header(Vec::new()).unwrap();
    out.write_tensor("a", &[1, 2, 3, 4]).unwrap();
    assert!(out.write_tensor("c", &[]).is_err(), "past the last tensor");
    let bytes = out.finish().unwrap();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.tensor_data(&f.tensors[0]), &[1, 2, 3, 4]);
}

#[test]
fn real_model_smollm2() {
    let Some(home) = std::env::var_os("HOME") else {
        println!("skipped: HOME is not set");
        return;
    };
    let path = PathBuf::from(home).join(".cache/kvgear/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "skipped: {} is absent (kvgear fetch downloads it)",
            path.display()
        );
        return;
    }
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let embd = f.require_tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(f.tensor_data(embd).len(), 576 / 32 * 34 * 49152);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    for t in &f.tensors {
        assert_eq!(f.tensor_data(t).len(), t.n_bytes);
    }
}
