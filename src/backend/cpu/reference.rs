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
