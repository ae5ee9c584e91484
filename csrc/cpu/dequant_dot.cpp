// CPU kernel of dequant_dot: out[j] = <W_j, v> for k compressed rows W_j, reading each row
// once and never materialising it (v's block is staged once and reused by all k rows).
#include <torch/library.h>
#include <vector>
#include "../checks.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

MU_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename scalar_t>
void dequant_dot_impl(const uint8_t* codes, const float* scales, const scalar_t* v, int64_t k,
                      int64_t d, int bits, int64_t block, float* out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * k, 0.0);
  at::parallel_for(0, nb, grain_blocks(block), [&](int64_t b0, int64_t b1) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * k;
    float vbuf[kMaxBlock], wbuf[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, n = std::min(block, d - start);
      const float* vb = as_float(v + start, n, vbuf);
      for (int64_t j = 0; j < k; ++j) {
        // Decode with step 1 and scale the block's sum once: fewer multiplies per element.
        decode_span(codes + j * row_bytes, bits, start, n, 1.f, wbuf);
        acc[j] += static_cast<double>(dot_f32(wbuf, vb, n)) * dequant_step(scales[j * nb + b], qmax);
      }
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
