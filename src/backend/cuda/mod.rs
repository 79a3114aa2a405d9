//! CUDA runtime: loads the embedded fatbin and launches kernels.
