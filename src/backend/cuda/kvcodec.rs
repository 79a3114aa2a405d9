//! The compressed KV codecs on the device: `uniform`, `group` (KIVI) and `gear`, as
//! [`DeviceCodec`]s that store exactly what their CPU twins in `kv::codec` store (bit-packed
//! codes, f16 scales, GEAR's f16 low-rank factors and sparse outliers, a recent fp16 buffer), in
//! the same blocks, and whose attention reads that storage directly.
//!
//! - `plan`: the host's picture of the storage and the plans that change it (GPU-free, tested
//!   against the CPU codec through the host emulation in `emulate`);
//! - `device`: the executor (device buffers, uploads, launches of cuda/gear.cu and
//!   cuda/attention_quant.cu);
//! - `check`: `kvgear selftest`'s checks against the CPU codec and StrategyLayer's attention,
//!   and `selftest --bench`'s timings.
//!
//! What the device adds to the CPU codec's contract: head_dim must be a power of two from 8 to
//! 256, at most 8 query heads share a KV head, and a head holds at most `capacity` tokens.

pub mod check;
mod device;
#[cfg(test)]
mod emulate;
mod plan;

use anyhow::{bail, Result};

pub use device::{QuantDeviceCodec, DECODE_PATH_KERNELS, KERNELS};

use super::kv::DeviceCodec;
use super::CudaRuntime;
use crate::kv::codec::{make_codec, Backbone, CodecParams, GearConfig, GroupConfig, UniformConfig};
use plan::{BlockLayout, GearParams, Scheme, Store};

/// The storage scheme of codec `name` with these parameters, exactly as the CPU codec resolves
/// them (the same defaults and checks).
pub(crate) fn scheme_of(name: &str, params: &CodecParams, n_kv_heads: usize, head_dim: usize, capacity: usize, seed: u64) -> Result<Scheme> {
    let base = Scheme { n_kv_heads, head_dim, bits: 4, k_channel: false, k_group: head_dim, v_group: head_dim, flush: 1, gear: None, capacity };
    Ok(match name {
        "uniform" => {
            let c = UniformConfig::from_params(params)?;
            Scheme { bits: c.bits, flush: c.buffer, ..base }
        }
        "group" => {
            let c = GroupConfig::from_params(params)?;
            c.validate(head_dim)?;
            Scheme { bits: c.bits, k_channel: true, k_group: c.group, v_group: c.group, flush: c.residual, ..base }
        }
        "gear" => {
            let c = GearConfig::from_params(params)?;
            c.validate(head_dim)?;
            let gear = Some(GearParams { rank: c.rank, rank_decode: c.rank_decode, iters: c.iters, outliers: c.outliers, seed });
            match c.backbone {
                Backbone::Group => Scheme { bits: c.bits, k_channel: true, k_group: c.group, v_group: c.group, flush: c.buffer, gear, ..base },
                Backbone::Uniform => Scheme { bits: c.bits, flush: c.buffer, gear, ..base },
            }
        }
        "fp16" => bail!("codec fp16 on the device is the fp16 DeviceCodec (backend::cuda::kv); new_device_codec builds uniform, group and gear"),
        _ => bail!("unknown KV codec {name:?} (expected uniform, group or gear)"),
    })
}

/// Arena bytes to reserve up front: the larger of one block of `capacity` tokens (a prompt that
/// fills the context) and `capacity / flush + 1` blocks of `flush` tokens (decoding), per head,
/// at the larger rank. Evictions can fragment the arena beyond this; it then grows.
fn arena_estimate(s: &Scheme) -> usize {
    let layout = |m: usize| {
        let rank = s.gear.map_or(0, |g| g.rank.max(g.rank_decode));
        let n_out = s.gear.map_or(0, |g| crate::kv::codec::outlier_count(g.outliers, m * s.head_dim));
        let groups = if s.k_channel { m.div_ceil(s.k_group) } else { 0 };
        BlockLayout::new(s, m, groups, rank, crate::kv::codec::index_bytes(m * s.head_dim), [n_out, n_out]).size
    };
    let prompt = layout(s.capacity);
    let decode = (s.capacity / s.flush + 1) * layout(s.flush);
    s.n_kv_heads * prompt.max(decode)
}

/// Device bytes one layer's codec reserves for `capacity` tokens a head: its arena as reserved
/// up front (`arena_estimate`) and its fp16 buffers of `flush` rows. On top of this, a step of
/// `n` tokens grows that layer's buffers by `2 n_kv_heads n head_dim` f16 until its compress_due,
/// and compression uses up to 64 MiB of the runtime's shared scratch.
pub fn reserved_bytes_for(name: &str, params: &CodecParams, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<usize> {
    let s = scheme_of(name, params, n_kv_heads, head_dim, capacity, 0)?;
    s.check()?;
    Ok(Store::new(s, arena_estimate(&s))?.reserved_bytes())
}

/// Codec `name` ("uniform", "group" or "gear", with the CPU codec's parameters and defaults) for
/// `n_kv_heads` heads of `head_dim`, at most `capacity` tokens a head; `seed` seeds GEAR's power
/// iteration as `make_codec`'s does (pass the same per-layer seed to get the same factors).
pub fn new_device_codec(
    rt: &CudaRuntime,
    name: &str,
    params: &CodecParams,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    seed: u64,
) -> Result<Box<dyn DeviceCodec>> {
    Ok(Box::new(new_quant_codec(rt, name, params, n_kv_heads, head_dim, capacity, seed)?))
}

/// [`new_device_codec`] with its concrete type (for diagnostics: `decode_tokens`,
/// `reserved_bytes`).
pub fn new_quant_codec(
    rt: &CudaRuntime,
    name: &str,
    params: &CodecParams,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    seed: u64,
) -> Result<QuantDeviceCodec> {
    let describe = make_codec(name, params, n_kv_heads, head_dim, seed)?.describe();
    let s = scheme_of(name, params, n_kv_heads, head_dim, capacity, seed)?;
    s.check()?;
    QuantDeviceCodec::new(rt, describe, Store::new(s, arena_estimate(&s))?)
}
