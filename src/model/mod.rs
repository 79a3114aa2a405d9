//! Model configuration, weights, tokenizer and the forward pass.

pub mod chat;
pub mod config;
pub mod llama;
pub mod tokenizer;
pub mod weights;
