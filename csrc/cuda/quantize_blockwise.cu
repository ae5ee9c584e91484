// CUDA kernel of quantize_blockwise: one thread block per quantisation block. The block's
// elements are staged once in shared memory (as float), absmax and the non-finite flag are
// reduced with warp shuffles + shared memory, then int8 or packed int4 codes are written.
// Same codes and scales as cpu/quantize_blockwise.cpp, bit for bit.
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

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;

// blockDim.x = min(block, 256): a multiple of 32 (block is a power of two >= 32).
template <typename scalar_t>
__global__ void quantize_kernel(const scalar_t* __restrict__ x, int64_t numel, int bits, int block,
                                bool stochastic, int64_t seed, uint8_t* __restrict__ codes,
                                float* __restrict__ scales) {
  extern __shared__ float xs[];  // `block` floats
  __shared__ float warp_max[kMaxWarps];
  __shared__ int warp_bad[kMaxWarps];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int qmax = qmax_for_bits(bits);
  const int64_t nb = num_blocks(numel, block);

  for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {  // uniform across the thread block
    const int64_t start = b * block;
    const int n = static_cast<int>(numel - start < block ? numel - start : block);

    // absmax, and whether the block holds a NaN or Inf (then its scale is NaN, its codes 0).
    float m = 0.f;
    bool bad = false;
    for (int i = tid; i < n; i += nthreads) {
      const float v = static_cast<float>(x[start + i]);
      xs[i] = v;
      m = fmaxf(m, fabsf(v));  // fabsf(NaN) is ignored by fmaxf; `bad` records it
      bad = bad || !isfinite(v);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const bool warp_is_bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      warp_max[warp] = m;
      warp_bad[warp] = warp_is_bad ? 1 : 0;
    }
    __syncthreads();  // also publishes xs
    float absmax = 0.f;
    int any_bad = 0;
    for (int w = 0; w < nwarps; ++w) {
      absmax = fmaxf(absmax, warp_max[w]);
      any_bad |= warp_bad[w];
    }
    if (any_bad) absmax = NAN;
    if (tid == 0) scales[b] = absmax;
    const float inv = quant_inv_scale(absmax, qmax);

    if (bits == 8) {
      int8_t* out = reinterpret_cast<int8_t*>(codes) + start;
      for (int i = tid; i < n; i += nthreads) {
        const float noise = stochastic ? uniform_from_index(start + i, seed) : -1.f;
        out[i] = static_cast<int8_t>(quantize_value(xs[i], inv, qmax, noise));
      }
    } else {
      uint8_t* out = codes + start / 2;  // start is even (block is)
      const int npairs = (n + 1) / 2;
      for (int p = tid; p < npairs; p += nthreads) {
        const int i = 2 * p;
        const float n0 = stochastic ? uniform_from_index(start + i, seed) : -1.f;
        const int lo = quantize_value(xs[i], inv, qmax, n0);
        int hi = 0;  // a trailing odd element's high nibble holds code 0
        if (i + 1 < n) {
          const float n1 = stochastic ? uniform_from_index(start + i + 1, seed) : -1.f;
          hi = quantize_value(xs[i + 1], inv, qmax, n1);
        }
        out[p] = pack_int4(lo, hi);
      }
    }
    __syncthreads();  // xs and warp_* are reused by the next block of this grid-stride loop
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, int64_t bits,
                                                           int64_t block, bool stochastic,
                                                           int64_t seed) {
  check_quantize(x, bits, block, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  at::Tensor codes = at::empty({code_bytes(numel, bits)}, x.options().dtype(code_dtype(bits)));
  at::Tensor scales = at::empty({num_blocks(numel, block)}, x.options().dtype(at::kFloat));
  const int64_t nb = num_blocks(numel, block);
  if (nb == 0) return {codes, scales};
  const int threads = static_cast<int>(std::min<int64_t>(block, kMaxThreads));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(nb, 0x7fffffff));
  const size_t smem = static_cast<size_t>(block) * sizeof(float);  // <= 16 KiB
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MU_DISPATCH_FLOATS(x.scalar_type(), "quantize_blockwise_cuda", [&] {
    quantize_kernel<scalar_t><<<grid, threads, smem, stream>>>(
        x.data_ptr<scalar_t>(), numel, static_cast<int>(bits), static_cast<int>(block), stochastic,
        seed, static_cast<uint8_t*>(codes.data_ptr()), scales.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CUDA, m) { m.impl("quantize_blockwise", &quantize_blockwise_cuda); }

}  // namespace mini_unlearn
