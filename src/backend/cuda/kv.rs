//! The KV cache on the device: one layer's K/V storage for one codec.
//!
//! A cache on the GPU composes the same CPU policy (`kv::policy`, plain logic over small score
//! arrays, identical for every backend) with a [`DeviceCodec`], the device-side twin of
//! `kv::codec::Codec`: it stores what the CPU codec stores, in the same packed layout, and its
//! attention reads that storage directly. Each codec's results are checked against its CPU twin.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::CudaRuntime;
use crate::kv::codec::KvBytes;

/// One layer's stored K and V on the device for `n_kv_heads` heads of `head_dim`.
pub trait DeviceCodec: Send {
    /// A short name with parameters, as the CPU codec's `describe` gives it.
    fn describe(&self) -> String;
    /// Appends tokens: `k` and `v` are `[n_tokens, n_kv_heads, head_dim]` f32 on the device
    /// (keys after RoPE), as `Codec::append` takes them on the CPU: held in f16 until
    /// `compress_due`.
    fn append(&mut self, rt: &CudaRuntime, k: &CudaSlice<f32>, v: &CudaSlice<f32>, n_tokens: usize) -> Result<()>;
    /// Compresses what is due at the end of a step, after its attention and evictions, as
    /// `Codec::compress_due` does (`prompt`: a block of the prompt or of a multi-token step).
    fn compress_due(&mut self, rt: &CudaRuntime, prompt: bool) -> Result<()>;
    /// Tokens head `g` holds.
    fn len(&self, g: usize) -> usize;
    /// Causal attention of `n_tokens` queries `q` (`[n_tokens, n_heads, head_dim]`, f32) into
    /// `out` (same shape): query `t` of head `h` sees the first `len(g) - n_tokens + t + 1`
    /// tokens of KV head `g = h / (n_heads / n_kv_heads)`, scaled by `1/sqrt(head_dim)`. With
    /// `mass = Some((m, stride))`, adds to `m[g * stride + j]` the softmax weight token `j` of
    /// head `g` received, summed over the queries and the query heads that share `g`
    /// (`stride >= len(g)` for every head).
    fn attention(
        &mut self,
        rt: &CudaRuntime,
        q: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        out: &mut CudaSlice<f32>,
        mass: Option<(&mut CudaSlice<f32>, usize)>,
    ) -> Result<()>;
    /// Removes head `g`'s tokens at these indices (ascending, distinct, each `< len(g)`), as
    /// `Codec::evict` does; `bytes` drops accordingly.
    fn evict(&mut self, rt: &CudaRuntime, g: usize, idx: &[usize]) -> Result<()>;
    /// Bytes held on the device now, by component (the same figures as the CPU twin's).
    fn bytes(&self) -> KvBytes;
}
