// CUDA kernel of contraction2_accumulate: the 2-state (momentum / Adam) contraction update,
// (u, e) <- M^L (u, e) + S_L b x per element, with M's entries from nu' = s_out[e / d_in] *
// s_in[e % d_in] + lam and the optional preconditioner d, computed on the fly (contraction2.h).
// Elementwise grid-stride loop, 8 elements per thread per step; the same values as
// cpu/contraction2_accumulate.cpp, bit for bit (shared math; --fmad=false keeps plain mul/add
// unfused and the fused multiply-adds are explicit fmaf, as on the CPU).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "../checks.h"
#include "../contraction2.h"
#include "cuda_common.cuh"

namespace mini_unlearn {
namespace {

using cuda::kVec;

// The (up to) 8 elements from `first`: one row division per group, the column index then walks
// and wraps.
template <bool kHasD>
__device__ __forceinline__ void contract2_8(float u8[kVec], float e8[kVec], const float x8[kVec],
                                            const float d8[kVec], int64_t first, int64_t numel,
                                            const float* __restrict__ s_out,
                                            const float* __restrict__ s_in, int64_t d_in,
                                            const Contraction2Params& p, int nbits) {
  int64_t i = first / d_in, j = first - i * d_in;
  float so = s_out[i];
#pragma unroll
  for (int t = 0; t < kVec; ++t) {
    if (first + t >= numel) break;
    const float nu = so * s_in[j] + p.lam;
    const float ed = kHasD ? p.eta * d8[t] : p.eta;
    Contraction2Q<float> q;
    float v0, v1;
    contraction2_coeffs(nu, ed, p, nbits, q, v0, v1);
    contraction2_apply(u8[t], e8[t], x8[t], q, v0, v1);
    if (++j == d_in) {  // next row (read s_out only while it is in range)
      j = 0;
      ++i;
      if (first + t + 1 < numel) so = s_out[i];
    }
  }
}

template <typename scalar_t, bool kHasD>
__global__ void contraction2_kernel(float* __restrict__ u, float* __restrict__ e,
                                    const scalar_t* __restrict__ x, const float* __restrict__ d,
                                    const float* __restrict__ s_out, const float* __restrict__ s_in,
                                    int64_t numel, int64_t d_in, Contraction2Params p, int nbits,
                                    bool vec) {
  const int64_t ngroups = (numel + kVec - 1) / kVec;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = g * kVec;
    float u8[kVec], e8[kVec], x8[kVec], d8[kVec];
    cuda::load8(u, first, numel, vec, u8);
    cuda::load8(e, first, numel, vec, e8);
    cuda::load8(x, first, numel, vec, x8);
    if (kHasD) cuda::load8(d, first, numel, vec, d8);
    contract2_8<kHasD>(u8, e8, x8, d8, first, numel, s_out, s_in, d_in, p, nbits);
    cuda::store8(u, first, numel, vec, u8);
    cuda::store8(e, first, numel, vec, e8);
  }
}

void contraction2_accumulate_cuda(const at::Tensor& u, const at::Tensor& e, const at::Tensor& x,
                                  const at::Tensor& s_out, const at::Tensor& s_in,
                                  const std::optional<at::Tensor>& d, double lam, double lam_dec,
                                  double eta, double mu, double c, bool nesterov, int64_t steps) {
  check_contraction2(u, e, x, s_out, s_in, d, lam, lam_dec, eta, mu, c, steps, at::kCUDA);
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t numel = u.numel();
  if (steps == 0 || numel == 0) return;  // M^0 = I, S_0 = 0: nothing moves
  const Contraction2Params p = make_contraction2_params(lam, lam_dec, eta, mu, c, nesterov, steps);
  const int nbits = steps_bits(steps);
  float* up = u.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  const float* dp = d.has_value() ? d->data_ptr<float>() : nullptr;
  const unsigned grid = cuda::grid_for((numel + kVec - 1) / kVec, cuda::kThreads);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(x.scalar_type(), "contraction2_accumulate_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool vec = cuda::vec_ok(up) && cuda::vec_ok(ep) && cuda::vec_ok(xp) &&
                     (dp == nullptr || cuda::vec_ok(dp));
    if (dp != nullptr) {
      contraction2_kernel<scalar_t, true><<<grid, cuda::kThreads, 0, stream>>>(
          up, ep, xp, dp, s_out.data_ptr<float>(), s_in.data_ptr<float>(), numel, s_in.numel(), p,
          nbits, vec);
    } else {
      contraction2_kernel<scalar_t, false><<<grid, cuda::kThreads, 0, stream>>>(
          up, ep, xp, dp, s_out.data_ptr<float>(), s_in.data_ptr<float>(), numel, s_in.numel(), p,
          nbits, vec);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) {
  m.impl("contraction2_accumulate", &contraction2_accumulate_cuda);
}

}  // namespace mini_unlearn
