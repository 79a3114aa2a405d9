//! Model file formats: GGUF, safetensors, and the GGML block quantization formats.

pub mod gguf;
pub mod quant;
pub mod safetensors;
