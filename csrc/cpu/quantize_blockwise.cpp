// CPU kernel of quantize_blockwise: per-block absmax, then int8 or packed int4 codes.
#include <torch/library.h>
#include <cstring>
#include "../checks.h"
#include "../quantize.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

// absmax of a block; NaN if the block holds a NaN or Inf (so a bad gradient cannot hide).
// Both reductions are order-independent (max of |x|; a sum of zeros unless NaN), so any
// grouping gives the same value as a sequential loop: four 16-lane accumulators of each keep
// the max and add chains short.
typedef float mu_v16f __attribute__((vector_size(64)));
typedef int32_t mu_v16i __attribute__((vector_size(64)));

MU_CLONES float block_absmax(const float* x, int64_t n) {
  const mu_v16i abs_mask = mu_v16i{} + 0x7fffffff;
  mu_v16f m[4] = {}, p[4] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int u = 0; u < 4; ++u) {
      mu_v16f a;
      std::memcpy(&a, x + i + 16 * u, sizeof a);
      const mu_v16f b = reinterpret_cast<mu_v16f>(reinterpret_cast<mu_v16i>(a) & abs_mask);
      m[u] = b > m[u] ? b : m[u];
      p[u] += a * 0.f;  // NaN iff some x is NaN or Inf
    }
  }
  // fold the four accumulators, then the 16 lanes by halves (a shuffle and one op per step)
  mu_v16f mv = m[0] > m[1] ? m[0] : m[1], m23 = m[2] > m[3] ? m[2] : m[3];
  mv = mv > m23 ? mv : m23;
  mu_v16f pv = (p[0] + p[1]) + (p[2] + p[3]);
  const mu_v16i swap8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const mu_v16i swap4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const mu_v16i swap2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const mu_v16i swap1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  for (const mu_v16i& sw : {swap8, swap4, swap2, swap1}) {
    const mu_v16f ms = __builtin_shuffle(mv, sw);
    mv = ms > mv ? ms : mv;
    pv += __builtin_shuffle(pv, sw);
  }
  float mx = mv[0], poison = pv[0];
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    mx = a > mx ? a : mx;
    poison += x[i] * 0.f;
  }
  return poison == 0.f ? mx : NAN;
}

// Codes of n elements as int8 (qmax 127, or 7 for int4 before packing), round to nearest.
MU_CLONES void encode_nearest(const float* x, int64_t n, float inv, int qmax, int8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(quantize_value(x[i], inv, qmax, -1.f));
}

// Stochastic rounding; `start` is the index of x[0] in the whole tensor (the noise stream is
// indexed by it).
MU_CLONES void encode_stochastic(const float* x, int64_t n, float inv, int qmax, int64_t start,
                                 int64_t seed, int8_t* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(quantize_value(x[i], inv, qmax, uniform_from_index(start + i, seed)));
}

// Two int4 codes per byte, element 2j in the low nibble of byte j (n odd: high nibble 0).
MU_CLONES void pack_codes_int4(const int8_t* q, int64_t n, uint8_t* out) {
  const int64_t npairs = n / 2;
  for (int64_t j = 0; j < npairs; ++j) out[j] = pack_int4(q[2 * j], q[2 * j + 1]);
  if (n & 1) out[npairs] = pack_int4(q[n - 1], 0);
}

template <typename scalar_t>
void quantize_cpu_impl(const scalar_t* x, int64_t numel, int bits, int64_t block, bool stochastic,
                       int64_t seed, uint8_t* codes, float* scales) {
  const int qmax = qmax_for_bits(bits);
  const bool stream = code_bytes(numel, bits) >= kStreamBytes;
  at::parallel_for(0, num_blocks(numel, block), grain_blocks(block), [&](int64_t b0, int64_t b1) {
    alignas(64) float xbuf[kMaxBlock];
    alignas(64) int8_t qbuf[kMaxBlock];
    alignas(64) uint8_t pbuf[kMaxBlock / 2];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * block, n = std::min(block, numel - start);
      const float* xb = as_float(x + start, n, xbuf);
      const float absmax = block_absmax(xb, n);
      scales[b] = absmax;
      const float inv = quant_inv_scale(absmax, qmax);
      // int8 codes go straight to the output unless it is streamed
      int8_t* q = (bits == 8 && !stream) ? reinterpret_cast<int8_t*>(codes) + start : qbuf;
      if (stochastic) encode_stochastic(xb, n, inv, qmax, start, seed, q);
      else encode_nearest(xb, n, inv, qmax, q);
      if (bits == 8) {
        if (stream) stream_copy_u8(codes + start, reinterpret_cast<const uint8_t*>(qbuf), n);
      } else if (stream) {
        pack_codes_int4(qbuf, n, pbuf);
        stream_copy_u8(codes + start / 2, pbuf, (n + 1) / 2);
      } else {
        pack_codes_int4(qbuf, n, codes + start / 2);
      }
    }
    if (stream) stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, int64_t bits,
                                                          int64_t block, bool stochastic,
                                                          int64_t seed) {
  check_quantize(x, bits, block, at::kCPU);
  const int64_t numel = x.numel();
  at::Tensor codes = at::empty({code_bytes(numel, bits)}, x.options().dtype(code_dtype(bits)));
  at::Tensor scales = at::empty({num_blocks(numel, block)}, x.options().dtype(at::kFloat));
  advise_huge_pages(codes.data_ptr(), codes.numel());
  MU_DISPATCH_FLOATS(x.scalar_type(), "quantize_blockwise", [&] {
    quantize_cpu_impl<scalar_t>(x.data_ptr<scalar_t>(), numel, bits, block, stochastic, seed,
                                static_cast<uint8_t*>(codes.data_ptr()), scales.data_ptr<float>());
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) { m.impl("quantize_blockwise", &quantize_blockwise_cpu); }

}  // namespace mini_unlearn
