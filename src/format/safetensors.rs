//! Hugging Face safetensors layout: config.json, tokenizer.json, one or several `*.safetensors`.
//!
//! A model directory holds `config.json`, usually `tokenizer.json`, and either one
//! `model.safetensors` or `model.safetensors.index.json` whose `weight_map` names the shard file
//! of every tensor. Each shard is an 8-byte little-endian header length, a JSON header
//! (`{name: {dtype, shape, data_offsets: [begin, end]}}`, offsets from the end of the header) and
//! the data. Shapes are row-major, outermost first; kvgear reverses them into GGML order.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::gguf::Storage;
use super::quant::GgmlType;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a safetensors model.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsTensor {
    /// The Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// GGML order: `dims[0]` is the row length (the last safetensors dimension). A scalar has
    /// `dims == [1]`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Index into [`SafetensorsModel::shards`].
    pub shard: usize,
    /// Offset of the data from the start of the shard file.
    pub offset: u64,
    pub n_bytes: usize,
}

impl SafetensorsTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// One memory-mapped `.safetensors` file.
pub struct Shard {
    pub path: PathBuf,
    pub storage: Arc<Storage>,
}

pub struct SafetensorsModel {
    pub dir: PathBuf,
    /// `config.json`, as parsed JSON.
    pub config: serde_json::Value,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer_path: Option<PathBuf>,
    pub shards: Vec<Shard>,
    /// Shard by shard, in data order within each shard.
    pub tensors: Vec<SafetensorsTensor>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsModel {
    /// Opens a Hugging Face model directory.
    pub fn open(dir: &Path) -> Result<SafetensorsModel> {
        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&config_text)
            .with_context(|| format!("parsing {} as JSON", config_path.display()))?;
        if !config.is_object() {
            bail!("{}: expected a JSON object", config_path.display());
        }
        let tokenizer_path = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());

        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (shard_files, weight_map) = if index_path.is_file() {
            let (files, map) = read_index(&index_path)?;
            (files, Some(map))
        } else if single_path.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            bail!(
                "{}: neither {SINGLE_FILE} nor {INDEX_FILE} is there",
                dir.display()
            );
        };

        let mut shards = Vec::with_capacity(shard_files.len());
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (shard_index, file) in shard_files.iter().enumerate() {
            let path = dir.join(file);
            let storage = Arc::new(Storage::map(&path)?);
            let shard_tensors = parse_shard(&storage, shard_index)
                .with_context(|| format!("reading safetensors file {}", path.display()))?;
            for t in shard_tensors {
                if let Some(map) = &weight_map {
                    match map.get(&t.name) {
                        Some(listed) if listed == file => {}
                        Some(listed) => bail!(
                            "{}: tensor {} is in {file}, but {INDEX_FILE} puts it in {listed}",
                            dir.display(),
                            t.name
                        ),
                        None => bail!(
                            "{}: tensor {} is in {file}, but {INDEX_FILE} does not list it",
                            dir.display(),
                            t.name
                        ),
                    }
                }
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    bail!(
                        "{}: tensor {} appears in more than one shard",
                        dir.display(),
                        t.name
                    );
                }
                tensors.push(t);
            }
            shards.push(Shard { path, storage });
        }
        if let Some(map) = &weight_map {
            let mut missing: Vec<&String> = map
                .keys()
                .filter(|name| !by_name.contains_key(*name))
                .collect();
            missing.sort();
            if let Some(name) = missing.first() {
                bail!(
                    "{}: {INDEX_FILE} lists {} tensors that no shard holds, first {name} (in {})",
                    dir.display(),
                    missing.len(),
                    map.get(*name).map_or("?", String::as_str)
                );
            }
        }
        Ok(SafetensorsModel {
            dir: dir.to_path_buf(),
            config,
            tokenizer_path,
            shards,
            tensors,
            by_name,
        })
    }

    /// A tensor by its Hugging Face name.
    pub fn tensor(&self, name: &str) -> Option<&SafetensorsTensor> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The tensor, or an error naming it.
    pub fn require_tensor(&self, name: &str) -> Result<&SafetensorsTensor> {
        self.tensor(name)
            .ok_or_else(|| anyhow!("{}: tensor {name} is missing", self.dir.display()))
    }

    /// The bytes of a tensor of this model, little-endian as stored.
    ///
    /// # Panics
    /// If `t` describes a range outside this model's shards, which no tensor it lists does.
    pub fn tensor_data(&self, t: &SafetensorsTensor) -> &[u8] {
        let range = usize::try_from(t.offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(t.n_bytes)?));
        let bytes = self
            .shards
            .get(t.shard)
            .zip(range)
            .and_then(|(shard, r)| shard.storage.get(r));
        match bytes {
            Some(bytes) => bytes,
            None => panic!(
                "tensor {}: shard {} [{}, +{}) is not part of this model",
                t.name, t.shard, t.offset, t.n_bytes
            ),
        }
    }
}

/// The shard file names, sorted, and the weight map (tensor name -> shard file name).
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", path.display()))?;
    let mut weight_map = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: weight_map entry {name} is not a file name",
                path.display()
            )
        })?;
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && Path::new(file).file_name().is_some_and(|f| f == file);
        if !plain {
            bail!(
                "{}: weight_map entry {name} names {file:?}, not a file in the model directory",
                path.display()
            );
        }
        weight_map.insert(name.clone(), file.to_string());
    }
    let mut files: Vec<String> = weight_map
        .values()
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: weight_map is empty", path.display());
    }
    Ok((files, weight_map))
}

fn ggml_type(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// Tensors of one shard, in data order, with absolute offsets validated against the file.
fn parse_shard(bytes: &[u8], shard: usize) -> Result<Vec<SafetensorsTensor>> {
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("bad safetensors header: {e}"))?;
    let data_start = header_len
        .checked_add(8)
        .ok_or_else(|| anyhow!("header length {header_len} overflows"))?;
    let infos = metadata.tensors();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in metadata.offset_keys() {
        let info = infos
            .get(&name)
            .ok_or_else(|| anyhow!("tensor {name} vanished from the header"))?;
        let ty = ggml_type(info.dtype).ok_or_else(|| {
            anyhow!(
                "tensor {name} has dtype {:?}; only F32, F16 and BF16 are supported",
                info.dtype
            )
        })?;
        let (begin, end) = info.data_offsets;
        let start = data_start.checked_add(begin);
        let stop = data_start.checked_add(end);
        let (start, n_bytes) = match (start, stop) {
            (Some(start), Some(stop)) if start <= stop && stop <= bytes.len() => {
                (start, stop - start)
            }
            _ => bail!(
                "tensor {name}: data offsets [{begin}, {end}) lie outside the file ({} bytes)",
                bytes.len()
            ),
        };
        let n_elements = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = n_elements.and_then(|n| ty.row_bytes(n));
        if expected != Some(n_bytes) {
            bail!(
                "tensor {name}: {n_bytes} bytes do not hold a {:?} {ty} tensor",
                info.shape
            );
        }
        let mut dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
        if dims.is_empty() {
            dims.push(1);
        }
        tensors.push(SafetensorsTensor {
            name,
            dims,
            ty,
            shard,
            offset: start as u64,
            n_bytes,
        });
    }
    Ok(tensors)
}

/// The GGUF name of a Llama/Qwen2 Hugging Face tensor, or `None` for names with no GGUF
/// counterpart (e.g. `rotary_emb.inv_freq`).
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    match hf_name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".to_string()),
        "model.norm.weight" => return Some("output_norm.weight".to_string()),
        "lm_head.weight" => return Some("output.weight".to_string()),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (module, suffix) = rest.rsplit_once('.')?;
    let gguf = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    match suffix {
        "weight" | "bias" => Some(format!("blk.{layer}.{gguf}.{suffix}")),
        _ => None,
    }
}
