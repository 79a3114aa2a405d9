//! `kvgear quantize`: fp16/bf16/f32 (or already quantized) models to GGUF block formats.
//!
//! The source is a GGUF file or a Hugging Face safetensors directory; the output is a complete GGUF
//! v3 file that kvgear and llama.cpp load. Which type each tensor gets follows llama.cpp's
//! `llama_tensor_get_type` (src/llama-quant.cpp at 0c1e5709) for the dense Llama-family models
//! kvgear runs, so that a file quantized here and one quantized by `llama-quantize` from the same
//! GGUF source are the same bytes:
//!
//! - only matrices whose names end in `weight` are quantized, never `*_norm.weight`; vectors stay
//!   as stored (a float vector from a safetensors source is widened to f32, as llama.cpp's converter
//!   writes it);
//! - the output matrix (or the token embedding, when the model ties them) gets q6_k unless the
//!   scheme is q8_0 (or `--keep-output` names a type); q8_0 where its rows are not whole blocks of
//!   the scheme's type;
//! - the `_m` and `_s` mixes spend more bits on `attn_v` and `ffn_down` in the layers
//!   `use_more_bits` picks (the first and last eighth, and every third layer between);
//! - a tensor whose row length is not a whole number of blocks falls back: q4_k to q5_0, q5_k to
//!   q5_1, q6_k to q8_0, and to f16 when even 32 does not divide it.
//!
//! Tensors are written in llama.cpp's order (non-layer tensors by name, then layer by layer, each
//! layer's tensors by name), the source's metadata is copied with `general.quantization_version`
//! and `general.file_type` moved to the end, as `gguf_set_val_u32` leaves them. From safetensors,
//! the metadata comes from config.json and tokenizer.json, and Q and K rows are permuted into the
//! interleaved-pair order llama.cpp's converter writes for llama models (whose RoPE then rotates
//! adjacent pairs).
//!
//! Quantizing streams tensor by tensor from the memory-mapped source: each tensor is converted row
//! by row in parallel into one output buffer, written, and its source pages are released, so the
//! resident memory beyond the map is about one tensor's output.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use crate::format::gguf::{GgufFile, GgufWriter, Storage, Value};
use crate::format::quant::{dequantize, quantize, GgmlType};
use crate::format::safetensors::{gguf_tensor_name, SafetensorsModel};
use crate::model::config::{Arch, Config};
use crate::model::tokenizer::{TokenType, Tokenizer};
use crate::model::Model;

/// GGML's quantization version, written as `general.quantization_version`.
const QUANTIZATION_VERSION: u32 = 2;
/// Rows converted per parallel task: enough to amortise the task, few enough to balance.
const ROWS_PER_TASK: usize = 16;

/// What `--to` names: one type for every matrix, or one of llama.cpp's k-quant mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Every quantizable matrix in this type; the output matrix as llama.cpp chooses it.
    Uniform(GgmlType),
    /// q4_k, with q5_k for `attn_v` of the first four layers and `ffn_down` of the first eighth.
    Q4KS,
    /// q4_k, with q6_k for `attn_v` and `ffn_down` where `use_more_bits`.
    Q4KM,
    /// q5_k everywhere (the output as for every scheme).
    Q5KS,
    /// q5_k, with q6_k for `attn_v` and `ffn_down` where `use_more_bits`.
    Q5KM,
}

impl Scheme {
    pub const NAMES: [&'static str; 15] = [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q4_k_s", "q4_k_m", "q5_k_s",
        "q5_k_m",
    ];

    pub fn parse(name: &str) -> Result<Scheme> {
        let lower = name.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "q4_k_s" => Scheme::Q4KS,
            "q4_k_m" => Scheme::Q4KM,
            "q5_k_s" => Scheme::Q5KS,
            "q5_k_m" => Scheme::Q5KM,
            other => match GgmlType::from_name(other) {
                Some(t) => Scheme::Uniform(t),
                None => bail!("unknown quantization '{name}' (known: {})", Scheme::NAMES.join(", ")),
            },
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Uniform(t) => t.name(),
            Scheme::Q4KS => "q4_k_s",
            Scheme::Q4KM => "q4_k_m",
            Scheme::Q5KS => "q5_k_s",
            Scheme::Q5KM => "q5_k_m",
        }
    }

    /// The type of the matrices no rule singles out.
    pub fn default_type(self) -> GgmlType {
        match self {
            Scheme::Uniform(t) => t,
            Scheme::Q4KS | Scheme::Q4KM => GgmlType::Q4K,
            Scheme::Q5KS | Scheme::Q5KM => GgmlType::Q5K,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`). Uniform q4_k and q5_k have no ftype of
    /// their own; they are labelled as the nearest mix, Q4_K_S and Q5_K_S.
    pub fn file_type(self) -> u32 {
        match self {
            Scheme::Uniform(GgmlType::F32) => 0,
            Scheme::Uniform(GgmlType::F16) => 1,
            Scheme::Uniform(GgmlType::Q4_0) => 2,
            Scheme::Uniform(GgmlType::Q4_1) => 3,
            Scheme::Uniform(GgmlType::Q8_0) => 7,
            Scheme::Uniform(GgmlType::Q5_0) => 8,
            Scheme::Uniform(GgmlType::Q5_1) => 9,
            Scheme::Uniform(GgmlType::Q4K) | Scheme::Q4KS => 14,
            Scheme::Q4KM => 15,
            Scheme::Uniform(GgmlType::Q5K) | Scheme::Q5KS => 16,
            Scheme::Q5KM => 17,
            Scheme::Uniform(GgmlType::Q6K) => 18,
            Scheme::Uniform(GgmlType::BF16) => 32,
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor as the type choice sees it: GGUF name, GGML dims (`dims[0]` the row length), and
/// the type it is stored in.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorDesc {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of this tensor's data in type `ty`, or `None` when its rows are not whole blocks.
    pub fn bytes_as(&self, ty: GgmlType) -> Option<u64> {
        let rows: u64 = self.dims.iter().skip(1).product();
        Some(ty.row_bytes(*self.dims.first()? as usize)? as u64 * rows)
    }
}

/// The layer of a `blk.N.` tensor name (`sscanf("blk.%d.")`).
fn layer_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("blk.")?;
    let digits: &str = &rest[..rest.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len())];
    if digits.is_empty() || !rest[digits.len()..].starts_with('.') {
        return None;
    }
    digits.parse().ok()
}

/// llama.cpp's tensor order (`weight_name_comparer`): by layer, tensors outside any layer first,
/// then by name.
pub fn llama_cpp_order(tensors: &mut [TensorDesc]) {
    tensors.sort_by(|a, b| (layer_of(&a.name).unwrap_or(-1), &a.name).cmp(&(layer_of(&b.name).unwrap_or(-1), &b.name)));
}

/// `ggml_n_dims`: dimensions up to the last one above 1.
fn n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
pub fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A type for rows of `n_cols` elements, falling back as llama.cpp's `tensor_type_fallback` does
/// when the rows are not whole blocks of `ty`.
fn fallback(ty: GgmlType, n_cols: u64) -> GgmlType {
    let fits = |t: GgmlType| n_cols % t.block_elems() as u64 == 0;
    if fits(ty) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if fits(next) {
        next
    } else {
        GgmlType::F16
    }
}

/// The type of every tensor of `tensors` under `scheme`, which must already be in
/// [`llama_cpp_order`] (the mixes count `attn_v` tensors in that order). `keep_output` overrides
/// the output matrix's type (the tied token embedding's, when there is no output matrix).
/// A vector stored as f16 or bf16 becomes f32.
pub fn choose_types(cfg: &Config, tensors: &[TensorDesc], scheme: Scheme, keep_output: Option<GgmlType>) -> Vec<GgmlType> {
    choose(cfg, tensors, scheme, keep_output).into_iter().map(|(ty, _)| ty).collect()
}

/// [`choose_types`], with whether each type is a fallback (rows not whole blocks of the rule's
/// choice).
fn choose(cfg: &Config, tensors: &[TensorDesc], scheme: Scheme, keep_output: Option<GgmlType>) -> Vec<(GgmlType, bool)> {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_attn_v = tensors.iter().filter(|t| t.name.contains("attn_v.weight")).count();
    // llama.cpp's LLM_TYPE_70B: 80 layers with grouped-query attention.
    let is_70b = cfg.arch == Arch::Llama && cfg.n_layers == 80 && cfg.n_heads != cfg.n_kv_heads;
    let default = scheme.default_type();
    let mut i_attn_v = 0usize;
    let mut i_ffn_down = 0usize;
    tensors
        .iter()
        .map(|t| {
            let name = t.name.as_str();
            let quantizable = n_dims(&t.dims) >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
            if !quantizable {
                return match t.ty {
                    GgmlType::F16 | GgmlType::BF16 if n_dims(&t.dims) == 1 => (GgmlType::F32, false),
                    other => (other, false),
                };
            }
            let n_cols = t.dims[0];
            let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
            let with_fallback = |ty: GgmlType| (fallback(ty, n_cols), fallback(ty, n_cols) != ty);
            if let (true, Some(k)) = (is_output, keep_output) {
                return with_fallback(k);
            }
            if !default.is_quantized() {
                return (default, false);
            }
            let mut ty = default;
            if is_output {
                if n_cols % default.block_elems() as u64 != 0 {
                    ty = GgmlType::Q8_0;
                } else if default != GgmlType::Q8_0 {
                    ty = GgmlType::Q6K;
                }
            } else if name.contains("attn_v.weight") {
                match scheme {
                    Scheme::Q4KM | Scheme::Q5KM if use_more_bits(i_attn_v, n_attn_v) => ty = GgmlType::Q6K,
                    Scheme::Q4KS if i_attn_v < 4 => ty = GgmlType::Q5K,
                    _ => {}
                }
                if is_70b && ty == GgmlType::Q4K {
                    ty = GgmlType::Q5K;
                }
                i_attn_v += 1;
            } else if name.contains("ffn_down") {
                let n = cfg.n_layers;
                match scheme {
                    Scheme::Q4KM | Scheme::Q5KM if use_more_bits(i_ffn_down, n) => ty = GgmlType::Q6K,
                    Scheme::Q4KS if i_ffn_down < n / 8 => ty = GgmlType::Q5K,
                    _ => {}
                }
                i_ffn_down += 1;
            }
            with_fallback(ty)
        })
        .collect()
}

/// Bytes of the tensors of `cfg` under `scheme`, by type (count of tensors, bytes), vectors
/// included (as f32), as `kvgear quantize` of an f16 model with that config writes them.
pub fn plan_bytes_by_type(cfg: &Config, tied: bool, scheme: Scheme) -> Result<BTreeMap<&'static str, (usize, u64)>> {
    let mut tensors = config_tensors(cfg, tied);
    llama_cpp_order(&mut tensors);
    let types = choose_types(cfg, &tensors, scheme, None);
    let mut by_type = BTreeMap::new();
    for (t, ty) in tensors.iter().zip(types) {
        let b = t.bytes_as(ty).with_context(|| format!("{}: rows of {} are not whole {ty} blocks", t.name, t.dims[0]))?;
        let e = by_type.entry(ty.name()).or_insert((0usize, 0u64));
        e.0 += 1;
        e.1 += b;
    }
    Ok(by_type)
}

/// The tensors a model of `cfg` has (GGUF names and dims), matrices in f16 and vectors in f32.
pub fn config_tensors(cfg: &Config, tied: bool) -> Vec<TensorDesc> {
    let (d, q, kv, ff, v) = (cfg.n_embd as u64, cfg.q_dim() as u64, cfg.kv_dim() as u64, cfg.n_ff as u64, cfg.n_vocab as u64);
    let t = |name: String, dims: Vec<u64>| {
        let ty = if dims.len() == 1 { GgmlType::F32 } else { GgmlType::F16 };
        TensorDesc { name, dims, ty }
    };
    let mut out = vec![t("token_embd.weight".into(), vec![d, v]), t("output_norm.weight".into(), vec![d])];
    if !tied {
        out.push(t("output.weight".into(), vec![d, v]));
    }
    for l in 0..cfg.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        out.push(t(n("attn_norm.weight"), vec![d]));
        out.push(t(n("attn_q.weight"), vec![d, q]));
        out.push(t(n("attn_k.weight"), vec![d, kv]));
        out.push(t(n("attn_v.weight"), vec![d, kv]));
        if cfg.attn_bias {
            out.push(t(n("attn_q.bias"), vec![q]));
            out.push(t(n("attn_k.bias"), vec![kv]));
            out.push(t(n("attn_v.bias"), vec![kv]));
        }
        out.push(t(n("attn_output.weight"), vec![q, d]));
        out.push(t(n("ffn_norm.weight"), vec![d]));
        out.push(t(n("ffn_gate.weight"), vec![d, ff]));
        out.push(t(n("ffn_up.weight"), vec![d, ff]));
        out.push(t(n("ffn_down.weight"), vec![ff, d]));
    }
    out
}

/// Where a source tensor's bytes are.
enum SrcData {
    Mapped { storage: Arc<Storage>, offset: usize, n_bytes: usize },
    Owned(Vec<u8>),
}

/// One tensor to convert.
struct SrcTensor {
    desc: TensorDesc,
    data: SrcData,
    /// Rows are heads of `dims[1] / n` rows each, to be reordered from halves to interleaved
    /// pairs (llama.cpp's converter's `permute` for llama Q and K).
    permute_heads: Option<usize>,
}

impl SrcTensor {
    fn bytes(&self) -> &[u8] {
        match &self.data {
            SrcData::Mapped { storage, offset, n_bytes } => &storage[*offset..*offset + *n_bytes],
            SrcData::Owned(v) => v,
        }
    }

    /// Drops this tensor's pages from the process's resident set once it has been converted:
    /// the map is read-only and private, so the kernel re-reads them from the file if they are
    /// ever touched again, and the resident memory stays at about one tensor.
    fn release(&self) {
        if let SrcData::Mapped { storage, offset, n_bytes } = &self.data {
            storage.release(*offset, *n_bytes);
        }
    }
}

/// A model to quantize: its metadata (source order) and tensors (source order).
struct Source {
    metadata: Vec<(String, Value)>,
    tensors: Vec<SrcTensor>,
    config: Config,
}

fn open_source(path: &Path) -> Result<Source> {
    if path.is_dir() {
        return open_safetensors(path);
    }
    let f = GgufFile::open(path)?;
    let config = Config::from_gguf(&f).with_context(|| format!("{}", path.display()))?;
    let mut tensors = Vec::with_capacity(f.tensors.len());
    for t in &f.tensors {
        let offset = usize::try_from(t.offset).with_context(|| format!("tensor {}: offset overflows", t.name))?;
        tensors.push(SrcTensor {
            desc: TensorDesc { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty },
            data: SrcData::Mapped { storage: f.storage.clone(), offset, n_bytes: t.n_bytes },
            permute_heads: None,
        });
    }
    Ok(Source { metadata: f.metadata.clone(), tensors, config })
}

/// The GGUF metadata and tensors of a Hugging Face directory, as llama.cpp's converter makes them.
fn open_safetensors(dir: &Path) -> Result<Source> {
    let st = SafetensorsModel::open(dir)?;
    let cfg = Config::from_hf_json(&st.config).with_context(|| format!("{}/config.json", dir.display()))?;
    let mut tensors = Vec::with_capacity(st.tensors.len());
    for t in &st.tensors {
        let Some(name) = gguf_tensor_name(&t.name) else {
            if t.name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            bail!("{}: tensor {} has no GGUF counterpart (kvgear converts llama and qwen2 models)", dir.display(), t.name);
        };
        let shard = st.shards.get(t.shard).with_context(|| format!("tensor {} names a missing shard", t.name))?;
        let offset = usize::try_from(t.offset).with_context(|| format!("tensor {}: offset overflows", t.name))?;
        let permute_heads = match (cfg.arch, name.as_str()) {
            (Arch::Llama, n) if n.ends_with("attn_q.weight") => Some(cfg.n_heads),
            (Arch::Llama, n) if n.ends_with("attn_k.weight") => Some(cfg.n_kv_heads),
            _ => None,
        };
        if let Some(h) = permute_heads {
            let rows = t.dims.get(1).copied().unwrap_or(1) as usize;
            if t.dims.len() != 2 || rows % (2 * h) != 0 {
                bail!("tensor {} of shape {:?} does not split into {h} heads of row pairs", t.name, t.dims);
            }
        }
        tensors.push(SrcTensor {
            desc: TensorDesc { name, dims: t.dims.clone(), ty: t.ty },
            data: SrcData::Mapped { storage: shard.storage.clone(), offset, n_bytes: t.n_bytes },
            permute_heads,
        });
    }
    if let Some(f) = &cfg.rope_freq_factors {
        tensors.push(SrcTensor {
            desc: TensorDesc { name: "rope_freqs.weight".into(), dims: vec![f.len() as u64], ty: GgmlType::F32 },
            data: SrcData::Owned(bytemuck::cast_slice(f).to_vec()),
            permute_heads: None,
        });
    }
    let mut metadata = hf_model_metadata(&cfg, &st.config, dir);
    metadata.extend(hf_tokenizer_metadata(dir, cfg.n_vocab)?);
    Ok(Source { metadata, tensors, config: cfg })
}

/// `{arch}.*` and `general.*` keys from config.json, as llama.cpp's converter writes them.
fn hf_model_metadata(cfg: &Config, json: &serde_json::Value, dir: &Path) -> Vec<(String, Value)> {
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string());
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        ("general.type".to_string(), Value::String("model".into())),
        ("general.name".to_string(), Value::String(name)),
        (format!("{a}.block_count"), u(cfg.n_layers)),
        (format!("{a}.context_length"), u(cfg.n_ctx_train)),
        (format!("{a}.embedding_length"), u(cfg.n_embd)),
        (format!("{a}.feed_forward_length"), u(cfg.n_ff)),
        (format!("{a}.attention.head_count"), u(cfg.n_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.n_kv_heads)),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_base)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.norm_eps)),
    ];
    if json.get("head_dim").is_some() {
        md.push((format!("{a}.attention.key_length"), u(cfg.head_dim)));
        md.push((format!("{a}.attention.value_length"), u(cfg.head_dim)));
    }
    md.push((format!("{a}.vocab_size"), u(cfg.n_vocab)));
    md.push((format!("{a}.rope.dimension_count"), u(cfg.n_rot)));
    md
}

/// The `tokenizer.ggml.pre` name for a byte-level `tokenizer.json` pre-tokenizer, for the
/// layouts whose llama.cpp regexes kvgear knows.
fn pre_tokenizer_name(pre: &serde_json::Value) -> Option<&'static str> {
    fn ty(v: &serde_json::Value) -> &str {
        v.get("type").and_then(|t| t.as_str()).unwrap_or("")
    }
    let byte_level = |v: &serde_json::Value, regex: bool| {
        ty(v) == "ByteLevel" && v.get("use_regex").and_then(|r| r.as_bool()).unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre.get("pretokenizers").and_then(|p| p.as_array()).filter(|_| ty(pre) == "Sequence")?;
    match parts.as_slice() {
        [d, b] if ty(d) == "Digits" && d.get("individual_digits").and_then(|x| x.as_bool()) == Some(true) && byte_level(b, true) => {
            Some("smollm")
        }
        [s, b] if ty(s) == "Split" && byte_level(b, false) => {
            let regex = s.get("pattern").and_then(|p| p.get("Regex")).and_then(|r| r.as_str())?;
            crate::model::tokenizer::gguf_pre_for_regex(regex)
        }
        _ => None,
    }
}

/// `tokenizer.ggml.*` keys from a directory's byte-level BPE `tokenizer.json` (tokens, merges,
/// types) and `tokenizer_config.json` / `generation_config.json` (BOS, EOS, `add_bos_token`, chat
/// template), as llama.cpp's converter writes them for a gpt2-style vocabulary. Ids up to the
/// model's `n_vocab` that the tokenizer lacks become `[PAD{id}]` user-defined tokens.
fn hf_tokenizer_metadata(dir: &Path, n_vocab: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail!("{} has no tokenizer.json", dir.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let model = json.get("model").with_context(|| format!("{}: no \"model\"", path.display()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        bail!("{}: model type {} is not BPE; kvgear converts byte-level BPE (gpt2-style) vocabularies", path.display(), model["type"]);
    }
    if model.get("byte_fallback").and_then(|b| b.as_bool()) == Some(true) {
        bail!(
            "{}: a BPE with byte fallback is a SentencePiece-style vocabulary; kvgear converts byte-level (gpt2-style) ones only",
            path.display()
        );
    }
    let pre_json = json.get("pre_tokenizer").unwrap_or(&serde_json::Value::Null);
    let pre = pre_tokenizer_name(pre_json)
        .with_context(|| format!("{}: no llama.cpp pre-tokenizer is known for {pre_json}", path.display()))?;
    let merges = model
        .get("merges")
        .and_then(|m| m.as_array())
        .with_context(|| format!("{}: the BPE model has no merges", path.display()))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) => match p.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => Ok(Value::String(format!("{a} {b}"))),
                _ => bail!("{}: merge {i} is {m}, not a pair of strings", path.display()),
            },
            _ => bail!("{}: merge {i} is {m}, not a string or a pair", path.display()),
        })
        .collect::<Result<Vec<_>>>()?;

    let tok = Tokenizer::from_hf_dir(dir)?;
    let n = n_vocab.max(tok.n_vocab());
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        let ty = tok.token_type(id).unwrap_or(TokenType::Undefined);
        match tok.token_text(id) {
            Some(text) if ty != TokenType::Undefined => {
                tokens.push(Value::String(text.to_string()));
                types.push(Value::I32(ty.code()));
            }
            _ => {
                tokens.push(Value::String(format!("[PAD{id}]")));
                types.push(Value::I32(TokenType::UserDefined.code()));
            }
        }
    }
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    if let Some(b) = tok.bos() {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.eos() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(tok.add_bos())));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(tok.add_eos())));
    if let Some(t) = tok.chat_template() {
        md.push(("tokenizer.chat_template".into(), Value::String(t.to_string())));
    }
    Ok(md)
}

/// Converts one tensor to `dst`: every row dequantized to f32 (reordered for a permuted tensor)
/// and quantized, rows in parallel. A tensor already of type `dst` is copied.
fn convert(d: &TensorDesc, src: &[u8], permute_heads: Option<usize>, dst: GgmlType) -> Result<Vec<u8>> {
    let n_cols = d.dims[0] as usize;
    let n_rows = (d.n_elements() / d.dims[0].max(1)) as usize;
    if dst == d.ty && permute_heads.is_none() {
        return Ok(src.to_vec());
    }
    let src_rb = d.ty.row_bytes(n_cols).with_context(|| format!("{}: rows of {n_cols} are not whole {} blocks", d.name, d.ty))?;
    let dst_rb = dst.row_bytes(n_cols).with_context(|| format!("{}: rows of {n_cols} are not whole {dst} blocks", d.name))?;
    if src.len() != src_rb * n_rows {
        bail!("{}: {} bytes for {n_rows} rows of {src_rb}", d.name, src.len());
    }
    // Permuted: output row h*hd + 2j + k comes from source row h*hd + k*hd/2 + j.
    let source_row = |r: usize| match permute_heads {
        None => r,
        Some(h) => {
            let hd = n_rows / h;
            let (head, within) = (r / hd, r % hd);
            head * hd + (within % 2) * (hd / 2) + within / 2
        }
    };
    let mut out = vec![0u8; dst_rb * n_rows];
    out.par_chunks_mut(dst_rb * ROWS_PER_TASK).enumerate().try_for_each(|(c, chunk)| -> Result<()> {
        let mut row = vec![0.0f32; n_cols];
        for (i, dst_row) in chunk.chunks_exact_mut(dst_rb).enumerate() {
            let r = c * ROWS_PER_TASK + i;
            let s = source_row(r);
            dequantize(d.ty, &src[s * src_rb..(s + 1) * src_rb], &mut row)
                .and_then(|()| quantize(dst, &row, dst_row))
                .with_context(|| format!("{} row {r}", d.name))?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// `kvgear quantize` options.
#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeArgs {
    /// Source: a GGUF file or a Hugging Face safetensors directory.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Target: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or a mix q4_k_s, q4_k_m, q5_k_s, q5_k_m.
    #[arg(long)]
    pub to: String,
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Type of the output matrix (f16, q6_k, q8_0, ...); default: llama.cpp's choice (q6_k, or q8_0 for q8_0).
    #[arg(long)]
    pub keep_output: Option<String>,
    /// Allow a source whose matrices are already quantized (dequantized to f32 first; the errors add up).
    #[arg(long)]
    pub allow_requantize: bool,
    /// Print the type and size of every tensor.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// What a quantization run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizeReport {
    pub scheme: String,
    pub n_tensors: usize,
    /// Tensor data bytes of the source and of the output (padding excluded).
    pub src_bytes: u64,
    pub dst_bytes: u64,
    pub file_bytes: u64,
    /// Per output type: tensors and bytes.
    pub by_type: BTreeMap<String, (usize, u64)>,
    /// Tensors that took a fallback type because their rows are not whole blocks.
    pub n_fallback: usize,
    pub seconds: f64,
}

/// Quantizes `src` (GGUF or safetensors directory) to a GGUF file at `out`.
pub fn quantize_file(
    src: &Path,
    out: &Path,
    scheme: Scheme,
    keep_output: Option<GgmlType>,
    allow_requantize: bool,
    verbose: bool,
) -> Result<QuantizeReport> {
    let t0 = Instant::now();
    if src.canonicalize().ok().is_some_and(|s| out.canonicalize().ok() == Some(s)) {
        bail!("the output {} is the source", out.display());
    }
    let mut source = open_source(src)?;
    source.tensors.sort_by(|a, b| {
        let key = |t: &SrcTensor| (layer_of(&t.desc.name).unwrap_or(-1), t.desc.name.clone());
        key(a).cmp(&key(b))
    });
    let descs: Vec<TensorDesc> = source.tensors.iter().map(|t| t.desc.clone()).collect();
    let chosen = choose(&source.config, &descs, scheme, keep_output);
    let n_fallback = chosen.iter().filter(|c| c.1).count();
    let types: Vec<GgmlType> = chosen.into_iter().map(|c| c.0).collect();
    for (d, &ty) in descs.iter().zip(&types) {
        if ty != d.ty && d.ty.is_quantized() && !allow_requantize {
            bail!(
                "{}: tensor {} is already {}; requantizing to {ty} adds the two errors (pass --allow-requantize to do it anyway)",
                src.display(),
                d.name,
                d.ty
            );
        }
    }

    let mut w = GgufWriter::new();
    let dropped = |k: &str| k == "general.quantization_version" || k == "general.file_type" || k.starts_with("split.");
    for (k, v) in source.metadata.iter().filter(|(k, _)| !dropped(k)) {
        w.add_metadata(k, v.clone())?;
    }
    w.add_metadata("general.quantization_version", Value::U32(QUANTIZATION_VERSION))?;
    w.add_metadata("general.file_type", Value::U32(scheme.file_type()))?;
    for (d, &ty) in descs.iter().zip(&types) {
        // gguf.cpp writes `ggml_n_dims` dimensions: trailing ones are dropped.
        w.add_tensor(&d.name, &d.dims[..n_dims(&d.dims)], ty)?;
    }
    // Written under a temporary name and renamed at the end, so that a failed run leaves no
    // half-written model behind.
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let written = write_tensors(&partial, w, &source.tensors, &types, verbose);
    let (by_type, dst_bytes, src_bytes) = match written {
        Ok(v) => v,
        Err(e) => {
            std::fs::remove_file(&partial).ok();
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(QuantizeReport {
        scheme: scheme.name().to_string(),
        n_tensors: types.len(),
        src_bytes,
        dst_bytes,
        file_bytes: std::fs::metadata(out).with_context(|| format!("reading the size of {}", out.display()))?.len(),
        by_type,
        n_fallback,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Per type name: (tensors, bytes).
type BytesByType = BTreeMap<String, (usize, u64)>;

/// Writes the header and every tensor, converted to its type, to `path`; returns the bytes per
/// output type, the output and the source tensor bytes.
fn write_tensors(
    path: &Path,
    w: GgufWriter,
    tensors: &[SrcTensor],
    types: &[GgmlType],
    verbose: bool,
) -> Result<(BytesByType, u64, u64)> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut data = w.write_header(BufWriter::with_capacity(1 << 22, file))?;
    let src_bytes: u64 = tensors.iter().map(|t| t.bytes().len() as u64).sum();
    let bar = indicatif::ProgressBar::new(src_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("quantize {bar:30} {bytes}/{total_bytes} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut by_type = BytesByType::new();
    let mut dst_bytes = 0u64;
    for (i, (t, &ty)) in tensors.iter().zip(types).enumerate() {
        bar.set_message(format!("{} -> {ty}", t.desc.name));
        let bytes = convert(&t.desc, t.bytes(), t.permute_heads, ty)?;
        data.write_tensor(&t.desc.name, &bytes)?;
        t.release();
        if verbose {
            bar.suspend(|| {
                eprintln!(
                    "[{:>4}/{}] {:<32} {:?} {} -> {} ({} -> {} bytes)",
                    i + 1,
                    types.len(),
                    t.desc.name,
                    t.desc.dims,
                    t.desc.ty,
                    ty,
                    t.bytes().len(),
                    bytes.len()
                )
            });
        }
        let e = by_type.entry(ty.name().to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 += bytes.len() as u64;
        dst_bytes += bytes.len() as u64;
        bar.inc(t.bytes().len() as u64);
    }
    bar.finish_and_clear();
    let file = data.finish()?.into_inner().map_err(|e| anyhow!("flushing {}: {}", path.display(), e.error()))?;
    file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    Ok((by_type, dst_bytes, src_bytes))
}

/// Parses a `--keep-output` type.
pub fn parse_output_type(s: &str) -> Result<GgmlType> {
    crate::synth::parse_type(s)
}

/// `kvgear quantize`.
pub fn run(a: &QuantizeArgs) -> Result<()> {
    let scheme = Scheme::parse(&a.to)?;
    let keep = a.keep_output.as_deref().map(parse_output_type).transpose()?;
    let r = quantize_file(&a.model, &a.output, scheme, keep, a.allow_requantize, a.verbose)?;
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "wrote {} ({} bytes): {} tensors, {:.1} MiB -> {:.1} MiB of tensor data as {} in {:.1}s{}",
        a.output.display(),
        r.file_bytes,
        r.n_tensors,
        mib(r.src_bytes),
        mib(r.dst_bytes),
        r.scheme,
        r.seconds,
        if r.n_fallback > 0 { format!(" ({} tensors fell back: rows not whole blocks)", r.n_fallback) } else { String::new() }
    );
    for (ty, (n, b)) in &r.by_type {
        eprintln!("  {ty:<6} {n:>4} tensors {b:>14} bytes");
    }
    eprintln!("peak resident memory {:.1} MiB (VmHWM, mapped source pages included)", crate::bench::peak_rss_bytes() as f64 / 1048576.0);
    Ok(())
}

/// Loads a model and, with `quantize`, quantizes its matrices in memory as `kvgear quantize`
/// would write them (an already quantized matrix is dequantized to f32 first).
pub fn load_model(path: &Path, quantize: Option<&str>) -> Result<Model> {
    let mut model = Model::load(path)?;
    if let Some(q) = quantize {
        quantize_in_memory(&mut model, Scheme::parse(q)?)?;
    }
    Ok(model)
}

/// Replaces every matrix of `model` by its quantization under `scheme` (types chosen as for a
/// file); tied embeddings stay tied. The model's name records it.
pub fn quantize_in_memory(model: &mut Model, scheme: Scheme) -> Result<()> {
    use crate::model::weights::Tensor;
    let w = &mut model.weights;
    let mut descs: Vec<TensorDesc> = w
        .matrices()
        .iter()
        .map(|t| TensorDesc { name: t.name.clone(), dims: vec![t.n_cols as u64, t.n_rows as u64], ty: t.ty })
        .collect();
    llama_cpp_order(&mut descs);
    let types: HashMap<String, GgmlType> =
        descs.iter().map(|d| d.name.clone()).zip(choose_types(&model.config, &descs, scheme, None)).collect();
    let requantized = w.matrices().iter().filter(|t| t.ty.is_quantized() && types.get(&t.name) != Some(&t.ty)).count();
    let bar = indicatif::ProgressBar::new(descs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("quantize {bar:30} {pos}/{len} matrices {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let convert_tensor = |t: &mut Tensor| -> Result<()> {
        let ty = *types.get(&t.name).with_context(|| format!("no type chosen for {}", t.name))?;
        bar.set_message(format!("{} -> {ty}", t.name));
        if ty != t.ty {
            let desc = TensorDesc { name: t.name.clone(), dims: vec![t.n_cols as u64, t.n_rows as u64], ty: t.ty };
            let bytes = convert(&desc, t.data(), None, ty)?;
            *t = Tensor::from_bytes(&t.name, ty, t.n_cols, t.n_rows, bytes)?;
        }
        bar.inc(1);
        Ok(())
    };
    convert_tensor(&mut w.token_embd)?;
    for l in &mut w.layers {
        for t in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
            convert_tensor(t)?;
        }
    }
    if w.tied_output {
        w.output = w.token_embd.clone();
    } else {
        convert_tensor(&mut w.output)?;
    }
    bar.finish_and_clear();
    if requantized > 0 {
        eprintln!("note: {requantized} matrices were already quantized; requantizing them to {scheme} adds the two errors");
    }
    model.name = format!("{} (quantized to {scheme} at load)", model.name);
    Ok(())
}
