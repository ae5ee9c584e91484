// CPU kernel of contraction2_accumulate: the 2-state (momentum / Adam) contraction update of
// DESIGN §2.7, (u, e) <- M^L (u, e) + S_L b x per element, with M's entries formed on the fly from
// nu' = s_out[i] s_in[j] + lam and the optional per-element preconditioner d (contraction2.h).
#include <torch/library.h>
#include "../checks.h"
#include "../contraction2.h"
#include <cstring>
#include "simd.h"

// This op keeps gcc's function multi-versioning (an AVX-512 clone picked at load time; the
// default clone is the -mavx2 -mfma baseline); its inner loop is written on explicit vectors.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MU_CLONES)
#define MU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#elif !defined(MU_CLONES)
#define MU_CLONES
#endif

namespace mini_unlearn {
namespace {

// A fixed-width float vector (gcc vector extension: 16 lanes, one zmm register under AVX-512,
// two ymm under AVX2) with the operators the templates of contraction2.h use, so that the
// per-element math is the header's, evaluated on 16 elements at a time.
typedef float mu2_v16f __attribute__((vector_size(64)));
struct VF {
  mu2_v16f v;
  VF() = default;
  VF(mu2_v16f x) : v(x) {}
  explicit VF(float f) : v(mu2_v16f{} + f) {}
  friend VF operator+(VF a, VF b) { return a.v + b.v; }
  friend VF operator-(VF a, VF b) { return a.v - b.v; }
  friend VF operator*(VF a, VF b) { return a.v * b.v; }
};
constexpr int kLanes = 16;

inline VF load(const float* p) {
  mu2_v16f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

inline void store(float* p, VF r) { std::memcpy(p, &r.v, sizeof r.v); }

struct Call {
  Contraction2Params p;
  int nbits;  // steps_bits(p.steps) >= 1
};

// kChunk vectors (kChunk * 16 consecutive elements) through the whole powering loop in
// registers: independent chains hide the mul/add latency, and nothing is loaded or stored
// inside the loop over the bits of `steps`.
template <int kChunk, bool kHasD>
__attribute__((always_inline)) inline void contraction2_vectors(float* u, float* e, const float* x,
                                                                const float* d, const float* s,
                                                                float s_fixed, const Call& call) {
  const Contraction2Params& p = call.p;
  Contraction2Elem<VF> m[kChunk];
  Contraction2Q<VF> q[kChunk];
  VF v0[kChunk], v1[kChunk];
  for (int c = 0; c < kChunk; ++c) {
    const VF nu = VF(s_fixed) * load(s + c * kLanes) + VF(p.lam);
    const VF ed = kHasD ? VF(p.eta) * load(d + c * kLanes) : VF(p.eta);
    m[c] = contraction2_elem(nu, ed, p);
    contraction2_init(m[c], p, q[c], v0[c], v1[c]);
  }
  for (int b = call.nbits - 2; b >= 0; --b) {
    for (int c = 0; c < kChunk; ++c) contraction2_double(q[c], v0[c], v1[c]);
    if ((p.steps >> b) & 1)
      for (int c = 0; c < kChunk; ++c) contraction2_increment(q[c], v0[c], v1[c], m[c], p);
  }
  for (int c = 0; c < kChunk; ++c) {
    VF uu = load(u + c * kLanes), ee = load(e + c * kLanes);
    contraction2_apply(uu, ee, load(x + c * kLanes), q[c], v0[c], v1[c]);
    store(u + c * kLanes, uu);
    store(e + c * kLanes, ee);
  }
}

// One tile of n <= kTile elements whose nu' = s_fixed * s[t] + lam: groups of 32 and 16 elements
// on vectors, the rest with the scalar form (the same operations in the same order, so every
// element's result is the same whichever path computes it).
template <bool kHasD>
__attribute__((always_inline)) inline void contraction2_tile_impl(float* u, float* e, const float* x,
                                                                  const float* d, const float* s,
                                                                  float s_fixed, const Call& call,
                                                                  int64_t n) {
  int64_t t = 0;
  for (; t + 2 * kLanes <= n; t += 2 * kLanes)
    contraction2_vectors<2, kHasD>(u + t, e + t, x + t, kHasD ? d + t : nullptr, s + t, s_fixed, call);
  for (; t + kLanes <= n; t += kLanes)
    contraction2_vectors<1, kHasD>(u + t, e + t, x + t, kHasD ? d + t : nullptr, s + t, s_fixed, call);
  for (; t < n; ++t) {
    Contraction2Q<float> q;
    float v0, v1;
    const float ed = kHasD ? call.p.eta * d[t] : call.p.eta;
    contraction2_coeffs(s_fixed * s[t] + call.p.lam, ed, call.p, call.nbits, q, v0, v1);
    contraction2_apply(u[t], e[t], x[t], q, v0, v1);
  }
}

MU_CLONES void contraction2_tile(float* u, float* e, const float* x, const float* d, const float* s,
                                 float s_fixed, const Call& call, int64_t n) {
  if (d != nullptr) contraction2_tile_impl<true>(u, e, x, d, s, s_fixed, call, n);
  else contraction2_tile_impl<false>(u, e, x, d, s, s_fixed, call, n);
}

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
