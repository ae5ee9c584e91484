// CPU kernel of quantize_blockwise: per-block absmax, then int8 or packed int4 codes.
#include <torch/library.h>
#include <cstring>
#include "../checks.h"
#include "../quantize.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// absmax of a block; NaN if the block holds a NaN or Inf (so a bad gradient cannot hide).
// Both reductions are order-independent (max of |x|; a sum of zeros unless NaN), so any
// grouping gives the same value as a sequential loop: four W-lane accumulators of each (W the
// native vector width: one register each) keep the max and add chains short.
template <int W>
MU_ALWAYS_INLINE float block_absmax_body(const float* x, int64_t n) {
  using vf = typename Vec<W>::f;
  using vi = typename Vec<W>::i;
  const vi abs_mask = vi{} + 0x7fffffff;
  vf m[4] = {}, p[4] = {};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    for (int u = 0; u < 4; ++u) {
      vf a;
      std::memcpy(&a, x + i + W * u, sizeof a);
      const vf b = reinterpret_cast<vf>(reinterpret_cast<vi>(a) & abs_mask);
      m[u] = b > m[u] ? b : m[u];
      p[u] += a * 0.f;  // NaN iff some x is NaN or Inf
    }
  }
  vf mv = m[0] > m[1] ? m[0] : m[1], m23 = m[2] > m[3] ? m[2] : m[3];
  mv = mv > m23 ? mv : m23;
  const vf pv = (p[0] + p[1]) + (p[2] + p[3]);
  float mx = 0.f, poison = 0.f;
  for (int l = 0; l < W; ++l) {
    mx = mv[l] > mx ? mv[l] : mx;
    poison += pv[l];
  }
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    mx = a > mx ? a : mx;
    poison += x[i] * 0.f;
  }
  return poison == 0.f ? mx : NAN;
}
MU_ISA_VARIANTS(float, block_absmax, (const float* x, int64_t n), (x, n))

#ifdef MU_X86_KERNELS
// AVX2 forms of quantize_value on 8 lanes (gcc leaves the float -> int8 narrowing and the
// int64-indexed hash scalar on AVX2). The caller handles inv == 0 (all codes 0), so y = x * inv;
// the clamps are min/max (the same as quantize_value's compares for every non-NaN r, and r is
// never NaN: inv != 0 means a finite block, |y| <= qmax (1 + 2^-23)).
struct Avx2Codes {
  __m256 hi, lo;
  explicit Avx2Codes(int qmax) : hi(_mm256_set1_ps(static_cast<float>(qmax))), lo(_mm256_set1_ps(-static_cast<float>(qmax))) {}
  __m256i clamp_to_int(__m256 r) const { return _mm256_cvttps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo)); }
};

// 4 x 8 int32 codes (each in [-127, 127]) -> 32 int8 in element order.
inline __m256i narrow_i32x32_to_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);  // per 128-bit lane
  const __m256i abcd = _mm256_packs_epi16(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// uniform_from_index(start + i, seed) for 8 consecutive i (the index's low 32 bits wrap alike).
inline __m256 avx2_uniform(__m256i idx) {
  __m256i h = idx;
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x7feb352dU)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  // h >> 8 < 2^24: exact in float either way, and the scale is a power of two
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}
#endif

// Codes of n elements as int8 (qmax 127, or 7 for int4 before packing), round to nearest
// (quantize_value with noise < 0).
template <int W>
MU_ALWAYS_INLINE void encode_nearest_body(const float* x, int64_t n, float inv, int qmax, int8_t* out) {
  int64_t i = 0;
#ifdef MU_X86_KERNELS
  if constexpr (W == 8) {
    if (inv == 0.f) {  // zero or non-finite block: all codes 0
      std::memset(out, 0, static_cast<size_t>(n));
      return;
    }
    const Avx2Codes cv(qmax);
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i q[4];
    for (; i + 32 <= n; i += 32) {
      for (int u = 0; u < 4; ++u) {
        const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * u), iv);
        q[u] = cv.clamp_to_int(_mm256_round_ps(y, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC));  // nearbyintf
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), narrow_i32x32_to_i8(q[0], q[1], q[2], q[3]));
    }
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<int8_t>(quantize_value(x[i], inv, qmax, -1.f));
}
MU_ISA_VARIANTS(void, encode_nearest, (const float* x, int64_t n, float inv, int qmax, int8_t* out),
                (x, n, inv, qmax, out))

// Stochastic rounding; `start` is the index of x[0] in the whole tensor (the noise stream is
// indexed by it).
template <int W>
MU_ALWAYS_INLINE void encode_stochastic_body(const float* x, int64_t n, float inv, int qmax, int64_t start,
                                             int64_t seed, int8_t* out) {
  int64_t i = 0;
#ifdef MU_X86_KERNELS
  if constexpr (W == 8) {
    if (inv == 0.f) {  // floorf(0 + noise) = 0 for noise in [0, 1), as quantize_value gives
      std::memset(out, 0, static_cast<size_t>(n));
      return;
    }
    const Avx2Codes cv(qmax);
    const __m256 iv = _mm256_set1_ps(inv);
    // hash32(uint32(start + i) + hash32(uint32(seed))): uint32 sums wrap like the scalar's
    const uint32_t base = static_cast<uint32_t>(start) + hash32(static_cast<uint32_t>(seed));
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i eight = _mm256_set1_epi32(8);
    __m256i q[4];
    for (; i + 32 <= n; i += 32) {
      for (int u = 0; u < 4; ++u) {
        const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * u), iv);
        const __m256 r = _mm256_floor_ps(_mm256_add_ps(y, avx2_uniform(idx)));
        idx = _mm256_add_epi32(idx, eight);
        q[u] = cv.clamp_to_int(r);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), narrow_i32x32_to_i8(q[0], q[1], q[2], q[3]));
    }
  }
#endif
  for (; i < n; ++i)
    out[i] = static_cast<int8_t>(quantize_value(x[i], inv, qmax, uniform_from_index(start + i, seed)));
}
MU_ISA_VARIANTS(void, encode_stochastic,
                (const float* x, int64_t n, float inv, int qmax, int64_t start, int64_t seed, int8_t* out),
                (x, n, inv, qmax, start, seed, out))

// Two int4 codes per byte, element 2j in the low nibble of byte j (n odd: high nibble 0).
template <int W>
MU_ALWAYS_INLINE void pack_codes_int4_body(const int8_t* q, int64_t n, uint8_t* out) {
  const int64_t npairs = n / 2;
  int64_t j = 0;
#ifdef MU_X86_KERNELS
  if constexpr (W == 8) {
    // 64 codes -> 32 bytes: as 16-bit words t = (q[2j] + 8) | (q[2j+1] + 8) << 8 (bytewise +8,
    // no carries: codes are in [-7, 7]), byte j = (t & 0xF) | ((t >> 4) & 0xF0) = pack_int4.
    const __m256i off = _mm256_set1_epi8(8), lo4 = _mm256_set1_epi16(0x0F), hi4 = _mm256_set1_epi16(0xF0);
    auto pairs = [&](const int8_t* p) {
      const __m256i t = _mm256_add_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), off);
      return _mm256_or_si256(_mm256_and_si256(t, lo4), _mm256_and_si256(_mm256_srli_epi16(t, 4), hi4));
    };
    for (; j + 32 <= npairs; j += 32) {
      const __m256i b = _mm256_packus_epi16(pairs(q + 2 * j), pairs(q + 2 * j + 32));  // lanes 0 2 1 3
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permute4x64_epi64(b, 0xD8));
    }
  }
#endif
  for (; j < npairs; ++j) out[j] = pack_int4(q[2 * j], q[2 * j + 1]);
  if (n & 1) out[npairs] = pack_int4(q[n - 1], 0);
}
MU_ISA_VARIANTS(void, pack_codes_int4, (const int8_t* q, int64_t n, uint8_t* out), (q, n, out))

template <typename scalar_t>
void quantize_cpu_impl(const scalar_t* x, int64_t numel, int bits, int64_t block, bool stochastic,
                       int64_t seed, uint8_t* codes, float* scales) {
  const int qmax = qmax_for_bits(bits);
  const bool stream = code_bytes(numel, bits) >= kStreamBytes;
  at::parallel_for(0, num_blocks(numel, block), grain_blocks(block), [&](int64_t b0, int64_t b1) {
    alignas(64) float xbuf[kMaxBlock];
    alignas(64) int8_t qbuf[kMaxBlock];
    alignas(64) uint8_t pbuf[kMaxBlock / 2];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, n = std::min(block, numel - start);
      const float* xb = as_float(x + start, n, xbuf);
      const float absmax = block_absmax(xb, n);
      scales[b] = absmax;
      const float inv = quant_inv_scale(absmax, qmax);
      // int8 codes go straight to the output unless it is streamed
      int8_t* q = (bits == 8 && !stream) ? reinterpret_cast<int8_t*>(codes) + start : qbuf;
      if (stochastic) encode_stochastic(xb, n, inv, qmax, start, seed, q);
      else encode_nearest(xb, n, inv, qmax, q);
      if (bits == 8) {
        if (stream) stream_copy_u8(codes + start, reinterpret_cast<const uint8_t*>(qbuf), n);
      } else if (stream) {
        pack_codes_int4(qbuf, n, pbuf);
        stream_copy_u8(codes + start / 2, pbuf, (n + 1) / 2);
      } else {
        pack_codes_int4(qbuf, n, codes + start / 2);
      }
    }
    if (stream) stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, int64_t bits,
                                                          int64_t block, bool stochastic,
                                                          int64_t seed) {
  check_quantize(x, bits, block, at::kCPU);
  const int64_t numel = x.numel();
  at::Tensor codes = at::empty({code_bytes(numel, bits)}, x.options().dtype(code_dtype(bits)));
  at::Tensor scales = at::empty({num_blocks(numel, block)}, x.options().dtype(at::kFloat));
  advise_huge_pages(codes.data_ptr(), codes.numel());
  MU_DISPATCH_FLOATS(x.scalar_type(), "quantize_blockwise", [&] {
    quantize_cpu_impl<scalar_t>(x.data_ptr<scalar_t>(), numel, bits, block, stochastic, seed,
                                static_cast<uint8_t*>(codes.data_ptr()), scales.data_ptr<float>());
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("quantize_blockwise", &quantize_blockwise_cpu); }

}  // namespace mini_unlearn
