// CUDA kernel of dequant_dot: out[j] = <W_j, v> for k compressed rows W_j, never materialising
// them. Two passes, deterministic (no atomics):
//   1. the grid walks chunks of kChunk elements; a thread block stages its chunk of v in
//      registers once (fp32), then for every row computes the chunk's partial dot product
//      (per-thread, then warp shuffles, then shared memory) into partial[chunk, j];
//   2. one thread block per row sums partial[:, j] in double, in a fixed order.
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

using cuda::kThreads;
using cuda::kVec;

constexpr int kIter = 4;                          // 8-element groups per thread per chunk
constexpr int64_t kChunk = kThreads * kVec * kIter;  // 8192 elements per chunk
constexpr int kRowTile = 4;                       // rows reduced per __syncthreads pair
constexpr int kWarps = kThreads / 32;

// blockDim.x == kThreads.
template <typename scalar_t>
__global__ void dot_partial_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                   const scalar_t* __restrict__ v, int64_t k, int64_t d, int bits,
                                   int64_t block, int64_t row_bytes, int64_t nb, bool vec_codes,
                                   bool vec_v, float* __restrict__ partial) {
  __shared__ float red[kRowTile][kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qmax = qmax_for_bits(bits);
  const int64_t nchunks = (d + kChunk - 1) / kChunk;

  for (int64_t ch = blockIdx.x; ch < nchunks; ch += gridDim.x) {  // uniform across the block
    const int64_t c0 = ch * kChunk;
    float vr[kIter][kVec];
#pragma unroll
    for (int it = 0; it < kIter; ++it)
      cuda::load8(v, c0 + (static_cast<int64_t>(it) * kThreads + tid) * kVec, d, vec_v, vr[it]);

    for (int64_t j0 = 0; j0 < k; j0 += kRowTile) {
      float acc[kRowTile];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        acc[r] = 0.f;
        const int64_t j = j0 + r;
        if (j >= k) continue;
        const uint8_t* row = codes + j * row_bytes;
        const float* srow = scales + j * nb;
#pragma unroll
        for (int it = 0; it < kIter; ++it) {
          const int64_t e = c0 + (static_cast<int64_t>(it) * kThreads + tid) * kVec;
          if (e >= d) continue;
          int q[kVec];
          cuda::load_codes8(row, e, d, bits, vec_codes, q);  // 0 beyond d
          float s = 0.f;
#pragma unroll
          for (int t = 0; t < kVec; ++t) s += static_cast<float>(q[t]) * vr[it][t];
          // The group lies in one quantisation block: scale its sum once (as the CPU does).
          acc[r] += s * dequant_step(srow[e / block], qmax);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        float a = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) a += __shfl_down_sync(0xffffffffu, a, off);
        if (lane == 0) red[r][warp] = a;
      }
      __syncthreads();
      if (tid < kRowTile && j0 + tid < k) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[tid][w];
        partial[ch * k + j0 + tid] = s;
      }
      __syncthreads();  // red is rewritten by the next row tile
    }
  }
}

// out[j] = sum_c partial[c, j], in double, in a fixed order. blockDim.x == kThreads.
__global__ void dot_finish_kernel(const float* __restrict__ partial, int64_t nchunks, int64_t k,
                                  float* __restrict__ out) {
  __shared__ double red[kThreads];
  const int tid = threadIdx.x;
  for (int64_t j = blockIdx.x; j < k; j += gridDim.x) {  // uniform across the block
    double s = 0.0;
    for (int64_t c = tid; c < nchunks; c += kThreads) s += static_cast<double>(partial[c * k + j]);
    red[tid] = s;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half >>= 1) {
      if (tid < half) red[tid] += red[tid + half];
      __syncthreads();
    }
    if (tid == 0) out[j] = static_cast<float>(red[0]);
    __syncthreads();  // red is rewritten by the next row
  }
}

at::Tensor dequant_dot_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& v,
                            int64_t bits, int64_t block) {
  const int64_t k = check_dot(codes, scales, v, bits, block, at::kCUDA);
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t d = v.numel();
  if (k == 0 || d == 0) return at::zeros({k}, v.options().dtype(at::kFloat));
  at::Tensor out = at::empty({k}, v.options().dtype(at::kFloat));
  const int64_t nchunks = (d + kChunk - 1) / kChunk;
  at::Tensor partial = at::empty({nchunks, k}, v.options().dtype(at::kFloat));
  const int64_t nb = num_blocks(d, block), row_bytes = code_bytes(d, bits);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const bool vec_codes = cuda::codes_vec_ok(c, k, row_bytes, static_cast<int>(bits));
  const unsigned grid1 = cuda::grid_for(nchunks, 1);
  const unsigned grid2 = static_cast<unsigned>(std::min<int64_t>(k, 65535));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(v.scalar_type(), "dequant_dot_cuda", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    dot_partial_kernel<scalar_t><<<grid1, kThreads, 0, stream>>>(
        c, scales.data_ptr<float>(), vp, k, d, static_cast<int>(bits), block, row_bytes, nb,
        vec_codes, cuda::vec_ok(vp), partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  dot_finish_kernel<<<grid2, kThreads, 0, stream>>>(partial.data_ptr<float>(), nchunks, k,
                                                    out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) { m.impl("dequant_dot", &dequant_dot_cuda); }

}  // namespace mini_unlearn
