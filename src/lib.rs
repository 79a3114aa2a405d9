//! kvgear: Llama-family inference in little memory.
//!
//! The crate is organised as DESIGN.md describes: `format` reads model files, `model` builds the
//! configuration, tokenizer and forward pass, `backend` holds the closed set of ops (CPU reference,
//! fast CPU, CUDA), `kv` the cache, `bench` the measured runs.

pub mod backend;
pub mod bench;
pub mod eval;
pub mod fetch;
pub mod format;
pub mod kv;
pub mod model;
pub mod rng;
pub mod sample;
pub mod synth;
