// Dequantizing matrix products over GGUF blocks as stored, and the embedding lookup.
//
// A weight matrix W is [n_rows, n_cols] in its GGUF type, row-major, rows of row_bytes bytes end
// to end (ffi/quant.h). Activations are f32, row-major: x [n_tokens, n_cols], y [n_tokens,
// n_rows]. Everything is read in units of 32 consecutive elements of a row (one legacy block,
// one eighth of a K-quant super-block, or 32 float values): dequant_unit<TYPE> turns one unit
// into 32 floats in registers with the arithmetic of src/format/quant.rs `dequantize` (products
// rounded before sums, __fmul_rn/__fadd_rn, so the values are bit-identical to the CPU's).
//
// kv_gemv_<type>_t1 / _t4 (decode; reference: backend::cpu::reference::matmul)
//   y[t, r] = sum_c W[r, c] x[t, c] for up to 1 / KV_GEMV_MAX_TOKENS tokens.
//   Block: KV_GEMV_WARPS warps; warp w owns KV_GEMV_ROWS_PER_WARP consecutive rows. A row is
//   walked in chunks of whole blocks of at most KV_GEMV_CHUNK_BYTES; each chunk is copied to
//   shared memory with 16-byte cp.async, double-buffered: while the lanes dequantize chunk c
//   from one stage, chunk c + 1 is in flight into the other. The copy covers the 16-byte aligned
//   span around the chunk (the allocation is padded, ffi/quant.h), so a block's bytes sit at
//   (start & 15) + i * block_bytes in the stage. Lane l dequantizes units l, l + 32, ... of the
//   chunk for each of its warp's rows (x is loaded once per unit for all rows, as float4 through
//   the read-only cache), accumulating in f32; one warp_sum per (row, token) at the end.
//   Only __syncwarp is used: warps are independent, and a warp whose rows are all past n_rows
//   returns at once.
// kv_gemv_naive (benchmark baseline): one thread per row, units read straight from global
//   memory byte by byte, a runtime switch on the type.
//
// kv_gemm_<type> (prefill, tensor cores; same reference)
//   Block tile: KV_GEMM_TILE_ROWS weight rows x KV_GEMM_TILE_TOKENS tokens, K steps of
//   KV_GEMM_TILE_K columns. Per step each of the 256 threads dequantizes one unit (row i / 4,
//   unit i % 4) into f16 in shared memory, and the x tile is converted to f16 beside it; the 8
//   warps (4 x 2) each own 16 rows x 32 tokens and run wmma 16x16x16 f16 products with f32
//   accumulators. Out-of-range rows, tokens and columns are zero-filled. The result goes through
//   shared memory (reusing the tiles) so y is written coalesced along rows.
//   Rounding W and x to f16 costs ~2^-11 relative per product (selftest's GEMM_TOL).
//
// kv_embed(table, tokens, out, KvEmbedParams) (reference: Tensor::dequantize_row)
//   out[t, :] = W[tokens[t], :]. One block per token, threads over the row's units; exact.
//
// Requirements checked by the Rust wrappers (src/backend/cuda/quant.rs): n_cols a multiple of
// 32 (of 256 for K-quants), row_bytes = the type's bytes for n_cols, W 16-byte aligned, x and y
// 16-byte aligned, token ids < n_rows.

#include <mma.h>

#include "common.cuh"
#include "quant.h"

namespace kv {

// Block geometry of each type: units per block and bytes per block (a "block" of a float type
// is one unit of 32 values).
template <int TYPE> struct Fmt;
template <> struct Fmt<KV_TYPE_F32> { static constexpr int units = 1, bytes = 128; };
template <> struct Fmt<KV_TYPE_F16> { static constexpr int units = 1, bytes = 64; };
template <> struct Fmt<KV_TYPE_BF16> { static constexpr int units = 1, bytes = 64; };
template <> struct Fmt<KV_TYPE_Q8_0> { static constexpr int units = 1, bytes = 34; };
template <> struct Fmt<KV_TYPE_Q4_0> { static constexpr int units = 1, bytes = 18; };
template <> struct Fmt<KV_TYPE_Q4_1> { static constexpr int units = 1, bytes = 20; };
template <> struct Fmt<KV_TYPE_Q5_0> { static constexpr int units = 1, bytes = 22; };
template <> struct Fmt<KV_TYPE_Q5_1> { static constexpr int units = 1, bytes = 24; };
template <> struct Fmt<KV_TYPE_Q4_K> { static constexpr int units = 8, bytes = 144; };
template <> struct Fmt<KV_TYPE_Q5_K> { static constexpr int units = 8, bytes = 176; };
template <> struct Fmt<KV_TYPE_Q6_K> { static constexpr int units = 8, bytes = 210; };

// Loads of block fields. Blocks start at even byte offsets (every block size is even and rows
// start at multiples of row_bytes), so 16-bit loads are aligned; wider fields are assembled.
__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
__device__ __forceinline__ float ld_f16(const uint8_t* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
__device__ __forceinline__ uint32_t ld_u32_2(const uint8_t* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }

// The 6-bit scale and min of sub-block j of a q4_K / q5_K block (quant.rs scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* s, float& sc, float& m) {
    if (j < 4) {
        sc = static_cast<float>(s[j] & 63);
        m = static_cast<float>(s[j + 4] & 63);
    } else {
        sc = static_cast<float>((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        m = static_cast<float>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Unit `sub` (0 for one-unit blocks) of the block at b, into w[0..32).
template <int TYPE> __device__ __forceinline__ void dequant_unit(const uint8_t* b, int sub, float* w);

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_F32>(const uint8_t* b, int, float* w) {
    const float* f = reinterpret_cast<const float*>(b);
#pragma unroll
    for (int i = 0; i < 32; ++i) w[i] = f[i];
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_F16>(const uint8_t* b, int, float* w) {
    const __half2* h = reinterpret_cast<const __half2*>(b);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const float2 f = __half22float2(h[i]);
        w[2 * i] = f.x;
        w[2 * i + 1] = f.y;
    }
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_BF16>(const uint8_t* b, int, float* w) {
#pragma unroll
    for (int i = 0; i < 32; ++i) w[i] = __uint_as_float(ld_u16(b + 2 * i) << 16);
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q8_0>(const uint8_t* b, int, float* w) {
    const float d = ld_f16(b);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const uint32_t q = ld_u16(b + 2 + 2 * i);
        w[2 * i] = static_cast<float>(static_cast<int8_t>(q & 0xFF)) * d;
        w[2 * i + 1] = static_cast<float>(static_cast<int8_t>(q >> 8)) * d;
    }
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q4_0>(const uint8_t* b, int, float* w) {
    const float d = ld_f16(b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint32_t q = ld_u16(b + 2 + 2 * i);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const uint32_t byte = (q >> (8 * k)) & 0xFF;
            w[2 * i + k] = static_cast<float>(static_cast<int>(byte & 0x0F) - 8) * d;
            w[2 * i + k + 16] = static_cast<float>(static_cast<int>(byte >> 4) - 8) * d;
        }
    }
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q4_1>(const uint8_t* b, int, float* w) {
    const float d = ld_f16(b);
    const float m = ld_f16(b + 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint32_t q = ld_u16(b + 4 + 2 * i);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const uint32_t byte = (q >> (8 * k)) & 0xFF;
            w[2 * i + k] = __fadd_rn(__fmul_rn(static_cast<float>(byte & 0x0F), d), m);
            w[2 * i + k + 16] = __fadd_rn(__fmul_rn(static_cast<float>(byte >> 4), d), m);
        }
    }
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q5_0>(const uint8_t* b, int, float* w) {
    const float d = ld_f16(b);
    const uint32_t qh = ld_u32_2(b + 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint32_t q = ld_u16(b + 6 + 2 * i);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int j = 2 * i + k;
            const uint32_t byte = (q >> (8 * k)) & 0xFF;
            const uint32_t lo = (byte & 0x0F) | (((qh >> j) & 1) << 4);
            const uint32_t hi = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4);
            w[j] = static_cast<float>(static_cast<int>(lo) - 16) * d;
            w[j + 16] = static_cast<float>(static_cast<int>(hi) - 16) * d;
        }
    }
}

template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q5_1>(const uint8_t* b, int, float* w) {
    const float d = ld_f16(b);
    const float m = ld_f16(b + 2);
    const uint32_t qh = ld_u32_2(b + 4);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint32_t q = ld_u16(b + 8 + 2 * i);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int j = 2 * i + k;
            const uint32_t byte = (q >> (8 * k)) & 0xFF;
            const uint32_t lo = (byte & 0x0F) | (((qh >> j) & 1) << 4);
            const uint32_t hi = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4);
            w[j] = __fadd_rn(__fmul_rn(static_cast<float>(lo), d), m);
            w[j + 16] = __fadd_rn(__fmul_rn(static_cast<float>(hi), d), m);
        }
    }
}

// q4_K unit s: chunk c = s / 2 of 64 elements, low nibbles for even s, high for odd s.
template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q4_K>(const uint8_t* b, int s, float* w) {
    float sc, m;
    scale_min_k4(s, b + 4, sc, m);
    const float dl = __fmul_rn(ld_f16(b), sc);
    const float ml = __fmul_rn(ld_f16(b + 2), m);
    const uint8_t* qs = b + 16 + 32 * (s / 2);
    const int shift = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const uint32_t q = ld_u16(qs + 2 * i);
        w[2 * i] = __fsub_rn(__fmul_rn(dl, static_cast<float>((q >> shift) & 0x0F)), ml);
        w[2 * i + 1] = __fsub_rn(__fmul_rn(dl, static_cast<float>((q >> (8 + shift)) & 0x0F)), ml);
    }
}

// q5_K unit s: as q4_K, the fifth bit of element l is bit s of qh[l].
template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q5_K>(const uint8_t* b, int s, float* w) {
    float sc, m;
    scale_min_k4(s, b + 4, sc, m);
    const float dl = __fmul_rn(ld_f16(b), sc);
    const float ml = __fmul_rn(ld_f16(b + 2), m);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48 + 32 * (s / 2);
    const int shift = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const uint32_t q = ld_u16(qs + 2 * i);
        const uint32_t h = ld_u16(qh + 2 * i);
        const uint32_t q0 = ((q >> shift) & 0x0F) | (((h >> s) & 1) << 4);
        const uint32_t q1 = ((q >> (8 + shift)) & 0x0F) | (((h >> (8 + s)) & 1) << 4);
        w[2 * i] = __fsub_rn(__fmul_rn(dl, static_cast<float>(q0)), ml);
        w[2 * i + 1] = __fsub_rn(__fmul_rn(dl, static_cast<float>(q1)), ml);
    }
}

// q6_K unit s: half h = s / 4, quarter k = s % 4 of it, elements 128h + 32k + l (l < 32): low
// four bits in ql[64h + l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2), high two bits
// at bit 2k of qh[32h + l], scale scales[8h + 2k + l / 16] (quant.rs dequantize_q6_k).
template <> __device__ __forceinline__ void dequant_unit<KV_TYPE_Q6_K>(const uint8_t* b, int s, float* w) {
    const int h = s / 4;
    const int k = s % 4;
    const uint8_t* ql = b + 64 * h + 32 * (k & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * h + 2 * k);
    const float d = ld_f16(b + 208);
    const float ds0 = __fmul_rn(d, static_cast<float>(sc[0]));
    const float ds1 = __fmul_rn(d, static_cast<float>(sc[1]));
    const int lshift = 4 * (k >> 1);
    const int hshift = 2 * k;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const uint32_t lo = ld_u16(ql + 2 * i);
        const uint32_t hi = ld_u16(qh + 2 * i);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int l = 2 * i + e;
            const int q = static_cast<int>((((lo >> (8 * e)) >> lshift) & 0x0F) | ((((hi >> (8 * e)) >> hshift) & 3) << 4)) - 32;
            w[l] = __fmul_rn(l < 16 ? ds0 : ds1, static_cast<float>(q));
        }
    }
}

// Runtime dispatch on the type, for the kernels that are not specialised per type.
__device__ __forceinline__ bool type_geometry(uint32_t type, int& units, int& bytes) {
    switch (type) {
#define KV_GEOM(T) case T: units = Fmt<T>::units; bytes = Fmt<T>::bytes; return true;
        KV_GEOM(KV_TYPE_F32) KV_GEOM(KV_TYPE_F16) KV_GEOM(KV_TYPE_BF16) KV_GEOM(KV_TYPE_Q8_0)
        KV_GEOM(KV_TYPE_Q4_0) KV_GEOM(KV_TYPE_Q4_1) KV_GEOM(KV_TYPE_Q5_0) KV_GEOM(KV_TYPE_Q5_1)
        KV_GEOM(KV_TYPE_Q4_K) KV_GEOM(KV_TYPE_Q5_K) KV_GEOM(KV_TYPE_Q6_K)
#undef KV_GEOM
        default: return false;
    }
}

// Unit u of the row at `row`, into w; zeros for an unknown type (the wrappers never pass one).
__device__ __forceinline__ void dequant_row_unit(uint32_t type, const uint8_t* row, uint32_t u, float* w) {
    int units = 1, bytes = 0;
    if (!type_geometry(type, units, bytes)) {
#pragma unroll
        for (int i = 0; i < 32; ++i) w[i] = 0.0f;
        return;
    }
    const uint8_t* b = row + static_cast<size_t>(u / units) * bytes;
    const int s = static_cast<int>(u % units);
    switch (type) {
#define KV_DQ(T) case T: dequant_unit<T>(b, s, w); break;
        KV_DQ(KV_TYPE_F32) KV_DQ(KV_TYPE_F16) KV_DQ(KV_TYPE_BF16) KV_DQ(KV_TYPE_Q8_0)
        KV_DQ(KV_TYPE_Q4_0) KV_DQ(KV_TYPE_Q4_1) KV_DQ(KV_TYPE_Q5_0) KV_DQ(KV_TYPE_Q5_1)
        KV_DQ(KV_TYPE_Q4_K) KV_DQ(KV_TYPE_Q5_K) KV_DQ(KV_TYPE_Q6_K)
#undef KV_DQ
        default: break;
    }
}

// 16-byte asynchronous copy global -> shared (sm_80+), bypassing L1.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int TYPE, int NT>
__device__ __forceinline__ void gemv(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                     const KvMatmulParams& p) {
    constexpr int R = KV_GEMV_ROWS_PER_WARP;
    constexpr int BU = Fmt<TYPE>::units;
    constexpr int BB = Fmt<TYPE>::bytes;
    constexpr int CHUNK_BLOCKS = KV_GEMV_CHUNK_BYTES / BB;
    constexpr int CHUNK_UNITS = CHUNK_BLOCKS * BU;
    static_assert(CHUNK_BLOCKS >= 1, "a block must fit a chunk");
    __shared__ __align__(16) uint8_t stage[KV_GEMV_WARPS][2][R][KV_GEMV_STAGE_BYTES];

    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const uint32_t row0 = (blockIdx.x * KV_GEMV_WARPS + warp) * R;
    if (row0 >= p.n_rows) {
        return;
    }
    const uint32_t n_units = p.n_cols / KV_UNIT_ELEMS;
    const uint32_t n_chunks = (n_units + CHUNK_UNITS - 1) / CHUNK_UNITS;

    // Byte offset (from w) where chunk c of row r starts; its span in the stage starts at the
    // 16-byte boundary below it.
    auto chunk_start = [&](uint32_t r, uint32_t c) -> size_t {
        return static_cast<size_t>(row0 + r) * p.row_bytes + static_cast<size_t>(c) * CHUNK_BLOCKS * BB;
    };
    auto chunk_units = [&](uint32_t c) -> uint32_t { return min(static_cast<uint32_t>(CHUNK_UNITS), n_units - c * CHUNK_UNITS); };
    auto issue = [&](uint32_t c, int buf) {
        const uint32_t len = chunk_units(c) / BU * BB;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (row0 + r < p.n_rows) {
                const size_t start = chunk_start(r, c);
                const size_t a0 = start & ~static_cast<size_t>(15);
                const uint32_t n16 = static_cast<uint32_t>(((start + len + 15) & ~static_cast<size_t>(15)) - a0) / 16;
                for (uint32_t i = lane; i < n16; i += kWarpSize) {
                    cp_async16(&stage[warp][buf][r][16 * i], w + a0 + 16 * i);
                }
            }
        }
    };

    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
    }

    issue(0, 0);
    cp_async_commit();
    for (uint32_t c = 0; c < n_chunks; ++c) {
        const int buf = c & 1;
        if (c + 1 < n_chunks) {
            issue(c + 1, buf ^ 1);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncwarp();
        const uint32_t units = chunk_units(c);
        for (uint32_t u = lane; u < units; u += kWarpSize) {
            float wv[R][32];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (row0 + r < p.n_rows) {
                    const uint32_t off = static_cast<uint32_t>(chunk_start(r, c) & 15);
                    dequant_unit<TYPE>(&stage[warp][buf][r][off + (u / BU) * BB], static_cast<int>(u % BU), wv[r]);
                } else {
#pragma unroll
                    for (int i = 0; i < 32; ++i) wv[r][i] = 0.0f;
                }
            }
            const size_t col = static_cast<size_t>(c * CHUNK_UNITS + u) * KV_UNIT_ELEMS;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t < static_cast<int>(p.n_tokens)) {
                    const float4* xt = reinterpret_cast<const float4*>(x + static_cast<size_t>(t) * p.n_cols + col);
#pragma unroll
                    for (int g = 0; g < 8; ++g) {
                        const float4 xv = __ldg(xt + g);
#pragma unroll
                        for (int r = 0; r < R; ++r) {
                            acc[r][t] += wv[r][4 * g] * xv.x + wv[r][4 * g + 1] * xv.y + wv[r][4 * g + 2] * xv.z +
                                         wv[r][4 * g + 3] * xv.w;
                        }
                    }
                }
            }
        }
        // Every lane is done with this stage before the next iteration's copy overwrites it.
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float s = warp_sum(acc[r][t]);
            if (lane == 0 && row0 + r < p.n_rows && t < static_cast<int>(p.n_tokens)) {
                y[static_cast<size_t>(t) * p.n_rows + row0 + r] = s;
            }
        }
    }
}

// Tensor-core GEMM over dequantized f16 tiles (see the header comment).
template <int TYPE>
__device__ __forceinline__ void gemm(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                     const KvMatmulParams& p) {
    using namespace nvcuda;
    constexpr int TR = KV_GEMM_TILE_ROWS;
    constexpr int TT = KV_GEMM_TILE_TOKENS;
    constexpr int TK = KV_GEMM_TILE_K;
    constexpr int LD = TK + 8;       // halves per tile row: 16-byte aligned rows, banks shifted
    constexpr int LDC = TT + 4;      // floats per row of the output staging
    constexpr int UNITS_PER_ROW = TK / KV_UNIT_ELEMS;
    constexpr int BU = Fmt<TYPE>::units;
    constexpr int BB = Fmt<TYPE>::bytes;
    static_assert(TR * UNITS_PER_ROW == KV_GEMM_THREADS, "one unit of the W tile per thread");
    static_assert(TR * LDC * 4 <= 2 * TR * LD * 2, "the output staging fits in the tiles");
    __shared__ __align__(128) uint8_t smem[2 * TR * LD * 2];
    __half* As = reinterpret_cast<__half*>(smem);            // [TR][LD]: W tile, row-major
    __half* Bs = reinterpret_cast<__half*>(smem) + TR * LD;  // [TT][LD]: x tile, token-major
    float* Cs = reinterpret_cast<float*>(smem);              // [TR][LDC], after the K loop

    const int tid = threadIdx.x;
    const int warp = tid / kWarpSize;
    const int wr = warp % 4;  // 16-row slice of the tile
    const int wc = warp / 4;  // 32-token slice of the tile
    const uint32_t r0 = blockIdx.x * TR;
    const uint32_t t0 = blockIdx.y * TT;
    const uint32_t n_units = p.n_cols / KV_UNIT_ELEMS;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);

    for (uint32_t k0 = 0; k0 < p.n_cols; k0 += TK) {
        __syncthreads();
        {
            const int tr = tid / UNITS_PER_ROW;
            const int tu = tid % UNITS_PER_ROW;
            const uint32_t row = r0 + tr;
            const uint32_t u = k0 / KV_UNIT_ELEMS + tu;
            float v[32];
            if (row < p.n_rows && u < n_units) {
                const uint8_t* b = w + static_cast<size_t>(row) * p.row_bytes + static_cast<size_t>(u / BU) * BB;
                dequant_unit<TYPE>(b, static_cast<int>(u % BU), v);
            } else {
#pragma unroll
                for (int i = 0; i < 32; ++i) v[i] = 0.0f;
            }
            __half2* dst = reinterpret_cast<__half2*>(As + tr * LD + tu * KV_UNIT_ELEMS);
#pragma unroll
            for (int i = 0; i < 16; ++i) dst[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        }
        // x tile: TT tokens x TK columns, 32 consecutive columns per thread.
        {
            const int tt = tid / UNITS_PER_ROW;
            const int tu = tid % UNITS_PER_ROW;
            const uint32_t tok = t0 + tt;
            const uint32_t col = k0 + tu * KV_UNIT_ELEMS;
            __half2* dst = reinterpret_cast<__half2*>(Bs + tt * LD + tu * KV_UNIT_ELEMS);
            if (tok < p.n_tokens && col < p.n_cols) {
                const float4* src = reinterpret_cast<const float4*>(x + static_cast<size_t>(tok) * p.n_cols + col);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 f = __ldg(src + i);
                    dst[2 * i] = __floats2half2_rn(f.x, f.y);
                    dst[2 * i + 1] = __floats2half2_rn(f.z, f.w);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) dst[i] = __floats2half2_rn(0.0f, 0.0f);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, As + wr * 16 * LD + kk, LD);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf;
                wmma::load_matrix_sync(bf, Bs + (wc * 32 + j * 16) * LD + kk, LD);
                wmma::mma_sync(acc[j], a, bf, acc[j]);
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(Cs + wr * 16 * LDC + wc * 32 + j * 16, acc[j], LDC, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = tid; i < TR * TT; i += KV_GEMM_THREADS) {
        const int tr = i % TR;
        const int tt = i / TR;
        if (r0 + tr < p.n_rows && t0 + tt < p.n_tokens) {
            y[static_cast<size_t>(t0 + tt) * p.n_rows + r0 + tr] = Cs[tr * LDC + tt];
        }
    }
}

}  // namespace kv

#define KV_QUANT_KERNELS(NAME, TYPE)                                                                        \
    extern "C" __global__ void __launch_bounds__(KV_GEMV_WARPS * 32)                                       \
        kv_gemv_##NAME##_t1(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, \
                            KvMatmulParams p) {                                                             \
        kv::gemv<TYPE, 1>(w, x, y, p);                                                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KV_GEMV_WARPS * 32)                                       \
        kv_gemv_##NAME##_t4(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, \
                            KvMatmulParams p) {                                                             \
        kv::gemv<TYPE, KV_GEMV_MAX_TOKENS>(w, x, y, p);                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(KV_GEMM_THREADS)                                          \
        kv_gemm_##NAME(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,    \
                       KvMatmulParams p) {                                                                  \
        kv::gemm<TYPE>(w, x, y, p);                                                                         \
    }

KV_QUANT_KERNELS(f32, KV_TYPE_F32)
KV_QUANT_KERNELS(f16, KV_TYPE_F16)
KV_QUANT_KERNELS(bf16, KV_TYPE_BF16)
KV_QUANT_KERNELS(q8_0, KV_TYPE_Q8_0)
KV_QUANT_KERNELS(q4_0, KV_TYPE_Q4_0)
KV_QUANT_KERNELS(q4_1, KV_TYPE_Q4_1)
KV_QUANT_KERNELS(q5_0, KV_TYPE_Q5_0)
KV_QUANT_KERNELS(q5_1, KV_TYPE_Q5_1)
KV_QUANT_KERNELS(q4_k, KV_TYPE_Q4_K)
KV_QUANT_KERNELS(q5_k, KV_TYPE_Q5_K)
KV_QUANT_KERNELS(q6_k, KV_TYPE_Q6_K)

extern "C" __global__ void __launch_bounds__(KV_GEMV_NAIVE_THREADS)
    kv_gemv_naive(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, KvMatmulParams p) {
    const uint32_t r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.n_rows) {
        return;
    }
    const uint8_t* row = w + static_cast<size_t>(r) * p.row_bytes;
    const uint32_t n_units = p.n_cols / KV_UNIT_ELEMS;
    for (uint32_t t = 0; t < p.n_tokens; ++t) {
        const float* xt = x + static_cast<size_t>(t) * p.n_cols;
        float acc = 0.0f;
        for (uint32_t u = 0; u < n_units; ++u) {
            float v[32];
            kv::dequant_row_unit(p.type, row, u, v);
#pragma unroll
            for (int i = 0; i < 32; ++i) acc += v[i] * xt[u * KV_UNIT_ELEMS + i];
        }
        y[static_cast<size_t>(t) * p.n_rows + r] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(KV_EMBED_THREADS)
    kv_embed(const uint8_t* __restrict__ table, const uint32_t* __restrict__ tokens, float* __restrict__ out,
             KvEmbedParams p) {
    const uint32_t t = blockIdx.x;
    const uint8_t* row = table + static_cast<size_t>(tokens[t]) * p.row_bytes;
    float* o = out + static_cast<size_t>(t) * p.n_cols;
    const uint32_t n_units = p.n_cols / KV_UNIT_ELEMS;
    for (uint32_t u = threadIdx.x; u < n_units; u += blockDim.x) {
        float v[32];
        kv::dequant_row_unit(p.type, row, u, v);
        float4* o4 = reinterpret_cast<float4*>(o + u * KV_UNIT_ELEMS);
#pragma unroll
        for (int i = 0; i < 8; ++i) o4[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
}
