/*
 * Storage descriptors and parameter structs of the compressed KV cache on the device
 * (cuda/gear.cu, cuda/attention_quant.cu; host side src/backend/cuda/kvcodec/).
 *
 * One layer's cache (codec "uniform", "group" or "gear") lives in
 *   - an arena: one device byte buffer holding every compressed block of every KV head;
 *   - two fp16 buffers buf_k, buf_v [n_kv_heads, buf_rows, head_dim]: each head's tokens not yet
 *     compressed (appends land here; compress_due turns whole buffers of them into a block);
 *   - small tables the host rebuilds when the structure changes: KvQBlock per block (in each
 *     head's token order, heads one after the other), KvQHead per head, the row starts of the
 *     K row groups (Channel layout), and the attention work items.
 *
 * A block of n rows (tokens) of one head stores, for K (part 0) and V (part 1), at byte offsets
 * in the arena (each 16-byte aligned):
 *   codes   [n, row_bytes] u8     bits-bit codes, LSB-first bit stream per row (row_bytes =
 *                                 head_dim * bits / 8); 8 consecutive channels are `bits` bytes
 *   scales  Token layout:   [n, head_dim / group, 2] f16  (step, zero) per row and channel group
 *           Channel layout: [n_groups, head_dim, 2] f16   (step, zero) per row group and channel
 *   a       [n, rank] f16             low-rank factor A (GEAR; absent when rank == 0)
 *   b       [head_dim, rank] f16      low-rank factor B
 *   idx     [n_out] u16 or u32        outliers' flat indices row * head_dim + channel, ascending
 *   val     [n_out] f16               outliers' values
 * the same arrays as src/kv/codec/{quant,lowrank,sparse}.rs hold, so the byte counts agree.
 * A token's decoded value is step * code + zero (+ (A B^T)[row, channel]) off the outliers and
 * the outlier's value on them.
 *
 * All counts are uint32_t and all offsets are byte offsets (arena < 4 GiB, checked by the host).
 */
#ifndef KVGEAR_FFI_KVQUANT_H
#define KVGEAR_FFI_KVQUANT_H

#include <stdint.h>

/* Channels per packed chunk: 8 codes of b bits are exactly b bytes. */
#define KV_Q_CHUNK 8
/* Largest head_dim the device codecs take (a power of two from 8). */
#define KV_Q_MAX_HEAD_DIM 256
/* Most query heads per KV head. */
#define KV_Q_MAX_GQA 8
/* Largest low-rank rank (src/kv/codec MAX_RANK). */
#define KV_Q_MAX_RANK 64
/* Rows of one decode-attention work item (and of one mass item in prefill). */
#define KV_Q_ITEM_ROWS 256
/* Threads per block of the attention and decode kernels. */
#define KV_Q_ATTN_THREADS 128
/* Threads per block of the combine kernel. */
#define KV_Q_COMBINE_THREADS 256
/* Tokens of one KV head whose attention mass one combine block adds up (grid.y splits a head's
 * tokens into runs of this many). */
#define KV_Q_COMBINE_MASS_TOKENS 1024
/* Threads per block of the compression kernel. */
#define KV_Q_COMPRESS_THREADS 256
/* Threads per block of the gather (eviction) and buffer-append kernels. */
#define KV_Q_COPY_THREADS 256
/* Query rows (token, query head) per prefill block. */
#define KV_Q_PREFILL_QROWS 16
/* The block index of a work item over a head's fp16 buffer. */
#define KV_Q_BUFFER_BLOCK 0xffffffffu

/* Gather segment kinds. */
#define KV_Q_SEG_COPY 0  /* bytes */
#define KV_Q_SEG_IDX16 1 /* u16 elements, each minus `adjust` */
#define KV_Q_SEG_IDX32 2 /* u32 elements, each minus `adjust` */
/* Gather spaces (which base pointer an offset is relative to). */
#define KV_Q_SPACE_ARENA 0
#define KV_Q_SPACE_SCRATCH 1
#define KV_Q_SPACE_BUF_K 2
#define KV_Q_SPACE_BUF_V 3

/* One part (K or V) of a block: byte offsets in the arena. */
typedef struct KvQPart {
    uint32_t codes;
    uint32_t scales;
    uint32_t a;
    uint32_t b;
    uint32_t idx;
    uint32_t val;
    uint32_t n_out;
    uint32_t pad;
} KvQPart;

/* One compressed block of one head. */
typedef struct KvQBlock {
    uint32_t first_token; /* index of its first row among the head's tokens */
    uint32_t n_rows;
    uint32_t rank;      /* 0: no low-rank term */
    uint32_t idx_bytes; /* 2 or 4 */
    uint32_t group0;    /* Channel-layout K: its first entry in the group-start table */
    uint32_t n_groups;  /* Channel-layout K: row groups; the table holds each one's first row */
    uint32_t pad[2];
    KvQPart part[2]; /* 0 = K, 1 = V */
} KvQBlock;

/* One KV head: its blocks are blocks[block0 .. block0 + n_blocks] in token order, then n_buf
 * fp16 rows; its attention work items are items[item0 .. item0 + n_items]. */
typedef struct KvQHead {
    uint32_t block0;
    uint32_t n_blocks;
    uint32_t n_compressed;
    uint32_t n_buf;
    uint32_t item0;
    uint32_t n_items;
    uint32_t len; /* n_compressed + n_buf */
    uint32_t pad;
} KvQHead;

/* A run of at most KV_Q_ITEM_ROWS rows of one block (or of the fp16 buffer). */
typedef struct KvQItem {
    uint32_t head;
    uint32_t block; /* index into the block table, or KV_Q_BUFFER_BLOCK */
    uint32_t row0;  /* first row within the block (or buffer) */
    uint32_t n_rows;
    uint32_t token0; /* the head's token index of row0 */
    uint32_t pad[3];
} KvQItem;

/* What every kernel needs to read the storage. */
typedef struct KvQShape {
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t bits;
    uint32_t row_bytes;
    uint32_t k_channel; /* 1: K scales per row group and channel (KIVI); 0: per row and channel group */
    uint32_t k_group;   /* Token layout: channels per K scale group; Channel layout: rows per group */
    uint32_t v_group;   /* channels per V scale group (V is always Token layout) */
    uint32_t buf_rows;  /* rows per head in buf_k / buf_v (the buffer's current capacity) */
} KvQShape;

/* Attention over the storage: q, out [n_tokens, n_heads, head_dim] f32; query head h reads KV
 * head h / gqa; query t sees the first len - n_tokens + t + 1 tokens of its head. */
typedef struct KvQAttnParams {
    KvQShape s;
    uint32_t n_heads;
    uint32_t gqa;
    uint32_t n_tokens;
    uint32_t n_items;
    uint32_t q_tile;       /* prefill: tokens per block (q_tile * gqa <= KV_Q_PREFILL_QROWS) */
    uint32_t k_tile;       /* prefill: keys per tile (32, or 16 for head_dim 256) */
    uint32_t score_stride; /* decode with mass: floats per query head in the score scratch */
    uint32_t mass_stride;  /* floats per KV head in the mass output */
    float scale;           /* 1 / sqrt(head_dim) */
    uint32_t pad[3];
} KvQAttnParams;

/* Compression of the first blk.n_rows rows of a head's fp16 buffer into the block `blk` (offsets
 * already assigned by the host). */
typedef struct KvQCompressJob {
    KvQBlock blk;
    uint32_t head;
    uint32_t iters;      /* power-iteration steps (at least 1 when rank > 0) */
    uint32_t b0;         /* float offset of the start vectors: K's [head_dim, rank], then V's */
    uint32_t x[2];       /* float offsets in the scratch, per part: the block as f32 [n, head_dim] */
    uint32_t fa[2];      /* A as f32 [n, rank] */
    uint32_t fb[2];      /* B as f32 [head_dim, rank] */
    uint32_t mask[2];    /* bytes (n * head_dim / 8): bit e % 8 of byte e / 8 set when entry e is an outlier */
    uint32_t counts[2];  /* u32 offsets in the row-count output: outliers per row, [n] */
} KvQCompressJob;

typedef struct KvQCompressParams {
    KvQShape s;
    uint32_t n_jobs;
    uint32_t pad[3];
} KvQCompressParams;

/* Appending: rows t of k, v ([n_tokens, n_kv_heads, head_dim] f32) go to buffer row dst0[g] + t
 * of every head g. */
typedef struct KvQBufferParams {
    KvQShape s;
    uint32_t n_tokens;
    uint32_t pad[3];
} KvQBufferParams;

/* One gather segment: n_bytes from (src_space, src) to (dst_space, dst). */
typedef struct KvQSegment {
    uint32_t src;
    uint32_t dst;
    uint32_t n_bytes;
    uint32_t kind;
    uint32_t adjust;
    uint32_t src_space;
    uint32_t dst_space;
    uint32_t pad;
} KvQSegment;

/* Decoding tokens of one head to f32 (tests and diagnostics). */
typedef struct KvQDecodeParams {
    KvQShape s;
    uint32_t head;
    uint32_t n_tokens;
    uint32_t block0; /* the head's blocks in the table */
    uint32_t n_blocks;
    uint32_t n_compressed;
    uint32_t pad[3];
} KvQDecodeParams;

#endif
