"""DeltaGrad (Wu, Dobriban & Davidson, ICML 2020; docs/math.md): replay the recorded SGD run
without the forget set, with exact gradients only every T0 steps after a burn-in of j0 steps and
a compact L-BFGS model of the batch gradient in between.

The log must hold the full history (``Recorder(history="all")`` with ``step(lr, indices=batch)``):
every step's iterate w_t, minibatch gradient g_t (mean loss, without weight decay), batch rows
B_t and learning rate η_t. With w^I_0 = w_0, at step t with b = |B_t| and δ_t = |B_t ∩ R|:

* exact step (the first j0 steps, then every T0-th, and while no pair is kept): the exact
  retained-batch gradient at w^I_t,
  w^I_{t+1} = w^I_t − η_t [∇L_{B_t \\ R}(w^I_t) + λ w^I_t], and the curvature pair
  (s, y) = (w^I_t − w_t, ∇L_{B_t}(w^I_t) − g_t) from the full-batch gradient (b sample gradients:
  retained part + removed part); the last m pairs are kept;
* approximate step: B = compact L-BFGS of the pairs (B v = σ v − W M⁻¹ Wᵀ v, W = [Y, σS],
  M = [[−D, Lᵀ], [L, σ SᵀS]], σ = yᵀs / sᵀs of the newest pair; Byrd, Nocedal & Schnabel 1994)
  and w^I_{t+1} = w^I_t − η_t [ (b (g_t + B(w^I_t − w_t)) − Σ_{i∈B_t∩R} ∇ℓ_i(w^I_t)) / (b − δ_t)
  + λ w^I_t ]  (δ_t sample gradients).

Batches that lose every sample are skipped, as in :func:`mini_unlearn.models.retain_schedule`;
j0 and T0 count the steps actually taken. The history rows are decompressed one step at a time
(never the whole history); the 2m pair products go through :func:`ops.rows_dot` /
:func:`ops.rows_axpy`. With every step exact (j0 ≥ T) this is retraining on the same batch
sequence minus the forget set, from the logged w_0 (exact for an fp32 log or when the log holds
an exact "all/w0" entry; otherwise an int8/int4 log starts from the quantised w_0).
"""
from __future__ import annotations

import math
import warnings
from collections import deque

import torch
from tqdm.auto import tqdm

from .. import _batches, ops
from ..curvature import Layout
from ..errors import NonFiniteError

#: A pair enters the L-BFGS memory only if sᵀy > CURVATURE_EPS · ‖s‖ ‖y‖ (positive curvature;
#: keeps B positive definite, as every quasi-Newton update needs).
CURVATURE_EPS = 1e-8
#: Warn when the replay ends farther than this from the trained weights (× their norm).
SHIFT_WARN = 1.0


def _rows_of(data, rows: torch.Tensor, device):
    """(X, y) of training rows ``rows`` (original numbering) from tensors, a Dataset or a DataLoader."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        X, y = data
        r = rows.to(X.device)
        return X[r].to(device), y[r.to(y.device)].to(device)
    sub = _batches.subset(data, rows)
    xs, ys = zip(*_batches.batches(sub, batch_size=max(1, rows.numel()), device=device))
    return torch.cat(xs), torch.cat(ys)


class _CompactLBFGS:
    """B v = σ v − W M⁻¹ Wᵀ v from the last m pairs (W = [Y, σS] as stacked fp32 rows).

    M = [[−D, Lᵀ], [L, σ SᵀS]] with D = diag(sᵢᵀyᵢ), L the strictly lower triangle of SᵀY
    ((SᵀY)ᵢⱼ = sᵢᵀyⱼ) and σ = yᵀs / sᵀs of the newest pair; built when first needed after a change."""

    def __init__(self, m: int):
        self.S: deque[torch.Tensor] = deque(maxlen=m)
        self.Y: deque[torch.Tensor] = deque(maxlen=m)
        self.W = None
        self.Minv = None
        self.sigma = 0.0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self.S)

    def add(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Keep (s, y) if it has positive curvature (sᵀy > ε‖s‖‖y‖); returns whether it was kept."""
        sy, ns = float(s @ y), float(s.norm())
        if ns == 0.0:  # the replay has not left the original run yet: no information
            return False
        if not (math.isfinite(sy) and sy > CURVATURE_EPS * ns * float(y.norm())):
            self.rejected += 1
            return False
        self.S.append(s)
        self.Y.append(y)
        self.W = None
        return True

    def _build(self) -> None:
        S = torch.stack(list(self.S))
        Y = torch.stack(list(self.Y))
        S64, Y64 = S.double(), Y.double()
        SY = S64 @ Y64.T
        SS = S64 @ S64.T
        self.sigma = sigma = float(SY[-1, -1] / SS[-1, -1])
        L = torch.tril(SY, diagonal=-1)
        D = torch.diag(torch.diagonal(SY))
        M = torch.cat([torch.cat([-D, L.T], 1), torch.cat([L, sigma * SS], 1)], 0)
        self.Minv = torch.linalg.inv(M).float()
        W = torch.cat([Y, sigma * S]).contiguous()
        self.W = ops.Compressed("fp32", W, None, W.shape[1], 256)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            self._build()
        p = self.Minv @ ops.rows_dot(self.W, v)
        return ops.rows_axpy(self.sigma * v, self.W, -p)


def run(model, log, forget, loss_fn, *, mode: str, retain, r: int, max_passes: int, tol: float,
        batch_size: int, device, progress: bool, forget_indices: torch.Tensor | None = None,
        train_data=None, T0: int = 5, j0: int = 20, m: int = 2) -> dict:
    """DeltaGrad on ``model`` (a private copy, modified in place). Needs a ``history="all"`` log,
    the forget set as ``forget_indices`` (``unlearn(indices=...)``) and the training data
    (``train_data``, default ``log.train_data``). ``retain``, ``max_passes`` and ``tol`` are not
    used. Returns mode="replay", passes (sample gradients ÷ n, rounded up), grad_evals,
    certificate None, verified False, the step counts (steps = exact_steps + approx_steps;
    skipped_steps: batches wholly forgotten), pairs_rejected (no positive curvature) and shift
    = ‖w_u − w_a‖ / ‖w_a‖ (warns above SHIFT_WARN: the replay has most likely diverged)."""
    meta = log.meta
    if meta.get("history") != "all" or log.num_rows("all/w") == 0:
        raise ValueError("method='deltagrad' needs the full training history: record with "
                         "Recorder(model, history='all') and call rec.step(lr, indices=batch) at "
                         "every optimizer step (models.train passes the batch to its step_callback)")
    if forget_indices is None:
        raise ValueError("method='deltagrad' replays the recorded batches and needs the forget set "
                         "as rows of the training data: call unlearn(..., indices=forget_rows) "
                         "instead of forget=(X, y)")
    data = train_data if train_data is not None else getattr(log, "train_data", None)
    if data is None:
        raise ValueError("method='deltagrad' needs the training data the log was recorded on: pass "
                         "unlearn(..., train_data=(X, y)) (a log loaded from disk does not carry it)")
    if mode not in ("auto", "replay"):
        raise ValueError(f"method='deltagrad' has one mode, 'replay' (or 'auto'), got {mode!r}")
    if T0 < 1 or j0 < 0 or m < 1:
        raise ValueError(f"DeltaGrad needs T0 >= 1, j0 >= 0 and m >= 1, got T0={T0}, j0={j0}, m={m}")

    layout = Layout(log.param_names, [tuple(s) for s in log.shapes])
    params = layout.params(model)
    n, lam = int(meta["n_train"]), float(meta["weight_decay"])
    wd_in_g = bool(meta.get("grad_includes_weight_decay", False))
    T = log.num_rows("all/w")
    sizes = log.get("all/batch_sizes").long().cpu()
    rows_all = log.get("all/batch_indices").long().cpu()
    lrs = log.get("all/lr").double().cpu().tolist()
    if sizes.numel() != T or int(sizes.sum()) != rows_all.numel() or len(lrs) != T:
        raise ValueError("the log's full history is inconsistent (batch sizes, indices and steps "
                         "differ); re-record it")
    removed = torch.zeros(n, dtype=torch.bool)
    removed[torch.as_tensor(forget_indices).long().cpu()] = True
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).tolist()

    def grad_mean(w, rows):
        """(1/|rows|) Σ_{i∈rows} ∇ℓ_i(w): the gradient of the mean loss (one forward/backward)."""
        layout.set(model, w)
        X, y = _rows_of(data, rows, device)
        with torch.enable_grad():
            gs = torch.autograd.grad(loss_fn(model(X), y), params, allow_unused=True)
        return layout.flatten([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])

    lbfgs = _CompactLBFGS(m)
    # w^I_0 = w_0: exact if the log stores it ("all/w0"), else the (possibly quantised) first row
    w = (log.get("all/w0") if "all/w0" in log else log.row("all/w", 0)).to(device).float()
    k = exact = approx = skipped = evals = 0
    bar = tqdm(total=T, desc="mini_unlearn: DeltaGrad replay", disable=not progress, leave=False)
    for t in range(T):
        bar.update(1)
        batch = rows_all[starts[t]:starts[t + 1]]
        gone = removed[batch]
        b, d = batch.numel(), int(gone.sum())
        if d == b:
            skipped += 1
            continue
        lr = lrs[t]
        is_exact = k < j0 or (k - j0) % T0 == 0 or len(lbfgs) == 0
        k += 1
        w_t = log.row("all/w", t).to(device)
        g_t = log.row("all/g", t).to(device)
        if wd_in_g:
            g_t = g_t - lam * w_t
        s = w - w_t
        if is_exact:
            g_ret = grad_mean(w, batch[~gone])  # exactly what retraining computes
            g_full = g_ret if not d else ((b - d) * g_ret + d * grad_mean(w, batch[gone])) / b
            lbfgs.add(s, g_full - g_t)
            exact += 1
            evals += b
        else:
            g_full = g_t + lbfgs.matvec(s)
            if d:
                g_ret = (b * g_full - d * grad_mean(w, batch[gone])) / (b - d)
            else:
                g_ret = g_full
            approx += 1
            evals += d
        # SGD's update with weight_decay, operation for operation
        w = w.add(g_ret.add(w, alpha=lam), alpha=-lr)
        if k % 50 == 0 and not math.isfinite(float(w.sum())):
            bar.close()
            raise NonFiniteError(f"DeltaGrad diverged (NaN/Inf iterate) by step {t} of {T}: the "
                                 f"L-BFGS model of the batch gradient is unreliable here; try a "
                                 f"smaller T0 or a larger j0 (T0={T0}, j0={j0}, m={m})")
    bar.close()
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"DeltaGrad diverged (NaN/Inf iterate) by the end of the replay; try a "
                             f"smaller T0 or a larger j0 (T0={T0}, j0={j0}, m={m})")
    w_a = log.get("anchor/w").to(device)
    shift = float((w - w_a).norm() / w_a.norm().clamp_min(1e-30))
    if shift > SHIFT_WARN:
        warnings.warn(f"DeltaGrad's replay ended {shift:.3g}x the weights' norm away from the trained "
                      f"model: it has probably diverged (the L-BFGS steps are unstable here); try a "
                      f"smaller T0 or a larger j0 (T0={T0}, j0={j0}, m={m})", RuntimeWarning, stacklevel=3)
    layout.set(model, w)
    return dict(mode="replay", passes=-(-evals // n), grad_evals=evals, certificate=None,
                verified=False, steps=exact + approx, exact_steps=exact, approx_steps=approx,
                skipped_steps=skipped, pairs_rejected=lbfgs.rejected, shift=shift, T0=T0, j0=j0, m=m)
