//! Host emulation of the kernels of cuda/gear.cu and cuda/attention_quant.cu, run on the plans of
//! `plan::Store` over host memory, and checked against the CPU codec and StrategyLayer's
//! attention. Each `emu_*` function follows its kernel's indexing step by step (the arena
//! offsets, chunk packing, scale addressing, the radix select of the outliers with its ties, the
//! row groups, the gather segments and their index shifts, the work items, the factored scores
//! with outliers, the causal limits and the online softmax), sequentially where the kernel
//! reduces in parallel. What this cannot check is the CUDA itself (launch shapes, barriers,
//! shuffles): `kvgear selftest` does, on a GPU, with the same cases.

use half::f16;

use super::super::ffi::{KvQBlock, KvQCompressJob, KvQSegment, KV_Q_BUFFER_BLOCK, KV_Q_PREFILL_QROWS, KV_Q_SEG_COPY, KV_Q_SEG_IDX16, KV_Q_SPACE_ARENA, KV_Q_SPACE_BUF_K, KV_Q_SPACE_BUF_V, KV_Q_SPACE_SCRATCH};
use super::plan::{BufResize, Scheme, Store, Tables};
use super::{arena_estimate, scheme_of};
use crate::kv::codec::{best_code, f16_down, f16_up, CodecParams, KvBytes};
use crate::rng::Rng;

const CHUNK: usize = 8;

fn rd_u16(a: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([a[at], a[at + 1]])
}

fn rd_u32(a: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([a[at], a[at + 1], a[at + 2], a[at + 3]])
}

fn rd_f16(a: &[u8], at: usize) -> f32 {
    f16::from_bits(rd_u16(a, at)).to_f32()
}

fn wr_f16(a: &mut [u8], at: usize, v: f16) {
    a[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
}

fn outlier_index(a: &[u8], idx: usize, idx_bytes: u32, e: usize) -> u32 {
    if idx_bytes == 2 {
        rd_u16(a, idx + 2 * e) as u32
    } else {
        rd_u32(a, idx + 4 * e)
    }
}

fn lower_bound_idx(a: &[u8], idx: usize, idx_bytes: u32, n: usize, key: u32) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if outlier_index(a, idx, idx_bytes, mid) < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn group_of(starts: &[u32], row: u32) -> usize {
    let (mut lo, mut hi) = (0, starts.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if starts[mid] <= row {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn dequant(code: u32, s: f32, z: f32) -> f32 {
    code as f32 * s + z
}

/// (step, zero) of channel c of a row: kvquant.cuh's scale_row + dequant_chunk addressing.
fn scale_at(s: &Scheme, a: &[u8], scales: usize, part: usize, row: usize, group: usize, c: usize) -> (f32, f32) {
    let pair = if part == 0 && s.k_channel {
        group * s.head_dim + c
    } else {
        let g = if part == 0 { s.k_group } else { s.v_group };
        row * (s.head_dim / g) + (c >> g.trailing_zeros())
    };
    (rd_f16(a, scales + 4 * pair), rd_f16(a, scales + 4 * pair + 2))
}

fn load_chunk(a: &[u8], row: usize, k: usize, bits: u32) -> u64 {
    let p = row + k * bits as usize;
    let mut w = 0u64;
    for i in 0..bits as usize {
        w |= (a[p + i] as u64) << (8 * i);
    }
    w
}

fn store_chunk(a: &mut [u8], row: usize, k: usize, bits: u32, w: u64) {
    let p = row + k * bits as usize;
    a[p..p + bits as usize].copy_from_slice(&w.to_le_bytes()[..bits as usize]);
}

fn dequant_chunk(s: &Scheme, a: &[u8], part_codes: usize, scales: usize, part: usize, row: usize, group: usize, k: usize) -> [f32; CHUNK] {
    let w = load_chunk(a, part_codes + row * s.row_bytes(), k, s.bits);
    let mask = (1u64 << s.bits) - 1;
    let mut v = [0f32; CHUNK];
    for (i, x) in v.iter_mut().enumerate() {
        let c = k * CHUNK + i;
        let (st, z) = scale_at(s, a, scales, part, row, group, c);
        *x = dequant(((w >> (i as u32 * s.bits)) & mask) as u32, st, z);
    }
    v
}

fn lowrank_entry(a: &[u8], a_off: usize, b_off: usize, rank: usize, row: usize, c: usize) -> f32 {
    let mut acc = 0f32;
    for k in 0..rank {
        acc += rd_f16(a, a_off + 2 * (row * rank + k)) * rd_f16(a, b_off + 2 * (c * rank + k));
    }
    acc
}

/// kvquant.cuh: decode_chunk.
#[allow(clippy::too_many_arguments)]
fn decode_chunk(s: &Scheme, a: &[u8], blk: &KvQBlock, part: usize, row: usize, group: usize, out_lo: usize, out_hi: usize, k: usize) -> [f32; CHUNK] {
    let p = &blk.part[part];
    let mut v = dequant_chunk(s, a, p.codes as usize, p.scales as usize, part, row, group, k);
    let rank = blk.rank as usize;
    if rank > 0 {
        for (i, x) in v.iter_mut().enumerate() {
            *x += lowrank_entry(a, p.a as usize, p.b as usize, rank, row, k * CHUNK + i);
        }
    }
    let base = (row * s.head_dim + k * CHUNK) as u32;
    for e in out_lo..out_hi {
        let at = outlier_index(a, p.idx as usize, blk.idx_bytes, e);
        if at >= base && at < base + CHUNK as u32 {
            v[(at - base) as usize] += rd_f16(a, p.val as usize + 2 * e);
        }
    }
    v
}

/// attention_quant.cu: factored_chunk.
#[allow(clippy::too_many_arguments)]
fn factored_chunk(s: &Scheme, a: &[u8], blk: &KvQBlock, part: usize, row: usize, group: usize, out_lo: usize, out_hi: usize, ck: usize) -> [f32; CHUNK] {
    let p = &blk.part[part];
    let mut v = dequant_chunk(s, a, p.codes as usize, p.scales as usize, part, row, group, ck);
    let base = (row * s.head_dim) as u32;
    for e in out_lo..out_hi {
        let at = (outlier_index(a, p.idx as usize, blk.idx_bytes, e) - base) as usize;
        if at >> 3 == ck {
            v[at & 7] += rd_f16(a, p.val as usize + 2 * e);
        }
    }
    v
}

/// The device state, on the host.
pub(crate) struct Emu {
    pub store: Store,
    pub arena: Vec<u8>,
    pub buf_k: Vec<f16>,
    pub buf_v: Vec<f16>,
}

impl Emu {
    pub(crate) fn new(name: &str, params: &CodecParams, n_kv_heads: usize, head_dim: usize, capacity: usize, seed: u64) -> Emu {
        let s = scheme_of(name, params, n_kv_heads, head_dim, capacity, seed).unwrap();
        let store = Store::new(s, arena_estimate(&s)).unwrap();
        let n = s.n_kv_heads * s.flush * s.head_dim;
        Emu { arena: vec![0; store.arena.cap], store, buf_k: vec![f16::ZERO; n], buf_v: vec![f16::ZERO; n] }
    }

    fn s(&self) -> Scheme {
        self.store.s
    }

    pub(crate) fn flush(&mut self) {
        if !self.store.dirty() {
            return;
        }
        let plan = self.store.plan_flush().unwrap();
        let mut scratch = vec![0u8; plan.scratch_bytes.max(16)];
        for segs in [&plan.gather, &plan.back] {
            for sg in segs {
                self.emu_gather(&mut scratch, sg);
            }
        }
    }

    /// kv_quant_gather, one segment.
    fn emu_gather(&mut self, scratch: &mut [u8], sg: &KvQSegment) {
        let n = sg.n_bytes as usize;
        let read = |emu: &Emu, scratch: &[u8], space: u32, at: usize| -> Vec<u8> {
            match space {
                KV_Q_SPACE_ARENA => emu.arena[at..at + n].to_vec(),
                KV_Q_SPACE_SCRATCH => scratch[at..at + n].to_vec(),
                KV_Q_SPACE_BUF_K | KV_Q_SPACE_BUF_V => {
                    let b = if space == KV_Q_SPACE_BUF_K { &emu.buf_k } else { &emu.buf_v };
                    b[at / 2..(at + n) / 2].iter().flat_map(|h| h.to_bits().to_le_bytes()).collect()
                }
                _ => panic!("space {space}"),
            }
        };
        let mut bytes = read(self, scratch, sg.src_space, sg.src as usize);
        if sg.kind != KV_Q_SEG_COPY {
            let w = if sg.kind == KV_Q_SEG_IDX16 { 2 } else { 4 };
            for e in bytes.chunks_exact_mut(w) {
                if w == 2 {
                    let v = u16::from_le_bytes([e[0], e[1]]).wrapping_sub(sg.adjust as u16);
                    e.copy_from_slice(&v.to_le_bytes());
                } else {
                    let v = u32::from_le_bytes([e[0], e[1], e[2], e[3]]).wrapping_sub(sg.adjust);
                    e.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        let at = sg.dst as usize;
        match sg.dst_space {
            KV_Q_SPACE_ARENA => self.arena[at..at + n].copy_from_slice(&bytes),
            KV_Q_SPACE_SCRATCH => scratch[at..at + n].copy_from_slice(&bytes),
            space => {
                let b = if space == KV_Q_SPACE_BUF_K { &mut self.buf_k } else { &mut self.buf_v };
                for (i, h) in bytes.chunks_exact(2).enumerate() {
                    b[at / 2 + i] = f16::from_bits(u16::from_le_bytes([h[0], h[1]]));
                }
            }
        }
    }

    /// Replaces the buffers as BufResize says (device.rs: resize_buffers).
    fn emu_resize(&mut self, old_cap: usize, r: &BufResize) {
        let (h, d) = (self.s().n_kv_heads, self.s().head_dim);
        for buf in [&mut self.buf_k, &mut self.buf_v] {
            let mut new = vec![f16::ZERO; h * r.new_cap * d];
            for &(g, src, dst, n) in &r.copies {
                new[(g * r.new_cap + dst) * d..][..n * d].copy_from_slice(&buf[(g * old_cap + src) * d..][..n * d]);
            }
            *buf = new;
        }
    }

    /// kv_quant_buffer_append, after the buffers grew if they had to.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], n_tokens: usize) {
        self.flush();
        let old_cap = self.store.buf_cap;
        let plan = self.store.plan_append(n_tokens).unwrap();
        if let Some(r) = &plan.resize {
            self.emu_resize(old_cap, r);
        }
        let s = self.s();
        let (d, cap) = (s.head_dim, self.store.buf_cap);
        for (g, &dst0) in plan.dst0.iter().enumerate() {
            for t in 0..n_tokens {
                let src = (t * s.n_kv_heads + g) * d;
                let dst = (g * cap + dst0 as usize + t) * d;
                for c in 0..d {
                    self.buf_k[dst + c] = f16::from_f32(k[src + c]);
                    self.buf_v[dst + c] = f16::from_f32(v[src + c]);
                }
            }
        }
    }

    /// kv_quant_compress over every job, then the buffers' resize (device.rs: run_compress).
    pub(crate) fn compress_due(&mut self, prompt: bool) {
        self.flush();
        let old_cap = self.store.buf_cap;
        let plan = self.store.plan_compress(prompt).unwrap();
        if self.arena.len() < plan.arena_cap {
            self.arena.resize(plan.arena_cap, 0);
        }
        let mut counts = vec![0u32; plan.counts_len];
        for range in &plan.launches {
            for job in &plan.jobs[range.clone()] {
                for part in 0..2 {
                    self.emu_compress(job, part, old_cap, &plan.b0, &mut counts);
                }
            }
        }
        if let Some(r) = &plan.resize {
            self.emu_resize(old_cap, r);
        }
        self.store.finish_compress(&plan, &counts).unwrap();
    }

    /// gear.cu: compress_part, sequentially.
    fn emu_compress(&mut self, job: &KvQCompressJob, part: usize, buf_cap: usize, b0: &[f32], counts: &mut [u32]) {
        let s = self.s();
        let blk = &job.blk;
        let p = blk.part[part];
        let (d, m, rank) = (s.head_dim, blk.n_rows as usize, blk.rank as usize);
        let n = m * d;
        let g = job.head as usize;
        let buf = if part == 0 { &self.buf_k } else { &self.buf_v };
        let levels = ((1u32 << s.bits) - 1) as f32;
        let mut x: Vec<f32> = (0..n).map(|e| buf[g * buf_cap * d + e].to_f32()).collect();
        let mut mask = vec![false; n];
        let a = &mut self.arena;
        let k_out = p.n_out as usize;
        if k_out > 0 {
            let key = |x: f32| (f16::from_f32(x).to_bits() & 0x7fff) as u32;
            let find_bin = |hist: &[u32], want: u32| -> (u32, u32) {
                let mut before = 0;
                for t in 0..hist.len() {
                    let b = hist.len() - 1 - t;
                    if before < want && want <= before + hist[b] {
                        return (b as u32, before);
                    }
                    before += hist[b];
                }
                panic!("no bin holds the {want}-th key");
            };
            let mut hist = vec![0u32; 128];
            for &v in &x {
                hist[(key(v) >> 8) as usize] += 1;
            }
            let (hi, above_hi) = find_bin(&hist, k_out as u32);
            let mut hist2 = vec![0u32; 256];
            for &v in &x {
                if key(v) >> 8 == hi {
                    hist2[(key(v) & 0xff) as usize] += 1;
                }
            }
            let (lo, above_lo) = find_bin(&hist2, k_out as u32 - above_hi);
            let thresh = (hi << 8) | lo;
            let n_ties = k_out as u32 - above_hi - above_lo;
            let (mut ties, mut written) = (0u32, 0usize);
            let rc = &mut counts[job.counts[part] as usize..job.counts[part] as usize + m];
            rc.fill(0);
            for e in 0..n {
                let kk = key(x[e]);
                let tie = kk == thresh;
                let sel = kk > thresh || (tie && ties < n_ties);
                ties += u32::from(tie);
                if sel {
                    if blk.idx_bytes == 2 {
                        a[p.idx as usize + 2 * written..][..2].copy_from_slice(&(e as u16).to_le_bytes());
                    } else {
                        a[p.idx as usize + 4 * written..][..4].copy_from_slice(&(e as u32).to_le_bytes());
                    }
                    wr_f16(a, p.val as usize + 2 * written, f16::from_f32(x[e]));
                    written += 1;
                    x[e] = 0.0;
                    mask[e] = true;
                    rc[e / d] += 1;
                }
            }
            assert_eq!(written, k_out);
        }
        let channel = part == 0 && s.k_channel;
        let params = |lo: f32, hi: f32| {
            let z = f16_down(lo);
            let st = if hi > z.to_f32() { f16_up((hi - z.to_f32()) / levels) } else { f16::ZERO };
            (st, z)
        };
        if channel {
            for u in 0..blk.n_groups as usize * d {
                let (gi, c) = (u / d, u % d);
                let (r0, r1) = (gi * s.k_group, (gi * s.k_group + s.k_group).min(m));
                let lo = (r0..r1).map(|j| x[j * d + c]).fold(f32::INFINITY, f32::min);
                let hi = (r0..r1).map(|j| x[j * d + c]).fold(f32::NEG_INFINITY, f32::max);
                let (st, z) = params(lo, hi);
                wr_f16(a, p.scales as usize + 4 * u, st);
                wr_f16(a, p.scales as usize + 4 * u + 2, z);
            }
        } else {
            let grp = if part == 0 { s.k_group } else { s.v_group };
            let ng = d / grp;
            for u in 0..m * ng {
                let (j, gi) = (u / ng, u % ng);
                let xs = &x[j * d + gi * grp..j * d + (gi + 1) * grp];
                let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (st, z) = params(lo, hi);
                wr_f16(a, p.scales as usize + 4 * u, st);
                wr_f16(a, p.scales as usize + 4 * u + 2, z);
            }
        }
        let n_chunks = d / CHUNK;
        for u in 0..m * n_chunks {
            let (j, kc) = (u / n_chunks, u % n_chunks);
            let gi = if channel { j / s.k_group } else { 0 };
            let mut w = 0u64;
            for i in 0..CHUNK {
                let c = kc * CHUNK + i;
                let (st, z) = scale_at(&s, a, p.scales as usize, part, j, gi, c);
                let inv = if st > 0.0 { 1.0 / st } else { 0.0 };
                let code = ((x[j * d + c] - z) * inv).round().clamp(0.0, levels) as u32;
                w |= (code as u64) << (i as u32 * s.bits);
                if rank > 0 {
                    x[j * d + c] = if mask[j * d + c] { 0.0 } else { x[j * d + c] - dequant(code, st, z) };
                }
            }
            store_chunk(a, p.codes as usize + j * s.row_bytes(), kc, s.bits, w);
        }
        if rank > 0 {
            self.emu_lowrank(job, part, &x, &mask, b0);
        }
        let a = &mut self.arena;
        for e in 0..k_out {
            let at = outlier_index(a, p.idx as usize, blk.idx_bytes, e) as usize;
            let (j, c) = (at / d, at % d);
            let gi = if channel { j / s.k_group } else { 0 };
            let (st, z) = scale_at(&s, a, p.scales as usize, part, j, gi, c);
            let l = (rank > 0).then(|| lowrank_entry(a, p.a as usize, p.b as usize, rank, j, c));
            let (code, corr) = best_code(rd_f16(a, p.val as usize + 2 * e), st, z, l, levels as u32);
            let (row, shift) = (p.codes as usize + j * s.row_bytes(), (c % CHUNK) as u32 * s.bits);
            let w = load_chunk(a, row, c / CHUNK, s.bits);
            store_chunk(a, row, c / CHUNK, s.bits, (w & !(((1u64 << s.bits) - 1) << shift)) | (code as u64) << shift);
            wr_f16(a, p.val as usize + 2 * e, corr);
        }
    }

    /// gear.cu's compress_part, passes 5 and 6: the power iteration on the residual `x` and the
    /// f16 factors, zeroed when they make the error (off `mask`) worse.
    fn emu_lowrank(&mut self, job: &KvQCompressJob, part: usize, x: &[f32], mask: &[bool], b0: &[f32]) {
        let s = self.s();
        let blk = &job.blk;
        let p = blk.part[part];
        let (d, m, rank) = (s.head_dim, blk.n_rows as usize, blk.rank as usize);
        let n = m * d;
        let a = &mut self.arena;
        let start = job.b0 as usize + part * d * rank;
        let mut fb: Vec<f32> = b0[start..start + d * rank].to_vec();
        let mut fa = vec![0f32; m * rank];
        for _ in 0..job.iters.max(1) {
            for u in 0..m * rank {
                let (j, k) = (u / rank, u % rank);
                fa[u] = (0..d).fold(0f32, |acc, c| acc + x[j * d + c] * fb[c * rank + k]);
            }
            for k in 0..rank {
                let norm0 = (0..m).map(|j| (fa[j * rank + k] as f64).powi(2)).sum::<f64>().sqrt();
                for _ in 0..2 {
                    for i in 0..k {
                        let proj: f64 = (0..m).map(|j| fa[j * rank + k] as f64 * fa[j * rank + i] as f64).sum();
                        for j in 0..m {
                            fa[j * rank + k] -= (proj * fa[j * rank + i] as f64) as f32;
                        }
                    }
                }
                let norm = (0..m).map(|j| (fa[j * rank + k] as f64).powi(2)).sum::<f64>().sqrt();
                let scale = if norm > 1e-6 * norm0 && norm > 1e-30 { (1.0 / norm) as f32 } else { 0.0 };
                for j in 0..m {
                    fa[j * rank + k] *= scale;
                }
            }
            for u in 0..d * rank {
                let (c, k) = (u / rank, u % rank);
                fb[u] = (0..m).fold(0f32, |acc, j| acc + x[j * d + c] * fa[j * rank + k]);
            }
        }
        for (u, &v) in fa.iter().enumerate() {
            wr_f16(a, p.a as usize + 2 * u, f16::from_f32(v));
        }
        for (u, &v) in fb.iter().enumerate() {
            wr_f16(a, p.b as usize + 2 * u, f16::from_f32(v));
        }
        let (mut without, mut with) = (0f64, 0f64);
        for e in 0..n {
            if mask[e] {
                continue;
            }
            let l = lowrank_entry(a, p.a as usize, p.b as usize, rank, e / d, e % d);
            without += (x[e] as f64).powi(2);
            with += ((x[e] - l) as f64).powi(2);
        }
        if with > without {
            for u in 0..m * rank {
                wr_f16(a, p.a as usize + 2 * u, f16::ZERO);
            }
            for u in 0..d * rank {
                wr_f16(a, p.b as usize + 2 * u, f16::ZERO);
            }
        }
    }

    fn tables(&mut self) -> Tables {
        self.flush();
        self.store.tables().unwrap()
    }

    /// kv_quant_decode_tokens for one token: (K, V).
    pub(crate) fn decode_token(&mut self, g: usize, tok: usize) -> (Vec<f32>, Vec<f32>) {
        let t = self.tables();
        let s = self.s();
        let d = s.head_dim;
        let hd = t.heads[g];
        let mut out = [vec![0f32; d], vec![0f32; d]];
        if tok >= hd.n_compressed as usize {
            let row = (g * self.store.buf_cap + tok - hd.n_compressed as usize) * d;
            for c in 0..d {
                out[0][c] = self.buf_k[row + c].to_f32();
                out[1][c] = self.buf_v[row + c].to_f32();
            }
            let [k, v] = out;
            return (k, v);
        }
        let blocks = &t.blocks[hd.block0 as usize..(hd.block0 + hd.n_blocks) as usize];
        let (mut lo, mut hi) = (0, blocks.len());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if blocks[mid].first_token as usize <= tok {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let blk = &blocks[lo];
        let row = tok - blk.first_token as usize;
        let group = if s.k_channel { group_of(&t.group_starts[blk.group0 as usize..(blk.group0 + blk.n_groups) as usize], row as u32) } else { 0 };
        for (part, o) in out.iter_mut().enumerate() {
            let p = &blk.part[part];
            let olo = lower_bound_idx(&self.arena, p.idx as usize, blk.idx_bytes, p.n_out as usize, (row * d) as u32);
            let ohi = lower_bound_idx(&self.arena, p.idx as usize, blk.idx_bytes, p.n_out as usize, ((row + 1) * d) as u32);
            for kc in 0..d / CHUNK {
                o[kc * CHUNK..(kc + 1) * CHUNK].copy_from_slice(&decode_chunk(&s, &self.arena, blk, part, row, group, olo, ohi, kc));
            }
        }
        let [k, v] = out;
        (k, v)
    }

    /// kv_attn_quant_decode_g* and kv_attn_quant_combine* (one query token).
    pub(crate) fn attention_decode(&mut self, q: &[f32], n_heads: usize, mut mass: Option<(&mut [f32], usize)>) -> Vec<f32> {
        let t = self.tables();
        let s = self.s();
        let (d, gs) = (s.head_dim, n_heads / s.n_kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        let a = &self.arena;
        let mut partial = vec![0f32; t.items.len() * gs * (d + 2)];
        let mut scores = vec![0f32; n_heads * s.capacity];
        for (ii, it) in t.items.iter().enumerate() {
            let g = it.head as usize;
            let n = it.n_rows as usize;
            let is_buf = it.block == KV_Q_BUFFER_BLOCK;
            let qs = |hh: usize, c: usize| q[(g * gs + hh) * d + c];
            let blk = if is_buf { None } else { Some(t.blocks[it.block as usize]) };
            let rank = blk.map_or(0, |b| b.rank as usize);
            let mut bq = vec![vec![0f32; rank]; gs];
            let mut out_start = [vec![0usize; n + 1], vec![0usize; n + 1]];
            let mut row_group = vec![0usize; n];
            if let Some(b) = &blk {
                for (hh, bqh) in bq.iter_mut().enumerate() {
                    for (k, x) in bqh.iter_mut().enumerate() {
                        *x = (0..d).fold(0f32, |acc, c| acc + rd_f16(a, b.part[0].b as usize + 2 * (c * rank + k)) * qs(hh, c));
                    }
                }
                for r in 0..=n {
                    let row = it.row0 as usize + r;
                    if r < n && s.k_channel {
                        row_group[r] = group_of(&t.group_starts[b.group0 as usize..(b.group0 + b.n_groups) as usize], row as u32);
                    }
                    for (part, os) in out_start.iter_mut().enumerate() {
                        let p = &b.part[part];
                        os[r] = lower_bound_idx(a, p.idx as usize, b.idx_bytes, p.n_out as usize, (row * d) as u32);
                    }
                }
            }
            let chunk = |part: usize, r: usize, ck: usize| -> [f32; CHUNK] {
                if let Some(b) = &blk {
                    factored_chunk(&s, a, b, part, it.row0 as usize + r, if part == 0 { row_group[r] } else { 0 }, out_start[part][r], out_start[part][r + 1], ck)
                } else {
                    let bf = if part == 0 { &self.buf_k } else { &self.buf_v };
                    let at = (g * self.store.buf_cap + it.row0 as usize + r) * d + ck * CHUNK;
                    std::array::from_fn(|i| bf[at + i].to_f32())
                }
            };
            let mut sc = vec![vec![0f32; gs]; n];
            for (r, scr) in sc.iter_mut().enumerate() {
                let row = it.row0 as usize + r;
                for (hh, x) in scr.iter_mut().enumerate() {
                    let mut dot = 0f32;
                    for ck in 0..d / CHUNK {
                        let v = chunk(0, r, ck);
                        dot += (0..CHUNK).map(|i| qs(hh, ck * CHUNK + i) * v[i]).sum::<f32>();
                    }
                    let lr: f32 = (0..rank).map(|k| rd_f16(a, blk.unwrap().part[0].a as usize + 2 * (row * rank + k)) * bq[hh][k]).sum();
                    *x = (dot + lr) * scale;
                    scores[(g * gs + hh) * s.capacity + it.token0 as usize + r] = *x;
                }
            }
            for hh in 0..gs {
                let mx = sc.iter().map(|r| r[hh]).fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for r in sc.iter_mut() {
                    r[hh] = (r[hh] - mx).exp();
                    sum += r[hh];
                }
                let dst = &mut partial[(ii * gs + hh) * (d + 2)..][..d + 2];
                dst[d] = mx;
                dst[d + 1] = sum;
            }
            for hh in 0..gs {
                let mut o = vec![0f32; d];
                for (r, scr) in sc.iter().enumerate() {
                    for ck in 0..d / CHUNK {
                        let v = chunk(1, r, ck);
                        for i in 0..CHUNK {
                            o[ck * CHUNK + i] += scr[hh] * v[i];
                        }
                    }
                }
                if let Some(b) = &blk {
                    let pa: Vec<f32> = (0..rank).map(|k| sc.iter().enumerate().map(|(r, scr)| scr[hh] * rd_f16(a, b.part[1].a as usize + 2 * ((it.row0 as usize + r) * rank + k))).sum()).collect();
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc += (0..rank).map(|k| rd_f16(a, b.part[1].b as usize + 2 * (c * rank + k)) * pa[k]).sum::<f32>();
                    }
                }
                partial[(ii * gs + hh) * (d + 2)..][..d].copy_from_slice(&o);
            }
        }
        let mut out = vec![0f32; n_heads * d];
        for (g, hd) in t.heads.iter().enumerate() {
            let items = hd.item0 as usize..(hd.item0 + hd.n_items) as usize;
            let mut stat = vec![(0f32, 0f32); gs];
            for (hh, st) in stat.iter_mut().enumerate() {
                let pi = |i: usize| &partial[(i * gs + hh) * (d + 2)..][..d + 2];
                let mx = items.clone().map(|i| pi(i)[d]).fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = items.clone().map(|i| pi(i)[d + 1] * (pi(i)[d] - mx).exp()).sum();
                for c in 0..d {
                    let o: f32 = items.clone().map(|i| pi(i)[c] * (pi(i)[d] - mx).exp()).sum();
                    out[(g * gs + hh) * d + c] = if sum > 0.0 { o / sum } else { 0.0 };
                }
                *st = (mx, sum);
            }
            if let Some((m, stride)) = mass.as_mut() {
                for j in 0..hd.len as usize {
                    m[g * *stride + j] += (0..gs).map(|hh| (scores[(g * gs + hh) * s.capacity + j] - stat[hh].0).exp() / stat[hh].1).sum::<f32>();
                }
            }
        }
        out
    }

    /// The rows [row0, row0 + nk) of a block (or the buffer) of `part`, decoded (decode_tile).
    fn decode_tile(&self, t: &Tables, g: usize, blk: Option<&KvQBlock>, row0: usize, nk: usize, part: usize) -> Vec<Vec<f32>> {
        let s = self.s();
        let d = s.head_dim;
        (0..nk)
            .map(|r| {
                let row = row0 + r;
                match blk {
                    Some(b) => {
                        let group = if s.k_channel { group_of(&t.group_starts[b.group0 as usize..(b.group0 + b.n_groups) as usize], row as u32) } else { 0 };
                        let p = &b.part[part];
                        let lo = lower_bound_idx(&self.arena, p.idx as usize, b.idx_bytes, p.n_out as usize, (row * d) as u32);
                        let hi = lower_bound_idx(&self.arena, p.idx as usize, b.idx_bytes, p.n_out as usize, ((row + 1) * d) as u32);
                        (0..d / CHUNK).flat_map(|kc| decode_chunk(&s, &self.arena, b, part, row, group, lo, hi, kc)).collect()
                    }
                    None => {
                        let bf = if part == 0 { &self.buf_k } else { &self.buf_v };
                        (0..d).map(|c| bf[(g * self.store.buf_cap + row) * d + c].to_f32()).collect()
                    }
                }
            })
            .collect()
    }

    /// kv_attn_quant_prefill_* and kv_attn_quant_prefill_mass.
    pub(crate) fn attention_prefill(&mut self, q: &[f32], n_tokens: usize, n_heads: usize, mut mass: Option<(&mut [f32], usize)>) -> Vec<f32> {
        let t = self.tables();
        let s = self.s();
        let (d, gs) = (s.head_dim, n_heads / s.n_kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        let q_tile = KV_Q_PREFILL_QROWS as usize / gs;
        let k_tile = super::device::prefill_k_tile(d);
        let mut out = vec![0f32; n_tokens * n_heads * d];
        let mut stats = vec![0f32; n_tokens * n_heads * 2];
        let qrow = |t: usize, h: usize| &q[(t * n_heads + h) * d..][..d];
        for g in 0..s.n_kv_heads {
            let hd = t.heads[g];
            let len = hd.len as usize;
            for t0 in (0..n_tokens).step_by(q_tile) {
                let qr = q_tile * gs;
                let t_last = (t0 + q_tile).min(n_tokens) - 1;
                let lim_last = len - n_tokens + t_last + 1;
                let mut m_run = vec![f32::NEG_INFINITY; qr];
                let mut l_run = vec![0f32; qr];
                let mut acc = vec![vec![0f32; d]; qr];
                'tiles: for bi in 0..=hd.n_blocks as usize {
                    let is_buf = bi == hd.n_blocks as usize;
                    let blk = if is_buf { None } else { Some(&t.blocks[hd.block0 as usize + bi]) };
                    let n = blk.map_or(hd.n_buf as usize, |b| b.n_rows as usize);
                    let first = blk.map_or(hd.n_compressed as usize, |b| b.first_token as usize);
                    for row0 in (0..n).step_by(k_tile) {
                        let tok0 = first + row0;
                        if tok0 >= lim_last {
                            break 'tiles;
                        }
                        let nk = k_tile.min(n - row0);
                        let kt = self.decode_tile(&t, g, blk, row0, nk, 0);
                        let vt = self.decode_tile(&t, g, blk, row0, nk, 1);
                        for i in 0..qr {
                            let tq = t0 + i / gs;
                            if tq >= n_tokens {
                                continue;
                            }
                            let h = g * gs + i % gs;
                            let sv: Vec<f32> = (0..nk)
                                .map(|key| if tok0 + key < len - n_tokens + tq + 1 { qrow(tq, h).iter().zip(&kt[key]).map(|(a, b)| a * b).sum::<f32>() * scale } else { f32::NEG_INFINITY })
                                .collect();
                            let m_new = sv.iter().copied().fold(m_run[i], f32::max);
                            let e: Vec<f32> = sv.iter().map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { (x - m_new).exp() }).collect();
                            let alpha = if m_new == f32::NEG_INFINITY { 1.0 } else { (m_run[i] - m_new).exp() };
                            l_run[i] = l_run[i] * alpha + e.iter().sum::<f32>();
                            m_run[i] = m_new;
                            for c in 0..d {
                                acc[i][c] = acc[i][c] * alpha + (0..nk).map(|key| e[key] * vt[key][c]).sum::<f32>();
                            }
                        }
                    }
                }
                for i in 0..qr {
                    let tq = t0 + i / gs;
                    if tq >= n_tokens {
                        continue;
                    }
                    let h = g * gs + i % gs;
                    stats[(tq * n_heads + h) * 2] = m_run[i];
                    stats[(tq * n_heads + h) * 2 + 1] = l_run[i];
                    for c in 0..d {
                        out[(tq * n_heads + h) * d + c] = if l_run[i] > 0.0 { acc[i][c] / l_run[i] } else { 0.0 };
                    }
                }
            }
        }
        if let Some((m, stride)) = mass.as_mut() {
            for it in &t.items {
                let g = it.head as usize;
                let len = t.heads[g].len as usize;
                let blk = if it.block == KV_Q_BUFFER_BLOCK { None } else { Some(&t.blocks[it.block as usize]) };
                for sub in (0..it.n_rows as usize).step_by(k_tile) {
                    let nk = k_tile.min(it.n_rows as usize - sub);
                    let (row0, tok0) = (it.row0 as usize + sub, it.token0 as usize + sub);
                    let t_min = (tok0 + n_tokens).saturating_sub(len);
                    let kt = self.decode_tile(&t, g, blk, row0, nk, 0);
                    for key in 0..nk {
                        let mut acc = 0f32;
                        for i in t_min * gs..n_tokens * gs {
                            let (tq, h) = (i / gs, g * gs + i % gs);
                            if tok0 + key < len - n_tokens + tq + 1 {
                                let sv = qrow(tq, h).iter().zip(&kt[key]).map(|(a, b)| a * b).sum::<f32>() * scale;
                                acc += (sv - stats[(tq * n_heads + h) * 2]).exp() / stats[(tq * n_heads + h) * 2 + 1];
                            }
                        }
                        m[g * *stride + tok0 + key] += acc;
                    }
                }
            }
        }
        out
    }

    pub(crate) fn bytes(&self) -> KvBytes {
        self.store.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::codec::{make_codec, Backbone, Codec};
    use crate::kv::policy::PolicyParams;
    use crate::kv::strategy::{StrategyLayer, StrategySpec};

    /// Both sides round K and V to f16 first and then do the same arithmetic in the same order
    /// for the codes, scales, outliers and (sequential here) power iteration, so every decoded
    /// value must be identical.
    const EXACT: f32 = 0.0;
    /// Attention: the emulation sums each score over chunks of 8 channels and the values over
    /// rows per chunk, the CPU over channels in groups of 8 lanes; softmax sums in f32 here and
    /// f64 there. Outputs are convex combinations of values in [-1.5, 1.5]: a few f32 ulps of
    /// the largest terms, with margin.
    const ATTN_ATOL: f32 = 2e-5;
    /// Mass: per-token weights in [0, n_queries * gqa], sums over the queries in another order:
    /// relative error from the same sources, so the bound is MASS_TOL times max(1, |mass|) (a
    /// prompt step's mass reaches tens, where f32 ulps are 4e-6: seen 2.4e-5 at 35.6).
    const MASS_TOL: f32 = 2e-5;

    struct Case {
        codec: &'static str,
        params: CodecParams,
        heads: usize,
        n_heads: usize,
        d: usize,
    }

    fn params(bits: u32, f: impl FnOnce(&mut CodecParams)) -> CodecParams {
        let mut p = CodecParams { bits: Some(bits), ..CodecParams::default() };
        f(&mut p);
        p
    }

    fn cases() -> Vec<Case> {
        vec![
            Case { codec: "uniform", params: params(4, |p| p.buffer = Some(8)), heads: 2, n_heads: 6, d: 64 },
            Case { codec: "uniform", params: params(3, |p| p.buffer = Some(5)), heads: 1, n_heads: 1, d: 32 },
            Case { codec: "uniform", params: params(2, |p| p.buffer = Some(4)), heads: 2, n_heads: 4, d: 16 },
            Case { codec: "group", params: params(4, |p| p.group = Some(8)), heads: 2, n_heads: 4, d: 64 },
            Case { codec: "group", params: params(2, |p| {
                p.group = Some(4);
                p.residual = Some(12);
            }), heads: 3, n_heads: 9, d: 32 },
            Case { codec: "group", params: params(8, |p| p.group = Some(16)), heads: 1, n_heads: 8, d: 128 },
            Case { codec: "gear", params: params(4, |p| {
                p.group = Some(8);
                p.buffer = Some(16);
                p.rank = Some(0);
                p.rank_decode = Some(0);
                p.outliers = Some(0.05);
            }), heads: 2, n_heads: 4, d: 64 },
            Case { codec: "gear", params: params(2, |p| {
                p.group = Some(8);
                p.buffer = Some(16);
                p.outliers = Some(0.03);
            }), heads: 2, n_heads: 2, d: 64 },
            Case { codec: "gear", params: params(3, |p| {
                p.backbone = Some(Backbone::Uniform);
                p.buffer = Some(10);
                p.rank = Some(3);
                p.rank_decode = Some(1);
            }), heads: 3, n_heads: 9, d: 32 },
            Case { codec: "gear", params: params(4, |p| {
                p.buffer = Some(32);
                p.outliers = Some(0.01);
            }), heads: 1, n_heads: 2, d: 128 },
        ]
    }

    /// K/V with ~2% large entries, so outliers are more than noise.
    fn kv(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform(-1.0, 1.0) * if rng.below(50) == 0 { 6.0 } else { 1.0 }).collect()
    }

    fn close(got: &[f32], want: &[f32], atol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= atol || (g == w), "{what}: element {i}: got {g}, want {w}");
        }
    }

    /// As `close`, with the bound `tol * max(1, |want|)`.
    fn close_scaled(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0) || (g == w), "{what}: element {i}: got {g}, want {w}");
        }
    }

    fn check_storage(emu: &mut Emu, cpu: &dyn Codec, heads: usize, d: usize, what: &str) {
        assert_eq!(emu.bytes(), cpu.bytes(), "{what}: bytes");
        for g in 0..heads {
            assert_eq!(emu.store.len(g), cpu.len(g), "{what}: len of head {g}");
            for j in 0..cpu.len(g) {
                let (mut k, mut v) = (vec![0f32; d], vec![0f32; d]);
                cpu.decode_token(g, j, &mut k, &mut v);
                let (ek, ev) = emu.decode_token(g, j);
                close(&ek, &k, EXACT, &format!("{what}: K of head {g} token {j}"));
                close(&ev, &v, EXACT, &format!("{what}: V of head {g} token {j}"));
            }
        }
    }

    fn check_attention(emu: &mut Emu, layer: &mut StrategyLayer, rng: &mut Rng, n_tokens: usize, n_heads: usize, heads: usize, d: usize, what: &str) {
        let q = kv(rng, n_tokens * n_heads * d);
        let stride = (0..heads).map(|g| layer.codec.len(g)).max().unwrap() + 3;
        for g in 0..heads {
            layer.mass[g] = vec![0.0; layer.codec.len(g)];
        }
        let mut want = vec![0f32; q.len()];
        layer.attention(&q, n_tokens, n_heads, &mut want);
        let mut mass = vec![0f32; heads * stride];
        let got = if n_tokens == 1 { emu.attention_decode(&q, n_heads, Some((&mut mass, stride))) } else { emu.attention_prefill(&q, n_tokens, n_heads, Some((&mut mass, stride))) };
        close(&got, &want, ATTN_ATOL, &format!("{what}: attention out ({n_tokens} queries)"));
        for g in 0..heads {
            close_scaled(&mass[g * stride..g * stride + layer.codec.len(g)], &layer.mass[g], MASS_TOL, &format!("{what}: mass of head {g}"));
            assert!(mass[g * stride + layer.codec.len(g)..(g + 1) * stride].iter().all(|&m| m == 0.0), "{what}: mass written past head {g}'s tokens");
        }
    }

    fn spec(c: &Case, seed: u64) -> StrategySpec {
        StrategySpec {
            name: format!("{}-h2o", c.codec),
            codec: c.codec.into(),
            policy: "h2o".into(),
            codec_params: c.params.clone(),
            policy_params: PolicyParams { budget: Some(1000.0), ..PolicyParams::default() },
            given: Vec::new(),
            seed,
        }
    }

    /// One step as StrategyLayer runs it: append, attention (checked when `check`), evictions of
    /// `evict[g]` (indices into head g), compress_due (a prompt block when `prompt`).
    #[allow(clippy::too_many_arguments)]
    fn step(emu: &mut Emu, layer: &mut StrategyLayer, rng: &mut Rng, c: &Case, n: usize, prompt: bool, check: bool, evict: &dyn Fn(usize, usize, &mut Rng) -> Vec<usize>, what: &str) {
        let row = c.heads * c.d;
        let (k, v) = (kv(rng, n * row), kv(rng, n * row));
        layer.append(&k, &v, n).unwrap();
        emu.append(&k, &v, n);
        if check {
            check_attention(emu, layer, rng, n, c.n_heads, c.heads, c.d, what);
        }
        for g in 0..c.heads {
            let idx = evict(g, layer.codec.len(g), rng);
            if !idx.is_empty() {
                layer.codec.evict(g, &idx).unwrap();
                emu.store.evict(g, &idx).unwrap();
            }
        }
        assert_eq!(emu.bytes(), layer.codec.bytes(), "{what}: bytes after the step's evictions");
        layer.codec.compress_due(prompt).unwrap();
        emu.compress_due(prompt);
    }

    /// A prompt, decode steps across several compressions, evictions (in blocks and in the
    /// buffer, before the step's compression) that leave the heads at different lengths, more
    /// decoding, a multi-token step: storage, bytes and attention after each phase.
    #[test]
    fn emulated_kernels_match_the_cpu_codec() {
        let seed = Rng::seed_from_time();
        let mut rng = Rng::new(seed);
        let none = |_: usize, _: usize, _: &mut Rng| Vec::new();
        for (ci, c) in cases().into_iter().enumerate() {
            for &prompt in &[1usize, 16, 37] {
                let what = format!("seed {seed} case {ci} {} {:?} d {} prompt {prompt}", c.codec, c.params, c.d);
                let cap = 200;
                let mut layer = StrategyLayer::new(&spec(&c, seed), c.heads, c.d, cap, 0).unwrap();
                let mut emu = Emu::new(c.codec, &c.params, c.heads, c.d, cap, seed);
                step(&mut emu, &mut layer, &mut rng, &c, prompt, true, true, &none, &format!("{what} prompt step"));
                check_storage(&mut emu, layer.codec.as_ref(), c.heads, c.d, &format!("{what} after the prompt"));
                for i in 0..40 {
                    step(&mut emu, &mut layer, &mut rng, &c, 1, false, i % 13 == 0, &none, &format!("{what} step {i}"));
                }
                check_storage(&mut emu, layer.codec.as_ref(), c.heads, c.d, &format!("{what} after decoding"));
                let random = |g: usize, len: usize, rng: &mut Rng| -> Vec<usize> {
                    let mut idx: Vec<usize> = (0..len).filter(|_| rng.below(3 + g as u64) == 0).collect();
                    idx.truncate(len - 1);
                    idx
                };
                step(&mut emu, &mut layer, &mut rng, &c, 1, false, true, &random, &format!("{what} evicting step"));
                check_storage(&mut emu, layer.codec.as_ref(), c.heads, c.d, &format!("{what} after eviction"));
                check_attention(&mut emu, &mut layer, &mut rng, 1, c.n_heads, c.heads, c.d, &format!("{what} after eviction"));
                for i in 0..25 {
                    step(&mut emu, &mut layer, &mut rng, &c, 1, false, false, &none, &format!("{what} step {i} after eviction"));
                }
                let every5 = |g: usize, len: usize, _: &mut Rng| -> Vec<usize> { (0..len).filter(|j| j % 5 == g % 5).collect() };
                step(&mut emu, &mut layer, &mut rng, &c, 3, true, true, &every5, &format!("{what} 3-token step"));
                check_storage(&mut emu, layer.codec.as_ref(), c.heads, c.d, &format!("{what} at the end"));
                check_attention(&mut emu, &mut layer, &mut rng, 1, c.n_heads, c.heads, c.d, &format!("{what} at the end"));
            }
        }
    }

    /// The device codec's make_codec twin refuses what the kernels cannot do, with a reason.
    #[test]
    fn unsupported_shapes_are_errors() {
        let p = CodecParams::default();
        for (d, name) in [(80usize, "uniform"), (512, "gear"), (4, "uniform")] {
            let s = scheme_of(name, &p, 2, d, 64, 1).and_then(|s| s.check().map(|_| s));
            assert!(s.is_err(), "head_dim {d} accepted");
        }
        assert!(scheme_of("fp16", &p, 2, 64, 64, 1).is_err());
        assert!(scheme_of("gear", &CodecParams { residual: Some(4), ..p.clone() }, 2, 64, 64, 1).is_err());
        let s = scheme_of("gear", &p, 2, 64, 64, 1).unwrap();
        assert!(s.check().is_ok());
        let cpu = make_codec("gear", &p, 2, 64, 1).unwrap();
        assert!(cpu.describe().starts_with("gear("));
    }

    /// The arena reserved up front holds a full context made by a prompt step and decoding,
    /// for each codec: no growth in the common case.
    #[test]
    fn the_reservation_holds_a_full_context() {
        let mut rng = Rng::new(3);
        for c in cases() {
            for prompt in [1usize, 100] {
                let cap = 160;
                let mut emu = Emu::new(c.codec, &c.params, c.heads, c.d, cap, 1);
                let reserved = emu.store.arena.cap;
                let row = c.heads * c.d;
                emu.append(&kv(&mut rng, prompt * row), &kv(&mut rng, prompt * row), prompt);
                emu.compress_due(true);
                for _ in prompt..cap {
                    emu.append(&kv(&mut rng, row), &kv(&mut rng, row), 1);
                    emu.compress_due(false);
                }
                assert_eq!(emu.store.arena.cap, reserved, "{} {:?} d {} prompt {prompt}: the arena grew", c.codec, c.params, c.d);
                let r = super::super::reserved_bytes_for(c.codec, &c.params, c.heads, c.d, cap).unwrap();
                assert_eq!(r, emu.store.reserved_bytes());
            }
        }
    }

    /// A full store frees blocks and its arena space for reuse as tokens are evicted.
    #[test]
    fn eviction_frees_arena_space() {
        let seed = 7;
        let mut rng = Rng::new(seed);
        let p = CodecParams { bits: Some(4), group: Some(8), buffer: Some(16), ..CodecParams::default() };
        let mut emu = Emu::new("gear", &p, 2, 32, 128, seed);
        let (k, v) = (kv(&mut rng, 64 * 64), kv(&mut rng, 64 * 64));
        emu.append(&k, &v, 64);
        assert_eq!(emu.store.buf_cap, 64, "the buffers grow to hold the step");
        emu.compress_due(true);
        assert_eq!(emu.store.buf_cap, 16, "and shrink back once it is compressed");
        let top = emu.store.arena.top;
        for g in 0..2 {
            emu.store.evict(g, &(0..48).collect::<Vec<_>>()).unwrap();
        }
        emu.flush();
        assert!(emu.store.arena.top < top, "arena top {} not below {top}", emu.store.arena.top);
        assert_eq!(emu.store.len(0), 16);
    }
}
