// Compression and upkeep of the compressed KV cache (codecs uniform, group, gear) on the device.
// Storage layout and parameter structs: ffi/kvquant.h. Host side: src/backend/cuda/kvcodec/.
// The CPU functions each kernel must match are in src/kv/codec/ (blocked.rs is the oracle).
//
// kv_quant_compress(arena, buf_k, buf_v, jobs, b0, scratch, counts, KvQCompressParams)
//   Grid (n_jobs, 2), KV_Q_COMPRESS_THREADS threads: one block per (job, part), part 0 = K,
//   1 = V. A job compresses the first n rows of one head's fp16 buffer (blocked.rs:
//   compress_due) into a block whose arena offsets the host assigned. The block's x scratch
//   [n, head_dim] f32 holds the values and then the residual. Passes over the block:
//     1. load + (GEAR outliers) histogram of the high byte of |x|'s f16 bits;
//     2. (outliers) histogram of the low byte among entries in the chosen high byte: together
//        they give the k-th largest magnitude T (a radix select over the 15 bits of |f16|);
//     3. (outliers) in index order, select every entry above T and the first (k - #above)
//        entries equal to T (blocked.rs/sparse.rs: largest |x| first, ties to the lower index),
//        write them (index, f16 value; pass 7 makes the values corrections) compacted in index
//        order, zero them, set their mask bit (one mask byte per 8 entries) and count them per
//        row;
//     4. quantization parameters per scale group (written to the arena), then codes (packed by
//        chunks of 8 channels) and, for GEAR with rank > 0, the residual x - deq, 0 on outliers;
//     5. (rank > 0) power iteration as lowrank.rs: from the host's start vectors B0, `iters`
//        times A = R B (one thread per entry, channels in order), modified Gram-Schmidt of A's
//        columns run twice in f64 by warp 0, B = R^T A (one thread per entry, rows in order);
//        the products are separately rounded in the CPU's order, so only the Gram-Schmidt sums
//        (in f64) are ordered differently;
//     6. (rank > 0) A and B rounded to f16 and stored; the masked squared error with and
//        without them (f64); zero factors when they make it worse (lowrank.rs: fit);
//     7. (outliers) each stored value becomes its correction, f16(value - (deq + A B^T)) at its
//        place, with the code there chosen to cancel most of the correction's rounding
//        (blocked.rs: compress, sparse.rs: best_code), one thread per chunk holding outliers.
//   Outliers per row go to counts (the host needs them to evict rows).
//
// kv_quant_buffer_append(buf_k, buf_v, in_k, in_v, dst0, KvQBufferParams)
//   Grid (n_tokens, n_kv_heads), KV_Q_COPY_THREADS threads striding over head_dim: the append's
//   row t of head g, rounded to f16 (as blocked.rs's append stores it), goes to buffer row
//   dst0[g] + t.
//
// kv_quant_gather(arena, scratch, buf_k, buf_v, segments, n_segments)
//   One block per segment: copies n_bytes from one space to another (16-, 4- or 1-byte units as
//   alignment allows); IDX16 / IDX32 segments subtract `adjust` from every element (an evicted
//   row's outliers are dropped and the later ones renumbered, sparse.rs: remove_rows). Eviction
//   runs it twice: kept pieces into the scratch, then back into their blocks, because pieces
//   move down within their own block and a parallel in-place copy could overwrite a source.
//
// kv_quant_decode_tokens(arena, buf_k, buf_v, blocks, group_starts, tokens, out, KvQDecodeParams)
//   One block per token of one head: out[i] = [K, V] of token tokens[i], decoded (f32), as
//   blocked.rs's decode_token gives it. For tests and diagnostics; attention never does this.

#include "kvquant.cuh"

namespace kv {
namespace q {

// The 15-bit magnitude key of an f16-exact value (its f16 bits without the sign). Ordering keys
// as integers orders magnitudes as f32::total_cmp orders the CPU's |x|.
__device__ __forceinline__ uint32_t mag_key(float x) { return __half_as_ushort(__float2half_rn(x)) & 0x7fffu; }

// Given a histogram (bins in smem, bin b counting keys whose digit is b), finds the bin that
// holds the `want`-th largest key (1-based) scanning from the top bin: *bin and the count of
// keys in higher bins *above. All threads call it; n_bins <= blockDim.x.
__device__ __forceinline__ void find_bin(const uint32_t* hist, uint32_t n_bins, uint32_t want, uint32_t* scan_scratch,
                                         uint32_t* bin, uint32_t* above) {
    const uint32_t t = threadIdx.x;
    const uint32_t b = n_bins - 1 - t;  // thread t looks at the t-th bin from the top
    const uint32_t c = t < n_bins ? hist[b] : 0u;
    uint32_t total;
    const uint32_t before = block_scan_u32(c, scan_scratch, &total);
    if (t < n_bins && before < want && want <= before + c) {
        *bin = b;
        *above = before;
    }
    __syncthreads();
}

// Pass 7: outlier e's place gets the code, and its stored value x the f16 correction, of
// sparse.rs's best_code: of codes 0..levels, the one for which dense + f16(x - dense) is closest
// to x (ties: the lower code), dense = deq(code) plus the low-rank entry when rank > 0, each
// operation rounded as decode_chunk rounds it. The thread that meets the first outlier of an
// 8-channel chunk (outliers are in index order) handles all of that chunk's, so no two threads
// write one chunk.
__device__ void store_corrections(uint8_t* arena, const KvQShape& s, const KvQBlock& blk, const KvQPart& P,
                                  uint32_t part, uint32_t rank) {
    const PartPtr pp = part_ptr(arena, P);
    __half* val = reinterpret_cast<__half*>(arena + P.val);
    const uint32_t d = s.head_dim, levels = (1u << s.bits) - 1u;
    const bool channel = part == 0 && s.k_channel;
    for (uint32_t e0 = threadIdx.x; e0 < P.n_out; e0 += blockDim.x) {
        const uint32_t chunk = outlier_index(pp.idx, blk.idx_bytes, e0) / KV_Q_CHUNK;
        if (e0 > 0 && outlier_index(pp.idx, blk.idx_bytes, e0 - 1) / KV_Q_CHUNK == chunk) {
            continue;
        }
        const uint32_t j = chunk * KV_Q_CHUNK / d, kc = (chunk * KV_Q_CHUNK % d) / KV_Q_CHUNK;
        uint8_t* codes_row = arena + P.codes + static_cast<size_t>(j) * s.row_bytes;
        uint64_t w = load_chunk(codes_row, kc, s.bits);
        const ScaleRow sr = scale_row(s, pp, part, j, channel ? j / s.k_group : 0u);
        for (uint32_t e = e0; e < P.n_out; ++e) {
            const uint32_t at = outlier_index(pp.idx, blk.idx_bytes, e);
            if (at / KV_Q_CHUNK != chunk) {
                break;
            }
            const uint32_t c = at % d;
            const float2 sz = __half22float2(sr.first[c >> sr.shift]);
            const float l = rank > 0 ? lowrank_entry(pp.a + static_cast<size_t>(j) * rank, pp.b, rank, c) : 0.0f;
            const float x = __half2float(val[e]);
            uint32_t best = 0;
            __half corr = __float2half_rn(0.0f);
            float err = INFINITY;
            for (uint32_t code = 0; code <= levels; ++code) {
                float dense = dequant(code, sz.x, sz.y);
                if (rank > 0) {
                    dense = __fadd_rn(dense, l);
                }
                const __half h = __float2half_rn(__fsub_rn(x, dense));
                const float r = fabsf(__fsub_rn(__fadd_rn(dense, __half2float(h)), x));
                if (code == 0 || r < err) {
                    best = code;
                    corr = h;
                    err = r;
                }
            }
            const uint32_t shift = (c % KV_Q_CHUNK) * s.bits;
            w = (w & ~(static_cast<uint64_t>(levels) << shift)) | (static_cast<uint64_t>(best) << shift);
            val[e] = corr;
        }
        store_chunk(codes_row, kc, s.bits, w);
    }
}

__device__ void compress_part(uint8_t* arena, const __half* buf, const KvQCompressJob& job,
                              uint32_t part, const float* b0, float* scratch, uint32_t* counts,
                              const KvQCompressParams& p) {
    const KvQShape& s = p.s;
    const KvQBlock& blk = job.blk;
    const KvQPart P = part == 0 ? blk.part[0] : blk.part[1];
    const uint32_t d = s.head_dim, m = blk.n_rows, n = m * d, rank = blk.rank;
    const uint32_t g = job.head;
    const uint32_t tid = threadIdx.x, T = blockDim.x;
    float* x = scratch + job.x[part];
    uint8_t* mask = reinterpret_cast<uint8_t*>(scratch + job.mask[part]);  // one byte per chunk of 8
    uint32_t* row_count = counts + job.counts[part];
    const uint32_t k_out = P.n_out;
    const float levels = static_cast<float>((1u << s.bits) - 1u);

    __shared__ uint32_t hist[256];
    __shared__ uint32_t scan_scratch[32];
    __shared__ uint32_t sel_bin, sel_above;
    __shared__ double f64_scratch[32];

    // Pass 1: load, histogram of the high byte of the magnitude.
    if (k_out > 0) {
        for (uint32_t i = tid; i < 256; i += T) {
            hist[i] = 0;
        }
        for (uint32_t i = tid; i < m; i += T) {
            row_count[i] = 0;
        }
        for (uint32_t w = tid; w < n / KV_Q_CHUNK; w += T) {
            mask[w] = 0;
        }
        __syncthreads();
    }
    const __half* rows = buf + static_cast<size_t>(g) * s.buf_rows * d;
    for (uint32_t e = tid; e < n; e += T) {
        const __half h = rows[e];
        x[e] = __half2float(h);
        if (k_out > 0) {
            atomicAdd(&hist[(__half_as_ushort(h) & 0x7fffu) >> 8], 1u);
        }
    }
    __syncthreads();

    if (k_out > 0) {
        // Pass 2: the threshold T = (hi << 8) | lo, and how many entries equal to T to take.
        find_bin(hist, 128, k_out, scan_scratch, &sel_bin, &sel_above);
        const uint32_t hi = sel_bin, above_hi = sel_above;
        for (uint32_t i = tid; i < 256; i += T) {
            hist[i] = 0;
        }
        __syncthreads();
        for (uint32_t e = tid; e < n; e += T) {
            const uint32_t key = mag_key(x[e]);
            if ((key >> 8) == hi) {
                atomicAdd(&hist[key & 0xffu], 1u);
            }
        }
        __syncthreads();
        find_bin(hist, 256, k_out - above_hi, scan_scratch, &sel_bin, &sel_above);
        const uint32_t thresh = (hi << 8) | sel_bin;
        const uint32_t n_ties = k_out - above_hi - sel_above;

        // Pass 3: select in index order, compact, zero, mask, count per row. Each thread takes
        // 8 consecutive entries a round (one chunk: same row, one mask byte), so a round of
        // T * 8 entries needs two block scans: ties before each thread, then selections.
        uint32_t seen_ties = 0, written = 0;
        for (uint32_t base = 0; base < n; base += T * KV_Q_CHUNK) {
            const uint32_t e0 = base + tid * KV_Q_CHUNK;
            const bool valid = e0 < n;  // n is a multiple of 8: a chunk is all in or all out
            uint32_t keys[KV_Q_CHUNK];
            uint32_t n_tie = 0;
#pragma unroll
            for (int i = 0; i < KV_Q_CHUNK; ++i) {
                keys[i] = valid ? mag_key(x[e0 + i]) : 0u;
                n_tie += (valid && keys[i] == thresh) ? 1u : 0u;
            }
            uint32_t round_ties, round_sel;
            uint32_t tie_rank = seen_ties + block_scan_u32(n_tie, scan_scratch, &round_ties);
            uint32_t sel_bits = 0, n_sel = 0;
#pragma unroll
            for (int i = 0; i < KV_Q_CHUNK; ++i) {
                const bool tie = valid && keys[i] == thresh;
                if (valid && (keys[i] > thresh || (tie && tie_rank < n_ties))) {
                    sel_bits |= 1u << i;
                    ++n_sel;
                }
                tie_rank += tie ? 1u : 0u;
            }
            uint32_t at = written + block_scan_u32(n_sel, scan_scratch, &round_sel);
#pragma unroll
            for (int i = 0; i < KV_Q_CHUNK; ++i) {
                if ((sel_bits >> i) & 1u) {
                    const uint32_t e = e0 + i;
                    if (blk.idx_bytes == 2) {
                        reinterpret_cast<uint16_t*>(arena + P.idx)[at] = static_cast<uint16_t>(e);
                    } else {
                        reinterpret_cast<uint32_t*>(arena + P.idx)[at] = e;
                    }
                    reinterpret_cast<__half*>(arena + P.val)[at] = __float2half_rn(x[e]);
                    x[e] = 0.0f;
                    ++at;
                }
            }
            if (valid) {
                mask[e0 / KV_Q_CHUNK] = static_cast<uint8_t>(sel_bits);
                if (n_sel > 0) {
                    atomicAdd(&row_count[e0 / d], n_sel);
                }
            }
            seen_ties += round_ties;
            written += round_sel;
        }
        __syncthreads();
    }

    // Pass 4a: quantization parameters per scale group.
    __half2* scales = reinterpret_cast<__half2*>(arena + P.scales);
    const bool channel = part == 0 && s.k_channel;
    if (channel) {
        const uint32_t grows = s.k_group;  // rows per group when the K layout is Channel
        const uint32_t n_groups = blk.n_groups;
        for (uint32_t u = tid; u < n_groups * d; u += T) {
            const uint32_t gi = u / d, c = u % d;
            const uint32_t r0 = gi * grows, r1 = min(m, r0 + grows);
            float lo = INFINITY, hi = -INFINITY;
            for (uint32_t j = r0; j < r1; ++j) {
                const float v = x[j * d + c];
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
            }
            __half st, z;
            quant_params(lo, hi, levels, &st, &z);
            scales[u] = __halves2half2(st, z);
        }
    } else {
        const uint32_t grp = part == 0 ? s.k_group : s.v_group;
        const uint32_t ng = d / grp;
        for (uint32_t u = tid; u < m * ng; u += T) {
            const uint32_t j = u / ng, gi = u % ng;
            const float* xs = x + j * d + gi * grp;
            float lo = INFINITY, hi = -INFINITY;
            for (uint32_t c = 0; c < grp; ++c) {
                lo = fminf(lo, xs[c]);
                hi = fmaxf(hi, xs[c]);
            }
            __half st, z;
            quant_params(lo, hi, levels, &st, &z);
            scales[u] = __halves2half2(st, z);
        }
    }
    __syncthreads();

    // Pass 4b: codes, and the residual for the low-rank term.
    const uint32_t n_chunks = d / KV_Q_CHUNK;
    uint8_t* codes = arena + P.codes;
    for (uint32_t u = tid; u < m * n_chunks; u += T) {
        const uint32_t j = u / n_chunks, kc = u % n_chunks;
        const uint32_t gi = channel ? j / s.k_group : 0u;
        const ScaleRow sr = scale_row(s, PartPtr{codes, scales, nullptr, nullptr, nullptr, nullptr, 0}, part, j, gi);
        uint64_t w = 0;
        float* xr = x + j * d + kc * KV_Q_CHUNK;
        const uint32_t mbits = k_out > 0 ? mask[(j * d) / KV_Q_CHUNK + kc] : 0u;
#pragma unroll
        for (int i = 0; i < KV_Q_CHUNK; ++i) {
            const uint32_t c = kc * KV_Q_CHUNK + i;
            const float2 sz = __half22float2(sr.first[c >> sr.shift]);
            const uint32_t code = encode(xr[i], inv_step(sz.x), sz.y, levels);
            w |= static_cast<uint64_t>(code) << (i * s.bits);
            if (rank > 0) {
                xr[i] = ((mbits >> i) & 1u) ? 0.0f : __fsub_rn(xr[i], dequant(code, sz.x, sz.y));
            }
        }
        store_chunk(codes + static_cast<size_t>(j) * s.row_bytes, kc, s.bits, w);
    }
    if (rank == 0) {
        if (k_out > 0) {
            __syncthreads();
            store_corrections(arena, s, blk, P, part, 0);
        }
        return;
    }
    __syncthreads();

    // Pass 5: power iteration on the residual R = x.
    float* fa = scratch + job.fa[part];
    float* fb = scratch + job.fb[part];
    const float* start = b0 + job.b0 + part * d * rank;
    for (uint32_t u = tid; u < d * rank; u += T) {
        fb[u] = start[u];
    }
    __syncthreads();
    const uint32_t iters = job.iters > 0 ? job.iters : 1;
    for (uint32_t it = 0; it < iters; ++it) {
        for (uint32_t u = tid; u < m * rank; u += T) {
            const uint32_t j = u / rank, k = u % rank;
            const float* xr = x + j * d;
            float acc = 0.0f;
            for (uint32_t c = 0; c < d; ++c) {
                acc = __fadd_rn(acc, __fmul_rn(xr[c], fb[c * rank + k]));
            }
            fa[u] = acc;
        }
        __syncthreads();
        if (tid < kWarpSize) {
            // Modified Gram-Schmidt, twice, in f64 (lowrank.rs: orthonormalize); lane l owns rows
            // l, l + 32, ... so its own updates are all it reads back.
            for (uint32_t k = 0; k < rank; ++k) {
                double ss = 0.0;
                for (uint32_t j = tid; j < m; j += kWarpSize) {
                    const double v = fa[j * rank + k];
                    ss += v * v;
                }
                const double norm0 = sqrt(warp_sum_f64(ss));
                for (int rep = 0; rep < 2; ++rep) {
                    for (uint32_t i = 0; i < k; ++i) {
                        double pr = 0.0;
                        for (uint32_t j = tid; j < m; j += kWarpSize) {
                            pr += static_cast<double>(fa[j * rank + k]) * static_cast<double>(fa[j * rank + i]);
                        }
                        const double proj = warp_sum_f64(pr);
                        for (uint32_t j = tid; j < m; j += kWarpSize) {
                            const float sub = static_cast<float>(proj * static_cast<double>(fa[j * rank + i]));
                            fa[j * rank + k] = __fsub_rn(fa[j * rank + k], sub);
                        }
                    }
                }
                ss = 0.0;
                for (uint32_t j = tid; j < m; j += kWarpSize) {
                    const double v = fa[j * rank + k];
                    ss += v * v;
                }
                const double norm = sqrt(warp_sum_f64(ss));
                const float scale = (norm > 1e-6 * norm0 && norm > 1e-30) ? static_cast<float>(1.0 / norm) : 0.0f;
                for (uint32_t j = tid; j < m; j += kWarpSize) {
                    fa[j * rank + k] = __fmul_rn(fa[j * rank + k], scale);
                }
                __syncwarp();
            }
        }
        __syncthreads();
        for (uint32_t u = tid; u < d * rank; u += T) {
            const uint32_t c = u / rank, k = u % rank;
            float acc = 0.0f;
            for (uint32_t j = 0; j < m; ++j) {
                acc = __fadd_rn(acc, __fmul_rn(x[j * d + c], fa[j * rank + k]));
            }
            fb[u] = acc;
        }
        __syncthreads();
    }

    // Pass 6: f16 factors, and keep them only if they do not increase the error.
    __half* a16 = reinterpret_cast<__half*>(arena + P.a);
    __half* b16 = reinterpret_cast<__half*>(arena + P.b);
    for (uint32_t u = tid; u < m * rank; u += T) {
        a16[u] = __float2half_rn(fa[u]);
    }
    for (uint32_t u = tid; u < d * rank; u += T) {
        b16[u] = __float2half_rn(fb[u]);
    }
    __syncthreads();
    double without = 0.0, with = 0.0;
    for (uint32_t e = tid; e < n; e += T) {
        if (k_out > 0 && ((mask[e / KV_Q_CHUNK] >> (e % KV_Q_CHUNK)) & 1u)) {
            continue;
        }
        const uint32_t j = e / d, c = e % d;
        const float v = x[e];
        const float l = lowrank_entry(a16 + static_cast<size_t>(j) * rank, b16, rank, c);
        const double dw = static_cast<double>(__fsub_rn(v, l));
        without += static_cast<double>(v) * static_cast<double>(v);
        with += dw * dw;
    }
    without = block_sum_f64(without, f64_scratch);
    with = block_sum_f64(with, f64_scratch);
    if (with > without) {
        for (uint32_t u = tid; u < m * rank; u += T) {
            a16[u] = __float2half_rn(0.0f);
        }
        for (uint32_t u = tid; u < d * rank; u += T) {
            b16[u] = __float2half_rn(0.0f);
        }
    }
    if (k_out > 0) {
        __syncthreads();
        store_corrections(arena, s, blk, P, part, rank);
    }
}

// The base pointer of a gather space (KV_Q_SPACE_*).
__device__ __forceinline__ uint8_t* space(uint8_t* arena, uint8_t* scratch, uint8_t* buf_k, uint8_t* buf_v,
                                          uint32_t which) {
    switch (which) {
        case KV_Q_SPACE_ARENA: return arena;
        case KV_Q_SPACE_SCRATCH: return scratch;
        case KV_Q_SPACE_BUF_K: return buf_k;
        default: return buf_v;
    }
}

}  // namespace q
}  // namespace kv

extern "C" __global__ void __launch_bounds__(KV_Q_COMPRESS_THREADS, 1)
    kv_quant_compress(uint8_t* __restrict__ arena, const __half* __restrict__ buf_k, const __half* __restrict__ buf_v,
                      const KvQCompressJob* __restrict__ jobs, const float* __restrict__ b0,
                      float* __restrict__ scratch, uint32_t* __restrict__ counts, KvQCompressParams p) {
    const uint32_t j = blockIdx.x, part = blockIdx.y;
    if (j >= p.n_jobs) {
        return;
    }
    kv::q::compress_part(arena, part == 0 ? buf_k : buf_v, jobs[j], part, b0, scratch, counts, p);
}

extern "C" __global__ void __launch_bounds__(KV_Q_COPY_THREADS)
    kv_quant_buffer_append(__half* __restrict__ buf_k, __half* __restrict__ buf_v, const float* __restrict__ in_k,
                           const float* __restrict__ in_v, const uint32_t* __restrict__ dst0, KvQBufferParams p) {
    const uint32_t t = blockIdx.x, g = blockIdx.y;
    if (t >= p.n_tokens) {
        return;
    }
    const uint32_t d = p.s.head_dim;
    const size_t src = (static_cast<size_t>(t) * p.s.n_kv_heads + g) * d;
    const size_t dst = (static_cast<size_t>(g) * p.s.buf_rows + dst0[g] + t) * d;
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        buf_k[dst + c] = __float2half_rn(in_k[src + c]);
        buf_v[dst + c] = __float2half_rn(in_v[src + c]);
    }
}

extern "C" __global__ void __launch_bounds__(KV_Q_COPY_THREADS)
    kv_quant_gather(uint8_t* arena, uint8_t* scratch, uint8_t* buf_k, uint8_t* buf_v,
                    const KvQSegment* __restrict__ segments, uint32_t n_segments) {
    if (blockIdx.x >= n_segments) {
        return;
    }
    const KvQSegment sg = segments[blockIdx.x];
    const uint8_t* src = kv::q::space(arena, scratch, buf_k, buf_v, sg.src_space) + sg.src;
    uint8_t* dst = kv::q::space(arena, scratch, buf_k, buf_v, sg.dst_space) + sg.dst;
    const uint32_t tid = threadIdx.x, T = blockDim.x;
    if (sg.kind == KV_Q_SEG_IDX16) {
        const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
        uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
        for (uint32_t i = tid; i < sg.n_bytes / 2; i += T) {
            d16[i] = static_cast<uint16_t>(s16[i] - sg.adjust);
        }
    } else if (sg.kind == KV_Q_SEG_IDX32) {
        const uint32_t* s32 = reinterpret_cast<const uint32_t*>(src);
        uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
        for (uint32_t i = tid; i < sg.n_bytes / 4; i += T) {
            d32[i] = s32[i] - sg.adjust;
        }
    } else if (((sg.src | sg.dst | sg.n_bytes) & 15u) == 0) {
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (uint32_t i = tid; i < sg.n_bytes / 16; i += T) {
            d4[i] = s4[i];
        }
    } else if (((sg.src | sg.dst | sg.n_bytes) & 3u) == 0) {
        const uint32_t* s32 = reinterpret_cast<const uint32_t*>(src);
        uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
        for (uint32_t i = tid; i < sg.n_bytes / 4; i += T) {
            d32[i] = s32[i];
        }
    } else {
        for (uint32_t i = tid; i < sg.n_bytes; i += T) {
            dst[i] = src[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_Q_ATTN_THREADS, 1)
    kv_quant_decode_tokens(const uint8_t* __restrict__ arena, const __half* __restrict__ buf_k,
                           const __half* __restrict__ buf_v, const KvQBlock* __restrict__ blocks,
                           const uint32_t* __restrict__ group_starts, const uint32_t* __restrict__ tokens,
                           float* __restrict__ out, KvQDecodeParams p) {
    using namespace kv::q;
    const KvQShape& s = p.s;
    const uint32_t i = blockIdx.x;
    if (i >= p.n_tokens) {
        return;
    }
    const uint32_t d = s.head_dim, tok = tokens[i];
    float* o = out + static_cast<size_t>(i) * 2 * d;
    const uint32_t n_chunks = d / KV_Q_CHUNK;
    if (tok >= p.n_compressed) {
        const size_t row = (static_cast<size_t>(p.head) * s.buf_rows + (tok - p.n_compressed)) * d;
        for (uint32_t u = threadIdx.x; u < 2 * n_chunks; u += blockDim.x) {
            const uint32_t part = u / n_chunks, kc = u % n_chunks;
            float v[KV_Q_CHUNK];
            load_f16x8((part == 0 ? buf_k : buf_v) + row + kc * KV_Q_CHUNK, v);
#pragma unroll
            for (int c = 0; c < KV_Q_CHUNK; ++c) {
                o[part * d + kc * KV_Q_CHUNK + c] = v[c];
            }
        }
        return;
    }
    // The block holding the token: the last of the head's blocks starting at or before it.
    uint32_t lo = 0, hi = p.n_blocks;
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (blocks[p.block0 + mid].first_token <= tok) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const KvQBlock* blk = blocks + p.block0 + lo;
    const uint32_t row = tok - blk->first_token;
    const uint32_t group = s.k_channel ? group_of(group_starts + blk->group0, blk->n_groups, row) : 0u;
    for (uint32_t u = threadIdx.x; u < 2 * n_chunks; u += blockDim.x) {
        const uint32_t part = u / n_chunks, kc = u % n_chunks;
        const PartPtr pp = part_ptr(arena, blk->part[part]);
        const uint32_t olo = lower_bound_idx(pp.idx, blk->idx_bytes, pp.n_out, row * d);
        const uint32_t ohi = lower_bound_idx(pp.idx, blk->idx_bytes, pp.n_out, (row + 1) * d);
        float v[KV_Q_CHUNK];
        decode_chunk(s, pp, part, blk->rank, blk->idx_bytes, row, group, olo, ohi, kc, v);
#pragma unroll
        for (int c = 0; c < KV_Q_CHUNK; ++c) {
            o[part * d + kc * KV_Q_CHUNK + c] = v[c];
        }
    }
}
