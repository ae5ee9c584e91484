// CUDA-only helpers shared by the kernels in cuda/*.cu: launch sizing and 8-element staged
// loads/stores (vectorised when aligned). The per-element math itself stays in the shared
// HOST_DEVICE headers (quantize.h, contraction.h); these helpers only move bytes.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <algorithm>
#include <cstdint>
#include "../quantize.h"

namespace mini_unlearn {
namespace cuda {

// Elements one thread handles at once. Quantisation blocks are powers of two >= kMinBlock (32),
// so an 8-aligned group of elements never straddles a block, and for int4 an 8-aligned group
// starts on a byte boundary (4 whole bytes).
constexpr int kVec = 8;
constexpr int kThreads = 256;

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Grid for a grid-stride loop over `work` items, `threads` items per block per pass.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, cap)));
}

// Can element groups [8g, 8g + 8) of a `T` array be loaded/stored as one aligned vector?
template <typename T>
inline bool vec_ok(const T* p) {
  return is_aligned(p, kVec * static_cast<int64_t>(sizeof(T)));
}

// Can 8-element groups of every row of a [rows, row_bytes] code matrix be loaded as a vector?
inline bool codes_vec_ok(const void* codes, int64_t rows, int64_t row_bytes, int bits) {
  const int64_t bytes = bits == 8 ? kVec : kVec / 2;
  return is_aligned(codes, bytes) && (rows <= 1 || row_bytes % bytes == 0);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// out[t] = p[e + t] as float for e + t < n, else 0. `vec`: p is vec_ok and e % kVec == 0.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t e, int64_t n, bool vec, float out[kVec]) {
  if (vec && e + kVec <= n) {
    const AlignedVec<T, kVec> r = *reinterpret_cast<const AlignedVec<T, kVec>*>(p + e);
#pragma unroll
    for (int t = 0; t < kVec; ++t) out[t] = static_cast<float>(r.val[t]);
  } else {
#pragma unroll
    for (int t = 0; t < kVec; ++t) out[t] = e + t < n ? static_cast<float>(p[e + t]) : 0.f;
  }
}

// p[e + t] = in[t] (converted to T) for e + t < n.
template <typename T>
__device__ __forceinline__ void store8(T* p, int64_t e, int64_t n, bool vec, const float in[kVec]) {
  if (vec && e + kVec <= n) {
    AlignedVec<T, kVec> r;
#pragma unroll
    for (int t = 0; t < kVec; ++t) r.val[t] = static_cast<T>(in[t]);
    *reinterpret_cast<AlignedVec<T, kVec>*>(p + e) = r;
  } else {
#pragma unroll
    for (int t = 0; t < kVec; ++t)
      if (e + t < n) p[e + t] = static_cast<T>(in[t]);
  }
}

// Codes of elements [e, e + 8) of one compressed row of n elements (0 beyond n), through the
// shared load_code. `vec`: the row is codes_vec_ok and e % kVec == 0.
__device__ __forceinline__ void load_codes8(const uint8_t* row, int64_t e, int64_t n, int bits,
                                            bool vec, int out[kVec]) {
  if (vec && e + kVec <= n) {
    if (bits == 8) {
      const AlignedVec<uint8_t, kVec> r = *reinterpret_cast<const AlignedVec<uint8_t, kVec>*>(row + e);
#pragma unroll
      for (int t = 0; t < kVec; ++t) out[t] = load_code(r.val, t, 8);
    } else {  // e even: element e + t sits in nibble (t & 1) of local byte t / 2
      const AlignedVec<uint8_t, kVec / 2> r =
          *reinterpret_cast<const AlignedVec<uint8_t, kVec / 2>*>(row + e / 2);
#pragma unroll
      for (int t = 0; t < kVec; ++t) out[t] = load_code(r.val, t, 4);
    }
  } else {
#pragma unroll
    for (int t = 0; t < kVec; ++t) out[t] = e + t < n ? load_code(row, e + t, bits) : 0;
  }
}

}  // namespace cuda
}  // namespace mini_unlearn
