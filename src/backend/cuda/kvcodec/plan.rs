//! The host's picture of a compressed KV cache on the device, and the plans that change it.
//!
//! `Store` mirrors `kv::codec::blocked::Blocked` without holding any data: per KV head, its
//! compressed blocks (each with its region of the arena, the layout of its arrays there, which of
//! its rows survive, its row groups and its outliers per row) and its fp16 buffer rows. Every
//! operation first changes this picture and returns what the device must do to match it:
//! - `plan_append`: where each head's new rows go in its fp16 buffer (which grows when a step
//!   brings more tokens than it holds, as a prompt does);
//! - `plan_compress` (blocked.rs: compress_due): compression jobs (`KvQCompressJob`, with arena
//!   and scratch offsets assigned, and the power iteration's start vectors drawn from the CPU
//!   codec's seeds), then the rows left in each buffer moved to its start (the buffer shrinks
//!   back to `flush` rows);
//! - `evict`: only the picture (rows leave `keep`); the device catches up at the next
//!   `plan_flush`, which batches every head's evictions into one gather: the kept pieces of each
//!   changed block into a scratch buffer, then back to the start of the block's region, whose
//!   freed tail returns to the arena's free list (a block left empty frees its whole region);
//! - `tables`: the block, group-start, head and work-item tables the kernels read.
//!
//! The executor (`device.rs`, and the host emulation in the tests) runs these plans. Nothing here
//! touches a GPU, so all of it is tested on the CPU.
//!
//! Byte counts (`bytes`) are the payload arrays the CPU codec counts, for the rows that survive;
//! the arena's free space and the 16-byte alignment between arrays are not counted (see
//! `reserved_bytes`).

use std::ops::Range;

use anyhow::{bail, Context, Result};

use super::super::ffi::{
    KvQBlock, KvQCompressJob, KvQHead, KvQItem, KvQPart, KvQSegment, KvQShape, KV_Q_BUFFER_BLOCK,
    KV_Q_ITEM_ROWS, KV_Q_MAX_HEAD_DIM, KV_Q_SEG_COPY, KV_Q_SEG_IDX16, KV_Q_SEG_IDX32, KV_Q_SPACE_ARENA,
    KV_Q_SPACE_BUF_K, KV_Q_SPACE_BUF_V, KV_Q_SPACE_SCRATCH,
};
use crate::kv::codec::{block_seed, check_evict, index_bytes, outlier_count, row_bytes, KvBytes, MAX_RANK};
use crate::rng::Rng;

/// Every array in the arena and the scratch starts on a 16-byte boundary.
pub(crate) const ALIGN: usize = 16;

/// Gather segments are cut into pieces of at most this many bytes (one thread block each).
pub(crate) const SEGMENT_PIECE_BYTES: usize = 32 * 1024;

/// Compression jobs of one launch share a scratch of at most this many f32 (64 MiB); a single
/// job larger than that gets a launch of its own.
pub(crate) const SCRATCH_CAP_FLOATS: usize = 16 << 20;

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).with_context(|| format!("device KV cache: {what} = {v} does not fit the kernels' 32-bit offsets"))
}

/// GEAR's extra terms, as `kv::codec::blocked::GearScheme`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GearParams {
    pub rank: usize,
    pub rank_decode: usize,
    pub iters: usize,
    pub outliers: f64,
    pub seed: u64,
}

/// How a layer's K and V are stored: the CPU codec's scheme, resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scheme {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub bits: u32,
    /// K scales per row group and channel (KIVI); else per row and channel group.
    pub k_channel: bool,
    /// Channels per K scale group (token layout) or rows per K row group (channel layout).
    pub k_group: usize,
    /// Channels per V scale group.
    pub v_group: usize,
    /// Buffered tokens that trigger a compression.
    pub flush: usize,
    pub gear: Option<GearParams>,
    /// Most tokens a head may hold.
    pub capacity: usize,
}

impl Scheme {
    /// Checks what the kernels support on top of what the CPU codec checked.
    pub(crate) fn check(&self) -> Result<()> {
        let d = self.head_dim;
        if !(8..=KV_Q_MAX_HEAD_DIM as usize).contains(&d) || !d.is_power_of_two() {
            bail!("the device KV codecs take head_dim 8, 16, 32, 64, 128 or 256, not {d}");
        }
        if ![2, 3, 4, 8].contains(&self.bits) {
            bail!("the device KV codecs take 2, 3, 4 or 8 bits, not {}", self.bits);
        }
        if self.n_kv_heads == 0 || self.k_group == 0 || self.v_group == 0 || self.flush == 0 || self.capacity == 0 {
            bail!("device KV cache: empty shape {self:?}");
        }
        if !self.k_channel && (d % self.k_group != 0) || d % self.v_group != 0 {
            bail!("device KV cache: scale groups {} / {} do not divide head_dim {d}", self.k_group, self.v_group);
        }
        if let Some(g) = self.gear {
            if g.rank > MAX_RANK || g.rank_decode > MAX_RANK || g.rank > d || g.rank_decode > d {
                bail!("device KV cache: rank {} / {} above {MAX_RANK} or head_dim {d}", g.rank, g.rank_decode);
            }
        }
        let tokens = self.capacity.checked_mul(d).context("device KV cache: capacity overflows")?;
        u32_of("capacity * head_dim", tokens)?;
        u32_of("fp16 buffer bytes", self.n_kv_heads * (self.capacity + self.flush) * d * 2)?;
        Ok(())
    }

    pub(crate) fn row_bytes(&self) -> usize {
        row_bytes(self.head_dim, self.bits)
    }

    /// Scale bytes of one row in the token layout of `part` (0 = K, 1 = V).
    fn token_scale_bytes(&self, part: usize) -> usize {
        let g = if part == 0 { self.k_group } else { self.v_group };
        self.head_dim / g * 4
    }

    /// The kernels' view, with buffers of `buf_rows` rows a head.
    pub(crate) fn shape(&self, buf_rows: usize) -> KvQShape {
        KvQShape {
            n_kv_heads: self.n_kv_heads as u32,
            head_dim: self.head_dim as u32,
            bits: self.bits,
            row_bytes: self.row_bytes() as u32,
            k_channel: u32::from(self.k_channel),
            k_group: self.k_group as u32,
            v_group: self.v_group as u32,
            buf_rows: buf_rows as u32,
        }
    }
}

/// Offsets (within the block's region) and sizes of one part's arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PartLayout {
    pub codes: usize,
    pub scales: usize,
    pub a: usize,
    pub b: usize,
    pub idx: usize,
    pub val: usize,
    pub n_out: usize,
}

/// Where a block's arrays sit in its region, for `n_rows` rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockLayout {
    pub n_rows: usize,
    pub n_groups: usize,
    pub rank: usize,
    pub idx_bytes: usize,
    pub parts: [PartLayout; 2],
    /// Bytes of the region the arrays need (a multiple of ALIGN).
    pub size: usize,
}

impl BlockLayout {
    pub(crate) fn new(s: &Scheme, n_rows: usize, n_groups: usize, rank: usize, idx_bytes: usize, n_out: [usize; 2]) -> BlockLayout {
        let d = s.head_dim;
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let o = at;
            at += align(bytes);
            o
        };
        let mut parts = [PartLayout::default(); 2];
        for (p, pl) in parts.iter_mut().enumerate() {
            pl.codes = take(n_rows * s.row_bytes());
            pl.scales = take(if p == 0 && s.k_channel { n_groups * d * 4 } else { n_rows * s.token_scale_bytes(p) });
            pl.a = take(n_rows * rank * 2);
            pl.b = take(if rank > 0 { d * rank * 2 } else { 0 });
            pl.idx = take(n_out[p] * idx_bytes);
            pl.val = take(n_out[p] * 2);
            pl.n_out = n_out[p];
        }
        BlockLayout { n_rows, n_groups, rank, idx_bytes, parts, size: at }
    }

    /// The payload bytes the CPU codec counts for these arrays.
    fn add_bytes(&self, s: &Scheme, b: &mut KvBytes) {
        let d = s.head_dim;
        for p in 0..2 {
            b.codes += self.n_rows * s.row_bytes();
            b.scales += if p == 0 && s.k_channel { self.n_groups * d * 4 } else { self.n_rows * s.token_scale_bytes(p) };
            if self.rank > 0 {
                b.lowrank += (self.n_rows + d) * self.rank * 2;
            }
            b.outliers += self.parts[p].n_out * (self.idx_bytes + 2);
        }
    }
}

/// One compressed block of one head.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    /// Region of the arena the block owns.
    pub off: usize,
    pub cap: usize,
    /// Layout of what the device holds now.
    pub dev: BlockLayout,
    /// Surviving rows (ascending indices into the device's rows).
    pub keep: Vec<u32>,
    /// Rows per row group on the device (channel-layout K; empty otherwise).
    pub groups: Vec<u32>,
    /// Outliers per device row, K and V (empty when the block has none).
    pub row_out: [Vec<u32>; 2],
}

impl Block {
    pub(crate) fn n(&self) -> usize {
        self.keep.len()
    }

    fn dirty(&self) -> bool {
        self.keep.len() != self.dev.n_rows
    }

    /// Device group of each device row.
    fn group_of_rows(&self) -> Vec<u32> {
        let mut g = Vec::with_capacity(self.dev.n_rows);
        for (i, &c) in self.groups.iter().enumerate() {
            g.extend(std::iter::repeat_n(i as u32, c as usize));
        }
        g
    }

    /// Sizes of the groups that keep rows, in order (the CPU frees a group with its last row).
    fn kept_groups(&self) -> Vec<u32> {
        if self.groups.is_empty() {
            return Vec::new();
        }
        let of = self.group_of_rows();
        let mut sizes = vec![0u32; self.groups.len()];
        for &r in &self.keep {
            sizes[of[r as usize] as usize] += 1;
        }
        sizes.into_iter().filter(|&c| c > 0).collect()
    }

    /// Outliers of part `p` in the surviving rows. A clean block needs no per-row counts (they
    /// arrive from the device later, see `finish_compress`); a dirty one must have them.
    fn kept_outliers(&self, p: usize) -> usize {
        if !self.dirty() || self.dev.parts[p].n_out == 0 {
            return self.dev.parts[p].n_out;
        }
        assert_eq!(self.row_out[p].len(), self.dev.n_rows, "outlier counts of an evicted block must be recorded before eviction");
        self.keep.iter().map(|&r| self.row_out[p][r as usize] as usize).sum()
    }

    /// The layout the surviving rows take once compacted.
    fn compacted(&self, s: &Scheme) -> BlockLayout {
        let groups = self.kept_groups().len();
        BlockLayout::new(s, self.n(), groups, self.dev.rank, self.dev.idx_bytes, [self.kept_outliers(0), self.kept_outliers(1)])
    }
}

/// One KV head: its blocks in token order, then its fp16 buffer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Head {
    pub blocks: Vec<Block>,
    /// Rows of the fp16 buffer on the device.
    pub buf_rows: usize,
    /// Surviving buffer rows (ascending device rows).
    pub buf_keep: Vec<u32>,
    /// Blocks compressed so far: the power iteration's seed (eviction does not change it).
    pub made: u64,
}

impl Head {
    fn n_compressed(&self) -> usize {
        self.blocks.iter().map(Block::n).sum()
    }

    fn len(&self) -> usize {
        self.n_compressed() + self.buf_keep.len()
    }
}

/// A first-fit allocator over the arena's byte range (offsets and sizes multiples of ALIGN).
#[derive(Clone, Debug, Default)]
pub(crate) struct ArenaAlloc {
    /// Bytes the device arena has.
    pub cap: usize,
    /// End of the highest allocated byte.
    pub top: usize,
    /// Free ranges below `top`, sorted and coalesced.
    free: Vec<Range<usize>>,
}

impl ArenaAlloc {
    /// Space for `size` bytes; grows `cap` (the executor must grow the device arena to it).
    fn alloc(&mut self, size: usize) -> usize {
        if let Some(i) = self.free.iter().position(|r| r.len() >= size) {
            let off = self.free[i].start;
            self.free[i].start += size;
            if self.free[i].is_empty() {
                self.free.remove(i);
            }
            return off;
        }
        let off = self.top;
        self.top += size;
        if self.top > self.cap {
            self.cap = self.top.max(self.cap * 2);
        }
        off
    }

    fn release(&mut self, off: usize, size: usize) {
        if size == 0 {
            return;
        }
        let at = self.free.partition_point(|r| r.start < off);
        self.free.insert(at, off..off + size);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(self.free.len());
        for r in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        self.free = merged;
        if let Some(last) = self.free.last() {
            if last.end == self.top {
                self.top = last.start;
                self.free.pop();
            }
        }
    }
}

/// New fp16 buffers of `new_cap` rows a head, filled by copying rows of the old ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BufResize {
    pub new_cap: usize,
    /// (head, first old row, first new row, rows), at most one per head.
    pub copies: Vec<(usize, usize, usize, usize)>,
}

/// What the device does for an append.
#[derive(Clone, Debug, Default)]
pub(crate) struct AppendPlan {
    /// Per head, the buffer row of the append's first token.
    pub dst0: Vec<u32>,
    /// The buffers grow first when the rows do not fit.
    pub resize: Option<BufResize>,
}

/// What the device does for `compress_due`.
#[derive(Clone, Debug, Default)]
pub(crate) struct CompressPlan {
    /// Compression jobs, in launches (each launch's scratch offsets start at 0).
    pub jobs: Vec<KvQCompressJob>,
    pub launches: Vec<Range<usize>>,
    /// Floats of scratch the largest launch needs.
    pub scratch_floats: usize,
    /// Start vectors of the power iteration, per job K then V ([head_dim, rank] each).
    pub b0: Vec<f32>,
    /// u32 outlier counts the jobs write (per job, part and row).
    pub counts_len: usize,
    /// Arena bytes needed after the compression.
    pub arena_cap: usize,
    /// After the jobs, the rows left in the buffers move to the start of new buffers.
    pub resize: Option<BufResize>,
    /// (head, block index) of each job, to record the outlier counts.
    new_blocks: Vec<(usize, usize)>,
}

impl CompressPlan {
    /// Whether any job extracts outliers (their counts per row must reach the host).
    pub(crate) fn has_outliers(&self) -> bool {
        self.jobs.iter().any(|j| j.blk.part[0].n_out > 0 || j.blk.part[1].n_out > 0)
    }
}

/// What the device does to catch up with evictions.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlushPlan {
    /// Kept pieces into the scratch.
    pub gather: Vec<KvQSegment>,
    /// The compacted blocks and buffers back into place.
    pub back: Vec<KvQSegment>,
    pub scratch_bytes: usize,
}

/// The tables the kernels read.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tables {
    pub blocks: Vec<KvQBlock>,
    pub group_starts: Vec<u32>,
    pub heads: Vec<KvQHead>,
    pub items: Vec<KvQItem>,
}

/// The host's picture of one layer's compressed K/V on the device.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    pub s: Scheme,
    pub heads: Vec<Head>,
    pub arena: ArenaAlloc,
    /// Rows a head of the device's fp16 buffers holds: `flush`, more during a step that brought
    /// more tokens (until its compress_due).
    pub buf_cap: usize,
}

impl Store {
    pub(crate) fn new(s: Scheme, arena_cap: usize) -> Result<Store> {
        s.check()?;
        Ok(Store {
            s,
            heads: vec![Head::default(); s.n_kv_heads],
            arena: ArenaAlloc { cap: align(arena_cap.max(ALIGN)), ..ArenaAlloc::default() },
            buf_cap: s.flush,
        })
    }

    /// The kernels' view of the storage now.
    pub(crate) fn shape(&self) -> KvQShape {
        self.s.shape(self.buf_cap)
    }

    pub(crate) fn len(&self, g: usize) -> usize {
        self.heads.get(g).map_or(0, Head::len)
    }

    /// (compressed, buffered) tokens of head g.
    pub(crate) fn split_len(&self, g: usize) -> (usize, usize) {
        self.heads.get(g).map_or((0, 0), |h| (h.n_compressed(), h.buf_keep.len()))
    }

    /// Whether evictions wait for `plan_flush`.
    pub(crate) fn dirty(&self) -> bool {
        self.heads.iter().any(|h| h.buf_keep.len() != h.buf_rows || h.blocks.iter().any(Block::dirty))
    }

    /// Bytes held by component, as the CPU codec counts them.
    pub(crate) fn bytes(&self) -> KvBytes {
        let s = &self.s;
        let mut b = KvBytes::default();
        for h in &self.heads {
            for blk in h.blocks.iter().filter(|b| b.n() > 0) {
                blk.compacted(s).add_bytes(s, &mut b);
            }
            b.fp16 += h.buf_keep.len() * s.head_dim * 2 * 2;
        }
        b
    }

    /// Device bytes reserved: the arena and both fp16 buffers.
    pub(crate) fn reserved_bytes(&self) -> usize {
        self.arena.cap + 2 * self.s.n_kv_heads * self.buf_cap * self.s.head_dim * 2
    }

    /// Plans appending `n_tokens` tokens to every head's buffer (the store must be clean).
    pub(crate) fn plan_append(&mut self, n_tokens: usize) -> Result<AppendPlan> {
        if self.dirty() {
            bail!("device KV cache: plan_append with evictions pending (flush first)");
        }
        let s = self.s;
        for g in 0..s.n_kv_heads {
            if self.len(g) + n_tokens > s.capacity {
                bail!("device KV cache: head {g} holds {} tokens, {n_tokens} more exceed its capacity of {}", self.len(g), s.capacity);
            }
        }
        let need = self.heads.iter().map(|h| h.buf_rows + n_tokens).max().unwrap_or(0);
        let resize = (need > self.buf_cap).then(|| BufResize {
            new_cap: need,
            copies: self.heads.iter().enumerate().filter(|(_, h)| h.buf_rows > 0).map(|(g, h)| (g, 0, 0, h.buf_rows)).collect(),
        });
        if let Some(r) = &resize {
            self.buf_cap = r.new_cap;
        }
        let mut plan = AppendPlan { dst0: Vec::with_capacity(s.n_kv_heads), resize };
        for head in self.heads.iter_mut() {
            plan.dst0.push(head.buf_rows as u32);
            head.buf_rows += n_tokens;
            head.buf_keep = (0..head.buf_rows as u32).collect();
        }
        Ok(plan)
    }

    /// Plans `compress_due` (the store must be clean): in every head whose buffer holds at least
    /// `flush` rows, its oldest `floor(n / flush) * flush` become a block (GEAR's rank `rank` for
    /// a prompt block, `rank_decode` otherwise). When rows had to move (a block left some behind
    /// it) or the buffers had grown, every head's remaining rows go to the start of new buffers
    /// of `flush` rows (they all fit: fewer than `flush` remain where a block was made, and a
    /// head that made none held fewer than `flush`).
    pub(crate) fn plan_compress(&mut self, prompt: bool) -> Result<CompressPlan> {
        if self.dirty() {
            bail!("device KV cache: plan_compress with evictions pending (flush first)");
        }
        let s = self.s;
        let d = s.head_dim;
        let mut plan = CompressPlan::default();
        let mut cursor = 0usize;
        let mut launch_start = 0usize;
        // (head, first row left, rows left) for every head.
        let mut left = Vec::with_capacity(s.n_kv_heads);
        for g in 0..s.n_kv_heads {
            let head = &mut self.heads[g];
            if head.buf_rows < s.flush {
                left.push((g, 0, head.buf_rows));
                continue;
            }
            let m = head.buf_rows / s.flush * s.flush;
            let rank = s.gear.map_or(0, |gp| if prompt { gp.rank } else { gp.rank_decode });
            let n_out = s.gear.map_or(0, |gp| outlier_count(gp.outliers, m * d));
            let idx_bytes = index_bytes(m * d);
            let groups: Vec<u32> = if s.k_channel {
                (0..m).step_by(s.k_group).map(|r0| (m - r0).min(s.k_group) as u32).collect()
            } else {
                Vec::new()
            };
            let lay = BlockLayout::new(&s, m, groups.len(), rank, idx_bytes, [n_out, n_out]);
            let off = self.arena.alloc(lay.size);
            u32_of("arena bytes", self.arena.cap)?;

            let b0 = plan.b0.len();
            if rank > 0 {
                let gp = s.gear.expect("rank > 0 only with GEAR");
                let mut rng = Rng::new(block_seed(gp.seed, g, head.made));
                plan.b0.extend((0..2 * d * rank).map(|_| rng.normal()));
            }
            head.made += 1;

            let floats = 2 * (m * d + m * rank + d * rank + (m * d).div_ceil(32));
            if cursor > 0 && cursor + floats > SCRATCH_CAP_FLOATS {
                plan.launches.push(launch_start..plan.jobs.len());
                launch_start = plan.jobs.len();
                cursor = 0;
            }
            let mut take = |n: usize| -> Result<u32> {
                let o = cursor;
                cursor += align(n * 4) / 4;
                u32_of("scratch floats", cursor).map(|_| o as u32)
            };
            let (mut x, mut fa, mut fb, mut mask) = ([0u32; 2], [0u32; 2], [0u32; 2], [0u32; 2]);
            for p in 0..2 {
                x[p] = take(m * d)?;
                fa[p] = take(m * rank)?;
                fb[p] = take(d * rank)?;
                mask[p] = take((m * d).div_ceil(32))?;
            }
            plan.scratch_floats = plan.scratch_floats.max(cursor);
            let counts = [plan.counts_len as u32, (plan.counts_len + m) as u32];
            plan.counts_len += 2 * m;

            let block = Block { off, cap: lay.size, dev: lay, keep: (0..m as u32).collect(), groups, row_out: [Vec::new(), Vec::new()] };
            let desc = block_desc(&block, head.n_compressed(), 0)?;
            plan.jobs.push(KvQCompressJob {
                blk: desc,
                head: g as u32,
                iters: s.gear.map_or(0, |gp| gp.iters) as u32,
                b0: u32_of("start vectors", b0)?,
                x,
                fa,
                fb,
                mask,
                counts,
            });
            plan.new_blocks.push((g, head.blocks.len()));
            head.blocks.push(block);
            left.push((g, m, head.buf_rows - m));
        }
        if launch_start < plan.jobs.len() {
            plan.launches.push(launch_start..plan.jobs.len());
        }
        u32_of("outlier counts", plan.counts_len)?;
        plan.arena_cap = self.arena.cap;
        let moved = left.iter().any(|&(_, r0, n)| r0 > 0 && n > 0);
        if moved || self.buf_cap > s.flush {
            plan.resize = Some(BufResize { new_cap: s.flush, copies: left.iter().filter(|l| l.2 > 0).map(|&(g, r0, n)| (g, r0, 0, n)).collect() });
            self.buf_cap = s.flush;
        }
        for (g, _, n) in left {
            let head = &mut self.heads[g];
            head.buf_rows = n;
            head.buf_keep = (0..n as u32).collect();
        }
        Ok(plan)
    }

    /// Records the outliers per row the compression jobs counted (`counts`, `counts_len` u32).
    /// Only eviction needs them, so the executor may call this late, but before any `evict`
    /// (blocks keep their indices until a flush, and only an eviction leads to a flush).
    pub(crate) fn finish_compress(&mut self, plan: &CompressPlan, counts: &[u32]) -> Result<()> {
        for (job, &(g, bi)) in plan.jobs.iter().zip(&plan.new_blocks) {
            let blk = &mut self.heads[g].blocks[bi];
            let m = blk.dev.n_rows;
            for p in 0..2 {
                let n_out = blk.dev.parts[p].n_out;
                if n_out == 0 {
                    continue;
                }
                let at = job.counts[p] as usize;
                let rows = counts.get(at..at + m).context("device KV cache: outlier counts missing")?;
                let total: usize = rows.iter().map(|&c| c as usize).sum();
                if total != n_out {
                    bail!("device KV cache: head {g} block {bi} part {p}: the kernel counted {total} outliers, expected {n_out}");
                }
                blk.row_out[p] = rows.to_vec();
            }
        }
        Ok(())
    }

    /// Removes head `g`'s tokens at these indices (ascending, distinct, `< len(g)`) from the
    /// picture; the device follows at the next `plan_flush`.
    pub(crate) fn evict(&mut self, g: usize, idx: &[usize]) -> Result<()> {
        let len = self.len(g);
        let Some(head) = self.heads.get_mut(g) else { bail!("evict: KV head {g} of {}", self.s.n_kv_heads) };
        check_evict(idx, len)?;
        let mut i = 0;
        let mut off = 0;
        for b in head.blocks.iter_mut() {
            let n = b.n();
            let mut local = Vec::new();
            while i < idx.len() && idx[i] < off + n {
                local.push(idx[i] - off);
                i += 1;
            }
            off += n;
            remove_positions(&mut b.keep, &local);
        }
        let local: Vec<usize> = idx[i..].iter().map(|&j| j - off).collect();
        remove_positions(&mut head.buf_keep, &local);
        Ok(())
    }

    /// Plans the device's catch-up with the evictions since the last flush, and updates the
    /// picture to the compacted state.
    pub(crate) fn plan_flush(&mut self) -> Result<FlushPlan> {
        let s = self.s;
        let d = s.head_dim;
        let mut plan = FlushPlan::default();
        let mut sc = 0usize;
        for g in 0..s.n_kv_heads {
            let mut blocks = std::mem::take(&mut self.heads[g].blocks);
            let mut kept_blocks = Vec::with_capacity(blocks.len());
            for mut b in blocks.drain(..) {
                if !b.dirty() {
                    kept_blocks.push(b);
                    continue;
                }
                if b.n() == 0 {
                    self.arena.release(b.off, b.cap);
                    continue;
                }
                let new = b.compacted(&s);
                let sbase = sc;
                sc += new.size;
                // Runs of consecutive kept rows: (device row, new row, length).
                let runs = runs_of(&b.keep);
                let rb = s.row_bytes();
                let old = &b.dev;
                for p in 0..2 {
                    let (op, np) = (&old.parts[p], &new.parts[p]);
                    for &(r0, k0, n) in &runs {
                        push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.codes + r0 * rb), (KV_Q_SPACE_SCRATCH, sbase + np.codes + k0 * rb), n * rb)?;
                        if !(p == 0 && s.k_channel) {
                            let sb = s.token_scale_bytes(p);
                            push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.scales + r0 * sb), (KV_Q_SPACE_SCRATCH, sbase + np.scales + k0 * sb), n * sb)?;
                        }
                        if old.rank > 0 {
                            let ab = old.rank * 2;
                            push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.a + r0 * ab), (KV_Q_SPACE_SCRATCH, sbase + np.a + k0 * ab), n * ab)?;
                        }
                    }
                    if p == 0 && s.k_channel {
                        let of = b.group_of_rows();
                        let mut kept = vec![false; b.groups.len()];
                        for &r in &b.keep {
                            kept[of[r as usize] as usize] = true;
                        }
                        let kept_idx: Vec<u32> = kept.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i as u32).collect();
                        for (g0, k0, n) in runs_of(&kept_idx) {
                            let gb = d * 4;
                            push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.scales + g0 * gb), (KV_Q_SPACE_SCRATCH, sbase + np.scales + k0 * gb), n * gb)?;
                        }
                    }
                    if old.rank > 0 {
                        push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.b), (KV_Q_SPACE_SCRATCH, sbase + np.b), d * old.rank * 2)?;
                    }
                    if op.n_out > 0 {
                        let counts = &b.row_out[p];
                        let mut start = vec![0usize; counts.len() + 1];
                        for (r, &c) in counts.iter().enumerate() {
                            start[r + 1] = start[r] + c as usize;
                        }
                        let mut written = 0usize;
                        for &(r0, k0, n) in &runs {
                            let (e0, e1) = (start[r0], start[r0 + n]);
                            let ne = e1 - e0;
                            if ne == 0 {
                                continue;
                            }
                            let ib = old.idx_bytes;
                            let kind = if ib == 2 { KV_Q_SEG_IDX16 } else { KV_Q_SEG_IDX32 };
                            let adjust = u32_of("outlier index shift", (r0 - k0) * d)?;
                            push_seg(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.idx + e0 * ib), (KV_Q_SPACE_SCRATCH, sbase + np.idx + written * ib), ne * ib, kind, adjust)?;
                            push_copy(&mut plan.gather, (KV_Q_SPACE_ARENA, b.off + op.val + e0 * 2), (KV_Q_SPACE_SCRATCH, sbase + np.val + written * 2), ne * 2)?;
                            written += ne;
                        }
                    }
                }
                push_copy(&mut plan.back, (KV_Q_SPACE_SCRATCH, sbase), (KV_Q_SPACE_ARENA, b.off), new.size)?;
                self.arena.release(b.off + new.size, b.cap - new.size);
                b.groups = b.kept_groups();
                for p in 0..2 {
                    if !b.row_out[p].is_empty() {
                        b.row_out[p] = b.keep.iter().map(|&r| b.row_out[p][r as usize]).collect();
                    }
                }
                b.cap = new.size;
                b.dev = new;
                b.keep = (0..b.dev.n_rows as u32).collect();
                kept_blocks.push(b);
            }
            let head = &mut self.heads[g];
            head.blocks = kept_blocks;
            if head.buf_keep.len() != head.buf_rows {
                let row = d * 2;
                let n = head.buf_keep.len();
                for (space, base) in [(KV_Q_SPACE_BUF_K, 0usize), (KV_Q_SPACE_BUF_V, 1)] {
                    let sbase = sc + base * align(n * row);
                    for (r0, k0, len) in runs_of(&head.buf_keep) {
                        push_copy(&mut plan.gather, (space, (g * self.buf_cap + r0) * row), (KV_Q_SPACE_SCRATCH, sbase + k0 * row), len * row)?;
                    }
                    push_copy(&mut plan.back, (KV_Q_SPACE_SCRATCH, sbase), (space, g * self.buf_cap * row), n * row)?;
                }
                sc += 2 * align(n * row);
                head.buf_rows = n;
                head.buf_keep = (0..n as u32).collect();
            }
        }
        u32_of("flush scratch bytes", sc)?;
        plan.scratch_bytes = sc;
        Ok(plan)
    }

    /// The tables for the kernels (the store must be clean).
    pub(crate) fn tables(&self) -> Result<Tables> {
        if self.dirty() {
            bail!("device KV cache: tables with evictions pending (flush first)");
        }
        let mut t = Tables::default();
        for (g, h) in self.heads.iter().enumerate() {
            let block0 = t.blocks.len();
            let item0 = t.items.len();
            let mut first = 0usize;
            for b in &h.blocks {
                let bi = t.blocks.len() as u32;
                let desc = block_desc(b, first, u32_of("group starts", t.group_starts.len())?)?;
                let mut start = 0u32;
                for &c in &b.groups {
                    t.group_starts.push(start);
                    start += c;
                }
                t.blocks.push(desc);
                for r0 in (0..b.n()).step_by(KV_Q_ITEM_ROWS as usize) {
                    let n = (b.n() - r0).min(KV_Q_ITEM_ROWS as usize);
                    t.items.push(KvQItem { head: g as u32, block: bi, row0: r0 as u32, n_rows: n as u32, token0: (first + r0) as u32, pad: [0; 3] });
                }
                first += b.n();
            }
            let n_buf = h.buf_keep.len();
            for r0 in (0..n_buf).step_by(KV_Q_ITEM_ROWS as usize) {
                let n = (n_buf - r0).min(KV_Q_ITEM_ROWS as usize);
                t.items.push(KvQItem { head: g as u32, block: KV_Q_BUFFER_BLOCK, row0: r0 as u32, n_rows: n as u32, token0: (first + r0) as u32, pad: [0; 3] });
            }
            t.heads.push(KvQHead {
                block0: block0 as u32,
                n_blocks: (t.blocks.len() - block0) as u32,
                n_compressed: first as u32,
                n_buf: n_buf as u32,
                item0: item0 as u32,
                n_items: (t.items.len() - item0) as u32,
                len: (first + n_buf) as u32,
                pad: 0,
            });
        }
        Ok(t)
    }
}

/// The kernels' descriptor of a block whose device layout is current.
fn block_desc(b: &Block, first_token: usize, group0: u32) -> Result<KvQBlock> {
    let lay = &b.dev;
    let part = |p: usize| -> Result<KvQPart> {
        let pl = &lay.parts[p];
        Ok(KvQPart {
            codes: u32_of("arena offset", b.off + pl.codes)?,
            scales: u32_of("arena offset", b.off + pl.scales)?,
            a: u32_of("arena offset", b.off + pl.a)?,
            b: u32_of("arena offset", b.off + pl.b)?,
            idx: u32_of("arena offset", b.off + pl.idx)?,
            val: u32_of("arena offset", b.off + pl.val)?,
            n_out: pl.n_out as u32,
            pad: 0,
        })
    };
    Ok(KvQBlock {
        first_token: first_token as u32,
        n_rows: lay.n_rows as u32,
        rank: lay.rank as u32,
        idx_bytes: lay.idx_bytes as u32,
        group0,
        n_groups: lay.n_groups as u32,
        pad: [0; 2],
        part: [part(0)?, part(1)?],
    })
}

/// Removes the entries at positions `pos` (ascending) of `v`.
fn remove_positions(v: &mut Vec<u32>, pos: &[usize]) {
    if pos.is_empty() {
        return;
    }
    let mut p = 0;
    let mut i = 0;
    v.retain(|_| {
        let drop = p < pos.len() && pos[p] == i;
        if drop {
            p += 1;
        }
        i += 1;
        !drop
    });
}

/// Runs of consecutive values in an ascending list: (first value, its position, length).
fn runs_of(v: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (k, &r) in v.iter().enumerate() {
        match runs.last_mut() {
            Some(last) if last.0 + last.2 == r as usize => last.2 += 1,
            _ => runs.push((r as usize, k, 1)),
        }
    }
    runs
}

fn push_copy(segs: &mut Vec<KvQSegment>, src: (u32, usize), dst: (u32, usize), n_bytes: usize) -> Result<()> {
    push_seg(segs, src, dst, n_bytes, KV_Q_SEG_COPY, 0)
}

/// Appends a segment, cut into pieces of at most SEGMENT_PIECE_BYTES (a multiple of 16, so a
/// piece keeps its segment's alignment and never splits an index).
fn push_seg(segs: &mut Vec<KvQSegment>, src: (u32, usize), dst: (u32, usize), n_bytes: usize, kind: u32, adjust: u32) -> Result<()> {
    let mut done = 0;
    while done < n_bytes {
        let n = (n_bytes - done).min(SEGMENT_PIECE_BYTES);
        segs.push(KvQSegment {
            src: u32_of("segment offset", src.1 + done)?,
            dst: u32_of("segment offset", dst.1 + done)?,
            n_bytes: n as u32,
            kind,
            adjust,
            src_space: src.0,
            dst_space: dst.0,
            pad: 0,
        });
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme(k_channel: bool, gear: Option<GearParams>) -> Scheme {
        Scheme { n_kv_heads: 2, head_dim: 64, bits: 4, k_channel, k_group: if k_channel { 8 } else { 64 }, v_group: if k_channel { 8 } else { 64 }, flush: 16, gear, capacity: 1000 }
    }

    #[test]
    fn layouts_are_aligned_and_disjoint() {
        let s = scheme(true, Some(GearParams { rank: 4, rank_decode: 2, iters: 3, outliers: 0.02, seed: 1 }));
        let lay = BlockLayout::new(&s, 37, 5, 4, 2, [11, 13]);
        let mut spans = Vec::new();
        for p in &lay.parts {
            for (o, n) in [(p.codes, 37 * 32), (p.scales, 0), (p.a, 37 * 8), (p.b, 64 * 8), (p.idx, p.n_out * 2), (p.val, p.n_out * 2)] {
                assert_eq!(o % ALIGN, 0);
                spans.push((o, n));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{spans:?}");
        }
        assert!(lay.size >= spans.last().unwrap().0 + spans.last().unwrap().1);
    }

    #[test]
    fn arena_reuses_freed_space_and_lowers_its_top() {
        let mut a = ArenaAlloc { cap: 64, ..ArenaAlloc::default() };
        let x = a.alloc(32);
        let y = a.alloc(32);
        let z = a.alloc(32);
        assert_eq!((x, y, z), (0, 32, 64));
        assert!(a.cap >= 96);
        a.release(y, 32);
        assert_eq!(a.alloc(16), 32);
        a.release(z, 32);
        assert_eq!(a.top, 48, "48..64 was still free, so the top falls to 48");
        a.release(32, 16);
        assert_eq!(a.top, 32);
        a.release(0, 32);
        assert_eq!((a.top, a.free.len()), (0, 0));
    }

    #[test]
    fn runs_and_removals() {
        assert_eq!(runs_of(&[0, 1, 2, 5, 6, 9]), vec![(0, 0, 3), (5, 3, 2), (9, 5, 1)]);
        let mut v: Vec<u32> = (0..6).collect();
        remove_positions(&mut v, &[0, 3, 5]);
        assert_eq!(v, vec![1, 2, 4]);
    }

    #[test]
    fn pieces_cover_a_long_segment() {
        let mut segs = Vec::new();
        push_seg(&mut segs, (0, 16), (1, 48), 3 * SEGMENT_PIECE_BYTES + 10, KV_Q_SEG_IDX32, 7).unwrap();
        assert_eq!(segs.len(), 4);
        assert_eq!(segs.iter().map(|s| s.n_bytes as usize).sum::<usize>(), 3 * SEGMENT_PIECE_BYTES + 10);
        assert!(segs.iter().all(|s| s.adjust == 7 && (s.dst - s.src) == 32));
    }
}
