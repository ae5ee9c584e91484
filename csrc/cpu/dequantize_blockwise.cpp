// CPU kernel of dequantize_blockwise: x_hat = code * absmax / qmax, written in the asked dtype.
#include <torch/library.h>
#include "../checks.h"
#include "../quantize.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                                    int64_t block, int64_t numel, at::ScalarType dtype) {
  check_dequantize(codes, scales, bits, block, numel, dtype, at::kCPU);
  at::Tensor out = at::empty({numel}, scales.options().dtype(dtype));
  const int qmax = qmax_for_bits(bits);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scales.data_ptr<float>();
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const bool stream = static_cast<int64_t>(out.nbytes()) >= kStreamBytes;
  MU_DISPATCH_FLOATS(dtype, "dequantize_blockwise", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_blocks(numel, block), grain_blocks(block), [&](int64_t b0, int64_t b1) {
      alignas(64) float buf[kMaxBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block, n = std::min(block, numel - start);
        constexpr bool f32 = std::is_same_v<scalar_t, float>;
        float* dst = (f32 && !stream) ? reinterpret_cast<float*>(o + start) : buf;
        decode_span(c, static_cast<int>(bits), start, n, dequant_step(s[b], qmax), dst);
        if constexpr (f32) {
          if (stream) stream_copy_f32(reinterpret_cast<float*>(o + start), buf, n);
        } else {
          store_from_float(buf, n, o + start);
        }
      }
      if (stream) stream_fence();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("dequantize_blockwise", &dequantize_blockwise_cpu); }

}  // namespace mini_unlearn
