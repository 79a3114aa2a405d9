#!/usr/bin/env python3
"""Writes tests/fixtures/quant/: reference data from the `gguf` Python package for tests/quant.rs.

Run from the repository root with the project's virtual environment, which has `gguf`:

    /work/main/.cuda-venv/bin/python scripts/gen_quant_fixture.py

Output (all binary files are raw little-endian arrays, no header):

  manifest.json          gguf and numpy versions, seed, the input shape, and per type:
                         its GGML id, the file names below, and which of them exist
  inputs.f32             ROWS x COLS f32 inputs, shared by every type (see make_inputs)
  <type>.quantized.bin   gguf.quants.quantize(inputs, type), only for the types gguf can quantize
  <type>.blocks.bin      random valid blocks of <type>: random bytes whose f16 scale fields are
                         replaced by finite f16 values (float types: random finite values)
  <type>.blocks.f32      gguf.quants.dequantize of <type>.blocks.bin

The generator is deterministic for a given seed and gguf/numpy version.
"""

import importlib.metadata
import json
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

SEED = 20250611
ROWS = 8
COLS = 512
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"

# The eleven types kvgear supports, under the names tests/quant.rs and GgmlType::name use.
TYPES = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
}

# Byte offsets of the f16 fields inside one block (the rest of a block is free bits).
F16_FIELDS = {
    "q8_0": [0],  # d
    "q4_0": [0],  # d
    "q4_1": [0, 2],  # d, m
    "q5_0": [0],  # d
    "q5_1": [0, 2],  # d, m
    "q4_k": [0, 2],  # d, dmin
    "q5_k": [0, 2],  # d, dmin
    "q6_k": [208],  # d
}

# How many random blocks to store per type (float types: elements).
N_RANDOM = {"f32": 512, "f16": 512, "bf16": 512, "q4_k": 4, "q5_k": 4, "q6_k": 4}
N_RANDOM_LEGACY = 16


def make_inputs(rng: np.random.Generator) -> np.ndarray:
    """ROWS x COLS f32. Rows cover the cases the quantizers treat specially; COLS is two
    256-element super-blocks, sixteen 32-element blocks."""
    x = np.zeros((ROWS, COLS), dtype=np.float64)
    # 0: standard normal.
    x[0] = rng.standard_normal(COLS)
    # 1: weight-like values with rare large outliers of either sign.
    x[1] = 0.02 * rng.standard_normal(COLS)
    idx = rng.choice(COLS, size=8, replace=False)
    x[1, idx] = rng.choice([-1.0, 1.0], size=8) * rng.uniform(20.0, 60.0, size=8)
    # 2: a super-block of zeros, then a super-block of one positive value.
    x[2, 256:] = 0.731
    # 3: a super-block of one negative value, then a super-block of one tiny positive value.
    x[3, :256] = -1.25
    x[3, 256:] = 1e-3
    # 4: a negative-only super-block, then a positive-only one offset away from zero.
    x[4, :256] = -3.0 * np.abs(rng.standard_normal(256))
    x[4, 256:] = np.abs(rng.standard_normal(256)) + 0.5
    # 5: one special case per 32-element block.
    blocks = x[5].reshape(16, 32)
    blocks[0] = 0.0
    blocks[1] = 2.5
    blocks[2] = -0.375
    blocks[3, 7] = 4.0  # a single spike among zeros
    blocks[4] = rng.standard_normal(32)
    blocks[4, 3], blocks[4, 20] = 5.0, -5.0  # largest magnitude tied between signs
    blocks[5] = 1e-6 * rng.standard_normal(32)  # f16 scale is subnormal
    blocks[6] = 1e-9 * rng.standard_normal(32)  # f16 scale underflows to zero
    blocks[7] = 1e4 * rng.standard_normal(32).clip(-4, 4)  # large, still within f16 range
    blocks[8] = rng.uniform(-1.0, 1.0, 32)
    blocks[9] = 5.0 + 0.1 * rng.standard_normal(32)  # far from zero, positive
    blocks[10] = -5.0 + 0.1 * rng.standard_normal(32)  # far from zero, negative
    blocks[11] = np.arange(-16, 16) / 2.0  # exact halves: rounding ties
    blocks[12] = np.where(np.arange(32) % 2 == 0, 1.0, -1.0)
    blocks[13] = np.linspace(-7.0, 8.0, 32)
    blocks[14, ::5] = rng.standard_normal(7)  # sparse
    blocks[15] = np.arange(32) * (1.0 / 31.0)
    # 6: a ramp in exact steps of 1/64: many values sit exactly on rounding ties.
    x[6] = (np.arange(COLS) - 256) / 64.0
    # 7: uniform values with a different scale per 32-element block, so the sub-block scales of
    #    one super-block span several orders of magnitude.
    scale = np.exp(2.0 * rng.standard_normal(16)).repeat(32)
    x[7] = scale * rng.uniform(-1.0, 1.0, COLS)
    return x.astype(np.float32)


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n sane finite f16 scales of either sign: mostly normal magnitudes, one subnormal."""
    mag = np.exp(rng.uniform(np.log(1e-4), np.log(4.0), n))
    mag[0] = 3e-6  # subnormal in f16
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * mag).astype(np.float16)


def random_blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid encoded data for type `name`, as a flat uint8 array."""
    if name == "f32":
        bits = rng.integers(0, 2**32, N_RANDOM[name], dtype=np.uint64).astype(np.uint32)
        exp_all_ones = (bits & 0x7F800000) == 0x7F800000
        bits[exp_all_ones] &= ~np.uint32(0x40000000)  # clear an exponent bit: finite
        return bits.view(np.uint8)
    if name in ("f16", "bf16"):
        exp_mask = 0x7C00 if name == "f16" else 0x7F80
        bits = rng.integers(0, 2**16, N_RANDOM[name], dtype=np.uint32).astype(np.uint16)
        exp_all_ones = (bits & exp_mask) == exp_mask
        bits[exp_all_ones] &= ~np.uint16(0x4000)
        return bits.view(np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[TYPES[name]]
    n_blocks = N_RANDOM.get(name, N_RANDOM_LEGACY)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint16).astype(np.uint8)
    for off in F16_FIELDS[name]:
        raw[:, off : off + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def can_quantize(qtype: T) -> bool:
    probe = np.zeros((1, 256), dtype=np.float32)
    try:
        quants.quantize(probe, qtype)
    except NotImplementedError:
        return False
    return True


def main() -> None:
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(rng)
    inputs.astype("<f4").tofile(OUT / "inputs.f32")

    manifest = {
        "generator": "scripts/gen_quant_fixture.py",
        "gguf_version": getattr(gguf, "__version__", None) or importlib.metadata.version("gguf"),
        "numpy_version": np.__version__,
        "seed": SEED,
        "inputs": {"file": "inputs.f32", "rows": ROWS, "cols": COLS},
        "types": {},
    }
    with np.errstate(all="ignore"):
        for name, qtype in TYPES.items():
            entry = {"id": int(qtype), "quantized": None}
            if can_quantize(qtype):
                q = np.asarray(quants.quantize(inputs, qtype))
                q.view(np.uint8).tofile(OUT / f"{name}.quantized.bin")
                entry["quantized"] = f"{name}.quantized.bin"

            raw = random_blocks(name, rng)
            raw.tofile(OUT / f"{name}.blocks.bin")
            deq = quants.dequantize(raw.reshape(1, -1), qtype).astype("<f4").reshape(-1)
            deq.tofile(OUT / f"{name}.blocks.f32")
            entry["blocks"] = f"{name}.blocks.bin"
            entry["blocks_n_elems"] = int(deq.size)
            entry["blocks_dequantized"] = f"{name}.blocks.f32"
            manifest["types"][name] = entry

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
