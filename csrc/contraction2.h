// Per-element math of the fused 2-state (momentum / Adam) contraction update (DESIGN §2.7),
// shared by CPU and CUDA: the generalisation of contraction.h from the scalar error e to the
// state s = (u, e) of the error u of the optimizer's first-moment buffer and the error e.
//
// One optimizer step with the forcing x held fixed, nu' = s_out[i] * s_in[j] + lam:
//   standard:  u <- mu u + c (nu' e + x);          e <- (1 - eta lam_dec) e - eta d u
//   nesterov:  g = nu' e + x;  u <- mu u + c g;    e <- (1 - eta lam_dec) e - eta d (g + mu u)
// (u on the right of e's update is the new u). As a linear map s <- M s + b x with
//   M = [[mu, c nu'], [-eta d gamma, 1 - eta lam_dec - eta d k nu']],   b = [c, -eta d k],
//   gamma = mu, k = c (standard);   gamma = mu^2, k = 1 + mu c (nesterov).
// L steps: s <- M^L s + S_L b x with S_L = sum_{m<L} M^m.
//
// As in contraction.h the powers are carried as Q_k = I - M^k, with N = I - M:
//   N = [[1 - mu, -c nu'], [eta d gamma, eta lam_dec + eta d k nu']]
// (every entry a product or a sum of same-sign terms: no 1 - z cancellation as nu' -> 0),
// and v_k = S_k b. Binary powering (S_{a+b} = S_a + M^a S_b, M^{a+b} = M^a M^b), top bit down:
//   k -> 2k :  T = 2I - Q,  Q <- Q T,  v <- T v        (M^{2k} = (M^k)^2, S_{2k} = (I + M^k) S_k)
//   k -> k+1:  W = I - Q,   v <- v + W b,  Q <- Q + N W  (S_{k+1} = S_k + M^k, M^{k+1} = M M^k)
// starting from k = 1 (the top bit of L): Q = N, v = b. No inverse, no division: correct for any
// M (nu' = 0, repeated or complex eigenvalues), and only +, * and fused multiply-adds so that
// it vectorises.
// Finally s <- (I - Q) s + v x.
#pragma once
#include "contraction.h"

namespace mini_unlearn {

// The scalars of one call, fixed over the whole [rows, cols] block (formed once, in double, on
// the host, then rounded to fp32).
struct Contraction2Params {
  float lam;        // added to s_out[i] * s_in[j]
  float eta;        // learning rate
  float n00;        // 1 - mu
  float c;          // the gradient's weight in u (1 - dampening; 1 - beta1 for Adam)
  float gamma;      // mu (standard) or mu^2 (nesterov)
  float k;          // c (standard) or 1 + mu c (nesterov)
  float eta_decay;  // eta * lam_dec (decoupled weight decay)
  int64_t steps;
};

// The call's scalars from the op's arguments (host code): the products in double, rounded once.
inline Contraction2Params make_contraction2_params(double lam, double lam_dec, double eta, double mu,
                                                   double c, bool nesterov, int64_t steps) {
  Contraction2Params p;
  p.lam = static_cast<float>(lam);
  p.eta = static_cast<float>(eta);
  p.n00 = static_cast<float>(1.0 - mu);
  p.c = static_cast<float>(c);
  p.gamma = static_cast<float>(nesterov ? mu * mu : mu);
  p.k = static_cast<float>(nesterov ? 1.0 + mu * c : c);
  p.eta_decay = static_cast<float>(eta * lam_dec);
  p.steps = steps;
  return p;
}

// The per-element entries of N = I - M and b that depend on nu' or d (n00 and b0 = c do not):
// ed = eta * d (eta where d is absent).
template <typename T>
struct Contraction2Elem {
  T n01, n10, n11, b1;
};

// Q = I - M^k as four entries.
template <typename T>
struct Contraction2Q {
  T q00, q01, q10, q11;
};

template <typename T>
HOST_DEVICE Contraction2Elem<T> contraction2_elem(T nu, T ed, const Contraction2Params& p) {
  const T ek = ed * T(p.k);
  Contraction2Elem<T> m;
  m.n01 = T(0.f) - T(p.c) * nu;
  m.n10 = ed * T(p.gamma);
  m.n11 = fmadd(ek, nu, T(p.eta_decay));
  m.b1 = T(0.f) - ek;
  return m;
}

// k = 1: Q = N, v = b.
template <typename T>
HOST_DEVICE void contraction2_init(const Contraction2Elem<T>& m, const Contraction2Params& p,
                                   Contraction2Q<T>& q, T& v0, T& v1) {
  q.q00 = T(p.n00);
  q.q01 = m.n01;
  q.q10 = m.n10;
  q.q11 = m.n11;
  v0 = T(p.c);
  v1 = m.b1;
}

// k -> 2k: T = 2I - Q, Q <- Q T, v <- T v (Q and T commute: both are polynomials in M). Each
// entry is at most one product and one fused multiply-add (common.h's fmadd / fmsub / fnmadd).
template <typename T>
HOST_DEVICE void contraction2_double(Contraction2Q<T>& q, T& v0, T& v1) {
  const T t00 = T(2.f) - q.q00;
  const T t11 = T(2.f) - q.q11;
  const T tr = t00 - q.q11;  // 2 - tr Q: (Q T)_01 = q01 (2 - q00 - q11), likewise _10
  const T p = q.q01 * q.q10;
  const T nv0 = fnmadd(q.q01, v1, t00 * v0);
  const T nv1 = fnmadd(q.q10, v0, t11 * v1);
  q.q00 = fmsub(q.q00, t00, p);
  q.q11 = fmsub(q.q11, t11, p);
  q.q01 = q.q01 * tr;
  q.q10 = q.q10 * tr;
  v0 = nv0;
  v1 = nv1;
}

// k -> k+1: W = I - Q (= M^k), v <- v + W b, Q <- Q + N W, as two fused multiply-adds per entry.
template <typename T>
HOST_DEVICE void contraction2_increment(Contraction2Q<T>& q, T& v0, T& v1,
                                        const Contraction2Elem<T>& m, const Contraction2Params& p) {
  const T n00 = T(p.n00), b0 = T(p.c);
  const T w00 = T(1.f) - q.q00;
  const T w11 = T(1.f) - q.q11;
  v0 = fmadd(w00, b0, fnmadd(q.q01, m.b1, v0));
  v1 = fmadd(w11, m.b1, fnmadd(q.q10, b0, v1));
  const T q00 = fmadd(n00, w00, fnmadd(m.n01, q.q10, q.q00));
  const T q01 = fmadd(m.n01, w11, fnmadd(n00, q.q01, q.q01));
  const T q10 = fmadd(m.n10, w00, fnmadd(m.n11, q.q10, q.q10));
  const T q11 = fmadd(m.n11, w11, fnmadd(m.n10, q.q01, q.q11));
  q.q00 = q00;
  q.q01 = q01;
  q.q10 = q10;
  q.q11 = q11;
}

// s <- (I - Q) s + v x.
template <typename T>
HOST_DEVICE void contraction2_apply(T& u, T& e, T x, const Contraction2Q<T>& q, T v0, T v1) {
  const T nu_ = fmadd(v0, x, fnmadd(q.q01, e, (T(1.f) - q.q00) * u));
  const T ne_ = fmadd(v1, x, fnmadd(q.q10, u, (T(1.f) - q.q11) * e));
  u = nu_;
  e = ne_;
}

// Scalar form for one element with steps >= 1 (the CUDA kernel and the CPU tail use it): Q and v
// after the bits of `steps` below the top one (nbits = steps_bits(steps)).
HOST_DEVICE void contraction2_coeffs(float nu, float ed, const Contraction2Params& p, int nbits,
                                     Contraction2Q<float>& q, float& v0, float& v1) {
  const Contraction2Elem<float> m = contraction2_elem(nu, ed, p);
  contraction2_init(m, p, q, v0, v1);
  for (int b = nbits - 2; b >= 0; --b) {
    contraction2_double(q, v0, v1);
    if ((p.steps >> b) & 1) contraction2_increment(q, v0, v1, m, p);
  }
}

}  // namespace mini_unlearn
