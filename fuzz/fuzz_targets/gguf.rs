//! Parses arbitrary bytes as GGUF. On success it reads every tensor's bytes, exercises the
//! typed accessors, and checks that writing the file back out and parsing it again gives the
//! same metadata, tensor infos and bytes.

#![no_main]

use std::sync::Arc;

use kvgear::format::gguf::{GgufFile, GgufWriter, Storage, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse(Arc::new(Storage::Owned(data.to_vec()))) else {
        return;
    };
    let mut checksum = 0u64;
    for t in &file.tensors {
        let bytes = file.tensor_data(t);
        assert_eq!(bytes.len(), t.n_bytes);
        checksum = bytes.iter().fold(checksum, |acc, &b| {
            acc.wrapping_mul(31).wrapping_add(u64::from(b))
        });
    }
    std::hint::black_box(checksum);
    for (key, _) in &file.metadata {
        let _ = file.get_u32(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_str_array(key);
        let _ = file.get_f32_array(key);
        let _ = file.get_i32_array(key);
    }
    if file.get("general.alignment").is_none() {
        check_rewrite(&file);
    }
});

/// Writing a parsed file back out (alignment 32) and parsing it gives the same content.
fn check_rewrite(file: &GgufFile) {
    let mut w = GgufWriter::new();
    for (key, value) in &file.metadata {
        w.add_metadata(key, value.clone())
            .expect("a parsed value is writable");
    }
    for t in &file.tensors {
        w.add_tensor(&t.name, &t.dims, t.ty)
            .expect("a parsed tensor is writable");
    }
    let mut out = w.write_header(Vec::new()).expect("writing to a Vec");
    for t in &file.tensors {
        out.write_tensor(&t.name, file.tensor_data(t))
            .expect("a parsed tensor's bytes are writable");
    }
    let bytes = out.finish().expect("writing to a Vec");
    let again = GgufFile::parse(Arc::new(Storage::Owned(bytes))).expect("a written file parses");
    assert_eq!(again.metadata.len(), file.metadata.len());
    for ((k1, v1), (k2, v2)) in file.metadata.iter().zip(&again.metadata) {
        assert_eq!(k1, k2);
        assert!(same_value(v1, v2), "{k1}: {v1:?} != {v2:?}");
    }
    assert_eq!(again.tensors.len(), file.tensors.len());
    for (t1, t2) in file.tensors.iter().zip(&again.tensors) {
        assert_eq!(
            (&t1.name, &t1.dims, t1.ty, t1.n_bytes),
            (&t2.name, &t2.dims, t2.ty, t2.n_bytes)
        );
        assert_eq!(file.tensor_data(t1), again.tensor_data(t2));
    }
}

/// Equality that compares floats by their bits, so NaNs round-trip too.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        _ => a == b,
    }
}
