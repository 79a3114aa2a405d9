// Shared device helpers: warp and block reductions, alignment checks, half/bf16 conversions.
//
// Every cuda/*.cu file is compiled into one translation unit (build.rs includes them all into
// one generated file), so everything here is `static` or `inline` inside namespace `kv`, and
// kernels use `extern "C"` names prefixed `kv_` that the Rust runtime looks up by string.
//
// Block reductions assume blockDim.x is a multiple of 32 and at most 1024 (32 warps), with
// blockDim.y == blockDim.z == 1. They take a caller-provided __shared__ scratch of 32 slots and
// return the result to every thread of the block. A block must __syncthreads() before it reuses
// the same scratch for a second reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kv {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(kFullMask, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
    }
    return v;
}

// Sum over the block. Each warp reduces with shuffles, lane 0 of each warp parks its partial in
// scratch, and then every warp reduces the partials itself, which saves the second barrier a
// broadcast through shared memory would need.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int n_warps = blockDim.x / kWarpSize;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int n_warps = blockDim.x / kWarpSize;
    v = warp_max(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// True when p may be read or written as float4 / int4 (16-byte aligned).
__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even conversions from f32, the same rounding as the `half` crate's
// `f16::from_f32` / `bf16::from_f32` used by the CPU backend.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Two packed halves to two floats (x = low half, y = high half).
__device__ __forceinline__ float2 half2_to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 bf162_to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

}  // namespace kv
