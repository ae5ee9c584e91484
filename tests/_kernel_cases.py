"""Comparisons of the native kernel ops with mini_unlearn.reference, shared by test_ops.py (CPU)
and test_cuda.py (CUDA): each `check_*` builds its inputs on `device`, runs the native op
(through mini_unlearn.ops, i.e. torch.ops.mini_unlearn.*) and the pure-PyTorch reference, and
asserts agreement: quantize codes/scales and dequantize bit-exact, products within fp32 bounds.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from mini_unlearn import ops, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKS = (32, 64, 256, 4096)
BITS = (4, 8)
LAMS = (0.0, 1e-3, 0.1)
STEPS = (0, 1, 7, 156, 1000)
LARGE = 100_003  # ~100k, not a multiple of any block


# ---- inputs ---------------------------------------------------------------------------------

def lengths(block: int) -> st.SearchStrategy[int]:
    """Edge lengths around one block, a large non-multiple, and anything in between."""
    edges = [1, 2, block - 1, block, block + 1, 2 * block + 3, LARGE]
    return st.one_of(st.sampled_from(edges), st.integers(1, 3 * block + 7))


def make_x(n: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """Normal values with a per-block spread of magnitudes, a zero stretch and exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g).clamp(-3, 3))
    if n >= 8:
        x[n // 3: n // 3 + min(n // 4, 300)] = 0.0  # zero run (often a whole zero block)
        x[1] = 2.5  # ties for round-half-to-even when the block's absmax maps them onto .5
        x[2] = -2.5
    return x.to(dtype).to(device)


def seed_for(gen_seed: int) -> int:
    """The seed ops.quantize_blockwise draws from `Generator().manual_seed(gen_seed)`."""
    return ops._seed(torch.Generator().manual_seed(gen_seed))


def rows_of(k: int, n: int, bits: int, block: int, seed: int, device: str):
    """k compressed rows [k, ...] of random vectors (stacked codes and scales) and the rows."""
    w = torch.stack([make_x(n, torch.float32, seed + j) for j in range(k)]).to(device)
    # native quantize (bit-exact with the reference, tested separately) keeps large cases fast
    pairs = [ops.quantize_blockwise(w[j], bits=bits, block=block) for j in range(k)]
    codes = torch.stack([c for c, _ in pairs]).contiguous()
    scales = torch.stack([s for _, s in pairs]).contiguous()
    return codes, scales


def assert_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Bit-exact (NaN equal to NaN); torch.equal first, assert_close only to explain a failure."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        nan = torch.isnan(actual)
        if torch.equal(nan, torch.isnan(expected)) and torch.equal(actual[~nan], expected[~nan]):
            return
    elif torch.equal(actual, expected):
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    raise AssertionError("not bit-exact")  # e.g. -0.0 vs 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str):
    """|actual - expected| <= bound elementwise (float64), with the worst offender in the message."""
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err - bound).masked_fill(~bad, -1.0).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; worst at flat index "
            f"{i}: actual {actual.flatten()[i].item()!r} expected {expected.flatten()[i].item()!r} "
            f"err {err.flatten()[i].item():.3g} bound {bound.flatten()[i].item():.3g}")


# ---- quantize / dequantize ------------------------------------------------------------------

def check_quantize(n: int, dtype, bits: int, block: int, stochastic: bool, seed: int,
                   device: str = "cpu"):
    """Codes and scales bit-exact (round to nearest, or stochastic with the same seed), and the
    decoded values bit-exact in every output dtype."""
    x = make_x(n, dtype, seed, device)
    gen = torch.Generator().manual_seed(seed) if stochastic else None
    codes, scales = ops.quantize_blockwise(x, bits=bits, block=block, stochastic=stochastic,
                                           generator=gen)
    rc, rs = reference.quantize_blockwise(x, bits, block, stochastic,
                                          seed_for(seed) if stochastic else 0)
    assert codes.device == x.device and scales.device == x.device
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == rc.shape and scales.shape == rs.shape
    assert_equal(codes, rc)
    assert_equal(scales, rs)
    for out_dtype in DTYPES if n <= 5000 else {torch.float32, dtype}:
        xh = ops.dequantize_blockwise(codes, scales, bits=bits, block=block, numel=n, dtype=out_dtype)
        rh = reference.dequantize_blockwise(rc, rs, bits, block, n, out_dtype)
        assert xh.dtype == out_dtype and xh.shape == (n,) and xh.device == x.device
        assert_equal(xh, rh)
    return x, codes, scales


def check_error_bound(n: int, dtype, bits: int, block: int, seed: int, device: str = "cpu"):
    """Round to nearest: |x - x_hat| <= absmax_block / (2 qmax) per element (+ fp32 slack)."""
    x = make_x(n, dtype, seed, device)
    codes, scales = ops.quantize_blockwise(x, bits=bits, block=block)
    xh = ops.dequantize_blockwise(codes, scales, bits=bits, block=block, numel=n)
    qmax = 127 if bits == 8 else 7
    absmax = scales.double().repeat_interleave(block)[:n]
    xd = x.double()
    assert bool((absmax >= xd.abs()).all()), "a block's scale is below one of its |x|"
    bound = absmax / (2 * qmax) * (1 + 1e-6) + 1e-6 * xd.abs() + 1e-30
    assert_within(xh, xd, bound, f"int{bits} round-to-nearest error bound")
    # stochastic rounding moves less than one step
    codes, scales = ops.quantize_blockwise(x, bits=bits, block=block, stochastic=True,
                                           generator=torch.Generator().manual_seed(seed))
    xs = ops.dequantize_blockwise(codes, scales, bits=bits, block=block, numel=n)
    assert_within(xs, xd, absmax / qmax * (1 + 1e-6) + 1e-6 * xd.abs() + 1e-30,
                  f"int{bits} stochastic error bound")


# ---- products with k compressed rows --------------------------------------------------------

def check_dequant_dot(k: int, n: int, dtype, bits: int, block: int, seed: int, device: str = "cpu"):
    codes, scales = rows_of(k, n, bits, block, seed, device)
    v = make_x(n, dtype, seed + 1000, device)
    out = ops.dequant_dot(codes, scales, v, bits=bits, block=block)
    ref = reference.dequant_dot(codes, scales, v, bits, block)
    assert out.dtype == torch.float32 and out.shape == (k,) and out.device == v.device
    w = reference.dequantize_blockwise(codes, scales, bits, block, n, torch.float32)
    mag = (w.double().abs() @ v.double().abs()).float()  # sum |w_i v_i|: the rounding scale
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=float(2e-6 * mag.max()) + 1e-30)
    assert_within(out, ref, 2e-6 * mag + 1e-30, f"dequant_dot k={k} n={n} int{bits}")


def check_dequant_axpy(k: int, n: int, dtype, bits: int, block: int, seed: int, device: str = "cpu"):
    codes, scales = rows_of(k, n, bits, block, seed, device)
    y = make_x(n, dtype, seed + 1000, device)
    g = torch.Generator().manual_seed(seed)
    coeff = (torch.randn(k, generator=g) * 3).to(device)
    out = ops.dequant_axpy(y, codes, scales, coeff, bits=bits, block=block)
    ref = reference.dequant_axpy(y, codes, scales, coeff, bits, block)
    assert out.dtype == y.dtype and out.shape == y.shape and out.device == y.device
    w = reference.dequantize_blockwise(codes, scales, bits, block, n, torch.float32)
    mag = y.double().abs() + coeff.double().abs() @ w.double().abs()
    # fp32 accumulation, then one rounding to y's dtype (the reference rounds once from float64)
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[y.dtype]
    bound = (ulp + 1e-6 * k) * mag + 1e-30
    torch.testing.assert_close(out.double(), ref.double(), rtol=ulp, atol=float(bound.max()))
    assert_within(out, ref, bound, f"dequant_axpy k={k} n={n} int{bits}")


# ---- contraction ----------------------------------------------------------------------------

def spectra(d_out: int, d_in: int, lam: float, eta: float, zmax: float, seed: int, device: str):
    """Nonnegative spectra with eta * nu' <= zmax (zmax in (1, 2): 1 - eta nu' < 0 somewhere)."""
    g = torch.Generator().manual_seed(seed)
    smax = max(zmax / eta - lam, 0.0) ** 0.5
    s_out = torch.rand(d_out, generator=g) * smax
    s_in = torch.rand(d_in, generator=g) * smax
    if d_out > 1:
        s_out[0] = smax  # the largest nu' is reached
    if d_in > 1:
        s_in[0] = smax
        s_in[-1] = 0.0  # nu' = lam on a column (nu' = 0 when lam = 0)
    return s_out.to(device), s_in.to(device)


def contraction_bound(acc0, x, s_out, s_in, lam, eta, steps):
    """1e-5 relative to |a acc| + |c x|, plus 1e-6 |acc| (a = 1 - q carries an absolute fp32
    error when a ~ 0, see csrc/contraction.h), plus the conditioning of a and c in nu': the
    kernel forms z = eta nu' in fp32, and a = (1 - z)^L amplifies z's rounding L-fold (most
    when |1 - z| ~ 1 with z ~ 2), so the bound adds the reference's own change under a
    8-unit-roundoff relative perturbation of nu'."""
    nu = s_out.double()[:, None] * s_in.double()[None, :] + lam
    a, c = reference.contraction_coeffs(nu, eta, steps)
    ap, cp = reference.contraction_coeffs(nu * (1 + 8 * 2.0 ** -24), eta, steps)
    a, c, ap, cp = (t.reshape(acc0.shape) for t in (a, c, ap, cp))
    acc0, x = acc0.double(), x.double().reshape(acc0.shape)
    cond = (ap - a).abs() * acc0.abs() + (cp - c).abs() * x.abs()
    return 1e-5 * (a.abs() * acc0.abs() + c.abs() * x.abs()) + 1e-6 * acc0.abs() + cond + 1e-30


def check_contraction(d_out: int, d_in: int, lam: float, eta: float, steps: int, zmax: float,
                      dtype, seed: int, bits: int | None = None, block: int = 256,
                      flat: bool = False, device: str = "cpu"):
    """Native acc update against the float64 reference; `flat`: acc 1-D with s_in of length 1."""
    s_out, s_in = spectra(d_out, d_in, lam, eta, zmax, seed, device)
    shape = (d_out * d_in,) if flat else (d_out, d_in)
    g = torch.Generator().manual_seed(seed + 1)
    acc0 = torch.randn(shape, generator=g).to(device)
    x = make_x(d_out * d_in, torch.float32, seed + 2).reshape(shape).to(dtype).to(device)
    acc, ref = acc0.clone(), acc0.clone()
    if bits is None:
        out = ops.contraction_accumulate(acc, x, s_out, s_in, lam=lam, eta=eta, steps=steps)
        reference.contraction_accumulate(ref, x, s_out, s_in, lam, eta, steps)
        xd = x
    else:
        codes, scales = reference.quantize_blockwise(x.reshape(-1), bits, block, False, 0)
        out = ops.contraction_accumulate(acc, codes, s_out, s_in, lam=lam, eta=eta, steps=steps,
                                         bits=bits, scales=scales, block=block)
        reference.contraction_accumulate_q(ref, codes, scales, s_out, s_in, lam, eta, steps, bits, block)
        xd = reference.dequantize_blockwise(codes, scales, bits, block, acc0.numel(), torch.float32)
    assert out is acc and acc.shape == shape and acc.dtype == torch.float32
    if steps == 0:  # a = 1, c = 0: nothing moves
        assert_equal(acc, acc0)
    bound = contraction_bound(acc0, xd, s_out, s_in, lam, eta, steps)
    assert_within(acc, ref, bound, f"contraction steps={steps} lam={lam} eta={eta} zmax={zmax}")
