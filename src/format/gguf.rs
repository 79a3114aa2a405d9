//! GGUF v2/v3 reader and writer.
//!
//! Layout, all little-endian:
//!
//! ```text
//! "GGUF"  version: u32  n_tensors: u64  n_kv: u64
//! n_kv      x (key: string, value_type: u32, value)
//! n_tensors x (name: string, n_dims: u32, dims: [u64; n_dims], type: u32, offset: u64)
//! zero padding to `alignment`            <- data section starts here
//! tensor data, each tensor at data_start + offset, padded to `alignment`
//! ```
//!
//! A string is a u64 byte length followed by UTF-8 bytes; an array is an element type u32, a u64
//! count and the elements. `general.alignment` (default 32) sets the alignment.
//!
//! Parsing is bounded: every count, length and offset is checked against the bytes that remain
//! before anything is allocated for it, so a corrupt or hostile file gives an error, never a panic
//! or an allocation the file cannot back.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::quant::GgmlType;

/// Alignment of the data section and of every tensor when `general.alignment` is absent; the
/// writer always uses it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays nest at most this deep. The format sets no limit; this one keeps a crafted
/// file from recursing until the stack runs out. Real files use no nesting at all.
pub const MAX_ARRAY_DEPTH: usize = 8;

const MAGIC: [u8; 4] = *b"GGUF";
const WRITE_VERSION: u32 = 3;
const ALIGNMENT_KEY: &str = "general.alignment";

const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// A metadata value, every GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// Elements all have the same type. An empty array does not record an element type: the
    /// writer writes it as an empty `u8` array.
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => TYPE_U8,
            Value::I8(_) => TYPE_I8,
            Value::U16(_) => TYPE_U16,
            Value::I16(_) => TYPE_I16,
            Value::U32(_) => TYPE_U32,
            Value::I32(_) => TYPE_I32,
            Value::U64(_) => TYPE_U64,
            Value::I64(_) => TYPE_I64,
            Value::F32(_) => TYPE_F32,
            Value::F64(_) => TYPE_F64,
            Value::Bool(_) => TYPE_BOOL,
            Value::String(_) => TYPE_STRING,
            Value::Array(_) => TYPE_ARRAY,
        }
    }

    /// The type's name as error messages spell it (`u32`, `string`, `array`).
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_id())
    }

    /// Any integer value that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits an `i32`.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_i64().and_then(|v| i32::try_from(v).ok())
    }

    /// An `f32`, or an `f64` rounded to `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// What the value is, short enough for an error message.
    fn describe(&self) -> String {
        match self {
            Value::String(s) if s.len() <= 40 => format!("string {s:?}"),
            Value::String(s) => format!("string of {} bytes", s.len()),
            Value::Array(a) => match a.first() {
                Some(first) => format!("array of {} {}", a.len(), first.type_name()),
                None => "empty array".to_string(),
            },
            Value::F32(v) => format!("f32 {v}"),
            Value::F64(v) => format!("f64 {v}"),
            Value::Bool(v) => format!("bool {v}"),
            other => match (other.as_u64(), other.as_i64()) {
                (Some(v), _) => format!("{} {v}", other.type_name()),
                (None, Some(v)) => format!("{} {v}", other.type_name()),
                (None, None) => other.type_name().to_string(),
            },
        }
    }
}

fn type_name(id: u32) -> &'static str {
    match id {
        TYPE_U8 => "u8",
        TYPE_I8 => "i8",
        TYPE_U16 => "u16",
        TYPE_I16 => "i16",
        TYPE_U32 => "u32",
        TYPE_I32 => "i32",
        TYPE_F32 => "f32",
        TYPE_BOOL => "bool",
        TYPE_STRING => "string",
        TYPE_ARRAY => "array",
        TYPE_U64 => "u64",
        TYPE_I64 => "i64",
        TYPE_F64 => "f64",
        _ => "unknown",
    }
}

/// The fewest bytes one value of type `id` takes in a file; `None` for an unknown type.
fn min_value_bytes(id: u32) -> Option<usize> {
    Some(match id {
        TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
        TYPE_U16 | TYPE_I16 => 2,
        TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
        TYPE_U64 | TYPE_I64 | TYPE_F64 => 8,
        // u64 length, no bytes.
        TYPE_STRING => 8,
        // u32 element type, u64 count, no elements.
        TYPE_ARRAY => 12,
        _ => return None,
    })
}

/// Smallest metadata pair: an empty key (8), a value type (4), a one-byte value (1).
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// Smallest tensor info: an empty name (8), n_dims (4), one dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;

/// GGML type ids kvgear does not read, named so an error says what the file holds.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "q4_2 (removed)",
        5 => "q4_3 (removed)",
        9 => "q8_1",
        10 => "q2_k",
        11 => "q3_k",
        15 => "q8_k",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        _ => return None,
    })
}

/// One tensor's description. `dims` is in GGML order: `dims[0]` is the row length.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Number of elements, the product of `dims` (saturating; a parsed info never overflows).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// The bytes a GGUF file lives in: a memory map, or owned bytes (tests, fuzzing).
pub enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    /// Drops the pages of `offset..offset + n_bytes` of a memory-mapped file from the resident
    /// set (owned bytes are kept): the map is read-only and private, so the pages are read back
    /// from the unchanged file if they are touched again.
    pub fn release(&self, offset: usize, n_bytes: usize) {
        if let Storage::Mmap(m) = self {
            // SAFETY: DONTNEED on a read-only file mapping discards no data: the pages come back
            // unchanged from the file on the next access. A failure only leaves them resident.
            let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, n_bytes) };
        }
    }
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

impl Storage {
    /// Memory-maps a file read-only.
    pub fn map(path: &Path) -> Result<Storage> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        if len == 0 {
            return Ok(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only. Like every memory-mapped model loader, this relies on the
        // file not being truncated or rewritten while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        Ok(Storage::Mmap(map))
    }
}

pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, Value)>,
    /// In file order; `offset`s are absolute and every range lies inside `storage`.
    pub tensors: Vec<TensorInfo>,
    pub storage: Arc<Storage>,
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file; errors name the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let storage = Storage::map(path)?;
        GgufFile::parse(Arc::new(storage))
            .with_context(|| format!("reading GGUF file {}", path.display()))
    }

    /// Parses a whole GGUF file held in `storage`.
    pub fn parse(storage: Arc<Storage>) -> Result<GgufFile> {
        let (version, alignment, metadata, tensors) = parse_bytes(&storage)?;
        Ok(GgufFile {
            version,
            alignment,
            metadata,
            tensors,
            storage,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match f(v) {
                Some(t) => Ok(Some(t)),
                None => bail!(
                    "metadata key {key} is {}, expected {expected}",
                    v.describe()
                ),
            },
        }
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>>) -> Result<T> {
        value?.ok_or_else(|| anyhow!("metadata key {key} is missing"))
    }

    /// An integer of any type whose value fits a `u32`.
    /// A missing key is `Ok(None)`; a value of another type is an error.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer that fits u32", Value::as_u32)
    }

    /// A non-negative integer of any type; missing is `Ok(None)`, another type an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// An `f32` or `f64`; missing is `Ok(None)`, another type an error.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "f32 or f64", Value::as_f32)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "bool", Value::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "string", Value::as_str)
    }

    /// An integer of any type whose value fits a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.required(key, self.opt_u32(key))
    }

    /// A non-negative integer of any type.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.required(key, self.opt_u64(key))
    }

    /// An `f32` or `f64`.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.required(key, self.opt_f32(key))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.required(key, self.opt_bool(key))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.required(key, self.opt_str(key))
    }

    fn get_array<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let array = self.required(key, self.typed(key, "an array", Value::as_array))?;
        array
            .iter()
            .enumerate()
            .map(|(i, v)| {
                f(v).ok_or_else(|| {
                    anyhow!(
                        "metadata key {key}: element {i} is {}, expected {expected}",
                        v.describe()
                    )
                })
            })
            .collect()
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key, "string", Value::as_str)
    }

    /// An array of `f32` (or `f64`, rounded).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key, "f32 or f64", Value::as_f32)
    }

    /// An array of integers of any type whose values fit an `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key, "an integer that fits i32", Value::as_i32)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor, or an error naming it.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing"))
    }

    /// The bytes of a tensor of this file.
    ///
    /// # Panics
    /// If `info` describes a range outside this file, which no info parsed from it does.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(info.n_bytes)?));
        match range.and_then(|r| self.storage.get(r)) {
            Some(bytes) => bytes,
            None => panic!(
                "tensor {}: [{}, +{}) is not inside this {}-byte file",
                info.name,
                info.offset,
                info.n_bytes,
                self.storage.len()
            ),
        }
    }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| {
                anyhow!(
                    "file truncated at byte {}: {what} needs {n} bytes, {} left",
                    self.pos,
                    self.remaining()
                )
            })?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into()?)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_bytes`, checked against what is left.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= left / min_bytes => Ok(n),
            _ => bail!(
                "{what} {n} at byte {at} is impossible: each takes at least {min_bytes} bytes and only {left} are left"
            ),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, &format!("{what} length"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| anyhow!("{what} at byte {at} is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            TYPE_U8 => Value::U8(u8::from_le_bytes(self.array("u8 value")?)),
            TYPE_I8 => Value::I8(i8::from_le_bytes(self.array("i8 value")?)),
            TYPE_U16 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            TYPE_I16 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            TYPE_U32 => Value::U32(u32::from_le_bytes(self.array("u32 value")?)),
            TYPE_I32 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            TYPE_U64 => Value::U64(u64::from_le_bytes(self.array("u64 value")?)),
            TYPE_I64 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            TYPE_F32 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            TYPE_F64 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
            TYPE_BOOL => {
                let at = self.pos;
                match self.array::<1>("bool value")? {
                    [0] => Value::Bool(false),
                    [1] => Value::Bool(true),
                    [b] => bail!("bool value at byte {at} is {b}, expected 0 or 1"),
                }
            }
            TYPE_STRING => Value::String(self.string("string value")?),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} levels at byte {}",
                        self.pos
                    );
                }
                let at = self.pos;
                let elem_ty = self.u32("array element type")?;
                let min = min_value_bytes(elem_ty).ok_or_else(|| {
                    anyhow!("array at byte {at} has unknown element type {elem_ty}")
                })?;
                let n = self.count(min, &format!("array of {} count", type_name(elem_ty)))?;
                // Grows as elements parse; the count alone never decides an allocation's size.
                let mut items = Vec::with_capacity(n.min(4096));
                for i in 0..n {
                    items.push(
                        self.value(elem_ty, depth + 1)
                            .with_context(|| format!("array element {i}"))?,
                    );
                }
                Value::Array(items)
            }
            other => bail!(
                "unknown value type {other} at byte {}",
                self.pos.saturating_sub(4)
            ),
        })
    }
}

fn align_up(n: u64, alignment: u64) -> Option<u64> {
    n.checked_next_multiple_of(alignment)
}

type Parsed = (u32, u64, Vec<(String, Value)>, Vec<TensorInfo>);

fn parse_bytes(buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.array::<4>("magic").context("not a GGUF file")?;
    if magic != MAGIC {
        bail!("not a GGUF file: starts with {magic:02x?}, expected \"GGUF\"");
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (only versions 2 and 3)"),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            bail!(
                "big-endian GGUF (version {}) is not supported",
                v.swap_bytes()
            )
        }
        v => bail!("unsupported GGUF version {v} (only versions 2 and 3)"),
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.count(MIN_KV_BYTES, "metadata count")?;
    let n_tensors = match usize::try_from(n_tensors) {
        Ok(n) if n <= r.remaining() / MIN_TENSOR_INFO_BYTES => n,
        _ => bail!(
            "tensor count {n_tensors} is impossible: each tensor info takes at least {MIN_TENSOR_INFO_BYTES} bytes and only {} are left",
            r.remaining()
        ),
    };

    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r
            .string("metadata key")
            .with_context(|| format!("metadata pair {i}"))?;
        let ty = r
            .u32("value type")
            .with_context(|| format!("metadata key {key}"))?;
        let value = r
            .value(ty, 0)
            .with_context(|| format!("metadata key {key}"))?;
        if !keys.insert(key.clone()) {
            bail!("metadata key {key} appears twice");
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u32() {
            Some(a) if a.is_power_of_two() => u64::from(a),
            _ => bail!(
                "metadata key {ALIGNMENT_KEY} is {}, expected a power of two",
                v.describe()
            ),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r
            .string("tensor name")
            .with_context(|| format!("tensor info {i}"))?;
        let info = tensor_info(&mut r, &name).with_context(|| format!("tensor {name}"))?;
        if !names.insert(name) {
            bail!("tensor {} appears twice", info.name);
        }
        tensors.push(info);
    }

    let header_end = r.pos as u64;
    let data_start = align_up(header_end, alignment).ok_or_else(|| {
        anyhow!("data section start overflows (header ends at byte {header_end})")
    })?;
    let file_len = buf.len() as u64;
    for t in &mut tensors {
        if t.offset % alignment != 0 {
            bail!(
                "tensor {}: offset {} is not a multiple of the alignment {alignment}",
                t.name,
                t.offset
            );
        }
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.offset = start,
            _ => bail!(
                "tensor {}: {} bytes at data offset {} (data starts at byte {data_start}) run past the end of the file ({file_len} bytes)",
                t.name,
                t.n_bytes,
                t.offset
            ),
        }
    }

    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if let [a, b] = pair {
            if a.offset + a.n_bytes as u64 > b.offset {
                bail!("tensors {} and {} overlap", a.name, b.name);
            }
        }
    }

    Ok((version, alignment, metadata, tensors))
}

/// The rest of a tensor info after its name; `offset` is still relative to the data section.
fn tensor_info(r: &mut Reader, name: &str) -> Result<TensorInfo> {
    let n_dims = r.u32("dimension count")?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        bail!("has {n_dims} dimensions, expected 1 to {MAX_DIMS}");
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64("dimension")?);
    }
    let type_id = r.u32("type")?;
    let offset = r.u64("offset")?;
    let Some(ty) = GgmlType::from_id(type_id) else {
        match ggml_type_name(type_id) {
            Some(known) => bail!("tensor {name} has unsupported type id {type_id} ({known})"),
            None => bail!("tensor {name} has unsupported type id {type_id}"),
        }
    };
    let n_bytes = tensor_n_bytes(&dims, ty)?;
    Ok(TensorInfo {
        name: name.to_string(),
        dims,
        ty,
        offset,
        n_bytes,
    })
}

/// Bytes of a tensor of `dims` (GGML order) in `ty`: 1 to 4 non-zero dimensions, rows of whole
/// blocks, and an element count and byte size that fit (llama.cpp keeps counts in an `i64`).
fn tensor_n_bytes(dims: &[u64], ty: GgmlType) -> Result<usize> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        bail!("has {} dimensions, expected 1 to {MAX_DIMS}", dims.len());
    }
    if dims.contains(&0) {
        bail!("has a zero dimension: {dims:?}");
    }
    let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if n_elements.is_none_or(|n| n > i64::MAX as u64) {
        bail!("element count of dimensions {dims:?} overflows");
    }
    let row_len = dims.first().copied().unwrap_or(1);
    let Some(row_bytes) = usize::try_from(row_len).ok().and_then(|n| ty.row_bytes(n)) else {
        bail!(
            "row length {row_len} is not a multiple of the {ty} block size {}",
            ty.block_elems()
        );
    };
    dims.iter()
        .skip(1)
        .try_fold(row_bytes, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .ok_or_else(|| anyhow!("byte size of dimensions {dims:?} in {ty} overflows"))
}

/// Writes GGUF v3 files (alignment 32) in the standard layout llama.cpp reads.
///
/// Declare metadata and tensors first, then [`GgufWriter::write_header`] writes the header and
/// returns a [`GgufDataWriter`] that takes each tensor's bytes in declaration order, so a large
/// model streams to disk without being held in memory:
///
/// ```no_run
/// # use kvgear::format::gguf::{GgufWriter, Value};
/// # use kvgear::format::quant::GgmlType;
/// # fn main() -> anyhow::Result<()> {
/// let mut w = GgufWriter::new();
/// w.add_metadata("general.architecture", Value::String("llama".into()))?;
/// w.add_tensor("output_norm.weight", &[576], GgmlType::F32)?;
/// let file = std::io::BufWriter::new(std::fs::File::create("model.gguf")?);
/// let mut data = w.write_header(file)?;
/// data.write_tensor("output_norm.weight", &[0u8; 576 * 4])?;
/// data.finish()?;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<PlannedTensor>,
    names: HashSet<String>,
    data_bytes: u64,
}

struct PlannedTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    /// From the start of the data section.
    offset: u64,
    n_bytes: usize,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds a metadata pair. Keys must be unique; array elements must share one type; arrays
    /// nest at most [`MAX_ARRAY_DEPTH`] deep. `general.alignment` may only be `U32(32)`.
    pub fn add_metadata(&mut self, key: &str, value: Value) -> Result<()> {
        if self.keys.contains(key) {
            bail!("metadata key {key} added twice");
        }
        check_writable(&value, 0).with_context(|| format!("metadata key {key}"))?;
        if key == ALIGNMENT_KEY && value != Value::U32(DEFAULT_ALIGNMENT as u32) {
            bail!(
                "metadata key {key} is {}: the writer only writes alignment {DEFAULT_ALIGNMENT} as u32",
                value.describe()
            );
        }
        self.keys.insert(key.to_string());
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Declares a tensor; `dims` in GGML order (`dims[0]` is the row length).
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<()> {
        if self.names.contains(name) {
            bail!("tensor {name} added twice");
        }
        let n_bytes = tensor_n_bytes(dims, ty).with_context(|| format!("tensor {name}"))?;
        let next = align_up(self.data_bytes, DEFAULT_ALIGNMENT)
            .and_then(|offset| Some((offset, offset.checked_add(n_bytes as u64)?)))
            .ok_or_else(|| anyhow!("tensor {name}: data section size overflows"))?;
        self.names.insert(name.to_string());
        self.tensors.push(PlannedTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            offset: next.0,
            n_bytes,
        });
        self.data_bytes = next.1;
        Ok(())
    }

    /// The header: everything before the data section, padding included.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut h, key);
            h.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut h, value);
        }
        for t in &self.tensors {
            put_string(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&t.offset.to_le_bytes());
        }
        h.resize(h.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);
        h
    }

    /// Writes the header to `out` and returns the writer that takes the tensor data.
    pub fn write_header<W: Write>(self, mut out: W) -> Result<GgufDataWriter<W>> {
        out.write_all(&self.header_bytes())
            .context("writing the GGUF header")?;
        Ok(GgufDataWriter {
            out,
            tensors: self.tensors,
            next: 0,
            data_pos: 0,
        })
    }
}

fn check_writable(value: &Value, depth: usize) -> Result<()> {
    if let Value::Array(items) = value {
        if depth >= MAX_ARRAY_DEPTH {
            bail!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels");
        }
        if let Some(first) = items.first() {
            let ty = first.type_id();
            for (i, item) in items.iter().enumerate() {
                if item.type_id() != ty {
                    bail!(
                        "array element {i} is {}, but element 0 is {}",
                        item.type_name(),
                        first.type_name()
                    );
                }
                check_writable(item, depth + 1).with_context(|| format!("array element {i}"))?;
            }
        }
    }
    Ok(())
}

fn put_string(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => h.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => h.push(u8::from(*v)),
        Value::String(s) => put_string(h, s),
        Value::Array(items) => {
            let elem_ty = items.first().map_or(TYPE_U8, Value::type_id);
            h.extend_from_slice(&elem_ty.to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
    }
}

/// Takes tensor data after the header, in declaration order, padding each tensor to the alignment.
pub struct GgufDataWriter<W: Write> {
    out: W,
    tensors: Vec<PlannedTensor>,
    next: usize,
    /// Bytes written since the start of the data section.
    data_pos: u64,
}

impl<W: Write> GgufDataWriter<W> {
    /// Name of the tensor whose data comes next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.tensors.get(self.next).map(|t| t.name.as_str())
    }

    /// Writes the next tensor's bytes; `name` and the length must match its declaration.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            bail!(
                "tensor {name}: all {} declared tensors are already written",
                self.tensors.len()
            );
        };
        if t.name != name {
            bail!("tensor {name} written out of order: {} comes next", t.name);
        }
        if data.len() != t.n_bytes {
            bail!(
                "tensor {name}: got {} bytes, expected {} for {} {:?}",
                data.len(),
                t.n_bytes,
                t.ty,
                t.dims
            );
        }
        debug_assert_eq!(self.data_pos, t.offset);
        let padded = (t.n_bytes as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        let padding = [0u8; DEFAULT_ALIGNMENT as usize];
        let n_pad = (padded - t.n_bytes as u64) as usize;
        self.out
            .write_all(data)
            .with_context(|| format!("writing tensor {name}"))?;
        self.out
            .write_all(&padding[..n_pad])
            .with_context(|| format!("writing tensor {name}"))?;
        self.data_pos += padded;
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.tensors.get(self.next) {
            bail!(
                "tensor {} was declared but never written ({} of {} written)",
                t.name,
                self.next,
                self.tensors.len()
            );
        }
        self.out.flush().context("flushing the GGUF file")?;
        Ok(self.out)
    }
}
