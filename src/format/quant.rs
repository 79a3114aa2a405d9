//! GGML tensor types and their block layouts.
//!
//! Every block format is defined once here, with one reference dequantizer that every test and
//! every backend checks against, and one reference quantizer that writes the same bytes
//! llama.cpp's `quantize_row_*_ref` functions write.
//!
//! All multi-byte fields are little-endian. `f16` fields are IEEE half floats (read and written
//! with the `half` crate, round-to-nearest-even). A row is a whole number of blocks, laid end to
//! end; element `i` of a row lives in block `i / block_elems`.
//!
//! | type | elems | bytes | layout (byte offsets inside one block)                               |
//! |------|-------|-------|----------------------------------------------------------------------|
//! | q4_0 | 32    | 18    | 0 d:f16, 2 qs[16]                                                    |
//! | q4_1 | 32    | 20    | 0 d:f16, 2 m:f16, 4 qs[16]                                           |
//! | q5_0 | 32    | 22    | 0 d:f16, 2 qh:u32, 6 qs[16]                                          |
//! | q5_1 | 32    | 24    | 0 d:f16, 2 m:f16, 4 qh:u32, 8 qs[16]                                 |
//! | q8_0 | 32    | 34    | 0 d:f16, 2 qs:i8[32]                                                 |
//! | q4_K | 256   | 144   | 0 d:f16, 2 dmin:f16, 4 scales[12], 16 qs[128]                        |
//! | q5_K | 256   | 176   | 0 d:f16, 2 dmin:f16, 4 scales[12], 16 qh[32], 48 qs[128]             |
//! | q6_K | 256   | 210   | 0 ql[128], 128 qh[64], 192 scales:i8[16], 208 d:f16                  |
//!
//! Each dequantizer below spells out how its block's bits map to elements.

use anyhow::{bail, Result};
use half::f16;

/// A GGML tensor type, with the numeric id GGUF files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type for a GGUF type id; `None` for ids kvgear does not support.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Lower-case name as llama.cpp spells it (`q4_k`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
            GgmlType::BF16 => "bf16",
        }
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        let lower = name.to_ascii_lowercase();
        GgmlType::ALL.iter().copied().find(|t| t.name() == lower)
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a row of `n_elems` elements, or `None` when `n_elems` is not a whole number of
    /// blocks (or the byte count overflows).
    pub fn row_bytes(self, n_elems: usize) -> Option<usize> {
        if n_elems % self.block_elems() != 0 {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether this is a block-quantized type (as opposed to a plain float type).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements in a block of the legacy formats (q4_0, q4_1, q5_0, q5_1, q8_0).
const QK: usize = 32;
/// Elements in a K-quant super-block (q4_K, q5_K, q6_K).
const QK_K: usize = 256;
/// Bytes of the packed 6-bit sub-block scales and mins of q4_K and q5_K.
const K_SCALE_SIZE: usize = 12;
/// A group whose largest magnitude is below this counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Checks that a row of `n_elems` elements of `ty` is a whole number of blocks stored in exactly
/// `n_bytes` bytes.
fn check_row(ty: GgmlType, n_elems: usize, n_bytes: usize) -> Result<()> {
    let Some(expected) = ty.row_bytes(n_elems) else {
        bail!(
            "{n_elems} elements is not a whole number of {ty} blocks of {}",
            ty.block_elems()
        );
    };
    if n_bytes != expected {
        bail!("{ty}: expected {expected} bytes for {n_elems} elements, got {n_bytes}");
    }
    Ok(())
}

/// The f16 at byte offset `off`, widened to f32 (exactly).
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Stores `v` as f16 (round to nearest, ties to even) at byte offset `off`.
fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Rounds `v` to the nearest bf16 (ties to even) the way ggml does (`ggml_compute_fp32_to_bf16`):
/// a NaN keeps its sign and top mantissa bits and is forced quiet.
fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    // No overflow: the largest non-NaN pattern, 0xff80_0000, plus 0x8000 stays below 2^32.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// Reference dequantizer: `src` holds exactly `dst.len()` elements of type `ty` as stored.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row(ty, dst.len(), src.len())?;
    let block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => dequantize_f32,
        GgmlType::F16 => dequantize_f16,
        GgmlType::BF16 => dequantize_bf16,
        GgmlType::Q8_0 => dequantize_q8_0,
        GgmlType::Q4_0 => dequantize_q4_0,
        GgmlType::Q4_1 => dequantize_q4_1,
        GgmlType::Q5_0 => dequantize_q5_0,
        GgmlType::Q5_1 => dequantize_q5_1,
        GgmlType::Q4K => dequantize_q4_k,
        GgmlType::Q5K => dequantize_q5_k,
        GgmlType::Q6K => dequantize_q6_k,
    };
    for (b, y) in src
        .chunks_exact(ty.block_bytes())
        .zip(dst.chunks_exact_mut(ty.block_elems()))
    {
        block(b, y);
    }
    Ok(())
}

/// f32: 4 bytes, little-endian IEEE single.
fn dequantize_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

/// f16: 2 bytes, little-endian IEEE half.
fn dequantize_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

/// bf16: 2 bytes, the top half of an f32.
fn dequantize_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
}

/// q8_0, 34 bytes: `d` f16 at 0, then 32 signed bytes at 2..34; element `j` is `qs[j] * d`.
fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *yj = f32::from(q as i8) * d;
    }
}

/// q4_0, 18 bytes: `d` f16 at 0, `qs` at 2..18. Byte `qs[j]` holds element `j` in its low nibble
/// and element `j + 16` in its high nibble; a nibble `q` stands for `(q - 8) * d`.
fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..2 + QK / 2];
    for j in 0..QK / 2 {
        let lo = i32::from(qs[j] & 0x0F) - 8;
        let hi = i32::from(qs[j] >> 4) - 8;
        y[j] = lo as f32 * d;
        y[j + QK / 2] = hi as f32 * d;
    }
}

/// q4_1, 20 bytes: `d` f16 at 0, `m` f16 at 2, `qs` at 4..20, nibbles placed as in q4_0; a nibble
/// `q` stands for `q * d + m`.
fn dequantize_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..4 + QK / 2];
    for j in 0..QK / 2 {
        y[j] = f32::from(qs[j] & 0x0F) * d + m;
        y[j + QK / 2] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// q5_0, 22 bytes: `d` f16 at 0, `qh` u32 at 2, `qs` at 6..22. The low four bits of element `j`
/// sit in `qs` as in q4_0; its fifth bit is bit `j` of `qh`. A 5-bit `q` stands for `(q - 16) * d`.
fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..6 + QK / 2];
    for j in 0..QK / 2 {
        let lo = u32::from(qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = u32::from(qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4);
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + QK / 2] = (hi as i32 - 16) as f32 * d;
    }
}

/// q5_1, 24 bytes: `d` f16 at 0, `m` f16 at 2, `qh` u32 at 4, `qs` at 8..24, bits placed as in
/// q5_0. A 5-bit `q` stands for `q * d + m`.
fn dequantize_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..8 + QK / 2];
    for j in 0..QK / 2 {
        let lo = u32::from(qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
        let hi = u32::from(qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4);
        y[j] = lo as f32 * d + m;
        y[j + QK / 2] = hi as f32 * d + m;
    }
}

/// The 6-bit scale and 6-bit min of sub-block `j` (0..8) of a q4_K or q5_K block, from the 12
/// packed bytes `s`:
///
/// - sub-blocks 0..4: scale in the low 6 bits of `s[j]`, min in the low 6 bits of `s[j + 4]`;
/// - sub-blocks 4..8: low 4 bits of the scale in the low nibble of `s[j + 4]`, low 4 bits of the
///   min in its high nibble; the top 2 bits of the scale are the top 2 bits of `s[j - 4]`, the top
///   2 bits of the min the top 2 bits of `s[j]`.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Packs the 6-bit scale `sc` and min `m` of sub-block `j` into `s`, the inverse of
/// [`scale_min_k4`]. Sub-blocks 0..4 must be packed before 4..8 (those OR their top bits into the
/// bytes the first four wrote).
fn put_scale_min_k4(j: usize, sc: u8, m: u8, s: &mut [u8]) {
    if j < 4 {
        s[j] = sc;
        s[j + 4] = m;
    } else {
        s[j + 4] = (sc & 0x0F) | ((m & 0x0F) << 4);
        s[j - 4] |= (sc >> 4) << 6;
        s[j] |= (m >> 4) << 6;
    }
}

/// q4_K, 144 bytes: `d` f16 at 0, `dmin` f16 at 2, 12 bytes of packed 6-bit scales and mins at
/// 4..16 (see [`scale_min_k4`]), `qs` at 16..144. Eight sub-blocks of 32 elements; sub-block `i`
/// has scale `d * sc_i` and offset `dmin * m_i`, and a 4-bit `q` stands for `d*sc_i * q - dmin*m_i`.
/// The 256 elements come in four chunks of 64: chunk `c` uses `qs[32c..32c+32]`, whose low
/// nibbles are elements `64c..64c+32` (sub-block `2c`) and high nibbles elements
/// `64c+32..64c+64` (sub-block `2c+1`).
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..4 + K_SCALE_SIZE];
    let qs = &b[16..16 + QK_K / 2];
    for c in 0..QK_K / 64 {
        let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
        let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        for l in 0..32 {
            let q = qs[32 * c + l];
            y[64 * c + l] = d_lo * f32::from(q & 0x0F) - min_lo;
            y[64 * c + 32 + l] = d_hi * f32::from(q >> 4) - min_hi;
        }
    }
}

/// q5_K, 176 bytes: `d` f16 at 0, `dmin` f16 at 2, 12 bytes of packed scales and mins at 4..16,
/// `qh` at 16..48, `qs` at 48..176. Scales, offsets and the low four bits of each element are as
/// in q4_K; the fifth bit of element `64c + l` is bit `2c` of `qh[l]`, and of element
/// `64c + 32 + l` bit `2c + 1` of `qh[l]` (`l` in 0..32).
fn dequantize_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..4 + K_SCALE_SIZE];
    let qh = &b[16..16 + QK_K / 8];
    let qs = &b[48..48 + QK_K / 2];
    for c in 0..QK_K / 64 {
        let (sc_lo, m_lo) = scale_min_k4(2 * c, scales);
        let (sc_hi, m_hi) = scale_min_k4(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        for l in 0..32 {
            let q = qs[32 * c + l];
            let q_lo = (q & 0x0F) | (((qh[l] >> (2 * c)) & 1) << 4);
            let q_hi = (q >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            y[64 * c + l] = d_lo * f32::from(q_lo) - min_lo;
            y[64 * c + 32 + l] = d_hi * f32::from(q_hi) - min_hi;
        }
    }
}

/// q6_K, 210 bytes: `ql` (low four bits) at 0..128, `qh` (high two bits) at 128..192, sixteen
/// signed 8-bit sub-block scales at 192..208, `d` f16 at 208. Sixteen sub-blocks of 16 elements;
/// a 6-bit `q` of sub-block `s` stands for `d * scales[s] * (q - 32)`.
///
/// The block is two halves of 128 elements; half `h` uses `ql[64h..64h+64]`, `qh[32h..32h+32]`
/// and `scales[8h..8h+8]`. For `l` in 0..32, with `e = 128h + l`:
///
/// | element  | low 4 bits           | high 2 bits          | scale                   |
/// |----------|----------------------|----------------------|-------------------------|
/// | `e`      | low nibble `ql[l]`   | bits 0-1 of `qh[l]`  | `scales[8h + l/16]`     |
/// | `e + 32` | low nibble `ql[l+32]`| bits 2-3 of `qh[l]`  | `scales[8h + l/16 + 2]` |
/// | `e + 64` | high nibble `ql[l]`  | bits 4-5 of `qh[l]`  | `scales[8h + l/16 + 4]` |
/// | `e + 96` | high nibble `ql[l+32]`| bits 6-7 of `qh[l]` | `scales[8h + l/16 + 6]` |
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..QK_K / 2];
    let qh = &b[128..128 + QK_K / 4];
    let scales = &b[192..192 + QK_K / 16];
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &ql[64 * h..64 * h + 64];
        let qh = &qh[32 * h..32 * h + 32];
        let sc = |k: usize| f32::from(scales[8 * h + k] as i8);
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let s = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc(s) * q1 as f32;
            y[l + 32] = d * sc(s + 2) * q2 as f32;
            y[l + 64] = d * sc(s + 4) * q3 as f32;
            y[l + 96] = d * sc(s + 6) * q4 as f32;
        }
    }
}

/// Reference quantizer: writes the `src.len()` elements of `src` as type `ty` into `dst`, which
/// must be exactly the row's size. Float types round to nearest, ties to even. Block types follow
/// llama.cpp's `quantize_row_*_ref` step for step in f32 arithmetic (no fused multiply-add), so the
/// bytes match theirs; the legacy types also match the `gguf` Python package's quantizers.
///
/// Block types reject non-finite inputs: llama.cpp's reference code has no defined result for them.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row(ty, src.len(), dst.len())?;
    if ty.is_quantized() {
        if let Some(i) = src.iter().position(|v| !v.is_finite()) {
            bail!(
                "quantize {ty}: element {i} is {}, not a finite number",
                src[i]
            );
        }
    }
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => |x, b| b.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, b| put_f16(b, 0, x[0]),
        GgmlType::BF16 => |x, b| b.copy_from_slice(&f32_to_bf16_bits(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => quantize_q8_0,
        GgmlType::Q4_0 => quantize_q4_0,
        GgmlType::Q4_1 => quantize_q4_1,
        GgmlType::Q5_0 => quantize_q5_0,
        GgmlType::Q5_1 => quantize_q5_1,
        GgmlType::Q4K => quantize_q4_k,
        GgmlType::Q5K => quantize_q5_k,
        GgmlType::Q6K => quantize_q6_k,
    };
    for (x, b) in src
        .chunks_exact(ty.block_elems())
        .zip(dst.chunks_exact_mut(ty.block_bytes()))
    {
        block(x, b);
    }
    Ok(())
}

/// The element of largest magnitude, keeping its sign; the first one on ties, and +0 for an
/// all-zero block (ggml's scan with a strict `<`, starting from `amax = max = 0`).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Smallest and largest element (ggml's scan from `FLT_MAX` / `-FLT_MAX`).
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `1 / d`, or 0 when `d` is zero (an all-zero block quantizes to level zero everywhere).
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// C's `MIN(top, (int)v)`: truncation toward zero, then the top clamp. `v` is never below zero
/// here; the low clamp only keeps the cast to `u8` honest.
fn truncate_level(v: f32, top: i32) -> u8 {
    (v as i32).clamp(0, top) as u8
}

/// q8_0 (`quantize_row_q8_0_ref`): `d = amax / 127`, `q = round(x / d)`, halves away from zero.
fn quantize_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x
        .iter()
        .fold(0.0f32, |a, &v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    put_f16(b, 0, d);
    for (q, &v) in b[2..2 + QK].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// q4_0 (`quantize_row_q4_0_ref`): `d = max / -8` with `max` the signed element of largest
/// magnitude, so `max` lands exactly on level 0 and `-max` would be level 16, clamped to 15.
fn quantize_q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    put_f16(b, 0, d);
    for j in 0..QK / 2 {
        let lo = truncate_level(x[j] * id + 8.5, 15);
        let hi = truncate_level(x[j + QK / 2] * id + 8.5, 15);
        b[2 + j] = lo | (hi << 4);
    }
}

/// q4_1 (`quantize_row_q4_1_ref`): `d = (max - min) / 15`, `m = min`, `q = round_half_up((x - min) / d)`.
fn quantize_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..QK / 2 {
        let lo = truncate_level((x[j] - min) * id + 0.5, 15);
        let hi = truncate_level((x[j + QK / 2] - min) * id + 0.5, 15);
        b[4 + j] = lo | (hi << 4);
    }
}

/// q5_0 (`quantize_row_q5_0_ref`): as q4_0 with `d = max / -16` and levels 0..=31.
fn quantize_q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let lo = truncate_level(x[j] * id + 16.5, 31);
        let hi = truncate_level(x[j + QK / 2] * id + 16.5, 31);
        b[6 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= u32::from(lo >> 4) << j;
        qh |= u32::from(hi >> 4) << (j + QK / 2);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// q5_1 (`quantize_row_q5_1_ref`): as q4_1 with `d = (max - min) / 31` and levels 0..=31.
fn quantize_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let lo = truncate_level((x[j] - min) * id + 0.5, 31);
        let hi = truncate_level((x[j + QK / 2] - min) * id + 0.5, 31);
        b[8 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= u32::from(lo >> 4) << j;
        qh |= u32::from(hi >> 4) << (j + QK / 2);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `nearest_int`: adding 1.5 * 2^23 leaves the rounded integer (ties to even) in the low
/// mantissa bits. ggml asserts |v| <= 2^22 - 1; beyond that both implementations return the same
/// wrapped value, which the callers then clamp.
fn nearest_int(v: f32) -> i32 {
    let biased = v + 12_582_912.0;
    (biased.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants` with squared error: fits `x ≈ scale * l - the_min` with `l` in
/// 0..=`nmax` and `the_min >= 0`, minimising the `weights`-weighted squared error. It starts
/// from the min/max fit, then tries `nstep + 1` scales `(nmax + rmin + rdelta * is) / (max - min)`,
/// solving the weighted least-squares scale and offset for each one's levels and keeping the best.
/// Writes the chosen levels to `levels` and returns `(scale, the_min)`.
///
/// Public so that tests can hold the search against a brute-force one on random sub-blocks.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// What q4_K and q5_K share (`quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`): fits each
/// 32-element sub-block with [`make_qkx2_quants`] (weights `rms(sub-block) + |x|`), quantizes the
/// eight scales and eight mins to 6 bits against the largest of each, writes `d`, `dmin` and the
/// packed scales into bytes 0..16 of `b`, then requantizes every element to the nearest level
/// (0..=`nmax`) of its stored scale and min. Sub-blocks whose stored scale is zero keep the
/// levels of the fit.
fn quantize_k_scales_mins(
    x: &[f32],
    nmax: i32,
    (rmin, rdelta, nstep): (f32, f32, i32),
    b: &mut [u8],
    levels: &mut [u8; QK_K],
) {
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut aux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            &mut aux,
            rmin,
            rdelta,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut b[4..4 + K_SCALE_SIZE];
    packed.fill(0);
    for j in 0..QK_K / 32 {
        // ggml stores the rounded value in a uint8_t (wrapping) before clamping it to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        put_scale_min_k4(j, ls, lm, packed);
    }
    put_f16(b, 0, max_scale / 63.0);
    put_f16(b, 2, max_min / 63.0);

    let d_all = f16_at(b, 0);
    let dmin_all = f16_at(b, 2);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &b[4..4 + K_SCALE_SIZE]);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// q4_K (`quantize_row_q4_K_ref`): levels 0..=15, search `rmin = -1, rdelta = 0.1, nstep = 20`.
fn quantize_q4_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    quantize_k_scales_mins(x, 15, (-1.0, 0.1, 20), b, &mut levels);
    let qs = &mut b[16..16 + QK_K / 2];
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
        }
    }
}

/// q5_K (`quantize_row_q5_K_ref`): levels 0..=31, search `rmin = -0.5, rdelta = 0.1, nstep = 15`.
fn quantize_q5_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    quantize_k_scales_mins(x, 31, (-0.5, 0.1, 15), b, &mut levels);
    let (qh, qs) = b[16..].split_at_mut(QK_K / 8);
    qh.fill(0);
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            let lo = levels[64 * c + l];
            let hi = levels[64 * c + 32 + l];
            qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            qs[32 * c + l] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        }
    }
}

/// ggml's `make_qx_quants` as q6_K calls it (`rmse_type = 1`, no importance weights): fits
/// `x ≈ scale * (l - nmax)` with `l` in 0..2*nmax, weighting each element by `x²`. Starts from
/// `scale = -max / nmax` (`max` the signed element of largest magnitude), takes the weighted
/// least-squares scale for those levels, then tries 18 nearby starting scales and keeps any whose
/// levels explain more of the weighted signal. Writes the levels and returns the scale.
///
/// Public so that tests can hold the search against an exhaustive one on random sub-blocks.
pub fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level_of = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level_of(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (q, &v) in levels.iter_mut().zip(x) {
        *q = (level_of(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in levels.iter_mut().zip(x) {
                *q = (level_of(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// q6_K (`quantize_row_q6_K_ref`): fits each 16-element sub-block with [`make_qx_quants`]
/// (levels -32..=31), stores `d = -max_scale / 128` (`max_scale` the signed sub-block scale of
/// largest magnitude) and 8-bit sub-block scales `round(scale / d)` capped at 127, then
/// requantizes every element to the nearest level of its stored scale. A block whose scales are
/// all (near) zero is stored as all-zero bytes.
fn quantize_q6_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for s in 0..QK_K / 16 {
        let scale = make_qx_quants(
            32,
            &x[16 * s..16 * s + 16],
            &mut levels[16 * s..16 * s + 16],
        );
        scales[s] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return;
    }

    let iscale = -128.0 / max_scale;
    put_f16(b, 208, 1.0 / iscale);
    for s in 0..QK_K / 16 {
        // ggml stores min(127, round) in an int8_t, wrapping anything below -128.
        b[192 + s] = (nearest_int(iscale * scales[s]).min(127) as i8) as u8;
    }
    let d_all = f16_at(b, 208);
    for s in 0..QK_K / 16 {
        let d = d_all * f32::from(b[192 + s] as i8);
        if d == 0.0 {
            continue;
        }
        for i in 16 * s..16 * s + 16 {
            levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }

    let (ql, rest) = b.split_at_mut(QK_K / 2);
    let qh = &mut rest[..QK_K / 4];
    for h in 0..2 {
        let l6 = &levels[128 * h..128 * h + 128];
        let ql = &mut ql[64 * h..64 * h + 64];
        let qh = &mut qh[32 * h..32 * h + 32];
        for l in 0..32 {
            ql[l] = (l6[l] & 0x0F) | ((l6[l + 64] & 0x0F) << 4);
            ql[l + 32] = (l6[l + 32] & 0x0F) | ((l6[l + 96] & 0x0F) << 4);
            qh[l] = (l6[l] >> 4)
                | ((l6[l + 32] >> 4) << 2)
                | ((l6[l + 64] >> 4) << 4)
                | ((l6[l + 96] >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (v, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (3.49, 3),
        ] {
            assert_eq!(nearest_int(v), want, "nearest_int({v})");
        }
        for i in -4000..4000 {
            let v = i as f32 * 0.37;
            assert_eq!(
                nearest_int(v),
                v.round_ties_even() as i32,
                "nearest_int({v})"
            );
        }
    }

    #[test]
    fn k4_scales_pack_and_unpack() {
        let sc = [0u8, 63, 17, 40, 63, 1, 32, 47];
        let m = [63u8, 0, 5, 33, 2, 63, 48, 16];
        let mut packed = [0u8; K_SCALE_SIZE];
        for j in 0..8 {
            put_scale_min_k4(j, sc[j], m[j], &mut packed);
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_0_block_layout() {
        let mut block = [0u8; 18];
        block[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 0x3F; // element 0: nibble 15, element 16: nibble 3
        let mut y = [0.0f32; 32];
        dequantize(GgmlType::Q4_0, &block, &mut y).unwrap();
        assert_eq!(y[0], 3.5);
        assert_eq!(y[16], -2.5);
        assert_eq!(y[1], -4.0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        let one = 1.0f32.to_bits();
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa, 1.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(one + (1 << 15))), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(f32_to_bf16_bits(f32::from_bits(one + (3 << 15))), 0x3f82);
        assert_eq!(
            f32_to_bf16_bits(f32::from_bits(one + (1 << 15) + 1)),
            0x3f81
        );
        // A signalling NaN whose payload lies in the low half stays a NaN.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn signed_absmax_keeps_the_first_of_tied_magnitudes() {
        assert_eq!(signed_absmax(&[1.0, -3.0, 3.0]), -3.0);
        assert_eq!(signed_absmax(&[0.0, 0.0]), 0.0);
    }
}
