/*
 * Parameter structs of the kernels in cuda/attention.cu: attention over the fp16 KV cache and
 * the cache's append.
 *
 * The fp16 cache of one layer holds K and V as f16 [n_kv_heads, capacity, head_dim]; KV head g
 * holds len[g] tokens (they differ per head once a policy evicts per head). Queries and outputs
 * are f32 [n_tokens, n_heads, head_dim]; query t sees the first len[g] - n_tokens + t + 1
 * tokens of its KV head g = h / (n_heads / n_kv_heads) (its own token is the last of those).
 */
#ifndef KVGEAR_FFI_ATTENTION_H
#define KVGEAR_FFI_ATTENTION_H

#include <stdint.h>

/* Most KV heads a layer may have (the per-head lengths travel in the parameter struct). */
#define KV_ATTN_MAX_KV_HEADS 64
/* Warps per block of the decode, prefill and naive attention kernels. */
#define KV_ATTN_WARPS 4
/* Keys each warp of the decode kernel loads before it reduces them. */
#define KV_ATTN_DECODE_UNROLL 4
/* Queries up to which the split (decode) kernel is used; more take the flash (prefill) kernel. */
#define KV_ATTN_DECODE_MAX_TOKENS 4
/* Split length granularity of the decode kernel (tokens). */
#define KV_ATTN_SPLIT_MULTIPLE 64
/* Prefill (flash) tile: queries per block (KV_ATTN_WARPS warps, 4 queries each) and keys per tile. */
#define KV_ATTN_PREFILL_QUERIES 16
#define KV_ATTN_PREFILL_KEYS 32
/* Threads per block of the combine, mass and append kernels. */
#define KV_ATTN_AUX_THREADS 128

/*
 * Attention of n_tokens queries over one layer's fp16 cache.
 * Partial results (one per query row and split): part_ml [rows, n_splits] (running max, sum of
 * exponentials), part_o [rows, n_splits, head_dim] (unnormalized output), rows = n_tokens *
 * n_heads, row = t * n_heads + h. With the mass variants, scores [rows, score_stride] receives
 * every visible scaled score q.k / sqrt(head_dim); ml [rows] (final max, sum) comes from the
 * combine kernel; mass [n_kv_heads, mass_stride] is added to.
 */
typedef struct KvAttnParams {
    uint32_t n_tokens;
    uint32_t n_heads;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t capacity;
    uint32_t n_splits;     /* splits of the context (1 for the prefill kernel) */
    uint32_t split_len;    /* tokens per split */
    uint32_t score_stride; /* floats per row of scores, >= max len */
    uint32_t mass_stride;  /* floats per KV head of mass, >= max len */
    uint32_t max_len;      /* max over heads of len */
    float scale;           /* 1 / sqrt(head_dim) */
    uint32_t len[KV_ATTN_MAX_KV_HEADS];
} KvAttnParams;

/* Append n_tokens tokens (k, v f32 [n_tokens, n_kv_heads, head_dim]) at position len[g] of
 * every head g of the cache. */
typedef struct KvAppendParams {
    uint32_t n_tokens;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t capacity;
    uint32_t len[KV_ATTN_MAX_KV_HEADS];
} KvAppendParams;

#endif
