"""Why the trajectory refuses AdamW: which ingredient of its linearisation breaks (docs/math.md §3).

    python -m benchmarks.study_adam [--seeds 0,1,2] [--ratios 0.1,0.5] [--only TEXT] [--json benchmarks/results/study_adam.json]

mnist5k, the 784-128-10 MLP trained with AdamW (lr 1e-3, weight decay 1e-2, batch 64, 6 epochs,
StepLR ×0.5 every 4 epochs: the recipe of ``benchmarks.bench_optimizers``), and same-recipe
retraining (same initialisation, same batches minus the forgotten rows). The error e = w^R − w is
integrated step by step in parameter space (no K-FAC, no eigenbasis: exact GGN-vector products,
forward-mode Jacobian products), with the retained run's gradient modelled as g^R_t = g_t + D_t,

    D_t = GGN(point) e_t + δ(point),

and Adam's moments either with the preconditioner held at the original run's (``fixed``: u ←
β₁u + (1 − β₁)D, e ← e(1 − lr·wd) − lr·d·u/(1 − β₁ᵗ), the trajectory's linearisation) or adapting
(``adapt``: v^R = v + EMA_β₂(2gD + D²) too, the step (m + u)/(√v^R + ε) in full, nonlinear). Each
variant changes one choice:

    point    ckpt: the segment's first checkpoint (K = 10) | step: the original run's w_t
    curv     full: GGN over all training rows (what K-FAC approximates) | batch: over step t's
             retained rows
    delta    mean: the retained minus the full mean gradient (the forget passes' δ) | batch:
             step t's retained-row mean minus its batch mean (which forget rows step t held)
    stats    step: the run's own m_t, v_t, g_t | logged: their segment means (what a log holds)

and ``adapt+noise`` adds to v^R what the smaller retained batch adds to the second moment: a
batch's mean gradient has variance σ²/B, the retained batch's σ²/(B − f), so v^R gains
(B/(B − f) − 1)·σ²/B per step, with σ²/B ≈ v̂ − m̂² and f the forgotten rows of step t's batch
(``adapt+noise_r``: f/B replaced by the forget ratio r, which needs no batch indices).
``--only TEXT`` runs the variants whose name contains TEXT (``--only noise``:
benchmarks/results/study_adam_noise.json).

``exact`` replaces D_t by the exact retained batch gradient at w_t + e_t (that is retraining,
up to the moments' arithmetic: the harness's floor). Reports rel-L2 = ‖w + e − w^R‖ / ‖w − w^R‖
(1.0 = the untouched original) per variant, seed and ratio; ``inf`` where e overflowed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.func import functional_call, jvp, vjp

from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset

EPOCHS, LR, WD, BETAS, EPS, K, BATCH = 6, 1e-3, 1e-2, (0.9, 0.999), 1e-8, 10, 64

# name: (point, curv, delta, adam, stats)
VARIANTS = {
    "ckpt/full/mean, fixed d (the trajectory's model)": ("ckpt", "full", "mean", "fixed", "step"),
    "ckpt/full/mean, v adapts, logged stats": ("ckpt", "full", "mean", "adapt", "logged"),
    "ckpt/full/mean, v adapts": ("ckpt", "full", "mean", "adapt", "step"),
    "step/full/mean, v adapts": ("step", "full", "mean", "adapt", "step"),
    "ckpt/full/batch, v adapts": ("ckpt", "full", "batch", "adapt", "step"),
    "ckpt/batch/mean, v adapts": ("ckpt", "batch", "mean", "adapt", "step"),
    "ckpt/full/mean, v adapts + retained moments, logged stats": ("ckpt", "full", "mean", "adapt+moments", "logged"),
    "ckpt/full/mean, v adapts + retained moments": ("ckpt", "full", "mean", "adapt+moments", "step"),
    "ckpt/full/mean, v adapts + batch noise": ("ckpt", "full", "mean", "adapt+noise", "step"),
    "ckpt/full/mean, v adapts + batch noise, logged stats": ("ckpt", "full", "mean", "adapt+noise", "logged"),
    "ckpt/full/mean, v adapts + mean batch noise, logged stats": ("ckpt", "full", "mean", "adapt+noise_r", "logged"),
    "ckpt/batch/batch, v adapts": ("ckpt", "batch", "batch", "adapt", "step"),
    "step/batch/batch, fixed d": ("step", "batch", "batch", "fixed", "step"),
    "step/batch/batch, v adapts": ("step", "batch", "batch", "adapt", "step"),
    "exact gradients (retraining's floor)": None,
}


class Run:
    """One seed and ratio: the original run with every step's w, g, m, v, the retrained end
    point, and the GGN / gradient oracles."""

    def __init__(self, ds, seed: int, ratio: float):
        self.ds, self.seed, self.ratio = ds, seed, ratio
        n = ds.n_train
        f_idx, _ = forget_split(n, ratio, seed=seed + 1)
        self.keep = torch.ones(n, dtype=torch.bool)
        self.keep[f_idx] = False
        g = torch.Generator().manual_seed(seed)
        self.batches = [(ep, b) for ep in range(EPOCHS) for b in torch.randperm(n, generator=g).split(BATCH)]
        self.model, self.steps = self._train(capture=True)
        ref, _ = self._train(keep=self.keep)
        self.w_end, self.w_ref = self._flat(self.model), self._flat(ref)
        p = list(self.model.named_parameters())
        self.names, self.shapes = [k for k, _ in p], [v.shape for _, v in p]
        self.sizes = [v.numel() for _, v in p]
        T = len(self.steps)
        self.seg = [k * T // K for k in range(K + 1)]
        X, y = ds.X_train, ds.y_train
        Xr, yr = X[self.keep], y[self.keep]
        self.ckpt = []
        for k in range(K):
            wk, part = self.steps[self.seg[k]]["w"], self.steps[self.seg[k]:self.seg[k + 1]]
            self.ckpt.append(dict(
                w=wk, delta=self.grad(wk, Xr, yr) - self.grad(wk, X, y),
                **{f"{s}bar": torch.stack([st[s] for st in part]).mean(0) for s in ("m", "v", "g")}))

    @staticmethod
    def _flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def _train(self, keep=None, capture=False):
        ds = self.ds
        model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=self.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        steps, epoch = [], 0
        for ep, b in self.batches:
            if ep != epoch:
                sched.step()
                epoch = ep
            if keep is not None:
                b = b[keep[b]]
                if b.numel() == 0:
                    continue
            w = self._flat(model)
            opt.zero_grad()
            M.loss_fn(model(ds.X_train[b]), ds.y_train[b]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            lr = opt.param_groups[0]["lr"]
            opt.step()
            if capture:
                st = [opt.state[p] for p in model.parameters()]
                steps.append(dict(w=w, g=grad, lr=lr, t=int(st[0]["step"]),
                                  m=torch.cat([s["exp_avg"].reshape(-1) for s in st]),
                                  v=torch.cat([s["exp_avg_sq"].reshape(-1) for s in st])))
        return model, steps

    def _out(self, w, X):
        params = {k: t.view(s) for k, t, s in zip(self.names, w.split(self.sizes), self.shapes)}
        return functional_call(self.model, params, (X,))

    def ggn(self, w, v, X):
        """Mean over the rows X of Jᵀ H_out J v (softmax cross-entropy's GGN)."""
        z, Jv = jvp(lambda ww: self._out(ww, X), (w,), (v,))
        p = z.softmax(1)
        _, pull = vjp(lambda ww: self._out(ww, X), w)
        return pull((p * Jv - p * (p * Jv).sum(1, keepdim=True)) / X.shape[0])[0]

    def forget_sq_grad(self, k, chunk=256):
        """Checkpoint k's mean over the forget rows of the per-sample gradient squared, per
        coordinate (computed when a variant first asks for it)."""
        c = self.ckpt[k]
        if "s2f" not in c:
            from torch.func import grad, vmap
            X, y = self.ds.X_train[~self.keep], self.ds.y_train[~self.keep]
            f = lambda ww, x, t: M.loss_fn(self._out(ww, x[None]), t[None])
            out = torch.zeros_like(c["w"])
            for i in range(0, len(X), chunk):
                out += (vmap(grad(f), in_dims=(None, 0, 0))(c["w"], X[i:i + chunk], y[i:i + chunk]) ** 2).sum(0)
            c["s2f"] = out / max(len(X), 1)
        return c["s2f"]

    def grad(self, w, X, y):
        w = w.clone().requires_grad_(True)
        return torch.autograd.grad(M.loss_fn(self._out(w, X), y), w)[0]

    def simulate(self, spec) -> float:
        X, y = self.ds.X_train, self.ds.y_train
        b1, b2 = BETAS
        e = torch.zeros_like(self.w_end)
        u, uv = torch.zeros_like(e), torch.zeros_like(e)
        for k in range(K):
            c = self.ckpt[k]
            for t in range(self.seg[k], self.seg[k + 1]):
                s, b = self.steps[t], self.batches[t][1]
                br = b[self.keep[b]]
                if spec is None:  # exact: the retained batch's gradient at the corrected point
                    D = self.grad(s["w"] + e, X[br], y[br]) - s["g"]
                    point, adam, stats = "step", "adapt", "step"
                else:
                    point, curv, delta, adam, stats = spec
                    wp = c["w"] if point == "ckpt" else s["w"]
                    D = self.ggn(wp, e, X if curv == "full" else X[br])
                    if delta == "mean":
                        D = D + c["delta"]
                    else:
                        D = D + self.grad(wp, X[br], y[br]) - self.grad(wp, X[b], y[b])
                m, v, g = (c["mbar"], c["vbar"], c["mbar"]) if stats == "logged" else (s["m"], s["v"], s["g"])
                bc1, bc2 = 1 - b1 ** s["t"], 1 - b2 ** s["t"]
                u = b1 * u + (1 - b1) * D
                if adam == "fixed":
                    diff = (u / bc1) / ((v / bc2).sqrt() + EPS)
                else:
                    noise = 0.0
                    if adam != "adapt":
                        nb, nr = len(b), max(len(br), 1)  # step t's batch and its retained rows
                        var_b = (v / bc2 - (m / bc1) ** 2).clamp_min(0)  # a batch mean's variance
                    if adam == "adapt+moments":
                        # v^R − v = (μ_R² − μ²) [the 2gD + D² term] + var_R/B_R − var/B, with
                        # S2 = B·var_b + μ², S2_R = (n·S2 − r·S2_F)/(n − r), var_R = S2_R − μ_R²
                        n, r = len(self.keep), int((~self.keep).sum())
                        mu = m / bc1
                        s2r = (n * (nb * var_b + mu ** 2) - r * self.forget_sq_grad(k)) / (n - r)
                        var_r = (s2r - (mu + c["delta"]) ** 2).clamp_min(0)
                        noise = var_r / nr - var_b
                    elif adam.startswith("adapt+noise"):
                        # the retained batch is smaller: its mean gradient's variance grows by
                        # B / (B − f) (f = forget rows in the batch; noise_r: the ratio r instead)
                        kappa = nb / nr - 1 if adam == "adapt+noise" else self.ratio / (1 - self.ratio)
                        noise = kappa * var_b
                    uv = b2 * uv + (1 - b2) * (2 * g * D + D * D + noise)
                    vr = (v + uv).clamp_min(0)
                    diff = ((m + u) / bc1) / ((vr / bc2).sqrt() + EPS) - (m / bc1) / ((v / bc2).sqrt() + EPS)
                e = e * (1 - s["lr"] * WD) - s["lr"] * diff
                if not torch.isfinite(e).all():
                    return float("inf")
        return float((self.w_end + e - self.w_ref).norm() / (self.w_end - self.w_ref).norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="0.1,0.5")
    ap.add_argument("--only", default="", help="run only the variants whose name contains this")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = {n: s for n, s in VARIANTS.items() if args.only in n}
    torch.manual_seed(0)
    ds = load_dataset("mnist5k", seed=0, preprocess="unit")
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    rel = {name: {str(r): [] for r in ratios} for name in variants}
    t0 = time.time()
    for seed in seeds:
        for ratio in ratios:
            run = Run(ds, seed, ratio)
            for name, spec in variants.items():
                rel[name][str(ratio)].append(run.simulate(spec))
                print(f"seed {seed} ratio {ratio:.0%}  {name:52s} rel {rel[name][str(ratio)][-1]:.3f}  "
                      f"({time.time() - t0:.0f}s)", flush=True)

    def cell(vals):
        if any(v == float("inf") for v in vals):
            return f"inf in {sum(v == float('inf') for v in vals)}/{len(vals)} seeds"
        return f"{statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f}"

    print("\n| variant | " + " | ".join(f"rel {r:.0%}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for name in variants:
        print(f"| {name} | " + " | ".join(cell(rel[name][str(r)]) for r in ratios) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recipe": dict(optimizer="AdamW", lr=LR, weight_decay=WD, betas=BETAS, eps=EPS,
                                      epochs=EPOCHS, batch=BATCH, checkpoints=K, data="mnist5k", model="mlp"),
                       "seeds": seeds, "ratios": ratios,
                       "variants": {n: list(s) if s else None for n, s in variants.items()},
                       "rel": rel, "seconds": time.time() - t0}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
