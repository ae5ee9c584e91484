// CPU kernel of contraction2_accumulate: the 2-state (momentum / Adam) contraction update of
// DESIGN §2.7, (u, e) <- M^L (u, e) + S_L b x per element, with M's entries formed on the fly from
// nu' = s_out[i] s_in[j] + lam and the optional per-element preconditioner d (contraction2.h).
#include <torch/library.h>
#include "../checks.h"
#include "../contraction2.h"
#include "simd.h"

namespace mini_unlearn {
namespace {

struct Call {
  Contraction2Params p;
  int nbits;  // steps_bits(p.steps) >= 1
};

// kChunk vectors of W lanes (kChunk * W consecutive elements) through the whole powering loop in
// registers: independent chains hide the latency of the fused multiply-adds, and nothing is
// loaded or stored inside the loop over the bits of `steps`.
template <int W, int kChunk, bool kHasD>
MU_ALWAYS_INLINE void contraction2_vectors(float* u, float* e, const float* x, const float* d,
                                           const float* s, float s_fixed, const Call& call) {
  using V = VF<W>;
  const Contraction2Params& p = call.p;
  Contraction2Elem<V> m[kChunk];
  Contraction2Q<V> q[kChunk];
  V v0[kChunk], v1[kChunk];
  for (int c = 0; c < kChunk; ++c) {
    const V nu = V(s_fixed) * V::load(s + c * W) + V(p.lam);
    const V ed = kHasD ? V(p.eta) * V::load(d + c * W) : V(p.eta);
    m[c] = contraction2_elem(nu, ed, p);
    contraction2_init(m[c], p, q[c], v0[c], v1[c]);
  }
  for (int b = call.nbits - 2; b >= 0; --b) {
    for (int c = 0; c < kChunk; ++c) contraction2_double(q[c], v0[c], v1[c]);
    if ((p.steps >> b) & 1)
      for (int c = 0; c < kChunk; ++c) contraction2_increment(q[c], v0[c], v1[c], m[c], p);
  }
  for (int c = 0; c < kChunk; ++c) {
    V uu = V::load(u + c * W), ee = V::load(e + c * W);
    contraction2_apply(uu, ee, V::load(x + c * W), q[c], v0[c], v1[c]);
    uu.store(u + c * W);
    ee.store(e + c * W);
  }
}

// Vectors per chunk: AVX-512 is throughput-bound from 1-2 on; AVX2's 16 registers cannot hold 4
// chains, but their spills to L1 cost less than the latency the extra chains hide (chosen by
// timing 1, 2 and 4 on one thread; README "Kernels" has the op's measured speed).
template <int W>
constexpr int kChunk2 = W == 16 ? 2 : 4;

// One tile of n <= kTile elements whose nu' = s_fixed * s[t] + lam: chunks of vectors, then single
// vectors, then the scalar form (the same operations in the same order, so every element's result
// is the same whichever path or ISA computes it).
template <int W, bool kHasD>
MU_ALWAYS_INLINE void contraction2_tile_impl(float* u, float* e, const float* x, const float* d,
                                             const float* s, float s_fixed, const Call& call, int64_t n) {
  constexpr int C = kChunk2<W>;
  int64_t t = 0;
  for (; t + C * W <= n; t += C * W)
    contraction2_vectors<W, C, kHasD>(u + t, e + t, x + t, kHasD ? d + t : nullptr, s + t, s_fixed, call);
  for (; t + W <= n; t += W)
    contraction2_vectors<W, 1, kHasD>(u + t, e + t, x + t, kHasD ? d + t : nullptr, s + t, s_fixed, call);
  for (; t < n; ++t) {
    Contraction2Q<float> q;
    float v0, v1;
    const float ed = kHasD ? call.p.eta * d[t] : call.p.eta;
    contraction2_coeffs(s_fixed * s[t] + call.p.lam, ed, call.p, call.nbits, q, v0, v1);
    contraction2_apply(u[t], e[t], x[t], q, v0, v1);
  }
}

template <int W>
MU_ALWAYS_INLINE void contraction2_tile_body(float* u, float* e, const float* x, const float* d,
                                             const float* s, float s_fixed, const Call& call, int64_t n) {
  if (d != nullptr) contraction2_tile_impl<W, true>(u, e, x, d, s, s_fixed, call, n);
  else contraction2_tile_impl<W, false>(u, e, x, d, s, s_fixed, call, n);
}
MU_ISA_VARIANTS(void, contraction2_tile,
                (float* u, float* e, const float* x, const float* d, const float* s, float s_fixed,
                 const Call& call, int64_t n),
                (u, e, x, d, s, s_fixed, call, n))

void contraction2_accumulate_cpu(const at::Tensor& u, const at::Tensor& e, const at::Tensor& x,
                                 const at::Tensor& s_out, const at::Tensor& s_in,
                                 const std::optional<at::Tensor>& d, double lam, double lam_dec,
                                 double eta, double mu, double c, bool nesterov, int64_t steps) {
  check_contraction2(u, e, x, s_out, s_in, d, lam, lam_dec, eta, mu, c, steps, at::kCPU);
  if (steps == 0 || u.numel() == 0) return;  // M^0 = I, S_0 = 0: nothing moves
  const Call call{make_contraction2_params(lam, lam_dec, eta, mu, c, nesterov, steps), steps_bits(steps)};
  float* up = u.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  const float* dp = d.has_value() ? d->data_ptr<float>() : nullptr;
  const float* so = s_out.data_ptr<float>();
  const float* si = s_in.data_ptr<float>();
  const int64_t d_in = s_in.numel();
  MU_DISPATCH_FLOATS(x.scalar_type(), "contraction2_accumulate", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // Flat element ranges of ~16k (whole rows of a wide layer), walked in tiles that stay within
    // one row (one s_out value); x is staged to fp32 a tile at a time.
    at::parallel_for(0, u.numel(), 16384, [&](int64_t e0, int64_t e1) {
      float xbuf[kTile];
      for (int64_t i = e0; i < e1;) {
        int64_t n = std::min<int64_t>(kTile, e1 - i);
        const float* s;
        float s_fixed;
        if (d_in == 1) {  // flat layout: the spectrum runs along s_out
          s = so + i;
          s_fixed = si[0];
        } else {
          n = std::min(n, d_in - i % d_in);
          s = si + i % d_in;
          s_fixed = so[i / d_in];
        }
        contraction2_tile(up + i, ep + i, as_float(xp + i, n, xbuf), dp ? dp + i : nullptr, s, s_fixed,
                          call, n);
        i += n;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mini_unlearn, CPU, m) {
  m.impl("contraction2_accumulate", &contraction2_accumulate_cpu);
}

}  // namespace mini_unlearn
