// Shared between the CPU (.cpp) and CUDA (.cu) kernels: the per-element math of every op
// lives in HOST_DEVICE functions here, so the CPU tests exercise the code the GPU runs.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels instantiate these templates on their vector types inside
// per-ISA clones (csrc/cpu/simd.h); an out-of-line copy would be compiled for the baseline ISA
// only and called through memory.
#define HOST_DEVICE __attribute__((always_inline)) inline
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

// a * b + c with a single rounding. The builds keep plain mul and add unfused (-ffp-contract=off,
// --fmad=false) so that every path rounds alike; where the shared math wants a fused
// multiply-add it says so with fmadd, which is correctly rounded on every path (an FMA
// instruction on x86 with FMA and on GPUs), so CPU vector, CPU scalar and CUDA still agree
// bit for bit. The vector types of the CPU kernels overload it (csrc/cpu/simd.h).
HOST_DEVICE float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
HOST_DEVICE float fmsub(float a, float b, float c) { return fmaf(a, b, -c); }   // a * b - c
HOST_DEVICE float fnmadd(float a, float b, float c) { return fmaf(-a, b, c); }  // c - a * b

}  // namespace mini_unlearn
