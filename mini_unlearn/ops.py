"""Thin Python entry points of the kernel ops (torch.ops.mini_unlearn.*, or the pure-PyTorch
reference when the native extension is not built), their fake (meta) kernels for
torch.compile, and the storage formats built on them ("fp32", "bf16", "int8", "int4")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from ._backend import _NATIVE

_impl = torch.ops.mini_unlearn if _NATIVE else reference

FORMATS = ("fp32", "bf16", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def quantize_blockwise(x: torch.Tensor, *, bits: int = 8, block: int = 256, stochastic: bool = False,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation of a 1-D float tensor.

    Returns ``(codes, scales)``: int8 codes (``bits=8``) or uint8 bytes holding two int4 codes
    (``bits=4``), and one fp32 absmax per block of ``block`` elements (the last block may be
    partial). Round to nearest, |x - x_hat| <= absmax / (2 qmax); ``stochastic=True`` rounds
    up with probability equal to the fractional part (unbiased), drawing its seed from
    ``generator``. A block with NaN/Inf gets a NaN scale, so it decodes to NaN.
    """
    return _impl.quantize_blockwise(x, bits, block, stochastic, _seed(generator) if stochastic else 0)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, *, bits: int, block: int,
                         numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code * absmax / qmax`` as a 1-D ``dtype`` tensor."""
    return _impl.dequantize_blockwise(codes, scales, bits, block, numel, dtype)


def dequant_dot(codes: torch.Tensor, scales: torch.Tensor, v: torch.Tensor, *, bits: int,
                block: int) -> torch.Tensor:
    """``W @ v`` (fp32, length k) for k compressed rows ``codes [k, ...]``, ``scales [k, nb]``,
    reading each row once and never materialising ``W``."""
    return _impl.dequant_dot(codes, scales, v, bits, block)


def dequant_axpy(y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, coeff: torch.Tensor, *,
                 bits: int, block: int) -> torch.Tensor:
    """``y + sum_j coeff[j] W_j`` in one pass over the k compressed rows (fp32 accumulation)."""
    return _impl.dequant_axpy(y, codes, scales, coeff, bits, block)


def contraction_accumulate(acc: torch.Tensor, x: torch.Tensor | None, s_out: torch.Tensor,
                           s_in: torch.Tensor, *, lam: float, eta: float, steps: int,
                           bits: int | None = None, scales: torch.Tensor | None = None,
                           codes: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """The fused trajectory update of one segment and one layer, in place on ``acc`` (fp32):

    ``nu' = s_out[i] s_in[j] + lam``, ``a = (1 - eta nu')^steps``, ``acc <- a acc + (1 - a)/nu' x``
    with ``(1 - a)/nu' -> eta steps`` as ``nu' -> 0``. ``acc`` is ``[d_out, d_in]`` (or flat with
    ``s_in`` of length 1). ``x`` is dense, or compressed: pass ``x`` = codes (or ``codes=``) with
    ``bits`` and ``scales``. Returns ``acc``.
    """
    if bits is None:
        _impl.contraction_accumulate(acc, x, s_out, s_in, float(lam), float(eta), int(steps))
    else:
        c = codes if codes is not None else x
        _impl.contraction_accumulate_q(acc, c, scales, s_out, s_in, float(lam), float(eta), int(steps),
                                       bits, block)
    return acc


def contraction2_accumulate(u: torch.Tensor, e: torch.Tensor, x: torch.Tensor, s_out: torch.Tensor,
                            s_in: torch.Tensor, d: torch.Tensor | None = None, *, lam: float,
                            lam_dec: float = 0.0, eta: float, mu: float, c: float,
                            nesterov: bool = False, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused 2-state trajectory update (docs/math.md: SGD with momentum, Nesterov, Adam/AdamW)
    of one segment and one layer, in place on ``u`` and ``e`` (fp32, ``[len(s_out), len(s_in)]``,
    or flat with ``s_in`` of length 1).

    Per element, with ``nu' = s_out[i] s_in[j] + lam`` and the forcing ``x`` held fixed, it applies
    ``steps`` optimizer steps of the linearised error dynamics::

        standard:  u <- mu u + c (nu' e + x);          e <- (1 - eta lam_dec) e - eta d u
        nesterov:  g = nu' e + x;  u <- mu u + c g;    e <- (1 - eta lam_dec) e - eta d (g + mu u)

    (``u`` on the right of ``e``'s update is the new one) in one pass: ``s = (u, e)`` becomes
    ``M^steps s + S_steps b x`` (one step is ``s <- M s + b x``, M and b in csrc/contraction2.h)
    with ``M^steps`` and ``S_steps = sum_{j<steps} M^j`` from binary powering (no inverse: exact as ``nu' -> 0`` and in the oscillating regime). ``d`` is the
    per-element preconditioner (fp32, Adam's ``1/(sqrt(v) + eps)`` in the eigenbasis); ``None``
    means ``d = 1``. ``x`` may be fp32, bf16 or fp16. With ``mu = 0, c = 1, d = 1, lam_dec = 0``
    ``e`` follows ``e <- (1 - eta nu') e - eta x``, i.e. ``-e`` follows
    :func:`contraction_accumulate`'s ``acc``. ``steps = 0`` leaves both untouched.
    Returns ``(u, e)``.
    """
    _impl.contraction2_accumulate(u, e, x, s_out, s_in, d, lam=float(lam), lam_dec=float(lam_dec),
                                  eta=float(eta), mu=float(mu), c=float(c), nesterov=bool(nesterov),
                                  steps=int(steps))
    return u, e


if _NATIVE:  # shapes for tracing (torch.compile, FakeTensor); the real work is in csrc/

    def _nblocks(n: int, block: int) -> int:
        return -(-n // block)

    @torch.library.register_fake("mini_unlearn::quantize_blockwise")
    def _(x, bits, block, stochastic, seed):
        n = x.numel()
        codes = x.new_empty((n if bits == 8 else (n + 1) // 2,),
                            dtype=torch.int8 if bits == 8 else torch.uint8)
        return codes, x.new_empty((_nblocks(n, block),), dtype=torch.float32)

    @torch.library.register_fake("mini_unlearn::dequantize_blockwise")
    def _(codes, scales, bits, block, numel, dtype):
        return scales.new_empty((numel,), dtype=dtype)

    @torch.library.register_fake("mini_unlearn::dequant_dot")
    def _(codes, scales, v, bits, block):
        return v.new_empty((codes.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("mini_unlearn::dequant_axpy")
    def _(y, codes, scales, coeff, bits, block):
        return torch.empty_like(y)

    @torch.library.register_fake("mini_unlearn::contraction_accumulate")
    def _(acc, x, s_out, s_in, lam, eta, steps):
        return None

    @torch.library.register_fake("mini_unlearn::contraction_accumulate_q")
    def _(acc, codes, scales, s_out, s_in, lam, eta, steps, bits, block):
        return None

    @torch.library.register_fake("mini_unlearn::contraction2_accumulate")
    def _(u, e, x, s_out, s_in, d, *, lam, lam_dec, eta, mu, c, nesterov, steps):
        return None


# ---- storage formats over the ops -------------------------------------------------------------

@dataclass
class Compressed:
    """One vector (``data`` 1-D) or k stacked rows (``data`` 2-D) in a storage format."""

    fmt: str
    data: torch.Tensor
    scales: torch.Tensor | None
    numel: int
    block: int

    @property
    def rows(self) -> int:
        return self.data.shape[0] if self.data.dim() == 2 else 1

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.scales is None else self.scales.numel() * 4)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def compress(x: torch.Tensor, fmt: str = "int8", *, block: int = 256, stochastic: bool = False,
             generator: torch.Generator | None = None) -> Compressed:
    """Store a vector (any shape, flattened) in ``fmt``: fp32/bf16 as is, int8/int4 blockwise."""
    _check_fmt(fmt)
    flat = x.detach().reshape(-1)
    if fmt == "fp32":
        return Compressed(fmt, flat.float().clone(), None, flat.numel(), block)
    if fmt == "bf16":
        return Compressed(fmt, flat.to(torch.bfloat16).clone(), None, flat.numel(), block)
    if flat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        flat = flat.float()
    codes, scales = quantize_blockwise(flat.contiguous(), bits=_BITS[fmt], block=block,
                                       stochastic=stochastic, generator=generator)
    return Compressed(fmt, codes, scales, flat.numel(), block)


def decompress(c: Compressed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The vector (or ``[k, numel]`` rows) back as ``dtype``."""
    if c.scales is None:
        return c.data.to(dtype)
    if c.data.dim() == 2:
        return torch.stack([dequantize_blockwise(c.data[j], c.scales[j], bits=_BITS[c.fmt],
                                                 block=c.block, numel=c.numel, dtype=dtype)
                            for j in range(c.rows)])
    return dequantize_blockwise(c.data, c.scales, bits=_BITS[c.fmt], block=c.block, numel=c.numel,
                                dtype=dtype)


def stack_rows(items: list[Compressed]) -> Compressed:
    """k vectors of one format and length as one ``[k, ...]`` block of rows."""
    if not items:
        raise ValueError("stack_rows needs at least one row")
    f = items[0]
    if any(c.fmt != f.fmt or c.numel != f.numel or c.block != f.block for c in items):
        raise ValueError("stack_rows: every row must share format, length and block")
    scales = None if f.scales is None else torch.stack([c.scales for c in items])
    return Compressed(f.fmt, torch.stack([c.data for c in items]), scales, f.numel, f.block)


def rows_dot(rows: Compressed, v: torch.Tensor) -> torch.Tensor:
    """``W @ v`` (fp32) for stacked rows in any format."""
    if rows.scales is None:
        return rows.data.float() @ v.float()
    return dequant_dot(rows.data, rows.scales, v.contiguous(), bits=_BITS[rows.fmt], block=rows.block)


def rows_axpy(y: torch.Tensor, rows: Compressed, coeff: torch.Tensor) -> torch.Tensor:
    """``y + coeff @ W`` for stacked rows in any format."""
    if rows.scales is None:
        return (y.float() + coeff.float() @ rows.data.float()).to(y.dtype)
    return dequant_axpy(y.contiguous(), rows.data, rows.scales, coeff.float().contiguous(),
                        bits=_BITS[rows.fmt], block=rows.block)
