"""Mini-Unlearning (docs/math.md): one-shot, trajectory and refresh modes.

One forget pass gives G_R = Σ_{i∈R} ∇ℓ_i, the forget loss and the forget curvature, so
g0 = ∇F_R(w_a) = (n g_a − G_R)/(n − r) + λ w_a is exact and the retained preconditioner
P = curvature((n·full − forget)/(n − r)) + λI is positive definite by construction.
"""
from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from .. import ops
from ..curvature import (EigenBlock, KronBlock, Layout, PassSums, Preconditioner, data_pass,
                         dense_hessian, eigh_psd, ggn_quadratic, trace_scales)
from ..errors import CurvatureScaleError, LinearisationError, NonFiniteError, UnsupportedTrainingError
from ..lbfgs import lbfgs
from ..optimizers import StepRule
from ..recorder import segment_weights

# Retained repair epochs by default (trajectory with retain=): none. Measured with the directional
# calibration (README, "Across data sets"; MLP, SGD recipe, 3 seeds, 9 cells of mnist5k / digits /
# fashion-mnist at 10/30/50 %): mean Avg.Gap 0.55 points without the repair, 0.78 with 2 epochs at
# the recorded final step rule (before the calibration the repair helped: 2 epochs took mnist5k's
# 0.72/1.19/1.74 to 0.29/0.72/0.79). repair_epochs=2 still runs it.
REPAIR_EPOCHS = 0
# A repair whose final step rule's learning rate is below this fraction of the run's peak warns
# that it will barely move the model (the GPT benchmark's cosine schedule: mini+retain equal to
# mini to 0.1 % in every cell, README "Language models").
REPAIR_MIN_LR = 0.01
# The trajectory's validity check: the forget set's mean KL(p_wa ‖ p_wu) against its quadratic
# model ½ Δwᵀ F_R Δw (the forget set's K-FAC, without the directional calibration). Measured
# (docs/math.md, "linearity check", seed 0, 10/30/50 %): an MLP 8.0/4.4/3.7x, a BatchNorm CNN
# 4.6/3.0/2.3x (test within 0.3 points of retraining), a pre-activation ResNet 32/20/16x with KL
# 0.010/0.054/0.120 nats (test 0.4/1.5/5.4 points below retraining). Raised when the ratio exceeds
# the limit and the KL is large in itself (the ratio grows as the forget set shrinks, where the
# moves are small).
LINEARITY_LIMIT = 15.0
# The trajectory rotates into the log's full-data K-FAC eigenbasis with the retained factors'
# diagonal there (no eigendecomposition per call); measured the same as the retained factors' own
# eigenbasis on mnist5k (the README's sweep command, uncalibrated, 3 seeds, 10/30/50 %: rel-L2
# 0.632/0.651/0.712 against 0.632/0.650/0.712).
LOGGED_BASIS = True
# Directional calibration of the trajectory's K-FAC curvature (docs/math.md §4): α per block from
# the exact GGN along the recurrence's own error, on at most CALIBRATION_SAMPLES rows of each half
# of the forget set (needs 2·CALIBRATION_MIN rows), clamped to ALPHA_RANGE.
CALIBRATION_SAMPLES = 256
# ...and at most CALIBRATION_POSITIONS output positions per half (rows × positions per row: a
# sequence model's row is a whole sequence of per-token predictions). Measured on the GPT of
# benchmarks/bench_lm.py (seq 64, 3 seeds): 32 rows per half instead of 64 at 10 % took a call
# from 3.4 to 1.9 s, forgotten/retained/held-out perplexity the same to 0.2 % on every seed.
CALIBRATION_POSITIONS = 2048
CALIBRATION_MIN = 2
ALPHA_RANGE = (0.01, 100.0)  # a safety net: measured α 1.3-2.5 (MLPs), up to 44 (a ResNet), 66 (a GPT)
# ...times κ, the exact GGN along the whole error over the sum along the blocks' parts (the cross
# terms the block-diagonal recurrence drops; measured with COUPLING = False in the README's MLP
# sweeps and study_linearity: MLPs 0.68 -> 0.55 mean Avg.Gap over 9 cells, a ResNet at 30/50 %
# 60/49 -> 76/69 % test accuracy with α clamped at 10, retraining 80/78 %)
COUPLING = True
LINEARITY_MIN_KL = 0.05  # nats per sample (per output position for sequences)
# ...and whatever the ratio, a mean KL above this is refused: same-recipe retraining moved the
# forget set's predictions by at most 0.08 nats in every measured case (a ResNet at 50 %), results
# close to retraining by at most 0.09; a pre-activation ResNet's uncalibrated trajectory moved them
# 0.4-1.4 nats (test accuracy 39-68 %; calibrated: 0.01-0.12 nats, 72-80 %).
# Classifiers only (one prediction per sample): on a language model's memorised document the
# per-token moves are larger (a tiny GPT's retraining raises the document's loss by 1.4 nats).
LINEARITY_MAX_KL = 0.5
CONVERGED_RESIDUAL = 1e-3  # ‖∇F(w_a)‖ ≤ this · ‖g_a‖: training ran to convergence


def _blocks(log) -> list[KronBlock]:
    return [KronBlock(**b) for b in log.meta.get("kron_blocks", [])]


def forget_pass(model, layout: Layout, log, w: torch.Tensor, forget, loss_fn, *, curvature: bool,
                batch_size: int, device, comm=None) -> PassSums:
    """Σ over the forget set of losses and gradients at ``w`` (+ its curvature when asked).
    With a communicator (torchrun) each rank passes over its share and the sums are all-reduced."""
    layout.set(model, w)
    exact = log.meta["curvature"] == "exact"
    blocks = _blocks(log)

    def one(part) -> PassSums:
        sums = data_pass(model, layout, part, loss_fn, curvature=curvature and not exact, blocks=blocks,
                         diag_names=log.meta.get("diag_params", []) if curvature else (),
                         fisher=log.meta.get("fisher", "ggn"), batch_size=batch_size, device=device,
                         **({"mc_samples": int(log.meta.get("mc_samples", 1)), "seed": 0}
                            if log.meta.get("fisher") == "mc" else {}),
                         train_mode=bool(log.meta.get("train_mode", False)))
        if curvature and exact:
            sums.A["hessian"] = dense_hessian(model, layout, part, loss_fn, batch_size, device)
        return sums

    if comm is None:
        return one(forget)
    from ..distributed import summed_pass
    return summed_pass(comm, forget, one)


def preconditioner(log, layout: Layout, fsums: PassSums, n: int, r: int, lam: float,
                   device, diag_groups: list[list[str]] | None = None,
                   logged_basis: bool = False) -> Preconditioner:
    """P = curvature of the retained loss + λI, from the log's full-data curvature minus the
    forget set's, per block in its eigenbasis. ``logged_basis=True`` keeps the log's full-data
    eigenbasis U and takes the retained factor's diagonal in it, (n·s − diag(Uᵀ F U))/(n − r),
    instead of eigendecomposing the retained factor (the trajectory: measured the same results,
    docs/math.md §4)."""
    one = torch.ones(1, device=device)
    k = 1.0 / (n - r)
    if log.meta["curvature"] == "exact":
        s, U = eigh_psd((n * log.get("hessian").to(device) - fsums.A["hessian"]) * k)
        return Preconditioner([EigenBlock(lambda v: v.view(-1, 1), lambda out, m: out.copy_(m.view(-1)),
                                          U, s, None, one)], lam, layout.numel)
    parts = []
    scales = trace_scales(log.meta)
    for b in _blocks(log):
        sides = {}
        for side, diag in (("A", b.a_diag), ("G", b.g_diag)):
            s = log.get(f"kfac/{b.module}/s_{side}").to(device)
            c = k * (scales.get(b.module, 1.0) if side == "G" else 1.0)  # G: the trace calibration
            if diag:  # a diagonal factor: its retained version is diagonal too (no basis)
                sides[side] = (((n * s - fsums.__dict__[side][b.module]) * c).clamp_min(0), None)
                continue
            U = log.get(f"kfac/{b.module}/U_{side}").to(device)
            F = fsums.__dict__[side][b.module]
            if logged_basis:
                sides[side] = (((n * s - ((F @ U) * U).sum(0)) * c).clamp_min(0), U)
                continue
            full = (U * s) @ U.T
            sides[side] = eigh_psd((n * full - F) * c)
        (sA, UA), (sG, UG) = sides["A"], sides["G"]
        parts.append(EigenBlock(lambda v, b=b: b.matrix(layout, v),
                                lambda out, m, b=b: b.scatter(layout, out, m), UG, sG, UA, sA))
    diag = log.meta.get("diag_params", [])
    if diag:
        pos = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in diag])
        nu_all = ((n * log.get("diag/nu").to(device) - fsums.diag) * k).clamp_min(0)
        at = {int(i): j for j, i in enumerate(pos.tolist())}
        for names in (diag_groups or [diag]):  # one vector block per optimizer group
            idx = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in names])
            nu = nu_all[torch.tensor([at[int(i)] for i in idx.tolist()], device=device)]
            idx = idx.to(device)
            parts.append(EigenBlock(lambda v, idx=idx: v[idx].view(-1, 1),
                                    lambda out, m, idx=idx: out.index_copy_(0, idx, m.view(-1)), None, nu,
                                    None, one))
    return Preconditioner(parts, lam, layout.numel)


def kron_pcg(log, layout: Layout, fs: PassSums, n: int, r: int, lam: float, b: torch.Tensor, device,
             tol: float = 1e-6, max_iter: int = 200) -> torch.Tensor | None:
    """P⁻¹ b by conjugate gradients, without eigendecomposing the retained factors.

    P's products cost a few skinny matmuls (G_R M A_R with G_R, A_R = (n·full − forget)/(n − r)
    applied factor by factor, full = U diag(s) Uᵀ from the log), and the full-data K-FAC inverse
    (already in its eigenbasis in the log) preconditions them, so a handful of iterations reach
    ``tol`` where an eigendecomposition of every factor would dominate the one-shot's time.
    Returns None (use the eigenbasis path) for dense curvature or if P is not positive definite."""
    if log.meta["curvature"] == "exact":
        return None
    k = 1.0 / (n - r)
    blocks = []
    for blk in _blocks(log):
        f = {s: (None if d else log.get(f"kfac/{blk.module}/U_{s}").to(device),
                 log.get(f"kfac/{blk.module}/s_{s}").to(device))
             for s, d in (("A", blk.a_diag), ("G", blk.g_diag))}
        blocks.append((blk, f, fs.A[blk.module], fs.G[blk.module]))
    diag = log.meta.get("diag_params", [])
    if diag:
        idx = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in diag]).to(device)
        nu_full = log.get("diag/nu").to(device)
        nu_R = ((n * nu_full - fs.diag) * k).clamp_min(0)

    def side(U, s_, forget, M, left):  # (n U diag(s) Uᵀ − forget) / (n − r) applied to M
        if U is None:  # a diagonal factor: the forget sum is a vector too
            return k * (n * s_ - forget)[:, None] * M if left else k * M * (n * s_ - forget)[None, :]
        return k * (n * (U @ (s_[:, None] * (U.T @ M))) - forget @ M) if left else \
            k * (n * (((M @ U) * s_) @ U.T) - M @ forget)

    def rot(U, M, left, back=False):  # Uᵀ M (left) / M U (right); the identity for a diagonal factor
        if U is None:
            return M
        if left:
            return (U @ M) if back else (U.T @ M)
        return (M @ U.T) if back else (M @ U)

    scales = trace_scales(log.meta)

    def apply_P(v):
        out = lam * v
        for blk, f, Af, Gf in blocks:
            M = blk.matrix(layout, v)
            GM = side(*f["G"], Gf, M, left=True) * scales.get(blk.module, 1.0)
            blk.scatter(layout, out, side(*f["A"], Af, GM, left=False) + lam * M)
        if diag:
            out[idx] = (nu_R + lam) * v[idx]
        return out

    def apply_Minv(v):
        out = v / lam
        for blk, f, _, _ in blocks:
            (UA, sA), (UG, sG) = f["A"], f["G"]
            M = rot(UA, rot(UG, blk.matrix(layout, v), True), False)
            M = M / (scales.get(blk.module, 1.0) * sG[:, None] * sA[None, :] + lam)
            blk.scatter(layout, out, rot(UA, rot(UG, M, True, back=True), False, back=True))
        if diag:
            out[idx] = v[idx] / (nu_full + lam)
        return out

    x = torch.zeros_like(b)
    res = b.clone()
    z = apply_Minv(res)
    p = z.clone()
    rz = float(res @ z)
    target = tol * float(b.norm())
    for _ in range(max_iter):
        Ap = apply_P(p)
        pAp = float(p @ Ap)
        if not pAp > 0:
            return None
        alpha = rz / pAp
        x += alpha * p
        res -= alpha * Ap
        if float(res.norm()) <= target:
            return x
        z = apply_Minv(res)
        rz, rz_old = float(res @ z), rz
        p = z + (rz / rz_old) * p
    return x


def run(model, log, forget, loss_fn, *, mode: str, retain, r: int, max_passes: int, tol: float,
        batch_size: int, device, progress: bool, unstable: str = "raise", allow_adam: bool = False,
        repair_epochs: int | None = None, repair_batch_size: int | None = None, seed: int = 0,
        linearity_limit: float | None = LINEARITY_LIMIT, calibrate: bool = True, comm=None) -> dict:
    """Mini-Unlearning on ``model`` (a private copy, modified in place). Returns the result
    fields: mode, passes, grad_evals, certificate, verified (and the trajectory's stability
    diagnostics). ``unstable``: "raise" (default) raises CurvatureScaleError when the logged
    curvature says training would have diverged in some direction; "clip" clips those
    directions to critical damping and reports them. ``allow_adam=True`` runs the (measured as
    inaccurate) Adam/AdamW trajectory anyway, for studies. ``comm`` (a
    :class:`~mini_unlearn.distributed.Communicator`, inside torchrun): the forget and retained
    passes run data-parallel and their sums are all-reduced; each block's trajectory recurrence
    runs on its owner rank (broadcast at the end); everything else runs redundantly,
    identically, on every rank (docs/distributed.md), the retained repair included.

    Retained repair (trajectory mode with ``retain=`` given): ``repair_epochs`` epochs
    (default 0: measured no closer with the directional calibration, see REPAIR_EPOCHS) of the recorded optimizer's final step rule (learning rate,
    momentum, coupled decay) over the retained data in shuffled minibatches of
    ``repair_batch_size`` (default: the training batch size the Recorder saw, else 64), seeded
    by ``seed`` (docs/math.md, "Retained repair"); its cost is counted in ``passes`` and
    ``grad_evals``.

    Directional calibration (trajectory, ``calibrate=True``, the default; docs/math.md §4): each
    K-FAC block's curvature is scaled by the exact Gauss-Newton curvature along the error the
    recurrence builds over K-FAC's, measured split-half on the forget set (each half's error on
    the other half's rows, at most ``CALIBRATION_SAMPLES`` rows and ``CALIBRATION_POSITIONS`` output
    positions each); the forget passes sum the
    two halves apart, and a second sweep of the kernels integrates the calibrated error. Its
    Jacobian products are counted in ``grad_evals``; ``info["stability"]["calibration"]`` holds
    each block's α. ``calibrate=False`` runs the uncalibrated recurrence (one sweep).

    Linearity check (trajectory): one forward-only pass over the forget set at w_a and w_u
    compares the mean KL of their predictions with ½ Δwᵀ F_R Δw from the forget set's K-FAC; a
    ratio above ``linearity_limit`` with a KL above ``LINEARITY_MIN_KL``, or a KL above
    ``LINEARITY_MAX_KL`` (classifiers), raises :class:`LinearisationError` (``None`` skips the check). Reported in
    ``info["stability"]["linearity"]``."""
    if unstable not in ("raise", "clip"):
        raise ValueError(f"unstable must be 'raise' or 'clip', got {unstable!r}")
    layout = Layout(log.param_names, [tuple(s) for s in log.shapes])
    meta = log.meta
    n, lam = int(meta["n_train"]), float(meta["weight_decay"])
    w_a = log.get("anchor/w").to(device)
    g_a = log.get("anchor/g").to(device)
    segments = meta.get("segments") or []
    if mode == "auto":
        residual = float((g_a + lam * w_a).norm())
        converged = residual <= CONVERGED_RESIDUAL * float(g_a.norm()) and "optimizer" not in meta
        if converged:
            mode = "refresh" if retain is not None else "oneshot"
        elif segments:
            mode = "trajectory"
        else:
            raise UnsupportedTrainingError(
                f"the trained model is not at a minimum of the logged objective (‖∇F‖ = {residual:.3g}, "
                f"{residual / max(float(g_a.norm()), 1e-30):.3g} of ‖∇L‖) and the log has no checkpoints, "
                "so no mode can stand behind its answer: record with Recorder(checkpoints=K) attached to "
                "the optimizer (trajectory mode), or pass mode='oneshot' explicitly")
    if mode == "trajectory" and (meta.get("optimizer") or {}).get("preconditioned") and not allow_adam:
        raise UnsupportedTrainingError(
            f"the trajectory mode does not support {meta['optimizer']['name']} yet: its linearisation with "
            "the preconditioner 1/(√v̂+ε) held fixed per segment was measured far from retraining on a "
            "mnist5k MLP (rel-L2 1.9 with the final d, > 300 with per-segment d; the original is 1.0), "
            "because v adapts exactly where the fixed-d model drifts. Refused rather than approximated: "
            "use method='finetune'/'neggrad'/'retrain', or train with SGD (momentum is supported)")
    if mode == "trajectory":
        if not segments:
            raise ValueError("mode='trajectory' needs checkpoints: record with Recorder(checkpoints=K) "
                             "and rec.attach(optimizer) (or rec.step(lr) at every plain-SGD step)")
        epochs = (REPAIR_EPOCHS if retain is not None else 0) if repair_epochs is None else int(repair_epochs)
        if epochs < 0:
            raise ValueError(f"repair_epochs must be >= 0, got {epochs}")
        if epochs and retain is None:
            raise ValueError("repair_epochs > 0 needs the retained data: pass retain=")
        w, stability, fs = _trajectory(model, layout, log, forget, loss_fn, n, r, lam, w_a, segments,
                                       batch_size, device, progress, unstable, comm, calibrate)
        _check_finite(w, "trajectory")
        lin = linearity(model, layout, log, w_a, w, forget, batch_size, device, fs)
        stability["linearity"] = lin
        if linearity_limit is not None and ((lin["ratio"] > linearity_limit and lin["actual"] > LINEARITY_MIN_KL)
                                            or (lin["actual"] > LINEARITY_MAX_KL and not lin["per_position"])):
            raise LinearisationError(
                f"the trajectory's result moves the forget set's predictions {lin['ratio']:.1f}x more (mean "
                f"KL {lin['actual']:.3g}) than the log's curvature predicts for its step ({lin['predicted']:.3g}); "
                f"above {linearity_limit:g}x (and {LINEARITY_MIN_KL:g} nats), or above {LINEARITY_MAX_KL:g} nats at "
                "any ratio, the linearised retraining is measured not to hold (a BatchNorm CNN at 30-50 % lost "
                "7-27 test points before KFC's trace calibration; a ResNet at 30-50 % lands 1.5-5.4 test points below "
                "retraining). The model was not changed. Forget fewer samples per call, record more checkpoints "
                "(with a learning-rate warm-up, segments shorter than the warm-up: a GPT refused at 30 % with 8 "
                "answered with 16, README), or use method='retrain'; linearity_limit=None skips this check")
        layout.set(model, w)
        calib = stability.get("calibration")
        out = dict(mode="trajectory", passes=len(segments), grad_evals=r * len(segments)
                   + (calib["grad_evals"] if calib else 0), certificate=None, verified=False, stability=stability)
        if epochs:
            rep = _repair(model, log, layout, retain, loss_fn, epochs, repair_batch_size, lam, device,
                          progress, seed)
            _check_finite(layout.get(model), "trajectory + retained repair")
            out["passes"] += epochs
            out["grad_evals"] += rep["grad_evals"]
            out["repair"] = rep
        return out
    fs = forget_pass(model, layout, log, w_a, forget, loss_fn, curvature=True, batch_size=batch_size,
                     device=device, comm=comm)
    g0 = (n * g_a - fs.grad) / (n - r) + lam * w_a
    if mode == "oneshot":
        step = kron_pcg(log, layout, fs, n, r, lam, g0, device)
        if step is None:  # dense curvature, or the retained factors lost definiteness
            step = preconditioner(log, layout, fs, n, r, lam, device).solve(g0)
        _check_finite(w_a - step, "oneshot")
        layout.set(model, w_a - step)
        return dict(mode="oneshot", passes=1, grad_evals=r, certificate=None, verified=False)
    P = preconditioner(log, layout, fs, n, r, lam, device)
    if mode != "refresh":
        raise ValueError(f"unknown mode {mode!r}; choose auto, oneshot, trajectory or refresh")
    if retain is None:
        raise ValueError("mode='refresh' needs the retained data: pass retain=(X, y), a Dataset or a DataLoader")
    f0 = (n * float(meta["anchor_loss"]) - fs.loss) / (n - r) + 0.5 * lam * float(w_a @ w_a)
    bar = tqdm(total=max_passes, desc="mini_unlearn: refresh passes", disable=not progress, leave=False)

    def retained(part):
        return data_pass(model, layout, part, loss_fn, batch_size=batch_size, device=device,
                         train_mode=bool(meta.get("train_mode", False)))

    def fg(w):
        layout.set(model, w)
        if comm is None:
            s = retained(retain)
        else:
            from ..distributed import summed_pass
            s = summed_pass(comm, retain, retained)
        bar.update(1)
        return s.loss / s.n + 0.5 * lam * float(w @ w), s.grad / s.n + lam * w

    try:
        res = lbfgs(fg, w_a, f0, g0, P.solve, max_evals=max_passes, tol=tol)
    finally:
        bar.close()
    _check_finite(res.w, "refresh")
    layout.set(model, res.w)
    cert = float(res.g.norm() / g0.norm())
    return dict(mode="refresh", passes=1 + res.evals, grad_evals=r + res.evals * (n - r),
                certificate=cert, verified=bool(res.converged))


def linearity(model, layout: Layout, log, w_a: torch.Tensor, w: torch.Tensor, forget, batch_size: int,
              device, fs: PassSums) -> dict:
    """How far the step w_a -> w moved the forget set's predictions (mean KL(p_wa ‖ p_w) over its
    samples and output positions, forward-only, in training's normalisation mode) against the
    quadratic model of the same quantity, ½ Δwᵀ F_R Δw with F_R the forget set's own mean Fisher
    (K-FAC factors and diagonals of the forget pass ``fs``, sums over its ``fs.n`` samples).
    ``model`` ends at w. One host sync."""
    from .. import _batches
    from ..curvature import pass_mode

    dw = w - w_a
    pred = torch.zeros((), device=device)
    m = float(fs.n)
    scales = trace_scales(log.meta)
    for b in _blocks(log):  # mean K-FAC of the forget set: (A_R / m) ⊗ (G_R / m)
        M = b.matrix(layout, dw)
        G, A = fs.G[b.module] * scales.get(b.module, 1.0), fs.A[b.module]  # a diagonal factor: a vector
        GM = G[:, None] * M if G.dim() == 1 else G @ M
        GMA = GM * A[None, :] if A.dim() == 1 else GM @ A
        pred = pred + (GMA * M).sum() / (m * m)
    diag = log.meta.get("diag_params", [])
    if diag:
        idx = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in diag]).to(device)
        pred = pred + (fs.diag.to(device) / m * dw[idx] ** 2).sum()
    kl = torch.zeros((), device=device, dtype=torch.float64)
    count, sequence = 0, False
    train = bool(log.meta.get("train_mode", False))
    with torch.no_grad(), pass_mode(model, train):
        for x, _ in _batches.batches(forget, batch_size, device):
            layout.set(model, w_a)
            la = torch.log_softmax(model(x).float(), -1)
            layout.set(model, w)
            lw = torch.log_softmax(model(x).float(), -1)
            kl += (la.exp() * (la - lw)).sum(-1).double().sum()
            count += la[..., 0].numel()
            sequence = la.dim() > 2
    layout.set(model, w)
    predicted, actual = 0.5 * float(pred), float(kl) / max(count, 1)
    return {"predicted": predicted, "actual": actual, "ratio": actual / max(predicted, 1e-12),
            "per_position": bool(sequence)}


def _repair(model, log, layout: Layout, retain, loss_fn, epochs: int, batch_size: int | None, lam: float,
            device, progress: bool, seed: int) -> dict:
    """``epochs`` epochs of the recorded optimizer's final step rule on the retained data, from
    the trajectory's point (``model`` holds it). One torch.optim.SGD param group per recorded
    group: lr = the last run's η, momentum μ, dampening 1 − c, Nesterov, coupled decay λ."""
    from . import _train_utils as U

    meta = log.meta
    last = meta["segments"][-1]
    params = dict(model.named_parameters())
    if "groups" in last:
        group_of = meta["optimizer"]["group_of"]
        extra = lam if meta.get("grad_includes_weight_decay") else 0.0
        groups = []
        for g, runs in enumerate(last["groups"]):
            eta, mu, c, lam_c, lam_dec, nesterov, _ = runs[-1]
            if lam_dec:
                raise UnsupportedTrainingError("the retained repair steps SGD rules only; this log's "
                                               "optimizer decouples its weight decay (AdamW)")
            ps = [params[nm] for nm in layout.names if group_of[nm] == g]
            peak = max(float(run[0]) for seg in meta["segments"] for run in seg["groups"][g])
            if ps and float(eta) < REPAIR_MIN_LR * peak:
                warnings.warn(
                    f"the retained repair steps at the recorded final learning rate {float(eta):.3g}, "
                    f"{float(eta) / peak:.2%} of the run's peak {peak:.3g} (a schedule decayed to ~0, e.g. "
                    "cosine): it will barely move the model. Leave repair_epochs at 0 for such a schedule",
                    stacklevel=4)
            if ps:
                groups.append(dict(params=ps, lr=float(eta), momentum=float(mu), dampening=1.0 - float(c),
                                   nesterov=bool(nesterov) and float(mu) > 0, weight_decay=float(lam_c) + extra))
    else:  # recorded by hand: plain SGD on the objective with coupled decay λ
        groups = [dict(params=[params[nm] for nm in layout.names], lr=float(last["lr_runs"][-1][0]),
                       momentum=0.0, weight_decay=lam)]
    covered = set(layout.names)
    frozen = {nm: p.requires_grad for nm, p in params.items() if nm not in covered}
    for nm in frozen:
        params[nm].requires_grad_(False)  # parameters the log does not cover stay as trained
    bs = int(batch_size or meta.get("batch_size") or U.DEFAULT_BATCH_SIZE)
    loader = U.Shuffled(retain, bs, device, torch.Generator().manual_seed(int(seed)))
    opt = torch.optim.SGD(groups)

    def loss_of(item):
        xb, yb = item
        return loss_fn(model(xb), yb), xb.shape[0]

    try:
        evals = U.train_epochs(model, opt, lambda: loader, loss_of, epochs, len(loader),
                               desc="mini_unlearn: retained repair steps", progress=progress,
                               what="the retained repair", train=bool(meta.get("train_mode", True)))
    finally:
        for nm, flag in frozen.items():
            params[nm].requires_grad_(flag)
    return dict(epochs=epochs, batch_size=bs, lr=[g["lr"] for g in groups], grad_evals=evals)


def _check_finite(w: torch.Tensor, mode: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"mode {mode!r} produced NaN/Inf weights; the model was not changed. Check the "
                             "log (mini-unlearn inspect) and the forget set; try another mode")


def _runs_of(log, seg: dict, group: int, lam: float) -> list[tuple[StepRule, int]]:
    """The (rule, steps) runs of one parameter group in one segment. Logs recorded by hand
    (``rec.step(lr)``) are plain SGD with the objective's λ as coupled decay."""
    if "groups" in seg:
        extra = lam if log.meta.get("grad_includes_weight_decay") else 0.0
        out = []
        for run in seg["groups"][group]:
            eta, mu, c, lam_c, lam_dec, nesterov, steps = run
            out.append((StepRule(eta, mu, c, lam_c + extra, lam_dec, bool(nesterov)), int(steps)))
        return out
    return [(StepRule(eta=float(lr), lam=lam), int(steps)) for lr, steps in seg["lr_runs"]]


def _block_groups(log, layout: Layout) -> tuple[list[int], list[list[str]] | None]:
    """The optimizer group of each K-FAC block, and the diagonal parameters split by group.
    A block whose weight and bias sit in groups with different step rules is refused."""
    opt = log.meta.get("optimizer")
    blocks = _blocks(log)
    if opt is None:
        return [0] * len(blocks), None
    group_of = opt["group_of"]
    segs = log.meta["segments"]
    out = []
    for b in blocks:
        gw = group_of[b.weight]
        if b.bias is not None and group_of[b.bias] != gw:
            gb = group_of[b.bias]
            if any(s["groups"][gw] != s["groups"][gb] for s in segs):
                raise UnsupportedTrainingError(
                    f"layer {b.module!r}: its weight and bias are in optimizer param groups with different "
                    "settings (e.g. no weight decay on biases); its K-FAC block mixes them, so the "
                    "recorded update cannot be mapped. Put a layer's weight and bias in one group "
                    "(decay-free groups are fine for norm layers and other diagonal parameters)")
        out.append(gw)
    diag = log.meta.get("diag_params", [])
    groups: dict[int, list[str]] = {}
    for p in diag:
        groups.setdefault(group_of[p], []).append(p)
    return out, [groups[g] for g in sorted(groups)] if diag else None


def _rho(nu_p: torch.Tensor, d, rule: StepRule) -> torch.Tensor:
    """Spectral radius of the per-coordinate training map M (the 2×2 map of
    ``ops.contraction2_accumulate``; see mini_unlearn.optimizers) at curvature ``nu_p`` (ν + coupled decay)."""
    eta, mu, c = rule.eta, rule.mu, rule.c
    hd = eta * (1.0 if d is None else d)
    k = (1.0 + mu * c) if rule.nesterov else c
    keep = 1.0 - eta * rule.lam_dec
    tr = mu + keep - hd * k * nu_p
    det = mu * keep - (hd * mu * nu_p if rule.nesterov else 0.0)
    det = torch.as_tensor(det, dtype=nu_p.dtype, device=nu_p.device).expand_as(nu_p)
    disc = tr * tr - 4 * det
    sq = disc.clamp_min(0).sqrt()
    real = torch.maximum((tr + sq).abs(), (tr - sq).abs()) / 2
    return torch.where(disc >= 0, real, det.clamp_min(0).sqrt())


def _critical(nu_p: torch.Tensor, d, rule: StepRule) -> torch.Tensor:
    """The curvature at which the map is critically damped (fastest contraction)."""
    hd = rule.eta * (1.0 if d is None else d)
    if not torch.is_tensor(hd) and hd * rule.c == 0.0:
        # a step of learning rate 0 (a warm-up's first): the curvature does not enter the map
        return nu_p.clone()
    keep = max(1.0 - rule.eta * rule.lam_dec, 0.0)
    return ((keep ** 0.5 - rule.mu ** 0.5) ** 2) / (hd * rule.c) * torch.ones_like(nu_p)


def _halves(forget, r: int):
    """The forget set's even and odd rows (as (X, y) tensors or Subsets), or None when too small
    for the calibration (fewer than 2 · CALIBRATION_MIN rows)."""
    from .. import _batches
    if r < 2 * CALIBRATION_MIN:
        return None
    idx = torch.arange(r)
    return _batches.subset(forget, idx[0::2]), _batches.subset(forget, idx[1::2]), (r + 1) // 2, r // 2


def _trajectory(model, layout, log, forget, loss_fn, n, r, lam, w_a, segments, batch_size, device,
                progress, unstable: str = "raise", comm=None, calibrate: bool = True
                ) -> tuple[torch.Tensor, dict, PassSums]:
    """Integrate the linearised retraining error over the K checkpoints under the recorded
    optimizer, e = w_retrain − w in each block's eigenbasis; w_u = w_a + U e. Plain SGD uses the
    fused ``contraction_accumulate`` (acc = −e); momentum and Adam carry the 2-state (u, e).

    ``calibrate`` (docs/math.md §4, "Directional calibration"): each K-FAC block's curvature is
    scaled by α = (exact GGN curvature) / (K-FAC's) along the error the recurrence builds. To
    keep a sample's own curvature out of the estimate (its gradient is part of the error), the
    forget passes sum the even and odd rows apart; a first sweep integrates the error driven by
    each half alone, the exact curvature along each is measured on the other half, and a second
    sweep (kernels only, on the first sweep's rotated forcings, cached: K × the model's fp32
    bytes while the call runs) integrates the full error with the calibrated curvature."""
    K = len(segments)
    halves = _halves(forget, r) if calibrate and log.meta["curvature"] != "exact" else None

    def pass_of(data, w_k, curvature):
        return forget_pass(model, layout, log, w_k, data, loss_fn, curvature=curvature,
                           batch_size=batch_size, device=device, comm=comm)

    def delta(k, curvature):
        """The forcing at checkpoint k, and (calibrating) each half's own forcing, scaled to r rows."""
        w_k = segment_weights(log, k, w_a)
        base = (r / (n - r)) * log.row("ckpt/grad", k).to(device)
        if halves is None:
            s = pass_of(forget, w_k, curvature)
            return base - s.grad / (n - r), s, None
        fa, fb, ra, rb = halves
        sa, sb = pass_of(fa, w_k, curvature), pass_of(fb, w_k, curvature)
        s = sa + sb
        return (base - s.grad / (n - r), s,
                (base - sa.grad * (r / ra / (n - r)), base - sb.grad * (r / rb / (n - r))))

    block_groups, diag_groups = _block_groups(log, layout)
    bar = tqdm(total=K, desc="mini_unlearn: checkpoint forget passes", disable=not progress, leave=False)
    # The last checkpoint's pass also gives the forget curvature, so P costs no extra pass.
    d_last, fs, h_last = delta(K - 1, curvature=True)
    bar.update(1)
    P = preconditioner(log, layout, fs, n, r, lam, device, diag_groups=diag_groups,
                       logged_basis=LOGGED_BASIS)
    groups = block_groups + list(range(len(P.blocks) - len(block_groups)))
    if diag_groups is not None:  # the diagonal blocks follow the K-FAC ones, one per group
        opt_groups = sorted({log.meta["optimizer"]["group_of"][p] for p in log.meta["diag_params"]})
        groups = block_groups + opt_groups
    precond = "ckpt/d" in log.row_lists
    plain = not precond and all(rule.mu == 0 and rule.lam_dec == 0 for seg in segments
                                for g in range(len(seg.get("groups", [0])))
                                for rule, _ in _runs_of(log, seg, g, lam))
    bases = [_Basis(b, log.row("ckpt/d", K - 1).to(device) if precond else None) for b in P.blocks]
    nkron = len(_blocks(log))
    names = [b.module for b in _blocks(log)]
    names += [f"diagonal group {g}" for g in groups[len(names):]]
    # calibrated: the K-FAC blocks of an unpreconditioned recurrence (diagonal blocks are exact)
    calibrated = [halves is not None and i < nkron and not bs.white for i, bs in enumerate(bases)]
    if not any(calibrated):
        halves = None
    spectra = _segment_spectra(log, P, device) if (log.meta.get("segment_spectra") and not precond) else None
    clip = unstable == "clip"
    # The stability verdict stays on the device until the loop ends: one host sync, not one per run.
    worst = torch.zeros(len(bases), device=device)
    clipped = torch.zeros(len(bases), dtype=torch.int64, device=device)
    # Under torchrun each block's rotations and recurrence run on one owner rank (balanced by
    # its size, as finalize balances the eigendecompositions); the forget passes stay
    # data-parallel, and the owners broadcast their block's error at the end.
    owners = comm.owners([float(bs.nu.numel()) for bs in bases]) if comm is not None else None
    mine = [owners is None or o == comm.rank for o in (owners or [None] * len(bases))]

    def zeros():
        return [(torch.zeros_like(bs.nu), torch.zeros_like(bs.nu)) for bs in bases]

    memo: dict = {}

    def curvature_of(i, bs, k, rule, nu, dm, alpha, verdict):
        """The run's per-element curvature (None: the outer-product kernels apply as they are),
        with the stability verdict; memoised while it cannot change (same block and rule, fixed
        spectrum and no per-segment preconditioner)."""
        key = (i, rule, alpha is not None) if (not spectra and dm is None) else None
        if key is not None and key in memo:
            return memo[key]  # its verdict is in already
        nu_p = nu + rule.lam * bs.decay_weight
        rho = _rho(nu_p, dm, rule)
        bad = rho >= 1.0 + 1e-6
        if verdict:
            worst[i] = torch.maximum(worst[i], rho.max())
            if clip:
                clipped[i] += bad.sum()
        if clip:  # directions where training would have diverged: critically damped
            nu_p = torch.where(bad, _critical(nu_p, dm, rule), nu_p)
        flat = clip or bs.white
        if alpha is not None and calibrated[i]:
            # the scaled curvature; a direction the scale alone would push past stability (the
            # logged curvature was stable there) is critically damped instead
            nu_s = alpha[i] * nu + rule.lam * bs.decay_weight
            over = (_rho(nu_s, dm, rule) >= 1.0 + 1e-6) & ~bad
            nu_p = torch.where(over, torch.maximum(nu_p, _critical(nu_p, dm, rule)), torch.where(bad, nu_p, nu_s))
            flat = True
        out = nu_p.reshape(-1).contiguous() if flat else None
        if key is not None:
            memo[key] = out
        return out

    def advance(i, bs, k, seg, x, state, dflat, alpha=None, verdict=True):
        """Block i's state through segment k under the rotated forcing x; curvature × alpha[i]."""
        if spectra:
            s_out, s_in = spectra(k, i)
            nu = s_out[:, None] * s_in[None, :]
        else:
            s_out, s_in, nu = bs.s_out, bs.s_in, bs.nu
        dm = bs.precond(dflat)
        u, e = state
        for rule, steps in _runs_of(log, seg, groups[i], lam):
            nu_f = curvature_of(i, bs, k, rule, nu, dm, alpha, verdict)
            if nu_f is not None and plain and dm is None:  # per-element curvature, plain SGD
                acc = -e
                ops.contraction_accumulate(acc.view(-1, 1), x.reshape(-1, 1), nu_f, torch.ones(1, device=device),
                                           lam=0.0, eta=rule.eta, steps=steps)
                e.copy_(-acc)
            elif nu_f is not None:  # per-element curvature: the same fused kernel on flat views
                ops.contraction2_accumulate(u.view(-1, 1), e.view(-1, 1), x.reshape(-1, 1), nu_f,
                                            torch.ones(1, device=device),
                                            None if dm is None else dm.reshape(-1, 1), lam=0.0,
                                            lam_dec=rule.lam_dec, eta=rule.eta, mu=rule.mu, c=rule.c,
                                            nesterov=rule.nesterov, steps=steps)
            elif plain:
                acc = -e
                ops.contraction_accumulate(acc, x, s_out.contiguous(), s_in.contiguous(), lam=rule.lam,
                                           eta=rule.eta, steps=steps)
                e.copy_(-acc)
            else:  # the fused 2-state kernel
                ops.contraction2_accumulate(u, e, x, s_out.contiguous(), s_in.contiguous(), dm,
                                            lam=rule.lam, lam_dec=rule.lam_dec, eta=rule.eta, mu=rule.mu,
                                            c=rule.c, nesterov=rule.nesterov, steps=steps)

    # First sweep: the forget passes and the error (uncalibrated), or each half's error with the
    # full forcing (their row-weighted mean, the recurrence being linear) cached for the second.
    states = zeros()
    half_states = (zeros(), zeros()) if halves is not None else None
    wa_, wb_ = (halves[2] / r, halves[3] / r) if halves is not None else (0.0, 0.0)
    cache: list[list] = []
    for k, seg in enumerate(segments):
        if k == K - 1:
            dk, hk = d_last, h_last
        else:
            dk, _, hk = delta(k, curvature=False)
            bar.update(1)
        dflat = log.row("ckpt/d", k).to(device) if precond else None
        row = []
        for i, bs in enumerate(bases):
            if not mine[i]:
                row.append(None)
                continue
            if halves is None:
                advance(i, bs, k, seg, bs.rotate(dk), states[i], dflat)
                continue
            xa, xb = bs.rotate(hk[0]), bs.rotate(hk[1])
            advance(i, bs, k, seg, xa, half_states[0][i], dflat)
            advance(i, bs, k, seg, xb, half_states[1][i], dflat, verdict=False)
            row.append(wa_ * xa + wb_ * xb)
        cache.append(row)
    bar.close()
    calib = None
    if halves is not None:
        if owners is not None:
            for hs in half_states:
                for (_, e), o in zip(hs, owners):
                    comm.from_owner(e, o)
        alpha, calib = _calibration(model, layout, log, w_a, bases, calibrated, names, half_states, halves,
                                    loss_fn, batch_size, device)
        for k, seg in enumerate(segments):  # second sweep: kernels only, calibrated curvature
            dflat = log.row("ckpt/d", k).to(device) if precond else None
            for i, bs in enumerate(bases):
                if mine[i]:
                    advance(i, bs, k, seg, cache[k][i], states[i], dflat, alpha=alpha, verdict=False)
    if owners is not None:  # every rank gets each block's verdict and error from its owner
        comm.sum_(worst)  # the other ranks hold zeros for blocks they do not own
        comm.sum_(clipped)
        for (_, e), o in zip(states, owners):
            comm.from_owner(e, o)
    worst_h, clipped_h = worst.tolist(), clipped.tolist()
    unstable_blocks = [n for n, r in zip(names, worst_h) if r >= 1.0 + 1e-6]
    if unstable_blocks and not clip:
        raise CurvatureScaleError(
            f"the logged curvature says training would have diverged under the recorded optimizer in "
            f"{', '.join(unstable_blocks)} (spectral radius up to {max(worst_h):.3g}): its scale is wrong for "
            "this model (a layer type without a matched normalisation, or a stale factor), so the result "
            "would be amplified. Pass unstable='clip' to clip those directions to critical damping "
            "(reported in result.info['stability'])")
    w = w_a.clone()
    for bs, (_, e) in zip(bases, states):
        bs.add_back(w, e)
    return w, {"max_rho": max(worst_h, default=0.0), "clipped": int(sum(clipped_h)),
               "unstable_blocks": unstable_blocks, "calibration": calib}, fs


def _calibration(model, layout, log, w_a, bases, calibrated, names, half_states, halves, loss_fn,
                 batch_size, device) -> tuple[list[float], dict]:
    """Each calibrated block's α = exact GGN curvature / K-FAC curvature along the error the
    recurrence built, mean of the two cross estimates (half a's error measured on half b's
    rows and vice versa), clamped to ALPHA_RANGE; 1 where the K-FAC curvature along it is 0."""
    fa, fb, _, _ = halves
    train = bool(log.meta.get("train_mode", False))
    max_rows = _calibration_rows(fa, device)
    idx = [i for i, c in enumerate(calibrated) if c]
    layout.set(model, w_a)
    est, evals = [], 0
    for own, other in ((0, fb), (1, fa)):
        dirs, kfac = [], []
        for i in idx:
            e = half_states[own][i][1]
            v = torch.zeros_like(w_a)
            bases[i].add_back(v, e)
            dirs.append(v)
            kfac.append((bases[i].nu * e * e).sum())
        if COUPLING and len(dirs) > 1:
            dirs.append(torch.stack(dirs).sum(0))
        try:
            exact, seen = ggn_quadratic(model, layout, other, loss_fn, dirs, batch_size=batch_size,
                                        device=device, train_mode=train, max_samples=max_rows)
        except (NotImplementedError, RuntimeError) as exc:  # torch's "no forward derivative" errors
            raise UnsupportedTrainingError(
                f"the trajectory's directional calibration needs forward-mode Jacobian products through the "
                f"model, and they failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the usual "
                "cause is a layer without a forward derivative (an op without a forward-AD formula, or an "
                "autograd.Function without setup_context/jvp). Pass calibrate=False for the uncalibrated "
                "trajectory (measured further from retraining at high ratios, docs/math.md §4), or give the "
                "layer one") from exc
        if not torch.isfinite(exact).all():
            raise NonFiniteError("the directional calibration's exact curvature is NaN/Inf: check the model and "
                                 "the forget set; calibrate=False skips it")
        if COUPLING and len(idx) > 1:  # the blocks' cross terms: whole / sum of the blocks' own
            exact = exact[:-1] * (exact[-1] / exact[:-1].sum().clamp_min(1e-30))
        est.append((exact, torch.stack(kfac)))
        evals += seen * len(dirs)
    ratios = [torch.where(k > 0, x / k.clamp_min(1e-30), torch.ones_like(x)) for x, k in est]
    a = (0.5 * (ratios[0] + ratios[1])).clamp(*ALPHA_RANGE).tolist()
    alpha = [1.0] * len(bases)
    for i, v in zip(idx, a):
        alpha[i] = v
    return alpha, {"alpha": {names[i]: round(alpha[i], 4) for i in idx},
                   "halves": [halves[2], halves[3]], "grad_evals": evals}


def _calibration_rows(data, device) -> int:
    """Rows of each half the calibration measures on: CALIBRATION_SAMPLES, fewer when a row holds
    many output positions (a sequence), so that rows × positions ≤ CALIBRATION_POSITIONS."""
    from .._batches import batches
    _, y = next(iter(batches(data, 1, device)))
    positions = max(1, y[0].numel()) if torch.is_tensor(y) and y.dim() > 0 else 1
    return max(CALIBRATION_MIN, min(CALIBRATION_SAMPLES, CALIBRATION_POSITIONS // positions))


class _Basis:
    """Where one block's recurrence runs. Without a preconditioner: the retained curvature's
    eigenbasis (ν = s_out·s_in). Under Adam (d = 1/(√v̂ + ε) per parameter), the recurrence
    e ← e − η D (H e + δ) is diagonal in the eigenbasis of the whitened curvature D^½ H D^½,
    not of H. For a K-FAC block, D^½ is fitted by a rank-1 (Kronecker) product a bᵀ (least
    squares in log space, as Adafactor factors Adam's second moment), so D^½ H D^½ ≈
    (diag(a) G diag(a)) ⊗ (diag(b) A diag(b)) is Kronecker again and is eigendecomposed once,
    at the last segment's D; each segment's own D enters as the ratio D_k / (a bᵀ)² (≈ 1)
    projected on the diagonal. Diagonal blocks are exact: d is per coordinate."""

    def __init__(self, blk, d_last: torch.Tensor | None):
        self.blk = blk
        self.decay_weight = 1.0
        kron = blk.U_in is not None
        if d_last is not None and (blk.U_in is None) != (blk.U_out is None):
            raise UnsupportedTrainingError(
                "a K-FAC block with a diagonal factor (an embedding's input side, or a factor over the "
                "memory bound) under a preconditioned optimizer's trajectory is not supported; "
                "use mode='oneshot' or an SGD/momentum recipe")
        if d_last is None or not kron:
            self.white = False
            self.s_out, self.s_in = blk.s_out, blk.s_in
            self.nu = blk.nu()
            return
        self.white = True
        G = (blk.U_out * blk.s_out) @ blk.U_out.T
        A = (blk.U_in * blk.s_in) @ blk.U_in.T
        # Rows/columns the data never excites (dead inputs or units: zero factor diagonal) never
        # move under Adam (zero gradient, zero step); their d = 1/ε carries no information and
        # would swamp the fit, so they get the live mean and a ratio of 1.
        gd, ad = G.diagonal(), A.diagonal()
        self.live = ((gd > 1e-6 * gd.max().clamp_min(1e-30))[:, None]
                     & (ad > 1e-6 * ad.max().clamp_min(1e-30))[None, :])
        L = blk.gather(d_last).clamp_min(1e-30).sqrt().log()
        rows, cols = self.live.any(1), self.live.any(0)
        Lm = torch.where(self.live, L, torch.zeros_like(L))
        cnt = self.live.float()
        la = Lm.sum(1) / cnt.sum(1).clamp_min(1)
        la = torch.where(rows, la, la[rows].mean() if rows.any() else torch.zeros_like(la))
        lb = (Lm - la[:, None] * cnt).sum(0) / cnt.sum(0).clamp_min(1)
        lb = torch.where(cols, lb, lb[cols].mean() if cols.any() else torch.zeros_like(lb))
        self.a, self.b = la.exp(), lb.exp()
        self.s_out, self.V_out = eigh_psd(self.a[:, None] * G * self.a[None, :])
        self.s_in, self.V_in = eigh_psd(self.b[:, None] * A * self.b[None, :])
        self.nu = self.s_out[:, None] * self.s_in[None, :]
        self.fit = (self.a[:, None] * self.b[None, :]) ** 2
        # coupled decay λ·D in the whitened basis, projected on the diagonal
        self.decay_weight = ((self.V_out ** 2).T @ self.a ** 2)[:, None] * ((self.V_in ** 2).T @ self.b ** 2)[None, :]

    def rotate(self, vec: torch.Tensor) -> torch.Tensor:
        if not self.white:
            return self.blk.to_eig(self.blk.gather(vec))
        M = self.blk.gather(vec)
        return (self.V_out.T @ (self.a[:, None] * M * self.b[None, :]) @ self.V_in).contiguous()

    def precond(self, dflat: torch.Tensor | None) -> torch.Tensor | None:
        if dflat is None:
            return None
        D = self.blk.gather(dflat)
        if not self.white:
            return D.contiguous()  # a vector block: d is exact per coordinate
        ratio = torch.where(self.live, D / self.fit, torch.ones_like(D))
        return ((self.V_out ** 2).T @ ratio @ (self.V_in ** 2)).contiguous()

    def add_back(self, w: torch.Tensor, e: torch.Tensor) -> None:
        """w += this block's error e, taken back to the parameters."""
        if self.white:
            m = self.a[:, None] * (self.V_out @ e @ self.V_in.T) * self.b[None, :]
        else:
            m = self.blk.from_eig(e)
        self.blk.scatter(w, self.blk.gather(w) + m)


def _segment_spectra(log, P: Preconditioner, device):
    """(k, block) -> the segment's (s_out, s_in) in P's eigenbasis. The log holds them in the
    final full-data basis U; a spectrum moves to P's basis V through (Vᵀ U)² (treating the
    segment's factor as diagonal in U)."""
    blocks = _blocks(log)
    maps = []

    def move(V, side, b, diag):  # a diagonal factor keeps its coordinates: no rotation
        return None if diag else (V.T @ log.get(f"kfac/{b.module}/U_{side}").to(device)) ** 2

    for b, eb in zip(blocks, P.blocks):
        maps.append((move(eb.U_out, "G", b, b.g_diag), move(eb.U_in, "A", b, b.a_diag)))

    def get(k, i):
        if i < len(blocks):
            b = blocks[i]
            MG, MA = maps[i]
            sG = log.get(f"seg/{k}/{b.module}/s_G").to(device)
            sA = log.get(f"seg/{k}/{b.module}/s_A").to(device)
            return (sG if MG is None else MG @ sG, sA if MA is None else MA @ sA)
        return log.get(f"seg/{k}/diag/nu").to(device), P.blocks[i].s_in

    return get
