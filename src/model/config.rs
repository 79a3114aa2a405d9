//! Model configuration, from GGUF metadata, from a Hugging Face config.json, or by name.

use anyhow::{bail, Context, Result};

use crate::backend::cpu::reference::RopeStyle;
use crate::format::gguf::GgufFile;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2 and 3, SmolLM2, TinyLlama, Mistral-style GQA.
    Llama,
    /// Llama plus biases on the Q, K and V projections.
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Hidden width of the feed-forward block.
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rope_base: f32,
    /// Leading dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    pub rope_style: RopeStyle,
    pub norm_eps: f32,
    /// Q, K and V projections carry biases (qwen2).
    pub attn_bias: bool,
    /// Llama 3.1 style per-pair frequency divisors computed from a HF `rope_scaling` block; GGUF
    /// files carry them as the tensor `rope_freqs.weight` instead.
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// Upper bounds that keep a corrupt file from asking for absurd allocations.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 24;

impl Config {
    /// The named configurations `synth` and `memory` know.
    pub const NAMES: [&'static str; 9] =
        ["tiny", "tiny-qwen2", "smollm2-135m", "tinyllama-1.1b", "llama2-7b", "llama2-13b", "llama3-8b", "qwen2-0.5b", "mistral-7b"];

    pub fn named(name: &str) -> Result<Config> {
        let llama = |n_layers, n_embd, n_heads, n_kv_heads, n_ff, n_vocab, n_ctx_train, rope_base, norm_eps| Config {
            arch: Arch::Llama,
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim: n_embd / n_heads,
            n_ff,
            n_vocab,
            n_ctx_train,
            rope_base,
            n_rot: n_embd / n_heads,
            rope_style: RopeStyle::Norm,
            norm_eps,
            attn_bias: false,
            rope_freq_factors: None,
        };
        let cfg = match name {
            "tiny" => llama(2, 256, 4, 2, 512, 512, 256, 10000.0, 1e-5),
            "smollm2-135m" => llama(30, 576, 9, 3, 1536, 49152, 8192, 100000.0, 1e-5),
            "tinyllama-1.1b" => llama(22, 2048, 32, 4, 5632, 32000, 2048, 10000.0, 1e-5),
            "llama2-7b" => llama(32, 4096, 32, 32, 11008, 32000, 4096, 10000.0, 1e-5),
            "llama2-13b" => llama(40, 5120, 40, 40, 13824, 32000, 4096, 10000.0, 1e-5),
            "llama3-8b" => llama(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5),
            "mistral-7b" => llama(32, 4096, 32, 8, 14336, 32000, 32768, 1000000.0, 1e-5),
            "tiny-qwen2" => Config {
                arch: Arch::Qwen2,
                rope_style: RopeStyle::Neox,
                attn_bias: true,
                ..llama(2, 256, 4, 2, 512, 512, 256, 1000000.0, 1e-6)
            },
            "qwen2-0.5b" => Config {
                arch: Arch::Qwen2,
                rope_style: RopeStyle::Neox,
                attn_bias: true,
                ..llama(24, 896, 14, 2, 4864, 151936, 32768, 1000000.0, 1e-6)
            },
            _ => bail!("unknown model config '{name}'; known: {}", Config::NAMES.join(", ")),
        };
        Ok(cfg)
    }

    /// Reads `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Config> {
        let arch_name = f.get_str("general.architecture")?;
        let arch = Arch::from_name(arch_name)
            .with_context(|| format!("unsupported architecture '{arch_name}' (kvgear runs llama and qwen2)"))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            let full = key(k);
            f.opt_u64(&full)?.map(|v| v as usize).with_context(|| format!("GGUF metadata lacks {full}"))
        };
        let n_embd = req("embedding_length")?;
        let n_heads = req("attention.head_count")?;
        if n_heads == 0 {
            bail!("{} is 0", key("attention.head_count"));
        }
        let n_kv_heads = f.opt_u64(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_heads);
        let head_dim = f.opt_u64(&key("attention.key_length"))?.map(|v| v as usize).unwrap_or(n_embd / n_heads);
        let n_vocab = match f.opt_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => match f.get("tokenizer.ggml.tokens") {
                Some(crate::format::gguf::Value::Array(a)) => a.len(),
                _ => f
                    .tensor("token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
                    .context("cannot tell the vocabulary size: no vocab_size, tokens or token_embd.weight")?
                    as usize,
            },
        };
        let cfg = Config {
            arch,
            n_layers: req("block_count")?,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff: req("feed_forward_length")?,
            n_vocab,
            n_ctx_train: f.opt_u64(&key("context_length"))?.map(|v| v as usize).unwrap_or(2048),
            rope_base: f.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
            n_rot: f.opt_u64(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim),
            rope_style: match arch {
                Arch::Llama => RopeStyle::Norm,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            norm_eps: f.opt_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            attn_bias: arch == Arch::Qwen2,
            rope_freq_factors: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`. Llama weights from safetensors are not permuted as
    /// GGUF's converter permutes them, so RoPE rotates halves (NeoX style) for every architecture.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Config> {
        let model_type = v.get("model_type").and_then(|m| m.as_str()).context("config.json has no model_type")?;
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!("unsupported model_type '{other}' in config.json (kvgear runs llama, mistral and qwen2)"),
        };
        let req = |k: &str| -> Result<usize> {
            v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).with_context(|| format!("config.json lacks integer {k}"))
        };
        let n_embd = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        if n_heads == 0 {
            bail!("num_attention_heads is 0");
        }
        let head_dim = v.get("head_dim").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(n_embd / n_heads);
        let rope_base = v.get("rope_theta").and_then(|x| x.as_f64()).unwrap_or(10000.0) as f32;
        let rope_freq_factors = match v.get("rope_scaling") {
            Some(s) if s.get("rope_type").and_then(|t| t.as_str()) == Some("llama3") => {
                Some(llama3_freq_factors(s, head_dim, rope_base)?)
            }
            Some(s) if !s.is_null() => bail!("unsupported rope_scaling {s}"),
            _ => None,
        };
        let cfg = Config {
            arch,
            n_layers: req("num_hidden_layers")?,
            n_embd,
            n_heads,
            n_kv_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).map(|x| x as usize).unwrap_or(n_heads),
            head_dim,
            n_ff: req("intermediate_size")?,
            n_vocab: req("vocab_size")?,
            n_ctx_train: v.get("max_position_embeddings").and_then(|x| x.as_u64()).unwrap_or(2048) as usize,
            rope_base,
            n_rot: head_dim,
            rope_style: RopeStyle::Neox,
            norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5) as f32,
            attn_bias: arch == Arch::Qwen2,
            rope_freq_factors,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        for (name, v, max) in [
            ("n_layers", c.n_layers, MAX_LAYERS),
            ("n_embd", c.n_embd, MAX_DIM),
            ("n_heads", c.n_heads, MAX_DIM),
            ("n_kv_heads", c.n_kv_heads, MAX_DIM),
            ("head_dim", c.head_dim, MAX_DIM),
            ("n_ff", c.n_ff, MAX_DIM),
            ("n_vocab", c.n_vocab, MAX_VOCAB),
        ] {
            if v == 0 || v > max {
                bail!("model config: {name} = {v} is out of range (1..={max})");
            }
        }
        if c.n_heads % c.n_kv_heads != 0 {
            bail!("model config: {} query heads do not divide into {} KV heads", c.n_heads, c.n_kv_heads);
        }
        if c.n_rot > c.head_dim || c.n_rot % 2 != 0 || c.n_rot == 0 {
            bail!("model config: rope dimension {} must be even, non-zero and at most head_dim {}", c.n_rot, c.head_dim);
        }
        if !(c.rope_base > 0.0 && c.rope_base.is_finite()) {
            bail!("model config: rope base {} must be positive", c.rope_base);
        }
        if !(c.norm_eps > 0.0 && c.norm_eps < 1.0) {
            bail!("model config: rms epsilon {} out of range", c.norm_eps);
        }
        if let Some(f) = &c.rope_freq_factors {
            if f.len() != c.n_rot / 2 {
                bail!("model config: {} rope frequency factors for {} rotated pairs", f.len(), c.n_rot / 2);
            }
        }
        Ok(())
    }

    /// Width of the Q projection output.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the K and V projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes an fp16 KV cache holds per token: K and V, every layer.
    pub fn kv_bytes_per_token_fp16(&self) -> usize {
        self.n_layers * 2 * self.kv_dim() * 2
    }

    /// Parameter count (the output matrix counted once more when it is not tied).
    pub fn n_params(&self, tied_output: bool) -> u64 {
        let d = self.n_embd as u64;
        let per_layer = d * self.q_dim() as u64
            + 2 * d * self.kv_dim() as u64
            + self.q_dim() as u64 * d
            + 3 * d * self.n_ff as u64
            + 2 * d
            + if self.attn_bias { (self.q_dim() + 2 * self.kv_dim()) as u64 } else { 0 };
        let embd = self.n_vocab as u64 * d;
        embd + self.n_layers as u64 * per_layer + d + if tied_output { 0 } else { embd }
    }
}

/// Llama 3.1's frequency divisors (HF `rope_scaling` with `rope_type = llama3`), one per pair.
fn llama3_freq_factors(s: &serde_json::Value, head_dim: usize, base: f32) -> Result<Vec<f32>> {
    let get = |k: &str| s.get(k).and_then(|x| x.as_f64()).with_context(|| format!("rope_scaling lacks {k}"));
    let factor = get("factor")?;
    let low = get("low_freq_factor")?;
    let high = get("high_freq_factor")?;
    let old_ctx = get("original_max_position_embeddings")?;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_are_valid() {
        for n in Config::NAMES {
            Config::named(n).unwrap().validate().unwrap();
        }
        assert!(Config::named("nope").is_err());
    }

    #[test]
    fn llama2_7b_has_its_known_size() {
        let c = Config::named("llama2-7b").unwrap();
        assert_eq!(c.n_params(false), 6_738_415_616);
        assert_eq!(c.kv_bytes_per_token_fp16(), 524_288);
    }

    #[test]
    fn hf_config_reads() {
        let v: serde_json::Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 5000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let c = Config::from_hf_json(&v).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_style, RopeStyle::Neox);
        assert_eq!(c.rope_freq_factors.as_ref().unwrap().len(), 8);
        let bad = serde_json::json!({"model_type": "gpt2"});
        assert!(Config::from_hf_json(&bad).is_err());
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut c = Config::named("tiny").unwrap();
        c.n_kv_heads = 3;
        assert!(c.validate().is_err());
    }
}
