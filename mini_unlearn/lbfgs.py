"""L-BFGS with a preconditioned initial inverse Hessian and Armijo backtracking (refresh mode)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import LineSearchError, NonFiniteError


@dataclass
class LbfgsResult:
    w: torch.Tensor
    f: float
    g: torch.Tensor
    evals: int
    converged: bool


def _two_loop(g, S, Y, H0):
    q = g.clone()
    alphas = []
    for s, y in zip(reversed(S), reversed(Y)):
        rho = 1.0 / torch.dot(y, s)
        a = rho * torch.dot(s, q)
        q -= a * y
        alphas.append((rho, a))
    r = H0(q)
    for (s, y), (rho, a) in zip(zip(S, Y), reversed(alphas)):
        b = rho * torch.dot(y, r)
        r += (a - b) * s
    return r


def lbfgs(fg: Callable[[torch.Tensor], tuple[float, torch.Tensor]], w0: torch.Tensor, f0: float,
          g0: torch.Tensor, H0: Callable[[torch.Tensor], torch.Tensor], *, max_evals: int,
          tol: float, memory: int = 10, c1: float = 1e-4, max_halvings: int = 30,
          f_noise: float = 1e-7) -> LbfgsResult:
    """Minimise f from w0 whose value f0 and gradient g0 are given (so the first step costs no
    extra pass). Stops when ‖g‖ ≤ tol·‖g0‖ or after ``max_evals`` calls of ``fg``; raises
    LineSearchError when a line search exhausts ``max_halvings`` halvings. ``f_noise`` is the
    relative rounding noise of f (float32 sums), below which an approximate-Wolfe test on the
    slope replaces Armijo (Hager & Zhang)."""
    w, f, g = w0.clone(), float(f0), g0.clone()
    target = tol * float(g0.norm())
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    evals = 0
    while float(g.norm()) > target and evals < max_evals:
        d = -_two_loop(g, S, Y, H0)
        gd = float(torch.dot(g, d))
        if not gd < 0:  # not a descent direction: restart from the preconditioner alone
            S.clear(), Y.clear()
            d = -H0(g)
            gd = float(torch.dot(g, d))
        t, accepted = 1.0, False
        for _ in range(max_halvings):
            if evals >= max_evals:
                break
            w_new = w + t * d
            f_new, g_new = fg(w_new)
            evals += 1
            if not torch.isfinite(g_new).all():
                raise NonFiniteError("NaN/Inf in the retained gradient during refresh")
            if f_new <= f + c1 * t * gd or (f_new <= f + f_noise * abs(f) and
                                              abs(float(torch.dot(g_new, d))) <= 0.9 * abs(gd)):
                accepted = True  # Armijo, or (near the optimum, where f's rounding hides the
                break            # decrease) f within noise and the slope cut as by a Wolfe step
            t *= 0.5
        else:
            raise LineSearchError(f"refresh: the line search exhausted {max_halvings} halvings "
                                  f"without sufficient decrease (f={f:.6g}); the preconditioner "
                                  "or the gradients are inconsistent: check loss_fn and the log")
        if not accepted:
            break  # budget spent inside a line search: keep the last accepted point
        s, y = w_new - w, g_new - g
        if float(torch.dot(s, y)) > 1e-10 * float(s.norm() * y.norm()):
            S.append(s), Y.append(y)
            if len(S) > memory:
                S.pop(0), Y.pop(0)
        w, f, g = w_new, f_new, g_new
    return LbfgsResult(w, f, g, evals, float(g.norm()) <= target)
