// CUDA kernel of dequant_axpy: out = y + sum_j coeff[j] * W_j over k compressed rows, in one
// pass: each thread holds 8 elements of y in fp32 registers, adds all k rows into them in
// order j = 0..k-1, then writes them once in y's dtype. The per-element arithmetic and its
// order match cpu/dequant_axpy.cpp (y = fma(coeff[j] * step_j, code, y): quantize.h's
// dequant_axpy_step, an explicit fused multiply-add on both), so results agree bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "../checks.h"
#include "../quantize.h"
#include "cuda_common.cuh"

namespace mini_unlearn {
namespace {

using cuda::kVec;

template <typename scalar_t>
__global__ void dequant_axpy_kernel(const scalar_t* __restrict__ y, const uint8_t* __restrict__ codes,
                                    const float* __restrict__ scales, const float* __restrict__ coeff,
                                    int64_t k, int64_t d, int bits, int64_t block, int64_t row_bytes,
                                    int64_t nb, bool vec_codes, bool vec_y,
                                    scalar_t* __restrict__ out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t ngroups = (d + kVec - 1) / kVec;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * kVec, b = e / block;  // the group lies in one quantisation block
    float acc[kVec];
    cuda::load8(y, e, d, vec_y, acc);
    for (int64_t j = 0; j < k; ++j) {
      int q[kVec];
      cuda::load_codes8(codes + j * row_bytes, e, d, bits, vec_codes, q);
      const float cj = coeff[j] * dequant_step(scales[j * nb + b], qmax);
#pragma unroll
      for (int t = 0; t < kVec; ++t) acc[t] = dequant_axpy_step(acc[t], cj, static_cast<float>(q[t]));
    }
    cuda::store8(out, e, d, vec_y, acc);
  }
}

at::Tensor dequant_axpy_cuda(const at::Tensor& y, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& coeff, int64_t bits, int64_t block) {
  const int64_t k = check_axpy(y, codes, scales, coeff, bits, block, at::kCUDA);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  const int64_t d = y.numel();
  if (d == 0) return out;
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const bool vec_codes = cuda::codes_vec_ok(c, k, row_bytes, static_cast<int>(bits));
  const unsigned grid = cuda::grid_for((d + kVec - 1) / kVec, cuda::kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(y.scalar_type(), "dequant_axpy_cuda", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec_y = cuda::vec_ok(yp) && cuda::vec_ok(op);
    dequant_axpy_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(
        yp, c, scales.data_ptr<float>(), coeff.data_ptr<float>(), k, d, static_cast<int>(bits), block,
        row_bytes, nb, vec_codes, vec_y, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) { m.impl("dequant_axpy", &dequant_axpy_cuda); }

}  // namespace mini_unlearn
