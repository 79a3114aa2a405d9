// Causal attention over the fp16 KV cache, with an optional per-token attention-mass output,
// and the cache's append. Layouts in ffi/attention.h. Reference: backend::cpu::reference::
// attention (softmax in f64 there; f32 with an online max here, checked by selftest.rs).
//
// Decode path (n_tokens <= KV_ATTN_DECODE_MAX_TOKENS), flash-decoding style:
//   kv_attn_decode_d<D>[_mass]: grid (n_tokens * n_heads, n_splits); block KV_ATTN_WARPS warps.
//     The block takes one query row and one split of the context; warp w takes keys
//     j0 + U*w + U*WARPS*i .. + U (U = KV_ATTN_DECODE_UNROLL loaded before they are reduced).
//     Lane l holds dims [l*D/32, (l+1)*D/32) of q, k, v and o. Each warp keeps a running max m,
//     sum l and output o (online softmax); the warps are merged through shared memory into one
//     partial (m, l, o) per (row, split). The _mass variant also stores every scaled score.
//   kv_attn_combine: grid rows; merges the splits, writes out = o / l and (m, l) per row.
//   kv_attn_mass: grid (max_len / 128, n_kv_heads); thread j of head g adds
//     sum over queries t and query heads h of g of exp(score - m) / l to mass[g][j]; one writer
//     per element and a fixed summation order, so the result is deterministic.
// Prefill path (more queries), flash style:
//   kv_attn_prefill_d<D>[_mass]: grid (n_tokens / 16, n_heads); block 4 warps x 4 queries.
//     K and V tiles of KV_ATTN_PREFILL_KEYS tokens go through shared memory (K rows padded by
//     one word so that lane j reading row j is conflict-free); lane j scores key j for each of
//     its warp's queries, online softmax per query, then o += p_j v_j with p_j broadcast by
//     shuffles. Writes the same partials as the decode kernel with n_splits = 1, and the same
//     scores for the mass variant; combine and mass follow.
// The plain variants never touch scores (a compile-time switch), so they pay nothing for mass.
//
// kv_attn_naive (benchmark baseline): one warp per query row, keys one at a time, scalar loads,
//   online softmax; writes out directly.
// kv_cache_append: k, v f32 [n_tokens, n_kv_heads, D] -> f16 rows len[g] + t of each head g.
//
// Supported head_dim: 64 and 128 (the typed kernels); the wrappers reject others.

#include "attention.h"
#include "common.cuh"

namespace kv {

// DL consecutive halves at p (4-byte aligned for DL = 2, 8 for 4) as floats.
template <int DL> __device__ __forceinline__ void load_halves(const __half* p, float* out);
template <> __device__ __forceinline__ void load_halves<2>(const __half* p, float* out) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(p));
    out[0] = a.x;
    out[1] = a.y;
}
template <> __device__ __forceinline__ void load_halves<4>(const __half* p, float* out) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
}

// exp(a - b) for a running max that may still be -inf (then the factor is 0).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
    return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

__device__ __forceinline__ uint32_t kv_head_of(uint32_t h, const KvAttnParams& p) {
    return h / (p.n_heads / p.n_kv_heads);
}

template <int D, bool MASS>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q, const __half* __restrict__ k,
                                            const __half* __restrict__ v, float2* __restrict__ part_ml,
                                            float* __restrict__ part_o, float* __restrict__ scores,
                                            const KvAttnParams& p) {
    constexpr int DL = D / kWarpSize;
    constexpr int U = KV_ATTN_DECODE_UNROLL;
    constexpr int W = KV_ATTN_WARPS;
    __shared__ float sm_m[W];
    __shared__ float sm_l[W];
    __shared__ float sm_o[W][D];

    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const uint32_t row = blockIdx.x;
    const uint32_t t = row / p.n_heads;
    const uint32_t h = row % p.n_heads;
    const uint32_t g = kv_head_of(h, p);
    const uint32_t n_vis = p.len[g] - p.n_tokens + t + 1;
    const uint32_t split = blockIdx.y;
    const uint32_t j0 = split * p.split_len;
    const uint32_t j1 = min(j0 + p.split_len, n_vis);

    float qv[DL];
    {
        const float* qr = q + static_cast<size_t>(row) * D + lane * DL;
#pragma unroll
        for (int i = 0; i < DL; ++i) qv[i] = qr[i] * p.scale;
    }
    const __half* kh = k + static_cast<size_t>(g) * p.capacity * D + lane * DL;
    const __half* vh = v + static_cast<size_t>(g) * p.capacity * D + lane * DL;

    float m = -INFINITY;
    float l = 0.0f;
    float o[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) o[i] = 0.0f;

    for (uint32_t jb = j0 + warp * U; jb < j1; jb += W * U) {
        float kd[U][DL];
        float vd[U][DL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (jb + u < j1) {
                load_halves<DL>(kh + static_cast<size_t>(jb + u) * D, kd[u]);
                load_halves<DL>(vh + static_cast<size_t>(jb + u) * D, vd[u]);
            } else {
#pragma unroll
                for (int i = 0; i < DL; ++i) kd[u][i] = vd[u][i] = 0.0f;
            }
        }
        float s[U];
        float mt = -INFINITY;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < DL; ++i) dot += qv[i] * kd[u][i];
            dot = warp_sum(dot);
            s[u] = jb + u < j1 ? dot : -INFINITY;
            mt = fmaxf(mt, s[u]);
            if (MASS && lane == 0 && jb + u < j1) {
                scores[static_cast<size_t>(row) * p.score_stride + jb + u] = s[u];
            }
        }
        // jb < j1, so s[0] is finite and so is m_new.
        const float m_new = fmaxf(m, mt);
        const float alpha = rescale(m, m_new);
        l *= alpha;
#pragma unroll
        for (int i = 0; i < DL; ++i) o[i] *= alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float pu = jb + u < j1 ? expf(s[u] - m_new) : 0.0f;
            l += pu;
#pragma unroll
            for (int i = 0; i < DL; ++i) o[i] += pu * vd[u][i];
        }
        m = m_new;
    }

    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) sm_o[warp][lane * DL + i] = o[i];
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, sm_m[w]);
    float f[W];
#pragma unroll
    for (int w = 0; w < W; ++w) f[w] = mx == -INFINITY ? 0.0f : rescale(sm_m[w], mx);
    const size_t part = static_cast<size_t>(row) * p.n_splits + split;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < W; ++w) acc += f[w] * sm_o[w][d];
        part_o[part * D + d] = acc;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += f[w] * sm_l[w];
        part_ml[part] = make_float2(mx, sum);
    }
}

template <int D, bool MASS>
__device__ __forceinline__ void attn_prefill(const float* __restrict__ q, const __half* __restrict__ k,
                                             const __half* __restrict__ v, float2* __restrict__ part_ml,
                                             float* __restrict__ part_o, float* __restrict__ scores,
                                             const KvAttnParams& p) {
    constexpr int DL = D / kWarpSize;
    constexpr int BQ = KV_ATTN_PREFILL_QUERIES;
    constexpr int BK = KV_ATTN_PREFILL_KEYS;
    constexpr int QW = BQ / KV_ATTN_WARPS;  // queries per warp
    constexpr int D2 = D / 2;               // half2 words per row
    static_assert(BK == kWarpSize, "one key per lane");
    __shared__ float Qs[BQ][D];
    __shared__ __half2 Ks[BK][D2 + 1];
    __shared__ __half2 Vs[BK][D2];

    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const uint32_t h = blockIdx.y;
    const uint32_t g = kv_head_of(h, p);
    const uint32_t len = p.len[g];
    const uint32_t t0 = blockIdx.x * BQ;
    const uint32_t t_last = min(t0 + BQ, p.n_tokens) - 1;
    const uint32_t n_vis_max = len - p.n_tokens + t_last + 1;

    for (int i = threadIdx.x; i < BQ * D; i += blockDim.x) {
        const uint32_t qq = i / D;
        const uint32_t d = i % D;
        const uint32_t t = t0 + qq;
        Qs[qq][d] = t < p.n_tokens ? q[(static_cast<size_t>(t) * p.n_heads + h) * D + d] * p.scale : 0.0f;
    }
    const __half2* k2 = reinterpret_cast<const __half2*>(k + static_cast<size_t>(g) * p.capacity * D);
    const __half2* v2 = reinterpret_cast<const __half2*>(v + static_cast<size_t>(g) * p.capacity * D);

    float m[QW];
    float l[QW];
    float o[QW][DL];
#pragma unroll
    for (int i = 0; i < QW; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < DL; ++e) o[i][e] = 0.0f;
    }

    for (uint32_t j0 = 0; j0 < n_vis_max; j0 += BK) {
        __syncthreads();
        for (int i = threadIdx.x; i < BK * D2; i += blockDim.x) {
            const uint32_t r = i / D2;
            const uint32_t c = i % D2;
            const uint32_t j = j0 + r;
            const bool in = j < n_vis_max;
            Ks[r][c] = in ? k2[static_cast<size_t>(j) * D2 + c] : __floats2half2_rn(0.0f, 0.0f);
            Vs[r][c] = in ? v2[static_cast<size_t>(j) * D2 + c] : __floats2half2_rn(0.0f, 0.0f);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < QW; ++i) {
            const uint32_t qq = warp * QW + i;
            const uint32_t t = t0 + qq;
            if (t >= p.n_tokens) {
                continue;
            }
            const uint32_t nv = len - p.n_tokens + t + 1;
            const uint32_t j = j0 + lane;
            float dot = 0.0f;
#pragma unroll 8
            for (int c = 0; c < D2; ++c) {
                const float2 kk = __half22float2(Ks[lane][c]);
                dot += Qs[qq][2 * c] * kk.x + Qs[qq][2 * c + 1] * kk.y;
            }
            const float s = j < nv ? dot : -INFINITY;
            if (MASS && j < nv) {
                scores[(t * p.n_heads + h) * static_cast<size_t>(p.score_stride) + j] = s;
            }
            const float mt = warp_max(s);
            if (mt == -INFINITY) {
                continue;
            }
            const float m_new = fmaxf(m[i], mt);
            const float alpha = rescale(m[i], m_new);
            const float pj = j < nv ? expf(s - m_new) : 0.0f;
            l[i] = l[i] * alpha + warp_sum(pj);
#pragma unroll
            for (int e = 0; e < DL; ++e) o[i][e] *= alpha;
#pragma unroll 4
            for (int jj = 0; jj < BK; ++jj) {
                const float pp = __shfl_sync(kFullMask, pj, jj);
#pragma unroll
                for (int e = 0; e < DL; e += 2) {
                    const float2 vv = __half22float2(Vs[jj][(lane * DL + e) / 2]);
                    o[i][e] += pp * vv.x;
                    o[i][e + 1] += pp * vv.y;
                }
            }
            m[i] = m_new;
        }
    }
#pragma unroll
    for (int i = 0; i < QW; ++i) {
        const uint32_t t = t0 + warp * QW + i;
        if (t >= p.n_tokens) {
            continue;
        }
        const size_t row = static_cast<size_t>(t) * p.n_heads + h;
        if (lane == 0) {
            part_ml[row] = make_float2(m[i], l[i]);
        }
#pragma unroll
        for (int e = 0; e < DL; ++e) part_o[row * D + lane * DL + e] = o[i][e];
    }
}

}  // namespace kv

#define KV_ATTN_KERNELS(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_WARPS * 32)                                        \
        kv_attn_decode_d##D(const float* __restrict__ q, const __half* __restrict__ k,                        \
                            const __half* __restrict__ v, float2* __restrict__ part_ml,                       \
                            float* __restrict__ part_o, float* __restrict__ scores, KvAttnParams p) {        \
        kv::attn_decode<D, false>(q, k, v, part_ml, part_o, scores, p);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_WARPS * 32)                                        \
        kv_attn_decode_d##D##_mass(const float* __restrict__ q, const __half* __restrict__ k,                 \
                                   const __half* __restrict__ v, float2* __restrict__ part_ml,                \
                                   float* __restrict__ part_o, float* __restrict__ scores, KvAttnParams p) { \
        kv::attn_decode<D, true>(q, k, v, part_ml, part_o, scores, p);                                       \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_WARPS * 32)                                        \
        kv_attn_prefill_d##D(const float* __restrict__ q, const __half* __restrict__ k,                       \
                             const __half* __restrict__ v, float2* __restrict__ part_ml,                      \
                             float* __restrict__ part_o, float* __restrict__ scores, KvAttnParams p) {       \
        kv::attn_prefill<D, false>(q, k, v, part_ml, part_o, scores, p);                                     \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_WARPS * 32)                                        \
        kv_attn_prefill_d##D##_mass(const float* __restrict__ q, const __half* __restrict__ k,                \
                                    const __half* __restrict__ v, float2* __restrict__ part_ml,               \
                                    float* __restrict__ part_o, float* __restrict__ scores, KvAttnParams p) { \
        kv::attn_prefill<D, true>(q, k, v, part_ml, part_o, scores, p);                                      \
    }

KV_ATTN_KERNELS(64)
KV_ATTN_KERNELS(128)

extern "C" __global__ void __launch_bounds__(KV_ATTN_AUX_THREADS)
    kv_attn_combine(const float2* __restrict__ part_ml, const float* __restrict__ part_o, float* __restrict__ out,
                    float2* __restrict__ ml, KvAttnParams p) {
    const uint32_t row = blockIdx.x;
    const uint32_t D = p.head_dim;
    const float2* pm = part_ml + static_cast<size_t>(row) * p.n_splits;
    float mx = -INFINITY;
    for (uint32_t s = 0; s < p.n_splits; ++s) mx = fmaxf(mx, pm[s].x);
    float sum = 0.0f;
    for (uint32_t s = 0; s < p.n_splits; ++s) sum += kv::rescale(pm[s].x, mx) * pm[s].y;
    const float inv = 1.0f / sum;
    for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (uint32_t s = 0; s < p.n_splits; ++s) {
            acc += kv::rescale(pm[s].x, mx) * part_o[(static_cast<size_t>(row) * p.n_splits + s) * D + d];
        }
        out[static_cast<size_t>(row) * D + d] = acc * inv;
    }
    if (threadIdx.x == 0) {
        ml[row] = make_float2(mx, sum);
    }
}

extern "C" __global__ void __launch_bounds__(KV_ATTN_AUX_THREADS)
    kv_attn_mass(const float* __restrict__ scores, const float2* __restrict__ ml, float* __restrict__ mass,
                 KvAttnParams p) {
    const uint32_t g = blockIdx.y;
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    const uint32_t len = p.len[g];
    if (j >= len) {
        return;
    }
    const uint32_t group = p.n_heads / p.n_kv_heads;
    float sum = 0.0f;
    for (uint32_t t = 0; t < p.n_tokens; ++t) {
        if (j >= len - p.n_tokens + t + 1) {
            continue;
        }
        for (uint32_t i = 0; i < group; ++i) {
            const size_t row = static_cast<size_t>(t) * p.n_heads + g * group + i;
            const float2 r = ml[row];
            sum += expf(scores[row * p.score_stride + j] - r.x) / r.y;
        }
    }
    mass[static_cast<size_t>(g) * p.mass_stride + j] += sum;
}

// Up to 16 dims per lane: head_dim <= 512.
extern "C" __global__ void __launch_bounds__(KV_ATTN_WARPS * 32)
    kv_attn_naive(const float* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                  float* __restrict__ out, KvAttnParams p) {
    constexpr int MAX_DL = 16;
    const int lane = threadIdx.x % kv::kWarpSize;
    const uint32_t row = blockIdx.x * KV_ATTN_WARPS + threadIdx.x / kv::kWarpSize;
    if (row >= p.n_tokens * p.n_heads) {
        return;
    }
    const uint32_t D = p.head_dim;
    const uint32_t t = row / p.n_heads;
    const uint32_t g = kv::kv_head_of(row % p.n_heads, p);
    const uint32_t n_vis = p.len[g] - p.n_tokens + t + 1;
    const float* qr = q + static_cast<size_t>(row) * D;
    const __half* kh = k + static_cast<size_t>(g) * p.capacity * D;
    const __half* vh = v + static_cast<size_t>(g) * p.capacity * D;
    float m = -INFINITY;
    float l = 0.0f;
    float o[MAX_DL];
#pragma unroll
    for (int i = 0; i < MAX_DL; ++i) o[i] = 0.0f;
    for (uint32_t j = 0; j < n_vis; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_DL; ++i) {
            const uint32_t d = lane + 32 * i;
            if (d < D) dot += qr[d] * __half2float(kh[static_cast<size_t>(j) * D + d]);
        }
        const float s = kv::warp_sum(dot) * p.scale;
        const float m_new = fmaxf(m, s);
        const float alpha = kv::rescale(m, m_new);
        const float pj = expf(s - m_new);
        l = l * alpha + pj;
#pragma unroll
        for (int i = 0; i < MAX_DL; ++i) {
            const uint32_t d = lane + 32 * i;
            if (d < D) o[i] = o[i] * alpha + pj * __half2float(vh[static_cast<size_t>(j) * D + d]);
        }
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < MAX_DL; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < D) out[static_cast<size_t>(row) * D + d] = o[i] / l;
    }
}

// grid (n_tokens, n_kv_heads); threads over head_dim.
extern "C" __global__ void __launch_bounds__(KV_ATTN_AUX_THREADS)
    kv_cache_append(const float* __restrict__ k, const float* __restrict__ v, __half* __restrict__ kc,
                    __half* __restrict__ vc, KvAppendParams p) {
    const uint32_t t = blockIdx.x;
    const uint32_t g = blockIdx.y;
    const size_t src = (static_cast<size_t>(t) * p.n_kv_heads + g) * p.head_dim;
    const size_t dst = (static_cast<size_t>(g) * p.capacity + p.len[g] + t) * p.head_dim;
    for (uint32_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        kc[dst + d] = __float2half_rn(k[src + d]);
        vc[dst + d] = __float2half_rn(v[src + d]);
    }
}
