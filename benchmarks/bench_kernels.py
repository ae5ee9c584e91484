"""Kernel benchmark: each native op's bandwidth against a plain copy of the same byte count, and
its speed against eager PyTorch and torch.compile doing the same work.

    python -m benchmarks.bench_kernels [--quick] [--device cpu|cuda] --json OUT [--plot OUT.png]

For every op and size (1M, 16M and 64M elements; --quick: 16M only) it records
  gbps               bytes the op must read + write / median time
  ratio_to_copy      copy time / op time for `dst.copy_(src)` (fp32) moving the same bytes,
                     run right before the op in each round; the median over rounds (so load
                     from other processes, or a change in where the threads run, hits both)
  speedup_vs_eager   eager PyTorch time / native time
  speedup_vs_compile torch.compile(eager function) time / native time (null if compile fails)

The eager baselines are fp32 re-implementations of mini_unlearn.reference written here: the
reference computes dequant_dot / dequant_axpy / contraction in float64 (it is the oracle of
the tests, not a fast path), which would make the comparison unfair. Each baseline keeps the
op's semantics (per-block absmax with the NaN/Inf check, round half to even, int4 packing, the
stable (1 - a) / nu' with the nu' -> 0 limit) in fp32, written the way one would in PyTorch.

On CPU there are two passes (see run()): the main numbers are taken with freed memory kept
in the heap (as a caching allocator does), so they measure the kernel's own traffic; the
*_fresh_pages fields repeat the native timing with the system allocator as it comes, where each
large output is fresh memory that the OS must fault in and zero first. Large allocations use
transparent huge pages (THP_MEM_ALLOC_ENABLE=1, set below unless given).

dequant_dot_int8 and dequant_axpy_int8 use k = 8 rows of numel / 8 elements each, so the
codes in total are `numel` bytes (k rows of numel each would need 8 x the memory at 64M).
contraction_accumulate(_int8) always runs on one [4096, 4096] layer (16M elements), steps=156;
so does contraction2_accumulate (momentum mu=0.9, c=0.1, decoupled decay, per-element d, fp32 x;
its eager baseline is the 2x2 binary powering of mini_unlearn.reference in fp32).

The JSON records which clone of the native CPU kernels ran ("cpu_isa": "avx512" or "avx2"). On
an AVX-512 machine, MINI_UNLEARN_CPU_ISA=avx2 forces the AVX2 baseline clone; with
ATEN_CPU_CAPABILITY=avx2 too, eager PyTorch and torch.compile run as on an AVX2-only CPU
(.ci/bench_gate.sh runs both ways).
"""
from __future__ import annotations

import os

# Back every large CPU allocation with transparent huge pages (PyTorch's own switch, read once
# at the first allocation, hence set before torch is imported). The native kernels ask for huge
# pages on their own large outputs (csrc/cpu/simd.h); with this, the copy's buffers, the ops'
# inputs and the eager / compiled baselines' tensors get them too, so every contender runs on
# the same kind of memory. Set THP_MEM_ALLOC_ENABLE=0 to measure without.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from mini_unlearn import backend, ops  # noqa: E402

MIB = 1 << 20
SIZES = (1 * MIB, 16 * MIB, 64 * MIB)
QUICK_SIZES = (16 * MIB,)
BLOCK = 256
K_ROWS = 8
CONTRACTION_SHAPE = (4096, 4096)
STEPS, LAM, ETA = 156, 1e-3, 0.05
TARGET_COPY, TARGET_COPY_CONTRACTION, TARGET_EAGER = 0.6, 0.5, 4.0
MU2, C2, LAM_DEC2 = 0.9, 0.1, 0.01  # contraction2_accumulate: Adam-like momentum, AdamW decay


# ---- eager fp32 baselines (the same semantics as the ops) -----------------------------------

def eager_quantize(x: torch.Tensor, bits: int, block: int):
    qmax = 127 if bits == 8 else 7
    xb = x.float().view(-1, block)  # the benchmark's sizes are multiples of the block
    absmax = xb.abs().amax(dim=1)
    absmax = torch.where(torch.isfinite(xb).all(dim=1), absmax, float("nan"))
    inv = torch.where(absmax > 0, qmax / absmax, 0.0)
    q = torch.round(xb * inv[:, None]).clamp_(-qmax, qmax)
    if bits == 8:
        return q.to(torch.int8).view(-1), absmax
    q = (q + 8).to(torch.uint8).view(-1, 2)
    return q[:, 0] | (q[:, 1] << 4), absmax


def _eager_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.float()
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).float() - 8.0


def eager_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    qmax = 127 if bits == 8 else 7
    q = _eager_codes(codes, bits)
    return (q.view(*scales.shape, block) * (scales / qmax)[..., None]).flatten(-2)


def eager_dot(codes, scales, v, bits: int, block: int) -> torch.Tensor:
    return eager_dequantize(codes, scales, bits, block) @ v


def eager_axpy(y, codes, scales, coeff, bits: int, block: int) -> torch.Tensor:
    return y + coeff @ eager_dequantize(codes, scales, bits, block)


def eager_contraction(acc, x, s_out, s_in, lam: float, eta: float, steps: int) -> None:
    nu = s_out[:, None] * s_in[None, :] + lam
    z = eta * nu
    a = (1.0 - z) ** steps
    safe = torch.where(nu == 0, 1.0, nu)
    c_small = -torch.expm1(steps * torch.log1p(-z.clamp(max=0.5))) / safe
    c = torch.where(z < 0.5, c_small, (1.0 - a) / safe)
    c = torch.where(nu == 0, eta * steps, c)
    acc.mul_(a).add_(c * x.view_as(acc))


def eager_contraction_q(acc, codes, scales, s_out, s_in, lam, eta, steps, bits, block) -> None:
    eager_contraction(acc, eager_dequantize(codes, scales, bits, block), s_out, s_in, lam, eta, steps)


def eager_contraction2(u, e, x, d, s_out, s_in, lam: float, lam_dec: float, eta: float, mu: float,
                       c: float, steps: int) -> None:
    """(u, e) <- M^L (u, e) + S_L b x (standard momentum): the 2x2 entries of M^L and of S_L b by
    binary powering from the top bit, elementwise over [d_out, d_in] tensors, in fp32."""
    nu = s_out[:, None] * s_in[None, :] + lam
    ed = eta * d
    m = (torch.full_like(nu, mu), c * nu, -mu * ed, 1.0 - eta * lam_dec - c * ed * nu)
    b = (torch.full_like(nu, c), -c * ed)
    p, v = m, b  # k = 1 (steps >= 1 here)
    for bit in reversed(range(steps.bit_length() - 1)):
        v = (v[0] + p[0] * v[0] + p[1] * v[1], v[1] + p[2] * v[0] + p[3] * v[1])
        p = (p[0] * p[0] + p[1] * p[2], p[0] * p[1] + p[1] * p[3],
             p[2] * p[0] + p[3] * p[2], p[2] * p[1] + p[3] * p[3])
        if (steps >> bit) & 1:
            v = (v[0] + p[0] * b[0] + p[1] * b[1], v[1] + p[2] * b[0] + p[3] * b[1])
            p = (p[0] * m[0] + p[1] * m[2], p[0] * m[1] + p[1] * m[3],
                 p[2] * m[0] + p[3] * m[2], p[2] * m[1] + p[3] * m[3])
    x = x.view_as(u)
    new_u = p[0] * u + p[1] * e + v[0] * x
    e.copy_(p[2] * u + p[3] * e + v[1] * x)
    u.copy_(new_u)


# ---- cases ----------------------------------------------------------------------------------

def _nb(n: int) -> int:
    return -(-n // BLOCK)


def _cases(numel: int, device: str):
    """(op name, numel, bytes, native(), eager(), extra fields) for one size, built lazily."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def quantize(bits):
        def build():
            x = randn(numel)
            nbytes = 4 * numel + (numel if bits == 8 else numel // 2) + 4 * _nb(numel)
            return (nbytes, lambda: ops.quantize_blockwise(x, bits=bits, block=BLOCK),
                    lambda: eager_quantize(x, bits, BLOCK), {})
        return build

    def dequantize(bits):
        def build():
            c, s = ops.quantize_blockwise(randn(numel), bits=bits, block=BLOCK)
            nbytes = c.numel() + 4 * s.numel() + 4 * numel
            return (nbytes, lambda: ops.dequantize_blockwise(c, s, bits=bits, block=BLOCK, numel=numel),
                    lambda: eager_dequantize(c, s, bits, BLOCK), {})
        return build

    def rows():
        m = numel // K_ROWS
        pairs = [ops.quantize_blockwise(randn(m), bits=8, block=BLOCK) for _ in range(K_ROWS)]
        return m, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def dot():
        m, c, s = rows()
        v = randn(m)
        nbytes = c.numel() + 4 * s.numel() + 4 * m + 4 * K_ROWS
        return (nbytes, lambda: ops.dequant_dot(c, s, v, bits=8, block=BLOCK),
                lambda: eager_dot(c, s, v, 8, BLOCK), {"k": K_ROWS, "row_numel": m})

    def axpy():
        m, c, s = rows()
        y, coeff = randn(m), randn(K_ROWS)
        nbytes = 4 * m + c.numel() + 4 * s.numel() + 4 * K_ROWS + 4 * m
        return (nbytes, lambda: ops.dequant_axpy(y, c, s, coeff, bits=8, block=BLOCK),
                lambda: eager_axpy(y, c, s, coeff, 8, BLOCK), {"k": K_ROWS, "row_numel": m})

    def spectra():
        d_out, d_in = CONTRACTION_SHAPE
        s_out = torch.rand(d_out, generator=g).to(device) * 4.0
        s_in = torch.rand(d_in, generator=g).to(device) * 4.0  # eta nu' up to ~0.8
        acc = randn(d_out, d_in)
        return d_out * d_in, s_out, s_in, acc

    def contraction():
        n, s_out, s_in, acc = spectra()
        x = randn(*CONTRACTION_SHAPE)
        acc_e = acc.clone()
        nbytes = 12 * n + 4 * (s_out.numel() + s_in.numel())
        return (nbytes,
                lambda: ops.contraction_accumulate(acc, x, s_out, s_in, lam=LAM, eta=ETA, steps=STEPS),
                lambda: eager_contraction(acc_e, x, s_out, s_in, LAM, ETA, STEPS),
                {"shape": list(CONTRACTION_SHAPE), "steps": STEPS})

    def contraction_q():
        n, s_out, s_in, acc = spectra()
        c, s = ops.quantize_blockwise(randn(n), bits=8, block=BLOCK)
        acc_e = acc.clone()
        nbytes = 8 * n + c.numel() + 4 * s.numel() + 4 * (s_out.numel() + s_in.numel())
        return (nbytes,
                lambda: ops.contraction_accumulate(acc, c, s_out, s_in, lam=LAM, eta=ETA, steps=STEPS,
                                                   bits=8, scales=s, block=BLOCK),
                lambda: eager_contraction_q(acc_e, c, s, s_out, s_in, LAM, ETA, STEPS, 8, BLOCK),
                {"shape": list(CONTRACTION_SHAPE), "steps": STEPS})

    def contraction2():
        n, s_out, s_in, u = spectra()
        e, x = randn(*CONTRACTION_SHAPE), randn(*CONTRACTION_SHAPE)
        d = 0.5 + torch.rand(*CONTRACTION_SHAPE, generator=g).to(device)  # Adam's 1/(sqrt(v)+eps)
        u_e, e_e = u.clone(), e.clone()
        nbytes = 24 * n + 4 * (s_out.numel() + s_in.numel())  # u, e read + written; x, d read
        return (nbytes,
                lambda: ops.contraction2_accumulate(u, e, x, s_out, s_in, d, lam=LAM, lam_dec=LAM_DEC2,
                                                    eta=ETA, mu=MU2, c=C2, steps=STEPS),
                lambda: eager_contraction2(u_e, e_e, x, d, s_out, s_in, LAM, LAM_DEC2, ETA, MU2, C2, STEPS),
                {"shape": list(CONTRACTION_SHAPE), "steps": STEPS, "mu": MU2, "c": C2, "with_d": True})

    return [("quantize_int8", quantize(8)), ("dequantize_int8", dequantize(8)),
            ("quantize_int4", quantize(4)), ("dequantize_int4", dequantize(4)),
            ("dequant_dot_int8", dot), ("dequant_axpy_int8", axpy)], \
           [("contraction_accumulate", contraction), ("contraction_accumulate_int8", contraction_q),
            ("contraction2_accumulate", contraction2)]


# ---- timing ---------------------------------------------------------------------------------

def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _time_once(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def _time_interleaved(fns, repeats: int, sync, warmup: int = 2) -> list[list[float]]:
    """Times of each fn over `repeats` rounds, timing them in turn within each round."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, times):
            ts.append(_time_once(f, sync))
    return times


def _median_interleaved(fns, repeats: int, sync, warmup: int = 2) -> list[float]:
    """Median time of each fn, timing them in turn within one loop."""
    return [statistics.median(ts) for ts in _time_interleaved(fns, repeats, sync, warmup)]


def _copy_fn(nbytes: int, device: str):
    """A copy of an fp32 tensor that moves `nbytes` (read + write)."""
    n = max(1, nbytes // 8)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _compile(eager, errors: list[str], name: str):
    """torch.compile(eager), warmed up; None if it fails."""
    try:
        torch._dynamo.reset()
        cfn = torch.compile(eager, dynamic=False)
        cfn()
        cfn()
        return cfn
    except Exception as exc:  # noqa: BLE001 (report and go on: compile is a baseline only)
        errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None


def _native_vs_copy(build, device, repeats):
    """The native op and a copy of the same bytes, timed in alternation: median times, and the
    median of the per-round ratios copy time / op time (each ratio compares two runs taken
    milliseconds apart, so a change in machine state during the loop, e.g. other tenants or
    where the threads land, hits both sides of it)."""
    nbytes, native, eager, extra = build()
    t_copy, t_native = _time_interleaved([_copy_fn(nbytes, device), native], repeats, _sync(device))
    ratio = statistics.median(c / n for c, n in zip(t_copy, t_native))
    return nbytes, statistics.median(t_native), statistics.median(t_copy), ratio, eager, extra


def _bench_row(name, numel, build, device, repeats, eager_repeats, errors, log, fresh=None):
    sync = _sync(device)
    t0 = time.perf_counter()
    nbytes, t_native, t_copy, ratio, eager, extra = _native_vs_copy(build, device, repeats)
    (t_eager,) = _median_interleaved([eager], eager_repeats, sync, warmup=1)
    compiled = _compile(eager, errors, name)
    t_compile = (_median_interleaved([compiled], eager_repeats, sync, warmup=1)[0]
                 if compiled is not None else None)
    del compiled
    gbps, copy_gbps = nbytes / t_native / 1e9, nbytes / t_copy / 1e9
    row = {
        "op": name, "numel": numel, "gbps": round(gbps, 3),
        "ratio_to_copy": round(ratio, 3),
        "speedup_vs_eager": round(t_eager / t_native, 2),
        "speedup_vs_compile": None if t_compile is None else round(t_compile / t_native, 2),
        "bytes": nbytes, "time_s": t_native, "copy_gbps": round(copy_gbps, 3),
        "eager_time_s": t_eager, "compile_time_s": t_compile,
    }
    if fresh is not None:  # the same op with the system allocator's fresh pages (pass 1)
        f_native, f_ratio = fresh
        row["gbps_fresh_pages"] = round(nbytes / f_native / 1e9, 3)
        row["ratio_to_copy_fresh_pages"] = round(f_ratio, 3)
    row.update(extra)
    log(f"{name:28s} {numel:>10d}  {gbps:7.2f} GB/s  x{row['ratio_to_copy']:.2f} copy  "
        f"x{row['speedup_vs_eager']:.1f} eager  "
        f"{'x%.2f compile' % row['speedup_vs_compile'] if t_compile else 'compile n/a'}"
        f"{'  (fresh pages: x%.2f copy)' % row['ratio_to_copy_fresh_pages'] if fresh else ''}"
        f"  ({time.perf_counter() - t0:.0f}s)")
    return row


# glibc mallopt parameters: keep freed memory in the heap instead of returning it to the OS.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _reuse_freed_memory() -> bool:
    """Make glibc malloc serve every allocation from its heap and keep freed memory there, so
    a repeated op gets its output buffer back instead of fresh zero-filled pages from the OS
    (what PyTorch's CUDA caching allocator, jemalloc or tcmalloc do). False if not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def run(quick: bool, device: str, repeats: int | None = None, log=print, ops: list[str] | None = None) -> dict:
    """Benchmark every op; returns the JSON-able dict described in the module docstring.

    On CPU it runs two passes. Pass 1 times each native op (against its copy) with the system
    allocator as it comes: outputs above glibc's mmap threshold (32 MiB at most) are fresh
    pages, which the OS must fault in and zero, a cost that scales with the output and that no
    kernel can avoid (reported as gbps_fresh_pages / ratio_to_copy_fresh_pages). Pass 2 (the
    main numbers, and the eager / compile baselines) keeps freed memory in the heap, as a
    caching allocator does, so that gbps measures the kernel's own memory traffic.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked, but torch.cuda.is_available() is False")
    sizes = QUICK_SIZES if quick else SIZES
    repeats = repeats or (9 if quick else 21)
    eager_repeats = 3 if quick else 5
    sync = _sync(device)
    errors: list[str] = []
    n_contraction = CONTRACTION_SHAPE[0] * CONTRACTION_SHAPE[1]
    rows = [(numel, name) for numel in sizes for name, _ in _cases(numel, device)[0]]
    rows += [(n_contraction, name) for name, _ in _cases(n_contraction, device)[1]]
    if ops:  # only these ops (names as in the output)
        unknown = set(ops) - {name for _, name in rows}
        if unknown:
            raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted({n for _, n in rows})}")
        rows = [(numel, name) for numel, name in rows if name in ops]

    def build_of(numel, name):
        flat, contraction = _cases(numel, device)
        return dict(flat + contraction)[name]

    fresh = {}
    if device == "cpu":
        log("pass 1: native ops with the system allocator (fresh pages for large outputs)")
        for numel, name in rows:
            _, t_native, _, ratio, _, _ = _native_vs_copy(build_of(numel, name), device, repeats)
            fresh[(numel, name)] = (t_native, ratio)
        reuse = _reuse_freed_memory()
        log(f"pass 2: allocator keeps freed memory: {reuse}")
    else:
        reuse = None
    largest = max(sizes)
    (t_copy,) = _median_interleaved([_copy_fn(8 * largest, device)], repeats, sync)
    copy_gbps = 8 * largest / t_copy / 1e9
    log(f"copy: fp32 {largest} elements, {copy_gbps:.2f} GB/s ({torch.get_num_threads()} threads, "
        f"native CPU kernels: {_cpu_isa()})")
    results = [_bench_row(name, numel, build_of(numel, name), device, repeats, eager_repeats, errors,
                          log, fresh.get((numel, name)))
               for numel, name in rows]
    return {
        "copy_gbps": round(copy_gbps, 3),
        "threads": torch.get_num_threads(),
        "device": device,
        "results": results,
        "backend": backend(),
        "cpu_isa": _cpu_isa(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "quick": quick,
        "repeats": repeats,
        "block": BLOCK,
        "dot_axpy_layout": f"k={K_ROWS} rows of numel/{K_ROWS} elements each (numel codes in total)",
        "contraction": {"shape": list(CONTRACTION_SHAPE), "steps": STEPS, "lam": LAM, "eta": ETA},
        "contraction2": {"mu": MU2, "c": C2, "lam_dec": LAM_DEC2, "nesterov": False, "d": "U[0.5, 1.5)"},
        "baselines": "eager: fp32 PyTorch re-implementations in benchmarks/bench_kernels.py (the "
                     "reference computes dot/axpy/contraction in float64); compile: torch.compile "
                     "(Inductor) of the same functions",
        "gbps_definition": "bytes the op must read + write / median time; ratio_to_copy: median "
                           "over rounds of (copy time / op time), the copy being dst.copy_(src) "
                           "of an fp32 tensor moving the same bytes, run right before the op",
        "allocator": ("main numbers with freed memory kept in the heap (glibc mallopt M_MMAP_MAX=0, "
                      "M_TRIM_THRESHOLD=2^31-1); *_fresh_pages: the system allocator as it comes "
                      "(outputs > 32 MiB are fresh, zero-filled pages each call)"
                      if device == "cpu" else "torch CUDA caching allocator"),
        "allocator_reuse": reuse,
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "loadavg": _loadavg(),
        "compile_errors": errors,
        "targets": {"ratio_to_copy": TARGET_COPY, "ratio_to_copy_contraction": TARGET_COPY_CONTRACTION,
                    "speedup_vs_eager": TARGET_EAGER, "contraction_vs_compile": 1.0},
    }


def _cpu_isa():
    """The native CPU kernels' instruction set ("avx512" or "avx2", forced by
    MINI_UNLEARN_CPU_ISA=avx2); None without the native library."""
    try:
        return torch.ops.mini_unlearn.cpu_isa()
    except (AttributeError, RuntimeError):
        return None


def _loadavg():
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except (OSError, ValueError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    ops_order = list(dict.fromkeys(r["op"] for r in rows))
    flat = [r for r in rows if not r["op"].startswith("contraction")]
    sizes = sorted({r["numel"] for r in flat})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(sizes))
    for si, numel in enumerate(sizes):
        pts = [(ops_order.index(r["op"]) + (si - (len(sizes) - 1) / 2) * width, r["ratio_to_copy"])
               for r in flat if r["numel"] == numel]
        ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=f"{numel // MIB}M elements")
    con = [r for r in rows if r["op"].startswith("contraction")]
    if con:
        shape = "x".join(str(d) for d in CONTRACTION_SHAPE)
        ax.bar([ops_order.index(r["op"]) for r in con], [r["ratio_to_copy"] for r in con], width,
               color="tab:purple", label=f"contraction [{shape}], steps={STEPS}")
        ax.axhline(TARGET_COPY_CONTRACTION, color="tab:purple", ls=":", lw=0.8,
                   label=f"target {TARGET_COPY_CONTRACTION}x copy (contraction)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_COPY, color="r", ls="--", lw=0.8, label=f"target {TARGET_COPY}x copy")
    ax.set_xticks(range(len(ops_order)))
    ax.set_xticklabels(ops_order, rotation=20, ha="right")
    ax.set_ylabel("bandwidth / copy bandwidth")
    ax.set_title(f"mini_unlearn kernels on {result['device']} ({result['threads']} threads, "
                 f"copy {result['copy_gbps']:.1f} GB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16M elements only, fewer repeats")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--plot", help="write a bar chart of ratio_to_copy here (PNG)")
    p.add_argument("--repeats", type=int, help="timed repeats of the native op and the copy")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--ops", help="comma-separated op names to run (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.device, args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True),
                 ops=args.ops.split(",") if args.ops else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
