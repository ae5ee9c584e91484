// CPU kernel of dequant_dot: out[j] = <W_j, v> for k compressed rows W_j, reading each row
// once and never materialising it (v's block is staged once and reused by all k rows).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// Code-unit dot products (step 1; the block's step scales the sum once). Up to four rows in
// one pass: v is loaded once for all of them and four independent sums hide the add latency.
// Each row's sum is the same vectorised reduction as a one-row loop, so results do not depend
// on how the rows are grouped.
MU_CLONES void dot4_int8(const int8_t* c0, const int8_t* c1, const int8_t* c2, const int8_t* c3,
                         const float* v, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    s0 += static_cast<float>(c0[i]) * v[i];
    s1 += static_cast<float>(c1[i]) * v[i];
    s2 += static_cast<float>(c2[i]) * v[i];
    s3 += static_cast<float>(c3[i]) * v[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

MU_CLONES float dot_int8(const int8_t* c, const float* v, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(c[i]) * v[i];
  return s;
}

MU_CLONES void dot4_f32(const float* w0, const float* w1, const float* w2, const float* w3,
                        const float* v, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    s0 += w0[i] * v[i];
    s1 += w1[i] * v[i];
    s2 += w2[i] * v[i];
    s3 += w3[i] * v[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

MU_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Blocks [bs, be) of every row against v (staged in vb): acc[j] += <W_j block, v block> * step
// for each block in ascending order. Rows go four at a time through the whole span, so each
// visit to a row reads a few KiB contiguously (prefetch-friendly even with many rows).
void span_dots(const uint8_t* codes, const float* scales, int64_t row_bytes, int64_t nb, int64_t k,
               int bits, int qmax, int64_t block, int64_t d, int64_t bs, int64_t be,
               const float* vb, float (*wbuf)[kMaxBlock], double* acc) {
  const int64_t span0 = bs * block;
  int64_t j = 0;
  float sums[4];
  for (; j + 4 <= k; j += 4) {
    for (int64_t b = bs; b < be; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* v = vb + (start - span0);
      if (bits == 8) {
        const auto* c = reinterpret_cast<const int8_t*>(codes) + start;
        dot4_int8(c + j * row_bytes, c + (j + 1) * row_bytes, c + (j + 2) * row_bytes,
                  c + (j + 3) * row_bytes, v, n, sums);
      } else {
        for (int r = 0; r < 4; ++r) decode_span(codes + (j + r) * row_bytes, bits, start, n, 1.f, wbuf[r]);
        dot4_f32(wbuf[0], wbuf[1], wbuf[2], wbuf[3], v, n, sums);
      }
      for (int r = 0; r < 4; ++r)
        acc[j + r] += static_cast<double>(sums[r]) * dequant_step(scales[(j + r) * nb + b], qmax);
    }
  }
  for (; j < k; ++j) {
    for (int64_t b = bs; b < be; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* v = vb + (start - span0);
      float sum;
      if (bits == 8) {
        sum = dot_int8(reinterpret_cast<const int8_t*>(codes) + j * row_bytes + start, v, n);
      } else {
        decode_span(codes + j * row_bytes, bits, start, n, 1.f, wbuf[0]);
        sum = dot_f32(wbuf[0], v, n);
      }
      acc[j] += static_cast<double>(sum) * dequant_step(scales[j * nb + b], qmax);
    }
  }
}

template <typename scalar_t>
void dequant_dot_impl(const uint8_t* codes, const float* scales, const scalar_t* v, int64_t k,
                      int64_t d, int bits, int64_t block, float* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const int64_t span = std::max<int64_t>(1, kMaxBlock / block);  // blocks per span: <= 4096 elements
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * k, 0.0);
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * k;
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
    for (int t = 0; t < nthreads; ++t) s += partial[static_cast<size_t>(t) * k + j];
    out[j] = static_cast<float>(s);
  }
}

at::Tensor dequant_dot_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& v,
                           int64_t bits, int64_t block) {
  check_float_input(v, "v");
  TORCH_CHECK(v.dim() == 1, "mini_unlearn: v must be 1-D, got shape ", v.sizes());
  const int64_t k = check_codes(codes, scales, bits, block, v.numel(), /*rows=*/true);
  check_same_device(codes, v, "codes", "v");
  TORCH_CHECK(v.device().is_cpu(), "mini_unlearn: expected CPU tensors");
  at::Tensor out = at::empty({k}, v.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "dequant_dot", [&] {
    dequant_dot_impl<scalar_t>(static_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr<float>(),
                               v.data_ptr<scalar_t>(), k, v.numel(), static_cast<int>(bits), block,
                               out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("dequant_dot", &dequant_dot_cpu); }

}  // namespace mini_unlearn
