// CPU-only helpers: runtime SIMD dispatch, float staging buffers, and the memory-traffic
// helpers of the large-output kernels (huge-page advice, streaming stores).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include "../quantize.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

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

// bf16 <-> fp32 with c10::BFloat16's exact semantics (round to nearest even, NaN -> 0x7FC0),
// written on the bit patterns so that the loops vectorise; fp16 through F16C (also RNE).
[[maybe_unused]] MU_CLONES static void bf16_to_float(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(out + i, &u, 4);
  }
}

[[maybe_unused]] MU_CLONES static void float_to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    const uint16_t r = static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFFu)) >> 16);
    out[i] = x[i] != x[i] ? uint16_t(0x7FC0) : r;
  }
}

static inline void half_to_float(const uint16_t* x, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(c10::Half(x[i], c10::Half::from_bits()));
}

static inline void float_to_half(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) out[i] = c10::Half(x[i]).x;
}

// Copy n elements of x (fp32, bf16 or fp16) to a float buffer; fp32 input is used in place.
template <typename scalar_t>
inline const float* as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(x), n, buf);
    return buf;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    half_to_float(reinterpret_cast<const uint16_t*>(x), n, buf);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

template <typename scalar_t>
inline void store_from_float(const float* buf, int64_t n, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float_to_bf16(buf, n, reinterpret_cast<uint16_t*>(out));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float_to_half(buf, n, reinterpret_cast<uint16_t*>(out));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(buf[i]);
  }
}

// Hand-written AVX-512 / AVX2 kernels (where the compiler's own vectorisation is weak, e.g. the
// int8 -> float widening) are picked once at run time by the CPU's features.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define MU_X86_KERNELS 1
#define MU_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}
#endif

#ifdef MU_X86_KERNELS
// 16 int8 codes -> 16 floats (vpmovsxbd + vcvtdq2ps; the all-ones-mask forms avoid gcc 12's
// spurious -Wmaybe-uninitialized on _mm512_undefined_*).
MU_TARGET_AVX512 inline __m512 load16_i8_as_f32(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_maskz_cvtepi32_ps(__mmask16(0xFFFF), _mm512_maskz_cvtepi8_epi32(__mmask16(0xFFFF), b));
}
#endif

// Sum of 16 lane partial sums in a fixed pairwise order (l + l+8, then + l+4, + l+2, + l+1).
inline float lane_sum16(float* t) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// Work split: a grain of about 32k elements per task.
inline int64_t grain_blocks(int64_t block) { return std::max<int64_t>(1, 32768 / block); }

// ---- memory traffic of large outputs ----------------------------------------------------------
//
// A freshly allocated output is first touched by the kernel. With 4 KiB pages every touch of
// a new page is a fault (a zeroed page from the OS); on VMs where that fault is expensive it
// costs several times the kernel's own work (measured: first touch at ~2 GB/s vs ~20 GB/s with
// 2 MiB pages). PyTorch can back every large allocation with transparent huge pages
// (THP_MEM_ALLOC_ENABLE=1); without it, the kernels ask for them on their own outputs.
constexpr int64_t kHugePage = int64_t(1) << 21;

inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < 2 * kHugePage) return;
  auto lo = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  auto hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t(kHugePage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#else
  (void)p;
  (void)bytes;
#endif
}

// Outputs at least this large are written with streaming (non-temporal) stores: they do not
// fit in cache anyway, and a normal store first reads the line it overwrites (write-allocate),
// which would add the output's size again to the memory traffic.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

#if defined(__AVX__)
#define MU_HAVE_STREAM 1
#endif

// dst[0, n) = src[0, n) with streaming stores where dst is 32-byte aligned.
[[maybe_unused]] MU_CLONES static void stream_copy_f32(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#ifdef MU_HAVE_STREAM
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

[[maybe_unused]] MU_CLONES static void stream_copy_u8(uint8_t* dst, const uint8_t* src, int64_t n) {
  int64_t i = 0;
#ifdef MU_HAVE_STREAM
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 32 <= n; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// Orders this thread's streaming stores before the parallel region ends.
inline void stream_fence() {
#ifdef MU_HAVE_STREAM
  _mm_sfence();
#endif
}

}  // namespace mini_unlearn

namespace mini_unlearn {

[[maybe_unused]] MU_CLONES static void decode_int8(const int8_t* codes, int64_t n, float step, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]) * step;
}

// Whole bytes: out[2j], out[2j+1] from the low and high nibble of bytes[j].
[[maybe_unused]] MU_CLONES static void decode_int4_pairs(const uint8_t* bytes, int64_t npairs, float step, float* out) {
  for (int64_t j = 0; j < npairs; ++j) {
    const uint8_t b = bytes[j];
    out[2 * j] = static_cast<float>(unpack_int4(b, 0)) * step;
    out[2 * j + 1] = static_cast<float>(unpack_int4(b, 1)) * step;
  }
}

static inline void decode_int4(const uint8_t* codes, int64_t start, int64_t n, float step,
                               float* out) {
  int64_t i = start;
  const int64_t end = start + n;
  if ((i & 1) && i < end) {  // odd start: the high nibble of a byte first
    out[0] = static_cast<float>(unpack_int4(codes[i >> 1], 1)) * step;
    ++i;
  }
  const int64_t npairs = (end - i) / 2;
  decode_int4_pairs(codes + (i >> 1), npairs, step, out + (i - start));
  i += 2 * npairs;
  if (i < end) out[i - start] = static_cast<float>(unpack_int4(codes[i >> 1], 0)) * step;
}

// Decode elements [start, start + n) of one compressed row (n within one block) into out.
static inline void decode_span(const uint8_t* codes, int bits, int64_t start, int64_t n, float step,
                               float* out) {
  if (bits == 8) decode_int8(reinterpret_cast<const int8_t*>(codes) + start, n, step, out);
  else decode_int4(codes, start, n, step, out);
}

}  // namespace mini_unlearn
