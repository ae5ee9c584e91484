// CPU-only helpers: runtime SIMD dispatch, float staging buffers, and the memory-traffic
// helpers of the large-output kernels (huge-page advice, streaming stores).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include "../quantize.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

// The baseline build is AVX2+FMA+F16C (-mavx2 -mfma -mf16c). Hot loops are compiled twice, for
// that baseline and for AVX-512, from one always-inline body (MU_ISA_VARIANTS below), and the
// variant is picked at run time by cpu_isa(): the CPU's features, unless the environment
// variable MINI_UNLEARN_CPU_ISA forces the baseline (see cpu_isa.cpp).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define MU_X86_KERNELS 1
// AVX-512 F/BW/DQ/VL/CD (x86-64-v4's ISA set); the loops gcc vectorises here use 512-bit
// vectors (setup.py passes -mprefer-vector-width=512).
#define MU_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd")))
#endif
#define MU_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace mini_unlearn {

// Which clone of the hot loops runs. Read once per process: MINI_UNLEARN_CPU_ISA unset, empty,
// "auto" or "native" picks AVX-512 when the CPU has it; "avx2" (or "baseline") forces the
// baseline clone; "avx512" insists on AVX-512 (an error on a CPU without it).
enum class CpuIsa : int { kBaseline = 0, kAvx512 = 1 };
CpuIsa cpu_isa();           // csrc/cpu/cpu_isa.cpp
const char* cpu_isa_name();  // "avx2" or "avx512" ("generic" off x86-64)

inline bool use_avx512() {
#ifdef MU_X86_KERNELS
  static const bool wide = cpu_isa() == CpuIsa::kAvx512;
  return wide;
#else
  return false;
#endif
}

}  // namespace mini_unlearn

// MU_ISA_VARIANTS(ret, name, (params), (args)) defines name_avx512 and name_avx2 from the
// always-inline template name_body<W> (W: the float lanes of one native vector, 16 or 8) and
// `name` that calls the one use_avx512() picks. Both variants run the same per-element math;
// a body whose result depends on a grouping must fix that grouping itself (not W).
#ifdef MU_X86_KERNELS
#define MU_ISA_VARIANTS(ret, name, params, args)                                            \
  [[maybe_unused]] MU_TARGET_AVX512 __attribute__((noinline)) static ret name##_avx512 params { \
    return name##_body<16> args;                                                            \
  }                                                                                         \
  [[maybe_unused]] __attribute__((noinline)) static ret name##_avx2 params {                \
    return name##_body<8> args;                                                             \
  }                                                                                         \
  [[maybe_unused]] static inline ret name params {                                          \
    return ::mini_unlearn::use_avx512() ? name##_avx512 args : name##_avx2 args;            \
  }
#else
#define MU_ISA_VARIANTS(ret, name, params, args) \
  [[maybe_unused]] static inline ret name params { return name##_body<8> args; }
#endif

namespace mini_unlearn {

// gcc vector-extension types of W lanes (one register of the native width: 16 lanes under
// AVX-512, 8 under AVX2); Vec<W>::f / Vec<W>::i are the float / int32 types.
typedef float mu_v8f __attribute__((vector_size(32)));
typedef float mu_v16f __attribute__((vector_size(64)));
typedef int32_t mu_v8i __attribute__((vector_size(32)));
typedef int32_t mu_v16i __attribute__((vector_size(64)));
template <int W>
struct Vec;
template <>
struct Vec<8> {
  using f = mu_v8f;
  using i = mu_v8i;
};
template <>
struct Vec<16> {
  using f = mu_v16f;
  using i = mu_v16i;
};

// A float vector of W lanes (W = the native width: 16 under AVX-512, 8 under AVX2, so that one VF
// is one register) with the operators the shared per-element templates (contraction.h,
// contraction2.h) use, so that their math is evaluated on W elements at a time. fmadd, fmsub and
// fnmadd are one fused multiply-add per lane, the vector twins of common.h's scalar ones.
template <int W>
struct VF {
  using V = typename Vec<W>::f;
  V v;
  VF() = default;
  MU_ALWAYS_INLINE VF(V x) : v(x) {}
  MU_ALWAYS_INLINE explicit VF(float f) : v(V{} + f) {}
  MU_ALWAYS_INLINE friend VF operator+(VF a, VF b) { return VF(a.v + b.v); }
  MU_ALWAYS_INLINE friend VF operator-(VF a, VF b) { return VF(a.v - b.v); }
  MU_ALWAYS_INLINE friend VF operator*(VF a, VF b) { return VF(a.v * b.v); }
  // One vfmadd231ps / vfmsub231ps / vfnmadd231ps of the register's width: AVX2 intrinsics for
  // ymm; inline assembly for zmm inside the AVX-512 clone, because gcc keeps vector mul and add
  // unfused here (-ffp-contract=off) and refuses to inline the AVX-512 intrinsics into the
  // ISA-neutral bodies that MU_ISA_VARIANTS clones. Off x86: one correctly rounded fmaf per lane.
  MU_ALWAYS_INLINE friend VF fmadd(VF a, VF b, VF c) { return fused<0>(a, b, c); }   // a b + c
  MU_ALWAYS_INLINE friend VF fmsub(VF a, VF b, VF c) { return fused<1>(a, b, c); }   // a b - c
  MU_ALWAYS_INLINE friend VF fnmadd(VF a, VF b, VF c) { return fused<2>(a, b, c); }  // c - a b
  template <int kOp>
  MU_ALWAYS_INLINE static VF fused(VF a, VF b, VF c) {
#ifdef MU_X86_KERNELS
    if constexpr (W == 8) {  // the baseline's own ISA: intrinsics, which gcc schedules and folds
      const __m256 x = reinterpret_cast<__m256>(a.v), y = reinterpret_cast<__m256>(b.v),
                   z = reinterpret_cast<__m256>(c.v);
      const __m256 r = kOp == 0 ? _mm256_fmadd_ps(x, y, z) : kOp == 1 ? _mm256_fmsub_ps(x, y, z)
                                                                     : _mm256_fnmadd_ps(x, y, z);
      return VF(reinterpret_cast<V>(r));
    } else {
      if constexpr (kOp == 0) asm("vfmadd231ps %2, %1, %0" : "+v"(c.v) : "v"(a.v), "vm"(b.v));
      else if constexpr (kOp == 1) asm("vfmsub231ps %2, %1, %0" : "+v"(c.v) : "v"(a.v), "vm"(b.v));
      else asm("vfnmadd231ps %2, %1, %0" : "+v"(c.v) : "v"(a.v), "vm"(b.v));
      return c;
    }
#else
    V r;
    for (int l = 0; l < W; ++l)
      r[l] = __builtin_fmaf(kOp == 2 ? -a.v[l] : a.v[l], b.v[l], kOp == 1 ? -c.v[l] : c.v[l]);
    return VF(r);
#endif
  }
  MU_ALWAYS_INLINE static VF load(const float* p) {
    V x;
    std::memcpy(&x, p, sizeof x);
    return VF(x);
  }
  MU_ALWAYS_INLINE void store(float* p) const { std::memcpy(p, &v, sizeof v); }
};

// Elements a tile works on at once: staging buffers of this size stay in L1.
constexpr int64_t kTile = 256;

// bf16 <-> fp32 with c10::BFloat16's exact semantics (round to nearest even, NaN -> 0x7FC0),
// written on the bit patterns so that the loops vectorise; fp16 through F16C (also RNE).
template <int W>
MU_ALWAYS_INLINE void bf16_to_float_body(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(out + i, &u, 4);
  }
}
MU_ISA_VARIANTS(void, bf16_to_float, (const uint16_t* x, int64_t n, float* out), (x, n, out))

template <int W>
MU_ALWAYS_INLINE void float_to_bf16_body(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    const uint16_t r = static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFFu)) >> 16);
    out[i] = x[i] != x[i] ? uint16_t(0x7FC0) : r;
  }
}
MU_ISA_VARIANTS(void, float_to_bf16, (const float* x, int64_t n, uint16_t* out), (x, n, out))

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
[[maybe_unused]] static void stream_copy_f32(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#ifdef MU_HAVE_STREAM
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

[[maybe_unused]] static void stream_copy_u8(uint8_t* dst, const uint8_t* src, int64_t n) {
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

template <int W>
MU_ALWAYS_INLINE void decode_int8_body(const int8_t* codes, int64_t n, float step, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]) * step;
}
MU_ISA_VARIANTS(void, decode_int8, (const int8_t* codes, int64_t n, float step, float* out),
                (codes, n, step, out))

// Whole bytes: out[2j], out[2j+1] from the low and high nibble of bytes[j].
template <int W>
MU_ALWAYS_INLINE void decode_int4_pairs_body(const uint8_t* bytes, int64_t npairs, float step, float* out) {
  for (int64_t j = 0; j < npairs; ++j) {
    const uint8_t b = bytes[j];
    out[2 * j] = static_cast<float>(unpack_int4(b, 0)) * step;
    out[2 * j + 1] = static_cast<float>(unpack_int4(b, 1)) * step;
  }
}
MU_ISA_VARIANTS(void, decode_int4_pairs, (const uint8_t* bytes, int64_t npairs, float step, float* out),
                (bytes, npairs, step, out))

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
