//! `kvgear synth`: a synthetic GGUF with a named model config and seeded random weights.
//!
//! This is how Llama2-7B-sized speed and memory are measured without the real weights: the file
//! has the real shapes, block formats and a valid byte-level BPE tokenizer, so it loads through the
//! same code path as real files (and in llama.cpp). Its weights are random, so its text is noise:
//! it is labelled `kvgear.synthetic = true` in its metadata and in every result row.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::format::gguf::{GgufWriter, Value};
use crate::format::quant::{quantize, GgmlType};
use crate::model::config::{Arch, Config};
use crate::rng::Rng;

#[derive(clap::Args, Clone, Debug)]
pub struct SynthArgs {
    /// Named config: tiny, tiny-qwen2, smollm2-135m, tinyllama-1.1b, llama2-7b, llama2-13b, llama3-8b, qwen2-0.5b, mistral-7b.
    #[arg(long, default_value = "llama2-7b")]
    pub config: String,
    /// Type of the weight matrices (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long, default_value = "q4_0")]
    pub quant: String,
    /// Type of the output matrix (default: q6_k for 4- and 5-bit types, as llama.cpp does; else --quant).
    #[arg(long)]
    pub output_type: Option<String>,
    /// Override the number of layers (smaller files with the same per-layer shapes).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the context length recorded in the file.
    #[arg(long)]
    pub ctx: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// Standard deviation of the random weights (about what trained Llama matrices have).
const WEIGHT_STD: f32 = 0.02;
/// Elements generated per parallel task; each task has its own seeded stream, so the file is the
/// same whatever the thread count.
const CHUNK_ELEMS: usize = 1 << 16;

/// llama.cpp's `general.file_type` for a uniform quantization to `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
    }
}

pub fn parse_type(s: &str) -> Result<GgmlType> {
    GgmlType::from_name(s).with_context(|| {
        let names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown tensor type '{s}' (known: {})", names.join(", "))
    })
}

/// One tensor of the synthetic model.
struct Spec {
    name: String,
    n_cols: usize,
    n_rows: usize,
    ty: GgmlType,
    kind: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform with standard deviation `WEIGHT_STD`.
    Matrix,
    /// 1 plus small noise (RMSNorm gains).
    Norm,
    /// Small noise (biases).
    Bias,
}

fn specs(cfg: &Config, ty: GgmlType, out_ty: GgmlType, tied: bool) -> Vec<Spec> {
    let (d, q, kv, ff, v) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
    let s = |name: String, n_cols, n_rows, ty, kind| Spec { name, n_cols, n_rows, ty, kind };
    let mut out = vec![s("token_embd.weight".into(), d, v, ty, Fill::Matrix)];
    for l in 0..cfg.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        out.push(s(n("attn_norm.weight"), d, 1, GgmlType::F32, Fill::Norm));
        out.push(s(n("attn_q.weight"), d, q, ty, Fill::Matrix));
        out.push(s(n("attn_k.weight"), d, kv, ty, Fill::Matrix));
        out.push(s(n("attn_v.weight"), d, kv, ty, Fill::Matrix));
        if cfg.attn_bias {
            out.push(s(n("attn_q.bias"), q, 1, GgmlType::F32, Fill::Bias));
            out.push(s(n("attn_k.bias"), kv, 1, GgmlType::F32, Fill::Bias));
            out.push(s(n("attn_v.bias"), kv, 1, GgmlType::F32, Fill::Bias));
        }
        out.push(s(n("attn_output.weight"), q, d, ty, Fill::Matrix));
        out.push(s(n("ffn_norm.weight"), d, 1, GgmlType::F32, Fill::Norm));
        out.push(s(n("ffn_gate.weight"), d, ff, ty, Fill::Matrix));
        out.push(s(n("ffn_up.weight"), d, ff, ty, Fill::Matrix));
        out.push(s(n("ffn_down.weight"), ff, d, ty, Fill::Matrix));
    }
    out.push(s("output_norm.weight".into(), d, 1, GgmlType::F32, Fill::Norm));
    if !tied {
        out.push(s("output.weight".into(), d, v, out_ty, Fill::Matrix));
    }
    out
}

/// Bytes of a model's tensors with matrices in `ty` and the output matrix in `out_ty` (norms in
/// f32), exactly as `write` lays them out, without writing anything.
pub fn tensor_bytes(cfg: &Config, ty: GgmlType, out_ty: GgmlType, tied: bool) -> Result<u64> {
    let mut total = 0u64;
    for s in specs(cfg, ty, out_ty, tied) {
        let rb = s.ty.row_bytes(s.n_cols).with_context(|| format!("{}: rows of {} do not fit {} blocks", s.name, s.n_cols, s.ty))?;
        total += (rb * s.n_rows) as u64;
    }
    Ok(total)
}

/// The output type `synth` and `memory` choose for a weight type: q6_k for 4- and 5-bit types,
/// as llama.cpp does, else the same type.
pub fn default_output_type(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => GgmlType::Q6K,
        other => other,
    }
}

/// The metadata of a synthetic model.
pub fn metadata(cfg: &Config, name: &str, ty: GgmlType, seed: u64) -> Result<Vec<(String, Value)>> {
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        ("general.name".to_string(), Value::String(format!("synthetic {name}"))),
        ("general.file_type".to_string(), Value::U32(file_type(ty))),
        ("general.quantization_version".to_string(), Value::U32(2)),
        ("kvgear.synthetic".to_string(), Value::Bool(true)),
        ("kvgear.synth.config".to_string(), Value::String(name.into())),
        ("kvgear.synth.seed".to_string(), Value::U64(seed)),
        (format!("{a}.block_count"), u(cfg.n_layers)),
        (format!("{a}.context_length"), u(cfg.n_ctx_train)),
        (format!("{a}.embedding_length"), u(cfg.n_embd)),
        (format!("{a}.feed_forward_length"), u(cfg.n_ff)),
        (format!("{a}.attention.head_count"), u(cfg.n_heads)),
        (format!("{a}.attention.head_count_kv"), u(cfg.n_kv_heads)),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_base)),
        (format!("{a}.rope.dimension_count"), u(cfg.n_rot)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.norm_eps)),
        (format!("{a}.vocab_size"), u(cfg.n_vocab)),
    ];
    md.extend(crate::model::tokenizer::synthetic_gpt2_metadata(cfg.n_vocab)?);
    Ok(md)
}

/// Seeded values of one tensor, `n` elements, generated in parallel chunks.
fn fill_values(kind: Fill, n: usize, seed: u64, tensor_index: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    let half_width = WEIGHT_STD * 3.0f32.sqrt();
    v.par_chunks_mut(CHUNK_ELEMS).enumerate().for_each(|(c, chunk)| {
        let mut rng = Rng::new(seed ^ ((tensor_index as u64) << 32) ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for x in chunk.iter_mut() {
            *x = match kind {
                Fill::Matrix => rng.uniform(-half_width, half_width),
                Fill::Norm => 1.0 + rng.uniform(-0.05, 0.05),
                Fill::Bias => rng.uniform(-0.01, 0.01),
            };
        }
    });
    v
}

fn quantize_par(ty: GgmlType, values: &[f32], n_cols: usize) -> Result<Vec<u8>> {
    let rb = ty.row_bytes(n_cols).with_context(|| format!("rows of {n_cols} do not fit {ty} blocks"))?;
    let n_rows = values.len() / n_cols;
    let mut out = vec![0u8; rb * n_rows];
    out.par_chunks_mut(rb).zip(values.par_chunks(n_cols)).try_for_each(|(dst, src)| quantize(ty, src, dst))?;
    Ok(out)
}

/// Writes the synthetic model; returns the file size in bytes.
pub fn write(cfg: &Config, name: &str, ty: GgmlType, out_ty: GgmlType, tied: bool, seed: u64, path: &Path) -> Result<u64> {
    let specs = specs(cfg, ty, out_ty, tied);
    for s in &specs {
        if s.ty.row_bytes(s.n_cols).is_none() {
            bail!("{}: rows of {} values are not a whole number of {} blocks", s.name, s.n_cols, s.ty);
        }
    }
    let mut w = GgufWriter::new();
    for (k, v) in metadata(cfg, name, ty, seed)? {
        w.add_metadata(&k, v)?;
    }
    for s in &specs {
        w.add_tensor(&s.name, &[s.n_cols as u64, s.n_rows as u64], s.ty)?;
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut data = w.write_header(BufWriter::with_capacity(1 << 22, file))?;
    let bar = indicatif::ProgressBar::new(specs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("synth {bar:30} {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for (i, s) in specs.iter().enumerate() {
        let values = fill_values(s.kind, s.n_cols * s.n_rows, seed, i);
        let bytes = quantize_par(s.ty, &values, s.n_cols)?;
        data.write_tensor(&s.name, &bytes)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    data.finish()?;
    Ok(std::fs::metadata(path)?.len())
}

pub fn run(a: &SynthArgs) -> Result<()> {
    let mut cfg = Config::named(&a.config)?;
    if let Some(l) = a.layers {
        cfg.n_layers = l;
    }
    if let Some(c) = a.ctx {
        cfg.n_ctx_train = c;
    }
    cfg.validate()?;
    if cfg.arch == Arch::Qwen2 && cfg.rope_style != crate::backend::cpu::reference::RopeStyle::Neox {
        bail!("qwen2 configs rotate halves");
    }
    let ty = parse_type(&a.quant)?;
    let out_ty = match &a.output_type {
        Some(s) => parse_type(s)?,
        None => default_output_type(ty),
    };
    let tied = a.config == "smollm2-135m";
    let t0 = std::time::Instant::now();
    let bytes = write(&cfg, &a.config, ty, out_ty, tied, a.seed, &a.output)?;
    eprintln!(
        "wrote {} ({} bytes, {:.1} GiB) in {:.1}s: synthetic {} with {} weights, seed {}",
        a.output.display(),
        bytes,
        bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64(),
        a.config,
        ty,
        a.seed
    );
    Ok(())
}
