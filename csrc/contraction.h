// Per-element math of the fused contraction-mapping update (DESIGN §2.2), shared by CPU and CUDA.
//   nu' = s_out[i] * s_in[j] + lam,  z = eta * nu'
//   a   = (1 - z)^L               (the training map's contraction over L steps)
//   c   = (1 - a) / nu' = eta * sum_{m<L} (1 - z)^m
//   acc <- a * acc + c * x
// a and c come from binary powering on q = 1 - (1-z)^k and s = sum_{m<k} (1-z)^m:
//   k -> 2k :  s <- s (2 - q),  q <- q (2 - q)
//   k -> k+1:  s <- s + (1 - q), q <- q + z (1 - q)
// Only +, * and fused multiply-adds (common.h's fmadd): no cancellation when z is tiny
// (c -> eta L exactly as nu' -> 0, no 0/0), exact algebra when z >= 1 (1 - z <= 0), and it
// vectorises (the bit pattern of L is uniform).
#pragma once
#include "common.h"

namespace mini_unlearn {

template <typename T>
HOST_DEVICE void contraction_double(T& q, T& s) {
  T t = T(2.f) - q;
  s = s * t;
  q = q * t;
}

template <typename T>
HOST_DEVICE void contraction_increment(T& q, T& s, T z) {
  T u = T(1.f) - q;
  s = s + u;
  q = fmadd(z, u, q);
}

// Number of significant bits of L (the loop runs from the top bit down).
HOST_DEVICE int steps_bits(int64_t steps) {
  int b = 0;
  while (b < 63 && (steps >> b) > 0) ++b;
  return b;
}

// Scalar form: a and c of one element (the CUDA kernel and the CPU tail use it).
HOST_DEVICE void contraction_coeffs(float nu, float eta, int64_t steps, float& a, float& c) {
  float z = eta * nu, q = 0.f, s = 0.f;
  for (int b = steps_bits(steps) - 1; b >= 0; --b) {
    contraction_double(q, s);
    if ((steps >> b) & 1) contraction_increment(q, s, z);
  }
  a = 1.f - q;
  c = eta * s;
}

template <typename T>
HOST_DEVICE T contraction_apply(T acc, T x, T a, T c) {
  return fmadd(a, acc, c * x);
}

}  // namespace mini_unlearn
