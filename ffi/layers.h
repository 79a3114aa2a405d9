/*
 * Parameter structs of the kernels in cuda/layers.cu.
 *
 * Plain C, read by nvcc (cuda/layers.cu includes it) and by bindgen (build.rs turns it into
 * Rust `#[repr(C)]` structs in src/backend/cuda/ffi.rs), so both sides agree on every field
 * offset. Each kernel takes its buffers as separate pointer arguments followed by one of these
 * structs passed by value: only scalars live here, so that the Rust side hands cudarc its own
 * device buffers and cudarc can order the launch after earlier work on them.
 *
 * Counts are uint32_t: the wrappers in src/backend/cuda/layers.rs reject shapes that do not fit.
 */
#ifndef KVGEAR_FFI_LAYERS_H
#define KVGEAR_FFI_LAYERS_H

#include <stdint.h>

/* Threads per block of the element-wise kernels (silu_mul, add); each thread handles 4 elements. */
#define KV_ELEMENTWISE_THREADS 256
/* Elements per thread of the element-wise kernels. */
#define KV_ELEMENTWISE_VEC 4
/* Upper bound on the block size of the row kernels (rmsnorm, rope, argmax). Their block size is a
 * multiple of 32 chosen by the wrapper; the kernels only assume it is at most this. */
#define KV_ROW_MAX_THREADS 1024

/* RoPE pairing, as `RopeStyle` in src/backend/cpu/reference.rs. */
#define KV_ROPE_NORM 0 /* adjacent pairs (x[2i], x[2i+1]) */
#define KV_ROPE_NEOX 1 /* halves (x[i], x[i + n_rot/2]) */

/* rmsnorm: x, out are [n_rows, dim], w is [dim]. */
typedef struct KvRmsnormParams {
    uint32_t n_rows;
    uint32_t dim;
    float eps;
} KvRmsnormParams;

/* rope, in place on x [n_tokens, n_heads, head_dim]; token t is at position pos0 + t.
 * freq_factors, when has_freq_factors != 0, is [n_rot / 2]. n_rot is even and <= head_dim. */
typedef struct KvRopeParams {
    uint32_t n_tokens;
    uint32_t n_heads;
    uint32_t head_dim;
    uint32_t n_rot;
    uint32_t pos0;
    uint32_t style; /* KV_ROPE_NORM or KV_ROPE_NEOX */
    uint32_t has_freq_factors;
    float freq_base;
} KvRopeParams;

/* silu_mul and add: both operands are [n]. */
typedef struct KvElementwiseParams {
    uint32_t n;
} KvElementwiseParams;

/* argmax: x is [n_rows, n_cols], out is [n_rows] (uint32 indices); n_cols >= 1. */
typedef struct KvArgmaxParams {
    uint32_t n_rows;
    uint32_t n_cols;
} KvArgmaxParams;

/* add_bias: x is [n_rows, width], b is [width]; x[r, :] += b. */
typedef struct KvBiasParams {
    uint32_t n_rows;
    uint32_t width;
} KvBiasParams;

/* Threads per block of the row gather / scatter kernels. */
#define KV_ROWS_THREADS 128

/* gather_rows / scatter_rows: rows of row_words 32-bit words; idx has n_rows entries. */
typedef struct KvRowsParams {
    uint32_t n_rows;
    uint32_t row_words;
} KvRowsParams;

#endif
