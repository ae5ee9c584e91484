"""Kernel ops on CUDA tensors: the CUDA kernels against the pure-PyTorch reference (run on the
same device), and against the CPU kernels (bit-exact where the math is shared). Skipped where
no GPU is available; the same comparisons run on CPU in test_ops.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mini_unlearn import has_cuda_kernels, ops, reference
from _kernel_cases import (BITS, BLOCKS, DTYPES, LAMS, LARGE, STEPS, assert_equal, check_contraction,
                           check_dequant_axpy, check_dequant_dot, check_error_bound, check_quantize,
                           lengths, make_x, rows_of, seed_for)

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
HYP = settings(max_examples=30, deadline=None, derandomize=True,  # the same examples on every CI run
               suppress_health_check=[HealthCheck.too_slow])
ZMAX = (1e-7, 0.5, 1.0, 1.5, 1.99)


def test_cuda_kernels_registered():
    assert has_cuda_kernels(), "mini_unlearn._C was built without CUDA kernels (FORCE_CUDA=1)"


@HYP
@given(data=st.data(), dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS),
       block=st.sampled_from(BLOCKS), stochastic=st.booleans(), seed=st.integers(0, 2**20))
def test_quantize_dequantize_bit_exact(data, dtype, bits, block, stochastic, seed):
    check_quantize(data.draw(lengths(block), label="n"), dtype, bits, block, stochastic, seed, DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_grid(dtype, block, bits):
    for n in (1, block - 1, block, block + 1, 3 * block + 5, LARGE):
        for stochastic in (False, True):
            check_quantize(n, dtype, bits, block, stochastic, n, DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_cuda_equals_cpu_kernels(bits, stochastic):
    """The shared per-element math gives the same codes, scales and decoded values on both."""
    x = make_x(LARGE, torch.float32, 9)
    gen = (lambda: torch.Generator().manual_seed(4)) if stochastic else (lambda: None)
    cc, cs = ops.quantize_blockwise(x, bits=bits, block=256, stochastic=stochastic, generator=gen())
    gc, gs = ops.quantize_blockwise(x.to(DEVICE), bits=bits, block=256, stochastic=stochastic,
                                    generator=gen())
    assert_equal(gc.cpu(), cc)
    assert_equal(gs.cpu(), cs)
    for dt in DTYPES:
        assert_equal(ops.dequantize_blockwise(gc, gs, bits=bits, block=256, numel=LARGE, dtype=dt).cpu(),
                     ops.dequantize_blockwise(cc, cs, bits=bits, block=256, numel=LARGE, dtype=dt))


@HYP
@given(data=st.data(), dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS),
       block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_error_bound(data, dtype, bits, block, seed):
    check_error_bound(data.draw(lengths(block), label="n"), dtype, bits, block, seed, DEVICE)


@HYP
@given(data=st.data(), k=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_dequant_dot(data, k, dtype, bits, block, seed):
    check_dequant_dot(k, data.draw(lengths(block), label="n"), dtype, bits, block, seed, DEVICE)


@HYP
@given(data=st.data(), k=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_dequant_axpy(data, k, dtype, bits, block, seed):
    check_dequant_axpy(k, data.draw(lengths(block), label="n"), dtype, bits, block, seed, DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 8])
def test_dot_axpy_large(k, bits):
    for dtype in DTYPES:
        check_dequant_dot(k, LARGE, dtype, bits, 256, k, DEVICE)
        check_dequant_axpy(k, LARGE, dtype, bits, 4096, k, DEVICE)
    # ~4M elements: many thread blocks and a deep reduction
    check_dequant_dot(k, 4_000_037, torch.float32, bits, 256, k, DEVICE)
    check_dequant_axpy(k, 4_000_037, torch.float32, bits, 256, k, DEVICE)


@HYP
@given(d_out=st.integers(1, 40), d_in=st.integers(1, 70), lam=st.sampled_from(LAMS),
       eta=st.floats(1e-4, 1.0), steps=st.one_of(st.sampled_from(STEPS), st.integers(0, 2000)),
       zmax=st.sampled_from(ZMAX), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**20))
def test_contraction_dense(d_out, d_in, lam, eta, steps, zmax, dtype, seed):
    check_contraction(d_out, d_in, lam, eta, steps, zmax, dtype, seed, device=DEVICE)


@HYP
@given(data=st.data(), lam=st.sampled_from(LAMS), eta=st.floats(1e-4, 1.0),
       steps=st.one_of(st.sampled_from(STEPS), st.integers(0, 2000)), zmax=st.sampled_from(ZMAX),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_contraction_compressed(data, lam, eta, steps, zmax, bits, block, seed):
    if data.draw(st.booleans(), label="flat"):
        d_out, d_in, flat = data.draw(lengths(block), label="d"), 1, True
    else:
        d_out, d_in, flat = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 300)), False
    check_contraction(d_out, d_in, lam, eta, steps, zmax, torch.float32, seed, bits=bits,
                      block=block, flat=flat, device=DEVICE)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("lam", LAMS)
def test_contraction_grid(lam, steps):
    for zmax in (0.5, 1.9):
        for dtype in DTYPES:
            check_contraction(17, 33, lam, 0.05, steps, zmax, dtype, steps, device=DEVICE)
            check_contraction(LARGE, 1, lam, 0.05, steps, zmax, dtype, steps, flat=True, device=DEVICE)
        for bits in BITS:
            check_contraction(9, 100, lam, 0.05, steps, zmax, torch.float32, steps, bits=bits,
                              block=32, device=DEVICE)
            check_contraction(512, 1024, lam, 0.05, steps, zmax, torch.float32, steps, bits=bits,
                              block=256, device=DEVICE)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_contraction_zero_curvature_gives_eta_steps(bits):
    eta = 0.0123
    for steps in (1, 7, 156, 1000):
        acc = torch.zeros(6, 5, device=DEVICE)
        s_out, s_in = torch.zeros(6, device=DEVICE), torch.zeros(5, device=DEVICE)
        x = torch.ones(30, device=DEVICE)
        if bits is None:
            ops.contraction_accumulate(acc, x.view(6, 5), s_out, s_in, lam=0.0, eta=eta, steps=steps)
        else:
            codes, scales = ops.quantize_blockwise(x, bits=bits, block=32)
            ops.contraction_accumulate(acc, codes, s_out, s_in, lam=0.0, eta=eta, steps=steps,
                                       bits=bits, scales=scales, block=32)
        c32 = torch.tensor(eta, dtype=torch.float32) * steps
        assert torch.equal(acc.cpu(), c32.expand(6, 5))


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    g = torch.Generator().manual_seed(0)
    n, block, trials = 512, 256, 2000
    x = torch.randn(n, generator=g).to(DEVICE)
    total = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    for _ in range(trials):
        c, s = ops.quantize_blockwise(x, bits=bits, block=block, stochastic=True, generator=g)
        total += ops.dequantize_blockwise(c, s, bits=bits, block=block, numel=n).double()
    step = (x.view(-1, block).abs().amax(1) / (127 if bits == 8 else 7)).repeat_interleave(block)
    err = ((total / trials - x.double()).abs() / step.double()).max()
    assert float(err) < 5 / (2 * trials ** 0.5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_block_gets_nan_scale(bits, dtype):
    block, n = 64, 64 * 5 + 7
    x = make_x(n, torch.float32, 3).to(dtype)
    x[64 + 10] = float("nan")
    x[n - 1] = float("inf")
    for stochastic in (False, True):
        gen = torch.Generator().manual_seed(1) if stochastic else None
        codes, scales = ops.quantize_blockwise(x.to(DEVICE), bits=bits, block=block,
                                               stochastic=stochastic, generator=gen)
        rc, rs = reference.quantize_blockwise(x, bits, block, stochastic, seed_for(1) if stochastic else 0)
        assert_equal(codes.cpu(), rc)
        assert_equal(scales.cpu(), rs)
        assert torch.isnan(scales[1]) and torch.isnan(scales[-1]) and torch.isfinite(scales[[0, 2, 3, 4]]).all()
        xh = ops.dequantize_blockwise(codes, scales, bits=bits, block=block, numel=n).cpu()
        assert torch.isnan(xh[64:128]).all() and torch.isnan(xh[320:]).all()
        assert torch.isfinite(xh[:64]).all() and torch.isfinite(xh[128:320]).all()


def test_bad_input_raises_clear_error():
    x = torch.randn(100, device=DEVICE)
    c, s = ops.quantize_blockwise(x, bits=8, block=32)
    N = torch.ops.mini_unlearn
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        N.quantize_blockwise(x, 3, 32, False, 0)
    with pytest.raises(RuntimeError, match="block must be a power of two"):
        N.quantize_blockwise(x, 8, 48, False, 0)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        N.quantize_blockwise(x.long(), 8, 32, False, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        N.quantize_blockwise(torch.randn(200, device=DEVICE)[::2], 8, 32, False, 0)
    with pytest.raises(RuntimeError, match="codes on cuda.*but scales on cpu"):
        N.dequantize_blockwise(c, s.cpu(), 8, 32, 100, torch.float32)
    with pytest.raises(RuntimeError, match="need 100 code bytes per row, got 99"):
        N.dequantize_blockwise(c[:99], s, 8, 32, 100, torch.float32)
    with pytest.raises(RuntimeError, match="codes hold 2 rows but scales hold 1"):
        N.dequant_dot(c[None].repeat(2, 1), s[None], x, 8, 32)
    with pytest.raises(RuntimeError, match="coeff must be a contiguous float32 vector of length k=1"):
        N.dequant_axpy(x, c[None], s[None], torch.ones(2, device=DEVICE), 8, 32)
    acc = torch.zeros(4, 25, device=DEVICE)
    so, si = torch.rand(4, device=DEVICE), torch.rand(25, device=DEVICE)
    with pytest.raises(RuntimeError, match="acc must be float32"):
        N.contraction_accumulate(acc.double(), x, so, si, 0.0, 0.1, 1)
    with pytest.raises(RuntimeError, match="acc has 100 elements but the spectra describe 4 x 24"):
        N.contraction_accumulate(acc, x, so, si[:24].contiguous(), 0.0, 0.1, 1)
    with pytest.raises(RuntimeError, match="steps must be >= 0"):
        N.contraction_accumulate_q(acc, c, s, so, si, 0.0, 0.1, -1, 8, 32)
    with pytest.raises(RuntimeError, match="acc is on cuda.*but s_out is on cpu"):
        N.contraction_accumulate(acc, x, so.cpu(), si, 0.0, 0.1, 1)


def test_opcheck():
    x = make_x(300, torch.float32, 0).to(DEVICE)
    c8, s8 = ops.quantize_blockwise(x, bits=8, block=64)
    rows, rs = rows_of(3, 300, 4, 32, 0, DEVICE)
    so, si = torch.rand(10, device=DEVICE), torch.rand(30, device=DEVICE)
    N = torch.ops.mini_unlearn
    cases = [
        (N.quantize_blockwise.default, (x, 8, 64, False, 0)),
        (N.quantize_blockwise.default, (x.bfloat16(), 4, 32, True, 5)),
        (N.dequantize_blockwise.default, (c8, s8, 8, 64, 300, torch.float16)),
        (N.dequant_dot.default, (rows, rs, x, 4, 32)),
        (N.dequant_axpy.default, (x, rows, rs, torch.randn(3, device=DEVICE), 4, 32)),
        (N.contraction_accumulate.default, (torch.randn(10, 30, device=DEVICE), x.view(10, 30), so, si, 1e-3, 0.1, 7)),
        (N.contraction_accumulate_q.default, (torch.randn(10, 30, device=DEVICE), c8, s8, so, si, 0.0, 0.1, 156, 8, 64)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt", ops.FORMATS)
def test_storage_formats(fmt):
    n, k = 700, 4
    vecs = [make_x(n, torch.float32, j).to(DEVICE) for j in range(k)]
    rows = ops.stack_rows([ops.compress(w, fmt, block=128) for w in vecs])
    w = ops.decompress(rows)
    assert w.device.type == "cuda" and w.shape == (k, n)
    v, y, coeff = (make_x(n, torch.float32, 50).to(DEVICE), make_x(n, torch.float32, 51).to(DEVICE),
                   torch.randn(k, device=DEVICE))
    torch.testing.assert_close(ops.rows_dot(rows, v), (w.double() @ v.double()).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.rows_axpy(y, rows, coeff), (y.double() + coeff.double() @ w.double()).float(),
                               rtol=1e-5, atol=1e-5)


# ---- contraction2_accumulate (2-state momentum / Adam update) ----------------------------------

from test_contraction2 import MUS as C2_MUS, STEPS as C2_STEPS, check_native as c2_check, make_inputs as c2_inputs  # noqa: E402


@HYP
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), eta=st.floats(1e-4, 1.0),
       mu=st.sampled_from(C2_MUS), c=st.floats(0.05, 1.0), nesterov=st.booleans(),
       lam=st.sampled_from(LAMS), lam_dec=st.sampled_from((0.0, 0.01, 0.5)),
       steps=st.one_of(st.sampled_from(C2_STEPS), st.integers(0, 3000)),
       zmax=st.sampled_from((1e-7, 0.5, 1.0, 1.5, 1.9)), with_d=st.booleans(),
       dtype=st.sampled_from(DTYPES), flat=st.booleans(), seed=st.integers(0, 2**20))
def test_contraction2_matches_reference(rows, cols, eta, mu, c, nesterov, lam, lam_dec, steps, zmax,
                                        with_d, dtype, flat, seed):
    if flat:
        rows, cols = rows * cols, 1
    c2_check(rows, cols, eta=eta, mu=mu, c=c, nesterov=nesterov, lam=lam, lam_dec=lam_dec, steps=steps,
             zmax=zmax, with_d=with_d, dtype=dtype, seed=seed, flat=flat, device=DEVICE)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mu", C2_MUS)
def test_contraction2_matches_stepping(mu, nesterov):
    for steps in C2_STEPS:
        for with_d in (False, True):
            c2_check(7, 37, eta=0.05, mu=mu, c=1.0 - mu if mu else 1.0, nesterov=nesterov, lam=1e-3,
                     lam_dec=0.1, steps=steps, zmax=1.5, with_d=with_d, seed=steps, direct=True,
                     device=DEVICE)


def _misaligned(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    """t on `device` as a contiguous view at a storage offset of one element (not 8-aligned)."""
    if t is None:
        return None
    flat = torch.cat([t.new_zeros(1), t.reshape(-1)]).to(device)
    return flat[1:].view(t.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_d", [False, True])
def test_contraction2_cuda_equals_cpu_kernel(with_d, dtype):
    """The shared per-element math (contraction2.h, no FMA contraction on either side) gives the
    CPU kernel's values bit for bit: 2-D and flat, 8-aligned and not (scalar loads)."""
    kw = dict(lam=1e-3, lam_dec=0.01, eta=0.05, mu=0.9, c=0.1, nesterov=with_d, steps=1000)
    for rows, cols, flat, shift in ((513, 1027, False, False), (4099, 1, True, False), (37, 29, False, True)):
        u0, e0, x, s_out, s_in, d = c2_inputs(rows, cols, eta=0.05, mu=0.9, c=0.1, nesterov=with_d,
                                              lam=1e-3, zmax=1.5, with_d=with_d, dtype=dtype, seed=rows,
                                              flat=flat)
        on = {}
        for dev in ("cpu", DEVICE):
            if shift:
                args = [_misaligned(t, dev) for t in (u0, e0, x, d)]
            else:
                args = [None if t is None else t.to(dev).clone() for t in (u0, e0, x, d)]
            u, e, xx, dd = args
            ops.contraction2_accumulate(u, e, xx, s_out.to(dev), s_in.to(dev), dd, **kw)
            on[dev] = (u.cpu(), e.cpu())
        assert_equal(on[DEVICE][0], on["cpu"][0])
        assert_equal(on[DEVICE][1], on["cpu"][1])


def test_contraction2_bad_input_raises_clear_error():
    N = torch.ops.mini_unlearn
    u, e, x = (torch.zeros(4, 25, device=DEVICE) for _ in range(3))
    so, si = torch.rand(4, device=DEVICE), torch.rand(25, device=DEVICE)
    kw = dict(lam=0.0, lam_dec=0.0, eta=0.1, mu=0.9, c=0.1, nesterov=False, steps=3)
    with pytest.raises(RuntimeError, match="u is on cuda.*but s_out is on cpu"):
        N.contraction2_accumulate(u, e, x, so.cpu(), si, None, **kw)
    with pytest.raises(RuntimeError, match="u is on cuda.*but d is on cpu"):
        N.contraction2_accumulate(u, e, x, so, si, torch.ones(4, 25), **kw)
    with pytest.raises(RuntimeError, match="u has 100 elements but the spectra describe 4 x 24"):
        N.contraction2_accumulate(u, e, x, so, si[:24].contiguous(), None, **kw)
    with pytest.raises(RuntimeError, match="steps must be >= 0"):
        N.contraction2_accumulate(u, e, x, so, si, None, **{**kw, "steps": -1})
    with pytest.raises(RuntimeError, match="eta must be a finite number"):
        N.contraction2_accumulate(u, e, x, so, si, None, **{**kw, "eta": float("nan")})


def test_contraction2_opcheck():
    g = torch.Generator().manual_seed(0)
    u, e, x, d = (torch.randn(10, 30, generator=g).to(DEVICE) for _ in range(4))
    so, si = torch.rand(10, device=DEVICE), torch.rand(30, device=DEVICE)
    kw = dict(lam=1e-3, lam_dec=0.01, eta=0.1, mu=0.9, c=0.1, nesterov=False, steps=156)
    op = torch.ops.mini_unlearn.contraction2_accumulate.default
    torch.library.opcheck(op, (u, e, x, so, si, d.abs()), kw)
    torch.library.opcheck(op, (u, e, x.bfloat16(), so, si, None), {**kw, "nesterov": True})
