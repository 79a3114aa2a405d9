//! Model weights as stored: each matrix stays in its file's block format, memory-mapped, and is
//! never expanded to f32 in memory. Only norm vectors and biases (a few KB) are kept as f32.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::format::gguf::{GgufFile, Storage};
use crate::format::quant::{dequantize, GgmlType};
use crate::model::config::Config;

/// A 2-D weight matrix (or a vector, with one row) in its stored block format.
/// `n_cols` is the row length (GGML `ne[0]`), `n_rows` the number of rows (`ne[1]`).
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub ty: GgmlType,
    pub n_cols: usize,
    pub n_rows: usize,
    storage: Arc<Storage>,
    offset: usize,
    n_bytes: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {} [{}, {}])", self.name, self.ty, self.n_cols, self.n_rows)
    }
}

impl Tensor {
    /// A tensor over `storage[offset .. offset + n_bytes]`, checked against its shape and type.
    pub fn new(
        name: &str,
        ty: GgmlType,
        n_cols: usize,
        n_rows: usize,
        storage: Arc<Storage>,
        offset: usize,
        n_bytes: usize,
    ) -> Result<Tensor> {
        let row = ty
            .row_bytes(n_cols)
            .with_context(|| format!("tensor {name}: row of {n_cols} is not a whole number of {ty} blocks"))?;
        let expect = row.checked_mul(n_rows).with_context(|| format!("tensor {name}: size overflows"))?;
        if expect != n_bytes {
            bail!("tensor {name}: {ty} [{n_cols}, {n_rows}] needs {expect} bytes, found {n_bytes}");
        }
        let end = offset.checked_add(n_bytes).with_context(|| format!("tensor {name}: offset overflows"))?;
        if end > storage.len() {
            bail!("tensor {name}: data ends at {end}, past the end of its file ({} bytes)", storage.len());
        }
        Ok(Tensor { name: name.to_string(), ty, n_cols, n_rows, storage, offset, n_bytes })
    }

    /// A tensor owning its bytes (synthetic models, in-memory quantization).
    pub fn from_bytes(name: &str, ty: GgmlType, n_cols: usize, n_rows: usize, bytes: Vec<u8>) -> Result<Tensor> {
        let n = bytes.len();
        Tensor::new(name, ty, n_cols, n_rows, Arc::new(Storage::Owned(bytes)), 0, n)
    }

    /// An f32 tensor from values (tests).
    pub fn from_f32(name: &str, n_cols: usize, n_rows: usize, values: &[f32]) -> Result<Tensor> {
        Tensor::from_bytes(name, GgmlType::F32, n_cols, n_rows, bytemuck::cast_slice(values).to_vec())
    }

    pub fn data(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.n_bytes]
    }

    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    pub fn row_bytes(&self) -> usize {
        self.n_bytes / self.n_rows
    }

    /// The stored bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data()[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` into `out` (`n_cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        dequantize(self.ty, self.row(r), out)
    }

    /// The whole tensor as f32: only for vectors (norms, biases) and tests.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.n_cols * self.n_rows];
        dequantize(self.ty, self.data(), &mut out).with_context(|| format!("tensor {}", self.name))?;
        Ok(out)
    }

    /// Whether the bytes are a memory-mapped file's (rather than owned by the process).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage.as_ref(), Storage::Mmap(_))
    }

    /// Drops this tensor's pages of a memory-mapped file from the resident set, once a backend
    /// holds its own copy: the map is read-only and private, so the pages are read back from the
    /// file if they are touched again. Owned bytes are kept.
    pub fn release_pages(&self) {
        self.storage.release(self.offset, self.n_bytes);
    }

    /// Whether both tensors view the same bytes (tied embeddings).
    pub fn same_data(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage) && self.offset == other.offset && self.n_bytes == other.n_bytes
    }
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

pub struct Weights {
    pub token_embd: Tensor,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// The output projection; the same bytes as `token_embd` when the model ties them.
    pub output: Tensor,
    pub tied_output: bool,
    /// Llama 3.1 `rope_freqs.weight`: per-pair frequency divisors.
    pub rope_freqs: Option<Vec<f32>>,
}

/// Looks tensors up by GGUF name and checks their shapes against the config.
pub struct TensorSource<'a> {
    pub lookup: Box<dyn Fn(&str) -> Result<Option<Tensor>> + 'a>,
}

impl TensorSource<'_> {
    fn get(&self, name: &str, n_cols: usize, n_rows: usize) -> Result<Tensor> {
        let t = (self.lookup)(name)?.with_context(|| format!("model file has no tensor {name}"))?;
        if t.n_cols != n_cols || t.n_rows != n_rows {
            bail!(
                "tensor {name} has shape [{}, {}] but the config says [{n_cols}, {n_rows}]",
                t.n_cols,
                t.n_rows
            );
        }
        Ok(t)
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        self.get(name, n, 1)?.to_f32()
    }

    fn optional_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        match (self.lookup)(name)? {
            None => Ok(None),
            Some(_) => Ok(Some(self.vector(name, n)?)),
        }
    }
}

impl Weights {
    /// Builds the weights from a lookup by GGUF tensor name.
    pub fn load(cfg: &Config, src: &TensorSource) -> Result<Weights> {
        let (d, q, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let token_embd = src.get("token_embd.weight", d, cfg.n_vocab)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
                let b = src.optional_vector(&n(s), len)?;
                if cfg.attn_bias && b.is_none() {
                    bail!("{} model lacks tensor {}", cfg.arch.name(), n(s));
                }
                Ok(b)
            };
            layers.push(LayerWeights {
                attn_norm: src.vector(&n("attn_norm.weight"), d)?,
                wq: src.get(&n("attn_q.weight"), d, q)?,
                wk: src.get(&n("attn_k.weight"), d, kv)?,
                wv: src.get(&n("attn_v.weight"), d, kv)?,
                wo: src.get(&n("attn_output.weight"), q, d)?,
                bq: bias("attn_q.bias", q)?,
                bk: bias("attn_k.bias", kv)?,
                bv: bias("attn_v.bias", kv)?,
                ffn_norm: src.vector(&n("ffn_norm.weight"), d)?,
                w_gate: src.get(&n("ffn_gate.weight"), d, ff)?,
                w_up: src.get(&n("ffn_up.weight"), d, ff)?,
                w_down: src.get(&n("ffn_down.weight"), ff, d)?,
            });
        }
        let output_norm = src.vector("output_norm.weight", d)?;
        let (output, tied_output) = match (src.lookup)("output.weight")? {
            Some(_) => (src.get("output.weight", d, cfg.n_vocab)?, false),
            None => (token_embd.clone(), true),
        };
        let rope_freqs = src.optional_vector("rope_freqs.weight", cfg.n_rot / 2)?;
        Ok(Weights { token_embd, layers, output_norm, output, tied_output, rope_freqs })
    }

    /// Weights of a GGUF file, viewed in place in its memory map.
    pub fn from_gguf(f: &GgufFile, cfg: &Config) -> Result<Weights> {
        let lookup = |name: &str| -> Result<Option<Tensor>> {
            let Some(info) = f.tensor(name) else { return Ok(None) };
            if info.dims.len() > 2 && info.dims[2..].iter().any(|&d| d != 1) {
                bail!("tensor {name} has {} dimensions; kvgear expects matrices", info.dims.len());
            }
            let n_cols = info.dims.first().copied().unwrap_or(1) as usize;
            let n_rows = info.dims.get(1).copied().unwrap_or(1) as usize;
            let offset = usize::try_from(info.offset).context("tensor offset overflows")?;
            Tensor::new(name, info.ty, n_cols, n_rows, f.storage.clone(), offset, info.n_bytes).map(Some)
        };
        Weights::load(cfg, &TensorSource { lookup: Box::new(lookup) })
    }

    /// Every matrix of the model, each once (the tied output is not listed twice).
    pub fn matrices(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.token_embd];
        for l in &self.layers {
            v.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
        }
        if !self.tied_output {
            v.push(&self.output);
        }
        v
    }

    /// Bytes of weights held: every matrix as stored plus the f32 vectors.
    pub fn bytes(&self) -> usize {
        let mats: usize = self.matrices().iter().map(|t| t.n_bytes()).sum();
        let vecs: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.len()
                    + l.ffn_norm.len()
                    + l.bq.as_ref().map_or(0, |b| b.len())
                    + l.bk.as_ref().map_or(0, |b| b.len())
                    + l.bv.as_ref().map_or(0, |b| b.len())
            })
            .sum::<usize>()
            + self.output_norm.len()
            + self.rope_freqs.as_ref().map_or(0, |f| f.len());
        mats + vecs * 4
    }

    /// Bytes and tensor count per stored type, matrices only.
    pub fn bytes_by_type(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let mut m = BTreeMap::new();
        for t in self.matrices() {
            let e = m.entry(t.ty.name()).or_insert((0usize, 0usize));
            e.0 += 1;
            e.1 += t.n_bytes();
        }
        m
    }
}

impl Weights {
    /// Weights of a Hugging Face safetensors model, viewed in place in its shards' memory maps.
    pub fn from_safetensors(st: &crate::format::safetensors::SafetensorsModel, cfg: &Config) -> Result<Weights> {
        let by_gguf_name: std::collections::HashMap<String, &crate::format::safetensors::SafetensorsTensor> = st
            .tensors
            .iter()
            .filter_map(|t| crate::format::safetensors::gguf_tensor_name(&t.name).map(|n| (n, t)))
            .collect();
        let lookup = move |name: &str| -> Result<Option<Tensor>> {
            let Some(t) = by_gguf_name.get(name) else { return Ok(None) };
            if t.dims.len() > 2 {
                bail!("tensor {} has {} dimensions; kvgear expects matrices", t.name, t.dims.len());
            }
            let n_cols = t.dims.first().copied().unwrap_or(1) as usize;
            let n_rows = t.dims.get(1).copied().unwrap_or(1) as usize;
            let shard = st.shards.get(t.shard).with_context(|| format!("tensor {} names a missing shard", t.name))?;
            let offset = usize::try_from(t.offset).context("tensor offset overflows")?;
            Tensor::new(name, t.ty, n_cols, n_rows, shard.storage.clone(), offset, t.n_bytes).map(Some)
        };
        Weights::load(cfg, &TensorSource { lookup: Box::new(lookup) })
    }
}
