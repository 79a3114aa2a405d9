//! Model configuration, weights, tokenizer and the forward pass.

pub mod chat;
pub mod config;
pub mod llama;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format::gguf::GgufFile;
use config::Config;
use tokenizer::Tokenizer;
use weights::Weights;

/// A loaded model: configuration, weights (memory-mapped, as stored) and tokenizer.
pub struct Model {
    pub path: PathBuf,
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// `general.name` or the directory name.
    pub name: String,
    /// The GGUF file, when the model came from one (metadata for `info`).
    pub gguf: Option<GgufFile>,
}

impl Model {
    /// Loads a GGUF file, or a Hugging Face safetensors directory.
    pub fn load(path: &Path) -> Result<Model> {
        if path.is_dir() {
            return Model::load_safetensors(path);
        }
        let f = GgufFile::open(path).with_context(|| format!("cannot read model {}", path.display()))?;
        Model::from_gguf(f, path)
    }

    /// Builds a model from an opened GGUF file (also used for in-memory synthetic files).
    pub fn from_gguf(f: GgufFile, path: &Path) -> Result<Model> {
        let config = Config::from_gguf(&f).with_context(|| format!("{}", path.display()))?;
        let weights = Weights::from_gguf(&f, &config).with_context(|| format!("{}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf_metadata(&f.metadata).with_context(|| format!("tokenizer of {}", path.display()))?;
        let name = f.opt_str("general.name")?.map(str::to_string).unwrap_or_else(|| file_stem(path));
        Ok(Model { path: path.to_path_buf(), config, weights, tokenizer, name, gguf: Some(f) })
    }

    fn load_safetensors(dir: &Path) -> Result<Model> {
        let st = crate::format::safetensors::SafetensorsModel::open(dir)?;
        let config = Config::from_hf_json(&st.config).with_context(|| format!("{}/config.json", dir.display()))?;
        let weights = Weights::from_safetensors(&st, &config)?;
        if st.tokenizer_path.is_none() {
            anyhow::bail!("{} has no tokenizer.json", dir.display());
        }
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        Ok(Model { path: dir.to_path_buf(), config, weights, tokenizer, name: file_stem(dir), gguf: None })
    }
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string())
}
