// CPU kernel of dequant_axpy: y + sum_j coeff[j] * W_j over k compressed rows, in one pass
// (each block of y is staged once, all k rows are added into it, then it is written).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// y += c_j * w_j for up to four rows per pass over y (y is loaded and stored once). The adds
// keep the row order of a row-by-row loop, ((y + c0 w0) + c1 w1) + ..., so the result does
// not depend on the grouping.
MU_CLONES void axpy4_int8(float* y, const int8_t* w0, const int8_t* w1, const int8_t* w2,
                          const int8_t* w3, const float* c, int64_t n) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int64_t i = 0; i < n; ++i) {
    float t = y[i];
    t += c0 * static_cast<float>(w0[i]);
    t += c1 * static_cast<float>(w1[i]);
    t += c2 * static_cast<float>(w2[i]);
    t += c3 * static_cast<float>(w3[i]);
    y[i] = t;
  }
}

MU_CLONES void axpy_int8(float* y, const int8_t* w, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * static_cast<float>(w[i]);
}

MU_CLONES void axpy_f32(float* y, const float* w, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * w[i];
}

template <typename scalar_t>
void dequant_axpy_impl(const scalar_t* y, const uint8_t* codes, const float* scales,
                       const float* coeff, int64_t k, int64_t d, int bits, int64_t block,
                       scalar_t* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const int64_t span = std::max<int64_t>(1, kMaxBlock / block);  // blocks per span: <= 4096 elements
  const bool stream = std::is_same_v<scalar_t, float> && d * 4 >= kStreamBytes;
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    alignas(64) float ybuf[kMaxBlock], wbuf[kMaxBlock];
    for (int64_t bs = b0; bs < b1; bs += span) {
      // A span of up to 4096 elements of y is staged once; rows go four at a time through the
      // whole span (a few KiB read contiguously per row visit). Every element still receives
      // the rows in ascending order, ((y + c0 w0) + c1 w1) + ..., whatever the grouping.
      const int64_t be = std::min(b1, bs + span);
      const int64_t span0 = bs * block, len = std::min(be * block, d) - span0;
      const float* ys = as_float(y + span0, len, ybuf);
      if (ys != ybuf) std::copy(ys, ys + len, ybuf);
      int64_t j = 0;
      if (bits == 8) {
        const auto* w = reinterpret_cast<const int8_t*>(codes);
        for (; j + 4 <= k; j += 4) {
          for (int64_t b = bs; b < be; ++b) {
            const int64_t start = b * block, n = std::min(block, d - start);
            float c[4];
            for (int r = 0; r < 4; ++r) c[r] = coeff[j + r] * dequant_step(scales[(j + r) * nb + b], qmax);
            const int8_t* wb = w + start;
            axpy4_int8(ybuf + (start - span0), wb + j * row_bytes, wb + (j + 1) * row_bytes,
                       wb + (j + 2) * row_bytes, wb + (j + 3) * row_bytes, c, n);
          }
        }
        for (; j < k; ++j)
          for (int64_t b = bs; b < be; ++b) {
            const int64_t start = b * block, n = std::min(block, d - start);
            axpy_int8(ybuf + (start - span0), w + j * row_bytes + start,
                      coeff[j] * dequant_step(scales[j * nb + b], qmax), n);
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
  check_float_input(y, "y");
  TORCH_CHECK(y.dim() == 1, "mini_unlearn: y must be 1-D, got shape ", y.sizes());
  const int64_t k = check_codes(codes, scales, bits, block, y.numel(), /*rows=*/true);
  TORCH_CHECK(coeff.scalar_type() == at::kFloat && coeff.dim() == 1 && coeff.numel() == k &&
                  coeff.is_contiguous(),
              "mini_unlearn: coeff must be a contiguous float32 vector of length k=", k, ", got ",
              coeff.scalar_type(), " ", coeff.sizes());
  check_same_device(codes, y, "codes", "y");
  check_same_device(coeff, y, "coeff", "y");
  TORCH_CHECK(y.device().is_cpu(), "mini_unlearn: expected CPU tensors");
  at::Tensor out = at::empty_like(y);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "dequant_axpy", [&] {
    dequant_axpy_impl<scalar_t>(y.data_ptr<scalar_t>(), static_cast<const uint8_t*>(codes.data_ptr()),
                                scales.data_ptr<float>(), coeff.data_ptr<float>(), k, y.numel(),
                                static_cast<int>(bits), block, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("dequant_axpy", &dequant_axpy_cpu); }

}  // namespace mini_unlearn
