"""Mini-Unlearning (DESIGN §2.2): one-shot, trajectory and refresh modes.

One forget pass gives G_R = Σ_{i∈R} ∇ℓ_i, the forget loss and the forget curvature, so
g0 = ∇F_R(w_a) = (n g_a − G_R)/(n − r) + λ w_a is exact and the retained preconditioner
P = curvature((n·full − forget)/(n − r)) + λI is positive definite by construction.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import ops
from ..curvature import (EigenBlock, KronBlock, Layout, PassSums, Preconditioner, data_pass,
                         dense_hessian, eigh_psd)
from ..lbfgs import lbfgs

CONVERGED_RESIDUAL = 1e-3  # ‖∇F(w_a)‖ ≤ this · ‖g_a‖: training ran to convergence


def _blocks(log) -> list[KronBlock]:
    return [KronBlock(**b) for b in log.meta.get("kron_blocks", [])]


def forget_pass(model, layout: Layout, log, w: torch.Tensor, forget, loss_fn, *, curvature: bool,
                batch_size: int, device) -> PassSums:
    """Σ over the forget set of losses and gradients at ``w`` (+ its curvature when asked)."""
    layout.set(model, w)
    exact = log.meta["curvature"] == "exact"
    blocks = _blocks(log)
    sums = data_pass(model, layout, forget, loss_fn, curvature=curvature and not exact, blocks=blocks,
                     diag_names=log.meta.get("diag_params", []) if curvature else (),
                     fisher=log.meta.get("fisher", "ggn"), batch_size=batch_size, device=device)
    if curvature and exact:
        sums.A["hessian"] = dense_hessian(model, layout, forget, loss_fn, batch_size, device)
    return sums


def preconditioner(log, layout: Layout, fsums: PassSums, n: int, r: int, lam: float,
                   device) -> Preconditioner:
    """P = curvature of the retained loss + λI, from the log's full-data curvature minus the
    forget set's, per block in its eigenbasis."""
    one = torch.ones(1, device=device)
    k = 1.0 / (n - r)
    if log.meta["curvature"] == "exact":
        s, U = eigh_psd((n * log.get("hessian").to(device) - fsums.A["hessian"]) * k)
        return Preconditioner([EigenBlock(lambda v: v.view(-1, 1), lambda out, m: out.copy_(m.view(-1)),
                                          U, s, None, one)], lam, layout.numel)
    parts = []
    for b in _blocks(log):
        sides = {}
        for side in ("A", "G"):
            U = log.get(f"kfac/{b.module}/U_{side}").to(device)
            s = log.get(f"kfac/{b.module}/s_{side}").to(device)
            full = (U * s) @ U.T
            sides[side] = eigh_psd((n * full - fsums.__dict__[side][b.module]) * k)
        (sA, UA), (sG, UG) = sides["A"], sides["G"]
        parts.append(EigenBlock(lambda v, b=b: b.matrix(layout, v),
                                lambda out, m, b=b: b.scatter(layout, out, m), UG, sG, UA, sA))
    diag = log.meta.get("diag_params", [])
    if diag:
        idx = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in diag]).to(device)
        nu = ((n * log.get("diag/nu").to(device) - fsums.diag) * k).clamp_min(0)
        parts.append(EigenBlock(lambda v: v[idx].view(-1, 1),
                                lambda out, m: out.index_copy_(0, idx, m.view(-1)), None, nu, None, one))
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
        f = {s: (log.get(f"kfac/{blk.module}/U_{s}").to(device), log.get(f"kfac/{blk.module}/s_{s}").to(device))
             for s in ("A", "G")}
        blocks.append((blk, f, fs.A[blk.module], fs.G[blk.module]))
    diag = log.meta.get("diag_params", [])
    if diag:
        idx = torch.cat([torch.arange(layout.slice(p).start, layout.slice(p).stop) for p in diag]).to(device)
        nu_full = log.get("diag/nu").to(device)
        nu_R = ((n * nu_full - fs.diag) * k).clamp_min(0)

    def side(U, s_, forget, M, left):  # (n U diag(s) Uᵀ − forget) / (n − r) applied to M
        return k * (n * (U @ (s_[:, None] * (U.T @ M))) - forget @ M) if left else \
            k * (n * (((M @ U) * s_) @ U.T) - M @ forget)

    def apply_P(v):
        out = lam * v
        for blk, f, Af, Gf in blocks:
            M = blk.matrix(layout, v)
            GM = side(*f["G"], Gf, M, left=True)
            blk.scatter(layout, out, side(*f["A"], Af, GM, left=False) + lam * M)
        if diag:
            out[idx] = (nu_R + lam) * v[idx]
        return out

    def apply_Minv(v):
        out = v / lam
        for blk, f, _, _ in blocks:
            (UA, sA), (UG, sG) = f["A"], f["G"]
            M = UG.T @ blk.matrix(layout, v) @ UA
            blk.scatter(layout, out, UG @ (M / (sG[:, None] * sA[None, :] + lam)) @ UA.T)
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
        batch_size: int, device, progress: bool) -> dict:
    """Mini-Unlearning on ``model`` (a private copy, modified in place). Returns the result
    fields: mode, passes, grad_evals, certificate, verified."""
    layout = Layout(log.param_names, [tuple(s) for s in log.shapes])
    meta = log.meta
    n, lam = int(meta["n_train"]), float(meta["weight_decay"])
    w_a = log.get("anchor/w").to(device)
    g_a = log.get("anchor/g").to(device)
    segments = meta.get("segments") or []
    if mode == "auto":
        residual = float((g_a + lam * w_a).norm())
        if segments and residual > CONVERGED_RESIDUAL * float(g_a.norm()):
            mode = "trajectory"
        else:
            mode = "refresh" if retain is not None else "oneshot"
    if mode == "trajectory":
        if not segments:
            raise ValueError("mode='trajectory' needs checkpoints: record with Recorder(checkpoints=K) "
                             "and call rec.step(lr) at every optimizer step")
        w = _trajectory(model, layout, log, forget, loss_fn, n, r, lam, w_a, segments, batch_size,
                        device, progress)
        layout.set(model, w)
        return dict(mode="trajectory", passes=len(segments), grad_evals=r * len(segments),
                    certificate=None, verified=False)
    fs = forget_pass(model, layout, log, w_a, forget, loss_fn, curvature=True, batch_size=batch_size,
                     device=device)
    g0 = (n * g_a - fs.grad) / (n - r) + lam * w_a
    if mode == "oneshot":
        step = kron_pcg(log, layout, fs, n, r, lam, g0, device)
        if step is None:  # dense curvature, or the retained factors lost definiteness
            step = preconditioner(log, layout, fs, n, r, lam, device).solve(g0)
        layout.set(model, w_a - step)
        return dict(mode="oneshot", passes=1, grad_evals=r, certificate=None, verified=False)
    P = preconditioner(log, layout, fs, n, r, lam, device)
    if mode != "refresh":
        raise ValueError(f"unknown mode {mode!r}; choose auto, oneshot, trajectory or refresh")
    if retain is None:
        raise ValueError("mode='refresh' needs the retained data: pass retain=(X, y), a Dataset or a DataLoader")
    f0 = (n * float(meta["anchor_loss"]) - fs.loss) / (n - r) + 0.5 * lam * float(w_a @ w_a)
    bar = tqdm(total=max_passes, desc="mini_unlearn: refresh passes", disable=not progress, leave=False)

    def fg(w):
        layout.set(model, w)
        s = data_pass(model, layout, retain, loss_fn, batch_size=batch_size, device=device)
        bar.update(1)
        return s.loss / s.n + 0.5 * lam * float(w @ w), s.grad / s.n + lam * w

    try:
        res = lbfgs(fg, w_a, f0, g0, P.solve, max_evals=max_passes, tol=tol)
    finally:
        bar.close()
    layout.set(model, res.w)
    cert = float(res.g.norm() / g0.norm())
    return dict(mode="refresh", passes=1 + res.evals, grad_evals=r + res.evals * (n - r),
                certificate=cert, verified=bool(res.converged))


def _trajectory(model, layout, log, forget, loss_fn, n, r, lam, w_a, segments, batch_size, device,
                progress) -> torch.Tensor:
    """acc ← a_k ⊙ acc + ((1 − a_k)/ν') ⊙ Uᵀδ_k over the checkpoints, w_u = w_a − U acc."""
    K = len(segments)

    def delta(k, curvature):
        w_k = w_a + log.row("ckpt/wdiff", k).to(device)
        s = forget_pass(model, layout, log, w_k, forget, loss_fn, curvature=curvature,
                        batch_size=batch_size, device=device)
        return (r * log.row("ckpt/grad", k).to(device) - s.grad) / (n - r), s

    bar = tqdm(total=K, desc="mini_unlearn: checkpoint forget passes", disable=not progress, leave=False)
    # The last checkpoint's pass also gives the forget curvature, so P costs no extra pass.
    d_last, fs = delta(K - 1, curvature=True)
    bar.update(1)
    P = preconditioner(log, layout, fs, n, r, lam, device)
    acc = [torch.zeros_like(b.nu()) for b in P.blocks]
    spectra = _segment_spectra(log, P, device) if log.meta.get("segment_spectra") else None
    for k, seg in enumerate(segments):
        if k == K - 1:
            d = d_last
        else:
            d, _ = delta(k, curvature=False)
            bar.update(1)
        for i, (a, x, b) in enumerate(zip(acc, P.rotate(d), P.blocks)):
            s_out, s_in = spectra(k, i) if spectra else (b.s_out, b.s_in)
            for lr, steps in seg["lr_runs"]:
                ops.contraction_accumulate(a, x, s_out.contiguous(), s_in.contiguous(), lam=lam,
                                           eta=lr, steps=steps)
    bar.close()
    return w_a - P.unrotate(acc)


def _segment_spectra(log, P: Preconditioner, device):
    """(k, block) -> the segment's (s_out, s_in) in P's eigenbasis. The log holds them in the
    final full-data basis U; a spectrum moves to P's basis V through (Vᵀ U)² (treating the
    segment's factor as diagonal in U)."""
    blocks = _blocks(log)
    maps = []
    for b, eb in zip(blocks, P.blocks):
        UA = log.get(f"kfac/{b.module}/U_A").to(device)
        UG = log.get(f"kfac/{b.module}/U_G").to(device)
        maps.append(((eb.U_out.T @ UG) ** 2, (eb.U_in.T @ UA) ** 2))

    def get(k, i):
        if i < len(blocks):
            b = blocks[i]
            MG, MA = maps[i]
            return (MG @ log.get(f"seg/{k}/{b.module}/s_G").to(device),
                    MA @ log.get(f"seg/{k}/{b.module}/s_A").to(device))
        return log.get(f"seg/{k}/diag/nu").to(device), P.blocks[i].s_in

    return get
