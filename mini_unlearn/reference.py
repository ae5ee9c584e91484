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


def contraction2_system(nu: torch.Tensor, d: torch.Tensor | float, lam_dec: float, eta: float, mu: float,
                        c: float, nesterov: bool):
    """The one-step map ``s <- M s + b x`` of ``s = (u, e)`` (csrc/contraction2.h), float64:
    ``M`` as its entries ``(m00, m01, m10, m11)`` and ``b`` as ``(b0, b1)``, each broadcast to
    ``nu``'s shape."""
    nu = nu.double()
    d = d.double() if isinstance(d, torch.Tensor) else torch.full_like(nu, float(d))
    gamma, k = (mu * mu, 1.0 + mu * c) if nesterov else (mu, c)
    m = (torch.full_like(nu, mu), c * nu, -eta * d * gamma, 1.0 - eta * lam_dec - eta * d * k * nu)
    b = (torch.full_like(nu, c), -eta * d * k)
    return m, b


def _mat2_mul(a, b):
    return (a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3],
            a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3])


def _mat2_vec(a, v):
    return (a[0] * v[0] + a[1] * v[1], a[2] * v[0] + a[3] * v[1])


def contraction2_coeffs(m, b, steps: int):
    """``(M^steps, S_steps b)`` with ``S_steps = sum_{j<steps} M^j`` by binary powering from the top
    bit (``S_{2k} = S_k + M^k S_k``, ``M^{2k} = M^k M^k``; ``S_{k+1} = S_k + M^k``,
    ``M^{k+1} = M^k M``): no inverse, so exact algebra for any ``M`` (``nu' = 0``, repeated or
    complex eigenvalues). ``m``, ``b`` as returned by :func:`contraction2_system`."""
    one, zero = torch.ones_like(m[0]), torch.zeros_like(m[0])
    p, v = (one, zero, zero, one), (zero, zero)
    for bit in reversed(range(int(steps).bit_length())):
        pv = _mat2_vec(p, v)
        v = (v[0] + pv[0], v[1] + pv[1])
        p = _mat2_mul(p, p)
        if (steps >> bit) & 1:
            pb = _mat2_vec(p, b)
            v = (v[0] + pb[0], v[1] + pb[1])
            p = _mat2_mul(p, m)
    return p, v


def contraction2_accumulate(u, e, x, s_out, s_in, d, *, lam: float, lam_dec: float, eta: float, mu: float,
                            c: float, nesterov: bool, steps: int) -> None:
    """``(u, e) <- M^steps (u, e) + S_steps b x`` in place (csrc/contraction2.h), computed in
    float64 from the plain powers of ``M`` (the kernel carries ``I - M^k``)."""
    if steps < 0:
        raise RuntimeError(f"mini_unlearn: steps must be >= 0, got {steps}")
    if steps == 0:  # M^0 = I, S_0 = 0
        return
    nu = s_out.double()[:, None] * s_in.double()[None, :] + lam
    dd = 1.0 if d is None else d.double().reshape(nu.shape)
    m, b = contraction2_system(nu, dd, lam_dec, eta, mu, c, nesterov)
    p, v = contraction2_coeffs(m, b, steps)
    s = (u.double().reshape(nu.shape), e.double().reshape(nu.shape))
    xd = x.double().reshape(nu.shape)
    new_u = p[0] * s[0] + p[1] * s[1] + v[0] * xd
    new_e = p[2] * s[0] + p[3] * s[1] + v[1] * xd
    u.copy_(new_u.reshape(u.shape))
    e.copy_(new_e.reshape(e.shape))
