//! fp16 KV cache.
