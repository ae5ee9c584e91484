// CUDA kernels of contraction_accumulate (dense x) and contraction_accumulate_q (x as int8/int4
// codes): acc <- a * acc + c * x, with a, c from nu' = s_out[e / d_in] * s_in[e % d_in] + lam
// computed on the fly (contraction.h). Elementwise grid-stride loop, 8 elements per thread
// per step; same values as cpu/contraction_accumulate.cpp, bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "../checks.h"
#include "../contraction.h"
#include "../quantize.h"
#include "cuda_common.cuh"

namespace mini_unlearn {
namespace {

using cuda::kVec;

struct SegmentArgs {
  float lam, eta;
  int64_t steps;
};

// acc[e + t] <- contraction of acc with x8[t] for the (up to) 8 elements from e (one row
// division per group, the column index then walks and wraps).
__device__ __forceinline__ void contract8(float acc8[kVec], const float x8[kVec], int64_t e,
                                          int64_t numel, const float* __restrict__ s_out,
                                          const float* __restrict__ s_in, int64_t d_in,
                                          const SegmentArgs& seg) {
  int64_t i = e / d_in, j = e - i * d_in;
  float so = s_out[i];
#pragma unroll
  for (int t = 0; t < kVec; ++t) {
    if (e + t >= numel) break;
    const float nu = so * s_in[j] + seg.lam;
    float a, c;
    contraction_coeffs(nu, seg.eta, seg.steps, a, c);
    acc8[t] = contraction_apply(acc8[t], x8[t], a, c);
    if (++j == d_in) {  // next row (read s_out only while it is in range)
      j = 0;
      ++i;
      if (e + t + 1 < numel) so = s_out[i];
    }
  }
}

template <typename scalar_t>
__global__ void contraction_kernel(float* __restrict__ acc, const scalar_t* __restrict__ x,
                                   const float* __restrict__ s_out, const float* __restrict__ s_in,
                                   int64_t numel, int64_t d_in, SegmentArgs seg, bool vec) {
  const int64_t ngroups = (numel + kVec - 1) / kVec;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * kVec;
    float a8[kVec], x8[kVec];
    cuda::load8(acc, e, numel, vec, a8);
    cuda::load8(x, e, numel, vec, x8);
    contract8(a8, x8, e, numel, s_out, s_in, d_in, seg);
    cuda::store8(acc, e, numel, vec, a8);
  }
}

__global__ void contraction_q_kernel(float* __restrict__ acc, const uint8_t* __restrict__ codes,
                                     const float* __restrict__ scales, int bits, int64_t block,
                                     const float* __restrict__ s_out, const float* __restrict__ s_in,
                                     int64_t numel, int64_t d_in, SegmentArgs seg, bool vec) {
  const int qmax = qmax_for_bits(bits);
  const int64_t ngroups = (numel + kVec - 1) / kVec;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * kVec;
    float a8[kVec], x8[kVec];
    int q[kVec];
    cuda::load8(acc, e, numel, vec, a8);
    cuda::load_codes8(codes, e, numel, bits, vec, q);
    const float step = dequant_step(scales[e / block], qmax);  // the group is in one block
#pragma unroll
    for (int t = 0; t < kVec; ++t) x8[t] = static_cast<float>(q[t]) * step;
    contract8(a8, x8, e, numel, s_out, s_in, d_in, seg);
    cuda::store8(acc, e, numel, vec, a8);
  }
}

SegmentArgs make_segment(double lam, double eta, int64_t steps) {
  return {static_cast<float>(lam), static_cast<float>(eta), steps};
}

void contraction_accumulate_cuda(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& s_out,
                                 const at::Tensor& s_in, double lam, double eta, int64_t steps) {
  check_contraction_dense(acc, x, s_out, s_in, steps, at::kCUDA);
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t numel = acc.numel();
  if (numel == 0) return;
  const SegmentArgs seg = make_segment(lam, eta, steps);
  float* a = acc.data_ptr<float>();
  const unsigned grid = cuda::grid_for((numel + kVec - 1) / kVec, cuda::kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(x.scalar_type(), "contraction_accumulate_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool vec = cuda::vec_ok(a) && cuda::vec_ok(xp);
    contraction_kernel<scalar_t><<<grid, cuda::kThreads, 0, stream>>>(
        a, xp, s_out.data_ptr<float>(), s_in.data_ptr<float>(), numel, s_in.numel(), seg, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void contraction_accumulate_q_cuda(const at::Tensor& acc, const at::Tensor& codes,
                                   const at::Tensor& scales, const at::Tensor& s_out,
                                   const at::Tensor& s_in, double lam, double eta, int64_t steps,
                                   int64_t bits, int64_t block) {
  check_contraction_codes(acc, codes, scales, s_out, s_in, steps, bits, block, at::kCUDA);
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t numel = acc.numel();
  if (numel == 0) return;
  const SegmentArgs seg = make_segment(lam, eta, steps);
  float* a = acc.data_ptr<float>();
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const bool vec = cuda::vec_ok(a) && cuda::codes_vec_ok(c, 1, 0, static_cast<int>(bits));
  const unsigned grid = cuda::grid_for((numel + kVec - 1) / kVec, cuda::kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  contraction_q_kernel<<<grid, cuda::kThreads, 0, stream>>>(
      a, c, scales.data_ptr<float>(), static_cast<int>(bits), block, s_out.data_ptr<float>(),
      s_in.data_ptr<float>(), numel, s_in.numel(), seg, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) {
  m.impl("contraction_accumulate", &contraction_accumulate_cuda);
  m.impl("contraction_accumulate_q", &contraction_accumulate_q_cuda);
}

}  // namespace mini_unlearn
