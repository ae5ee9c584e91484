// CPU-only helpers: runtime SIMD dispatch and float staging buffers.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include "../quantize.h"

// The baseline build is AVX2+FMA (-mavx2 -mfma -mf16c). Hot loops are cloned for AVX-512
// (x86-64-v4) and picked at load time by the CPU's features (gcc function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define MU_CLONES
#endif

namespace mini_unlearn {

// Elements a tile works on at once: staging buffers of this size stay in L1.
constexpr int64_t kTile = 256;

// Copy n elements of x (fp32, bf16 or fp16) to a float buffer; fp32 input is used in place.
template <typename scalar_t>
inline const float* as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

template <typename scalar_t>
inline void store_from_float(const float* buf, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(buf[i]);
}

// Work split: a grain of about 32k elements per task.
inline int64_t grain_blocks(int64_t block) { return std::max<int64_t>(1, 32768 / block); }

}  // namespace mini_unlearn

namespace mini_unlearn {

MU_CLONES static void decode_int8(const int8_t* codes, int64_t n, float step, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]) * step;
}

MU_CLONES static void decode_int4(const uint8_t* codes, int64_t start, int64_t n, float step,
                                  float* out) {
  for (int64_t i = start; i < start + n; ++i)
    out[i - start] = static_cast<float>(unpack_int4(codes[i >> 1], static_cast<int>(i & 1))) * step;
}

// Decode elements [start, start + n) of one compressed row (n within one block) into out.
static inline void decode_span(const uint8_t* codes, int bits, int64_t start, int64_t n, float step,
                               float* out) {
  if (bits == 8) decode_int8(reinterpret_cast<const int8_t*>(codes) + start, n, step, out);
  else decode_int4(codes, start, n, step, out);
}

}  // namespace mini_unlearn
