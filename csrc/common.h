// Shared between the CPU (.cpp) and CUDA (.cu) kernels: the per-element math of every op
// lives in HOST_DEVICE functions here, so the CPU tests exercise the code the GPU runs.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace mini_unlearn {

constexpr int kMinBlock = 32;
constexpr int kMaxBlock = 4096;

HOST_DEVICE int qmax_for_bits(int bits) { return bits == 8 ? 127 : 7; }

// Bytes one compressed row of `numel` elements takes (int4: two codes per byte).
HOST_DEVICE int64_t code_bytes(int64_t numel, int bits) {
  return bits == 8 ? numel : (numel + 1) / 2;
}

HOST_DEVICE int64_t num_blocks(int64_t numel, int64_t block) {
  return (numel + block - 1) / block;
}

}  // namespace mini_unlearn
