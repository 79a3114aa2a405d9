// Attention over the compressed KV cache (codecs uniform, group, gear), reading the packed codes,
// their scales, GEAR's low-rank factors and sparse outliers where they are stored (ffi/kvquant.h):
// no dequantized copy of the cache is ever written to device memory (tiles of it live in shared
// memory or registers). Host side: src/backend/cuda/kvcodec/. CPU oracle: StrategyLayer::attention
// over the CPU codec (src/kv/strategy.rs, src/kv/codec/blocked.rs).
//
// q, out: [n_tokens, n_heads, head_dim] f32; query head h reads KV head g = h / gqa; query t sees
// its head's first len - n_tokens + t + 1 tokens; scores are (q . k) * scale. The attention mass
// (the softmax weight each token received, summed over the queries and the query heads of its KV
// head) is added to mass[g * mass_stride + j] by the _mass variants only; the plain kernels are
// compiled without any of its code (template switch), so they pay nothing for it.
//
// Decode (n_tokens == 1), split over work items:
// kv_attn_quant_decode_g{1,2,4,8}[_mass](arena, buf_k, buf_v, blocks, group_starts, items, q,
//                                        partial, scores, KvQAttnParams)
//   One block (KV_Q_ATTN_THREADS) per item: up to KV_Q_ITEM_ROWS rows of one block of one head
//   (or of its fp16 buffer), for the gqa query heads of that head (template G >= gqa). Thread t
//   is (row group t / CH, chunk t % CH) with CH = head_dim / 8: the CH threads of a row read its
//   packed codes together (chunk k = `bits` bytes), RP = threads / CH rows at a time.
//   Scores use GEAR's factored form, as blocked.rs's `scores` does: q . deq(k_j) over the codes,
//   plus A_j . (B^T q) (B^T q computed once per item), with each outlier's stored correction
//   (value - deq - (A B^T)[j, c], from compression) added to its dequantized entry. The
//   item's scores go to shared memory (and, with mass, to `scores` [n_heads, score_stride]);
//   then its max m and sum l of exp(s - m); then the values: sum_j p_j deq(v_j) per thread over
//   its rows and chunk, reduced over the row groups through shared memory, plus B (sum_j p_j A_j).
//   partial[item, hh] = (o[head_dim], m, l).
// kv_attn_quant_combine[_mass](partial, heads, scores, out, mass, KvQAttnParams)
//   Grid (n_kv_heads, splits): block (g, 0) merges head g's items' (o, m, l) into out
//   (flash-decoding); with mass, block (g, y) also adds sum_hh exp(s_hh,j - M_hh) / L_hh to mass
//   for tokens j in [y, y + 1) * KV_Q_COMBINE_MASS_TOKENS, each token by one thread (no atomics:
//   the result does not depend on scheduling). Every block derives M and L from the items
//   itself (a few loads), so the mass spreads over many blocks.
//
// Prefill (any n_tokens, meant for n_tokens > 1), flash style:
// kv_attn_quant_prefill_d{64,128,256}(arena, buf_k, buf_v, blocks, group_starts, heads, q, out,
//                                      stats, params)   (the suffix bounds head_dim)
//   Grid (ceil(n_tokens / q_tile), n_kv_heads); a block takes q_tile tokens x gqa query heads
//   (<= KV_Q_PREFILL_QROWS rows, in shared memory) and walks its head's tokens in tiles of
//   k_tile rows that never straddle a block: each K tile is decoded into shared memory
//   (blocked.rs's decode_row: deq + A B^T + outlier corrections), scores by warp (lane = key), an
//   online softmax per query row, then the V tile decoded into the same shared memory and
//   accumulated. Tiles past every query's causal limit are skipped. stats [n_tokens, n_heads, 2]
//   gets each query row's final (max, sum) for the mass pass.
// kv_attn_quant_prefill_mass(arena, buf_k, buf_v, blocks, group_starts, heads, items, q, stats,
//                            mass, params)
//   One block per work item: decodes its K rows tile by tile, streams every query that sees them
//   and adds exp(s - max) / sum (from stats) into a per-key register, then reduces the 4 warps
//   in a fixed order and adds to mass. It recomputes the scores instead of storing an
//   n_tokens x len matrix.

#include <math_constants.h>

#include "kvquant.cuh"

namespace kv {
namespace q {

// Rows of a prefill tile's bookkeeping: each row's K row group and its outliers' entry range.
struct TileInfo {
    uint32_t* grp;     // [k_tile]
    uint32_t* out_lo;  // [2][k_tile]
    uint32_t* out_hi;  // [2][k_tile]
};

// Decodes rows [row0, row0 + nk) of a block (or of head g's fp16 buffer when blk is null) of
// part `part` into kv (shared, [nk][head_dim + 1]). For a block, info must hold the rows'
// bookkeeping (fill_tile_info). Ends with a barrier.
__device__ __forceinline__ void decode_tile(const KvQShape& s, const uint8_t* arena, const __half* buf,
                                            const KvQBlock* blk, uint32_t g, uint32_t row0, uint32_t nk,
                                            uint32_t part, const TileInfo& info, float* kv) {
    const uint32_t d = s.head_dim, n_chunks = d / KV_Q_CHUNK, ld = d + 1;
    PartPtr pp;
    if (blk) {
        pp = part_ptr(arena, blk->part[part]);
    }
    for (uint32_t u = threadIdx.x; u < nk * n_chunks; u += blockDim.x) {
        const uint32_t r = u / n_chunks, kc = u % n_chunks;
        float v[KV_Q_CHUNK];
        if (blk) {
            decode_chunk(s, pp, part, blk->rank, blk->idx_bytes, row0 + r, info.grp[r], info.out_lo[part * 32 + r],
                         info.out_hi[part * 32 + r], kc, v);
        } else {
            load_f16x8(buf + (static_cast<size_t>(g) * s.buf_rows + row0 + r) * d + kc * KV_Q_CHUNK, v);
        }
#pragma unroll
        for (int i = 0; i < KV_Q_CHUNK; ++i) {
            kv[r * ld + kc * KV_Q_CHUNK + i] = v[i];
        }
    }
    __syncthreads();
}

// Fills the bookkeeping of rows [row0, row0 + nk) of a block for decode_tile. Ends with a barrier.
__device__ __forceinline__ void fill_tile_info(const KvQShape& s, const uint8_t* arena, const KvQBlock& blk,
                                               const uint32_t* group_starts, uint32_t row0, uint32_t nk,
                                               const TileInfo& info) {
    const uint32_t d = s.head_dim;
    for (uint32_t r = threadIdx.x; r < nk; r += blockDim.x) {
        const uint32_t row = row0 + r;
        info.grp[r] = s.k_channel ? group_of(group_starts + blk.group0, blk.n_groups, row) : 0u;
#pragma unroll
        for (uint32_t part = 0; part < 2; ++part) {
            const uint8_t* idx = arena + blk.part[part].idx;
            const uint32_t n_out = blk.part[part].n_out;
            info.out_lo[part * 32 + r] = lower_bound_idx(idx, blk.idx_bytes, n_out, row * d);
            info.out_hi[part * 32 + r] = lower_bound_idx(idx, blk.idx_bytes, n_out, (row + 1) * d);
        }
    }
    __syncthreads();
}

// The 8 values of chunk ck of item row r used by the factored decode scores / values: the
// dequantized backbone plus each outlier's correction (the low-rank term is added factored).
__device__ __forceinline__ void factored_chunk(const KvQShape& s, const PartPtr& p, uint32_t part,
                                               uint32_t idx_bytes, uint32_t row, uint32_t group, uint32_t out_lo,
                                               uint32_t out_hi, uint32_t ck, float v[KV_Q_CHUNK]) {
    dequant_chunk(p.codes + static_cast<size_t>(row) * s.row_bytes, ck, s.bits, scale_row(s, p, part, row, group), v);
    const uint32_t base = row * s.head_dim;
    for (uint32_t e = out_lo; e < out_hi; ++e) {
        const uint32_t at = outlier_index(p.idx, idx_bytes, e) - base;
        if ((at >> 3) == ck) {
            add_lane(v, at & 7u, __half2float(p.val[e]));
        }
    }
}

template <int G, bool MASS>
__device__ __forceinline__ void attn_decode(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k,
                                            const __half* __restrict__ buf_v, const KvQBlock* __restrict__ blocks,
                                            const uint32_t* __restrict__ group_starts,
                                            const KvQItem* __restrict__ items, const float* __restrict__ q,
                                            float* __restrict__ partial, float* __restrict__ scores,
                                            const KvQAttnParams& p) {
    __shared__ float qs[G][KV_Q_MAX_HEAD_DIM];
    __shared__ float bq[G][KV_Q_MAX_RANK];  // B^T q for the scores, then sum_j p_j A_j
    __shared__ float sc[KV_Q_ITEM_ROWS][G];
    __shared__ uint32_t out_start[2][KV_Q_ITEM_ROWS + 1];
    __shared__ uint32_t row_group[KV_Q_ITEM_ROWS];
    __shared__ float red[KV_Q_ATTN_THREADS * KV_Q_CHUNK];
    __shared__ float stat_m[G], stat_l[G];
    __shared__ float scratch[kWarpSize];

    const KvQShape& s = p.s;
    const KvQItem it = items[blockIdx.x];
    const uint32_t d = s.head_dim, CH = d / KV_Q_CHUNK, T = blockDim.x, RP = T / CH;
    const uint32_t tid = threadIdx.x, rg = tid / CH, ck = tid % CH;
    const uint32_t gs = p.gqa, g = it.head, n = it.n_rows;
    const bool is_buf = it.block == KV_Q_BUFFER_BLOCK;

    for (uint32_t u = tid; u < G * d; u += T) {
        const uint32_t hh = u / d, c = u % d;
        qs[hh][c] = hh < gs ? q[(static_cast<size_t>(g) * gs + hh) * d + c] : 0.0f;
    }
    KvQBlock blk;
    uint32_t rank = 0;
    PartPtr pk, pv;
    if (!is_buf) {
        blk = blocks[it.block];
        rank = blk.rank;
        pk = part_ptr(arena, blk.part[0]);
        pv = part_ptr(arena, blk.part[1]);
    }
    __syncthreads();
    if (!is_buf) {
        for (uint32_t u = tid; u < gs * rank; u += T) {
            const uint32_t hh = u / rank, k = u % rank;
            float acc = 0.0f;
            for (uint32_t c = 0; c < d; ++c) {
                acc += __half2float(pk.b[c * rank + k]) * qs[hh][c];
            }
            bq[hh][k] = acc;
        }
        for (uint32_t r = tid; r <= n; r += T) {
            const uint32_t row = it.row0 + r;
            if (r < n) {
                row_group[r] = s.k_channel ? group_of(group_starts + blk.group0, blk.n_groups, row) : 0u;
            }
            out_start[0][r] = lower_bound_idx(pk.idx, blk.idx_bytes, pk.n_out, row * d);
            out_start[1][r] = lower_bound_idx(pv.idx, blk.idx_bytes, pv.n_out, row * d);
        }
    }
    __syncthreads();

    // Scores: every thread runs the same number of iterations (the shuffles need whole warps).
    const uint32_t n_iter = (n + RP - 1) / RP;
    for (uint32_t i = 0; i < n_iter; ++i) {
        const uint32_t r = rg + i * RP;
        const bool valid = r < n;
        float v[KV_Q_CHUNK];
        if (!valid) {
#pragma unroll
            for (int c = 0; c < KV_Q_CHUNK; ++c) {
                v[c] = 0.0f;
            }
        } else if (is_buf) {
            load_f16x8(buf_k + (static_cast<size_t>(g) * s.buf_rows + it.row0 + r) * d + ck * KV_Q_CHUNK, v);
        } else {
            factored_chunk(s, pk, 0, blk.idx_bytes, it.row0 + r, row_group[r], out_start[0][r],
                           out_start[0][r + 1], ck, v);
        }
        float dot[G];
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
            float acc = 0.0f;
#pragma unroll
            for (int c = 0; c < KV_Q_CHUNK; ++c) {
                acc += qs[hh][ck * KV_Q_CHUNK + c] * v[c];
            }
            dot[hh] = acc;
        }
        for (uint32_t off = CH / 2; off > 0; off >>= 1) {
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                dot[hh] += __shfl_xor_sync(kFullMask, dot[hh], off);
            }
        }
        if (valid && ck == 0) {
            const uint32_t row = it.row0 + r;
#pragma unroll
            for (int hh = 0; hh < G; ++hh) {
                if (hh < static_cast<int>(gs)) {
                    float lr = 0.0f;
                    for (uint32_t k = 0; k < rank; ++k) {
                        lr += __half2float(pk.a[row * rank + k]) * bq[hh][k];
                    }
                    const float x = (dot[hh] + lr) * p.scale;
                    sc[r][hh] = x;
                    if (MASS) {
                        scores[(static_cast<size_t>(g) * gs + hh) * p.score_stride + it.token0 + r] = x;
                    }
                }
            }
        }
    }
    __syncthreads();

    // Softmax of the item: its max and the sum of exp(s - max), per query head.
    for (uint32_t hh = 0; hh < gs; ++hh) {
        float mx = -CUDART_INF_F;
        for (uint32_t r = tid; r < n; r += T) {
            mx = fmaxf(mx, sc[r][hh]);
        }
        mx = block_max(mx, scratch);
        __syncthreads();
        float sum = 0.0f;
        for (uint32_t r = tid; r < n; r += T) {
            const float e = expf(sc[r][hh] - mx);
            sc[r][hh] = e;
            sum += e;
        }
        sum = block_sum(sum, scratch);
        if (tid == 0) {
            stat_m[hh] = mx;
            stat_l[hh] = sum;
        }
        __syncthreads();
    }

    // Values.
    float acc[G][KV_Q_CHUNK];
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
#pragma unroll
        for (int c = 0; c < KV_Q_CHUNK; ++c) {
            acc[hh][c] = 0.0f;
        }
    }
    for (uint32_t r = rg; r < n; r += RP) {
        float v[KV_Q_CHUNK];
        if (is_buf) {
            load_f16x8(buf_v + (static_cast<size_t>(g) * s.buf_rows + it.row0 + r) * d + ck * KV_Q_CHUNK, v);
        } else {
            factored_chunk(s, pv, 1, blk.idx_bytes, it.row0 + r, 0, out_start[1][r], out_start[1][r + 1], ck,
                           v);
        }
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
            const float w = hh < static_cast<int>(gs) ? sc[r][hh] : 0.0f;
#pragma unroll
            for (int c = 0; c < KV_Q_CHUNK; ++c) {
                acc[hh][c] += w * v[c];
            }
        }
    }
    if (!is_buf) {
        for (uint32_t u = tid; u < gs * rank; u += T) {
            const uint32_t hh = u / rank, k = u % rank;
            float a = 0.0f;
            for (uint32_t r = 0; r < n; ++r) {
                a += sc[r][hh] * __half2float(pv.a[(it.row0 + r) * rank + k]);
            }
            bq[hh][k] = a;
        }
    }
#pragma unroll
    for (int hh = 0; hh < G; ++hh) {
        if (hh < static_cast<int>(gs)) {
#pragma unroll
            for (int c = 0; c < KV_Q_CHUNK; ++c) {
                red[rg * d + ck * KV_Q_CHUNK + c] = acc[hh][c];
            }
            __syncthreads();
            float* dst = partial + (static_cast<size_t>(blockIdx.x) * gs + hh) * (d + 2);
            for (uint32_t c = tid; c < d; c += T) {
                float o = 0.0f;
                for (uint32_t r2 = 0; r2 < RP; ++r2) {
                    o += red[r2 * d + c];
                }
                for (uint32_t k = 0; k < rank; ++k) {
                    o += __half2float(pv.b[c * rank + k]) * bq[hh][k];
                }
                dst[c] = o;
            }
            if (tid == 0) {
                dst[d] = stat_m[hh];
                dst[d + 1] = stat_l[hh];
            }
            __syncthreads();
        }
    }
}

template <bool MASS>
__device__ __forceinline__ void attn_combine(const float* __restrict__ partial, const KvQHead* __restrict__ heads,
                                             const float* __restrict__ scores, float* __restrict__ out,
                                             float* __restrict__ mass, const KvQAttnParams& p) {
    __shared__ float s_max[KV_Q_MAX_GQA], s_sum[KV_Q_MAX_GQA];
    const uint32_t g = blockIdx.x, gs = p.gqa, d = p.s.head_dim, tid = threadIdx.x;
    const KvQHead hd = heads[g];
    const size_t stride = d + 2;
    const bool write_out = blockIdx.y == 0;
    for (uint32_t hh = 0; hh < gs; ++hh) {
        float mx = -CUDART_INF_F;
        for (uint32_t i = 0; i < hd.n_items; ++i) {
            mx = fmaxf(mx, partial[((hd.item0 + i) * gs + hh) * stride + d]);
        }
        float sum = 0.0f;
        for (uint32_t i = 0; i < hd.n_items; ++i) {
            const float* pi = partial + ((hd.item0 + i) * gs + hh) * stride;
            sum += pi[d + 1] * expf(pi[d] - mx);
        }
        for (uint32_t c = tid; c < d && write_out; c += blockDim.x) {
            float o = 0.0f;
            for (uint32_t i = 0; i < hd.n_items; ++i) {
                const float* pi = partial + ((hd.item0 + i) * gs + hh) * stride;
                o += pi[c] * expf(pi[d] - mx);
            }
            out[(static_cast<size_t>(g) * gs + hh) * d + c] = sum > 0.0f ? o / sum : 0.0f;
        }
        if (tid == 0) {
            s_max[hh] = mx;
            s_sum[hh] = sum;
        }
    }
    if (MASS) {
        __syncthreads();
        const uint32_t j1 = min(hd.len, (blockIdx.y + 1) * KV_Q_COMBINE_MASS_TOKENS);
        for (uint32_t j = blockIdx.y * KV_Q_COMBINE_MASS_TOKENS + tid; j < j1; j += blockDim.x) {
            float m = 0.0f;
            for (uint32_t hh = 0; hh < gs; ++hh) {
                m += expf(scores[(static_cast<size_t>(g) * gs + hh) * p.score_stride + j] - s_max[hh]) / s_sum[hh];
            }
            mass[static_cast<size_t>(g) * p.mass_stride + j] += m;
        }
    }
}

// Shared memory of the prefill kernels, in floats (the host computes the same in prefill_smem).
__device__ __forceinline__ TileInfo tile_info_at(float* base) {
    uint32_t* u = reinterpret_cast<uint32_t*>(base);
    return TileInfo{u, u + 32, u + 96};
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, uint32_t d) {
    float acc = 0.0f;
    for (uint32_t c = 0; c < d; ++c) {
        acc += a[c] * b[c];
    }
    return acc;
}

// Prefill: layout of the dynamic shared memory (floats): qs [QROWS][d], kv [k_tile][d + 1],
// pr [QROWS][k_tile], alpha [QROWS], lfin [QROWS], info (5 x 32 u32).
template <int OWN>
__device__ void attn_prefill(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k,
                             const __half* __restrict__ buf_v, const KvQBlock* __restrict__ blocks,
                             const uint32_t* __restrict__ group_starts, const KvQHead* __restrict__ heads,
                             const float* __restrict__ q, float* __restrict__ out, float* __restrict__ stats,
                             const KvQAttnParams& p) {
    extern __shared__ float smem[];
    const KvQShape& s = p.s;
    const uint32_t d = s.head_dim, KT = p.k_tile, QR = p.q_tile * p.gqa, gs = p.gqa;
    float* qs = smem;
    float* kv = qs + KV_Q_PREFILL_QROWS * d;
    float* pr = kv + KT * (d + 1);
    float* alpha = pr + KV_Q_PREFILL_QROWS * KT;
    float* lfin = alpha + KV_Q_PREFILL_QROWS;
    const TileInfo info = tile_info_at(lfin + KV_Q_PREFILL_QROWS);

    const uint32_t g = blockIdx.y, t0 = blockIdx.x * p.q_tile, tid = threadIdx.x;
    const uint32_t lane = tid % kWarpSize, warp = tid / kWarpSize;
    const KvQHead hd = heads[g];
    const uint32_t len = hd.len;
    for (uint32_t u = tid; u < KV_Q_PREFILL_QROWS * d; u += blockDim.x) {
        const uint32_t i = u / d, c = u % d, t = t0 + i / gs;
        const bool valid = i < QR && t < p.n_tokens;
        qs[u] = valid ? q[(static_cast<size_t>(t) * p.n_heads + g * gs + i % gs) * d + c] : 0.0f;
    }
    constexpr int ROWS_PER_WARP = KV_Q_PREFILL_QROWS / (KV_Q_ATTN_THREADS / kWarpSize);
    constexpr int MAX_OWN = OWN;  // >= KV_Q_PREFILL_QROWS * head_dim / KV_Q_ATTN_THREADS
    const uint32_t n_own = KV_Q_PREFILL_QROWS * d / blockDim.x;
    float m_run[ROWS_PER_WARP], l_run[ROWS_PER_WARP];
#pragma unroll
    for (int u = 0; u < ROWS_PER_WARP; ++u) {
        m_run[u] = -CUDART_INF_F;
        l_run[u] = 0.0f;
    }
    float acc[MAX_OWN];
#pragma unroll
    for (int i = 0; i < MAX_OWN; ++i) {
        acc[i] = 0.0f;
    }
    const uint32_t t_last = min(t0 + p.q_tile, p.n_tokens) - 1;
    const uint32_t lim_last = len - p.n_tokens + t_last + 1;
    __syncthreads();

    bool done = false;
    for (uint32_t bi = 0; bi <= hd.n_blocks && !done; ++bi) {
        const bool is_buf = bi == hd.n_blocks;
        const KvQBlock* blk = is_buf ? nullptr : blocks + hd.block0 + bi;
        const uint32_t n = is_buf ? hd.n_buf : blk->n_rows;
        const uint32_t first = is_buf ? hd.n_compressed : blk->first_token;
        for (uint32_t row0 = 0; row0 < n; row0 += KT) {
            const uint32_t tok0 = first + row0;
            if (tok0 >= lim_last) {
                done = true;
                break;
            }
            const uint32_t nk = min(KT, n - row0);
            if (!is_buf) {
                fill_tile_info(s, arena, *blk, group_starts, row0, nk, info);
            }
            decode_tile(s, arena, buf_k, blk, g, row0, nk, 0, info, kv);
#pragma unroll
            for (int u = 0; u < ROWS_PER_WARP; ++u) {
                const uint32_t i = warp + u * (KV_Q_ATTN_THREADS / kWarpSize);
                if (i < QR) {
                    const uint32_t t = t0 + i / gs;
                    float sv = -CUDART_INF_F;
                    if (t < p.n_tokens && lane < nk && tok0 + lane < len - p.n_tokens + t + 1) {
                        sv = dot_smem(qs + i * d, kv + lane * (d + 1), d) * p.scale;
                    }
                    const float m_new = fmaxf(m_run[u], warp_max(sv));
                    const float e = sv == -CUDART_INF_F ? 0.0f : expf(sv - m_new);
                    const float a = m_new == -CUDART_INF_F ? 1.0f : expf(m_run[u] - m_new);
                    l_run[u] = l_run[u] * a + warp_sum(e);
                    m_run[u] = m_new;
                    if (lane < KT) {
                        pr[i * KT + lane] = e;
                    }
                    if (lane == 0) {
                        alpha[i] = a;
                    }
                }
            }
            __syncthreads();
            decode_tile(s, arena, buf_v, blk, g, row0, nk, 1, info, kv);
#pragma unroll
            for (int o = 0; o < MAX_OWN; ++o) {
                const uint32_t e = tid + o * blockDim.x, i = e / d, c = e % d;
                if (o < static_cast<int>(n_own) && i < QR) {
                    float a = acc[o] * alpha[i];
                    for (uint32_t key = 0; key < nk; ++key) {
                        a += pr[i * KT + key] * kv[key * (d + 1) + c];
                    }
                    acc[o] = a;
                }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int u = 0; u < ROWS_PER_WARP; ++u) {
        const uint32_t i = warp + u * (KV_Q_ATTN_THREADS / kWarpSize);
        const uint32_t t = t0 + i / gs;
        if (lane == 0 && i < QR && t < p.n_tokens) {
            lfin[i] = l_run[u];
            float* st = stats + (static_cast<size_t>(t) * p.n_heads + g * gs + i % gs) * 2;
            st[0] = m_run[u];
            st[1] = l_run[u];
        }
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < MAX_OWN; ++o) {
        const uint32_t e = tid + o * blockDim.x, i = e / d, c = e % d;
        if (o < static_cast<int>(n_own) && i < QR) {
            const uint32_t t = t0 + i / gs;
            if (t < p.n_tokens) {
                const float l = lfin[i];
                out[(static_cast<size_t>(t) * p.n_heads + g * gs + i % gs) * d + c] = l > 0.0f ? acc[o] / l : 0.0f;
            }
        }
    }
}

__device__ void attn_prefill_mass(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k,
                                  const KvQBlock* __restrict__ blocks, const uint32_t* __restrict__ group_starts,
                                  const KvQHead* __restrict__ heads, const KvQItem* __restrict__ items,
                                  const float* __restrict__ q, const float* __restrict__ stats,
                                  float* __restrict__ mass, const KvQAttnParams& p) {
    extern __shared__ float smem[];
    const KvQShape& s = p.s;
    const uint32_t d = s.head_dim, KT = p.k_tile, gs = p.gqa;
    float* qs = smem;
    float* kv = qs + KV_Q_PREFILL_QROWS * d;
    float* red = kv + KT * (d + 1);  // [4][k_tile], inside the prefill kernel's pr area
    const TileInfo info = tile_info_at(red + 2 * KV_Q_PREFILL_QROWS + KV_Q_PREFILL_QROWS * KT);

    const KvQItem it = items[blockIdx.x];
    const uint32_t g = it.head, tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
    const uint32_t len = heads[g].len;
    const bool is_buf = it.block == KV_Q_BUFFER_BLOCK;
    const KvQBlock* blk = is_buf ? nullptr : blocks + it.block;
    const uint32_t n_rows_q = p.n_tokens * gs;
    constexpr uint32_t N_WARPS = KV_Q_ATTN_THREADS / kWarpSize;
    for (uint32_t sub = 0; sub < it.n_rows; sub += KT) {
        const uint32_t nk = min(KT, it.n_rows - sub), row0 = it.row0 + sub, tok0 = it.token0 + sub;
        // The first query that sees tok0: len - n_tokens + t + 1 > tok0.
        const uint32_t t_min = tok0 + p.n_tokens >= len ? tok0 + p.n_tokens - len : 0u;
        if (!is_buf) {
            fill_tile_info(s, arena, *blk, group_starts, row0, nk, info);
        }
        decode_tile(s, arena, buf_k, blk, g, row0, nk, 0, info, kv);
        float macc = 0.0f;
        for (uint32_t base = t_min * gs; base < n_rows_q; base += KV_Q_PREFILL_QROWS) {
            for (uint32_t u = tid; u < KV_Q_PREFILL_QROWS * d; u += blockDim.x) {
                const uint32_t i = base + u / d, c = u % d;
                qs[u] = i < n_rows_q ? q[(static_cast<size_t>(i / gs) * p.n_heads + g * gs + i % gs) * d + c] : 0.0f;
            }
            __syncthreads();
            for (uint32_t ii = warp; ii < KV_Q_PREFILL_QROWS; ii += N_WARPS) {
                const uint32_t i = base + ii, t = i / gs;
                if (i < n_rows_q && lane < nk && tok0 + lane < len - p.n_tokens + t + 1) {
                    const float sv = dot_smem(qs + ii * d, kv + lane * (d + 1), d) * p.scale;
                    const float* st = stats + (static_cast<size_t>(t) * p.n_heads + g * gs + i % gs) * 2;
                    macc += expf(sv - st[0]) / st[1];
                }
            }
            __syncthreads();
        }
        if (lane < KT) {
            red[warp * KT + lane] = macc;
        }
        __syncthreads();
        if (tid < nk) {
            float m = 0.0f;
            for (uint32_t w = 0; w < N_WARPS; ++w) {
                m += red[w * KT + tid];
            }
            mass[static_cast<size_t>(g) * p.mass_stride + tok0 + tid] += m;
        }
        __syncthreads();
    }
}

}  // namespace q
}  // namespace kv

// Register budget of the decode kernels: 3 blocks of KV_Q_ATTN_THREADS per SM (at most 170
// registers a thread). Without a minimum, ptxas squeezes them to 64 registers and spills.
#define KV_Q_DECODE_MIN_BLOCKS 3

#define KV_Q_DECODE_KERNEL(NAME, G, MASS)                                                                          \
    extern "C" __global__ void __launch_bounds__(KV_Q_ATTN_THREADS, KV_Q_DECODE_MIN_BLOCKS)                        \
        NAME(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k, const __half* __restrict__ buf_v, \
             const KvQBlock* __restrict__ blocks, const uint32_t* __restrict__ group_starts,                      \
             const KvQItem* __restrict__ items, const float* __restrict__ q, float* __restrict__ partial,          \
             float* __restrict__ scores, KvQAttnParams p) {                                                        \
        if (blockIdx.x < p.n_items) {                                                                              \
            kv::q::attn_decode<G, MASS>(arena, buf_k, buf_v, blocks, group_starts, items, q, partial, scores, p); \
        }                                                                                                          \
    }

KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g1, 1, false)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g2, 2, false)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g4, 4, false)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g8, 8, false)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g1_mass, 1, true)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g2_mass, 2, true)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g4_mass, 4, true)
KV_Q_DECODE_KERNEL(kv_attn_quant_decode_g8_mass, 8, true)

extern "C" __global__ void __launch_bounds__(KV_Q_COMBINE_THREADS, 2)
    kv_attn_quant_combine(const float* __restrict__ partial, const KvQHead* __restrict__ heads,
                          const float* __restrict__ scores, float* __restrict__ out, float* __restrict__ mass,
                          KvQAttnParams p) {
    kv::q::attn_combine<false>(partial, heads, scores, out, mass, p);
}

extern "C" __global__ void __launch_bounds__(KV_Q_COMBINE_THREADS, 2)
    kv_attn_quant_combine_mass(const float* __restrict__ partial, const KvQHead* __restrict__ heads,
                               const float* __restrict__ scores, float* __restrict__ out, float* __restrict__ mass,
                               KvQAttnParams p) {
    kv::q::attn_combine<true>(partial, heads, scores, out, mass, p);
}

// Accumulators per thread: KV_Q_PREFILL_QROWS * head_dim / KV_Q_ATTN_THREADS = head_dim / 8,
// so _d64 serves head_dim <= 64, _d128 128 and _d256 256.
#define KV_Q_PREFILL_KERNEL(NAME, OWN)                                                                             \
    extern "C" __global__ void __launch_bounds__(KV_Q_ATTN_THREADS, 1)                                             \
        NAME(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k, const __half* __restrict__ buf_v, \
             const KvQBlock* __restrict__ blocks, const uint32_t* __restrict__ group_starts,                      \
             const KvQHead* __restrict__ heads, const float* __restrict__ q, float* __restrict__ out,              \
             float* __restrict__ stats, KvQAttnParams p) {                                                         \
        kv::q::attn_prefill<OWN>(arena, buf_k, buf_v, blocks, group_starts, heads, q, out, stats, p);             \
    }

KV_Q_PREFILL_KERNEL(kv_attn_quant_prefill_d64, 8)
KV_Q_PREFILL_KERNEL(kv_attn_quant_prefill_d128, 16)
KV_Q_PREFILL_KERNEL(kv_attn_quant_prefill_d256, 32)

extern "C" __global__ void __launch_bounds__(KV_Q_ATTN_THREADS, 1)
    kv_attn_quant_prefill_mass(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k,
                               const KvQBlock* __restrict__ blocks, const uint32_t* __restrict__ group_starts,
                               const KvQHead* __restrict__ heads, const KvQItem* __restrict__ items,
                               const float* __restrict__ q, const float* __restrict__ stats,
                               float* __restrict__ mass, KvQAttnParams p) {
    if (blockIdx.x < p.n_items) {
        kv::q::attn_prefill_mass(arena, buf_k, blocks, group_starts, heads, items, q, stats, mass, p);
    }
}
