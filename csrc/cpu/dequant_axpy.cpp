// CPU kernel of dequant_axpy: y + sum_j coeff[j] * W_j over k compressed rows, in one pass
// (each block of y is staged once, all k rows are added into it, then it is written).
#include <torch/library.h>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

MU_CLONES void axpy_f32(float* y, const float* w, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * w[i];
}

template <typename scalar_t>
void dequant_axpy_impl(const scalar_t* y, const uint8_t* codes, const float* scales,
                       const float* coeff, int64_t k, int64_t d, int bits, int64_t block,
                       scalar_t* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    float ybuf[kMaxBlock], wbuf[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* ys = as_float(y + start, n, ybuf);
      if (ys != ybuf) std::copy(ys, ys + n, ybuf);
      for (int64_t j = 0; j < k; ++j) {
        decode_span(codes + j * row_bytes, bits, start, n, 1.f, wbuf);
        axpy_f32(ybuf, wbuf, coeff[j] * dequant_step(scales[j * nb + b], qmax), n);
      }
      store_from_float(ybuf, n, out + start);
    }
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
