// Per-token layer kernels on f32 activations: rmsnorm, rope, silu_mul, add, argmax.
//
// All buffers are contiguous, row-major f32 (argmax writes uint32 indices). Parameter structs
// are in ffi/layers.h; the Rust wrappers (src/backend/cuda/layers.rs) validate shapes, pick the
// launch configuration and name the kernel in errors. Each kernel matches one function of
// src/backend/cpu/reference.rs, checked by src/backend/cuda/selftest.rs.
//
// kv_rmsnorm_f32(x, w, out, KvRmsnormParams)                     -> reference::rmsnorm
//   x, out [n_rows, dim], w [dim]: out = x * (1 / sqrt(mean(x^2) + eps)) * w.
//   One block per row; the block size is a multiple of 32 up to 1024. The sum of squares is
//   accumulated in f32 (each thread over a strided slice, then block_sum); the reference uses
//   f64, and the difference is bounded in selftest.rs. When dim % 4 == 0 and every pointer is
//   16-byte aligned the row is read and written as float4. The second pass re-reads x, which
//   hits L1/L2 for any realistic dim. out must not overlap x or w.
// kv_rmsnorm_naive_f32: the same with scalar loads only; the benchmark baseline.
//
// kv_rope_f32(x, freq_factors, KvRopeParams)                      -> reference::rope
//   In place on x [n_tokens, n_heads, head_dim]; token t sits at position pos0 + t. Pair i of
//   each head (i < n_rot / 2) rotates by theta = pos * freq_base^(-2i / n_rot) / factor[i]:
//   Norm style pairs (2i, 2i + 1), Neox style (i, i + n_rot / 2). Dimensions from n_rot to
//   head_dim are left untouched.
//   One block per token. The block first computes cos/sin of the n_rot / 2 angles into shared
//   memory (dynamic, n_rot floats), then its threads stride over the n_heads * n_rot / 2 pairs,
//   consecutive threads on consecutive pairs of one head. The angle is computed in double
//   precision, as the reference does: in f32 the angle pos * inv_freq at pos ~4096 is only
//   known to ~5e-4 rad, which would make the rotated values disagree with the reference in the
//   fourth digit. It costs n_rot / 2 double pow/sincos per token, negligible next to the
//   memory traffic even on GPUs with slow f64. The rotation itself is f32.
//   The wrapper checks n_rot is even, n_rot <= head_dim, and n_rot floats fit in shared memory.
//
// kv_silu_mul_f32(gate, up, KvElementwiseParams)                  -> reference::silu_mul
//   In place, both [n]: gate = gate / (1 + exp(-gate)) * up, in the reference's operation
//   order. Each thread handles 4 consecutive elements: as one float4 when both pointers are
//   16-byte aligned and all 4 are in range, else element by element.
//
// kv_add_f32(x, y, KvElementwiseParams)                           -> reference::add
//   In place, both [n]: x += y. Same tiling as silu_mul. Exact: IEEE addition rounds the same
//   way on both sides.
//
// kv_argmax_f32(x, out, KvArgmaxParams)                           -> reference::argmax
//   x [n_rows, n_cols], out [n_rows]: out[r] = index of the largest value of row r, the first
//   one on ties. One block per row (multiple of 32 threads, up to 1024); each thread scans a
//   strided slice (float4 when n_cols % 4 == 0 and x is 16-byte aligned) keeping its first
//   maximum, then (value, index) pairs are reduced preferring the larger value and, on equal
//   values, the smaller index. Rows containing NaN give an unspecified index (the reference's
//   answer there depends on its scan order).
//
// kv_add_bias_f32(x, b, KvBiasParams)                           -> Cpu::add_bias
//   x [n_rows, width] += b [width] per row; one thread per element, grid-stride. Exact.
//
// kv_gather_rows_u32(src, dst, idx, KvRowsParams): dst row i = src row idx[i];
// kv_scatter_rows_u32(src, dst, idx, KvRowsParams): dst row idx[i] = src row i.
//   Rows of row_words 32-bit words (an f16 KV row of head_dim values is head_dim / 2 words); one
//   block per row, threads over its words. Eviction compacts a cache by gathering the surviving
//   rows into a scratch buffer and scattering them back to their new places (two launches, so
//   no row is overwritten before it is read). src and dst must not overlap.
//
// No kernel uses fast-math intrinsics: they are all bound by memory bandwidth, so exact
// division, sqrtf and expf cost nothing measurable and keep the results within a few ulp of
// the reference.

#include <math_constants.h>

#include "common.cuh"
#include "layers.h"

namespace kv {

// rmsnorm of one row by the whole block. VEC selects float4 access; the caller guarantees
// dim % 4 == 0 and 16-byte alignment when VEC is true.
template <bool VEC>
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ xr, const float* __restrict__ w,
                                            float* __restrict__ or_, uint32_t dim, float eps) {
    __shared__ float scratch[kWarpSize];
    float ss = 0.0f;
    if (VEC) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (uint32_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            const float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (uint32_t i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = xr[i];
            ss += v * v;
        }
    }
    ss = block_sum(ss, scratch);
    const float scale = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
    if (VEC) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(or_);
        for (uint32_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            const float4 v = x4[i];
            const float4 g = w4[i];
            o4[i] = make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
        }
    } else {
        for (uint32_t i = threadIdx.x; i < dim; i += blockDim.x) {
            or_[i] = xr[i] * scale * w[i];
        }
    }
}

__device__ __forceinline__ float silu_mul1(float g, float u) {
    const float s = g / (1.0f + expf(-g));
    return s * u;
}

// Is (v2, i2) a better argmax candidate than (v1, i1)? An index equal to n_cols marks an empty
// candidate (a thread that saw no element).
__device__ __forceinline__ bool argmax_better(float v2, uint32_t i2, float v1, uint32_t i1, uint32_t n_cols) {
    if (i2 >= n_cols) {
        return false;
    }
    if (i1 >= n_cols) {
        return true;
    }
    return v2 > v1 || (v2 == v1 && i2 < i1);
}

__device__ __forceinline__ void argmax_take(float v, uint32_t i, float& best_v, uint32_t& best_i,
                                            uint32_t n_cols) {
    if (argmax_better(v, i, best_v, best_i, n_cols)) {
        best_v = v;
        best_i = i;
    }
}

__device__ __forceinline__ void warp_argmax(float& v, uint32_t& i, uint32_t n_cols) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, v, offset);
        const uint32_t oi = __shfl_xor_sync(kFullMask, i, offset);
        argmax_take(ov, oi, v, i, n_cols);
    }
}

}  // namespace kv

extern "C" __global__ void __launch_bounds__(KV_ROW_MAX_THREADS)
    kv_rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                   KvRmsnormParams p) {
    const size_t row = blockIdx.x;
    const float* xr = x + row * p.dim;
    float* or_ = out + row * p.dim;
    const bool vec = p.dim % 4 == 0 && kv::is_aligned16(x) && kv::is_aligned16(w) && kv::is_aligned16(out);
    if (vec) {
        kv::rmsnorm_row<true>(xr, w, or_, p.dim, p.eps);
    } else {
        kv::rmsnorm_row<false>(xr, w, or_, p.dim, p.eps);
    }
}

extern "C" __global__ void __launch_bounds__(KV_ROW_MAX_THREADS)
    kv_rmsnorm_naive_f32(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                         KvRmsnormParams p) {
    const size_t row = blockIdx.x;
    kv::rmsnorm_row<false>(x + row * p.dim, w, out + row * p.dim, p.dim, p.eps);
}

extern "C" __global__ void __launch_bounds__(KV_ROW_MAX_THREADS)
    kv_rope_f32(float* __restrict__ x, const float* __restrict__ freq_factors, KvRopeParams p) {
    extern __shared__ float rope_cs[];
    const uint32_t half = p.n_rot / 2;
    float* cos_s = rope_cs;
    float* sin_s = rope_cs + half;
    const double pos = static_cast<double>(p.pos0) + static_cast<double>(blockIdx.x);
    for (uint32_t i = threadIdx.x; i < half; i += blockDim.x) {
        double theta =
            pos * pow(static_cast<double>(p.freq_base), -2.0 * static_cast<double>(i) / static_cast<double>(p.n_rot));
        if (p.has_freq_factors) {
            theta /= static_cast<double>(freq_factors[i]);
        }
        // sincospi reduces its argument exactly, so unlike sincos it has no Payne-Hanek slow
        // path with a local-memory table; dividing by pi first costs ~2e-16 relative in theta.
        double s, c;
        sincospi(theta / CUDART_PI, &s, &c);
        cos_s[i] = static_cast<float>(c);
        sin_s[i] = static_cast<float>(s);
    }
    __syncthreads();
    float* xt = x + static_cast<size_t>(blockIdx.x) * p.n_heads * p.head_dim;
    const uint32_t n_pairs = p.n_heads * half;
    for (uint32_t j = threadIdx.x; j < n_pairs; j += blockDim.x) {
        const uint32_t h = j / half;
        const uint32_t i = j - h * half;
        float* head = xt + static_cast<size_t>(h) * p.head_dim;
        const uint32_t a = p.style == KV_ROPE_NORM ? 2 * i : i;
        const uint32_t b = p.style == KV_ROPE_NORM ? 2 * i + 1 : i + half;
        const float x0 = head[a];
        const float x1 = head[b];
        const float c = cos_s[i];
        const float s = sin_s[i];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

extern "C" __global__ void __launch_bounds__(KV_ELEMENTWISE_THREADS)
    kv_silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, KvElementwiseParams p) {
    const size_t base = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * KV_ELEMENTWISE_VEC;
    if (base >= p.n) {
        return;
    }
    if (base + KV_ELEMENTWISE_VEC <= p.n && kv::is_aligned16(gate) && kv::is_aligned16(up)) {
        float4 g = *reinterpret_cast<const float4*>(gate + base);
        const float4 u = *reinterpret_cast<const float4*>(up + base);
        g.x = kv::silu_mul1(g.x, u.x);
        g.y = kv::silu_mul1(g.y, u.y);
        g.z = kv::silu_mul1(g.z, u.z);
        g.w = kv::silu_mul1(g.w, u.w);
        *reinterpret_cast<float4*>(gate + base) = g;
    } else {
        for (size_t i = base; i < base + KV_ELEMENTWISE_VEC && i < p.n; ++i) {
            gate[i] = kv::silu_mul1(gate[i], up[i]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_ELEMENTWISE_THREADS)
    kv_add_f32(float* __restrict__ x, const float* __restrict__ y, KvElementwiseParams p) {
    const size_t base = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * KV_ELEMENTWISE_VEC;
    if (base >= p.n) {
        return;
    }
    if (base + KV_ELEMENTWISE_VEC <= p.n && kv::is_aligned16(x) && kv::is_aligned16(y)) {
        float4 a = *reinterpret_cast<const float4*>(x + base);
        const float4 b = *reinterpret_cast<const float4*>(y + base);
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        *reinterpret_cast<float4*>(x + base) = a;
    } else {
        for (size_t i = base; i < base + KV_ELEMENTWISE_VEC && i < p.n; ++i) {
            x[i] += y[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_ROW_MAX_THREADS)
    kv_argmax_f32(const float* __restrict__ x, uint32_t* __restrict__ out, KvArgmaxParams p) {
    __shared__ float scratch_v[kv::kWarpSize];
    __shared__ uint32_t scratch_i[kv::kWarpSize];
    const uint32_t n = p.n_cols;
    const float* xr = x + static_cast<size_t>(blockIdx.x) * n;
    float best_v = -INFINITY;
    uint32_t best_i = n;
    if (n % 4 == 0 && kv::is_aligned16(x)) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (uint32_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
            const float4 v = x4[i];
            kv::argmax_take(v.x, 4 * i, best_v, best_i, n);
            kv::argmax_take(v.y, 4 * i + 1, best_v, best_i, n);
            kv::argmax_take(v.z, 4 * i + 2, best_v, best_i, n);
            kv::argmax_take(v.w, 4 * i + 3, best_v, best_i, n);
        }
    } else {
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            kv::argmax_take(xr[i], i, best_v, best_i, n);
        }
    }
    kv::warp_argmax(best_v, best_i, n);
    const int lane = threadIdx.x % kv::kWarpSize;
    const int warp = threadIdx.x / kv::kWarpSize;
    if (lane == 0) {
        scratch_v[warp] = best_v;
        scratch_i[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x / kv::kWarpSize;
        best_v = lane < n_warps ? scratch_v[lane] : -INFINITY;
        best_i = lane < n_warps ? scratch_i[lane] : n;
        kv::warp_argmax(best_v, best_i, n);
        if (lane == 0) {
            out[blockIdx.x] = best_i;
        }
    }
}

extern "C" __global__ void __launch_bounds__(KV_ELEMENTWISE_THREADS)
    kv_add_bias_f32(float* __restrict__ x, const float* __restrict__ b, KvBiasParams p) {
    const size_t n = static_cast<size_t>(p.n_rows) * p.width;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        x[i] += b[i % p.width];
    }
}

extern "C" __global__ void __launch_bounds__(KV_ROWS_THREADS)
    kv_gather_rows_u32(const uint32_t* __restrict__ src, uint32_t* __restrict__ dst, const uint32_t* __restrict__ idx,
                       KvRowsParams p) {
    const size_t from = static_cast<size_t>(idx[blockIdx.x]) * p.row_words;
    const size_t to = static_cast<size_t>(blockIdx.x) * p.row_words;
    for (uint32_t c = threadIdx.x; c < p.row_words; c += blockDim.x) {
        dst[to + c] = src[from + c];
    }
}

extern "C" __global__ void __launch_bounds__(KV_ROWS_THREADS)
    kv_scatter_rows_u32(const uint32_t* __restrict__ src, uint32_t* __restrict__ dst, const uint32_t* __restrict__ idx,
                        KvRowsParams p) {
    const size_t from = static_cast<size_t>(blockIdx.x) * p.row_words;
    const size_t to = static_cast<size_t>(idx[blockIdx.x]) * p.row_words;
    for (uint32_t c = threadIdx.x; c < p.row_words; c += blockDim.x) {
        dst[to + c] = src[from + c];
    }
}
