// Device helpers shared by cuda/gear.cu and cuda/attention_quant.cu: the quantization
// arithmetic of src/kv/codec/{pack,quant}.rs, the packed-chunk loads and stores, and the readers
// of the storage laid out in ffi/kvquant.h.
//
// Arithmetic that must reproduce the CPU codec bit for bit (quantization parameters, codes,
// dequantized values, the power iteration's products) is written with __fmul_rn / __fadd_rn /
// __fsub_rn / __fdiv_rn: nvcc contracts a * b + c into one FMA by default, Rust never does, and
// the intrinsics keep each operation separately rounded as on the CPU.
//
// Chunks: head_dim is a power of two >= 8 and channels are handled 8 at a time. Chunk k of a row
// (channels 8k .. 8k + 7) is bytes k * bits .. (k + 1) * bits of the row's codes, because 8 codes
// of b bits are b bytes; rows are row_bytes = head_dim * bits / 8 bytes, so a chunk is 2-, 4- or
// 8-byte aligned for 2, 4 and 8 bits whenever the codes array is (the host aligns every array to
// 16 bytes) and is read with one load; 3-bit chunks are read as 3 bytes.
#pragma once

#include "common.cuh"
#include "kvquant.h"

namespace kv {
namespace q {

// ---- f16 rounding in a chosen direction (pack.rs: step_down, f16_down, f16_up) ----

__device__ __forceinline__ __half f16_step_down(__half h) {
    const unsigned short b = __half_as_ushort(h);
    if ((b & 0x7fffu) > 0x7c00u || b == 0xfc00u) {  // NaN or -inf
        return h;
    }
    if ((b & 0x7fffu) == 0) {
        return __ushort_as_half(0x8001u);
    }
    return __ushort_as_half((b & 0x8000u) == 0 ? b - 1 : b + 1);
}

// The largest f16 <= x.
__device__ __forceinline__ __half f16_down(float x) {
    const __half h = __float2half_rn(x);
    return __half2float(h) > x ? f16_step_down(h) : h;
}

// The smallest f16 >= x.
__device__ __forceinline__ __half f16_up(float x) {
    const __half h = f16_down(-x);
    return __ushort_as_half(__half_as_ushort(h) ^ 0x8000u);
}

// (step, zero) for values in [lo, hi] with `levels` = 2^bits - 1 steps (quant.rs: params).
__device__ __forceinline__ void quant_params(float lo, float hi, float levels, __half* step, __half* zero) {
    const __half z = f16_down(lo);
    const float zf = __half2float(z);
    *zero = z;
    *step = hi > zf ? f16_up(__fdiv_rn(__fsub_rn(hi, zf), levels)) : __float2half_rn(0.0f);
}

// 1 / step, 0 for a zero step (quant.rs: inv).
__device__ __forceinline__ float inv_step(float s) { return s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f; }

// round((x - z) / s) clamped to 0 ..= levels (quant.rs: encode; roundf rounds half away from
// zero as f32::round does, and fmaxf maps NaN to 0 as the saturating `as u8` does).
__device__ __forceinline__ uint32_t encode(float x, float inv_s, float z, float levels) {
    const float r = roundf(__fmul_rn(__fsub_rn(x, z), inv_s));
    return static_cast<uint32_t>(fminf(fmaxf(r, 0.0f), levels));
}

// code * s + z, rounded twice as the CPU's `code as f32 * s + z` is.
__device__ __forceinline__ float dequant(uint32_t code, float s, float z) {
    return __fadd_rn(__fmul_rn(static_cast<float>(code), s), z);
}

// ---- packed chunks ----

// The `bits` bytes of chunk k of a row, little-endian in the low bits.
__device__ __forceinline__ uint64_t load_chunk(const uint8_t* row, uint32_t k, uint32_t bits) {
    const uint8_t* p = row + k * bits;
    switch (bits) {
        case 2: return *reinterpret_cast<const uint16_t*>(p);
        case 4: return *reinterpret_cast<const uint32_t*>(p);
        case 8: return *reinterpret_cast<const uint64_t*>(p);
        default: return static_cast<uint64_t>(p[0]) | (static_cast<uint64_t>(p[1]) << 8) |
                        (static_cast<uint64_t>(p[2]) << 16);
    }
}

__device__ __forceinline__ void store_chunk(uint8_t* row, uint32_t k, uint32_t bits, uint64_t w) {
    uint8_t* p = row + k * bits;
    switch (bits) {
        case 2: *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w); break;
        case 4: *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(w); break;
        case 8: *reinterpret_cast<uint64_t*>(p) = w; break;
        default:
            p[0] = static_cast<uint8_t>(w);
            p[1] = static_cast<uint8_t>(w >> 8);
            p[2] = static_cast<uint8_t>(w >> 16);
            break;
    }
}

__device__ __forceinline__ uint32_t log2_pow2(uint32_t x) { return 31u - __clz(x); }

// ---- the storage ----

// One part (K or V) of one block, resolved to pointers.
struct PartPtr {
    const uint8_t* codes;
    const __half2* scales;  // (step, zero) pairs
    const __half* a;        // [n, rank]
    const __half* b;        // [head_dim, rank]
    const uint8_t* idx;     // u16 or u32
    const __half* val;
    uint32_t n_out;
};

__device__ __forceinline__ PartPtr part_ptr(const uint8_t* arena, const KvQPart& p) {
    PartPtr r;
    r.codes = arena + p.codes;
    r.scales = reinterpret_cast<const __half2*>(arena + p.scales);
    r.a = reinterpret_cast<const __half*>(arena + p.a);
    r.b = reinterpret_cast<const __half*>(arena + p.b);
    r.idx = arena + p.idx;
    r.val = reinterpret_cast<const __half*>(arena + p.val);
    r.n_out = p.n_out;
    return r;
}

__device__ __forceinline__ uint32_t outlier_index(const uint8_t* idx, uint32_t idx_bytes, uint32_t e) {
    return idx_bytes == 2 ? reinterpret_cast<const uint16_t*>(idx)[e] : reinterpret_cast<const uint32_t*>(idx)[e];
}

// First e in [0, n) with idx[e] >= key (n when none).
__device__ __forceinline__ uint32_t lower_bound_idx(const uint8_t* idx, uint32_t idx_bytes, uint32_t n, uint32_t key) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        const uint32_t mid = (lo + hi) / 2;
        if (outlier_index(idx, idx_bytes, mid) < key) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The row group (0-based within the block) holding `row`: the last group whose first row is
// <= row. starts[0] is 0.
__device__ __forceinline__ uint32_t group_of(const uint32_t* starts, uint32_t n_groups, uint32_t row) {
    uint32_t lo = 0, hi = n_groups;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (starts[mid] <= row) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// The (step, zero) pairs a row reads: pair(c) = first[c >> shift].
struct ScaleRow {
    const __half2* first;
    uint32_t shift;
};

// Part 0 with Channel layout reads its row group's pairs (one per channel); every other part
// reads the row's pairs (one per `group` channels).
__device__ __forceinline__ ScaleRow scale_row(const KvQShape& s, const PartPtr& p, uint32_t part, uint32_t row,
                                              uint32_t group) {
    ScaleRow r;
    if (part == 0 && s.k_channel) {
        r.first = p.scales + static_cast<size_t>(group) * s.head_dim;
        r.shift = 0;
    } else {
        const uint32_t g = part == 0 ? s.k_group : s.v_group;
        r.first = p.scales + static_cast<size_t>(row) * (s.head_dim / g);
        r.shift = log2_pow2(g);
    }
    return r;
}

// The 8 dequantized values of chunk k of a row (backbone only).
__device__ __forceinline__ void dequant_chunk(const uint8_t* codes_row, uint32_t k, uint32_t bits, ScaleRow sr,
                                              float v[KV_Q_CHUNK]) {
    const uint64_t w = load_chunk(codes_row, k, bits);
    const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
    for (int i = 0; i < KV_Q_CHUNK; ++i) {
        const uint32_t c = k * KV_Q_CHUNK + i;
        const float2 sz = __half22float2(sr.first[c >> sr.shift]);
        v[i] = dequant(static_cast<uint32_t>(w >> (i * bits)) & mask, sz.x, sz.y);
    }
}

// (A B^T)[row, c], summed over the rank in order in f32 as lowrank.rs's `entry` does.
__device__ __forceinline__ float lowrank_entry(const __half* a_row, const __half* b, uint32_t rank, uint32_t c) {
    const __half* b_row = b + static_cast<size_t>(c) * rank;
    float acc = 0.0f;
    for (uint32_t k = 0; k < rank; ++k) {
        acc = __fadd_rn(acc, __fmul_rn(__half2float(a_row[k]), __half2float(b_row[k])));
    }
    return acc;
}

// Adds x to v[j] (a compile-time-indexed select, so v stays in registers).
__device__ __forceinline__ void add_lane(float v[KV_Q_CHUNK], uint32_t j, float x) {
#pragma unroll
    for (int i = 0; i < KV_Q_CHUNK; ++i) {
        if (static_cast<uint32_t>(i) == j) {
            v[i] = __fadd_rn(v[i], x);
        }
    }
}

// The fully decoded chunk k of row `row` of a block part: dequantized, plus the low-rank entry,
// plus the outliers' corrections (entries [out_lo, out_hi) of the part, the row's; sparse.rs:
// value - (deq + A B^T) at their place, in f16). This is blocked.rs's `decode_row`, operation
// for operation.
__device__ __forceinline__ void decode_chunk(const KvQShape& s, const PartPtr& p, uint32_t part, uint32_t rank,
                                             uint32_t idx_bytes, uint32_t row, uint32_t group, uint32_t out_lo,
                                             uint32_t out_hi, uint32_t k, float v[KV_Q_CHUNK]) {
    dequant_chunk(p.codes + static_cast<size_t>(row) * s.row_bytes, k, s.bits, scale_row(s, p, part, row, group), v);
    if (rank > 0) {
        const __half* a_row = p.a + static_cast<size_t>(row) * rank;
#pragma unroll
        for (int i = 0; i < KV_Q_CHUNK; ++i) {
            v[i] = __fadd_rn(v[i], lowrank_entry(a_row, p.b, rank, k * KV_Q_CHUNK + i));
        }
    }
    const uint32_t base = row * s.head_dim + k * KV_Q_CHUNK;
    for (uint32_t e = out_lo; e < out_hi; ++e) {
        const uint32_t at = outlier_index(p.idx, idx_bytes, e);
        if (at >= base && at < base + KV_Q_CHUNK) {
            add_lane(v, at - base, __half2float(p.val[e]));
        }
    }
}

// 8 f16 of an fp16 buffer row as f32 (16-byte aligned: head_dim % 8 == 0).
__device__ __forceinline__ void load_f16x8(const __half* src, float v[KV_Q_CHUNK]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < KV_Q_CHUNK / 2; ++i) {
        const float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

// ---- block-wide helpers (blockDim.x a multiple of 32, at most 1024) ----

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, off);
    }
    return v;
}

// Sum over the block in f64; scratch holds 32 doubles. Ends with a barrier, so the scratch can
// be reused at once.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int n_warps = blockDim.x / kWarpSize;
    v = warp_sum_f64(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0;
    v = warp_sum_f64(v);
    __syncthreads();
    return v;
}

// Exclusive prefix sum of one uint32 per thread over the block (thread order); *total gets the
// sum. scratch holds 32 ints. Ends with a barrier.
__device__ __forceinline__ uint32_t block_scan_u32(uint32_t v, uint32_t* scratch, uint32_t* total) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int n_warps = blockDim.x / kWarpSize;
    uint32_t incl = v;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
        const uint32_t y = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) {
            incl += y;
        }
    }
    if (lane == kWarpSize - 1) {
        scratch[warp] = incl;
    }
    __syncthreads();
    uint32_t before = 0, sum = 0;
    for (int w = 0; w < n_warps; ++w) {
        const uint32_t c = scratch[w];
        before += w < warp ? c : 0u;
        sum += c;
    }
    __syncthreads();
    *total = sum;
    return before + incl - v;
}

}  // namespace q
}  // namespace kv
