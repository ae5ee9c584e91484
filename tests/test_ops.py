"""Kernel ops on CPU: the native C++ kernels (torch.ops.mini_unlearn.*) against the pure-PyTorch
reference, error bounds, NaN/Inf handling, input validation, opcheck, torch.compile, and the
storage-format helpers of mini_unlearn.ops."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mini_unlearn
from mini_unlearn import ops, reference
from _kernel_cases import (BITS, BLOCKS, DTYPES, LAMS, LARGE, STEPS, assert_equal, check_contraction,
                           check_dequant_axpy, check_dequant_dot, check_error_bound, check_quantize,
                           lengths, make_x, rows_of, seed_for)

NATIVE = torch.ops.mini_unlearn
HYP = settings(max_examples=30, deadline=None, derandomize=True,  # the same examples on every CI run
               suppress_health_check=[HealthCheck.too_slow])


def test_native_backend_loaded():
    assert mini_unlearn.backend() == "native", "mini_unlearn._C is not built: these tests need it"
    assert ops._impl is torch.ops.mini_unlearn


# ---- native vs reference --------------------------------------------------------------------

@HYP
@given(data=st.data(), dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS),
       block=st.sampled_from(BLOCKS), stochastic=st.booleans(), seed=st.integers(0, 2**20))
def test_quantize_dequantize_bit_exact(data, dtype, bits, block, stochastic, seed):
    n = data.draw(lengths(block), label="n")
    check_quantize(n, dtype, bits, block, stochastic, seed)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact_grid(dtype, block, bits):
    """Every (dtype, block, bits) at the edge lengths, both roundings."""
    for n in (1, block - 1, block, block + 1, 3 * block + 5):
        for stochastic in (False, True):
            check_quantize(n, dtype, bits, block, stochastic, seed=n)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact_large(dtype, bits):
    """~100k elements (not a multiple of the block): many blocks, both roundings."""
    block = {torch.float32: 4096, torch.bfloat16: 256, torch.float16: 32}[dtype]
    for stochastic in (False, True):
        check_quantize(LARGE, dtype, bits, block, stochastic, seed=bits)


def test_quantize_empty():
    for bits in BITS:
        codes, scales = ops.quantize_blockwise(torch.zeros(0), bits=bits, block=32)
        assert codes.numel() == 0 and scales.numel() == 0
        out = ops.dequantize_blockwise(codes, scales, bits=bits, block=32, numel=0)
        assert out.shape == (0,)


def test_stochastic_seed_comes_from_generator():
    x = make_x(5000, torch.float32, 0)
    a = ops.quantize_blockwise(x, stochastic=True, generator=torch.Generator().manual_seed(7))
    b = ops.quantize_blockwise(x, stochastic=True, generator=torch.Generator().manual_seed(7))
    c = ops.quantize_blockwise(x, stochastic=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0], NATIVE.quantize_blockwise(x, 8, 256, True, seed_for(7))[0])


def test_all_zero_and_constant_blocks():
    x = torch.zeros(300)
    x[256:] = -3.0
    for bits in BITS:
        codes, scales = ops.quantize_blockwise(x, bits=bits, block=256)
        assert scales.tolist() == [0.0, 3.0]
        xh = ops.dequantize_blockwise(codes, scales, bits=bits, block=256, numel=300)
        assert torch.equal(xh, x)


@HYP
@given(data=st.data(), k=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_dequant_dot_matches_reference(data, k, dtype, bits, block, seed):
    check_dequant_dot(k, data.draw(lengths(block), label="n"), dtype, bits, block, seed)


@HYP
@given(data=st.data(), k=st.integers(1, 8), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_dequant_axpy_matches_reference(data, k, dtype, bits, block, seed):
    check_dequant_axpy(k, data.draw(lengths(block), label="n"), dtype, bits, block, seed)


@pytest.mark.parametrize("k, bits, dtype", [(8, 8, torch.float32), (3, 4, torch.bfloat16),
                                           (2, 8, torch.float16), (1, 4, torch.float32)])
def test_dot_axpy_large(k, bits, dtype):
    check_dequant_dot(k, LARGE, dtype, bits, 256, seed=k)
    check_dequant_axpy(k, LARGE, dtype, bits, 4096, seed=k)


def test_dequant_axpy_zero_coeff_is_identity():
    codes, scales = rows_of(3, 1000, 8, 64, 0, "cpu")
    y = make_x(1000, torch.float32, 1)
    assert torch.equal(ops.dequant_axpy(y, codes, scales, torch.zeros(3), bits=8, block=64), y)


STREAM_BYTES = 16 << 20  # csrc/cpu/simd.h kStreamBytes: larger outputs use streaming stores


@pytest.mark.parametrize("bits", BITS)
def test_large_outputs_streaming_path(bits):
    """Outputs of >= 16 MiB are written with non-temporal stores (and huge-page advice): they
    must equal the normal path, checked block-aligned half by half (each half below the
    threshold; the halves are verified against the reference elsewhere)."""
    n = STREAM_BYTES * (8 // bits) + 2 * 256 + 37  # codes just over the threshold
    half = (n // 2) // 256 * 256
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    codes, scales = ops.quantize_blockwise(x, bits=bits, block=256)
    c0, s0 = ops.quantize_blockwise(x[:half], bits=bits, block=256)
    c1, s1 = ops.quantize_blockwise(x[half:], bits=bits, block=256)
    assert_equal(codes, torch.cat([c0, c1]))
    assert_equal(scales, torch.cat([s0, s1]))
    m = STREAM_BYTES // 4 + 1000 + 37  # fp32 outputs just over the threshold
    c, s = codes[: m if bits == 8 else (m + 1) // 2], scales[: -(-m // 256)]
    out = ops.dequantize_blockwise(c, s, bits=bits, block=256, numel=m)
    hb = (m // 2) // 256 * 256
    first = ops.dequantize_blockwise(c[: hb if bits == 8 else hb // 2], s[: hb // 256], bits=bits,
                                     block=256, numel=hb)
    assert_equal(out[:hb], first)
    assert_equal(out, reference.dequantize_blockwise(c, s, bits, 256, m, torch.float32))
    rows, rscales = c[None].repeat(2, 1), s[None].repeat(2, 1)
    y, coeff = x[:m].clone(), torch.tensor([0.5, -2.0])
    got = ops.dequant_axpy(y, rows, rscales, coeff, bits=bits, block=256)
    # the kernel's order, one fused multiply-add per row: fma(c1, code, fma(c0, code, y)) with
    # c_j = coeff_j * step (fp32); in float64 the products are exact, so this is the fma up to a
    # double rounding (at most 1 ulp)
    qmax = 127 if bits == 8 else 7
    code = reference.dequantize_blockwise(c, torch.full_like(s, qmax), bits, 256, m, torch.float32)
    step = (s / qmax).repeat_interleave(256)[:m]
    t = y
    for cj in coeff:
        t = ((cj * step).double() * code.double() + t.double()).float()
    torch.testing.assert_close(got, t, rtol=2 ** -23, atol=0.0)


ZMAX = (1e-7, 0.5, 1.0, 1.5, 1.99)  # eta * max nu'; above 1: 1 - eta nu' < 0


@HYP
@given(d_out=st.integers(1, 40), d_in=st.integers(1, 70), lam=st.sampled_from(LAMS),
       eta=st.floats(1e-4, 1.0), steps=st.one_of(st.sampled_from(STEPS), st.integers(0, 2000)),
       zmax=st.sampled_from(ZMAX), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**20))
def test_contraction_dense_matches_reference(d_out, d_in, lam, eta, steps, zmax, dtype, seed):
    check_contraction(d_out, d_in, lam, eta, steps, zmax, dtype, seed)


@HYP
@given(data=st.data(), lam=st.sampled_from(LAMS), eta=st.floats(1e-4, 1.0),
       steps=st.one_of(st.sampled_from(STEPS), st.integers(0, 2000)), zmax=st.sampled_from(ZMAX),
       bits=st.sampled_from(BITS), block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_contraction_compressed_matches_reference(data, lam, eta, steps, zmax, bits, block, seed):
    flat = data.draw(st.booleans(), label="flat")
    if flat:  # one long spectrum along s_out, s_in of length 1
        d_out, d_in = data.draw(lengths(block), label="d"), 1
    else:
        d_out, d_in = data.draw(st.integers(1, 40), label="d_out"), data.draw(st.integers(1, 300), label="d_in")
    check_contraction(d_out, d_in, lam, eta, steps, zmax, torch.float32, seed, bits=bits,
                      block=block, flat=flat)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("lam", LAMS)
def test_contraction_grid(lam, steps):
    """Every (lam, steps) at 1 - eta nu' > 0 and < 0, dense (each dtype, 2-D and flat) and
    compressed (int8/int4, blocks straddling rows)."""
    for zmax in (0.5, 1.9):
        for dtype in DTYPES:
            check_contraction(17, 33, lam, 0.05, steps, zmax, dtype, seed=steps)
            check_contraction(4099, 1, lam, 0.05, steps, zmax, dtype, seed=steps, flat=True)
        for bits in BITS:
            check_contraction(9, 100, lam, 0.05, steps, zmax, torch.float32, seed=steps, bits=bits, block=32)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_contraction_large(bits):
    """~100k elements flat (s_in of length 1) and as [316, 317], dense or compressed."""
    check_contraction(LARGE, 1, 1e-3, 0.05, 156, 1.5, torch.float32, seed=5, bits=bits, block=4096, flat=True)
    check_contraction(316, 317, 0.1, 0.01, 1000, 0.9, torch.float32, seed=6, bits=bits, block=256)


@pytest.mark.parametrize("steps", [1, 7, 156, 1000, 100_000])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_contraction_zero_curvature_gives_eta_steps(steps, bits):
    """nu' = 0 (zero spectra, lam = 0): a = 1 and c = eta * steps exactly, no 0/0."""
    eta = 0.0123
    for s_out, s_in in ((torch.zeros(6), torch.zeros(5)), (torch.zeros(30), torch.zeros(1)),
                        (torch.rand(6), torch.zeros(5))):
        acc = torch.zeros(s_out.numel() * s_in.numel())
        x = torch.ones_like(acc)
        if bits is None:
            ops.contraction_accumulate(acc, x, s_out, s_in, lam=0.0, eta=eta, steps=steps)
        else:
            codes, scales = ops.quantize_blockwise(x, bits=bits, block=32)
            ops.contraction_accumulate(acc, codes, s_out, s_in, lam=0.0, eta=eta, steps=steps,
                                       bits=bits, scales=scales, block=32)
        c32 = torch.tensor(eta, dtype=torch.float32) * steps  # eta (fp32) times steps, one rounding
        assert torch.equal(acc, c32.expand_as(acc)), (acc[:3], c32)
        torch.testing.assert_close(acc.double(), torch.full_like(acc, eta * steps).double(),
                                   rtol=1e-6, atol=0)
        acc2 = torch.full_like(acc, 2.0)  # a = 1: acc carries over untouched
        ops.contraction_accumulate(acc2, torch.zeros_like(acc), s_out, s_in, lam=0.0, eta=eta,
                                   steps=steps)
        assert torch.equal(acc2, torch.full_like(acc, 2.0))


def test_contraction_tiny_curvature_is_continuous():
    """nu' -> 0: c -> eta steps smoothly (no cancellation in (1 - a) / nu')."""
    eta, steps = 0.1, 1000
    for nu in (1e-30, 1e-12, 1e-9, 1e-7):
        acc = torch.zeros(1)
        ops.contraction_accumulate(acc, torch.ones(1), torch.tensor([nu]), torch.ones(1), lam=0.0,
                                   eta=eta, steps=steps)
        _, c = reference.contraction_coeffs(torch.tensor([nu], dtype=torch.float64), eta, steps)
        torch.testing.assert_close(acc.double(), c, rtol=2e-6, atol=0)


def test_contraction_negative_factor():
    """1 - eta nu' < 0: a = (1 - z)^L alternates in sign with L; |1 - z| < 1 still contracts."""
    s_out, s_in = torch.tensor([1.5]), torch.tensor([1.0])  # z = 1.5
    for steps, a in ((1, -0.5), (2, 0.25), (3, -0.125)):
        acc = torch.ones(1)
        ops.contraction_accumulate(acc, torch.zeros(1), s_out, s_in, lam=0.0, eta=1.0, steps=steps)
        assert acc.item() == a
        acc = torch.zeros(1)
        ops.contraction_accumulate(acc, torch.ones(1), s_out, s_in, lam=0.0, eta=1.0, steps=steps)
        assert acc.item() == pytest.approx((1 - a) / 1.5, rel=1e-6)


# ---- error bounds, stochastic rounding, non-finite input ------------------------------------

@HYP
@given(data=st.data(), dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS),
       block=st.sampled_from(BLOCKS), seed=st.integers(0, 2**20))
def test_round_to_nearest_error_bound(data, dtype, bits, block, seed):
    check_error_bound(data.draw(lengths(block), label="n"), dtype, bits, block, seed)


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    g = torch.Generator().manual_seed(0)
    n, block, trials = 512, 256, 2000
    x = torch.randn(n, generator=g)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(trials):
        c, s = ops.quantize_blockwise(x, bits=bits, block=block, stochastic=True, generator=g)
        total += ops.dequantize_blockwise(c, s, bits=bits, block=block, numel=n).double()
    mean = total / trials
    step = (x.view(-1, block).abs().amax(1) / (127 if bits == 8 else 7)).repeat_interleave(block)
    # each draw is within one step, so the mean's std is <= step / (2 sqrt(trials))
    assert_err = (mean - x.double()).abs() / step.double()
    assert float(assert_err.max()) < 5 / (2 * trials ** 0.5), float(assert_err.max())
    assert abs(float((mean - x.double()).sum() / step.double().mean())) < 5 * (n / trials) ** 0.5 / 2
    # round to nearest, in contrast, is biased for most elements
    c, s = ops.quantize_blockwise(x, bits=bits, block=block)
    rtn = ops.dequantize_blockwise(c, s, bits=bits, block=block, numel=n).double()
    assert float(((rtn - x.double()).abs() / step.double()).mean()) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("block, at", [(64, 10), (256, 250), (256, 77)])
def test_nonfinite_block_gets_nan_scale(block, at, bad, bits, dtype):
    n = block * 5 + 7
    x = make_x(n, torch.float32, 3).to(dtype)
    x[block + at] = bad  # block 1
    x[n - 1] = bad  # the partial last block
    for stochastic in (False, True):
        codes, scales = check_quantize_on(x, bits, block, stochastic)
        assert torch.isnan(scales[1]) and torch.isnan(scales[-1])
        good = [0, 2, 3, 4]
        assert torch.isfinite(scales[good]).all()
        xh = ops.dequantize_blockwise(codes, scales, bits=bits, block=block, numel=n)
        assert torch.isnan(xh[block:2 * block]).all() and torch.isnan(xh[5 * block:]).all()
        clean = x.clone()
        clean[block + at] = 0
        clean[n - 1] = 0
        c2, s2 = ops.quantize_blockwise(clean, bits=bits, block=block)
        h2 = ops.dequantize_blockwise(c2, s2, bits=bits, block=block, numel=n)
        for b in good:  # other blocks are unaffected
            assert torch.equal(scales[b], s2[b])
            if not stochastic:
                assert torch.equal(xh[b * block:(b + 1) * block], h2[b * block:(b + 1) * block])


def check_quantize_on(x, bits, block, stochastic):
    gen = torch.Generator().manual_seed(11) if stochastic else None
    codes, scales = ops.quantize_blockwise(x, bits=bits, block=block, stochastic=stochastic, generator=gen)
    rc, rs = reference.quantize_blockwise(x, bits, block, stochastic, seed_for(11) if stochastic else 0)
    torch.testing.assert_close(codes, rc, rtol=0, atol=0)
    torch.testing.assert_close(scales, rs, rtol=0, atol=0, equal_nan=True)
    return codes, scales


def test_nonfinite_propagates_through_products():
    x = torch.randn(200)
    x[5] = float("nan")
    codes, scales = ops.quantize_blockwise(x, bits=8, block=32)
    out = ops.dequant_dot(codes[None], scales[None], torch.ones(200), bits=8, block=32)
    assert torch.isnan(out).all()
    y = ops.dequant_axpy(torch.zeros(200), codes[None], scales[None], torch.ones(1), bits=8, block=32)
    assert torch.isnan(y[:32]).all() and torch.isfinite(y[32:]).all()


# ---- input validation -----------------------------------------------------------------------

def _q(bits=8, n=100, block=32):
    c, s = ops.quantize_blockwise(torch.randn(n), bits=bits, block=block)
    return c, s


def _bad_cases():
    x = torch.randn(100)
    c8, s8 = _q(8)
    c4, s4 = _q(4)
    r8, rs8 = c8[None].repeat(3, 1), s8[None].repeat(3, 1)
    r4, rs4 = c4[None].repeat(3, 1), s4[None].repeat(3, 1)
    v, coeff = torch.randn(100), torch.randn(3)
    acc, xx, so, si = torch.zeros(4, 25), torch.randn(4, 25), torch.rand(4), torch.rand(25)
    cacc, cs = _q(8, 100, 32)
    Q, DQ, DOT, AXPY = (NATIVE.quantize_blockwise, NATIVE.dequantize_blockwise, NATIVE.dequant_dot,
                        NATIVE.dequant_axpy)
    CA, CQ = NATIVE.contraction_accumulate, NATIVE.contraction_accumulate_q
    f32 = torch.float32
    return {
        # quantize_blockwise
        "q bits": (lambda: Q(x, 6, 32, False, 0), r"bits must be 8 or 4, got 6"),
        "q block not pow2": (lambda: Q(x, 8, 48, False, 0), r"block must be a power of two in \[32, 4096\], got 48"),
        "q block small": (lambda: Q(x, 8, 16, False, 0), r"block must be a power of two.*got 16"),
        "q block large": (lambda: Q(x, 8, 8192, False, 0), r"block must be a power of two.*got 8192"),
        "q 2-D": (lambda: Q(torch.randn(4, 25), 8, 32, False, 0), r"1-D tensor.*flatten"),
        "q int64": (lambda: Q(torch.arange(100), 8, 32, False, 0), r"x must be float32, bfloat16 or float16, got Long"),
        "q float64": (lambda: Q(x.double(), 8, 32, False, 0), r"x must be float32, bfloat16 or float16, got Double"),
        "q non-contiguous": (lambda: Q(torch.randn(200)[::2], 8, 32, False, 0), r"x must be contiguous"),
        # dequantize_blockwise
        "dq bits": (lambda: DQ(c8, s8, 5, 32, 100, f32), r"bits must be 8 or 4, got 5"),
        "dq block": (lambda: DQ(c8, s8, 8, 100, 100, f32), r"block must be a power of two.*got 100"),
        "dq codes dtype": (lambda: DQ(c8.to(torch.uint8), s8, 8, 32, 100, f32), r"codes for bits=8 must be Char, got Byte"),
        "dq int4 codes dtype": (lambda: DQ(c8, s8, 4, 32, 100, f32), r"codes for bits=4 must be Byte, got Char"),
        "dq codes length": (lambda: DQ(c8[:99], s8, 8, 32, 100, f32), r"100 elements at bits=8 need 100 code bytes per row, got 99"),
        "dq int4 codes length": (lambda: DQ(c4, s4, 4, 32, 120, f32), r"120 elements at bits=4 need 60 code bytes per row, got 50"),
        "dq scales length": (lambda: DQ(c8, s8[:3], 8, 32, 100, f32), r"need 4 scales per row, got 3"),
        "dq wrong block for scales": (lambda: DQ(c8, s8, 8, 64, 100, f32), r"need 2 scales per row, got 4.*same block"),
        "dq scales dtype": (lambda: DQ(c8, s8.double(), 8, 32, 100, f32), r"scales must be float32, got Double"),
        "dq out dtype": (lambda: DQ(c8, s8, 8, 32, 100, torch.int64), r"dtype must be float32, bfloat16 or float16, got Long"),
        "dq negative numel": (lambda: DQ(c8, s8, 8, 32, -1, f32), r"numel must be >= 0, got -1"),
        "dq 2-D codes": (lambda: DQ(r8, rs8, 8, 32, 100, f32), r"codes and scales must be 1-D"),
        "dq non-contiguous": (lambda: DQ(torch.zeros(200, dtype=torch.int8)[::2], s8, 8, 32, 100, f32), r"must be contiguous"),
        # dequant_dot
        "dot bits": (lambda: DOT(r8, rs8, v, 3, 32), r"bits must be 8 or 4, got 3"),
        "dot block": (lambda: DOT(r8, rs8, v, 8, 31), r"block must be a power of two.*got 31"),
        "dot codes dtype": (lambda: DOT(r8.float(), rs8, v, 8, 32), r"codes for bits=8 must be Char, got Float"),
        "dot 1-D codes": (lambda: DOT(c8, s8, v, 8, 32), r"must be 2-D \[k, \.\.\.\]"),
        "dot k mismatch": (lambda: DOT(r8, rs8[:2], v, 8, 32), r"codes hold 3 rows but scales hold 2"),
        "dot v length": (lambda: DOT(r8, rs8, torch.randn(101), 8, 32), r"101 elements at bits=8 need 101 code bytes per row, got 100"),
        "dot int4 length": (lambda: DOT(r4, rs4, torch.randn(130), 4, 32), r"130 elements at bits=4 need 65 code bytes"),
        "dot v int64": (lambda: DOT(r8, rs8, torch.arange(100), 8, 32), r"v must be float32, bfloat16 or float16, got Long"),
        "dot v 2-D": (lambda: DOT(r8, rs8, v.view(4, 25), 8, 32), r"v must be 1-D"),
        "dot v non-contiguous": (lambda: DOT(r8, rs8, torch.randn(200)[::2], 8, 32), r"v must be contiguous"),
        "dot codes non-contiguous": (lambda: DOT(torch.zeros(100, 3, dtype=torch.int8).t(), rs8, v, 8, 32), r"must be contiguous"),
        # dequant_axpy
        "axpy bits": (lambda: AXPY(v, r8, rs8, coeff, 2, 32), r"bits must be 8 or 4, got 2"),
        "axpy block": (lambda: AXPY(v, r8, rs8, coeff, 8, 8192), r"block must be a power of two.*got 8192"),
        "axpy codes dtype": (lambda: AXPY(v, r8.to(torch.int16), rs8, coeff, 8, 32), r"codes for bits=8 must be Char, got Short"),
        "axpy k mismatch": (lambda: AXPY(v, r8[:2].contiguous(), rs8, coeff, 8, 32), r"codes hold 2 rows but scales hold 3"),
        "axpy coeff length": (lambda: AXPY(v, r8, rs8, torch.randn(2), 8, 32), r"coeff must be a contiguous float32 vector of length k=3"),
        "axpy coeff dtype": (lambda: AXPY(v, r8, rs8, coeff.double(), 8, 32), r"coeff must be a contiguous float32 vector.*Double"),
        "axpy y length": (lambda: AXPY(torch.randn(99), r8, rs8, coeff, 8, 32), r"99 elements at bits=8 need 99 code bytes per row, got 100"),
        "axpy scales length": (lambda: AXPY(v, r8, rs8[:, :2].contiguous(), coeff, 8, 32), r"need 4 scales per row, got 2"),
        "axpy y int64": (lambda: AXPY(torch.arange(100), r8, rs8, coeff, 8, 32), r"y must be float32, bfloat16 or float16, got Long"),
        "axpy y non-contiguous": (lambda: AXPY(torch.randn(200)[::2], r8, rs8, coeff, 8, 32), r"y must be contiguous"),
        "axpy y 2-D": (lambda: AXPY(v.view(4, 25), r8, rs8, coeff, 8, 32), r"y must be 1-D"),
        # contraction_accumulate (dense)
        "ca acc dtype": (lambda: CA(acc.double(), xx, so, si, 0.0, 0.1, 1), r"acc must be float32, got Double"),
        "ca acc bf16": (lambda: CA(acc.bfloat16(), xx, so, si, 0.0, 0.1, 1), r"acc must be float32, got BFloat16"),
        "ca acc numel": (lambda: CA(torch.zeros(4, 24), xx, so, si, 0.0, 0.1, 1), r"acc has 96 elements but the spectra describe 4 x 25"),
        "ca x numel": (lambda: CA(acc, torch.randn(99), so, si, 0.0, 0.1, 1), r"x has 99 elements, acc has 100"),
        "ca x int64": (lambda: CA(acc, torch.ones(4, 25, dtype=torch.int64), so, si, 0.0, 0.1, 1), r"x must be float32, bfloat16 or float16, got Long"),
        "ca x non-contiguous": (lambda: CA(acc, torch.randn(25, 4).t(), so, si, 0.0, 0.1, 1), r"x must be contiguous"),
        "ca acc non-contiguous": (lambda: CA(torch.zeros(25, 4).t(), xx, so, si, 0.0, 0.1, 1), r"acc must be contiguous"),
        "ca spectra dtype": (lambda: CA(acc, xx, so.double(), si, 0.0, 0.1, 1), r"s_out and s_in must be float32"),
        "ca spectra 2-D": (lambda: CA(acc, xx, so[:, None], si, 0.0, 0.1, 1), r"contiguous 1-D spectra"),
        "ca negative steps": (lambda: CA(acc, xx, so, si, 0.0, 0.1, -1), r"steps must be >= 0, got -1"),
        # contraction_accumulate_q (compressed)
        "cq bits": (lambda: CQ(acc, cacc, cs, so, si, 0.0, 0.1, 1, 7, 32), r"bits must be 8 or 4, got 7"),
        "cq block": (lambda: CQ(acc, cacc, cs, so, si, 0.0, 0.1, 1, 8, 33), r"block must be a power of two.*got 33"),
        "cq codes dtype": (lambda: CQ(acc, cacc.to(torch.uint8), cs, so, si, 0.0, 0.1, 1, 8, 32), r"codes for bits=8 must be Char, got Byte"),
        "cq codes length": (lambda: CQ(acc, cacc[:50], cs, so, si, 0.0, 0.1, 1, 8, 32), r"100 elements at bits=8 need 100 code bytes per row, got 50"),
        "cq scales length": (lambda: CQ(acc, cacc, cs[:1], so, si, 0.0, 0.1, 1, 8, 32), r"need 4 scales per row, got 1"),
        "cq acc dtype": (lambda: CQ(acc.half(), cacc, cs, so, si, 0.0, 0.1, 1, 8, 32), r"acc must be float32, got Half"),
        "cq acc numel": (lambda: CQ(torch.zeros(101), cacc, cs, so, si, 0.0, 0.1, 1, 8, 32), r"acc has 101 elements but the spectra describe 4 x 25"),
        "cq negative steps": (lambda: CQ(acc, cacc, cs, so, si, 0.0, 0.1, -5, 8, 32), r"steps must be >= 0, got -5"),
        "cq acc non-contiguous": (lambda: CQ(torch.zeros(25, 4).t(), cacc, cs, so, si, 0.0, 0.1, 1, 8, 32), r"acc must be contiguous"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_clear_error(name):
    call, match = BAD[name]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_bad_input_through_python_wrappers():
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        ops.quantize_blockwise(torch.randn(10), bits=2)
    with pytest.raises(RuntimeError, match="acc must be float32"):
        ops.contraction_accumulate(torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.ones(3),
                                   torch.ones(1), lam=0, eta=0.1, steps=1)
    c, s = _q(8)
    with pytest.raises(RuntimeError, match="steps must be >= 0"):
        ops.contraction_accumulate(torch.zeros(100), c, torch.ones(100), torch.ones(1), lam=0,
                                   eta=0.1, steps=-1, bits=8, scales=s, block=32)


# ---- opcheck and torch.compile ----------------------------------------------------------------

def _opcheck_samples():
    x = make_x(300, torch.float32, 0)
    xb = make_x(77, torch.bfloat16, 1)
    c8, s8 = ops.quantize_blockwise(x, bits=8, block=64)
    c4, s4 = ops.quantize_blockwise(xb, bits=4, block=32)
    r8, rs8 = rows_of(3, 300, 8, 64, 0, "cpu")
    r4, rs4 = rows_of(2, 77, 4, 32, 0, "cpu")
    so, si = torch.rand(10), torch.rand(30)
    return [
        ("quantize_blockwise", (x, 8, 64, False, 0)),
        ("quantize_blockwise", (xb, 4, 32, True, 123)),
        ("quantize_blockwise", (make_x(5, torch.float16, 2), 8, 4096, False, 0)),
        ("dequantize_blockwise", (c8, s8, 8, 64, 300, torch.float32)),
        ("dequantize_blockwise", (c4, s4, 4, 32, 77, torch.bfloat16)),
        ("dequant_dot", (r8, rs8, make_x(300, torch.float32, 3), 8, 64)),
        ("dequant_dot", (r4, rs4, make_x(77, torch.float16, 3), 4, 32)),
        ("dequant_axpy", (make_x(300, torch.float32, 4), r8, rs8, torch.randn(3), 8, 64)),
        ("dequant_axpy", (make_x(77, torch.bfloat16, 4), r4, rs4, torch.randn(2), 4, 32)),
        ("contraction_accumulate", (torch.randn(10, 30), torch.randn(10, 30), so, si, 1e-3, 0.1, 7)),
        ("contraction_accumulate", (torch.randn(300), x.bfloat16(), torch.rand(300), torch.rand(1), 0.0, 0.5, 156)),
        ("contraction_accumulate_q", (torch.randn(10, 30), c8, s8, so, si, 0.1, 0.05, 3, 8, 64)),
        ("contraction_accumulate_q", (torch.randn(77), c4, s4, torch.rand(77), torch.rand(1), 0.0, 0.2, 1000, 4, 32)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case):
    name, args = _opcheck_samples()[case]
    torch.library.opcheck(getattr(torch.ops.mini_unlearn, name).default, args)


def test_torch_compile_fullgraph():
    """Every op inside one fullgraph torch.compile (Inductor) region: register_fake gives the
    shapes, the mutation of acc is functionalised, and results equal eager. Only custom ops
    in the graph, so Inductor generates no C++ and this compiles in seconds."""
    torch._dynamo.reset()

    def f(x, rows, rscales, v, coeff, acc, acc_q, s_out, s_in):
        codes, scales = torch.ops.mini_unlearn.quantize_blockwise(x, 8, 64, False, 0)
        xh = torch.ops.mini_unlearn.dequantize_blockwise(codes, scales, 8, 64, x.numel(), torch.float32)
        d = torch.ops.mini_unlearn.dequant_dot(rows, rscales, xh, 4, 32)
        y = torch.ops.mini_unlearn.dequant_axpy(v, rows, rscales, coeff, 4, 32)
        torch.ops.mini_unlearn.contraction_accumulate(acc, y, s_out, s_in, 1e-3, 0.1, 156)
        torch.ops.mini_unlearn.contraction_accumulate_q(acc_q, codes, scales, s_out, s_in, 0.0, 0.1, 7, 8, 64)
        return xh, d, y

    n = 640
    x, v = make_x(n, torch.float32, 0), make_x(n, torch.float32, 1)
    rows, rscales = rows_of(3, n, 4, 32, 2, "cpu")
    coeff, s_out, s_in = torch.randn(3), torch.rand(n), torch.rand(1)
    acc, acc_q = torch.randn(n), torch.randn(n)
    e_acc, e_acc_q = acc.clone(), acc_q.clone()
    expected = f(x, rows, rscales, v, coeff, e_acc, e_acc_q, s_out, s_in)
    got = torch.compile(f, fullgraph=True)(x, rows, rscales, v, coeff, acc, acc_q, s_out, s_in)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(acc, e_acc, rtol=0, atol=0)
    torch.testing.assert_close(acc_q, e_acc_q, rtol=0, atol=0)


# ---- storage formats --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ops.FORMATS)
def test_compress_decompress(fmt):
    x = make_x(1000, torch.float32, 0).reshape(10, 100)  # any shape, flattened
    c = ops.compress(x, fmt, block=64)
    assert c.fmt == fmt and c.numel == 1000 and c.rows == 1 and c.block == 64
    back = ops.decompress(c)
    assert back.shape == (1000,) and back.dtype == torch.float32
    flat = x.reshape(-1)
    if fmt == "fp32":
        assert torch.equal(back, flat) and c.nbytes() == 4000
        assert c.data.data_ptr() != x.data_ptr()  # a copy, not a view of the live tensor
    elif fmt == "bf16":
        assert torch.equal(back, flat.bfloat16().float()) and c.nbytes() == 2000
    else:
        bits = 8 if fmt == "int8" else 4
        rc, rs = reference.quantize_blockwise(flat, bits, 64, False, 0)
        assert torch.equal(c.data, rc) and torch.equal(c.scales, rs)
        assert torch.equal(back, reference.dequantize_blockwise(rc, rs, bits, 64, 1000, torch.float32))
        assert c.nbytes() == (1000 if bits == 8 else 500) + 16 * 4
    assert ops.decompress(c, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compress_stochastic_and_other_dtypes(fmt):
    x = make_x(333, torch.float32, 1)
    a = ops.compress(x, fmt, stochastic=True, generator=torch.Generator().manual_seed(3))
    b = ops.compress(x, fmt, stochastic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.data, b.data)
    bits = 8 if fmt == "int8" else 4
    assert torch.equal(a.data, reference.quantize_blockwise(x, bits, 256, True, seed_for(3))[0])
    for dt in (torch.float64, torch.bfloat16, torch.float16):  # float64 is converted first
        c = ops.compress(x.to(dt), fmt)
        assert torch.equal(c.data, reference.quantize_blockwise(x.to(dt).float(), bits, 256, False, 0)[0])


def test_compress_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int2'"):
        ops.compress(torch.randn(4), "int2")


@pytest.mark.parametrize("fmt", ops.FORMATS)
@pytest.mark.parametrize("k", [1, 5])
def test_stack_rows_dot_axpy(fmt, k):
    n = 700
    vecs = [make_x(n, torch.float32, j) for j in range(k)]
    rows = ops.stack_rows([ops.compress(w, fmt, block=128) for w in vecs])
    assert rows.rows == k and rows.data.shape[0] == k
    w = ops.decompress(rows)
    assert w.shape == (k, n)
    for j in range(k):
        assert torch.equal(w[j], ops.decompress(ops.compress(vecs[j], fmt, block=128)))
    v, y, coeff = make_x(n, torch.float32, 50), make_x(n, torch.float32, 51), torch.randn(k)
    torch.testing.assert_close(ops.rows_dot(rows, v), (w.double() @ v.double()).float(),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.rows_axpy(y, rows, coeff),
                               (y.double() + coeff.double() @ w.double()).float(), rtol=1e-5, atol=1e-5)
    yb = y.bfloat16()
    out = ops.rows_axpy(yb, rows, coeff)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (yb.double() + coeff.double() @ w.double()).float(),
                               rtol=2 ** -7, atol=1e-3)


def test_stack_rows_validation():
    with pytest.raises(ValueError, match="at least one row"):
        ops.stack_rows([])
    a, b = ops.compress(torch.randn(10), "int8"), ops.compress(torch.randn(11), "int8")
    with pytest.raises(ValueError, match="share format, length and block"):
        ops.stack_rows([a, b])
    with pytest.raises(ValueError, match="share format, length and block"):
        ops.stack_rows([a, ops.compress(torch.randn(10), "int4")])
