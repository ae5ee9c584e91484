// CPU kernel of dequant_dot: out[j] = <W_j, v> for k compressed rows W_j, reading each row
// once and never materialising it (v's block is staged once and reused by all k rows).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// int8 rows over a whole span of blocks with the step folded in per lane, in double: every
// block's 16 lane partial sums (lane l: elements 32g + l and 32g + 16 + l of the block, one
// fused multiply-add each, the two halves added) are widened to double and accumulated as
// lane_acc[l] += partial[l] * step, so no block needs a horizontal reduction. The 16 double
// lanes are reduced once per span in a fixed order (lane_sum16d), and a partial block's
// elements past its last multiple of 32 are added in order (tail). AVX-512 keeps the 16 lanes in
// one float / two double registers, AVX2 in two / four, the generic loop in arrays: the same
// operations per lane, so the same bits on every path.
inline double lane_sum16d(double* t) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

struct SpanInt8 {
  const int8_t* c[4];  // rows, at the span's first element
  const float* s[4];   // each row's scales (absmax), at the span's first block
  int qmax;

  // the block's step, as the other paths form it (fp32), then widened
  double step(int r, int64_t b) const { return static_cast<double>(dequant_step(s[r][b], qmax)); }
};

#ifdef MU_X86_KERNELS
template <int R>
MU_TARGET_AVX512 void span_int8_avx512(const SpanInt8& in, const float* v, int64_t block, int64_t nblk,
                                       int64_t n, double* out) {
  __m512d lo[R], hi[R];
  double tail[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_pd(), tail[r] = 0.0;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t start = b * block, len = std::min(block, n - start), full = len / 32 * 32;
    __m512 a[R], c2[R];
    for (int r = 0; r < R; ++r) a[r] = c2[r] = _mm512_setzero_ps();
    for (int64_t i = start; i < start + full; i += 32) {
      const __m512 v0 = _mm512_loadu_ps(v + i), v1 = _mm512_loadu_ps(v + i + 16);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(load16_i8_as_f32(in.c[r] + i), v0, a[r]);
        c2[r] = _mm512_fmadd_ps(load16_i8_as_f32(in.c[r] + i + 16), v1, c2[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_add_ps(a[r], c2[r]);
      const double st = in.step(r, b);
      const __m512d sd = _mm512_set1_pd(st);
      // the all-ones-mask forms: gcc 12 warns spuriously on the plain ones' undefined operand
      const __m256 p_lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(__mmask8(0xFF), _mm512_castps_pd(p), 0));
      const __m256 p_hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(__mmask8(0xFF), _mm512_castps_pd(p), 1));
      lo[r] = _mm512_fmadd_pd(_mm512_maskz_cvtps_pd(__mmask8(0xFF), p_lo), sd, lo[r]);
      hi[r] = _mm512_fmadd_pd(_mm512_maskz_cvtps_pd(__mmask8(0xFF), p_hi), sd, hi[r]);
      if (full < len) {
        float t = 0.f;
        for (int64_t j = start + full; j < start + len; ++j) t += static_cast<float>(in.c[r][j]) * v[j];
        tail[r] += static_cast<double>(t) * st;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) double t[16];
    _mm512_store_pd(t, lo[r]);
    _mm512_store_pd(t + 8, hi[r]);
    out[r] += lane_sum16d(t) + tail[r];
  }
}

inline __m256 load8_i8_as_f32(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int R>
void span_int8_avx2(const SpanInt8& in, const float* v, int64_t block, int64_t nblk, int64_t n, double* out) {
  __m256d acc[R][4];  // lanes 0-3, 4-7, 8-11, 12-15
  double tail[R];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_pd();
    tail[r] = 0.0;
  }
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t start = b * block, len = std::min(block, n - start), full = len / 32 * 32;
    __m256 a0[R], a1[R], b0[R], b1[R];  // lanes 0-7 / 8-15 of the two 16-lane partial sums
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = b0[r] = b1[r] = _mm256_setzero_ps();
    for (int64_t i = start; i < start + full; i += 32) {
      const __m256 v0 = _mm256_loadu_ps(v + i), v1 = _mm256_loadu_ps(v + i + 8);
      const __m256 v2 = _mm256_loadu_ps(v + i + 16), v3 = _mm256_loadu_ps(v + i + 24);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(load8_i8_as_f32(in.c[r] + i), v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(load8_i8_as_f32(in.c[r] + i + 8), v1, a1[r]);
        b0[r] = _mm256_fmadd_ps(load8_i8_as_f32(in.c[r] + i + 16), v2, b0[r]);
        b1[r] = _mm256_fmadd_ps(load8_i8_as_f32(in.c[r] + i + 24), v3, b1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 p0 = _mm256_add_ps(a0[r], b0[r]), p1 = _mm256_add_ps(a1[r], b1[r]);
      const double st = in.step(r, b);
      const __m256d sd = _mm256_set1_pd(st);
      acc[r][0] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(p0)), sd, acc[r][0]);
      acc[r][1] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(p0, 1)), sd, acc[r][1]);
      acc[r][2] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(p1)), sd, acc[r][2]);
      acc[r][3] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(p1, 1)), sd, acc[r][3]);
      if (full < len) {
        float t = 0.f;
        for (int64_t j = start + full; j < start + len; ++j) t += static_cast<float>(in.c[r][j]) * v[j];
        tail[r] += static_cast<double>(t) * st;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) double t[16];
    for (int q = 0; q < 4; ++q) _mm256_store_pd(t + 4 * q, acc[r][q]);
    out[r] += lane_sum16d(t) + tail[r];
  }
}
#endif

[[maybe_unused]] void span_int8_generic(const SpanInt8& in, int rows, const float* v, int64_t block, int64_t nblk, int64_t n,
                       double* out) {
  for (int r = 0; r < rows; ++r) {
    double acc[16] = {}, tail = 0.0;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t start = b * block, len = std::min(block, n - start), full = len / 32 * 32;
      float a[16] = {}, c2[16] = {};
      for (int64_t i = start; i < start + full; i += 32)
        for (int l = 0; l < 16; ++l) {
          a[l] = std::fma(static_cast<float>(in.c[r][i + l]), v[i + l], a[l]);
          c2[l] = std::fma(static_cast<float>(in.c[r][i + 16 + l]), v[i + 16 + l], c2[l]);
        }
      const double st = in.step(r, b);
      for (int l = 0; l < 16; ++l) acc[l] = std::fma(static_cast<double>(a[l] + c2[l]), st, acc[l]);
      if (full < len) {
        float t = 0.f;
        for (int64_t j = start + full; j < start + len; ++j) t += static_cast<float>(in.c[r][j]) * v[j];
        tail += static_cast<double>(t) * st;
      }
    }
    out[r] += lane_sum16d(acc) + tail;
  }
}

// out[r] += sum over the span of rows r < rows <= 4 (codes, v and n relative to the span start).
void span_rows_int8(const SpanInt8& in, int rows, const float* v, int64_t block, int64_t nblk, int64_t n,
                    double* out) {
#ifdef MU_X86_KERNELS
  const bool wide = use_avx512();
  switch (rows) {
    case 4: return wide ? span_int8_avx512<4>(in, v, block, nblk, n, out) : span_int8_avx2<4>(in, v, block, nblk, n, out);
    case 3: return wide ? span_int8_avx512<3>(in, v, block, nblk, n, out) : span_int8_avx2<3>(in, v, block, nblk, n, out);
    case 2: return wide ? span_int8_avx512<2>(in, v, block, nblk, n, out) : span_int8_avx2<2>(in, v, block, nblk, n, out);
    default: return wide ? span_int8_avx512<1>(in, v, block, nblk, n, out) : span_int8_avx2<1>(in, v, block, nblk, n, out);
  }
#else
  span_int8_generic(in, rows, v, block, nblk, n, out);
#endif
}

// Float dot products of R rows against v (int4 rows, decoded per block): lane l of 16
// partial sums adds elements 16g + l (multiply, then add), the lanes are reduced by
// lane_sum16, then the tail is added in order. On AVX-512 the 16 lanes are one register, on
// AVX2 two (W = 8: part p holds lanes 8p .. 8p + 7), so both give the same bits.
template <int W, int R>
MU_ALWAYS_INLINE void dot_f32_rows_body(const float* const* w, const float* v, int64_t n, float* out) {
  using V = typename Vec<W>::f;
  constexpr int P = 16 / W;
  V acc[R][P] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int p = 0; p < P; ++p) {
      V vv;
      std::memcpy(&vv, v + i + p * W, sizeof vv);
      for (int r = 0; r < R; ++r) {
        V ww;
        std::memcpy(&ww, w[r] + i + p * W, sizeof ww);
        acc[r][p] += ww * vv;
      }
    }
  for (int r = 0; r < R; ++r) {
    alignas(64) float t[16];
    std::memcpy(t, acc[r], sizeof t);
    float s = lane_sum16(t);
    for (int64_t j = i; j < n; ++j) s += w[r][j] * v[j];
    out[r] = s;
  }
}

template <int W>
MU_ALWAYS_INLINE void dot4_f32_body(const float* w0, const float* w1, const float* w2, const float* w3,
                                    const float* v, int64_t n, float* out) {
  const float* w[4] = {w0, w1, w2, w3};
  dot_f32_rows_body<W, 4>(w, v, n, out);
}
MU_ISA_VARIANTS(void, dot4_f32,
                (const float* w0, const float* w1, const float* w2, const float* w3, const float* v,
                 int64_t n, float* out),
                (w0, w1, w2, w3, v, n, out))

template <int W>
MU_ALWAYS_INLINE float dot_f32_body(const float* a, const float* b, int64_t n) {
  float s;
  dot_f32_rows_body<W, 1>(&a, b, n, &s);
  return s;
}
MU_ISA_VARIANTS(float, dot_f32, (const float* a, const float* b, int64_t n), (a, b, n))

// Blocks [bs, be) of every row against v (staged in vb): acc[j] += <W_j block, v block> * step
// for each block in ascending order. Rows go four at a time through the whole span, so each
// visit to a row reads many KiB contiguously (prefetch-friendly even with many rows).
constexpr int64_t kSpan = 65536;

void span_dots(const uint8_t* codes, const float* scales, int64_t row_bytes, int64_t nb, int64_t k,
               int bits, int qmax, int64_t block, int64_t d, int64_t bs, int64_t be,
               const float* vb, float (*wbuf)[kMaxBlock], double* acc) {
  const int64_t span0 = bs * block;
  float sums[4];
  for (int64_t j = 0; j < k; j += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, k - j));
    if (bits == 8) {  // the whole span at once, the step folded in per lane (span_rows_int8)
      SpanInt8 in;
      in.qmax = qmax;
      for (int r = 0; r < rows; ++r) {
        in.c[r] = reinterpret_cast<const int8_t*>(codes) + (j + r) * row_bytes + span0;
        in.s[r] = scales + (j + r) * nb + bs;
      }
      span_rows_int8(in, rows, vb, block, be - bs, std::min(be * block, d) - span0, acc + j);
      continue;
    }
    for (int64_t b = bs; b < be; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* v = vb + (start - span0);
      if (rows == 4) {  // int4 rows: decoded to floats, summed with the same lane grouping
        for (int r = 0; r < 4; ++r) decode_span(codes + (j + r) * row_bytes, bits, start, n, 1.f, wbuf[r]);
        dot4_f32(wbuf[0], wbuf[1], wbuf[2], wbuf[3], v, n, sums);
      } else {
        for (int r = 0; r < rows; ++r) {
          decode_span(codes + (j + r) * row_bytes, bits, start, n, 1.f, wbuf[0]);
          sums[r] = dot_f32(wbuf[0], v, n);
        }
      }
      for (int r = 0; r < rows; ++r)
        acc[j + r] += static_cast<double>(sums[r]) * dequant_step(scales[(j + r) * nb + b], qmax);
    }
  }
}

template <typename scalar_t>
void dequant_dot_impl(const uint8_t* codes, const float* scales, const scalar_t* v, int64_t k,
                      int64_t d, int bits, int64_t block, float* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  // Blocks per span: 64Ki elements when v is fp32 (read in place; each row visit then reads
  // 64 KiB of codes contiguously, and v's span stays in L2 for the next group of rows), else
  // what the staging buffer holds.
  const int64_t span = std::max<int64_t>(1, (std::is_same_v<scalar_t, float> ? kSpan : kMaxBlock) / block);
  const int nthreads = at::get_num_threads();
  // Each thread's k sums start a cache line (8 doubles) past the previous thread's last one:
  // threads adding into one shared line would pass it between cores on every block.
  const size_t stride = static_cast<size_t>((k + 7) / 8 * 8 + 8);
  std::vector<double> partial(static_cast<size_t>(nthreads) * stride, 0.0);
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * stride;
    alignas(64) float vbuf[kMaxBlock];
    alignas(64) float wbuf[4][kMaxBlock];
    for (int64_t bs = b0; bs < b1; bs += span) {
      const int64_t be = std::min(b1, bs + span);
      const int64_t start = bs * block, n = std::min(be * block, d) - start;
      const float* vb = as_float(v + start, n, vbuf);
      span_dots(codes, scales, row_bytes, nb, k, bits, qmax, block, d, bs, be, vb, wbuf, acc);
    }
  });
  for (int64_t j = 0; j < k; ++j) {
    double s = 0.0;
    for (int t = 0; t < nthreads; ++t) s += partial[static_cast<size_t>(t) * stride + j];
    out[j] = static_cast<float>(s);
  }
}

at::Tensor dequant_dot_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& v,
                           int64_t bits, int64_t block) {
  const int64_t k = check_dot(codes, scales, v, bits, block, at::kCPU);
  at::Tensor out = at::empty({k}, v.options().dtype(at::kFloat));
  MU_DISPATCH_FLOATS(v.scalar_type(), "dequant_dot", [&] {
    dequant_dot_impl<scalar_t>(static_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr<float>(),
                               v.data_ptr<scalar_t>(), k, v.numel(), static_cast<int>(bits), block,
                               out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("dequant_dot", &dequant_dot_cpu); }

}  // namespace mini_unlearn
