"""Pure-PyTorch reference of every kernel op: the oracle the tests compare the C++/CUDA kernels
with, and the backend used when the native extension is not built. Same names and positional
signatures as the op schemas in csrc/ops.cpp; the math follows csrc/quantize.h and
csrc/contraction.h (computed here in float64 where it is not bit-exact by design)."""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without int64 overflow.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_from_index(index: torch.Tensor, seed: int) -> torch.Tensor:
    """U[0, 1) noise for stochastic rounding, the same stream as csrc/quantize.h."""
    hs = int(_hash32(torch.tensor([seed & _MASK32], dtype=torch.int64)).item())
    h = _hash32(((index & _MASK32) + hs) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.numel()
    nb = -(-n // block)
    return torch.nn.functional.pad(x.float(), (0, nb * block - n)).view(nb, block)


def quantize_blockwise(x: torch.Tensor, bits: int, block: int, stochastic: bool, seed: int):
    qmax, n = _qmax(bits), x.numel()
    xb = _blocks(x, block)
    absmax = xb.abs().amax(dim=1)
    absmax = torch.where(torch.isfinite(xb).all(dim=1), absmax, torch.full_like(absmax, float("nan")))
    inv = torch.where(absmax > 0, torch.tensor(float(qmax)) / absmax, torch.zeros_like(absmax))[:, None]
    y = torch.where(inv == 0, torch.zeros_like(xb), xb * inv)
    if stochastic:
        idx = torch.arange(xb.numel(), device=x.device).view_as(xb)
        r = torch.floor(y + uniform_from_index(idx, seed))
    else:
        r = torch.round(y)
    q = r.clamp(-qmax, qmax).to(torch.int64).flatten()[:n]
    if bits == 8:
        return q.to(torch.int8), absmax
    q = torch.nn.functional.pad(q + 8, (0, n % 2), value=8).view(-1, 2)
    return (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8), absmax


def _codes_to_int(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Codes as integers in [-qmax, qmax], shape [..., numel]."""
    if bits == 8:
        return codes.to(torch.int64)
    c = codes.to(torch.int64)
    return torch.stack([c & 0xF, c >> 4], dim=-1).flatten(-2)[..., :numel] - 8


def dequantize_blockwise(codes, scales, bits: int, block: int, numel: int, dtype: torch.dtype):
    q = _codes_to_int(codes, bits, numel).to(torch.float32)
    step = (scales / float(_qmax(bits))).repeat_interleave(block, dim=-1)[..., :numel]
    return (q * step).to(dtype)


def dequant_dot(codes, scales, v, bits: int, block: int):
    w = dequantize_blockwise(codes, scales, bits, block, v.numel(), torch.float32)
    return (w.double() @ v.double()).float()


def dequant_axpy(y, codes, scales, coeff, bits: int, block: int):
    w = dequantize_blockwise(codes, scales, bits, block, y.numel(), torch.float32)
    return (y.double() + coeff.double() @ w.double()).to(y.dtype)


def contraction_coeffs(nu: torch.Tensor, eta: float, steps: int):
    """a = (1 - eta nu)^steps and c = (1 - a) / nu (-> eta steps as nu -> 0), in float64."""
    nu = nu.double()
    z = eta * nu
    a = (1.0 - z) ** steps
    safe = torch.where(nu == 0, torch.ones_like(nu), nu)
    c_small = -torch.expm1(steps * torch.log1p(-z.clamp(max=0.5))) / safe
    c = torch.where(z < 0.5, c_small, (1.0 - a) / safe)
    return a, torch.where(nu == 0, torch.full_like(nu, eta * steps), c)


def contraction_accumulate(acc, x, s_out, s_in, lam: float, eta: float, steps: int) -> None:
    nu = s_out.double()[:, None] * s_in.double()[None, :] + lam
    a, c = contraction_coeffs(nu, eta, steps)
    new = a * acc.double().reshape(nu.shape) + c * x.double().reshape(nu.shape)
    acc.copy_(new.reshape(acc.shape))


def contraction_accumulate_q(acc, codes, scales, s_out, s_in, lam: float, eta: float, steps: int,
                             bits: int, block: int) -> None:
    x = dequantize_blockwise(codes, scales, bits, block, acc.numel(), torch.float32)
    contraction_accumulate(acc, x, s_out, s_in, lam, eta, steps)
