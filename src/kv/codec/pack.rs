//! Bit packing of quantization codes and f16 rounding in a chosen direction.
//!
//! A row of `d` codes of `bits` bits is packed LSB-first into `ceil(d * bits / 8)` bytes: code `i`
//! occupies bits `i * bits .. (i + 1) * bits` of the row's little-endian bit stream. Rows start on
//! a byte boundary (so a row can be dropped without re-packing its neighbours); with `d` a
//! multiple of 8, as every real head size is, there is no padding and 3-bit codes take exactly 3
//! bits each.

use half::f16;

/// Bytes of one packed row of `d` codes of `bits` bits.
pub(crate) fn row_bytes(d: usize, bits: u32) -> usize {
    (d * bits as usize).div_ceil(8)
}

/// Packs `codes` (each `< 2^bits`) into `dst` (`row_bytes(codes.len(), bits)` bytes).
pub(crate) fn pack_row(codes: &[u8], bits: u32, dst: &mut [u8]) {
    let mut acc: u64 = 0;
    let mut n_acc = 0u32;
    let mut o = 0;
    for &c in codes {
        acc |= (c as u64) << n_acc;
        n_acc += bits;
        while n_acc >= 8 {
            dst[o] = acc as u8;
            o += 1;
            acc >>= 8;
            n_acc -= 8;
        }
    }
    if n_acc > 0 {
        dst[o] = acc as u8;
    }
}

/// Unpacks `dst.len()` codes of `bits` bits from `src` into `dst`, as f32.
#[inline]
pub(crate) fn unpack_row(src: &[u8], bits: u32, dst: &mut [f32]) {
    match bits {
        8 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s as f32;
            }
        }
        4 => {
            let n_full = dst.len() / 2;
            let mut pairs = dst.chunks_exact_mut(2);
            for (pair, &b) in (&mut pairs).zip(src) {
                pair[0] = (b & 15) as f32;
                pair[1] = (b >> 4) as f32;
            }
            if let [last] = pairs.into_remainder() {
                *last = (src[n_full] & 15) as f32;
            }
        }
        2 => {
            let n_full = dst.len() / 4;
            for (quad, &b) in dst.chunks_exact_mut(4).zip(src) {
                quad[0] = (b & 3) as f32;
                quad[1] = ((b >> 2) & 3) as f32;
                quad[2] = ((b >> 4) & 3) as f32;
                quad[3] = (b >> 6) as f32;
            }
            unpack_generic(&src[n_full..], bits, &mut dst[n_full * 4..]);
        }
        3 => {
            let n_full = dst.len() / 8;
            for (oct, b) in dst.chunks_exact_mut(8).zip(src.chunks_exact(3)) {
                let w = b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16;
                for (i, d) in oct.iter_mut().enumerate() {
                    *d = ((w >> (3 * i)) & 7) as f32;
                }
            }
            unpack_generic(&src[n_full * 3..], bits, &mut dst[n_full * 8..]);
        }
        _ => unpack_generic(src, bits, dst),
    }
}

fn unpack_generic(src: &[u8], bits: u32, dst: &mut [f32]) {
    let mask = (1u64 << bits) - 1;
    let mut acc: u64 = 0;
    let mut n_acc = 0u32;
    let mut si = 0;
    for d in dst {
        if n_acc < bits {
            acc |= (src[si] as u64) << n_acc;
            si += 1;
            n_acc += 8;
        }
        *d = (acc & mask) as f32;
        acc >>= bits;
        n_acc -= bits;
    }
}

/// Code `i` of a packed row.
#[inline]
pub(crate) fn code_at(src: &[u8], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let byte = bit / 8;
    let lo = src[byte] as u32;
    let hi = src.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | hi << 8) >> (bit % 8)) & ((1u32 << bits) - 1)
}

/// Sets code `i` of a packed row to `code` (its low `bits` bits), leaving the others.
pub(crate) fn set_code_at(dst: &mut [u8], bits: u32, i: usize, code: u32) {
    let bit = i * bits as usize;
    let byte = bit / 8;
    let mask = ((1u32 << bits) - 1) << (bit % 8);
    let word = dst[byte] as u32 | dst.get(byte + 1).map_or(0, |&b| (b as u32) << 8);
    let word = (word & !mask) | ((code << (bit % 8)) & mask);
    dst[byte] = word as u8;
    if let Some(b) = dst.get_mut(byte + 1) {
        *b = (word >> 8) as u8;
    }
}

/// The next f16 below `h` (towards -inf); NaN and -inf stay.
fn step_down(h: f16) -> f16 {
    if h.is_nan() || h == f16::NEG_INFINITY {
        return h;
    }
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// The largest f16 `<= x`.
pub(crate) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        step_down(h)
    } else {
        h
    }
}

/// The smallest f16 `>= x`.
pub(crate) fn f16_up(x: f32) -> f16 {
    -f16_down(-x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn pack_round_trips_every_width_and_length() {
        let mut rng = Rng::new(11);
        for bits in [2u32, 3, 4, 8] {
            for d in [1usize, 3, 7, 8, 13, 64, 65] {
                let codes: Vec<u8> = (0..d).map(|_| rng.below(1 << bits) as u8).collect();
                let mut packed = vec![0u8; row_bytes(d, bits)];
                pack_row(&codes, bits, &mut packed);
                let mut out = vec![0f32; d];
                unpack_row(&packed, bits, &mut out);
                for i in 0..d {
                    assert_eq!(out[i], codes[i] as f32, "bits {bits} d {d} i {i}");
                    assert_eq!(code_at(&packed, bits, i), codes[i] as u32);
                }
            }
        }
        assert_eq!(row_bytes(64, 3), 24);
    }

    #[test]
    fn directed_rounding_brackets_the_value() {
        let mut rng = Rng::new(5);
        for _ in 0..10_000 {
            let x = rng.normal() * 10f32.powi(rng.below(9) as i32 - 6);
            let (lo, hi) = (f16_down(x).to_f32(), f16_up(x).to_f32());
            assert!(lo <= x && x <= hi, "{x}: {lo} {hi}");
            assert!(hi - lo <= (x.abs() * 2e-3).max(1.2e-7), "{x}: {lo} {hi}");
        }
        assert_eq!(f16_down(0.0).to_f32(), 0.0);
        assert!(f16_down(-1e-9).to_f32() < 0.0);
    }
}
