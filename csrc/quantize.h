// Per-element math of blockwise absmax quantisation (int8 and int4), shared by CPU and CUDA.
//   scale  = absmax of the block (stored fp32)
//   code   = clamp(round(x * qmax / absmax), -qmax, qmax)     (round half to even)
//   x_hat  = code * (absmax / qmax)
// so |x - x_hat| <= absmax / (2 qmax) for round-to-nearest.
// int4 codes are stored offset by 8 (a nibble in 1..15), element 2i in the low nibble of byte i.
#pragma once
#include "common.h"

namespace mini_unlearn {

// Multiplier that maps x to code units; 0 for an all-zero block (codes all 0).
HOST_DEVICE float quant_inv_scale(float absmax, int qmax) {
  return absmax > 0.f ? static_cast<float>(qmax) / absmax : 0.f;
}

HOST_DEVICE float dequant_step(float absmax, int qmax) {
  return absmax / static_cast<float>(qmax);
}

// One row's term of dequant_axpy: acc + (coeff_j * step_j) * code, one fused multiply-add.
HOST_DEVICE float dequant_axpy_step(float acc, float coeff_step, float code) {
  return fmadd(coeff_step, code, acc);
}

// Counter-based uniform in [0, 1) for stochastic rounding: the same stream on CPU, CUDA and
// in the PyTorch reference (lowbias32 hash of the element index mixed with the seed).
HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

HOST_DEVICE float uniform_from_index(int64_t index, int64_t seed) {
  uint32_t h = hash32(static_cast<uint32_t>(index) + hash32(static_cast<uint32_t>(seed)));
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// Code of one element. `noise` < 0 means round to nearest; otherwise floor(y + noise)
// (unbiased stochastic rounding when noise ~ U[0, 1)).
HOST_DEVICE int quantize_value(float x, float inv_scale, int qmax, float noise) {
  float y = inv_scale == 0.f ? 0.f : x * inv_scale;  // zero or non-finite block: all codes 0
  float r = noise < 0.f ? nearbyintf(y) : floorf(y + noise);
  r = r > static_cast<float>(qmax) ? static_cast<float>(qmax) : r;
  r = r < -static_cast<float>(qmax) ? -static_cast<float>(qmax) : r;
  return static_cast<int>(r);
}

HOST_DEVICE uint8_t pack_int4(int lo, int hi) {
  return static_cast<uint8_t>((lo + 8) | ((hi + 8) << 4));
}

HOST_DEVICE int unpack_int4(uint8_t byte, int which) {
  return static_cast<int>(which ? (byte >> 4) : (byte & 0xF)) - 8;
}

// Code of element `i` of a compressed row (int8: signed bytes; int4: packed nibbles).
HOST_DEVICE int load_code(const uint8_t* codes, int64_t i, int bits) {
  return bits == 8 ? static_cast<int>(static_cast<int8_t>(codes[i]))
                   : unpack_int4(codes[i >> 1], static_cast<int>(i & 1));
}

}  // namespace mini_unlearn
