// CUDA kernel of dequantize_blockwise: x_hat = code * absmax / qmax, written in the asked dtype.
// Elementwise grid-stride loop, 8 elements per thread per step (one quantisation block each).
// Same values as cpu/dequantize_blockwise.cpp, bit for bit.
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
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                  int bits, int64_t block, int64_t numel, bool vec,
                                  scalar_t* __restrict__ out) {
  const int qmax = qmax_for_bits(bits);
  const int64_t ngroups = (numel + kVec - 1) / kVec;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * kVec;
    int q[kVec];
    cuda::load_codes8(codes, e, numel, bits, vec, q);
    const float step = dequant_step(scales[e / block], qmax);
    float v[kVec];
#pragma unroll
    for (int t = 0; t < kVec; ++t) v[t] = static_cast<float>(q[t]) * step;
    cuda::store8(out, e, numel, vec, v);
  }
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                                     int64_t block, int64_t numel, at::ScalarType dtype) {
  check_dequantize(codes, scales, bits, block, numel, dtype, at::kCUDA);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty({numel}, scales.options().dtype(dtype));
  if (numel == 0) return out;
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const int64_t ngroups = (numel + kVec - 1) / kVec;
  const unsigned grid = cuda::grid_for(ngroups, cuda::kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(dtype, "dequantize_blockwise_cuda", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool vec = cuda::codes_vec_ok(c, 1, 0, static_cast<int>(bits)) && cuda::vec_ok(o);
    dequantize_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(
        c, scales.data_ptr<float>(), static_cast<int>(bits), block, numel, vec, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) { m.impl("dequantize_blockwise", &dequantize_blockwise_cuda); }

}  // namespace mini_unlearn
