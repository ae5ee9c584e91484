// CPU kernel of dequant_axpy: y + sum_j coeff[j] * W_j over k compressed rows, in one pass
// (each block of y is staged once, all k rows are added into it, then it is written).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// y += c_j * w_j for up to four rows per pass over y (y is loaded and stored once). Every path
// adds the rows in order, one fused multiply-add each (quantize.h's dequant_axpy_step),
// fma(c1, w1, fma(c0, w0, y)) ..., the same arithmetic as a row-by-row loop, so the result is
// the same on every ISA and grouping (and on the GPU).
#ifdef MU_X86_KERNELS
template <int R>
MU_TARGET_AVX512 void axpy_int8_avx512(float* y, const int8_t* const* wp, const float* c, int64_t n) {
  const int8_t* w[R];
  __m512 cv[R];
  for (int r = 0; r < R; ++r) w[r] = wp[r], cv[r] = _mm512_set1_ps(c[r]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 t = _mm512_loadu_ps(y + i);
    for (int r = 0; r < R; ++r) t = _mm512_fmadd_ps(cv[r], load16_i8_as_f32(w[r] + i), t);
    _mm512_storeu_ps(y + i, t);
  }
  for (; i < n; ++i) {
    float t = y[i];
    for (int r = 0; r < R; ++r) t = dequant_axpy_step(t, c[r], static_cast<float>(w[r][i]));
    y[i] = t;
  }
}

template <int R>
void axpy_int8_avx2(float* y, const int8_t* const* wp, const float* c, int64_t n) {
  const int8_t* w[R];
  __m256 cv[R];
  for (int r = 0; r < R; ++r) w[r] = wp[r], cv[r] = _mm256_set1_ps(c[r]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 t = _mm256_loadu_ps(y + i);
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w[r] + i));
      t = _mm256_fmadd_ps(cv[r], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), t);
    }
    _mm256_storeu_ps(y + i, t);
  }
  for (; i < n; ++i) {
    float t = y[i];
    for (int r = 0; r < R; ++r) t = dequant_axpy_step(t, c[r], static_cast<float>(w[r][i]));
    y[i] = t;
  }
}
#endif

// y[i] += c[r] * w[r][i] for rows r < rows <= 4, in row order.
void axpy_rows_int8(float* y, const int8_t* const* w, const float* c, int rows, int64_t n) {
#ifdef MU_X86_KERNELS
  const bool wide = use_avx512();
  switch (rows) {
    case 4: return wide ? axpy_int8_avx512<4>(y, w, c, n) : axpy_int8_avx2<4>(y, w, c, n);
    case 3: return wide ? axpy_int8_avx512<3>(y, w, c, n) : axpy_int8_avx2<3>(y, w, c, n);
    case 2: return wide ? axpy_int8_avx512<2>(y, w, c, n) : axpy_int8_avx2<2>(y, w, c, n);
    default: return wide ? axpy_int8_avx512<1>(y, w, c, n) : axpy_int8_avx2<1>(y, w, c, n);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    float t = y[i];
    for (int r = 0; r < rows; ++r) t = dequant_axpy_step(t, c[r], static_cast<float>(w[r][i]));
    y[i] = t;
  }
#endif
}

template <int W>
MU_ALWAYS_INLINE void axpy_f32_body(float* y, const float* w, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = dequant_axpy_step(y[i], c, w[i]);
}
MU_ISA_VARIANTS(void, axpy_f32, (float* y, const float* w, float c, int64_t n), (y, w, c, n))

constexpr int64_t kSpan = 65536;

template <typename scalar_t>
void dequant_axpy_impl(const scalar_t* y, const uint8_t* codes, const float* scales,
                       const float* coeff, int64_t k, int64_t d, int bits, int64_t block,
                       scalar_t* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const int64_t span = std::max<int64_t>(1, kSpan / block);  // blocks per span: <= 64Ki elements
  const bool stream = std::is_same_v<scalar_t, float> && d * 4 >= kStreamBytes;
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    std::vector<float> ybuf_v(static_cast<size_t>(std::min(span * block, d)));
    float* ybuf = ybuf_v.data();
    alignas(64) float wbuf[kMaxBlock];
    for (int64_t bs = b0; bs < b1; bs += span) {
      // A span of y (up to 64Ki elements, 256 KiB: in L2) is staged once; rows go four at a
      // time through the whole span (many KiB read contiguously per row visit). Every element
      // still receives the rows in ascending order, ((y + c0 w0) + c1 w1) + ..., whatever the
      // grouping.
      const int64_t be = std::min(b1, bs + span);
      const int64_t span0 = bs * block, len = std::min(be * block, d) - span0;
      const float* ys = as_float(y + span0, len, ybuf);
      if (ys != ybuf) std::copy(ys, ys + len, ybuf);
      int64_t j = 0;
      if (bits == 8) {
        const auto* w = reinterpret_cast<const int8_t*>(codes);
        for (; j < k; j += 4) {
          const int rows = static_cast<int>(std::min<int64_t>(4, k - j));
          for (int64_t b = bs; b < be; ++b) {
            const int64_t start = b * block, n = std::min(block, d - start);
            float c[4];
            const int8_t* wr[4];
            for (int r = 0; r < rows; ++r) {
              c[r] = coeff[j + r] * dequant_step(scales[(j + r) * nb + b], qmax);
              wr[r] = w + (j + r) * row_bytes + start;
            }
            axpy_rows_int8(ybuf + (start - span0), wr, c, rows, n);
          }
        }
      } else {
        for (; j < k; ++j)
          for (int64_t b = bs; b < be; ++b) {
            const int64_t start = b * block, n = std::min(block, d - start);
            decode_span(codes + j * row_bytes, bits, start, n, 1.f, wbuf);
            axpy_f32(ybuf + (start - span0), wbuf, coeff[j] * dequant_step(scales[j * nb + b], qmax), n);
          }
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream) stream_copy_f32(out + span0, ybuf, len);
        else std::copy(ybuf, ybuf + len, out + span0);
      } else {
        store_from_float(ybuf, len, out + span0);
      }
    }
    if (stream) stream_fence();
  });
}

at::Tensor dequant_axpy_cpu(const at::Tensor& y, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& coeff, int64_t bits, int64_t block) {
  const int64_t k = check_axpy(y, codes, scales, coeff, bits, block, at::kCPU);
  at::Tensor out = at::empty_like(y);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  MU_DISPATCH_FLOATS(y.scalar_type(), "dequant_axpy", [&] {
    dequant_axpy_impl<scalar_t>(y.data_ptr<scalar_t>(), static_cast<const uint8_t*>(codes.data_ptr()),
                                scales.data_ptr<float>(), coeff.data_ptr<float>(), k, y.numel(),
                                static_cast<int>(bits), block, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("dequant_axpy", &dequant_axpy_cpu); }

}  // namespace mini_unlearn
