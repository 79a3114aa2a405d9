//! CPU backends: `reference` (plain loops, the oracle) and `fast` (SIMD and threads).

pub mod reference;
