// CPU kernel of quantize_blockwise: per-block absmax, then int8 or packed int4 codes.
#include <torch/library.h>
#include "../checks.h"
#include "../quantize.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// absmax of a block; NaN if the block holds a NaN or Inf (so a bad gradient cannot hide).
MU_CLONES float block_absmax(const float* x, int64_t n) {
  float m = 0.f, poison = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float a = std::fabs(x[i]);
    m = a > m ? a : m;
    poison += x[i] * 0.f;  // NaN iff some x is NaN or Inf
  }
  return poison == 0.f ? m : NAN;
}

MU_CLONES void encode_int8(const float* x, int64_t n, float inv, float* noise, int8_t* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(quantize_value(x[i], inv, 127, noise ? noise[i] : -1.f));
}

MU_CLONES void encode_int4(const float* x, int64_t n, float inv, float* noise, uint8_t* out) {
  for (int64_t i = 0; i + 1 < n; i += 2)
    out[i / 2] = pack_int4(quantize_value(x[i], inv, 7, noise ? noise[i] : -1.f),
                           quantize_value(x[i + 1], inv, 7, noise ? noise[i + 1] : -1.f));
  if (n & 1) out[n / 2] = pack_int4(quantize_value(x[n - 1], inv, 7, noise ? noise[n - 1] : -1.f), 0);
}

template <typename scalar_t>
void quantize_cpu_impl(const scalar_t* x, int64_t numel, int bits, int64_t block, bool stochastic,
                       int64_t seed, uint8_t* codes, float* scales) {
  const int qmax = qmax_for_bits(bits);
  at::parallel_for(0, num_blocks(numel, block), grain_blocks(block), [&](int64_t b0, int64_t b1) {
    float xbuf[kMaxBlock], noise[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, n = std::min(block, numel - start);
      const float* xb = as_float(x + start, n, xbuf);
      const float absmax = block_absmax(xb, n);
      scales[b] = absmax;
      if (stochastic)
        for (int64_t i = 0; i < n; ++i) noise[i] = uniform_from_index(start + i, seed);
      const float inv = quant_inv_scale(absmax, qmax);
      if (bits == 8)
        encode_int8(xb, n, inv, stochastic ? noise : nullptr, reinterpret_cast<int8_t*>(codes) + start);
      else
        encode_int4(xb, n, inv, stochastic ? noise : nullptr, codes + start / 2);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, int64_t bits,
                                                          int64_t block, bool stochastic,
                                                          int64_t seed) {
  check_bits_block(bits, block);
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() == 1, "mini_unlearn: quantize_blockwise takes a 1-D tensor, got shape ",
              x.sizes(), " (flatten it first)");
  TORCH_CHECK(x.device().is_cpu(), "mini_unlearn: expected a CPU tensor");
  const int64_t numel = x.numel();
  at::Tensor codes = at::empty({code_bytes(numel, bits)}, x.options().dtype(code_dtype(bits)));
  at::Tensor scales = at::empty({num_blocks(numel, block)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_blockwise", [&] {
    quantize_cpu_impl<scalar_t>(x.data_ptr<scalar_t>(), numel, bits, block, stochastic, seed,
                                static_cast<uint8_t*>(codes.data_ptr()), scales.data_ptr<float>());
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("quantize_blockwise", &quantize_blockwise_cpu); }

}  // namespace mini_unlearn
