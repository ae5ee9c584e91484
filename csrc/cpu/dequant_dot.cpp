// CPU kernel of dequant_dot: out[j] = <W_j, v> for k compressed rows W_j, reading each row
// once and never materialising it (v's block is staged once and reused by all k rows).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// Code-unit dot products (step 1; the block's step scales the sum once), up to four rows per
// pass: v is loaded once for all of them and the independent sums hide the add latency.
// int8 rows: every path keeps two 16-lane partial sums over each 32 elements (lane l of the
// first sums elements 32g + l, of the second 32g + 16 + l, one fused multiply-add each), adds
// them lane by lane, reduces the 16 lanes in a fixed order (lane_sum16), then adds the tail in
// order, so the result is the same on AVX-512, AVX2 and the generic loop, for any grouping of
// rows. int4 rows are decoded to a float buffer and summed with the same grouping
// (dot_f32_rows_body).
#ifdef MU_X86_KERNELS
template <int R>
MU_TARGET_AVX512 void dot_int8_avx512(const int8_t* const* cp, const float* v, int64_t n, float* out) {
  const int8_t* c[R];
  __m512 a[R], b[R];  // partial sums of the first and second 16 of every 32 elements
  for (int r = 0; r < R; ++r) c[r] = cp[r], a[r] = b[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(v + i), v1 = _mm512_loadu_ps(v + i + 16);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm512_fmadd_ps(load16_i8_as_f32(c[r] + i), v0, a[r]);
      b[r] = _mm512_fmadd_ps(load16_i8_as_f32(c[r] + i + 16), v1, b[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float t[16];
    _mm512_store_ps(t, _mm512_add_ps(a[r], b[r]));
    float s = lane_sum16(t);
    for (int64_t j = i; j < n; ++j) s += static_cast<float>(c[r][j]) * v[j];
    out[r] = s;
  }
}

template <int R>
void dot_int8_avx2(const int8_t* const* cp, const float* v, int64_t n, float* out) {
  const int8_t* c[R];
  __m256 a0[R], a1[R], b0[R], b1[R];  // lanes 0-7 / 8-15 of the two 16-lane partial sums
  for (int r = 0; r < R; ++r) c[r] = cp[r], a0[r] = a1[r] = b0[r] = b1[r] = _mm256_setzero_ps();
  auto cvt8 = [](const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 v0 = _mm256_loadu_ps(v + i), v1 = _mm256_loadu_ps(v + i + 8);
    const __m256 v2 = _mm256_loadu_ps(v + i + 16), v3 = _mm256_loadu_ps(v + i + 24);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(cvt8(c[r] + i), v0, a0[r]);
      a1[r] = _mm256_fmadd_ps(cvt8(c[r] + i + 8), v1, a1[r]);
      b0[r] = _mm256_fmadd_ps(cvt8(c[r] + i + 16), v2, b0[r]);
      b1[r] = _mm256_fmadd_ps(cvt8(c[r] + i + 24), v3, b1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float t[16];
    _mm256_store_ps(t, _mm256_add_ps(a0[r], b0[r]));
    _mm256_store_ps(t + 8, _mm256_add_ps(a1[r], b1[r]));
    float s = lane_sum16(t);
    for (int64_t j = i; j < n; ++j) s += static_cast<float>(c[r][j]) * v[j];
    out[r] = s;
  }
}
#else
void dot_int8_generic(const int8_t* const* c, int rows, const float* v, int64_t n, float* out) {
  for (int r = 0; r < rows; ++r) {
    float a[16] = {}, b[16] = {};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
      for (int l = 0; l < 16; ++l) {
        a[l] = std::fma(static_cast<float>(c[r][i + l]), v[i + l], a[l]);
        b[l] = std::fma(static_cast<float>(c[r][i + 16 + l]), v[i + 16 + l], b[l]);
      }
    for (int l = 0; l < 16; ++l) a[l] += b[l];
    float s = lane_sum16(a);
    for (int64_t j = i; j < n; ++j) s += static_cast<float>(c[r][j]) * v[j];
    out[r] = s;
  }
}
#endif

// out[r] = sum_i c[r][i] * v[i] for rows r < rows <= 4.
void dot_rows_int8(const int8_t* const* c, int rows, const float* v, int64_t n, float* out) {
#ifdef MU_X86_KERNELS
  const bool wide = use_avx512();
  switch (rows) {
    case 4: return wide ? dot_int8_avx512<4>(c, v, n, out) : dot_int8_avx2<4>(c, v, n, out);
    case 3: return wide ? dot_int8_avx512<3>(c, v, n, out) : dot_int8_avx2<3>(c, v, n, out);
    case 2: return wide ? dot_int8_avx512<2>(c, v, n, out) : dot_int8_avx2<2>(c, v, n, out);
    default: return wide ? dot_int8_avx512<1>(c, v, n, out) : dot_int8_avx2<1>(c, v, n, out);
  }
#else
  dot_int8_generic(c, rows, v, n, out);
#endif
}

// Float dot products of R rows against v with the int8 path's fixed grouping: lane l of 16
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
    for (int64_t b = bs; b < be; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* v = vb + (start - span0);
      if (bits == 8) {
        const int8_t* c[4];
        for (int r = 0; r < rows; ++r) c[r] = reinterpret_cast<const int8_t*>(codes) + (j + r) * row_bytes + start;
        dot_rows_int8(c, rows, v, n, sums);
      } else if (rows == 4) {
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
