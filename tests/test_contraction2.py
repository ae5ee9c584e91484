"""contraction2_accumulate (the 2-state momentum / Adam contraction update, docs/math.md) on CPU:
the native kernel against the float64 reference and against stepping the optimizer recurrence
directly, the one-step matrix itself, nu' -> 0, the oscillating regime, the reduction to
contraction_accumulate, bit-exactness across the kernel's vector and scalar paths, opcheck,
torch.compile, the reference backend, and input validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mini_unlearn import ops, reference
from _kernel_cases import DTYPES, assert_equal, assert_within, make_x

NATIVE = torch.ops.mini_unlearn
# derandomize: CI runs the same examples every time (a random draw once found the edge case
# recorded in test_long_oscillating_powering below).
HYP = settings(max_examples=30, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])
STEPS = (0, 1, 2, 7, 100, 1000)
MUS = (0.0, 0.9, 0.99)
EPS32 = 2.0 ** -24


def _c(mu: float) -> float:
    """c of the two common conventions: plain SGD momentum (c = 1) and Adam's EMA (c = 1 - mu)."""
    return 1.0 - mu if mu > 0.5 else 1.0


def _k(mu: float, c: float, nesterov: bool) -> float:
    return 1.0 + mu * c if nesterov else c


def make_inputs(rows: int, cols: int, *, eta: float, mu: float, c: float, nesterov: bool, lam: float,
                zmax: float, with_d: bool, dtype=torch.float32, seed: int = 0, flat: bool = False,
                device: str = "cpu"):
    """u, e, x, s_out, s_in, d on `device` with eta d k nu' <= zmax (zmax < 2: a stable training
    map for every mu and both variants), the largest nu' reached, and nu' = lam on the last
    column."""
    g = torch.Generator().manual_seed(seed)
    d = (0.5 + torch.rand(rows, cols, generator=g)) if with_d else None
    dmax = 1.5 if with_d else 1.0
    smax = max(zmax / (eta * dmax * _k(mu, c, nesterov)) - lam, 0.0) ** 0.5
    s_out, s_in = torch.rand(rows, generator=g) * smax, torch.rand(cols, generator=g) * smax
    s_out[0] = smax
    if cols > 1:
        s_in[0] = smax
        s_in[-1] = 0.0
    shape = (rows * cols,) if flat else (rows, cols)
    u = torch.randn(shape, generator=g)
    e = torch.randn(shape, generator=g)
    x = make_x(rows * cols, torch.float32, seed + 1).reshape(shape).to(dtype)
    if d is not None:
        d = d.reshape(shape).to(device)
    return u.to(device), e.to(device), x.to(device), s_out.to(device), s_in.to(device), d


def step_directly(u, e, x, nu, d, *, lam_dec, eta, mu, c, nesterov, steps):
    """The optimizer recurrence itself, one step at a time, in float64 (the oracle of the matrix
    form): u <- mu u + c g, e <- (1 - eta lam_dec) e - eta d (u or g + mu u), g = nu' e + x."""
    u, e, x = u.double(), e.double(), x.double()
    dd = 1.0 if d is None else d.double()
    for _ in range(steps):
        g = nu * e + x
        u = mu * u + c * g
        e = (1.0 - eta * lam_dec) * e - eta * dd * ((g + mu * u) if nesterov else u)
    return u, e


def _nu(s_out, s_in, lam, shape):
    return (s_out.double()[:, None] * s_in.double()[None, :] + lam).reshape(shape)


def powering_scale(m, b, steps: int):
    """Entrywise max over the powers k the kernel's top-down powering holds (each prefix of the
    bits of `steps`, before and after its increment) of |Q_k| = |I - M^k| and |S_k b|: the
    magnitudes its fp32 roundings are relative to. One float64 pass of the same powering."""
    p = (torch.ones_like(m[0]), torch.zeros_like(m[0]), torch.zeros_like(m[0]), torch.ones_like(m[0]))
    v = (torch.zeros_like(m[0]), torch.zeros_like(m[0]))
    qmax, vmax = [torch.zeros_like(m[0]) for _ in range(4)], [torch.zeros_like(m[0]) for _ in range(2)]

    def track(p, v):
        for a, t in zip(qmax, (1 - p[0], p[1], p[2], 1 - p[3])):
            torch.maximum(a, t.abs(), out=a)
        for a, t in zip(vmax, v):
            torch.maximum(a, t.abs(), out=a)

    for bit in reversed(range(steps.bit_length())):
        v = (v[0] + p[0] * v[0] + p[1] * v[1], v[1] + p[2] * v[0] + p[3] * v[1])
        p = (p[0] * p[0] + p[1] * p[2], p[0] * p[1] + p[1] * p[3],
             p[2] * p[0] + p[3] * p[2], p[2] * p[1] + p[3] * p[3])
        track(p, v)
        if (steps >> bit) & 1:
            v = (v[0] + p[0] * b[0] + p[1] * b[1], v[1] + p[2] * b[0] + p[3] * b[1])
            p = (p[0] * m[0] + p[1] * m[2], p[0] * m[1] + p[1] * m[3],
                 p[2] * m[0] + p[3] * m[2], p[2] * m[1] + p[3] * m[3])
            track(p, v)
    return qmax, vmax


def contraction2_bound(u0, e0, x, s_out, s_in, d, kw):
    """Per output: 1e-5 relative to its magnitude |M^L| |s| + |S_L b| |x|; plus 1e-6 relative to
    the largest intermediates of the powering, |Q_k| |s| + |S_k b| |x| (the kernel carries
    M^k as Q_k = I - M^k, as contraction_accumulate does, so M^L ~ 0 has an absolute fp32
    error: exact as nu' -> 0 at the price of that); plus the conditioning in the inputs the
    kernel rounds to fp32 (nu', eta d, mu, c): the reference's own change under an
    8-unit-roundoff relative perturbation of each."""
    shape = u0.shape
    nu = _nu(s_out, s_in, kw["lam"], shape)
    dd = 1.0 if d is None else d.double()
    xd, ud, ed = x.double(), u0.double(), e0.double()
    args = dict(lam_dec=kw["lam_dec"], eta=kw["eta"], mu=kw["mu"], c=kw["c"], nesterov=kw["nesterov"])

    def run(nu_, **over):
        m, b = reference.contraction2_system(nu_, dd, **{**args, **over})
        p, v = reference.contraction2_coeffs(m, b, kw["steps"])
        return p, v, (p[0] * ud + p[1] * ed + v[0] * xd, p[2] * ud + p[3] * ed + v[1] * xd)

    p, v, (ru, re) = run(nu)
    mag_u = p[0].abs() * ud.abs() + p[1].abs() * ed.abs() + v[0].abs() * xd.abs()
    mag_e = p[2].abs() * ud.abs() + p[3].abs() * ed.abs() + v[1].abs() * xd.abs()
    m, b = reference.contraction2_system(nu, dd, **args)
    qm, vm = powering_scale(m, b, kw["steps"])
    # Binary powering doubles a power's relative rounding error at every squaring, so after L
    # steps it is ~L unit roundoffs of the intermediates (it matters where |eig M| ~ 1 for long:
    # heavy-ball momentum 0.99 over thousands of steps).
    rel = max(1e-6, 2.0 * kw["steps"] * EPS32)
    bu = 1e-5 * mag_u + rel * (qm[0] * ud.abs() + qm[1] * ed.abs() + vm[0] * xd.abs())
    be = 1e-5 * mag_e + rel * (qm[2] * ud.abs() + qm[3] * ed.abs() + vm[1] * xd.abs())
    r = 1 + 8 * EPS32
    for nu_, over in ((nu * r, {}), (nu, {"eta": kw["eta"] * r}), (nu, {"mu": kw["mu"] * r}),
                      (nu, {"c": kw["c"] * r})):
        _, _, (pu, pe) = run(nu_, **over)
        bu = bu + (pu - ru).abs()
        be = be + (pe - re).abs()
    return ru, re, bu + 1e-30, be + 1e-30


def check_native(rows, cols, *, eta, mu, c, nesterov, lam, lam_dec, steps, zmax, with_d,
                 dtype=torch.float32, seed=0, flat=False, direct=False, device="cpu"):
    """Native update against the float64 reference (and, with `direct`, against stepping the
    recurrence), within contraction2_bound; returns the worst error / bound ratio."""
    u0, e0, x, s_out, s_in, d = make_inputs(rows, cols, eta=eta, mu=mu, c=c, nesterov=nesterov,
                                            lam=lam, zmax=zmax, with_d=with_d, dtype=dtype,
                                            seed=seed, flat=flat, device=device)
    kw = dict(lam=lam, lam_dec=lam_dec, eta=eta, mu=mu, c=c, nesterov=nesterov, steps=steps)
    u, e = u0.clone(), e0.clone()
    out = ops.contraction2_accumulate(u, e, x, s_out, s_in, d, **kw)
    assert out[0] is u and out[1] is e and u.dtype == e.dtype == torch.float32
    if steps == 0:
        assert_equal(u, u0)
        assert_equal(e, e0)
        return 0.0
    ru, re, bu, be = contraction2_bound(u0, e0, x, s_out, s_in, d, kw)
    what = f"contraction2 {kw} zmax={zmax} d={with_d} {dtype}"
    assert_within(u, ru, bu, "u: " + what)
    assert_within(e, re, be, "e: " + what)
    # the reference as the backend would run it (float64 inside, written back to fp32 in place)
    uref, eref = u0.clone(), e0.clone()
    reference.contraction2_accumulate(uref, eref, x, s_out, s_in, d, **kw)
    assert_within(uref, ru, 1e-7 * ru.abs() + 1e-30, "reference u")
    assert_within(eref, re, 1e-7 * re.abs() + 1e-30, "reference e")
    if direct:
        nu = _nu(s_out, s_in, lam, u0.shape)
        su, se = step_directly(u0, e0, x, nu, d, lam_dec=lam_dec, eta=eta, mu=mu, c=c,
                               nesterov=nesterov, steps=steps)
        scale = ru.abs().max() + re.abs().max()
        assert_within(ru, su, 1e-12 * scale * steps + 1e-30, "reference vs stepping, u")
        assert_within(re, se, 1e-12 * scale * steps + 1e-30, "reference vs stepping, e")
        assert_within(u, su, bu + 1e-12 * scale * steps, "native vs stepping, u: " + what)
        assert_within(e, se, be + 1e-12 * scale * steps, "native vs stepping, e: " + what)
    return float(max(((u.double() - ru).abs() / bu).max(), ((e.double() - re).abs() / be).max()))


# ---- the math ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [False, True])
def test_one_step_matrix_is_the_optimizer_step(nesterov):
    """M and b of docs/math.md (contraction2_system) reproduce one step of the recurrence, and
    have the documented closed form."""
    g = torch.Generator().manual_seed(0)
    nu, d = torch.rand(50, generator=g, dtype=torch.float64) * 3, torch.rand(50, generator=g, dtype=torch.float64)
    u, e, x = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    eta, mu, c, lam_dec = 0.07, 0.9, 0.3, 0.01
    m, b = reference.contraction2_system(nu, d, lam_dec, eta, mu, c, nesterov)
    su, se = step_directly(u, e, x, nu, d, lam_dec=lam_dec, eta=eta, mu=mu, c=c, nesterov=nesterov, steps=1)
    torch.testing.assert_close(m[0] * u + m[1] * e + b[0] * x, su, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(m[2] * u + m[3] * e + b[1] * x, se, rtol=1e-14, atol=1e-14)
    gamma, k = (mu ** 2, 1 + mu * c) if nesterov else (mu, c)
    torch.testing.assert_close(m[2], -eta * d * gamma)
    torch.testing.assert_close(m[3], 1 - eta * lam_dec - eta * d * k * nu)
    torch.testing.assert_close(b[1], -eta * d * k)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("mu", MUS)
def test_matches_stepping_every_steps(mu, with_d, nesterov):
    """steps in {0, 1, 2, 7, 100, 1000}: native and reference against the recurrence stepped
    one step at a time in float64."""
    for steps in STEPS:
        check_native(7, 37, eta=0.05, mu=mu, c=_c(mu), nesterov=nesterov, lam=1e-3, lam_dec=0.1,
                     steps=steps, zmax=1.5, with_d=with_d, seed=steps, direct=True)


@HYP
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), eta=st.floats(1e-4, 1.0),
       mu=st.sampled_from(MUS), c=st.floats(0.05, 1.0), nesterov=st.booleans(),
       lam=st.sampled_from((0.0, 1e-3, 0.1)), lam_dec=st.sampled_from((0.0, 0.01, 0.5)),
       steps=st.one_of(st.sampled_from(STEPS), st.integers(0, 3000)),
       zmax=st.sampled_from((1e-7, 0.5, 1.0, 1.5, 1.9)), with_d=st.booleans(),
       dtype=st.sampled_from(DTYPES), flat=st.booleans(), seed=st.integers(0, 2**20))
def test_native_matches_reference(rows, cols, eta, mu, c, nesterov, lam, lam_dec, steps, zmax, with_d,
                                  dtype, flat, seed):
    if flat:  # one long spectrum along s_out, s_in of length 1
        rows, cols = rows * cols, 1
    check_native(rows, cols, eta=eta, mu=mu, c=c, nesterov=nesterov, lam=lam, lam_dec=lam_dec,
                 steps=steps, zmax=zmax, with_d=with_d, dtype=dtype, seed=seed, flat=flat)


def test_long_oscillating_powering():
    """The case a random draw found: heavy-ball momentum 0.99 (c = 1), eta nu' = 0.5, 2208 steps:
    complex eigenvalues of modulus ~0.995, so the powering's fp32 error grows ~L unit roundoffs
    before the power decays; within the bound, and far below the decayed values' scale of 1."""
    worst = check_native(1, 17, eta=1.0, mu=0.99, c=1.0, nesterov=False, lam=0.0, lam_dec=0.0,
                         steps=2208, zmax=0.5, with_d=False, seed=0, direct=True)
    assert worst <= 1.0


def test_large_parallel():
    """~40k elements (three parallel chunks of 16k, many tiles), with d, momentum 0.9, 156 steps,
    bf16 x."""
    check_native(128, 301, eta=0.01, mu=0.9, c=0.1, nesterov=True, lam=0.1, lam_dec=0.01, steps=156,
                 zmax=1.5, with_d=True, dtype=torch.bfloat16, seed=3)


@pytest.mark.parametrize("nesterov", [False, True])
def test_oscillating_regime(nesterov):
    """mu = 0.9 and eta nu' up to 3.5 (standard; 1.9 nesterov): M has complex eigenvalues of
    modulus < 1 for almost every element, the state rotates as it decays; stepping agrees."""
    zmax = 1.9 if nesterov else 3.5
    u0, e0, x, s_out, s_in, d = make_inputs(9, 40, eta=0.5, mu=0.9, c=1.0, nesterov=nesterov, lam=0.0,
                                            zmax=zmax, with_d=False, seed=1)
    m, _ = reference.contraction2_system(_nu(s_out, s_in, 0.0, u0.shape), 1.0, 0.0, 0.5, 0.9, 1.0, nesterov)
    tr, det = m[0] + m[3], m[0] * m[3] - m[1] * m[2]
    complex_ev = tr ** 2 < 4 * det
    assert complex_ev.float().mean() > 0.75 and bool((det < 1).all())
    for steps in (1, 2, 7, 100, 1000):
        check_native(9, 40, eta=0.5, mu=0.9, c=1.0, nesterov=nesterov, lam=0.0, lam_dec=0.0,
                     steps=steps, zmax=zmax, with_d=False, seed=1, direct=True)


@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("mu", MUS)
def test_zero_curvature(mu, with_d):
    """nu' = 0 (lam = 0, zero spectra): M = [[mu, 0], [-eta d mu, 1]], no 0/0 and no loss of the
    small terms; e and u follow the closed form of a geometric series."""
    eta, c, steps = 0.01, _c(mu), 1000
    u0, e0 = torch.randn(6, 5), torch.randn(6, 5)
    x = torch.randn(6, 5)
    d = torch.rand(6, 5) + 0.5 if with_d else None
    for s_out, s_in in ((torch.zeros(6), torch.zeros(5)), (torch.rand(6), torch.zeros(5))):
        u, e = u0.clone(), e0.clone()
        ops.contraction2_accumulate(u, e, x, s_out, s_in, d, lam=0.0, eta=eta, mu=mu, c=c, steps=steps)
        assert torch.isfinite(u).all() and torch.isfinite(e).all()
        # u_L = mu^L u0 + c (1 - mu^L)/(1 - mu) x;  e_L = e0 - eta d sum_{t<L} u_{t+1}
        dd = 1.0 if d is None else d.double()
        ud, xd = u0.double(), x.double()
        if mu == 0.0:
            want_u, sum_u = c * xd, steps * c * xd
        else:
            geo = (1 - mu ** steps) / (1 - mu)
            want_u = mu ** steps * ud + c * geo * xd
            sum_u = mu * geo * ud + c * (steps - mu * geo) / (1 - mu) * xd
        want_e = e0.double() - eta * dd * sum_u
        torch.testing.assert_close(u.double(), want_u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.double(), want_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_tiny_curvature_is_continuous(mu):
    """eta nu' down to 1e-9 over 1e5 steps: a naive fp32 M would round 1 - eta nu' (relative
    error up to ~1 in eta nu', amplified 1e5-fold); the I - M form keeps it, so the kernel
    follows the float64 reference to ~1e-5."""
    steps, eta = 100_000, 0.1
    for nu in (1e-30, 1e-12, 1e-8, 1e-7, 1e-6):
        s_out = torch.tensor([nu])
        u, e = torch.ones(1, 1), torch.ones(1, 1)
        x = torch.ones(1, 1)
        kw = dict(lam=0.0, lam_dec=0.0, eta=eta, mu=mu, c=1.0, nesterov=False, steps=steps)
        ops.contraction2_accumulate(u, e, x, s_out, torch.ones(1), None, **kw)
        ur, er = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
        reference.contraction2_accumulate(ur, er, x, s_out, torch.ones(1), None, **kw)
        torch.testing.assert_close(u.double(), ur, rtol=2e-5, atol=0)
        torch.testing.assert_close(e.double(), er, rtol=2e-5, atol=0)


def test_reduces_to_contraction_accumulate():
    """mu = 0, c = 1, d = 1, lam_dec = 0: e <- (1 - eta nu') e - eta x, which is
    contraction_accumulate's acc <- (1 - eta nu') acc + eta x with acc = -e; u is then the last
    step's gradient nu' e_{L-1} + x."""
    g = torch.Generator().manual_seed(0)
    s_out, s_in = torch.rand(17, generator=g), torch.rand(33, generator=g)
    eta, lam = 0.3, 1e-3
    for steps in (1, 7, 156, 1000):
        acc0, x = torch.randn(17, 33, generator=g), torch.randn(17, 33, generator=g)
        acc = acc0.clone()
        ops.contraction_accumulate(acc, x, s_out, s_in, lam=lam, eta=eta, steps=steps)
        u, e = torch.randn(17, 33, generator=g), -acc0
        ops.contraction2_accumulate(u, e, x, s_out, s_in, lam=lam, eta=eta, mu=0.0, c=1.0, steps=steps)
        torch.testing.assert_close(e, -acc, rtol=1e-5, atol=1e-5)
        acc_prev = acc0.clone()  # acc after steps - 1, i.e. -e_{L-1}
        ops.contraction_accumulate(acc_prev, x, s_out, s_in, lam=lam, eta=eta, steps=steps - 1)
        nu = s_out[:, None] * s_in[None, :] + lam
        torch.testing.assert_close(u, nu * -acc_prev + x, rtol=1e-5, atol=1e-5)


# ---- kernel paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [False, True])
def test_vector_and_scalar_paths_bit_exact(nesterov):
    """Every element's result is independent of where it sits (16/32-lane vectors or the scalar
    tail, one row or a flat spectrum): [19, 37] against the same nu' laid out flat (s_in = [1])."""
    u0, e0, x, s_out, s_in, d = make_inputs(19, 37, eta=0.1, mu=0.9, c=0.1, nesterov=nesterov,
                                            lam=0.01, zmax=1.5, with_d=True, seed=5)
    kw = dict(lam=0.01, lam_dec=0.02, eta=0.1, mu=0.9, c=0.1, nesterov=nesterov, steps=999)
    u, e = u0.clone(), e0.clone()
    ops.contraction2_accumulate(u, e, x, s_out, s_in, d, **kw)
    prod = (s_out[:, None] * s_in[None, :]).reshape(-1)  # nu' = prod * 1 + lam, the same fp32 value
    uf, ef = u0.reshape(-1).clone(), e0.reshape(-1).clone()
    ops.contraction2_accumulate(uf, ef, x.reshape(-1), prod, torch.ones(1), d.reshape(-1), **kw)
    assert_equal(uf, u.reshape(-1))
    assert_equal(ef, e.reshape(-1))
    for r in (0, 7, 18):  # one row alone (37 = 32 on vectors + 5 scalar) gives the same values
        ur, er = u0[r:r + 1].clone(), e0[r:r + 1].clone()
        ops.contraction2_accumulate(ur, er, x[r:r + 1], s_out[r:r + 1], s_in, d[r:r + 1], **kw)
        assert_equal(ur, u[r:r + 1])
        assert_equal(er, e[r:r + 1])


def test_d_ones_equals_no_d_and_steps_zero_is_identity():
    u0, e0, x, s_out, s_in, _ = make_inputs(5, 70, eta=0.2, mu=0.99, c=0.01, nesterov=False, lam=0.0,
                                            zmax=1.0, with_d=False, seed=2)
    kw = dict(lam=0.0, lam_dec=0.1, eta=0.2, mu=0.99, c=0.01, steps=77)
    a = [t.clone() for t in (u0, e0)]
    b = [t.clone() for t in (u0, e0)]
    ops.contraction2_accumulate(*a, x, s_out, s_in, None, **kw)
    ops.contraction2_accumulate(*b, x, s_out, s_in, torch.ones_like(u0), **kw)
    assert_equal(a[0], b[0])
    assert_equal(a[1], b[1])
    # steps = 0: u and e untouched, even where x is not finite
    xn = torch.full_like(x, float("nan"))
    u, e = u0.clone(), e0.clone()
    ops.contraction2_accumulate(u, e, xn, s_out, s_in, None, **{**kw, "steps": 0})
    assert_equal(u, u0)
    assert_equal(e, e0)


def test_empty():
    u, e = torch.zeros(0, 5), torch.zeros(0, 5)
    ops.contraction2_accumulate(u, e, torch.zeros(0, 5), torch.zeros(0), torch.ones(5), lam=0.0, eta=0.1,
                                mu=0.9, c=0.1, steps=10)
    assert u.shape == (0, 5)


def test_reference_backend_runs_through_the_python_api(monkeypatch):
    """Without the native extension ops dispatches to mini_unlearn.reference, which takes the
    op's exact (keyword) signature."""
    u0, e0, x, s_out, s_in, d = make_inputs(4, 33, eta=0.1, mu=0.9, c=0.1, nesterov=True, lam=0.0,
                                            zmax=1.0, with_d=True, seed=4)
    kw = dict(lam=0.0, lam_dec=0.01, eta=0.1, mu=0.9, c=0.1, nesterov=True, steps=100)
    nat = ops.contraction2_accumulate(u0.clone(), e0.clone(), x, s_out, s_in, d, **kw)
    monkeypatch.setattr(ops, "_impl", reference)
    ref = ops.contraction2_accumulate(u0.clone(), e0.clone(), x, s_out, s_in, d, **kw)
    for a, b in zip(nat, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="steps must be >= 0"):
        ops.contraction2_accumulate(u0, e0, x, s_out, s_in, d, **{**kw, "steps": -1})


# ---- opcheck, torch.compile -------------------------------------------------------------------

def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    so, si = torch.rand(10, generator=g), torch.rand(30, generator=g)
    u, e, x, d = (torch.randn(10, 30, generator=g) for _ in range(4))
    kw = dict(lam=1e-3, lam_dec=0.01, eta=0.1, mu=0.9, c=0.1, nesterov=False, steps=7)
    return [
        ((u, e, x, so, si, d.abs()), kw),
        ((u, e, x.bfloat16(), so, si, None), {**kw, "nesterov": True, "steps": 156}),
        ((u.reshape(-1), e.reshape(-1), x.reshape(-1).half(), torch.rand(300, generator=g), torch.rand(1),
          None), {**kw, "mu": 0.0, "c": 1.0, "steps": 1000}),
        ((u, e, x, so, si, None), {**kw, "steps": 0}),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    args, kwargs = _opcheck_samples()[case]
    torch.library.opcheck(NATIVE.contraction2_accumulate.default, args, kwargs)


def test_torch_compile_fullgraph():
    """The op in a fullgraph torch.compile region (register_fake, functionalised mutation of u
    and e); only the custom op is in the graph, so this compiles in seconds."""
    torch._dynamo.reset()

    def f(u, e, x, s_out, s_in, d):
        torch.ops.mini_unlearn.contraction2_accumulate(u, e, x, s_out, s_in, d, lam=1e-3, lam_dec=0.01,
                                                       eta=0.1, mu=0.9, c=0.1, nesterov=True, steps=156)

    (u, e, x, so, si, d), _ = _opcheck_samples()[0]
    ue, ee = u.clone(), e.clone()
    f(ue, ee, x, so, si, d)
    uc, ec = u.clone(), e.clone()
    torch.compile(f, fullgraph=True)(uc, ec, x, so, si, d)
    assert_equal(uc, ue)
    assert_equal(ec, ee)


# ---- input validation -------------------------------------------------------------------------

def _bad_cases():
    u, e, x, d = torch.zeros(4, 25), torch.zeros(4, 25), torch.randn(4, 25), torch.ones(4, 25)
    so, si = torch.rand(4), torch.rand(25)
    kw = dict(lam=0.0, lam_dec=0.0, eta=0.1, mu=0.9, c=0.1, nesterov=False, steps=3)
    C2 = NATIVE.contraction2_accumulate

    def call(*args, **over):
        return lambda: C2(*args, **{**kw, **over})

    nan, inf = float("nan"), float("inf")
    return {
        "u dtype": (call(u.double(), e, x, so, si, d), r"u must be float32, got Double.*\.float\(\)"),
        "e dtype": (call(u, e.bfloat16(), x, so, si, d), r"e must be float32, got BFloat16"),
        "u non-contiguous": (call(torch.zeros(25, 4).t(), e, x, so, si, d), r"u must be contiguous"),
        "e non-contiguous": (call(u, torch.zeros(25, 4).t(), x, so, si, d), r"e must be contiguous"),
        "u e shapes": (call(u, torch.zeros(100), x, so, si, d), r"u and e must have the same shape, got \[4, 25\] and \[100\]"),
        "u numel": (call(torch.zeros(4, 24), torch.zeros(4, 24), x, so, si, d), r"u has 96 elements but the spectra describe 4 x 25"),
        "x numel": (call(u, e, torch.randn(99), so, si, d), r"x has 99 elements, u has 100"),
        "x int64": (call(u, e, torch.ones(4, 25, dtype=torch.int64), so, si, d), r"x must be float32, bfloat16 or float16, got Long"),
        "x non-contiguous": (call(u, e, torch.randn(25, 4).t(), so, si, d), r"x must be contiguous"),
        "d dtype": (call(u, e, x, so, si, d.half()), r"d must be float32, got Half.*None for d = 1"),
        "d numel": (call(u, e, x, so, si, torch.ones(4, 24)), r"d has 96 elements, u has 100"),
        "d non-contiguous": (call(u, e, x, so, si, torch.ones(25, 4).t()), r"d must be contiguous"),
        "spectra dtype": (call(u, e, x, so.double(), si, d), r"s_out and s_in must be float32, got Double and Float"),
        "spectra 2-D": (call(u, e, x, so[:, None], si, d), r"contiguous 1-D spectra, got shapes \[4, 1\] and \[25\]"),
        "negative steps": (call(u, e, x, so, si, d, steps=-1), r"steps must be >= 0, got -1"),
        "nan eta": (call(u, e, x, so, si, d, eta=nan), r"eta must be a finite number, got nan"),
        "inf mu": (call(u, e, x, so, si, d, mu=inf), r"mu must be a finite number, got inf"),
        "inf lam": (call(u, e, x, so, si, d, lam=-inf), r"lam must be a finite number, got -inf"),
        "nan lam_dec": (call(u, e, x, so, si, d, lam_dec=nan), r"lam_dec must be a finite number"),
        "nan c": (call(u, e, x, so, si, d, c=nan), r"c must be a finite number"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_clear_error(name):
    call, match = BAD[name]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_bad_input_through_python_wrapper():
    with pytest.raises(RuntimeError, match="u must be float32"):
        ops.contraction2_accumulate(torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3),
                                    torch.ones(3), torch.ones(1), lam=0, eta=0.1, mu=0.9, c=0.1, steps=1)
