"""MINI_UNLEARN_CPU_ISA: forcing the AVX2 baseline clone of the CPU kernels (read once per
process, so each setting runs in a subprocess) reports it and gives bit-identical results."""
import os
import subprocess
import sys

import pytest
import torch

from mini_unlearn import backend

pytestmark = pytest.mark.skipif(backend() != "native", reason="native kernels not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every CPU op on inputs that hit the vector bodies, their tails, odd lengths and both rounding
# modes; prints the ISA that ran and the raw bytes of every output as hex.
SCRIPT = r"""
import torch
import mini_unlearn  # noqa: F401 (loads the native library)
N = torch.ops.mini_unlearn
g = torch.Generator().manual_seed(3)
out = []
def add(t):
    out.append(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes().hex())
n = 70_001
x = torch.randn(n, generator=g) * 3
x[1000:1300] = 0.0  # an all-zero block
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    xd = x.to(dtype)
    for bits in (8, 4):
        for block in (32, 256, 4096):
            for stochastic in (False, True):
                c, s = N.quantize_blockwise(xd, bits, block, stochastic, 11)
                add(c); add(s)
            add(N.dequantize_blockwise(c, s, bits, block, n, dtype))
for bits in (8, 4):
    rows = [N.quantize_blockwise(torch.randn(3001, generator=g), bits, 64, False, 0) for _ in range(7)]
    C = torch.stack([r[0] for r in rows]); S = torch.stack([r[1] for r in rows])
    for dtype in (torch.float32, torch.bfloat16):
        v = torch.randn(3001, generator=g).to(dtype)
        add(N.dequant_dot(C, S, v, bits, 64))
        add(N.dequant_axpy(v, C, S, torch.randn(7, generator=g), bits, 64))
so, si = torch.rand(37, generator=g) * 4, torch.rand(301, generator=g) * 4
so[0] = 0.0
for steps in (1, 156, 1000):
    acc = torch.randn(37, 301, generator=g)
    N.contraction_accumulate(acc, torch.randn(37, 301, generator=g), so, si, 1e-3, 0.05, steps)
    add(acc)
    c, s = N.quantize_blockwise(torch.randn(37 * 301, generator=g), 4, 64, False, 0)
    N.contraction_accumulate_q(acc, c, s, so, si, 0.0, 0.5, steps, 4, 64)
    add(acc)
    for nesterov, d in ((False, None), (True, 0.5 + torch.rand(37, 301, generator=g))):
        u, e = torch.randn(37, 301, generator=g), torch.randn(37, 301, generator=g)
        N.contraction2_accumulate(u, e, torch.randn(37, 301, generator=g), so, si, d, lam=1e-3,
                                  lam_dec=0.01, eta=0.05, mu=0.9, c=0.1, nesterov=nesterov, steps=steps)
        add(u); add(e)
print(N.cpu_isa())
print("\n".join(out))
"""


def _run(isa):
    env = dict(os.environ)
    env.pop("MINI_UNLEARN_CPU_ISA", None)
    if isa is not None:
        env["MINI_UNLEARN_CPU_ISA"] = isa
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)


def _cpu_has_avx512():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"))


@pytest.mark.skipif(torch.ops.mini_unlearn.cpu_isa() == "generic", reason="not an x86-64 build")
def test_forced_baseline_is_reported_and_bit_identical():
    native, forced = _run(None), _run("avx2")
    assert native.returncode == 0, native.stderr
    assert forced.returncode == 0, forced.stderr
    isa_native, *out_native = native.stdout.split("\n")
    isa_forced, *out_forced = forced.stdout.split("\n")
    assert isa_forced == "avx2"
    assert isa_native == ("avx512" if _cpu_has_avx512() else "avx2")
    assert len(out_native) > 100
    diff = [i for i, (a, b) in enumerate(zip(out_native, out_forced)) if a != b]
    assert not diff and len(out_native) == len(out_forced), f"outputs differ at {diff[:10]}"


def test_bad_isa_value_is_a_clear_error():
    r = _run("sse9")
    assert r.returncode != 0
    assert "MINI_UNLEARN_CPU_ISA='sse9'" in r.stderr
