/*
 * Parameter structs of the kernels in cuda/quant.cu (dequantizing matrix-vector and
 * matrix-matrix products over GGUF blocks, and the embedding lookup).
 *
 * A weight matrix is stored on the device exactly as in its GGUF file: n_rows rows of row_bytes
 * bytes each, every row a whole number of blocks of its type, rows end to end. The allocation is
 * padded to a multiple of KV_WEIGHT_PAD bytes (plus KV_WEIGHT_PAD) so that 16-byte loads that
 * cover the last row's tail stay inside it.
 *
 * Every type is read in "units" of 32 consecutive elements of a row: a legacy block (q4_0, q4_1,
 * q5_0, q5_1, q8_0) is one unit, a K-quant super-block (q4_K, q5_K, q6_K) is eight, and a float
 * row (f32, f16, bf16) is cut into units of 32 values.
 */
#ifndef KVGEAR_FFI_QUANT_H
#define KVGEAR_FFI_QUANT_H

#include <stdint.h>

/* GGML type ids (as GGUF files number them). */
#define KV_TYPE_F32 0
#define KV_TYPE_F16 1
#define KV_TYPE_Q4_0 2
#define KV_TYPE_Q4_1 3
#define KV_TYPE_Q5_0 6
#define KV_TYPE_Q5_1 7
#define KV_TYPE_Q8_0 8
#define KV_TYPE_Q4_K 12
#define KV_TYPE_Q5_K 13
#define KV_TYPE_Q6_K 14
#define KV_TYPE_BF16 30

/* Elements per unit (see above). */
#define KV_UNIT_ELEMS 32
/* Weight allocations are padded to a multiple of this, plus this (bytes). */
#define KV_WEIGHT_PAD 16

/* GEMV (decode): warps per block, rows per warp, bytes of one row staged per pipeline step. */
#define KV_GEMV_WARPS 4
#define KV_GEMV_ROWS_PER_WARP 2
#define KV_GEMV_CHUNK_BYTES 2048
/* Staging buffer per row and pipeline stage: a chunk plus the alignment slop at both ends. */
#define KV_GEMV_STAGE_BYTES (KV_GEMV_CHUNK_BYTES + 32)
/* Integer GEMV of the quantized types (x quantized to 8 bits in shared memory, dp4a): warps per
 * block and rows per warp. The block's dynamic shared memory holds, for n tokens, n * n_cols int8
 * codes followed by n * n_cols / 32 KvQ8Sum. */
#define KV_GEMV_Q8_WARPS 8
#define KV_GEMV_Q8_ROWS_PER_WARP 2
/* One 32-column block of the quantized activation: x[i] ~ d * q[i], sum = sum of the 32 q[i]. */
typedef struct KvQ8Sum {
    float d;
    int32_t sum;
} KvQ8Sum;
/* Tokens one GEMV launch handles at most (the wide variant); more go to the GEMM. */
#define KV_GEMV_MAX_TOKENS 4

/* GEMM (prefill, tensor cores): output tile of weight rows x tokens, and the K step. */
#define KV_GEMM_THREADS 256
#define KV_GEMM_TILE_ROWS 64
#define KV_GEMM_TILE_TOKENS 64
#define KV_GEMM_TILE_K 128

/* Threads per block of the embedding lookup, the naive GEMV and the quantization of x for the
 * integer GEMM (kv_quantize_q8: codes [n_tokens, n_cols] then n_tokens * n_cols / 32 KvQ8Sum). */
#define KV_EMBED_THREADS 128
#define KV_GEMV_NAIVE_THREADS 128
#define KV_QUANTIZE_THREADS 256

/* y[t * n_rows + r] = sum_c W[r, c] * x[t * n_cols + c] for t < n_tokens, r < n_rows. */
typedef struct KvMatmulParams {
    uint32_t n_rows;
    uint32_t n_cols;    /* a multiple of KV_UNIT_ELEMS (of 256 for K-quants) */
    uint32_t n_tokens;
    uint32_t row_bytes;
    uint32_t type;      /* KV_TYPE_*; the typed kernels ignore it, the naive one switches on it */
} KvMatmulParams;

/* out[t * n_cols + c] = W[tokens[t], c], dequantized. */
typedef struct KvEmbedParams {
    uint32_t n_tokens;
    uint32_t n_cols;
    uint32_t row_bytes;
    uint32_t type;
} KvEmbedParams;

#endif
