//! The closed set of model-level ops and their implementations.

pub mod cpu;
pub mod cuda;
