//! Loading models: safetensors against GGUF, synthetic files, and files that contradict their
//! config.

mod common;

use std::path::Path;

use kvgear::backend::cpu::Cpu;
use kvgear::format::gguf::{GgufFile, GgufWriter, Value};
use kvgear::format::quant::GgmlType;
use kvgear::model::config::Config;
use kvgear::model::llama::{DeviceWeights, Logits, Session};
use kvgear::model::Model;

fn logits(m: &Model, toks: &[u32]) -> Vec<f32> {
    let b = Cpu::reference();
    let dw = DeviceWeights::new(&b, &m.weights).unwrap();
    let mut s = Session::new(&b, &m.config, &dw, 64, 16).unwrap();
    s.forward(toks, Logits::From(0)).unwrap().to_vec()
}

/// GGUF's llama converter permutes the rows of Q and K so that RoPE can rotate adjacent pairs;
/// Hugging Face files keep the original order (RoPE rotates halves). Row `h*hd + 2i + j` of the
/// GGUF matrix is row `h*hd + j*hd/2 + i` of the HF one.
fn unpermute(rows: &[f32], n_cols: usize, n_heads: usize) -> Vec<f32> {
    let n_rows = rows.len() / n_cols;
    let hd = n_rows / n_heads;
    let mut out = vec![0.0f32; rows.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let g = h * hd + 2 * i + j;
                let f = h * hd + j * hd / 2 + i;
                out[f * n_cols..(f + 1) * n_cols].copy_from_slice(&rows[g * n_cols..(g + 1) * n_cols]);
            }
        }
    }
    out
}

fn hf_name(gguf: &str) -> String {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (l, t) = rest.split_once('.').unwrap();
        let t = match t {
            "attn_norm.weight" => "input_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            other => panic!("unexpected tensor {other}"),
        };
        return format!("model.layers.{l}.{t}");
    }
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        other => panic!("unexpected tensor {other}"),
    }
}

/// Writes a single-file safetensors model with F32 tensors.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        let n = data.len() * 4;
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}));
        offset += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    for (_, _, data) in tensors {
        bytes.extend_from_slice(bytemuck::cast_slice(data));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_model_gives_the_logits_of_the_same_weights_in_gguf() {
    let mut cfg = Config::named("tiny").unwrap();
    cfg.n_vocab = 600;
    let gguf_path = common::temp_path("st-source.gguf");
    kvgear::synth::write(&cfg, "tiny", GgmlType::F32, GgmlType::F32, false, 11, &gguf_path).unwrap();
    let g = Model::load(&gguf_path).unwrap();
    let f = GgufFile::open(&gguf_path).unwrap();
    let mut tensors = Vec::new();
    for t in &f.tensors {
        let mut v = vec![0.0f32; t.n_elements() as usize];
        kvgear::format::quant::dequantize(t.ty, f.tensor_data(t), &mut v).unwrap();
        let n_cols = t.dims[0] as usize;
        let n_rows = t.dims.get(1).copied().unwrap_or(1) as usize;
        if t.name.ends_with("attn_q.weight") {
            v = unpermute(&v, n_cols, cfg.n_heads);
        } else if t.name.ends_with("attn_k.weight") {
            v = unpermute(&v, n_cols, cfg.n_kv_heads);
        }
        let shape = if n_rows == 1 && t.dims.len() == 1 { vec![n_cols] } else { vec![n_rows, n_cols] };
        tensors.push((hf_name(&t.name), shape, v));
    }
    let dir = common::temp_path("st-model");
    std::fs::create_dir_all(&dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.n_ff, "vocab_size": cfg.n_vocab, "rope_theta": cfg.rope_base,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.n_ctx_train, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/hf_bpe");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let s = Model::load(&dir).unwrap();
    assert_eq!(s.config.n_layers, cfg.n_layers);
    let toks: Vec<u32> = (0..9).map(|i| (i * 61 % 600) as u32).collect();
    let (a, b) = (logits(&g, &toks), logits(&s, &toks));
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(max <= 1e-5 * scale, "safetensors vs gguf logits differ by {max} (scale {scale})");
}

#[test]
fn synthetic_files_are_deterministic_and_load_like_real_files() {
    let cfg = Config::named("tiny").unwrap();
    let (a, b, c) = (common::temp_path("det-a.gguf"), common::temp_path("det-b.gguf"), common::temp_path("det-c.gguf"));
    kvgear::synth::write(&cfg, "tiny", GgmlType::Q4_0, GgmlType::Q6K, false, 5, &a).unwrap();
    kvgear::synth::write(&cfg, "tiny", GgmlType::Q4_0, GgmlType::Q6K, false, 5, &b).unwrap();
    kvgear::synth::write(&cfg, "tiny", GgmlType::Q4_0, GgmlType::Q6K, false, 6, &c).unwrap();
    let (ba, bb, bc) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(ba, bb, "same seed, same bytes");
    assert_ne!(ba, bc, "another seed, other weights");
    let m = Model::load(&a).unwrap();
    assert_eq!(m.config, {
        let mut c2 = cfg.clone();
        c2.rope_freq_factors = None;
        c2
    });
    assert_eq!(m.weights.output.ty, GgmlType::Q6K);
    let f = GgufFile::open(&a).unwrap();
    assert_eq!(f.opt_bool("kvgear.synthetic").unwrap(), Some(true));
    // Every tensor's bytes read back as written: a second file built from the parsed one is
    // byte-identical.
    let mut w = GgufWriter::new();
    for (k, v) in &f.metadata {
        w.add_metadata(k, v.clone()).unwrap();
    }
    for t in &f.tensors {
        w.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    let mut data = w.write_header(Vec::new()).unwrap();
    for t in &f.tensors {
        data.write_tensor(&t.name, f.tensor_data(t)).unwrap();
    }
    assert_eq!(data.finish().unwrap(), ba);
}

/// Rewrites a GGUF with one metadata value replaced.
fn with_metadata(src: &Path, key: &str, value: Value, dst: &Path) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &f.metadata {
        w.add_metadata(k, if k == key { value.clone() } else { v.clone() }).unwrap();
    }
    for t in &f.tensors {
        w.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    let mut data = w.write_header(std::fs::File::create(dst).unwrap()).unwrap();
    for t in &f.tensors {
        data.write_tensor(&t.name, f.tensor_data(t)).unwrap();
    }
    data.finish().unwrap();
}

#[test]
fn files_that_contradict_their_config_are_clear_errors() {
    let cfg = Config::named("tiny").unwrap();
    let src = common::temp_path("contradict.gguf");
    kvgear::synth::write(&cfg, "tiny", GgmlType::F32, GgmlType::F32, false, 1, &src).unwrap();
    let cases: [(&str, Value, &str); 6] = [
        ("llama.block_count", Value::U32(3), "no tensor blk.2"),
        ("llama.feed_forward_length", Value::U32(256), "has shape [256, 512] but the config says [256, 256]"),
        ("llama.embedding_length", Value::U32(128), "rope dimension"),
        ("llama.attention.head_count_kv", Value::U32(3), "KV heads"),
        ("general.architecture", Value::String("gpt2".into()), "unsupported architecture"),
        ("llama.attention.head_count", Value::U32(0), "is 0"),
    ];
    for (key, value, want) in cases {
        let dst = common::temp_path(&format!("contradict-{key}.gguf"));
        with_metadata(&src, key, value, &dst);
        let err = match Model::load(&dst) {
            Ok(_) => panic!("{key}: loaded a contradictory file"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{key}: error {err:?} does not mention {want:?}");
    }
    assert!(Model::load(&common::temp_path("no-such-file.gguf")).is_err());
}
