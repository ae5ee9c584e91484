// CPU kernel of contraction_accumulate (dense x) and contraction_accumulate_q (x as int8/int4
// codes): acc <- a * acc + c * x with a, c from nu' = s_out[i] s_in[j] + lam, computed on the fly.
#include <torch/library.h>
#include "../checks.h"
#include "../contraction.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

struct Segment {
  float lam, eta;
  int64_t steps;
  int nbits;
};

// kChunk vectors (kChunk * W consecutive elements) through the whole powering loop in
// registers: independent chains hide the mul/add latency, and no loads or stores happen
// inside the loop over the bits of `steps`.
template <int W, int kChunk>
MU_ALWAYS_INLINE void contraction_vectors(float* acc, const float* x, const float* s, float s_fixed,
                                          const Segment& seg) {
  using V = VF<W>;
  V z[kChunk], q[kChunk], sum[kChunk];
  // The top bit of `steps` is always set: from q = s = 0 its doubling is an exact no-op and its
  // increment gives s = 1, q = 0 + z * 1 = 0 + z, so start there (bit-identical, one step less).
  const bool top = seg.nbits > 0;
  for (int c = 0; c < kChunk; ++c) {
    z[c] = V(seg.eta) * (V(s_fixed) * V::load(s + c * W) + V(seg.lam));
    q[c] = top ? V(0.f) + z[c] : V(0.f);
    sum[c] = V(top ? 1.f : 0.f);
  }
  for (int b = seg.nbits - 2; b >= 0; --b) {
    for (int c = 0; c < kChunk; ++c) contraction_double(q[c], sum[c]);
    if ((seg.steps >> b) & 1)
      for (int c = 0; c < kChunk; ++c) contraction_increment(q[c], sum[c], z[c]);
  }
  for (int c = 0; c < kChunk; ++c)
    contraction_apply(V::load(acc + c * W), V::load(x + c * W), V(1.f) - q[c], V(seg.eta) * sum[c])
        .store(acc + c * W);
}

// One tile of n <= kTile elements whose nu' = s_fixed * s[t] + lam: groups of C vectors (C = 4
// under AVX-512, 8 under AVX2, whose narrower vectors need more independent chains to hide the
// powering's latency), single vectors, the rest with the scalar form (the same operations in the
// same order, so every element's result is the same whichever path or ISA computes it).
template <int W>
MU_ALWAYS_INLINE void contraction_tile_body(float* acc, const float* x, const float* s, float s_fixed,
                                            const Segment& seg, int64_t n) {
  int64_t t = 0;
  constexpr int C = W == 16 ? 4 : 8;
  for (; t + C * W <= n; t += C * W) contraction_vectors<W, C>(acc + t, x + t, s + t, s_fixed, seg);
  for (; t + W <= n; t += W) contraction_vectors<W, 1>(acc + t, x + t, s + t, s_fixed, seg);
  for (; t < n; ++t) {
    float a, c;
    contraction_coeffs(s_fixed * s[t] + seg.lam, seg.eta, seg.steps, a, c);
    acc[t] = contraction_apply(acc[t], x[t], a, c);
  }
}
MU_ISA_VARIANTS(void, contraction_tile,
                (float* acc, const float* x, const float* s, float s_fixed, const Segment& seg, int64_t n),
                (acc, x, s, s_fixed, seg, n))

// Walks acc's flat range [e0, e1) in tiles that stay within one row (one s_out value) and,
// for compressed x, within one quantisation block; `load_x(e, n, buf)` stages x[e, e + n).
template <typename LoadX>
void contraction_range(float* acc, const float* s_out, const float* s_in, int64_t d_in,
                       const Segment& seg, int64_t e0, int64_t e1, int64_t split, LoadX load_x) {
  float xbuf[kTile];
  for (int64_t e = e0; e < e1;) {
    int64_t n = std::min<int64_t>({kTile, e1 - e, split - e % split});
    const float* s;
    float s_fixed;
    if (d_in == 1) {  // flat layout: the spectrum runs along s_out
      s = s_out + e;
      s_fixed = s_in[0];
    } else {
      n = std::min(n, d_in - e % d_in);
      s = s_in + e % d_in;
      s_fixed = s_out[e / d_in];
    }
    contraction_tile(acc + e, load_x(e, n, xbuf), s, s_fixed, seg, n);
    e += n;
  }
}

Segment make_segment(double lam, double eta, int64_t steps) {
  return {static_cast<float>(lam), static_cast<float>(eta), steps, steps_bits(steps)};
}

void contraction_accumulate_cpu(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& s_out,
                                const at::Tensor& s_in, double lam, double eta, int64_t steps) {
  check_contraction_dense(acc, x, s_out, s_in, steps, at::kCPU);
  const Segment seg = make_segment(lam, eta, steps);
  float* a = acc.data_ptr<float>();
  const int64_t d_in = s_in.numel();
  MU_DISPATCH_FLOATS(x.scalar_type(), "contraction_accumulate", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, acc.numel(), 16384, [&](int64_t e0, int64_t e1) {
      contraction_range(a, s_out.data_ptr<float>(), s_in.data_ptr<float>(), d_in, seg, e0, e1, kTile,
                        [&](int64_t e, int64_t n, float* buf) { return as_float(xp + e, n, buf); });
    });
  });
}

void contraction_accumulate_q_cpu(const at::Tensor& acc, const at::Tensor& codes,
                                  const at::Tensor& scales, const at::Tensor& s_out,
                                  const at::Tensor& s_in, double lam, double eta, int64_t steps,
                                  int64_t bits, int64_t block) {
  check_contraction_codes(acc, codes, scales, s_out, s_in, steps, bits, block, at::kCPU);
  const Segment seg = make_segment(lam, eta, steps);
  const int qmax = qmax_for_bits(bits);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sc = scales.data_ptr<float>();
  at::parallel_for(0, acc.numel(), 16384, [&](int64_t e0, int64_t e1) {
    contraction_range(acc.data_ptr<float>(), s_out.data_ptr<float>(), s_in.data_ptr<float>(),
                      s_in.numel(), seg, e0, e1, block, [&](int64_t e, int64_t n, float* buf) {
                        decode_span(c, static_cast<int>(bits), e, n, dequant_step(sc[e / block], qmax), buf);
                        return static_cast<const float*>(buf);
                      });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) {
  m.impl("contraction_accumulate", &contraction_accumulate_cpu);
  m.impl("contraction_accumulate_q", &contraction_accumulate_q_cpu);
}

}  // namespace mini_unlearn
