//! The closed set of model-level ops and their implementations.
//!
//! The forward pass (`model::llama`) is written once, generic over [`Backend`]. Buffers are
//! contiguous and shapes are explicit arguments; a buffer may be longer than an op uses (the
//! scratch buffers are sized for the largest batch), and an op touches only the prefix its shape
//! names. Activations are f32, row-major `[n_tokens, width]`.

pub mod cpu;
pub mod cuda;

use anyhow::{bail, Result};

use crate::backend::cpu::reference::RopeParams;
use crate::bench::memory::MemoryPlan;
use crate::kv::codec::KvBytes;
use crate::kv::strategy::StrategySpec;
use crate::model::weights::Tensor;

pub trait Backend {
    /// An f32 activation buffer.
    type Buf;
    /// A weight matrix as this backend holds it: its stored blocks, as the file has them or
    /// repacked for the backend's kernels (the CPU's 16-row Q4_0).
    type Weight;
    /// One layer's KV cache.
    type KvLayer;

    /// A short description, for reports (`cpu-fast (2 threads)`).
    fn describe(&self) -> String;

    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Copies the first `out.len()` values of `buf` into `out`.
    fn download(&self, buf: &Self::Buf, out: &mut [f32]) -> Result<()>;
    fn weight(&self, t: &Tensor) -> Result<Self::Weight>;
    /// An embedding table: its rows are looked up by `embed`, never multiplied. By default held
    /// as `weight` holds a matrix.
    fn table(&self, t: &Tensor) -> Result<Self::Weight> {
        self.weight(t)
    }

    /// `out[t, :] = table[tokens[t], :]`, dequantized.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// Copies rows `[row0, row0 + n_rows)` of `src` (`row_len` wide) to the start of `dst`.
    fn copy_rows(&self, src: &Self::Buf, row0: usize, n_rows: usize, row_len: usize, dst: &mut Self::Buf)
        -> Result<()>;
    /// RMSNorm of `n_rows` rows of `w.len()` values.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f32, n_rows: usize, out: &mut Self::Buf)
        -> Result<()>;
    /// `out[t, r] = sum_c w[r, c] * x[t, c]` for `n_tokens` rows of `x` (`w.n_cols` wide).
    fn matmul(&self, w: &Self::Weight, x: &Self::Buf, n_tokens: usize, out: &mut Self::Buf) -> Result<()>;
    /// `x[t, :] += b` for `n_tokens` rows of `width` values.
    fn add_bias(&self, x: &mut Self::Buf, b: &Self::Buf, width: usize, n_tokens: usize) -> Result<()>;
    /// RoPE in place over `[n_tokens, n_heads, head_dim]`, token `t` at position `pos0 + t`.
    fn rope(&self, x: &mut Self::Buf, n_tokens: usize, pos0: usize, p: &RopeParams) -> Result<()>;
    /// `gate[..n] = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, n: usize) -> Result<()>;
    /// `x[..n] += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()>;

    /// An empty cache for layer `layer` under `spec`, for up to `capacity` positions.
    fn kv_layer(&self, spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, capacity: usize, layer: usize)
        -> Result<Self::KvLayer>;
    /// Appends `n_tokens` rows of K and V (`[n_tokens, n_kv_heads, head_dim]`).
    fn kv_append(&self, layer: &mut Self::KvLayer, k: &Self::Buf, v: &Self::Buf, n_tokens: usize) -> Result<()>;
    /// Causal attention of `n_tokens` queries (`[n_tokens, n_heads, head_dim]`), the last
    /// `n_tokens` tokens of `layer` being their own keys. `out` has the shape of `q`. When the
    /// layer's policy asks for it, the softmax weight each cached token received is accumulated
    /// in the layer (summed over queries and over the query heads that share each KV head).
    fn attention(
        &self,
        q: &Self::Buf,
        layer: &mut Self::KvLayer,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Ends a step of `n_new` tokens from position `pos0`: the layer's policy sees the step's
    /// attention mass and evicts. `prompt_len` is the prompt's length (budgets as fractions).
    fn kv_finish_step(&self, layer: &mut Self::KvLayer, n_new: usize, pos0: usize, prompt_len: usize) -> Result<()>;
    /// Bytes one layer's cache holds now, by component.
    fn kv_bytes(&self, layer: &Self::KvLayer) -> KvBytes;
    /// Positions one layer has seen (cached tokens plus evicted ones).
    fn kv_len(&self, layer: &Self::KvLayer) -> usize;
    /// Drops the cached tokens from position `n_tokens` on (a strategy layer only resets to 0).
    fn kv_truncate(&self, layer: &mut Self::KvLayer, n_tokens: usize) -> Result<()>;

    /// An independent copy of one layer's cache, codec and policy state included (a saved prompt
    /// prefix, restored for each prompt that shares it).
    fn kv_clone(&self, _layer: &Self::KvLayer) -> Result<Self::KvLayer> {
        bail!("{} cannot copy its KV cache", self.describe())
    }

    /// Checks, before anything is allocated, that a run needing `plan` fits in the backend's
    /// memory; an error says what does not fit. Host memory is not checked (the default).
    fn check_memory(&self, plan: &MemoryPlan) -> Result<()> {
        let _ = plan;
        Ok(())
    }
    /// Device memory in use by this run at its peak (the driver's figure above what was in use
    /// when the backend started); `None` on the CPU.
    fn device_memory_peak(&self) -> Option<usize> {
        None
    }
    /// Device-to-device copy bandwidth measured now (bytes read + written per second / 1e9);
    /// `None` on the CPU.
    fn copy_bandwidth_gb_s(&self) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// What `--device` names: the fast CPU backend, the CPU reference, or a CUDA device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when this binary has kernels and a device answers, else `Cpu`.
    Auto,
    Cpu,
    CpuRef,
    Cuda(usize),
}

impl DeviceChoice {
    /// Parses `auto`, `cpu`, `cpu-ref`, `cuda` or `cuda:N`.
    pub fn parse(name: &str) -> Result<DeviceChoice> {
        Ok(match name {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cpu-ref" => DeviceChoice::CpuRef,
            "cuda" => DeviceChoice::Cuda(0),
            d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceChoice::Cuda(n),
                _ => anyhow::bail!("unknown device '{d}' (auto, cpu, cpu-ref, cuda, cuda:N)"),
            },
        })
    }
}

/// A computation to run on whichever backend `--device` picks (a generic closure, which Rust
/// closures cannot be).
pub trait WithBackend {
    type Output;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output>;
}

/// Opens the backend `device` names and runs `job` on it.
pub fn with_backend<W: WithBackend>(device: &str, job: W) -> Result<W::Output> {
    match DeviceChoice::parse(device)? {
        DeviceChoice::Auto => match cuda::Cuda::new(0) {
            Ok(b) => job.run(&b),
            Err(e) if e.downcast_ref::<cuda::Unavailable>().is_some() => job.run(&cpu::Cpu::fast()),
            Err(e) => Err(e.context("--device auto: a CUDA device is present but could not be opened (use --device cpu)")),
        },
        DeviceChoice::Cpu => job.run(&cpu::Cpu::fast()),
        DeviceChoice::CpuRef => job.run(&cpu::Cpu::reference()),
        DeviceChoice::Cuda(n) => {
            let b = cuda::Cuda::new(n).map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e:#}"))?;
            job.run(&b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceChoice;

    #[test]
    fn device_names_parse() {
        assert_eq!(DeviceChoice::parse("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(DeviceChoice::parse("cpu-ref").unwrap(), DeviceChoice::CpuRef);
        assert_eq!(DeviceChoice::parse("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::parse("cuda:3").unwrap(), DeviceChoice::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
            assert!(DeviceChoice::parse(bad).is_err(), "{bad}");
        }
    }
}
