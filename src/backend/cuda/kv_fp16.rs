//! The fp16 [`DeviceCodec`]: per layer, K and V as f16 `[n_kv_heads, capacity, head_dim]`
//! allocated once, each head holding its first `len[g]` rows in arrival order (the device twin
//! of `kv::codec::Fp16Codec`, same bytes).
//!
//! Eviction keeps the order: the survivors after the first evicted row move up. `evict` only
//! records the rows to drop; the moves of every head are made together, by one gather of the
//! surviving rows into scratch and one scatter back (cuda/layers.cu), before the next append or
//! attention, so a step that evicts from every head costs two launches, not two per head.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DevicePtrMut};
use half::f16;

use super::attention::{AttnKernel, AttnShape};
use super::kv::DeviceCodec;
use super::CudaRuntime;
use crate::kv::codec::{Fp16Codec, KvBytes};

pub struct Fp16DeviceCodec {
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    /// Tokens each head holds (after the pending evictions).
    len: Vec<usize>,
    /// Per head, the storage rows (before compaction) of the tokens it holds, when evictions are
    /// pending; empty for a head whose storage is already compact.
    pending: Vec<Vec<u32>>,
    /// Which attention kernels to use (selftest and benchmarks pin one).
    pub kernel: AttnKernel,
}

impl Fp16DeviceCodec {
    pub fn new(rt: &CudaRuntime, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Fp16DeviceCodec> {
        if n_kv_heads == 0 || head_dim == 0 || head_dim % 2 != 0 {
            bail!("fp16 device cache: {n_kv_heads} KV heads of {head_dim} (heads must be even-sized)");
        }
        if n_kv_heads.checked_mul(capacity).is_none_or(|rows| rows > u32::MAX as usize) {
            bail!("fp16 device cache: {n_kv_heads} heads x {capacity} tokens exceed the kernels' 32-bit row indices");
        }
        let n = n_kv_heads
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(head_dim))
            .filter(|&n| n <= isize::MAX as usize / 2)
            .ok_or_else(|| anyhow::anyhow!("fp16 device cache of {capacity} tokens overflows"))?;
        Ok(Fp16DeviceCodec {
            n_kv_heads,
            head_dim,
            capacity,
            k: rt.zeros::<f16>(n)?,
            v: rt.zeros::<f16>(n)?,
            len: vec![0; n_kv_heads],
            pending: vec![Vec::new(); n_kv_heads],
            kernel: AttnKernel::Auto,
        })
    }

    /// Bytes allocated on the device (the whole capacity).
    pub fn reserved_bytes(&self) -> usize {
        2 * self.n_kv_heads * self.capacity * self.head_dim * 2
    }

    /// Bytes a cache of `capacity` tokens reserves.
    pub fn reserved_bytes_for(n_kv_heads: usize, head_dim: usize, capacity: usize) -> usize {
        2 * n_kv_heads * capacity * head_dim * 2
    }

    /// Moves the survivors of every head with pending evictions to the front of its rows.
    fn compact(&mut self, rt: &CudaRuntime) -> Result<()> {
        if self.pending.iter().all(Vec::is_empty) {
            return Ok(());
        }
        // Rows that move: for head g, survivor i goes from storage row pending[g][i] to row i
        // (rows before the first eviction stay where they are).
        let (mut src, mut dst) = (Vec::new(), Vec::new());
        for (g, rows) in self.pending.iter().enumerate() {
            let base = (g * self.capacity) as u32;
            for (from, to) in compaction_moves(rows) {
                src.push(base + from);
                dst.push(base + to);
            }
        }
        if !src.is_empty() {
            let words = self.head_dim / 2;
            let total_rows = self.n_kv_heads * self.capacity;
            let moved = src.len();
            let stream = rt.stream().clone();
            for cache in [&mut self.k, &mut self.v] {
                let (cp, _cg) = cache.device_ptr_mut(&stream);
                rt.with_scratch_u32(moved * words, |tmp| {
                    let (tp, _tg) = tmp.device_ptr_mut(&stream);
                    rt.gather_rows(cp, total_rows, tp, moved, &src, words)?;
                    rt.scatter_rows(tp, moved, cp, total_rows, &dst, words)
                })?;
            }
        }
        for rows in &mut self.pending {
            rows.clear();
        }
        Ok(())
    }
}

impl DeviceCodec for Fp16DeviceCodec {
    fn describe(&self) -> String {
        "fp16".to_string()
    }

    fn append(&mut self, rt: &CudaRuntime, k: &CudaSlice<f32>, v: &CudaSlice<f32>, n_tokens: usize) -> Result<()> {
        self.compact(rt)?;
        rt.cache_append(&mut self.k, &mut self.v, k, v, n_tokens, self.n_kv_heads, self.head_dim, self.capacity, &self.len)?;
        for l in &mut self.len {
            *l += n_tokens;
        }
        Ok(())
    }

    /// The fp16 cache compresses nothing.
    fn compress_due(&mut self, _rt: &CudaRuntime, _prompt: bool) -> Result<()> {
        Ok(())
    }

    fn len(&self, g: usize) -> usize {
        self.len.get(g).copied().unwrap_or(0)
    }

    fn attention(
        &mut self,
        rt: &CudaRuntime,
        q: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        out: &mut CudaSlice<f32>,
        mass: Option<(&mut CudaSlice<f32>, usize)>,
    ) -> Result<()> {
        self.compact(rt)?;
        let shape = AttnShape {
            n_tokens,
            n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
            len: &self.len,
        };
        rt.attention_f16(&self.k, &self.v, &shape, q, out, mass, self.kernel)
    }

    fn evict(&mut self, _rt: &CudaRuntime, g: usize, idx: &[usize]) -> Result<()> {
        if g >= self.n_kv_heads {
            bail!("evict: KV head {g} of {}", self.n_kv_heads);
        }
        let len = self.len[g];
        if idx.windows(2).any(|w| w[0] >= w[1]) || idx.last().is_some_and(|&i| i >= len) {
            bail!("evict: indices must be ascending, distinct and below the {len} tokens head {g} holds");
        }
        if idx.is_empty() {
            return Ok(());
        }
        let rows = &mut self.pending[g];
        if rows.is_empty() {
            rows.extend(0..len as u32);
        }
        drop_indices(rows, idx);
        self.len[g] = rows.len();
        Ok(())
    }

    fn bytes(&self) -> KvBytes {
        let mut b = KvBytes::default();
        for &l in &self.len {
            b.add(&Fp16Codec::formula_bytes(1, self.head_dim, l));
        }
        b
    }
}

/// Removes the entries at `idx` (ascending, distinct) from `rows`, keeping the order.
pub fn drop_indices(rows: &mut Vec<u32>, idx: &[usize]) {
    let mut drop = idx.iter().peekable();
    let mut i = 0usize;
    rows.retain(|_| {
        let keep = drop.peek().is_none_or(|&&d| d != i);
        if !keep {
            drop.next();
        }
        i += 1;
        keep
    });
}

/// The moves `compact` makes for one head, on the host: `rows` are the storage rows of the
/// survivors in order; returns (from, to) pairs (tests).
pub fn compaction_moves(rows: &[u32]) -> Vec<(u32, u32)> {
    rows.iter().enumerate().filter(|&(i, &r)| r != i as u32).map(|(i, &r)| (r, i as u32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pending-rows bookkeeping of `evict` applied to a host array, twice in a row, against
    /// removing the same indices from a Vec.
    #[test]
    fn evictions_compose_like_vec_removal() {
        let mut rows: Vec<u32> = (0..10).collect();
        let mut want: Vec<u32> = (0..10).collect();
        for idx in [vec![1usize, 4, 9], vec![0, 2], vec![]] {
            drop_indices(&mut rows, &idx);
            for &j in idx.iter().rev() {
                want.remove(j);
            }
            assert_eq!(rows, want);
        }
        // Applying the moves to a storage array leaves the survivors at the front, in order.
        let mut storage: Vec<u32> = (0..10).map(|x| x * 100).collect();
        let moves = compaction_moves(&rows);
        let tmp: Vec<u32> = moves.iter().map(|&(from, _)| storage[from as usize]).collect();
        for (&(_, to), v) in moves.iter().zip(tmp) {
            storage[to as usize] = v;
        }
        let expect: Vec<u32> = want.iter().map(|&x| x * 100).collect();
        assert_eq!(&storage[..rows.len()], &expect[..]);
    }
}
