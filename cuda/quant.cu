// Dequantizing matrix products over GGUF blocks as stored, and the embedding lookup.
//
// A weight matrix W is [n_rows, n_cols] in its GGUF type, row-major, rows of row_bytes bytes end
// to end (ffi/quant.h). Activations are f32, row-major: x [n_tokens, n_cols], y [n_tokens,
// n_rows]. Everything is read in units of 32 consecutive elements of a row (one legacy block,
// one eighth of a K-quant super-block, or 32 float values): dequant_unit<TYPE> turns one unit
// into 32 floats in registers with the arithmetic of src/format/quant.rs `dequantize` (products
// rounded before sums, __fmul_rn/__fadd_rn, so the values are bit-identical to the CPU's).
//
// kv_gemv_<type>_t1 / _t4 for the quantized types (decode; reference: reference::matmul on x
//   quantized as below, quant.rs q8_roundtrip): y[t, r] = sum_c W[r, c] q8(x)[t, c] for up to
//   1 / KV_GEMV_MAX_TOKENS tokens. Integer dot products, as llama.cpp's mmvq does:
//   - Prologue: the block quantizes its tokens' x into dynamic shared memory, one thread per 32
//     values: codes q = rint(x * (127 / amax)) (int8, [n_tokens, n_cols]) and a KvQ8Sum {d =
//     f16(amax / 127), sum of q} per 32 ([n_tokens, n_cols / 32]); the CPU fast backend's
//     quantize_q8. One __syncthreads, none in the main loop.
//   - Grid: at most the blocks the device holds at once (the wrapper asks the occupancy API);
//     block b takes row groups b, b + gridDim.x, ..., so x is quantized once per block.
//   - Block: KV_GEMV_Q8_WARPS warps; warp w owns KV_GEMV_Q8_ROWS_PER_WARP consecutive rows of a
//     row group. A row is cut into lane units (LU): one block for the 32-element types, a
//     quarter super-block (two 32-element sub-blocks) for the K-quants, so a 4096-column row
//     gives every lane work.
//     Lane l takes LUs l, l + 32, ...; per step it issues the loads of Q8Gemv<T>::unroll LUs for
//     each of its warp's rows (all independent, straight into registers: 16-byte loads where the
//     block is 16-byte aligned (q4_K, q5_K), 8-byte for q5_1, 4-byte otherwise, funnel-shifted
//     for the 2-byte aligned types), then dots each LU with x. The loads run one step ahead:
//     the first step's are issued before the prologue, each next step's before this step's dots,
//     so the weights stream while x is quantized and while the lanes compute. In the dot:
//     nibbles/bits unpacked to bytes, __dp4a against the int8 codes (two 16-byte shared loads
//     per 32 values), the integer sum scaled by the weight's and x's scales in f32 as
//     (d_w d_x) s, the CPU's order (the offset of q4_0 / q5_0 through x's code sum, the minimum
//     of q4_1 / q5_1 through f16(d * sum) (q8_1_s), of the K-quants through d * sum). f32
//     per-lane sums, one warp_sum per (row, token).
//   The emulation test in src/backend/cuda/quant.rs replays each type's LU on the host.
// kv_gemv_<type>_t1 / _t4 for f32, f16, bf16 (decode; reference: reference::matmul)
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
// kv_gemm_q8_<type> for q8_0, q4_0, q4_1, q5_0, q5_1, q4_K, q5_K (prefill, int8 tensor cores;
//   reference: reference::matmul on q8_roundtrip(x), as the integer GEMV)
//   y = W . q8(x) with the arithmetic of the integer GEMV and of the CPU fast backend: x
//   quantized per 32 values to int8 codes (quantize_x_q8's rounding, once per product by
//   kv_quantize_q8 into the runtime's scratch), integer dot products per 32 columns, scaled in
//   f32. This is what makes prefill on the GPU agree with the CPU (and
//   llama.cpp) where a top-1 margin is small: the f16 GEMM below rounds x differently.
//   Block tile: KV_GEMM_TILE_ROWS weight rows x KV_GEMM_TILE_TOKENS tokens, K steps of
//   KV_GEMM_TILE_K columns (4 units of 32). Per step thread i writes unit i % 4 of weight row
//   i / 4 into shared memory as 32 int8 codes c and two factors a, b with w = a c + b
//   (Q8Unit<TYPE>: the offset of q4_0 / q5_0 inside the codes, the minimum of q4_1 / q5_1 /
//   K-quants in b), and copies unit i % 4 of token i / 4's codes, d and d * sum(codes). The 8
//   warps (4 x 2) each own 16 rows x 32 tokens: per unit, four mma.m16n8k32 s8 products giving
//   s, the exact int32 dot product of 32 codes, scaled into f32 accumulators as the CPU does:
//   acc = fma(a d_x, s, acc), then acc += b s_x with s_x = d_x times the sum of x's codes
//   (rounded to f16 for q4_1 / q5_1: q8_1_s). Out-of-range rows, tokens and units are zero codes
//   with zero factors. The output goes through shared memory as in the f16 GEMM. q6_K (two scales per 32
//   columns) and the float types have no integer GEMM.
//
// kv_gemm_<type> (prefill, tensor cores, f16; reference: reference::matmul)
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

// ---- Integer GEMV of the quantized types (see the header comment) ----

// n 32-bit words of the bytes at p, which is only 2-byte aligned: aligned loads of the n + 1 words
// around them, funnel-shifted by 0 or 16 bits. Reads up to 4 bytes past p + 4n (the weight
// allocation's padding covers the last block).
template <int N> __device__ __forceinline__ void ld_words_2(const uint8_t* p, uint32_t* out) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(3));
    const uint32_t sh = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 2) * 8;
    uint32_t v[N + 1];
#pragma unroll
    for (int i = 0; i <= N; ++i) v[i] = __ldg(a + i);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __funnelshift_r(v[i], v[i + 1], sh);
}
// n words at a 4-byte aligned p.
template <int N> __device__ __forceinline__ void ld_words_4(const uint8_t* p, uint32_t* out) {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __ldg(reinterpret_cast<const uint32_t*>(p) + i);
}
// n words at a 16-byte aligned p.
template <int N> __device__ __forceinline__ void ld_words_16(const uint8_t* p, uint32_t* out) {
    static_assert(N % 4 == 0, "whole 16-byte pieces");
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
        out[4 * i] = v.x;
        out[4 * i + 1] = v.y;
        out[4 * i + 2] = v.z;
        out[4 * i + 3] = v.w;
    }
}
__device__ __forceinline__ float half_bits(uint32_t h) { return __half2float(__ushort_as_half(static_cast<unsigned short>(h))); }
// d * sum of a quantized 32-block rounded to f16, met by the minimum of q4_1 / q5_1. d is the
// f16-rounded scale; llama.cpp's block_q8_1 (and the CPU fast backend) round the product of the
// unrounded amax / 127 instead, so the two differ by one rounding in some blocks.
__device__ __forceinline__ float q8_1_s(float d, int sum) { return __half2float(__float2half_rn(d * static_cast<float>(sum))); }
// Byte i (0..11, runtime) of the 12 bytes held little-endian in s0, s1, s2.
__device__ __forceinline__ uint32_t byte_of3(uint32_t s0, uint32_t s1, uint32_t s2, uint32_t i) {
    const uint32_t w = i < 4 ? s0 : (i < 8 ? s1 : s2);
    return (w >> (8 * (i & 3))) & 0xFF;
}
// The 6-bit scale and min of sub-block j (runtime) of a q4_K / q5_K block, from its 12 scale
// bytes in s0..s2 (quant.rs scale_min_k4).
__device__ __forceinline__ void scale_min_k4_words(uint32_t j, uint32_t s0, uint32_t s1, uint32_t s2, int& sc, int& m) {
    if (j < 4) {
        sc = static_cast<int>(byte_of3(s0, s1, s2, j) & 63);
        m = static_cast<int>(byte_of3(s0, s1, s2, j + 4) & 63);
    } else {
        const uint32_t hi = byte_of3(s0, s1, s2, j + 4);
        sc = static_cast<int>((hi & 0x0F) | ((byte_of3(s0, s1, s2, j - 4) >> 6) << 4));
        m = static_cast<int>((hi >> 4) | ((byte_of3(s0, s1, s2, j) >> 6) << 4));
    }
}
// Bit i of each nibble-group of h (i = 0..3 of the low 4 bits) moved to bit 4 of byte i.
__device__ __forceinline__ uint32_t spread4(uint32_t h) {
    return ((h << 4) & 0x10u) | ((h << 11) & 0x1000u) | ((h << 18) & 0x100000u) | ((h << 25) & 0x10000000u);
}

// The eight int8x4 words of 32-block b of a quantized token row in shared memory.
__device__ __forceinline__ void x_words(const int8_t* xq, uint32_t b, int* xi) {
    const int4* p = reinterpret_cast<const int4*>(xq + 32 * b);
    const int4 a = p[0];
    const int4 c = p[1];
    xi[0] = a.x; xi[1] = a.y; xi[2] = a.z; xi[3] = a.w;
    xi[4] = c.x; xi[5] = c.y; xi[6] = c.z; xi[7] = c.w;
}

// Per type: what a lane loads for one "lane unit" (LU) of a row, how, and its dot product with
// the quantized activation. A legacy block type's LU is one block (32 columns); a K-quant's LU is
// two of its eight 32-column sub-blocks (64 columns, a quarter of a super-block), so that a
// 4096-column row keeps all 32 lanes busy.
template <int TYPE> struct Q8Gemv;

// q4_0, 18 bytes (2-byte aligned): d f16, 16 bytes of nibbles; element i low nibble of qs[i],
// element i + 16 high nibble. w = d (q - 8).
template <> struct Q8Gemv<KV_TYPE_Q4_0> {
    static constexpr int lu_units = 1, unroll = 2;
    struct Loaded { uint32_t d, qs[4]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 18 * static_cast<size_t>(lu);
        l.d = ld_u16(b);
        ld_words_2<4>(b + 2, l.qs);
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        int xi[8];
        x_words(xq, lu, xi);
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            s = __dp4a(static_cast<int>(l.qs[k] & 0x0F0F0F0Fu), xi[k], s);
            s = __dp4a(static_cast<int>((l.qs[k] >> 4) & 0x0F0F0F0Fu), xi[k + 4], s);
        }
        const KvQ8Sum x = xs[lu];
        return (half_bits(l.d) * x.d) * static_cast<float>(s - 8 * x.sum);
    }
};

// q4_1, 20 bytes (4-byte aligned): d, m f16, nibbles as q4_0. w = d q + m.
template <> struct Q8Gemv<KV_TYPE_Q4_1> {
    static constexpr int lu_units = 1, unroll = 2;
    struct Loaded { uint32_t dm, qs[4]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 20 * static_cast<size_t>(lu);
        uint32_t v[5];
        ld_words_4<5>(b, v);
        l.dm = v[0];
#pragma unroll
        for (int k = 0; k < 4; ++k) l.qs[k] = v[k + 1];
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        int xi[8];
        x_words(xq, lu, xi);
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            s = __dp4a(static_cast<int>(l.qs[k] & 0x0F0F0F0Fu), xi[k], s);
            s = __dp4a(static_cast<int>((l.qs[k] >> 4) & 0x0F0F0F0Fu), xi[k + 4], s);
        }
        const KvQ8Sum x = xs[lu];
        return (half_bits(l.dm) * x.d) * static_cast<float>(s) + half_bits(l.dm >> 16) * q8_1_s(x.d, x.sum);
    }
};

// The sum over a 32-block of q5 codes (nibbles of qs plus the fifth bit from qh) times x codes.
__device__ __forceinline__ int dot_q5(const uint32_t* qs, uint32_t qh, const int* xi) {
    int s = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const uint32_t lo = (qs[k] & 0x0F0F0F0Fu) | spread4(qh >> (4 * k));
        const uint32_t hi = ((qs[k] >> 4) & 0x0F0F0F0Fu) | spread4(qh >> (4 * k + 16));
        s = __dp4a(static_cast<int>(lo), xi[k], s);
        s = __dp4a(static_cast<int>(hi), xi[k + 4], s);
    }
    return s;
}

// q5_0, 22 bytes (2-byte aligned): d f16, qh u32 (bit j = fifth bit of element j), nibbles as
// q4_0. w = d (q - 16).
template <> struct Q8Gemv<KV_TYPE_Q5_0> {
    static constexpr int lu_units = 1, unroll = 2;
    struct Loaded { uint32_t d, qh, qs[4]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 22 * static_cast<size_t>(lu);
        uint32_t v[5];
        l.d = ld_u16(b);
        ld_words_2<5>(b + 2, v);
        l.qh = v[0];
#pragma unroll
        for (int k = 0; k < 4; ++k) l.qs[k] = v[k + 1];
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        int xi[8];
        x_words(xq, lu, xi);
        const int s = dot_q5(l.qs, l.qh, xi);
        const KvQ8Sum x = xs[lu];
        return (half_bits(l.d) * x.d) * static_cast<float>(s - 16 * x.sum);
    }
};

// q5_1, 24 bytes (8-byte aligned): d, m f16, qh u32, nibbles. w = d q + m.
template <> struct Q8Gemv<KV_TYPE_Q5_1> {
    static constexpr int lu_units = 1, unroll = 2;
    struct Loaded { uint32_t dm, qh, qs[4]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint2* b = reinterpret_cast<const uint2*>(row + 24 * static_cast<size_t>(lu));
        const uint2 a = __ldg(b), c = __ldg(b + 1), e = __ldg(b + 2);
        l.dm = a.x;
        l.qh = a.y;
        l.qs[0] = c.x; l.qs[1] = c.y; l.qs[2] = e.x; l.qs[3] = e.y;
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        int xi[8];
        x_words(xq, lu, xi);
        const int s = dot_q5(l.qs, l.qh, xi);
        const KvQ8Sum x = xs[lu];
        return (half_bits(l.dm) * x.d) * static_cast<float>(s) + half_bits(l.dm >> 16) * q8_1_s(x.d, x.sum);
    }
};

// q8_0, 34 bytes (2-byte aligned): d f16, 32 int8 codes. w = d q.
template <> struct Q8Gemv<KV_TYPE_Q8_0> {
    static constexpr int lu_units = 1, unroll = 2;
    struct Loaded { uint32_t d, qs[8]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 34 * static_cast<size_t>(lu);
        l.d = ld_u16(b);
        ld_words_2<8>(b + 2, l.qs);
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        int xi[8];
        x_words(xq, lu, xi);
        int s = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) s = __dp4a(static_cast<int>(l.qs[k]), xi[k], s);
        return (half_bits(l.d) * xs[lu].d) * static_cast<float>(s);
    }
};

// q4_K, 144 bytes (16-byte aligned). LU c (0..3) of super-block g: sub-blocks 2c (low nibbles of
// qs[32c..32c+32]) and 2c + 1 (high nibbles); x blocks 8g + 2c and 8g + 2c + 1.
// w = d sc q - dmin m per sub-block.
template <> struct Q8Gemv<KV_TYPE_Q4_K> {
    static constexpr int lu_units = 2, unroll = 2;
    struct Loaded { uint32_t head[4], qs[8]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 144 * static_cast<size_t>(lu / 4);
        ld_words_16<4>(b, l.head);
        ld_words_16<8>(b + 16 + 32 * (lu % 4), l.qs);
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        const uint32_t c = lu % 4;
        const uint32_t b0 = 8 * (lu / 4) + 2 * c;
        int sc0, m0, sc1, m1;
        scale_min_k4_words(2 * c, l.head[1], l.head[2], l.head[3], sc0, m0);
        scale_min_k4_words(2 * c + 1, l.head[1], l.head[2], l.head[3], sc1, m1);
        int x0[8], x1[8];
        x_words(xq, b0, x0);
        x_words(xq, b0 + 1, x1);
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            s0 = __dp4a(static_cast<int>(l.qs[k] & 0x0F0F0F0Fu), x0[k], s0);
            s1 = __dp4a(static_cast<int>((l.qs[k] >> 4) & 0x0F0F0F0Fu), x1[k], s1);
        }
        const KvQ8Sum a = xs[b0], e = xs[b0 + 1];
        const float dot_sc = a.d * static_cast<float>(sc0 * s0) + e.d * static_cast<float>(sc1 * s1);
        const float dot_m = a.d * static_cast<float>(m0 * a.sum) + e.d * static_cast<float>(m1 * e.sum);
        return half_bits(l.head[0]) * dot_sc - half_bits(l.head[0] >> 16) * dot_m;
    }
};

// q5_K, 176 bytes (16-byte aligned): as q4_K with qs at 48 and the fifth bit of element l of
// sub-block s in bit s of qh[l] (qh at 16..48).
template <> struct Q8Gemv<KV_TYPE_Q5_K> {
    static constexpr int lu_units = 2, unroll = 2;
    struct Loaded { uint32_t head[4], qh[8], qs[8]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 176 * static_cast<size_t>(lu / 4);
        ld_words_16<4>(b, l.head);
        ld_words_16<8>(b + 16, l.qh);
        ld_words_16<8>(b + 48 + 32 * (lu % 4), l.qs);
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        const uint32_t c = lu % 4;
        const uint32_t b0 = 8 * (lu / 4) + 2 * c;
        int sc0, m0, sc1, m1;
        scale_min_k4_words(2 * c, l.head[1], l.head[2], l.head[3], sc0, m0);
        scale_min_k4_words(2 * c + 1, l.head[1], l.head[2], l.head[3], sc1, m1);
        int x0[8], x1[8];
        x_words(xq, b0, x0);
        x_words(xq, b0 + 1, x1);
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const uint32_t lo = (l.qs[k] & 0x0F0F0F0Fu) | (((l.qh[k] >> (2 * c)) & 0x01010101u) << 4);
            const uint32_t hi = ((l.qs[k] >> 4) & 0x0F0F0F0Fu) | (((l.qh[k] >> (2 * c + 1)) & 0x01010101u) << 4);
            s0 = __dp4a(static_cast<int>(lo), x0[k], s0);
            s1 = __dp4a(static_cast<int>(hi), x1[k], s1);
        }
        const KvQ8Sum a = xs[b0], e = xs[b0 + 1];
        const float dot_sc = a.d * static_cast<float>(sc0 * s0) + e.d * static_cast<float>(sc1 * s1);
        const float dot_m = a.d * static_cast<float>(m0 * a.sum) + e.d * static_cast<float>(m1 * e.sum);
        return half_bits(l.head[0]) * dot_sc - half_bits(l.head[0] >> 16) * dot_m;
    }
};

// q6_K, 210 bytes (2-byte aligned). LU j = 2h + kk (0..3) of super-block g: half h, quarters
// k = kk and kk + 2, which share ql[64h + 32kk ..+32] (low nibbles for kk, high for kk + 2) and
// qh[32h ..+32] (bits 2kk and 2kk + 4); sub-block scales scales[8h + 2k] for l < 16 and
// scales[8h + 2k + 1] for l >= 16; x blocks 8g + 4h + k. w = d sc (q - 32).
template <> struct Q8Gemv<KV_TYPE_Q6_K> {
    static constexpr int lu_units = 2, unroll = 1;
    struct Loaded { uint32_t d, sc[2], ql[8], qh[8]; };
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t lu, Loaded& l) {
        const uint8_t* b = row + 210 * static_cast<size_t>(lu / 4);
        const uint32_t j = lu % 4;
        const uint32_t h = j / 2, kk = j % 2;
        ld_words_2<8>(b + 64 * h + 32 * kk, l.ql);
        ld_words_2<8>(b + 128 + 32 * h, l.qh);
        ld_words_2<2>(b + 192 + 8 * h, l.sc);
        l.d = ld_u16(b + 208);
    }
    static __device__ __forceinline__ float dot(const Loaded& l, const int8_t* xq, const KvQ8Sum* xs, uint32_t lu) {
        const uint32_t j = lu % 4;
        const uint32_t h = j / 2, kk = j % 2;
        const uint32_t b0 = 8 * (lu / 4) + 4 * h + kk;
        // Scales of quarter kk (bytes 2kk, 2kk + 1 of sc[0]) and kk + 2 (the same bytes of sc[1]).
        const int sa0 = static_cast<int8_t>((l.sc[0] >> (16 * kk)) & 0xFF);
        const int sa1 = static_cast<int8_t>((l.sc[0] >> (16 * kk + 8)) & 0xFF);
        const int sb0 = static_cast<int8_t>((l.sc[1] >> (16 * kk)) & 0xFF);
        const int sb1 = static_cast<int8_t>((l.sc[1] >> (16 * kk + 8)) & 0xFF);
        int xa[8], xb[8];
        x_words(xq, b0, xa);
        x_words(xq, b0 + 2, xb);
        int a0 = 0, a1 = 0, c0 = 0, c1 = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const uint32_t qa = (l.ql[k] & 0x0F0F0F0Fu) | (((l.qh[k] >> (2 * kk)) & 0x03030303u) << 4);
            const uint32_t qb = ((l.ql[k] >> 4) & 0x0F0F0F0Fu) | (((l.qh[k] >> (2 * kk + 4)) & 0x03030303u) << 4);
            // Codes 0..63 minus 32, per byte: -32..31 as signed bytes.
            const int va = static_cast<int>(__vsub4(qa, 0x20202020u));
            const int vb = static_cast<int>(__vsub4(qb, 0x20202020u));
            if (k < 4) {
                a0 = __dp4a(va, xa[k], a0);
                c0 = __dp4a(vb, xb[k], c0);
            } else {
                a1 = __dp4a(va, xa[k], a1);
                c1 = __dp4a(vb, xb[k], c1);
            }
        }
        const float dot = xs[b0].d * static_cast<float>(sa0 * a0 + sa1 * a1) + xs[b0 + 2].d * static_cast<float>(sb0 * c0 + sb1 * c1);
        return half_bits(l.d) * dot;
    }
};

// Quantizes x [n_tokens, n_cols] into codes xq [n_tokens, n_cols] and sums xs [n_tokens,
// n_cols / 32], one 32-block per thread (blocks first, first + stride, ...), as the CPU fast
// backend's quantize_q8 does: q = rint(x * (127 / amax)), d = f16(amax / 127), sum = sum of q.
__device__ __forceinline__ void quantize_x_q8(const float* __restrict__ x, uint32_t n_cols, uint32_t n_tokens, int8_t* xq, KvQ8Sum* xs,
                                              uint32_t first, uint32_t stride) {
    const uint32_t nb = n_cols / KV_UNIT_ELEMS;
    for (uint32_t i = first; i < n_tokens * nb; i += stride) {
        const uint32_t t = i / nb;
        const uint32_t b = i % nb;
        const float4* src = reinterpret_cast<const float4*>(x + static_cast<size_t>(t) * n_cols + KV_UNIT_ELEMS * b);
        float v[32];
#pragma unroll
        for (int g = 0; g < 8; ++g) {
            const float4 f = __ldg(src + g);
            v[4 * g] = f.x;
            v[4 * g + 1] = f.y;
            v[4 * g + 2] = f.z;
            v[4 * g + 3] = f.w;
        }
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(v[k]));
        const float id = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
        int sum = 0;
        uint32_t packed[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            packed[k] = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int q = __float2int_rn(__fmul_rn(v[4 * k + e], id));
                sum += q;
                packed[k] |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * e);
            }
        }
        int4* dst = reinterpret_cast<int4*>(xq + static_cast<size_t>(t) * n_cols + KV_UNIT_ELEMS * b);
        dst[0] = make_int4(packed[0], packed[1], packed[2], packed[3]);
        dst[1] = make_int4(packed[4], packed[5], packed[6], packed[7]);
        xs[static_cast<size_t>(t) * nb + b] = KvQ8Sum{__half2float(__float2half_rn(__fdiv_rn(amax, 127.0f))), sum};
    }
}

template <int TYPE, int NT>
__device__ __forceinline__ void gemv_q8(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                        const KvMatmulParams& p) {
    using F = Q8Gemv<TYPE>;
    constexpr int R = KV_GEMV_Q8_ROWS_PER_WARP;
    constexpr int U = F::unroll;
    extern __shared__ __align__(16) uint8_t gemv_smem[];
    const uint32_t n_tokens = p.n_tokens;
    const uint32_t nb = p.n_cols / KV_UNIT_ELEMS;
    int8_t* xq = reinterpret_cast<int8_t*>(gemv_smem);
    KvQ8Sum* xs = reinterpret_cast<KvQ8Sum*>(gemv_smem + static_cast<size_t>(n_tokens) * p.n_cols);

    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const uint32_t n_lu = nb / F::lu_units;
    constexpr uint32_t STEP = U * kWarpSize;
    // Row group g (KV_GEMV_Q8_WARPS * R rows) is block g's, then block g + gridDim.x's, ...: the
    // grid is at most what the device holds at once, so x is quantized once per resident block.
    auto first_row = [&](uint32_t g) -> uint32_t { return (g * KV_GEMV_Q8_WARPS + warp) * R; };
    // Rows past the end read row0 again (always in bounds) and are never written.
    auto set_rows = [&](uint32_t r0, const uint8_t* (&rows)[R]) {
#pragma unroll
        for (int r = 0; r < R; ++r) rows[r] = w + static_cast<size_t>(r0 + r < p.n_rows ? r0 + r : r0) * p.row_bytes;
    };
    // The loads of one step: LU base + u * 32 + lane of each row; an LU past the row's end loads
    // the row's last LU again (in bounds, discarded).
    auto load_step = [&](const uint8_t* const (&rows)[R], uint32_t base, typename F::Loaded (&ld)[U][R]) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint32_t lu = min(base + u * kWarpSize + lane, n_lu - 1);
#pragma unroll
            for (int r = 0; r < R; ++r) F::load(rows[r], lu, ld[u][r]);
        }
    };
    // The first step's weights are requested before x is quantized, so their latency overlaps
    // the prologue; every later step's loads (the next group's first step after a group's last)
    // are issued before the current step's dot products.
    uint32_t group = blockIdx.x;
    uint32_t row0 = first_row(group);
    const uint8_t* rows[R];
    set_rows(row0 < p.n_rows ? row0 : 0, rows);
    typename F::Loaded cur[U][R];
    if (row0 < p.n_rows) {
        load_step(rows, 0, cur);
    }
    quantize_x_q8(x, p.n_cols, n_tokens, xq, xs, threadIdx.x, blockDim.x);
    __syncthreads();
    while (row0 < p.n_rows) {
        const uint32_t next_group = group + gridDim.x;
        const uint32_t next_row0 = first_row(next_group);
        const bool has_next = next_row0 < p.n_rows;
        const uint8_t* next_rows[R];
        set_rows(has_next ? next_row0 : row0, next_rows);
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
        }
        for (uint32_t base = 0; base < n_lu; base += STEP) {
            const bool more = base + STEP < n_lu;
            typename F::Loaded next[U][R];
            if (more) {
                load_step(rows, base + STEP, next);
            } else if (has_next) {
                load_step(next_rows, 0, next);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint32_t lu = base + u * kWarpSize + lane;
                if (lu < n_lu) {
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        if (t < static_cast<int>(n_tokens)) {
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                acc[r][t] += F::dot(cur[u][r], xq + static_cast<size_t>(t) * p.n_cols, xs + static_cast<size_t>(t) * nb, lu);
                            }
                        }
                    }
                }
            }
            if (more || has_next) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
#pragma unroll
                    for (int r = 0; r < R; ++r) cur[u][r] = next[u][r];
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const float s = warp_sum(acc[r][t]);
                if (lane == 0 && row0 + r < p.n_rows && t < static_cast<int>(n_tokens)) {
                    y[static_cast<size_t>(t) * p.n_rows + row0 + r] = s;
                }
            }
        }
        group = next_group;
        row0 = next_row0;
#pragma unroll
        for (int r = 0; r < R; ++r) rows[r] = next_rows[r];
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

// ---- Integer tensor-core GEMM of the quantized types (prefill; see the header comment) ----

// Per type: unit u (32 columns) of a row as 32 int8 codes c (byte i of c[i / 4] is element i)
// and two f32 factors with w[i] = a c[i] + b, the dequantization of quant.rs rewritten around
// integer codes: q4_0 / q5_0 / q8_0 keep their offset in the codes (b = 0, has_min false, and
// the GEMM skips the b term), q4_1 / q5_1 and the K-quants keep it in b (their minimum, or
// -dmin m).
template <int TYPE> struct Q8Unit;

template <> struct Q8Unit<KV_TYPE_Q8_0> {
    static constexpr bool has_min = false;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint8_t* blk = row + 34 * static_cast<size_t>(u);
        a = ld_f16(blk);
        b = 0.0f;
        ld_words_2<8>(blk + 2, c);
    }
};

template <> struct Q8Unit<KV_TYPE_Q4_0> {
    static constexpr bool has_min = false;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint8_t* blk = row + 18 * static_cast<size_t>(u);
        a = ld_f16(blk);
        b = 0.0f;
        uint32_t qs[4];
        ld_words_2<4>(blk + 2, qs);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            c[k] = __vsub4(qs[k] & 0x0F0F0F0Fu, 0x08080808u);
            c[k + 4] = __vsub4((qs[k] >> 4) & 0x0F0F0F0Fu, 0x08080808u);
        }
    }
};

template <> struct Q8Unit<KV_TYPE_Q4_1> {
    static constexpr bool has_min = true;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        uint32_t v[5];
        ld_words_4<5>(row + 20 * static_cast<size_t>(u), v);
        a = half_bits(v[0]);
        b = half_bits(v[0] >> 16);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            c[k] = v[k + 1] & 0x0F0F0F0Fu;
            c[k + 4] = (v[k + 1] >> 4) & 0x0F0F0F0Fu;
        }
    }
};

// The 5-bit codes of a q5 block: nibbles of qs plus the fifth bit of element j from bit j of qh.
__device__ __forceinline__ void codes_q5(const uint32_t* qs, uint32_t qh, uint32_t (&c)[8]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        c[k] = (qs[k] & 0x0F0F0F0Fu) | spread4(qh >> (4 * k));
        c[k + 4] = ((qs[k] >> 4) & 0x0F0F0F0Fu) | spread4(qh >> (4 * k + 16));
    }
}

template <> struct Q8Unit<KV_TYPE_Q5_0> {
    static constexpr bool has_min = false;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint8_t* blk = row + 22 * static_cast<size_t>(u);
        a = ld_f16(blk);
        b = 0.0f;
        uint32_t v[5];
        ld_words_2<5>(blk + 2, v);
        codes_q5(v + 1, v[0], c);
#pragma unroll
        for (int k = 0; k < 8; ++k) c[k] = __vsub4(c[k], 0x10101010u);
    }
};

template <> struct Q8Unit<KV_TYPE_Q5_1> {
    static constexpr bool has_min = true;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint2* blk = reinterpret_cast<const uint2*>(row + 24 * static_cast<size_t>(u));
        const uint2 h = __ldg(blk), q0 = __ldg(blk + 1), q1 = __ldg(blk + 2);
        a = half_bits(h.x);
        b = half_bits(h.x >> 16);
        const uint32_t qs[4] = {q0.x, q0.y, q1.x, q1.y};
        codes_q5(qs, h.y, c);
    }
};

// q4_K sub-block s = u % 8 of super-block u / 8: chunk s / 2 of qs, low nibbles for even s.
template <> struct Q8Unit<KV_TYPE_Q4_K> {
    static constexpr bool has_min = true;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint8_t* blk = row + 144 * static_cast<size_t>(u / 8);
        const uint32_t s = u % 8;
        uint32_t head[4], qs[8];
        ld_words_16<4>(blk, head);
        ld_words_16<8>(blk + 16 + 32 * (s / 2), qs);
        int sc, m;
        scale_min_k4_words(s, head[1], head[2], head[3], sc, m);
        a = __fmul_rn(half_bits(head[0]), static_cast<float>(sc));
        b = -__fmul_rn(half_bits(head[0] >> 16), static_cast<float>(m));
        const int shift = 4 * (s & 1);
#pragma unroll
        for (int k = 0; k < 8; ++k) c[k] = (qs[k] >> shift) & 0x0F0F0F0Fu;
    }
};

// q5_K: as q4_K, the fifth bit of element l of sub-block s in bit s of qh[l].
template <> struct Q8Unit<KV_TYPE_Q5_K> {
    static constexpr bool has_min = true;
    static __device__ __forceinline__ void load(const uint8_t* row, uint32_t u, uint32_t (&c)[8], float& a, float& b) {
        const uint8_t* blk = row + 176 * static_cast<size_t>(u / 8);
        const uint32_t s = u % 8;
        uint32_t head[4], qh[8], qs[8];
        ld_words_16<4>(blk, head);
        ld_words_16<8>(blk + 16, qh);
        ld_words_16<8>(blk + 48 + 32 * (s / 2), qs);
        int sc, m;
        scale_min_k4_words(s, head[1], head[2], head[3], sc, m);
        a = __fmul_rn(half_bits(head[0]), static_cast<float>(sc));
        b = -__fmul_rn(half_bits(head[0] >> 16), static_cast<float>(m));
        const int shift = 4 * (s & 1);
#pragma unroll
        for (int k = 0; k < 8; ++k) c[k] = ((qs[k] >> shift) & 0x0F0F0F0Fu) | (((qh[k] >> s) & 0x01010101u) << 4);
    }
};

// d[0..3] += A (16x32, row-major, int8) . B (32x8, column-major, int8), exact int32. Lane l =
// 4 g + q holds a0 = A[g][4q..], a1 = A[g + 8][4q..], a2 = A[g][16 + 4q..], a3 = A[g + 8][16 +
// 4q..], b0 = B[4q..][g], b1 = B[16 + 4q..][g], and gets D[g][2q], D[g][2q + 1], D[g + 8][2q],
// D[g + 8][2q + 1].
__device__ __forceinline__ void mma_s8_16x8x32(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int TYPE>
__device__ __forceinline__ void gemm_q8(const uint8_t* __restrict__ w, const int8_t* __restrict__ xq, const KvQ8Sum* __restrict__ xsum,
                                        float* __restrict__ y, const KvMatmulParams& p) {
    constexpr int TR = KV_GEMM_TILE_ROWS;
    constexpr int TT = KV_GEMM_TILE_TOKENS;
    constexpr int TK = KV_GEMM_TILE_K;
    constexpr int UNITS = TK / KV_UNIT_ELEMS;  // units per row per K step
    constexpr int LDQ = TK + 16;               // bytes per tile row: 16-byte aligned, banks shifted by 4 words
    constexpr int LDC = TT + 4;                // floats per row of the output staging
    static_assert(TR * UNITS == KV_GEMM_THREADS && TT * UNITS == KV_GEMM_THREADS, "one unit of each tile per thread");
    static_assert(TR * LDC * 4 <= (TR + TT) * LDQ, "the output staging fits in the code tiles");
    // q4_1 / q5_1 meet x's code sums as the f16 d * sum (q8_1_s).
    constexpr bool kQ8_1 = TYPE == KV_TYPE_Q4_1 || TYPE == KV_TYPE_Q5_1;
    __shared__ __align__(16) int8_t codes[(TR + TT) * LDQ];
    __shared__ float wa[TR * UNITS], wb[TR * UNITS], xd[TT * UNITS], xs[TT * UNITS];
    int8_t* Aq = codes;             // [TR][LDQ]: W codes, row-major
    int8_t* Bq = codes + TR * LDQ;  // [TT][LDQ]: x codes, token-major
    float* Cs = reinterpret_cast<float*>(codes);  // [TR][LDC], after the K loop

    const int tid = threadIdx.x;
    const int lane = tid % kWarpSize;
    const int warp = tid / kWarpSize;
    const int g = lane / 4;
    const int q = lane % 4;
    const int wr = warp % 4;  // 16-row slice of the tile
    const int wc = warp / 4;  // 32-token slice of the tile
    const uint32_t r0 = blockIdx.x * TR;
    const uint32_t t0 = blockIdx.y * TT;
    const uint32_t n_units = p.n_cols / KV_UNIT_ELEMS;
    const int tile_row = tid / UNITS;
    const int tile_unit = tid % UNITS;

    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
    }

    for (uint32_t u0 = 0; u0 < n_units; u0 += UNITS) {
        const uint32_t u = u0 + tile_unit;
        __syncthreads();
        {
            // W: unit u of row r0 + tile_row.
            const uint32_t row = r0 + tile_row;
            uint32_t c[8];
            float a = 0.0f, b = 0.0f;
            if (row < p.n_rows && u < n_units) {
                Q8Unit<TYPE>::load(w + static_cast<size_t>(row) * p.row_bytes, u, c, a, b);
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) c[k] = 0;
            }
            int4* dst = reinterpret_cast<int4*>(Aq + tile_row * LDQ + tile_unit * KV_UNIT_ELEMS);
            dst[0] = make_int4(c[0], c[1], c[2], c[3]);
            dst[1] = make_int4(c[4], c[5], c[6], c[7]);
            wa[tile_row * UNITS + tile_unit] = a;
            wb[tile_row * UNITS + tile_unit] = b;
        }
        {
            // x: the codes of unit u of token t0 + tile_row, with d and d * sum(codes).
            const uint32_t tok = t0 + tile_row;
            int4 c0 = make_int4(0, 0, 0, 0), c1 = c0;
            float d = 0.0f, ds = 0.0f;
            if (tok < p.n_tokens && u < n_units) {
                const int4* src = reinterpret_cast<const int4*>(xq + static_cast<size_t>(tok) * p.n_cols + static_cast<size_t>(u) * KV_UNIT_ELEMS);
                c0 = __ldg(src);
                c1 = __ldg(src + 1);
                const KvQ8Sum xb = xsum[static_cast<size_t>(tok) * n_units + u];
                d = xb.d;
                ds = kQ8_1 ? q8_1_s(xb.d, xb.sum) : xb.d * static_cast<float>(xb.sum);
            }
            int4* dst = reinterpret_cast<int4*>(Bq + tile_row * LDQ + tile_unit * KV_UNIT_ELEMS);
            dst[0] = c0;
            dst[1] = c1;
            xd[tile_row * UNITS + tile_unit] = d;
            xs[tile_row * UNITS + tile_unit] = ds;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < UNITS; ++k) {
            const int ra = wr * 16 + g;
            const int8_t* ap = Aq + ra * LDQ + k * KV_UNIT_ELEMS + 4 * q;
            const uint32_t af[4] = {
                *reinterpret_cast<const uint32_t*>(ap),
                *reinterpret_cast<const uint32_t*>(ap + 8 * LDQ),
                *reinterpret_cast<const uint32_t*>(ap + 16),
                *reinterpret_cast<const uint32_t*>(ap + 8 * LDQ + 16),
            };
            const float a0 = wa[ra * UNITS + k], b0 = wb[ra * UNITS + k];
            const float a1 = wa[(ra + 8) * UNITS + k], b1 = wb[(ra + 8) * UNITS + k];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tb = wc * 32 + j * 8;
                const int8_t* bp = Bq + (tb + g) * LDQ + k * KV_UNIT_ELEMS + 4 * q;
                int dsum[4] = {0, 0, 0, 0};
                mma_s8_16x8x32(dsum, af, *reinterpret_cast<const uint32_t*>(bp), *reinterpret_cast<const uint32_t*>(bp + 16));
                const int tc = tb + 2 * q;
                const float d0 = xd[tc * UNITS + k], s0 = xs[tc * UNITS + k];
                const float d1 = xd[(tc + 1) * UNITS + k], s1 = xs[(tc + 1) * UNITS + k];
                acc[j][0] = fmaf(a0 * d0, static_cast<float>(dsum[0]), acc[j][0]);
                acc[j][1] = fmaf(a0 * d1, static_cast<float>(dsum[1]), acc[j][1]);
                acc[j][2] = fmaf(a1 * d0, static_cast<float>(dsum[2]), acc[j][2]);
                acc[j][3] = fmaf(a1 * d1, static_cast<float>(dsum[3]), acc[j][3]);
                if constexpr (Q8Unit<TYPE>::has_min) {
                    acc[j][0] += b0 * s0;
                    acc[j][1] += b0 * s1;
                    acc[j][2] += b1 * s0;
                    acc[j][3] += b1 * s1;
                }
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int rr = wr * 16 + g;
        const int tc = wc * 32 + j * 8 + 2 * q;
        Cs[rr * LDC + tc] = acc[j][0];
        Cs[rr * LDC + tc + 1] = acc[j][1];
        Cs[(rr + 8) * LDC + tc] = acc[j][2];
        Cs[(rr + 8) * LDC + tc + 1] = acc[j][3];
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

// GEMV kernels: the staged f32 GEMV for the float types, the integer GEMV for the quantized ones.
#define KV_GEMV_KERNELS(NAME, TYPE, IMPL, THREADS)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        kv_gemv_##NAME##_t1(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, \
                            KvMatmulParams p) {                                                             \
        kv::IMPL<TYPE, 1>(w, x, y, p);                                                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                    \
        kv_gemv_##NAME##_t4(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, \
                            KvMatmulParams p) {                                                             \
        kv::IMPL<TYPE, KV_GEMV_MAX_TOKENS>(w, x, y, p);                                                     \
    }

#define KV_GEMM_KERNEL(NAME, TYPE)                                                                          \
    extern "C" __global__ void __launch_bounds__(KV_GEMM_THREADS)                                          \
        kv_gemm_##NAME(const uint8_t* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,    \
                       KvMatmulParams p) {                                                                  \
        kv::gemm<TYPE>(w, x, y, p);                                                                         \
    }

#define KV_GEMM_Q8_KERNEL(NAME, TYPE)                                                                       \
    extern "C" __global__ void __launch_bounds__(KV_GEMM_THREADS, 2)                                       \
        kv_gemm_q8_##NAME(const uint8_t* __restrict__ w, const int8_t* __restrict__ xq,                      \
                          const KvQ8Sum* __restrict__ xs, float* __restrict__ y, KvMatmulParams p) {        \
        kv::gemm_q8<TYPE>(w, xq, xs, y, p);                                                                 \
    }

#define KV_FLOAT_KERNELS(NAME, TYPE) KV_GEMV_KERNELS(NAME, TYPE, gemv, KV_GEMV_WARPS * 32) KV_GEMM_KERNEL(NAME, TYPE)
#define KV_QUANT_KERNELS(NAME, TYPE) KV_GEMV_KERNELS(NAME, TYPE, gemv_q8, KV_GEMV_Q8_WARPS * 32) KV_GEMM_KERNEL(NAME, TYPE)
#define KV_QUANT_KERNELS_MMQ(NAME, TYPE) KV_QUANT_KERNELS(NAME, TYPE) KV_GEMM_Q8_KERNEL(NAME, TYPE)

KV_FLOAT_KERNELS(f32, KV_TYPE_F32)
KV_FLOAT_KERNELS(f16, KV_TYPE_F16)
KV_FLOAT_KERNELS(bf16, KV_TYPE_BF16)
KV_QUANT_KERNELS_MMQ(q8_0, KV_TYPE_Q8_0)
KV_QUANT_KERNELS_MMQ(q4_0, KV_TYPE_Q4_0)
KV_QUANT_KERNELS_MMQ(q4_1, KV_TYPE_Q4_1)
KV_QUANT_KERNELS_MMQ(q5_0, KV_TYPE_Q5_0)
KV_QUANT_KERNELS_MMQ(q5_1, KV_TYPE_Q5_1)
KV_QUANT_KERNELS_MMQ(q4_k, KV_TYPE_Q4_K)
KV_QUANT_KERNELS_MMQ(q5_k, KV_TYPE_Q5_K)
KV_QUANT_KERNELS(q6_k, KV_TYPE_Q6_K)

// x [n_tokens, n_cols] quantized for the integer GEMM: codes xq [n_tokens, n_cols] and sums xs
// [n_tokens, n_cols / 32], the integer GEMV's quantization (grid-stride over the 32-blocks).
extern "C" __global__ void __launch_bounds__(KV_QUANTIZE_THREADS)
    kv_quantize_q8(const float* __restrict__ x, int8_t* __restrict__ xq, KvQ8Sum* __restrict__ xs, KvMatmulParams p) {
    kv::quantize_x_q8(x, p.n_cols, p.n_tokens, xq, xs, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x);
}

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
