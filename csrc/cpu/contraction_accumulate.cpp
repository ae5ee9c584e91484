// CPU kernel of contraction_accumulate (dense x) and contraction_accumulate_q (x as int8/int4
// codes): acc <- a * acc + c * x with a, c from nu' = s_out[i] s_in[j] + lam, computed on the fly.
#include <torch/library.h>
#include "../checks.h"
#include "../contraction.h"
#include <cstring>
#include "simd.h"

namespace mini_unlearn {
namespace {

struct Segment {
  float lam, eta;
  int64_t steps;
  int nbits;
};

// A fixed-width float vector (gcc vector extension: 16 lanes, one zmm register under AVX-512,
// two ymm under AVX2) with the operators the shared templates in contraction.h use, so the
// per-element math is the header's, evaluated on 16 elements at a time.
typedef float mu_v16f __attribute__((vector_size(64)));
struct VF {
  mu_v16f v;
  VF() = default;
  VF(mu_v16f x) : v(x) {}
  explicit VF(float f) : v(mu_v16f{} + f) {}
  friend VF operator+(VF a, VF b) { return a.v + b.v; }
  friend VF operator-(VF a, VF b) { return a.v - b.v; }
  friend VF operator*(VF a, VF b) { return a.v * b.v; }
};
constexpr int kLanes = 16;

// kChunk vectors (kChunk * 16 consecutive elements) through the whole powering loop in
// registers: independent chains hide the mul/add latency, and no loads or stores happen
// inside the loop over the bits of `steps`.
template <int kChunk>
__attribute__((always_inline)) inline void contraction_vectors(float* acc, const float* x,
                                                               const float* s, float s_fixed,
                                                               const Segment& seg) {
  VF z[kChunk], q[kChunk], sum[kChunk];
  // The top bit of `steps` is always set: from q = s = 0 its doubling is an exact no-op and its
  // increment gives s = 1, q = 0 + z * 1 = 0 + z, so start there (bit-identical, one step less).
  const bool top = seg.nbits > 0;
  for (int c = 0; c < kChunk; ++c) {
    mu_v16f sv;
    std::memcpy(&sv, s + c * kLanes, sizeof sv);
    z[c] = VF(seg.eta) * (VF(s_fixed) * VF(sv) + VF(seg.lam));
    q[c] = top ? VF(0.f) + z[c] : VF(0.f);
    sum[c] = VF(top ? 1.f : 0.f);
  }
  for (int b = seg.nbits - 2; b >= 0; --b) {
    for (int c = 0; c < kChunk; ++c) contraction_double(q[c], sum[c]);
    if ((seg.steps >> b) & 1)
      for (int c = 0; c < kChunk; ++c) contraction_increment(q[c], sum[c], z[c]);
  }
  for (int c = 0; c < kChunk; ++c) {
    mu_v16f av, xv;
    std::memcpy(&av, acc + c * kLanes, sizeof av);
    std::memcpy(&xv, x + c * kLanes, sizeof xv);
    const VF r = contraction_apply(VF(av), VF(xv), VF(1.f) - q[c], VF(seg.eta) * sum[c]);
    std::memcpy(acc + c * kLanes, &r.v, sizeof r.v);
  }
}

// One tile of n <= kTile elements whose nu' = s_fixed * s[t] + lam: groups of 64 and 16
// elements on vectors, the rest with the scalar form (the same operations in the same order,
// so every element's result is the same whichever path computes it).
MU_CLONES void contraction_tile(float* acc, const float* x, const float* s, float s_fixed,
                                const Segment& seg, int64_t n) {
  int64_t t = 0;
  for (; t + 4 * kLanes <= n; t += 4 * kLanes) contraction_vectors<4>(acc + t, x + t, s + t, s_fixed, seg);
  for (; t + kLanes <= n; t += kLanes) contraction_vectors<1>(acc + t, x + t, s + t, s_fixed, seg);
  for (; t < n; ++t) {
    float a, c;
    contraction_coeffs(s_fixed * s[t] + seg.lam, seg.eta, seg.steps, a, c);
    acc[t] = contraction_apply(acc[t], x[t], a, c);
  }
}

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
