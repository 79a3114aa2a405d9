//! The reference backend's kernels: plain loops, written for clarity, the oracle every other
//! implementation (fast CPU, CUDA) is checked against.
//!
//! Layouts are row-major and contiguous; the shapes are given in each function's comment.

/// How RoPE pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama.cpp's `LLAMA_ROPE_TYPE_NORM`, used for `llama`
    /// GGUF files (whose converter permutes Q and K rows to match).
    Norm,
    /// Halves `(x[i], x[i + n_rot/2])`: GPT-NeoX / Hugging Face `rotate_half`, used by `qwen2` and
    /// by Llama weights read from safetensors.
    Neox,
}

/// RMSNorm over rows: `x` and `out` are `[n_rows, dim]`, `w` is `[dim]`.
/// `out = x / sqrt(mean(x^2) + eps) * w`, the sum of squares accumulated in f64.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % dim, 0);
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / ((ss / dim as f64) + eps as f64).sqrt()) as f32;
        for i in 0..dim {
            or[i] = xr[i] * scale * w[i];
        }
    }
}

/// Parameters of a rotary position embedding.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams<'a> {
    pub n_heads: usize,
    pub head_dim: usize,
    /// Number of leading dimensions of each head that rotate (`rope.dimension_count`).
    pub n_rot: usize,
    pub freq_base: f32,
    pub style: RopeStyle,
    /// Optional per-pair divisors of the frequency (Llama 3.1 `rope_freqs`), `[n_rot / 2]`.
    pub freq_factors: Option<&'a [f32]>,
}

/// RoPE in place: `x` is `[n_tokens, n_heads, head_dim]`; token `t` sits at position `pos0 + t`.
/// Pair `i` rotates by the angle `pos * freq_base^(-2i / n_rot) / factor[i]`.
pub fn rope(x: &mut [f32], pos0: usize, p: &RopeParams) {
    let row = p.n_heads * p.head_dim;
    assert_eq!(x.len() % row, 0);
    let half = p.n_rot / 2;
    for (t, tok) in x.chunks_exact_mut(row).enumerate() {
        let pos = (pos0 + t) as f64;
        for head in tok.chunks_exact_mut(p.head_dim) {
            for i in 0..half {
                let mut theta = pos * (p.freq_base as f64).powf(-2.0 * i as f64 / p.n_rot as f64);
                if let Some(f) = p.freq_factors {
                    theta /= f[i] as f64;
                }
                let (sin, cos) = theta.sin_cos();
                let (a, b) = match p.style {
                    RopeStyle::Norm => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
}

/// SwiGLU's gate in place: `gate = silu(gate) * up`, both `[n]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Residual add in place: `x += y`, both `[n]`.
pub fn add(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Index of the largest value (the first one on ties); `None` for an empty slice.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]`: each weight row dequantized on its own (never the whole
/// matrix), dot products accumulated in f64. `x` is `[n_tokens, w.n_cols]`.
pub fn matmul(w: &crate::model::weights::Tensor, x: &[f32], n_tokens: usize, out: &mut [f32]) -> anyhow::Result<()> {
    let (n_cols, n_rows) = (w.n_cols, w.n_rows);
    let mut row = vec![0.0f32; n_cols];
    for r in 0..n_rows {
        w.dequantize_row(r, &mut row)?;
        for t in 0..n_tokens {
            let xt = &x[t * n_cols..(t + 1) * n_cols];
            let dot: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            out[t * n_rows + r] = dot as f32;
        }
    }
    Ok(())
}

/// Causal attention over an fp16 cache, plain loops. `q` and `out` are `[n_tokens, n_heads,
/// head_dim]`; query `t` sits at position `layer.n_tokens - n_tokens + t` and sees every cached
/// token up to and including its own. Softmax in f64. `mass`, when given, is `[n_kv_heads,
/// layer.n_tokens]` and receives each token's softmax weight summed over queries and the query
/// heads of each KV head.
pub fn attention(
    q: &[f32],
    layer: &crate::kv::Fp16Layer,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    out: &mut [f32],
    mut mass: Option<&mut [f32]>,
) {
    let n_ctx = layer.n_tokens;
    let group = n_heads / layer.n_kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut scores = vec![0.0f64; n_ctx];
    for t in 0..n_tokens {
        let pos = n_ctx - n_tokens + t;
        for h in 0..n_heads {
            let g = h / group;
            let qh = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let (kh, vh) = (&layer.k[g], &layer.v[g]);
            let mut max = f64::NEG_INFINITY;
            for j in 0..=pos {
                let kj = &kh[j * head_dim..][..head_dim];
                let s: f64 = qh.iter().zip(kj).map(|(&a, &b)| a as f64 * b.to_f64()).sum::<f64>() * scale;
                scores[j] = s;
                max = max.max(s);
            }
            let mut total = 0.0;
            for s in &mut scores[..=pos] {
                *s = (*s - max).exp();
                total += *s;
            }
            let oh = &mut out[(t * n_heads + h) * head_dim..][..head_dim];
            let mut acc = vec![0.0f64; head_dim];
            for j in 0..=pos {
                let p = scores[j] / total;
                let vj = &vh[j * head_dim..][..head_dim];
                for d in 0..head_dim {
                    acc[d] += p * vj[d].to_f64();
                }
                if let Some(m) = mass.as_deref_mut() {
                    m[g * n_ctx + j] += p as f32;
                }
            }
            for d in 0..head_dim {
                oh[d] = acc[d] as f32;
            }
        }
    }
}
